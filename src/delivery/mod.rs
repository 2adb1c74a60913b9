//! Delivery: the outbound SMTP client (sans-IO) and the per-shard queue runner.

pub mod client;
pub mod lanes;
pub mod runner;
pub mod tls;
