//! Redis beside idallocd, for `benches/daemon.rs`: `redis-server` started on
//! 127.0.0.1 in the bench's temp directory (so on the same disk) with
//! `appendonly yes` and `appendfsync always` — every `INCRBY` durable before its
//! reply, as every idallocd reservation is — driven by `redis-benchmark -P 1`
//! (no pipelining), one `INCRBY ctr 1000` in flight per client. Its CPU per
//! operation is read from `/proc` around each run, as the daemon's is, and
//! redis-benchmark's from this process's reaped children's CPU (`getrusage`), to
//! set beside the load our own bench puts on the same two cores.
//!
//! Needs `redis-server` and `redis-benchmark` on PATH (Debian: `redis-server` and
//! `redis-tools`); without them [`Redis::start`] says why and the bench goes on
//! without the Redis rows.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`, killed on drop.
pub struct Redis {
    child: Child,
    port: u16,
}

/// One `redis-benchmark` run.
pub struct RedisRow {
    pub clients: usize,
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// redis-server's CPU per operation, in microseconds.
    pub cpu_us: f64,
    /// redis-benchmark's (the load generator's) CPU per operation, in microseconds.
    pub load_cpu_us: f64,
}

/// CPU seconds of this process's children that have been waited for.
fn reaped_children_cpu() -> f64 {
    // SAFETY: getrusage(2) fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn on_path(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Redis {
    /// Start Redis with AOF `always` in `dir`, or say why not.
    pub fn start(dir: &Path, port: u16) -> Result<Redis, String> {
        for bin in ["redis-server", "redis-benchmark"] {
            if !on_path(bin) {
                return Err(format!(
                    "{bin} is not on PATH (Debian: apt-get install redis-server redis-tools)"
                ));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--dir")
            .arg(dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        let redis = Redis { child, port };
        let t = Instant::now();
        while !redis.ping() {
            if t.elapsed() > Duration::from_secs(10) {
                return Err("redis-server did not answer PING within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(redis)
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok()
            && s.read(&mut buf)
                .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    /// `clients` connections, `INCRBY ctr 1000` each, for about `dur` (the
    /// request count is sized from a short first run).
    pub fn row(&self, clients: usize, dur: Duration) -> RedisRow {
        let probe = self.run(clients, (clients * 200).max(1000));
        let n = ((probe.rate * dur.as_secs_f64()) as usize).max(clients * 10);
        self.run(clients, n)
    }

    fn run(&self, clients: usize, n: usize) -> RedisRow {
        let pid = self.child.id().to_string();
        let before = super::cpu_seconds(&pid);
        // redis-benchmark is reaped by `output()`: the children's CPU grows by its own.
        let load_before = reaped_children_cpu();
        let out = Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-c", &clients.to_string(), "-n", &n.to_string(), "-P", "1"])
            .args(["--csv", "INCRBY", "ctr", "1000"])
            .output()
            .expect("redis-benchmark runs");
        let cpu = super::cpu_seconds(&pid) - before;
        let load_cpu = reaped_children_cpu() - load_before;
        let text = String::from_utf8_lossy(&out.stdout);
        // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",
        // "p95_latency_ms","p99_latency_ms","max_latency_ms"
        let line = text
            .lines()
            .rfind(|l| l.contains("INCRBY"))
            .unwrap_or_else(|| panic!("no INCRBY row in redis-benchmark's output: {text}"));
        let f: Vec<f64> = line
            .split(',')
            .skip(1)
            .map(|v| v.trim_matches('"').parse().unwrap_or(f64::NAN))
            .collect();
        RedisRow {
            clients,
            rate: f[0],
            p50_us: f[3] * 1e3,
            p99_us: f[5] * 1e3,
            cpu_us: cpu * 1e6 / n as f64,
            load_cpu_us: load_cpu * 1e6 / n as f64,
        }
    }
}
