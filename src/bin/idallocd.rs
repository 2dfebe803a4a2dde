//! `idallocd`: the id allocation daemon. Parses the command line and the config file,
//! sets up logging and signals, and runs [`idalloc::server::run`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use idalloc::server::config::LogFormat;
use idalloc::server::{self, Config, Environment};
use idalloc_client::Endpoint;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

const LONG_ABOUT: &str = "\
idallocd hands out dense u64 ids (vertex ids and edge ids) to the writers of a graph
database and of its forks, over tarpc on a unix socket (default) or loopback TCP.
Ids are never handed out twice: each reservation is on local disk and below the
object-store ceiling before its reply leaves the daemon.

With no arguments it runs on embedded defaults: data in ./idallocd-data (or systemd's
$STATE_DIRECTORY), the socket idallocd.sock in it (or in $RUNTIME_DIRECTORY), the
manifests mirrored at file://<data dir>/mirror.

Examples:
  idallocd
  idallocd --config /etc/idallocd/db1.toml
  idallocd --data-dir /var/lib/idallocd/db1 --listen unix:/run/idallocd/db1.sock \\
           --listen tcp:127.0.0.1:7411 --object-store s3://bucket/graphs/db1
  idallocd check-config /etc/idallocd/db1.toml
  idallocd store-check --config /etc/idallocd/db1.toml

Flags override the config file. SIGTERM or SIGINT stops it gracefully (requests in
flight are answered, unused leases of its own given back); a second signal exits at
once. SIGHUP (systemctl reload) re-reads the config file: the [log] level is applied
at once and the [tls] certificate, key and client CA files are read again; other
changes are logged as needing a restart. Under systemd a reload is bracketed by
RELOADING=1 and READY=1, so with Type=notify-reload `systemctl reload` waits for it. The documented config with every key and default is config/idallocd.toml.";

