//! Classes from status codes alone: the RFC 3463 enhanced status code (with the codes of
//! RFC 7372, RFC 7505 and RFC 8601's registry additions), else the basic RFC 5321 code.

use crate::Class;

/// The first enhanced status code (`class.subject.detail`, RFC 3463 section 2) in `text`, as
/// its three numbers. Receivers put it first; a reply we wrap (a greeting refused, a
/// connection's story) may carry the remote one further in.
pub fn enhanced_code(text: &str) -> Option<(u8, u16, u16)> {
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let start_ok = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'.');
        if start_ok && matches!(bytes[at], b'2' | b'4' | b'5') && bytes.get(at + 1) == Some(&b'.') {
            if let Some(code) = parse_at(&bytes[at..]) {
                return Some(code);
            }
        }
        at += 1;
    }
    None
}

/// `d.ddd.ddd` at the start of `s`, ended by anything but a digit or a dot followed by a digit.
fn parse_at(s: &[u8]) -> Option<(u8, u16, u16)> {
    let class = s[0] - b'0';
    let (subject, rest) = number(&s[2..])?;
    if rest.first() != Some(&b'.') {
        return None;
    }
    let (detail, rest) = number(&rest[1..])?;
    if rest
        .first()
        .is_some_and(|b| b.is_ascii_digit() || (*b == b'.' && rest.get(1).is_some_and(u8::is_ascii_digit)))
    {
        return None;
    }
    Some((class, subject, detail))
}

/// One to three digits.
fn number(s: &[u8]) -> Option<(u16, &[u8])> {
    let digits = s.iter().take(4).take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 3 {
        return None;
    }
    let value = s[..digits].iter().fold(0u16, |v, b| v * 10 + u16::from(b - b'0'));
    Some((value, &s[digits..]))
}

/// The class the status codes give: the enhanced code's subject and detail when it has a
/// specific meaning, else the basic code (4xx transient, 5xx other).
pub fn class_of_status(code: u16, enhanced: Option<(u8, u16, u16)>) -> Class {
    if let Some((_, subject, detail)) = enhanced {
        if let Some(class) = class_of_enhanced(subject, detail) {
            return class;
        }
    }
    if code >= 500 {
        Class::Other
    } else {
        Class::Transient
    }
}

fn class_of_enhanced(subject: u16, detail: u16) -> Option<Class> {
    Some(match (subject, detail) {
        // x.1.1 bad destination mailbox, x.1.6 mailbox moved, x.1.10 RFC 7505's recipient
        // address has null MX.
        (1, 1) | (1, 6) => Class::InvalidRecipient,
        (1, 2) | (1, 10) => Class::InvalidDomain,
        (2, 2) => Class::MailboxFull,
        (2, 3) | (3, 4) => Class::MessageTooLarge,
        // x.4.1 no answer from host, x.4.4 unable to route, x.4.6 routing loop, x.4.0 other
        // network or routing status.
        (4, 0) | (4, 1) | (4, 4) | (4, 6) => Class::Routing,
        (4, 3) => Class::Dns,
        (4, 7) => Class::Timeout,
        // x.4.5 mail system congestion, x.5.3 too many recipients (RFC 5321 4.5.3.1.10).
        (4, 5) | (5, 3) => Class::RateLimited,
        // x.7.1 delivery not authorized, x.7.28 (RFC 5248 registry) mail flood detected.
        (7, 1) => Class::PolicyBlock,
        (7, 28) => Class::RateLimited,
        // RFC 7372: x.7.20-x.7.26 authentication failures and missing reverse DNS; x.7.27
        // (RFC 7505) sender address has null MX.
        (7, 20..=26) => Class::AuthRequired,
        (7, 27) => Class::InvalidDomain,
        // x.7.10 encryption needed, x.7.11 encryption required for requested auth mechanism
        // (RFC 5248 registry), x.7.5 cryptographic failure.
        (7, 5) | (7, 10) | (7, 11) => Class::Tls,
        // x.6.x media and content problems, x.7.15 priority too low... content first.
        (6, _) => Class::ContentRejected,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_enhanced_code() {
        assert_eq!(enhanced_code("5.1.1 no such user"), Some((5, 1, 1)));
        assert_eq!(enhanced_code("4.7.28 unusual rate"), Some((4, 7, 28)));
        assert_eq!(
            enhanced_code("192.0.2.1:25 greeted with 554 5.7.1 blocked"),
            Some((5, 7, 1))
        );
        assert_eq!(enhanced_code("Service unavailable"), None);
        // Not codes: an address, a version, a code glued to a word.
        assert_eq!(enhanced_code("from 192.0.2.1 rejected"), None);
        assert_eq!(enhanced_code("v2.1.1.4 here"), None);
        assert_eq!(enhanced_code("x4.2.2 full"), None);
        assert_eq!(enhanced_code("5.1.1234 no"), None);
    }

    #[test]
    fn status_codes_alone() {
        assert_eq!(class_of_status(550, Some((5, 1, 1))), Class::InvalidRecipient);
        assert_eq!(class_of_status(452, Some((4, 2, 2))), Class::MailboxFull);
        assert_eq!(class_of_status(550, Some((5, 7, 26))), Class::AuthRequired);
        assert_eq!(class_of_status(421, Some((4, 4, 3))), Class::Dns);
        assert_eq!(class_of_status(451, Some((4, 3, 0))), Class::Transient);
        assert_eq!(class_of_status(554, Some((5, 0, 0))), Class::Other);
        assert_eq!(class_of_status(421, None), Class::Transient);
        assert_eq!(class_of_status(554, None), Class::Other);
    }
}
