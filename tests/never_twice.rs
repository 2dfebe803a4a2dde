//! Regression tests for the ways several daemons, power cuts and broken files once
//! handed ids out twice or rewound a counter, each named after its bug. The
//! exploring test (`tests/explore.rs`) searches for more; these pin what was found.

use crate::common;

use common::*;
use idalloc::engine::{OpenError, StoreHandle};
use idalloc_client::protocol::IdRange;
use idalloc_client::{ForkId, Kind, Namespace, ServiceError};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

async fn put(store: &std::sync::Arc<dyn ObjectStore>, path: &str, body: &'static [u8]) {
    store
        .put(&ObjPath::from(path), PutPayload::from_static(body))
        .await
        .unwrap();
}

/// Two daemons with two data directories on one `file://` root.
#[tokio::test]
async fn two_daemons_on_one_file_root_the_second_is_refused() {
    let env = Env::new();
    let root = env.data_dir("root");
    let url = format!("file://{}", root.display());
    let a = open(
        env.config("a", 10),
        &StoreHandle::from_url(&url, &[]).unwrap(),
    )
    .await
    .unwrap();
    a.reserve(Namespace::Primary, Kind::Vid, 3).await.unwrap();
    match open(
        env.config("b", 10),
        &StoreHandle::from_url(&url, &[]).unwrap(),
    )
    .await
    {
        Err(e @ OpenError::RootLocked { .. }) => {
            let m = e.to_string();
            assert!(m.contains(&root.display().to_string()), "{m}");
            assert!(m.contains(&format!("pid={}", std::process::id())), "{m}");
            assert!(!m.contains('\n'), "one line: {m}");
        }
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a second daemon opened the same file:// root"),
    }
    // Once the first is gone (its lock released with it), the root is free.
    a.shutdown().await.unwrap();
    crash(a).await;
    let b = open(
        env.config("b", 10),
        &StoreHandle::from_url(&url, &[]).unwrap(),
    )
    .await
    .unwrap();
    let r = b.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert!(r.start >= 3, "{r:?}");
}

/// The embedded default keeps both tiers on one disk; say so.
#[tokio::test]
async fn a_mirror_inside_the_data_directory_is_a_warning_in_status() {
    let env = Env::new();
    let cfg = env.config("d", 10);
    let url = format!("file://{}", cfg.data_dir.join("mirror").display());
    let e = open(cfg, &StoreHandle::from_url(&url, &[]).unwrap())
        .await
        .unwrap();
    let st = e.status().await;
    assert_eq!(st.warnings.len(), 1, "{:?}", st.warnings);
    assert!(
        st.warnings[0].contains("[object_store] url"),
        "{:?}",
        st.warnings
    );
    // A mirror elsewhere: no warning.
    let env2 = Env::new();
    let url = format!("file://{}", env2.data_dir("elsewhere").display());
    let e2 = open(
        env2.config("d", 10),
        &StoreHandle::from_url(&url, &[]).unwrap(),
    )
    .await
    .unwrap();
    assert!(e2.status().await.warnings.is_empty());
}

/// `hwm` must not be answered from unverified local state after the
/// reference allocator took the fork over and handed it back.
#[tokio::test]
async fn hwm_after_a_takeover_is_verified_not_local() {
    let env = Env::new();
    let root = env.data_dir("root");
    let url = format!("file://{}", root.display());
    let f = ForkId::parse("01J2VF4Z0Y8Q3R5S7T9V1W3X5Z").unwrap();
    let e = open(
        env.config("d", 10),
        &StoreHandle::from_url(&url, &[]).unwrap(),
    )
    .await
    .unwrap();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    e.reserve(Namespace::Fork(f), Kind::Vid, 5).await.unwrap();
    e.shutdown().await.unwrap();
    crash(e).await;
    // The reference allocator takes over and hands back at 1005.
    let manifest = root.join(format!("catalog/forks/{}/id_allocator.json", f.text()));
    std::fs::write(
        &manifest,
        br#"{"next_vid_batch": 1005, "next_eid_batch": 7}"#,
    )
    .unwrap();
    let e = open(
        env.config("d", 10),
        &StoreHandle::from_url(&url, &[]).unwrap(),
    )
    .await
    .unwrap();
    let h = e.hwm(Namespace::Fork(f)).await.unwrap();
    assert_eq!((h.next_vid, h.next_eid), (1005, 7));
    assert!(
        h.root_wide,
        "single-writer: this daemon's HWM is the root's"
    );
    let info = e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    assert!(!info.created && info.next_vid == 1005, "{info:?}");
    let r = e.reserve(Namespace::Fork(f), Kind::Vid, 1).await.unwrap();
    assert_eq!(r.start, 1005);
}

