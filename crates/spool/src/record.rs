//! The spool's record format.
//!
//! ```text
//! record  = len:u32le kind:u8 crc:u32le payload[len]      then zero padding to 4 KiB
//! crc     = crc32c(segment_seq:u64le len:u32le kind:u8 payload)
//! ```
//! The CRC covers the segment's sequence number without storing it: a record left over from a
//! segment's earlier life (recycled segments) fails its check instead of coming back to life.
//! A zero length and kind mark the pre-zeroed space after the last record.
//!
//! A `Message` payload is `envelope_len:u32le envelope content`, where content is the message
//! exactly as it will be relayed (our Received header, then the client's bytes, unstuffed).
//!
//! A `Copy` record is a message copied forward out of an old segment (so that the old segment
//! can be deleted): `from_seq:u64le from_shard:u16le from_block:u32le recipients:u32le
//! done_bitmap[ceil(recipients / 8)]` followed by the copied `Message` payload. Recovery drops
//! the original if it still finds it, and starts the copy with the recipients already done.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use gannet_smtp::envelope::{BodyType, Envelope, Origin, Ret};
pub use gannet_smtp::envelope::{StoredEnvelope, StoredRecipient};
use gannet_smtp::limits::{
    ADDRESS_BYTES_MAX, ENVID_BYTES_MAX, ORCPT_BYTES_MAX, RECEIVED_HEADER_BYTES_MAX, RECIPIENTS_MAX_CEILING,
};

pub const HEADER_BYTES: usize = 9;

/// Record kinds. `Message` holds a new message and `Copy` a message copied forward;
/// `Outcome` and `Tombstone` are batches of delivery state (recipients finished, messages
/// finished), appended as deliveries complete; `Deferral` is a batch of retry schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Message = 1,
    Outcome = 2,
    Tombstone = 3,
    Copy = 4,
    Deferral = 5,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Message),
            2 => Some(Kind::Outcome),
            3 => Some(Kind::Tombstone),
            4 => Some(Kind::Copy),
            5 => Some(Kind::Deferral),
            _ => None,
        }
    }

    /// Whether records of this kind hold a message (new or copied).
    pub fn holds_message(b: u8) -> bool {
        b == Kind::Message as u8 || b == Kind::Copy as u8
    }
}

/// Most recipients a copy's done bitmap may describe (the configuration's own ceiling).
const COPY_RECIPIENTS_MAX: usize = RECIPIENTS_MAX_CEILING;

/// What a `Copy` record adds in front of the message it copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOf {
    /// The record this one replaces.
    pub moved_from: crate::MessageId,
    /// Recipients already finished when the copy was made.
    pub done: Vec<bool>,
}

impl CopyOf {
    pub fn encode(&self, out: &mut Vec<u8>) {
        assert!(self.done.len() <= COPY_RECIPIENTS_MAX);
        out.extend_from_slice(&self.moved_from.segment_seq.to_le_bytes());
        out.extend_from_slice(&self.moved_from.shard.to_le_bytes());
        out.extend_from_slice(&self.moved_from.offset_blocks.to_le_bytes());
        out.extend_from_slice(&(self.done.len() as u32).to_le_bytes());
        for byte in self.done.chunks(8) {
            out.push(byte.iter().enumerate().fold(0u8, |b, (i, &d)| b | (u8::from(d) << i)));
        }
    }
}

/// Splits a record that holds a message into the copy prefix (for `Copy` records) and the
/// `Message` payload. Never panics, whatever the bytes.
pub fn split_message_payload(kind: u8, payload: &[u8]) -> Result<(Option<CopyOf>, &[u8]), DecodeError> {
    if kind == Kind::Message as u8 {
        return Ok((None, payload));
    }
    if kind != Kind::Copy as u8 {
        return Err(DecodeError::BadField("record kind"));
    }
    let mut r = Reader { bytes: payload, pos: 0 };
    let moved_from = crate::MessageId {
        segment_seq: r.u64()?,
        shard: u16::from_le_bytes(r.take(2)?.try_into().unwrap()),
        offset_blocks: r.u32()?,
    };
    let count = r.u32()? as usize;
    if count > COPY_RECIPIENTS_MAX {
        return Err(DecodeError::BadField("copy recipient count"));
    }
    let bitmap = r.take(count.div_ceil(8))?;
    let done = (0..count).map(|i| bitmap[i / 8] & (1 << (i % 8)) != 0).collect();
    Ok((Some(CopyOf { moved_from, done }), &payload[r.pos..]))
}

