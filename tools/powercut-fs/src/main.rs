//! The `powercut-fs` binary; the semantics are in the library's documentation
//! (`src/lib.rs`) and in `--help`.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use fuser::{Config, MountOption, Session, SessionACL};
use powercut_fs::fs::{PowercutFs, Shared};

const ABOUT: &str = "A FUSE passthrough file system that loses, on command, every \
file data write not made durable by fsync/fdatasync (a simulated power cut, like \
Jepsen's LazyFS).";

const LONG_ABOUT: &str = "\
A FUSE passthrough file system that loses, on command, every file data write not \
made durable by fsync/fdatasync (a simulated power cut, like Jepsen's LazyFS).

Semantics:
  * names (create, mkdir, rename, unlink, link, symlink) and attributes take
    effect at once and survive a cut;
  * file data written since the file's last fsync/fdatasync is lost by a cut:
    the file goes back to its content and length at that sync; a file never
    synced comes back empty under its current name; the state follows the inode
    across renames;
  * close, sync_file_range (never reaches FUSE) and syncfs make nothing durable;
    an O_SYNC/O_DSYNC write counts as write + fdatasync;
  * files present at mount time count as synced;
  * no writeback cache, zero attribute/entry TTLs, direct_io opens; flock and
    fcntl locks are kept by the kernel, per mount.

Control:
  prints `READY <mountpoint>` on stdout once mounted;
  SIGUSR1                 cut: stop serving (EIO), revert all unsynced data,
                          print `CUT files=N dropped_bytes=N restored_bytes=N`,
                          unmount (lazily), exit 0;
  SIGTERM/SIGINT/SIGHUP   clean unmount keeping the live data, print
                          `STOPPED unsynced_files=N`, exit 0.
Mount a fresh instance over the same backing directory after a cut.";

#[derive(Parser, Debug)]
#[command(name = "powercut-fs", version, about = ABOUT, long_about = LONG_ABOUT)]
struct Args {
    /// Directory whose contents the mount shows (and where writes land).
    backing: PathBuf,
    /// Where to mount (an existing, empty directory).
    mountpoint: PathBuf,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Let the kernel cache file pages (no FOPEN_DIRECT_IO). Writes still reach
    /// this process at once (no writeback cache).
    #[arg(long)]
    page_cache: bool,
    /// Mount through fusermount3 with auto_unmount, so the mount goes away even if
    /// this process is killed. Off by default: fusermount3's watcher unmounts by
    /// path after this process exits, which can race with the next instance
    /// mounted at the same path.
    #[arg(long)]
    auto_unmount: bool,
}

const NO_FUSE: &str = "/dev/fuse not found: the power-cut tests need FUSE; install fuse3 \
and run on a machine with /dev/fuse";

fn die(msg: &str) -> ! {
    eprintln!("powercut-fs: {msg}");
    std::process::exit(1)
}

fn lazy_unmount(mountpoint: &Path) {
    let c = CString::new(mountpoint.as_os_str().as_bytes()).unwrap();
    // SAFETY: umount2(2) with a valid path.
    unsafe {
        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
    }
}

fn main() {
    let args = Args::parse();
    if !Path::new("/dev/fuse").exists() {
        die(NO_FUSE);
    }
    if args.threads == 0 {
        die("--threads must be at least 1");
    }
    // Block the control signals in every thread (the FUSE workers inherit the
    // mask); one thread takes them with sigwait.
    // SAFETY: plain signal-mask calls on a local sigset_t, before any thread.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let mountpoint = args
        .mountpoint
        .canonicalize()
        .unwrap_or_else(|e| die(&format!("mount point {}: {e}", args.mountpoint.display())));
    let shared = Arc::new(
        Shared::new(&args.backing, Duration::ZERO, !args.page_cache).unwrap_or_else(|e| {
            die(&format!(
                "backing directory {}: {e}",
                args.backing.display()
            ))
        }),
    );
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("powercut-fs".into()),
        MountOption::Subtype("powercut".into()),
        MountOption::RW,
        MountOption::Dev,
        MountOption::Suid,
    ];
    if args.auto_unmount {
        config.mount_options.push(MountOption::AutoUnmount);
        config.acl = SessionACL::RootAndOwner;
    }
    config.n_threads = Some(args.threads);
    let session =
        Session::new(PowercutFs(shared.clone()), &mountpoint, &config).unwrap_or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound && !Path::new("/dev/fuse").exists() {
                die(NO_FUSE);
            }
            die(&format!("cannot mount {}: {e}", mountpoint.display()))
        });
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "READY {}", mountpoint.display());
        let _ = out.flush();
    }
    let mp = mountpoint.clone();
    let shared_main = shared.clone();
    std::thread::spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait(3) on the set blocked above.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        // Stop the world: wait for operations in flight, refuse new ones.
        let mut gate = shared.gate.write().unwrap();
        *gate = true;
        let line = if sig == libc::SIGUSR1 {
            match shared.pending.cut() {
                Ok(st) => format!(
                    "CUT files={} dropped_bytes={} restored_bytes={}",
                    st.files, st.dropped_bytes, st.restored_bytes
                ),
                Err(e) => {
                    eprintln!("powercut-fs: the cut could not revert the backing files: {e}");
                    lazy_unmount(&mp);
                    std::process::exit(1);
                }
            }
        } else {
            format!("STOPPED unsynced_files={}", shared.pending.files())
        };
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        lazy_unmount(&mp);
        // Exit with the gate held: the session loop, which ends once the mount is
        // gone, waits for it below and never gets to print.
        std::process::exit(0);
    });
    let result = session.run();
    // A cut or a stop in progress holds the gate until it exits the process.
    let stopping = *shared_main.gate.read().unwrap();
    if stopping {
        std::thread::park();
    }
    match result {
        Ok(()) => println!("STOPPED unmounted"),
        Err(e) => die(&format!("session ended: {e}")),
    }
}
