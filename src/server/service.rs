//! The tarpc service: [`IdAlloc`] over the engine.
//!
//! This layer only translates: fork ids arrive as text (so that a malformed one is
//! an `InvalidArgument` naming it, not a frame decode failure that would close the
//! connection) and are parsed here; everything else is the engine's business.

use std::sync::Arc;

use tarpc::context::Context;

use crate::engine::{Engine, FloorAuthority};
use crate::server::access::Role;
use idalloc_client::error::ServiceError;
use idalloc_client::fork_id::ForkId;
use idalloc_client::namespace::{Kind, Namespace};
use idalloc_client::protocol::{
    BootstrapRequest, ForkInfo, ForkPage, Hwm, IdAlloc, IdRange, MergeReport, MergeRequest,
    RepairReport, RepairRequest, Status,
};

/// Largest `list_forks` page served, whatever the client asks: bounds one reply's
/// size (~150 bytes a fork) well under the reply frame limit.
pub const MAX_PAGE: u32 = 1000;

/// The service handed to every connection. Cloned per request (an `Arc` copy).
#[derive(Clone)]
pub struct Service {
    engine: Arc<Engine>,
    peer: Arc<super::access::Peer>,
}

impl Service {
    /// Serve `engine` to an in-process caller (admin).
    pub fn new(engine: Arc<Engine>) -> Self {
        Service {
            engine,
            peer: Arc::new(super::access::Peer {
                identity: "in-process".into(),
                name: "in-process".into(),
                role: super::access::Role::Admin,
            }),
        }
    }

    /// The same service for one connection's peer (its role decides what it may do).
    pub fn with_peer(&self, peer: super::access::Peer) -> Self {
        Service {
            engine: self.engine.clone(),
            peer: Arc::new(peer),
        }
    }
}

impl Service {
    /// The audit line of an admin action: who did what to which namespace, and
    /// how it ended. Target `idalloc::audit`, so a filter can keep or route it.
    fn audit<T>(&self, operation: &'static str, what: &str, r: &Result<T, ServiceError>) {
        let peer = &self.peer.name;
        match r {
            Ok(_) => {
                tracing::info!(target: "idalloc::audit", %peer, operation, on = what, "audit: {operation} of {what} by {peer}: done")
            }
            Err(e) => {
                tracing::warn!(target: "idalloc::audit", %peer, operation, on = what, error = %e, "audit: {operation} of {what} by {peer}: failed")
            }
        }
    }
}

impl Service {
    /// What a writer may see of an error: no object-store or internal detail
    /// (endpoints, bucket layout, the store's own messages), which the log and
    /// an admin's `status` keep. The kind of error, and so whether to retry, is
    /// unchanged.
    fn for_peer<T>(&self, r: Result<T, ServiceError>) -> Result<T, ServiceError> {
        if self.peer.role == super::access::Role::Admin {
            return r;
        }
        r.map_err(|e| match e {
            ServiceError::Unavailable { retry_after_ms, .. } => ServiceError::Unavailable {
                message: WRITER_STORE_ERROR.into(),
                retry_after_ms,
            },
            ServiceError::Internal(_) => ServiceError::Internal(
                "the daemon failed unexpectedly; the detail is in its log".into(),
            ),
            other => other,
        })
    }
}

/// What writers are told instead of an object-store error.
const WRITER_STORE_ERROR: &str =
    "the object store cannot be reached right now; the detail is in the daemon's log and in an admin's idallocctl status";

/// `status` as a writer may see it: store errors replaced by
/// `WRITER_STORE_ERROR`.
pub fn status_for_writer(mut st: Status) -> Status {
    if st.mirror.last_error.is_some() {
        st.mirror.last_error = Some(WRITER_STORE_ERROR.into());
    }
    for ns in &mut st.namespaces {
        if let Some(e) = &mut ns.error {
            *e = "unavailable: this namespace could not be verified against the object store; an admin's idallocctl status has the detail".into();
        }
    }
    st
}

fn shown(fork: Option<&str>) -> &str {
    match fork {
        None | Some("") => "primary",
        Some(f) => f,
    }
}

/// Parse a namespace, turning a malformed id into the client's error.
pub fn namespace(fork: Option<&str>) -> Result<Namespace, ServiceError> {
    Namespace::from_wire(fork).map_err(|e| ServiceError::InvalidArgument(e.to_string()))
}

