//! The shard's appender, the glommio shell of the spool's commit policy
//! (`gannet_spool::commit`, which holds the ordering invariant, the failure rules and the
//! choice of segments): it writes records with O_DIRECT where the policy places them, runs the
//! group commit, and prepares, recycles and deletes segment files as the policy says.
//!
//! Group commit: one committer task per shard waits until there are completed-but-not-durable
//! writes, yields once so that writes finishing at the same moment join the batch ("gather before
//! leading"), then waits until no write is in flight (at most `SETTLE_WAIT_MAX`, so that a slow
//! or steady stream of writes cannot hold the sync back), and issues one fdatasync per touched
//! segment for all of them. Waiting for writes in flight costs about a write's latency and saves
//! the fdatasync they would need right after: under load on this project's test machine it cut
//! fdatasyncs per message by a third to a half and context switches by about 15%.
//!
//! Space: refusals for lack of space end as soon as a segment drains (every later reservation
//! tries again), and are logged once per change of state, not once per message. A recycled
//! segment is renamed out of recovery's sight, zero-filled where it was written and renamed
//! under its new sequence (see `docs/spool.md` for why it is zeroed).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gannet_spool::commit::{Ack, CommitConfig, CommitPolicy, Placement, Reserve, Source, Ticket};
use glommio::io::{Directory, DmaBuffer, DmaFile, OpenOptions};
use tracing::{error, info, warn};

pub use gannet_spool::commit::ExistingSegment;

use super::buffer::{Budget, FinishedMessage, MessageBuffer};
use super::record::{self, build_deferral_record, build_state_record, Deferral, Kind, StateEntry};
use super::{align_up, segment_file_name, Durability, MessageId};
use crate::metrics;
use crate::smtp::session::CommitError;

/// Entries per state record: keeps one record far below the smallest segment.
const STATE_BATCH_ENTRIES_MAX: usize = 4096;

/// Zero-fill granularity for new segments; segment sizes are a multiple of it.
pub const SEGMENT_FILL_CHUNK_BYTES: u64 = 1024 * 1024;
/// The longest the committer waits for writes in flight before it syncs what has completed (a
/// slow write must not hold back the acknowledgement of records before it for long).
const SETTLE_WAIT_MAX: Duration = Duration::from_millis(1);

/// What the appender needs to know.
#[derive(Debug, Clone)]
pub struct AppenderConfig {
    pub shard: u16,
    /// This shard's own directory.
    pub dir: PathBuf,
    pub segment_bytes: u64,
    /// Segments this shard may have on disk at once (its share of the spool size limit).
    pub segments_max: usize,
    /// New segments are refused when the file system would have less free space than this.
    pub min_free_bytes: u64,
    pub durability: Durability,
    pub inflight_bytes_max: usize,
}

/// A committed record's bytes as they were written: `len` bytes (header and payload) across the
/// buffers, which may hold padding after them.
pub struct WrittenRecord {
    pub chunks: Vec<Rc<DmaBuffer>>,
    pub len: usize,
}

impl WrittenRecord {
    /// The record's bytes in one piece.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        for chunk in &self.chunks {
            let take = (self.len - out.len()).min(chunk.len());
            out.extend_from_slice(&chunk.as_bytes()[..take]);
        }
        out
    }
}

/// Whether the spool has room, for logging once per change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Space {
    #[default]
    Room,
    /// `segments_max` reached.
    SpoolFull,
    /// The file system is below `min_free_bytes` plus a segment.
    DiskFull,
}

/// Says whether a segment (by sequence) of this shard still holds an unfinished message.
pub type Liveness = Rc<dyn Fn(u64) -> bool>;

/// Why a preparation failed, and whether a file being recycled went with it.
struct PrepareFailure {
    error: CommitError,
    lost_file: bool,
}

pub struct Appender {
    config: AppenderConfig,
    directory: Directory,
    budget: Rc<Budget>,
    policy: RefCell<CommitPolicy>,
    /// Message records written so far, and as of the last group commit's start (for
    /// `gannet_commit_batch_messages`).
    messages_written: Cell<u64>,
    messages_at_last_sync: Cell<u64>,
    /// Write handles of the segments written since start (write-only: see FIELD-NOTES on the
    /// IOPOLL pitfall).
    files: RefCell<HashMap<u64, Rc<DmaFile>>>,
    /// Which segments hold unfinished messages (the queue index knows).
    live: Liveness,
    space: Cell<Space>,
    segment_waiters: RefCell<Vec<Waker>>,
    durable_waiters: RefCell<Vec<(Ticket, Waker)>>,
    committer_waker: RefCell<Option<Waker>>,
    /// Called when the committer is about to lead a sync, so that delivery state gathered
    /// meanwhile is written now and rides in this fdatasync (see `delivery::state`).
    before_sync: RefCell<Option<Rc<dyn Fn()>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn commit_error(e: &io::Error) -> CommitError {
    match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => CommitError::NoSpace,
        _ => CommitError::Io,
    }
}

