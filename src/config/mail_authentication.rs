//! `[mail_authentication]`: how SPF, DKIM, DMARC and ARC verdicts on incoming mail are acted
//! on, for listeners with `mail_authentication = "enforce"` (`crate::authentication`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use crate::units::Span;

/// What a listener does with the verdicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailAuthentication {
    /// No verification.
    Off,
    /// Verify and record the verdicts in an Authentication-Results header; refuse nothing.
    Record,
    /// Record, and act on them: DMARC p=reject failures get 550 5.7.1, DNS failures 451.
    Enforce,
}

/// What enforcement does with a DMARC failure under `p=quarantine`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quarantine {
    /// Accept it as is (the Authentication-Results header says dmarc=fail).
    Accept,
    /// Accept it with an `X-Gannet-Quarantine` header for the mailbox server's filters.
    Header,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailAuthenticationSettings {
    /// All the DNS one message's verification may wait for; past it, a temperror.
    #[serde(default = "default_timeout")]
    pub timeout: Span,
    /// Under enforcement, refuse MAIL FROM whose domain's SPF says fail (550 5.7.23), and
    /// defer it when the SPF record cannot be looked up (451 4.7.24).
    #[serde(default)]
    pub reject_spf_fail: bool,
    /// DKIM signatures verified per message at most; the rest are reported as not verified
    /// (`dkim=policy`). RFC 6376 6.1 lets a verifier limit them; each costs a key lookup and a
    /// public-key operation.
    #[serde(default = "default_dkim_signatures_max")]
    pub dkim_signatures_max: usize,
    /// Under enforcement, DMARC failures under p=quarantine.
    #[serde(default = "default_quarantine")]
    pub quarantine: Quarantine,
    /// Seal verified mail with an ARC set (RFC 8617) as it is relayed: for forwarders, whose
    /// changes would otherwise break the sender's DKIM and SPF for the next receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arc_seal: Option<ArcSeal>,
}

/// The key an ARC set is signed with (`d=`, `s=`, published like a DKIM key).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArcSeal {
    pub domain: String,
    pub selector: String,
    /// PEM private key: RSA of 2048 bits or more, or Ed25519.
    pub key: std::path::PathBuf,
}

fn default_timeout() -> Span {
    Span(Duration::from_secs(20))
}

fn default_dkim_signatures_max() -> usize {
    10
}

fn default_quarantine() -> Quarantine {
    Quarantine::Header
}

impl Default for MailAuthenticationSettings {
    fn default() -> MailAuthenticationSettings {
        MailAuthenticationSettings {
            timeout: default_timeout(),
            reject_spf_fail: false,
            dkim_signatures_max: default_dkim_signatures_max(),
            quarantine: default_quarantine(),
            arc_seal: None,
        }
    }
}

/// Checks `[mail_authentication]`.
pub(super) fn validate(settings: &MailAuthenticationSettings, fail: &Fail<'_>) -> Result<(), ConfigError> {
    let timeout = settings.timeout.0;
    if timeout < Duration::from_secs(1) || timeout > Duration::from_secs(120) {
        return Err(fail(
            "mail_authentication",
            0,
            "timeout",
            "must be between \"1s\" and \"120s\" (the client waits for it after its final dot)".into(),
        ));
    }
    let most = crate::authentication::DKIM_SIGNATURES_MAX;
    if !(1..=most).contains(&settings.dkim_signatures_max) {
        return Err(fail(
            "mail_authentication",
            0,
            "dkim_signatures_max",
            format!("must be between 1 and {most} (signatures verified per message)"),
        ));
    }
    if let Some(seal) = &settings.arc_seal {
        if !super::server::valid_hostname(&seal.domain) {
            return Err(fail(
                "mail_authentication.arc_seal",
                0,
                "domain",
                format!(
                    "`{}` is not a domain name; write the sealing domain, such as \"forwarder.example\"",
                    seal.domain
                ),
            ));
        }
        if seal.selector.is_empty()
            || !seal
                .selector
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(fail(
                "mail_authentication.arc_seal",
                0,
                "selector",
                "must be a DNS label such as \"arc1\"".into(),
            ));
        }
    }
    Ok(())
}
