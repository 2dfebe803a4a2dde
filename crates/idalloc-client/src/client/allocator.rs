//! [`Allocator`]: the writer-facing id allocator of one namespace, with the
//! reference in-process allocator's method names (`allocate_vid`, `allocate_vids`,
//! `allocate_eid`, `allocate_eids`, `current_hwm`, `checkpoint`), so a writer swaps
//! it in with few changes.
//!
//! Each kind has its own lock-free cache (see [`cache`](super::cache) for the
//! uniqueness argument). Ranges the daemon returned are durable, so cached ids stay
//! valid across daemon restarts; ids still cached when the allocator is dropped are
//! a gap, never reused.

use std::ops::Range;
use std::sync::Arc;

use super::cache::{AllocatorConfig, CacheStats, KindCache};
use super::error::ClientError;
use super::source::RangeSource;
use crate::namespace::Kind;
use crate::protocol::Hwm;

/// Allocates vertex and edge ids of one namespace from cached, prefetched ranges.
///
/// Cheap to clone (an `Arc`); clones share the caches. Must be created inside a
/// Tokio runtime (it spawns one prefetch task per kind, stopped when the last clone
/// is dropped).
#[derive(Clone)]
pub struct Allocator {
    inner: Arc<Inner>,
}

struct Inner {
    caches: [Arc<KindCache>; 2],
    source: Arc<dyn RangeSource>,
    prefetchers: [tokio::task::AbortHandle; 2],
}

impl Drop for Inner {
    fn drop(&mut self) {
        for p in &self.prefetchers {
            p.abort();
        }
    }
}

impl Allocator {
    /// An allocator over any [`RangeSource`]; [`Client::allocator`](super::Client::allocator)
    /// is the usual way to get one.
    pub fn new(source: Arc<dyn RangeSource>, config: AllocatorConfig) -> Allocator {
        let caches = Kind::ALL.map(|kind| KindCache::new(kind, source.clone(), config.clone()));
        let prefetchers = [caches[0].spawn_prefetcher(), caches[1].spawn_prefetcher()];
        Allocator {
            inner: Arc::new(Inner {
                caches,
                source,
                prefetchers,
            }),
        }
    }

    #[inline]
    fn cache(&self, kind: Kind) -> &KindCache {
        &self.inner.caches[kind.index()]
    }

    /// One id of `kind`. No lock and no call while the cache holds ids.
    #[inline]
    pub async fn allocate(&self, kind: Kind) -> Result<u64, ClientError> {
        let cache = self.cache(kind);
        match cache.try_take(1) {
            Some(id) => Ok(id),
            None => cache.take_slow(1).await,
        }
    }

    /// `n` consecutive ids of `kind`, as a half-open range.
    pub async fn allocate_range(&self, kind: Kind, n: u64) -> Result<Range<u64>, ClientError> {
        let start = self.cache(kind).take(n).await?;
        Ok(start..start + n)
    }

    /// One vertex id.
    #[inline]
    pub async fn allocate_vid(&self) -> Result<u64, ClientError> {
        self.allocate(Kind::Vid).await
    }

    /// `n` consecutive vertex ids.
    pub async fn allocate_vids(&self, n: u64) -> Result<Range<u64>, ClientError> {
        self.allocate_range(Kind::Vid, n).await
    }

    /// One edge id.
    #[inline]
    pub async fn allocate_eid(&self) -> Result<u64, ClientError> {
        self.allocate(Kind::Eid).await
    }

    /// `n` consecutive edge ids.
    pub async fn allocate_eids(&self, n: u64) -> Result<Range<u64>, ClientError> {
        self.allocate_range(Kind::Eid, n).await
    }

    /// One id of `kind` from the cache only: `None` when it would have to wait for a
    /// range. For callers that cannot await.
    #[inline]
    pub fn try_allocate(&self, kind: Kind) -> Option<u64> {
        self.cache(kind).try_take(1)
    }

    /// The namespace's high-water marks as the daemon sees them: every id below them
    /// may have been handed out (to this allocator's cache or anyone else).
    pub async fn current_hwm(&self) -> Result<Hwm, ClientError> {
        self.inner.source.hwm().await
    }

    /// Ask the daemon to checkpoint the namespace. Ids this allocator has cached were
    /// granted and stay this allocator's to hand out.
    pub async fn checkpoint(&self) -> Result<Hwm, ClientError> {
        self.inner.source.checkpoint().await
    }

    /// Counters of one kind's cache.
    pub fn stats(&self, kind: Kind) -> CacheStats {
        self.cache(kind).stats()
    }

    /// Ids left in the current range of `kind` (not counting a parked range).
    pub fn cached(&self, kind: Kind) -> u64 {
        self.cache(kind).remaining()
    }

    /// Whether a prefetched range of `kind` is waiting to be used.
    pub async fn has_prefetched(&self, kind: Kind) -> bool {
        self.cache(kind).has_parked().await
    }
}
