//! Tree-unique fork ids (`[allocation] fork_ids = "tree"`): every namespace of a
//! root takes its leases from one sequence per kind, the primary's manifest.
//!
//! Invariants protected: *unique across the tree* — a fork's lease is first won on
//! the primary's manifest (one conditional write, like any lease there), so no
//! two namespaces ever lease the same ids; it is then written into the fork's own
//! manifest (a second conditional write, only upward), so each manifest stays at
//! or above everything its namespace granted (*compatible files*, rule 5: a
//! reference allocator that takes over the primary continues above every fork).
//! The fork's lease starts at or above the fork manifest's ceiling as it was at
//! that second write, so it is unique per namespace even against a daemon that
//! counts per namespace. *One mode per root* — the root records its mode in
//! [`MODE_PATH`], created once; a daemon configured otherwise refuses to start,
//! and a root switches only while it has no forks, whose ids would already
//! overlap (namespace to tree) or be relied on to be tree-unique (tree to
//! namespace).

use std::sync::Arc;

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use idalloc_client::error::ServiceError;
use idalloc_client::namespace::Kind;
use idalloc_client::protocol::ForkIds;

use super::forks::CLAIMS_DIR;
use super::lease::manifest_to_rewrite;
use super::ns::{CeilingState, NsEntry};
use super::store::{CeilingStore, StoreError, Versioned, Written};
use super::{store_err, Engine, OpenError};

/// Where a root records how it counts fork ids (outside `catalog/`).
pub const MODE_PATH: &str = "idalloc/fork-ids.json";

/// Conditional-write conflicts tolerated in one tree lease.
const MAX_CONFLICTS: usize = 32;

#[derive(Debug, Serialize, Deserialize)]
struct ModeRecord {
    fork_ids: ForkIds,
    /// False while a switch to `fork_ids` is being checked (no fork may have been
    /// made in the old mode meanwhile): nobody makes forks or fork leases then.
    #[serde(default = "settled_default")]
    settled: bool,
}

fn settled_default() -> bool {
    true
}

fn mode_path() -> Path {
    Path::from(MODE_PATH)
}

/// Read the root's recorded mode; `None` when it records none yet.
async fn read_mode(
    mirror: &CeilingStore,
) -> Result<Option<(ModeRecord, object_store::UpdateVersion)>, StoreError> {
    let Some((bytes, version)) = mirror.read_bytes(&mode_path()).await? else {
        return Ok(None);
    };
    let rec: ModeRecord = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
        path: MODE_PATH.to_string(),
        reason: e.to_string(),
    })?;
    Ok(Some((rec, version)))
}

fn mode_bytes(mode: ForkIds, settled: bool) -> Vec<u8> {
    serde_json::to_vec_pretty(&ModeRecord {
        fork_ids: mode,
        settled,
    })
    .expect("mode serialises")
}

/// Whether the root has any fork (a manifest or a creation claim).
async fn root_has_forks(mirror: &CeilingStore) -> Result<bool, StoreError> {
    if !mirror.list_fork_dirs().await?.is_empty() {
        return Ok(true);
    }
    Ok(!mirror.list_paths(&Path::from(CLAIMS_DIR)).await?.is_empty())
}

