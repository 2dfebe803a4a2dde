//! Who may do what: the writer and admin roles, from the peer's credentials.
//!
//! Writers may `reserve`, `hwm`, `status`, `fork bootstrap` and `fork list`;
//! admins also `checkpoint`, `fork drop`, `fork merge` and `repair` — everything that gives
//! ids back, retires a fork or rewrites a manifest. On a unix socket the peer is
//! identified by what the kernel recorded at `connect(2)`: `SO_PEERCRED` (uid,
//! gid, pid) and `SO_PEERGROUPS` (supplementary groups), and mapped to a role by `[access]`; a peer in neither
//! list is refused at connect. Plain TCP carries no identity: it is loopback only
//! and gets `[access] tcp_role`, writer by default, because every local user who
//! can reach the port gets that role. TLS
//! connections get their role from the client certificate's names
//! ([`super::tls`]).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use idalloc_client::error::ServiceError;

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
    /// Whose connection this is, as `max_connections_per_identity` counts them:
    /// `uid 1001`, `tcp` (plain TCP as a whole), `tls <certificate name>`.
    pub identity: String,
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
    /// Admin uids (root is always an admin).
    pub admin_uids: BTreeSet<u32>,
    /// Whether the daemon's own uid is an admin (`[access] own_uid_is_admin`).
    pub own_uid_is_admin: bool,
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
        if uid == 0
            || (self.own_uid_is_admin && uid == own_uid())
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
    ///
    /// Identity is what the kernel recorded when the peer called `connect(2)`:
    /// `SO_PEERCRED` (uid, gid, pid) and `SO_PEERGROUPS` (its supplementary
    /// groups). Nothing is read from `/proc/<pid>`: by the time a connection is
    /// accepted its process may be gone and the pid taken by another user's
    /// process, and under `ProtectProc=invisible` other users' `/proc` entries
    /// cannot be read at all.
    pub fn unix_peer(&self, s: &tokio::net::UnixStream) -> Result<Peer, Refused> {
        use std::os::fd::AsRawFd;
        let cred = s.peer_cred().map_err(|e| Refused {
            key: "unknown unix peer".into(),
            log: format!("cannot read the peer's credentials (SO_PEERCRED): {e}"),
            error: ServiceError::PermissionDenied(
                "the daemon could not read this connection's credentials (SO_PEERCRED)".into(),
            ),
        })?;
        let (uid, gid) = (cred.uid(), cred.gid());
        let mut gids = vec![gid];
        match peer_groups(s.as_raw_fd()) {
            Ok(groups) => gids.extend(groups.into_iter().filter(|g| *g != gid)),
            Err(e) => warn_groups_unreadable(uid, &e),
        }
        let name = match cred.pid() {
            Some(pid) if pid > 0 => format!("uid {uid} (pid {pid})"),
            _ => format!("uid {uid}"),
        };
        match self.role(uid, &gids) {
            Some(role) => Ok(Peer {
                name,
                role,
                identity: format!("uid {uid}"),
            }),
            None => Err(Refused {
                key: format!("uid {uid}"),
                log: format!(
                    "{name}, gids {gids:?}: in neither [access] writer_uids/writer_groups nor admin_uids/admin_groups"
                ),
                error: ServiceError::PermissionDenied(format!(
                    "uid {uid} has no role; see [access] in the daemon's config (writer_uids, writer_groups)"
                )),
            }),
        }
    }
}

/// A connection refused before any request is served.
#[derive(Debug, Clone)]
pub struct Refused {
    /// Who, as refusals are aggregated in the log (`uid 65534`).
    pub key: String,
    /// The log line's reason: everything the operator needs.
    pub log: String,
    /// What the peer is told: why, and where the fix is, without the daemon's
    /// own details.
    pub error: ServiceError,
}

/// The supplementary groups the peer of a unix socket had when it connected
/// (`SO_PEERGROUPS`, Linux 4.13). On `ERANGE` the kernel says how much room
/// it needs.
fn peer_groups(fd: std::os::fd::RawFd) -> std::io::Result<Vec<u32>> {
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of writable gid_t slots, and `len`
        // is a valid socklen_t the kernel updates to the bytes it wrote or needs.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / GID;
        if rc == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && needed > groups.len() && needed <= 65536 {
            groups.resize(needed, 0);
            continue;
        }
        return Err(err);
    }
}

/// Without `SO_PEERGROUPS` only the primary gid counts: say so, once at WARN
/// (then at debug), so that a member of an admin or writer group through a
/// supplementary group who is refused is explained in the log.
fn warn_groups_unreadable(uid: u32, e: &std::io::Error) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(uid, error = %e, "cannot read a unix peer's supplementary groups (SO_PEERGROUPS, Linux 4.13+): only its primary gid counts for [access] admin_groups/writer_groups");
    } else {
        tracing::debug!(uid, error = %e, "SO_PEERGROUPS unreadable; only the primary gid counts");
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

/// A group given by name or number; names through NSS (`getgrnam_r`).
pub fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!(
            "group {name:?} is neither a number nor a known group (NSS)"
        )),
        Err(e) => Err(format!("cannot look group {name:?} up (NSS): {e}")),
    }
}

/// A user given by name or number; names through NSS (`getpwnam_r`).
pub fn resolve_user(name: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!(
            "user {name:?} is neither a number nor a known user (NSS)"
        )),
        Err(e) => Err(format!("cannot look user {name:?} up (NSS): {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_from_uids_and_groups() {
        let p = AccessPolicy {
            admin_uids: [500].into(),
            own_uid_is_admin: true,
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
            identity: "uid 1001".into(),
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
        assert_eq!(resolve_user("root"), Ok(0));
        let not_me = AccessPolicy {
            own_uid_is_admin: false,
            ..p.clone()
        };
        if own_uid() != 0 {
            assert_eq!(not_me.role(own_uid(), &[]), None);
        }
        assert_eq!(not_me.role(0, &[]), Some(Role::Admin));
    }
}
