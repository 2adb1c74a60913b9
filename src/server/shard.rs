//! One shard: an executor pinned to a core that owns its listeners' sockets, its sessions, its
//! spool directory and its queue index. Nothing here is shared with other shards except the
//! read-only configuration.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use glommio::net::TcpListener;
use tracing::{error, info, warn};

use super::reloadable::Reloadable;
use super::{connection, signals};
use crate::auth::throttle::{AfterFailure, AuthThrottle, ThrottleLimits};
use crate::config::{system_dns_servers, Config};
use crate::delivery::Deliverer;
use crate::dns::cache::DnsCache;
use crate::dns::resolver::Resolver;
use crate::rate::RateLimiter;
use crate::smtp::sasl::Credentials;
use crate::smtp::session::{AuthOutcome, MessageGate, SessionConfig};
use crate::spool::appender::{Appender, AppenderConfig, ExistingSegment, Liveness, WrittenRecord};
use crate::spool::mapped::MappedSegment;
use crate::spool::recovery::{list_segments, quarantine, scan_segment, Damage};
use crate::spool::shard_dir;
use gannet_sched::{QueueIndex, QueuedMessage, Scheduler};

/// How often a shard looks at the process-wide shutdown flag (and the queue flush counter).
const SHUTDOWN_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Every this many polls (5 s) a shard hands the allocator's freed pages back to the system.
const MEMORY_COLLECT_POLLS: u64 = 50;

/// Asks mimalloc to return this thread's freed memory to the system (`force`: also what it
/// would keep for reuse). Freed memory is otherwise purged only as the thread allocates again;
/// measured, 100,000 queued messages took 72-81 MB of PSS after a restart without this and
/// 48 MB with purging at once (benches/queued-memory).
fn give_back_memory(force: bool) {
    // SAFETY: mi_collect only walks and releases the calling thread's own heap; it has no
    // preconditions. Runs on every shard of every server test.
    unsafe { libmimalloc_sys::mi_collect(force) }
}

/// After the shutdown deadline, how long cut-off sessions get to send their 421 and go.
const FORCED_CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Where the shard is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Running,
    /// No new connections; sessions finish their transaction, then get 421.
    Draining,
    /// Past the shutdown deadline: every session gets 421 now.
    Forced,
}

/// A session's entry in the shard's registry: how the shard wakes it at shutdown.
pub struct SessionSlot {
    waker: RefCell<Option<Waker>>,
}

/// The shard's defences against abusive clients: rates and the AUTH failure throttle.
struct Guards {
    connections_per_ip: RateLimiter<IpAddr>,
    messages_per_ip: RateLimiter<IpAddr>,
    messages_per_user: RateLimiter<String>,
    auth_failures: AuthThrottle,
}

pub struct Shard {
    pub index: u16,
    pub config: Arc<Config>,
    pub session_config: Rc<SessionConfig>,
    pub appender: Rc<Appender>,
    pub deliverer: Rc<Deliverer>,
    pub reloadable: Arc<Reloadable>,
    pub tls_acceptor: futures_rustls::TlsAcceptor,
    guards: RefCell<Guards>,
    stage: Cell<Stage>,
    sessions: RefCell<HashMap<u64, Rc<SessionSlot>>>,
    sessions_per_ip: RefCell<HashMap<IpAddr, usize>>,
    next_session_id: Cell<u64>,
    all_gone_waker: RefCell<Option<Waker>>,
    /// Under stress: at least `stress.enter_at` sessions (see [`StressLevels`]).
    stressed: Cell<bool>,
    /// Times the shard entered stress: a session that sees it change applies the stress
    /// deadline once even if the stress is already over (the sweep when stress begins).
    stress_entries: Cell<u64>,
    stress: StressLevels,
}

/// When a shard enters and leaves stress mode (Postfix's name): it enters at `enter_at` open
/// sessions and leaves below `leave_below` (a tenth lower, so that one session coming and going
/// at the edge does not flip it back and forth).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StressLevels {
    pub enter_at: usize,
    pub leave_below: usize,
}

impl StressLevels {
    pub fn new(sessions_max: usize, fraction: f64) -> StressLevels {
        let enter_at = ((sessions_max as f64 * fraction).ceil() as usize).clamp(1, sessions_max.max(1));
        let leave_below = (enter_at - enter_at / 10).min(enter_at.saturating_sub(1)).max(1);
        StressLevels { enter_at, leave_below }
    }

