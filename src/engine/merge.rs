//! `fork merge`: the database merged a fork's data into an ancestor; from now on
//! that ancestor never grants an id the fork granted.
//!
//! Invariant protected: *merged ids are never granted again*. The steps, each a
//! conditional write, in an order where a crash at any point leaves either the
//! ancestor raised or the merge unacknowledged (and a retry completes it):
//!
//! 1. The fork is tombstoned as merged. Its ceiling is then final: every lease
//!    (tree or namespace) re-reads the fork's manifest before it writes it, sees
//!    the tombstone and refuses, so every id the fork ever granted lies below the
//!    ceiling in the tombstone.
//! 2. Namespace mode: the ancestor's manifest is raised to at least that ceiling,
//!    with a *merged floor* beside it, so that a daemon holding a lease of the
//!    ancestor below it, this one after a crash or one that lost its data
//!    directory, moves above it when it verifies the ancestor. Then this daemon
//!    moves its own counters of the ancestor above it, durably, before replying.
//!    Tree mode: the ancestor's ids come from the tree's sequence and were already
//!    disjoint from the fork's; only its manifest is raised (for a reference
//!    reader) and the reply says so.
//!
//! Namespace mode on a multi-writer root is refused: another daemon may hold a
//! lease of the ancestor below the fork's ids and grant from it without reading
//! the manifest, and nothing written to the store can stop that. Tree mode has
//! no such window.

use std::sync::Arc;

use idalloc_client::error::ServiceError;
use idalloc_client::fork_id::ForkId;
use idalloc_client::namespace::{Kind, Namespace};
use idalloc_client::protocol::{ForkIds, MergeInto, MergeReport, WriterMode};

use super::lease::manifest_to_rewrite;
use super::ns::NsEntry;
use super::store::{Versioned, Written};
use super::{store_err, Engine};

/// Conditional-write conflicts tolerated in one step.
const MAX_CONFLICTS: usize = 32;

/// How the primary is named where a namespace is given as text.
pub const PRIMARY_NAME: &str = "primary";

/// Deeper fork chains than this are taken as a cycle in the metadata.
const MAX_DEPTH: usize = 256;

impl Engine {
    /// Merge `fork` into `into` (see the module doc), as one call. Idempotent: a
    /// second call with the same target changes nothing and says so
    /// (`merged_now: false`); see [`Engine::merge_fork_request`] for retries.
    pub async fn merge_fork(
        &self,
        fork: ForkId,
        into: MergeInto,
    ) -> Result<MergeReport, ServiceError> {
        self.merge_fork_request(fork, into, rand::random()).await
    }

    /// [`Engine::merge_fork`] as one attempt of a request identified by
    /// `request`: every attempt of one request passes the same value, and each
    /// attempt of the request whose tombstone landed is told `merged_now: true`
    /// (the answer does not depend on which attempt wrote it).
    pub async fn merge_fork_request(
        &self,
        fork: ForkId,
        into: MergeInto,
        request: u128,
    ) -> Result<MergeReport, ServiceError> {
        let nonce = format!("{request:032x}");
        let _guard = self.enter()?;
        self.ensure_mode().await?;
        let tree = self.cfg.fork_ids == ForkIds::Tree;
        if !tree && self.store.mode() == WriterMode::MultiWriter {
            return Err(ServiceError::InvalidArgument(format!(
                "fork merge is refused on a shared (multi-writer) root that counts fork ids per namespace: another daemon may hold a lease of the target below fork {fork}'s ids and grant from it without reading the store. Run this root with [allocation] fork_ids = \"tree\" (its forks' ids are disjoint from the start), or merge on a root served by one daemon"
            )));
        }
        let entry = self.entry(Namespace::Fork(fork)).await?;
        self.ensure_verified(&entry).await?;
        let meta = entry.snapshot().meta;
        if meta.dropped {
            return Err(ServiceError::InvalidArgument(format!(
                "fork {fork} was dropped, not merged: its ids are retired and it has nothing to merge"
            )));
        }
        let chain = self.ancestors(&entry).await?;
        let target = match &into {
            MergeInto::Parent => chain[0].clone(),
            MergeInto::Primary => self.primary.clone(),
            MergeInto::Fork(text) => {
                let id = ForkId::parse(text)
                    .map_err(|e| ServiceError::InvalidArgument(format!("--into {text:?}: {e}")))?;
                match chain.iter().find(|a| a.ns == Namespace::Fork(id)) {
                    Some(a) => a.clone(),
                    None => {
                        let names: Vec<String> = chain.iter().map(|a| ns_name(a)).collect();
                        return Err(ServiceError::InvalidArgument(format!(
                            "{text} is not an ancestor of fork {fork} (its ancestors, nearest first: {}); a fork merges only into one of them",
                            names.join(", ")
                        )));
                    }
                }
            }
        };
        let into_name = ns_name(&target);
        if let Some(done) = &meta.merged_into {
            if !same_ns(done, &target) {
                return Err(ServiceError::InvalidArgument(format!(
                    "fork {fork} was already merged into {done}, not {into_name}"
                )));
            }
        }
        // A repeat of a merge that happened is answered as such even if the target
        // was retired since; the checks below are for a merge still to be made.
        // Children merged into this fork: their ids are the fork's now (a child's
        // merge that stopped before raising this fork is covered too), and the
        // tombstone records them in the fork's final ceiling.
        let mut children_end = [0, 0];
        if meta.merged_into.is_none() {
            if target.snapshot().meta.retired() {
                return Err(ServiceError::InvalidArgument(format!(
                    "cannot merge fork {fork} into {into_name}: {}",
                    target.retired_error()
                )));
            }
            let (live, merged_end) = self.children(fork).await?;
            if !live.is_empty() {
                return Err(ServiceError::InvalidArgument(format!(
                    "fork {fork} has live child forks ({}): merge or drop them first, children before parents",
                    live.join(", ")
                )));
            }
            children_end = merged_end;
        }
        let (fork_end, merged_now) = self
            .tombstone_merged(&entry, &target, children_end, &nonce)
            .await?;
        let ceilings = self.raise_target(&target, fork_end, tree).await?;
        let summary = match (tree, merged_now) {
            (_, false) => format!(
                "fork {} was already merged into {into_name}; nothing changed",
                entry_text(&entry)
            ),
            (true, true) => format!(
                "fork {} merged into {into_name}: in tree mode their ids were already disjoint, so nothing had to be raised; the fork is retired",
                entry_text(&entry)
            ),
            (false, true) => format!(
                "fork {} merged into {into_name}: {into_name} now grants only vids from {} and eids from {} up, above every id the fork granted; the fork is retired",
                entry_text(&entry), fork_end[0], fork_end[1]
            ),
        };
        tracing::info!(fork = %fork, into = %into_name, fork_vid_end = fork_end[0], fork_eid_end = fork_end[1], merged_now, "{summary}");
        Ok(MergeReport {
            fork: entry_text(&entry),
            into: into_name,
            fork_vid_end: fork_end[0],
            fork_eid_end: fork_end[1],
            into_vid_ceiling: ceilings[0],
            into_eid_ceiling: ceilings[1],
            fork_ids: self.cfg.fork_ids,
            merged_now,
            summary,
        })
    }

