//! The undo log of data written since each file's last `fsync`/`fdatasync`.
//!
//! Writes go straight through to the backing file. Before a write (or a truncation,
//! or an `fallocate`) first changes a byte that the file held at its last sync, the
//! old byte is saved here, once; the file's length at its last sync is saved with
//! it. A sync of the file drops its record (its current content is now durable). A
//! cut puts every recorded file back: truncate to the synced length, write the saved
//! bytes back. A file with no record holds exactly its synced content, so a file
//! created since the mount (empty, never synced) reverts to empty.
//!
//! Records are keyed by the backing inode `(st_dev, st_ino)` and keep an open
//! descriptor of it, so the state follows the inode across renames, and a cut
//! restores a file under whatever name it has now.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex};

/// A backing inode: `(st_dev, st_ino)`.
pub type Key = (u64, u64);

struct Undo {
    /// A read-write descriptor of the backing inode.
    file: Arc<File>,
    /// The length at the last sync.
    synced_len: u64,
    /// Bytes as they were at the last sync, by offset; non-overlapping, all below
    /// `synced_len`.
    saved: BTreeMap<u64, Vec<u8>>,
}

/// What a cut reverted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CutStats {
    /// Files put back to their last synced content.
    pub files: u64,
    /// Bytes beyond the synced length that were dropped.
    pub dropped_bytes: u64,
    /// Saved bytes written back over unsynced overwrites.
    pub restored_bytes: u64,
}

/// Every file with data not yet synced.
#[derive(Default)]
pub struct Pending {
    map: Mutex<HashMap<Key, Undo>>,
}

/// The parts of `[lo, hi)` that no interval of `saved` covers.
pub fn gaps(saved: &BTreeMap<u64, Vec<u8>>, lo: u64, hi: u64) -> Vec<(u64, u64)> {
    let mut out = vec![];
    if lo >= hi {
        return out;
    }
    let first = saved
        .range(..=lo)
        .next_back()
        .map(|(s, _)| *s)
        .unwrap_or(lo);
    let mut cur = lo;
    for (&s, v) in saved.range(first..hi) {
        let e = s + v.len() as u64;
        if e <= cur {
            continue;
        }
        if s > cur {
            out.push((cur, s));
        }
        cur = e;
        if cur >= hi {
            break;
        }
    }
    if cur < hi {
        out.push((cur, hi));
    }
    out
}

impl Pending {
    /// Bytes `[lo, hi)` of `file` (inode `key`) are about to change (`hi =
    /// u64::MAX` for "everything from `lo`", a truncation). Save what the synced
    /// state held there, if not saved already.
    pub fn before_change(&self, key: Key, file: &Arc<File>, lo: u64, hi: u64) -> io::Result<()> {
        let mut map = self.map.lock().unwrap();
        let undo = match map.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                // No record: the file holds its synced content right now.
                let synced_len = file.metadata()?.len();
                v.insert(Undo {
                    file: file.clone(),
                    synced_len,
                    saved: BTreeMap::new(),
                })
            }
        };
        let hi = hi.min(undo.synced_len);
        for (a, b) in gaps(&undo.saved, lo, hi) {
            let mut buf = vec![0u8; (b - a) as usize];
            let mut done = 0usize;
            while done < buf.len() {
                match file.read_at(&mut buf[done..], a + done as u64) {
                    // Shorter than the synced length only if someone changed the
                    // backing file behind the mount; keep zeros then.
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            undo.saved.insert(a, buf);
        }
        Ok(())
    }

    /// The inode was synced: what it holds now is durable.
    pub fn synced(&self, key: Key) {
        self.map.lock().unwrap().remove(&key);
    }

    /// After an unlink or a rename over it: forget the inode if no name is left.
    pub fn forget_if_unlinked(&self, key: Key) {
        let mut map = self.map.lock().unwrap();
        if let Some(u) = map.get(&key) {
            if u.file.metadata().map(|m| m.nlink() == 0).unwrap_or(false) {
                map.remove(&key);
            }
        }
    }

    /// How many files have unsynced data.
    pub fn files(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    /// The power cut: put every file back to its last synced content and forget
    /// the records.
    pub fn cut(&self) -> io::Result<CutStats> {
        let mut map = self.map.lock().unwrap();
        let mut stats = CutStats::default();
        for (_, u) in map.drain() {
            let len = u.file.metadata()?.len();
            stats.files += 1;
            stats.dropped_bytes += len.saturating_sub(u.synced_len);
            u.file.set_len(u.synced_len)?;
            for (off, bytes) in &u.saved {
                u.file.write_all_at(bytes, *off)?;
                stats.restored_bytes += bytes.len() as u64;
            }
            // The backing disk is real; keep what the cut left on it.
            u.file.sync_data()?;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(iv: &[(u64, u64)]) -> BTreeMap<u64, Vec<u8>> {
        iv.iter()
            .map(|&(a, b)| (a, vec![0u8; (b - a) as usize]))
            .collect()
    }

    #[test]
    fn gaps_of_intervals() {
        let s = saved(&[(10, 20), (30, 40)]);
        assert_eq!(gaps(&s, 0, 50), vec![(0, 10), (20, 30), (40, 50)]);
        assert_eq!(gaps(&s, 12, 18), vec![]);
        assert_eq!(gaps(&s, 15, 35), vec![(20, 30)]);
        assert_eq!(gaps(&s, 20, 30), vec![(20, 30)]);
        assert_eq!(gaps(&s, 40, 41), vec![(40, 41)]);
        assert_eq!(gaps(&s, 5, 5), vec![]);
        assert_eq!(gaps(&BTreeMap::new(), 3, 9), vec![(3, 9)]);
    }

    #[test]
    fn cut_restores_overwrites_and_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let f = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap(),
        );
        let p = Pending::default();
        let key = (1, 1);
        p.before_change(key, &f, 2, 5).unwrap();
        f.write_all_at(b"abc", 2).unwrap();
        p.before_change(key, &f, 4, 14).unwrap();
        f.write_all_at(b"XXXXXXXXXX", 4).unwrap();
        p.before_change(key, &f, 3, u64::MAX).unwrap();
        f.set_len(3).unwrap();
        p.before_change(key, &f, 3, 20).unwrap();
        f.write_all_at(b"zz", 18).unwrap();
        let st = p.cut().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789");
        assert_eq!(st.files, 1);
        assert_eq!(st.dropped_bytes, 10);
    }
}