/// Free bytes for unprivileged users on the file system holding `path`.
fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` a valid, writable statvfs;
    // statvfs writes only into it. Covered by the spool size tests, which start a real server.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

impl Appender {
    /// Opens the appender for a shard whose directory already holds `existing` segments (all
    /// read-only from now on) with sequences below `next_seq`; `live` says which of them still
    /// hold unfinished messages. Starts the committer and finds the first segment to write to,
    /// recycling a drained one before it asks the file system for space, then deletes the
    /// other drained ones. If no segment can be had, the shard still serves and answers 452
    /// until one drains.
    pub async fn open(
        config: AppenderConfig,
        existing: &[ExistingSegment],
        next_seq: u64,
        live: Liveness,
    ) -> io::Result<Rc<Appender>> {
        let directory = Directory::open(&config.dir).await.map_err(io::Error::from)?;
        let policy = CommitPolicy::new(
            CommitConfig {
                segment_bytes: config.segment_bytes,
                segments_max: config.segments_max,
                sync: config.durability == Durability::Fsync,
                ack_before_sync: false,
            },
            existing,
            next_seq,
        );
        let appender = Rc::new(Appender {
            directory,
            budget: Budget::new(config.inflight_bytes_max),
            policy: RefCell::new(policy),
            messages_written: Cell::new(0),
            messages_at_last_sync: Cell::new(0),
            files: RefCell::new(HashMap::new()),
            live,
            space: Cell::new(Space::Room),
            segment_waiters: RefCell::new(Vec::new()),
            durable_waiters: RefCell::new(Vec::new()),
            committer_waker: RefCell::new(None),
            before_sync: RefCell::new(None),
            config,
        });
        if appender.config.durability == Durability::Fsync {
            glommio::spawn_local(appender.clone().run_committer()).detach();
        }
        if appender.policy.borrow_mut().begin_first_prepare() {
            appender.prepare(false).await;
        }
        appender.collect_garbage().await;
        Ok(appender)
    }

    /// Sets what the committer calls before it leads a sync.
    pub fn set_before_sync(&self, hook: Rc<dyn Fn()>) {
        *self.before_sync.borrow_mut() = Some(hook);
    }

    /// A fresh sink for a session.
    pub fn message_buffer(&self) -> MessageBuffer {
        MessageBuffer::new(self.budget.clone())
    }

    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// Writes the message and returns its id once it is durable (or written, with durability
    /// `none`).
    pub async fn commit(self: &Rc<Self>, message: FinishedMessage) -> Result<MessageId, CommitError> {
        self.commit_keeping(message, false).await.map(|(id, _)| id)
    }

    /// Like [`Appender::commit`]; with `keep`, also returns the buffers that were written, so
    /// that delivery can send the message without reading it back.
    pub async fn commit_keeping(
        self: &Rc<Self>,
        message: FinishedMessage,
        keep: bool,
    ) -> Result<(MessageId, Option<WrittenRecord>), CommitError> {
        let record_bytes = message.record_bytes();
        let record_len = message.record_len() as usize;
        assert!(
            record_bytes <= self.config.segment_bytes,
            "record larger than a segment"
        );
        let placement = self.reserve(record_bytes).await?;
        let id = MessageId::new(placement.seq, self.config.shard, placement.offset);
        let (chunks, charge) = message.seal(placement.seq);
        let mut kept = Vec::with_capacity(if keep { chunks.len() } else { 0 });
        let chunks: Vec<Rc<DmaBuffer>> = chunks.into_iter().map(Rc::new).collect();
        if keep {
            kept.extend(chunks.iter().cloned());
        }
        let written = self.write_chunks(&placement, chunks).await;
        if written {
            self.messages_written.set(self.messages_written.get() + 1);
        }
        drop(charge);
        self.complete(&placement, written);
        let ack = if written {
            WaitDurable {
                appender: self,
                placement,
            }
            .await
        } else {
            Ack::Failed
        };
        // Released after the acknowledgement: until the caller puts the message in the queue
        // index (right after this returns, with no await between), the segment stays held.
        self.policy.borrow_mut().release(&placement);
        match ack {
            Ack::Durable => Ok((
                id,
                keep.then_some(WrittenRecord {
                    chunks: kept,
                    len: record_len,
                }),
            )),
            Ack::Failed | Ack::Pending => Err(CommitError::Io),
        }
    }

    /// Writes a record's buffers in order at its placement. False on any failure.
    async fn write_chunks(&self, placement: &Placement, chunks: Vec<Rc<DmaBuffer>>) -> bool {
        let file = self.file(placement.seq);
        let mut pos = placement.offset;
        for chunk in chunks {
            let len = chunk.len();
            match file.write_rc_at(chunk, pos).await {
                Ok(n) if n == len => pos += len as u64,
                Ok(n) => {
                    error!(
                        shard = self.config.shard,
                        segment = placement.seq,
                        offset = pos,
                        "short spool write: {n} of {len} bytes"
                    );
                    return false;
                }
                Err(e) => {
                    error!(
                        shard = self.config.shard,
                        segment = placement.seq,
                        offset = pos,
                        "spool write failed: {e}"
                    );
                    return false;
                }
            }
        }
        true
    }

    fn file(&self, seq: u64) -> Rc<DmaFile> {
        self.files
            .borrow()
            .get(&seq)
            .cloned()
            .expect("a placement's segment is open")
    }

    /// Appends delivery state (finished recipients or messages). Not waited on for durability: a
    /// record lost in a crash only repeats a delivery. Large batches are split.
    pub async fn append_state(self: &Rc<Self>, kind: Kind, entries: &[StateEntry]) -> Result<(), CommitError> {
        for batch in entries.chunks(STATE_BATCH_ENTRIES_MAX) {
            let len = align_up(record::state_record_bytes(batch.len()) as u64);
            self.append_unwaited(len, |seq| build_state_record(seq, kind, batch))
                .await?;
        }
        Ok(())
    }

    /// Appends retry schedules. Not waited on for durability either: a lost one only makes a
    /// message's next attempt come early after a restart.
    pub async fn append_deferrals(self: &Rc<Self>, entries: &[Deferral]) -> Result<(), CommitError> {
        for batch in entries.chunks(STATE_BATCH_ENTRIES_MAX) {
            let len = align_up(record::deferral_record_bytes(batch.len()) as u64);
            self.append_unwaited(len, |seq| build_deferral_record(seq, batch))
                .await?;
        }
        Ok(())
    }

    /// Appends an operator's retry schedules (holds, releases) and waits until they are
    /// durable: the API says an action is done only once a crash cannot undo it.
    pub async fn append_deferrals_durably(self: &Rc<Self>, entries: &[Deferral]) -> Result<(), CommitError> {
        for batch in entries.chunks(STATE_BATCH_ENTRIES_MAX) {
            let len = align_up(record::deferral_record_bytes(batch.len()) as u64);
            self.append_record(len, true, |seq| build_deferral_record(seq, batch))
                .await?;
        }
        Ok(())
    }

    /// Appends an operator's deletions (tombstones) and waits until they are durable.
    pub async fn append_tombstones_durably(self: &Rc<Self>, entries: &[StateEntry]) -> Result<(), CommitError> {
        for batch in entries.chunks(STATE_BATCH_ENTRIES_MAX) {
            let len = align_up(record::state_record_bytes(batch.len()) as u64);
            self.append_record(len, true, |seq| build_state_record(seq, Kind::Tombstone, batch))
                .await?;
        }
        Ok(())
    }

    /// Writes one record of `len` bytes (padded), built for its segment by `build`, without
    /// waiting for the fdatasync that will cover it.
    async fn append_unwaited(self: &Rc<Self>, len: u64, build: impl FnOnce(u64) -> Vec<u8>) -> Result<(), CommitError> {
        self.append_record(len, false, build).await
    }

    /// Writes one record; with `wait_durable`, returns only once the fdatasync covering it is
    /// done (or failed).
    async fn append_record(
        self: &Rc<Self>,
        len: u64,
        wait_durable: bool,
        build: impl FnOnce(u64) -> Vec<u8>,
    ) -> Result<(), CommitError> {
        let placement = self.reserve(len).await?;
        let bytes = build(placement.seq);
        debug_assert_eq!(bytes.len() as u64, len);
        let mut buffer = glommio::allocate_dma_buffer(bytes.len());
        buffer.as_bytes_mut().copy_from_slice(&bytes);
        let written = self.write_chunks(&placement, vec![Rc::new(buffer)]).await;
        self.complete(&placement, written);
        let ok = if written && wait_durable {
            let ack = WaitDurable {
                appender: self,
                placement,
            }
            .await;
            ack == Ack::Durable
        } else {
            written
        };
        self.policy.borrow_mut().release(&placement);
        if ok {
            Ok(())
        } else {
            Err(CommitError::Io)
        }
    }

    /// Deletes own segments, oldest first, while nothing in them is needed (see the policy's
    /// `collectable`). Returns the number deleted.
    pub async fn collect_garbage(&self) -> usize {
        let mut deleted = 0;
        loop {
            let seq = self.policy.borrow().collectable(&*self.live);
            let Some(seq) = seq else { break };
            let path = self.config.dir.join(segment_file_name(seq));
            if let Err(e) = glommio::io::remove(&path).await {
                warn!(
                    shard = self.config.shard,
                    "cannot delete drained segment {}: {e}",
                    path.display()
                );
                break;
            }
            self.files.borrow_mut().remove(&seq);
            self.policy.borrow_mut().deleted(seq);
            deleted += 1;
        }
        if deleted > 0 {
            if let Err(e) = self.directory.sync().await {
                warn!(
                    shard = self.config.shard,
                    "cannot sync spool directory after deleting segments: {e}"
                );
            }
            info!(shard = self.config.shard, "deleted {deleted} drained segment(s)");
        }
        deleted
    }

    /// The oldest segment still on disk that is no longer written to.
    pub fn oldest_sealed(&self) -> Option<u64> {
        self.policy.borrow().oldest_sealed()
    }

    /// The spool refuses mail for lack of space (its size limit or the file system's).
    pub fn out_of_space(&self) -> bool {
        self.space.get() != Space::Room
    }

    /// Segment files this shard has on disk now.
    pub fn segment_count(&self) -> usize {
        self.policy.borrow().segment_count()
    }

    /// A placement for `len` bytes, preparing a segment when the policy asks.
    async fn reserve(self: &Rc<Self>, len: u64) -> Result<Placement, CommitError> {
        loop {
            let answer = self.policy.borrow_mut().reserve(len);
            match answer {
                Reserve::Placed {
                    placement,
                    prepare_spare,
                } => {
                    if prepare_spare {
                        let appender = self.clone();
                        glommio::spawn_local(async move { appender.prepare(true).await }).detach();
                    }
                    return Ok(placement);
                }
                Reserve::Prepare => self.prepare(false).await,
                Reserve::Wait => WaitSegment { appender: self }.await,
            }
            if let Some(e) = self.policy.borrow_mut().take_prepare_error() {
                return Err(e);
            }
        }
    }

    /// Makes the next segment (or records why not) and wakes whoever waits for one. `early`:
    /// the active segment still has room (so it must not be the one recycled).
    async fn prepare(self: &Rc<Self>, early: bool) {
        let source = self.policy.borrow_mut().source(early, &*self.live);
        let result = match source {
            Source::Recycle {
                old_seq,
                zero_bytes,
                open,
            } => self.recycle(old_seq, zero_bytes, open).await,
            Source::Create => self.create_segment().await,
        };
        match result {
            Ok((seq, file, created)) => {
                self.files.borrow_mut().insert(seq, Rc::new(file));
                self.policy.borrow_mut().prepared(seq, created);
                self.set_space(Space::Room, "");
            }
            Err(f) => self.policy.borrow_mut().prepare_failed(f.error, f.lost_file),
        }
        for waker in self.segment_waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Logs a change in whether the spool has room (once per change, not per message).
    fn set_space(&self, space: Space, why: &str) {
        let shard = self.config.shard;
        match (self.space.replace(space), space) {
            (a, b) if a == b => {}
            (_, Space::Room) => info!(shard, "spool has room again: accepting mail"),
            (_, Space::SpoolFull | Space::DiskFull) => {
                warn!(
                    shard,
                    "{why}; refusing mail with 452 until delivered mail frees a segment"
                )
            }
        }
    }

    /// Reuses a drained segment's file under a new sequence: renamed out of recovery's sight,
    /// zero-filled where it was written, synced, renamed to its new name. A crash at any point
    /// leaves either the old segment (whose messages are all finished, so nothing comes back
    /// that was not already due to come back) or a `.seg.tmp` file that recovery deletes.
    async fn recycle(&self, old_seq: u64, zero_bytes: u64, open: bool) -> Result<(u64, DmaFile, bool), PrepareFailure> {
        let shard = self.config.shard;
        let seq = self.policy.borrow_mut().new_seq(now_ms());
        let old_path = self.config.dir.join(segment_file_name(old_seq));
        let name = segment_file_name(seq);
        let tmp_path = self.config.dir.join(format!("{name}.tmp"));
        let final_path = self.config.dir.join(&name);
        let handle = if open {
            self.files.borrow_mut().remove(&old_seq)
        } else {
            None
        };
        let result = async {
            let file = match handle {
                Some(file) => Rc::try_unwrap(file).map_err(|_| io::Error::other("segment still in use"))?,
                None => OpenOptions::new()
                    .write(true)
                    .dma_open(&old_path)
                    .await
                    .map_err(io::Error::from)?,
            };
            file.rename(&tmp_path).await.map_err(io::Error::from)?;
            self.directory.sync().await.map_err(io::Error::from)?;
            self.zero_fill(&file, zero_bytes).await?;
            file.rename(&final_path).await.map_err(io::Error::from)?;
            self.directory.sync().await.map_err(io::Error::from)?;
            Ok(file)
        }
        .await;
        match result {
            Ok(file) => {
                info!(
                    shard,
                    segment = seq,
                    "recycled drained segment {old_seq:016x} as {}",
                    final_path.display()
                );
                Ok((seq, file, false))
            }
            Err(e) => {
                error!(shard, "cannot recycle segment {}: {e}", old_path.display());
                for path in [&old_path, &tmp_path, &final_path] {
                    let _ = glommio::io::remove(path).await;
                }
                Err(PrepareFailure {
                    error: commit_error(&e),
                    lost_file: true,
                })
            }
        }
    }

    async fn create_segment(&self) -> Result<(u64, DmaFile, bool), PrepareFailure> {
        let shard = self.config.shard;
        let refuse = |error| PrepareFailure {
            error,
            lost_file: false,
        };
        if !self.policy.borrow().may_create() {
            let why = format!(
                "spool full: {} segments of {} bytes (spool.size_max)",
                self.policy.borrow().segment_count(),
                self.config.segment_bytes
            );
            self.set_space(Space::SpoolFull, &why);
            return Err(refuse(CommitError::NoSpace));
        }
        match free_bytes(&self.config.dir) {
            Ok(free) if free < self.config.min_free_bytes + self.config.segment_bytes => {
                let why = format!(
                    "file system nearly full: {free} bytes free, spool.min_free needs {} plus a segment of {}",
                    self.config.min_free_bytes, self.config.segment_bytes
                );
                self.set_space(Space::DiskFull, &why);
                return Err(refuse(CommitError::NoSpace));
            }
            Ok(_) => {}
            Err(e) => warn!(shard, "cannot read free space of {}: {e}", self.config.dir.display()),
        }
        let seq = self.policy.borrow_mut().new_seq(now_ms());
        let name = segment_file_name(seq);
        let tmp_path = self.config.dir.join(format!("{name}.tmp"));
        let final_path = self.config.dir.join(&name);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .dma_open(&tmp_path)
            .await
            .map_err(|e| {
                let e = io::Error::from(e);
                error!(shard, "cannot create segment {}: {e}", tmp_path.display());
                refuse(commit_error(&e))
            })?;
        if let Err(e) = self.fill_segment(&file, &final_path).await {
            error!(shard, "cannot prepare segment {}: {e}", tmp_path.display());
            let _ = file.remove().await;
            let _ = file.close().await;
            return Err(refuse(commit_error(&e)));
        }
        info!(shard, segment = seq, "new spool segment {}", final_path.display());
        Ok((seq, file, true))
    }

    /// Zero-fills the whole segment and makes it durable under its final name, so that later
    /// fdatasyncs have no metadata to persist.
    async fn fill_segment(&self, file: &DmaFile, final_path: &Path) -> io::Result<()> {
        self.zero_fill(file, self.config.segment_bytes).await?;
        file.rename(final_path).await.map_err(io::Error::from)?;
        self.directory.sync().await.map_err(io::Error::from)?;
        Ok(())
    }

    /// Writes zeros over `[0, len)` (rounded up to whole chunks, within the segment) and syncs.
    async fn zero_fill(&self, file: &DmaFile, len: u64) -> io::Result<()> {
        let mut zeros = glommio::allocate_dma_buffer(SEGMENT_FILL_CHUNK_BYTES as usize);
        zeros.as_bytes_mut().fill(0);
        let zeros = Rc::new(zeros);
        let mut offset = 0;
        while offset < len.min(self.config.segment_bytes) {
            let n = file.write_rc_at(zeros.clone(), offset).await.map_err(io::Error::from)?;
            if n as u64 != SEGMENT_FILL_CHUNK_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "short write while zero-filling",
                ));
            }
            offset += SEGMENT_FILL_CHUNK_BYTES;
        }
        file.fdatasync().await.map_err(io::Error::from)?;
        Ok(())
    }

    /// Records that a placement's write finished (or failed) and wakes the committer.
    fn complete(&self, placement: &Placement, written: bool) {
        let has_work = {
            let mut policy = self.policy.borrow_mut();
            policy.write_done(placement, written);
            // This also serves the wait for writes in flight: that wait starts once there is
            // work, and nothing becomes durable until it ends, so there is work on every
            // completion meanwhile.
            policy.has_sync_work()
        };
        if has_work {
            if let Some(waker) = self.committer_waker.borrow_mut().take() {
                waker.wake();
            }
        }
        if !self.policy.borrow().config().sync {
            self.wake_durable(Ticket::MAX);
        }
    }

    fn wake_durable(&self, below: Ticket) {
        self.durable_waiters.borrow_mut().retain(|(ticket, waker)| {
            if *ticket < below {
                waker.wake_by_ref();
                false
            } else {
                true
            }
        });
    }

    /// The group-commit loop (durability `fsync` only).
    async fn run_committer(self: Rc<Self>) {
        loop {
            CommitterWait {
                appender: &self,
                until: CommitPolicy::has_sync_work,
            }
            .await;
            // Gather before leading: let writes completing right now join this batch, and the
            // delivery state gathered meanwhile start its write so that it joins too.
            let hook = self.before_sync.borrow().clone();
            if let Some(hook) = hook {
                hook();
            }
            futures_lite::future::yield_now().await;
            // Then let the writes in flight join it too, for at most SETTLE_WAIT_MAX.
            futures_lite::future::or(
                CommitterWait {
                    appender: &self,
                    until: CommitPolicy::writes_settled,
                },
                glommio::timer::sleep(SETTLE_WAIT_MAX),
            )
            .await;
            let plan = self.policy.borrow_mut().begin_sync();
            let batch = self.messages_written.get() - self.messages_at_last_sync.get();
            self.messages_at_last_sync.set(self.messages_written.get());
            if batch > 0 {
                metrics::with(|m| m.commit_batch.observe(batch as f64));
            }
            let mut failed = Vec::new();
            for &seq in &plan.segments {
                let started = std::time::Instant::now();
                let synced = self.file(seq).fdatasync().await;
                let took = started.elapsed().as_secs_f64();
                metrics::with(|m| m.fdatasync.observe(took));
                if let Err(e) = synced {
                    error!(
                        shard = self.config.shard,
                        segment = seq,
                        "fdatasync failed, answering 451 for its unsynced mail: {e}"
                    );
                    failed.push(seq);
                }
            }
            let target = plan.target;
            self.policy.borrow_mut().end_sync(plan, &failed);
            self.wake_durable(target);
        }
    }
}

/// What the committer waits for, on the waker `complete` wakes whenever a write completes
/// beyond what is durable.
struct CommitterWait<'a> {
    appender: &'a Appender,
    until: fn(&CommitPolicy) -> bool,
}

impl Future for CommitterWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if (self.until)(&self.appender.policy.borrow()) {
            Poll::Ready(())
        } else {
            *self.appender.committer_waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// Ready with the placement's acknowledgement once it is no longer pending.
struct WaitDurable<'a> {
    appender: &'a Appender,
    placement: Placement,
}

impl Future for WaitDurable<'_> {
    type Output = Ack;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ack> {
        match self.appender.policy.borrow().ack(&self.placement) {
            Ack::Pending => {}
            done => return Poll::Ready(done),
        }
        let ticket = self.placement.ticket;
        let mut waiters = self.appender.durable_waiters.borrow_mut();
        match waiters.iter_mut().find(|(t, _)| *t == ticket) {
            Some((_, waker)) => waker.clone_from(cx.waker()),
            None => waiters.push((ticket, cx.waker().clone())),
        }
        Poll::Pending
    }
}

/// Ready when no segment is being prepared.
struct WaitSegment<'a> {
    appender: &'a Appender,
}

impl Future for WaitSegment<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.appender.policy.borrow().preparing() {
            self.appender.segment_waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}
