//! `idallocctl` as scripts use it, against the in-process fake daemon: JSON keys
//! from DESIGN.md, the endpoint from `IDALLOC_ENDPOINT`, one-line errors with a
//! non-zero exit, and `bench` checking disjointness.

use crate::client_support;

use std::process::Output;
use std::sync::Arc;

use client_support::FakeDaemon;
use idalloc_client::ForkId;

async fn ctl(endpoint: Option<&str>, args: &[&str]) -> Output {
    ctl_in(None, endpoint, args).await
}

/// [`ctl`] run in the directory `cwd` (else the test's own).
async fn ctl_in(cwd: Option<&std::path::Path>, endpoint: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(crate::daemon_support::ctl_bin());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.args(args)
        .env_remove("IDALLOC_ENDPOINT")
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("STATE_DIRECTORY");
    if let Some(e) = endpoint {
        cmd.env("IDALLOC_ENDPOINT", e);
    }
    cmd.output().await.unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("idallocctl: "), "{err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_print_the_documented_json() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::start(&dir.path().join("d.sock"), Arc::default()).await;
    let endpoint = daemon.endpoint();
    let ep = Some(endpoint.as_str());

    let a = json(&ctl(ep, &["alloc", "vid", "--count", "10", "--json"]).await);
    assert_eq!(
        (a["start"].as_u64(), a["end"].as_u64(), a["count"].as_u64()),
        (Some(0), Some(10), Some(10))
    );
    assert_eq!(a["kind"], "vid");
    let b = json(&ctl(ep, &["alloc", "vid", "--json"]).await);
    assert_eq!(b["start"].as_u64(), Some(10));
    let text = ctl(ep, &["alloc", "eid", "--count", "5"]).await;
    assert_eq!(String::from_utf8_lossy(&text.stdout).trim(), "0..5");

    let h = json(&ctl(ep, &["hwm", "--json"]).await);
    assert_eq!(
        (h["next_vid"].as_u64(), h["next_eid"].as_u64()),
        (Some(11), Some(5))
    );

    let fork = ForkId::generate().to_string();
    let f = json(
        &ctl(
            ep,
            &["fork", "bootstrap", &fork, "--vid-hwm", "100", "--json"],
        )
        .await,
    );
    assert_eq!(f["fork"], fork.as_str());
    assert_eq!(
        (f["next_vid"].as_u64(), f["next_eid"].as_u64()),
        (Some(100), Some(5))
    );
    assert_eq!(f["created"], true);
    let again = json(&ctl(ep, &["fork", "bootstrap", &fork, "--json"]).await);
    assert_eq!(again["created"], false);
    let a = json(&ctl(ep, &["alloc", "vid", "--fork", &fork, "--json"]).await);
    assert_eq!(a["start"].as_u64(), Some(100));
    assert_eq!(a["fork"], fork.as_str());

    let list = json(&ctl(ep, &["fork", "list", "--json"]).await);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert!(ctl(ep, &["checkpoint", "--fork", &fork])
        .await
        .status
        .success());
    assert!(ctl(ep, &["fork", "drop", &fork]).await.status.success());
    let list = json(&ctl(ep, &["fork", "list", "--json"]).await);
    assert_eq!(list[0]["dropped"], true);
    let s = json(&ctl(ep, &["status", "--json"]).await);
    assert_eq!(s["namespaces_total"].as_u64(), Some(2));

    // --endpoint beats the environment.
    let wrong = format!("unix:{}", dir.path().join("nothing.sock").display());
    let out = ctl(Some(&wrong), &["--endpoint", &endpoint, "hwm", "--json"]).await;
    assert!(out.status.success());
}

