//! A session's deadlines (sans-IO: the shell passes the time in and waits until the instant the
//! session names). Defends against slow clients (slowloris): every deadline is an absolute
//! instant that bytes arriving cannot move, as Postfix's `smtpd_per_request_deadline` does.
//!
//! - **Command wait**: from the moment the session starts waiting for a command line (after the
//!   greeting, after each complete line, after the answer to a commit, a TLS handshake or an AUTH
//!   check), the whole line must arrive within `command`. Each AUTH response line is such a line.
//! - **Content**: from the first content byte (DATA's 354 or the first BDAT), the whole message
//!   must arrive within `data`; and in every `data_rate_window` from then on, at least
//!   `data_rate_min_bytes_per_s` times the window's seconds must arrive (a message trickled at a
//!   byte per second is cut off after one window).
//! - **Stress** (the shard is nearly full of sessions): the command wait and the rate window are
//!   at most `stress_command`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The time as the shell passes it in: a monotonic instant for deadlines and the wall clock
/// (seconds since the epoch) for trace headers. The session never reads a clock itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub instant: Instant,
    pub unix_s: u64,
}

impl Now {
    /// Reads both clocks (the shell's one place for this).
    pub fn read() -> Now {
        Now {
            instant: Instant::now(),
            unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// The limits, from `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A command line must arrive whole within this.
    pub command: Duration,
    /// The command wait and the rate window under stress, when shorter.
    pub stress_command: Duration,
    /// The whole content of a message (all BDAT chunks together) must arrive within this.
    pub data: Duration,
    /// Minimum content rate over each window; 0 turns the rate check off.
    pub data_rate_min_bytes_per_s: u64,
    pub data_rate_window: Duration,
}

impl Timeouts {
    /// Generous limits for tests and fuzzing.
    pub const RELAXED: Timeouts = Timeouts {
        command: Duration::from_secs(300),
        stress_command: Duration::from_secs(10),
        data: Duration::from_secs(600),
        data_rate_min_bytes_per_s: 0,
        data_rate_window: Duration::from_secs(30),
    };

    fn command(&self, stressed: bool) -> Duration {
        if stressed {
            self.command.min(self.stress_command)
        } else {
            self.command
        }
    }

    fn window(&self, stressed: bool) -> Duration {
        if stressed {
            self.data_rate_window.min(self.stress_command)
        } else {
            self.data_rate_window
        }
    }

    /// Bytes a window of `window` must carry.
    fn window_bytes_min(&self, window: Duration) -> u64 {
        let millis = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        self.data_rate_min_bytes_per_s.saturating_mul(millis) / 1000
    }
}

/// Which deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A command line (or AUTH response) did not arrive whole in time.
    Command,
    /// The message's content took longer than `data` in all.
    ContentTotal,
    /// A rate window carried fewer bytes than the minimum.
    ContentRate { window_bytes: u64, required_bytes: u64 },
}

impl Expiry {
    /// For the log.
    pub fn sentence(&self, timeouts: &Timeouts, stressed: bool) -> String {
        match *self {
            Expiry::Command => format!(
                "command line not complete within {:?}{}",
                timeouts.command(stressed),
                if stressed { " (shard under stress)" } else { "" }
            ),
            Expiry::ContentTotal => format!("message content not complete within {:?}", timeouts.data),
            Expiry::ContentRate {
                window_bytes,
                required_bytes,
            } => format!(
                "{window_bytes} content bytes in {:?}, below the minimum of {required_bytes}",
                timeouts.window(stressed)
            ),
        }
    }
}

/// Where a session's clocks stand.
#[derive(Debug, Clone)]
pub struct Deadlines {
    /// When the wait for the current command line began.
    wait_started: Instant,
    /// When the content of the transaction in progress began, if it has.
    content_started: Option<Instant>,
    window_started: Instant,
    window_bytes: u64,
}

impl Deadlines {
    pub fn new(now: Instant) -> Deadlines {
        Deadlines {
            wait_started: now,
            content_started: None,
            window_started: now,
            window_bytes: 0,
        }
    }

    /// A command line was complete (or the session answered something the client waited for):
    /// the next line's wait starts now.
    pub fn line_done(&mut self, now: Instant) {
        self.wait_started = now;
    }

    /// Content begins (no-op for later BDAT chunks of the same message).
    pub fn content_begins(&mut self, now: Instant) {
        if self.content_started.is_none() {
            self.content_started = Some(now);
            self.window_started = now;
            self.window_bytes = 0;
        }
    }

    pub fn content_bytes(&mut self, n: usize) {
        self.window_bytes = self.window_bytes.saturating_add(n as u64);
    }

    /// The transaction ended.
    pub fn content_ends(&mut self) {
        self.content_started = None;
    }

    pub fn in_content(&self) -> bool {
        self.content_started.is_some()
    }

    /// The next instant something must be checked while waiting for a command line.
    pub fn command_deadline(&self, t: &Timeouts, stressed: bool) -> Instant {
        let command = self.wait_started + t.command(stressed);
        match self.content_started {
            // Between BDAT chunks the message's total bound still runs.
            Some(t0) => command.min(t0 + t.data),
            None => command,
        }
    }

