//! What the admin API asks of a shard's queue: gauges for the metrics, listings, one message in
//! full, the queue's shape by domain and age, and flushes. Reads the scheduler's queue index;
//! a flush moves matching messages from the retry timers to now.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Instant;

use gannet_bounce::Class;
use gannet_metrics::{QueueGauges, QUEUE_STATES};
use gannet_sched::scheduler::domain_of;
use gannet_sched::{QueuedMessage, Scheduler};
use gannet_spool::MessageId;
use tracing::info;

use super::Deliverer;
use gannet_smtp::client::prefix_within;
use gannet_smtp::deadline::Now;
use gannet_smtp::dsn::FailedRecipient;

use crate::admin::protocol::{
    Acted, Action, DownSite, Listing, MessageDetail, MessageSummary, RecipientDetail, Selector, ShardSlowdown,
    ShardSuspension, SummaryRow, AGE_BUCKETS,
};
use crate::metrics;
use crate::queue::rfc3339;

/// Recipient domains whose last reply a shard remembers (for `GET /api/queue/{id}`); the
/// oldest are forgotten.
const LAST_REPLIES_MAX: usize = 512;
/// Longest reply text remembered.
const LAST_REPLY_BYTES_MAX: usize = 512;
/// Destination domains a summary reports per shard; the rest are summed as "other".
const SUMMARY_DOMAINS_MAX: usize = 1_000;

/// The last reply a server gave for mail to each recently attempted recipient domain, bounded
/// (first in, first out). Kept per domain, not per message: 100,000 messages deferred by one
/// dead host need one entry, not 100,000 (measured: a per-message table of 2,048 entries a
/// shard cost 7 MB of PSS with 100,000 messages queued).
#[derive(Default)]
pub struct LastReplies {
    order: VecDeque<Box<str>>,
    text: HashMap<Box<str>, (Box<str>, Option<Class>)>,
}

impl LastReplies {
    /// Remembers `reply` for `domain` (lowercase); allocates only when the text changes.
    pub fn remember(&mut self, domain: &str, reply: &str, class: Option<Class>) {
        let reply = prefix_within(reply, LAST_REPLY_BYTES_MAX);
        if let Some((text, last_class)) = self.text.get_mut(domain) {
            if &**text != reply {
                *text = reply.into();
            }
            *last_class = class;
            return;
        }
        self.text.insert(domain.into(), (reply.into(), class));
        self.order.push_back(domain.into());
        while self.order.len() > LAST_REPLIES_MAX {
            if let Some(old) = self.order.pop_front() {
                self.text.remove(&old);
            }
        }
        debug_assert!(self.text.len() <= LAST_REPLIES_MAX);
    }

    /// The last reply for `domain` and its bounce class.
    pub fn get(&self, domain: &str) -> Option<(String, Option<Class>)> {
        self.text.get(domain).map(|(t, c)| (t.to_string(), *c))
    }
}

/// A message's state as the API names it.
fn state(m: &QueuedMessage, sched: &Scheduler) -> &'static str {
    if m.held && m.jobs_outstanding == 0 {
        "held"
    } else if sched.is_parked(&m.id) {
        "suspended"
    } else if m.jobs_outstanding > 0 {
        "delivering"
    } else if m.next_attempt_unix_s.is_some() {
        "deferred"
    } else {
        "ready"
    }
}

fn sender_text(sender: &[u8]) -> String {
    if sender.is_empty() {
        "<>".into()
    } else {
        String::from_utf8_lossy(sender).into_owned()
    }
}

fn matches(selector: &Selector, m: &QueuedMessage, sched: &Scheduler, now_unix_s: u64) -> bool {
    let view = m.envelope.view();
    if selector.id.as_deref().is_some_and(|id| id != m.id.to_string()) {
        return false;
    }
    if let Some(sender) = &selector.sender {
        let wanted = if sender == "<>" { "" } else { sender.as_str() };
        if !view.sender.eq_ignore_ascii_case(wanted.as_bytes()) {
            return false;
        }
    }
    let recipient_matches = |f: &dyn Fn(&[u8]) -> bool| {
        view.recipients()
            .enumerate()
            .any(|(i, r)| !m.done.contains(i) && f(r.address))
    };
    if let Some(rcpt) = &selector.recipient {
        if !recipient_matches(&|a| a.eq_ignore_ascii_case(rcpt.as_bytes())) {
            return false;
        }
    }
    if let Some(domain) = &selector.domain {
        if !recipient_matches(&|a| domain_of(a).eq_ignore_ascii_case(domain.as_bytes())) {
            return false;
        }
    }
    if selector.state.as_deref().is_some_and(|s| s != state(m, sched)) {
        return false;
    }
    if selector
        .min_age_s
        .is_some_and(|age| now_unix_s.saturating_sub(view.received_unix_s) < age)
    {
        return false;
    }
    true
}

