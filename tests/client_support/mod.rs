//! An in-process stand-in for `idallocd`: the real tarpc service trait, the real
//! framing (length-delimited bincode 1.x over a unix socket), and an in-memory
//! counter per namespace and kind. Its state outlives a "kill", as the real
//! daemon's durable state does, so a restart resumes above every id granted.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use idalloc_client::protocol::{
    BootstrapRequest, ForkInfo, ForkPage, Hwm, IdAlloc, IdRange, MirrorHealth, Status, WriterMode,
};
use idalloc_client::{ForkId, Kind, Namespace, ServiceError};
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::Bincode;
use tokio_util::codec::LengthDelimitedCodec;

/// What survives a restart of the fake daemon, plus knobs for tests.
#[derive(Default)]
pub struct State {
    counters: Mutex<HashMap<Option<u128>, [u64; 2]>>,
    forks: Mutex<BTreeMap<u128, ForkInfo>>,
    /// Milliseconds each reservation sleeps before answering.
    pub delay_ms: AtomicU64,
    /// The next this-many reservations answer `Unavailable`.
    pub unavailable: AtomicU64,
    /// Every range granted, to check disjointness.
    pub granted: Mutex<Vec<(Option<u128>, Kind, IdRange)>>,
}

#[derive(Clone)]
struct Service(Arc<State>);

fn namespace(fork: Option<&str>) -> Result<Option<u128>, ServiceError> {
    match Namespace::from_wire(fork).map_err(|e| ServiceError::InvalidArgument(e.to_string()))? {
        Namespace::Primary => Ok(None),
        Namespace::Fork(f) => Ok(Some(f.value())),
    }
}

