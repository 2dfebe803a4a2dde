//! TLS listeners (`tls:HOST:PORT`): the server certificate, client certificates
//! required and verified against `[tls] client_ca`, and the role each certificate
//! gets from its names.
//!
//! Invariant protected: *nobody reaches the counters over the network without a
//! certificate the operator's CA signed, and only the names the operator listed
//! as admins may give ids back or drop forks.* A connection whose certificate is
//! missing, from another CA, expired, or whose names map to no role, is refused
//! during (or right after) the handshake, before any request is read. The
//! handshake runs on the connection's own task with a time limit, so a slow or
//! silent peer holds one connection slot, never the accept loop.
//!
//! Certificates and keys are re-read on SIGHUP ([`TlsServer::reload`]); a reload
//! that fails keeps the running ones. Connections already open keep the
//! certificate they were made with.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::access::{Peer, Role};
use idalloc_client::tls::{load_certs, load_private_key, provider};

/// `[tls]`: the files of TLS listeners and the certificate-name-to-role mapping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The daemon's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificate(s) (PEM) that client certificates must be signed by.
    pub client_ca: PathBuf,
    /// Certificate names (subject common name, DNS, URI or email
    /// subject-alternative names) whose holders are admins.
    #[serde(default)]
    pub admin_names: Vec<String>,
    /// Names whose holders are writers; `"*"` (the default) makes every valid
    /// certificate of `client_ca` a writer.
    #[serde(default = "any_name")]
    pub writer_names: Vec<String>,
    /// Longest a TLS handshake may take before the connection is closed.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: String,
}

fn any_name() -> Vec<String> {
    vec!["*".into()]
}

fn default_handshake_timeout() -> String {
    "10s".into()
}

/// The running TLS state: the rustls configuration (replaced on reload) and the
/// role mapping.
pub struct TlsServer {
    files: TlsConfig,
    current: RwLock<Arc<rustls::ServerConfig>>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("cert", &self.files.cert)
            .field("client_ca", &self.files.client_ca)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Load the files; every problem is one line naming the file or key.
    pub fn load(files: &TlsConfig) -> Result<TlsServer, String> {
        let handshake_timeout =
            humantime::parse_duration(&files.handshake_timeout).map_err(|e| {
                format!(
                    "tls.handshake_timeout: {:?} is not a duration such as \"10s\": {e}",
                    files.handshake_timeout
                )
            })?;
        if handshake_timeout.is_zero() {
            return Err("tls.handshake_timeout: must be above zero".into());
        }
        if files.writer_names.is_empty() && files.admin_names.is_empty() {
            return Err("tls: admin_names and writer_names are both empty, so no certificate could get a role; list names, or \"*\" in writer_names".into());
        }
        if files.admin_names.iter().any(|n| n == "*") {
            return Err("tls.admin_names: \"*\" would make every certificate of client_ca an admin; list the admins' names".into());
        }
        Ok(TlsServer {
            current: RwLock::new(server_config(files)?),
            files: files.clone(),
            handshake_timeout,
        })
    }

    /// Read the certificate, key and client CA again (SIGHUP). On error the running
    /// configuration stays.
    pub fn reload(&self) -> Result<(), String> {
        let fresh = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// Run the handshake on `tcp` and find the peer's role. On refusal the reason is
    /// returned for the log; the peer has been sent the TLS alert.
    pub async fn accept(&self, tcp: TcpStream) -> Result<(TlsStream<TcpStream>, Peer), String> {
        let addr = tcp
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        let config = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let accept = tokio_rustls::TlsAcceptor::from(config)
            .accept(tcp)
            .into_fallible();
        let stream = match tokio::time::timeout(self.handshake_timeout, accept).await {
            Err(_) => {
                return Err(format!(
                    "tls {addr}: no TLS handshake within {:?}",
                    self.handshake_timeout
                ))
            }
            Ok(Err((e, tcp))) => {
                linger(tcp).await;
                return Err(format!("tls {addr}: handshake refused: {e}"));
            }
            Ok(Ok(s)) => s,
        };
        let names = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|der| cert_names(der))
            .unwrap_or_default();
        let shown = names.first().cloned().unwrap_or_else(|| "?".into());
        match self.role(&names) {
            Some(role) => Ok((
                stream,
                Peer {
                    identity: format!("tls {shown}"),
                    name: format!("tls {addr} ({shown})"),
                    role,
                },
            )),
            None => Err(format!(
                "tls {addr}: certificate names {names:?} are in neither [tls] admin_names nor writer_names"
            )),
        }
    }

