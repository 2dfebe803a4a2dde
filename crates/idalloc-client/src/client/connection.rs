//! [`Client`]: one connection to `idallocd` (tarpc's protocol and generated client,
//! over our own dispatch, [`Wire`]), rebuilt when it breaks.
//!
//! A connection does not reconnect by itself: when the daemon restarts, it ends and
//! every later call on it fails with `RpcError::Shutdown`. The client keeps the
//! current channel with a generation number; the first caller that sees it broken
//! drops it, and one caller at a time (behind an async mutex) dials again with capped
//! exponential backoff until the call's deadline.
//!
//! Invariant protected: *retrying never hands out an id twice.* A reservation whose
//! reply was lost is not re-sent as "the same" request: the retry is a new
//! reservation, and the lost one is a gap. Every method here is safe to repeat in
//! that sense (`bootstrap_fork` is idempotent by contract, `hwm`, `status`,
//! `list_forks`, `checkpoint` only read or lower to what was granted); `drop_fork`
//! is repeated too, and a repeat that finds the fork already dropped after an
//! ambiguous failure looks the fork up instead of reporting a false error.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tarpc::client::RpcError;
use tarpc::context;
use tokio::time::Instant;

use super::error::ClientError;
use super::wire::Wire;
use crate::endpoint::Endpoint;
use crate::error::ServiceError;
use crate::fork_id::ForkId;
use crate::namespace::{Kind, Namespace};
use crate::protocol::{
    BootstrapRequest, ForkInfo, Hwm, IdAllocClient, IdRange, MergeInto, MergeReport, MergeRequest,
    Status,
};
use crate::tls::{tls_failure, TlsFiles};
use crate::unix_conn::UnixConn;

/// What [`Client::connect`] accepts: an [`Endpoint`] or its text (`unix:PATH`,
/// `tcp:HOST:PORT`).
pub trait IntoEndpoint {
    /// Parse or pass through.
    fn into_endpoint(self) -> Result<Endpoint, ClientError>;
}

impl IntoEndpoint for Endpoint {
    fn into_endpoint(self) -> Result<Endpoint, ClientError> {
        Ok(self)
    }
}

impl IntoEndpoint for &Endpoint {
    fn into_endpoint(self) -> Result<Endpoint, ClientError> {
        Ok(self.clone())
    }
}

impl IntoEndpoint for &str {
    fn into_endpoint(self) -> Result<Endpoint, ClientError> {
        Ok(self.parse()?)
    }
}

impl IntoEndpoint for String {
    fn into_endpoint(self) -> Result<Endpoint, ClientError> {
        self.as_str().into_endpoint()
    }
}

impl IntoEndpoint for &String {
    fn into_endpoint(self) -> Result<Endpoint, ClientError> {
        self.as_str().into_endpoint()
    }
}

/// How a [`Client`] talks to the daemon. `Default` gives the values documented on
/// each field; the `with_*` setters change one each:
///
/// ```
/// # use idalloc_client::ClientConfig;
/// # use std::time::Duration;
/// let config = ClientConfig::default()
///     .with_deadline(Duration::from_secs(2));
/// assert_eq!(config.deadline, Duration::from_secs(2));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Time allowed for one call, retries and reconnects included. Default 10 s.
    pub deadline: Duration,
    /// First pause before dialing again after a failed connect. Default 10 ms.
    pub backoff_initial: Duration,
    /// The longest pause between connect attempts before jitter (the backoff doubles up
    /// to it, and each pause is lengthened by up to itself at random).
    /// Default 1 s.
    pub backoff_max: Duration,
    /// Largest frame accepted from the daemon. Replies (a page of forks, a status)
    /// can be much larger than requests. Default 16 MiB.
    pub max_frame_length: usize,
    /// Page size used by [`Client::list_forks`]. Default 1000.
    pub list_page_size: u32,
    /// The CA and client certificate for `tls:HOST:PORT` endpoints (required for
    /// them, unused otherwise). Default: none; [`TlsFiles::from_env`] reads
    /// `IDALLOC_TLS_CA`, `IDALLOC_TLS_CERT` and `IDALLOC_TLS_KEY`.
    pub tls: Option<TlsFiles>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            deadline: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_secs(1),
            max_frame_length: 16 * 1024 * 1024,
            list_page_size: 1000,
            tls: None,
        }
    }
}

