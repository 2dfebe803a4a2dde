//! The object-store tier, which holds the authoritative ceilings: building a
//! store from a URL (and redacting it), the [`CeilingStore`] through which the
//! engine reads and conditionally writes manifests, the manifests themselves
//! ([`manifest`]), every daemon's lease records (`lease_record`), the lock of a
//! `file://` root (`root_lock`) and the probe of a store's conditional writes
//! ([`check`]).
//!
//! Invariants protected: *never guess* (8) — "not found" is recognised by the
//! error's type (`object_store::Error::NotFound`), never by its text, and any other
//! failure is retried and then reported as unavailable, never read as "no manifest";
//! *unique* (1) — a lease is owned only once its conditional write succeeded, and an
//! ambiguous write (a time-out) is retried with the same precondition, so it either
//! fails the precondition (and the caller re-reads) or wins cleanly.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use idalloc_client::protocol::{MirrorHealth, WriterMode};

use super::OpenError;
use manifest::{Manifest, FORKS_DIR};

pub mod check;
mod lease_record;
pub mod manifest;
pub(super) mod root_lock;

/// An object store ready for the engine: the store (already rooted at the
/// configured prefix), its writer mode, and how to name it in logs.
#[derive(Clone)]
pub struct StoreHandle {
    /// The store, rooted at the configured prefix.
    pub store: Arc<dyn ObjectStore>,
    /// Single-writer (`file://`) or multi-writer.
    pub mode: WriterMode,
    /// The URL with credentials removed, for logs and `status`.
    pub display_url: String,
    /// For `file://` roots: the directory, so that manifests can be fsynced.
    pub local_root: Option<PathBuf>,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreHandle")
            .field("url", &self.display_url)
            .field("mode", &self.mode)
            .finish()
    }
}

impl StoreHandle {
    /// Build from a URL (`file:///p`, `memory://`, `s3://b/p`, `gs://b/p`, `az://c/p`)
    /// and builder options (`aws_endpoint`, `aws_access_key_id`, ...). Cloud
    /// builders start from the usual `AWS_*`/`GOOGLE_*`/`AZURE_*` environment; an
    /// option the builder does not know is an error naming it.
    pub fn from_url(url: &str, options: &[(String, String)]) -> Result<StoreHandle, OpenError> {
        Self::build(url, options, true)
    }

    /// Everything [`StoreHandle::from_url`] checks — scheme, path, every option
    /// through the backend's own builder — without creating a directory or
    /// connecting anywhere (`idallocd check-config`).
    pub fn check_url(url: &str, options: &[(String, String)]) -> Result<(), OpenError> {
        Self::build(url, options, false).map(|_| ())
    }

    fn build(
        url: &str,
        options: &[(String, String)],
        create: bool,
    ) -> Result<StoreHandle, OpenError> {
        // The builders' errors may quote an option (an endpoint with a password).
        let bad = |m: String| OpenError::StoreConfig(redact_text(&m));
        let parsed = url::Url::parse(url)
            .map_err(|e| bad(format!("object store URL {}: {e}", redact_url(url))))?;
        let display_url = redact(&parsed);
        let prefix = Path::parse(parsed.path().trim_start_matches('/'))
            .map_err(|e| bad(format!("object store URL {display_url}: bad path: {e}")))?;
        match parsed.scheme() {
            "memory" => {
                reject_options("memory://", options)?;
                Ok(StoreHandle::custom(
                    Arc::new(object_store::memory::InMemory::new()),
                    WriterMode::MultiWriter,
                    &display_url,
                ))
            }
            "file" => {
                reject_options("file://", options)?;
                let dir = parsed
                    .to_file_path()
                    .map_err(|_| bad(format!("object store URL {display_url} is not an absolute file path")))?;
                if !create {
                    return Ok(StoreHandle {
                        store: Arc::new(object_store::memory::InMemory::new()),
                        mode: WriterMode::SingleWriter,
                        display_url,
                        local_root: Some(dir),
                    });
                }
                std::fs::create_dir_all(&dir)
                    .map_err(|e| bad(format!("cannot create object store directory {}: {e}", dir.display())))?;
                // with_fsync: the staging file is fsynced before it is renamed into
                // place, then its directory, and new directories up to the first one
                // that existed. Without it a power cut after the rename leaves an
                // empty manifest: the previous ceiling is gone (DESIGN.md).
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(format!("object store directory {}: {e}", dir.display())))?
                    .with_fsync(true);
                Ok(StoreHandle {
                    store: Arc::new(fs),
                    mode: WriterMode::SingleWriter,
                    display_url,
                    local_root: Some(dir),
                })
            }
            "s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss" => {
                let store = cloud_store(&parsed, options).map_err(|e| bad(format!("{display_url}: {e}")))?;
                let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
                    Arc::from(store)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
                };
                Ok(StoreHandle {
                    store,
                    mode: WriterMode::MultiWriter,
                    display_url,
                    local_root: None,
                })
            }
            other => Err(bad(format!(
                "object store URL {display_url}: unsupported scheme {other:?} (use file://, memory://, s3://, gs:// or az://)"
            ))),
        }
    }

    /// Wrap any store (for tests: `InMemory`, a fault-injecting wrapper).
    pub fn custom(store: Arc<dyn ObjectStore>, mode: WriterMode, display_url: &str) -> StoreHandle {
        StoreHandle {
            store,
            mode,
            display_url: display_url.to_string(),
            local_root: None,
        }
    }
}

