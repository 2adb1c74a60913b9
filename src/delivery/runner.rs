//! The per-shard queue runner: every message a shard spools is delivered by that shard.
//!
//! Recipients are grouped by destination (the route's smarthost) into jobs; each destination has
//! a queue of jobs, at most `connections_per_destination_max` worker tasks, and a pool of idle
//! connections reused for up to `messages_per_connection_max` messages. Outcomes are batched into
//! spool state records; a message with no recipient left gets a tombstone, and segments whose
//! messages are all finished are deleted.
//!
//! Retries: a message with deferred recipients waits `retry_first`, then twice as long each time
//! (plus up to 10% jitter) up to `retry_max`, until `queue_lifetime` has passed, when its
//! remaining recipients fail for good. A destination that cannot be reached defers every job
//! queued for it at once, so a dead host costs one connection attempt, not one per message.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use glommio::io::{DmaFile, OpenOptions, ReadResult};
use glommio::net::TcpStream;
use tracing::{info, warn};

use super::client::{
    Capabilities, OutboundEnvelope, RecipientResult, ReplyParser, ServerReply, Transaction, TxStep, Unsendable,
};
use super::lanes::{Lane, Lanes};
use crate::config::{Config, RouteTarget};
use crate::dns::mx::{self, MxError};
use crate::dns::resolver::Resolver;
use crate::dsn::{self, build_bounce, BounceContext, FailedRecipient};
use crate::queue::{QueueIndex, QueuedMessage};
use crate::smtp::data::dot_stuff;
use crate::smtp::envelope::BodyType;
use crate::smtp::envelope::{Envelope, Origin, Ret};
use crate::smtp::session::MessageSink;
use crate::spool::appender::{Appender, WrittenRecord};
use crate::spool::record::{
    crc_start, decode_message, split_message_payload, CopyOf, Deferral, Header, Kind, StateEntry, StoredEnvelope,
    HEADER_BYTES,
};
use crate::spool::{segment_file_name, shard_dir, MessageId};

/// Copy forward only when the oldest segment's unfinished messages take at most this fraction
/// (1/N) of a segment.
const COPY_FORWARD_LIVE_FRACTION_MAX: u64 = 4;
/// How often due retries and idle connections are looked at.
const TICK: Duration = Duration::from_millis(500);
/// Read buffer for replies.
const REPLY_BUFFER_BYTES: usize = 8 * 1024;
/// How long finished deliveries gather before their state records are written. Every record is
/// an O_DIRECT write (a block request and, on a VM, a doorbell exit): written at once, a busy
/// shard wrote one or two per message; gathered, one per shard per interval. A crash loses at
/// most this much state, which only repeats those deliveries (the records are never waited on).
const STATE_GATHER: Duration = Duration::from_millis(10);

/// A message as read back from the spool, shared between delivery and its bounce.
type Original = Option<Rc<Loaded>>;

/// A message read back from its segment: the read buffer itself, not a copy.
pub struct Loaded {
    envelope: StoredEnvelope,
    bytes: Body,
    content_offset: usize,
}

/// Where a loaded record's bytes are: read back from the segment, or kept from the commit.
enum Body {
    Read(ReadResult),
    Memory(Vec<u8>),
}

impl Loaded {
    fn content(&self) -> &[u8] {
        match &self.bytes {
            Body::Read(r) => &r[self.content_offset..],
            Body::Memory(v) => &v[self.content_offset..],
        }
    }
}

/// Records at most this long are kept in memory after their commit, for their first delivery.
pub const CACHED_RECORD_BYTES_MAX: usize = 64 * 1024;
/// Memory per shard for such records.
const CACHE_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Recipients of one message that go to one destination.
#[derive(Debug, Clone)]
struct Job {
    id: MessageId,
    recipients: Vec<u32>,
    lane: Lane,
    /// Already put back once because a pooled connection turned out to be dead.
    retried_on_fresh_connection: bool,
}

impl Job {
    /// The job's transaction envelope: its recipients of `envelope`, and the content's size.
    fn outbound<'a>(&self, envelope: &'a StoredEnvelope, content_bytes: u64) -> OutboundEnvelope<'a> {
        OutboundEnvelope {
            sender: &envelope.sender,
            recipients: self
                .recipients
                .iter()
                .map(|&i| (i, &envelope.recipients[i as usize].address[..]))
                .collect(),
            content_bytes,
            eightbit: envelope.body == BodyType::EightBitMime,
            smtputf8: envelope.smtputf8,
        }
    }

    /// The same result for every recipient of the job (the connection or the route failed).
    fn every_recipient(&self, result: impl Fn() -> RecipientResult) -> Vec<(u32, RecipientResult)> {
        self.recipients.iter().map(|&i| (i, result())).collect()
    }
}

struct Destination {
    pending: Lanes<Job>,
    workers: usize,
    idle: Vec<(OutboundConnection, Instant)>,
    connections_max: usize,
    messages_per_connection_max: usize,
    /// Time between messages when a rate is set (`[[destination]] messages_per_second`).
    send_interval: Option<Duration>,
    /// When the next message may start, under the rate.
    next_send: Option<Instant>,
}

impl Destination {
    /// A destination with the limits of the first `[[destination]]` rule that matches it.
    fn new(config: &Config, key: &DestinationKey, shard_count: usize) -> Destination {
        let rule = config.destination_limits(&key.name());
        let process_wide = rule
            .and_then(|r| r.connections_max)
            .unwrap_or(config.delivery.connections_per_destination_max);
        Destination {
            pending: Lanes::default(),
            workers: 0,
            idle: Vec::new(),
            // Each shard takes its share of the process-wide cap, rounded up.
            connections_max: process_wide.div_ceil(shard_count.max(1)).max(1),
            messages_per_connection_max: rule
                .and_then(|r| r.messages_per_connection_max)
                .unwrap_or(config.delivery.messages_per_connection_max),
            send_interval: rule
                .and_then(|r| r.messages_per_second)
                .map(|rate| Duration::from_secs_f64(1.0 / rate)),
            next_send: None,
        }
    }

    /// How long to wait before the next message may go, reserving its slot.
    fn wait_for_rate(&mut self, now: Instant) -> Duration {
        let Some(interval) = self.send_interval else {
            return Duration::ZERO;
        };
        let at = self.next_send.map_or(now, |t| t.max(now));
        self.next_send = Some(at + interval);
        at.saturating_duration_since(now)
    }
}

#[derive(Default)]
struct PendingState {
    outcomes: Vec<StateEntry>,
    tombstones: Vec<StateEntry>,
    deferrals: Vec<Deferral>,
    flushing: bool,
}

