//! Providers: receivers that run many sites. Google receives gmail.com and millions of
//! Workspace domains on MX hosts under `google.com` and `googlemail.com`; the domains of one
//! Workspace customer share a site (MX rollup), but different customers' MX sets differ, so
//! per-site limits alone would let a bulk sender open a full set of connections per customer
//! to the same provider. A provider rule matches MX host names by suffix, and every site whose
//! MX hosts match shares the provider's limits on this shard: connections, messages per
//! connection, and a message rate.
//!
//! A provider's (or a site's) rate can also be lowered for a while (`slow`, a bounce rule's
//! action on a rate-limit reply) and is restored when the time is up: the lowered interval is
//! the longer of the configured one and the slow-down's, so a slow-down never speeds up.

use std::time::{Duration, Instant};

use crate::site::pattern_matches;

/// The most provider rules.
pub const PROVIDERS_MAX: usize = 1000;

/// Providers as the configuration gives them (process-wide values).
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderRule {
    pub name: String,
    /// MX host name suffixes (`google.com` covers `aspmx.l.google.com`), lowercase.
    pub mx_suffixes: Vec<String>,
    pub connections_max: Option<usize>,
    pub messages_per_connection_max: Option<usize>,
    pub messages_per_second: Option<f64>,
}

impl ProviderRule {
    /// Whether an MX host name is one of this provider's.
    pub fn covers(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        self.mx_suffixes
            .iter()
            .any(|s| s.eq_ignore_ascii_case(host) || pattern_matches(&format!("*.{s}"), host))
    }
}

/// A rate lowered for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slowdown {
    pub interval: Duration,
    pub until: Instant,
    pub until_unix_s: u64,
}

/// A rate: the configured interval, a slow-down, and the next free send slot.
#[derive(Debug, Clone, Default)]
pub struct Pace {
    pub interval: Option<Duration>,
    pub slowed: Option<Slowdown>,
    next_send: Option<Instant>,
}

impl Pace {
    pub fn new(interval: Option<Duration>) -> Pace {
        Pace {
            interval,
            ..Pace::default()
        }
    }

    /// The interval in force at `now` (a slow-down that has ended is dropped).
    pub fn current(&mut self, now: Instant) -> Option<Duration> {
        if self.slowed.is_some_and(|s| s.until <= now) {
            self.slowed = None;
        }
        match (self.interval, self.slowed) {
            (Some(i), Some(s)) => Some(i.max(s.interval)),
            (i, s) => i.or(s.map(|s| s.interval)),
        }
    }

    /// How long to wait before the next message may go, reserving its slot.
    pub fn wait(&mut self, now: Instant) -> Duration {
        let Some(interval) = self.current(now) else {
            return Duration::ZERO;
        };
        let at = self.next_send.map_or(now, |t| t.max(now));
        self.next_send = Some(at + interval);
        at.saturating_duration_since(now)
    }

    /// Lowers the rate to one message per `interval` until `until`; false if a slow-down at
    /// least as slow and as long is in force already.
    pub fn slow(&mut self, slowdown: Slowdown) -> bool {
        if self
            .slowed
            .is_some_and(|s| s.interval >= slowdown.interval && s.until >= slowdown.until)
        {
            return false;
        }
        self.slowed = Some(slowdown);
        true
    }
}

/// One provider on this shard.
#[derive(Debug, Clone)]
pub struct Provider {
    pub name: String,
    /// Workers (connections) open to any of its sites.
    pub workers: usize,
    /// This shard's share.
    pub connections_max: usize,
    pub messages_per_connection_max: Option<usize>,
    pub pace: Pace,
    /// Paused (a bounce rule's `suspend` on a reply from one of its sites) until then: none
    /// of its sites starts a worker; their jobs wait in their queues.
    pub paused_until_unix_s: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_cover_hosts_under_their_suffixes() {
        let google = ProviderRule {
            name: "google".into(),
            mx_suffixes: vec!["google.com".into(), "googlemail.com".into()],
            connections_max: None,
            messages_per_connection_max: None,
            messages_per_second: None,
        };
        assert!(google.covers("aspmx.l.google.com."));
        assert!(google.covers("ALT1.ASPMX.L.GOOGLE.COM"));
        assert!(google.covers("gmail-smtp-in.l.google.com"));
        assert!(google.covers("google.com"));
        assert!(!google.covers("notgoogle.com"));
        assert!(!google.covers("google.com.evil.test"));
    }

    #[test]
    fn a_slowdown_lowers_the_rate_until_it_ends_and_never_raises_it() {
        let t0 = Instant::now();
        let mut pace = Pace::new(Some(Duration::from_millis(100)));
        let slow = |secs: u64, until_s: u64| Slowdown {
            interval: Duration::from_secs(secs),
            until: t0 + Duration::from_secs(until_s),
            until_unix_s: until_s,
        };
        assert!(pace.slow(slow(2, 60)));
        assert!(!pace.slow(slow(1, 30)), "a milder, shorter one changes nothing");
        assert_eq!(pace.wait(t0), Duration::ZERO);
        assert_eq!(pace.wait(t0), Duration::from_secs(2), "one per 2 s while slowed");
        assert_eq!(
            pace.current(t0 + Duration::from_secs(60)),
            Some(Duration::from_millis(100)),
            "restored"
        );
        assert!(pace.slowed.is_none());
        let mut fast = Pace::new(Some(Duration::from_secs(5)));
        fast.slow(slow(1, 60));
        assert_eq!(
            fast.current(t0),
            Some(Duration::from_secs(5)),
            "a slow-down never speeds up"
        );
        let mut free = Pace::new(None);
        assert_eq!(free.wait(t0), Duration::ZERO);
        free.slow(slow(3, 60));
        assert_eq!(free.current(t0), Some(Duration::from_secs(3)));
    }
}
