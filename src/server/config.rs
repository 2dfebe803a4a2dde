//! The daemon's TOML configuration: what the file may say, its defaults, and how it
//! is turned into validated [`Settings`].
//!
//! Two layers, because several defaults depend on the environment (systemd's
//! `$STATE_DIRECTORY` / `$RUNTIME_DIRECTORY`) and on other keys (the socket and the
//! mirror live in the data directory): [`Config`] is the file as written, with
//! `None` for "use the default"; [`Config::resolve`] fills those in and validates
//! every value into [`Settings`], which is what the server runs on. Every error
//! names the key at fault, so an operator can fix the file without reading code.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;
use idalloc_client::endpoint::Endpoint;

// One definition each, shared with idallocctl's and the client library's default
// endpoint: the socket a writer looks for is the one the daemon makes.
use idalloc_client::client::{DEFAULT_DATA_DIR, SOCKET_FILE_NAME as DEFAULT_SOCKET_NAME};
/// Upper bound of `max_frame_bytes`: larger request frames are never needed (a
/// request is a few fork ids) and would only let a client make the daemon buffer more.
pub const MAX_REQUEST_FRAME_LIMIT: usize = 16 << 20;

/// Keys that earlier versions accepted and this one refuses, each with what to do.
/// Refused like any unknown key (a daemon never ignores a line of its config), but
/// with a message that says why the key went.
const REMOVED_KEYS: &[(&str, &str)] = &[(
    "busy_poll",
    "was removed: the daemon no longer busy-polls (it cost a busy host more than it gained, docs/performance.md); delete the line",
)];

/// The configuration file as written. `deny_unknown_fields` everywhere: a misspelt
/// key is an error that names it, not a silently ignored setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of the local (sled) state. Default: `$STATE_DIRECTORY` if set, else
    /// `./idallocd-data`.
    pub data_dir: Option<PathBuf>,
    /// Endpoints to serve on (`unix:PATH`, `tcp:HOST:PORT` on loopback, `tls:HOST:PORT`). Default: the unix socket
    /// `idallocd.sock` in `$RUNTIME_DIRECTORY` if set, else in the data directory.
    pub listen: Option<Vec<String>>,
    /// Permission bits of unix sockets the daemon creates, in octal. Default `"0660"`.
    pub socket_mode: String,
    /// Allow listeners on non-loopback addresses. Only `tls:` listeners may use
    /// it: `true` without a `[tls]` section is refused, and plain `tcp:` stays on
    /// loopback whatever this says.
    pub allow_remote: bool,
    /// Most client connections served at once; further clients wait in the backlog.
    pub max_connections: usize,
    /// Most of those `max_connections` one identity may hold (one uid, one
    /// certificate name, or plain TCP as a whole); more are refused with the
    /// reason. Default 256.
    pub max_connections_per_identity: usize,
    /// TLS handshakes in progress at once, on slots of their own: a peer that has
    /// not yet shown a certificate never holds one of `max_connections`.
    /// Default 64; past it, TLS clients wait in the backlog.
    pub max_handshakes: usize,
    /// A connection with no request for this long is closed (the client library
    /// redials when it next needs one). Default `"5m"`; `"0s"` keeps idle
    /// connections open.
    pub idle_timeout: String,
    /// Threads of the async runtime that serves connections. Default 1, which is
    /// tokio's single-threaded runtime: a request needs microseconds of CPU, each
    /// group of reservations is flushed on that thread, and every extra worker adds
    /// cross-thread wake-ups per request (docs/performance.md).
    pub worker_threads: usize,
    /// Most requests one connection may have in flight; more get an error reply.
    pub max_in_flight_per_connection: usize,
    /// Largest request frame accepted, in bytes; a larger one closes the connection.
    pub max_frame_bytes: usize,
    /// How long shutdown waits for requests in flight before closing connections.
    pub shutdown_timeout: String,
    /// Where the kernel boot id is read (tests point it elsewhere to fake a reboot).
    pub boot_id_path: PathBuf,
    /// sled's page cache, in bytes.
    pub sled_cache_bytes: u64,
    /// Lease and reservation sizes.
    pub allocation: AllocationConfig,
    /// The durable tier.
    pub object_store: ObjectStoreConfig,
    /// The Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Who may do what (roles).
    pub access: AccessConfig,
    /// TLS listeners: certificate, key, client CA, certificate names to roles.
    pub tls: Option<super::tls::TlsConfig>,
}

