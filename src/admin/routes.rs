//! The admin API's URL space (docs/admin.md):
//!
//! - `GET /metrics`: Prometheus text exposition of every shard's numbers, merged;
//! - `GET /api/queue`: queued messages, filtered and paged;
//! - `GET /api/queue/summary`: the queue's shape by destination domain and age;
//! - `GET /api/queue/{id}`: one message in full;
//! - `POST /api/queue/{flush,hold,release,delete,bounce}`: operator actions on what a JSON
//!   selector matches;
//! - `GET /api/destinations`, `POST /api/destinations/{suspend,resume}`: suspended
//!   destinations;
//! - `/api/suppressions...`: the suppression list (`suppression_routes`).

use gannet_metrics::{EventCounts, Exposition, ShardMetrics, SuppressionCounts, QUEUE_STATES};
use gannet_smtp::received::unix_now_s;
use hyper::{Method, StatusCode};
use serde::Serialize;

use super::http::{error, respond, AdminRequest, AdminResponse};
use super::protocol::{Action, Listing, MessageSummary, Reply, Request, Selector, SummaryRow, AGE_BUCKETS};
use super::suspensions::{self, SuspensionRecord};
use super::{note_unavailable, AdminState};
use gannet_sched::suspend::SUSPENSIONS_MAX;

/// Deepest page offset a listing accepts (a listing holds `offset + limit` entries per shard).
const OFFSET_MAX: usize = 100_000;

pub(super) fn json(status: StatusCode, value: &impl Serialize) -> AdminResponse {
    match serde_json::to_string_pretty(value) {
        Ok(body) => respond(status, "application/json", body + "\n"),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the answer: {e}"),
        ),
    }
}

pub async fn route(state: &AdminState, req: AdminRequest) -> AdminResponse {
    let path = req.path.trim_end_matches('/');
    if let Some(response) = super::suppression_routes::route(&req, path).await {
        return response;
    }
    match (&req.method, path) {
        (&Method::GET, "/metrics") => metrics(state).await,
        (&Method::GET, "/api/queue") => list(state, &req.query).await,
        (&Method::GET, "/api/queue/summary") => summary(state).await,
        (&Method::POST, "/api/queue/flush") => act(state, &req, Action::Flush).await,
        (&Method::POST, "/api/queue/hold") => act(state, &req, Action::Hold).await,
        (&Method::POST, "/api/queue/release") => act(state, &req, Action::Release).await,
        (&Method::POST, "/api/queue/delete") => act(state, &req, Action::Delete).await,
        (&Method::POST, "/api/queue/bounce") => act(state, &req, Action::Bounce).await,
        (&Method::GET, "/api/destinations") => destinations(state).await,
        (&Method::POST, "/api/destinations/suspend") => suspend(state, &req).await,
        (&Method::POST, "/api/destinations/resume") => resume(state, &req).await,
        (&Method::GET, p) if p.starts_with("/api/queue/") => show(state, &p["/api/queue/".len()..]).await,
        (_, "/metrics" | "/api/queue" | "/api/queue/summary")
        | (
            _,
            "/api/queue/flush" | "/api/queue/hold" | "/api/queue/release" | "/api/queue/delete" | "/api/queue/bounce",
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed here"),
        _ => error(StatusCode::NOT_FOUND, "no such endpoint; see docs/admin.md"),
    }
}

async fn metrics(state: &AdminState) -> AdminResponse {
    let config = &state.config;
    let mut merged: Option<ShardMetrics> = None;
    for reply in state.ask_all(|| Request::Metrics).await {
        match reply {
            Reply::Metrics(m) => match &mut merged {
                Some(all) => all.merge(&m),
                None => merged = Some(*m),
            },
            _ => note_unavailable("a scrape"),
        }
    }
    let Some(metrics) = merged else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "no shard answered");
    };
    let exposition = Exposition {
        metrics,
        listener_names: config.listeners.iter().map(|l| l.address.to_string()).collect(),
        shards: state.shards.len(),
        now_unix_s: unix_now_s(),
        events: crate::events::queue().map_or_else(EventCounts::default, |q| q.counts()),
        suppression: crate::suppression::get().map_or_else(SuppressionCounts::default, |s| s.counts()),
    };
    match gannet_metrics::encode(exposition) {
        Ok(text) => respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the metrics"),
    }
}

