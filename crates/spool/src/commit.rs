//! The spool's commit policy, sans-IO: where each record goes, when to sync, whom to
//! acknowledge, and which segment to write next. The appender (the glommio shell) does the
//! writes, fdatasyncs, renames and deletions this policy asks for and reports back; the
//! simulator drives the same policy over a simulated disk that crashes.
//!
//! **Ordering invariant** (what makes recovery's "stop at the first bad record" safe): a record
//! is acknowledged only when every record reserved before it has finished writing and an
//! fdatasync that started after all of those writes has completed. Reservations take a ticket in
//! segment order; `window_base` is the first ticket whose write has not completed;
//! `durable_below` is the first ticket not yet covered by a completed fdatasync. A record with
//! ticket `t` is acknowledged once `durable_below > t`.
//!
//! **Failures**: a failed write or fdatasync poisons its segment from the first ticket it may
//! have lost; every later record of that segment fails (451, never 250), and new records go to a
//! fresh segment.
//!
//! **Space**: when the record at hand does not fit in the active segment, the next segment is
//! the spare prepared in advance; else the oldest segment, if none of its messages is
//! unfinished and nothing holds it (recycled; with no older segment, the active one itself);
//! else a new file within `segments_max`. Segments are reclaimed (recycled or deleted) oldest
//! first: a segment's tombstones refer only to messages in it or in older segments, so this
//! order never brings a finished message back.
//!
//! **Holding**: a segment is held while a placement in it has not been released (its write or
//! its acknowledgement is pending, so its message is not yet in the queue index) and while it
//! waits for or is in an fdatasync. A held segment is never reclaimed.

use std::collections::{HashMap, VecDeque};

use gannet_smtp::session::CommitError;

pub type Ticket = u64;

/// What the policy is told once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitConfig {
    pub segment_bytes: u64,
    /// Segment files this shard may have (its share of the spool size limit).
    pub segments_max: usize,
    /// fdatasync before acknowledging (durability `fsync`); off: acknowledged once written.
    pub sync: bool,
    /// A deliberately broken policy, for the simulator's proof that it catches one:
    /// acknowledge as soon as the write completes, before any fdatasync. Never set otherwise.
    #[doc(hidden)]
    pub ack_before_sync: bool,
}

/// Where a record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub seq: u64,
    pub offset: u64,
    pub ticket: Ticket,
}

/// The answer to [`CommitPolicy::reserve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// Write there. `prepare_spare`: the active segment is half full; the caller should prepare
    /// the next one in the background (the policy counts it as being prepared).
    Placed { placement: Placement, prepare_spare: bool },
    /// No room and nothing prepared: the caller prepares a segment now, then asks again.
    Prepare,
    /// Another task prepares a segment: wait for it, then ask again.
    Wait,
}

/// Where the next segment comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Reuse segment `old_seq`'s file under a new sequence, zeroing its first `zero_bytes`.
    /// `open`: the shell has a handle to it (it was written since start).
    Recycle { old_seq: u64, zero_bytes: u64, open: bool },
    /// A new file (if `segments_max` allows: see [`CommitPolicy::may_create`]).
    Create,
}

/// Where an acknowledgement stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    Pending,
    Durable,
    Failed,
}

/// An fdatasync to make: of `segments`, covering tickets below `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPlan {
    pub target: Ticket,
    /// The first ticket a failed sync may have lost.
    pub first_undurable: Ticket,
    pub segments: Vec<u64>,
}

/// A segment found on disk at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExistingSegment {
    pub seq: u64,
    pub len_bytes: u64,
}

/// A segment written since start.
#[derive(Debug, Clone, Default)]
struct Seg {
    /// Bytes reserved: everything past it is zero.
    write_pos: u64,
    /// Tickets from this one on are never acknowledged (u64::MAX: healthy).
    poisoned_from: Ticket,
    /// Placements not yet released.
    held: u32,
    /// Completed writes not yet covered by an fdatasync, or one in progress.
    unsynced: bool,
    syncing: bool,
}