/// The fixed header in front of every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub kind: u8,
    pub crc: u32,
}

impl Header {
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Header {
        Header {
            len: u32::from_le_bytes(bytes[0..4].try_into().unwrap()),
            kind: bytes[4],
            crc: u32::from_le_bytes(bytes[5..9].try_into().unwrap()),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&self.len.to_le_bytes());
        out[4] = self.kind;
        out[5..9].copy_from_slice(&self.crc.to_le_bytes());
        out
    }

    /// The all-zero header of never-written space.
    pub fn is_zero(&self) -> bool {
        self.len == 0 && self.kind == 0 && self.crc == 0
    }
}

/// Starts a CRC for a record of `len` payload bytes of `kind` in segment `segment_seq`;
/// continue it over the payload with `crc32c::crc32c_append`.
pub fn crc_start(segment_seq: u64, len: u32, kind: u8) -> u32 {
    let mut prefix = [0u8; 13];
    prefix[0..8].copy_from_slice(&segment_seq.to_le_bytes());
    prefix[8..12].copy_from_slice(&len.to_le_bytes());
    prefix[12] = kind;
    crc32c::crc32c(&prefix)
}

/// A record that holds a message, checked: its header, its CRC (which names the segment), and
/// the `Copy` prefix if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord<'a> {
    pub header: Header,
    pub copy_of: Option<CopyOf>,
    /// The `Message` payload (envelope length, envelope, content).
    pub payload: &'a [u8],
    /// Where `payload` starts in the bytes given.
    pub payload_offset: usize,
}

/// Why bytes are not a message record of the segment named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than the header says.
    Short,
    /// The kind is not `Message` or `Copy`.
    NotAMessage,
    /// The CRC does not match (damaged, or a record of another segment).
    Checksum,
    Decode(DecodeError),
}

/// Checks the record at the start of `bytes` (of segment `segment_seq`) and finds its message:
/// the one check that recovery's tools and delivery's reads share. Never panics.
pub fn verify_message_record(bytes: &[u8], segment_seq: u64) -> Result<MessageRecord<'_>, RecordError> {
    let head: &[u8; HEADER_BYTES] = bytes
        .get(..HEADER_BYTES)
        .and_then(|h| h.try_into().ok())
        .ok_or(RecordError::Short)?;
    let header = Header::decode(head);
    if !Kind::holds_message(header.kind) {
        return Err(RecordError::NotAMessage);
    }
    let payload = bytes
        .get(HEADER_BYTES..HEADER_BYTES + header.len as usize)
        .ok_or(RecordError::Short)?;
    let crc = crc32c::crc32c_append(crc_start(segment_seq, header.len, header.kind), payload);
    if crc != header.crc {
        return Err(RecordError::Checksum);
    }
    let (copy_of, message) = split_message_payload(header.kind, payload).map_err(RecordError::Decode)?;
    Ok(MessageRecord {
        header,
        copy_of,
        payload: message,
        payload_offset: HEADER_BYTES + payload.len() - message.len(),
    })
}

/// The largest `Message` record the session can produce with these limits: header, envelope
/// (HELO is at most a command line, and the other fields at most their `gannet_smtp::limits`),
/// the Received header and the content. Configuration checks segments against it.
pub fn message_record_bytes_max(line_length_max: usize, recipients_max: usize, message_size_max: u64) -> u64 {
    let fixed = 1 + 8 + 17 + 3 + 8 + (2 + line_length_max) + (2 + ADDRESS_BYTES_MAX) + (2 + ENVID_BYTES_MAX) + 4;
    let per_recipient = 2 + ADDRESS_BYTES_MAX + 1 + 2 + ORCPT_BYTES_MAX;
    let received_header = RECEIVED_HEADER_BYTES_MAX;
    let payload = 4 + fixed + recipients_max * per_recipient + received_header;
    crate::align_up(HEADER_BYTES as u64 + payload as u64 + message_size_max)
}

const ENVELOPE_VERSION: u8 = 1;
/// An envelope of version 2 is a version 1 envelope whose `Message` payload ends with header
/// fields to send in front of the content (the DKIM signatures made when it was accepted), then
/// their length as u32le. The session writes version 1 and the signer turns it into 2 when it
/// appends signatures ([`ENVELOPE_VERSION_OFFSET`]), so that nothing moves.
pub const ENVELOPE_VERSION_PREPENDED: u8 = 2;
/// Where the envelope's version byte is in a `Message` record: after the record header and the
/// envelope length.
pub const ENVELOPE_VERSION_OFFSET: usize = HEADER_BYTES + 4;
/// Most bytes of header fields a message may carry in front of its content.
pub const PREPENDED_BYTES_MAX: usize = 64 * 1024;

