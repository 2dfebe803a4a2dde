//! The daemon's server layer: configuration, listeners, the tarpc service over the
//! engine, systemd integration, metrics, and the life cycle that ties them together
//! ([`run`]).
//!
//! Life cycle, and why it is ordered so:
//! 1. bind the listeners (or take systemd's) *before* recovery, so that a mistake
//!    (another daemon on the socket, a public address without `allow_remote`) fails in
//!    milliseconds, and clients that connect during recovery wait in the backlog;
//! 2. open the engine (recovery);
//! 3. accept, then READY=1 — systemd starts dependents only once ids can be had;
//! 4. on shutdown: stop accepting, close every connection's read half and let the
//!    requests in flight be answered (bounded by `shutdown_timeout`), then
//!    `Engine::shutdown` (checkpoint, lower manifests, mark clean), STOPPING=1.

pub mod access;
pub mod admission;
pub mod config;
pub mod connection;
pub mod credentials;
pub mod listen;
pub mod metrics;
pub mod notify;
pub mod service;
pub mod tls;
pub mod transport;
pub mod validate;

use std::time::Instant;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::{Engine, OpenError, StoreHandle};
use idalloc_client::error::ServiceError;

pub use config::{Config, ConfigError, Environment, Settings};
use connection::ConnLimits;
use listen::{BindOptions, ListenError, Listener};
use service::Service;
pub use validate::{validate, ValidateError};

/// Why the daemon stopped with an error. Each message is one line an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A listener could not be set up.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The engine could not start.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The metrics endpoint could not start.
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    /// The engine's clean shutdown failed; the next start recovers as after a crash.
    #[error("clean shutdown failed: {0}; the next start will recover as after a crash")]
    Shutdown(ServiceError),
}

/// Run the daemon until `shutdown` is cancelled, then stop gracefully.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), ServerError> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        data_dir = %settings.data_dir.display(),
        "idallocd starting"
    );
    if let Some(addr) = settings.metrics_listen {
        metrics::install(addr).await?;
        tracing::info!(%addr, "Prometheus metrics at http://{addr}/metrics");
    }

    let listeners = bind_all(&settings).await?;
    for l in &listeners {
        tracing::info!(listener = %l.describe(), "listening");
        if l.is_plain_tcp() {
            let note = access::tcp_note(&l.describe(), settings.access.tcp_role);
            match settings.access.tcp_role {
                access::Role::Writer => tracing::info!("{note}"),
                access::Role::Admin => tracing::warn!("{note}"),
            }
        }
    }

    notify::status("recovering local state and object-store leases");
    let store = StoreHandle::from_url(&settings.store_url, &settings.store_options)?;
    tracing::info!(object_store = %store.display_url, "object store");
    let engine = tokio::select! {
        e = Engine::open(settings.engine.clone(), store.clone()) => e?,
        _ = shutdown.cancelled() => {
            // Recovery is crash-safe by design, so abandoning it is too.
            tracing::info!("stopped before recovery finished");
            return Ok(());
        }
    };
    let mode = engine.mode();
    tracing::info!(%mode, "engine ready ({})", match mode {
        idalloc_client::protocol::WriterMode::SingleWriter =>
            "single-writer: this daemon must be the only writer of the object-store root",
        idalloc_client::protocol::WriterMode::MultiWriter =>
            "multi-writer: several daemons may share the object-store root",
    });

    let limits = ConnLimits {
        max_frame_bytes: settings.max_frame_bytes,
        max_in_flight: settings.max_in_flight_per_connection,
        idle_timeout: settings.idle_timeout,
    };
    admission::raise_open_file_limit(&settings);
    let service = Service::new(engine.clone());
    let stop_accepting = CancellationToken::new();
    let close_reads = CancellationToken::new();
    let force_close = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut acceptors = JoinSet::new();
    let names: Vec<String> = listeners.iter().map(Listener::describe).collect();
    let gate = admission::Gate::new(&settings);
    let serving = admission::Serving {
        service: service.clone(),
        limits,
        close_reads: close_reads.clone(),
        force_close: force_close.clone(),
        connections: connections.clone(),
    };
    for listener in listeners {
        acceptors.spawn(admission::accept_loop(
            listener,
            gate.clone(),
            stop_accepting.clone(),
            serving.clone(),
        ));
    }

    let gauges_stop = CancellationToken::new();
    if settings.metrics_listen.is_some() {
        metrics::spawn_gauges(engine.clone(), gauges_stop.clone());
    }
    let started = Instant::now();
    let status_line = format!("serving on {} ({mode})", names.join(", "));
    notify::ready(&status_line);
    let watchdog_stop = CancellationToken::new();
    if let Some(period) = notify::spawn_watchdog(watchdog_stop.clone()) {
        tracing::info!(?period, "systemd watchdog enabled");
    }
    tracing::info!("{status_line}");

    shutdown.cancelled().await;
    tracing::info!(
        uptime_secs = started.elapsed().as_secs(),
        "shutting down: no new connections, finishing requests in flight"
    );
    notify::stopping("draining requests in flight");

    stop_accepting.cancel();
    while acceptors.join_next().await.is_some() {}
    close_reads.cancel();
    connections.close();
    if tokio::time::timeout(settings.shutdown_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?settings.shutdown_timeout,
            open = connections.len(),
            "requests still in flight after the shutdown timeout; closing their connections (their ids stay reserved, never re-issued)"
        );
        force_close.cancel();
        connections.wait().await;
    }

    notify::status("checkpointing and lowering manifests");
    let result = engine.shutdown().await;
    watchdog_stop.cancel();
    gauges_stop.cancel();
    match result {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            Ok(())
        }
        Err(e) => Err(ServerError::Shutdown(e)),
    }
}

async fn bind_all(settings: &Settings) -> Result<Vec<Listener>, ListenError> {
    if let Some(activated) = listen::activated(settings.allow_remote, settings.tls.is_some())? {
        tracing::info!(
            count = activated.len(),
            "using sockets passed by systemd (socket activation); `listen` is ignored"
        );
        return Ok(activated);
    }
    let opts = BindOptions {
        socket_mode: settings.socket_mode,
        allow_remote: settings.allow_remote,
    };
    let mut out = Vec::with_capacity(settings.listen.len());
    for endpoint in &settings.listen {
        // On error the listeners already bound are dropped, which removes their
        // socket files: a failed start leaves nothing behind.
        out.push(listen::bind(endpoint, opts).await?);
    }
    Ok(out)
}