fn summary(m: &QueuedMessage, sched: &Scheduler) -> MessageSummary {
    let view = m.envelope.view();
    MessageSummary {
        id: m.id.to_string(),
        shard: m.id.shard,
        sender: sender_text(view.sender),
        size_bytes: m.content_bytes,
        received_unix_s: view.received_unix_s,
        received: rfc3339(view.received_unix_s),
        state: state(m, sched).into(),
        recipients_total: m.done.len(),
        recipients_pending: m.pending_recipients(),
        attempts: m.attempts,
        next_attempt: m.next_attempt_unix_s.map(rfc3339),
    }
}

impl Deliverer {
    /// The queue's gauges for the metrics: messages and pending recipients by state, and
    /// the oldest message's reception time. One pass over the queue index.
    /// How many destinations are down now.
    pub fn sites_down_count(&self) -> usize {
        self.sched.borrow().sites_down().count()
    }

    /// This shard's suspensions in force, for the API (which tells the bounce actions' from
    /// the operator's).
    pub fn suspensions_in_force(&self) -> Vec<ShardSuspension> {
        let now_unix_s = crate::smtp::received::unix_now_s();
        self.sched
            .borrow()
            .suspensions()
            .active()
            .iter()
            .filter(|s| s.until_unix_s > now_unix_s)
            .map(|s| ShardSuspension {
                domain: s.domain.clone(),
                until_unix_s: s.until_unix_s,
                shard: self.shard as usize,
            })
            .chain(self.sched.borrow().providers().iter().filter_map(|p| {
                p.paused_until_unix_s.map(|until_unix_s| ShardSuspension {
                    domain: format!("provider {}", p.name),
                    until_unix_s,
                    shard: self.shard as usize,
                })
            }))
            .collect()
    }

    /// This shard's slowed rates in force, for the API.
    pub fn slowdowns_in_force(&self) -> Vec<ShardSlowdown> {
        self.sched
            .borrow_mut()
            .slowdowns(Instant::now())
            .into_iter()
            .map(|(destination, s)| ShardSlowdown {
                destination,
                interval_ms: s.interval.as_millis() as u64,
                until_unix_s: s.until_unix_s,
                shard: self.shard as usize,
            })
            .collect()
    }

    /// The destinations down now, for the API.
    pub fn sites_down(&self) -> Vec<DownSite> {
        let now = Instant::now();
        let unix_now = crate::smtp::received::unix_now_s();
        self.sched
            .borrow()
            .sites_down()
            .filter_map(|site| {
                let down = site.health().down()?;
                Some(DownSite {
                    destination: site.key.to_string(),
                    down_since_unix_s: unix_now.saturating_sub(now.saturating_duration_since(down.since).as_secs()),
                    failures: down.failures,
                    next_probe_in_s: down.probe_at.saturating_duration_since(now).as_secs(),
                    waiting: site.pending(),
                })
            })
            .collect()
    }

    pub fn queue_gauges(&self) -> QueueGauges {
        let mut g = QueueGauges::default();
        let sched = self.sched.borrow();
        for m in sched.queue().iter() {
            let state = state(m, &sched);
            let slot = QUEUE_STATES
                .iter()
                .position(|s| *s == state)
                .expect("every state the API names is a metrics state");
            g.messages[slot] += 1;
            g.recipients[slot] += m.pending_recipients() as u64;
            let received = m.envelope.view().received_unix_s;
            g.oldest_received_unix_s = Some(g.oldest_received_unix_s.map_or(received, |o| o.min(received)));
        }
        g
    }

    /// The messages `listing` selects, oldest first: how many match, and the first
    /// `offset + limit` of them (the admin thread merges the shards' and cuts the page).
    pub fn list(&self, listing: &Listing, now_unix_s: u64) -> (usize, Vec<MessageSummary>) {
        let sched = self.sched.borrow();
        let mut found: Vec<&QueuedMessage> = sched
            .queue()
            .iter()
            .filter(|m| matches(&listing.selector, m, &sched, now_unix_s))
            .collect();
        let matched = found.len();
        let keep = listing.offset.saturating_add(listing.limit);
        found.sort_by_key(|m| (m.envelope.view().received_unix_s, m.id));
        found.truncate(keep);
        (matched, found.into_iter().map(|m| summary(m, &sched)).collect())
    }