impl ClientConfig {
    /// This configuration with [`deadline`](Self::deadline) set.
    #[must_use]
    pub fn with_deadline(self, deadline: Duration) -> Self {
        ClientConfig { deadline, ..self }
    }

    /// This configuration with [`backoff_initial`](Self::backoff_initial) set.
    #[must_use]
    pub fn with_backoff_initial(self, backoff_initial: Duration) -> Self {
        ClientConfig {
            backoff_initial,
            ..self
        }
    }

    /// This configuration with [`backoff_max`](Self::backoff_max) set.
    #[must_use]
    pub fn with_backoff_max(self, backoff_max: Duration) -> Self {
        ClientConfig {
            backoff_max,
            ..self
        }
    }

    /// This configuration with [`max_frame_length`](Self::max_frame_length) set.
    #[must_use]
    pub fn with_max_frame_length(self, max_frame_length: usize) -> Self {
        ClientConfig {
            max_frame_length,
            ..self
        }
    }

    /// This configuration with [`list_page_size`](Self::list_page_size) set.
    #[must_use]
    pub fn with_list_page_size(self, list_page_size: u32) -> Self {
        ClientConfig {
            list_page_size,
            ..self
        }
    }

    /// The pauses between attempts: from `backoff_initial`, doubling up to
    /// `backoff_max`, each lengthened by a random part of itself so that the many
    /// clients of a restarted daemon do not all dial in the same instant.
    fn backoff(&self) -> backon::ExponentialBackoff {
        use backon::BackoffBuilder;
        backon::ExponentialBuilder::default()
            .with_min_delay(self.backoff_initial)
            .with_max_delay(self.backoff_max)
            .without_max_times()
            .with_jitter()
            .build()
    }

    /// This configuration with [`tls`](Self::tls) set.
    #[must_use]
    pub fn with_tls(self, tls: TlsFiles) -> Self {
        ClientConfig {
            tls: Some(tls),
            ..self
        }
    }
}

/// A connection to `idallocd`, shared by clones (it is an `Arc` inside).
///
/// Calls are pipelined over one connection; a call that finds the connection broken
/// reconnects (with backoff) and retries within its deadline.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    endpoint_text: String,
    config: ClientConfig,
    /// For `tls:` endpoints: the rustls configuration, built once at connect.
    tls: Option<crate::tls::Connector>,
    /// The live channel and its generation. A std mutex: held only to clone or
    /// replace the handle, never across an await.
    current: Mutex<Option<(u64, Conn)>>,
    /// Serialises reconnects, so a broken connection is redialed once, not by every
    /// waiting caller. An async mutex because it is held across the dial.
    dial: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    reconnects: AtomicU64,
}

/// One connection's generated client, over our own dispatch ([`Wire`]).
type Conn = IdAllocClient<Wire>;

/// How one attempt ended, for the retry loop.
enum Attempt<T> {
    Done(T),
    /// Worth retrying after a pause (`Unavailable`, `ShuttingDown`, an RPC abort).
    RetryAfter(Duration, String),
    /// The connection is broken: drop it and redial.
    Broken(String),
}

impl Client {
    /// Connect to the daemon at `endpoint` (`unix:PATH` / `tcp:HOST:PORT`, or an
    /// [`Endpoint`]) with the default [`ClientConfig`]. Fails at once if the daemon
    /// cannot be reached, so a tool can say so; later breaks are redialed.
    pub async fn connect(endpoint: impl IntoEndpoint) -> Result<Client, ClientError> {
        Client::connect_with(endpoint, ClientConfig::default()).await
    }

