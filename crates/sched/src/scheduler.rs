//! The delivery scheduler of one shard, sans-IO: the shell tells it what happened (a message was
//! spooled, a lookup found a site, a worker finished a job, time passed) and asks it what to do
//! next (which site wants a connection, which job a connection takes, when a message is due
//! again, what delivery state to write). It never does I/O and never reads a clock: every call
//! that needs the time takes it.
//!
//! What it owns:
//! - the queue index ([`QueueIndex`]): every unfinished message and its finished recipients;
//! - retry timers: `(due, message)` in time order, the schedule as data ([`RetrySchedule`]);
//! - receiving sites ([`Site`]): a queue of jobs in three lanes each, per-site connection and
//!   rate limits, per-connection message limits; bounded by `sites_max` (idle sites are evicted,
//!   least recently active first, and rebuilt from the queue when mail comes again);
//! - the delivery state records to write (finished recipients, finished messages, retry
//!   schedules).
//!
//! Invariants: a message has `jobs_outstanding` equal to the number of its jobs queued, running
//! or being routed, and is planned again only when that is zero; a message waits in the retry
//! timers only with no job outstanding; a site with work or a worker is never evicted.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gannet_smtp::client::RecipientResult;
use gannet_smtp::deadline::Now;
use gannet_smtp::dsn;
use gannet_smtp::envelope::notify;
use gannet_spool::record::{Deferral, StateEntry};
use gannet_spool::MessageId;

use crate::backoff::RetrySchedule;
use crate::health::{Change, HealthRules};
use crate::lanes::Lane;
use crate::provider::{Pace, Provider, ProviderRule, Slowdown, PROVIDERS_MAX};
use crate::queue::{QueueIndex, QueuedMessage};
use crate::rng::Rng;
use crate::site::{Site, SiteKey, SiteLimits, SiteRule};
use crate::suspend::Suspensions;

/// Where mail for a domain goes (`[[route]]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteTarget {
    Smarthost(SocketAddr),
    /// The domain's MX hosts.
    Mx,
}

/// One `[[route]]`: a domain, or `*` for every domain no exact route names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub domain: String,
    pub target: RouteTarget,
}

/// What the scheduler is told once, from the configuration.
#[derive(Debug, Clone)]
pub struct SchedConfig {
    pub shard: u16,
    pub shard_count: usize,
    pub routes: Vec<Route>,
    pub site_rules: Vec<SiteRule>,
    /// Connections to one site, for the whole process (each shard takes its share).
    pub connections_per_site_max: usize,
    pub messages_per_connection_max: usize,
    /// Delivering connections of this shard, all sites together.
    pub connections_per_shard_max: usize,
    /// Sites this shard keeps (idle ones beyond it are evicted).
    pub sites_max: usize,
    pub retry: RetrySchedule,
    pub queue_lifetime: Duration,
    /// One "still trying" notice after this long; zero: never.
    pub delay_warning_after: Duration,
    /// A site with nothing to do for this long is evicted (at least the pool's idle time).
    pub site_idle: Duration,
    /// Jitter and shuffling seed.
    pub seed: u64,
    /// When a site is marked down and how it is probed.
    pub health: HealthRules,
    /// One recipient per job (and so per transaction), for mail that is not a bounce: each
    /// delivery then has an envelope sender of its own (VERP return paths).
    pub one_recipient_per_job: bool,
    /// Providers whose sites share limits (first match by MX host suffix).
    pub providers: Vec<ProviderRule>,
}

impl SchedConfig {
    /// A process-wide count split over the shards, rounded up, at least one.
    fn per_shard(&self, process_wide: usize) -> usize {
        process_wide.div_ceil(self.shard_count.max(1)).max(1)
    }
}

/// Recipients of one message that go to one site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: MessageId,
    pub recipients: Vec<u32>,
    pub lane: Lane,
    pub site: SiteKey,
    /// Already put back once because a pooled connection turned out to be dead.
    pub retried_on_fresh_connection: bool,
}

/// Recipients that wait at a paused provider's site ([`Scheduler::complete_waiting`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub recipients: Vec<u32>,
    pub site: SiteKey,
    pub lane: Lane,
}

/// What a message's recipients need before they can be queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: MessageId,
    pub lane: Lane,
    /// Groups for MX routes: the shell looks up the domain's site and calls
    /// [`Scheduler::place_mx`] (or finishes the group with the lookup's failure).
    pub resolve: Vec<(String, Vec<u32>)>,
    /// Recipients no route covers (finish them deferred: they wait like any deferral).
    pub unrouted: Vec<u32>,
}

/// What became of one recipient in a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Refused for good.
    Failed,
    /// Deferred past the queue lifetime: failed for good.
    Expired,
    Deferred,
}

/// A job's results sorted out, before the shell spools bounces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classified {
    pub verdicts: Vec<(u32, Verdict)>,
    /// Finished now: delivered, or failed with no notice wanted.
    pub done: Vec<u32>,
    /// Failed and owed a failure notice: finished once the notice is spooled.
    pub bounce: Vec<u32>,
    /// Deferred and owed the one delay notice.
    pub delayed: Vec<u32>,
}

/// Where a message stands after a job's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// Every recipient finished: the message is gone from the queue.
    Finished,
    /// Other jobs of the message are still out.
    Pending,
    /// Deferred: the next attempt is due then.
    Retry { at_unix_s: u64 },
}

/// Delivery state to append to the spool (never waited on: losing it in a crash only repeats
/// deliveries or brings a retry early).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PendingState {
    pub outcomes: Vec<StateEntry>,
    pub tombstones: Vec<StateEntry>,
    pub deferrals: Vec<Deferral>,
}

impl PendingState {
    pub fn is_empty(&self) -> bool {
        self.outcomes.is_empty() && self.tombstones.is_empty() && self.deferrals.is_empty()
    }
}

pub struct Scheduler {
    config: SchedConfig,
    queue: QueueIndex,
    retries: BTreeSet<(Instant, MessageId)>,
    sites: HashMap<SiteKey, Site>,
    /// Sites that may want another worker, in the order they asked.
    kicked: VecDeque<SiteKey>,
    workers_total: usize,
    state: PendingState,
    rng: Rng,
    /// Sites evicted to make room, for the shell to close their pools (drained by
    /// [`Scheduler::take_evicted`]; at most one per new site).
    evicted: Vec<SiteKey>,
    suspensions: Suspensions,
    /// One per `config.providers` rule, in order.
    providers: Vec<Provider>,
}

/// Each provider rule's shard state: its process-wide limits split over the shards.
fn build_providers(config: &SchedConfig) -> Vec<Provider> {
    assert!(
        config.providers.len() <= PROVIDERS_MAX,
        "the configuration bounds the providers"
    );
    config
        .providers
        .iter()
        .map(|rule| Provider {
            name: rule.name.clone(),
            workers: 0,
            connections_max: rule.connections_max.map_or(usize::MAX, |c| config.per_shard(c)),
            messages_per_connection_max: rule.messages_per_connection_max,
            pace: Pace::new(
                rule.messages_per_second
                    .map(|rate| Duration::from_secs_f64(1.0 / (rate / config.shard_count.max(1) as f64))),
            ),
            paused_until_unix_s: None,
        })
        .collect()
}

/// The domain of an address as stored (`local@domain`); empty for `<Postmaster>`.
pub fn domain_of(address: &[u8]) -> &[u8] {
    match address.iter().rposition(|&b| b == b'@') {
        Some(at) => &address[at + 1..],
        None => &[],
    }
}

impl Scheduler {
    pub fn new(config: SchedConfig, queue: QueueIndex) -> Scheduler {
        assert!(config.shard_count > 0 && config.sites_max > 0);
        Scheduler {
            rng: Rng::new(config.seed ^ (u64::from(config.shard) + 0x9E37_79B9_7F4A_7C15)),
            providers: build_providers(&config),
            config,
            queue,
            retries: BTreeSet::new(),
            sites: HashMap::new(),
            kicked: VecDeque::new(),
            workers_total: 0,
            state: PendingState::default(),
            evicted: Vec::new(),
            suspensions: Suspensions::default(),
        }
    }

    pub fn config(&self) -> &SchedConfig {
        &self.config
    }

    /// A reload: routes, site rules, limits and retry timing change to `config`'s; every known
    /// site takes its new limits at once (its workers and queued jobs stay), and new plans
    /// follow the new routes. The shard, the shard count and the seed stay (they are fixed at
    /// start).
    pub fn reconfigure(&mut self, mut config: SchedConfig) {
        assert!(config.sites_max > 0);
        config.shard = self.config.shard;
        config.shard_count = self.config.shard_count;
        config.seed = self.config.seed;
        self.config = config;
        self.providers = build_providers(&self.config);
        let keys: Vec<SiteKey> = self.sites.keys().cloned().collect();
        let now = Instant::now();
        for key in keys {
            let site = &self.sites[&key];
            let provider = self.provider_for(&key, &site.hosts);
            let limits = self.limits_for(&key, &site.name, &site.hosts, provider);
            let site = self.sites.get_mut(&key).expect("listed above");
            site.limits = limits;
            site.pace.interval = limits.send_interval;
            site.provider = provider;
            site.health.reconfigure(&self.config.health, now);
            if let Some(p) = provider {
                self.providers[p].workers += site.workers;
            }
            self.kick(key);
        }
    }

    /// The provider of a site: the first rule that covers one of its MX hosts.
    fn provider_for(&self, key: &SiteKey, hosts: &[String]) -> Option<usize> {
        if matches!(key, SiteKey::Smarthost(_)) {
            return None;
        }
        self.config
            .providers
            .iter()
            .position(|rule| hosts.iter().any(|h| rule.covers(h)))
    }

