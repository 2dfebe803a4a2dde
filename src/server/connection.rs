//! Serving one accepted connection: tarpc's wire protocol over [`ServerTransport`],
//! with the per-connection in-flight limit, until the client leaves, sends a bad
//! frame, or shutdown closes the read half and the last reply is written.
//!
//! The loop is ours rather than tarpc's `BaseChannel`: each request goes straight
//! to the service's generated dispatch (`Serve::serve`), and every reply that is
//! ready when one is written goes out in the same write. `BaseChannel` keeps, per
//! request, a deadline timer, an abort handle, an in-flight map entry and a span,
//! and flushes reply by reply; on the reservation path that was a fair share of
//! the daemon's CPU (docs/performance.md). What it gave that matters is kept: the
//! in-flight limit (a throttled request gets tarpc's own `WouldBlock` reply, the
//! connection stays), a request whose deadline has already passed is not started
//! (its caller has given up). Not kept: aborting a request when its deadline
//! passes or when the client cancels it. Such a request runs to its end and its
//! reply is dropped by the client; every engine call is bounded (store time-outs),
//! and a reservation nobody receives is a gap, never a duplicate.

use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use tarpc::server::Serve;
use tarpc::{ClientMessage, Response, ServerError};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use std::time::Duration;

use super::transport::ServerTransport;
use idalloc_client::error::ServiceError;
use idalloc_client::namespace::Kind;
use idalloc_client::protocol::{
    BootstrapRequest, ForkInfo, ForkPage, Hwm, IdAlloc, IdAllocRequest, IdAllocResponse, IdRange,
    MergeReport, MergeRequest, RepairReport, RepairRequest, Status,
};
use tarpc::context::Context;

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Largest request frame, in bytes.
    pub max_frame_bytes: usize,
    /// Most requests in flight; more get an error reply (not a closed connection).
    pub max_in_flight: usize,
    /// Close the connection after this long without a request (none in flight).
    pub idle_timeout: Option<Duration>,
}

