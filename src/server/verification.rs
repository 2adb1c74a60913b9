//! The shard's side of inbound mail authentication (`crate::authentication`): which messages
//! are verified (mail on listeners with `mail_authentication` on, from clients that neither
//! authenticated nor sit in a trusted network), the Authentication-Results header put on top
//! of the spooled message, forged ones renamed, and what enforcement refuses.
//!
//! SPF is checked when MAIL FROM arrives (RFC 7208 2.4 and 2.3: the MAIL FROM and HELO
//! identities), so that `reject_spf_fail` refuses the sender before any content is sent; its
//! results are kept with the connection and reused for DMARC and the header once the message
//! has arrived. DKIM, ARC and DMARC need the message, and run after its final dot, before the
//! `250`.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use mail_auth::SpfResult;
use tracing::{info, warn};

use super::shard::Shard;
use crate::authentication::{results, DmarcPolicy, DmarcVerdict, Input, SenderSpf, Verdicts, Verifier};
use crate::config::mail_authentication::{MailAuthentication, Quarantine};
use crate::metrics;
use crate::smtp::session::{CommitError, SenderVerdict, Session};
use crate::spool::buffer::MessageBuffer;

/// One verifier for the process (mail-auth's authenticator holds no state of ours).
fn verifier() -> Option<&'static Arc<Verifier>> {
    static VERIFIER: OnceLock<Option<Arc<Verifier>>> = OnceLock::new();
    VERIFIER
        .get_or_init(|| match Verifier::new() {
            Ok(v) => Some(Arc::new(v)),
            Err(e) => {
                warn!("mail authentication is off: {e}");
                None
            }
        })
        .as_ref()
}

impl Shard {
    /// The listener's `mail_authentication` for mail from `client` (before authentication):
    /// off for a trusted network.
    pub(super) fn verification_policy(&self, listener: usize, client: IpAddr) -> MailAuthentication {
        let policy = self
            .config()
            .listeners
            .get(listener)
            .map_or(MailAuthentication::Off, |l| l.mail_authentication());
        if policy == MailAuthentication::Off || self.is_trusted(client) {
            return MailAuthentication::Off;
        }
        policy
    }

    /// The verification's view of the session.
    fn verification_input(&self, session: &Session, spf: Option<SenderSpf>) -> Input {
        let config = self.config();
        let env = session.envelope();
        Input {
            client: session.client_ip(),
            helo: String::from_utf8_lossy(session.origin().helo).into_owned(),
            mail_from: String::from_utf8_lossy(env.sender()).into_owned(),
            hostname: config.server.hostname.clone(),
            sealer: self.reloadable.sealer(),
            spf,
            dkim_signatures_max: config.mail_authentication.dkim_signatures_max,
        }
    }

    /// SPF for the HELO and MAIL FROM identities of the transaction the session is opening,
    /// and under enforcement with `reject_spf_fail` the refusal of a failing (550 5.7.23) or
    /// unverifiable (451 4.7.24) sender. The results come back for the message's verification.
    pub(super) async fn check_sender(&self, session: &Session, listener: usize) -> (SenderVerdict, Option<SenderSpf>) {
        let policy = self.verification_policy(listener, session.client_ip());
        let verifier = verifier().filter(|_| policy != MailAuthentication::Off && session.user().is_none());
        let Some(verifier) = verifier else {
            return (SenderVerdict::Accept, None);
        };
        let config = self.config();
        let input = self.verification_input(session, None);
        let timeout = config.mail_authentication.timeout.0;
        let spf = verifier.sender(self.deliverer.resolver(), &input, timeout).await;
        let result = spf.mail_from.result();
        metrics::with(|m| m.mail_authentication.add(("spf", spf_name(result)), 1));
        let enforce = policy == MailAuthentication::Enforce && config.mail_authentication.reject_spf_fail;
        match spf_refusal(result).filter(|_| enforce) {
            Some(verdict) => {
                info!(
                    shard = self.index,
                    client = %input.client,
                    mail_from = %input.mail_from,
                    spf = spf_name(result),
                    "sender refused by SPF"
                );
                (verdict, None)
            }
            None => (SenderVerdict::Accept, Some(spf)),
        }
    }

