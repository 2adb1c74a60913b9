//! Mail to the bounce domain (`[verp] domain`) is read, never relayed: asynchronous bounces
//! (RFC 3464 DSNs and the common non-standard formats) and complaints (RFC 5965 ARF), parsed
//! by `gannet_bounce::report`. It is spooled like any mail first (acknowledged only once
//! durable), so a crash before it is read loses nothing; reading it again is harmless.
//!
//! A report is believed only for a recipient whose VERP token verifies: the token (from the
//! address the report came to, or found in the report, e.g. the original's Return-Path) was
//! signed for that one address. Then a failed recipient is classified like a synchronous
//! failure and, if its class's action is `suppress`, suppressed (source `hard-bounce`); a
//! complainant is suppressed (source `complaint`). Each becomes an event naming the original
//! message. Reports whose tokens verify for no address they name are forged: counted, logged
//! and dropped. Reports that cannot be read, or that carry no token, are held in the queue for
//! the operator (`gannet queue list --state held`, `gannet queue show ID`).

use std::rc::Rc;

use gannet_bounce::report::{parse_report, Report, ReportKind, Reported};
use gannet_bounce::verp::Token;
use gannet_bounce::{Action, Failure};
use gannet_sched::scheduler::domain_of;
use gannet_smtp::deadline::Now;
use gannet_spool::MessageId;
use gannet_suppress::journal::Change;
use gannet_suppress::{Entry, Scope, Source};
use tracing::{info, warn};

use super::Deliverer;
use crate::metrics;
use crate::verp::Shell;

/// Reports a shard keeps held for the operator; more are dropped (counted).
pub const HELD_REPORTS_MAX: usize = 1000;

/// What became of one report.
enum Outcome {
    /// Believed, for these recipients: the changes to make and the events to tell.
    Attributed(Vec<Finding>),
    /// Tokens were there, but none verifies for an address the report names.
    Forged,
    /// A report, but nothing to check it against.
    Unattributed,
    Unparseable,
}

/// One believed recipient of a report.
struct Finding {
    token: Token,
    address: String,
    kind: &'static str,
    /// The change to the suppression list, if any.
    change: Option<Change>,
    reply: String,
    class: Option<&'static str>,
}

impl Deliverer {
    /// Takes over a message with pending recipients at the bounce domain; true if it did (its
    /// other recipients, if any, are planned once the reports are read).
    pub(super) fn take_reports(self: &Rc<Self>, id: MessageId) -> bool {
        let Some(shell) = crate::verp::get() else {
            return false;
        };
        if self.reading_reports.borrow().contains(&id) {
            return true;
        }
        let (indexes, record_bytes) = {
            let sched = self.sched.borrow();
            let Some(message) = sched.queue().get(&id) else {
                return false;
            };
            if message.jobs_outstanding > 0 || message.held {
                return false;
            }
            let indexes: Vec<u32> = message
                .envelope
                .view()
                .recipients()
                .enumerate()
                .filter(|(i, r)| {
                    !message.done.contains(*i)
                        && domain_of(r.address).eq_ignore_ascii_case(shell.verp.domain().as_bytes())
                })
                .map(|(i, _)| i as u32)
                .collect();
            (indexes, message.record_bytes)
        };
        if indexes.is_empty() {
            return false;
        }
        self.reading_reports.borrow_mut().insert(id);
        let me = self.clone();
        glommio::spawn_local(async move {
            let held = me.read_report(shell, id, &indexes, record_bytes).await;
            me.reading_reports.borrow_mut().remove(&id);
            if !held {
                me.schedule(id);
            }
        })
        .detach();
        true
    }

