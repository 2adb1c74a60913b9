//! SIGTERM and SIGINT: the first asks for a graceful shutdown, the second exits at once.
//! SIGHUP reloads the TLS certificates, the password file and the DKIM keys. SIGUSR1 (`gannet queue flush`)
//! makes every shard retry its deferred mail now.
//!
//! Exiting at once is safe for the spool: only durable messages were acknowledged, and recovery
//! handles anything half-written.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::sync::Arc;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

use super::reloadable::Reloadable;

static SHUTDOWN_REQUESTED: AtomicBool = AtomicBool::new(false);
/// Counts SIGUSR1s: a shard that sees it change retries its deferred mail.
static FLUSH_GENERATION: AtomicU64 = AtomicU64::new(0);

/// How many queue flushes were asked for so far.
pub fn flush_generation() -> u64 {
    FLUSH_GENERATION.load(Ordering::Acquire)
}

/// Exit status after a second signal.
const EXIT_STATUS_FORCED: i32 = 130;

pub fn shutdown_requested() -> bool {
    SHUTDOWN_REQUESTED.load(Ordering::Acquire)
}

pub fn request_shutdown() {
    SHUTDOWN_REQUESTED.store(true, Ordering::Release);
}

/// Starts the thread that turns signals into the shutdown flag and reloads.
pub fn install(reloadable: Arc<Reloadable>) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for signal in signals.forever() {
            if signal == SIGHUP {
                tracing::info!("SIGHUP: reloading TLS certificates, the password file and the DKIM keys");
                super::notify::reloading();
                reloadable.reload();
                super::notify::reloaded();
                continue;
            }
            if signal == SIGUSR1 {
                tracing::info!("SIGUSR1: retrying all deferred mail now");
                FLUSH_GENERATION.fetch_add(1, Ordering::AcqRel);
                continue;
            }
            if shutdown_requested() {
                eprintln!("gannet: second signal ({signal}), exiting now; the spool is safe");
                std::process::exit(EXIT_STATUS_FORCED);
            }
            tracing::info!(
                "signal {signal}: shutting down; transactions in flight may finish (a second signal exits at once)"
            );
            super::notify::stopping();
            request_shutdown();
        }
    })?;
    Ok(())
}
