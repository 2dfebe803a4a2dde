//! The opt-in Prometheus endpoint (`[metrics] listen`) and the server layer's own
//! metrics. The engine records its own `idalloc_*` counters and histograms through the
//! `metrics` facade; installing the recorder here is what makes them visible. Without
//! `[metrics] listen` no recorder is installed and every metric call is a no-op.
//!
//! Conventions (Prometheus's own, as node_exporter and etcd follow them): base
//! units in names (`_seconds`, `_bytes`), `_total` on counters, help text on every
//! series, histograms (not summaries, which cannot be aggregated across the
//! daemons sharing a bucket) with buckets from tens of microseconds to seconds,
//! bounded label sets (no fork ids as labels), `process_*` from a well-kept
//! collector, and `/metrics` only, with the text format's content type.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Connections accepted since start (counter).
pub const CONNECTIONS_TOTAL: &str = "idalloc_connections_total";
/// Connections open now (gauge).
pub const CONNECTIONS_OPEN: &str = "idalloc_connections_open";
/// Connections refused before any request, by reason (counter).
pub const CONNECTIONS_REFUSED: &str = "idalloc_connections_refused_total";
/// The reasons of [`CONNECTIONS_REFUSED`]: a unix peer in no `[access]` list, a TLS
/// handshake refused or a certificate whose names have no role.
pub const REFUSAL_REASONS: &[&str] = &["no_role", "tls"];

/// Latency buckets in seconds: 25 µs to 10 s (a flush is ~100 µs, an S3 call tens
/// of ms, a stalled store seconds).
const SECONDS_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Reservations per flush: 1 to 4096.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// The store operations `idalloc_store_errors_total` counts, present at zero.
pub const STORE_OPS: &[&str] = &["get", "create", "update", "list", "fsync"];
/// The RPC methods `idalloc_requests_total` counts.
pub const METHODS: &[&str] = &[
    "reserve",
    "hwm",
    "bootstrap_fork",
    "list_forks",
    "drop_fork",
    "checkpoint",
    "status",
    "repair",
];

/// The content type of Prometheus's text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint on {addr}: {reason}")]
pub struct MetricsError {
    addr: SocketAddr,
    reason: String,
}

/// Set once a recorder is installed: per-request timing is skipped until then.
static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether a recorder is installed (`[metrics] listen` is set). Without one every
/// metric call is a no-op, and the hot path need not read the clock to feed it.
pub fn enabled() -> bool {
    INSTALLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Install the recorder and serve `/metrics` on `addr` over HTTP. Must run
/// inside the tokio runtime (the endpoint is a task on it).
pub async fn install(addr: SocketAddr) -> Result<(), MetricsError> {
    let err = |reason: String| MetricsError { addr, reason };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| err(e.to_string()))?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("idalloc_flush_batch_size".into()),
                BATCH_BUCKETS,
            )
        })
        .map_err(|e| err(e.to_string()))?
        .install_recorder()
        .map_err(|e| err(e.to_string()))?;
    INSTALLED.store(true, std::sync::atomic::Ordering::Relaxed);
    let process = metrics_process::Collector::default();
    process.describe();
    describe();
    let state = Arc::new((handle, process));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(&state.0, &state.1, &req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    Ok(())
}

fn respond(
    handle: &PrometheusHandle,
    process: &metrics_process::Collector,
    req: &Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String, ctype: &'static str| {
        Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("a static response builds")
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "not found: metrics are at /metrics\n".into(),
            "text/plain; charset=utf-8",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET /metrics\n".into(),
            "text/plain; charset=utf-8",
        );
    }
    process.collect();
    handle.run_upkeep();
    reply(StatusCode::OK, handle.render(), CONTENT_TYPE)
}

/// Help text for every series, and the series that must be present from the
/// start (at zero) so that rates and alerts work before the first event.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "idalloc_build_info",
        "Always 1; the labels say which idallocd this is."
    );
    metrics::gauge!("idalloc_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    describe_gauge!(
        "idalloc_start_time_seconds",
        Unit::Seconds,
        "When this daemon started, in seconds since the Unix epoch."
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics::gauge!("idalloc_start_time_seconds").set(now);
    describe_counter!(
        CONNECTIONS_TOTAL,
        "Client connections accepted since start."
    );
    describe_gauge!(CONNECTIONS_OPEN, "Client connections open now.");
    metrics::counter!(CONNECTIONS_TOTAL).absolute(0);
    metrics::gauge!(CONNECTIONS_OPEN).set(0.0);
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections refused before any request: no_role (a unix peer in no [access] list), tls (handshake refused, or certificate names without a role)."
    );
    for r in REFUSAL_REASONS {
        metrics::counter!(CONNECTIONS_REFUSED, "reason" => *r).absolute(0);
    }
    describe_counter!(
        "idalloc_requests_total",
        "RPC requests answered, by method and outcome (ok, or the error's kind)."
    );
    describe_histogram!(
        "idalloc_request_seconds",
        Unit::Seconds,
        "Time from a request's arrival to its reply, by method."
    );
    for m in METHODS {
        metrics::counter!("idalloc_requests_total", "method" => *m, "outcome" => "ok").absolute(0);
    }
    // The engine's own series (recorded in src/engine).
    describe_counter!(
        "idalloc_reservations_total",
        "Reservations granted, by namespace (primary/fork) and kind."
    );
    describe_counter!(
        "idalloc_ids_granted_total",
        "Ids granted, by namespace (primary/fork) and kind."
    );
    describe_counter!(
        "idalloc_flushes_total",
        "sled flushes (one per group of reservations)."
    );
    describe_histogram!(
        "idalloc_flush_seconds",
        Unit::Seconds,
        "Time to write and flush one group of reservations."
    );
    describe_histogram!(
        "idalloc_flush_batch_size",
        "Reservations made durable by one flush."
    );
    describe_counter!(
        "idalloc_leases_total",
        "Object-store leases taken, by kind and shape (dense or jump)."
    );
    describe_gauge!(
        "idalloc_primary_lease_size_ids",
        "Ids in the primary's last lease, by kind: lease_size, or up to 4 x lease_size while other daemons win conditional writes first."
    );
    describe_counter!(
        "idalloc_store_errors_total",
        "Failed object-store calls, by operation."
    );
    describe_counter!(
        "idalloc_conditional_writes_lost_total",
        "Conditional object-store writes that lost a race to another writer, by operation."
    );
    for op in STORE_OPS {
        metrics::counter!("idalloc_store_errors_total", "op" => *op).absolute(0);
    }
    for op in ["create", "update"] {
        metrics::counter!("idalloc_conditional_writes_lost_total", "op" => op).absolute(0);
    }
    describe_histogram!(
        "idalloc_store_seconds",
        Unit::Seconds,
        "Object-store call latency, by operation."
    );
}

