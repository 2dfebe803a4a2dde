//! Admission: what happens between `accept(2)` and the first request served.
//!
//! A peer is identified first (unix credentials at once, a TLS certificate
//! after its handshake, plain TCP as such), then either served on one of the
//! `max_connections` slots or refused. A refused peer is told why in one reply
//! frame ([`super::connection::refuse_connection`]) on a slot of a separate,
//! small pool: refusals never hold a slot a writer could use, and when that
//! pool is full a refused connection is closed at once rather than queued.
//! Refusals are logged once per peer per [`REFUSAL_LOG_WINDOW`], with the count
//! of those not logged, so that one unprivileged client in a retry loop cannot
//! fill the log (thousands of lines a second otherwise). TLS handshakes have a
//! pool of their own (`max_handshakes`) that never makes the accept loop wait:
//! when it is full, the oldest handshake is closed for the newest connection.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idalloc_client::unix_conn::UnixConn;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::access::{AccessPolicy, Peer, Refused};
use super::connection::{refuse_connection, serve_connection, ConnLimits};
use super::listen::{Conn, Listener};
use super::service::Service;
use super::tls::TlsServer;

/// One log line per refused peer per window; the rest are counted into the next.
pub const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);
/// How long a refused peer has to send its first request before it is closed
/// without a reply.
const REFUSAL_WAIT: Duration = Duration::from_secs(2);
/// Refused peers being told why, at most, at once.
const REFUSALS_AT_ONCE: usize = 64;
/// Peers whose refusals are counted; past it the counts start over.
const REFUSAL_KEYS: usize = 4096;

/// Who may connect and how many: shared by every listener.
pub struct Gate {
    access: Arc<AccessPolicy>,
    tls: Option<Arc<TlsServer>>,
    established: Arc<Semaphore>,
    handshakes: Arc<Mutex<Handshakes>>,
    refusing: Arc<Semaphore>,
    refusals: RefusalLog,
    per_identity: Arc<Mutex<HashMap<String, usize>>>,
    max_per_identity: usize,
}

impl Gate {
    /// The gate of a daemon with these settings.
    pub fn new(settings: &super::Settings) -> Arc<Gate> {
        Arc::new(Gate {
            access: Arc::new(settings.access.clone()),
            tls: settings.tls.clone(),
            established: Arc::new(Semaphore::new(settings.max_connections)),
            handshakes: Arc::new(Mutex::new(Handshakes {
                max: settings.max_handshakes,
                next: 0,
                open: VecDeque::new(),
            })),
            refusing: Arc::new(Semaphore::new(REFUSALS_AT_ONCE)),
            refusals: RefusalLog::default(),
            per_identity: Arc::default(),
            max_per_identity: settings.max_connections_per_identity,
        })
    }
}

/// What an admitted connection is served with.
#[derive(Clone)]
pub struct Serving {
    /// The service (each connection gets its peer's copy).
    pub service: Service,
    /// Per-connection limits.
    pub limits: ConnLimits,
    /// Closes every connection's read half (graceful shutdown).
    pub close_reads: CancellationToken,
    /// Ends every connection at once (shutdown timeout passed).
    pub force_close: CancellationToken,
    /// Every connection's task, so that shutdown can wait for them.
    pub connections: TaskTracker,
}

