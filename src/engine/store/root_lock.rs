//! The exclusive lock a daemon holds inside a `file://` object-store root.
//!
//! Invariant protected: *unique* (1) on single-writer roots. `LocalFileSystem` has
//! no conditional update, so two daemons writing one root would overwrite each
//! other's ceilings. The data directory's lock cannot see that (each daemon has
//! its own data directory), so the root itself carries one: `.idallocd.lock`,
//! held with `flock` for the life of the engine and released by the kernel when
//! the process dies, `kill -9` included. The file records who holds it, for the
//! error the second daemon prints.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

use super::OpenError;

/// Name of the lock file inside the root.
pub const LOCK_FILE: &str = ".idallocd.lock";

/// Held while the engine lives; dropping it releases the root.
#[derive(Debug)]
pub struct RootLock {
    _file: File,
}

impl RootLock {
    /// Take the lock of `root` for the daemon whose data directory is `data_dir`,
    /// or fail naming the root and the holder.
    pub fn acquire(root: &Path, data_dir: &Path) -> Result<RootLock, OpenError> {
        let path = root.join(LOCK_FILE);
        let io = |e: std::io::Error| {
            OpenError::StoreConfig(format!("lock file {}: {e}", path.display()))
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.split_whitespace().collect::<Vec<_>>().join(", ");
                return Err(OpenError::RootLocked {
                    root: root.display().to_string(),
                    holder: if holder.is_empty() {
                        "unknown".to_string()
                    } else {
                        holder
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let note = format!(
            "pid={} data_dir={}\n",
            std::process::id(),
            data_dir.display()
        );
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(note.as_bytes()).map_err(io)?;
        Ok(RootLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first() {
        let root = tempfile::tempdir().unwrap();
        let first = RootLock::acquire(root.path(), Path::new("/data/a")).unwrap();
        let e = RootLock::acquire(root.path(), Path::new("/data/b"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&root.path().display().to_string()), "{e}");
        assert!(e.contains(&format!("pid={}", std::process::id())), "{e}");
        assert!(e.contains("/data/a"), "{e}");
        drop(first);
        RootLock::acquire(root.path(), Path::new("/data/b")).unwrap();
    }
}
