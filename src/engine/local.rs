//! The sled tier: where grants are made durable, and the group committer that
//! makes them durable together.
//!
//! Invariant protected: *durable before reply* (2). Every reservation waits for a
//! `flush()` that happened after its grant was written. One committer thread drains
//! the queue of waiting reservations, writes the latest state of each namespace they
//! touched, flushes once and answers them all (group commit). sled's `flush_async`
//! hangs under concurrency in 0.34.7 (DESIGN.md), and a dedicated thread calling the
//! blocking `flush()` costs no tokio worker. A lone writer (no other commit in
//! flight for a streak of them) skips the hand-off and writes on its own thread,
//! under `block_in_place`. Either way one writer at a time snapshots, writes and
//! flushes, so a state on disk is never replaced by an older one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::counter::Counter;
use super::manifest::ForkMeta;
use super::OpenError;

/// One namespace as sled keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NsRecord {
    /// The fork id in the text form it was first bootstrapped with; `None` = primary.
    pub fork: Option<String>,
    /// Parent, floors and tombstone.
    pub meta: ForkMeta,
    /// vid and eid counters.
    pub counters: [Counter; 2],
    /// The counters may be behind the store; see `NsState::stale`.
    #[serde(default)]
    pub stale: bool,
}

/// Daemon-wide facts used to decide whether sled can be trusted at the next start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetaRecord {
    /// Kernel boot id when the state was last written (`""` when unknown).
    pub boot_id: String,
    /// True only after a clean shutdown flushed everything.
    pub clean: bool,
}

const META_KEY: &[u8] = b"meta";
const NS_PREFIX: &[u8] = b"ns/";

/// sled key of a namespace record.
pub fn ns_key(fork_value: Option<u128>) -> Vec<u8> {
    match fork_value {
        None => b"ns/primary".to_vec(),
        Some(v) => format!("ns/{v:032x}").into_bytes(),
    }
}

/// Something whose latest state the committer writes under `key`.
pub type Snapshot = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

struct Job {
    key: Vec<u8>,
    snapshot: Snapshot,
    done: oneshot::Sender<Result<(), String>>,
}

/// What was found in the data directory at open.
pub struct Loaded {
    /// The meta record, `None` when sled was empty (new or lost data directory).
    pub meta: Option<MetaRecord>,
    /// Every namespace record.
    pub records: Vec<NsRecord>,
    /// Where a corrupt database was moved, if one was.
    pub moved_aside: Option<PathBuf>,
}

/// The local, hot tier.
pub struct Local {
    db: sled::Db,
    jobs: mpsc::Sender<Job>,
    writer: Arc<Writer>,
    /// Commits requested and not yet answered, by either path.
    pending: AtomicUsize,
    /// Commits in a row that found no other commit in flight.
    solo_streak: AtomicU64,
}

/// Commits in a row that must have run alone before one is written on the
/// caller's thread: a lone writer qualifies after a few dozen requests, while
/// under concurrent load (where a commit now and then still finds the queue
/// empty) the streak keeps breaking and every commit goes to the group.
const SOLO_STREAK: u64 = 64;

/// What both commit paths share: the one writer of sled records at a time.
struct Writer {
    db: sled::Db,
    /// Held across snapshot, insert and flush, so that a record written later was
    /// also snapshotted later: states only move forward on disk.
    lock: Mutex<()>,
    flushes: AtomicU64,
}