impl Seg {
    fn new() -> Seg {
        Seg {
            poisoned_from: Ticket::MAX,
            ..Seg::default()
        }
    }

    fn healthy(&self) -> bool {
        self.poisoned_from == Ticket::MAX
    }

    fn idle(&self) -> bool {
        self.held == 0 && !self.unsynced && !self.syncing
    }
}

/// A segment no longer written.
#[derive(Debug, Clone, Copy)]
struct Sealed {
    seq: u64,
    /// How far it may hold non-zero bytes (what recycling must zero).
    used_bytes: u64,
    /// Its file is a segment long (not so after a change of `spool.segment_size`: then it is
    /// deleted once drained).
    recyclable: bool,
}

#[derive(Debug)]
pub struct CommitPolicy {
    config: CommitConfig,
    segs: HashMap<u64, Seg>,
    active: Option<u64>,
    spare: Option<u64>,
    preparing: bool,
    prepare_error: Option<CommitError>,
    /// Own segments no longer written, oldest first.
    sealed: VecDeque<Sealed>,
    /// Segment files of this shard on disk.
    segment_count: usize,
    next_seq: u64,
    next_ticket: Ticket,
    /// Completion flags of tickets `window_base..next_ticket`.
    window: VecDeque<bool>,
    window_base: Ticket,
    durable_below: Ticket,
    /// Segments with completed writes not yet covered by an fdatasync.
    unsynced: Vec<u64>,
    /// The segment being recycled: until its old name is gone for good, no newer segment may
    /// be deleted (their tombstones finish its messages; found by the simulator, seed 194).
    recycling: Option<u64>,
}

impl CommitPolicy {
    /// The policy for a shard that has `existing` segments on disk (all read-only from now on)
    /// with sequences below `next_seq`.
    pub fn new(config: CommitConfig, existing: &[ExistingSegment], next_seq: u64) -> CommitPolicy {
        assert!(config.segment_bytes > 0 && config.segment_bytes % crate::RECORD_ALIGN_BYTES == 0);
        CommitPolicy {
            sealed: existing
                .iter()
                .map(|e| Sealed {
                    seq: e.seq,
                    used_bytes: e.len_bytes,
                    recyclable: e.len_bytes == config.segment_bytes,
                })
                .collect(),
            segment_count: existing.len(),
            config,
            segs: HashMap::new(),
            active: None,
            spare: None,
            preparing: false,
            prepare_error: None,
            next_seq,
            next_ticket: 0,
            window: VecDeque::new(),
            window_base: 0,
            durable_below: 0,
            unsynced: Vec::new(),
            recycling: None,
        }
    }

    pub fn config(&self) -> &CommitConfig {
        &self.config
    }

    /// Takes a ticket and a place for `len` bytes (a multiple of the record alignment),
    /// rolling to the spare when the active segment is full.
    pub fn reserve(&mut self, len: u64) -> Reserve {
        assert!(
            len > 0 && len <= self.config.segment_bytes,
            "record larger than a segment"
        );
        loop {
            if let Some(seq) = self.active {
                let seg = self.segs.get_mut(&seq).expect("the active segment is tracked");
                let pos = seg.write_pos;
                if seg.healthy() && pos + len <= self.config.segment_bytes {
                    seg.write_pos = pos + len;
                    seg.held += 1;
                    let ticket = self.next_ticket;
                    self.next_ticket += 1;
                    self.window.push_back(false);
                    let prepare_spare =
                        self.spare.is_none() && !self.preparing && (pos + len) * 2 > self.config.segment_bytes;
                    if prepare_spare {
                        self.preparing = true;
                        self.prepare_error = None;
                    }
                    return Reserve::Placed {
                        placement: Placement {
                            seq,
                            offset: pos,
                            ticket,
                        },
                        prepare_spare,
                    };
                }
            }
            if let Some(spare) = self.spare.take() {
                if let Some(old) = self.active.replace(spare) {
                    self.seal(old);
                }
                continue;
            }
            if self.preparing {
                return Reserve::Wait;
            }
            self.preparing = true;
            self.prepare_error = None;
            return Reserve::Prepare;
        }
    }

