//! End-to-end tests of the real `idallocd` binary: every RPC over the unix socket and
//! TCP, bad frames, typed errors, socket takeover rules, readiness, graceful shutdown
//! under load, and the metrics endpoint.

use crate::daemon_support;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use daemon_support::*;
use idalloc_client::error::ServiceError;
use idalloc_client::protocol::{BootstrapRequest, IdAllocClient};
use idalloc_client::{IdRange, Kind};

const FORK: &str = "0190b6f2-7c1e-7a4b-9c3d-5e6f70819203";
const FORK_ULID: &str = "01J2VF4Z0Y8Q3R5S7T9V1W3X5Z";

async fn exercise_every_rpc(c: &IdAllocClient) {
    let a = c
        .reserve(ctx(), None, Kind::Vid, 10)
        .await
        .unwrap()
        .unwrap();
    let b = c.reserve(ctx(), None, Kind::Vid, 5).await.unwrap().unwrap();
    assert_eq!(a.len(), 10);
    assert!(b.start >= a.end, "{a:?} then {b:?}");
    let e = c.reserve(ctx(), None, Kind::Eid, 3).await.unwrap().unwrap();
    let hwm = c.hwm(ctx(), None).await.unwrap().unwrap();
    assert!(hwm.next_vid >= b.end && hwm.next_eid >= e.end, "{hwm:?}");

    let info = c
        .bootstrap_fork(
            ctx(),
            BootstrapRequest {
                fork: FORK.into(),
                parent: None,
                vid_floor: 0,
                eid_floor: 500,
                request_id: None,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert!(
        info.next_vid >= b.end,
        "fork floor above the primary's hwm: {info:?}"
    );
    assert!(info.next_eid >= 500);
    let f = c
        .reserve(ctx(), Some(FORK.into()), Kind::Vid, 7)
        .await
        .unwrap()
        .unwrap();
    assert!(f.start >= info.next_vid);
    let page = c.list_forks(ctx(), None, 10).await.unwrap().unwrap();
    assert!(page.forks.iter().any(|x| x.fork == FORK), "{page:?}");
    let cp = c
        .checkpoint(ctx(), Some(FORK.into()))
        .await
        .unwrap()
        .unwrap();
    assert!(cp.next_vid >= f.end);
    let st = c.status(ctx()).await.unwrap().unwrap();
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert!(
        st.object_store.starts_with("file://"),
        "{}",
        st.object_store
    );
    let dropped = c.drop_fork(ctx(), FORK.into()).await.unwrap().unwrap();
    assert!(dropped.dropped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_over_unix_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    exercise_every_rpc(&unix_client(&d.socket).await.unwrap()).await;

    let dir2 = tempfile::tempdir().unwrap();
    // Admin over TCP (writer is the default): the round trip checkpoints and drops.
    let d2 = Daemon::start_with(
        dir2.path(),
        Opts {
            extra_toml: "[access]\ntcp_role = \"admin\"\n",
            ..Opts::default()
        },
    );
    exercise_every_rpc(&tcp_client(&d2.tcp).await.unwrap()).await;
    // Both transports reach the same counters.
    let u = unix_client(&d2.socket).await.unwrap();
    let t = tcp_client(&d2.tcp).await.unwrap();
    let mut ranges = vec![];
    for _ in 0..20 {
        ranges.push(u.reserve(ctx(), None, Kind::Vid, 3).await.unwrap().unwrap());
        ranges.push(t.reserve(ctx(), None, Kind::Vid, 3).await.unwrap().unwrap());
    }
    crate::common::assert_disjoint(&ranges, "ranges");
    drop((d, d2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_request_gets_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let c = unix_client(&d.socket).await.unwrap();
    let err = |r: Result<Result<IdRange, ServiceError>, _>| r.unwrap().unwrap_err();

    let e = err(c.reserve(ctx(), None, Kind::Vid, 0).await);
    assert!(
        matches!(e, ServiceError::InvalidArgument(ref m) if m.contains("count")),
        "{e}"
    );
    let e = err(c.reserve(ctx(), None, Kind::Vid, 1001).await);
    assert!(
        matches!(e, ServiceError::InvalidArgument(ref m) if m.contains("1000")),
        "{e}"
    );
    let e = err(c
        .reserve(ctx(), Some("not-a-fork".into()), Kind::Vid, 1)
        .await);
    assert!(
        matches!(e, ServiceError::InvalidArgument(ref m) if m.contains("not-a-fork")),
        "{e}"
    );
    let e = err(c.reserve(ctx(), Some(FORK_ULID.into()), Kind::Vid, 1).await);
    assert!(matches!(e, ServiceError::UnknownFork(_)), "{e}");
    let req = BootstrapRequest {
        fork: FORK_ULID.into(),
        parent: None,
        vid_floor: 0,
        eid_floor: 0,
        request_id: None,
    };
    c.bootstrap_fork(ctx(), req).await.unwrap().unwrap();
    c.drop_fork(ctx(), FORK_ULID.into()).await.unwrap().unwrap();
    let e = err(c.reserve(ctx(), Some(FORK_ULID.into()), Kind::Vid, 1).await);
    assert!(matches!(e, ServiceError::DroppedFork(_)), "{e}");
    let e = c.drop_fork(ctx(), "zzz".into()).await.unwrap().unwrap_err();
    assert!(matches!(e, ServiceError::InvalidArgument(_)), "{e}");
    let e = c
        .list_forks(ctx(), Some("zzz".into()), 5)
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(e, ServiceError::InvalidArgument(ref m) if m.contains("after")),
        "{e}"
    );
    // Still serving after all that.
    c.reserve(ctx(), None, Kind::Vid, 1).await.unwrap().unwrap();
}

/// Send `bytes` on a fresh raw connection and expect the daemon to close it.
fn expect_closed(mut s: impl Read + Write, bytes: &[u8]) {
    s.write_all(bytes).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("the daemon answered a bad frame with {n} bytes"),
        // A reset is a close too.
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let unix = unix_client(&d.socket).await.unwrap();
    let tcp = tcp_client(&d.tcp).await.unwrap();
    unix.reserve(ctx(), None, Kind::Vid, 1)
        .await
        .unwrap()
        .unwrap();

    let mut garbage = 64u32.to_be_bytes().to_vec();
    garbage.extend((0..64u8).map(|i| i.wrapping_mul(37) ^ 0xa5));
    let oversized = (10u32 << 20).to_be_bytes();
    let (socket, tcp_addr) = (d.socket.clone(), d.tcp.clone());
    tokio::task::spawn_blocking(move || {
        let timeout = Some(Duration::from_secs(10));
        for bytes in [&garbage[..], &oversized[..]] {
            let u = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            u.set_read_timeout(timeout).unwrap();
            expect_closed(u, bytes);
            let t = std::net::TcpStream::connect(&tcp_addr).unwrap();
            t.set_read_timeout(timeout).unwrap();
            expect_closed(t, bytes);
        }
    })
    .await
    .unwrap();

    // The well-behaved clients on both transports are still served.
    let a = unix
        .reserve(ctx(), None, Kind::Vid, 2)
        .await
        .unwrap()
        .unwrap();
    let b = tcp
        .reserve(ctx(), None, Kind::Vid, 2)
        .await
        .unwrap()
        .unwrap();
    assert!(a.end <= b.start);
    assert!(d.stderr().contains("idallocd") || d.stderr().contains("idalloc"));
}

#[test]
fn stale_socket_is_replaced_and_live_socket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // A crash leaves the socket file behind with nobody accepting on it.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("d.sock")).unwrap());
    let mut first = Daemon::start(dir.path());

    let dir2 = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["--data-dir", dir2.path().join("data").to_str().unwrap()])
        .arg("--listen")
        .arg(format!("unix:{}", first.socket.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with("idallocd: error:"))
        .unwrap();
    assert!(line.contains("another idallocd is serving on"), "{line}");
    // The refused daemon did not remove the live socket.
    first.wait_serving();
    first.stop();
    assert!(
        !first.socket.exists(),
        "a clean stop removes the socket file"
    );
}

#[test]
fn ready_is_sent_only_once_the_socket_answers() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut d = Daemon::start_with(
        dir.path(),
        Opts {
            env: vec![
                ("NOTIFY_SOCKET", notify_path.display().to_string()),
                // 200 ms: pings every 100 ms.
                ("WATCHDOG_USEC", "200000".to_string()),
            ],
            wait: false,
            ..Opts::default()
        },
    );
    let mut messages = vec![];
    let mut buf = [0u8; 4096];
    loop {
        let n = notify.recv(&mut buf).expect("no READY=1 within 30 s");
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let ready = msg.lines().any(|l| l == "READY=1");
        messages.push(msg);
        if ready {
            break;
        }
    }
    // At the moment READY=1 arrives the socket must already answer.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = unix_client(&d.socket)
            .await
            .expect("connect right after READY=1");
        c.status(ctx()).await.unwrap().unwrap();
    });
    assert!(
        messages.last().unwrap().contains("STATUS=serving on"),
        "{messages:?}"
    );
    // Watchdog pings follow while it serves.
    let n = notify.recv(&mut buf).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "WATCHDOG=1");
    d.signal(libc::SIGTERM);
    loop {
        let n = notify.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    assert!(d.wait_exit(30).success());
}