impl Writer {
    /// Write the latest state of each key and flush once; the result covers every
    /// reservation whose grant those states include.
    fn write(
        &self,
        keys: &mut dyn Iterator<Item = (&[u8], &Snapshot)>,
        jobs: usize,
    ) -> Result<(), String> {
        let _one_writer = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let mut result = Ok(());
        for (key, snap) in keys {
            if let Err(e) = self.db.insert(key, snap()) {
                result = Err(format!("local write failed: {e}"));
                break;
            }
        }
        if result.is_ok() {
            if let Err(e) = self.db.flush() {
                result = Err(format!("local flush failed: {e}"));
            }
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("idalloc_flushes_total").increment(1);
        metrics::histogram!("idalloc_flush_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("idalloc_flush_batch_size").record(jobs as f64);
        if let Err(e) = &result {
            tracing::error!(error = %e, "sled commit failed; the reservations in this group are not granted");
        }
        result
    }
}

/// Counts a commit as pending until dropped (also when its caller goes away).
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Local {
    /// Open (or create) sled under `dir`. A database sled cannot open is moved aside
    /// and a new one started, as if the data directory had been lost: the object
    /// store then decides where counters resume, which is never below any grant.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<(Local, Loaded), OpenError> {
        std::fs::create_dir_all(dir).map_err(|e| OpenError::DataDir {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut moved_aside = None;
        let db = match open_sled(dir, cache_bytes) {
            Ok(db) => db,
            Err(e) if is_lock_error(&e) => {
                return Err(OpenError::Locked(dir.display().to_string()))
            }
            Err(e) => {
                let aside = dir.with_file_name(format!(
                    "{}.corrupt-{}",
                    dir.file_name().and_then(|n| n.to_str()).unwrap_or("sled"),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                ));
                tracing::error!(
                    dir = %dir.display(),
                    moved_to = %aside.display(),
                    error = %e,
                    "local database cannot be opened; moving it aside and recovering from the object store"
                );
                std::fs::rename(dir, &aside).map_err(|e2| OpenError::DataDir {
                    path: dir.display().to_string(),
                    reason: format!("cannot be opened ({e}) nor moved aside ({e2})"),
                })?;
                moved_aside = Some(aside);
                open_sled(dir, cache_bytes).map_err(|e| OpenError::DataDir {
                    path: dir.display().to_string(),
                    reason: e.to_string(),
                })?
            }
        };
        let loaded = load(&db, moved_aside).map_err(|reason| OpenError::DataDir {
            path: dir.display().to_string(),
            reason,
        })?;
        let (tx, rx) = mpsc::channel();
        let writer = Arc::new(Writer {
            db: db.clone(),
            lock: Mutex::new(()),
            flushes: AtomicU64::new(0),
        });
        let w = writer.clone();
        std::thread::Builder::new()
            .name("idalloc-commit".into())
            .spawn(move || committer(&w, rx))
            .map_err(|e| OpenError::DataDir {
                path: dir.display().to_string(),
                reason: format!("cannot start the commit thread: {e}"),
            })?;
        Ok((
            Local {
                db,
                jobs: tx,
                writer,
                pending: AtomicUsize::new(0),
                solo_streak: AtomicU64::new(0),
            },
            loaded,
        ))
    }

    /// Write the latest state under `key` and return once it is flushed.
    ///
    /// A commit that is the only one in flight, after a streak of such commits, is
    /// written on the caller's thread (under `block_in_place`, so the runtime's
    /// other tasks move to another thread meanwhile): handing it to the commit
    /// thread and back costs two thread wake-ups, as long as the flush itself. As
    /// soon as commits overlap they go to the commit thread, which flushes them in
    /// groups.
    pub async fn commit(&self, key: Vec<u8>, snapshot: Snapshot) -> Result<(), String> {
        let alone = self.pending.fetch_add(1, Ordering::AcqRel) == 0;
        let _pending = Pending(&self.pending);
        let streak = if alone {
            self.solo_streak.fetch_add(1, Ordering::Relaxed)
        } else {
            self.solo_streak.store(0, Ordering::Relaxed);
            0
        };
        if alone
            && streak >= SOLO_STREAK
            && tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
        {
            return tokio::task::block_in_place(|| {
                self.writer
                    .write(&mut std::iter::once((key.as_slice(), &snapshot)), 1)
            });
        }
        let (done, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                key,
                snapshot,
                done,
            })
            .map_err(|_| "the commit thread has stopped".to_string())?;
        rx.await
            .map_err(|_| "the commit thread has stopped".to_string())?
    }

    /// Record the meta record durably.
    pub async fn write_meta(&self, meta: &MetaRecord) -> Result<(), String> {
        let bytes = serde_json::to_vec(meta).expect("meta serialises");
        self.commit(META_KEY.to_vec(), Arc::new(move || bytes.clone()))
            .await
    }

    /// Whether commits have been coming one at a time, each alone in flight, for a
    /// streak long enough that they are written on the caller's thread: one writer
    /// waiting on each flush, whose latency is all that matters. Any overlap ends it.
    pub fn lone_writer(&self) -> bool {
        self.solo_streak.load(Ordering::Relaxed) >= SOLO_STREAK
    }

    /// sled flushes since open (one per group of commits).
    pub fn flushes(&self) -> u64 {
        self.writer.flushes.load(Ordering::Relaxed)
    }

    /// Make everything sled has written durable with `fsync` — its own flush is
    /// `sync_file_range`, which a power cut does not keep: every file under the
    /// database directory, then the directories. For the end of a clean shutdown,
    /// after the last commit.
    pub async fn sync_all(&self, dir: &Path) -> Result<(), String> {
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || sync_tree(&dir))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("fsync of the local database: {e}"))
    }