/// A user or group as `[access]` takes it: a name or a number, in TOML as a
/// string (`"graphdb"`, `"1001"`) or an integer (`1001`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NameOrId {
    /// A number.
    Id(u32),
    /// A name, or a number in a string.
    Name(String),
}

impl NameOrId {
    fn text(&self) -> String {
        match self {
            NameOrId::Id(n) => n.to_string(),
            NameOrId::Name(s) => s.clone(),
        }
    }
}

/// `[access]`: the writer and admin roles of unix-socket peers (by uid or group,
/// names or numbers), and the role of plain TCP connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Admins besides root and (unless `own_uid_is_admin = false`) the
    /// daemon's own user.
    pub admin_uids: Vec<NameOrId>,
    /// Groups whose members are admins.
    pub admin_groups: Vec<NameOrId>,
    /// Writers.
    pub writer_uids: Vec<NameOrId>,
    /// Groups whose members are writers. Default: the daemon's own group, which
    /// owns the socket it creates (set `SocketGroup=` and list it here under
    /// socket activation).
    pub writer_groups: Vec<NameOrId>,
    /// Whether the daemon's own uid is an admin (default true). Set false
    /// where writers run as that uid too (a single-uid container), or they
    /// would all be admins.
    pub own_uid_is_admin: bool,
    /// Role of plain (loopback) TCP connections, which carry no identity, so
    /// every local user who can reach the port gets it: `"writer"` (default) or
    /// `"admin"` (only where every local user may give ids back and drop forks).
    pub tcp_role: String,
}

impl AccessConfig {
    fn resolve(&self) -> Result<super::access::AccessPolicy, ConfigError> {
        use super::access::{own_gid, resolve_group, resolve_user, Role};
        let users = |key: &'static str, v: &[NameOrId]| {
            v.iter()
                .map(|u| resolve_user(&u.text()).map_err(|e| invalid(key, e)))
                .collect::<Result<std::collections::BTreeSet<u32>, _>>()
        };
        let groups = |key: &'static str, v: &[NameOrId]| {
            v.iter()
                .map(|g| resolve_group(&g.text()).map_err(|e| invalid(key, e)))
                .collect::<Result<std::collections::BTreeSet<u32>, _>>()
        };
        let mut writer_gids = groups("access.writer_groups", &self.writer_groups)?;
        if self.writer_groups.is_empty() {
            writer_gids.insert(own_gid());
        }
        Ok(super::access::AccessPolicy {
            admin_uids: users("access.admin_uids", &self.admin_uids)?,
            own_uid_is_admin: self.own_uid_is_admin,
            admin_gids: groups("access.admin_groups", &self.admin_groups)?,
            writer_uids: users("access.writer_uids", &self.writer_uids)?,
            writer_gids,
            tcp_role: match self.tcp_role.as_str() {
                "admin" => Role::Admin,
                "writer" => Role::Writer,
                other => {
                    return Err(invalid(
                        "access.tcp_role",
                        format!("{other:?} is not \"admin\" or \"writer\""),
                    ))
                }
            },
        })
    }
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            admin_uids: vec![],
            admin_groups: vec![],
            writer_uids: vec![],
            writer_groups: vec![],
            own_uid_is_admin: true,
            tcp_role: "writer".into(),
        }
    }
}

/// `[allocation]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AllocationConfig {
    /// Ids per object-store lease (bounds the gap when the data directory is lost).
    pub lease_size: u64,
    /// Largest `count` one reservation may ask for.
    pub max_count: u64,
    /// Fraction of a lease used before the next one is taken in the background.
    pub prefetch_at: f64,
    /// Leases that run out sooner than this grow (doubling, up to 16 x
    /// `lease_size`); `"0s"` keeps every lease at `lease_size`.
    pub lease_min_life: String,
    /// `"namespace"` (each namespace counts on its own) or `"tree"` (one sequence
    /// for the primary and every fork: ids unique across the fork tree).
    pub fork_ids: idalloc_client::protocol::ForkIds,
}

