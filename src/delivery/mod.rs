//! Delivery: routing, the outbound SMTP client, and (next) the per-shard queue runner.

pub mod client;