/// Appends the encoded envelope (without its length prefix) to `out`.
pub fn encode_envelope(envelope: &Envelope, origin: Origin<'_>, out: &mut Vec<u8>) {
    out.push(ENVELOPE_VERSION);
    out.extend_from_slice(&origin.received_unix_s.to_le_bytes());
    match origin.client_ip {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.push(u8::from(envelope.smtputf8));
    out.push(match envelope.body {
        BodyType::Unspecified => 0,
        BodyType::SevenBit => 1,
        BodyType::EightBitMime => 2,
    });
    out.push(match envelope.ret {
        Ret::Unspecified => 0,
        Ret::Full => 1,
        Ret::Headers => 2,
    });
    out.extend_from_slice(&envelope.size_declared_bytes.unwrap_or(u64::MAX).to_le_bytes());
    put_bytes(out, origin.helo);
    put_bytes(out, envelope.sender());
    put_bytes(out, envelope.envid());
    out.extend_from_slice(&(envelope.recipient_count() as u32).to_le_bytes());
    for (address, notify, orcpt) in envelope.recipients() {
        put_bytes(out, address);
        out.push(notify);
        put_bytes(out, orcpt);
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Every field fits: see the compile-time assertions in `gannet_smtp::limits`.
    let len = u16::try_from(bytes.len()).expect("envelope field within gannet_smtp::limits");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    Truncated,
    UnknownVersion(u8),
    BadField(&'static str),
}

/// A decoded `Message` payload: the envelope and where the content starts in the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub envelope: StoredEnvelope,
    pub content_offset: usize,
    pub content_bytes: usize,
    /// Header fields stored after the content, sent in front of it (version 2 envelopes).
    pub prepended_bytes: usize,
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let slice = self.bytes.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// A batch's entry count, checked against the bytes that follow it.
    fn batch_count(&mut self, entry_bytes: usize, what: &'static str) -> Result<usize, DecodeError> {
        let count = self.u32()? as usize;
        if count.checked_mul(entry_bytes) != Some(self.bytes.len() - self.pos) {
            return Err(DecodeError::BadField(what));
        }
        Ok(count)
    }

    /// A message id as batches store it: shard u16, segment seq u64, offset blocks u32.
    fn entry_id(&mut self) -> Result<crate::MessageId, DecodeError> {
        let shard = u16::from_le_bytes(self.take(2)?.try_into().unwrap());
        let segment_seq = self.u64()?;
        let offset_blocks = self.u32()?;
        Ok(crate::MessageId {
            segment_seq,
            shard,
            offset_blocks,
        })
    }

    /// A length-prefixed field, in place.
    fn field(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().unwrap());
        self.take(usize::from(len))
    }
}

/// Decodes a `Message` payload. Never panics, whatever the bytes.
pub fn decode_message(payload: &[u8]) -> Result<StoredMessage, DecodeError> {
    let parts = split_message(payload)?;
    Ok(StoredMessage {
        envelope: EnvelopeView::parse(parts.envelope)?.to_stored(),
        content_offset: parts.content_offset,
        content_bytes: parts.content.len(),
        prepended_bytes: parts.prepended.len(),
    })
}

/// A `Message` payload's parts, each borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageParts<'a> {
    pub envelope: &'a [u8],
    /// Header fields that go in front of the content when it is relayed (empty for version 1).
    pub prepended: &'a [u8],
    /// Our Received header and the client's content, dot-stuffing removed.
    pub content: &'a [u8],
    /// Where `content` starts in the payload.
    pub content_offset: usize,
}

impl MessageParts<'_> {
    /// The size of the message as relayed: prepended fields and content.
    pub fn relayed_bytes(&self) -> usize {
        self.prepended.len() + self.content.len()
    }
}

