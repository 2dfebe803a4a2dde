//! Harness of the adversarial tests: moto's S3 emulator on loopback, a TCP proxy
//! that injects faults between the daemons and it, and an independent ledger that
//! keeps every range ever acknowledged and checks the invariants over all of them.
//!
//! When the emulator cannot start the tests FAIL (panic) — they never skip: a
//! green run must mean the invariants were attacked against a real S3 API.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idalloc::engine::StoreHandle;
use idalloc_client::{IdRange, Kind};

/// The Python interpreter that has `moto[server]` 5.2 installed: `IDALLOC_MOTO_PYTHON`
/// (set by `.ci/run`), else the virtualenv `.ci/run` creates.
pub fn moto_python() -> PathBuf {
    if let Some(p) = std::env::var_os("IDALLOC_MOTO_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/venv/bin/python");
    assert!(
        venv.exists(),
        "moto's S3 emulator is needed: run `bash .ci/run` once (it creates .ci/venv with \
         moto[server]==5.2.*) or set IDALLOC_MOTO_PYTHON to a python that has it"
    );
    venv
}

/// Credentials moto accepts (it does not check them) — never real ones.
const KEY_ID: &str = "idalloc-test";
const SECRET: &str = "idalloc-test-secret";

/// A moto S3 server on 127.0.0.1 serving one request at a time, with one bucket.
/// Killed on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
    pub bucket: String,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Start moto with bucket `idalloc-test`; panics (failing the test) if it does
    /// not come up within 60 s.
    pub fn start() -> Moto {
        Moto::start_with(false)
    }

    /// moto with conditional writes checked and written in two steps, as stock
    /// `moto_server` (and some S3-compatible servers) do, and a writer that passed
    /// the check held until a second one has: every race of two or more has two
    /// winners. Unsafe for several writers on purpose, for the store check's
    /// "unsafe" verdict.
    pub fn start_two_step() -> Moto {
        Moto::start_with(true)
    }

    fn start_with(two_step: bool) -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let bucket = "idalloc-test".to_string();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3_support/moto_serial.py");
        let mut cmd = Command::new(moto_python());
        cmd.arg(&script).args(["--bucket", &bucket]);
        if two_step {
            cmd.arg("--two-step");
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        // The emulator must not outlive the test even if the test is killed:
        // the kernel sends it SIGKILL when the spawning thread exits.
        // SAFETY: prctl(2) only, between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", moto_python().display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Some(port) = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse::<u16>().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "moto's S3 emulator did not start (got {line:?}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Moto {
            child,
            port,
            bucket,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `s3://bucket/prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// object_store builder options reaching this emulator at `endpoint` (moto's
    /// own, or a proxy in front of it).
    pub fn options_via(&self, endpoint: &str) -> Vec<(String, String)> {
        [
            ("aws_endpoint", endpoint),
            ("aws_allow_http", "true"),
            ("aws_access_key_id", KEY_ID),
            ("aws_secret_access_key", SECRET),
            ("aws_region", "us-east-1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Options reaching moto directly.
    pub fn options(&self) -> Vec<(String, String)> {
        self.options_via(&self.endpoint())
    }

    /// A store handle on `prefix`, built exactly as the daemon builds it.
    pub fn store(&self, prefix: &str) -> StoreHandle {
        StoreHandle::from_url(&self.url(prefix), &self.options()).unwrap()
    }

    /// The daemon's `[object_store]` TOML for `prefix`, reaching moto at `endpoint`,
    /// with `settings` (e.g. `timeout = "500ms"`) in the section.
    pub fn daemon_toml(&self, prefix: &str, endpoint: &str, settings: &str) -> String {
        let mut s = format!(
            "[object_store]\nurl = {:?}\n{settings}\n[object_store.options]\n",
            self.url(prefix)
        );
        for (k, v) in self.options_via(endpoint) {
            s.push_str(&format!("{k} = {v:?}\n"));
        }
        s
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the fault proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ProxyMode {
    /// Forward bytes both ways.
    Pass = 0,
    /// Accept connections and hold every byte (new and established connections)
    /// until the mode changes: a store that hangs.
    Stall = 1,
    /// Close new connections at once and cut the established ones: a store that is
    /// down.
    Refuse = 2,
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`, switchable between passing,
/// stalling and refusing. Runs on plain threads, independent of any Tokio runtime.
pub struct FaultProxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    /// Bumped on `Refuse`: established connections whose generation is older die.
    generation: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(ProxyMode::Pass as u8));
        let generation = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (m, g, st) = (mode.clone(), generation.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let (m, g) = (m.clone(), g.clone());
                std::thread::spawn(move || proxy_connection(client, upstream, m, g));
            }
        });
        FaultProxy {
            port,
            mode,
            generation,
            stop,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set(&self, mode: ProxyMode) {
        if mode == ProxyMode::Refuse {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn mode_of(m: &AtomicU8) -> ProxyMode {
    match m.load(Ordering::SeqCst) {
        0 => ProxyMode::Pass,
        1 => ProxyMode::Stall,
        _ => ProxyMode::Refuse,
    }
}

fn proxy_connection(client: TcpStream, upstream: u16, mode: Arc<AtomicU8>, gen: Arc<AtomicU64>) {
    let born = gen.load(Ordering::SeqCst);
    // A new connection during a stall waits, unanswered, like a hung server.
    loop {
        match mode_of(&mode) {
            ProxyMode::Pass => break,
            ProxyMode::Refuse => return,
            ProxyMode::Stall => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let pipe = |from: TcpStream, to: TcpStream, mode: Arc<AtomicU8>, gen: Arc<AtomicU64>| {
        move || {
            let (mut from, mut to) = (from, to);
            from.set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
            let mut buf = [0u8; 16 * 1024];
            loop {
                if gen.load(Ordering::SeqCst) != born {
                    break;
                }
                match mode_of(&mode) {
                    ProxyMode::Refuse => break,
                    ProxyMode::Stall => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    ProxyMode::Pass => {}
                }
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
        }
    };
    let up = std::thread::spawn(pipe(
        client.try_clone().unwrap(),
        server.try_clone().unwrap(),
        mode.clone(),
        gen.clone(),
    ));
    pipe(server, client, mode, gen)();
    let _ = up.join();
}

/// One acknowledged reservation, as the independent checker sees it.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    /// Which daemon (slot) granted it; a restarted daemon keeps its slot.
    pub daemon: usize,
    pub range: IdRange,
    /// Ledger clock when the request was sent, and when its reply arrived.
    pub sent: u64,
    pub recv: u64,
}

/// Every range ever acknowledged, by namespace and kind, with a logical clock that
/// orders "reply received" before "next request sent".
#[derive(Default)]
pub struct Ledger {
    clock: AtomicU64,
    acks: Mutex<HashMap<(String, Kind), Vec<Ack>>>,
}

/// What [`Ledger::check`] verified.
#[derive(Debug, Default, Clone, Copy)]
pub struct Verdict {
    pub ranges: usize,
    pub ids: u64,
    pub duplicates: usize,
    pub order_violations: usize,
}

impl Ledger {
    pub fn new() -> Arc<Ledger> {
        Arc::new(Ledger::default())
    }

    /// Take a timestamp; call it right before sending a request.
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// Record an acknowledged range; `sent` came from [`Ledger::tick`] before the call.
    pub fn record(&self, daemon: usize, ns: Option<&str>, kind: Kind, sent: u64, range: IdRange) {
        let recv = self.tick();
        assert!(range.start < range.end, "empty range {range:?}");
        self.acks
            .lock()
            .unwrap()
            .entry((ns.unwrap_or("primary").to_string(), kind))
            .or_default()
            .push(Ack {
                daemon,
                range,
                sent,
                recv,
            });
    }

    pub fn len(&self) -> usize {
        self.acks.lock().unwrap().values().map(Vec::len).sum()
    }

    /// All ranges of one namespace and kind.
    pub fn ranges(&self, ns: Option<&str>, kind: Kind) -> Vec<Ack> {
        self.acks
            .lock()
            .unwrap()
            .get(&(ns.unwrap_or("primary").to_string(), kind))
            .cloned()
            .unwrap_or_default()
    }

    /// Count duplicates (ids in two ranges) and order violations (a daemon granting,
    /// for a request sent after it acknowledged range A, a range not above A).
    pub fn verdict(&self) -> (Verdict, Vec<String>) {
        let acks = self.acks.lock().unwrap();
        let mut v = Verdict::default();
        let mut problems = vec![];
        for ((ns, kind), list) in acks.iter() {
            v.ranges += list.len();
            v.ids += list.iter().map(|a| a.range.len()).sum::<u64>();
            let mut sorted = list.clone();
            sorted.sort_by_key(|a| (a.range.start, a.range.end));
            for w in sorted.windows(2) {
                if w[0].range.end > w[1].range.start {
                    v.duplicates += 1;
                    if problems.len() < 20 {
                        problems.push(format!(
                            "{ns}/{kind}: {:?} (daemon {}) overlaps {:?} (daemon {})",
                            w[0].range, w[0].daemon, w[1].range, w[1].daemon
                        ));
                    }
                }
            }
            // Per daemon: sweep the clock; at each send, the request must be answered
            // above every range this daemon acknowledged before it.
            let mut by_daemon: HashMap<usize, Vec<Ack>> = HashMap::new();
            for a in list {
                by_daemon.entry(a.daemon).or_default().push(*a);
            }
            for (d, list) in by_daemon {
                // (time, is_send, index): receives sort before sends at equal times,
                // which cannot happen anyway (the clock is unique).
                let mut events: Vec<(u64, bool, usize)> = vec![];
                for (i, a) in list.iter().enumerate() {
                    events.push((a.sent, true, i));
                    events.push((a.recv, false, i));
                }
                events.sort();
                let mut high = 0u64;
                let mut floor = vec![0u64; list.len()];
                for (_, is_send, i) in events {
                    if is_send {
                        floor[i] = high;
                    } else {
                        high = high.max(list[i].range.end);
                    }
                }
                for (i, a) in list.iter().enumerate() {
                    if a.range.start < floor[i] {
                        v.order_violations += 1;
                        if problems.len() < 20 {
                            problems.push(format!(
                                "{ns}/{kind}: daemon {d} granted {:?} after acknowledging a range ending at {}",
                                a.range, floor[i]
                            ));
                        }
                    }
                }
            }
        }
        (v, problems)
    }

    /// Panic with the first problems if any invariant was broken.
    pub fn check(&self) -> Verdict {
        let (v, problems) = self.verdict();
        assert!(
            problems.is_empty(),
            "{} duplicate(s), {} order violation(s) over {} ranges:\n{}",
            v.duplicates,
            v.order_violations,
            v.ranges,
            problems.join("\n")
        );
        v
    }
}
