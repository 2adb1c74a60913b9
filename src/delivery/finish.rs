//! A job's end: each recipient's result logged, failure and delay notices spooled (RFC 3464,
//! from the null sender, never for `<>`), and the scheduler told who is finished. A failed
//! recipient counts as finished only once its notice is durable (or none is wanted); if the
//! notice cannot be spooled now, the recipient is tried again later.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;

use gannet_bounce::{Action, Class, Classification, Failure};
use gannet_sched::scheduler::domain_of;
use gannet_sched::{Completed, QueuedMessage, Verdict};
use gannet_smtp::client::RecipientResult;
use gannet_smtp::deadline::Now;
use gannet_smtp::dsn::{build_bounce, BounceContext, FailedRecipient};
use gannet_smtp::envelope::{Envelope, Origin, Ret, StoredEnvelope};
use gannet_spool::record::EnvelopeBytes;
use gannet_spool::MessageId;
use gannet_suppress::journal::Change;
use tracing::{info, warn};

use super::store::Loaded;
use super::Deliverer;
use crate::config::Classifier;
use crate::metrics;
use crate::smtp::session::MessageSink;

/// One attempt as the log tells it: the receiving site (its MX hosts, or the smarthost), the
/// address that answered, TLS, and how long it took. Empty when no server was reached.
#[derive(Debug, Default)]
pub(super) struct Attempt {
    pub relay: Option<SocketAddr>,
    pub site: Option<String>,
    /// The site's key (for the `slow` and `suspend` actions) and the job's lane.
    pub key: Option<gannet_sched::SiteKey>,
    pub lane: Option<gannet_sched::Lane>,
    pub tls: Option<String>,
    pub took: Option<std::time::Duration>,
}

impl Deliverer {
    /// Records a job's results (see the module's doc). `relay`: the server that answered, if
    /// one did; `original`: the message as read for the transaction, if it was.
    pub(super) async fn finish_job(
        self: &Rc<Self>,
        id: MessageId,
        results: Vec<(u32, RecipientResult)>,
        attempt: Attempt,
        original: Option<Rc<Loaded>>,
    ) {
        let relay = attempt.relay;
        let now = Now::read();
        let (envelope, record_bytes) = {
            let sched = self.sched.borrow();
            let Some(message) = sched.queue().get(&id) else { return };
            (message.envelope.view().to_stored(), message.record_bytes)
        };
        let config = self.config();
        let classifier = config.bounces.classifier();
        let classes = classify(&classifier, &results, &attempt);
        let (results, suppress) = self.act_on_classes(&envelope, results, &classes, &classifier, &attempt, now);
        if !suppress.is_empty() {
            self.suppress_hard_bounces(id, suppress).await;
        }
        let Some(classified) = self.sched.borrow().classify(id, &results, now) else {
            return;
        };
        self.log_results(id, &envelope, &results, &classified.verdicts, &classes, &attempt);
        count_verdicts(&classified.verdicts, &classes);
        // The API shows it for pending recipients: a deferral's reply before a failure's.
        let remembered = results
            .iter()
            .find(|(_, r)| matches!(r, RecipientResult::Deferred(_)))
            .or_else(|| results.iter().find(|(_, r)| matches!(r, RecipientResult::Failed(_))));
        if let Some((index, RecipientResult::Deferred(r) | RecipientResult::Failed(r))) = remembered {
            if let Some(recipient) = envelope.recipients.get(*index as usize) {
                let class = class_of(&classes, *index);
                self.remember_reply(&recipient.address, &r.text(), class);
            }
        }
        let notice = |indexes: &[u32], expired: bool| -> Vec<FailedRecipient> {
            indexes
                .iter()
                .filter_map(|i| results.iter().find(|(r, _)| r == i))
                .map(|(index, result)| FailedRecipient {
                    index: *index,
                    diagnostic: match (result, expired) {
                        (RecipientResult::Deferred(r), true) => {
                            format!("{} (gave up after delivery.queue_lifetime)", r.text())
                        }
                        (
                            RecipientResult::Delivered(r) | RecipientResult::Failed(r) | RecipientResult::Deferred(r),
                            _,
                        ) => r.text(),
                    },
                    remote_mta: relay.map(|a| a.to_string()),
                    class: class_of(&classes, *index).map(Class::as_str),
                })
                .collect()
        };
        let mut done = classified.done.clone();
        let mut delay_notified = false;
        if !classified.bounce.is_empty() || !classified.delayed.is_empty() {
            let original = match original {
                Some(o) => Some(o),
                None => self.store.load(id, record_bytes).await.ok().map(Rc::new),
            };
            let relayed = original.as_ref().map(|o| o.relayed());
            let content: &[u8] = relayed.as_deref().unwrap_or(&[]);
            let bounce = notice(&classified.bounce, true);
            if !bounce.is_empty() && self.spool_notice(id, &envelope, content, &bounce, "failed").await {
                done.extend(classified.bounce.iter().copied());
            }
            if !classified.delayed.is_empty() {
                let delayed = notice(&classified.delayed, false);
                delay_notified = self.spool_notice(id, &envelope, content, &delayed, "delayed").await;
            }
        }
        let now = Now::read();
        let completed = self.complete(id, &done, &classified.verdicts, &attempt, delay_notified, now);
        if matches!(completed, Some(Completed::Finished | Completed::Retry { .. })) {
            self.store.forget(&id);
        }
        if matches!(completed, Some(Completed::Finished)) {
            let queued_s = now.unix_s.saturating_sub(envelope.received_unix_s);
            metrics::with(|m| m.queue_time.observe(queued_s as f64));
        }
        self.flush_state_soon();
    }
}

