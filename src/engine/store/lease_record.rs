//! Lease records: every daemon's own statement, in the shared root, of the ids it
//! may still grant.
//!
//! Invariant protected: *unique* (1) through an operator's repair (rule 8). Once a
//! manifest is lost, nothing in it says which leases other daemons hold, and a
//! daemon grants from its lease without reading the store. So each daemon keeps,
//! per namespace, one object of its own at `idalloc/leases/{ns}/{daemon}.json`
//! holding `{"next_vid_batch": V, "next_eid_batch": E}`: every id it may grant in
//! that namespace is below them. It is written together with the conditional
//! write that wins a lease, and the lease is installed only when both landed, so
//! no id is granted from a lease its record does not cover. A repair raises the
//! ceiling to at least every record of the namespace (in tree mode, the primary's
//! repair to every record of the tree), whatever the operator's floor.
//!
//! A record only ever lifts a repair's ceiling. One that says more than its daemon
//! holds (a lease race it lost, leases given back since, a daemon that is gone)
//! costs ids, never uniqueness; records are therefore never pruned by other
//! daemons (an unconditional delete could race with the owner's next write).
//! `{daemon}` is the data directory's id (kept in sled's meta record), so a
//! restarted daemon rewrites its own record instead of adding one per life.

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use idalloc_client::error::ServiceError;
use idalloc_client::namespace::{Kind, Namespace};

use crate::engine::{store_err, Engine};

/// Where lease records live, outside `catalog/` (the reference reader's tree).
pub const LEASES_DIR: &str = "idalloc/leases";

/// One daemon's record for one namespace.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseRecord {
    /// Every vid this daemon may grant in the namespace is below this.
    next_vid_batch: u64,
    /// Every eid this daemon may grant in the namespace is below this.
    next_eid_batch: u64,
    /// The data directory of the daemon that writes it, for the operator.
    #[serde(default)]
    data_dir: String,
}

/// The records' folder of a namespace: `primary`, or the fork's 128-bit value in
/// hex (both spellings of a fork are one namespace).
fn ns_dir(ns: &Namespace) -> String {
    match ns {
        Namespace::Primary => format!("{LEASES_DIR}/primary"),
        Namespace::Fork(id) => format!("{LEASES_DIR}/{:032x}", id.value()),
    }
}

/// What the records under a prefix say: per kind the highest end, and the
/// records read (path and values) for the repair's report.
pub(in crate::engine) struct Recorded {
    pub ends: [u64; 2],
    pub records: Vec<(String, [u64; 2])>,
}

impl Engine {
    fn record_path(&self, ns: &Namespace) -> Path {
        Path::from(format!("{}/{}.json", ns_dir(ns), self.daemon_id))
    }

    /// Write this daemon's record of `ns` so that it covers `ends` and `prev`
    /// (what it said before in this life, from `CeilingState::recorded`), and
    /// return what it says now. A lease is installed only after this returned
    /// `Ok` for its end.
    pub(in crate::engine) async fn record_lease(
        &self,
        ns: &Namespace,
        prev: Option<[u64; 2]>,
        ends: [u64; 2],
    ) -> Result<[u64; 2], ServiceError> {
        let p = prev.unwrap_or([0, 0]);
        let want = [ends[0].max(p[0]), ends[1].max(p[1])];
        if prev == Some(want) {
            return Ok(want);
        }
        let rec = LeaseRecord {
            next_vid_batch: want[Kind::Vid.index()],
            next_eid_batch: want[Kind::Eid.index()],
            data_dir: self.cfg.data_dir.display().to_string(),
        };
        let bytes = serde_json::to_vec_pretty(&rec).expect("lease record serialises");
        self.store
            .overwrite_bytes(&self.record_path(ns), bytes)
            .await
            .map_err(|e| store_err(e, self.retry_hint_ms()))?;
        Ok(want)
    }

    /// The highest ends recorded by any daemon for `ns`, or, with `ns = None`,
    /// for every namespace of the root (tree mode's one sequence). A record that
    /// cannot be parsed is an error naming it: a repair never guesses.
    pub(in crate::engine) async fn recorded_leases(
        &self,
        ns: Option<&Namespace>,
    ) -> Result<Recorded, ServiceError> {
        let hint = self.retry_hint_ms();
        let prefix = Path::from(ns.map_or_else(|| LEASES_DIR.to_string(), ns_dir));
        let paths = self
            .store
            .list_paths(&prefix)
            .await
            .map_err(|e| store_err(e, hint))?;
        let mut out = Recorded {
            ends: [0, 0],
            records: Vec::new(),
        };
        for path in paths {
            let Some((bytes, _)) = self
                .store
                .read_bytes(&path)
                .await
                .map_err(|e| store_err(e, hint))?
            else {
                continue;
            };
            let rec: LeaseRecord = serde_json::from_slice(&bytes).map_err(|e| {
                ServiceError::BrokenManifest(format!(
                    "lease record {path} cannot be parsed ({e}): a repair cannot tell which ids that daemon may still grant, so it refuses. The daemon whose data directory it names rewrites it with its next lease; if that data directory is gone for good (its daemon can grant nothing more), delete the record and run the repair again"
                ))
            })?;
            let vals = [rec.next_vid_batch, rec.next_eid_batch];
            for k in Kind::ALL {
                out.ends[k.index()] = out.ends[k.index()].max(vals[k.index()]);
            }
            out.records.push((path.to_string(), vals));
        }
        Ok(out)
    }
}
