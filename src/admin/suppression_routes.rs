//! The suppression list's part of the admin API (docs/admin.md, "Suppression list"):
//!
//! - `GET /api/suppressions`: entries, filtered (`address`, `scope`, `source`, `contains`) and
//!   paged (`offset`, `limit`), newest first;
//! - `GET /api/suppressions/check?address=..&sender=..`: whether mail from `sender` (optional)
//!   to `address` is suppressed, and by which entry;
//! - `POST /api/suppressions/add` `{"address", "scope"?, "reason"?, "expires_after_s"?}`;
//! - `POST /api/suppressions/remove` `{"address", "scope"?}` (without a scope: every scope);
//! - `POST /api/suppressions/import`: a CSV body (`gannet_suppress::csv_io`);
//! - `GET /api/suppressions/export.csv`: every live entry as CSV.
//!
//! The list is one for the process, so nothing here asks the shards. Scans, the CSV work and
//! the journal's sync run on a blocking thread, never on shard 0's executor.

use gannet_smtp::received::unix_now_s;
use gannet_suppress::journal::Change;
use gannet_suppress::{csv_io, normalize_address, Entry, Listed, Scope, Source, REASON_BYTES_MAX};
use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use super::http::{error, respond, AdminRequest, AdminResponse};
use super::routes::{json, number};
use crate::suppression::{self, Suppressions};

/// The most entries one listing page holds.
const PAGE_LIMIT_MAX: usize = 1000;
/// The longest expiry an operator may give, in seconds (ten years).
const EXPIRES_AFTER_S_MAX: u64 = 10 * 365 * 86_400;

/// One entry as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntryView {
    pub address: String,
    pub scope: String,
    pub source: String,
    pub reason: String,
    pub added_unix_s: u64,
    /// 0: never.
    pub expires_unix_s: u64,
}

impl From<Listed> for EntryView {
    fn from(l: Listed) -> EntryView {
        EntryView {
            address: l.address,
            scope: l.scope.as_str().to_string(),
            source: l.entry.source.as_str().to_string(),
            reason: l.entry.reason.to_string(),
            added_unix_s: l.entry.added_unix_s,
            expires_unix_s: l.entry.expires_unix_s,
        }
    }
}

/// Routes `/api/suppressions...`; None when the path is not one of them.
pub async fn route(req: &AdminRequest, path: &str) -> Option<AdminResponse> {
    use hyper::Method;
    let known = matches!(
        path,
        "/api/suppressions"
            | "/api/suppressions/check"
            | "/api/suppressions/add"
            | "/api/suppressions/remove"
            | "/api/suppressions/import"
            | "/api/suppressions/export.csv"
    );
    if !known {
        return None;
    }
    let Some(list) = suppression::get() else {
        return Some(error(
            StatusCode::NOT_FOUND,
            "the suppression list is off ([suppression] enabled = false)",
        ));
    };
    Some(match (&req.method, path) {
        (&Method::GET, "/api/suppressions") => listing(list, &req.query).await,
        (&Method::GET, "/api/suppressions/check") => check(list, &req.query),
        (&Method::POST, "/api/suppressions/add") => add(req).await,
        (&Method::POST, "/api/suppressions/remove") => remove(list, req).await,
        (&Method::POST, "/api/suppressions/import") => import(list, req).await,
        (&Method::GET, "/api/suppressions/export.csv") => export(list).await,
        _ => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here"),
    })
}

fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The entries a listing's filters select.
#[derive(Default)]
struct Filter {
    address: Option<String>,
    scope: Option<Scope>,
    source: Option<Source>,
    contains: Option<String>,
}

impl Filter {
    fn from_pairs(pairs: &[(String, String)]) -> Result<Filter, String> {
        let mut f = Filter::default();
        for (key, value) in pairs {
            match key.as_str() {
                "address" => f.address = Some(normalize_address(value).map_err(|e| e.to_string())?),
                "scope" => f.scope = Some(Scope::parse(value).map_err(|e| e.to_string())?),
                "source" => f.source = Some(value.parse().map_err(|e: gannet_suppress::EntryError| e.to_string())?),
                "contains" => f.contains = Some(value.to_lowercase()),
                "offset" | "limit" => {}
                other => {
                    return Err(format!(
                        "unknown filter {other:?}: address, scope, source, contains, offset, limit"
                    ))
                }
            }
        }
        Ok(f)
    }