/// Expired recipients, for `gannet_expired_total`; every failed, expired or deferred
/// recipient by class, for `gannet_bounces_total`.
fn count_verdicts(verdicts: &[(u32, Verdict)], classes: &[(u32, Classification)]) {
    let expired = verdicts.iter().filter(|(_, v)| *v == Verdict::Expired).count() as u64;
    metrics::with(|m| {
        m.expired += expired;
        for (index, verdict) in verdicts {
            let result = match verdict {
                Verdict::Delivered => continue,
                Verdict::Failed => "failed",
                Verdict::Expired => "expired",
                Verdict::Deferred => "deferred",
            };
            let class = class_of(classes, *index).unwrap_or(Class::Other);
            m.bounces.add((class.as_str(), result), 1);
        }
    });
}

/// The class of every recipient that was not delivered, sorted by recipient index (for
/// `class_of`). The MX host names of the site (for provider rules) come from the attempt's site.
fn classify(
    classifier: &Classifier,
    results: &[(u32, RecipientResult)],
    attempt: &Attempt,
) -> Vec<(u32, Classification)> {
    let hosts: Vec<&str> = match &attempt.key {
        Some(gannet_sched::SiteKey::Mx(hosts)) => hosts.iter().map(|h| h.trim_end_matches('.')).collect(),
        _ => Vec::new(),
    };
    let mut classes: Vec<(u32, Classification)> = results
        .iter()
        .filter_map(|(index, result)| match result {
            RecipientResult::Delivered(_) => None,
            RecipientResult::Failed(r) | RecipientResult::Deferred(r) => {
                let text = r.lines.join(" ");
                let failure = Failure {
                    code: r.code,
                    text: &text,
                    mx_hosts: &hosts,
                };
                Some((*index, classifier.rules.classify_fully(&failure)))
            }
        })
        .collect();
    classes.sort_unstable_by_key(|(index, _)| *index);
    classes
}

/// The classification of one recipient in `classify`'s sorted list.
fn classification_of(classes: &[(u32, Classification)], index: u32) -> Option<&Classification> {
    let at = classes.binary_search_by_key(&index, |(i, _)| *i).ok()?;
    Some(&classes[at].1)
}

fn class_of(classes: &[(u32, Classification)], index: u32) -> Option<Class> {
    classification_of(classes, index).map(|c| c.class)
}

