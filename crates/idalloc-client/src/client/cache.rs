//! The per-kind id cache behind [`Allocator`](super::Allocator): a lock-free fast
//! path over one reserved range, refilled from a parked (prefetched) range.
//!
//! Invariant protected: *no id is handed out twice*, however many threads take ids
//! while ranges are swapped underneath them. Gaps are allowed (an id a racing thread
//! took and then discarded, the unused tail of a range when a process exits);
//! duplicates are not.
//!
//! # The seqlock-guarded range
//!
//! The current range is `[base, base + len)` and `taken` counts the offsets given
//! out of it. `seq` is even while the range is stable and odd while it is being
//! replaced. Every access to these five words is `SeqCst`, so all of them fall in
//! one total order `S` (on x86 the loads are plain `mov`s; only the refill pays for
//! `SeqCst` stores).
//!
//! Fast path ([`KindCache::try_take`]): `s1 = seq`; if odd, give up. `off =
//! taken.fetch_add(n)`; read `len`, `base`; `s2 = seq`. Succeed iff `s1 == s2` and
//! `off + n <= len`, returning `base + off`.
//!
//! Refill ([`KindCache::install`], only under the refill mutex, so one at a time):
//! `seq += 1` (odd); `taken = 0`; `base`, `len` = the new range; `seq += 1` (even).
//!
//! **Why a successful take is unique.** Let a take succeed with `s1 == s2 = 2k`.
//! `seq` only ever grows, so no increment of `seq` lies between the two loads in `S`.
//! Every store of a refill lies strictly between that refill's two increments, so no
//! refill store lies between the loads either, and no refill is half done at the
//! first load (it read an even value). Hence the `fetch_add`, `len` and `base`
//! accesses — which lie between the two loads, by program order embedded in `S` —
//! all see the state written by the k-th refill: its range `R_k` and a counter that
//! it reset to 0. Within that epoch, `fetch_add` is one atomic read-modify-write, so
//! distinct takes get disjoint offset intervals `[off, off + n)`, each inside
//! `[0, len)` by the check: distinct takes of one epoch return disjoint sub-ranges of
//! `R_k`. Takes of different epochs return sub-ranges of different ranges, and every
//! range is installed once and came from the daemon, which never grants an id twice
//! in a namespace and kind. So no id is returned twice. A take that fails may have
//! advanced `taken` (in its own or a later epoch): that only skips offsets — a gap.
//!
//! `taken` cannot wrap: within one epoch it grows by at most `n` per failed or
//! successful take, every failed take sends its thread to the refill mutex, and
//! `n` is at most a quarter of the batch (larger requests bypass the cache), so
//! reaching 2^64 would take more threads than exist.
//!
//! # Prefetch and adaptive batch size
//!
//! Exactly one `fetch_add` per epoch covers the offset `len / 2` (the prefetch
//! point); the thread that gets it wakes the background prefetch task (a tokio
//! `Notify`, no lock), which reserves the next range and parks it. When the range
//! runs out, the slow path installs the parked range, or — if the writer outran the
//! prefetch — reserves one itself and grows the batch. The batch doubles when a
//! range is projected to last less than `grow_below`, halves beyond `shrink_above`,
//! always within `[min_batch, max_batch]`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::error::ClientError;
use super::source::RangeSource;
use crate::error::ServiceError;
use crate::namespace::Kind;
use crate::protocol::IdRange;

/// Batch sizing of an [`Allocator`](super::Allocator). `Default` gives the values
/// documented on each field; the `with_*` setters change one each:
///
/// ```
/// # use idalloc_client::AllocatorConfig;
/// let config = AllocatorConfig::default().with_initial_batch(10_000);
/// assert_eq!(config.initial_batch, 10_000);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AllocatorConfig {
    /// The first range size requested. Default 1000 (the reference allocator's batch).
    pub initial_batch: u64,
    /// The smallest range size the batch shrinks to. Default 16.
    pub min_batch: u64,
    /// The largest range size the batch grows to. Default 1,000,000 (the daemon's
    /// default `max_count`).
    pub max_batch: u64,
    /// Double the batch when a range is projected to last less than this.
    /// Default 250 ms.
    pub grow_below: Duration,
    /// Halve the batch when a range is projected to last longer than this.
    /// Default 5 s.
    pub shrink_above: Duration,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            initial_batch: 1000,
            min_batch: 16,
            max_batch: 1_000_000,
            grow_below: Duration::from_millis(250),
            shrink_above: Duration::from_secs(5),
        }
    }
}

