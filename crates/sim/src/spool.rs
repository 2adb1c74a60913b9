//! The spool under crashes: the real commit policy (`gannet_spool::commit`) and the real
//! recovery scan and queue rebuild, over a simulated disk. A seeded run interleaves clients
//! submitting messages, the group committer, segment preparation (new files and recycling),
//! deliveries that write delivery state, and garbage collection, one disk operation per step;
//! at a random step the machine crashes (unsynced writes lost, kept, torn at sector
//! granularity or corrupted; unsynced directory changes partly lost), recovery runs on what is
//! left, the checks below run, and the next epoch carries on from the recovered spool.
//!
//! Checks after every crash:
//! - every acknowledged message with a recipient still unfinished is recovered, byte for byte
//!   (the whole record, so envelope and content);
//! - nothing is recovered that was never submitted, and what is recovered is exactly what was
//!   written;
//! - a recipient whose finished state was durable (covered by a completed fdatasync) is never
//!   pending again; one whose state was not yet durable may come back (the at-least-once
//!   window: counted as a duplicate, not a failure);
//! - recovery never panics (a panic fails the run) and ends (it is a bounded scan).
//!
//! What the shell does around the policy (the order of writes, fdatasyncs, renames and
//! directory syncs when preparing, recycling and deleting segments) is mirrored here from
//! `src/spool/appender.rs`; copy-forward is not simulated.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use gannet_sched::QueueIndex;
use gannet_smtp::envelope::{Envelope, Origin};
use gannet_smtp::session::CommitError;
use gannet_spool::commit::{Ack, CommitConfig, CommitPolicy, ExistingSegment, Placement, Reserve, Source, SyncPlan};
use gannet_spool::record::{build_message_record, build_state_record, verify_message_record, Kind, StateEntry};
use gannet_spool::recovery::scan_segment;
use gannet_spool::{parse_segment_file_name, segment_file_name, MessageId};

use crate::disk::{CrashModel, SimDisk};
use crate::rng::SimRng;

/// How a run goes.
#[derive(Debug, Clone, Copy)]
pub struct SpoolSimConfig {
    pub segment_bytes: u64,
    pub segments_max: usize,
    /// Steps per epoch before the crash (the crash comes at a random step within it).
    pub steps_max: usize,
    pub epochs: usize,
    /// Clients with a message in flight at most.
    pub clients: usize,
    pub crash: CrashModel,
    /// Run the deliberately broken policy (acknowledge before the sync).
    pub broken: bool,
}

impl SpoolSimConfig {
    pub const CI: SpoolSimConfig = SpoolSimConfig {
        segment_bytes: 64 * 1024,
        segments_max: 6,
        steps_max: 600,
        epochs: 3,
        clients: 4,
        crash: CrashModel::DEFAULT,
        broken: false,
    };
}

/// What a run saw.
#[derive(Debug, Clone, Default)]
pub struct SpoolReport {
    /// Disk operations executed (each one a point the crash may come after).
    pub disk_ops: u64,
    pub crashes: u64,
    pub acknowledged: u64,
    pub recovered: u64,
    /// Finished recipients pending again after a crash (their state was not yet durable).
    pub duplicates: u64,
    /// Checks that failed, one sentence each.
    pub violations: Vec<String>,
}

/// One submitted record, as written.
#[derive(Debug, Clone)]
struct Submitted {
    record: Vec<u8>,
    recipients: usize,
    acked: bool,
    /// Not recovered by an earlier crash: it must never come back.
    gone: bool,
}

/// A state record written, and the recipients it finishes.
#[derive(Debug, Clone)]
struct StateWrite {
    placement: Placement,
    entries: Vec<StateEntry>,
    durable: bool,
}

/// Work in progress, one disk operation per step.
#[derive(Debug, Clone)]
enum Task {
    /// A client's message: written in two halves (a tear can fall between them), then
    /// waiting for its acknowledgement.
    Message {
        placement: Placement,
        record: Vec<u8>,
        halves_written: u8,
    },
    /// A state record (written in one go, not waited on).
    State {
        placement: Placement,
        record: Vec<u8>,
        entries: Vec<StateEntry>,
    },
    /// Making the next segment, in the shell's order of operations.
    Prepare { source: Source, seq: u64, step: u8 },
    /// One fdatasync per segment of the plan.
    Sync { plan: SyncPlan, done: usize },
}

