//! Verification: a namespace's local state checked against every manifest of it
//! before the namespace serves or reports anything.
//!
//! Invariants protected: *unique* (1) and *never guess* (8).
//!
//! - A `stale` namespace (local state not trusted at start-up, or adopted from the
//!   store) moves above the highest ceiling found, with no lease.
//! - A trusted namespace whose manifest is below what it owns raises the manifest
//!   (a rolled-back file, or one lowered by hand), so nobody else can lease its ids;
//!   in single-writer mode a ceiling above what it owns means sled is stale or
//!   someone else wrote: it resumes above the ceiling.
//! - A fork is looked up under both spellings of its id. When both have a manifest
//!   (forks created before claims existed), the fork's claim decides which one
//!   is written from now on — created here if missing, so that every daemon picks
//!   the same — and that one is raised above the other.
//! - A manifest that does not parse makes the namespace unavailable with an error
//!   naming it, on every call; nothing is guessed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use idalloc_client::error::ServiceError;
use idalloc_client::fork_id::ForkId;
use idalloc_client::namespace::{Kind, Namespace};
use idalloc_client::protocol::{ForkIds, WriterMode};

use super::forks::{claim_path, other_spelling, Claim};
use super::lease::manifest_to_rewrite;
use super::ns::{CeilingState, NsEntry};
use super::store::manifest::{path_for, ForkMeta, Manifest};
use super::store::{Versioned, Written};
use super::{store_err, Engine};

/// Conditional-write conflicts tolerated in one verification.
const MAX_CONFLICTS: usize = 32;

/// What the store holds about a namespace.
struct Evidence {
    /// The manifest at the namespace's path (after any change of spelling).
    cur: Option<Versioned>,
    /// Ceilings found elsewhere: the other spelling's manifest, or the claim's
    /// initial manifest when neither spelling has one.
    other: Option<Manifest>,
    /// Both spellings have a manifest (a fork made before claims): other daemons
    /// may hold live leases on the other one, so local leases are not exclusive.
    two_spellings: bool,
}

impl Evidence {
    fn ceiling(&self, kind: Kind) -> u64 {
        let a = self.cur.as_ref().map_or(0, |v| v.manifest.ceiling(kind));
        let b = self.other.as_ref().map_or(0, |m| m.ceiling(kind));
        a.max(b)
    }

    fn meta(&self) -> Option<ForkMeta> {
        self.cur
            .as_ref()
            .and_then(|v| v.manifest.fork_meta())
            .or_else(|| self.other.as_ref().and_then(|m| m.fork_meta()))
    }

    fn merged_into(&self) -> Option<String> {
        let a = self.cur.as_ref().and_then(|v| v.manifest.fork_meta());
        let b = self.other.as_ref().and_then(|m| m.fork_meta());
        a.and_then(|m| m.merged_into)
            .or_else(|| b.and_then(|m| m.merged_into))
    }

    /// The floor forks merged into this namespace left (see `merge`).
    fn merged_floor(&self, kind: Kind) -> u64 {
        let a = self
            .cur
            .as_ref()
            .map_or(0, |v| v.manifest.merged_floor(kind));
        let b = self.other.as_ref().map_or(0, |m| m.merged_floor(kind));
        a.max(b)
    }

    fn dropped(&self) -> bool {
        let a = self.cur.as_ref().and_then(|v| v.manifest.fork_meta());
        let b = self.other.as_ref().and_then(|m| m.fork_meta());
        a.is_some_and(|m| m.dropped) || b.is_some_and(|m| m.dropped)
    }
}

impl Engine {
    /// The end of the highest lease any fork of this daemon holds, per kind.
    pub(super) fn forks_owned_end(&self) -> [u64; 2] {
        let forks: Vec<_> = self.forks.read().unwrap().values().cloned().collect();
        let mut end = [0, 0];
        for f in forks {
            let st = f.snapshot();
            for k in Kind::ALL {
                end[k.index()] = end[k.index()].max(st.counters[k.index()].owned_end());
            }
        }
        end
    }

