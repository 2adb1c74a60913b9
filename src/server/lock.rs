//! The spool lock: one process per spool directory.
//!
//! Two servers on one spool would interleave segments and, thanks to SO_REUSEPORT, could even
//! share the listening port without an error. An exclusive `flock` on `gannet.lock`, held for the
//! life of the process, refuses the second one at start with a clear message.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

pub struct SpoolLock {
    _file: File,
}

impl SpoolLock {
    pub fn acquire(spool_dir: &Path) -> Result<SpoolLock, String> {
        let path = spool_dir.join("gannet.lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open lock file {}: {e}", path.display()))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved. Covered by the
        // integration test that starts a second server on the same spool.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(format!(
                "spool directory {} is in use by another gannet process (pid {}); stop it, or give this one another spool.directory",
                spool_dir.display(),
                holder.trim()
            ));
        }
        let pid = std::process::id().to_string();
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.write_all(pid.as_bytes());
        Ok(SpoolLock { _file: file })
    }
}

/// The pid of the gannet process holding the lock on `spool_dir`, or None when none runs there.
pub fn running_pid(spool_dir: &Path) -> Result<Option<i32>, String> {
    let path = spool_dir.join("gannet.lock");
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open lock file {}: {e}", path.display())),
    };
    // SAFETY: flock on a file descriptor we own. A shared lock we can take means nobody holds
    // the exclusive one; it is released when `file` closes.
    let free = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0;
    if free {
        return Ok(None);
    }
    let mut pid = String::new();
    file.read_to_string(&mut pid)
        .map_err(|e| format!("cannot read lock file {}: {e}", path.display()))?;
    pid.trim()
        .parse()
        .map(Some)
        .map_err(|_| format!("lock file {} holds `{}`, not a pid", path.display(), pid.trim()))
}
