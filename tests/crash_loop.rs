//! `kill -9` of real daemons under load, over and over, with lost and rolled-back
//! data directories; an independent ledger keeps every range ever acknowledged and
//! checks that no id was given twice and that each daemon's grants only go up.
//!
//! `IDALLOC_SOAK_CYCLES` sets the number of crash cycles (default 30 per variant).

use crate::common;
use crate::daemon_support;
use crate::s3_support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::copy_dir;
use daemon_support::{Daemon, Opts};
use idalloc_client::client::{AllocatorConfig, Client, ClientConfig};
use idalloc_client::protocol::BootstrapRequest;
use idalloc_client::Kind;
use rand::Rng;
use s3_support::{Ledger, Moto};

const FORK: &str = "0190b6f2-7c1e-7a4b-9c3d-5e6f70819203";

fn cycles() -> usize {
    std::env::var("IDALLOC_SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
}

/// One daemon slot: its directory (config, socket, boot id, `data/`) and the
/// `[object_store]` TOML it runs with.
struct Slot {
    dir: PathBuf,
    store_toml: String,
    daemon: Option<Daemon>,
    lives: u64,
}

impl Slot {
    fn new(dir: &Path, store_toml: String) -> Slot {
        std::fs::write(dir.join("boot_id"), "boot-0\n").unwrap();
        let mut s = Slot {
            dir: dir.to_path_buf(),
            store_toml,
            daemon: None,
            lives: 0,
        };
        s.start();
        s
    }

    fn start(&mut self) {
        let toml = format!(
            "boot_id_path = {:?}\n{}",
            self.dir.join("boot_id").display().to_string(),
            self.store_toml
        );
        self.daemon = Some(Daemon::start_with(
            &self.dir,
            Opts {
                extra_toml: &toml,
                ..Opts::default()
            },
        ));
        self.lives += 1;
    }

    fn kill9(&mut self) {
        let mut d = self.daemon.take().unwrap();
        d.child.kill().unwrap();
        d.child.wait().unwrap();
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("d.sock")
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
}

#[derive(Debug, Default)]
struct Figures {
    cycles: usize,
    wipes: usize,
    restores: usize,
    client_errors: u64,
}

/// The crash loop over `slots`: load from `tasks_per_daemon` client tasks on each,
/// then per cycle kill -9 one daemon at a random moment; every `wipe_every`-th cycle
/// its data directory is lost, every `restore_every`-th it is replaced by an old
/// copy and the boot id changes (a restored VM snapshot after a reboot).
fn crash_loop(
    slots: &mut [Slot],
    tasks_per_daemon: usize,
    cycles: usize,
    wipe_every: usize,
    restore_every: usize,
) -> (Arc<Ledger>, Figures) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ledger = Ledger::new();
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let c = Client::connect(format!("unix:{}", slots[0].socket().display()))
            .await
            .unwrap();
        c.bootstrap_fork(BootstrapRequest {
            fork: FORK.into(),
            parent: None,
            vid_floor: 0,
            eid_floor: 0,
            request_id: None,
        })
        .await
        .unwrap();
    });
    let mut tasks = vec![];
    for (d, slot) in slots.iter().enumerate() {
        for _ in 0..tasks_per_daemon {
            let (ledger, stop, errors) = (ledger.clone(), stop.clone(), errors.clone());
            let endpoint = format!("unix:{}", slot.socket().display());
            tasks.push(rt.spawn(async move {
                let client = Client::connect_with(
                    endpoint,
                    ClientConfig::default()
                        .with_deadline(Duration::from_secs(3))
                        .with_backoff_max(Duration::from_millis(50)),
                )
                .await
                .unwrap();
                while !stop.load(Ordering::SeqCst) {
                    let (ns, kind, count) = {
                        let mut rng = rand::thread_rng();
                        let ns = if rng.gen_bool(0.3) { Some(FORK) } else { None };
                        let kind = if rng.gen_bool(0.5) {
                            Kind::Vid
                        } else {
                            Kind::Eid
                        };
                        (ns, kind, rng.gen_range(1..=500u64))
                    };
                    let sent = ledger.tick();
                    match client
                        .reserve(
                            idalloc_client::Namespace::from_wire(ns).unwrap(),
                            kind,
                            count,
                        )
                        .await
                    {
                        Ok(r) => {
                            assert_eq!(r.len(), count);
                            ledger.record(d, ns, kind, sent, r)
                        }
                        // The daemon is down or restarting past the deadline: no
                        // range was acknowledged, so none is recorded.
                        Err(_) => {
                            errors.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }));
        }
    }

    let mut fig = Figures::default();
    let mut rng = rand::thread_rng();
    let snaps: Vec<PathBuf> = slots.iter().map(|s| s.dir.join("snapshot")).collect();
    for cycle in 1..=cycles {
        // Refresh the old copies now and then, while the daemons run (as a VM
        // snapshot would catch them: possibly mid-write).
        if cycle % 7 == 1 {
            for (s, snap) in slots.iter().zip(&snaps) {
                let _ = std::fs::remove_dir_all(snap);
                copy_dir(&s.data(), snap);
            }
        }
        let acked_before = ledger.len();
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..300)));
        let victim = rng.gen_range(0..slots.len());
        let slot = &mut slots[victim];
        slot.kill9();
        if cycle % wipe_every == 0 {
            std::fs::remove_dir_all(slot.data()).unwrap();
            fig.wipes += 1;
        } else if cycle % restore_every == 0 {
            std::fs::remove_dir_all(slot.data()).unwrap();
            copy_dir(&snaps[victim], &slot.data());
            // The copy is older than what the daemon granted since: only a changed
            // boot id (the machine "rebooted") tells it not to trust those counters.
            std::fs::write(slot.dir.join("boot_id"), format!("boot-{cycle}\n")).unwrap();
            fig.restores += 1;
        }
        slot.start();
        fig.cycles += 1;
        if cycle % 100 == 0 {
            let v = ledger.check();
            eprintln!(
                "cycle {cycle}: {v:?}, {} client errors",
                errors.load(Ordering::SeqCst)
            );
        }
        // Keep the run honest: the load must be landing between crashes.
        if cycle % 10 == 0 {
            let until = Instant::now() + Duration::from_secs(20);
            while ledger.len() <= acked_before {
                assert!(Instant::now() < until, "no reservation succeeded for 20 s");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        for t in tasks {
            t.await.unwrap();
        }
    });
    fig.client_errors = errors.load(Ordering::SeqCst);
    (ledger, fig)
}

