//! Forks: bootstrap above the parent's high-water mark, adoption of forks found in
//! the object store, and drop (a tombstone).
//!
//! Invariants protected: *fork floor* (3) — a fork starts at or above
//! `max(caller's floor, parent's HWM)`, where the parent's HWM is what this daemon
//! granted (single-writer) or the parent's ceiling, which bounds what any daemon
//! granted (multi-writer). *Idempotent bootstrap* (4) — one 128-bit value is one
//! fork with one creator: creation is decided by one conditional create
//! (`PutMode::Create`) of the fork's *claim*, an object named by the value alone
//! (`idalloc/fork-claims/{uuid}.json`), never by either text spelling. The claim
//! carries the spelling, the initial manifest and a nonce of the call that wrote
//! it, so a create that landed but whose reply was lost is recognised as ours, and
//! a creator that died before writing the manifest is completed by whoever comes
//! next. A dropped fork's manifest stays, marked, so its ids are never handed out
//! again.

use std::sync::Arc;

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use idalloc_client::error::ServiceError;
use idalloc_client::fork_id::{ForkId, IdForm};
use idalloc_client::namespace::{Kind, Namespace};
use idalloc_client::protocol::{ForkIds, ForkInfo, WriterMode};

use super::counter::Counter;
use super::ns::{NsEntry, NsState};
use super::store::manifest::{path_for, ForkMeta, Manifest};
use super::store::{Versioned, Written};
use super::{store_err, Engine};

/// Where fork claims live, relative to the root (outside `catalog/`, which the
/// reference database owns).
pub const CLAIMS_DIR: &str = "idalloc/fork-claims";

/// How far above the parent's high-water mark a bootstrap's floors may go
/// (rule 3): a floor far above what was granted burns id space nobody gets back,
/// in tree mode the whole tree's, so it is an admin's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloorAuthority {
    /// At most `allocation.max_count` above the parent's high-water mark (the
    /// writer role): as far as one reservation could have gone.
    Bounded,
    /// Any floor (the admin role, and the engine's own callers).
    Any,
}

/// Where a fork's retirement (drop or merge) is kept apart from its manifest,
/// one object per 128-bit value: a repair of a broken manifest reads it, so a
/// retired fork never comes back live.
pub const RETIRED_DIR: &str = "idalloc/retired-forks";

/// Path of the retirement record of a fork value.
fn retired_path(id: ForkId) -> Path {
    Path::from(format!(
        "{RETIRED_DIR}/{}.json",
        id.with_form(IdForm::Uuid).text()
    ))
}

/// The object that decides a fork's creation, one per 128-bit value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claim {
    /// The spelling the fork's manifest lives under.
    pub fork: String,
    /// Random per bootstrap call: tells the creator its own claim.
    pub nonce: String,
    /// The manifest the fork starts with (floors and idalloc's metadata).
    pub manifest: Manifest,
}

/// Path of the claim of a fork value.
pub fn claim_path(id: ForkId) -> Path {
    Path::from(format!(
        "{CLAIMS_DIR}/{}.json",
        id.with_form(IdForm::Uuid).text()
    ))
}

/// The same value in the other spelling.
pub fn other_spelling(id: ForkId) -> ForkId {
    match id.form() {
        IdForm::Uuid => id.with_form(IdForm::Ulid),
        IdForm::Ulid => id.with_form(IdForm::Uuid),
    }
}

impl Engine {
    /// Read a fork's claim; a claim that does not parse is an error naming it.
    pub(super) async fn read_claim(&self, id: ForkId) -> Result<Option<Claim>, ServiceError> {
        let path = claim_path(id);
        let Some((bytes, _)) = self
            .store
            .read_bytes(&path)
            .await
            .map_err(|e| store_err(e, self.retry_hint_ms()))?
        else {
            return Ok(None);
        };
        let broken = |reason: String| {
            ServiceError::BrokenManifest(format!(
                "fork claim {path} cannot be parsed ({reason}): fork {id} is unavailable until repaired (idalloc never guesses a counter). Repair: idallocctl repair --fork {id} --vid-floor N --eid-floor M, with N and M above the highest ids the database holds"
            ))
        };
        let claim: Claim = serde_json::from_slice(&bytes).map_err(|e| broken(e.to_string()))?;
        match ForkId::parse(&claim.fork) {
            Ok(f) if f == id => Ok(Some(claim)),
            _ => Err(broken(format!("it names fork {:?}", claim.fork))),
        }
    }

