//! May several daemons share this object store? A probe of its conditional
//! writes, under a scratch prefix of the configured root.
//!
//! Invariant protected: *unique* (1) in multi-writer mode, which is only as good
//! as the store's conditional write (DESIGN.md). Some S3-compatible servers answer
//! each precondition correctly but check and write in two steps, so two racing
//! writers both win; nothing in the lease protocol can notice that afterwards.
//! The probe checks, on objects of its own:
//!
//! 1. create-once: a second `PutMode::Create` of one object is refused;
//! 2. stale update refused: an update on a version that was replaced is refused,
//!    and writes nothing (the object still holds the newer content);
//! 3. races: `rounds` rounds of `writers` concurrent updates on one version, of
//!    which exactly one must win, and the object must then hold the winner's bytes.
//!
//! A probe can show a store unsafe (a race with two winners is the proof); it
//! cannot show it safe: a two-step store loses only the races whose writers meet
//! inside its window, and N rounds may meet none. So the verdict says what was
//! seen ([`Outcome::NotShownUnsafe`]), never "safe". What widens the window cheaply
//! is done: every writer of a round is a task of its own released by one barrier,
//! on a client of its own where the caller gives several (separate connections);
//! rounds alternate a short body (the requests arrive closest together) and one of
//! `payload_bytes` (a server that checks before it stores the body keeps its
//! window open while it writes it).
//!
//! `idallocd store-check` runs the full probe and prints the numbers; the daemon
//! runs a short one at start-up in multi-writer mode and refuses a store shown
//! unsafe.

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::Serialize;
use tokio::sync::Barrier;

use super::{OpenError, StoreHandle};

/// How hard the probe pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSize {
    /// Race rounds.
    pub rounds: u32,
    /// Concurrent writers per round (at least 2).
    pub writers: u32,
    /// Body size of the odd rounds, in bytes (even rounds send a short line).
    pub payload_bytes: usize,
}

impl ProbeSize {
    /// `idallocd store-check`'s defaults: a few seconds against moto on loopback,
    /// about 50 MiB sent in all.
    pub const FULL: ProbeSize = ProbeSize {
        rounds: 100,
        writers: 16,
        payload_bytes: 64 * 1024,
    };
    /// The start-up probe, run on every start in multi-writer mode: short.
    pub const STARTUP: ProbeSize = ProbeSize {
        rounds: 8,
        writers: 8,
        payload_bytes: 16 * 1024,
    };
}

/// What a probe run showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A check failed outright (a race with several winners, a second create
    /// accepted, a stale update accepted or written): ids would be handed out
    /// twice on this store.
    Unsafe,
    /// Every check passed in this run. Not a proof: a two-step store can lose
    /// none of the races of one run and many of the next.
    NotShownUnsafe,
    /// Store errors left too little to judge; not unsafe by itself.
    Unchecked,
}

/// What the probe found.
#[derive(Debug, Clone, Serialize)]
pub struct StoreCheck {
    /// The URL probed (no secrets).
    pub store: String,
    /// The scratch prefix used (removed afterwards, as far as the store allows).
    pub prefix: String,
    /// `unsafe`, `not_shown_unsafe` or `unchecked`.
    pub outcome: Outcome,
    /// The one-line verdict, as printed and logged.
    pub verdict: String,
    /// A second create of one object was refused (`None`: the store's errors
    /// left it unknown).
    pub create_once: Option<bool>,
    /// An update on a replaced version was refused and wrote nothing (`None`:
    /// unknown).
    pub stale_update_refused: Option<bool>,
    /// Race rounds asked for (fewer run if the store stopped answering).
    pub rounds: u32,
    /// Concurrent writers per round.
    pub writers: u32,
    /// Distinct store clients the writers were spread over (1: one client, whose
    /// connection pool still gives concurrent requests connections of their own).
    pub clients: u32,
    /// Body size of the odd rounds, in bytes.
    pub payload_bytes: usize,
    /// Rounds with exactly one winner whose bytes the object then held.
    pub rounds_with_one_winner: u32,
    /// Rounds where more than one writer was told it won, or the one winner's
    /// bytes were not what the object held.
    pub rounds_with_several_winners: u32,
    /// Rounds nobody won (a store too slow or failing; not unsafe by itself).
    pub rounds_with_no_winner: u32,
    /// The most writers told they won in one round.
    pub most_winners: u32,
    /// Store errors met (the probe's own calls), first few.
    pub errors: Vec<String>,
}

