//! The in-memory index of a shard's unfinished messages, rebuilt from the spool at start.
//!
//! Each message keeps its envelope in encoded form (one allocation, read in place), which
//! recipients are finished (a bit each) and its retry state. The index also counts the
//! unfinished messages of every segment, which tells the spool when a segment holds nothing
//! anyone needs. It is bounded by the spool itself: at most one entry per 4 KiB of spool.
//!
//! Memory: about 200 bytes per message with one recipient (the design's budget is 64 MB for
//! 100,000 queued messages, while running and after a restart); recovery feeds the index one
//! segment at a time ([`QueueIndex::apply_segment`]), so a restart never holds more than the
//! index and one segment's scan.

use std::collections::{BTreeMap, HashMap};

use gannet_spool::record::{CopyOf, Deferral, EnvelopeBytes, StateEntry};
use gannet_spool::recovery::{RecoveredMessage, SegmentScan};
use gannet_spool::MessageId;

/// Which recipients of a message are finished: a bit each, inline up to 64 recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientSet {
    count: u32,
    bits: Bits,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Bits {
    Inline(u64),
    Heap(Box<[u64]>),
}

impl RecipientSet {
    /// `count` recipients, none finished.
    pub fn new(count: usize) -> RecipientSet {
        let count = u32::try_from(count).expect("recipient count fits u32");
        let bits = if count <= 64 {
            Bits::Inline(0)
        } else {
            Bits::Heap(vec![0u64; (count as usize).div_ceil(64)].into_boxed_slice())
        };
        RecipientSet { count, bits }
    }

    pub fn from_flags(flags: &[bool]) -> RecipientSet {
        let mut set = RecipientSet::new(flags.len());
        for (i, &done) in flags.iter().enumerate() {
            if done {
                set.insert(i);
            }
        }
        set
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn words(&self) -> &[u64] {
        match &self.bits {
            Bits::Inline(w) => std::slice::from_ref(w),
            Bits::Heap(words) => words,
        }
    }

    pub fn contains(&self, i: usize) -> bool {
        i < self.len() && self.words()[i / 64] & (1 << (i % 64)) != 0
    }

    /// Marks recipient `i` finished (ignored past the count).
    pub fn insert(&mut self, i: usize) {
        if i >= self.len() {
            return;
        }
        match &mut self.bits {
            Bits::Inline(w) => *w |= 1 << i,
            Bits::Heap(words) => words[i / 64] |= 1 << (i % 64),
        }
    }

    /// Recipients finished.
    pub fn count_done(&self) -> usize {
        self.words().iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn flags(&self) -> Vec<bool> {
        (0..self.len()).map(|i| self.contains(i)).collect()
    }
}

/// One unfinished message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub id: MessageId,
    /// The record's length on disk (header included, padding not): what delivery reads back.
    pub record_bytes: u32,
    pub content_bytes: u64,
    pub envelope: EnvelopeBytes,
    /// Finished recipients.
    pub done: RecipientSet,
    /// Delivery attempts so far (kept across restarts by `Deferral` records).
    pub attempts: u32,
    /// When the next attempt is due (seconds since the epoch), once deferred.
    pub next_attempt_unix_s: Option<u64>,
    /// Delivery jobs (one per destination) queued or running for this message.
    pub jobs_outstanding: u32,
    /// A delay notice went out (kept across restarts by `Deferral` records).
    pub delay_notified: bool,
    /// Held by an operator: not attempted until released (kept across restarts by `Deferral`
    /// records).
    pub held: bool,
}

impl QueuedMessage {
    /// A message just spooled.
    pub fn new(id: MessageId, record_bytes: u32, content_bytes: u64, envelope: EnvelopeBytes) -> QueuedMessage {
        let recipients = envelope.view().recipient_count();
        QueuedMessage {
            id,
            record_bytes,
            content_bytes,
            envelope,
            done: RecipientSet::new(recipients),
            attempts: 0,
            next_attempt_unix_s: None,
            jobs_outstanding: 0,
            delay_notified: false,
            held: false,
        }
    }

    pub fn from_recovered(m: RecoveredMessage) -> QueuedMessage {
        QueuedMessage::new(m.id, m.record_bytes, m.content_bytes, m.envelope)
    }