fn reject_options(scheme: &str, options: &[(String, String)]) -> Result<(), OpenError> {
    match options.first() {
        None => Ok(()),
        Some((k, _)) => Err(OpenError::StoreConfig(format!(
            "option {k:?} does not apply to {scheme} object stores"
        ))),
    }
}

fn cloud_store(
    url: &url::Url,
    options: &[(String, String)],
) -> Result<Box<dyn ObjectStore>, String> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
    let unknown = |k: &str| format!("unknown object store option {k:?}");
    // The bucket (or container) comes from the URL; the rest of the path is our prefix,
    // applied with a PrefixStore by the caller.
    let root = format!("{}://{}", url.scheme(), url.host_str().unwrap_or_default());
    Ok(match url.scheme() {
        "s3" | "s3a" => {
            let mut b = AmazonS3Builder::from_env()
                .with_url(root)
                .with_retry(no_inner_retries());
            for (k, v) in options {
                let key: AmazonS3ConfigKey =
                    k.to_ascii_lowercase().parse().map_err(|_| unknown(k))?;
                b = b.with_config(key, v);
            }
            Box::new(b.build().map_err(|e| e.to_string())?)
        }
        "gs" => {
            let mut b = GoogleCloudStorageBuilder::from_env()
                .with_url(root)
                .with_retry(no_inner_retries());
            for (k, v) in options {
                let key: GoogleConfigKey =
                    k.to_ascii_lowercase().parse().map_err(|_| unknown(k))?;
                b = b.with_config(key, v);
            }
            Box::new(b.build().map_err(|e| e.to_string())?)
        }
        _ => {
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_url(root)
                .with_retry(no_inner_retries());
            for (k, v) in options {
                let key: AzureConfigKey = k.to_ascii_lowercase().parse().map_err(|_| unknown(k))?;
                b = b.with_config(key, v);
            }
            Box::new(b.build().map_err(|e| e.to_string())?)
        }
    })
}

/// The one redaction of a store URL for logs, `status` and `check-config`: no
/// user info, password or query string (which may carry SAS tokens). A URL that
/// does not parse is shown as its scheme only.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => redact(&u),
        Err(_) => match url.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://<unparseable URL>"),
            None => "<unparseable URL>".to_string(),
        },
    }
}

/// A store option's value as it may be shown: secrets (keys, tokens, passwords,
/// SAS, credentials) masked, everything else (region, endpoint, ...) as it is.
pub fn redact_option(key: &str, value: &str) -> String {
    let k = key.to_ascii_lowercase();
    let secret = [
        "secret",
        "key",
        "token",
        "password",
        "sas",
        "credential",
        "signature",
    ]
    .iter()
    .any(|w| k.contains(w));
    if secret {
        "<redacted>".to_string()
    } else {
        // An endpoint may carry user info, a query or a fragment.
        redact_text(value)
    }
}

