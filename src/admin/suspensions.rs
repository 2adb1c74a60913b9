//! The file of suspended destinations, `<spool>/suspensions.json`: what `POST
//! /api/destinations/suspend` set, so that suspensions survive a restart. The admin thread is
//! its only writer; it writes a whole new file (temporary file, fsync, rename, fsync of the
//! directory) before it tells the shards, and the server reads it at start, before the shards
//! plan anything. A suspension is global (every shard), so it lives beside the shards'
//! segment logs rather than in one of them.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const FILE_NAME: &str = "suspensions.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspensionRecord {
    /// A recipient domain, lowercase.
    pub domain: String,
    pub reason: String,
    pub since_unix_s: u64,
    pub until_unix_s: u64,
}

fn path(spool: &Path) -> PathBuf {
    spool.join(FILE_NAME)
}

/// The suspensions still in force at `now_unix_s` (none if the file does not exist).
pub fn load(spool: &Path, now_unix_s: u64) -> Result<Vec<SuspensionRecord>, String> {
    let path = path(spool);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let all: Vec<SuspensionRecord> = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{}: {e}; fix it, or delete the file to lift every suspension",
            path.display()
        )
    })?;
    Ok(all.into_iter().filter(|s| s.until_unix_s > now_unix_s).collect())
}

/// Replaces the file with `all`, durably.
pub fn save(spool: &Path, all: &[SuspensionRecord]) -> std::io::Result<()> {
    let path = path(spool);
    let tmp = spool.join(format!("{FILE_NAME}.tmp"));
    let text = serde_json::to_string_pretty(all).map_err(std::io::Error::other)?;
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(spool)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_suspensions_load_back_without_the_expired_ones() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path(), 0).unwrap().is_empty());
        let s = |domain: &str, until| SuspensionRecord {
            domain: domain.into(),
            reason: "r".into(),
            since_unix_s: 1,
            until_unix_s: until,
        };
        save(dir.path(), &[s("a.test", 100), s("b.test", 50)]).unwrap();
        assert_eq!(load(dir.path(), 60).unwrap(), vec![s("a.test", 100)]);
        std::fs::write(dir.path().join(FILE_NAME), "{not json").unwrap();
        assert!(load(dir.path(), 0).unwrap_err().contains("delete the file"));
    }
}
