//! Receiving sites: where the scheduler queues and limits delivery. A site is a smarthost, or
//! the set of MX hosts that receive a domain's mail: domains whose MX hosts are the same share
//! one site, one queue, one pool and one set of limits (KumoMTA calls this MX rollup), so that
//! mail to thousands of domains hosted by one provider opens connections within that
//! provider's limits, not one set of connections per domain.

use std::fmt;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::health::Health;
use crate::lanes::Lanes;
use crate::provider::{Pace, Slowdown};
use crate::Job;

/// A receiving site's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SiteKey {
    Smarthost(SocketAddr),
    /// MX hosts, lowercase, sorted and without duplicates.
    Mx(Rc<[Box<str>]>),
}

impl SiteKey {
    /// The site of these MX hosts (in any order, any case).
    pub fn mx<S: AsRef<str>>(hosts: &[S]) -> SiteKey {
        let mut sorted: Vec<Box<str>> = hosts.iter().map(|h| h.as_ref().to_ascii_lowercase().into()).collect();
        sorted.sort();
        sorted.dedup();
        SiteKey::Mx(sorted.into())
    }
}

impl fmt::Display for SiteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SiteKey::Smarthost(addr) => write!(f, "{addr}"),
            SiteKey::Mx(hosts) => write!(f, "MX {}", hosts.join(",")),
        }
    }
}

/// A site's limits, for this shard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SiteLimits {
    pub connections_max: usize,
    pub messages_per_connection_max: usize,
    /// Time between messages when a rate is set.
    pub send_interval: Option<Duration>,
}

/// Limits for the sites a rule matches (`[[destination]]`), process-wide values.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteRule {
    /// A smarthost `IP:port`, a domain or MX host name, `*.example.com` for the names under it,
    /// or `*` for everything.
    pub pattern: String,
    pub connections_max: Option<usize>,
    pub messages_per_connection_max: Option<usize>,
    pub messages_per_second: Option<f64>,
}

impl SiteRule {
    /// Whether this rule covers a name (an `IP:port`, a domain or an MX host).
    pub fn matches(&self, name: &str) -> bool {
        pattern_matches(&self.pattern, name)
    }
}

/// Whether `pattern` (a name, `*.suffix` for the names under it, or `*`) covers `name`,
/// ignoring case.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    if pattern == "*" || pattern.eq_ignore_ascii_case(name) {
        return true;
    }
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            name.len() > suffix.len()
                && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
        }
        None => false,
    }
}

/// One site's queue and accounting.
#[derive(Debug)]
pub struct Site {
    pub key: SiteKey,
    /// For logs and rules: the smarthost's `IP:port`, or the first domain that led here.
    pub name: String,
    /// MX hosts in the preference order of the lookup that made the site (empty for a
    /// smarthost).
    pub hosts: Vec<String>,
    pub(crate) pending: Lanes<Job>,
    /// Delivering connections (workers) now.
    pub(crate) workers: usize,
    pub(crate) limits: SiteLimits,
    /// Its own rate (`limits.send_interval`, and a slow-down), and its next send slot.
    pub(crate) pace: Pace,
    /// The provider whose limits it shares (an index into the scheduler's providers).
    pub(crate) provider: Option<usize>,
    /// The last time it had work or a worker.
    pub(crate) last_active: Instant,
    /// It is in the scheduler's list of sites that may want a worker.
    pub(crate) kicked: bool,
    /// A worker stopped for a connection cap: no more workers while others still run.
    pub(crate) capped: bool,
    /// Down after connection failures in a row, and its probes.
    pub(crate) health: Health,
}

impl Site {
    pub(crate) fn new(key: SiteKey, name: String, hosts: Vec<String>, limits: SiteLimits, now: Instant) -> Site {
        Site {
            key,
            name,
            hosts,
            pending: Lanes::default(),
            workers: 0,
            limits,
            pace: Pace::new(limits.send_interval),
            provider: None,
            last_active: now,
            kicked: false,
            capped: false,
            health: Health::default(),
        }
    }

    pub fn limits(&self) -> &SiteLimits {
        &self.limits
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn health(&self) -> &Health {
        &self.health
    }

    /// No work and no worker: may be evicted.
    pub(crate) fn idle(&self) -> bool {
        self.workers == 0 && self.pending.is_empty()
    }

    /// The provider whose limits it shares, by index.
    pub fn provider(&self) -> Option<usize> {
        self.provider
    }

    /// Its slow-down, if one is in force.
    pub fn slowed(&self) -> Option<Slowdown> {
        self.pace.slowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_with_the_same_mx_hosts_share_a_site() {
        let a = SiteKey::mx(&["MX2.example.net", "mx1.example.net"]);
        let b = SiteKey::mx(&["mx1.example.net", "mx2.example.net", "mx1.example.net"]);
        assert_eq!(a, b);
        assert_ne!(a, SiteKey::mx(&["mx1.example.net"]));
        assert_eq!(a.to_string(), "MX mx1.example.net,mx2.example.net");
    }

    #[test]
    fn rules_match_names_exactly_by_suffix_or_everything() {
        let rule = |p: &str| SiteRule {
            pattern: p.into(),
            connections_max: None,
            messages_per_connection_max: None,
            messages_per_second: None,
        };
        assert!(rule("*").matches("anything"));
        assert!(rule("Example.com").matches("example.COM"));
        assert!(rule("*.google.com").matches("aspmx.l.google.com"));
        assert!(!rule("*.google.com").matches("google.com"));
        assert!(!rule("*.google.com").matches("notgoogle.com"));
        assert!(rule("127.0.0.1:25").matches("127.0.0.1:25"));
    }
}