    /// The next instant something must be checked while content streams in: the end of the
    /// total bound or of the current rate window, whichever comes first.
    pub fn content_deadline(&self, t: &Timeouts, stressed: bool) -> Instant {
        let t0 = self.content_started.unwrap_or(self.window_started);
        let total = t0 + t.data;
        if t.data_rate_min_bytes_per_s == 0 {
            return total;
        }
        total.min(self.window_started + t.window(stressed))
    }

    /// Checks the command wait at `now`.
    pub fn check_command(&self, now: Instant, t: &Timeouts, stressed: bool) -> Option<Expiry> {
        if now < self.command_deadline(t, stressed) {
            return None;
        }
        match self.content_started {
            Some(t0) if now >= t0 + t.data => Some(Expiry::ContentTotal),
            _ => Some(Expiry::Command),
        }
    }

    /// Checks the content bounds at `now`; a rate window that passed with enough bytes makes way
    /// for the next one.
    pub fn check_content(&mut self, now: Instant, t: &Timeouts, stressed: bool) -> Option<Expiry> {
        let t0 = self.content_started.unwrap_or(self.window_started);
        if now >= t0 + t.data {
            return Some(Expiry::ContentTotal);
        }
        if t.data_rate_min_bytes_per_s == 0 {
            return None;
        }
        let window = t.window(stressed);
        if now < self.window_started + window {
            return None;
        }
        let required_bytes = t.window_bytes_min(window);
        if self.window_bytes < required_bytes {
            return Some(Expiry::ContentRate {
                window_bytes: self.window_bytes,
                required_bytes,
            });
        }
        self.window_started = now;
        self.window_bytes = 0;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        command: Duration::from_secs(10),
        stress_command: Duration::from_secs(2),
        data: Duration::from_secs(100),
        data_rate_min_bytes_per_s: 10,
        data_rate_window: Duration::from_secs(5),
    };

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn a_command_line_has_one_deadline_that_bytes_do_not_move() {
        let t0 = Instant::now();
        let d = Deadlines::new(t0);
        // Nothing the client sends short of a whole line resets it.
        assert_eq!(d.command_deadline(&T, false), secs(t0, 10));
        assert_eq!(d.check_command(secs(t0, 9), &T, false), None);
        assert_eq!(d.check_command(secs(t0, 10), &T, false), Some(Expiry::Command));
    }

    #[test]
    fn each_complete_line_starts_the_next_wait() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0);
        d.line_done(secs(t0, 8));
        assert_eq!(d.check_command(secs(t0, 17), &T, false), None);
        assert_eq!(d.check_command(secs(t0, 18), &T, false), Some(Expiry::Command));
    }

    #[test]
    fn stress_shortens_the_command_wait_and_the_rate_window() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0);
        assert_eq!(d.command_deadline(&T, true), secs(t0, 2));
        assert_eq!(d.check_command(secs(t0, 3), &T, true), Some(Expiry::Command));
        d.content_begins(t0);
        assert_eq!(d.content_deadline(&T, true), secs(t0, 2));
        assert_eq!(d.content_deadline(&T, false), secs(t0, 5));
    }

    #[test]
    fn a_window_with_enough_bytes_rolls_and_one_without_closes() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0);
        d.content_begins(t0);
        d.content_bytes(50);
        assert_eq!(d.check_content(secs(t0, 4), &T, false), None);
        assert_eq!(d.check_content(secs(t0, 5), &T, false), None, "50 bytes in 5 s is 10/s");
        assert_eq!(d.content_deadline(&T, false), secs(t0, 10));
        d.content_bytes(49);
        assert_eq!(
            d.check_content(secs(t0, 10), &T, false),
            Some(Expiry::ContentRate {
                window_bytes: 49,
                required_bytes: 50
            })
        );
    }

    #[test]
    fn content_has_a_total_bound_also_between_bdat_chunks() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0);
        d.content_begins(t0);
        d.content_begins(secs(t0, 50));
        let fast = Timeouts {
            data_rate_min_bytes_per_s: 0,
            ..T
        };
        assert_eq!(d.content_deadline(&fast, false), secs(t0, 100));
        d.line_done(secs(t0, 95));
        assert_eq!(d.command_deadline(&fast, false), secs(t0, 100));
        assert_eq!(d.check_command(secs(t0, 100), &fast, false), Some(Expiry::ContentTotal));
        d.content_ends();
        assert!(!d.in_content());
        assert_eq!(d.check_command(secs(t0, 100), &fast, false), None);
    }

    #[test]
    fn a_zero_rate_turns_the_rate_check_off() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(t0);
        d.content_begins(t0);
        let t = Timeouts {
            data_rate_min_bytes_per_s: 0,
            ..T
        };
        assert_eq!(d.check_content(secs(t0, 99), &t, false), None);
        assert_eq!(d.check_content(secs(t0, 100), &t, false), Some(Expiry::ContentTotal));
    }
}
