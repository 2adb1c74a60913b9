//! The delivery scheduler (`gannet_sched`) with simulated time, DNS and receivers. A seeded
//! run submits a few hundred messages to domains hosted by a handful of providers (domains
//! sharing MX hosts), against receivers that accept, defer, refuse, stall until the reply
//! timeout, or drop the connection after the final dot (the message may or may not have been
//! taken), and some domains that do not exist; bounces go back into the queue as new messages
//! from `<>`, as the shell spools them. Time advances from event to event.
//!
//! Checks:
//! - every recipient ends delivered or failed, with one failure notice per failed recipient
//!   whose sender is not `<>`, and none for `<>` (no bounce of a bounce);
//! - a recipient is delivered twice only after a connection dropped after its final dot;
//! - every retry comes no earlier than the schedule says (the backoff of its attempt count);
//! - fresh mail is never starved by retries: a fresh job waits at most `FRESH_WAIT_MAX` for a
//!   worker, however long the retry lane;
//! - the scheduler's memory stays within bounds: the queue holds at most what was submitted,
//!   and the site table at most `sites_max` idle sites;
//! - a provider whose hosts refuse connections for a while is marked down and probed: while it
//!   is unreachable, it gets no more connection attempts than the failures that mark it down,
//!   the workers that were already connecting, and one per probe (no retry storm);
//! - one provider throttles: it takes at most `THROTTLE_PER_MINUTE` messages a minute over all
//!   its customers' sites (each domain of it has MX hosts of its own) and defers the rest with
//!   Gmail's `421 4.7.28` rate reply. With its provider rule (shared connections and a rate
//!   below the throttle) and the `slow` action on the rate reply, it defers almost nothing
//!   (no retry storm) while fresh mail to the other providers is never starved; with a rate
//!   above its throttle the `slow` action brings the deferrals down; without either
//!   (`DeliverySimConfig::provider_rate = None`) it defers most, which the tests compare.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use gannet_sched::backoff::RetrySchedule;
use gannet_sched::{Job, Lane, QueueIndex, QueuedMessage, Route, RouteTarget, SchedConfig, Scheduler, SiteKey};
use gannet_smtp::client::{RecipientResult, ServerReply};
use gannet_smtp::deadline::Now;
use gannet_smtp::envelope::{Envelope, Origin};
use gannet_spool::record::EnvelopeBytes;
use gannet_spool::MessageId;

use crate::rng::SimRng;

/// The longest a fresh job may wait for a worker (the lanes give fresh mail three picks in
/// five; with workers free it starts at once).
pub const FRESH_WAIT_MAX: Duration = Duration::from_secs(120);
const PROVIDERS: usize = 6;
/// The provider that throttles.
pub const THROTTLING: usize = PROVIDERS - 1;
/// Messages a minute the throttling provider takes.
pub const THROTTLE_PER_MINUTE: usize = 20;
const DOMAINS: usize = 40;
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
const TICK: Duration = Duration::from_millis(500);
const HEALTH: gannet_sched::HealthRules = gannet_sched::HealthRules {
    down_after_failures: 3,
    probe_interval: Duration::from_secs(30),
    probe_interval_max: Duration::from_secs(300),
};

#[derive(Debug, Clone, Copy)]
pub struct DeliverySimConfig {
    pub messages: usize,
    /// Over this long the messages arrive.
    pub arrivals: Duration,
    pub sites_max: usize,
    /// The throttling provider has a provider rule (2 connections, this many messages a
    /// second) and its rate reply slows it (`slow`); None: neither.
    pub provider_rate: Option<f64>,
}

impl DeliverySimConfig {
    pub const CI: DeliverySimConfig = DeliverySimConfig {
        messages: 300,
        arrivals: Duration::from_secs(1800),
        sites_max: 4,
        // 15 a minute, below its 20.
        provider_rate: Some(0.25),
    };
}