struct World<'a> {
    config: &'a SpoolSimConfig,
    rng: SimRng,
    disk: SimDisk,
    policy: CommitPolicy,
    queue: QueueIndex,
    submitted: HashMap<MessageId, Submitted>,
    /// Finished recipients (in memory) and whether their state is durable.
    finished: BTreeMap<(MessageId, u32), bool>,
    /// Where each durable finish was recorded (for the report of a failing seed).
    finished_by: BTreeMap<(MessageId, u32), Placement>,
    state_writes: Vec<StateWrite>,
    /// Finished but not yet written.
    state_pending: Vec<StateEntry>,
    tasks: Vec<Task>,
    /// Clients waiting for a segment to be prepared.
    waiting_clients: usize,
    report: SpoolReport,
    clock_ms: u64,
}

fn dir_name(seq: u64) -> String {
    segment_file_name(seq)
}

impl World<'_> {
    /// One random step. False when nothing could be done.
    fn step(&mut self) -> bool {
        self.clock_ms += 1;
        let choice = self.rng.below(8);
        match choice {
            0 | 1 if self.in_flight() < self.config.clients => self.submit(),
            2 => self.deliver_some(),
            3 if !self.state_pending.is_empty() => self.write_state(),
            4 => self.collect(),
            5 if self.policy.has_sync_work() && !self.tasks.iter().any(|t| matches!(t, Task::Sync { .. })) => {
                // Gather: only once no write is in flight, or by chance (the settle timeout).
                if self.policy.writes_settled() || self.rng.chance(30) {
                    let plan = self.policy.begin_sync();
                    self.tasks.push(Task::Sync { plan, done: 0 });
                }
                true
            }
            _ => self.advance_task(),
        }
    }

    fn in_flight(&self) -> usize {
        self.tasks.iter().filter(|t| matches!(t, Task::Message { .. })).count() + self.waiting_clients
    }

    fn reserve(&mut self, len: u64) -> Option<Placement> {
        match self.policy.reserve(len) {
            Reserve::Placed {
                placement,
                prepare_spare,
            } => {
                if prepare_spare {
                    self.start_prepare(true);
                }
                Some(placement)
            }
            Reserve::Prepare => {
                self.start_prepare(false);
                None
            }
            Reserve::Wait => None,
        }
    }

    fn start_prepare(&mut self, early: bool) {
        let live = |seq| self.queue.segment_is_live(0, seq);
        let source = self.policy.source(early, &live);
        if source == Source::Create && !self.policy.may_create() {
            self.policy.prepare_failed(CommitError::NoSpace, false);
            return;
        }
        let seq = self.policy.new_seq(self.clock_ms);
        self.tasks.push(Task::Prepare { source, seq, step: 0 });
    }

    fn submit(&mut self) -> bool {
        let n = self.rng.below(3) as usize + 1;
        let mut envelope = Envelope::default();
        envelope.set_sender(|b| b.extend_from_slice(b"sender@sim.test"));
        for i in 0..n {
            envelope.add_recipient(|b| b.extend_from_slice(format!("r{i}@sim.test").as_bytes()), 0, b"");
        }
        let origin = Origin {
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            helo: b"client.sim",
            received_unix_s: self.clock_ms / 1000,
        };
        let size = 100 + self.rng.below(12_000) as usize;
        let content: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
        // The record is built for the segment it lands in: place first, then build.
        let len = gannet_spool::align_up(build_message_record(0, &envelope, origin, &content).len() as u64);
        match self.reserve(len) {
            Some(placement) => {
                let record = build_message_record(placement.seq, &envelope, origin, &content);
                assert_eq!(record.len() as u64, len);
                let id = MessageId::new(placement.seq, 0, placement.offset);
                self.submitted.insert(
                    id,
                    Submitted {
                        record: record.clone(),
                        recipients: n,
                        acked: false,
                        gone: false,
                    },
                );
                self.tasks.push(Task::Message {
                    placement,
                    record,
                    halves_written: 0,
                });
            }
            None => self.waiting_clients = (self.waiting_clients + 1).min(self.config.clients),
        }
        true
    }

    /// Finishes some recipients of a random live message (as delivery would).
    fn deliver_some(&mut self) -> bool {
        // Sorted: the index is a hash map, and a seed must replay exactly.
        let mut ids: Vec<MessageId> = self.queue.ids().collect();
        ids.sort();
        if ids.is_empty() {
            return false;
        }
        let id = ids[self.rng.below(ids.len() as u64) as usize];
        let recipients = self.queue.get(&id).map_or(0, |m| m.done.len());
        for r in 0..recipients as u32 {
            if self.rng.chance(60) && !self.queue.get(&id).is_some_and(|m| m.done.contains(r as usize)) {
                self.finished.insert((id, r), false);
                let last = self.queue.recipient_done(id, r);
                self.state_pending.push(StateEntry { id, recipient: r });
                if last {
                    self.queue.finish(id);
                    self.state_pending.push(StateEntry {
                        id,
                        recipient: u32::MAX,
                    });
                    break;
                }
            }
        }
        true
    }

    fn write_state(&mut self) -> bool {
        let entries = std::mem::take(&mut self.state_pending);
        let (outcomes, tombstones): (Vec<StateEntry>, Vec<StateEntry>) =
            entries.iter().partition(|e| e.recipient != u32::MAX);
        let (kind, batch, rest) = if outcomes.is_empty() {
            (Kind::Tombstone, tombstones, Vec::new())
        } else {
            (Kind::Outcome, outcomes, tombstones)
        };
        let len = gannet_spool::align_up(build_state_record(0, kind, &batch).len() as u64);
        match self.reserve(len) {
            Some(placement) => {
                let record = build_state_record(placement.seq, kind, &batch);
                self.tasks.push(Task::State {
                    placement,
                    record,
                    entries: batch,
                });
                self.state_pending = rest;
            }
            None => self.state_pending = entries,
        }
        true
    }

    fn collect(&mut self) -> bool {
        let live = |seq| self.queue.segment_is_live(0, seq);
        let Some(seq) = self.policy.collectable(&live) else {
            return false;
        };
        self.report.disk_ops += 2;
        self.disk.remove(&dir_name(seq));
        self.disk.dir_sync();
        self.policy.deleted(seq);
        true
    }

    /// Advances a random task by one disk operation.
    fn advance_task(&mut self) -> bool {
        if self.tasks.is_empty() {
            return false;
        }
        let i = self.rng.below(self.tasks.len() as u64) as usize;
        let task = self.tasks.swap_remove(i);
        self.report.disk_ops += 1;
        match task {
            Task::Message {
                placement,
                record,
                halves_written,
            } => self.advance_message(placement, record, halves_written),
            Task::State {
                placement,
                record,
                entries,
            } => {
                self.disk
                    .write(&dir_name(placement.seq), placement.offset as usize, &record);
                self.policy.write_done(&placement, true);
                self.policy.release(&placement);
                self.state_writes.push(StateWrite {
                    placement,
                    entries,
                    durable: false,
                });
            }
            Task::Prepare { source, seq, step } => self.advance_prepare(source, seq, step),
            Task::Sync { plan, done } => {
                if done < plan.segments.len() {
                    self.disk.fdatasync(&dir_name(plan.segments[done]));
                    self.tasks.push(Task::Sync { plan, done: done + 1 });
                } else {
                    self.end_sync(plan);
                }
            }
        }
        true
    }

    fn advance_message(&mut self, placement: Placement, record: Vec<u8>, halves_written: u8) {
        let name = dir_name(placement.seq);
        let half = (record.len() / 2)
            .next_multiple_of(crate::disk::SECTOR_BYTES)
            .min(record.len());
        match halves_written {
            0 => {
                self.disk.write(&name, placement.offset as usize, &record[..half]);
                self.tasks.push(Task::Message {
                    placement,
                    record,
                    halves_written: 1,
                });
            }
            1 => {
                self.disk
                    .write(&name, placement.offset as usize + half, &record[half..]);
                self.policy.write_done(&placement, true);
                self.tasks.push(Task::Message {
                    placement,
                    record,
                    halves_written: 2,
                });
            }
            _ => match self.policy.ack(&placement) {
                Ack::Pending => {
                    self.report.disk_ops -= 1;
                    self.tasks.push(Task::Message {
                        placement,
                        record,
                        halves_written: 2,
                    });
                }
                Ack::Failed => {
                    self.policy.release(&placement);
                }
                Ack::Durable => {
                    let id = MessageId::new(placement.seq, 0, placement.offset);
                    let submitted = self.submitted.get_mut(&id).expect("submitted");
                    submitted.acked = true;
                    self.report.acknowledged += 1;
                    let (_, env_bytes) = envelope_of(&submitted.record, placement.seq);
                    self.queue.insert(gannet_sched::QueuedMessage::new(id, 0, 0, env_bytes));
                    self.policy.release(&placement);
                }
            },
        }
    }

    /// Creating: create the temporary file (zeros), fdatasync, rename, directory sync.
    /// Recycling: rename out of sight, directory sync, zero the used part, fdatasync, rename,
    /// directory sync. As `src/spool/appender.rs` does.
    fn advance_prepare(&mut self, source: Source, seq: u64, step: u8) {
        let tmp = format!("{}.tmp", dir_name(seq));
        let seg_bytes = self.config.segment_bytes as usize;
        let last = match source {
            Source::Create => {
                match step {
                    0 => self.disk.create(&tmp, seg_bytes),
                    1 => self.disk.fdatasync(&tmp),
                    2 => self.disk.rename(&tmp, &dir_name(seq)),
                    _ => self.disk.dir_sync(),
                }
                step >= 3
            }
            Source::Recycle {
                old_seq, zero_bytes, ..
            } => {
                match step {
                    0 => self.disk.rename(&dir_name(old_seq), &tmp),
                    1 => self.disk.dir_sync(),
                    2 => self.disk.write(&tmp, 0, &vec![0; (zero_bytes as usize).min(seg_bytes)]),
                    3 => self.disk.fdatasync(&tmp),
                    4 => self.disk.rename(&tmp, &dir_name(seq)),
                    _ => self.disk.dir_sync(),
                }
                step >= 5
            }
        };
        if last {
            self.policy.prepared(seq, source == Source::Create);
            self.waiting_clients = 0;
        } else {
            self.tasks.push(Task::Prepare {
                source,
                seq,
                step: step + 1,
            });
        }
    }

    fn end_sync(&mut self, plan: SyncPlan) {
        for w in &mut self.state_writes {
            if w.placement.ticket < plan.target && plan.segments.contains(&w.placement.seq) {
                w.durable = true;
                for e in &w.entries {
                    if e.recipient == u32::MAX {
                        let recipients = self.submitted.get(&e.id).map_or(0, |s| s.recipients) as u32;
                        for r in 0..recipients {
                            if let Some(d) = self.finished.get_mut(&(e.id, r)) {
                                *d = true;
                                self.finished_by.insert((e.id, r), w.placement);
                            }
                        }
                    } else if let Some(d) = self.finished.get_mut(&(e.id, e.recipient)) {
                        *d = true;
                        self.finished_by.insert((e.id, e.recipient), w.placement);
                    }
                }
            }
        }
        self.state_writes.retain(|w| !w.durable);
        self.policy.end_sync(plan, &[]);
    }
}