pub struct Deliverer {
    shard: u16,
    config: Arc<Config>,
    appender: Rc<Appender>,
    queue: Rc<RefCell<QueueIndex>>,
    destinations: RefCell<HashMap<DestinationKey, Destination>>,
    resolver: Resolver,
    retries: RefCell<BTreeSet<(Instant, MessageId)>>,
    state: RefCell<PendingState>,
    readers: RefCell<HashMap<(u16, u64), Rc<DmaFile>>>,
    jitter_seed: Cell<u64>,
    shard_count: usize,
    /// Delivering connections (workers) over all destinations.
    workers_total: Cell<usize>,
    /// Records kept from their commit for their first delivery, and their bytes.
    cache: RefCell<HashMap<MessageId, WrittenRecord>>,
    cache_bytes: Cell<usize>,
    /// A copy-forward pass is running (see `copy_forward`).
    copying: Cell<bool>,
    /// The last state batch could not be written (logged once per change).
    state_write_failing: Cell<bool>,
}

fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where a job goes: a smarthost, or a domain's MX hosts. Queues, workers and pools are per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DestinationKey {
    Smarthost(SocketAddr),
    Mx(String),
}

impl DestinationKey {
    /// What `[[destination]]` rules match: the smarthost's `IP:port`, or the domain.
    fn name(&self) -> String {
        match self {
            DestinationKey::Smarthost(addr) => addr.to_string(),
            DestinationKey::Mx(domain) => domain.clone(),
        }
    }
}

impl std::fmt::Display for DestinationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DestinationKey::Smarthost(addr) => write!(f, "{addr}"),
            DestinationKey::Mx(domain) => write!(f, "MX of {domain}"),
        }
    }
}

/// The permanent failure for a message that server `addr` cannot take at all.
fn unsendable_reply(unsendable: Unsendable, addr: SocketAddr, content_bytes: u64) -> ServerReply {
    match unsendable {
        Unsendable::TooBig { limit } => ServerReply::new(
            552,
            &format!("message of {content_bytes} bytes exceeds {addr}'s SIZE limit of {limit}"),
        ),
        Unsendable::NeedsSmtpUtf8 => ServerReply::new(
            553,
            &format!("{addr} does not offer SMTPUTF8, which this message's addresses need"),
        ),
        Unsendable::Needs8BitMime => ServerReply::new(
            554,
            &format!("5.6.3 {addr} does not offer 8BITMIME, which this message (BODY=8BITMIME) needs; Gannet does not re-encode messages"),
        ),
    }
}

/// A reply text such as `550 5.1.2 ...` as a reply.
fn reply_from_text(text: &str) -> ServerReply {
    let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(451);
    ServerReply::new(code, text.get(4..).unwrap_or(text))
}

/// The domain of an address as stored (`local@domain`); empty for `<Postmaster>`.
fn domain_of(address: &[u8]) -> &[u8] {
    match address.iter().rposition(|&b| b == b'@') {
        Some(at) => &address[at + 1..],
        None => &[],
    }
}

impl Deliverer {
    pub fn new(
        shard: u16,
        shard_count: usize,
        config: Arc<Config>,
        appender: Rc<Appender>,
        queue: Rc<RefCell<QueueIndex>>,
        resolver: Resolver,
    ) -> Rc<Deliverer> {
        Rc::new(Deliverer {
            shard_count,
            workers_total: Cell::new(0),
            cache: RefCell::new(HashMap::new()),
            cache_bytes: Cell::new(0),
            shard,
            copying: Cell::new(false),
            state_write_failing: Cell::new(false),
            resolver,
            config,
            appender,
            queue,
            destinations: RefCell::new(HashMap::new()),
            retries: RefCell::new(BTreeSet::new()),
            state: RefCell::new(PendingState::default()),
            readers: RefCell::new(HashMap::new()),
            jitter_seed: Cell::new(u64::from(shard) + 0x9E37_79B9_7F4A_7C15),
        })
    }

