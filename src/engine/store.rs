//! SKELETON
use std::path::PathBuf;
use std::sync::Arc;

use object_store::ObjectStore;

use crate::protocol::WriterMode;

use super::OpenError;

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

impl StoreHandle {
    /// Build from a URL (`file:///p`, `memory://`, `s3://b/p`, `gs://`, `az://`) and
    /// builder options (`aws_endpoint`, `aws_access_key_id`, ...). Also reads the
    /// usual `AWS_*`/`GOOGLE_*`/`AZURE_*` environment.
    pub fn from_url(url: &str, options: &[(String, String)]) -> Result<StoreHandle, OpenError> {
        let _ = (url, options);
        todo!()
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