impl Deliverer {
    /// Applies each class's action: `bounce` (and `suppress`, on a permanent reply) make the
    /// result a failure now; `suspend` suspends the recipient's domain for
    /// `bounces.suspend_for`, and the deferred message then waits for it (no backoff step).
    fn act_on_classes(
        &self,
        envelope: &StoredEnvelope,
        mut results: Vec<(u32, RecipientResult)>,
        classes: &[(u32, Classification)],
        classifier: &Classifier,
        attempt: &Attempt,
        now: Now,
    ) -> (Vec<(u32, RecipientResult)>, Vec<Change>) {
        let suspend_for_default = self.config().bounces.suspend_for.0;
        let provider = self.provider_of(attempt);
        let mut suppress = Vec::new();
        for (index, result) in &mut results {
            let Some(found) = classification_of(classes, *index) else {
                continue;
            };
            let class = found.class;
            let action = found.action.unwrap_or_else(|| classifier.action(class));
            let suspend_for = found.suspend_for.unwrap_or(suspend_for_default);
            match (action, &*result) {
                (Action::Bounce, RecipientResult::Deferred(r)) => {
                    *result = RecipientResult::Failed(r.clone());
                    metrics::with(|m| m.bounce_actions.add("bounce", 1));
                }
                (Action::Slow, RecipientResult::Deferred(_)) => {
                    if let Some(key) = &attempt.key {
                        self.slow_down(key, found, class, now);
                    }
                }
                (Action::Suppress, RecipientResult::Failed(r)) => {
                    let (Some(list), Some(recipient)) =
                        (crate::suppression::get(), envelope.recipients.get(*index as usize))
                    else {
                        continue;
                    };
                    let reason = format!("{} ({class})", r.text());
                    if let Some(change) = list.hard_bounce(&recipient.address, &envelope.sender, &reason, now.unix_s) {
                        suppress.push(change);
                    }
                }
                (Action::Suspend, RecipientResult::Deferred(_)) if provider.is_some() => {
                    let p = provider.expect("checked");
                    let until = now.unix_s + suspend_for.as_secs();
                    // The other shards adopt the pause at their next tick.
                    super::pauses::publish(p, until);
                    let paused = self.sched.borrow_mut().pause_provider(p, until);
                    if let Some(provider) = paused {
                        info!(
                            shard = self.shard,
                            provider,
                            class = class.as_str(),
                            "provider paused by the {class} action for {}s",
                            suspend_for.as_secs()
                        );
                        metrics::with(|m| m.bounce_actions.add("suspend", 1));
                    }
                }
                (Action::Suspend, RecipientResult::Deferred(_)) => {
                    let Some(recipient) = envelope.recipients.get(*index as usize) else {
                        continue;
                    };
                    let domain = String::from_utf8_lossy(domain_of(&recipient.address)).to_ascii_lowercase();
                    if self
                        .sched
                        .borrow()
                        .suspensions()
                        .until_unix_s(domain.as_bytes())
                        .is_none()
                    {
                        let until = now.unix_s + suspend_for.as_secs();
                        if self.suspend(&domain, until) {
                            super::pauses::publish_suspension(self.shard, &domain, until);
                            info!(
                                shard = self.shard,
                                domain,
                                class = class.as_str(),
                                "suspended by the {class} action for {}s",
                                suspend_for.as_secs()
                            );
                            metrics::with(|m| m.bounce_actions.add("suspend", 1));
                        }
                    }
                }
                _ => {}
            }
        }
        (results, suppress)
    }

    /// The index of the provider of the attempt's site, if it has one.
    fn provider_of(&self, attempt: &Attempt) -> Option<usize> {
        let key = attempt.key.as_ref()?;
        self.sched.borrow().provider_index_of(key)
    }

    /// The scheduler's `complete`, except at the site of a paused provider, where the
    /// deferred recipients wait for the pause (no attempt counted, no retry timer).
    fn complete(
        &self,
        id: MessageId,
        done: &[u32],
        verdicts: &[(u32, Verdict)],
        attempt: &Attempt,
        delay_notified: bool,
        now: Now,
    ) -> Option<Completed> {
        let mut sched = self.sched.borrow_mut();
        match (&attempt.key, attempt.lane) {
            (Some(key), Some(lane)) if sched.provider_paused(key) => {
                let recipients: Vec<u32> = verdicts
                    .iter()
                    .filter(|(i, v)| *v == Verdict::Deferred && !done.contains(i))
                    .map(|(i, _)| *i)
                    .collect();
                let waiting = gannet_sched::Waiting {
                    recipients,
                    site: key.clone(),
                    lane,
                };
                sched.complete_waiting(id, done, waiting, delay_notified, now)
            }
            _ => sched.complete(id, done, delay_notified, now),
        }
    }

    /// The `slow` action: the site's provider (or the site) sends at the lowered rate for a
    /// while; logged once per slow-down and counted.
    fn slow_down(&self, key: &gannet_sched::SiteKey, found: &Classification, class: Class, now: Now) {
        let bounces = &self.config().bounces;
        let interval = found.slow_interval.unwrap_or(bounces.slow_interval());
        let slow_for = found.slow_for.unwrap_or(bounces.slow_for.0);
        let until = now.instant + slow_for;
        let until_unix_s = now.unix_s + slow_for.as_secs();
        let slowed = self.sched.borrow_mut().slow(key, interval, until, until_unix_s);
        if let Some(name) = slowed {
            info!(
                shard = self.shard,
                destination = name,
                class = class.as_str(),
                "slowed by the {class} action to one message every {} ms for {}s",
                interval.as_millis(),
                slow_for.as_secs()
            );
            metrics::with(|m| m.bounce_actions.add("slow", 1));
        }
    }

