//! `[limits]`: what one client and one session may do (sizes, counts, timeouts, rates, tarpit).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use crate::units::{ByteSize, Span};
use gannet_smtp::limits::{LINE_LENGTH_MAX_CEILING, LINE_LENGTH_MIN, RECIPIENTS_MAX_CEILING, TARPIT_DELAY_MAX};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Longest command line, CRLF included (RFC 5321 minimum: 512).
    #[serde(default = "default_line_length_max")]
    pub line_length_max: usize,
    #[serde(default = "default_message_size_max")]
    pub message_size_max: ByteSize,
    #[serde(default = "default_recipients_max")]
    pub recipients_max: usize,
    #[serde(default = "default_errors_max")]
    pub errors_max: u32,
    #[serde(default = "default_sessions_per_shard_max")]
    pub sessions_per_shard_max: usize,
    /// Enforced per shard (shards share nothing): the process allows up to shards times this.
    #[serde(default = "default_sessions_per_ip_max")]
    pub sessions_per_ip_max: usize,
    /// A whole command line (or AUTH response) must arrive within this, counted from when the
    /// server starts waiting for it: a deadline per command, not per read.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: Span,
    /// How long one message's content (DATA, or all BDAT chunks) may take in total.
    #[serde(default = "default_data_timeout")]
    pub data_timeout: Span,
    /// Content must arrive at least this fast (bytes per second), over each
    /// `data_rate_window`; 0: no minimum.
    #[serde(default = "default_data_rate_min")]
    pub data_rate_min_bytes_per_second: u64,
    #[serde(default = "default_data_rate_window")]
    pub data_rate_window: Span,
    /// A shard with at least this fraction of `sessions_per_shard_max` open is under stress:
    /// command waits and rate windows shrink to `stress_command_timeout` (Postfix's stress mode).
    #[serde(default = "default_stress_sessions_fraction")]
    pub stress_sessions_fraction: f64,
    #[serde(default = "default_stress_command_timeout")]
    pub stress_command_timeout: Span,
    /// NOOP, RSET, VRFY and HELP past this many since the last accepted message count as errors.
    #[serde(default = "default_junk_commands_max")]
    pub junk_commands_max: u32,
    /// New connections per minute from one IP address (per shard); 0: no limit. Trusted
    /// networks are exempt from the three rates.
    #[serde(default = "default_connections_per_ip_per_minute")]
    pub connections_per_ip_per_minute: u32,
    /// Messages (MAIL commands) per minute from one IP address (per shard); 0: no limit.
    #[serde(default = "default_messages_per_minute")]
    pub messages_per_ip_per_minute: u32,
    /// Messages per minute from one authenticated user (per shard); 0: no limit.
    #[serde(default = "default_messages_per_minute")]
    pub messages_per_user_per_minute: u32,
    /// Recipients accepted over one connection, all transactions together.
    #[serde(default = "default_recipients_per_session_max")]
    pub recipients_per_session_max: usize,
    /// After this many error replies in a session, each further error reply is delayed.
    #[serde(default = "default_tarpit_after_errors")]
    pub tarpit_after_errors: u32,
    /// The delay added to each error reply past `tarpit_after_errors`; "0s": no tarpit.
    #[serde(default = "default_tarpit_delay")]
    pub tarpit_delay: Span,
}

fn default_line_length_max() -> usize {
    2048
}
fn default_message_size_max() -> ByteSize {
    ByteSize(10 << 20)
}
fn default_recipients_max() -> usize {
    1000
}
fn default_errors_max() -> u32 {
    20
}
fn default_sessions_per_shard_max() -> usize {
    1000
}
fn default_sessions_per_ip_max() -> usize {
    50
}
fn default_command_timeout() -> Span {
    Span(Duration::from_secs(300))
}
fn default_data_rate_min() -> u64 {
    500
}
fn default_data_rate_window() -> Span {
    Span(Duration::from_secs(30))
}
fn default_stress_sessions_fraction() -> f64 {
    0.8
}
fn default_stress_command_timeout() -> Span {
    Span(Duration::from_secs(10))
}
fn default_junk_commands_max() -> u32 {
    100
}
fn default_data_timeout() -> Span {
    Span(Duration::from_secs(600))
}
fn default_connections_per_ip_per_minute() -> u32 {
    60
}
fn default_messages_per_minute() -> u32 {
    120
}
fn default_recipients_per_session_max() -> usize {
    10_000
}
fn default_tarpit_after_errors() -> u32 {
    3
}
fn default_tarpit_delay() -> Span {
    Span(Duration::from_secs(1))
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            line_length_max: default_line_length_max(),
            message_size_max: default_message_size_max(),
            recipients_max: default_recipients_max(),
            errors_max: default_errors_max(),
            sessions_per_shard_max: default_sessions_per_shard_max(),
            sessions_per_ip_max: default_sessions_per_ip_max(),
            command_timeout: default_command_timeout(),
            data_timeout: default_data_timeout(),
            data_rate_min_bytes_per_second: default_data_rate_min(),
            data_rate_window: default_data_rate_window(),
            stress_sessions_fraction: default_stress_sessions_fraction(),
            stress_command_timeout: default_stress_command_timeout(),
            junk_commands_max: default_junk_commands_max(),
            connections_per_ip_per_minute: default_connections_per_ip_per_minute(),
            messages_per_ip_per_minute: default_messages_per_minute(),
            messages_per_user_per_minute: default_messages_per_minute(),
            recipients_per_session_max: default_recipients_per_session_max(),
            tarpit_after_errors: default_tarpit_after_errors(),
            tarpit_delay: default_tarpit_delay(),
        }
    }
}