#[derive(Debug, Clone, Default)]
pub struct DeliveryReport {
    pub messages: usize,
    /// Connection attempts to providers while they refused connections, and the probes among
    /// them.
    pub unreachable_attempts: usize,
    pub probes: usize,
    pub bounces: usize,
    pub attempts: usize,
    pub duplicates: usize,
    pub longest_fresh_wait: Duration,
    pub most_sites: usize,
    /// Messages sent to the throttling provider, and how many it deferred with its rate reply.
    pub throttling_sends: usize,
    pub throttled: usize,
    pub violations: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrive(u32),
    Tick,
    /// A worker's current job ends.
    JobDone(u64),
}

/// What became of one recipient, as the receiver saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Accept,
    Defer,
    Refuse,
    Stall,
    /// Taken (or not: half the time) and then the connection dropped after the final dot.
    DropAfterDot {
        taken: bool,
    },
    /// The throttling provider's rate reply.
    Throttled,
}

struct Worker {
    site: SiteKey,
    job: Option<(Job, Vec<(u32, Answer)>)>,
    /// Its connection is open (the first job of a worker opens it).
    connected: bool,
}

struct Sim<'a> {
    config: &'a DeliverySimConfig,
    rng: SimRng,
    sched: Scheduler,
    t0: Instant,
    now: Duration,
    events: BinaryHeap<Reverse<(Duration, Event)>>,
    workers: HashMap<u64, Worker>,
    next_worker: u64,
    next_message: u32,
    /// Per message: sender is `<>`, recipients, and per recipient deliveries and notices.
    messages: HashMap<MessageId, Tracked>,
    /// When each placed job was queued (to measure fresh waits).
    queued_at: HashMap<(MessageId, Lane), Duration>,
    /// Providers down (all deferrals) until then.
    down_until: Vec<Duration>,
    /// Providers whose hosts refuse connections until then.
    unreachable_until: Vec<Duration>,
    /// Per provider: connection attempts while unreachable that were not probes.
    unreachable_non_probes: Vec<usize>,
    /// When the throttling provider took its messages in the last minute.
    throttle_window: std::collections::VecDeque<Duration>,
    report: DeliveryReport,
}

#[derive(Debug, Clone, Default)]
struct Tracked {
    bounce: bool,
    recipients: usize,
    delivered: BTreeMap<u32, usize>,
    dropped_after_dot: BTreeMap<u32, bool>,
    notices: BTreeMap<u32, usize>,
    finished: BTreeMap<u32, bool>,
    last_attempt: Option<(Duration, u32)>,
}

/// The provider of a site: the `provider<N>` label of its MX hosts.
fn provider_of_site(site: &SiteKey) -> usize {
    match site {
        SiteKey::Mx(hosts) => hosts[0]
            .split('.')
            .find_map(|label| label.strip_prefix("provider").and_then(|n| n.parse().ok()))
            .unwrap_or(0),
        SiteKey::Smarthost(_) => 0,
    }
}

fn provider_of(domain: &str) -> usize {
    domain
        .trim_start_matches('d')
        .split('.')
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0)
        % PROVIDERS
}