    /// Whether a shard with `sessions` open is under stress, given whether it was.
    pub fn stressed(&self, sessions: usize, was: bool) -> bool {
        if was {
            sessions >= self.leave_below
        } else {
            sessions >= self.enter_at
        }
    }
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ShardFull,
    IpFull,
    /// Too many new connections per minute from this address.
    ConnectionRate,
    /// Blocked after too many AUTH failures.
    AuthBlocked,
}

/// A session's registration; dropping it frees the session's place.
pub struct SessionGuard {
    shard: Rc<Shard>,
    id: u64,
    ip: IpAddr,
    pub slot: Rc<SessionSlot>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.shard.sessions.borrow_mut().remove(&self.id);
        self.shard.update_stress();
        let mut per_ip = self.shard.sessions_per_ip.borrow_mut();
        if let Some(count) = per_ip.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&self.ip);
            }
        }
        if self.shard.sessions.borrow().is_empty() {
            if let Some(waker) = self.shard.all_gone_waker.borrow_mut().take() {
                waker.wake();
            }
        }
    }
}

impl Shard {
    pub fn stage(&self) -> Stage {
        self.stage.get()
    }

    fn advance(&self, stage: Stage) {
        self.stage.set(stage);
        self.wake_sessions();
    }

    /// Wakes every session waiting for input, so that it looks at the stage and its deadlines.
    fn wake_sessions(&self) {
        for slot in self.sessions.borrow().values() {
            if let Some(waker) = slot.waker.borrow_mut().take() {
                waker.wake();
            }
        }
    }

    /// Whether the shard is under stress (nearly full of sessions): shorter deadlines.
    pub fn stressed(&self) -> bool {
        self.stressed.get()
    }

    /// How many times the shard has entered stress (see [`ShardSignal`]).
    pub fn stress_entries(&self) -> u64 {
        self.stress_entries.get()
    }

    /// Enters or leaves stress mode as the session count says; says so once per change and
    /// wakes the sessions so that their deadlines follow.
    fn update_stress(&self) {
        let sessions = self.sessions.borrow().len();
        let was = self.stressed.get();
        let now = self.stress.stressed(sessions, was);
        if now == was {
            return;
        }
        self.stressed.set(now);
        let limits = &self.config.limits;
        if now {
            self.stress_entries.set(self.stress_entries.get() + 1);
            warn!(
                shard = self.index,
                "under stress: {sessions} of {} sessions open; command waits and content rate windows shortened to {} until fewer than {} are open",
                limits.sessions_per_shard_max,
                limits.stress_command_timeout,
                self.stress.leave_below
            );
        } else {
            info!(
                shard = self.index,
                "no longer under stress: {sessions} of {} sessions open; normal deadlines again",
                limits.sessions_per_shard_max
            );
        }
        self.wake_sessions();
    }

