//! Group commit, measured: durable reservations per second and sled flushes per
//! reservation at 1 and 16 concurrent callers, beside a flush per reservation
//! (sled `insert` + `flush()` for every call, the design group commit replaces).
//!
//! Run: `cargo bench --bench group_commit` (`IDALLOC_BENCH_SECS` sets the duration
//! of each row, default 3). Prints a table; ratios matter more than absolute
//! numbers on a shared machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use idalloc::engine::{Engine, EngineConfig, StoreHandle};
use idalloc::protocol::WriterMode;
use idalloc::{Kind, Namespace};

struct Row {
    name: String,
    callers: usize,
    ops: u64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    flushes: Option<u64>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

async fn run_callers<F, Fut>(callers: usize, dur: Duration, f: F) -> (u64, Vec<u64>)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let deadline = Instant::now() + dur;
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                f().await;
                lat.push(t.elapsed().as_nanos() as u64);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    (all.len() as u64, all)
}

async fn engine_row(callers: usize, dur: Duration) -> Row {
    let dir = tempfile::tempdir_in(".").unwrap();
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
    let before = engine.flushes();
    let e = engine.clone();
    let t = Instant::now();
    let (ops, lat) = run_callers(callers, dur, move || {
        let e = e.clone();
        async move {
            e.reserve(Namespace::Primary, Kind::Vid, 100).await.unwrap();
        }
    })
    .await;
    let secs = t.elapsed().as_secs_f64();
    Row {
        name: "engine (group commit)".into(),
        callers,
        ops,
        secs,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        flushes: Some(engine.flushes() - before),
    }
}

async fn flush_per_call_row(callers: usize, dur: Duration) -> Row {
    let dir = tempfile::tempdir_in(".").unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("sled"))
        .flush_every_ms(None)
        .open()
        .unwrap();
    let t = Instant::now();
    let (ops, lat) = run_callers(callers, dur, move || {
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
    })
    .await;
    let secs = t.elapsed().as_secs_f64();
    Row {
        name: "sled flush per reservation".into(),
        callers,
        ops,
        secs,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        flushes: Some(ops),
    }
}

fn main() {
    let secs: u64 = std::env::var("IDALLOC_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dur = Duration::from_secs(secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for callers in [1usize, 16] {
        rows.push(rt.block_on(flush_per_call_row(callers, dur)));
        rows.push(rt.block_on(engine_row(callers, dur)));
    }
    println!(
        "{:<28} {:>7} {:>14} {:>10} {:>10} {:>16}",
        "mode", "callers", "reservations/s", "p50 us", "p99 us", "flushes/reserv."
    );
    for r in &rows {
        println!(
            "{:<28} {:>7} {:>14.0} {:>10.1} {:>10.1} {:>16.3}",
            r.name,
            r.callers,
            r.ops as f64 / r.secs,
            r.p50_us,
            r.p99_us,
            r.flushes
                .map_or(f64::NAN, |f| f as f64 / r.ops.max(1) as f64)
        );
    }
    let rate = |name: &str, c: usize| {
        rows.iter()
            .find(|r| r.name.starts_with(name) && r.callers == c)
            .map(|r| r.ops as f64 / r.secs)
            .unwrap()
    };
    println!(
        "group commit at 16 callers = {:.1}x a flush per reservation",
        rate("engine", 16) / rate("sled", 16)
    );
}
