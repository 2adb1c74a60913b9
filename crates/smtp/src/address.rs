//! RFC 5321 path syntax (section 4.1.2), with the SMTPUTF8 extensions of RFC 6531.
//!
//! Parsing borrows from the command line: a [`Mailbox`] is two slices of the input. The local part
//! keeps its quotes and backslashes exactly as the client sent them, because that is the form the
//! address is relayed in.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Longest local part we accept. RFC 5321 says 64 octets, but SRS and VERP addresses routinely
/// exceed that, so we accept what the path limit allows.
pub const LOCAL_PART_BYTES_MAX: usize = 256;
/// RFC 5321 4.5.3.1.2.
pub const DOMAIN_BYTES_MAX: usize = 255;

/// `local@domain`, borrowed from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mailbox<'a> {
    /// As written: a dot-string, or a quoted string with its quotes.
    pub local: &'a [u8],
    /// A domain name, or an address literal with its brackets. Empty only for `<Postmaster>`.
    pub domain: &'a [u8],
    /// Whether any byte is non-ASCII (UTF-8); such an address needs SMTPUTF8.
    pub utf8: bool,
}

impl Mailbox<'_> {
    /// Writes `local@domain` (or just `local` for the domain-less postmaster).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.local);
        if !self.domain.is_empty() {
            out.push(b'@');
            out.extend_from_slice(self.domain);
        }
    }
}

/// Why a path was refused. Each variant maps to one sentence in the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressError {
    MissingAngleBrackets,
    BadLocalPart,
    LocalPartTooLong,
    MissingAt,
    BadDomain,
    DomainTooLong,
    BadAddressLiteral,
    BadSourceRoute,
    InvalidUtf8,
}

impl AddressError {
    pub fn sentence(self) -> &'static str {
        match self {
            AddressError::MissingAngleBrackets => "Address must be enclosed in <>",
            AddressError::BadLocalPart => "Bad local part in address",
            AddressError::LocalPartTooLong => "Local part of address too long",
            AddressError::MissingAt => "Address needs a domain after @",
            AddressError::BadDomain => "Bad domain in address",
            AddressError::DomainTooLong => "Domain of address too long",
            AddressError::BadAddressLiteral => "Bad address literal",
            AddressError::BadSourceRoute => "Bad source route in address",
            AddressError::InvalidUtf8 => "Address is not valid UTF-8",
        }
    }
}

/// What `parse_path` found: the path and the rest of the line after `>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path<'a> {
    /// `<>`, the null reverse-path (bounces).
    Null,
    Mailbox(Mailbox<'a>),
}

/// Parses `<[source-route:]mailbox>` or `<>` at the start of `input`; returns the path and the rest.
///
/// `allow_postmaster` accepts the domain-less `<Postmaster>` (RFC 5321 4.1.1.3, RCPT only).
pub fn parse_path(input: &[u8], allow_postmaster: bool) -> Result<(Path<'_>, &[u8]), AddressError> {
    if input.first() != Some(&b'<') {
        return Err(AddressError::MissingAngleBrackets);
    }
    let mut pos = 1;
    if input.get(pos) == Some(&b'>') {
        return Ok((Path::Null, &input[2..]));
    }
    if input.get(pos) == Some(&b'@') {
        pos = skip_source_route(input, pos)?;
    }
    let local_start = pos;
    pos = scan_local_part(input, pos)?;
    let local = &input[local_start..pos];
    if local.len() > LOCAL_PART_BYTES_MAX {
        return Err(AddressError::LocalPartTooLong);
    }
    match input.get(pos) {
        Some(b'@') => {}
        Some(b'>') if allow_postmaster && local.eq_ignore_ascii_case(b"postmaster") => {
            let mailbox = Mailbox {
                local,
                domain: &[],
                utf8: false,
            };
            return Ok((Path::Mailbox(mailbox), &input[pos + 1..]));
        }
        Some(b'>') => return Err(AddressError::MissingAt),
        _ => return Err(AddressError::BadLocalPart),
    }
    pos += 1;
    let domain_start = pos;
    pos = if input.get(pos) == Some(&b'[') {
        scan_address_literal(input, pos)?
    } else {
        scan_domain(input, pos)?
    };
    let domain = &input[domain_start..pos];
    if domain.len() > DOMAIN_BYTES_MAX {
        return Err(AddressError::DomainTooLong);
    }
    if input.get(pos) != Some(&b'>') {
        return Err(AddressError::BadDomain);
    }
    let utf8 = !local.is_ascii() || !domain.is_ascii();
    if utf8 && (std::str::from_utf8(local).is_err() || std::str::from_utf8(domain).is_err()) {
        return Err(AddressError::InvalidUtf8);
    }
    let mailbox = Mailbox { local, domain, utf8 };
    Ok((Path::Mailbox(mailbox), &input[pos + 1..]))
}