    /// Starts the timer task and schedules everything recovered from the spool.
    pub fn start(self: &Rc<Self>) {
        // Deferred messages keep their retry time across a restart; the rest go now.
        let now_unix_s = unix_now_s();
        let now = Instant::now();
        let waiting: Vec<(MessageId, Option<u64>)> = {
            let queue = self.queue.borrow();
            queue
                .ids()
                .map(|id| (id, queue.get(&id).and_then(|m| m.next_attempt_unix_s)))
                .collect()
        };
        let mut deferred = 0usize;
        for (id, next_attempt_unix_s) in waiting {
            match next_attempt_unix_s {
                Some(at) if at > now_unix_s => {
                    let delay = Duration::from_secs(at - now_unix_s);
                    self.retries.borrow_mut().insert((now + delay, id));
                    deferred += 1;
                }
                _ => self.schedule(id),
            }
        }
        if deferred > 0 {
            info!(
                shard = self.shard,
                "{deferred} recovered message(s) wait for their next attempt"
            );
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(TICK).await;
                me.tick();
            }
        })
        .detach();
    }

    pub fn queued(&self) -> usize {
        self.queue.borrow().len()
    }

    /// Takes a newly spooled message and starts delivering it.
    pub fn accept(self: &Rc<Self>, message: QueuedMessage) {
        self.accept_written(message, None);
    }

    /// Whether a just-committed record of `len` bytes may be kept for its first delivery.
    pub fn wants_record(&self, len: usize) -> bool {
        len <= CACHED_RECORD_BYTES_MAX && self.cache_bytes.get() + len <= CACHE_BYTES_MAX
    }

    /// Takes a newly spooled message with the buffers it was written from (see `wants_record`).
    pub fn accept_written(self: &Rc<Self>, message: QueuedMessage, record: Option<WrittenRecord>) {
        let id = message.id;
        self.queue.borrow_mut().insert(message);
        if let Some(record) = record {
            self.cache_bytes.set(self.cache_bytes.get() + record.len);
            self.cache.borrow_mut().insert(id, record);
        }
        self.schedule(id);
    }

    /// Retries every deferred message now (`gannet queue flush`). Returns how many.
    pub fn retry_all_now(self: &Rc<Self>) -> usize {
        let waiting: Vec<MessageId> = std::mem::take(&mut *self.retries.borrow_mut())
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        for &id in &waiting {
            self.schedule(id);
        }
        waiting.len()
    }

    fn tick(self: &Rc<Self>) {
        let now = Instant::now();
        let due: Vec<MessageId> = {
            let mut retries = self.retries.borrow_mut();
            let mut due = Vec::new();
            while let Some(&(at, id)) = retries.first() {
                if at > now {
                    break;
                }
                retries.pop_first();
                due.push(id);
            }
            due
        };
        for id in due {
            self.schedule(id);
        }
        if self.copy_forward_wanted() {
            let me = self.clone();
            glommio::spawn_local(async move {
                if me.copy_forward().await > 0 {
                    // The tombstones go out, then the old segment is collected.
                    me.flush_state_soon();
                }
            })
            .detach();
        }
        let idle_timeout = self.config.delivery.idle_timeout.0;
        for destination in self.destinations.borrow_mut().values_mut() {
            // Dropping a connection closes it; a polite QUIT is not worth a task per socket.
            destination.idle.retain(|(_, since)| since.elapsed() < idle_timeout);
        }
    }

    /// Retry delay after `attempts` failed attempts: doubling from retry_first up to retry_max,
    /// plus up to 10% jitter so that retries of a burst do not come back as a burst.
    fn backoff(&self, attempts: u32) -> Duration {
        let d = &self.config.delivery;
        let base = d
            .retry_first
            .0
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        let base = base.min(d.retry_max.0);
        let x = self.next_random();
        base + base.mul_f64((x % 1000) as f64 / 10_000.0)
    }

    /// xorshift64: jitter and shuffling only, never security.
    fn next_random(&self) -> u64 {
        let mut x = self.jitter_seed.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.jitter_seed.set(x);
        x
    }

    /// Drops a message's kept record, if any (delivered, deferred or gone).
    fn uncache(&self, id: &MessageId) -> Option<WrittenRecord> {
        let record = self.cache.borrow_mut().remove(id)?;
        self.cache_bytes.set(self.cache_bytes.get() - record.len);
        Some(record)
    }

    fn retry_later(&self, message: &mut QueuedMessage) {
        self.uncache(&message.id);
        message.attempts += 1;
        let delay = self.backoff(message.attempts);
        self.retries.borrow_mut().insert((Instant::now() + delay, message.id));
        let next_attempt_unix_s = unix_now_s() + delay.as_secs();
        message.next_attempt_unix_s = Some(next_attempt_unix_s);
        self.state.borrow_mut().deferrals.push(Deferral {
            id: message.id,
            attempts: message.attempts,
            next_attempt_unix_s,
            delay_notified: message.delay_notified,
        });
    }

    /// Groups a message's pending recipients by destination and queues the jobs.
    fn schedule(self: &Rc<Self>, id: MessageId) {
        let mut groups: Vec<(DestinationKey, Vec<u32>)> = Vec::new();
        let mut unrouted: Vec<u32> = Vec::new();
        let lane;
        {
            let mut queue = self.queue.borrow_mut();
            let Some(message) = queue.get_mut(&id) else { return };
            if message.jobs_outstanding > 0 {
                return;
            }
            for (i, recipient) in message.envelope.recipients.iter().enumerate() {
                if message.done[i] {
                    continue;
                }
                let domain = domain_of(&recipient.address);
                let key = match self.config.route(domain) {
                    Some(RouteTarget::Smarthost(addr)) => Some(DestinationKey::Smarthost(addr)),
                    Some(RouteTarget::Mx) if !domain.is_empty() => {
                        Some(DestinationKey::Mx(String::from_utf8_lossy(domain).to_ascii_lowercase()))
                    }
                    _ => None,
                };
                match key {
                    Some(key) => match groups.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, list)) => list.push(i as u32),
                        None => groups.push((key, vec![i as u32])),
                    },
                    None => unrouted.push(i as u32),
                }
            }
            message.jobs_outstanding = groups.len() as u32 + u32::from(!unrouted.is_empty());
            lane = if message.envelope.sender.is_empty() {
                Lane::Bounce
            } else if message.attempts > 0 {
                Lane::Retry
            } else {
                Lane::Fresh
            };
        }
        for (addr, recipients) in groups {
            self.destinations
                .borrow_mut()
                .entry(addr.clone())
                .or_insert_with(|| Destination::new(&self.config, &addr, self.shard_count))
                .pending
                .push_back(
                    lane,
                    Job {
                        id,
                        recipients,
                        lane,
                        retried_on_fresh_connection: false,
                    },
                );
            self.kick(addr);
        }
        if !unrouted.is_empty() {
            // No route: a deferral like any other, so that retries, expiry and the bounce after
            // delivery.queue_lifetime follow the same path. After the borrows: glommio runs
            // the task at once.
            let job = Job {
                id,
                recipients: unrouted,
                lane,
                retried_on_fresh_connection: false,
            };
            let me = self.clone();
            glommio::spawn_local(async move {
                let reply = ServerReply::new(
                    451,
                    "4.4.0 no route for the recipient's domain (no [[route]] matches it)",
                );
                let results = job.every_recipient(|| RecipientResult::Deferred(reply.clone()));
                me.finish_job(&job, results, None, None).await;
            })
            .detach();
        }
    }

    /// Starts a worker for a destination if it has work and room for one.
    fn kick(self: &Rc<Self>, addr: DestinationKey) {
        let start = {
            let mut destinations = self.destinations.borrow_mut();
            let d = destinations
                .entry(addr.clone())
                .or_insert_with(|| Destination::new(&self.config, &addr, self.shard_count));
            let room = d.workers < d.connections_max
                && self.workers_total.get() < self.config.delivery.connections_per_shard_max;
            if room && !d.pending.is_empty() {
                d.workers += 1;
                self.workers_total.set(self.workers_total.get() + 1);
                true
            } else {
                false
            }
        };
        if start {
            // After the borrow: glommio runs the new task at once.
            glommio::spawn_local(self.clone().worker(addr)).detach();
        }
    }

    /// AUTH credentials for a smarthost, if its route has them.
    fn credentials(&self, addr: SocketAddr) -> Option<(&str, &str)> {
        self.config
            .routes
            .iter()
            .find(|r| r.smarthost == Some(addr) && r.auth_user.is_some())
            .and_then(|r| Some((r.auth_user.as_deref()?, r.auth_password.as_deref()?)))
    }

    /// The STARTTLS policy for a destination: required by its route (`tls_required`, or
    /// credentials, which never travel in plaintext), else `delivery.starttls`.
    fn tls_policy(&self, key: &DestinationKey) -> TlsPolicy {
        let required = match key {
            DestinationKey::Smarthost(addr) => self
                .config
                .routes
                .iter()
                .any(|r| r.smarthost == Some(*addr) && (r.tls_required || r.auth_user.is_some())),
            DestinationKey::Mx(domain) => self
                .config
                .routes
                .iter()
                .any(|r| r.mx && r.tls_required && (r.domain == "*" || r.domain.eq_ignore_ascii_case(domain))),
        };
        if required {
            TlsPolicy::Required
        } else if self.config.delivery.starttls {
            TlsPolicy::Opportunistic
        } else {
            TlsPolicy::Off
        }
    }

    /// Opens a connection to a destination: the smarthost, or the first MX address that answers
    /// (RFC 5321 5.1: the next address on a connection failure or a bad greeting). The error says
    /// whether the failure is permanent (null MX, no such domain).
    async fn connect(&self, key: &DestinationKey) -> Result<OutboundConnection, (ServerReply, bool)> {
        match key {
            DestinationKey::Smarthost(addr) => {
                OutboundConnection::open(*addr, &self.config, self.tls_policy(key), self.credentials(*addr))
                    .await
                    .map_err(|why| (ServerReply::new(421, &why), false))
            }
            DestinationKey::Mx(domain) => {
                let port = self.config.delivery.mx_port;
                let addresses = match mx::resolve(&self.resolver, domain, port, self.next_random()).await {
                    Ok(a) => a,
                    Err(MxError::Permanent(text)) => return Err((reply_from_text(&text), true)),
                    Err(MxError::Temporary(text)) => return Err((reply_from_text(&text), false)),
                };
                let mut last = String::new();
                for addr in addresses {
                    match OutboundConnection::open(addr, &self.config, self.tls_policy(key), None).await {
                        Ok(c) => return Ok(c),
                        Err(why) => {
                            info!(shard = self.shard, destination = %key, "{why}; trying the next address");
                            last = why;
                        }
                    }
                }
                Err((ServerReply::new(421, &last), false))
            }
        }
    }

    async fn worker(self: Rc<Self>, addr: DestinationKey) {
        let mut connection: Option<OutboundConnection> = None;
        // The connection came from the idle pool and has not carried a message since: the
        // server may have closed it meanwhile.
        let mut unproven = false;
        loop {
            // A job whose envelope already went out on this connection comes first.
            let ahead = connection
                .as_mut()
                .and_then(|c| c.ahead.as_ref().map(|(job, _)| job.clone()));
            let job = ahead.or_else(|| {
                self.destinations
                    .borrow_mut()
                    .get_mut(&addr)
                    .and_then(|d| d.pending.pop())
            });
            let Some(job) = job else { break };
            if connection.is_none() {
                connection = self
                    .destinations
                    .borrow_mut()
                    .get_mut(&addr)
                    .and_then(|d| d.idle.pop())
                    .map(|(c, _)| c);
                unproven = connection.is_some();
            }
            if connection.is_none() {
                match self.connect(&addr).await {
                    Ok(c) => connection = Some(c),
                    Err((reply, permanent)) => {
                        warn!(shard = self.shard, destination = %addr, "cannot deliver: {}; {} what is queued for it", reply.text(), if permanent { "failing" } else { "deferring" });
                        let mut jobs = vec![job];
                        if let Some(d) = self.destinations.borrow_mut().get_mut(&addr) {
                            jobs.extend(d.pending.drain());
                        }
                        for job in jobs {
                            let results = job.every_recipient(|| match permanent {
                                true => RecipientResult::Failed(reply.clone()),
                                false => RecipientResult::Deferred(reply.clone()),
                            });
                            self.finish_job(&job, results, None, None).await;
                        }
                        break;
                    }
                }
            }
            let wait = self
                .destinations
                .borrow_mut()
                .get_mut(&addr)
                .map_or(Duration::ZERO, |d| d.wait_for_rate(Instant::now()));
            if !wait.is_zero() {
                glommio::timer::sleep(wait).await;
            }
            let conn = connection.as_mut().expect("a connection");
            let peer = conn.peer;
            let (results, healthy, original) = self.deliver(conn, &job, &addr).await;
            if !healthy {
                // A job sent ahead on a connection that is going away goes back to the queue.
                if let Some((ahead, _)) = conn.ahead.take() {
                    if let Some(d) = self.destinations.borrow_mut().get_mut(&addr) {
                        d.pending.push_front(ahead.lane, ahead);
                    }
                }
            }
            let dead_pooled_connection = !healthy
                && unproven
                && !job.retried_on_fresh_connection
                && results.iter().all(|(_, r)| matches!(r, RecipientResult::Deferred(_)));
            if dead_pooled_connection {
                // Not the message's fault: try it once more, at once, on a fresh connection.
                let mut job = job;
                job.retried_on_fresh_connection = true;
                if let Some(d) = self.destinations.borrow_mut().get_mut(&addr) {
                    d.pending.push_front(job.lane, job);
                    // Its idle siblings most likely died with it (a restarted server).
                    d.idle.clear();
                }
                connection = None;
                continue;
            }
            unproven = false;
            self.finish_job(&job, results, Some(peer), original).await;
            let messages_max = self
                .destinations
                .borrow()
                .get(&addr)
                .map_or(self.config.delivery.messages_per_connection_max, |d| {
                    d.messages_per_connection_max
                });
            if !healthy || conn.messages >= messages_max {
                if healthy {
                    conn.quit().await;
                }
                connection = None;
            }
        }
        let mut destinations = self.destinations.borrow_mut();
        let d = destinations.get_mut(&addr).expect("the worker's destination");
        if let Some(c) = connection {
            d.idle.push((c, Instant::now()));
        }
        d.workers -= 1;
        self.workers_total.set(self.workers_total.get() - 1);
        // A shard-wide place is free: give it to a destination that has been waiting for one.
        let waiting = destinations
            .iter()
            .find(|(_, d)| !d.pending.is_empty() && d.workers < d.connections_max)
            .map(|(k, _)| k.clone());
        drop(destinations);
        if let Some(key) = waiting {
            self.kick(key);
        }
    }

    /// Whether the oldest segment pins the spool: the shard has `spool.copy_forward_segments`
    /// segments or more and the oldest still holds unfinished messages. Cheap; checked every tick.
    fn copy_forward_wanted(&self) -> bool {
        let threshold = self.config.spool.copy_forward_segments;
        if threshold == 0 || self.copying.get() || self.appender.segment_count() < threshold {
            return false;
        }
        self.appender
            .oldest_sealed()
            .is_some_and(|seq| self.queue.borrow().segment_is_live(self.shard, seq))
    }

    /// Copies the unfinished messages of the oldest segment into the newest one, so that the
    /// oldest can be deleted: without this, one long-deferred message would keep its segment and
    /// every newer one on disk until it is finished. Only messages waiting for a retry are
    /// copied (nothing else touches them meanwhile), and only when they are a small part of the
    /// segment (a segment full of deferred mail would just be rewritten again and again).
    /// Returns the number of messages copied.
    async fn copy_forward(self: &Rc<Self>) -> usize {
        let Some(oldest) = self.appender.oldest_sealed() else {
            return 0;
        };
        let ids = self.queue.borrow().messages_in_segment(self.shard, oldest);
        let live_bytes: u64 = {
            let queue = self.queue.borrow();
            ids.iter()
                .filter_map(|id| queue.get(id))
                .map(|m| crate::spool::align_up(u64::from(m.record_bytes)))
                .sum()
        };
        if live_bytes > self.config.spool.segment_size.0 / COPY_FORWARD_LIVE_FRACTION_MAX {
            return 0;
        }
        self.copying.set(true);
        let mut copied = 0;
        for old_id in ids {
            let waiting = {
                let mut retries = self.retries.borrow_mut();
                let entry = retries.iter().find(|(_, id)| *id == old_id).copied();
                if let Some(entry) = entry {
                    retries.remove(&entry);
                }
                entry
            };
            let Some((due, _)) = waiting else {
                continue;
            };
            match self.copy_one(old_id).await {
                Ok(new_id) => {
                    info!(shard = self.shard, id = %old_id, copy = %new_id, "copied forward out of segment {oldest}");
                    self.retries.borrow_mut().insert((due, new_id));
                    copied += 1;
                }
                Err(e) => {
                    warn!(shard = self.shard, id = %old_id, "cannot copy forward now: {e}");
                    self.retries.borrow_mut().insert((due, old_id));
                    break;
                }
            }
        }
        self.copying.set(false);
        copied
    }

    /// Writes a `Copy` record of `old_id` (durably), then puts the copy in its place in the
    /// index and queues the original's tombstone.
    async fn copy_one(self: &Rc<Self>, old_id: MessageId) -> Result<MessageId, String> {
        let (record_bytes, done) = {
            let queue = self.queue.borrow();
            let m = queue.get(&old_id).ok_or("finished meanwhile")?;
            (m.record_bytes, m.done.clone())
        };
        let (bytes, message_start) = self.read_record(old_id, record_bytes).await?;
        let copy = CopyOf {
            moved_from: old_id,
            done,
        };
        let mut buffer = self.appender.message_buffer();
        buffer
            .begin_copy(&copy)
            .and_then(|()| buffer.append(&bytes[message_start..]))
            .map_err(|_| "no spool memory free".to_string())?;
        let message = buffer.take();
        let new_record_bytes = message.record_len();
        let new_id = self
            .appender
            .commit(message)
            .await
            .map_err(|e| format!("spool: {e:?}"))?;
        // Durable: from here on recovery prefers the copy, whatever else survives a crash.
        let mut queue = self.queue.borrow_mut();
        let Some(mut message) = queue.finish(old_id) else {
            // Cannot happen (nothing finishes a message waiting for a retry); if it did, the
            // copy must not bring it back.
            drop(queue);
            self.state.borrow_mut().tombstones.push(StateEntry {
                id: new_id,
                recipient: 0,
            });
            return Err("finished while being copied".into());
        };
        message.id = new_id;
        message.record_bytes = new_record_bytes;
        let deferral = message.next_attempt_unix_s.map(|next_attempt_unix_s| Deferral {
            id: new_id,
            attempts: message.attempts,
            next_attempt_unix_s,
            delay_notified: message.delay_notified,
        });
        queue.insert(message);
        drop(queue);
        self.uncache(&old_id);
        let mut state = self.state.borrow_mut();
        state.tombstones.push(StateEntry {
            id: old_id,
            recipient: 0,
        });
        state.deferrals.extend(deferral);
        Ok(new_id)
    }

    /// Reads a message back from its segment and checks it.
    async fn read_message(&self, id: MessageId, record_bytes: u32) -> Result<Loaded, String> {
        let (bytes, message_start) = self.read_record(id, record_bytes).await?;
        let message = decode_message(&bytes[message_start..]).map_err(|e| format!("message {id}: {e:?}"))?;
        Ok(Loaded {
            envelope: message.envelope,
            content_offset: message_start + message.content_offset,
            bytes: Body::Read(bytes),
        })
    }

    /// Reads a record that holds a message (new or copied) and checks its CRC. Returns the
    /// bytes and where the `Message` payload starts in them.
    async fn read_record(&self, id: MessageId, record_bytes: u32) -> Result<(ReadResult, usize), String> {
        let key = (id.shard, id.segment_seq);
        let cached = self.readers.borrow().get(&key).cloned();
        let file = match cached {
            Some(f) => f,
            None => {
                let path = shard_dir(&self.config.spool.directory, id.shard).join(segment_file_name(id.segment_seq));
                let file = OpenOptions::new()
                    .read(true)
                    .dma_open(&path)
                    .await
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let file = Rc::new(file);
                self.readers.borrow_mut().insert(key, file.clone());
                file
            }
        };
        let bytes = file
            .read_at(id.offset_bytes(), record_bytes as usize)
            .await
            .map_err(|e| format!("cannot read message {id}: {e}"))?;
        if bytes.len() != record_bytes as usize {
            return Err(format!("message {id}: short read"));
        }
        let header = Header::decode(bytes[..HEADER_BYTES].try_into().unwrap());
        let payload = &bytes[HEADER_BYTES..];
        let crc = crc32c::crc32c_append(crc_start(id.segment_seq, header.len, header.kind), payload);
        if !Kind::holds_message(header.kind) || header.len as usize != payload.len() || crc != header.crc {
            return Err(format!("message {id}: record fails its checks"));
        }
        let (_, message_payload) =
            split_message_payload(header.kind, payload).map_err(|e| format!("message {id}: {e:?}"))?;
        let message_start = HEADER_BYTES + payload.len() - message_payload.len();
        Ok((bytes, message_start))
    }

    /// Runs one transaction. Returns the results, whether the connection can be reused, and the
    /// message as read from the spool (for a bounce).
    async fn deliver(
        &self,
        conn: &mut OutboundConnection,
        job: &Job,
        key: &DestinationKey,
    ) -> (Vec<(u32, RecipientResult)>, bool, Original) {
        let record_bytes = self.queue.borrow().get(&job.id).map(|m| m.record_bytes);
        let defer_all = |why: &str| job.every_recipient(|| RecipientResult::Deferred(ServerReply::new(451, why)));
        // If this job's envelope went out ahead, the server now waits for its content: a job
        // that cannot be sent leaves the connection unusable.
        let sent_ahead = conn.ahead.as_ref().is_some_and(|(j, _)| j.id == job.id);
        let Some(record_bytes) = record_bytes else {
            return (Vec::new(), !sent_ahead, None);
        };
        let kept = self.uncache(&job.id).and_then(|record| {
            // Our own bytes, just written: the envelope is the one in the queue.
            let bytes = record.to_vec();
            let envelope_len = u32::from_le_bytes(bytes.get(HEADER_BYTES..HEADER_BYTES + 4)?.try_into().ok()?) as usize;
            let envelope = self.queue.borrow().get(&job.id)?.envelope.clone();
            Some(Loaded {
                envelope,
                content_offset: HEADER_BYTES + 4 + envelope_len,
                bytes: Body::Memory(bytes),
            })
        });
        let loaded = match kept {
            Some(loaded) => Ok(loaded),
            None => self.read_message(job.id, record_bytes).await,
        };
        let loaded = match loaded {
            Ok(m) => m,
            Err(why) => {
                warn!(shard = self.shard, id = %job.id, "{why}");
                if sent_ahead {
                    conn.ahead = None;
                }
                return (defer_all(&why), !sent_ahead, None);
            }
        };
        // The connection's output buffer is reused from message to message: no fresh pages.
        let mut out = std::mem::take(&mut conn.out);
        out.clear();
        let (results, healthy) = self
            .transact(conn, job, key, &loaded.envelope, loaded.content(), &mut out)
            .await;
        conn.out = out;
        (results, healthy, Some(Rc::new(loaded)))
    }

    async fn transact(
        &self,
        conn: &mut OutboundConnection,
        job: &Job,
        key: &DestinationKey,
        envelope: &StoredEnvelope,
        content: &[u8],
        out: &mut Vec<u8>,
    ) -> (Vec<(u32, RecipientResult)>, bool) {
        let addr = conn.peer;
        let defer_all = |why: &str| job.every_recipient(|| RecipientResult::Deferred(ServerReply::new(451, why)));
        let outbound = job.outbound(envelope, content.len() as u64);
        let resumed = conn.ahead.take_if(|(ahead, _)| ahead.id == job.id).map(|(_, tx)| tx);
        if resumed.is_none() && conn.needs_reset {
            if let Err(why) = conn.command(b"RSET\r\n", self.config.delivery.reply_timeout.0).await {
                return (defer_all(&why), false);
            }
            conn.needs_reset = false;
        }
        let begun = match resumed {
            Some(tx) => Ok(tx),
            None => Transaction::begin(&outbound, &conn.caps, out),
        };
        let mut tx = match begun {
            Ok(tx) => tx,
            Err(unsendable) => {
                let reply = unsendable_reply(unsendable, addr, outbound.content_bytes);
                return (job.every_recipient(|| RecipientResult::Failed(reply.clone())), true);
            }
        };
        let reply_timeout = self.config.delivery.reply_timeout.0;
        let final_timeout = self.config.delivery.final_reply_timeout.0;
        let mut timeout = reply_timeout;
        if tx.wants_content_now() {
            // PIPELINING + CHUNKING: envelope, BDAT and the content in one write.
            out.extend_from_slice(content);
        }
        loop {
            if !out.is_empty() {
                if let Err(why) = conn.send(out).await {
                    tx.broken(&why);
                    return (tx.results().to_vec(), false);
                }
                out.clear();
            }
            let reply = match conn.read_reply(timeout).await {
                Ok(reply) => reply,
                Err(why) => {
                    if tx.broken(&why) {
                        warn!(shard = self.shard, id = %job.id, destination = %addr, "connection lost after the final dot ({why}); the retry may deliver a duplicate");
                    }
                    return (tx.results().to_vec(), false);
                }
            };
            match tx.on_reply(reply, &outbound, out) {
                TxStep::Continue => {
                    timeout = if tx.awaiting_final() {
                        final_timeout
                    } else {
                        reply_timeout
                    }
                }
                TxStep::SendContent => {
                    dot_stuff(content, out);
                    self.send_next_envelope_ahead(conn, key, out);
                    timeout = final_timeout;
                }
                TxStep::SendRaw => {
                    out.extend_from_slice(content);
                    timeout = final_timeout;
                }
                TxStep::Done { needs_reset } => {
                    conn.needs_reset = needs_reset;
                    conn.messages += 1;
                    return (tx.results().to_vec(), true);
                }
            }
        }
    }

    /// Puts the next queued job's MAIL, RCPT and DATA right behind a message's content, so that
    /// its replies come back with the previous message's final reply (RFC 2920 3.1: the content
    /// may be the first command of a group). One round trip per message instead of two, with a
    /// server that pipelines but has no CHUNKING. Not done under a message rate, near the
    /// connection's message limit, or when the job cannot go to this server at all.
    fn send_next_envelope_ahead(&self, conn: &mut OutboundConnection, key: &DestinationKey, out: &mut Vec<u8>) {
        if !conn.caps.pipelining || conn.caps.chunking || conn.ahead.is_some() {
            return;
        }
        let job = {
            let mut destinations = self.destinations.borrow_mut();
            let Some(d) = destinations.get_mut(key) else {
                return;
            };
            if d.send_interval.is_some() || conn.messages + 2 > d.messages_per_connection_max {
                return;
            }
            let Some(job) = d.pending.pop() else {
                return;
            };
            job
        };
        let begun = {
            let queue = self.queue.borrow();
            queue.get(&job.id).and_then(|message| {
                let outbound = job.outbound(&message.envelope, message.content_bytes);
                Transaction::begin(&outbound, &conn.caps, out).ok()
            })
        };
        match begun {
            Some(tx) => conn.ahead = Some((job, tx)),
            None => {
                // It goes the ordinary way (and meets its refusal there).
                if let Some(d) = self.destinations.borrow_mut().get_mut(key) {
                    d.pending.push_front(job.lane, job);
                }
            }
        }
    }

    /// Records a job's results: finished recipients, bounces for failures, the message's fate,
    /// retries, state records. A failed recipient counts as finished only once its bounce is
    /// spooled (or none is wanted); if the bounce cannot be spooled it is retried later.
    async fn finish_job(
        self: &Rc<Self>,
        job: &Job,
        results: Vec<(u32, RecipientResult)>,
        relay: Option<SocketAddr>,
        original: Original,
    ) {
        let relay_text = relay.map_or_else(|| "none".to_string(), |a| a.to_string());
        let lifetime_s = self.config.delivery.queue_lifetime.0.as_secs();
        let mut done: Vec<u32> = Vec::new();
        let mut bounce: Vec<FailedRecipient> = Vec::new();
        let mut delayed: Vec<FailedRecipient> = Vec::new();
        let delay_warning_s = self.config.delivery.delay_warning_after.0.as_secs();
        let (record_bytes, envelope) = {
            let queue = self.queue.borrow();
            let Some(message) = queue.get(&job.id) else { return };
            let age_s = unix_now_s().saturating_sub(message.envelope.received_unix_s);
            let expired = age_s > lifetime_s;
            let warn_delay = delay_warning_s > 0 && age_s >= delay_warning_s && !message.delay_notified;
            for (index, result) in &results {
                let rcpt = String::from_utf8_lossy(&message.envelope.recipients[*index as usize].address).into_owned();
                let failure = match result {
                    RecipientResult::Delivered(reply) => {
                        info!(shard = self.shard, id = %job.id, to = %rcpt, relay = %relay_text, "delivered: {}", reply.text());
                        done.push(*index);
                        None
                    }
                    RecipientResult::Failed(reply) => {
                        warn!(shard = self.shard, id = %job.id, to = %rcpt, relay = %relay_text, "failed for good: {}", reply.text());
                        Some(reply.text())
                    }
                    RecipientResult::Deferred(reply) if expired => {
                        warn!(shard = self.shard, id = %job.id, to = %rcpt, relay = %relay_text, "expired after queue_lifetime: {}", reply.text());
                        Some(format!("{} (gave up after delivery.queue_lifetime)", reply.text()))
                    }
                    RecipientResult::Deferred(reply) => {
                        info!(shard = self.shard, id = %job.id, to = %rcpt, relay = %relay_text, "deferred: {}", reply.text());
                        if warn_delay && dsn::wants_delay_notice(&message.envelope, *index) {
                            delayed.push(FailedRecipient {
                                index: *index,
                                diagnostic: reply.text(),
                                remote_mta: relay.map(|a| a.to_string()),
                            });
                        }
                        None
                    }
                };
                if let Some(diagnostic) = failure {
                    if dsn::wants_failure_notice(&message.envelope, *index) {
                        bounce.push(FailedRecipient {
                            index: *index,
                            diagnostic,
                            remote_mta: relay.map(|a| a.to_string()),
                        });
                    } else {
                        done.push(*index);
                    }
                }
            }
            (message.record_bytes, message.envelope.clone())
        };
        let mut delay_notified = false;
        if !bounce.is_empty() || !delayed.is_empty() {
            let original = match original {
                Some(o) => Some(o),
                None => self.read_message(job.id, record_bytes).await.ok().map(Rc::new),
            };
            let content: &[u8] = original.as_ref().map_or(&[], |o| o.content());
            if !bounce.is_empty() && self.spool_bounce(job.id, &envelope, content, &bounce, "failed").await {
                done.extend(bounce.iter().map(|f| f.index));
            }
            if !delayed.is_empty() {
                delay_notified = self.spool_bounce(job.id, &envelope, content, &delayed, "delayed").await;
            }
        }
        {
            let mut queue = self.queue.borrow_mut();
            let Some(message) = queue.get_mut(&job.id) else { return };
            message.delay_notified |= delay_notified;
            let mut state = self.state.borrow_mut();
            for &index in &done {
                message.done[index as usize] = true;
            }
            message.jobs_outstanding -= 1;
            if message.pending_recipients() == 0 {
                // A finished message needs only its tombstone, not an outcome per recipient.
                state.tombstones.push(StateEntry {
                    id: job.id,
                    recipient: u32::MAX,
                });
                drop(state);
                queue.finish(job.id);
                self.uncache(&job.id);
            } else {
                state.outcomes.extend(done.iter().map(|&index| StateEntry {
                    id: job.id,
                    recipient: index,
                }));
                if message.jobs_outstanding == 0 {
                    drop(state);
                    self.retry_later(message);
                }
            }
        }
        self.flush_state_soon();
    }

    /// Spools a delivery status notification (`action`: "failed" or "delayed") to the original
    /// sender, from the null sender. True once it is durable.
    async fn spool_bounce(
        self: &Rc<Self>,
        original_id: MessageId,
        envelope: &StoredEnvelope,
        content: &[u8],
        failed: &[FailedRecipient],
        action: &str,
    ) -> bool {
        let id_text = original_id.to_string();
        let ctx = BounceContext {
            hostname: &self.config.server.hostname,
            original_id: &id_text,
            now_unix_s: unix_now_s(),
            action,
        };
        let size_max = self.config.limits.message_size_max.0 as usize;
        let mut bytes = build_bounce(&ctx, envelope, content, failed);
        if bytes.len() > size_max {
            // Too big to return whole: fall back to the headers, then to nothing.
            let mut headers_only = envelope.clone();
            headers_only.ret = Ret::Headers;
            bytes = build_bounce(&ctx, &headers_only, content, failed);
            if bytes.len() > size_max {
                bytes = build_bounce(&ctx, &headers_only, &[], failed);
            }
        }
        let mut bounce_envelope = Envelope::default();
        bounce_envelope.add_recipient(|b| b.extend_from_slice(&envelope.sender), 0, b"");
        let hostname = self.config.server.hostname.clone();
        let origin = Origin {
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            helo: hostname.as_bytes(),
            received_unix_s: unix_now_s(),
        };
        let mut buffer = self.appender.message_buffer();
        if buffer.begin(&bounce_envelope, origin).is_err() || buffer.append(&bytes).is_err() {
            warn!(shard = self.shard, id = %original_id, "no memory for a bounce now; the failure will be reported later");
            return false;
        }
        let message = buffer.take();
        let (record_bytes, content_bytes) = (message.record_len(), message.content_bytes);
        match self.appender.commit(message).await {
            Ok(bounce_id) => {
                info!(shard = self.shard, id = %original_id, bounce = %bounce_id, to = %String::from_utf8_lossy(&envelope.sender), "{action} notice queued");
                self.accept(QueuedMessage {
                    id: bounce_id,
                    record_bytes,
                    envelope: StoredEnvelope::from_envelope(&bounce_envelope, origin),
                    done: vec![false],
                    content_bytes,
                    attempts: 0,
                    next_attempt_unix_s: None,
                    jobs_outstanding: 0,
                    delay_notified: false,
                });
                true
            }
            Err(e) => {
                warn!(shard = self.shard, id = %original_id, "cannot spool a bounce ({e:?}); the failure will be reported later");
                false
            }
        }
    }

    /// At shutdown: waits for a state flush in progress, then writes whatever is still batched,
    /// so that a clean stop never repeats a delivery.
    pub async fn flush_state(&self) {
        while self.state.borrow().flushing {
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        self.write_pending_state().await;
    }

    /// Appends the batched outcomes, tombstones and retry schedules. Returns false when there
    /// was nothing to write. Losing state in a crash only repeats deliveries (or brings a retry
    /// early), so failures are logged and the batch dropped.
    async fn write_pending_state(&self) -> bool {
        let (outcomes, tombstones, deferrals) = {
            let mut state = self.state.borrow_mut();
            (
                std::mem::take(&mut state.outcomes),
                std::mem::take(&mut state.tombstones),
                std::mem::take(&mut state.deferrals),
            )
        };
        if outcomes.is_empty() && tombstones.is_empty() && deferrals.is_empty() {
            return false;
        }
        let mut failure = None;
        for (kind, entries) in [(Kind::Outcome, &outcomes), (Kind::Tombstone, &tombstones)] {
            if !entries.is_empty() {
                if let Err(e) = self.appender.append_state(kind, entries).await {
                    failure = Some(e);
                }
            }
        }
        if !deferrals.is_empty() {
            if let Err(e) = self.appender.append_deferrals(&deferrals).await {
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

    /// Writes the batched state records (and then collects garbage) from a task of its own.
    fn flush_state_soon(self: &Rc<Self>) {
        {
            let mut state = self.state.borrow_mut();
            if state.flushing {
                return;
            }
            state.flushing = true;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            // Gather: let other jobs finishing meanwhile add to this batch.
            glommio::timer::sleep(STATE_GATHER).await;
            while me.write_pending_state().await {}
            me.state.borrow_mut().flushing = false;
            let deleted = me.appender.collect_garbage().await;
            if deleted > 0 {
                let queue = me.queue.borrow();
                me.readers
                    .borrow_mut()
                    .retain(|(shard, seq), _| queue.segment_is_live(*shard, *seq));
            }
        })
        .detach();
    }
}

/// One outbound SMTP connection with its read buffer and the server's capabilities.
/// The connection's byte stream: plain TCP, or TLS after STARTTLS.
type Transport = crate::transport::Transport<futures_rustls::client::TlsStream<TcpStream>>;

/// How to treat STARTTLS on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Use it when offered; plaintext otherwise, or when the handshake fails.
    Opportunistic,
    /// Never send plaintext: no STARTTLS or a failed handshake defers the mail.
    Required,
    /// Do not use it.
    Off,
}

/// Why a connection could not be opened.
enum OpenError {
    /// TLS was attempted and failed; a plaintext retry may follow if policy allows.
    Tls(String),
    Other(String),
}

pub struct OutboundConnection {
    stream: Transport,
    /// The address connected to.
    peer: SocketAddr,
    buf: Vec<u8>,
    /// Commands and content to send, reused across messages.
    out: Vec<u8>,
    start: usize,
    end: usize,
    parser: ReplyParser,
    caps: Capabilities,
    needs_reset: bool,
    messages: usize,
    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384" once encrypted.
    tls: Option<String>,
    /// The next job, whose MAIL/RCPT/DATA went out right behind the previous message's content
    /// (RFC 2920 3.1), and its transaction, waiting for those replies.
    ahead: Option<(Job, Transaction)>,
}

impl OutboundConnection {
    /// Connects, reads the greeting, says EHLO (falling back to HELO), and does STARTTLS as
    /// `policy` says. An opportunistic handshake that fails is retried once in plaintext.
    async fn open(
        addr: SocketAddr,
        config: &Config,
        policy: TlsPolicy,
        auth: Option<(&str, &str)>,
    ) -> Result<OutboundConnection, String> {
        match OutboundConnection::open_once(addr, config, policy, auth).await {
            Ok(c) => Ok(c),
            Err(OpenError::Tls(why)) if policy == TlsPolicy::Opportunistic => {
                warn!(destination = %addr, "{why}; delivering without TLS (opportunistic)");
                OutboundConnection::open_once(addr, config, TlsPolicy::Off, None)
                    .await
                    .map_err(|e| match e {
                        OpenError::Tls(w) | OpenError::Other(w) => w,
                    })
            }
            Err(OpenError::Tls(why) | OpenError::Other(why)) => Err(why),
        }
    }

    async fn open_once(
        addr: SocketAddr,
        config: &Config,
        policy: TlsPolicy,
        auth: Option<(&str, &str)>,
    ) -> Result<OutboundConnection, OpenError> {
        let d = &config.delivery;
        let stream = TcpStream::connect_timeout(addr, d.connect_timeout.0)
            .await
            .map_err(|e| OpenError::Other(format!("connect to {addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(d.reply_timeout.0));
        let mut conn = OutboundConnection {
            stream: Transport::Plain(stream),
            peer: addr,
            buf: vec![0; REPLY_BUFFER_BYTES],
            out: Vec::new(),
            start: 0,
            end: 0,
            parser: ReplyParser::default(),
            caps: Capabilities::default(),
            needs_reset: false,
            messages: 0,
            ahead: None,
            tls: None,
        };
        let greeting = conn.read_reply(d.reply_timeout.0).await.map_err(OpenError::Other)?;
        if greeting.code != 220 {
            return Err(OpenError::Other(format!("{addr} greeted with {}", greeting.text())));
        }
        conn.hello(config).await.map_err(OpenError::Other)?;
        match (policy, conn.caps.starttls) {
            (TlsPolicy::Off, _) | (TlsPolicy::Opportunistic, false) => return Ok(conn),
            (TlsPolicy::Required, false) => {
                return Err(OpenError::Other(format!(
                    "{addr} does not offer STARTTLS, which this route requires"
                )));
            }
            (_, true) => {}
        }
        let reply = conn
            .command(b"STARTTLS\r\n", d.reply_timeout.0)
            .await
            .map_err(OpenError::Other)?;
        if reply.code != 220 {
            return Err(OpenError::Tls(format!("{addr} refused STARTTLS: {}", reply.text())));
        }
        // Mirror of the CVE-2011-0411 rule: nothing may follow the 220 in plaintext.
        if conn.start != conn.end {
            return Err(OpenError::Tls(format!("{addr} sent data after its 220 to STARTTLS")));
        }
        let Transport::Plain(tcp) = std::mem::replace(&mut conn.stream, Transport::Closed) else {
            unreachable!("STARTTLS on a plain connection");
        };
        let connector = futures_rustls::TlsConnector::from(super::tls::opportunistic_client_config());
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let handshake = async { connector.connect(name, tcp).await.map_err(glommio::GlommioError::from) };
        let tls = glommio::timer::timeout(d.reply_timeout.0, handshake)
            .await
            .map_err(|e| OpenError::Tls(format!("TLS handshake with {addr} failed: {e}")))?;
        let session = tls.get_ref().1;
        conn.tls = Some(format!(
            "{:?} {:?}",
            session
                .protocol_version()
                .map_or(rustls::ProtocolVersion::Unknown(0), |v| v),
            session.negotiated_cipher_suite().map(|c| c.suite())
        ));
        conn.stream = Transport::Tls(Box::new(tls));
        // RFC 3207: forget what the server said before TLS and ask again.
        conn.hello(config).await.map_err(OpenError::Tls)?;
        info!(destination = %addr, tls = %conn.tls.as_deref().unwrap_or(""), "STARTTLS");
        if let Some((user, password)) = auth {
            conn.authenticate(user, password, d.reply_timeout.0)
                .await
                .map_err(OpenError::Other)?;
        }
        Ok(conn)
    }

    /// AUTH PLAIN (RFC 4954, RFC 4616), only ever on an encrypted connection.
    async fn authenticate(&mut self, user: &str, password: &str, timeout: Duration) -> Result<(), String> {
        use base64::Engine;
        if self.tls.is_none() {
            return Err(format!("refusing to send credentials to {} without TLS", self.peer));
        }
        if !self.caps.auth_plain {
            return Err(format!("{} does not offer AUTH PLAIN", self.peer));
        }
        let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        let reply = self
            .command(format!("AUTH PLAIN {token}\r\n").as_bytes(), timeout)
            .await?;
        if reply.code != 235 {
            return Err(format!("{} refused our credentials: {}", self.peer, reply.text()));
        }
        Ok(())
    }

    /// EHLO, or HELO if EHLO is refused; records the server's capabilities.
    async fn hello(&mut self, config: &Config) -> Result<(), String> {
        let timeout = config.delivery.reply_timeout.0;
        let ehlo = format!("EHLO {}\r\n", config.helo_name());
        let reply = self.command(ehlo.as_bytes(), timeout).await?;
        if reply.is_positive() {
            self.caps = Capabilities::from_ehlo_lines(reply.lines.iter().map(String::as_str));
            return Ok(());
        }
        let helo = format!("HELO {}\r\n", config.helo_name());
        let reply = self.command(helo.as_bytes(), timeout).await?;
        if !reply.is_positive() {
            return Err(format!("{} refused EHLO and HELO: {}", self.peer, reply.text()));
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(bytes)
            .await
            .map_err(|e| format!("write failed: {e}"))
    }

    async fn command(&mut self, line: &[u8], timeout: Duration) -> Result<ServerReply, String> {
        self.send(line).await?;
        self.read_reply(timeout).await
    }

    /// Reads one whole reply, which must arrive within `timeout` however the server spreads
    /// its bytes (a deadline, not a per-read timeout that each byte would re-arm).
    async fn read_reply(&mut self, timeout: Duration) -> Result<ServerReply, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let (reply, used) = self
                .parser
                .parse(&self.buf[self.start..self.end])
                .map_err(|e| format!("bad reply from server: {e:?}"))?;
            self.start += used;
            if let Some(reply) = reply {
                return Ok(reply);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no complete reply within {timeout:?}"));
            }
            let (stream, free) = (&mut self.stream, &mut self.buf[self.end..]);
            let read = async { Some(stream.read(free).await) };
            let timer = async {
                glommio::timer::sleep(left).await;
                None
            };
            let n = match futures_lite::future::or(read, timer).await {
                Some(result) => result.map_err(|e| format!("read failed: {e}"))?,
                None => return Err(format!("no complete reply within {timeout:?}")),
            };
            if n == 0 {
                return Err("connection closed by the server".into());
            }
            self.end += n;
        }
    }

    async fn quit(&mut self) {
        let _ = self.command(b"QUIT\r\n", Duration::from_secs(5)).await;
    }
}
