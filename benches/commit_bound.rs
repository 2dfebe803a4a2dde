//! What this disk and sled allow a group committer, without idalloc in the way:
//! the ceiling under the engine's group-commit ratio (issue 6 asks for 5x a flush
//! per reservation at 16 callers; `benches/group_commit.rs` measures the engine).
//!
//! Every row drives sled directly, `IDALLOC_BENCH_SECS` seconds each (default 3),
//! in a temp directory under the current directory (the real disk):
//!
//! - *flush per reservation*: each caller thread does `update_and_fetch` + `flush()`
//!   on one shared key, at 1 and at 16 threads. At 16, up to 16 flushes are in
//!   flight at once, and they are not 16 device writes: sled's log buffer and the
//!   page it lands in are shared, so one `sync_file_range` writes other callers'
//!   updates too and theirs then finds less or nothing left to write (the device
//!   writes / res. column, from `/proc/diskstats`). The kernel and sled do a group
//!   commit of their own here; this is the row `benches/group_commit.rs` measures
//!   the engine against.
//! - *flush per reservation, one at a time*: the same 16 threads with a lock held
//!   across update and flush, so every reservation costs one device write.
//! - *one committer*: 16 caller threads queue a request and park; one committer
//!   thread takes everything queued, writes one key, flushes once and unparks that
//!   group. The least a group commit can do per reservation: no engine, no tokio,
//!   no RPC. A flush is in flight one at a time, as in the engine.
//! - *two committers*: the same with two committer threads, so that two groups'
//!   flushes can be in flight at once. On one sled database the second flush waits
//!   for the first (sled's log is stable in order).
//! - *two committers, two sled dbs*: each committer writes its own database (its
//!   own log file), so the two flushes do overlap on the disk: what a second log
//!   in the engine would give.
//! - *one committer, callers as tokio tasks*: 16 tasks on a 2-worker runtime, each
//!   queueing a oneshot on a std channel and awaiting it: the engine's hand-off
//!   (`src/engine/local/mod.rs`) with nothing of the engine around it.
//!
//! Run: `cargo bench --bench commit_bound`. The table gives reservations/s, p50 and
//! p99 latency of one reservation, flushes per reservation, the mean time of one
//! write + `flush()`, device writes per reservation (`/proc/diskstats`, read before
//! and after each row; other writers of the disk count too, so run it on a quiet
//! machine) and each row's ratio to both 16-caller flush-per-reservation rows.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Thread;
use std::time::{Duration, Instant};

#[path = "support/disk.rs"]
mod disk;

/// Flushes and their total time, shared by whoever flushes in a row.
#[derive(Default)]
struct Flushes {
    count: AtomicU64,
    nanos: AtomicU64,
}

impl Flushes {
    /// Run `write_and_flush` (one write and one `flush()`), counting and timing it.
    fn timed(&self, write_and_flush: impl FnOnce()) {
        let t = Instant::now();
        write_and_flush();
        self.count.fetch_add(1, Ordering::Relaxed);
        self.nanos
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Write `value` under `key` and flush.
    fn write(&self, db: &sled::Db, key: &[u8], value: u64) {
        self.timed(|| {
            db.insert(key, &value.to_be_bytes()).unwrap();
            db.flush().unwrap();
        });
    }
}

/// A caller waiting for its group's flush.
struct Waiter {
    thread: Thread,
    done: Arc<AtomicBool>,
}

/// The queue between caller threads and committer threads.
#[derive(Default)]
struct Queue {
    waiting: Mutex<Vec<Waiter>>,
    ready: Condvar,
}

struct Row {
    name: &'static str,
    callers: usize,
    reservations: u64,
    secs: f64,
    lat_ns: Vec<u64>,
    flushes: u64,
    flush_nanos: u64,
    /// Writes the disk completed during the row, if `/proc/diskstats` says.
    device_writes: Option<u64>,
}

impl Row {
    /// A row from its calls' latencies (in any order) and what `flushes` counted.
    fn new(
        name: &'static str,
        callers: usize,
        mut lat_ns: Vec<u64>,
        secs: f64,
        flushes: &Flushes,
    ) -> Row {
        lat_ns.sort_unstable();
        Row {
            name,
            callers,
            reservations: lat_ns.len() as u64,
            secs,
            lat_ns,
            flushes: flushes.count.load(Ordering::Relaxed),
            flush_nanos: flushes.nanos.load(Ordering::Relaxed),
            device_writes: None,
        }
    }

