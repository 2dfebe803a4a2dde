//! An adversarial object store: failures, stalls, corruption and writes that land
//! but report an error. No counter may reset, lower or hand an id out twice.

use crate::common;

use std::time::Duration;

use crate::faults::{Fault, Op};
use common::*;
use idalloc::engine::OpenError;
use idalloc_client::protocol::IdRange;
use idalloc_client::{ForkId, Kind, Namespace, ServiceError};

#[tokio::test]
async fn transient_get_errors_at_open_never_reset_a_counter() {
    let env = Env::new();
    let (inner, ctl, h) = crate::common::faulty();
    let e = open(env.config("a", 100), &h).await.unwrap();
    let last = e.reserve(Namespace::Primary, Kind::Vid, 250).await.unwrap();
    crash(e).await;
    // Lost data directory + a store that keeps failing reads: refuse to start
    // rather than start at zero.
    ctl.set(Op::Get, Some(Fault::Fail));
    match open(env.config("b", 100), &h).await {
        Err(OpenError::StoreUnreachable(m)) => assert!(m.contains("injected"), "{m}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("started without being able to read the manifest"),
    }
    // One transient failure is retried.
    ctl.clear();
    ctl.next(Op::Get, Fault::Fail, 1);
    let e = open(env.config("c", 100), &h).await.unwrap();
    let r = e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert!(r.start >= last.end, "{r:?} after {last:?}");
    assert!(ceilings(&inner, "id_allocator.json").await.unwrap().0 >= r.end);
}

#[tokio::test]
async fn transient_get_errors_at_bootstrap_never_overwrite_a_fork() {
    let env = Env::new();
    let (inner, ctl, h) = crate::common::faulty();
    let a = open(env.config("a", 100), &h).await.unwrap();
    let b = open(env.config("b", 100), &h).await.unwrap();
    a.reserve(Namespace::Primary, Kind::Vid, 500).await.unwrap();
    let f = ForkId::generate();
    let created = a.bootstrap_fork(f, None, 0, 0).await.unwrap();
    let used = a.reserve(Namespace::Fork(f), Kind::Vid, 150).await.unwrap();
    // Let a's lease prefetch land: only b's writes are under test.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let path = format!("catalog/forks/{f}/id_allocator.json");
    let before = ceilings(&inner, &path).await.unwrap();
    ctl.set(Op::Get, Some(Fault::Fail));
    match b.bootstrap_fork(f, None, 0, 0).await {
        Err(ServiceError::Unavailable { .. }) => {}
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert_eq!(
        ceilings(&inner, &path).await.unwrap(),
        before,
        "nothing overwritten"
    );
    ctl.clear();
    let adopted = b.bootstrap_fork(f, None, 0, 0).await.unwrap();
    assert!(!adopted.created);
    assert_eq!(adopted.floor_vid, created.floor_vid);
    let r = b.reserve(Namespace::Fork(f), Kind::Vid, 10).await.unwrap();
    assert!(r.start >= used.end, "{r:?} overlaps {used:?}");
}

#[tokio::test]
async fn a_failed_lease_write_leaves_nothing_advanced() {
    let env = Env::new();
    let (inner, ctl, h) = crate::common::faulty();
    let e = open(env.config("a", 100), &h).await.unwrap();
    let first = e.reserve(Namespace::Primary, Kind::Vid, 100).await.unwrap();
    assert_eq!(first, IdRange { start: 0, end: 100 });
    // Let any prefetch settle, then break writes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let hwm = e.hwm(Namespace::Primary).await.unwrap();
    let ceiling = ceilings(&inner, "id_allocator.json").await.unwrap();
    ctl.set(Op::Put, Some(Fault::Fail));
    // Use up whatever lease is left, then the next reservation needs the store.
    let mut got = vec![first];
    loop {
        match e.reserve(Namespace::Primary, Kind::Vid, 60).await {
            Ok(r) => got.push(r),
            Err(ServiceError::Unavailable { retry_after_ms, .. }) => {
                assert!(retry_after_ms > 0);
                break;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    let stuck = e.hwm(Namespace::Primary).await.unwrap();
    assert_eq!(
        ceilings(&inner, "id_allocator.json").await.unwrap(),
        ceiling
    );
    assert_eq!(
        stuck.next_vid,
        got.last().unwrap().end,
        "a failed reservation advanced nothing"
    );
    assert!(stuck.next_vid >= hwm.next_vid);
    ctl.clear();
    tokio::time::sleep(Duration::from_millis(250)).await; // the cool-down
    let r = e.reserve(Namespace::Primary, Kind::Vid, 60).await.unwrap();
    assert_eq!(
        r.start, stuck.next_vid,
        "dense again once the store is back"
    );
    got.push(r);
    assert_disjoint(&got, "after a failed write");
}

#[tokio::test]
async fn a_write_that_lands_but_reports_an_error_is_never_reused() {
    let env = Env::new();
    let (inner, ctl, h) = crate::common::faulty();
    let a = open(env.config("a", 100), &h).await.unwrap();
    let b = open(env.config("b", 100), &h).await.unwrap();
    let mut got = vec![a.reserve(Namespace::Primary, Kind::Vid, 100).await.unwrap()];
    tokio::time::sleep(Duration::from_millis(100)).await;
    ctl.next(Op::Put, Fault::FailAfterWrite, 4);
    for i in 0..40 {
        let e = if i % 2 == 0 { &a } else { &b };
        match e.reserve(Namespace::Primary, Kind::Vid, 70).await {
            Ok(r) => got.push(r),
            Err(ServiceError::Unavailable { .. }) => {
                tokio::time::sleep(Duration::from_millis(210)).await;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(ctl.injected() >= 4);
    assert_disjoint(&got, "ambiguous writes");
    let max = got.iter().map(|r| r.end).max().unwrap();
    assert!(ceilings(&inner, "id_allocator.json").await.unwrap().0 >= max);
}

#[tokio::test]
async fn an_outage_is_ridden_out_inside_the_lease_then_reported_then_healed() {
    let env = Env::new();
    let (_inner, ctl, h) = crate::common::faulty();
    let e = open(env.config("a", 1000), &h).await.unwrap();
    let mut got = vec![e.reserve(Namespace::Primary, Kind::Vid, 10).await.unwrap()];
    tokio::time::sleep(Duration::from_millis(50)).await;
    let puts_before = ctl.calls(Op::Put);
    ctl.set(Op::Put, Some(Fault::Fail));
    ctl.set(Op::Get, Some(Fault::Fail));
    // Inside the lease: no store call, reservations go on.
    let mut served_in_outage = 0;
    let err = loop {
        match e.reserve(Namespace::Primary, Kind::Vid, 10).await {
            Ok(r) => {
                got.push(r);
                served_in_outage += 1;
            }
            Err(err) => break err,
        }
    };
    assert!(
        served_in_outage >= 40,
        "only {served_in_outage} served inside the lease"
    );
    match &err {
        ServiceError::Unavailable { message, .. } => {
            assert!(message.contains("injected"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    let st = e.status().await;
    assert!(!st.mirror.healthy);
    assert!(st
        .mirror
        .last_error
        .as_deref()
        .unwrap_or("")
        .contains("injected"));
    assert!(ctl.calls(Op::Put) > puts_before);
    // The store comes back: reservations succeed again by themselves.
    ctl.clear();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match e.reserve(Namespace::Primary, Kind::Vid, 10).await {
            Ok(r) => {
                got.push(r);
                break;
            }
            Err(ServiceError::Unavailable { retry_after_ms, .. })
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(retry_after_ms)).await
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(e.status().await.mirror.healthy);
    assert_disjoint(&got, "across an outage");
}

#[tokio::test]
async fn a_stalled_store_times_out_instead_of_hanging() {
    let env = Env::new();
    let (_inner, ctl, h) = crate::common::faulty();
    let e = open(env.config("a", 50), &h).await.unwrap();
    e.reserve(Namespace::Primary, Kind::Eid, 50).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    ctl.set(Op::Put, Some(Fault::Stall(Duration::from_secs(30))));
    let t = std::time::Instant::now();
    let mut served = 0;
    let res = loop {
        match e.reserve(Namespace::Primary, Kind::Eid, 50).await {
            Ok(_) => served += 1,
            Err(err) => break err,
        }
    };
    assert!(served <= 2);
    assert!(matches!(res, ServiceError::Unavailable { .. }), "{res:?}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stalled for {:?}",
        t.elapsed()
    );
    ctl.clear();
}

#[tokio::test]
async fn a_corrupt_read_is_an_error_not_a_zero() {
    let env = Env::new();
    let (_inner, ctl, h) = crate::common::faulty();
    let e = open(env.config("a", 50), &h).await.unwrap();
    let first = e.reserve(Namespace::Primary, Kind::Vid, 10).await.unwrap();
    crash(e).await;
    // A new data directory, and every read returns garbage: the daemon starts (one
    // broken namespace does not stop it), and the primary answers with the error
    // naming its manifest, never with counters from zero.
    ctl.set(Op::Get, Some(Fault::Corrupt));
    let e = open(env.config("b", 50), &h).await.unwrap();
    for _ in 0..2 {
        match e.reserve(Namespace::Primary, Kind::Vid, 1).await {
            Err(ServiceError::BrokenManifest(m)) => {
                assert!(m.contains("id_allocator.json"), "{m}");
                assert!(m.contains("idallocctl repair"), "{m}");
                assert!(!m.contains("remove it"), "{m}");
            }
            other => panic!("served from a corrupt manifest: {other:?}"),
        }
    }
    assert!(
        e.hwm(Namespace::Primary).await.is_err(),
        "hwm reported unverified counters"
    );
    ctl.clear();
    let r = e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert!(r.start >= first.end, "{r:?} re-uses {first:?}");
}

#[tokio::test]
async fn trusted_local_state_starts_without_the_store_but_serves_only_once_verified() {
    let env = Env::new();
    let (_inner, ctl, h) = crate::common::faulty();
    let e = open(env.config("a", 100), &h).await.unwrap();
    let last = e.reserve(Namespace::Primary, Kind::Vid, 30).await.unwrap();
    e.shutdown().await.unwrap();
    crash(e).await;
    // The store is down at start-up, but local state is trusted (clean stop): the
    // daemon starts (no crash loop) and answers "unavailable" until it can check
    // the manifest.
    ctl.set(Op::Get, Some(Fault::Fail));
    let e = open(env.config("a", 100), &h).await.unwrap();
    match e.reserve(Namespace::Primary, Kind::Vid, 1).await {
        Err(ServiceError::Unavailable { message, .. }) => {
            assert!(message.contains("injected"), "{message}")
        }
        other => panic!("served before verifying the manifest: {other:?}"),
    }
    assert!(!e.status().await.mirror.healthy);
    ctl.clear();
    let r = e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert_eq!(r.start, last.end, "dense after a clean stop");
}

/// `status` is what an operator runs when the store is in trouble: it must not
/// hang on it, and must not report a namespace it could not verify.
#[tokio::test]
async fn status_answers_within_its_budget_on_a_stalled_store_without_unverified_numbers() {
    let env = Env::new();
    let (_inner, ctl, h) = crate::common::faulty();
    let e = open(env.config("a", 100), &h).await.unwrap();
    let f = ForkId::generate();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    e.reserve(Namespace::Fork(f), Kind::Vid, 5).await.unwrap();
    crash(e).await;
    let e = open(env.config("a", 100), &h).await.unwrap();
    // Before the background verification of the fork gets to run.
    ctl.set(Op::Get, Some(Fault::Stall(Duration::from_secs(30))));
    let t = std::time::Instant::now();
    let st = e.status().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "status took {:?}",
        t.elapsed()
    );
    let fork = &st.namespaces[1];
    assert!(fork.error.is_some() && fork.counters.is_empty(), "{fork:?}");
    let t = std::time::Instant::now();
    let page = e.list_forks(None, 10).await;
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(
        page.forks[0].error.is_some() && page.forks[0].next_vid == 0,
        "{page:?}"
    );
    ctl.clear();
}