/// A `state` filter must name one of the queue states the metrics know.
fn check_state(state: &str) -> Result<(), String> {
    if QUEUE_STATES.contains(&state) {
        Ok(())
    } else {
        Err(format!(
            "state must be one of {}, not {state:?}",
            QUEUE_STATES.join(", ")
        ))
    }
}

/// A selector from query parameters (`sender`, `recipient`, `domain`, `state`, `min_age` in
/// seconds, `id`).
fn selector_from_query(query: &str) -> Result<(Selector, Vec<(String, String)>), String> {
    let mut selector = Selector::default();
    let mut rest = Vec::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.into_owned();
        match key.as_ref() {
            "id" => selector.id = Some(value),
            "sender" => selector.sender = Some(value),
            "recipient" => selector.recipient = Some(value),
            "domain" => selector.domain = Some(value),
            "state" => {
                check_state(&value)?;
                selector.state = Some(value);
            }
            "min_age" => {
                let age = value
                    .parse()
                    .map_err(|_| format!("min_age must be a number of seconds, not {value:?}"))?;
                selector.min_age_s = Some(age);
            }
            other => rest.push((other.to_string(), value)),
        }
    }
    Ok((selector, rest))
}

pub(super) fn number(params: &[(String, String)], key: &str, default: usize) -> Result<usize, String> {
    match params.iter().find(|(k, _)| k == key) {
        Some((_, v)) => v.parse().map_err(|_| format!("{key} must be a number, not {v:?}")),
        None => Ok(default),
    }
}

#[derive(Serialize)]
struct Page {
    matched: usize,
    offset: usize,
    limit: usize,
    messages: Vec<MessageSummary>,
}

async fn list(state: &AdminState, query: &str) -> AdminResponse {
    let page_max = state.config.admin.page_size_max;
    let parsed = selector_from_query(query).and_then(|(selector, rest)| {
        if let Some((k, _)) = rest.iter().find(|(k, _)| k != "offset" && k != "limit") {
            return Err(format!("unknown parameter {k:?}"));
        }
        let offset = number(&rest, "offset", 0)?;
        let limit = number(&rest, "limit", page_max.min(100))?;
        if offset > OFFSET_MAX {
            return Err(format!(
                "offset must be at most {OFFSET_MAX}; narrow the filter instead"
            ));
        }
        if limit == 0 || limit > page_max {
            return Err(format!("limit must be between 1 and {page_max} (admin.page_size_max)"));
        }
        Ok(Listing {
            selector,
            offset,
            limit,
        })
    });
    let listing = match parsed {
        Ok(l) => l,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let mut matched = 0;
    let mut messages = Vec::new();
    for reply in state.ask_all(|| Request::List(listing.clone())).await {
        match reply {
            Reply::List {
                matched: m,
                messages: found,
            } => {
                matched += m;
                messages.extend(found);
            }
            _ => return error(StatusCode::SERVICE_UNAVAILABLE, "a shard did not answer"),
        }
    }
    messages.sort_by(|a, b| (a.received_unix_s, &a.id).cmp(&(b.received_unix_s, &b.id)));
    let page: Vec<MessageSummary> = messages.into_iter().skip(listing.offset).take(listing.limit).collect();
    json(
        StatusCode::OK,
        &Page {
            matched,
            offset: listing.offset,
            limit: listing.limit,
            messages: page,
        },
    )
}

async fn show(state: &AdminState, id: &str) -> AdminResponse {
    if id.is_empty() || id.len() > 64 {
        return error(
            StatusCode::BAD_REQUEST,
            "a message id is wanted, as gannet queue list prints it",
        );
    }
    for reply in state.ask_all(|| Request::Show(id.to_string())).await {
        if let Reply::Show(Some(detail)) = reply {
            return json(StatusCode::OK, &detail);
        }
    }
    error(StatusCode::NOT_FOUND, &format!("no queued message {id}"))
}

#[derive(Serialize)]
struct Shape {
    buckets: Vec<&'static str>,
    destinations: Vec<SummaryRow>,
}

async fn summary(state: &AdminState) -> AdminResponse {
    let mut rows: Vec<SummaryRow> = Vec::new();
    for reply in state.ask_all(|| Request::Summary).await {
        let Reply::Summary(found) = reply else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "a shard did not answer");
        };
        for row in found {
            match rows.iter_mut().find(|r| r.domain == row.domain) {
                Some(mine) => {
                    mine.total += row.total;
                    for (a, b) in mine.by_age.iter_mut().zip(&row.by_age) {
                        *a += b;
                    }
                }
                None => rows.push(row),
            }
        }
    }
    rows.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.domain.cmp(&b.domain)));
    json(
        StatusCode::OK,
        &Shape {
            buckets: AGE_BUCKETS.iter().map(|(name, _)| *name).collect(),
            destinations: rows,
        },
    )
}

