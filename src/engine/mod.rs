//! The allocation engine: sled grants, object-store leases, forks and recovery.
//!
//! This is where the invariants of `DESIGN.md` live. The two tiers are folders:
//!
//! - `local/` (private): sled and the group committer (*durable before reply*),
//!   and the life mark, the durable "this life is not clean" mark (trust rule).
//! - [`store`]: the object-store tier, which holds the authoritative ceilings —
//!   the [`store::CeilingStore`] with time-outs, retries and conditional writes
//!   (*never guess*; leases owned only once written), building a store from a URL
//!   and redacting it, the reference-compatible manifests, every daemon's lease
//!   records, the lock of a `file://` root, and the probe of a store's conditional
//!   writes.
//!
//! Between them, the engine itself:
//!
//! - [`counter`]: taking ids out of a lease (unique, ordered, no overflow).
//! - `ns` (private): one namespace in memory.
//! - `lease`, `verify`, `forks`, `recovery`, `repair` (private): taking and giving
//!   back leases (rule 9), checking a namespace against the store before it
//!   serves, fork bootstrap (claims) and drop, start-up reconciliation and clean
//!   shutdown, and the operator's explicit floor for a broken manifest.
//! - `tree`, `merge` (private): tree-unique fork ids (every namespace leasing
//!   from the primary's manifest; the root's recorded mode) and `fork merge` (the
//!   target never grants an id the merged fork granted).
//!
//! A reservation takes ids from the lease under a short lock, then waits for the
//! group commit; only when the lease is short does it wait on the object store, and
//! a background task usually takes the next lease before that happens.

mod config;
pub mod counter;
mod forks;
mod lease;
mod local;
mod merge;
mod ns;
mod recovery;
mod repair;
pub mod store;
mod tree;
mod verify;

use std::collections::BTreeMap;

use futures::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Instant;

pub use config::EngineConfig;
pub use forks::FloorAuthority;
pub use store::StoreHandle;

use idalloc_client::error::ServiceError;
use idalloc_client::fork_id::ForkId;
use idalloc_client::namespace::{Kind, Namespace};
use idalloc_client::protocol::{ForkInfo, ForkPage, Hwm, IdRange, Status, WriterMode};

use counter::TakeError;
use local::Local;
use ns::NsEntry;
use store::{CeilingStore, StoreError};

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
    #[error("manifest {path} cannot be parsed: {reason}; idalloc never guesses a counter: write an explicit floor with `idallocctl repair` (deleting the manifest would reset the counter)")]
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
    #[error(
        "data directory {0} is locked by another idallocd process (one daemon per data directory)"
    )]
    Locked(String),
    /// Another daemon holds the `file://` object-store root.
    #[error("object store root {root} is in use by another idallocd ({holder}): a file:// root takes one daemon; give this one its own root, or use a multi-writer store (s3://, gs://, az://)")]
    RootLocked {
        /// The root directory.
        root: String,
        /// What the holder wrote in the lock file (pid, data directory).
        holder: String,
    },
    /// A setting is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The store failed the start-up probe of its conditional writes.
    #[error("{0}; refusing multi-writer mode on it (ids would be handed out twice). Run `idallocd store-check` for the full probe; set [object_store] startup_check = false only for a store you have checked otherwise")]
    UnsafeStore(String),
}

impl From<StoreError> for OpenError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt { path, reason } => OpenError::CorruptManifest { path, reason },
            StoreError::Unavailable(m) => OpenError::StoreUnreachable(m),
            e @ StoreError::Refused { .. } => OpenError::StoreUnreachable(e.to_string()),
        }
    }
}

/// The allocator. Share it behind the `Arc` that [`Engine::open`] returns; every
/// method is safe to call concurrently.
///
/// Drive it from one tokio runtime, multi-thread (as idallocd does) or
/// current-thread, for its whole life. Each group of reservations is flushed by a
/// task spawned on the runtime of the commit that opened the group, which blocks
/// that worker thread for the flush (src/engine/local/mod.rs); a commit made from
/// another runtime meanwhile waits for that task, so a runtime left undriven
/// would hold it up.
pub struct Engine {
    cfg: EngineConfig,
    local: Local,
    /// The object-store tier: the authoritative ceilings, which leases raise.
    store: CeilingStore,
    primary: Arc<NsEntry>,
    forks: RwLock<BTreeMap<ForkId, Arc<NsEntry>>>,
    /// Serialises fork creation and discovery, so one daemon never creates or adopts
    /// one fork twice.
    bootstrap_lock: tokio::sync::Mutex<()>,
    shutting_down: AtomicBool,
    in_flight: AtomicUsize,
    idle: tokio::sync::Notify,
    started: Instant,
    boot_id: String,
    /// This data directory's id: the name of its lease records in the root.
    daemon_id: String,
    /// Set once the root's recorded fork-id mode is known to be ours.
    mode_settled: tokio::sync::OnceCell<()>,
    /// Held for the engine's life on `file://` roots.
    _root_lock: Option<store::root_lock::RootLock>,
    /// Both tiers on one disk (the mirror is inside the data directory).
    shared_disk: bool,
    me: Weak<Engine>,
}