impl AllocatorConfig {
    /// This configuration with [`initial_batch`](Self::initial_batch) set.
    #[must_use]
    pub fn with_initial_batch(self, initial_batch: u64) -> Self {
        AllocatorConfig {
            initial_batch,
            ..self
        }
    }

    /// This configuration with [`min_batch`](Self::min_batch) set.
    #[must_use]
    pub fn with_min_batch(self, min_batch: u64) -> Self {
        AllocatorConfig { min_batch, ..self }
    }

    /// This configuration with [`max_batch`](Self::max_batch) set.
    #[must_use]
    pub fn with_max_batch(self, max_batch: u64) -> Self {
        AllocatorConfig { max_batch, ..self }
    }

    /// This configuration with [`grow_below`](Self::grow_below) set.
    #[must_use]
    pub fn with_grow_below(self, grow_below: Duration) -> Self {
        AllocatorConfig { grow_below, ..self }
    }

    /// This configuration with [`shrink_above`](Self::shrink_above) set.
    #[must_use]
    pub fn with_shrink_above(self, shrink_above: Duration) -> Self {
        AllocatorConfig {
            shrink_above,
            ..self
        }
    }

    fn clamp(&self, batch: u64) -> u64 {
        let min = self.min_batch.max(1);
        batch.clamp(min, self.max_batch.max(min))
    }
}

/// Counters of one kind's cache, for tests, benchmarks and tuning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Ranges reserved for the cache (prefetched or not).
    pub ranges: u64,
    /// Of those, ranges reserved in the background by the prefetch task.
    pub prefetched: u64,
    /// Times a writer found the cache empty and nothing parked, and had to wait for a
    /// reservation.
    pub waited: u64,
    /// Multi-id requests too large for the cache, reserved directly.
    pub direct: u64,
    /// The batch size the next range will be requested with.
    pub batch: u64,
}

/// The words the fast path touches, away from the batch size, the statistics and
/// the mutex. `seq`, `base`, `len` and `prefetch_at` change only at install, so
/// every core keeps a shared copy of their line; `taken` is written by every take
/// and has a line of its own. Were they on one line, a take on one core would
/// invalidate the others' copy of `seq` and `base` too, and each take would move
/// the line twice (read, then write) instead of once.
#[repr(align(128))]
struct Hot {
    seq: AtomicU64,
    base: AtomicU64,
    len: AtomicU64,
    prefetch_at: AtomicU64,
    taken: OwnLine,
}

/// One atomic on a 128-byte line of its own (two 64-byte lines: x86 prefetches
/// lines in pairs).
#[repr(align(128))]
struct OwnLine(AtomicU64);

/// Refill state, behind an async mutex: held across the reservation call so that a
/// writer that runs dry waits for an in-flight prefetch instead of reserving a
/// second range beside it.
struct Slow {
    parked: Option<IdRange>,
    installed_at: Instant,
}

/// One kind's cache in one namespace.
pub(crate) struct KindCache {
    hot: Hot,
    kind: Kind,
    batch: AtomicU64,
    /// The largest batch the daemon accepted or may accept: starts at `max_batch`
    /// and drops when the daemon refuses a batch above its own `max_count`.
    ceiling: AtomicU64,
    ranges: AtomicU64,
    prefetched: AtomicU64,
    waited: AtomicU64,
    direct: AtomicU64,
    wake_prefetch: Arc<Notify>,
    slow: tokio::sync::Mutex<Slow>,
    source: Arc<dyn RangeSource>,
    config: AllocatorConfig,
}

impl KindCache {
    pub(crate) fn new(
        kind: Kind,
        source: Arc<dyn RangeSource>,
        config: AllocatorConfig,
    ) -> Arc<Self> {
        Arc::new(KindCache {
            hot: Hot {
                seq: AtomicU64::new(0),
                taken: OwnLine(AtomicU64::new(0)),
                base: AtomicU64::new(0),
                len: AtomicU64::new(0),
                // Never reached by an empty range: no prefetch before the first fill.
                prefetch_at: AtomicU64::new(u64::MAX),
            },
            kind,
            batch: AtomicU64::new(config.clamp(config.initial_batch)),
            ceiling: AtomicU64::new(config.max_batch.max(1)),
            ranges: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            waited: AtomicU64::new(0),
            direct: AtomicU64::new(0),
            wake_prefetch: Arc::new(Notify::new()),
            slow: tokio::sync::Mutex::new(Slow {
                parked: None,
                installed_at: Instant::now(),
            }),
            source,
            config,
        })
    }

