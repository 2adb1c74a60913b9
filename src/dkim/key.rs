//! DKIM private keys: reading them from PEM files and the private-key operation.
//!
//! Standards: rsa-sha256 (RFC 6376 3.3.1) with keys of 2048 bits or more (RFC 8301 allows 1024
//! for verifiers; Gannet refuses to sign with fewer than 2048), ed25519-sha256 (RFC 8463: the
//! Ed25519 signature is over the SHA-256 hash of the data). Backend: aws-lc-rs, the fastest safe
//! candidate measured here (`benches/dkim.rs`: RSA-2048 1.8x and Ed25519 2.3x ring's rate); the
//! `rsa` crate is excluded for its timing side channel (RUSTSEC-2023-0071).

use std::fmt;
use std::path::Path;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _, RsaKeyPair, RSA_PKCS1_SHA256};

use crate::config::dkim::DkimAlgorithm;

/// Key files larger than this are not keys.
pub const KEY_FILE_BYTES_MAX: u64 = 64 * 1024;
/// The smallest RSA modulus Gannet signs with.
pub const RSA_BITS_MIN: usize = 2048;

/// The DER of rsaEncryption's object identifier (1.2.840.113549.1.1.1, RFC 8017 A.1), which
/// names an RSA key inside PKCS#8.
const RSA_ENCRYPTION_OID: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// A private key that signs DKIM signatures. Immutable and shared by every shard's signer.
pub enum PrivateKey {
    Rsa(RsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// Why a key file cannot be used. Each says what to do.
#[derive(Debug)]
pub enum KeyError {
    Read(std::io::Error),
    TooLarge,
    NotPem,
    /// PEM, but no `PRIVATE KEY` or `RSA PRIVATE KEY` block.
    NoPrivateKey,
    /// A private-key block that neither RSA nor Ed25519 parsing accepts.
    Unreadable,
    RsaTooShort {
        bits: usize,
    },
    /// An RSA key aws-lc-rs refuses: fewer than 2048 bits (it will not load those) or damaged.
    RsaRefused,
    AlgorithmMismatch {
        configured: DkimAlgorithm,
        found: DkimAlgorithm,
    },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Read(e) => write!(f, "cannot read it: {e}"),
            KeyError::TooLarge => write!(f, "larger than {KEY_FILE_BYTES_MAX} bytes; it is not a key"),
            KeyError::NotPem => write!(f, "not PEM; write the key as `-----BEGIN PRIVATE KEY-----` (PKCS#8) or `-----BEGIN RSA PRIVATE KEY-----`, or make one with `gannet dkim keygen`"),
            KeyError::NoPrivateKey => write!(f, "holds no PRIVATE KEY block; make one with `gannet dkim keygen`"),
            KeyError::Unreadable => write!(f, "the private key is neither RSA nor Ed25519 (PKCS#8 or PKCS#1); make one with `gannet dkim keygen`"),
            KeyError::RsaRefused => write!(f, "an RSA key that cannot be used: DKIM keys must have {RSA_BITS_MIN} bits at least (RFC 8301), and this one has fewer or is damaged; make one with `gannet dkim keygen`"),
            KeyError::RsaTooShort { bits } => write!(f, "an RSA key of {bits} bits; DKIM keys must have {RSA_BITS_MIN} bits at least (RFC 8301); make one with `gannet dkim keygen`"),
            KeyError::AlgorithmMismatch { configured, found } => write!(f, "algorithm is {configured:?} but the key is {found:?}; remove `algorithm` or give the right key"),
        }
    }
}

impl PrivateKey {
    /// Reads a PEM key file: PKCS#8 (RSA or Ed25519) or PKCS#1 RSA.
    pub fn load(path: &Path, algorithm: Option<DkimAlgorithm>) -> Result<PrivateKey, KeyError> {
        let size = std::fs::metadata(path).map_err(KeyError::Read)?.len();
        if size > KEY_FILE_BYTES_MAX {
            return Err(KeyError::TooLarge);
        }
        let text = std::fs::read(path).map_err(KeyError::Read)?;
        let key = PrivateKey::from_pem(&text)?;
        match algorithm {
            Some(configured) if configured != key.algorithm() => Err(KeyError::AlgorithmMismatch {
                configured,
                found: key.algorithm(),
            }),
            _ => Ok(key),
        }
    }

    pub fn from_pem(text: &[u8]) -> Result<PrivateKey, KeyError> {
        let blocks = pem::parse_many(text).map_err(|_| KeyError::NotPem)?;
        if blocks.is_empty() {
            return Err(KeyError::NotPem);
        }
        let block = blocks
            .iter()
            .find(|b| b.tag() == "PRIVATE KEY" || b.tag() == "RSA PRIVATE KEY")
            .ok_or(KeyError::NoPrivateKey)?;
        let der = block.contents();
        let key = if block.tag() == "RSA PRIVATE KEY" {
            RsaKeyPair::from_der(der)
                .map(PrivateKey::Rsa)
                .map_err(|_| KeyError::RsaRefused)?
        } else if let Ok(rsa) = RsaKeyPair::from_pkcs8(der) {
            PrivateKey::Rsa(rsa)
        } else if memchr::memmem::find(der, RSA_ENCRYPTION_OID).is_some() {
            return Err(KeyError::RsaRefused);
        } else {
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                .map(PrivateKey::Ed25519)
                .map_err(|_| KeyError::Unreadable)?
        };
        if let PrivateKey::Rsa(rsa) = &key {
            let bits = rsa.public_modulus_len() * 8;
            if bits < RSA_BITS_MIN {
                return Err(KeyError::RsaTooShort { bits });
            }
        }
        Ok(key)
    }

    pub fn algorithm(&self) -> DkimAlgorithm {
        match self {
            PrivateKey::Rsa(_) => DkimAlgorithm::RsaSha256,
            PrivateKey::Ed25519(_) => DkimAlgorithm::Ed25519Sha256,
        }
    }

    /// The private-key operation over the bytes mail-auth asked to be signed (the canonicalized
    /// signed headers and the signature header without `b=`). Costs 0.4 ms of CPU for RSA-2048
    /// and 13 us for Ed25519 here: it runs on the shard's blocking thread, never its event loop.
    pub fn sign(&self, data: &[u8]) -> Result<Vec<u8>, aws_lc_rs::error::Unspecified> {
        match self {
            PrivateKey::Rsa(rsa) => {
                let mut signature = vec![0u8; rsa.public_modulus_len()];
                rsa.sign(
                    &RSA_PKCS1_SHA256,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    data,
                    &mut signature,
                )?;
                Ok(signature)
            }
            PrivateKey::Ed25519(ed) => {
                let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
                Ok(ed.sign(hash.as_ref()).as_ref().to_vec())
            }
        }
    }

    /// The public half as DKIM publishes it in `p=` (RFC 6376 3.6.1, RFC 8463 4.2): for RSA the
    /// DER SubjectPublicKeyInfo, for Ed25519 the 32 raw bytes.
    pub fn public_key_record_bytes(&self) -> Vec<u8> {
        use aws_lc_rs::encoding::{AsDer, PublicKeyX509Der};
        match self {
            PrivateKey::Rsa(rsa) => {
                let spki: PublicKeyX509Der = rsa.public_key().as_der().expect("an RSA public key encodes");
                spki.as_ref().to_vec()
            }
            PrivateKey::Ed25519(ed) => ed.public_key().as_ref().to_vec(),
        }
    }
}