impl Service {
    fn check_fork(&self, ns: Option<u128>, text: Option<&str>) -> Result<(), ServiceError> {
        if let Some(v) = ns {
            match self.0.forks.lock().unwrap().get(&v) {
                None => return Err(ServiceError::UnknownFork(text.unwrap_or("").to_string())),
                Some(f) if f.dropped => return Err(ServiceError::DroppedFork(f.fork.clone())),
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn hwm_of(&self, ns: Option<u128>, fork: Option<String>) -> Hwm {
        let c = self
            .0
            .counters
            .lock()
            .unwrap()
            .get(&ns)
            .copied()
            .unwrap_or([0, 0]);
        Hwm {
            fork,
            next_vid: c[0],
            next_eid: c[1],
            root_wide: true,
        }
    }
}

impl IdAlloc for Service {
    async fn reserve(
        self,
        _: tarpc::context::Context,
        fork: Option<String>,
        kind: Kind,
        count: u64,
    ) -> Result<IdRange, ServiceError> {
        if count == 0 || count > 1_000_000 {
            return Err(ServiceError::InvalidArgument(format!(
                "count {count} is outside 1..=1000000"
            )));
        }
        let ns = namespace(fork.as_deref())?;
        self.check_fork(ns, fork.as_deref())?;
        let delay = self.0.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self
            .0
            .unavailable
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(ServiceError::unavailable(
                "object store unreachable (test)",
                5,
            ));
        }
        let mut counters = self.0.counters.lock().unwrap();
        let c = counters.entry(ns).or_insert([0, 0]);
        let start = c[kind.index()];
        let end = start
            .checked_add(count)
            .ok_or_else(|| ServiceError::Exhausted(format!("{kind} at {start}")))?;
        c[kind.index()] = end;
        let range = IdRange { start, end };
        self.0.granted.lock().unwrap().push((ns, kind, range));
        Ok(range)
    }

    async fn hwm(
        self,
        _: tarpc::context::Context,
        fork: Option<String>,
    ) -> Result<Hwm, ServiceError> {
        let ns = namespace(fork.as_deref())?;
        self.check_fork(ns, fork.as_deref())?;
        Ok(self.hwm_of(ns, fork))
    }

    async fn bootstrap_fork(
        self,
        _: tarpc::context::Context,
        req: BootstrapRequest,
    ) -> Result<ForkInfo, ServiceError> {
        let id =
            ForkId::parse(&req.fork).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let parent = namespace(req.parent.as_deref())?;
        self.check_fork(parent, req.parent.as_deref())?;
        let mut forks = self.0.forks.lock().unwrap();
        if let Some(existing) = forks.get(&id.value()) {
            let mut info = existing.clone();
            info.created = false;
            return Ok(info);
        }
        let p = self.hwm_of(parent, None);
        let (v, e) = (p.next_vid.max(req.vid_floor), p.next_eid.max(req.eid_floor));
        self.0
            .counters
            .lock()
            .unwrap()
            .insert(Some(id.value()), [v, e]);
        let info = ForkInfo {
            fork: req.fork.clone(),
            parent: req.parent.clone(),
            next_vid: v,
            next_eid: e,
            floor_vid: v,
            floor_eid: e,
            created: true,
            dropped: false,
            merged_into: None,
            error: None,
        };
        let mut stored = info.clone();
        stored.created = false;
        forks.insert(id.value(), stored);
        Ok(info)
    }

    async fn list_forks(
        self,
        _: tarpc::context::Context,
        after: Option<String>,
        limit: u32,
    ) -> Result<ForkPage, ServiceError> {
        let from = match namespace(after.as_deref())? {
            None => 0,
            Some(v) => v
                .checked_add(1)
                .ok_or_else(|| ServiceError::InvalidArgument("after max".into()))?,
        };
        let forks = self.0.forks.lock().unwrap();
        let page: Vec<ForkInfo> = forks
            .range(from..)
            .take(limit as usize)
            .map(|(_, f)| f.clone())
            .collect();
        let next_after = (page.len() == limit as usize
            && forks.range(from..).nth(limit as usize).is_some())
        .then(|| page.last().map(|f| f.fork.clone()))
        .flatten();
        Ok(ForkPage {
            forks: page,
            next_after,
        })
    }

    async fn drop_fork(
        self,
        _: tarpc::context::Context,
        fork: String,
    ) -> Result<ForkInfo, ServiceError> {
        let ns = namespace(Some(&fork))?;
        self.check_fork(ns, Some(&fork))?;
        let mut forks = self.0.forks.lock().unwrap();
        let f = forks.get_mut(&ns.unwrap()).unwrap();
        f.dropped = true;
        Ok(f.clone())
    }

    async fn checkpoint(
        self,
        _: tarpc::context::Context,
        fork: Option<String>,
    ) -> Result<Hwm, ServiceError> {
        let ns = namespace(fork.as_deref())?;
        self.check_fork(ns, fork.as_deref())?;
        Ok(self.hwm_of(ns, fork))
    }

    async fn status(self, _: tarpc::context::Context) -> Result<Status, ServiceError> {
        Ok(Status {
            version: "fake".into(),
            uptime_secs: 0,
            mode: WriterMode::SingleWriter,
            fork_ids: idalloc_client::protocol::ForkIds::Namespace,
            object_store: "memory://".into(),
            mirror: MirrorHealth {
                healthy: true,
                last_error: None,
                last_error_age_ms: None,
                last_success_age_ms: Some(0),
            },
            namespaces_total: 1 + self.0.forks.lock().unwrap().len() as u64,
            namespaces: Vec::new(),
            warnings: Vec::new(),
        })
    }

    async fn repair(
        self,
        _: tarpc::context::Context,
        _: idalloc_client::protocol::RepairRequest,
    ) -> Result<idalloc_client::protocol::RepairReport, ServiceError> {
        Err(ServiceError::Internal(
            "the fake daemon does not repair".into(),
        ))
    }
    async fn merge_fork(
        self,
        _: tarpc::context::Context,
        _: idalloc_client::protocol::MergeRequest,
    ) -> Result<idalloc_client::protocol::MergeReport, ServiceError> {
        Err(ServiceError::Internal(
            "the fake daemon does not merge".into(),
        ))
    }
}

/// A running fake daemon on a unix socket.
pub struct FakeDaemon {
    pub path: PathBuf,
    pub state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeDaemon {
    /// Serve `state` on `path` (a stale socket file there is replaced).
    pub async fn start(path: &Path, state: Arc<State>) -> FakeDaemon {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let service = Service(state.clone());
        let server = tokio::spawn(async move {
            // Connections live in this task's JoinSet: aborting the task drops the set,
            // which aborts every connection — the effect of `kill -9` on the sockets.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let framed = LengthDelimitedCodec::builder()
                    .max_frame_length(1 << 20)
                    .new_framed(stream);
                let transport = tarpc::serde_transport::new(framed, Bincode::default());
                let service = service.clone();
                connections.spawn(async move {
                    BaseChannel::with_defaults(transport)
                        .execute(service.serve())
                        .for_each_concurrent(None, |request| request)
                        .await;
                });
            }
        });
        FakeDaemon {
            path: path.to_owned(),
            state,
            server,
        }
    }

    /// Stop abruptly: the listener and every connection close at once.
    pub async fn kill(self) -> Arc<State> {
        self.server.abort();
        let _ = self.server.await;
        let _ = std::fs::remove_file(&self.path);
        self.state
    }

    /// The endpoint text for this daemon.
    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.path.display())
    }
}
