//! Gannet's spool format, sans-IO: one append-only log of fixed-size, pre-written segment files
//! per shard. This crate holds what is on disk and how to read it back (record codec, message
//! ids, the recovery scan); the writing shell (O_DIRECT, group commit) is in the binary.
//!
//! Layout on disk:
//! ```text
//! <directory>/gannet.lock            held (flock) by the running process
//! <directory>/shard-<N>/<seq>.seg     segments, <seq> 16 hex digits, increasing
//! <directory>/quarantine/             records that failed their checks at recovery
//! ```
//! Why pre-written segments: fdatasync on a file whose size and extents do not change has no
//! metadata to persist, which measured 2-10x faster and far steadier here than appending to a
//! growing file (see `docs/spool.md`).

pub mod commit;
pub mod id;
pub mod record;
pub mod recovery;

pub use id::MessageId;

/// Records start on this alignment (O_DIRECT needs at least the device's logical block size).
pub const RECORD_ALIGN_BYTES: u64 = 4096;

/// Whether `250` waits for fdatasync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// fdatasync (group commit) before every 250. The default.
    Fsync,
    /// No fdatasync: a crash loses acknowledged mail. For benchmarks only.
    None,
}

/// The name of a segment file.
pub fn segment_file_name(seq: u64) -> String {
    format!("{seq:016x}.seg")
}

/// The sequence number in a segment file name, if it is one.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The directory of shard `shard` inside the spool directory.
pub fn shard_dir(spool: &std::path::Path, shard: u16) -> std::path::PathBuf {
    spool.join(format!("shard-{shard}"))
}

pub fn align_up(n: u64) -> u64 {
    n.div_ceil(RECORD_ALIGN_BYTES) * RECORD_ALIGN_BYTES
}
