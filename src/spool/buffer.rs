//! The spool's write buffer for one message: aligned DMA buffers that the session's decoded
//! content is copied into as it arrives, and that are then written to the segment as they are.
//!
//! The record is built in place: a header placeholder, the encoded envelope, then the content.
//! When the message is complete and its place in the segment is known, [`FinishedMessage::seal`]
//! fills in the header and CRC and zeroes the padding. There is no other copy of the message.
//!
//! Memory: buffers grow 16 KiB, 64 KiB, then 256 KiB at a time, and every byte is charged to the
//! shard's [`Budget`]; a message that would exceed it is refused with 452 rather than waiting.

use std::cell::Cell;
use std::rc::Rc;

use glommio::io::DmaBuffer;

use super::record::{
    crc_start, encode_envelope, CopyOf, Header, Kind, ENVELOPE_VERSION_OFFSET, ENVELOPE_VERSION_PREPENDED,
    HEADER_BYTES, PREPENDED_BYTES_MAX,
};
use super::{align_up, RECORD_ALIGN_BYTES};
use crate::smtp::envelope::{Envelope, Origin};
use crate::smtp::session::{MessageSink, SinkFull};

const FIRST_CHUNK_BYTES: usize = 16 * 1024;
const CHUNK_BYTES_MAX: usize = 256 * 1024;

/// A shard's budget of memory for messages being received or written.
#[derive(Debug)]
pub struct Budget {
    used_bytes: Cell<usize>,
    max_bytes: usize,
}

impl Budget {
    pub fn new(max_bytes: usize) -> Rc<Budget> {
        Rc::new(Budget {
            used_bytes: Cell::new(0),
            max_bytes,
        })
    }

    pub fn used_bytes(&self) -> usize {
        self.used_bytes.get()
    }

    /// Charges `bytes` that the caller holds outside the message buffers (a copy for the
    /// signer); they are given back when the [`Charge`] is dropped.
    pub fn try_charge(self: &Rc<Self>, bytes: usize) -> Result<Charge, SinkFull> {
        self.charge(bytes)?;
        Ok(Charge {
            budget: self.clone(),
            bytes,
        })
    }

    fn charge(&self, bytes: usize) -> Result<(), SinkFull> {
        let used = self.used_bytes.get() + bytes;
        if used > self.max_bytes {
            return Err(SinkFull);
        }
        self.used_bytes.set(used);
        Ok(())
    }

    fn release(&self, bytes: usize) {
        let used = self.used_bytes.get();
        assert!(bytes <= used, "budget released more than it was charged");
        self.used_bytes.set(used - bytes);
    }
}

/// Bytes charged to a budget, given back when dropped.
#[derive(Debug)]
pub struct Charge {
    budget: Rc<Budget>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

/// The session's message sink, backed by DMA buffers.
pub struct MessageBuffer {
    budget: Rc<Budget>,
    chunks: Vec<DmaBuffer>,
    /// Bytes used in the last chunk.
    tail_bytes: usize,
    /// Header plus payload bytes so far.
    total_bytes: usize,
    charged_bytes: usize,
    /// Header, envelope length and envelope: everything before the content.
    prefix_bytes: usize,
    envelope_scratch: Vec<u8>,
    open: bool,
    /// `Message`, or `Copy` after [`MessageBuffer::begin_copy`].
    kind: Kind,
    /// Bytes of header fields appended by [`MessageBuffer::append_prepended`] (0: none).
    prepended_bytes: usize,
}

impl MessageBuffer {
    pub fn new(budget: Rc<Budget>) -> MessageBuffer {
        MessageBuffer {
            budget,
            chunks: Vec::new(),
            tail_bytes: 0,
            total_bytes: 0,
            charged_bytes: 0,
            prefix_bytes: 0,
            envelope_scratch: Vec::new(),
            open: false,
            kind: Kind::Message,
            prepended_bytes: 0,
        }
    }

    /// Starts a `Copy` record: `copy` goes in front; the caller appends the original `Message`
    /// payload (envelope length, envelope, content) as it is.
    pub fn begin_copy(&mut self, copy: &CopyOf) -> Result<(), SinkFull> {
        self.abandon();
        self.open = true;
        self.kind = Kind::Copy;
        let mut prefix = Vec::with_capacity(32);
        copy.encode(&mut prefix);
        let result = self.write(&[0u8; HEADER_BYTES]).and_then(|()| self.write(&prefix));
        self.prefix_bytes = self.total_bytes;
        if result.is_err() {
            self.abandon();
        }
        result
    }

