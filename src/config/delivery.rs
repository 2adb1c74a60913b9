//! `[delivery]`, `[[route]]` and `[[destination]]`: how, where and how fast mail goes out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use super::server::valid_hostname;
use crate::units::Span;

/// Limits for the destinations a rule matches (per shard, like the defaults they replace).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationLimits {
    /// A smarthost `IP:port`, a recipient domain (`example.com`), or `*.example.com` for the
    /// domain's subdomains, or `*` for everything.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Instead of `delivery.connections_per_destination_max` (process-wide, split across shards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_max: Option<usize>,
    /// Instead of `delivery.messages_per_connection_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_connection_max: Option<usize>,
    /// At most this many messages per second to the destination (per shard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_second: Option<f64>,
}

impl DestinationLimits {
    /// Whether this rule covers a destination named `name` (an `IP:port` or a domain).
    pub fn matches(&self, name: &str) -> bool {
        gannet_sched::site::pattern_matches(&self.pattern, name)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    /// Name sent in EHLO. Default: `server.hostname`.
    #[serde(default)]
    pub helo_name: Option<String>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Span,
    /// Waiting for the greeting, and for the reply to each command (RFC 5321 4.5.3.2: 5 minutes).
    #[serde(default = "default_reply_timeout")]
    pub reply_timeout: Span,
    /// Waiting for the reply after the final dot (RFC 5321: 10 minutes).
    #[serde(default = "default_final_reply_timeout")]
    pub final_reply_timeout: Span,
    /// Concurrent connections per destination, for the whole process: each shard gets an equal
    /// share (rounded up).
    #[serde(default = "default_connections_per_destination_max")]
    pub connections_per_destination_max: usize,
    /// Concurrent delivering connections per shard, over all destinations.
    #[serde(default = "default_connections_per_shard_max")]
    pub connections_per_shard_max: usize,
    /// Concurrent connections to one receiving IP address, for the whole process, over all
    /// destinations (each shard gets an equal share, rounded up).
    #[serde(default = "default_connections_per_ip_max")]
    pub connections_per_ip_max: usize,
    /// Receiving sites each shard keeps track of; idle ones beyond it are forgotten (their
    /// pooled connections closed), least recently active first.
    #[serde(default = "default_destinations_max")]
    pub destinations_max: usize,
    #[serde(default = "default_messages_per_connection_max")]
    pub messages_per_connection_max: usize,
    /// How long an idle outbound connection is kept for reuse.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Span,
    /// First retry after a temporary failure; each further one waits twice as long (with
    /// jitter), up to `retry_max`.
    #[serde(default = "default_retry_first")]
    pub retry_first: Span,
    #[serde(default = "default_retry_max")]
    pub retry_max: Span,
    /// After this long in the queue a message that still cannot be delivered fails for good.
    #[serde(default = "default_queue_lifetime")]
    pub queue_lifetime: Span,
    /// Use STARTTLS when a server offers it (opportunistic TLS, RFC 7435).
    #[serde(default = "default_starttls")]
    pub starttls: bool,
    /// The port of MX hosts (25; other values are for tests and unusual setups).
    #[serde(default = "default_mx_port")]
    pub mx_port: u16,
    /// After this long in the queue, one delay notice (RFC 3464 "delayed") goes to the sender
    /// for recipients still deferred that asked NOTIFY=DELAY or gave no NOTIFY. "0s": never.
    #[serde(default = "default_delay_warning_after")]
    pub delay_warning_after: Span,
    /// Connection failures in a row (refused, timed out, no greeting, MX hosts not found for
    /// now) after which a destination is down: its mail waits for a probe instead of each
    /// message trying on its own. 0: never.
    #[serde(default = "default_down_after_failures")]
    pub down_after_failures: u32,
    /// The wait before a down destination's first probe; it doubles after each failed probe.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: Span,
    /// The longest wait between probes.
    #[serde(default = "default_probe_interval_max")]
    pub probe_interval_max: Span,
    /// Use Gannet's default `[[provider]]` tables (src/config/default-providers.toml) after
    /// the configuration's own.
    #[serde(default = "default_default_providers")]
    pub default_providers: bool,
}

fn default_default_providers() -> bool {
    true
}

/// One routing rule: a smarthost, or MX delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A domain, or "*" for every domain without a rule of its own.
    pub domain: String,
    /// Relay everything for the domain to this `IP:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smarthost: Option<SocketAddr>,
    /// Deliver to the domain's MX hosts (RFC 5321 5.1) on `delivery.mx_port`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mx: bool,
    /// Never send this route's mail in plaintext: no STARTTLS, or a failed handshake, defers it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls_required: bool,
    /// AUTH PLAIN to the smarthost as this user (only ever over TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    /// A file holding the smarthost password (its first line), read at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_password_file: Option<PathBuf>,
    /// The password, read from `auth_password_file`.
    #[serde(skip)]
    pub auth_password: Option<String>,
}

