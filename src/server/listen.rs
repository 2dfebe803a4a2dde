//! Listening sockets: binding the configured endpoints safely and taking them over
//! from systemd (socket activation). What is done with each accepted connection
//! is [`super::admission`]'s.
//!
//! Safety rules enforced here, because each is a way to lose uniqueness or expose the
//! daemon by accident:
//! - a unix socket path with a live daemon behind it is never taken over (two daemons
//!   answering on one path would split clients); a stale file left by a crash is;
//! - a path that is not a socket is never deleted;
//! - plain TCP (`tcp:`) has no authentication, so it is served on loopback
//!   addresses only, whatever the config says; a non-loopback address needs TLS
//!   with client certificates (`tls:`, see [`super::tls`]) *and* `allow_remote = true`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use idalloc_client::endpoint::Endpoint;

/// One accepted connection, before any TLS handshake.
pub enum Conn {
    /// From a unix socket (the peer is known by `SO_PEERCRED`).
    Unix(UnixStream),
    /// Plain TCP (loopback only).
    Tcp(TcpStream),
    /// TCP on a TLS listener: the handshake is still to be made.
    Tls(TcpStream),
}

/// The name systemd socket units give a TLS socket (`FileDescriptorName=tls`).
pub const ACTIVATED_TLS_NAME: &str = "tls";

/// Why a listener could not be set up. Each message says which endpoint and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A daemon already answers on this unix socket.
    #[error("another idallocd is serving on {0}: stop it first or configure another socket path")]
    InUse(String),
    /// A non-loopback address for plain TCP, which is never allowed.
    #[error("refusing to listen on {endpoint}: {addr} is not a loopback address and plain TCP is unauthenticated; use a unix socket, a loopback address, or tls:HOST:PORT with a [tls] section and allow_remote = true")]
    NotLoopback {
        /// The endpoint as configured.
        endpoint: String,
        /// The offending resolved address.
        addr: SocketAddr,
    },
    /// A non-loopback TLS address without `allow_remote`.
    #[error("refusing to listen on {endpoint}: {addr} is not a loopback address; set allow_remote = true to serve TLS clients on other hosts")]
    RemoteNotAllowed {
        /// The endpoint as configured.
        endpoint: String,
        /// The offending resolved address.
        addr: SocketAddr,
    },
    /// Something that is not a socket is in the way.
    #[error("cannot listen on unix:{0}: the path exists and is not a socket; idallocd will not delete it")]
    NotASocket(PathBuf),
    /// The operating system refused.
    #[error("cannot listen on {endpoint}: {source}")]
    Io {
        /// The endpoint.
        endpoint: String,
        /// The OS error.
        source: io::Error,
    },
    /// systemd passed descriptors that cannot be used.
    #[error("socket activation: {0}")]
    Activation(String),
}

/// A bound listening socket.
pub enum Listener {
    /// A unix socket. `owned` is set when this process created the path, so that it is
    /// removed at exit (an activated socket belongs to systemd and stays).
    Unix {
        /// The socket.
        listener: UnixListener,
        /// Its path.
        path: PathBuf,
        /// `(dev, ino)` of the socket file this process created.
        owned: Option<(u64, u64)>,
    },
    /// A TCP socket; `tls` when its connections start with a TLS handshake.
    Tcp {
        /// The socket.
        listener: TcpListener,
        /// Whether it is a `tls:` listener.
        tls: bool,
    },
}

impl Listener {
    /// The address in the `unix:` / `tcp:` form, for logs and tests.
    pub fn describe(&self) -> String {
        match self {
            Listener::Unix { path, .. } => Endpoint::Unix(path.clone()).to_string(),
            Listener::Tcp { listener, tls } => {
                let scheme = if *tls { "tls" } else { "tcp" };
                match listener.local_addr() {
                    Ok(a) => format!("{scheme}:{a}"),
                    Err(_) => format!("{scheme}:<unknown>"),
                }
            }
        }
    }

    /// Whether this is a plain (unauthenticated) TCP listener.
    pub fn is_plain_tcp(&self) -> bool {
        matches!(self, Listener::Tcp { tls: false, .. })
    }

    /// Accept one connection.
    pub async fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix { listener, .. } => listener.accept().await.map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp { listener, tls } => {
                let (s, _) = listener.accept().await?;
                // Replies are small and latency-bound: do not let Nagle hold them back.
                s.set_nodelay(true)?;
                Ok(if *tls { Conn::Tls(s) } else { Conn::Tcp(s) })
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix {
            path,
            owned: Some((dev, ino)),
            ..
        } = self
        {
            // Only remove the file if it is still the socket we created: a successor
            // may already have replaced it.
            if let Ok(meta) = std::fs::symlink_metadata(&*path) {
                if meta.dev() == *dev && meta.ino() == *ino {
                    let _ = std::fs::remove_file(&*path);
                }
            }
        }
    }
}

