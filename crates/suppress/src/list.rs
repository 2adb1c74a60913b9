//! The shared, bounded map of suppressions.
//!
//! Keys are `<scope>\t<address>` (`global\tbob@example.com`, `news.example.com\tbob@...`): a
//! tab is in neither part. Readers (every shard, on every RCPT and before every delivery) look
//! up without a lock and, once warm, without allocating: the key is built in a buffer of the
//! reading thread's own. Inserts and removals come from one writer at a time (the shell's
//! journal writer, which syncs each change before it makes it), so the bound is exact.
//!
//! Invariant: `len() <= entries_max()`. When full, an insert first drops expired entries; if
//! none are, the insert is refused ([`Full`]) rather than evicting a live suppression, whose
//! loss would mail an address that bounced or complained.

use std::cell::RefCell;

use crate::entry::{Entry, Scope, Source};

/// The largest `entries_max` a list may have.
pub const ENTRIES_MAX_LIMIT: usize = 50_000_000;

/// The list is full of live entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// Why an address is suppressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub scope: Scope,
    pub entry: Entry,
}

/// One entry, as listed and exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub scope: Scope,
    pub address: String,
    pub entry: Entry,
}

pub struct SuppressionList {
    map: papaya::HashMap<Box<str>, Entry>,
    entries_max: usize,
}

thread_local! {
    /// The reading thread's key buffer.
    static KEY: RefCell<String> = RefCell::new(String::with_capacity(400));
}

/// Writes `<scope, lowercase>\t<address, lowercase>` into `key`.
fn build_key(key: &mut String, scope: &[u8], address: &[u8]) {
    key.clear();
    key.extend(
        scope
            .iter()
            .map(|b| char::from(b.to_ascii_lowercase()))
            .filter(char::is_ascii),
    );
    key.push('\t');
    let scope_len = key.len() - 1;
    for &b in address.iter().filter(|b| !matches!(b, b'<' | b'>')) {
        if b.is_ascii() {
            key.push(b.to_ascii_lowercase() as char);
        } else {
            // Non-ASCII (SMTPUTF8) addresses: the slow path lowercases the whole text.
            let text = String::from_utf8_lossy(address).to_lowercase();
            key.truncate(scope_len + 1);
            key.push_str(text.trim_start_matches('<').trim_end_matches('>'));
            return;
        }
    }
}

fn split_key(key: &str) -> (Scope, &str) {
    let (scope, address) = key.split_once('\t').unwrap_or(("global", key));
    let scope = Scope::parse(scope).unwrap_or(Scope::Global);
    (scope, address)
}

impl SuppressionList {
    /// An empty list of at most `entries_max` entries (1 to [`ENTRIES_MAX_LIMIT`]).
    pub fn new(entries_max: usize) -> SuppressionList {
        assert!(
            (1..=ENTRIES_MAX_LIMIT).contains(&entries_max),
            "entries_max out of range"
        );
        SuppressionList {
            map: papaya::HashMap::new(),
            entries_max,
        }
    }

    pub fn entries_max(&self) -> usize {
        self.entries_max
    }