#[derive(Parser, Debug)]
#[command(name = "idallocd", version, about = "The idalloc id allocation daemon", long_about = LONG_ABOUT)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// TOML config file (every key optional; see config/idallocd.toml).
    #[arg(long, short = 'c', value_name = "FILE", env = "IDALLOCD_CONFIG")]
    config: Option<PathBuf>,
    /// Directory of the local state; overrides `data_dir`.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Endpoint to serve on, `unix:PATH`, `tcp:HOST:PORT` (loopback) or `tls:HOST:PORT` (needs [tls]); repeat for several.
    /// Overrides `listen`.
    #[arg(long = "listen", value_name = "ADDR")]
    listen: Vec<Endpoint>,
    /// Object-store root (`file:///p`, `memory://`, `s3://bucket/prefix`, `gs://…`,
    /// `az://…`); overrides `[object_store] url`.
    #[arg(long, value_name = "URL")]
    object_store: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a config file and print the effective configuration (defaults filled
    /// in, secrets masked) as TOML. Exits non-zero naming the bad key.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Probe the configured object store: may several daemons share it?
    ///
    /// Under a scratch prefix of the root (removed afterwards): a second create of
    /// one object must be refused; an update on a replaced version must be refused
    /// and write nothing; and in each of ROUNDS rounds, WRITERS concurrent updates
    /// on one version (each on a client of its own for s3/gs/az, bodies alternating
    /// a short line and PAYLOAD_BYTES) must have exactly one winner, whose bytes
    /// the object then holds. A probe can show a store unsafe; it cannot prove it
    /// safe, and the verdict says only what was seen. Exits 0 when nothing unsafe
    /// was seen, 1 when the store was shown unsafe, 2 when store errors left it
    /// unchecked. Reads the same config (and flags) as the daemon; touches nothing
    /// else.
    StoreCheck(StoreCheckArgs),
    /// Write the man pages into a directory: idallocd.8, idallocd-SUBCOMMAND.8 and
    /// idallocd.toml.5 (the config file, every key with its default). Install the
    /// .8 pages in man8/ and the .5 page in man5/.
    Man {
        /// Where to write them (for example a scratch directory, then install
        /// *.8 into /usr/local/share/man/man8 and *.5 into /usr/local/share/man/man5).
        dir: PathBuf,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `idallocd store-check`'s flags.
#[derive(Debug, clap::Args)]
struct StoreCheckArgs {
    /// The daemon's config file (its [object_store] section is what is probed).
    #[arg(long, short = 'c', value_name = "FILE", env = "IDALLOCD_CONFIG")]
    config: Option<PathBuf>,
    /// Probe this store URL instead of the config's.
    #[arg(long, value_name = "URL")]
    object_store: Option<String>,
    /// Race rounds.
    #[arg(long, default_value_t = idalloc::engine::store::check::ProbeSize::FULL.rounds)]
    rounds: u32,
    /// Concurrent writers per round.
    #[arg(long, default_value_t = idalloc::engine::store::check::ProbeSize::FULL.writers)]
    writers: u32,
    /// Body size, in bytes, of every other round's writes.
    #[arg(long, default_value_t = idalloc::engine::store::check::ProbeSize::FULL.payload_bytes)]
    payload_bytes: usize,
    /// Print the report as JSON (fields: docs/guarantees.md, "Is the store safe
    /// for several daemons?").
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, cause chain included: what was wrong and where.
            // Redacted: an error may quote a store URL or endpoint with its
            // credentials.
            let line = idalloc::engine::store::redact_text(&format!("{e:#}"));
            eprintln!("idallocd: error: {line}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let env = Environment::from_process();
    match &cli.command {
        None => serve(cli, &env),
        Some(Command::CheckConfig { file }) => check_config(file, &env),
        Some(Command::StoreCheck(args)) => store_check(args, &env),
        Some(Command::Man { dir }) => write_man_pages(dir),
        Some(Command::Completions { shell }) => {
            use clap::CommandFactory;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "idallocd",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

/// The daemon itself, until SIGTERM/SIGINT.
fn serve(cli: Cli, env: &Environment) -> anyhow::Result<()> {
    let config = load_config(&cli)?;
    let settings = server::validate(&config, env)?;
    let log = init_logging(&settings.log_level, settings.log_format);

    // One thread (the default) is tokio's current-thread runtime rather than a
    // work-stealing one with one worker: no request, reply or commit group then
    // crosses threads or pays for work-stealing's bookkeeping, which costs CPU per
    // reservation and throughput at high client counts (docs/performance.md).
    let mut builder = if settings.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(settings.worker_threads);
        b
    };
    let runtime = builder
        .enable_all()
        .thread_name("idallocd")
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        watch_signals(shutdown.clone())?;
        watch_reload(cli, config, log, settings.tls.clone())?;
        server::run(settings, shutdown).await?;
        Ok(())
    })
}

/// `idallocd check-config FILE`: the validation start-up runs, no other, so that
/// "valid" means "will start".
fn check_config(file: &std::path::Path, env: &Environment) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    let settings = server::validate(&config, env).with_context(|| format!("{}", file.display()))?;
    let effective = config.effective(env)?;
    print!("{}", effective.to_toml_redacted());
    for note in settings.access_notes() {
        eprintln!("idallocd: {note}");
    }
    eprintln!("idallocd: {} is valid", file.display());
    Ok(())
}

/// `idallocd store-check`: race conditional writes under a scratch prefix and
/// say what was seen; exits 1 when the store was shown unsafe, 2 when store errors
/// left it unchecked.
fn store_check(args: &StoreCheckArgs, env: &Environment) -> anyhow::Result<()> {
    use idalloc::engine::store::check::{self as store_check, Outcome, ProbeSize};
    let mut c = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(u) = &args.object_store {
        c.object_store.url = Some(u.clone());
    }
    let settings = c.resolve(env)?;
    let store =
        idalloc::engine::StoreHandle::from_url(&settings.store_url, &settings.store_options)?;
    if store.mode == idalloc_client::protocol::WriterMode::SingleWriter {
        anyhow::bail!(
            "{} is a single-writer store (no conditional update): one daemon per root, nothing to check",
            store.display_url
        );
    }
    let racers =
        store_check::racing_clients(&settings.store_url, &settings.store_options, args.writers)?;
    let size = ProbeSize {
        rounds: args.rounds,
        writers: args.writers,
        payload_bytes: args.payload_bytes,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the tokio runtime")?;
    let report = runtime.block_on(store_check::check(
        store.store.clone(),
        &racers,
        &store.display_url,
        size,
    ));
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{report}");
    }
    match report.outcome {
        Outcome::NotShownUnsafe => Ok(()),
        Outcome::Unsafe => std::process::exit(1),
        Outcome::Unchecked => std::process::exit(2),
    }
}

/// The documented config file, every key with its default: the body of
/// idallocd.toml(5).
const CONFIG_EXAMPLE: &str = include_str!("../../config/idallocd.toml");

/// What idallocd.8 ends with: the pages it refers to besides its subcommands'
/// (idallocctl(1) is written by `idallocctl man`, installed beside it).
const SEE_ALSO_8: &str = ".SH \"SEE ALSO\"\nidallocd.toml(5), idallocctl(1)\n";

/// idallocd.toml(5): what the file is and where it lives, then the shipped
/// example verbatim (every key, commented out, with its default and meaning).
fn config_page() -> String {
    let mut page = format!(
        ".TH idallocd.toml 5 \"\" \"idallocd {}\"\n",
        env!("CARGO_PKG_VERSION")
    );
    page.push_str(
        ".SH NAME\nidallocd.toml \\- configuration file of idallocd\n\
.SH SYNOPSIS\n/etc/idallocd/idallocd.toml (idallocd.service)\n.br\n\
/etc/idallocd/INSTANCE.toml (idallocd@INSTANCE.service)\n\
.SH DESCRIPTION\n\
A TOML file read by \\fBidallocd \\-\\-config\\fR FILE. Every key is optional; a missing \
key takes the default shown below. Command\\-line flags (\\-\\-data\\-dir, \\-\\-listen, \
\\-\\-object\\-store) override the file. An unknown key or a bad value is refused, \
naming the key, by start\\-up and by \\fBidallocd check\\-config\\fR FILE alike, which \
runs the same validation and prints the effective configuration.\n\
.PP\nSIGHUP (systemctl reload) reads the file again: [log] level and the [tls] files \
apply at once, other changes are logged as needing a restart.\n\
.SH FILE\nThe example shipped as /etc/idallocd/idallocd.toml, every key commented out \
with its default:\n.PP\n.nf\n",
    );
    for line in CONFIG_EXAMPLE.lines() {
        // Literal text: backslashes escaped, and a leading dot or quote is not a
        // request.
        let line = line.replace('\\', "\\e");
        if line.starts_with('.') || line.starts_with('\'') {
            page.push_str("\\&");
        }
        page.push_str(&line);
        page.push('\n');
    }
    page.push_str(".fi\n.SH \"SEE ALSO\"\nidallocd(8), idallocd\\-check\\-config(8)\n");
    page
}

/// idallocd.8 and one page per subcommand (idallocd-check-config.8, ...), which
/// idallocd.8's SUBCOMMANDS section refers to, and idallocd.toml.5, which its SEE
/// ALSO does. No page for `help`: clap's help subcommand is left out of the
/// pages, as `--help` is documented in each.
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let top = Cli::command().disable_help_subcommand(true);
    let mut pages = vec![("idallocd".to_string(), top.clone())];
    for sub in top.get_subcommands() {
        // Invoked as `idallocd SUB`: the synopsis says so.
        let sub = sub.clone().bin_name(format!("idallocd {}", sub.get_name()));
        pages.push((format!("idallocd-{}", sub.get_name()), sub));
    }
    for (name, cmd) in pages {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd)
            .title(name.clone())
            .section("8")
            .render(&mut page)?;
        if name == "idallocd" {
            page.extend_from_slice(SEE_ALSO_8.as_bytes());
        }
        let path = dir.join(format!("{name}.8"));
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let path = dir.join("idallocd.toml.5");
    std::fs::write(&path, config_page())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The config file (or the embedded defaults) with the command line's overrides.
fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(d) = &cli.data_dir {
        config.data_dir = Some(d.clone());
    }
    if !cli.listen.is_empty() {
        config.listen = Some(cli.listen.iter().map(ToString::to_string).collect());
    }
    if let Some(u) = &cli.object_store {
        config.object_store.url = Some(u.clone());
    }
    Ok(config)
}

/// SIGHUP (`systemctl reload`): read the config again; apply what can change
/// safely while running (the log filter; the whole `[tls]` section: certificate,
/// key, client CA and CRL files re-read, role names and name field), and say which other changes need a restart. A config or
/// certificate that does not load is logged and the running one kept. SIGHUP
/// never stops the daemon.
fn watch_reload(
    cli: Cli,
    mut running: Config,
    log: LogReload,
    tls: Option<std::sync::Arc<idalloc::server::tls::TlsServer>>,
) -> anyhow::Result<()> {
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            // RELOADING=1 ... READY=1 brackets the reload, whatever its outcome, so
            // that `systemctl reload` (Type=notify-reload) returns once it is done.
            server::notify::reloading();
            reload(&cli, &mut running, &log, tls.as_deref()).await;
            server::notify::ready("serving (configuration re-read on SIGHUP)");
        }
    });
    Ok(())
}

