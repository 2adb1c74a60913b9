//! Delivery state on disk: the scheduler's finished recipients, finished messages and retry
//! schedules written as spool records, then garbage collection of drained segments; and
//! copy-forward, which moves long-deferred messages out of the oldest segment so that it can
//! go.
//!
//! State records are gathered (every record is an O_DIRECT write: written one by one, a busy
//! shard wrote one or two per message) until the next group commit is about to sync, and written
//! then, so that they ride in that fdatasync; when no message is being committed, for at most
//! `STATE_GATHER`. They are never waited on: losing them in a crash only repeats those
//! deliveries (at least once, never zero times) or brings a retry early. The window in which a
//! crash repeats a delivery is so about one group-commit interval under load (a millisecond or
//! two here) instead of the 10 ms of a fixed gather (`benches/duplicates` measures it).

use std::rc::Rc;
use std::time::Duration;

use gannet_spool::record::{CopyOf, Kind};
use gannet_spool::MessageId;
use tracing::{info, warn};

use super::Deliverer;
use crate::smtp::session::MessageSink;

/// How long finished deliveries gather at most before their state records are written (when no
/// group commit comes first).
const STATE_GATHER: Duration = Duration::from_millis(10);
/// Copy forward only when the oldest segment's unfinished messages take at most this fraction
/// (1/N) of a segment.
const COPY_FORWARD_LIVE_FRACTION_MAX: u64 = 4;

/// Why a message could not be copied forward (it stays where it is; the next pass tries again).
#[derive(Debug)]
enum CopyError {
    /// Finished before the copy began.
    Finished,
    Read(super::store::LoadError),
    NoMemory,
    Commit(crate::smtp::session::CommitError),
    /// Finished while the copy was written (cannot happen: nothing finishes a message waiting
    /// for a retry); the copy is tombstoned.
    FinishedWhileCopied,
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::Finished => write!(f, "finished meanwhile"),
            CopyError::Read(e) => write!(f, "{e}"),
            CopyError::NoMemory => write!(f, "no spool memory free"),
            CopyError::Commit(e) => write!(f, "spool: {e:?}"),
            CopyError::FinishedWhileCopied => write!(f, "finished while being copied"),
        }
    }
}

/// Ready once the committer announces a sync after `seen`.
struct CommitComing<'a> {
    deliverer: &'a Deliverer,
    seen: u64,
}

impl std::future::Future for CommitComing<'_> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.deliverer.commits.get() != self.seen {
            return std::task::Poll::Ready(());
        }
        *self.deliverer.gather_waker.borrow_mut() = Some(cx.waker().clone());
        std::task::Poll::Pending
    }
}

