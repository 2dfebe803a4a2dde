//! Recovery: lost, stale and corrupt data directories, and DESIGN.md's rule "trust
//! sled only when it can be current" (boot id + clean-shutdown mark).

use crate::common;

use common::*;
use idalloc::engine::StoreHandle;
use idalloc_client::protocol::IdRange;
use idalloc_client::{Kind, Namespace};

#[tokio::test]
async fn a_wiped_data_directory_resumes_above_the_ceiling_within_one_lease() {
    let env = Env::new();
    let (store, h) = memory_store();
    let e = open(env.config("d", 1000), &h).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..30 {
        got.push(e.reserve(Namespace::Primary, Kind::Vid, 33).await.unwrap());
    }
    let last = got.last().unwrap().end;
    crash(e).await;
    std::fs::remove_dir_all(env.data_dir("d")).unwrap();
    let e = open(env.config("d", 1000), &h).await.unwrap();
    let r = e.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert!(r.start >= last);
    let ceiling = ceilings(&store, "id_allocator.json").await.unwrap().0;
    assert!(
        r.start - last <= 2 * 1000,
        "gap {} larger than the leases held",
        r.start - last
    );
    assert!(ceiling >= r.end);
    got.push(r);
    assert_disjoint(&got, "wiped data dir");
}

#[tokio::test]
async fn an_old_copy_after_a_reboot_is_not_trusted() {
    let env = Env::new();
    let (_store, h) = memory_store();
    let mut got: Vec<IdRange> = Vec::new();
    let e = open(env.config("d", 100), &h).await.unwrap();
    for _ in 0..5 {
        got.push(e.reserve(Namespace::Primary, Kind::Vid, 30).await.unwrap());
    }
    crash(e).await;
    copy_dir(&env.data_dir("d"), &env.data_dir("old"));
    // Same boot, crash: trusted, dense.
    let e = open(env.config("d", 100), &h).await.unwrap();
    let r = e.reserve(Namespace::Primary, Kind::Vid, 30).await.unwrap();
    assert_eq!(
        r.start,
        got.last().unwrap().end,
        "same boot: resumes exactly"
    );
    got.push(r);
    for _ in 0..10 {
        got.push(e.reserve(Namespace::Primary, Kind::Vid, 30).await.unwrap());
    }
    crash(e).await;
    // A power cut rolled sled back to the old copy; the machine rebooted.
    std::fs::remove_dir_all(env.data_dir("d")).unwrap();
    copy_dir(&env.data_dir("old"), &env.data_dir("d"));
    env.set_boot_id("boot-2");
    let e = open(env.config("d", 100), &h).await.unwrap();
    for _ in 0..10 {
        got.push(e.reserve(Namespace::Primary, Kind::Vid, 30).await.unwrap());
    }
    assert_disjoint(&got, "old copy after reboot");
}

#[tokio::test]
async fn single_writer_cross_checks_a_stale_copy_against_the_manifest() {
    let env = Env::new();
    let url = format!("file://{}", env.data_dir("mirror").display());
    let h = StoreHandle::from_url(&url, &[]).unwrap();
    let mut got: Vec<IdRange> = Vec::new();
    let e = open(env.config("d", 100), &h).await.unwrap();
    got.push(e.reserve(Namespace::Primary, Kind::Vid, 70).await.unwrap());
    // Let the next lease be prefetched, so that the copy holds an unused lease.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    crash(e).await;
    copy_dir(&env.data_dir("d"), &env.data_dir("old"));
    let e = open(env.config("d", 100), &h).await.unwrap();
    for _ in 0..6 {
        got.push(e.reserve(Namespace::Primary, Kind::Vid, 70).await.unwrap());
    }
    crash(e).await;
    // Same boot, a stale copy that still holds a lease the later life used up:
    // only the cross-check against the manifest can tell.
    std::fs::remove_dir_all(env.data_dir("d")).unwrap();
    copy_dir(&env.data_dir("old"), &env.data_dir("d"));
    let e = open(env.config("d", 100), &h).await.unwrap();
    for _ in 0..6 {
        got.push(e.reserve(Namespace::Primary, Kind::Vid, 70).await.unwrap());
    }
    assert_disjoint(&got, "stale copy, single writer");
}

#[tokio::test]
async fn a_corrupt_local_database_is_moved_aside_not_crash_looped() {
    let env = Env::new();
    let (_store, h) = memory_store();
    let e = open(env.config("d", 100), &h).await.unwrap();
    let mut got = vec![e.reserve(Namespace::Primary, Kind::Vid, 42).await.unwrap()];
    crash(e).await;
    let sled_dir = env.data_dir("d").join("sled");
    for entry in std::fs::read_dir(&sled_dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::write(&p, b"\xde\xad\xbe\xefgarbage garbage garbage").unwrap();
        }
    }
    let e = open(env.config("d", 100), &h).await.unwrap();
    got.push(e.reserve(Namespace::Primary, Kind::Vid, 42).await.unwrap());
    assert_disjoint(&got, "corrupt sled");
    let moved = std::fs::read_dir(env.data_dir("d"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("sled.corrupt-")
        })
        .count();
    assert_eq!(
        moved, 1,
        "the corrupt database is kept aside for inspection"
    );
}
