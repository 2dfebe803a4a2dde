//! The engine's everyday behaviour: ranges, errors, forks, checkpoint, restart and
//! compatibility with the reference manifest format.

use crate::common;

use common::*;
use idalloc::engine::StoreHandle;
use idalloc_client::protocol::WriterMode;
use idalloc_client::{ForkId, IdForm, Kind, Namespace, ServiceError};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

#[tokio::test]
async fn ranges_are_dense_increasing_and_durable_across_restart() {
    let env = Env::new();
    let (store, h) = memory_store();
    let e = open(env.config("d", 100), &h).await.unwrap();
    let mut prev = 0;
    for n in [1u64, 5, 90, 30, 250] {
        let r = e.reserve(Namespace::Primary, Kind::Vid, n).await.unwrap();
        assert_eq!(r.start, prev, "dense and increasing");
        assert_eq!(r.len(), n);
        prev = r.end;
    }
    // The manifest is at or above every id granted (durable below the ceiling).
    let (vid, _) = ceilings(&store, "id_allocator.json").await.unwrap();
    assert!(vid >= prev);
    // Crash and restart in the same boot: the next id follows the last one granted.
    crash(e).await;
    let e = open(env.config("d", 100), &h).await.unwrap();
    let r = e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert_eq!(
        r.start, prev,
        "no gap after a crash with the data directory intact"
    );
    // Clean shutdown lowers the manifest to granted.
    e.shutdown().await.unwrap();
    assert_eq!(
        ceilings(&store, "id_allocator.json").await.unwrap().0,
        prev + 1
    );
    drop(e);
    let e = open(env.config("d", 100), &h).await.unwrap();
    assert_eq!(
        e.reserve(Namespace::Primary, Kind::Vid, 1)
            .await
            .unwrap()
            .start,
        prev + 1
    );
    // eids are a separate counter.
    assert_eq!(
        e.reserve(Namespace::Primary, Kind::Eid, 3)
            .await
            .unwrap()
            .start,
        0
    );
}