/// An action's JSON body: a selector's fields, `all` to act on everything, and `reason`.
struct ActionBody {
    selector: Selector,
    all: bool,
    reason: Option<String>,
}

/// Reads an action's body: `all` and `reason` taken out, the rest must be a [`Selector`]
/// (unknown fields refused).
fn action_body(bytes: &[u8]) -> Result<ActionBody, String> {
    let mut map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes).map_err(|e| format!("bad selector: {e}"))?;
    let all = match map.remove("all") {
        None => false,
        Some(serde_json::Value::Bool(b)) => b,
        Some(_) => return Err("bad selector: `all` must be true or false".into()),
    };
    let reason = match map.remove("reason") {
        None => None,
        Some(serde_json::Value::String(r)) => Some(r),
        Some(_) => return Err("bad selector: `reason` must be a string".into()),
    };
    let selector: Selector =
        serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| format!("bad selector: {e}"))?;
    if let Some(state) = &selector.state {
        check_state(state)?;
    }
    Ok(ActionBody { selector, all, reason })
}

#[derive(Serialize)]
struct Touched {
    action: &'static str,
    count: usize,
    ids: Vec<String>,
    /// Matched, but a delivery attempt is under way: not touched; try again.
    busy: Vec<String>,
}

/// Longest operator reason accepted (it goes into a failure notice and the log).
const REASON_BYTES_MAX: usize = 256;

async fn act(state: &AdminState, req: &AdminRequest, action: Action) -> AdminResponse {
    if req.body.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "a JSON selector is wanted, such as {\"domain\": \"example.com\"} or {\"all\": true}",
        );
    }
    let body = match action_body(&req.body) {
        Ok(b) => b,
        Err(why) => return error(StatusCode::BAD_REQUEST, &why),
    };
    let selector = body.selector;
    if selector.is_all() && !body.all {
        return error(
            StatusCode::BAD_REQUEST,
            "an empty selector would act on everything; send {\"all\": true} for that",
        );
    }
    let reason = body.reason.clone().unwrap_or_default();
    if action == Action::Bounce && reason.trim().is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "a bounce needs a \"reason\" for the sender's notice",
        );
    }
    if reason.len() > REASON_BYTES_MAX || reason.chars().any(char::is_control) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("the reason must be one line of at most {REASON_BYTES_MAX} bytes"),
        );
    }
    let (mut ids, mut busy) = (Vec::new(), Vec::new());
    let mut failure = None;
    let replies = state
        .ask_all(|| Request::Act {
            action,
            selector: selector.clone(),
            reason: reason.clone(),
        })
        .await;
    for reply in replies {
        match reply {
            Reply::Acted(acted) => {
                ids.extend(acted.touched);
                busy.extend(acted.busy);
                failure = failure.or(acted.error);
            }
            _ => return error(StatusCode::SERVICE_UNAVAILABLE, "a shard did not answer"),
        }
    }
    tracing::info!(
        ?selector,
        reason,
        "admin: {} of {} message(s)",
        action.name(),
        ids.len()
    );
    if let Some(why) = failure {
        return error(StatusCode::INTERNAL_SERVER_ERROR, &why);
    }
    json(
        StatusCode::OK,
        &Touched {
            action: action.name(),
            count: ids.len(),
            ids,
            busy,
        },
    )
}