/// Counts one connection from accept until drop.
pub struct ConnectionGuard(());

impl ConnectionGuard {
    /// Record an accepted connection.
    pub fn open() -> Self {
        metrics::counter!(CONNECTIONS_TOTAL).increment(1);
        metrics::gauge!(CONNECTIONS_OPEN).increment(1.0);
        ConnectionGuard(())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS_OPEN).decrement(1.0);
    }
}

/// Count a connection refused for `reason` (one of [`REFUSAL_REASONS`]).
pub fn connection_refused(reason: &'static str) {
    metrics::counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

/// The `outcome` label of a reply.
pub fn outcome<T>(r: &Result<T, crate::error::ServiceError>) -> &'static str {
    use crate::error::ServiceError as E;
    match r {
        Ok(_) => "ok",
        Err(E::InvalidArgument(_)) => "invalid_argument",
        Err(E::UnknownFork(_)) => "unknown_fork",
        Err(E::DroppedFork(_)) => "dropped_fork",
        Err(E::Exhausted(_)) => "exhausted",
        Err(E::Unavailable { .. }) => "unavailable",
        Err(E::ShuttingDown) => "shutting_down",
        Err(E::BrokenManifest(_)) => "broken_manifest",
        Err(E::PermissionDenied(_)) => "permission_denied",
        Err(E::MergedFork { .. }) => "merged_fork",
        Err(_) => "internal",
    }
}

/// Refresh the engine's gauges once a second until `stop`: lease headroom of the
/// primary per kind and the smallest among live forks (bounded cardinality),
/// forks by state, writer mode, store health. Sampled rather than set on every
/// reservation, which keeps the reservation path free of them.
pub fn spawn_gauges(
    engine: std::sync::Arc<crate::engine::Engine>,
    stop: tokio_util::sync::CancellationToken,
) {
    metrics::describe_gauge!(
        "idalloc_lease_headroom",
        "Ids left in leases before the object store must be written: the primary, and the smallest among live forks (namespace=\"forks_min\")."
    );
    metrics::describe_gauge!("idalloc_namespaces", "Namespaces known (primary + forks).");
    metrics::describe_gauge!(
        "idalloc_forks",
        "Forks among the first 100 known, by state (live, dropped, unavailable)."
    );
    metrics::describe_gauge!(
        "idalloc_writer_mode",
        "1 for the mode this daemon runs in (single-writer or multi-writer)."
    );
    metrics::describe_gauge!(
        "idalloc_store_healthy",
        "1 while the last object-store call succeeded, else 0."
    );
    let mode = engine.mode().to_string();
    metrics::gauge!("idalloc_writer_mode", "mode" => mode).set(1.0);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let st = engine.status_now();
            let mut forks_min: [Option<u64>; 2] = [None, None];
            let (mut live, mut dropped, mut unavailable) = (0u64, 0u64, 0u64);
            for (i, ns) in st.namespaces.iter().enumerate() {
                if i == 0 {
                    for c in &ns.counters {
                        metrics::gauge!("idalloc_lease_headroom", "namespace" => "primary", "kind" => c.kind.as_str())
                            .set(c.headroom as f64);
                    }
                    continue;
                }
                if ns.error.is_some() {
                    unavailable += 1;
                } else if ns.dropped {
                    dropped += 1;
                } else {
                    live += 1;
                    for c in &ns.counters {
                        let m = &mut forks_min[c.kind.index()];
                        *m = Some(m.map_or(c.headroom, |v| v.min(c.headroom)));
                    }
                }
            }
            for kind in crate::namespace::Kind::ALL {
                if let Some(h) = forks_min[kind.index()] {
                    metrics::gauge!("idalloc_lease_headroom", "namespace" => "forks_min", "kind" => kind.as_str())
                        .set(h as f64);
                }
            }
            metrics::gauge!("idalloc_forks", "state" => "live").set(live as f64);
            metrics::gauge!("idalloc_forks", "state" => "dropped").set(dropped as f64);
            metrics::gauge!("idalloc_forks", "state" => "unavailable").set(unavailable as f64);
            metrics::gauge!("idalloc_namespaces").set(st.namespaces_total as f64);
            metrics::gauge!("idalloc_store_healthy").set(if st.mirror.healthy { 1.0 } else { 0.0 });
        }
    });
}
