//! The wire is frozen: the bincode 1.x encoding of every request and reply of
//! protocol 1, byte for byte, as an older client or daemon decodes it.
//!
//! bincode 1.x is positional: a struct is its fields in order with no names or
//! lengths, an enum is its variant index and then its fields. A field added
//! to `Status` (even at the end, even with `#[serde(default)]`) shifts nothing an
//! old decoder reads before it but leaves bytes it does not expect, and a field
//! added in the middle misreads everything after it. So the rule (README
//! "Compatibility", `protocol` module docs) is: the encoding of an existing
//! message never changes; new information travels in a new RPC, appended at the
//! end of the `IdAlloc` trait (every existing method keeps its variant index);
//! a new variant of a shared enum (`ServiceError`, ...) is appended, and only a
//! newer RPC may send it. This test is that rule's tripwire: each expected
//! encoding below is written out field by field from the layout above, not
//! captured from the code, so any change to a message's shape fails here.

use std::pin::Pin;

use idalloc_client::protocol::*;
use idalloc_client::{Kind, ServiceError};
use serde::{Deserialize, Serialize};
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_serde::{Deserializer, Serializer};

const FORK: &str = "0190b6f2-7c1e-7a4b-9c3d-5e6f70819203";

/// What the connection writes: tokio-serde's bincode codec (tarpc's transport).
fn encode<T: Serialize + for<'de> Deserialize<'de> + Unpin>(value: &T) -> Vec<u8> {
    Pin::new(&mut Bincode::<T, T>::default())
        .serialize(value)
        .unwrap()
        .to_vec()
}

fn decode<T: Serialize + for<'de> Deserialize<'de> + Unpin>(bytes: &[u8]) -> T {
    Pin::new(&mut Bincode::<T, T>::default())
        .deserialize(&bytes::BytesMut::from(bytes))
        .unwrap()
}

/// bincode 1.x's layout as tokio-serde's codec configures it
/// (`bincode::DefaultOptions`), spelled out: integers, lengths and variant
/// indices as varints (below 251 one byte; else a marker byte 251/252/253/254
/// and the value as a little-endian u16/u32/u64/u128), a `u8` 0/1 for a bool
/// and for `Option`'s tag.
#[derive(Default)]
struct Wire(Vec<u8>);

impl Wire {
    fn varint(mut self, v: u128) -> Self {
        if v < 251 {
            self.0.push(v as u8);
        } else if v <= u16::MAX as u128 {
            self.0.push(251);
            self.0.extend((v as u16).to_le_bytes());
        } else if v <= u32::MAX as u128 {
            self.0.push(252);
            self.0.extend((v as u32).to_le_bytes());
        } else if v <= u64::MAX as u128 {
            self.0.push(253);
            self.0.extend((v as u64).to_le_bytes());
        } else {
            self.0.push(254);
            self.0.extend(v.to_le_bytes());
        }
        self
    }
    fn variant(self, index: u32) -> Self {
        self.varint(index.into())
    }
    fn u32(self, v: u32) -> Self {
        self.varint(v.into())
    }
    fn u64(self, v: u64) -> Self {
        self.varint(v.into())
    }
    fn u128(self, v: u128) -> Self {
        self.varint(v)
    }
    fn bool(mut self, v: bool) -> Self {
        self.0.push(v as u8);
        self
    }
    fn none(mut self) -> Self {
        self.0.push(0);
        self
    }
    fn some(mut self) -> Self {
        self.0.push(1);
        self
    }
    fn len(self, n: u64) -> Self {
        self.u64(n)
    }
    fn str(self, s: &str) -> Self {
        let mut w = self.len(s.len() as u64);
        w.0.extend(s.as_bytes());
        w
    }
    fn some_str(self, s: &str) -> Self {
        self.some().str(s)
    }
    fn some_u64(self, v: u64) -> Self {
        self.some().u64(v)
    }
}

/// `value` encodes to exactly `expected`, and `expected` decodes to a value
/// that encodes the same (the generated request and reply enums have no
/// `PartialEq`; the round trip through the bytes says the same).
fn frozen<T>(value: T, expected: Wire)
where
    T: Serialize + for<'de> Deserialize<'de> + std::fmt::Debug + Unpin,
{
    let got = encode(&value);
    assert_eq!(
        got, expected.0,
        "the encoding of {value:?} changed: that breaks every client and daemon of protocol 1 (see this file's docs)"
    );
    assert_eq!(encode(&decode::<T>(&expected.0)), expected.0);
}

