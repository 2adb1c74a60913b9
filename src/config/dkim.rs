//! `[[dkim]]`: the keys that sign outgoing mail (RFC 6376; Ed25519 by RFC 8463). Each entry signs
//! the messages whose From: header's domain is its `domain`; entries with `fallback = true` sign
//! the messages whose From: domain has no entry of its own. Keys are read by `crate::dkim`, at
//! start and on SIGHUP.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use super::server::valid_hostname;
use crate::units::Span;

/// Most `[[dkim]]` entries (each signature costs a private-key operation per message).
pub const DKIM_ENTRIES_MAX: usize = 64;
/// Most header field names one entry signs.
pub const DKIM_HEADERS_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DkimAlgorithm {
    RsaSha256,
    Ed25519Sha256,
}

impl DkimAlgorithm {
    /// The name in `a=` (RFC 6376 3.5, RFC 8463), in the configuration and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DkimAlgorithm::RsaSha256 => "rsa-sha256",
            DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Canonicalization {
    Relaxed,
    Simple,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dkim {
    /// The signing domain (`d=`).
    pub domain: String,
    /// The selector (`s=`): the public key is published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// PEM file holding the private key: RSA of 2048 bits or more, or Ed25519 (PKCS#8).
    pub key: PathBuf,
    /// The key's algorithm, checked against the key; by default the key decides.
    #[serde(default)]
    pub algorithm: Option<DkimAlgorithm>,
    /// Header fields to sign (`h=`). A name listed twice is oversigned: signed once more than
    /// it occurs, so that adding one breaks the signature.
    #[serde(default = "default_headers")]
    pub headers: Vec<String>,
    /// `header/body` canonicalization (`c=`).
    #[serde(default = "default_canonicalization")]
    pub canonicalization: String,
    /// Signatures expire this long after signing (`x=`); by default they do not.
    #[serde(default)]
    pub expiry: Option<Span>,
    /// Also sign messages whose From: domain has no `[[dkim]]` entry of its own.
    #[serde(default)]
    pub fallback: bool,
}

/// From (oversigned) and the fields receivers and list tools rely on (RFC 6376 5.4.1, RFC 8058).
pub fn default_headers() -> Vec<String> {
    [
        "From",
        "From",
        "To",
        "Cc",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Reply-To",
        "In-Reply-To",
        "References",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn default_canonicalization() -> String {
    "relaxed/relaxed".into()
}

impl Dkim {
    /// The header and body canonicalizations, if `canonicalization` is well formed.
    pub fn canonicalizations(&self) -> Option<(Canonicalization, Canonicalization)> {
        let one = |s: &str| match s {
            "relaxed" => Some(Canonicalization::Relaxed),
            "simple" => Some(Canonicalization::Simple),
            _ => None,
        };
        match self.canonicalization.split_once('/') {
            Some((h, b)) => Some((one(h)?, one(b)?)),
            None => Some((one(&self.canonicalization)?, Canonicalization::Simple)),
        }
    }
}

/// Checks `[[dkim]]` (the key files themselves are read by `crate::dkim::Signers::load`).
pub(super) fn validate(entries: &[Dkim], fail: &Fail<'_>) -> Result<(), ConfigError> {
    if entries.len() > DKIM_ENTRIES_MAX {
        return Err(fail(
            "dkim",
            DKIM_ENTRIES_MAX,
            "domain",
            format!("at most {DKIM_ENTRIES_MAX} [[dkim]] entries"),
        ));
    }
    for (i, d) in entries.iter().enumerate() {
        if !valid_hostname(&d.domain) {
            let why = format!(
                "`{}` is not a domain; write the signing domain, such as \"example.com\"",
                d.domain
            );
            return Err(fail("dkim", i, "domain", why));
        }
        let selector_ok = !d.selector.is_empty()
            && d.selector.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !selector_ok {
            let why = format!(
                "`{}` is not a selector; write letters, digits, `-` or `_`, such as \"s2026\"",
                d.selector
            );
            return Err(fail("dkim", i, "selector", why));
        }
        if d.canonicalizations().is_none() {
            let why = format!(
                "`{}`: write \"relaxed/relaxed\", \"relaxed/simple\", \"simple/relaxed\" or \"simple/simple\"",
                d.canonicalization
            );
            return Err(fail("dkim", i, "canonicalization", why));
        }
        check_headers(&d.headers).map_err(|why| fail("dkim", i, "headers", why))?;
        if d.expiry.is_some_and(|x| x.0.as_secs() < 60) {
            return Err(fail(
                "dkim",
                i,
                "expiry",
                "signatures must live a minute at least; write such as \"7d\"".into(),
            ));
        }
        let twice = entries[..i]
            .iter()
            .any(|e| e.domain.eq_ignore_ascii_case(&d.domain) && e.selector.eq_ignore_ascii_case(&d.selector));
        if twice {
            let why = format!("{}._domainkey.{} has two entries; keep one", d.selector, d.domain);
            return Err(fail("dkim", i, "selector", why));
        }
    }
    Ok(())
}

fn check_headers(headers: &[String]) -> Result<(), String> {
    if headers.len() > DKIM_HEADERS_MAX {
        return Err(format!("at most {DKIM_HEADERS_MAX} header names"));
    }
    if !headers.iter().any(|h| h.eq_ignore_ascii_case("from")) {
        return Err("must include \"From\" (RFC 6376 5.4)".into());
    }
    match headers
        .iter()
        .find(|h| h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':'))
    {
        Some(bad) => Err(format!("`{bad}` is not a header field name")),
        None => Ok(()),
    }
}