    /// The role of a certificate with these names, `None` to refuse it.
    pub fn role(&self, names: &[String]) -> Option<Role> {
        role_for(&self.files, names)
    }
}

/// Admin if any name is in `admin_names`, else writer if any is in `writer_names`
/// (or it holds `"*"`), else none. Names match exactly.
fn role_for(files: &TlsConfig, names: &[String]) -> Option<Role> {
    let listed = |list: &[String]| list.iter().any(|l| l == "*" || names.contains(l));
    if listed(&files.admin_names) {
        Some(Role::Admin)
    } else if listed(&files.writer_names) {
        Some(Role::Writer)
    } else {
        None
    }
}

/// After a refused handshake the alert is written; read (and drop) what the client
/// still sends for a moment before closing, so that the close is a FIN after the
/// alert rather than a reset that could destroy it before the client reads it.
async fn linger(mut tcp: TcpStream) {
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

fn server_config(files: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in load_certs(&files.client_ca).map_err(|e| format!("tls.client_ca: {}", e.0))? {
        roots.add(ca).map_err(|e| {
            format!(
                "tls.client_ca: {}: not a usable CA certificate: {e}",
                files.client_ca.display()
            )
        })?;
    }
    let chain_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| format!("tls.client_ca: {}: {e}", files.client_ca.display()))?;
    let verifier = Arc::new(RoleVerifier {
        chain: chain_verifier,
        files: files.clone(),
    });
    let chain = load_certs(&files.cert).map_err(|e| format!("tls.cert: {}", e.0))?;
    let key = load_private_key(&files.key).map_err(|e| format!("tls.key: {}", e.0))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!(
                "tls.cert/tls.key: {} and {} do not make a server certificate: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    Ok(Arc::new(config))
}

/// Client certificate verification: the chain against `client_ca` (rustls's
/// WebPKI verifier: signature, validity dates, key usage), then the names against
/// the role mapping. A certificate with no role fails the handshake with the
/// `access_denied` alert, so the client learns it at connect rather than as a
/// closed connection.
#[derive(Debug)]
struct RoleVerifier {
    chain: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    files: TlsConfig,
}

impl rustls::server::danger::ClientCertVerifier for RoleVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        let names = cert_names(end_entity);
        if role_for(&self.files, &names).is_none() {
            tracing::warn!(?names, "TLS client certificate refused: none of its names is in [tls] admin_names or writer_names");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// The names a role may be mapped from: the subject's common names, then the DNS,
/// URI and email subject-alternative names.
pub fn cert_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                    names.push((*s).to_owned())
                }
                _ => {}
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(admin: &[&str], writer: &[&str]) -> TlsConfig {
        TlsConfig {
            cert: "c".into(),
            key: "k".into(),
            client_ca: "ca".into(),
            admin_names: admin.iter().map(|s| s.to_string()).collect(),
            writer_names: writer.iter().map(|s| s.to_string()).collect(),
            handshake_timeout: "10s".into(),
        }
    }

    #[test]
    fn names_map_to_roles() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = config(&["ops.example"], &["*"]);
        assert_eq!(
            role_for(&c, &names(&["x", "ops.example"])),
            Some(Role::Admin)
        );
        assert_eq!(role_for(&c, &names(&["anyone"])), Some(Role::Writer));
        assert_eq!(role_for(&c, &[]), Some(Role::Writer));
        let c = config(&["ops"], &["db1", "db2"]);
        assert_eq!(role_for(&c, &names(&["db2"])), Some(Role::Writer));
        assert_eq!(role_for(&c, &names(&["db3", "ops2"])), None);
        assert_eq!(role_for(&c, &names(&["OPS"])), None, "exact match only");
    }

    #[test]
    fn bad_mappings_are_refused_with_the_key_named() {
        let e = TlsServer::load(&config(&[], &[])).unwrap_err();
        assert!(e.contains("both empty"), "{e}");
        let e = TlsServer::load(&config(&["*"], &[])).unwrap_err();
        assert!(e.starts_with("tls.admin_names"), "{e}");
        let e = TlsServer::load(&config(&["ops"], &["*"])).unwrap_err();
        assert!(e.starts_with("tls.client_ca: ca:"), "{e}");
    }
}
