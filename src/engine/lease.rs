//! Taking leases from the object store, verifying a manifest against local state,
//! and giving unused leases back (checkpoint).
//!
//! Invariants protected: *unique* (1) — a lease is `[max(ceiling, what we own),
//! new ceiling)` and is ours only once the conditional write raising the ceiling
//! won; a lost or failed write leaves every counter as it was. *Durable before
//! reply* (2) — ids are taken only from leases already written. *Bounded gap* (7) —
//! checkpoint releases a lease locally (durably) *before* lowering the manifest, so a
//! crash in between leaves a gap, never a lease two owners believe in.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use idalloc_client::error::ServiceError;
use idalloc_client::namespace::{Kind, Namespace};
use idalloc_client::protocol::{ForkIds, Hwm};

use super::ns::{CeilingState, NsEntry};
use super::store::manifest::{ForkMeta, Manifest};
use super::store::{Versioned, Written};
use super::{store_err, Engine};

/// Conditional-write conflicts tolerated in one call before giving up for now.
const MAX_CONFLICTS: usize = 32;

/// Under contention a namespace's leases grow to at most `lease_size << 2`: fewer,
/// larger leases mean fewer races between the daemons sharing the root, at the
/// price of a larger gap should this daemon lose its data directory (rule 7: at
/// most this daemon's current lease plus one prefetched, each at most 4 x
/// `lease_size`).
pub(super) const MAX_LEASE_GROWTH: u32 = 2;

/// Leases won at the first try, in a row, before the lease size steps back down.
const SHRINK_AFTER_CLEAN_WINS: u32 = 4;

/// While leases run out faster than `lease_min_life`, each is twice the one
/// before, up to `lease_size << 4`. Without it a fast writer makes the lease,
/// with its store write, a per-millisecond event: at 150k reservations of 1000
/// ids a second, a lease of a million ids lasts 7 ms, and a lease that takes
/// longer than the half left when it is prefetched stalls every writer
/// (docs/performance.md). Rule 7's bound grows with it: a current and a
/// prefetched lease, each at most `lease_size << (MAX_LEASE_GROWTH + MAX_RATE_GROWTH)`.
pub(super) const MAX_RATE_GROWTH: u32 = 4;

/// A lease lasting over this many times `lease_min_life` steps the size back down
/// (after a doubling a lease lasts twice as long, so the sizes do not flap).
const RATE_SHRINK_FACTOR: u32 = 8;

