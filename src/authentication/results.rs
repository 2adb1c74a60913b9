//! The Authentication-Results header (RFC 8601) and what becomes of the ones a message brings.
//!
//! Gannet adds one header, `authserv-id` = `server.hostname`, with every result (mail-auth
//! writes the method clauses). RFC 8601 5: a header that claims our authserv-id on incoming mail
//! is a forgery (only we may write it), and must be removed or renamed. Gannet renames it in
//! place to `X-Removed-Auth-Results`, exactly as long as `Authentication-Results`, so the spooled
//! message keeps its length and the bytes DKIM signed elsewhere (the header is not one that
//! signers cover, RFC 8601 5) need no rewriting.

use mail_auth::common::headers::HeaderWriter;
use mail_auth::{ArcOutput, AuthenticationResults, DkimOutput, DkimResult, DmarcOutput, SpfOutput};

use super::Input;

/// The header a forged one is renamed to: as long as `Authentication-Results`.
pub const RENAMED: &[u8; 22] = b"X-Removed-Auth-Results";
const NAME: &[u8; 22] = b"Authentication-Results";

/// The results one message's header reports.
pub struct Parts<'a> {
    pub dkim: &'a [DkimOutput<'a>],
    pub from_domain: &'a str,
    pub spf_helo: &'a SpfOutput,
    pub spf_from: &'a SpfOutput,
    /// DKIM signatures past the limit, not verified.
    pub dkim_skipped: usize,
    pub arc: &'a ArcOutput<'a>,
    pub dmarc: &'a DmarcOutput,
    pub verdict: super::DmarcVerdict,
    pub input: &'a Input,
}

/// mail-auth's results without DMARC's clause.
fn without_dmarc<'a>(hostname: &'a str, parts: &Parts<'_>) -> AuthenticationResults<'a> {
    let ip = parts.input.client;
    let helo = parts.input.helo.as_str();
    let mut results = AuthenticationResults::new(hostname)
        .with_dkim_results(parts.dkim, parts.from_domain)
        .with_spf_ehlo_result(parts.spf_helo, ip, helo);
    if !parts.input.mail_from.is_empty() {
        results = results.with_spf_mailfrom_result(parts.spf_from, ip, &parts.input.mail_from, helo);
    }
    results.with_arc_result(parts.arc, ip)
}

/// The results as mail-auth writes them, DMARC's clause included: what an ARC set's
/// ARC-Authentication-Results copies (mail-auth's sealer takes only its own type).
pub fn for_seal<'a>(hostname: &'a str, parts: &Parts<'_>) -> AuthenticationResults<'a> {
    without_dmarc(hostname, parts).with_dmarc_result(parts.dmarc)
}

/// `Authentication-Results: <hostname>; dkim=...; spf=...; arc=...; dmarc=...\r\n`.
pub fn header(hostname: &str, parts: &Parts<'_>) -> String {
    let mut header = without_dmarc(hostname, parts).to_header();
    if parts.dkim_skipped > 0 {
        // RFC 8601 2.7.1 "policy": signed, but not acceptable to us (here: too many to check).
        header.truncate(header.len() - 2);
        header.push_str(&format!(
            ";\r\n\tdkim=policy (not verified: {} more DKIM signatures than the {} checked per message)\r\n",
            parts.dkim_skipped,
            parts.input.dkim_signatures_max.min(super::DKIM_SIGNATURES_MAX)
        ));
    }
    // The DMARC clause is written here: mail-auth's says "none" for a failure in which
    // neither identifier passed (see `super::dmarc_verdict`).
    if !parts.dmarc.domain().is_empty() && parts.verdict != super::DmarcVerdict::None {
        header.truncate(header.len() - 2);
        let policy = match parts.dmarc.policy() {
            mail_auth::dmarc::Policy::Reject => "reject",
            mail_auth::dmarc::Policy::Quarantine => "quarantine",
            _ => "none",
        };
        header.push_str(&format!(
            ";\r\n\tdmarc={} header.from={} policy.dmarc={policy}\r\n",
            parts.verdict.name(),
            sanitize(parts.dmarc.domain())
        ));
    }
    header
}

/// A domain as a header value may hold it (what DNS gave us is already a name; this keeps
/// anything else out of the header).
fn sanitize(domain: &str) -> String {
    domain
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-' || *c == '_')
        .take(253)
        .collect()
}

