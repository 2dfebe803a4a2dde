//! Namespaces (the primary, or one fork) and id kinds (vertex, edge).
//!
//! Invariant protected: uniqueness is per namespace *and* kind, so every counter in
//! the system is addressed by exactly one `(Namespace, Kind)` pair.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::fork_id::ForkId;

/// Which counter of a namespace: vertex ids or edge ids.
///
/// Spelled `"vid"`/`"eid"` in JSON (as on the command line); bincode encodes the
/// variant index, so the spelling is not part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Vertex ids (`next_vid_batch` in the manifest).
    Vid,
    /// Edge ids (`next_eid_batch` in the manifest).
    Eid,
}

impl Kind {
    /// Both kinds, in manifest order.
    pub const ALL: [Kind; 2] = [Kind::Vid, Kind::Eid];

    /// Index into per-kind arrays.
    pub fn index(self) -> usize {
        match self {
            Kind::Vid => 0,
            Kind::Eid => 1,
        }
    }

    /// Lowercase name, as the CLI spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Vid => "vid",
            Kind::Eid => "eid",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vid" => Ok(Kind::Vid),
            "eid" => Ok(Kind::Eid),
            other => Err(format!(
                "unknown id kind {other:?}: expected \"vid\" or \"eid\""
            )),
        }
    }
}

/// A namespace: the primary database or one fork.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Namespace {
    /// The primary database (`id_allocator.json` at the root).
    Primary,
    /// A fork (`catalog/forks/{id}/id_allocator.json`).
    Fork(ForkId),
}

impl Namespace {
    /// The fork id, if this is a fork.
    pub fn fork(&self) -> Option<ForkId> {
        match self {
            Namespace::Primary => None,
            Namespace::Fork(f) => Some(*f),
        }
    }

    /// Parse the wire/CLI form: `None` (or an empty string) is the primary.
    pub fn from_wire(fork: Option<&str>) -> Result<Self, crate::fork_id::ParseForkIdError> {
        match fork {
            None | Some("") => Ok(Namespace::Primary),
            Some(text) => Ok(Namespace::Fork(ForkId::parse(text)?)),
        }
    }
}

/// A fork id names that fork: `client.allocator(fork)`.
impl From<ForkId> for Namespace {
    fn from(fork: ForkId) -> Self {
        Namespace::Fork(fork)
    }
}

/// `None` is the primary, `Some(fork)` that fork: for callers that hold an
/// optional fork id (a `--fork` flag, a writer configured for either).
impl From<Option<ForkId>> for Namespace {
    fn from(fork: Option<ForkId>) -> Self {
        fork.map_or(Namespace::Primary, Namespace::Fork)
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Namespace::Primary => f.write_str("primary"),
            Namespace::Fork(id) => write!(f, "fork {id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_lowercase_in_json() {
        assert_eq!(serde_json::to_string(&Kind::Vid).unwrap(), "\"vid\"");
        assert_eq!(serde_json::from_str::<Kind>("\"eid\"").unwrap(), Kind::Eid);
    }
}