    /// Verifies the message in `sink` if its listener asks for it, stores the verdicts with it,
    /// and under enforcement refuses what the sender's policy says to refuse. `Err(NoSpace)`
    /// when the memory budget cannot hold the copy the verification reads.
    pub(super) async fn verify_inbound(
        &self,
        session: &Session,
        sink: &mut MessageBuffer,
        listener: usize,
        sender_spf: Option<SenderSpf>,
    ) -> Result<(), CommitError> {
        let config = self.config();
        let policy = self.verification_policy(listener, session.client_ip());
        if policy == MailAuthentication::Off || session.user().is_some() {
            return Ok(());
        }
        let Some(verifier) = verifier() else {
            return Ok(());
        };
        let started = Instant::now();
        let _charge = sink
            .budget()
            .clone()
            .try_charge(sink.content_bytes_so_far())
            .map_err(|_| CommitError::NoSpace)?;
        let content = sink.content_copy();
        let forged = results::forged(&content, &config.server.hostname);
        let spf_decided = sender_spf.is_some();
        let input = self.verification_input(session, sender_spf);
        let timeout = config.mail_authentication.timeout.0;
        let verdicts = verifier
            .verify(self.deliverer.resolver(), Arc::new(content), Arc::new(input), timeout)
            .await;
        self.account_verdicts(&verdicts, started, forged.len(), !spf_decided);
        for offset in forged {
            sink.overwrite_content(offset, results::RENAMED);
        }
        let mut header = verdicts.arc_set.clone();
        header.push_str(&verdicts.header);
        if policy == MailAuthentication::Enforce {
            decide(&verdicts, &config.mail_authentication, spf_decided)?;
            if config.mail_authentication.quarantine == Quarantine::Header
                && verdicts.dmarc
                    == (DmarcVerdict::Fail {
                        policy: DmarcPolicy::Quarantine,
                    })
            {
                header.push_str(&format!(
                    "X-Gannet-Quarantine: DMARC failed and the policy of {} is quarantine\r\n",
                    verdicts.from_domain
                ));
            }
        }
        sink.append_prepended(header.as_bytes())
            .map_err(|_| CommitError::NoSpace)
    }

    /// Counts and logs the verdicts; SPF's only when it was not counted at MAIL FROM.
    fn account_verdicts(&self, verdicts: &Verdicts, started: Instant, forged: usize, count_spf: bool) {
        let spf = spf_name(verdicts.spf);
        metrics::with(|m| {
            if count_spf {
                m.mail_authentication.add(("spf", spf), 1);
            }
            for dkim in &verdicts.dkim {
                m.mail_authentication.add(("dkim", dkim), 1);
            }
            if verdicts.dkim_skipped > 0 {
                m.mail_authentication.add(("dkim", "policy"), 1);
            }
            m.mail_authentication.add(("dmarc", verdicts.dmarc.name()), 1);
            m.mail_authentication_seconds.observe(started.elapsed().as_secs_f64());
        });
        info!(
            shard = self.index,
            spf,
            dkim = %verdicts.dkim.join(","),
            dkim_not_verified = verdicts.dkim_skipped,
            dmarc = verdicts.dmarc.name(),
            from_domain = %verdicts.from_domain,
            forged_renamed = forged,
            took_ms = started.elapsed().as_millis() as u64,
            "mail authentication"
        );
    }
}

/// RFC 8601's name for an SPF result.
pub fn spf_name(result: SpfResult) -> &'static str {
    match result {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

/// With `reject_spf_fail`, what SPF refuses: a fail (550 5.7.23, RFC 7372's code for it) or a
/// temperror (451 4.7.24: try later).
fn spf_refusal(result: SpfResult) -> Option<SenderVerdict> {
    let (code, enhanced, text) = match result {
        SpfResult::Fail => (
            550,
            "5.7.23",
            "Sender refused: the SPF record of the sender's domain does not allow this address",
        ),
        SpfResult::TempError => (
            451,
            "4.7.24",
            "Cannot check the sender's SPF record now (a DNS lookup failed); try again later",
        ),
        _ => return None,
    };
    Some(SenderVerdict::Refuse {
        code,
        enhanced,
        text: text.into(),
    })
}

/// What enforcement refuses: a DMARC failure under p=reject (550 5.7.1), a DMARC verdict a DNS
/// failure kept from being reached (451 4.7.5, try later), and with `reject_spf_fail` what
/// [`spf_refusal`] refuses when SPF was not already decided at MAIL FROM (a listener whose
/// policy a reload turned on during the session).
fn decide(
    verdicts: &Verdicts,
    settings: &crate::config::mail_authentication::MailAuthenticationSettings,
    spf_decided: bool,
) -> Result<(), CommitError> {
    let refuse = |code, enhanced, text: String| Err(CommitError::Refused { code, enhanced, text });
    match verdicts.dmarc {
        DmarcVerdict::Fail { policy: DmarcPolicy::Reject } => {
            return refuse(
                550,
                "5.7.1",
                format!(
                    "Message refused: it fails the DMARC policy of {} (p=reject): neither SPF nor DKIM passed for that domain",
                    verdicts.from_domain
                ),
            )
        }
        DmarcVerdict::TempError => {
            return refuse(
                451,
                "4.7.5",
                format!(
                    "Cannot check the DMARC policy of {} now (a DNS lookup failed); try again later",
                    verdicts.from_domain
                ),
            )
        }
        _ => {}
    }
    if settings.reject_spf_fail && !spf_decided {
        if let Some(SenderVerdict::Refuse { code, enhanced, text }) = spf_refusal(verdicts.spf) {
            return refuse(code, enhanced, text);
        }
    }
    Ok(())
}
