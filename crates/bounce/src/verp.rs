//! VERP return paths with signed tokens (variable envelope return paths, after D. J.
//! Bernstein's VERP): each delivery's envelope sender is `<prefix>+<token>@<domain>`, the
//! token naming the message and the recipient's index in it:
//!
//! ```text
//! bounces+00000000002a-00-000040.3.9f2c4e1b0a7d5e33@bounce.example.com
//!         message id            index  MAC
//! ```
//!
//! The MAC is the first 8 bytes of HMAC-SHA256 over `<id>.<index>.<recipient, lowercase>`
//! under the operator's secret, so a token is valid only together with the one address it
//! was made for: a recipient who reads its own Return-Path can forge a report about nobody
//! but itself, and a stranger cannot make one at all (2^64 guesses). The recipient is not in
//! the token (a local part has 64 octets); a report names it, and the MAC says whether it is
//! the right one. Lowercase hex throughout, since receivers may change a local part's case.

use ring::hmac;

/// Bytes of the MAC kept in a token.
pub const MAC_BYTES: usize = 8;
/// The longest local part a token makes (RFC 5321 4.5.3.1.1 allows 64 octets).
pub const LOCAL_PART_BYTES_MAX: usize = 64;
/// Tokens looked for in one report.
pub const TOKENS_MAX: usize = 16;

/// A return-path signer and checker.
pub struct Verp {
    key: hmac::Key,
    prefix: String,
    domain: String,
}

/// A token read back from an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The message id, lowercase, as it was written.
    pub message_id: String,
    pub index: u32,
    mac: [u8; MAC_BYTES],
}

impl Verp {
    /// `prefix` and `domain` lowercase ASCII (the configuration checks them).
    pub fn new(secret: &[u8], prefix: &str, domain: &str) -> Verp {
        Verp {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            prefix: prefix.to_ascii_lowercase(),
            domain: domain.to_ascii_lowercase(),
        }
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    fn mac(&self, message_id: &str, index: u32, recipient: &str) -> [u8; MAC_BYTES] {
        let text = format!("{message_id}.{index}.{}", recipient.to_lowercase());
        let tag = hmac::sign(&self.key, text.as_bytes());
        let mut mac = [0u8; MAC_BYTES];
        mac.copy_from_slice(&tag.as_ref()[..MAC_BYTES]);
        mac
    }

    /// The return path for recipient `index` (address `recipient`) of message `message_id`.
    pub fn address(&self, message_id: &str, index: u32, recipient: &str) -> String {
        let id = message_id.to_ascii_lowercase();
        let mac = self.mac(&id, index, recipient);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        let address = format!("{}+{id}.{index}.{hex}@{}", self.prefix, self.domain);
        debug_assert!(address.find('@').is_some_and(|at| at <= LOCAL_PART_BYTES_MAX));
        address
    }

    /// The token of a local part (`bounces+<token>`), if it has the shape of one.
    pub fn parse_local(&self, local: &str) -> Option<Token> {
        let local = local.to_ascii_lowercase();
        let rest = local.strip_prefix(&self.prefix)?.strip_prefix('+')?;
        let mut parts = rest.split('.');
        let (id, index, mac) = (parts.next()?, parts.next()?, parts.next()?);
        let id_ok = !id.is_empty() && id.len() <= 40 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        if parts.next().is_some() || !id_ok || mac.len() != 2 * MAC_BYTES {
            return None;
        }
        let index: u32 = index.parse().ok()?;
        let mut bytes = [0u8; MAC_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(mac.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Token {
            message_id: id.to_string(),
            index,
            mac: bytes,
        })
    }

    /// Whether `token` was made for `recipient` (constant time in the MAC).
    pub fn verify(&self, token: &Token, recipient: &str) -> bool {
        let text = format!("{}.{}.{}", token.message_id, token.index, recipient.to_lowercase());
        let tag = hmac::sign(&self.key, text.as_bytes());
        constant_time_eq(&tag.as_ref()[..MAC_BYTES], &token.mac)
    }

    /// Every token-shaped address at our domain in `text` (a report's headers and body), at
    /// most [`TOKENS_MAX`], each once.
    pub fn find_tokens(&self, text: &[u8]) -> Vec<Token> {
        let lower = String::from_utf8_lossy(text).to_ascii_lowercase();
        let needle = format!("{}+", self.prefix);
        let at_domain = format!("@{}", self.domain);
        let mut found: Vec<Token> = Vec::new();
        let mut from = 0;
        while let Some(pos) = lower[from..].find(&needle) {
            let start = from + pos;
            from = start + needle.len();
            let boundary = start == 0 || !lower.as_bytes()[start - 1].is_ascii_alphanumeric();
            // The `@` within a local part's length: linear in the text, however many
            // `bounces+` it repeats.
            let window = &lower.as_bytes()[start..lower.len().min(start + LOCAL_PART_BYTES_MAX + 1)];
            let Some(at) = memchr_at(window).map(|a| start + a) else {
                continue;
            };
            if !boundary || !lower[at..].starts_with(&at_domain) {
                continue;
            }
            if let Some(token) = self.parse_local(&lower[start..at]) {
                if !found.contains(&token) {
                    found.push(token);
                }
                if found.len() == TOKENS_MAX {
                    break;
                }
            }
        }
        found
    }
}

fn memchr_at(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'@')
}

/// A fresh 32-byte key from the system's random source (None if it fails).
pub fn new_secret() -> Option<[u8; 32]> {
    use ring::rand::SecureRandom;
    let mut key = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut key).ok()?;
    Some(key)
}