    /// Whether `ip` is in a trusted network, and so exempt from the rate limits.
    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.session_config
            .relay
            .trusted_networks
            .iter()
            .any(|n| n.contains(ip))
    }

    /// Admits a session if the shard's limits allow it.
    pub fn admit(self: &Rc<Self>, ip: IpAddr) -> Result<SessionGuard, Refusal> {
        let limits = &self.config.limits;
        if self.sessions.borrow().len() >= limits.sessions_per_shard_max {
            return Err(Refusal::ShardFull);
        }
        let now = Instant::now();
        {
            let mut guards = self.guards.borrow_mut();
            if guards.auth_failures.is_blocked(ip, now) {
                return Err(Refusal::AuthBlocked);
            }
            if !self.is_trusted(ip) && !guards.connections_per_ip.admit(&ip, now) {
                return Err(Refusal::ConnectionRate);
            }
        }
        let mut per_ip = self.sessions_per_ip.borrow_mut();
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= limits.sessions_per_ip_max {
            return Err(Refusal::IpFull);
        }
        *count += 1;
        drop(per_ip);
        let id = self.next_session_id.get();
        self.next_session_id.set(id + 1);
        let slot = Rc::new(SessionSlot {
            waker: RefCell::new(None),
        });
        self.sessions.borrow_mut().insert(id, slot.clone());
        self.update_stress();
        Ok(SessionGuard {
            shard: self.clone(),
            id,
            ip,
            slot,
        })
    }

    /// Checks credentials off the event loop (argon2 takes tens of milliseconds of CPU), with
    /// the per-address failure delay and block.
    pub async fn check_credentials(&self, ip: IpAddr, credentials: Credentials) -> AuthOutcome {
        if self.guards.borrow().auth_failures.is_blocked(ip, Instant::now()) {
            return AuthOutcome::Blocked;
        }
        let Some(passwords) = self.reloadable.passwords() else {
            return AuthOutcome::Unavailable;
        };
        let user = credentials.user.clone();
        let verified = glommio::executor()
            .spawn_blocking(move || passwords.verify(&credentials))
            .await;
        match verified {
            Some(identity) => {
                self.guards.borrow_mut().auth_failures.succeeded(ip);
                info!(shard = self.index, client = %ip, user = %identity.user, "authenticated");
                AuthOutcome::Success(identity)
            }
            None => {
                let after = self.guards.borrow_mut().auth_failures.failed(ip, Instant::now());
                match after {
                    AfterFailure::Delay(delay) => {
                        info!(shard = self.index, client = %ip, %user, "authentication failed; answering in {delay:?}");
                        glommio::timer::sleep(delay).await;
                        AuthOutcome::Invalid
                    }
                    AfterFailure::Block => {
                        warn!(
                            shard = self.index,
                            client = %ip,
                            %user,
                            "authentication failed {} times: address blocked for {}",
                            self.config.auth.failures_max,
                            self.config.auth.block_duration
                        );
                        AuthOutcome::Blocked
                    }
                }
            }
        }
    }

    /// Hands a newly spooled message to delivery.
    pub fn record_queued(self: &Rc<Self>, message: QueuedMessage, written: Option<WrittenRecord>) {
        self.deliverer.accept(message, written);
    }
}

impl MessageGate for Shard {
    fn admit_message(&self, client_ip: IpAddr, user: Option<&str>) -> bool {
        let now = Instant::now();
        let mut guards = self.guards.borrow_mut();
        if let Some(user) = user {
            if !guards.messages_per_user.is_unlimited() && !guards.messages_per_user.admit(&user.to_string(), now) {
                info!(shard = self.index, client = %client_ip, user, "message rate limit reached for the user");
                return false;
            }
        }
        if !self.is_trusted(client_ip) && !guards.messages_per_ip.admit(&client_ip, now) {
            info!(shard = self.index, client = %client_ip, "message rate limit reached for the address");
            return false;
        }
        true
    }
}

/// Ready when the shard's stage or stress differs from what the session saw. Its output says
/// whether the shard entered stress meanwhile: every session woken by that applies the stress
/// deadline at least once, so that the idle ones are swept out when stress begins, even if
/// their going ends the stress before every woken session has run.
pub struct ShardSignal<'a> {
    pub shard: &'a Shard,
    pub slot: &'a SessionSlot,
    pub seen_stage: Stage,
    pub seen_stressed: bool,
    pub seen_stress_entries: u64,
}

impl Future for ShardSignal<'_> {
    type Output = bool;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let shard = self.shard;
        let entered = shard.stress_entries.get() != self.seen_stress_entries;
        if entered || shard.stage.get() != self.seen_stage || shard.stressed.get() != self.seen_stressed {
            return Poll::Ready(entered);
        }
        *self.slot.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Ready when no session is left.
struct AllGone<'a> {
    shard: &'a Shard,
}

impl Future for AllGone<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.shard.sessions.borrow().is_empty() {
            return Poll::Ready(());
        }
        *self.shard.all_gone_waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Reads this shard's spool back: its own directory and those of shards that no longer exist
