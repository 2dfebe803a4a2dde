//! The `idallocd` command line and its packaging, without a running engine:
//! `check-config`, start-up refusals that happen before recovery, `--help`, and the
//! systemd units.

use crate::daemon_support;

use daemon_support::*;

#[test]
fn check_config_accepts_the_shipped_file_and_prints_effective_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/config/idallocd.toml");
    let (ok, out, err) = run_to_end(&["check-config", file], dir.path());
    assert!(ok, "{err}");
    assert!(err.contains("is valid"), "{err}");
    // The effective config spells out the environment-dependent defaults.
    assert!(out.contains("data_dir = \"./idallocd-data\""), "{out}");
    assert!(out.contains("unix:./idallocd-data/idallocd.sock"), "{out}");
    assert!(out.contains("url = \"file:///"), "{out}");
    assert!(out.contains("lease_size = 1000000"), "{out}");
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[allocation]\nlease_sizee = 3\n", "allocation.lease_sizee"),
        ("socket_mode = \"rw\"\n", "socket_mode"),
        (
            "[object_store]\ntimeout = \"forever\"\n",
            "object_store.timeout",
        ),
        (
            "max_in_flight_per_connection = -1\n",
            "max_in_flight_per_connection",
        ),
    ];
    for (text, key) in cases {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, text).unwrap();
        let (ok, out, err) = run_to_end(&["check-config", file.to_str().unwrap()], dir.path());
        assert!(!ok, "{text} must be rejected");
        assert!(
            out.is_empty(),
            "nothing printed on stdout for a bad file: {out}"
        );
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains(&format!("`{key}`")), "{text}: {err}");
    }
    let (ok, _, err) = run_to_end(&["check-config", "/nonexistent/x.toml"], dir.path());
    assert!(!ok);
    assert!(err.contains("/nonexistent/x.toml"), "{err}");
}

#[test]
fn check_config_masks_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s3.toml");
    std::fs::write(
        &file,
        "[object_store]\nurl = \"s3://bucket/db1\"\n[object_store.options]\naws_access_key_id = \"AKIAEXAMPLE\"\naws_secret_access_key = \"hunter2\"\naws_region = \"eu-west-3\"\n",
    )
    .unwrap();
    let (ok, out, err) = run_to_end(&["check-config", file.to_str().unwrap()], dir.path());
    assert!(ok, "{err}");
    assert!(
        out.contains("aws_secret_access_key = \"<redacted>\""),
        "{out}"
    );
    assert!(!out.contains("hunter2"));
    assert!(!out.contains("AKIAEXAMPLE"), "{out}");
    assert!(
        out.contains("eu-west-3"),
        "the region is not a secret: {out}"
    );
}

#[test]
fn check_config_builds_the_store_as_start_up_does() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, needle) in [
        ("[object_store]\nurl = \"ftp://host/x\"\n", "unsupported scheme"),
        (
            "[object_store]\nurl = \"s3://bucket/db1\"\n[object_store.options]\naws_colour = \"blue\"\n",
            "aws_colour",
        ),
        ("[object_store]\nurl = \"file://relative/path\"\n", "absolute file path"),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, toml).unwrap();
        let (ok, _, err) = run_to_end(&["check-config", file.to_str().unwrap()], dir.path());
        assert!(!ok, "accepted {toml:?}");
        assert!(err.contains(needle), "{toml:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    // Checking creates nothing.
    let root = dir.path().join("not-created");
    let file = dir.path().join("ok.toml");
    std::fs::write(
        &file,
        format!("[object_store]\nurl = \"file://{}\"\n", root.display()),
    )
    .unwrap();
    let (ok, _, err) = run_to_end(&["check-config", file.to_str().unwrap()], dir.path());
    assert!(ok, "{err}");
    assert!(!root.exists());
}