    pub fn pending_recipients(&self) -> usize {
        self.done.len() - self.done.count_done()
    }

    /// A bounce: from the null sender.
    pub fn is_bounce(&self) -> bool {
        self.envelope.view().sender.is_empty()
    }

    /// One line of `gannet queue list`.
    pub fn listing_line(&self) -> String {
        let view = self.envelope.view();
        let sender = if view.sender.is_empty() {
            "<>".to_string()
        } else {
            format!("<{}>", String::from_utf8_lossy(view.sender))
        };
        let mut line = format!(
            "{}  {:>10}  {}  {}/{} recipient(s) pending  received {}",
            self.id,
            self.content_bytes,
            sender,
            self.pending_recipients(),
            self.done.len(),
            rfc3339(view.received_unix_s)
        );
        if let Some(next) = self.next_attempt_unix_s {
            line.push_str(&format!("  attempts {}  next {}", self.attempts, rfc3339(next)));
        }
        line
    }
}

pub fn rfc3339(unix_s: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_s as i64)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix_s.to_string())
}

/// The segment a message lives in: (shard directory, sequence).
fn segment_of(id: MessageId) -> (u16, u64) {
    (id.shard, id.segment_seq)
}

#[derive(Debug, Default)]
pub struct QueueIndex {
    messages: HashMap<MessageId, QueuedMessage>,
    live_per_segment: BTreeMap<(u16, u64), usize>,
}

impl QueueIndex {
    /// Builds the index from everything recovery found, in any order (for tests and tools; the
    /// server feeds segments one by one to [`QueueIndex::apply_segment`]).
    pub fn rebuild(
        mut messages: Vec<RecoveredMessage>,
        outcomes: &[StateEntry],
        tombstones: &[MessageId],
        deferrals: &[Deferral],
    ) -> QueueIndex {
        // Segment order is id order; a copy always comes after its original.
        messages.sort_by_key(|m| m.id);
        let mut index = QueueIndex::default();
        index.apply_segment(SegmentScan {
            messages,
            outcomes: outcomes.to_vec(),
            tombstones: tombstones.to_vec(),
            deferrals: deferrals.to_vec(),
            ..SegmentScan::default()
        });
        index
    }

    /// Applies one segment's records, segments taken oldest first (within each shard
    /// directory): its messages, then the messages its tombstones and outcomes finish, then its
    /// copies (a copy replaces its original, which is older: the original is dropped if still
    /// there, and the copy starts with the recipients either finished), then its retry
    /// schedules (the last one of a message wins, so a restart keeps attempts, next attempt and
    /// delay notice).
    pub fn apply_segment(&mut self, scan: SegmentScan) {
        let mut copies: Vec<(MessageId, CopyOf)> = Vec::new();
        for mut m in scan.messages {
            if let Some(copy) = m.copy_of.take() {
                copies.push((m.id, copy));
            }
            self.insert(QueuedMessage::from_recovered(m));
        }
        for id in &scan.tombstones {
            self.finish(*id);
        }
        for outcome in &scan.outcomes {
            if self.recipient_done(outcome.id, outcome.recipient) {
                self.finish(outcome.id);
            }
        }
        for (id, copy) in copies {
            let original_done = self.finish(copy.moved_from).map(|m| m.done);
            let Some(message) = self.get_mut(&id) else {
                continue;
            };
            for i in 0..message.done.len() {
                let done =
                    copy.done.get(i).copied().unwrap_or(false) || original_done.as_ref().is_some_and(|d| d.contains(i));
                if done {
                    message.done.insert(i);
                }
            }
            if message.pending_recipients() == 0 {
                self.finish(id);
            }
        }
        for d in &scan.deferrals {
            if let Some(message) = self.get_mut(&d.id) {
                message.attempts = d.attempts;
                message.next_attempt_unix_s = Some(d.next_attempt_unix_s);
                message.delay_notified = d.delay_notified;
                message.held = d.held;
            }
        }
    }

    pub fn insert(&mut self, message: QueuedMessage) {
        *self.live_per_segment.entry(segment_of(message.id)).or_insert(0) += 1;
        if let Some(old) = self.messages.insert(message.id, message) {
            // Ids are unique; a duplicate would mean a recovery bug. Keep the counts honest.
            *self.live_per_segment.get_mut(&segment_of(old.id)).unwrap() -= 1;
        }
    }

