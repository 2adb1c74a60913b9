//! One shard's numbers. A shard owns its [`ShardMetrics`] alone (no atomics, no sharing): it
//! counts into it on its own thread, and hands a copy to the admin listener when asked; the
//! scrape merges the copies. Gauges that describe the queue and the spool are filled in by the
//! shard when it makes that copy.

use crate::counts::{BoundedCounts, Counts};
use crate::destinations::Destinations;
use crate::histogram::{Histogram, BATCH_MESSAGES, NETWORK_SECONDS, QUEUE_SECONDS, SYNC_SECONDS};

/// Distinct (code, enhanced code) pairs kept per direction; remote servers choose what they
/// send, so the rest is counted as `other`.
pub const REPLY_KINDS_MAX: usize = 256;

/// What the metrics' bounded label sets may hold.
#[derive(Debug, Clone, Copy)]
pub struct MetricsLimits {
    /// Destinations with a label of their own (the rest are `other`).
    pub destinations_max: usize,
    /// Delivery attempts a destination needs on a shard before it gets a label.
    pub destination_label_after_attempts: u64,
}

/// One listener's numbers, in the order of the configuration's `[[listener]]` entries.
#[derive(Debug, Clone, Default)]
pub struct ListenerMetrics {
    /// Connections by result: `accepted` or `refused_<reason>`.
    pub connections: Counts<&'static str>,
    pub connections_active: i64,
    pub messages_received: u64,
    pub received_bytes: u64,
    /// Transactions refused (at MAIL, RCPT, DATA/BDAT or the end of content) by reason.
    pub messages_rejected: Counts<&'static str>,
}

/// Where a message stands in the queue (the `state` label).
pub const QUEUE_STATES: [&str; 5] = ["ready", "deferred", "held", "delivering", "suspended"];