impl StoreCheck {
    fn judge(&mut self) {
        let shown_unsafe = self.create_once == Some(false)
            || self.stale_update_refused == Some(false)
            || self.rounds_with_several_winners > 0;
        let all_passed = self.create_once == Some(true)
            && self.stale_update_refused == Some(true)
            && self.rounds_with_one_winner > 0;
        self.outcome = if shown_unsafe {
            Outcome::Unsafe
        } else if all_passed {
            Outcome::NotShownUnsafe
        } else {
            Outcome::Unchecked
        };
        self.verdict = self.describe();
    }

    fn describe(&self) -> String {
        let run = self.rounds_with_one_winner
            + self.rounds_with_several_winners
            + self.rounds_with_no_winner;
        match self.outcome {
            Outcome::Unsafe => {
                let mut why = Vec::new();
                if self.create_once == Some(false) {
                    why.push("a second create of one object was accepted".to_string());
                }
                if self.stale_update_refused == Some(false) {
                    why.push("an update on a replaced version was accepted or wrote".to_string());
                }
                if self.rounds_with_several_winners > 0 {
                    why.push(format!(
                        "{} of {run} races of {} writers had several winners (up to {} in one race)",
                        self.rounds_with_several_winners, self.writers, self.most_winners
                    ));
                }
                format!(
                    "{}: UNSAFE for several daemons: {}",
                    self.store,
                    why.join("; ")
                )
            }
            Outcome::NotShownUnsafe => {
                let mut seen = format!(
                    "{}: not shown unsafe: a second create and a stale update were refused, and no race had two winners in {} rounds of {} writers",
                    self.store, self.rounds_with_one_winner, self.writers
                );
                if self.rounds_with_no_winner > 0 {
                    seen.push_str(&format!(
                        " ({} more rounds had no winner)",
                        self.rounds_with_no_winner
                    ));
                }
                seen.push_str(
                    "; a probe can show a store unsafe, it cannot prove it safe: rely on a store whose conditional writes are documented atomic",
                );
                seen
            }
            Outcome::Unchecked => format!(
                "{}: could not be checked: {}",
                self.store,
                self.errors
                    .first()
                    .map_or("no race had a winner", String::as_str)
            ),
        }
    }
}

/// Clients of their own for the racing writers, one per writer, where a second
/// client of the URL reaches the same store over connections of its own (`s3://`,
/// `gs://`, `az://`). None for `memory://` (a second `InMemory` would be another
/// store) or `file://` (single-writer, nothing to race).
pub fn racing_clients(
    url: &str,
    options: &[(String, String)],
    writers: u32,
) -> Result<Vec<Arc<dyn ObjectStore>>, OpenError> {
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    if matches!(scheme, "memory" | "file") {
        return Ok(Vec::new());
    }
    (0..writers.max(2))
        .map(|_| StoreHandle::from_url(url, options).map(|h| h.store))
        .collect()
}

fn version(r: &object_store::PutResult) -> UpdateVersion {
    UpdateVersion {
        e_tag: r.e_tag.clone(),
        version: r.version.clone(),
    }
}

fn race_body(round: u32, writer: u32, payload_bytes: usize) -> Bytes {
    let mut b = format!("idalloc store-check round {round} writer {writer}\n").into_bytes();
    if round % 2 == 1 {
        b.resize(payload_bytes.max(b.len()), b'.');
    }
    Bytes::from(b)
}