/// One SIGHUP's reload; what it did or refused is logged.
async fn reload(
    cli: &Cli,
    running: &mut Config,
    log: &LogReload,
    tls: Option<&idalloc::server::tls::TlsServer>,
) {
    let fresh = match load_config(cli) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "SIGHUP: the config file does not load; keeping the running configuration");
            return;
        }
    };
    // Listener names may be resolved: off the runtime's thread.
    let check = fresh.clone();
    let verdict = tokio::task::spawn_blocking(move || {
        server::validate(&check, &Environment::from_process()).map(drop)
    })
    .await;
    match verdict {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "SIGHUP: the config file is not valid; keeping the running configuration");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: the config check failed; keeping the running configuration");
            return;
        }
    }
    // [tls] applies whole or not at all. A section added or removed needs a
    // restart (listeners are bound at start), and is reported as such below.
    let mut tls_applied = false;
    if let (Some(tls), Some(files)) = (tls, &fresh.tls) {
        match tls.reload(files) {
            Ok(()) => {
                tls_applied = true;
                tracing::info!(
                    name_field = %files.name_field,
                    admin_names = ?files.admin_names,
                    writer_names = ?files.writer_names,
                    crl = ?files.crl,
                    "SIGHUP: TLS certificate, key and client CA reloaded, with the CRL and the role names (open connections keep theirs)"
                )
            }
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: [tls] not reloaded; keeping the running certificates and role names")
            }
        }
    }
    if fresh.log.level != running.log.level {
        match log.set_level(&fresh.log.level) {
            Ok(applied) => tracing::info!(filter = %applied, "SIGHUP: log filter reloaded"),
            Err(e) => tracing::error!(error = %e, "SIGHUP: log filter not reloaded"),
        }
    }
    let mut rest = fresh.clone();
    rest.log.level = running.log.level.clone();
    if tls_applied {
        rest.tls = running.tls.clone();
    }
    if rest != *running {
        tracing::warn!("SIGHUP: config changes other than [log] level need a restart (systemctl restart idallocd); they are not applied");
    } else {
        tracing::info!("SIGHUP: configuration reloaded");
    }
    running.log.level = fresh.log.level;
    if tls_applied {
        running.tls = fresh.tls;
    }
}