/// Splits a `Message` payload into envelope, prepended header fields and content. Never
/// panics, whatever the bytes.
pub fn split_message(payload: &[u8]) -> Result<MessageParts<'_>, DecodeError> {
    let (envelope, content_offset) = split_envelope(payload)?;
    let rest = &payload[content_offset..];
    if envelope.first() != Some(&ENVELOPE_VERSION_PREPENDED) {
        return Ok(MessageParts {
            envelope,
            prepended: &[],
            content: rest,
            content_offset,
        });
    }
    let len_at = rest.len().checked_sub(4).ok_or(DecodeError::Truncated)?;
    let len = u32::from_le_bytes(rest[len_at..].try_into().unwrap()) as usize;
    if len > PREPENDED_BYTES_MAX {
        return Err(DecodeError::BadField("prepended length"));
    }
    let content_len = len_at
        .checked_sub(len)
        .ok_or(DecodeError::BadField("prepended length"))?;
    Ok(MessageParts {
        envelope,
        prepended: &rest[content_len..len_at],
        content: &rest[..content_len],
        content_offset,
    })
}

/// A `Message` payload's envelope bytes (checked) and where its content starts.
pub fn split_envelope(payload: &[u8]) -> Result<(&[u8], usize), DecodeError> {
    let mut outer = Reader { bytes: payload, pos: 0 };
    let envelope_len = outer.u32()? as usize;
    let envelope = outer.take(envelope_len)?;
    EnvelopeView::parse(envelope)?;
    Ok((envelope, outer.pos))
}

/// A stored envelope read in place: every field borrows the encoded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnvelopeView<'a> {
    pub received_unix_s: u64,
    pub client_ip: IpAddr,
    pub smtputf8: bool,
    pub body: BodyType,
    pub ret: Ret,
    pub size_declared_bytes: Option<u64>,
    pub helo: &'a [u8],
    pub sender: &'a [u8],
    pub envid: &'a [u8],
    recipient_count: u32,
    /// From the first recipient to the end.
    recipients: &'a [u8],
}

/// One recipient of an [`EnvelopeView`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecipientView<'a> {
    pub address: &'a [u8],
    pub notify: u8,
    pub orcpt: &'a [u8],
}

impl<'a> EnvelopeView<'a> {
    /// Reads and checks encoded envelope bytes (the `encode_envelope` form). Never panics.
    pub fn parse(bytes: &'a [u8]) -> Result<EnvelopeView<'a>, DecodeError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u8()?;
        if version != ENVELOPE_VERSION && version != ENVELOPE_VERSION_PREPENDED {
            return Err(DecodeError::UnknownVersion(version));
        }
        let received_unix_s = r.u64()?;
        let client_ip = match r.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(r.take(4)?).unwrap())),
            6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(r.take(16)?).unwrap())),
            _ => return Err(DecodeError::BadField("client address family")),
        };
        let smtputf8 = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(DecodeError::BadField("smtputf8")),
        };
        let body = match r.u8()? {
            0 => BodyType::Unspecified,
            1 => BodyType::SevenBit,
            2 => BodyType::EightBitMime,
            _ => return Err(DecodeError::BadField("body")),
        };
        let ret = match r.u8()? {
            0 => Ret::Unspecified,
            1 => Ret::Full,
            2 => Ret::Headers,
            _ => return Err(DecodeError::BadField("ret")),
        };
        let size_declared_bytes = match r.u64()? {
            u64::MAX => None,
            n => Some(n),
        };
        let helo = r.field()?;
        let sender = r.field()?;
        let envid = r.field()?;
        let recipient_count = r.u32()?;
        let recipients = &bytes[r.pos..];
        // Each recipient takes at least 5 bytes; walk them once to check the lengths add up.
        if recipient_count as usize > recipients.len() / 5 {
            return Err(DecodeError::BadField("recipient count"));
        }
        for _ in 0..recipient_count {
            r.field()?;
            r.u8()?;
            r.field()?;
        }
        if r.pos != bytes.len() {
            return Err(DecodeError::BadField("envelope length"));
        }
        Ok(EnvelopeView {
            received_unix_s,
            client_ip,
            smtputf8,
            body,
            ret,
            size_declared_bytes,
            helo,
            sender,
            envid,
            recipient_count,
            recipients,
        })
    }

    pub fn recipient_count(&self) -> usize {
        self.recipient_count as usize
    }

    /// The recipients in order.
    pub fn recipients(&self) -> impl Iterator<Item = RecipientView<'a>> + 'a {
        let mut r = Reader {
            bytes: self.recipients,
            pos: 0,
        };
        // `parse` checked every length, so these reads cannot fail.
        (0..self.recipient_count).map(move |_| RecipientView {
            address: r.field().expect("checked by parse"),
            notify: r.u8().expect("checked by parse"),
            orcpt: r.field().expect("checked by parse"),
        })
    }

    /// Recipient `index` (a walk from the first: for single lookups; iterate for many).
    pub fn recipient(&self, index: usize) -> Option<RecipientView<'a>> {
        self.recipients().nth(index)
    }

    /// The owned form.
    pub fn to_stored(&self) -> StoredEnvelope {
        StoredEnvelope {
            received_unix_s: self.received_unix_s,
            client_ip: self.client_ip,
            smtputf8: self.smtputf8,
            body: self.body,
            ret: self.ret,
            size_declared_bytes: self.size_declared_bytes,
            helo: self.helo.to_vec(),
            sender: self.sender.to_vec(),
            envid: self.envid.to_vec(),
            recipients: self
                .recipients()
                .map(|r| StoredRecipient {
                    address: r.address.to_vec(),
                    notify: r.notify,
                    orcpt: r.orcpt.to_vec(),
                })
                .collect(),
        }
    }
}