/// (`shard + k * shard_count`), so that lowering the shard count never strands mail.
/// Returns the queue index, the segments in the shard's own directory (oldest first), and the
/// next segment sequence number.
fn recover(config: &Config, shard: u16, shard_count: usize) -> Result<(QueueIndex, Vec<ExistingSegment>, u64), String> {
    let spool = &config.spool.directory;
    let own_dir = shard_dir(spool, shard);
    std::fs::create_dir_all(&own_dir).map_err(|e| format!("cannot create {}: {e}", own_dir.display()))?;
    let mut index = QueueIndex::default();
    let mut own_segments = Vec::new();
    let mut next_seq = 0;
    let mut adopted = u32::from(shard);
    loop {
        let dir = shard_dir(spool, adopted as u16);
        if adopted != u32::from(shard) && !dir.exists() {
            break;
        }
        // Half-made segments from a crash during preparation hold nothing.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().ends_with(".seg.tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let segments = list_segments(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        for (seq, path) in &segments {
            let mapped = MappedSegment::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let buf = mapped.bytes();
            let scan = scan_segment(buf, adopted as u16, *seq);
            for damage in &scan.damage {
                match *damage {
                    Damage::TornTail { offset } => {
                        info!(
                            shard,
                            "segment {}: unacknowledged torn tail at offset {offset} cut off",
                            path.display()
                        );
                    }
                    Damage::Corrupt { offset, len, reason } => {
                        match quarantine(spool, adopted as u16, *seq, buf, offset, len) {
                            Ok(q) => error!(shard, "segment {}: record at offset {offset} is damaged ({reason}); quarantined as {}", path.display(), q.display()),
                            Err(e) => error!(shard, "segment {}: record at offset {offset} is damaged ({reason}); could not quarantine it: {e}", path.display()),
                        }
                    }
                }
            }
            // One segment at a time: a restart holds the index and one segment's scan, never
            // every record of the spool at once.
            index.apply_segment(scan);
            if adopted == u32::from(shard) {
                own_segments.push(ExistingSegment {
                    seq: *seq,
                    len_bytes: buf.len() as u64,
                });
                next_seq = next_seq.max(seq + 1);
            }
        }
        adopted += shard_count as u32;
        if adopted > u32::from(u16::MAX) {
            break;
        }
    }
    Ok((index, own_segments, next_seq))
}

/// What a shard starts with.
pub struct ShardSetup {
    pub index: u16,
    pub shard_count: usize,
    pub config: Arc<Config>,
    /// Bound, listening sockets, one per listener, for this shard alone.
    pub listener_fds: Vec<RawFd>,
    pub dns_cache: Arc<DnsCache>,
    pub reloadable: Arc<Reloadable>,
}

