//! Group commit, measured: durable reservations per second at 1 and 16 concurrent
//! callers, the engine's `reserve(Namespace::Primary, Kind::Vid, 100)` (group
//! commit) beside a flush per reservation (sled `update_and_fetch` + `flush()` for
//! every call, through `spawn_blocking`: the design group commit replaces). At 16
//! callers the flush per reservation runs twice: 16 at once, and one at a time (a
//! lock across update and flush), because 16 at once is not 16 device writes:
//! concurrent flushes of sled's one log share pages, and the disk does fewer.
//! In-process, no RPC; the engine uses an `InMemory` object store and a sled
//! directory in a temp dir under the current directory (the real disk). All on one
//! 2-worker tokio runtime. A divan benchmark:
//!
//!     cargo bench --bench group_commit
//!
//! (divan's options follow `--`, e.g. `-- --sample-count 5` for a quick check, or
//! `-- callers_16` for the 16-caller rows only.)
//!
//! One divan iteration is `callers` tasks each making 50 reservations one after
//! the other, all tasks at once; its counter is `ItemsCount(callers × 50)`, so
//! divan's `item/s` line is reservations/s, and the time column is the time for
//! those `callers × 50` reservations. The ratio that matters is engine item/s ÷
//! either sled row's item/s in `callers_16`. After divan's table, a line per row
//! gives what divan cannot show: sled flushes and device writes per reservation
//! (writes the block device completed, from `/proc/diskstats`, read before and
//! after the row, outside its timed iterations; divan's warm-up runs are in both
//! counts). `benches/commit_bound.rs` measures the same baselines beside an ideal
//! committer, without the engine.
//!
//! `fork_ids`: what tree mode costs. 16 callers reserving 100 vids at a time in a
//! fork, with `[allocation] fork_ids` = namespace or tree, and a lease of 10,000
//! ids (a lease every 100 reservations, so the lease path shows: in tree mode a
//! fork's lease is two conditional writes instead of one) or of 2^40 (the cached
//! path only, where both modes run the same code). The ratio that matters is tree
//! item/s ÷ namespace item/s at the same lease size (`-- fork_ids`).

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

#[path = "support/disk.rs"]
mod disk;

use divan::counter::ItemsCount;
use divan::Bencher;
use idalloc::engine::{Engine, EngineConfig, StoreHandle};
use idalloc_client::protocol::{ForkIds, WriterMode};
use idalloc_client::{ForkId, Kind, Namespace};

/// Reservations each caller makes, one after the other, in one divan iteration.
const PER_CALLER: u64 = 50;

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
});

/// What one row did over all its iterations, beyond what divan reports: sled
/// flushes (engine rows only) and the writes the disk itself completed.
struct Tally {
    row: &'static str,
    flushes: AtomicU64,
    device_writes: AtomicU64,
    /// False once a reading of `/proc/diskstats` failed.
    device_known: AtomicBool,
    reservations: AtomicU64,
}

static ENGINE_1: Tally = Tally::new("callers_1::engine_group_commit");
static SLED_1: Tally = Tally::new("callers_1::sled_flush_per_reservation");
static ENGINE_16: Tally = Tally::new("callers_16::engine_group_commit");
static SLED_16: Tally = Tally::new("callers_16::sled_flush_per_reservation");
static SLED_16_ALONE: Tally = Tally::new("callers_16::sled_flush_one_at_a_time");

impl Tally {
    const fn new(row: &'static str) -> Self {
        Tally {
            row,
            flushes: AtomicU64::new(0),
            device_writes: AtomicU64::new(0),
            device_known: AtomicBool::new(true),
            reservations: AtomicU64::new(0),
        }
    }

    /// Run a row's whole divan benchmark (`bench`), reading the flush count and the
    /// disk's write count before and after it: outside the timed iterations, which
    /// only add their reservations (`add`).
    fn around(&self, dir: &Path, flushes: impl Fn() -> u64, bench: impl FnOnce()) {
        let (f0, d0) = (flushes(), disk::device_writes(dir));
        bench();
        let (f1, d1) = (flushes(), disk::device_writes(dir));
        self.flushes.fetch_add(f1 - f0, Ordering::Relaxed);
        if let Some((d0, d1)) = d0.zip(d1) {
            self.device_writes.fetch_add(d1 - d0, Ordering::Relaxed);
        } else {
            self.device_known.store(false, Ordering::Relaxed);
        }
    }

