//! `ClientError`: everything a call through the client library can fail with.
//!
//! The daemon's own typed error ([`ServiceError`]) passes through unchanged in
//! [`ClientError::Service`], so a writer can match on `UnknownFork`, `DroppedFork`,
//! `InvalidArgument` and so on exactly as the daemon meant them. The other variants
//! are the client's own failures: reaching the daemon, losing it, running out of time.

use std::time::Duration;

use crate::endpoint::ParseEndpointError;
use crate::error::ServiceError;

/// An error from the client library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The daemon answered with an error. Retryable ones (`Unavailable`,
    /// `ShuttingDown`) only reach the caller when the deadline left no time to retry.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// No connection could be made to the daemon (the first connect, or every
    /// reconnect attempt until the deadline).
    #[error("cannot connect to {endpoint}")]
    Connect {
        /// The endpoint, as `unix:PATH` or `tcp:HOST:PORT`.
        endpoint: String,
        /// The last connect error.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke while a request that must not be repeated blindly was in
    /// flight, so whether the daemon applied it is unknown.
    #[error("connection to {endpoint} lost while {operation} was in flight: it may or may not have been applied")]
    Disconnected {
        /// The endpoint.
        endpoint: String,
        /// The operation that was in flight.
        operation: &'static str,
    },
    /// The call did not complete within its deadline (retries included).
    #[error("no answer from {endpoint} within the deadline of {deadline:?}{}", last_error_suffix(.last_error))]
    DeadlineExceeded {
        /// The endpoint.
        endpoint: String,
        /// The deadline the call had.
        deadline: Duration,
        /// What the last attempt failed with, if an attempt failed before time ran out.
        last_error: Option<String>,
    },
    /// The daemon's RPC layer refused or aborted the request (for example its
    /// in-flight request limit), outside the service's own typed errors.
    #[error("the daemon aborted the request: {0}")]
    Aborted(String),
    /// TLS refused: the daemon rejected this client's certificate (none, another
    /// CA's, expired), the daemon's certificate is not trusted, or the TLS files
    /// cannot be used. Not retried: it would fail the same way.
    #[error("TLS to {endpoint}: {reason}")]
    Tls {
        /// The endpoint.
        endpoint: String,
        /// What was refused and what to check.
        reason: String,
    },
    /// The endpoint text could not be parsed.
    #[error(transparent)]
    Endpoint(#[from] ParseEndpointError),
}

fn last_error_suffix(last: &Option<String>) -> String {
    match last {
        Some(e) => format!(" (last error: {e})"),
        None => String::new(),
    }
}

impl ClientError {
    /// Whether the same call, made again later, may succeed: the daemon or its
    /// store was unavailable or stopping, the connection could not be made or
    /// broke, the deadline ran out, or the daemon shed the request. Repeating
    /// any call of this crate is safe (a lost reservation is a gap, never a
    /// duplicate; `bootstrap_fork` and `merge_fork` are idempotent; a repeated
    /// `drop_fork` looks the fork up). Not retryable: what the daemon refused on
    /// its merits (an invalid request, an unknown, dropped or merged fork, a
    /// broken manifest, a permission), a TLS refusal and a malformed endpoint,
    /// which fail the same way every time.
    ///
    /// The client has already retried retryable failures within the call's
    /// deadline; this is for a caller that decides whether to try once more
    /// (with a new deadline) or to give up.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Service(e) => e.is_retryable(),
            ClientError::Connect { .. }
            | ClientError::Disconnected { .. }
            | ClientError::DeadlineExceeded { .. }
            | ClientError::Aborted(_) => true,
            ClientError::Tls { .. } | ClientError::Endpoint(_) => false,
        }
    }

    /// The daemon's typed error, if this is one.
    pub fn service(&self) -> Option<&ServiceError> {
        match self {
            ClientError::Service(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_is_what_may_succeed_later() {
        let ep = || "unix:/run/x.sock".to_string();
        let retry = [
            ClientError::Service(ServiceError::unavailable("store down", 100)),
            ClientError::Service(ServiceError::ShuttingDown),
            ClientError::Connect {
                endpoint: ep(),
                source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            },
            ClientError::Disconnected {
                endpoint: ep(),
                operation: "drop_fork",
            },
            ClientError::DeadlineExceeded {
                endpoint: ep(),
                deadline: Duration::from_secs(1),
                last_error: None,
            },
            ClientError::Aborted("in-flight limit".into()),
        ];
        for e in retry {
            assert!(e.is_retryable(), "{e}");
        }
        let give_up = [
            ClientError::Service(ServiceError::InvalidArgument("count 0".into())),
            ClientError::Service(ServiceError::UnknownFork("f".into())),
            ClientError::Service(ServiceError::DroppedFork("f".into())),
            ClientError::Service(ServiceError::PermissionDenied("admin".into())),
            ClientError::Service(ServiceError::BrokenManifest("m".into())),
            ClientError::Tls {
                endpoint: ep(),
                reason: "unknown CA".into(),
            },
            ClientError::Endpoint("http://x".parse::<crate::Endpoint>().unwrap_err()),
        ];
        for e in give_up {
            assert!(!e.is_retryable(), "{e}");
        }
    }
}
