//! Gannet: a shard-per-core mail transfer agent.
//!
//! Layout, top-down:
//! - [`config`]: the TOML configuration, its embedded default and its validation.
//! - [`smtp`]: the sans-IO protocol core (command parser, DATA decoder, server session).
//! - [`policy`]: the relay decision and network lists (pure functions); [`rate`]: per-client
//!   rate limits; [`auth`]: the password file and the failure throttle of SMTP AUTH.
//! - [`spool`]: the per-shard segment log (record codec, recovery, appender with group commit).
//! - [`queue`]: the in-memory index of what each shard has spooled.
//! - [`server`]: the glommio shell (executors, listeners, connections, shutdown).

pub mod admin;
pub mod auth;
pub mod authentication;
pub mod config;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod events;
pub mod logging;
pub mod metrics;

pub mod rate;
pub mod server;
pub mod spool;
pub mod suppression;
pub mod transport;
pub mod units;
pub mod verp;

// The sans-IO crates, under the names the shell and its tests have always used.
pub use gannet_sched::queue;
pub use gannet_smtp as smtp;
pub use gannet_smtp::{dsn, policy};