    /// Reads, believes or not, and acts; true if the message was held.
    async fn read_report(self: &Rc<Self>, shell: &Shell, id: MessageId, indexes: &[u32], record_bytes: u32) -> bool {
        let loaded = match self.store.load(id, record_bytes).await {
            Ok(l) => l,
            Err(e) => {
                warn!(shard = self.shard, %id, "cannot read a report from the spool ({e:?}); held");
                return self.hold_report(shell, id, indexes, "unknown", "unparseable").await;
            }
        };
        let envelope = loaded.envelope();
        let mut tokens: Vec<Token> = indexes
            .iter()
            .filter_map(|&i| envelope.recipient(i as usize))
            .filter_map(|r| {
                let address = String::from_utf8_lossy(r.address);
                let local = address.rsplit_once('@').map_or("", |(l, _)| l).to_string();
                shell.verp.parse_local(&local)
            })
            .collect();
        let content = loaded.content();
        for t in shell.verp.find_tokens(content) {
            if !tokens.contains(&t) {
                tokens.push(t);
            }
        }
        let report = parse_report(content);
        let kind = report.kind.as_str();
        match self.attribute(shell, &report, &tokens) {
            Outcome::Attributed(findings) => {
                if !self.act_on_findings(id, findings).await {
                    // The suppression could not be recorded: the report is kept, not lost.
                    return self.hold_report(shell, id, indexes, kind, "unrecorded").await;
                }
                self.sched.borrow_mut().finish_undelivered(id, indexes);
                self.store.forget(&id);
                self.flush_state_soon();
                false
            }
            Outcome::Forged => {
                warn!(shard = self.shard, %id, kind, "a report at the bounce domain carries no token valid for the addresses it names; ignored as forged");
                metrics::with(|m| m.bounce_reports.add((kind, "forged"), 1));
                self.sched.borrow_mut().finish_undelivered(id, indexes);
                self.store.forget(&id);
                self.flush_state_soon();
                false
            }
            Outcome::Unattributed => self.hold_report(shell, id, indexes, kind, "unattributed").await,
            Outcome::Unparseable => self.hold_report(shell, id, indexes, kind, "unparseable").await,
        }
    }

    /// Keeps a report the operator must look at (held: never delivered, never expired), up to
    /// [`HELD_REPORTS_MAX`] per shard; past that, or when the message also has recipients
    /// elsewhere (whose delivery a hold would stop), the report's part is dropped and counted
    /// (`result="dropped"`). True if held.
    async fn hold_report(
        self: &Rc<Self>,
        shell: &Shell,
        id: MessageId,
        indexes: &[u32],
        kind: &'static str,
        result: &'static str,
    ) -> bool {
        metrics::with(|m| m.bounce_reports.add((kind, result), 1));
        let (elsewhere, held_reports) = {
            let sched = self.sched.borrow();
            let at_bounce_domain =
                |address: &[u8]| domain_of(address).eq_ignore_ascii_case(shell.verp.domain().as_bytes());
            let elsewhere = sched.queue().get(&id).is_some_and(|m| {
                m.envelope
                    .view()
                    .recipients()
                    .enumerate()
                    .any(|(i, r)| !m.done.contains(i) && !at_bounce_domain(r.address))
            });
            let held_reports = sched
                .queue()
                .iter()
                .filter(|m| m.held && m.envelope.view().recipients().all(|r| at_bounce_domain(r.address)))
                .count();
            (elsewhere, held_reports)
        };
        if elsewhere || held_reports >= HELD_REPORTS_MAX {
            warn!(shard = self.shard, %id, kind, result, held_reports, "a report at the bounce domain cannot be used and is not kept ({}); dropped", if elsewhere { "the message has other recipients" } else { "the shard holds the most reports it keeps" });
            metrics::with(|m| m.bounce_reports.add((kind, "dropped"), 1));
            self.sched.borrow_mut().finish_undelivered(id, indexes);
            self.flush_state_soon();
            return false;
        }
        warn!(shard = self.shard, %id, kind, result, "a report at the bounce domain cannot be used; held for the operator (gannet queue show {id})");
        let entries = self.sched.borrow_mut().hold(&[id], Now::read());
        if let Err(e) = self.appender.append_deferrals_durably(&entries).await {
            warn!(shard = self.shard, %id, "the hold of a report could not be written ({e:?}); it is read again after a restart");
        }
        true
    }

    /// Which recipients the report's tokens vouch for.
    fn attribute(&self, shell: &Shell, report: &Report, tokens: &[Token]) -> Outcome {
        let verified = |candidates: &[&str]| -> Option<(Token, String)> {
            candidates.iter().find_map(|c| {
                let address = gannet_suppress::normalize_address(c).ok()?;
                tokens
                    .iter()
                    .find(|t| shell.verp.verify(t, &address))
                    .map(|t| (t.clone(), address))
            })
        };
        let findings: Vec<Finding> = match report.kind {
            ReportKind::Unrecognised => return Outcome::Unparseable,
            ReportKind::Bounce => report
                .recipients
                .iter()
                .filter_map(|r| {
                    let candidates: Vec<&str> = std::iter::once(r.address.as_str())
                        .chain(r.original.as_deref())
                        .collect();
                    let (token, address) = verified(&candidates)?;
                    Some(self.bounce_finding(token, address, r))
                })
                .collect(),
            ReportKind::Complaint => {
                let candidates: Vec<&str> = report.complainants.iter().map(String::as_str).collect();
                verified(&candidates)
                    .map(|(token, address)| complaint_finding(shell, token, address, report))
                    .into_iter()
                    .collect()
            }
        };
        match (findings.is_empty(), tokens.is_empty()) {
            (false, _) => Outcome::Attributed(findings),
            (true, true) => Outcome::Unattributed,
            (true, false) => Outcome::Forged,
        }
    }

