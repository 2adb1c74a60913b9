//! The shard's side of inbound mail authentication (`crate::authentication`): which messages
//! are verified (mail on listeners with `mail_authentication` on, from clients that neither
//! authenticated nor sit in a trusted network), the Authentication-Results header put on top
//! of the spooled message, forged ones renamed, and what enforcement refuses.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use mail_auth::SpfResult;
use tracing::{info, warn};

use super::shard::Shard;
use crate::authentication::{results, DmarcPolicy, DmarcVerdict, Input, Verdicts, Verifier};
use crate::config::mail_authentication::{MailAuthentication, Quarantine};
use crate::metrics;
use crate::smtp::session::{CommitError, Session};
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
    /// Verifies the message in `sink` if its listener asks for it, stores the verdicts with it,
    /// and under enforcement refuses what the sender's policy says to refuse. `Err(NoSpace)`
    /// when the memory budget cannot hold the copy the verification reads.
    pub(super) async fn verify_inbound(
        &self,
        session: &Session,
        sink: &mut MessageBuffer,
        listener: usize,
    ) -> Result<(), CommitError> {
        let config = self.config();
        let policy = config
            .listeners
            .get(listener)
            .map_or(MailAuthentication::Off, |l| l.mail_authentication());
        if policy == MailAuthentication::Off || session.user().is_some() || self.is_trusted(session.client_ip()) {
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
        let hostname = config.server.hostname.clone();
        let forged = results::forged(&content, &hostname);
        let env = session.envelope();
        let input = Input {
            client: session.client_ip(),
            helo: String::from_utf8_lossy(session.origin().helo).into_owned(),
            mail_from: String::from_utf8_lossy(env.sender()).into_owned(),
            hostname,
            sealer: self.reloadable.sealer(),
        };
        let timeout = config.mail_authentication.timeout.0;
        let verdicts = verifier
            .verify(self.deliverer.resolver(), Arc::new(content), Arc::new(input), timeout)
            .await;
        self.account_verdicts(&verdicts, started, forged.len());
        for offset in forged {
            sink.overwrite_content(offset, results::RENAMED);
        }
        let mut header = verdicts.arc_set.clone();
        header.push_str(&verdicts.header);
        if policy == MailAuthentication::Enforce {
            decide(&verdicts, &config.mail_authentication)?;
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

    fn account_verdicts(&self, verdicts: &Verdicts, started: Instant, forged: usize) {
        let spf = spf_name(verdicts.spf);
        metrics::with(|m| {
            m.mail_authentication.add(("spf", spf), 1);
            for dkim in &verdicts.dkim {
                m.mail_authentication.add(("dkim", dkim), 1);
            }
            m.mail_authentication.add(("dmarc", verdicts.dmarc.name()), 1);
            m.mail_authentication_seconds.observe(started.elapsed().as_secs_f64());
        });
        info!(
            shard = self.index,
            spf,
            dkim = %verdicts.dkim.join(","),
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

/// What enforcement refuses: a DMARC failure under p=reject (550 5.7.1), a DMARC verdict a DNS
/// failure kept from being reached (451 4.7.5, try later), and with `reject_spf_fail` an SPF
/// fail (550 5.7.23) or an SPF temperror (451 4.7.24).
fn decide(
    verdicts: &Verdicts,
    settings: &crate::config::mail_authentication::MailAuthenticationSettings,
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
    if settings.reject_spf_fail {
        match verdicts.spf {
            SpfResult::Fail => {
                return refuse(
                    550,
                    "5.7.23",
                    "Message refused: the SPF record of the sender's domain does not allow this address".into(),
                )
            }
            SpfResult::TempError => {
                return refuse(
                    451,
                    "4.7.24",
                    "Cannot check the sender's SPF record now (a DNS lookup failed); try again later".into(),
                )
            }
            _ => {}
        }
    }
    Ok(())
}
