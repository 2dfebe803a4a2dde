//! Forks: bootstrap above the parent's high-water mark, adoption of forks found in
//! the object store, and drop (a tombstone).
//!
//! Invariants protected: *fork floor* (3) — a fork starts at or above
//! `max(caller's floor, parent's HWM)`, where the parent's HWM is what this daemon
//! granted (single-writer) or the parent's ceiling, which bounds what any daemon
//! granted (multi-writer); *idempotent bootstrap* (4) — creation is a conditional create
//! (`PutMode::Create`), an existing fork (under either spelling of its id) is adopted
//! unchanged, and a dropped fork's manifest stays, marked, so its ids are never
//! handed out again.

use std::sync::Arc;

use crate::error::ServiceError;
use crate::fork_id::{ForkId, IdForm};
use crate::namespace::{Kind, Namespace};
use crate::protocol::{ForkInfo, WriterMode};

use super::counter::Counter;
use super::manifest::{path_for, ForkMeta, Manifest};
use super::ns::{NsEntry, NsState};
use super::store::{Versioned, Written};
use super::{store_err, Engine};

impl Engine {
    /// Find a fork's manifest under either text form of its id.
    pub(super) async fn find_in_store(
        &self,
        id: ForkId,
    ) -> Result<Option<(ForkId, Versioned)>, ServiceError> {
        let other = match id.form() {
            IdForm::Uuid => IdForm::Ulid,
            IdForm::Ulid => IdForm::Uuid,
        };
        for fid in [id, id.with_form(other)] {
            let found = self
                .mirror
                .read(&path_for(&Namespace::Fork(fid)))
                .await
                .map_err(|e| store_err(e, self.retry_hint_ms()))?;
            if let Some(v) = found {
                return Ok(Some((fid, v)));
            }
        }
        Ok(None)
    }

    /// Register a fork found in the object store: it resumes at its ceiling.
    /// The caller holds `bootstrap_lock`.
    pub(super) async fn adopt(
        &self,
        fid: ForkId,
        v: Versioned,
    ) -> Result<Arc<NsEntry>, ServiceError> {
        let entry = adopted_entry(fid, &v);
        *entry.mirror.lock().await = super::ns::MirrorState {
            cached: Some(v),
            last_failure: None,
        };
        self.persist(&entry).await?;
        self.forks.write().unwrap().insert(fid, entry.clone());
        tracing::info!(fork = %fid, next_vid = entry.hwm().next_vid, next_eid = entry.hwm().next_eid, "adopted fork from the object store");
        Ok(entry)
    }

    /// Adopt every fork in the object store this daemon does not know yet (created
    /// by another daemon sharing the root). Returns how many were adopted.
    pub async fn discover_forks(&self) -> Result<usize, ServiceError> {
        let dirs = self
            .mirror
            .list_fork_dirs()
            .await
            .map_err(|e| store_err(e, self.retry_hint_ms()))?;
        let mut adopted = 0;
        for dir in dirs {
            let Some(id) = super::manifest::fork_from_dir(&dir) else {
                continue;
            };
            if self.forks.read().unwrap().contains_key(&id) {
                continue;
            }
            let _b = self.bootstrap_lock.lock().await;
            if self.forks.read().unwrap().contains_key(&id) {
                continue;
            }
            let found = self
                .mirror
                .read(&path_for(&Namespace::Fork(id)))
                .await
                .map_err(|e| store_err(e, self.retry_hint_ms()))?;
            if let Some(v) = found {
                self.adopt(id, v).await?;
                adopted += 1;
            }
        }
        Ok(adopted)
    }