impl Sim<'_> {
    fn now(&self) -> Now {
        Now {
            instant: self.t0 + self.now,
            unix_s: 1_700_000_000 + self.now.as_secs(),
        }
    }

    fn at(&mut self, after: Duration, event: Event) {
        self.events.push(Reverse((self.now + after, event)));
    }

    fn submit(&mut self, sender: &str, recipients: &[String], bounce: bool) {
        let n = self.next_message;
        self.next_message += 1;
        let mut e = Envelope::default();
        e.set_sender(|b| b.extend_from_slice(sender.as_bytes()));
        for r in recipients {
            e.add_recipient(|b| b.extend_from_slice(r.as_bytes()), 0, b"");
        }
        let origin = Origin {
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            helo: b"sim",
            received_unix_s: self.now().unix_s,
        };
        let id = MessageId::new(u64::from(n) + 1, 0, 0);
        self.messages.insert(
            id,
            Tracked {
                bounce,
                recipients: recipients.len(),
                ..Tracked::default()
            },
        );
        self.sched
            .insert(QueuedMessage::new(id, 1, 100, EnvelopeBytes::from_envelope(&e, origin)));
        if bounce {
            self.report.bounces += 1;
        } else {
            self.report.messages += 1;
        }
        self.plan(id);
    }

    /// The shell's `schedule`: plan, look the MX domains up, place or fail them.
    fn plan(&mut self, id: MessageId) {
        let Some(plan) = self.sched.plan(id, self.now().instant) else {
            return;
        };
        let attempts = self.sched.queue().get(&id).map_or(0, |m| m.attempts);
        self.check_schedule(id, attempts);
        for (domain, recipients) in plan.resolve {
            let provider = provider_of(&domain);
            if domain.starts_with("nx") {
                let reply = ServerReply::new(550, "5.1.2 domain does not exist");
                let results = recipients
                    .iter()
                    .map(|&i| (i, RecipientResult::Failed(reply.clone())))
                    .collect();
                self.finish(id, results);
                continue;
            }
            // The throttling provider's customers each have MX hosts of their own (a site
            // each), under the provider's name.
            let hosts = if provider == THROTTLING {
                let label = domain.split('.').next().unwrap_or("d");
                vec![format!("mx.{label}.provider{provider}.sim")]
            } else {
                vec![
                    format!("mx1.provider{provider}.sim"),
                    format!("mx2.provider{provider}.sim"),
                ]
            };
            self.queued_at.insert((id, plan.lane), self.now);
            self.sched
                .place_mx(id, plan.lane, recipients, &domain, hosts, self.now().instant);
        }
        if !plan.unrouted.is_empty() {
            self.report.violations.push(format!("{id}: unrouted with a `*` route"));
        }
        self.start_workers();
    }

    /// Retries come no earlier than their backoff.
    fn check_schedule(&mut self, id: MessageId, attempts: u32) {
        let schedule = self.sched.config().retry;
        let now = self.now;
        let Some(tracked) = self.messages.get_mut(&id) else {
            return;
        };
        if let Some((last, last_attempts)) = tracked.last_attempt {
            if attempts > last_attempts {
                let earliest = last + schedule.base(attempts);
                // The deferral is recorded when the job ends, a little after it started.
                if now + REPLY_TIMEOUT + Duration::from_secs(1) < earliest {
                    self.report
                        .violations
                        .push(format!("{id}: attempt {attempts} at {now:?}, before {earliest:?}"));
                }
            }
        }
        tracked.last_attempt = Some((now, attempts));
    }

    fn start_workers(&mut self) {
        while let Some(site) = self.sched.next_worker() {
            let w = self.next_worker;
            self.next_worker += 1;
            self.workers.insert(
                w,
                Worker {
                    site,
                    job: None,
                    connected: false,
                },
            );
            self.run_worker(w);
        }
        self.report.most_sites = self.report.most_sites.max(self.sched.sites_len());
    }

    /// A worker takes its next job, or stops.
    fn run_worker(&mut self, w: u64) {
        let site = self.workers[&w].site.clone();
        let Some(job) = self.sched.next_job(&site, self.now().instant) else {
            self.workers.remove(&w);
            self.sched.worker_ended(&site, true, self.now().instant);
            self.start_workers();
            return;
        };
        let provider = provider_of_site(&site);
        if !self.workers[&w].connected && !self.connect(w, &site, job.clone(), provider) {
            return;
        }
        // Fresh mail for a provider that refused connections for a while waited for its probe
        // by design; every other fresh job is measured.
        // Mail to the throttling provider waits for its rate by design; the rest is measured.
        if job.lane == Lane::Fresh {
            if let Some(queued) = self.queued_at.remove(&(job.id, Lane::Fresh)) {
                if self.unreachable_until[provider].is_zero() && provider != THROTTLING {
                    let waited = self.now - queued;
                    self.report.longest_fresh_wait = self.report.longest_fresh_wait.max(waited);
                }
            }
        }
        self.report.attempts += 1;
        // The shell sleeps for the site's and its provider's rate before it sends.
        let rate_wait = self.sched.rate_wait(&site, self.now().instant);
        let throttled = provider == THROTTLING && self.throttles(self.now + rate_wait);
        let down = self.now < self.down_until[provider];
        let answers: Vec<(u32, Answer)> = job
            .recipients
            .iter()
            .map(|&i| {
                let roll = self.rng.below(100);
                let answer = match roll {
                    _ if throttled => Answer::Throttled,
                    _ if down => Answer::Defer,
                    0..=64 => Answer::Accept,
                    65..=79 => Answer::Defer,
                    80..=84 => Answer::Refuse,
                    85..=89 => Answer::Stall,
                    _ => Answer::DropAfterDot {
                        taken: self.rng.chance(50),
                    },
                };
                (i, answer)
            })
            .collect();
        let stalls = answers.iter().any(|(_, a)| *a == Answer::Stall);
        let latency = rate_wait
            + if stalls {
                REPLY_TIMEOUT
            } else {
                Duration::from_millis(20 + self.rng.below(300))
            };
        self.workers.get_mut(&w).expect("running").job = Some((job, answers));
        self.at(latency, Event::JobDone(w));
    }

    /// Whether the throttling provider defers a message sent at `at` (else it counts it).
    fn throttles(&mut self, at: Duration) -> bool {
        self.report.throttling_sends += 1;
        while self
            .throttle_window
            .front()
            .is_some_and(|&t| t + Duration::from_secs(60) <= at)
        {
            self.throttle_window.pop_front();
        }
        if self.throttle_window.len() >= THROTTLE_PER_MINUTE {
            self.report.throttled += 1;
            return true;
        }
        self.throttle_window.push_back(at);
        false
    }

    /// The worker's connection attempt, as the shell makes it: refused while the provider is
    /// unreachable (the job and the site's queue deferred, or, once the site is down, the job
    /// back to wait for the probe); false when it failed (the worker has ended).
    fn connect(&mut self, w: u64, site: &SiteKey, job: Job, provider: usize) -> bool {
        let at = self.now().instant;
        if self.now >= self.unreachable_until[provider] {
            self.sched.connection_opened(site, at);
            self.workers.get_mut(&w).expect("running").connected = true;
            return true;
        }
        self.report.unreachable_attempts += 1;
        let was_probing = self
            .sched
            .site(site)
            .and_then(|s| s.health().down())
            .is_some_and(|d| d.probing);
        if was_probing {
            self.report.probes += 1;
        } else {
            self.unreachable_non_probes[provider] += 1;
        }
        self.sched.connection_failed(site, at);
        let refused = ServerReply::new(421, "connection refused");
        let down = self.sched.site(site).and_then(|s| s.health().down()).is_some();
        let jobs = if down {
            self.sched.requeue_quietly(job);
            self.sched.take_expired_waiting(site, self.now().unix_s)
        } else {
            let mut jobs = vec![job];
            jobs.extend(self.sched.drain_site(site));
            jobs
        };
        for job in jobs {
            let results = job
                .recipients
                .iter()
                .map(|&i| (i, RecipientResult::Deferred(refused.clone())))
                .collect();
            self.finish(job.id, results);
        }
        self.workers.remove(&w);
        self.sched.worker_ended(site, true, at);
        self.start_workers();
        false
    }

    fn job_done(&mut self, w: u64) {
        let Some((job, answers)) = self.workers.get_mut(&w).and_then(|wk| wk.job.take()) else {
            return;
        };
        let tracked = self.messages.get_mut(&job.id).expect("tracked");
        let mut results = Vec::new();
        for (i, answer) in answers {
            let reply = |code: u16| ServerReply::new(code, "sim");
            let result = match answer {
                Answer::Accept => {
                    *tracked.delivered.entry(i).or_default() += 1;
                    RecipientResult::Delivered(reply(250))
                }
                Answer::Defer | Answer::Stall => RecipientResult::Deferred(reply(451)),
                Answer::Throttled => RecipientResult::Deferred(ServerReply::new(
                    421,
                    "4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP address.",
                )),
                Answer::Refuse => RecipientResult::Failed(reply(550)),
                Answer::DropAfterDot { taken } => {
                    tracked.dropped_after_dot.insert(i, true);
                    if taken {
                        *tracked.delivered.entry(i).or_default() += 1;
                    }
                    RecipientResult::Deferred(reply(421))
                }
            };
            results.push((i, result));
        }
        if self.config.provider_rate.is_some()
            && results
                .iter()
                .any(|(_, r)| matches!(r, RecipientResult::Deferred(r) if r.code == 421 && r.text().contains("4.7.28")))
        {
            // The shell's `slow` action on the rate reply (the default rules' class for it
            // is rate-limited): the provider sends one message a minute for ten minutes.
            let site = self.workers[&w].site.clone();
            let now = self.now();
            self.sched.slow(
                &site,
                Duration::from_secs(60),
                now.instant + Duration::from_secs(600),
                now.unix_s + 600,
            );
        }
        self.finish(job.id, results);
        self.run_worker(w);
    }

    /// The shell's `finish_job`: classify, spool failure notices (as new messages from `<>`),
    /// complete.
    fn finish(&mut self, id: MessageId, results: Vec<(u32, RecipientResult)>) {
        let now = self.now();
        let Some(c) = self.sched.classify(id, &results, now) else {
            return;
        };
        let sender = self
            .sched
            .queue()
            .get(&id)
            .map(|m| String::from_utf8_lossy(m.envelope.view().sender).into_owned())
            .unwrap_or_default();
        let tracked = self.messages.get_mut(&id).expect("tracked");
        for &(i, v) in &c.verdicts {
            if matches!(
                v,
                gannet_sched::Verdict::Delivered | gannet_sched::Verdict::Failed | gannet_sched::Verdict::Expired
            ) {
                tracked.finished.insert(i, true);
            }
        }
        let mut done = c.done.clone();
        if !c.bounce.is_empty() {
            if tracked.bounce {
                self.report.violations.push(format!("{id}: a notice owed for a bounce"));
            }
            for &i in &c.bounce {
                *tracked.notices.entry(i).or_default() += 1;
            }
            done.extend(c.bounce.iter().copied());
            self.submit("", &[sender], true);
        }
        self.sched.complete(id, &done, false, now);
    }

    fn tick(&mut self) {
        let _ = self.sched.due_probes(self.now().instant);
        let due = self.sched.due(self.now().instant);
        for id in due {
            self.plan(id);
        }
        self.sched.evict_idle(self.now().instant);
        let _ = self.sched.take_evicted();
        self.sched.kick_stranded();
        self.start_workers();
        let _ = self.sched.take_state();
        if self.sched.queue().len() > self.messages.len() {
            self.report
                .violations
                .push("the queue holds more than was submitted".into());
        }
    }
}

