//! Who may do what, attacked through the real daemon: the role plain
//! TCP gets, identity taken when the peer connected, refusals that reach the
//! peer in one line, the audit log, redaction, and the connection limits that
//! keep the unauthenticated from starving writers. The tests run as root, so they
//! can act as other uids (a child process drops to them).

use crate::daemon_support;

use std::process::Command;
use std::time::{Duration, Instant};

use daemon_support::*;
use idalloc_client::error::ServiceError;
use idalloc_client::Kind;

const FORK: &str = "0190b6f2-7c1e-7a4b-9c3d-5e6f70819203";

/// Run `idallocctl` against `endpoint`, as `uid` (and gid) when given:
/// (success, stdout, stderr, how long it took).
fn ctl_as(uid: Option<u32>, endpoint: &str, args: &[&str]) -> (bool, String, String, Duration) {
    let mut cmd = Command::new(bin_for_any_uid(crate::daemon_support::ctl_bin()));
    cmd.args(["--endpoint", endpoint, "--timeout", "5s"])
        .args(args);
    let started = Instant::now();
    let out = match uid {
        Some(uid) => output_as(uid, &mut cmd),
        None => cmd.output().unwrap(),
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// A temp dir other uids can traverse (the socket inside it is 0666 in these tests).
fn open_dir() -> tempfile::TempDir {
    tempdir_for_uids(&[65534, 1003, 1004, 1005])
}

/// Item 1: plain TCP carries no identity, so whatever role it gets, every local
/// user gets. By default that is writer (it was admin: uid 65534, refused on the
/// unix socket, dropped forks over TCP); start-up and check-config say so.
#[test]
fn plain_tcp_peers_are_writers_by_default_and_told_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = tcp_client(&d.tcp).await.unwrap();
        c.reserve(ctx(), None, Kind::Vid, 3).await.unwrap().unwrap();
        for refused in [
            c.checkpoint(ctx(), None).await.unwrap(),
            c.drop_fork(ctx(), FORK.into())
                .await
                .unwrap()
                .map(|_| unreachable!("a TCP peer dropped a fork")),
        ] {
            match refused {
                Err(ServiceError::PermissionDenied(m)) => {
                    assert!(m.contains("tcp 127.0.0.1") && m.contains("(writer)"), "{m}")
                }
                other => panic!("a plain TCP peer was not refused: {other:?}"),
            }
        }
    });
    assert!(
        d.stderr()
            .contains("every local user who can connect gets the writer role"),
        "{}",
        d.stderr()
    );
    let config = dir.path().join("idallocd.toml");
    let (ok, _, err) = run_to_end(&["check-config", config.to_str().unwrap()], dir.path());
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("tcp:{}", d.tcp))
            && err.contains("gets the writer role ([access] tcp_role = \"writer\")"),
        "{err}"
    );
}

/// A tarpc client over an already connected unix socket.
fn client_over(fd: std::os::fd::OwnedFd) -> idalloc_client::protocol::IdAllocClient {
    let std_stream = std::os::unix::net::UnixStream::from(fd);
    std_stream.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(std_stream).unwrap();
    let framed =
        tokio_util::codec::Framed::new(stream, tokio_util::codec::LengthDelimitedCodec::new());
    let transport =
        tarpc::serde_transport::new(framed, tarpc::tokio_serde::formats::Bincode::default());
    idalloc_client::protocol::IdAllocClient::new(tarpc::client::Config::default(), transport)
        .spawn()
}

