//! The wire contract between `idallocd` and its clients: the tarpc service trait and
//! the types it carries (bincode 1.x frames, through tarpc's serde transport).
//!
//! Both the server and the client library import this module, so a change here is
//! a protocol change. bincode is positional, so the rule (README "Compatibility",
//! checked byte for byte by tests/wire_compat.rs) is: the encoding of an existing
//! message never changes; new information goes in a new RPC appended at the end
//! of [`IdAlloc`]; a new variant of a shared enum is appended and sent only by
//! RPCs newer than it. Fork ids travel as text and are parsed by the daemon, so a
//! malformed id gets its own `InvalidArgument` error rather than a decode failure.

use serde::{Deserialize, Serialize};

use crate::error::ServiceError;
use crate::fork_id::ForkId;
use crate::namespace::Kind;

/// A half-open range of ids, `[start, end)`, granted to exactly one caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdRange {
    /// First id of the range.
    pub start: u64,
    /// One past the last id of the range.
    pub end: u64,
}

impl IdRange {
    /// Number of ids in the range.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the range holds no id.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// The high-water marks of one namespace: the next id each counter would hand out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hwm {
    /// `None` for the primary, else the fork id's text.
    pub fork: Option<String>,
    /// The next vertex id this daemon would grant.
    pub next_vid: u64,
    /// The next edge id this daemon would grant.
    pub next_eid: u64,
    /// True when this daemon is the root's only writer (single-writer mode), so its
    /// next ids are the root's. False in multi-writer mode: other daemons grant
    /// from their own leases, and the root's bound is the manifest's ceiling.
    pub root_wide: bool,
}

/// Arguments of `bootstrap_fork`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapRequest {
    /// The fork to create (UUID or ULID text).
    pub fork: String,
    /// The parent fork; `None` means the primary.
    pub parent: Option<String>,
    /// The caller's floor for vertex ids (the fork starts at or above it).
    pub vid_floor: u64,
    /// The caller's floor for edge ids.
    pub eid_floor: u64,
    /// Identifies one logical bootstrap across its retries, so that a create that
    /// landed but whose reply was lost still tells this caller `created: true`.
    /// `None`: the client library picks one per call (retries included).
    pub request_id: Option<u128>,
}

impl BootstrapRequest {
    /// Bootstrap `fork` under the primary, with floors of 0 (the fork starts at the
    /// parent's high-water mark) and a `request_id` chosen by the client library.
    /// The fork is named in the text form `fork` was written in, which names its
    /// object-store path if this call creates it.
    pub fn new(fork: ForkId) -> Self {
        BootstrapRequest {
            fork: fork.text(),
            parent: None,
            vid_floor: 0,
            eid_floor: 0,
            request_id: None,
        }
    }

    /// This request with the parent fork set (`None`: the primary).
    #[must_use]
    pub fn with_parent(self, parent: Option<ForkId>) -> Self {
        BootstrapRequest {
            parent: parent.map(|p| p.text()),
            ..self
        }
    }

    /// This request with the caller's floors: the fork starts at or above them.
    #[must_use]
    pub fn with_floors(self, vid_floor: u64, eid_floor: u64) -> Self {
        BootstrapRequest {
            vid_floor,
            eid_floor,
            ..self
        }
    }
}

/// What the daemon knows of one fork.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkInfo {
    /// The fork id, in the text form it was first bootstrapped with.
    pub fork: String,
    /// The parent fork's id text, `None` for the primary (or unknown when adopted).
    pub parent: Option<String>,
    /// The next vertex id this daemon would grant in the fork.
    pub next_vid: u64,
    /// The next edge id this daemon would grant in the fork.
    pub next_eid: u64,
    /// The vertex-id floor the fork was created with.
    pub floor_vid: u64,
    /// The edge-id floor the fork was created with.
    pub floor_eid: u64,
    /// True only in the reply to the bootstrap call that created the fork.
    pub created: bool,
    /// True once the fork has been dropped (a tombstone).
    pub dropped: bool,
    /// Set once the fork has been merged (a tombstone): the namespace it was merged
    /// into, a fork id's text or `"primary"`.
    pub merged_into: Option<String>,
    /// Set when the fork could not be verified against the object store (its
    /// manifest is broken, or the store is unreachable): the numbers above are
    /// then not reported (zero) and this says why.
    pub error: Option<String>,
}