/// An envelope kept in memory in its encoded form: one allocation per message, fields read in
/// place through [`EnvelopeBytes::view`]. This is what keeps the queue index small (the design
/// budget is 64 MB for 100,000 queued messages).
#[derive(Clone, PartialEq, Eq)]
pub struct EnvelopeBytes(Box<[u8]>);

impl EnvelopeBytes {
    /// Checks and keeps encoded envelope bytes.
    pub fn new(bytes: &[u8]) -> Result<EnvelopeBytes, DecodeError> {
        EnvelopeView::parse(bytes)?;
        Ok(EnvelopeBytes(bytes.into()))
    }

    /// Encodes a live session's envelope.
    pub fn from_envelope(envelope: &Envelope, origin: Origin<'_>) -> EnvelopeBytes {
        let mut bytes = Vec::new();
        encode_envelope(envelope, origin, &mut bytes);
        EnvelopeBytes(bytes.into_boxed_slice())
    }

    pub fn view(&self) -> EnvelopeView<'_> {
        EnvelopeView::parse(&self.0).expect("checked when made")
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for EnvelopeBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.view().fmt(f)
    }
}

/// Builds a complete `Message` record in memory (header, payload, padding). The appender builds
/// the same bytes in place in its aligned buffers; this form serves tests, tools and fuzzing.
pub fn build_message_record(segment_seq: u64, envelope: &Envelope, origin: Origin<'_>, content: &[u8]) -> Vec<u8> {
    let mut env = Vec::new();
    encode_envelope(envelope, origin, &mut env);
    let mut out = vec![0u8; HEADER_BYTES];
    out.extend_from_slice(&(env.len() as u32).to_le_bytes());
    out.extend_from_slice(&env);
    out.extend_from_slice(content);
    seal_record(segment_seq, Kind::Message, out)
}

/// Fills in the header of a record built in memory (`out` starts with `HEADER_BYTES` of room,
/// then the payload) and pads it to the record alignment.
fn seal_record(segment_seq: u64, kind: Kind, mut out: Vec<u8>) -> Vec<u8> {
    let len = u32::try_from(out.len() - HEADER_BYTES).expect("record over 4 GiB");
    let crc = crc32c::crc32c_append(crc_start(segment_seq, len, kind as u8), &out[HEADER_BYTES..]);
    out[..HEADER_BYTES].copy_from_slice(
        &Header {
            len,
            kind: kind as u8,
            crc,
        }
        .encode(),
    );
    out.resize(crate::align_up(out.len() as u64) as usize, 0);
    out
}

/// Builds a complete `Copy` record in memory: `copy` in front of an existing `Message` payload.
pub fn build_copy_record(segment_seq: u64, copy: &CopyOf, message_payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_BYTES];
    copy.encode(&mut out);
    out.extend_from_slice(message_payload);
    seal_record(segment_seq, Kind::Copy, out)
}

/// Bytes of one entry in a state batch: shard u16, segment seq u64, offset blocks u32, recipient u32.
const STATE_ENTRY_BYTES: usize = 2 + 8 + 4 + 4;

/// One piece of delivery state: recipient `recipient` of message `id` is finished (delivered or
/// failed for good). In a `Tombstone` batch the recipient is ignored: the whole message is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateEntry {
    pub id: crate::MessageId,
    pub recipient: u32,
}

/// Bytes of a state record with `entries` entries, header included, padding not.
pub fn state_record_bytes(entries: usize) -> usize {
    HEADER_BYTES + 4 + entries * STATE_ENTRY_BYTES
}