/// Where a route sends mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteTarget {
    Smarthost(SocketAddr),
    Mx,
}

fn default_down_after_failures() -> u32 {
    3
}
fn default_probe_interval() -> Span {
    Span(Duration::from_secs(30))
}
fn default_probe_interval_max() -> Span {
    Span(Duration::from_secs(600))
}
fn default_delay_warning_after() -> Span {
    Span(Duration::from_secs(4 * 3600))
}
fn default_starttls() -> bool {
    true
}
fn default_mx_port() -> u16 {
    25
}
fn default_connect_timeout() -> Span {
    Span(Duration::from_secs(30))
}
fn default_reply_timeout() -> Span {
    Span(Duration::from_secs(300))
}
fn default_final_reply_timeout() -> Span {
    Span(Duration::from_secs(600))
}
fn default_connections_per_destination_max() -> usize {
    20
}
fn default_connections_per_ip_max() -> usize {
    20
}
fn default_destinations_max() -> usize {
    10_000
}
fn default_connections_per_shard_max() -> usize {
    500
}
fn default_messages_per_connection_max() -> usize {
    1000
}
fn default_idle_timeout() -> Span {
    Span(Duration::from_secs(10))
}
fn default_retry_first() -> Span {
    Span(Duration::from_secs(300))
}
fn default_retry_max() -> Span {
    Span(Duration::from_secs(4000))
}
fn default_queue_lifetime() -> Span {
    Span(Duration::from_secs(5 * 24 * 3600))
}

impl Default for Delivery {
    fn default() -> Delivery {
        Delivery {
            helo_name: None,
            connect_timeout: default_connect_timeout(),
            reply_timeout: default_reply_timeout(),
            final_reply_timeout: default_final_reply_timeout(),
            connections_per_destination_max: default_connections_per_destination_max(),
            connections_per_shard_max: default_connections_per_shard_max(),
            connections_per_ip_max: default_connections_per_ip_max(),
            destinations_max: default_destinations_max(),
            messages_per_connection_max: default_messages_per_connection_max(),
            idle_timeout: default_idle_timeout(),
            retry_first: default_retry_first(),
            retry_max: default_retry_max(),
            queue_lifetime: default_queue_lifetime(),
            mx_port: default_mx_port(),
            starttls: default_starttls(),
            delay_warning_after: default_delay_warning_after(),
            down_after_failures: default_down_after_failures(),
            default_providers: default_default_providers(),
            probe_interval: default_probe_interval(),
            probe_interval_max: default_probe_interval_max(),
        }
    }
}