/// Make the root's recorded mode `want`, or refuse and say why. Called at
/// start-up; `Err(StoreUnreachable)` when the store cannot be reached (the check
/// is then made again before the first fork operation).
///
/// A switch writes the new mode unsettled first, then looks for forks: a daemon
/// of the old mode that makes a fork checks the record after its claim, so either
/// the switch sees the fork (and puts the old mode back) or that daemon sees the
/// record (and serves nothing of its fork). Only then is the record settled; an
/// interrupted switch is finished (or refused) by the next check.
pub(super) async fn settle_mode(mirror: &CeilingStore, want: ForkIds) -> Result<(), OpenError> {
    for _ in 0..MAX_CONFLICTS {
        let recorded = read_mode(mirror).await?;
        match recorded {
            Some((rec, _)) if rec.fork_ids == want && rec.settled => return Ok(()),
            None => {
                if want == ForkIds::Tree && root_has_forks(mirror).await? {
                    return Err(refusal(ForkIds::Namespace, want));
                }
                match mirror
                    .create_bytes(&mode_path(), mode_bytes(want, true))
                    .await?
                {
                    Written::Won(_) => {
                        tracing::info!(fork_ids = %want, record = MODE_PATH, "the root now records how it counts fork ids");
                        return Ok(());
                    }
                    Written::Lost => continue,
                }
            }
            Some((rec, version)) => {
                let have = rec.fork_ids;
                if root_has_forks(mirror).await? {
                    if have == want {
                        // An interrupted switch to our mode, and forks since or
                        // before: which mode made them cannot be told.
                        return Err(OpenError::InvalidConfig(format!(
                            "{MODE_PATH} records an unfinished switch to fork_ids = \"{want}\" and the root has forks, whose mode cannot be told; check which mode made them, then write {{\"fork_ids\": \"<that mode>\"}} to {MODE_PATH}"
                        )));
                    }
                    return Err(refusal(have, want));
                }
                if have != want {
                    match mirror
                        .replace_bytes(&mode_path(), mode_bytes(want, false), &version)
                        .await?
                    {
                        Written::Won(_) => {}
                        Written::Lost => continue,
                    }
                }
                // A daemon of the old mode may have created a fork meanwhile: then
                // put the old mode back and refuse, as if the fork had been first.
                // (Finishing a switch someone else began, the old mode is unknown:
                // leave the record unsettled and say so.)
                if root_has_forks(mirror).await? {
                    if have == want {
                        return Err(OpenError::InvalidConfig(format!(
                            "{MODE_PATH} records an unfinished switch to fork_ids = \"{want}\" and a fork was made meanwhile, whose mode cannot be told; check which mode made it, then write {{\"fork_ids\": \"<that mode>\"}} to {MODE_PATH}"
                        )));
                    }
                    if let Some((_, v)) = read_mode(mirror).await? {
                        mirror
                            .replace_bytes(&mode_path(), mode_bytes(have, true), &v)
                            .await?;
                    }
                    return Err(refusal(have, want));
                }
                let Some((_, v)) = read_mode(mirror).await? else {
                    continue;
                };
                match mirror
                    .replace_bytes(&mode_path(), mode_bytes(want, true), &v)
                    .await?
                {
                    Written::Won(_) => {}
                    Written::Lost => continue,
                }
                tracing::warn!(from = %have, to = %want, record = MODE_PATH, "the root has no forks: switched how it counts fork ids; every daemon sharing this root must be restarted with the same [allocation] fork_ids");
                return Ok(());
            }
        }
    }
    Err(OpenError::StoreUnreachable(format!(
        "{MODE_PATH}: too many writers contending"
    )))
}

/// The one line a broken mode record answers with, and the way out.
pub(super) fn broken_mode_message(reason: &str) -> String {
    format!(
        "{MODE_PATH} cannot be parsed ({reason}): fork operations are unavailable until it is fixed (the primary keeps serving). Write {{\"fork_ids\": \"namespace\"}} or {{\"fork_ids\": \"tree\"}}, the mode this root's forks were made in; ids stay unique per namespace either way, and no counter is touched"
    )
}

fn refusal(have: ForkIds, want: ForkIds) -> OpenError {
    let why = match (have, want) {
        (ForkIds::Namespace, _) => "its forks counted ids per namespace, so their ids already overlap the primary's and tree mode could not make them unique",
        (ForkIds::Tree, _) => "its forks' ids are unique across the tree, and a database may rely on that to merge them without remapping; counting per namespace from here would end it",
    };
    OpenError::InvalidConfig(format!(
        "allocation.fork_ids = \"{want}\", but this root counts fork ids as \"{have}\" ({MODE_PATH}) and already has forks: {why}. Keep fork_ids = \"{have}\" for this root (every daemon sharing it must agree), or use a new root for \"{want}\""
    ))
}

