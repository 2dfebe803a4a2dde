//! End to end: the real `idallocd` binary driven through the client library
//! (`idalloc_client::client`) and through the `idallocctl` binary, over the unix socket and
//! TCP. Also the client cache under daemon restarts (SIGTERM and `kill -9`), the
//! `examples/writer.rs` program, and the README quickstart (no arguments, empty cwd).

use crate::daemon_support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use daemon_support::{Daemon, Opts};
use idalloc_client::client::{AllocatorConfig, Client, ClientConfig, ClientError};
use idalloc_client::protocol::BootstrapRequest;
use idalloc_client::{ForkId, IdRange, Kind, Namespace, ServiceError};

fn ctl_path() -> &'static std::path::Path {
    crate::daemon_support::ctl_bin()
}

/// Start the daemon off the async worker threads: starting blocks until it serves.
async fn start(dir: &Path) -> Daemon {
    let dir = dir.to_path_buf();
    // Admin over TCP: these round trips checkpoint and drop forks on both transports.
    tokio::task::spawn_blocking(move || {
        Daemon::start_with(
            &dir,
            Opts {
                extra_toml: "[access]\ntcp_role = \"admin\"\n",
                ..Opts::default()
            },
        )
    })
    .await
    .unwrap()
}

fn endpoints(d: &Daemon) -> [String; 2] {
    [
        format!("unix:{}", d.socket.display()),
        format!("tcp:{}", d.tcp),
    ]
}