/// Appends a message id as batches store it (the inverse of `Reader::entry_id`): shard u16,
/// segment seq u64, offset blocks u32.
fn encode_entry_id(id: &crate::MessageId, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.shard.to_le_bytes());
    out.extend_from_slice(&id.segment_seq.to_le_bytes());
    out.extend_from_slice(&id.offset_blocks.to_le_bytes());
}

/// Appends a state batch payload (`count:u32le` then the entries).
pub fn encode_state_batch(entries: &[StateEntry], out: &mut Vec<u8>) {
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        encode_entry_id(&e.id, out);
        out.extend_from_slice(&e.recipient.to_le_bytes());
    }
}

/// A deferred message's retry schedule, recorded each time it is deferred so that a restart
/// keeps it (the latest record of a message wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deferral {
    pub id: crate::MessageId,
    pub attempts: u32,
    /// When the next attempt is due, in seconds since the epoch.
    pub next_attempt_unix_s: u64,
    pub delay_notified: bool,
    /// Held by an operator: never attempted until released.
    pub held: bool,
}

/// Flag bits of a deferral entry.
const DEFERRAL_DELAY_NOTIFIED: u8 = 1;
const DEFERRAL_HELD: u8 = 2;

/// Bytes of one deferral entry: shard u16, segment seq u64, offset blocks u32, attempts u32,
/// next attempt u64, flags u8 (bit 0: delay notice sent; bit 1: held).
const DEFERRAL_ENTRY_BYTES: usize = 2 + 8 + 4 + 4 + 8 + 1;

/// Bytes of a `Deferral` record of `entries` entries, header included (padding not).
pub fn deferral_record_bytes(entries: usize) -> usize {
    HEADER_BYTES + 4 + entries * DEFERRAL_ENTRY_BYTES
}

pub fn encode_deferrals(entries: &[Deferral], out: &mut Vec<u8>) {
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        encode_entry_id(&e.id, out);
        out.extend_from_slice(&e.attempts.to_le_bytes());
        out.extend_from_slice(&e.next_attempt_unix_s.to_le_bytes());
        let flags = if e.delay_notified { DEFERRAL_DELAY_NOTIFIED } else { 0 } | if e.held { DEFERRAL_HELD } else { 0 };
        out.push(flags);
    }
}

/// Decodes a `Deferral` payload. Never panics, whatever the bytes.
pub fn decode_deferrals(payload: &[u8]) -> Result<Vec<Deferral>, DecodeError> {
    let mut r = Reader { bytes: payload, pos: 0 };
    let count = r.batch_count(DEFERRAL_ENTRY_BYTES, "deferral batch length")?;
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let (id, attempts, next_attempt_unix_s, flags) = (r.entry_id()?, r.u32()?, r.u64()?, r.u8()?);
        entries.push(Deferral {
            id,
            attempts,
            next_attempt_unix_s,
            delay_notified: flags & DEFERRAL_DELAY_NOTIFIED != 0,
            held: flags & DEFERRAL_HELD != 0,
        });
    }
    Ok(entries)
}

pub fn build_deferral_record(segment_seq: u64, entries: &[Deferral]) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_BYTES];
    encode_deferrals(entries, &mut out);
    seal_record(segment_seq, Kind::Deferral, out)
}

/// Decodes a state batch payload. Never panics, whatever the bytes.
pub fn decode_state_batch(payload: &[u8]) -> Result<Vec<StateEntry>, DecodeError> {
    let mut r = Reader { bytes: payload, pos: 0 };
    let count = r.batch_count(STATE_ENTRY_BYTES, "state batch length")?;
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let id = r.entry_id()?;
        let recipient = r.u32()?;
        entries.push(StateEntry { id, recipient });
    }
    Ok(entries)
}