/// Item 3: identity is what the peer was when it connected. A process of writer
/// uid 1003 with no supplementary groups connects while every slot is busy,
/// then (it keeps a saved uid of root) joins admin group 1500. The daemon used to
/// read the groups from `/proc/<pid>/status` when the slot freed, and made that
/// connection an admin: it checkpointed. Now the groups are `SO_PEERGROUPS`'s,
/// recorded at `connect(2)`: a writer, refused.
#[test]
fn groups_are_the_ones_the_peer_had_when_it_connected() {
    use std::os::fd::{FromRawFd, OwnedFd};
    let dir = open_dir();
    let d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: "socket_mode = \"0666\"\nmax_connections = 1\n[access]\nwriter_uids = [\"1003\"]\nadmin_groups = [\"1500\"]\n",
            ..Opts::default()
        },
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let holder = rt.block_on(async {
        let c = unix_client(&d.socket).await.unwrap();
        c.reserve(ctx(), None, Kind::Vid, 1).await.unwrap().unwrap();
        c
    });
    // Everything the child needs is made before fork(): after it, only raw
    // system calls (the test process has other threads).
    let path = d.socket.to_str().unwrap().as_bytes().to_vec();
    // SAFETY: plain system calls on fresh descriptors and zeroed C structs; the
    // child calls only async-signal-safe functions and never returns.
    let (fd, pid) = unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (i, b) in path.iter().enumerate() {
            addr.sun_path[i] = *b as libc::c_char;
        }
        let mut pipe = [0; 2];
        assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
        let admin: libc::gid_t = 1500;
        let pid = libc::fork();
        if pid == 0 {
            let ok = libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(u32::MAX, 1003, u32::MAX) == 0
                && libc::setresuid(u32::MAX, 1003, u32::MAX) == 0
                && libc::connect(
                    fd,
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                ) == 0
                && libc::setresuid(u32::MAX, 0, u32::MAX) == 0
                && libc::setgroups(1, &admin) == 0;
            let byte: u8 = if ok { b'y' } else { b'n' };
            libc::write(pipe[1], (&byte as *const u8).cast(), 1);
            loop {
                libc::pause();
            }
        }
        let mut byte = 0u8;
        assert_eq!(libc::read(pipe[0], (&mut byte as *mut u8).cast(), 1), 1);
        libc::close(pipe[0]);
        libc::close(pipe[1]);
        assert_eq!(
            byte, b'y',
            "the child could not connect and change its groups"
        );
        (OwnedFd::from_raw_fd(fd), pid)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l == "Groups:\t1500 " || l == "Groups:\t1500"),
        "{status}"
    );
    drop(holder);
    let result = rt.block_on(async {
        let c = client_over(fd);
        c.checkpoint(ctx(), None).await
    });
    // SAFETY: kill(2) and waitpid(2) on our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    match result {
        Ok(Err(ServiceError::PermissionDenied(m))) => {
            assert!(m.contains("uid 1003") && m.contains("(writer)"), "{m}")
        }
        other => panic!(
            "a connection made without the admin group was served as: {other:?}\n{}",
            d.stderr()
        ),
    }
}

/// Item 4: under `ProtectProc=invisible` (and in any pid namespace that does not
/// see the peer) `/proc/<pid>` of a peer cannot be read, and its supplementary
/// groups were silently empty: uid 1004, an admin through group 1500, was
/// refused. The daemon runs here in a pid namespace of its own (the peer's pid
/// is 0 there); `SO_PEERGROUPS` needs no `/proc`.
#[test]
fn supplementary_groups_count_where_proc_is_hidden() {
    use std::os::unix::process::CommandExt;
    let dir = open_dir();
    let socket = dir.path().join("d.sock");
    let config = dir.path().join("idallocd.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = [\"unix:{}\"]\nsocket_mode = \"0666\"\n[access]\nadmin_groups = [\"1500\"]\n",
            dir.path().join("data").display().to_string(),
            socket.display()
        ),
    )
    .unwrap();
    let stderr_path = dir.path().join("stderr.log");
    let child = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(daemon_bin())
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child,
        dir: dir.path().to_path_buf(),
        socket: socket.clone(),
        tcp: String::new(),
        stderr_path,
    };
    d.wait_serving();
    let mut cmd = Command::new(bin_for_any_uid(crate::daemon_support::ctl_bin()));
    cmd.args(["--endpoint", &format!("unix:{}", socket.display())])
        .args(["--timeout", "5s", "checkpoint"]);
    // SAFETY: only setgroups/setgid/setuid between fork and exec. std's own
    // uid()/gid() would drop the supplementary groups.
    unsafe {
        cmd.pre_exec(|| {
            let admin: libc::gid_t = 1500;
            if libc::setgroups(1, &admin) != 0 || libc::setgid(1004) != 0 || libc::setuid(1004) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "an admin through a supplementary group was refused: {err}\n{}",
        d.stderr()
    );
}

/// Item 5: a peer with no role is told why, in one line, at once: the daemon
/// answers its first request with the refusal and the client does not retry
/// it. It used to wait for its whole deadline ("no answer ... is idallocd
/// overloaded?") while redialing without pause, and each redial was a WARN
/// line; now refusals of one peer are one line per 10 s, with a count.
#[test]
fn a_peer_with_no_role_is_told_why_at_once_and_logged_once() {
    let dir = open_dir();
    let d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: "socket_mode = \"0666\"\n",
            ..Opts::default()
        },
    );
    let endpoint = format!("unix:{}", d.socket.display());
    for args in [
        &["status"][..],
        &["alloc", "vid"][..],
        &["fork", "list"][..],
    ] {
        let (ok, _, err, took) = ctl_as(Some(65534), &endpoint, args);
        assert!(!ok, "uid 65534 was served {args:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.contains("permission denied: uid 65534 has no role; see [access]"),
            "{args:?}: {err}"
        );
        assert!(
            took < Duration::from_secs(2),
            "{args:?} took {took:?}: {err}"
        );
    }
    let log = d.stderr();
    assert_eq!(
        log.matches("connection refused: the peer has no role")
            .count(),
        1,
        "three refusals of one peer within 10 s are one line:\n{log}"
    );
    assert!(log.contains("uid 65534"), "{log}");
}

