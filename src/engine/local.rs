//! The sled tier: where grants are made durable, and the group committer that
//! makes them durable together.
//!
//! Invariant protected: *durable before reply* (2). Every reservation waits for a
//! `flush()` that happened after its grant was written. One committer thread drains
//! the queue of waiting reservations, writes the latest state of each namespace they
//! touched, flushes once and answers them all (group commit). sled's `flush_async`
//! hangs under concurrency in 0.34.7 (DESIGN.md), and a dedicated thread calling the
//! blocking `flush()` costs no tokio worker.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
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
        let db2 = db.clone();
        std::thread::Builder::new()
            .name("idalloc-commit".into())
            .spawn(move || committer(db2, rx))
            .map_err(|e| OpenError::DataDir {
                path: dir.display().to_string(),
                reason: format!("cannot start the commit thread: {e}"),
            })?;
        Ok((Local { db, jobs: tx }, loaded))
    }

    /// Write the latest state under `key` and return once it is flushed.
    pub async fn commit(&self, key: Vec<u8>, snapshot: Snapshot) -> Result<(), String> {
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

    /// The underlying database size on disk, for logs.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
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

fn committer(db: sled::Db, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
            if batch.len() >= 65_536 {
                break;
            }
        }
        let started = Instant::now();
        // The latest state of each key covers every job queued for it: states only
        // move forward, so writing it once is enough for all of them.
        let mut latest: HashMap<&[u8], &Snapshot> = HashMap::new();
        for job in &batch {
            latest.insert(&job.key, &job.snapshot);
        }
        let mut result = Ok(());
        for (key, snap) in latest {
            if let Err(e) = db.insert(key, snap()) {
                result = Err(format!("local write failed: {e}"));
                break;
            }
        }
        if result.is_ok() {
            if let Err(e) = db.flush() {
                result = Err(format!("local flush failed: {e}"));
            }
        }
        metrics::counter!("idalloc_flushes_total").increment(1);
        metrics::histogram!("idalloc_flush_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("idalloc_flush_batch_size").record(batch.len() as f64);
        if let Err(e) = &result {
            tracing::error!(error = %e, "sled commit failed; the reservations in this group are not granted");
        }
        for job in batch {
            let _ = job.done.send(result.clone());
        }
    }
}
