//! Attacks on giving ids back (rule 9), fork claims and power cuts: each test
//! is one interleaving that the contract (DESIGN.md) forbids to go wrong, named
//! after what it tries. Engine-level, `InMemory` (multi-writer) stores.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use crate::faults::{Fault, Op};
use common::*;
use idalloc::engine::FloorAuthority;
use idalloc_client::protocol::IdRange;
use idalloc_client::{ForkId, IdForm, Kind, Namespace, ServiceError};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

async fn put(store: &Arc<dyn ObjectStore>, path: &str, body: Vec<u8>) {
    store
        .put(&ObjPath::from(path), PutPayload::from(body))
        .await
        .unwrap();
}

async fn get(store: &Arc<dyn ObjectStore>, path: &str) -> Vec<u8> {
    let r = store.get(&ObjPath::from(path)).await.unwrap();
    r.bytes().await.unwrap().to_vec()
}

fn manifest_path(f: ForkId) -> String {
    format!("catalog/forks/{}/id_allocator.json", f.text())
}

fn claim_path(f: ForkId) -> String {
    format!(
        "idalloc/fork-claims/{}.json",
        f.with_form(IdForm::Uuid).text()
    )
}

fn ulid_of(f: ForkId) -> ForkId {
    ForkId::parse(&f.with_form(IdForm::Ulid).text()).unwrap()
}

/// Power cut after an unclean life, then a clean stop *before* the stale fork was
/// verified: `shutdown` gives back from the stale `granted` (rule 9 checks only
/// "ceiling == my owned end"), lowering the ceiling below ids granted in the
/// life the cut erased; the mark is then removed and the next life trusts sled.
#[tokio::test]
async fn a_clean_stop_before_a_stale_fork_is_verified_gives_back_granted_ids() {
    let env = Env::new();
    let (_store, h) = memory_store();
    let cfg = env.config("d", 1000);
    let f = ForkId::generate();
    let e = open(cfg.clone(), &h).await.unwrap();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    let mut got = vec![e.reserve(Namespace::Fork(f), Kind::Vid, 10).await.unwrap()];
    crash(e).await;
    // What sled once had on disk: a power cut can bring this back.
    let snapshot = env.data_dir("snapshot");
    copy_dir(&cfg.data_dir.join("sled"), &snapshot);
    // Same boot: trusted, grants go on inside the same lease.
    let e = open(cfg.clone(), &h).await.unwrap();
    got.push(e.reserve(Namespace::Fork(f), Kind::Vid, 50).await.unwrap());
    crash(e).await;
    // The cut: sled rolls back, the mark (of boot-1) stays, a new boot id.
    copy_dir(&snapshot, &cfg.data_dir.join("sled"));
    env.set_boot_id("boot-2");
    // Untrusted start; the operator stops the daemon before the background
    // verification reached the fork (or it failed on a store hiccup).
    let e = open(cfg.clone(), &h).await.unwrap();
    e.shutdown().await.unwrap();
    crash(e).await;
    let e = open(cfg, &h).await.unwrap();
    let top = got.iter().map(|r| r.end).max().unwrap();
    let hwm = e.hwm(Namespace::Fork(f)).await.unwrap();
    got.push(e.reserve(Namespace::Fork(f), Kind::Vid, 5).await.unwrap());
    let named: Vec<(&str, IdRange)> = got.iter().map(|r| ("life", *r)).collect();
    crate::common::assert_disjoint_named(&named, "fork vid after cut + clean stop");
    assert!(
        hwm.next_vid >= top,
        "hwm {} below the {top} granted before the cut",
        hwm.next_vid
    );
}