/// One page of `list_forks`, ordered by fork id value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkPage {
    /// The forks on this page.
    pub forks: Vec<ForkInfo>,
    /// Pass this as `after` to get the next page; `None` on the last page.
    pub next_after: Option<String>,
}

/// Whether other daemons may share the object-store root.
///
/// Spelled as the text output does (`"single-writer"`) in JSON; bincode encodes
/// the variant index, so the spelling is not part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriterMode {
    /// The store has no conditional update (`file://`): one daemon per root.
    SingleWriter,
    /// Leases are taken by conditional update: several daemons may share the root.
    MultiWriter,
}

impl std::fmt::Display for WriterMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WriterMode::SingleWriter => "single-writer",
            WriterMode::MultiWriter => "multi-writer",
        })
    }
}

/// How a root counts the ids of its forks (`[allocation] fork_ids`).
///
/// Spelled `"namespace"` / `"tree"` in the config and in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForkIds {
    /// Every namespace counts on its own (the reference design): a fork starts
    /// above its parent's high-water mark, and the parent keeps counting from its
    /// own, so after the fork point both may hand out the same ids.
    #[default]
    Namespace,
    /// Every namespace of the root takes its leases from one sequence per kind
    /// (the primary's manifest): an id is unique across the whole fork tree, so
    /// a fork merges back without remapping.
    Tree,
}

impl std::fmt::Display for ForkIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForkIds::Namespace => "namespace",
            ForkIds::Tree => "tree",
        })
    }
}

/// Where `merge_fork` merges a fork.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MergeInto {
    /// The fork's parent (the primary, or the fork it was bootstrapped from).
    Parent,
    /// The primary (an ancestor of every fork).
    Primary,
    /// An ancestor fork, by id text (either spelling).
    Fork(String),
}

/// Arguments of `merge_fork`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRequest {
    /// The fork whose data the database merged (either spelling).
    pub fork: String,
    /// The namespace it was merged into: the fork's parent or another ancestor.
    pub into: MergeInto,
    /// Identifies one logical merge across its retries, so that the call whose
    /// tombstone landed but whose reply was lost is still told `merged_now: true`.
    /// `None`: the client library picks one per call (retries included).
    pub request_id: Option<u128>,
}

/// What `merge_fork` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeReport {
    /// The merged fork, in the text form its manifest lives under.
    pub fork: String,
    /// The namespace it was merged into: a fork id's text or `"primary"`.
    pub into: String,
    /// Every vertex id the fork ever granted is below this (its final ceiling).
    pub fork_vid_end: u64,
    /// Every edge id the fork ever granted is below this.
    pub fork_eid_end: u64,
    /// The target's vertex-id ceiling afterwards: at or above `fork_vid_end`.
    pub into_vid_ceiling: u64,
    /// The target's edge-id ceiling afterwards: at or above `fork_eid_end`.
    pub into_eid_ceiling: u64,
    /// How the root counts fork ids. In tree mode the target's ids were already
    /// disjoint from the fork's, and nothing had to be raised.
    pub fork_ids: ForkIds,
    /// False when the fork had already been merged into this target (an earlier
    /// call, here or on another daemon): nothing changed.
    pub merged_now: bool,
    /// One sentence on what was done, for people.
    pub summary: String,
}

/// One counter's state in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterStatus {
    /// Which counter.
    pub kind: Kind,
    /// The next id this daemon would grant.
    pub granted: u64,
    /// Start of the lease this daemon owns.
    pub lease_start: u64,
    /// End (exclusive) of the lease this daemon owns, including a prefetched one.
    pub lease_end: u64,
    /// Ids left in the lease before the object store must be written again.
    pub headroom: u64,
}

/// One namespace's state in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceStatus {
    /// `None` for the primary, else the fork id's text.
    pub fork: Option<String>,
    /// Whether the fork was dropped.
    pub dropped: bool,
    /// Where the fork was merged (a fork id's text or `"primary"`), once it was.
    pub merged_into: Option<String>,
    /// The vid and eid counters (empty when `error` is set).
    pub counters: Vec<CounterStatus>,
    /// Why the namespace could not be verified against the object store; its
    /// counters are not reported until it is.
    pub error: Option<String>,
}

