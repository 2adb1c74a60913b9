//! The calling shard's metrics: a thread-local [`ShardMetrics`] that only its own shard thread
//! touches (a shard is one thread), so counting is a plain add with no atomics and no sharing.
//! The admin listener asks each shard for a copy (`server::admin`), merges them and encodes.
//! Threads that are not shards (start-up, the admin thread) count into a copy nobody reads.

use std::cell::RefCell;

use gannet_metrics::{MetricsLimits, ShardMetrics};

thread_local! {
    static METRICS: RefCell<Option<ShardMetrics>> = const { RefCell::new(None) };
}

/// Makes this thread's metrics, sized for `listeners` listeners; a shard calls it once.
pub fn install(listeners: usize, limits: MetricsLimits) {
    METRICS.with(|m| *m.borrow_mut() = Some(ShardMetrics::new(listeners, limits)));
}

/// Runs `f` on this thread's metrics (no-op before [`install`]). `f` must not call `with`.
pub fn with(f: impl FnOnce(&mut ShardMetrics)) {
    METRICS.with(|m| {
        if let Ok(mut m) = m.try_borrow_mut() {
            if let Some(m) = m.as_mut() {
                f(m);
            }
        }
    });
}

/// A copy of this thread's metrics, for a scrape.
pub fn snapshot() -> Option<ShardMetrics> {
    METRICS.with(|m| m.borrow().clone())
}

/// The label of a TLS protocol version, from a fixed vocabulary.
pub fn tls_version_label(version: &str) -> &'static str {
    match version {
        "TLSv1.3" => "TLSv1.3",
        "TLSv1.2" => "TLSv1.2",
        _ => "other",
    }
}
