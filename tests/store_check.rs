//! `idallocd store-check` and the start-up probe: is this S3-compatible store safe
//! for several daemons? moto behind its lock (as the tests run it) is; moto
//! without it (conditional writes checked and written in two steps, as stock
//! `moto_server` and some S3-compatible servers do) is not, and the daemon refuses
//! to run multi-writer on it.

mod daemon_support;
mod s3_support;

use std::process::Command;

use daemon_support::{daemon_bin, Daemon, Opts};
use s3_support::Moto;

fn config(dir: &std::path::Path, moto: &Moto) -> std::path::PathBuf {
    let file = dir.join("check.toml");
    std::fs::write(&file, moto.daemon_toml("check", &moto.endpoint(), "")).unwrap();
    file
}

fn store_check(file: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    let out = Command::new(daemon_bin())
        .args(["store-check", "--config", file.to_str().unwrap()])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn moto_behind_its_lock_is_safe() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let file = config(dir.path(), &moto);
    let (ok, out, err) = store_check(&file, &["--rounds", "10", "--writers", "8"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("SAFE for several daemons"), "{out}");
    assert!(out.contains("10 of 10 with exactly one winner"), "{out}");
    let (ok, out, err) = store_check(&file, &["--rounds", "3", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["safe"], true);
    assert_eq!(v["create_once"], true);
    assert_eq!(v["stale_update_refused"], true);
}

#[test]
fn a_store_whose_conditional_writes_race_is_unsafe_and_refused_at_start_up() {
    let moto = Moto::start_unserialised();
    let dir = tempfile::tempdir().unwrap();
    let file = config(dir.path(), &moto);
    let (ok, out, _) = store_check(&file, &["--rounds", "20", "--writers", "16"]);
    assert!(!ok, "an unsafe store passed: {out}");
    assert!(out.contains("UNSAFE for several daemons"), "{out}");
    assert!(out.contains("several winners"), "{out}");
    // The daemon probes at start-up and refuses multi-writer mode on it, in one
    // line that says how to run the full check.
    let mut d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: &moto.daemon_toml("daemon", &moto.endpoint(), ""),
            wait: false,
            ..Opts::default()
        },
    );
    let st = d.wait_exit(60);
    assert!(!st.success());
    let err = d.stderr();
    let line = err
        .lines()
        .find(|l| l.contains("UNSAFE"))
        .unwrap_or_else(|| panic!("no refusal in:\n{err}"));
    assert!(line.contains("idallocd store-check"), "{line}");
}
