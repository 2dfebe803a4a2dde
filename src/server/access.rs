//! Who may do what: the writer and admin roles, from the peer's credentials.
//!
//! Writers may `reserve`, `hwm`, `status`, `fork bootstrap` and `fork list`;
//! admins also `checkpoint`, `fork drop`, `fork merge` and `repair` — everything that gives
//! ids back, retires a fork or rewrites a manifest. On a unix socket the peer is
//! identified with `SO_PEERCRED` (uid, gid, pid; supplementary groups from
//! `/proc/<pid>/status`) and mapped to a role by `[access]`; a peer in neither
//! list is refused at connect. Plain TCP carries no identity: it is loopback only
//! and gets `[access] tcp_role`, writer by default, because every local user who
//! can reach the port gets that role. TLS
//! connections get their role from the client certificate's names
//! ([`super::tls`]).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::ServiceError;

/// A connection's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Allocates, reads, bootstraps and lists forks.
    Writer,
    /// Also gives ids back, drops forks and repairs manifests.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Writer => "writer",
            Role::Admin => "admin",
        })
    }
}

/// Who is on the other end of a connection, as the log and errors name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// `uid 1001`, `tcp 127.0.0.1:5555`.
    pub name: String,
    /// The role granted.
    pub role: Role,
}

impl Peer {
    /// Refuse `what` unless this peer is an admin.
    pub fn require_admin(&self, what: &str) -> Result<(), ServiceError> {
        if self.role == Role::Admin {
            return Ok(());
        }
        tracing::warn!(peer = %self.name, role = %self.role, operation = what, "permission denied");
        Err(ServiceError::PermissionDenied(format!(
            "{what} needs the admin role; this connection is {} ({})",
            self.name, self.role
        )))
    }
}

/// The `[access]` policy, resolved to numeric ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Admin uids (root and the daemon's own uid are always admins).
    pub admin_uids: BTreeSet<u32>,
    /// Admin gids.
    pub admin_gids: BTreeSet<u32>,
    /// Writer uids.
    pub writer_uids: BTreeSet<u32>,
    /// Writer gids (default: the daemon's group, which owns the socket it creates).
    pub writer_gids: BTreeSet<u32>,
    /// The role of plain TCP connections.
    pub tcp_role: Role,
}

impl AccessPolicy {
    /// The role of a unix-socket peer, `None` to refuse it.
    pub fn role(&self, uid: u32, gids: &[u32]) -> Option<Role> {
        let me = own_uid();
        if uid == 0
            || uid == me
            || self.admin_uids.contains(&uid)
            || gids.iter().any(|g| self.admin_gids.contains(g))
        {
            return Some(Role::Admin);
        }
        if self.writer_uids.contains(&uid) || gids.iter().any(|g| self.writer_gids.contains(g)) {
            return Some(Role::Writer);
        }
        None
    }

    /// The peer of a unix stream, or why it is refused.
    pub fn unix_peer(&self, s: &tokio::net::UnixStream) -> Result<Peer, String> {
        let cred = s
            .peer_cred()
            .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
        let (uid, gid) = (cred.uid(), cred.gid());
        let mut gids = vec![gid];
        if let Some(pid) = cred.pid() {
            gids.extend(supplementary_groups(pid));
        }
        let name = match cred.pid() {
            Some(pid) => format!("uid {uid} (pid {pid})"),
            None => format!("uid {uid}"),
        };
        match self.role(uid, &gids) {
            Some(role) => Ok(Peer { name, role }),
            None => Err(format!(
                "{name}, gids {gids:?}: in neither [access] writer_uids/writer_groups nor admin_uids/admin_groups"
            )),
        }
    }
}

/// The line that says which role a plain TCP listener gives: every local process
/// that can reach it, whatever its user.
pub fn tcp_note(listener: &str, role: Role) -> String {
    match role {
        Role::Writer => format!("{listener}: plain TCP carries no identity: every local user who can connect gets the writer role ([access] tcp_role = \"writer\")"),
        Role::Admin => format!("{listener}: plain TCP carries no identity: every local user who can connect gets the ADMIN role ([access] tcp_role = \"admin\"): any of them may checkpoint, drop forks and repair"),
    }
}

/// The daemon's effective uid.
pub fn own_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// The daemon's effective gid.
pub fn own_gid() -> u32 {
    // SAFETY: getegid(2) cannot fail and touches no memory.
    unsafe { libc::getegid() }
}

fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A group given by name or number, resolved through `/etc/group`.
pub fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    groups
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name)).then(|| f.nth(1).and_then(|g| g.parse().ok()))?
        })
        .ok_or_else(|| format!("group {name:?} is neither a number nor in /etc/group"))
}

/// A user given by name or number, resolved through `/etc/passwd`.
pub fn resolve_user(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let users = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    users
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(name)).then(|| f.nth(1).and_then(|u| u.parse().ok()))?
        })
        .ok_or_else(|| format!("user {name:?} is neither a number nor in /etc/passwd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_uids_and_groups() {
        let p = AccessPolicy {
            admin_uids: [500].into(),
            admin_gids: [600].into(),
            writer_uids: [1001].into(),
            writer_gids: [2000].into(),
            tcp_role: Role::Admin,
        };
        assert_eq!(p.role(0, &[0]), Some(Role::Admin));
        assert_eq!(p.role(own_uid(), &[]), Some(Role::Admin));
        assert_eq!(p.role(500, &[1]), Some(Role::Admin));
        assert_eq!(p.role(7, &[9, 600]), Some(Role::Admin));
        assert_eq!(p.role(1001, &[1]), Some(Role::Writer));
        assert_eq!(p.role(7, &[2000]), Some(Role::Writer));
        assert_eq!(p.role(7, &[8]), None);
        let w = Peer {
            name: "uid 1001".into(),
            role: Role::Writer,
        };
        let e = w.require_admin("fork drop").unwrap_err().to_string();
        assert_eq!(
            e,
            "permission denied: fork drop needs the admin role; this connection is uid 1001 (writer)"
        );
        assert_eq!(resolve_group("0"), Ok(0));
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(resolve_user("no-such-user-here").is_err());
    }
}
