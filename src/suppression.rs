//! The suppression list in the server (docs/bounces.md, "Suppression list"): one
//! [`gannet_suppress::SuppressionList`] for the process, read by every shard without a lock on
//! each relayed RCPT and before each delivery, and its journal `<spool>/suppressions.csv`.
//!
//! Invariant: an entry is in the map only once its journal record is on stable storage
//! (appended and `fdatasync`ed), so a suppression relied upon survives SIGKILL. Writers (hard
//! bounces on any shard, the admin API) take one mutex, on a blocking thread of their shard
//! (`spawn_blocking`), never on the executor: the sync takes milliseconds. A failed write is
//! cut back off the file, so a later record never follows a torn one. When the journal holds
//! more than twice the live entries (plus slack), it is rewritten whole: a temporary file,
//! fsync, rename, fsync of the directory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use gannet_metrics::SuppressionCounts;
use gannet_suppress::journal::{self, Change};
use gannet_suppress::{Entry, Hit, Scope, Source, SuppressionList};
use tracing::{info, warn};

use crate::config::{AtRcpt, Config, Suppression};

pub const JOURNAL_FILE: &str = "suppressions.csv";
/// Records beyond twice the live entries a journal may hold before it is compacted.
const COMPACT_SLACK_RECORDS: u64 = 1000;

/// The list, its journal and the settings it was opened with (`[suppression]` is read at
/// start; a reload does not change it).
pub struct Suppressions {
    list: SuppressionList,
    writer: Mutex<Writer>,
    settings: Suppression,
    hard_bounce_scope: HardBounceScope,
    added: [AtomicU64; 4],
    refused_full: AtomicU64,
    /// The replay refused adds (the journal holds more live entries than `entries_max`, which
    /// was lowered): the journal is then never compacted, which would drop them for good.
    replay_refused: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HardBounceScope {
    Global,
    SenderDomain,
}

struct Writer {
    path: PathBuf,
    file: File,
    /// The file's length after the last good write (a failed one is cut back to it).
    length_bytes: u64,
    /// Records in the file (adds and removals), for compaction.
    records: u64,
    /// A failed write could not be cut back: no more writes until a restart.
    broken: bool,
}

/// What one batch of changes did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    pub added: usize,
    pub removed: usize,
    /// Adds refused because the list is full of live entries (`suppression.entries_max`).
    pub refused_full: usize,
}

static SHARED: OnceLock<Suppressions> = OnceLock::new();

/// The list, if the server opened it (`[suppression] enabled`).
pub fn get() -> Option<&'static Suppressions> {
    SHARED.get()
}

/// Opens the list at start: replays `<spool>/suppressions.csv` (a missing file is an empty
/// list), cuts a torn last record and compacts a long journal. The error names the file and
/// line. Does nothing when suppression is off.
pub fn open(config: &Config, now_unix_s: u64) -> Result<(), String> {
    let settings = &config.suppression;
    if !settings.enabled {
        return Ok(());
    }
    let opened = Suppressions::open(&config.spool.directory, settings, now_unix_s)?;
    let entries = opened.list.len();
    if SHARED.set(opened).is_err() {
        return Err("the suppression list was opened twice".into());
    }
    info!(entries, "suppression list loaded");
    Ok(())
}

