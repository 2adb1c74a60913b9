//! `[events]`: the delivery-event webhook (`crate::events`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::error::{ConfigError, Fail};
use crate::units::Span;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Events {
    /// Where batches of events are POSTed (`http://host:port/path`); empty: no webhook.
    #[serde(default)]
    pub url: String,
    /// Events held in memory waiting to be posted; past it new events are dropped (and counted).
    #[serde(default = "default_buffer_events_max")]
    pub buffer_events_max: usize,
    /// Events in one POST at most.
    #[serde(default = "default_batch_events_max")]
    pub batch_events_max: usize,
    /// One POST must be answered within this.
    #[serde(default = "default_timeout")]
    pub timeout: Span,
    /// After a failed POST, wait this long before trying the same batch again, doubling up to
    /// `retry_max`.
    #[serde(default = "default_retry_first")]
    pub retry_first: Span,
    #[serde(default = "default_retry_max")]
    pub retry_max: Span,
}

fn default_buffer_events_max() -> usize {
    100_000
}
fn default_batch_events_max() -> usize {
    500
}
fn default_timeout() -> Span {
    Span(Duration::from_secs(10))
}
fn default_retry_first() -> Span {
    Span(Duration::from_secs(1))
}
fn default_retry_max() -> Span {
    Span(Duration::from_secs(60))
}

impl Default for Events {
    fn default() -> Events {
        Events {
            url: String::new(),
            buffer_events_max: default_buffer_events_max(),
            batch_events_max: default_batch_events_max(),
            timeout: default_timeout(),
            retry_first: default_retry_first(),
            retry_max: default_retry_max(),
        }
    }
}

impl Events {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

/// Checks `[events]`.
pub(super) fn validate(events: &Events, fail: &Fail<'_>) -> Result<(), ConfigError> {
    if events.enabled() {
        let Some(rest) = events.url.strip_prefix("http://") else {
            let why = if events.url.starts_with("https://") {
                "https is not supported yet; post to a local http:// receiver or a TLS-terminating proxy"
            } else {
                "must be an http:// URL, such as \"http://127.0.0.1:8080/gannet-events\""
            };
            return Err(fail("events", 0, "url", why.into()));
        };
        let host = rest.split('/').next().unwrap_or("");
        if host.is_empty() || host.chars().any(|c| c.is_whitespace()) {
            return Err(fail(
                "events",
                0,
                "url",
                "names no host, such as \"http://127.0.0.1:8080/hook\"".into(),
            ));
        }
    }
    if events.buffer_events_max == 0 || events.buffer_events_max > 10_000_000 {
        return Err(fail(
            "events",
            0,
            "buffer_events_max",
            "must be between 1 and 10000000".into(),
        ));
    }
    if events.batch_events_max == 0 || events.batch_events_max > 10_000 {
        return Err(fail(
            "events",
            0,
            "batch_events_max",
            "must be between 1 and 10000".into(),
        ));
    }
    if events.timeout.0.is_zero() || events.retry_first.0.is_zero() {
        return Err(fail(
            "events",
            0,
            "timeout",
            "timeout and retry_first must be more than zero".into(),
        ));
    }
    if events.retry_first > events.retry_max {
        return Err(fail(
            "events",
            0,
            "retry_first",
            "is longer than events.retry_max".into(),
        ));
    }
    Ok(())
}
