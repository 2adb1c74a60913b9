//! Where a message's recipients go: the scheduler plans them by route; a smarthost route
//! queues at once, an MX route needs the domain's MX hosts (RFC 5321 5.1), which make its
//! receiving site (domains with the same MX hosts share one). Then connecting to a site: the
//! smarthost, or its MX hosts' addresses in order (the next on a connection failure or a bad
//! greeting), each within the per-address connection cap; and the site's STARTTLS policy and
//! credentials.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use gannet_sched::{Lane, SiteKey};
use gannet_smtp::client::{RecipientResult, ServerReply};
use gannet_spool::MessageId;
use hickory_proto::rr::RecordType;
use tracing::info;

use super::outbound::{OutboundConnection, TlsPolicy};
use super::Deliverer;
use crate::dns::mx::{self, MxError};

/// A reply text such as `550 5.1.2 ...` as a reply.
pub fn reply_from_text(text: &str) -> ServerReply {
    let code = text.get(..3).and_then(|c| c.parse().ok()).unwrap_or(451);
    ServerReply::new(code, text.get(4..).unwrap_or(text))
}

/// Why a site could not be reached; `permanent`: its mail fails for good (null MX, no such
/// domain).
pub struct Unreachable {
    pub reply: ServerReply,
    pub permanent: bool,
}

/// Why a worker has no connection.
pub enum NoConnection {
    Unreachable(Unreachable),
    /// Every address of the site is at its connection cap, held by this site's other workers
    /// or, after a wait, by other sites: the worker gives its job back and stops (not a
    /// delivery failure).
    AtCap,
}

impl Deliverer {
    /// Plans a message and queues what can be queued: MX domains whose answer is cached are
    /// placed at once, the others after their lookup; recipients no route covers wait like any
    /// deferral (so that retries, expiry and the bounce after `delivery.queue_lifetime` follow
    /// the same path).
    pub(super) fn schedule(self: &Rc<Self>, id: MessageId) {
        if self.take_reports(id) || self.drop_suppressed(id) {
            return;
        }
        let plan = self.sched.borrow_mut().plan(id, Instant::now());
        let Some(plan) = plan else { return };
        self.close_evicted();
        for (domain, recipients) in plan.resolve {
            let random = self.sched.borrow_mut().random();
            match self.resolver.cached(&domain, RecordType::MX) {
                Some(answer) => self.place(
                    id,
                    plan.lane,
                    recipients,
                    &domain,
                    mx::exchanges(&domain, &answer, random),
                ),
                None => {
                    let me = self.clone();
                    glommio::spawn_local(async move {
                        let answer = me.resolver.lookup(&domain, RecordType::MX).await;
                        me.place(
                            id,
                            plan.lane,
                            recipients,
                            &domain,
                            mx::exchanges(&domain, &answer, random),
                        );
                        me.start_workers();
                    })
                    .detach();
                }
            }
        }
        if !plan.unrouted.is_empty() {
            let me = self.clone();
            glommio::spawn_local(async move {
                let reply = ServerReply::new(
                    451,
                    "4.4.0 no route for the recipient's domain (no [[route]] matches it)",
                );
                let results = plan
                    .unrouted
                    .iter()
                    .map(|&i| (i, RecipientResult::Deferred(reply.clone())))
                    .collect();
                me.finish_job(id, results, Default::default(), None).await;
            })
            .detach();
        }
        self.start_workers();
    }

    /// Queues a group for its domain's site, or finishes it with the lookup's failure.
    fn place(
        self: &Rc<Self>,
        id: MessageId,
        lane: Lane,
        recipients: Vec<u32>,
        domain: &str,
        hosts: Result<Vec<String>, MxError>,
    ) {
        match hosts {
            Ok(hosts) => {
                self.sched
                    .borrow_mut()
                    .place_mx(id, lane, recipients, domain, hosts, Instant::now());
                self.close_evicted();
            }
            Err(e) => {
                let (text, permanent) = match e {
                    MxError::Permanent(text) => (text, true),
                    MxError::Temporary(text) => (text, false),
                };
                let reply = reply_from_text(&text);
                let results = recipients
                    .iter()
                    .map(|&i| match permanent {
                        true => (i, RecipientResult::Failed(reply.clone())),
                        false => (i, RecipientResult::Deferred(reply.clone())),
                    })
                    .collect();
                let me = self.clone();
                glommio::spawn_local(async move { me.finish_job(id, results, Default::default(), None).await })
                    .detach();
            }
        }
    }

    /// Starts a worker for every site that wants one and has room. The workers are scheduled,
    /// not run on the spot (glommio's `spawn_local` runs a task right away, so a worker that
    /// starts workers as it ends would otherwise nest them on the stack).
    pub(super) fn start_workers(self: &Rc<Self>) {
        loop {
            let key = self.sched.borrow_mut().next_worker();
            let Some(key) = key else { break };
            let queue = glommio::executor().current_task_queue();
            match glommio::spawn_local_into(self.clone().worker(key.clone()), queue) {
                Ok(task) => {
                    task.detach();
                }
                Err(e) => {
                    // Cannot happen (the current queue exists); give the place back.
                    tracing::error!(shard = self.shard, "cannot start a delivery worker: {e}");
                    self.sched.borrow_mut().worker_ended(&key, false, Instant::now());
                    break;
                }
            }
        }
    }

