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
