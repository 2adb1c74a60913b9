//! Recovery: reads a shard's segments back at start and rebuilds what is spooled.
//!
//! The appender acknowledges a record only once every record before it in its segment is written
//! and synced (see `appender`), so everything after the first unreadable record of a segment was
//! never acknowledged: the scan stops there (a torn tail). One exception keeps acknowledged mail
//! safe from bit rot in the middle of a segment: a record whose CRC fails but whose successor
//! (found through its own length field) reads back intact is moved to the quarantine directory
//! and the scan goes on.
//!
//! Recovery runs once per shard before the shard serves, with plain blocking reads.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::record::{
    crc_start, decode_deferrals, decode_message, decode_state_batch, split_message, split_message_payload,
    verify_message_record, CopyOf, DecodeError, Deferral, EnvelopeBytes, Header, Kind, StateEntry, StoredEnvelope,
    HEADER_BYTES,
};
use crate::{align_up, parse_segment_file_name, MessageId};

/// A message found in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredMessage {
    pub id: MessageId,
    pub envelope: EnvelopeBytes,
    pub content_bytes: u64,
    /// The whole record's length on disk, header included (not padding).
    pub record_bytes: u32,
    /// Set when the record is a copy of an older one (see `record::CopyOf`).
    pub copy_of: Option<CopyOf>,
}

/// Why the scan of a segment stopped or skipped something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// Unreadable bytes at this offset up to the end of the segment; nothing after it was
    /// acknowledged.
    TornTail { offset: u64 },
    /// A record at this offset failed its checks while the next one was intact; quarantined.
    Corrupt {
        offset: u64,
        len: u64,
        reason: &'static str,
    },
}

/// What one segment holds.
#[derive(Debug, Default)]
pub struct SegmentScan {
    pub messages: Vec<RecoveredMessage>,
    /// Recipients finished (from `Outcome` records).
    pub outcomes: Vec<StateEntry>,
    /// Messages finished (from `Tombstone` records).
    pub tombstones: Vec<MessageId>,
    /// Retry schedules (from `Deferral` records), in the order written.
    pub deferrals: Vec<Deferral>,
    pub damage: Vec<Damage>,
    /// Offset just past the last good record.
    pub end_offset: u64,
}