    /// [`Client::connect`] with an explicit configuration.
    pub async fn connect_with(
        endpoint: impl IntoEndpoint,
        config: ClientConfig,
    ) -> Result<Client, ClientError> {
        let endpoint = endpoint.into_endpoint()?;
        let endpoint_text = endpoint.to_string();
        let tls = match (&endpoint, &config.tls) {
            (Endpoint::Tls(_), Some(files)) => {
                Some(files.connector().map_err(|e| ClientError::Tls {
                    endpoint: endpoint_text.clone(),
                    reason: e.0,
                })?)
            }
            (Endpoint::Tls(_), None) => {
                return Err(ClientError::Tls {
                    endpoint: endpoint_text,
                    reason: "a tls: endpoint needs the CA that signed the daemon's certificate (--tls-ca or IDALLOC_TLS_CA; ClientConfig::with_tls in the library)".into(),
                })
            }
            _ => None,
        };
        let client = Client {
            inner: Arc::new(Inner {
                endpoint_text,
                endpoint,
                config,
                tls,
                current: Mutex::new(None),
                dial: tokio::sync::Mutex::new(()),
                generation: AtomicU64::new(0),
                reconnects: AtomicU64::new(0),
            }),
        };
        let deadline = Instant::now() + client.inner.config.deadline;
        let conn = tokio::time::timeout_at(deadline, dial(&client.inner))
            .await
            .map_err(|_| client.deadline_error(None))?
            .map_err(|source| client.connect_error(source))?;
        *client.inner.current.lock().unwrap() = Some((0, conn));
        Ok(client)
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// The configuration in use.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// How many times the connection was rebuilt after breaking.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Reserve `count` consecutive ids of `kind` in a namespace:
    /// [`Namespace::Primary`], or a fork (a [`ForkId`] converts; so does an
    /// `Option<ForkId>`, `None` being the primary). The fork is named on the wire
    /// in the text form its id was written in. The range is durable on the daemon
    /// before it is returned.
    pub async fn reserve(
        &self,
        namespace: impl Into<Namespace>,
        kind: Kind,
        count: u64,
    ) -> Result<IdRange, ClientError> {
        let fork = wire_fork(namespace.into());
        self.call(|c, ctx| {
            let fork = fork.clone();
            async move { c.reserve(ctx, fork, kind, count).await }
        })
        .await
    }

    /// The next ids the daemon would grant in a namespace (as for [`Client::reserve`]).
    pub async fn hwm(&self, namespace: impl Into<Namespace>) -> Result<Hwm, ClientError> {
        let fork = wire_fork(namespace.into());
        self.call(|c, ctx| {
            let fork = fork.clone();
            async move { c.hwm(ctx, fork).await }
        })
        .await
    }

    /// Create a fork above its parent's high-water mark, or return the existing one
    /// unchanged (idempotent, so safe to retry).
    ///
    /// Retries of this call carry one `request_id` (chosen here if the request has
    /// none), so the daemon tells it `created: true` even when the reply to the
    /// attempt that created the fork was lost.
    pub async fn bootstrap_fork(&self, mut req: BootstrapRequest) -> Result<ForkInfo, ClientError> {
        req.request_id.get_or_insert_with(rand::random::<u128>);
        self.call(|c, ctx| {
            let req = req.clone();
            async move { c.bootstrap_fork(ctx, req).await }
        })
        .await
    }

    /// Every fork the daemon knows, all pages, in fork id order.
    pub async fn list_forks(&self) -> Result<Vec<ForkInfo>, ClientError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .list_forks_page(after.clone(), self.inner.config.list_page_size)
                .await?;
            all.extend(page.forks);
            match page.next_after {
                // A daemon that hands back the cursor it was given would loop forever.
                Some(next) if Some(&next) != after.as_ref() => after = Some(next),
                _ => return Ok(all),
            }
        }
    }

    /// One page of forks after `after` (exclusive), at most `limit` of them.
    pub async fn list_forks_page(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> Result<crate::protocol::ForkPage, ClientError> {
        self.call(|c, ctx| {
            let after = after.clone();
            async move { c.list_forks(ctx, after, limit).await }
        })
        .await
    }

    /// Drop a fork (a tombstone: its ids are retired).
    ///
    /// If a first attempt was lost in transit and the retry finds the fork already
    /// dropped, the drop did happen (ours): the fork's record is looked up and
    /// returned rather than reporting `DroppedFork`.
    pub async fn drop_fork(&self, fork: ForkId) -> Result<ForkInfo, ClientError> {
        let ambiguous = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fork_owned = fork.text();
        let attempts = Arc::new(AtomicU64::new(0));
        let result = {
            let attempts = attempts.clone();
            let ambiguous = ambiguous.clone();
            self.call(move |c, ctx| {
                let fork = fork_owned.clone();
                if attempts.fetch_add(1, Ordering::Relaxed) > 0 {
                    ambiguous.store(true, Ordering::Relaxed);
                }
                async move { c.drop_fork(ctx, fork).await }
            })
            .await
        };
        match result {
            Err(ClientError::Service(ServiceError::DroppedFork(_)))
                if ambiguous.load(Ordering::Relaxed) =>
            {
                self.find_fork(fork)
                    .await?
                    .ok_or_else(|| ClientError::Disconnected {
                        endpoint: self.inner.endpoint_text.clone(),
                        operation: "drop_fork",
                    })
            }
            other => other,
        }
    }

    /// Tell the daemon the fork's data was merged into `into` (admin role): the
    /// target never grants an id the fork granted from now on, and the fork is
    /// retired as merged. Idempotent, so a lost reply is simply retried: the
    /// retries carry one `request_id`, so the call that merged is told
    /// `merged_now: true` on every attempt, and any other call `false`.
    pub async fn merge_fork(
        &self,
        fork: ForkId,
        into: MergeInto,
    ) -> Result<MergeReport, ClientError> {
        let req = MergeRequest {
            fork: fork.text(),
            into,
            request_id: Some(rand::random::<u128>()),
        };
        self.call(move |c, ctx| {
            let req = req.clone();
            async move { c.merge_fork(ctx, req).await }
        })
        .await
    }

    /// Look one fork up by id: the page that starts just below its value.
    async fn find_fork(&self, id: ForkId) -> Result<Option<ForkInfo>, ClientError> {
        let after = id
            .value()
            .checked_sub(1)
            .map(|v| uuid::Uuid::from_u128(v).hyphenated().to_string());
        let page = self.list_forks_page(after, 1).await?;
        Ok(page.forks.into_iter().find(|f| {
            ForkId::parse(&f.fork)
                .map(|p| p.value() == id.value())
                .unwrap_or(false)
        }))
    }

    /// Give back the unused part of the daemon's own leases for a namespace (only
    /// never-granted ids of its own; admin role). Ranges handed out stay valid.
    pub async fn checkpoint(&self, namespace: impl Into<Namespace>) -> Result<Hwm, ClientError> {
        let fork = wire_fork(namespace.into());
        self.call(|c, ctx| {
            let fork = fork.clone();
            async move { c.checkpoint(ctx, fork).await }
        })
        .await
    }

    /// Version, mode, mirror health and per-namespace counters.
    pub async fn status(&self) -> Result<Status, ClientError> {
        self.call(|c, ctx| async move { c.status(ctx).await }).await
    }

    /// Write a namespace's manifest from an explicit floor, only upward (the way
    /// out of a broken manifest). Retrying is safe: a second run raises nothing.
    pub async fn repair(
        &self,
        req: crate::protocol::RepairRequest,
    ) -> Result<crate::protocol::RepairReport, ClientError> {
        self.call(|c, ctx| {
            let req = req.clone();
            async move { c.repair(ctx, req).await }
        })
        .await
    }

    /// A failed dial: a TLS failure is said as such (it will not go away by
    /// retrying), anything else is a connect error.
    fn connect_error(&self, source: std::io::Error) -> ClientError {
        match tls_failure(&source) {
            Some(reason) => ClientError::Tls {
                endpoint: self.inner.endpoint_text.clone(),
                reason,
            },
            None => ClientError::Connect {
                endpoint: self.inner.endpoint_text.clone(),
                source,
            },
        }
    }

    fn deadline_error(&self, last_error: Option<String>) -> ClientError {
        ClientError::DeadlineExceeded {
            endpoint: self.inner.endpoint_text.clone(),
            deadline: self.inner.config.deadline,
            last_error,
        }
    }

    /// Run one RPC with the deadline, reconnecting and retrying as the module doc says.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        F: Fn(Conn, context::Context) -> Fut,
        Fut: Future<Output = Result<Result<T, ServiceError>, RpcError>>,
    {
        let deadline = Instant::now() + self.inner.config.deadline;
        let mut pauses = self.inner.config.backoff();
        let mut last_error: Option<String> = None;
        let mut broke_before = false;
        loop {
            let (generation, conn) = match self.connection(deadline, &mut last_error).await {
                Ok(c) => c,
                Err(e) => return Err(e),
            };
            let mut ctx = context::current();
            ctx.deadline = deadline.into_std();
            let attempt = match tokio::time::timeout_at(deadline, op(conn, ctx)).await {
                Err(_) => return Err(self.deadline_error(last_error)),
                Ok(Ok(Ok(v))) => Attempt::Done(v),
                Ok(Ok(Err(e))) if e.is_retryable() => {
                    let pause = pauses.next().unwrap_or(self.inner.config.backoff_max);
                    let hint = match &e {
                        ServiceError::Unavailable { retry_after_ms, .. } => {
                            Duration::from_millis(*retry_after_ms)
                        }
                        _ => pause,
                    };
                    Attempt::RetryAfter(hint, e.to_string())
                }
                Ok(Ok(Err(e))) => return Err(ClientError::Service(e)),
                Ok(Err(RpcError::DeadlineExceeded)) => return Err(self.deadline_error(last_error)),
                Ok(Err(RpcError::Server(e))) => Attempt::RetryAfter(
                    pauses.next().unwrap_or(self.inner.config.backoff_max),
                    format!("the daemon aborted the request: {}", e.detail),
                ),
                Ok(Err(e @ (RpcError::Shutdown | RpcError::Send(_) | RpcError::Channel(_)))) => {
                    // The daemon refused this client's certificate after the
                    // handshake looked done (TLS 1.3 verifies the client last):
                    // redialing would be refused the same way.
                    if let Some(reason) = tls_failure(&e) {
                        return Err(ClientError::Tls {
                            endpoint: self.inner.endpoint_text.clone(),
                            reason,
                        });
                    }
                    Attempt::Broken(error_chain(&e))
                }
            };
            match attempt {
                Attempt::Done(v) => return Ok(v),
                Attempt::RetryAfter(wait, why) => {
                    last_error = Some(why);
                    let wait = wait.min(self.inner.config.backoff_max);
                    if Instant::now() + wait >= deadline {
                        return Err(match last_error {
                            Some(why) if why.starts_with("the daemon aborted") => {
                                ClientError::Aborted(why)
                            }
                            other => self.deadline_error(other),
                        });
                    }
                    tokio::time::sleep(wait).await;
                }
                Attempt::Broken(why) => {
                    tracing::debug!(endpoint = %self.inner.endpoint_text, error = %why, "connection to idallocd broken; reconnecting");
                    last_error = Some(why);
                    {
                        let mut current = self.inner.current.lock().unwrap();
                        if matches!(&*current, Some((g, _)) if *g == generation) {
                            *current = None;
                        }
                    }
                    // The first break redials at once (a restarted daemon is back
                    // in the backlog). A connection that breaks again right after
                    // it was made (a daemon that closes every connection it
                    // accepts) is redialed with the backoff: without it one call
                    // dialed thousands of times a second.
                    if broke_before {
                        let pause = pauses.next().unwrap_or(self.inner.config.backoff_max);
                        if Instant::now() + pause >= deadline {
                            return Err(self.deadline_error(last_error));
                        }
                        tokio::time::sleep(pause).await;
                    }
                    broke_before = true;
                }
            }
        }
    }

    /// The live channel, or a new one dialed with backoff until `deadline`.
    async fn connection(
        &self,
        deadline: Instant,
        last_error: &mut Option<String>,
    ) -> Result<(u64, Conn), ClientError> {
        if let Some(c) = self.inner.current.lock().unwrap().clone() {
            return Ok(c);
        }
        let _dialing = match tokio::time::timeout_at(deadline, self.inner.dial.lock()).await {
            Ok(guard) => guard,
            Err(_) => return Err(self.deadline_error(last_error.take())),
        };
        // Whoever held the dial lock before us may have reconnected already.
        if let Some(c) = self.inner.current.lock().unwrap().clone() {
            return Ok(c);
        }
        let mut pauses = self.inner.config.backoff();
        loop {
            let err = match tokio::time::timeout_at(deadline, dial(&self.inner)).await {
                Ok(Ok(conn)) => {
                    let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
                    self.inner.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(endpoint = %self.inner.endpoint_text, "reconnected to idallocd");
                    *self.inner.current.lock().unwrap() = Some((generation, conn.clone()));
                    return Ok((generation, conn));
                }
                Ok(Err(e)) if tls_failure(&e).is_some() => return Err(self.connect_error(e)),
                Ok(Err(e)) => e,
                Err(_) => std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            };
            let pause = pauses.next().unwrap_or(self.inner.config.backoff_max);
            if Instant::now() + pause >= deadline {
                return Err(self.connect_error(err));
            }
            tokio::time::sleep(pause).await;
        }
    }
}

