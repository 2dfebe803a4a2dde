//! Start-up reconciliation and clean shutdown.
//!
//! Invariants protected: *unique* (1) and *never guess* (8) across restarts, lost
//! data directories and power cuts:
//!
//! - sled is trusted only when it can be current (`trust`): no unclean-life mark
//!   and a clean record (the last life ended with a full fsync), or a mark from
//!   *this* boot (a process crash, which sled's `sync_file_range` survives; a power
//!   cut does not — sled issue 1452). Otherwise every namespace is marked `stale`
//!   and resumes above its object-store ceiling, in both writer modes.
//! - The mark (`life_mark`) is durable before the first grant of a life, and the
//!   `stale` marks are persisted before it, so a crash in between keeps them.
//! - With sled empty (new or lost data directory), every manifest is adopted: the
//!   primary and every fork under `catalog/forks/`.
//! - Every namespace is verified against its manifests before it serves or is
//!   reported (`verify`): the primary now, forks in the background or on first use.
//! - *Bounded gap* (7): clean shutdown gives unused leases back where rule 9
//!   allows, fsyncs sled, and only then removes the mark, so the next start
//!   continues where this one stopped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};

use idalloc_client::error::ServiceError;
use idalloc_client::fork_id::ForkId;
use idalloc_client::namespace::Namespace;
use idalloc_client::protocol::WriterMode;

use super::counter::Counter;
use super::local::life_mark::{self, Mark};
use super::local::{Local, MetaRecord};
use super::ns::{NsEntry, NsState};
use super::store::manifest::{fork_from_dir, ForkMeta};
use super::store::root_lock::RootLock;
use super::store::{CeilingStore, RetryPolicy, StoreHandle};
use super::{Engine, EngineConfig, OpenError};

/// Store reads in flight at once during recovery.
const RECOVERY_CONCURRENCY: usize = 32;

fn read_boot_id(path: &std::path::Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => s.trim().to_string(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the boot id; local state will not be trusted after an unclean stop");
            String::new()
        }
    }
}

