//! Delivery: the per-shard queue runner over the sans-IO outbound client (`gannet_smtp::client`).

pub use gannet_smtp::client;
pub mod lanes;
pub mod runner;
pub mod tls;