/// The envelope bytes of a record (the sim builds every record itself, so it parses).
fn envelope_of(record: &[u8], seq: u64) -> (usize, gannet_spool::record::EnvelopeBytes) {
    let checked = verify_message_record(record, seq).expect("our own record");
    let (envelope, _) = gannet_spool::record::split_envelope(checked.payload).expect("our own envelope");
    (
        checked.payload_offset,
        gannet_spool::record::EnvelopeBytes::new(envelope).expect("our own envelope"),
    )
}

/// Recovery as the server runs it: half-made segments deleted, segments scanned oldest first
/// into the queue index. Returns the index and the segments found.
fn recover(disk: &mut SimDisk) -> (QueueIndex, Vec<ExistingSegment>, u64) {
    for name in disk.list() {
        if name.ends_with(".seg.tmp") {
            disk.remove(&name);
        }
    }
    disk.dir_sync();
    let mut segments: Vec<(u64, String)> = disk
        .list()
        .into_iter()
        .filter_map(|n| parse_segment_file_name(&n).map(|seq| (seq, n)))
        .collect();
    segments.sort();
    let mut index = QueueIndex::default();
    let mut existing = Vec::new();
    let mut next_seq = 0;
    for (seq, name) in segments {
        let bytes = disk.read(&name);
        index.apply_segment(scan_segment(bytes, 0, seq));
        existing.push(ExistingSegment {
            seq,
            len_bytes: bytes.len() as u64,
        });
        next_seq = next_seq.max(seq + 1);
    }
    (index, existing, next_seq)
}

