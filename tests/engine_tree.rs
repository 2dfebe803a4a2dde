//! Tree-unique fork ids and `fork merge`, attacked at the engine level.
//!
//! - A random search over a fork tree of depth 3 (primary, f1, f2 under f1, f3
//!   under f2, more forks made during the run) served by three engines on one
//!   multi-writer store, with concurrent reservations, clean restarts, crashes and
//!   lost data directories between them: one ledger across every namespace, no id
//!   in two ranges anywhere in the tree, every fork's ids above everything any
//!   namespace had granted before its bootstrap, the files readable by the
//!   reference allocator, whose takeover of the primary resumes above every fork.
//!   `IDALLOC_TREE_ROUNDS=N` runs it longer (default 40 rounds of 8 operations),
//!   `IDALLOC_TREE_SEED=S` another history. The same search runs on moto (S3)
//!   in `tree_ids_on_moto_*` when moto is installed (`.ci/run` installs it).
//! - Switching a root's mode: refused once it has forks, with the reason.
//! - `fork merge` in namespace mode on a `file://` root: the parent's next ids are
//!   above every id the fork granted, through a clean restart, a crash and a lost
//!   data directory; the fork's writers get `MergedFork`; a second merge changes
//!   nothing. Its refusals: a dropped fork, a target that is not an ancestor, live
//!   children, a shared root counting per namespace.

use crate::common;
use crate::s3_support;

use std::collections::HashMap;
use std::sync::Arc;

