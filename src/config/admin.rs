//! `[admin]`: the HTTP listener for metrics and queue control (`server::admin`), its bearer
//! token, and its limits. `[log]`: the log's format.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use crate::units::{ByteSize, Span};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Serve the admin API at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Where it listens. Anything but a loopback address needs `token_file`.
    #[serde(default = "default_address")]
    pub address: SocketAddr,
    /// A file whose first line is the bearer token every request must carry
    /// (`Authorization: Bearer <token>`); without it, requests are not checked (loopback only).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Admin connections open at once; more wait in the listen backlog.
    #[serde(default = "default_connections_max")]
    pub connections_max: usize,
    /// Largest request (headers and body) accepted; larger gets 413.
    #[serde(default = "default_request_size_max")]
    pub request_size_max: ByteSize,
    /// A connection's whole life (requests and replies) must fit in this.
    #[serde(default = "default_connection_timeout")]
    pub connection_timeout: Span,
    /// Receiving sites with a `destination` label of their own in the metrics (per shard);
    /// the rest are counted as `other`.
    #[serde(default = "default_metrics_destinations_max")]
    pub metrics_destinations_max: usize,
    /// Delivery attempts a site needs before it gets a label of its own.
    #[serde(default = "default_metrics_destination_attempts_min")]
    pub metrics_destination_attempts_min: u64,
    /// Most messages one `GET /api/queue` page returns.
    #[serde(default = "default_page_size_max")]
    pub page_size_max: usize,
}

fn default_true() -> bool {
    true
}
fn default_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 2580))
}
fn default_connections_max() -> usize {
    16
}
fn default_request_size_max() -> ByteSize {
    ByteSize(64 * 1024)
}
fn default_connection_timeout() -> Span {
    Span(Duration::from_secs(30))
}
fn default_metrics_destinations_max() -> usize {
    50
}
fn default_metrics_destination_attempts_min() -> u64 {
    10
}
fn default_page_size_max() -> usize {
    1000
}

impl Default for Admin {
    fn default() -> Admin {
        Admin {
            enabled: true,
            address: default_address(),
            token_file: None,
            connections_max: default_connections_max(),
            request_size_max: default_request_size_max(),
            connection_timeout: default_connection_timeout(),
            metrics_destinations_max: default_metrics_destinations_max(),
            metrics_destination_attempts_min: default_metrics_destination_attempts_min(),
            page_size_max: default_page_size_max(),
        }
    }
}

/// Checks `[admin]`.
pub(super) fn validate(admin: &Admin, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if admin.enabled && !admin.address.ip().is_loopback() && admin.token_file.is_none() {
        return Err(fail(
            "admin",
            0,
            "address",
            format!(
                "{} is not a loopback address, so the admin API needs admin.token_file (a file holding a bearer token); set it, or listen on 127.0.0.1",
                admin.address
            ),
        ));
    }
    if admin.connections_max == 0 || admin.connections_max > 1024 {
        return Err(fail("admin", 0, "connections_max", "must be between 1 and 1024".into()));
    }
    if admin.request_size_max.0 < 1024 || admin.request_size_max.0 > 16 * 1024 * 1024 {
        return Err(fail(
            "admin",
            0,
            "request_size_max",
            "must be between \"1KiB\" and \"16MiB\"".into(),
        ));
    }
    if admin.connection_timeout.0.is_zero() {
        return Err(fail(
            "admin",
            0,
            "connection_timeout",
            "must be more than zero, such as \"30s\"".into(),
        ));
    }
    if admin.metrics_destinations_max > 1000 {
        return Err(fail(
            "admin",
            0,
            "metrics_destinations_max",
            "must be at most 1000 (each is a set of time series)".into(),
        ));
    }
    if admin.page_size_max == 0 || admin.page_size_max > 100_000 {
        return Err(fail("admin", 0, "page_size_max", "must be between 1 and 100000".into()));
    }
    Ok(())
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable text (tracing's default format).
    #[default]
    Text,
    /// `key=value` pairs, one event per line.
    Logfmt,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default)]
    pub format: LogFormat,
    /// What to log: a level ("info", "debug"...) or tracing's filter directives
    /// ("info,gannet::delivery=debug"). The environment variable GANNET_LOG overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_log_level() -> String {
    "info".into()
}

impl Default for Log {
    fn default() -> Log {
        Log {
            format: LogFormat::default(),
            level: default_log_level(),
        }
    }
}

/// Checks `[log]`.
pub(super) fn validate_log(log: &Log, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if log.level.len() > 1024 || tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
        return Err(fail(
            "log",
            0,
            "level",
            format!(
                "`{}` is not a log level; write \"error\", \"warn\", \"info\", \"debug\" or \"trace\"",
                log.level.chars().take(64).collect::<String>()
            ),
        ));
    }
    Ok(())
}