    /// One message in full, if this shard has it.
    pub async fn show(self: &Rc<Self>, id: &str) -> Option<MessageDetail> {
        let id: MessageId = id.parse().ok()?;
        let (mut detail, record_bytes) = {
            let sched = self.sched.borrow();
            let m = sched.queue().get(&id)?;
            let view = m.envelope.view();
            let recipients = view
                .recipients()
                .enumerate()
                .map(|(i, r)| RecipientDetail {
                    address: String::from_utf8_lossy(r.address).into_owned(),
                    state: if m.done.contains(i) { "done" } else { "pending" }.into(),
                })
                .collect();
            let last = view
                .recipients()
                .enumerate()
                .filter(|(i, _)| !m.done.contains(*i))
                .find_map(|(_, r)| {
                    let domain = String::from_utf8_lossy(domain_of(r.address)).to_ascii_lowercase();
                    self.last_replies.borrow().get(&domain)
                });
            let detail = MessageDetail {
                summary: summary(m, &sched),
                client_ip: view.client_ip.to_string(),
                helo: String::from_utf8_lossy(view.helo).into_owned(),
                recipients,
                last_reply: last.as_ref().map(|(text, _)| text.clone()),
                last_class: last.and_then(|(_, class)| class).map(|c| c.as_str().to_string()),
                headers: None,
            };
            (detail, m.record_bytes)
        };
        if let Ok(loaded) = self.store.load(id, record_bytes).await {
            let relayed = loaded.relayed();
            let content: &[u8] = &relayed;
            let end = memchr::memmem::find(content, b"\r\n\r\n").map_or(content.len(), |i| i + 2);
            detail.headers = Some(String::from_utf8_lossy(&content[..end]).into_owned());
        }
        Some(detail)
    }

    /// The queue's shape: pending recipients' domains by message age (Postfix's qshape).
    pub fn summary(&self, now_unix_s: u64) -> Vec<SummaryRow> {
        let sched = self.sched.borrow();
        let mut rows: HashMap<Vec<u8>, SummaryRow> = HashMap::new();
        let mut other = SummaryRow {
            domain: "other".into(),
            by_age: vec![0; AGE_BUCKETS.len()],
            ..SummaryRow::default()
        };
        for m in sched.queue().iter() {
            let view = m.envelope.view();
            let age = now_unix_s.saturating_sub(view.received_unix_s);
            let bucket = AGE_BUCKETS
                .iter()
                .position(|(_, max)| age <= *max)
                .unwrap_or(AGE_BUCKETS.len() - 1);
            for (i, r) in view.recipients().enumerate() {
                if m.done.contains(i) {
                    continue;
                }
                let domain = domain_of(r.address).to_ascii_lowercase();
                let full = rows.len() >= SUMMARY_DOMAINS_MAX && !rows.contains_key(&domain);
                let row = if full {
                    &mut other
                } else {
                    rows.entry(domain).or_insert_with_key(|d| SummaryRow {
                        domain: String::from_utf8_lossy(d).into_owned(),
                        total: 0,
                        by_age: vec![0; AGE_BUCKETS.len()],
                    })
                };
                row.total += 1;
                row.by_age[bucket] += 1;
            }
        }
        let mut out: Vec<SummaryRow> = rows.into_values().collect();
        if other.total > 0 {
            out.push(other);
        }
        out
    }

    /// The ids of the messages `selector` matches.
    fn selected(&self, selector: &Selector) -> Vec<MessageId> {
        let now_unix_s = Now::read().unix_s;
        let sched = self.sched.borrow();
        sched
            .queue()
            .iter()
            .filter(|m| matches(selector, m, &sched, now_unix_s))
            .map(|m| m.id)
            .collect()
    }

    /// Applies an operator's action to what `selector` matches; logs it per message.
    pub async fn act(self: &Rc<Self>, action: Action, selector: &Selector, reason: &str) -> Acted {
        let ids = self.selected(selector);
        let acted = match action {
            Action::Flush => self.flush(&ids),
            Action::Hold => self.hold(&ids).await,
            Action::Release => self.release(&ids).await,
            Action::Delete => self.delete(&ids, None).await,
            Action::Bounce => self.delete(&ids, Some(reason)).await,
        };
        for id in &acted.touched {
            info!(shard = self.shard, %id, action = action.name(), reason, "operator action: {}", action.name());
        }
        acted
    }

