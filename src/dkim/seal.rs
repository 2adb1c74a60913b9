//! ARC sealing (RFC 8617 5.1): the ARC-Seal, ARC-Message-Signature and
//! ARC-Authentication-Results set a forwarder adds to a message it verified, so that the next
//! receiver can trust its verdicts after its changes break the sender's DKIM or SPF. mail-auth
//! builds and signs the set; the key is one of ours (`super::key`), signed with aws-lc-rs.

use std::sync::Arc;

use mail_auth::arc::ArcSealer;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::Done;
use mail_auth::{ArcOutput, AuthenticatedMessage, AuthenticationResults};

use super::key::{KeyError, PrivateKey};
use super::sign::KeyRef;
use crate::config::mail_authentication::ArcSeal;

/// The header fields the ARC-Message-Signature covers (those a forwarder does not change).
const SEALED_HEADERS: [&str; 8] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
];

/// The configured sealer, ready to sign.
pub struct Sealer {
    inner: ArcSealer<KeyRef, Done>,
    pub domain: String,
}

impl Sealer {
    pub fn load(config: &ArcSeal) -> Result<Sealer, String> {
        let key = PrivateKey::load(&config.key, None)
            .map_err(|e: KeyError| format!("mail_authentication.arc_seal key {}: {e}", config.key.display()))?;
        let inner = ArcSealer::from_key(KeyRef(Arc::new(key)))
            .domain(config.domain.to_ascii_lowercase())
            .selector(config.selector.clone())
            .headers(SEALED_HEADERS);
        Ok(Sealer {
            inner,
            domain: config.domain.to_ascii_lowercase(),
        })
    }

    /// The ARC set for `message` (CRLF-terminated header fields), or why it cannot be sealed
    /// (a chain that already failed is not sealed again, RFC 8617 5.1.2).
    pub fn seal(
        &self,
        message: &AuthenticatedMessage<'_>,
        results: &AuthenticationResults<'_>,
        arc: &ArcOutput<'_>,
    ) -> Result<String, String> {
        self.inner
            .seal(message, results, arc)
            .map(|set| set.to_header())
            .map_err(|e| e.to_string())
    }
}
