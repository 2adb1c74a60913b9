//! Suspended destinations: recipient domains an operator has stopped delivery to, each until a
//! time, and the messages parked meanwhile. A parked message waits on the suspension, not on a
//! retry timer: its attempts and backoff do not change, and it is planned again the moment the
//! suspension ends (resumed or expired).
//!
//! Invariant: a parked message has no jobs out and every pending recipient of it was at a
//! suspended domain when it was parked.

use std::collections::BTreeSet;

use gannet_spool::MessageId;

/// Suspensions a shard keeps at most (the admin API refuses more).
pub const SUSPENSIONS_MAX: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suspension {
    /// A recipient domain, lowercase.
    pub domain: String,
    pub until_unix_s: u64,
}

#[derive(Debug, Default)]
pub struct Suspensions {
    active: Vec<Suspension>,
    parked: BTreeSet<MessageId>,
}

impl Suspensions {
    /// Suspends `domain` until `until_unix_s` (replacing an earlier suspension of it). False when
    /// the table is full.
    pub fn suspend(&mut self, domain: &str, until_unix_s: u64) -> bool {
        let domain = domain.to_ascii_lowercase();
        if let Some(s) = self.active.iter_mut().find(|s| s.domain == domain) {
            s.until_unix_s = until_unix_s;
            return true;
        }
        if self.active.len() >= SUSPENSIONS_MAX {
            return false;
        }
        self.active.push(Suspension { domain, until_unix_s });
        true
    }

    /// Ends the suspension of `domain`; the parked messages, to plan again (all of them: those
    /// still stopped by another suspension park again).
    pub fn resume(&mut self, domain: &str) -> Vec<MessageId> {
        let before = self.active.len();
        self.active.retain(|s| !s.domain.eq_ignore_ascii_case(domain));
        if self.active.len() == before {
            return Vec::new();
        }
        self.unpark_all()
    }

    /// Ends the suspensions whose time has come; the parked messages when any did.
    pub fn expire(&mut self, now_unix_s: u64) -> Vec<MessageId> {
        let before = self.active.len();
        self.active.retain(|s| s.until_unix_s > now_unix_s);
        if self.active.len() == before {
            return Vec::new();
        }
        self.unpark_all()
    }

    fn unpark_all(&mut self) -> Vec<MessageId> {
        std::mem::take(&mut self.parked).into_iter().collect()
    }

    /// Whether mail to `domain` (as stored: any case) waits.
    pub fn stops(&self, domain: &[u8]) -> bool {
        !self.active.is_empty()
            && self
                .active
                .iter()
                .any(|s| s.domain.as_bytes().eq_ignore_ascii_case(domain))
    }

    /// When the suspension of `domain` (as stored: any case) ends, if it is suspended.
    pub fn until_unix_s(&self, domain: &[u8]) -> Option<u64> {
        self.active
            .iter()
            .find(|s| s.domain.as_bytes().eq_ignore_ascii_case(domain))
            .map(|s| s.until_unix_s)
    }

    pub fn park(&mut self, id: MessageId) {
        self.parked.insert(id);
    }

    pub fn is_parked(&self, id: &MessageId) -> bool {
        self.parked.contains(id)
    }

    /// A parked message that is gone (delivered elsewhere, deleted).
    pub fn forget(&mut self, id: &MessageId) {
        self.parked.remove(id);
    }

    pub fn active(&self) -> &[Suspension] {
        &self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parked_mail_comes_back_when_its_suspension_ends() {
        let mut s = Suspensions::default();
        assert!(s.suspend("Example.COM", 100));
        assert!(s.stops(b"example.com"));
        assert!(!s.stops(b"other.test"));
        let id = MessageId::new(1, 0, 0);
        s.park(id);
        assert!(s.expire(99).is_empty());
        assert_eq!(s.expire(100), vec![id]);
        assert!(!s.stops(b"example.com"));
        assert!(s.resume("example.com").is_empty(), "nothing to resume");
    }

    #[test]
    fn the_table_is_bounded() {
        let mut s = Suspensions::default();
        for i in 0..SUSPENSIONS_MAX {
            assert!(s.suspend(&format!("d{i}.test"), 1));
        }
        assert!(!s.suspend("one-more.test", 1));
        assert!(s.suspend("d0.test", 5), "an existing one can change");
    }
}
