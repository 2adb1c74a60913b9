//! `gannet suppress ...`: the suppression list through the admin API (list, check, add,
//! remove, import and export CSV). An import larger than one request (`admin.request_size_max`)
//! is sent in pieces, each with the header row, so a file of any size goes in.

use serde::Deserialize;

use super::client::{CallError, Client};
use super::suppression_routes::EntryView;
use gannet_sched::queue::rfc3339;

/// Entries fetched per request while listing.
const PAGE_SIZE: usize = 1000;

fn parse<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, CallError> {
    serde_json::from_str(text).map_err(|e| CallError::BadAnswer(e.to_string()))
}

fn line(e: &EntryView) -> String {
    let expires = if e.expires_unix_s == 0 {
        "never".to_string()
    } else {
        rfc3339(e.expires_unix_s)
    };
    format!(
        "{}  scope {}  {}  added {}  expires {}  {}\n",
        e.address,
        e.scope,
        e.source,
        rfc3339(e.added_unix_s),
        expires,
        e.reason
    )
}

/// Every entry the filter (query parameters) selects, page by page.
pub fn list(client: &Client, filter: &str, json: bool) -> Result<String, CallError> {
    #[derive(Deserialize)]
    struct Page {
        matched: usize,
        entries: Vec<EntryView>,
    }
    let mut all = Vec::new();
    let mut matched = 0;
    loop {
        let text = client.get(&format!(
            "/api/suppressions?{filter}&offset={}&limit={PAGE_SIZE}",
            all.len()
        ))?;
        let page: Page = parse(&text)?;
        matched = page.matched.max(matched);
        let got = page.entries.len();
        all.extend(page.entries);
        if got < PAGE_SIZE || all.len() >= matched {
            break;
        }
    }
    if json {
        let value = serde_json::json!({ "matched": matched, "entries": all });
        return Ok(serde_json::to_string_pretty(&value).unwrap_or_default() + "\n");
    }
    Ok(all.iter().map(line).collect())
}

pub fn check(client: &Client, address: &str, sender: Option<&str>, json: bool) -> Result<String, CallError> {
    let mut q = form_urlencoded::Serializer::new(String::new());
    q.append_pair("address", address);
    if let Some(s) = sender {
        q.append_pair("sender", s);
    }
    let text = client.get(&format!("/api/suppressions/check?{}", q.finish()))?;
    if json {
        return Ok(text);
    }
    #[derive(Deserialize)]
    struct Checked {
        address: String,
        suppressed: bool,
        entry: Option<EntryView>,
    }
    let c: Checked = parse(&text)?;
    Ok(match (c.suppressed, c.entry) {
        (true, Some(e)) => format!("suppressed: {}", line(&e)),
        _ => format!("not suppressed: {}\n", c.address),
    })
}

fn applied(text: &str, json: bool) -> Result<String, CallError> {
    if json {
        return Ok(text.to_string());
    }
    let a: serde_json::Value = parse(text)?;
    let n = |k: &str| a.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    Ok(format!(
        "added {}, removed {}, refused (list full) {}\n",
        n("added"),
        n("removed"),
        n("refused_full")
    ))
}

pub fn add(client: &Client, body: serde_json::Value, json: bool) -> Result<String, CallError> {
    applied(&client.post("/api/suppressions/add", &body)?, json)
}

pub fn remove(client: &Client, address: &str, scope: Option<&str>, json: bool) -> Result<String, CallError> {
    let mut body = serde_json::json!({ "address": address });
    if let Some(s) = scope {
        body["scope"] = serde_json::Value::String(s.to_string());
    }
    applied(&client.post("/api/suppressions/remove", &body)?, json)
}

/// Imports a CSV file (header row first), in pieces that fit one request each. The whole file
/// is checked here first, so that a bad row is named by its line in the file and nothing of a
/// bad file goes in.
pub fn import(client: &Client, file_name: &str, csv: &[u8], rows_max: usize, json: bool) -> Result<String, String> {
    let now = gannet_smtp::received::unix_now_s();
    gannet_suppress::csv_io::parse_import(csv, now, usize::MAX).map_err(|e| format!("{file_name}: {e}"))?;
    let text = std::str::from_utf8(csv).map_err(|_| format!("{file_name}: not UTF-8"))?;
    import_checked(client, text, rows_max.max(1), json).map_err(|e| e.to_string())
}

/// Sends pieces of at most `rows_max` rows (the server's `suppression.import_rows_max`) that
/// fit one request each.
fn import_checked(client: &Client, text: &str, rows_max: usize, json: bool) -> Result<String, CallError> {
    // Record boundaries as the csv crate finds them (a quoted field may hold a line break).
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(text.as_bytes());
    let header_end = match reader.headers() {
        Ok(_) => reader.position().byte() as usize,
        Err(e) => return Err(CallError::BadAnswer(e.to_string())),
    };
    let mut starts = Vec::new();
    let mut record = csv::ByteRecord::new();
    loop {
        let start = reader.position().byte() as usize;
        match reader.read_byte_record(&mut record) {
            Ok(true) => starts.push(start),
            Ok(false) => break,
            Err(e) => return Err(CallError::BadAnswer(e.to_string())),
        }
    }
    starts.push(text.len());
    let header = &text[..header_end];
    let piece_bytes_max = client.request_bytes_max.saturating_sub(1024).max(header.len() + 1024);
    let mut totals = [0u64; 3];
    let mut from = header_end;
    while from < text.len() {
        // As many whole records as fit; at least one.
        let mut to = from;
        for &end in starts.iter().filter(|&&e| e > from).take(rows_max) {
            if end - from + header.len() > piece_bytes_max && to > from {
                break;
            }
            to = end;
        }
        let mut piece = String::with_capacity(header.len() + to - from + 1);
        piece.push_str(header);
        if !header.ends_with('\n') {
            piece.push('\n');
        }
        piece.push_str(&text[from..to]);
        let answer = client.post_bytes("/api/suppressions/import", "text/csv", piece.as_bytes())?;
        let a: serde_json::Value = parse(&answer)?;
        for (total, key) in totals.iter_mut().zip(["added", "removed", "refused_full"]) {
            *total += a.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0);
        }
        from = to;
    }
    let value = serde_json::json!({ "added": totals[0], "removed": totals[1], "refused_full": totals[2] });
    applied(&value.to_string(), json)
}

pub fn export(client: &Client) -> Result<Vec<u8>, CallError> {
    client.get_bytes("/api/suppressions/export.csv")
}
