//! The suppression journal: the list's durable form, one CSV record per change, appended and
//! synced by the shell before the change is made in memory.
//!
//! ```text
//! add,<scope>,<address>,<source>,<added_unix_s>,<expires_unix_s>,<reason>
//! remove,<scope>,<address>
//! ```
//!
//! Replay applies the records in order. A last record without its newline is a write a crash
//! cut short: it was never synced, so never relied upon, and is skipped. Any other record that
//! cannot be read is an error naming its line (the file was changed by hand or damaged).

use crate::entry::{normalize_address, Entry, Scope};
use crate::list::SuppressionList;

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Add {
        scope: Scope,
        address: String,
        entry: Entry,
    },
    Remove {
        scope: Scope,
        address: String,
    },
}

/// A journal that cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalError {
    pub line: u64,
    pub message: String,
}

impl std::fmt::Display for JournalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Records read.
    pub records: u64,
    /// Adds refused because the list was full.
    pub refused_full: u64,
    /// Whether a torn last record was skipped.
    pub torn_tail: bool,
}

/// The record of a change, newline included.
pub fn encode(change: &Change) -> Vec<u8> {
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::with_capacity(128));
    let written = match change {
        Change::Add { scope, address, entry } => writer.write_record([
            "add",
            scope.as_str(),
            address,
            entry.source.as_str(),
            &entry.added_unix_s.to_string(),
            &entry.expires_unix_s.to_string(),
            &entry.reason,
        ]),
        Change::Remove { scope, address } => writer.write_record(["remove", scope.as_str(), address]),
    };
    written.expect("writing to memory");
    writer.into_inner().expect("writing to memory")
}

/// Parses one record.
fn decode(record: &csv::StringRecord) -> Result<Change, String> {
    let field = |i: usize| record.get(i).ok_or_else(|| format!("a field is missing: {record:?}"));
    let scope = Scope::parse(field(1)?).map_err(|e| e.to_string())?;
    let address = normalize_address(field(2)?).map_err(|e| e.to_string())?;
    match field(0)? {
        "add" => {
            let source = field(3)?.parse().map_err(|e: crate::EntryError| e.to_string())?;
            let number = |i: usize| -> Result<u64, String> {
                let text = field(i)?;
                text.parse()
                    .map_err(|_| crate::EntryError::Number(text.into()).to_string())
            };
            let entry = Entry::new(field(6)?, source, number(4)?, number(5)?);
            Ok(Change::Add { scope, address, entry })
        }
        "remove" => Ok(Change::Remove { scope, address }),
        other => Err(format!("{other:?} is not add or remove")),
    }
}

/// Replays a journal into `list` (see the module's doc).
pub fn replay(bytes: &[u8], list: &SuppressionList, now_unix_s: u64) -> Result<Replayed, JournalError> {
    let torn_tail = !bytes.is_empty() && !bytes.ends_with(b"\n");
    let whole = match (torn_tail, bytes.iter().rposition(|&b| b == b'\n')) {
        (false, _) => bytes,
        (true, Some(end)) => &bytes[..=end],
        (true, None) => &[][..],
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(whole);
    let mut done = Replayed {
        torn_tail,
        ..Replayed::default()
    };
    for record in reader.records() {
        let line = record
            .as_ref()
            .ok()
            .and_then(|r| r.position())
            .map_or(done.records + 1, |p| p.line());
        let record = record.map_err(|e| JournalError {
            line,
            message: e.to_string(),
        })?;
        let change = decode(&record).map_err(|message| JournalError { line, message })?;
        done.records += 1;
        match change {
            Change::Add { scope, address, entry } => {
                if list.insert(&scope, &address, entry, now_unix_s).is_err() {
                    done.refused_full += 1;
                }
            }
            Change::Remove { scope, address } => {
                list.remove(&scope, &address);
            }
        }
    }
    Ok(done)
}

/// The list as a fresh journal: one add per live entry (to compact a journal whose records
/// far outnumber its entries).
pub fn compacted(list: &SuppressionList, now_unix_s: u64) -> Vec<u8> {
    let mut out = Vec::new();
    list.for_each(|l| {
        if !l.entry.is_expired(now_unix_s) {
            out.extend_from_slice(&encode(&Change::Add {
                scope: l.scope,
                address: l.address,
                entry: l.entry,
            }));
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Source;

    fn add(address: &str, reason: &str) -> Change {
        Change::Add {
            scope: Scope::Global,
            address: address.into(),
            entry: Entry::new(reason, Source::HardBounce, 10, 0),
        }
    }

    #[test]
    fn a_journal_replays_in_order_and_quotes_what_needs_it() {
        let mut bytes = encode(&add("a@x.test", "550 5.1.1 \"gone\", for good"));
        bytes.extend(encode(&add("b@x.test", "full")));
        bytes.extend(encode(&Change::Remove {
            scope: Scope::Global,
            address: "b@x.test".into(),
        }));
        let list = SuppressionList::new(10);
        let done = replay(&bytes, &list, 0).unwrap();
        assert_eq!((done.records, done.torn_tail), (3, false));
        let hit = list.check(b"a@x.test", b"", 0).unwrap();
        assert_eq!(&*hit.entry.reason, "550 5.1.1 \"gone\", for good");
        assert!(list.check(b"b@x.test", b"", 0).is_none());
        let again = SuppressionList::new(10);
        replay(&compacted(&list, 0), &again, 0).unwrap();
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn a_torn_last_record_is_skipped_and_a_damaged_one_is_an_error() {
        let mut bytes = encode(&add("a@x.test", "r"));
        let second = encode(&add("b@x.test", "r"));
        bytes.extend_from_slice(&second[..second.len() - 5]);
        let list = SuppressionList::new(10);
        let done = replay(&bytes, &list, 0).unwrap();
        assert_eq!((done.records, done.torn_tail), (1, true));
        assert!(list.check(b"b@x.test", b"", 0).is_none());
        let mut damaged = encode(&add("a@x.test", "r"));
        damaged.extend_from_slice(b"add,global,not-an-address,operator,1,0,r\n");
        damaged.extend(encode(&add("c@x.test", "r")));
        let e = replay(&damaged, &SuppressionList::new(10), 0).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.message.contains("not an address"), "{e}");
    }

    #[test]
    fn a_full_list_counts_what_it_refused() {
        let mut bytes = Vec::new();
        for i in 0..5 {
            bytes.extend(encode(&add(&format!("u{i}@x.test"), "r")));
        }
        let list = SuppressionList::new(3);
        assert_eq!(replay(&bytes, &list, 0).unwrap().refused_full, 2);
        assert_eq!(list.len(), 3);
    }
}