pub(super) async fn open(cfg: EngineConfig, store: StoreHandle) -> Result<Arc<Engine>, OpenError> {
    cfg.validate()
        .map_err(|(key, reason)| OpenError::InvalidConfig(format!("{key}: {reason}")))?;
    let mirror = CeilingStore::new(
        store,
        RetryPolicy {
            timeout: cfg.store_timeout,
            retries: cfg.store_retries,
            backoff: cfg.store_backoff,
        },
    );
    match mirror.mode() {
        WriterMode::SingleWriter => tracing::info!(
            store = mirror.display_url(),
            "object store has no conditional update: running SINGLE-WRITER (one daemon per root; a lock inside the root guards it)"
        ),
        WriterMode::MultiWriter => tracing::info!(
            store = mirror.display_url(),
            "object store supports conditional update: running MULTI-WRITER (several daemons may share this root)"
        ),
    }
    if mirror.mode() == WriterMode::MultiWriter && cfg.store_startup_check {
        use super::store::check::{check, Outcome, ProbeSize};
        let probe = check(
            mirror.raw_store(),
            &[],
            mirror.display_url(),
            ProbeSize::STARTUP,
        )
        .await;
        match probe.outcome {
            Outcome::Unsafe => return Err(OpenError::UnsafeStore(probe.verdict)),
            Outcome::NotShownUnsafe => tracing::info!("conditional-write probe: {}", probe.verdict),
            // An unreachable store is not unsafe: recovery decides what that means.
            Outcome::Unchecked => tracing::warn!("conditional-write probe: {}", probe.verdict),
        }
    }
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| OpenError::DataDir {
        path: cfg.data_dir.display().to_string(),
        reason: e.to_string(),
    })?;
    let shared_disk = mirror.local_root().is_some_and(|root| {
        let canon =
            |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        canon(root).starts_with(canon(&cfg.data_dir))
    });
    if shared_disk {
        tracing::warn!("{}", super::shared_disk_warning(mirror.display_url()));
    }
    let sled_dir = cfg.data_dir.join("sled");
    let local_dir = sled_dir.clone();
    let cache = cfg.sled_cache_bytes;
    let (local, loaded) = tokio::task::spawn_blocking(move || Local::open(&local_dir, cache))
        .await
        .map_err(|e| OpenError::DataDir {
            path: sled_dir.display().to_string(),
            reason: e.to_string(),
        })??;
    // After sled's own lock, so that a second daemon on one data directory is
    // told that first.
    let root_lock = match mirror.local_root() {
        Some(root) => Some(RootLock::acquire(root, &cfg.data_dir)?),
        None => None,
    };
    let boot_id = read_boot_id(&cfg.boot_id_path);
    let mark = life_mark::read(&cfg.data_dir).map_err(|e| OpenError::DataDir {
        path: cfg
            .data_dir
            .join(life_mark::MARK_FILE)
            .display()
            .to_string(),
        reason: e.to_string(),
    })?;

    let mut primary: Option<Arc<NsEntry>> = None;
    let mut forks: BTreeMap<ForkId, Arc<NsEntry>> = BTreeMap::new();
    for rec in loaded.records {
        let e = NsEntry::from_record(rec).map_err(|reason| OpenError::DataDir {
            path: sled_dir.display().to_string(),
            reason,
        })?;
        match e.ns {
            Namespace::Primary => primary = Some(e),
            Namespace::Fork(f) => {
                forks.insert(f, e);
            }
        }
    }

    // One mode per root. Unreachable now: checked again before the first fork
    // operation (the primary is the same in both modes).
    let mode_settled = tokio::sync::OnceCell::new();
    match super::tree::settle_mode(&mirror, cfg.fork_ids).await {
        Ok(()) => {
            let _ = mode_settled.set(());
            tracing::info!(fork_ids = %cfg.fork_ids, "fork ids are counted {}", match cfg.fork_ids {
                idalloc_client::protocol::ForkIds::Namespace => "per namespace (a fork starts above its parent; both may then hand out the same ids)",
                idalloc_client::protocol::ForkIds::Tree => "in one sequence for the whole tree (ids unique across the primary and every fork)",
            });
        }
        Err(OpenError::StoreUnreachable(m)) => {
            tracing::warn!(error = %m, "could not read the root's fork-id mode; checked again before the first fork operation")
        }
        // One broken record does not stop the daemon: the primary is the same in
        // both modes and keeps serving; fork operations answer with the error.
        Err(OpenError::CorruptManifest { path, reason }) => {
            tracing::error!(record = %path, %reason, "{}", super::tree::broken_mode_message(&reason))
        }
        Err(e) => return Err(e),
    }
    let trusted = trust(&mark, loaded.meta.as_ref(), &boot_id);
    // Kept for the data directory's life, so that its lease records are rewritten,
    // not multiplied, across restarts; a new or lost data directory gets a new one.
    let daemon_id = loaded
        .meta
        .as_ref()
        .and_then(|m| m.daemon_id.clone())
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    let fresh = loaded.meta.is_none() && primary.is_none() && forks.is_empty();
    if fresh {
        tracing::info!(dir = %cfg.data_dir.display(), "no local state: adopting every manifest from the object store");
        forks = adopt_all(&mirror).await?;
    } else if !trusted {
        tracing::warn!(
            mark = ?mark, current_boot = %boot_id,
            "the last run stopped uncleanly in an earlier boot (or its state is incomplete): local counters may have lost writes; every namespace resumes above its object-store ceiling"
        );
        for e in primary.iter().chain(forks.values()) {
            e.state.lock().unwrap().stale = true;
            e.verified.store(false, Ordering::Release);
        }
    }
    let primary_created = primary.is_none();
    // No primary record (new, lost, or a run that stopped before its first write):
    // the primary resumes above its ceiling like an adopted namespace.
    let primary = primary.unwrap_or_else(new_primary);

    let engine = Arc::new_cyclic(|me| Engine {
        cfg,
        local,
        store: mirror,
        primary,
        forks: std::sync::RwLock::new(forks),
        bootstrap_lock: tokio::sync::Mutex::new(()),
        mode_settled,
        shutting_down: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        idle: tokio::sync::Notify::new(),
        started: Instant::now(),
        boot_id: boot_id.clone(),
        daemon_id,
        _root_lock: root_lock,
        shared_disk,
        me: me.clone(),
    });

    // Before the mark names this boot, every record that must not be trusted says
    // so itself (`stale`, persisted): a crash later in this boot then trusts sled
    // but still moves those namespaces above their ceilings.
    let to_persist: Vec<Arc<NsEntry>> = if fresh || !trusted {
        engine.all_entries()
    } else if primary_created {
        vec![engine.primary.clone()]
    } else {
        vec![]
    };
    let data_err = |path: &std::path::Path, reason: String| OpenError::DataDir {
        path: path.display().to_string(),
        reason,
    };
    futures::stream::iter(to_persist)
        .map(|e| {
            let engine = engine.clone();
            async move { engine.persist(&e).await }
        })
        .buffer_unordered(RECOVERY_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .map_err(|e| data_err(&engine.cfg.data_dir, e.to_string()))?;
    let meta = MetaRecord {
        boot_id: boot_id.clone(),
        clean: false,
        daemon_id: Some(engine.daemon_id.clone()),
    };
    engine
        .local
        .write_meta(&meta)
        .await
        .map_err(|e| data_err(&engine.cfg.data_dir, e))?;
    // The mark is durable before the first grant of this life.
    let dir = engine.cfg.data_dir.clone();
    let b = boot_id.clone();
    tokio::task::spawn_blocking(move || life_mark::write(&dir, &b))
        .await
        .map_err(|e| data_err(&engine.cfg.data_dir, e.to_string()))?
        .map_err(|e| {
            data_err(
                &engine.cfg.data_dir.join(life_mark::MARK_FILE),
                format!("cannot write the unclean-life mark: {e}"),
            )
        })?;

    // The primary is checked now, so a rolled-back manifest is raised before the
    // first request. With trusted local state an unreachable store is not fatal:
    // the primary answers "unavailable" until the check succeeds. Without it there
    // is no usable lease, and the daemon says so rather than start blind.
    let stale_primary = engine.primary.snapshot().stale;
    match engine.ensure_verified(&engine.primary).await {
        Ok(()) => {}
        Err(ServiceError::Unavailable { message, .. }) if stale_primary => {
            return Err(OpenError::StoreUnreachable(format!(
                "{message} (local state cannot be trusted, so the primary's ceiling must be read before serving)"
            )));
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not verify the primary's manifest at start-up; it answers with this error until it can")
        }
    }
    // Forks are verified in the background (and on first use, whichever comes
    // first), so that start-up does not wait on one read per fork.
    let weak = Arc::downgrade(&engine);
    tokio::spawn(async move {
        let Some(engine) = weak.upgrade() else { return };
        let pending: Vec<Arc<NsEntry>> = engine
            .forks
            .read()
            .unwrap()
            .values()
            .filter(|e| !e.verified.load(Ordering::Acquire))
            .cloned()
            .collect();
        drop(engine);
        futures::stream::iter(pending)
            .for_each_concurrent(16, |e| {
                let weak = weak.clone();
                async move {
                    let Some(engine) = weak.upgrade() else { return };
                    if engine.shutting_down.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Err(err) = engine.ensure_verified(&e).await {
                        tracing::warn!(namespace = %e.ns, error = %err, "could not verify a fork at start-up; it answers with this error until it can");
                    }
                }
            })
            .await;
    });
    let forks_n = engine.forks.read().unwrap().len();
    let h = engine.primary.hwm();
    tracing::info!(
        forks = forks_n,
        trusted_local_state = trusted,
        next_vid = h.next_vid,
        next_eid = h.next_eid,
        sled_bytes = engine.local.size_on_disk(),
        "allocation engine ready"
    );
    Ok(engine)
}

