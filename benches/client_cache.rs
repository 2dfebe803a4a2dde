//! Micro-benchmark of the client cache's fast path, beside a bare
//! `AtomicU64::fetch_add` measured in the same run (the ceiling any shared counter
//! can reach). Uses `LocalSource` and the default `AllocatorConfig`, so no daemon
//! is needed. A divan benchmark:
//!
//!     cargo bench --no-default-features --bench client_cache
//!
//! (divan's options follow `--`, e.g. `-- --sample-count 5` for a quick check, or
//! a name filter such as `-- one_thread`.)
//!
//! Cases (divan groups; rows are sorted by name within a group):
//!
//! - `one_thread`: bare `AtomicU64::fetch_add` and `Allocator::allocate_vid`
//!   (warmed up so the adaptive batch has grown), from one thread (a
//!   current-thread tokio runtime for the allocator); `one_thread_ranges`, printed
//!   right below: `Allocator::allocate_vids(10)` and `allocate_vids(100)`, the
//!   same way. One divan iteration is 1,000 calls, so the time column in µs reads
//!   as ns per call.
//! - `tasks_16_on_2_workers`: bare `AtomicU64::fetch_add` on one shared counter
//!   and `Allocator::allocate_vid` on one shared allocator, from 16 tokio tasks on
//!   a 2-worker multi-thread runtime (built, and the allocator warmed up, outside
//!   the timed region). One iteration is 16 tasks × 62,500 calls = 1,000,000 ids,
//!   so the time column in ms reads as ns per id.
//!
//! Every row counts ids (`ItemsCount`), so divan's `item/s` line is ids/s. The
//! cost relative to the bare atomic is the allocator row's median time ÷ the
//! atomic row's median time in the same setting (for `allocate_vid` that is also
//! atomic item/s ÷ allocator item/s; for `allocate_vids(n)` it compares calls).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use divan::counter::ItemsCount;
use divan::Bencher;
use idalloc_client::client::{Allocator, AllocatorConfig, LocalSource};

/// Calls per divan iteration in the one-thread cases.
const CALLS: u64 = 1_000;
/// Tasks, and calls per task in one iteration, in the multi-task cases.
const TASKS: u64 = 16;
const CALLS_PER_TASK: u64 = 62_500;

fn main() {
    divan::main();
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An allocator on `LocalSource`, with `warmup` calls of `allocate_vids(n)` (or
/// `allocate_vid` for `n == 1`) made so that its batch has grown to working size.
fn warmed_allocator(rt: &tokio::runtime::Runtime, n: u64, warmup: u64) -> Allocator {
    rt.block_on(async {
        let alloc = Allocator::new(LocalSource::new(), AllocatorConfig::default());
        for _ in 0..warmup {
            if n == 1 {
                black_box(alloc.allocate_vid().await.unwrap());
            } else {
                black_box(alloc.allocate_vids(n).await.unwrap());
            }
        }
        alloc
    })
}

// 100 iterations (100,000 calls) per sample, so that a sample is long against the
// timer and one `block_on` per 1,000 calls is noise.
#[divan::bench_group(sample_size = 100)]
mod one_thread {
    use super::*;

    #[divan::bench]
    fn atomic_fetch_add(bencher: Bencher) {
        let counter = AtomicU64::new(0);
        bencher.counter(ItemsCount::new(CALLS)).bench_local(|| {
            for _ in 0..CALLS {
                black_box(counter.fetch_add(1, Ordering::SeqCst));
            }
        });
    }

    #[divan::bench]
    fn allocate_vid(bencher: Bencher) {
        let rt = current_thread();
        let alloc = warmed_allocator(&rt, 1, 10_000_000);
        bencher.counter(ItemsCount::new(CALLS)).bench_local(|| {
            rt.block_on(async {
                for _ in 0..CALLS {
                    black_box(alloc.allocate_vid().await.unwrap());
                }
            })
        });
    }
}

// Right after `one_thread` in divan's (name-sorted) output, so the bare atomic's row
// sits just above these.
#[divan::bench_group(sample_size = 100)]
mod one_thread_ranges {
    use super::*;

    /// `allocate_vids(n)`: items are ids (n per call), time is per 1,000 calls.
    #[divan::bench(args = [10, 100])]
    fn allocate_vids(bencher: Bencher, n: u64) {
        let rt = current_thread();
        let alloc = warmed_allocator(&rt, n, 1_000_000);
        bencher.counter(ItemsCount::new(CALLS * n)).bench_local(|| {
            rt.block_on(async {
                for _ in 0..CALLS {
                    black_box(alloc.allocate_vids(n).await.unwrap());
                }
            })
        });
    }
}

/// One iteration of the multi-task rows: `TASKS` tasks on `rt`, each running the
/// future `task()` makes, all at once; returns when every task is done. Both rows
/// go through this, so they differ only in what a task does.
fn run_tasks<F, Fut>(rt: &tokio::runtime::Runtime, task: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    rt.block_on(async {
        let tasks: Vec<_> = (0..TASKS).map(|_| tokio::spawn(task())).collect();
        for t in tasks {
            t.await.unwrap();
        }
    })
}

// An iteration is ~10–40 ms here; 50 samples keep each row around a second or two.
#[divan::bench_group(sample_count = 50, sample_size = 1)]
mod tasks_16_on_2_workers {
    use super::*;

    #[divan::bench]
    fn atomic_fetch_add(bencher: Bencher) {
        let rt = two_workers();
        let counter = Arc::new(AtomicU64::new(0));
        bencher
            .counter(ItemsCount::new(TASKS * CALLS_PER_TASK))
            .bench_local(|| {
                run_tasks(&rt, || {
                    let counter = counter.clone();
                    async move {
                        for _ in 0..CALLS_PER_TASK {
                            black_box(counter.fetch_add(1, Ordering::SeqCst));
                        }
                    }
                })
            });
    }

    #[divan::bench]
    fn allocate_vid(bencher: Bencher) {
        let rt = two_workers();
        let alloc = warmed_allocator(&rt, 1, 10_000_000);
        bencher
            .counter(ItemsCount::new(TASKS * CALLS_PER_TASK))
            .bench_local(|| {
                run_tasks(&rt, || {
                    let alloc = alloc.clone();
                    async move {
                        for _ in 0..CALLS_PER_TASK {
                            black_box(alloc.allocate_vid().await.unwrap());
                        }
                    }
                })
            });
    }
}
