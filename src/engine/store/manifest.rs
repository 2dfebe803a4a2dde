//! The `id_allocator.json` manifests: format, paths and parsing.
//!
//! Invariant protected: *compatible files* (5) and *never guess* (8). The two
//! reference fields are written exactly as the reference allocator writes them;
//! unknown fields written by anyone else are kept on every rewrite; a manifest that
//! does not parse is an error naming its path, never a counter of zero.

use object_store::path::Path;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use idalloc_client::fork_id::ForkId;
use idalloc_client::namespace::{Kind, Namespace};

/// Path of the primary's manifest, relative to the configured root.
pub const PRIMARY_PATH: &str = "id_allocator.json";
/// Directory under which each fork keeps `{fork_id}/id_allocator.json`.
pub const FORKS_DIR: &str = "catalog/forks";
/// The key under which idalloc keeps its own fork metadata inside a fork manifest.
/// The reference reader ignores it (serde skips unknown fields).
const IDALLOC_KEY: &str = "idalloc";
/// The key under which a namespace that forks were merged into records the
/// highest end of their ids (`{"vid": N, "eid": M}`): it never grants below it.
const MERGED_KEY: &str = "idalloc_merged_floor";

/// Object-store path of a namespace's manifest; forks use the given text form.
pub fn path_for(ns: &Namespace) -> Path {
    match ns {
        Namespace::Primary => Path::from(PRIMARY_PATH),
        Namespace::Fork(id) => fork_path(&id.text()),
    }
}

/// Object-store path of a fork manifest for one spelling of its id.
pub fn fork_path(text: &str) -> Path {
    Path::from(format!("{FORKS_DIR}/{text}/id_allocator.json"))
}

/// What idalloc records about a fork inside its manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkMeta {
    /// Parent fork id text; `None` for the primary.
    #[serde(default)]
    pub parent: Option<String>,
    /// The vid floor the fork was created with.
    #[serde(default)]
    pub floor_vid: u64,
    /// The eid floor the fork was created with.
    #[serde(default)]
    pub floor_eid: u64,
    /// A tombstone: the fork was dropped and its ids are retired.
    #[serde(default)]
    pub dropped: bool,
    /// A tombstone: the fork was merged into this namespace (a fork id's text or
    /// `"primary"`), and its ids are retired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<String>,
    /// The request id of the `fork merge` call that wrote the merge tombstone:
    /// every attempt of that call is told `merged_now: true`, any other `false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_by: Option<String>,
}

impl ForkMeta {
    /// Whether the fork serves no more ids (dropped or merged).
    pub fn retired(&self) -> bool {
        self.dropped || self.merged_into.is_some()
    }
}

