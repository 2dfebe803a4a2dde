//! Is this object store safe for several daemons? A probe of its conditional
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
//! `idallocd store-check` runs the full probe and prints the numbers; the daemon
//! runs a short one at start-up in multi-writer mode and refuses a store that
//! fails it.

use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::Serialize;

/// What the probe found.
#[derive(Debug, Clone, Serialize)]
pub struct StoreCheck {
    /// The URL probed (no secrets).
    pub store: String,
    /// The scratch prefix used (removed afterwards, as far as the store allows).
    pub prefix: String,
    /// A second create of one object was refused (`None`: the store's errors
    /// left it unknown).
    pub create_once: Option<bool>,
    /// An update on a replaced version was refused and wrote nothing (`None`:
    /// unknown).
    pub stale_update_refused: Option<bool>,
    /// Race rounds run.
    pub rounds: u32,
    /// Concurrent writers per round.
    pub writers: u32,
    /// Rounds with exactly one winner whose bytes the object then held.
    pub rounds_with_one_winner: u32,
    /// Rounds where more than one writer was told it won.
    pub rounds_with_several_winners: u32,
    /// Rounds nobody won (a store too slow or failing; not unsafe by itself).
    pub rounds_with_no_winner: u32,
    /// Store errors met (the probe's own calls), first few.
    pub errors: Vec<String>,
    /// Safe for several daemons: every check passed.
    pub safe: bool,
    /// Shown unsafe: a check failed outright (not merely cut short by errors).
    pub unsafe_shown: bool,
}

impl StoreCheck {
    /// One line for logs and the CLI.
    pub fn verdict(&self) -> String {
        if !self.safe && !self.unsafe_shown {
            return format!(
                "{}: could not be checked: {}",
                self.store,
                self.errors
                    .first()
                    .map_or("no race had a winner", String::as_str)
            );
        }
        if self.safe {
            format!(
                "{}: SAFE for several daemons (create-once, stale update refused, {}/{} races of {} writers with exactly one winner)",
                self.store, self.rounds_with_one_winner, self.rounds, self.writers
            )
        } else {
            let mut why = Vec::new();
            if self.create_once == Some(false) {
                why.push("a second create of one object was accepted".to_string());
            }
            if self.stale_update_refused == Some(false) {
                why.push("an update on a replaced version was accepted or wrote".to_string());
            }
            if self.rounds_with_several_winners > 0 {
                why.push(format!(
                    "{} of {} races of {} writers had several winners",
                    self.rounds_with_several_winners, self.rounds, self.writers
                ));
            }

            format!(
                "{}: UNSAFE for several daemons: {}",
                self.store,
                why.join("; ")
            )
        }
    }
}

fn version(r: &object_store::PutResult) -> UpdateVersion {
    UpdateVersion {
        e_tag: r.e_tag.clone(),
        version: r.version.clone(),
    }
}

/// Probe `store` (rooted at the configured prefix) under a new scratch prefix.
pub async fn check(
    store: Arc<dyn ObjectStore>,
    display_url: &str,
    rounds: u32,
    writers: u32,
) -> StoreCheck {
    let prefix = format!("idalloc/store-check/{:032x}", rand::random::<u128>());
    let mut out = StoreCheck {
        store: display_url.to_string(),
        prefix: prefix.clone(),
        create_once: None,
        stale_update_refused: None,
        rounds,
        writers: writers.max(2),
        rounds_with_one_winner: 0,
        rounds_with_several_winners: 0,
        rounds_with_no_winner: 0,
        errors: Vec::new(),
        safe: false,
        unsafe_shown: false,
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
                    out.create_once = read(&store, &a).await.map(|b| b == b"first")
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
                        out.stale_update_refused = read(&store, &b).await.map(|b| b == b"v2")
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
    for round in 0..rounds {
        let Some(v) = current.clone() else { break };
        let attempts = futures::stream::iter(0..out.writers)
            .map(|w| {
                let store = store.clone();
                let c = c.clone();
                let v = v.clone();
                async move {
                    let body = format!("round {round} writer {w}");
                    let r = store
                        .put_opts(
                            &c,
                            PutPayload::from(body.clone().into_bytes()),
                            PutOptions::from(PutMode::Update(v)),
                        )
                        .await;
                    (body, r)
                }
            })
            .buffer_unordered(out.writers as usize)
            .collect::<Vec<_>>()
            .await;
        let mut winners = Vec::new();
        for (body, r) in attempts {
            match r {
                Ok(res) => winners.push((body, version(&res))),
                Err(object_store::Error::Precondition { .. }) => {}
                Err(e) => note(&mut out, format!("race update: {e}")),
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
                    Some(held) if held == body.as_bytes() => out.rounds_with_one_winner += 1,
                    // Someone else's bytes: another writer won too, unannounced.
                    Some(_) => out.rounds_with_several_winners += 1,
                    None => out.rounds_with_no_winner += 1,
                }
                current = Some(v);
            }
            _ => {
                out.rounds_with_several_winners += 1;
                current = head_version(&store, &c).await;
            }
        }
    }
    for p in [a, b, c] {
        let _ = store.delete(&p).await;
    }
    out.safe = out.create_once == Some(true)
        && out.stale_update_refused == Some(true)
        && out.rounds_with_several_winners == 0
        && out.rounds_with_one_winner > 0;
    out.unsafe_shown = out.create_once == Some(false)
        || out.stale_update_refused == Some(false)
        || out.rounds_with_several_winners > 0;
    out
}

async fn read(store: &Arc<dyn ObjectStore>, p: &Path) -> Option<Vec<u8>> {
    let r = store.get(p).await.ok()?;
    r.bytes().await.ok().map(|b| b.to_vec())
}

async fn head_version(store: &Arc<dyn ObjectStore>, p: &Path) -> Option<UpdateVersion> {
    let m = store.head(p).await.ok()?;
    Some(UpdateVersion {
        e_tag: m.e_tag,
        version: m.version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::{Fault, FaultyStore, Op};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_memory_is_safe_and_a_non_atomic_update_is_not() {
        let mem: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let r = check(mem.clone(), "memory://", 10, 8).await;
        assert!(r.safe, "{}", r.verdict());
        assert_eq!(r.rounds_with_one_winner, 10);
        let (racy, ctl) = FaultyStore::wrap(mem);
        ctl.set(Op::Put, Some(Fault::NonAtomicUpdate));
        let r = check(racy, "memory://racy", 10, 8).await;
        assert!(!r.safe, "{}", r.verdict());
        assert!(r.rounds_with_several_winners > 0, "{r:?}");
        assert!(r.verdict().contains("UNSAFE"), "{}", r.verdict());
        assert!(r.unsafe_shown);
    }

    #[tokio::test]
    async fn a_store_that_fails_every_call_is_unchecked_not_unsafe() {
        let mem: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let (down, ctl) = FaultyStore::wrap(mem);
        ctl.set(Op::Put, Some(Fault::Fail));
        let r = check(down, "memory://down", 3, 4).await;
        assert!(!r.safe && !r.unsafe_shown, "{r:?}");
        assert!(
            r.verdict().contains("could not be checked"),
            "{}",
            r.verdict()
        );
    }
}
