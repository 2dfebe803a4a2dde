//! The opt-in Prometheus endpoint (`[metrics] listen`) and the server layer's own
//! metrics. The engine records its own `idalloc_*` counters and histograms through the
//! `metrics` facade; installing the exporter here is what makes them visible. Without
//! `[metrics] listen` no recorder is installed and every metric call is a no-op.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

/// Connections accepted since start (counter).
pub const CONNECTIONS_TOTAL: &str = "idalloc_connections_total";
/// Connections open now (gauge).
pub const CONNECTIONS_OPEN: &str = "idalloc_connections_open";

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint on {addr}: {reason}")]
pub struct MetricsError {
    addr: SocketAddr,
    reason: String,
}

/// Serve `/metrics` on `addr` over HTTP. Must run inside the tokio runtime (the
/// exporter is a task on it).
pub fn install(addr: SocketAddr) -> Result<(), MetricsError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| MetricsError {
            addr,
            reason: e.to_string(),
        })?;
    metrics::describe_counter!(
        CONNECTIONS_TOTAL,
        "Client connections accepted since start."
    );
    metrics::describe_gauge!(CONNECTIONS_OPEN, "Client connections open now.");
    // The engine's own series (recorded in src/engine).
    metrics::describe_counter!(
        "idalloc_reservations_total",
        "Reservations granted, by namespace (primary/fork) and kind."
    );
    metrics::describe_counter!(
        "idalloc_ids_granted_total",
        "Ids granted, by namespace (primary/fork) and kind."
    );
    metrics::describe_counter!(
        "idalloc_flushes_total",
        "sled flushes (one per group of reservations)."
    );
    metrics::describe_histogram!(
        "idalloc_flush_seconds",
        "Time to write and flush one group of reservations."
    );
    metrics::describe_histogram!(
        "idalloc_flush_batch_size",
        "Reservations made durable by one flush."
    );
    metrics::describe_counter!(
        "idalloc_leases_total",
        "Object-store leases taken, by kind and shape (dense or jump)."
    );
    metrics::describe_counter!(
        "idalloc_store_errors_total",
        "Failed object-store calls, by operation."
    );
    metrics::describe_histogram!(
        "idalloc_store_seconds",
        "Object-store call latency, by operation."
    );
    Ok(())
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

/// Refresh the engine's gauges (lease headroom of the primary, namespaces, store
/// health) once a second until `stop`. Gauges are sampled rather than set on every
/// reservation, which keeps the reservation path free of them.
pub fn spawn_gauges(
    engine: std::sync::Arc<crate::engine::Engine>,
    stop: tokio_util::sync::CancellationToken,
) {
    metrics::describe_gauge!(
        "idalloc_lease_headroom",
        "Ids left in the primary's leases before the object store must be written."
    );
    metrics::describe_gauge!("idalloc_namespaces", "Namespaces known (primary + forks).");
    metrics::describe_gauge!(
        "idalloc_store_healthy",
        "1 while the last object-store call succeeded, else 0."
    );
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let st = engine.status_now();
            if let Some(primary) = st.namespaces.first() {
                for c in &primary.counters {
                    metrics::gauge!("idalloc_lease_headroom", "namespace" => "primary", "kind" => c.kind.as_str())
                        .set(c.headroom as f64);
                }
            }
            metrics::gauge!("idalloc_namespaces").set(st.namespaces_total as f64);
            metrics::gauge!("idalloc_store_healthy").set(if st.mirror.healthy { 1.0 } else { 0.0 });
        }
    });
}