/// check-config runs the validation start-up runs: for each config start-up
/// refuses, check-config refuses it with the same message, and neither creates
/// the data directory.
#[test]
fn check_config_refuses_what_start_up_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (body, needle) in [
        // EnvFilter takes a bare word for a target: the daemon would log nothing.
        ("[log]\nlevel = \"wran\"\n", "`log.level`"),
        (
            "listen = [\"tcp:0.0.0.0:7411\"]\n",
            "0.0.0.0:7411 is not a loopback address",
        ),
        (
            "listen = [\"tcp:no-such-host.invalid:7411\"]\n",
            "cannot resolve tcp:no-such-host.invalid:7411",
        ),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(
            &file,
            format!("data_dir = {:?}\n{body}", data.display().to_string()),
        )
        .unwrap();
        let file = file.to_str().unwrap();
        let (ok, out, checked) = run_to_end(&["check-config", file], dir.path());
        assert!(!ok, "check-config accepted {body:?}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(checked.trim_end().lines().count(), 1, "{checked}");
        assert!(checked.contains(needle), "{body:?}: {checked}");
        let (ok, _, started) = run_to_end(&["--config", file], dir.path());
        assert!(!ok, "start-up accepted {body:?}");
        let line = started
            .lines()
            .find_map(|l| l.strip_prefix("idallocd: error: "))
            .unwrap_or_else(|| panic!("no error line in:\n{started}"));
        assert!(
            checked.contains(line),
            "check-config and start-up disagree on {body:?}:\n{checked}\n{started}"
        );
        assert!(
            !data.exists(),
            "{body:?}: refused before anything is created"
        );
    }
}

#[test]
fn man_pages_and_completions_are_generated() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run_to_end(&["man", dir.path().to_str().unwrap()], dir.path());
    assert!(ok, "{err}");
    let page = std::fs::read_to_string(dir.path().join("idallocd.8")).unwrap();
    assert!(
        page.contains(".TH idallocd 8") && page.contains("check\\-config"),
        "{page}"
    );
    // Every page idallocd.8 refers to is written beside it.
    let refs: Vec<&str> = page
        .lines()
        .filter_map(|l| l.strip_suffix("(8)"))
        .filter(|l| l.starts_with("idallocd\\-"))
        .collect();
    assert!(refs.len() >= 4, "{page}");
    for r in refs {
        let file = format!("{}.8", r.replace("\\-", "-"));
        let sub = std::fs::read_to_string(dir.path().join(&file))
            .unwrap_or_else(|e| panic!("idallocd.8 refers to {file}, not written: {e}"));
        let title = format!(".TH {} 8", file.trim_end_matches(".8"));
        assert!(sub.contains(&title), "{file}: {sub}");
    }
    // Its SEE ALSO names the config file's page, written beside it too, which
    // carries the shipped example whole (each key with its default).
    assert!(
        page.contains(".SH \"SEE ALSO\"\nidallocd.toml(5), idallocctl(1)"),
        "{page}"
    );
    let conf = std::fs::read_to_string(dir.path().join("idallocd.toml.5"))
        .expect("idallocd.8 refers to idallocd.toml(5), not written");
    assert!(conf.contains(".TH idallocd.toml 5"), "{conf}");
    let example = include_str!("../config/idallocd.toml");
    for key in [
        "# lease_size = 1000000",
        "# [access]",
        "# writer_groups = []",
    ] {
        assert!(example.contains(key) && conf.contains(key), "{key}");
    }
    let (ok, out, err) = run_to_end(&["completions", "bash"], dir.path());
    assert!(ok, "{err}");
    assert!(
        out.contains("idallocd") && out.contains("check-config"),
        "{out}"
    );
    let ctl = crate::daemon_support::ctl_bin();
    let st = std::process::Command::new(ctl)
        .args(["man", dir.path().to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    for page in [
        "idallocctl.1",
        "idallocctl-alloc.1",
        "idallocctl-repair.1",
        "idallocctl-fork-bootstrap.1",
    ] {
        assert!(dir.path().join(page).exists(), "{page}");
    }
    let out = std::process::Command::new(ctl)
        .args(["completions", "zsh"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("#compdef idallocctl"));
}

#[test]
fn non_loopback_tcp_without_allow_remote_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run_to_end(
        &[
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--listen",
            "tcp:0.0.0.0:0",
        ],
        dir.path(),
    );
    assert!(!ok);
    let line = err
        .lines()
        .find(|l| l.starts_with("idallocd: error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{err}"));
    assert!(line.contains("0.0.0.0"), "{line}");
    assert!(line.contains("allow_remote = true"), "{line}");
    // Refused before recovery: nothing was created in the data directory.
    assert!(!dir.path().join("data").join("db").exists());
}

#[test]
fn bad_listen_flag_is_rejected_by_the_parser() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = run_to_end(&["--listen", "http://x"], dir.path());
    assert!(!ok);
    assert!(
        err.contains("expected unix:PATH, tcp:HOST:PORT or tls:HOST:PORT"),
        "{err}"
    );
}