/// Checks `[delivery]`: its timeouts, retry schedule, connection limits and EHLO name.
pub(super) fn validate(d: &Delivery, fail: &Fail<'_>) -> Result<(), ConfigError> {
    for (key, span) in [
        ("connect_timeout", d.connect_timeout),
        ("reply_timeout", d.reply_timeout),
        ("final_reply_timeout", d.final_reply_timeout),
        ("idle_timeout", d.idle_timeout),
        ("retry_first", d.retry_first),
        ("retry_max", d.retry_max),
        ("queue_lifetime", d.queue_lifetime),
        ("probe_interval", d.probe_interval),
        ("probe_interval_max", d.probe_interval_max),
    ] {
        if span.0.is_zero() {
            return Err(fail(
                "delivery",
                0,
                key,
                "must be more than zero, such as \"30s\"".into(),
            ));
        }
    }
    if d.retry_max < d.retry_first {
        return Err(fail(
            "delivery",
            0,
            "retry_max",
            format!(
                "{} is shorter than delivery.retry_first ({}); make it at least as long",
                d.retry_max, d.retry_first
            ),
        ));
    }
    for (key, value) in [
        ("connections_per_destination_max", d.connections_per_destination_max),
        ("messages_per_connection_max", d.messages_per_connection_max),
        ("connections_per_shard_max", d.connections_per_shard_max),
        ("connections_per_ip_max", d.connections_per_ip_max),
        ("destinations_max", d.destinations_max),
    ] {
        if value == 0 {
            return Err(fail("delivery", 0, key, "must be at least 1".into()));
        }
    }
    if d.probe_interval_max < d.probe_interval {
        return Err(fail(
            "delivery",
            0,
            "probe_interval_max",
            format!(
                "{} is shorter than delivery.probe_interval ({}); make it at least as long",
                d.probe_interval_max, d.probe_interval
            ),
        ));
    }
    if d.down_after_failures > 1000 {
        return Err(fail(
            "delivery",
            0,
            "down_after_failures",
            "must be at most 1000 (0 turns marking destinations down off)".into(),
        ));
    }
    if d.destinations_max > 1_000_000 {
        return Err(fail(
            "delivery",
            0,
            "destinations_max",
            "must be at most 1000000 (sites with mail queued are kept beyond it anyway)".into(),
        ));
    }
    if let Some(name) = &d.helo_name {
        if !valid_hostname(name) {
            return Err(fail("delivery", 0, "helo_name", format!("`{name}` is not a host name")));
        }
    }
    Ok(())
}

/// Checks the `[[route]]` tables: a domain each, one target each, credentials in pairs.
pub(super) fn validate_routes(routes: &[Route], fail: &Fail<'_>) -> Result<(), ConfigError> {
    for (i, route) in routes.iter().enumerate() {
        if route.domain != "*" && !valid_hostname(&route.domain) {
            return Err(fail(
                "route",
                i,
                "domain",
                format!(
                    "`{}` is not a domain; write a name such as \"example.com\", or \"*\" for every domain",
                    route.domain
                ),
            ));
        }
        if route.auth_user.is_some() != route.auth_password_file.is_some() {
            return Err(fail(
                "route",
                i,
                "auth_user",
                "give both auth_user and auth_password_file, or neither".into(),
            ));
        }
        if route.auth_user.is_some() && route.smarthost.is_none() {
            return Err(fail(
                "route",
                i,
                "auth_user",
                "AUTH is for smarthost routes only".into(),
            ));
        }
        if route.smarthost.is_some() == route.mx {
            return Err(fail(
                "route",
                i,
                "domain",
                format!(
                    "the route for `{}` needs exactly one of smarthost = \"IP:port\" or mx = true",
                    route.domain
                ),
            ));
        }
        if routes[..i].iter().any(|r| r.domain.eq_ignore_ascii_case(&route.domain)) {
            return Err(fail(
                "route",
                i,
                "domain",
                format!("`{}` has two routes; keep one", route.domain),
            ));
        }
    }
    Ok(())
}