    /// At start: whether a segment must be prepared before the first record (nothing active,
    /// spare or being prepared). If so, the policy counts it as being prepared.
    pub fn begin_first_prepare(&mut self) -> bool {
        if self.active.is_some() || self.spare.is_some() || self.preparing {
            return false;
        }
        self.preparing = true;
        self.prepare_error = None;
        true
    }

    /// After a [`Reserve::Prepare`] or [`Reserve::Wait`]: the error of a preparation that
    /// failed, for one caller to report (the next caller tries again).
    pub fn take_prepare_error(&mut self) -> Option<CommitError> {
        if self.spare.is_none() && !self.preparing {
            self.prepare_error.take()
        } else {
            None
        }
    }

    pub fn preparing(&self) -> bool {
        self.preparing
    }

    fn seal(&mut self, seq: u64) {
        let seg = &self.segs[&seq];
        self.sealed.push_back(Sealed {
            seq,
            used_bytes: seg.write_pos,
            recyclable: seg.healthy(),
        });
    }

    /// Where the segment being prepared comes from (see the module's doc). `early`: the active
    /// segment still has room, so it is not a candidate. `live(seq)`: the segment holds an
    /// unfinished message. A recycled segment leaves the policy's books until
    /// [`CommitPolicy::prepared`] or [`CommitPolicy::prepare_failed`].
    pub fn source(&mut self, early: bool, live: &dyn Fn(u64) -> bool) -> Source {
        assert!(self.preparing);
        if let Some(front) = self.sealed.front().copied() {
            let idle = self.segs.get(&front.seq).is_none_or(Seg::idle);
            if front.recyclable && idle && !live(front.seq) {
                self.sealed.pop_front();
                self.recycling = Some(front.seq);
                let open = self.segs.remove(&front.seq).is_some();
                return Source::Recycle {
                    old_seq: front.seq,
                    zero_bytes: front.used_bytes.min(self.config.segment_bytes),
                    open,
                };
            }
            return Source::Create;
        }
        let Some(seq) = self.active.filter(|_| !early) else {
            return Source::Create;
        };
        let seg = &self.segs[&seq];
        if seg.healthy() && seg.idle() && !live(seq) {
            let zero_bytes = seg.write_pos;
            self.active = None;
            self.segs.remove(&seq);
            self.recycling = Some(seq);
            return Source::Recycle {
                old_seq: seq,
                zero_bytes,
                open: true,
            };
        }
        Source::Create
    }

    /// Whether a new segment file is within `segments_max`.
    pub fn may_create(&self) -> bool {
        self.segment_count < self.config.segments_max
    }

    /// A new sequence number: increasing, and at least `now_ms` (so that a restart with a
    /// wiped counter still sorts after old segments).
    pub fn new_seq(&mut self, now_ms: u64) -> u64 {
        let seq = self.next_seq.max(now_ms);
        self.next_seq = seq + 1;
        seq
    }

    /// The segment being prepared is ready as `seq`; `created`: a new file (not recycled).
    pub fn prepared(&mut self, seq: u64, created: bool) {
        assert!(self.preparing && self.spare.is_none());
        if created {
            self.segment_count += 1;
        }
        self.segs.insert(seq, Seg::new());
        self.spare = Some(seq);
        self.preparing = false;
        self.recycling = None;
    }

    /// The preparation failed; `lost_file`: a segment being recycled is gone with it.
    pub fn prepare_failed(&mut self, error: CommitError, lost_file: bool) {
        assert!(self.preparing);
        if lost_file {
            self.segment_count -= 1;
        }
        self.prepare_error = Some(error);
        self.preparing = false;
        self.recycling = None;
    }