#[test]
fn sigterm_under_load_exits_zero_and_loses_nothing() {
    sigterm_under_load("");
}

/// The same with a work-stealing runtime: the default (`worker_threads = 1`) is
/// tokio's single-threaded runtime, and more than one thread takes the other
/// runtime, whose requests, commit groups and replies cross threads.
#[test]
fn sigterm_under_load_with_two_worker_threads_exits_zero_and_loses_nothing() {
    sigterm_under_load("worker_threads = 2\n");
}

fn sigterm_under_load(extra_toml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml,
            ..Opts::default()
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let socket = d.socket.clone();
    let tcp = d.tcp.clone();
    let workers: Vec<_> = (0..6)
        .map(|i| {
            let (socket, tcp) = (socket.clone(), tcp.clone());
            rt.spawn(async move {
                let c = if i % 2 == 0 {
                    unix_client(&socket).await.unwrap()
                } else {
                    tcp_client(&tcp).await.unwrap()
                };
                let mut got = vec![];
                // Until the daemon goes away: ShuttingDown, or the connection closes.
                while let Ok(Ok(r)) = c.reserve(ctx(), None, Kind::Vid, 1 + i as u64).await {
                    got.push(r);
                }
                got
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    d.signal(libc::SIGTERM);
    let status = d.wait_exit(30);
    assert!(status.success(), "exit {status}:\n{}", d.stderr());
    let ranges: Vec<IdRange> = rt.block_on(async {
        let mut all = vec![];
        for w in workers {
            all.extend(w.await.unwrap());
        }
        all
    });
    assert!(
        ranges.len() > 50,
        "load was applied: {} ranges",
        ranges.len()
    );
    crate::common::assert_disjoint(&ranges, "ranges");
    let max_end = ranges.iter().map(|r| r.end).max().unwrap();
    // Clean shutdown lowers the manifest to what was granted: every granted id was
    // delivered, none beyond.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("data/mirror/id_allocator.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["next_vid_batch"], max_end, "{manifest}");

    // The next life carries on exactly after the last id delivered.
    let d2 = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml,
            ..Opts::default()
        },
    );
    let next = rt.block_on(async {
        let c = unix_client(&d2.socket).await.unwrap();
        c.reserve(ctx(), None, Kind::Vid, 1).await.unwrap().unwrap()
    });
    assert_eq!(next.start, max_end);
}

#[test]
fn metrics_endpoint_counts_the_work_done() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: &format!("[metrics]\nlisten = {metrics_addr:?}\n"),
            ..Opts::default()
        },
    );
    // wait_serving made one connection per attempt; count from a baseline.
    let before = series(&scrape(&metrics_addr), "idalloc_connections_total", &[]).unwrap_or(0.0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for _ in 0..3 {
            let c = unix_client(&d.socket).await.unwrap();
            for _ in 0..7 {
                c.reserve(ctx(), None, Kind::Eid, 13)
                    .await
                    .unwrap()
                    .unwrap();
            }
        }
        // Let the server notice the closed connections.
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    let body = scrape(&metrics_addr);
    assert_eq!(
        series(&body, "idalloc_connections_total", &[]),
        Some(before + 3.0),
        "{body}"
    );
    assert_eq!(
        series(&body, "idalloc_connections_open", &[]),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        series(&body, "idalloc_reservations_total", &["kind=\"eid\""]),
        Some(21.0),
        "{body}"
    );
    assert_eq!(
        series(&body, "idalloc_ids_granted_total", &["kind=\"eid\""]),
        Some(21.0 * 13.0),
        "{body}"
    );
    assert!(body.contains("idalloc_flushes_total"), "{body}");
    assert!(body.contains("idalloc_flush_seconds"), "{body}");
    assert!(body.contains("idalloc_leases_total"), "{body}");
    // Gauges are refreshed every second.
    std::thread::sleep(Duration::from_millis(1200));
    let body = scrape(&metrics_addr);
    let headroom = series(
        &body,
        "idalloc_lease_headroom",
        &["namespace=\"primary\"", "kind=\"eid\""],
    )
    .unwrap_or(-1.0);
    assert!(headroom > 0.0, "{body}");
    assert_eq!(
        series(&body, "idalloc_namespaces", &[]),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        series(&body, "idalloc_store_healthy", &[]),
        Some(1.0),
        "{body}"
    );
}

