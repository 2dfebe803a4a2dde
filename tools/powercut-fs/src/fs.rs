//! The passthrough file system: every operation goes to the backing directory at
//! once; data changes are also recorded in [`Pending`] until the file is synced.
//!
//! Inodes are held as `O_PATH` descriptors of the backing objects (as libfuse's
//! `passthrough_ll` does), so renames in the backing tree need no bookkeeping; a
//! file is opened for I/O through `/proc/self/fd/N`.

use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

use crate::pending::{Key, Pending};

/// State shared by the FUSE worker threads and the control (signal) thread.
pub struct Shared {
    root: PathBuf,
    nodes: Mutex<Nodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEnt>>>>,
    next_fh: AtomicU64,
    /// Unsynced data, to be reverted by a cut.
    pub pending: Pending,
    /// Every operation holds the read side; the control thread takes the write
    /// side to stop the world, and sets it `true`: from then on every operation
    /// fails with `EIO` (the machine is off).
    pub gate: RwLock<bool>,
    /// Attribute and entry time-to-live given to the kernel.
    ttl: Duration,
    /// Open files with `FOPEN_DIRECT_IO` (no page cache).
    direct_io: bool,
}

struct Node {
    fd: Arc<OwnedFd>,
    key: Key,
    nlookup: u64,
}

struct Nodes {
    by_ino: HashMap<u64, Node>,
    by_key: HashMap<Key, u64>,
    next: u64,
}

struct Handle {
    file: Arc<File>,
    key: Key,
    /// Opened `O_SYNC`/`O_DSYNC`: each write is synced.
    sync_writes: bool,
}

struct DirEnt {
    ino: u64,
    kind: FileType,
    name: OsString,
}

type R<T> = Result<T, Errno>;

fn last_err() -> Errno {
    Errno::from(io::Error::last_os_error())
}

fn cstr(name: &OsStr) -> R<CString> {
    CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)
}

fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).unwrap()
}

fn fstat(fd: RawFd) -> R<libc::stat> {
    // SAFETY: fstat(2) into a zeroed, properly sized struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(last_err());
        }
        Ok(st)
    }
}

fn fstatat(dir: RawFd, name: &CStr) -> R<libc::stat> {
    // SAFETY: fstatat(2) into a zeroed, properly sized struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(last_err());
        }
        Ok(st)
    }
}

