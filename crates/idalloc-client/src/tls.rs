//! TLS for `tls:HOST:PORT` endpoints: the files a client trusts and presents, and
//! the PEM loading the daemon shares.
//!
//! The daemon requires a client certificate on every TLS connection and maps the
//! certificate's names to a role (writer or admin); a client without one, or with one
//! the daemon's CA did not sign, or an expired one, is refused during the handshake.
//! [`TlsFiles`] names the CA that signed the daemon's certificate and this client's
//! own certificate and key; [`TlsFiles::from_env`] reads the same files from
//! `IDALLOC_TLS_CA`, `IDALLOC_TLS_CERT` and `IDALLOC_TLS_KEY`, as `idallocctl` does.
//!
//! The crypto provider is rustls's aws-lc-rs, passed explicitly (never the
//! process-wide default), so that linking another TLS user cannot change it.
//!
//! Everything that needs rustls is behind the default feature `tls`. Built
//! without it, [`TlsFiles`] still exists (a [`ClientConfig`](crate::ClientConfig)
//! names it either way) and `tls:` endpoints still parse, but connecting to one
//! fails with `ClientError::Tls` saying the feature is off: a writer that only
//! talks to a local socket links no TLS stack.

use std::path::PathBuf;
#[cfg(feature = "tls")]
use std::sync::Arc;

/// Environment variable naming the CA file ([`TlsFiles::ca`]).
pub const ENV_CA: &str = "IDALLOC_TLS_CA";
/// Environment variable naming the client certificate file ([`TlsFiles::cert`]).
pub const ENV_CERT: &str = "IDALLOC_TLS_CERT";
/// Environment variable naming the client key file ([`TlsFiles::key`]).
pub const ENV_KEY: &str = "IDALLOC_TLS_KEY";

/// The PEM files of a TLS client.
///
/// ```
/// use idalloc_client::tls::TlsFiles;
/// let files = TlsFiles::new("/etc/idalloc/ca.pem")
///     .with_client_cert("/etc/idalloc/writer.pem", "/etc/idalloc/writer.key");
/// assert!(files.cert.is_some());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsFiles {
    /// CA certificate(s) that signed the daemon's certificate.
    pub ca: PathBuf,
    /// This client's certificate chain (the daemon requires one).
    pub cert: Option<PathBuf>,
    /// The private key of [`cert`](Self::cert).
    pub key: Option<PathBuf>,
}

/// Why the TLS files could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

impl TlsFiles {
    /// Trust the daemon certificates `ca` signed; no client certificate yet.
    pub fn new(ca: impl Into<PathBuf>) -> Self {
        TlsFiles {
            ca: ca.into(),
            cert: None,
            key: None,
        }
    }

    /// Present `cert` (PEM chain) with its private key `key`.
    #[must_use]
    pub fn with_client_cert(self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsFiles {
            cert: Some(cert.into()),
            key: Some(key.into()),
            ..self
        }
    }

    /// The files named by `IDALLOC_TLS_CA`, `IDALLOC_TLS_CERT` and `IDALLOC_TLS_KEY`;
    /// `None` when `IDALLOC_TLS_CA` is unset or empty.
    pub fn from_env() -> Option<TlsFiles> {
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        let ca = var(ENV_CA)?;
        Some(TlsFiles {
            ca: ca.into(),
            cert: var(ENV_CERT).map(Into::into),
            key: var(ENV_KEY).map(Into::into),
        })
    }

    /// The rustls client configuration these files describe. Every problem is one
    /// line naming the file.
    #[cfg(feature = "tls")]
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in load_certs(&self.ca)? {
            roots.add(cert).map_err(|e| {
                TlsError(format!(
                    "{}: not a usable CA certificate: {e}",
                    self.ca.display()
                ))
            })?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_private_key(key)?)
                .map_err(|e| {
                    TlsError(format!(
                        "{} and {} do not make a client certificate: {e}",
                        cert.display(),
                        key.display()
                    ))
                })?,
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => {
                return Err(TlsError(format!(
                    "a client certificate without its key: set the key file too ({ENV_KEY} / --tls-key)"
                )))
            }
            (None, Some(_)) => {
                return Err(TlsError(format!(
                    "a client key without its certificate: set the certificate file too ({ENV_CERT} / --tls-cert)"
                )))
            }
        };
        Ok(Arc::new(config))
    }
}

/// The connector a client dials `tls:` endpoints with, built once at connect.
#[cfg(feature = "tls")]
pub(crate) type Connector = tokio_rustls::TlsConnector;

/// Without the `tls` feature there is no connector: [`TlsFiles::connector`]
/// always fails, so no value of this type exists.
#[cfg(not(feature = "tls"))]
pub(crate) enum Connector {}

impl TlsFiles {
    /// The connector for these files (what [`Client::connect_with`](crate::Client::connect_with) builds).
    #[cfg(feature = "tls")]
    pub(crate) fn connector(&self) -> Result<Connector, TlsError> {
        Ok(tokio_rustls::TlsConnector::from(self.client_config()?))
    }