/// Longest suspension accepted.
const SUSPENSION_S_MAX: u64 = 30 * 86_400;
/// Suspension when none is given.
const SUSPENSION_S_DEFAULT: u64 = 3600;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SuspendBody {
    domain: String,
    reason: Option<String>,
    /// How long, in seconds (default an hour, at most 30 days).
    duration_s: Option<u64>,
}

fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && domain.len() <= 255
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// The suspended destinations (the operator's), and those down (connection failures in a row;
/// one entry per shard that has mail waiting for them, so `waiting` adds up).
async fn destinations(state: &AdminState) -> AdminResponse {
    let now = unix_now_s();
    let list: Vec<_> = state
        .suspended
        .borrow()
        .iter()
        .filter(|s| s.until_unix_s > now)
        .cloned()
        .collect();
    let mut down: Vec<super::protocol::DownSite> = Vec::new();
    for reply in state.ask_all(|| Request::Down).await {
        let Reply::Down(sites) = reply else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "a shard did not answer");
        };
        down.extend(sites);
    }
    // Suspensions a shard has that the operator did not set: a bounce class's or rule's
    // `suspend` action (shard-local, not persisted).
    let mut automatic: Vec<super::protocol::ShardSuspension> = Vec::new();
    for reply in state.ask_all(|| Request::Suspensions).await {
        let Reply::Suspensions(found) = reply else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "a shard did not answer");
        };
        automatic.extend(found.into_iter().filter(|s| !list.iter().any(|o| o.domain == s.domain)));
    }
    let mut slowed: Vec<super::protocol::ShardSlowdown> = Vec::new();
    for reply in state.ask_all(|| Request::Slowdowns).await {
        let Reply::Slowdowns(found) = reply else {
            return error(StatusCode::SERVICE_UNAVAILABLE, "a shard did not answer");
        };
        slowed.extend(found);
    }
    json(
        StatusCode::OK,
        &serde_json::json!({ "suspended": list, "automatic": automatic, "slowed": slowed, "down": down }),
    )
}

async fn suspend(state: &AdminState, req: &AdminRequest) -> AdminResponse {
    let body: SuspendBody = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("want {{\"domain\": ..., \"reason\": ..., \"duration_s\": ...}}: {e}"),
            )
        }
    };
    let domain = body.domain.trim().to_ascii_lowercase();
    if !valid_domain(&domain) {
        return error(
            StatusCode::BAD_REQUEST,
            "domain must be a domain name, such as example.com",
        );
    }
    let reason = body.reason.unwrap_or_default();
    if reason.len() > REASON_BYTES_MAX || reason.chars().any(char::is_control) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("the reason must be one line of at most {REASON_BYTES_MAX} bytes"),
        );
    }
    let duration_s = body.duration_s.unwrap_or(SUSPENSION_S_DEFAULT);
    if duration_s == 0 || duration_s > SUSPENSION_S_MAX {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("duration_s must be between 1 and {SUSPENSION_S_MAX}"),
        );
    }
    let now = unix_now_s();
    let record = SuspensionRecord {
        domain: domain.clone(),
        reason,
        since_unix_s: now,
        until_unix_s: now + duration_s,
    };
    let mut all: Vec<SuspensionRecord> = state
        .suspended
        .borrow()
        .iter()
        .filter(|s| s.until_unix_s > now && s.domain != domain)
        .cloned()
        .collect();
    if all.len() >= SUSPENSIONS_MAX {
        return error(
            StatusCode::INSUFFICIENT_STORAGE,
            &format!("at most {SUSPENSIONS_MAX} suspensions"),
        );
    }
    all.push(record.clone());
    if let Err(e) = suspensions::save(&state.config.spool.directory, &all) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot write the suspensions file: {e}"),
        );
    }
    *state.suspended.borrow_mut() = all;
    for reply in state
        .ask_all(|| Request::Suspend {
            domain: domain.clone(),
            until_unix_s: record.until_unix_s,
        })
        .await
    {
        if !matches!(reply, Reply::Suspended(true)) {
            return error(StatusCode::SERVICE_UNAVAILABLE, "a shard did not take the suspension");
        }
    }
    tracing::info!(
        domain,
        reason = record.reason,
        "admin: destination suspended for {duration_s} s"
    );
    json(StatusCode::OK, &record)
}