/// Serve `svc` on `io` until the connection ends. All of this connection's requests
/// run inside this one future, so awaiting it means "every reply is written".
pub async fn serve_connection<S, Svc>(
    io: S,
    svc: Svc,
    limits: ConnLimits,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
    Svc: IdAlloc + Clone,
{
    let mut transport: ServerTransport<S, IdAllocRequest, IdAllocResponse> =
        ServerTransport::new(io, limits.max_frame_bytes, shutdown);
    let serve = svc.serve();
    let mut in_flight = FuturesUnordered::new();
    let mut reading = true;
    // An idle connection holds a slot of max_connections and a descriptor:
    // closed after `idle_timeout` with nothing read and nothing in flight.
    let idle_for = limits
        .idle_timeout
        .unwrap_or(Duration::from_secs(86400 * 365));
    let idle = tokio::time::sleep(idle_for);
    tokio::pin!(idle);
    while reading || !in_flight.is_empty() {
        tokio::select! {
            biased;
            _ = &mut idle, if limits.idle_timeout.is_some() && in_flight.is_empty() => {
                tracing::debug!(?idle_for, "closing an idle connection");
                break;
            }
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                idle.as_mut().reset(tokio::time::Instant::now() + idle_for);
                if transport.feed(reply).await.is_err() {
                    return;
                }
                // Every other reply ready by now shares this write.
                while let Some(Some(reply)) = in_flight.next().now_or_never() {
                    if transport.feed(reply).await.is_err() {
                        return;
                    }
                }
                if transport.flush().await.is_err() {
                    return;
                }
            }
            msg = transport.next(), if reading => match msg {
                None => reading = false,
                // A frame too long or not a request: this connection ends, with
                // the requests it had in flight (each a gap at most).
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "closing a connection that sent a bad frame");
                    return;
                }
                Some(Ok(ClientMessage::Request(req))) => {
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_for);
                    if req.context.deadline <= std::time::Instant::now() {
                        continue;
                    }
                    if in_flight.len() >= limits.max_in_flight {
                        let throttled = Response {
                            request_id: req.id,
                            message: Err(ServerError::new(
                                std::io::ErrorKind::WouldBlock,
                                "server throttled the request.".into(),
                            )),
                        };
                        if transport.send(throttled).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let serve = serve.clone();
                    in_flight.push(async move {
                        Response {
                            request_id: req.id,
                            message: serve.serve(req.context, req.message).await,
                        }
                    });
                }
                // Cancel (and any message kind a later tarpc adds): nothing to do.
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = transport.close().await;
}

/// Tell a refused peer why, in the one frame a client can show, and close.
///
/// The peer's first request (read within `wait`) is answered with `error` as the
/// typed error of whatever it called, so the client reports `permission denied:
/// ...` at once instead of a closed connection it would redial. Then the write
/// half is shut and what the peer still sends is read and dropped for a moment,
/// so that the close is a FIN after the reply rather than a reset that could
/// destroy the reply before the client reads it.
pub async fn refuse_connection<S>(
    io: S,
    error: ServiceError,
    max_frame_bytes: usize,
    wait: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut transport: ServerTransport<S, IdAllocRequest, IdAllocResponse> =
        ServerTransport::new(io, max_frame_bytes, CancellationToken::new());
    let first = tokio::time::timeout(wait, async {
        loop {
            match transport.next().await {
                Some(Ok(ClientMessage::Request(req))) => return Some(req),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await;
    if let Ok(Some(req)) = first {
        let reply = Response {
            request_id: req.id,
            message: Refusal(error).serve().serve(req.context, req.message).await,
        };
        if transport.send(reply).await.is_err() {
            return;
        }
    }
    let _ = transport.close().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(Ok(_)) = transport.next().await {}
    })
    .await;
}

/// The service a refused peer gets: every call answers the refusal.
#[derive(Clone)]
struct Refusal(ServiceError);

impl IdAlloc for Refusal {
    async fn reserve(
        self,
        _: Context,
        _: Option<String>,
        _: Kind,
        _: u64,
    ) -> Result<IdRange, ServiceError> {
        Err(self.0)
    }
    async fn hwm(self, _: Context, _: Option<String>) -> Result<Hwm, ServiceError> {
        Err(self.0)
    }
    async fn bootstrap_fork(
        self,
        _: Context,
        _: BootstrapRequest,
    ) -> Result<ForkInfo, ServiceError> {
        Err(self.0)
    }
    async fn list_forks(
        self,
        _: Context,
        _: Option<String>,
        _: u32,
    ) -> Result<ForkPage, ServiceError> {
        Err(self.0)
    }
    async fn drop_fork(self, _: Context, _: String) -> Result<ForkInfo, ServiceError> {
        Err(self.0)
    }
    async fn checkpoint(self, _: Context, _: Option<String>) -> Result<Hwm, ServiceError> {
        Err(self.0)
    }
    async fn status(self, _: Context) -> Result<Status, ServiceError> {
        Err(self.0)
    }
    async fn repair(self, _: Context, _: RepairRequest) -> Result<RepairReport, ServiceError> {
        Err(self.0)
    }
    async fn merge_fork(self, _: Context, _: MergeRequest) -> Result<MergeReport, ServiceError> {
        Err(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idalloc_client::protocol::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use tarpc::tokio_serde::formats::Bincode;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};

    /// A stand-in for the engine: hands out consecutive ranges from a counter, and a
    /// large `status` to exercise reply frames above the request limit.
    #[derive(Clone, Default)]
    struct Fake {
        next: Arc<AtomicU64>,
    }

    impl IdAlloc for Fake {
        async fn reserve(
            self,
            _: Context,
            _: Option<String>,
            _: Kind,
            count: u64,
        ) -> Result<IdRange, ServiceError> {
            if count == 0 {
                return Err(ServiceError::InvalidArgument(
                    "count must be at least 1".into(),
                ));
            }
            let start = self.next.fetch_add(count, Ordering::SeqCst);
            Ok(IdRange {
                start,
                end: start + count,
            })
        }
        async fn hwm(self, _: Context, fork: Option<String>) -> Result<Hwm, ServiceError> {
            // Slow on purpose: lets a test hold requests in flight across shutdown.
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(Hwm {
                fork,
                next_vid: self.next.load(Ordering::SeqCst),
                next_eid: 0,
                root_wide: true,
            })
        }
        async fn bootstrap_fork(
            self,
            _: Context,
            _: BootstrapRequest,
        ) -> Result<ForkInfo, ServiceError> {
            Err(ServiceError::Internal("not in the fake".into()))
        }
        async fn list_forks(
            self,
            _: Context,
            _: Option<String>,
            _: u32,
        ) -> Result<ForkPage, ServiceError> {
            Ok(ForkPage {
                forks: vec![],
                next_after: None,
            })
        }
        async fn drop_fork(self, _: Context, f: String) -> Result<ForkInfo, ServiceError> {
            Err(ServiceError::UnknownFork(f))
        }
        async fn checkpoint(self, _: Context, _: Option<String>) -> Result<Hwm, ServiceError> {
            Err(ServiceError::ShuttingDown)
        }
        async fn status(self, _: Context) -> Result<Status, ServiceError> {
            Ok(Status {
                version: "x".repeat(200_000),
                uptime_secs: 0,
                mode: WriterMode::SingleWriter,
                fork_ids: idalloc_client::protocol::ForkIds::Namespace,
                object_store: "memory://".into(),
                mirror: MirrorHealth {
                    healthy: true,
                    last_error: None,
                    last_error_age_ms: None,
                    last_success_age_ms: None,
                },
                namespaces_total: 1,
                namespaces: vec![],
                warnings: vec![],
            })
        }
        async fn repair(
            self,
            _: Context,
            _: idalloc_client::protocol::RepairRequest,
        ) -> Result<idalloc_client::protocol::RepairReport, ServiceError> {
            Err(ServiceError::Internal("not in the fake".into()))
        }
        async fn merge_fork(
            self,
            _: Context,
            _: idalloc_client::protocol::MergeRequest,
        ) -> Result<idalloc_client::protocol::MergeReport, ServiceError> {
            Err(ServiceError::Internal("not in the fake".into()))
        }
    }

    const LIMITS: ConnLimits = ConnLimits {
        max_frame_bytes: 1024,
        max_in_flight: 4,
        idle_timeout: None,
    };

    fn start(dir: &std::path::Path, shutdown: CancellationToken) -> std::path::PathBuf {
        let path = dir.join("t.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let fake = Fake::default();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(serve_connection(s, fake.clone(), LIMITS, shutdown.clone()));
            }
        });
        path
    }

    async fn client(path: &std::path::Path) -> IdAllocClient {
        let t = tarpc::serde_transport::unix::connect(path, Bincode::default)
            .await
            .unwrap();
        IdAllocClient::new(tarpc::client::Config::default(), t).spawn()
    }

    /// Write `bytes`, then expect the server to close the connection (EOF).
    async fn assert_closed_after(path: &std::path::Path, bytes: &[u8]) {
        let mut raw = UnixStream::connect(path).await.unwrap();
        raw.write_all(bytes).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
            .await
            .expect("the server must close a connection that sent a bad frame")
            .unwrap_or(0);
        assert_eq!(n, 0, "no reply to a bad frame, only EOF");
    }

    #[tokio::test]
    async fn bad_frames_close_only_their_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = start(dir.path(), CancellationToken::new());
        let good = client(&path).await;
        let r = good
            .reserve(tarpc::context::current(), None, Kind::Vid, 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.len(), 10);

        // A length prefix far above max_frame_bytes.
        assert_closed_after(&path, &(u32::MAX).to_be_bytes()).await;
        // A frame of the right size whose body is not a bincode ClientMessage.
        let mut garbage = 16u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(&[0xff; 16]);
        assert_closed_after(&path, &garbage).await;

        // The first client carries on, and a reply bigger than the request limit
        // still goes out.
        let r2 = good
            .reserve(tarpc::context::current(), None, Kind::Vid, 5)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r2.start, r.end);
        let s = good
            .status(tarpc::context::current())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(s.version.len(), 200_000);
        let e = good
            .reserve(tarpc::context::current(), None, Kind::Vid, 0)
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, ServiceError::InvalidArgument(_)));
    }

    /// Past `max_in_flight`, a request gets tarpc's throttle reply at once and
    /// the connection keeps serving.
    #[tokio::test]
    async fn requests_past_the_in_flight_limit_are_throttled_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = start(dir.path(), CancellationToken::new());
        let c = client(&path).await;
        let calls: Vec<_> = (0..LIMITS.max_in_flight + 3)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.hwm(tarpc::context::current(), None).await })
            })
            .collect();
        let (mut ok, mut throttled) = (0, 0);
        for call in calls {
            match call.await.unwrap() {
                Ok(Ok(_)) => ok += 1,
                // tarpc's own throttle reply (its kind travels as `Other`).
                Err(tarpc::client::RpcError::Server(e)) if e.detail.contains("throttled") => {
                    throttled += 1
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((ok, throttled), (LIMITS.max_in_flight, 3));
        let r = c
            .reserve(tarpc::context::current(), None, Kind::Vid, 2)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.len(), 2);
    }

    #[tokio::test]
    async fn shutdown_answers_in_flight_requests_then_closes() {
        let dir = tempfile::tempdir().unwrap();
        let shutdown = CancellationToken::new();
        let path = start(dir.path(), shutdown.clone());
        let c = client(&path).await;
        // Prove the connection is established and served before shutting down.
        c.reserve(tarpc::context::current(), None, Kind::Vid, 1)
            .await
            .unwrap()
            .unwrap();
        let slow = {
            let c = c.clone();
            tokio::spawn(async move { c.hwm(tarpc::context::current(), None).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        let hwm = slow
            .await
            .unwrap()
            .expect("the in-flight request is answered")
            .unwrap();
        assert_eq!(hwm.next_vid, 1);
        // Afterwards the connection is closed: new calls fail rather than hang.
        let after = c
            .reserve(tarpc::context::current(), None, Kind::Vid, 1)
            .await;
        assert!(after.is_err(), "{after:?}");
    }
}
