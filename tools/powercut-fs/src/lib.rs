//! `powercut-fs`: a FUSE file system that simulates power cuts (in the manner of
//! Jepsen's LazyFS), written for idalloc's power-cut tests.
//!
//! It is a passthrough over a backing directory: every operation (create, mkdir,
//! rename, unlink, rmdir, link, symlink, read, write, truncate, setattr, readdir,
//! fsync, fsyncdir, statfs, fallocate) reaches the backing directory at once.
//!
//! **What a cut keeps and what it loses.**
//! - Names (create, mkdir, rename, unlink, link, symlink, rmdir) and attributes
//!   take effect at once and survive a cut.
//! - File *data* written since the file's last `fsync`/`fdatasync` is pending. On a
//!   cut every file goes back to the content and length it had at its last sync; a
//!   file created since the mount and never synced comes back empty (0 bytes),
//!   under the name it has now. The pending state belongs to the inode, so it
//!   follows the file across renames: a staging file written, renamed over a
//!   manifest and never synced comes back *empty* under the manifest's name.
//! - `close` (FUSE `flush`) makes nothing durable. `sync_file_range(2)` never
//!   reaches a FUSE file system, so data it covers is lost like any unsynced data;
//!   so is `syncfs`. A write through an `O_SYNC`/`O_DSYNC` descriptor counts as a
//!   write followed by `fdatasync`.
//! - Files present in the backing directory at mount time count as synced.
//!
//! **Kernel caches.** No writeback cache is negotiated, attribute and entry TTLs
//! are zero, and files are opened with `FOPEN_DIRECT_IO` (no page cache). After a
//! cut the process unmounts and exits; the harness mounts a fresh instance over
//! the same backing directory, so nothing the old mount's kernel state remembered
//! can hide the cut.
//!
//! **Locks.** Neither `FUSE_POSIX_LOCKS` nor `FUSE_FLOCK_LOCKS` is negotiated, so
//! the kernel implements `flock(2)` and `fcntl(2)` locks itself on the mount (sled
//! locks its database file this way); they vanish with the mount.
//!
//! **Control** (also in `powercut-fs --help`): once mounted the process prints
//! `READY <mountpoint>` on stdout. Then:
//! - `SIGUSR1` — **cut**: stop serving (every operation from then on fails with
//!   `EIO`), put every file back to its last synced data, print
//!   `CUT files=N dropped_bytes=N restored_bytes=N`, lazily unmount, exit 0.
//! - `SIGTERM`, `SIGINT`, `SIGHUP` — **clean unmount**: no cut, the live data
//!   stays in the backing directory; print `STOPPED unsynced_files=N`, lazily
//!   unmount, exit 0.
//! - An external unmount (`fusermount3 -u`, `umount`) ends it like `SIGTERM`.
//!
//! Run the program being tested on the mount, stop it (`kill -9` — with the
//! mount up the process's open files are simply closed), send `SIGUSR1`, wait for
//! the exit, and mount again.

pub mod fs;
pub mod pending;
