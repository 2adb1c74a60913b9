//! The shard's appender: places records in the active segment, writes them with O_DIRECT, and
//! acknowledges them through group commit.
//!
//! Ordering invariant (what makes recovery's "stop at the first bad record" safe): a record is
//! acknowledged only when every record reserved before it has finished writing and an fdatasync
//! that started after all of those writes has completed. Reservations take a ticket in segment
//! order; `window_base` is the first ticket whose write has not completed; `durable_below` is the
//! first ticket not yet covered by a completed fdatasync. A waiter with ticket `t` is answered once
//! `durable_below > t`.
//!
//! Group commit: one committer task per shard waits until there are completed-but-not-durable
//! writes, yields once so that writes finishing at the same moment join the batch ("gather before
//! leading"), then waits until no write is in flight (at most `SETTLE_WAIT_MAX`, so that a slow
//! or steady stream of writes cannot hold the sync back), and issues one fdatasync per touched
//! segment for all of them. Waiting for writes in flight costs about a write's latency and saves
//! the fdatasync they would need right after: under load on this project's test machine it cut
//! fdatasyncs per message by a third to a half and context switches by about 15%.
//!
//! Failures: a failed write or fdatasync poisons its segment from the first ticket it may have
//! lost; every later record of that segment is answered 451 (never 250), and new records go to a
//! fresh segment.
//!
//! Space: a shard always makes progress with the segments it owns. When the active segment is
//! full, the next one is, in this order, the spare prepared in advance; the oldest segment, if
//! none of its messages is unfinished (recycled: zero-filled where it was written and renamed,
//! no new space taken; this may be the active segment itself when it is the only one); or a new
//! file, within `segments_max` and `min_free_bytes`. Refusals for lack of space end as soon as a
//! segment drains, and are logged once per change of state, not once per message.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use glommio::io::{Directory, DmaBuffer, DmaFile, OpenOptions};
use tracing::{error, info, warn};

use super::buffer::{Budget, FinishedMessage, MessageBuffer};
use super::record::{self, build_deferral_record, build_state_record, Deferral, Kind, StateEntry};
use super::{align_up, segment_file_name, Durability, MessageId};
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

/// One segment file open for appending (write-only: see FIELD-NOTES on the IOPOLL pitfall).
pub struct Segment {
    pub seq: u64,
    file: DmaFile,
    /// Bytes reserved so far: everything past it is zero.
    write_pos: Cell<u64>,
    /// Tickets from this one on must not be acknowledged (u64::MAX: healthy).
    poisoned_from: Cell<u64>,
}

impl Segment {
    fn healthy(&self) -> bool {
        self.poisoned_from.get() == u64::MAX
    }

    fn poison_from(&self, ticket: u64) {
        self.poisoned_from.set(self.poisoned_from.get().min(ticket));
    }
}

/// A segment of this shard that is no longer written.
struct Sealed {
    seq: u64,
    /// Our handle, for segments rolled since start; none for recovered ones.
    handle: Option<Rc<Segment>>,
    /// How far it may hold non-zero bytes (what recycling must zero).
    used_bytes: u64,
    /// Its file is `segment_bytes` long, so it can be recycled (not so after a change of
    /// `spool.segment_size`: then it is deleted once drained).
    recyclable: bool,
}

impl Sealed {
    /// No write or fdatasync holds it.
    fn idle(&self) -> bool {
        self.handle.as_ref().is_none_or(|s| Rc::strong_count(s) == 1)
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

/// An existing segment file of this shard, found at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExistingSegment {
    pub seq: u64,
    pub len_bytes: u64,
}

#[derive(Default)]
struct State {
    active: Option<Rc<Segment>>,
    spare: Option<Rc<Segment>>,
    preparing: bool,
    prepare_error: Option<CommitError>,
    segment_waiters: Vec<Waker>,
    /// Segment files of this shard on disk.
    segment_count: usize,
    /// Own segments no longer written, oldest first: recovered ones (no handle) and rolled ones.
    sealed: VecDeque<Sealed>,
    space: Space,
    next_seq: u64,
    next_ticket: u64,
    /// Completion flags of tickets `window_base..next_ticket`.
    window: VecDeque<bool>,
    window_base: u64,
    durable_below: u64,
    /// Segments with completed writes not yet covered by an fdatasync.
    unsynced: Vec<Rc<Segment>>,
    durable_waiters: Vec<(u64, Waker)>,
    committer_waker: Option<Waker>,
}

impl State {
    /// Stops writing to `segment` if it is the active one (after a failure).
    fn retire_active_if(&mut self, segment: &Rc<Segment>) {
        if self.active.as_ref().is_some_and(|a| Rc::ptr_eq(a, segment)) {
            let old = self.active.take().expect("checked");
            self.seal(old);
        }
    }