    #[cfg(not(feature = "tls"))]
    pub(crate) fn connector(&self) -> Result<Connector, TlsError> {
        Err(TlsError(
            "this build of idalloc-client has no TLS: enable its `tls` feature (on by default) to use tls: endpoints".into(),
        ))
    }
}

/// TLS over a connected TCP stream to `host`, verified against the connector's CA.
#[cfg(feature = "tls")]
pub(crate) async fn connect(
    connector: &Connector,
    host: String,
    stream: tokio::net::TcpStream,
) -> std::io::Result<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static> {
    let name = rustls::pki_types::ServerName::try_from(host)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    connector.connect(name, stream).await
}

#[cfg(not(feature = "tls"))]
pub(crate) async fn connect(
    connector: &Connector,
    _host: String,
    _stream: tokio::net::TcpStream,
) -> std::io::Result<tokio::net::TcpStream> {
    match *connector {}
}

/// The PEM loading and the crypto provider, which the daemon's TLS listener
/// shares (src/server/tls.rs). Public only with the feature `daemon-internals`,
/// which `idallocd` enables: for the daemon, not part of a writer's API and
/// without a stability promise.
#[cfg(feature = "tls")]
mod pem {
    use std::path::Path;
    use std::sync::Arc;

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    use super::TlsError;

    /// The crypto provider of every TLS configuration idalloc builds.
    pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// Every certificate in a PEM file (at least one).
    pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| TlsError(format!("{}: {}", path.display(), pem_error(&e))))?;
        if certs.is_empty() {
            return Err(TlsError(format!(
                "{}: no PEM certificate (BEGIN CERTIFICATE) in it",
                path.display()
            )));
        }
        Ok(certs)
    }

    /// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
    pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
        PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError(format!(
                "{}: no PEM private key (BEGIN PRIVATE KEY) in it",
                path.display()
            )),
            e => TlsError(format!("{}: {}", path.display(), pem_error(&e))),
        })
    }

    fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
        match e {
            rustls::pki_types::pem::Error::Io(io) => io.to_string(),
            other => format!("not valid PEM ({other:?})"),
        }
    }
}

#[cfg(feature = "daemon-internals")]
#[doc(hidden)]
pub use pem::{load_certs, load_private_key, provider};
#[cfg(all(feature = "tls", not(feature = "daemon-internals")))]
use pem::{load_certs, load_private_key, provider};

/// The TLS failure behind an error, if there is one: a handshake the daemon refused
/// (its alert, such as `CertificateRequired` or `UnknownCA`) or a daemon
/// certificate this client does not trust. Such a failure is not worth retrying.
#[cfg(feature = "tls")]
pub(crate) fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(describe(tls));
        }
        // An io::Error's source() skips the error it wraps (it returns that
        // error's own source), and so does an Arc's (tarpc hands the transport's
        // error on in one): look inside both.
        type Shared = Arc<dyn std::error::Error + Send + Sync>;
        cur = if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner as &(dyn std::error::Error + 'static))
        } else if let Some(shared) = err.downcast_ref::<Shared>() {
            Some(&**shared as &(dyn std::error::Error + 'static))
        } else {
            err.source()
        };
    }
    None
}

/// Without TLS no error is a TLS failure.
#[cfg(not(feature = "tls"))]
pub(crate) fn tls_failure(_: &(dyn std::error::Error + 'static)) -> Option<String> {
    None
}

#[cfg(feature = "tls")]
fn describe(e: &rustls::Error) -> String {
    use rustls::AlertDescription as A;
    match e {
        rustls::Error::AlertReceived(A::CertificateRequired) => {
            "the daemon requires a client certificate (set --tls-cert and --tls-key, or IDALLOC_TLS_CERT and IDALLOC_TLS_KEY)".into()
        }
        rustls::Error::AlertReceived(A::UnknownCA) => {
            "the daemon refused this client's certificate: it is not signed by the daemon's client CA".into()
        }
        rustls::Error::AlertReceived(A::CertificateExpired) => {
            "the daemon refused this client's certificate: it has expired (or is not valid yet)".into()
        }
        rustls::Error::AlertReceived(A::CertificateRevoked) => {
            "the daemon refused this client's certificate: it is revoked (listed in the daemon's [tls] crl)".into()
        }
        rustls::Error::AlertReceived(A::AccessDenied) => {
            "the daemon accepted this client's certificate authority but maps none of the certificate's names to a role ([tls] name_field, admin_names / writer_names; the daemon's log says why)".into()
        }
        rustls::Error::AlertReceived(a) => format!("the daemon refused the TLS handshake (alert {a:?})"),
        rustls::Error::InvalidCertificate(c) => {
            format!("the daemon's certificate is not trusted: {c:?} (check --tls-ca / IDALLOC_TLS_CA and the host name)")
        }
        other => other.to_string(),
    }
}