/// The queue's gauges, filled in when a copy is made.
#[derive(Debug, Clone, Default)]
pub struct QueueGauges {
    /// Messages by state, indexed like [`QUEUE_STATES`].
    pub messages: [u64; QUEUE_STATES.len()],
    /// Recipients not yet finished, by their message's state.
    pub recipients: [u64; QUEUE_STATES.len()],
    /// When the oldest queued message was received.
    pub oldest_received_unix_s: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct ShardMetrics {
    pub listeners: Vec<ListenerMetrics>,
    /// Replies we sent to clients, keyed `"<code> <enhanced>"`.
    pub replies_inbound: BoundedCounts,
    /// Replies remote servers sent us, keyed `"<code> <enhanced>"`.
    pub replies_outbound: BoundedCounts,
    pub destinations: Destinations,
    pub retries: u64,
    /// Destination health events: `down` (marked down), `probe_failed`, `up` (again).
    pub destination_health: Counts<&'static str>,
    /// Destinations down now (set when the metrics are gathered).
    pub destinations_down: u64,
    /// Failed and deferred recipients by (bounce class, result): result `failed`, `expired`,
    /// `deferred` or `operator` (returned by the operator; class `other`).
    pub bounces: Counts<(&'static str, &'static str)>,
    /// Actions bounce classes took beyond the reply's own code: `bounce` (a 4xx returned now),
    /// `suppress`, `suspend`.
    pub bounce_actions: Counts<&'static str>,
    /// Recipients the suppression list stopped, by stage: `rcpt` (refused with 550 5.1.1) or
    /// `delivery` (dropped from the queue, no notice).
    pub suppressed: Counts<&'static str>,
    /// Reports read at the bounce domain, by (kind `dsn`/`arf`/`unknown`, result `suppressed`,
    /// `recorded`, `forged`, `unattributed`, `unparseable`).
    pub bounce_reports: Counts<(&'static str, &'static str)>,
    pub expired: u64,
    pub queue_time: Histogram,
    pub delivery_duration: Histogram,
    pub commit_batch: Histogram,
    pub fdatasync: Histogram,
    /// DNS cache lookups by result: hit, miss, negative.
    pub dns_lookups: Counts<&'static str>,
    pub dns_query: Histogram,
    /// TLS handshakes by (direction, version, result).
    pub tls_handshakes: Counts<(&'static str, &'static str, &'static str)>,
    /// AUTH attempts by (mechanism, result).
    pub auth: Counts<(&'static str, &'static str)>,
    /// Refusals by the limit that refused: per_ip, shard_full, rate, auth_throttle, ...
    pub rate_limited: Counts<&'static str>,
    /// DKIM signatures made, by (algorithm, result): result `signed` or `error`.
    pub dkim_signatures: Counts<(&'static str, &'static str)>,
    /// Time from a message's end to its signatures being ready (queueing for the shard's
    /// blocking thread included).
    pub dkim_sign: Histogram,
    /// Inbound mail authentication verdicts, by (method, result): spf, dkim (one per
    /// signature), dmarc.
    pub mail_authentication: Counts<(&'static str, &'static str)>,
    /// Time one message's verification took, its DNS lookups included.
    pub mail_authentication_seconds: Histogram,
    pub queue: QueueGauges,
    pub spool_bytes: u64,
    pub spool_segments: u64,
}

impl ShardMetrics {
    pub fn new(listeners: usize, limits: MetricsLimits) -> ShardMetrics {
        ShardMetrics {
            listeners: vec![ListenerMetrics::default(); listeners],
            replies_inbound: BoundedCounts::new(REPLY_KINDS_MAX),
            replies_outbound: BoundedCounts::new(REPLY_KINDS_MAX),
            destinations: Destinations::new(limits.destinations_max, limits.destination_label_after_attempts),
            retries: 0,
            bounces: Counts::default(),
            bounce_actions: Counts::default(),
            suppressed: Counts::default(),
            bounce_reports: Counts::default(),
            expired: 0,
            queue_time: Histogram::new(QUEUE_SECONDS),
            delivery_duration: Histogram::new(NETWORK_SECONDS),
            commit_batch: Histogram::new(BATCH_MESSAGES),
            fdatasync: Histogram::new(SYNC_SECONDS),
            dns_lookups: Counts::default(),
            dns_query: Histogram::new(NETWORK_SECONDS),
            tls_handshakes: Counts::default(),
            auth: Counts::default(),
            rate_limited: Counts::default(),
            dkim_signatures: Counts::default(),
            dkim_sign: Histogram::new(SYNC_SECONDS),
            mail_authentication: Counts::default(),
            destination_health: Counts::default(),
            destinations_down: 0,
            mail_authentication_seconds: Histogram::new(NETWORK_SECONDS),
            queue: QueueGauges::default(),
            spool_bytes: 0,
            spool_segments: 0,
        }
    }

    /// The listener at `index`; an index past the configuration's listeners is a bug.
    pub fn listener(&mut self, index: usize) -> &mut ListenerMetrics {
        &mut self.listeners[index]
    }

    /// Counts the final line of every reply in `out` (replies we wrote), by code and enhanced code.
    pub fn count_inbound_replies(&mut self, out: &[u8]) {
        for line in out.split(|&b| b == b'\n') {
            if line.len() >= 4 && line[3] == b' ' {
                let key = reply_key(line);
                self.replies_inbound.add(key, 1);
            }
        }
    }

    /// Counts a reply a remote server sent: its code, and the enhanced code its first line
    /// starts with, if any (built on the stack: no allocation once the key is known).
    pub fn count_outbound_reply(&mut self, code: u16, first_line: &str) {
        let mut line = [0u8; 24];
        let digits = [
            b'0' + (code / 100 % 10) as u8,
            b'0' + (code / 10 % 10) as u8,
            b'0' + (code % 10) as u8,
        ];
        line[..3].copy_from_slice(&digits);
        line[3] = b' ';
        let word = first_line.split(' ').next().unwrap_or("").as_bytes();
        let n = word.len().min(line.len() - 4);
        line[4..4 + n].copy_from_slice(&word[..n]);
        let key = reply_key(&line[..4 + n]);
        self.replies_outbound.add(key, 1);
    }

    /// Adds another shard's numbers to these.
    pub fn merge(&mut self, other: &ShardMetrics) {
        if self.listeners.len() < other.listeners.len() {
            self.listeners.resize(other.listeners.len(), ListenerMetrics::default());
        }
        for (mine, theirs) in self.listeners.iter_mut().zip(&other.listeners) {
            mine.connections.merge(&theirs.connections);
            mine.connections_active += theirs.connections_active;
            mine.messages_received += theirs.messages_received;
            mine.received_bytes += theirs.received_bytes;
            mine.messages_rejected.merge(&theirs.messages_rejected);
        }
        self.replies_inbound.merge(&other.replies_inbound);
        self.replies_outbound.merge(&other.replies_outbound);
        self.destinations.merge(&other.destinations);
        self.retries += other.retries;
        self.bounces.merge(&other.bounces);
        self.bounce_actions.merge(&other.bounce_actions);
        self.suppressed.merge(&other.suppressed);
        self.bounce_reports.merge(&other.bounce_reports);
        self.expired += other.expired;
        self.queue_time.merge(&other.queue_time);
        self.delivery_duration.merge(&other.delivery_duration);
        self.commit_batch.merge(&other.commit_batch);
        self.fdatasync.merge(&other.fdatasync);
        self.dns_lookups.merge(&other.dns_lookups);
        self.dns_query.merge(&other.dns_query);
        self.tls_handshakes.merge(&other.tls_handshakes);
        self.auth.merge(&other.auth);
        self.rate_limited.merge(&other.rate_limited);
        self.dkim_signatures.merge(&other.dkim_signatures);
        self.dkim_sign.merge(&other.dkim_sign);
        self.mail_authentication.merge(&other.mail_authentication);
        self.destination_health.merge(&other.destination_health);
        self.destinations_down += other.destinations_down;
        self.mail_authentication_seconds
            .merge(&other.mail_authentication_seconds);
        for i in 0..QUEUE_STATES.len() {
            self.queue.messages[i] += other.queue.messages[i];
            self.queue.recipients[i] += other.queue.recipients[i];
        }
        self.queue.oldest_received_unix_s =
            match (self.queue.oldest_received_unix_s, other.queue.oldest_received_unix_s) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        self.spool_bytes += other.spool_bytes;
        self.spool_segments += other.spool_segments;
    }
}

/// `"<code> <enhanced>"` from a reply line (`250 2.0.0 Ok`, `354 End data...`): the code, and
/// the enhanced code when the text starts with one (`d.d{1,3}.d{1,3}`), else nothing.
pub fn reply_key(line: &[u8]) -> &str {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return "other";
    }
    let rest = if line.len() > 4 { &line[4..] } else { &[][..] };
    let word = rest.split(|&b| b == b' ').next().unwrap_or(&[]);
    let end = if is_enhanced(word) { 4 + word.len() } else { 3 };
    // Digits, dots and the space between them: ASCII, so this cannot fail.
    std::str::from_utf8(&line[..end]).unwrap_or("other")
}

fn is_enhanced(word: &[u8]) -> bool {
    let mut parts = word.split(|&b| b == b'.');
    let ok = |p: Option<&[u8]>, max: usize| {
        p.is_some_and(|p| !p.is_empty() && p.len() <= max && p.iter().all(u8::is_ascii_digit))
    };
    ok(parts.next(), 1) && ok(parts.next(), 3) && ok(parts.next(), 3) && parts.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> MetricsLimits {
        MetricsLimits {
            destinations_max: 4,
            destination_label_after_attempts: 1,
        }
    }

    #[test]
    fn reply_keys_take_the_code_and_a_well_formed_enhanced_code() {
        assert_eq!(reply_key(b"250 2.0.0 Ok\r"), "250 2.0.0");
        assert_eq!(reply_key(b"354 End data with <CR><LF>.<CR><LF>"), "354");
        assert_eq!(reply_key(b"550 5.1.1"), "550 5.1.1");
        assert_eq!(reply_key(b"451 4.3.0000 x"), "451");
        assert_eq!(reply_key(b"xyz hello"), "other");
    }

    #[test]
    fn only_the_last_line_of_a_multiline_reply_counts() {
        let mut m = ShardMetrics::new(1, limits());
        m.count_inbound_replies(b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n220 2.0.0 Ready\r\n");
        assert_eq!(m.replies_inbound.get("250"), 1);
        assert_eq!(m.replies_inbound.get("220 2.0.0"), 1);
    }

    #[test]
    fn outbound_replies_are_keyed_by_code_and_enhanced_code() {
        let mut m = ShardMetrics::new(1, limits());
        m.count_outbound_reply(250, "2.1.5 Recipient ok");
        m.count_outbound_reply(421, "mx.example closing");
        m.count_outbound_reply(550, "5.1.1");
        assert_eq!(m.replies_outbound.get("250 2.1.5"), 1);
        assert_eq!(m.replies_outbound.get("421"), 1);
        assert_eq!(m.replies_outbound.get("550 5.1.1"), 1);
    }

    #[test]
    fn merge_sums_listeners_and_gauges() {
        let mut a = ShardMetrics::new(2, limits());
        let mut b = ShardMetrics::new(2, limits());
        a.listener(1).messages_received = 2;
        b.listener(1).messages_received = 3;
        a.queue.oldest_received_unix_s = Some(10);
        b.queue.oldest_received_unix_s = Some(5);
        b.queue.messages[1] = 7;
        a.merge(&b);
        assert_eq!(a.listeners[1].messages_received, 5);
        assert_eq!(a.queue.oldest_received_unix_s, Some(5));
        assert_eq!(a.queue.messages[1], 7);
    }
}