/// Health of the object-store mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorHealth {
    /// False while the last object-store call failed.
    pub healthy: bool,
    /// The last object-store error, if any since start.
    pub last_error: Option<String>,
    /// Milliseconds since that error.
    pub last_error_age_ms: Option<u64>,
    /// Milliseconds since the last successful object-store call.
    pub last_success_age_ms: Option<u64>,
}

/// The reply to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The daemon's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Single- or multi-writer mode.
    pub mode: WriterMode,
    /// How the root counts fork ids: per namespace, or one sequence for the tree.
    pub fork_ids: ForkIds,
    /// The object-store URL, with credentials removed.
    pub object_store: String,
    /// Health of the object-store mirror.
    pub mirror: MirrorHealth,
    /// Number of namespaces (primary + forks, dropped included).
    pub namespaces_total: u64,
    /// The primary and up to the first 100 forks.
    pub namespaces: Vec<NamespaceStatus>,
    /// Conditions an operator should fix (for example, both tiers on one disk).
    pub warnings: Vec<String>,
}

/// Arguments of `repair`: the operator's explicit floor for a namespace whose
/// manifest is broken (or that they want raised).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairRequest {
    /// `None` for the primary, else the fork id (either spelling).
    pub fork: Option<String>,
    /// The vertex-id floor: above the highest vertex id the database holds.
    pub vid_floor: u64,
    /// The edge-id floor: above the highest edge id the database holds.
    pub eid_floor: u64,
}

/// What `repair` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReport {
    /// The manifest written.
    pub manifest: String,
    /// What was there before: its ceilings, or why it could not be read.
    pub before: String,
    /// The ceilings written: the highest of the floor given, the manifest (if it
    /// parsed), the fork's other spelling, and this daemon's local state.
    pub vid_ceiling: u64,
    /// See `vid_ceiling`.
    pub eid_ceiling: u64,
    /// The evidence behind each ceiling, in words.
    pub evidence: Vec<String>,
}

/// The allocation service. Every method returns a typed [`ServiceError`].
#[tarpc::service]
pub trait IdAlloc {
    /// Reserve `count` consecutive ids of `kind` in the primary (`fork = None`) or a fork.
    async fn reserve(fork: Option<String>, kind: Kind, count: u64)
        -> Result<IdRange, ServiceError>;
    /// The next ids this daemon would grant in a namespace (verified against the
    /// store first). In multi-writer mode other daemons grant from their own
    /// leases, so this is this daemon's next id, not the whole root's.
    async fn hwm(fork: Option<String>) -> Result<Hwm, ServiceError>;
    /// Create a fork above its parent's high-water mark, or return the existing one.
    async fn bootstrap_fork(req: BootstrapRequest) -> Result<ForkInfo, ServiceError>;
    /// List forks in id order, `limit` at a time, starting after `after`.
    async fn list_forks(after: Option<String>, limit: u32) -> Result<ForkPage, ServiceError>;
    /// Drop a fork: a tombstone; its ids are never handed out again.
    async fn drop_fork(fork: String) -> Result<ForkInfo, ServiceError>;
    /// Give back the unused part of this daemon's own leases (DESIGN rule 9: only
    /// ids in its own leases that were never granted; admin role).
    async fn checkpoint(fork: Option<String>) -> Result<Hwm, ServiceError>;
    /// Version, mode, mirror health and per-namespace counters.
    async fn status() -> Result<Status, ServiceError>;
    /// Write a namespace's manifest from an explicit floor, only upward from every
    /// other evidence (the way out of a broken manifest; never a reset).
    async fn repair(req: RepairRequest) -> Result<RepairReport, ServiceError>;
    /// The database merged a fork's data into an ancestor: raise the ancestor above
    /// every id the fork granted (already true in tree mode) and tombstone the fork
    /// as merged (admin role). Idempotent.
    async fn merge_fork(req: MergeRequest) -> Result<MergeReport, ServiceError>;
}
