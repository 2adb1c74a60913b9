//! One shard: an executor pinned to a core that owns its listeners' sockets, its sessions, its
//! spool directory and its queue index. Nothing here is shared with other shards except the
//! read-only configuration.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use gannet_sched::QueuedMessage;
use gannet_spool::MessageId;
use tracing::{info, warn};

use super::reloadable::Reloadable;
use crate::auth::throttle::{AfterFailure, AuthThrottle, ThrottleLimits};
use crate::config::Config;
use crate::delivery::Deliverer;
use crate::metrics;
use crate::rate::RateLimiter;
use crate::smtp::sasl::Credentials;
use crate::smtp::session::{AuthOutcome, CommitError, MessageGate, Session, SessionConfig};
use crate::spool::appender::Appender;
use crate::spool::buffer::MessageBuffer;
use crate::spool::record::EnvelopeBytes;

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
    /// The configuration in force; replaced by [`Shard::take_reloaded_config`].
    config: RefCell<Arc<Config>>,
    session_config: RefCell<Rc<SessionConfig>>,
    /// The reload generation `config` comes from.
    config_generation: Cell<u64>,
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
    stress: Cell<StressLevels>,
    /// Turns for DKIM signing (`super::signing`), and the queue to the shard's signer.
    pub(super) signing_turns: glommio::sync::Semaphore,
    pub(super) signing_queue: glommio::channels::local_channel::LocalSender<super::signing::Job>,
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

