//! The in-memory index of what a shard has spooled, rebuilt from the spool at start.
//!
//! Today it records every accepted message (delivery, which removes entries, is the next step).
//! It is bounded by the spool itself: at most one entry per 4 KiB of spool.

use crate::spool::recovery::RecoveredMessage;
use crate::spool::MessageId;

/// One spooled message, as the queue listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub id: MessageId,
    pub sender: Box<[u8]>,
    pub recipient_count: u32,
    pub content_bytes: u64,
    pub received_unix_s: u64,
}

impl QueueEntry {
    pub fn from_recovered(m: &RecoveredMessage) -> QueueEntry {
        QueueEntry {
            id: m.id,
            sender: m.envelope.sender.clone().into_boxed_slice(),
            recipient_count: m.envelope.recipients.len() as u32,
            content_bytes: m.content_bytes,
            received_unix_s: m.envelope.received_unix_s,
        }
    }

    /// One line of `gannet queue list`.
    pub fn listing_line(&self) -> String {
        let sender = if self.sender.is_empty() {
            "<>".to_string()
        } else {
            format!("<{}>", String::from_utf8_lossy(&self.sender))
        };
        let received = time::OffsetDateTime::from_unix_timestamp(self.received_unix_s as i64)
            .ok()
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_else(|| self.received_unix_s.to_string());
        format!(
            "{}  {:>10}  {}  {} recipient(s)  received {}",
            self.id, self.content_bytes, sender, self.recipient_count, received
        )
    }
}

/// A shard's queue index.
#[derive(Debug, Default)]
pub struct QueueIndex {
    entries: Vec<QueueEntry>,
}

impl QueueIndex {
    pub fn insert(&mut self, entry: QueueEntry) {
        self.entries.push(entry);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[QueueEntry] {
        &self.entries
    }
}