/// Every operation of the library against one endpoint of a fresh daemon.
async fn library_round_trip(endpoint: &str) {
    let client = Client::connect(endpoint).await.unwrap();

    // Ranges: exact length, increasing, per kind.
    let a = client
        .reserve(Namespace::Primary, Kind::Vid, 10)
        .await
        .unwrap();
    let b = client
        .reserve(Namespace::Primary, Kind::Vid, 1)
        .await
        .unwrap();
    let e = client
        .reserve(Namespace::Primary, Kind::Eid, 7)
        .await
        .unwrap();
    assert_eq!((a.len(), b.len(), e.len()), (10, 1, 7));
    assert!(b.start >= a.end, "{a:?} then {b:?}");
    let hwm = client.hwm(Namespace::Primary).await.unwrap();
    assert_eq!((hwm.next_vid, hwm.next_eid), (b.end, e.end), "{hwm:?}");

    // The cached allocator hands out ids above everything reserved so far.
    let alloc = client.allocator(Namespace::Primary);
    let v = alloc.allocate_vid().await.unwrap();
    let vs = alloc.allocate_vids(100).await.unwrap();
    let ed = alloc.allocate_eid().await.unwrap();
    assert!(v >= b.end && vs.start >= b.end && ed >= e.end);
    assert_eq!(vs.end - vs.start, 100);
    assert!(!vs.contains(&v));
    let hwm = alloc.current_hwm().await.unwrap();
    assert!(hwm.next_vid >= vs.end && hwm.next_eid > ed, "{hwm:?}");

    // Forks: bootstrap above the primary and the given floor, idempotent, listed,
    // allocated from, checkpointed, dropped; a dropped fork refuses reservations.
    let fork = ForkId::generate().to_string();
    let req = BootstrapRequest {
        fork: fork.clone(),
        parent: None,
        vid_floor: 0,
        eid_floor: 1_000_000,
        request_id: None,
    };
    let info = client.bootstrap_fork(req.clone()).await.unwrap();
    assert!(info.created);
    assert!(info.next_vid >= hwm.next_vid, "{info:?} below {hwm:?}");
    assert!(info.next_eid >= 1_000_000, "{info:?}");
    let again = client.bootstrap_fork(req).await.unwrap();
    assert!(!again.created);
    assert_eq!(
        (again.next_vid, again.next_eid),
        (info.next_vid, info.next_eid)
    );
    let child = ForkId::generate().to_string();
    let f = client
        .reserve(ForkId::parse(&fork).unwrap(), Kind::Vid, 5)
        .await
        .unwrap();
    assert!(f.start >= info.next_vid);
    let child_info = client
        .bootstrap_fork(BootstrapRequest {
            fork: child.clone(),
            parent: Some(fork.clone()),
            vid_floor: 0,
            eid_floor: 0,
            request_id: None,
        })
        .await
        .unwrap();
    assert!(child_info.next_vid >= f.end, "{child_info:?} below {f:?}");
    assert_eq!(child_info.parent.as_deref(), Some(fork.as_str()));
    let listed = client.list_forks().await.unwrap();
    let names: HashSet<_> = listed.iter().map(|i| i.fork.as_str()).collect();
    assert!(names.contains(fork.as_str()) && names.contains(child.as_str()));

    let fork_alloc = client.allocator(ForkId::parse(&fork).unwrap());
    let fe = fork_alloc.allocate_eid().await.unwrap();
    assert!(fe >= 1_000_000);
    let cp = client
        .checkpoint(ForkId::parse(&fork).unwrap())
        .await
        .unwrap();
    assert_eq!(cp.fork.as_deref(), Some(fork.as_str()));
    assert!(cp.next_vid >= f.end && cp.next_eid > fe, "{cp:?}");
    let cp_primary = alloc.checkpoint().await.unwrap();
    assert!(cp_primary.next_vid >= vs.end);

    let st = client.status().await.unwrap();
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(st.namespaces_total, 3);
    assert!(st.mirror.healthy, "{:?}", st.mirror);

    let dropped = client
        .drop_fork(ForkId::parse(&fork).unwrap())
        .await
        .unwrap();
    assert!(dropped.dropped);
    match client
        .reserve(ForkId::parse(&fork).unwrap(), Kind::Vid, 1)
        .await
    {
        Err(ClientError::Service(ServiceError::DroppedFork(_))) => {}
        other => panic!("reserve in a dropped fork: {other:?}"),
    }
    let listed = client.list_forks().await.unwrap();
    assert!(listed.iter().any(|i| i.fork == fork && i.dropped));
    match client.reserve(ForkId::generate(), Kind::Vid, 1).await {
        Err(ClientError::Service(ServiceError::UnknownFork(_))) => {}
        other => panic!("reserve in an unknown fork: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_library_over_unix_and_tcp() {
    for over_tcp in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let d = start(dir.path()).await;
        library_round_trip(&endpoints(&d)[over_tcp as usize]).await;
    }
}

fn ctl(endpoint: Option<&str>, args: &[&str], cwd: &Path) -> Output {
    let mut cmd = Command::new(ctl_path());
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("IDALLOC_ENDPOINT")
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("STATE_DIRECTORY");
    if let Some(e) = endpoint {
        cmd.env("IDALLOC_ENDPOINT", e);
    }
    cmd.output().unwrap()
}

fn ok_text(out: &Output) -> String {
    assert!(
        out.status.success(),
        "idallocctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok_text(out)).unwrap()
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("idallocctl: "), "{err}");
    err
}

/// Every `idallocctl` command against one endpoint of a real daemon, the endpoint
/// given through `IDALLOC_ENDPOINT` (and once through `--endpoint`).
fn ctl_round_trip(endpoint: &str, cwd: &Path) {
    let ep = Some(endpoint);
    let a = json(&ctl(ep, &["alloc", "vid", "--count", "10", "--json"], cwd));
    let (start, end) = (a["start"].as_u64().unwrap(), a["end"].as_u64().unwrap());
    assert_eq!(end - start, 10);
    let b = json(&ctl(
        None,
        &["--endpoint", endpoint, "alloc", "vid", "--json"],
        cwd,
    ));
    assert!(b["start"].as_u64().unwrap() >= end);
    let text = ok_text(&ctl(ep, &["alloc", "eid", "--count", "5"], cwd));
    let (s, e) = text.trim().split_once("..").unwrap();
    assert_eq!(e.parse::<u64>().unwrap() - s.parse::<u64>().unwrap(), 5);

    let h = json(&ctl(ep, &["hwm", "--json"], cwd));
    assert_eq!(h["next_vid"].as_u64(), b["end"].as_u64());
    assert_eq!(h["next_eid"].as_u64(), e.parse().ok());

    let fork = ForkId::generate().to_string();
    let f = json(&ctl(
        ep,
        &["fork", "bootstrap", &fork, "--eid-hwm", "5000", "--json"],
        cwd,
    ));
    assert_eq!(f["fork"], fork.as_str());
    assert_eq!(f["created"], true);
    assert!(f["next_vid"].as_u64().unwrap() >= b["end"].as_u64().unwrap());
    assert!(f["next_eid"].as_u64().unwrap() >= 5000);
    let again = json(&ctl(ep, &["fork", "bootstrap", &fork, "--json"], cwd));
    assert_eq!(again["created"], false);
    assert_eq!(again["next_vid"], f["next_vid"]);
    let fa = json(&ctl(
        ep,
        &["alloc", "vid", "--fork", &fork, "--count", "3", "--json"],
        cwd,
    ));
    assert!(fa["start"].as_u64() >= f["next_vid"].as_u64());
    let fh = json(&ctl(ep, &["hwm", "--fork", &fork, "--json"], cwd));
    assert_eq!(fh["next_vid"], fa["end"]);

    let list = json(&ctl(ep, &["fork", "list", "--json"], cwd));
    let entry = list
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["fork"] == fork.as_str())
        .expect("bootstrapped fork is listed");
    assert_eq!(entry["dropped"], false);
    assert!(ok_text(&ctl(ep, &["fork", "list"], cwd)).contains(&fork));

    assert!(ok_text(&ctl(ep, &["checkpoint"], cwd)).contains("checkpointed primary"));
    assert!(ok_text(&ctl(ep, &["checkpoint", "--fork", &fork], cwd)).contains(&fork));

    let st = json(&ctl(ep, &["status", "--json"], cwd));
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(st["namespaces_total"].as_u64(), Some(2));
    assert!(ok_text(&ctl(ep, &["status"], cwd)).contains("object store"));

    assert!(ok_text(&ctl(ep, &["fork", "drop", &fork], cwd)).contains("dropped"));
    let list = json(&ctl(ep, &["fork", "list", "--json"], cwd));
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["fork"] == fork.as_str() && x["dropped"] == true));

    // Each failure: non-zero exit, one line naming the problem.
    let err = one_line_error(&ctl(ep, &["alloc", "vid", "--fork", &fork], cwd));
    assert!(err.contains("dropped"), "{err}");
    let unknown = ForkId::generate().to_string();
    let err = one_line_error(&ctl(ep, &["hwm", "--fork", &unknown], cwd));
    assert!(err.contains("unknown fork"), "{err}");
    let err = one_line_error(&ctl(ep, &["alloc", "vid", "--count", "0"], cwd));
    assert!(err.contains("count"), "{err}");
    let err = one_line_error(&ctl(ep, &["hwm", "--fork", "not-a-fork-id"], cwd));
    assert!(err.contains("not-a-fork-id"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idallocctl_over_unix_and_tcp() {
    // A fresh daemon per transport, so that each round sees only its own forks.
    let mut last_dir = None;
    for over_tcp in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let d = start(dir.path()).await;
        let endpoint = endpoints(&d)[over_tcp as usize].clone();
        let cwd = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || ctl_round_trip(&endpoint, &cwd))
            .await
            .unwrap();
        drop(d);
        last_dir = Some(dir);
    }
    let dir = last_dir.unwrap();

    // Nobody listening: one line saying so, with the remedy.
    let gone = dir.path().join("nobody.sock");
    let err = one_line_error(&ctl(
        Some(&format!("unix:{}", gone.display())),
        &["--timeout", "300ms", "hwm"],
        dir.path(),
    ));
    assert!(err.contains("is idallocd running"), "{err}");
    let err = one_line_error(&ctl(Some("bogus:thing"), &["hwm"], dir.path()));
    assert!(err.contains("IDALLOC_ENDPOINT"), "{err}");
}

