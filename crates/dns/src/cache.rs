//! The DNS cache shared by all shards: lock-free for readers (papaya's concurrent hash map, see
//! `benches/dns_cache.rs` for the comparison that chose it), bounded in size, with TTLs clamped
//! to a configured floor and ceiling and negative answers kept per RFC 2308.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;

use crate::message::Answer;

#[derive(Debug, Clone)]
struct Entry {
    expires: Instant,
    answer: Arc<Answer>,
}

/// Cache limits, from `[dns]` in the configuration.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    pub entries_max: usize,
    pub ttl_min: Duration,
    pub ttl_max: Duration,
    pub negative_ttl_max: Duration,
    /// How long a server failure or timeout is remembered (so that a dead server is not asked
    /// again for every message).
    pub failure_ttl: Duration,
}

pub struct DnsCache {
    map: papaya::HashMap<(String, u16), Entry>,
    limits: CacheLimits,
}

impl DnsCache {
    pub fn new(limits: CacheLimits) -> Arc<DnsCache> {
        Arc::new(DnsCache {
            map: papaya::HashMap::new(),
            limits,
        })
    }

    /// A live entry for `name` (lower case) and `rtype`.
    pub fn get(&self, name: &str, rtype: RecordType, now: Instant) -> Option<Arc<Answer>> {
        let map = self.map.pin();
        let entry = map.get(&(name.to_string(), u16::from(rtype)))?;
        (entry.expires > now).then(|| entry.answer.clone())
    }

    /// Stores an answer for `ttl_s` seconds, clamped by the limits.
    pub fn insert(&self, name: &str, rtype: RecordType, answer: Answer, ttl_s: u32, now: Instant) {
        let l = &self.limits;
        let ttl = match answer {
            Answer::ServerFailure(_) => l.failure_ttl,
            Answer::NxDomain | Answer::NoData => Duration::from_secs(u64::from(ttl_s)).min(l.negative_ttl_max),
            _ => Duration::from_secs(u64::from(ttl_s)).clamp(l.ttl_min, l.ttl_max),
        };
        let map = self.map.pin();
        if map.len() >= l.entries_max {
            // Bounded: drop what has expired, and if that is not enough, anything (a cache
            // miss only costs a query).
            map.retain(|_, e| e.expires > now);
            let excess = map.len().saturating_sub(l.entries_max - 1);
            let victims: Vec<(String, u16)> = map.keys().take(excess).cloned().collect();
            for key in victims {
                map.remove(&key);
            }
        }
        map.insert(
            (name.to_string(), u16::from(rtype)),
            Entry {
                expires: now + ttl,
                answer: Arc::new(answer),
            },
        );
    }

    pub fn len(&self) -> usize {
        self.map.pin().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> CacheLimits {
        CacheLimits {
            entries_max: 3,
            ttl_min: Duration::from_secs(10),
            ttl_max: Duration::from_secs(100),
            negative_ttl_max: Duration::from_secs(50),
            failure_ttl: Duration::from_secs(5),
        }
    }

    #[test]
    fn entries_expire_after_their_clamped_ttl() {
        let cache = DnsCache::new(limits());
        let t0 = Instant::now();
        cache.insert(
            "a.test",
            RecordType::A,
            Answer::Addresses(vec!["192.0.2.1".parse().unwrap()]),
            1,
            t0,
        );
        assert!(
            cache
                .get("a.test", RecordType::A, t0 + Duration::from_secs(9))
                .is_some(),
            "raised to ttl_min"
        );
        assert!(cache
            .get("a.test", RecordType::A, t0 + Duration::from_secs(11))
            .is_none());
        cache.insert("b.test", RecordType::MX, Answer::NxDomain, 1000, t0);
        assert!(cache
            .get("b.test", RecordType::MX, t0 + Duration::from_secs(49))
            .is_some());
        assert!(
            cache
                .get("b.test", RecordType::MX, t0 + Duration::from_secs(51))
                .is_none(),
            "negative_ttl_max"
        );
        cache.insert("c.test", RecordType::MX, Answer::Mx(vec![]), 100_000, t0);
        assert!(
            cache
                .get("c.test", RecordType::MX, t0 + Duration::from_secs(101))
                .is_none(),
            "ttl_max"
        );
        assert!(cache.get("c.test", RecordType::A, t0).is_none(), "keyed by type");
    }

    #[test]
    fn the_cache_stays_bounded() {
        let cache = DnsCache::new(limits());
        let t0 = Instant::now();
        for i in 0..10 {
            cache.insert(&format!("n{i}.test"), RecordType::A, Answer::NoData, 30, t0);
            assert!(cache.len() <= 3);
        }
        assert!(
            cache.get("n9.test", RecordType::A, t0).is_some(),
            "the newest entry is kept"
        );
    }
}