/// Checks `[limits]`: sizes and counts, then timeouts and rates, then the per-session limits.
pub(super) fn validate(l: &Limits, fail: &Fail<'_>) -> Result<(), ConfigError> {
    validate_sizes(l, fail)?;
    validate_timeouts(l, fail)?;
    validate_session(l, fail)
}

/// The command line, the message, its recipients, errors and sessions.
fn validate_sizes(l: &Limits, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if !(LINE_LENGTH_MIN..=LINE_LENGTH_MAX_CEILING).contains(&l.line_length_max) {
        return Err(fail(
            "limits",
            0,
            "line_length_max",
            format!(
                "{} is out of range; RFC 5321 needs at least 512, and at most 65536 is allowed",
                l.line_length_max
            ),
        ));
    }
    if l.message_size_max.0 < 1024 || l.message_size_max.0 > (1 << 30) {
        return Err(fail(
            "limits",
            0,
            "message_size_max",
            "must be between \"1KiB\" and \"1GiB\"".into(),
        ));
    }
    if !(1..=RECIPIENTS_MAX_CEILING).contains(&l.recipients_max) {
        return Err(fail(
            "limits",
            0,
            "recipients_max",
            "must be between 1 and 100000 (RFC 5321 asks for at least 100)".into(),
        ));
    }
    if l.errors_max == 0 {
        return Err(fail("limits", 0, "errors_max", "must be at least 1".into()));
    }
    if l.sessions_per_shard_max == 0 || l.sessions_per_ip_max == 0 {
        let key = if l.sessions_per_shard_max == 0 {
            "sessions_per_shard_max"
        } else {
            "sessions_per_ip_max"
        };
        return Err(fail("limits", 0, key, "must be at least 1".into()));
    }
    Ok(())
}

/// The deadlines, the minimum data rate and the stress threshold (the slow-client defences).
fn validate_timeouts(l: &Limits, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if l.command_timeout.0.is_zero() || l.data_timeout.0.is_zero() {
        let key = if l.command_timeout.0.is_zero() {
            "command_timeout"
        } else {
            "data_timeout"
        };
        return Err(fail("limits", 0, key, "must be more than zero, such as \"5m\"".into()));
    }
    for (key, span) in [
        ("data_rate_window", l.data_rate_window),
        ("stress_command_timeout", l.stress_command_timeout),
    ] {
        if span.0 < Duration::from_secs(1) || span.0 > Duration::from_secs(3600) {
            return Err(fail("limits", 0, key, "must be between \"1s\" and \"1h\"".into()));
        }
    }
    if l.data_rate_min_bytes_per_second > 1 << 30 {
        return Err(fail(
            "limits",
            0,
            "data_rate_min_bytes_per_second",
            "must be at most 1073741824 (1 GiB per second); 0 turns the minimum off".into(),
        ));
    }
    if !(l.stress_sessions_fraction > 0.0 && l.stress_sessions_fraction <= 1.0) {
        return Err(fail(
            "limits",
            0,
            "stress_sessions_fraction",
            "must be a fraction above 0 and at most 1.0, such as 0.8 (1.0: only when the shard is full)".into(),
        ));
    }
    Ok(())
}

/// The recipients of a whole session, and the tarpit.
fn validate_session(l: &Limits, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if l.recipients_per_session_max < l.recipients_max {
        return Err(fail(
            "limits",
            0,
            "recipients_per_session_max",
            format!(
                "{} is below limits.recipients_max ({}); one transaction could never use its allowance",
                l.recipients_per_session_max, l.recipients_max
            ),
        ));
    }
    if l.tarpit_delay.0 > TARPIT_DELAY_MAX {
        return Err(fail(
            "limits",
            0,
            "tarpit_delay",
            "must be at most \"30s\" (the delay grows with each error, up to 30s)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn slow_client_limits_are_checked_with_their_line() {
        let e = Config::parse("[limits]\ndata_rate_window = \"500ms\"\n", "g.toml").unwrap_err();
        assert_eq!(
            (e.line, e.key.as_deref()),
            (Some(2), Some("limits.data_rate_window")),
            "{e}"
        );
        let e = Config::parse("[limits]\n\nstress_sessions_fraction = 1.5\n", "g.toml").unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("at most 1.0"), "{e}");
        let e = Config::parse("[limits]\nstress_sessions_fraction = 0\n", "g.toml").unwrap_err();
        assert!(e.message.contains("above 0"), "{e}");
        let e = Config::parse("[limits]\nstress_command_timeout = \"2h\"\n", "g.toml").unwrap_err();
        assert!(e.message.contains("\"1h\""), "{e}");
        let e = Config::parse("[limits]\ndata_rate_min_bytes_per_second = 2000000000\n", "g.toml").unwrap_err();
        assert!(e.message.contains("0 turns the minimum off"), "{e}");
        let c = Config::parse("[limits]\ndata_rate_min_bytes_per_second = 0\n", "g.toml").unwrap();
        assert_eq!(c.session_config().timeouts.data_rate_min_bytes_per_s, 0);
        let d = Config::embedded_default().session_config();
        assert_eq!(d.timeouts.command, Duration::from_secs(300));
        assert_eq!(d.timeouts.stress_command, Duration::from_secs(10));
        assert_eq!(d.junk_commands_max, 100);
    }
}