    /// Adds hard-bounced recipients to the suppression list (durably, on a blocking thread).
    async fn suppress_hard_bounces(&self, id: MessageId, changes: Vec<Change>) {
        let addresses: Vec<String> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Add { address, .. } => Some(address.clone()),
                Change::Remove { .. } => None,
            })
            .collect();
        match crate::suppression::apply(changes).await {
            Ok(applied) => {
                metrics::with(|m| m.bounce_actions.add("suppress", applied.added as u64));
                for to in &addresses {
                    info!(shard = self.shard, %id, %to, "suppressed after a hard bounce");
                }
            }
            Err(e) => warn!(shard = self.shard, %id, "cannot add hard bounces to the suppression list: {e}"),
        }
    }
}

impl Deliverer {
    fn log_results(
        &self,
        id: MessageId,
        envelope: &StoredEnvelope,
        results: &[(u32, RecipientResult)],
        verdicts: &[(u32, Verdict)],
        classes: &[(u32, Classification)],
        attempt: &Attempt,
    ) {
        let relay = attempt.relay.map_or_else(|| "none".to_string(), |a| a.to_string());
        let mx = attempt.site.as_deref().unwrap_or("none");
        let tls = attempt.tls.as_deref().unwrap_or("none");
        let took_ms = attempt.took.map_or(0, |t| t.as_millis() as u64);
        for ((index, result), (_, verdict)) in results.iter().zip(verdicts) {
            let to = envelope
                .recipients
                .get(*index as usize)
                .map_or_else(String::new, |r| String::from_utf8_lossy(&r.address).into_owned());
            let reply = match result {
                RecipientResult::Delivered(r) | RecipientResult::Failed(r) | RecipientResult::Deferred(r) => r.text(),
            };
            let class = class_of(classes, *index).map_or("none", Class::as_str);
            if crate::events::enabled() {
                let kind = match verdict {
                    Verdict::Delivered => "delivered",
                    Verdict::Failed => "bounced",
                    Verdict::Expired => "expired",
                    Verdict::Deferred => "deferred",
                };
                crate::events::emit(crate::events::EventBody {
                    kind,
                    message_id: id.to_string(),
                    sender: String::from_utf8_lossy(&envelope.sender).into_owned(),
                    recipient: Some(to.clone()),
                    recipients: None,
                    size_bytes: None,
                    client: None,
                    relay: Some(relay.clone()),
                    reply: Some(reply.clone()),
                    class: (class != "none").then_some(class),
                });
            }
            match verdict {
                Verdict::Delivered => {
                    info!(shard = self.shard, %id, %to, mx, %relay, tls, took_ms, "delivered: {reply}")
                }
                Verdict::Failed => {
                    warn!(shard = self.shard, %id, %to, mx, %relay, tls, took_ms, class, "failed for good: {reply}")
                }
                Verdict::Expired => {
                    warn!(shard = self.shard, %id, %to, mx, %relay, class, "expired after queue_lifetime: {reply}")
                }
                Verdict::Deferred => {
                    info!(shard = self.shard, %id, %to, mx, %relay, tls, took_ms, class, "deferred: {reply}")
                }
            }
        }
    }

    /// Spools a delivery status notification (`action`: "failed" or "delayed") to the original
    /// sender, from the null sender. True once it is durable.
    pub(super) async fn spool_notice(
        self: &Rc<Self>,
        original_id: MessageId,
        envelope: &StoredEnvelope,
        content: &[u8],
        failed: &[FailedRecipient],
        action: &str,
    ) -> bool {
        let now = Now::read();
        let id_text = original_id.to_string();
        let ctx = BounceContext {
            hostname: &self.config().server.hostname,
            original_id: &id_text,
            now_unix_s: now.unix_s,
            action,
        };
        let size_max = self.config().limits.message_size_max.0 as usize;
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
        let hostname = self.config().server.hostname.clone();
        let origin = Origin {
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            helo: hostname.as_bytes(),
            received_unix_s: now.unix_s,
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
                let stored = EnvelopeBytes::from_envelope(&bounce_envelope, origin);
                self.accept(QueuedMessage::new(bounce_id, record_bytes, content_bytes, stored), None);
                true
            }
            Err(e) => {
                warn!(shard = self.shard, id = %original_id, "cannot spool a bounce ({e:?}); the failure will be reported later");
                false
            }
        }
    }
}