/// A URL without user info, password, query string (which may carry SAS tokens)
/// or fragment.
fn redact(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// `text` with every URL in it redacted as [`redact_url`] does: store errors
/// quote the URL of the request that failed, endpoint and credentials included.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let scheme_start = rest[..at]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
            .map_or(0, |i| i + 1);
        let end = rest[at..]
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`'))
            .map_or(rest.len(), |i| at + i);
        out.push_str(&rest[..scheme_start]);
        let token = &rest[scheme_start..end];
        // A URL quoted inside an error often ends in punctuation of the sentence.
        let trimmed = token.trim_end_matches([',', ';', ')', ']', '.', ':']);
        if scheme_start == at {
            out.push_str(token);
        } else {
            out.push_str(&redact_url(trimmed));
            out.push_str(&token[trimmed.len()..]);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// A manifest with the version that conditional updates must match.
#[derive(Debug, Clone)]
pub struct Versioned {
    /// The manifest's content.
    pub manifest: Manifest,
    /// ETag and version of the object as read or written; GCS matches on version.
    pub version: UpdateVersion,
}

/// The outcome of a conditional write that reached the store.
#[derive(Debug)]
pub enum Written {
    /// The write won; here is the new version.
    Won(UpdateVersion),
    /// Someone else wrote first (precondition failed, or the object already exists).
    Lost,
}

/// Why a store call failed after its retries.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Time-outs or transient errors, retries exhausted.
    #[error("object store unavailable: {0}")]
    Unavailable(String),
    /// A manifest exists but does not parse.
    #[error("manifest {path} cannot be parsed: {reason}")]
    Corrupt {
        /// Object path.
        path: String,
        /// Parser message.
        reason: String,
    },
    /// The store refuses the operation for good (unsupported, permission denied).
    #[error("object store refused {op} on {path}: {reason}")]
    Refused {
        /// Operation.
        op: &'static str,
        /// Object path.
        path: String,
        /// The store's message.
        reason: String,
    },
}

/// The longest pause between two attempts of one store call.
const MAX_STORE_BACKOFF: Duration = Duration::from_secs(5);

/// object_store's own retries, off: [`CeilingStore`] retries with its own policy and
/// time-out per attempt, and a second layer of retries inside would multiply the
/// attempts and hide the real cause behind "retries exhausted".
fn no_inner_retries() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 0,
        ..object_store::RetryConfig::default()
    }
}

/// Retry and time-out policy of store calls.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Time-out of one attempt.
    pub timeout: Duration,
    /// Retries after the first attempt.
    pub retries: u32,
    /// First backoff; doubles per retry.
    pub backoff: Duration,
}

#[derive(Default)]
struct Health {
    last_error: Option<(Instant, String)>,
    last_success: Option<Instant>,
    healthy: bool,
}

/// The engine's view of the object store.
pub struct CeilingStore {
    handle: StoreHandle,
    policy: RetryPolicy,
    health: Mutex<Health>,
}

enum Attempt<T> {
    Done(T),
    Transient(String),
    Fatal(StoreError),
}

impl CeilingStore {
    /// Wrap a store handle with a retry policy.
    pub fn new(handle: StoreHandle, policy: RetryPolicy) -> Self {
        CeilingStore {
            handle,
            policy,
            health: Mutex::new(Health {
                healthy: true,
                ..Health::default()
            }),
        }
    }

    /// Single- or multi-writer.
    pub fn mode(&self) -> WriterMode {
        self.handle.mode
    }

    /// The URL without secrets.
    pub fn display_url(&self) -> &str {
        &self.handle.display_url
    }

    /// Health as `status` reports it.
    pub fn health(&self) -> MirrorHealth {
        let h = self.health.lock().unwrap();
        MirrorHealth {
            healthy: h.healthy,
            last_error: h.last_error.as_ref().map(|(_, e)| e.clone()),
            last_error_age_ms: h
                .last_error
                .as_ref()
                .map(|(t, _)| t.elapsed().as_millis() as u64),
            last_success_age_ms: h.last_success.map(|t| t.elapsed().as_millis() as u64),
        }
    }

    fn note(&self, op: &'static str, started: Instant, err: Option<&str>) {
        metrics::histogram!("idalloc_store_seconds", "op" => op)
            .record(started.elapsed().as_secs_f64());
        let mut h = self.health.lock().unwrap();
        match err {
            None => {
                h.healthy = true;
                h.last_success = Some(Instant::now());
            }
            Some(e) => {
                metrics::counter!("idalloc_store_errors_total", "op" => op).increment(1);
                h.healthy = false;
                h.last_error = Some((Instant::now(), redact_text(&format!("{op}: {e}"))));
            }
        }
    }

    /// Run `f` with a time-out per attempt and backoff between transient failures.
    ///
    /// `LocalFileSystem` writes on a blocking thread that a time-out cannot stop: a
    /// write abandoned after its time-out could still land after a newer one and
    /// roll the ceiling back. Local writes are therefore awaited to the end; a disk
    /// that slow stalls sled as well.
    async fn retry<T, F, Fut>(
        &self,
        op: &'static str,
        path: &Path,
        mut f: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Attempt<T>>,
    {
        use backon::BackoffBuilder;
        let bounded = matches!(op, "get" | "list") || self.handle.local_root.is_none();
        // Exponential from `backoff`, jittered so that daemons retrying against one
        // recovering store do not all come back in the same instant.
        let mut pauses = backon::ExponentialBuilder::default()
            .with_min_delay(self.policy.backoff)
            .with_max_delay(MAX_STORE_BACKOFF)
            .with_max_times(self.policy.retries as usize)
            .with_jitter()
            .build();
        let mut last = String::new();
        for attempt in 0..=self.policy.retries {
            if attempt > 0 {
                let Some(pause) = pauses.next() else { break };
                tokio::time::sleep(pause).await;
            }
            let started = Instant::now();
            let outcome = if bounded {
                tokio::time::timeout(self.policy.timeout, f()).await
            } else {
                Ok(f().await)
            };
            match outcome {
                Ok(Attempt::Done(v)) => {
                    self.note(op, started, None);
                    return Ok(v);
                }
                Ok(Attempt::Fatal(e)) => {
                    self.note(op, started, Some(&e.to_string()));
                    return Err(e);
                }
                Ok(Attempt::Transient(e)) => {
                    last = format!("{op} {path}: {e}");
                    self.note(op, started, Some(&last));
                }
                Err(_) => {
                    last = format!("{op} {path}: timed out after {:?}", self.policy.timeout);
                    self.note(op, started, Some(&last));
                }
            }
            tracing::debug!(attempt, error = %last, "object store call failed");
        }
        Err(StoreError::Unavailable(last))
    }

    /// Read a manifest. `Ok(None)` only when the store says the object is not there.
    pub async fn read(&self, path: &Path) -> Result<Option<Versioned>, StoreError> {
        match self.read_bytes(path).await? {
            None => Ok(None),
            Some((bytes, version)) => match Manifest::parse(path, &bytes) {
                Ok(manifest) => Ok(Some(Versioned { manifest, version })),
                Err(reason) => Err(StoreError::Corrupt {
                    path: path.to_string(),
                    reason,
                }),
            },
        }
    }

    /// Read any object with its version. `Ok(None)` only when the store says the
    /// object is not there.
    pub async fn read_bytes(
        &self,
        path: &Path,
    ) -> Result<Option<(bytes::Bytes, UpdateVersion)>, StoreError> {
        let store = &self.handle.store;
        self.retry("get", path, || async {
            let res = match store.get(path).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Attempt::Done(None),
                Err(e) => return classify("get", path, e),
            };
            let version = UpdateVersion {
                e_tag: res.meta.e_tag.clone(),
                version: res.meta.version.clone(),
            };
            match res.bytes().await {
                Ok(b) => Attempt::Done(Some((b, version))),
                Err(e) => classify("get", path, e),
            }
        })
        .await
    }

    /// Create `bytes` at `path` only if no object is there (`PutMode::Create`).
    /// `Lost` when one is: possibly our own earlier attempt, whose reply was lost.
    pub async fn create_bytes(&self, path: &Path, bytes: Vec<u8>) -> Result<Written, StoreError> {
        self.put(path, bytes::Bytes::from(bytes), PutMode::Create, "create")
            .await
    }

    /// Write `manifest` at `path`: create it when `expected` is `None`, else replace
    /// the version read. In single-writer mode (no conditional update) the replace is
    /// an overwrite, which sled's directory lock makes safe.
    pub async fn write(
        &self,
        path: &Path,
        manifest: &Manifest,
        expected: Option<&UpdateVersion>,
    ) -> Result<Written, StoreError> {
        let mode = match (expected, self.handle.mode) {
            (None, _) => PutMode::Create,
            (Some(_), WriterMode::SingleWriter) => PutMode::Overwrite,
            (Some(v), WriterMode::MultiWriter) => PutMode::Update(v.clone()),
        };
        let op = if expected.is_none() {
            "create"
        } else {
            "update"
        };
        self.put(path, bytes::Bytes::from(manifest.to_bytes()), mode, op)
            .await
    }

    async fn put(
        &self,
        path: &Path,
        bytes: bytes::Bytes,
        mode: PutMode,
        op: &'static str,
    ) -> Result<Written, StoreError> {
        let store = &self.handle.store;
        self.retry(op, path, || {
            let opts = PutOptions::from(mode.clone());
            let payload = PutPayload::from(bytes.clone());
            async move {
                match store.put_opts(path, payload, opts).await {
                    Ok(r) => Attempt::Done(Written::Won(UpdateVersion {
                        e_tag: r.e_tag,
                        version: r.version,
                    })),
                    Err(object_store::Error::Precondition { .. })
                    | Err(object_store::Error::AlreadyExists { .. }) => {
                        metrics::counter!("idalloc_conditional_writes_lost_total", "op" => op)
                            .increment(1);
                        Attempt::Done(Written::Lost)
                    }
                    Err(e) => classify(op, path, e),
                }
            }
        })
        .await
    }

    /// Replace the object at `path` only if it is still the version read (an
    /// overwrite in single-writer mode, where the root lock excludes others).
    pub async fn replace_bytes(
        &self,
        path: &Path,
        bytes: Vec<u8>,
        expected: &UpdateVersion,
    ) -> Result<Written, StoreError> {
        let mode = match self.handle.mode {
            WriterMode::SingleWriter => PutMode::Overwrite,
            WriterMode::MultiWriter => PutMode::Update(expected.clone()),
        };
        self.put(path, bytes::Bytes::from(bytes), mode, "update")
            .await
    }

    /// Write `bytes` at `path` whatever is there: for objects only this daemon
    /// writes (its lease records).
    pub async fn overwrite_bytes(&self, path: &Path, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.put(
            path,
            bytes::Bytes::from(bytes),
            PutMode::Overwrite,
            "overwrite",
        )
        .await
        .map(|_| ())
    }

    /// The store itself, for probes that make their own calls.
    pub fn raw_store(&self) -> Arc<dyn ObjectStore> {
        self.handle.store.clone()
    }

    /// For `file://` roots: the directory.
    pub fn local_root(&self) -> Option<&std::path::Path> {
        self.handle.local_root.as_deref()
    }

    /// Every object under `prefix`.
    pub async fn list_paths(&self, prefix: &Path) -> Result<Vec<Path>, StoreError> {
        let store = &self.handle.store;
        self.retry("list", prefix, || async {
            let metas: Result<Vec<_>, _> = store.list(Some(prefix)).try_collect().await;
            match metas {
                Ok(metas) => Attempt::Done(metas.into_iter().map(|m| m.location).collect()),
                Err(object_store::Error::NotFound { .. }) => Attempt::Done(Vec::new()),
                Err(e) => classify("list", prefix, e),
            }
        })
        .await
    }

    /// Directory names under `catalog/forks/` (one per fork manifest spelling).
    pub async fn list_fork_dirs(&self) -> Result<Vec<String>, StoreError> {
        let store = &self.handle.store;
        let prefix = Path::from(FORKS_DIR);
        self.retry("list", &prefix, || async {
            let metas: Result<Vec<_>, _> = store.list(Some(&prefix)).try_collect().await;
            match metas {
                Ok(metas) => {
                    let mut dirs: Vec<String> = metas
                        .into_iter()
                        .filter_map(|m| {
                            let parts: Vec<_> = m.location.parts().collect();
                            // catalog / forks / {id} / id_allocator.json
                            (parts.len() == 4 && parts[3].as_ref() == "id_allocator.json")
                                .then(|| parts[2].as_ref().to_string())
                        })
                        .collect();
                    dirs.sort();
                    dirs.dedup();
                    Attempt::Done(dirs)
                }
                Err(object_store::Error::NotFound { .. }) => Attempt::Done(Vec::new()),
                Err(e) => classify("list", &prefix, e),
            }
        })
        .await
    }
}

