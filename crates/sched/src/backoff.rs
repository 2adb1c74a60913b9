//! The retry schedule, as data: the first retry after `first`, then each wait twice the last,
//! up to `max`, plus up to a tenth of jitter so that the retries of a burst do not come back as
//! a burst; until the message's queue lifetime has passed.

use std::time::Duration;

/// Each wait is this many times the last.
pub const BACKOFF_FACTOR: u32 = 2;
/// Doublings at most (with `retry_first` of at least a second, far past any sane `retry_max`).
pub const BACKOFF_STEPS_MAX: u32 = 20;
/// Jitter: up to this many thousandths of the wait, added.
pub const JITTER_PERMILLE_MAX: u64 = 100;

/// When retries come (`delivery.retry_first`, `delivery.retry_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrySchedule {
    pub first: Duration,
    pub max: Duration,
}

impl RetrySchedule {
    /// The wait after `attempts` failed attempts (1 for the first failure), without jitter.
    pub fn base(&self, attempts: u32) -> Duration {
        let steps = attempts.saturating_sub(1).min(BACKOFF_STEPS_MAX);
        self.first
            .saturating_mul(BACKOFF_FACTOR.saturating_pow(steps))
            .min(self.max)
    }

    /// The wait with jitter from `random` bits: `base` plus `random % 1000` tenths of a
    /// thousandth of it, i.e. up to 10%.
    pub fn delay(&self, attempts: u32, random: u64) -> Duration {
        let base = self.base(attempts);
        let jitter_permille = (random % 1000) * JITTER_PERMILLE_MAX / 1000;
        base + base.mul_f64(jitter_permille as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: RetrySchedule = RetrySchedule {
        first: Duration::from_secs(300),
        max: Duration::from_secs(4000),
    };

    #[test]
    fn waits_double_up_to_the_cap() {
        let waits: Vec<u64> = (1..=6).map(|a| S.base(a).as_secs()).collect();
        assert_eq!(waits, [300, 600, 1200, 2400, 4000, 4000]);
        assert_eq!(S.base(u32::MAX), Duration::from_secs(4000));
    }

    #[test]
    fn jitter_adds_at_most_a_tenth() {
        for random in [0u64, 1, 499, 999, 1000, u64::MAX] {
            let d = S.delay(1, random);
            assert!(d >= S.base(1) && d <= S.base(1).mul_f64(1.1), "{d:?}");
        }
        assert_eq!(S.delay(1, 0), S.base(1));
    }
}