    pub fn get(&self, id: &MessageId) -> Option<&QueuedMessage> {
        self.messages.get(id)
    }

    pub fn get_mut(&mut self, id: &MessageId) -> Option<&mut QueuedMessage> {
        self.messages.get_mut(id)
    }

    /// Marks a recipient finished. Returns true when that leaves the message with none pending.
    pub fn recipient_done(&mut self, id: MessageId, recipient: u32) -> bool {
        let Some(message) = self.messages.get_mut(&id) else {
            return false;
        };
        message.done.insert(recipient as usize);
        message.pending_recipients() == 0
    }

    /// Removes a finished message.
    pub fn finish(&mut self, id: MessageId) -> Option<QueuedMessage> {
        let message = self.messages.remove(&id)?;
        let key = segment_of(id);
        let live = self.live_per_segment.get_mut(&key).expect("counted segment");
        *live -= 1;
        if *live == 0 {
            self.live_per_segment.remove(&key);
        }
        Some(message)
    }

    /// Whether a segment still holds an unfinished message.
    pub fn segment_is_live(&self, shard: u16, seq: u64) -> bool {
        self.live_per_segment.contains_key(&(shard, seq))
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Every message, oldest first.
    /// Every unfinished message, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &QueuedMessage> + '_ {
        self.messages.values()
    }

    pub fn sorted(&self) -> Vec<&QueuedMessage> {
        let mut all: Vec<&QueuedMessage> = self.messages.values().collect();
        all.sort_by_key(|m| m.id);
        all
    }

    /// The unfinished messages whose records are in segment `seq` of `shard`.
    pub fn messages_in_segment(&self, shard: u16, seq: u64) -> Vec<MessageId> {
        if !self.segment_is_live(shard, seq) {
            return Vec::new();
        }
        self.messages
            .keys()
            .filter(|id| id.shard == shard && id.segment_seq == seq)
            .copied()
            .collect()
    }

    pub fn ids(&self) -> impl Iterator<Item = MessageId> + '_ {
        self.messages.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gannet_smtp::envelope::{Envelope, Origin};

    /// Envelope bytes with `recipients` recipients.
    pub(crate) fn envelope(sender: &[u8], recipients: usize) -> EnvelopeBytes {
        let mut e = Envelope::default();
        e.set_sender(|b| b.extend_from_slice(sender));
        for i in 0..recipients {
            e.add_recipient(|b| b.extend_from_slice(format!("r{i}@y").as_bytes()), 0, b"");
        }
        let origin = Origin {
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: b"client",
            received_unix_s: 0,
        };
        EnvelopeBytes::from_envelope(&e, origin)
    }

    fn message(seq: u64, block: u32, recipients: usize) -> RecoveredMessage {
        RecoveredMessage {
            id: MessageId {
                segment_seq: seq,
                shard: 0,
                offset_blocks: block,
            },
            envelope: envelope(b"a@x", recipients),
            content_bytes: 10,
            record_bytes: 100,
            copy_of: None,
        }
    }

    fn copy(seq: u64, block: u32, of: &RecoveredMessage, done: Vec<bool>) -> RecoveredMessage {
        let mut m = message(seq, block, of.envelope.view().recipient_count());
        m.copy_of = Some(CopyOf {
            moved_from: of.id,
            done,
        });
        m
    }

    #[test]
    fn the_last_deferral_of_a_message_sets_its_schedule() {
        let m = message(3, 0, 1);
        let id = m.id;
        let deferral = |attempts, next| Deferral {
            id,
            attempts,
            next_attempt_unix_s: next,
            delay_notified: attempts > 1,
            held: false,
        };
        let index = QueueIndex::rebuild(vec![m], &[], &[], &[deferral(1, 100), deferral(2, 300)]);
        let q = index.get(&id).unwrap();
        assert_eq!(
            (q.attempts, q.next_attempt_unix_s, q.delay_notified),
            (2, Some(300), true)
        );
        assert!(
            q.listing_line().contains("attempts 2  next 1970-01-01T00:05:00Z"),
            "{}",
            q.listing_line()
        );
    }