    fn per_sec(&self) -> f64 {
        self.reservations as f64 / self.secs
    }

    fn pct_us(&self, p: f64) -> f64 {
        let i = ((self.lat_ns.len() as f64 * p) as usize).min(self.lat_ns.len() - 1);
        self.lat_ns[i] as f64 / 1e3
    }
}

fn open_db(dir: &std::path::Path, name: &str) -> sled::Db {
    sled::Config::new()
        .path(dir.join(name))
        .flush_every_ms(None)
        .open()
        .unwrap()
}

/// `callers` threads each running `reserve` until `dur` has passed; latencies of
/// every call and the seconds taken.
fn run_threads(
    callers: usize,
    dur: Duration,
    reserve: impl Fn() + Send + Sync + 'static,
) -> (Vec<u64>, f64) {
    let reserve = Arc::new(reserve);
    let start = Instant::now();
    let deadline = start + dur;
    let handles: Vec<_> = (0..callers)
        .map(|_| {
            let reserve = reserve.clone();
            std::thread::spawn(move || {
                let mut lat = Vec::with_capacity(1 << 16);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    reserve();
                    lat.push(t.elapsed().as_nanos() as u64);
                }
                lat
            })
        })
        .collect();
    let lat: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    (lat, start.elapsed().as_secs_f64())
}

/// Each caller updates and flushes for itself; with `one_at_a_time` a lock is held
/// across both, so that each flush writes only its own update.
fn flush_per_reservation(
    dir: &std::path::Path,
    name: &'static str,
    callers: usize,
    one_at_a_time: bool,
    dur: Duration,
) -> Row {
    let db = open_db(dir, &format!("per-{callers}-{one_at_a_time}"));
    let flushes = Arc::new(Flushes::default());
    let (d, f) = (db.clone(), flushes.clone());
    let lock = Mutex::new(());
    let (lat_ns, secs) = run_threads(callers, dur, move || {
        let _alone = one_at_a_time.then(|| lock.lock().unwrap());
        f.timed(|| {
            d.update_and_fetch(b"ctr", |old| {
                let v = old.map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap()));
                Some((v + 100).to_be_bytes().to_vec())
            })
            .unwrap();
            d.flush().unwrap();
        });
    });
    Row::new(name, callers, lat_ns, secs, &flushes)
}

/// `n_committers` threads sharing one queue of parked callers. With `separate_dbs`
/// each committer writes its own sled database, so their flushes are not ordered
/// behind each other in one log.
fn committers(
    dir: &std::path::Path,
    name: &'static str,
    n_committers: usize,
    separate_dbs: bool,
    callers: usize,
    dur: Duration,
) -> Row {
    let dbs: Vec<sled::Db> = if separate_dbs {
        (0..n_committers)
            .map(|c| open_db(dir, &format!("group-{n_committers}-db-{c}")))
            .collect()
    } else {
        vec![open_db(dir, &format!("group-{n_committers}"))]
    };
    let flushes = Arc::new(Flushes::default());
    let queue = Arc::new(Queue::default());
    let stop = Arc::new(AtomicBool::new(false));
    let committer_threads: Vec<_> = (0..n_committers)
        .map(|c| {
            let (db, flushes, queue, stop) = (
                dbs[c % dbs.len()].clone(),
                flushes.clone(),
                queue.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let key = format!("committer-{c}");
                let mut granted = 0u64;
                loop {
                    let group = {
                        let mut waiting = queue.waiting.lock().unwrap();
                        while waiting.is_empty() {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            waiting = queue
                                .ready
                                .wait_timeout(waiting, Duration::from_millis(10))
                                .unwrap()
                                .0;
                        }
                        std::mem::take(&mut *waiting)
                    };
                    granted += 100 * group.len() as u64;
                    flushes.write(&db, key.as_bytes(), granted);
                    for w in group {
                        w.done.store(true, Ordering::Release);
                        w.thread.unpark();
                    }
                }
            })
        })
        .collect();
    let q = queue.clone();
    let (lat_ns, secs) = run_threads(callers, dur, move || {
        let done = Arc::new(AtomicBool::new(false));
        q.waiting.lock().unwrap().push(Waiter {
            thread: std::thread::current(),
            done: done.clone(),
        });
        q.ready.notify_one();
        while !done.load(Ordering::Acquire) {
            std::thread::park();
        }
    });
    stop.store(true, Ordering::Relaxed);
    for c in committer_threads {
        c.join().unwrap();
    }
    Row::new(name, callers, lat_ns, secs, &flushes)
}

