//! A model checker (stateright) for the lease protocol alone: several daemons
//! sharing one object-store ceiling, every interleaving of their steps explored up
//! to a bound.
//!
//! # What is modelled
//!
//! - **The object store** holds one counter's ceiling and a version; a conditional
//!   write is a compare-and-swap on the version. Every write (even one that leaves
//!   the value as it was) makes a new version, and versions are never reused, so a
//!   version a daemon holds is either the current one or dead for ever: the model
//!   keeps, for each manifest a daemon read or cached, its ceiling and one bit
//!   "still the current version" (cleared on every write). That is exact for
//!   compare-and-swap and keeps the state space finite.
//! - **Each daemon** has the engine's real [`Counter`] (`granted`, `lease_start`,
//!   `lease_end`, the parked `next` lease): the model calls `take`, `install`,
//!   `give_back_point`, `release_from` and `resume_at` from `src/engine/counter.rs`
//!   itself, so the arithmetic checked is the shipped one. Around it the model has
//!   the daemon's cached manifest (`MirrorState::cached`), one object-store
//!   operation at a time (the namespace's mirror lock) and whether it has verified
//!   its state since its last start.
//! - **Steps**, each one atomic, any daemon's interleaved with any other's:
//!   - *reserve* `count` in `1..=lease` when `Counter::take` can serve it from the
//!     current or the parked lease (grants take no mirror lock, so they go on while
//!     the same daemon's lease or checkpoint is in flight);
//!   - *take a lease* (a reservation that needs one, or a prefetch — offered at any
//!     moment the mirror lock is free, a superset of the engine's "headroom low and
//!     nothing parked"): use the cached manifest or read the store; then, as a
//!     separate step, write `max(ceiling, owned_end) + lease` conditionally; on a
//!     win `install(start, end)` (as `Engine::take_lease`); on a lost race forget
//!     the cache and re-read;
//!   - *checkpoint* (also the give-back of a clean stop): read the store; then,
//!     under the state lock as a separate step (grants may come in between), if
//!     the ceiling equals `owned_end` and the give-back rule gives a point `p`,
//!     `release_from(p)` locally; then conditionally write `p`
//!     (as `Engine::checkpoint_locked`);
//!   - every conditional write ends in one of three ways: *answered* (won or lost
//!     by the compare-and-swap), *landed but its reply lost* (the daemon sees an
//!     error, forgets its cache, installs nothing; the next attempt re-reads), or
//!     *failed* (never landed);
//!   - *crash and restart with the data directory intact*: the counter is kept,
//!     the cache and any operation in flight are lost, and before serving again the
//!     daemon verifies (multi-writer mode, `Engine::verify`): read, and if the
//!     ceiling is below what it owns, raise it conditionally. A clean stop is a
//!     checkpoint followed by this;
//!   - *crash and restart with the data directory lost*: the counter resumes at the
//!     store's ceiling with no lease (`Counter::resume_at`).
//! - **Ghost state** for the properties: the set of every id granted so far (a
//!   bitmask: the granted ranges are disjoint exactly when no grant hits a bit
//!   already set), the end of each daemon's last grant, and flags for violations
//!   seen at the moment of a grant.
//!
//! # What is abstracted away
//!
//! One namespace and one kind (the engine writes both kinds' ceilings in one
//! manifest; the other kind rides along unchanged here); sled and group commit (a
//! grant is durable the moment it is taken; a crash keeps every grant or, with the
//! data directory lost, all local state); power cuts that bring sled back stale
//! (the engine treats those counters as lost and `jump_to`s at least the ceiling,
//! which only ever starts higher than the lost-state restart modelled here);
//! prefetch thresholds and the retry/cool-down limits (unbounded retries here);
//! the manifest's absence at first (the store starts at ceiling 0); forks, fork
//! metadata and tombstones; object stores whose conditional write is not atomic
//! (DESIGN says nothing can protect against those).
//!
//! # What it checks (DESIGN.md)
//!
//! - rule 1, *unique*: no id is granted twice, by any daemon in any of its lives;
//! - rule 6, *ordered per daemon*: each daemon's grants increase, across restarts
//!   with its data directory intact and even lost;
//! - rule 2, *durable before reply*, for the ceiling: every granted id is below the
//!   store's ceiling at the moment of the grant, and the ceiling never falls below
//!   an id once granted;
//! - rule 9 and "Two tiers", as the lemma behind rule 1: ids a daemon owns and has
//!   not granted (its current lease's rest and its parked lease) lie below the
//!   ceiling, so no lease taken by anyone can cover them;
//! - `sometimes` properties show the search is not vacuous: two daemons granted, a
//!   checkpoint lowered the ceiling, one gave back only its parked lease, a lease
//!   jumped over another writer's, a parked lease was drawn from, a write landed
//!   with its reply lost, a restart's verification raised the ceiling.
//!
//! The old checkpoint rule — lower to `granted` whenever the ceiling equals
//! `owned_end` — is in the model behind a flag; the checker finds its duplicate
//! (issue #16, point 1) and prints the path.
//!
//! # Running it longer
//!
//! `cargo test --test tests lease_model:: -- --nocapture` prints the state counts. The
//! bounds come from the environment:
//!
//! - `IDALLOC_MODEL_IDS`: no ceiling goes above this, so every id is below it
//!   (default 9, at most 64);
//! - `IDALLOC_MODEL_LEASE`: lease size (default 3); reservations are `1..=lease`;
//! - `IDALLOC_MODEL_DAEMONS`: number of daemons (default 2, at most 3);
//! - `IDALLOC_MODEL_DEPTH`: stop exploring paths longer than this (default none:
//!   the whole bounded state space; the count printed says which).
//!
//! Keep at least three leases under the id bound (`IDS >= 3 * LEASE`): below that
//! a parked lease cannot be given back, and the test fails naming the `sometimes`
//! example it could not find.
//!
//! Measured on the 2-core machine, shared with other builds: the default (2
//! daemons, lease 3, ids < 9) is 2,162,074 states, under a minute in a debug
//! build. Longer, in release: `IDALLOC_MODEL_IDS=10` 5.7 M states (2.5 min),
//! `IDALLOC_MODEL_IDS=12` 34.7 M states (10.5 min, 3.4 GB), and three daemons
//! with `IDALLOC_MODEL_DAEMONS=3 IDALLOC_MODEL_LEASE=1 IDALLOC_MODEL_IDS=4`
//! 25.7 M states (7 min); for example
//! `IDALLOC_MODEL_IDS=12 cargo test --release --test tests lease_model:: -- --nocapture`.