use common::{crash, open, Env};
use idalloc::engine::{Engine, EngineConfig, OpenError, StoreHandle};
use idalloc_client::protocol::{ForkIds, IdRange, MergeInto, WriterMode};
use idalloc_client::{ForkId, Kind, Namespace, ServiceError};
use object_store::memory::InMemory;
use object_store::{ObjectStore, ObjectStoreExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The reference allocator's view of a manifest.
#[derive(serde::Deserialize)]
struct Reference {
    next_vid_batch: u64,
    next_eid_batch: u64,
}

async fn reference(store: &Arc<dyn ObjectStore>, path: &str) -> Reference {
    let r = store
        .get(&object_store::path::Path::from(path))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_slice(&r.bytes().await.unwrap())
        .unwrap_or_else(|e| panic!("{path} is not a reference manifest: {e}"))
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cfg(env: &Env, data: &str, lease: u64, mode: ForkIds) -> EngineConfig {
    EngineConfig {
        fork_ids: mode,
        ..env.config(data, lease)
    }
}

/// Every acknowledged range, by namespace (None: primary) and kind.
#[derive(Default)]
struct Ledger {
    ranges: Vec<(Option<ForkId>, Kind, IdRange)>,
}

impl Ledger {
    fn max_end(&self, kind: Kind, ns: Option<Option<ForkId>>) -> u64 {
        self.ranges
            .iter()
            .filter(|(n, k, _)| *k == kind && ns.is_none_or(|want| *n == want))
            .map(|(_, _, r)| r.end)
            .max()
            .unwrap_or(0)
    }

    /// No id in two ranges, across every namespace of the tree.
    fn check_tree_disjoint(&self, when: &str) {
        for kind in Kind::ALL {
            let mut v: Vec<(IdRange, Option<ForkId>)> = self
                .ranges
                .iter()
                .filter(|(_, k, _)| *k == kind)
                .map(|(n, _, r)| (*r, *n))
                .collect();
            v.sort_by_key(|(r, _)| (r.start, r.end));
            for w in v.windows(2) {
                assert!(
                    w[0].0.end <= w[1].0.start,
                    "{when}: {kind} {:?} in {:?} overlaps {:?} in {:?}",
                    w[0].0,
                    w[0].1,
                    w[1].0,
                    w[1].1
                );
            }
        }
    }
}

struct Tree {
    env: Env,
    store: Arc<dyn ObjectStore>,
    handle: StoreHandle,
    engines: Vec<Option<Arc<Engine>>>,
    lives: Vec<u32>,
    /// Forks with their parent and the floor (per kind) every id must respect:
    /// everything any namespace had granted when their bootstrap started.
    forks: Vec<(ForkId, Option<ForkId>, [u64; 2])>,
    ledger: Ledger,
    lease: u64,
}

impl Tree {
    fn data(&self, e: usize) -> String {
        format!("data-{e}-{}", self.lives[e])
    }

    async fn start(&mut self, e: usize) {
        // Every reservation must succeed here, so the store gets a real time-out
        // (moto on a loaded machine can take over the tests' usual 500 ms).
        let c = EngineConfig {
            store_timeout: std::time::Duration::from_secs(5),
            store_retries: 3,
            ..cfg(&self.env, &self.data(e), self.lease, ForkIds::Tree)
        };
        self.engines[e] = Some(open(c, &self.handle).await.expect("engine opens"));
    }

    fn engine(&self, e: usize) -> Arc<Engine> {
        self.engines[e].clone().unwrap()
    }

    fn record(&mut self, ns: Option<ForkId>, kind: Kind, r: IdRange) {
        if let Some(f) = ns {
            let floor = self.forks.iter().find(|x| x.0 == f).unwrap().2;
            assert!(
                r.start >= floor[kind.index()],
                "fork floor: {kind} {r:?} in fork {f} is below {}, what the tree had granted before it was bootstrapped",
                floor[kind.index()]
            );
        }
        self.ledger.ranges.push((ns, kind, r));
    }
}

/// The search: `rounds` rounds, each 8 concurrent operations and then maybe a
/// restart, crash or lost data directory of one engine.
async fn tree_search(store: Arc<dyn ObjectStore>, handle: StoreHandle, seed: u64, rounds: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = Tree {
        env: Env::new(),
        store,
        handle,
        engines: vec![None, None, None],
        lives: vec![0; 3],
        forks: Vec::new(),
        ledger: Ledger::default(),
        lease: 20,
    };
    for e in 0..3 {
        t.start(e).await;
    }
    // The tree of depth 3, each fork made through another engine.
    let mut parent: Option<ForkId> = None;
    for depth in 0..3 {
        let f = ForkId::generate();
        let floor = [
            t.ledger.max_end(Kind::Vid, None),
            t.ledger.max_end(Kind::Eid, None),
        ];
        let info = t
            .engine(depth)
            .bootstrap_fork(f, parent, 0, 0)
            .await
            .unwrap();
        assert!(info.created);
        t.forks.push((f, parent, floor));
        let r = t
            .engine(depth)
            .reserve(Namespace::Fork(f), Kind::Vid, 5)
            .await
            .unwrap();
        t.record(Some(f), Kind::Vid, r);
        let r = t
            .engine((depth + 1) % 3)
            .reserve(Namespace::Primary, Kind::Vid, 7)
            .await
            .unwrap();
        t.record(None, Kind::Vid, r);
        parent = Some(f);
    }
    for round in 0..rounds {
        let mut ops = Vec::new();
        for _ in 0..8 {
            let e = rng.gen_range(0..3);
            let ns = if rng.gen_bool(0.3) {
                None
            } else {
                Some(t.forks[rng.gen_range(0..t.forks.len())].0)
            };
            let kind = if rng.gen_bool(0.6) {
                Kind::Vid
            } else {
                Kind::Eid
            };
            let count = rng.gen_range(1..=30);
            ops.push((t.engine(e), ns, kind, count));
        }
        let results =
            futures::future::join_all(ops.into_iter().map(|(eng, ns, kind, count)| async move {
                let n = ns.map_or(Namespace::Primary, Namespace::Fork);
                (ns, kind, eng.reserve(n, kind, count).await)
            }))
            .await;
        for (ns, kind, r) in results {
            match r {
                Ok(r) => t.record(ns, kind, r),
                Err(e) => panic!("round {round}: a reservation failed: {e}"),
            }
        }
        t.ledger.check_tree_disjoint(&format!("round {round}"));
        match rng.gen_range(0..10) {
            0 if t.forks.len() < 8 => {
                // A new fork under any namespace, through any engine.
                let e = rng.gen_range(0..3);
                let parent = if rng.gen_bool(0.3) {
                    None
                } else {
                    Some(t.forks[rng.gen_range(0..t.forks.len())].0)
                };
                let f = ForkId::generate();
                let floor = [
                    t.ledger.max_end(Kind::Vid, None),
                    t.ledger.max_end(Kind::Eid, None),
                ];
                t.engine(e).bootstrap_fork(f, parent, 0, 0).await.unwrap();
                t.forks.push((f, parent, floor));
            }
            1 => {
                let e = rng.gen_range(0..3);
                t.engine(e).shutdown().await.unwrap();
                crash(t.engines[e].take().unwrap()).await;
                t.start(e).await;
            }
            2 => {
                let e = rng.gen_range(0..3);
                crash(t.engines[e].take().unwrap()).await;
                t.start(e).await;
            }
            3 => {
                // The data directory is lost: a new one.
                let e = rng.gen_range(0..3);
                crash(t.engines[e].take().unwrap()).await;
                t.lives[e] += 1;
                t.start(e).await;
            }
            4 => {
                let e = rng.gen_range(0..3);
                let ns = t.forks[rng.gen_range(0..t.forks.len())].0;
                t.engine(e).checkpoint(Namespace::Fork(ns)).await.unwrap();
                t.engine(e).checkpoint(Namespace::Primary).await.unwrap();
            }
            _ => {}
        }
    }
    for e in 0..3 {
        t.engine(e).shutdown().await.unwrap();
        crash(t.engines[e].take().unwrap()).await;
    }
    // The files, as the reference allocator reads them.
    let primary = reference(&t.store, "id_allocator.json").await;
    for kind in Kind::ALL {
        let all = t.ledger.max_end(kind, None);
        let ceiling = match kind {
            Kind::Vid => primary.next_vid_batch,
            Kind::Eid => primary.next_eid_batch,
        };
        assert!(
            ceiling >= all,
            "a reference allocator taking over the primary would start {kind} at {ceiling}, below {all}, an id some namespace granted"
        );
    }
    for (f, _, _) in &t.forks {
        let m = reference(
            &t.store,
            &format!("catalog/forks/{}/id_allocator.json", f.text()),
        )
        .await;
        assert!(m.next_vid_batch >= t.ledger.max_end(Kind::Vid, Some(Some(*f))));
        assert!(m.next_eid_batch >= t.ledger.max_end(Kind::Eid, Some(Some(*f))));
    }
    // A takeover of the primary by the reference allocator: it continues at the
    // primary's ceiling, above every fork.
    let taken_over = IdRange {
        start: primary.next_vid_batch,
        end: primary.next_vid_batch + 1000,
    };
    t.ledger.ranges.push((None, Kind::Vid, taken_over));
    t.ledger
        .check_tree_disjoint("after a reference takeover of the primary");
    let namespaces: std::collections::HashSet<_> = t.ledger.ranges.iter().map(|r| r.0).collect();
    assert!(namespaces.len() >= 4, "primary and three forks all served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_ids_are_unique_across_a_depth_3_tree_through_three_engines() {
    let rounds = env_u64("IDALLOC_TREE_ROUNDS", 40);
    let seed = env_u64("IDALLOC_TREE_SEED", 7);
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let handle = StoreHandle::custom(store.clone(), WriterMode::MultiWriter, "memory://tree");
    tree_search(store, handle, seed, rounds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tree_ids_on_moto_are_unique_across_a_depth_3_tree_through_three_engines() {
    let moto = s3_support::Moto::start();
    let handle = moto.store("tree");
    let store = handle.store.clone();
    let rounds = env_u64("IDALLOC_TREE_ROUNDS", 40) / 2;
    tree_search(
        store,
        handle,
        env_u64("IDALLOC_TREE_SEED", 11),
        rounds.max(5),
    )
    .await;
}

#[tokio::test]
async fn the_mode_of_a_root_with_forks_cannot_be_switched() {
    let env = Env::new();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let h = StoreHandle::custom(store.clone(), WriterMode::MultiWriter, "memory://modes");
    // A root with no forks switches freely (the primary is the same in both).
    let e = open(cfg(&env, "a", 100, ForkIds::Namespace), &h)
        .await
        .unwrap();
    e.reserve(Namespace::Primary, Kind::Vid, 5).await.unwrap();
    e.shutdown().await.unwrap();
    crash(e).await;
    let e = open(cfg(&env, "a", 100, ForkIds::Tree), &h).await.unwrap();
    let f = ForkId::generate();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    e.shutdown().await.unwrap();
    crash(e).await;
    // Now it has a fork counted in the tree: back to namespace is refused.
    let err = open(cfg(&env, "b", 100, ForkIds::Namespace), &h)
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(matches!(err, OpenError::InvalidConfig(_)), "{msg}");
    assert!(
        msg.contains("allocation.fork_ids = \"namespace\"")
            && msg.contains("already has forks")
            && msg.contains("without remapping"),
        "{msg}"
    );
    // A root of namespace-counted forks refuses tree mode, saying why.
    let store2: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let h2 = StoreHandle::custom(store2, WriterMode::MultiWriter, "memory://modes2");
    let e = open(cfg(&env, "c", 100, ForkIds::Namespace), &h2)
        .await
        .unwrap();
    e.bootstrap_fork(ForkId::generate(), None, 0, 0)
        .await
        .unwrap();
    e.shutdown().await.unwrap();
    crash(e).await;
    let msg = open(cfg(&env, "d", 100, ForkIds::Tree), &h2)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(msg.contains("overlap the primary's"), "{msg}");
    // And the daemon of the root's own mode still starts.
    let e = open(cfg(&env, "c", 100, ForkIds::Namespace), &h2)
        .await
        .unwrap();
    e.shutdown().await.unwrap();
}

fn file_root(env: &Env) -> StoreHandle {
    let url = format!("file://{}", env.data_dir("root").display());
    std::fs::create_dir_all(env.data_dir("root")).unwrap();
    StoreHandle::from_url(&url, &[]).unwrap()
}

/// After the merge, every id the primary grants is above every id the fork did.
async fn assert_primary_above(e: &Engine, fork_max: [u64; 2], when: &str) {
    for kind in Kind::ALL {
        let r = e.reserve(Namespace::Primary, kind, 3).await.unwrap();
        assert!(
            r.start >= fork_max[kind.index()],
            "{when}: the primary granted {kind} {r:?}, below {}, the end of the merged fork's ids",
            fork_max[kind.index()]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_merge_the_parent_grants_above_the_fork_through_restarts_and_a_lost_data_dir() {
    let env = Env::new();
    let h = file_root(&env);
    let c = |data: &str| cfg(&env, data, 100, ForkIds::Namespace);
    let e = open(c("d1"), &h).await.unwrap();
    assert_eq!(e.mode(), WriterMode::SingleWriter);
    e.reserve(Namespace::Primary, Kind::Vid, 10).await.unwrap();
    let f = ForkId::generate();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    // The fork runs far ahead of the primary (the collision merges suffer from).
    let mut fork_max = [0u64; 2];
    for _ in 0..40 {
        for kind in Kind::ALL {
            let r = e.reserve(Namespace::Fork(f), kind, 37).await.unwrap();
            fork_max[kind.index()] = fork_max[kind.index()].max(r.end);
        }
    }
    let before = e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert!(
        before.start < fork_max[0],
        "the primary is inside the fork's range before the merge"
    );
    let report = e.merge_fork(f, MergeInto::Parent).await.unwrap();
    assert!(report.merged_now);
    assert_eq!(report.into, "primary");
    assert!(report.fork_vid_end >= fork_max[0] && report.fork_eid_end >= fork_max[1]);
    assert!(report.into_vid_ceiling >= report.fork_vid_end, "{report:?}");
    assert!(
        report.summary.contains("above every id the fork granted"),
        "{}",
        report.summary
    );
    assert_primary_above(&e, fork_max, "just after the merge").await;
    // The fork's writers are told where to write.
    let err = e
        .reserve(Namespace::Fork(f), Kind::Vid, 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ServiceError::MergedFork { into, .. } if into == "primary"),
        "{err}"
    );
    assert!(
        err.to_string().contains("write to primary instead"),
        "{err}"
    );
    // Idempotent.
    let again = e.merge_fork(f, MergeInto::Primary).await.unwrap();
    assert!(!again.merged_now, "{again:?}");
    let listed = e.list_forks(None, 10).await;
    assert_eq!(listed.forks[0].merged_into.as_deref(), Some("primary"));
    // Clean restart.
    e.shutdown().await.unwrap();
    crash(e).await;
    let e = open(c("d1"), &h).await.unwrap();
    assert_primary_above(&e, fork_max, "after a clean restart").await;
    assert!(matches!(
        e.reserve(Namespace::Fork(f), Kind::Eid, 1).await,
        Err(ServiceError::MergedFork { .. })
    ));
    // Crash.
    crash(e).await;
    let e = open(c("d1"), &h).await.unwrap();
    assert_primary_above(&e, fork_max, "after a crash").await;
    crash(e).await;
    // The data directory is lost: only the root's files remain.
    std::fs::remove_dir_all(env.data_dir("d1")).unwrap();
    let e = open(c("d1"), &h).await.unwrap();
    assert_primary_above(&e, fork_max, "after losing the data directory").await;
    let err = e
        .reserve(Namespace::Fork(f), Kind::Vid, 1)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::MergedFork { .. }), "{err}");
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_past_the_parent_is_in_the_primarys_manifest_for_a_daemon_that_lost_its_data() {
    // The merged floor in the parent's manifest is what a daemon that lost its
    // counters (or never had them) reads: a second engine's view after a wipe.
    let env = Env::new();
    let h = file_root(&env);
    let e = open(cfg(&env, "d1", 50, ForkIds::Namespace), &h)
        .await
        .unwrap();
    let a = ForkId::generate();
    e.bootstrap_fork(a, None, 0, 0).await.unwrap();
    let b = ForkId::generate();
    e.bootstrap_fork(b, Some(a), 0, 0).await.unwrap();
    let mut b_max = 0;
    for _ in 0..20 {
        b_max = b_max.max(
            e.reserve(Namespace::Fork(b), Kind::Vid, 40)
                .await
                .unwrap()
                .end,
        );
    }
    // Merge the grandchild into the primary, past its parent.
    let r = e.merge_fork(b, MergeInto::Primary).await.unwrap();
    assert_eq!(r.into, "primary");
    let root = env.data_dir("root").join("id_allocator.json");
    let text = std::fs::read_to_string(&root).unwrap();
    assert!(text.contains("idalloc_merged_floor"), "{text}");
    let reference: Reference = serde_json::from_str(&text).unwrap();
    assert!(
        reference.next_vid_batch >= b_max,
        "a reference takeover continues above the merged fork"
    );
    crash(e).await;
    std::fs::remove_dir_all(env.data_dir("d1")).unwrap();
    let e = open(cfg(&env, "d1", 50, ForkIds::Namespace), &h)
        .await
        .unwrap();
    assert_primary_above(&e, [b_max, 0], "after losing the data directory").await;
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_that_would_lose_ids_are_refused_with_the_reason() {
    let env = Env::new();
    let h = file_root(&env);
    let e = open(cfg(&env, "d1", 100, ForkIds::Namespace), &h)
        .await
        .unwrap();
    let a = ForkId::generate();
    let b = ForkId::generate();
    let c = ForkId::generate();
    let other = ForkId::generate();
    e.bootstrap_fork(a, None, 0, 0).await.unwrap();
    e.bootstrap_fork(b, Some(a), 0, 0).await.unwrap();
    e.bootstrap_fork(c, Some(b), 0, 0).await.unwrap();
    e.bootstrap_fork(other, None, 0, 0).await.unwrap();
    fn msg<T: std::fmt::Debug>(r: Result<T, ServiceError>) -> String {
        r.expect_err("refused").to_string()
    }
    // Live children first.
    let m = msg(e.merge_fork(b, MergeInto::Parent).await);
    assert!(
        m.contains("live child forks") && m.contains(&c.text()),
        "{m}"
    );
    // Not an ancestor.
    let m = msg(e.merge_fork(c, MergeInto::Fork(other.text())).await);
    assert!(
        m.contains("is not an ancestor") && m.contains(&b.text()),
        "{m}"
    );
    // A dropped fork has nothing to merge.
    e.drop_fork(other).await.unwrap();
    let m = msg(e.merge_fork(other, MergeInto::Parent).await);
    assert!(m.contains("was dropped, not merged"), "{m}");
    // Children first, then parents; a merged fork is not dropped afterwards.
    e.merge_fork(c, MergeInto::Fork(a.text())).await.unwrap();
    let m = msg(e.merge_fork(c, MergeInto::Parent).await);
    assert!(m.contains("already merged into"), "{m}");
    e.merge_fork(b, MergeInto::Parent).await.unwrap();
    let m = msg(e.drop_fork(b).await);
    assert!(m.contains("merged into"), "{m}");
    e.merge_fork(a, MergeInto::Parent).await.unwrap();
    e.shutdown().await.unwrap();

    // A shared root counting per namespace cannot fence other daemons' leases.
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let shared = StoreHandle::custom(store, WriterMode::MultiWriter, "memory://shared");
    let e = open(cfg(&env, "d2", 100, ForkIds::Namespace), &shared)
        .await
        .unwrap();
    let f = ForkId::generate();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    let m = msg(e.merge_fork(f, MergeInto::Parent).await);
    assert!(
        m.contains("multi-writer") && m.contains("fork_ids = \"tree\""),
        "{m}"
    );
    e.reserve(Namespace::Fork(f), Kind::Vid, 1)
        .await
        .expect("the fork still serves");
    e.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_tree_mode_a_merge_raises_nothing_and_concurrent_merges_agree() {
    let env = Env::new();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let h = StoreHandle::custom(store.clone(), WriterMode::MultiWriter, "memory://tm");
    let a = open(cfg(&env, "a", 50, ForkIds::Tree), &h).await.unwrap();
    let b = open(cfg(&env, "b", 50, ForkIds::Tree), &h).await.unwrap();
    let f = ForkId::generate();
    a.bootstrap_fork(f, None, 0, 0).await.unwrap();
    let mut granted: HashMap<bool, Vec<IdRange>> = HashMap::new();
    for i in 0..30 {
        let eng = if i % 2 == 0 { &a } else { &b };
        granted
            .entry(true)
            .or_default()
            .push(eng.reserve(Namespace::Fork(f), Kind::Vid, 9).await.unwrap());
        granted
            .entry(false)
            .or_default()
            .push(eng.reserve(Namespace::Primary, Kind::Vid, 9).await.unwrap());
    }
    let (ra, rb) = tokio::join!(
        a.merge_fork(f, MergeInto::Parent),
        b.merge_fork(f, MergeInto::Primary)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.merged_now as u8 + rb.merged_now as u8,
        1,
        "exactly one wrote the tombstone: {ra:?} {rb:?}"
    );
    assert_eq!(
        (ra.fork_vid_end, ra.into.as_str()),
        (rb.fork_vid_end, rb.into.as_str())
    );
    let now = if ra.merged_now { &ra } else { &rb };
    assert!(now.summary.contains("already disjoint"), "{}", now.summary);
    assert_eq!(now.fork_ids, ForkIds::Tree);
    // The fork's ids and the primary's never met.
    let mut all: Vec<IdRange> = granted.values().flatten().copied().collect();
    all.sort();
    for w in all.windows(2) {
        assert!(w[0].end <= w[1].start, "{:?} and {:?}", w[0], w[1]);
    }
    assert!(matches!(
        a.reserve(Namespace::Fork(f), Kind::Vid, 1).await,
        Err(ServiceError::MergedFork { .. })
    ));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_broken_mode_record_stops_fork_operations_only() {
    let env = Env::new();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let h = StoreHandle::custom(store.clone(), WriterMode::MultiWriter, "memory://broken");
    store
        .put(
            &object_store::path::Path::from("idalloc/fork-ids.json"),
            b"".to_vec().into(),
        )
        .await
        .unwrap();
    let e = open(cfg(&env, "a", 100, ForkIds::Tree), &h)
        .await
        .expect("one broken record does not stop the daemon");
    e.reserve(Namespace::Primary, Kind::Vid, 3)
        .await
        .expect("the primary keeps serving");
    let err = e
        .bootstrap_fork(ForkId::generate(), None, 0, 0)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ServiceError::BrokenManifest(_)), "{msg}");
    assert!(
        msg.contains("idalloc/fork-ids.json")
            && msg.contains("cannot be parsed")
            && !msg.contains('\n'),
        "{msg}"
    );
    e.shutdown().await.unwrap();
}

/// A daemon that was already running when another switched the (fork-less) root
/// serves no fork in its old mode: it checks the record before every fork lease.
#[tokio::test]
async fn a_running_daemon_of_the_old_mode_serves_no_fork_after_a_switch() {
    let env = Env::new();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let h = StoreHandle::custom(store, WriterMode::MultiWriter, "memory://switch");
    let n = open(cfg(&env, "n", 100, ForkIds::Namespace), &h)
        .await
        .unwrap();
    n.reserve(Namespace::Primary, Kind::Vid, 5).await.unwrap();
    let t = open(cfg(&env, "t", 100, ForkIds::Tree), &h).await.unwrap();
    let f = ForkId::generate();
    t.bootstrap_fork(f, None, 0, 0).await.unwrap();
    let r = t.reserve(Namespace::Fork(f), Kind::Vid, 5).await.unwrap();
    let err = n
        .reserve(Namespace::Fork(f), Kind::Vid, 5)
        .await
        .expect_err("a namespace lease on a tree root");
    assert!(err.to_string().contains("fork_ids = \"tree\""), "{err}");
    // The primary is the same in both modes and still serves, above the fork.
    let p = t.reserve(Namespace::Primary, Kind::Vid, 5).await.unwrap();
    assert!(p.start >= r.end, "{p:?} {r:?}");
    n.shutdown().await.unwrap();
    t.shutdown().await.unwrap();
}

/// Tree mode: repairing the primary (its manifest broken) never sets the tree's
/// sequence below a fork's lease, whatever floor the operator gives.
#[tokio::test]
async fn in_tree_mode_a_repair_of_the_primary_stays_above_the_forks() {
    let env = Env::new();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let h = StoreHandle::custom(store.clone(), WriterMode::MultiWriter, "memory://repair");
    let e = open(cfg(&env, "a", 1000, ForkIds::Tree), &h).await.unwrap();
    let f = ForkId::generate();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    let mut fork_end = 0;
    for _ in 0..5 {
        fork_end = e
            .reserve(Namespace::Fork(f), Kind::Vid, 900)
            .await
            .unwrap()
            .end;
    }
    store
        .put(
            &object_store::path::Path::from("id_allocator.json"),
            b"{".to_vec().into(),
        )
        .await
        .unwrap();
    let report = e
        .repair(Namespace::Primary, 1, 1)
        .await
        .expect("repair from a low floor");
    assert!(
        report.vid_ceiling >= fork_end,
        "{report:?} below the fork's {fork_end}"
    );
    let next = e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert!(next.start >= fork_end, "{next:?}");
    e.shutdown().await.unwrap();
}

/// A child merged into its parent whose merge stopped before raising the parent
/// (its tombstone written, nothing else): merging the parent into the primary
/// still lifts the primary above the child's ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merging_a_parent_covers_a_child_whose_merge_into_it_stopped_half_way() {
    let env = Env::new();
    let h = file_root(&env);
    let e = open(cfg(&env, "d", 100, ForkIds::Namespace), &h)
        .await
        .unwrap();
    let a = ForkId::generate();
    let c = ForkId::generate();
    e.bootstrap_fork(a, None, 0, 0).await.unwrap();
    e.bootstrap_fork(c, Some(a), 0, 0).await.unwrap();
    let mut c_end = 0;
    for _ in 0..20 {
        c_end = e
            .reserve(Namespace::Fork(c), Kind::Vid, 90)
            .await
            .unwrap()
            .end;
    }
    e.shutdown().await.unwrap();
    crash(e).await;
    // The child's tombstone as a merge that stopped after step 1 leaves it.
    let path = env
        .data_dir("root")
        .join(format!("catalog/forks/{}/id_allocator.json", c.text()));
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    m["idalloc"]["merged_into"] = serde_json::Value::from(a.text());
    std::fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    let e = open(cfg(&env, "d", 100, ForkIds::Namespace), &h)
        .await
        .unwrap();
    let r = e.merge_fork(a, MergeInto::Parent).await.unwrap();
    assert!(r.fork_vid_end >= c_end, "{r:?} below the child's {c_end}");
    assert_primary_above(&e, [c_end, 0], "after merging the parent").await;
    e.shutdown().await.unwrap();
}

/// A switch that stopped half way (the record written unsettled) holds every
/// fork operation of the root until a daemon finishes or undoes it; with forks
/// made meanwhile, whose mode cannot be told, it is refused with the way out.
#[tokio::test]
async fn an_unfinished_switch_is_finished_on_an_empty_root_and_refused_with_forks() {
    let env = Env::new();
    let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let h = StoreHandle::custom(store.clone(), WriterMode::MultiWriter, "memory://half");
    let record = object_store::path::Path::from("idalloc/fork-ids.json");
    let unsettled = br#"{"fork_ids": "tree", "settled": false}"#.to_vec();
    store.put(&record, unsettled.clone().into()).await.unwrap();
    let e = open(cfg(&env, "a", 100, ForkIds::Tree), &h).await.unwrap();
    let f = ForkId::generate();
    e.bootstrap_fork(f, None, 0, 0)
        .await
        .expect("the switch was finished");
    let text = store.get(&record).await.unwrap().bytes().await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(v["settled"], true, "{v}");
    e.shutdown().await.unwrap();
    crash(e).await;
    // The same half-done record on a root that has a fork now.
    store.put(&record, unsettled.into()).await.unwrap();
    let msg = open(cfg(&env, "b", 100, ForkIds::Tree), &h)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        msg.contains("unfinished switch") && msg.contains("whose mode cannot be told"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------
// The edges of the id space, and what a repair or a retried merge must keep.
// ---------------------------------------------------------------------------------

async fn put_raw(store: &Arc<dyn ObjectStore>, path: &str, bytes: &'static [u8]) {
    store
        .put(
            &object_store::path::Path::from(path),
            object_store::PutPayload::from_static(bytes),
        )
        .await
        .unwrap();
}

/// Tree mode near `u64::MAX`: a primary lease taken close to the top takes half
/// of what is left, not all of it, so a fork made afterwards still reserves (its
/// tree lease used to answer "exhausted" even for one id, since `start + size`
/// overflowed), and the primary keeps reserving too.
#[tokio::test]
async fn near_the_top_of_u64_a_lease_leaves_ids_for_the_rest_of_the_tree() {
    let env = Env::new();
    let (store, h) = common::memory_store();
    let top = format!(
        "{{\"next_vid_batch\": {}, \"next_eid_batch\": 0}}",
        u64::MAX - 1000
    );
    put_raw(
        &store,
        "id_allocator.json",
        Box::leak(top.into_bytes().into_boxed_slice()),
    )
    .await;
    let e = open(cfg(&env, "d", 1_000_000, ForkIds::Tree), &h)
        .await
        .unwrap();
    let p = e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert_eq!(p.start, u64::MAX - 1000);
    let f = ForkId::parse("0190b6f2-7c1e-7a4b-9c3d-5e6f70819203").unwrap();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    let r = e
        .reserve(Namespace::Fork(f), Kind::Vid, 1)
        .await
        .unwrap_or_else(|err| panic!("a fork near the top got no id: {err}"));
    assert!(r.start > p.start, "{r:?} after {p:?}");
    let again = e.reserve(Namespace::Primary, Kind::Vid, 100).await.unwrap();
    common::assert_disjoint(&[p, r, again], "tree near the top");
    // What does not fit is refused, not clamped.
    let err = e
        .reserve(Namespace::Primary, Kind::Vid, 1000)
        .await
        .unwrap_err();
    assert!(matches!(err, ServiceError::Exhausted(_)), "{err}");
}

/// A fork retired on one daemon and broken in the store stays retired when a
/// daemon that knows it only from the store repairs it: dropped in namespace
/// mode, merged in tree mode (the repair used to rebuild its metadata empty,
/// bringing it back live).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_keeps_a_dropped_or_merged_fork_retired() {
    for mode in [ForkIds::Namespace, ForkIds::Tree] {
        let env = Env::new();
        let (store, h) = common::memory_store();
        let a = open(cfg(&env, "a", 100, mode), &h).await.unwrap();
        let f = ForkId::parse("01J2VF4Z0Y8Q3R5S7T9V1W3X5Z").unwrap();
        a.bootstrap_fork(f, None, 0, 0).await.unwrap();
        a.reserve(Namespace::Fork(f), Kind::Vid, 10).await.unwrap();
        match mode {
            ForkIds::Namespace => {
                a.drop_fork(f).await.unwrap();
            }
            ForkIds::Tree => {
                a.merge_fork(f, MergeInto::Parent).await.unwrap();
            }
        }
        put_raw(
            &store,
            &format!("catalog/forks/{}/id_allocator.json", f.text()),
            b"{\"next_vid_ba",
        )
        .await;
        let b = open(cfg(&env, "b", 100, mode), &h).await.unwrap();
        let report = b.repair(Namespace::Fork(f), 10, 0).await.unwrap();
        let err = b
            .reserve(Namespace::Fork(f), Kind::Vid, 1)
            .await
            .expect_err("a retired fork came back live through a repair");
        assert!(
            matches!(
                (&mode, &err),
                (ForkIds::Namespace, ServiceError::DroppedFork(_))
                    | (ForkIds::Tree, ServiceError::MergedFork { .. })
            ),
            "{mode:?}: {err}; repair: {report:?}"
        );
        crash(b).await;
        crash(a).await;
    }
}

/// A merge whose reply was lost and that the client retried (one request id)
/// is told `merged_now: true` on every attempt; another call is told `false`.
#[tokio::test]
async fn every_attempt_of_the_merge_that_merged_says_so() {
    let env = Env::new();
    let (_store, h) = common::memory_store();
    let e = open(cfg(&env, "d", 100, ForkIds::Tree), &h).await.unwrap();
    let f = ForkId::parse("0190b6f2-7c1e-7a4b-9c3d-5e6f70819203").unwrap();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    e.reserve(Namespace::Fork(f), Kind::Vid, 5).await.unwrap();
    let first = e.merge_fork_request(f, MergeInto::Parent, 7).await.unwrap();
    let retry = e.merge_fork_request(f, MergeInto::Parent, 7).await.unwrap();
    assert!(
        first.merged_now && retry.merged_now,
        "{first:?} / {retry:?}"
    );
    let other = e.merge_fork_request(f, MergeInto::Parent, 8).await.unwrap();
    assert!(!other.merged_now, "{other:?}");
    // Through a restart too: the tombstone says which request wrote it.
    e.shutdown().await.unwrap();
    crash(e).await;
    let e = open(cfg(&env, "d", 100, ForkIds::Tree), &h).await.unwrap();
    let retry = e.merge_fork_request(f, MergeInto::Parent, 7).await.unwrap();
    assert!(retry.merged_now, "{retry:?}");
}