enum Probe {
    Zero,
    Good { header: Header, next: u64 },
    Bad { reason: &'static str, next: Option<u64> },
}

fn probe(bytes: &[u8], seq: u64, offset: u64) -> Probe {
    let start = offset as usize;
    let Some(head) = bytes.get(start..start + HEADER_BYTES) else {
        return Probe::Zero;
    };
    let header = Header::decode(head.try_into().unwrap());
    if header.is_zero() {
        return Probe::Zero;
    }
    let payload_start = start + HEADER_BYTES;
    let payload_end = payload_start as u64 + u64::from(header.len);
    let next = align_up(payload_end);
    if Kind::from_u8(header.kind).is_none() {
        return Probe::Bad {
            reason: "unknown record kind",
            next: None,
        };
    }
    if payload_end > bytes.len() as u64 {
        return Probe::Bad {
            reason: "length runs past the segment",
            next: None,
        };
    }
    let payload = &bytes[payload_start..payload_end as usize];
    let crc = crc32c::crc32c_append(crc_start(seq, header.len, header.kind), payload);
    if crc != header.crc {
        return Probe::Bad {
            reason: "checksum mismatch",
            next: Some(next),
        };
    }
    Probe::Good { header, next }
}

/// Scans one segment's bytes. `shard` and `seq` name the segment.
pub fn scan_segment(bytes: &[u8], shard: u16, seq: u64) -> SegmentScan {
    let mut scan = SegmentScan::default();
    let mut offset = 0u64;
    while offset < bytes.len() as u64 {
        match probe(bytes, seq, offset) {
            Probe::Zero => break,
            Probe::Good { header, next } => {
                let payload = &bytes[offset as usize + HEADER_BYTES..][..header.len as usize];
                if header.kind == Kind::Deferral as u8 {
                    match decode_deferrals(payload) {
                        Ok(entries) => scan.deferrals.extend(entries),
                        Err(e) => scan.damage.push(Damage::Corrupt {
                            offset,
                            len: next - offset,
                            reason: decode_reason(e),
                        }),
                    }
                } else if !Kind::holds_message(header.kind) {
                    match decode_state_batch(payload) {
                        Ok(entries) if header.kind == Kind::Outcome as u8 => scan.outcomes.extend(entries),
                        Ok(entries) => scan.tombstones.extend(entries.iter().map(|e| e.id)),
                        Err(e) => scan.damage.push(Damage::Corrupt {
                            offset,
                            len: next - offset,
                            reason: decode_reason(e),
                        }),
                    }
                } else {
                    let decoded = split_message_payload(header.kind, payload).and_then(|(copy_of, message)| {
                        let parts = split_message(message)?;
                        Ok((copy_of, EnvelopeBytes::new(parts.envelope)?, parts.relayed_bytes()))
                    });
                    match decoded {
                        Ok((copy_of, envelope, content_bytes)) => scan.messages.push(RecoveredMessage {
                            id: MessageId::new(seq, shard, offset),
                            envelope,
                            content_bytes: content_bytes as u64,
                            record_bytes: HEADER_BYTES as u32 + header.len,
                            copy_of,
                        }),
                        Err(e) => scan.damage.push(Damage::Corrupt {
                            offset,
                            len: next - offset,
                            reason: decode_reason(e),
                        }),
                    }
                }
                offset = next;
                // A segment cut short (a truncated copy) can end inside a record's padding.
                scan.end_offset = offset.min(bytes.len() as u64);
            }
            Probe::Bad { reason, next } => {
                let successor_good = next.is_some_and(|n| matches!(probe(bytes, seq, n), Probe::Good { .. }));
                match next {
                    Some(n) if successor_good => {
                        scan.damage.push(Damage::Corrupt {
                            offset,
                            len: n - offset,
                            reason,
                        });
                        offset = n;
                        scan.end_offset = offset.min(bytes.len() as u64);
                    }
                    _ => {
                        scan.damage.push(Damage::TornTail { offset });
                        break;
                    }
                }
            }
        }
    }
    scan
}

fn decode_reason(e: DecodeError) -> &'static str {
    match e {
        DecodeError::Truncated => "envelope truncated",
        DecodeError::UnknownVersion(_) => "unknown envelope version",
        DecodeError::BadField(field) => field,
    }
}

/// The segment files in a shard directory, oldest first, as (sequence, path).
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut segments = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(segments),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_file_name) {
            segments.push((seq, entry.path()));
        }
    }
    segments.sort();
    Ok(segments)
}

/// Reads a whole segment into `buf` (reused across segments to bound memory to one segment).
pub fn read_segment(path: &Path, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.clear();
    let mut file = fs::File::open(path)?;
    // One allocation of the file's size (segments are all one size, so the buffer is reused),
    // not a doubling series whose leftovers the allocator would keep after recovery.
    let len = file.metadata()?.len() as usize;
    buf.reserve_exact(len);
    file.read_to_end(buf)?;
    Ok(())
}

/// Reads one message back from the spool by id: its envelope and its content exactly as it will
/// be relayed (the header fields stored in front of it such as DKIM signatures, our Received
/// header, the client's bytes).
pub fn read_message(spool_dir: &Path, id: MessageId) -> io::Result<(StoredEnvelope, Vec<u8>)> {
    let path = crate::shard_dir(spool_dir, id.shard).join(crate::segment_file_name(id.segment_seq));
    let mut buf = Vec::new();
    read_segment(&path, &mut buf)?;
    let not_found = || {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("no message {id} in {}", path.display()),
        )
    };
    let record = buf
        .get(id.offset_bytes() as usize..)
        .ok_or_else(not_found)
        .and_then(|bytes| verify_message_record(bytes, id.segment_seq).map_err(|_| not_found()))?;
    let invalid = |e: DecodeError| io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}"));
    let message = decode_message(record.payload).map_err(invalid)?;
    let parts = split_message(record.payload).map_err(invalid)?;
    Ok((message.envelope, [parts.prepended, parts.content].concat()))
}

