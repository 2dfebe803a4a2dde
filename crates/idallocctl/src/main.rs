//! `idallocctl`: the operator's and scripts' command line for `idallocd`.
//!
//! Every command of DESIGN.md's "Interface that scripts rely on", with `--json`
//! where listed, plus `bench`. Contract kept here: on failure, exit non-zero and
//! print exactly one line on stderr saying what was wrong and what to do.

/// `println!` that ends the program quietly when stdout is closed (`| head`),
/// instead of panicking: exit status 141, as a process killed by SIGPIPE.
macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::stdout_failed(e)
        }
    }};
}

mod bench;
mod health;
mod table;

/// What to do when writing to stdout fails.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("idallocctl: cannot write to stdout: {e}");
    std::process::exit(1);
}

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use idalloc_client::client::{self, Client, ClientConfig, ClientError};
use idalloc_client::protocol::{
    BootstrapRequest, ForkIds, ForkInfo, Hwm, IdRange, MergeInto, NamespaceStatus, Status,
};
use idalloc_client::{Kind, ServiceError};
use serde::Serialize;

const EXAMPLES: &str = "\
Examples:
  idallocctl alloc vid                      one vertex id from the primary
  idallocctl alloc eid --count 1000 --json  1000 edge ids: {\"start\":..,\"end\":..,...}
  idallocctl hwm --fork 01J2VF4Z0Y8Q3R5S7T9V1W3X5Z
  idallocctl fork bootstrap 0190b6f2-7c1e-7a4b-9c3d-5e6f70819203 --vid-hwm 5000
  idallocctl fork list --json
  idallocctl fork drop 0190b6f2-7c1e-7a4b-9c3d-5e6f70819203
  idallocctl checkpoint
  idallocctl repair --fork 01J2VF4Z0Y8Q3R5S7T9V1W3X5Z --vid-floor 120000 --eid-floor 450000
  idallocctl --endpoint tcp:127.0.0.1:7420 status
  idallocctl --timeout 2s health            exit 0 healthy, 1 store/namespace unavailable, 3 unreachable
  idallocctl --endpoint tls:ids.db1.example:7443 --tls-ca ca.pem --tls-cert me.pem --tls-key me.key status
  idallocctl bench --clients 4 --concurrency 4 --duration 10s

Ranges are half-open: [start, end). Fork ids are UUIDs or ULIDs (26 characters);
the two spellings of one value are the same fork.

The endpoint is unix:PATH, tcp:HOST:PORT (plain, loopback only) or tls:HOST:PORT
(TLS: the daemon's certificate is checked against --tls-ca for HOST, and this
client presents --tls-cert/--tls-key, whose names the daemon maps to a role).
Without --endpoint or IDALLOC_ENDPOINT it is the first of these that applies:
  1. $RUNTIME_DIRECTORY/idallocd.sock, else $STATE_DIRECTORY/idallocd.sock, when
     set (inside a systemd unit: that unit's daemon with its embedded defaults);
  2. ./idallocd-data/idallocd.sock if it exists (a daemon started with no
     arguments in the current directory);
  3. /run/idallocd/idallocd.sock, the system daemon's (idallocd.socket).
The instance idallocd@NAME (one daemon per database) listens on
/run/idallocd/NAME/idallocd.sock:
  idallocctl --endpoint unix:/run/idallocd/db1/idallocd.sock status

Errors: exit status 1 (2 for bad usage, a bad --endpoint included) and one line
on stderr. A closed stdout (`| head`) ends the program quietly with status 141.";

/// Allocate ids from, and administer, an idalloc daemon (idallocd).
#[derive(Parser, Debug)]
#[command(name = "idallocctl", version, after_help = EXAMPLES)]
struct Cli {
    /// Daemon address: unix:PATH, tcp:HOST:PORT or tls:HOST:PORT [default: a local daemon's socket, else /run/idallocd/idallocd.sock; see below]
    #[arg(long, global = true, env = "IDALLOC_ENDPOINT", value_name = "ADDR")]
    endpoint: Option<String>,
    /// For tls: endpoints, the CA (PEM) that signed the daemon's certificate
    #[arg(long, global = true, env = idalloc_client::tls::ENV_CA, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// For tls: endpoints, this client's certificate (PEM), mapped to a role by the daemon
    #[arg(long, global = true, env = idalloc_client::tls::ENV_CERT, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// For tls: endpoints, the private key (PEM) of --tls-cert
    #[arg(long, global = true, env = idalloc_client::tls::ENV_KEY, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Give up on a call after this long, reconnects and retries included (e.g. 500ms, 30s)
    #[arg(long, global = true, value_name = "DURATION", default_value = "10s")]
    timeout: humantime::Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Reserve a range of ids (durable before it is printed)
    #[command(
        after_help = "Examples:\n  idallocctl alloc vid\n  idallocctl alloc eid --count 1000 --fork 01J2VF4Z0Y8Q3R5S7T9V1W3X5Z --json"
    )]
    Alloc {
        /// Which counter: vertex ids or edge ids
        kind: KindArg,
        /// How many consecutive ids
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// The fork (UUID or ULID) [default: the primary]
        #[arg(long, value_name = "ID")]
        fork: Option<String>,
        /// Print {"start","end","count","kind","fork"}
        #[arg(long)]
        json: bool,
    },
    /// Show the next ids this daemon would grant (high-water marks)
    ///
    /// The namespace is checked against the object store first. With several daemons
    /// on one root (multi-writer), each grants from its own leases: this is the next
    /// id of the daemon asked, not of the whole root; the root's bound is the
    /// manifest's ceiling (`idallocctl status` shows this daemon's lease).
    Hwm {
        /// The fork [default: the primary]
        #[arg(long, value_name = "ID")]
        fork: Option<String>,
        /// Print {"fork","next_vid","next_eid","root_wide"}
        #[arg(long)]
        json: bool,
    },
    /// Create, list, merge and drop forks
    #[command(subcommand)]
    Fork(ForkCommand),
    /// Give back the unused part of this daemon's own lease (admin; never another daemon's ids)
    Checkpoint {
        /// The fork [default: the primary]
        #[arg(long, value_name = "ID")]
        fork: Option<String>,
        /// Print {"fork","next_vid","next_eid","root_wide"}
        #[arg(long)]
        json: bool,
    },
    /// Write a namespace's manifest from an explicit floor, only upward
    ///
    /// The way out when a manifest cannot be parsed (empty, truncated, not JSON):
    /// that namespace answers every call with an error until it is repaired. Give
    /// floors above the highest ids the database holds. The manifest written holds,
    /// per kind, the highest of the floor, the old manifest (if it parses), the
    /// fork's other spelling, its creation claim and this daemon's local state;
    /// nothing is ever lowered. Never delete a manifest instead: that resets it.
    #[command(
        after_help = "Examples:\n  idallocctl repair --vid-floor 5000000 --eid-floor 9000000\n  idallocctl repair --fork 01J2VF4Z0Y8Q3R5S7T9V1W3X5Z --vid-floor 120000 --eid-floor 0 --json"
    )]
    Repair {
        /// The fork (UUID or ULID) [default: the primary]
        #[arg(long, value_name = "ID")]
        fork: Option<String>,
        /// Vertex ids resume at or above this (one above the highest the database holds)
        #[arg(long, value_name = "N")]
        vid_floor: u64,
        /// Edge ids resume at or above this
        #[arg(long, value_name = "M")]
        eid_floor: u64,
        /// Print {"manifest","before","vid_ceiling","eid_ceiling","evidence"}
        #[arg(long)]
        json: bool,
    },
    /// Daemon version, mode, object-store health and counters
    Status {
        /// Print the full status as JSON
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 if the daemon answers, its object store works and every namespace verifies
    ///
    /// A probe for scripts, monitoring and orchestrators (as pg_isready): one line
    /// saying which, on stdout when healthy and on stderr when not. Exit 1: the
    /// daemon answered, but its last object-store call failed or a namespace (the
    /// primary or a fork, dropped and merged ones included) cannot be verified,
    /// e.g. a manifest that does not parse. Exit 3: the daemon is unreachable (no
    /// connection, or no answer within --timeout). Exit 2: bad usage. The store is
    /// judged by the daemon's last call to it, as `status` shows it.
    #[command(
        after_help = "Examples:\n  idallocctl health\n  idallocctl --timeout 2s health --json\n  idallocctl --endpoint unix:/run/idallocd/db1/idallocd.sock health || systemctl status idallocd@db1"
    )]
    Health {
        /// Print {"healthy","problem","message","endpoint","version","store","unavailable"}
        #[arg(long)]
        json: bool,
    },
    /// Measure reservations/s and latency against a running daemon
    Bench(bench::BenchArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(
        after_help = "Examples:\n  idallocctl completions bash > /etc/bash_completion.d/idallocctl\n  idallocctl completions zsh > \"${fpath[1]}/_idallocctl\""
    )]
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
    /// Write the man pages (idallocctl.1 and one per subcommand) into a directory
    #[command(after_help = "Example:\n  idallocctl man /usr/local/share/man/man1")]
    Man {
        /// Where to write them
        dir: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ForkCommand {
    /// Create a fork above its parent's high-water mark (idempotent: an existing fork is returned unchanged)
    #[command(
        after_help = "Examples:\n  idallocctl fork bootstrap 0190b6f2-7c1e-7a4b-9c3d-5e6f70819203\n  idallocctl fork bootstrap 01J2VF4Z0Y8Q3R5S7T9V1W3X5Z --parent 0190b6f2-7c1e-7a4b-9c3d-5e6f70819203 --vid-hwm 5000 --json"
    )]
    Bootstrap(BootstrapArgs),
    /// List every fork, dropped and merged ones included
    List {
        /// Print a JSON array of forks
        #[arg(long)]
        json: bool,
    },
    /// Tell the daemon a fork's data was merged into an ancestor (admin)
    ///
    /// Afterwards the ancestor never grants an id the fork granted: its counters
    /// are raised above the fork's (in tree mode they were disjoint already, and
    /// the reply says so), and the fork is retired as merged (`fork list` shows
    /// it; its writers get an error naming the namespace to write to). Idempotent:
    /// running it again changes nothing. Refused for a dropped fork, a target that
    /// is not an ancestor, a fork with live child forks (merge or drop those
    /// first), and, on a shared root that counts fork ids per namespace, always
    /// (other daemons' leases could not be fenced; use fork_ids = "tree").
    #[command(
        after_help = "Examples:\n  idallocctl fork merge 01J2VF4Z0Y8Q3R5S7T9V1W3X5Z\n  idallocctl fork merge 01J2VF4Z0Y8Q3R5S7T9V1W3X5Z --into primary --json"
    )]
    Merge {
        /// The fork whose data was merged (UUID or ULID)
        id: String,
        /// The namespace it was merged into: an ancestor fork's id, or `primary` [default: its parent]
        #[arg(long, value_name = "PARENT")]
        into: Option<String>,
        /// Print {"fork","into","fork_vid_end","fork_eid_end","into_vid_ceiling","into_eid_ceiling","fork_ids","merged_now","summary"}
        #[arg(long)]
        json: bool,
    },
    /// Drop a fork: its ids are retired and never handed out again
    Drop {
        /// The fork (UUID or ULID)
        id: String,
        /// Print the dropped fork as {"fork","parent","next_vid",...,"dropped"}
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct BootstrapArgs {
    /// The fork to create (UUID or ULID)
    id: String,
    /// The parent fork [default: the primary]
    #[arg(long, value_name = "ID")]
    parent: Option<String>,
    /// Floor for vertex ids: the fork's first vid is at or above it (and above the parent's)
    #[arg(long, value_name = "N", default_value_t = 0)]
    vid_hwm: u64,
    /// Floor for edge ids
    #[arg(long, value_name = "N", default_value_t = 0)]
    eid_hwm: u64,
    /// Print {"fork","next_vid","next_eid","created",...}
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum KindArg {
    Vid,
    Eid,
}

impl From<KindArg> for Kind {
    fn from(k: KindArg) -> Kind {
        match k {
            KindArg::Vid => Kind::Vid,
            KindArg::Eid => Kind::Eid,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // clap's own message spans several lines; the contract is one.
            // Keep what comes before the usage block, joined on one line.
            let text = e.to_string();
            let what: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            let what = what.join(" ");
            let what = what.trim_start_matches("error: ");
            eprintln!("idallocctl: {what} (see idallocctl --help)");
            return ExitCode::from(2);
        }
    };
    // Commands that need no daemon.
    match &cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "idallocctl", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => {
            use clap::CommandFactory;
            return match clap_mangen::generate_to(Cli::command(), dir) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "idallocctl: cannot write man pages to {}: {e}",
                        dir.display()
                    );
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    // A bad endpoint is a usage error (2), like any other bad argument.
    let endpoint = match &cli.endpoint {
        Some(text) => match text.parse::<idalloc_client::Endpoint>() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("idallocctl: bad --endpoint / IDALLOC_ENDPOINT {text:?}: {e} (see idallocctl --help)");
                return ExitCode::from(2);
            }
        },
        None => client::default_endpoint(),
    };
    // The bench sizes its own runtime (a single thread by default, so the load
    // generator competes as little as it can with a daemon on the same cores).
    let mut builder = match &cli.command {
        Command::Bench(args) if args.threads() == 1 => {
            tokio::runtime::Builder::new_current_thread()
        }
        Command::Bench(args) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(args.threads());
            b
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("idallocctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Health { json } = cli.command {
        let config = client_config(&cli);
        return runtime.block_on(health::run(endpoint, config, json, one_line));
    }
    match runtime.block_on(run(cli, endpoint)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("idallocctl: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error chain on one line, with a hint for the causes a user can fix.
fn one_line(e: &anyhow::Error) -> String {
    let mut text = format!("{e:#}").replace('\n', " ");
    let hint = e.chain().find_map(|cause| {
        let ce = cause.downcast_ref::<ClientError>()?;
        Some(match ce {
            ClientError::Connect { .. } => " (is idallocd running? set --endpoint or IDALLOC_ENDPOINT)",
            ClientError::DeadlineExceeded { .. } => " (is idallocd overloaded or its object store unreachable? check `idallocctl status`, or raise --timeout)",
            ClientError::Disconnected { .. } => " (check with `idallocctl fork list` before retrying)",
            ClientError::Tls { .. } => " (the idallocd log says why it refused, with the certificate's names)",
            ClientError::Service(ServiceError::Internal(_)) => " (see the idallocd log)",
            _ => "",
        })
    });
    if let Some(hint) = hint {
        text.push_str(hint);
    }
    text
}

/// The client's deadline and TLS files, from the global flags.
fn client_config(cli: &Cli) -> ClientConfig {
    let mut config = ClientConfig::default().with_deadline(Duration::from(cli.timeout));
    if let Some(ca) = &cli.tls_ca {
        let mut files = idalloc_client::TlsFiles::new(ca);
        if let (Some(cert), Some(key)) = (&cli.tls_cert, &cli.tls_key) {
            files = files.with_client_cert(cert, key);
        }
        config = config.with_tls(files);
    }
    config
}

/// A `--fork` value as the namespace it names (none: the primary). Parsed here,
/// so a malformed id is one error line before anything is sent.
fn namespace(fork: Option<&str>) -> anyhow::Result<idalloc_client::Namespace> {
    Ok(idalloc_client::Namespace::from_wire(fork)?)
}

/// A fork id argument (`fork drop ID`, `fork merge ID`).
fn fork_id(text: &str) -> anyhow::Result<idalloc_client::ForkId> {
    Ok(idalloc_client::ForkId::parse(text)?)
}

async fn run(cli: Cli, endpoint: idalloc_client::Endpoint) -> anyhow::Result<()> {
    let config = client_config(&cli);
    if let Command::Bench(args) = cli.command {
        return bench::run(endpoint, config, args).await;
    }
    let client = Client::connect_with(&endpoint, config).await?;
    match cli.command {
        Command::Alloc {
            kind,
            count,
            fork,
            json,
        } => {
            let kind = Kind::from(kind);
            let r = client
                .reserve(namespace(fork.as_deref())?, kind, count)
                .await?;
            if json {
                print_json(&Reserved {
                    range: r,
                    count: r.len(),
                    kind,
                    fork: fork.as_deref(),
                })?;
            } else {
                println!("{}..{}", r.start, r.end);
            }
        }
        Command::Hwm { fork, json } => {
            let h = client.hwm(namespace(fork.as_deref())?).await?;
            print_hwm(&h, json)?;
        }
        Command::Fork(ForkCommand::Bootstrap(a)) => {
            let info = client
                .bootstrap_fork(BootstrapRequest {
                    fork: a.id,
                    parent: a.parent,
                    vid_floor: a.vid_hwm,
                    eid_floor: a.eid_hwm,
                    request_id: None,
                })
                .await?;
            if a.json {
                print_json(&info)?;
            } else {
                let what = if info.created { "created" } else { "exists" };
                println!(
                    "fork {} {what}: next_vid {} next_eid {}",
                    info.fork, info.next_vid, info.next_eid
                );
            }
        }
        Command::Fork(ForkCommand::List { json }) => {
            let forks = client.list_forks().await?;
            if json {
                print_json(&forks.iter().map(ListedFork::from).collect::<Vec<_>>())?;
            } else {
                print_fork_table(&forks);
            }
        }
        Command::Fork(ForkCommand::Merge { id, into, json }) => {
            let into = match into.as_deref() {
                None => MergeInto::Parent,
                Some("primary") => MergeInto::Primary,
                Some(f) => MergeInto::Fork(f.to_string()),
            };
            let report = client.merge_fork(fork_id(&id)?, into).await?;
            if json {
                print_json(&report)?;
            } else {
                println!("{}", report.summary);
            }
        }
        Command::Fork(ForkCommand::Drop { id, json }) => {
            let info = client.drop_fork(fork_id(&id)?).await?;
            if json {
                print_json(&info)?;
            } else {
                println!("fork {} dropped (its ids are retired)", info.fork);
            }
        }
        Command::Checkpoint { fork, json } => {
            let h = client.checkpoint(namespace(fork.as_deref())?).await?;
            if json {
                print_json(&h)?;
            } else {
                println!(
                    "checkpointed {}: next_vid {} next_eid {}",
                    h.fork.as_deref().unwrap_or("primary"),
                    h.next_vid,
                    h.next_eid
                );
            }
        }
        Command::Repair {
            fork,
            vid_floor,
            eid_floor,
            json,
        } => {
            let r = client
                .repair(idalloc_client::protocol::RepairRequest {
                    fork,
                    vid_floor,
                    eid_floor,
                })
                .await?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "repaired {}: was {}; now vid ceiling {}, eid ceiling {}",
                    r.manifest, r.before, r.vid_ceiling, r.eid_ceiling
                );
                for e in &r.evidence {
                    println!("  evidence: {e}");
                }
            }
        }
        Command::Status { json } => {
            let status = client.status().await?;
            if json {
                print_json(&status)?;
            } else {
                print_status(&endpoint.to_string(), &status);
            }
        }
        Command::Bench(_)
        | Command::Health { .. }
        | Command::Completions { .. }
        | Command::Man { .. } => {
            unreachable!("handled before connecting")
        }
    }
    Ok(())
}

/// Print `v` as one line of JSON. Its keys come out sorted (through
/// `serde_json::Value`), as scripts and the README have always seen them.
fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_value(v)?);
    Ok(())
}

