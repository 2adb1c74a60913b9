//! DKIM signing at accept time (RFC 6376 5): between a message's end and its commit, so that the
//! signatures are stored with it and the `250` covers them.
//!
//! Which mail is signed: mail from authenticated users and from trusted networks, the mail this
//! host sends out. Mail from strangers (MX traffic) is never signed, even when its From: names a
//! domain we have a key for: signing it would vouch for a forgery.
//!
//! Where: the key operation (0.4 ms for RSA-2048 here) and mail-auth's canonicalization run on
//! the shard's blocking thread, pinned to the shard's core, never on its event loop; the event
//! loop only copies the content once (glommio's DMA buffers cannot leave their thread). At most
//! [`SIGNING_IN_FLIGHT_MAX`] messages a shard are being signed at once; more wait their turn,
//! and each copy is charged to the shard's message memory budget (`spool.memory_max`).

use std::time::Instant;

use gannet_smtp::session::{Session, SinkFull};
use tracing::{debug, error};

use super::shard::Shard;
use crate::config::dkim::DkimAlgorithm;
use crate::metrics;
use crate::spool::buffer::MessageBuffer;

/// Messages one shard signs at once at most.
pub const SIGNING_IN_FLIGHT_MAX: u64 = 64;

fn algorithm_label(a: DkimAlgorithm) -> &'static str {
    match a {
        DkimAlgorithm::RsaSha256 => "rsa-sha256",
        DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
    }
}

impl Shard {
    /// Signs the message in `sink` if it is outgoing mail and a `[[dkim]]` entry applies,
    /// storing the signatures with it. `Err` only when the memory budget cannot hold the copy
    /// for the signer (the session answers 452 4.3.1, as for a message too large for memory).
    /// A signature that fails is logged and counted and the message goes unsigned.
    pub(super) async fn sign(&self, session: &Session, sink: &mut MessageBuffer) -> Result<(), SinkFull> {
        let signers = self.reloadable.signers();
        if signers.is_empty() || !(session.user().is_some() || self.is_trusted(session.client_ip())) {
            return Ok(());
        }
        let started = Instant::now();
        let Ok(_turn) = self.signing_turns.acquire_permit(1).await else {
            return Ok(());
        };
        let _charge = sink.budget().clone().try_charge(sink.content_bytes_so_far())?;
        let content = sink.content_copy();
        let signed = glommio::executor().spawn_blocking(move || signers.sign(&content)).await;
        metrics::with(|m| {
            for (_, algorithm, result) in &signed.outcomes {
                let label = if result.is_ok() { "signed" } else { "error" };
                m.dkim_signatures.add((algorithm_label(*algorithm), label), 1);
            }
            if !signed.outcomes.is_empty() {
                m.dkim_sign.observe(started.elapsed().as_secs_f64());
            }
        });
        for (domain, algorithm, result) in &signed.outcomes {
            match result {
                Ok(()) => {
                    debug!(shard = self.index, domain = %domain, algorithm = algorithm_label(*algorithm), "DKIM signed")
                }
                Err(e) => {
                    error!(shard = self.index, domain = %domain, "DKIM signing failed, the message goes unsigned by this key: {e:?}")
                }
            }
        }
        if signed.headers.is_empty() {
            return Ok(());
        }
        sink.append_prepended(&signed.headers)
    }
}
