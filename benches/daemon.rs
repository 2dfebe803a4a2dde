//! The real daemon end to end, measured as an outsider sees it, in one run.
//!
//! Reservations of [`RANGE`] ids are driven by `idallocctl bench --concurrency 1`,
//! a separate process as `redis-benchmark` is for Redis beside it, over the unix
//! socket (and loopback TCP at 1 and 16 clients). For every row the daemon's CPU
//! is its whole process's utime + stime from `/proc/<pid>/stat` over the row, and
//! its context switches from `/proc/<pid>/task/*/status`; the load generator's
//! are its own rusage (`wait4` on that one child): the client library's cost is
//! what a writer's process pays. Also: a bare `write` + `fdatasync` per call on the
//! same disk (before the daemon rows and after them), one client's `hwm` calls
//! (answered from memory: the round trip without the write), 64 clients driven
//! from inside this process (the way this bench measured before, to compare the
//! two load generators), the daemon's RSS, and start-up with 10,000 forks.
//!
//! Beside Redis (when `redis-server` and `redis-benchmark` are on PATH; Debian's
//! `redis-server` and `redis-tools`): Redis on its unix socket with `appendonly
//! yes`, `appendfsync always` on the same disk, `INCRBY ctr 1000` (`redis-benchmark
//! -P 1`), each Redis row right after ours at the same client count
//! ([`support/redis_beside.rs`]): at 1, 16, 64 and 256 clients, then on a busy
//! host — two CPU-bound `sh` loops at our priority, started and stopped by this
//! bench — at 1 and 16 clients. Without Redis one line says so and the rest runs.
//!
//! Run: `cargo bench --bench daemon` (`IDALLOC_BENCH_SECS` sets the duration of
//! each row, default 3; `IDALLOC_BENCH_FORKS` the fork count, default 10000). Each
//! target of issues 6, 21 and 32 is printed as met or NOT met. The daemon is the
//! release binary cargo built for this bench, on its defaults apart from paths and
//! `[log] level = "warn"`, started in a temp directory under the current directory
//! (so on the same disk as the fsync baseline and Redis's AOF).

use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idalloc_client::client::Client;
use idalloc_client::protocol::BootstrapRequest;
use idalloc_client::{ForkId, Kind};

const BIN: &str = env!("CARGO_BIN_EXE_idallocd");
/// `idallocctl` (its own package, so no `CARGO_BIN_EXE_` here): built by the
/// cargo running the bench, once, next to the daemon in the same profile.
fn ctl() -> &'static std::path::Path {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "idallocctl",
                "--bin",
                "idallocctl",
            ])
            .status()
            .expect("cargo runs");
        assert!(
            status.success(),
            "cargo build --release -p idallocctl failed"
        );
        std::path::Path::new(BIN).with_file_name("idallocctl")
    })
}

#[path = "support/outside.rs"]
mod outside;
#[path = "support/redis_beside.rs"]
mod redis_beside;

use outside::{Hogs, ProcSample};

/// Ids per reservation, as `INCRBY ctr 1000` beside it and as
/// `idallocctl bench --size 1000`.
const RANGE: u64 = 1000;

