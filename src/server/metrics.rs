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
/// handshake refused or a certificate whose names have no role, an identity at
/// `max_connections_per_identity`.
pub const REFUSAL_REASONS: &[&str] = &["no_role", "tls", "per_identity"];

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
    tokio::spawn(serve_scrapes(listener, state));
    Ok(())
}

/// Scrapes served at once; more wait in the backlog (holding no descriptor).
pub const MAX_SCRAPES: usize = 16;
/// Time a scrape has to send its request headers, and to finish once served.
const SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The endpoint's accept loop. Idle HTTP connections once took every
/// descriptor the daemon had (and writers timed out on the unix socket), and an
/// accept error was retried at once, spinning a core: now a slot is taken
/// before accepting, each connection is bounded in time, and accept errors back
/// off.
async fn serve_scrapes(
    listener: tokio::net::TcpListener,
    state: Arc<(PrometheusHandle, metrics_process::Collector)>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    let mut pause = std::time::Duration::from_millis(10);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                pause = std::time::Duration::from_millis(10);
                stream
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed; backing off {pause:?}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_secs(1));
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let io = hyper_util::rt::TokioIo::new(stream);
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state.0, &state.1, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(SCRAPE_TIMEOUT)
                .keep_alive(false)
                .serve_connection(io, service);
            let _ = tokio::time::timeout(SCRAPE_TIMEOUT * 2, conn).await;
        });
    }
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
    reply(
        StatusCode::OK,
        cpu_as_counter(handle.render()),
        CONTENT_TYPE,
    )
}

/// `process_cpu_seconds_total` typed as the counter it is. The `metrics` facade's
/// counters are whole numbers, so metrics-process records CPU time as a gauge to
/// keep its fraction (`use-gauge-on-cpu-seconds-total`); Prometheus conventions
/// (client_golang, node_exporter) and `rate()` want it typed `counter`.
fn cpu_as_counter(text: String) -> String {
    text.replacen(
        "# TYPE process_cpu_seconds_total gauge",
        "# TYPE process_cpu_seconds_total counter",
        1,
    )
}

/// Help text for every series, and the series that must be present from the
/// start (at zero) so that rates and alerts work before the first event.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "idalloc_build_info",
        "Always 1; the labels say which idallocd this is: version, git revision, rustc version, target triple, cargo profile."
    );
    metrics::gauge!(
        "idalloc_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "revision" => env!("IDALLOC_BUILD_REVISION"),
        "rustc" => env!("IDALLOC_BUILD_RUSTC"),
        "target" => env!("IDALLOC_BUILD_TARGET"),
        "profile" => env!("IDALLOC_BUILD_PROFILE"),
    )
    .set(1.0);
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
pub fn outcome<T>(r: &Result<T, idalloc_client::error::ServiceError>) -> &'static str {
    use idalloc_client::error::ServiceError as E;
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

