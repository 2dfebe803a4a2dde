//! # idalloc-client
//!
//! The client library of `idallocd`, the daemon that hands out dense `u64` vertex
//! ids (vids) and edge ids (eids) to the writers of a graph database and of its
//! forks, and the wire protocol it speaks. A writer depends on this crate alone: it
//! brings no storage engine, no CLI and no metrics.
//!
//! ```no_run
//! use idalloc_client::protocol::BootstrapRequest;
//! use idalloc_client::{Client, ClientConfig, ForkId, Namespace};
//! use std::time::Duration;
//!
//! # async fn demo() -> Result<(), idalloc_client::ClientError> {
//! let config = ClientConfig::default().with_deadline(Duration::from_secs(5));
//! let client = Client::connect_with("unix:/run/idallocd/idallocd.sock", config).await?;
//!
//! // The primary: ids come from a local cache of reserved ranges.
//! let ids = client.allocator(Namespace::Primary);
//! let v = ids.allocate_vid().await?;
//! let vs = ids.allocate_vids(500).await?; // a Range<u64>
//! let e = ids.allocate_eid().await?;
//! let es = ids.allocate_eids(100).await?;
//!
//! // A fork: bootstrapped above the primary's high-water mark (idempotent).
//! let fork = ForkId::generate();
//! let info = client.bootstrap_fork(BootstrapRequest::new(fork)).await?;
//! println!("fork {} starts at vid {}", info.fork, info.next_vid);
//! let in_fork = client.allocator(fork);
//! let fv = in_fork.allocate_vid().await?;
//! # let _ = (v, e, es, fv); Ok(()) }
//! ```
//!
//! # Modules
//!
//! - [`client`]: [`Client`] (one connection, reconnects with backoff, a deadline on
//!   every call, retries of what may be retried) and [`Allocator`] (per-namespace
//!   allocation from lock-free cached, prefetched ranges, with the reference
//!   allocator's method names).
//! - [`protocol`], [`error`]: the tarpc service and the types on the wire, shared with
//!   the daemon; [`ServiceError`] is the typed error a caller can act on.
//! - [`fork_id`], [`namespace`]: what a counter is addressed by — the primary or a
//!   fork ([`ForkId`]: 128 bits, UUID or ULID text) and a [`Kind`] (vid, eid).
//! - [`endpoint`]: `unix:PATH` / `tcp:HOST:PORT` / `tls:HOST:PORT` addresses;
//!   [`tls`]: the CA and client certificate a `tls:` endpoint needs.
//!
//! # Cancellation safety
//!
//! Every future of this crate may be dropped at any point (a `select!`, a
//! time-out, a task aborted). A dropped call leaves a *gap*, never a duplicate: a
//! reservation the daemon made but whose reply never reached its caller is
//! durable on the daemon and is never handed out again, to anyone — its ids are
//! simply unused. The same holds for a call that fails with a deadline or a lost
//! connection, and for the ids still cached in an [`Allocator`] when it is dropped
//! or the process exits. A retry, by the library or by the caller, is always a new
//! reservation. `bootstrap_fork` is idempotent (a dropped call may or may not have
//! created the fork; calling again returns it), and `drop_fork` is irreversible
//! whether or not its caller saw the reply.

#![warn(missing_docs)]

pub mod client;
pub mod endpoint;
pub mod error;
pub mod fork_id;
pub mod namespace;
pub mod protocol;
pub mod tls;
// The daemon accepts its unix connections with the same readiness trick the
// client dials with; it is shared through `daemon-internals`, not offered to
// writers.
#[cfg(feature = "daemon-internals")]
#[doc(hidden)]
pub mod unix_conn;
#[cfg(not(feature = "daemon-internals"))]
mod unix_conn;

// The README's "get ids in your writer" program is compiled as a doc test
// (`cargo test --doc -p idalloc-client`), so the code a writer copies cannot rot.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

pub use client::{Allocator, AllocatorConfig, Client, ClientConfig, ClientError};
pub use endpoint::Endpoint;
pub use error::ServiceError;
pub use fork_id::{ForkId, IdForm};
pub use namespace::{Kind, Namespace};
pub use protocol::IdRange;
pub use tls::TlsFiles;