use std::collections::BTreeSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::time::Instant;

use idalloc::engine::counter::Counter;
use stateright::{Checker, HasDiscoveries, Model, Path, Property};

/// How a checkpoint decides how far down it may lower the ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GiveBack {
    /// Today's rule 9: `Counter::give_back_point`.
    Rule9,
    /// The rule before issue #16: down to `granted` whenever the ceiling equals
    /// `owned_end`, blind to the gap below a parked lease taken above someone else's.
    OldGranted,
}

#[derive(Clone, Debug)]
struct LeaseModel {
    daemons: usize,
    lease: u64,
    /// No ceiling (hence no id) reaches above this.
    max_id: u64,
    give_back: GiveBack,
}

/// Ids as the state stores them: the checker copies and hashes millions of
/// states, so they are kept small; every step computes in `u64` through the
/// engine's own [`Counter`].
type Id = u8;

fn id(x: u64) -> Id {
    Id::try_from(x).expect("the model's ids stay small")
}

/// A manifest as a daemon read or cached it: the ceiling and whether its version
/// is still the store's current one (versions are never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Read {
    ceiling: Id,
    current: bool,
}

/// The daemon's object-store operation in flight (it holds the mirror lock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Op {
    Idle,
    LeaseRead,
    /// About to write `max(base.ceiling, owned_end) + lease` on `base`'s version.
    LeaseWrite(Read),
    CheckpointRead,
    /// Read done; next, under the state lock: compare with `owned_end`, release.
    CheckpointDecide(Read),
    /// Released locally down to `point`; next: write `point` on `base`'s version.
    CheckpointWrite {
        point: Id,
        base: Read,
    },
    /// Restarted with state intact: verify before serving.
    VerifyRead,
    /// The ceiling read is below `owned_end`: raise it to `target`.
    VerifyWrite {
        target: Id,
        base: Read,
    },
}

