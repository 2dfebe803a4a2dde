//! The client library against an in-process tarpc server (tests/common): ids
//! unique across tasks and across a daemon restart, typed errors, deadlines,
//! reconnects, fork listing and drops.

use crate::client_support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_support::{FakeDaemon, State};
use idalloc_client::client::{AllocatorConfig, Client, ClientConfig, ClientError};
use idalloc_client::protocol::BootstrapRequest;
use idalloc_client::{ForkId, Kind, Namespace, ServiceError};

fn small_batches() -> AllocatorConfig {
    AllocatorConfig::default()
        .with_initial_batch(50)
        .with_min_batch(50)
        .with_max_batch(50)
}

fn assert_unique(ids: &[u64]) {
    let mut seen = HashSet::with_capacity(ids.len());
    for id in ids {
        assert!(seen.insert(*id), "id {id} handed out twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_allocating_single_ids_get_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::start(&dir.path().join("d.sock"), Arc::default()).await;
    let client = Client::connect(daemon.endpoint()).await.unwrap();
    let alloc = client.allocator_with(Namespace::Primary, small_batches());
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let alloc = alloc.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..10_000 {
                    ids.push(alloc.allocate_vid().await.unwrap());
                }
                ids
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 80_000);
    assert_unique(&all);
    // Every id came from a range the daemon granted for vids.
    let granted = daemon.state.granted.lock().unwrap().clone();
    assert!(granted.len() >= 80_000 / 50);
    for id in &all {
        assert!(granted
            .iter()
            .any(|(ns, k, r)| ns.is_none() && *k == Kind::Vid && r.start <= *id && *id < r.end));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_carries_on_across_a_daemon_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    let daemon = FakeDaemon::start(&path, Arc::default()).await;
    let client = Client::connect(daemon.endpoint()).await.unwrap();
    let alloc = client.allocator_with(Namespace::Primary, small_batches());
    let restarted = Arc::new(AtomicBool::new(false));
    let after_restart = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (alloc, restarted, after, stop) = (
                alloc.clone(),
                restarted.clone(),
                after_restart.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let kind = if ids.len() % 3 == 0 {
                        Kind::Eid
                    } else {
                        Kind::Vid
                    };
                    ids.push((kind, alloc.allocate(kind).await.unwrap()));
                    if restarted.load(Ordering::SeqCst) {
                        after.fetch_add(1, Ordering::SeqCst);
                    }
                    if ids.len() % 16 == 0 {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                }
                ids
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let state = daemon.kill().await;
    // Down long enough for writers to run dry and sit in the reconnect loop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let daemon = FakeDaemon::start(&path, state).await;
    restarted.store(true, Ordering::SeqCst);
    // The writers' next dial comes within the reconnect backoff (up to 1 s by
    // default): a fixed short window after the restart could end before it.
    let waited = std::time::Instant::now();
    while after_restart.load(Ordering::SeqCst) <= 1000 && waited.elapsed() < Duration::from_secs(5)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut by_kind = [Vec::new(), Vec::new()];
    for w in writers {
        for (kind, id) in w.await.unwrap() {
            by_kind[kind.index()].push(id);
        }
    }
    assert_unique(&by_kind[0]);
    assert_unique(&by_kind[1]);
    assert!(client.reconnects() >= 1, "the client never reconnected");
    assert!(
        after_restart.load(Ordering::SeqCst) > 1000,
        "writers made little progress in 5 s after the restart: {}",
        after_restart.load(Ordering::SeqCst)
    );
    drop(daemon);
}

#[tokio::test]
async fn typed_errors_come_through() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::start(&dir.path().join("d.sock"), Arc::default()).await;
    let client = Client::connect(daemon.endpoint()).await.unwrap();

    let e = client
        .reserve(Namespace::Primary, Kind::Vid, 0)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Service(ServiceError::InvalidArgument(_))),
        "{e}"
    );
    // A malformed fork id cannot be sent through the library (namespaces are typed,
    // parsed by the caller); the daemon's own answer to one is in tests/daemon.rs.
    let unknown = ForkId::generate().to_string();
    let e = client
        .reserve(ForkId::parse(&unknown).unwrap(), Kind::Eid, 1)
        .await
        .unwrap_err();
    assert_eq!(
        e.service(),
        Some(&ServiceError::UnknownFork(unknown.clone()))
    );

    // A fork: bootstrap above the primary, allocate, drop, then refused as dropped.
    client
        .reserve(Namespace::Primary, Kind::Vid, 500)
        .await
        .unwrap();
    let fork = ForkId::generate().to_string();
    let info = client
        .bootstrap_fork(BootstrapRequest {
            fork: fork.clone(),
            parent: None,
            vid_floor: 0,
            eid_floor: 7000,
            request_id: None,
        })
        .await
        .unwrap();
    assert!(info.created);
    assert_eq!((info.next_vid, info.next_eid), (500, 7000));
    let alloc = client.allocator(ForkId::parse(&fork).unwrap());
    assert!(alloc.allocate_vid().await.unwrap() >= 500);
    assert!(alloc.allocate_eids(3).await.unwrap().start >= 7000);
    let dropped = client
        .drop_fork(ForkId::parse(&fork).unwrap())
        .await
        .unwrap();
    assert!(dropped.dropped);
    let e = client
        .reserve(ForkId::parse(&fork).unwrap(), Kind::Vid, 1)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Service(ServiceError::DroppedFork(_))),
        "{e}"
    );
}

