//! Tunables of the allocation engine, each with its default beside it.

use std::path::PathBuf;
use std::time::Duration;

/// Configuration of an [`Engine`](super::Engine).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Directory of the sled database. Default: `./idallocd-data`.
    pub data_dir: PathBuf,
    /// Ids per object-store lease. Bounds the gap left when the data directory is
    /// lost. Default: 1,000,000.
    pub lease_size: u64,
    /// Largest `count` one reservation may ask for. Default: 1,000,000.
    pub max_count: u64,
    /// Fraction of a lease used before the next lease is taken in the background.
    /// Default: 0.5.
    pub prefetch_at: f64,
    /// A lease that runs out sooner than this after the one before it was taken
    /// makes the next one twice as large, up to 16 x `lease_size`; leases lasting
    /// over 8 times this step back down. Keeps the object store off the hot path
    /// at high id rates (a lease per 1000 reservations of 1000 ids would otherwise
    /// be a store write every few ms). Zero turns it off. Default: 1 s.
    pub lease_min_life: Duration,
    /// Time-out of one object-store call. Default: 5 s.
    pub store_timeout: Duration,
    /// Retries of a transient object-store error (with exponential backoff).
    /// Default: 3.
    pub store_retries: u32,
    /// First backoff between retries; doubles each time. Default: 100 ms.
    pub store_backoff: Duration,
    /// After a failed lease, reservations that need a new lease fail fast with
    /// `Unavailable` for this long instead of queueing on a dead store. Default: 1 s.
    pub unavailable_cooldown: Duration,
    /// Where the kernel's boot id is read (tests point it elsewhere to fake a reboot).
    /// Default: `/proc/sys/kernel/random/boot_id`.
    pub boot_id_path: PathBuf,
    /// sled's page cache. A few keys per namespace need little. Default: 16 MiB.
    pub sled_cache_bytes: u64,
    /// In multi-writer mode, probe the store's conditional writes at start-up
    /// (a few racing updates under a scratch prefix) and refuse a store that
    /// lets two writers win. Default: on.
    pub store_startup_check: bool,
    /// How the root counts fork ids: per namespace (the reference design) or one
    /// sequence for the whole tree (`[allocation] fork_ids`). Default: namespace.
    pub fork_ids: idalloc_client::protocol::ForkIds,
}

impl EngineConfig {
    /// The one check of the allocation settings' ranges, used by the daemon's
    /// config loader (`check-config` included) and by [`Engine::open`](super::Engine::open).
    /// The error names the setting as the config file spells it.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.lease_size == 0 {
            return Err(("allocation.lease_size", "must be at least 1".into()));
        }
        if self.max_count == 0 {
            return Err(("allocation.max_count", "must be at least 1".into()));
        }
        // prefetch_at = 1.0 would take the next lease only once the current one is
        // used up, on the writer's path; 0 would keep a second lease at all times.
        if !(self.prefetch_at > 0.0 && self.prefetch_at < 1.0) {
            return Err((
                "allocation.prefetch_at",
                format!(
                    "{} is not a fraction strictly between 0 and 1 (the share of a lease used before the next one is taken in the background)",
                    self.prefetch_at
                ),
            ));
        }
        Ok(())
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            data_dir: PathBuf::from(idalloc_client::client::DEFAULT_DATA_DIR),
            lease_size: 1_000_000,
            max_count: 1_000_000,
            prefetch_at: 0.5,
            lease_min_life: Duration::from_secs(1),
            store_timeout: Duration::from_secs(5),
            store_retries: 3,
            store_backoff: Duration::from_millis(100),
            unavailable_cooldown: Duration::from_secs(1),
            boot_id_path: PathBuf::from("/proc/sys/kernel/random/boot_id"),
            sled_cache_bytes: 16 << 20,
            store_startup_check: true,
            fork_ids: idalloc_client::protocol::ForkIds::Namespace,
        }
    }
}
