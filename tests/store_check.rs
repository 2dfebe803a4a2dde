//! `idallocd store-check` and the start-up probe: may several daemons share this
//! store? A store whose conditional update is checked and written in two steps
//! (as stock `moto_server` and some S3-compatible servers do) must be shown
//! UNSAFE in every run, and the daemon must refuse to run multi-writer on it; a
//! serialised store (InMemory, moto behind its lock) is "not shown unsafe" —
//! never "safe", since a probe cannot prove that.
//!
//! The two-step stores here lose every race by construction (a writer that
//! passed the check waits for a second one before it writes), so the UNSAFE
//! verdicts do not depend on a server's timing happening to lose one.

use crate::common;
use crate::daemon_support;
use crate::s3_support;

use std::collections::HashMap;
use std::fmt;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use idalloc::engine::store::check::{check, Outcome, ProbeSize, StoreCheck};
use idalloc::engine::{OpenError, StoreHandle};
use idalloc_client::protocol::WriterMode;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use tokio::sync::watch;

use daemon_support::{daemon_bin, Daemon, Opts};
use s3_support::Moto;

/// A store whose conditional update is checked, then written unconditionally.
///
/// An update on a version that is not the current one is refused, so each
/// precondition alone is answered right (create-once and the stale-update check
/// pass). One that passes waits until `cohort` updates have passed the check on
/// that same version, or `hold` for a writer alone, and then overwrites: every
/// race of `cohort` writers has `cohort` winners, whatever the scheduling.
struct TwoStepStore {
    inner: Arc<dyn ObjectStore>,
    cohort: usize,
    hold: Duration,
    passed: Mutex<HashMap<Checked, watch::Sender<usize>>>,
}

/// The path and the version an update was checked against: the writers of one
/// race share it, and its sender counts how many of them passed.
type Checked = (String, Option<String>);

impl TwoStepStore {
    fn wrap(inner: Arc<dyn ObjectStore>, cohort: usize) -> Arc<TwoStepStore> {
        Arc::new(TwoStepStore {
            inner,
            cohort,
            // Paid once per probe, by its lone stale update; racers released by
            // one barrier pass the check microseconds apart.
            hold: Duration::from_secs(1),
            passed: Mutex::new(HashMap::new()),
        })
    }
}

impl fmt::Display for TwoStepStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TwoStepStore({})", self.inner)
    }
}

impl fmt::Debug for TwoStepStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TwoStepStore({:?})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for TwoStepStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let PutMode::Update(v) = &opts.mode else {
            return self.inner.put_opts(location, payload, opts).await;
        };
        let head = self.inner.head(location).await?;
        if head.e_tag != v.e_tag {
            return Err(object_store::Error::Precondition {
                path: location.to_string(),
                source: "e_tag does not match".into(),
            });
        }
        let mut passed = {
            let mut cohorts = self.passed.lock().unwrap();
            let tx = cohorts
                .entry((location.to_string(), v.e_tag.clone()))
                .or_insert_with(|| watch::channel(0).0);
            tx.send_modify(|n| *n += 1);
            tx.subscribe()
        };
        let cohort = self.cohort;
        // A lone writer's wait ends at `hold`: it then writes, and wins alone.
        let _ = tokio::time::timeout(self.hold, passed.wait_for(|n| *n >= cohort)).await;
        let opts = PutOptions {
            mode: PutMode::Overwrite,
            ..opts
        };
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

fn small(rounds: u32, writers: u32) -> ProbeSize {
    ProbeSize {
        rounds,
        writers,
        payload_bytes: 4096,
    }
}

