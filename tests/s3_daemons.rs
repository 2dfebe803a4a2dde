//! Several real `idallocd` processes on one moto bucket prefix (DESIGN.md's
//! multi-writer mode): 24 client tasks over 3 daemons in the primary and two forks,
//! a daemon killed and its data directory wiped, and one fork bootstrapped through
//! all three daemons at once with `idallocctl`.

use crate::daemon_support;
use crate::s3_support;

use std::path::Path;
use std::sync::Arc;

use daemon_support::{ctx, unix_client, Daemon, Opts};
use idalloc_client::protocol::BootstrapRequest;
use idalloc_client::Kind;
use object_store::ObjectStoreExt;
use rand::Rng;
use s3_support::{Ledger, Moto};

const FORK_A: &str = "0190b6f2-7c1e-7a4b-9c3d-5e6f70819203";
const FORK_B: &str = "01J2VF4Z0Y8Q3R5S7T9V1W3X5Z";
fn ctl_path() -> &'static std::path::Path {
    crate::daemon_support::ctl_bin()
}

/// Start daemon `i` of the group in `dir`, on `prefix` of moto's bucket.
fn start(moto: &Moto, dir: &Path, prefix: &str) -> Daemon {
    start_allocating(moto, dir, prefix, None)
}

/// [`start`] with the body of the `[allocation]` table.
fn start_allocating(moto: &Moto, dir: &Path, prefix: &str, allocation: Option<&str>) -> Daemon {
    std::fs::write(dir.join("boot_id"), "boot-1\n").unwrap();
    let toml = format!(
        "boot_id_path = {:?}\n{}",
        dir.join("boot_id").display().to_string(),
        moto.daemon_toml(prefix, &moto.endpoint(), "timeout = \"3s\"\nretries = 2\n")
    );
    Daemon::start_with(
        dir,
        Opts {
            extra_toml: &toml,
            allocation_toml: allocation,
            ..Opts::default()
        },
    )
}

/// `tasks` client tasks, task `t` on daemon `t % daemons.len()`, each making `n`
/// reservations of random kind, namespace and size; every reply goes to the ledger.
async fn load(sockets: &[std::path::PathBuf], tasks: usize, n: usize, ledger: &Arc<Ledger>) {
    load_in(
        sockets,
        &[None, Some(FORK_A), Some(FORK_B)],
        tasks,
        n,
        ledger,
    )
    .await
}

