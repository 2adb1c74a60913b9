//! `[tls]`: inbound TLS, its certificates and the handshake timeout.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use crate::units::Span;

/// Inbound TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// Certificates, chosen by SNI; the first is the default. None: a self-signed one is made
    /// at first start and kept in the spool directory.
    #[serde(rename = "certificate", skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<TlsCertificate>,
    /// How long a TLS handshake (STARTTLS or implicit) may take.
    pub handshake_timeout: Span,
}

impl Default for Tls {
    fn default() -> Tls {
        Tls {
            certificates: Vec::new(),
            handshake_timeout: Span(Duration::from_secs(10)),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertificate {
    /// PEM certificate chain, leaf first.
    pub chain: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Checks `[tls]` and that each certificate's files exist.
pub(super) fn validate(t: &Tls, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if t.handshake_timeout.0.is_zero() {
        return Err(fail(
            "tls",
            0,
            "handshake_timeout",
            "must be more than zero, such as \"10s\"".into(),
        ));
    }
    for (i, c) in t.certificates.iter().enumerate() {
        for (key, path) in [("chain", &c.chain), ("key", &c.key)] {
            if !path.is_file() {
                return Err(fail(
                    "tls.certificate",
                    i,
                    key,
                    format!("{} is not a readable file; give the path of a PEM file", path.display()),
                ));
            }
        }
    }
    Ok(())
}