/// Copies a damaged record's bytes into the quarantine directory for a human to look at.
pub fn quarantine(spool_dir: &Path, shard: u16, seq: u64, bytes: &[u8], offset: u64, len: u64) -> io::Result<PathBuf> {
    let dir = spool_dir.join("quarantine");
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("shard-{shard}-{seq:016x}-{offset:x}.rec"));
    let start = (offset as usize).min(bytes.len());
    let end = start.saturating_add(len as usize).min(bytes.len());
    fs::write(&path, &bytes[start..end])?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::build_message_record;
    use gannet_smtp::envelope::{Envelope, Origin};

    fn record(seq: u64, content: &[u8]) -> Vec<u8> {
        let mut env = Envelope::default();
        env.set_sender(|b| b.extend_from_slice(b"a@x.example"));
        env.add_recipient(|b| b.extend_from_slice(b"b@y.example"), 0, b"");
        let origin = Origin {
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: b"h",
            received_unix_s: 5,
        };
        build_message_record(seq, &env, origin, content)
    }

    fn segment(records: &[Vec<u8>], size: usize) -> Vec<u8> {
        let mut seg: Vec<u8> = records.concat();
        seg.resize(size, 0);
        seg
    }

    #[test]
    fn reads_records_until_zeroed_space() {
        let seg = segment(
            &[record(7, b"one"), record(7, &vec![b'x'; 5000]), record(7, b"three")],
            64 * 1024,
        );
        let scan = scan_segment(&seg, 3, 7);
        assert_eq!(scan.messages.len(), 3);
        assert!(scan.damage.is_empty());
        assert_eq!(scan.messages[1].id, MessageId::new(7, 3, 4096));
        assert_eq!(scan.messages[2].id, MessageId::new(7, 3, 4096 * 3));
        assert_eq!(scan.end_offset, 4096 * 4);
    }

    /// Found by the spool_record fuzz target: a segment file shorter than its last record's
    /// padded slot (a truncated copy) put `end_offset` past the end of the bytes.
    #[test]
    fn a_truncated_segment_keeps_its_records_and_offsets_inside_it() {
        let one = record(7, b"one");
        let mut seg = one.clone();
        seg.truncate(one.iter().rposition(|&b| b != 0).unwrap() + 1);
        assert!(seg.len() < 4096);
        let scan = scan_segment(&seg, 0, 7);
        assert_eq!(scan.messages.len(), 1);
        assert!(scan.damage.is_empty());
        assert_eq!(scan.end_offset, seg.len() as u64);
    }

    #[test]
    fn cuts_a_torn_tail() {
        let mut seg = segment(&[record(7, b"one"), record(7, b"two")], 64 * 1024);
        seg[4096 + 20] ^= 0xff; // the second record is torn; nothing follows it
        let scan = scan_segment(&seg, 0, 7);
        assert_eq!(scan.messages.len(), 1);
        assert_eq!(scan.damage, vec![Damage::TornTail { offset: 4096 }]);
    }

    #[test]
    fn quarantines_a_corrupt_record_in_the_middle() {
        let mut seg = segment(&[record(7, b"one"), record(7, b"two"), record(7, b"three")], 64 * 1024);
        seg[4096 + 20] ^= 0xff;
        let scan = scan_segment(&seg, 0, 7);
        assert_eq!(scan.messages.len(), 2);
        assert_eq!(
            scan.damage,
            vec![Damage::Corrupt {
                offset: 4096,
                len: 4096,
                reason: "checksum mismatch"
            }]
        );
    }

    #[test]
    fn records_from_another_segment_life_are_not_resurrected() {
        let seg = segment(&[record(7, b"new"), record(6, b"stale")], 64 * 1024);
        let scan = scan_segment(&seg, 0, 7);
        assert_eq!(scan.messages.len(), 1);
        assert_eq!(scan.damage, vec![Damage::TornTail { offset: 4096 }]);
    }

    #[test]
    fn state_records_are_collected() {
        use crate::record::build_state_record;
        let done = StateEntry {
            id: MessageId::new(7, 0, 0),
            recipient: 0,
        };
        let seg = segment(
            &[
                record(7, b"one"),
                build_state_record(7, Kind::Outcome, &[done]),
                build_state_record(7, Kind::Tombstone, &[done]),
            ],
            64 * 1024,
        );
        let scan = scan_segment(&seg, 0, 7);
        assert_eq!(scan.messages.len(), 1);
        assert_eq!(scan.outcomes, vec![done]);
        assert_eq!(scan.tombstones, vec![done.id]);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seg = vec![0u8; 16384];
        let mut x = 0x1234_5678u32;
        for b in seg.iter_mut().take(9000) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let scan = scan_segment(&seg, 0, 1);
        assert!(scan.messages.is_empty());
    }
}
