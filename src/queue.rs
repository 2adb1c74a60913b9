//! The in-memory index of a shard's unfinished messages, rebuilt from the spool at start.
//!
//! Each message keeps its envelope and which recipients are finished. The index also counts the
//! unfinished messages of every segment, which tells the spool's garbage collector when a
//! segment holds nothing anyone needs. It is bounded by the spool itself: at most one entry per
//! 4 KiB of spool.

use std::collections::{BTreeMap, HashMap};

use crate::spool::record::{Deferral, StateEntry, StoredEnvelope};
use crate::spool::recovery::RecoveredMessage;
use crate::spool::MessageId;

/// One unfinished message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub id: MessageId,
    /// The record's length on disk (header included, padding not): what delivery reads back.
    pub record_bytes: u32,
    pub envelope: StoredEnvelope,
    /// Finished flags, one per recipient of `envelope`.
    pub done: Vec<bool>,
    pub content_bytes: u64,
    /// Delivery attempts so far (kept across restarts by `Deferral` records).
    pub attempts: u32,
    /// When the next attempt is due (seconds since the epoch), once deferred.
    pub next_attempt_unix_s: Option<u64>,
    /// Delivery jobs (one per destination) queued or running for this message.
    pub jobs_outstanding: u32,
    /// A delay notice went out (kept across restarts by `Deferral` records).
    pub delay_notified: bool,
}

impl QueuedMessage {
    pub fn from_recovered(m: RecoveredMessage) -> QueuedMessage {
        QueuedMessage {
            id: m.id,
            record_bytes: m.record_bytes,
            done: vec![false; m.envelope.recipients.len()],
            envelope: m.envelope,
            content_bytes: m.content_bytes,
            attempts: 0,
            next_attempt_unix_s: None,
            jobs_outstanding: 0,
            delay_notified: false,
        }
    }

    pub fn pending_recipients(&self) -> usize {
        self.done.iter().filter(|d| !**d).count()
    }

    /// One line of `gannet queue list`.
    pub fn listing_line(&self) -> String {
        let sender = if self.envelope.sender.is_empty() {
            "<>".to_string()
        } else {
            format!("<{}>", String::from_utf8_lossy(&self.envelope.sender))
        };
        let mut line = format!(
            "{}  {:>10}  {}  {}/{} recipient(s) pending  received {}",
            self.id,
            self.content_bytes,
            sender,
            self.pending_recipients(),
            self.done.len(),
            rfc3339(self.envelope.received_unix_s)
        );
        if let Some(next) = self.next_attempt_unix_s {
            line.push_str(&format!("  attempts {}  next {}", self.attempts, rfc3339(next)));
        }
        line
    }
}

fn rfc3339(unix_s: u64) -> String {
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
    /// Builds the index from everything recovery found, in any order: messages, then the
    /// recipients and messages that later records say are finished.
    ///
    /// A copied message (a `Copy` record) replaces its original: the original is dropped if it
    /// is still there (the copy was made but the original's tombstone was not written, or its
    /// segment not yet deleted), and the copy starts with the recipients that were done when it
    /// was made plus any the original finished.
    ///
    /// `deferrals` are applied in order (the last one of a message wins): a restart keeps each
    /// message's attempts, next attempt time and delay notice.
    pub fn rebuild(
        messages: Vec<RecoveredMessage>,
        outcomes: &[StateEntry],
        tombstones: &[MessageId],
        deferrals: &[Deferral],
    ) -> QueueIndex {
        let mut index = QueueIndex::default();
        let mut copies = Vec::new();
        for mut m in messages {
            if let Some(copy) = m.copy_of.take() {
                copies.push((m.id, copy));
            }
            index.insert(QueuedMessage::from_recovered(m));
        }
        for id in tombstones {
            index.finish(*id);
        }
        for outcome in outcomes {
            if index.recipient_done(outcome.id, outcome.recipient) {
                index.finish(outcome.id);
            }
        }
        // Oldest copies first, so that a copy of a copy finds its (already merged) original.
        copies.sort_by_key(|(id, _)| *id);
        for (id, copy) in copies {
            let original_done = index.finish(copy.moved_from).map(|m| m.done);
            let Some(message) = index.get_mut(&id) else {
                continue;
            };
            for (i, done) in message.done.iter_mut().enumerate() {
                *done |= copy.done.get(i).copied().unwrap_or(false)
                    || original_done
                        .as_ref()
                        .is_some_and(|d| d.get(i).copied().unwrap_or(false));
            }
            if message.pending_recipients() == 0 {
                index.finish(id);
            }
        }
        for d in deferrals {
            if let Some(message) = index.get_mut(&d.id) {
                message.attempts = d.attempts;
                message.next_attempt_unix_s = Some(d.next_attempt_unix_s);
                message.delay_notified = d.delay_notified;
            }
        }
        index
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
        if let Some(flag) = message.done.get_mut(recipient as usize) {
            *flag = true;
        }
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
    use crate::smtp::envelope::{BodyType, Ret};
    use crate::spool::record::StoredRecipient;

    fn message(seq: u64, block: u32, recipients: usize) -> RecoveredMessage {
        RecoveredMessage {
            id: MessageId {
                segment_seq: seq,
                shard: 0,
                offset_blocks: block,
            },
            envelope: StoredEnvelope {
                received_unix_s: 0,
                client_ip: "127.0.0.1".parse().unwrap(),
                smtputf8: false,
                body: BodyType::Unspecified,
                ret: Ret::Unspecified,
                size_declared_bytes: None,
                helo: vec![],
                sender: b"a@x".to_vec(),
                envid: vec![],
                recipients: (0..recipients)
                    .map(|i| StoredRecipient {
                        address: format!("r{i}@y").into_bytes(),
                        notify: 0,
                        orcpt: vec![],
                    })
                    .collect(),
            },
            content_bytes: 10,
            record_bytes: 100,
            copy_of: None,
        }
    }

    fn copy(seq: u64, block: u32, of: &RecoveredMessage, done: Vec<bool>) -> RecoveredMessage {
        let mut m = message(seq, block, of.envelope.recipients.len());
        m.copy_of = Some(crate::spool::record::CopyOf {
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
        assert_eq!(index.get(&idc).unwrap().done, vec![true, true, false]);
        assert!(!index.segment_is_live(0, 1), "so its segment can go");

        // The original's segment is already gone: the copy stands alone.
        let index = QueueIndex::rebuild(vec![copied.clone()], &[], &[], &[]);
        assert_eq!(index.get(&idc).unwrap().done, vec![true, false, false]);

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
        assert_eq!(index.get(&ida).unwrap().done, vec![true, false]);
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
