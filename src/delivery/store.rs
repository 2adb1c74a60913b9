//! Messages read back for delivery: from the buffers they were just written from (small
//! records, kept for their first attempt), or from their segment with O_DIRECT reads, checked
//! with the same record verification recovery uses (`gannet_spool::record::verify_message_record`).
//! A loaded message is the read buffer itself; its envelope is read in place.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;

use gannet_spool::record::{split_message, verify_message_record, DecodeError, EnvelopeView, RecordError};
use gannet_spool::MessageId;
use glommio::io::{DmaFile, OpenOptions, ReadResult};

use crate::spool::appender::WrittenRecord;
use crate::spool::{segment_file_name, shard_dir};

/// Records at most this long are kept in memory after their commit, for their first delivery.
pub const KEPT_RECORD_BYTES_MAX: usize = 64 * 1024;
/// Memory per shard for such records.
const KEPT_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Where a loaded record's bytes are.
enum Body {
    Read(ReadResult),
    Memory(Vec<u8>),
}

/// A message read back: the record's bytes and where its `Message` payload starts.
/// Why a message could not be read back from the spool.
#[derive(Debug)]
pub enum LoadError {
    Open {
        path: std::path::PathBuf,
        source: glommio::GlommioError<()>,
    },
    Read {
        id: MessageId,
        source: glommio::GlommioError<()>,
    },
    ShortRead {
        id: MessageId,
    },
    /// The record fails its checks (length, CRC, kind).
    Record {
        id: MessageId,
        source: RecordError,
    },
    /// The payload's envelope does not decode.
    Envelope {
        id: MessageId,
        source: DecodeError,
    },
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Open { path, source } => write!(f, "cannot open {}: {source}", path.display()),
            LoadError::Read { id, source } => write!(f, "cannot read message {id}: {source}"),
            LoadError::ShortRead { id } => write!(f, "message {id}: short read"),
            LoadError::Record { id, source } => write!(f, "message {id}: record fails its checks ({source:?})"),
            LoadError::Envelope { id, source } => write!(f, "message {id}: {source:?}"),
        }
    }
}

impl std::error::Error for LoadError {}

pub struct Loaded {
    bytes: Body,
    /// Offsets in `bytes` of the envelope, of the header fields stored to go in front of the
    /// content (DKIM signatures; often empty), and of the content.
    envelope: std::ops::Range<usize>,
    prepended: std::ops::Range<usize>,
    content: std::ops::Range<usize>,
}

impl Loaded {
    fn new(id: MessageId, bytes: Body, payload_offset: usize) -> Result<Loaded, LoadError> {
        let all: &[u8] = match &bytes {
            Body::Read(r) => r,
            Body::Memory(v) => v,
        };
        let payload = &all[payload_offset..];
        let parts = split_message(payload).map_err(|source| LoadError::Envelope { id, source })?;
        // Payload layout: envelope length, envelope, content, then (version 2) the prepended
        // fields and their length.
        let envelope = payload_offset + 4..payload_offset + 4 + parts.envelope.len();
        let content =
            payload_offset + parts.content_offset..payload_offset + parts.content_offset + parts.content.len();
        let prepended = content.end..content.end + parts.prepended.len();
        Ok(Loaded {
            envelope,
            prepended,
            content,
            bytes,
        })
    }

    fn all(&self) -> &[u8] {
        match &self.bytes {
            Body::Read(r) => r,
            Body::Memory(v) => v,
        }
    }

    pub fn envelope(&self) -> EnvelopeView<'_> {
        EnvelopeView::parse(&self.all()[self.envelope.clone()]).expect("checked when loaded")
    }

    /// Header fields that go in front of the content (each ends in CRLF; no dot-stuffing needed).
    pub fn prepended(&self) -> &[u8] {
        &self.all()[self.prepended.clone()]
    }

    /// Our Received header and the client's content.
    pub fn content(&self) -> &[u8] {
        &self.all()[self.content.clone()]
    }

    /// The message as relayed: [`Loaded::prepended`] then [`Loaded::content`].
    pub fn relayed(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.prepended() {
            [] => std::borrow::Cow::Borrowed(self.content()),
            head => std::borrow::Cow::Owned([head, self.content()].concat()),
        }
    }

    pub fn relayed_bytes(&self) -> usize {
        self.prepended.len() + self.content.len()
    }
}

