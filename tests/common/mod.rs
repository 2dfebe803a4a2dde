//! Shared helpers for the engine tests: temp directories, small leases, short
//! store time-outs, a boot-id file the test can rewrite to fake a reboot.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use idalloc::engine::{Engine, EngineConfig, OpenError, StoreHandle};
use idalloc_client::protocol::{IdRange, WriterMode};
use object_store::memory::InMemory;
use object_store::ObjectStore;

pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let env = Env { dir };
        env.set_boot_id("boot-1");
        env
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn boot_file(&self) -> PathBuf {
        self.dir.path().join("boot_id")
    }

    /// Pretend the machine rebooted.
    pub fn set_boot_id(&self, id: &str) {
        std::fs::write(self.boot_file(), format!("{id}\n")).unwrap();
    }

    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config(&self, data: &str, lease: u64) -> EngineConfig {
        EngineConfig {
            data_dir: self.data_dir(data),
            lease_size: lease,
            max_count: 1 << 20,
            prefetch_at: 0.5,
            // Every lease `lease` ids, so that these tests' tiny leases give the
            // many lease boundaries they are meant to cross; tests/explore.rs and
            // never_twice.rs run with growth on.
            lease_min_life: Duration::ZERO,
            store_timeout: Duration::from_millis(500),
            store_retries: 1,
            store_backoff: Duration::from_millis(10),
            unavailable_cooldown: Duration::from_millis(200),
            boot_id_path: self.boot_file(),
            sled_cache_bytes: 1 << 20,
            // The start-up probe makes store calls of its own, which would eat the
            // faults these tests inject; tests/store_check.rs attacks the probe.
            store_startup_check: false,
            fork_ids: idalloc_client::protocol::ForkIds::Namespace,
        }
    }
}

pub fn memory_store() -> (Arc<dyn ObjectStore>, StoreHandle) {
    let s: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let h = StoreHandle::custom(s.clone(), WriterMode::MultiWriter, "memory://test");
    (s, h)
}

/// Open, waiting out the data-directory lock of an engine that is still being
/// dropped (its background tasks may hold it for a moment).
pub async fn open(cfg: EngineConfig, store: &StoreHandle) -> Result<Arc<Engine>, OpenError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Engine::open(cfg.clone(), store.clone()).await {
            Err(OpenError::Locked(_)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => return other,
        }
    }
}

/// Drop an engine without shutdown (a crash, as far as sled's clean flag knows) and
/// wait until its data directory lock is released.
pub async fn crash(engine: Arc<Engine>) {
    let weak = Arc::downgrade(&engine);
    drop(engine);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while weak.strong_count() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A group task still finishing holds sled open; give it a moment to close.
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// Check that no id is in two ranges.
pub fn assert_disjoint(ranges: &[IdRange], what: &str) {
    let mut v: Vec<IdRange> = ranges.to_vec();
    v.sort();
    for w in v.windows(2) {
        assert!(
            w[0].end <= w[1].start,
            "{what}: ranges {:?} and {:?} overlap",
            w[0],
            w[1]
        );
    }
}

/// Read a manifest's two ceilings straight from the store.
pub async fn ceilings(store: &Arc<dyn ObjectStore>, path: &str) -> Option<(u64, u64)> {
    use object_store::ObjectStoreExt;
    let r = store
        .get(&object_store::path::Path::from(path))
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    Some((
        v["next_vid_batch"].as_u64().unwrap(),
        v["next_eid_batch"].as_u64().unwrap(),
    ))
}

/// Replace `to` with a copy of the tree at `from` (a data directory rolled back
/// to an older state, as a power cut or a restored snapshot leaves it). A file
/// that vanishes under a running daemon is skipped: the copy is just older then.
pub fn copy_dir(from: &Path, to: &Path) {
    if to.exists() {
        std::fs::remove_dir_all(to).unwrap();
    }
    std::fs::create_dir_all(to).unwrap();
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    for e in entries.flatten() {
        let target = to.join(e.file_name());
        match e.file_type() {
            Ok(t) if t.is_dir() => copy_dir(&e.path(), &target),
            Ok(t) if t.is_file() => match std::fs::copy(e.path(), &target) {
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => panic!("copy {}: {err}", e.path().display()),
            },
            _ => {}
        }
    }
}

/// Ranges named by who got them; panics naming the two that overlap.
pub fn assert_disjoint_named<S: std::fmt::Debug>(got: &[(S, IdRange)], what: &str) {
    let mut v: Vec<&(S, IdRange)> = got.iter().collect();
    v.sort_by_key(|(_, r)| (r.start, r.end));
    for w in v.windows(2) {
        assert!(
            w[0].1.end <= w[1].1.start,
            "{what}: {:?} got {:?} and {:?} got {:?}: one id handed out twice (all: {got:?})",
            w[0].0,
            w[0].1,
            w[1].0,
            w[1].1
        );
    }
}

/// An in-memory multi-writer store behind a fault-injecting wrapper: the inner
/// store (to look at or corrupt behind the engine's back), the faults' control,
/// and the handle an engine opens.
pub fn faulty() -> (
    Arc<dyn ObjectStore>,
    Arc<crate::faults::FaultControl>,
    StoreHandle,
) {
    let (inner, _) = memory_store();
    let (f, ctl) = crate::faults::FaultyStore::wrap(inner.clone());
    let h = StoreHandle::custom(f, WriterMode::MultiWriter, "memory://faulty");
    (inner, ctl, h)
}
