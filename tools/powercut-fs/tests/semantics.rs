//! Each semantic of the power-cut file system, shown on a real mount: what a cut
//! keeps (names, synced data) and what it loses (everything else).

// The root's power-cut support, shared with its tests; this file uses the mount
// it builds on (`Mount::with_bin`, `stop`) and not the rest.
#[allow(dead_code)]
#[path = "../../../tests/powercut_support/mod.rs"]
mod powercut_support;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;

use powercut_support::Mount;

/// A backing directory and a mount of it, in one temporary directory.
fn mount() -> (tempfile::TempDir, Mount) {
    let dir = tempfile::tempdir().unwrap();
    let m = Mount::with_bin(
        Path::new(env!("CARGO_BIN_EXE_powercut-fs")),
        &dir.path().join("backing"),
        &dir.path().join("mnt"),
    );
    (dir, m)
}

fn write_file(path: &Path, data: &[u8], sync: bool) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    if sync {
        f.sync_all().unwrap();
    }
}

fn append(path: &Path, data: &[u8]) -> File {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(data).unwrap();
    f
}

#[test]
fn fsynced_data_survives_a_cut() {
    let (_d, mut m) = mount();
    let p = m.path().join("f");
    write_file(&p, b"durable", true);
    let r = m.cut_and_remount();
    assert_eq!(std::fs::read(&p).unwrap(), b"durable");
    assert_eq!(r.files, 0, "{r:?}");
}

#[test]
fn unsynced_appended_data_is_lost() {
    let (_d, mut m) = mount();
    let p = m.path().join("log");
    write_file(&p, b"synced|", true);
    drop(append(&p, b"not synced"));
    assert_eq!(std::fs::read(&p).unwrap(), b"synced|not synced");
    let r = m.cut_and_remount();
    assert_eq!(std::fs::read(&p).unwrap(), b"synced|");
    assert_eq!((r.files, r.dropped_bytes), (1, 10), "{r:?}");
}

#[test]
fn unsynced_overwrite_and_truncate_are_undone() {
    let (_d, mut m) = mount();
    let p = m.path().join("f");
    write_file(&p, b"0123456789", true);
    {
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"abc", 4).unwrap();
        f.set_len(6).unwrap();
        f.write_all_at(b"tail", 20).unwrap();
    }
    assert_eq!(std::fs::read(&p).unwrap().len(), 24);
    m.cut_and_remount();
    assert_eq!(std::fs::read(&p).unwrap(), b"0123456789");
}

#[test]
fn a_never_fsynced_new_file_is_empty_after_the_cut_but_its_name_survives() {
    let (_d, mut m) = mount();
    std::fs::create_dir(m.path().join("dir")).unwrap();
    let p = m.path().join("dir/new");
    // close() is no sync either.
    write_file(&p, b"never synced", false);
    m.cut_and_remount();
    assert!(m.path().join("dir").is_dir());
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
}

#[test]
fn write_and_rename_over_an_existing_file_without_fsync_leaves_the_target_empty() {
    let (_d, mut m) = mount();
    let target = m.path().join("manifest.json");
    write_file(&target, b"{\"ceiling\":1000}", true);
    let staging = m.path().join("manifest.json.tmp");
    write_file(&staging, b"{\"ceiling\":2000}", false);
    std::fs::rename(&staging, &target).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"{\"ceiling\":2000}");
    m.cut_and_remount();
    assert!(!staging.exists());
    // The old content is gone (its inode was replaced) and the new one never
    // reached the disk: what a real file system gives at worst.
    assert_eq!(std::fs::read(&target).unwrap(), b"");
}

#[test]
fn fsync_then_rename_keeps_the_data_under_the_new_name() {
    let (_d, mut m) = mount();
    let target = m.path().join("manifest.json");
    write_file(&target, b"old", true);
    let staging = m.path().join("staging");
    write_file(&staging, b"new", true);
    std::fs::rename(&staging, &target).unwrap();
    m.cut_and_remount();
    assert_eq!(std::fs::read(&target).unwrap(), b"new");
}

#[test]
fn fdatasync_counts_as_sync() {
    let (_d, mut m) = mount();
    let p = m.path().join("f");
    let mut f = File::create(&p).unwrap();
    f.write_all(b"data").unwrap();
    f.sync_data().unwrap();
    f.write_all(b"+more").unwrap();
    drop(f);
    m.cut_and_remount();
    assert_eq!(std::fs::read(&p).unwrap(), b"data");
}

#[test]
fn the_pending_state_follows_the_inode_across_renames() {
    let (_d, mut m) = mount();
    std::fs::create_dir(m.path().join("a")).unwrap();
    std::fs::create_dir(m.path().join("b")).unwrap();
    let first = m.path().join("a/f");
    write_file(&first, b"v1", true);
    // Unsynced data, then two renames (across directories); synced through
    // neither name.
    drop(append(&first, b"+v2"));
    let second = m.path().join("b/g");
    std::fs::rename(&first, &second).unwrap();
    let third = m.path().join("h");
    std::fs::rename(&second, &third).unwrap();
    // And a second file synced under its new name only: durable.
    let other = m.path().join("a/o");
    write_file(&other, b"o1", false);
    std::fs::rename(&other, m.path().join("b/o")).unwrap();
    File::open(m.path().join("b/o"))
        .unwrap()
        .sync_all()
        .unwrap();
    m.cut_and_remount();
    assert!(!first.exists() && !second.exists());
    assert_eq!(std::fs::read(&third).unwrap(), b"v1");
    assert_eq!(std::fs::read(m.path().join("b/o")).unwrap(), b"o1");
}

