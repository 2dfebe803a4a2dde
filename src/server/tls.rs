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
//! Which field of a certificate carries its name is the operator's choice
//! (`[tls] name_field`, [`NameField`]), and only that field is read: a name the
//! CA let a requester put in some other field (a second CN, a URI or email
//! SAN) never reaches the role mapping. A certificate whose chosen field is
//! ambiguous (two subject CNs) is refused, not resolved by picking one.
//!
//! The whole `[tls]` section (files, CRL, names, field) is applied again on
//! SIGHUP ([`TlsServer::reload`]); a reload that fails keeps the running one.
//! Connections already open keep the certificate and role they were made with.

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
    /// Certificate revocation list(s) (PEM, `BEGIN X509 CRL`) of `client_ca`: a
    /// client certificate they list is refused.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// Which field of a client certificate carries the name that
    /// `admin_names`/`writer_names` match.
    #[serde(default)]
    pub name_field: NameField,
    /// Names (in `name_field`) whose holders are admins.
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

/// The field of a client certificate that names its holder. Each is one the
/// CA vouches for as a whole; none lets a name the CA copied into some other
/// field (a URI or email SAN, a second CN) stand for an admin's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NameField {
    /// The subject's common name; a certificate with more than one is refused.
    #[default]
    Cn,
    /// The whole subject DN as an RFC 4514 string, most specific RDN first
    /// (`CN=ops-admin,O=Example`).
    Dn,
    /// Any of the certificate's DNS subject-alternative names.
    DnsSan,
}

impl std::fmt::Display for NameField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameField::Cn => "cn",
            NameField::Dn => "dn",
            NameField::DnsSan => "dns_san",
        })
    }
}

fn any_name() -> Vec<String> {
    vec!["*".into()]
}

fn default_handshake_timeout() -> String {
    "10s".into()
}

/// The running TLS state, replaced as a whole on reload: a handshake sees one
/// consistent set of files, names and field.
pub struct TlsServer {
    current: RwLock<Arc<Loaded>>,
}

/// One load of `[tls]`.
struct Loaded {
    files: TlsConfig,
    rustls: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let now = self.now();
        f.debug_struct("TlsServer")
            .field("cert", &now.files.cert)
            .field("client_ca", &now.files.client_ca)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Load the files; every problem is one line naming the file or key.
    pub fn load(files: &TlsConfig) -> Result<TlsServer, String> {
        Ok(TlsServer {
            current: RwLock::new(Arc::new(Loaded::new(files)?)),
        })
    }