    fn grow(&mut self) -> Result<(), SinkFull> {
        let size = match self.chunks.last() {
            None => FIRST_CHUNK_BYTES,
            Some(last) => (last.len() * 4).min(CHUNK_BYTES_MAX),
        };
        self.budget.charge(size)?;
        self.charged_bytes += size;
        self.chunks.push(glommio::allocate_dma_buffer(size));
        self.tail_bytes = 0;
        Ok(())
    }

    fn write(&mut self, mut bytes: &[u8]) -> Result<(), SinkFull> {
        debug_assert!(self.open);
        while !bytes.is_empty() {
            let room = self.chunks.last().map_or(0, |c| c.len() - self.tail_bytes);
            if room == 0 {
                self.grow()?;
                continue;
            }
            let n = room.min(bytes.len());
            let tail = self.tail_bytes;
            let chunk = self.chunks.last_mut().expect("a chunk after grow");
            chunk.as_bytes_mut()[tail..tail + n].copy_from_slice(&bytes[..n]);
            self.tail_bytes += n;
            self.total_bytes += n;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// The budget this buffer charges.
    pub fn budget(&self) -> &Rc<Budget> {
        &self.budget
    }

    /// Bytes of content so far (our Received header and the client's bytes).
    pub fn content_bytes_so_far(&self) -> usize {
        self.total_bytes - self.prefix_bytes
    }

    /// The content so far (our Received header and the client's bytes) in one piece, for the
    /// signer: the DMA buffers stay on the shard's thread, the copy may leave it.
    pub fn content_copy(&self) -> Vec<u8> {
        assert!(self.open && self.kind == Kind::Message && self.prepended_bytes == 0);
        let mut out = Vec::with_capacity(self.total_bytes - self.prefix_bytes);
        let mut skip = self.prefix_bytes;
        let last = self.chunks.len().saturating_sub(1);
        for (i, chunk) in self.chunks.iter().enumerate() {
            let end = if i == last { self.tail_bytes } else { chunk.len() };
            let start = skip.min(end);
            skip -= start;
            out.extend_from_slice(&chunk.as_bytes()[start..end]);
        }
        debug_assert_eq!(out.len(), self.total_bytes - self.prefix_bytes);
        out
    }

    /// Overwrites content bytes in place, `offset` counted from the content's start (as in
    /// [`MessageBuffer::content_copy`]); the length does not change. Before `take`, which
    /// computes the record's checksum.
    pub fn overwrite_content(&mut self, offset: usize, bytes: &[u8]) {
        assert!(self.open && self.kind == Kind::Message && self.prepended_bytes == 0);
        assert!(offset + bytes.len() <= self.total_bytes - self.prefix_bytes);
        let mut position = self.prefix_bytes + offset;
        let mut rest = bytes;
        for chunk in &mut self.chunks {
            let len = chunk.len();
            if position >= len {
                position -= len;
                continue;
            }
            let n = rest.len().min(len - position);
            chunk.as_bytes_mut()[position..position + n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            position = 0;
            if rest.is_empty() {
                break;
            }
        }
    }

    /// Stores header fields to be sent in front of the content (docs/spool.md: envelope
    /// version 2). Once per message, after the content is complete. Each field ends in CRLF
    /// and no line starts with `.`, so they need no dot-stuffing.
    pub fn append_prepended(&mut self, headers: &[u8]) -> Result<(), SinkFull> {
        assert!(self.open && self.kind == Kind::Message && self.prepended_bytes == 0);
        assert!(headers.len() <= PREPENDED_BYTES_MAX && headers.ends_with(b"\r\n"));
        debug_assert!(!headers.starts_with(b".") && memchr::memmem::find(headers, b"\n.").is_none());
        if headers.is_empty() {
            return Ok(());
        }
        self.write(headers)?;
        self.write(&(headers.len() as u32).to_le_bytes())?;
        self.chunks[0].as_bytes_mut()[ENVELOPE_VERSION_OFFSET] = ENVELOPE_VERSION_PREPENDED;
        self.prepended_bytes = headers.len();
        Ok(())
    }

    /// Hands the complete message over for writing; the buffer is empty afterwards.
    pub fn take(&mut self) -> FinishedMessage {
        assert!(self.open, "take without a message");
        self.open = false;
        let charge = Charge {
            budget: self.budget.clone(),
            bytes: std::mem::take(&mut self.charged_bytes),
        };
        let content_bytes = self.relayed_bytes();
        FinishedMessage {
            kind: std::mem::replace(&mut self.kind, Kind::Message),
            prepended_bytes: std::mem::take(&mut self.prepended_bytes),
            content_bytes,
            chunks: std::mem::take(&mut self.chunks),
            tail_bytes: std::mem::take(&mut self.tail_bytes),
            total_bytes: std::mem::take(&mut self.total_bytes),
            charge,
        }
    }
}

impl MessageBuffer {
    /// What the message will be on the wire: prepended fields, Received header, content.
    fn relayed_bytes(&self) -> u64 {
        let trailer = if self.prepended_bytes > 0 { 4 } else { 0 };
        (self.total_bytes - self.prefix_bytes - trailer) as u64
    }
}

impl Drop for MessageBuffer {
    fn drop(&mut self) {
        self.abandon();
    }
}

impl MessageSink for MessageBuffer {
    fn begin(&mut self, envelope: &Envelope, origin: Origin<'_>) -> Result<(), SinkFull> {
        self.abandon();
        self.open = true;
        self.kind = Kind::Message;
        self.envelope_scratch.clear();
        encode_envelope(envelope, origin, &mut self.envelope_scratch);
        let scratch = std::mem::take(&mut self.envelope_scratch);
        let result = self
            .write(&[0u8; HEADER_BYTES])
            .and_then(|()| self.write(&(scratch.len() as u32).to_le_bytes()))
            .and_then(|()| self.write(&scratch));
        self.envelope_scratch = scratch;
        self.prefix_bytes = self.total_bytes;
        if result.is_err() {
            self.abandon();
        }
        result
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), SinkFull> {
        self.write(bytes)
    }

    fn suppressed(&mut self, recipient: &gannet_smtp::address::Mailbox<'_>, sender: &[u8]) -> Option<String> {
        crate::suppression::refusal_at_rcpt(recipient, sender)
    }

    fn unknown_local(&mut self, recipient: &gannet_smtp::address::Mailbox<'_>) -> Option<String> {
        crate::verp::unknown_local(recipient)
    }

    fn abandon(&mut self) {
        self.prepended_bytes = 0;
        self.chunks.clear();
        self.tail_bytes = 0;
        self.total_bytes = 0;
        self.budget.release(std::mem::take(&mut self.charged_bytes));
        self.open = false;
    }
}

/// A complete message, ready to be sealed and written.
pub struct FinishedMessage {
    kind: Kind,
    /// The message as it will be relayed: prepended header fields (DKIM signatures), our
    /// Received header and the client's content. (For a copy: the copied payload, envelope
    /// included.)
    pub content_bytes: u64,
    /// Bytes of prepended header fields.
    pub prepended_bytes: usize,
    chunks: Vec<DmaBuffer>,
    tail_bytes: usize,
    total_bytes: usize,
    /// Keeps the memory charged until the writes are done.
    pub charge: Charge,
}

impl FinishedMessage {
    /// The record's length: header and payload, without padding.
    pub fn record_len(&self) -> u32 {
        self.total_bytes as u32
    }

    /// Bytes the record takes in the segment, padding included.
    pub fn record_bytes(&self) -> u64 {
        align_up(self.total_bytes as u64)
    }

    /// Fills in the header for a record in segment `segment_seq`, zeroes the padding and trims
    /// the last buffer. Returns the buffers to write back to back from the record's offset.
    pub fn seal(mut self, segment_seq: u64) -> (Vec<DmaBuffer>, Charge) {
        let len = u32::try_from(self.total_bytes - HEADER_BYTES).expect("record over 4 GiB");
        let kind = self.kind as u8;
        let mut crc = crc_start(segment_seq, len, kind);
        let last = self.chunks.len() - 1;
        for (i, chunk) in self.chunks.iter().enumerate() {
            let start = if i == 0 { HEADER_BYTES } else { 0 };
            let end = if i == last { self.tail_bytes } else { chunk.len() };
            crc = crc32c::crc32c_append(crc, &chunk.as_bytes()[start..end]);
        }
        let header = Header { len, kind, crc }.encode();
        self.chunks[0].as_bytes_mut()[..HEADER_BYTES].copy_from_slice(&header);
        let padded = align_up(self.tail_bytes as u64) as usize;
        let tail = &mut self.chunks[last];
        tail.as_bytes_mut()[self.tail_bytes..padded].fill(0);
        tail.trim_to_size(padded);
        debug_assert!(self.chunks.iter().all(|c| c.len() as u64 % RECORD_ALIGN_BYTES == 0));
        (self.chunks, self.charge)
    }
}
