//! DKIM for outgoing mail (RFC 6376; ed25519-sha256 by RFC 8463; key sizes by RFC 8301).
//!
//! - [`key`]: private keys from PEM files and the private-key operation (aws-lc-rs).
//! - [`sign`]: which `[[dkim]]` entries sign a message, and the signing itself (mail-auth's
//!   canonicalization and header list), as a plain function the shard runs off its event loop.
//! - [`keygen`]: `gannet dkim keygen`, a new key and the DNS record to publish.
//!
//! A message is signed once, when it is accepted and before the `250`: the `DKIM-Signature`
//! fields are stored with it in the spool (docs/spool.md, envelope version 2), so that every
//! delivery attempt, retry and restart sends the same bytes.

pub mod key;
pub mod keygen;
pub mod seal;
pub mod sign;

pub use key::PrivateKey;
pub use sign::{Signed, Signers};