#[tokio::test]
async fn unavailable_is_retried_within_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let state: Arc<State> = Arc::default();
    let daemon = FakeDaemon::start(&dir.path().join("d.sock"), state.clone()).await;
    let config = ClientConfig::default().with_deadline(Duration::from_millis(500));
    let client = Client::connect_with(daemon.endpoint(), config)
        .await
        .unwrap();
    state.unavailable.store(3, Ordering::SeqCst);
    let r = client
        .reserve(Namespace::Primary, Kind::Vid, 10)
        .await
        .unwrap();
    assert_eq!(r.len(), 10);

    // Unavailable for longer than the deadline: the caller learns why.
    state.unavailable.store(u64::MAX, Ordering::SeqCst);
    let e = client
        .reserve(Namespace::Primary, Kind::Vid, 10)
        .await
        .unwrap_err();
    match e {
        ClientError::DeadlineExceeded {
            last_error: Some(last),
            ..
        } => assert!(last.contains("unavailable"), "{last}"),
        other => panic!("expected DeadlineExceeded, got {other}"),
    }
}

#[tokio::test]
async fn deadline_bounds_a_slow_call() {
    let dir = tempfile::tempdir().unwrap();
    let state: Arc<State> = Arc::default();
    let daemon = FakeDaemon::start(&dir.path().join("d.sock"), state.clone()).await;
    let config = ClientConfig::default().with_deadline(Duration::from_millis(200));
    let client = Client::connect_with(daemon.endpoint(), config)
        .await
        .unwrap();
    state.delay_ms.store(3000, Ordering::SeqCst);
    let started = Instant::now();
    let e = client
        .reserve(Namespace::Primary, Kind::Vid, 1)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::DeadlineExceeded { .. }), "{e}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn connect_errors_name_the_endpoint_and_reconnect_gives_up_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.sock");
    let e = Client::connect(format!("unix:{}", path.display()))
        .await
        .err()
        .unwrap();
    match &e {
        ClientError::Connect { endpoint, source } => {
            assert!(endpoint.ends_with("missing.sock"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected Connect, got {other}"),
    }
    assert!(matches!(
        Client::connect("bogus:x").await,
        Err(ClientError::Endpoint(_))
    ));

    // Connected, then the daemon goes away for good: calls fail at the deadline.
    let daemon = FakeDaemon::start(&dir.path().join("d.sock"), Arc::default()).await;
    let config = ClientConfig::default().with_deadline(Duration::from_millis(300));
    let client = Client::connect_with(daemon.endpoint(), config)
        .await
        .unwrap();
    daemon.kill().await;
    let started = Instant::now();
    let e = client.hwm(Namespace::Primary).await.unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Connect { .. } | ClientError::DeadlineExceeded { .. }
        ),
        "{e}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn list_forks_reads_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::start(&dir.path().join("d.sock"), Arc::default()).await;
    let config = ClientConfig::default().with_list_page_size(10);
    let client = Client::connect_with(daemon.endpoint(), config)
        .await
        .unwrap();
    let mut made = Vec::new();
    for _ in 0..25 {
        let fork = ForkId::generate().to_string();
        let req = BootstrapRequest {
            fork: fork.clone(),
            parent: None,
            vid_floor: 0,
            eid_floor: 0,
            request_id: None,
        };
        assert!(client.bootstrap_fork(req.clone()).await.unwrap().created);
        // Idempotent: a second bootstrap creates nothing.
        assert!(!client.bootstrap_fork(req).await.unwrap().created);
        made.push(fork);
    }
    let listed: Vec<String> = client
        .list_forks()
        .await
        .unwrap()
        .into_iter()
        .map(|f| f.fork)
        .collect();
    made.sort_by_key(|f| ForkId::parse(f).unwrap().value());
    assert_eq!(listed, made);
    let status = client.status().await.unwrap();
    assert_eq!(status.namespaces_total, 26);
}
