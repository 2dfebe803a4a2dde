//! Endpoint addresses, as the CLI, the config and the library spell them:
//! `unix:PATH`, `tcp:HOST:PORT` (plain, loopback only) or `tls:HOST:PORT` (TLS with
//! client certificates, the only way to reach a daemon from another host).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where the daemon listens or a client connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix domain socket path.
    Unix(PathBuf),
    /// A plain TCP `host:port` (host may be a name, an IPv4 or a bracketed IPv6
    /// address). The daemon serves it on loopback addresses only.
    Tcp(String),
    /// TLS over TCP, `host:port` as for [`Endpoint::Tcp`]; the client verifies the
    /// daemon's certificate for `host` and presents its own.
    Tls(String),
}

impl Endpoint {
    /// The host of a TCP or TLS endpoint, without IPv6 brackets.
    pub fn host(&self) -> Option<&str> {
        match self {
            Endpoint::Unix(_) => None,
            Endpoint::Tcp(hp) | Endpoint::Tls(hp) => {
                let host = hp.rsplit_once(':').map_or(hp.as_str(), |(h, _)| h);
                Some(host.trim_start_matches('[').trim_end_matches(']'))
            }
        }
    }
}

/// Why an endpoint string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid endpoint {text:?}: {reason} (expected unix:PATH, tcp:HOST:PORT or tls:HOST:PORT)")]
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
        let (hp, tls) = match (s.strip_prefix("tcp:"), s.strip_prefix("tls:")) {
            (Some(hp), _) => (hp, false),
            (_, Some(hp)) => (hp, true),
            _ => return Err(err("unknown scheme")),
        };
        let (host, port) = hp.rsplit_once(':').ok_or_else(|| err("missing :PORT"))?;
        if host.is_empty() {
            return Err(err("empty host"));
        }
        port.parse::<u16>()
            .map_err(|_| err("port is not a number in 0..=65535"))?;
        Ok(if tls {
            Endpoint::Tls(hp.to_string())
        } else {
            Endpoint::Tcp(hp.to_string())
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(hp) => write!(f, "tcp:{hp}"),
            Endpoint::Tls(hp) => write!(f, "tls:{hp}"),
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
        let tls = "tls:[::1]:7443".parse::<Endpoint>().unwrap();
        assert_eq!(tls, Endpoint::Tls("[::1]:7443".into()));
        assert_eq!(tls.host(), Some("::1"));
        assert_eq!(tls.to_string(), "tls:[::1]:7443");
        assert_eq!(
            "tls:db1.example:7443".parse::<Endpoint>().unwrap().host(),
            Some("db1.example")
        );
        for bad in [
            "",
            "unix:",
            "tcp:host",
            "tcp::1",
            "http://x",
            "tcp:h:99999",
            "tls:",
            "tls:host",
            "tcp+tls:h:1",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }
}