/// An HTTP request to the metrics endpoint: (status line, headers, body).
fn http_get(addr: &str, path: &str) -> (String, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (
        status.to_string(),
        headers.to_ascii_lowercase(),
        body.to_string(),
    )
}

/// Prometheus's own linter on a scrape taken under load; `/metrics` only, with
/// the text format's content type.
#[test]
fn metrics_pass_promtool_under_load() {
    let promtool = std::env::var("IDALLOC_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let have = Command::new(&promtool).arg("--version").output();
    assert!(
        have.as_ref().is_ok_and(|o| o.status.success()),
        "{promtool} not found: this test needs Prometheus's promtool (Debian package `prometheus`; .ci/run installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: &format!("[metrics]\nlisten = {metrics_addr:?}\n"),
            ..Opts::default()
        },
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A lone writer...
        let c = unix_client(&d.socket).await.unwrap();
        for _ in 0..300 {
            c.reserve(ctx(), None, Kind::Vid, 1).await.unwrap().unwrap();
        }
        // ...then several at once, a fork, an error.
        let mut tasks = vec![];
        for _ in 0..4 {
            let c = unix_client(&d.socket).await.unwrap();
            tasks.push(tokio::spawn(async move {
                for _ in 0..100 {
                    c.reserve(ctx(), None, Kind::Eid, 3).await.unwrap().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let _ = c.reserve(ctx(), None, Kind::Vid, 0).await.unwrap();
        let _ = c.hwm(ctx(), None).await.unwrap();
    });
    std::thread::sleep(Duration::from_millis(1200));
    let (status, headers, body) = http_get(&metrics_addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    for needle in [
        "idalloc_build_info{version=",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "idalloc_requests_total{method=\"reserve\",outcome=\"ok\"}",
        "idalloc_requests_total{method=\"reserve\",outcome=\"invalid_argument\"}",
        "idalloc_request_seconds_bucket{method=\"reserve\",le=",
        "idalloc_flush_seconds_bucket",
        "idalloc_store_errors_total{op=\"get\"} 0",
        "idalloc_conditional_writes_lost_total",
        "idalloc_writer_mode{mode=\"single-writer\"} 1",
        "idalloc_start_time_seconds",
        "idalloc_lease_headroom{namespace=\"primary\"",
    ] {
        assert!(body.contains(needle), "no {needle} in the scrape:\n{body}");
    }
    assert!(
        !body.contains("quantile="),
        "summaries cannot be aggregated: {body}"
    );
    let file = dir.path().join("scrape.prom");
    std::fs::write(&file, &body).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{promtool} check metrics < {}", file.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _, _) = http_get(&metrics_addr, "/");
    assert!(status.contains("404"), "{status}");
    let (status, _, _) = http_get(&metrics_addr, "/metrics/../x");
    assert!(status.contains("404"), "{status}");
}

/// Socket activation: `systemd-socket-activate` binds the socket and passes it as
/// fd 3 with `LISTEN_FDS`; the daemon serves on it and leaves the file (systemd's)
/// in place when it stops.
#[test]
fn serves_on_a_socket_passed_by_systemd() {
    let Some(activate) = [
        "/usr/bin/systemd-socket-activate",
        "/bin/systemd-socket-activate",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists()) else {
        panic!("systemd-socket-activate is required by this test: apt-get install systemd (bash .ci/run does)");
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let mut child = std::process::Command::new(activate)
        .arg("-l")
        .arg(&socket)
        .arg(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        // Ignored under activation; proves the passed socket wins.
        .arg("--listen")
        .arg(format!(
            "unix:{}",
            dir.path().join("configured.sock").display()
        ))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    // systemd-socket-activate starts the daemon on the first connection.
    let range = loop {
        let r = rt.block_on(async {
            let c = unix_client(&socket).await.ok()?;
            c.reserve(ctx(), None, Kind::Vid, 4).await.ok()?.ok()
        });
        if let Some(r) = r {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no reply on the activated socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(range.len(), 4);
    assert!(!dir.path().join("configured.sock").exists());
    // SAFETY: kill(2) on our child (systemd-socket-activate execs the daemon in place).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(
        socket.exists(),
        "the activated socket belongs to systemd and is left in place"
    );
}

/// `max_connections`: a connection beyond the limit is accepted by the kernel but not
/// served until another one closes; then it is served normally.
#[test]
fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: "max_connections = 2\n",
            ..Opts::default()
        },
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = unix_client(&d.socket).await.unwrap();
        let b = unix_client(&d.socket).await.unwrap();
        a.reserve(ctx(), None, Kind::Vid, 1).await.unwrap().unwrap();
        b.reserve(ctx(), None, Kind::Vid, 1).await.unwrap().unwrap();
        let c = unix_client(&d.socket).await.unwrap();
        let mut short = ctx();
        short.deadline = std::time::Instant::now() + Duration::from_millis(500);
        assert!(
            c.reserve(short, None, Kind::Vid, 1).await.is_err(),
            "a third connection was served with max_connections = 2"
        );
        drop(a);
        let mut long = ctx();
        long.deadline = std::time::Instant::now() + Duration::from_secs(10);
        let r = c.reserve(long, None, Kind::Vid, 1).await;
        let r = r.unwrap_or_else(|e| panic!("{e}: {}", d.stderr())).unwrap();
        assert!(r.start >= 2);
    });
}

/// SIGHUP (`systemctl reload`) re-reads the config: the log filter changes at
/// once, other changes are named as needing a restart, and the daemon never dies
/// of it (it used to exit 129 and leave a stale socket).
#[test]
fn sighup_reloads_the_log_filter_and_never_stops_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: "[log]\nlevel = \"info\"\n",
            // An empty RUST_LOG leaves the level to the config file.
            env: vec![("RUST_LOG", String::new())],
            ..Opts::default()
        },
    );
    let config = dir.path().join("idallocd.toml");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let reserve = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let c = unix_client(&d.socket).await.unwrap();
            c.reserve(ctx(), None, Kind::Vid, 1).await.unwrap().unwrap()
        })
    };
    let wait_for = |d: &Daemon, needle: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !d.stderr().contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?} in:\n{}",
                d.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    d.signal(libc::SIGHUP);
    wait_for(&d, "SIGHUP: configuration reloaded");
    let first = reserve(&rt);
    assert!(!d.stderr().contains("DEBUG"), "{}", d.stderr());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("level = \"info\"", "level = \"info,idalloc=debug\""),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    wait_for(&d, "SIGHUP: log filter reloaded");
    // Debug lines of the engine now appear: the next lease is logged at debug.
    let second = reserve(&rt);
    assert!(second.start >= first.end);
    rt.block_on(async {
        let c = unix_client(&d.socket).await.unwrap();
        for _ in 0..11 {
            c.reserve(ctx(), None, Kind::Vid, 1000)
                .await
                .unwrap()
                .unwrap();
        }
    });
    wait_for(&d, "DEBUG");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("lease_size = 10000", "lease_size = 20000"),
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    wait_for(&d, "need a restart");
    reserve(&rt);
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(20).success(), "{}", d.stderr());
}

