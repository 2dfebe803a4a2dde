//! Under systemd, with stderr connected to the journal (`JOURNAL_STREAM` naming
//! stderr's device and inode), idallocd logs to the journal natively through
//! tracing-journald: one datagram per event with `MESSAGE`, `PRIORITY` (from the
//! level) and `SYSLOG_IDENTIFIER=idallocd`, and nothing on stderr. A
//! `JOURNAL_STREAM` inherited from elsewhere (not stderr) is ignored.
//!
//! The test plays journald: it binds `/run/systemd/journal/socket` when no
//! journald runs here (the tests run as root) and reads what arrives. Where a
//! journald does run, it asks `journalctl` instead.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SOCKET: &str = "/run/systemd/journal/socket";

fn start(dir: &Path, journal_stream: Option<String>) -> (Child, std::path::PathBuf) {
    let err_path = dir.join("stderr.log");
    let err = std::fs::File::create(&err_path).unwrap();
    let meta = err.metadata().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_idallocd"));
    cmd.arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env(
            "JOURNAL_STREAM",
            journal_stream.unwrap_or_else(|| format!("{}:{}", meta.dev(), meta.ino())),
        )
        .stdout(Stdio::null())
        .stderr(err);
    (cmd.spawn().unwrap(), err_path)
}

/// The fields of one native journal datagram: `KEY=VALUE\n`, or `KEY\n`, a
/// little-endian u64 length, the value and `\n` (the binary-safe form).
fn fields(mut d: &[u8]) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    while !d.is_empty() {
        let nl = d.iter().position(|&b| b == b'\n').unwrap_or(d.len());
        let head = &d[..nl];
        if let Some(eq) = head.iter().position(|&b| b == b'=') {
            out.insert(
                String::from_utf8_lossy(&head[..eq]).into(),
                String::from_utf8_lossy(&head[eq + 1..]).into(),
            );
            d = &d[(nl + 1).min(d.len())..];
        } else {
            let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
            let value = &d[nl + 9..nl + 9 + len];
            out.insert(
                String::from_utf8_lossy(head).into(),
                String::from_utf8_lossy(value).into(),
            );
            d = &d[(nl + 9 + len + 1).min(d.len())..];
        }
    }
    out
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

#[test]
fn logs_go_to_the_journal_when_stderr_is_the_journal_stream() {
    let dir = tempfile::tempdir().unwrap();
    if Path::new(SOCKET).exists() {
        // A real journald: ask it.
        let (child, err_path) = start(dir.path(), None);
        std::thread::sleep(Duration::from_secs(3));
        stop(child);
        let out = Command::new("journalctl")
            .args([
                "SYSLOG_IDENTIFIER=idallocd",
                "--since",
                "-1min",
                "-o",
                "cat",
            ])
            .output()
            .expect("journalctl runs where journald does");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("serving on"), "{text}");
        let stderr = std::fs::read_to_string(err_path).unwrap();
        assert!(!stderr.contains("serving on"), "{stderr}");
        return;
    }
    std::fs::create_dir_all(Path::new(SOCKET).parent().unwrap()).unwrap();
    let journal = UnixDatagram::bind(SOCKET).unwrap();
    struct Unlink;
    impl Drop for Unlink {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(SOCKET);
        }
    }
    let _unlink = Unlink;
    journal
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (child, err_path) = start(dir.path(), None);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    let serving = loop {
        assert!(Instant::now() < deadline, "no 'serving on' in {seen:#?}");
        let mut buf = vec![0u8; 64 * 1024];
        if let Ok(n) = journal.recv(&mut buf) {
            let entry = fields(&buf[..n]);
            if entry
                .get("MESSAGE")
                .is_some_and(|m| m.contains("serving on"))
            {
                break entry;
            }
            seen.push(entry);
        }
    };
    stop(child);
    // tracing-journald's mapping: info is "notice" (5), warn 4, error 3.
    assert_eq!(
        serving.get("PRIORITY").map(String::as_str),
        Some("5"),
        "{serving:?}"
    );
    assert_eq!(
        serving.get("SYSLOG_IDENTIFIER").map(String::as_str),
        Some("idallocd"),
        "{serving:?}"
    );
    let mut stderr = String::new();
    std::fs::File::open(&err_path)
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        !stderr.contains("serving on"),
        "the journal gets the lines, not stderr: {stderr}"
    );

    // JOURNAL_STREAM naming another stream (inherited from a parent) is ignored:
    // plain lines on stderr, with timestamps.
    let dir = tempfile::tempdir().unwrap();
    let (child, err_path) = start(dir.path(), Some("1:1".into()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&err_path).unwrap();
        if text.contains("serving on") {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    stop(child);
    let line = text.lines().find(|l| l.contains("serving on")).unwrap();
    assert!(line.starts_with("20"), "a timestamped plain line: {line}");
}
