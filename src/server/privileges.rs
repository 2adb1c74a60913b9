//! Least privilege (Postfix's rule: nothing that reads the network runs as root). Started as
//! root, Gannet binds its listeners and opens its spool, certificates and keys, hands the spool
//! to `server.user`, then becomes that user and group for good: setgroups, setgid and setuid
//! (glibc applies them to every thread), after which the kernel has cleared every capability. Started
//! as another user (systemd's `User=gannet` with `AmbientCapabilities=CAP_NET_BIND_SERVICE`),
//! it clears its own capabilities once the listeners are bound. Started as root without
//! `server.user`, it refuses to serve; `server.user = "root"` keeps root on purpose.

use std::ffi::{CStr, CString};
use std::path::Path;

use tracing::{info, warn};

use crate::config::Server;

/// The deepest directory level under the spool that [`chown_spool`] walks (the spool holds
/// `shard-N/` directories of segments and `tls/`; nothing deeper).
const SPOOL_DEPTH_MAX: usize = 4;
/// Entries [`chown_spool`] changes at most (a spool of 8 GiB in 64 MiB segments has ~130 files).
const SPOOL_ENTRIES_MAX: usize = 1_000_000;
/// Bytes of the buffer for `getpwnam_r`/`getgrnam_r` records.
const ACCOUNT_BUFFER_BYTES: usize = 16 * 1024;

/// What start-up does about its user, decided before anything is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Root on purpose (`server.user = "root"`).
    StayRoot,
    /// Root now; becomes this user and group after binding.
    Become(Account),
    /// Not root: stays the user it is, clears its capabilities after binding.
    Unprivileged,
}

/// A user to become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// Decides the plan from `[server]` and the user this process runs as. `embedded` says the
/// configuration is the embedded default (loopback listeners on unprivileged ports, the spool
/// in the current directory, which another user often cannot reach): run as root, it stays root
/// with a warning, so that README's run command works as any user.
pub fn plan(server: &Server, embedded: bool) -> Result<Plan, String> {
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    match (euid, server.user.as_deref()) {
        (0, None) if embedded => {
            warn!("serving the embedded default as root (it listens on loopback only); a configuration file must set server.user to serve as root");
            Ok(Plan::StayRoot)
        }
        (0, None) => Err("refusing to serve as root: set server.user to the user Gannet becomes once its ports are bound (such as \"gannet\"; the Debian package creates it), or server.user = \"root\" to serve as root on purpose".into()),
        (0, Some("root")) => {
            warn!("server.user = \"root\": serving as root; every session runs with root's privileges");
            Ok(Plan::StayRoot)
        }
        (0, Some(user)) => account(user, server.group.as_deref()).map(Plan::Become),
        (_, user) => {
            let me = user_name(euid).unwrap_or_else(|| euid.to_string());
            if let Some(user) = user.filter(|u| *u != me) {
                warn!("server.user = \"{user}\" is not applied: started as {me}, which cannot switch users (start as root to switch)");
            }
            Ok(Plan::Unprivileged)
        }
    }
}

/// Looks up `user` (and `group`, else the user's primary group).
fn account(user: &str, group: Option<&str>) -> Result<Account, String> {
    let (uid, primary_gid) = lookup_user(user)?.ok_or_else(|| {
        format!("server.user = \"{user}\": no such user on this host; create it (adduser --system --group {user}) or name another")
    })?;
    let gid = match group {
        None => primary_gid,
        Some(group) => lookup_group(group)?.ok_or_else(|| {
            format!("server.group = \"{group}\": no such group on this host; create it (addgroup --system {group}) or remove the key to use {user}'s own group")
        })?,
    };
    if uid == 0 {
        return Err(format!("server.user = \"{user}\" has uid 0, which is root; name an unprivileged user, or write server.user = \"root\""));
    }
    Ok(Account {
        user: user.to_string(),
        uid,
        gid,
    })
}