/// The engine's [`Counter`], stored small.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ctr {
    granted: Id,
    lease_start: Id,
    lease_end: Id,
    next: Option<(Id, Id)>,
}

impl Ctr {
    fn get(self) -> Counter {
        Counter {
            granted: self.granted.into(),
            lease_start: self.lease_start.into(),
            lease_end: self.lease_end.into(),
            next: self.next.map(|(s, e)| (s.into(), e.into())),
        }
    }

    fn put(c: Counter) -> Ctr {
        Ctr {
            granted: id(c.granted),
            lease_start: id(c.lease_start),
            lease_end: id(c.lease_end),
            next: c.next.map(|(s, e)| (id(s), id(e))),
        }
    }

    /// What the fingerprint sees. `lease_start` (kept for `status` only) is
    /// left out: no step reads it, so states that differ only there are one.
    fn key(self) -> (Id, Id, Option<(Id, Id)>) {
        (self.granted, self.lease_end, self.next)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Daemon {
    counter: Ctr,
    cached: Option<Read>,
    op: Op,
    verified: bool,
    /// Ghost: end of this daemon's last grant (in any of its lives).
    last_end: Option<Id>,
}

type DaemonKey = (
    (Id, Id, Option<(Id, Id)>),
    Option<Read>,
    Op,
    bool,
    Option<Id>,
);

impl Daemon {
    fn c(&self) -> Counter {
        self.counter.get()
    }

    fn set_c(&mut self, c: Counter) {
        self.counter = Ctr::put(c);
    }

    fn key(&self) -> DaemonKey {
        (
            self.counter.key(),
            self.cached,
            self.op,
            self.verified,
            self.last_end,
        )
    }
}

// Ghost flags. Violations are part of the fingerprint; the witnesses of the
// `sometimes` properties are not (they record that the path to this state went
// through an event, and must not multiply the state space).
const DUPLICATE: u8 = 1;
const DISORDER: u8 = 1 << 1;
const ABOVE_CEILING: u8 = 1 << 2;

const LOWERED: u8 = 1;
const PARKED_GIVEN_BACK: u8 = 1 << 1;
const JUMPED: u8 = 1 << 2;
const DREW_PARKED: u8 = 1 << 3;
const LANDED_REPLY_LOST: u8 = 1 << 4;
const VERIFY_RAISED: u8 = 1 << 5;

/// At most this many daemons (a state is a plain array, no heap).
const MAX_DAEMONS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    /// The store's ceiling.
    ceiling: Id,
    /// `daemons[..n]` take part.
    daemons: [Daemon; MAX_DAEMONS],
    n: usize,
    /// Ghost: every id granted so far, by anyone (bit `i` for id `i`).
    history: u64,
    /// Ghost: violations seen at a grant.
    violations: u8,
    /// Ghost: events seen on the path here (not fingerprinted).
    seen: u8,
}

impl State {
    fn ds(&self) -> &[Daemon] {
        &self.daemons[..self.n]
    }