/// How long `status` and `fork list` wait for namespaces to be verified before
/// they report the rest as not verified yet (never their unverified numbers).
const REPORT_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

/// The warning for a mirror inside the data directory (the embedded default).
pub fn shared_disk_warning(url: &str) -> String {
    format!(
        "the object-store mirror {url} is inside the data directory: losing that disk loses the ceiling too and ids would be handed out again; set [object_store] url (or --object-store) to another disk or a bucket"
    )
}

/// Counts a call in flight, so that shutdown can wait for it.
struct InFlight<'a>(&'a Engine);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

fn store_err(e: StoreError, retry_after_ms: u64) -> ServiceError {
    match e {
        StoreError::Unavailable(m) => ServiceError::unavailable(m, retry_after_ms),
        StoreError::Corrupt { path, reason } => {
            ServiceError::BrokenManifest(broken_message(&path, &reason))
        }
        other => ServiceError::Internal(other.to_string()),
    }
}

/// The one line a broken manifest answers with: what is wrong, and the way out
/// that never lowers a counter.
fn broken_message(path: &str, reason: &str) -> String {
    let fork = path
        .strip_prefix(&format!("{}/", store::manifest::FORKS_DIR))
        .and_then(|rest| rest.split('/').next())
        .map(|f| format!("--fork {f} "))
        .unwrap_or_default();
    format!(
        "{path} cannot be parsed ({reason}): this namespace is unavailable until repaired (idalloc never guesses a counter; deleting the file would reset it). Repair: idallocctl repair {fork}--vid-floor N --eid-floor M, with N and M above the highest ids the database holds"
    )
}

impl Engine {
    /// Recover local state, reconcile it with the object store, and get ready to
    /// serve. See `recovery` for the rules.
    pub async fn open(config: EngineConfig, store: StoreHandle) -> Result<Arc<Engine>, OpenError> {
        recovery::open(config, store).await
    }