    /// Retries the deferred messages of `ids` now.
    fn flush(self: &Rc<Self>, ids: &[MessageId]) -> Acted {
        let due = self.sched.borrow_mut().retry_now(ids);
        for &id in &due {
            self.schedule(id);
        }
        // Mail waiting at a down destination is on no retry timer: probe those now.
        let probed = self.sched.borrow_mut().probe_down_now();
        self.start_workers();
        info!(
            shard = self.shard,
            "queue flush: {} deferred message(s) retried now, {probed} down destination(s) probed",
            due.len()
        );
        Acted {
            touched: due.iter().map(MessageId::to_string).collect(),
            ..Acted::default()
        }
    }

    /// Holds `ids`: recorded durably before it is reported.
    async fn hold(self: &Rc<Self>, ids: &[MessageId]) -> Acted {
        let entries = self.sched.borrow_mut().hold(ids, Now::read());
        let mut acted = Acted {
            touched: entries.iter().map(|e| e.id.to_string()).collect(),
            ..Acted::default()
        };
        if let Err(e) = self.appender.append_deferrals_durably(&entries).await {
            acted.error = Some(format!(
                "the hold is in force but could not be written to the spool ({e:?}); a restart would undo it"
            ));
        }
        acted
    }

    /// Releases held `ids` (recorded durably), due at once.
    async fn release(self: &Rc<Self>, ids: &[MessageId]) -> Acted {
        let (entries, due) = self.sched.borrow_mut().release(ids, Now::read());
        let mut acted = Acted {
            touched: entries.iter().map(|e| e.id.to_string()).collect(),
            ..Acted::default()
        };
        if let Err(e) = self.appender.append_deferrals_durably(&entries).await {
            acted.error = Some(format!(
                "released, but the release could not be written to the spool ({e:?}); a restart would hold them again"
            ));
        }
        for id in due {
            self.schedule(id);
        }
        acted
    }

    /// Deletes `ids` (no notice), or with `bounce_reason`, returns them to their senders with a
    /// failure notice first (never for the null sender). Mail that only waits at a site (a
    /// paused provider, a down destination) is taken out of the site's queue first; messages on
    /// a connection or being routed are busy. A withdrawn message whose notice cannot be
    /// spooled is planned again (`bounce_one`).
    async fn delete(self: &Rc<Self>, ids: &[MessageId], bounce_reason: Option<&str>) -> Acted {
        let mut acted = Acted::default();
        let mut gone = Vec::new();
        self.sched.borrow_mut().withdraw(ids);
        for &id in ids {
            let idle = self
                .sched
                .borrow()
                .queue()
                .get(&id)
                .is_some_and(|m| m.jobs_outstanding == 0);
            if !idle {
                acted.busy.push(id.to_string());
                continue;
            }
            if let Some(reason) = bounce_reason {
                if !self.bounce_one(id, reason).await {
                    acted.error = Some("a failure notice could not be spooled; those messages stay queued".into());
                    continue;
                }
            }
            gone.extend(self.sched.borrow_mut().remove(&[id]));
            self.store.forget(&id);
        }
        acted.touched = gone.iter().map(|e| e.id.to_string()).collect();
        if let Err(e) = self.appender.append_tombstones_durably(&gone).await {
            acted.error = Some(format!(
                "removed, but the removal could not be written to the spool ({e:?}); a restart would bring them back"
            ));
        }
        acted
    }

    /// Spools the failure notice of an operator's bounce for `id`'s pending recipients. True
    /// when it is durable or none is due (a bounce is never bounced). The message is held in
    /// memory meanwhile, so that no attempt starts while the notice is written; if the notice
    /// fails, it is released again unless it was held before.
    async fn bounce_one(self: &Rc<Self>, id: MessageId, reason: &str) -> bool {
        let (envelope, pending, record_bytes, was_held) = {
            let sched = self.sched.borrow();
            let Some(m) = sched.queue().get(&id) else {
                return false;
            };
            let pending: Vec<u32> = (0..m.done.len())
                .filter(|&i| !m.done.contains(i))
                .map(|i| i as u32)
                .collect();
            (m.envelope.view().to_stored(), pending, m.record_bytes, m.held)
        };
        if envelope.sender.is_empty() {
            return true;
        }
        self.sched.borrow_mut().hold(&[id], Now::read());
        let spooled = match self.store.load(id, record_bytes).await {
            Ok(loaded) => {
                let failed: Vec<FailedRecipient> = pending
                    .into_iter()
                    .map(|index| FailedRecipient {
                        index,
                        diagnostic: format!("550 5.0.0 returned by the operator: {reason}"),
                        remote_mta: None,
                        class: None,
                    })
                    .collect();
                let spooled = self
                    .spool_notice(id, &envelope, &loaded.relayed(), &failed, "failed")
                    .await;
                if spooled {
                    metrics::with(|m| m.bounces.add(("other", "operator"), failed.len() as u64));
                }
                spooled
            }
            Err(_) => false,
        };
        if !spooled && !was_held {
            let (_, due) = self.sched.borrow_mut().release(&[id], Now::read());
            due.into_iter().for_each(|id| self.schedule(id));
        }
        spooled
    }

