//! Delivery, the shell around the sans-IO scheduler (`gannet_sched`): every message a shard
//! spools is delivered by that shard. The scheduler decides what goes where and when; this
//! module does the I/O it asks for, one concept per file:
//!
//! - `routing`: planning a message's recipients, MX lookups to find each domain's receiving
//!   site, and the STARTTLS policy and credentials of a site;
//! - `worker`: a worker task per delivering connection: takes jobs, runs transactions
//!   (pipelined, with the next envelope sent right behind the previous content);
//! - `outbound`: one SMTP connection's I/O; `pool`: idle connections kept for reuse;
//!   `ipcap`: connections per receiving IP address;
//! - `store`: reading messages back from their segments (or from the buffers just written);
//! - `finish`: a job's results, bounces and delay notices;
//! - `suppressed`: queued recipients on the suppression list, finished undelivered;
//! - `intake`: mail to the bounce domain read as bounce and complaint reports;
//! - `state`: delivery state records, garbage collection and copy-forward.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gannet_sched::{QueuedMessage, Scheduler};
use gannet_smtp::deadline::Now;
use tracing::info;

use crate::config::Config;
use crate::dns::resolver::Resolver;
use crate::spool::appender::{Appender, WrittenRecord};

pub use gannet_smtp::client;
pub mod control;
pub mod finish;
pub mod intake;
pub mod ipcap;
pub mod outbound;
pub mod pauses;
pub mod pool;
pub mod routing;
pub mod state;
pub mod store;
pub mod suppressed;
pub mod tls;
pub mod worker;

/// How often due retries, idle connections and idle sites are looked at.
const TICK: Duration = Duration::from_millis(500);

pub struct Deliverer {
    shard: u16,
    /// The configuration in force; replaced by [`Deliverer::reconfigure`].
    config: RefCell<Arc<Config>>,
    appender: Rc<Appender>,
    sched: Rc<RefCell<Scheduler>>,
    resolver: Resolver,
    pool: RefCell<pool::Pool>,
    ip_cap: Rc<ipcap::IpCap>,
    store: store::MessageStore,
    /// A state flush is gathering or writing (see `state`).
    flushing: Cell<bool>,
    /// A copy-forward pass is running (see `state`).
    copying: Cell<bool>,
    /// The last state batch could not be written (logged once per change).
    state_write_failing: Cell<bool>,
    /// The destination table has been full (said once).
    sites_full_said: Cell<bool>,
    /// Syncs the committer has announced, and the state gatherer waiting for the next.
    commits: Cell<u64>,
    gather_waker: RefCell<Option<std::task::Waker>>,
    /// The last reply recent messages got, for the admin API (bounded).
    last_replies: control::SharedLastReplies,
    /// Messages whose reports (mail to the bounce domain) are being read (bounded by the queue).
    reading_reports: RefCell<std::collections::HashSet<gannet_spool::MessageId>>,
}

