//! # idalloc
//!
//! Dense `u64` id allocation (vertex ids and edge ids) for a graph database and its
//! forks, served by a local daemon (`idallocd`) to writers that link this crate.
//!
//! A tour of the modules:
//!
//! - [`fork_id`], [`namespace`]: what a counter is addressed by — the primary or a
//!   fork (128-bit id, UUID or ULID text) and a kind (vid, eid).
//! - [`protocol`], [`error`]: the tarpc service and the types on the wire, shared by
//!   server and client; one typed error enum a client can act on.
//! - [`endpoint`]: `unix:PATH` / `tcp:HOST:PORT` addresses.
//! - `engine` (feature `server`): the allocator itself — sled grants with group
//!   commit, object-store leases, forks, recovery. It holds the invariants of
//!   `DESIGN.md`.
//! - `faults` (feature `server`): a fault-injecting `ObjectStore` wrapper for tests.
//! - `server` (feature `server`): the daemon around the engine — config, listeners,
//!   the tarpc service, systemd notifications, metrics, graceful shutdown.
//!
//! - [`client`]: the client library — [`client::Client`] (reconnects, deadlines,
//!   retries) and [`client::Allocator`] (lock-free cached, prefetched ranges). It
//!   builds without the `server` feature.
//!
//! The daemon's service layer builds on these.

#![warn(missing_docs)]

pub mod client;
pub mod endpoint;
pub mod error;
pub mod fork_id;
pub mod namespace;
pub mod protocol;

#[cfg(feature = "server")]
pub mod engine;
#[cfg(feature = "server")]
pub mod faults;
#[cfg(feature = "server")]
pub mod server;

pub use endpoint::Endpoint;
pub use error::ServiceError;
pub use fork_id::{ForkId, IdForm};
pub use namespace::{Kind, Namespace};
pub use protocol::IdRange;
