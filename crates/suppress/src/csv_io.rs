//! Import and export of the list as CSV with a header row:
//!
//! ```text
//! address,scope,source,reason,added_unix_s,expires_unix_s
//! bob@example.com,global,hard-bounce,550 5.1.1 no such user,1796270000,0
//! ```
//!
//! On import only `address` is required; the other columns may be missing or empty (scope
//! `global`, source `import`, reason `imported`, added now, never expires), and columns are
//! found by their header's name, in any order.

use crate::entry::{normalize_address, Entry, Scope, Source};
use crate::list::SuppressionList;

pub const HEADER: [&str; 6] = ["address", "scope", "source", "reason", "added_unix_s", "expires_unix_s"];

/// A row of an import that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportError {
    /// 1 is the header.
    pub line: u64,
    pub message: String,
}

impl std::fmt::Display for ImportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Every live entry, header first.
pub fn export(list: &SuppressionList, now_unix_s: u64) -> Vec<u8> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(HEADER).expect("writing to memory");
    list.for_each(|l| {
        if l.entry.is_expired(now_unix_s) {
            return;
        }
        writer
            .write_record([
                l.address.as_str(),
                l.scope.as_str(),
                l.entry.source.as_str(),
                &l.entry.reason,
                &l.entry.added_unix_s.to_string(),
                &l.entry.expires_unix_s.to_string(),
            ])
            .expect("writing to memory");
    });
    writer.into_inner().expect("writing to memory")
}

/// The rows of an import, at most `rows_max` of them; the first bad row is the error.
pub fn parse_import(text: &[u8], now_unix_s: u64, rows_max: usize) -> Result<Vec<(Scope, String, Entry)>, ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text);
    let fail = |line: u64, message: String| ImportError { line, message };
    let header = reader.headers().map_err(|e| fail(1, e.to_string()))?.clone();
    let column = |name: &str| header.iter().position(|h| h.eq_ignore_ascii_case(name));
    let address_at = column("address").ok_or_else(|| fail(1, "the header has no address column".into()))?;
    let [scope_at, source_at, reason_at, added_at, expires_at] =
        ["scope", "source", "reason", "added_unix_s", "expires_unix_s"].map(column);
    let mut rows = Vec::new();
    for (n, record) in reader.records().enumerate() {
        let line = n as u64 + 2;
        let record = record.map_err(|e| fail(line, e.to_string()))?;
        if rows.len() >= rows_max {
            return Err(fail(line, format!("more than {rows_max} rows; split the file")));
        }
        let get = |at: Option<usize>| at.and_then(|i| record.get(i)).filter(|v| !v.is_empty());
        let address = normalize_address(get(Some(address_at)).unwrap_or("")).map_err(|e| fail(line, e.to_string()))?;
        let scope = Scope::parse(get(scope_at).unwrap_or("")).map_err(|e| fail(line, e.to_string()))?;
        let source = match get(source_at) {
            Some(s) => s.parse().map_err(|e: crate::EntryError| fail(line, e.to_string()))?,
            None => Source::Import,
        };
        let number = |at: Option<usize>, default: u64| -> Result<u64, ImportError> {
            get(at).map_or(Ok(default), |v| {
                v.parse()
                    .map_err(|_| fail(line, crate::EntryError::Number(v.into()).to_string()))
            })
        };
        let entry = Entry::new(
            get(reason_at).unwrap_or("imported"),
            source,
            number(added_at, now_unix_s)?,
            number(expires_at, 0)?,
        );
        rows.push((scope, address, entry));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_then_import_round_trips() {
        let list = SuppressionList::new(10);
        let news = Scope::parse("news.example.com").unwrap();
        list.insert(
            &Scope::Global,
            "a@x.test",
            Entry::new("550 5.1.1 gone, really", Source::HardBounce, 5, 0),
            0,
        )
        .unwrap();
        list.insert(&news, "b@x.test", Entry::new("complained", Source::Complaint, 6, 99), 0)
            .unwrap();
        let csv = export(&list, 0);
        let rows = parse_import(&csv, 1000, 10).unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.contains(&(
            Scope::Global,
            "a@x.test".into(),
            Entry::new("550 5.1.1 gone, really", Source::HardBounce, 5, 0)
        )));
        assert!(rows.contains(&(
            news,
            "b@x.test".into(),
            Entry::new("complained", Source::Complaint, 6, 99)
        )));
        assert_eq!(
            export(&list, 99)
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .count(),
            2,
            "header and one live entry"
        );
    }

    #[test]
    fn a_minimal_import_gets_defaults_and_bad_rows_name_their_line() {
        let rows = parse_import(b"Address\nBob@Example.com\n", 1000, 10).unwrap();
        assert_eq!(
            rows,
            vec![(
                Scope::Global,
                "bob@example.com".into(),
                Entry::new("imported", Source::Import, 1000, 0)
            )]
        );
        let e = parse_import(b"address,source\na@x.test,operator\nb@x.test,spam\n", 0, 10).unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        assert!(parse_import(b"email\na@x.test\n", 0, 10)
            .unwrap_err()
            .message
            .contains("no address column"));
        assert!(parse_import(b"address\na@x.test\nb@x.test\n", 0, 1)
            .unwrap_err()
            .message
            .contains("more than 1 rows"));
    }
}