fn tokio_callers(dir: &std::path::Path, callers: usize, dur: Duration) -> Row {
    let db = open_db(dir, "tokio");
    let flushes = Arc::new(Flushes::default());
    let (jobs, rx) = mpsc::channel::<tokio::sync::oneshot::Sender<()>>();
    let (d, f) = (db.clone(), flushes.clone());
    let committer = std::thread::spawn(move || {
        let mut granted = 0u64;
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            group.extend(rx.try_iter());
            granted += 100 * group.len() as u64;
            f.write(&d, b"committer", granted);
            for done in group {
                let _ = done.send(());
            }
        }
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let start = Instant::now();
    let deadline = start + dur;
    let lat_ns: Vec<u64> = rt.block_on(async {
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let jobs = jobs.clone();
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(1 << 16);
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        let (done, wait) = tokio::sync::oneshot::channel();
                        jobs.send(done).unwrap();
                        wait.await.unwrap();
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let secs = start.elapsed().as_secs_f64();
    drop(jobs);
    committer.join().unwrap();
    Row::new(
        "one committer, callers as tokio tasks",
        callers,
        lat_ns,
        secs,
        &flushes,
    )
}

fn main() {
    let secs: u64 = std::env::var("IDALLOC_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dur = Duration::from_secs(secs);
    let dir = tempfile::tempdir_in(".").unwrap();
    let measured = |run: &dyn Fn() -> Row| {
        let before = disk::device_writes(dir.path());
        let mut row = run();
        row.device_writes = before
            .zip(disk::device_writes(dir.path()))
            .map(|(b, a)| a - b);
        row
    };
    let rows = [
        measured(&|| flush_per_reservation(dir.path(), "flush per reservation", 1, false, dur)),
        measured(&|| flush_per_reservation(dir.path(), "flush per reservation", 16, false, dur)),
        measured(&|| {
            flush_per_reservation(
                dir.path(),
                "flush per reservation, one at a time",
                16,
                true,
                dur,
            )
        }),
        measured(&|| committers(dir.path(), "one committer", 1, false, 16, dur)),
        measured(&|| committers(dir.path(), "two committers", 2, false, 16, dur)),
        measured(&|| committers(dir.path(), "two committers, two sled dbs", 2, true, 16, dur)),
        measured(&|| tokio_callers(dir.path(), 16, dur)),
    ];
    let (together, alone) = (rows[1].per_sec(), rows[2].per_sec());
    println!(
        "| {:<38} | {:>7} | {:>14} | {:>7} | {:>7} | {:>14} | {:>14} | {:>20} | {:>17} | {:>17} |",
        "row",
        "callers",
        "reservations/s",
        "p50 us",
        "p99 us",
        "flushes / res.",
        "write+flush us",
        "device writes / res.",
        "vs 16 at once",
        "vs one at a time"
    );
    let widths = [40, 9, 16, 9, 9, 16, 16, 22, 19, 19];
    let rule: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(i, w)| "-".repeat(w - usize::from(i > 0)) + if i > 0 { ":" } else { "" })
        .collect();
    println!("|{}|", rule.join("|"));
    for r in &rows {
        println!(
            "| {:<38} | {:>7} | {:>14.0} | {:>7.0} | {:>7.0} | {:>14.3} | {:>14.1} | {:>20} | {:>16.2}x | {:>16.2}x |",
            r.name,
            r.callers,
            r.per_sec(),
            r.pct_us(0.50),
            r.pct_us(0.99),
            r.flushes as f64 / r.reservations as f64,
            r.flush_nanos as f64 / r.flushes.max(1) as f64 / 1e3,
            r.device_writes.map_or("unknown".to_string(), |w| format!(
                "{:.3}",
                w as f64 / r.reservations as f64
            )),
            r.per_sec() / together,
            r.per_sec() / alone
        );
    }
    println!(
        "\"vs 16 at once\": against 16 callers each flushing for itself, whose flushes \
         the kernel shares (device writes / res. below 1); \"vs one at a time\": \
         against one device write per reservation. The engine (cargo bench --bench \
         group_commit) does what the committer rows do and more, so their ratios bound its."
    );
}