    /// AUTH credentials for a smarthost, if its route has them.
    fn credentials(&self, addr: SocketAddr) -> Option<(String, String)> {
        self.config()
            .routes
            .iter()
            .find(|r| r.smarthost == Some(addr) && r.auth_user.is_some())
            .and_then(|r| Some((r.auth_user.clone()?, r.auth_password.clone()?)))
    }

    /// The STARTTLS policy for a site: required by its route (`tls_required`, or credentials,
    /// which never travel in plaintext), else `delivery.starttls`. For an MX site the route is
    /// that of the domain that made the site (every domain with the same MX hosts shares it).
    fn tls_policy(&self, key: &SiteKey, name: &str) -> TlsPolicy {
        let config = self.config();
        let required = match key {
            SiteKey::Smarthost(addr) => config
                .routes
                .iter()
                .any(|r| r.smarthost == Some(*addr) && (r.tls_required || r.auth_user.is_some())),
            SiteKey::Mx(_) => config
                .routes
                .iter()
                .any(|r| r.mx && r.tls_required && (r.domain == "*" || r.domain.eq_ignore_ascii_case(name))),
        };
        if required {
            TlsPolicy::Required
        } else if self.config().delivery.starttls {
            TlsPolicy::Opportunistic
        } else {
            TlsPolicy::Off
        }
    }

    /// Opens a connection to a site. Addresses at their connection cap are skipped; when all
    /// are: another site's idle connection to one of them is closed to make room; else, if
    /// this site has other workers (they hold the places), this one is not needed; else it
    /// waits for a place (at most `delivery.connect_timeout`) while the other sites' workers
    /// give theirs up after their current message.
    pub(super) async fn connect(&self, key: &SiteKey) -> Result<OutboundConnection, NoConnection> {
        let (name, hosts) = {
            let sched = self.sched.borrow();
            let site = sched.site(key).expect("a worker's site is never evicted");
            (site.name.clone(), site.hosts.clone())
        };
        let addresses = match key {
            SiteKey::Smarthost(addr) => vec![*addr],
            SiteKey::Mx(_) => {
                match mx::addresses(&self.resolver, &name, &hosts, self.config().delivery.mx_port).await {
                    Ok(a) => a,
                    Err(MxError::Permanent(text)) => return Err(NoConnection::Unreachable(unreachable(&text, true))),
                    Err(MxError::Temporary(text)) => return Err(NoConnection::Unreachable(unreachable(&text, false))),
                }
            }
        };
        let policy = self.tls_policy(key, &name);
        let deadline = Instant::now() + self.config().delivery.connect_timeout.0;
        let ips: Vec<_> = addresses.iter().map(SocketAddr::ip).collect();
        loop {
            let mut last = None;
            for &addr in &addresses {
                let Some(slot) = self.ip_cap.try_take(addr.ip()) else {
                    continue;
                };
                let auth = match key {
                    SiteKey::Smarthost(a) => self.credentials(*a),
                    SiteKey::Mx(_) => None,
                };
                let auth = auth.as_ref().map(|(user, password)| (user.as_str(), password.as_str()));
                match OutboundConnection::open(slot, addr, &self.config(), policy, auth).await {
                    Ok(mut c) => {
                        c.count_as_open(&destination_label(key));
                        return Ok(c);
                    }
                    Err(why) => {
                        info!(shard = self.shard, destination = %key, "{why}; trying the next address");
                        last = Some(why);
                    }
                }
            }
            if let Some(why) = last {
                return Err(NoConnection::Unreachable(Unreachable {
                    reply: ServerReply::new(421, &why.to_string()),
                    permanent: false,
                }));
            }
            // Every address is at its cap.
            if self.pool.borrow_mut().close_idle_to(&ips) {
                continue;
            }
            if self.sched.borrow().site(key).is_some_and(|s| s.workers() > 1) {
                return Err(NoConnection::AtCap);
            }
            let _waiting = self.ip_cap.waiting(&ips, key);
            let left = deadline.saturating_duration_since(Instant::now());
            let freed = glommio::timer::timeout(left, async {
                self.ip_cap.released().await;
                Ok(())
            })
            .await;
            if freed.is_err() {
                return Err(NoConnection::AtCap);
            }
        }
    }
}

/// A site's `destination` label in the metrics: the smarthost's address, or its MX hosts.
pub(super) fn destination_label(key: &SiteKey) -> String {
    match key {
        SiteKey::Smarthost(addr) => addr.to_string(),
        SiteKey::Mx(hosts) => hosts.join(","),
    }
}

fn unreachable(text: &str, permanent: bool) -> Unreachable {
    Unreachable {
        reply: reply_from_text(text),
        permanent,
    }
}