/// First SIGTERM/SIGINT: graceful shutdown. Second: exit at once, non-zero — an
/// operator pressing ^C twice means it. Installed before recovery so that a signal
/// during start-up is not the default "die mid-write".
fn watch_signals(shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping gracefully (send again to exit at once)"),
            _ = int.recv() => tracing::info!("SIGINT: stopping gracefully (send again to exit at once)"),
        }
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting at once without a clean shutdown");
        std::process::exit(130);
    });
    Ok(())
}

/// Whether a filter says anything about tarpc's own targets.
fn names_tarpc(filter: &str) -> bool {
    filter.split(',').any(|d| d.trim().starts_with("tarpc"))
}

/// The running log filter, replaceable on SIGHUP.
struct LogReload {
    handle: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
    /// `RUST_LOG` was set at start: it wins over `[log] level`, then and on reload.
    from_env: bool,
}

impl LogReload {
    /// Replace the filter with `level` (plus the tarpc default); the filter applied.
    fn set_level(&self, level: &str) -> Result<String, String> {
        if self.from_env {
            return Err(
                "RUST_LOG is set and overrides [log] level; restart without it to change the level"
                    .into(),
            );
        }
        let (filter, text) = build_filter(level)?;
        self.handle.reload(filter).map_err(|e| e.to_string())?;
        Ok(text)
    }
}