#[test]
fn sync_file_range_does_not_make_data_durable() {
    let (_d, mut m) = mount();
    let p = m.path().join("sled-like");
    write_file(&p, b"base", true);
    let f = append(&p, b"+flushed by sync_file_range");
    // What sled 0.34's flush does.
    // SAFETY: sync_file_range(2) on an open descriptor.
    let rc = unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            0,
            0,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    drop(f);
    m.cut_and_remount();
    assert_eq!(std::fs::read(&p).unwrap(), b"base");
}

#[test]
fn names_and_removals_survive_a_cut() {
    let (_d, mut m) = mount();
    let root = m.path().to_path_buf();
    std::fs::create_dir_all(root.join("x/y")).unwrap();
    write_file(&root.join("gone"), b"synced", true);
    std::fs::remove_file(root.join("gone")).unwrap();
    std::fs::create_dir(root.join("empty")).unwrap();
    std::fs::remove_dir(root.join("empty")).unwrap();
    write_file(&root.join("x/y/kept"), b"k", true);
    std::fs::rename(root.join("x/y"), root.join("z")).unwrap();
    std::os::unix::fs::symlink("z/kept", root.join("link")).unwrap();
    m.cut_and_remount();
    assert!(!root.join("gone").exists());
    assert!(!root.join("empty").exists());
    assert!(root.join("x").is_dir() && !root.join("x/y").exists());
    assert_eq!(std::fs::read(root.join("z/kept")).unwrap(), b"k");
    assert_eq!(std::fs::read(root.join("link")).unwrap(), b"k");
    let mut names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["link", "x", "z"]);
}

#[test]
fn a_clean_stop_keeps_unsynced_data() {
    let (_d, mut m) = mount();
    let p = m.path().join("f");
    write_file(&p, b"unsynced but kept", false);
    m.stop();
    m.remount();
    assert_eq!(std::fs::read(&p).unwrap(), b"unsynced but kept");
    // And a cut after the remount has nothing to revert: the clean stop's
    // backing content counts as synced.
    let r = m.cut_and_remount();
    assert_eq!(std::fs::read(&p).unwrap(), b"unsynced but kept");
    assert_eq!(r.files, 0);
}

#[test]
fn flock_and_fcntl_locks_work_on_the_mount() {
    let (_d, m) = mount();
    let p = m.path().join("lock");
    write_file(&p, b"", true);
    let a = File::open(&p).unwrap();
    let b = File::open(&p).unwrap();
    // SAFETY: flock(2) on open descriptors.
    unsafe {
        assert_eq!(libc::flock(a.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB), 0);
        assert_eq!(
            libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            -1
        );
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EWOULDBLOCK)
        );
        assert_eq!(libc::flock(a.as_raw_fd(), libc::LOCK_UN), 0);
        assert_eq!(libc::flock(b.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB), 0);
    }
    // A POSIX record lock (F_SETLK) is accepted too.
    let w = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    // SAFETY: fcntl(2) F_SETLK with a zeroed, filled-in struct flock.
    unsafe {
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        assert_eq!(libc::fcntl(w.as_raw_fd(), libc::F_SETLK, &fl), 0);
    }
}

#[test]
fn sled_opens_and_works_on_the_mount() {
    let (_d, mut m) = mount();
    let path = m.path().join("sled");
    {
        let db = sled::open(&path).unwrap();
        // sled's own lock: a second open of the same database is refused.
        assert!(sled::open(&path).is_err(), "sled's flock lock did not hold");
        for i in 0u32..2000 {
            db.insert(i.to_be_bytes(), &[7u8; 64][..]).unwrap();
        }
        db.flush().unwrap();
        assert_eq!(db.len(), 2000);
    }
    // Clean reopen: everything is there.
    {
        let db = sled::open(&path).unwrap();
        assert_eq!(db.len(), 2000);
        db.insert(b"after-reopen", b"x").unwrap();
        db.flush().unwrap();
    }
    // After a cut sled opens again (it may have lost what only its
    // sync_file_range flushes covered) and keeps working.
    let r = m.cut_and_remount();
    let db = sled::open(&path).unwrap();
    db.insert(b"after-cut", b"y").unwrap();
    db.flush().unwrap();
    eprintln!(
        "sled after the cut: {} keys (2001 before it); the cut reverted {r:?}",
        db.len() - 1
    );
    assert!(
        r.files > 0,
        "sled's unsynced writes were not pending: {r:?}"
    );
}

#[test]
fn without_dev_fuse_it_fails_saying_so() {
    // A private mount namespace whose /dev is an empty tmpfs (needs root, as
    // mounting FUSE does here).
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("b")).unwrap();
    std::fs::create_dir(dir.path().join("m")).unwrap();
    let out = std::process::Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            "mount -t tmpfs none /dev && exec \"$0\" \"$1\" \"$2\"",
        ])
        .arg(env!("CARGO_BIN_EXE_powercut-fs"))
        .arg(dir.path().join("b"))
        .arg(dir.path().join("m"))
        .output()
        .expect("unshare (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(powercut_support::NO_FUSE), "{err}");
}