impl Refusal {
    /// The `result` label of `gannet_connections_total`.
    pub fn result_label(self) -> &'static str {
        match self {
            Refusal::ShardFull => "refused_shard_full",
            Refusal::IpFull => "refused_per_ip",
            Refusal::ConnectionRate => "refused_rate",
            Refusal::AuthBlocked => "refused_auth_blocked",
        }
    }

    /// The `limit` label of `gannet_rate_limited_total`.
    pub fn limit_label(self) -> &'static str {
        match self {
            Refusal::ShardFull => "sessions_per_shard",
            Refusal::IpFull => "sessions_per_ip",
            Refusal::ConnectionRate => "connections_per_ip_per_minute",
            Refusal::AuthBlocked => "auth_failures",
        }
    }
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

    pub(super) fn advance(&self, stage: Stage) {
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
        let now = self.stress.get().stressed(sessions, was);
        if now == was {
            return;
        }
        self.stressed.set(now);
        let config = self.config();
        let limits = &config.limits;
        if now {
            self.stress_entries.set(self.stress_entries.get() + 1);
            warn!(
                shard = self.index,
                "under stress: {sessions} of {} sessions open; command waits and content rate windows shortened to {} until fewer than {} are open",
                limits.sessions_per_shard_max,
                limits.stress_command_timeout,
                self.stress.get().leave_below
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
    pub(super) fn is_trusted(&self, ip: IpAddr) -> bool {
        self.session_config
            .borrow()
            .relay
            .trusted_networks
            .iter()
            .any(|n| n.contains(ip))
    }

    /// Admits a session if the shard's limits allow it.
    pub fn admit(self: &Rc<Self>, ip: IpAddr) -> Result<SessionGuard, Refusal> {
        let config = self.config();
        let limits = &config.limits;
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
        let mechanism = credentials.mechanism;
        let outcome = self.verify_credentials(ip, credentials).await;
        let result = match outcome {
            AuthOutcome::Success(_) => "success",
            AuthOutcome::Invalid => "invalid",
            AuthOutcome::Blocked => "blocked",
            AuthOutcome::Unavailable => "unavailable",
        };
        metrics::with(|m| m.auth.add((mechanism, result), 1));
        outcome
    }

    async fn verify_credentials(&self, ip: IpAddr, credentials: Credentials) -> AuthOutcome {
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
                            self.config().auth.failures_max,
                            self.config().auth.block_duration
                        );
                        AuthOutcome::Blocked
                    }
                }
            }
        }
    }

    /// A shard's state, with its spool appender and deliverer already running.
    pub(super) fn new(
        index: u16,
        config: Arc<Config>,
        appender: Rc<Appender>,
        deliverer: Rc<Deliverer>,
        reloadable: Arc<Reloadable>,
    ) -> Rc<Shard> {
        let limits = &config.limits;
        let signing_queue = super::signing::start_signer(reloadable.clone());
        Rc::new(Shard {
            index,
            session_config: RefCell::new(Rc::new(config.session_config())),
            config_generation: Cell::new(0),
            appender,
            deliverer,
            tls_acceptor: futures_rustls::TlsAcceptor::from(reloadable.tls_config.clone()),
            reloadable,
            guards: RefCell::new(Guards {
                connections_per_ip: RateLimiter::new(limits.connections_per_ip_per_minute),
                messages_per_ip: RateLimiter::new(limits.messages_per_ip_per_minute),
                messages_per_user: RateLimiter::new(limits.messages_per_user_per_minute),
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
            stress: Cell::new(StressLevels::new(
                limits.sessions_per_shard_max,
                limits.stress_sessions_fraction,
            )),
            signing_turns: glommio::sync::Semaphore::new(super::signing::SIGNING_IN_FLIGHT_MAX),
            signing_queue,
            config: RefCell::new(config),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// What new sessions start with (limits, relay policy, timeouts).
    pub fn session_config(&self) -> Rc<SessionConfig> {
        self.session_config.borrow().clone()
    }

    /// After a SIGHUP that changed the configuration: new sessions, rate checks and delivery
    /// attempts use the new one; sessions in progress keep the session configuration they began
    /// with. Returns whether anything changed.
    pub fn take_reloaded_config(&self) -> bool {
        let generation = self.reloadable.config_generation();
        if generation == self.config_generation.get() {
            return false;
        }
        self.config_generation.set(generation);
        let config = self.reloadable.config();
        let limits = &config.limits;
        *self.session_config.borrow_mut() = Rc::new(config.session_config());
        self.stress.set(StressLevels::new(
            limits.sessions_per_shard_max,
            limits.stress_sessions_fraction,
        ));
        {
            let mut guards = self.guards.borrow_mut();
            guards
                .connections_per_ip
                .set_per_minute(limits.connections_per_ip_per_minute);
            guards.messages_per_ip.set_per_minute(limits.messages_per_ip_per_minute);
            guards
                .messages_per_user
                .set_per_minute(limits.messages_per_user_per_minute);
            guards.auth_failures.set_limits(ThrottleLimits {
                failures_max: config.auth.failures_max,
                failure_delay: config.auth.failure_delay.0,
                block_duration: config.auth.block_duration.0,
            });
        }
        self.deliverer.reconfigure(config.clone());
        *self.config.borrow_mut() = config;
        info!(shard = self.index, "configuration reloaded");
        true
    }

    /// Sessions open now.
    pub fn sessions_open(&self) -> usize {
        self.sessions.borrow().len()
    }

    /// Commits the message a session has finished (durable before this returns, with the
    /// spool's default durability) and hands it to delivery: the one step between receiving a
    /// message and queueing it. Logs the message's `queued` line. `sender_spf`: SPF's results
    /// from MAIL FROM, when the sender was checked there.
    pub async fn commit_and_enqueue(
        &self,
        session: &Session,
        sink: &mut MessageBuffer,
        listener: usize,
        sender_spf: Option<crate::authentication::SenderSpf>,
    ) -> Result<MessageId, CommitError> {
        if let Err(refusal) = self.verify_inbound(session, sink, listener, sender_spf).await {
            crate::smtp::session::MessageSink::abandon(sink);
            let reason = if refusal == CommitError::NoSpace {
                "memory"
            } else {
                "authentication"
            };
            metrics::with(|m| m.listener(listener).messages_rejected.add(reason, 1));
            return Err(refusal);
        }
        if self.sign(session, sink).await.is_err() {
            crate::smtp::session::MessageSink::abandon(sink);
            metrics::with(|m| m.listener(listener).messages_rejected.add("memory", 1));
            return Err(CommitError::NoSpace);
        }
        let message = sink.take();
        let content_bytes = message.content_bytes;
        let record_bytes = message.record_len();
        let keep = self.deliverer.wants_record(record_bytes as usize);
        let (id, written) = match self.appender.commit_keeping(message, keep).await {
            Ok(done) => done,
            Err(e) => {
                warn!(shard = self.index, client = %session.client_ip(), "message refused by the spool: {e:?}");
                let reason = match e {
                    CommitError::NoSpace => "spool_full",
                    CommitError::Io => "spool_error",
                    CommitError::Refused { .. } => "authentication",
                };
                metrics::with(|m| m.listener(listener).messages_rejected.add(reason, 1));
                return Err(e);
            }
        };
        metrics::with(|m| {
            let l = m.listener(listener);
            l.messages_received += 1;
            l.received_bytes += content_bytes;
        });
        let env = session.envelope();
        info!(
            shard = self.index,
            %id,
            client = %session.client_ip(),
            from = %String::from_utf8_lossy(env.sender()),
            recipients = env.recipient_count(),
            size = content_bytes,
            tls = %session.tls().map_or("none", |t| t.version.as_str()),
            user = %session.user().map_or("-", |u| u.user.as_str()),
            "queued"
        );
        if crate::events::enabled() {
            crate::events::emit(crate::events::EventBody {
                kind: "received",
                message_id: id.to_string(),
                sender: String::from_utf8_lossy(env.sender()).into_owned(),
                recipient: None,
                recipients: Some(env.recipient_count()),
                size_bytes: Some(content_bytes),
                client: Some(session.client_ip().to_string()),
                relay: None,
                reply: None,
                class: None,
            });
        }
        let envelope = EnvelopeBytes::from_envelope(env, session.origin());
        self.deliverer
            .accept(QueuedMessage::new(id, record_bytes, content_bytes, envelope), written);
        Ok(id)
    }
}

impl MessageGate for Shard {
    fn admit_message(&self, client_ip: IpAddr, user: Option<&str>) -> bool {
        let now = Instant::now();
        let mut guards = self.guards.borrow_mut();
        if let Some(user) = user {
            if !guards.messages_per_user.is_unlimited() && !guards.messages_per_user.admit(&user.to_string(), now) {
                info!(shard = self.index, client = %client_ip, user, "message rate limit reached for the user");
                metrics::with(|m| m.rate_limited.add("messages_per_user_per_minute", 1));
                return false;
            }
        }
        if !self.is_trusted(client_ip) && !guards.messages_per_ip.admit(&client_ip, now) {
            info!(shard = self.index, client = %client_ip, "message rate limit reached for the address");
            metrics::with(|m| m.rate_limited.add("messages_per_ip_per_minute", 1));
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
pub(super) struct AllGone<'a> {
    pub(super) shard: &'a Shard,
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