    fn add(&self, reservations: u64) {
        self.reservations.fetch_add(reservations, Ordering::Relaxed);
    }

    fn describe(&self, engine: bool) -> Option<String> {
        let reservations = self.reservations.load(Ordering::Relaxed);
        if reservations == 0 {
            return None;
        }
        let per = |n: u64| format!("{:.3}", n as f64 / reservations as f64);
        let device = if self.device_known.load(Ordering::Relaxed) {
            per(self.device_writes.load(Ordering::Relaxed))
        } else {
            "unknown".to_string()
        };
        let flushes = if engine {
            per(self.flushes.load(Ordering::Relaxed))
        } else {
            "1.000".to_string()
        };
        Some(format!(
            "{:<40} {flushes:>14} {device:>21}   ({reservations} reservations)",
            self.row
        ))
    }
}

fn main() {
    divan::main();
    println!(
        "{:<40} {:>14} {:>21}",
        "per reservation, over all iterations", "sled flushes", "device writes"
    );
    for (tally, engine) in [
        (&ENGINE_1, true),
        (&SLED_1, false),
        (&ENGINE_16, true),
        (&SLED_16, false),
        (&SLED_16_ALONE, false),
    ] {
        if let Some(line) = tally.describe(engine) {
            println!("{line}");
        }
    }
}