    /// Lowers the rate of the site's provider (or of the site, if it has none) to one message
    /// per `interval` until `until`; the name slowed, or None if a slow-down at least as
    /// strong is in force already (or the site is gone).
    pub fn slow(&mut self, key: &SiteKey, interval: Duration, until: Instant, until_unix_s: u64) -> Option<String> {
        let slowdown = Slowdown {
            interval,
            until,
            until_unix_s,
        };
        let site = self.sites.get_mut(key)?;
        match site.provider {
            Some(p) => {
                let provider = &mut self.providers[p];
                provider
                    .pace
                    .slow(slowdown)
                    .then(|| format!("provider {}", provider.name))
            }
            None => site.pace.slow(slowdown).then(|| site.name.clone()),
        }
    }

    /// The slow-downs in force at `now`: (provider or site name, slow-down).
    pub fn slowdowns(&mut self, now: Instant) -> Vec<(String, Slowdown)> {
        let mut out = Vec::new();
        for p in &mut self.providers {
            p.pace.current(now);
            if let Some(s) = p.pace.slowed {
                out.push((format!("provider {}", p.name), s));
            }
        }
        for site in self.sites.values_mut() {
            site.pace.current(now);
            if let Some(s) = site.pace.slowed {
                out.push((site.name.clone(), s));
            }
        }
        out
    }

    /// The providers, in rule order.
    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    /// Pauses the provider of the site `key` until `until_unix_s` (see [`Provider`]); its
    /// name, or None if the site has no provider or it is paused that long already.
    pub fn pause_provider_of(&mut self, key: &SiteKey, until_unix_s: u64) -> Option<String> {
        let p = self.provider_index_of(key)?;
        self.pause_provider(p, until_unix_s)
    }

    /// The index of the site's provider in [`Scheduler::providers`]: rule order, so the same
    /// index names the same provider in every shard.
    pub fn provider_index_of(&self, key: &SiteKey) -> Option<usize> {
        self.sites.get(key)?.provider
    }

    /// Pauses provider `p` until `until_unix_s` (a pause another shard published, say): its
    /// name, or None if there is no such provider or it is paused that long already.
    pub fn pause_provider(&mut self, p: usize, until_unix_s: u64) -> Option<String> {
        let provider = self.providers.get_mut(p)?;
        if provider.paused_until_unix_s.is_some_and(|u| u >= until_unix_s) {
            return None;
        }
        provider.paused_until_unix_s = Some(until_unix_s);
        Some(provider.name.clone())
    }

    /// Ends the pauses past their time (the shell's tick): their names; their sites with work
    /// are kicked.
    pub fn resume_providers(&mut self, now_unix_s: u64) -> Vec<String> {
        let mut resumed = Vec::new();
        for (p, provider) in self.providers.iter_mut().enumerate() {
            if provider.paused_until_unix_s.is_some_and(|u| u <= now_unix_s) {
                provider.paused_until_unix_s = None;
                resumed.push((p, provider.name.clone()));
            }
        }
        for (p, _) in &resumed {
            let waiting: Vec<SiteKey> = self
                .sites
                .iter()
                .filter(|(_, s)| s.provider == Some(*p) && !s.pending.is_empty())
                .map(|(k, _)| k.clone())
                .collect();
            for key in waiting {
                self.kick(key);
            }
        }
        resumed.into_iter().map(|(_, name)| name).collect()
    }

    /// Whether the site's provider is paused.
    pub fn provider_paused(&self, key: &SiteKey) -> bool {
        self.sites
            .get(key)
            .and_then(|s| s.provider)
            .is_some_and(|p| self.providers[p].paused_until_unix_s.is_some())
    }

    /// A job at `site` ended while its provider is paused: `done` recipients are finished and
    /// the `waiting` ones (deferred by the reply that paused it) wait at the site, in a job of
    /// their own at the head of `lane`, for the pause to end: no attempt is counted and no
    /// retry timer set, so the pause and the message's backoff never add up.
    pub fn complete_waiting(
        &mut self,
        id: MessageId,
        done: &[u32],
        waiting: Waiting,
        delay_notified: bool,
        now: Now,
    ) -> Option<Completed> {
        let Waiting { recipients, site, lane } = waiting;
        // A message the operator held meanwhile waits for its release, not at the site.
        let held = self.queue.get(&id).is_some_and(|m| m.held);
        if recipients.is_empty() || held || !self.sites.contains_key(&site) {
            return self.complete(id, done, delay_notified, now);
        }
        let message = self.queue.get_mut(&id)?;
        message.delay_notified |= delay_notified;
        for &index in done {
            message.done.insert(index as usize);
        }
        self.state
            .outcomes
            .extend(done.iter().map(|&index| StateEntry { id, recipient: index }));
        // The ended job is replaced by the waiting one: jobs_outstanding stays.
        let job = Job {
            id,
            recipients,
            lane,
            site: site.clone(),
            retried_on_fresh_connection: false,
        };
        self.sites
            .get_mut(&site)
            .expect("checked")
            .pending
            .push_front(lane, job);
        Some(Completed::Pending)
    }

    pub fn queue(&self) -> &QueueIndex {
        &self.queue
    }

