//! Micro-benchmark of the client cache's fast path, beside a bare
//! `AtomicU64::fetch_add` measured in the same run (the ceiling any shared counter
//! can reach). Uses `LocalSource`, so no daemon is needed:
//!
//!     cargo bench --no-default-features --bench client_cache
//!
//! Prints ops/s and the ratio to the bare atomic for: one thread; 16 tasks on a
//! 2-thread runtime; and `allocate_vids(n)`.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idalloc::client::{Allocator, AllocatorConfig, LocalSource};

const N: u64 = 200_000_000;
const TASKS: u64 = 16;

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn two_threads() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn bare_atomic_one_thread() -> Duration {
    let counter = AtomicU64::new(0);
    let t = Instant::now();
    for _ in 0..N {
        black_box(counter.fetch_add(1, Ordering::SeqCst));
    }
    t.elapsed()
}

fn bare_atomic_tasks() -> Duration {
    let rt = two_threads();
    let counter = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let t = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let counter = counter.clone();
                tokio::spawn(async move {
                    for _ in 0..N / TASKS {
                        black_box(counter.fetch_add(1, Ordering::SeqCst));
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        t.elapsed()
    })
}

fn allocator_one_thread() -> Duration {
    let rt = current_thread();
    rt.block_on(async {
        let alloc = Allocator::new(LocalSource::new(), AllocatorConfig::default());
        // Warm up: let the batch grow to its working size.
        for _ in 0..10_000_000 {
            black_box(alloc.allocate_vid().await.unwrap());
        }
        let t = Instant::now();
        for _ in 0..N {
            black_box(alloc.allocate_vid().await.unwrap());
        }
        t.elapsed()
    })
}

fn allocator_tasks() -> Duration {
    let rt = two_threads();
    rt.block_on(async {
        let alloc = Allocator::new(LocalSource::new(), AllocatorConfig::default());
        for _ in 0..10_000_000 {
            black_box(alloc.allocate_vid().await.unwrap());
        }
        let t = Instant::now();
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let alloc = alloc.clone();
                tokio::spawn(async move {
                    for _ in 0..N / TASKS {
                        black_box(alloc.allocate_vid().await.unwrap());
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        t.elapsed()
    })
}

/// `allocate_vids(n)` from one thread: returns (calls, elapsed).
fn allocator_ranges(n: u64) -> (u64, Duration) {
    let rt = current_thread();
    rt.block_on(async {
        let alloc = Allocator::new(LocalSource::new(), AllocatorConfig::default());
        let calls = N / 4;
        for _ in 0..1_000_000 {
            black_box(alloc.allocate_vids(n).await.unwrap());
        }
        let t = Instant::now();
        for _ in 0..calls {
            black_box(alloc.allocate_vids(n).await.unwrap());
        }
        (calls, t.elapsed())
    })
}

fn rate(ops: u64, d: Duration) -> f64 {
    ops as f64 / d.as_secs_f64()
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not supported here.
    println!(
        "client cache micro-benchmark ({N} ops per row; LocalSource, default AllocatorConfig)"
    );
    println!();
    let atomic1 = rate(N, bare_atomic_one_thread());
    let alloc1 = rate(N, allocator_one_thread());
    let atomic16 = rate(N, bare_atomic_tasks());
    let alloc16 = rate(N, allocator_tasks());
    println!(
        "{:<46} {:>14} {:>9} {:>14}",
        "case", "ops/s", "ns/op", "vs bare atomic"
    );
    let row = |name: &str, ops: f64, base: f64| {
        println!(
            "{name:<46} {:>14.0} {:>9.2} {:>13.2}x",
            ops,
            1e9 / ops,
            base / ops
        );
    };
    row("bare AtomicU64::fetch_add, 1 thread", atomic1, atomic1);
    row("Allocator::allocate_vid, 1 thread", alloc1, atomic1);
    row(
        "bare AtomicU64::fetch_add, 16 tasks/2 threads",
        atomic16,
        atomic16,
    );
    row(
        "Allocator::allocate_vid, 16 tasks/2 threads",
        alloc16,
        atomic16,
    );
    for n in [10u64, 100] {
        let (calls, d) = allocator_ranges(n);
        let calls_s = rate(calls, d);
        println!(
            "{:<46} {:>14.0} {:>9.2} {:>13.2}x   ({:.0} ids/s)",
            format!("Allocator::allocate_vids({n}), 1 thread"),
            calls_s,
            1e9 / calls_s,
            atomic1 / calls_s,
            calls_s * n as f64
        );
    }
    println!();
    println!(
        "targets: 1 thread >= 50M ids/s and within 3x of the bare atomic: {} ({:.1}M/s, {:.2}x); 16 tasks >= 20M ids/s: {} ({:.1}M/s)",
        if alloc1 >= 50e6 && atomic1 / alloc1 <= 3.0 { "met" } else { "NOT met" },
        alloc1 / 1e6,
        atomic1 / alloc1,
        if alloc16 >= 20e6 { "met" } else { "NOT met" },
        alloc16 / 1e6
    );
}