    /// A placement's write finished (or failed).
    pub fn write_done(&mut self, p: &Placement, ok: bool) {
        let index = (p.ticket - self.window_base) as usize;
        assert!(!self.window[index], "a ticket completes once");
        self.window[index] = true;
        let seg = self.segs.get_mut(&p.seq).expect("a placement's segment is tracked");
        if ok {
            if !seg.unsynced {
                seg.unsynced = true;
                self.unsynced.push(p.seq);
            }
        } else {
            seg.poisoned_from = seg.poisoned_from.min(p.ticket);
            if self.active == Some(p.seq) {
                self.active = None;
                self.seal(p.seq);
            }
        }
        while self.window.front() == Some(&true) {
            self.window.pop_front();
            self.window_base += 1;
        }
    }

    /// Where a placement's acknowledgement stands.
    pub fn ack(&self, p: &Placement) -> Ack {
        let seg = &self.segs[&p.seq];
        if seg.poisoned_from <= p.ticket {
            return Ack::Failed;
        }
        let written = p.ticket < self.window_base;
        if !self.config.sync || self.config.ack_before_sync {
            return if written { Ack::Durable } else { Ack::Pending };
        }
        if self.durable_below > p.ticket {
            Ack::Durable
        } else {
            Ack::Pending
        }
    }

    /// The caller is done with a placement (acknowledged, failed, or an unwaited record
    /// written): its segment is no longer held by it.
    pub fn release(&mut self, p: &Placement) {
        let seg = self.segs.get_mut(&p.seq).expect("a placement's segment is tracked");
        assert!(seg.held > 0, "released once");
        seg.held -= 1;
    }

    /// Completed writes wait for an fdatasync.
    pub fn has_sync_work(&self) -> bool {
        self.config.sync && self.window_base > self.durable_below
    }

    /// No write is in flight.
    pub fn writes_settled(&self) -> bool {
        self.window.is_empty()
    }

    /// The next fdatasync: every segment with completed writes, covering everything written
    /// so far.
    pub fn begin_sync(&mut self) -> SyncPlan {
        let segments = std::mem::take(&mut self.unsynced);
        for seq in &segments {
            let seg = self.segs.get_mut(seq).expect("tracked");
            seg.unsynced = false;
            seg.syncing = true;
        }
        SyncPlan {
            target: self.window_base,
            first_undurable: self.durable_below,
            segments,
        }
    }

    /// The fdatasyncs of a plan finished; `failed`: the segments whose sync failed (poisoned
    /// from the plan's first undurable ticket, and retired if active).
    pub fn end_sync(&mut self, plan: SyncPlan, failed: &[u64]) {
        for seq in &plan.segments {
            let seg = self.segs.get_mut(seq).expect("tracked");
            seg.syncing = false;
            if failed.contains(seq) {
                seg.poisoned_from = seg.poisoned_from.min(plan.first_undurable);
                if self.active == Some(*seq) {
                    self.active = None;
                    self.seal(*seq);
                }
            }
        }
        assert!(plan.target >= self.durable_below, "durability only moves forward");
        self.durable_below = plan.target;
    }

    /// The oldest sealed segment, if it may be deleted now: nothing holds it, none of its
    /// messages is unfinished, and no older segment is being recycled. Delete it, then call [`CommitPolicy::deleted`].
    pub fn collectable(&self, live: &dyn Fn(u64) -> bool) -> Option<u64> {
        if self.recycling.is_some() {
            return None;
        }
        let front = self.sealed.front()?;
        let idle = self.segs.get(&front.seq).is_none_or(Seg::idle);
        (idle && !live(front.seq)).then_some(front.seq)
    }

    pub fn deleted(&mut self, seq: u64) {
        let front = self.sealed.pop_front().expect("deleting the collectable segment");
        assert_eq!(front.seq, seq);
        self.segs.remove(&seq);
        self.segment_count -= 1;
    }

    /// The oldest segment on disk that is no longer written to.
    pub fn oldest_sealed(&self) -> Option<u64> {
        self.sealed.front().map(|s| s.seq)
    }