impl Suppressions {
    fn open(spool: &Path, settings: &Suppression, now_unix_s: u64) -> Result<Suppressions, String> {
        let path = spool.join(JOURNAL_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let list = SuppressionList::new(settings.entries_max);
        let replayed = journal::replay(&bytes, &list, now_unix_s).map_err(|e| {
            format!(
                "{}: {e}; fix or delete that line (each line is add,scope,address,source,added,expires,reason or remove,scope,address)",
                path.display()
            )
        })?;
        if replayed.refused_full > 0 {
            warn!(
                refused = replayed.refused_full,
                "the suppression journal holds more live entries than suppression.entries_max = {}; the later ones were not loaded (they stay in the journal, which is not compacted, until entries_max is raised)",
                settings.entries_max
            );
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let writer = Writer {
            path,
            file,
            length_bytes: bytes.len() as u64,
            records: replayed.records,
            broken: false,
        };
        let suppressions = Suppressions {
            list,
            writer: Mutex::new(writer),
            settings: settings.clone(),
            hard_bounce_scope: if settings.hard_bounce_scope == "sender-domain" {
                HardBounceScope::SenderDomain
            } else {
                HardBounceScope::Global
            },
            added: Default::default(),
            refused_full: AtomicU64::new(0),
            replay_refused: replayed.refused_full > 0,
        };
        let mut writer = suppressions.lock();
        if replayed.torn_tail {
            // A torn record must not stay in the middle of the file once more are appended:
            // cut it (it was never synced, so never relied upon).
            let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |end| end + 1) as u64;
            writer
                .file
                .set_len(whole)
                .and_then(|()| writer.file.sync_data())
                .map_err(|e| format!("cannot cut the torn last record of {}: {e}", writer.path.display()))?;
            writer.length_bytes = whole;
            warn!(
                "{}: cut a torn last record (a write a crash interrupted)",
                writer.path.display()
            );
        }
        if suppressions.journal_is_long(&writer) {
            suppressions
                .compact(&mut writer, now_unix_s)
                .map_err(|e| format!("cannot rewrite {}: {e}", writer.path.display()))?;
        }
        drop(writer);
        Ok(suppressions)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        // A writer that panicked left the file as it was (the map changes only after a sync).
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn settings(&self) -> &Suppression {
        &self.settings
    }

    pub fn list(&self) -> &SuppressionList {
        &self.list
    }

    /// Whether mail from `sender` (an address, possibly empty) to `recipient` is suppressed.
    pub fn check(&self, recipient: &[u8], sender: &[u8], now_unix_s: u64) -> Option<Hit> {
        self.list.check(recipient, domain_part(sender), now_unix_s)
    }

    /// The change a hard bounce of `recipient` makes (scope and expiry per `[suppression]`);
    /// None if the address cannot be an entry's.
    pub fn hard_bounce(&self, recipient: &[u8], sender: &[u8], reason: &str, now_unix_s: u64) -> Option<Change> {
        let address = gannet_suppress::normalize_address(std::str::from_utf8(recipient).ok()?).ok()?;
        let scope = match self.hard_bounce_scope {
            HardBounceScope::Global => Scope::Global,
            HardBounceScope::SenderDomain => {
                let domain = std::str::from_utf8(domain_part(sender)).ok()?;
                if domain.is_empty() {
                    // A bounce of a bounce: no sender domain to scope it to.
                    Scope::Global
                } else {
                    Scope::parse(domain).ok()?
                }
            }
        };
        let expires_unix_s = self
            .settings
            .hard_bounce_expires_after
            .map_or(0, |s| now_unix_s + s.0.as_secs().max(1));
        Some(Change::Add {
            scope,
            address,
            entry: Entry::new(reason, Source::HardBounce, now_unix_s, expires_unix_s),
        })
    }

    /// The counters for a scrape.
    pub fn counts(&self) -> SuppressionCounts {
        let mut added_by_source = [("", 0); 4];
        for (slot, source) in added_by_source.iter_mut().zip(Source::ALL) {
            *slot = (
                source.as_str(),
                self.added[source_index(source)].load(Ordering::Relaxed),
            );
        }
        SuppressionCounts {
            entries: self.list.len() as u64,
            entries_max: self.list.entries_max() as u64,
            added_by_source,
            refused_full: self.refused_full.load(Ordering::Relaxed),
        }
    }
}

fn source_index(source: Source) -> usize {
    Source::ALL
        .iter()
        .position(|s| *s == source)
        .expect("every source is in ALL")
}

/// The domain of an address (`a@b` → `b`), empty without an `@`.
fn domain_part(address: &[u8]) -> &[u8] {
    match memchr::memrchr(b'@', address) {
        Some(at) => &address[at + 1..],
        None => &[],
    }
}

impl Suppressions {
    /// Makes `changes` durable, then applies them (see the module's doc). Blocks: call it on a
    /// blocking thread ([`apply`]) or at start. Removals of absent entries and adds that the
    /// full list cannot take are not written.
    pub fn apply_now(&self, changes: &[Change], now_unix_s: u64) -> Result<Applied, String> {
        let mut writer = self.lock();
        if writer.broken {
            return Err(
                "the suppression journal could not be repaired after a failed write; restart the server".into(),
            );
        }
        let (taken, applied) = self.select(changes, now_unix_s);
        if taken.is_empty() {
            return Ok(applied);
        }
        let mut bytes = Vec::with_capacity(taken.len() * 96);
        for change in &taken {
            bytes.extend_from_slice(&journal::encode(change));
        }
        if let Err(e) = writer.append(&bytes) {
            return Err(format!("cannot write {}: {e}", writer.path.display()));
        }
        for change in taken {
            match change {
                Change::Add { scope, address, entry } => {
                    let source = entry.source;
                    let inserted = self.list.insert(&scope, &address, entry, now_unix_s);
                    debug_assert!(inserted.is_ok(), "room was made before the write");
                    self.added[source_index(source)].fetch_add(1, Ordering::Relaxed);
                }
                Change::Remove { scope, address } => {
                    self.list.remove(&scope, &address);
                }
            }
        }
        if self.journal_is_long(&writer) {
            if let Err(e) = self.compact(&mut writer, now_unix_s) {
                warn!(
                    "cannot compact {}: {e}; the journal stays as it is",
                    writer.path.display()
                );
            }
        }
        Ok(applied)
    }

    /// The changes worth writing: adds the list can take (expired entries are dropped to make
    /// room), removals of present entries. Called with the writer's lock held.
    fn select(&self, changes: &[Change], now_unix_s: u64) -> (Vec<Change>, Applied) {
        let mut applied = Applied::default();
        let mut taken = Vec::with_capacity(changes.len());
        // What the batch has done so far to each key it touched: present or not.
        let mut overlay: HashMap<(&str, &str), bool> = HashMap::new();
        let mut room = self.list.entries_max().saturating_sub(self.list.len());
        let adds = changes.iter().filter(|c| matches!(c, Change::Add { .. })).count();
        if adds > room {
            self.list.prune_expired(now_unix_s);
            room = self.list.entries_max().saturating_sub(self.list.len());
        }
        for change in changes {
            let (scope, address) = match change {
                Change::Add { scope, address, .. } | Change::Remove { scope, address } => (scope, address),
            };
            let key = (scope.as_str(), address.as_str());
            let present = overlay
                .get(&key)
                .copied()
                .unwrap_or_else(|| self.list.contains(scope, address));
            match change {
                Change::Add { .. } => {
                    if !present {
                        if room == 0 {
                            applied.refused_full += 1;
                            continue;
                        }
                        room -= 1;
                    }
                    overlay.insert(key, true);
                    applied.added += 1;
                    taken.push(change.clone());
                }
                Change::Remove { .. } if present => {
                    overlay.insert(key, false);
                    room += 1;
                    applied.removed += 1;
                    taken.push(change.clone());
                }
                Change::Remove { .. } => {}
            }
        }
        if applied.refused_full > 0 {
            self.refused_full
                .fetch_add(applied.refused_full as u64, Ordering::Relaxed);
            warn!(
                refused = applied.refused_full,
                "the suppression list is full of live entries (suppression.entries_max = {}); new entries were refused",
                self.list.entries_max()
            );
        }
        (taken, applied)
    }

    fn journal_is_long(&self, writer: &Writer) -> bool {
        !self.replay_refused && writer.records > 2 * self.list.len() as u64 + COMPACT_SLACK_RECORDS
    }

    /// Rewrites the journal as one add per live entry.
    fn compact(&self, writer: &mut Writer, now_unix_s: u64) -> std::io::Result<()> {
        let bytes = journal::compacted(&self.list, now_unix_s);
        let temporary = writer.path.with_extension("csv.tmp");
        {
            let mut file = File::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
        }
        std::fs::rename(&temporary, &writer.path)?;
        // From here the old file is gone: a failure leaves no file to append to safely.
        let reopened = writer
            .path
            .parent()
            .map_or(Ok(()), |dir| File::open(dir).and_then(|d| d.sync_all()))
            .and_then(|()| OpenOptions::new().append(true).open(&writer.path));
        match reopened {
            Ok(file) => writer.file = file,
            Err(e) => {
                writer.broken = true;
                return Err(e);
            }
        }
        writer.length_bytes = bytes.len() as u64;
        writer.records = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        Ok(())
    }
}

impl Writer {
    /// Appends and syncs `bytes`; on failure, cuts the file back to where it was.
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let result = self.file.write_all(bytes).and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.length_bytes += bytes.len() as u64;
                self.records += bytes.iter().filter(|&&b| b == b'\n').count() as u64;
                Ok(())
            }
            Err(e) => {
                if self
                    .file
                    .set_len(self.length_bytes)
                    .and_then(|()| self.file.sync_data())
                    .is_err()
                {
                    self.broken = true;
                }
                Err(e)
            }
        }
    }
}