/// `alloc --json`: the range, its length, and the kind and fork as they were asked
/// for (the fork as typed: `null` for the primary).
#[derive(Serialize)]
struct Reserved<'a> {
    #[serde(flatten)]
    range: IdRange,
    count: u64,
    kind: Kind,
    fork: Option<&'a str>,
}

/// One fork in `fork list --json`: a [`ForkInfo`] without `created`, which only
/// means something in a bootstrap's reply.
#[derive(Serialize)]
struct ListedFork<'a> {
    fork: &'a str,
    parent: Option<&'a str>,
    next_vid: u64,
    next_eid: u64,
    floor_vid: u64,
    floor_eid: u64,
    dropped: bool,
    merged_into: Option<&'a str>,
    error: Option<&'a str>,
}

impl<'a> From<&'a ForkInfo> for ListedFork<'a> {
    fn from(f: &'a ForkInfo) -> Self {
        // Every field named, so that a field added to the protocol is a decision
        // here, not an omission.
        let ForkInfo {
            fork,
            parent,
            next_vid,
            next_eid,
            floor_vid,
            floor_eid,
            created: _,
            dropped,
            merged_into,
            error,
        } = f;
        ListedFork {
            fork,
            parent: parent.as_deref(),
            next_vid: *next_vid,
            next_eid: *next_eid,
            floor_vid: *floor_vid,
            floor_eid: *floor_eid,
            dropped: *dropped,
            merged_into: merged_into.as_deref(),
            error: error.as_deref(),
        }
    }
}

