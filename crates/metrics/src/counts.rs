//! Counters keyed by label values.
//!
//! - [`Counts`]: keys from a vocabulary fixed in the code (`&'static str`, small enums); bounded
//!   by that vocabulary, so no limit is needed.
//! - [`BoundedCounts`]: keys that come from outside (reply codes a remote server sent, names of
//!   receiving sites); at most `entries_max` distinct keys, the rest counted under [`OTHER`].

/// The label value that stands for every key past a [`BoundedCounts`]'s limit.
pub const OTHER: &str = "other";

/// Counters for a small, fixed set of keys, in first-seen order. Linear search: the sets here
/// have a handful of members.
#[derive(Debug, Clone)]
pub struct Counts<K> {
    entries: Vec<(K, u64)>,
}

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Counts { entries: Vec::new() }
    }
}

impl<K: Copy + PartialEq> Counts<K> {
    pub fn add(&mut self, key: K, n: u64) {
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v += n,
            None => self.entries.push((key, n)),
        }
    }

    pub fn get(&self, key: K) -> u64 {
        self.entries.iter().find(|(k, _)| *k == key).map_or(0, |(_, v)| *v)
    }

    pub fn merge(&mut self, other: &Counts<K>) {
        for &(k, v) in &other.entries {
            self.add(k, v);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (K, u64)> + '_ {
        self.entries.iter().copied()
    }
}

/// Counters keyed by strings from outside, at most `entries_max` of them.
#[derive(Debug, Clone)]
pub struct BoundedCounts {
    entries_max: usize,
    entries: Vec<(String, u64)>,
    other: u64,
}

impl BoundedCounts {
    pub fn new(entries_max: usize) -> BoundedCounts {
        BoundedCounts {
            entries_max,
            entries: Vec::new(),
            other: 0,
        }
    }

    /// Counts `n` under `key`, or under [`OTHER`] once `entries_max` keys are in use. A key is
    /// copied only the first time it is seen.
    pub fn add(&mut self, key: &str, n: u64) {
        if let Some((_, v)) = self.entries.iter_mut().find(|(k, _)| k == key) {
            *v += n;
        } else if self.entries.len() < self.entries_max && key != OTHER {
            self.entries.push((key.to_owned(), n));
        } else {
            self.other += n;
        }
        debug_assert!(self.entries.len() <= self.entries_max);
    }

    pub fn get(&self, key: &str) -> u64 {
        if key == OTHER {
            return self.other;
        }
        self.entries.iter().find(|(k, _)| k == key).map_or(0, |(_, v)| *v)
    }

    /// Adds another shard's counts; keys past this one's limit go to [`OTHER`].
    pub fn merge(&mut self, other: &BoundedCounts) {
        for (k, v) in &other.entries {
            self.add(k, *v);
        }
        self.other += other.other;
    }

    /// Every key with its count, [`OTHER`] last when anything was counted there.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        let other = (self.other > 0).then_some((OTHER, self.other));
        self.entries.iter().map(|(k, v)| (k.as_str(), *v)).chain(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_past_the_limit_count_as_other() {
        let mut c = BoundedCounts::new(2);
        c.add("a", 1);
        c.add("b", 1);
        c.add("c", 5);
        c.add("a", 1);
        assert_eq!(c.get("a"), 2);
        assert_eq!(c.get("c"), 0);
        assert_eq!(c.get(OTHER), 5);
        assert_eq!(c.iter().count(), 3);
    }

    #[test]
    fn merging_keeps_the_limit_and_the_total() {
        let mut a = BoundedCounts::new(2);
        let mut b = BoundedCounts::new(2);
        a.add("x", 1);
        a.add("y", 1);
        b.add("z", 3);
        b.add("x", 2);
        a.merge(&b);
        assert_eq!(a.get("x"), 3);
        assert_eq!(a.get(OTHER), 3);
        assert_eq!(a.iter().map(|(_, v)| v).sum::<u64>(), 7);
    }

    #[test]
    fn static_counts_sum_by_key() {
        let mut c: Counts<&'static str> = Counts::default();
        c.add("hit", 2);
        c.add("miss", 1);
        c.add("hit", 1);
        assert_eq!(c.get("hit"), 3);
        assert_eq!(c.get("negative"), 0);
    }
}
