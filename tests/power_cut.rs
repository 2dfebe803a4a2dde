//! Power cuts against the real daemon: its data directory (and, in one variant, its
//! `file://` object-store root) on the power-cut file system (`tools/powercut-fs`),
//! which drops every write not made durable by `fsync`/`fdatasync` — sled's
//! `sync_file_range` flushes included, and any manifest renamed into place before
//! its data was synced (it comes back empty).
//!
//! Each cycle, under load from 4 client tasks on the primary and on forks used
//! under both spellings of their ids: stop a daemon (`kill -9`, or a clean SIGTERM
//! stop), cut its file system, write a new boot id, remount, restart; now and then
//! a plain `kill -9` or SIGTERM restart with no cut. New forks are bootstrapped as
//! the run goes. Checked, by an independent ledger keyed by the 128-bit fork value:
//! - every acknowledged range is disjoint from every other in its namespace and
//!   kind, over all daemons and lives;
//! - each daemon's grants only go up, across its lives (a request sent after a
//!   range was acknowledged is answered above it);
//! - after every restart, `hwm` and bootstrap replies (both spellings) are never
//!   below what that daemon acknowledged in the namespace; a new fork starts at or
//!   above its caller's floor and everything the primary had acknowledged;
//! - one bootstrap per fork says `created: true`;
//! - the daemon always comes back: a start that fails fails the test, with the
//!   daemon's stderr.
//!
//! `IDALLOC_POWERCUT_CYCLES` sets the cuts per variant (default 30; 1000 for a
//! long run). `IDALLOC_DAEMON_BIN` runs another `idallocd` build (a baseline) —
//! only one that speaks this tree's wire protocol; for an older one, build this
//! file in that tree (with `tests/powercut_support/` and this tree's
//! `tests/daemon_support/mod.rs`) and point `IDALLOC_POWERCUT_FS_BIN` at the
//! file system's binary.
//! The file system's binary is found as `tests/powercut_support` says (`.ci/run`
//! builds it first).

use crate::daemon_support;
use crate::powercut_support;
use crate::s3_support;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon_support::{Daemon, Opts};
use idalloc_client::client::{Client, ClientConfig};
use idalloc_client::protocol::BootstrapRequest;
use idalloc_client::Kind;
use powercut_support::Mount;
use rand::Rng;
use s3_support::{Ledger, Moto};

/// Small leases, so that cuts land on lease boundaries all the time; their size
/// moves too (a lease run out within 20 ms doubles the next, up to 16x, and a
/// pause of 160 ms halves it), so cuts also land on grown and shrinking leases.
const ALLOCATION: &str =
    "max_count = 1000\nlease_size = 16\nprefetch_at = 0.5\nlease_min_life = \"20ms\"\n";
const TASKS: usize = 4;
const MAX_FORKS: usize = 6;