/// Runs a shard until shutdown.
pub async fn run(setup: ShardSetup, ready: mpsc::Sender<Result<u16, String>>) -> Result<(), String> {
    let ShardSetup {
        index,
        shard_count,
        config,
        listener_fds,
        dns_cache,
        reloadable,
    } = setup;
    let started = Instant::now();
    let (queue, own_segments, next_seq) = recover(&config, index, shard_count)?;
    let appender_config = AppenderConfig {
        shard: index,
        dir: shard_dir(&config.spool.directory, index),
        segment_bytes: config.spool.segment_size.0,
        segments_max: config.segments_per_shard_max(shard_count),
        min_free_bytes: config.spool.min_free.0,
        durability: config.spool.durability,
        inflight_bytes_max: config.spool.memory_max.0 as usize,
    };
    let recovered = queue.len();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let sched = Rc::new(RefCell::new(Scheduler::new(
        config.sched_config(index, shard_count, seed),
        queue,
    )));
    let live: Liveness = {
        let sched = sched.clone();
        // A borrow held elsewhere cannot happen (no borrow lives across an await); if it did,
        // "live" is the safe answer.
        Rc::new(move |seq| {
            sched
                .try_borrow()
                .map_or(true, |s| s.queue().segment_is_live(index, seq))
        })
    };
    let appender = Appender::open(appender_config, &own_segments, next_seq, live)
        .await
        .map_err(|e| format!("cannot open spool: {e}"))?;
    info!(
        shard = index,
        "recovered {recovered} spooled message(s) in {:?}",
        started.elapsed()
    );
    let dns_servers = if config.dns.servers.is_empty() {
        system_dns_servers()
    } else {
        config.dns.servers.clone()
    };
    let resolver = Resolver::new(dns_servers, config.dns.timeout.0, config.dns.attempts, dns_cache, index);
    let deliverer = Deliverer::new(index, config.clone(), appender.clone(), sched, resolver);
    deliverer.start();
    let shard = Rc::new(Shard {
        index,
        session_config: Rc::new(config.session_config()),
        config: config.clone(),
        appender,
        deliverer,
        tls_acceptor: futures_rustls::TlsAcceptor::from(reloadable.tls_config.clone()),
        reloadable,
        guards: RefCell::new(Guards {
            connections_per_ip: RateLimiter::new(config.limits.connections_per_ip_per_minute),
            messages_per_ip: RateLimiter::new(config.limits.messages_per_ip_per_minute),
            messages_per_user: RateLimiter::new(config.limits.messages_per_user_per_minute),
            auth_failures: AuthThrottle::new(ThrottleLimits {
                failures_max: config.auth.failures_max,
                failure_delay: config.auth.failure_delay.0,
                block_duration: config.auth.block_duration.0,
            }),
        }),
        stage: Cell::new(Stage::Running),
        sessions: RefCell::new(HashMap::new()),
        sessions_per_ip: RefCell::new(HashMap::new()),
        next_session_id: Cell::new(0),
        all_gone_waker: RefCell::new(None),
        stressed: Cell::new(false),
        stress_entries: Cell::new(0),
        stress: StressLevels::new(
            config.limits.sessions_per_shard_max,
            config.limits.stress_sessions_fraction,
        ),
    });

    let mut accept_tasks = Vec::with_capacity(listener_fds.len());
    for (fd, listener_config) in listener_fds.into_iter().zip(&config.listeners) {
        // SAFETY: `fd` is a bound, listening TCP socket created for this shard alone by
        // `server::serve`, which gave up ownership with into_raw_fd; nothing else closes it.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        let shard = shard.clone();
        let listener_config = listener_config.clone();
        accept_tasks.push(glommio::spawn_local(async move {
            loop {
                match listener.accept().await {
                    Ok(stream) => {
                        glommio::spawn_local(connection::serve(stream, shard.clone(), listener_config.clone()))
                            .detach();
                    }
                    Err(e) => {
                        warn!(shard = shard.index, "accept failed: {e}");
                        // Out of file descriptors and the like: back off instead of spinning.
                        glommio::timer::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    let _ = ready.send(Ok(index));

    let mut flushes_seen = signals::flush_generation();
    // Recovery's and start-up's transient memory goes back to the system now, not whenever the
    // allocator next runs on this thread (a shard with a full queue and no traffic may not).
    give_back_memory(true);
    let mut polls = 0u64;
    while !signals::shutdown_requested() {
        glommio::timer::sleep(SHUTDOWN_POLL_INTERVAL).await;
        polls += 1;
        if polls % MEMORY_COLLECT_POLLS == 0 {
            give_back_memory(false);
        }
        let flushes = signals::flush_generation();
        if flushes != flushes_seen {
            flushes_seen = flushes;
            let retried = shard.deliverer.retry_all_now();
            info!(shard = index, "queue flush: {retried} deferred message(s) retried now");
        }
    }
    // Stop accepting: cancelling the accept loops drops (closes) this shard's listening sockets.
    drop(accept_tasks);
    shard.advance(Stage::Draining);
    let deadline = config.server.shutdown_timeout.0;
    let drained = glommio::timer::timeout(deadline, async {
        AllGone { shard: &shard }.await;
        Ok(())
    })
    .await
    .is_ok();
    if !drained {
        warn!(
            shard = index,
            "shutdown timeout: closing {} session(s) with 421",
            shard.sessions.borrow().len()
        );
        shard.advance(Stage::Forced);
        let _ = glommio::timer::timeout(FORCED_CLOSE_GRACE, async {
            AllGone { shard: &shard }.await;
            Ok(())
        })
        .await;
    }
    // Every acknowledged message was already durable when it was acknowledged; what is left is
    // delivery state, written now so that a clean stop never repeats a delivery.
    shard.deliverer.flush_state().await;
    let queued = shard.deliverer.queued();
    info!(shard = index, "stopped with {queued} message(s) spooled");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::StressLevels;

    #[test]
    fn stress_starts_at_the_fraction_and_ends_a_tenth_lower() {
        let levels = StressLevels::new(1000, 0.8);
        assert_eq!(
            levels,
            StressLevels {
                enter_at: 800,
                leave_below: 720
            }
        );
        assert!(!levels.stressed(799, false));
        assert!(levels.stressed(800, false));
        assert!(levels.stressed(720, true), "still under stress until below 720");
        assert!(!levels.stressed(719, true));
    }

    #[test]
    fn small_shards_still_have_a_gap_and_never_zero() {
        let levels = StressLevels::new(10, 0.5);
        assert_eq!(
            levels,
            StressLevels {
                enter_at: 5,
                leave_below: 4
            }
        );
        let one = StressLevels::new(1, 1.0);
        assert_eq!(
            one,
            StressLevels {
                enter_at: 1,
                leave_below: 1
            }
        );
        assert!(!one.stressed(0, true));
        let full = StressLevels::new(1000, 1.0);
        assert_eq!(full.enter_at, 1000);
    }
}
