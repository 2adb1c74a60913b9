//! `[spool]`: where and how messages are stored (directory, durability, segments, space).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use super::limits::Limits;
use crate::spool::appender::SEGMENT_FILL_CHUNK_BYTES;
use crate::spool::Durability;
use crate::units::ByteSize;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spool {
    #[serde(default = "default_spool_directory")]
    pub directory: PathBuf,
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// Size of each pre-written segment file; a multiple of 1MiB.
    #[serde(default = "default_segment_size")]
    pub segment_size: ByteSize,
    /// The most disk the spool may use, over all shards; past it mail is refused with 452.
    #[serde(default = "default_spool_size_max")]
    pub size_max: ByteSize,
    /// Mail is refused with 452 rather than leave less than this free on the file system.
    #[serde(default = "default_min_free")]
    pub min_free: ByteSize,
    /// Memory per shard for messages being received or written; past it, 452.
    #[serde(default = "default_memory_max")]
    pub memory_max: ByteSize,
    /// When a shard has this many segments and the oldest still holds unfinished (deferred)
    /// messages, those are copied into the newest segment so the oldest can be deleted. 0: never.
    #[serde(default = "default_copy_forward_segments")]
    pub copy_forward_segments: usize,
}

fn default_spool_directory() -> PathBuf {
    PathBuf::from("./gannet-spool")
}
fn default_durability() -> Durability {
    Durability::Fsync
}
fn default_segment_size() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_spool_size_max() -> ByteSize {
    ByteSize(8 << 30)
}
fn default_min_free() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_memory_max() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_copy_forward_segments() -> usize {
    4
}

impl Default for Spool {
    fn default() -> Spool {
        Spool {
            directory: default_spool_directory(),
            durability: default_durability(),
            segment_size: default_segment_size(),
            size_max: default_spool_size_max(),
            min_free: default_min_free(),
            memory_max: default_memory_max(),
            copy_forward_segments: default_copy_forward_segments(),
        }
    }
}

/// Checks `[spool]`; `record_max` is the largest record `l` allows, which a segment and the
/// memory budget must hold.
pub(super) fn validate(s: &Spool, l: &Limits, record_max: u64, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if s.segment_size.0 < SEGMENT_FILL_CHUNK_BYTES
        || s.segment_size.0 % SEGMENT_FILL_CHUNK_BYTES != 0
        || s.segment_size.0 > (4 << 30)
    {
        return Err(fail(
            "spool",
            0,
            "segment_size",
            format!(
                "{} must be a whole number of MiB between \"1MiB\" and \"4GiB\", such as \"64MiB\"",
                s.segment_size
            ),
        ));
    }
    if s.copy_forward_segments == 1 || s.copy_forward_segments == 2 {
        return Err(fail(
            "spool",
            0,
            "copy_forward_segments",
            "must be 0 (never) or at least 3: the oldest segment, one in between, and the one being written".into(),
        ));
    }
    if s.segment_size.0 < record_max {
        return Err(fail("spool", 0, "segment_size", format!(
            "{} cannot hold the largest message the limits allow ({} bytes with limits.message_size_max = {} and limits.recipients_max = {}); raise spool.segment_size or lower those limits",
            s.segment_size, record_max, l.message_size_max, l.recipients_max
        )));
    }
    if s.memory_max.0 < record_max + 512 * 1024 {
        return Err(fail("spool", 0, "memory_max", format!(
            "{} cannot buffer the largest message the limits allow; make it at least {} (limits.message_size_max plus 512KiB)",
            s.memory_max,
            ByteSize(record_max + 512 * 1024)
        )));
    }
    if s.size_max.0 < 2 * s.segment_size.0 {
        return Err(fail(
            "spool",
            0,
            "size_max",
            format!(
                "{} must hold at least two segments of spool.segment_size ({}) per shard",
                s.size_max, s.segment_size
            ),
        ));
    }
    Ok(())
}