/// `[object_store]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectStoreConfig {
    /// Root URL. Default: `file://<data_dir>/mirror`.
    pub url: Option<String>,
    /// Time-out of one object-store call.
    pub timeout: String,
    /// Retries of a transient object-store error.
    pub retries: u32,
    /// First backoff between retries (doubles each time).
    pub backoff: String,
    /// After a failed lease, fail fast with `Unavailable` for this long.
    pub unavailable_cooldown: String,
    /// Builder options passed to the store (`aws_endpoint`, `aws_access_key_id`, ...).
    pub options: BTreeMap<String, String>,
    /// Multi-writer stores: probe the conditional writes at start-up and refuse a
    /// store that lets two racing writers win (`idallocd store-check` is the full probe).
    pub startup_check: bool,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `HOST:PORT` of the Prometheus endpoint; off when absent.
    pub listen: Option<String>,
    /// Serve the (unauthenticated, read-only) endpoint on a non-loopback
    /// address. Default false: such an address is refused.
    pub allow_remote: bool,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `idalloc=debug,info`, ...). `RUST_LOG` overrides it.
    /// Unless the filter names `tarpc`, `tarpc=warn` is added: tarpc's per-request
    /// info spans cost CPU on every request and carry nothing to read.
    pub level: String,
    /// `auto` (colour on a terminal, plain otherwise and under journald), `plain`,
    /// `color`, or `json` (one JSON object a line).
    pub format: LogFormat,
}

/// How log lines are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Colour on a terminal; plain (and without timestamps under journald) otherwise.
    Auto,
    /// Never colour.
    Plain,
    /// Always colour.
    Color,
    /// One JSON object a line on stderr (timestamp, level, target, fields), for
    /// log shippers on hosts without journald; wins over the journal too.
    Json,
}

/// The level names a `[log] level` directive may be (as `tracing` spells them).
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Refuse a `[log] level` that `tracing` would parse into something nobody meant.
/// A bare word that is not a level is a *target* to `EnvFilter` (`wran` enables
/// target `wran` and nothing else), which silences the daemon: here a bare word
/// must be a level, and a target is spelt `TARGET=LEVEL`.
fn check_log_filter(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("{level:?} is not a tracing filter: {e}"))?;
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // `target[span{field}]=level` and `[span]` forms carry their own syntax.
        if directive.contains('=') || directive.contains('[') {
            continue;
        }
        let numeric = matches!(directive, "0" | "1" | "2" | "3" | "4" | "5");
        if !numeric && !LOG_LEVELS.iter().any(|l| l.eq_ignore_ascii_case(directive)) {
            return Err(format!(
                "{directive:?} in {level:?} is not a level ({}); name a target as TARGET=LEVEL, e.g. \"idalloc=debug,info\"",
                LOG_LEVELS.join(", ")
            ));
        }
    }
    Ok(())
}

impl Default for Config {
    fn default() -> Self {
        let engine = EngineConfig::default();
        Config {
            data_dir: None,
            listen: None,
            socket_mode: "0660".into(),
            allow_remote: false,
            max_connections: 1024,
            max_connections_per_identity: 256,
            max_handshakes: 64,
            idle_timeout: "5m".into(),
            worker_threads: 1,
            max_in_flight_per_connection: 128,
            max_frame_bytes: 65536,
            shutdown_timeout: "10s".into(),
            boot_id_path: engine.boot_id_path,
            sled_cache_bytes: engine.sled_cache_bytes,
            allocation: AllocationConfig::default(),
            object_store: ObjectStoreConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            access: AccessConfig::default(),
            tls: None,
        }
    }
}

impl Default for AllocationConfig {
    fn default() -> Self {
        let engine = EngineConfig::default();
        AllocationConfig {
            lease_size: engine.lease_size,
            max_count: engine.max_count,
            prefetch_at: engine.prefetch_at,
            lease_min_life: humantime::format_duration(engine.lease_min_life).to_string(),
            fork_ids: engine.fork_ids,
        }
    }
}

impl Default for ObjectStoreConfig {
    fn default() -> Self {
        let engine = EngineConfig::default();
        ObjectStoreConfig {
            url: None,
            timeout: humantime::format_duration(engine.store_timeout).to_string(),
            retries: engine.store_retries,
            backoff: humantime::format_duration(engine.store_backoff).to_string(),
            unavailable_cooldown: humantime::format_duration(engine.unavailable_cooldown)
                .to_string(),
            options: BTreeMap::new(),
            startup_check: engine.store_startup_check,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

/// Why a configuration was rejected. Each variant names the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("config file {path}: {}{message} (line {line})", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Parse {
        /// The file.
        path: String,
        /// The dotted key at fault, when it could be located.
        key: Option<String>,
        /// 1-based line of the error.
        line: usize,
        /// The parser's message.
        message: String,
    },
    /// A `[tls]` file or value cannot be used (the message names the key).
    #[error("config {0}")]
    Tls(String),
    /// A value has the right type but is not acceptable.
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// The dotted key at fault.
        key: &'static str,
        /// What is wrong and what is expected.
        reason: String,
    },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The parts of the process environment that defaults depend on. A struct rather
/// than `std::env` reads so that tests can resolve defaults without mutating the
/// (process-global) environment.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    /// systemd's `$STATE_DIRECTORY` (first entry).
    pub state_directory: Option<PathBuf>,
    /// systemd's `$RUNTIME_DIRECTORY` (first entry).
    pub runtime_directory: Option<PathBuf>,
    /// systemd's `$CREDENTIALS_DIRECTORY` (`LoadCredential=`): object-store options
    /// named after their key (`super::credentials`).
    pub credentials_directory: Option<PathBuf>,
}