/// Accept connections until `shutdown`, admitting or refusing each. A served
/// connection's slot is taken *after* accepting and identifying it: the limit is
/// shared by every listener, and a slot held by an idle acceptor would be one no
/// client can use. At the limit, each acceptor holds at most one identified
/// connection waiting for a slot; further clients wait in the kernel backlog.
pub async fn accept_loop(
    listener: Listener,
    gate: Arc<Gate>,
    shutdown: CancellationToken,
    serving: Serving,
) {
    use backon::BackoffBuilder;
    // EMFILE/ENFILE/ENOBUFS and friends: retrying at once would spin. Back off
    // (10 ms doubling to 1 s) and let connections close; a success starts over.
    let policy = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(10))
        .with_max_delay(Duration::from_secs(1))
        .without_max_times();
    let mut pauses = policy.build();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let conn = match accepted {
            Ok(conn) => {
                pauses = policy.build();
                conn
            }
            Err(e) => {
                let pause = pauses.next().unwrap_or(Duration::from_secs(1));
                tracing::warn!(listener = %listener.describe(), error = %e, "accept failed; backing off {pause:?}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                continue;
            }
        };
        match conn {
            Conn::Unix(unix) => match gate.access.unix_peer(&unix) {
                Ok(peer) => {
                    let counted = match gate.count(&peer) {
                        Ok(c) => c,
                        Err(refused) => {
                            gate.refuse(unix, "per_identity", refused, &serving);
                            continue;
                        }
                    };
                    let Some(permit) = gate.slot(&shutdown).await else {
                        return;
                    };
                    // Watched for reading only (`unix_conn`): no wake-up each time
                    // the client reads a reply.
                    match UnixConn::from_tokio(unix) {
                        Ok(unix) => spawn_served(unix, peer, (permit, counted), &serving),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not register an accepted unix connection; closed it")
                        }
                    }
                }
                Err(refused) => gate.refuse(unix, "no_role", refused, &serving),
            },
            Conn::Tcp(tcp) => {
                let peer = Peer {
                    identity: "tcp".into(),
                    name: tcp
                        .peer_addr()
                        .map_or_else(|_| "tcp".to_string(), |a| format!("tcp {a}")),
                    role: gate.access.tcp_role,
                };
                let counted = match gate.count(&peer) {
                    Ok(c) => c,
                    Err(refused) => {
                        gate.refuse(tcp, "per_identity", refused, &serving);
                        continue;
                    }
                };
                let Some(permit) = gate.slot(&shutdown).await else {
                    return;
                };
                spawn_served(tcp, peer, (permit, counted), &serving);
            }
            Conn::Tls(tcp) => {
                let Some(tls) = gate.tls.clone() else {
                    tracing::error!("a TLS connection without [tls]: refused");
                    continue;
                };
                // A handshake holds a slot of its own pool, not one of
                // max_connections, and the accept loop never waits for one:
                // with the pool full, the oldest handshake is closed to make
                // room. A peer that never finishes (or never starts) its
                // handshake thus cannot starve those who have a certificate;
                // to push out a real client's handshake, which takes a few
                // round trips, a flood must open max_handshakes connections
                // within those round trips.
                let handshake = gate.start_handshake();
                let evicted = handshake.evicted.clone();
                // The handshake runs on the connection's own task, so a slow peer
                // never stalls accepting.
                let (serving2, force_close) = (serving.clone(), serving.force_close.clone());
                let (gate, shutdown) = (gate.clone(), shutdown.clone());
                serving.connections.spawn(async move {
                    tokio::select! {
                        _ = force_close.cancelled() => {}
                        _ = evicted.cancelled() => {}
                        _ = async move {
                            match tls.accept(tcp).await {
                                Ok((stream, peer)) => {
                                    // Authenticated: no longer one of the
                                    // handshakes that may be closed for room.
                                    drop(handshake);
                                    let counted = match gate.count(&peer) {
                                        Ok(c) => c,
                                        Err(refused) => {
                                            return gate.refuse(stream, "per_identity", refused, &serving2);
                                        }
                                    };
                                    let Some(permit) = gate.slot(&shutdown).await else {
                                        return;
                                    };
                                    serve(stream, peer, (permit, counted), serving2).await
                                }
                                Err(why) => {
                                    super::metrics::connection_refused("tls");
                                    tracing::warn!(reason = %why, "TLS connection refused")
                                }
                            }
                        } => {}
                    }
                });
            }
        }
    }
}

/// TLS handshakes in progress, oldest first, at most `max`.
struct Handshakes {
    max: usize,
    next: u64,
    open: VecDeque<(u64, CancellationToken)>,
}

/// One handshake's place in [`Handshakes`], until dropped; `evicted` fires when
/// a newer connection took it.
struct HandshakeSlot {
    id: u64,
    evicted: CancellationToken,
    all: Arc<Mutex<Handshakes>>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut h = self.all.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = h.open.iter().position(|(id, _)| *id == self.id) {
            h.open.remove(i);
        }
    }
}

impl Gate {
    /// A handshake slot for a new TLS connection, at once: with all taken, the
    /// oldest handshake is closed for it.
    fn start_handshake(&self) -> HandshakeSlot {
        let mut h = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0u64;
        while h.open.len() >= h.max {
            let Some((_, oldest)) = h.open.pop_front() else {
                break;
            };
            oldest.cancel();
            closed += 1;
        }
        let id = h.next;
        h.next += 1;
        let evicted = CancellationToken::new();
        h.open.push_back((id, evicted.clone()));
        drop(h);
        if closed > 0 {
            super::metrics::connection_refused("handshake_evicted");
            self.refusals.note(
                "tls handshakes",
                "TLS handshake closed to make room for a newer connection",
                "max_handshakes handshakes were in progress (peers that connect and do not finish the handshake); the oldest was closed",
            );
        }
        HandshakeSlot {
            id,
            evicted,
            all: self.handshakes.clone(),
        }
    }