    /// The lock-free fast path: `n` consecutive ids from the current range, or `None`
    /// if it cannot serve them (empty, being refilled, or raced). See the module doc
    /// for why this never returns an id twice.
    #[inline]
    pub(crate) fn try_take(&self, n: u64) -> Option<u64> {
        let h = &self.hot;
        let s1 = h.seq.load(SeqCst);
        if s1 & 1 != 0 {
            return None;
        }
        let off = h.taken.0.fetch_add(n, SeqCst);
        let len = h.len.load(SeqCst);
        let base = h.base.load(SeqCst);
        let prefetch_at = h.prefetch_at.load(SeqCst);
        let s2 = h.seq.load(SeqCst);
        // `off <= prefetch_at < off + n`: this take covers the prefetch point. One
        // take per epoch does; a raced (stale) one may wake the task spuriously, which
        // is harmless (it finds a range parked, or parks one a little early).
        if prefetch_at.wrapping_sub(off) < n {
            self.wake_prefetch.notify_one();
        }
        if s1 == s2 && n <= len.saturating_sub(off) {
            Some(base + off)
        } else {
            None
        }
    }

    /// Install `range` as the current one. Caller holds the `slow` mutex, which makes
    /// it the only writer of the seqlock.
    fn install(&self, range: IdRange, slow: &mut Slow) {
        let h = &self.hot;
        let len = range.len();
        h.seq.fetch_add(1, SeqCst);
        h.taken.0.store(0, SeqCst);
        h.base.store(range.start, SeqCst);
        h.len.store(len, SeqCst);
        h.prefetch_at.store(len / 2, SeqCst);
        h.seq.fetch_add(1, SeqCst);
        slow.installed_at = Instant::now();
    }

    /// Ids left in the current range (approximate while others take ids).
    pub(crate) fn remaining(&self) -> u64 {
        self.hot
            .len
            .load(SeqCst)
            .saturating_sub(self.hot.taken.0.load(SeqCst))
    }

    /// Take `n` consecutive ids, refilling as needed. Requests larger than a quarter
    /// of the batch are reserved directly, so they neither drain nor waste the cache.
    pub(crate) async fn take(&self, n: u64) -> Result<u64, ClientError> {
        if n == 0 {
            return Err(ServiceError::InvalidArgument("count must be at least 1".into()).into());
        }
        if n > 1 && n > self.batch.load(Relaxed) / 4 {
            self.direct.fetch_add(1, Relaxed);
            return Ok(self.source.reserve(self.kind, n).await?.start);
        }
        if let Some(id) = self.try_take(n) {
            return Ok(id);
        }
        self.take_slow(n).await
    }

    /// Refill until `n` ids (at most a quarter of the batch, or 1) can be taken.
    #[cold]
    pub(crate) async fn take_slow(&self, n: u64) -> Result<u64, ClientError> {
        loop {
            if let Some(id) = self.try_take(n) {
                return Ok(id);
            }
            let mut slow = self.slow.lock().await;
            // Someone may have refilled while we waited for the lock.
            if let Some(id) = self.try_take(n) {
                return Ok(id);
            }
            let range = match slow.parked.take() {
                Some(range) => range,
                None => {
                    // The writer outran the prefetch (or this is the first fill):
                    // it waits now, so larger ranges are due.
                    let first = self.ranges.load(Relaxed) == 0;
                    if !first {
                        self.waited.fetch_add(1, Relaxed);
                        self.resize(self.batch.load(Relaxed).saturating_mul(2));
                    }
                    let range = self.reserve_batch(n).await?;
                    self.ranges.fetch_add(1, Relaxed);
                    range
                }
            };
            self.install(range, &mut slow);
        }
    }

    fn resize(&self, batch: u64) {
        let batch = self.config.clamp(batch).min(self.ceiling.load(Relaxed));
        self.batch.store(batch, Relaxed);
    }

