//! Which keys sign a message, and signing it (RFC 6376 5: the signer side).
//!
//! A message is signed by every `[[dkim]]` entry whose domain is its From: header's domain
//! (RFC 5322 3.6.2, the author domain DMARC aligns with), or, when none is, by the entries marked
//! `fallback`. Canonicalization, the body hash and the header list are mail-auth's; the
//! private-key operation is [`PrivateKey::sign`] (aws-lc-rs).
//!
//! [`Signers::sign`] is a plain function over the message's bytes: the shard runs it on its
//! blocking thread (`crate::server::shard`), so a signature never stalls the event loop.

use std::path::PathBuf;
use std::sync::Arc;

use mail_auth::common::crypto::{Algorithm, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization as MaCanonicalization, DkimSigner, Done};

use super::key::{KeyError, PrivateKey};
use crate::config::dkim::{Canonicalization, Dkim, DkimAlgorithm};

/// Header bytes read to find From: at most (RFC 5322 puts no limit; Gannet's line and header
/// limits keep real ones far below).
pub const FROM_SEARCH_BYTES_MAX: usize = 256 * 1024;

/// A key as mail-auth's signer sees it.
pub(crate) struct KeyRef(pub(crate) Arc<PrivateKey>);

impl SigningKey for KeyRef {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        let mut data = Vec::with_capacity(1024);
        input.write(&mut data);
        self.0
            .sign(&data)
            .map_err(|e| mail_auth::Error::Crypto(mail_auth::common::crypto::CryptoError::Library(e.to_string())))
    }

    fn algorithm(&self) -> Algorithm {
        match self.0.algorithm() {
            DkimAlgorithm::RsaSha256 => Algorithm::RsaSha256,
            DkimAlgorithm::Ed25519Sha256 => Algorithm::Ed25519Sha256,
        }
    }
}

/// One `[[dkim]]` entry, ready to sign.
pub struct Signer {
    /// Lower case.
    pub domain: String,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    pub fallback: bool,
    inner: DkimSigner<KeyRef, Done>,
}

/// Every configured signer. Immutable; SIGHUP builds a new set and swaps it in whole.
#[derive(Default)]
pub struct Signers {
    signers: Vec<Signer>,
}

/// A `[[dkim]]` entry whose key cannot be used.
#[derive(Debug)]
pub struct LoadError {
    pub index: usize,
    pub key: PathBuf,
    pub error: KeyError,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[[dkim]] #{} key {}: {}",
            self.index + 1,
            self.key.display(),
            self.error
        )
    }
}

/// Why one signature could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignError {
    /// mail-auth refused (no header to sign) or the key operation failed.
    Library(String),
}

fn canonicalization(c: Canonicalization) -> MaCanonicalization {
    match c {
        Canonicalization::Relaxed => MaCanonicalization::Relaxed,
        Canonicalization::Simple => MaCanonicalization::Simple,
    }
}

impl Signers {
    /// Reads every entry's key. The first unusable key is the error (the old set stays in use
    /// on a reload).
    pub fn load(entries: &[Dkim]) -> Result<Signers, LoadError> {
        let mut signers = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            let key = PrivateKey::load(&entry.key, entry.algorithm).map_err(|error| LoadError {
                index,
                key: entry.key.clone(),
                error,
            })?;
            let (header_c, body_c) = entry.canonicalizations().expect("validated with the configuration");
            let algorithm = key.algorithm();
            let mut inner = DkimSigner::from_key(KeyRef(Arc::new(key)))
                .domain(entry.domain.to_ascii_lowercase())
                .selector(entry.selector.clone())
                .headers(entry.headers.iter().map(String::as_str))
                .header_canonicalization(canonicalization(header_c))
                .body_canonicalization(canonicalization(body_c));
            if let Some(expiry) = entry.expiry {
                inner = inner.expiration(expiry.0.as_secs());
            }
            signers.push(Signer {
                domain: entry.domain.to_ascii_lowercase(),
                selector: entry.selector.clone(),
                algorithm,
                fallback: entry.fallback,
                inner,
            });
        }
        Ok(Signers { signers })
    }

    pub fn is_empty(&self) -> bool {
        self.signers.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Signer> {
        self.signers.iter()
    }

    /// The signers for a message whose From: domain is `domain` (any case).
    pub fn for_domain<'a>(&'a self, domain: &'a str) -> impl Iterator<Item = &'a Signer> + 'a {
        let own = self.signers.iter().any(|s| s.domain.eq_ignore_ascii_case(domain));
        self.signers.iter().filter(move |s| {
            if own {
                s.domain.eq_ignore_ascii_case(domain)
            } else {
                s.fallback
            }
        })
    }

    /// Signs `message` (the content as it will be relayed) with every signer that applies.
    /// Returns the `DKIM-Signature` header fields to put in front of it, each ending in CRLF,
    /// and per signer the outcome (for logs and metrics); nothing for a message without a
    /// From: address.
    pub fn sign(&self, message: &[u8]) -> Signed {
        let mut signed = Signed::default();
        let Some(domain) = from_domain(message) else {
            return signed;
        };
        for signer in self.for_domain(&domain) {
            match signer.inner.sign(message) {
                Ok(signature) => {
                    signed.headers.extend_from_slice(signature.to_header().as_bytes());
                    signed.outcomes.push((signer.domain.clone(), signer.algorithm, Ok(())));
                }
                Err(e) => {
                    let error = SignError::Library(e.to_string());
                    signed
                        .outcomes
                        .push((signer.domain.clone(), signer.algorithm, Err(error)));
                }
            }
        }
        signed
    }
}

/// What [`Signers::sign`] made.
#[derive(Debug, Default)]
pub struct Signed {
    /// `DKIM-Signature:` fields, CRLF-terminated, in the order of the configuration.
    pub headers: Vec<u8>,
    pub outcomes: Vec<(String, DkimAlgorithm, Result<(), SignError>)>,
}

/// The domain of the first address in the message's From: header, lower case.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let end = memchr::memmem::find(message, b"\r\n\r\n")
        .map_or(message.len(), |i| i + 4)
        .min(FROM_SEARCH_BYTES_MAX);
    let parsed = mail_parser::MessageParser::new().parse_headers(&message[..end])?;
    let address = parsed.from()?.first()?.address()?;
    let (_, domain) = address.rsplit_once('@')?;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    (!domain.is_empty()).then_some(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_domain_reads_the_author_not_the_envelope() {
        let m = b"Received: from x\r\nFrom: \"Ann\" <Ann@Example.COM>\r\nTo: b@c.test\r\n\r\nbody\r\n";
        assert_eq!(from_domain(m).as_deref(), Some("example.com"));
        assert_eq!(from_domain(b"To: b@c.test\r\n\r\nbody").as_deref(), None);
        assert_eq!(from_domain(b"From: undisclosed\r\n\r\n").as_deref(), None);
        // Folded, and a group with no address.
        assert_eq!(from_domain(b"From:\r\n a@b.test\r\n\r\n").as_deref(), Some("b.test"));
    }
}
