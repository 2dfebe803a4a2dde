//! The allocation engine: sled grants, object-store leases, forks and recovery.
//!
//! SKELETON: the bodies are being written; signatures are the contract.

mod config;
pub mod store;

use std::sync::Arc;

pub use config::EngineConfig;
pub use store::StoreHandle;

use crate::error::ServiceError;
use crate::fork_id::ForkId;
use crate::namespace::{Kind, Namespace};
use crate::protocol::{ForkInfo, ForkPage, Hwm, IdRange, Status, WriterMode};

/// Why the engine could not start. Each message names the object or value at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The object-store URL or its options are wrong.
    #[error("object store configuration: {0}")]
    StoreConfig(String),
    /// The object store could not be reached and there is no usable local lease.
    #[error("object store unreachable at start-up and no usable local lease: {0}")]
    StoreUnreachable(String),
    /// A manifest exists but cannot be parsed; nothing is guessed.
    #[error("manifest {path} cannot be parsed: {reason}; fix or remove it by hand (idalloc never guesses a counter)")]
    CorruptManifest {
        /// Object-store path of the manifest.
        path: String,
        /// Parser message.
        reason: String,
    },
    /// The local data directory cannot be used.
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// Another daemon holds the data directory.
    #[error("data directory {0} is locked by another idallocd process")]
    Locked(String),
}

/// The allocator. Cheap to share behind an `Arc`; every method is safe to call
/// concurrently.
pub struct Engine {
    _private: (),
}

impl Engine {
    /// Recover local state, reconcile it with the object store, and get ready to serve.
    pub async fn open(config: EngineConfig, store: StoreHandle) -> Result<Arc<Engine>, OpenError> {
        let _ = (config, store);
        todo!("engine open")
    }

    /// Reserve `count` consecutive ids; durable (sled flushed, below the ceiling) on return.
    pub async fn reserve(
        &self,
        ns: Namespace,
        kind: Kind,
        count: u64,
    ) -> Result<IdRange, ServiceError> {
        let _ = (ns, kind, count);
        todo!()
    }

    /// The next ids this daemon would grant in `ns`.
    pub async fn hwm(&self, ns: Namespace) -> Result<Hwm, ServiceError> {
        let _ = ns;
        todo!()
    }

    /// Create `fork` above `max(floor, parent's HWM)`, or return the existing fork.
    pub async fn bootstrap_fork(
        &self,
        fork: ForkId,
        parent: Option<ForkId>,
        vid_floor: u64,
        eid_floor: u64,
    ) -> Result<ForkInfo, ServiceError> {
        let _ = (fork, parent, vid_floor, eid_floor);
        todo!()
    }

    /// Forks known to this daemon, in id order, after `after`, at most `limit`.
    pub fn list_forks(&self, after: Option<ForkId>, limit: usize) -> ForkPage {
        let _ = (after, limit);
        todo!()
    }

    /// Tombstone a fork: later reservations in it fail with `DroppedFork`.
    pub async fn drop_fork(&self, fork: ForkId) -> Result<ForkInfo, ServiceError> {
        let _ = fork;
        todo!()
    }

    /// Release the unused lease of `ns` and lower its manifest to what was granted,
    /// where the conditional write proves nobody else moved it.
    pub async fn checkpoint(&self, ns: Namespace) -> Result<Hwm, ServiceError> {
        let _ = ns;
        todo!()
    }

    /// Version, mode, mirror health, per-namespace counters.
    pub fn status(&self) -> Status {
        todo!()
    }

    /// Single- or multi-writer.
    pub fn mode(&self) -> WriterMode {
        todo!()
    }

    /// Clean shutdown: refuse new reservations (`ShuttingDown`), wait for those in
    /// flight, checkpoint every namespace, mark the shutdown clean and flush.
    pub async fn shutdown(&self) -> Result<(), ServiceError> {
        todo!()
    }
}