/// Item 8: every admin action that succeeds is logged with the peer that did
/// it (`checkpoint` was not logged at all, the others without the peer).
#[test]
fn admin_actions_are_audited_with_the_peer() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let endpoint = format!("unix:{}", d.socket.display());
    let merged = "0190b6f2-7c1e-7a4b-9c3d-5e6f70819204";
    for args in [
        &["checkpoint"][..],
        &["fork", "bootstrap", FORK][..],
        &["fork", "drop", FORK][..],
        &["fork", "bootstrap", merged][..],
        &["alloc", "vid", "--fork", merged][..],
        &["fork", "merge", merged][..],
        &["repair", "--vid-floor", "1", "--eid-floor", "1"][..],
    ] {
        let (ok, _, err, _) = ctl_as(None, &endpoint, args);
        assert!(ok, "{args:?}: {err}");
    }
    let log = d.stderr();
    for line in [
        "audit: checkpoint of primary by uid 0".to_string(),
        format!("audit: fork drop of {FORK} by uid 0"),
        format!("audit: fork merge of {merged} into its parent by uid 0"),
        "audit: repair of primary (vid floor 1, eid floor 1) by uid 0".to_string(),
    ] {
        assert!(
            log.lines().any(|l| l.contains(&line) && l.contains("done")),
            "no {line:?} in:\n{log}"
        );
    }
}

/// Item 6: an endpoint's password, a URL's fragment and the store's own error
/// text (which quotes the request's URL) reach neither check-config's output
/// nor the fatal start-up error. (Writers' view of store errors:
/// `server::service::tests::writers_see_no_store_error_detail`.)
#[test]
fn store_secrets_are_redacted_in_check_config_and_start_up_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("idallocd.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = [\"unix:{}\"]\n[object_store]\nurl = \"s3://bucket/p#frag-secret\"\nstartup_check = false\ntimeout = \"300ms\"\nretries = 0\n[object_store.options]\naws_endpoint = \"http://AKIA:hunter2@127.0.0.1:1/#frag-secret\"\naws_access_key_id = \"AKIA\"\naws_secret_access_key = \"topsecret\"\naws_region = \"us-east-1\"\nallow_http = \"true\"\n",
            dir.path().join("data").display().to_string(),
            dir.path().join("d.sock").display()
        ),
    )
    .unwrap();
    let secrets = ["hunter2", "frag-secret", "topsecret"];
    let path = config.to_str().unwrap();
    let (ok, out, err) = run_to_end(&["check-config", path], dir.path());
    assert!(ok, "{err}");
    assert!(
        out.contains("127.0.0.1:1"),
        "the endpoint's host is shown: {out}"
    );
    for s in secrets {
        assert!(
            !out.contains(s) && !err.contains(s),
            "{s} in check-config:\n{out}\n{err}"
        );
    }
    let (ok, out, err) = run_to_end(&["--config", path], dir.path());
    assert!(!ok, "started against an unreachable store:\n{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("idallocd: error: "), "{err}");
    for s in secrets {
        assert!(
            !out.contains(s) && !err.contains(s),
            "{s} in the start-up output:\n{err}"
        );
    }
}

/// Item 7: one identity holds at most `max_connections_per_identity` of the
/// slots (the next is told why), and a connection with no request for
/// `idle_timeout` is closed, freeing its slot. (On the old daemon 64 idle
/// connections of one writer filled `max_connections` for good.)
#[test]
fn one_identity_cannot_fill_the_slots_and_idle_connections_close() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml:
                "max_connections = 8\nmax_connections_per_identity = 3\nidle_timeout = \"1s\"\n",
            ..Opts::default()
        },
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..3 {
            let c = unix_client(&d.socket).await.unwrap();
            c.status(ctx()).await.unwrap().unwrap();
            held.push(c);
        }
        let fourth = unix_client(&d.socket).await.unwrap();
        match fourth.status(ctx()).await.unwrap() {
            Err(ServiceError::Unavailable { message, .. }) => assert!(
                message.contains("too many connections: uid 0 already holds 3"),
                "{message}"
            ),
            other => panic!("a fourth connection of uid 0 was served: {other:?}"),
        }
        // Plain TCP is another identity: served.
        let tcp = tcp_client(&d.tcp).await.unwrap();
        tcp.status(ctx()).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        for c in &held {
            assert!(
                c.status(ctx()).await.is_err(),
                "an idle connection was still open after idle_timeout"
            );
        }
        let again = unix_client(&d.socket).await.unwrap();
        again.status(ctx()).await.unwrap().unwrap();
    });
    assert!(
        d.stderr()
            .contains("connection refused: too many connections of one identity"),
        "{}",
        d.stderr()
    );
}

