//! Who may do what, attacked through the real daemon (issue 29): the role plain
//! TCP gets, identity taken when the peer connected, refusals that reach the
//! peer in one line, the audit log, redaction, and the connection limits that
//! keep the unauthenticated from starving writers. The tests run as root, so they
//! can act as other uids (a child process drops to them).

mod daemon_support;

use std::process::Command;
use std::time::{Duration, Instant};

use daemon_support::*;
use idalloc::error::ServiceError;
use idalloc::Kind;

const FORK: &str = "0190b6f2-7c1e-7a4b-9c3d-5e6f70819203";

/// Run `idallocctl` against `endpoint`, as `uid` (and gid) when given:
/// (success, stdout, stderr, how long it took).
fn ctl_as(uid: Option<u32>, endpoint: &str, args: &[&str]) -> (bool, String, String, Duration) {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idallocctl"));
    cmd.args(["--endpoint", endpoint, "--timeout", "5s"])
        .args(args);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let started = Instant::now();
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed(),
    )
}

/// A temp dir other uids can traverse (the socket inside it is 0666 in these tests).
fn open_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
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