/// A manifest: the ceiling of each counter (every id below it may have been handed
/// out, none at or above it has), plus any fields we do not own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Ceiling of vertex ids.
    pub next_vid_batch: u64,
    /// Ceiling of edge ids.
    pub next_eid_batch: u64,
    /// Fields we do not know, kept verbatim on rewrite.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Manifest {
    /// A manifest with these ceilings and nothing else.
    pub fn new(vid: u64, eid: u64) -> Self {
        Manifest {
            next_vid_batch: vid,
            next_eid_batch: eid,
            extra: Map::new(),
        }
    }

    /// The ceiling of one kind.
    pub fn ceiling(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Vid => self.next_vid_batch,
            Kind::Eid => self.next_eid_batch,
        }
    }

    /// Set the ceiling of one kind.
    pub fn set_ceiling(&mut self, kind: Kind, value: u64) {
        match kind {
            Kind::Vid => self.next_vid_batch = value,
            Kind::Eid => self.next_eid_batch = value,
        }
    }

    /// Parse, naming `path` in the error.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if let Some(v) = m.extra.get(IDALLOC_KEY) {
            serde_json::from_value::<ForkMeta>(v.clone())
                .map_err(|e| format!("field \"{IDALLOC_KEY}\" of {path}: {e}"))?;
        }
        if let Some(v) = m.extra.get(MERGED_KEY) {
            let ok = v.as_object().is_some_and(|o| {
                o.iter()
                    .all(|(k, v)| matches!(k.as_str(), "vid" | "eid") && v.as_u64().is_some())
            });
            if !ok {
                return Err(format!(
                    "field \"{MERGED_KEY}\" of {path} is not {{\"vid\": N, \"eid\": M}}"
                ));
            }
        }
        Ok(m)
    }

    /// Serialize in the reference's layout (pretty JSON, reference fields first).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising a struct of u64s and JSON values cannot fail.
        serde_json::to_vec_pretty(self).expect("manifest serialises")
    }

    /// idalloc's fork metadata, if this manifest carries it.
    pub fn fork_meta(&self) -> Option<ForkMeta> {
        self.extra
            .get(IDALLOC_KEY)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// The floor below which this namespace never grants again, because forks
    /// whose ids reach up to it were merged into it (0 when none was).
    pub fn merged_floor(&self, kind: Kind) -> u64 {
        self.extra
            .get(MERGED_KEY)
            .and_then(|v| v.get(kind.as_str()))
            .and_then(|v| v.as_u64())
            .unwrap_or(0)
    }

    /// Raise the merged floor of `kind` to at least `at`.
    pub fn raise_merged_floor(&mut self, kind: Kind, at: u64) {
        let cur = self.merged_floor(kind);
        let entry = self
            .extra
            .entry(MERGED_KEY.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        entry
            .as_object_mut()
            .expect("an object")
            .insert(kind.as_str().to_string(), Value::from(cur.max(at)));
    }

    /// Record idalloc's fork metadata.
    pub fn set_fork_meta(&mut self, meta: &ForkMeta) {
        self.extra.insert(
            IDALLOC_KEY.to_string(),
            serde_json::to_value(meta).expect("fork meta serialises"),
        );
    }
}

/// Parse a fork directory name under `catalog/forks/` (either text form).
pub fn fork_from_dir(name: &str) -> Option<ForkId> {
    ForkId::parse(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference allocator's manifest struct, as it reads our files.
    #[derive(Deserialize)]
    struct Reference {
        next_vid_batch: u64,
        next_eid_batch: u64,
    }

    #[test]
    fn reference_files_round_trip_and_unknown_fields_survive() {
        let p = Path::from(PRIMARY_PATH);
        let text = br#"{"next_vid_batch": 5000, "next_eid_batch": 7, "owner": {"x": 1}}"#;
        let mut m = Manifest::parse(&p, text).unwrap();
        assert_eq!((m.next_vid_batch, m.next_eid_batch), (5000, 7));
        m.set_ceiling(Kind::Vid, 6000);
        let bytes = m.to_bytes();
        let r: Reference = serde_json::from_slice(&bytes).unwrap();
        assert_eq!((r.next_vid_batch, r.next_eid_batch), (6000, 7));
        let back = Manifest::parse(&p, &bytes).unwrap();
        assert_eq!(back.extra["owner"]["x"], 1);
    }

    #[test]
    fn garbage_is_an_error_not_zero() {
        let p = Path::from(PRIMARY_PATH);
        for bad in [
            &b""[..],
            b"{}",
            b"{\"next_vid_batch\": -1, \"next_eid_batch\": 0}",
            b"{\"next_vid_batch\": 1.5, \"next_eid_batch\": 0}",
            b"{\"next_vid_batch\": 18446744073709551616, \"next_eid_batch\": 0}",
            b"not json",
            b"{\"next_vid_batch\": 1, \"next_eid_batch\": 2, \"idalloc\": 3}",
        ] {
            assert!(
                Manifest::parse(&p, bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn fork_paths_use_the_text_form() {
        let f = ForkId::parse("01J2VF4Z0Y8Q3R5S7T9V1W3X5Z").unwrap();
        assert_eq!(
            path_for(&Namespace::Fork(f)).as_ref(),
            "catalog/forks/01J2VF4Z0Y8Q3R5S7T9V1W3X5Z/id_allocator.json"
        );
    }
}