/// Parse a required fork id; `what` names the argument in the error.
pub fn fork_id(text: &str, what: &str) -> Result<ForkId, ServiceError> {
    ForkId::parse(text).map_err(|e| ServiceError::InvalidArgument(format!("{what}: {e}")))
}

/// The page size actually served for a requested `limit` (0 means "the default").
pub fn page_limit(limit: u32) -> usize {
    if limit == 0 {
        MAX_PAGE as usize
    } else {
        limit.min(MAX_PAGE) as usize
    }
}

/// Count a request by method and outcome and time it (`idalloc_requests_total`,
/// `idalloc_request_seconds`). Without the metrics endpoint, only the call: no
/// clock reads, no labels built.
async fn observed<T>(
    method: &'static str,
    call: impl std::future::Future<Output = Result<T, ServiceError>>,
) -> Result<T, ServiceError> {
    if !super::metrics::enabled() {
        return call.await;
    }
    let started = std::time::Instant::now();
    let r = call.await;
    metrics::counter!("idalloc_requests_total", "method" => method, "outcome" => super::metrics::outcome(&r))
        .increment(1);
    metrics::histogram!("idalloc_request_seconds", "method" => method)
        .record(started.elapsed().as_secs_f64());
    r
}

/// [`observed`] with its future on the heap, for every method but `reserve`:
/// tarpc's per-request future is an enum as large as its largest method's, and
/// it is moved (copied) per request, so the cold methods' large state machines
/// (bootstrap, status, repair, ...) would otherwise be paid by every
/// reservation.
fn cold<'a, T: Send + 'a>(
    method: &'static str,
    call: impl std::future::Future<Output = Result<T, ServiceError>> + Send + 'a,
) -> futures::future::BoxFuture<'a, Result<T, ServiceError>> {
    Box::pin(observed(method, call))
}

impl IdAlloc for Service {
    async fn reserve(
        self,
        _: Context,
        fork: Option<String>,
        kind: Kind,
        count: u64,
    ) -> Result<IdRange, ServiceError> {
        observed("reserve", async move {
            let ns = namespace(fork.as_deref())?;
            let r = self.engine.reserve(ns, kind, count).await;
            self.for_peer(r)
        })
        .await
    }

    async fn hwm(self, _: Context, fork: Option<String>) -> Result<Hwm, ServiceError> {
        cold("hwm", async move {
            let ns = namespace(fork.as_deref())?;
            let r = self.engine.hwm(ns).await;
            self.for_peer(r)
        })
        .await
    }

    async fn bootstrap_fork(
        self,
        _: Context,
        req: BootstrapRequest,
    ) -> Result<ForkInfo, ServiceError> {
        cold("bootstrap_fork", async move {
            let fork = fork_id(&req.fork, "fork")?;
            let parent = match req.parent.as_deref() {
                None | Some("") => None,
                Some(p) => Some(fork_id(p, "parent")?),
            };
            if parent.is_some_and(|p| p == fork) {
                return Err(ServiceError::InvalidArgument(format!(
                    "fork {} cannot be its own parent",
                    req.fork
                )));
            }
            let r = self
                .engine
                .bootstrap_fork_request(
                    fork,
                    parent,
                    req.vid_floor,
                    req.eid_floor,
                    req.request_id.unwrap_or_else(rand::random),
                    if self.peer.role == Role::Admin {
                        FloorAuthority::Any
                    } else {
                        FloorAuthority::Bounded
                    },
                )
                .await
                .inspect_err(|e| {
                    if let ServiceError::PermissionDenied(why) = e {
                        tracing::warn!(peer = %self.peer.name, "permission denied: {why}");
                    }
                });
            self.for_peer(r)
        })
        .await
    }

    async fn list_forks(
        self,
        _: Context,
        after: Option<String>,
        limit: u32,
    ) -> Result<ForkPage, ServiceError> {
        cold("list_forks", async move {
            let after = match after.as_deref() {
                None | Some("") => None,
                Some(a) => Some(fork_id(a, "after")?),
            };
            if after.is_none() {
                // A listing starts by picking up forks other daemons created in the
                // shared root; if the store is down, the forks known here are listed
                // and `status` shows the store's error.
                if let Err(e) = self.engine.discover_forks().await {
                    tracing::warn!(error = %e, "could not list forks in the object store; listing the forks known locally");
                }
            }
            Ok(self.engine.list_forks(after, page_limit(limit)).await)
        })
        .await
    }