impl Engine {
    /// Make sure `count` ids of `kind` can be taken, taking a lease if needed.
    pub(super) async fn lease(
        &self,
        entry: &Arc<NsEntry>,
        kind: Kind,
        count: u64,
    ) -> Result<(), ServiceError> {
        let mut ms = entry.ceiling.lock().await;
        if entry.state.lock().unwrap().counters[kind.index()].can_take(count) {
            return Ok(());
        }
        if let Some((at, msg)) = &ms.last_failure {
            let cooldown = self.cfg.unavailable_cooldown;
            if at.elapsed() < cooldown {
                let left = (cooldown - at.elapsed()).as_millis().max(1) as u64;
                return Err(ServiceError::unavailable(
                    format!("no lease for {kind} ids in {}: {msg}", entry.ns),
                    left,
                ));
            }
        }
        match self.take_lease(entry, &mut ms, kind, count).await {
            Ok(()) => {
                ms.last_failure = None;
                Ok(())
            }
            Err(e) => {
                ms.last_failure = Some((Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    /// Raise the ceiling of `kind` by at least `need` with a conditional write and
    /// install the lease won. The caller holds the namespace's mirror lock.
    pub(super) async fn take_lease(
        &self,
        entry: &Arc<NsEntry>,
        ms: &mut CeilingState,
        kind: Kind,
        need: u64,
    ) -> Result<(), ServiceError> {
        if entry.fork().is_some() {
            self.ensure_mode().await?;
            self.mode_unchanged().await?;
            if self.cfg.fork_ids == ForkIds::Tree {
                return self.take_tree_lease(entry, ms, kind, need).await;
            }
        }
        let path = entry.path();
        let hint = self.retry_hint_ms();
        let rate = self.next_rate_growth(ms, kind);
        let other = match kind {
            Kind::Vid => Kind::Eid,
            Kind::Eid => Kind::Vid,
        };
        // Another writer won the last round: back off a random while, so that
        // contending daemons take turns instead of one winning every race
        // (a cap of 1 ms doubling to 64 ms, the pause anywhere below it).
        let mut pauses = {
            use backon::BackoffBuilder;
            backon::ExponentialBuilder::default()
                .with_min_delay(std::time::Duration::from_millis(1))
                .with_max_delay(std::time::Duration::from_millis(64))
                .without_max_times()
                .build()
        };
        for lost in 0..MAX_CONFLICTS {
            if lost > 0 {
                if let Some(cap) = pauses.next() {
                    // Full jitter: anywhere below the cap, so that a daemon that
                    // keeps losing still gets short waits, not ever longer ones.
                    tokio::time::sleep(cap.mul_f64(rand::random::<f64>())).await;
                }
            }
            let cur = match &ms.cached {
                Some(v) => Some(v.clone()),
                None => self
                    .store
                    .read(&path)
                    .await
                    .map_err(|e| store_err(e, hint))?,
            };
            // Another daemon dropped or merged this fork: honour the tombstone.
            self.honour_tombstone(entry, ms, cur.as_ref()).await?;
            let (owned, other_owned, meta) = {
                let st = entry.state.lock().unwrap();
                (
                    st.counters[kind.index()].owned_end(),
                    st.counters[other.index()].owned_end(),
                    st.meta.clone(),
                )
            };
            let ceiling = cur.as_ref().map_or(0, |v| v.manifest.ceiling(kind));
            // Never below the ceiling (others' ids) nor below what we own (ours).
            let start = ceiling.max(owned);
            let growth = if lost > 0 {
                (ms.lease_growth + 1).min(MAX_LEASE_GROWTH)
            } else if ms.clean_wins + 1 >= SHRINK_AFTER_CLEAN_WINS {
                ms.lease_growth.saturating_sub(1)
            } else {
                ms.lease_growth
            };
            let size = grown(self.cfg.lease_size, growth + rate).max(need);
            let Some(end) = lease_end(start, size, need) else {
                return Err(ServiceError::Exhausted(format!(
                    "{kind} ceiling of {} is at {start}; a lease of {need} would overflow u64",
                    entry.ns
                )));
            };
            let mut m = manifest_to_rewrite(cur.as_ref(), entry, &meta);
            m.set_ceiling(kind, end);
            m.set_ceiling(other, m.ceiling(other).max(other_owned));
            // The lease record is written beside the conditional write: a lease is
            // installed only once both landed, so a repair always sees it. A
            // record of a lease lost to another daemon says too much, which only
            // costs ids at a repair.
            let mut ends = [0; 2];
            ends[kind.index()] = end;
            ends[other.index()] = other_owned;
            let (written, recorded) = futures::join!(
                self.store
                    .write(&path, &m, cur.as_ref().map(|v| &v.version)),
                self.record_lease(&entry.ns, ms.recorded, ends)
            );
            if let Ok(r) = &recorded {
                ms.recorded = Some(*r);
            }
            match written {
                Ok(Written::Won(version)) if recorded.is_err() => {
                    // The ceiling is raised but the lease is not covered by our
                    // record: leave it unused (a gap) rather than grant from it.
                    ms.cached = Some(Versioned {
                        manifest: m,
                        version,
                    });
                    return recorded.map(|_| ());
                }
                Ok(Written::Won(version)) => {
                    ms.cached = Some(Versioned {
                        manifest: m,
                        version,
                    });
                    ms.clean_wins = if lost > 0 || growth != ms.lease_growth {
                        0
                    } else {
                        ms.clean_wins + 1
                    };
                    if growth != ms.lease_growth {
                        tracing::info!(
                            namespace = %entry.ns, %kind, lease = size,
                            "{} lease size: {}",
                            if growth > ms.lease_growth { "raised" } else { "lowered" },
                            if growth > ms.lease_growth {
                                "other daemons won conditional writes first"
                            } else {
                                "the last leases were won at the first try"
                            }
                        );
                        ms.lease_growth = growth;
                    }
                    if entry.ns == Namespace::Primary {
                        metrics::gauge!("idalloc_primary_lease_size_ids", "kind" => kind.as_str())
                            .set(size as f64);
                    }
                    entry.state.lock().unwrap().counters[kind.index()].install(start, end);
                    self.lease_won(entry, ms, kind, rate, size);
                    let shape = if start == owned { "dense" } else { "jump" };
                    metrics::counter!("idalloc_leases_total", "kind" => kind.as_str(), "shape" => shape)
                        .increment(1);
                    if start != owned {
                        tracing::info!(
                            namespace = %entry.ns, %kind, from = owned, to = start,
                            "the ceiling was moved by another writer; the next lease starts above it"
                        );
                    }
                    tracing::debug!(namespace = %entry.ns, %kind, start, end, "lease taken");
                    // Record the lease so that a restart resumes inside it (no gap).
                    // The lease is ours whether or not this lands.
                    if let Err(e) = self.persist(entry).await {
                        tracing::warn!(error = %e, "could not record a new lease locally");
                    }
                    return Ok(());
                }
                Ok(Written::Lost) => {
                    ms.cached = None;
                    continue;
                }
                Err(e) => {
                    // The write may or may not have landed: forget the version, so the
                    // next attempt re-reads and, if it did land, starts above it.
                    ms.cached = None;
                    return Err(store_err(e, hint));
                }
            }
        }
        Err(ServiceError::unavailable(
            format!(
                "lost {MAX_CONFLICTS} conditional writes in a row on {path}; too many writers contending"
            ),
            hint,
        ))
    }

    /// Take the next lease in the background once the current one is running low.
    pub(super) fn maybe_prefetch(&self, entry: &Arc<NsEntry>, kind: Kind) {
        let k = kind.index();
        let low = {
            let st = entry.state.lock().unwrap();
            let c = &st.counters[k];
            c.next.is_none() && c.headroom() <= self.prefetch_threshold(entry, k)
        };
        if !low || entry.prefetching[k].swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(engine) = self.me.upgrade() else {
            entry.prefetching[k].store(false, Ordering::SeqCst);
            return;
        };
        let entry = entry.clone();
        tokio::spawn(async move {
            let mut ms = entry.ceiling.lock().await;
            let still_low = {
                let st = entry.state.lock().unwrap();
                let c = &st.counters[k];
                c.next.is_none() && c.headroom() <= engine.prefetch_threshold(&entry, k)
            };
            if still_low && !engine.shutting_down.load(Ordering::SeqCst) {
                match engine.take_lease(&entry, &mut ms, kind, 1).await {
                    Ok(()) => ms.last_failure = None,
                    Err(e) => {
                        tracing::warn!(
                            namespace = %entry.ns, %kind, error = %e,
                            "could not take the next lease ahead of need; reservations continue inside the current one"
                        );
                        ms.last_failure = Some((Instant::now(), e.to_string()));
                    }
                }
            }
            drop(ms);
            entry.prefetching[k].store(false, Ordering::SeqCst);
        });
    }

    /// Headroom of kind `k` at or below which the next lease is taken ahead of
    /// need: the unused share of the last lease won (of `lease_size` before one is).
    fn prefetch_threshold(&self, entry: &NsEntry, k: usize) -> u64 {
        let last = entry.lease_len[k].load(Ordering::Relaxed);
        (self.cfg.lease_size.max(last) as f64 * (1.0 - self.cfg.prefetch_at)) as u64
    }

    /// The rate growth the next lease of `kind` takes: one more doubling if the
    /// last lease was won less than `lease_min_life` ago, one less if over
    /// [`RATE_SHRINK_FACTOR`] times that (the first lease of a process keeps 0).
    pub(super) fn next_rate_growth(&self, ms: &CeilingState, kind: Kind) -> u32 {
        let life = self.cfg.lease_min_life;
        let k = kind.index();
        match ms.last_lease_at[k] {
            _ if life.is_zero() => 0,
            Some(at) if at.elapsed() < life => (ms.rate_growth[k] + 1).min(MAX_RATE_GROWTH),
            Some(at)
                if life
                    .checked_mul(RATE_SHRINK_FACTOR)
                    .is_some_and(|long| at.elapsed() > long) =>
            {
                ms.rate_growth[k].saturating_sub(1)
            }
            _ => ms.rate_growth[k],
        }
    }

    /// Record a lease of `size` ids won for `kind` with rate growth `rate`.
    pub(super) fn lease_won(
        &self,
        entry: &NsEntry,
        ms: &mut CeilingState,
        kind: Kind,
        rate: u32,
        size: u64,
    ) {
        let k = kind.index();
        if rate != ms.rate_growth[k] {
            tracing::info!(
                namespace = %entry.ns, %kind, lease = size,
                "{}",
                if rate > ms.rate_growth[k] {
                    "raised lease size: the last lease ran out sooner than allocation.lease_min_life"
                } else {
                    "lowered lease size: the last lease lasted well over allocation.lease_min_life"
                }
            );
        }
        ms.rate_growth[k] = rate;
        ms.last_lease_at[k] = Some(Instant::now());
        entry.lease_len[k].store(size, Ordering::Relaxed);
    }

    /// Give back the unused part of the leases of `ns` where rule 9 allows (only
    /// never-granted ids of its own leases), by a conditional write on the version read.
    pub async fn checkpoint(&self, ns: Namespace) -> Result<Hwm, ServiceError> {
        let entry = self.entry(ns).await?;
        self.ensure_verified(&entry).await?;
        let mut ms = entry.ceiling.lock().await;
        self.checkpoint_locked(&entry, &mut ms).await?;
        Ok(self.hwm_of(&entry))
    }

    /// [`Engine::checkpoint`] with the mirror lock held.
    pub(super) async fn checkpoint_locked(
        &self,
        entry: &Arc<NsEntry>,
        ms: &mut CeilingState,
    ) -> Result<(), ServiceError> {
        let hint = self.retry_hint_ms();
        let before = entry.snapshot();
        // Only verified, current counters know which ids are still ours: a stale
        // namespace's `granted` may be below what an earlier life handed out.
        if before.stale || !entry.verified.load(Ordering::Acquire) {
            return Ok(());
        }
        // In tree mode a fork's leases come from the tree's sequence: giving them
        // back to the fork's manifest would not return them to the sequence, and
        // keeping them lets a restart resume inside them (no gap).
        if self.cfg.fork_ids == ForkIds::Tree && entry.fork().is_some() {
            return Ok(());
        }
        if Kind::ALL
            .iter()
            .all(|k| before.counters[k.index()].give_back_point().is_none())
        {
            return Ok(());
        }
        let path = entry.path();
        let Some(cur) = self
            .store
            .read(&path)
            .await
            .map_err(|e| store_err(e, hint))?
        else {
            // No manifest at all: nothing to lower.
            return Ok(());
        };
        // Rule 9: lower a ceiling only from the top of our own highest lease, and only
        // down to where our own never-granted ids begin. A ceiling above our lease
        // means somebody leased after us: leave it.
        // Grants go on meanwhile (they take no mirror lock), so the point is taken
        // again under the state lock; leases cannot change while we hold the mirror
        // lock, so `owned_end` is still the one compared with the ceiling.
        let mut m = cur.manifest.clone();
        let mut lowered = false;
        {
            let mut st = entry.state.lock().unwrap();
            for k in Kind::ALL {
                let c = &mut st.counters[k.index()];
                if cur.manifest.ceiling(k) != c.owned_end() {
                    continue;
                }
                if let Some(point) = c.give_back_point() {
                    c.release_from(point);
                    m.set_ceiling(k, point);
                    lowered = true;
                }
            }
        }
        if !lowered {
            tracing::debug!(manifest = %path, "ceiling moved by another writer; leaving the manifest as it is");
            return Ok(());
        }
        // Local release first, durably: a crash after this point leaves a gap.
        self.persist(entry).await?;
        match self.store.write(&path, &m, Some(&cur.version)).await {
            Ok(Written::Won(version)) => {
                ms.cached = Some(Versioned {
                    manifest: m,
                    version,
                });
            }
            Ok(Written::Lost) => {
                ms.cached = None;
                tracing::debug!(manifest = %path, "ceiling moved while lowering; left as it is");
            }
            Err(e) => {
                ms.cached = None;
                return Err(store_err(e, hint));
            }
        }
        Ok(())
    }
}

/// The end of a lease from `start` of `size` ids, and of at least `need`; `None`
/// when `need` ids do not fit below `u64::MAX`. The one rule for every lease
/// (per namespace and tree): near the top of the id space a lease takes at most
/// half of what is left (but always `need`), so one lease never takes the rest of
/// a shared sequence from the namespaces that lease after it.
pub(super) fn lease_end(start: u64, size: u64, need: u64) -> Option<u64> {
    let left = u64::MAX - start;
    if need > left {
        return None;
    }
    Some(start + size.min((left / 2).max(need)))
}

/// `lease_size << shift`, saturating at `u64::MAX`.
pub(super) fn grown(lease_size: u64, shift: u32) -> u64 {
    lease_size
        .checked_shl(shift)
        .filter(|s| s >> shift == lease_size)
        .unwrap_or(u64::MAX)
}

/// The manifest a write starts from: the one read (its unknown fields kept), or, if
/// there is none, an empty one carrying the fork's metadata.
pub(super) fn manifest_to_rewrite(
    cur: Option<&Versioned>,
    entry: &NsEntry,
    meta: &ForkMeta,
) -> Manifest {
    match cur {
        Some(v) => v.manifest.clone(),
        None => {
            let mut m = Manifest::new(0, 0);
            if entry.fork().is_some() {
                m.set_fork_meta(meta);
            }
            m
        }
    }
}

#[cfg(test)]
mod tests {
    use super::lease_end;

    #[test]
    fn a_lease_near_the_top_takes_half_of_what_is_left_but_always_what_is_needed() {
        assert_eq!(lease_end(0, 1000, 1), Some(1000));
        let start = u64::MAX - 1000;
        assert_eq!(lease_end(start, 1_000_000, 1), Some(start + 500));
        assert_eq!(lease_end(start, 1_000_000, 800), Some(start + 800));
        assert_eq!(lease_end(start, 1_000_000, 1000), Some(u64::MAX));
        assert_eq!(lease_end(start, 1_000_000, 1001), None);
        assert_eq!(lease_end(u64::MAX, 10, 1), None);
        // What is left is never all taken while a second lease could fit.
        assert_eq!(lease_end(u64::MAX - 2, 10, 1), Some(u64::MAX - 1));
    }
}