/// With no endpoint given: a daemon started with no arguments in the current
/// directory, else the system daemon's socket (as redis-cli and psql find theirs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_endpoint_is_the_local_socket_then_the_system_one() {
    let dir = tempfile::tempdir().unwrap();
    let err = one_line_error(&ctl_in(Some(dir.path()), None, &["hwm"]).await);
    assert!(
        err.contains("cannot connect to unix:/run/idallocd/idallocd.sock"),
        "{err}"
    );
    let local = dir.path().join("idallocd-data");
    std::fs::create_dir(&local).unwrap();
    let _daemon = FakeDaemon::start(&local.join("idallocd.sock"), Arc::default()).await;
    let h = json(&ctl_in(Some(dir.path()), None, &["hwm", "--json"]).await);
    assert_eq!(h["next_vid"].as_u64(), Some(0), "{h}");
    // Inside a unit, its own runtime directory comes first.
    let other = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(crate::daemon_support::ctl_bin());
    let out = cmd
        .current_dir(dir.path())
        .args(["hwm"])
        .env_remove("IDALLOC_ENDPOINT")
        .env_remove("STATE_DIRECTORY")
        .env("RUNTIME_DIRECTORY", other.path())
        .output()
        .await
        .unwrap();
    let err = one_line_error(&out);
    assert!(
        err.contains(&format!("{}/idallocd.sock", other.path().display())),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("unix:{}", dir.path().join("missing.sock").display());
    let err = one_line_error(&ctl(Some(&missing), &["hwm"]).await);
    assert!(
        err.contains("cannot connect to unix:") && err.contains("is idallocd running?"),
        "{err}"
    );

    let daemon = FakeDaemon::start(&dir.path().join("d.sock"), Arc::default()).await;
    let ep = daemon.endpoint();
    let err = one_line_error(&ctl(Some(&ep), &["alloc", "vid", "--count", "0"]).await);
    assert!(err.contains("invalid argument"), "{err}");
    let err = one_line_error(&ctl(Some(&ep), &["alloc", "vid", "--fork", "nope"]).await);
    assert!(err.contains("malformed fork id"), "{err}");
    let unknown = ForkId::generate().to_string();
    let err = one_line_error(&ctl(Some(&ep), &["hwm", "--fork", &unknown]).await);
    assert!(
        err.contains("unknown fork") && err.contains("bootstrap"),
        "{err}"
    );
    let err = one_line_error(&ctl(Some(&ep), &["alloc", "vertex"]).await);
    assert!(err.contains("--help"), "{err}");
    let out = ctl(Some("http://x"), &["hwm"]).await;
    let err = one_line_error(&out);
    assert!(
        err.contains("unix:PATH, tcp:HOST:PORT or tls:HOST:PORT"),
        "{err}"
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad endpoint is a usage error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_has_json_spelled_as_the_text_is() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::start(&dir.path().join("d.sock"), Arc::default()).await;
    let endpoint = daemon.endpoint();
    let ep = Some(endpoint.as_str());
    let fork = ForkId::generate().to_string();
    json(&ctl(ep, &["fork", "bootstrap", &fork, "--json"]).await);
    let c = json(&ctl(ep, &["checkpoint", "--fork", &fork, "--json"]).await);
    assert_eq!(c["fork"], fork.as_str());
    assert!(c["next_vid"].is_u64() && c["root_wide"].is_boolean(), "{c}");
    let list = json(&ctl(ep, &["fork", "list", "--json"]).await);
    assert!(
        list[0].get("created").is_none(),
        "`created` means nothing in a listing: {list}"
    );
    let d = json(&ctl(ep, &["fork", "drop", &fork, "--json"]).await);
    assert_eq!(
        (d["fork"].as_str(), d["dropped"].as_bool()),
        (Some(fork.as_str()), Some(true))
    );
    let s = json(&ctl(ep, &["status", "--json"]).await);
    assert_eq!(s["mode"], "single-writer", "as the text output spells it");
}

/// `fork list` is a table people read and scripts split: a header row, each column
/// as wide as its widest cell (a dropped fork's row included), plain ASCII with no
/// colour or box drawing, whether or not stdout is a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_list_is_a_table_awk_can_split() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::start(&dir.path().join("d.sock"), Arc::default()).await;
    let endpoint = daemon.endpoint();
    let ep = Some(endpoint.as_str());
    let uuid = ForkId::generate().to_string();
    let ulid = ulid::Ulid::from(ForkId::generate().value()).to_string();
    for args in [
        &["fork", "bootstrap", &uuid, "--eid-hwm", "123456789012"][..],
        &["fork", "bootstrap", &ulid, "--parent", &uuid][..],
        &["fork", "drop", &uuid][..],
    ] {
        let out = ctl(ep, args).await;
        assert!(out.status.success(), "{args:?}: {:?}", out.stderr);
    }
    let out = ctl(ep, &["fork", "list"]).await;
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.is_ascii() && !text.contains('\x1b'), "{text:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    let rows: Vec<Vec<&str>> = lines
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["FORK", "PARENT", "NEXT_VID", "NEXT_EID", "STATE"],
        "{text}"
    );
    let row = |fork: &str| rows.iter().find(|r| r[0] == fork).unwrap().clone();
    assert_eq!(row(&uuid)[1..], ["primary", "0", "123456789012", "dropped"]);
    assert_eq!(
        row(&ulid)[1..],
        [uuid.as_str(), "0", "123456789012", "live"]
    );
    // Aligned: each cell starts (text) or ends (numbers) where its column's name
    // does, so no cell overflows into the next column.
    let col = |name: &str| lines[0].find(name).unwrap();
    for (line, r) in lines.iter().zip(&rows).skip(1) {
        assert!(line[col("PARENT")..].starts_with(r[1]), "{text}");
        assert!(line[..col("NEXT_EID") + 8].ends_with(r[3]), "{text}");
        assert_eq!(&line[col("STATE")..], r[4], "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_the_program_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::start(&dir.path().join("d.sock"), Arc::default()).await;
    let endpoint = daemon.endpoint();
    for _ in 0..3 {
        let out = ctl(
            Some(&endpoint),
            &["fork", "bootstrap", &ForkId::generate().to_string()],
        )
        .await;
        assert!(out.status.success());
    }
    // `idallocctl fork list | head -0`: the reader is gone before the first line.
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} fork list; echo \"exit=$?\" >&2",
            crate::daemon_support::ctl_bin().display()
        ))
        .env("IDALLOC_ENDPOINT", &endpoint)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(|mut child| {
            drop(child.stdout.take());
            child
        })
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
    assert!(err.contains("exit=141"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_and_checks_disjointness() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = FakeDaemon::start(&dir.path().join("d.sock"), Arc::default()).await;
    let ep = daemon.endpoint();
    let out = ctl(
        Some(&ep),
        &[
            "bench",
            "--clients",
            "2",
            "--concurrency",
            "3",
            "--size",
            "7",
            "--requests",
            "600",
            "--json",
        ],
    )
    .await;
    let r = json(&out);
    assert_eq!(r["reservations"].as_u64(), Some(600));
    assert_eq!(r["ids"].as_u64(), Some(4200));
    assert_eq!(r["disjoint"], true);
    assert!(r["latency_us"]["p99"].as_f64().unwrap() > 0.0);
    let l: Vec<f64> = ["p50", "p99", "p999", "max"]
        .map(|k| r["latency_us"][k].as_f64().unwrap())
        .to_vec();
    assert!(l.windows(2).all(|w| w[0] <= w[1]), "{}", r["latency_us"]);
    let text = ctl(
        Some(&ep),
        &[
            "bench",
            "--duration",
            "1s",
            "--clients",
            "1",
            "--concurrency",
            "2",
        ],
    )
    .await;
    assert!(text.status.success());
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(
        stdout.contains("all disjoint") && stdout.contains("p999"),
        "{stdout}"
    );
}

#[tokio::test]
async fn help_teaches_with_examples() {
    let out = ctl(None, &["--help"]).await;
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "IDALLOC_ENDPOINT",
        "Examples:",
        "alloc",
        "fork",
        "bench",
        "idallocd.sock",
        "/run/idallocd/idallocd.sock",
        "/run/idallocd/NAME/idallocd.sock",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}