impl Deliverer {
    /// The committer is about to sync: the gathered state goes now, to ride in it.
    pub(super) fn commit_coming(&self) {
        self.commits.set(self.commits.get().wrapping_add(1));
        if let Some(waker) = self.gather_waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// At shutdown: waits for a state flush in progress, then writes whatever is still
    /// gathered, so that a clean stop never repeats a delivery.
    pub async fn flush_state(&self) {
        while self.flushing.get() {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        self.write_pending_state().await;
    }

    /// Writes the gathered state records, then collects garbage, from a task of its own.
    pub(super) fn flush_state_soon(self: &Rc<Self>) {
        if self.flushing.replace(true) {
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            // Gather: let other jobs finishing meanwhile add to this batch, until the next
            // group commit or STATE_GATHER.
            let seen = me.commits.get();
            futures_lite::future::or(
                glommio::timer::sleep(STATE_GATHER),
                CommitComing { deliverer: &me, seen },
            )
            .await;
            while me.write_pending_state().await {}
            me.flushing.set(false);
            if me.appender.collect_garbage().await > 0 {
                let sched = me.sched.borrow();
                me.store
                    .close_readers(|shard, seq| sched.queue().segment_is_live(shard, seq));
            }
        })
        .detach();
    }

    /// Appends the gathered outcomes, tombstones and retry schedules. Returns false when there
    /// was nothing to write. Failures are logged once per change and the batch dropped.
    async fn write_pending_state(&self) -> bool {
        let state = self.sched.borrow_mut().take_state();
        if state.is_empty() {
            return false;
        }
        let mut failure = None;
        for (kind, entries) in [(Kind::Outcome, &state.outcomes), (Kind::Tombstone, &state.tombstones)] {
            if !entries.is_empty() {
                if let Err(e) = self.appender.append_state(kind, entries).await {
                    failure = Some(e);
                }
            }
        }
        if !state.deferrals.is_empty() {
            if let Err(e) = self.appender.append_deferrals(&state.deferrals).await {
                failure = Some(e);
            }
        }
        // Once per change, not once per batch: with the spool out of space every batch fails.
        let was_failing = self.state_write_failing.replace(failure.is_some());
        match (was_failing, failure) {
            (false, Some(e)) => warn!(
                shard = self.shard,
                "cannot record delivery state ({e:?}); a crash now would repeat the deliveries since"
            ),
            (true, None) => info!(shard = self.shard, "delivery state recorded again"),
            _ => {}
        }
        true
    }

    /// Whether the oldest segment pins the spool: the shard has `spool.copy_forward_segments`
    /// segments or more and the oldest still holds unfinished messages. Cheap; checked every
    /// tick.
    pub(super) fn copy_forward_wanted(&self) -> bool {
        let threshold = self.config().spool.copy_forward_segments;
        if threshold == 0 || self.copying.get() || self.appender.segment_count() < threshold {
            return false;
        }
        self.appender
            .oldest_sealed()
            .is_some_and(|seq| self.sched.borrow().queue().segment_is_live(self.shard, seq))
    }

    /// Copies the unfinished messages of the oldest segment into the newest one, so that the
    /// oldest can be deleted: without this, one long-deferred message would keep its segment
    /// and every newer one on disk until it is finished. Only messages waiting for a retry are
    /// copied (nothing else touches them meanwhile), and only when they are a small part of the
    /// segment (a segment full of deferred mail would just be rewritten again and again).
    pub(super) async fn copy_forward(self: &Rc<Self>) {
        let Some(oldest) = self.appender.oldest_sealed() else {
            return;
        };
        let (ids, live_bytes) = {
            let sched = self.sched.borrow();
            let queue = sched.queue();
            let ids = queue.messages_in_segment(self.shard, oldest);
            let live_bytes: u64 = ids
                .iter()
                .filter_map(|id| queue.get(id))
                .map(|m| crate::spool::align_up(u64::from(m.record_bytes)))
                .sum();
            (ids, live_bytes)
        };
        if live_bytes > self.config().spool.segment_size.0 / COPY_FORWARD_LIVE_FRACTION_MAX {
            return;
        }
        self.copying.set(true);
        let mut copied = 0;
        for old_id in ids {
            let Some(due) = self.sched.borrow_mut().take_retry(old_id) else {
                continue;
            };
            match self.copy_one(old_id).await {
                Ok(new_id) => {
                    info!(shard = self.shard, id = %old_id, copy = %new_id, "copied forward out of segment {oldest}");
                    self.sched.borrow_mut().put_retry(new_id, due);
                    copied += 1;
                }
                Err(e) => {
                    warn!(shard = self.shard, id = %old_id, "cannot copy forward now: {e}");
                    self.sched.borrow_mut().put_retry(old_id, due);
                    break;
                }
            }
        }
        self.copying.set(false);
        if copied > 0 {
            // The tombstones go out, then the old segment is collected.
            self.flush_state_soon();
        }
    }

    /// Writes a `Copy` record of `old_id` (durably), then the copy takes its place.
    async fn copy_one(self: &Rc<Self>, old_id: MessageId) -> Result<MessageId, CopyError> {
        let (record_bytes, done) = {
            let sched = self.sched.borrow();
            let m = sched.queue().get(&old_id).ok_or(CopyError::Finished)?;
            (m.record_bytes, m.done.flags())
        };
        let (bytes, message_start) = self
            .store
            .read_record(old_id, record_bytes)
            .await
            .map_err(CopyError::Read)?;
        let copy = CopyOf {
            moved_from: old_id,
            done,
        };
        let mut buffer = self.appender.message_buffer();
        buffer
            .begin_copy(&copy)
            .and_then(|()| buffer.append(&bytes[message_start..]))
            .map_err(|_| CopyError::NoMemory)?;
        let message = buffer.take();
        let new_record_bytes = message.record_len();
        let new_id = self.appender.commit(message).await.map_err(CopyError::Commit)?;
        // Durable: from here on recovery prefers the copy, whatever else survives a crash.
        self.store.forget(&old_id);
        if !self.sched.borrow_mut().moved(old_id, new_id, new_record_bytes) {
            // Cannot happen (nothing finishes a message waiting for a retry); the copy got a
            // tombstone so that it never brings a finished message back.
            return Err(CopyError::FinishedWhileCopied);
        }
        Ok(new_id)
    }
}