fn small_batches() -> AllocatorConfig {
    AllocatorConfig::default()
        .with_initial_batch(64)
        .with_min_batch(64)
        .with_max_batch(64)
}

fn assert_unique(ids: &[u64], what: &str) {
    let mut seen = HashSet::with_capacity(ids.len());
    for id in ids {
        assert!(seen.insert(*id), "{what} {id} handed out twice");
    }
}

/// A client on the daemon's unix socket that rides out restarts: a long deadline and
/// a short reconnect backoff.
async fn restart_tolerant_client(d: &Daemon) -> Client {
    Client::connect_with(
        endpoints(d)[0].as_str(),
        ClientConfig::default()
            .with_deadline(Duration::from_secs(30))
            .with_backoff_max(Duration::from_millis(50)),
    )
    .await
    .unwrap()
}

/// Writers allocating single ids from several tasks keep going while the daemon is
/// stopped with SIGTERM and restarted, then killed with SIGKILL and restarted: every
/// id is handed out once, and each life of the daemon serves some of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_writers_stay_unique_across_sigterm_and_kill9_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path()).await;
    let endpoint = endpoints(&d)[0].clone();
    let client = restart_tolerant_client(&d).await;
    let alloc = client.allocator_with(Namespace::Primary, small_batches());
    let stop = Arc::new(AtomicBool::new(false));
    let made = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..6)
        .map(|t| {
            let (alloc, stop, made) = (alloc.clone(), stop.clone(), made.clone());
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let kind = if t % 3 == 0 { Kind::Eid } else { Kind::Vid };
                    ids.push((kind, alloc.allocate(kind).await.unwrap()));
                    made.fetch_add(1, Ordering::SeqCst);
                    // Pace the writers so that the cache runs dry during a restart
                    // rather than the test allocating millions of ids.
                    if ids.len() % 64 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                ids
            })
        })
        .collect();

    // Progress seen by the writers since `from`, polled until it passes `at_least`.
    async fn progress(made: &AtomicU64, at_least: u64, what: &str) {
        let from = made.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while made.load(Ordering::SeqCst) < from + at_least {
            assert!(Instant::now() < deadline, "writers stalled {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let mut granted_by_life = Vec::new();
    progress(&made, 2_000, "in the first life").await;
    let mut check = Client::connect(endpoint.as_str()).await.unwrap();
    granted_by_life.push(check.hwm(Namespace::Primary).await.unwrap());

    // SIGTERM: a clean stop; the writers sit in the reconnect loop meanwhile.
    d = tokio::task::spawn_blocking(move || {
        d.stop();
        d
    })
    .await
    .unwrap();
    drop(d);
    tokio::time::sleep(Duration::from_millis(100)).await;
    d = start(dir.path()).await;
    assert_eq!(endpoints(&d)[0], endpoint, "same socket across lives");
    progress(&made, 2_000, "after the SIGTERM restart").await;
    check = Client::connect(endpoint.as_str()).await.unwrap();
    granted_by_life.push(check.hwm(Namespace::Primary).await.unwrap());

    // SIGKILL under load: no shutdown path at all.
    d.signal(libc::SIGKILL);
    d = tokio::task::spawn_blocking(move || {
        d.wait_exit(10);
        d
    })
    .await
    .unwrap();
    drop(d);
    let d = start(dir.path()).await;
    progress(&made, 2_000, "after the kill -9 restart").await;

    stop.store(true, Ordering::SeqCst);
    let mut by_kind = [Vec::new(), Vec::new()];
    for w in writers {
        for (kind, id) in w.await.unwrap() {
            by_kind[kind.index()].push(id);
        }
    }
    assert_unique(&by_kind[0], "vid");
    assert_unique(&by_kind[1], "eid");
    assert!(
        client.reconnects() >= 2,
        "the client reconnected {} times across two restarts",
        client.reconnects()
    );
    // Every id handed out lies below what the last daemon says it granted, and the
    // counters never went back across restarts.
    let last = Client::connect(endpoint.as_str())
        .await
        .unwrap()
        .hwm(Namespace::Primary)
        .await
        .unwrap();
    assert!(by_kind[0].iter().all(|&v| v < last.next_vid));
    assert!(by_kind[1].iter().all(|&e| e < last.next_eid));
    for w in granted_by_life.windows(2) {
        assert!(w[1].next_vid >= w[0].next_vid, "{granted_by_life:?}");
    }
    assert!(last.next_vid >= granted_by_life.last().unwrap().next_vid);
    drop(d);
}

/// Ranges from 8 reserving tasks across a `kill -9` and a restart are all disjoint:
/// the client reconnects to the new daemon on the same socket and carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_from_both_lives_of_a_killed_daemon_are_disjoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path()).await;
    let client = restart_tolerant_client(&d).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut ranges: Vec<IdRange> = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    // A reply lost with the connection is a gap, never a duplicate:
                    // the client redials and retries within its deadline.
                    ranges.push(
                        client
                            .reserve(Namespace::Primary, Kind::Vid, 7)
                            .await
                            .unwrap(),
                    );
                    done.fetch_add(1, Ordering::SeqCst);
                }
                ranges
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_kill = done.load(Ordering::SeqCst);
    assert!(before_kill > 0, "no reservation before the kill");
    d.signal(libc::SIGKILL);
    d = tokio::task::spawn_blocking(move || {
        d.wait_exit(10);
        d
    })
    .await
    .unwrap();
    drop(d);
    let after_kill = done.load(Ordering::SeqCst);
    let d = start(dir.path()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while done.load(Ordering::SeqCst) < after_kill + 500 {
        assert!(Instant::now() < deadline, "no progress after the restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert!(client.reconnects() >= 1);
    crate::common::assert_disjoint(&all, "ranges");
    drop(d);
}

/// The client crate's `examples/writer.rs`, the program its README points a writer
/// to, built as a writer's project builds it: the client crate alone, default
/// features. The root package has no examples, so `cargo test` does not build it:
/// the cargo running this test (`CARGO`) does, once per test process, into the
/// same target directory and profile.
fn example_writer() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            daemon_support::cargo_built(
                &["-p", "idalloc-client", "--example", "writer"],
                "examples/writer",
            )
        })
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_writer_runs_against_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path()).await;
    let endpoint = endpoints(&d)[0].clone();
    let out = tokio::process::Command::new(example_writer())
        .args([endpoint.as_str(), "--vertices", "20000", "--tasks", "4"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "writer failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all ids unique"), "{stdout}");
    assert!(stdout.contains("vertices     20000 ids"), "{stdout}");
    // The ids it took are the daemon's: its high-water mark covers them.
    let hwm = Client::connect(endpoint.as_str())
        .await
        .unwrap()
        .hwm(Namespace::Primary)
        .await
        .unwrap();
    assert!(hwm.next_vid >= 20_000 && hwm.next_eid >= 20_000 - 4);
}