impl Deliverer {
    /// The shard's DNS resolver (MX delivery and mail authentication share it).
    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// The configuration in force.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.config.borrow().clone()
    }

    /// A reload: routes, destination rules, limits and retry timing for the next delivery
    /// attempts (those in progress finish as they began).
    pub fn reconfigure(&self, config: Arc<Config>) {
        let seed = self.sched.borrow().config().seed;
        let shard_count = self.sched.borrow().config().shard_count;
        let sched_config = config.sched_config(self.shard, shard_count, seed);
        self.sched.borrow_mut().reconfigure(sched_config);
        self.pool
            .borrow_mut()
            .set_count_max(config.delivery.connections_per_shard_max);
        self.ip_cap
            .set_max(config.delivery.connections_per_ip_max.div_ceil(shard_count).max(1));
        *self.config.borrow_mut() = config;
    }

    pub fn new(
        shard: u16,
        config: Arc<Config>,
        appender: Rc<Appender>,
        sched: Rc<RefCell<Scheduler>>,
        resolver: Resolver,
    ) -> Rc<Deliverer> {
        let shards = sched.borrow().config().shard_count;
        let ip_cap = ipcap::IpCap::new(config.delivery.connections_per_ip_max.div_ceil(shards).max(1));
        Rc::new(Deliverer {
            shard,
            store: store::MessageStore::new(config.spool.directory.clone()),
            pool: RefCell::new(pool::Pool::new(config.delivery.connections_per_shard_max)),
            ip_cap,
            config: RefCell::new(config),
            appender,
            sched,
            resolver,
            flushing: Cell::new(false),
            copying: Cell::new(false),
            state_write_failing: Cell::new(false),
            sites_full_said: Cell::new(false),
            commits: Cell::new(0),
            gather_waker: RefCell::new(None),
            last_replies: RefCell::new(control::LastReplies::default()),
            reading_reports: RefCell::new(std::collections::HashSet::new()),
        })
    }

    /// Starts the timer task and plans everything recovered from the spool (deferred messages
    /// keep their retry time across a restart; the rest go now).
    /// Applies the suspensions in force at start, before anything recovered is planned.
    pub fn start_suspended(&self, suspended: &[crate::admin::suspensions::SuspensionRecord]) {
        let mut sched = self.sched.borrow_mut();
        for s in suspended {
            sched.suspend(&s.domain, s.until_unix_s);
        }
    }

    pub fn start(self: &Rc<Self>) {
        let weak = Rc::downgrade(self);
        self.appender.set_before_sync(Rc::new(move || {
            if let Some(me) = weak.upgrade() {
                me.commit_coming();
            }
        }));
        let ready = self.sched.borrow_mut().recovered(Now::read());
        let waiting = self.sched.borrow().retries_len();
        if waiting > 0 {
            info!(
                shard = self.shard,
                "{waiting} recovered message(s) wait for their next attempt"
            );
        }
        for id in ready {
            self.schedule(id);
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
        self.sched.borrow().queue().len()
    }

    /// Whether a just-committed record of `len` bytes may be kept for its first delivery.
    pub fn wants_record(&self, len: usize) -> bool {
        self.store.wants(len)
    }

    /// Takes a newly spooled message, with the buffers it was written from when
    /// [`Deliverer::wants_record`] said so, and starts delivering it.
    pub fn accept(self: &Rc<Self>, message: QueuedMessage, record: Option<WrittenRecord>) {
        let id = message.id;
        self.sched.borrow_mut().insert(message);
        if let Some(record) = record {
            self.store.keep(id, record);
        }
        self.schedule(id);
    }

    /// Retries every deferred message now (`gannet queue flush`), and probes the destinations
    /// that are down. Returns how many messages.
    pub fn retry_all_now(self: &Rc<Self>) -> usize {
        let waiting = self.sched.borrow_mut().retry_all_now();
        for &id in &waiting {
            self.schedule(id);
        }
        // Down destinations with mail waiting are probed now.
        self.start_workers();
        waiting.len()
    }

    /// Closes the pooled connections of sites the scheduler evicted to make room, at once (a
    /// site forgotten keeps no socket).
    fn close_evicted(&self) {
        let evicted = self.sched.borrow_mut().take_evicted();
        if evicted.is_empty() {
            return;
        }
        if !self.sites_full_said.replace(true) {
            info!(
                shard = self.shard,
                "destination table full ({} per shard, delivery.destinations_max): idle destinations are forgotten, least recently active first",
                self.config().delivery.destinations_max
            );
        }
        let mut pool = self.pool.borrow_mut();
        for key in &evicted {
            pool.close_site(key);
        }
    }

    fn tick(self: &Rc<Self>) {
        let now = Instant::now();
        let due = self.sched.borrow_mut().due(now);
        for id in due {
            self.schedule(id);
        }
        self.adopt_suspensions();
        self.expire_suspensions();
        self.adopt_provider_pauses();
        self.resume_providers();
        for key in self.sched.borrow_mut().due_probes(now) {
            info!(shard = self.shard, destination = %key, "probing a destination that is down");
        }
        if self.copy_forward_wanted() {
            let me = self.clone();
            glommio::spawn_local(async move { me.copy_forward().await }).detach();
        }
        // Dropping a connection closes it; a polite QUIT is not worth a task per socket.
        self.pool
            .borrow_mut()
            .expire(self.config().delivery.idle_timeout.0, now);
        self.close_evicted();
        let evicted = self.sched.borrow_mut().evict_idle(now);
        let mut pool = self.pool.borrow_mut();
        for key in &evicted {
            pool.close_site(key);
        }
        drop(pool);
        self.sched.borrow_mut().kick_stranded();
        self.start_workers();
    }
}