/// `@dom1,@dom2:` — syntax checked, then ignored (RFC 5321 appendix C: source routes are obsolete).
fn skip_source_route(input: &[u8], mut pos: usize) -> Result<usize, AddressError> {
    loop {
        if input.get(pos) != Some(&b'@') {
            return Err(AddressError::BadSourceRoute);
        }
        pos = scan_domain(input, pos + 1).map_err(|_| AddressError::BadSourceRoute)?;
        match input.get(pos) {
            Some(b',') => pos += 1,
            Some(b':') => return Ok(pos + 1),
            _ => return Err(AddressError::BadSourceRoute),
        }
    }
}

/// RFC 5322 atext, plus UTF-8 bytes (RFC 6531); validity of the UTF-8 is checked on the whole.
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || b >= 0x80
}

fn scan_local_part(input: &[u8], mut pos: usize) -> Result<usize, AddressError> {
    if input.get(pos) == Some(&b'"') {
        pos += 1;
        loop {
            match input.get(pos) {
                Some(b'"') => return Ok(pos + 1),
                Some(b'\\') => match input.get(pos + 1) {
                    Some(&c) if (32..=126).contains(&c) => pos += 2,
                    _ => return Err(AddressError::BadLocalPart),
                },
                Some(&c) if c == 32 || c == 33 || (35..=126).contains(&c) || c >= 0x80 => pos += 1,
                _ => return Err(AddressError::BadLocalPart),
            }
        }
    }
    // Dot-string: Atom *("." Atom)
    loop {
        let atom_start = pos;
        while input.get(pos).is_some_and(|&b| is_atext(b)) {
            pos += 1;
        }
        if pos == atom_start {
            return Err(AddressError::BadLocalPart);
        }
        if input.get(pos) == Some(&b'.') {
            pos += 1;
        } else {
            return Ok(pos);
        }
    }
}

/// `sub-domain *("." sub-domain)`, sub-domain = Let-dig [Ldh-str]; U-labels allowed (RFC 6531).
fn scan_domain(input: &[u8], mut pos: usize) -> Result<usize, AddressError> {
    loop {
        let label_start = pos;
        while input
            .get(pos)
            .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'-' || b >= 0x80)
        {
            pos += 1;
        }
        let label = &input[label_start..pos];
        if label.is_empty() || label[0] == b'-' || label[label.len() - 1] == b'-' || label.len() > 63 * 4 {
            return Err(AddressError::BadDomain);
        }
        if input.get(pos) == Some(&b'.') && input.get(pos + 1).is_some_and(|&b| b != b'>') {
            pos += 1;
        } else {
            return Ok(pos);
        }
    }
}

