//! One suppression: who, for which senders, why, since when and until when.

use std::fmt;
use std::str::FromStr;

/// Bytes of an address at most (RFC 5321 4.5.3.1: 64 local part + @ + 255 domain).
pub const ADDRESS_BYTES_MAX: usize = 320;
/// Bytes of a reason at most; longer ones are cut at a character boundary.
pub const REASON_BYTES_MAX: usize = 256;

/// Where a suppression came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// A permanent failure of a class whose action is `suppress`.
    HardBounce,
    /// A complaint (ARF feedback report).
    Complaint,
    /// Added by the operator (API or CLI).
    Operator,
    /// From an imported file.
    Import,
}

impl Source {
    pub const ALL: [Source; 4] = [Source::HardBounce, Source::Complaint, Source::Operator, Source::Import];

    pub const fn as_str(self) -> &'static str {
        match self {
            Source::HardBounce => "hard-bounce",
            Source::Complaint => "complaint",
            Source::Operator => "operator",
            Source::Import => "import",
        }
    }
}

impl FromStr for Source {
    type Err = EntryError;

    fn from_str(s: &str) -> Result<Source, EntryError> {
        Source::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| EntryError::Source(s.chars().take(40).collect()))
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// For whom a suppression holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Every sender.
    Global,
    /// Senders of this domain (lowercase).
    SenderDomain(Box<str>),
}

impl Scope {
    /// `""` or `"global"` for [`Scope::Global`], else a sender domain.
    pub fn parse(s: &str) -> Result<Scope, EntryError> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("global") {
            return Ok(Scope::Global);
        }
        let valid = s.len() <= 255
            && s.split('.').all(|label| {
                !label.is_empty() && label.len() <= 63 && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return Err(EntryError::Scope(s.chars().take(40).collect()));
        }
        Ok(Scope::SenderDomain(s.to_ascii_lowercase().into()))
    }

    /// The scope's name in keys, files and the API: `global`, or the domain.
    pub fn as_str(&self) -> &str {
        match self {
            Scope::Global => "global",
            Scope::SenderDomain(d) => d,
        }
    }
}

/// What is kept for one suppressed (scope, address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub reason: Box<str>,
    pub source: Source,
    pub added_unix_s: u64,
    /// 0: never expires.
    pub expires_unix_s: u64,
}

impl Entry {
    /// An entry; the reason is cut to [`REASON_BYTES_MAX`] and stripped of control characters.
    pub fn new(reason: &str, source: Source, added_unix_s: u64, expires_unix_s: u64) -> Entry {
        let cleaned: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
        let mut end = cleaned.len().min(REASON_BYTES_MAX);
        while !cleaned.is_char_boundary(end) {
            end -= 1;
        }
        Entry {
            reason: cleaned[..end].trim().into(),
            source,
            added_unix_s,
            expires_unix_s,
        }
    }

    pub fn is_expired(&self, now_unix_s: u64) -> bool {
        self.expires_unix_s != 0 && self.expires_unix_s <= now_unix_s
    }
}

/// A field that cannot be an entry's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryError {
    Address(String),
    Scope(String),
    Source(String),
    Number(String),
}

impl fmt::Display for EntryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EntryError::Address(a) => write!(
                f,
                "{a:?} is not an address (local@domain, at most {ADDRESS_BYTES_MAX} bytes)"
            ),
            EntryError::Scope(s) => write!(f, "{s:?} is not a scope (global, or a sender domain)"),
            EntryError::Source(s) => write!(f, "{s:?} is not a source (hard-bounce, complaint, operator, import)"),
            EntryError::Number(n) => write!(f, "{n:?} is not a time in seconds since 1970"),
        }
    }
}

impl std::error::Error for EntryError {}

/// An address as the list keys it: trimmed of angle brackets and spaces, lowercase (receivers
/// treat local parts case-insensitively in practice; a suppression must not be dodged by case).
pub fn normalize_address(address: &str) -> Result<String, EntryError> {
    let a = address.trim().trim_start_matches('<').trim_end_matches('>').trim();
    let bad = || EntryError::Address(address.chars().take(60).collect());
    let (local, domain) = a.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || domain.is_empty()
        || a.len() > ADDRESS_BYTES_MAX
        || a.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b',')
    {
        return Err(bad());
    }
    Ok(a.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalized_and_checked() {
        assert_eq!(normalize_address(" <Bob@Example.COM> ").unwrap(), "bob@example.com");
        for bad in ["", "bob", "@example.com", "bob@", "a b@example.com", "a,b@example.com"] {
            assert!(normalize_address(bad).is_err(), "{bad:?}");
        }
        assert!(normalize_address(&format!("{}@example.com", "a".repeat(320))).is_err());
    }

    #[test]
    fn scopes_and_sources_parse() {
        assert_eq!(Scope::parse("").unwrap(), Scope::Global);
        assert_eq!(Scope::parse("global").unwrap(), Scope::Global);
        assert_eq!(Scope::parse("News.Example.com").unwrap().as_str(), "news.example.com");
        assert!(Scope::parse("not a domain").is_err());
        for s in Source::ALL {
            assert_eq!(s.as_str().parse::<Source>(), Ok(s));
        }
        assert!("spam".parse::<Source>().is_err());
    }

    #[test]
    fn reasons_are_cleaned_and_bounded() {
        let e = Entry::new("550 5.1.1\r\nno such user", Source::HardBounce, 1, 0);
        assert_eq!(&*e.reason, "550 5.1.1  no such user");
        let long = "é".repeat(REASON_BYTES_MAX);
        assert!(Entry::new(&long, Source::Operator, 1, 0).reason.len() <= REASON_BYTES_MAX);
        assert!(!e.is_expired(u64::MAX));
        assert!(Entry::new("x", Source::Operator, 1, 10).is_expired(10));
    }
}