/// Builds a complete state record (header, payload, padding) for segment `segment_seq`.
pub fn build_state_record(segment_seq: u64, kind: Kind, entries: &[StateEntry]) -> Vec<u8> {
    debug_assert!(kind != Kind::Message);
    let mut out = vec![0u8; HEADER_BYTES];
    encode_state_batch(entries, &mut out);
    seal_record(segment_seq, kind, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gannet_smtp::envelope::notify;

    pub(crate) fn sample_envelope() -> Envelope {
        let mut env = Envelope::default();
        env.set_sender(|b| b.extend_from_slice(b"from@x.example"));
        env.add_recipient(
            |b| b.extend_from_slice(b"to@y.example"),
            notify::FAILURE | notify::DELAY,
            b"rfc822;to@y.example",
        );
        env.body = BodyType::EightBitMime;
        env.ret = Ret::Headers;
        env.size_declared_bytes = Some(1234);
        env.set_envid(b"QQ314159");
        env
    }

    #[test]
    fn deferral_batches_round_trip() {
        let entries = [
            Deferral {
                id: crate::MessageId::new(7, 1, 4096),
                attempts: 3,
                next_attempt_unix_s: 1_800_000_000,
                delay_notified: true,
                held: false,
            },
            Deferral {
                id: crate::MessageId::new(8, 0, 0),
                attempts: 1,
                next_attempt_unix_s: 5,
                delay_notified: false,
                held: true,
            },
        ];
        let record = build_deferral_record(9, &entries);
        let h = Header::decode(record[..HEADER_BYTES].try_into().unwrap());
        assert_eq!(h.kind, Kind::Deferral as u8);
        assert_eq!(HEADER_BYTES + h.len as usize, deferral_record_bytes(2));
        let payload = &record[HEADER_BYTES..HEADER_BYTES + h.len as usize];
        assert_eq!(decode_deferrals(payload).unwrap(), entries);
        assert!(decode_deferrals(&payload[..payload.len() - 1]).is_err());
        assert!(decode_deferrals(&[]).is_err());
    }

    #[test]
    fn a_copy_record_carries_its_origin_and_done_flags_in_front_of_the_message() {
        let env = sample_envelope();
        let origin = Origin {
            client_ip: "192.0.2.1".parse().unwrap(),
            helo: b"h",
            received_unix_s: 7,
        };
        let original = build_message_record(41, &env, origin, b"body\r\n");
        let header = Header::decode(original[..HEADER_BYTES].try_into().unwrap());
        let message_payload = &original[HEADER_BYTES..HEADER_BYTES + header.len as usize];
        let copy = CopyOf {
            moved_from: crate::MessageId::new(41, 3, 8192),
            done: vec![true, false, false, true, false, false, false, false, true],
        };
        let record = build_copy_record(99, &copy, message_payload);
        let h = Header::decode(record[..HEADER_BYTES].try_into().unwrap());
        assert_eq!(h.kind, Kind::Copy as u8);
        assert!(Kind::holds_message(h.kind) && Kind::holds_message(Kind::Message as u8));
        let payload = &record[HEADER_BYTES..HEADER_BYTES + h.len as usize];
        assert_eq!(crc32c::crc32c_append(crc_start(99, h.len, h.kind), payload), h.crc);
        let (decoded, rest) = split_message_payload(h.kind, payload).unwrap();
        assert_eq!(decoded, Some(copy));
        assert_eq!(rest, message_payload);
        assert_eq!(decode_message(rest).unwrap().envelope.sender, b"from@x.example");
        assert_eq!(
            split_message_payload(Kind::Message as u8, message_payload).unwrap(),
            (None, message_payload)
        );
        assert!(split_message_payload(Kind::Copy as u8, &payload[..10]).is_err());
        assert!(split_message_payload(Kind::Outcome as u8, payload).is_err());
    }

    #[test]
    fn a_version_2_payload_carries_prepended_fields_after_its_content() {
        let env = sample_envelope();
        let origin = Origin {
            client_ip: "192.0.2.1".parse().unwrap(),
            helo: b"client.example",
            received_unix_s: 1_700_000_000,
        };
        let content = b"Subject: hi\r\n\r\nbody\r\n";
        let signature = b"DKIM-Signature: v=1; d=example.com\r\n";
        let mut payload = Vec::new();
        let mut envelope = Vec::new();
        encode_envelope(&env, origin, &mut envelope);
        payload.extend_from_slice(&(envelope.len() as u32).to_le_bytes());
        payload.extend_from_slice(&envelope);
        payload.extend_from_slice(content);
        // Version 1: everything after the envelope is content.
        let v1 = split_message(&payload).unwrap();
        assert_eq!((v1.prepended, v1.content), (&b""[..], &content[..]));
        payload.extend_from_slice(signature);
        payload.extend_from_slice(&(signature.len() as u32).to_le_bytes());
        payload[4] = ENVELOPE_VERSION_PREPENDED;
        let v2 = split_message(&payload).unwrap();
        assert_eq!(v2.prepended, &signature[..]);
        assert_eq!(v2.content, &content[..]);
        assert_eq!(v2.relayed_bytes(), signature.len() + content.len());
        let decoded = decode_message(&payload).unwrap();
        assert_eq!(
            (decoded.content_bytes, decoded.prepended_bytes),
            (content.len(), signature.len())
        );
        // A length that claims more than there is, or more than the limit, is an error.
        let mut bad = payload.clone();
        let n = bad.len();
        bad[n - 4..].copy_from_slice(&(content.len() as u32 + 1000).to_le_bytes());
        assert_eq!(split_message(&bad), Err(DecodeError::BadField("prepended length")));
        bad[n - 4..].copy_from_slice(&(PREPENDED_BYTES_MAX as u32 + 1).to_le_bytes());
        assert_eq!(split_message(&bad), Err(DecodeError::BadField("prepended length")));
        for cut in 0..payload.len() {
            let _ = split_message(&payload[..cut]);
        }
    }

    #[test]
    fn message_round_trips() {
        let env = sample_envelope();
        let origin = Origin {
            client_ip: "2001:db8::7".parse().unwrap(),
            helo: b"client.example",
            received_unix_s: 1_700_000_000,
        };
        let record = build_message_record(42, &env, origin, b"Subject: hi\r\n\r\nbody\r\n");
        assert_eq!(record.len() % 4096, 0);
        let header = Header::decode(record[..HEADER_BYTES].try_into().unwrap());
        assert_eq!(header.kind, Kind::Message as u8);
        let payload = &record[HEADER_BYTES..HEADER_BYTES + header.len as usize];
        let crc = crc32c::crc32c_append(crc_start(42, header.len, header.kind), payload);
        assert_eq!(crc, header.crc);
        assert_ne!(
            crc32c::crc32c_append(crc_start(43, header.len, header.kind), payload),
            header.crc
        );
        let msg = decode_message(payload).unwrap();
        assert_eq!(msg.envelope.sender, b"from@x.example");
        assert_eq!(msg.envelope.helo, b"client.example");
        assert_eq!(msg.envelope.client_ip, origin.client_ip);
        assert_eq!(msg.envelope.envid, b"QQ314159");
        assert_eq!(msg.envelope.size_declared_bytes, Some(1234));
        assert_eq!(msg.envelope.ret, Ret::Headers);
        assert_eq!(msg.envelope.body, BodyType::EightBitMime);
        assert_eq!(
            msg.envelope.recipients,
            vec![StoredRecipient {
                address: b"to@y.example".to_vec(),
                notify: notify::FAILURE | notify::DELAY,
                orcpt: b"rfc822;to@y.example".to_vec()
            }]
        );
        assert_eq!(&payload[msg.content_offset..], b"Subject: hi\r\n\r\nbody\r\n");
    }

    #[test]
    fn state_batches_round_trip() {
        let entries = vec![
            StateEntry {
                id: crate::MessageId::new(7, 1, 8192),
                recipient: 3,
            },
            StateEntry {
                id: crate::MessageId::new(9, 0, 0),
                recipient: u32::MAX,
            },
        ];
        let record = build_state_record(11, Kind::Outcome, &entries);
        let header = Header::decode(record[..HEADER_BYTES].try_into().unwrap());
        let payload = &record[HEADER_BYTES..HEADER_BYTES + header.len as usize];
        assert_eq!(decode_state_batch(payload), Ok(entries));
        assert!(decode_state_batch(&payload[..payload.len() - 1]).is_err());
        assert!(decode_state_batch(&[1, 0, 0, 0]).is_err());
    }

    #[test]
    fn truncated_or_garbled_payloads_are_errors_not_panics() {
        let env = sample_envelope();
        let origin = Origin {
            client_ip: "192.0.2.1".parse().unwrap(),
            helo: b"h",
            received_unix_s: 1,
        };
        let record = build_message_record(1, &env, origin, b"x");
        let header = Header::decode(record[..HEADER_BYTES].try_into().unwrap());
        let payload = &record[HEADER_BYTES..HEADER_BYTES + header.len as usize];
        for cut in 0..payload.len() - 1 {
            let _ = decode_message(&payload[..cut]);
        }
        let mut bad = payload.to_vec();
        bad[4] = 9;
        assert_eq!(decode_message(&bad), Err(DecodeError::UnknownVersion(9)));
        assert_eq!(decode_message(&[0xff, 0xff, 0xff, 0xff]), Err(DecodeError::Truncated));
    }
}
