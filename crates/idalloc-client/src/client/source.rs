//! Where an [`Allocator`](super::Allocator) gets its ranges: the daemon (through a
//! [`Client`]) or, for tests, benchmarks and daemon-less runs, [`LocalSource`].
//!
//! Invariant a source must keep: within its namespace and kind it never returns
//! two overlapping ranges. The cache's uniqueness argument rests on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::connection::Client;
use super::error::ClientError;
use crate::error::ServiceError;
use crate::namespace::{Kind, Namespace};
use crate::protocol::{Hwm, IdRange};

/// A supplier of disjoint id ranges for one namespace.
///
/// The futures are boxed: they are only awaited on the allocator's slow path (once
/// per range), where an allocation does not matter.
pub trait RangeSource: Send + Sync + 'static {
    /// Reserve `count` fresh consecutive ids of `kind`.
    fn reserve(&self, kind: Kind, count: u64) -> BoxFuture<'_, Result<IdRange, ClientError>>;
    /// The next ids the source would grant.
    fn hwm(&self) -> BoxFuture<'_, Result<Hwm, ClientError>>;
    /// Make the source's state durable and release what it holds beyond the ids
    /// granted (the daemon's `checkpoint`).
    fn checkpoint(&self) -> BoxFuture<'_, Result<Hwm, ClientError>>;
}

/// The daemon, for one namespace.
pub struct ClientSource {
    client: Client,
    namespace: Namespace,
}

impl ClientSource {
    /// Ranges of one namespace (the primary, or a fork), from `client`.
    pub fn new(client: Client, namespace: impl Into<Namespace>) -> Self {
        ClientSource {
            client,
            namespace: namespace.into(),
        }
    }
}

impl RangeSource for ClientSource {
    fn reserve(&self, kind: Kind, count: u64) -> BoxFuture<'_, Result<IdRange, ClientError>> {
        self.client.reserve(self.namespace, kind, count).boxed()
    }
    fn hwm(&self) -> BoxFuture<'_, Result<Hwm, ClientError>> {
        self.client.hwm(self.namespace).boxed()
    }
    fn checkpoint(&self) -> BoxFuture<'_, Result<Hwm, ClientError>> {
        self.client.checkpoint(self.namespace).boxed()
    }
}

/// An in-process source: two counters, optionally with a delay per reservation to
/// stand in for a daemon's round trip. Nothing is persisted.
#[derive(Debug, Default)]
pub struct LocalSource {
    next: [AtomicU64; 2],
    calls: AtomicU64,
    delay: Duration,
}

impl LocalSource {
    /// Counters starting at 0, answering at once.
    pub fn new() -> Arc<Self> {
        Arc::new(LocalSource::default())
    }

    /// Counters starting at 0, each reservation taking `delay`.
    pub fn with_delay(delay: Duration) -> Arc<Self> {
        Arc::new(LocalSource {
            delay,
            ..LocalSource::default()
        })
    }

    /// How many reservations were made.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn current(&self) -> Hwm {
        Hwm {
            fork: None,
            next_vid: self.next[Kind::Vid.index()].load(Ordering::SeqCst),
            next_eid: self.next[Kind::Eid.index()].load(Ordering::SeqCst),
            root_wide: true,
        }
    }
}

impl RangeSource for LocalSource {
    fn reserve(&self, kind: Kind, count: u64) -> BoxFuture<'_, Result<IdRange, ClientError>> {
        async move {
            if count == 0 {
                return Err(
                    ServiceError::InvalidArgument("count must be at least 1".into()).into(),
                );
            }
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            self.calls.fetch_add(1, Ordering::SeqCst);
            let counter = &self.next[kind.index()];
            let mut start = counter.load(Ordering::SeqCst);
            loop {
                let end = start.checked_add(count).ok_or_else(|| {
                    ServiceError::Exhausted(format!(
                        "{kind} counter at {start} cannot grow by {count}"
                    ))
                })?;
                match counter.compare_exchange(start, end, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => return Ok(IdRange { start, end }),
                    Err(now) => start = now,
                }
            }
        }
        .boxed()
    }
    fn hwm(&self) -> BoxFuture<'_, Result<Hwm, ClientError>> {
        futures::future::ready(Ok(self.current())).boxed()
    }
    fn checkpoint(&self) -> BoxFuture<'_, Result<Hwm, ClientError>> {
        futures::future::ready(Ok(self.current())).boxed()
    }
}