/// A fork with manifests under both spellings (made before claims). B reaches it
/// by one spelling and creates the claim naming it; A adopts it from the listing
/// under the other. `evidence` compares `claim == alt` with `ForkId`'s value
/// equality, which is always true: each daemon writes the spelling it did NOT
/// start with, so A and B lease on two different manifests of one fork.
#[tokio::test]
async fn two_daemons_settle_a_two_spelling_fork_on_two_spellings() {
    let env = Env::new();
    let (store, h) = memory_store();
    let u = ForkId::generate();
    let l = ulid_of(u);
    // The order in which `list_fork_dirs` returns them (sorted text).
    let (first, second) = if u.text() < l.text() { (u, l) } else { (l, u) };
    // B is up before the legacy manifests appear (so it does not adopt at open).
    let b = open(env.config("b", 10), &h).await.unwrap();
    let m = |v: u64| format!("{{\"next_vid_batch\": {v}, \"next_eid_batch\": 0}}").into_bytes();
    put(&store, &manifest_path(first), m(100)).await;
    put(&store, &manifest_path(second), m(50)).await;
    let mut got: Vec<(&str, IdRange)> = Vec::new();
    got.push((
        "B",
        b.reserve(Namespace::Fork(second), Kind::Vid, 1)
            .await
            .unwrap(),
    ));
    // A: fresh data directory, adopts every fork in the listing.
    let a = open(env.config("a", 10), &h).await.unwrap();
    for _ in 0..8 {
        got.push((
            "A",
            a.reserve(Namespace::Fork(first), Kind::Vid, 4)
                .await
                .unwrap(),
        ));
        got.push((
            "B",
            b.reserve(Namespace::Fork(second), Kind::Vid, 4)
                .await
                .unwrap(),
        ));
    }
    let sa = a.hwm(Namespace::Fork(first)).await.unwrap().fork;
    let sb = b.hwm(Namespace::Fork(second)).await.unwrap().fork;
    let claim: serde_json::Value =
        serde_json::from_slice(&get(&store, &claim_path(u)).await).unwrap();
    crate::common::assert_disjoint_named(
        &got,
        &format!(
            "fork vid (A writes {sa:?}, B writes {sb:?}, the claim names {})",
            claim["fork"]
        ),
    );
    assert_eq!(sa, sb, "two daemons settled on two spellings");
    assert_eq!(
        Some(claim["fork"].as_str().unwrap()),
        sa.as_deref(),
        "the spelling written is not the one the claim names"
    );
}

/// The legacy two-creator state (one fork, one manifest per spelling, each
/// daemon holding a lease in its own): after the upgrade both restart in the
/// same boot (trusted), settle on one spelling, and keep granting from their
/// old local leases, which overlap. Verification raises the manifest above both
/// but moves neither daemon's counters in multi-writer mode.
#[tokio::test]
async fn legacy_two_spelling_fork_with_live_leases_keeps_overlapping_after_upgrade() {
    let env = Env::new();
    let (shared, h) = memory_store();
    // B's legacy creation is re-enacted on a store of its own: the fix would not
    // let it create a second manifest on the shared one.
    let (other, h2) = memory_store();
    let u = ForkId::generate();
    let l = ulid_of(u);
    let a = open(env.config("a", 100), &h).await.unwrap();
    let b = open(env.config("b", 100), &h2).await.unwrap();
    a.bootstrap_fork(u, None, 0, 0).await.unwrap();
    b.bootstrap_fork(l, None, 0, 0).await.unwrap();
    let pre = [
        a.reserve(Namespace::Fork(u), Kind::Vid, 3).await.unwrap(),
        b.reserve(Namespace::Fork(l), Kind::Vid, 3).await.unwrap(),
    ];
    crash(a).await;
    crash(b).await;
    put(
        &shared,
        &manifest_path(l),
        get(&other, &manifest_path(l)).await,
    )
    .await;
    // The upgrade: both restart on the shared root, same boot.
    let a = open(env.config("a", 100), &h).await.unwrap();
    let b = open(env.config("b", 100), &h).await.unwrap();
    let mut got: Vec<(&str, IdRange)> = Vec::new();
    for _ in 0..4 {
        got.push((
            "A after",
            a.reserve(Namespace::Fork(u), Kind::Vid, 2).await.unwrap(),
        ));
        got.push((
            "B after",
            b.reserve(Namespace::Fork(l), Kind::Vid, 2).await.unwrap(),
        ));
    }
    for r in &got {
        for p in &pre {
            assert!(
                r.1.end <= p.start || r.1.start >= p.end,
                "{} got {:?}, inside {p:?} granted before the upgrade",
                r.0,
                r.1
            );
        }
    }
    crate::common::assert_disjoint_named(&got, "fork vid after the upgrade");
}

