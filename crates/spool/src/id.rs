//! Message ids: where a message's record starts, which makes them unique without coordination.
//!
//! An id is (segment sequence, shard, record offset in 4 KiB blocks). Segment sequences only grow
//! (each new segment takes the larger of the last one + 1 and the current time in milliseconds),
//! a shard writes only its own segments, and a record offset is used once per segment, so no two
//! messages ever get the same id, across shards and restarts.

use std::fmt;
use std::str::FromStr;

use crate::RECORD_ALIGN_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId {
    pub segment_seq: u64,
    pub shard: u16,
    pub offset_blocks: u32,
}

impl MessageId {
    pub fn new(segment_seq: u64, shard: u16, offset_bytes: u64) -> MessageId {
        debug_assert_eq!(offset_bytes % RECORD_ALIGN_BYTES, 0);
        MessageId {
            segment_seq,
            shard,
            offset_blocks: (offset_bytes / RECORD_ALIGN_BYTES) as u32,
        }
    }

    pub fn offset_bytes(&self) -> u64 {
        u64::from(self.offset_blocks) * RECORD_ALIGN_BYTES
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:012X}-{:02X}-{:06X}",
            self.segment_seq, self.shard, self.offset_blocks
        )
    }
}

impl FromStr for MessageId {
    type Err = ();

    fn from_str(s: &str) -> Result<MessageId, ()> {
        let mut parts = s.split('-');
        let (Some(seq), Some(shard), Some(block), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(());
        };
        Ok(MessageId {
            segment_seq: u64::from_str_radix(seq, 16).map_err(|_| ())?,
            shard: u16::from_str_radix(shard, 16).map_err(|_| ())?,
            offset_blocks: u32::from_str_radix(block, 16).map_err(|_| ())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_and_parses() {
        let id = MessageId::new(0x193_A7F2_C1B0, 1, 4096 * 0x1F4);
        assert_eq!(id.to_string(), "0193A7F2C1B0-01-0001F4");
        assert_eq!("0193A7F2C1B0-01-0001F4".parse(), Ok(id));
        assert_eq!(id.offset_bytes(), 4096 * 0x1F4);
        assert!("nope".parse::<MessageId>().is_err());
    }
}
