//! Group commit, measured: durable reservations per second at 1 and 16 concurrent
//! callers, the engine's `reserve(Namespace::Primary, Kind::Vid, 100)` (group
//! commit) beside a flush per reservation (sled `update_and_fetch` + `flush()` for
//! every call, through `spawn_blocking`: the design group commit replaces).
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
//! sled item/s in `callers_16`. After divan's table one more line gives the
//! engine's sled flushes per reservation (which divan cannot show), counted over
//! the engine's iterations.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use divan::counter::ItemsCount;
use divan::Bencher;
use idalloc::engine::{Engine, EngineConfig, StoreHandle};
use idalloc::protocol::WriterMode;
use idalloc::{Kind, Namespace};

/// Reservations each caller makes, one after the other, in one divan iteration.
const PER_CALLER: u64 = 50;

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
});

/// Engine sled flushes and reservations made during the engine rows, by callers.
struct FlushTally {
    flushes: AtomicU64,
    reservations: AtomicU64,
}

static ENGINE_1: FlushTally = FlushTally::new();
static ENGINE_16: FlushTally = FlushTally::new();

impl FlushTally {
    const fn new() -> Self {
        FlushTally {
            flushes: AtomicU64::new(0),
            reservations: AtomicU64::new(0),
        }
    }

    fn describe(&self, callers: &str) -> String {
        let flushes = self.flushes.load(Ordering::Relaxed);
        let reservations = self.reservations.load(Ordering::Relaxed);
        if reservations == 0 {
            format!("not run at {callers}")
        } else {
            format!(
                "{:.3} at {callers} ({flushes} flushes / {reservations} reservations)",
                flushes as f64 / reservations as f64
            )
        }
    }
}

fn main() {
    divan::main();
    println!(
        "engine (group commit), sled flushes per reservation: {}; {}",
        ENGINE_16.describe("16 callers"),
        ENGINE_1.describe("1 caller")
    );
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

fn engine_group_commit(bencher: Bencher, callers: usize, tally: &FlushTally) {
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
    bencher
        .counter(ItemsCount::new(callers as u64 * PER_CALLER))
        .bench_local(|| {
            let before = engine.flushes();
            let e = engine.clone();
            rt.block_on(run_callers(callers, move || {
                let e = e.clone();
                async move {
                    e.reserve(Namespace::Primary, Kind::Vid, 100).await.unwrap();
                }
            }));
            tally
                .flushes
                .fetch_add(engine.flushes() - before, Ordering::Relaxed);
            tally
                .reservations
                .fetch_add(callers as u64 * PER_CALLER, Ordering::Relaxed);
        });
    rt.block_on(async move { drop(engine) });
}

fn sled_flush_per_reservation(bencher: Bencher, callers: usize) {
    let rt = &*RUNTIME;
    let dir = tempfile::tempdir_in(".").unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("sled"))
        .flush_every_ms(None)
        .open()
        .unwrap();
    bencher
        .counter(ItemsCount::new(callers as u64 * PER_CALLER))
        .bench_local(|| {
            let db = db.clone();
            rt.block_on(run_callers(callers, move || {
                let db = db.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        db.update_and_fetch(b"ctr", |old| {
                            let v = old.map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
                            Some((v + 100).to_be_bytes().to_vec())
                        })
                        .unwrap();
                        db.flush().unwrap();
                    })
                    .await
                    .unwrap();
                }
            }));
        });
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
        super::sled_flush_per_reservation(bencher, 1);
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
        super::sled_flush_per_reservation(bencher, 16);
    }
}