fn openat(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> R<OwnedFd> {
    // SAFETY: openat(2); the descriptor returned is ours alone.
    unsafe {
        let fd = libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode);
        if fd < 0 {
            return Err(last_err());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn check(rc: i32) -> R<()> {
    if rc != 0 {
        Err(last_err())
    } else {
        Ok(())
    }
}

fn key_of(st: &libc::stat) -> Key {
    (st.st_dev, st.st_ino)
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn attr(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// Flags for opening the backing file of a FUSE open with `flags`: never create,
/// truncate (done here, through the undo log), append (the kernel sends offsets),
/// or bypass the page cache (alignment); write-only becomes read-write so that the
/// undo log can read what a write replaces.
fn backing_flags(flags: i32) -> i32 {
    let mut f = flags
        & !(libc::O_CREAT
            | libc::O_EXCL
            | libc::O_NOCTTY
            | libc::O_TRUNC
            | libc::O_APPEND
            | libc::O_DIRECT);
    if f & libc::O_ACCMODE == libc::O_WRONLY {
        f = (f & !libc::O_ACCMODE) | libc::O_RDWR;
    }
    f
}

fn is_sync(flags: i32) -> bool {
    flags & (libc::O_SYNC | libc::O_DSYNC) != 0
}

impl Shared {
    /// Serve `root` (a directory).
    pub fn new(root: &Path, ttl: Duration, direct_io: bool) -> io::Result<Shared> {
        let root = root.canonicalize()?;
        let c = CString::new(root.as_os_str().as_bytes())?;
        let fd = openat(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| io::Error::from_raw_os_error(e.code()))?;
        let st = fstat(fd.as_raw_fd()).map_err(|e| io::Error::from_raw_os_error(e.code()))?;
        let mut by_ino = HashMap::new();
        let mut by_key = HashMap::new();
        by_ino.insert(
            1,
            Node {
                fd: Arc::new(fd),
                key: key_of(&st),
                nlookup: 1,
            },
        );
        by_key.insert(key_of(&st), 1);
        Ok(Shared {
            root,
            nodes: Mutex::new(Nodes {
                by_ino,
                by_key,
                next: 2,
            }),
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            pending: Pending::default(),
            gate: RwLock::new(false),
            ttl,
            direct_io,
        })
    }

    fn enter(&self) -> R<RwLockReadGuard<'_, bool>> {
        let g = self.gate.read().unwrap();
        if *g {
            return Err(Errno::EIO);
        }
        Ok(g)
    }

    fn node(&self, ino: INodeNo) -> R<(Arc<OwnedFd>, Key)> {
        let nodes = self.nodes.lock().unwrap();
        let n = nodes.by_ino.get(&ino.0).ok_or(Errno::ESTALE)?;
        Ok((n.fd.clone(), n.key))
    }

    /// Count one lookup of the object `fd` (stat `st`); its inode number.
    fn intern(&self, fd: OwnedFd, st: &libc::stat) -> u64 {
        let key = key_of(st);
        let mut nodes = self.nodes.lock().unwrap();
        if let Some(&ino) = nodes.by_key.get(&key) {
            nodes.by_ino.get_mut(&ino).unwrap().nlookup += 1;
            return ino;
        }
        let ino = nodes.next;
        nodes.next += 1;
        nodes.by_ino.insert(
            ino,
            Node {
                fd: Arc::new(fd),
                key,
                nlookup: 1,
            },
        );
        nodes.by_key.insert(key, ino);
        ino
    }

    /// Look `name` up in directory `parent`: (inode, attributes), one lookup counted.
    fn lookup_in(&self, parent: INodeNo, name: &OsStr) -> R<FileAttr> {
        let (dir, _) = self.node(parent)?;
        let name = cstr(name)?;
        let fd = openat(dir.as_raw_fd(), &name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let st = fstat(fd.as_raw_fd())?;
        let ino = self.intern(fd, &st);
        Ok(attr(ino, &st))
    }

    fn handle(&self, fh: FileHandle) -> R<(Arc<File>, Key, bool)> {
        let hs = self.handles.lock().unwrap();
        let h = hs.get(&fh.0).ok_or(Errno::EBADF)?;
        Ok((h.file.clone(), h.key, h.sync_writes))
    }

    fn add_handle(&self, file: Arc<File>, key: Key, flags: i32) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(
            fh,
            Handle {
                file,
                key,
                sync_writes: is_sync(flags),
            },
        );
        fh
    }

    fn open_flags(&self) -> FopenFlags {
        if self.direct_io {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::empty()
        }
    }

    /// Truncate (or extend) `file` to `len`, saving what the synced state held.
    fn truncate(&self, key: Key, file: &Arc<File>, len: u64) -> R<()> {
        let cur = file.metadata()?.len();
        self.pending
            .before_change(key, file, len.min(cur), u64::MAX)?;
        file.set_len(len)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)] // the FUSE setattr fields
    fn setattr_inner(
        &self,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> R<FileAttr> {
        let _g = self.enter()?;
        let (fd, key) = self.node(ino)?;
        let raw = fd.as_raw_fd();
        let st = fstat(raw)?;
        let is_link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if let Some(mode) = mode {
            if !is_link {
                // SAFETY: chmod(2) through the descriptor's /proc link.
                check(unsafe { libc::chmod(proc_path(raw).as_ptr(), mode & 0o7777) })?;
            }
        }
        if uid.is_some() || gid.is_some() {
            // SAFETY: fchownat(2) on the descriptor itself (AT_EMPTY_PATH).
            check(unsafe {
                libc::fchownat(
                    raw,
                    c"".as_ptr(),
                    uid.unwrap_or(u32::MAX),
                    gid.unwrap_or(u32::MAX),
                    libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                )
            })?;
        }
        if let Some(size) = size {
            let file = match fh.and_then(|fh| self.handle(fh).ok()) {
                Some((f, _, _)) => f,
                None => Arc::new(File::from(openat(
                    libc::AT_FDCWD,
                    &proc_path(raw),
                    libc::O_RDWR,
                    0,
                )?)),
            };
            self.truncate(key, &file, size)?;
        }
        if (atime.is_some() || mtime.is_some()) && !is_link {
            let ts = |t: Option<TimeOrNow>| match t {
                None => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                Some(TimeOrNow::Now) => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                Some(TimeOrNow::SpecificTime(t)) => {
                    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                    libc::timespec {
                        tv_sec: d.as_secs() as i64,
                        tv_nsec: d.subsec_nanos() as i64,
                    }
                }
            };
            let times = [ts(atime), ts(mtime)];
            // SAFETY: utimensat(2) through the descriptor's /proc link.
            check(unsafe {
                libc::utimensat(libc::AT_FDCWD, proc_path(raw).as_ptr(), times.as_ptr(), 0)
            })?;
        }
        Ok(attr(ino.0, &fstat(raw)?))
    }

    fn read_dir(&self, ino: INodeNo) -> R<Vec<DirEnt>> {
        let (fd, _) = self.node(ino)?;
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let mut out = vec![
            DirEnt {
                ino: ino.0,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirEnt {
                ino: 1,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        for e in std::fs::read_dir(path)? {
            let e = e?;
            let t = e.file_type()?;
            let kind = if t.is_dir() {
                FileType::Directory
            } else if t.is_symlink() {
                FileType::Symlink
            } else if t.is_file() {
                FileType::RegularFile
            } else {
                use std::os::unix::fs::FileTypeExt;
                if t.is_fifo() {
                    FileType::NamedPipe
                } else if t.is_socket() {
                    FileType::Socket
                } else if t.is_block_device() {
                    FileType::BlockDevice
                } else {
                    FileType::CharDevice
                }
            };
            out.push(DirEnt {
                ino: e.ino(),
                kind,
                name: e.file_name(),
            });
        }
        Ok(out)
    }
}

/// The `fuser` file system: a handle on [`Shared`].
pub struct PowercutFs(pub Arc<Shared>);

macro_rules! tryr {
    ($reply:ident, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => {
                $reply.error(Errno::from(e));
                return;
            }
        }
    };
}

impl Filesystem for PowercutFs {
    fn init(&mut self, _req: &Request, _config: &mut KernelConfig) -> io::Result<()> {
        // Neither FUSE_WRITEBACK_CACHE (writes would sit in the kernel) nor
        // FUSE_POSIX_LOCKS / FUSE_FLOCK_LOCKS (the kernel then keeps flock and
        // fcntl locks itself, per mount, which is what sled's lock needs).
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let a = tryr!(reply, s.lookup_in(parent, name));
        reply.entry(&s.ttl, &a, Generation(0));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if ino.0 == 1 {
            return;
        }
        let mut nodes = self.0.nodes.lock().unwrap();
        let gone = match nodes.by_ino.get_mut(&ino.0) {
            Some(n) => {
                n.nlookup = n.nlookup.saturating_sub(nlookup);
                (n.nlookup == 0).then_some(n.key)
            }
            None => None,
        };
        if let Some(key) = gone {
            nodes.by_ino.remove(&ino.0);
            if nodes.by_key.get(&key) == Some(&ino.0) {
                nodes.by_key.remove(&key);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (fd, _) = tryr!(reply, s.node(ino));
        let st = tryr!(reply, fstat(fd.as_raw_fd()));
        reply.attr(&s.ttl, &attr(ino.0, &st));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let a = tryr!(
            reply,
            self.0
                .setattr_inner(ino, mode, uid, gid, size, atime, mtime, fh)
        );
        reply.attr(&self.0.ttl, &a);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (fd, _) = tryr!(reply, s.node(ino));
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: readlinkat(2) of the symlink the descriptor is, into `buf`.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_char,
                buf.len(),
            )
        };
        if n < 0 {
            reply.error(last_err());
            return;
        }
        reply.data(&buf[..n as usize]);
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (dir, _) = tryr!(reply, s.node(parent));
        let c = tryr!(reply, cstr(name));
        // SAFETY: mknodat(2) in the parent directory's descriptor.
        tryr!(
            reply,
            check(unsafe {
                libc::mknodat(dir.as_raw_fd(), c.as_ptr(), mode & !umask, rdev as u64)
            })
        );
        let a = tryr!(reply, s.lookup_in(parent, name));
        reply.entry(&s.ttl, &a, Generation(0));
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (dir, _) = tryr!(reply, s.node(parent));
        let c = tryr!(reply, cstr(name));
        // SAFETY: mkdirat(2) in the parent directory's descriptor.
        tryr!(
            reply,
            check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode & !umask) })
        );
        let a = tryr!(reply, s.lookup_in(parent, name));
        reply.entry(&s.ttl, &a, Generation(0));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (dir, _) = tryr!(reply, s.node(parent));
        let c = tryr!(reply, cstr(name));
        let st = tryr!(reply, fstatat(dir.as_raw_fd(), &c));
        // SAFETY: unlinkat(2) in the parent directory's descriptor.
        tryr!(
            reply,
            check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) })
        );
        s.pending.forget_if_unlinked(key_of(&st));
        reply.ok();
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (dir, _) = tryr!(reply, s.node(parent));
        let c = tryr!(reply, cstr(name));
        // SAFETY: unlinkat(2) of a directory in the parent directory's descriptor.
        tryr!(
            reply,
            check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) })
        );
        reply.ok();
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (dir, _) = tryr!(reply, s.node(parent));
        let c = tryr!(reply, cstr(link_name));
        let t = tryr!(reply, cstr(target.as_os_str()));
        // SAFETY: symlinkat(2) in the parent directory's descriptor.
        tryr!(
            reply,
            check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), c.as_ptr()) })
        );
        let a = tryr!(reply, s.lookup_in(parent, link_name));
        reply.entry(&s.ttl, &a, Generation(0));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (from, _) = tryr!(reply, s.node(parent));
        let (to, _) = tryr!(reply, s.node(newparent));
        let a = tryr!(reply, cstr(name));
        let b = tryr!(reply, cstr(newname));
        let replaced = fstatat(to.as_raw_fd(), &b).ok();
        // SAFETY: renameat2(2) between two directory descriptors.
        tryr!(
            reply,
            check(unsafe {
                libc::renameat2(
                    from.as_raw_fd(),
                    a.as_ptr(),
                    to.as_raw_fd(),
                    b.as_ptr(),
                    flags.bits(),
                )
            })
        );
        if let Some(st) = replaced {
            s.pending.forget_if_unlinked(key_of(&st));
        }
        reply.ok();
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (fd, _) = tryr!(reply, s.node(ino));
        let (dir, _) = tryr!(reply, s.node(newparent));
        let c = tryr!(reply, cstr(newname));
        // SAFETY: linkat(2) of the object the descriptor is (AT_EMPTY_PATH).
        tryr!(
            reply,
            check(unsafe {
                libc::linkat(
                    fd.as_raw_fd(),
                    c"".as_ptr(),
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    libc::AT_EMPTY_PATH,
                )
            })
        );
        let a = tryr!(reply, s.lookup_in(newparent, newname));
        reply.entry(&s.ttl, &a, Generation(0));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (fd, key) = tryr!(reply, s.node(ino));
        let file = tryr!(
            reply,
            openat(
                libc::AT_FDCWD,
                &proc_path(fd.as_raw_fd()),
                backing_flags(flags.0),
                0
            )
        );
        let file = Arc::new(File::from(file));
        if flags.0 & libc::O_TRUNC != 0 {
            tryr!(reply, s.truncate(key, &file, 0));
        }
        let fh = s.add_handle(file, key, flags.0);
        reply.opened(FileHandle(fh), s.open_flags());
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (file, _, _) = tryr!(reply, s.handle(fh));
        let mut buf = vec![0u8; size as usize];
        let mut n = 0usize;
        while n < buf.len() {
            match file.read_at(&mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    reply.error(e.into());
                    return;
                }
            }
        }
        reply.data(&buf[..n]);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (file, key, sync) = tryr!(reply, s.handle(fh));
        tryr!(
            reply,
            s.pending
                .before_change(key, &file, offset, offset + data.len() as u64)
        );
        tryr!(reply, file.write_all_at(data, offset));
        if sync || is_sync(flags.0) {
            // An O_SYNC/O_DSYNC write is a write plus an fdatasync of the file.
            tryr!(reply, file.sync_data());
            s.pending.synced(key);
        }
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.handles.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (file, key, _) = tryr!(reply, s.handle(fh));
        let r = if datasync {
            file.sync_data()
        } else {
            file.sync_all()
        };
        tryr!(reply, r);
        // fsync and fdatasync both make the file's data durable.
        s.pending.synced(key);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let entries = tryr!(reply, s.read_dir(ino));
        let fh = s.next_fh.fetch_add(1, Ordering::Relaxed);
        s.dirs.lock().unwrap().insert(fh, Arc::new(entries));
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let entries = match s.dirs.lock().unwrap().get(&fh.0) {
            Some(e) => e.clone(),
            None => {
                reply.error(Errno::EBADF);
                return;
            }
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), (i + 1) as u64, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.0.dirs.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Names are durable at once here; still pass the sync on.
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (fd, _) = tryr!(reply, s.node(ino));
        let d = tryr!(
            reply,
            openat(
                libc::AT_FDCWD,
                &proc_path(fd.as_raw_fd()),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0
            )
        );
        tryr!(reply, File::from(d).sync_all());
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = &self.0;
        let c = CString::new(s.root.as_os_str().as_bytes()).unwrap();
        // SAFETY: statvfs(3) into a zeroed, properly sized struct.
        let st = unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            if libc::statvfs(c.as_ptr(), &mut st) != 0 {
                reply.error(last_err());
                return;
            }
            st
        };
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (fd, _) = tryr!(reply, s.node(ino));
        // SAFETY: access(2) through the descriptor's /proc link.
        tryr!(
            reply,
            check(unsafe { libc::access(proc_path(fd.as_raw_fd()).as_ptr(), mask.bits()) })
        );
        reply.ok();
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (dir, _) = tryr!(reply, s.node(parent));
        let c = tryr!(reply, cstr(name));
        let bflags = backing_flags(flags) | libc::O_CREAT | (flags & libc::O_EXCL);
        let fd = tryr!(reply, openat(dir.as_raw_fd(), &c, bflags, mode & !umask));
        let st = tryr!(reply, fstat(fd.as_raw_fd()));
        let key = key_of(&st);
        let path_fd = tryr!(
            reply,
            openat(libc::AT_FDCWD, &proc_path(fd.as_raw_fd()), libc::O_PATH, 0)
        );
        let file = Arc::new(File::from(fd));
        if flags & libc::O_TRUNC != 0 {
            tryr!(reply, s.truncate(key, &file, 0));
        }
        let st = tryr!(reply, fstat(file.as_raw_fd()));
        let ino = s.intern(path_fd, &st);
        let fh = s.add_handle(file, key, flags);
        reply.created(
            &s.ttl,
            &attr(ino, &st),
            Generation(0),
            FileHandle(fh),
            s.open_flags(),
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let s = &self.0;
        let _g = tryr!(reply, s.enter());
        let (file, key, _) = tryr!(reply, s.handle(fh));
        let hi = if mode & (libc::FALLOC_FL_COLLAPSE_RANGE | libc::FALLOC_FL_INSERT_RANGE) != 0 {
            u64::MAX
        } else {
            offset.saturating_add(length)
        };
        tryr!(reply, s.pending.before_change(key, &file, offset, hi));
        // SAFETY: fallocate(2) on our own descriptor.
        tryr!(
            reply,
            check(unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, length as i64) })
        );
        reply.ok();
    }
}