    async fn drop_fork(self, _: Context, fork: String) -> Result<ForkInfo, ServiceError> {
        cold("drop_fork", async move {
            self.peer.require_admin("fork drop")?;
            let id = fork_id(&fork, "fork")?;
            let r = self.engine.drop_fork(id).await;
            self.audit("fork drop", &fork, &r);
            r
        })
        .await
    }

    async fn merge_fork(self, _: Context, req: MergeRequest) -> Result<MergeReport, ServiceError> {
        cold("merge_fork", async move {
            self.peer.require_admin("fork merge")?;
            let fork = fork_id(&req.fork, "fork")?;
            let r = self
                .engine
                .merge_fork_request(
                    fork,
                    req.into.clone(),
                    req.request_id.unwrap_or_else(rand::random),
                )
                .await;
            let into = match &req.into {
                idalloc_client::protocol::MergeInto::Parent => "its parent",
                idalloc_client::protocol::MergeInto::Primary => "the primary",
                idalloc_client::protocol::MergeInto::Fork(f) => f.as_str(),
            };
            self.audit("fork merge", &format!("{} into {into}", req.fork), &r);
            r
        })
        .await
    }

    async fn checkpoint(self, _: Context, fork: Option<String>) -> Result<Hwm, ServiceError> {
        cold("checkpoint", async move {
            self.peer.require_admin("checkpoint")?;
            let ns = namespace(fork.as_deref())?;
            let r = self.engine.checkpoint(ns).await;
            self.audit("checkpoint", shown(fork.as_deref()), &r);
            r
        })
        .await
    }

    async fn status(self, _: Context) -> Result<Status, ServiceError> {
        cold("status", async move {
            let st = self.engine.status().await;
            Ok(match self.peer.role {
                super::access::Role::Admin => st,
                super::access::Role::Writer => status_for_writer(st),
            })
        })
        .await
    }

    async fn repair(self, _: Context, req: RepairRequest) -> Result<RepairReport, ServiceError> {
        cold("repair", async move {
            self.peer.require_admin("repair")?;
            let ns = namespace(req.fork.as_deref())?;
            let r = self.engine.repair(ns, req.vid_floor, req.eid_floor).await;
            let what = format!(
                "{} (vid floor {}, eid floor {})",
                shown(req.fork.as_deref()),
                req.vid_floor,
                req.eid_floor
            );
            self.audit("repair", &what, &r);
            r
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_fork_ids_are_invalid_arguments_naming_the_text() {
        match namespace(Some("not-a-fork")) {
            Err(ServiceError::InvalidArgument(m)) => assert!(m.contains("not-a-fork"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(namespace(None).unwrap(), Namespace::Primary);
        assert_eq!(namespace(Some("")).unwrap(), Namespace::Primary);
        match fork_id("x", "parent") {
            Err(ServiceError::InvalidArgument(m)) => assert!(m.starts_with("parent: "), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn writers_see_no_store_error_detail() {
        use idalloc_client::protocol::*;
        let st = Status {
            version: "v".into(),
            uptime_secs: 0,
            mode: WriterMode::MultiWriter,
            fork_ids: ForkIds::Namespace,
            object_store: "s3://bucket/p".into(),
            mirror: MirrorHealth {
                healthy: false,
                last_error: Some("get: Error performing GET http://minio:9000/bucket/p".into()),
                last_error_age_ms: Some(1),
                last_success_age_ms: None,
            },
            namespaces_total: 1,
            namespaces: vec![NamespaceStatus {
                fork: None,
                dropped: false,
                merged_into: None,
                counters: vec![],
                error: Some("object store unavailable: minio:9000 refused".into()),
            }],
            warnings: vec![],
        };
        let shown = format!("{:?}", status_for_writer(st));
        assert!(!shown.contains("minio"), "{shown}");
        assert!(shown.contains("s3://bucket/p"), "{shown}");
    }

    #[test]
    fn pages_are_capped() {
        assert_eq!(page_limit(0), 1000);
        assert_eq!(page_limit(5), 5);
        assert_eq!(page_limit(u32::MAX), 1000);
    }
}