    /// Verify `entry` once per life before it serves or reports anything.
    pub(super) async fn ensure_verified(&self, entry: &Arc<NsEntry>) -> Result<(), ServiceError> {
        if entry.verified.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut ms = entry.ceiling.lock().await;
        if entry.verified.load(Ordering::Acquire) {
            return Ok(());
        }
        let res = self.verify(entry, &mut ms).await;
        if let Err(ServiceError::BrokenManifest(msg)) = &res {
            let mut last = entry.broken.lock().unwrap();
            if last.as_deref() != Some(msg.as_str()) {
                tracing::error!(namespace = %entry.ns, error = %msg, "namespace unavailable: its manifest cannot be parsed");
                *last = Some(msg.clone());
            }
        }
        res
    }

    /// Read every manifest of the namespace; for a fork, settle which spelling it
    /// lives under. The caller holds the namespace's mirror lock.
    async fn evidence(&self, entry: &Arc<NsEntry>) -> Result<Evidence, ServiceError> {
        let hint = self.retry_hint_ms();
        let read = |p: object_store::path::Path| async move {
            self.store.read(&p).await.map_err(|e| store_err(e, hint))
        };
        let Some(id) = entry.fork() else {
            return Ok(Evidence {
                cur: read(path_for(&Namespace::Primary)).await?,
                other: None,
                two_spellings: false,
            });
        };
        let alt = other_spelling(id);
        let (mine, theirs) = futures::join!(
            read(path_for(&Namespace::Fork(id))),
            read(path_for(&Namespace::Fork(alt)))
        );
        let (mine, theirs) = (mine?, theirs?);
        match (mine, theirs) {
            (Some(m), None) => Ok(Evidence {
                cur: Some(m),
                other: None,
                two_spellings: false,
            }),
            (None, Some(t)) => {
                // The fork lives under the other spelling.
                entry.set_spelling(alt);
                Ok(Evidence {
                    cur: Some(t),
                    other: None,
                    two_spellings: false,
                })
            }
            (Some(m), Some(t)) => {
                let claim = self.settle_claim(id).await?;
                // ForkId equality is the value alone: compare the spellings.
                if claim.form() == alt.form() {
                    entry.set_spelling(alt);
                    Ok(Evidence {
                        cur: Some(t),
                        other: Some(m.manifest),
                        two_spellings: true,
                    })
                } else {
                    Ok(Evidence {
                        cur: Some(m),
                        other: Some(t.manifest),
                        two_spellings: true,
                    })
                }
            }
            (None, None) => {
                // No manifest under either spelling: a creation not completed yet,
                // or manifests deleted by hand. The claim's floors are evidence.
                let claim = self.read_claim(id).await?;
                if let Some(c) = &claim {
                    if let Ok(spelling) = ForkId::parse(&c.fork) {
                        entry.set_spelling(spelling);
                    }
                }
                Ok(Evidence {
                    cur: None,
                    other: claim.map(|c| c.manifest),
                    two_spellings: false,
                })
            }
        }
    }

    /// The spelling a fork with manifests under both spellings is written under
    /// from now on: the claim's, creating the claim (naming `id`'s spelling) if
    /// there is none, so that every daemon settles on the same one.
    async fn settle_claim(&self, id: ForkId) -> Result<ForkId, ServiceError> {
        if let Some(c) = self.read_claim(id).await? {
            return Ok(ForkId::parse(&c.fork).unwrap_or(id));
        }
        let claim = Claim {
            fork: id.text(),
            nonce: format!("{:032x}", rand::random::<u128>()),
            manifest: Manifest::new(0, 0),
        };
        let bytes = serde_json::to_vec_pretty(&claim).expect("claim serialises");
        self.store
            .create_bytes(&claim_path(id), bytes)
            .await
            .map_err(|e| store_err(e, self.retry_hint_ms()))?;
        let settled = match self.read_claim(id).await? {
            Some(c) => ForkId::parse(&c.fork).unwrap_or(id),
            None => id,
        };
        tracing::warn!(fork = %id, spelling = %settled, "fork has manifests under both spellings of its id (made before fork claims); writing only this one from now on, above both");
        Ok(settled)
    }