/// Item 7: the daemon raises its soft open-file limit to fit
/// `max_connections` (it ran with whatever it was given: 256 idle connections
/// then made accept fail with EMFILE).
#[test]
fn the_open_file_limit_is_raised_to_fit_max_connections() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("d.sock");
    let config = dir.path().join("idallocd.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = [\"unix:{}\"]\nmax_connections = 2000\n",
            dir.path().join("data").display().to_string(),
            socket.display()
        ),
    )
    .unwrap();
    let stderr_path = dir.path().join("stderr.log");
    let child = Command::new("prlimit")
        .arg("--nofile=256:8192")
        .arg(daemon_bin())
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child,
        dir: dir.path().to_path_buf(),
        socket,
        tcp: String::new(),
        stderr_path,
    };
    d.wait_serving();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.child.id())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(soft >= 2000, "soft open-file limit {soft}:\n{limits}");
    assert!(
        d.stderr().contains("raised the open-file limit"),
        "{}",
        d.stderr()
    );
}

/// Item 7: idle HTTP connections to the metrics endpoint hold at most its 16
/// slots; the rest wait in the backlog without a descriptor (300 of them used
/// to take every descriptor the daemon had).
#[test]
fn idle_metrics_connections_hold_no_more_than_the_scrape_slots() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let toml = format!("[metrics]\nlisten = {metrics:?}\n");
    let d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: &toml,
            ..Opts::default()
        },
    );
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", d.child.id()))
            .unwrap()
            .count()
    };
    let before = fds();
    let idle: Vec<_> = (0..100)
        .map(|_| std::net::TcpStream::connect(&metrics).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = fds();
    assert!(
        during <= before + 16,
        "100 idle metrics connections took {} descriptors",
        during - before
    );
    drop(idle);
    let body = scrape(&metrics);
    assert!(body.contains("idalloc_build_info"), "{body}");
}

/// Items 10 and 11: the daemon's own uid is an admin unless
/// `own_uid_is_admin = false` (in a single-uid container every writer was an
/// admin), and `[access]` takes numbers as TOML integers (`writer_uids = [1005]`
/// was a type error). The daemon runs as uid 1005 here, and so does its writer.
#[test]
fn the_daemons_own_uid_need_not_be_admin_and_uids_may_be_integers() {
    use std::os::unix::process::CommandExt;
    let dir = open_dir();
    std::os::unix::fs::chown(dir.path(), Some(1005), Some(1005)).unwrap();
    let socket = dir.path().join("d.sock");
    let config = dir.path().join("idallocd.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nlisten = [\"unix:{}\"]\n[access]\nwriter_uids = [1005]\nown_uid_is_admin = false\n",
            dir.path().join("data").display().to_string(),
            socket.display()
        ),
    )
    .unwrap();
    let stderr_path = dir.path().join("stderr.log");
    let child = Command::new(bin_for_any_uid(&daemon_bin()))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .uid(1005)
        .gid(1005)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let mut d = Daemon {
        child,
        dir: dir.path().to_path_buf(),
        socket,
        tcp: String::new(),
        stderr_path,
    };
    d.wait_serving();
    let endpoint = format!("unix:{}", d.socket.display());
    let (ok, _, err, _) = ctl_as(Some(1005), &endpoint, &["alloc", "vid"]);
    assert!(ok, "{err}");
    let (ok, _, err, _) = ctl_as(Some(1005), &endpoint, &["checkpoint"]);
    assert!(
        !ok,
        "the daemon's own uid checkpointed with own_uid_is_admin = false"
    );
    assert!(
        err.contains("needs the admin role") && err.contains("uid 1005"),
        "{err}"
    );
    let (ok, _, err, _) = ctl_as(None, &endpoint, &["checkpoint"]);
    assert!(ok, "root is still an admin: {err}");
}