    /// The fork's ancestors, nearest first, ending with the primary; each verified.
    async fn ancestors(&self, entry: &Arc<NsEntry>) -> Result<Vec<Arc<NsEntry>>, ServiceError> {
        let mut chain = Vec::new();
        let mut parent = entry.snapshot().meta.parent;
        while let Some(text) = parent {
            if chain.len() >= MAX_DEPTH {
                return Err(ServiceError::Internal(format!(
                    "the parents of {} form a chain deeper than {MAX_DEPTH} (a cycle in the forks' metadata?)",
                    entry.ns
                )));
            }
            let id = ForkId::parse(&text).map_err(|e| {
                ServiceError::Internal(format!("parent {text:?} of {}: {e}", entry.ns))
            })?;
            let a = self.entry(Namespace::Fork(id)).await?;
            self.ensure_verified(&a).await?;
            parent = a.snapshot().meta.parent;
            chain.push(a);
        }
        chain.push(self.primary.clone());
        Ok(chain)
    }

    /// Forks whose parent is `fork` and that are neither dropped nor merged,
    /// across the whole root (forks other daemons made included); and the end of
    /// the ids of those merged into `fork` (their final ceilings).
    async fn children(&self, fork: ForkId) -> Result<(Vec<String>, [u64; 2]), ServiceError> {
        self.discover_forks().await?;
        let all: Vec<Arc<NsEntry>> = self.forks.read().unwrap().values().cloned().collect();
        let mut live = Vec::new();
        let mut merged_end = [0u64; 2];
        for e in all {
            if e.ns == Namespace::Fork(fork) {
                continue;
            }
            self.ensure_verified(&e).await?;
            let meta = e.snapshot().meta;
            let child = meta
                .parent
                .as_deref()
                .and_then(|p| ForkId::parse(p).ok())
                .is_some_and(|p| p == fork);
            if child && !meta.retired() {
                live.push(entry_text(&e));
            }
            let into_us = meta
                .merged_into
                .as_deref()
                .and_then(|p| ForkId::parse(p).ok())
                .is_some_and(|p| p == fork);
            if child && into_us {
                let hint = self.retry_hint_ms();
                if let Some(v) = self
                    .store
                    .read(&e.path())
                    .await
                    .map_err(|err| store_err(err, hint))?
                {
                    for k in Kind::ALL {
                        merged_end[k.index()] = merged_end[k.index()].max(v.manifest.ceiling(k));
                    }
                }
            }
        }
        Ok((live, merged_end))
    }

