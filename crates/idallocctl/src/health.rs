//! `idallocctl health`: one verdict with an exit status, for probes and scripts (as
//! `pg_isready` and `etcdctl endpoint health`).
//!
//! Exit 0: the daemon answered, its last object-store call succeeded and every
//! namespace verified. Exit 1: it answered, but the store or a namespace is
//! unavailable. Exit 3: no answer (no connection, or none within `--timeout`).
//! Exit 2 stays bad usage, as for every command.

use std::process::ExitCode;

use idalloc_client::client::{Client, ClientConfig, ClientError};
use idalloc_client::protocol::MirrorHealth;
use serde::Serialize;

/// The daemon answered and reported a problem.
const UNHEALTHY: u8 = 1;
/// The daemon did not answer.
const UNREACHABLE: u8 = 3;

/// `health --json`: one object.
#[derive(Serialize)]
struct Report {
    healthy: bool,
    /// `null` when healthy, else `"unreachable"`, `"store"` or `"namespace"`.
    problem: Option<&'static str>,
    /// The one line the text output prints.
    message: String,
    endpoint: String,
    /// The daemon's version, when it answered.
    version: Option<String>,
    /// The object store as the daemon last found it, when it answered.
    store: Option<MirrorHealth>,
    /// Every namespace that could not be verified, with why.
    unavailable: Vec<Unavailable>,
}

#[derive(Serialize)]
struct Unavailable {
    namespace: String,
    error: String,
}

pub async fn run(
    endpoint: idalloc_client::Endpoint,
    config: ClientConfig,
    json: bool,
    describe: impl Fn(&anyhow::Error) -> String,
) -> ExitCode {
    let report = probe(&endpoint, config, &describe).await;
    let code = match report.problem {
        None => ExitCode::SUCCESS,
        Some("unreachable") => ExitCode::from(UNREACHABLE),
        Some(_) => ExitCode::from(UNHEALTHY),
    };
    if json {
        match serde_json::to_value(&report) {
            Ok(v) => println!("{v}"),
            Err(e) => {
                eprintln!("idallocctl: cannot render the health report: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else if report.healthy {
        println!("{}", report.message);
    }
    if !report.healthy {
        eprintln!("idallocctl: {}", report.message);
    }
    code
}

async fn probe(
    endpoint: &idalloc_client::Endpoint,
    config: ClientConfig,
    describe: &impl Fn(&anyhow::Error) -> String,
) -> Report {
    let mut report = Report {
        healthy: false,
        problem: None,
        message: String::new(),
        endpoint: endpoint.to_string(),
        version: None,
        store: None,
        unavailable: Vec::new(),
    };
    // A call that fails outside the service (no connection, no reply) means the
    // daemon is not there to ask; a typed error from the service means it is.
    let failed = |report: &mut Report, e: ClientError| {
        let answered = matches!(e, ClientError::Service(_) | ClientError::Aborted(_));
        let e = anyhow::Error::from(e);
        if answered {
            report.problem = Some("namespace");
            report.message = format!(
                "unhealthy: idallocd at {} answered: {}",
                report.endpoint,
                describe(&e)
            );
        } else {
            report.problem = Some("unreachable");
            report.message = format!("unreachable: {}", describe(&e));
        }
    };
    let client = match Client::connect_with(endpoint, config).await {
        Ok(c) => c,
        Err(e) => {
            failed(&mut report, e);
            return report;
        }
    };
    let status = match client.status().await {
        Ok(s) => s,
        Err(e) => {
            failed(&mut report, e);
            return report;
        }
    };
    report.version = Some(status.version.clone());
    report.store = Some(status.mirror.clone());
    // The primary comes with status; every fork, past status's first hundred, with
    // the listing (each one verified before it is reported).
    report.unavailable.extend(
        status
            .namespaces
            .iter()
            .filter(|ns| ns.fork.is_none())
            .filter_map(|ns| {
                Some(Unavailable {
                    namespace: "primary".into(),
                    error: ns.error.clone()?,
                })
            }),
    );
    let forks = match client.list_forks().await {
        Ok(f) => f,
        Err(e) => {
            failed(&mut report, e);
            return report;
        }
    };
    report.unavailable.extend(forks.iter().filter_map(|f| {
        Some(Unavailable {
            namespace: f.fork.clone(),
            error: f.error.clone()?,
        })
    }));
    let at = format!("idallocd {} at {}", status.version, report.endpoint);
    if !status.mirror.healthy {
        report.problem = Some("store");
        let error = status
            .mirror
            .last_error
            .as_deref()
            .unwrap_or("no error recorded");
        let age = status
            .mirror
            .last_error_age_ms
            .map(|ms| format!(" {ms} ms ago"))
            .unwrap_or_default();
        report.message = format!(
            "unhealthy: object store {} unavailable ({at}; last error{age}: {})",
            status.object_store,
            one_line(error)
        );
    } else if let Some(first) = report.unavailable.first() {
        report.problem = Some("namespace");
        let more = match report.unavailable.len() - 1 {
            0 => String::new(),
            n => format!(" (and {n} more: idallocctl fork list shows them)"),
        };
        report.message = format!(
            "unhealthy: namespace {} unavailable ({at}): {}{more}",
            first.namespace,
            one_line(&first.error)
        );
    } else {
        report.healthy = true;
        let live = 1 + forks
            .iter()
            .filter(|f| !f.dropped && f.merged_into.is_none())
            .count();
        report.message = format!(
            "healthy: {at}, object store {} ok, {live} live namespace{} verified",
            status.object_store,
            if live == 1 { "" } else { "s" }
        );
    }
    report
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