    #[test]
    fn a_copy_replaces_its_original_and_keeps_what_either_finished() {
        // The crash came after the copy was durable and before the original's tombstone: both
        // records are there. The original finished recipient 1 before the copy was made (its
        // outcome record survived); the copy's bitmap says 0 was done.
        let original = message(1, 0, 3);
        let copied = copy(4, 2, &original, vec![true, false, false]);
        let (ido, idc) = (original.id, copied.id);
        let outcomes = [StateEntry { id: ido, recipient: 1 }];
        let index = QueueIndex::rebuild(vec![original.clone(), copied.clone()], &outcomes, &[], &[]);
        assert_eq!(index.len(), 1);
        assert!(index.get(&ido).is_none(), "the original is dropped");
        assert_eq!(index.get(&idc).unwrap().done.flags(), vec![true, true, false]);
        assert!(!index.segment_is_live(0, 1), "so its segment can go");

        // The original's segment is already gone: the copy stands alone.
        let index = QueueIndex::rebuild(vec![copied.clone()], &[], &[], &[]);
        assert_eq!(index.get(&idc).unwrap().done.flags(), vec![true, false, false]);

        // A copy whose bitmap and outcomes finish every recipient is finished itself.
        let outcomes = [
            StateEntry { id: idc, recipient: 1 },
            StateEntry { id: idc, recipient: 2 },
        ];
        let index = QueueIndex::rebuild(vec![original.clone(), copied.clone()], &outcomes, &[], &[]);
        assert!(index.is_empty());

        // A copy of a copy: only the newest survives.
        let second = copy(9, 0, &copied, vec![true, false, false]);
        let ids = second.id;
        let index = QueueIndex::rebuild(vec![second, original, copied], &[], &[], &[]);
        assert_eq!(index.ids().collect::<Vec<_>>(), vec![ids]);
    }

    #[test]
    fn rebuild_applies_outcomes_and_tombstones_and_counts_segments() {
        let a = message(1, 0, 2);
        let b = message(1, 1, 1);
        let c = message(2, 0, 3);
        let (ida, idb, idc) = (a.id, b.id, c.id);
        let outcomes = [
            StateEntry { id: ida, recipient: 0 },
            StateEntry { id: idc, recipient: 0 },
            StateEntry { id: idc, recipient: 1 },
            StateEntry { id: idc, recipient: 2 },
        ];
        let index = QueueIndex::rebuild(vec![a, b, c], &outcomes, &[idb], &[]);
        assert_eq!(index.len(), 1, "b tombstoned, c has every recipient done");
        assert_eq!(index.get(&ida).unwrap().done.flags(), vec![true, false]);
        assert!(index.segment_is_live(0, 1));
        assert!(!index.segment_is_live(0, 2));
    }

    #[test]
    fn finishing_the_last_message_frees_its_segment() {
        let mut index = QueueIndex::rebuild(vec![message(5, 0, 1), message(5, 1, 1)], &[], &[], &[]);
        let first = MessageId {
            segment_seq: 5,
            shard: 0,
            offset_blocks: 0,
        };
        let second = MessageId {
            segment_seq: 5,
            shard: 0,
            offset_blocks: 1,
        };
        assert!(index.recipient_done(first, 0));
        index.finish(first);
        assert!(index.segment_is_live(0, 5));
        index.finish(second);
        assert!(!index.segment_is_live(0, 5));
        assert!(index.is_empty());
        assert!(index.finish(second).is_none());
    }
}

#[cfg(test)]
mod set_tests {
    use super::RecipientSet;

    #[test]
    fn recipient_sets_hold_a_bit_per_recipient_inline_and_on_the_heap() {
        for count in [0usize, 1, 63, 64, 65, 1000] {
            let mut set = RecipientSet::new(count);
            assert_eq!(set.count_done(), 0);
            for i in (0..count).step_by(3) {
                set.insert(i);
            }
            set.insert(count + 5);
            assert_eq!(set.count_done(), count.div_ceil(3), "{count}");
            assert!((0..count).all(|i| set.contains(i) == (i % 3 == 0)));
            assert!(!set.contains(count));
            assert_eq!(RecipientSet::from_flags(&set.flags()), set);
        }
        assert!(std::mem::size_of::<RecipientSet>() <= 24);
    }
}
