//! Mount, cut and remount the power-cut file system (`tools/powercut-fs`) from a
//! test: a [`Mount`] runs one `powercut-fs` process over a backing directory; a
//! [`Mount::cut`] drops every write not made durable by `fsync`/`fdatasync` and
//! unmounts; [`Mount::remount`] mounts a fresh instance over the same backing
//! directory (a new mount, so no kernel cache of the old one survives).
//!
//! **Where the binary comes from.** `powercut-fs` is another package of the
//! workspace, so Cargo gives this package no `CARGO_BIN_EXE_` path for it, and a
//! test must not run `cargo build` itself (a nested build fights the outer one for
//! the target directory's lock). So the binary is built before the tests —
//! `.ci/run` runs `cargo build -p powercut-fs` first, and `cargo test --workspace`
//! builds it too — and found here:
//! 1. `IDALLOC_POWERCUT_FS_BIN`, if set (any build, e.g. a release one);
//! 2. else `powercut-fs` in this test executable's profile directory
//!    (`<target dir>/<profile>/`, the parent of the `deps/` directory the test
//!    runs from), which is where `cargo build -p powercut-fs` puts it for the same
//!    `CARGO_TARGET_DIR` and profile.
//!
//! A missing binary or a machine without `/dev/fuse` is a test FAILURE with a
//! message saying what to do — never a skip.
//!
//! Also included by `tools/powercut-fs/tests/semantics.rs` (with an explicit
//! binary path), so both packages drive the file system the same way.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const NO_FUSE: &str = "/dev/fuse not found: the power-cut tests need FUSE; install fuse3 \
and run on a machine with /dev/fuse";

/// The `powercut-fs` binary (see the module documentation).
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("IDALLOC_POWERCUT_FS_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "IDALLOC_POWERCUT_FS_BIN={} is not a file",
            p.display()
        );
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable's directory");
    let profile = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().unwrap()
    } else {
        deps
    };
    let p = profile.join("powercut-fs");
    assert!(
        p.is_file(),
        "the power-cut file system binary is not built: {} is missing. Run \
         `cargo build -p powercut-fs` with the same CARGO_TARGET_DIR and profile \
         before `cargo test` (.ci/run does), or set IDALLOC_POWERCUT_FS_BIN",
        p.display()
    );
    p
}

/// Whether `path` is a mount point now (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// What one cut reverted (the `CUT` line of `powercut-fs`).
#[derive(Debug, Default, Clone, Copy)]
pub struct CutReport {
    /// Files put back to their last synced content.
    pub files: u64,
    /// Bytes past the synced lengths dropped.
    pub dropped_bytes: u64,
    /// Saved bytes written back over unsynced overwrites.
    pub restored_bytes: u64,
}

fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One power-cut file system over `backing`, mounted at `mountpoint`; unmounted
/// (cleanly, keeping the data) on drop.
pub struct Mount {
    bin: PathBuf,
    pub backing: PathBuf,
    pub mountpoint: PathBuf,
    child: Option<Child>,
    lines: Option<Receiver<String>>,
    stderr: Arc<Mutex<String>>,
    /// Cuts made so far, and what they reverted in total.
    pub cuts: u64,
    pub reverted: CutReport,
}

impl Mount {
    /// Create `backing` and `mountpoint` if needed and mount.
    pub fn new(backing: &Path, mountpoint: &Path) -> Mount {
        Mount::with_bin(&bin(), backing, mountpoint)
    }

    /// The same with an explicit `powercut-fs` binary.
    pub fn with_bin(bin: &Path, backing: &Path, mountpoint: &Path) -> Mount {
        assert!(Path::new("/dev/fuse").exists(), "{NO_FUSE}");
        std::fs::create_dir_all(backing).unwrap();
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut m = Mount {
            bin: bin.to_path_buf(),
            backing: backing.canonicalize().unwrap(),
            mountpoint: mountpoint.canonicalize().unwrap(),
            child: None,
            lines: None,
            stderr: Arc::new(Mutex::new(String::new())),
            cuts: 0,
            reverted: CutReport::default(),
        };
        m.remount();
        m
    }

    /// The mounted directory.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// What `powercut-fs` wrote on stderr (all instances).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Mount a fresh instance (after a cut or a stop).
    pub fn remount(&mut self) {
        assert!(self.child.is_none(), "already mounted");
        assert!(
            !is_mounted(&self.mountpoint),
            "{} is still a mount point",
            self.mountpoint.display()
        );
        let mut cmd = Command::new(&self.bin);
        cmd.arg(&self.backing)
            .arg(&self.mountpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let (tx, rx) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let sink = self.stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        self.child = Some(child);
        self.lines = Some(rx);
        let line = self.expect_line("READY", Duration::from_secs(20));
        assert!(line.starts_with("READY"), "{line}");
        assert!(
            is_mounted(&self.mountpoint),
            "powercut-fs said READY but {} is not mounted",
            self.mountpoint.display()
        );
    }

    fn expect_line(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.as_ref().unwrap().recv_timeout(left) {
                Ok(l) if l.starts_with(prefix) => return l,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "powercut-fs printed no {prefix} line in {within:?}; stderr:\n{}",
                        self.stderr()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let st = self.child.as_mut().and_then(|c| c.wait().ok());
                    std::thread::sleep(Duration::from_millis(50));
                    panic!(
                        "powercut-fs exited ({st:?}) before printing {prefix}; stderr:\n{}",
                        self.stderr()
                    )
                }
            }
        }
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("not mounted").id() as i32;
        // SAFETY: kill(2) of our own child.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill powercut-fs");
    }

    /// Wait for the instance to exit (status 0) and the mount to be gone.
    fn wait_gone(&mut self) {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "powercut-fs did not exit in 20 s; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(
            st.success(),
            "powercut-fs exited with {st}; stderr:\n{}",
            self.stderr()
        );
        self.lines = None;
        while is_mounted(&self.mountpoint) {
            assert!(
                Instant::now() < deadline,
                "{} still mounted after powercut-fs exited",
                self.mountpoint.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The power cut: every file goes back to its last synced data; unmounted
    /// afterwards (call [`Mount::remount`]). Stop the programs using the mount
    /// first (`kill -9` is fine).
    pub fn cut(&mut self) -> CutReport {
        self.signal(libc::SIGUSR1);
        let line = self.expect_line("CUT", Duration::from_secs(20));
        self.wait_gone();
        let r = CutReport {
            files: field(&line, "files"),
            dropped_bytes: field(&line, "dropped_bytes"),
            restored_bytes: field(&line, "restored_bytes"),
        };
        self.cuts += 1;
        self.reverted.files += r.files;
        self.reverted.dropped_bytes += r.dropped_bytes;
        self.reverted.restored_bytes += r.restored_bytes;
        r
    }

    /// [`Mount::cut`], then [`Mount::remount`].
    pub fn cut_and_remount(&mut self) -> CutReport {
        let r = self.cut();
        self.remount();
        r
    }

    /// Clean unmount keeping the live data (no cut).
    // Used by tools/powercut-fs/tests/semantics.rs, which includes this module
    // too; the root's tests only cut.
    #[allow(dead_code)]
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        self.expect_line("STOPPED", Duration::from_secs(20));
        self.wait_gone();
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) of our own child.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mountpoint) {
            let c = std::ffi::CString::new(self.mountpoint.to_string_lossy().as_bytes()).unwrap();
            // SAFETY: umount2(2) with a valid path.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}
