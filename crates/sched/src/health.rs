//! Destination health: a site whose hosts cannot be reached (connections refused or timed out,
//! no greeting, its MX hosts not found for now) several times in a row is *down*. While it is
//! down, its queued and newly arriving mail waits in the site's queue and no worker starts for
//! it, except one *probe* at a time: a single connection attempt when the probe is due. A probe
//! that connects brings the site up (every waiting job gets workers again); one that fails
//! doubles the wait for the next, up to a ceiling. Waiting costs a message nothing: its
//! attempts and its own backoff do not change.
//!
//! Invariant: a down site has at most one worker, and only while `probing`.

use std::time::{Duration, Instant};

/// When a site goes down and how it is probed (`[delivery]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthRules {
    /// Connection failures in a row that mark a site down; 0: never.
    pub down_after_failures: u32,
    /// The wait before the first probe.
    pub probe_interval: Duration,
    /// The longest wait between probes (the wait doubles after each failed probe).
    pub probe_interval_max: Duration,
}

impl HealthRules {
    /// Never down: every message tries on its own.
    pub const NEVER: HealthRules = HealthRules {
        down_after_failures: 0,
        probe_interval: Duration::from_secs(30),
        probe_interval_max: Duration::from_secs(600),
    };
}

/// A site that is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Down {
    pub since: Instant,
    /// When the next probe may start.
    pub probe_at: Instant,
    /// The wait that led to `probe_at`.
    pub interval: Duration,
    /// A probe's worker may run (or runs) now.
    pub probing: bool,
    /// Connection failures in a row, the ones that marked it down included.
    pub failures: u32,
}

/// What a connection attempt's outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing to tell: up and still up, or a failure short of the threshold.
    None,
    /// Down from now on; the first probe in `probe_in`.
    MarkedDown { failures: u32, probe_in: Duration },
    /// The probe failed; the next in `probe_in`.
    ProbeFailed { failures: u32, probe_in: Duration },
    /// A connection succeeded after `down_for` down.
    Up { down_for: Duration },
}

/// One site's health.
#[derive(Debug, Clone, Default)]
pub struct Health {
    failures_in_row: u32,
    down: Option<Down>,
}

impl Health {
    pub fn down(&self) -> Option<&Down> {
        self.down.as_ref()
    }

    /// There is something to remember: failures in a row, or down.
    pub fn remembers(&self) -> bool {
        self.failures_in_row > 0 || self.down.is_some()
    }

    /// A worker may start for the site: it is up, or a probe is due and none runs yet
    /// (`workers`: the site's workers now).
    pub fn may_start_worker(&self, workers: usize) -> bool {
        match &self.down {
            None => true,
            Some(d) => d.probing && workers == 0,
        }
    }

    /// A connection attempt failed at `now`.
    pub fn failed(&mut self, rules: &HealthRules, now: Instant) -> Change {
        self.failures_in_row = self.failures_in_row.saturating_add(1);
        let failures = self.failures_in_row;
        if let Some(d) = &mut self.down {
            d.failures = failures;
            if !d.probing {
                // A worker that started before the site went down: no new probe time.
                return Change::None;
            }
            d.interval = (d.interval * 2).min(rules.probe_interval_max);
            d.probe_at = now + d.interval;
            d.probing = false;
            return Change::ProbeFailed {
                failures,
                probe_in: d.interval,
            };
        }
        if rules.down_after_failures == 0 || failures < rules.down_after_failures {
            return Change::None;
        }
        let interval = rules.probe_interval.min(rules.probe_interval_max);
        self.down = Some(Down {
            since: now,
            probe_at: now + interval,
            interval,
            probing: false,
            failures,
        });
        Change::MarkedDown {
            failures,
            probe_in: interval,
        }
    }

    /// A connection was opened at `now`.
    pub fn succeeded(&mut self, now: Instant) -> Change {
        self.failures_in_row = 0;
        match self.down.take() {
            Some(d) => Change::Up {
                down_for: now.saturating_duration_since(d.since),
            },
            None => Change::None,
        }
    }

    /// Lets the probe start if it is due (once per probe time). True if it became due now.
    pub fn probe_due(&mut self, now: Instant) -> bool {
        match &mut self.down {
            Some(d) if !d.probing && now >= d.probe_at => {
                d.probing = true;
                true
            }
            _ => false,
        }
    }

    /// Lets the probe start now (an operator's flush). True if the site is down and no probe
    /// was running.
    pub fn probe_now(&mut self) -> bool {
        let Some(d) = &mut self.down else {
            return false;
        };
        // Due from the moment it went down: any time is late enough.
        d.probe_at = d.probe_at.min(d.since);
        let at = d.probe_at;
        self.probe_due(at)
    }

    /// The rules changed (a reload) with the site down: a shorter ceiling applies at once.
    pub fn reconfigure(&mut self, rules: &HealthRules, now: Instant) {
        if rules.down_after_failures == 0 {
            self.down = None;
            return;
        }
        if let Some(d) = &mut self.down {
            if d.interval > rules.probe_interval_max {
                d.interval = rules.probe_interval_max;
                d.probe_at = d.probe_at.min(now + d.interval);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: HealthRules = HealthRules {
        down_after_failures: 3,
        probe_interval: Duration::from_secs(10),
        probe_interval_max: Duration::from_secs(35),
    };

    #[test]
    fn a_site_goes_down_after_failures_in_a_row_and_probes_back_off_to_the_ceiling() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert_eq!(h.failed(&RULES, t0), Change::None);
        assert_eq!(h.succeeded(t0), Change::None, "a success resets the count");
        assert_eq!(h.failed(&RULES, t0), Change::None);
        assert_eq!(h.failed(&RULES, t0), Change::None);
        assert_eq!(
            h.failed(&RULES, t0),
            Change::MarkedDown {
                failures: 3,
                probe_in: Duration::from_secs(10)
            }
        );
        assert!(!h.may_start_worker(0), "no worker until the probe is due");
        // Another worker that was already connecting fails too: no new probe time.
        assert_eq!(h.failed(&RULES, t0), Change::None);
        assert!(!h.probe_due(t0 + Duration::from_secs(9)));
        assert!(h.probe_due(t0 + Duration::from_secs(10)));
        assert!(!h.probe_due(t0 + Duration::from_secs(10)), "once per probe time");
        assert!(h.may_start_worker(0) && !h.may_start_worker(1), "one probe at a time");
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(
            h.failed(&RULES, t1),
            Change::ProbeFailed {
                failures: 5,
                probe_in: Duration::from_secs(20)
            }
        );
        let t2 = t1 + Duration::from_secs(20);
        assert!(h.probe_due(t2));
        assert_eq!(
            h.failed(&RULES, t2),
            Change::ProbeFailed {
                failures: 6,
                probe_in: Duration::from_secs(35)
            },
            "doubling stops at the ceiling"
        );
        let t3 = t2 + Duration::from_secs(35);
        assert!(h.probe_due(t3));
        assert_eq!(
            h.succeeded(t3 + Duration::from_secs(1)),
            Change::Up {
                down_for: Duration::from_secs(66)
            }
        );
        assert!(h.down().is_none() && h.may_start_worker(5));
    }

    #[test]
    fn zero_failures_means_never_down() {
        let t0 = Instant::now();
        let mut h = Health::default();
        for _ in 0..100 {
            assert_eq!(h.failed(&HealthRules::NEVER, t0), Change::None);
        }
        assert!(h.down().is_none());
    }
}