/// How long after its last grant a namespace still counts as reserving for
/// `idalloc_lease_headroom`: a namespace that holds no ids and grants none has no
/// lease to run out of.
const RESERVING_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Refresh the engine's gauges once a second until `stop`: lease headroom of the
/// primary per kind and the smallest among live forks that are reserving (bounded
/// cardinality), forks by state, the primary's availability, writer mode, store
/// health and its last success. Sampled rather than set on every reservation,
/// which keeps the reservation path free of them.
pub fn spawn_gauges(
    engine: std::sync::Arc<crate::engine::Engine>,
    stop: tokio_util::sync::CancellationToken,
) {
    metrics::describe_gauge!(
        "idalloc_lease_headroom",
        "Ids left in this daemon's leases before the object store must be written, by kind: the primary, and the smallest among live forks (namespace=\"forks_min\"). Only namespaces that hold ids or granted some in the last 60 s count; NaN when none does (idle, unleased, merged, dropped) or the primary is unavailable."
    );
    metrics::describe_gauge!("idalloc_namespaces", "Namespaces known (primary + forks).");
    metrics::describe_gauge!(
        "idalloc_forks",
        "Forks known, by state (live, dropped, merged, unavailable: its manifest cannot be parsed)."
    );
    metrics::describe_gauge!(
        "idalloc_primary_unavailable",
        "1 while the primary's manifest cannot be parsed (every call on it fails until `idallocctl repair`), else 0."
    );
    metrics::describe_gauge!(
        "idalloc_writer_mode",
        "1 for the mode this daemon runs in (single-writer or multi-writer)."
    );
    metrics::describe_gauge!(
        "idalloc_store_healthy",
        "1 while the last object-store call succeeded, else 0."
    );
    metrics::describe_gauge!(
        "idalloc_store_last_success_timestamp_seconds",
        metrics::Unit::Seconds,
        "When the last object-store call succeeded, in seconds since the Unix epoch (0 before the first)."
    );
    metrics::describe_gauge!(
        "idalloc_lease_size_configured_ids",
        "[allocation] lease_size: the ids of the smallest lease (leases that run out fast grow to 16 x). Alert rules compare headroom with it."
    );
    let mode = engine.mode().to_string();
    metrics::gauge!("idalloc_writer_mode", "mode" => mode).set(1.0);
    metrics::gauge!("idalloc_lease_size_configured_ids").set(engine.lease_size() as f64);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let mut sampler = Sampler::default();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let g = sampler.gauges(&engine.samples(), std::time::Instant::now());
            for kind in idalloc_client::namespace::Kind::ALL {
                let i = kind.index();
                metrics::gauge!("idalloc_lease_headroom", "namespace" => "primary", "kind" => kind.as_str())
                    .set(g.primary_headroom[i]);
                metrics::gauge!("idalloc_lease_headroom", "namespace" => "forks_min", "kind" => kind.as_str())
                    .set(g.forks_min_headroom[i]);
            }
            for (state, n) in [
                ("live", g.live),
                ("dropped", g.dropped),
                ("merged", g.merged),
                ("unavailable", g.unavailable),
            ] {
                metrics::gauge!("idalloc_forks", "state" => state).set(n as f64);
            }
            metrics::gauge!("idalloc_primary_unavailable").set(if g.primary_unavailable {
                1.0
            } else {
                0.0
            });
            metrics::gauge!("idalloc_namespaces").set(g.namespaces as f64);
            let mirror = engine.mirror_health();
            metrics::gauge!("idalloc_store_healthy").set(if mirror.healthy { 1.0 } else { 0.0 });
            let last_success = mirror.last_success_age_ms.map_or(0.0, |age| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                now - age as f64 / 1000.0
            });
            metrics::gauge!("idalloc_store_last_success_timestamp_seconds").set(last_success);
        }
    });
}

/// What one tick of the sampler sets.
#[derive(Debug, PartialEq)]
struct Gauges {
    primary_headroom: [f64; 2],
    forks_min_headroom: [f64; 2],
    live: u64,
    dropped: u64,
    merged: u64,
    unavailable: u64,
    primary_unavailable: bool,
    namespaces: u64,
}

/// Remembers when each namespace last granted ids, to tell one that is reserving
/// from one that is idle.
#[derive(Default)]
struct Sampler {
    last_grant: std::collections::HashMap<Vec<u8>, [(u64, Option<std::time::Instant>); 2]>,
}

