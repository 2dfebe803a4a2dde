//! A writer that takes its ids from `idallocd` through this crate.
//!
//!     cargo run -p idalloc-client --example writer -- [ENDPOINT] [--fork ID] [--vertices N] [--tasks T]
//!
//! ENDPOINT defaults to `IDALLOC_ENDPOINT`, then to the daemon's default socket
//! (`default_endpoint`). With `--fork`, the fork is bootstrapped first (idempotent:
//! an existing fork is used as it is). Each task creates vertices (one vid each) and
//! links each to the previous one (one eid per edge), the way a graph writer would;
//! then the writer prints a summary and checks that no id came out twice.
//!
//! The root package's tests run it against a real daemon (tests/e2e_client.rs,
//! `the_client_crates_writer_example_runs_against_a_daemon`).

use std::collections::HashSet;
use std::error::Error;
use std::time::Instant;

use idalloc_client::client::default_endpoint;
use idalloc_client::protocol::BootstrapRequest;
use idalloc_client::{Client, ClientError, Endpoint, ForkId, Kind, Namespace};

type Result<T> = std::result::Result<T, Box<dyn Error + Send + Sync>>;

struct Args {
    endpoint: Option<String>,
    fork: Option<ForkId>,
    vertices: u64,
    tasks: u64,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        endpoint: std::env::var("IDALLOC_ENDPOINT").ok(),
        fork: None,
        vertices: 1_000_000,
        tasks: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |flag: &str| it.next().ok_or(format!("{flag} needs a value"));
        match a.as_str() {
            "--fork" => args.fork = Some(value("--fork")?.parse()?),
            "--vertices" => args.vertices = value("--vertices")?.parse()?,
            "--tasks" => args.tasks = value("--tasks")?.parse()?,
            "-h" | "--help" => {
                println!("usage: writer [ENDPOINT] [--fork ID] [--vertices N] [--tasks T]");
                std::process::exit(0);
            }
            other if other.starts_with("--") => return Err(format!("unknown flag {other}").into()),
            other => args.endpoint = Some(other.to_string()),
        }
    }
    if args.tasks == 0 {
        return Err("--tasks must be at least 1".into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let endpoint: Endpoint = match &args.endpoint {
        Some(e) => e.parse()?,
        None => default_endpoint(),
    };
    let client = Client::connect(&endpoint).await.map_err(|e| {
        format!("{e}: is idallocd running? pass its endpoint as the first argument or in IDALLOC_ENDPOINT")
    })?;
    if let Some(fork) = args.fork {
        let info = client.bootstrap_fork(BootstrapRequest::new(fork)).await?;
        let what = if info.created { "created" } else { "exists" };
        println!(
            "fork         {} {what}, starts at vid {}",
            info.fork, info.next_vid
        );
    }
    // The swap a writer makes: `IdAllocator::new(store, ...)` becomes this line;
    // `allocate_vid` / `allocate_eid` keep their names.
    let ids = client.allocator(args.fork);

    let started = Instant::now();
    let per_task = args.vertices / args.tasks;
    let mut writers = Vec::new();
    for _ in 0..args.tasks {
        let ids = ids.clone();
        writers.push(tokio::spawn(async move {
            let (mut vids, mut eids) = (Vec::with_capacity(per_task as usize), Vec::new());
            let mut previous = None;
            for _ in 0..per_task {
                let v = ids.allocate_vid().await?;
                if previous.is_some() {
                    eids.push(ids.allocate_eid().await?);
                }
                previous = Some(v);
                vids.push(v);
            }
            Ok::<_, ClientError>((vids, eids))
        }));
    }
    let (mut vids, mut eids) = (HashSet::new(), HashSet::new());
    for w in writers {
        let (v, e) = w.await??;
        for id in v {
            if !vids.insert(id) {
                return Err(format!("vid {id} was handed out twice").into());
            }
        }
        for id in e {
            if !eids.insert(id) {
                return Err(format!("eid {id} was handed out twice").into());
            }
        }
    }
    let elapsed = started.elapsed();
    let hwm = ids.current_hwm().await?;
    let (vs, es) = (ids.stats(Kind::Vid), ids.stats(Kind::Eid));
    println!("endpoint     {endpoint}");
    println!("namespace    {}", Namespace::from(args.fork));
    println!(
        "vertices     {} ids, {}..={}",
        vids.len(),
        vids.iter().min().unwrap_or(&0),
        vids.iter().max().unwrap_or(&0)
    );
    println!("edges        {} ids", eids.len());
    println!(
        "elapsed      {:.3} s ({:.0} ids/s)",
        elapsed.as_secs_f64(),
        (vids.len() + eids.len()) as f64 / elapsed.as_secs_f64()
    );
    println!(
        "ranges       vid {} ({} prefetched, {} waits), eid {} ({} prefetched, {} waits)",
        vs.ranges, vs.prefetched, vs.waited, es.ranges, es.prefetched, es.waited
    );
    println!(
        "daemon hwm   next_vid {} next_eid {}",
        hwm.next_vid, hwm.next_eid
    );
    println!("all ids unique");
    Ok(())
}