/// DESIGN rule 7: with the data directory lost, the gap is at most the current
/// lease plus the one prefetched ahead of it.
#[tokio::test]
async fn the_gap_after_a_lost_data_directory_is_at_most_two_leases() {
    for prefetch in [0.1, 0.5, 0.9] {
        let env = Env::new();
        let (_store, h) = memory_store();
        let mut cfg = env.config("d", 1000);
        cfg.prefetch_at = prefetch;
        let e = open(cfg.clone(), &h).await.unwrap();
        let mut last = 0;
        // Stop right after the prefetch point, so the prefetched lease is held too.
        for _ in 0..((1000.0 * prefetch) as u64 / 10 + 1) {
            last = e
                .reserve(Namespace::Primary, Kind::Vid, 10)
                .await
                .unwrap()
                .end;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(e.status().await.namespaces[0].counters[0].lease_end >= 2000);
        crash(e).await;
        std::fs::remove_dir_all(&cfg.data_dir).unwrap();
        let e = open(cfg, &h).await.unwrap();
        let r = e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
        assert!(r.start >= last);
        assert!(
            r.start - last <= 2 * 1000,
            "prefetch_at {prefetch}: gap {} is more than the current and the prefetched lease",
            r.start - last
        );
    }
}

/// A clean stop, then a power cut that brings sled back to the clean
/// snapshot while the next life had granted more. Multi-writer: no cross-check
/// could save it; only the durable unclean-life mark does.
#[tokio::test]
async fn a_clean_stop_then_a_power_cut_is_not_trusted() {
    let env = Env::new();
    let (_store, h) = memory_store();
    let cfg = env.config("d", 100);
    let f = ForkId::generate();
    let mut got: Vec<IdRange> = Vec::new();
    let mut fork_got: Vec<IdRange> = Vec::new();
    let e = open(cfg.clone(), &h).await.unwrap();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    got.push(e.reserve(Namespace::Primary, Kind::Vid, 10).await.unwrap());
    fork_got.push(e.reserve(Namespace::Fork(f), Kind::Vid, 10).await.unwrap());
    e.shutdown().await.unwrap();
    crash(e).await;
    // What sled fsynced at the clean stop: what a power cut can bring back.
    let snapshot = env.data_dir("snapshot");
    copy_dir(&cfg.data_dir.join("sled"), &snapshot);
    let e = open(cfg.clone(), &h).await.unwrap();
    for _ in 0..20 {
        got.push(e.reserve(Namespace::Primary, Kind::Vid, 37).await.unwrap());
        fork_got.push(e.reserve(Namespace::Fork(f), Kind::Vid, 29).await.unwrap());
    }
    crash(e).await;
    // The cut: sled rolls back; the mark file (fsynced) stays; the boot id changes.
    copy_dir(&snapshot, &cfg.data_dir.join("sled"));
    env.set_boot_id("boot-after-the-cut");
    let e = open(cfg.clone(), &h).await.unwrap();
    let top = got.iter().map(|r| r.end).max().unwrap();
    let fork_top = fork_got.iter().map(|r| r.end).max().unwrap();
    // Nothing is reported below what was granted, even before any reservation.
    assert!(e.hwm(Namespace::Primary).await.unwrap().next_vid >= top);
    assert!(e.hwm(Namespace::Fork(f)).await.unwrap().next_vid >= fork_top);
    let page = e.list_forks(None, 10).await;
    assert!(page.forks[0].next_vid >= fork_top, "{:?}", page.forks[0]);
    got.push(e.reserve(Namespace::Primary, Kind::Vid, 5).await.unwrap());
    fork_got.push(e.reserve(Namespace::Fork(f), Kind::Vid, 5).await.unwrap());
    assert_disjoint(&got, "primary after a clean stop and a cut");
    assert_disjoint(&fork_got, "fork after a clean stop and a cut");
    // A crash in this boot afterwards is trusted again, and dense.
    let before = e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    crash(e).await;
    let e = open(cfg, &h).await.unwrap();
    let after = e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert_eq!(
        after.start, before.end,
        "a crash in this boot leaves no gap"
    );
}

/// The window after an untrusted start: a crash in this boot right
/// after it must not trust the stale counters either (they are marked stale, and
/// the mark persisted, before the mark file names this boot).
#[tokio::test]
async fn a_crash_right_after_an_untrusted_start_keeps_the_namespaces_stale() {
    let env = Env::new();
    let (_store, h) = memory_store();
    let cfg = env.config("d", 50);
    let f = ForkId::generate();
    let e = open(cfg.clone(), &h).await.unwrap();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    let mut got = vec![e.reserve(Namespace::Fork(f), Kind::Eid, 10).await.unwrap()];
    // An older state sled once had on disk, with a lease that is still open in it.
    let snapshot = env.data_dir("snapshot");
    copy_dir(&cfg.data_dir.join("sled"), &snapshot);
    got.push(e.reserve(Namespace::Fork(f), Kind::Eid, 30).await.unwrap());
    crash(e).await;
    copy_dir(&snapshot, &cfg.data_dir.join("sled"));
    env.set_boot_id("boot-2");
    // Start untrusted, touch nothing of the fork, crash at once (same boot now:
    // the next start trusts sled, whose fork record must still say "stale").
    let e = open(cfg.clone(), &h).await.unwrap();
    crash(e).await;
    let e = open(cfg, &h).await.unwrap();
    got.push(e.reserve(Namespace::Fork(f), Kind::Eid, 5).await.unwrap());
    assert_disjoint(&got, "fork after an untrusted start and a crash");
}

/// One empty fork manifest must not stop the whole daemon, and the advice must
/// not be one whose effect is a reset (removing the file would be).
#[tokio::test]
async fn a_broken_fork_manifest_makes_only_that_fork_unavailable_until_repaired() {
    let env = Env::new();
    let (store, h) = memory_store();
    let cfg = env.config("d", 100);
    let broken = ForkId::generate();
    let fine = ForkId::generate();
    let e = open(cfg.clone(), &h).await.unwrap();
    e.bootstrap_fork(broken, None, 0, 0).await.unwrap();
    e.bootstrap_fork(fine, None, 0, 0).await.unwrap();
    let granted = e
        .reserve(Namespace::Fork(broken), Kind::Vid, 60)
        .await
        .unwrap();
    crash(e).await;
    let path = format!("catalog/forks/{}/id_allocator.json", broken.text());
    put(&store, &path, b"").await;
    // A fresh data directory: nothing local remembers the fork's counters.
    std::fs::remove_dir_all(&cfg.data_dir).unwrap();
    let e = open(cfg.clone(), &h).await.unwrap();
    e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    e.reserve(Namespace::Fork(fine), Kind::Vid, 1)
        .await
        .unwrap();
    for _ in 0..2 {
        match e.reserve(Namespace::Fork(broken), Kind::Vid, 1).await {
            Err(ServiceError::BrokenManifest(m)) => {
                assert!(m.contains(&path), "{m}");
                assert!(
                    m.contains(&format!("idallocctl repair --fork {}", broken.text())),
                    "{m}"
                );
                assert!(!m.contains('\n'), "{m}");
            }
            other => panic!("a broken manifest served: {other:?}"),
        }
    }
    assert!(e.hwm(Namespace::Fork(broken)).await.is_err());
    let page = e.list_forks(None, 10).await;
    let row = page
        .forks
        .iter()
        .find(|i| ForkId::parse(&i.fork).unwrap() == broken)
        .unwrap();
    assert!(row.error.is_some() && row.next_vid == 0, "{row:?}");
    // Nothing local remembers the fork, but the lost data directory's lease
    // record does: the repair stands above the floor given and that lease.
    let report = e
        .repair(Namespace::Fork(broken), granted.end + 5, 0)
        .await
        .unwrap();
    assert!(report.before.contains("unparseable"), "{report:?}");
    assert!(report.vid_ceiling >= granted.end + 5, "{report:?}");
    assert!(
        report
            .evidence
            .iter()
            .any(|e| e.starts_with("lease records")
                && e.contains(&format!("vid {}", report.vid_ceiling))),
        "{report:?}"
    );
    let r = e
        .reserve(Namespace::Fork(broken), Kind::Vid, 1)
        .await
        .unwrap();
    assert!(r.start >= granted.end + 5, "{r:?}");
    // A second repair with a lower floor lowers nothing.
    let again = e.repair(Namespace::Fork(broken), 0, 0).await.unwrap();
    assert!(again.vid_ceiling >= r.end, "{again:?}");
    let r2 = e
        .reserve(Namespace::Fork(broken), Kind::Vid, 1)
        .await
        .unwrap();
    assert!(r2.start >= r.end);
}

/// The same for the primary: a broken primary manifest stops neither the daemon
/// nor the forks, and local state that knows more is kept by the repair.
#[tokio::test]
async fn a_broken_primary_manifest_is_repaired_above_local_state() {
    let env = Env::new();
    let (store, h) = memory_store();
    let cfg = env.config("d", 100);
    let f = ForkId::generate();
    let e = open(cfg.clone(), &h).await.unwrap();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    let granted = e.reserve(Namespace::Primary, Kind::Eid, 250).await.unwrap();
    e.shutdown().await.unwrap();
    crash(e).await;
    put(&store, "id_allocator.json", b"{\"next_vid_batch\": 3").await;
    let e = open(cfg.clone(), &h).await.unwrap();
    assert!(matches!(
        e.reserve(Namespace::Primary, Kind::Eid, 1).await,
        Err(ServiceError::BrokenManifest(_))
    ));
    e.reserve(Namespace::Fork(f), Kind::Eid, 1).await.unwrap();
    let report = e.repair(Namespace::Primary, 0, 0).await.unwrap();
    assert!(report.eid_ceiling >= granted.end, "{report:?}");
    let r = e.reserve(Namespace::Primary, Kind::Eid, 1).await.unwrap();
    assert!(r.start >= granted.end);
}

/// The legacy: one fork with manifests under both spellings. Every
/// daemon adopts the highest of both and settles on one spelling.
#[tokio::test]
async fn a_fork_with_manifests_under_both_spellings_resumes_above_both() {
    let env = Env::new();
    let (store, h) = memory_store();
    let u = ForkId::parse("0190b6f2-7c1e-7a4b-9c3d-5e6f70819203").unwrap();
    let l = ForkId::parse(&u.with_form(idalloc_client::fork_id::IdForm::Ulid).text()).unwrap();
    let pu = format!("catalog/forks/{}/id_allocator.json", u.text());
    let pl = format!("catalog/forks/{}/id_allocator.json", l.text());
    put(
        &store,
        &pu,
        br#"{"next_vid_batch": 1000, "next_eid_batch": 9000}"#,
    )
    .await;
    put(
        &store,
        &pl,
        br#"{"next_vid_batch": 5000, "next_eid_batch": 10}"#,
    )
    .await;
    let a = open(env.config("a", 100), &h).await.unwrap();
    let b = open(env.config("b", 100), &h).await.unwrap();
    let mut vids = Vec::new();
    let mut eids = Vec::new();
    for i in 0..20 {
        let (x, fid) = if i % 2 == 0 { (&a, u) } else { (&b, l) };
        let v = x
            .reserve(Namespace::Fork(fid), Kind::Vid, 30)
            .await
            .unwrap();
        let e = x
            .reserve(Namespace::Fork(fid), Kind::Eid, 30)
            .await
            .unwrap();
        assert!(v.start >= 5000 && e.start >= 9000, "{v:?} {e:?}");
        vids.push(v);
        eids.push(e);
    }
    assert_disjoint(&vids, "vids of a fork under two spellings");
    assert_disjoint(&eids, "eids of a fork under two spellings");
    // Both daemons write one spelling, the one the claim names.
    let ha = a.hwm(Namespace::Fork(u)).await.unwrap();
    let hb = b.hwm(Namespace::Fork(l)).await.unwrap();
    assert_eq!(ha.fork, hb.fork, "two daemons settled on two spellings");
}

/// Leases grow while they run out sooner than `lease_min_life` (doubling, never
/// past 16 x `lease_size`), step back down once they last over 8 times that, and
/// rule 7 holds with the grown size: a lost data directory leaves a gap of at most
/// the current and the prefetched lease.
#[tokio::test]
async fn fast_writers_get_larger_leases_and_the_gap_stays_within_two_of_them() {
    let env = Env::new();
    let (_store, h) = memory_store();
    let mut cfg = env.config("d", 1000);
    cfg.lease_min_life = std::time::Duration::from_millis(200);
    let e = open(cfg.clone(), &h).await.unwrap();
    let mut end = owned_end(&e).await;
    // (size of the lease, ids that were left when it was taken)
    let mut steps: Vec<(u64, u64)> = Vec::new();
    // Until the write rate has taken leases to their largest, then a few more.
    while steps.iter().filter(|s| s.0 == 16 * 1000).count() < 3 {
        assert!(steps.len() < 100, "leases never reached 16x: {steps:?}");
        let (size, left, _) = reserve_until_next_lease(&e, &mut end).await;
        steps.push((size, left));
    }
    assert!(steps.iter().all(|s| s.0 <= 16 * 1000), "{steps:?}");
    assert!(steps.windows(2).all(|w| w[1].0 <= 2 * w[0].0), "{steps:?}");
    // A grown lease is prefetched once half of it is used, as a lease of
    // lease_size is: well before the writer could run out.
    for &(_, left) in steps.iter().skip(1).filter(|s| s.0 == 16 * 1000) {
        assert!(left >= 4 * 1000, "prefetched too late: {steps:?}");
    }
    // A slow writer: each lease after a pause over 8 x lease_min_life is half
    // the one before.
    for want in [8 * 1000, 4 * 1000] {
        tokio::time::sleep(std::time::Duration::from_millis(1700)).await;
        let (size, _, _) = reserve_until_next_lease(&e, &mut end).await;
        assert_eq!(size, want, "after a pause, after {steps:?}");
    }
    // Rule 7 with grown leases: run fast to the top size again, stop right after
    // a prefetch, lose the data directory.
    let last = loop {
        let (size, _, last) = reserve_until_next_lease(&e, &mut end).await;
        if size == 16 * 1000 {
            break last;
        }
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    crash(e).await;
    std::fs::remove_dir_all(&cfg.data_dir).unwrap();
    let e = open(cfg, &h).await.unwrap();
    let r = e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert!(r.start >= last);
    assert!(
        r.start - last <= 2 * 16 * 1000,
        "gap {} is more than two leases of 16 x lease_size",
        r.start - last
    );
}

/// The owned end of the primary's vid counter (`lease_end` counts the prefetched
/// lease too, so every lease taken shows as a step of it).
async fn owned_end(e: &std::sync::Arc<idalloc::engine::Engine>) -> u64 {
    e.status().await.namespaces[0].counters[0].lease_end
}

/// Reserve 100 vids at a time until a lease is taken (the owned end above `end`
/// steps up). Returns the lease's size, the ids that were left before the
/// reservation that set it off, and the end of the last range granted.
async fn reserve_until_next_lease(
    e: &std::sync::Arc<idalloc::engine::Engine>,
    end: &mut u64,
) -> (u64, u64, u64) {
    loop {
        let left = e.status().await.namespaces[0].counters[0].headroom;
        let last = e
            .reserve(Namespace::Primary, Kind::Vid, 100)
            .await
            .unwrap()
            .end;
        // The prefetch runs on its own task.
        tokio::task::yield_now().await;
        let now = owned_end(e).await;
        if now > *end {
            let size = now - *end;
            *end = now;
            return (size, left, last);
        }
    }
}