impl Sampler {
    fn gauges(&mut self, samples: &[crate::engine::NsSample], now: std::time::Instant) -> Gauges {
        let mut g = Gauges {
            primary_headroom: [f64::NAN; 2],
            forks_min_headroom: [f64::NAN; 2],
            live: 0,
            dropped: 0,
            merged: 0,
            unavailable: 0,
            primary_unavailable: false,
            namespaces: samples.len() as u64,
        };
        let mut seen = std::collections::HashSet::new();
        for s in samples {
            seen.insert(s.key.as_slice());
            // The first sample of a namespace only sets the baseline: a daemon just
            // started has seen nobody reserve yet.
            let last = self
                .last_grant
                .entry(s.key.clone())
                .or_insert([(s.granted[0], None), (s.granted[1], None)]);
            let mut reserving = [false; 2];
            for (i, (granted, when)) in last.iter_mut().enumerate() {
                if *granted != s.granted[i] {
                    *granted = s.granted[i];
                    *when = Some(now);
                }
                reserving[i] = when.is_some_and(|t| now.duration_since(t) < RESERVING_WINDOW);
            }
            let counts = |i: usize| s.verified && (s.headroom[i] > 0 || reserving[i]);
            if s.primary {
                g.primary_unavailable = s.broken;
                if !s.broken {
                    for (i, h) in g.primary_headroom.iter_mut().enumerate() {
                        if counts(i) {
                            *h = s.headroom[i] as f64;
                        }
                    }
                }
                continue;
            }
            match (s.broken, s.merged, s.dropped) {
                (true, _, _) => g.unavailable += 1,
                (false, true, _) => g.merged += 1,
                (false, false, true) => g.dropped += 1,
                (false, false, false) => {
                    g.live += 1;
                    for (i, m) in g.forks_min_headroom.iter_mut().enumerate() {
                        if counts(i) {
                            // NaN.min(x) is x: the first fork that counts sets it.
                            *m = m.min(s.headroom[i] as f64);
                        }
                    }
                }
            }
        }
        self.last_grant.retain(|k, _| seen.contains(k.as_slice()));
        g
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::engine::NsSample;

    fn ns(key: u8, primary: bool, granted: u64, headroom: u64) -> NsSample {
        NsSample {
            key: vec![key],
            primary,
            dropped: false,
            merged: false,
            broken: false,
            verified: true,
            granted: [granted, 0],
            headroom: [headroom, 0],
        }
    }

    #[test]
    fn headroom_counts_only_namespaces_that_hold_ids_or_are_reserving() {
        let mut s = Sampler::default();
        let t0 = Instant::now();
        // Just started, nothing leased: no headroom to alert on, not 0.
        let g = s.gauges(&[ns(0, true, 0, 0), ns(1, false, 5, 0)], t0);
        assert!(g.primary_headroom.iter().all(|h| h.is_nan()), "{g:?}");
        assert!(g.forks_min_headroom.iter().all(|h| h.is_nan()), "{g:?}");
        // The primary takes a lease; the idle fork still has none.
        let g = s.gauges(&[ns(0, true, 10, 990), ns(1, false, 5, 0)], t0);
        assert_eq!(g.primary_headroom[0], 990.0);
        assert!(g.forks_min_headroom[0].is_nan(), "{g:?}");
        assert!(g.primary_headroom[1].is_nan(), "eids: no lease: {g:?}");
        // The lease runs dry while ids are being granted: 0 is the alarm.
        let t1 = t0 + Duration::from_secs(1);
        let g = s.gauges(&[ns(0, true, 1000, 0), ns(1, false, 5, 0)], t1);
        assert_eq!(g.primary_headroom[0], 0.0);
        // A minute without grants and no lease: idle again.
        let g = s.gauges(&[ns(0, true, 1000, 0)], t1 + RESERVING_WINDOW);
        assert!(g.primary_headroom[0].is_nan(), "{g:?}");
    }

    #[test]
    fn forks_min_is_the_smallest_of_the_live_forks_that_count() {
        let mut s = Sampler::default();
        let t0 = Instant::now();
        let mut merged = ns(3, false, 0, 7);
        merged.merged = true;
        merged.dropped = true;
        let mut dropped = ns(4, false, 0, 8);
        dropped.dropped = true;
        let mut broken = ns(5, false, 0, 0);
        broken.broken = true;
        let mut unverified = ns(6, false, 0, 9);
        unverified.verified = false;
        let all = [
            ns(0, true, 0, 100),
            ns(1, false, 0, 500),
            ns(2, false, 0, 40),
            merged,
            dropped,
            broken,
            unverified,
        ];
        let g = s.gauges(&all, t0);
        assert_eq!(g.forks_min_headroom[0], 40.0);
        assert_eq!(
            (g.live, g.dropped, g.merged, g.unavailable, g.namespaces),
            (3, 1, 1, 1, 7),
            "a merged fork is not live: {g:?}"
        );
        assert!(!g.primary_unavailable);
    }

    #[test]
    fn a_broken_primary_is_a_series_not_a_gap() {
        let mut s = Sampler::default();
        let mut p = ns(0, true, 0, 100);
        p.broken = true;
        let g = s.gauges(&[p], Instant::now());
        assert!(g.primary_unavailable);
        assert!(g.primary_headroom[0].is_nan());
    }

    #[test]
    fn cpu_time_is_typed_counter() {
        let text = "# HELP process_cpu_seconds_total x\n# TYPE process_cpu_seconds_total gauge\nprocess_cpu_seconds_total 0.37\n";
        assert!(cpu_as_counter(text.into())
            .contains("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 0.37"));
    }
}