async fn resume(state: &AdminState, req: &AdminRequest) -> AdminResponse {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ResumeBody {
        domain: String,
    }
    let body: ResumeBody = match serde_json::from_slice(&req.body) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("want {{\"domain\": ...}}: {e}")),
    };
    let domain = body.domain.trim().to_ascii_lowercase();
    let now = unix_now_s();
    let in_force = |s: &&SuspensionRecord| s.until_unix_s > now;
    if !state
        .suspended
        .borrow()
        .iter()
        .filter(in_force)
        .any(|s| s.domain == domain)
    {
        return error(StatusCode::NOT_FOUND, &format!("{domain} is not suspended"));
    }
    let all: Vec<SuspensionRecord> = state
        .suspended
        .borrow()
        .iter()
        .filter(in_force)
        .filter(|s| s.domain != domain)
        .cloned()
        .collect();
    if let Err(e) = suspensions::save(&state.config.spool.directory, &all) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot write the suspensions file: {e}"),
        );
    }
    *state.suspended.borrow_mut() = all;
    let mut released = 0;
    for reply in state.ask_all(|| Request::Resume { domain: domain.clone() }).await {
        match reply {
            Reply::Resumed(n) => released += n,
            _ => return error(StatusCode::SERVICE_UNAVAILABLE, "a shard did not answer"),
        }
    }
    tracing::info!(domain, "admin: destination resumed; {released} message(s) go now");
    json(
        StatusCode::OK,
        &serde_json::json!({ "domain": domain, "released": released }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_action_body_is_a_selector_with_all_and_reason() {
        let b = action_body(br#"{"domain": "x.test", "reason": "why", "all": false}"#).unwrap();
        assert_eq!(b.selector.domain.as_deref(), Some("x.test"));
        assert_eq!(b.reason.as_deref(), Some("why"));
        assert!(!b.all);
        assert!(action_body(br#"{"all": true}"#).unwrap().selector.is_all());
        assert!(
            action_body(br#"{"domian": "x.test"}"#).is_err(),
            "unknown fields are refused"
        );
        assert!(action_body(br#"{"state": "lost"}"#).is_err());
        assert!(action_body(br#"{"all": "yes"}"#).is_err());
    }

    #[test]
    fn query_parameters_make_a_selector() {
        let (s, rest) =
            selector_from_query("sender=a%40b.test&domain=x.test&state=deferred&min_age=60&limit=5").unwrap();
        assert_eq!(s.sender.as_deref(), Some("a@b.test"));
        assert_eq!(s.domain.as_deref(), Some("x.test"));
        assert_eq!(s.min_age_s, Some(60));
        assert_eq!(rest, vec![("limit".to_string(), "5".to_string())]);
        assert!(selector_from_query("state=lost").is_err());
        assert!(selector_from_query("state=held").is_ok());
        assert!(selector_from_query("min_age=soon").is_err());
    }
}
