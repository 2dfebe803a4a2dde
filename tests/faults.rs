//! A fault-injecting `ObjectStore` wrapper, for tests that attack the invariants.
//!
//! Wrap any store; then, on command, make its gets, puts or lists fail, stall,
//! return corrupt bytes, or (for puts) land and *then* report an error — the
//! ambiguous outcome a time-out produces in real life. Faults are either persistent
//! (until cleared) or counted (the next `n` calls).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// Which kind of call a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `get_opts` (reads of manifests).
    Get,
    /// `put_opts` (lease writes, fork creation, tombstones).
    Put,
    /// `list` and `list_with_delimiter`.
    List,
}

/// What goes wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Return a transient error without touching the store.
    Fail,
    /// Wait this long, then perform the call normally.
    Stall(Duration),
    /// Gets return bytes that are not JSON; puts write such bytes.
    Corrupt,
    /// Puts: perform the write, then report an error (the outcome of a time-out).
    FailAfterWrite,
}

#[derive(Debug, Default)]
struct Plan {
    persistent: Option<Fault>,
    counted: Vec<Fault>,
}

/// The switchboard of a [`FaultyStore`]; clone the `Arc` into the test.
#[derive(Debug, Default)]
pub struct FaultControl {
    plans: Mutex<HashMap<Op, Plan>>,
    calls: [AtomicU64; 3],
    injected: AtomicU64,
}

impl FaultControl {
    /// Apply `fault` to every `op` call until cleared (`None` clears it).
    pub fn set(&self, op: Op, fault: Option<Fault>) {
        self.plans.lock().unwrap().entry(op).or_default().persistent = fault;
    }

    /// Apply `fault` to the next `n` calls of `op`.
    pub fn next(&self, op: Op, fault: Fault, n: usize) {
        let mut plans = self.plans.lock().unwrap();
        let plan = plans.entry(op).or_default();
        plan.counted.extend(std::iter::repeat_n(fault, n));
    }

    /// Clear every fault.
    pub fn clear(&self) {
        self.plans.lock().unwrap().clear();
    }

    /// Calls of `op` seen so far.
    pub fn calls(&self, op: Op) -> u64 {
        self.calls[op as usize].load(Ordering::SeqCst)
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    fn take(&self, op: Op) -> Option<Fault> {
        self.calls[op as usize].fetch_add(1, Ordering::SeqCst);
        let mut plans = self.plans.lock().unwrap();
        let plan = plans.get_mut(&op)?;
        let f = if plan.counted.is_empty() {
            plan.persistent.clone()
        } else {
            Some(plan.counted.remove(0))
        };
        if f.is_some() {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        f
    }
}

/// An `ObjectStore` that forwards to `inner` except where told to misbehave.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    ctl: Arc<FaultControl>,
}

impl FaultyStore {
    /// Wrap `inner`; returns the store and its switchboard.
    pub fn wrap(inner: Arc<dyn ObjectStore>) -> (Arc<FaultyStore>, Arc<FaultControl>) {
        let ctl = Arc::new(FaultControl::default());
        (
            Arc::new(FaultyStore {
                inner,
                ctl: ctl.clone(),
            }),
            ctl,
        )
    }
}

fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: format!("injected fault on {what}").into(),
    }
}

const GARBAGE: &[u8] = b"\x00\xffnot a manifest{";

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({:?})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        match self.ctl.take(Op::Put) {
            None => self.inner.put_opts(location, payload, opts).await,
            Some(Fault::Fail) => Err(injected("put")),
            Some(Fault::Stall(d)) => {
                tokio::time::sleep(d).await;
                self.inner.put_opts(location, payload, opts).await
            }
            Some(Fault::Corrupt) => {
                self.inner
                    .put_opts(location, PutPayload::from_static(GARBAGE), opts)
                    .await
            }
            Some(Fault::FailAfterWrite) => {
                self.inner.put_opts(location, payload, opts).await?;
                Err(injected("put (after the write landed)"))
            }
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        match self.ctl.take(Op::Get) {
            None | Some(Fault::FailAfterWrite) => self.inner.get_opts(location, options).await,
            Some(Fault::Fail) => Err(injected("get")),
            Some(Fault::Stall(d)) => {
                tokio::time::sleep(d).await;
                self.inner.get_opts(location, options).await
            }
            Some(Fault::Corrupt) => {
                let mut r = self.inner.get_opts(location, options).await?;
                let bytes = Bytes::from_static(GARBAGE);
                r.range = 0..bytes.len() as u64;
                r.payload = GetResultPayload::Stream(
                    futures::stream::once(async move { Ok(bytes) }).boxed(),
                );
                Ok(r)
            }
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        match self.ctl.take(Op::List) {
            None | Some(Fault::Corrupt) | Some(Fault::FailAfterWrite) => self.inner.list(prefix),
            Some(Fault::Fail) => futures::stream::once(async { Err(injected("list")) }).boxed(),
            Some(Fault::Stall(d)) => {
                let inner = self.inner.list(prefix);
                futures::stream::once(tokio::time::sleep(d))
                    .flat_map(move |_| futures::stream::empty())
                    .chain(inner)
                    .boxed()
            }
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        match self.ctl.take(Op::List) {
            Some(Fault::Fail) => Err(injected("list")),
            Some(Fault::Stall(d)) => {
                tokio::time::sleep(d).await;
                self.inner.list_with_delimiter(prefix).await
            }
            _ => self.inner.list_with_delimiter(prefix).await,
        }
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
