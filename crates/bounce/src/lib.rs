//! Bounce classification, sans-IO: every delivery failure or deferral (a reply at any stage, a
//! connection, TLS or DNS failure, an expiry) gets a [`Class`], from rules as data that match
//! the reply's codes and text ([`Rules`]), then from its RFC 3463 enhanced status code, then
//! from its basic code. Each class has an [`Action`] (retry as usual, bounce at once, suppress
//! the recipient, suspend the destination) that the configuration can change.
//!
//! The default rules file (`default-rules.toml`, embedded) carries real receivers' published
//! reply texts, each with its source; its examples are tests.

mod class;
pub mod report;
mod rules;
mod status;
pub mod verp;

pub use class::{Action, Class, CLASSES};
pub use rules::{
    Classification, RuleError, Rules, DEFAULT_RULES, DEFAULT_RULES_NAME, RULES_MAX, RULE_PATTERN_BYTES_MAX,
    SLOW_RATE_MAX, SLOW_RATE_MIN, SUSPEND_FOR_MAX,
};
pub use status::{class_of_status, enhanced_code};

/// What a classification looks at: the reply (as `"<code> <text>"`, every line joined by a
/// space), and the receiving site's MX host names (for provider-specific rules), if known.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    pub code: u16,
    /// The reply text after the basic code (the enhanced code, when any, first).
    pub text: &'a str,
    /// MX host names of the site that answered, lowercase, without the trailing dot.
    pub mx_hosts: &'a [&'a str],
}