    fn enter(&self) -> Result<InFlight<'_>, ServiceError> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self);
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ServiceError::ShuttingDown);
        }
        Ok(guard)
    }

    fn retry_hint_ms(&self) -> u64 {
        self.cfg.unavailable_cooldown.as_millis().max(100) as u64
    }

    /// Make the namespace's latest state durable.
    async fn persist(&self, entry: &Arc<NsEntry>) -> Result<(), ServiceError> {
        self.local
            .commit(entry.key.clone(), entry.persist_fn())
            .await
            .map_err(ServiceError::Internal)
    }

    /// Reserve `count` consecutive ids; durable (sled flushed, below the ceiling) on
    /// return. Successive reservations in one namespace and kind are increasing.
    pub async fn reserve(
        &self,
        ns: Namespace,
        kind: Kind,
        count: u64,
    ) -> Result<IdRange, ServiceError> {
        if count == 0 {
            return Err(ServiceError::InvalidArgument(
                "count must be at least 1".to_string(),
            ));
        }
        if count > self.cfg.max_count {
            return Err(ServiceError::InvalidArgument(format!(
                "count {count} is above the maximum of {} per reservation; split it or raise allocation.max_count",
                self.cfg.max_count
            )));
        }
        let _guard = self.enter()?;
        // The hot path is a cached, verified entry and ids in the current lease.
        // The cold paths (loading a fork, verifying, taking a lease) are boxed so
        // their large state machines are not part of every reservation's future,
        // which tarpc moves and copies per request (docs/performance.md).
        let entry = match self.cached_entry(&ns) {
            Some(e) => e,
            None => Box::pin(self.entry(ns)).await?,
        };
        if !entry.verified.load(std::sync::atomic::Ordering::Acquire) {
            Box::pin(self.ensure_verified(&entry)).await?;
        }
        let k = kind.index();
        let range = loop {
            let taken = {
                let mut st = entry.state.lock().unwrap();
                if st.meta.retired() {
                    drop(st);
                    return Err(entry.retired_error());
                }
                st.counters[k].take(count)
            };
            match taken {
                Ok(r) => break r,
                Err(TakeError::Overflow) => {
                    let granted = entry.snapshot().counters[k].granted;
                    return Err(ServiceError::Exhausted(format!(
                        "{kind} counter of {} is at {granted}; {count} more would overflow u64",
                        entry.ns
                    )));
                }
                Err(TakeError::NeedLease) => Box::pin(self.lease(&entry, kind, count)).await?,
            }
        };
        self.maybe_prefetch(&entry, kind);
        self.persist(&entry).await?;
        let label = if entry.fork().is_some() {
            "fork"
        } else {
            "primary"
        };
        metrics::counter!("idalloc_reservations_total", "namespace" => label, "kind" => kind.as_str())
            .increment(1);
        metrics::counter!("idalloc_ids_granted_total", "namespace" => label, "kind" => kind.as_str())
            .increment(count);
        Ok(range)
    }

    /// The next ids this daemon would grant in `ns`, after verifying the namespace
    /// against the store. In multi-writer mode other daemons grant from their own
    /// leases: this is this daemon's next id, not the root's.
    pub async fn hwm(&self, ns: Namespace) -> Result<Hwm, ServiceError> {
        let entry = self.entry(ns).await?;
        self.ensure_verified(&entry).await?;
        Ok(self.hwm_of(&entry))
    }

    /// The namespace's HWM as a reply (`root_wide` from the writer mode).
    fn hwm_of(&self, entry: &NsEntry) -> Hwm {
        Hwm {
            root_wide: self.store.mode() == WriterMode::SingleWriter,
            ..entry.hwm()
        }
    }

    /// Forks known to this daemon, in id order, after `after`, at most `limit`.
    /// Each is verified before it is reported; one that cannot be (its manifest is
    /// broken, or the store is down) is listed with the error instead of numbers.
    pub async fn list_forks(&self, after: Option<ForkId>, limit: usize) -> ForkPage {
        use std::ops::Bound;
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut entries: Vec<Arc<NsEntry>> = self
            .forks
            .read()
            .unwrap()
            .range((lower, Bound::Unbounded))
            .take(limit.max(1) + 1)
            .map(|(_, e)| e.clone())
            .collect();
        let more = entries.len() > limit.max(1);
        entries.truncate(limit.max(1));
        let deadline = tokio::time::Instant::now() + REPORT_BUDGET;
        let page: Vec<ForkInfo> = futures::stream::iter(entries)
            .map(|e| async move {
                match self.verified_within(&e, deadline).await {
                    Ok(()) => e.info(false),
                    Err(err) => e.unverified_info(err),
                }
            })
            .buffered(16)
            .collect()
            .await;
        let next_after = if more {
            page.last().map(|f| f.fork.clone())
        } else {
            None
        };
        ForkPage {
            forks: page,
            next_after,
        }
    }

    /// Version, mode, mirror health, the primary's and the first forks' counters,
    /// each namespace verified before it is reported (or shown with its error).
    pub async fn status(&self) -> Status {
        let mut shown: Vec<Arc<NsEntry>> = vec![self.primary.clone()];
        shown.extend(self.forks.read().unwrap().values().take(100).cloned());
        let deadline = tokio::time::Instant::now() + REPORT_BUDGET;
        let namespaces = futures::stream::iter(shown)
            .map(|e| async move {
                let res = self.verified_within(&e, deadline).await;
                e.status(res.err())
            })
            .buffered(16)
            .collect()
            .await;
        self.status_with(namespaces)
    }

    /// Verify `e` unless `deadline` passes first (a report must not hang on a
    /// store that is down); the error says which.
    async fn verified_within(
        &self,
        e: &Arc<NsEntry>,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        match tokio::time::timeout_at(deadline, self.ensure_verified(e)).await {
            Ok(res) => res.map_err(|err| err.to_string()),
            Err(_) => Err("not verified against the object store yet (it is slow or unreachable; see mirror health)".into()),
        }
    }

    /// [`Engine::status`] without verifying anything, for metrics: namespaces not
    /// verified yet carry an error saying so instead of being checked now.
    pub fn status_now(&self) -> Status {
        let namespaces = self
            .all_entries()
            .into_iter()
            .take(101)
            .map(|e| {
                let unverified = (!e.verified.load(Ordering::Acquire))
                    .then(|| "not verified against the object store yet".to_string());
                e.status(unverified)
            })
            .collect();
        self.status_with(namespaces)
    }

    /// The configured lease size (`[allocation] lease_size`): the smallest lease.
    pub fn lease_size(&self) -> u64 {
        self.cfg.lease_size
    }

    /// The object store as this daemon last found it.
    pub fn mirror_health(&self) -> idalloc_client::protocol::MirrorHealth {
        self.store.health()
    }

    /// Every namespace as the metrics sampler reads it: no store call, no
    /// verification, no limit on the number of forks (each is a few loads).
    pub fn samples(&self) -> Vec<NsSample> {
        self.all_entries()
            .into_iter()
            .map(|e| {
                let st = e.snapshot();
                NsSample {
                    key: e.key.clone(),
                    primary: e.fork().is_none(),
                    dropped: st.meta.dropped,
                    merged: st.meta.merged_into.is_some(),
                    broken: e.broken.lock().unwrap().is_some(),
                    verified: e.verified.load(Ordering::Acquire),
                    granted: st.counters.map(|c| c.granted),
                    headroom: st.counters.map(|c| c.headroom()),
                }
            })
            .collect()
    }

    fn status_with(&self, namespaces: Vec<idalloc_client::protocol::NamespaceStatus>) -> Status {
        let mut warnings = Vec::new();
        if self.shared_disk {
            warnings.push(shared_disk_warning(self.store.display_url()));
        }
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            mode: self.store.mode(),
            fork_ids: self.cfg.fork_ids,
            object_store: self.store.display_url().to_string(),
            mirror: self.store.health(),
            namespaces_total: 1 + self.forks.read().unwrap().len() as u64,
            namespaces,
            warnings,
        }
    }

    /// sled flushes since open: each one made a group of reservations durable.
    pub fn flushes(&self) -> u64 {
        self.local.flushes()
    }

    /// Single- or multi-writer.
    pub fn mode(&self) -> WriterMode {
        self.store.mode()
    }

    /// The object-store URL without secrets.
    pub fn store_url(&self) -> &str {
        self.store.display_url()
    }

    /// Every namespace, primary first.
    fn all_entries(&self) -> Vec<Arc<NsEntry>> {
        let forks = self.forks.read().unwrap();
        std::iter::once(self.primary.clone())
            .chain(forks.values().cloned())
            .collect()
    }

    /// The entry of a namespace; a fork this daemon has not seen is looked up in the
    /// object store (another daemon, or an earlier life, may have created it).
    /// The entry of `ns` if it is in memory (the primary always is).
    fn cached_entry(&self, ns: &Namespace) -> Option<Arc<NsEntry>> {
        match ns {
            Namespace::Primary => Some(self.primary.clone()),
            Namespace::Fork(id) => self.forks.read().unwrap().get(id).cloned(),
        }
    }

    async fn entry(&self, ns: Namespace) -> Result<Arc<NsEntry>, ServiceError> {
        match ns {
            Namespace::Primary => Ok(self.primary.clone()),
            Namespace::Fork(id) => {
                if let Some(e) = self.forks.read().unwrap().get(&id) {
                    return Ok(e.clone());
                }
                let _b = self.bootstrap_lock.lock().await;
                self.entry_locked(id).await
            }
        }
    }

    /// [`Engine::entry`] for a fork, with `bootstrap_lock` held by the caller.
    async fn entry_locked(&self, id: ForkId) -> Result<Arc<NsEntry>, ServiceError> {
        if let Some(e) = self.forks.read().unwrap().get(&id) {
            return Ok(e.clone());
        }
        match self.find_fork(id).await? {
            Some(spelling) => self.adopt(spelling).await,
            None => Err(ServiceError::UnknownFork(id.text())),
        }
    }
}

/// One namespace in [`Engine::samples`].
#[derive(Debug, Clone)]
pub struct NsSample {
    /// Its sled key: the same namespace from one sample to the next.
    pub key: Vec<u8>,
    /// The primary (else a fork).
    pub primary: bool,
    /// A dropped fork.
    pub dropped: bool,
    /// A fork merged into an ancestor.
    pub merged: bool,
    /// Its manifest cannot be parsed: every call gets that error until a repair.
    pub broken: bool,
    /// Checked against the object store since start (else its counters are
    /// sled's, not yet trusted).
    pub verified: bool,
    /// Per kind ([`idalloc_client::namespace::Kind::index`]), the next id to grant.
    pub granted: [u64; 2],
    /// Per kind, ids left in this daemon's leases (the current one and a prefetched one).
    pub headroom: [u64; 2],
}
