//! The error every operation of the service can return, on the wire and in-process.
//!
//! Expected outcomes a caller can act on each have their own variant, so that a
//! client can retry `Unavailable`, stop on `DroppedFork`, and fix its request on
//! `InvalidArgument`, without parsing messages. Messages say what was wrong and
//! what to do.

use serde::{Deserialize, Serialize};

/// An error returned by the allocation service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The request itself is wrong (count of 0, count above the maximum, malformed
    /// fork id, ...). Retrying the same request will fail the same way.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The fork is not known to this daemon nor present in the object store.
    #[error("unknown fork {0}: bootstrap it first (idallocctl fork bootstrap {0})")]
    UnknownFork(String),
    /// The fork was dropped; its ids are retired and are never handed out again.
    #[error("fork {0} was dropped: its ids are retired; bootstrap a new fork instead")]
    DroppedFork(String),
    /// The counter cannot satisfy the request without overflowing `u64`.
    #[error("exhausted: {0}")]
    Exhausted(String),
    /// The object store (or local disk) cannot be reached right now; retry after the
    /// hint. Nothing was reserved.
    #[error("unavailable: {message} (retry in {retry_after_ms} ms)")]
    Unavailable {
        /// What failed.
        message: String,
        /// How long the caller should wait before retrying.
        retry_after_ms: u64,
    },
    /// The daemon is shutting down and takes no new reservations.
    #[error("shutting down: the daemon is stopping; retry against its successor")]
    ShuttingDown,
    /// A bug or an unexpected local failure; the message says what happened.
    #[error("internal error: {0}")]
    Internal(String),
    /// A manifest (or fork claim) of this namespace exists but cannot be parsed:
    /// the namespace is unavailable until an operator repairs it with an explicit
    /// floor. Other namespaces keep serving. Nothing is guessed.
    #[error("{0}")]
    BrokenManifest(String),
    /// This connection's role may not do this (`checkpoint`, `fork drop` and
    /// `repair` need the admin role). Nothing was changed.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The fork was merged into an ancestor; its ids are retired, and its writers
    /// write to the namespace it was merged into.
    #[error("fork {fork} was merged into {into}: its ids are retired; write to {into} instead")]
    MergedFork {
        /// The merged fork.
        fork: String,
        /// Where it was merged: a fork id's text or `primary`.
        into: String,
    },
}

impl ServiceError {
    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ServiceError::Unavailable { .. } | ServiceError::ShuttingDown
        )
    }

    /// Shorthand for an `Unavailable` error.
    pub fn unavailable(message: impl Into<String>, retry_after_ms: u64) -> Self {
        ServiceError::Unavailable {
            message: message.into(),
            retry_after_ms,
        }
    }
}