impl Engine {
    /// The root's mode is the configured one (checked at start-up, or now if the
    /// store could not be reached then). Every fork operation calls this first.
    pub(super) async fn ensure_mode(&self) -> Result<(), ServiceError> {
        self.mode_settled
            .get_or_try_init(|| async {
                settle_mode(&self.store, self.cfg.fork_ids)
                    .await
                    .map_err(|e| match e {
                        OpenError::StoreUnreachable(m) => {
                            ServiceError::unavailable(m, self.retry_hint_ms())
                        }
                        OpenError::CorruptManifest { reason, .. } => {
                            ServiceError::BrokenManifest(broken_mode_message(&reason))
                        }
                        other => ServiceError::Internal(other.to_string()),
                    })
            })
            .await
            .map(|_| ())
    }

    /// Whether the root's mode is still the one this daemon runs in, settled. A
    /// bootstrap checks after its claim and every fork lease before it is taken,
    /// against a switch by another daemon (which needs a root without forks, so
    /// a daemon already serving forks is never switched under).
    pub(super) async fn mode_unchanged(&self) -> Result<(), ServiceError> {
        let hint = self.retry_hint_ms();
        match read_mode(&self.store).await.map_err(|e| store_err(e, hint))? {
            Some((rec, _)) if rec.fork_ids != self.cfg.fork_ids => {
                Err(ServiceError::Internal(format!(
                    "{MODE_PATH} now says fork_ids = \"{}\" but this daemon runs with \"{}\": restart it with the root's setting",
                    rec.fork_ids, self.cfg.fork_ids
                )))
            }
            Some((rec, _)) if !rec.settled => Err(ServiceError::unavailable(
                format!("{MODE_PATH}: a daemon is switching how this root counts fork ids (if it stopped, starting any daemon of this root finishes or undoes the switch)"),
                hint,
            )),
            _ => Ok(()),
        }
    }