// The RPCs' variant indices: the order of the methods in the `IdAlloc` trait.
const RESERVE: u32 = 0;
const HWM: u32 = 1;
const BOOTSTRAP_FORK: u32 = 2;
const LIST_FORKS: u32 = 3;
const DROP_FORK: u32 = 4;
const CHECKPOINT: u32 = 5;
const STATUS: u32 = 6;
const REPAIR: u32 = 7;
const MERGE_FORK: u32 = 8;
const OK: u32 = 0;
const ERR: u32 = 1;

fn w() -> Wire {
    Wire::default()
}

#[test]
fn requests_are_frozen() {
    frozen(
        IdAllocRequest::Reserve {
            fork: Some(FORK.into()),
            kind: Kind::Eid,
            count: 1000,
        },
        w().variant(RESERVE).some_str(FORK).variant(1).u64(1000),
    );
    frozen(IdAllocRequest::Hwm { fork: None }, w().variant(HWM).none());
    frozen(
        IdAllocRequest::BootstrapFork {
            req: BootstrapRequest {
                fork: FORK.into(),
                parent: None,
                vid_floor: 5,
                eid_floor: 7,
                request_id: Some(u128::MAX - 1),
            },
        },
        w().variant(BOOTSTRAP_FORK)
            .str(FORK)
            .none()
            .u64(5)
            .u64(7)
            .some()
            .u128(u128::MAX - 1),
    );
    frozen(
        IdAllocRequest::ListForks {
            after: Some(FORK.into()),
            limit: 100,
        },
        w().variant(LIST_FORKS).some_str(FORK).u32(100),
    );
    frozen(
        IdAllocRequest::DropFork { fork: FORK.into() },
        w().variant(DROP_FORK).str(FORK),
    );
    frozen(
        IdAllocRequest::Checkpoint { fork: None },
        w().variant(CHECKPOINT).none(),
    );
    frozen(IdAllocRequest::Status {}, w().variant(STATUS));
    frozen(
        IdAllocRequest::Repair {
            req: RepairRequest {
                fork: Some(FORK.into()),
                vid_floor: 1,
                eid_floor: 2,
            },
        },
        w().variant(REPAIR).some_str(FORK).u64(1).u64(2),
    );
    for (into, encoded) in [
        (MergeInto::Parent, w().variant(0)),
        (MergeInto::Primary, w().variant(1)),
        (MergeInto::Fork(FORK.into()), w().variant(2).str(FORK)),
    ] {
        let mut expected = w().variant(MERGE_FORK).str(FORK);
        expected.0.extend(encoded.0);
        frozen(
            IdAllocRequest::MergeFork {
                req: MergeRequest {
                    fork: FORK.into(),
                    into,
                    request_id: None,
                },
            },
            expected.none(),
        );
    }
}

fn fork_info() -> (ForkInfo, Wire) {
    (
        ForkInfo {
            fork: FORK.into(),
            parent: None,
            next_vid: 10,
            next_eid: 20,
            floor_vid: 1,
            floor_eid: 2,
            created: true,
            dropped: false,
            merged_into: Some("primary".into()),
            error: None,
        },
        w().str(FORK)
            .none()
            .u64(10)
            .u64(20)
            .u64(1)
            .u64(2)
            .bool(true)
            .bool(false)
            .some_str("primary")
            .none(),
    )
}

