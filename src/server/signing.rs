//! DKIM signing at accept time (RFC 6376 5): between a message's end and its commit, so that the
//! signatures are stored with it and the `250` covers them.
//!
//! Which mail is signed: mail from authenticated users and from trusted networks, the mail this
//! host sends out. Mail from strangers (MX traffic) is never signed, even when its From: names a
//! domain we have a key for: signing it would vouch for a forgery.
//!
//! Where: the key operation (0.4 ms for RSA-2048 here) and mail-auth's canonicalization run on
//! the shard's blocking thread, pinned to the shard's core, never on its event loop; the event
//! loop only copies the content once (glommio's DMA buffers cannot leave their thread). The
//! shard's signer task hands every message waiting at that moment to the blocking thread in one
//! batch, so a busy shard pays one hand-off for many messages. At most
//! [`SIGNING_IN_FLIGHT_MAX`] messages a shard are being signed at once; more wait their turn,
//! and each copy is charged to the shard's message memory budget (`spool.memory_max`).

use std::sync::Arc;
use std::time::Instant;

use gannet_smtp::session::{Session, SinkFull};
use glommio::channels::local_channel::{self, LocalSender};
use tracing::{debug, error};

use super::reloadable::Reloadable;
use super::shard::Shard;
use crate::dkim::Signed;
use crate::metrics;
use crate::spool::buffer::MessageBuffer;

/// Messages one shard signs at once at most.
pub const SIGNING_IN_FLIGHT_MAX: u64 = 64;

/// Most messages one hand-off to the blocking thread signs.
pub const SIGNING_BATCH_MAX: usize = 32;

/// One message waiting to be signed, and where its signatures go.
pub(super) struct Job {
    content: Vec<u8>,
    done: LocalSender<Signed>,
}

/// Starts the shard's signer: a task that takes every message waiting to be signed (up to
/// [`SIGNING_BATCH_MAX`]) and signs them in one hand-off to the blocking thread, so that under
/// load one wake-up serves many messages (each hand-off costs system time: docs/benchmarks.md).
/// Returns the queue to put jobs on (bounded by [`SIGNING_IN_FLIGHT_MAX`]).
pub(super) fn start_signer(reloadable: Arc<Reloadable>) -> LocalSender<Job> {
    let (tx, rx) = local_channel::new_bounded(SIGNING_IN_FLIGHT_MAX as usize);
    glommio::spawn_local(async move {
        while let Some(first) = rx.recv().await {
            let mut jobs: Vec<Job> = vec![first];
            while jobs.len() < SIGNING_BATCH_MAX {
                match futures_lite::future::poll_once(rx.recv()).await {
                    Some(Some(job)) => jobs.push(job),
                    _ => break,
                }
            }
            let signers = reloadable.signers();
            let (contents, replies): (Vec<Vec<u8>>, Vec<LocalSender<Signed>>) =
                jobs.into_iter().map(|j| (j.content, j.done)).unzip();
            let signed: Vec<Signed> = glommio::executor()
                .spawn_blocking(move || contents.iter().map(|c| signers.sign(c)).collect())
                .await;
            for (reply, signed) in replies.into_iter().zip(signed) {
                // The session may be gone (its client hung up): nothing waits for it then.
                let _ = reply.try_send(signed);
            }
        }
    })
    .detach();
    tx
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
        let (done, signed) = local_channel::new_bounded(1);
        let job = Job {
            content: sink.content_copy(),
            done,
        };
        if self.signing_queue.send(job).await.is_err() {
            return Ok(());
        }
        let Some(signed) = signed.recv().await else {
            return Ok(());
        };
        self.account(&signed, started);
        if signed.headers.is_empty() {
            return Ok(());
        }
        sink.append_prepended(&signed.headers)
    }

    fn account(&self, signed: &Signed, started: Instant) {
        metrics::with(|m| {
            for (_, algorithm, result) in &signed.outcomes {
                let label = if result.is_ok() { "signed" } else { "error" };
                m.dkim_signatures.add((algorithm.as_str(), label), 1);
            }
            if !signed.outcomes.is_empty() {
                m.dkim_sign.observe(started.elapsed().as_secs_f64());
            }
        });
        for (domain, algorithm, result) in &signed.outcomes {
            match result {
                Ok(()) => {
                    debug!(shard = self.index, domain = %domain, algorithm = algorithm.as_str(), "DKIM signed")
                }
                Err(e) => {
                    error!(shard = self.index, domain = %domain, "DKIM signing failed, the message goes unsigned by this key: {e:?}")
                }
            }
        }
    }
}