impl Environment {
    /// Read from the process environment. systemd joins several directories with
    /// `:`; the first is the one this unit asked for first.
    pub fn from_process() -> Self {
        let first = |name: &str| {
            std::env::var_os(name)
                .and_then(|v| v.to_str().map(str::to_owned))
                .and_then(|v| v.split(':').next().map(str::to_owned))
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Environment {
            state_directory: first("STATE_DIRECTORY"),
            runtime_directory: first("RUNTIME_DIRECTORY"),
            credentials_directory: std::env::var_os("CREDENTIALS_DIRECTORY")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        }
    }
}

/// The validated configuration the server runs on.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Local state directory.
    pub data_dir: PathBuf,
    /// Endpoints to bind (ignored under socket activation).
    pub listen: Vec<Endpoint>,
    /// Mode bits of created unix sockets.
    pub socket_mode: u32,
    /// Whether non-loopback TCP is allowed.
    pub allow_remote: bool,
    /// Connection limit.
    pub max_connections: usize,
    /// Connection limit of one identity.
    pub max_connections_per_identity: usize,
    /// TLS handshakes in progress at once.
    pub max_handshakes: usize,
    /// Idle connections are closed after this; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Async runtime threads.
    pub worker_threads: usize,
    /// Per-connection in-flight limit.
    pub max_in_flight_per_connection: usize,
    /// Request frame limit.
    pub max_frame_bytes: usize,
    /// Bounded wait for in-flight requests at shutdown.
    pub shutdown_timeout: Duration,
    /// The engine's tunables.
    pub engine: EngineConfig,
    /// Object-store root URL (may carry credentials: never log it, log
    /// `StoreHandle::display_url`).
    pub store_url: String,
    /// Object-store builder options.
    pub store_options: Vec<(String, String)>,
    /// Prometheus endpoint, if enabled.
    pub metrics_listen: Option<SocketAddr>,
    /// Log filter.
    pub log_level: String,
    /// Log rendering.
    pub log_format: LogFormat,
    /// Roles.
    pub access: super::access::AccessPolicy,
    /// TLS listeners' certificates and role mapping, when `[tls]` is set.
    pub tls: Option<std::sync::Arc<super::tls::TlsServer>>,
}

impl Settings {
    /// What an operator must know about who gets which role, one line each, for
    /// the start-up log and `check-config`: plain TCP carries no identity, so its
    /// role is every local user's.
    pub fn access_notes(&self) -> Vec<String> {
        self.listen
            .iter()
            .filter(|e| matches!(e, Endpoint::Tcp(_)))
            .map(|e| super::access::tcp_note(&e.to_string(), self.access.tcp_role))
            .collect()
    }
}

