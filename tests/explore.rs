//! Model-based exploration: random histories of several engines (daemons) sharing
//! one multi-writer object store, checked after every step against a model of the
//! contract (DESIGN.md invariants 1, 3, 4, 6 and the hwm).
//!
//! Each case has 2–3 engines, each with its own data directory and its own boot-id
//! file (its own host), on ONE `InMemory` store. Every engine reaches the store
//! through its own `FaultyStore` (store faults per host) over a shared wrapper that
//! yields to the scheduler a random number of times before each call, so that
//! concurrent calls interleave at every store round trip. Leases are tiny (10 ids,
//! prefetch at half), so lease boundaries, prefetches and jumps happen all the time.
//!
//! Steps: reserve (primary or a fork, either kind, either spelling), concurrent
//! reservations on two engines, waiting for the background prefetch, checkpoint,
//! clean restart, kill -9, data-directory wipe, reboot (crash, `sled/` rolled back
//! to a copy taken after an earlier clean shutdown, the `unclean` mark file kept as
//! it is, a new boot id), fork bootstrap under either spelling with or without a
//! parent fork, concurrent bootstraps of one fork through two engines under two
//! spellings, fork drop, fork merge into the parent, a manifest truncated behind
//! every engine's back and then repaired as the error advises (floors one above
//! every id acknowledged in it), store faults queued on one engine's next gets, puts or
//! lists (a put that lands and then reports an error, a failure, a stall shorter
//! or longer than the store time-out). A case runs on a current-thread runtime (3
//! in 4) or a two-worker multi-thread one.
//!
//! The ledger holds every ACKNOWLEDGED range. Checked after every step:
//! - `disjoint`: no id in two ranges, per namespace (128-bit value) and kind, across
//!   all engines and lives;
//! - `order`: one engine's successive ranges in one namespace and kind increase
//!   within a life, and across lives while its data directory stayed intact and
//!   trusted (clean restart, crash in the same boot);
//! - `fork-floor`: a fork's ids are at or above the floor its creator asked for and
//!   every id the parent had granted before that bootstrap;
//! - `floors-agree`: every successful bootstrap reply of one fork names one floor;
//! - `creators`: across all bootstrap calls of one 128-bit value, `created: true`
//!   at most once, and exactly once if the fork exists, unless some bootstrap
//!   request gave up (its last attempt failed, so it may be the one whose create
//!   landed). A request is retried like a client would, on retryable errors;
//! - `merged`: an engine that merged a fork never grants in it again;
//! - `hwm`: `Engine::hwm` (and checkpoint's reply) never below what that engine
//!   granted in that namespace (over all its lives).
//!
//! Errors of operations are fine; only acknowledged ranges count.
//!
//! Run: `cargo test --test tests explore::` (200 cases of 40 steps). Environment:
//! - `IDALLOC_EXPLORE_CASES=N`: number of cases (long mode: thousands);
//! - `IDALLOC_EXPLORE_SEED=S`: run (and on failure shrink) only the case of seed S;
//!   with `IDALLOC_EXPLORE_KEEP=i,j,k` only those steps of it (a shrunk history);
//! - `IDALLOC_EXPLORE_BASE=B`: base of the case seeds (default fixed);
//! - `IDALLOC_EXPLORE_STEPS=N`: steps per case (default 40);
//! - `IDALLOC_EXPLORE_WITHOUT=reboot,wipe,...`: step kinds not to generate, of
//!   reserve, reserve-pair, wait, checkpoint, restart, crash, wipe, reboot,
//!   bootstrap, bootstrap-pair, drop, fault, clear, merge, corrupt-repair;
//! - `IDALLOC_EXPLORE_FORK_IDS=tree|namespace`: every case in that mode (default:
//!   one case in three in tree mode, where `disjoint` spans all namespaces and a
//!   fork's floor is everything any namespace granted before its bootstrap);
//! - `IDALLOC_EXPLORE_LEASE_GROWTH=on|off`: every case with leases growing while
//!   they run out fast (`lease_min_life = "1s"`, up to 16x) or never (default:
//!   half the cases each way);
//! - `IDALLOC_EXPLORE_FAULT_OPS=get,list` (of get, put, list): the calls fault
//!   steps aim at (all three by default);
//! - `IDALLOC_EXPLORE_FAILURES=N`: failing cases to collect before stopping (1);
//! - `IDALLOC_EXPLORE_THREADS=N`: cases run in parallel (6: a case mostly waits);
//! - `IDALLOC_EXPLORE_SHRINK=0`: report failures unshrunk;
//! - `IDALLOC_EXPLORE_VERBOSE=1`: print every case's history.
//!
//! A failing case is shrunk (delta debugging over its steps, keeping the failing
//! check) and printed with each step's outcome and the commands that replay the
//! case and its shrunk history.
//!
//! Also here: deterministic regression tests of known bugs, named after them.

use crate::common;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::faults::{Fault, FaultControl, FaultyStore, Op as FaultOp};
use common::{crash, open, Env};
use futures::stream::BoxStream;
use futures::StreamExt;
use idalloc::engine::{Engine, EngineConfig, FloorAuthority, StoreHandle};
use idalloc_client::protocol::{ForkIds, ForkInfo, IdRange, MergeInto, WriterMode};
use idalloc_client::{ForkId, IdForm, Kind, Namespace, ServiceError};
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LEASE: u64 = 10;
const FORKS: usize = 3;
const NAMES: [char; 3] = ['A', 'B', 'C'];

// ---------------------------------------------------------------------------------
// A store wrapper of the test's own: yields before calls (interleaving), and faults
// aimed at conditional creates only.
// ---------------------------------------------------------------------------------

/// What happens to the next `PutMode::Create` put.
#[derive(Debug, Clone, Copy)]
enum CreateFault {
    /// The create is performed; if it landed, the reply is an error anyway.
    LandThenFail,
    /// An error, the store untouched.
    Fail,
}

enum Yields {
    None,
    Fixed(usize),
    Random(Box<StdRng>),
}

struct TestStore {
    inner: Arc<dyn ObjectStore>,
    yields: Mutex<Yields>,
    create_faults: Mutex<VecDeque<CreateFault>>,
    creates_landed_then_failed: AtomicUsize,
}

impl TestStore {
    fn new(inner: Arc<dyn ObjectStore>, yields: Yields) -> Arc<TestStore> {
        Arc::new(TestStore {
            inner,
            yields: Mutex::new(yields),
            create_faults: Mutex::new(VecDeque::new()),
            creates_landed_then_failed: AtomicUsize::new(0),
        })
    }

    /// Restart the random yields from `seed` (each step of a history gets its own
    /// stream, so that dropping other steps while shrinking leaves it as it was).
    fn reseed(&self, seed: u64) {
        if let Yields::Random(rng) = &mut *self.yields.lock().unwrap() {
            **rng = StdRng::seed_from_u64(seed);
        }
    }

    fn yield_count(&self) -> usize {
        match &mut *self.yields.lock().unwrap() {
            Yields::None => 0,
            Yields::Fixed(n) => *n,
            Yields::Random(rng) => rng.gen_range(0..=2),
        }
    }

    async fn pause(&self) {
        for _ in 0..self.yield_count() {
            tokio::task::yield_now().await;
        }
    }
}

fn test_store_error(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "explore",
        source: format!("injected fault on {what}").into(),
    }
}

impl fmt::Display for TestStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TestStore({})", self.inner)
    }
}

