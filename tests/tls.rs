//! TLS listeners with client certificates, against the real daemon and real
//! certificates (rcgen): who is refused, with which error, and what each role may
//! do. Attacks "who may do what" in docs/guarantees.md: no certificate, another
//! CA's, an expired one, one whose names have no role, a writer's calling admin
//! operations; the right ones work; the server certificate reloads on SIGHUP; and
//! the configurations that would expose plain TCP are refused at start.

use crate::daemon_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon_support::*;
use idalloc_client::client::{Client, ClientConfig, ClientError};
use idalloc_client::{ForkId, Kind, Namespace, ServiceError, TlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, RevocationReason, RevokedCertParams, SanType,
    SerialNumber,
};

/// A certificate authority that writes its certificates as PEM files in `dir`.
struct Ca {
    dir: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: PathBuf,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = dir.join(format!("{name}.pem"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        Ca {
            dir: dir.to_path_buf(),
            issuer,
            pem,
        }
    }

    /// A leaf certificate for `names` (the first is the subject CN, all are SANs):
    /// `(cert.pem, key.pem)`.
    fn issue(&self, stem: &str, names: &[&str], server: bool, expired: bool) -> (PathBuf, PathBuf) {
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        self.sign(stem, params)
    }

    /// A client certificate whose subject CN is `cn`, shaped further by `shape`.
    fn client(
        &self,
        stem: &str,
        cn: &str,
        shape: impl FnOnce(&mut CertificateParams),
    ) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        shape(&mut params);
        self.sign(stem, params)
    }

    /// A CRL of this CA revoking the certificates of these serial numbers.
    fn crl(&self, stem: &str, serials: &[u64]) -> PathBuf {
        let params = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).unwrap();
        let path = self.dir.join(format!("{stem}.crl.pem"));
        std::fs::write(&path, crl.pem().unwrap()).unwrap();
        path
    }

    fn sign(&self, stem: &str, params: CertificateParams) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{stem}.pem")),
            self.dir.join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    endpoint: String,
    ca: Ca,
    other: Ca,
    server: (PathBuf, PathBuf),
}

/// A daemon with a unix socket and a `tls:` listener; admins are `ops-admin`,
/// writers `db1-writer`.
fn setup() -> Setup {
    setup_with("", |_| String::new())
}

/// As [`setup`], with `top` among the top-level keys and what `tls_extra`
/// makes of the CA in `[tls]`.
fn setup_with(top: &str, tls_extra: impl FnOnce(&Ca) -> String) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "idalloc-test-ca");
    let other = Ca::new(dir.path(), "another-ca");
    let server = ca.issue("server", &["localhost", "127.0.0.1"], true, false);
    let port = free_port();
    let endpoint = format!("tls:127.0.0.1:{port}");
    let tls_extra = tls_extra(&ca);
    let admin = if tls_extra.contains("admin_names") {
        ""
    } else {
        "admin_names = [\"ops-admin\"]\n"
    };
    let tls = format!(
        "{top}[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n{admin}writer_names = [\"db1-writer\"]\n{tls_extra}",
        server.0.display().to_string(),
        server.1.display().to_string(),
        ca.pem.display().to_string(),
    );
    let daemon = Daemon::start_with(
        dir.path(),
        Opts {
            extra_toml: &tls,
            extra_listen: vec![endpoint.clone()],
            ..Opts::default()
        },
    );
    Setup {
        _dir: dir,
        daemon,
        endpoint,
        ca,
        other,
        server,
    }
}

fn config(ca: &Path, cert: Option<&(PathBuf, PathBuf)>) -> ClientConfig {
    let mut files = TlsFiles::new(ca);
    if let Some((c, k)) = cert {
        files = files.with_client_cert(c, k);
    }
    ClientConfig::default()
        .with_deadline(Duration::from_secs(5))
        .with_tls(files)
}

