//! # idalloc
//!
//! The `idallocd` daemon: dense `u64` id allocation (vertex ids and edge ids) for
//! a graph database and its forks. Writers do not link this crate: they depend on
//! `idalloc-client` (`crates/idalloc-client`), which holds the wire protocol and
//! the client library and brings none of the daemon's dependencies; the CLI,
//! `idallocctl`, is its own package on top of it (`crates/idallocctl`).
//!
//! A tour of the modules:
//!
//! - The wire protocol, the client and the types both sides share (`ForkId`,
//!   `Kind`, `ServiceError`, ...) are `idalloc-client`'s, and are named by their
//!   paths there (`idalloc_client::protocol::…`): one name for one thing.
//! - [`engine`]: the allocator itself — sled grants with group commit,
//!   object-store leases, forks, recovery. It holds the invariants of `DESIGN.md`.
//! - [`server`]: the daemon around the engine — config, listeners, the tarpc
//!   service, systemd notifications, metrics, graceful shutdown.

#![warn(missing_docs)]

pub mod engine;
pub mod server;