/// `level`, plus `tarpc=warn` unless the filter names tarpc: tarpc opens an
/// info-level span for every request; with no event inside it, the span only
/// costs (~25 % of the request path's user CPU when measured; git log -S tarpc=warn).
fn build_filter(level: &str) -> Result<(tracing_subscriber::EnvFilter, String), String> {
    let mut filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
    let mut text = level.to_string();
    if !names_tarpc(level) {
        filter = filter.add_directive("tarpc=warn".parse().expect("a valid directive"));
        text.push_str(",tarpc=warn");
    }
    Ok((filter, text))
}

fn init_logging(level: &str, format: LogFormat) -> LogReload {
    use tracing_subscriber::prelude::*;
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let from_env = env.is_some();
    let (filter, _) = env
        .as_deref()
        .and_then(|e| build_filter(e).ok())
        .unwrap_or_else(|| {
            build_filter(level).unwrap_or_else(|_| build_filter("info").expect("info is a filter"))
        });
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // systemd sets JOURNAL_STREAM when stderr goes to the journal: then log to the
    // journal natively (priorities per level, fields as journal fields). The
    // variable is inherited, so it counts only while stderr is that very stream.
    let journald = stderr_is_journal();
    // Asked for JSON lines: they go to stderr even under systemd (a shipper reads them).
    let journal = (journald && format != LogFormat::Json)
        .then(|| match tracing_journald::layer() {
            Ok(layer) => Some(layer.with_syslog_identifier("idallocd".into())),
            Err(e) => {
                eprintln!("idallocd: cannot reach the journal socket ({e}); logging to stderr");
                None
            }
        })
        .flatten();
    let ansi = colour(
        format,
        std::io::stderr().is_terminal(),
        journald,
        std::env::var_os("NO_COLOR"),
    );
    let plain = journal.is_none().then(|| {
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr);
        if format == LogFormat::Json {
            layer.json().flatten_event(true).boxed()
        } else if journald {
            // The journal timestamps each line itself.
            layer.without_time().boxed()
        } else {
            layer.boxed()
        }
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(plain)
        .with(journal)
        .init();
    LogReload { handle, from_env }
}

/// Whether stderr is the journal stream `JOURNAL_STREAM` names (`DEVICE:INODE`),
/// as systemd.exec(5) says to check.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(m) => dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()),
        Err(_) => false,
    }
}

/// Whether log lines are coloured: `auto` colours a terminal, unless the journal
/// takes stderr or a non-empty `NO_COLOR` is set (<https://no-color.org>).
fn colour(
    format: LogFormat,
    terminal: bool,
    journald: bool,
    no_color: Option<std::ffi::OsString>,
) -> bool {
    match format {
        LogFormat::Auto => terminal && !journald && no_color.is_none_or(|v| v.is_empty()),
        LogFormat::Plain | LogFormat::Json => false,
        LogFormat::Color => true,
    }
}

#[cfg(test)]
mod tests {
    use super::{colour, names_tarpc, LogFormat};

    #[test]
    fn no_color_turns_colour_off_on_a_terminal() {
        assert!(colour(LogFormat::Auto, true, false, None));
        assert!(!colour(LogFormat::Auto, true, false, Some("1".into())));
        assert!(colour(LogFormat::Auto, true, false, Some("".into())));
        assert!(!colour(LogFormat::Auto, true, true, None));
        assert!(!colour(LogFormat::Auto, false, false, None));
        assert!(colour(LogFormat::Color, false, false, Some("1".into())));
    }

    #[test]
    fn tarpc_spans_are_quiet_unless_asked_for() {
        assert!(!names_tarpc("info"));
        assert!(!names_tarpc("idalloc=debug,info"));
        assert!(!names_tarpc("debug"));
        assert!(names_tarpc("info,tarpc=info"));
        assert!(names_tarpc("tarpc::server=debug"));
    }
}