/// How to bind.
#[derive(Debug, Clone, Copy)]
pub struct BindOptions {
    /// Mode bits of created unix sockets.
    pub socket_mode: u32,
    /// Whether non-loopback addresses are allowed (for TLS listeners only).
    pub allow_remote: bool,
}

/// Bind one endpoint.
pub async fn bind(endpoint: &Endpoint, opts: BindOptions) -> Result<Listener, ListenError> {
    match endpoint {
        Endpoint::Unix(path) => bind_unix(path, opts.socket_mode),
        Endpoint::Tcp(hp) => bind_tcp(hp, opts.allow_remote, false).await,
        Endpoint::Tls(hp) => bind_tcp(hp, opts.allow_remote, true).await,
    }
}

fn bind_unix(path: &Path, mode: u32) -> Result<Listener, ListenError> {
    let io_err = |source| ListenError::Io {
        endpoint: Endpoint::Unix(path.to_path_buf()).to_string(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ListenError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(ListenError::InUse(format!("unix:{}", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // Nobody accepts on it: the file was left by a process that died.
                tracing::warn!(path = %path.display(), "replacing stale unix socket left by an earlier process");
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Err(e) => return Err(io_err(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    let meta = std::fs::symlink_metadata(path).map_err(io_err)?;
    Ok(Listener::Unix {
        listener,
        path: path.to_path_buf(),
        owned: Some((meta.dev(), meta.ino())),
    })
}

async fn bind_tcp(host_port: &str, allow_remote: bool, tls: bool) -> Result<Listener, ListenError> {
    let endpoint = format!("{}:{host_port}", if tls { "tls" } else { "tcp" });
    let io_err = |source| ListenError::Io {
        endpoint: endpoint.clone(),
        source,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(host_port)
        .await
        .map_err(io_err)?
        .collect();
    // Every address a name resolves to is checked, not only the one bound: a name
    // that maps to a public address is not "loopback" by intent.
    let first = *addrs.first().ok_or_else(|| {
        io_err(io::Error::new(
            io::ErrorKind::NotFound,
            "the host name resolves to no address",
        ))
    })?;
    check_loopback(&endpoint, &addrs, allow_remote, tls)?;
    let listener = TcpListener::bind(first).await.map_err(io_err)?;
    Ok(Listener::Tcp { listener, tls })
}

/// The loopback rule for one listener on the addresses its host resolved to; also
/// what [`super::validate`] checks before start-up binds anything.
pub(crate) fn check_loopback(
    endpoint: &str,
    addrs: &[SocketAddr],
    allow_remote: bool,
    tls: bool,
) -> Result<(), ListenError> {
    if let Some(addr) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        let (endpoint, addr) = (endpoint.to_string(), *addr);
        if !tls {
            return Err(ListenError::NotLoopback { endpoint, addr });
        }
        if !allow_remote {
            return Err(ListenError::RemoteNotAllowed { endpoint, addr });
        }
        tracing::info!(%endpoint, "TLS listener on a non-loopback address: clients need a certificate signed by [tls] client_ca");
    }
    Ok(())
}

/// The sockets systemd passed (`LISTEN_FDS`), or `None` when not socket-activated.
/// A TCP socket named `tls` (`FileDescriptorName=tls`) is a TLS listener, which
/// needs `have_tls` (a `[tls]` section); other TCP sockets are plain.
pub fn activated(allow_remote: bool, have_tls: bool) -> Result<Option<Vec<Listener>>, ListenError> {
    let fds =
        sd_notify::listen_fds_with_names().map_err(|e| ListenError::Activation(e.to_string()))?;
    if fds.len() == 0 {
        return Ok(None);
    }
    let mut out = Vec::new();
    for (fd, name) in fds {
        let tls = name == ACTIVATED_TLS_NAME;
        if tls && !have_tls {
            return Err(ListenError::Activation(format!(
                "descriptor {fd} is named {ACTIVATED_TLS_NAME:?} (a TLS socket) but the config has no [tls] section"
            )));
        }
        out.push(adopt_fd(fd, allow_remote, tls)?);
    }
    Ok(Some(out))
}

fn adopt_fd(fd: RawFd, allow_remote: bool, tls: bool) -> Result<Listener, ListenError> {
    use socket2::{Domain, Socket, Type};
    let act = |m: String| ListenError::Activation(format!("descriptor {fd}: {m}"));
    // SAFETY: systemd hands this process ownership of the descriptors it lists
    // (LISTEN_FDS), and each is adopted exactly once.
    let socket = unsafe { Socket::from_raw_fd(fd) };
    let kind = socket.r#type().map_err(|e| act(e.to_string()))?;
    if kind != Type::STREAM || !socket.is_listener().map_err(|e| act(e.to_string()))? {
        return Err(act(
            "not a listening stream socket; configure ListenStream= in the socket unit".into(),
        ));
    }
    socket
        .set_nonblocking(true)
        .map_err(|e| act(e.to_string()))?;
    let domain = socket.domain().map_err(|e| act(e.to_string()))?;
    if domain == Domain::UNIX {
        let std_listener =
            std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(socket));
        let path = std_listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("<unnamed>"));
        let listener = UnixListener::from_std(std_listener).map_err(|e| act(e.to_string()))?;
        Ok(Listener::Unix {
            listener,
            path,
            owned: None,
        })
    } else if domain == Domain::IPV4 || domain == Domain::IPV6 {
        let std_listener = std::net::TcpListener::from(std::os::fd::OwnedFd::from(socket));
        let addr = std_listener.local_addr().map_err(|e| act(e.to_string()))?;
        let scheme = if tls { "tls" } else { "tcp" };
        check_loopback(&format!("{scheme}:{addr}"), &[addr], allow_remote, tls)?;
        let listener = TcpListener::from_std(std_listener).map_err(|e| act(e.to_string()))?;
        Ok(Listener::Tcp { listener, tls })
    } else {
        Err(act(format!(
            "address family {domain:?} is neither unix nor TCP; configure ListenStream= with a path or a port"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BindOptions {
        BindOptions {
            socket_mode: 0o660,
            allow_remote: false,
        }
    }

    #[tokio::test]
    async fn unix_socket_gets_configured_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/a.sock");
        let l = bind(
            &Endpoint::Unix(path.clone()),
            BindOptions {
                socket_mode: 0o600,
                ..opts()
            },
        )
        .await
        .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(l);
        assert!(
            !path.exists(),
            "the socket file is removed when the listener goes"
        );
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A stale socket: bound, then its owner gone without unlinking.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = bind(&Endpoint::Unix(path.clone()), opts()).await.unwrap();
        let err = bind(&Endpoint::Unix(path.clone()), opts())
            .await
            .err()
            .expect("second bind on a live socket must fail");
        assert!(matches!(err, ListenError::InUse(_)), "{err}");
        assert!(err.to_string().contains("another idallocd is serving on"));
        drop(live);
    }

    #[tokio::test]
    async fn activated_descriptors_are_typed_and_checked() {
        use std::os::fd::IntoRawFd;
        let dir = tempfile::tempdir().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.path().join("a.sock")).unwrap();
        let l = adopt_fd(unix.into_raw_fd(), false, false).unwrap();
        assert!(matches!(&l, Listener::Unix { owned: None, .. }));
        assert!(l.describe().ends_with("a.sock"), "{}", l.describe());
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let l = adopt_fd(tcp.into_raw_fd(), false, true).unwrap();
        assert!(l.describe().starts_with("tls:127.0.0.1:"));
        let public = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let err = adopt_fd(public.into_raw_fd(), true, false).err().unwrap();
        assert!(matches!(err, ListenError::NotLoopback { .. }), "{err}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = adopt_fd(udp.into_raw_fd(), false, false).err().unwrap();
        assert!(
            err.to_string().contains("not a listening stream socket"),
            "{err}"
        );
        let unbound =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let err = adopt_fd(unbound.into_raw_fd(), false, false).err().unwrap();
        assert!(
            err.to_string().contains("not a listening stream socket"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_regular_file_is_never_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "keep me").unwrap();
        let err = bind(&Endpoint::Unix(path.clone()), opts())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ListenError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[tokio::test]
    async fn plain_tcp_is_loopback_only_tls_needs_allow_remote() {
        let l = bind(&Endpoint::Tcp("127.0.0.1:0".into()), opts())
            .await
            .unwrap();
        assert!(l.describe().starts_with("tcp:127.0.0.1:"));
        let l6 = bind(&Endpoint::Tcp("localhost:0".into()), opts()).await;
        assert!(l6.is_ok(), "localhost resolves to loopback only");
        let remote = BindOptions {
            allow_remote: true,
            ..opts()
        };
        for o in [opts(), remote] {
            let err = bind(&Endpoint::Tcp("0.0.0.0:0".into()), o)
                .await
                .err()
                .expect("plain TCP beyond loopback is refused even with allow_remote");
            assert!(matches!(err, ListenError::NotLoopback { .. }), "{err}");
            assert!(err.to_string().contains("tls:HOST:PORT"), "{err}");
        }
        let err = bind(&Endpoint::Tls("0.0.0.0:0".into()), opts())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ListenError::RemoteNotAllowed { .. }), "{err}");
        let tls = bind(&Endpoint::Tls("0.0.0.0:0".into()), remote)
            .await
            .unwrap();
        assert!(tls.describe().starts_with("tls:0.0.0.0:"));
    }
}
