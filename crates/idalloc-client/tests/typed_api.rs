//! The typed public API against a stand-in daemon on a unix socket: `ForkId`
//! arguments reach the wire as the fork's text in the form it was written in,
//! `BootstrapRequest`'s builder fills every field, the config setters take
//! effect, and a dropped reservation leaves a gap, never a duplicate.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use idalloc_client::client::AllocatorConfig;
use idalloc_client::protocol::*;
use idalloc_client::{Client, ClientConfig, ForkId, IdForm, Kind, Namespace, ServiceError};
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::Bincode;
use tokio_util::codec::LengthDelimitedCodec;

/// One call the fake saw: its name and its fork argument.
type Call = (&'static str, Option<String>);

/// Hands out consecutive ranges and records every call's fork argument.
#[derive(Clone, Default)]
struct Fake {
    next: Arc<AtomicU64>,
    calls: Arc<Mutex<Vec<Call>>>,
    bootstraps: Arc<Mutex<Vec<BootstrapRequest>>>,
}

impl Fake {
    fn record(&self, op: &'static str, fork: Option<String>) {
        self.calls.lock().unwrap().push((op, fork));
    }
    fn calls(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
    fn hwm_of(&self, fork: Option<String>) -> Hwm {
        Hwm {
            fork,
            next_vid: self.next.load(Ordering::SeqCst),
            next_eid: 0,
            root_wide: true,
        }
    }
}

/// A count the fake takes its range for and then sits on, so that a test can
/// drop the call while the daemon has granted it.
const SLOW_COUNT: u64 = 777;

impl IdAlloc for Fake {
    async fn reserve(
        self,
        _: Context,
        fork: Option<String>,
        _: Kind,
        count: u64,
    ) -> Result<IdRange, ServiceError> {
        self.record("reserve", fork);
        let start = self.next.fetch_add(count, Ordering::SeqCst);
        if count == SLOW_COUNT {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Ok(IdRange {
            start,
            end: start + count,
        })
    }
    async fn hwm(self, _: Context, fork: Option<String>) -> Result<Hwm, ServiceError> {
        self.record("hwm", fork.clone());
        Ok(self.hwm_of(fork))
    }
    async fn bootstrap_fork(
        self,
        _: Context,
        req: BootstrapRequest,
    ) -> Result<ForkInfo, ServiceError> {
        self.bootstraps.lock().unwrap().push(req.clone());
        Ok(ForkInfo {
            fork: req.fork,
            parent: req.parent,
            next_vid: req.vid_floor,
            next_eid: req.eid_floor,
            floor_vid: req.vid_floor,
            floor_eid: req.eid_floor,
            created: true,
            dropped: false,
            merged_into: None,
            error: None,
        })
    }
    async fn list_forks(
        self,
        _: Context,
        _: Option<String>,
        _: u32,
    ) -> Result<ForkPage, ServiceError> {
        Ok(ForkPage {
            forks: vec![],
            next_after: None,
        })
    }
    async fn drop_fork(self, _: Context, f: String) -> Result<ForkInfo, ServiceError> {
        Err(ServiceError::UnknownFork(f))
    }
    async fn checkpoint(self, _: Context, fork: Option<String>) -> Result<Hwm, ServiceError> {
        self.record("checkpoint", fork.clone());
        Ok(self.hwm_of(fork))
    }
    async fn status(self, _: Context) -> Result<Status, ServiceError> {
        Err(ServiceError::Internal("not in the fake".into()))
    }
    async fn repair(self, _: Context, _: RepairRequest) -> Result<RepairReport, ServiceError> {
        Err(ServiceError::Internal("not in the fake".into()))
    }
    async fn merge_fork(self, _: Context, req: MergeRequest) -> Result<MergeReport, ServiceError> {
        self.record("merge_fork", Some(req.fork.clone()));
        Ok(MergeReport {
            fork: req.fork,
            into: "primary".into(),
            fork_vid_end: 0,
            fork_eid_end: 0,
            into_vid_ceiling: 0,
            into_eid_ceiling: 0,
            fork_ids: ForkIds::Namespace,
            merged_now: true,
            summary: String::new(),
        })
    }
}

fn start(dir: &Path, fake: Fake) -> String {
    let path = dir.join("fake.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let fake = fake.clone();
            tokio::spawn(async move {
                let framed = LengthDelimitedCodec::builder().new_framed(stream);
                let transport = tarpc::serde_transport::new(framed, Bincode::default());
                BaseChannel::with_defaults(transport)
                    .execute(fake.serve())
                    .for_each_concurrent(None, |r| r)
                    .await;
            });
        }
    });
    format!("unix:{}", path.display())
}

const ULID: &str = "01J2VF4Z0Y8Q3R5S7T9V1W3X5Z";
const UUID: &str = "0190b6f2-7c1e-7a4b-9c3d-5e6f70819203";

#[tokio::test]
async fn fork_ids_reach_the_wire_in_the_form_they_were_written_in() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let endpoint = start(dir.path(), fake.clone());
    let client = Client::connect(&endpoint).await.unwrap();

    let ulid = ForkId::parse(ULID).unwrap();
    let uuid = ForkId::parse(UUID).unwrap();
    assert_eq!(ulid.form(), IdForm::Ulid);

    let config = AllocatorConfig::default()
        .with_initial_batch(10)
        .with_min_batch(10)
        .with_max_batch(10);
    let in_fork = client.allocator_with(ulid, config.clone());
    in_fork.allocate_vid().await.unwrap();
    let primary = client.allocator_with(Namespace::Primary, config);
    primary.allocate_eid().await.unwrap();
    in_fork.current_hwm().await.unwrap();
    in_fork.checkpoint().await.unwrap();
    client.reserve(uuid, Kind::Vid, 3).await.unwrap();
    client.hwm(None::<ForkId>).await.unwrap();
    client.checkpoint(Some(uuid)).await.unwrap();
    client.merge_fork(ulid, MergeInto::Primary).await.unwrap();
    // Text parsed into a namespace: the same call on the wire.
    client
        .hwm(Namespace::from_wire(Some(ULID)).unwrap())
        .await
        .unwrap();

    let mut calls = fake.calls();
    // Background prefetches may add reservations; keep the first of each.
    calls.dedup();
    let ulid_text = Some(ULID.to_string());
    let uuid_text = Some(UUID.to_string());
    for expected in [
        ("reserve", ulid_text.clone()),
        ("reserve", None),
        ("hwm", ulid_text.clone()),
        ("checkpoint", ulid_text.clone()),
        ("reserve", uuid_text.clone()),
        ("hwm", None),
        ("checkpoint", uuid_text.clone()),
        ("merge_fork", ulid_text.clone()),
    ] {
        assert!(calls.contains(&expected), "{expected:?} not in {calls:?}");
    }
    assert_eq!(calls.last(), Some(&("hwm", ulid_text)));
}