    /// Reconcile local state with the store (see the module doc). The caller holds
    /// the namespace's mirror lock.
    pub(super) async fn verify(
        &self,
        entry: &Arc<NsEntry>,
        ms: &mut CeilingState,
    ) -> Result<(), ServiceError> {
        let hint = self.retry_hint_ms();
        for _ in 0..MAX_CONFLICTS {
            let ev = self.evidence(entry).await?;
            let path = entry.path();
            let mut raise = false;
            // In tree mode the primary's ceiling also covers the leases this
            // daemon's forks took from the tree's sequence: those are ours too.
            let forks_owned = if self.cfg.fork_ids == ForkIds::Tree && entry.fork().is_none() {
                self.forks_owned_end()
            } else {
                [0, 0]
            };
            {
                let mut st = entry.state.lock().unwrap();
                if st.stale && entry.fork().is_some() {
                    if let Some(meta) = ev.meta() {
                        st.meta = meta;
                    } else if st.meta == ForkMeta::default() {
                        // A manifest written by the reference allocator: no metadata.
                        st.meta.floor_vid = ev.ceiling(Kind::Vid);
                        st.meta.floor_eid = ev.ceiling(Kind::Eid);
                    }
                }
                st.meta.dropped |= ev.dropped();
                if st.meta.merged_into.is_none() {
                    st.meta.merged_into = ev.merged_into();
                }
                // A legacy fork under two spellings: another daemon may have leased
                // the ids of our lease on the other manifest, so ours are not ours.
                let stale = st.stale || ev.two_spellings;
                for kind in Kind::ALL {
                    let c = &mut st.counters[kind.index()];
                    let ceiling = ev.ceiling(kind);
                    let owned = c.owned_end();
                    if stale {
                        c.jump_to(ceiling);
                    } else if ceiling > owned.max(forks_owned[kind.index()])
                        && self.store.mode() == WriterMode::SingleWriter
                    {
                        tracing::warn!(
                            namespace = %entry.ns, %kind, local = owned, manifest = ceiling,
                            "manifest ceiling is above the lease recorded locally: local state is stale or another writer used this root; resuming above the ceiling"
                        );
                        c.jump_to(ceiling);
                    }
                    c.skip_to(ev.merged_floor(kind));
                    let mine = ev.cur.as_ref().map_or(0, |v| v.manifest.ceiling(kind));
                    if mine < c.owned_end().max(ceiling).max(forks_owned[kind.index()]) {
                        raise = true;
                    }
                }
            }
            if raise {
                let st = entry.snapshot();
                let mut m = manifest_to_rewrite(ev.cur.as_ref(), entry, &st.meta);
                if m.fork_meta().is_none() && entry.fork().is_some() {
                    m.set_fork_meta(&st.meta);
                }
                for kind in Kind::ALL {
                    // In tree mode the primary is the sequence: above our forks' leases too.
                    let target = st.counters[kind.index()]
                        .owned_end()
                        .max(ev.ceiling(kind))
                        .max(forks_owned[kind.index()]);
                    if m.ceiling(kind) < target {
                        tracing::warn!(
                            manifest = %path, %kind, ceiling = m.ceiling(kind), raised_to = target,
                            "manifest is below what this daemon owns or what another manifest of it says; raising it before serving"
                        );
                        m.set_ceiling(kind, target);
                    }
                }
                match self
                    .store
                    .write(&path, &m, ev.cur.as_ref().map(|v| &v.version))
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
                ms.cached = ev.cur;
            }
            entry.state.lock().unwrap().stale = false;
            self.persist(entry).await?;
            entry.verified.store(true, Ordering::Release);
            *entry.broken.lock().unwrap() = None;
            return Ok(());
        }
        Err(ServiceError::unavailable(
            format!(
                "could not verify {}: too many writers contending",
                entry.path()
            ),
            hint,
        ))
    }
}