    fn keeps(&self, l: &Listed) -> bool {
        self.address.as_ref().is_none_or(|a| *a == l.address)
            && self.scope.as_ref().is_none_or(|s| *s == l.scope)
            && self.source.is_none_or(|s| s == l.entry.source)
            && self
                .contains
                .as_ref()
                .is_none_or(|c| l.address.contains(c.as_str()) || l.entry.reason.to_lowercase().contains(c.as_str()))
    }
}

async fn listing(list: &'static Suppressions, query: &str) -> AdminResponse {
    let pairs = query_pairs(query);
    let parsed = Filter::from_pairs(&pairs).and_then(|f| {
        let offset = number(&pairs, "offset", 0)?;
        let limit = number(&pairs, "limit", 100)?;
        if limit == 0 || limit > PAGE_LIMIT_MAX {
            return Err(format!("limit must be between 1 and {PAGE_LIMIT_MAX}"));
        }
        Ok((f, offset, limit))
    });
    let (filter, offset, limit) = match parsed {
        Ok(p) => p,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let (matched, page) = glommio::executor()
        .spawn_blocking(move || list.list().list(|l| filter.keeps(l), offset, limit))
        .await;
    let entries: Vec<EntryView> = page.into_iter().map(EntryView::from).collect();
    json(
        StatusCode::OK,
        &serde_json::json!({ "matched": matched, "entries_max": list.list().entries_max(), "entries": entries }),
    )
}

fn check(list: &Suppressions, query: &str) -> AdminResponse {
    let pairs = query_pairs(query);
    let get = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let Some(address) = get("address") else {
        return error(StatusCode::BAD_REQUEST, "want ?address=...[&sender=...]");
    };
    let address = match normalize_address(address) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let sender = get("sender").unwrap_or("");
    match list.check(address.as_bytes(), sender.as_bytes(), unix_now_s()) {
        Some(hit) => {
            let view = EntryView::from(Listed {
                scope: hit.scope,
                address: address.clone(),
                entry: hit.entry,
            });
            json(
                StatusCode::OK,
                &serde_json::json!({ "address": address, "suppressed": true, "entry": view }),
            )
        }
        None => json(
            StatusCode::OK,
            &serde_json::json!({ "address": address, "suppressed": false }),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    address: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    expires_after_s: Option<u64>,
}

fn add_change(body: AddBody, now_unix_s: u64) -> Result<Change, String> {
    let address = normalize_address(&body.address).map_err(|e| e.to_string())?;
    let scope = Scope::parse(body.scope.as_deref().unwrap_or("global")).map_err(|e| e.to_string())?;
    let reason = body.reason.unwrap_or_else(|| "added by the operator".into());
    if reason.len() > REASON_BYTES_MAX || reason.chars().any(char::is_control) {
        return Err(format!(
            "the reason must be one line of at most {REASON_BYTES_MAX} bytes"
        ));
    }
    let expires_unix_s = match body.expires_after_s {
        None => 0,
        Some(s) if s == 0 || s > EXPIRES_AFTER_S_MAX => {
            return Err(format!("expires_after_s must be between 1 and {EXPIRES_AFTER_S_MAX}"))
        }
        Some(s) => now_unix_s + s,
    };
    Ok(Change::Add {
        scope,
        address,
        entry: Entry::new(&reason, Source::Operator, now_unix_s, expires_unix_s),
    })
}

async fn add(req: &AdminRequest) -> AdminResponse {
    let body: AddBody = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "want {{\"address\": ..., \"scope\"?: ..., \"reason\"?: ..., \"expires_after_s\"?: ...}}: {e}"
                ),
            )
        }
    };
    let change = match add_change(body, unix_now_s()) {
        Ok(c) => c,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    if let Change::Add { scope, address, .. } = &change {
        tracing::info!(address, scope = scope.as_str(), "admin: suppression added");
    }
    applied(suppression::apply(vec![change]).await)
}