/// Whether sled's counters can be current (DESIGN.md, "Trust sled only when it can
/// be current").
fn trust(mark: &Mark, meta: Option<&MetaRecord>, boot_id: &str) -> bool {
    match mark {
        // A life began in this boot and did not stop cleanly: a process crash,
        // which sled's `sync_file_range` survives.
        Mark::Present(b) => !b.is_empty() && b == boot_id,
        // No life since the last clean shutdown fsynced everything (or, for data
        // directories written before the mark existed, sled's own record).
        Mark::Absent => {
            meta.is_some_and(|m| m.clean || (!boot_id.is_empty() && m.boot_id == boot_id))
        }
    }
}

fn new_primary() -> Arc<NsEntry> {
    NsEntry::new(
        Namespace::Primary,
        NsState {
            meta: ForkMeta::default(),
            counters: [Counter::default(), Counter::default()],
            stale: true,
        },
        false,
    )
}

/// Empty sled: every fork under `catalog/forks/` is registered, to resume above
/// its ceilings once verified (one entry per 128-bit value, whichever spellings
/// it has). The primary is `new_primary`.
async fn adopt_all(mirror: &CeilingStore) -> Result<BTreeMap<ForkId, Arc<NsEntry>>, OpenError> {
    let dirs = mirror.list_fork_dirs().await?;
    let mut forks: BTreeMap<ForkId, Arc<NsEntry>> = BTreeMap::new();
    for d in dirs {
        let Some(id) = fork_from_dir(&d) else {
            tracing::warn!(dir = %d, "ignoring a directory under catalog/forks/ that is not a fork id");
            continue;
        };
        forks.entry(id).or_insert_with(|| {
            NsEntry::new(
                Namespace::Fork(id),
                NsState {
                    meta: ForkMeta::default(),
                    counters: [Counter::default(), Counter::default()],
                    stale: true,
                },
                false,
            )
        });
    }
    tracing::info!(forks = forks.len(), "found forks in the object store");
    Ok(forks)
}