/// The README's two commands: `idallocd` with no arguments in an empty directory,
/// then `idallocctl alloc vid` from that directory, with no endpoint given.
#[test]
fn quickstart_defaults_match_between_the_two_binaries() {
    let cwd = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(logs.path().join("idallocd.stderr")).ok();
    let mut daemon = Command::new(daemon_support::BIN)
        .current_dir(cwd.path())
        .env_remove("IDALLOCD_CONFIG")
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdout(Stdio::null())
        .stderr(log.map_or(Stdio::null(), Stdio::from))
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = daemon.id() as i32;
    let guard = Kill(&mut daemon);
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        let out = ctl(None, &["alloc", "vid", "--json"], cwd.path());
        if out.status.success() {
            break json(&out);
        }
        assert!(
            Instant::now() < deadline,
            "idallocctl never reached the default daemon: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        first["end"].as_u64(),
        Some(first["start"].as_u64().unwrap() + 1)
    );
    let text = ok_text(&ctl(None, &["alloc", "vid"], cwd.path()));
    assert!(text.trim().contains(".."), "{text}");
    assert!(cwd.path().join("idallocd-data/idallocd.sock").exists());
    assert!(cwd.path().join("idallocd-data/mirror").is_dir());
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let st = guard.0.wait().unwrap();
    assert!(st.success(), "idallocd on defaults exited with {st}");
}

/// The same example in a fork it bootstraps itself, as a fork's writer starts.
#[test]
fn the_writer_example_bootstraps_and_writes_a_fork() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let endpoint = format!("unix:{}", daemon.socket.display());
    let fork = ForkId::generate().to_string();
    let out = Command::new(example_writer())
        .args([endpoint.as_str(), "--fork", &fork])
        .args(["--vertices", "2000", "--tasks", "2"])
        .env_remove("IDALLOC_ENDPOINT")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "writer example failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("fork         {fork} created")),
        "{stdout}"
    );
    assert!(stdout.contains("vertices     2000 ids"), "{stdout}");
    assert!(stdout.contains("all ids unique"), "{stdout}");
}