    pub fn random(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// After recovery: messages whose next attempt lies ahead wait for it (a restart keeps the
    /// retry schedule); returns the rest, to plan now.
    pub fn recovered(&mut self, now: Now) -> Vec<MessageId> {
        let mut ready = Vec::new();
        let waiting: Vec<(MessageId, Option<u64>)> = self
            .queue
            .ids()
            .map(|id| (id, self.queue.get(&id).and_then(|m| m.next_attempt_unix_s)))
            .collect();
        for (id, next) in waiting {
            if self.queue.get(&id).is_some_and(|m| m.held) {
                continue;
            }
            match next {
                Some(at) if at > now.unix_s => {
                    let due = now.instant + Duration::from_secs(at - now.unix_s);
                    self.retries.insert((due, id));
                }
                _ => ready.push(id),
            }
        }
        ready.sort();
        ready
    }

    /// A newly spooled message (plan it next).
    pub fn insert(&mut self, message: QueuedMessage) {
        debug_assert_eq!(message.jobs_outstanding, 0);
        self.queue.insert(message);
    }

    /// Messages whose retry time has come.
    pub fn due(&mut self, now: Instant) -> Vec<MessageId> {
        let mut due = Vec::new();
        while let Some(&(at, id)) = self.retries.first() {
            if at > now {
                break;
            }
            self.retries.pop_first();
            due.push(id);
        }
        due
    }

    /// Every message waiting for a retry, to try now (an operator's flush); down sites with
    /// mail waiting are probed now too.
    pub fn retry_all_now(&mut self) -> Vec<MessageId> {
        self.probe_down_now();
        std::mem::take(&mut self.retries)
            .into_iter()
            .map(|(_, id)| id)
            .collect()
    }

    /// Lets every down site with mail waiting probe now (an operator's flush); how many.
    pub fn probe_down_now(&mut self) -> usize {
        self.start_probes(|health| health.probe_now()).len()
    }

    /// Starts the probes `start` lets go, of down sites with mail waiting (kicked for their
    /// one worker); those sites.
    fn start_probes(&mut self, mut start: impl FnMut(&mut crate::health::Health) -> bool) -> Vec<SiteKey> {
        let started: Vec<SiteKey> = self
            .sites
            .iter_mut()
            .filter(|(_, s)| !s.pending.is_empty())
            .filter_map(|(k, s)| start(&mut s.health).then(|| k.clone()))
            .collect();
        for key in &started {
            self.kick(key.clone());
        }
        started
    }

    /// Those of `ids` that wait for a retry, taken out of the retry timers to be tried now
    /// (an operator's flush of a selection). One pass over the timers.
    pub fn retry_now(&mut self, ids: &[MessageId]) -> Vec<MessageId> {
        let wanted: std::collections::HashSet<MessageId> = ids.iter().copied().collect();
        let mut taken = Vec::new();
        self.retries.retain(|(_, id)| {
            let take = wanted.contains(id);
            if take {
                taken.push(*id);
            }
            !take
        });
        taken
    }

    /// Suspends delivery to a recipient domain until `until_unix_s`. False when the table of
    /// suspensions is full.
    pub fn suspend(&mut self, domain: &str, until_unix_s: u64) -> bool {
        self.suspensions.suspend(domain, until_unix_s)
    }

    /// Ends a suspension; the parked messages to plan now.
    pub fn resume(&mut self, domain: &str) -> Vec<MessageId> {
        let ids = self.suspensions.resume(domain);
        self.still_queued(ids)
    }

    /// Ends the suspensions past their time; the parked messages to plan now.
    pub fn expire_suspensions(&mut self, now_unix_s: u64) -> Vec<MessageId> {
        let ids = self.suspensions.expire(now_unix_s);
        self.still_queued(ids)
    }

    fn still_queued(&self, ids: Vec<MessageId>) -> Vec<MessageId> {
        ids.into_iter().filter(|id| self.queue.get(id).is_some()).collect()
    }

    /// Whether a message waits for a suspension to end.
    pub fn is_parked(&self, id: &MessageId) -> bool {
        self.suspensions.is_parked(id)
    }

    pub fn suspensions(&self) -> &Suspensions {
        &self.suspensions
    }

    /// Holds the messages of `ids` that are not held yet: they leave the retry timers and the
    /// sites' queues (mail waiting at a paused provider or a down destination included) and are
    /// not planned until released; one on a connection finishes its attempt first. Returns the
    /// retry schedules (with the hold) that the shell must write, durably, before it says so.
    pub fn hold(&mut self, ids: &[MessageId], now: Now) -> Vec<Deferral> {
        let wanted: std::collections::HashSet<MessageId> = ids.iter().copied().collect();
        self.retries.retain(|(_, id)| !wanted.contains(id));
        let mut entries = Vec::new();
        for id in ids {
            let Some(message) = self.queue.get_mut(id) else {
                continue;
            };
            if message.held {
                continue;
            }
            message.held = true;
            let next = *message.next_attempt_unix_s.get_or_insert(now.unix_s);
            entries.push(Deferral {
                id: *id,
                attempts: message.attempts,
                next_attempt_unix_s: next,
                delay_notified: message.delay_notified,
                held: true,
            });
        }
        self.withdraw_queued(ids, false);
        entries
    }

    /// Releases the held messages of `ids`: due now. Returns their schedules to write durably
    /// and the ids, which the shell plans at once.
    pub fn release(&mut self, ids: &[MessageId], now: Now) -> (Vec<Deferral>, Vec<MessageId>) {
        let mut entries = Vec::new();
        let mut released = Vec::new();
        for id in ids {
            let Some(message) = self.queue.get_mut(id) else {
                continue;
            };
            if !message.held {
                continue;
            }
            message.held = false;
            message.next_attempt_unix_s = Some(now.unix_s);
            entries.push(Deferral {
                id: *id,
                attempts: message.attempts,
                next_attempt_unix_s: now.unix_s,
                delay_notified: message.delay_notified,
                held: false,
            });
            if message.jobs_outstanding == 0 {
                released.push(*id);
            }
        }
        (entries, released)
    }

    /// Takes the jobs of `ids` out of the sites' queues, for the messages whose every job out
    /// is queued at a site (none on a connection or being routed): mail that waits at a paused
    /// provider or a down destination can then be deleted or bounced at once instead of being
    /// busy until the wait ends. Those messages have no job out afterwards, and the caller
    /// removes them or plans them again. Returns them. O(queued jobs + ids).
    pub fn withdraw(&mut self, ids: &[MessageId]) -> Vec<MessageId> {
        self.withdraw_queued(ids, true)
    }

    /// Takes the queued jobs of `ids` out of the sites' queues: of every message that has
    /// any (`whole == false`), or only of those whose every job out is queued. Returns the
    /// messages withdrawn from.
    fn withdraw_queued(&mut self, ids: &[MessageId], whole: bool) -> Vec<MessageId> {
        let mut queued: HashMap<MessageId, u32> = ids
            .iter()
            .filter(|id| self.queue.get(id).is_some_and(|m| m.jobs_outstanding > 0))
            .map(|id| (*id, 0))
            .collect();
        if queued.is_empty() {
            return Vec::new();
        }
        let mut at: Vec<SiteKey> = Vec::new();
        for (key, site) in &self.sites {
            let mut here = false;
            for job in site.pending.iter() {
                if let Some(n) = queued.get_mut(&job.id) {
                    *n += 1;
                    here = true;
                }
            }
            if here {
                at.push(key.clone());
            }
        }
        queued.retain(|id, n| *n > 0 && (!whole || self.queue.get(id).is_some_and(|m| m.jobs_outstanding == *n)));
        for key in &at {
            let site = self.sites.get_mut(key).expect("listed above");
            site.pending.take_if(|job| queued.contains_key(&job.id));
        }
        for (id, n) in &queued {
            let message = self.queue.get_mut(id).expect("counted above");
            assert!(message.jobs_outstanding >= *n, "more jobs queued than counted");
            message.jobs_outstanding -= n;
        }
        queued.into_keys().collect()
    }

    /// Forgets the messages of `ids` that no delivery job holds now (an operator's delete or
    /// bounce): out of the index and the timers. Returns the tombstones the shell must write
    /// durably; ids with jobs out are left alone (the caller reports them as busy).
    pub fn remove(&mut self, ids: &[MessageId]) -> Vec<StateEntry> {
        let wanted: std::collections::HashSet<MessageId> = ids.iter().copied().collect();
        let mut gone = Vec::new();
        for id in ids {
            if self.queue.get(id).is_some_and(|m| m.jobs_outstanding == 0) {
                self.queue.finish(*id);
                self.suspensions.forget(id);
                gone.push(StateEntry { id: *id, recipient: 0 });
            }
        }
        let gone_ids: std::collections::HashSet<MessageId> = gone.iter().map(|e| e.id).collect();
        self.retries
            .retain(|(_, id)| !(wanted.contains(id) && gone_ids.contains(id)));
        gone
    }

    /// Takes a message out of the retry timers (to copy it forward); its due time.
    pub fn take_retry(&mut self, id: MessageId) -> Option<Instant> {
        let entry = self.retries.iter().find(|(_, i)| *i == id).copied()?;
        self.retries.remove(&entry);
        Some(entry.0)
    }

    pub fn put_retry(&mut self, id: MessageId, due: Instant) {
        self.retries.insert((due, id));
    }

    /// Messages waiting for a retry.
    pub fn retries_len(&self) -> usize {
        self.retries.len()
    }

    /// Groups a message's pending recipients by route: smarthost groups are queued at once;
    /// MX groups come back for the shell to look up. None when the message is gone or has jobs
    /// out already.
    pub fn plan(&mut self, id: MessageId, now: Instant) -> Option<Plan> {
        let message = self.queue.get(&id)?;
        if message.jobs_outstanding > 0 || message.held {
            return None;
        }
        let lane = if message.is_bounce() {
            Lane::Bounce
        } else if message.attempts > 0 {
            Lane::Retry
        } else {
            Lane::Fresh
        };
        let mut smarthost: Vec<(SocketAddr, Vec<u32>)> = Vec::new();
        let mut resolve: Vec<(String, Vec<u32>)> = Vec::new();
        let mut unrouted = Vec::new();
        let mut stopped = 0;
        for (i, recipient) in message.envelope.view().recipients().enumerate() {
            if message.done.contains(i) {
                continue;
            }
            let domain = domain_of(recipient.address);
            if self.suspensions.stops(domain) {
                stopped += 1;
                continue;
            }
            let i = i as u32;
            match self.route(domain) {
                Some(RouteTarget::Smarthost(addr)) => match smarthost.iter_mut().find(|(a, _)| *a == addr) {
                    Some((_, list)) => list.push(i),
                    None => smarthost.push((addr, vec![i])),
                },
                Some(RouteTarget::Mx) if !domain.is_empty() => {
                    let domain = String::from_utf8_lossy(domain).to_ascii_lowercase();
                    match resolve.iter_mut().find(|(d, _)| *d == domain) {
                        Some((_, list)) => list.push(i),
                        None => resolve.push((domain, vec![i])),
                    }
                }
                _ => unrouted.push(i),
            }
        }
        let jobs = smarthost.len() + resolve.len() + usize::from(!unrouted.is_empty());
        if jobs == 0 && stopped > 0 {
            // Everything it still has to deliver is suspended: it waits for the suspension.
            self.suspensions.park(id);
            return None;
        }
        self.queue.get_mut(&id).expect("checked").jobs_outstanding = jobs as u32;
        for (addr, recipients) in smarthost {
            let key = SiteKey::Smarthost(addr);
            let job = Job {
                id,
                recipients,
                lane,
                site: key.clone(),
                retried_on_fresh_connection: false,
            };
            self.place(key, addr.to_string(), Vec::new(), job, now);
        }
        Some(Plan {
            id,
            lane,
            resolve,
            unrouted,
        })
    }

    /// The route of a domain: the first exact match, else `*`.
    pub fn route(&self, domain: &[u8]) -> Option<RouteTarget> {
        let routes = &self.config.routes;
        routes
            .iter()
            .find(|r| r.domain.as_bytes().eq_ignore_ascii_case(domain))
            .or_else(|| routes.iter().find(|r| r.domain == "*"))
            .map(|r| r.target)
    }

    /// Queues a group of a plan for the site its domain's MX hosts make (`hosts` in preference
    /// order, as the lookup found them).
    pub fn place_mx(
        &mut self,
        id: MessageId,
        lane: Lane,
        recipients: Vec<u32>,
        domain: &str,
        hosts: Vec<String>,
        now: Instant,
    ) {
        let key = SiteKey::mx(&hosts);
        let job = Job {
            id,
            recipients,
            lane,
            site: key.clone(),
            retried_on_fresh_connection: false,
        };
        self.place(key, domain.to_string(), hosts, job, now);
    }

    fn place(&mut self, key: SiteKey, name: String, hosts: Vec<String>, job: Job, now: Instant) {
        if self.config.one_recipient_per_job && job.recipients.len() > 1 {
            let message = self.queue.get_mut(&job.id);
            if let Some(message) = message.filter(|m| !m.is_bounce()) {
                // The planned job counted once; each of its recipients becomes a job.
                message.jobs_outstanding += job.recipients.len() as u32 - 1;
                for &recipient in &job.recipients {
                    let single = Job {
                        recipients: vec![recipient],
                        ..job.clone()
                    };
                    self.place_one(key.clone(), name.clone(), hosts.clone(), single, now);
                }
                return;
            }
        }
        self.place_one(key, name, hosts, job, now);
    }

    fn place_one(&mut self, key: SiteKey, name: String, hosts: Vec<String>, job: Job, now: Instant) {
        if !self.sites.contains_key(&key) {
            if self.sites.len() >= self.config.sites_max {
                self.evict_least_recent(now);
            }
            let provider = self.provider_for(&key, &hosts);
            let limits = self.limits_for(&key, &name, &hosts, provider);
            let mut site = Site::new(key.clone(), name, hosts, limits, now);
            site.provider = provider;
            self.sites.insert(key.clone(), site);
        }
        let site = self.sites.get_mut(&key).expect("just made");
        site.pending.push_back(job.lane, job);
        site.last_active = now;
        self.kick(key);
    }

    /// The limits of the first rule that matches the site's name or one of its MX hosts.
    fn limits_for(&self, key: &SiteKey, name: &str, hosts: &[String], provider: Option<usize>) -> SiteLimits {
        let c = &self.config;
        let rule = c
            .site_rules
            .iter()
            .find(|r| r.matches(name) || hosts.iter().any(|h| r.matches(h)))
            .or_else(|| match key {
                SiteKey::Smarthost(_) => None,
                SiteKey::Mx(sorted) => c.site_rules.iter().find(|r| sorted.iter().any(|h| r.matches(h))),
            });
        SiteLimits {
            connections_max: self.config.per_shard(
                rule.and_then(|r| r.connections_max)
                    .unwrap_or(c.connections_per_site_max),
            ),
            messages_per_connection_max: rule
                .and_then(|r| r.messages_per_connection_max)
                .or_else(|| provider.and_then(|p| self.providers[p].messages_per_connection_max))
                .unwrap_or(c.messages_per_connection_max),
            send_interval: rule
                .and_then(|r| r.messages_per_second)
                .map(|rate| Duration::from_secs_f64(1.0 / rate)),
        }
    }

    /// Notes that a site may want another worker.
    fn kick(&mut self, key: SiteKey) {
        if let Some(site) = self.sites.get_mut(&key) {
            if !site.kicked {
                site.kicked = true;
                self.kicked.push_back(key);
            }
        }
    }

    /// A site with work and room for another connection, if any: counts the worker (the shell
    /// must run one for it and call [`Scheduler::worker_ended`] when it stops).
    pub fn next_worker(&mut self) -> Option<SiteKey> {
        while self.workers_total < self.config.connections_per_shard_max {
            let key = self.kicked.pop_front()?;
            let Some(site) = self.sites.get_mut(&key) else {
                continue;
            };
            site.kicked = false;
            let provider_full = site.provider.is_some_and(|p| {
                let provider = &self.providers[p];
                provider.workers >= provider.connections_max || provider.paused_until_unix_s.is_some()
            });
            if site.pending.is_empty()
                || site.workers >= site.limits.connections_max
                || provider_full
                || (site.capped && site.workers > 0)
                || !site.health.may_start_worker(site.workers)
            {
                // A site waiting on its provider is kicked again when the provider frees a place.
                continue;
            }
            site.capped = false;
            site.workers += 1;
            self.workers_total += 1;
            if let Some(p) = site.provider {
                self.providers[p].workers += 1;
            }
            // More work than workers: it may take another one too (not while it is down: one
            // probe at a time).
            if site.pending.len() > site.workers
                && site.workers < site.limits.connections_max
                && site.health.down().is_none()
            {
                site.kicked = true;
                self.kicked.push_back(key.clone());
            }
            return Some(key);
        }
        None
    }

    /// The next job for a worker of `key` (lanes served in turn), if any.
    pub fn next_job(&mut self, key: &SiteKey, now: Instant) -> Option<Job> {
        let site = self.sites.get_mut(key)?;
        site.last_active = now;
        if site
            .provider
            .is_some_and(|p| self.providers[p].paused_until_unix_s.is_some())
        {
            // Paused: the worker stops; the job waits for the pause to end.
            return None;
        }
        site.pending.pop()
    }

    /// How long the worker must wait before its job may start, under the site's rate.
    pub fn rate_wait(&mut self, key: &SiteKey, now: Instant) -> Duration {
        let Some(site) = self.sites.get_mut(key) else {
            return Duration::ZERO;
        };
        let own = site.pace.wait(now);
        match site.provider {
            Some(p) => own.max(self.providers[p].pace.wait(now)),
            None => own,
        }
    }

    /// A job goes back to the head of its lane (its connection died, or it was sent ahead on
    /// a connection that is going away).
    pub fn requeue(&mut self, job: Job) {
        let key = job.site.clone();
        if let Some(site) = self.sites.get_mut(&key) {
            site.pending.push_front(job.lane, job);
            self.kick(key);
        }
    }

    /// The next job to send right behind a message's content (RFC 2920 3.1), when the site has
    /// no rate and the connection has room for two more messages.
    pub fn take_ahead(&mut self, key: &SiteKey, messages_on_connection: usize) -> Option<Job> {
        let site = self.sites.get_mut(key)?;
        if site
            .provider
            .is_some_and(|p| self.providers[p].paused_until_unix_s.is_some())
        {
            return None;
        }
        // A slow-down that has just ended still counts: conservative, and no clock here.
        let paced = site.pace.interval.is_some()
            || site.pace.slowed.is_some()
            || site
                .provider
                .is_some_and(|p| self.providers[p].pace.interval.is_some() || self.providers[p].pace.slowed.is_some());
        if paced || messages_on_connection + 2 > site.limits.messages_per_connection_max {
            return None;
        }
        site.pending.pop()
    }

    pub fn messages_per_connection_max(&self, key: &SiteKey) -> usize {
        self.sites
            .get(key)
            .map_or(self.config.messages_per_connection_max, |s| {
                s.limits.messages_per_connection_max
            })
    }

    /// A job goes back to the head of its lane without asking for a worker (its worker stopped
    /// for a connection cap; the site's other workers, or the next worker that ends, take it).
    pub fn requeue_quietly(&mut self, job: Job) {
        if let Some(site) = self.sites.get_mut(&job.site) {
            site.pending.push_front(job.lane, job);
        }
    }

    /// A worker of `key` stopped: its place goes to a site that waits for one. `rekick`: the
    /// site may get another worker for what it still has queued (not when the worker stopped
    /// because of a connection cap: another would only meet the same cap).
    pub fn worker_ended(&mut self, key: &SiteKey, rekick: bool, now: Instant) {
        let site = self.sites.get_mut(key).expect("a worker's site is never evicted");
        assert!(site.workers > 0 && self.workers_total > 0, "worker accounting");
        site.workers -= 1;
        self.workers_total -= 1;
        let provider = site.provider;
        if let Some(p) = provider {
            assert!(self.providers[p].workers > 0, "provider worker accounting");
            let was_full = self.providers[p].workers >= self.providers[p].connections_max;
            self.providers[p].workers -= 1;
            if was_full {
                // Its other sites may have been passed over for the provider's cap.
                let waiting: Vec<SiteKey> = self
                    .sites
                    .iter()
                    .filter(|(k, s)| *k != key && s.provider == Some(p) && !s.pending.is_empty())
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in waiting {
                    self.kick(k);
                }
            }
        }
        let site = self.sites.get_mut(key).expect("a worker's site is never evicted");
        site.last_active = now;
        site.capped = !rekick;
        if rekick && !site.pending.is_empty() {
            self.kick(key.clone());
        }
        // A shard-wide place is free: the first site that waits for one is already kicked, or
        // find one.
        if self.kicked.is_empty() {
            let waiting = self
                .sites
                .iter()
                .find(|(_, s)| {
                    !s.pending.is_empty()
                        && s.workers < s.limits.connections_max
                        && s.health.may_start_worker(s.workers)
                })
                .map(|(k, _)| k.clone());
            if let Some(k) = waiting {
                self.kick(k);
            }
        }
    }

    /// Asks workers for sites that have work but none (one whose worker stopped for a
    /// connection cap). Called now and then.
    pub fn kick_stranded(&mut self) {
        let stranded: Vec<SiteKey> = self
            .sites
            .iter()
            .filter(|(_, s)| s.workers == 0 && !s.pending.is_empty() && !s.kicked && s.health.may_start_worker(0))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stranded {
            self.kick(key);
        }
    }

    /// A connection to `key` could not be opened (refused, timed out, no greeting, no address
    /// for now): counts toward marking it down, or fails its probe.
    pub fn connection_failed(&mut self, key: &SiteKey, now: Instant) -> Change {
        let rules = self.config.health;
        self.sites
            .get_mut(key)
            .map_or(Change::None, |s| s.health.failed(&rules, now))
    }

    /// A connection to `key` was opened: a site that was down is up, and its waiting jobs get
    /// workers again.
    pub fn connection_opened(&mut self, key: &SiteKey, now: Instant) -> Change {
        let Some(site) = self.sites.get_mut(key) else {
            return Change::None;
        };
        let change = site.health.succeeded(now);
        if matches!(change, Change::Up { .. }) {
            self.kick(key.clone());
        }
        change
    }

    /// Lets the due probes of down sites with waiting work start (each gets one worker from
    /// [`Scheduler::next_worker`]); the sites, for the log. Called now and then.
    pub fn due_probes(&mut self, now: Instant) -> Vec<SiteKey> {
        self.start_probes(|health| health.probe_due(now))
    }

    /// The jobs waiting at a down site whose messages have outlived the queue lifetime (the
    /// shell finishes them deferred, which expires them): waiting for a probe never keeps a
    /// message past its lifetime.
    pub fn take_expired_waiting(&mut self, key: &SiteKey, now_unix_s: u64) -> Vec<Job> {
        let lifetime_s = self.config.queue_lifetime.as_secs();
        let queue = &self.queue;
        let Some(site) = self.sites.get_mut(key) else {
            return Vec::new();
        };
        if site.health.down().is_none() {
            return Vec::new();
        }
        site.pending.take_if(|job| {
            queue
                .get(&job.id)
                .is_some_and(|m| now_unix_s.saturating_sub(m.envelope.view().received_unix_s) > lifetime_s)
        })
    }

    /// Sites down now (counted for the metrics, listed for the API).
    pub fn sites_down(&self) -> impl Iterator<Item = &Site> {
        self.sites.values().filter(|s| s.health.down().is_some())
    }

    /// Everything queued for a site that cannot be reached (the shell finishes each job with
    /// the failure).
    pub fn drain_site(&mut self, key: &SiteKey) -> Vec<Job> {
        self.sites.get_mut(key).map_or_else(Vec::new, |s| s.pending.drain())
    }

    pub fn site(&self, key: &SiteKey) -> Option<&Site> {
        self.sites.get(key)
    }

    pub fn sites_len(&self) -> usize {
        self.sites.len()
    }

    pub fn workers_total(&self) -> usize {
        self.workers_total
    }

    /// Sorts out a job's results: who is finished, who is owed a failure or delay notice.
    /// None if the message is gone.
    pub fn classify(&self, id: MessageId, results: &[(u32, RecipientResult)], now: Now) -> Option<Classified> {
        let message = self.queue.get(&id)?;
        let view = message.envelope.view();
        let age_s = now.unix_s.saturating_sub(view.received_unix_s);
        let expired = age_s > self.config.queue_lifetime.as_secs();
        let warn_s = self.config.delay_warning_after.as_secs();
        let warn_delay = warn_s > 0 && age_s >= warn_s && !message.delay_notified;
        let mut c = Classified::default();
        let notify_of: Vec<u8> = view.recipients().map(|r| r.notify).collect();
        for (index, result) in results {
            let notify = notify_of.get(*index as usize).copied();
            let verdict = match result {
                RecipientResult::Delivered(_) => Verdict::Delivered,
                RecipientResult::Failed(_) => Verdict::Failed,
                RecipientResult::Deferred(_) if expired => Verdict::Expired,
                RecipientResult::Deferred(_) => Verdict::Deferred,
            };
            c.verdicts.push((*index, verdict));
            match verdict {
                Verdict::Delivered => c.done.push(*index),
                Verdict::Failed | Verdict::Expired => {
                    if dsn::wants_notice(view.sender, notify, notify::FAILURE) {
                        c.bounce.push(*index);
                    } else {
                        c.done.push(*index);
                    }
                }
                Verdict::Deferred => {
                    if warn_delay && dsn::wants_notice(view.sender, notify, notify::DELAY) {
                        c.delayed.push(*index);
                    }
                }
            }
        }
        Some(c)
    }

    /// A job ended: `done` recipients are finished (delivered, or failed with their notice
    /// spooled or none wanted), `delay_notified` if a delay notice went out. Records the state
    /// and, when it was the message's last job, finishes it or sets its next attempt.
    pub fn complete(&mut self, id: MessageId, done: &[u32], delay_notified: bool, now: Now) -> Option<Completed> {
        let message = self.queue.get_mut(&id)?;
        message.delay_notified |= delay_notified;
        for &index in done {
            message.done.insert(index as usize);
        }
        assert!(message.jobs_outstanding > 0, "a job ended that was never counted");
        message.jobs_outstanding -= 1;
        if message.pending_recipients() == 0 {
            // A finished message needs only its tombstone, not an outcome per recipient.
            self.state.tombstones.push(StateEntry {
                id,
                recipient: u32::MAX,
            });
            self.queue.finish(id);
            return Some(Completed::Finished);
        }
        self.state
            .outcomes
            .extend(done.iter().map(|&index| StateEntry { id, recipient: index }));
        if message.jobs_outstanding > 0 {
            return Some(Completed::Pending);
        }
        if let Some(until_unix_s) = self.suspended_until(id) {
            // Everything it has left waits for a suspension (an operator's, or a bounce
            // class's `suspend` action): it parks without a backoff step, so the suspension
            // and the message's own retry timing never add up.
            let message = self.queue.get_mut(&id).expect("checked");
            message.next_attempt_unix_s = Some(until_unix_s);
            self.state.deferrals.push(Deferral {
                id,
                attempts: message.attempts,
                next_attempt_unix_s: until_unix_s,
                delay_notified: message.delay_notified,
                held: message.held,
            });
            if !message.held {
                self.suspensions.park(id);
            }
            return Some(Completed::Retry {
                at_unix_s: until_unix_s,
            });
        }
        let message = self.queue.get_mut(&id).expect("checked");
        message.attempts += 1;
        let delay = self.config.retry.delay(message.attempts, self.rng.next_u64());
        let at_unix_s = now.unix_s + delay.as_secs();
        message.next_attempt_unix_s = Some(at_unix_s);
        self.state.deferrals.push(Deferral {
            id: message.id,
            attempts: message.attempts,
            next_attempt_unix_s: at_unix_s,
            delay_notified: message.delay_notified,
            held: message.held,
        });
        // Held while it was being delivered: it waits for its release, not for a timer.
        if !message.held {
            self.retries.insert((now.instant + delay, id));
        }
        Some(Completed::Retry { at_unix_s })
    }

    /// Finishes recipients of `id` without a delivery and without a notice (the shell found
    /// them on its suppression list before planning). Only between jobs, and not while the
    /// message is held; None then, or when `id` is gone. `Finished` when nothing is left.
    pub fn finish_undelivered(&mut self, id: MessageId, indexes: &[u32]) -> Option<Completed> {
        let message = self.queue.get_mut(&id)?;
        if message.jobs_outstanding > 0 || message.held {
            return None;
        }
        let count = message.envelope.view().recipient_count();
        let mut newly_done = Vec::with_capacity(indexes.len());
        for &index in indexes {
            if (index as usize) < count && !message.done.contains(index as usize) {
                message.done.insert(index as usize);
                newly_done.push(index);
            }
        }
        if message.pending_recipients() == 0 {
            self.state.tombstones.push(StateEntry {
                id,
                recipient: u32::MAX,
            });
            self.queue.finish(id);
            self.suspensions.forget(&id);
            self.retries.retain(|(_, i)| *i != id);
            return Some(Completed::Finished);
        }
        self.state
            .outcomes
            .extend(newly_done.iter().map(|&index| StateEntry { id, recipient: index }));
        Some(Completed::Pending)
    }

    /// When the last suspension stopping every pending recipient of `id` ends; None if one of
    /// them is not suspended.
    fn suspended_until(&self, id: MessageId) -> Option<u64> {
        let message = self.queue.get(&id)?;
        let mut latest = None;
        for (i, recipient) in message.envelope.view().recipients().enumerate() {
            if message.done.contains(i) {
                continue;
            }
            let until = self.suspensions.until_unix_s(domain_of(recipient.address))?;
            latest = latest.max(Some(until));
        }
        latest
    }

    /// The delivery state gathered since the last call.
    pub fn take_state(&mut self) -> PendingState {
        std::mem::take(&mut self.state)
    }

    pub fn has_state(&self) -> bool {
        !self.state.is_empty()
    }

    /// Copy forward: the message `old` (waiting for a retry) now lives in record `new_id`.
    /// Queues the original's tombstone and the copy's retry schedule. False if `old` is gone
    /// (then the copy gets a tombstone: it must not bring a finished message back).
    pub fn moved(&mut self, old: MessageId, new_id: MessageId, record_bytes: u32) -> bool {
        let Some(mut message) = self.queue.finish(old) else {
            self.state.tombstones.push(StateEntry {
                id: new_id,
                recipient: 0,
            });
            return false;
        };
        message.id = new_id;
        message.record_bytes = record_bytes;
        if let Some(next_attempt_unix_s) = message.next_attempt_unix_s {
            self.state.deferrals.push(Deferral {
                id: new_id,
                attempts: message.attempts,
                next_attempt_unix_s,
                delay_notified: message.delay_notified,
                held: message.held,
            });
        }
        self.queue.insert(message);
        self.state.tombstones.push(StateEntry { id: old, recipient: 0 });
        true
    }

    /// Evicts sites with nothing to do for `site_idle` (failing ones: see below); returns them (the shell closes their
    /// pooled connections).
    pub fn evict_idle(&mut self, now: Instant) -> Vec<SiteKey> {
        let idle = self.config.site_idle;
        // A site with connection failures to remember is kept longer (up to the longest wait
        // between probes), so that a trickle of mail to a dead host still adds up to "down"
        // instead of starting afresh with each message; a full table may still evict it.
        let idle_failing = idle.max(self.config.health.probe_interval_max);
        let gone: Vec<SiteKey> = self
            .sites
            .iter()
            .filter(|(_, s)| {
                let wait = if s.health.remembers() { idle_failing } else { idle };
                s.idle() && now.saturating_duration_since(s.last_active) >= wait
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in &gone {
            self.sites.remove(key);
        }
        gone
    }

    /// At `sites_max`: evicts the idle site least recently active, if there is one (sites with
    /// work are bounded by the queue itself).
    fn evict_least_recent(&mut self, _now: Instant) {
        let victim = self
            .sites
            .iter()
            .filter(|(_, s)| s.idle())
            // Healthy sites first: a failing one's count is worth keeping.
            .min_by_key(|(_, s)| (s.health.remembers(), s.last_active))
            .map(|(k, _)| k.clone());
        if let Some(key) = victim {
            self.sites.remove(&key);
            self.evicted.push(key);
        }
    }

    /// Sites evicted to make room since the last call (the shell closes their pools).
    pub fn take_evicted(&mut self) -> Vec<SiteKey> {
        std::mem::take(&mut self.evicted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gannet_smtp::client::ServerReply;
    use gannet_smtp::envelope::{Envelope, Origin};
    use gannet_spool::record::EnvelopeBytes;

    const SMARTHOST: &str = "192.0.2.25:25";

    fn config() -> SchedConfig {
        SchedConfig {
            shard: 0,
            shard_count: 1,
            routes: vec![
                Route {
                    domain: "relay.test".into(),
                    target: RouteTarget::Smarthost(SMARTHOST.parse().unwrap()),
                },
                Route {
                    domain: "*".into(),
                    target: RouteTarget::Mx,
                },
            ],
            site_rules: vec![],
            connections_per_site_max: 2,
            messages_per_connection_max: 100,
            connections_per_shard_max: 3,
            sites_max: 4,
            retry: RetrySchedule {
                first: Duration::from_secs(60),
                max: Duration::from_secs(600),
            },
            queue_lifetime: Duration::from_secs(3600),
            delay_warning_after: Duration::from_secs(1800),
            site_idle: Duration::from_secs(10),
            seed: 1,
            health: crate::health::HealthRules::NEVER,
            one_recipient_per_job: false,
            providers: vec![],
        }
    }

    fn now(t0: Instant, s: u64) -> Now {
        Now {
            instant: t0 + Duration::from_secs(s),
            unix_s: 1_000_000 + s,
        }
    }

    fn message(n: u32, sender: &str, to: &[&str]) -> QueuedMessage {
        let mut e = Envelope::default();
        e.set_sender(|b| b.extend_from_slice(sender.as_bytes()));
        for r in to {
            e.add_recipient(|b| b.extend_from_slice(r.as_bytes()), 0, b"");
        }
        let origin = Origin {
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: b"c",
            received_unix_s: 1_000_000,
        };
        QueuedMessage::new(
            MessageId::new(1, 0, u64::from(n) * 4096),
            100,
            10,
            EnvelopeBytes::from_envelope(&e, origin),
        )
    }

    fn reply(code: u16) -> ServerReply {
        ServerReply::new(code, "x")
    }

    /// Spools message `n` for `user@<domain>` and places it as the MX lookup would, with `hosts`.
    fn queue_mx(s: &mut Scheduler, n: u32, domain: &str, hosts: &[&str], at: Instant) -> MessageId {
        let m = message(n, "a@x", &[&format!("user@{domain}")]);
        let id = m.id;
        s.insert(m);
        let plan = s.plan(id, at).unwrap();
        let (domain, recipients) = plan.resolve[0].clone();
        s.place_mx(
            id,
            plan.lane,
            recipients,
            &domain,
            hosts.iter().map(|h| h.to_string()).collect(),
            at,
        );
        id
    }

    /// The test configuration with the provider `bigmail` (MX hosts under `bigmail.test`).
    fn with_bigmail(connections_max: Option<usize>, messages_per_connection_max: Option<usize>) -> SchedConfig {
        let mut c = config();
        c.connections_per_shard_max = 10;
        c.providers = vec![ProviderRule {
            name: "bigmail".into(),
            mx_suffixes: vec!["bigmail.test".into()],
            connections_max,
            messages_per_connection_max,
            messages_per_second: None,
        }];
        c
    }

    #[test]
    fn sites_of_one_provider_share_its_connections_and_its_slowdown() {
        let t0 = Instant::now();
        let c = with_bigmail(Some(1), Some(7));
        let mut s = Scheduler::new(c.clone(), QueueIndex::default());
        // Two customers of the provider (different MX sets), and a domain elsewhere.
        queue_mx(&mut s, 1, "a.test", &["mx1.bigmail.test"], t0);
        queue_mx(&mut s, 2, "b.test", &["mx2.bigmail.test"], t0);
        queue_mx(&mut s, 3, "c.test", &["mx.other.test"], t0);
        let first = s.next_worker().unwrap();
        let other = s.next_worker().unwrap();
        assert_eq!(
            other,
            SiteKey::mx(&["mx.other.test"]),
            "the provider's second site waits"
        );
        assert_eq!(s.next_worker(), None);
        assert_eq!(s.messages_per_connection_max(&first), 7, "the provider's limit");
        assert_eq!(s.providers()[0].workers, 1);
        // The provider's worker ends: its other site gets the place.
        s.next_job(&first, t0).unwrap();
        s.worker_ended(&first, true, t0);
        assert_eq!(s.next_worker(), Some(SiteKey::mx(&["mx2.bigmail.test"])));
        // A slow-down on one site slows the provider, for all its sites, until it ends.
        let second = SiteKey::mx(&["mx2.bigmail.test"]);
        let until = t0 + Duration::from_secs(60);
        assert_eq!(
            s.slow(&second, Duration::from_secs(5), until, 60).as_deref(),
            Some("provider bigmail")
        );
        assert_eq!(
            s.slow(&second, Duration::from_secs(5), until, 60),
            None,
            "in force already"
        );
        assert_eq!(s.rate_wait(&second, t0), Duration::ZERO);
        assert_eq!(s.rate_wait(&second, t0), Duration::from_secs(5));
        assert_eq!(s.slowdowns(t0).len(), 1);
        assert!(s.slowdowns(until).is_empty(), "restored when the time is up");
        assert_eq!(
            s.rate_wait(&other, t0),
            Duration::ZERO,
            "other providers keep their pace"
        );
        // Reconfiguring keeps the provider's count of open connections.
        s.reconfigure(c);
        assert_eq!(s.providers()[0].workers, 1);
    }

    #[test]
    fn a_paused_provider_starts_no_worker_and_its_deferred_mail_waits_without_an_attempt() {
        let t0 = Instant::now();
        let c = with_bigmail(None, None);
        let mut s = Scheduler::new(c, QueueIndex::default());
        let id = queue_mx(&mut s, 1, "a.test", &["mx1.bigmail.test"], t0);
        let key = s.next_worker().unwrap();
        let job = s.next_job(&key, t0).unwrap();
        // Its reply pauses the provider: the deferred recipient waits at the site.
        assert_eq!(s.pause_provider_of(&key, 1_000_100).as_deref(), Some("bigmail"));
        assert_eq!(s.pause_provider_of(&key, 1_000_050), None, "paused that long already");
        assert!(s.provider_paused(&key));
        let waiting = job.recipients.clone();
        assert_eq!(
            s.complete_waiting(
                id,
                &[],
                Waiting {
                    recipients: waiting,
                    site: key.clone(),
                    lane: job.lane,
                },
                false,
                now(t0, 1)
            ),
            Some(Completed::Pending)
        );
        assert_eq!(s.next_job(&key, t0), None, "its worker takes no more jobs while paused");
        s.worker_ended(&key, true, t0);
        // New mail for another of its sites waits too; other providers do not.
        queue_mx(&mut s, 2, "b.test", &["mx2.bigmail.test"], t0);
        queue_mx(&mut s, 3, "c.test", &["mx.other.test"], t0);
        assert_eq!(s.next_worker(), Some(SiteKey::mx(&["mx.other.test"])));
        assert_eq!(s.next_worker(), None, "no worker for a paused provider");
        assert!(s.resume_providers(1_000_099).is_empty());
        assert_eq!(s.resume_providers(1_000_100), vec!["bigmail".to_string()]);
        let mut started = vec![s.next_worker().unwrap(), s.next_worker().unwrap()];
        started.sort();
        let mut want = vec![key.clone(), SiteKey::mx(&["mx2.bigmail.test"])];
        want.sort();
        assert_eq!(started, want, "both of its sites go again");
        assert_eq!(s.queue().get(&id).unwrap().attempts, 0, "the pause cost no attempt");
        assert_eq!(s.retries_len(), 0, "and set no retry timer");
        assert_eq!(s.next_job(&key, t0).unwrap().recipients, vec![0]);
        // Held by the operator while it was out: it waits for its release, not at the site.
        assert_eq!(s.pause_provider_of(&key, 1_000_200).as_deref(), Some("bigmail"));
        s.hold(&[id], now(t0, 2));
        let waiting = Waiting {
            recipients: vec![0],
            site: key.clone(),
            lane: Lane::Fresh,
        };
        assert!(matches!(
            s.complete_waiting(id, &[], waiting, false, now(t0, 2)),
            Some(Completed::Retry { .. })
        ));
        assert_eq!(s.site(&key).unwrap().pending(), 0);
    }

    #[test]
    fn mail_waiting_at_a_paused_provider_is_withdrawn_for_the_operator_but_mail_on_a_connection_is_not() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(with_bigmail(None, None), QueueIndex::default());
        let on_wire = queue_mx(&mut s, 1, "a.test", &["mx1.bigmail.test"], t0);
        let key = s.next_worker().unwrap();
        let job = s.next_job(&key, t0).unwrap();
        assert_eq!(job.id, on_wire);
        s.pause_provider_of(&key, 1_000_100);
        let waiting = queue_mx(&mut s, 2, "b.test", &["mx2.bigmail.test"], t0);
        let gone = MessageId::new(9, 0, 999 * 4096);
        assert_eq!(s.site(&SiteKey::mx(&["mx2.bigmail.test"])).unwrap().pending(), 1);
        assert_eq!(s.withdraw(&[on_wire, waiting, gone]), vec![waiting]);
        assert_eq!(
            s.queue().get(&on_wire).unwrap().jobs_outstanding,
            1,
            "its job is on a connection"
        );
        assert_eq!(s.queue().get(&waiting).unwrap().jobs_outstanding, 0);
        assert_eq!(s.site(&SiteKey::mx(&["mx2.bigmail.test"])).unwrap().pending(), 0);
        assert_eq!(
            s.remove(&[waiting, on_wire]),
            vec![StateEntry {
                id: waiting,
                recipient: 0
            }]
        );
        assert!(s.queue().get(&waiting).is_none());
        // Withdrawn but kept (a bounce whose notice failed): it is planned again.
        let kept = queue_mx(&mut s, 3, "c.test", &["mx2.bigmail.test"], t0);
        assert_eq!(s.withdraw(&[kept]), vec![kept]);
        assert!(s.plan(kept, t0).is_some());
        assert!(s.withdraw(&[]).is_empty());
    }

    #[test]
    fn a_hold_takes_mail_out_of_a_paused_providers_queue_and_a_release_plans_it_again() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(with_bigmail(None, None), QueueIndex::default());
        let key = SiteKey::mx(&["mx1.bigmail.test"]);
        let first = queue_mx(&mut s, 1, "a.test", &["mx1.bigmail.test"], t0);
        s.pause_provider_of(&key, 1_000_100);
        let waiting = queue_mx(&mut s, 2, "b.test", &["mx1.bigmail.test"], t0);
        assert_eq!(s.site(&key).unwrap().pending(), 2);
        assert_eq!(s.hold(&[waiting], now(t0, 1)).len(), 1);
        assert_eq!(s.site(&key).unwrap().pending(), 1, "the held one left the queue");
        assert_eq!(s.queue().get(&waiting).unwrap().jobs_outstanding, 0);
        assert_eq!(s.queue().get(&first).unwrap().jobs_outstanding, 1);
        assert!(s.plan(waiting, t0).is_none(), "held");
        let (_, due) = s.release(&[waiting], now(t0, 2));
        assert_eq!(due, vec![waiting]);
        assert!(s.plan(waiting, t0).is_some());
    }

    #[test]
    fn one_recipient_per_job_splits_a_message_into_jobs_that_all_count() {
        let t0 = Instant::now();
        let mut c = config();
        c.one_recipient_per_job = true;
        let mut s = Scheduler::new(c, QueueIndex::default());
        let m = message(1, "a@x", &["1@relay.test", "2@relay.test", "3@relay.test"]);
        let id = m.id;
        s.insert(m);
        s.plan(id, t0).unwrap();
        let key = s.next_worker().unwrap();
        let jobs: Vec<Job> = std::iter::from_fn(|| s.next_job(&key, t0)).collect();
        let recipients: Vec<Vec<u32>> = jobs.iter().map(|j| j.recipients.clone()).collect();
        assert_eq!(recipients, vec![vec![0], vec![1], vec![2]]);
        assert_eq!(s.complete(id, &[0], false, now(t0, 1)), Some(Completed::Pending));
        assert_eq!(s.complete(id, &[1], false, now(t0, 1)), Some(Completed::Pending));
        assert_eq!(s.complete(id, &[2], false, now(t0, 1)), Some(Completed::Finished));
        // A bounce keeps its one job (its sender is empty: nothing to vary).
        let b = message(2, "", &["1@relay.test", "2@relay.test"]);
        let bid = b.id;
        s.insert(b);
        s.plan(bid, t0).unwrap();
        let key = s.next_worker().unwrap_or(key);
        assert_eq!(s.next_job(&key, t0).unwrap().recipients, vec![0, 1]);
    }

    #[test]
    fn recipients_finished_undelivered_are_done_and_the_last_one_finishes_the_message() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(), QueueIndex::default());
        let m = message(1, "a@x", &["gone@a.test", "ok@b.test"]);
        let id = m.id;
        s.insert(m);
        assert_eq!(
            s.finish_undelivered(id, &[0, 7]),
            Some(Completed::Pending),
            "an index past the end is ignored"
        );
        let state = s.take_state();
        assert_eq!(state.outcomes, vec![StateEntry { id, recipient: 0 }]);
        let plan = s.plan(id, t0).unwrap();
        assert_eq!(
            plan.resolve,
            vec![("b.test".to_string(), vec![1])],
            "the suppressed one is not planned"
        );
        assert_eq!(s.finish_undelivered(id, &[1]), None, "not while a job is out");
        s.complete(id, &[], false, now(t0, 1));
        s.due(t0 + Duration::from_secs(3600));
        assert_eq!(s.finish_undelivered(id, &[1]), Some(Completed::Finished));
        assert!(s.queue().get(&id).is_none());
        assert_eq!(s.retries_len(), 0);
        assert_eq!(s.take_state().tombstones.len(), 1);
    }

    #[test]
    fn a_down_site_gets_no_workers_but_one_probe_and_its_mail_waits_for_it() {
        let t0 = Instant::now();
        let mut c = config();
        c.health = HealthRules {
            down_after_failures: 2,
            probe_interval: Duration::from_secs(30),
            probe_interval_max: Duration::from_secs(300),
        };
        c.connections_per_shard_max = 10;
        let mut s = Scheduler::new(c, QueueIndex::default());
        let hosts = ["mx.dead.test"];
        queue_mx(&mut s, 1, "dead.test", &hosts, t0);
        let key = s.next_worker().expect("a worker for the first message");
        let job = s.next_job(&key, t0).unwrap();
        assert_eq!(s.connection_failed(&key, t0), Change::None, "one failure is not enough");
        s.requeue_quietly(job);
        assert!(!s.drain_site(&key).is_empty());
        s.worker_ended(&key, true, t0);
        queue_mx(&mut s, 2, "dead.test", &hosts, t0);
        let key = s.next_worker().expect("still up: a worker");
        let _job = s.next_job(&key, t0).unwrap();
        assert!(matches!(
            s.connection_failed(&key, t0),
            Change::MarkedDown { failures: 2, .. }
        ));
        s.worker_ended(&key, true, t0);
        // Mail that arrives now waits: no worker, however much of it.
        for n in 3..8 {
            queue_mx(&mut s, n, "dead.test", &hosts, t0);
        }
        assert_eq!(s.next_worker(), None);
        s.kick_stranded();
        assert_eq!(s.next_worker(), None, "a down site is not stranded");
        assert_eq!(s.sites_down().count(), 1);
        // Other sites keep their workers.
        queue_mx(&mut s, 9, "live.test", &["mx.live.test"], t0);
        assert_eq!(s.next_worker(), Some(SiteKey::mx(&["mx.live.test"])));
        // The probe: due after the interval, one worker only.
        assert!(s.due_probes(t0 + Duration::from_secs(29)).is_empty());
        assert_eq!(s.due_probes(t0 + Duration::from_secs(30)), vec![key.clone()]);
        assert_eq!(s.next_worker(), Some(key.clone()));
        assert_eq!(s.next_worker(), None, "one probe at a time");
        let t1 = t0 + Duration::from_secs(31);
        assert!(matches!(s.connection_opened(&key, t1), Change::Up { .. }));
        s.worker_ended(&key, true, t1);
        // Up: the waiting mail gets workers again (the site's share: two).
        assert_eq!(s.next_worker(), Some(key.clone()));
        assert_eq!(s.next_worker(), Some(key.clone()));
        assert_eq!(s.site(&key).unwrap().pending(), 5);
    }

    #[test]
    fn mail_waiting_at_a_down_site_past_the_queue_lifetime_is_handed_back() {
        let t0 = Instant::now();
        let mut c = config();
        c.health = HealthRules {
            down_after_failures: 1,
            probe_interval: Duration::from_secs(30),
            probe_interval_max: Duration::from_secs(300),
        };
        let mut s = Scheduler::new(c, QueueIndex::default());
        queue_mx(&mut s, 1, "dead.test", &["mx.dead.test"], t0);
        let key = s.next_worker().unwrap();
        let _job = s.next_job(&key, t0).unwrap();
        assert!(matches!(s.connection_failed(&key, t0), Change::MarkedDown { .. }));
        s.worker_ended(&key, true, t0);
        queue_mx(&mut s, 2, "dead.test", &["mx.dead.test"], t0);
        // Received at 1_000_000, lifetime 3600 s.
        assert!(s.take_expired_waiting(&key, 1_000_000 + 3600).is_empty());
        let expired = s.take_expired_waiting(&key, 1_000_000 + 3601);
        assert_eq!(expired.len(), 1);
        assert_eq!(s.site(&key).unwrap().pending(), 0);
    }

    #[test]
    fn a_held_message_is_never_planned_until_released_and_survives_a_rebuild() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(), QueueIndex::default());
        let m = message(1, "a@x", &["b@relay.test"]);
        let id = m.id;
        s.insert(m);
        s.put_retry(id, t0 + Duration::from_secs(60));
        let entries = s.hold(&[id], now(t0, 0));
        assert_eq!(entries.len(), 1);
        assert!(entries[0].held);
        assert!(s.hold(&[id], now(t0, 1)).is_empty(), "held once");
        assert_eq!(s.retries_len(), 0, "out of the timers");
        assert!(s.plan(id, t0).is_none());
        assert!(s.due(t0 + Duration::from_secs(3600)).is_empty());
        // What the records say after a restart: still held, not ready, not timed.
        let mut index = QueueIndex::default();
        index.insert(message(1, "a@x", &["b@relay.test"]));
        index.apply_segment(gannet_spool::recovery::SegmentScan {
            deferrals: entries.clone(),
            ..Default::default()
        });
        let mut restarted = Scheduler::new(config(), index);
        assert!(restarted.recovered(now(t0, 5)).is_empty());
        assert_eq!(restarted.retries_len(), 0);
        let (written, released) = restarted.release(&[id], now(t0, 6));
        assert_eq!(released, vec![id]);
        assert!(!written[0].held);
        assert!(restarted.plan(id, t0).is_some());
    }

    #[test]
    fn removal_skips_messages_with_jobs_out() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(), QueueIndex::default());
        let (a, b) = (
            message(1, "a@x", &["b@relay.test"]),
            message(2, "a@x", &["b@relay.test"]),
        );
        let (ida, idb) = (a.id, b.id);
        s.insert(a);
        s.insert(b);
        s.put_retry(ida, t0 + Duration::from_secs(60));
        assert!(s.plan(idb, t0).is_some(), "b has a job out now");
        let gone = s.remove(&[ida, idb]);
        assert_eq!(gone.iter().map(|e| e.id).collect::<Vec<_>>(), vec![ida]);
        assert!(s.queue().get(&ida).is_none());
        assert!(s.queue().get(&idb).is_some());
        assert_eq!(s.retries_len(), 0);
    }

    #[test]
    fn retry_now_takes_only_the_chosen_messages_out_of_the_timers() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(), QueueIndex::default());
        let ids: Vec<MessageId> = (1..=3).map(|n| message(n, "a@x", &["b@relay.test"]).id).collect();
        for (i, id) in ids.iter().enumerate() {
            s.put_retry(*id, t0 + Duration::from_secs(3600 + i as u64));
        }
        let unknown = message(9, "a@x", &["b@relay.test"]).id;
        assert_eq!(s.retry_now(&[ids[1], unknown]), vec![ids[1]]);
        assert_eq!(s.retries_len(), 2);
        assert!(s.retry_now(&[ids[1]]).is_empty(), "already taken");
        assert_eq!(s.retry_all_now(), vec![ids[0], ids[2]]);
    }

    #[test]
    fn smarthost_groups_queue_at_once_and_mx_groups_wait_for_their_lookup() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(), QueueIndex::default());
        let m = message(
            1,
            "a@x",
            &["b@relay.test", "c@example.com", "d@EXAMPLE.com", "e@other.net"],
        );
        let id = m.id;
        s.insert(m);
        let plan = s.plan(id, t0).unwrap();
        assert_eq!(plan.lane, Lane::Fresh);
        assert_eq!(
            plan.resolve,
            vec![
                ("example.com".to_string(), vec![1, 2]),
                ("other.net".to_string(), vec![3])
            ]
        );
        assert!(s.plan(id, t0).is_none(), "jobs are out");
        assert_eq!(s.queue().get(&id).unwrap().jobs_outstanding, 3);
        let smarthost = SiteKey::Smarthost(SMARTHOST.parse().unwrap());
        assert_eq!(s.next_worker(), Some(smarthost.clone()));
        assert_eq!(s.next_job(&smarthost, t0).unwrap().recipients, vec![0]);
        assert_eq!(s.next_worker(), None, "nothing else is queued");
    }

    #[test]
    fn domains_with_the_same_mx_hosts_share_one_site_and_its_connection_cap() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(), QueueIndex::default());
        for n in 0..50u32 {
            // Every domain's MX is the same two hosts, in either order.
            let hosts = if n % 2 == 0 {
                ["mx1.host.test", "mx2.host.test"]
            } else {
                ["MX2.host.test", "mx1.host.test"]
            };
            queue_mx(&mut s, n, &format!("domain{n}.test"), &hosts, t0);
        }
        assert_eq!(s.sites_len(), 1);
        let mut workers = 0;
        while s.next_worker().is_some() {
            workers += 1;
        }
        assert_eq!(workers, 2, "the site's cap, not one per domain");
        let site = s.site(&SiteKey::mx(&["mx1.host.test", "mx2.host.test"])).unwrap();
        assert_eq!((site.pending(), site.name.as_str()), (50, "domain0.test"));
    }

    #[test]
    fn the_shard_cap_holds_across_sites_and_a_freed_place_goes_to_a_waiting_site() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(), QueueIndex::default());
        for n in 0..6u32 {
            let domain = format!("d{}.test", n % 3);
            queue_mx(&mut s, n, &domain, &[&format!("mx.{domain}")], t0);
        }
        let started: Vec<SiteKey> = std::iter::from_fn(|| s.next_worker()).collect();
        assert_eq!(started.len(), 3, "connections_per_shard_max");
        // One worker finishes its site's work and stops: its place goes to someone waiting.
        let first = started[0].clone();
        while s.next_job(&first, t0).is_some() {}
        s.worker_ended(&first, true, t0);
        let next = s.next_worker().expect("a waiting site gets the place");
        assert_ne!(next, first);
    }

    #[test]
    fn a_deferral_to_a_suspended_domain_parks_without_a_backoff_step() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(), QueueIndex::default());
        let m = message(1, "a@x", &["b@relay.test"]);
        let id = m.id;
        s.insert(m);
        s.plan(id, t0).unwrap();
        let key = s.next_worker().unwrap();
        let job = s.next_job(&key, t0).unwrap();
        // The reply's class suspends the domain (as a `suspend` action does) before the job ends.
        assert!(s.suspend("relay.test", 1_000_600));
        let results = [(0, RecipientResult::Deferred(reply(450)))];
        let c = s.classify(job.id, &results, now(t0, 0)).unwrap();
        let done = s.complete(job.id, &c.done, false, now(t0, 0)).unwrap();
        assert_eq!(done, Completed::Retry { at_unix_s: 1_000_600 });
        assert!(s.is_parked(&id));
        assert!(
            s.due(t0 + Duration::from_secs(3600)).is_empty(),
            "no retry timer of its own"
        );
        let state = s.take_state();
        assert_eq!(state.deferrals[0].attempts, 0, "the suspension is not a failed attempt");
        assert_eq!(s.queue().get(&id).unwrap().attempts, 0);
        // The suspension's end brings it back, in the fresh lane still.
        assert_eq!(s.expire_suspensions(1_000_600), vec![id]);
        assert_eq!(s.plan(id, t0).unwrap().lane, Lane::Fresh);
    }

    #[test]
    fn a_deferred_message_waits_by_the_schedule_and_a_finished_one_leaves_a_tombstone() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(), QueueIndex::default());
        let m = message(1, "a@x", &["b@relay.test", "c@relay.test"]);
        let id = m.id;
        s.insert(m);
        s.plan(id, t0).unwrap();
        let key = s.next_worker().unwrap();
        let job = s.next_job(&key, t0).unwrap();
        let results = [
            (0, RecipientResult::Delivered(reply(250))),
            (1, RecipientResult::Deferred(reply(451))),
        ];
        let c = s.classify(job.id, &results, now(t0, 0)).unwrap();
        assert_eq!((c.done.clone(), c.bounce.len(), c.delayed.len()), (vec![0], 0, 0));
        let done = s.complete(job.id, &c.done, false, now(t0, 0)).unwrap();
        let Completed::Retry { at_unix_s } = done else {
            panic!("{done:?}")
        };
        assert!((1_000_060..=1_000_066).contains(&at_unix_s), "60 s plus up to 10%");
        s.worker_ended(&key, true, t0);
        let state = s.take_state();
        assert_eq!(state.outcomes, vec![StateEntry { id, recipient: 0 }]);
        assert_eq!(state.deferrals[0].attempts, 1);
        assert!(s.due(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(s.due(t0 + Duration::from_secs(67)), vec![id]);
        // The retry goes in the retry lane and finishes the message.
        let plan = s.plan(id, t0).unwrap();
        assert_eq!(plan.lane, Lane::Retry);
        let key = s.next_worker().unwrap();
        let job = s.next_job(&key, t0).unwrap();
        assert_eq!(job.recipients, vec![1]);
        let results = [(1, RecipientResult::Delivered(reply(250)))];
        let c = s.classify(job.id, &results, now(t0, 70)).unwrap();
        assert_eq!(
            s.complete(job.id, &c.done, false, now(t0, 70)),
            Some(Completed::Finished)
        );
        assert!(s.queue().is_empty());
        assert_eq!(
            s.take_state().tombstones,
            vec![StateEntry {
                id,
                recipient: u32::MAX
            }]
        );
    }

    #[test]
    fn failures_are_owed_a_notice_but_never_for_the_null_sender_and_expiry_fails() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(), QueueIndex::default());
        let m = message(1, "a@x", &["b@relay.test", "c@relay.test"]);
        let bounce = message(2, "", &["a@relay.test"]);
        let (id, bid) = (m.id, bounce.id);
        s.insert(m);
        s.insert(bounce);
        s.plan(id, t0).unwrap();
        s.plan(bid, t0).unwrap();
        let key = s.next_worker().unwrap();
        let job = s.next_job(&key, t0).unwrap();
        let bjob = s.next_job(&key, t0).unwrap();
        assert_eq!((job.lane, bjob.lane), (Lane::Fresh, Lane::Bounce));
        let results = [
            (0, RecipientResult::Failed(reply(550))),
            (1, RecipientResult::Deferred(reply(451))),
        ];
        // An hour past arrival the deferral is an expiry.
        let c = s.classify(job.id, &results, now(t0, 3601)).unwrap();
        assert_eq!(c.verdicts, vec![(0, Verdict::Failed), (1, Verdict::Expired)]);
        assert_eq!((c.bounce.clone(), c.done.len()), (vec![0, 1], 0));
        let c = s
            .classify(bjob.id, &[(0, RecipientResult::Failed(reply(550)))], now(t0, 1))
            .unwrap();
        assert_eq!((c.bounce.len(), c.done.clone()), (0, vec![0]), "never bounce a bounce");
        // Half an hour in, a deferral earns the one delay notice.
        let c = s
            .classify(job.id, &[(1, RecipientResult::Deferred(reply(451)))], now(t0, 1800))
            .unwrap();
        assert_eq!(c.delayed, vec![1]);
    }

    #[test]
    fn idle_sites_are_evicted_and_the_bound_holds() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(config(), QueueIndex::default());
        for n in 0..20u32 {
            let domain = format!("d{n}.test");
            queue_mx(
                &mut s,
                n,
                &domain,
                &[&format!("mx.{domain}")],
                now(t0, n.into()).instant,
            );
            // Deliver it at once: the site goes idle.
            let key = s.next_worker().unwrap();
            let job = s.next_job(&key, t0).unwrap();
            let c = s
                .classify(job.id, &[(0, RecipientResult::Delivered(reply(250)))], now(t0, 0))
                .unwrap();
            s.complete(job.id, &c.done, false, now(t0, 0));
            s.worker_ended(&key, true, now(t0, n.into()).instant);
            assert!(s.sites_len() <= 4, "sites_max");
        }
        assert_eq!(s.take_evicted().len(), 16);
        assert_eq!(s.evict_idle(now(t0, 100).instant).len(), 4);
        assert_eq!(s.sites_len(), 0);
    }

    #[test]
    fn a_restart_keeps_each_messages_next_attempt() {
        let t0 = Instant::now();
        let mut queue = QueueIndex::default();
        let mut waiting = message(1, "a@x", &["b@relay.test"]);
        waiting.attempts = 2;
        waiting.next_attempt_unix_s = Some(1_000_100);
        let mut overdue = message(2, "a@x", &["b@relay.test"]);
        overdue.next_attempt_unix_s = Some(999_000);
        let fresh = message(3, "a@x", &["b@relay.test"]);
        let ids = [waiting.id, overdue.id, fresh.id];
        for m in [waiting, overdue, fresh] {
            queue.insert(m);
        }
        let mut s = Scheduler::new(config(), queue);
        assert_eq!(s.recovered(now(t0, 0)), vec![ids[1], ids[2]]);
        assert_eq!(s.retries_len(), 1);
        assert_eq!(s.due(t0 + Duration::from_secs(100)), vec![ids[0]]);
    }

    #[test]
    fn a_rate_spaces_messages_and_stops_sending_ahead() {
        let t0 = Instant::now();
        let mut config = config();
        config.site_rules.push(SiteRule {
            pattern: SMARTHOST.into(),
            connections_max: Some(1),
            messages_per_connection_max: None,
            messages_per_second: Some(4.0),
        });
        let mut s = Scheduler::new(config, QueueIndex::default());
        for n in 0..3 {
            let m = message(n, "a@x", &["b@relay.test"]);
            let id = m.id;
            s.insert(m);
            s.plan(id, t0).unwrap();
        }
        let key = s.next_worker().unwrap();
        assert!(s.next_worker().is_none(), "one connection");
        assert_eq!(s.rate_wait(&key, t0), Duration::ZERO);
        assert_eq!(s.rate_wait(&key, t0), Duration::from_millis(250));
        assert!(s.take_ahead(&key, 0).is_none(), "no pipelining ahead under a rate");
    }
}