impl Engine {
    /// Clean shutdown: refuse new calls (`ShuttingDown`), wait for those in flight,
    /// give back unused leases where nobody else moved the ceiling, mark the state
    /// clean and flush. Leases that cannot be given back (store unreachable) stay
    /// recorded locally and are resumed at the next start.
    pub async fn shutdown(&self) -> Result<(), ServiceError> {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        loop {
            let notified = self.idle.notified();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                break;
            }
            notified.await;
        }
        let deadline = Duration::from_secs(30).max(self.cfg.store_timeout * 2);
        let entries = self.all_entries();
        let lowered = tokio::time::timeout(
            deadline,
            futures::stream::iter(entries)
                .map(|e| async move {
                    let mut ms = e.ceiling.lock().await;
                    if let Err(err) = self.checkpoint_locked(&e, &mut ms).await {
                        tracing::warn!(namespace = %e.ns, error = %err, "could not give the unused lease back; it stays recorded locally");
                    }
                })
                .buffer_unordered(16)
                .collect::<Vec<()>>(),
        )
        .await;
        if lowered.is_err() {
            tracing::warn!("giving leases back timed out; the rest stay recorded locally");
        }
        let meta = MetaRecord {
            boot_id: self.boot_id.clone(),
            clean: true,
            daemon_id: Some(self.daemon_id.clone()),
        };
        self.local
            .write_meta(&meta)
            .await
            .map_err(ServiceError::Internal)?;
        // sled's flush is not enough to survive a power cut: fsync it all, and only
        // then remove the mark that says this life is not clean.
        self.local
            .sync_all(&self.cfg.data_dir.join("sled"))
            .await
            .map_err(ServiceError::Internal)?;
        let dir = self.cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || life_mark::remove(&dir))
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?
            .map_err(|e| {
                ServiceError::Internal(format!("cannot remove the unclean-life mark: {e}"))
            })?;
        tracing::info!("allocation engine stopped cleanly");
        Ok(())
    }
}