    fn seal(&mut self, segment: Rc<Segment>) {
        self.sealed.push_back(Sealed {
            seq: segment.seq,
            used_bytes: segment.write_pos.get(),
            recyclable: segment.healthy(),
            handle: Some(segment),
        });
    }
}

/// Says whether a segment (by sequence) of this shard still holds an unfinished message.
pub type Liveness = Rc<dyn Fn(u64) -> bool>;

/// Where the next segment comes from.
enum Source {
    Recycle(Sealed),
    Create,
}

pub struct Appender {
    config: AppenderConfig,
    directory: Directory,
    budget: Rc<Budget>,
    state: RefCell<State>,
    /// Which segments hold unfinished messages (the queue index knows).
    live: Liveness,
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
        let budget = Budget::new(config.inflight_bytes_max);
        let sealed = existing
            .iter()
            .map(|e| Sealed {
                seq: e.seq,
                handle: None,
                used_bytes: e.len_bytes,
                recyclable: e.len_bytes == config.segment_bytes,
            })
            .collect();
        let appender = Rc::new(Appender {
            directory,
            budget,
            state: RefCell::new(State {
                segment_count: existing.len(),
                sealed,
                next_seq,
                ..State::default()
            }),
            config,
            live,
        });
        if appender.config.durability == Durability::Fsync {
            glommio::spawn_local(appender.clone().run_committer()).detach();
        }
        appender.state.borrow_mut().preparing = true;
        appender.prepare(false).await;
        let spare = appender.state.borrow_mut().spare.take();
        appender.state.borrow_mut().active = spare;
        appender.collect_garbage().await;
        Ok(appender)
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
        let (segment, offset, ticket) = self.reserve(record_bytes).await?;
        let id = MessageId::new(segment.seq, self.config.shard, offset);
        let (chunks, charge) = message.seal(segment.seq);
        let mut kept = Vec::with_capacity(if keep { chunks.len() } else { 0 });
        let mut pos = offset;
        let mut written = true;
        for chunk in chunks {
            let len = chunk.len();
            let chunk = Rc::new(chunk);
            if keep {
                kept.push(chunk.clone());
            }
            match segment.file.write_rc_at(chunk, pos).await {
                Ok(n) if n == len => pos += len as u64,
                Ok(n) => {
                    error!(
                        shard = self.config.shard,
                        segment = segment.seq,
                        offset = pos,
                        "short spool write: {n} of {len} bytes"
                    );
                    written = false;
                    break;
                }
                Err(e) => {
                    error!(
                        shard = self.config.shard,
                        segment = segment.seq,
                        offset = pos,
                        "spool write failed: {e}"
                    );
                    written = false;
                    break;
                }
            }
        }
        drop(charge);
        debug_assert!(!written || pos == offset + record_bytes);
        self.complete(ticket, &segment, written);
        if !written {
            return Err(CommitError::Io);
        }
        let kept = keep.then_some(WrittenRecord {
            chunks: kept,
            len: record_len,
        });
        if self.config.durability == Durability::None {
            return Ok((id, kept));
        }
        WaitDurable { appender: self, ticket }.await;
        if segment.poisoned_from.get() <= ticket {
            return Err(CommitError::Io);
        }
        Ok((id, kept))
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

    /// Writes one record of `len` bytes (padded), built for its segment by `build`, without
    /// waiting for the fdatasync that will cover it.
    async fn append_unwaited(self: &Rc<Self>, len: u64, build: impl FnOnce(u64) -> Vec<u8>) -> Result<(), CommitError> {
        let (segment, offset, ticket) = self.reserve(len).await?;
        let bytes = build(segment.seq);
        debug_assert_eq!(bytes.len() as u64, len);
        let mut buffer = glommio::allocate_dma_buffer(bytes.len());
        buffer.as_bytes_mut().copy_from_slice(&bytes);
        let written = match segment.file.write_at(buffer, offset).await {
            Ok(n) => n == bytes.len(),
            Err(e) => {
                error!(
                    shard = self.config.shard,
                    segment = segment.seq,
                    "state record write failed: {e}"
                );
                false
            }
        };
        self.complete(ticket, &segment, written);
        if written {
            Ok(())
        } else {
            Err(CommitError::Io)
        }
    }

