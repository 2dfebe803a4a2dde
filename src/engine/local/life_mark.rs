//! The durable "this life is not clean" mark.
//!
//! Invariant protected: *unique* (1) across power cuts. sled's flush is
//! `sync_file_range`, which a power cut does not keep (sled issue 1452), so after
//! a cut sled can come back with any older state it once fsynced — including the
//! state of an earlier clean shutdown, clean flag and all. The mark that voids
//! "clean" is therefore a file of its own, `<data dir>/unclean`, holding the
//! kernel's boot id: written and fsynced with its directory before the first grant
//! of a life, removed only after sled's final full sync at a clean shutdown.
//!
//! At start-up: no mark means the last life ended cleanly (or never granted); a
//! mark with this boot's id means a process crash in this boot, which
//! `sync_file_range` survives; a mark from another boot (or unreadable) means
//! the local counters may have lost writes.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::Path;

/// Name of the mark file inside the data directory.
pub const MARK_FILE: &str = "unclean";

/// What the data directory says about the previous life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    /// No mark: the previous life stopped cleanly (or there was none).
    Absent,
    /// A life began in the boot with this id (empty when the file was torn or
    /// unreadable) and did not stop cleanly.
    Present(String),
}

/// Read the mark.
pub fn read(data_dir: &Path) -> std::io::Result<Mark> {
    match std::fs::read(data_dir.join(MARK_FILE)) {
        Ok(bytes) => Ok(Mark::Present(
            String::from_utf8_lossy(&bytes).trim().to_string(),
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Mark::Absent),
        Err(e) => Err(e),
    }
}

/// Write the mark for this boot, durably (file and directory fsynced).
pub fn write(data_dir: &Path, boot_id: &str) -> std::io::Result<()> {
    let path = data_dir.join(MARK_FILE);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    f.write_all(format!("{boot_id}\n").as_bytes())?;
    f.sync_all()?;
    File::open(data_dir)?.sync_all()
}

/// Remove the mark, durably. Call only after everything else is fsynced.
pub fn remove(data_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(data_dir.join(MARK_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    File::open(data_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_read_and_removed() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read(d.path()).unwrap(), Mark::Absent);
        write(d.path(), "boot-a").unwrap();
        assert_eq!(read(d.path()).unwrap(), Mark::Present("boot-a".into()));
        write(d.path(), "boot-b").unwrap();
        assert_eq!(read(d.path()).unwrap(), Mark::Present("boot-b".into()));
        remove(d.path()).unwrap();
        assert_eq!(read(d.path()).unwrap(), Mark::Absent);
        remove(d.path()).unwrap();
    }

    #[test]
    fn a_torn_mark_is_present_with_no_boot_id() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(MARK_FILE), b"").unwrap();
        assert_eq!(read(d.path()).unwrap(), Mark::Present(String::new()));
    }
}
