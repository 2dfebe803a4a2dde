//! The client library: what a writer links to talk to `idallocd`.
//!
//! - [`Client`] (`connection`, `wire`): one connection speaking tarpc's protocol,
//!   rebuilt with capped exponential backoff when the daemon restarts; per-call
//!   deadlines; transparent
//!   retries of `Unavailable` / `ShuttingDown` / a broken connection, none of which
//!   can hand an id out twice (a lost reply is a gap, never a duplicate).
//! - [`Allocator`] (`allocator`, `cache`): per-namespace id allocation with the
//!   reference allocator's method names, served from a lock-free cache of reserved
//!   ranges with background prefetch and adaptive batch size.
//! - [`RangeSource`] (`source`): where an allocator gets ranges — the daemon, or
//!   [`LocalSource`] for tests and benchmarks.
//! - [`ClientError`] (`error`): the daemon's typed [`ServiceError`](crate::ServiceError)
//!   or the client's own failure.
//!
//! Forks are named by a [`ForkId`] (`allocator_for`, `reserve_for`, `hwm_for`,
//! `checkpoint_for`) or by its text (`allocator`, `reserve`, `hwm`, `checkpoint`,
//! which the daemon parses); `None` is the primary in both.
//!
//! ```no_run
//! # async fn demo() -> Result<(), idalloc_client::client::ClientError> {
//! use idalloc_client::client::Client;
//! let client = Client::connect("unix:/run/idallocd/idallocd.sock").await?;
//! let ids = client.allocator_for(None);
//! let v = ids.allocate_vid().await?;
//! let edges = ids.allocate_eids(100).await?;
//! # let _ = (v, edges); Ok(()) }
//! ```

mod allocator;
mod cache;
mod connection;
mod error;
mod source;
mod wire;

use std::path::PathBuf;
use std::sync::Arc;

pub use allocator::Allocator;
pub use cache::{AllocatorConfig, CacheStats};
pub use connection::{Client, ClientConfig, IntoEndpoint};
pub use error::ClientError;
pub use source::{ClientSource, LocalSource, RangeSource};

use crate::endpoint::Endpoint;
use crate::fork_id::ForkId;

/// File name of the daemon's unix socket inside its runtime (or data) directory.
pub const SOCKET_FILE_NAME: &str = "idallocd.sock";

/// The daemon's embedded default data directory when systemd gives none.
pub const DEFAULT_DATA_DIR: &str = "./idallocd-data";

impl Client {
    /// An [`Allocator`] for the primary (`fork = None`) or one fork, with the default
    /// [`AllocatorConfig`]. Call inside a Tokio runtime.
    pub fn allocator(&self, fork: Option<&str>) -> Allocator {
        self.allocator_with(fork, AllocatorConfig::default())
    }

    /// [`Client::allocator`] with explicit batch sizing.
    pub fn allocator_with(&self, fork: Option<&str>, config: AllocatorConfig) -> Allocator {
        let source = ClientSource::new(self.clone(), fork.map(str::to_owned));
        Allocator::new(Arc::new(source), config)
    }

    /// An [`Allocator`] for the primary (`None`) or the fork `Some(id)`, with the
    /// default [`AllocatorConfig`]. The fork is named on the wire in the text form
    /// `id` was written in. Call inside a Tokio runtime.
    pub fn allocator_for(&self, fork: Option<ForkId>) -> Allocator {
        self.allocator_for_with(fork, AllocatorConfig::default())
    }

    /// [`Client::allocator_for`] with explicit batch sizing.
    pub fn allocator_for_with(&self, fork: Option<ForkId>, config: AllocatorConfig) -> Allocator {
        let source = ClientSource::for_fork(self.clone(), fork);
        Allocator::new(Arc::new(source), config)
    }
}

/// The endpoint `idallocd` listens on when run with its embedded defaults, as
/// DESIGN.md fixes it: `$RUNTIME_DIRECTORY/idallocd.sock` under systemd, else the
/// socket in the data directory (`$STATE_DIRECTORY`, else `./idallocd-data`).
pub fn default_endpoint() -> Endpoint {
    default_endpoint_from(
        std::env::var_os("RUNTIME_DIRECTORY").map(PathBuf::from),
        std::env::var_os("STATE_DIRECTORY").map(PathBuf::from),
    )
}

/// [`default_endpoint`] from given values of `RUNTIME_DIRECTORY` / `STATE_DIRECTORY`.
/// systemd separates several directories with `:`; the first is the daemon's.
pub fn default_endpoint_from(runtime_dir: Option<PathBuf>, state_dir: Option<PathBuf>) -> Endpoint {
    let first = |p: PathBuf| -> Option<PathBuf> {
        let s = p
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or("")
            .to_string();
        (!s.is_empty()).then(|| PathBuf::from(s))
    };
    let dir = runtime_dir
        .and_then(first)
        .or_else(|| state_dir.and_then(first))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    Endpoint::Unix(dir.join(SOCKET_FILE_NAME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_endpoint_follows_systemd_directories() {
        assert_eq!(
            default_endpoint_from(None, None).to_string(),
            "unix:./idallocd-data/idallocd.sock"
        );
        assert_eq!(
            default_endpoint_from(
                Some("/run/idallocd".into()),
                Some("/var/lib/idallocd".into())
            )
            .to_string(),
            "unix:/run/idallocd/idallocd.sock"
        );
        assert_eq!(
            default_endpoint_from(None, Some("/var/lib/idallocd".into())).to_string(),
            "unix:/var/lib/idallocd/idallocd.sock"
        );
        assert_eq!(
            default_endpoint_from(Some("/run/a:/run/b".into()), None).to_string(),
            "unix:/run/a/idallocd.sock"
        );
    }
}
