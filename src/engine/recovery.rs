//! Start-up reconciliation and clean shutdown.
//!
//! Invariants protected: *unique* (1) and *never guess* (8) across restarts, lost
//! data directories and power cuts:
//!
//! - sled is trusted only when it can be current: after a clean shutdown, or after
//!   an unclean stop *in this boot* (sled's `sync_file_range` survives a process
//!   crash, not a power cut — sled issue 1452). After an unclean stop in an earlier
//!   boot every namespace resumes above its object-store ceiling.
//! - With sled empty (new or lost data directory), every manifest is adopted: the
//!   primary and every fork under `catalog/forks/`.
//! - A trusted namespace is verified against its manifest before it serves
//!   (`Engine::verify`): lazily on first use, eagerly for the primary.
//! - *Bounded gap* (7): clean shutdown gives unused leases back (checkpoint) and
//!   marks the state clean, so the next start continues where this one stopped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};

use crate::error::ServiceError;
use crate::fork_id::ForkId;
use crate::namespace::{Kind, Namespace};
use crate::protocol::WriterMode;

use super::counter::Counter;
use super::forks::adopted_entry;
use super::local::{Local, MetaRecord};
use super::manifest::{fork_from_dir, fork_path, ForkMeta, PRIMARY_PATH};
use super::ns::{NsEntry, NsState};
use super::store::{Mirror, RetryPolicy, StoreHandle, Versioned};
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
    if cfg.lease_size == 0 || cfg.max_count == 0 || !(0.0..1.0).contains(&cfg.prefetch_at) {
        return Err(OpenError::DataDir {
            path: cfg.data_dir.display().to_string(),
            reason: "lease_size and max_count must be at least 1 and prefetch_at in [0, 1)".into(),
        });
    }
    let mirror = Mirror::new(
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
            "object store has no conditional update: running SINGLE-WRITER (one daemon per root; the data directory lock guards it)"
        ),
        WriterMode::MultiWriter => tracing::info!(
            store = mirror.display_url(),
            "object store supports conditional update: running MULTI-WRITER (several daemons may share this root)"
        ),
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
    let boot_id = read_boot_id(&cfg.boot_id_path);

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

    let trusted = match &loaded.meta {
        None => false,
        Some(m) => m.clean || (!boot_id.is_empty() && m.boot_id == boot_id),
    };
    let fresh = loaded.meta.is_none() && primary.is_none() && forks.is_empty();
    // Namespaces whose state comes from the store rather than sled: persisted
    // before serving.
    let mut from_store: Vec<Arc<NsEntry>> = Vec::new();
    if fresh {
        tracing::info!(dir = %cfg.data_dir.display(), "no local state: adopting every manifest from the object store");
        let (p, f) = adopt_all(&mirror).await?;
        from_store.push(p.clone());
        from_store.extend(f.values().cloned());
        primary = Some(p);
        forks = f;
    } else {
        let mut resume: Vec<Arc<NsEntry>> = Vec::new();
        if !trusted {
            let previous = loaded
                .meta
                .as_ref()
                .map(|m| m.boot_id.clone())
                .unwrap_or_default();
            tracing::warn!(
                previous_boot = %previous, current_boot = %boot_id,
                "the last run stopped uncleanly in an earlier boot (or its state is incomplete): local counters may have lost writes; every namespace resumes above its object-store ceiling"
            );
            resume.extend(primary.iter().cloned());
            resume.extend(forks.values().cloned());
        }
        if primary.is_none() {
            // No primary record (a run that stopped before its first write): the
            // primary resumes at its ceiling like an adopted namespace.
            let p = new_primary(Counter::default());
            resume.push(p.clone());
            primary = Some(p);
        }
        futures::stream::iter(resume.clone())
            .map(|e| resume_above_ceiling(&mirror, e))
            .buffer_unordered(RECOVERY_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        from_store = resume;
    }
    let primary = primary.expect("primary set above");

    let engine = Arc::new_cyclic(|me| Engine {
        cfg,
        local,
        mirror,
        primary,
        forks: std::sync::RwLock::new(forks),
        bootstrap_lock: tokio::sync::Mutex::new(()),
        shutting_down: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
        idle: tokio::sync::Notify::new(),
        started: Instant::now(),
        boot_id: boot_id.clone(),
        me: me.clone(),
    });

    // Everything recovered is made durable, and the state marked unclean (with this
    // boot's id), before anything is served.
    let persisted = futures::stream::iter(from_store)
        .map(|e| {
            let engine = engine.clone();
            async move { engine.persist(&e).await }
        })
        .buffer_unordered(RECOVERY_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await;
    let meta = MetaRecord {
        boot_id,
        clean: false,
    };
    persisted
        .and(
            engine
                .local
                .write_meta(&meta)
                .await
                .map_err(ServiceError::Internal),
        )
        .map_err(|e| OpenError::DataDir {
            path: engine.cfg.data_dir.display().to_string(),
            reason: e.to_string(),
        })?;

    // The primary is checked now, so a rolled-back manifest is raised before the
    // first request. An unreachable store is not fatal here: local state is trusted,
    // and the primary answers "unavailable" until the check succeeds.
    if let Err(e) = engine.ensure_verified(&engine.primary).await {
        tracing::warn!(error = %e, "could not verify the primary's manifest at start-up; it will be retried on first use");
    }
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

fn new_primary(c: Counter) -> Arc<NsEntry> {
    NsEntry::new(
        Namespace::Primary,
        NsState {
            meta: ForkMeta::default(),
            counters: [c, c],
        },
        false,
    )
}

/// Untrusted local state: move every counter above the ceiling, with no lease.
async fn resume_above_ceiling(mirror: &Mirror, e: Arc<NsEntry>) -> Result<(), OpenError> {
    let cur = mirror.read(&e.path()).await?;
    let mut st = e.state.lock().unwrap();
    for k in Kind::ALL {
        let ceiling = cur.as_ref().map_or(0, |v| v.manifest.ceiling(k));
        st.counters[k.index()].jump_to(ceiling);
    }
    if let Some(meta) = cur.as_ref().and_then(|v| v.manifest.fork_meta()) {
        st.meta.dropped |= meta.dropped;
    }
    drop(st);
    e.verified.store(true, Ordering::Release);
    if let Some(v) = cur {
        // The version is known now; leases can be conditional on it.
        if let Ok(mut ms) = e.mirror.try_lock() {
            ms.cached = Some(v);
        }
    }
    Ok(())
}

/// Empty sled: the primary and every fork resume at their ceilings.
async fn adopt_all(
    mirror: &Mirror,
) -> Result<(Arc<NsEntry>, BTreeMap<ForkId, Arc<NsEntry>>), OpenError> {
    let primary_manifest = mirror
        .read(&object_store::path::Path::from(PRIMARY_PATH))
        .await?;
    let primary = match &primary_manifest {
        Some(v) => NsEntry::new(
            Namespace::Primary,
            NsState {
                meta: ForkMeta::default(),
                counters: [
                    Counter::resume_at(v.manifest.next_vid_batch),
                    Counter::resume_at(v.manifest.next_eid_batch),
                ],
            },
            true,
        ),
        None => {
            let p = new_primary(Counter::default());
            p.verified.store(true, Ordering::Release);
            p
        }
    };
    if let Some(v) = primary_manifest {
        primary.mirror.try_lock().expect("new entry").cached = Some(v);
    }
    let dirs = mirror.list_fork_dirs().await?;
    let found: Vec<(ForkId, Versioned)> = futures::stream::iter(dirs)
        .filter_map(|d| async move {
            match fork_from_dir(&d) {
                Some(id) => Some(id),
                None => {
                    tracing::warn!(dir = %d, "ignoring a directory under catalog/forks/ that is not a fork id");
                    None
                }
            }
        })
        .map(|id| async move {
            let v = mirror.read(&fork_path(&id.text())).await?;
            Ok::<_, OpenError>(v.map(|v| (id, v)))
        })
        .buffer_unordered(RECOVERY_CONCURRENCY)
        .try_filter_map(|x| async move { Ok(x) })
        .try_collect()
        .await?;
    let mut forks: BTreeMap<ForkId, Arc<NsEntry>> = BTreeMap::new();
    for (id, v) in found {
        let e = adopted_entry(id, &v);
        if let Some(prev) = forks.get(&id) {
            // Two spellings of one fork id: one namespace, resuming above both.
            tracing::warn!(fork = %id, other = %prev.ns, "fork has manifests under both id spellings; using the higher ceilings");
            let mut st = prev.state.lock().unwrap();
            for k in Kind::ALL {
                st.counters[k.index()].jump_to(v.manifest.ceiling(k));
            }
            continue;
        }
        e.mirror.try_lock().expect("new entry").cached = Some(v);
        forks.insert(id, e);
    }
    tracing::info!(
        forks = forks.len(),
        primary_vid = primary.hwm().next_vid,
        primary_eid = primary.hwm().next_eid,
        "adopted manifests from the object store"
    );
    Ok((primary, forks))
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
                    let mut ms = e.mirror.lock().await;
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
        };
        self.local
            .write_meta(&meta)
            .await
            .map_err(ServiceError::Internal)?;
        tracing::info!("allocation engine stopped cleanly");
        Ok(())
    }
}