    /// A believed bounce: classified like a synchronous failure; a failure whose class says
    /// `suppress` on a permanent status suppresses.
    fn bounce_finding(&self, token: Token, address: String, r: &Reported) -> Finding {
        let reply = r
            .diagnostic
            .clone()
            .or_else(|| r.status.clone())
            .unwrap_or_else(|| r.action.clone());
        let code = reply_code(&reply, r.status.as_deref());
        let classifier = self.config().bounces.classifier();
        let found = classifier.rules.classify_fully(&Failure {
            code,
            text: &reply,
            mx_hosts: &[],
        });
        let action = found.action.unwrap_or_else(|| classifier.action(found.class));
        let change = (r.action == "failed" && code >= 500 && action == Action::Suppress)
            .then(|| {
                let reason = format!("bounce report: {reply} ({})", found.class.as_str());
                crate::suppression::get()?.hard_bounce(address.as_bytes(), b"", &reason, Now::read().unix_s)
            })
            .flatten();
        Finding {
            token,
            address,
            kind: "dsn",
            change,
            reply,
            class: Some(found.class.as_str()),
        }
    }

    /// Makes the findings' changes and tells them; false if the changes could not be made.
    async fn act_on_findings(&self, id: MessageId, findings: Vec<Finding>) -> bool {
        let changes: Vec<Change> = findings.iter().filter_map(|f| f.change.clone()).collect();
        let applied = if changes.is_empty() {
            Ok(Default::default())
        } else {
            crate::suppression::apply(changes).await
        };
        if let Err(e) = &applied {
            warn!(shard = self.shard, %id, "cannot add a report's recipients to the suppression list: {e}");
            return false;
        }
        for f in findings {
            let result = if f.change.is_some() && applied.is_ok() {
                "suppressed"
            } else {
                "recorded"
            };
            metrics::with(|m| m.bounce_reports.add((f.kind, result), 1));
            let original = f.token.message_id.to_ascii_uppercase();
            let class = f.class.unwrap_or("none");
            info!(shard = self.shard, %id, original, to = f.address, kind = f.kind, class, result, "report read: {}", f.reply);
            if crate::events::enabled() {
                crate::events::emit(crate::events::EventBody {
                    kind: if f.kind == "arf" { "complaint" } else { "bounce_report" },
                    message_id: original,
                    sender: String::new(),
                    recipient: Some(f.address),
                    recipients: None,
                    size_bytes: None,
                    client: None,
                    relay: None,
                    reply: Some(f.reply),
                    class: f.class,
                });
            }
        }
        true
    }
}

/// A believed complaint: the complainant is suppressed (source `complaint`).
fn complaint_finding(shell: &Shell, token: Token, address: String, report: &Report) -> Finding {
    let feedback = report.feedback_type.clone().unwrap_or_else(|| "abuse".into());
    let scope = match (&report.original_from_domain, shell.complaint_scope_sender_domain) {
        (Some(domain), true) => Scope::parse(domain).unwrap_or(Scope::Global),
        _ => Scope::Global,
    };
    let reply = format!("complaint: feedback-type {feedback}");
    let change = crate::suppression::get().map(|_| Change::Add {
        scope,
        address: address.clone(),
        entry: Entry::new(&reply, Source::Complaint, Now::read().unix_s, 0),
    });
    Finding {
        token,
        address,
        kind: "arf",
        change,
        reply,
        class: None,
    }
}

/// The basic code of a report's reply: its first three digits, else from the status's class.
fn reply_code(reply: &str, status: Option<&str>) -> u16 {
    let digits = reply.get(..3).filter(|d| d.bytes().all(|b| b.is_ascii_digit()));
    if let Some(code) = digits
        .and_then(|d| d.parse::<u16>().ok())
        .filter(|c| (200..600).contains(c))
    {
        return code;
    }
    match status.and_then(|s| s.trim().chars().next()) {
        Some('5') => 550,
        Some('4') => 450,
        Some('2') => 250,
        _ => 550,
    }
}

#[cfg(test)]
mod tests {
    use super::reply_code;

    #[test]
    fn the_reply_code_comes_from_the_reply_or_the_status() {
        assert_eq!(reply_code("550 5.1.1 no such user", Some("5.1.1")), 550);
        assert_eq!(reply_code("5.1.1", Some("5.1.1")), 550);
        assert_eq!(reply_code("delayed", Some("4.2.2")), 450);
        assert_eq!(reply_code("999 nonsense", Some("4.0.0")), 450);
    }
}