/// RFC 8601's name for a DKIM result.
pub fn dkim_name(result: &DkimResult) -> &'static str {
    match result {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

/// Where the header section of `message` has an Authentication-Results header whose
/// authserv-id is `hostname` (compared without case, RFC 8601 2.5): the offsets of their names,
/// at most `FORGED_MAX` (a message with more is renamed that far; the rest stay, and the count
/// says so in the log).
pub fn forged(message: &[u8], hostname: &str) -> Vec<usize> {
    let end = header_section_end(message);
    let mut found = Vec::new();
    let mut line_start = 0;
    while line_start < end {
        let line_end = memchr::memchr(b'\n', &message[line_start..end]).map_or(end, |i| line_start + i + 1);
        let line = &message[line_start..line_end];
        if line.len() > NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME) {
            let value = field_value(message, line_start + NAME.len(), end);
            if claims(&value, hostname) && found.len() < FORGED_MAX {
                found.push(line_start);
            }
        }
        line_start = line_end;
    }
    found
}

/// How many DKIM-Signature and ARC-Seal fields the header section of `message` has: the
/// public-key operations its verification costs.
pub fn signature_fields(message: &[u8]) -> usize {
    let end = header_section_end(message);
    let mut count = 0;
    let mut line_start = 0;
    while line_start < end {
        let line_end = memchr::memchr(b'\n', &message[line_start..end]).map_or(end, |i| line_start + i + 1);
        let line = &message[line_start..line_end];
        let starts = |name: &[u8]| line.len() > name.len() && line[..name.len()].eq_ignore_ascii_case(name);
        if starts(b"DKIM-Signature:") || starts(b"ARC-Seal:") {
            count += 1;
        }
        line_start = line_end;
    }
    count
}

/// Forged headers renamed per message at most.
pub const FORGED_MAX: usize = 64;

/// Renames the forged headers of `message` in place (see [`forged`]); returns how many.
pub fn rename_forged(message: &mut [u8], hostname: &str) -> usize {
    let at = forged(message, hostname);
    for &offset in &at {
        message[offset..offset + RENAMED.len()].copy_from_slice(RENAMED);
    }
    at.len()
}

/// Where the header section ends (the blank line), or the message's end.
fn header_section_end(message: &[u8]) -> usize {
    memchr::memmem::find(message, b"\r\n\r\n").map_or(message.len(), |i| i + 2)
}

/// The unfolded value of the field whose name ends at `after_name` (the colon comes next,
/// perhaps after spaces).
fn field_value(message: &[u8], after_name: usize, end: usize) -> Vec<u8> {
    let mut value = Vec::new();
    let mut i = after_name;
    while i < end && (message[i] == b' ' || message[i] == b'\t') {
        i += 1;
    }
    if i >= end || message[i] != b':' {
        return value;
    }
    i += 1;
    while i < end {
        let line_end = memchr::memchr(b'\n', &message[i..end]).map_or(end, |j| i + j + 1);
        value.extend_from_slice(&message[i..line_end]);
        // Folded: the next line starts with white space.
        if line_end < end && (message[line_end] == b' ' || message[line_end] == b'\t') {
            i = line_end;
        } else {
            break;
        }
    }
    value
}

/// Whether a header value's authserv-id (the first token, before `;` or white space, after any
/// comments) is `hostname`.
fn claims(value: &[u8], hostname: &str) -> bool {
    let text = String::from_utf8_lossy(value);
    let mut rest = text.trim_start();
    while let Some(stripped) = rest.strip_prefix('(') {
        rest = stripped.split_once(')').map_or("", |(_, after)| after).trim_start();
    }
    let id = rest.split(|c: char| c == ';' || c.is_whitespace()).next().unwrap_or("");
    id.eq_ignore_ascii_case(hostname)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_headers_claiming_our_authserv_id_are_renamed() {
        let mut message = b"Received: x\r\n\
authentication-results: MX.test; dkim=pass header.d=evil.example\r\n\
Authentication-Results: other.example;\r\n\tspf=pass\r\n\
Authentication-Results: (forged) mx.test;\r\n\tdmarc=pass\r\n\
Subject: hi\r\n\r\nAuthentication-Results: mx.test; in the body\r\n"
            .to_vec();
        let len = message.len();
        assert_eq!(rename_forged(&mut message, "mx.test"), 2);
        assert_eq!(message.len(), len);
        let text = String::from_utf8(message).unwrap();
        assert_eq!(text.matches("X-Removed-Auth-Results: MX.test").count(), 1, "{text}");
        assert!(text.contains("X-Removed-Auth-Results: (forged) mx.test"), "{text}");
        assert!(text.contains("Authentication-Results: other.example"), "{text}");
        assert!(
            text.contains("\r\n\r\nAuthentication-Results: mx.test; in the body"),
            "the body is not touched"
        );
    }
}