    /// The underlying database size on disk, for logs.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

fn open_sled(dir: &Path, cache_bytes: u64) -> sled::Result<sled::Db> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        // We flush ourselves, once per group of reservations.
        .flush_every_ms(None)
        .open()
}

fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

fn load(db: &sled::Db, moved_aside: Option<PathBuf>) -> Result<Loaded, String> {
    let meta = match db.get(META_KEY).map_err(|e| e.to_string())? {
        None => None,
        Some(v) => Some(serde_json::from_slice(&v).map_err(|e| format!("meta record: {e}"))?),
    };
    let mut records = Vec::new();
    for kv in db.scan_prefix(NS_PREFIX) {
        let (k, v) = kv.map_err(|e| e.to_string())?;
        let rec: NsRecord = serde_json::from_slice(&v)
            .map_err(|e| format!("record {}: {e}", String::from_utf8_lossy(&k)))?;
        records.push(rec);
    }
    Ok(Loaded {
        meta,
        records,
        moved_aside,
    })
}

fn committer(writer: &Writer, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 65_536 {
                break;
            }
        }
        // The latest state of each key covers every job queued for it: states only
        // move forward, so writing it once is enough for all of them.
        let mut latest: HashMap<&[u8], &Snapshot> = HashMap::new();
        for job in &batch {
            latest.insert(&job.key, &job.snapshot);
        }
        let result = writer.write(&mut latest.into_iter(), batch.len());
        for job in batch {
            let _ = job.done.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    fn stored(local: &Local, key: &[u8]) -> u64 {
        let v = local.db.get(key).unwrap().expect("record written");
        u64::from_be_bytes(v.as_ref().try_into().unwrap())
    }

    #[test]
    fn a_lone_caller_is_written_inline_once_its_streak_is_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let (local, _) = Local::open(dir.path(), 1 << 20).unwrap();
        let on_commit_thread = Arc::new(Mutex::new(Vec::new()));
        let seen = on_commit_thread.clone();
        let value = Arc::new(AtomicU64::new(0));
        let v = value.clone();
        let snapshot: Snapshot = Arc::new(move || {
            let name = std::thread::current().name().map(str::to_owned);
            seen.lock()
                .unwrap()
                .push(name.as_deref() == Some("idalloc-commit"));
            v.load(Ordering::SeqCst).to_be_bytes().to_vec()
        });
        runtime().block_on(async {
            for i in 1..=200u64 {
                value.store(i, Ordering::SeqCst);
                local.commit(b"k".to_vec(), snapshot.clone()).await.unwrap();
                assert_eq!(stored(&local, b"k"), i, "durable before return");
            }
        });
        let paths = on_commit_thread.lock().unwrap().clone();
        let streak = SOLO_STREAK as usize;
        assert_eq!(paths.len(), 200);
        assert!(
            paths[..streak].iter().all(|&t| t),
            "first commits go to the group"
        );
        assert!(
            paths[streak..].iter().all(|&t| !t),
            "then inline: {paths:?}"
        );
        assert_eq!(local.flushes(), 200);
    }

    #[test]
    fn overlapping_commits_never_leave_an_older_state_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (local, _) = Local::open(dir.path(), 1 << 20).unwrap();
        let local = Arc::new(local);
        let counter = Arc::new(AtomicU64::new(0));
        let c = counter.clone();
        let snapshot: Snapshot = Arc::new(move || c.load(Ordering::SeqCst).to_be_bytes().to_vec());
        runtime().block_on(async {
            // A lone caller first, long enough to be written inline; then 16
            // callers at once, the first of which may still find the lone path.
            for _ in 0..(SOLO_STREAK + 10) {
                counter.fetch_add(1, Ordering::SeqCst);
                local.commit(b"k".to_vec(), snapshot.clone()).await.unwrap();
            }
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let (local, counter, snapshot) =
                        (local.clone(), counter.clone(), snapshot.clone());
                    tokio::spawn(async move {
                        for _ in 0..50 {
                            let mine = counter.fetch_add(1, Ordering::SeqCst) + 1;
                            local.commit(b"k".to_vec(), snapshot.clone()).await.unwrap();
                            assert!(stored(&local, b"k") >= mine, "grant {mine} not on disk");
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        assert_eq!(stored(&local, b"k"), SOLO_STREAK + 10 + 16 * 50);
        assert!(local.flushes() <= SOLO_STREAK + 10 + 16 * 50);
    }
}