/// [`Suppressions::apply_now`] on the calling shard's blocking thread.
pub async fn apply(changes: Vec<Change>) -> Result<Applied, String> {
    let Some(list) = get() else {
        return Err("the suppression list is off ([suppression] enabled = false)".into());
    };
    let now = crate::smtp::received::unix_now_s();
    glommio::executor()
        .spawn_blocking(move || list.apply_now(&changes, now))
        .await
}

thread_local! {
    /// The reading thread's buffer for `local@domain` at RCPT.
    static ADDRESS: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(320));
}

/// The RCPT check for relayed mail: the refusal sentence when `recipient` is suppressed for
/// `sender` and `[suppression] at_rcpt = "refuse"`. Counts the refusal.
pub fn refusal_at_rcpt(recipient: &gannet_smtp::address::Mailbox<'_>, sender: &[u8]) -> Option<String> {
    let list = get()?;
    if list.settings.at_rcpt != AtRcpt::Refuse || list.list.is_empty() {
        return None;
    }
    let now = crate::smtp::received::unix_now_s();
    ADDRESS.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        buffer.clear();
        recipient.write_to(&mut buffer);
        list.check(&buffer, sender, now)?;
        crate::metrics::with(|m| m.suppressed.add("rcpt", 1));
        Some(list.settings.refusal_for(&String::from_utf8_lossy(&buffer)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(entries_max: usize) -> Suppression {
        Suppression {
            entries_max,
            ..Suppression::default()
        }
    }

    fn add(address: &str) -> Change {
        Change::Add {
            scope: Scope::Global,
            address: address.into(),
            entry: Entry::new("550 5.1.1 no such user", Source::Operator, 100, 0),
        }
    }

    #[test]
    fn changes_survive_reopening_and_full_lists_refuse_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path(), &settings(2), 100).unwrap();
        let applied = s
            .apply_now(&[add("a@x.test"), add("b@x.test"), add("c@x.test")], 100)
            .unwrap();
        assert_eq!((applied.added, applied.refused_full), (2, 1));
        let removal = Change::Remove {
            scope: Scope::Global,
            address: "a@x.test".into(),
        };
        assert_eq!(s.apply_now(&[removal.clone(), removal], 100).unwrap().removed, 1);
        drop(s);
        let s = Suppressions::open(dir.path(), &settings(2), 100).unwrap();
        assert!(s.check(b"B@x.test", b"", 100).is_some());
        assert!(s.check(b"a@x.test", b"", 100).is_none());
        assert!(
            s.check(b"c@x.test", b"", 100).is_none(),
            "the refused add was not journaled"
        );
    }

    #[test]
    fn a_torn_tail_is_cut_so_later_records_replay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        std::fs::write(&path, "add,global,a@x.test,operator,1,0,r\nadd,global,b@x.te").unwrap();
        let s = Suppressions::open(dir.path(), &settings(10), 100).unwrap();
        s.apply_now(&[add("c@x.test")], 100).unwrap();
        drop(s);
        let s = Suppressions::open(dir.path(), &settings(10), 100).unwrap();
        assert_eq!(s.list.len(), 2);
        assert!(s.check(b"c@x.test", b"", 100).is_some());
    }

    #[test]
    fn entries_a_lowered_bound_refuses_stay_in_the_journal_until_it_is_raised() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path(), &settings(3), 100).unwrap();
        s.apply_now(&[add("a@x.test"), add("b@x.test"), add("c@x.test")], 100)
            .unwrap();
        drop(s);
        // A torn tail too: it is cut, but nothing is compacted away.
        let path = dir.path().join(JOURNAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(b"add,global,torn@x.te");
        std::fs::write(&path, bytes).unwrap();
        let s = Suppressions::open(dir.path(), &settings(2), 100).unwrap();
        assert_eq!(s.list.len(), 2);
        drop(s);
        let s = Suppressions::open(dir.path(), &settings(3), 100).unwrap();
        assert_eq!(s.list.len(), 3, "the refused entry is back once the bound allows it");
        assert!(s.check(b"c@x.test", b"", 100).is_some());
    }

    #[test]
    fn a_long_journal_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let s = Suppressions::open(dir.path(), &settings(10), 100).unwrap();
        let removal = Change::Remove {
            scope: Scope::Global,
            address: "a@x.test".into(),
        };
        for _ in 0..(COMPACT_SLACK_RECORDS / 2 + 1) {
            s.apply_now(&[add("a@x.test"), removal.clone()], 100).unwrap();
        }
        s.apply_now(&[add("kept@x.test")], 100).unwrap();
        let text = std::fs::read_to_string(dir.path().join(JOURNAL_FILE)).unwrap();
        assert!(text.lines().count() < 20, "compacted: {} lines", text.lines().count());
        drop(s);
        let s = Suppressions::open(dir.path(), &settings(10), 100).unwrap();
        assert!(s.check(b"kept@x.test", b"", 100).is_some() && s.list.len() == 1);
    }

    #[test]
    fn a_bad_line_is_named_at_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(JOURNAL_FILE),
            "add,global,a@x.test,operator,1,0,r\nfrobnicate,global,b@x.test\n",
        )
        .unwrap();
        let error = Suppressions::open(dir.path(), &settings(10), 100).err().unwrap();
        assert!(error.contains("suppressions.csv: line 2"), "{error}");
    }

    #[test]
    fn hard_bounces_follow_the_configured_scope_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = settings(10);
        config.hard_bounce_scope = "sender-domain".into();
        config.hard_bounce_expires_after = Some(crate::units::Span(std::time::Duration::from_secs(60)));
        let s = Suppressions::open(dir.path(), &config, 100).unwrap();
        let change = s
            .hard_bounce(b"Gone@Example.org", b"news@Shop.example", "550 5.1.1 gone", 100)
            .unwrap();
        let Change::Add { scope, address, entry } = change else {
            panic!()
        };
        assert_eq!((scope.as_str(), address.as_str()), ("shop.example", "gone@example.org"));
        assert_eq!((entry.source, entry.expires_unix_s), (Source::HardBounce, 160));
        assert!(s.hard_bounce(b"not an address", b"", "x", 100).is_none());
    }
}