    /// Deletes own segments, oldest first, while nothing in them is needed (the liveness given
    /// at open says whether a segment still holds an unfinished message). Oldest-first matters:
    /// a segment's tombstones refer only to messages in it or in older segments, so deleting in
    /// order never brings a finished message back. Returns the number deleted.
    pub async fn collect_garbage(&self) -> usize {
        let mut deleted = 0;
        loop {
            let seq = {
                let st = self.state.borrow();
                match st.sealed.front() {
                    // A handle still shared means a write or an fdatasync is in flight.
                    Some(sealed) if sealed.idle() && !(self.live)(sealed.seq) => sealed.seq,
                    _ => break,
                }
            };
            let path = self.config.dir.join(segment_file_name(seq));
            if let Err(e) = glommio::io::remove(&path).await {
                warn!(
                    shard = self.config.shard,
                    "cannot delete drained segment {}: {e}",
                    path.display()
                );
                break;
            }
            let mut st = self.state.borrow_mut();
            st.sealed.pop_front();
            st.segment_count -= 1;
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
        self.state.borrow().sealed.front().map(|s| s.seq)
    }

    /// The spool refuses mail for lack of space (its size limit or the file system's).
    pub fn out_of_space(&self) -> bool {
        self.state.borrow().space != Space::Room
    }

    /// Segment files this shard has on disk now.
    pub fn segment_count(&self) -> usize {
        self.state.borrow().segment_count
    }

    /// Takes a ticket and a place for `len` bytes, rolling to a new segment when needed.
    async fn reserve(self: &Rc<Self>, len: u64) -> Result<(Rc<Segment>, u64, u64), CommitError> {
        loop {
            let must_prepare = {
                let mut st = self.state.borrow_mut();
                if let Some(segment) = st.active.clone() {
                    let pos = segment.write_pos.get();
                    if segment.healthy() && pos + len <= self.config.segment_bytes {
                        segment.write_pos.set(pos + len);
                        let ticket = st.next_ticket;
                        st.next_ticket += 1;
                        st.window.push_back(false);
                        // Prepare the next segment once this one is half full, off the hot path.
                        let prepare_early =
                            st.spare.is_none() && !st.preparing && (pos + len) * 2 > self.config.segment_bytes;
                        if prepare_early {
                            st.preparing = true;
                            st.prepare_error = None;
                        }
                        drop(st);
                        if prepare_early {
                            // After the borrow ends: glommio runs a spawned task right away.
                            let appender = self.clone();
                            glommio::spawn_local(async move { appender.prepare(true).await }).detach();
                        }
                        return Ok((segment, pos, ticket));
                    }
                }
                if let Some(spare) = st.spare.take() {
                    if let Some(old) = st.active.replace(spare) {
                        st.seal(old);
                    }
                    continue;
                }
                if st.preparing {
                    false
                } else {
                    st.preparing = true;
                    st.prepare_error = None;
                    true
                }
            };
            if must_prepare {
                self.prepare(false).await;
            } else {
                WaitSegment { appender: self }.await;
            }
            let mut st = self.state.borrow_mut();
            if st.spare.is_none() && !st.preparing {
                if let Some(e) = st.prepare_error.take() {
                    return Err(e);
                }
            }
        }
    }

    /// Makes a spare segment (or records why not) and wakes whoever waits for one. `early`: the
    /// active segment still has room (so it must not be the one recycled).
    async fn prepare(self: &Rc<Self>, early: bool) {
        let result = match self.next_source(!early) {
            Source::Recycle(victim) => self.recycle(victim).await,
            Source::Create => self.create_segment().await,
        };
        let mut st = self.state.borrow_mut();
        match result {
            Ok(segment) => {
                st.spare = Some(Rc::new(segment));
                drop(st);
                self.set_space(Space::Room, "");
                st = self.state.borrow_mut();
            }
            Err(e) => st.prepare_error = Some(e),
        }
        st.preparing = false;
        for waker in st.segment_waiters.drain(..) {
            waker.wake();
        }
    }

    /// The oldest segment if it can be recycled now: none of its messages unfinished, no write
    /// or sync holding it. With no sealed segment, the active one is the oldest (`may_take_active`:
    /// it has no room left for the record that needs a segment).
    fn next_source(&self, may_take_active: bool) -> Source {
        let mut st = self.state.borrow_mut();
        if let Some(front) = st.sealed.front() {
            if front.recyclable && front.idle() && !(self.live)(front.seq) {
                return Source::Recycle(st.sealed.pop_front().expect("checked"));
            }
            return Source::Create;
        }
        let active_drained = st
            .active
            .as_ref()
            .is_some_and(|a| a.healthy() && Rc::strong_count(a) == 1 && !(self.live)(a.seq));
        if may_take_active && active_drained {
            let active = st.active.take().expect("checked");
            let used_bytes = active.write_pos.get();
            return Source::Recycle(Sealed {
                seq: active.seq,
                handle: Some(active),
                used_bytes,
                recyclable: true,
            });
        }
        Source::Create
    }

    /// Logs a change in whether the spool has room (once per change, not per message).
    fn set_space(&self, space: Space, why: &str) {
        let shard = self.config.shard;
        let was = std::mem::replace(&mut self.state.borrow_mut().space, space);
        match (was, space) {
            (a, b) if a == b => {}
            (_, Space::Room) => info!(shard, "spool has room again: accepting mail"),
            (_, Space::SpoolFull | Space::DiskFull) => warn!(
                shard,
                "{why}; refusing mail with 452 until delivered mail frees a segment"
            ),
        }
    }

    /// A new sequence number for a segment.
    fn next_seq(&self) -> u64 {
        let mut st = self.state.borrow_mut();
        let seq = st.next_seq.max(now_ms());
        st.next_seq = seq + 1;
        seq
    }

    /// Reuses a drained segment's file under a new sequence: renamed out of recovery's sight,
    /// zero-filled where it was written, synced, renamed to its new name. A crash at any point
    /// leaves either the old segment (whose messages are all finished, so nothing comes back
    /// that was not already due to come back) or a `.seg.tmp` file that recovery deletes. The
    /// old bytes are zeroed, not left behind the new records as stale ones: a stale record's
    /// checksum names its old sequence, but message bodies are the client's bytes at aligned
    /// offsets, and a forged record inside one must never become readable.
    async fn recycle(&self, victim: Sealed) -> Result<Segment, CommitError> {
        let shard = self.config.shard;
        let seq = self.next_seq();
        let old_path = self.config.dir.join(segment_file_name(victim.seq));
        let name = segment_file_name(seq);
        let tmp_path = self.config.dir.join(format!("{name}.tmp"));
        let final_path = self.config.dir.join(&name);
        let result = async {
            let file = match victim.handle {
                Some(segment) => match Rc::try_unwrap(segment) {
                    Ok(segment) => segment.file,
                    Err(_) => return Err(io::Error::other("segment still in use")),
                },
                None => OpenOptions::new()
                    .write(true)
                    .dma_open(&old_path)
                    .await
                    .map_err(io::Error::from)?,
            };
            file.rename(&tmp_path).await.map_err(io::Error::from)?;
            self.directory.sync().await.map_err(io::Error::from)?;
            self.zero_fill(&file, victim.used_bytes.min(self.config.segment_bytes))
                .await?;
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
                    "recycled drained segment {:016x} as {}",
                    victim.seq,
                    final_path.display()
                );
                Ok(Segment {
                    seq,
                    file,
                    write_pos: Cell::new(0),
                    poisoned_from: Cell::new(u64::MAX),
                })
            }
            Err(e) => {
                error!(shard, "cannot recycle segment {}: {e}", old_path.display());
                for path in [&old_path, &tmp_path, &final_path] {
                    let _ = glommio::io::remove(path).await;
                }
                self.state.borrow_mut().segment_count -= 1;
                Err(commit_error(&e))
            }
        }
    }

