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
//! One method per operation. A namespace is anything that converts into a
//! [`Namespace`](crate::Namespace): `Namespace::Primary`, a [`ForkId`](crate::ForkId)
//! or an `Option<ForkId>` (`None` is the primary); fork ids given as text are
//! parsed first (`ForkId::parse`, or `str::parse`), so a malformed one fails in
//! the caller, before any call.
//!
//! ```no_run
//! # async fn demo() -> Result<(), idalloc_client::client::ClientError> {
//! use idalloc_client::client::Client;
//! use idalloc_client::Namespace;
//! let client = Client::connect("unix:/run/idallocd/idallocd.sock").await?;
//! let ids = client.allocator(Namespace::Primary);
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

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use allocator::Allocator;
pub use cache::{AllocatorConfig, CacheStats};
pub use connection::{Client, ClientConfig, IntoEndpoint};
pub use error::ClientError;
pub use source::{ClientSource, LocalSource, RangeSource};

use crate::endpoint::Endpoint;
use crate::namespace::Namespace;

/// File name of the daemon's unix socket inside its runtime (or data) directory.
pub const SOCKET_FILE_NAME: &str = "idallocd.sock";

/// The daemon's embedded default data directory when systemd gives none.
pub const DEFAULT_DATA_DIR: &str = "./idallocd-data";

impl Client {
    /// An [`Allocator`] for a namespace ([`Namespace::Primary`], a [`ForkId`](crate::ForkId), or an
    /// `Option<ForkId>`), with the default [`AllocatorConfig`]. A fork is named on
    /// the wire in the text form its id was written in. Call inside a Tokio runtime.
    pub fn allocator(&self, namespace: impl Into<Namespace>) -> Allocator {
        self.allocator_with(namespace, AllocatorConfig::default())
    }

    /// [`Client::allocator`] with explicit batch sizing.
    pub fn allocator_with(
        &self,
        namespace: impl Into<Namespace>,
        config: AllocatorConfig,
    ) -> Allocator {
        let source = ClientSource::new(self.clone(), namespace);
        Allocator::new(Arc::new(source), config)
    }
}

/// Where the packaged units put the system daemon's socket (`idallocd.socket`).
/// The daemon of instance `NAME` (`idallocd@NAME.socket`, one per database) listens
/// on `/run/idallocd/NAME/idallocd.sock` instead: [`system_endpoint`].
pub const SYSTEM_SOCKET: &str = "/run/idallocd/idallocd.sock";

/// The socket of the system daemon (`None`: `idallocd.service`) or of the instance
/// `idallocd@NAME.service` (`Some(NAME)`), as the shipped socket units name them.
pub fn system_endpoint(instance: Option<&str>) -> Endpoint {
    match instance {
        None => Endpoint::Unix(PathBuf::from(SYSTEM_SOCKET)),
        Some(name) => Endpoint::Unix(Path::new("/run/idallocd").join(name).join(SOCKET_FILE_NAME)),
    }
}

/// The endpoint a client uses when none is given (the CLI checks `--endpoint` and
/// `IDALLOC_ENDPOINT` before this), first that applies:
///
/// 1. `$RUNTIME_DIRECTORY/idallocd.sock`, then `$STATE_DIRECTORY/idallocd.sock`:
///    inside a systemd unit those are where the unit's own daemon listens with its
///    embedded defaults (DESIGN.md);
/// 2. `./idallocd-data/idallocd.sock` if it exists: a daemon started with no
///    arguments in the current directory;
/// 3. [`SYSTEM_SOCKET`], the packaged `idallocd.socket`'s: from a login shell on a
///    host that runs the daemon under systemd, as `redis-cli` and `psql` find theirs.
pub fn default_endpoint() -> Endpoint {
    default_endpoint_from(
        std::env::var_os("RUNTIME_DIRECTORY").map(PathBuf::from),
        std::env::var_os("STATE_DIRECTORY").map(PathBuf::from),
        Path::new(DEFAULT_DATA_DIR).join(SOCKET_FILE_NAME).exists(),
    )
}

/// [`default_endpoint`] from given values of `RUNTIME_DIRECTORY` / `STATE_DIRECTORY`
/// and of whether `./idallocd-data/idallocd.sock` exists. systemd separates several
/// directories with `:`; the first is the daemon's.
pub fn default_endpoint_from(
    runtime_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    local_socket_exists: bool,
) -> Endpoint {
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
        .or_else(|| local_socket_exists.then(|| PathBuf::from(DEFAULT_DATA_DIR)));
    match dir {
        Some(dir) => Endpoint::Unix(dir.join(SOCKET_FILE_NAME)),
        None => system_endpoint(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_endpoint_follows_systemd_directories() {
        for local in [false, true] {
            assert_eq!(
                default_endpoint_from(
                    Some("/run/idallocd".into()),
                    Some("/var/lib/idallocd".into()),
                    local
                )
                .to_string(),
                "unix:/run/idallocd/idallocd.sock"
            );
            assert_eq!(
                default_endpoint_from(None, Some("/var/lib/idallocd".into()), local).to_string(),
                "unix:/var/lib/idallocd/idallocd.sock"
            );
            assert_eq!(
                default_endpoint_from(Some("/run/a:/run/b".into()), None, local).to_string(),
                "unix:/run/a/idallocd.sock"
            );
        }
    }

    #[test]
    fn default_endpoint_is_the_local_socket_then_the_system_one() {
        assert_eq!(
            default_endpoint_from(None, None, true).to_string(),
            "unix:./idallocd-data/idallocd.sock"
        );
        assert_eq!(
            default_endpoint_from(None, None, false).to_string(),
            "unix:/run/idallocd/idallocd.sock"
        );
        assert_eq!(
            default_endpoint_from(Some("".into()), None, false).to_string(),
            "unix:/run/idallocd/idallocd.sock"
        );
        assert_eq!(
            system_endpoint(Some("db1")).to_string(),
            "unix:/run/idallocd/db1/idallocd.sock"
        );
    }
}
