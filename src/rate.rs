//! Rate limits per key (an IP address, a user): token buckets that hold up to one minute's
//! allowance and refill continuously, so a client may burst up to its per-minute limit and then
//! goes at the limit's pace.
//!
//! Bounded: at most [`KEYS_MAX`] keys; when full, keys whose bucket has refilled completely
//! (which carry no information) are dropped, then the least recently used.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Most keys one limiter tracks.
pub const KEYS_MAX: usize = 65_536;
const MINUTE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

#[derive(Debug)]
pub struct RateLimiter<K> {
    /// Events per minute per key; 0 means unlimited.
    per_minute: u32,
    buckets: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(per_minute: u32) -> RateLimiter<K> {
        RateLimiter {
            per_minute,
            buckets: HashMap::new(),
        }
    }

    /// A reload: the new rate applies from now on; each key keeps what it has used, and no key
    /// holds more than the new minute's allowance.
    pub fn set_per_minute(&mut self, per_minute: u32) {
        self.per_minute = per_minute;
        let capacity = f64::from(per_minute);
        for bucket in self.buckets.values_mut() {
            bucket.tokens = bucket.tokens.min(capacity);
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.per_minute == 0
    }

    /// Takes one event for `key` at `now`; false when the key is over its rate.
    pub fn admit(&mut self, key: &K, now: Instant) -> bool {
        if self.per_minute == 0 {
            return true;
        }
        let capacity = f64::from(self.per_minute);
        if !self.buckets.contains_key(key) && self.buckets.len() >= KEYS_MAX {
            self.make_room(now);
        }
        let bucket = self.buckets.entry(key.clone()).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let refill = now.saturating_duration_since(bucket.updated).as_secs_f64() / MINUTE.as_secs_f64() * capacity;
        bucket.tokens = (bucket.tokens + refill).min(capacity);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn make_room(&mut self, now: Instant) {
        // A bucket untouched for a minute is full again: forgetting it changes nothing.
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.updated) < MINUTE);
        if self.buckets.len() >= KEYS_MAX {
            if let Some(oldest) = self
                .buckets
                .iter()
                .min_by_key(|(_, b)| b.updated)
                .map(|(k, _)| k.clone())
            {
                self.buckets.remove(&oldest);
            }
        }
        debug_assert!(self.buckets.len() < KEYS_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_to_the_limit_then_refills_at_its_pace() {
        let mut r = RateLimiter::new(6);
        let t0 = Instant::now();
        assert!((0..6).all(|_| r.admit(&"a", t0)));
        assert!(!r.admit(&"a", t0));
        assert!(r.admit(&"b", t0), "keys are independent");
        // Six per minute: one more token every ten seconds.
        assert!(!r.admit(&"a", t0 + Duration::from_secs(9)));
        assert!(r.admit(&"a", t0 + Duration::from_secs(11)));
        assert!(!r.admit(&"a", t0 + Duration::from_secs(12)));
        assert!((0..6).all(|_| r.admit(&"a", t0 + Duration::from_secs(600))));
    }

    #[test]
    fn zero_is_unlimited_and_the_table_is_bounded() {
        let mut r = RateLimiter::new(0);
        assert!((0..1000).all(|_| r.admit(&1u32, Instant::now())));
        let mut r = RateLimiter::new(1);
        let t0 = Instant::now();
        for k in 0..(KEYS_MAX as u32 + 5) {
            assert!(r.admit(&k, t0));
        }
        assert!(r.buckets.len() <= KEYS_MAX);
    }
}
