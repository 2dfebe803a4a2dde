//! Shared helpers of the daemon tests: start the real `idallocd` binary in a temp
//! directory and talk to it with the generated tarpc client.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use idalloc_client::protocol::IdAllocClient;
use tarpc::tokio_serde::formats::Bincode;

pub const BIN: &str = env!("CARGO_BIN_EXE_idallocd");

/// The daemon binary the helpers run: `IDALLOC_DAEMON_BIN` if set (e.g. a baseline
/// build, to show a test failing on it), else this package's `idallocd`.
pub fn daemon_bin() -> PathBuf {
    match std::env::var_os("IDALLOC_DAEMON_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(BIN),
    }
}

/// A binary of another package of the workspace, built by the cargo running the
/// tests (`CARGO`) into the same target directory and profile, once per test
/// process: `idallocctl` is its own package, so it has no `CARGO_BIN_EXE_` here,
/// and `cargo test` at the root does not build it. `what` is the build's
/// selection, e.g. `["-p", "idallocctl", "--bin", "idallocctl"]`; `rel` the
/// binary's path under the profile's directory.
pub fn cargo_built(what: &[&str], rel: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--quiet"])
        .args(what);
    // The profile this test was built in: target/<profile>/deps/<this test>.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let out = build.output().unwrap();
    assert!(
        out.status.success(),
        "cargo build {what:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = profile_dir.join(rel);
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

/// The `idallocctl` binary (see [`cargo_built`]).
pub fn ctl_bin() -> &'static Path {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| cargo_built(&["-p", "idallocctl", "--bin", "idallocctl"], "idallocctl"))
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running daemon; killed on drop if the test did not stop it.
pub struct Daemon {
    pub child: Child,
    /// The directory the daemon's config, data and socket are in.
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub tcp: String,
    pub stderr_path: PathBuf,
}

pub struct Opts<'a> {
    /// Extra TOML appended to the generated config.
    pub extra_toml: &'a str,
    /// Extra environment.
    pub env: Vec<(&'a str, String)>,
    /// Wait until it serves.
    pub wait: bool,
    /// `data_dir` instead of `dir/data`.
    pub data_dir: Option<PathBuf>,
    /// The body of the `[allocation]` table instead of
    /// `max_count = 1000` / `lease_size = 10000`.
    pub allocation_toml: Option<&'a str>,
    /// More endpoints to listen on (after the unix socket and the TCP port).
    pub extra_listen: Vec<String>,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            extra_toml: "",
            env: vec![],
            wait: true,
            data_dir: None,
            allocation_toml: None,
            extra_listen: vec![],
        }
    }
}

impl Daemon {
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, Opts::default())
    }

    /// Start with a config in `dir`: data in `dir/data` (or `opts.data_dir`), a unix
    /// socket `dir/d.sock` and a loopback TCP port, `max_count = 1000` (or
    /// `opts.allocation_toml`).
    pub fn start_with(dir: &Path, opts: Opts<'_>) -> Daemon {
        let socket = dir.join("d.sock");
        let tcp = format!("127.0.0.1:{}", free_port());
        let config = dir.join("idallocd.toml");
        let data_dir = opts.data_dir.clone().unwrap_or_else(|| dir.join("data"));
        let allocation = opts
            .allocation_toml
            .unwrap_or("max_count = 1000\nlease_size = 10000\n");
        let mut listen = vec![format!("unix:{}", socket.display()), format!("tcp:{tcp}")];
        listen.extend(opts.extra_listen.iter().cloned());
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\nlisten = {:?}\nshutdown_timeout = \"5s\"\n{}\n[allocation]\n{}\n",
                data_dir.display().to_string(),
                listen,
                opts.extra_toml,
                allocation,
            ),
        )
        .unwrap();
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let stderr_path = dir.join(format!("stderr-{run}.log"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(daemon_bin());
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut d = Daemon {
            child,
            dir: dir.to_path_buf(),
            socket,
            tcp,
            stderr_path,
        };
        if opts.wait {
            d.wait_serving();
        }
        d
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Block until a status call over the unix socket succeeds.
    pub fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("idallocd exited early ({st}):\n{}", self.stderr());
            }
            // On a thread of its own: the caller may itself be inside a runtime.
            let ok = std::thread::scope(|s| {
                s.spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async {
                        match tokio::time::timeout(
                            Duration::from_secs(2),
                            unix_client(&self.socket),
                        )
                        .await
                        {
                            Ok(Ok(c)) => c.status(tarpc::context::current()).await.is_ok(),
                            _ => false,
                        }
                    })
                })
                .join()
                .unwrap()
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "idallocd did not serve in 30 s{}:\n{}",
                match std::env::var("IDALLOC_DAEMON_BIN") {
                    Ok(b) => format!(
                        " (IDALLOC_DAEMON_BIN={b}: a build whose wire protocol differs from \
                         this tree's client never answers the status call)"
                    ),
                    Err(_) => String::new(),
                },
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0);
    }

    /// Wait for exit, at most `secs`.
    pub fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "idallocd did not exit in {secs} s:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let st = self.wait_exit(30);
        assert!(
            st.success(),
            "idallocd exited with {st}:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub async fn unix_client(path: &Path) -> std::io::Result<IdAllocClient> {
    let t = tarpc::serde_transport::unix::connect(path, Bincode::default).await?;
    Ok(IdAllocClient::new(tarpc::client::Config::default(), t).spawn())
}