    /// Reserve a refill of the current batch size, and at least `need` ids.
    ///
    /// The batch grows without knowing the daemon's `allocation.max_count`; a daemon
    /// configured below the batch refuses it as an invalid argument. A writer must
    /// not fail for that: the batch (and its ceiling, so that it does not grow back)
    /// halves until the daemon accepts it. At `need` the daemon's error is returned
    /// as it is: the caller asked for more than the daemon grants at once.
    async fn reserve_batch(&self, need: u64) -> Result<IdRange, ClientError> {
        loop {
            let want = self.batch.load(Relaxed).max(need);
            match self.source.reserve(self.kind, want).await {
                Err(ClientError::Service(ServiceError::InvalidArgument(msg))) if want > need => {
                    let lower = (want / 2).max(need);
                    self.ceiling.fetch_min(lower, Relaxed);
                    self.batch.store(lower, Relaxed);
                    tracing::debug!(kind = %self.kind, refused = want, next = lower, error = %msg, "batch refused by the daemon; halving it");
                }
                other => return other,
            }
        }
    }

    /// One round of background prefetch: adapt the batch to how fast the current
    /// range is going, then reserve and park the next one unless one is parked.
    async fn prefetch_once(&self) {
        let mut slow = self.slow.lock().await;
        if slow.parked.is_some() {
            return;
        }
        let len = self.hot.len.load(SeqCst);
        let used = self.hot.taken.0.load(SeqCst).clamp(1, len.max(1));
        let elapsed = slow.installed_at.elapsed();
        // Time the whole range would last at the pace seen so far.
        let projected = elapsed.mul_f64(len as f64 / used as f64);
        let batch = self.batch.load(Relaxed);
        if projected < self.config.grow_below {
            self.resize(batch.saturating_mul(2));
        } else if projected > self.config.shrink_above {
            self.resize(batch / 2);
        }
        match self.reserve_batch(1).await {
            Ok(range) => {
                self.ranges.fetch_add(1, Relaxed);
                self.prefetched.fetch_add(1, Relaxed);
                slow.parked = Some(range);
            }
            // Not fatal: the writer's slow path reserves synchronously and reports
            // the error if it persists.
            Err(e) => {
                tracing::warn!(kind = %self.kind, error = %e, "id prefetch failed; will reserve on demand")
            }
        }
    }

