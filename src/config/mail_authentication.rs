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
    /// Under enforcement, refuse mail whose MAIL FROM domain's SPF says fail (550 5.7.23).
    #[serde(default)]
    pub reject_spf_fail: bool,
    /// Under enforcement, DMARC failures under p=quarantine.
    #[serde(default = "default_quarantine")]
    pub quarantine: Quarantine,
}

fn default_timeout() -> Span {
    Span(Duration::from_secs(20))
}

fn default_quarantine() -> Quarantine {
    Quarantine::Header
}

impl Default for MailAuthenticationSettings {
    fn default() -> MailAuthenticationSettings {
        MailAuthenticationSettings {
            timeout: default_timeout(),
            reject_spf_fail: false,
            quarantine: default_quarantine(),
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
    Ok(())
}