    /// Record that `entry` is retired as `meta` says, before its tombstone is
    /// written. Written again by every drop or merge attempt; a drop and a merge
    /// racing may leave either flavour here, and the fork is retired either way.
    pub(super) async fn record_retired(
        &self,
        entry: &NsEntry,
        meta: &ForkMeta,
    ) -> Result<(), ServiceError> {
        let Some(id) = entry.fork() else {
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(meta).expect("fork meta serialises");
        self.store
            .overwrite_bytes(&retired_path(id), bytes)
            .await
            .map_err(|e| store_err(e, self.retry_hint_ms()))
    }

    /// The retirement record of a fork, if it was ever dropped or merged. One
    /// that does not parse still says the fork was retired (as dropped): a repair
    /// never brings a fork back live on a guess.
    pub(super) async fn read_retired(&self, id: ForkId) -> Result<Option<ForkMeta>, ServiceError> {
        let path = retired_path(id);
        let Some((bytes, _)) = self
            .store
            .read_bytes(&path)
            .await
            .map_err(|e| store_err(e, self.retry_hint_ms()))?
        else {
            return Ok(None);
        };
        Ok(Some(serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(record = %path, error = %e, "a fork's retirement record cannot be parsed; the fork is kept retired (as dropped)");
            ForkMeta {
                dropped: true,
                ..ForkMeta::default()
            }
        })))
    }

    /// Write the manifest a claim describes if it is not there yet (its creator
    /// stopped between the claim and the manifest). Never overwrites.
    pub(super) async fn complete_claim(&self, claim: &Claim) -> Result<(), ServiceError> {
        let Ok(id) = ForkId::parse(&claim.fork) else {
            return Ok(());
        };
        let path = path_for(&Namespace::Fork(id));
        if let Written::Won(_) = self
            .store
            .write(&path, &claim.manifest, None)
            .await
            .map_err(|e| store_err(e, self.retry_hint_ms()))?
        {
            tracing::info!(fork = %id, manifest = %path, "completed a fork whose creator stopped before writing its manifest");
        }
        Ok(())
    }

    /// Whether the fork exists in the object store, and under which spelling: the
    /// claim's if there is one, else whichever spelling has a manifest (forks made
    /// before claims existed). A manifest that does not parse still counts as
    /// existing: the fork is then registered broken, never recreated.
    pub(super) async fn find_fork(&self, id: ForkId) -> Result<Option<ForkId>, ServiceError> {
        if let Some(claim) = self.read_claim(id).await? {
            self.complete_claim(&claim).await?;
            return Ok(ForkId::parse(&claim.fork).ok());
        }
        for fid in [id, other_spelling(id)] {
            let found = self
                .store
                .read_bytes(&path_for(&Namespace::Fork(fid)))
                .await
                .map_err(|e| store_err(e, self.retry_hint_ms()))?;
            if found.is_some() {
                return Ok(Some(fid));
            }
        }
        Ok(None)
    }

    /// Register a fork that exists in the object store. It serves nothing until
    /// verified: verification moves its counters above every manifest of the fork
    /// (both spellings) and reads its metadata. The caller holds `bootstrap_lock`.
    pub(super) async fn adopt(&self, fid: ForkId) -> Result<Arc<NsEntry>, ServiceError> {
        if let Some(e) = self.forks.read().unwrap().get(&fid) {
            return Ok(e.clone());
        }
        let entry = NsEntry::new(
            Namespace::Fork(fid),
            NsState {
                meta: ForkMeta::default(),
                counters: [Counter::default(), Counter::default()],
                stale: true,
            },
            false,
        );
        self.forks.write().unwrap().insert(fid, entry.clone());
        Ok(entry)
    }

    /// Adopt every fork in the object store this daemon does not know yet (created
    /// by another daemon sharing the root). Returns how many were adopted.
    pub async fn discover_forks(&self) -> Result<usize, ServiceError> {
        let dirs = self
            .store
            .list_fork_dirs()
            .await
            .map_err(|e| store_err(e, self.retry_hint_ms()))?;
        let mut adopted = 0;
        for dir in dirs {
            let Some(id) = super::store::manifest::fork_from_dir(&dir) else {
                continue;
            };
            if self.forks.read().unwrap().contains_key(&id) {
                continue;
            }
            let _b = self.bootstrap_lock.lock().await;
            if self.forks.read().unwrap().contains_key(&id) {
                continue;
            }
            // One fork that cannot be looked up (a broken claim, say) does not
            // hide the others; it answers its own error when it is used.
            let spelling = match self.find_fork(id).await {
                Ok(found) => found.unwrap_or(id),
                Err(ServiceError::BrokenManifest(e)) => {
                    tracing::error!(fork = %id, error = %e, "fork cannot be looked up");
                    id
                }
                Err(e) => return Err(e),
            };
            self.adopt(spelling).await?;
            adopted += 1;
        }
        Ok(adopted)
    }

    /// Create `fork` above `max(floor, parent's HWM)`, or return the existing fork
    /// unchanged with `created = false`. One call; see
    /// [`Engine::bootstrap_fork_request`] for retries that must keep `created`.
    pub async fn bootstrap_fork(
        &self,
        fork: ForkId,
        parent: Option<ForkId>,
        vid_floor: u64,
        eid_floor: u64,
    ) -> Result<ForkInfo, ServiceError> {
        self.bootstrap_fork_request(
            fork,
            parent,
            vid_floor,
            eid_floor,
            rand::random(),
            FloorAuthority::Any,
        )
        .await
    }

    /// [`Engine::bootstrap_fork`] as one attempt of a request identified by
    /// `request`: every attempt of one request passes the same value, and the
    /// attempt that finds the fork created by an earlier attempt of it (whose
    /// reply was lost) is told `created: true`. `authority` bounds the
    /// caller's floors (rule 3).
    pub async fn bootstrap_fork_request(
        &self,
        fork: ForkId,
        parent: Option<ForkId>,
        vid_floor: u64,
        eid_floor: u64,
        request: u128,
        authority: FloorAuthority,
    ) -> Result<ForkInfo, ServiceError> {
        let _guard = self.enter()?;
        let nonce = format!("{request:032x}");
        if parent == Some(fork) {
            return Err(ServiceError::InvalidArgument(format!(
                "fork {fork} cannot be its own parent"
            )));
        }
        self.ensure_mode().await?;
        let _b = self.bootstrap_lock.lock().await;
        let existing = self.forks.read().unwrap().get(&fork).cloned();
        if let Some(e) = existing {
            // Which request created it: known if it was created or completed here,
            // else the claim says (another attempt of this request may have
            // created it and been answered with an error).
            let known = e.created_by.lock().unwrap().clone();
            let creator = match known {
                Some(n) => Some(n),
                None => {
                    let from_claim = self.read_claim(fork).await?.map(|c| c.nonce);
                    e.created_by.lock().unwrap().clone_from(&from_claim);
                    from_claim
                }
            };
            return self
                .existing_info(&e, creator.as_deref() == Some(nonce.as_str()))
                .await;
        }
        // An earlier attempt of this request may have won the claim and then failed
        // (the manifest not written, or the reply lost): it is still this caller's.
        let claim = self.read_claim(fork).await?;
        if let Some(c) = claim.as_ref().filter(|c| c.nonce == nonce) {
            self.complete_claim(c).await?;
            let spelling = ForkId::parse(&c.fork).unwrap_or(fork);
            let e = self.adopt(spelling).await?;
            *e.created_by.lock().unwrap() = Some(nonce);
            tracing::info!(%fork, "fork created (by an earlier attempt of this request)");
            return self.existing_info(&e, true).await;
        }
        if let Some(spelling) = self.find_fork(fork).await? {
            let e = self.adopt(spelling).await?;
            return self.existing_info(&e, false).await;
        }
        let parent_entry = match parent {
            None => self.primary.clone(),
            Some(p) => self.entry_locked(p).await?,
        };
        self.ensure_verified(&parent_entry).await?;
        let pst = parent_entry.snapshot();
        if pst.meta.retired() {
            return Err(parent_entry.retired_error());
        }
        // In multi-writer mode other daemons may have granted up to the parent's
        // ceiling, so the ceiling is the only safe HWM. A single writer (verified
        // against the manifest above) knows its granted HWM exactly.
        let pman = match self.store.mode() {
            WriterMode::MultiWriter => self
                .store
                .read(&parent_entry.path())
                .await
                .map_err(|e| store_err(e, self.retry_hint_ms()))?,
            WriterMode::SingleWriter => None,
        };
        // In tree mode the primary's ceiling is the tree's sequence: at or above
        // everything any namespace was ever granted.
        let tree = match self.cfg.fork_ids {
            ForkIds::Tree => self
                .store
                .read(&self.primary.path())
                .await
                .map_err(|e| store_err(e, self.retry_hint_ms()))?,
            ForkIds::Namespace => None,
        };
        let floor = |k: Kind, caller: u64| {
            let local = pst.counters[k.index()].granted;
            let ceiling = pman.as_ref().map_or(0, |v| v.manifest.ceiling(k));
            let sequence = tree.as_ref().map_or(0, |v| v.manifest.ceiling(k));
            caller.max(local).max(ceiling).max(sequence)
        };
        if authority == FloorAuthority::Bounded {
            for (k, caller) in [(Kind::Vid, vid_floor), (Kind::Eid, eid_floor)] {
                let hwm = floor(k, 0);
                let limit = hwm.saturating_add(self.cfg.max_count);
                if caller > limit {
                    return Err(ServiceError::PermissionDenied(format!(
                        "a {k} floor of {caller} is more than allocation.max_count ({}) above the parent's high-water mark ({hwm}): a floor that far up burns ids nobody gets back ({}), so only the admin role may set it; a writer's floor may be at most {limit}",
                        self.cfg.max_count,
                        match self.cfg.fork_ids {
                            ForkIds::Tree => "in tree mode, the whole tree's",
                            ForkIds::Namespace => "the fork's",
                        }
                    )));
                }
            }
        }
        let meta = ForkMeta {
            parent: parent_entry.fork().map(|f| f.text()),
            floor_vid: floor(Kind::Vid, vid_floor),
            floor_eid: floor(Kind::Eid, eid_floor),
            dropped: false,
            merged_into: None,
            merged_by: None,
        };
        let mut m = Manifest::new(meta.floor_vid, meta.floor_eid);
        m.set_fork_meta(&meta);
        let claim = Claim {
            fork: fork.text(),
            nonce: nonce.clone(),
            manifest: m.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&claim).expect("claim serialises");
        let won = match self
            .store
            .create_bytes(&claim_path(fork), bytes)
            .await
            .map_err(|e| store_err(e, self.retry_hint_ms()))?
        {
            Written::Won(_) => true,
            // Either another caller claimed it first, or our own create landed and
            // its reply was lost (then the retry found it): the nonce tells which.
            Written::Lost => match self.read_claim(fork).await? {
                Some(c) if c.nonce == nonce => true,
                Some(c) => {
                    self.complete_claim(&c).await?;
                    let spelling = ForkId::parse(&c.fork).unwrap_or(fork);
                    let e = self.adopt(spelling).await?;
                    return self.existing_info(&e, false).await;
                }
                None => {
                    return Err(ServiceError::unavailable(
                        format!("the claim of fork {fork} was created concurrently but cannot be read back yet"),
                        self.retry_hint_ms(),
                    ))
                }
            },
        };
        debug_assert!(won);
        // A daemon switching the root's mode lists forks after it rewrote the
        // record: either it sees this claim and switches back, or we see its
        // record now and serve nothing of this fork.
        self.mode_unchanged().await?;
        let ns = Namespace::Fork(fork);
        let path = path_for(&ns);
        let written = self
            .store
            .write(&path, &m, None)
            .await
            .map_err(|e| store_err(e, self.retry_hint_ms()))?;
        // Lost: the manifest is there already, written from our claim (by our own
        // ambiguous attempt or by a daemon completing it). Its content is ours, but
        // it may have been leased from since: verify before serving.
        let verified = matches!(written, Written::Won(_));
        let entry = NsEntry::new(
            ns,
            NsState {
                meta: meta.clone(),
                counters: [
                    Counter::resume_at(meta.floor_vid),
                    Counter::resume_at(meta.floor_eid),
                ],
                stale: !verified,
            },
            verified,
        );
        if let Written::Won(version) = written {
            entry.ceiling.lock().await.cached = Some(Versioned {
                manifest: m,
                version,
            });
        }
        *entry.created_by.lock().unwrap() = Some(nonce);
        self.persist(&entry).await?;
        self.forks.write().unwrap().insert(fork, entry.clone());
        tracing::info!(%fork, parent = ?meta.parent, floor_vid = meta.floor_vid, floor_eid = meta.floor_eid, "fork created");
        self.existing_info(&entry, true).await
    }

    /// Tombstone a fork: later reservations in it fail with `DroppedFork`, here and,
    /// at their next lease, on every daemon sharing the root. The manifest stays.
    pub async fn drop_fork(&self, fork: ForkId) -> Result<ForkInfo, ServiceError> {
        let _guard = self.enter()?;
        let entry = self.entry(Namespace::Fork(fork)).await?;
        self.ensure_verified(&entry).await?;
        let hint = self.retry_hint_ms();
        let mut ms = entry.ceiling.lock().await;
        if entry.snapshot().meta.dropped {
            return Ok(entry.info(false));
        }
        if let Some(into) = entry.snapshot().meta.merged_into {
            return Err(ServiceError::InvalidArgument(format!(
                "fork {fork} was merged into {into}: its ids are retired already, and a merged fork is not dropped"
            )));
        }
        let path = entry.path();
        for _ in 0..32 {
            let cur = self
                .store
                .read(&path)
                .await
                .map_err(|e| store_err(e, hint))?;
            let st = entry.snapshot();
            let mut m = super::lease::manifest_to_rewrite(cur.as_ref(), &entry, &st.meta);
            let mut meta = m.fork_meta().unwrap_or_else(|| st.meta.clone());
            if let Some(into) = &meta.merged_into {
                return Err(ServiceError::InvalidArgument(format!(
                    "fork {fork} was merged into {into} (by another daemon): its ids are retired already, and a merged fork is not dropped"
                )));
            }
            meta.dropped = true;
            m.set_fork_meta(&meta);
            // Kept apart from the manifest first, so that a repair of a broken
            // manifest keeps the fork retired.
            self.record_retired(&entry, &meta).await?;
            for k in Kind::ALL {
                let owned = st.counters[k.index()].owned_end();
                m.set_ceiling(k, m.ceiling(k).max(owned));
            }
            match self
                .store
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

    /// The reply to a bootstrap: verified first, so that its numbers are never
    /// below what was granted; `created` only for the request that created it.
    async fn existing_info(
        &self,
        e: &Arc<NsEntry>,
        created: bool,
    ) -> Result<ForkInfo, ServiceError> {
        self.ensure_verified(e).await?;
        let info = e.info(created);
        if info.dropped || info.merged_into.is_some() {
            return Err(e.retired_error());
        }
        Ok(info)
    }
}