/// The uid and primary gid of `name`, if it exists.
fn lookup_user(name: &str) -> Result<Option<(u32, u32)>, String> {
    let c_name = CString::new(name).map_err(|_| format!("`{name}` is not a user name"))?;
    let mut buffer = vec![0u8; ACCOUNT_BUFFER_BYTES];
    // SAFETY: `record` and `result` are ours; getpwnam_r writes the record's strings into
    // `buffer` (of the length we pass) and sets `result` to null or to `&record`.
    unsafe {
        let mut record: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            c_name.as_ptr(),
            &mut record,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            &mut result,
        );
        if rc != 0 {
            return Err(format!(
                "cannot look up user {name}: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        Ok((!result.is_null()).then_some((record.pw_uid, record.pw_gid)))
    }
}

/// The gid of group `name`, if it exists.
fn lookup_group(name: &str) -> Result<Option<u32>, String> {
    let c_name = CString::new(name).map_err(|_| format!("`{name}` is not a group name"))?;
    let mut buffer = vec![0u8; ACCOUNT_BUFFER_BYTES];
    // SAFETY: as in `lookup_user`, for getgrnam_r and a group record.
    unsafe {
        let mut record: libc::group = std::mem::zeroed();
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(
            c_name.as_ptr(),
            &mut record,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            &mut result,
        );
        if rc != 0 {
            return Err(format!(
                "cannot look up group {name}: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        Ok((!result.is_null()).then_some(record.gr_gid))
    }
}

/// The name of `uid`, if it has one.
fn user_name(uid: u32) -> Option<String> {
    let mut buffer = vec![0u8; ACCOUNT_BUFFER_BYTES];
    // SAFETY: as in `lookup_user`, for getpwuid_r; pw_name points into `buffer`, which outlives
    // the CStr we copy it from.
    unsafe {
        let mut record: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut record, buffer.as_mut_ptr().cast(), buffer.len(), &mut result);
        if rc != 0 || result.is_null() || record.pw_name.is_null() {
            return None;
        }
        Some(CStr::from_ptr(record.pw_name).to_string_lossy().into_owned())
    }
}

/// Gives the spool directory and everything in it to `account` (files a root-run instance
/// left behind included), without following symbolic links. Returns how many entries changed.
pub fn chown_spool(dir: &Path, account: &Account) -> Result<usize, String> {
    let mut changed = 0;
    chown_tree(dir, account, 0, &mut changed)?;
    Ok(changed)
}

fn chown_tree(path: &Path, account: &Account, depth: usize, changed: &mut usize) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::symlink_metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if metadata.uid() != account.uid || metadata.gid() != account.gid {
        if *changed >= SPOOL_ENTRIES_MAX {
            return Err(format!(
                "more than {SPOOL_ENTRIES_MAX} entries in the spool {}; it is not a spool",
                path.display()
            ));
        }
        std::os::unix::fs::lchown(path, Some(account.uid), Some(account.gid))
            .map_err(|e| format!("cannot give {} to {}: {e}", path.display(), account.user))?;
        *changed += 1;
    }
    if metadata.is_dir() && depth < SPOOL_DEPTH_MAX {
        let entries = std::fs::read_dir(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            chown_tree(&entry.path(), account, depth + 1, changed)?;
        }
    }
    Ok(())
}

/// Carries out the plan: after this, the process has no capability and (unless it stays root)
/// cannot get root back. Call it after binding and before starting the shards, so that every
/// thread started later inherits the dropped state.
pub fn drop_privileges(plan: &Plan) -> Result<(), String> {
    match plan {
        Plan::StayRoot => Ok(()),
        Plan::Become(account) => {
            become_account(account)?;
            clear_capabilities()?;
            info!(
                "running as user {} (uid {}, gid {}) with no capabilities",
                account.user, account.uid, account.gid
            );
            Ok(())
        }
        Plan::Unprivileged => clear_capabilities(),
    }
}

/// setgroups, setgid, setuid, then proof that root cannot come back.
fn become_account(account: &Account) -> Result<(), String> {
    let os = |what: &str| {
        format!(
            "cannot become {} ({what}): {}",
            account.user,
            std::io::Error::last_os_error()
        )
    };
    // SAFETY: plain system calls on integers and a one-element array we own. glibc runs set*id
    // on every thread of the process, so the signal and log threads change with this one.
    unsafe {
        let groups = [account.gid];
        if libc::setgroups(1, groups.as_ptr()) != 0 {
            return Err(os("setgroups"));
        }
        if libc::setresgid(account.gid, account.gid, account.gid) != 0 {
            return Err(os("setgid"));
        }
        if libc::setresuid(account.uid, account.uid, account.uid) != 0 {
            return Err(os("setuid"));
        }
        if libc::setuid(0) == 0 || libc::geteuid() != account.uid || libc::getegid() != account.gid {
            return Err(format!(
                "after becoming {}, root could be taken back; refusing to serve",
                account.user
            ));
        }
    }
    Ok(())
}

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapabilityHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapabilityData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Empties the calling thread's effective, permitted, inheritable and ambient sets, and sets
/// no_new_privs so that no exec can grant any again. Threads started afterwards inherit this.
fn clear_capabilities() -> Result<(), String> {
    let header = CapabilityHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapabilityData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads one header and two data structs laid out as the kernel's
    // __user_cap_header_struct and __user_cap_data_struct (repr(C), three/two u32 fields); prctl
    // takes plain integers. Tested by tests/service.rs, which reads CapEff of the running server.
    unsafe {
        if libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0 {
            // Kernels before 4.3 have no ambient set: nothing to clear.
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(format!("cannot clear ambient capabilities: {e}"));
            }
        }
        if libc::syscall(libc::SYS_capset, &header as *const CapabilityHeader, data.as_ptr()) != 0 {
            return Err(format!(
                "cannot clear capabilities: {}",
                std::io::Error::last_os_error()
            ));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(format!("cannot set no_new_privs: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_are_looked_up_and_missing_ones_named() {
        assert_eq!(lookup_user("root").unwrap(), Some((0, 0)));
        assert_eq!(lookup_group("root").unwrap(), Some(0));
        assert_eq!(lookup_user("no-such-user-gannet").unwrap(), None);
        assert_eq!(user_name(0).as_deref(), Some("root"));
        let e = account("no-such-user-gannet", None).unwrap_err();
        assert!(e.contains("no such user") && e.contains("adduser"), "{e}");
        let e = account("root", None).unwrap_err();
        assert!(e.contains("uid 0"), "{e}");
    }
}