/// Roles on the unix socket, from the peer's credentials: a writer allocates but
/// may not give ids back, drop a fork or repair; an unlisted user is refused at
/// connect; root is an admin. (The tests run as root, so they can drop to other
/// uids for a client.)
#[test]
fn unix_peers_get_the_role_their_uid_maps_to() {
    // The socket and the idallocctl these uids run must both be within their reach.
    let dir = tempdir_for_uids(&[1001, 1002]);
    let ctl_bin = copy_for_uids(crate::daemon_support::ctl_bin(), dir.path(), &[1001, 1002]);
    let mut d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: "socket_mode = \"0666\"\n[access]\nwriter_uids = [\"1001\"]\n",
            ..Opts::default()
        },
    );
    let endpoint = format!("unix:{}", d.socket.display());
    let ctl = |uid: Option<u32>, args: &[&str]| ctl_as(&ctl_bin, &endpoint, uid, args);
    let fork = "0190b6f2-7c1e-7a4b-9c3d-5e6f70819203";
    let (ok, _, err) = ctl(Some(1001), &["alloc", "vid", "--count", "5"]);
    assert!(ok, "a writer allocates: {err}");
    let (ok, _, err) = ctl(Some(1001), &["fork", "bootstrap", fork]);
    assert!(ok, "a writer bootstraps: {err}");
    for args in [
        &["fork", "drop", fork][..],
        &["fork", "merge", fork][..],
        &["checkpoint"][..],
        &["repair", "--vid-floor", "1", "--eid-floor", "1"][..],
    ] {
        let (ok, _, err) = ctl(Some(1001), args);
        assert!(!ok, "a writer ran {args:?}");
        assert!(
            err.contains("permission denied")
                && err.contains("needs the admin role")
                && err.contains("uid 1001"),
            "{args:?}: {err}"
        );
    }
    assert!(
        d.stderr().contains("permission denied"),
        "logged with the peer"
    );
    // The fork was not dropped by the refused call.
    let (ok, _, err) = ctl(None, &["alloc", "vid", "--fork", fork]);
    assert!(ok, "{err}");
    // Not in any list: refused at connect.
    let (ok, _, err) = ctl(Some(1002), &["hwm"]);
    assert!(!ok, "an unlisted uid was served");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        d.stderr()
            .contains("connection refused: the peer has no role"),
        "{}",
        d.stderr()
    );
    // Root is an admin.
    let (ok, _, err) = ctl(None, &["fork", "drop", fork]);
    assert!(ok, "{err}");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(20).success());
}