    /// A serving slot, waiting for one to free; `None` at shutdown.
    async fn slot(&self, shutdown: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            _ = shutdown.cancelled() => None,
            p = self.established.clone().acquire_owned() => p.ok(),
        }
    }

    /// Count `peer` against its identity's cap, or refuse it.
    fn count(&self, peer: &Peer) -> Result<Counted, Refused> {
        let mut held = self.per_identity.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(peer.identity.clone()).or_insert(0);
        if *n >= self.max_per_identity {
            let n = *n;
            return Err(Refused {
                key: peer.identity.clone(),
                log: format!(
                    "{} already holds {n} connections, the most max_connections_per_identity allows",
                    peer.name
                ),
                error: idalloc_client::error::ServiceError::Unavailable {
                    message: format!(
                        "too many connections: {} already holds {n}, the most this daemon allows one identity (max_connections_per_identity); close idle ones",
                        peer.identity
                    ),
                    retry_after_ms: 1000,
                },
            });
        }
        *n += 1;
        Ok(Counted {
            identity: peer.identity.clone(),
            held: self.per_identity.clone(),
        })
    }

    /// Log (rate-limited), count, and tell the peer why on a refusal slot; with
    /// none free, close the connection at once.
    fn refuse<S>(&self, io: S, reason: &'static str, refused: Refused, serving: &Serving)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        super::metrics::connection_refused(reason);
        self.refusals.note(&refused.key, what(reason), &refused.log);
        let Ok(permit) = self.refusing.clone().try_acquire_owned() else {
            return;
        };
        let max_frame = serving.limits.max_frame_bytes;
        let force_close = serving.force_close.clone();
        serving.connections.spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = refuse_connection(io, refused.error, max_frame, REFUSAL_WAIT) => {}
                _ = force_close.cancelled() => {}
            }
        });
    }
}

/// The log line's headline for a refusal reason (the metric's label).
fn what(reason: &str) -> &'static str {
    match reason {
        "no_role" => "connection refused: the peer has no role",
        "per_identity" => "connection refused: too many connections of one identity",
        _ => "connection refused",
    }
}

/// One connection counted against its identity's cap, until dropped.
struct Counted {
    identity: String,
    held: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.identity);
            }
        }
    }
}

/// A served connection's slot and its identity's count.
type Slot = (OwnedSemaphorePermit, Counted);

/// Raise the soft open-file limit to what the connection limits need (up to
/// the hard limit), and say so when the hard limit is lower: past it, accept
/// fails with EMFILE and writers time out in the backlog.
pub fn raise_open_file_limit(settings: &super::Settings) {
    // Served connections, handshakes, refusals being answered, metrics scrapes,
    // and the daemon's own files (sled, listeners, store connections).
    let need = (settings.max_connections
        + settings.max_handshakes
        + REFUSALS_AT_ONCE
        + super::metrics::MAX_SCRAPES
        + 256) as libc::rlim_t;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit (RLIMIT_NOFILE)");
        return;
    }
    if lim.rlim_cur >= need {
        return;
    }
    let was = lim.rlim_cur;
    lim.rlim_cur = need.min(lim.rlim_max);
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot raise the open-file limit (RLIMIT_NOFILE)");
        return;
    }
    if lim.rlim_cur < need {
        tracing::warn!(
            soft = lim.rlim_cur,
            needed = need,
            "the open-file limit's hard cap is below what max_connections = {} needs: raise LimitNOFILE= in the unit (or ulimit -Hn), or lower max_connections",
            settings.max_connections
        );
    } else {
        tracing::info!(
            from = was,
            to = lim.rlim_cur,
            "raised the open-file limit (RLIMIT_NOFILE) to fit max_connections"
        );
    }
}

fn spawn_served<S>(io: S, peer: Peer, permit: Slot, serving: &Serving)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (serving2, force_close) = (serving.clone(), serving.force_close.clone());
    serving.connections.spawn(async move {
        tokio::select! {
            _ = serve(io, peer, permit, serving2) => {}
            _ = force_close.cancelled() => {}
        }
    });
}

/// Serve one connection whose peer has a role, counted in the connection gauge.
async fn serve<S>(io: S, peer: Peer, permit: Slot, serving: Serving)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _permit = permit;
    let _counted = super::metrics::ConnectionGuard::open();
    serve_connection(
        io,
        serving.service.with_peer(peer),
        serving.limits,
        serving.close_reads,
    )
    .await
}

/// Refusal log lines, one per peer per window, with the count of those held back.
#[derive(Default)]
struct RefusalLog {
    seen: Mutex<HashMap<String, (Instant, u64)>>,
}

impl RefusalLog {
    fn note(&self, key: &str, what: &str, reason: &str) {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= REFUSAL_KEYS && !seen.contains_key(key) {
            seen.clear();
        }
        match seen.get_mut(key) {
            Some((since, held)) if now.duration_since(*since) < REFUSAL_LOG_WINDOW => *held += 1,
            entry => {
                let held = entry.map_or(0, |(_, held)| *held);
                seen.insert(key.to_string(), (now, 0));
                if held == 0 {
                    tracing::warn!(%reason, "{what}");
                } else {
                    tracing::warn!(%reason, "{what} ({held} more refusals of {key} not logged in the last {REFUSAL_LOG_WINDOW:?})");
                }
            }
        }
    }
}