    /// Step 1: tombstone the fork as merged into `into`. Returns the fork's final
    /// ceilings and whether this call wrote the tombstone.
    async fn tombstone_merged(
        &self,
        entry: &Arc<NsEntry>,
        target: &NsEntry,
        children_end: [u64; 2],
        nonce: &str,
    ) -> Result<([u64; 2], bool), ServiceError> {
        let into = ns_name(target);
        let into = into.as_str();
        let hint = self.retry_hint_ms();
        let mut ms = entry.ceiling.lock().await;
        let path = entry.path();
        for _ in 0..MAX_CONFLICTS {
            let cur = self
                .store
                .read(&path)
                .await
                .map_err(|e| store_err(e, hint))?;
            let st = entry.snapshot();
            let mut m = manifest_to_rewrite(cur.as_ref(), entry, &st.meta);
            let mut meta = m.fork_meta().unwrap_or_else(|| st.meta.clone());
            if meta.dropped {
                return Err(ServiceError::InvalidArgument(format!(
                    "fork {} was dropped (by another daemon), not merged: it has nothing to merge",
                    entry_text(entry)
                )));
            }
            if let Some(done) = &meta.merged_into {
                if !same_ns(done, target) {
                    return Err(ServiceError::InvalidArgument(format!(
                        "fork {} was already merged into {done} (by another daemon), not {into}",
                        entry_text(entry)
                    )));
                }
                let end = [m.ceiling(Kind::Vid), m.ceiling(Kind::Eid)];
                let ours = meta.merged_by.as_deref() == Some(nonce);
                self.record_merged(entry, done).await?;
                ms.cached = cur;
                return Ok((end, ours));
            }
            meta.merged_into = Some(into.to_string());
            meta.merged_by = Some(nonce.to_string());
            m.set_fork_meta(&meta);
            // Kept apart from the manifest first, so that a repair of a broken
            // manifest keeps the fork retired.
            self.record_retired(entry, &meta).await?;
            for k in Kind::ALL {
                let owned = st.counters[k.index()].owned_end();
                m.set_ceiling(k, m.ceiling(k).max(owned).max(children_end[k.index()]));
            }
            match self
                .store
                .write(&path, &m, cur.as_ref().map(|v| &v.version))
                .await
                .map_err(|e| store_err(e, hint))?
            {
                Written::Won(version) => {
                    let end = [m.ceiling(Kind::Vid), m.ceiling(Kind::Eid)];
                    ms.cached = Some(Versioned {
                        manifest: m,
                        version,
                    });
                    self.record_merged(entry, into).await?;
                    return Ok((end, true));
                }
                Written::Lost => continue,
            }
        }
        Err(ServiceError::unavailable(
            format!("could not write the merge tombstone of {path}: too many writers contending"),
            hint,
        ))
    }

    async fn record_merged(&self, entry: &Arc<NsEntry>, into: &str) -> Result<(), ServiceError> {
        entry.state.lock().unwrap().meta.merged_into = Some(into.to_string());
        self.persist(entry).await
    }

    /// Step 2: the target's manifest at or above `end` (with the merged floor in
    /// namespace mode), and this daemon's counters of it above `end`. Returns
    /// the target's ceilings afterwards.
    async fn raise_target(
        &self,
        target: &Arc<NsEntry>,
        end: [u64; 2],
        tree: bool,
    ) -> Result<[u64; 2], ServiceError> {
        let hint = self.retry_hint_ms();
        let mut ms = target.ceiling.lock().await;
        let path = target.path();
        // This daemon's own grants first (they take ids under the state lock):
        // from here on none is below `end`. A crash before the manifest is
        // raised leaves local counters above it, which verification writes up.
        if !tree {
            {
                let mut st = target.state.lock().unwrap();
                for k in Kind::ALL {
                    st.counters[k.index()].skip_to(end[k.index()]);
                }
            }
            self.persist(target).await?;
        }
        for _ in 0..MAX_CONFLICTS {
            let cur = self
                .store
                .read(&path)
                .await
                .map_err(|e| store_err(e, hint))?;
            let st = target.snapshot();
            let mut m = manifest_to_rewrite(cur.as_ref(), target, &st.meta);
            let mut changed = cur.is_none();
            for k in Kind::ALL {
                let i = k.index();
                if m.ceiling(k) < end[i] {
                    m.set_ceiling(k, end[i]);
                    changed = true;
                }
                if !tree && m.merged_floor(k) < end[i] {
                    m.raise_merged_floor(k, end[i]);
                    changed = true;
                }
            }
            let ceilings = [m.ceiling(Kind::Vid), m.ceiling(Kind::Eid)];
            if changed {
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
                        })
                    }
                    Written::Lost => continue,
                }
            } else {
                ms.cached = cur;
            }
            return Ok(ceilings);
        }
        Err(ServiceError::unavailable(
            format!("could not raise {path} above the merged fork: too many writers contending"),
            hint,
        ))
    }
}

/// A namespace's name in replies and tombstones: its fork id's text, or `primary`.
fn ns_name(e: &NsEntry) -> String {
    e.fork()
        .map(|f| f.text())
        .unwrap_or_else(|| PRIMARY_NAME.to_string())
}

fn entry_text(e: &NsEntry) -> String {
    e.fork().map(|f| f.text()).unwrap_or_default()
}

/// Whether a recorded target names this namespace (either spelling of a fork).
fn same_ns(recorded: &str, target: &NsEntry) -> bool {
    match target.ns {
        Namespace::Primary => recorded == PRIMARY_NAME,
        Namespace::Fork(id) => ForkId::parse(recorded).is_ok_and(|r| r == id),
    }
}