#[test]
fn help_teaches_with_examples() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, _) = run_to_end(&["--help"], dir.path());
    assert!(ok);
    for needle in [
        "--config",
        "--data-dir",
        "--listen",
        "--object-store",
        "check-config",
        "Examples:",
        "SIGTERM",
    ] {
        assert!(out.contains(needle), "--help lacks {needle}:\n{out}");
    }
}

/// `systemd-analyze verify` on the shipped units. The units name /usr/bin/idallocd,
/// which verify requires to exist; copies with ExecStart pointing at the built binary
/// are verified instead. Warnings about our units count as failures: verify exits 0
/// on unknown keys.
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let analyze = which("systemd-analyze").expect(
        "systemd-analyze is required by this test: apt-get install systemd (bash .ci/run does)",
    );
    let dir = tempfile::tempdir().unwrap();
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");
    let mut units = vec![];
    for name in [
        "idallocd.service",
        "idallocd.socket",
        "idallocd@.service",
        "idallocd@.socket",
    ] {
        let text = std::fs::read_to_string(format!("{src}/{name}")).unwrap();
        assert!(text.contains("ExecStart=/usr/bin/idallocd") || name.ends_with(".socket"));
        let text = text.replace("/usr/bin/idallocd", BIN);
        // A template is verified through an instance.
        let target = name.replace("@.", "@db1.");
        std::fs::write(dir.path().join(&target), &text).unwrap();
        if name.contains('@') {
            std::fs::write(dir.path().join(name), &text).unwrap();
        }
        units.push(dir.path().join(target));
    }
    // Documentation=man:idallocd(8) is checked against the page `idallocd man`
    // generates (what the README's install section installs).
    let man8 = dir.path().join("man/man8");
    std::fs::create_dir_all(&man8).unwrap();
    let (ok, _, err) = run_to_end(&["man", man8.to_str().unwrap()], dir.path());
    assert!(ok, "{err}");
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg("--man=yes")
        .args(&units)
        .env("MANPATH", dir.path().join("man"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("idallocd")).collect();
    assert!(
        ours.is_empty(),
        "warnings about the units:\n{}",
        ours.join("\n")
    );
    // Stopping or restarting the service must leave the socket listening (writers
    // wait in its backlog), and writers in SocketGroup= must reach the socket.
    for unit in ["idallocd.socket", "idallocd@.socket"] {
        let text = std::fs::read_to_string(format!("{src}/{unit}")).unwrap();
        assert!(
            !text.lines().any(|l| l.starts_with("PartOf=")),
            "{unit}: PartOf= stops the socket with the service"
        );
        assert!(text.contains("DirectoryMode=0755"), "{unit}");
    }
    for unit in ["idallocd.service", "idallocd@.service"] {
        let text = std::fs::read_to_string(format!("{src}/{unit}")).unwrap();
        assert!(text.contains("RuntimeDirectoryMode=0755"), "{unit}");
        assert!(text.contains("ExecReload="), "{unit}");
        for needle in [
            "Type=notify",
            "WatchdogSec=",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
            "SystemCallFilter=@system-service",
            "Restart=on-failure",
            "StateDirectory=",
            "RuntimeDirectory=",
        ] {
            assert!(text.contains(needle), "{unit} lacks {needle}");
        }
    }
}

fn which(name: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}