/// `[1.2.3.4]`, `[IPv6:...]`, or a general `[tag:dcontent]` literal.
fn scan_address_literal(input: &[u8], pos: usize) -> Result<usize, AddressError> {
    let close = memchr::memchr(b']', &input[pos..]).ok_or(AddressError::BadAddressLiteral)?;
    let inner = &input[pos + 1..pos + close];
    let text = std::str::from_utf8(inner).map_err(|_| AddressError::BadAddressLiteral)?;
    let valid = if let Some(v6) = strip_prefix_ignore_case(text, "IPv6:") {
        v6.parse::<Ipv6Addr>().is_ok()
    } else if let Some((tag, content)) = text.split_once(':') {
        !tag.is_empty()
            && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !content.is_empty()
            && content
                .bytes()
                .all(|b| (33..=90).contains(&b) || (94..=126).contains(&b))
    } else {
        text.parse::<Ipv4Addr>().is_ok()
    };
    if valid {
        Ok(pos + close + 1)
    } else {
        Err(AddressError::BadAddressLiteral)
    }
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(input: &str) -> (String, String) {
        match parse_path(input.as_bytes(), true) {
            Ok((Path::Mailbox(m), rest)) => {
                assert!(rest.is_empty(), "rest {rest:?}");
                (
                    String::from_utf8(m.local.to_vec()).unwrap(),
                    String::from_utf8(m.domain.to_vec()).unwrap(),
                )
            }
            other => panic!("{input}: {other:?}"),
        }
    }

    #[test]
    fn accepts_rfc5321_forms() {
        assert_eq!(mailbox("<a@b.example>"), ("a".into(), "b.example".into()));
        assert_eq!(mailbox("<first.last+tag@x.example>").0, "first.last+tag");
        assert_eq!(mailbox("<\"john doe\"@x.example>").0, "\"john doe\"");
        assert_eq!(mailbox("<\"a\\\"b\"@x.example>").0, "\"a\\\"b\"");
        assert_eq!(mailbox("<u@[192.0.2.1]>").1, "[192.0.2.1]");
        assert_eq!(mailbox("<u@[IPv6:2001:db8::1]>").1, "[IPv6:2001:db8::1]");
        assert_eq!(
            mailbox("<@relay.example,@r2.example:u@x.example>"),
            ("u".into(), "x.example".into())
        );
        assert_eq!(mailbox("<Postmaster>"), ("Postmaster".into(), "".into()));
        assert_eq!(mailbox("<用户@例子.广告>").1, "例子.广告");
        assert_eq!(parse_path(b"<> SIZE=1", false), Ok((Path::Null, &b" SIZE=1"[..])));
    }

    #[test]
    fn refuses_malformed_paths() {
        let cases: &[(&str, AddressError)] = &[
            ("a@b.example", AddressError::MissingAngleBrackets),
            ("<a@b.example", AddressError::BadDomain),
            ("<a..b@x.example>", AddressError::BadLocalPart),
            ("<.a@x.example>", AddressError::BadLocalPart),
            ("<a@-x.example>", AddressError::BadDomain),
            ("<a@x..example>", AddressError::BadDomain),
            ("<a@[300.1.1.1]>", AddressError::BadAddressLiteral),
            ("<a@[IPv6:zz::1]>", AddressError::BadAddressLiteral),
            ("<a>", AddressError::MissingAt),
            ("<@x.example a@b>", AddressError::BadSourceRoute),
            ("<\"unterminated@x>", AddressError::BadLocalPart),
        ];
        for (input, want) in cases {
            assert_eq!(parse_path(input.as_bytes(), false).err(), Some(*want), "{input}");
        }
        assert_eq!(parse_path(b"<Postmaster>", false).err(), Some(AddressError::MissingAt));
        let long = format!("<{}@x.example>", "a".repeat(LOCAL_PART_BYTES_MAX + 1));
        assert_eq!(
            parse_path(long.as_bytes(), false).err(),
            Some(AddressError::LocalPartTooLong)
        );
        assert_eq!(
            parse_path(b"<\xff@x.example>", false).err(),
            Some(AddressError::InvalidUtf8)
        );
    }
}
