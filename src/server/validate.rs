//! The one validation of a configuration: start-up, `idallocd check-config` and a
//! SIGHUP reload all call [`validate`], so that "valid" means "will start" and a
//! reload never accepts what a restart would refuse.
//!
//! It covers what can be known without touching the data directory, the object
//! store or the network beyond name resolution: every key ([`Config::resolve`]),
//! the object-store URL and options as the backend's builder reads them, and the
//! loopback rule of each configured `tcp:`/`tls:` listener, on every address its
//! host resolves to (the rule [`super::listen`] applies again when it binds).

use std::net::{SocketAddr, ToSocketAddrs};

use super::config::{Config, ConfigError, Environment, Settings};
use super::listen::{self, ListenError};
use crate::engine::{OpenError, StoreHandle};
use idalloc_client::endpoint::Endpoint;

/// Why a configuration would not start. One line each, naming the key, URL or
/// endpoint at fault.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    /// A key is missing, misspelt or out of range.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The object-store URL or its options are refused by the backend's builder.
    #[error(transparent)]
    Store(#[from] OpenError),
    /// A listener breaks the loopback rule or its host does not resolve.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// A `tcp:`/`tls:` listener's host resolves to no address.
    #[error("config key `listen`: cannot resolve {endpoint}: {reason}")]
    Resolve {
        /// The endpoint as configured.
        endpoint: String,
        /// The resolver's message.
        reason: String,
    },
}

/// Validate `config` in `env` exactly as start-up does, into the [`Settings`] the
/// server runs on. Blocking: it may resolve listener host names.
pub fn validate(config: &Config, env: &Environment) -> Result<Settings, ValidateError> {
    let settings = config.resolve(env)?;
    // The store is built as start-up builds it (scheme, options through the
    // backend's builder), without connecting or creating anything.
    StoreHandle::check_url(&settings.store_url, &settings.store_options)?;
    for endpoint in &settings.listen {
        let (host_port, tls) = match endpoint {
            Endpoint::Unix(_) => continue,
            Endpoint::Tcp(hp) => (hp, false),
            Endpoint::Tls(hp) => (hp, true),
        };
        let shown = endpoint.to_string();
        let addrs: Vec<SocketAddr> = host_port
            .to_socket_addrs()
            .map_err(|e| ValidateError::Resolve {
                endpoint: shown.clone(),
                reason: e.to_string(),
            })?
            .collect();
        if addrs.is_empty() {
            return Err(ValidateError::Resolve {
                endpoint: shown,
                reason: "the host name resolves to no address".into(),
            });
        }
        listen::check_loopback(&shown, &addrs, settings.allow_remote, tls)?;
    }
    Ok(settings)
}