/// A fork created under its ULID spelling; its claim is later damaged. Daemon B,
/// which never saw the fork, is asked for it by its UUID spelling, answers with
/// the advice `repair --fork <uuid>`, and the operator follows it. The repair
/// writes a second manifest under the UUID spelling (and rewrites the claim to
/// name it) while A, verified long ago, keeps leasing on the ULID manifest.
#[tokio::test]
async fn repair_by_the_other_spelling_of_a_broken_claim_splits_the_fork() {
    let env = Env::new();
    let (store, h) = memory_store();
    let a = open(env.config("a", 10), &h).await.unwrap();
    let b = open(env.config("b", 10), &h).await.unwrap();
    let u = ForkId::generate();
    let l = ulid_of(u);
    a.bootstrap_fork(l, None, 0, 0).await.unwrap();
    let mut got: Vec<(&str, IdRange)> = vec![(
        "A",
        a.reserve(Namespace::Fork(l), Kind::Vid, 4).await.unwrap(),
    )];
    put(&store, &claim_path(u), b"{".to_vec()).await;
    match b.reserve(Namespace::Fork(u), Kind::Vid, 1).await {
        Err(ServiceError::BrokenManifest(m)) => assert!(
            m.contains(&format!("repair --fork {}", u.text())),
            "the advice names another spelling: {m}"
        ),
        other => panic!("expected the broken claim: {other:?}"),
    }
    // The operator: the highest id the database holds is below 4.
    b.repair(Namespace::Fork(u), 4, 0).await.unwrap();
    for _ in 0..6 {
        got.push((
            "A",
            a.reserve(Namespace::Fork(l), Kind::Vid, 4).await.unwrap(),
        ));
        got.push((
            "B",
            b.reserve(Namespace::Fork(u), Kind::Vid, 4).await.unwrap(),
        ));
    }
    crate::common::assert_disjoint_named(&got, "fork vid after a repair by the other spelling");
}

/// One fork's damaged claim stops `discover_forks` at that fork (`?` in the
/// loop): the forks listed after it are never adopted, so `fork list` on a
/// daemon that did not create them shows none of them.
#[tokio::test]
async fn one_broken_claim_hides_the_other_forks_from_discovery() {
    let env = Env::new();
    let (store, h) = memory_store();
    let a = open(env.config("a", 10), &h).await.unwrap();
    let b = open(env.config("b", 10), &h).await.unwrap();
    let mut forks = [ForkId::generate(), ForkId::generate()];
    forks.sort_by_key(|f| f.text());
    let [broken, fine] = forks;
    a.bootstrap_fork(broken, None, 0, 0).await.unwrap();
    a.bootstrap_fork(fine, None, 0, 0).await.unwrap();
    put(&store, &claim_path(broken), b"not json".to_vec()).await;
    // What the `list_forks` RPC does: discover (its error only logged), then list.
    let discovered = b.discover_forks().await;
    let page = b.list_forks(None, 10).await;
    assert!(
        page.forks
            .iter()
            .any(|i| ForkId::parse(&i.fork).unwrap() == fine),
        "fork {fine} is missing from B's list because fork {broken}'s claim is broken: discover {discovered:?}, page {page:?}"
    );
}

