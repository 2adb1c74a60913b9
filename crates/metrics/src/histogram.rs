//! Histograms with fixed bucket bounds, one per shard, merged at scrape time.
//!
//! Invariant: `counts` has one slot per bound plus one for +Inf, and `count` is their sum.

/// Seconds of a storage operation (an fdatasync): 50 µs to 5 s.
pub const SYNC_SECONDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
/// Seconds of a network exchange (a DNS query, a delivery attempt): 1 ms to 5 minutes.
pub const NETWORK_SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Seconds a message spends queued: 100 ms to 5 days (the default queue lifetime).
pub const QUEUE_SECONDS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14_400.0, 86_400.0, 432_000.0,
];
/// Messages in one group commit.
pub const BATCH_MESSAGES: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Longest bucket list any histogram here uses.
const BOUNDS_MAX: usize = 16;
const _: () = assert!(SYNC_SECONDS.len() <= BOUNDS_MAX);
const _: () = assert!(NETWORK_SECONDS.len() <= BOUNDS_MAX);
const _: () = assert!(QUEUE_SECONDS.len() <= BOUNDS_MAX);
const _: () = assert!(BATCH_MESSAGES.len() <= BOUNDS_MAX);

#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last slot is +Inf.
    counts: [u64; BOUNDS_MAX + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        assert!(bounds.len() <= BOUNDS_MAX, "too many histogram buckets");
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bucket bounds must rise");
        Histogram {
            bounds,
            counts: [0; BOUNDS_MAX + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Records one observation (no allocation).
    pub fn observe(&mut self, value: f64) {
        let slot = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        self.counts[slot] += 1;
        self.sum += value;
        self.count += 1;
    }

    /// Adds another shard's observations; both must use the same bounds.
    pub fn merge(&mut self, other: &Histogram) {
        assert!(std::ptr::eq(self.bounds, other.bounds) || self.bounds == other.bounds);
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// (upper bound, observations in that bucket) including +Inf, as the encoder wants them.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        let mut out: Vec<(f64, u64)> = self.bounds.iter().copied().zip(self.counts.iter().copied()).collect();
        out.push((f64::INFINITY, self.counts[self.bounds.len()]));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let mut h = Histogram::new(BATCH_MESSAGES);
        for v in [1.0, 1.5, 2.0, 600.0] {
            h.observe(v);
        }
        let b = h.buckets();
        assert_eq!(b[0], (1.0, 1));
        assert_eq!(b[1], (2.0, 2));
        assert_eq!(b.last().copied(), Some((f64::INFINITY, 1)));
        assert_eq!(h.count(), 4);
        assert_eq!(h.sum(), 604.5);
    }

    #[test]
    fn merge_adds_counts_and_sums() {
        let mut a = Histogram::new(SYNC_SECONDS);
        let mut b = Histogram::new(SYNC_SECONDS);
        a.observe(0.001);
        b.observe(0.001);
        b.observe(10.0);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.buckets().iter().map(|(_, c)| c).sum::<u64>(), 3);
    }
}
