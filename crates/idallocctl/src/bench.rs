//! `idallocctl bench`: load a running daemon with durable reservations and report
//! throughput and latency.
//!
//! Invariant checked: every range received is disjoint from every other (per the
//! one namespace and kind benchmarked). The run fails, non-zero, if two overlap.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use hdrhistogram::Histogram;
use idalloc_client::client::{Client, ClientConfig};
use idalloc_client::{Endpoint, IdRange, Kind};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::{table, KindArg};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  idallocctl bench                                   16 reservations in flight for 10 s
  idallocctl bench --clients 1 --concurrency 1 --requests 10000
  idallocctl --endpoint tcp:127.0.0.1:7420 bench --size 1000 --kind eid --json

Each client is its own connection; each runs --concurrency tasks that reserve one
range after another. Latency is per reservation, as the caller sees it.")]
pub struct BenchArgs {
    /// Connections to open
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Tasks per connection, each with one reservation in flight
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Ids per reservation
    #[arg(long, default_value_t = 1, value_name = "N")]
    size: u64,
    /// Which counter
    #[arg(long, value_enum, default_value = "vid")]
    kind: KindArg,
    /// Namespace: a fork id [default: the primary]
    #[arg(long, value_name = "ID")]
    fork: Option<String>,
    /// How long to run (ignored with --requests)
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    duration: humantime::Duration,
    /// Stop after this many reservations in total instead of after --duration
    #[arg(long, value_name = "N")]
    requests: Option<u64>,
    /// Print the results as one JSON object
    #[arg(long)]
    json: bool,
    /// Threads generating the load (one event loop for all connections leaves the
    /// most CPU to a daemon on the same machine)
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: u16,
}

impl BenchArgs {
    /// Threads the load generator's runtime should have.
    pub fn threads(&self) -> usize {
        usize::from(self.threads)
    }
}

/// Latencies are recorded in nanoseconds, from 1 ns to this (an hour, far beyond
/// the default `--timeout` of 10 s); a longer one counts as this long.
const HIGHEST_LATENCY_NS: u64 = 3_600_000_000_000;

/// Three significant figures: each percentile is within 0.1% of the latency
/// measured, in 264 KiB of counts for the whole run however long it lasts.
const SIGNIFICANT_FIGURES: u8 = 3;

/// Every reservation's latency, in nanoseconds.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGHEST_LATENCY_NS, SIGNIFICANT_FIGURES)
        .expect("static bounds are valid")
}

/// p50, p99, p999 and max of a histogram, in nanoseconds.
struct Percentiles {
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

pub async fn run(endpoint: Endpoint, config: ClientConfig, args: BenchArgs) -> anyhow::Result<()> {
    if args.clients == 0 || args.concurrency == 0 {
        bail!("--clients and --concurrency must be at least 1");
    }
    if args.size == 0 {
        bail!("--size must be at least 1");
    }
    let kind = Kind::from(args.kind);
    // Parsed before connecting: a malformed --fork is an error, not a bench of errors.
    let namespace = idalloc_client::Namespace::from_wire(args.fork.as_deref())?;
    let mut clients = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        clients.push(Client::connect_with(&endpoint, config.clone()).await?);
    }
    let duration = Duration::from(args.duration);
    let done = Arc::new(AtomicU64::new(0));
    // With --requests, tasks claim request slots from this budget; without, they stop
    // at the time limit.
    let budget = Arc::new(AtomicU64::new(args.requests.unwrap_or(u64::MAX)));
    let stop = Arc::new(AtomicBool::new(false));
    // One histogram for every task: fixed memory, and recording is a few
    // nanoseconds under a lock no task holds across an await (a std Mutex), next to
    // a round trip of tens of microseconds.
    let latencies = Arc::new(Mutex::new(latency_histogram()));