pub async fn tcp_client(addr: &str) -> std::io::Result<IdAllocClient> {
    let t = tarpc::serde_transport::tcp::connect(addr, Bincode::default).await?;
    Ok(IdAllocClient::new(tarpc::client::Config::default(), t).spawn())
}

pub fn ctx() -> tarpc::context::Context {
    tarpc::context::current()
}

/// Run `idallocd` with `args` to completion: (success, stdout, stderr).
pub fn run_to_end(args: &[&str], cwd: &Path) -> (bool, String, String) {
    let out = Command::new(daemon_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("STATE_DIRECTORY")
        .env_remove("RUNTIME_DIRECTORY")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// GET the Prometheus endpoint at `addr`; the whole response.
pub fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// The value of the series whose line starts with `prefix` (name plus labels).
pub fn series(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A fresh temp directory, mode 0755, that processes of `uids` can enter: for the
/// socket and the binaries of a test that runs a client as another user. Panics
/// naming the directory above it that they cannot search (a private `TMPDIR`).
pub fn tempdir_for_uids(uids: &[u32]) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temp dir for uids {uids:?}: {e}"));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot chmod 0755 {}: {e}", dir.path().display()));
    for &uid in uids {
        if let Some(why) = unreachable_by(uid, dir.path()) {
            panic!(
                "uid {uid} cannot reach the temp dir {}: {why}; set TMPDIR to a \
                 folder every user may enter",
                dir.path().display()
            );
        }
    }
    dir
}

/// `bin` copied into `dir` (one from [`tempdir_for_uids`]) with mode 0755, for
/// processes of `uids`: the build's own copy is out of their reach when the target
/// directory is inside a folder only its owner may enter (a checkout in a 0700 home
/// or `mktemp -d` folder).
pub fn copy_for_uids(bin: &Path, dir: &Path, uids: &[u32]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let to = dir.join(bin.file_name().expect("a binary path names a file"));
    std::fs::copy(bin, &to).unwrap_or_else(|e| {
        panic!(
            "cannot copy {} to {} for uids {uids:?}: {e}",
            bin.display(),
            to.display()
        )
    });
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot chmod 0755 {}: {e}", to.display()));
    for &uid in uids {
        if let Some(why) = unreachable_by(uid, &to) {
            panic!("uid {uid} cannot run {}: {why}", to.display());
        }
    }
    to
}

/// `bin` where any uid can run it: a copy in `$TMPDIR/idalloc-test-bins/` (mode
/// 0755), made once per build of it and replaced when it is rebuilt, for tests
/// that run a client or the daemon as another user and have no directory of
/// their own to put it in. Panics saying what is out of reach, as
/// [`tempdir_for_uids`] does.
pub fn bin_for_any_uid(bin: &Path) -> PathBuf {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = std::env::temp_dir().join("idalloc-test-bins");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot chmod 0755 {}: {e}", dir.display()));
    if let Some(why) = unreachable_by(65534, &dir) {
        panic!(
            "other uids cannot reach {}: {why}; set TMPDIR to a folder every user may enter",
            dir.display()
        );
    }
    let meta = std::fs::metadata(bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let name = bin
        .file_name()
        .expect("a binary path names a file")
        .to_string_lossy();
    let to = dir.join(format!(
        "{name}-{}-{}",
        meta.len(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000
    ));
    if !to.exists() {
        // Copied aside and renamed into place: test threads and processes racing
        // for the same copy each see a whole file or none.
        let tmp = dir.join(format!(
            ".{name}.{}.{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::copy(bin, &tmp)
            .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", bin.display(), tmp.display()));
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod 0755 {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &to)
            .unwrap_or_else(|e| panic!("cannot rename {} into place: {e}", tmp.display()));
        // Earlier builds' copies are not needed any more.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let n = e.file_name();
                let n = n.to_string_lossy();
                if n.starts_with(&format!("{name}-")) && e.path() != to {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
    to
}

/// Run `cmd` as `uid` (and gid `uid`) to completion. Panics saying which program
/// the uid could not run and why, instead of a bare PermissionDenied.
pub fn output_as(uid: u32, cmd: &mut Command) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    cmd.uid(uid).gid(uid);
    cmd.output().unwrap_or_else(|e| {
        let program = Path::new(cmd.get_program());
        let why = match unreachable_by(uid, program) {
            Some(why) => why,
            None => "(its path is open to that uid)".into(),
        };
        panic!("cannot run {} as uid {uid}: {e}: {why}", program.display())
    })
}

/// Why a process of `uid` (gid `uid`, no other groups) cannot reach `path`: the
/// first directory on the way it may not search, or the file itself if it may not
/// execute it. `None` if it can, as far as the mode bits say.
fn unreachable_by(uid: u32, path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let path = std::path::absolute(path).ok()?;
    let mut at = PathBuf::new();
    for part in path.components() {
        at.push(part);
        let m = match std::fs::metadata(&at) {
            Ok(m) => m,
            Err(e) => return Some(format!("{}: {e}", at.display())),
        };
        let bit = if m.uid() == uid {
            0o100
        } else if m.gid() == uid {
            0o010
        } else {
            0o001
        };
        if m.mode() & bit == 0 {
            let what = if m.is_dir() { "search" } else { "execute" };
            return Some(format!(
                "{} is mode {:04o}, owner {} group {}: uid {uid} may not {what} it",
                at.display(),
                m.mode() & 0o7777,
                m.uid(),
                m.gid()
            ));
        }
    }
    None
}