fn print_hwm(h: &Hwm, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(h)?;
    } else {
        println!("namespace {}", h.fork.as_deref().unwrap_or("primary"));
        println!("next_vid  {}", h.next_vid);
        println!("next_eid  {}", h.next_eid);
        if !h.root_wide {
            println!(
                "(this daemon's next ids: other daemons on this root grant from their own leases)"
            );
        }
    }
    Ok(())
}

fn print_fork_table(forks: &[ForkInfo]) {
    if forks.is_empty() {
        println!("no forks (create one with: idallocctl fork bootstrap ID)");
        return;
    }
    println!("{}", table::render(&fork_table(forks)));
}

/// `fork list`'s table: one row per fork.
fn fork_table(forks: &[ForkInfo]) -> comfy_table::Table {
    let mut t = table::new(
        &["FORK", "PARENT", "NEXT_VID", "NEXT_EID", "STATE"],
        &[2, 3],
    );
    for f in forks {
        let parent = f.parent.clone().unwrap_or_else(|| "primary".into());
        t.add_row(match &f.error {
            // Not verified: its numbers are not reported.
            Some(e) => [
                f.fork.clone(),
                parent,
                "-".into(),
                "-".into(),
                format!("unavailable: {}", table::one_line(e)),
            ],
            None => [
                f.fork.clone(),
                parent,
                f.next_vid.to_string(),
                f.next_eid.to_string(),
                match (&f.merged_into, f.dropped) {
                    (Some(into), _) => format!("merged into {into}"),
                    (None, true) => "dropped".into(),
                    (None, false) => "live".into(),
                },
            ],
        });
    }
    t
}

