//! What an operator alerts on: the series behind the alert rules mean what the rules
//! assume (headroom NaN when there is nothing to run out of, a broken primary as a
//! series, merged forks not live, CPU in fractions of a second, build labels, the
//! store's last success), the rules pass promtool's unit tests, and
//! docs/metrics.md, a live scrape, the rules and the Grafana dashboard name the
//! same metrics.

use crate::daemon_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use daemon_support::*;
use idalloc_client::Kind;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn promtool() -> String {
    let promtool = std::env::var("IDALLOC_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let have = Command::new(&promtool).arg("--version").output();
    assert!(
        have.as_ref().is_ok_and(|o| o.status.success()),
        "{promtool} not found: this test needs Prometheus's promtool (Debian package `prometheus`; .ci/run installs it)"
    );
    promtool
}

#[test]
fn alert_rules_pass_promtool_and_its_unit_tests() {
    let promtool = promtool();
    let dir = Path::new(ROOT).join("deploy/prometheus");
    for args in [
        ["check", "rules", "idalloc.rules.yml"],
        ["test", "rules", "idalloc.rules.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A daemon with its metrics endpoint; the object store at `dir/store`.
fn start(dir: &Path) -> (Daemon, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_with(
        dir,
        Opts {
            extra_toml: &format!(
                "[metrics]\nlisten = {addr:?}\n[object_store]\nurl = \"file://{}\"\n",
                dir.join("store").display()
            ),
            ..Opts::default()
        },
    );
    (d, addr)
}

/// A scrape after the gauges' next refresh (once a second).
fn scrape_fresh(addr: &str) -> String {
    std::thread::sleep(Duration::from_millis(1300));
    scrape(addr)
}

fn ctl(d: &Daemon, args: &[&str]) {
    let out = Command::new(crate::daemon_support::ctl_bin())
        .arg("--endpoint")
        .arg(format!("unix:{}", d.socket.display()))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "idallocctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn headroom(body: &str, ns: &str, kind: &str) -> f64 {
    series(
        body,
        "idalloc_lease_headroom",
        &[&format!("namespace=\"{ns}\""), &format!("kind=\"{kind}\"")],
    )
    .unwrap_or_else(|| panic!("no headroom series for {ns} {kind}:\n{body}"))
}

#[test]
fn alerting_series_mean_what_the_rules_assume() {
    let dir = tempfile::tempdir().unwrap();
    let (mut d, addr) = start(dir.path());
    let body = scrape_fresh(&addr);
    // Nothing leased yet: nothing to run out of, so no value, never a 0 that pages.
    for ns in ["primary", "forks_min"] {
        for kind in ["vid", "eid"] {
            assert!(headroom(&body, ns, kind).is_nan(), "{ns} {kind}:\n{body}");
        }
    }
    for label in ["version=", "revision=", "rustc=", "target=", "profile="] {
        assert!(
            body.lines()
                .any(|l| l.starts_with("idalloc_build_info{") && l.contains(label)),
            "build_info lacks {label}:\n{body}"
        );
    }
    assert!(
        body.contains("# TYPE process_cpu_seconds_total counter"),
        "{body}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let last = series(&body, "idalloc_store_last_success_timestamp_seconds", &[]).unwrap();
    assert!(
        (now - 60.0..=now + 1.0).contains(&last),
        "recovery read the store within the last minute: {last} vs {now}"
    );
    assert_eq!(
        series(&body, "idalloc_lease_size_configured_ids", &[]),
        Some(10000.0)
    );

    // The primary leases; a fork is created, reserves, and is merged.
    ctl(&d, &["alloc", "vid", "--count", "10"]);
    let fork = idalloc_client::ForkId::generate().to_string();
    ctl(&d, &["fork", "bootstrap", &fork]);
    ctl(&d, &["alloc", "eid", "--fork", &fork]);
    let body = scrape_fresh(&addr);
    assert!(headroom(&body, "primary", "vid") > 0.0, "{body}");
    assert!(headroom(&body, "forks_min", "eid") > 0.0, "{body}");
    assert_eq!(
        series(&body, "idalloc_forks", &["state=\"live\""]),
        Some(1.0)
    );
    ctl(&d, &["fork", "merge", &fork]);
    let body = scrape_fresh(&addr);
    assert_eq!(
        series(&body, "idalloc_forks", &["state=\"live\""]),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        series(&body, "idalloc_forks", &["state=\"merged\""]),
        Some(1.0),
        "{body}"
    );
    assert!(headroom(&body, "forks_min", "eid").is_nan(), "{body}");
    assert_eq!(series(&body, "idalloc_primary_unavailable", &[]), Some(0.0));

    // CPU time in clock ticks: some work, then a value with a fraction (the
    // facade's integer counter only ever showed whole seconds).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cpu = 0.0;
    for _ in 0..20 {
        rt.block_on(async {
            let c = unix_client(&d.socket).await.unwrap();
            for _ in 0..200 {
                c.reserve(ctx(), None, Kind::Vid, 1).await.unwrap().unwrap();
            }
        });
        cpu = series(&scrape(&addr), "process_cpu_seconds_total", &[]).unwrap();
        if cpu.fract() != 0.0 {
            break;
        }
    }
    assert!(
        cpu > 0.0 && cpu.fract() != 0.0,
        "process_cpu_seconds_total {cpu}"
    );
    d.stop();

    // A primary whose manifest does not parse: the daemon serves the forks, and
    // the primary is a series saying so.
    std::fs::write(
        dir.path().join("store/id_allocator.json"),
        "{\"next_vid_batch\":",
    )
    .unwrap();
    let (mut d, addr) = start(dir.path());
    let body = scrape_fresh(&addr);
    assert_eq!(
        series(&body, "idalloc_primary_unavailable", &[]),
        Some(1.0),
        "{body}"
    );
    assert!(headroom(&body, "primary", "vid").is_nan(), "{body}");
    d.stop();
}

/// Metric names in a text: tokens that start with `idalloc_` or `process_`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if boundary && (rest.starts_with("idalloc_") || rest.starts_with("process_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            out.insert(rest[..len].to_string());
            i += len;
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn the_metrics_table_the_scrape_the_rules_and_the_dashboard_agree() {
    let table_text = std::fs::read_to_string(Path::new(ROOT).join("docs/metrics.md")).unwrap();
    let table: BTreeSet<String> = table_text
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(name, _)| name.to_string()))
        .collect();
    let histograms: BTreeSet<&str> = table_text
        .lines()
        .filter(|l| l.contains("| histogram |"))
        .filter_map(|l| l.strip_prefix("| `")?.split_once('`').map(|(n, _)| n))
        .collect();
    // A scrape after every kind of work the table describes: a lone writer (busy
    // polling), several, a fork, an error.
    let dir = tempfile::tempdir().unwrap();
    let (mut d, addr) = start(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = unix_client(&d.socket).await.unwrap();
        for _ in 0..300 {
            c.reserve(ctx(), None, Kind::Vid, 1).await.unwrap().unwrap();
        }
        let _ = c.reserve(ctx(), None, Kind::Vid, 0).await.unwrap();
    });
    let body = scrape_fresh(&addr);
    d.stop();
    let scraped: BTreeSet<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    assert_eq!(
        scraped, table,
        "docs/metrics.md and a scrape differ (left: scraped, right: documented)"
    );
    let base = |n: &str| -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(b) = n.strip_suffix(suffix) {
                if histograms.contains(b) {
                    return b.to_string();
                }
            }
        }
        n.to_string()
    };
    for file in [
        "deploy/prometheus/idalloc.rules.yml",
        "deploy/prometheus/idalloc.rules.test.yml",
        "deploy/grafana/idalloc.json",
    ] {
        let text = std::fs::read_to_string(Path::new(ROOT).join(file)).unwrap();
        let used: BTreeSet<String> = names_in(&text).iter().map(|n| base(n)).collect();
        let unknown: Vec<&String> = used.iter().filter(|n| !table.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics docs/metrics.md does not list: {unknown:?}"
        );
    }
    // The dashboard is JSON Grafana can import: every panel has a query.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/idalloc.json")).unwrap(),
    )
    .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for p in panels {
        assert!(p["targets"][0]["expr"].is_string(), "{p}");
    }
}