fn config(sites_max: usize, seed: u64, provider_rate: Option<f64>) -> SchedConfig {
    SchedConfig {
        shard: 0,
        shard_count: 1,
        routes: vec![Route {
            domain: "*".into(),
            target: RouteTarget::Mx,
        }],
        site_rules: Vec::new(),
        connections_per_site_max: 3,
        messages_per_connection_max: 100,
        connections_per_shard_max: 10,
        sites_max,
        retry: RetrySchedule {
            first: Duration::from_secs(60),
            max: Duration::from_secs(900),
        },
        queue_lifetime: Duration::from_secs(3 * 3600),
        delay_warning_after: Duration::ZERO,
        site_idle: Duration::from_secs(10),
        seed,
        health: HEALTH,
        one_recipient_per_job: false,
        providers: provider_rate
            .map(|rate| gannet_sched::ProviderRule {
                name: "throttling".into(),
                mx_suffixes: vec![format!("provider{THROTTLING}.sim")],
                connections_max: Some(2),
                messages_per_connection_max: None,
                messages_per_second: Some(rate),
            })
            .into_iter()
            .collect(),
    }
}

/// Per provider: with `percent` chance, an outage from the start until a time below
/// `longest_s`; else none.
fn outages(rng: &mut SimRng, percent: u64, longest_s: u64) -> Vec<Duration> {
    (0..PROVIDERS)
        .map(|_| {
            if rng.chance(percent) {
                Duration::from_secs(rng.below(longest_s))
            } else {
                Duration::ZERO
            }
        })
        .collect()
}