/// [`load`] over the namespaces `spaces`.
async fn load_in(
    sockets: &[std::path::PathBuf],
    spaces: &[Option<&'static str>],
    tasks: usize,
    n: usize,
    ledger: &Arc<Ledger>,
) {
    let spaces: Arc<Vec<Option<&'static str>>> = Arc::new(spaces.to_vec());
    let mut handles = vec![];
    for t in 0..tasks {
        let d = t % sockets.len();
        let socket = sockets[d].clone();
        let ledger = ledger.clone();
        let spaces = spaces.clone();
        handles.push(tokio::spawn(async move {
            let c = unix_client(&socket).await.unwrap();
            for _ in 0..n {
                let (ns, kind, count) = {
                    let mut rng = rand::thread_rng();
                    let ns = spaces[rng.gen_range(0..spaces.len())];
                    let kind = if rng.gen_bool(0.5) {
                        Kind::Vid
                    } else {
                        Kind::Eid
                    };
                    (ns, kind, rng.gen_range(1..=300u64))
                };
                let sent = ledger.tick();
                let r = c
                    .reserve(ctx(), ns.map(String::from), kind, count)
                    .await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("reserve on daemon {d}: {e}"));
                assert_eq!(r.len(), count);
                ledger.record(d, ns, kind, sent, r);
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_one_bucket_disjoint_through_a_lost_disk() {
    let moto = Moto::start();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut daemons: Vec<Daemon> = dirs
        .iter()
        .map(|d| start(&moto, d.path(), "graphs/db1"))
        .collect();
    for d in &daemons {
        assert!(
            d.stderr().contains("multi-writer"),
            "the daemon says which mode it runs in:\n{}",
            d.stderr()
        );
    }
    let sockets: Vec<_> = daemons.iter().map(|d| d.socket.clone()).collect();
    // The forks exist before the load: created through daemon 0, found in the
    // bucket by the others.
    let c0 = unix_client(&sockets[0]).await.unwrap();
    for f in [FORK_A, FORK_B] {
        c0.bootstrap_fork(
            ctx(),
            BootstrapRequest {
                fork: f.into(),
                parent: None,
                vid_floor: 0,
                eid_floor: 0,
                request_id: None,
            },
        )
        .await
        .unwrap()
        .unwrap();
    }

    // IDALLOC_LOAD_ROUNDS: reservations per task in each half (long mode: many).
    let rounds: usize = std::env::var("IDALLOC_LOAD_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let ledger = Ledger::new();
    let started = std::time::Instant::now();
    load(&sockets, 24, rounds, &ledger).await;
    let first = ledger.check();
    assert_eq!(first.ranges, 24 * rounds);

    // kill -9 daemon 1, lose its disk, start it again on the same prefix.
    daemons[1].child.kill().unwrap();
    daemons[1].child.wait().unwrap();
    std::fs::remove_dir_all(dirs[1].path().join("data")).unwrap();
    daemons[1] = start(&moto, dirs[1].path(), "graphs/db1");
    load(&sockets, 24, rounds, &ledger).await;
    let v = ledger.check();
    assert_eq!(v.ranges, 24 * 2 * rounds);
    eprintln!("three daemons: {v:?} in {:?}", started.elapsed());

    // The manifests in the bucket are the reference's JSON and bound every id.
    let store = moto.store("graphs/db1");
    let m = store
        .store
        .get(&object_store::path::Path::from("id_allocator.json"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&m).unwrap();
    for (kind, field) in [(Kind::Vid, "next_vid_batch"), (Kind::Eid, "next_eid_batch")] {
        let max = ledger
            .ranges(None, kind)
            .iter()
            .map(|a| a.range.end)
            .max()
            .unwrap();
        assert!(m[field].as_u64().unwrap() >= max, "{m} below {max}");
    }
    drop(daemons);
}

/// Run `idallocctl fork bootstrap` through `socket`; its JSON reply.
fn ctl_bootstrap(socket: &Path, fork: &str, vid_hwm: u64, eid_hwm: u64) -> serde_json::Value {
    let out = std::process::Command::new(ctl_path())
        .arg("--endpoint")
        .arg(format!("unix:{}", socket.display()))
        .args(["fork", "bootstrap", fork, "--json"])
        .args(["--vid-hwm", &vid_hwm.to_string()])
        .args(["--eid-hwm", &eid_hwm.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "idallocctl fork bootstrap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bootstrap_through_three_daemons_has_one_creator() {
    let moto = Moto::start();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let daemons: Vec<Daemon> = dirs
        .iter()
        .map(|d| start(&moto, d.path(), "boot"))
        .collect();
    let sockets: Vec<_> = daemons.iter().map(|d| d.socket.clone()).collect();
    // Some primary ids first, so that the parent's HWM matters.
    let c = unix_client(&sockets[2]).await.unwrap();
    let p = c
        .reserve(ctx(), None, Kind::Vid, 777)
        .await
        .unwrap()
        .unwrap();

    for round in 0..4u64 {
        let fork = uuid::Uuid::now_v7().to_string();
        // Each daemon's caller brings its own floor: whoever creates decides it.
        let barrier = Arc::new(std::sync::Barrier::new(3));
        let replies: Vec<serde_json::Value> = std::thread::scope(|s| {
            let hs: Vec<_> = sockets
                .iter()
                .enumerate()
                .map(|(i, sock)| {
                    let (b, fork) = (barrier.clone(), fork.clone());
                    s.spawn(move || {
                        b.wait();
                        ctl_bootstrap(sock, &fork, 5000 * (i as u64 + 1) * (round % 2), 0)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let creators = replies.iter().filter(|r| r["created"] == true).count();
        assert_eq!(creators, 1, "one creator: {replies:?}");
        for r in &replies {
            assert_eq!(
                r["floor_vid"], replies[0]["floor_vid"],
                "one floor: {replies:?}"
            );
            assert_eq!(
                r["floor_eid"], replies[0]["floor_eid"],
                "one floor: {replies:?}"
            );
            assert!(
                r["floor_vid"].as_u64().unwrap() >= p.end,
                "above the parent: {r}"
            );
        }
        // Ids in the fork from every daemon start at the agreed floor or above.
        let floor = replies[0]["floor_vid"].as_u64().unwrap();
        let mut ranges = vec![];
        for sock in &sockets {
            let c = unix_client(sock).await.unwrap();
            let r = c
                .reserve(ctx(), Some(fork.clone()), Kind::Vid, 10)
                .await
                .unwrap()
                .unwrap();
            assert!(r.start >= floor, "{r:?} below the floor {floor}");
            ranges.push(r);
        }
        crate::common::assert_disjoint(&ranges, "ranges");
        // A second bootstrap later reports the fork as existing, unchanged.
        let again = ctl_bootstrap(&sockets[round as usize % 3], &fork, u64::MAX / 2, 0);
        assert_eq!(again["created"], false);
        assert_eq!(again["floor_vid"], replies[0]["floor_vid"]);
    }
    drop(daemons);
}

/// Run idallocctl through `socket` with `args`; its output.
fn ctl(socket: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(ctl_path())
        .arg("--endpoint")
        .arg(format!("unix:{}", socket.display()))
        .args(args)
        .output()
        .unwrap()
}

fn ctl_json(socket: &Path, args: &[&str]) -> serde_json::Value {
    let out = ctl(socket, args);
    assert!(
        out.status.success(),
        "idallocctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const FORK_C: &str = "0190b6f2-7c1e-7a4b-9c3d-5e6f70819204";

/// Tree mode (`fork_ids = "tree"`) on real daemons: a fork tree of depth 3 made
/// through three daemons, random reservations everywhere, one daemon killed and
/// its disk lost, then the deepest fork merged: no id in two ranges anywhere in
/// the tree, and the primary's manifest above every id (a reference takeover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_mode_three_daemons_one_ledger_across_a_fork_tree() {
    let moto = Moto::start();
    let tree = Some("max_count = 1000\nlease_size = 2000\nfork_ids = \"tree\"\n");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut daemons: Vec<Daemon> = dirs
        .iter()
        .map(|d| start_allocating(&moto, d.path(), "graphs/tree", tree))
        .collect();
    let sockets: Vec<_> = daemons.iter().map(|d| d.socket.clone()).collect();
    assert!(
        daemons[0]
            .stderr()
            .contains("one sequence for the whole tree"),
        "{}",
        daemons[0].stderr()
    );
    // primary <- A <- B <- C, each made through another daemon.
    let mut parent: Option<&str> = None;
    for (i, f) in [FORK_A, FORK_B, FORK_C].into_iter().enumerate() {
        let mut args = vec!["fork", "bootstrap", f, "--json"];
        if let Some(p) = parent {
            args.extend(["--parent", p]);
        }
        let v = ctl_json(&sockets[i], &args);
        assert_eq!(v["created"], true, "{v}");
        parent = Some(f);
    }
    let rounds: usize = std::env::var("IDALLOC_LOAD_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let spaces = [None, Some(FORK_A), Some(FORK_B), Some(FORK_C)];
    let ledger = Ledger::new();
    load_in(&sockets, &spaces, 24, rounds, &ledger).await;
    daemons[1].child.kill().unwrap();
    daemons[1].child.wait().unwrap();
    std::fs::remove_dir_all(dirs[1].path().join("data")).unwrap();
    daemons[1] = start_allocating(&moto, dirs[1].path(), "graphs/tree", tree);
    load_in(&sockets, &spaces, 24, rounds, &ledger).await;
    let v = ledger.check();
    assert_eq!(v.ranges, 24 * 2 * rounds);
    // One ledger across every namespace of the tree.
    let mut max_end = 0;
    for kind in [Kind::Vid, Kind::Eid] {
        let mut all: Vec<(idalloc_client::IdRange, &str)> = vec![];
        for ns in spaces {
            for a in ledger.ranges(ns, kind) {
                all.push((a.range, ns.unwrap_or("primary")));
            }
        }
        all.sort_by_key(|(r, _)| (r.start, r.end));
        for w in all.windows(2) {
            assert!(
                w[0].0.end <= w[1].0.start,
                "{kind}: {:?} in {} overlaps {:?} in {}",
                w[0].0,
                w[0].1,
                w[1].0,
                w[1].1
            );
        }
        if kind == Kind::Vid {
            max_end = all.last().unwrap().0.end;
        }
    }
    // Merge the deepest fork into the primary past its parents, through daemon 2.
    let report = ctl_json(
        &sockets[2],
        &["fork", "merge", FORK_C, "--into", "primary", "--json"],
    );
    assert_eq!(report["merged_now"], true, "{report}");
    assert_eq!(report["fork_ids"], "tree", "{report}");
    assert!(
        report["summary"]
            .as_str()
            .unwrap()
            .contains("already disjoint"),
        "{report}"
    );
    let again = ctl_json(
        &sockets[0],
        &["fork", "merge", FORK_C, "--into", "primary", "--json"],
    );
    assert_eq!(again["merged_now"], false, "{again}");
    let listed = ctl_json(&sockets[2], &["fork", "list", "--json"]);
    let c = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fork"] == FORK_C)
        .unwrap();
    assert_eq!(c["merged_into"], "primary", "{listed}");
    let out = ctl(&sockets[2], &["alloc", "vid", "--fork", FORK_C]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("was merged into primary"),
        "{err}"
    );
    // The primary's manifest (a reference takeover) is above every id of the tree.
    let store = moto.store("graphs/tree");
    let m = store
        .store
        .get(&object_store::path::Path::from("id_allocator.json"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&m).unwrap();
    assert!(
        m["next_vid_batch"].as_u64().unwrap() >= max_end,
        "{m} below {max_end}"
    );
    eprintln!("tree mode, three daemons: {v:?}");
    drop(daemons);
}

/// The repair an operator makes on a shared root, exactly as the error advises:
/// daemon A reserves, daemon B reserves from its own lease, the
/// primary's manifest is truncated, and `idallocctl repair` through A gets floors
/// one above the highest ids the database holds. B still holds its lease and
/// never reads the store while it lasts, so the repair must stand above B's lease
/// (its lease record) or A re-grants B's ids. Then both daemons reserve again:
/// every range disjoint. In both fork-id modes; in tree mode through a fork too.
#[test]
fn a_repair_as_the_error_advises_on_a_shared_root_never_hands_out_ids_twice() {
    for mode in ["namespace", "tree"] {
        repair_on_a_shared_root(mode);
    }
}

fn repair_on_a_shared_root(mode: &str) {
    use idalloc_client::protocol::IdRange;
    let moto = Moto::start();
    let prefix = format!("graphs/repair-{mode}");
    let allocation = format!("lease_size = 1000\nlease_min_life = \"0s\"\nfork_ids = \"{mode}\"\n");
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let daemons: Vec<Daemon> = dirs
        .iter()
        .map(|d| start_allocating(&moto, d.path(), &prefix, Some(&allocation)))
        .collect();
    let (a, b) = (&daemons[0].socket, &daemons[1].socket);
    let alloc = |socket: &Path, args: &[&str]| -> IdRange {
        let mut all = vec!["alloc"];
        all.extend_from_slice(args);
        all.push("--json");
        let v = ctl_json(socket, &all);
        IdRange {
            start: v["start"].as_u64().unwrap(),
            end: v["end"].as_u64().unwrap(),
        }
    };
    let mut got: Vec<(&str, IdRange)> = vec![
        ("A", alloc(a, &["vid", "--count", "10"])),
        ("B", alloc(b, &["vid", "--count", "10"])),
    ];
    assert_ne!(
        got[0].1.start / 1000,
        got[1].1.start / 1000,
        "two leases: {got:?}"
    );
    // A truncated write of the primary's manifest.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = moto.store(&prefix);
    rt.block_on(async {
        store
            .store
            .put(
                &object_store::path::Path::from("id_allocator.json"),
                object_store::PutPayload::from_static(b"{\"next_vid_ba"),
            )
            .await
            .unwrap()
    });
    // The next reservation that needs the store says what to do.
    let out = ctl(a, &["alloc", "vid", "--count", "1000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "A reserved past a broken manifest");
    assert!(err.contains("idallocctl repair"), "{err}");
    // The operator's floors: one above the highest ids the database holds.
    let highest = got.iter().map(|(_, r)| r.end).max().unwrap();
    let out = ctl(
        a,
        &[
            "repair",
            "--vid-floor",
            &highest.to_string(),
            "--eid-floor",
            "0",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "repair: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Both daemons grant again, B from the lease it held all along.
    for _ in 0..4 {
        got.push(("A", alloc(a, &["vid", "--count", "500"])));
        got.push(("B", alloc(b, &["vid", "--count", "100"])));
    }
    for (i, (who, r)) in got.iter().enumerate() {
        for (other, s) in &got[i + 1..] {
            assert!(
                r.end <= s.start || s.end <= r.start,
                "{mode} mode: {who}'s {r:?} overlaps {other}'s {s:?}; repair said {report}; all: {got:?}"
            );
        }
    }
    let fork = "0190b6f2-7c1e-7a4b-9c3d-5e6f70819299";
    if mode == "tree" {
        // A fork's broken manifest in tree mode: the same advice through A, while B
        // holds a lease of the fork.
        ctl_json(a, &["fork", "bootstrap", fork, "--json"]);
        let mut fgot = vec![
            ("A", alloc(a, &["vid", "--fork", fork, "--count", "10"])),
            ("B", alloc(b, &["vid", "--fork", fork, "--count", "10"])),
        ];
        rt.block_on(async {
            store
                .store
                .put(
                    &object_store::path::Path::from(format!(
                        "catalog/forks/{fork}/id_allocator.json"
                    )),
                    object_store::PutPayload::from_static(b"{\"next_vid_ba"),
                )
                .await
                .unwrap()
        });
        let highest = fgot.iter().map(|(_, r)| r.end).max().unwrap();
        let out = ctl(
            a,
            &[
                "repair",
                "--fork",
                fork,
                "--vid-floor",
                &highest.to_string(),
                "--eid-floor",
                "0",
            ],
        );
        assert!(
            out.status.success(),
            "fork repair: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for _ in 0..4 {
            fgot.push(("A", alloc(a, &["vid", "--fork", fork, "--count", "500"])));
            fgot.push(("B", alloc(b, &["vid", "--fork", fork, "--count", "100"])));
        }
        // Tree mode: unique across the whole tree.
        got.extend(fgot);
        for (i, (who, r)) in got.iter().enumerate() {
            for (other, s) in &got[i + 1..] {
                assert!(
                    r.end <= s.start || s.end <= r.start,
                    "tree mode: {who}'s {r:?} overlaps {other}'s {s:?}; all: {got:?}"
                );
            }
        }
    }
    drop(daemons);
}