#[tokio::test]
async fn bad_counts_get_their_own_errors() {
    let env = Env::new();
    let (store, h) = memory_store();
    let e = open(env.config("d", 100), &h).await.unwrap();
    match e.reserve(Namespace::Primary, Kind::Vid, 0).await {
        Err(ServiceError::InvalidArgument(m)) => assert!(m.contains("at least 1"), "{m}"),
        other => panic!("{other:?}"),
    }
    match e
        .reserve(Namespace::Primary, Kind::Vid, (1 << 20) + 1)
        .await
    {
        Err(ServiceError::InvalidArgument(m)) => assert!(m.contains("maximum"), "{m}"),
        other => panic!("{other:?}"),
    }
    e.shutdown().await.unwrap();
    drop(e);
    // A counter near the top of u64: overflow is an error, never a wrap.
    store
        .put(
            &Path::from("id_allocator.json"),
            PutPayload::from(format!(
                "{{\"next_vid_batch\": {}, \"next_eid_batch\": 0}}",
                u64::MAX - 10
            )),
        )
        .await
        .unwrap();
    let env2 = Env::new();
    let e = open(env2.config("d", 100), &h).await.unwrap();
    let r = e.reserve(Namespace::Primary, Kind::Vid, 10).await.unwrap();
    assert_eq!(r.end, u64::MAX);
    match e.reserve(Namespace::Primary, Kind::Vid, 1).await {
        Err(ServiceError::Exhausted(m)) => assert!(m.contains("overflow"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn forks_bootstrap_above_the_parent_and_drop_for_good() {
    let env = Env::new();
    let (store, h) = memory_store();
    let e = open(env.config("d", 100), &h).await.unwrap();
    let p = e.reserve(Namespace::Primary, Kind::Vid, 40).await.unwrap();
    e.reserve(Namespace::Primary, Kind::Eid, 7).await.unwrap();
    let f = ForkId::generate();
    let info = e.bootstrap_fork(f, None, 10, 5000).await.unwrap();
    assert!(info.created);
    assert!(info.floor_vid >= p.end, "above the parent's HWM");
    assert_eq!(info.floor_eid, 5000, "the caller's floor wins when higher");
    let r = e.reserve(Namespace::Fork(f), Kind::Vid, 3).await.unwrap();
    assert!(r.start >= info.floor_vid);
    // Idempotent: same answer, not created, counters untouched.
    let again = e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.floor_vid, info.floor_vid);
    assert_eq!(again.next_vid, r.end);
    // The other spelling of the same value is the same fork.
    let as_ulid = ForkId::parse(&f.with_form(IdForm::Ulid).text()).unwrap();
    assert!(!e.bootstrap_fork(as_ulid, None, 0, 0).await.unwrap().created);
    // A child of the fork starts above the fork.
    let child = ForkId::generate();
    let ci = e.bootstrap_fork(child, Some(f), 0, 0).await.unwrap();
    assert!(ci.created && ci.floor_vid >= r.end && ci.parent == Some(f.text()));
    // Unknown parent, own parent.
    assert!(matches!(
        e.bootstrap_fork(ForkId::generate(), Some(ForkId::generate()), 0, 0)
            .await,
        Err(ServiceError::UnknownFork(_))
    ));
    assert!(matches!(
        e.bootstrap_fork(f, Some(f), 0, 0).await,
        Err(ServiceError::InvalidArgument(_))
    ));
    // List.
    let page = e.list_forks(None, 10).await;
    assert_eq!(page.forks.len(), 2);
    let p1 = e.list_forks(None, 1).await;
    assert_eq!(p1.forks.len(), 1);
    let after = ForkId::parse(p1.next_after.as_deref().unwrap()).unwrap();
    let p2 = e.list_forks(Some(after), 1).await;
    assert_eq!(p2.forks.len(), 1);
    assert!(p2.next_after.is_none());
    // Drop: reservations fail clearly; bootstrap refuses; the manifest stays, marked.
    e.drop_fork(f).await.unwrap();
    assert!(matches!(
        e.reserve(Namespace::Fork(f), Kind::Vid, 1).await,
        Err(ServiceError::DroppedFork(_))
    ));
    assert!(matches!(
        e.bootstrap_fork(f, None, 0, 0).await,
        Err(ServiceError::DroppedFork(_))
    ));
    let raw = store
        .get(&Path::from(format!("catalog/forks/{f}/id_allocator.json")))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(v["idalloc"]["dropped"], true);
    assert!(v["next_vid_batch"].as_u64().unwrap() >= r.end);
    // Unknown fork.
    assert!(matches!(
        e.reserve(Namespace::Fork(ForkId::generate()), Kind::Vid, 1)
            .await,
        Err(ServiceError::UnknownFork(_))
    ));
    // The tombstone survives a lost data directory.
    crash(e).await;
    let e = open(env.config("other", 100), &h).await.unwrap();
    assert!(matches!(
        e.reserve(Namespace::Fork(f), Kind::Vid, 1).await,
        Err(ServiceError::DroppedFork(_))
    ));
    assert!(
        e.reserve(Namespace::Fork(child), Kind::Vid, 1)
            .await
            .unwrap()
            .start
            >= ci.floor_vid
    );
}

#[tokio::test]
async fn reference_manifest_at_5000_is_honoured_and_stays_readable() {
    #[derive(serde::Deserialize)]
    struct Reference {
        next_vid_batch: u64,
        next_eid_batch: u64,
    }
    let env = Env::new();
    let (store, h) = memory_store();
    store
        .put(
            &Path::from("id_allocator.json"),
            PutPayload::from_static(
                b"{\n  \"next_vid_batch\": 5000,\n  \"next_eid_batch\": 5000,\n  \"written_by\": \"uni\"\n}",
            ),
        )
        .await
        .unwrap();
    let e = open(env.config("d", 1000), &h).await.unwrap();
    let mut max_end = 0;
    for _ in 0..20 {
        let v = e.reserve(Namespace::Primary, Kind::Vid, 77).await.unwrap();
        let x = e.reserve(Namespace::Primary, Kind::Eid, 13).await.unwrap();
        assert!(v.start >= 5000 && x.start >= 5000);
        max_end = max_end.max(v.end);
    }
    let raw = store
        .get(&Path::from("id_allocator.json"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let r: Reference = serde_json::from_slice(&raw).unwrap();
    assert!(r.next_vid_batch >= max_end && r.next_eid_batch >= 5000);
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(v["written_by"], "uni", "unknown fields are kept");
    // Checkpoint makes the file dense: exactly what was granted.
    e.checkpoint(Namespace::Primary).await.unwrap();
    let raw = store
        .get(&Path::from("id_allocator.json"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let r: Reference = serde_json::from_slice(&raw).unwrap();
    assert_eq!(r.next_vid_batch, max_end);
    // And reservations go on after it.
    assert_eq!(
        e.reserve(Namespace::Primary, Kind::Vid, 1)
            .await
            .unwrap()
            .start,
        max_end
    );
}

#[tokio::test]
async fn local_files_run_single_writer_and_are_fsynced_in_place() {
    let env = Env::new();
    let mirror = env.data_dir("mirror");
    let url = format!("file://{}", mirror.display());
    let h = StoreHandle::from_url(&url, &[]).unwrap();
    assert_eq!(h.mode, WriterMode::SingleWriter);
    let e = open(env.config("d", 50), &h).await.unwrap();
    assert_eq!(e.mode(), WriterMode::SingleWriter);
    let a = e.reserve(Namespace::Primary, Kind::Vid, 60).await.unwrap();
    let f = ForkId::parse("01J2VF4Z0Y8Q3R5S7T9V1W3X5Z").unwrap();
    e.bootstrap_fork(f, None, 0, 0).await.unwrap();
    assert!(mirror
        .join("catalog/forks/01J2VF4Z0Y8Q3R5S7T9V1W3X5Z/id_allocator.json")
        .exists());
    let text = std::fs::read_to_string(mirror.join("id_allocator.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["next_vid_batch"].as_u64().unwrap() >= a.end);
    // A second daemon on the same data directory is refused.
    match idalloc::engine::Engine::open(
        env.config("d", 50),
        StoreHandle::from_url(&url, &[]).unwrap(),
    )
    .await
    {
        Err(idalloc::engine::OpenError::Locked(_)) => {}
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("two engines on one data directory"),
    }
}