#[test]
fn replies_are_frozen() {
    frozen(
        IdAllocResponse::Reserve(Ok(IdRange { start: 3, end: 9 })),
        w().variant(RESERVE).variant(OK).u64(3).u64(9),
    );
    frozen(
        IdAllocResponse::Hwm(Ok(Hwm {
            fork: Some(FORK.into()),
            next_vid: 4,
            next_eid: 5,
            root_wide: true,
        })),
        w().variant(HWM)
            .variant(OK)
            .some_str(FORK)
            .u64(4)
            .u64(5)
            .bool(true),
    );
    let (info, info_bytes) = fork_info();
    let mut expected = w().variant(BOOTSTRAP_FORK).variant(OK);
    expected.0.extend(&info_bytes.0);
    frozen(IdAllocResponse::BootstrapFork(Ok(info.clone())), expected);

    let mut expected = w().variant(LIST_FORKS).variant(OK).len(1);
    expected.0.extend(&info_bytes.0);
    frozen(
        IdAllocResponse::ListForks(Ok(ForkPage {
            forks: vec![info],
            next_after: None,
        })),
        expected.none(),
    );

    frozen(
        IdAllocResponse::Status(Ok(Status {
            version: "0.1.0".into(),
            uptime_secs: 90_000,
            mode: WriterMode::MultiWriter,
            fork_ids: ForkIds::Tree,
            object_store: "memory://".into(),
            mirror: MirrorHealth {
                healthy: false,
                last_error: Some("timeout".into()),
                last_error_age_ms: Some(5),
                last_success_age_ms: None,
            },
            namespaces_total: 1,
            namespaces: vec![NamespaceStatus {
                fork: None,
                dropped: false,
                merged_into: None,
                counters: vec![CounterStatus {
                    kind: Kind::Vid,
                    granted: 7,
                    lease_start: 0,
                    lease_end: 100,
                    headroom: 93,
                }],
                error: None,
            }],
            warnings: vec!["both tiers on one disk".into()],
        })),
        w().variant(STATUS)
            .variant(OK)
            .str("0.1.0")
            .u64(90_000)
            .variant(1) // MultiWriter
            .variant(1) // Tree
            .str("memory://")
            .bool(false)
            .some_str("timeout")
            .some_u64(5)
            .none()
            .u64(1)
            .len(1)
            .none()
            .bool(false)
            .none()
            .len(1)
            .variant(0) // Vid
            .u64(7)
            .u64(0)
            .u64(100)
            .u64(93)
            .none()
            .len(1)
            .str("both tiers on one disk"),
    );
    frozen(
        IdAllocResponse::Repair(Ok(RepairReport {
            manifest: "id_allocator.json".into(),
            before: "unparsable".into(),
            vid_ceiling: 11,
            eid_ceiling: 12,
            evidence: vec![],
        })),
        w().variant(REPAIR)
            .variant(OK)
            .str("id_allocator.json")
            .str("unparsable")
            .u64(11)
            .u64(12)
            .len(0),
    );
    frozen(
        IdAllocResponse::MergeFork(Ok(MergeReport {
            fork: FORK.into(),
            into: "primary".into(),
            fork_vid_end: 1 << 40,
            fork_eid_end: 2,
            into_vid_ceiling: 3,
            into_eid_ceiling: 4,
            fork_ids: ForkIds::Namespace,
            merged_now: true,
            summary: "merged".into(),
        })),
        w().variant(MERGE_FORK)
            .variant(OK)
            .str(FORK)
            .str("primary")
            .u64(1 << 40)
            .u64(2)
            .u64(3)
            .u64(4)
            .variant(0) // Namespace
            .bool(true)
            .str("merged"),
    );
}

/// Every error variant keeps its index and fields; a new one is appended (and
/// sent only by RPCs newer than it), so an old client never meets an index it
/// does not know.
#[test]
fn errors_are_frozen() {
    let s = || String::from("x");
    let cases = [
        (ServiceError::InvalidArgument(s()), w().variant(0).str("x")),
        (ServiceError::UnknownFork(s()), w().variant(1).str("x")),
        (ServiceError::DroppedFork(s()), w().variant(2).str("x")),
        (ServiceError::Exhausted(s()), w().variant(3).str("x")),
        (
            ServiceError::unavailable("x", 250),
            w().variant(4).str("x").u64(250),
        ),
        (ServiceError::ShuttingDown, w().variant(5)),
        (ServiceError::Internal(s()), w().variant(6).str("x")),
        (ServiceError::BrokenManifest(s()), w().variant(7).str("x")),
        (ServiceError::PermissionDenied(s()), w().variant(8).str("x")),
        (
            ServiceError::MergedFork {
                fork: s(),
                into: "primary".into(),
            },
            w().variant(9).str("x").str("primary"),
        ),
    ];
    for (error, encoded) in cases {
        let mut expected = w().variant(RESERVE).variant(ERR);
        expected.0.extend(encoded.0);
        frozen(IdAllocResponse::Reserve(Err(error)), expected);
    }
}