/// Runs one seed.
pub fn run(seed: u64, c: &DeliverySimConfig) -> DeliveryReport {
    let mut rng = SimRng::new(seed);
    let down_until = outages(&mut rng, 30, 3600);
    let mut unreachable_until = outages(&mut rng, 20, 1800);
    // The throttling provider's part is its throttle; connection outages are the others'
    // (its customers are many sites, each of which would be marked down on its own).
    unreachable_until[THROTTLING] = Duration::ZERO;
    let mut sim = Sim {
        config: c,
        sched: Scheduler::new(config(c.sites_max, seed, c.provider_rate), QueueIndex::default()),
        rng,
        t0: Instant::now(),
        now: Duration::ZERO,
        events: BinaryHeap::new(),
        workers: HashMap::new(),
        next_worker: 0,
        next_message: 0,
        messages: HashMap::new(),
        queued_at: HashMap::new(),
        down_until,
        unreachable_until,
        unreachable_non_probes: vec![0; PROVIDERS],
        throttle_window: std::collections::VecDeque::new(),
        report: DeliveryReport::default(),
    };
    for n in 0..c.messages as u32 {
        let at = Duration::from_millis(sim.rng.below(c.arrivals.as_millis() as u64));
        sim.events.push(Reverse((at, Event::Arrive(n))));
    }
    sim.at(TICK, Event::Tick);
    let end = c.arrivals + Duration::from_secs(5 * 3600);
    while let Some(Reverse((at, event))) = sim.events.pop() {
        if at > end {
            break;
        }
        sim.now = at;
        match event {
            Event::Arrive(_) => {
                let n = 1 + sim.rng.below(3) as usize;
                let recipients: Vec<String> = (0..n)
                    .map(|i| {
                        let d = sim.rng.below(DOMAINS as u64);
                        if sim.rng.chance(3) {
                            format!("u{i}@nx{d}.sim")
                        } else {
                            format!("u{i}@d{d}.sim")
                        }
                    })
                    .collect();
                sim.submit("sender@origin.sim", &recipients, false);
            }
            Event::Tick => {
                sim.tick();
                sim.at(TICK, Event::Tick);
            }
            Event::JobDone(w) => sim.job_done(w),
        }
    }
    check_end(&mut sim);
    sim.report
}

