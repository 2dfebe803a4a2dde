//! `idallocd`: the id allocation daemon. Parses the command line and the config file,
//! sets up logging and signals, and runs [`idalloc::server::run`].

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use idalloc::server::config::LogFormat;
use idalloc::server::{self, Config, Environment};
use idalloc::Endpoint;
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

Flags override the config file. SIGTERM or SIGINT stops it gracefully (requests in
flight are answered, manifests lowered to what was granted); a second signal exits at
once. The documented config with every key and default is config/idallocd.toml.";

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
    /// Endpoint to serve on, `unix:PATH` or `tcp:HOST:PORT`; repeat for several.
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, cause chain included: what was wrong and where.
            eprintln!("idallocd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let env = Environment::from_process();
    if let Some(Command::CheckConfig { file }) = &cli.command {
        let effective = Config::load(file)?.effective(&env)?;
        // The store is built as start-up builds it (scheme, options through the
        // backend's builder), without connecting or creating anything.
        let settings = effective.resolve(&env)?;
        idalloc::engine::StoreHandle::check_url(&settings.store_url, &settings.store_options)
            .with_context(|| format!("{}", file.display()))?;
        print!("{}", effective.to_toml_redacted());
        eprintln!("idallocd: {} is valid", file.display());
        return Ok(());
    }
    let mut config = match &cli.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(d) = cli.data_dir {
        config.data_dir = Some(d);
    }
    if !cli.listen.is_empty() {
        config.listen = Some(cli.listen.iter().map(ToString::to_string).collect());
    }
    if let Some(u) = cli.object_store {
        config.object_store.url = Some(u);
    }
    let settings = config.resolve(&env)?;
    init_logging(&settings.log_level, settings.log_format);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.worker_threads)
        .enable_all()
        .thread_name("idallocd")
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        watch_signals(shutdown.clone())?;
        server::run(settings, shutdown).await?;
        Ok(())
    })
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

fn init_logging(level: &str, format: LogFormat) {
    let (mut filter, effective) = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(f) => (f, std::env::var("RUST_LOG").unwrap_or_default()),
        Err(_) => (tracing_subscriber::EnvFilter::new(level), level.to_string()),
    };
    // tarpc opens an info-level span for every request; with no event inside it,
    // the span only costs (~25 % of the request path's user CPU, docs/performance.md).
    // A filter that does not name tarpc keeps tarpc's warnings and errors only.
    if !names_tarpc(&effective) {
        filter = filter.add_directive("tarpc=warn".parse().expect("a valid directive"));
    }
    // systemd sets JOURNAL_STREAM when stderr goes to the journal, which timestamps
    // every line itself and shows escape codes literally.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = colour(
        format,
        std::io::stderr().is_terminal(),
        journald,
        std::env::var_os("NO_COLOR"),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// Whether log lines are coloured: `auto` colours a terminal, unless the journal
/// takes stderr or a non-empty `NO_COLOR` is set (https://no-color.org).
fn colour(
    format: LogFormat,
    terminal: bool,
    journald: bool,
    no_color: Option<std::ffi::OsString>,
) -> bool {
    match format {
        LogFormat::Auto => terminal && !journald && no_color.is_none_or(|v| v.is_empty()),
        LogFormat::Plain => false,
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
