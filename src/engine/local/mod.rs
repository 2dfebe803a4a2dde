//! The sled tier: where grants are made durable, the group committer that makes
//! them durable together, and the life mark ([`life_mark`]) that says whether
//! sled can be trusted at the next start.
//!
//! Invariant protected: *durable before reply* (2). Every reservation waits for a
//! `flush()` that happened after its grant was written. A commit joins a queue;
//! the first one into an empty queue spawns a *group* task on the caller's runtime,
//! which yields once and so runs only after every task that was ready has run and
//! the runtime has polled its sockets: every request that had arrived by then has
//! joined the queue. The group then writes the latest state of each namespace
//! queued, flushes once and answers them all, on the runtime's own thread, as
//! Redis's event loop writes its AOF before it goes back to sleep. No commit
//! thread: handing each group to one and back cost two thread wake-ups per group
//! and a cross-thread wake-up per reservation (docs/performance.md). While the
//! flush runs that runtime thread serves nothing else; requests wait in their
//! sockets and form the next group. sled's `flush_async` hangs under concurrency
//! in 0.34.7 (DESIGN.md), hence the blocking `flush()`. One writer at a time
//! snapshots, writes and flushes, so a state on disk is never replaced by an
//! older one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::counter::Counter;
use super::store::manifest::ForkMeta;
use super::OpenError;

pub(super) mod life_mark;

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
    /// This data directory's id, chosen when it was first used: it names the
    /// daemon's lease records in the object store (`lease_record`).
    #[serde(default)]
    pub daemon_id: Option<String>,
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
}

/// The local, hot tier.
pub struct Local {
    db: sled::Db,
    shared: Arc<Shared>,
}

/// What the commit callers and the group tasks share.
struct Shared {
    writer: Writer,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// A group task is spawned and has not yet found the queue empty: every job
    /// pushed meanwhile is its to write.
    scheduled: bool,
}

/// The one writer of sled records at a time.
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

impl Local {
    /// Open (or create) sled under `dir`. A database sled cannot open is moved aside
    /// and a new one started, as if the data directory had been lost: the object
    /// store then decides where counters resume, which is never below any grant.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<(Local, Loaded), OpenError> {
        std::fs::create_dir_all(dir).map_err(|e| OpenError::DataDir {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
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
                open_sled(dir, cache_bytes).map_err(|e| OpenError::DataDir {
                    path: dir.display().to_string(),
                    reason: e.to_string(),
                })?
            }
        };
        let loaded = load(&db).map_err(|reason| OpenError::DataDir {
            path: dir.display().to_string(),
            reason,
        })?;
        let shared = Arc::new(Shared {
            writer: Writer {
                db: db.clone(),
                lock: Mutex::new(()),
                flushes: AtomicU64::new(0),
            },
            queue: Mutex::new(Queue::default()),
        });
        Ok((Local { db, shared }, loaded))
    }

    /// Write the latest state under `key` and return once it is flushed, together
    /// with every other commit queued by then (see the module docs). Outside a
    /// tokio runtime the commit is written at once, on the caller's thread.
    pub async fn commit(&self, key: Vec<u8>, snapshot: Snapshot) -> Result<(), String> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self
                .shared
                .writer
                .write(&mut std::iter::once((key.as_slice(), &snapshot)), 1);
        };
        let (done, rx) = oneshot::channel();
        let first = {
            let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.jobs.push(Job {
                key,
                snapshot,
                done,
            });
            !std::mem::replace(&mut q.scheduled, true)
        };
        if first {
            runtime.spawn(run_groups(GroupGuard {
                shared: self.shared.clone(),
                done: false,
            }));
        }
        rx.await
            .map_err(|_| {
            "the commit group ended without a flush (runtime shutting down, or a panic); the reservation was not granted".to_string()
        })?
    }

    /// Record the meta record durably.
    pub async fn write_meta(&self, meta: &MetaRecord) -> Result<(), String> {
        let bytes = serde_json::to_vec(meta).expect("meta serialises");
        self.commit(META_KEY.to_vec(), Arc::new(move || bytes.clone()))
            .await
    }

    /// sled flushes since open (one per group of commits).
    pub fn flushes(&self) -> u64 {
        self.shared.writer.flushes.load(Ordering::Relaxed)
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

fn load(db: &sled::Db) -> Result<Loaded, String> {
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
    Ok(Loaded { meta, records })
}

/// Owned by a group task from before it is spawned, so that a task dropped
/// before it finds the queue empty (its runtime shutting down, even before its
/// first poll) fails the queued commits: their callers get an error, never a
/// reply without a flush, and the next commit spawns a new group.
struct GroupGuard {
    shared: Arc<Shared>,
    done: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if !self.done {
            let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.scheduled = false;
            q.jobs.clear();
        }
    }
}