/// The TLS refusal a client gets, from connect or from its first call.
async fn refusal(endpoint: &str, config: ClientConfig) -> String {
    let started = std::time::Instant::now();
    let err = match Client::connect_with(endpoint, config).await {
        Err(e) => e,
        Ok(c) => c
            .reserve(Namespace::Primary, Kind::Vid, 1)
            .await
            .expect_err("a refused certificate must not reserve"),
    };
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a TLS refusal is reported at once, not retried until the deadline: {:#}",
        anyhow::Error::from(err)
    );
    match err {
        ClientError::Tls { reason, .. } => reason,
        other => panic!("expected a TLS error, got: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_verified_and_mapped_to_roles() {
    let mut s = setup();
    let ca = s.ca.pem.clone();

    let r = refusal(&s.endpoint, config(&ca, None)).await;
    assert!(r.contains("requires a client certificate"), "{r}");

    let foreign = s.other.issue("foreign", &["db1-writer"], false, false);
    let r = refusal(&s.endpoint, config(&ca, Some(&foreign))).await;
    assert!(r.contains("not signed by the daemon's client CA"), "{r}");

    let expired = s.ca.issue("expired", &["db1-writer"], false, true);
    let r = refusal(&s.endpoint, config(&ca, Some(&expired))).await;
    assert!(r.contains("expired"), "{r}");

    let stranger = s.ca.issue("stranger", &["someone-else"], false, false);
    let r = refusal(&s.endpoint, config(&ca, Some(&stranger))).await;
    assert!(
        r.contains("maps none of the certificate's names to a role"),
        "{r}"
    );

    // A client that does not trust the daemon's CA refuses the daemon.
    let writer = s.ca.issue("writer", &["db1-writer"], false, false);
    let r = refusal(&s.endpoint, config(&s.other.pem, Some(&writer))).await;
    assert!(r.contains("the daemon's certificate is not trusted"), "{r}");

    // The writer: allocates, bootstraps and lists; admin operations are refused
    // and change nothing.
    let w = Client::connect_with(&s.endpoint, config(&ca, Some(&writer)))
        .await
        .unwrap();
    let first = w.reserve(Namespace::Primary, Kind::Vid, 10).await.unwrap();
    let fork = ForkId::generate();
    w.bootstrap_fork(idalloc_client::protocol::BootstrapRequest::new(fork))
        .await
        .unwrap();
    let e = w.drop_fork(fork).await.unwrap_err();
    match e.service() {
        Some(ServiceError::PermissionDenied(m)) => {
            assert!(m.contains("fork drop needs the admin role"), "{m}");
            assert!(m.contains("db1-writer") && m.contains("(writer)"), "{m}");
        }
        other => panic!("expected permission denied, got {other:?} ({e})"),
    }
    let e = w.checkpoint(Namespace::Primary).await.unwrap_err();
    assert!(
        matches!(e.service(), Some(ServiceError::PermissionDenied(_))),
        "{e}"
    );
    assert!(w
        .list_forks()
        .await
        .unwrap()
        .iter()
        .any(|f| f.fork == fork.text() && !f.dropped));

    // The admin may do it.
    let admin = s.ca.issue("admin", &["ops-admin"], false, false);
    let a = Client::connect_with(&s.endpoint, config(&ca, Some(&admin)))
        .await
        .unwrap();
    a.drop_fork(fork).await.unwrap();
    let next = a.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert!(next.start >= first.end, "{next:?} after {first:?}");

    // The log names each refusal; the metrics count them.
    let log = s.daemon.stderr();
    assert!(log.contains("TLS connection refused"), "{log}");
    assert!(log.contains("someone-else"), "{log}");
    assert!(log.contains("permission denied"), "{log}");

    // idallocctl takes the same files from flags or the environment.
    let ctl = crate::daemon_support::ctl_bin();
    let out = std::process::Command::new(ctl)
        .args([
            "--endpoint",
            &s.endpoint,
            "alloc",
            "eid",
            "--count",
            "3",
            "--json",
        ])
        .env("IDALLOC_TLS_CA", &ca)
        .env("IDALLOC_TLS_CERT", &writer.0)
        .env("IDALLOC_TLS_KEY", &writer.1)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"count\":3"));
    let out = std::process::Command::new(ctl)
        .args(["--endpoint", &s.endpoint, "--tls-ca"])
        .arg(&ca)
        .args(["status"])
        .env_remove("IDALLOC_TLS_CERT")
        .env_remove("IDALLOC_TLS_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("TLS to tls:127.0.0.1:"), "{err}");
    assert!(err.contains("requires a client certificate"), "{err}");
    s.daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_server_certificate() {
    let mut s = setup();
    let writer = s.ca.issue("writer", &["db1-writer"], false, false);
    // A client that trusts only the other CA refuses the daemon's certificate...
    let trusting_other = || config(&s.other.pem, Some(&writer));
    let r = refusal(&s.endpoint, trusting_other()).await;
    assert!(r.contains("not trusted"), "{r}");
    // ...until the daemon's certificate is replaced by one of the other CA and
    // the daemon is told so. Clients keep being verified against client_ca.
    let (cert, key) = s
        .other
        .issue("server-next", &["localhost", "127.0.0.1"], true, false);
    std::fs::copy(&cert, &s.server.0).unwrap();
    std::fs::copy(&key, &s.server.1).unwrap();
    s.daemon.signal(libc::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Client::connect_with(&s.endpoint, trusting_other()).await {
            Ok(c) => match c.reserve(Namespace::Primary, Kind::Vid, 1).await {
                Ok(_) => break,
                Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
            },
            Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = s.daemon.stderr();
    assert!(
        log.contains("SIGHUP: TLS certificate, key and client CA reloaded"),
        "{log}"
    );
    // A broken file on the next SIGHUP keeps the running certificate.
    std::fs::write(&s.server.1, "not a key").unwrap();
    s.daemon.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = Client::connect_with(&s.endpoint, trusting_other())
        .await
        .unwrap();
    c.reserve(Namespace::Primary, Kind::Vid, 1).await.unwrap();
    assert!(s
        .daemon
        .stderr()
        .contains("keeping the running configuration"));
    s.daemon.stop();
}

/// The configurations that would put unauthenticated TCP on the network are
/// refused by check-config and at start, with one line naming the key.
#[test]
fn plain_tcp_never_leaves_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let idallocd = env!("CARGO_BIN_EXE_idallocd");
    let data = dir.path().join("data").display().to_string();
    let cases = [
        (
            "allow_remote = true\n".to_string(),
            "config key `allow_remote`: true needs TLS",
        ),
        (
            "listen = [\"tls:127.0.0.1:0\"]\n".to_string(),
            "tls:127.0.0.1:0 needs a [tls] section",
        ),
    ];
    for (toml, expect) in cases {
        let file = dir.path().join("c.toml");
        std::fs::write(&file, format!("data_dir = {data:?}\n{toml}")).unwrap();
        for args in [
            vec!["check-config".to_string(), file.display().to_string()],
            vec!["--config".into(), file.display().to_string()],
        ] {
            let out = std::process::Command::new(idallocd)
                .args(&args)
                .env_remove("LISTEN_FDS")
                .output()
                .unwrap();
            assert!(
                !out.status.success(),
                "{toml} with {args:?} must be refused"
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(expect), "{args:?}: {err}");
        }
    }
    // Plain TCP on a public address is refused even with allow_remote and TLS.
    let ca = Ca::new(dir.path(), "ca");
    let (cert, key) = ca.issue("server", &["localhost"], true, false);
    let file = dir.path().join("remote.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = {data:?}\nallow_remote = true\nlisten = [\"tcp:0.0.0.0:0\"]\n[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
            cert.display().to_string(),
            key.display().to_string(),
            ca.pem.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(idallocd)
        .args(["--config", file.to_str().unwrap()])
        .env_remove("LISTEN_FDS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("plain TCP is unauthenticated"), "{err}");
    assert!(
        !dir.path().join("data").join("db").exists(),
        "refused before recovery"
    );
}

/// The role a connected certificate has: `None` if it is refused at connect,
/// else whether `checkpoint` (an admin's operation) is allowed.
async fn admin_or_refused(endpoint: &str, config: ClientConfig) -> Option<bool> {
    let c = Client::connect_with(endpoint, config).await.ok()?;
    match c.checkpoint(None).await {
        Ok(_) => Some(true),
        Err(e) => match e.service() {
            Some(ServiceError::PermissionDenied(_)) => Some(false),
            _ => match e {
                ClientError::Tls { .. } => None,
                other => panic!("checkpoint failed otherwise: {other}"),
            },
        },
    }
}

/// Only `[tls] name_field` carries the name: an admin's name in a second
/// subject CN, a URI SAN, an email SAN or (under the default "cn") a DNS SAN
/// does not make its holder an admin. Each of these was an admin before
/// name_field existed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_name_field_names_the_holder() {
    let mut s = setup();
    let ca = s.ca.pem.clone();
    let ia5 = |n: &str| n.try_into().unwrap();

    let admin = s.ca.client("admin", "ops-admin", |_| {});
    assert_eq!(
        admin_or_refused(&s.endpoint, config(&ca, Some(&admin))).await,
        Some(true)
    );

    // Two subject CNs (the second as the CN attribute's OID, which rcgen
    // otherwise merges): ambiguous, refused, not admin.
    let two_cns = s.ca.client("two-cns", "db1-writer", |p| {
        p.distinguished_name
            .push(DnType::CustomDnType(vec![2, 5, 4, 3]), "ops-admin");
    });
    let r = refusal(&s.endpoint, config(&ca, Some(&two_cns))).await;
    assert!(
        r.contains("maps none of the certificate's names to a role"),
        "{r}"
    );
    let log = s.daemon.stderr();
    assert!(log.contains("its subject has 2 common names"), "{log}");

    for (stem, san) in [
        ("uri-san", SanType::URI(ia5("ops-admin"))),
        ("email-san", SanType::Rfc822Name(ia5("ops-admin"))),
        ("dns-san", SanType::DnsName(ia5("ops-admin"))),
    ] {
        let cert =
            s.ca.client(stem, "db1-writer", |p| p.subject_alt_names = vec![san]);
        assert_eq!(
            admin_or_refused(&s.endpoint, config(&ca, Some(&cert))).await,
            Some(false),
            "{stem}: the CN is the writer's; the SAN must not make it an admin"
        );
    }
    s.daemon.stop();

    // name_field = "dns_san": the DNS SAN names the holder; its CN does not.
    let mut s = setup_with("", |_| "name_field = \"dns_san\"\n".into());
    let ca = s.ca.pem.clone();
    let by_dns = s.ca.client("by-dns", "db1-writer", |p| {
        p.subject_alt_names = vec![SanType::DnsName(ia5("ops-admin"))]
    });
    assert_eq!(
        admin_or_refused(&s.endpoint, config(&ca, Some(&by_dns))).await,
        Some(true)
    );
    let by_cn = s.ca.client("by-cn", "ops-admin", |p| {
        p.subject_alt_names = vec![SanType::URI(ia5("ops-admin"))]
    });
    assert_eq!(
        admin_or_refused(&s.endpoint, config(&ca, Some(&by_cn))).await,
        None,
        "neither the CN nor a URI SAN is a DNS name: no role"
    );
    s.daemon.stop();

    // name_field = "dn": the whole subject, RFC 4514, most specific first.
    let mut s = setup_with("", |_| {
        "name_field = \"dn\"\nadmin_names = ['CN=ops-admin,O=Example\\, Inc.']\n".into()
    });
    let ca = s.ca.pem.clone();
    let full = s.ca.client("full-dn", "ops-admin", |p| {
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "Example, Inc.");
        p.distinguished_name.push(DnType::CommonName, "ops-admin");
    });
    assert_eq!(
        admin_or_refused(&s.endpoint, config(&ca, Some(&full))).await,
        Some(true)
    );
    let cn_only = s.ca.client("cn-only", "ops-admin", |_| {});
    assert_eq!(
        admin_or_refused(&s.endpoint, config(&ca, Some(&cn_only))).await,
        None,
        "CN=ops-admin alone is another DN"
    );
    s.daemon.stop();
}

/// `[tls] crl`: a revoked client certificate is refused in the handshake, and
/// the client says so in one line; one the CRL does not list is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused() {
    let mut s = setup_with("", |ca| {
        format!(
            "crl = {:?}\n",
            ca.crl("revoked", &[0x1d]).display().to_string()
        )
    });
    let ca = s.ca.pem.clone();
    let revoked = s.ca.client("revoked-writer", "db1-writer", |p| {
        p.serial_number = Some(SerialNumber::from(0x1du64))
    });
    let r = refusal(&s.endpoint, config(&ca, Some(&revoked))).await;
    assert!(r.contains("revoked"), "{r}");
    assert_eq!(r.lines().count(), 1, "{r}");
    let good = s.ca.client("good-writer", "db1-writer", |p| {
        p.serial_number = Some(SerialNumber::from(0x1eu64))
    });
    let c = Client::connect_with(&s.endpoint, config(&ca, Some(&good)))
        .await
        .unwrap();
    c.reserve(None, Kind::Vid, 1).await.unwrap();
    let log = s.daemon.stderr();
    assert!(log.contains("TLS connection refused"), "{log}");
    assert!(log.to_lowercase().contains("revoked"), "{log}");
    s.daemon.stop();

    // A CRL of another CA would leave every client's status unknown: refused
    // at start with the key named, not at every handshake.
    let dir = tempfile::tempdir().unwrap();
    let other = Ca::new(dir.path(), "other");
    let ours = Ca::new(dir.path(), "ours");
    let (cert, key) = ours.issue("server", &["localhost"], true, false);
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = {:?}\n[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\ncrl = {:?}\n",
            dir.path().join("data").display().to_string(),
            cert.display().to_string(),
            key.display().to_string(),
            ours.pem.display().to_string(),
            other.crl("foreign", &[1]).display().to_string(),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idallocd"))
        .args(["check-config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tls.crl") && err.contains("not a certificate of tls.client_ca"),
        "{err}"
    );
}

/// SIGHUP applies `[tls]` as a whole: new admin names, and a CRL added to the
/// file, take effect for the next handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_role_names_and_the_crl() {
    let mut s = setup();
    let ca = s.ca.pem.clone();
    let old_admin = s.ca.client("old-admin", "ops-admin", |_| {});
    let new_admin = s.ca.client("new-admin", "ops-admin-2", |_| {});
    let writer = s.ca.client("writer", "db1-writer", |p| {
        p.serial_number = Some(SerialNumber::from(0x2au64))
    });
    assert_eq!(
        admin_or_refused(&s.endpoint, config(&ca, Some(&old_admin))).await,
        Some(true)
    );
    assert_eq!(
        admin_or_refused(&s.endpoint, config(&ca, Some(&new_admin))).await,
        None
    );

    // First the names alone, then a CRL: each applies on its own SIGHUP.
    let file = s.daemon.dir.join("idallocd.toml");
    let edit = |from: &str, to: &str| {
        let text = std::fs::read_to_string(&file).unwrap();
        let edited = text.replace(from, to);
        assert_ne!(text, edited);
        std::fs::write(&file, edited).unwrap();
    };
    let reloaded = |n: usize| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = s.daemon.stderr();
            if log.matches("SIGHUP: configuration reloaded").count()
                + log.matches("SIGHUP: config changes").count()
                >= n
            {
                return log;
            }
            assert!(std::time::Instant::now() < deadline, "{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    edit(
        "admin_names = [\"ops-admin\"]\n",
        "admin_names = [\"ops-admin-2\"]\n",
    );
    s.daemon.signal(libc::SIGHUP);
    reloaded(1);
    assert_eq!(
        admin_or_refused(&s.endpoint, config(&ca, Some(&new_admin))).await,
        Some(true),
        "the new admin name applies"
    );
    assert_eq!(
        admin_or_refused(&s.endpoint, config(&ca, Some(&old_admin))).await,
        None,
        "the old one no longer does"
    );
    let w = Client::connect_with(&s.endpoint, config(&ca, Some(&writer)))
        .await
        .unwrap();
    w.reserve(None, Kind::Vid, 1).await.unwrap();

    let crl = s.ca.crl("hup", &[0x2a]);
    edit(
        "admin_names = [\"ops-admin-2\"]\n",
        &format!(
            "admin_names = [\"ops-admin-2\"]\ncrl = {:?}\n",
            crl.display().to_string()
        ),
    );
    s.daemon.signal(libc::SIGHUP);
    reloaded(2);
    let r = refusal(&s.endpoint, config(&ca, Some(&writer))).await;
    assert!(r.contains("revoked"), "{r}");
    let log = s.daemon.stderr();
    assert!(
        !log.contains("need a restart"),
        "a [tls] change is applied, not deferred: {log}"
    );
    s.daemon.stop();
}

/// Peers that open TCP connections to the TLS port and never send a
/// ClientHello (256 of them, four times `max_handshakes`) neither keep a
/// client with a certificate from being served promptly nor a unix-socket
/// writer: handshakes hold slots of their own, and when those are all taken
/// the oldest handshake gives its slot to the newest connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_connections_do_not_starve_the_authenticated() {
    let mut s = setup_with("max_handshakes = 64\n", |_| String::new());
    let ca = s.ca.pem.clone();
    let writer = s.ca.client("writer", "db1-writer", |_| {});
    let addr = s.endpoint.trim_start_matches("tls:").to_string();
    let mut silent = Vec::new();
    for _ in 0..256 {
        if let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        {
            silent.push(c);
        }
    }
    assert!(silent.len() >= 128, "only {} connected", silent.len());

    let started = std::time::Instant::now();
    let w = Client::connect_with(&s.endpoint, config(&ca, Some(&writer)))
        .await
        .unwrap();
    w.reserve(None, Kind::Vid, 1).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "a TLS writer waited {waited:?} behind silent connections"
    );

    let started = std::time::Instant::now();
    let u = Client::connect(&format!("unix:{}", s.daemon.socket.display()))
        .await
        .unwrap();
    u.reserve(None, Kind::Vid, 1).await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "a unix writer waited {waited:?} behind silent TLS connections"
    );
    drop(silent);
    s.daemon.stop();
}
