//! The operator's way out of a broken manifest: an explicit floor, written only
//! upward.
//!
//! Invariant protected: *never guess* (8) without ever lowering a counter, and
//! *unique* (1) through the repair. The manifest written holds, per kind, the
//! highest of: the floor the operator gave (the highest id the database holds,
//! plus one), the manifest's own ceiling if it parses, the other spelling's
//! manifest, the fork's claim, every daemon's lease record of the namespace
//! (`lease_record`: on a shared root the ids the database holds are not all the
//! ids taken, since another daemon may still grant from a lease it holds without
//! reading the store), and everything this daemon's local state has granted or
//! leased. The namespace then resumes above it, with no lease. A fork keeps its
//! metadata, from the claim (parent, floors) and its retirement record, so a
//! dropped or merged fork stays retired.

use std::sync::atomic::Ordering;

use idalloc_client::error::ServiceError;
use idalloc_client::fork_id::ForkId;
use idalloc_client::namespace::{Kind, Namespace};
use idalloc_client::protocol::RepairReport;

use super::forks::{claim_path, other_spelling, Claim};
use super::store::manifest::{path_for, ForkMeta, Manifest};
use super::store::{Versioned, Written};
use super::{store_err, Engine};

impl Engine {
    /// Write `ns`'s manifest at or above the given floors and every other
    /// evidence, and resume the namespace above it.
    pub async fn repair(
        &self,
        ns: Namespace,
        vid_floor: u64,
        eid_floor: u64,
    ) -> Result<RepairReport, ServiceError> {
        let _guard = self.enter()?;
        let entry = match ns {
            Namespace::Primary => self.primary.clone(),
            Namespace::Fork(id) => {
                let _b = self.bootstrap_lock.lock().await;
                let known = self.forks.read().unwrap().get(&id).cloned();
                match known {
                    Some(e) => e,
                    None => match self.find_fork(id).await {
                        Ok(Some(spelling)) => self.adopt(spelling).await?,
                        Ok(None) => return Err(ServiceError::UnknownFork(id.text())),
                        // A broken claim cannot say which spelling the fork lives
                        // under: the one with a manifest does (daemons that know
                        // the fork write there), else the spelling given.
                        Err(ServiceError::BrokenManifest(_)) => {
                            let mut spelling = id;
                            for s in [id, other_spelling(id)] {
                                let there = self
                                    .store
                                    .read_bytes(&path_for(&Namespace::Fork(s)))
                                    .await
                                    .map_err(|e| store_err(e, self.retry_hint_ms()))?;
                                if there.is_some() {
                                    spelling = s;
                                    break;
                                }
                            }
                            self.adopt(spelling).await?
                        }
                        Err(e) => return Err(e),
                    },
                }
            }
        };
        let hint = self.retry_hint_ms();
        let mut ms = entry.ceiling.lock().await;
        let path = entry.path();
        let raw = self
            .store
            .read_bytes(&path)
            .await
            .map_err(|e| store_err(e, hint))?;
        let mut evidence = vec![format!("floor given: vid {vid_floor}, eid {eid_floor}")];
        let mut target = [vid_floor, eid_floor];
        let raise =
            |what: String, vals: [u64; 2], target: &mut [u64; 2], evidence: &mut Vec<String>| {
                evidence.push(format!("{what}: vid {}, eid {}", vals[0], vals[1]));
                target[0] = target[0].max(vals[0]);
                target[1] = target[1].max(vals[1]);
            };
        let (before, base) = match &raw {
            None => ("no manifest".to_string(), None),
            Some((bytes, _)) => match Manifest::parse(&path, bytes) {
                Ok(m) => {
                    let vals = [m.next_vid_batch, m.next_eid_batch];
                    raise(format!("{path}"), vals, &mut target, &mut evidence);
                    (format!("vid {}, eid {}", vals[0], vals[1]), Some(m))
                }
                Err(reason) => (format!("unparseable ({reason})"), None),
            },
        };
        let mut claimed_meta = None;
        let mut retired = None;
        if let Some(id) = entry.fork() {
            retired = self.read_retired(id).await?;
            let alt: ForkId = other_spelling(id);
            let alt_path = path_for(&Namespace::Fork(alt));
            // The other spelling is evidence only if it parses; a broken one is
            // repaired by naming that spelling.
            if let Ok(Some(v)) = self.store.read(&alt_path).await {
                raise(
                    format!("{alt_path}"),
                    [v.manifest.next_vid_batch, v.manifest.next_eid_batch],
                    &mut target,
                    &mut evidence,
                );
            }
            match self.read_claim(id).await {
                Ok(Some(c)) => {
                    raise(
                        "the fork's claim (its initial floors)".to_string(),
                        [c.manifest.next_vid_batch, c.manifest.next_eid_batch],
                        &mut target,
                        &mut evidence,
                    );
                    claimed_meta = c.manifest.fork_meta();
                }
                Ok(None) => {}
                Err(ServiceError::BrokenManifest(_)) => {
                    self.rewrite_broken_claim(id).await?;
                    evidence.push(format!(
                        "{}: unparseable, rewritten to name {id}",
                        claim_path(id)
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        let tree_primary =
            self.cfg.fork_ids == idalloc_client::protocol::ForkIds::Tree && entry.fork().is_none();
        // In tree mode every namespace leases from the primary's sequence, so the
        // primary's repair stands above every record of the root.
        let recorded = self
            .recorded_leases((!tree_primary).then_some(&entry.ns))
            .await?;
        raise(
            format!(
                "lease records of the daemons on this root ({} record{})",
                recorded.records.len(),
                if recorded.records.len() == 1 { "" } else { "s" }
            ),
            recorded.ends,
            &mut target,
            &mut evidence,
        );
        if tree_primary {
            // The primary is the tree's sequence: above every fork's ids too.
            raise(
                "this daemon's fork leases (tree mode)".to_string(),
                self.forks_owned_end(),
                &mut target,
                &mut evidence,
            );
            let dirs = self
                .store
                .list_fork_dirs()
                .await
                .map_err(|e| store_err(e, self.retry_hint_ms()))?;
            for dir in dirs {
                let p = super::store::manifest::fork_path(&dir);
                if let Ok(Some(v)) = self.store.read(&p).await {
                    raise(
                        format!("{p} (tree mode)"),
                        [v.manifest.next_vid_batch, v.manifest.next_eid_batch],
                        &mut target,
                        &mut evidence,
                    );
                }
            }
        }
        let st = entry.snapshot();
        let local = Kind::ALL.map(|k| {
            let c = st.counters[k.index()];
            c.owned_end().max(c.granted)
        });
        raise(
            "this daemon's local state".to_string(),
            local,
            &mut target,
            &mut evidence,
        );
        let mut m = base.unwrap_or_else(|| Manifest::new(0, 0));
        if entry.fork().is_some() {
            // What is known of the fork, from the manifest if it parsed, else this
            // daemon's record or the claim; retired if anything says so.
            let mut meta = m
                .fork_meta()
                .or_else(|| (st.meta != ForkMeta::default()).then(|| st.meta.clone()))
                .or(claimed_meta)
                .unwrap_or_else(|| st.meta.clone());
            for r in [Some(&st.meta), retired.as_ref()].into_iter().flatten() {
                meta.dropped |= r.dropped;
                if meta.merged_into.is_none() && !meta.dropped {
                    meta.merged_into.clone_from(&r.merged_into);
                    meta.merged_by.clone_from(&r.merged_by);
                }
            }
            if meta.retired() {
                evidence.push(format!(
                    "the fork is retired ({}): it stays so",
                    meta.merged_into
                        .as_deref()
                        .map_or("dropped".to_string(), |i| format!("merged into {i}"))
                ));
            }
            m.set_fork_meta(&meta);
            let mut st = entry.state.lock().unwrap();
            if st.meta == ForkMeta::default() {
                // Known here only from the store (adopted): what the repair found.
                st.meta = meta;
            } else {
                st.meta.dropped |= meta.dropped;
                if st.meta.merged_into.is_none() {
                    st.meta.merged_into = meta.merged_into;
                }
            }
        }
        for k in Kind::ALL {
            m.set_ceiling(k, target[k.index()]);
        }
        // Replace exactly what was read (its version), whatever it held: a
        // concurrent writer makes this fail rather than be overwritten.
        let written = match &raw {
            None => self.store.write(&path, &m, None).await,
            Some((_, version)) => self.store.write(&path, &m, Some(version)).await,
        }
        .map_err(|e| store_err(e, hint))?;
        let version = match written {
            Written::Won(v) => v,
            Written::Lost => {
                return Err(ServiceError::unavailable(
                    format!("{path} changed while it was being repaired; run the repair again"),
                    hint,
                ))
            }
        };
        {
            let mut st = entry.state.lock().unwrap();
            for k in Kind::ALL {
                st.counters[k.index()].jump_to(target[k.index()]);
            }
            st.stale = false;
        }
        ms.cached = Some(Versioned {
            manifest: m,
            version,
        });
        self.persist(&entry).await?;
        entry.verified.store(true, Ordering::Release);
        *entry.broken.lock().unwrap() = None;
        tracing::warn!(manifest = %path, before = %before, vid = target[0], eid = target[1], "manifest repaired from an explicit floor (only upward)");
        Ok(RepairReport {
            manifest: path.to_string(),
            before,
            vid_ceiling: target[0],
            eid_ceiling: target[1],
            evidence,
        })
    }

    /// Replace a fork claim that does not parse with one naming `id`'s spelling
    /// (conditional on the broken version, so a concurrent fix wins instead).
    async fn rewrite_broken_claim(&self, id: ForkId) -> Result<(), ServiceError> {
        let hint = self.retry_hint_ms();
        let path = claim_path(id);
        let Some((_, version)) = self
            .store
            .read_bytes(&path)
            .await
            .map_err(|e| store_err(e, hint))?
        else {
            return Ok(());
        };
        let claim = Claim {
            fork: id.text(),
            nonce: format!("{:032x}", rand::random::<u128>()),
            manifest: Manifest::new(0, 0),
        };
        let bytes = serde_json::to_vec_pretty(&claim).expect("claim serialises");
        self.store
            .replace_bytes(&path, bytes, &version)
            .await
            .map_err(|e| store_err(e, hint))?;
        Ok(())
    }
}