impl World<'_> {
    /// Crashes the machine, recovers, checks, and sets the world up to go on.
    fn crash_and_check(&mut self, epoch: usize) {
        self.report.crashes += 1;
        let mut disk = self.disk.crash(&mut self.rng, self.config.crash);
        let (index, existing, next_seq) = recover(&mut disk);
        self.report.recovered += index.len() as u64;
        let mut violations = Vec::new();
        for id in index.ids() {
            let Some(submitted) = self.submitted.get(&id) else {
                violations.push(format!("epoch {epoch}: {id} recovered but never submitted"));
                continue;
            };
            if submitted.gone {
                violations.push(format!(
                    "epoch {epoch}: {id} came back after an earlier recovery lost it"
                ));
            }
            // Header and payload: the padding after them carries nothing (a flipped bit there is
            // harmless, and the CRC rightly ignores it).
            let name = dir_name(id.segment_seq);
            let meaningful = gannet_spool::record::HEADER_BYTES
                + u32::from_le_bytes(submitted.record[..4].try_into().unwrap()) as usize;
            let on_disk = &disk.read(&name)[id.offset_bytes() as usize..][..meaningful];
            if on_disk != &submitted.record[..meaningful] {
                violations.push(format!("epoch {epoch}: {id} recovered with other bytes than written"));
            }
        }
        for (id, s) in &self.submitted {
            if !s.acked {
                continue;
            }
            let unfinished = (0..s.recipients as u32).any(|r| !self.finished.contains_key(&(*id, r)));
            if unfinished && index.get(id).is_none() {
                violations.push(format!("epoch {epoch}: acknowledged {id} lost"));
            }
        }
        for (&(id, r), &durable) in &self.finished {
            let pending_again = index.get(&id).is_some_and(|m| !m.done.contains(r as usize));
            match (pending_again, durable) {
                (true, true) => violations.push(format!(
                    "epoch {epoch}: {id} recipient {r} finished durably (by the record at {:?}) but pending again; segments now {:?}",
                    self.finished_by.get(&(id, r)),
                    disk.list()
                )),
                (true, false) => self.report.duplicates += 1,
                _ => {}
            }
        }
        self.report.violations.extend(violations);
        // Go on from the recovered spool: what it holds is what the next epoch has.
        let config = self.policy.config().to_owned();
        self.policy = CommitPolicy::new(config, &existing, next_seq.max(self.clock_ms));
        self.disk = disk;
        self.finished.retain(|(id, _), _| index.get(id).is_some());
        for ((id, r), durable) in &mut self.finished {
            *durable = index.get(id).is_some_and(|m| m.done.contains(*r as usize));
        }
        for (id, s) in &mut self.submitted {
            let recovered = index.get(id).is_some();
            s.acked = recovered;
            s.gone |= !recovered;
        }
        self.queue = index;
        self.tasks.clear();
        self.state_writes.clear();
        self.state_pending.clear();
        self.waiting_clients = 0;
        if self.policy.begin_first_prepare() {
            self.start_first(epoch);
        }
    }

    /// The first segment of an epoch, prepared to the end at once.
    fn start_first(&mut self, _epoch: usize) {
        let live = |seq| self.queue.segment_is_live(0, seq);
        let source = self.policy.source(false, &live);
        if source == Source::Create && !self.policy.may_create() {
            self.policy.prepare_failed(CommitError::NoSpace, false);
            return;
        }
        let seq = self.policy.new_seq(self.clock_ms);
        self.tasks.push(Task::Prepare { source, seq, step: 0 });
    }
}

