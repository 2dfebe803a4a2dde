//! Endpoint addresses: `unix:PATH` or `tcp:HOST:PORT`, as the CLI and config spell them.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where the daemon listens or a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix domain socket path.
    Unix(PathBuf),
    /// A TCP `host:port` (host may be a name, an IPv4 or a bracketed IPv6 address).
    Tcp(String),
}

/// Why an endpoint string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid endpoint {text:?}: {reason} (expected unix:PATH or tcp:HOST:PORT)")]
pub struct ParseEndpointError {
    text: String,
    reason: &'static str,
}

impl FromStr for Endpoint {
    type Err = ParseEndpointError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseEndpointError {
            text: s.to_string(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(err("empty socket path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(hp) = s.strip_prefix("tcp:") {
            let (host, port) = hp.rsplit_once(':').ok_or_else(|| err("missing :PORT"))?;
            if host.is_empty() {
                return Err(err("empty host"));
            }
            port.parse::<u16>()
                .map_err(|_| err("port is not a number in 0..=65535"))?;
            return Ok(Endpoint::Tcp(hp.to_string()));
        }
        Err(err("unknown scheme"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(hp) => write!(f, "tcp:{hp}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_schemes() {
        assert_eq!(
            "unix:/run/x.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/x.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:7000".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:7000".into())
        );
        assert_eq!(
            "tcp:[::1]:7000".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("[::1]:7000".into())
        );
        for bad in ["", "unix:", "tcp:host", "tcp::1", "http://x", "tcp:h:99999"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }
}