fn applied(result: Result<suppression::Applied, String>) -> AdminResponse {
    match result {
        Ok(a) if a.refused_full > 0 => json(StatusCode::INSUFFICIENT_STORAGE, &a),
        Ok(a) => json(StatusCode::OK, &a),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

async fn remove(list: &'static Suppressions, req: &AdminRequest) -> AdminResponse {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RemoveBody {
        address: String,
        #[serde(default)]
        scope: Option<String>,
    }
    let body: RemoveBody = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("want {{\"address\": ..., \"scope\"?: ...}}: {e}"),
            )
        }
    };
    let address = match normalize_address(&body.address) {
        Ok(a) => a,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    let scopes: Vec<Scope> = match &body.scope {
        Some(s) => match Scope::parse(s) {
            Ok(scope) => vec![scope],
            Err(e) => return error(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        None => {
            let wanted = address.clone();
            glommio::executor()
                .spawn_blocking(move || list.list().list(|l| l.address == wanted, 0, usize::MAX).1)
                .await
                .into_iter()
                .map(|l| l.scope)
                .collect()
        }
    };
    tracing::info!(address, "admin: suppression removed");
    let changes = scopes
        .into_iter()
        .map(|scope| Change::Remove {
            scope,
            address: address.clone(),
        })
        .collect();
    applied(suppression::apply(changes).await)
}

async fn import(list: &'static Suppressions, req: &AdminRequest) -> AdminResponse {
    let body = req.body.clone();
    let rows_max = list.settings().import_rows_max;
    let now = unix_now_s();
    let parsed = glommio::executor()
        .spawn_blocking(move || csv_io::parse_import(&body, now, rows_max))
        .await;
    let rows = match parsed {
        Ok(rows) => rows,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("the CSV cannot be imported: {e}")),
    };
    let count = rows.len();
    let changes = rows
        .into_iter()
        .map(|(scope, address, entry)| Change::Add { scope, address, entry })
        .collect();
    let result = suppression::apply(changes).await;
    if let Ok(a) = &result {
        tracing::info!(
            rows = count,
            added = a.added,
            refused_full = a.refused_full,
            "admin: suppressions imported"
        );
    }
    applied(result)
}

async fn export(list: &'static Suppressions) -> AdminResponse {
    let now = unix_now_s();
    let csv = glommio::executor()
        .spawn_blocking(move || csv_io::export(list.list(), now))
        .await;
    respond(StatusCode::OK, "text/csv; charset=utf-8", csv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_select() {
        let pairs = query_pairs("source=hard-bounce&contains=NO+SUCH");
        let f = Filter::from_pairs(&pairs).unwrap();
        let listed = |source, reason: &str| Listed {
            scope: Scope::Global,
            address: "a@x.test".into(),
            entry: Entry::new(reason, source, 1, 0),
        };
        assert!(f.keeps(&listed(Source::HardBounce, "550 5.1.1 No such user")));
        assert!(!f.keeps(&listed(Source::Operator, "550 5.1.1 No such user")));
        assert!(!f.keeps(&listed(Source::HardBounce, "mailbox full")));
        assert!(Filter::from_pairs(&query_pairs("colour=red")).is_err());
        assert!(Filter::from_pairs(&query_pairs("source=spam")).is_err());
    }

    #[test]
    fn an_add_body_is_checked() {
        let body = |json: &str| serde_json::from_str::<AddBody>(json).unwrap();
        let Change::Add { scope, address, entry } = add_change(
            body(r#"{"address": "<Bob@X.test>", "scope": "news.x.test", "expires_after_s": 60}"#),
            100,
        )
        .unwrap() else {
            panic!("an add")
        };
        assert_eq!(
            (scope.as_str(), address.as_str(), entry.expires_unix_s),
            ("news.x.test", "bob@x.test", 160)
        );
        assert_eq!(entry.source, Source::Operator);
        assert!(add_change(body(r#"{"address": "nobody"}"#), 100).is_err());
        assert!(add_change(body(r#"{"address": "a@x.test", "expires_after_s": 0}"#), 100).is_err());
        assert!(add_change(body(r#"{"address": "a@x.test", "reason": "two\nlines"}"#), 100).is_err());
    }
}