/// A group task: write every queued commit, once per round, until a round finds
/// the queue empty.
async fn run_groups(mut guard: GroupGuard) {
    let shared = guard.shared.clone();
    loop {
        // Runs again only after every ready task has run and the runtime has
        // polled its sockets once: the group closes when nothing else is ready,
        // not on a timer.
        tokio::task::yield_now().await;
        let batch = {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.jobs.is_empty() {
                q.scheduled = false;
                guard.done = true;
                return;
            }
            std::mem::take(&mut q.jobs)
        };
        // The latest state of each key covers every job queued for it: states only
        // move forward, so writing it once is enough for all of them.
        let result = if batch.len() == 1 {
            let job = &batch[0];
            shared
                .writer
                .write(&mut std::iter::once((job.key.as_slice(), &job.snapshot)), 1)
        } else {
            let mut latest: HashMap<&[u8], &Snapshot> = HashMap::new();
            for job in &batch {
                latest.insert(&job.key, &job.snapshot);
            }
            shared.writer.write(&mut latest.into_iter(), batch.len())
        };
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

    /// A lone caller gets one flush per commit, written on the runtime's own
    /// thread (there is no other).
    #[test]
    fn a_lone_caller_is_flushed_once_per_commit_on_the_runtime_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (local, _) = Local::open(dir.path(), 1 << 20).unwrap();
        let threads = Arc::new(Mutex::new(Vec::new()));
        let seen = threads.clone();
        let value = Arc::new(AtomicU64::new(0));
        let v = value.clone();
        let snapshot: Snapshot = Arc::new(move || {
            seen.lock().unwrap().push(std::thread::current().id());
            v.load(Ordering::SeqCst).to_be_bytes().to_vec()
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for i in 1..=200u64 {
                value.store(i, Ordering::SeqCst);
                local.commit(b"k".to_vec(), snapshot.clone()).await.unwrap();
                assert_eq!(stored(&local, b"k"), i, "durable before return");
            }
        });
        let threads = threads.lock().unwrap().clone();
        assert_eq!(threads.len(), 200);
        assert!(threads.iter().all(|t| *t == std::thread::current().id()));
        assert_eq!(local.flushes(), 200);
    }

    /// Commits queued while the runtime is busy share a flush.
    #[test]
    fn commits_ready_together_share_one_flush() {
        let dir = tempfile::tempdir().unwrap();
        let (local, _) = Local::open(dir.path(), 1 << 20).unwrap();
        let local = Arc::new(local);
        let snapshot: Snapshot = Arc::new(|| 7u64.to_be_bytes().to_vec());
        // One thread, as idallocd runs by default (`worker_threads = 1`): with more
        // workers, an idle one may start the group before all 32 have joined.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let before = local.flushes();
            let all: Vec<_> = (0..32)
                .map(|_| local.commit(b"k".to_vec(), snapshot.clone()))
                .collect();
            for r in futures::future::join_all(all).await {
                r.unwrap();
            }
            assert_eq!(
                local.flushes() - before,
                1,
                "32 commits ready at once, one flush"
            );
        });
    }

    /// A runtime that shuts down with a group pending fails its commits (an
    /// error, never a success without a flush), and the next runtime's commits
    /// are written as before.
    #[test]
    fn a_group_dropped_with_its_runtime_fails_its_commits_and_the_next_runtime_commits() {
        let dir = tempfile::tempdir().unwrap();
        let (local, _) = Local::open(dir.path(), 1 << 20).unwrap();
        let local = Arc::new(local);
        let snapshot: Snapshot = Arc::new(|| 9u64.to_be_bytes().to_vec());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Queue a commit and drop the runtime before its group task runs.
        let pending = {
            let (local, snapshot) = (local.clone(), snapshot.clone());
            let mut commit = Box::pin(async move { local.commit(b"k".to_vec(), snapshot).await });
            rt.block_on(async {
                assert!(futures::poll!(&mut commit).is_pending());
            });
            commit
        };
        drop(rt);
        let outcome = futures::executor::block_on(pending);
        assert!(outcome.is_err(), "{outcome:?}");
        assert_eq!(local.flushes(), 0);
        runtime().block_on(async {
            local.commit(b"k".to_vec(), snapshot.clone()).await.unwrap();
        });
        assert_eq!(stored(&local, b"k"), 9);
    }

    #[test]
    fn overlapping_commits_never_leave_an_older_state_on_disk() {
        const LONE: u64 = 74;
        let dir = tempfile::tempdir().unwrap();
        let (local, _) = Local::open(dir.path(), 1 << 20).unwrap();
        let local = Arc::new(local);
        let counter = Arc::new(AtomicU64::new(0));
        let c = counter.clone();
        let snapshot: Snapshot = Arc::new(move || c.load(Ordering::SeqCst).to_be_bytes().to_vec());
        runtime().block_on(async {
            // A lone caller first, one commit per group; then 16 callers at once.
            for _ in 0..LONE {
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
        assert_eq!(stored(&local, b"k"), LONE + 16 * 50);
        assert!(local.flushes() <= LONE + 16 * 50);
    }
}