/// How a namespace is named in a request: no fork for the primary, else the
/// fork id's text in the form it was written in (the daemon keeps the form a
/// fork was created with for its object-store path).
fn wire_fork(namespace: Namespace) -> Option<String> {
    namespace.fork().map(|f| f.text())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Open one connection and spawn its reader and writer ([`Wire`]). Frames are
/// length-delimited (4-byte big-endian length) bincode 1.x, tarpc's wire format,
/// as the daemon expects; the length limit applies to replies.
async fn dial(inner: &Inner) -> std::io::Result<Conn> {
    let max_frame = inner.config.max_frame_length;
    let wire = match &inner.endpoint {
        Endpoint::Unix(path) => {
            // Watched for reading only: see `unix_conn`.
            let (read, write) = UnixConn::connect(path).await?.split();
            Wire::spawn(read, write, max_frame)
        }
        Endpoint::Tcp(host_port) => {
            let stream = tokio::net::TcpStream::connect(host_port.as_str()).await?;
            // Requests are small and latency-bound: do not let Nagle hold them back.
            stream.set_nodelay(true)?;
            let (read, write) = stream.into_split();
            Wire::spawn(read, write, max_frame)
        }
        Endpoint::Tls(host_port) => {
            let connector = inner
                .tls
                .as_ref()
                .ok_or_else(|| std::io::Error::other("tls: endpoint without TLS configuration"))?;
            let host = inner.endpoint.host().unwrap_or_default().to_string();
            let stream = tokio::net::TcpStream::connect(host_port.as_str()).await?;
            stream.set_nodelay(true)?;
            Wire::over(
                crate::tls::connect(connector, host, stream).await?,
                max_frame,
            )
        }
    };
    Ok(IdAllocClient::from(wire))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A daemon that accepts every connection and closes it at once (what
    /// idallocd did to a peer with no role): one call dialed it about 6,500
    /// times a second. With the backoff it is a handful of dials per call.
    #[tokio::test]
    async fn redials_after_repeated_breaks_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("closing.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                drop(s);
            }
        });
        let config = ClientConfig::default().with_deadline(Duration::from_secs(1));
        let client = Client::connect_with(format!("unix:{}", path.display()), config)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let err = client.status().await.unwrap_err();
        assert!(matches!(err, ClientError::DeadlineExceeded { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let dials = accepted.load(Ordering::Relaxed);
        assert!(dials <= 20, "{dials} connections in one second of one call");
    }
}