    fn ceiling(&self) -> u64 {
        self.ceiling.into()
    }
}

impl Hash for State {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Daemons are interchangeable: fingerprint them as a sorted list. That is
        // symmetry reduction for the BFS checker (which has none built in); the
        // paths it reports are still real ones, with each daemon's own name.
        let mut ds = self.daemons.map(|d| d.key());
        ds[..self.n].sort();
        (self.ceiling, &ds[..self.n], self.history, self.violations).hash(h);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Reserve { d: usize, count: u64 },
    TakeLease { d: usize },
    Checkpoint { d: usize },
    Read { d: usize },
    Decide { d: usize },
    WriteAnswered { d: usize },
    WriteLandsReplyLost { d: usize },
    WriteFails { d: usize },
    CrashKeepState { d: usize },
    CrashLoseState { d: usize },
}

fn name(d: usize) -> char {
    (b'A' + d as u8) as char
}

impl fmt::Debug for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::Reserve { d, count } => write!(f, "{}: reserve {count}", name(d)),
            Action::TakeLease { d } => write!(f, "{}: take a lease", name(d)),
            Action::Checkpoint { d } => write!(f, "{}: checkpoint", name(d)),
            Action::Read { d } => write!(f, "{}: read the store", name(d)),
            Action::Decide { d } => write!(f, "{}: checkpoint decides", name(d)),
            Action::WriteAnswered { d } => write!(f, "{}: conditional write answered", name(d)),
            Action::WriteLandsReplyLost { d } => {
                write!(f, "{}: conditional write lands, reply lost", name(d))
            }
            Action::WriteFails { d } => write!(f, "{}: conditional write fails", name(d)),
            Action::CrashKeepState { d } => write!(f, "{}: crash, data dir intact", name(d)),
            Action::CrashLoseState { d } => write!(f, "{}: crash, data dir lost", name(d)),
        }
    }
}

impl LeaseModel {
    fn point(&self, c: &Counter) -> Option<u64> {
        match self.give_back {
            GiveBack::Rule9 => c.give_back_point(),
            GiveBack::OldGranted => (c.granted < c.owned_end()).then_some(c.granted),
        }
    }

    /// The lease a write on `base` asks for (as `Engine::take_lease`).
    fn lease_for(&self, c: &Counter, base: Read) -> (u64, u64) {
        let start = u64::from(base.ceiling).max(c.owned_end());
        (start, start + self.lease)
    }

    /// What the pending write would put in the store, if the bound allows it.
    fn write_value(&self, dm: &Daemon) -> Option<u64> {
        match dm.op {
            Op::LeaseWrite(base) => {
                let (_, end) = self.lease_for(&dm.c(), base);
                (end <= self.max_id).then_some(end)
            }
            Op::CheckpointWrite { point, .. } => Some(point.into()),
            Op::VerifyWrite { target, .. } => Some(target.into()),
            _ => None,
        }
    }

    fn write_base(op: Op) -> Option<Read> {
        match op {
            Op::LeaseWrite(base)
            | Op::CheckpointWrite { base, .. }
            | Op::VerifyWrite { base, .. } => Some(base),
            _ => None,
        }
    }
}

/// A write landed: every version anyone holds is now stale.
fn store_write(s: &mut State, value: u64) {
    s.ceiling = id(value);
    for dm in &mut s.daemons {
        if let Some(r) = &mut dm.cached {
            r.current = false;
        }
        match &mut dm.op {
            Op::LeaseWrite(base)
            | Op::CheckpointDecide(base)
            | Op::CheckpointWrite { base, .. }
            | Op::VerifyWrite { base, .. } => base.current = false,
            _ => {}
        }
    }
}