fn classify<T>(op: &'static str, path: &Path, e: object_store::Error) -> Attempt<T> {
    let (line, status) = one_line(&e);
    // The store's errors quote the request's URL, endpoint and credentials
    // included; from here on they reach logs, `status` and replies.
    let line = redact_text(&line);
    let refused = |reason: String| {
        Attempt::Fatal(StoreError::Refused {
            op,
            path: path.to_string(),
            reason,
        })
    };
    match e {
        object_store::Error::NotImplemented { .. }
        | object_store::Error::NotSupported { .. }
        | object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. }
        | object_store::Error::UnknownConfigurationKey { .. } => refused(line),
        // A client error other than a time-out or throttling cannot succeed on a
        // retry (a missing container, a bad request, a method not implemented):
        // say so at once, with the store's code.
        _ if status
            .is_some_and(|s| (400..500).contains(&s) && s != 408 && s != 429 || s == 501) =>
        {
            refused(line)
        }
        _ => Attempt::Transient(line),
    }
}

/// A store error on one line: the HTTP status and the error code and message of
/// an XML or JSON error body instead of the body itself, at most 300 characters.
fn one_line(e: &object_store::Error) -> (String, Option<u16>) {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    let status = text
        .split("status code: ")
        .nth(1)
        .and_then(|rest| rest.get(..3))
        .and_then(|d| d.parse::<u16>().ok());
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let close = format!("</{name}>");
        let start = text.find(&open)? + open.len();
        let end = text[start..].find(&close)? + start;
        Some(text[start..end].trim().to_string())
    };
    let mut line = match (tag("Code"), tag("Message")) {
        (Some(code), msg) => {
            let head = text
                .split('<')
                .next()
                .unwrap_or("")
                .trim_end_matches([' ', ':']);
            match msg {
                Some(m) => format!("{head}: {code}: {m}"),
                None => format!("{head}: {code}"),
            }
        }
        _ => text.clone(),
    };
    line = line.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > 300 {
        line = line.chars().take(297).collect::<String>() + "...";
    }
    (line, status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_are_one_line_and_client_errors_are_not_retried() {
        #[derive(Debug)]
        struct Body(&'static str);
        impl std::fmt::Display for Body {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for Body {}
        let azure = object_store::Error::Generic {
            store: "MicrosoftAzure",
            source: Box::new(Body(
                "Server returned non-2xx status code: 404 Not Found: <?xml version=\"1.0\"?>\n<Error>\n  <Code>ContainerNotFound</Code>\n  <Message>The specified container does not exist.\nRequestId:1</Message>\n</Error>",
            )),
        };
        let p = Path::from("id_allocator.json");
        match classify::<()>("get", &p, azure) {
            Attempt::Fatal(StoreError::Refused { reason, .. }) => {
                assert!(!reason.contains('\n') && !reason.contains('<'), "{reason}");
                assert!(
                    reason.contains("404") && reason.contains("ContainerNotFound"),
                    "{reason}"
                );
            }
            _ => panic!("a 404 on the container is not transient"),
        }
        let busy = object_store::Error::Generic {
            store: "S3",
            source: Box::new(Body(
                "Server returned non-2xx status code: 503 Service Unavailable: slow down",
            )),
        };
        assert!(matches!(
            classify::<()>("get", &p, busy),
            Attempt::Transient(_)
        ));
        let throttled = object_store::Error::Generic {
            store: "S3",
            source: Box::new(Body(
                "Server returned non-2xx status code: 429 Too Many Requests: ",
            )),
        };
        assert!(matches!(
            classify::<()>("get", &p, throttled),
            Attempt::Transient(_)
        ));
    }

    #[test]
    fn urls_lose_their_secrets_for_logs_and_status() {
        let u = url::Url::parse("s3://AKIAEXAMPLE:s3cr3t@bucket/graphs/db1?sig=abc&x=1").unwrap();
        let shown = redact(&u);
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("AKIAEXAMPLE"),
            "{shown}"
        );
        assert!(!shown.contains("sig="), "{shown}");
        assert!(shown.contains("bucket/graphs/db1"), "{shown}");
    }

    #[test]
    fn urls_inside_text_lose_their_secrets() {
        let e = "Error performing GET http://AKIA:hunter2@10.0.0.1:9000/b/x?X-Amz-Signature=abc#frag in 3ms, after 2 retries: (http://u:p@h/)";
        let shown = redact_text(e);
        assert_eq!(
            shown,
            "Error performing GET http://10.0.0.1:9000/b/x in 3ms, after 2 retries: (http://h/)"
        );
        assert_eq!(redact_text("no urls here: a://"), "no urls here: a://");
        assert_eq!(
            redact_option("aws_endpoint", "http://u:pw@minio:9000/#x"),
            "http://minio:9000/"
        );
        assert_eq!(redact_url("s3://b/p#frag"), "s3://b/p");
    }

    #[test]
    fn bad_urls_and_options_are_named() {
        let e = StoreHandle::from_url("ftp://x/y", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported scheme"), "{e}");
        let e = StoreHandle::from_url("s3://bucket/p", &[("aws_colour".into(), "blue".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("aws_colour"), "{e}");
        let e = StoreHandle::from_url("memory://", &[("aws_region".into(), "x".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("aws_region"), "{e}");
        let h = StoreHandle::from_url("memory://", &[]).unwrap();
        assert_eq!(h.mode, WriterMode::MultiWriter);
    }
}