    async fn create_segment(&self) -> Result<Segment, CommitError> {
        let shard = self.config.shard;
        let count = self.state.borrow().segment_count;
        if count >= self.config.segments_max {
            let why = format!(
                "spool full: {count} segments of {} bytes (spool.size_max)",
                self.config.segment_bytes
            );
            self.set_space(Space::SpoolFull, &why);
            return Err(CommitError::NoSpace);
        }
        match free_bytes(&self.config.dir) {
            Ok(free) if free < self.config.min_free_bytes + self.config.segment_bytes => {
                let why = format!(
                    "file system nearly full: {free} bytes free, spool.min_free needs {} plus a segment of {}",
                    self.config.min_free_bytes, self.config.segment_bytes
                );
                self.set_space(Space::DiskFull, &why);
                return Err(CommitError::NoSpace);
            }
            Ok(_) => {}
            Err(e) => warn!(shard, "cannot read free space of {}: {e}", self.config.dir.display()),
        }
        let seq = self.next_seq();
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
                commit_error(&e)
            })?;
        if let Err(e) = self.fill_segment(&file, &final_path).await {
            error!(shard, "cannot prepare segment {}: {e}", tmp_path.display());
            let _ = file.remove().await;
            let _ = file.close().await;
            return Err(commit_error(&e));
        }
        self.state.borrow_mut().segment_count += 1;
        info!(shard, segment = seq, "new spool segment {}", final_path.display());
        Ok(Segment {
            seq,
            file,
            write_pos: Cell::new(0),
            poisoned_from: Cell::new(u64::MAX),
        })
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

    /// Records that ticket's write finished (or failed) and advances the completion window.
    fn complete(&self, ticket: u64, segment: &Rc<Segment>, written: bool) {
        let mut st = self.state.borrow_mut();
        let index = (ticket - st.window_base) as usize;
        st.window[index] = true;
        if written {
            if !st.unsynced.iter().any(|s| Rc::ptr_eq(s, segment)) {
                st.unsynced.push(segment.clone());
            }
        } else {
            segment.poison_from(ticket);
            st.retire_active_if(segment);
        }
        while st.window.front() == Some(&true) {
            st.window.pop_front();
            st.window_base += 1;
        }
        // This also serves the wait for writes in flight: that wait starts once there is work,
        // and nothing becomes durable until it ends, so there is still work on every completion.
        if CommitterWait::has_work(&st) {
            if let Some(waker) = st.committer_waker.take() {
                waker.wake();
            }
        }
    }

    /// The group-commit loop (durability `fsync` only).
    async fn run_committer(self: Rc<Self>) {
        loop {
            CommitterWait {
                appender: &self,
                until: CommitterWait::has_work,
            }
            .await;
            // Gather before leading: let writes completing right now join this batch.
            futures_lite::future::yield_now().await;
            // Then let the writes in flight join it too, for at most SETTLE_WAIT_MAX.
            futures_lite::future::or(
                CommitterWait {
                    appender: &self,
                    until: CommitterWait::writes_settled,
                },
                glommio::timer::sleep(SETTLE_WAIT_MAX),
            )
            .await;
            let (target, first_undurable, segments) = {
                let mut st = self.state.borrow_mut();
                (st.window_base, st.durable_below, std::mem::take(&mut st.unsynced))
            };
            for segment in &segments {
                if let Err(e) = segment.file.fdatasync().await {
                    error!(
                        shard = self.config.shard,
                        segment = segment.seq,
                        "fdatasync failed, answering 451 for its unsynced mail: {e}"
                    );
                    segment.poison_from(first_undurable);
                    self.state.borrow_mut().retire_active_if(segment);
                }
            }
            let mut st = self.state.borrow_mut();
            debug_assert!(target >= st.durable_below);
            st.durable_below = target;
            st.durable_waiters.retain(|(ticket, waker)| {
                if *ticket < target {
                    waker.wake_by_ref();
                    false
                } else {
                    true
                }
            });
        }
    }
}