/// What `idallocd.socket` (no `PartOf=`) gives writers: systemd keeps holding the
/// listening socket while the service restarts. Here the test plays systemd: it
/// binds the socket once and starts each life of the daemon on it as fd 3 with
/// `LISTEN_FDS`/`LISTEN_PID` (what systemd-socket-activate does, but for several
/// lives). A writer keeps connecting throughout: no connection is ever refused,
/// requests sent during the restart wait in the backlog and are answered by the
/// next life, and every range is disjoint.
#[test]
fn writers_keep_connecting_while_a_socket_activated_daemon_restarts() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("held.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let fd = listener.as_raw_fd();
    let start = |life: usize| {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" --data-dir \"$1\"")
            .arg(BIN)
            .arg(dir.path().join("data"))
            .env_remove("NOTIFY_SOCKET")
            .stderr(std::fs::File::create(dir.path().join(format!("life-{life}.log"))).unwrap());
        // SAFETY: dup2(2) only, between fork and exec; the new fd 3 is inheritable.
        unsafe {
            cmd.pre_exec(move || {
                if fd != 3 && libc::dup2(fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Inheritable across exec (dup2 onto itself would keep CLOEXEC).
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    };
    let mut first = start(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (socket, stop) = (socket.clone(), stop.clone());
        rt.spawn(async move {
            let mut got = Vec::new();
            let mut refused = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                // A new connection per request: each one must be accepted (by the
                // kernel's backlog if no daemon is running right now).
                match unix_client(&socket).await {
                    Ok(c) => {
                        let mut ctx = ctx();
                        ctx.deadline = std::time::Instant::now() + Duration::from_secs(20);
                        if let Ok(Ok(r)) = c.reserve(ctx, None, Kind::Vid, 3).await {
                            got.push((std::time::Instant::now(), r));
                        }
                    }
                    Err(_) => refused += 1,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (got, refused)
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let st = first.wait().unwrap();
    let log = |life: usize| {
        std::fs::read_to_string(dir.path().join(format!("life-{life}.log"))).unwrap_or_default()
    };
    assert!(st.success(), "life 1 ended {st}:\n{}", log(1));
    let restarted = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let mut second = start(2);
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (got, refused) = rt.block_on(writer).unwrap();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    let st = second.wait().unwrap();
    assert!(st.success(), "life 2 ended {st}:\n{}", log(2));
    assert_eq!(refused, 0, "connections were refused during the restart");
    let after = got.iter().filter(|(t, _)| *t > restarted).count();
    assert!(
        after > 0 && got.len() > after,
        "both lives served: {} then {after}",
        got.len() - after
    );
    let ranges: Vec<IdRange> = got.iter().map(|(_, r)| *r).collect();
    crate::common::assert_disjoint(&ranges, "ranges");
    drop(listener);
}

/// `idallocctl fork merge` on a real daemon counting fork ids per namespace: the
/// primary's next ids are above the fork's, through a restart; `fork list` shows
/// the fork merged; a writer in it gets one line naming where to write.
#[test]
fn fork_merge_through_idallocctl_raises_the_primary_above_the_fork() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path());
    let endpoint = format!("unix:{}", d.socket.display());
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(crate::daemon_support::ctl_bin())
            .arg("--endpoint")
            .arg(&endpoint)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let (ok, out, err) = ctl(args);
        assert!(ok, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap()
    };
    let fork = "01J2VF4Z0Y8Q3R5S7T9V1W3X5Z";
    json(&["alloc", "vid", "--count", "10", "--json"]);
    json(&["fork", "bootstrap", fork, "--json"]);
    let mut fork_end = 0;
    for _ in 0..30 {
        let r = json(&["alloc", "vid", "--count", "1000", "--fork", fork, "--json"]);
        fork_end = r["end"].as_u64().unwrap();
    }
    let before = json(&["alloc", "vid", "--json"]);
    assert!(before["start"].as_u64().unwrap() < fork_end, "{before}");
    let report = json(&["fork", "merge", fork, "--json"]);
    assert_eq!(report["merged_now"], true, "{report}");
    assert_eq!(report["into"], "primary", "{report}");
    assert_eq!(report["fork_ids"], "namespace", "{report}");
    assert!(
        report["fork_vid_end"].as_u64().unwrap() >= fork_end,
        "{report}"
    );
    let after = json(&["alloc", "vid", "--json"]);
    assert!(
        after["start"].as_u64().unwrap() >= fork_end,
        "{after} below {fork_end}"
    );
    let (ok, out, _) = ctl(&["fork", "merge", fork]);
    assert!(ok && out.contains("already merged"), "{out}");
    let (ok, out, _) = ctl(&["fork", "list"]);
    assert!(ok && out.contains("merged into primary"), "{out}");
    let (ok, _, err) = ctl(&["alloc", "eid", "--fork", fork]);
    assert!(!ok && err.trim_end().lines().count() == 1, "{err}");
    assert!(
        err.contains("was merged into primary") && err.contains("write to primary instead"),
        "{err}"
    );
    d.stop();
    let d2 = Daemon::start(dir.path());
    let endpoint2 = format!("unix:{}", d2.socket.display());
    assert_eq!(endpoint, endpoint2);
    let after = json(&["alloc", "vid", "--json"]);
    assert!(
        after["start"].as_u64().unwrap() >= fork_end,
        "after a restart: {after}"
    );
    let (ok, out, _) = ctl(&["status"]);
    assert!(
        ok && out.contains("merged into primary") && out.contains("per namespace"),
        "{out}"
    );
}

/// Rule 3's bound on a caller's floor: in tree mode a writer's
/// bootstrap with a floor near `u64::MAX` would move the whole tree's sequence
/// there for good, so a writer's floor may be at most `max_count` above the
/// parent's high-water mark; further up is the admin's decision.
#[test]
fn a_writers_bootstrap_floor_cannot_exhaust_the_tree() {
    let dir = tempdir_for_uids(&[1001]);
    let ctl_bin = copy_for_uids(crate::daemon_support::ctl_bin(), dir.path(), &[1001]);
    let mut d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: "socket_mode = \"0666\"\n[access]\nwriter_uids = [\"1001\"]\n",
            allocation_toml: Some("fork_ids = \"tree\"\nmax_count = 1000\n"),
            ..Opts::default()
        },
    );
    let endpoint = format!("unix:{}", d.socket.display());
    let ctl = |uid: Option<u32>, args: &[&str]| ctl_as(&ctl_bin, &endpoint, uid, args);
    let (ok, _, err) = ctl(Some(1001), &["alloc", "vid", "--count", "5"]);
    assert!(ok, "{err}");
    let high = "18446744073708551615";
    let (ok, _, err) = ctl(
        Some(1001),
        &[
            "fork",
            "bootstrap",
            "0190b6f2-7c1e-7a4b-9c3d-5e6f70819203",
            "--vid-hwm",
            high,
        ],
    );
    assert!(!ok, "a writer moved the tree to {high}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("permission denied") && err.contains("only the admin role"),
        "{err}"
    );
    // Within max_count of the parent's high-water mark, a writer's floor is fine.
    let (ok, out, err) = ctl(
        Some(1001),
        &[
            "fork",
            "bootstrap",
            "0190b6f2-7c1e-7a4b-9c3d-5e6f70819204",
            "--vid-hwm",
            "900",
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["next_vid"].as_u64().unwrap() >= 900, "{v}");
    // The tree keeps serving far below the top.
    let (ok, out, err) = ctl(Some(1001), &["alloc", "vid", "--count", "5", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["start"].as_u64().unwrap() < 1 << 40, "{v}");
    // The admin may decide otherwise.
    let (ok, _, err) = ctl(
        None,
        &[
            "fork",
            "bootstrap",
            "0190b6f2-7c1e-7a4b-9c3d-5e6f70819205",
            "--vid-hwm",
            "5000000",
        ],
    );
    assert!(ok, "{err}");
    d.signal(libc::SIGTERM);
    assert!(d.wait_exit(20).success());
}

/// Run `bin` (an idallocctl other uids can reach) against `endpoint`, as `uid`
/// when given, else as the test's own user: (success, stdout, stderr).
fn ctl_as(
    bin: &std::path::Path,
    endpoint: &str,
    uid: Option<u32>,
    args: &[&str],
) -> (bool, String, String) {
    let mut cmd = Command::new(bin);
    cmd.args(["--endpoint", endpoint, "--timeout", "3s"])
        .args(args);
    let out = match uid {
        Some(uid) => output_as(uid, &mut cmd),
        None => cmd.output().unwrap(),
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
