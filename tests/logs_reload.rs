//! `[log] format = "json"` and the systemd notifications around a SIGHUP reload.

use crate::daemon_support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use daemon_support::*;

#[test]
fn json_logs_are_one_object_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: "[log]\nformat = \"json\"\n",
            ..Opts::default()
        },
    );
    d.stop();
    let stderr = d.stderr();
    let mut messages = vec![];
    for line in stderr.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not one JSON object: {line:?}: {e}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(v.get(key).is_some(), "no {key} in {line}");
        }
        messages.push(v["message"].as_str().unwrap().to_string());
    }
    assert!(
        messages.iter().any(|m| m == "idallocd starting"),
        "{stderr}"
    );
    // Fields are keys of the object, not text inside the message.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("\"message\":\"idallocd starting\"") && l.contains("\"version\":")),
        "{stderr}"
    );
}

/// Every message systemd receives, until one has a line `until`.
fn recv_until(sock: &UnixDatagram, until: &str) -> Vec<String> {
    let mut got = vec![];
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let n = sock
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no {until} ({e}) after {got:?}"));
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = msg.lines().any(|l| l == until);
        got.push(msg);
        if done {
            return got;
        }
    }
    panic!("no {until} in 30 s: {got:?}");
}

/// SIGHUP tells systemd RELOADING=1 (with MONOTONIC_USEC, as Type=notify-reload
/// requires) and READY=1 once done, also when the new config is refused.
#[test]
fn sighup_is_bracketed_by_reloading_and_ready() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut d = Daemon::start_with(
        dir.path(),
        Opts {
            env: vec![("NOTIFY_SOCKET", notify_path.display().to_string())],
            ..Opts::default()
        },
    );
    recv_until(&notify, "READY=1");
    for broken in [false, true] {
        if broken {
            let config = dir.path().join("idallocd.toml");
            let text = std::fs::read_to_string(&config).unwrap();
            std::fs::write(&config, format!("{text}\n[log]\nlevel = \"wran\"\n")).unwrap();
        }
        d.signal(libc::SIGHUP);
        let got = recv_until(&notify, "READY=1");
        let reloading = got
            .iter()
            .position(|m| m.lines().any(|l| l == "RELOADING=1"))
            .unwrap_or_else(|| panic!("no RELOADING=1 before READY=1: {got:?}"));
        let usec: u64 = got[reloading]
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {got:?}"))
            .parse()
            .unwrap();
        assert!(usec > 0);
        // READY=1 comes in a later message: the reload is over only then.
        assert!(reloading < got.len() - 1, "{got:?}");
    }
    assert!(
        d.stderr().contains("SIGHUP: the config file is not valid"),
        "{}",
        d.stderr()
    );
    d.stop();
}
