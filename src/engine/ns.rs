//! One namespace (the primary or a fork) as the engine holds it in memory.
//!
//! Invariant protected: *unique* (1). Both counters of a namespace sit behind one
//! short std mutex (never held across an await), and every object-store operation
//! on the namespace's manifest is serialised by one async mutex, so at most one
//! lease write per namespace is in flight from this daemon and leases are installed
//! in the order they were won. *Never guess* (8): a namespace serves nothing, and
//! reports nothing, until it has been verified against its manifest; `stale`
//! (local counters that may be behind the store) survives restarts until then.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use idalloc_client::fork_id::ForkId;
use idalloc_client::namespace::{Kind, Namespace};
use idalloc_client::protocol::{CounterStatus, ForkInfo, Hwm, NamespaceStatus};

use super::counter::Counter;
use super::local::{ns_key, NsRecord, Snapshot};
use super::store::manifest::{path_for, ForkMeta};
use super::store::Versioned;

/// The mutable part of a namespace.
#[derive(Debug, Clone)]
pub struct NsState {
    /// Parent, floors, tombstone.
    pub meta: ForkMeta,
    /// vid and eid counters, indexed by [`Kind::index`].
    pub counters: [Counter; 2],
    /// The counters may be behind what was granted (local state not trusted at
    /// start-up): the next verification moves them above the manifest's ceiling
    /// instead of trusting them. Persisted, so a crash before that keeps it.
    pub stale: bool,
}

/// What this daemon last knew of the namespace's manifest.
#[derive(Default)]
pub struct CeilingState {
    /// The manifest and version from our last read or winning write; `None` when
    /// unknown (never read, or a write's outcome was ambiguous).
    pub cached: Option<Versioned>,
    /// The last failed lease attempt, to fail fast for a while during an outage.
    pub last_failure: Option<(Instant, String)>,
    /// Leases of this namespace are `lease_size << lease_growth` ids: raised by one
    /// after a lease that lost races to other daemons, lowered by one after a few
    /// leases in a row won at the first try (at most
    /// [`super::lease::MAX_LEASE_GROWTH`]).
    pub lease_growth: u32,
    /// Leases won at the first try in a row since the size last changed.
    pub clean_wins: u32,
    /// Per kind: leases are further `<< rate_growth` ids while they run out
    /// faster than `lease_min_life` (at most [`super::lease::MAX_RATE_GROWTH`]).
    pub rate_growth: [u32; 2],
    /// Per kind: when the last lease was won (in this process).
    pub last_lease_at: [Option<Instant>; 2],
    /// What this daemon's lease record of the namespace last said, in this life
    /// (`lease_record`): records written later never say less.
    pub recorded: Option<[u64; 2]>,
}

/// A namespace.
pub struct NsEntry {
    /// The namespace (its identity; for the spelling in paths see [`NsEntry::fork`]).
    pub ns: Namespace,
    /// A fork's id in the text form its manifest lives under. It can change once,
    /// at verification, when a fork's creation claim names the other spelling.
    spelling: Mutex<Option<ForkId>>,
    /// The last "cannot be parsed" error logged for this namespace, so a broken
    /// manifest is logged once per change, not once per call.
    pub broken: Mutex<Option<String>>,
    /// The nonce of the bootstrap request that created this fork here, so a retry
    /// of that request is still told `created: true`.
    pub created_by: Mutex<Option<String>>,
    /// sled key of its record.
    pub key: Vec<u8>,
    /// Counters and fork metadata.
    pub state: Mutex<NsState>,
    /// Serialises manifest reads and writes for this namespace.
    pub ceiling: tokio::sync::Mutex<CeilingState>,
    /// Whether the manifest has been checked against local state since start.
    pub verified: AtomicBool,
    /// Whether a background lease is being taken, per kind.
    pub prefetching: [AtomicBool; 2],
    /// Size of the last lease won, per kind (0 until one is): the next lease is
    /// taken in the background once `prefetch_at` of this much is used.
    pub lease_len: [AtomicU64; 2],
}

impl NsEntry {
    /// A namespace entry with the given state.
    pub fn new(ns: Namespace, state: NsState, verified: bool) -> Arc<NsEntry> {
        Arc::new(NsEntry {
            ns,
            spelling: Mutex::new(ns.fork()),
            broken: Mutex::new(None),
            created_by: Mutex::new(None),
            key: ns_key(ns.fork().map(|f| f.value())),
            state: Mutex::new(state),
            ceiling: tokio::sync::Mutex::new(CeilingState::default()),
            verified: AtomicBool::new(verified),
            prefetching: [AtomicBool::new(false), AtomicBool::new(false)],
            lease_len: [AtomicU64::new(0), AtomicU64::new(0)],
        })
    }