    /// Take a lease for a fork in tree mode: win it on the primary's manifest,
    /// then raise the fork's own manifest to its end. The caller holds the fork's
    /// mirror lock; the primary's is taken inside (always fork, then primary).
    pub(super) async fn take_tree_lease(
        &self,
        entry: &Arc<NsEntry>,
        ms: &mut CeilingState,
        kind: Kind,
        need: u64,
    ) -> Result<(), ServiceError> {
        let hint = self.retry_hint_ms();
        let fork_path = entry.path();
        let rate = self.next_rate_growth(ms, kind);
        let size = super::lease::grown(self.cfg.lease_size, rate).max(need);
        for round in 0..MAX_CONFLICTS {
            if round > 0 {
                let pause = rand::random::<u64>() % (1u64 << round.min(6)) + 1;
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
            let fork_cur = self.read_cached(ms, &fork_path).await?;
            self.honour_tombstone(entry, ms, fork_cur.as_ref()).await?;
            let owned = entry.state.lock().unwrap().counters[kind.index()].owned_end();
            let fork_ceiling = fork_cur.as_ref().map_or(0, |v| v.manifest.ceiling(kind));
            // 1. Win [start, end) on the tree's sequence.
            let (start, end) = {
                let mut pms = self.primary.ceiling.lock().await;
                let ppath = self.primary.path();
                let pcur = self.read_cached(&mut pms, &ppath).await?;
                let pceiling = pcur.as_ref().map_or(0, |v| v.manifest.ceiling(kind));
                let start = pceiling.max(fork_ceiling).max(owned);
                let end = super::lease::lease_end(start, size, need).ok_or_else(|| {
                    ServiceError::Exhausted(format!(
                        "{kind} sequence of the tree is at {start}; a lease of {need} would overflow u64"
                    ))
                })?;
                let pmeta = self.primary.snapshot().meta;
                let mut m = manifest_to_rewrite(pcur.as_ref(), &self.primary, &pmeta);
                m.set_ceiling(kind, end);
                // The fork's lease record beside the win on the sequence (see
                // `take_lease`): nothing is installed unless both landed.
                let mut ends = [0; 2];
                ends[kind.index()] = end;
                ends[1 - kind.index()] =
                    entry.state.lock().unwrap().counters[1 - kind.index()].owned_end();
                let (written, recorded) = futures::join!(
                    self.store
                        .write(&ppath, &m, pcur.as_ref().map(|v| &v.version)),
                    self.record_lease(&entry.ns, ms.recorded, ends)
                );
                if let Ok(r) = &recorded {
                    ms.recorded = Some(*r);
                }
                match written {
                    Ok(Written::Won(version)) if recorded.is_err() => {
                        pms.cached = Some(Versioned {
                            manifest: m,
                            version,
                        });
                        return recorded.map(|_| ());
                    }
                    Ok(Written::Won(version)) => {
                        pms.cached = Some(Versioned {
                            manifest: m,
                            version,
                        })
                    }
                    Ok(Written::Lost) => {
                        pms.cached = None;
                        continue;
                    }
                    Err(e) => {
                        pms.cached = None;
                        return Err(store_err(e, hint));
                    }
                }
                (start, end)
            };
            // 2. Record it in the fork's manifest, only upward. Until this wins
            // the ids are nobody's (a gap in the sequence if we stop here).
            let mut cur = fork_cur;
            for _ in 0..MAX_CONFLICTS {
                self.honour_tombstone(entry, ms, cur.as_ref()).await?;
                let ceiling = cur.as_ref().map_or(0, |v| v.manifest.ceiling(kind));
                if ceiling >= end {
                    // Somebody raised the fork past our lease: take another.
                    break;
                }
                let (meta, other_owned) = {
                    let st = entry.state.lock().unwrap();
                    (st.meta.clone(), st.counters[1 - kind.index()].owned_end())
                };
                let other = if kind == Kind::Vid {
                    Kind::Eid
                } else {
                    Kind::Vid
                };
                let mut m = manifest_to_rewrite(cur.as_ref(), entry, &meta);
                m.set_ceiling(kind, end);
                m.set_ceiling(other, m.ceiling(other).max(other_owned));
                match self
                    .store
                    .write(&fork_path, &m, cur.as_ref().map(|v| &v.version))
                    .await
                {
                    Ok(Written::Won(version)) => {
                        ms.cached = Some(Versioned {
                            manifest: m,
                            version,
                        });
                        let start = start.max(ceiling);
                        entry.state.lock().unwrap().counters[kind.index()].install(start, end);
                        self.lease_won(entry, ms, kind, rate, size);
                        metrics::counter!("idalloc_leases_total", "kind" => kind.as_str(), "shape" => "tree")
                            .increment(1);
                        tracing::debug!(namespace = %entry.ns, %kind, start, end, "tree lease taken");
                        if let Err(e) = self.persist(entry).await {
                            tracing::warn!(error = %e, "could not record a new lease locally");
                        }
                        return Ok(());
                    }
                    Ok(Written::Lost) => {
                        ms.cached = None;
                        cur = self.read_cached(ms, &fork_path).await?;
                    }
                    Err(e) => {
                        ms.cached = None;
                        return Err(store_err(e, hint));
                    }
                }
            }
        }
        Err(ServiceError::unavailable(
            format!("lost {MAX_CONFLICTS} conditional writes in a row taking a tree lease for {fork_path}; too many writers contending"),
            hint,
        ))
    }

    /// The manifest at `path` as last known under `ms`, read if unknown.
    pub(super) async fn read_cached(
        &self,
        ms: &mut CeilingState,
        path: &Path,
    ) -> Result<Option<Versioned>, ServiceError> {
        if let Some(v) = &ms.cached {
            return Ok(Some(v.clone()));
        }
        let v = self
            .store
            .read(path)
            .await
            .map_err(|e| store_err(e, self.retry_hint_ms()))?;
        ms.cached = v.clone();
        Ok(v)
    }

    /// A fork manifest that says dropped or merged: record it here and refuse.
    pub(super) async fn honour_tombstone(
        &self,
        entry: &Arc<NsEntry>,
        ms: &mut CeilingState,
        cur: Option<&Versioned>,
    ) -> Result<(), ServiceError> {
        let Some(meta) = cur.and_then(|v| v.manifest.fork_meta()) else {
            return Ok(());
        };
        if !meta.retired() {
            return Ok(());
        }
        {
            let mut st = entry.state.lock().unwrap();
            st.meta.dropped |= meta.dropped;
            if st.meta.merged_into.is_none() {
                st.meta.merged_into.clone_from(&meta.merged_into);
            }
        }
        ms.cached = cur.cloned();
        self.persist(entry).await?;
        Err(entry.retired_error())
    }
}