impl fmt::Debug for TestStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TestStore({:?})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for TestStore {
    async fn put_opts(
        &self,
        location: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.pause().await;
        if matches!(opts.mode, PutMode::Create) {
            let fault = self.create_faults.lock().unwrap().pop_front();
            match fault {
                Some(CreateFault::Fail) => return Err(test_store_error("create")),
                Some(CreateFault::LandThenFail) => {
                    self.inner.put_opts(location, payload, opts).await?;
                    self.creates_landed_then_failed
                        .fetch_add(1, Ordering::SeqCst);
                    return Err(test_store_error("create (after it landed)"));
                }
                None => {}
            }
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.pause().await;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let n = self.yield_count();
        let inner = self.inner.list(prefix);
        futures::stream::once(async move {
            for _ in 0..n {
                tokio::task::yield_now().await;
            }
        })
        .flat_map(|_| futures::stream::empty())
        .chain(inner)
        .boxed()
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjPath>,
    ) -> object_store::Result<ListResult> {
        self.pause().await;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjPath,
        to: &ObjPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

// ---------------------------------------------------------------------------------
// Helpers shared by the explorer and the regression tests.
// ---------------------------------------------------------------------------------

/// The fork of 128-bit `value`, spelled in `form` (parsed from its text, as a
/// client's request would be).
fn spell(value: u128, form: IdForm) -> ForkId {
    let uuid = ForkId::parse(&uuid::Uuid::from_u128(value).hyphenated().to_string())
        .expect("a hyphenated UUID parses");
    match form {
        IdForm::Uuid => uuid,
        IdForm::Ulid => {
            let ulid = ForkId::parse(&uuid.with_form(IdForm::Ulid).text()).expect("ULID parses");
            assert_eq!(ulid.form(), IdForm::Ulid);
            ulid
        }
    }
}

fn other_form(f: IdForm) -> IdForm {
    match f {
        IdForm::Uuid => IdForm::Ulid,
        IdForm::Ulid => IdForm::Uuid,
    }
}

fn form_str(f: IdForm) -> &'static str {
    match f {
        IdForm::Uuid => "uuid",
        IdForm::Ulid => "ulid",
    }
}

fn handle(store: Arc<dyn ObjectStore>) -> StoreHandle {
    StoreHandle::custom(store, WriterMode::MultiWriter, "memory://explore")
}

fn error_kind(e: &ServiceError) -> &'static str {
    match e {
        ServiceError::InvalidArgument(_) => "InvalidArgument",
        ServiceError::UnknownFork(_) => "UnknownFork",
        ServiceError::DroppedFork(_) => "DroppedFork",
        ServiceError::Exhausted(_) => "Exhausted",
        ServiceError::Unavailable { .. } => "Unavailable",
        ServiceError::ShuttingDown => "ShuttingDown",
        ServiceError::Internal(_) => "Internal",
        ServiceError::MergedFork { .. } => "MergedFork",
        _ => "Other",
    }
}

fn short_err(e: &ServiceError) -> String {
    let kind = error_kind(e);
    let mut s = e.to_string();
    if s.len() > 110 {
        let mut cut = 110;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    format!("error {kind}: {s}")
}

/// Wait until the manifest at `path` has a `kind` ceiling of at least `at`.
async fn wait_for_ceiling(store: &Arc<dyn ObjectStore>, path: &str, kind: Kind, at: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = common::ceilings(store, path)
            .await
            .map(|(v, e)| if kind == Kind::Vid { v } else { e })
            .unwrap_or(0);
        if c >= at || Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A copy of a live data directory, or an error if anything in it could not be
/// copied (a snapshot is then not taken).
fn try_copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            try_copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Histories.
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NsSel {
    Primary,
    Fork(usize, IdForm),
}

#[derive(Debug, Clone, Copy)]
enum FaultSpec {
    FailAfterWrite,
    Fail,
    Stall(u64),
}

#[derive(Debug, Clone)]
enum Step {
    Reserve {
        e: usize,
        ns: NsSel,
        kind: Kind,
        count: u64,
    },
    ReservePair {
        a: usize,
        b: usize,
        ns: NsSel,
        kind: Kind,
        counts: (u64, u64),
    },
    Wait {
        ms: u64,
    },
    Checkpoint {
        e: usize,
        ns: NsSel,
    },
    Restart {
        e: usize,
    },
    Crash {
        e: usize,
    },
    Wipe {
        e: usize,
    },
    Reboot {
        e: usize,
        pick: usize,
        lose_all: bool,
    },
    Bootstrap {
        e: usize,
        fork: usize,
        form: IdForm,
        parent: Option<(usize, IdForm)>,
        floors: (u64, u64),
    },
    BootstrapPair {
        a: usize,
        b: usize,
        fork: usize,
        form_a: IdForm,
        parent: Option<(usize, IdForm)>,
        floors: (u64, u64),
    },
    Drop {
        e: usize,
        fork: usize,
        form: IdForm,
    },
    /// `fork merge` into the fork's parent.
    Merge {
        e: usize,
        fork: usize,
        form: IdForm,
    },
    /// Faults for this engine's next calls of one kind, in order.
    Fault {
        e: usize,
        op: FaultOp,
        faults: Vec<FaultSpec>,
    },
    Clear {
        e: usize,
    },
    /// The namespace's manifest is overwritten with a truncated write; then an
    /// operator follows the error's advice literally: `repair` (through engine
    /// `e`, else the next ones) with floors one above the highest ids the
    /// database holds, i.e. every id acknowledged in that namespace.
    CorruptRepair {
        e: usize,
        ns: NsSel,
    },
}

const STEP_KINDS: [&str; 15] = [
    "reserve",
    "reserve-pair",
    "wait",
    "checkpoint",
    "restart",
    "crash",
    "wipe",
    "reboot",
    "bootstrap",
    "bootstrap-pair",
    "drop",
    "fault",
    "clear",
    "merge",
    "corrupt-repair",
];

/// Relative weights of [`STEP_KINDS`].
const WEIGHTS: [u32; 15] = [30, 4, 8, 6, 4, 3, 2, 3, 8, 4, 1, 6, 1, 2, 2];

impl fmt::Display for NsSel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NsSel::Primary => f.write_str("primary"),
            NsSel::Fork(i, form) => write!(f, "f{i}/{}", form_str(*form)),
        }
    }
}

