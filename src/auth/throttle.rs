//! Slows down and then blocks clients that fail to authenticate: each failure from an IP address
//! doubles the delay before its `535` reply, and after `failures_max` failures the address is
//! refused with `421` for `block_duration`. A success forgets the address's failures, and so does
//! a quiet `block_duration` after the last failure.
//!
//! Per shard, like every piece of shard state: an attacker spread over all shards by
//! SO_REUSEPORT gets `failures_max` tries per shard (docs/smtp.md says so).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Most addresses tracked at once; past it, addresses whose record has expired are forgotten,
/// then the oldest.
pub const TRACKED_ADDRESSES_MAX: usize = 65_536;
/// The delay stops doubling after this many failures.
const DOUBLINGS_MAX: u32 = 6;

#[derive(Debug, Clone, Copy)]
pub struct ThrottleLimits {
    /// Failures before the address is blocked.
    pub failures_max: u32,
    /// Delay before the first 535; doubled for each further failure.
    pub failure_delay: Duration,
    pub block_duration: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    blocked_until: Option<Instant>,
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Wait this long, then answer 535.
    Delay(Duration),
    /// The address has failed too often: 421 and close.
    Block,
}

#[derive(Debug)]
pub struct AuthThrottle {
    limits: ThrottleLimits,
    by_ip: HashMap<IpAddr, Failures>,
}

impl AuthThrottle {
    pub fn new(limits: ThrottleLimits) -> AuthThrottle {
        assert!(limits.failures_max >= 1);
        AuthThrottle {
            limits,
            by_ip: HashMap::new(),
        }
    }

    /// A reload: new limits from now on; addresses keep their failures and blocks.
    pub fn set_limits(&mut self, limits: ThrottleLimits) {
        assert!(limits.failures_max >= 1);
        self.limits = limits;
    }

    /// Whether `ip` is blocked at `now`.
    pub fn is_blocked(&self, ip: IpAddr, now: Instant) -> bool {
        self.by_ip
            .get(&ip)
            .and_then(|f| f.blocked_until)
            .is_some_and(|until| now < until)
    }

    /// Records a failed authentication from `ip`.
    pub fn failed(&mut self, ip: IpAddr, now: Instant) -> AfterFailure {
        let limits = self.limits;
        if !self.by_ip.contains_key(&ip) && self.by_ip.len() >= TRACKED_ADDRESSES_MAX {
            self.make_room(now);
        }
        let entry = self.by_ip.entry(ip).or_insert(Failures {
            count: 0,
            last: now,
            blocked_until: None,
        });
        if now.duration_since(entry.last) >= limits.block_duration {
            *entry = Failures {
                count: 0,
                last: now,
                blocked_until: None,
            };
        }
        entry.count += 1;
        entry.last = now;
        if entry.count >= limits.failures_max {
            entry.blocked_until = Some(now + limits.block_duration);
            return AfterFailure::Block;
        }
        let doublings = (entry.count - 1).min(DOUBLINGS_MAX);
        AfterFailure::Delay(limits.failure_delay * (1u32 << doublings))
    }

    /// Forgets `ip`'s failures after a successful authentication.
    pub fn succeeded(&mut self, ip: IpAddr) {
        self.by_ip.remove(&ip);
    }

    fn make_room(&mut self, now: Instant) {
        let forget_after = self.limits.block_duration;
        self.by_ip
            .retain(|_, f| now.duration_since(f.last) < forget_after || f.blocked_until.is_some_and(|u| now < u));
        if self.by_ip.len() >= TRACKED_ADDRESSES_MAX {
            if let Some(oldest) = self.by_ip.iter().min_by_key(|(_, f)| f.last).map(|(ip, _)| *ip) {
                self.by_ip.remove(&oldest);
            }
        }
        debug_assert!(self.by_ip.len() < TRACKED_ADDRESSES_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ThrottleLimits {
        ThrottleLimits {
            failures_max: 4,
            failure_delay: Duration::from_millis(100),
            block_duration: Duration::from_secs(60),
        }
    }

    #[test]
    fn delays_double_then_the_address_is_blocked_for_a_while() {
        let mut t = AuthThrottle::new(limits());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(t.failed(ip, t0), AfterFailure::Delay(Duration::from_millis(100)));
        assert_eq!(t.failed(ip, t0), AfterFailure::Delay(Duration::from_millis(200)));
        assert_eq!(t.failed(ip, t0), AfterFailure::Delay(Duration::from_millis(400)));
        assert!(!t.is_blocked(ip, t0));
        assert_eq!(t.failed(ip, t0), AfterFailure::Block);
        assert!(t.is_blocked(ip, t0 + Duration::from_secs(59)));
        assert!(!t.is_blocked(other, t0));
        assert!(!t.is_blocked(ip, t0 + Duration::from_secs(60)));
        // A quiet block_duration later, the count starts again.
        assert_eq!(
            t.failed(ip, t0 + Duration::from_secs(120)),
            AfterFailure::Delay(Duration::from_millis(100))
        );
    }

    #[test]
    fn success_forgets_failures() {
        let mut t = AuthThrottle::new(limits());
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        let t0 = Instant::now();
        t.failed(ip, t0);
        t.failed(ip, t0);
        t.succeeded(ip);
        assert_eq!(t.failed(ip, t0), AfterFailure::Delay(Duration::from_millis(100)));
    }

    #[test]
    fn the_table_stays_bounded() {
        let mut t = AuthThrottle::new(limits());
        let t0 = Instant::now();
        for i in 0..(TRACKED_ADDRESSES_MAX as u32 + 10) {
            t.failed(IpAddr::from(i.to_be_bytes()), t0);
        }
        assert!(t.by_ip.len() <= TRACKED_ADDRESSES_MAX);
    }
}