    /// Stops delivery to `domain` until `until_unix_s` (messages already on a connection
    /// finish their attempt). False when the table of suspensions is full.
    pub fn suspend(&self, domain: &str, until_unix_s: u64) -> bool {
        let done = self.sched.borrow_mut().suspend(domain, until_unix_s);
        if done {
            info!(
                shard = self.shard,
                domain,
                "destination suspended until {}",
                rfc3339(until_unix_s)
            );
        }
        done
    }

    /// Ends the suspension of `domain`: its parked mail is planned at once. How many.
    pub fn resume(self: &Rc<Self>, domain: &str) -> usize {
        let ids = self.sched.borrow_mut().resume(domain);
        info!(
            shard = self.shard,
            domain,
            "destination resumed: {} message(s) go now",
            ids.len()
        );
        for &id in &ids {
            self.schedule(id);
        }
        ids.len()
    }

    /// Adopts the provider pauses other shards published (every tick, before
    /// `resume_providers`): a receiver that asked one shard to pause sees none send.
    pub(super) fn adopt_provider_pauses(self: &Rc<Self>) {
        let now_unix_s = Now::read().unix_s;
        let count = self.sched.borrow().providers().len();
        for p in 0..count {
            let until = super::pauses::published(p);
            if until <= now_unix_s {
                continue;
            }
            if let Some(provider) = self.sched.borrow_mut().pause_provider(p, until) {
                info!(
                    shard = self.shard,
                    provider,
                    "provider paused as another shard asked, until {}",
                    rfc3339(until)
                );
            }
        }
    }

    /// Adopts the domain suspensions other shards' bounce actions set (every tick, before
    /// `expire_suspensions`), unless the domain is suspended that long already.
    pub(super) fn adopt_suspensions(self: &Rc<Self>) {
        let now_unix_s = Now::read().unix_s;
        super::pauses::take_suspensions(self.shard, |domain, until| {
            let mut sched = self.sched.borrow_mut();
            let already = sched
                .suspensions()
                .until_unix_s(domain.as_bytes())
                .is_some_and(|u| u >= until);
            if until > now_unix_s && !already && sched.suspend(domain, until) {
                info!(
                    shard = self.shard,
                    domain,
                    "suspended as another shard asked, until {}",
                    rfc3339(until)
                );
            }
        });
    }

    /// Ends provider pauses past their time (every tick): their sites go again.
    pub(super) fn resume_providers(self: &Rc<Self>) {
        let resumed = self.sched.borrow_mut().resume_providers(Now::read().unix_s);
        for provider in &resumed {
            info!(
                shard = self.shard,
                provider, "a provider's pause ended: its mail goes now"
            );
        }
        if !resumed.is_empty() {
            self.start_workers();
        }
    }

    /// Ends suspensions past their time (every tick).
    pub(super) fn expire_suspensions(self: &Rc<Self>) {
        let ids = self.sched.borrow_mut().expire_suspensions(Now::read().unix_s);
        if !ids.is_empty() {
            info!(
                shard = self.shard,
                "a suspension expired: {} message(s) go now",
                ids.len()
            );
        }
        for id in ids {
            self.schedule(id);
        }
    }

    /// Remembers a server's reply for mail to `address`'s domain.
    pub fn remember_reply(&self, address: &[u8], reply: &str, class: Option<Class>) {
        let domain = String::from_utf8_lossy(domain_of(address)).to_ascii_lowercase();
        self.last_replies.borrow_mut().remember(&domain, reply, class);
    }
}

/// The last replies' store, shared by a shard's deliverer.
pub type SharedLastReplies = RefCell<LastReplies>;
