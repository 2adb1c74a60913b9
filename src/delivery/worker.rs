//! A delivery worker: one task per delivering connection to a site. It takes the site's jobs in
//! turn (lanes), reuses a pooled connection or opens one, runs each transaction (pipelined when
//! the server allows, BDAT when it offers CHUNKING), and puts the next job's envelope right
//! behind a message's content (RFC 2920 3.1) so that a server without CHUNKING costs one round
//! trip per message. It stops when the site has no work, parking its connection in the pool.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use gannet_sched::HealthChange;
use gannet_sched::{Job, Lane, SiteKey};
use gannet_smtp::client::{OutboundEnvelope, RecipientResult, ServerReply, Transaction, TxStep, Unsendable};
use gannet_smtp::data::dot_stuff;
use gannet_smtp::envelope::BodyType;
use gannet_spool::record::EnvelopeView;
use tracing::{info, warn};

use super::finish::Attempt;
use super::outbound::OutboundConnection;
use super::routing::{destination_label, NoConnection, Unreachable};
use super::store::Loaded;
use super::Deliverer;
use crate::metrics;

/// The VERP return path of a job (`[verp]`): for a one-recipient job of mail that is not a
/// bounce, `<prefix>+<token>@<bounce domain>`; None otherwise (the sender as received).
pub fn return_path(job: &Job, envelope: &EnvelopeView<'_>) -> Option<Vec<u8>> {
    let shell = crate::verp::get()?;
    if envelope.sender.is_empty() || job.recipients.len() != 1 {
        return None;
    }
    let index = job.recipients[0];
    let recipient = envelope.recipient(index as usize)?;
    Some(shell.return_path(&job.id.to_string(), index, recipient.address))
}

/// A job's transaction envelope: its recipients of `envelope`, the content's size, and the
/// sender (`return_path` when given, else the one received).
pub fn outbound_envelope<'a>(
    job: &Job,
    envelope: &EnvelopeView<'a>,
    content_bytes: u64,
    return_path: Option<&'a [u8]>,
) -> OutboundEnvelope<'a> {
    let mut wanted = job.recipients.iter().copied().peekable();
    let mut recipients = Vec::with_capacity(job.recipients.len());
    // Job recipients are in envelope order (the scheduler plans them so): one walk over the
    // envelope finds them all; should they not be, each is looked up on its own.
    for (i, r) in envelope.recipients().enumerate() {
        if wanted.peek() == Some(&(i as u32)) {
            recipients.push((i as u32, r.address));
            wanted.next();
        }
    }
    if recipients.len() != job.recipients.len() {
        recipients = job
            .recipients
            .iter()
            .filter_map(|&i| envelope.recipient(i as usize).map(|r| (i, r.address)))
            .collect();
    }
    OutboundEnvelope {
        sender: return_path.unwrap_or(envelope.sender),
        recipients,
        content_bytes,
        eightbit: envelope.body == BodyType::EightBitMime,
        smtputf8: envelope.smtputf8,
    }
}