fn assert_lost_every_race(r: &StoreCheck, rounds: u32, writers: u32) {
    assert_eq!(r.outcome, Outcome::Unsafe, "{r:?}");
    // Each precondition alone is answered right: the races are what show it.
    assert_eq!(r.create_once, Some(true), "{r:?}");
    assert_eq!(r.stale_update_refused, Some(true), "{r:?}");
    assert_eq!(r.rounds_with_several_winners, rounds, "{r:?}");
    assert_eq!(r.rounds_with_one_winner, 0, "{r:?}");
    assert_eq!(r.most_winners, writers, "{r:?}");
    assert!(r.errors.is_empty(), "{r:?}");
    assert!(
        r.verdict.contains(&format!(
            "UNSAFE for several daemons: {rounds} of {rounds} races of {writers} writers had several winners"
        )),
        "{}",
        r.verdict
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_step_store_is_shown_unsafe_in_every_race() {
    let two_step: Arc<dyn ObjectStore> = TwoStepStore::wrap(Arc::new(InMemory::new()), 8);
    let r = check(two_step.clone(), &[], "two-step://", small(20, 8)).await;
    assert_lost_every_race(&r, 20, 8);
    assert_eq!(r.clients, 1);
    // The same with the writers spread over clients of their own, as the CLI
    // does for s3/gs/az.
    let racers = vec![two_step.clone(); 8];
    let r = check(two_step, &racers, "two-step://", small(20, 8)).await;
    assert_lost_every_race(&r, 20, 8);
    assert_eq!(r.clients, 8);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["outcome"], "unsafe");
    assert_eq!(json["rounds_with_several_winners"], 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serialised_store_is_not_shown_unsafe_and_not_called_safe() {
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let r = check(mem, &[], "memory://", small(20, 8)).await;
    assert_eq!(r.outcome, Outcome::NotShownUnsafe, "{r:?}");
    assert_eq!(r.rounds_with_one_winner, 20, "{r:?}");
    assert_eq!(r.most_winners, 1, "{r:?}");
    assert!(
        r.verdict
            .contains("no race had two winners in 20 rounds of 8 writers"),
        "{}",
        r.verdict
    );
    assert!(r.verdict.contains("cannot prove it safe"), "{}", r.verdict);
    assert!(!r.verdict.contains("SAFE"), "{}", r.verdict);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["outcome"], "not_shown_unsafe");
    assert!(json.get("safe").is_none(), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_refuses_a_two_step_store_at_start_up() {
    let env = common::Env::new();
    let mut cfg = env.config("refused", 100);
    cfg.store_startup_check = true;
    let two_step = TwoStepStore::wrap(
        Arc::new(InMemory::new()),
        ProbeSize::STARTUP.writers as usize,
    );
    let handle = StoreHandle::custom(two_step, WriterMode::MultiWriter, "two-step://");
    match common::open(cfg.clone(), &handle).await {
        Err(e @ OpenError::UnsafeStore(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("UNSAFE for several daemons"), "{msg}");
            assert!(msg.contains("idallocd store-check"), "{msg}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("the daemon opened a two-step store in multi-writer mode"),
    }
    // The same probe lets a serialised store through.
    let (_, mem) = common::memory_store();
    let mut cfg = env.config("accepted", 100);
    cfg.store_startup_check = true;
    let engine = common::open(cfg, &mem).await.expect("InMemory refused");
    engine.shutdown().await.unwrap();
}

fn config(dir: &std::path::Path, moto: &Moto) -> std::path::PathBuf {
    let file = dir.join("check.toml");
    std::fs::write(&file, moto.daemon_toml("check", &moto.endpoint(), "")).unwrap();
    file
}

fn store_check(file: &std::path::Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(daemon_bin())
        .args(["store-check", "--config", file.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn moto_behind_its_lock_is_not_shown_unsafe() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let file = config(dir.path(), &moto);
    let (code, out, err) = store_check(&file, &["--rounds", "10", "--writers", "8"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("10 rounds of 8 writers on 8 client(s)"),
        "{out}"
    );
    assert!(out.contains("10 with exactly one winner"), "{out}");
    assert!(
        out.contains("not shown unsafe") && out.contains("cannot prove it safe"),
        "{out}"
    );
    assert!(!out.contains("SAFE"), "{out}");
    let (code, out, err) = store_check(&file, &["--rounds", "3", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["outcome"], "not_shown_unsafe");
    assert_eq!(v["create_once"], true);
    assert_eq!(v["stale_update_refused"], true);
    assert_eq!(v["rounds_with_one_winner"], 3);
    assert_eq!(v["clients"], ProbeSize::FULL.writers);
    assert_eq!(v["payload_bytes"], ProbeSize::FULL.payload_bytes);
    assert!(
        v["verdict"]
            .as_str()
            .unwrap()
            .contains("cannot prove it safe"),
        "{v}"
    );
}

#[test]
fn a_two_step_moto_is_unsafe_and_refused_at_start_up() {
    // moto with each conditional PUT checked by a HEAD and written unconditionally
    // once a second PUT has passed the same check: every race is lost.
    let moto = Moto::start_two_step();
    let dir = tempfile::tempdir().unwrap();
    let file = config(dir.path(), &moto);
    let (code, out, err) = store_check(&file, &["--rounds", "6", "--writers", "8"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("UNSAFE for several daemons: 6 of 6 races of 8 writers had several winners"),
        "{out}"
    );
    // The daemon probes at start-up and refuses multi-writer mode on it, in one
    // line that says how to run the full check.
    let mut d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: &moto.daemon_toml("daemon", &moto.endpoint(), ""),
            wait: false,
            ..Opts::default()
        },
    );
    let st = d.wait_exit(60);
    assert!(!st.success());
    let err = d.stderr();
    let line = err
        .lines()
        .find(|l| l.contains("UNSAFE"))
        .unwrap_or_else(|| panic!("no refusal in:\n{err}"));
    assert!(line.contains("idallocd store-check"), "{line}");
}

/// A store that fails every call (here, every put) is "unchecked", never
/// "unsafe": an outage is not evidence of two winners.
#[tokio::test]
async fn a_store_that_fails_every_call_is_unchecked_not_unsafe() {
    use crate::faults::{Fault, FaultyStore, Op};
    let mem: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let (down, ctl) = FaultyStore::wrap(mem);
    ctl.set(Op::Put, Some(Fault::Fail));
    let r = check(down, &[], "memory://down", small(3, 4)).await;
    assert_eq!(r.outcome, Outcome::Unchecked, "{r:?}");
    assert!(r.verdict.contains("could not be checked"), "{}", r.verdict);
}