/// Checks the `[[destination]]` rules.
pub(super) fn validate_destinations(destinations: &[DestinationLimits], fail: &Fail<'_>) -> Result<(), ConfigError> {
    for (i, rule) in destinations.iter().enumerate() {
        if rule.pattern.is_empty() {
            return Err(fail(
                "destination",
                i,
                "match",
                "write an IP:port, a domain, *.domain or *".into(),
            ));
        }
        if rule.connections_max == Some(0) || rule.messages_per_connection_max == Some(0) {
            return Err(fail(
                "destination",
                i,
                "connections_max",
                "limits must be at least 1".into(),
            ));
        }
        if rule.messages_per_second.is_some_and(|r| !(r > 0.0 && r <= 1_000_000.0)) {
            return Err(fail(
                "destination",
                i,
                "messages_per_second",
                "must be a number above 0, such as 10 or 0.5".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn routes_match_the_domain_then_the_wildcard() {
        let c = Config::parse(
            "[[route]]\ndomain = \"special.example\"\nsmarthost = \"127.0.0.1:2601\"\n\n[[route]]\ndomain = \"*\"\nsmarthost = \"[::1]:2602\"\n",
            "g.toml",
        )
        .unwrap();
        assert_eq!(
            c.route(b"SPECIAL.example"),
            Some(RouteTarget::Smarthost("127.0.0.1:2601".parse().unwrap()))
        );
        assert_eq!(
            c.route(b"other.example"),
            Some(RouteTarget::Smarthost("[::1]:2602".parse().unwrap()))
        );
        let c = Config::parse("[[route]]\ndomain = \"*\"\nmx = true\n", "g.toml").unwrap();
        assert_eq!(c.route(b"x.example"), Some(RouteTarget::Mx));
        let e = Config::parse(
            "[[route]]\ndomain = \"*\"\nmx = true\nsmarthost = \"127.0.0.1:25\"\n",
            "g.toml",
        )
        .unwrap_err();
        assert!(e.message.contains("exactly one"), "{e}");
        // The embedded default delivers every domain by MX.
        assert_eq!(Config::embedded_default().route(b"x.example"), Some(RouteTarget::Mx));
    }

    #[test]
    fn destination_rules_match_addresses_domains_and_suffixes() {
        let c = Config::parse(
            "[[destination]]\nmatch = \"*.big.example\"\nconnections_max = 2\n\n[[destination]]\nmatch = \"127.0.0.1:2526\"\nmessages_per_second = 0.5\n",
            "g.toml",
        )
        .unwrap();
        assert_eq!(
            c.destination_limits("mx.BIG.example").and_then(|d| d.connections_max),
            Some(2)
        );
        assert!(
            c.destination_limits("big.example").is_none(),
            "a suffix rule needs a subdomain"
        );
        assert!(c.destination_limits("notbig.example").is_none());
        assert_eq!(
            c.destination_limits("127.0.0.1:2526")
                .and_then(|d| d.messages_per_second),
            Some(0.5)
        );
        let e = Config::parse("[[destination]]\nmatch = \"x\"\nmessages_per_second = 0\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn smarthost_credentials_are_checked_and_loaded() {
        let route = "[[route]]\ndomain = \"*\"\nsmarthost = \"127.0.0.1:2526\"\n";
        let e = Config::parse(&format!("{route}auth_user = \"u\"\n"), "g.toml").unwrap_err();
        assert!(e.message.contains("both auth_user and auth_password_file"), "{e}");
        let e = Config::parse(
            "[[route]]\ndomain = \"*\"\nmx = true\nauth_user = \"u\"\nauth_password_file = \"/x\"\n",
            "g.toml",
        )
        .unwrap_err();
        assert!(e.message.contains("smarthost routes only"), "{e}");
        let e = Config::parse(
            &format!("{route}auth_user = \"u\"\nauth_password_file = \"/nonexistent/pw\"\n"),
            "g.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("cannot read /nonexistent/pw"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "hunter2\nignored\n").unwrap();
        let c = Config::parse(
            &format!(
                "{route}auth_user = \"u\"\nauth_password_file = {:?}\n",
                pw.display().to_string()
            ),
            "g.toml",
        )
        .unwrap();
        assert_eq!(c.routes[0].auth_password.as_deref(), Some("hunter2"));
        assert!(!c.to_toml().contains("hunter2"), "the password is never printed");
    }
}
