//! The ground the multi-writer tests stand on: moto 5.2's S3 API, reached through
//! object_store's S3 backend exactly as the daemon builds it, really refuses a
//! conditional write that lost. If it did not, every "several daemons" test would
//! prove nothing. Then the engine itself on moto: several engines, one prefix.

use crate::common;
use crate::s3_support;

use std::sync::Arc;

use common::{assert_disjoint, open, Env};
use idalloc_client::protocol::{IdRange, WriterMode};
use idalloc_client::{ForkId, Kind, Namespace};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use s3_support::Moto;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_refuses_conditional_writes_that_lost() {
    let moto = Moto::start();
    let h = moto.store("cond");
    assert_eq!(h.mode, WriterMode::MultiWriter);
    let s = h.store.clone();
    let p = Path::from("id_allocator.json");
    let create = || PutOptions::from(PutMode::Create);

    // Create: the first wins, the second is told the object exists.
    let first = s
        .put_opts(&p, PutPayload::from_static(b"{\"v\":1}"), create())
        .await
        .expect("conditional create on an absent object");
    let e_tag = first.e_tag.clone().expect("moto returns an ETag");
    match s
        .put_opts(&p, PutPayload::from_static(b"{\"v\":2}"), create())
        .await
    {
        Err(object_store::Error::AlreadyExists { .. }) => {}
        other => panic!("second create must fail with AlreadyExists, got {other:?}"),
    }

    // Update on the current ETag wins and yields a new ETag.
    let v1 = UpdateVersion {
        e_tag: Some(e_tag.clone()),
        version: first.version.clone(),
    };
    let second = s
        .put_opts(
            &p,
            PutPayload::from_static(b"{\"v\":3}"),
            PutMode::Update(v1.clone()).into(),
        )
        .await
        .expect("update on the current ETag");
    assert_ne!(second.e_tag.as_deref(), Some(e_tag.as_str()));

    // Update on the stale ETag loses with Precondition and does not write.
    match s
        .put_opts(
            &p,
            PutPayload::from_static(b"{\"v\":4}"),
            PutMode::Update(v1).into(),
        )
        .await
    {
        Err(object_store::Error::Precondition { .. }) => {}
        other => panic!("stale update must fail with Precondition, got {other:?}"),
    }
    let now = s.get(&p).await.unwrap().bytes().await.unwrap();
    assert_eq!(&now[..], b"{\"v\":3}");

    // Update of an object that does not exist is a lost precondition too (never a
    // silent create).
    match s
        .put_opts(
            &Path::from("absent.json"),
            PutPayload::from_static(b"{}"),
            PutMode::Update(UpdateVersion {
                e_tag: Some(e_tag),
                version: None,
            })
            .into(),
        )
        .await
    {
        Err(object_store::Error::Precondition { .. })
        | Err(object_store::Error::NotFound { .. }) => {}
        other => panic!("update of an absent object must fail, got {other:?}"),
    }

    // Racing conditional updates from many tasks on one ETag: exactly one wins.
    // (moto's stock threaded server lets several win; the serial launcher must not.)
    let base = s
        .put_opts(&p, PutPayload::from_static(b"{}"), PutOptions::default())
        .await
        .unwrap();
    let v = UpdateVersion {
        e_tag: base.e_tag,
        version: base.version,
    };
    let mut racers = vec![];
    for i in 0..16 {
        let (s, p, v) = (s.clone(), p.clone(), v.clone());
        racers.push(tokio::spawn(async move {
            s.put_opts(
                &p,
                PutPayload::from(format!("{{\"racer\":{i}}}").into_bytes()),
                PutMode::Update(v).into(),
            )
            .await
        }));
    }
    let mut won = 0;
    for r in racers {
        match r.await.unwrap() {
            Ok(_) => won += 1,
            Err(object_store::Error::Precondition { .. }) => {}
            Err(e) => panic!("racing update: unexpected {e}"),
        }
    }
    assert_eq!(won, 1, "exactly one racing conditional update may win");
}

/// Three engines (as three daemons would) on one moto prefix, racing for leases of
/// 50 ids, in the primary and a fork bootstrapped by all three at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_engines_on_one_moto_prefix_never_overlap() {
    let moto = Moto::start();
    let env = Arc::new(Env::new());
    let h = moto.store("engines");
    let mut engines = vec![];
    for i in 0..3 {
        engines.push(open(env.config(&format!("d{i}"), 50), &h).await.unwrap());
    }
    let f = ForkId::generate();
    let boots = futures::future::join_all(
        engines
            .iter()
            .enumerate()
            .map(|(i, e)| e.bootstrap_fork(f, None, 100 * i as u64, 0)),
    )
    .await;
    let infos: Vec<_> = boots.into_iter().map(Result::unwrap).collect();
    assert_eq!(infos.iter().filter(|i| i.created).count(), 1, "{infos:?}");
    assert!(infos.iter().all(|i| i.floor_vid == infos[0].floor_vid));

    let mut tasks = vec![];
    for t in 0..9usize {
        let e = engines[t % 3].clone();
        tasks.push(tokio::spawn(async move {
            let mut got = vec![];
            for i in 0..40u64 {
                let ns = if i % 4 == 0 {
                    Namespace::Fork(f)
                } else {
                    Namespace::Primary
                };
                let kind = if i % 2 == 0 { Kind::Vid } else { Kind::Eid };
                let r: IdRange = e
                    .reserve(ns, kind, 1 + (i * 7 + t as u64) % 30)
                    .await
                    .unwrap();
                got.push((ns, kind, r));
            }
            got
        }));
    }
    let mut all: std::collections::HashMap<(Namespace, Kind), Vec<IdRange>> = Default::default();
    for t in tasks {
        for (ns, k, r) in t.await.unwrap() {
            all.entry((ns, k)).or_default().push(r);
        }
    }
    assert_eq!(all.values().map(Vec::len).sum::<usize>(), 9 * 40);
    for ((ns, k), ranges) in &all {
        assert_disjoint(ranges, &format!("{ns} {k}"));
    }
    let fork_min = all[&(Namespace::Fork(f), Kind::Vid)]
        .iter()
        .map(|r| r.start)
        .min()
        .unwrap();
    assert!(fork_min >= infos[0].floor_vid);
}