/// What the committer waits for, on the waker `complete` wakes whenever a write completes
/// beyond what is durable.
struct CommitterWait<'a> {
    appender: &'a Appender,
    until: fn(&State) -> bool,
}

impl CommitterWait<'_> {
    /// The committer has work: completed writes not yet durable.
    fn has_work(st: &State) -> bool {
        st.window_base > st.durable_below
    }

    /// No write is in flight: every reserved record has completed (or failed).
    fn writes_settled(st: &State) -> bool {
        st.window.is_empty()
    }
}

impl Future for CommitterWait<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.appender.state.borrow_mut();
        if (self.until)(&st) {
            Poll::Ready(())
        } else {
            st.committer_waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

/// Ready when ticket is covered by a completed fdatasync.
struct WaitDurable<'a> {
    appender: &'a Appender,
    ticket: u64,
}

impl Future for WaitDurable<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.appender.state.borrow_mut();
        if st.durable_below > self.ticket {
            Poll::Ready(())
        } else {
            let ticket = self.ticket;
            match st.durable_waiters.iter_mut().find(|(t, _)| *t == ticket) {
                Some((_, waker)) => waker.clone_from(cx.waker()),
                None => st.durable_waiters.push((ticket, cx.waker().clone())),
            }
            Poll::Pending
        }
    }
}

/// Ready when no segment is being prepared.
struct WaitSegment<'a> {
    appender: &'a Appender,
}

impl Future for WaitSegment<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.appender.state.borrow_mut();
        if st.preparing {
            st.segment_waiters.push(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}
