//! # idalloc
//!
//! The `idallocd` daemon and the `idallocctl` CLI: dense `u64` id allocation
//! (vertex ids and edge ids) for a graph database and its forks. Writers do not
//! link this crate: they depend on `idalloc-client` (`crates/idalloc-client`),
//! which holds the wire protocol and the client library and brings none of the
//! daemon's dependencies.
//!
//! A tour of the modules:
//!
//! - [`fork_id`], [`namespace`], [`endpoint`], [`protocol`], [`error`], [`client`]:
//!   re-exported from `idalloc-client` under the same paths, so the daemon, the
//!   CLI and the tests name them as `idalloc::protocol::…`, `idalloc::client::…`.
//! - `engine` (feature `server`): the allocator itself — sled grants with group
//!   commit, object-store leases, forks, recovery. It holds the invariants of
//!   `DESIGN.md`.
//! - `server` (feature `server`): the daemon around the engine — config, listeners,
//!   the tarpc service, systemd notifications, metrics, graceful shutdown.

#![warn(missing_docs)]

pub use idalloc_client::{client, endpoint, error, fork_id, namespace, protocol, tls};

#[cfg(feature = "server")]
pub mod engine;
#[cfg(feature = "server")]
pub mod server;

pub use endpoint::Endpoint;
pub use error::ServiceError;
pub use fork_id::{ForkId, IdForm};
pub use namespace::{Kind, Namespace};
pub use protocol::IdRange;
pub use tls::TlsFiles;