impl Config {
    /// Parse TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            // The dotted path of the key being read when it failed (an unknown
            // key included); "." when the error is about the file as a whole.
            let path = e.path().to_string();
            let e = e.into_inner();
            // One line: toml's syntax errors come as "what\nexpected what".
            let mut message = e.message().trim().replace('\n', ": ");
            if let Some((_, why)) = REMOVED_KEYS.iter().find(|(k, _)| *k == path) {
                if message.starts_with("unknown field") {
                    message = (*why).to_string();
                }
            }
            let key = (path != ".").then_some(path);
            let line = e.span().map_or(0, |s| {
                text[..s.start.min(text.len())].matches('\n').count() + 1
            });
            ConfigError::Parse {
                path: origin.to_string(),
                key,
                line,
                message,
            }
        })
    }

    /// Read and parse a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Fill in environment-dependent defaults and validate every value.
    pub fn resolve(&self, env: &Environment) -> Result<Settings, ConfigError> {
        let data_dir = match &self.data_dir {
            Some(d) if d.as_os_str().is_empty() => return Err(invalid("data_dir", "is empty")),
            Some(d) => d.clone(),
            None => env
                .state_directory
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
        };
        let listen = match &self.listen {
            Some(list) if list.is_empty() => return Err(invalid(
                "listen",
                "is empty: give at least one endpoint (unix:PATH, tcp:HOST:PORT or tls:HOST:PORT)",
            )),
            Some(list) => list
                .iter()
                .map(|s| {
                    s.parse::<Endpoint>()
                        .map_err(|e| invalid("listen", e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => vec![Endpoint::Unix(
                env.runtime_directory
                    .clone()
                    .unwrap_or_else(|| data_dir.clone())
                    .join(DEFAULT_SOCKET_NAME),
            )],
        };
        let socket_mode = u32::from_str_radix(&self.socket_mode, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                invalid(
                    "socket_mode",
                    format!(
                        "{:?} is not an octal permission mode such as \"0660\"",
                        self.socket_mode
                    ),
                )
            })?;
        if self.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        if self.max_connections_per_identity == 0 {
            return Err(invalid(
                "max_connections_per_identity",
                "must be at least 1",
            ));
        }
        if self.max_handshakes == 0 {
            return Err(invalid("max_handshakes", "must be at least 1"));
        }
        if !(1..=1024).contains(&self.worker_threads) {
            return Err(invalid("worker_threads", "must be between 1 and 1024"));
        }
        if self.max_in_flight_per_connection == 0 {
            return Err(invalid(
                "max_in_flight_per_connection",
                "must be at least 1",
            ));
        }
        if !(1024..=MAX_REQUEST_FRAME_LIMIT).contains(&self.max_frame_bytes) {
            return Err(invalid(
                "max_frame_bytes",
                format!(
                    "{} is outside 1024..={MAX_REQUEST_FRAME_LIMIT}",
                    self.max_frame_bytes
                ),
            ));
        }
        let shutdown_timeout = duration("shutdown_timeout", &self.shutdown_timeout)?;
        let a = &self.allocation;
        let o = &self.object_store;
        let store_url = match &o.url {
            Some(u) if u.trim().is_empty() => return Err(invalid("object_store.url", "is empty")),
            Some(u) => u.clone(),
            None => format!("file://{}", absolute(&data_dir.join("mirror")).display()),
        };
        let mut store_options: Vec<(String, String)> = o
            .options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        store_options.extend(super::credentials::store_options(
            env.credentials_directory.as_deref(),
            &store_url,
            &store_options,
        )?);
        let engine = EngineConfig {
            data_dir: data_dir.clone(),
            lease_size: a.lease_size,
            max_count: a.max_count,
            prefetch_at: a.prefetch_at,
            lease_min_life: duration("allocation.lease_min_life", &a.lease_min_life)?,
            store_timeout: duration("object_store.timeout", &o.timeout)?,
            store_retries: o.retries,
            store_backoff: duration("object_store.backoff", &o.backoff)?,
            unavailable_cooldown: duration(
                "object_store.unavailable_cooldown",
                &o.unavailable_cooldown,
            )?,
            boot_id_path: self.boot_id_path.clone(),
            sled_cache_bytes: self.sled_cache_bytes,
            store_startup_check: o.startup_check,
            fork_ids: a.fork_ids,
        };
        engine
            .validate()
            .map_err(|(key, reason)| invalid(key, reason))?;
        if engine.store_timeout.is_zero() {
            return Err(invalid("object_store.timeout", "must be above zero"));
        }
        let metrics_listen = match &self.metrics.listen {
            None => None,
            Some(s) => Some(s.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    "metrics.listen",
                    format!("{s:?} is not an IP:PORT address such as \"127.0.0.1:9464\""),
                )
            })?),
        };
        if let Some(addr) = metrics_listen {
            if !addr.ip().is_loopback() && !self.metrics.allow_remote {
                return Err(invalid(
                    "metrics.listen",
                    format!("{addr} is not a loopback address and the endpoint has no authentication; set [metrics] allow_remote = true to serve it to other hosts"),
                ));
            }
        }
        check_log_filter(&self.log.level).map_err(|reason| invalid("log.level", reason))?;
        let access = self.access.resolve()?;
        let tls = match &self.tls {
            Some(t) => Some(std::sync::Arc::new(
                super::tls::TlsServer::load(t).map_err(ConfigError::Tls)?,
            )),
            None => None,
        };
        if tls.is_none() {
            if let Some(e) = listen.iter().find(|e| matches!(e, Endpoint::Tls(_))) {
                return Err(invalid(
                    "listen",
                    format!("{e} needs a [tls] section (cert, key, client_ca)"),
                ));
            }
            if self.allow_remote {
                return Err(invalid(
                    "allow_remote",
                    "true needs TLS: plain TCP is unauthenticated, so other hosts may only connect to tls:HOST:PORT listeners with a [tls] section (cert, key, client_ca)",
                ));
            }
        }
        Ok(Settings {
            tls,
            access,
            data_dir,
            listen,
            socket_mode,
            allow_remote: self.allow_remote,
            max_connections: self.max_connections,
            max_connections_per_identity: self.max_connections_per_identity,
            max_handshakes: self.max_handshakes,
            idle_timeout: Some(duration("idle_timeout", &self.idle_timeout)?)
                .filter(|d| !d.is_zero()),
            worker_threads: self.worker_threads,
            max_in_flight_per_connection: self.max_in_flight_per_connection,
            max_frame_bytes: self.max_frame_bytes,
            shutdown_timeout,
            engine,
            store_url,
            store_options,
            metrics_listen,
            log_level: self.log.level.clone(),
            log_format: self.log.format,
        })
    }

    /// This configuration with every environment-dependent default written out, as
    /// `check-config` prints it. Validates first.
    pub fn effective(&self, env: &Environment) -> Result<Config, ConfigError> {
        let s = self.resolve(env)?;
        let mut c = self.clone();
        c.data_dir = Some(s.data_dir);
        c.listen = Some(s.listen.iter().map(ToString::to_string).collect());
        c.object_store.url = Some(s.store_url);
        Ok(c)
    }

    /// Render as TOML. Option values are secrets in the common case (access keys), so
    /// they are masked: `check-config` output ends up in tickets and chat.
    pub fn to_toml_redacted(&self) -> String {
        let mut c = self.clone();
        for (k, v) in c.object_store.options.iter_mut() {
            *v = crate::engine::store::redact_option(k, v);
        }
        if let Some(url) = &c.object_store.url {
            c.object_store.url = Some(crate::engine::store::redact_url(url));
        }
        // Serialising plain structs of strings, numbers and maps cannot fail.
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn duration(key: &'static str, text: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text).map_err(|e| {
        invalid(
            key,
            format!("{text:?} is not a duration such as \"5s\" or \"250ms\": {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Environment {
        Environment::default()
    }

    #[test]
    fn parse_errors_name_the_dotted_key_on_one_line() {
        let cases = [
            ("bogus = 1\n", Some("bogus"), 1),
            (
                "\n[allocation]\nlease_sizee = 3\n",
                Some("allocation.lease_sizee"),
                3,
            ),
            (
                "[object_store.options]\naws_region = 3\n",
                Some("object_store.options.aws_region"),
                2,
            ),
            ("[tls]\ncert = 1\n", Some("tls.cert"), 2),
            ("x = [\n", None, 2),
        ];
        for (text, key, line) in cases {
            match Config::from_toml(text, "t.toml") {
                Err(e @ ConfigError::Parse { .. }) => {
                    let shown = e.to_string();
                    assert_eq!(shown.lines().count(), 1, "{shown}");
                    let ConfigError::Parse {
                        key: k, line: l, ..
                    } = e
                    else {
                        unreachable!()
                    };
                    assert_eq!(k.as_deref(), key, "{text}: {shown}");
                    assert_eq!(l, line, "{text}: {shown}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn embedded_defaults_match_design() {
        let s = Config::default().resolve(&env()).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("./idallocd-data"));
        assert_eq!(
            s.listen,
            vec![Endpoint::Unix("./idallocd-data/idallocd.sock".into())]
        );
        assert_eq!(s.socket_mode, 0o660);
        assert!(!s.allow_remote);
        assert_eq!(s.max_frame_bytes, 65536);
        assert!(s.store_url.starts_with("file:///"), "{}", s.store_url);
        assert!(
            s.store_url.ends_with("/idallocd-data/mirror"),
            "{}",
            s.store_url
        );
        assert_eq!(s.metrics_listen, None);
        assert_eq!(s.engine.lease_size, 1_000_000);
    }

    #[test]
    fn store_options_come_from_systemd_credentials_too() {
        let creds = tempfile::tempdir().unwrap();
        std::fs::write(creds.path().join("aws_secret_access_key"), "s3cr3t\n").unwrap();
        let e = Environment {
            credentials_directory: Some(creds.path().into()),
            ..Environment::default()
        };
        let c = Config::from_toml(
            "[object_store]\nurl = \"s3://bucket/db1\"\n[object_store.options]\naws_region = \"eu-west-1\"\n",
            "t.toml",
        )
        .unwrap();
        let s = c.resolve(&e).unwrap();
        assert_eq!(
            s.store_options,
            vec![
                ("aws_region".to_string(), "eu-west-1".to_string()),
                ("aws_secret_access_key".to_string(), "s3cr3t".to_string()),
            ]
        );
        // The printed configuration never carries it.
        assert!(!c
            .effective(&e)
            .unwrap()
            .to_toml_redacted()
            .contains("s3cr3t"));
    }

    #[test]
    fn systemd_directories_are_the_defaults() {
        let e = Environment {
            state_directory: Some("/var/lib/idallocd".into()),
            runtime_directory: Some("/run/idallocd".into()),
            credentials_directory: None,
        };
        let s = Config::default().resolve(&e).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("/var/lib/idallocd"));
        assert_eq!(
            s.listen,
            vec![Endpoint::Unix("/run/idallocd/idallocd.sock".into())]
        );
        assert_eq!(s.store_url, "file:///var/lib/idallocd/mirror");
    }

    /// A key this version removed is refused as any unknown key is, with the
    /// reason and what to do instead of the list of expected keys.
    #[test]
    fn a_removed_key_is_refused_with_its_reason() {
        let err =
            Config::from_toml("worker_threads = 1\nbusy_poll = \"0s\"\n", "x.toml").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("`busy_poll`")
                && msg.contains("removed")
                && msg.contains("delete the line")
                && msg.contains("line 2")
                && !msg.contains('\n'),
            "{msg}"
        );
    }

    #[test]
    fn metrics_leave_loopback_only_when_allowed() {
        let c = Config::from_toml(
            "[metrics]\nlisten = \"0.0.0.0:9464\"\nallow_remote = true\n",
            "x.toml",
        )
        .unwrap();
        assert!(c.resolve(&env()).unwrap().metrics_listen.is_some());
        let c = Config::from_toml("[metrics]\nlisten = \"127.0.0.1:9464\"\n", "x.toml").unwrap();
        assert!(c.resolve(&env()).is_ok());
    }

    #[test]
    fn access_takes_names_and_numbers() {
        let c = Config::from_toml(
            "[access]\nwriter_uids = [65534, \"1001\", \"root\"]\nadmin_groups = [0]\nown_uid_is_admin = false\n",
            "x.toml",
        )
        .unwrap();
        let p = c.resolve(&env()).unwrap().access;
        assert_eq!(p.writer_uids, [0, 1001, 65534].into());
        assert_eq!(p.admin_gids, [0].into());
        assert!(!p.own_uid_is_admin);
        let err = Config::from_toml("[access]\nwriter_uids = [\"no-such-user-x\"]\n", "x.toml")
            .unwrap()
            .resolve(&env())
            .unwrap_err();
        assert!(err.to_string().contains("access.writer_uids"), "{err}");
    }

    #[test]
    fn unknown_key_names_itself() {
        let err = Config::from_toml("[allocation]\nlease_sise = 5\n", "x.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("allocation.lease_sise"), "{msg}");
        assert!(msg.contains("x.toml"), "{msg}");
        let err = Config::from_toml("listn = []\n", "x.toml").unwrap_err();
        assert!(err.to_string().contains("`listn`"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = Config::from_toml("max_connections = \"many\"\n", "x.toml").unwrap_err();
        assert!(err.to_string().contains("`max_connections`"), "{err}");
    }

    #[test]
    fn fork_ids_is_namespace_or_tree() {
        let c = Config::from_toml("[allocation]\nfork_ids = \"tree\"\n", "x.toml").unwrap();
        assert_eq!(
            c.resolve(&env()).unwrap().engine.fork_ids,
            idalloc_client::protocol::ForkIds::Tree
        );
        let c = Config::from_toml("", "x.toml").unwrap();
        assert_eq!(
            c.resolve(&env()).unwrap().engine.fork_ids,
            idalloc_client::protocol::ForkIds::Namespace
        );
        let err = Config::from_toml("[allocation]\nfork_ids = \"forest\"\n", "x.toml").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("allocation.fork_ids") && msg.contains("tree") && !msg.contains('\n'),
            "{msg}"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("socket_mode = \"0999\"", "socket_mode"),
            ("listen = [\"http://x\"]", "listen"),
            ("listen = []", "listen"),
            ("max_frame_bytes = 10", "max_frame_bytes"),
            ("max_connections = 0", "max_connections"),
            ("worker_threads = 0", "worker_threads"),
            ("shutdown_timeout = \"soon\"", "shutdown_timeout"),
            ("[allocation]\nprefetch_at = 1.5", "allocation.prefetch_at"),
            // The engine refused 1.0 after check-config accepted it: one range now.
            ("[allocation]\nprefetch_at = 1.0", "allocation.prefetch_at"),
            ("[allocation]\nprefetch_at = 0.0", "allocation.prefetch_at"),
            ("[allocation]\nmax_count = 0", "allocation.max_count"),
            ("[allocation]\nlease_size = 0", "allocation.lease_size"),
            (
                "[allocation]\nlease_min_life = \"soon\"",
                "allocation.lease_min_life",
            ),
            (
                "[object_store]\ntimeout = \"5 parsecs\"",
                "object_store.timeout",
            ),
            ("[metrics]\nlisten = \"localhost\"", "metrics.listen"),
            ("[metrics]\nlisten = \"0.0.0.0:9464\"", "metrics.listen"),
            ("idle_timeout = \"later\"", "idle_timeout"),
            ("max_handshakes = 0", "max_handshakes"),
            (
                "max_connections_per_identity = 0",
                "max_connections_per_identity",
            ),
            ("[log]\nlevel = \"info,[[\"", "log.level"),
            // A bare word is a target to EnvFilter: "wran" would silence everything.
            ("[log]\nlevel = \"wran\"", "log.level"),
            ("[log]\nlevel = \"idalloc=debug,wran\"", "log.level"),
            ("[log]\nlevel = \"idalloc=wran\"", "log.level"),
        ];
        for (text, key) in cases {
            let c = Config::from_toml(text, "x.toml").unwrap();
            let err = c.resolve(&env()).unwrap_err();
            assert!(
                err.to_string().contains(&format!("`{key}`")),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn log_levels_and_targets_are_accepted() {
        for level in [
            "info",
            "WARN",
            "off",
            "idalloc=debug,info",
            "info,tarpc=warn",
            "3",
            "[conn]=debug",
        ] {
            check_log_filter(level).unwrap_or_else(|e| panic!("{level}: {e}"));
        }
    }

    #[test]
    fn shipped_example_file_documents_the_defaults() {
        let text = include_str!("../../config/idallocd.toml");
        let parsed = Config::from_toml(text, "config/idallocd.toml").unwrap();
        assert_eq!(parsed, Config::default());
        // Every key must appear (commented) in the file, so the file is a complete
        // reference. Uncommenting each line must parse to the same defaults.
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if looks_like_setting(rest) => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut full = Config::from_toml(&uncommented, "uncommented").unwrap();
        // [tls] has no default (no TLS without it): the file shows an example
        // whose optional keys are at their defaults.
        let example = full.tls.take().expect("the file documents [tls]");
        assert_eq!(example.writer_names, ["*"]);
        assert!(example.admin_names.is_empty());
        assert_eq!(example.handshake_timeout, "10s");
        assert_eq!(example.name_field, super::super::tls::NameField::Cn);
        assert!(example.crl.is_some(), "the file shows where a CRL goes");
        let mut expected = Config::default().effective(&env()).unwrap();
        // The mirror URL's default is absolute (derived from data_dir), so the file
        // describes it in prose rather than as a setting line.
        expected.object_store.url = None;
        assert_eq!(full, expected);
    }

    fn looks_like_setting(s: &str) -> bool {
        s.starts_with('[') || s.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
    }

    #[test]
    fn redaction_hides_credentials_and_only_them() {
        use crate::engine::store::redact_url;
        let shown = redact_url("s3://key:secret@bucket/p?X-Amz-Signature=abc");
        assert!(
            !shown.contains("secret") && !shown.contains("abc") && shown.contains("bucket/p"),
            "{shown}"
        );
        assert_eq!(redact_url("file:///a@b/c"), "file:///a@b/c");
        let mut c = Config::default();
        c.object_store
            .options
            .insert("aws_secret_access_key".into(), "hunter2".into());
        c.object_store
            .options
            .insert("aws_region".into(), "eu-west-3".into());
        c.object_store.url = Some("az://container/p?sv=2022&sig=s3cr3t".into());
        let text = c.to_toml_redacted();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cr3t"),
            "{text}"
        );
        assert!(
            text.contains("eu-west-3"),
            "the region is not a secret: {text}"
        );
    }
}
