//! `[suppression]`: the list of recipients not to mail (`gannet_suppress`, wired in
//! `crate::suppression`): its bound, where hard bounces put their recipients, and what a
//! message to a suppressed recipient meets at RCPT.

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use crate::units::Span;

/// The most entries the configuration may allow (the crate's own limit).
pub const ENTRIES_MAX_LIMIT: usize = gannet_suppress::ENTRIES_MAX_LIMIT;
/// The longest refusal sentence.
pub const REFUSAL_BYTES_MAX: usize = 200;

/// What RCPT does for a suppressed recipient of relayed mail (trusted networks, submission).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AtRcpt {
    /// `550 5.1.1` with the refusal sentence: the submitter learns at once.
    Refuse,
    /// `250`, and the recipient is dropped before delivery with a `suppressed` event.
    Accept,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suppression {
    /// Off: nothing is checked or added (the journal is not opened).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// The most entries the list holds; at the bound, expired ones are dropped first and a
    /// live suppression is never evicted (a new one is refused and logged).
    #[serde(default = "default_entries_max")]
    pub entries_max: usize,
    #[serde(default = "default_at_rcpt")]
    pub at_rcpt: AtRcpt,
    /// The sentence of the 550 5.1.1 reply; `{address}` is replaced by the recipient.
    #[serde(default = "default_refusal")]
    pub refusal: String,
    /// Scope of the entries hard bounces add: "global", or "sender-domain" (only mail from the
    /// bouncing message's sender domain is suppressed).
    #[serde(default = "default_hard_bounce_scope")]
    pub hard_bounce_scope: String,
    /// How long a hard bounce's entry lasts; absent: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_bounce_expires_after: Option<Span>,
    /// The most rows one CSV import may carry.
    #[serde(default = "default_import_rows_max")]
    pub import_rows_max: usize,
}

fn default_enabled() -> bool {
    true
}
fn default_entries_max() -> usize {
    1_000_000
}
fn default_at_rcpt() -> AtRcpt {
    AtRcpt::Refuse
}
fn default_refusal() -> String {
    "{address} is on this server's suppression list (it bounced or complained); ask the postmaster to remove it".into()
}
fn default_hard_bounce_scope() -> String {
    "global".into()
}
fn default_import_rows_max() -> usize {
    100_000
}

impl Default for Suppression {
    fn default() -> Suppression {
        Suppression {
            enabled: default_enabled(),
            entries_max: default_entries_max(),
            at_rcpt: default_at_rcpt(),
            refusal: default_refusal(),
            hard_bounce_scope: default_hard_bounce_scope(),
            hard_bounce_expires_after: None,
            import_rows_max: default_import_rows_max(),
        }
    }
}

impl Suppression {
    /// The refusal sentence for `address`.
    pub fn refusal_for(&self, address: &str) -> String {
        self.refusal.replace("{address}", address)
    }
}

pub(super) fn validate(s: &Suppression, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if s.entries_max == 0 || s.entries_max > ENTRIES_MAX_LIMIT {
        return Err(fail(
            "suppression",
            0,
            "entries_max",
            format!("must be between 1 and {ENTRIES_MAX_LIMIT}"),
        ));
    }
    let refusal = s.refusal.trim();
    if refusal.is_empty()
        || refusal.len() > REFUSAL_BYTES_MAX
        || refusal.chars().any(|c| c.is_control() || !c.is_ascii())
    {
        return Err(fail(
            "suppression",
            0,
            "refusal",
            format!("must be one line of printable ASCII, 1 to {REFUSAL_BYTES_MAX} bytes"),
        ));
    }
    if s.hard_bounce_scope != "global" && s.hard_bounce_scope != "sender-domain" {
        return Err(fail(
            "suppression",
            0,
            "hard_bounce_scope",
            format!("must be \"global\" or \"sender-domain\", not {:?}", s.hard_bounce_scope),
        ));
    }
    if matches!(s.hard_bounce_expires_after, Some(Span(d)) if d.is_zero()) {
        return Err(fail(
            "suppression",
            0,
            "hard_bounce_expires_after",
            "must be longer than 0s; leave it out for entries that last until removed".into(),
        ));
    }
    if s.import_rows_max == 0 || s.import_rows_max > 10_000_000 {
        return Err(fail(
            "suppression",
            0,
            "import_rows_max",
            "must be between 1 and 10000000".into(),
        ));
    }
    Ok(())
}
