//! Per-destination counters with a bounded set of label values.
//!
//! A receiving site gets a label of its own once it has had `label_after_attempts` delivery
//! attempts on this shard and one of the `named_max` labels is free; a label, once given, is
//! kept for the life of the process, so every series stays monotonic. Everything else is counted
//! under `other`. Sites still waiting for a label are counted in a map of at most
//! `CANDIDATES_MAX` entries keyed by a 64-bit hash of the name (16 bytes an entry, whatever the
//! name's length), cleared when it fills up (their attempts are in `other` meanwhile).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::counts::{Counts, OTHER};

/// Where a destination's numbers go: a label of its own, or `other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Named(usize),
    Other,
}

#[derive(Debug, Clone, Default)]
pub struct DestinationCounts {
    /// Delivery attempts by result: delivered, deferred, failed.
    pub attempts: Counts<&'static str>,
    /// Outbound connections open now.
    pub connections_active: i64,
}

impl DestinationCounts {
    fn merge(&mut self, other: &DestinationCounts) {
        self.attempts.merge(&other.attempts);
        self.connections_active += other.connections_active;
    }
}

/// Sites waiting for a label, at most (then the map starts over).
const CANDIDATES_MAX: usize = 1024;

#[derive(Debug)]
pub struct Destinations {
    named_max: usize,
    label_after_attempts: u64,
    named: Vec<(String, DestinationCounts)>,
    other: DestinationCounts,
    /// Attempts so far of sites without a label, by the hash of their name.
    candidates: HashMap<u64, u64>,
}

/// A copy for a scrape: the counts, not the candidates.
impl Clone for Destinations {
    fn clone(&self) -> Destinations {
        Destinations {
            named_max: self.named_max,
            label_after_attempts: self.label_after_attempts,
            named: self.named.clone(),
            other: self.other.clone(),
            candidates: HashMap::new(),
        }
    }
}

fn name_hash(name: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

impl Destinations {
    pub fn new(named_max: usize, label_after_attempts: u64) -> Destinations {
        Destinations {
            named_max,
            label_after_attempts,
            named: Vec::new(),
            other: DestinationCounts::default(),
            candidates: HashMap::new(),
        }
    }

    /// The slot `name`'s numbers go to now, without counting anything.
    pub fn slot(&self, name: &str) -> Slot {
        self.named
            .iter()
            .position(|(n, _)| n == name)
            .map_or(Slot::Other, Slot::Named)
    }

    /// Counts one delivery attempt and its result; may give `name` a label of its own.
    pub fn attempt(&mut self, name: &str, result: &'static str) {
        let slot = match self.slot(name) {
            Slot::Named(i) => Slot::Named(i),
            Slot::Other => self.promote(name),
        };
        self.counts_mut(slot).attempts.add(result, 1);
    }

    fn promote(&mut self, name: &str) -> Slot {
        if self.named.len() >= self.named_max || name == OTHER {
            return Slot::Other;
        }
        let key = name_hash(name);
        let seen = match self.candidates.get_mut(&key) {
            Some(n) => {
                *n += 1;
                *n
            }
            None => {
                if self.candidates.len() >= CANDIDATES_MAX {
                    self.candidates.clear();
                }
                self.candidates.insert(key, 1);
                1
            }
        };
        debug_assert!(self.candidates.len() <= CANDIDATES_MAX);
        if seen < self.label_after_attempts {
            return Slot::Other;
        }
        self.candidates.remove(&key);
        self.named.push((name.to_owned(), DestinationCounts::default()));
        Slot::Named(self.named.len() - 1)
    }

    pub fn counts_mut(&mut self, slot: Slot) -> &mut DestinationCounts {
        match slot {
            Slot::Named(i) => &mut self.named[i].1,
            Slot::Other => &mut self.other,
        }
    }

    /// An outbound connection opened; hand the slot back to [`Destinations::closed`].
    pub fn opened(&mut self, name: &str) -> Slot {
        let slot = self.slot(name);
        self.counts_mut(slot).connections_active += 1;
        slot
    }

    pub fn closed(&mut self, slot: Slot) {
        let counts = self.counts_mut(slot);
        counts.connections_active -= 1;
        debug_assert!(counts.connections_active >= 0);
    }

    /// Adds another shard's numbers, by name.
    pub fn merge(&mut self, other: &Destinations) {
        for (name, counts) in &other.named {
            match self.named.iter_mut().find(|(n, _)| n == name) {
                Some((_, mine)) => mine.merge(counts),
                None => self.named.push((name.clone(), counts.clone())),
            }
        }
        self.other.merge(&other.other);
    }

    /// Every labelled destination, then `other`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &DestinationCounts)> + '_ {
        self.named
            .iter()
            .map(|(n, c)| (n.as_str(), c))
            .chain(std::iter::once((OTHER, &self.other)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_destination_gets_a_label_and_keeps_it() {
        let mut d = Destinations::new(1, 3);
        d.attempt("mx.a", "delivered");
        d.attempt("mx.a", "delivered");
        assert_eq!(d.slot("mx.a"), Slot::Other);
        d.attempt("mx.a", "deferred");
        assert_eq!(d.slot("mx.a"), Slot::Named(0));
        for _ in 0..10 {
            d.attempt("mx.b", "delivered");
        }
        assert_eq!(d.slot("mx.b"), Slot::Other, "only one label");
        let all: Vec<_> = d
            .iter()
            .map(|(n, c)| (n.to_owned(), c.attempts.iter().map(|(_, v)| v).sum::<u64>()))
            .collect();
        assert_eq!(all, vec![("mx.a".to_owned(), 1), ("other".to_owned(), 12)]);
    }

    #[test]
    fn connection_gauges_return_to_the_slot_they_came_from() {
        let mut d = Destinations::new(4, 1);
        let before = d.opened("mx.a");
        d.attempt("mx.a", "delivered");
        d.closed(before);
        assert!(d.iter().all(|(_, c)| c.connections_active == 0));
    }
}