/// Equality without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verp() -> Verp {
        Verp::new(b"a secret of the operator's", "bounces", "bounce.example.com")
    }

    #[test]
    fn a_token_verifies_only_for_its_recipient_and_key() {
        let v = verp();
        let address = v.address("00000000002A-00-000040", 3, "Bob@Example.org");
        let (local, domain) = address.split_once('@').unwrap();
        assert_eq!(domain, "bounce.example.com");
        assert!(local.len() <= LOCAL_PART_BYTES_MAX, "{local}");
        assert!(local.starts_with("bounces+00000000002a-00-000040.3."), "{local}");
        let token = v
            .parse_local(&local.to_ascii_uppercase())
            .expect("case does not matter");
        assert_eq!((token.message_id.as_str(), token.index), ("00000000002a-00-000040", 3));
        assert!(v.verify(&token, "bob@example.org"));
        assert!(!v.verify(&token, "alice@example.org"), "bound to its recipient");
        let other = Verp::new(b"another key", "bounces", "bounce.example.com");
        assert!(!other.verify(&token, "bob@example.org"), "bound to the key");
        let mut forged = token.clone();
        forged.index = 4;
        assert!(!v.verify(&forged, "bob@example.org"), "bound to the index");
    }

    #[test]
    fn malformed_tokens_are_not_tokens() {
        let v = verp();
        for bad in [
            "bounces",
            "bounces+",
            "bounces+id.1",
            "bounces+id.x.0011223344556677",
            "bounces+id.1.00112233445566",
            "bounces+id.1.00112233445566zz",
            "bounces+id.1.0011223344556677.extra",
            "other+id.1.0011223344556677",
        ] {
            assert_eq!(v.parse_local(bad), None, "{bad}");
        }
    }

    #[test]
    fn tokens_are_found_in_a_report() {
        let v = verp();
        let a = v.address("1-00-2", 0, "a@x.test");
        let b = v.address("1-00-2", 1, "b@x.test");
        let text = format!(
            "Return-Path: <{a}>\r\nTo: {}\r\nX-Other: nobounces+1.1.0011223344556677@bounce.example.com {a} {b}\r\n",
            b.to_uppercase()
        );
        let found = v.find_tokens(text.as_bytes());
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(v.verify(&found[0], "a@x.test") && v.verify(&found[1], "b@x.test"));
        assert!(v.find_tokens(b"bounces+1.1.0011223344556677@elsewhere.test").is_empty());
    }

    #[test]
    fn a_report_of_repeated_prefixes_is_scanned_in_linear_time() {
        let v = verp();
        let mut text = "bounces+".repeat(200_000);
        text.push_str(&v.address("1-00-2", 0, "a@x.test"));
        // 200,000 prefixes before the one token: quadratic scanning would take hours here.
        assert_eq!(v.find_tokens(text.as_bytes()).len(), 1);
    }
}