#[tokio::test]
async fn bootstrap_request_builder_fills_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let endpoint = start(dir.path(), fake.clone());
    let client = Client::connect(&endpoint).await.unwrap();

    let fork = ForkId::parse(ULID).unwrap();
    let parent = ForkId::parse(UUID).unwrap();
    let plain = BootstrapRequest::new(fork);
    assert_eq!(
        plain,
        BootstrapRequest {
            fork: ULID.into(),
            parent: None,
            vid_floor: 0,
            eid_floor: 0,
            request_id: None,
        }
    );
    let info = client
        .bootstrap_fork(plain.with_parent(Some(parent)).with_floors(5, 7))
        .await
        .unwrap();
    assert_eq!(info.fork, ULID);
    assert_eq!(info.parent.as_deref(), Some(UUID));
    assert_eq!((info.floor_vid, info.floor_eid), (5, 7));
    let sent = fake.bootstraps.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0].request_id.is_some(),
        "the client picks a request id"
    );
}

#[tokio::test]
async fn config_setters_take_effect() {
    let config = ClientConfig::default()
        .with_deadline(Duration::from_millis(1500))
        .with_backoff_initial(Duration::from_millis(1))
        .with_backoff_max(Duration::from_millis(50))
        .with_max_frame_length(1 << 20)
        .with_list_page_size(7);
    assert_eq!(config.deadline, Duration::from_millis(1500));
    assert_eq!(config.backoff_initial, Duration::from_millis(1));
    assert_eq!(config.backoff_max, Duration::from_millis(50));
    assert_eq!(config.max_frame_length, 1 << 20);
    assert_eq!(config.list_page_size, 7);

    let a = AllocatorConfig::default()
        .with_initial_batch(64)
        .with_min_batch(8)
        .with_max_batch(4096)
        .with_grow_below(Duration::from_millis(10))
        .with_shrink_above(Duration::from_secs(1));
    assert_eq!((a.initial_batch, a.min_batch, a.max_batch), (64, 8, 4096));
    assert_eq!(a.grow_below, Duration::from_millis(10));
    assert_eq!(a.shrink_above, Duration::from_secs(1));

    let dir = tempfile::tempdir().unwrap();
    let endpoint = start(dir.path(), Fake::default());
    let client = Client::connect_with(&endpoint, config).await.unwrap();
    assert_eq!(client.config().deadline, Duration::from_millis(1500));
}

/// The crate doc's promise: a reservation dropped after the daemon granted it is a
/// gap; the next call gets a new range above it, never the dropped one's ids.
#[tokio::test]
async fn a_dropped_reservation_is_a_gap_never_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::default();
    let endpoint = start(dir.path(), fake.clone());
    let client = Client::connect(&endpoint).await.unwrap();

    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        client.reserve(Namespace::Primary, Kind::Vid, SLOW_COUNT),
    )
    .await;
    assert!(
        dropped.is_err(),
        "the slow reservation must still be in flight"
    );
    assert_eq!(fake.next.load(Ordering::SeqCst), SLOW_COUNT, "granted");

    let next = client
        .reserve(Namespace::Primary, Kind::Vid, 10)
        .await
        .unwrap();
    assert_eq!(
        next,
        IdRange {
            start: SLOW_COUNT,
            end: SLOW_COUNT + 10
        }
    );
}