fn check_end(sim: &mut Sim<'_>) {
    let report = &mut sim.report;
    if !sim.sched.queue().is_empty() {
        report.violations.push(format!(
            "{} message(s) still queued at the end",
            sim.sched.queue().len()
        ));
    }
    for (id, t) in &sim.messages {
        for i in 0..t.recipients as u32 {
            if !t.finished.get(&i).copied().unwrap_or(false) {
                report
                    .violations
                    .push(format!("{id} recipient {i} neither delivered nor failed"));
            }
            let delivered = t.delivered.get(&i).copied().unwrap_or(0);
            if delivered > 1 {
                report.duplicates += 1;
                if !t.dropped_after_dot.contains_key(&i) {
                    report
                        .violations
                        .push(format!("{id} recipient {i} delivered {delivered} times"));
                }
            }
            let notices = t.notices.get(&i).copied().unwrap_or(0);
            if notices > 1 {
                report
                    .violations
                    .push(format!("{id} recipient {i} got {notices} failure notices"));
            }
            if t.bounce && notices > 0 {
                report.violations.push(format!("{id}: a bounce bounced"));
            }
        }
    }
    if report.longest_fresh_wait > FRESH_WAIT_MAX {
        report.violations.push(format!(
            "a fresh job waited {:?} for a worker",
            report.longest_fresh_wait
        ));
    }
    // Before the site is down: the failures that mark it down; while workers already
    // connecting fail too: at most the site's connections. Everything else is a probe. (A
    // site forgotten when idle starts counting afresh: once per eviction, at most.)
    let limit = HEALTH.down_after_failures as usize + 3;
    let throttling_sites = (0..DOMAINS).filter(|d| d % PROVIDERS == THROTTLING).count();
    for (provider, &n) in sim.unreachable_non_probes.iter().enumerate() {
        if n > 2 * limit {
            report.violations.push(format!(
                "provider {provider}: {n} connection attempts while unreachable that were not probes (a retry storm)"
            ));
        }
    }
    let sites_max = sim.config.sites_max;
    if report.most_sites > sites_max + PROVIDERS - 1 + throttling_sites {
        report.violations.push(format!(
            "{} sites at once, past {sites_max} idle plus the busy ones",
            report.most_sites
        ));
    }
}