fn print_status(endpoint: &str, s: &Status) {
    println!("endpoint      {endpoint}");
    println!("version       {}", s.version);
    println!(
        "uptime        {}",
        humantime::format_duration(Duration::from_secs(s.uptime_secs))
    );
    println!("mode          {}", s.mode);
    println!(
        "fork ids      {}",
        match s.fork_ids {
            ForkIds::Namespace => "per namespace",
            ForkIds::Tree => "one sequence for the tree",
        }
    );
    println!("object store  {}", s.object_store);
    let mirror = if s.mirror.healthy {
        "healthy".to_string()
    } else {
        "UNHEALTHY".to_string()
    };
    match (&s.mirror.last_error, s.mirror.last_error_age_ms) {
        (Some(e), Some(age)) => println!("mirror        {mirror} (last error {age} ms ago: {e})"),
        (Some(e), None) => println!("mirror        {mirror} (last error: {e})"),
        _ => println!("mirror        {mirror}"),
    }
    println!("namespaces    {}", s.namespaces_total);
    for w in &s.warnings {
        println!("WARNING       {w}");
    }
    if s.namespaces.is_empty() {
        return;
    }
    println!();
    println!("{}", table::render(&namespace_table(&s.namespaces)));
}

/// `status`'s table: one row per counter of each namespace (one for a namespace
/// that could not be verified), its state in the last column.
fn namespace_table(namespaces: &[NamespaceStatus]) -> comfy_table::Table {
    let mut t = table::new(
        &[
            "NAMESPACE",
            "KIND",
            "GRANTED",
            "LEASE_START",
            "LEASE_END",
            "HEADROOM",
            "STATE",
        ],
        &[2, 3, 4, 5],
    );
    for ns in namespaces {
        let name = ns.fork.clone().unwrap_or_else(|| "primary".into());
        let state = match (&ns.error, &ns.merged_into, ns.dropped) {
            (Some(e), _, _) => format!("unavailable: {}", table::one_line(e)),
            (None, Some(into), _) => format!("merged into {into}"),
            (None, None, true) => "dropped".into(),
            (None, None, false) => "live".into(),
        };
        if ns.counters.is_empty() {
            // Not verified: its counters are not reported.
            let mut row = vec![name.clone()];
            row.extend(std::iter::repeat_n("-".to_string(), 5));
            row.push(state.clone());
            t.add_row(row);
        }
        for c in &ns.counters {
            t.add_row([
                name.clone(),
                c.kind.as_str().into(),
                c.granted.to_string(),
                c.lease_start.to_string(),
                c.lease_end.to_string(),
                c.headroom.to_string(),
                state.clone(),
            ]);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use idalloc_client::protocol::CounterStatus;

    use super::*;

    const UUID: &str = "0190b6f2-7c1e-7a4b-9c3d-5e6f70819203";
    const ULID: &str = "01J2VF4Z0Y8Q3R5S7T9V1W3X5Z";

    fn fork(fork: &str, dropped: bool, error: Option<&str>) -> ForkInfo {
        ForkInfo {
            fork: fork.into(),
            parent: (fork == ULID).then(|| UUID.into()),
            next_vid: 123_456_789_012,
            next_eid: 5,
            floor_vid: 0,
            floor_eid: 0,
            created: false,
            dropped,
            merged_into: None,
            error: error.map(Into::into),
        }
    }

    /// The README's example, byte for byte: keys sorted, the kind spelled as typed.
    #[test]
    fn alloc_json_is_the_documented_line() {
        let r = IdRange {
            start: 0,
            end: 1000,
        };
        let v = serde_json::to_value(Reserved {
            range: r,
            count: r.len(),
            kind: Kind::Eid,
            fork: None,
        })
        .unwrap();
        assert_eq!(
            v.to_string(),
            r#"{"count":1000,"end":1000,"fork":null,"kind":"eid","start":0}"#
        );
    }

    /// `fork list --json` has every key of a bootstrap's reply but `created`.
    #[test]
    fn listed_forks_are_fork_info_without_created() {
        let f = fork(ULID, true, Some("broken"));
        let mut info = serde_json::to_value(&f).unwrap();
        info.as_object_mut().unwrap().remove("created");
        assert_eq!(serde_json::to_value(ListedFork::from(&f)).unwrap(), info);
    }

    #[test]
    fn fork_list_columns_fit_every_row() {
        let forks = [
            fork(ULID, false, None),
            fork(UUID, true, None),
            fork(
                UUID,
                false,
                Some("its manifest cannot be parsed\nrepair it"),
            ),
        ];
        assert_eq!(
            table::render(&fork_table(&forks)),
            "\
FORK                                  PARENT                                    NEXT_VID  NEXT_EID  STATE
01J2VF4Z0Y8Q3R5S7T9V1W3X5Z            0190b6f2-7c1e-7a4b-9c3d-5e6f70819203  123456789012         5  live
0190b6f2-7c1e-7a4b-9c3d-5e6f70819203  primary                               123456789012         5  dropped
0190b6f2-7c1e-7a4b-9c3d-5e6f70819203  primary                                          -         -  unavailable: its manifest cannot be parsed repair it"
        );
    }

    #[test]
    fn status_shows_a_dropped_fork_in_its_own_column() {
        let counter = |kind, granted| CounterStatus {
            kind,
            granted,
            lease_start: 0,
            lease_end: 1_000_000,
            headroom: 1_000_000 - granted,
        };
        let ns = |fork: Option<&str>, dropped, error: Option<&str>| NamespaceStatus {
            fork: fork.map(Into::into),
            dropped,
            merged_into: None,
            counters: if error.is_some() {
                Vec::new()
            } else {
                vec![counter(Kind::Vid, 11), counter(Kind::Eid, 0)]
            },
            error: error.map(Into::into),
        };
        let namespaces = [
            ns(None, false, None),
            ns(Some(UUID), true, None),
            ns(Some(ULID), false, Some("the store is unreachable")),
        ];
        let text = table::render(&namespace_table(&namespaces));
        assert_eq!(
            text,
            "\
NAMESPACE                             KIND  GRANTED  LEASE_START  LEASE_END  HEADROOM  STATE
primary                               vid        11            0    1000000    999989  live
primary                               eid         0            0    1000000   1000000  live
0190b6f2-7c1e-7a4b-9c3d-5e6f70819203  vid        11            0    1000000    999989  dropped
0190b6f2-7c1e-7a4b-9c3d-5e6f70819203  eid         0            0    1000000   1000000  dropped
01J2VF4Z0Y8Q3R5S7T9V1W3X5Z            -           -            -          -         -  unavailable: the store is unreachable"
        );
        // What a script does with it: `awk '$7 == "dropped" { print $1 }'`.
        let dropped: Vec<&str> = text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[6] == "dropped").then_some(f[0])
            })
            .collect();
        assert_eq!(dropped, [UUID, UUID]);
    }
}
