//! Property test: random sequences of reserve / bootstrap / drop / merge /
//! checkpoint / restart / crash / data-dir wipe / reboot, on `InMemory` and
//! `LocalFileSystem`. Checked after every step: no id in two reservations per
//! namespace and kind, one daemon's reservations increasing, forks at or above
//! their floor, a namespace that a fork was merged into granting above every id
//! of that fork, and each error the one the model expects (a merge on the shared
//! `InMemory` root is refused in namespace mode). `PROPTEST_CASES` runs more cases.

use crate::common;

use std::collections::{HashMap, HashSet};

use common::*;
use idalloc::engine::{Engine, StoreHandle};
use idalloc_client::protocol::{IdRange, MergeInto};
use idalloc_client::{ForkId, Kind, Namespace, ServiceError};
use proptest::prelude::*;
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Step {
    Reserve {
        ns: usize,
        kind: Kind,
        count: u64,
    },
    Bootstrap {
        fork: usize,
        parent: usize,
        vid_floor: u64,
        eid_floor: u64,
    },
    Drop {
        fork: usize,
    },
    Merge {
        fork: usize,
    },
    Checkpoint {
        ns: usize,
    },
    Restart,
    Crash,
    Wipe,
    Reboot,
}

fn step() -> impl Strategy<Value = Step> {
    let kind = prop_oneof![Just(Kind::Vid), Just(Kind::Eid)];
    prop_oneof![
        10 => (0..4usize, kind, 1..300u64).prop_map(|(ns, kind, count)| Step::Reserve { ns, kind, count }),
        3 => (1..4usize, 0..4usize, 0..3000u64, 0..3000u64).prop_map(|(fork, parent, vid_floor, eid_floor)| Step::Bootstrap { fork, parent, vid_floor, eid_floor }),
        1 => (1..4usize).prop_map(|fork| Step::Drop { fork }),
        2 => (1..4usize).prop_map(|fork| Step::Merge { fork }),
        1 => (0..4usize).prop_map(|ns| Step::Checkpoint { ns }),
        1 => Just(Step::Restart),
        1 => Just(Step::Crash),
        1 => Just(Step::Wipe),
        1 => Just(Step::Reboot),
    ]
}

#[derive(Default)]
struct Model {
    created: HashMap<usize, (u64, u64)>,
    dropped: HashSet<usize>,
    granted: HashMap<(usize, Kind), Vec<IdRange>>,
    parents: HashMap<usize, usize>,
    /// Merged forks, with the namespace they were merged into.
    merged: HashMap<usize, usize>,
    /// Per namespace and kind: nothing below this may be granted there any more
    /// (the end of the ids of forks merged into it).
    merged_floor: HashMap<(usize, Kind), u64>,
}

impl Model {
    fn max_end(&self, ns: usize, kind: Kind) -> u64 {
        self.granted
            .get(&(ns, kind))
            .and_then(|v| v.iter().map(|r| r.end).max())
            .unwrap_or(0)
    }

    fn retired(&self, ns: usize) -> bool {
        self.dropped.contains(&ns) || self.merged.contains_key(&ns)
    }
}