    /// Rebuild from a sled record.
    pub fn from_record(rec: NsRecord) -> Result<Arc<NsEntry>, String> {
        let ns = match &rec.fork {
            None => Namespace::Primary,
            Some(text) => Namespace::Fork(ForkId::parse(text).map_err(|e| e.to_string())?),
        };
        Ok(NsEntry::new(
            ns,
            NsState {
                meta: rec.meta,
                counters: rec.counters,
                stale: rec.stale,
            },
            false,
        ))
    }

    /// The fork id, if a fork, in the spelling its manifest lives under.
    pub fn fork(&self) -> Option<ForkId> {
        *self.spelling.lock().unwrap()
    }

    /// Use `id`'s spelling from now on (the value is the same fork).
    pub fn set_spelling(&self, id: ForkId) {
        debug_assert_eq!(self.ns.fork(), Some(id));
        *self.spelling.lock().unwrap() = Some(id);
    }

    /// Object-store path of the manifest.
    pub fn path(&self) -> object_store::path::Path {
        match self.fork() {
            Some(f) => path_for(&Namespace::Fork(f)),
            None => path_for(&Namespace::Primary),
        }
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> NsState {
        self.state.lock().unwrap().clone()
    }

    /// A closure the committer calls to serialise the latest state.
    pub fn persist_fn(self: &Arc<Self>) -> Snapshot {
        let me = self.clone();
        Arc::new(move || {
            let st = me.snapshot();
            let rec = NsRecord {
                fork: me.fork().map(|f| f.text()),
                meta: st.meta,
                counters: st.counters,
                stale: st.stale,
            };
            serde_json::to_vec(&rec).expect("record serialises")
        })
    }

    /// The error a reservation in this retired fork (dropped or merged) answers.
    pub fn retired_error(&self) -> idalloc_client::error::ServiceError {
        let fork = self.fork().map(|f| f.text()).unwrap_or_default();
        let st = self.state.lock().unwrap();
        match &st.meta.merged_into {
            Some(into) => idalloc_client::error::ServiceError::MergedFork {
                fork,
                into: into.clone(),
            },
            None => idalloc_client::error::ServiceError::DroppedFork(fork),
        }
    }

    /// High-water marks.
    pub fn hwm(&self) -> Hwm {
        let st = self.snapshot();
        Hwm {
            fork: self.fork().map(|f| f.text()),
            next_vid: st.counters[Kind::Vid.index()].granted,
            next_eid: st.counters[Kind::Eid.index()].granted,
            root_wide: false,
        }
    }

    /// Fork info (`created` is set by the caller).
    pub fn info(&self, created: bool) -> ForkInfo {
        let st = self.snapshot();
        ForkInfo {
            fork: self.fork().map(|f| f.text()).unwrap_or_default(),
            parent: st.meta.parent.clone(),
            next_vid: st.counters[0].granted,
            next_eid: st.counters[1].granted,
            floor_vid: st.meta.floor_vid,
            floor_eid: st.meta.floor_eid,
            created,
            dropped: st.meta.dropped,
            merged_into: st.meta.merged_into.clone(),
            error: None,
        }
    }

    /// Fork info for a fork that could not be verified: no numbers, the reason.
    pub fn unverified_info(&self, error: String) -> ForkInfo {
        let st = self.snapshot();
        ForkInfo {
            fork: self.fork().map(|f| f.text()).unwrap_or_default(),
            parent: st.meta.parent.clone(),
            next_vid: 0,
            next_eid: 0,
            floor_vid: st.meta.floor_vid,
            floor_eid: st.meta.floor_eid,
            created: false,
            dropped: st.meta.dropped,
            merged_into: st.meta.merged_into.clone(),
            error: Some(error),
        }
    }

    /// Status line of this namespace; `error` when it could not be verified (its
    /// counters are then left out).
    pub fn status(&self, error: Option<String>) -> NamespaceStatus {
        let st = self.snapshot();
        NamespaceStatus {
            fork: self.fork().map(|f| f.text()),
            dropped: st.meta.dropped,
            merged_into: st.meta.merged_into.clone(),
            counters: if error.is_some() {
                vec![]
            } else {
                Kind::ALL
                    .iter()
                    .map(|k| {
                        let c = st.counters[k.index()];
                        CounterStatus {
                            kind: *k,
                            granted: c.granted,
                            lease_start: c.lease_start,
                            lease_end: c.owned_end(),
                            headroom: c.headroom(),
                        }
                    })
                    .collect()
            },
            error,
        }
    }
}
