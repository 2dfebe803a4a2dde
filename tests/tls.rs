//! TLS listeners with client certificates, against the real daemon and real
//! certificates (rcgen): who is refused, with which error, and what each role may
//! do. Attacks "who may do what" in docs/guarantees.md: no certificate, another
//! CA's, an expired one, one whose names have no role, a writer's calling admin
//! operations; the right ones work; the server certificate reloads on SIGHUP; and
//! the configurations that would expose plain TCP are refused at start.

mod daemon_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use daemon_support::*;
use idalloc_client::client::{Client, ClientConfig, ClientError};
use idalloc_client::{ForkId, Kind, Namespace, ServiceError, TlsFiles};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
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
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "idalloc-test-ca");
    let other = Ca::new(dir.path(), "another-ca");
    let server = ca.issue("server", &["localhost", "127.0.0.1"], true, false);
    let port = free_port();
    let endpoint = format!("tls:127.0.0.1:{port}");
    let tls = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nadmin_names = [\"ops-admin\"]\nwriter_names = [\"db1-writer\"]\n",
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
    let ctl = env!("CARGO_BIN_EXE_idallocctl");
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