async fn run(steps: Vec<Step>, local_files: bool) -> Result<(), TestCaseError> {
    let env = Env::new();
    let handle = if local_files {
        StoreHandle::from_url(&format!("file://{}", env.data_dir("mirror").display()), &[]).unwrap()
    } else {
        memory_store().1
    };
    let forks: Vec<ForkId> = (0..4).map(|_| ForkId::generate()).collect();
    let ns_of = |i: usize| {
        if i == 0 {
            Namespace::Primary
        } else {
            Namespace::Fork(forks[i])
        }
    };
    let cfg = env.config("d", 500);
    let mut engine: Arc<Engine> = open(cfg.clone(), &handle).await.unwrap();
    let mut model = Model::default();
    let mut boots = 1;
    for s in steps {
        match s {
            Step::Reserve { ns, kind, count } => {
                let res = engine.reserve(ns_of(ns), kind, count).await;
                if ns != 0 && !model.created.contains_key(&ns) {
                    prop_assert!(matches!(res, Err(ServiceError::UnknownFork(_))), "{res:?}");
                } else if model.dropped.contains(&ns) {
                    prop_assert!(matches!(res, Err(ServiceError::DroppedFork(_))), "{res:?}");
                } else if model.merged.contains_key(&ns) {
                    prop_assert!(
                        matches!(res, Err(ServiceError::MergedFork { .. })),
                        "{res:?}"
                    );
                } else {
                    let r = res.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(r.len(), count);
                    let mf = model.merged_floor.get(&(ns, kind)).copied().unwrap_or(0);
                    prop_assert!(
                        r.start >= mf,
                        "{r:?} below {mf}, the end of a fork merged into it"
                    );
                    prop_assert!(
                        r.start >= model.max_end(ns, kind),
                        "{r:?} not after {}",
                        model.max_end(ns, kind)
                    );
                    if let Some((fv, fe)) = model.created.get(&ns) {
                        let floor = if kind == Kind::Vid { *fv } else { *fe };
                        prop_assert!(r.start >= floor, "{r:?} below the fork floor {floor}");
                    }
                    model.granted.entry((ns, kind)).or_default().push(r);
                }
            }
            Step::Bootstrap {
                fork,
                parent,
                vid_floor,
                eid_floor,
            } => {
                let parent_id = (parent != 0).then(|| forks[parent]);
                let res = engine
                    .bootstrap_fork(forks[fork], parent_id, vid_floor, eid_floor)
                    .await;
                if fork == parent {
                    prop_assert!(
                        matches!(res, Err(ServiceError::InvalidArgument(_))),
                        "{res:?}"
                    );
                } else if model.dropped.contains(&fork) {
                    prop_assert!(matches!(res, Err(ServiceError::DroppedFork(_))), "{res:?}");
                } else if model.merged.contains_key(&fork) {
                    prop_assert!(
                        matches!(res, Err(ServiceError::MergedFork { .. })),
                        "{res:?}"
                    );
                } else if let Some((fv, fe)) = model.created.get(&fork) {
                    let info = res.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(!info.created);
                    prop_assert_eq!((info.floor_vid, info.floor_eid), (*fv, *fe));
                } else if parent != 0 && !model.created.contains_key(&parent) {
                    prop_assert!(matches!(res, Err(ServiceError::UnknownFork(_))), "{res:?}");
                } else if model.dropped.contains(&parent) {
                    prop_assert!(matches!(res, Err(ServiceError::DroppedFork(_))), "{res:?}");
                } else if model.merged.contains_key(&parent) {
                    prop_assert!(
                        matches!(res, Err(ServiceError::MergedFork { .. })),
                        "{res:?}"
                    );
                } else {
                    let info = res.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(info.created);
                    model.parents.insert(fork, parent);
                    prop_assert!(info.floor_vid >= vid_floor.max(model.max_end(parent, Kind::Vid)));
                    prop_assert!(info.floor_eid >= eid_floor.max(model.max_end(parent, Kind::Eid)));
                    model.created.insert(fork, (info.floor_vid, info.floor_eid));
                }
            }
            Step::Merge { fork } => {
                let res = engine.merge_fork(forks[fork], MergeInto::Parent).await;
                let parent = model.parents.get(&fork).copied();
                let live_child = model
                    .parents
                    .iter()
                    .any(|(c, p)| *p == fork && *c != fork && !model.retired(*c));
                if !local_files {
                    // A shared root counting per namespace: refused, whatever the fork.
                    prop_assert!(res.is_err(), "{res:?}");
                } else if !model.created.contains_key(&fork) {
                    prop_assert!(matches!(res, Err(ServiceError::UnknownFork(_))), "{res:?}");
                } else if model.dropped.contains(&fork) {
                    prop_assert!(
                        matches!(res, Err(ServiceError::InvalidArgument(_))),
                        "{res:?}"
                    );
                } else if model.merged.contains_key(&fork) {
                    let r = res.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(!r.merged_now);
                } else if live_child || parent.is_some_and(|p| model.retired(p)) {
                    prop_assert!(
                        matches!(res, Err(ServiceError::InvalidArgument(_))),
                        "{res:?}"
                    );
                } else {
                    let r = res.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(r.merged_now);
                    let into = parent.unwrap_or(0);
                    for kind in [Kind::Vid, Kind::Eid] {
                        let end = model.max_end(fork, kind);
                        let f = model.merged_floor.entry((into, kind)).or_default();
                        *f = (*f).max(end);
                    }
                    model.merged.insert(fork, into);
                }
            }
            Step::Drop { fork } => {
                let res = engine.drop_fork(forks[fork]).await;
                if model.merged.contains_key(&fork) {
                    prop_assert!(
                        matches!(res, Err(ServiceError::InvalidArgument(_))),
                        "{res:?}"
                    );
                } else if model.created.contains_key(&fork) {
                    prop_assert!(res.is_ok(), "{res:?}");
                    model.dropped.insert(fork);
                } else {
                    prop_assert!(matches!(res, Err(ServiceError::UnknownFork(_))), "{res:?}");
                }
            }
            Step::Checkpoint { ns } => {
                let res = engine.checkpoint(ns_of(ns)).await;
                if ns != 0 && !model.created.contains_key(&ns) {
                    prop_assert!(matches!(res, Err(ServiceError::UnknownFork(_))), "{res:?}");
                } else {
                    let h = res.map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(h.next_vid >= model.max_end(ns, Kind::Vid));
                }
            }
            Step::Restart => {
                engine
                    .shutdown()
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                crash(engine).await;
                engine = open(cfg.clone(), &handle).await.unwrap();
            }
            Step::Crash => {
                crash(engine).await;
                engine = open(cfg.clone(), &handle).await.unwrap();
            }
            Step::Wipe => {
                crash(engine).await;
                std::fs::remove_dir_all(&cfg.data_dir).unwrap();
                engine = open(cfg.clone(), &handle).await.unwrap();
            }
            Step::Reboot => {
                crash(engine).await;
                boots += 1;
                env.set_boot_id(&format!("boot-{boots}"));
                engine = open(cfg.clone(), &handle).await.unwrap();
            }
        }
    }
    for ((ns, kind), ranges) in &model.granted {
        assert_disjoint(ranges, &format!("ns {ns} {kind}"));
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_on_in_memory(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(steps, false))?;
    }

    #[test]
    fn invariants_hold_on_local_files(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run(steps, true))?;
    }
}