    /// Apply `files` (the `[tls]` section of the config just re-read, on
    /// SIGHUP): certificate, key, client CA and CRL are read again, and the
    /// names and field take effect for the next handshake. On error the running
    /// configuration stays.
    pub fn reload(&self, files: &TlsConfig) -> Result<(), String> {
        let fresh = Arc::new(Loaded::new(files)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    fn now(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Run the handshake on `tcp` and find the peer's role. On refusal the reason is
    /// returned for the log; the peer has been sent the TLS alert.
    pub async fn accept(&self, tcp: TcpStream) -> Result<(TlsStream<TcpStream>, Peer), String> {
        let addr = tcp
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        let loaded = self.now();
        let accept = tokio_rustls::TlsAcceptor::from(loaded.rustls.clone())
            .accept(tcp)
            .into_fallible();
        let stream = match tokio::time::timeout(loaded.handshake_timeout, accept).await {
            Err(_) => {
                return Err(format!(
                    "tls {addr}: no TLS handshake within {:?}",
                    loaded.handshake_timeout
                ))
            }
            Ok(Err((e, tcp))) => {
                linger(tcp).await;
                return Err(format!("tls {addr}: handshake refused: {e}"));
            }
            Ok(Ok(s)) => s,
        };
        // The verifier of this same load has accepted these names; reading them
        // again here (not from a newer load) keeps the role the one it checked.
        let names = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|der| cert_names(der, loaded.files.name_field))
            .unwrap_or_else(|| Ok(Vec::new()))
            .map_err(|why| format!("tls {addr}: {why}"))?;
        let shown = names.first().cloned().unwrap_or_else(|| "?".into());
        match role_for(&loaded.files, &names) {
            Some(role) => Ok((
                stream,
                Peer {
                    identity: format!("tls {shown}"),
                    name: format!("tls {addr} ({shown})"),
                    role,
                },
            )),
            None => Err(format!(
                "tls {addr}: certificate names {names:?} ([tls] name_field = \"{}\") are in neither [tls] admin_names nor writer_names",
                loaded.files.name_field
            )),
        }
    }

    /// The role of a certificate with these names, `None` to refuse it.
    pub fn role(&self, names: &[String]) -> Option<Role> {
        role_for(&self.now().files, names)
    }
}

impl Loaded {
    fn new(files: &TlsConfig) -> Result<Loaded, String> {
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
        Ok(Loaded {
            rustls: server_config(files)?,
            files: files.clone(),
            handshake_timeout,
        })
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
    let mut builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if let Some(crl) = &files.crl {
        builder = builder.with_crls(load_crls(crl, &files.client_ca)?);
    }
    let chain_verifier = builder
        .build()
        .map_err(|e| format!("tls.client_ca/tls.crl: {}: {e}", files.client_ca.display()))?;
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
        let field = self.files.name_field;
        let refused = match cert_names(end_entity, field) {
            Err(why) => Some(why),
            Ok(names) if role_for(&self.files, &names).is_none() => Some(format!(
                "its names {names:?} ([tls] name_field = \"{field}\") are in neither [tls] admin_names nor writer_names"
            )),
            Ok(_) => None,
        };
        if let Some(why) = refused {
            tracing::warn!(reason = %why, "TLS client certificate refused");
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

/// The CRLs in a PEM file (at least one), each issued by a certificate of
/// `client_ca`. A CRL of another issuer would leave every client's revocation
/// status unknown, which refuses them all: said at load, not at each handshake.
fn load_crls(
    path: &std::path::Path,
    client_ca: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateRevocationListDer;
    let shown = path.display();
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| match e {
            rustls::pki_types::pem::Error::Io(io) => format!("tls.crl: {shown}: {io}"),
            other => format!("tls.crl: {shown}: not valid PEM ({other:?})"),
        })?;
    if crls.is_empty() {
        return Err(format!(
            "tls.crl: {shown}: no PEM CRL (BEGIN X509 CRL) in it"
        ));
    }
    let cas = load_certs(client_ca).map_err(|e| format!("tls.client_ca: {}", e.0))?;
    let subjects: Vec<Vec<u8>> = cas
        .iter()
        .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
        .map(|(_, c)| c.subject().as_raw().to_vec())
        .collect();
    for der in &crls {
        let (_, crl) = x509_parser::parse_x509_crl(der)
            .map_err(|e| format!("tls.crl: {shown}: not an X.509 CRL: {e}"))?;
        if !subjects.iter().any(|s| s == crl.issuer().as_raw()) {
            return Err(format!(
                "tls.crl: {shown}: a CRL issued by {:?}, which is not a certificate of tls.client_ca ({}); with it no client's revocation status would be known, and every client would be refused",
                crl.issuer().to_string(),
                client_ca.display()
            ));
        }
        if let Some(next) = crl.next_update() {
            if next.timestamp() < now_unix() {
                tracing::warn!(crl = %shown, next_update = %next, "tls.crl: this CRL's next update is past; it is used as it is (certificates revoked since are not refused): fetch a fresh one and reload");
            }
        }
    }
    Ok(crls)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The names of a certificate in `field`, for the role mapping; an error (the
/// reason, one line) when the field is ambiguous or cannot be read, which
/// refuses the certificate. No name at all is not an error: such a certificate
/// matches only `"*"` in `writer_names`.
pub fn cert_names(der: &[u8], field: NameField) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    match field {
        NameField::Cn => {
            let cns = cert
                .subject()
                .iter_common_name()
                .map(|cn| {
                    cn.as_str()
                        .map(str::to_owned)
                        .map_err(|e| format!("its subject common name is not a string: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            if cns.len() > 1 {
                return Err(format!(
                    "its subject has {} common names {cns:?}; with [tls] name_field = \"cn\" a certificate must have one",
                    cns.len()
                ));
            }
            Ok(cns)
        }
        NameField::Dn => {
            let dn = rfc4514(cert.subject())?;
            Ok(if dn.is_empty() { Vec::new() } else { vec![dn] })
        }
        NameField::DnsSan => {
            let san = cert.subject_alternative_name().map_err(|e| {
                format!("its subject-alternative-name extension cannot be read: {e}")
            })?;
            Ok(san
                .map(|san| {
                    san.value
                        .general_names
                        .iter()
                        .filter_map(|n| match n {
                            GeneralName::DNSName(s) => Some((*s).to_owned()),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default())
        }
    }
}

/// A DN as RFC 4514 prints it: RDNs most specific first, separated by `,`;
/// the attributes of a multi-valued RDN by `+`; the short names of RFC 4514
/// (CN, L, ST, O, OU, C, STREET, DC, UID), other types as dotted OIDs. An
/// attribute whose value is not a string is refused rather than hex-dumped:
/// nobody would list such a name, and two spellings of one DN must not differ.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> Result<String, String> {
    let mut rdns = Vec::new();
    for rdn in name.iter().collect::<Vec<_>>().into_iter().rev() {
        let mut atvs = Vec::new();
        for atv in rdn.iter() {
            let oid = atv.attr_type().to_id_string();
            let key = match oid.as_str() {
                "2.5.4.3" => "CN",
                "2.5.4.7" => "L",
                "2.5.4.8" => "ST",
                "2.5.4.10" => "O",
                "2.5.4.11" => "OU",
                "2.5.4.6" => "C",
                "2.5.4.9" => "STREET",
                "0.9.2342.19200300.100.1.25" => "DC",
                "0.9.2342.19200300.100.1.1" => "UID",
                other => other,
            };
            let value = atv.as_str().map_err(|_| {
                format!("its subject attribute {oid} is not a string, so [tls] name_field = \"dn\" cannot name it")
            })?;
            atvs.push(format!("{key}={}", escape_4514(value)));
        }
        rdns.push(atvs.join("+"));
    }
    Ok(rdns.join(","))
}

fn escape_4514(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(admin: &[&str], writer: &[&str]) -> TlsConfig {
        TlsConfig {
            cert: "c".into(),
            key: "k".into(),
            client_ca: "ca".into(),
            crl: None,
            name_field: NameField::Cn,
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

    fn cert(shape: impl FnOnce(&mut rcgen::CertificateParams)) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        shape(&mut params);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn only_the_chosen_field_is_read() {
        use rcgen::{DnType, SanType};
        let der = cert(|p| {
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.distinguished_name.push(DnType::CountryName, "FR");
            p.distinguished_name
                .push(DnType::OrganizationName, "Ex, Inc.");
            p.distinguished_name.push(DnType::CommonName, " ops#");
            p.subject_alt_names = vec![
                SanType::DnsName("db1.example".try_into().unwrap()),
                SanType::URI("ops-admin".try_into().unwrap()),
                SanType::Rfc822Name("ops-admin".try_into().unwrap()),
            ];
        });
        assert_eq!(cert_names(&der, NameField::Cn).unwrap(), [" ops#"]);
        assert_eq!(
            cert_names(&der, NameField::Dn).unwrap(),
            ["CN=\\ ops#,O=Ex\\, Inc.,C=FR"]
        );
        assert_eq!(
            cert_names(&der, NameField::DnsSan).unwrap(),
            ["db1.example"]
        );
        let two = cert(|p| {
            p.distinguished_name.push(DnType::CommonName, "db1");
            p.distinguished_name
                .push(DnType::CustomDnType(vec![2, 5, 4, 3]), "ops");
        });
        let e = cert_names(&two, NameField::Cn).unwrap_err();
        assert!(e.contains("2 common names"), "{e}");
        assert_eq!(cert_names(&two, NameField::Dn).unwrap(), ["CN=ops,CN=db1"]);
        let none = cert(|p| p.distinguished_name = rcgen::DistinguishedName::new());
        assert!(cert_names(&none, NameField::Cn).unwrap().is_empty());
        assert!(cert_names(&none, NameField::Dn).unwrap().is_empty());
        assert!(cert_names(&none, NameField::DnsSan).unwrap().is_empty());
    }

    #[test]
    fn rfc4514_escapes_what_it_must() {
        assert_eq!(
            escape_4514("a,b+c;d<e>f\"g\\h"),
            "a\\,b\\+c\\;d\\<e\\>f\\\"g\\\\h"
        );
        assert_eq!(escape_4514("#x# "), "\\#x#\\ ");
        assert_eq!(escape_4514(" "), "\\ ");
        assert_eq!(escape_4514(""), "");
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
