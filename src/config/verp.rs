//! `[verp]`: signed VERP return paths and the bounce domain where asynchronous bounces and
//! complaints come back (`gannet_bounce::verp`, `gannet_bounce::report`; the shell is
//! `crate::verp` and `crate::delivery::intake`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Verp {
    /// Off by default: delivery keeps the original envelope sender.
    #[serde(default)]
    pub enabled: bool,
    /// The bounce domain: return paths are `<prefix>+<token>@<domain>`, its MX must point
    /// here, and mail to it is read as reports, never relayed.
    #[serde(default)]
    pub domain: String,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The HMAC key's file (at least 16 bytes). Absent: `<spool>/verp.key`, made at the first
    /// start (32 random bytes, mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// Where feedback loops send complaint reports (ARF), at the bounce domain. Default
    /// `fbl@<domain>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complaints_address: Option<String>,
    /// Scope of the entries complaints add: "global", or "sender-domain" (the domain of the
    /// complained-of message's From:).
    #[serde(default = "default_complaint_scope")]
    pub complaint_scope: String,
}

fn default_prefix() -> String {
    "bounces".into()
}
fn default_complaint_scope() -> String {
    "global".into()
}

impl Default for Verp {
    fn default() -> Verp {
        Verp {
            enabled: false,
            domain: String::new(),
            prefix: default_prefix(),
            secret_file: None,
            complaints_address: None,
            complaint_scope: default_complaint_scope(),
        }
    }
}

impl Verp {
    /// The complaints address, lowercase.
    pub fn complaints(&self) -> String {
        self.complaints_address
            .clone()
            .unwrap_or_else(|| format!("fbl@{}", self.domain))
            .to_ascii_lowercase()
    }
}

fn is_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.contains('.')
        && d.split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

pub(super) fn validate(v: &mut Verp, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if !v.enabled {
        return Ok(());
    }
    v.domain = v.domain.trim().trim_end_matches('.').to_ascii_lowercase();
    if !is_domain(&v.domain) {
        return Err(fail(
            "verp",
            0,
            "domain",
            "must be the bounce domain, such as \"bounce.example.com\" (its MX pointing at this server)".into(),
        ));
    }
    let prefix_ok = (1..=16).contains(&v.prefix.len())
        && v.prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !prefix_ok {
        return Err(fail(
            "verp",
            0,
            "prefix",
            "must be 1 to 16 lowercase letters, digits or hyphens".into(),
        ));
    }
    let complaints = v.complaints();
    let at_domain = complaints
        .rsplit_once('@')
        .is_some_and(|(local, domain)| !local.is_empty() && !local.contains('+') && domain == v.domain);
    if !at_domain {
        return Err(fail(
            "verp",
            0,
            "complaints_address",
            format!(
                "must be an address at {} without a '+', such as fbl@{}",
                v.domain, v.domain
            ),
        ));
    }
    if v.complaint_scope != "global" && v.complaint_scope != "sender-domain" {
        return Err(fail(
            "verp",
            0,
            "complaint_scope",
            format!("must be \"global\" or \"sender-domain\", not {:?}", v.complaint_scope),
        ));
    }
    Ok(())
}