pub struct MessageStore {
    spool: PathBuf,
    /// Read handles of segments that hold messages being delivered (dropped once collected).
    readers: RefCell<HashMap<(u16, u64), Rc<DmaFile>>>,
    kept: RefCell<HashMap<MessageId, WrittenRecord>>,
    kept_bytes: Cell<usize>,
}

impl MessageStore {
    pub fn new(spool: PathBuf) -> MessageStore {
        MessageStore {
            spool,
            readers: RefCell::new(HashMap::new()),
            kept: RefCell::new(HashMap::new()),
            kept_bytes: Cell::new(0),
        }
    }

    /// Whether a just-committed record of `len` bytes may be kept.
    pub fn wants(&self, len: usize) -> bool {
        len <= KEPT_RECORD_BYTES_MAX && self.kept_bytes.get() + len <= KEPT_BYTES_MAX
    }

    pub fn keep(&self, id: MessageId, record: WrittenRecord) {
        self.kept_bytes.set(self.kept_bytes.get() + record.len);
        if let Some(old) = self.kept.borrow_mut().insert(id, record) {
            self.kept_bytes.set(self.kept_bytes.get() - old.len);
        }
    }

    /// Drops a message's kept record, if any (delivered, deferred or gone).
    pub fn forget(&self, id: &MessageId) -> Option<WrittenRecord> {
        let record = self.kept.borrow_mut().remove(id)?;
        self.kept_bytes.set(self.kept_bytes.get() - record.len);
        Some(record)
    }

    /// The message, from its kept record (taken: it serves one attempt) or its segment.
    pub async fn load(&self, id: MessageId, record_bytes: u32) -> Result<Loaded, LoadError> {
        match self.forget(&id) {
            Some(record) => {
                let bytes = record.to_vec();
                let checked =
                    verify_message_record(&bytes, id.segment_seq).map_err(|source| LoadError::Record { id, source })?;
                let payload_offset = checked.payload_offset;
                Loaded::new(id, Body::Memory(bytes), payload_offset)
            }
            None => {
                let (bytes, payload_offset) = self.read_record(id, record_bytes).await?;
                Loaded::new(id, Body::Read(bytes), payload_offset)
            }
        }
    }

    /// Reads a record that holds a message (new or copied) and checks it. Returns the bytes and
    /// where the `Message` payload starts in them.
    pub async fn read_record(&self, id: MessageId, record_bytes: u32) -> Result<(ReadResult, usize), LoadError> {
        let file = self.reader(id).await?;
        let bytes = file
            .read_at(id.offset_bytes(), record_bytes as usize)
            .await
            .map_err(|source| LoadError::Read { id, source })?;
        if bytes.len() != record_bytes as usize {
            return Err(LoadError::ShortRead { id });
        }
        let checked =
            verify_message_record(&bytes, id.segment_seq).map_err(|source| LoadError::Record { id, source })?;
        let offset = checked.payload_offset;
        Ok((bytes, offset))
    }

    async fn reader(&self, id: MessageId) -> Result<Rc<DmaFile>, LoadError> {
        let key = (id.shard, id.segment_seq);
        if let Some(file) = self.readers.borrow().get(&key).cloned() {
            return Ok(file);
        }
        let path = shard_dir(&self.spool, id.shard).join(segment_file_name(id.segment_seq));
        let file = OpenOptions::new()
            .read(true)
            .dma_open(&path)
            .await
            .map_err(|source| LoadError::Open {
                path: path.clone(),
                source,
            })?;
        let file = Rc::new(file);
        self.readers.borrow_mut().insert(key, file.clone());
        Ok(file)
    }

    /// Closes the read handles of segments that no longer hold an unfinished message.
    pub fn close_readers(&self, is_live: impl Fn(u16, u64) -> bool) {
        self.readers
            .borrow_mut()
            .retain(|(shard, seq), _| is_live(*shard, *seq));
    }
}