fn parent_str(p: &Option<(usize, IdForm)>) -> String {
    match p {
        None => "primary".into(),
        Some((i, form)) => format!("f{i}/{}", form_str(*form)),
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |e: &usize| NAMES[*e];
        match self {
            Step::Reserve { e, ns, kind, count } => {
                write!(f, "{} reserve {count} {kind} in {ns}", n(e))
            }
            Step::ReservePair {
                a,
                b,
                ns,
                kind,
                counts,
            } => write!(
                f,
                "{} reserve {} and {} reserve {} {kind} in {ns}, concurrently",
                n(a),
                counts.0,
                n(b),
                counts.1
            ),
            Step::Wait { ms } => write!(f, "wait {ms} ms (background prefetch)"),
            Step::Checkpoint { e, ns } => write!(f, "{} checkpoint {ns}", n(e)),
            Step::Restart { e } => write!(f, "{} clean shutdown and restart", n(e)),
            Step::Crash { e } => write!(f, "{} kill -9 and restart", n(e)),
            Step::Wipe { e } => write!(f, "{} kill -9, data dir wiped, restart", n(e)),
            Step::Reboot { e, pick, lose_all } => write!(
                f,
                "{} reboot: kill -9, sled/ rolled back to clean-shutdown copy #{pick} (none: {}), unclean mark kept, new boot id, restart",
                n(e),
                if *lose_all { "sled/ lost" } else { "sled/ kept" }
            ),
            Step::Bootstrap {
                e,
                fork,
                form,
                parent,
                floors,
            } => write!(
                f,
                "{} bootstrap f{fork}/{} parent={} floors=(vid {}, eid {})",
                n(e),
                form_str(*form),
                parent_str(parent),
                floors.0,
                floors.1
            ),
            Step::BootstrapPair {
                a,
                b,
                fork,
                form_a,
                parent,
                floors,
            } => write!(
                f,
                "{} bootstrap f{fork}/{} and {} bootstrap f{fork}/{}, concurrently, parent={} floors=(vid {}, eid {})",
                n(a),
                form_str(*form_a),
                n(b),
                form_str(other_form(*form_a)),
                parent_str(parent),
                floors.0,
                floors.1
            ),
            Step::Drop { e, fork, form } => {
                write!(f, "{} drop f{fork}/{}", n(e), form_str(*form))
            }
            Step::Merge { e, fork, form } => {
                write!(f, "{} merge f{fork}/{} into its parent", n(e), form_str(*form))
            }
            Step::Fault { e, op, faults } => {
                let list: Vec<String> = faults
                    .iter()
                    .map(|f| match f {
                        FaultSpec::FailAfterWrite => "land, then reply with an error".to_string(),
                        FaultSpec::Fail => "fail".to_string(),
                        FaultSpec::Stall(ms) => format!("stall {ms} ms"),
                    })
                    .collect();
                write!(
                    f,
                    "{} store faults, its next {}: {}",
                    n(e),
                    match op {
                        FaultOp::Get => "gets",
                        FaultOp::Put => "puts",
                        FaultOp::List => "lists",
                    },
                    list.join(", ")
                )
            }
            Step::Clear { e } => write!(f, "{} store faults cleared", n(e)),
            Step::CorruptRepair { e, ns } => {
                write!(f, "{ns:?} manifest truncated; repaired through {} with the advised floors", n(e))
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    engines: usize,
    multi_thread: bool,
    /// `[allocation] fork_ids = "tree"`: one sequence for every namespace.
    tree: bool,
    /// `[allocation] lease_min_life = "1s"`: leases grow (up to 16x) while they
    /// run out fast, which here they always do; off, every lease is `LEASE` ids.
    grow: bool,
    forks: Vec<u128>,
    steps: Vec<Step>,
}

/// Tree mode for this case: `IDALLOC_EXPLORE_FORK_IDS=tree|namespace`, else one
/// case in three (decided by the seed, outside its random stream, so that the
/// steps a seed generates do not depend on it).
fn gen_tree(seed: u64) -> bool {
    match std::env::var("IDALLOC_EXPLORE_FORK_IDS").as_deref() {
        Ok("tree") => true,
        Ok("namespace") => false,
        _ => seed.is_multiple_of(3),
    }
}

/// Lease growth for this case: `IDALLOC_EXPLORE_LEASE_GROWTH=on|off`, else every
/// other case (decided by the seed, outside its random stream, like [`gen_tree`]).
fn gen_grow(seed: u64) -> bool {
    match std::env::var("IDALLOC_EXPLORE_LEASE_GROWTH").as_deref() {
        Ok("on") => true,
        Ok("off") => false,
        _ => (seed / 3).is_multiple_of(2),
    }
}

/// A fork some earlier step bootstraps (mostly), or any fork.
fn gen_known_fork(rng: &mut StdRng, known: &[bool]) -> usize {
    let k: Vec<usize> = (0..FORKS).filter(|i| known[*i]).collect();
    if k.is_empty() || rng.gen_bool(0.05) {
        rng.gen_range(0..FORKS)
    } else {
        k[rng.gen_range(0..k.len())]
    }
}

/// A fork no earlier step bootstraps (mostly), or any fork.
fn gen_new_fork(rng: &mut StdRng, known: &[bool]) -> usize {
    let k: Vec<usize> = (0..FORKS).filter(|i| !known[*i]).collect();
    if k.is_empty() || rng.gen_bool(0.4) {
        rng.gen_range(0..FORKS)
    } else {
        k[rng.gen_range(0..k.len())]
    }
}

fn gen_ns(rng: &mut StdRng, known: &[bool]) -> NsSel {
    let p_fork = if known.iter().any(|k| *k) { 0.4 } else { 0.05 };
    if rng.gen_bool(1.0 - p_fork) {
        NsSel::Primary
    } else {
        NsSel::Fork(gen_known_fork(rng, known), gen_form(rng))
    }
}

fn gen_form(rng: &mut StdRng) -> IdForm {
    if rng.gen_bool(0.5) {
        IdForm::Uuid
    } else {
        IdForm::Ulid
    }
}

fn gen_kind(rng: &mut StdRng) -> Kind {
    if rng.gen_bool(0.65) {
        Kind::Vid
    } else {
        Kind::Eid
    }
}

fn gen_floor(rng: &mut StdRng) -> u64 {
    if rng.gen_bool(0.5) {
        0
    } else {
        rng.gen_range(0..80)
    }
}

fn gen_parent(rng: &mut StdRng, fork: usize, known: &[bool]) -> Option<(usize, IdForm)> {
    if !rng.gen_bool(0.3) {
        return None;
    }
    let p = gen_known_fork(rng, known);
    // A fork as its own parent (refused) now and then, else another fork.
    let p = if p == fork && rng.gen_bool(0.8) {
        (p + 1 + rng.gen_range(0..FORKS - 1)) % FORKS
    } else {
        p
    };
    Some((p, gen_form(rng)))
}

fn gen_other(rng: &mut StdRng, a: usize, engines: usize) -> usize {
    (a + 1 + rng.gen_range(0..engines - 1)) % engines
}

/// The calls fault steps aim at, with their weights; `IDALLOC_EXPLORE_FAULT_OPS`
/// (a list of get, put, list) narrows them.
fn fault_ops() -> Vec<(FaultOp, u32)> {
    let all = [(FaultOp::Put, 6), (FaultOp::Get, 3), (FaultOp::List, 1)];
    let Some(v) = env_var("IDALLOC_EXPLORE_FAULT_OPS") else {
        return all.to_vec();
    };
    let names: Vec<&str> = v.split(',').map(str::trim).collect();
    let ops: Vec<(FaultOp, u32)> = all
        .into_iter()
        .filter(|(op, _)| {
            names.contains(&match op {
                FaultOp::Put => "put",
                FaultOp::Get => "get",
                FaultOp::List => "list",
            })
        })
        .collect();
    assert!(
        !ops.is_empty(),
        "IDALLOC_EXPLORE_FAULT_OPS: expected a list of get, put, list, not {v:?}"
    );
    ops
}

/// One random step; `known[i]`: some earlier step bootstraps fork `i`.
fn gen_step(rng: &mut StdRng, engines: usize, weights: &[u32; 15], known: &mut [bool]) -> Step {
    let total: u32 = weights.iter().sum();
    let mut pick = rng.gen_range(0..total);
    let mut which = 0;
    for (i, w) in weights.iter().enumerate() {
        if pick < *w {
            which = i;
            break;
        }
        pick -= w;
    }
    let e = rng.gen_range(0..engines);
    match STEP_KINDS[which] {
        "reserve" => Step::Reserve {
            e,
            ns: gen_ns(rng, known),
            kind: gen_kind(rng),
            count: rng.gen_range(1..=LEASE),
        },
        "reserve-pair" => Step::ReservePair {
            a: e,
            b: gen_other(rng, e, engines),
            ns: gen_ns(rng, known),
            kind: gen_kind(rng),
            counts: (rng.gen_range(1..=LEASE), rng.gen_range(1..=LEASE)),
        },
        "wait" => Step::Wait {
            ms: rng.gen_range(5..=30),
        },
        "checkpoint" => Step::Checkpoint {
            e,
            ns: gen_ns(rng, known),
        },
        "restart" => Step::Restart { e },
        "crash" => Step::Crash { e },
        "wipe" => Step::Wipe { e },
        "reboot" => Step::Reboot {
            e,
            pick: rng.gen_range(0..8),
            lose_all: rng.gen_bool(0.3),
        },
        "bootstrap" => {
            let fork = gen_new_fork(rng, known);
            let parent = gen_parent(rng, fork, known);
            known[fork] = true;
            Step::Bootstrap {
                e,
                fork,
                form: gen_form(rng),
                parent,
                floors: (gen_floor(rng), gen_floor(rng)),
            }
        }
        "bootstrap-pair" => {
            let fork = gen_new_fork(rng, known);
            let parent = gen_parent(rng, fork, known);
            known[fork] = true;
            Step::BootstrapPair {
                a: e,
                // Mostly two engines; now and then both through one.
                b: if rng.gen_bool(0.85) {
                    gen_other(rng, e, engines)
                } else {
                    e
                },
                fork,
                form_a: gen_form(rng),
                parent,
                floors: (gen_floor(rng), gen_floor(rng)),
            }
        }
        "drop" => Step::Drop {
            e,
            fork: gen_known_fork(rng, known),
            form: gen_form(rng),
        },
        "fault" => {
            let ops = fault_ops();
            let mut pick = rng.gen_range(0..ops.iter().map(|o| o.1).sum::<u32>());
            let mut op = ops[0].0;
            for (o, w) in ops {
                if pick < w {
                    op = o;
                    break;
                }
                pick -= w;
            }
            let put = op == FaultOp::Put;
            let faults = (0..rng.gen_range(1..=3))
                .map(|_| match (put, rng.gen_range(0..100)) {
                    (true, 0..=44) => FaultSpec::FailAfterWrite,
                    (_, 0..=74) => FaultSpec::Fail,
                    // Shorter than the store time-out (slow), or longer (a time-out).
                    _ => FaultSpec::Stall(if rng.gen_bool(0.5) { 10 } else { 120 }),
                })
                .collect();
            Step::Fault { e, op, faults }
        }
        "clear" => Step::Clear { e },
        "merge" => Step::Merge {
            e,
            fork: gen_known_fork(rng, known),
            form: gen_form(rng),
        },
        "corrupt-repair" => Step::CorruptRepair {
            e,
            ns: gen_ns(rng, known),
        },
        other => unreachable!("{other}"),
    }
}

fn gen_case(seed: u64, steps: usize, weights: &[u32; 15]) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let engines = rng.gen_range(2..=3);
    let multi_thread = rng.gen_bool(0.25);
    let forks = (0..FORKS).map(|_| rng.gen::<u128>()).collect();
    let mut known = [false; FORKS];
    let steps = (0..steps)
        .map(|_| gen_step(&mut rng, engines, weights, &mut known))
        .collect();
    Case {
        seed,
        engines,
        multi_thread,
        tree: gen_tree(seed),
        grow: gen_grow(seed),
        forks,
        steps,
    }
}

// ---------------------------------------------------------------------------------
// The model.
// ---------------------------------------------------------------------------------

/// A namespace by identity: `None` is the primary, else the fork's 128-bit value.
type NsKey = Option<u128>;

#[derive(Debug, Clone)]
struct Grant {
    ns: NsKey,
    kind: Kind,
    range: IdRange,
    engine: usize,
    life: u32,
    step: usize,
}

#[derive(Debug, Default)]
struct ForkModel {
    /// The step at which the fork was first seen to exist.
    exists_since: Option<usize>,
    /// Per bootstrap request that may have created the fork: the floors the fork
    /// must respect if that request's create is the one that landed.
    candidates: Vec<(u64, u64, usize)>,
    /// What every id of the fork must be at or above (min over the candidates).
    required: Option<(u64, u64)>,
    /// (step, engine) of each `created: true` reply.
    told_created: Vec<(usize, usize)>,
    /// Floors of the first successful reply, with its step and engine.
    floors: Option<(u64, u64, usize, usize)>,
    /// Steps at which a bootstrap request ended in a retryable (or internal) error.
    gave_up: Vec<usize>,
}

#[derive(Debug, Default)]
struct Model {
    grants: Vec<Grant>,
    /// (engine, ns, kind) -> (end of its last range, step), within one order epoch.
    last: HashMap<(usize, NsKey, Kind), (u64, usize)>,
    forks: HashMap<u128, ForkModel>,
    /// Forks merged, with the engine that merged them and the step: that engine
    /// never grants in them again (others may, from leases they already hold).
    merged: HashMap<u128, (usize, usize)>,
    /// Tree mode: ids are unique across namespaces, and a fork starts above
    /// everything any namespace granted.
    tree: bool,
}

#[derive(Debug, Clone)]
struct Failure {
    /// Position of the failing step in the executed history.
    pos: usize,
    check: &'static str,
    msg: String,
    log: Vec<String>,
}

fn fail(pos: usize, check: &'static str, msg: String) -> Failure {
    Failure {
        pos,
        check,
        msg,
        log: Vec::new(),
    }
}

fn ns_name(ns: NsKey, forks: &[u128]) -> String {
    match ns {
        None => "primary".into(),
        Some(v) => match forks.iter().position(|f| *f == v) {
            Some(i) => format!("f{i}"),
            None => format!("fork {v:032x}"),
        },
    }
}

/// One bootstrap request (with a client's retries) as the model sees it.
struct BootReq {
    engine: usize,
    value: u128,
    /// Fork known to exist before the request started.
    pre_exists: bool,
    /// max(caller floor, parent's max granted) per kind, at the request's start.
    required: (u64, u64),
    attempts: Vec<Result<ForkInfo, ServiceError>>,
}

impl Model {
    fn max_end(&self, ns: NsKey, kind: Kind) -> u64 {
        self.grants
            .iter()
            .filter(|g| g.ns == ns && g.kind == kind)
            .map(|g| g.range.end)
            .max()
            .unwrap_or(0)
    }

    fn max_end_anywhere(&self, kind: Kind) -> u64 {
        self.grants
            .iter()
            .filter(|g| g.kind == kind)
            .map(|g| g.range.end)
            .max()
            .unwrap_or(0)
    }

    fn engine_max_end(&self, e: usize, ns: NsKey, kind: Kind) -> u64 {
        self.grants
            .iter()
            .filter(|g| g.engine == e && g.ns == ns && g.kind == kind)
            .map(|g| g.range.end)
            .max()
            .unwrap_or(0)
    }

    fn reset_order(&mut self, e: usize) {
        self.last.retain(|(eng, _, _), _| *eng != e);
    }

    fn mark_exists(&mut self, pos: usize, value: u128, forks: &[u128]) -> Result<(), Failure> {
        let fm = self.forks.entry(value).or_default();
        if fm.exists_since.is_some() {
            return Ok(());
        }
        fm.exists_since = Some(pos);
        if fm.candidates.is_empty() {
            return Err(fail(
                pos,
                "creators",
                format!(
                    "{} exists, but no bootstrap request could have created it",
                    ns_name(Some(value), forks)
                ),
            ));
        }
        let vid = fm.candidates.iter().map(|c| c.0).min().unwrap();
        let eid = fm.candidates.iter().map(|c| c.1).min().unwrap();
        fm.required = Some((vid, eid));
        Ok(())
    }

    fn bootstrap_pre(&self, value: u128, parent: NsKey, floors: (u64, u64)) -> (bool, (u64, u64)) {
        let pre = self
            .forks
            .get(&value)
            .is_some_and(|f| f.exists_since.is_some());
        let above = |kind: Kind| match self.tree {
            true => self.max_end_anywhere(kind),
            false => self.max_end(parent, kind),
        };
        let req = (
            floors.0.max(above(Kind::Vid)),
            floors.1.max(above(Kind::Eid)),
        );
        (pre, req)
    }

    fn bootstrap_done(
        &mut self,
        pos: usize,
        reqs: &[BootReq],
        forks: &[u128],
    ) -> Result<(), Failure> {
        // Candidates first: of concurrent requests, either may be the creator.
        for r in reqs {
            let could_create = !r.pre_exists
                && r.attempts.iter().any(|a| {
                    !matches!(
                        a,
                        Err(ServiceError::InvalidArgument(_))
                            | Err(ServiceError::UnknownFork(_))
                            | Err(ServiceError::DroppedFork(_))
                    )
                });
            if could_create {
                self.forks.entry(r.value).or_default().candidates.push((
                    r.required.0,
                    r.required.1,
                    pos,
                ));
            }
        }
        for r in reqs {
            match r.attempts.last().expect("at least one attempt") {
                Ok(info) => {
                    self.mark_exists(pos, r.value, forks)?;
                    let fm = self.forks.get_mut(&r.value).unwrap();
                    if info.created {
                        fm.told_created.push((pos, r.engine));
                    }
                    match fm.floors {
                        None => fm.floors = Some((info.floor_vid, info.floor_eid, pos, r.engine)),
                        Some((v, e, at, by)) => {
                            if (v, e) != (info.floor_vid, info.floor_eid) {
                                return Err(fail(
                                    pos,
                                    "floors-agree",
                                    format!(
                                        "{}: {} was told floors (vid {}, eid {}), but {} was told (vid {v}, eid {e}) at step {at}",
                                        ns_name(Some(r.value), forks),
                                        NAMES[r.engine],
                                        info.floor_vid,
                                        info.floor_eid,
                                        NAMES[by]
                                    ),
                                ));
                            }
                        }
                    }
                }
                Err(e) if e.is_retryable() || matches!(e, ServiceError::Internal(_)) => {
                    self.forks.entry(r.value).or_default().gave_up.push(pos);
                }
                Err(_) => {}
            }
        }
        for r in reqs {
            let Some(fm) = self.forks.get(&r.value) else {
                continue;
            };
            if fm.told_created.len() > 1 {
                let who: Vec<String> = fm
                    .told_created
                    .iter()
                    .map(|(s, e)| format!("{} at step {s}", NAMES[*e]))
                    .collect();
                return Err(fail(
                    pos,
                    "creators",
                    format!(
                        "{} (one 128-bit value) was reported created: true {} times: {}",
                        ns_name(Some(r.value), forks),
                        fm.told_created.len(),
                        who.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// After every step: a fork that exists has been told to exactly one creator,
    /// unless some request gave up (it may be the one whose create landed).
    fn check_creators(&self, pos: usize, forks: &[u128]) -> Result<(), Failure> {
        for (v, fm) in &self.forks {
            if let Some(since) = fm.exists_since {
                if fm.told_created.is_empty() && fm.gave_up.is_empty() {
                    return Err(fail(
                        pos,
                        "creators",
                        format!(
                            "{} exists (seen at step {since}), every bootstrap request of it got a reply, and none was told created: true",
                            ns_name(Some(*v), forks)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn grant(
        &mut self,
        pos: usize,
        engine: usize,
        life: u32,
        ns: NsKey,
        kind: Kind,
        count: u64,
        range: IdRange,
        forks: &[u128],
    ) -> Result<(), Failure> {
        let who = NAMES[engine];
        let nsn = ns_name(ns, forks);
        if range.end < range.start || range.len() != count {
            return Err(fail(
                pos,
                "length",
                format!("{who} asked for {count} {kind} ids in {nsn} and got {range:?}"),
            ));
        }
        for g in &self.grants {
            if (self.tree || g.ns == ns)
                && g.kind == kind
                && range.start < g.range.end
                && g.range.start < range.end
            {
                return Err(fail(
                    pos,
                    "disjoint",
                    format!(
                        "{nsn} {kind}: {who}'s [{}, {}) overlaps [{}, {}) granted in {} by {} (life {}) at step {}",
                        range.start, range.end, g.range.start, g.range.end, ns_name(g.ns, forks), NAMES[g.engine], g.life, g.step
                    ),
                ));
            }
        }
        if let Some((last, at)) = self.last.get(&(engine, ns, kind)) {
            if range.start < *last {
                return Err(fail(
                    pos,
                    "order",
                    format!(
                        "{nsn} {kind}: {who}'s [{}, {}) is below the end {last} of its previous range (step {at}), with its data dir intact and trusted since",
                        range.start, range.end
                    ),
                ));
            }
        }
        if let Some(v) = ns {
            if let Some((by, at)) = self.merged.get(&v) {
                if *by == engine {
                    return Err(fail(
                        pos,
                        "merged",
                        format!(
                            "{who} granted {kind} {range:?} in {nsn}, which it merged at step {at}"
                        ),
                    ));
                }
            }
            self.mark_exists(pos, v, forks)?;
            let fm = &self.forks[&v];
            if let Some((rv, re)) = fm.required {
                let need = if kind == Kind::Vid { rv } else { re };
                if range.start < need {
                    return Err(fail(
                        pos,
                        "fork-floor",
                        format!(
                            "{nsn} {kind}: {who}'s [{}, {}) is below {need}, the floor its creator asked for or the parent's highest granted id when it was bootstrapped",
                            range.start, range.end
                        ),
                    ));
                }
            }
            if let Some((fv, fe, _, _)) = fm.floors {
                let floor = if kind == Kind::Vid { fv } else { fe };
                if range.start < floor {
                    return Err(fail(
                        pos,
                        "fork-floor",
                        format!(
                            "{nsn} {kind}: {who}'s [{}, {}) is below the fork's reported floor {floor}",
                            range.start, range.end
                        ),
                    ));
                }
            }
        }
        self.last.insert((engine, ns, kind), (range.end, pos));
        self.grants.push(Grant {
            ns,
            kind,
            range,
            engine,
            life,
            step: pos,
        });
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Running a history.
// ---------------------------------------------------------------------------------

struct Slot {
    cfg: EngineConfig,
    handle: StoreHandle,
    ctl: Arc<FaultControl>,
    engine: Option<Arc<Engine>>,
    boots: u32,
    life: u32,
    snapshots: Vec<PathBuf>,
}

struct World {
    env: Env,
    shared: Arc<TestStore>,
    seed: u64,
    forks: Vec<u128>,
    slots: Vec<Slot>,
    model: Model,
    snap_seq: usize,
}

#[derive(Default)]
struct Stats {
    steps: AtomicU64,
    grants: AtomicU64,
    errors: AtomicU64,
    created: AtomicU64,
    merged: AtomicU64,
    rollbacks: AtomicU64,
    faults_injected: AtomicU64,
    /// Errors by operation and kind.
    error_kinds: Mutex<std::collections::BTreeMap<(&'static str, &'static str), u64>>,
    /// Wall time of the first run of each case, in ms, and how many.
    first_run_ms: AtomicU64,
    first_runs: AtomicU64,
}

impl Stats {
    fn error(&self, op: &'static str, e: &ServiceError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self
            .error_kinds
            .lock()
            .unwrap()
            .entry((op, error_kind(e)))
            .or_default() += 1;
    }
}

fn explorer_config(env: &Env, e: usize, tree: bool, grow: bool) -> EngineConfig {
    EngineConfig {
        lease_min_life: if grow {
            Duration::from_secs(1)
        } else {
            Duration::ZERO
        },
        fork_ids: if tree {
            ForkIds::Tree
        } else {
            ForkIds::Namespace
        },
        boot_id_path: env.path().join(format!("boot-id-{}", NAMES[e])),
        store_timeout: Duration::from_millis(100),
        store_retries: 1,
        store_backoff: Duration::from_millis(5),
        unavailable_cooldown: Duration::from_millis(40),
        ..env.config(&format!("data-{}", NAMES[e]), LEASE)
    }
}

async fn bootstrap_request(
    engine: Arc<Engine>,
    fork: ForkId,
    parent: Option<ForkId>,
    floors: (u64, u64),
) -> Vec<Result<ForkInfo, ServiceError>> {
    let mut attempts = Vec::new();
    // One request, retried as the client library retries it: one request id.
    let request: u128 = rand::random();
    for _ in 0..6 {
        let r = engine
            .bootstrap_fork_request(
                fork,
                parent,
                floors.0,
                floors.1,
                request,
                FloorAuthority::Any,
            )
            .await;
        let again = matches!(&r, Err(e) if e.is_retryable());
        attempts.push(r);
        if !again {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    attempts
}

fn describe_attempts(attempts: &[Result<ForkInfo, ServiceError>]) -> String {
    let parts: Vec<String> = attempts
        .iter()
        .map(|a| match a {
            Ok(i) => format!(
                "created={} floors=(vid {}, eid {}) next=(vid {}, eid {})",
                i.created, i.floor_vid, i.floor_eid, i.next_vid, i.next_eid
            ),
            Err(e) => short_err(e),
        })
        .collect();
    parts.join("; retried: ")
}

impl World {
    async fn new(case: &Case) -> Result<World, Failure> {
        let env = Env::new();
        let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let shared = TestStore::new(
            mem,
            Yields::Random(Box::new(StdRng::seed_from_u64(case.seed ^ 0x5eed))),
        );
        let mut slots = Vec::new();
        for (e, name) in NAMES.iter().enumerate().take(case.engines) {
            let (faulty, ctl) = FaultyStore::wrap(shared.clone() as Arc<dyn ObjectStore>);
            let cfg = explorer_config(&env, e, case.tree, case.grow);
            std::fs::write(&cfg.boot_id_path, format!("{name}-boot-1\n")).unwrap();
            slots.push(Slot {
                cfg,
                handle: handle(faulty),
                ctl,
                engine: None,
                boots: 1,
                life: 0,
                snapshots: Vec::new(),
            });
        }
        let mut w = World {
            env,
            shared,
            seed: case.seed,
            forks: case.forks.clone(),
            slots,
            model: Model {
                tree: case.tree,
                ..Model::default()
            },
            snap_seq: 0,
        };
        for e in 0..case.engines {
            w.start(0, e).await?;
        }
        Ok(w)
    }

    async fn start(&mut self, pos: usize, e: usize) -> Result<(), Failure> {
        let slot = &mut self.slots[e];
        let mut last = String::new();
        for _ in 0..5 {
            match open(slot.cfg.clone(), &slot.handle).await {
                Ok(engine) => {
                    slot.engine = Some(engine);
                    slot.life += 1;
                    return Ok(());
                }
                Err(err) => {
                    // Refusing to start on an unreachable store is allowed; with
                    // the faults gone it must start.
                    last = err.to_string();
                    slot.ctl.clear();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Err(fail(
            pos,
            "open",
            format!(
                "engine {} cannot open with a healthy store: {last}",
                NAMES[e]
            ),
        ))
    }

    fn engine(&self, e: usize) -> Arc<Engine> {
        self.slots[e].engine.clone().expect("engine running")
    }

    fn ns(&self, sel: NsSel) -> (NsKey, Namespace) {
        match sel {
            NsSel::Primary => (None, Namespace::Primary),
            NsSel::Fork(i, form) => (
                Some(self.forks[i]),
                Namespace::Fork(spell(self.forks[i], form)),
            ),
        }
    }

    async fn stop(&mut self, e: usize) -> Arc<Engine> {
        self.slots[e].engine.take().expect("engine running")
    }

    async fn shutdown_all(&mut self) {
        for e in 0..self.slots.len() {
            if let Some(engine) = self.slots[e].engine.take() {
                crash(engine).await;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &mut self,
        pos: usize,
        e: usize,
        ns: NsKey,
        kind: Kind,
        count: u64,
        res: &Result<IdRange, ServiceError>,
        stats: &Stats,
    ) -> Result<String, Failure> {
        match res {
            Ok(r) => {
                stats.grants.fetch_add(1, Ordering::Relaxed);
                let life = self.slots[e].life;
                self.model
                    .grant(pos, e, life, ns, kind, count, *r, &self.forks)?;
                Ok(format!("[{}, {})", r.start, r.end))
            }
            Err(err) => {
                stats.error("reserve", err);
                Ok(short_err(err))
            }
        }
    }

    fn check_hwm_value(
        &self,
        pos: usize,
        e: usize,
        ns: NsKey,
        next_vid: u64,
        next_eid: u64,
        what: &str,
    ) -> Result<(), Failure> {
        for (kind, next) in [(Kind::Vid, next_vid), (Kind::Eid, next_eid)] {
            let granted = self.model.engine_max_end(e, ns, kind);
            if next < granted {
                return Err(fail(
                    pos,
                    "hwm",
                    format!(
                        "{}'s {what} of {} says next {kind} {next}, below {granted}, the end of what it granted there",
                        NAMES[e],
                        ns_name(ns, &self.forks)
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn check_hwms(&self, pos: usize) -> Result<(), Failure> {
        for e in 0..self.slots.len() {
            let Some(engine) = self.slots[e].engine.clone() else {
                continue;
            };
            let mut seen: Vec<NsKey> = Vec::new();
            for g in self.model.grants.iter().filter(|g| g.engine == e) {
                if !seen.contains(&g.ns) {
                    seen.push(g.ns);
                }
            }
            for ns in seen {
                let namespace = match ns {
                    None => Namespace::Primary,
                    Some(v) => Namespace::Fork(spell(v, IdForm::Uuid)),
                };
                if let Ok(h) = engine.hwm(namespace).await {
                    self.check_hwm_value(pos, e, ns, h.next_vid, h.next_eid, "hwm")?;
                }
            }
        }
        Ok(())
    }

    async fn exec(&mut self, pos: usize, step: &Step, stats: &Stats) -> Result<String, Failure> {
        match step {
            Step::Reserve { e, ns, kind, count } => {
                let (key, namespace) = self.ns(*ns);
                let res = self.engine(*e).reserve(namespace, *kind, *count).await;
                self.record(pos, *e, key, *kind, *count, &res, stats)
            }
            Step::ReservePair {
                a,
                b,
                ns,
                kind,
                counts,
            } => {
                let (key, namespace) = self.ns(*ns);
                let (ea, eb) = (self.engine(*a), self.engine(*b));
                let (k, ca, cb) = (*kind, counts.0, counts.1);
                let ta = tokio::spawn(async move { ea.reserve(namespace, k, ca).await });
                let tb = tokio::spawn(async move { eb.reserve(namespace, k, cb).await });
                let (ra, rb) = (ta.await.unwrap(), tb.await.unwrap());
                let sa = self.record(pos, *a, key, k, ca, &ra, stats)?;
                let sb = self.record(pos, *b, key, k, cb, &rb, stats)?;
                Ok(format!("{}: {sa}; {}: {sb}", NAMES[*a], NAMES[*b]))
            }
            Step::Wait { ms } => {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                Ok(String::new())
            }
            Step::Checkpoint { e, ns } => {
                let (key, namespace) = self.ns(*ns);
                match self.engine(*e).checkpoint(namespace).await {
                    Ok(h) => {
                        self.check_hwm_value(
                            pos,
                            *e,
                            key,
                            h.next_vid,
                            h.next_eid,
                            "checkpoint reply",
                        )?;
                        Ok(format!("next (vid {}, eid {})", h.next_vid, h.next_eid))
                    }
                    Err(err) => {
                        stats.error("checkpoint", &err);
                        Ok(short_err(&err))
                    }
                }
            }
            Step::Restart { e } => {
                let engine = self.stop(*e).await;
                let res = engine.shutdown().await;
                crash(engine).await;
                let mut out = match &res {
                    Ok(()) => "clean".to_string(),
                    Err(err) => format!("shutdown {}", short_err(err)),
                };
                if res.is_ok() {
                    // sled has synced everything at a clean shutdown: a state a
                    // power cut may later bring back.
                    let sled = self.slots[*e].cfg.data_dir.join("sled");
                    let snap = self
                        .env
                        .path()
                        .join(format!("snapshot-{}-{}", NAMES[*e], self.snap_seq));
                    self.snap_seq += 1;
                    if try_copy_dir(&sled, &snap).is_ok() {
                        self.slots[*e].snapshots.push(snap);
                        out.push_str(&format!(
                            ", sled/ copied as #{}",
                            self.slots[*e].snapshots.len() - 1
                        ));
                    }
                }
                self.start(pos, *e).await?;
                Ok(out)
            }
            Step::Crash { e } => {
                let engine = self.stop(*e).await;
                crash(engine).await;
                self.start(pos, *e).await?;
                Ok(String::new())
            }
            Step::Wipe { e } => {
                let engine = self.stop(*e).await;
                crash(engine).await;
                let dir = self.slots[*e].cfg.data_dir.clone();
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).unwrap();
                }
                self.slots[*e].snapshots.clear();
                self.model.reset_order(*e);
                self.start(pos, *e).await?;
                Ok(String::new())
            }
            Step::Reboot { e, pick, lose_all } => {
                let engine = self.stop(*e).await;
                crash(engine).await;
                let sled = self.slots[*e].cfg.data_dir.join("sled");
                let snaps = &self.slots[*e].snapshots;
                let out = if !snaps.is_empty() {
                    let i = pick % snaps.len();
                    let _ = std::fs::remove_dir_all(&sled);
                    try_copy_dir(&snaps[i], &sled).unwrap();
                    stats.rollbacks.fetch_add(1, Ordering::Relaxed);
                    format!("sled/ rolled back to copy #{i} of {}", snaps.len())
                } else if *lose_all {
                    let _ = std::fs::remove_dir_all(&sled);
                    "no copy: sled/ lost".to_string()
                } else {
                    "no copy: sled/ kept".to_string()
                };
                // Only sled/ is rolled back: the `unclean` mark file (fsynced) stays.
                let slot = &mut self.slots[*e];
                slot.boots += 1;
                std::fs::write(
                    &slot.cfg.boot_id_path,
                    format!("{}-boot-{}\n", NAMES[*e], slot.boots),
                )
                .unwrap();
                self.model.reset_order(*e);
                self.start(pos, *e).await?;
                Ok(out)
            }
            Step::Bootstrap {
                e,
                fork,
                form,
                parent,
                floors,
            } => {
                let value = self.forks[*fork];
                let parent_id = parent.map(|(p, f)| spell(self.forks[p], f));
                let parent_key = parent.map(|(p, _)| self.forks[p]);
                let (pre_exists, required) = self.model.bootstrap_pre(value, parent_key, *floors);
                let attempts =
                    bootstrap_request(self.engine(*e), spell(value, *form), parent_id, *floors)
                        .await;
                let out = describe_attempts(&attempts);
                self.count_boot(&attempts, stats);
                let req = BootReq {
                    engine: *e,
                    value,
                    pre_exists,
                    required,
                    attempts,
                };
                self.model.bootstrap_done(pos, &[req], &self.forks)?;
                Ok(out)
            }
            Step::BootstrapPair {
                a,
                b,
                fork,
                form_a,
                parent,
                floors,
            } => {
                let value = self.forks[*fork];
                let parent_id = parent.map(|(p, f)| spell(self.forks[p], f));
                let parent_key = parent.map(|(p, _)| self.forks[p]);
                let (pre_exists, required) = self.model.bootstrap_pre(value, parent_key, *floors);
                let ta = tokio::spawn(bootstrap_request(
                    self.engine(*a),
                    spell(value, *form_a),
                    parent_id,
                    *floors,
                ));
                let tb = tokio::spawn(bootstrap_request(
                    self.engine(*b),
                    spell(value, other_form(*form_a)),
                    parent_id,
                    *floors,
                ));
                let (ra, rb) = (ta.await.unwrap(), tb.await.unwrap());
                let out = format!(
                    "{}: {}  |  {}: {}",
                    NAMES[*a],
                    describe_attempts(&ra),
                    NAMES[*b],
                    describe_attempts(&rb)
                );
                self.count_boot(&ra, stats);
                self.count_boot(&rb, stats);
                let reqs = [
                    BootReq {
                        engine: *a,
                        value,
                        pre_exists,
                        required,
                        attempts: ra,
                    },
                    BootReq {
                        engine: *b,
                        value,
                        pre_exists,
                        required,
                        attempts: rb,
                    },
                ];
                self.model.bootstrap_done(pos, &reqs, &self.forks)?;
                Ok(out)
            }
            Step::Drop { e, fork, form } => {
                let value = self.forks[*fork];
                match self.engine(*e).drop_fork(spell(value, *form)).await {
                    Ok(_) => {
                        self.model.mark_exists(pos, value, &self.forks)?;
                        Ok("dropped".into())
                    }
                    Err(err) => {
                        stats.error("drop", &err);
                        Ok(short_err(&err))
                    }
                }
            }
            Step::Merge { e, fork, form } => {
                let value = self.forks[*fork];
                match self
                    .engine(*e)
                    .merge_fork(spell(value, *form), MergeInto::Parent)
                    .await
                {
                    Ok(r) => {
                        if r.merged_now {
                            stats.merged.fetch_add(1, Ordering::Relaxed);
                        }
                        self.model.mark_exists(pos, value, &self.forks)?;
                        self.model.merged.entry(value).or_insert((*e, pos));
                        Ok(format!(
                            "merged into {} (vid end {}, eid end {}{})",
                            r.into,
                            r.fork_vid_end,
                            r.fork_eid_end,
                            if r.merged_now { "" } else { ", already" }
                        ))
                    }
                    Err(err) => {
                        stats.error("merge", &err);
                        Ok(short_err(&err))
                    }
                }
            }
            Step::Fault { e, op, faults } => {
                for fault in faults {
                    let f = match fault {
                        FaultSpec::FailAfterWrite => Fault::FailAfterWrite,
                        FaultSpec::Fail => Fault::Fail,
                        FaultSpec::Stall(ms) => Fault::Stall(Duration::from_millis(*ms)),
                    };
                    self.slots[*e].ctl.next(*op, f, 1);
                }
                Ok(String::new())
            }
            Step::Clear { e } => {
                self.slots[*e].ctl.clear();
                Ok(String::new())
            }
            Step::CorruptRepair { e, ns } => self.corrupt_and_repair(*e, *ns, stats).await,
        }
    }

    /// [`Step::CorruptRepair`]: every manifest of the namespace (a fork's under
    /// either spelling) that exists is overwritten with a truncated write, behind
    /// every engine's back; then the repair an operator would run, with floors one
    /// above every id acknowledged in the namespace, through the first engine
    /// running (from `e` on) that accepts it.
    async fn corrupt_and_repair(
        &mut self,
        e: usize,
        sel: NsSel,
        stats: &Stats,
    ) -> Result<String, Failure> {
        let (key, namespace) = self.ns(sel);
        let paths: Vec<ObjPath> = match key {
            None => vec![ObjPath::from("id_allocator.json")],
            Some(v) => [IdForm::Uuid, IdForm::Ulid]
                .into_iter()
                .map(|f| {
                    ObjPath::from(format!(
                        "catalog/forks/{}/id_allocator.json",
                        spell(v, f).text()
                    ))
                })
                .collect(),
        };
        let mut corrupted = 0;
        for p in paths {
            if self.shared.inner.head(&p).await.is_ok() {
                self.shared
                    .inner
                    .put(&p, PutPayload::from_static(b"{\"next_vid_ba"))
                    .await
                    .expect("in-memory put");
                corrupted += 1;
            }
        }
        if corrupted == 0 {
            return Ok("no manifest to corrupt".into());
        }
        let mut floors = [0u64; 2];
        for g in &self.model.grants {
            if g.ns == key {
                let i = g.kind.index();
                floors[i] = floors[i].max(g.range.end);
            }
        }
        let n = self.slots.len();
        let mut out = Vec::new();
        for i in (0..n).map(|i| (e + i) % n) {
            let Some(engine) = self.slots[i].engine.clone() else {
                continue;
            };
            match engine.repair(namespace, floors[0], floors[1]).await {
                Ok(r) => {
                    out.push(format!(
                        "{} repaired (floors vid {}, eid {}): vid {}, eid {}",
                        NAMES[i], floors[0], floors[1], r.vid_ceiling, r.eid_ceiling
                    ));
                    return Ok(out.join("; "));
                }
                Err(err) => {
                    stats.error("repair", &err);
                    out.push(format!("{}: {}", NAMES[i], short_err(&err)));
                }
            }
        }
        Ok(out.join("; "))
    }

    fn count_boot(&self, attempts: &[Result<ForkInfo, ServiceError>], stats: &Stats) {
        match attempts.last() {
            Some(Ok(i)) if i.created => {
                stats.created.fetch_add(1, Ordering::Relaxed);
            }
            Some(Err(err)) => stats.error("bootstrap", err),
            _ => {}
        }
    }
}

fn case_header(case: &Case) -> String {
    let forks: Vec<String> = case
        .forks
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                "f{i} = {} = {}",
                spell(*v, IdForm::Uuid).text(),
                spell(*v, IdForm::Ulid).text()
            )
        })
        .collect();
    format!(
        "engines {} ({}), {} runtime, fork_ids {}, lease_size {LEASE}{}, prefetch_at 0.5; forks: {}",
        case.engines,
        NAMES[..case.engines].iter().collect::<String>(),
        if case.multi_thread {
            "multi-thread"
        } else {
            "current-thread"
        },
        if case.tree { "tree" } else { "namespace" },
        if case.grow {
            " (growing up to 16x, lease_min_life 1s)"
        } else {
            ""
        },
        forks.join(", ")
    )
}

/// Run `case` restricted to the steps at `keep` (indices into `case.steps`).
fn run_history(case: &Case, keep: &[usize], stats: &Stats) -> Result<Vec<String>, Failure> {
    let rt = if case.multi_thread {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }
    .unwrap();
    let current = AtomicUsize::new(0);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let mut log: Vec<String> = Vec::new();
            let mut world = match World::new(case).await {
                Ok(w) => w,
                Err(f) => return Err(f),
            };
            let mut result = Ok(());
            for (pos, &i) in keep.iter().enumerate() {
                let step = &case.steps[i];
                stats.steps.fetch_add(1, Ordering::Relaxed);
                current.store(pos, Ordering::SeqCst);
                world
                    .shared
                    .reseed(splitmix(world.seed ^ (i as u64).wrapping_mul(0x2545_f491)));
                let r = tokio::time::timeout(Duration::from_secs(20), world.exec(pos, step, stats))
                    .await
                    .unwrap_or_else(|_| {
                        Err(fail(pos, "hang", "the step did not finish in 20 s".into()))
                    });
                let r = match r {
                    Ok(out) => {
                        log.push(format!("{pos:>3}. [#{i}] {step}  ->  {out}"));
                        match world.check_hwms(pos).await {
                            Ok(()) => world.model.check_creators(pos, &world.forks),
                            Err(f) => Err(f),
                        }
                    }
                    Err(f) => {
                        log.push(format!("{pos:>3}. [#{i}] {step}  ->  (failed)"));
                        Err(f)
                    }
                };
                if let Err(f) = r {
                    result = Err(f);
                    break;
                }
            }
            let injected: u64 = world.slots.iter().map(|s| s.ctl.injected()).sum();
            stats.faults_injected.fetch_add(injected, Ordering::Relaxed);
            world.shutdown_all().await;
            match result {
                Ok(()) => Ok(log),
                Err(mut f) => {
                    f.log = log;
                    Err(f)
                }
            }
        })
    }));
    drop(rt);
    match outcome {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(Failure {
                pos: current.load(Ordering::SeqCst),
                check: "panic",
                msg: format!("panicked: {msg}"),
                log: Vec::new(),
            })
        }
    }
}

/// Delta debugging over the step list: drop chunks while the same check still fails.
fn shrink(case: &Case, first: Failure, stats: &Stats) -> (Vec<usize>, Failure, usize) {
    let started = Instant::now();
    let mut runs = 0;
    let mut keep: Vec<usize> = (0..case.steps.len()).collect();
    keep.truncate(first.pos + 1);
    let mut best = first;
    let mut chunk = (keep.len() / 2).max(1);
    loop {
        let mut progressed = false;
        let mut i = 0;
        while i < keep.len() {
            if runs >= 400 || started.elapsed() > Duration::from_secs(240) {
                return (keep, best, runs);
            }
            let end = (i + chunk).min(keep.len());
            let cand: Vec<usize> = keep[..i].iter().chain(&keep[end..]).copied().collect();
            if cand.is_empty() {
                i = end;
                continue;
            }
            runs += 1;
            match run_history(case, &cand, stats) {
                Err(f) if f.check == best.check => {
                    keep = cand;
                    keep.truncate(f.pos + 1);
                    best = f;
                    progressed = true;
                }
                _ => i = end,
            }
        }
        if !progressed {
            if chunk == 1 {
                break;
            }
            chunk = (chunk / 2).max(1);
        }
    }
    (keep, best, runs)
}

struct Settings {
    cases: u64,
    base: u64,
    steps: usize,
    replay: Option<u64>,
    keep: Option<Vec<usize>>,
    failures: usize,
    threads: usize,
    verbose: bool,
    shrink: bool,
    weights: [u32; 15],
    without: String,
}

fn parse_u64(s: &str) -> u64 {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).expect("hex seed"),
        None => s.parse().expect("decimal number"),
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl Settings {
    fn from_env() -> Settings {
        let mut weights = WEIGHTS;
        let without = env_var("IDALLOC_EXPLORE_WITHOUT").unwrap_or_default();
        for w in without.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            let i = STEP_KINDS.iter().position(|k| *k == w).unwrap_or_else(|| {
                panic!("IDALLOC_EXPLORE_WITHOUT: unknown step kind {w:?}; kinds: {STEP_KINDS:?}")
            });
            weights[i] = 0;
        }
        assert!(weights.iter().sum::<u32>() > 0, "every step kind excluded");
        Settings {
            cases: env_var("IDALLOC_EXPLORE_CASES").map_or(200, |v| parse_u64(&v)),
            base: env_var("IDALLOC_EXPLORE_BASE").map_or(0x1da1_10c0_ffee, |v| parse_u64(&v)),
            steps: env_var("IDALLOC_EXPLORE_STEPS").map_or(40, |v| parse_u64(&v) as usize),
            replay: env_var("IDALLOC_EXPLORE_SEED").map(|v| parse_u64(&v)),
            keep: env_var("IDALLOC_EXPLORE_KEEP").map(|v| {
                v.split(',')
                    .map(|x| parse_u64(x) as usize)
                    .collect::<Vec<_>>()
            }),
            failures: env_var("IDALLOC_EXPLORE_FAILURES").map_or(1, |v| parse_u64(&v) as usize),
            threads: env_var("IDALLOC_EXPLORE_THREADS").map_or(6, |v| parse_u64(&v) as usize),
            verbose: env_var("IDALLOC_EXPLORE_VERBOSE").is_some_and(|v| v != "0"),
            shrink: env_var("IDALLOC_EXPLORE_SHRINK").is_none_or(|v| v != "0"),
            weights,
            without,
        }
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Run one case; on failure shrink it and return the report.
fn explore_case(seed: u64, s: &Settings, stats: &Stats) -> Option<String> {
    let case = gen_case(seed, s.steps, &s.weights);
    let keep: Vec<usize> = match &s.keep {
        Some(k) => k
            .iter()
            .copied()
            .filter(|i| *i < case.steps.len())
            .collect(),
        None => (0..case.steps.len()).collect(),
    };
    let t0 = Instant::now();
    let first = run_history(&case, &keep, stats);
    stats
        .first_run_ms
        .fetch_add(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
    stats.first_runs.fetch_add(1, Ordering::Relaxed);
    let first = match first {
        Ok(log) => {
            if s.verbose {
                eprintln!(
                    "case seed={seed}: {}\n{}",
                    case_header(&case),
                    log.join("\n")
                );
            }
            return None;
        }
        Err(f) => f,
    };
    let mut without = if s.without.is_empty() {
        String::new()
    } else {
        format!("IDALLOC_EXPLORE_WITHOUT={} ", s.without)
    };
    if let Some(ops) = env_var("IDALLOC_EXPLORE_FAULT_OPS") {
        without.push_str(&format!("IDALLOC_EXPLORE_FAULT_OPS={ops} "));
    }
    let steps = if s.steps == 40 {
        String::new()
    } else {
        format!("IDALLOC_EXPLORE_STEPS={} ", s.steps)
    };
    let original = first.clone();
    let keep_len = keep.len();
    let (keep, best, runs) = if s.keep.is_some() || !s.shrink {
        (keep, first, 0)
    } else {
        shrink(&case, first, stats)
    };
    let keep_s: Vec<String> = keep.iter().map(|i| i.to_string()).collect();
    let mut report = String::new();
    report.push_str(&format!(
        "\n==== explore: case seed={seed} FAILED [{}] at step {} of {}: {}\n",
        original.check, original.pos, keep_len, original.msg
    ));
    report.push_str(&format!("     {}\n", case_header(&case)));
    report.push_str(&format!(
        "---- shrunk to {} steps ({runs} runs), fails [{}]: {}\n",
        keep.len(),
        best.check,
        best.msg
    ));
    for line in &best.log {
        report.push_str(&format!("  {line}\n"));
    }
    report.push_str(&format!(
        "---- replay the case:   {steps}{without}IDALLOC_EXPLORE_SEED={seed} cargo test --test tests explore::explore_random_histories -- --nocapture\n"
    ));
    report.push_str(&format!(
        "---- replay the shrunk: {steps}{without}IDALLOC_EXPLORE_SEED={seed} IDALLOC_EXPLORE_KEEP={} cargo test --test tests explore::explore_random_histories -- --nocapture\n",
        keep_s.join(",")
    ));
    Some(report)
}

#[test]
fn explore_random_histories() {
    let s = Settings::from_env();
    let stats = Stats::default();
    let started = Instant::now();
    if let Some(seed) = s.replay {
        if let Some(report) = explore_case(seed, &s, &stats) {
            panic!("{report}");
        }
        eprintln!("explore: seed {seed} passed");
        return;
    }
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let reports: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..s.threads.max(1) {
            scope.spawn(|| loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= s.cases {
                    return;
                }
                let seed = splitmix(s.base.wrapping_add(i));
                if let Some(r) = explore_case(seed, &s, &stats) {
                    eprintln!(
                        "explore: seed {seed} failed: {}",
                        r.lines().nth(1).unwrap_or_default()
                    );
                    let mut reps = reports.lock().unwrap();
                    reps.push(r);
                    if reps.len() >= s.failures {
                        stop.store(true, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    let reports = reports.into_inner().unwrap();
    eprintln!(
        "explore: {} cases ({} steps run, incl. shrinking; a case's first run took {} ms on average) in {:.1?}: {} ranges acknowledged, {} errors, {} forks created, {} merged, {} sled rollbacks, {} store faults injected; {} failing case(s)",
        next.load(Ordering::SeqCst).min(s.cases),
        stats.steps.load(Ordering::Relaxed),
        stats.first_run_ms.load(Ordering::Relaxed) / stats.first_runs.load(Ordering::Relaxed).max(1),
        started.elapsed(),
        stats.grants.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
        stats.created.load(Ordering::Relaxed),
        stats.merged.load(Ordering::Relaxed),
        stats.rollbacks.load(Ordering::Relaxed),
        stats.faults_injected.load(Ordering::Relaxed),
        reports.len()
    );
    let kinds: Vec<String> = stats
        .error_kinds
        .lock()
        .unwrap()
        .iter()
        .map(|((op, kind), n)| format!("{op} {kind}: {n}"))
        .collect();
    eprintln!("explore: errors by operation: {}", kinds.join(", "));
    if !reports.is_empty() {
        panic!("{}", reports.join("\n"));
    }
}

// ---------------------------------------------------------------------------------
// Regression tests of known bugs.
// ---------------------------------------------------------------------------------

/// B's prefetched lease [20, 30) sits above A's lease [10, 20). B's checkpoint saw
/// "the manifest still says 30, my last write" and lowered the ceiling to its
/// granted 6, giving A's ids back: B's next lease started at 6, inside A's lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_gives_back_another_daemons_ids() {
    let env = Env::new();
    let (store, h) = common::memory_store();
    let a = open(env.config("a", LEASE), &h).await.unwrap();
    let b = open(env.config("b", LEASE), &h).await.unwrap();
    let p = Namespace::Primary;
    let mut got: Vec<(String, IdRange)> = Vec::new();
    got.push(("B".into(), b.reserve(p, Kind::Vid, 1).await.unwrap()));
    got.push(("A".into(), a.reserve(p, Kind::Vid, 1).await.unwrap()));
    got.push(("B".into(), b.reserve(p, Kind::Vid, 5).await.unwrap()));
    // B is below half its lease: its background prefetch takes the next lease,
    // above A's.
    let c = wait_for_ceiling(&store, "id_allocator.json", Kind::Vid, 30).await;
    assert!(
        c >= 30,
        "scenario precondition: B's background prefetch should have raised the ceiling to 30 (it is {c}); ranges so far {got:?}"
    );
    b.checkpoint(p).await.unwrap();
    got.push(("B".into(), b.reserve(p, Kind::Vid, 10).await.unwrap()));
    got.push(("A".into(), a.reserve(p, Kind::Vid, 5).await.unwrap()));
    crate::common::assert_disjoint_named(&got, "primary vid after B's checkpoint");
}

/// The clean-shutdown variant: B's shutdown gives back as its checkpoint did, and a
/// fresh daemon (empty data directory) adopts the lowered ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_gives_back_another_daemons_ids_at_clean_shutdown() {
    let env = Env::new();
    let (store, h) = common::memory_store();
    let a = open(env.config("a", LEASE), &h).await.unwrap();
    let b = open(env.config("b", LEASE), &h).await.unwrap();
    let p = Namespace::Primary;
    let mut got: Vec<(String, IdRange)> = Vec::new();
    got.push(("B".into(), b.reserve(p, Kind::Vid, 1).await.unwrap()));
    got.push(("A".into(), a.reserve(p, Kind::Vid, 1).await.unwrap()));
    got.push(("B".into(), b.reserve(p, Kind::Vid, 5).await.unwrap()));
    let c = wait_for_ceiling(&store, "id_allocator.json", Kind::Vid, 30).await;
    assert!(
        c >= 30,
        "scenario precondition: B's background prefetch should have raised the ceiling to 30 (it is {c}); ranges so far {got:?}"
    );
    b.shutdown().await.unwrap();
    crash(b).await;
    let fresh = open(env.config("fresh", LEASE), &h).await.unwrap();
    got.push((
        "fresh".into(),
        fresh.reserve(p, Kind::Vid, 10).await.unwrap(),
    ));
    got.push(("A".into(), a.reserve(p, Kind::Vid, 5).await.unwrap()));
    // B again, on its intact data directory.
    let b = open(env.config("b", LEASE), &h).await.unwrap();
    got.push(("B".into(), b.reserve(p, Kind::Vid, 10).await.unwrap()));
    got.push(("A".into(), a.reserve(p, Kind::Vid, 5).await.unwrap()));
    crate::common::assert_disjoint_named(&got, "primary vid after B's clean shutdown");
}

/// One 128-bit fork bootstrapped concurrently as UUID on A and as ULID on B: both
/// looked under both spellings, found nothing, and each created "its" manifest, at
/// its own path — two creators, two sets of counters starting at the same floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fork_two_spellings_two_creators() {
    let env = Env::new();
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    // Each store call yields once, so the two bootstraps interleave at every round
    // trip, as on a real store's latency.
    let sa: Arc<dyn ObjectStore> = TestStore::new(mem.clone(), Yields::Fixed(1));
    let sb: Arc<dyn ObjectStore> = TestStore::new(mem.clone(), Yields::Fixed(1));
    let a = open(env.config("a", LEASE), &handle(sa)).await.unwrap();
    let b = open(env.config("b", LEASE), &handle(sb)).await.unwrap();
    a.reserve(Namespace::Primary, Kind::Vid, 3).await.unwrap();
    for round in 0..10 {
        let value = ForkId::generate().value();
        let (fu, fl) = (spell(value, IdForm::Uuid), spell(value, IdForm::Ulid));
        let (ea, eb) = (a.clone(), b.clone());
        let ta = tokio::spawn(async move { ea.bootstrap_fork(fu, None, 0, 0).await });
        let tb = tokio::spawn(async move { eb.bootstrap_fork(fl, None, 0, 0).await });
        let (ra, rb) = (ta.await.unwrap().unwrap(), tb.await.unwrap().unwrap());
        let creators = [ra.created, rb.created].iter().filter(|c| **c).count();
        assert_eq!(
            creators, 1,
            "round {round}: fork {} bootstrapped as {} on A and {} on B: {creators} callers told created: true\nA: {ra:?}\nB: {rb:?}",
            value, fu, fl
        );
        let mut got: Vec<(String, IdRange)> = Vec::new();
        for i in 0..8 {
            let (who, e, f) = if i % 2 == 0 {
                ("A", &a, fu)
            } else {
                ("B", &b, fl)
            };
            for kind in Kind::ALL {
                let r = e.reserve(Namespace::Fork(f), kind, 4).await.unwrap();
                got.push((format!("{who} {kind}"), r));
            }
        }
        for kind in Kind::ALL {
            let ranges: Vec<(String, IdRange)> = got
                .iter()
                .filter(|(w, _)| w.ends_with(kind.as_str()))
                .cloned()
                .collect();
            crate::common::assert_disjoint_named(
                &ranges,
                &format!("round {round}: fork {fu} {kind}"),
            );
        }
    }
}

/// The create landed but its reply was lost (a time-out): the store then says
/// "already exists" to the retry, and the only caller was told created: false —
/// nobody was ever told true. Variants: the engine's own retry sees the existing
/// object, or every attempt of the first call fails and the caller's retry does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_whose_create_lands_but_reply_is_lost() {
    // (label, faults on the conditional creates, in order)
    let variants: Vec<(&str, Vec<CreateFault>)> = vec![
        ("create lands, reply lost", vec![CreateFault::LandThenFail]),
        (
            "create lands, reply lost; the engine's retry fails too",
            vec![CreateFault::LandThenFail, CreateFault::Fail],
        ),
        (
            "create lands, reply lost; the next three creates fail",
            vec![
                CreateFault::LandThenFail,
                CreateFault::Fail,
                CreateFault::Fail,
                CreateFault::Fail,
            ],
        ),
    ];
    for (label, faults) in variants {
        let env = Env::new();
        let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let sa = TestStore::new(mem.clone(), Yields::None);
        let a = open(env.config("a", LEASE), &handle(sa.clone()))
            .await
            .unwrap();
        let b = open(env.config("b", LEASE), &handle(mem.clone()))
            .await
            .unwrap();
        a.reserve(Namespace::Primary, Kind::Vid, 3).await.unwrap();
        let value = ForkId::generate().value();
        let f = spell(value, IdForm::Uuid);
        sa.create_faults.lock().unwrap().extend(faults);
        let mut replies = Vec::new();
        let request: u128 = rand::random();
        let info = loop {
            let r = a
                .bootstrap_fork_request(f, None, 7, 0, request, FloorAuthority::Any)
                .await;
            replies.push(r.clone());
            match r {
                Ok(info) => break info,
                Err(e) if e.is_retryable() && replies.len() < 20 => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("{label}: bootstrap failed for good: {e}; replies {replies:?}"),
            }
        };
        assert!(
            sa.creates_landed_then_failed.load(Ordering::SeqCst) >= 1,
            "{label}: the fault did not hit a create that landed"
        );
        assert!(
            info.created,
            "{label}: the only caller, whose create landed, was told created: false: {replies:?}"
        );
        // Another daemon, the other spelling: the fork exists, it did not create it.
        let other = b
            .bootstrap_fork(spell(value, IdForm::Ulid), None, 0, 0)
            .await
            .unwrap();
        assert!(
            !other.created,
            "{label}: a second caller was told created: true too: {other:?}"
        );
        let mut got: Vec<(String, IdRange)> = Vec::new();
        for i in 0..6 {
            let (who, e) = if i % 2 == 0 { ("A", &a) } else { ("B", &b) };
            let r = e.reserve(Namespace::Fork(f), Kind::Vid, 4).await.unwrap();
            assert!(r.start >= 7, "{label}: {who}'s {r:?} is below the floor 7");
            got.push((who.into(), r));
        }
        crate::common::assert_disjoint_named(&got, &format!("{label}: fork vid"));
    }
}