struct Daemon {
    child: Child,
    unix: String,
    tcp: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    fn rss_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        assert!(st.success(), "idallocd exited with {st}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Spawn the daemon on `dir` (config written once, reused on restart) and return
/// it with the time from spawn until a status call over the socket is answered.
async fn start(dir: &Path) -> (Daemon, Duration) {
    let config = dir.join("idallocd.toml");
    if !config.exists() {
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\nlisten = [{:?}, {:?}]\n[log]\nlevel = \"warn\"\n",
                dir.join("data").display().to_string(),
                format!("unix:{}", dir.join("d.sock").display()),
                format!("tcp:127.0.0.1:{}", free_port()),
            ),
        )
        .unwrap();
    }
    let text = std::fs::read_to_string(&config).unwrap();
    let listen: Vec<String> = text
        .lines()
        .find(|l| l.starts_with("listen"))
        .unwrap()
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    let t = Instant::now();
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let d = Daemon {
        child,
        unix: listen[0].clone(),
        tcp: listen[1].clone(),
    };
    loop {
        if let Ok(Ok(c)) =
            tokio::time::timeout(Duration::from_millis(500), Client::connect(d.unix.as_str())).await
        {
            if c.status().await.is_ok() {
                return (d, t.elapsed());
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "idallocd never served"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// One row: a load generator's calls against the daemon (or the disk).
struct Row {
    name: String,
    clients: usize,
    ops: u64,
    secs: f64,
    /// p50, p99, p999 in microseconds.
    pct: [f64; 3],
    /// The daemon's whole-process CPU and context switches over the row.
    daemon: Option<ProcSample>,
    /// The load generator's own.
    load: Option<ProcSample>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    /// Microseconds of CPU per call.
    fn per_op_us(&self, s: Option<ProcSample>) -> f64 {
        s.map_or(f64::NAN, |s| s.cpu_s * 1e6 / self.ops.max(1) as f64)
    }
    fn cs_per_op(&self, s: Option<ProcSample>) -> f64 {
        s.map_or(f64::NAN, |s| {
            (s.vcs + s.ivcs) as f64 / self.ops.max(1) as f64
        })
    }
}

fn percentiles(lat: &mut [u64]) -> [f64; 3] {
    lat.sort_unstable();
    [0.5, 0.99, 0.999].map(|p| {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1e3
    })
}

/// `idallocctl bench --clients C --concurrency 1 --size 1000` against `endpoint`
/// for `dur`: a separate process, as `redis-benchmark` is.
fn ctl_row(name: &str, endpoint: &str, pid: u32, clients: usize, dur: Duration) -> Row {
    let before = ProcSample::of(pid);
    let run = outside::run_measured(
        Command::new(ctl())
            .args([
                "--endpoint",
                endpoint,
                "bench",
                "--concurrency",
                "1",
                "--json",
            ])
            .args(["--clients", &clients.to_string()])
            .args(["--size", &RANGE.to_string()])
            .args(["--duration", &format!("{}ms", dur.as_millis())]),
    );
    let daemon = before.until(ProcSample::of(pid));
    assert!(run.success, "idallocctl bench failed: {}", run.stdout);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|e| panic!("idallocctl bench --json printed {:?}: {e}", run.stdout));
    assert_eq!(
        v["disjoint"], true,
        "idallocctl bench saw overlapping ranges"
    );
    let lat = |k: &str| v["latency_us"][k].as_f64().unwrap_or(f64::NAN);
    Row {
        name: name.into(),
        clients,
        ops: v["reservations"].as_u64().unwrap_or(0),
        secs: v["duration_secs"].as_f64().unwrap_or(f64::NAN),
        pct: [lat("p50"), lat("p99"), lat("p999")],
        daemon: Some(daemon),
        load: Some(run.cost),
    }
}

/// What each client of an in-process row calls, one call in flight per client.
#[derive(Clone, Copy)]
enum Call {
    /// A durable reservation of [`RANGE`] ids.
    Reserve,
    /// `hwm`: answered from memory, nothing written. The round trip through the
    /// socket and the RPC stack alone, the floor under a reservation's.
    Hwm,
}

/// This process's own CPU and context switches (the in-process load generator:
/// one thread drives every connection, nothing else runs meanwhile but the RSS
/// sampler, which wakes every 50 ms).
fn self_sample() -> ProcSample {
    ProcSample::of(std::process::id())
}

/// `clients` connections from this process, each with one `call` in flight.
async fn call_row(
    name: &str,
    call: Call,
    endpoint: &str,
    pid: u32,
    clients: usize,
    dur: Duration,
) -> Row {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(Client::connect(endpoint).await.unwrap());
    }
    // Warm up: connections established, leases taken, caches hot.
    for c in &conns {
        c.reserve(idalloc_client::Namespace::Primary, Kind::Vid, 1)
            .await
            .unwrap();
    }
    let (before, load_before) = (ProcSample::of(pid), self_sample());
    let t = Instant::now();
    let deadline = t + dur;
    let mut tasks = Vec::new();
    for c in conns {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            let mut last_end = 0;
            while Instant::now() < deadline {
                let s = Instant::now();
                match call {
                    Call::Hwm => {
                        c.hwm(idalloc_client::Namespace::Primary).await.unwrap();
                        lat.push(s.elapsed().as_nanos() as u64);
                    }
                    Call::Reserve => {
                        let r = c
                            .reserve(idalloc_client::Namespace::Primary, Kind::Vid, RANGE)
                            .await
                            .unwrap();
                        lat.push(s.elapsed().as_nanos() as u64);
                        // Ordered per daemon: one connection's ranges only go up.
                        assert!(r.start >= last_end, "range went backwards");
                        last_end = r.end;
                    }
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let secs = t.elapsed().as_secs_f64();
    let (daemon, load) = (
        before.until(ProcSample::of(pid)),
        load_before.until(self_sample()),
    );
    Row {
        name: name.into(),
        clients,
        ops: lat.len() as u64,
        secs,
        pct: percentiles(&mut lat),
        daemon: Some(daemon),
        load: Some(load),
    }
}

/// The disk's limit: overwrite 64 bytes and `fdatasync`, one caller, on the same
/// file system as the daemon's data.
fn fsync_row(name: &str, dir: &Path, dur: Duration) -> Row {
    let f = std::fs::File::create(dir.join("fsync-probe")).unwrap();
    (&f).write_all(&[0u8; 4096]).unwrap();
    f.sync_all().unwrap();
    let mut lat = Vec::new();
    let t = Instant::now();
    let mut i = 0u64;
    while t.elapsed() < dur {
        let s = Instant::now();
        f.write_all_at(&i.to_le_bytes().repeat(8), 0).unwrap();
        f.sync_data().unwrap();
        lat.push(s.elapsed().as_nanos() as u64);
        i += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    Row {
        name: name.into(),
        clients: 1,
        ops: lat.len() as u64,
        secs,
        pct: percentiles(&mut lat),
        daemon: None,
        load: None,
    }
}

const FSYNC: &str = "write + fdatasync (disk limit)";
const FSYNC_AFTER: &str = "write + fdatasync, again after";
const HWM: &str = "unix, hwm (no write), in-process";
const UNIX: &str = "unix socket";
const TCP: &str = "tcp loopback";
const INPROC: &str = "unix, in-process generator";
const BUSY: &str = "unix, busy host";

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// Our row and the Redis row run right after it, on one host condition.
struct Pair<'a> {
    busy: bool,
    ours: &'a Row,
    redis: &'a redis_beside::RedisRow,
}

impl Pair<'_> {
    fn ratio(&self) -> f64 {
        self.ours.rate() / self.redis.rate
    }
    fn redis_us(&self, s: ProcSample) -> f64 {
        s.cpu_s * 1e6 / self.redis.ops.max(1) as f64
    }
    /// Server + load generator CPU per operation: ours, Redis's.
    fn totals(&self) -> (f64, f64) {
        (
            self.ours.per_op_us(self.ours.daemon) + self.ours.per_op_us(self.ours.load),
            self.redis_us(self.redis.server) + self.redis_us(self.redis.load),
        )
    }
}

/// The 1-, 5- and 15-minute load averages, to say how busy the machine was.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

async fn bench(dur: Duration, forks: usize) {
    println!("load average at start: {}", loadavg());
    let dir = tempfile::tempdir_in(".").unwrap();
    let mut rows = vec![fsync_row(FSYNC, dir.path(), dur)];
    let (d, _) = start(dir.path()).await;

    // Sample the daemon's RSS while the rows run.
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let pid = d.child.id();
    let sampler = {
        let (peak, on) = (peak_rss.clone(), sampling.clone());
        std::thread::spawn(move || {
            while on.load(Ordering::Relaxed) {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                if let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Redis idles beside the daemon, and each of its rows runs right after ours
    // at the same client count, so that the two rows of a ratio are measured a
    // few seconds apart, not half a minute (this VM's speed drifts).
    let redis = match redis_beside::Redis::start(&dir.path().join("redis")) {
        Ok(r) => Some(r),
        Err(why) => {
            println!("Redis rows skipped: {why}");
            None
        }
    };
    // Leases taken and grown, sled warm, before the first measured row.
    ctl_row("warm-up", &d.unix, pid, 64, Duration::from_millis(500));
    let mut pairs: Vec<(bool, usize, usize)> = Vec::new(); // (busy, our row, redis row)
    let mut redis_rows = Vec::new();
    let mut hogs_cpu = (0.0, 0.0);
    rows.push(call_row(HWM, Call::Hwm, &d.unix, pid, 1, dur).await);
    for (busy, name, endpoint, clients, beside) in [
        (false, UNIX, &d.unix, 1, true),
        (false, TCP, &d.tcp, 1, false),
        (false, UNIX, &d.unix, 16, true),
        (false, TCP, &d.tcp, 16, false),
        (false, UNIX, &d.unix, 64, true),
        (false, INPROC, &d.unix, 64, false),
        (false, UNIX, &d.unix, 256, true),
        (true, BUSY, &d.unix, 1, true),
        (true, BUSY, &d.unix, 16, true),
    ] {
        // Two CPU-bound processes beside both servers for the busy rows (ours
        // and Redis's), started afresh for each pair.
        let hogs = busy.then(|| Hogs::start(2));
        let t = Instant::now();
        let row = if name == INPROC {
            call_row(name, Call::Reserve, endpoint, pid, clients, dur).await
        } else {
            ctl_row(name, endpoint, pid, clients, dur)
        };
        rows.push(row);
        if let (Some(r), true) = (&redis, beside) {
            redis_rows.push(r.row(clients, dur));
            pairs.push((busy, rows.len() - 1, redis_rows.len() - 1));
        }
        if let Some(h) = hogs {
            hogs_cpu.0 += h.cpu_seconds();
            hogs_cpu.1 += t.elapsed().as_secs_f64();
        }
    }
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    drop(redis);
    let hwm_rss = d.rss_kib("VmHWM:");
    d.stop();
    rows.push(fsync_row(FSYNC_AFTER, dir.path(), dur));
    println!("load average after the rows: {}", loadavg());

    println!(
        "{:<32} {:>7} {:>10} {:>8} {:>8} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "calls (reservations of 1000 ids)",
        "clients",
        "per second",
        "p50 us",
        "p99 us",
        "p999 us",
        "daemon cpu",
        "load cpu",
        "daemon cs",
        "load cs"
    );
    for r in &rows {
        let opt = |v: f64, prec: usize| {
            if v.is_nan() {
                String::new()
            } else {
                format!("{v:.prec$}")
            }
        };
        println!(
            "{:<32} {:>7} {:>10.0} {:>8.1} {:>8.1} {:>8.1} {:>10} {:>10} {:>10} {:>10}",
            r.name,
            r.clients,
            r.rate(),
            r.pct[0],
            r.pct[1],
            r.pct[2],
            opt(r.per_op_us(r.daemon), 1),
            opt(r.per_op_us(r.load), 1),
            opt(r.cs_per_op(r.daemon), 2),
            opt(r.cs_per_op(r.load), 2),
        );
    }
    println!(
        "(per call: cpu in us, cs = voluntary + involuntary context switches; the load generator is idallocctl bench except where it says in-process)"
    );
    if hogs_cpu.1 > 0.0 {
        println!(
            "busy host: the two hogs ran {:.2} CPUs' worth during the busy pairs",
            hogs_cpu.0 / hogs_cpu.1
        );
    }
    let find = |name: &str, c: usize| {
        rows.iter()
            .find(|r| r.name == name && r.clients == c)
            .unwrap()
    };
    // The stricter baseline: the faster of the two fdatasync rows.
    let fs = [find(FSYNC, 1), find(FSYNC_AFTER, 1)]
        .into_iter()
        .max_by(|a, b| a.rate().total_cmp(&b.rate()))
        .unwrap();
    let (floor, u1, u16, u64_, inproc, t1, t16) = (
        find(HWM, 1),
        find(UNIX, 1),
        find(UNIX, 16),
        find(UNIX, 64),
        find(INPROC, 64),
        find(TCP, 1),
        find(TCP, 16),
    );
    println!();
    println!(
        "unix, 16 clients: {:.0}/s, p99 {:.0} us (target >= 60000/s, p99 < 1000 us): {}",
        u16.rate(),
        u16.pct[1],
        verdict(u16.rate() >= 60_000.0 && u16.pct[1] < 1000.0)
    );
    println!(
        "unix, 1 client: {:.2} reservations per fdatasync (the faster fdatasync row, {:.0}/s) (target >= 1): {}",
        u1.rate() / fs.rate(),
        fs.rate(),
        verdict(u1.rate() >= fs.rate())
    );
    println!(
        "  the round trip of an RPC that writes nothing is {:.0} us p50, {:.2} of an fdatasync's {:.0} us",
        floor.pct[0],
        floor.pct[0] / fs.pct[0],
        fs.pct[0]
    );
    let worst = (u1.rate() / t1.rate()).max(u16.rate() / t16.rate());
    println!(
        "tcp vs unix: unix/tcp = {:.2} at 1 client, {:.2} at 16 (target <= 1.5): {}",
        u1.rate() / t1.rate(),
        u16.rate() / t16.rate(),
        verdict(worst <= 1.5)
    );
    println!(
        "64 clients: daemon cpu {:.1} us per reservation under idallocctl bench, {:.1} under the in-process generator (target <= 8): {}",
        u64_.per_op_us(u64_.daemon),
        inproc.per_op_us(inproc.daemon),
        verdict(u64_.per_op_us(u64_.daemon) <= 8.0)
    );
    let u256 = find(UNIX, 256);
    println!(
        "256 clients: {:.0}/s against {:.0}/s at 64 (target: not below): {}",
        u256.rate(),
        u64_.rate(),
        verdict(u256.rate() >= u64_.rate())
    );
    let pairs: Vec<Pair> = pairs
        .iter()
        .map(|&(busy, o, r)| Pair {
            busy,
            ours: &rows[o],
            redis: &redis_rows[r],
        })
        .collect();
    if !pairs.is_empty() {
        beside_redis(&pairs);
    }
    let peak = peak_rss.load(Ordering::Relaxed);
    println!(
        "daemon RSS under load: peak sampled {:.1} MiB, VmHWM {:.1} MiB (target <= 64): {}",
        peak as f64 / 1024.0,
        hwm_rss as f64 / 1024.0,
        verdict(hwm_rss.max(peak) <= 64 * 1024)
    );
    drop(dir);

    // Start-up with many forks: create them, stop cleanly, time the restart.
    let dir = tempfile::tempdir_in(".").unwrap();
    let (d, first) = start(dir.path()).await;
    let t = Instant::now();
    let mut creators = Vec::new();
    let next = Arc::new(AtomicU64::new(0));
    for _ in 0..8 {
        let (c, next) = (
            Client::connect(d.unix.as_str()).await.unwrap(),
            next.clone(),
        );
        creators.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < forks as u64 {
                c.bootstrap_fork(BootstrapRequest {
                    fork: ForkId::generate().to_string(),
                    parent: None,
                    vid_floor: 0,
                    eid_floor: 0,
                    request_id: None,
                })
                .await
                .unwrap();
            }
        }));
    }
    for c in creators {
        c.await.unwrap();
    }
    let created = t.elapsed();
    let t = Instant::now();
    d.stop();
    let stopped = t.elapsed();
    let (d, ready) = start(dir.path()).await;
    let c = Client::connect(d.unix.as_str()).await.unwrap();
    let st = c.status().await.unwrap();
    assert_eq!(st.namespaces_total, forks as u64 + 1);
    println!(
        "start-up: empty {:.0} ms; {forks} forks created in {:.1} s, clean stop {:.0} ms, restart to ready {:.0} ms (target < 200 ms): {}",
        first.as_secs_f64() * 1e3,
        created.as_secs_f64(),
        stopped.as_secs_f64() * 1e3,
        ready.as_secs_f64() * 1e3,
        verdict(ready < Duration::from_millis(200))
    );
    d.stop();
    let _ = std::io::stdout().flush();
}

/// The table of issue 32: idallocd's durable reservations against Redis
/// AOF-always `INCRBY`, both on unix sockets, same client counts, one run, each
/// server's and each load generator's CPU and context switches per operation,
/// and its targets.
fn beside_redis(pairs: &[Pair]) {
    println!();
    println!(
        "{:<6} {:>7} {:>9} {:>11} {:>6} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>8}",
        "hogs",
        "clients",
        "redis /s",
        "idallocd /s",
        "ratio",
        "redis p99",
        "ours p99",
        "redis us",
        "ours us",
        "r-bench",
        "ctl us",
        "cpu o/r",
        "redis cs",
        "ours cs"
    );
    for p in pairs {
        let (o, r) = (p.ours, p.redis);
        let (ours_total, redis_total) = p.totals();
        println!(
            "{:<6} {:>7} {:>9.0} {:>11.0} {:>6.2} {:>7.0}us {:>7.0}us {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7.2} {:>8.2} {:>8.2}",
            if p.busy { "2" } else { "0" },
            r.clients,
            r.rate,
            o.rate(),
            p.ratio(),
            r.p99_us,
            o.pct[1],
            p.redis_us(r.server),
            o.per_op_us(o.daemon),
            p.redis_us(r.load),
            o.per_op_us(o.load),
            ours_total / redis_total,
            (r.server.vcs + r.server.ivcs) as f64 / r.ops.max(1) as f64,
            o.cs_per_op(o.daemon),
        );
    }
    println!("(hogs = CPU-bound processes beside both servers; us = CPU per operation: redis-server, idallocd, redis-benchmark, idallocctl bench; cpu o/r = (idallocd + idallocctl) / (redis-server + redis-benchmark); cs = the server's context switches per operation)");
    for p in pairs {
        let (c, busy) = (p.redis.clients, p.busy);
        let (ours_total, redis_total) = p.totals();
        if busy {
            println!(
                "busy host, {c} clients: {:.2}x Redis (target >= 1.5): {}",
                p.ratio(),
                verdict(p.ratio() >= 1.5)
            );
        } else {
            println!(
                "{c} clients: {:.2}x Redis (target >= 2): {}; CPU per durable op {ours_total:.1} us against Redis's {redis_total:.1} (target: not above): {}",
                p.ratio(),
                verdict(p.ratio() >= 2.0),
                verdict(ours_total <= redis_total)
            );
        }
    }
}

fn main() {
    let secs: u64 = std::env::var("IDALLOC_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let forks: usize = std::env::var("IDALLOC_BENCH_FORKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    // One thread drives every in-process client connection, as `idallocctl bench`
    // does by default: the load generator then takes as little of the two cores
    // as it can from the daemon it measures.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench(Duration::from_secs(secs), forks));
}
