//! Redis beside idallocd, for `benches/daemon.rs`: `redis-server` started in the
//! bench's temp directory (so on the same disk) on a **unix socket only**, as
//! idallocd is, with `appendonly yes` and `appendfsync always` — every `INCRBY`
//! durable before its reply, as every idallocd reservation is — driven by
//! `redis-benchmark -s SOCKET -P 1` (no pipelining), one `INCRBY ctr 1000` in
//! flight per client. Measured from outside as the daemon is
//! ([`support/outside.rs`]): redis-server's whole-process CPU and context switches
//! from `/proc` around each run, redis-benchmark's from its own rusage.
//!
//! Needs `redis-server` and `redis-benchmark` on PATH (Debian: `redis-server` and
//! `redis-tools`); without them [`Redis::start`] says why and the bench goes on
//! without the Redis rows.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::outside::{run_measured, ProcSample};

/// A running `redis-server`, killed on drop.
pub struct Redis {
    child: Child,
    socket: PathBuf,
}

/// One `redis-benchmark` run.
pub struct RedisRow {
    pub clients: usize,
    pub rate: f64,
    pub p99_us: f64,
    /// Operations in the measured run.
    pub ops: u64,
    /// redis-server's CPU and context switches over the run.
    pub server: ProcSample,
    /// redis-benchmark's (the load generator's).
    pub load: ProcSample,
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
    pub fn start(dir: &Path) -> Result<Redis, String> {
        for bin in ["redis-server", "redis-benchmark"] {
            if !on_path(bin) {
                return Err(format!(
                    "{bin} is not on PATH (Debian: apt-get install redis-server redis-tools)"
                ));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let socket = dir.join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args(["--unixsocketperm", "700", "--dir"])
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
        let redis = Redis { child, socket };
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
        let Ok(mut s) = UnixStream::connect(&self.socket) else {
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
        let pid = self.child.id();
        let before = ProcSample::of(pid);
        let out = run_measured(
            Command::new("redis-benchmark")
                .arg("-s")
                .arg(&self.socket)
                .args(["-c", &clients.to_string(), "-n", &n.to_string(), "-P", "1"])
                .args(["--csv", "INCRBY", "ctr", "1000"]),
        );
        let server = before.until(ProcSample::of(pid));
        assert!(out.success, "redis-benchmark failed: {}", out.stdout);
        let text = &out.stdout;
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
            p99_us: f[5] * 1e3,
            ops: n as u64,
            server,
            load: out.cost,
        }
    }
}