    pub fn segment_count(&self) -> usize {
        self.segment_count
    }

    pub fn active(&self) -> Option<u64> {
        self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 * 4096;

    fn policy(existing: &[ExistingSegment]) -> CommitPolicy {
        CommitPolicy::new(
            CommitConfig {
                segment_bytes: SEG,
                segments_max: 3,
                sync: true,
                ack_before_sync: false,
            },
            existing,
            100,
        )
    }

    /// Reserves, preparing segments as the policy asks (new files, numbered 1000 up).
    fn place(p: &mut CommitPolicy, len: u64, live: &dyn Fn(u64) -> bool) -> Placement {
        loop {
            match p.reserve(len) {
                Reserve::Placed {
                    placement,
                    prepare_spare,
                } => {
                    if prepare_spare {
                        prepare(p, true, live);
                    }
                    return placement;
                }
                Reserve::Prepare => prepare(p, false, live),
                Reserve::Wait => panic!("nobody else prepares here"),
            }
            assert_eq!(p.take_prepare_error(), None);
        }
    }

    fn prepare(p: &mut CommitPolicy, early: bool, live: &dyn Fn(u64) -> bool) {
        let source = p.source(early, live);
        let seq = p.new_seq(0);
        match source {
            Source::Recycle { .. } => p.prepared(seq, false),
            Source::Create if p.may_create() => p.prepared(seq, true),
            Source::Create => p.prepare_failed(CommitError::NoSpace, false),
        }
    }

    #[test]
    fn acknowledgement_waits_for_every_earlier_write_and_a_sync_after_them() {
        let mut p = policy(&[]);
        let none = |_| false;
        let a = place(&mut p, 4096, &none);
        let b = place(&mut p, 4096, &none);
        p.write_done(&b, true);
        assert!(!p.has_sync_work(), "a is still in flight");
        let plan = p.begin_sync();
        p.end_sync(plan, &[]);
        assert_eq!(p.ack(&b), Ack::Pending, "b was not covered: a had not completed");
        p.write_done(&a, true);
        assert!(p.has_sync_work() && p.writes_settled());
        let plan = p.begin_sync();
        assert_eq!(p.ack(&a), Ack::Pending, "not until the sync completes");
        p.end_sync(plan, &[]);
        assert_eq!((p.ack(&a), p.ack(&b)), (Ack::Durable, Ack::Durable));
    }

    #[test]
    fn a_failed_write_or_sync_fails_its_segment_from_there_on() {
        let mut p = policy(&[]);
        let none = |_| false;
        let a = place(&mut p, 4096, &none);
        let b = place(&mut p, 4096, &none);
        p.write_done(&a, true);
        p.write_done(&b, false);
        let plan = p.begin_sync();
        p.end_sync(plan, &[]);
        assert_eq!((p.ack(&a), p.ack(&b)), (Ack::Durable, Ack::Failed));
        // The segment is retired: the next record goes to a fresh one.
        let c = place(&mut p, 4096, &none);
        assert_ne!(c.seq, a.seq);
        p.write_done(&c, true);
        let plan = p.begin_sync();
        assert_eq!(plan.segments, vec![c.seq]);
        p.end_sync(plan, &[c.seq]);
        assert_eq!(p.ack(&c), Ack::Failed, "a failed sync fails what it covered");
    }

    #[test]
    fn a_drained_segment_is_recycled_before_a_new_file_and_held_ones_never() {
        let mut p = policy(&[]);
        let live_set = std::cell::RefCell::new(std::collections::HashSet::new());
        let live = |seq| live_set.borrow().contains(&seq);
        // Fill three segments (the maximum) with messages that stay queued.
        let mut placements = Vec::new();
        for _ in 0..(3 * 16) {
            let pl = place(&mut p, 4096, &live);
            live_set.borrow_mut().insert(pl.seq);
            p.write_done(&pl, true);
            let plan = p.begin_sync();
            p.end_sync(plan, &[]);
            p.release(&pl);
            placements.push(pl);
        }
        assert_eq!(p.segment_count(), 3);
        // No room anywhere: the oldest holds queued mail and no file may be added.
        assert_eq!(p.reserve(4096), Reserve::Prepare);
        assert_eq!(p.source(false, &live), Source::Create);
        assert!(!p.may_create());
        p.prepare_failed(CommitError::NoSpace, false);
        assert_eq!(p.take_prepare_error(), Some(CommitError::NoSpace));
        // Once the oldest is delivered it is recycled (no new file) and mail flows again.
        let first = placements[0].seq;
        live_set.borrow_mut().remove(&first);
        let pl = place(&mut p, 4096, &live);
        assert_eq!(p.segment_count(), 3);
        assert_ne!(pl.seq, first);
        assert_eq!(p.oldest_sealed(), Some(placements[16].seq));
    }

    #[test]
    fn the_only_segment_is_rewound_when_drained_and_held_placements_keep_it() {
        let mut p = policy(&[]);
        let none = |_| false;
        assert_eq!(p.reserve(4096), Reserve::Prepare);
        assert_eq!(p.source(false, &none), Source::Create);
        p.prepared(7, true);
        let Reserve::Placed {
            placement: held,
            prepare_spare,
        } = p.reserve(SEG - 4096)
        else {
            panic!("room in the new segment")
        };
        // The spare cannot be made (a full disk, say).
        assert!(prepare_spare);
        assert_eq!(p.source(true, &none), Source::Create);
        p.prepare_failed(CommitError::NoSpace, false);
        p.write_done(&held, true);
        let plan = p.begin_sync();
        p.end_sync(plan, &[]);
        // Acknowledged but not yet released (its message is not in the queue index yet).
        assert_eq!(p.reserve(8192), Reserve::Prepare);
        assert_eq!(p.source(false, &none), Source::Create, "held: not rewound");
        p.prepare_failed(CommitError::NoSpace, false);
        p.release(&held);
        assert_eq!(p.reserve(8192), Reserve::Prepare);
        assert_eq!(
            p.source(false, &none),
            Source::Recycle {
                old_seq: 7,
                zero_bytes: SEG - 4096,
                open: true
            }
        );
        p.prepared(8, false);
        assert_eq!(p.segment_count(), 1, "the same file under a new sequence");
        assert!(matches!(
            p.reserve(8192),
            Reserve::Placed {
                placement: Placement { seq: 8, offset: 0, .. },
                ..
            }
        ));
    }

    #[test]
    fn recovered_segments_are_collected_oldest_first_and_odd_sizes_only_deleted() {
        let existing = [
            ExistingSegment { seq: 1, len_bytes: SEG },
            ExistingSegment {
                seq: 2,
                len_bytes: SEG * 2,
            },
            ExistingSegment { seq: 3, len_bytes: SEG },
        ];
        let mut p = policy(&existing);
        let live = |seq| seq == 3;
        assert_eq!(p.collectable(&live), Some(1));
        p.deleted(1);
        assert_eq!(p.reserve(4096), Reserve::Prepare);
        assert_eq!(p.source(false, &live), Source::Create, "segment 2 has the wrong size");
        p.prepare_failed(CommitError::NoSpace, false);
        assert_eq!(p.collectable(&live), Some(2));
        p.deleted(2);
        assert_eq!(p.collectable(&live), None, "3 is live");
        assert_eq!(p.segment_count(), 1);
    }

    #[test]
    fn the_broken_variant_acknowledges_before_any_sync() {
        let mut p = CommitPolicy::new(
            CommitConfig {
                segment_bytes: SEG,
                segments_max: 3,
                sync: true,
                ack_before_sync: true,
            },
            &[],
            0,
        );
        let a = place(&mut p, 4096, &|_| false);
        p.write_done(&a, true);
        assert_eq!(p.ack(&a), Ack::Durable);
    }
}