    pub fn len(&self) -> usize {
        self.map.pin().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether mail from a sender of `sender_domain` to `address` (as the envelope has it: any
    /// case, with or without angle brackets) is suppressed at `now_unix_s`: by a global entry,
    /// else by one for that sender domain. Expired entries do not count.
    pub fn check(&self, address: &[u8], sender_domain: &[u8], now_unix_s: u64) -> Option<Hit> {
        if self.map.pin().is_empty() {
            return None;
        }
        KEY.with(|key| {
            let mut key = key.borrow_mut();
            build_key(&mut key, b"global", address);
            if let Some(hit) = self.live(&key, now_unix_s) {
                return Some(hit);
            }
            if sender_domain.is_empty() {
                return None;
            }
            build_key(&mut key, sender_domain, address);
            self.live(&key, now_unix_s)
        })
    }

    fn live(&self, key: &str, now_unix_s: u64) -> Option<Hit> {
        let map = self.map.pin();
        let entry = map.get(key)?;
        if entry.is_expired(now_unix_s) {
            return None;
        }
        Some(Hit {
            scope: split_key(key).0,
            entry: entry.clone(),
        })
    }

    /// The entry for exactly this scope and (normalized) address, expired or not.
    pub fn get(&self, scope: &Scope, address: &str) -> Option<Entry> {
        let key = format!("{}\t{address}", scope.as_str());
        self.map.pin().get(key.as_str()).cloned()
    }

    /// Adds or replaces the entry for `scope` and `address` (normalized). A replacement keeps
    /// the list's size; a new entry into a full list first drops the expired ones.
    pub fn insert(&self, scope: &Scope, address: &str, entry: Entry, now_unix_s: u64) -> Result<(), Full> {
        let key: Box<str> = format!("{}\t{address}", scope.as_str()).into();
        let map = self.map.pin();
        if !map.contains_key(&*key) && map.len() >= self.entries_max {
            map.retain(|_, e| !e.is_expired(now_unix_s));
            if map.len() >= self.entries_max {
                return Err(Full);
            }
        }
        map.insert(key, entry);
        debug_assert!(map.len() <= self.entries_max);
        Ok(())
    }

    /// Whether there is an entry for exactly this scope and (normalized) address.
    pub fn contains(&self, scope: &Scope, address: &str) -> bool {
        let key = format!("{}\t{address}", scope.as_str());
        self.map.pin().contains_key(key.as_str())
    }

    /// Drops the expired entries; how many. The shell calls it when a batch of adds would not
    /// fit, before it journals them, so the journal holds only adds the list takes.
    pub fn prune_expired(&self, now_unix_s: u64) -> usize {
        let map = self.map.pin();
        let before = map.len();
        map.retain(|_, e| !e.is_expired(now_unix_s));
        before - map.len()
    }

    /// Removes the entry for `scope` and `address` (normalized); whether there was one.
    pub fn remove(&self, scope: &Scope, address: &str) -> bool {
        let key = format!("{}\t{address}", scope.as_str());
        self.map.pin().remove(key.as_str()).is_some()
    }

    /// Every entry, in no order.
    pub fn for_each(&self, mut f: impl FnMut(Listed)) {
        for (key, entry) in self.map.pin().iter() {
            let (scope, address) = split_key(key);
            f(Listed {
                scope,
                address: address.to_string(),
                entry: entry.clone(),
            });
        }
    }

    /// The entries that `keep` selects, newest first, from `offset`, at most `limit`; and how
    /// many matched in all. O(n log n) in the matching entries: for the API, not the hot path.
    pub fn list(&self, keep: impl Fn(&Listed) -> bool, offset: usize, limit: usize) -> (usize, Vec<Listed>) {
        let mut found = Vec::new();
        self.for_each(|l| {
            if keep(&l) {
                found.push(l);
            }
        });
        let matched = found.len();
        found.sort_by(|a, b| {
            b.entry
                .added_unix_s
                .cmp(&a.entry.added_unix_s)
                .then_with(|| a.address.cmp(&b.address))
        });
        (matched, found.into_iter().skip(offset).take(limit).collect())
    }

    /// How many entries came from each source.
    pub fn count_by_source(&self) -> [(Source, usize); 4] {
        let mut counts = Source::ALL.map(|s| (s, 0usize));
        for (_, entry) in self.map.pin().iter() {
            if let Some(c) = counts.iter_mut().find(|(s, _)| *s == entry.source) {
                c.1 += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(expires: u64) -> Entry {
        Entry::new("550 5.1.1 no such user", Source::HardBounce, 100, expires)
    }

    #[test]
    fn global_and_sender_domain_scopes() {
        let list = SuppressionList::new(10);
        let news = Scope::parse("news.example.com").unwrap();
        list.insert(&Scope::Global, "gone@example.org", entry(0), 0).unwrap();
        list.insert(&news, "tired@example.org", entry(0), 0).unwrap();
        let hit = list.check(b"<Gone@Example.ORG>", b"other.test", 200).unwrap();
        assert_eq!(hit.scope, Scope::Global);
        assert_eq!(
            list.check(b"tired@example.org", b"NEWS.example.com", 200)
                .unwrap()
                .scope,
            news
        );
        assert_eq!(list.check(b"tired@example.org", b"shop.example.com", 200), None);
        assert_eq!(list.check(b"tired@example.org", b"", 200), None);
        assert_eq!(list.check(b"someone@example.org", b"news.example.com", 200), None);
        assert!(list.remove(&news, "tired@example.org"));
        assert!(!list.remove(&news, "tired@example.org"));
        assert_eq!(list.check(b"tired@example.org", b"news.example.com", 200), None);
    }

    #[test]
    fn expired_entries_do_not_count_and_make_room_when_full() {
        let list = SuppressionList::new(2);
        list.insert(&Scope::Global, "a@x.test", entry(150), 0).unwrap();
        list.insert(&Scope::Global, "b@x.test", entry(0), 0).unwrap();
        assert!(list.check(b"a@x.test", b"", 149).is_some());
        assert!(list.check(b"a@x.test", b"", 150).is_none());
        // Full: a replacement fits, a new one only once the expired entry is dropped.
        list.insert(&Scope::Global, "b@x.test", entry(0), 100).unwrap();
        assert_eq!(list.insert(&Scope::Global, "c@x.test", entry(0), 100), Err(Full));
        list.insert(&Scope::Global, "c@x.test", entry(0), 200).unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(
            list.insert(&Scope::Global, "d@x.test", entry(0), 200),
            Err(Full),
            "live entries are never evicted"
        );
        assert!(list.contains(&Scope::Global, "c@x.test"));
        assert!(!list.contains(&Scope::Global, "d@x.test"));
    }

    #[test]
    fn pruning_drops_only_expired_entries() {
        let list = SuppressionList::new(3);
        list.insert(&Scope::Global, "a@x.test", entry(150), 0).unwrap();
        list.insert(&Scope::Global, "b@x.test", entry(0), 0).unwrap();
        assert_eq!(list.prune_expired(149), 0);
        assert_eq!(list.prune_expired(150), 1);
        assert!(list.contains(&Scope::Global, "b@x.test") && list.len() == 1);
    }

    #[test]
    fn listing_filters_pages_and_counts() {
        let list = SuppressionList::new(100);
        for i in 0..10u64 {
            let source = if i % 2 == 0 { Source::Operator } else { Source::Import };
            list.insert(
                &Scope::Global,
                &format!("u{i}@x.test"),
                Entry::new("r", source, i, 0),
                0,
            )
            .unwrap();
        }
        let (matched, page) = list.list(|l| l.entry.source == Source::Import, 1, 2);
        assert_eq!(matched, 5);
        let addresses: Vec<&str> = page.iter().map(|l| l.address.as_str()).collect();
        assert_eq!(addresses, ["u7@x.test", "u5@x.test"], "newest first, from the offset");
        let counts = list.count_by_source();
        assert!(counts.contains(&(Source::Operator, 5)) && counts.contains(&(Source::Import, 5)));
    }

    #[test]
    fn non_ascii_addresses_are_lowercased_too() {
        let list = SuppressionList::new(10);
        list.insert(&Scope::Global, "jörg@bücher.example", entry(0), 0).unwrap();
        assert!(list.check("JÖRG@Bücher.example".as_bytes(), b"", 0).is_some());
    }
}
