//! `[dns]`: the recursive servers Gannet asks, and how long answers are cached.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use crate::units::Span;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Recursive DNS servers (`IP:port`). Empty: the `nameserver` lines of /etc/resolv.conf.
    #[serde(default)]
    pub servers: Vec<SocketAddr>,
    /// How long to wait for one server's answer.
    #[serde(default = "default_dns_timeout")]
    pub timeout: Span,
    /// Rounds over all servers before a lookup fails (temporarily).
    #[serde(default = "default_dns_attempts")]
    pub attempts: usize,
    /// Entries in the cache shared by all shards.
    #[serde(default = "default_dns_cache_entries_max")]
    pub cache_entries_max: usize,
    /// Answers are kept at least this long, whatever their TTL...
    #[serde(default = "default_dns_ttl_min")]
    pub ttl_min: Span,
    /// ...and at most this long.
    #[serde(default = "default_dns_ttl_max")]
    pub ttl_max: Span,
    /// NXDOMAIN/NODATA are kept for the SOA minimum (RFC 2308), at most this long.
    #[serde(default = "default_dns_negative_ttl_max")]
    pub negative_ttl_max: Span,
    /// A server failure or timeout is remembered this long, so that a dead server is not asked
    /// again for every message.
    #[serde(default = "default_dns_failure_ttl")]
    pub failure_ttl: Span,
}

fn default_dns_timeout() -> Span {
    Span(Duration::from_secs(5))
}
fn default_dns_attempts() -> usize {
    2
}
fn default_dns_cache_entries_max() -> usize {
    100_000
}
fn default_dns_ttl_min() -> Span {
    Span(Duration::from_secs(30))
}
fn default_dns_ttl_max() -> Span {
    Span(Duration::from_secs(86_400))
}
fn default_dns_negative_ttl_max() -> Span {
    Span(Duration::from_secs(3600))
}
fn default_dns_failure_ttl() -> Span {
    Span(Duration::from_secs(30))
}

impl Default for Dns {
    fn default() -> Dns {
        Dns {
            servers: Vec::new(),
            timeout: default_dns_timeout(),
            attempts: default_dns_attempts(),
            cache_entries_max: default_dns_cache_entries_max(),
            ttl_min: default_dns_ttl_min(),
            ttl_max: default_dns_ttl_max(),
            negative_ttl_max: default_dns_negative_ttl_max(),
            failure_ttl: default_dns_failure_ttl(),
        }
    }
}

/// The `nameserver` lines of /etc/resolv.conf, on port 53.
pub fn system_dns_servers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Checks `[dns]`.
pub(super) fn validate(dns: &Dns, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if dns.timeout.0.is_zero() {
        return Err(fail(
            "dns",
            0,
            "timeout",
            "must be more than zero, such as \"5s\"".into(),
        ));
    }
    if dns.attempts == 0 || dns.attempts > 10 {
        return Err(fail("dns", 0, "attempts", "must be between 1 and 10".into()));
    }
    if dns.cache_entries_max == 0 {
        return Err(fail("dns", 0, "cache_entries_max", "must be at least 1".into()));
    }
    if dns.ttl_min > dns.ttl_max {
        return Err(fail(
            "dns",
            0,
            "ttl_min",
            format!("{} is longer than dns.ttl_max ({})", dns.ttl_min, dns.ttl_max),
        ));
    }
    Ok(())
}