/// Probe `store` (rooted at the configured prefix) under a new scratch prefix.
/// Writer `w` of a round races on `racers[w % racers.len()]`, or on `store` when
/// `racers` is empty; `racers` must reach the same store as `store`.
pub async fn check(
    store: Arc<dyn ObjectStore>,
    racers: &[Arc<dyn ObjectStore>],
    display_url: &str,
    size: ProbeSize,
) -> StoreCheck {
    let prefix = format!("idalloc/store-check/{:032x}", rand::random::<u128>());
    let writers = size.writers.max(2);
    let racers: Vec<Arc<dyn ObjectStore>> = if racers.is_empty() {
        vec![store.clone()]
    } else {
        racers.to_vec()
    };
    let mut out = StoreCheck {
        store: display_url.to_string(),
        prefix: prefix.clone(),
        outcome: Outcome::Unchecked,
        verdict: String::new(),
        create_once: None,
        stale_update_refused: None,
        rounds: size.rounds,
        writers,
        clients: racers.len().min(writers as usize) as u32,
        payload_bytes: size.payload_bytes,
        rounds_with_one_winner: 0,
        rounds_with_several_winners: 0,
        rounds_with_no_winner: 0,
        most_winners: 0,
        errors: Vec::new(),
    };
    let note = |out: &mut StoreCheck, e: String| {
        if out.errors.len() < 5 {
            out.errors
                .push(e.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    };
    let create = PutOptions::from(PutMode::Create);
    // 1. Create once.
    let a = Path::from(format!("{prefix}/create-once"));
    match store
        .put_opts(&a, PutPayload::from_static(b"first"), create.clone())
        .await
    {
        Ok(_) => {
            match store
                .put_opts(&a, PutPayload::from_static(b"second"), create.clone())
                .await
            {
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => {
                    // A read that fails leaves it unknown; other bytes are a verdict.
                    out.create_once = read(&store, &a).await.map(|b| b[..] == b"first"[..])
                }
                Ok(_) => out.create_once = Some(false),
                Err(e) => note(&mut out, format!("second create: {e}")),
            }
        }
        Err(e) => note(&mut out, format!("create: {e}")),
    }
    // 2. Stale update refused, writing nothing.
    let b = Path::from(format!("{prefix}/stale-update"));
    match store
        .put_opts(&b, PutPayload::from_static(b"v1"), create.clone())
        .await
    {
        Ok(v1) => {
            let v1 = version(&v1);
            match store
                .put_opts(
                    &b,
                    PutPayload::from_static(b"v2"),
                    PutOptions::from(PutMode::Update(v1.clone())),
                )
                .await
            {
                Ok(_) => match store
                    .put_opts(
                        &b,
                        PutPayload::from_static(b"v3"),
                        PutOptions::from(PutMode::Update(v1)),
                    )
                    .await
                {
                    Err(object_store::Error::Precondition { .. }) => {
                        out.stale_update_refused =
                            read(&store, &b).await.map(|b| b[..] == b"v2"[..])
                    }
                    Ok(_) => out.stale_update_refused = Some(false),
                    Err(e) => note(&mut out, format!("stale update: {e}")),
                },
                Err(e) => note(&mut out, format!("update: {e}")),
            }
        }
        Err(e) => note(&mut out, format!("create: {e}")),
    }
    // 3. Races: one version, `writers` updates at once, exactly one winner.
    let c = Path::from(format!("{prefix}/race"));
    let mut current = match store
        .put_opts(&c, PutPayload::from_static(b"start"), create)
        .await
    {
        Ok(r) => Some(version(&r)),
        Err(e) => {
            note(&mut out, format!("create: {e}"));
            None
        }
    };
    if current.is_some() {
        // A client's first request opens its connection (and TLS session): done
        // here, so that the first round's writers do not arrive a handshake apart.
        let warm = racers.iter().map(|r| {
            let c = c.clone();
            async move { r.head(&c).await }
        });
        for r in futures::future::join_all(warm).await {
            if let Err(e) = r {
                note(&mut out, format!("head: {e}"));
            }
        }
    }
    for round in 0..size.rounds {
        let Some(v) = current.clone() else { break };
        // Tasks of their own, released together: on a multi-threaded runtime the
        // requests leave in parallel, not one poll after another.
        let start = Arc::new(Barrier::new(writers as usize));
        let attempts = (0..writers).map(|w| {
            let client = racers[w as usize % racers.len()].clone();
            let start = start.clone();
            let c = c.clone();
            let v = v.clone();
            let body = race_body(round, w, size.payload_bytes);
            tokio::spawn(async move {
                start.wait().await;
                let r = client
                    .put_opts(
                        &c,
                        PutPayload::from(body.clone()),
                        PutOptions::from(PutMode::Update(v)),
                    )
                    .await;
                (body, r)
            })
        });
        let attempts = futures::future::join_all(attempts.collect::<Vec<_>>()).await;
        let mut winners = Vec::new();
        for a in attempts {
            match a {
                Ok((body, Ok(res))) => winners.push((body, version(&res))),
                Ok((_, Err(object_store::Error::Precondition { .. }))) => {}
                Ok((_, Err(e))) => note(&mut out, format!("race update: {e}")),
                Err(e) => note(&mut out, format!("race writer: {e}")),
            }
        }
        match winners.len() {
            0 => {
                out.rounds_with_no_winner += 1;
                // Start the next round from whatever is there now.
                current = head_version(&store, &c).await;
            }
            1 => {
                let (body, v) = winners.pop().expect("one winner");
                match read(&store, &c).await {
                    Some(held) if held == body => {
                        out.rounds_with_one_winner += 1;
                        out.most_winners = out.most_winners.max(1);
                        current = Some(v);
                    }
                    // Someone else's bytes: another writer won too, unannounced.
                    Some(_) => {
                        out.rounds_with_several_winners += 1;
                        out.most_winners = out.most_winners.max(2);
                        current = head_version(&store, &c).await;
                    }
                    None => {
                        out.rounds_with_no_winner += 1;
                        current = head_version(&store, &c).await;
                    }
                }
            }
            n => {
                out.rounds_with_several_winners += 1;
                out.most_winners = out.most_winners.max(n as u32);
                current = head_version(&store, &c).await;
            }
        }
    }
    for p in [a, b, c] {
        let _ = store.delete(&p).await;
    }
    out.judge();
    out
}

async fn read(store: &Arc<dyn ObjectStore>, p: &Path) -> Option<Bytes> {
    let r = store.get(p).await.ok()?;
    r.bytes().await.ok()
}

async fn head_version(store: &Arc<dyn ObjectStore>, p: &Path) -> Option<UpdateVersion> {
    let m = store.head(p).await.ok()?;
    Some(UpdateVersion {
        e_tag: m.e_tag,
        version: m.version,
    })
}

/// The report as `idallocd store-check` prints it: what was checked, what was
/// seen, and the verdict on its own last line.
impl std::fmt::Display for StoreCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yes_no = |v: Option<bool>| match v {
            Some(true) => "ok",
            Some(false) => "FAILED",
            None => "unknown (store errors)",
        };
        writeln!(f, "create once:            {}", yes_no(self.create_once))?;
        writeln!(
            f,
            "stale update refused:   {}",
            yes_no(self.stale_update_refused)
        )?;
        writeln!(
            f,
            "races:                  {} rounds of {} writers on {} client(s), bodies of a line and {} bytes alternating",
            self.rounds, self.writers, self.clients, self.payload_bytes
        )?;
        writeln!(
            f,
            "                        {} with exactly one winner, {} with several, {} with none",
            self.rounds_with_one_winner,
            self.rounds_with_several_winners,
            self.rounds_with_no_winner
        )?;
        for e in &self.errors {
            writeln!(f, "error:                  {e}")?;
        }
        writeln!(f, "{}", self.verdict)
    }
}