/// `callers` tasks, each calling `f` `PER_CALLER` times in sequence; returns when
/// all are done.
async fn run_callers<F, Fut>(callers: usize, f: F)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move {
                for _ in 0..PER_CALLER {
                    f().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

fn engine_group_commit(bencher: Bencher, callers: usize, tally: &Tally) {
    let rt = &*RUNTIME;
    let dir = tempfile::tempdir_in(".").unwrap();
    let engine = rt.block_on(async {
        let store = StoreHandle::custom(
            Arc::new(object_store::memory::InMemory::new()),
            WriterMode::MultiWriter,
            "memory://bench",
        );
        let cfg = EngineConfig {
            data_dir: dir.path().join("data"),
            lease_size: 1 << 40,
            ..EngineConfig::default()
        };
        let engine = Engine::open(cfg, store).await.unwrap();
        engine
            .reserve(Namespace::Primary, Kind::Vid, 1)
            .await
            .unwrap();
        engine
    });
    let reservations = callers as u64 * PER_CALLER;
    tally.around(
        dir.path(),
        || engine.flushes(),
        || {
            bencher
                .counter(ItemsCount::new(reservations))
                .bench_local(|| {
                    let e = engine.clone();
                    rt.block_on(run_callers(callers, move || {
                        let e = e.clone();
                        async move {
                            e.reserve(Namespace::Primary, Kind::Vid, 100).await.unwrap();
                        }
                    }));
                    tally.add(reservations);
                })
        },
    );
    rt.block_on(async move { drop(engine) });
}

/// Each reservation updates and flushes for itself. With `one_at_a_time` a lock is
/// held across both, so each flush writes its own update alone (one device write
/// per reservation); without it, up to `callers` flushes run at once and share
/// writes (sled's log buffer and the page under it), which the device writes line
/// after the table shows.
fn sled_flush_per_reservation(
    bencher: Bencher,
    callers: usize,
    one_at_a_time: bool,
    tally: &Tally,
) {
    let rt = &*RUNTIME;
    let lock = Arc::new(Mutex::new(()));
    let dir = tempfile::tempdir_in(".").unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("sled"))
        .flush_every_ms(None)
        .open()
        .unwrap();
    let reservations = callers as u64 * PER_CALLER;
    tally.around(
        dir.path(),
        || 0,
        || {
            bencher
                .counter(ItemsCount::new(reservations))
                .bench_local(|| {
                    let (db, lock) = (db.clone(), lock.clone());
                    rt.block_on(run_callers(callers, move || {
                        let (db, lock) = (db.clone(), lock.clone());
                        async move {
                            tokio::task::spawn_blocking(move || {
                                let _alone = one_at_a_time.then(|| lock.lock().unwrap());
                                db.update_and_fetch(b"ctr", |old| {
                                    let v = old
                                        .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
                                    Some((v + 100).to_be_bytes().to_vec())
                                })
                                .unwrap();
                                db.flush().unwrap();
                            })
                            .await
                            .unwrap();
                        }
                    }));
                    tally.add(reservations);
                })
        },
    );
}

// Each iteration is PER_CALLER (1 caller) or 16 × PER_CALLER reservations, tens of
// flushes at ~100 µs or more each: 20 samples of one iteration keep each row to a
// second or two.
#[divan::bench_group(sample_count = 20, sample_size = 1)]
mod callers_1 {
    use divan::Bencher;

    #[divan::bench]
    fn engine_group_commit(bencher: Bencher) {
        super::engine_group_commit(bencher, 1, &super::ENGINE_1);
    }

    #[divan::bench]
    fn sled_flush_per_reservation(bencher: Bencher) {
        super::sled_flush_per_reservation(bencher, 1, false, &super::SLED_1);
    }
}

#[divan::bench_group(sample_count = 20, sample_size = 1)]
mod callers_16 {
    use divan::Bencher;

    #[divan::bench]
    fn engine_group_commit(bencher: Bencher) {
        super::engine_group_commit(bencher, 16, &super::ENGINE_16);
    }

    #[divan::bench]
    fn sled_flush_per_reservation(bencher: Bencher) {
        super::sled_flush_per_reservation(bencher, 16, false, &super::SLED_16);
    }

    #[divan::bench]
    fn sled_flush_one_at_a_time(bencher: Bencher) {
        super::sled_flush_per_reservation(bencher, 16, true, &super::SLED_16_ALONE);
    }
}

/// 16 callers reserving in a fork of an engine counting fork ids as `mode`.
fn engine_in_fork(bencher: Bencher, mode: ForkIds, lease_size: u64) {
    let rt = &*RUNTIME;
    let dir = tempfile::tempdir_in(".").unwrap();
    let fork = ForkId::generate();
    let engine = rt.block_on(async {
        let store = StoreHandle::custom(
            Arc::new(object_store::memory::InMemory::new()),
            WriterMode::MultiWriter,
            "memory://bench",
        );
        let cfg = EngineConfig {
            data_dir: dir.path().join("data"),
            lease_size,
            fork_ids: mode,
            ..EngineConfig::default()
        };
        let engine = Engine::open(cfg, store).await.unwrap();
        engine.bootstrap_fork(fork, None, 0, 0).await.unwrap();
        engine
            .reserve(Namespace::Fork(fork), Kind::Vid, 1)
            .await
            .unwrap();
        engine
    });
    let callers = 16;
    bencher
        .counter(ItemsCount::new(callers as u64 * PER_CALLER))
        .bench_local(|| {
            let e = engine.clone();
            rt.block_on(run_callers(callers, move || {
                let e = e.clone();
                async move {
                    e.reserve(Namespace::Fork(fork), Kind::Vid, 100)
                        .await
                        .unwrap();
                }
            }));
        });
    rt.block_on(async move { drop(engine) });
}

#[divan::bench_group(sample_count = 20, sample_size = 1)]
mod fork_ids {
    use divan::Bencher;
    use idalloc_client::protocol::ForkIds;

    #[divan::bench(args = [10_000, 1 << 40])]
    fn namespace(bencher: Bencher, lease_size: u64) {
        super::engine_in_fork(bencher, ForkIds::Namespace, lease_size);
    }

    #[divan::bench(args = [10_000, 1 << 40])]
    fn tree(bencher: Bencher, lease_size: u64) {
        super::engine_in_fork(bencher, ForkIds::Tree, lease_size);
    }
}