/// The claim's create is won outright (its reply received), then the manifest's
/// create fails: the call errors. The caller's retry (same request id) completes
/// the claim and must be told `created: true` — before request ids it was told
/// `created: false`, and nobody was ever told the fork was created.
#[tokio::test]
async fn claim_won_then_manifest_write_failed_nobody_is_told_created() {
    let env = Env::new();
    let (_inner, ctl, h) = crate::common::faulty();
    let a = open(env.config("a", 10), &h).await.unwrap();
    let f = ForkId::generate();
    // The first put (the claim) goes through; the next two (the manifest and its
    // one retry) fail without touching the store.
    ctl.next(Op::Put, Fault::Stall(Duration::ZERO), 1);
    ctl.next(Op::Put, Fault::Fail, 2);
    // One request retried as the client library retries it: one request id.
    let request: u128 = 0x1d;
    let mut replies = vec![
        a.bootstrap_fork_request(f, None, 0, 0, request, FloorAuthority::Any)
            .await,
    ];
    ctl.clear();
    while !matches!(replies.last(), Some(Ok(_))) && replies.len() < 10 {
        match replies.last() {
            Some(Err(e)) if e.is_retryable() => {}
            other => panic!("unexpected reply {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        replies.push(
            a.bootstrap_fork_request(f, None, 0, 0, request, FloorAuthority::Any)
                .await,
        );
    }
    let created = replies
        .iter()
        .filter(|r| matches!(r, Ok(i) if i.created))
        .count();
    assert_eq!(
        created, 1,
        "one caller, retrying: {created} replies said created: true: {replies:?}"
    );
}

/// Regression (passes): reservations, checkpoints, prefetches, `hwm`, `status`
/// and `list` racing on two daemons of one root never hand an id out twice, and
/// a daemon's `hwm` is never below what it granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reserve_checkpoint_prefetch_and_reports_racing_on_two_daemons() {
    let env = Env::new();
    let (_store, h) = memory_store();
    let a = open(env.config("a", 16), &h).await.unwrap();
    let b = open(env.config("b", 16), &h).await.unwrap();
    let f = ForkId::generate();
    a.bootstrap_fork(f, None, 0, 0).await.unwrap();
    b.bootstrap_fork(ulid_of(f), None, 0, 0).await.unwrap();
    let mut tasks = Vec::new();
    for (name, e) in [("A", a.clone()), ("B", b.clone())] {
        for t in 0..3u64 {
            let e = e.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..60u64 {
                    let ns = if (i + t) % 2 == 0 {
                        Namespace::Primary
                    } else {
                        Namespace::Fork(f)
                    };
                    match e.reserve(ns, Kind::Vid, 1 + (i * 7 + t) % 9).await {
                        Ok(r) => {
                            let h = e.hwm(ns).await.unwrap();
                            assert!(h.next_vid >= r.end, "{name}: hwm {h:?} below {r:?}");
                            got.push((name, ns, r));
                        }
                        Err(ServiceError::Unavailable { .. }) => {}
                        Err(other) => panic!("{other:?}"),
                    }
                }
                got
            }));
        }
        let e = e.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let ns = if i % 2 == 0 {
                    Namespace::Primary
                } else {
                    Namespace::Fork(f)
                };
                let _ = e.checkpoint(ns).await;
                if i % 5 == 0 {
                    let _ = e.status().await;
                    let _ = e.list_forks(None, 10).await;
                }
                tokio::task::yield_now().await;
            }
            Vec::new()
        }));
    }
    let run = async {
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    };
    let all = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("no progress for 60 s: a deadlock");
    for ns in [Namespace::Primary, Namespace::Fork(f)] {
        let got: Vec<(&str, IdRange)> = all
            .iter()
            .filter(|(_, n, _)| *n == ns)
            .map(|(w, _, r)| (*w, *r))
            .collect();
        crate::common::assert_disjoint_named(&got, &format!("{ns:?} vid"));
    }
}