/// Runs one seed; the report's `violations` are empty when every check held.
pub fn run(seed: u64, config: &SpoolSimConfig) -> SpoolReport {
    let policy = CommitPolicy::new(
        CommitConfig {
            segment_bytes: config.segment_bytes,
            segments_max: config.segments_max,
            sync: true,
            ack_before_sync: config.broken,
        },
        &[],
        1,
    );
    let mut world = World {
        config,
        rng: SimRng::new(seed),
        disk: SimDisk::new(),
        policy,
        queue: QueueIndex::default(),
        submitted: HashMap::new(),
        finished: BTreeMap::new(),
        finished_by: BTreeMap::new(),
        state_writes: Vec::new(),
        state_pending: Vec::new(),
        tasks: Vec::new(),
        waiting_clients: 0,
        report: SpoolReport::default(),
        clock_ms: 1_000,
    };
    if world.policy.begin_first_prepare() {
        world.start_first(0);
    }
    for epoch in 0..config.epochs {
        let crash_at = config.steps_max / 4 + world.rng.below(config.steps_max as u64 * 3 / 4) as usize;
        let mut idle = 0;
        for _ in 0..crash_at {
            if world.step() {
                idle = 0;
            } else {
                idle += 1;
                assert!(idle < 10_000, "seed {seed}: the world stopped making progress");
            }
        }
        world.crash_and_check(epoch);
    }
    world.report
}