/// The same result for every recipient of a job (the connection or the route failed).
pub fn every_recipient(job: &Job, result: impl Fn() -> RecipientResult) -> Vec<(u32, RecipientResult)> {
    job.recipients.iter().map(|&i| (i, result())).collect()
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

/// What one transaction came to.
struct Outcome {
    results: Vec<(u32, RecipientResult)>,
    /// The connection can carry another message.
    healthy: bool,
    /// The message as read (for its bounce).
    original: Option<Rc<Loaded>>,
}

/// Counts one attempt's recipients by result for the destination, the attempt's duration (if it
/// reached a server) and whether it was a retry.
fn count_attempt(destination: &str, job: &Job, results: &[(u32, RecipientResult)], took: Option<Duration>) {
    metrics::with(|m| {
        for (_, result) in results {
            let label = match result {
                RecipientResult::Delivered(_) => "delivered",
                RecipientResult::Deferred(_) => "deferred",
                RecipientResult::Failed(_) => "failed",
            };
            m.destinations.attempt(destination, label);
        }
        if let Some(took) = took {
            m.delivery_duration.observe(took.as_secs_f64());
        }
        if job.lane == Lane::Retry {
            m.retries += 1;
        }
    });
}

impl Deliverer {
    pub(super) async fn worker(self: Rc<Self>, key: SiteKey) {
        let destination = destination_label(&key);
        let mut connection: Option<OutboundConnection> = None;
        // The connection came from the pool and has not carried a message since: the server
        // may have closed it meanwhile.
        let mut unproven = false;
        // It stopped for the per-address cap: the site's other workers carry on.
        let mut capped = false;
        loop {
            // A job whose envelope already went out on this connection comes first.
            let ahead = connection
                .as_ref()
                .and_then(|c| c.ahead.as_ref().map(|(job, _)| job.clone()));
            let job = ahead.or_else(|| self.sched.borrow_mut().next_job(&key, Instant::now()));
            let Some(job) = job else { break };
            if connection.is_none() {
                connection = self.pool.borrow_mut().take(&key);
                unproven = connection.is_some();
            }
            if connection.is_none() {
                if let Some(mut idle) = self.idle_over_provider_cap(&key) {
                    idle.quit().await;
                }
                match self.connect(&key).await {
                    Ok(c) => {
                        self.connection_opened(&key);
                        connection = Some(c);
                    }
                    Err(NoConnection::Unreachable(failure)) => {
                        self.unreachable(&key, &destination, job, failure).await;
                        break;
                    }
                    Err(NoConnection::AtCap) => {
                        self.sched.borrow_mut().requeue_quietly(job);
                        capped = true;
                        break;
                    }
                }
            }
            let wait = self.sched.borrow_mut().rate_wait(&key, Instant::now());
            if !wait.is_zero() {
                glommio::timer::sleep(wait).await;
            }
            let conn = connection.as_mut().expect("a connection");
            let peer = conn.peer;
            let started = Instant::now();
            let outcome = self.deliver(conn, &job, &key).await;
            let took = started.elapsed();
            count_attempt(&destination, &job, &outcome.results, Some(took));
            let attempt = Attempt {
                relay: Some(peer),
                site: Some(destination.clone()),
                key: Some(key.clone()),
                lane: Some(job.lane),
                tls: conn.tls.clone(),
                took: Some(took),
            };
            if !outcome.healthy {
                // A job sent ahead on a connection that is going away goes back to the queue.
                if let Some((ahead, _)) = conn.ahead.take() {
                    self.sched.borrow_mut().requeue(ahead);
                }
            }
            let dead_pooled_connection = !outcome.healthy
                && unproven
                && !job.retried_on_fresh_connection
                && outcome
                    .results
                    .iter()
                    .all(|(_, r)| matches!(r, RecipientResult::Deferred(_)));
            if dead_pooled_connection {
                // Not the message's fault: try it once more, at once, on a fresh connection.
                let mut job = job;
                job.retried_on_fresh_connection = true;
                self.sched.borrow_mut().requeue(job);
                // Its idle siblings most likely died with it (a restarted server).
                self.pool.borrow_mut().close_site(&key);
                connection = None;
                continue;
            }
            unproven = false;
            self.finish_job(job.id, outcome.results, attempt, outcome.original)
                .await;
            let messages_max = self.sched.borrow().messages_per_connection_max(&key);
            // Another site waits for this address: give the place up between messages.
            let yield_place = self.ip_cap.wanted_by_other(peer.ip(), &key) && conn.ahead.is_none();
            if !outcome.healthy || conn.messages >= messages_max || yield_place {
                if outcome.healthy {
                    conn.quit().await;
                }
                connection = None;
                if yield_place {
                    capped = true;
                    break;
                }
            }
        }
        if let Some(c) = connection {
            // Not parked while another site waits for its address.
            if !self.ip_cap.wanted_by_other(c.peer.ip(), &key) {
                self.pool.borrow_mut().put(key.clone(), c, Instant::now());
            }
        }
        self.sched.borrow_mut().worker_ended(&key, !capped, Instant::now());
        self.start_workers();
    }

    /// Before a new connection to a provider's site: the provider's cap counts its sites'
    /// idle pooled connections too, so one of another site's is closed if the new one would
    /// pass it (the scheduler counted this worker already).
    /// Closed politely (QUIT) before the new one opens.
    fn idle_over_provider_cap(&self, key: &SiteKey) -> Option<OutboundConnection> {
        let sched = self.sched.borrow();
        let p = sched.site(key).and_then(|s| s.provider())?;
        let provider = &sched.providers()[p];
        let same_provider = |k: &SiteKey| k != key && sched.site(k).and_then(|s| s.provider()) == Some(p);
        let mut pool = self.pool.borrow_mut();
        if provider.workers + pool.count_where(same_provider) > provider.connections_max {
            return pool.take_oldest_where(same_provider);
        }
        None
    }

    /// A connection to the site was opened: if it was down, it is up again.
    fn connection_opened(&self, key: &SiteKey) {
        let change = self.sched.borrow_mut().connection_opened(key, Instant::now());
        if let HealthChange::Up { down_for } = change {
            info!(shard = self.shard, destination = %key, "destination up again after {} s down; its waiting mail goes now", down_for.as_secs());
            metrics::with(|m| m.destination_health.add("up", 1));
        }
    }

    /// The site cannot be reached. Up, this job and everything queued for it fail or defer at
    /// once, so that a dead host costs one connection attempt, not one per message; after
    /// `delivery.down_after_failures` such failures in a row it is down (crates/sched
    /// `health`): this job goes back to wait with the rest for the next probe.
    async fn unreachable(self: &Rc<Self>, key: &SiteKey, destination: &str, job: Job, failure: Unreachable) {
        let Unreachable { reply, permanent } = failure;
        let change = if permanent {
            HealthChange::None
        } else {
            self.sched.borrow_mut().connection_failed(key, Instant::now())
        };
        let down = self
            .sched
            .borrow()
            .site(key)
            .is_some_and(|s| s.health().down().is_some());
        match change {
            HealthChange::MarkedDown { failures, probe_in } => {
                warn!(shard = self.shard, destination = %key, "destination down after {failures} connection failures in a row: {}; its mail waits for a probe in {} s", reply.text(), probe_in.as_secs());
                metrics::with(|m| m.destination_health.add("down", 1));
            }
            HealthChange::ProbeFailed { failures, probe_in } => {
                info!(shard = self.shard, destination = %key, "probe failed ({failures} connection failures in a row): {}; next probe in {} s", reply.text(), probe_in.as_secs());
                metrics::with(|m| m.destination_health.add("probe_failed", 1));
            }
            _ => {}
        }
        let jobs = if down && !permanent {
            // Down: this job waits with the rest (for the next probe), except what has
            // outlived the queue lifetime, which is finished (deferred past it: expired).
            let mut sched = self.sched.borrow_mut();
            sched.requeue_quietly(job);
            sched.take_expired_waiting(key, crate::smtp::received::unix_now_s())
        } else {
            warn!(shard = self.shard, destination = %key, "cannot deliver: {}; {} what is queued for it", reply.text(), if permanent { "failing" } else { "deferring" });
            let mut jobs = vec![job];
            jobs.extend(self.sched.borrow_mut().drain_site(key));
            jobs
        };
        for job in jobs {
            let results = every_recipient(&job, || match permanent {
                true => RecipientResult::Failed(reply.clone()),
                false => RecipientResult::Deferred(reply.clone()),
            });
            count_attempt(destination, &job, &results, None);
            let attempt = Attempt {
                site: Some(destination.to_string()),
                key: Some(key.clone()),
                lane: Some(job.lane),
                ..Attempt::default()
            };
            self.finish_job(job.id, results, attempt, None).await;
        }
    }

    /// Runs one transaction for `job` on `conn`.
    async fn deliver(&self, conn: &mut OutboundConnection, job: &Job, key: &SiteKey) -> Outcome {
        let record_bytes = self.sched.borrow().queue().get(&job.id).map(|m| m.record_bytes);
        // If this job's envelope went out ahead, the server now waits for its content: a job
        // that cannot be sent leaves the connection unusable.
        let sent_ahead = conn.ahead.as_ref().is_some_and(|(j, _)| j.id == job.id);
        let Some(record_bytes) = record_bytes else {
            return Outcome {
                results: Vec::new(),
                healthy: !sent_ahead,
                original: None,
            };
        };
        let loaded = match self.store.load(job.id, record_bytes).await {
            Ok(m) => m,
            Err(why) => {
                warn!(shard = self.shard, id = %job.id, "{why}");
                if sent_ahead {
                    conn.ahead = None;
                }
                let why = why.to_string();
                let results = every_recipient(job, || RecipientResult::Deferred(ServerReply::new(451, &why)));
                return Outcome {
                    results,
                    healthy: !sent_ahead,
                    original: None,
                };
            }
        };
        // The connection's output buffer is reused from message to message: no fresh pages.
        let mut out = std::mem::take(&mut conn.out);
        out.clear();
        let (results, healthy) = self.transact(conn, job, key, &loaded, &mut out).await;
        conn.out = out;
        Outcome {
            results,
            healthy,
            original: Some(Rc::new(loaded)),
        }
    }

    async fn transact(
        &self,
        conn: &mut OutboundConnection,
        job: &Job,
        key: &SiteKey,
        loaded: &Loaded,
        out: &mut Vec<u8>,
    ) -> (Vec<(u32, RecipientResult)>, bool) {
        let addr = conn.peer;
        let (prepended, content) = (loaded.prepended(), loaded.content());
        let defer_all = |why: &str| every_recipient(job, || RecipientResult::Deferred(ServerReply::new(451, why)));
        let envelope = loaded.envelope();
        let verp = return_path(job, &envelope);
        let outbound = outbound_envelope(job, &envelope, loaded.relayed_bytes() as u64, verp.as_deref());
        let resumed = conn.ahead.take_if(|(ahead, _)| ahead.id == job.id).map(|(_, tx)| tx);
        if resumed.is_none() && conn.needs_reset {
            if let Err(why) = conn.command(b"RSET\r\n", self.config().delivery.reply_timeout.0).await {
                return (defer_all(&why.to_string()), false);
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
                return (every_recipient(job, || RecipientResult::Failed(reply.clone())), true);
            }
        };
        let reply_timeout = self.config().delivery.reply_timeout.0;
        let final_timeout = self.config().delivery.final_reply_timeout.0;
        let mut timeout = reply_timeout;
        if tx.wants_content_now() {
            // PIPELINING + CHUNKING: envelope, BDAT and the content in one write.
            out.extend_from_slice(prepended);
            out.extend_from_slice(content);
        }
        loop {
            if !out.is_empty() {
                if let Err(why) = conn.send(out).await {
                    tx.broken(&why.to_string());
                    return (tx.results().to_vec(), false);
                }
                out.clear();
            }
            let reply = match conn.read_reply(timeout).await {
                Ok(reply) => reply,
                Err(why) => {
                    if tx.broken(&why.to_string()) {
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
                    // Stored header fields never start a line with a dot (MessageBuffer).
                    out.extend_from_slice(prepended);
                    dot_stuff(content, out);
                    self.send_next_envelope_ahead(conn, key, out);
                    timeout = final_timeout;
                }
                TxStep::SendRaw => {
                    out.extend_from_slice(prepended);
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
    /// may be the first command of a group). Not done under a message rate, near the
    /// connection's message limit, or when the job cannot go to this server at all.
    fn send_next_envelope_ahead(&self, conn: &mut OutboundConnection, key: &SiteKey, out: &mut Vec<u8>) {
        if !conn.caps.pipelining || conn.caps.chunking || conn.ahead.is_some() {
            return;
        }
        let Some(job) = self.sched.borrow_mut().take_ahead(key, conn.messages) else {
            return;
        };
        // The envelope from the queue's copy (the message is read when its turn comes).
        let begun = {
            let sched = self.sched.borrow();
            sched.queue().get(&job.id).and_then(|message| {
                let envelope = message.envelope.view();
                let verp = return_path(&job, &envelope);
                let outbound = outbound_envelope(&job, &envelope, message.content_bytes, verp.as_deref());
                Transaction::begin(&outbound, &conn.caps, out).ok()
            })
        };
        match begun {
            Some(tx) => conn.ahead = Some((job, tx)),
            // It goes the ordinary way (and meets its refusal there).
            None => self.sched.borrow_mut().requeue(job),
        }
    }
}