    /// Spawn the background prefetch task. It holds only a weak reference, and the
    /// returned handle aborts it when the allocator goes away.
    pub(crate) fn spawn_prefetcher(self: &Arc<Self>) -> tokio::task::AbortHandle {
        let weak: Weak<KindCache> = Arc::downgrade(self);
        let wake = self.wake_prefetch.clone();
        tokio::spawn(async move {
            loop {
                wake.notified().await;
                let Some(cache) = weak.upgrade() else { return };
                cache.prefetch_once().await;
            }
        })
        .abort_handle()
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            ranges: self.ranges.load(Relaxed),
            prefetched: self.prefetched.load(Relaxed),
            waited: self.waited.load(Relaxed),
            direct: self.direct.load(Relaxed),
            batch: self.batch.load(Relaxed),
        }
    }

    /// Whether a range is parked, waiting to be installed.
    pub(crate) async fn has_parked(&self) -> bool {
        self.slow.lock().await.parked.is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::client::{Allocator, LocalSource};

    fn fixed(batch: u64) -> AllocatorConfig {
        AllocatorConfig {
            initial_batch: batch,
            min_batch: batch,
            max_batch: batch,
            ..AllocatorConfig::default()
        }
    }

    fn assert_unique(all: impl IntoIterator<Item = u64>, expect: usize) {
        let mut seen = HashSet::with_capacity(expect);
        for id in all {
            assert!(seen.insert(id), "id {id} handed out twice");
        }
        assert_eq!(seen.len(), expect);
    }

    /// Many tokio tasks on several worker threads, tiny ranges so that refills race
    /// with takes constantly, single and multi-id takes mixed.
    #[test]
    fn no_id_twice_from_many_tasks_across_many_refills() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(8)
            .build()
            .unwrap();
        let source = LocalSource::new();
        let ids: Vec<u64> = rt.block_on(async {
            let alloc = Allocator::new(source.clone(), fixed(7));
            let tasks: Vec<_> = (0..32)
                .map(|t| {
                    let alloc = alloc.clone();
                    tokio::spawn(async move {
                        let mut mine = Vec::new();
                        for i in 0..5_000u64 {
                            if (i + t) % 5 == 0 {
                                mine.extend(alloc.allocate_vids(1 + i % 2).await.unwrap());
                            } else {
                                mine.push(alloc.allocate_vid().await.unwrap());
                            }
                            if i % 64 == 0 {
                                tokio::task::yield_now().await;
                            }
                        }
                        mine
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        });
        let n = ids.len();
        assert_unique(ids, n);
        // With 7-id ranges this took thousands of refills.
        assert!(source.calls() > 1000, "only {} ranges", source.calls());
    }

    /// Plain OS threads hammering the fast path, each driving the slow path with its
    /// own executor: refills happen on whichever thread runs dry.
    #[test]
    fn no_id_twice_from_os_threads() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let source = LocalSource::new();
        let alloc = rt.block_on(async { Allocator::new(source.clone(), fixed(3)) });
        let per_thread = 20_000;
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let alloc = alloc.clone();
                std::thread::spawn(move || {
                    (0..per_thread)
                        .map(|_| futures::executor::block_on(alloc.allocate_eid()).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_unique(all, 8 * per_thread);
        assert!(source.calls() > 10_000);
    }

    /// The seqlock alone, without the allocator around it: threads take while one
    /// thread installs ranges as fast as it can. Ranges are spaced apart so a stale
    /// read would show up as an id outside every installed range, or as a duplicate.
    #[test]
    fn seqlock_install_racing_takes() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let cache = rt.block_on(async { KindCache::new(Kind::Vid, LocalSource::new(), fixed(10)) });
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let cache = cache.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    while !stop.load(SeqCst) {
                        if let Some(id) = cache.try_take(1) {
                            got.push(id);
                        }
                    }
                    got
                })
            })
            .collect();
        let ranges = 20_000u64;
        rt.block_on(async {
            for k in 0..ranges {
                let mut slow = cache.slow.lock().await;
                cache.install(
                    IdRange {
                        start: k * 100,
                        end: k * 100 + 10,
                    },
                    &mut slow,
                );
            }
        });
        stop.store(true, SeqCst);
        let all: Vec<u64> = takers.into_iter().flat_map(|h| h.join().unwrap()).collect();
        for &id in &all {
            assert!(
                id % 100 < 10 && id / 100 < ranges,
                "id {id} outside every installed range"
            );
        }
        let n = all.len();
        assert!(n > 0);
        assert_unique(all, n);
    }

    /// With 100-id ranges, take 51 vids (past the half-way prefetch point) and give
    /// the prefetch task up to ~100 ms to park the next range.
    async fn take_past_the_prefetch_point(alloc: &Allocator) {
        for _ in 0..51 {
            alloc.allocate_vid().await.unwrap();
        }
        for _ in 0..100 {
            if alloc.has_prefetched(Kind::Vid).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The next range is reserved and parked when half the current one is used, so a
    /// writer running through it does not wait.
    #[tokio::test]
    async fn prefetch_happens_before_exhaustion() {
        let source = LocalSource::new();
        let alloc = Allocator::new(source.clone(), fixed(100));
        take_past_the_prefetch_point(&alloc).await;
        assert!(
            alloc.has_prefetched(Kind::Vid).await,
            "nothing prefetched at offset 51 of 100"
        );
        assert_eq!(
            alloc.cached(Kind::Vid),
            49,
            "the current range must not be exhausted yet"
        );
        assert_eq!(source.calls(), 2);
        // Run through the rest and into the next range: installed from the parked
        // range, without a synchronous wait.
        for _ in 0..60 {
            alloc.allocate_vid().await.unwrap();
        }
        let stats = alloc.stats(Kind::Vid);
        assert_eq!(stats.waited, 0, "{stats:?}");
        assert_eq!(stats.prefetched, 1, "{stats:?}");
        // Kinds are independent.
        assert_eq!(alloc.stats(Kind::Eid).ranges, 0);
    }

    /// A fast writer grows the batch up to `max_batch` and no further.
    #[tokio::test]
    async fn batch_grows_to_its_bound_under_a_fast_writer() {
        let config = AllocatorConfig {
            initial_batch: 16,
            min_batch: 8,
            max_batch: 1024,
            ..AllocatorConfig::default()
        };
        let alloc = Allocator::new(LocalSource::new(), config);
        for i in 0..50_000u64 {
            alloc.allocate_vid().await.unwrap();
            if i % 8 == 0 {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(alloc.stats(Kind::Vid).batch, 1024);
    }

    /// A daemon in front of a local counter: it refuses counts above `max_count`
    /// (the daemon's check).
    struct FakeDaemon {
        inner: Arc<LocalSource>,
        max_count: u64,
        refused: AtomicU64,
    }

    impl FakeDaemon {
        fn new(max_count: u64) -> Self {
            FakeDaemon {
                inner: LocalSource::new(),
                max_count,
                refused: AtomicU64::new(0),
            }
        }
    }

    impl RangeSource for FakeDaemon {
        fn reserve(
            &self,
            kind: Kind,
            count: u64,
        ) -> futures::future::BoxFuture<'_, Result<IdRange, ClientError>> {
            if count > self.max_count {
                self.refused.fetch_add(1, Relaxed);
                let e = ServiceError::InvalidArgument(format!(
                    "count {count} is above the maximum of {}",
                    self.max_count
                ));
                return Box::pin(async move { Err(e.into()) });
            }
            self.inner.reserve(kind, count)
        }
        fn hwm(&self) -> futures::future::BoxFuture<'_, Result<crate::protocol::Hwm, ClientError>> {
            self.inner.hwm()
        }
        fn checkpoint(
            &self,
        ) -> futures::future::BoxFuture<'_, Result<crate::protocol::Hwm, ClientError>> {
            self.inner.checkpoint()
        }
    }

    /// A fast writer against a daemon with a small `max_count`: the batch settles at
    /// or below the daemon's limit instead of failing the writer, and stays there.
    #[tokio::test]
    async fn batch_stays_within_the_daemons_max_count() {
        let source = Arc::new(FakeDaemon::new(1000));
        let alloc = Allocator::new(source.clone(), AllocatorConfig::default());
        let mut ids = Vec::new();
        for i in 0..200_000u64 {
            ids.push(alloc.allocate_vid().await.unwrap());
            if i % 8 == 0 {
                tokio::task::yield_now().await;
            }
        }
        assert_unique(ids, 200_000);
        let stats = alloc.stats(Kind::Vid);
        assert!(stats.batch <= 1000, "{stats:?}");
        let refused = source.refused.load(Relaxed);
        assert!((1..=4).contains(&refused), "refused {refused} times");
        // A single request above the daemon's limit still gets the daemon's error.
        let big = alloc.allocate_vids(5000).await.unwrap_err();
        assert!(
            matches!(big, ClientError::Service(ServiceError::InvalidArgument(_))),
            "{big:?}"
        );
    }

    /// A slow writer (one id a second, on paused time) shrinks the batch down to
    /// `min_batch` and no further.
    #[tokio::test(start_paused = true)]
    async fn batch_shrinks_to_its_bound_under_a_slow_writer() {
        let config = AllocatorConfig {
            initial_batch: 64,
            min_batch: 8,
            max_batch: 1024,
            ..AllocatorConfig::default()
        };
        let alloc = Allocator::new(LocalSource::new(), config);
        for _ in 0..300 {
            alloc.allocate_eid().await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let stats = alloc.stats(Kind::Eid);
        assert_eq!(stats.batch, 8, "{stats:?}");
        assert!(stats.prefetched >= 3, "{stats:?}");
    }

    /// Large multi-id requests bypass the cache; small ones come from it; all are
    /// disjoint from single ids; a count of 0 is refused with a typed error.
    #[tokio::test]
    async fn ranges_and_single_ids_are_disjoint() {
        let source = LocalSource::new();
        let alloc = Allocator::new(source.clone(), fixed(1000));
        let mut all = Vec::new();
        for i in 0..2_000u64 {
            match i % 4 {
                0 => all.extend(alloc.allocate_vids(5).await.unwrap()),
                1 => all.extend(alloc.allocate_vids(600).await.unwrap()),
                _ => all.push(alloc.allocate_vid().await.unwrap()),
            }
        }
        let n = all.len();
        assert_unique(all, n);
        assert_eq!(alloc.stats(Kind::Vid).direct, 500);
        let err = alloc.allocate_vids(0).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Service(ServiceError::InvalidArgument(_))),
            "{err}"
        );
    }
}
