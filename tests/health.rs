//! `idallocctl health` against the real daemon: exit 0 when healthy, 1 when the
//! object store or a namespace is unavailable, 3 when the daemon is unreachable,
//! with one line saying which.

use crate::daemon_support;

use std::path::Path;
use std::process::Output;

use daemon_support::*;

fn health(endpoint: &str, json: bool) -> Output {
    let mut cmd = std::process::Command::new(crate::daemon_support::ctl_bin());
    cmd.args(["--endpoint", endpoint, "--timeout", "5s", "health"]);
    if json {
        cmd.arg("--json");
    }
    cmd.env_remove("IDALLOC_ENDPOINT").output().unwrap()
}

fn ctl(endpoint: &str, args: &[&str]) -> Output {
    std::process::Command::new(crate::daemon_support::ctl_bin())
        .args(["--endpoint", endpoint, "--timeout", "5s"])
        .args(args)
        .env_remove("IDALLOC_ENDPOINT")
        .output()
        .unwrap()
}

/// The one line on stderr of an unhealthy verdict.
fn complaint(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    err
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A daemon whose object store is the directory `dir/store`.
fn start(dir: &Path) -> Daemon {
    let store = dir.join("store");
    Daemon::start_with(
        dir,
        Opts {
            extra_toml: &format!("[object_store]\nurl = \"file://{}\"\n", store.display()),
            ..Opts::default()
        },
    )
}

#[test]
fn a_serving_daemon_is_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path());
    let ep = format!("unix:{}", d.socket.display());
    let fork = idalloc_client::ForkId::generate().to_string();
    assert!(ctl(&ep, &["fork", "bootstrap", &fork]).status.success());
    let out = health(&ep, false);
    assert_eq!(out.status.code(), Some(0), "{}", complaint(&out));
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(
        line.starts_with("healthy: idallocd ") && line.contains("2 live namespaces"),
        "{line}"
    );
    assert!(out.stderr.is_empty());
    let j = json(&health(&ep, true));
    assert_eq!(j["healthy"], true, "{j}");
    assert_eq!(j["problem"], serde_json::Value::Null, "{j}");
    assert_eq!(j["store"]["healthy"], true, "{j}");
    assert_eq!(j["unavailable"], serde_json::json!([]), "{j}");
    d.stop();
}

#[test]
fn an_unreachable_daemon_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let ep = format!("unix:{}", dir.path().join("nobody.sock").display());
    let out = health(&ep, false);
    assert_eq!(out.status.code(), Some(3));
    let line = complaint(&out);
    assert!(
        line.starts_with("idallocctl: unreachable: cannot connect to unix:"),
        "{line}"
    );
    let out = health(&ep, true);
    assert_eq!(out.status.code(), Some(3));
    let j = json(&out);
    assert_eq!(
        (&j["healthy"], &j["problem"]),
        (&false.into(), &"unreachable".into()),
        "{j}"
    );
}

#[test]
fn a_broken_store_is_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path());
    let ep = format!("unix:{}", d.socket.display());
    let out = health(&ep, false);
    assert_eq!(out.status.code(), Some(0), "{}", complaint(&out));
    // The root becomes a plain file: every later store call fails, as on a
    // store that went away. A new fork needs a store write.
    let store = dir.path().join("store");
    std::fs::rename(&store, dir.path().join("store.gone")).unwrap();
    std::fs::write(&store, "not a directory").unwrap();
    let fork = idalloc_client::ForkId::generate().to_string();
    assert!(!ctl(&ep, &["fork", "bootstrap", &fork]).status.success());
    let out = health(&ep, false);
    assert_eq!(out.status.code(), Some(1));
    let line = complaint(&out);
    assert!(
        line.starts_with("idallocctl: unhealthy: object store file://")
            && line.contains("unavailable"),
        "{line}"
    );
    let out = health(&ep, true);
    assert_eq!(out.status.code(), Some(1));
    let j = json(&out);
    assert_eq!(
        (&j["healthy"], &j["problem"]),
        (&false.into(), &"store".into()),
        "{j}"
    );
    assert_eq!(j["store"]["healthy"], false, "{j}");
    // `status` shows it too, but exits 0: health is the command with a verdict.
    assert!(ctl(&ep, &["status"]).status.success());
    // Back: the next store call succeeds and health follows.
    std::fs::remove_file(&store).unwrap();
    std::fs::rename(dir.path().join("store.gone"), &store).unwrap();
    assert!(ctl(&ep, &["fork", "bootstrap", &fork]).status.success());
    let out = health(&ep, false);
    assert_eq!(out.status.code(), Some(0), "{}", complaint(&out));
    d.stop();
}

#[test]
fn a_fork_with_a_corrupt_manifest_is_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path());
    let ep = format!("unix:{}", d.socket.display());
    let fork = idalloc_client::ForkId::generate().to_string();
    assert!(ctl(&ep, &["fork", "bootstrap", &fork]).status.success());
    d.stop();
    let manifest = dir
        .path()
        .join("store/catalog/forks")
        .join(&fork)
        .join("id_allocator.json");
    assert!(manifest.exists(), "{}", manifest.display());
    // Truncated mid-number: a manifest that does not parse.
    std::fs::write(&manifest, "{\"next_vid_batch\": 12").unwrap();
    let mut d = start(dir.path());
    let out = health(&ep, false);
    assert_eq!(out.status.code(), Some(1));
    let line = complaint(&out);
    assert!(
        line.starts_with(&format!(
            "idallocctl: unhealthy: namespace {fork} unavailable"
        )),
        "{line}"
    );
    assert!(
        line.contains("id_allocator.json"),
        "names the manifest: {line}"
    );
    let j = json(&health(&ep, true));
    assert_eq!(j["problem"], "namespace", "{j}");
    assert_eq!(j["unavailable"][0]["namespace"], fork.as_str(), "{j}");
    // The primary keeps serving meanwhile.
    assert!(ctl(&ep, &["alloc", "vid"]).status.success());
    d.stop();
}