    let bar = match args.requests {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} reservations {per_sec} eta {eta}")
                .expect("static template"),
        ),
        None => ProgressBar::new(duration.as_secs().max(1)).with_style(
            ProgressStyle::with_template("{bar:40} {elapsed}/{len}s {msg}")
                .expect("static template"),
        ),
    };
    if args.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in &clients {
        for _ in 0..args.concurrency {
            let (client, done, budget, stop, latencies, fork) = (
                client.clone(),
                done.clone(),
                budget.clone(),
                stop.clone(),
                latencies.clone(),
                namespace,
            );
            let size = args.size;
            tasks.spawn(async move {
                let mut ranges = Vec::new();
                loop {
                    if stop.load(Ordering::Relaxed)
                        || budget
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                                b.checked_sub(1)
                            })
                            .is_err()
                    {
                        return Ok::<_, anyhow::Error>(ranges);
                    }
                    let t = Instant::now();
                    let r = client.reserve(fork, kind, size).await?;
                    let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    latencies
                        .lock()
                        .expect("no task panics holding it")
                        .saturating_record(ns.max(1));
                    if r.len() != size {
                        bail!(
                            "asked for {size} ids, got [{}, {}) ({} ids)",
                            r.start,
                            r.end,
                            r.len()
                        );
                    }
                    ranges.push(r);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }

    let ticker = {
        let (bar, done, stop) = (bar.clone(), done.clone(), stop.clone());
        let by_count = args.requests.is_some();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let elapsed = started.elapsed();
                let n = done.load(Ordering::Relaxed);
                if by_count {
                    bar.set_position(n);
                } else {
                    bar.set_position(elapsed.as_secs());
                    bar.set_message(format!(
                        "{n} reservations, {:.0}/s",
                        n as f64 / elapsed.as_secs_f64()
                    ));
                    if elapsed >= duration {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            }
        })
    };

    let mut ranges = Vec::new();
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a bench task panicked")? {
            Ok(r) => ranges.extend(r),
            Err(e) => {
                // Stop the others; report the first failure.
                stop.store(true, Ordering::Relaxed);
                failure.get_or_insert(e);
            }
        }
    }
    let elapsed = started.elapsed();
    ticker.abort();
    bar.finish_and_clear();
    if let Some(e) = failure {
        return Err(e.context(format!("bench stopped after {} reservations", ranges.len())));
    }
    if ranges.is_empty() {
        bail!("no reservation completed");
    }

    let overlap = find_overlap(&mut ranges);
    let latency = Percentiles::of(&latencies.lock().expect("every task has ended"));
    let reservations = ranges.len() as u64;
    let ids = reservations * args.size;
    let secs = elapsed.as_secs_f64();
    let in_flight = args.clients * args.concurrency;
    let namespace = args.fork.clone().unwrap_or_else(|| "primary".into());

    if args.json {
        println!(
            "{}",
            json!({
                "endpoint": endpoint.to_string(),
                "clients": args.clients,
                "concurrency": args.concurrency,
                "threads": args.threads,
                "size": args.size,
                "kind": kind.as_str(),
                "fork": args.fork,
                "duration_secs": secs,
                "reservations": reservations,
                "ids": ids,
                "reservations_per_sec": reservations as f64 / secs,
                "ids_per_sec": ids as f64 / secs,
                "latency_us": {
                    "p50": latency.p50 as f64 / 1e3,
                    "p99": latency.p99 as f64 / 1e3,
                    "p999": latency.p999 as f64 / 1e3,
                    "max": latency.max as f64 / 1e3,
                },
                "disjoint": overlap.is_none(),
            })
        );
    } else {
        let ms = |ns: u64| format!("{:.3} ms", ns as f64 / 1e6);
        println!("endpoint         {endpoint}");
        println!(
            "in flight        {} clients x {} tasks = {in_flight}, on {} thread(s)",
            args.clients, args.concurrency, args.threads
        );
        println!(
            "reservation      {} {}(s) in {namespace}",
            args.size,
            kind.as_str()
        );
        println!("elapsed          {secs:.2} s");
        println!();
        let mut t = table::new(&["", "total", "per second"], &[1, 2]);
        t.add_row([
            "reservations".to_string(),
            reservations.to_string(),
            format!("{:.0}", reservations as f64 / secs),
        ]);
        t.add_row([
            "ids".to_string(),
            ids.to_string(),
            format!("{:.0}", ids as f64 / secs),
        ]);
        println!("{}", table::render(&t));
        println!();
        println!(
            "latency          p50 {}   p99 {}   p999 {}   max {}",
            ms(latency.p50),
            ms(latency.p99),
            ms(latency.p999),
            ms(latency.max)
        );
        if overlap.is_none() {
            println!("ranges           {reservations} received, all disjoint");
        }
    }
    if let Some((a, b)) = overlap {
        bail!(
            "ranges [{}, {}) and [{}, {}) overlap: the daemon handed out an id twice (report this with the daemon's log)",
            a.start, a.end, b.start, b.end
        );
    }
    Ok(())
}

/// Sort the ranges and return the first two that share an id, if any.
fn find_overlap(ranges: &mut [IdRange]) -> Option<(IdRange, IdRange)> {
    ranges.sort_unstable();
    ranges
        .windows(2)
        .find(|w| w[1].start < w[0].end)
        .map(|w| (w[0], w[1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_a_thousandth() {
        let mut h = latency_histogram();
        // 1..=100_000 µs: p50 is 50 ms, p99 99 ms, p999 99.9 ms, max 100 ms.
        for us in 1..=100_000u64 {
            h.saturating_record(us * 1_000);
        }
        let p = Percentiles::of(&h);
        for (got, want) in [
            (p.p50, 50_000_000),
            (p.p99, 99_000_000),
            (p.p999, 99_900_000),
            (p.max, 100_000_000),
        ] {
            assert!(
                got.abs_diff(want) <= want / 1_000,
                "{got} ns, wanted {want} ns within 0.1%"
            );
        }
        // Beyond the highest trackable latency: counted, at that bound.
        h.saturating_record(u64::MAX);
        assert_eq!(h.len(), 100_001);
        assert!(Percentiles::of(&h).max >= HIGHEST_LATENCY_NS);
    }

    #[test]
    fn overlap_is_found_in_any_order() {
        let r = |start, end| IdRange { start, end };
        assert_eq!(find_overlap(&mut [r(10, 20), r(0, 10), r(20, 30)]), None);
        assert_eq!(
            find_overlap(&mut [r(20, 30), r(0, 10), r(29, 31)]),
            Some((r(20, 30), r(29, 31)))
        );
        assert_eq!(
            find_overlap(&mut [r(5, 6), r(5, 6)]),
            Some((r(5, 6), r(5, 6)))
        );
    }
}