#[test]
fn crash_loop_two_daemons_on_moto() {
    let moto = Moto::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let toml = moto.daemon_toml("crash", &moto.endpoint(), "timeout = \"3s\"\nretries = 2\n");
    let mut slots: Vec<Slot> = dirs
        .iter()
        .map(|d| Slot::new(d.path(), toml.clone()))
        .collect();
    let n = cycles();
    let (ledger, fig) = crash_loop(&mut slots, 3, n, 5, 3);
    let v = ledger.check();
    eprintln!("moto crash loop: {fig:?}; checked {v:?}");
    assert_eq!(fig.cycles, n);
    assert!(fig.wipes > 0 && fig.restores > 0, "{fig:?}");
    assert!(v.ranges > n * 5, "too little load landed: {v:?}");
}

/// One daemon whose mirror is a `file://` store outside its data directory (losing
/// the disk of the daemon's state must not lose the object store too), crashed
/// under `tasks` writers: every 4th cycle wiped, every 3rd rolled back.
fn file_store_crash_loop(tasks: usize, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mirror = dir.path().join("mirror");
    std::fs::create_dir_all(&mirror).unwrap();
    let toml = format!("[object_store]\nurl = \"file://{}\"\n", mirror.display());
    let slot_dir = dir.path().join("d0");
    std::fs::create_dir_all(&slot_dir).unwrap();
    let mut slots = vec![Slot::new(&slot_dir, toml)];
    let n = cycles();
    let (ledger, fig) = crash_loop(&mut slots, tasks, n, 4, 3);
    let v = ledger.check();
    eprintln!("{label} crash loop: {fig:?}; checked {v:?}");
    assert_eq!(fig.cycles, n);
    assert!(v.ranges > n * 5, "too little load landed: {v:?}");
}

#[test]
fn crash_loop_single_daemon_on_file_store() {
    file_store_crash_loop(4, "file");
}

/// One writer alone: every group holds one commit (src/engine/local/mod.rs). Killed
/// mid-flush on that path, nothing acknowledged may be lost or handed out again.
#[test]
fn crash_loop_lone_writer_on_file_store() {
    file_store_crash_loop(1, "lone-writer");
}

/// A daemon killed under load from the real client library: 8 writer tasks with cached,
/// prefetching allocators; the daemon is killed with SIGKILL and restarted under
/// them; every id from both lives is unique.
#[test]
fn kill_dash_nine_under_load_from_eight_client_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let endpoint = format!("unix:{}", d.socket.display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Ledger::new();
    let mut tasks = vec![];
    for t in 0..8u64 {
        let (stop, ledger, endpoint) = (stop.clone(), ledger.clone(), endpoint.clone());
        tasks.push(rt.spawn(async move {
            let client = Client::connect(endpoint).await.unwrap();
            // The test daemon's `max_count` is 1000; the allocator's batch must
            // stay within it (its default ceiling is the daemon's default, 1e6).
            let ids = client.allocator_with(
                idalloc_client::Namespace::Primary,
                AllocatorConfig::default().with_max_batch(1000),
            );
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let sent = ledger.tick();
                // Single ids (the cache's lock-free path) and ranges, both kinds.
                let (kind, r) = match (t + n) % 3 {
                    0 => {
                        let v = ids.allocate_vid().await.unwrap();
                        (Kind::Vid, v..v + 1)
                    }
                    1 => (Kind::Vid, ids.allocate_vids(1 + n % 37).await.unwrap()),
                    _ => (Kind::Eid, ids.allocate_eids(1 + n % 11).await.unwrap()),
                };
                ledger.record(
                    0,
                    None,
                    kind,
                    sent,
                    idalloc_client::IdRange {
                        start: r.start,
                        end: r.end,
                    },
                );
                n += 1;
                // Yield so that the restart is not starved on 2 cores.
                if n.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            n
        }));
    }
    std::thread::sleep(Duration::from_millis(700));
    let first_life = ledger.len();
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let d2 = Daemon::start(dir.path());
    let restarted = ledger.len();
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::SeqCst);
    let per_task: Vec<u64> = rt.block_on(async {
        let mut v = vec![];
        for t in tasks {
            v.push(t.await.unwrap());
        }
        v
    });
    assert!(per_task.iter().all(|&n| n > 0), "{per_task:?}");
    assert!(first_life > 100, "load before the kill: {first_life}");
    assert!(
        ledger.len() > restarted,
        "the writers carried on after the restart"
    );
    // Cached ranges are handed out after later ones were fetched, so only
    // uniqueness (not order) is a property of what the allocators return.
    let (v, problems) = ledger.verdict();
    assert_eq!(v.duplicates, 0, "{problems:?}");
    drop(d2);
}