impl Model for LeaseModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let fresh = Daemon {
            counter: Ctr::put(Counter::resume_at(0)),
            cached: None,
            op: Op::Idle,
            verified: true,
            last_end: None,
        };
        vec![State {
            ceiling: 0,
            daemons: [fresh; MAX_DAEMONS],
            n: self.daemons,
            history: 0,
            violations: 0,
            seen: 0,
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        for (d, dm) in s.ds().iter().enumerate() {
            let c = dm.c();
            if dm.verified {
                for count in 1..=self.lease {
                    if c.can_take(count) {
                        actions.push(Action::Reserve { d, count });
                    }
                }
                if dm.op == Op::Idle {
                    actions.push(Action::TakeLease { d });
                    if self.point(&c).is_some() {
                        actions.push(Action::Checkpoint { d });
                    }
                }
            }
            match dm.op {
                Op::Idle => {}
                Op::LeaseRead | Op::CheckpointRead | Op::VerifyRead => {
                    actions.push(Action::Read { d })
                }
                Op::CheckpointDecide(_) => actions.push(Action::Decide { d }),
                Op::LeaseWrite(base)
                | Op::CheckpointWrite { base, .. }
                | Op::VerifyWrite { base, .. } => {
                    let value = self.write_value(dm);
                    // A stale version is refused whatever it asks for.
                    if !base.current || value.is_some() {
                        actions.push(Action::WriteAnswered { d });
                    }
                    if base.current && value.is_some() {
                        actions.push(Action::WriteLandsReplyLost { d });
                    }
                    actions.push(Action::WriteFails { d });
                }
            }
            // Crashes that would change nothing (self-loops) are left out.
            if dm.verified || dm.op != Op::VerifyRead || dm.cached.is_some() {
                actions.push(Action::CrashKeepState { d });
            }
            let reborn = Ctr::put(Counter::resume_at(s.ceiling()));
            if dm.counter.key() != reborn.key()
                || dm.op != Op::Idle
                || !dm.verified
                || dm.cached.is_some()
            {
                actions.push(Action::CrashLoseState { d });
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = *last;
        match action {
            Action::Reserve { d, count } => {
                let ceiling = s.ceiling();
                let dm = &mut s.daemons[d];
                let mut c = dm.c();
                let parked = c.next;
                let r = c.take(count).expect("offered only when it fits");
                dm.set_c(c);
                if parked.is_some() && c.next.is_none() {
                    s.seen |= DREW_PARKED;
                }
                if dm.last_end.is_some_and(|e| r.start < e.into()) {
                    s.violations |= DISORDER;
                }
                if r.end > ceiling {
                    s.violations |= ABOVE_CEILING;
                }
                dm.last_end = Some(id(r.end));
                for i in r.start..r.end {
                    assert!(i < 64, "ids are tracked in a u64 bitmask");
                    if s.history & (1 << i) != 0 {
                        s.violations |= DUPLICATE;
                    }
                    s.history |= 1 << i;
                }
            }
            Action::TakeLease { d } => {
                let dm = &mut s.daemons[d];
                dm.op = match dm.cached {
                    Some(r) => Op::LeaseWrite(r),
                    None => Op::LeaseRead,
                };
            }
            Action::Checkpoint { d } => s.daemons[d].op = Op::CheckpointRead,
            Action::Read { d } => {
                let r = Read {
                    ceiling: s.ceiling,
                    current: true,
                };
                let dm = &mut s.daemons[d];
                dm.op = match dm.op {
                    Op::LeaseRead => Op::LeaseWrite(r),
                    Op::CheckpointRead => Op::CheckpointDecide(r),
                    Op::VerifyRead => {
                        let owned = dm.c().owned_end();
                        if u64::from(r.ceiling) < owned {
                            Op::VerifyWrite {
                                target: id(owned),
                                base: r,
                            }
                        } else {
                            dm.verified = true;
                            dm.cached = Some(r);
                            Op::Idle
                        }
                    }
                    other => unreachable!("read offered in {other:?}"),
                };
            }
            Action::Decide { d } => {
                let dm = &mut s.daemons[d];
                let Op::CheckpointDecide(base) = dm.op else {
                    unreachable!("decide offered in {:?}", dm.op)
                };
                let mut c = dm.c();
                let point = if u64::from(base.ceiling) == c.owned_end() {
                    self.point(&c)
                } else {
                    None
                };
                dm.op = match point {
                    Some(p) => {
                        if c.next.is_some_and(|(ps, _)| ps == p && ps > c.lease_end) {
                            s.seen |= PARKED_GIVEN_BACK;
                        }
                        c.release_from(p);
                        dm.set_c(c);
                        Op::CheckpointWrite { point: id(p), base }
                    }
                    None => Op::Idle,
                };
            }
            Action::WriteAnswered { d } => {
                let op = s.daemons[d].op;
                let base = LeaseModel::write_base(op).expect("a write in flight");
                if !base.current {
                    // Lost the race: forget the cache; a lease re-reads at once,
                    // a verification retries, a checkpoint leaves it.
                    let dm = &mut s.daemons[d];
                    dm.cached = None;
                    dm.op = match op {
                        Op::LeaseWrite(_) => Op::LeaseRead,
                        Op::VerifyWrite { .. } => Op::VerifyRead,
                        _ => Op::Idle,
                    };
                } else {
                    let value = self.write_value(&s.daemons[d]).expect("within the bound");
                    let before = s.ceiling();
                    store_write(&mut s, value);
                    let dm = &mut s.daemons[d];
                    match op {
                        Op::LeaseWrite(base) => {
                            let mut c = dm.c();
                            let (start, end) = self.lease_for(&c, base);
                            if start > c.owned_end() {
                                s.seen |= JUMPED;
                            }
                            c.install(start, end);
                            dm.set_c(c);
                        }
                        Op::CheckpointWrite { .. } => {
                            if value < before {
                                s.seen |= LOWERED;
                            }
                        }
                        Op::VerifyWrite { .. } => {
                            s.seen |= VERIFY_RAISED;
                            dm.verified = true;
                        }
                        _ => unreachable!(),
                    }
                    dm.cached = Some(Read {
                        ceiling: id(value),
                        current: true,
                    });
                    dm.op = Op::Idle;
                }
            }
            Action::WriteLandsReplyLost { d } => {
                let op = s.daemons[d].op;
                let value = self.write_value(&s.daemons[d]).expect("within the bound");
                store_write(&mut s, value);
                s.seen |= LANDED_REPLY_LOST;
                let dm = &mut s.daemons[d];
                dm.cached = None;
                dm.op = match op {
                    Op::VerifyWrite { .. } => Op::VerifyRead,
                    _ => Op::Idle,
                };
            }
            Action::WriteFails { d } => {
                let dm = &mut s.daemons[d];
                dm.cached = None;
                dm.op = match dm.op {
                    Op::VerifyWrite { .. } => Op::VerifyRead,
                    _ => Op::Idle,
                };
            }
            Action::CrashKeepState { d } => {
                let dm = &mut s.daemons[d];
                dm.cached = None;
                dm.op = Op::VerifyRead;
                dm.verified = false;
            }
            Action::CrashLoseState { d } => {
                let ceiling = s.ceiling();
                let dm = &mut s.daemons[d];
                dm.set_c(Counter::resume_at(ceiling));
                dm.cached = None;
                dm.op = Op::Idle;
                dm.verified = true;
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(UNIQUE, |_, s: &State| s.violations & DUPLICATE == 0),
            Property::always("ordered: each daemon's grants increase", |_, s: &State| {
                s.violations & DISORDER == 0
            }),
            Property::always(
                "durable: granted below the ceiling at the grant",
                |_, s: &State| s.violations & ABOVE_CEILING == 0,
            ),
            Property::always(
                "the ceiling never falls below a granted id",
                |_, s: &State| s.ceiling >= 64 || s.history >> s.ceiling == 0,
            ),
            Property::always(
                "owned, ungranted ids lie below the ceiling",
                |_, s: &State| {
                    s.ds().iter().all(|dm| {
                        let c = dm.counter;
                        (c.granted >= c.lease_end || c.lease_end <= s.ceiling)
                            && c.next.is_none_or(|(_, e)| e <= s.ceiling)
                    })
                },
            ),
            Property::sometimes("two daemons granted ids", |_, s: &State| {
                s.ds().iter().filter(|d| d.last_end.is_some()).count() >= 2
            }),
            Property::sometimes("a checkpoint lowered the ceiling", |_, s: &State| {
                s.seen & LOWERED != 0
            }),
            Property::sometimes(
                "a checkpoint gave back only its parked lease",
                |_, s: &State| s.seen & PARKED_GIVEN_BACK != 0,
            ),
            Property::sometimes("a lease jumped over another writer's", |_, s: &State| {
                s.seen & JUMPED != 0
            }),
            Property::sometimes("a grant drew from the parked lease", |_, s: &State| {
                s.seen & DREW_PARKED != 0
            }),
            Property::sometimes("a write landed with its reply lost", |_, s: &State| {
                s.seen & LANDED_REPLY_LOST != 0
            }),
            Property::sometimes(
                "a restart's verification raised the ceiling",
                |_, s: &State| s.seen & VERIFY_RAISED != 0,
            ),
        ]
    }
}

const UNIQUE: &str = "unique: no id granted twice";

fn env_u64(var: &str, default: u64) -> u64 {
    match std::env::var(var) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{var}={v:?} is not a number: {e}")),
        Err(_) => default,
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn summary(s: &State) -> String {
    let ds: Vec<String> = s
        .ds()
        .iter()
        .enumerate()
        .map(|(d, dm)| {
            let c = dm.c();
            let next = c
                .next
                .map_or(String::new(), |(a, b)| format!(" parked [{a},{b})"));
            format!(
                "{}: granted {} lease [{},{}){next}",
                name(d),
                c.granted,
                c.lease_start,
                c.lease_end
            )
        })
        .collect();
    format!("ceiling {} | {}", s.ceiling, ds.join(" | "))
}

/// One line per step: what the step did and the state after it.
fn describe(model: &LeaseModel, path: Path<State, Action>) -> Vec<String> {
    let steps = path.into_vec();
    let mut out = Vec::new();
    for w in steps.windows(2) {
        let (before, Some(action)) = &w[0] else {
            continue;
        };
        let after = &w[1].0;
        let what = match *action {
            Action::Reserve { d, count } => {
                let r = before.daemons[d].c().take(count).unwrap();
                let dup = if (r.start..r.end).any(|i| before.history & (1 << i) != 0) {
                    "  <-- DUPLICATE"
                } else {
                    ""
                };
                format!("{}: grants [{},{}){dup}", name(d), r.start, r.end)
            }
            Action::WriteAnswered { d } => {
                let dm = &before.daemons[d];
                let base = LeaseModel::write_base(dm.op).unwrap();
                let what = match dm.op {
                    Op::LeaseWrite(b) => {
                        let (s, e) = model.lease_for(&dm.c(), b);
                        format!("lease [{s},{e})")
                    }
                    Op::CheckpointWrite { point, .. } => format!("lower the ceiling to {point}"),
                    Op::VerifyWrite { target, .. } => format!("raise the ceiling to {target}"),
                    _ => unreachable!(),
                };
                if base.current {
                    format!("{}: wins {what}", name(d))
                } else {
                    format!("{}: loses {what} (stale version)", name(d))
                }
            }
            Action::Decide { d } => {
                let (b, a) = (before.daemons[d].c(), after.daemons[d].c());
                if a == b {
                    format!("{}: checkpoint decides: nothing to give back", name(d))
                } else {
                    format!(
                        "{}: checkpoint releases from {} (owned up to {})",
                        name(d),
                        a.owned_end(),
                        b.owned_end()
                    )
                }
            }
            _ => format!("{action:?}"),
        };
        out.push(format!("{what:<48} => {}", summary(after)));
    }
    out
}

/// Apply `actions` one by one, each of which must be offered.
fn replay(model: &LeaseModel, actions: &[Action]) -> State {
    let mut s = model.init_states().remove(0);
    for a in actions {
        let mut offered = Vec::new();
        model.actions(&s, &mut offered);
        assert!(offered.contains(a), "{a:?} not offered in {}", summary(&s));
        s = model.next_state(&s, *a).unwrap();
    }
    s
}

#[test]
fn rule9_protocol_holds_over_the_bounded_state_space() {
    let model = LeaseModel {
        daemons: env_u64("IDALLOC_MODEL_DAEMONS", 2) as usize,
        lease: env_u64("IDALLOC_MODEL_LEASE", 3),
        max_id: env_u64("IDALLOC_MODEL_IDS", 9),
        give_back: GiveBack::Rule9,
    };
    assert!(model.max_id <= 64, "IDALLOC_MODEL_IDS is at most 64");
    assert!(
        (1..=MAX_DAEMONS).contains(&model.daemons),
        "IDALLOC_MODEL_DAEMONS is 1 to {MAX_DAEMONS}"
    );
    let depth = std::env::var("IDALLOC_MODEL_DEPTH")
        .ok()
        .map(|_| env_u64("IDALLOC_MODEL_DEPTH", 0) as usize);
    let t0 = Instant::now();
    let mut builder = model.clone().checker().threads(threads());
    if let Some(depth) = depth {
        builder = builder.target_max_depth(depth);
    }
    let checker = builder.spawn_bfs().join();
    println!(
        "lease model, rule 9: {} daemons, lease {}, ids < {}, depth bound {}: \
         {} unique states ({} generated), max depth {}, {:.1?}",
        model.daemons,
        model.lease,
        model.max_id,
        depth.map_or("none".to_string(), |d| d.to_string()),
        checker.unique_state_count(),
        checker.state_count(),
        checker.max_depth(),
        t0.elapsed()
    );
    let mut found: Vec<&str> = checker.discoveries().into_keys().collect();
    found.sort();
    println!("  examples found: {}", found.join("; "));
    checker.assert_properties();
}

#[test]
fn old_checkpoint_rule_hands_out_ids_twice() {
    let model = LeaseModel {
        daemons: 2,
        lease: 3,
        max_id: 9,
        give_back: GiveBack::OldGranted,
    };
    let t0 = Instant::now();
    // One thread: the same counterexample every run (BFS order, so among the
    // shortest).
    let checker = model
        .clone()
        .checker()
        .threads(1)
        .finish_when(HasDiscoveries::AnyOf(BTreeSet::from([UNIQUE])))
        .spawn_bfs()
        .join();
    let path = checker.assert_any_discovery(UNIQUE);
    println!(
        "lease model, old checkpoint rule: duplicate found after {} unique states, {:.1?}; \
         the path ({} steps):",
        checker.unique_state_count(),
        t0.elapsed(),
        path.clone().into_actions().len()
    );
    for line in describe(&model, path.clone()) {
        println!("  {line}");
    }
    assert!(path.last_state().violations & DUPLICATE != 0);
}

/// Issue #16 point 1, replayed step by step with leases of 10: B leases [0,10),
/// A leases [10,20) and grants from it, B prefetches [20,30) and has granted 6.
/// The old rule lowers the ceiling to 6, and B's next lease [6,16) re-grants A's
/// ids; rule 9 gives back only [20,30), and B's next lease starts at 20.
#[test]
fn issue16_scenario_replayed() {
    let (a, b) = (0, 1);
    let steps = [
        Action::TakeLease { d: b },
        Action::Read { d: b },
        Action::WriteAnswered { d: b }, // B: [0,10)
        Action::TakeLease { d: a },
        Action::Read { d: a },
        Action::WriteAnswered { d: a }, // A: [10,20)
        Action::Reserve { d: a, count: 3 },
        Action::TakeLease { d: b },     // B prefetches on its cache...
        Action::WriteAnswered { d: b }, // ...which is stale: lost, re-read
        Action::Read { d: b },
        Action::WriteAnswered { d: b }, // B: parked [20,30)
        Action::Reserve { d: b, count: 6 },
        Action::Checkpoint { d: b },
        Action::Read { d: b },
        Action::Decide { d: b },
        Action::WriteAnswered { d: b },
        Action::TakeLease { d: b },
        Action::WriteAnswered { d: b },
        Action::Reserve { d: b, count: 10 },
    ];
    let model = |give_back| LeaseModel {
        daemons: 2,
        lease: 10,
        max_id: 40,
        give_back,
    };
    let old = replay(&model(GiveBack::OldGranted), &steps);
    println!("old rule: {}", summary(&old));
    assert_eq!(old.violations & DUPLICATE, DUPLICATE, "{}", summary(&old));

    let fixed = replay(&model(GiveBack::Rule9), &steps);
    println!("rule 9:   {}", summary(&fixed));
    assert_eq!(fixed.violations, 0, "{}", summary(&fixed));
    // B gave [20,30) back, kept [6,10), leased [20,30) again above A's lease and,
    // needing 10 at once, jumped to it.
    assert_eq!(fixed.ceiling, 30);
    assert_eq!(fixed.daemons[b].last_end, Some(30));
}
