//! Idle outbound connections kept for reuse, per receiving site, for up to
//! `delivery.idle_timeout`. Bounded: a site keeps at most what its workers left behind, the
//! shard at most `connections_per_shard_max` in all (the oldest go first), and an evicted site's
//! connections are closed with it. Dropping a connection closes it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use gannet_sched::SiteKey;

use super::outbound::OutboundConnection;

pub struct Pool {
    idle: HashMap<SiteKey, Vec<(OutboundConnection, Instant)>>,
    count: usize,
    count_max: usize,
}

impl Pool {
    /// A reload: at most `count_max` idle connections from now on (the oldest close first as
    /// connections come back).
    pub fn set_count_max(&mut self, count_max: usize) {
        self.count_max = count_max.max(1);
    }

    pub fn new(count_max: usize) -> Pool {
        Pool {
            idle: HashMap::new(),
            count: 0,
            count_max: count_max.max(1),
        }
    }

    /// The most recently parked connection of a site.
    pub fn take(&mut self, key: &SiteKey) -> Option<OutboundConnection> {
        let list = self.idle.get_mut(key)?;
        let (conn, _) = list.pop()?;
        if list.is_empty() {
            self.idle.remove(key);
        }
        self.count -= 1;
        Some(conn)
    }

    pub fn put(&mut self, key: SiteKey, conn: OutboundConnection, now: Instant) {
        if self.count >= self.count_max {
            self.close_oldest();
        }
        self.idle.entry(key).or_default().push((conn, now));
        self.count += 1;
    }

    /// Closes connections idle for `idle_timeout` or more.
    pub fn expire(&mut self, idle_timeout: Duration, now: Instant) {
        let mut closed = 0;
        self.idle.retain(|_, list| {
            let before = list.len();
            list.retain(|(_, since)| now.saturating_duration_since(*since) < idle_timeout);
            closed += before - list.len();
            !list.is_empty()
        });
        self.count -= closed;
    }

    /// Closes a site's idle connections (it was evicted, or one of them proved dead).
    pub fn close_site(&mut self, key: &SiteKey) {
        if let Some(list) = self.idle.remove(key) {
            self.count -= list.len();
        }
    }

    /// Closes the oldest idle connection to one of `ips` (another site's, since a worker asks
    /// only when it found none of its own): its place under the per-address cap is needed.
    /// True if one was closed.
    pub fn close_idle_to(&mut self, ips: &[std::net::IpAddr]) -> bool {
        let oldest = self
            .idle
            .iter()
            .flat_map(|(k, list)| {
                list.iter()
                    .enumerate()
                    .map(move |(i, (c, since))| (*since, k, i, c.peer.ip()))
            })
            .filter(|(_, _, _, ip)| ips.contains(ip))
            .min_by_key(|(since, ..)| *since)
            .map(|(_, k, i, _)| (k.clone(), i));
        let Some((key, i)) = oldest else {
            return false;
        };
        let list = self.idle.get_mut(&key).expect("found");
        list.remove(i);
        self.count -= 1;
        if list.is_empty() {
            self.idle.remove(&key);
        }
        true
    }

    /// Idle connections of the sites `wanted` selects.
    pub fn count_where(&self, wanted: impl Fn(&SiteKey) -> bool) -> usize {
        self.idle.iter().filter(|(k, _)| wanted(k)).map(|(_, l)| l.len()).sum()
    }

    /// Takes out the oldest idle connection of the sites `wanted` selects (to close it).
    pub fn take_oldest_where(&mut self, wanted: impl Fn(&SiteKey) -> bool) -> Option<OutboundConnection> {
        let oldest = self
            .idle
            .iter()
            .filter(|(k, _)| wanted(k))
            .flat_map(|(k, list)| list.iter().enumerate().map(move |(i, (_, since))| (*since, k, i)))
            .min_by_key(|(since, ..)| *since)
            .map(|(_, k, i)| (k.clone(), i));
        let (key, i) = oldest?;
        let list = self.idle.get_mut(&key).expect("found");
        let (conn, _) = list.remove(i);
        self.count -= 1;
        if list.is_empty() {
            self.idle.remove(&key);
        }
        Some(conn)
    }

    fn close_oldest(&mut self) {
        let oldest = self
            .idle
            .iter()
            .filter_map(|(k, list)| list.first().map(|(_, since)| (*since, k.clone())))
            .min();
        if let Some((_, key)) = oldest {
            let list = self.idle.get_mut(&key).expect("found");
            list.remove(0);
            self.count -= 1;
            if list.is_empty() {
                self.idle.remove(&key);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}
