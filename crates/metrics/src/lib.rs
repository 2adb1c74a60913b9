//! Gannet's metrics, sans-IO: what each shard counts ([`ShardMetrics`]), how the shards'
//! copies merge, and their Prometheus text exposition ([`encode`]). No atomics and no runtime:
//! a shard owns its numbers alone, and the admin listener asks each shard for a copy per scrape.
//!
//! Every label set is bounded: label values come from the code's own vocabulary, from the
//! configuration (listeners), or from outside through a limit ([`BoundedCounts`],
//! [`Destinations`]) past which they are counted as `other`.

pub mod counts;
pub mod destinations;
pub mod encode;
pub mod histogram;
pub mod shard;

pub use counts::{BoundedCounts, Counts, OTHER};
pub use destinations::{Destinations, Slot};
pub use encode::{encode, EventCounts, Exposition, SuppressionCounts};
pub use histogram::Histogram;
pub use shard::{ListenerMetrics, MetricsLimits, QueueGauges, ShardMetrics, QUEUE_STATES};