    /// Create `fork` above `max(floor, parent's HWM)`, or return the existing fork
    /// unchanged with `created = false`.
    pub async fn bootstrap_fork(
        &self,
        fork: ForkId,
        parent: Option<ForkId>,
        vid_floor: u64,
        eid_floor: u64,
    ) -> Result<ForkInfo, ServiceError> {
        let _guard = self.enter()?;
        if parent == Some(fork) {
            return Err(ServiceError::InvalidArgument(format!(
                "fork {fork} cannot be its own parent"
            )));
        }
        let _b = self.bootstrap_lock.lock().await;
        let existing = self.forks.read().unwrap().get(&fork).cloned();
        if let Some(e) = existing {
            return existing_info(&e);
        }
        if let Some((fid, v)) = self.find_in_store(fork).await? {
            let e = self.adopt(fid, v).await?;
            return existing_info(&e);
        }
        let parent_entry = match parent {
            None => self.primary.clone(),
            Some(p) => self.entry_locked(p).await?,
        };
        self.ensure_verified(&parent_entry).await?;
        let pst = parent_entry.snapshot();
        if pst.meta.dropped {
            return Err(ServiceError::DroppedFork(
                parent.map(|p| p.text()).unwrap_or_default(),
            ));
        }
        // In multi-writer mode other daemons may have granted up to the parent's
        // ceiling, so the ceiling is the only safe HWM. A single writer (verified
        // against the manifest above) knows its granted HWM exactly.
        let pman = match self.mirror.mode() {
            WriterMode::MultiWriter => self
                .mirror
                .read(&parent_entry.path())
                .await
                .map_err(|e| store_err(e, self.retry_hint_ms()))?,
            WriterMode::SingleWriter => None,
        };
        let floor = |k: Kind, caller: u64| {
            let local = pst.counters[k.index()].granted;
            let ceiling = pman.as_ref().map_or(0, |v| v.manifest.ceiling(k));
            caller.max(local).max(ceiling)
        };
        let meta = ForkMeta {
            parent: parent_entry.fork().map(|f| f.text()),
            floor_vid: floor(Kind::Vid, vid_floor),
            floor_eid: floor(Kind::Eid, eid_floor),
            dropped: false,
        };
        let mut m = Manifest::new(meta.floor_vid, meta.floor_eid);
        m.set_fork_meta(&meta);
        let ns = Namespace::Fork(fork);
        let path = path_for(&ns);
        match self
            .mirror
            .write(&path, &m, None)
            .await
            .map_err(|e| store_err(e, self.retry_hint_ms()))?
        {
            Written::Won(version) => {
                let entry = NsEntry::new(
                    ns,
                    NsState {
                        meta: meta.clone(),
                        counters: [
                            Counter::resume_at(meta.floor_vid),
                            Counter::resume_at(meta.floor_eid),
                        ],
                    },
                    true,
                );
                entry.mirror.lock().await.cached = Some(Versioned {
                    manifest: m,
                    version,
                });
                self.persist(&entry).await?;
                self.forks.write().unwrap().insert(fork, entry.clone());
                tracing::info!(%fork, parent = ?meta.parent, floor_vid = meta.floor_vid, floor_eid = meta.floor_eid, "fork created");
                Ok(entry.info(true))
            }
            Written::Lost => {
                // Someone created it first: theirs is the fork.
                match self.find_in_store(fork).await? {
                    Some((fid, v)) => {
                        let e = self.adopt(fid, v).await?;
                        existing_info(&e)
                    }
                    None => Err(ServiceError::unavailable(
                        format!("fork {fork} was created concurrently but cannot be read back yet"),
                        self.retry_hint_ms(),
                    )),
                }
            }
        }
    }

    /// Tombstone a fork: later reservations in it fail with `DroppedFork`, here and,
    /// at their next lease, on every daemon sharing the root. The manifest stays.
    pub async fn drop_fork(&self, fork: ForkId) -> Result<ForkInfo, ServiceError> {
        let _guard = self.enter()?;
        let entry = self.entry(Namespace::Fork(fork)).await?;
        let hint = self.retry_hint_ms();
        let mut ms = entry.mirror.lock().await;
        if entry.snapshot().meta.dropped {
            return Ok(entry.info(false));
        }
        let path = entry.path();
        for _ in 0..32 {
            let cur = self
                .mirror
                .read(&path)
                .await
                .map_err(|e| store_err(e, hint))?;
            let st = entry.snapshot();
            let mut m = super::lease::manifest_to_rewrite(cur.as_ref(), &entry, &st.meta);
            let mut meta = m.fork_meta().unwrap_or_else(|| st.meta.clone());
            meta.dropped = true;
            m.set_fork_meta(&meta);
            for k in Kind::ALL {
                let owned = st.counters[k.index()].owned_end();
                m.set_ceiling(k, m.ceiling(k).max(owned));
            }
            match self
                .mirror
                .write(&path, &m, cur.as_ref().map(|v| &v.version))
                .await
                .map_err(|e| store_err(e, hint))?
            {
                Written::Won(version) => {
                    ms.cached = Some(Versioned {
                        manifest: m,
                        version,
                    });
                    entry.state.lock().unwrap().meta.dropped = true;
                    self.persist(&entry).await?;
                    tracing::info!(%fork, "fork dropped (tombstone written)");
                    return Ok(entry.info(false));
                }
                Written::Lost => continue,
            }
        }
        Err(ServiceError::unavailable(
            format!("could not write the tombstone of {fork}: too many writers contending"),
            hint,
        ))
    }
}

fn existing_info(e: &NsEntry) -> Result<ForkInfo, ServiceError> {
    let info = e.info(false);
    if info.dropped {
        return Err(ServiceError::DroppedFork(info.fork));
    }
    Ok(info)
}

/// An entry for a fork read from the store: it resumes at its ceiling.
pub(super) fn adopted_entry(fid: ForkId, v: &Versioned) -> Arc<NsEntry> {
    let meta = v.manifest.fork_meta().unwrap_or(ForkMeta {
        parent: None,
        floor_vid: v.manifest.next_vid_batch,
        floor_eid: v.manifest.next_eid_batch,
        dropped: false,
    });
    NsEntry::new(
        Namespace::Fork(fid),
        NsState {
            meta,
            counters: [
                Counter::resume_at(v.manifest.next_vid_batch),
                Counter::resume_at(v.manifest.next_eid_batch),
            ],
        },
        true,
    )
}
