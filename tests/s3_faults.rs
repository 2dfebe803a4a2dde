//! A store that hangs, then one that is down, under load: a TCP proxy between the
//! daemon and moto stalls or refuses connections on command. Reservations go on
//! inside the current lease, then fail with `Unavailable`, then recover by
//! themselves; `status` (RPC and `idallocctl status --json`) shows the mirror
//! unhealthy with the error while it lasts; no id is given twice — also against a
//! second daemon that reaches the bucket directly and keeps taking leases.
//!
//! `IDALLOC_STALL_SECS` sets how long the store hangs (default 4).

use crate::daemon_support;
use crate::s3_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use daemon_support::{ctx, unix_client, Daemon, Opts};
use idalloc_client::{Kind, ServiceError};
use rand::Rng;
use s3_support::{FaultProxy, Ledger, Moto, ProxyMode};

fn ctl_path() -> &'static std::path::Path {
    crate::daemon_support::ctl_bin()
}

/// What the clients saw, with times.
#[derive(Default)]
struct Seen {
    ok: Vec<Instant>,
    unavailable: Vec<(Instant, String)>,
}

fn ctl_status(socket: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(ctl_path())
        .arg("--endpoint")
        .arg(format!("unix:{}", socket.display()))
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Hold `mode` for `hold`, polling status; then pass again and wait for recovery.
/// Returns (successes inside the fault before the first Unavailable, Unavailable
/// count, the unhealthy error status showed, time to recover).
async fn fault_phase(
    proxy: &FaultProxy,
    mode: ProxyMode,
    hold: Duration,
    d: &Daemon,
    seen: &Arc<Mutex<Seen>>,
) -> (usize, usize, String, Duration) {
    let status_client = unix_client(&d.socket).await.unwrap();
    let before = status_client.status(ctx()).await.unwrap().unwrap();
    assert!(
        before.mirror.healthy,
        "healthy before the fault: {before:?}"
    );
    let primary_headroom: u64 = before.namespaces[0]
        .counters
        .iter()
        .map(|c| c.headroom)
        .sum();
    assert!(primary_headroom > 0, "{before:?}");

    let start = Instant::now();
    proxy.set(mode);
    let mut unhealthy_error = None;
    let mut ctl_checked = false;
    while start.elapsed() < hold {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let st = status_client.status(ctx()).await.unwrap().unwrap();
        if !st.mirror.healthy {
            let e = st
                .mirror
                .last_error
                .clone()
                .expect("an unhealthy mirror names its error");
            unhealthy_error.get_or_insert(e);
            if !ctl_checked {
                // The operator's view of the same fault.
                let socket = d.socket.clone();
                let j = tokio::task::spawn_blocking(move || ctl_status(&socket))
                    .await
                    .unwrap();
                assert_eq!(j["mirror"]["healthy"], false, "{j}");
                assert!(
                    j["mirror"]["last_error"]
                        .as_str()
                        .is_some_and(|e| !e.is_empty()),
                    "{j}"
                );
                ctl_checked = true;
            }
        }
    }
    let cleared = Instant::now();
    proxy.set(ProxyMode::Pass);
    // Recovery by itself: a reservation succeeds, and status turns healthy.
    loop {
        let recovered = seen.lock().unwrap().ok.iter().any(|t| *t > cleared);
        let st = status_client.status(ctx()).await.unwrap().unwrap();
        if recovered && st.mirror.healthy {
            break;
        }
        assert!(
            cleared.elapsed() < Duration::from_secs(30),
            "no recovery 30 s after the store came back: {st:?}\n{}",
            d.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovery = cleared.elapsed();
    let s = seen.lock().unwrap();
    let in_fault = |t: &Instant| *t >= start && *t < cleared;
    let first_unavailable = s
        .unavailable
        .iter()
        .map(|(t, _)| *t)
        .filter(in_fault)
        .min()
        .expect("reservations failed with Unavailable during the fault");
    let served_from_lease =
        s.ok.iter()
            .filter(|t| in_fault(t) && **t < first_unavailable)
            .count();
    let unavailable = s.unavailable.iter().filter(|(t, _)| in_fault(t)).count();
    (
        served_from_lease,
        unavailable,
        unhealthy_error.expect("status showed the mirror unhealthy during the fault"),
        recovery,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_stalls_and_outages_under_load() {
    let stall: u64 = std::env::var("IDALLOC_STALL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let moto = Moto::start();
    let proxy = FaultProxy::start(moto.port);
    let dir = tempfile::tempdir().unwrap();
    let settings =
        "timeout = \"500ms\"\nretries = 1\nbackoff = \"50ms\"\nunavailable_cooldown = \"300ms\"\n";
    // Leases of one size: grown ones (lease_min_life) would let these writers ride
    // out the whole outage inside one lease, and the Unavailable phase is what
    // this test attacks.
    let allocation = "max_count = 1000\nlease_size = 10000\nlease_min_life = \"0s\"\n";
    let d = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: &moto.daemon_toml("faults", &proxy.endpoint(), settings),
            allocation_toml: Some(allocation),
            ..Opts::default()
        },
    );
    // A second daemon on the same prefix, straight to moto: it keeps moving the
    // ceiling while the first one is cut off.
    let dir2 = tempfile::tempdir().unwrap();
    let d2 = Daemon::start_with(
        dir2.path(),
        Opts {
            extra_toml: &moto.daemon_toml("faults", &moto.endpoint(), settings),
            allocation_toml: Some(allocation),
            ..Opts::default()
        },
    );

    let ledger = Ledger::new();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = vec![];
    for t in 0..5usize {
        let (daemon, socket) = if t < 4 {
            (0, d.socket.clone())
        } else {
            (1, d2.socket.clone())
        };
        let (ledger, seen, stop) = (ledger.clone(), seen.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let c = unix_client(&socket).await.unwrap();
            while !stop.load(Ordering::SeqCst) {
                let (kind, count) = {
                    let mut rng = rand::thread_rng();
                    let kind = if rng.gen_bool(0.5) {
                        Kind::Vid
                    } else {
                        Kind::Eid
                    };
                    (kind, rng.gen_range(1..=200u64))
                };
                let sent = ledger.tick();
                match c.reserve(ctx(), None, kind, count).await.unwrap() {
                    Ok(r) => {
                        ledger.record(daemon, None, kind, sent, r);
                        if daemon == 0 {
                            seen.lock().unwrap().ok.push(Instant::now());
                        }
                    }
                    Err(e @ ServiceError::Unavailable { .. }) if daemon == 0 => {
                        seen.lock()
                            .unwrap()
                            .unavailable
                            .push((Instant::now(), e.to_string()));
                        // Back off a little, as a client honouring the hint would.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("daemon {daemon}: unexpected error {e}"),
                }
                // Pace the load: a lease (10000 ids) lasts a second or so.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (lease_ok, unavail, err, rec) = fault_phase(
        &proxy,
        ProxyMode::Stall,
        Duration::from_secs(stall),
        &d,
        &seen,
    )
    .await;
    eprintln!("stall {stall}s: {lease_ok} served from the lease, {unavail} unavailable, recovered in {rec:?}; status said: {err}");
    assert!(
        lease_ok > 0,
        "reservations continue inside the current lease"
    );
    assert!(unavail > 0);

    let (lease_ok, unavail, err, rec) =
        fault_phase(&proxy, ProxyMode::Refuse, Duration::from_secs(3), &d, &seen).await;
    eprintln!("outage 3s: {lease_ok} served from the lease, {unavail} unavailable, recovered in {rec:?}; status said: {err}");
    assert!(
        lease_ok > 0,
        "reservations continue inside the current lease"
    );
    assert!(unavail > 0);

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let v = ledger.check();
    eprintln!("faults: {v:?}");
    assert!(v.ranges > 100, "{v:?}");
    drop((d, d2, proxy, moto));
}