fn cycles() -> usize {
    std::env::var("IDALLOC_POWERCUT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}

/// A fork: one 128-bit value, two spellings.
#[derive(Debug, Clone)]
struct Fork {
    /// Ledger key: the value, never the text.
    key: String,
    uuid: String,
    ulid: String,
    /// The first ids it may hand out, from its creating bootstrap (if that reply
    /// was seen).
    floor: Option<(u64, u64)>,
}

impl Fork {
    fn new(value: u128) -> Fork {
        Fork {
            key: format!("fork:{value:032x}"),
            uuid: uuid::Uuid::from_u128(value).hyphenated().to_string(),
            ulid: ulid::Ulid(value).to_string(),
            floor: None,
        }
    }

    fn spelling(&self, ulid: bool) -> &str {
        if ulid {
            &self.ulid
        } else {
            &self.uuid
        }
    }
}

const PRIMARY: &str = "primary";

/// What a cycle does to its victim.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stop {
    /// `kill -9`, cut, new boot id.
    KillCut,
    /// SIGTERM (a clean stop), then cut, new boot id.
    TermCut,
    /// `kill -9`, no cut (a process crash).
    Kill,
    /// SIGTERM, no cut (a restart).
    Term,
}

const SCHEDULE: [Stop; 6] = [
    Stop::KillCut,
    Stop::TermCut,
    Stop::KillCut,
    Stop::Kill,
    Stop::KillCut,
    Stop::Term,
];

/// One daemon: its directory on plain disk (config, socket, boot id, stderr), its
/// data directory on its power-cut mount.
struct Slot {
    dir: PathBuf,
    data_dir: PathBuf,
    store_toml: String,
    daemon: Option<Daemon>,
    boots: u64,
}

impl Slot {
    fn new(dir: &Path, data_dir: PathBuf, store_toml: String) -> Slot {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("boot_id"), "boot-0\n").unwrap();
        Slot {
            dir: dir.to_path_buf(),
            data_dir,
            store_toml,
            daemon: None,
            boots: 0,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("d.sock")
    }

    fn endpoint(&self) -> String {
        format!("unix:{}", self.socket().display())
    }

    fn new_boot(&mut self) {
        self.boots += 1;
        std::fs::write(self.dir.join("boot_id"), format!("boot-{}\n", self.boots)).unwrap();
    }

    /// Start the daemon; `Err(message)` (with its stderr) if it does not serve.
    fn start(&mut self) -> Result<(), String> {
        let toml = format!(
            "boot_id_path = {:?}\n{}",
            self.dir.join("boot_id").display().to_string(),
            self.store_toml
        );
        let mut d = Daemon::start_with(
            &self.dir,
            Opts {
                extra_toml: &toml,
                data_dir: Some(self.data_dir.clone()),
                allocation_toml: Some(ALLOCATION),
                wait: false,
                ..Opts::default()
            },
        );
        match catch_unwind(AssertUnwindSafe(|| d.wait_serving())) {
            Ok(()) => {
                self.daemon = Some(d);
                Ok(())
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(msg)
            }
        }
    }

    fn kill9(&mut self) {
        let mut d = self.daemon.take().unwrap();
        d.child.kill().unwrap();
        d.child.wait().unwrap();
    }

    fn term(&mut self) {
        let mut d = self.daemon.take().unwrap();
        d.stop();
    }
}

#[derive(Debug, Default)]
struct Figures {
    cycles: usize,
    kill_cuts: usize,
    term_cuts: usize,
    kills: usize,
    terms: usize,
    restarts: usize,
    forks: usize,
    client_errors: u64,
    probes: usize,
}

/// Everything shared by the load, the probes and the final verdict.
struct Run {
    label: &'static str,
    ledger: Arc<Ledger>,
    forks: Arc<Mutex<Vec<Fork>>>,
    /// Broken promises seen by the probes (hwm, bootstrap, fork floor).
    problems: Mutex<Vec<String>>,
    hwm_violations: AtomicU64,
    bootstrap_violations: AtomicU64,
    probe_errors: AtomicU64,
    /// `created: true` replies per fork key.
    creators: Mutex<HashMap<String, usize>>,
    rt: tokio::runtime::Runtime,
}

impl Run {
    fn problem(&self, counter: &AtomicU64, msg: String) {
        counter.fetch_add(1, Ordering::SeqCst);
        let mut p = self.problems.lock().unwrap();
        if p.len() < 40 {
            p.push(msg);
        }
    }

    /// The highest end of the ranges acknowledged in `(ns, kind)` before `t`, by
    /// daemon `d` (or by any daemon with `None`).
    fn acked_below(&self, ns: &str, kind: Kind, d: Option<usize>, t: u64) -> u64 {
        self.ledger
            .ranges(Some(ns), kind)
            .iter()
            .filter(|a| a.recv < t && d.is_none_or(|d| a.daemon == d))
            .map(|a| a.range.end)
            .max()
            .unwrap_or(0)
    }

    fn client(&self, slot: &Slot) -> Client {
        self.rt
            .block_on(Client::connect_with(
                slot.endpoint(),
                ClientConfig::default().with_deadline(Duration::from_secs(10)),
            ))
            .unwrap()
    }

    /// Right after a start: `hwm` of every namespace under every spelling, and a
    /// bootstrap of every fork, must be at or above what this daemon acknowledged.
    fn probe(&self, d: usize, slot: &Slot, cycle: usize) {
        let c = self.client(slot);
        let forks = self.forks.lock().unwrap().clone();
        let mut targets: Vec<(String, Option<String>)> = vec![(PRIMARY.into(), None)];
        for f in &forks {
            targets.push((f.key.clone(), Some(f.uuid.clone())));
            targets.push((f.key.clone(), Some(f.ulid.clone())));
        }
        for (key, text) in &targets {
            let t = self.ledger.tick();
            match self
                .rt
                .block_on(c.hwm(idalloc_client::Namespace::from_wire(text.as_deref()).unwrap()))
            {
                Ok(h) => {
                    for (kind, next) in [(Kind::Vid, h.next_vid), (Kind::Eid, h.next_eid)] {
                        let need = self.acked_below(key, kind, Some(d), t);
                        if next < need {
                            self.problem(
                                &self.hwm_violations,
                                format!(
                                    "cycle {cycle}: daemon {d} hwm {key} ({text:?}) {kind}: next {next} \
                                     below {need} it acknowledged"
                                ),
                            );
                        }
                    }
                }
                Err(e) => self.problem(
                    &self.probe_errors,
                    format!("cycle {cycle}: daemon {d} hwm {key} ({text:?}) failed: {e}"),
                ),
            }
        }
        let mut rng = rand::thread_rng();
        for f in &forks {
            let t = self.ledger.tick();
            let text = f.spelling(rng.gen_bool(0.5)).to_string();
            let reply = self.rt.block_on(c.bootstrap_fork(BootstrapRequest {
                fork: text.clone(),
                parent: None,
                vid_floor: 0,
                eid_floor: 0,
                request_id: None,
            }));
            match reply {
                Ok(info) => {
                    if info.created {
                        *self
                            .creators
                            .lock()
                            .unwrap()
                            .entry(f.key.clone())
                            .or_default() += 1;
                        self.problem(
                            &self.bootstrap_violations,
                            format!(
                                "cycle {cycle}: daemon {d} bootstrap of existing fork {text} said created"
                            ),
                        );
                    }
                    for (kind, next) in [(Kind::Vid, info.next_vid), (Kind::Eid, info.next_eid)] {
                        let need = self.acked_below(&f.key, kind, Some(d), t);
                        if next < need {
                            self.problem(
                                &self.bootstrap_violations,
                                format!(
                                    "cycle {cycle}: daemon {d} bootstrap {text} {kind}: next {next} \
                                     below {need} it acknowledged"
                                ),
                            );
                        }
                    }
                }
                Err(e) => self.problem(
                    &self.probe_errors,
                    format!("cycle {cycle}: daemon {d} bootstrap {text} failed: {e}"),
                ),
            }
        }
    }

    /// Bootstrap a new fork through daemon `d`, under a random spelling, with a
    /// random caller floor; check its floor.
    fn new_fork(&self, d: usize, slot: &Slot, cycle: usize) {
        let mut rng = rand::thread_rng();
        let mut fork = Fork::new(uuid::Uuid::now_v7().as_u128());
        let ulid = rng.gen_bool(0.5);
        let text = fork.spelling(ulid).to_string();
        let t = self.ledger.tick();
        let (vid_floor, eid_floor) = if rng.gen_bool(0.5) {
            (0, 0)
        } else {
            (
                self.acked_below(PRIMARY, Kind::Vid, None, t) + rng.gen_range(0..100),
                self.acked_below(PRIMARY, Kind::Eid, None, t) + rng.gen_range(0..100),
            )
        };
        let c = self.client(slot);
        match self.rt.block_on(c.bootstrap_fork(BootstrapRequest {
            fork: text.clone(),
            parent: None,
            vid_floor,
            eid_floor,
            request_id: None,
        })) {
            Ok(info) => {
                if info.created {
                    *self
                        .creators
                        .lock()
                        .unwrap()
                        .entry(fork.key.clone())
                        .or_default() += 1;
                } else {
                    self.problem(
                        &self.bootstrap_violations,
                        format!("cycle {cycle}: daemon {d}: a new fork {text} said not created"),
                    );
                }
                for (kind, next, floor) in [
                    (Kind::Vid, info.next_vid, vid_floor),
                    (Kind::Eid, info.next_eid, eid_floor),
                ] {
                    let need = floor.max(self.acked_below(PRIMARY, kind, None, t));
                    if next < need {
                        self.problem(
                            &self.bootstrap_violations,
                            format!(
                                "cycle {cycle}: daemon {d}: new fork {text} {kind} starts at {next}, \
                                 below {need} (caller floor {floor}, primary acknowledged)"
                            ),
                        );
                    }
                }
                fork.floor = Some((info.next_vid, info.next_eid));
                self.forks.lock().unwrap().push(fork);
            }
            Err(e) => self.problem(
                &self.probe_errors,
                format!("cycle {cycle}: daemon {d}: bootstrap of new fork {text} failed: {e}"),
            ),
        }
    }

    /// One line per variant, whatever the outcome.
    fn summary(&self, fig: &Figures, mounts: &[Mount]) -> String {
        let (v, _) = self.ledger.verdict();
        let cuts: u64 = mounts.iter().map(|m| m.cuts).sum();
        let files: u64 = mounts.iter().map(|m| m.reverted.files).sum();
        let dropped: u64 = mounts.iter().map(|m| m.reverted.dropped_bytes).sum();
        let restored: u64 = mounts.iter().map(|m| m.reverted.restored_bytes).sum();
        format!(
            "power cut [{}]: cycles {} (kill-9+cut {}, sigterm+cut {}, kill-9 {}, sigterm {}), \
             cuts {cuts} (reverted {files} files: {dropped} bytes dropped, {restored} rewritten), \
             restarts {}, \
             forks {}, ranges {}, ids {}, duplicates {}, order violations {}, \
             hwm violations {}, bootstrap violations {}, probe errors {}, client errors {}",
            self.label,
            fig.cycles,
            fig.kill_cuts,
            fig.term_cuts,
            fig.kills,
            fig.terms,
            fig.restarts,
            self.forks.lock().unwrap().len(),
            v.ranges,
            v.ids,
            v.duplicates,
            v.order_violations,
            self.hwm_violations.load(Ordering::SeqCst),
            self.bootstrap_violations.load(Ordering::SeqCst),
            self.probe_errors.load(Ordering::SeqCst),
            fig.client_errors,
        )
    }
}

/// A start that failed: print the summary so far, then fail with the daemon's
/// stderr.
fn start_or_fail(run: &Run, slot: &mut Slot, fig: &Figures, mounts: &[Mount], what: &str) {
    if let Err(msg) = slot.start() {
        eprintln!("{}", run.summary(fig, mounts));
        panic!(
            "[{}] the daemon did not come back {what}:\n{msg}",
            run.label
        );
    }
}

/// The loop over `slots`, whose data directories are on `mounts[i]`.
fn power_cut_loop(label: &'static str, slots: &mut [Slot], mounts: &mut [Mount]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let run = Arc::new(Run {
        label,
        ledger: Ledger::new(),
        forks: Arc::new(Mutex::new(vec![])),
        problems: Mutex::new(vec![]),
        hwm_violations: AtomicU64::new(0),
        bootstrap_violations: AtomicU64::new(0),
        probe_errors: AtomicU64::new(0),
        creators: Mutex::new(HashMap::new()),
        rt,
    });
    let mut fig = Figures::default();
    for slot in slots.iter_mut() {
        start_or_fail(&run, slot, &fig, mounts, "at its first start");
    }
    // Two forks from the start, one per spelling.
    run.new_fork(0, &slots[0], 0);
    run.new_fork(slots.len() - 1, &slots[slots.len() - 1], 0);
    assert_eq!(run.forks.lock().unwrap().len(), 2, "{:?}", run.problems);

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = vec![];
    for t in 0..TASKS {
        let d = t % slots.len();
        let endpoint = slots[d].endpoint();
        let (ledger, forks, stop, errors) = (
            run.ledger.clone(),
            run.forks.clone(),
            stop.clone(),
            errors.clone(),
        );
        tasks.push(run.rt.spawn(async move {
            let client = Client::connect_with(
                endpoint,
                ClientConfig::default()
                    .with_deadline(Duration::from_secs(3))
                    .with_backoff_max(Duration::from_millis(50)),
            )
            .await
            .unwrap();
            while !stop.load(Ordering::SeqCst) {
                let (key, text, kind, count) = {
                    let mut rng = rand::thread_rng();
                    let forks = forks.lock().unwrap();
                    let (key, text) = if rng.gen_bool(0.4) || forks.is_empty() {
                        (PRIMARY.to_string(), None)
                    } else {
                        let f = &forks[rng.gen_range(0..forks.len())];
                        (
                            f.key.clone(),
                            Some(f.spelling(rng.gen_bool(0.5)).to_string()),
                        )
                    };
                    let kind = if rng.gen_bool(0.5) {
                        Kind::Vid
                    } else {
                        Kind::Eid
                    };
                    // Mostly within one 16-id lease, sometimes across two.
                    (key, text, kind, rng.gen_range(1..=24u64))
                };
                let sent = ledger.tick();
                match client
                    .reserve(
                        idalloc_client::Namespace::from_wire(text.as_deref()).unwrap(),
                        kind,
                        count,
                    )
                    .await
                {
                    Ok(r) => {
                        assert_eq!(r.len(), count);
                        ledger.record(d, Some(&key), kind, sent, r);
                    }
                    // Down or restarting past the deadline: nothing acknowledged.
                    Err(_) => {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        }));
    }

    let n = cycles();
    let mut rng = rand::thread_rng();
    let started = Instant::now();
    for cycle in 1..=n {
        let acked_before = run.ledger.len();
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..300)));
        let victim = rng.gen_range(0..slots.len());
        let action = SCHEDULE[(cycle - 1) % SCHEDULE.len()];
        let slot = &mut slots[victim];
        match action {
            Stop::KillCut | Stop::Kill => slot.kill9(),
            Stop::TermCut | Stop::Term => slot.term(),
        }
        match action {
            Stop::KillCut | Stop::TermCut => {
                mounts[victim].cut_and_remount();
                slot.new_boot();
            }
            Stop::Kill | Stop::Term => {}
        }
        match action {
            Stop::KillCut => fig.kill_cuts += 1,
            Stop::TermCut => fig.term_cuts += 1,
            Stop::Kill => fig.kills += 1,
            Stop::Term => fig.terms += 1,
        }
        start_or_fail(
            &run,
            slot,
            &fig,
            mounts,
            &format!("after {action:?} in cycle {cycle}"),
        );
        fig.restarts += 1;
        fig.cycles += 1;
        run.probe(victim, &slots[victim], cycle);
        fig.probes += 1;
        if cycle % 4 == 0 && run.forks.lock().unwrap().len() < MAX_FORKS {
            let d = rng.gen_range(0..slots.len());
            run.new_fork(d, &slots[d], cycle);
        }
        if cycle % 50 == 0 {
            eprintln!(
                "cycle {cycle} ({:?}): {}",
                started.elapsed(),
                run.summary(&fig, mounts)
            );
        }
        // The load must be landing between the cuts.
        if cycle % 10 == 0 {
            let until = Instant::now() + Duration::from_secs(20);
            while run.ledger.len() <= acked_before {
                if Instant::now() > until {
                    eprintln!("{}", run.summary(&fig, mounts));
                    panic!("[{label}] no reservation succeeded for 20 s after cycle {cycle}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    run.rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    fig.client_errors = errors.load(Ordering::SeqCst);

    // Every daemon serves every namespace, under both spellings, at the end.
    let forks = run.forks.lock().unwrap().clone();
    for (d, slot) in slots.iter().enumerate() {
        let c = run.client(slot);
        let mut targets: Vec<(String, Option<String>)> = vec![(PRIMARY.into(), None)];
        for f in &forks {
            targets.push((f.key.clone(), Some(f.uuid.clone())));
            targets.push((f.key.clone(), Some(f.ulid.clone())));
        }
        for (key, text) in targets {
            for kind in [Kind::Vid, Kind::Eid] {
                let sent = run.ledger.tick();
                match run.rt.block_on(c.reserve(
                    idalloc_client::Namespace::from_wire(text.as_deref()).unwrap(),
                    kind,
                    3,
                )) {
                    Ok(r) => run.ledger.record(d, Some(&key), kind, sent, r),
                    Err(e) => run.problem(
                        &run.probe_errors,
                        format!("end: daemon {d} cannot reserve in {key} ({text:?}) {kind}: {e}"),
                    ),
                }
            }
        }
    }
    // A fork's ids are all at or above the floor its creating bootstrap gave.
    for f in &forks {
        let Some((fv, fe)) = f.floor else { continue };
        for (kind, floor) in [(Kind::Vid, fv), (Kind::Eid, fe)] {
            if let Some(a) = run
                .ledger
                .ranges(Some(&f.key), kind)
                .iter()
                .find(|a| a.range.start < floor)
            {
                run.problem(
                    &run.bootstrap_violations,
                    format!(
                        "fork {} {kind}: {:?} (daemon {}) below the fork's floor {floor}",
                        f.uuid, a.range, a.daemon
                    ),
                );
            }
        }
    }
    for (k, n) in run.creators.lock().unwrap().iter() {
        if *n > 1 {
            run.problem(
                &run.bootstrap_violations,
                format!("fork {k}: {n} bootstraps said created"),
            );
        }
    }
    fig.forks = forks.len();

    let (v, ledger_problems) = run.ledger.verdict();
    eprintln!("{} [{:?}]", run.summary(&fig, mounts), started.elapsed());
    let problems = run.problems.lock().unwrap().clone();
    let cuts: u64 = mounts.iter().map(|m| m.cuts).sum();
    assert!(
        ledger_problems.is_empty() && problems.is_empty(),
        "[{label}] {} duplicate(s), {} order violation(s), {} hwm violation(s), \
         {} bootstrap violation(s), {} probe error(s):\n{}\n{}",
        v.duplicates,
        v.order_violations,
        run.hwm_violations.load(Ordering::SeqCst),
        run.bootstrap_violations.load(Ordering::SeqCst),
        run.probe_errors.load(Ordering::SeqCst),
        ledger_problems.join("\n"),
        problems.join("\n"),
    );
    assert_eq!(fig.cycles, n);
    assert!(cuts as usize >= n / 2, "too few cuts: {cuts}");
    assert!(v.ranges > n * 5, "too little load landed: {v:?}");
}

/// A mount over `root/backing-<name>` at `root/mnt-<name>`.
fn mount_in(root: &Path, name: &str) -> Mount {
    Mount::new(
        &root.join(format!("backing-{name}")),
        &root.join(format!("mnt-{name}")),
    )
}

/// One daemon, its data directory and its `file://` root on one power-cut file
/// system: a cut hits sled and the manifests together.
#[test]
fn power_cut_single_daemon_data_and_file_root_on_the_cut_fs() {
    let dir = tempfile::tempdir().unwrap();
    let mut mounts = vec![mount_in(dir.path(), "0")];
    let mirror = mounts[0].path().join("mirror");
    std::fs::create_dir_all(&mirror).unwrap();
    let toml = format!("[object_store]\nurl = \"file://{}\"\n", mirror.display());
    let data = mounts[0].path().join("data");
    let mut slots = vec![Slot::new(&dir.path().join("d0"), data, toml)];
    power_cut_loop("data+root on cut fs, file://", &mut slots, &mut mounts);
}

/// One daemon, its data directory on the power-cut file system, its `file://`
/// root on plain disk: a cut hits sled only.
#[test]
fn power_cut_single_daemon_data_on_the_cut_fs_root_on_plain_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut mounts = vec![mount_in(dir.path(), "0")];
    let mirror = dir.path().join("mirror");
    std::fs::create_dir_all(&mirror).unwrap();
    let toml = format!("[object_store]\nurl = \"file://{}\"\n", mirror.display());
    let data = mounts[0].path().join("data");
    let mut slots = vec![Slot::new(&dir.path().join("d0"), data, toml)];
    power_cut_loop("data on cut fs, file:// on disk", &mut slots, &mut mounts);
}

/// Two daemons on one moto S3 prefix, each data directory on its own power-cut
/// file system, each with its own boot id: a cut hits one host.
#[test]
fn power_cut_two_daemons_on_moto() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let toml = moto.daemon_toml(
        "powercut",
        &moto.endpoint(),
        "timeout = \"3s\"\nretries = 2\n",
    );
    let mut mounts: Vec<Mount> = (0..2)
        .map(|i| mount_in(dir.path(), &i.to_string()))
        .collect();
    let mut slots: Vec<Slot> = (0..2)
        .map(|i| {
            Slot::new(
                &dir.path().join(format!("d{i}")),
                mounts[i].path().join("data"),
                toml.clone(),
            )
        })
        .collect();
    power_cut_loop("two daemons on moto", &mut slots, &mut mounts);
    drop(slots);
    drop(mounts);
    drop(moto);
}
