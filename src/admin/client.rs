//! `gannet queue ...` as a client of the running server's admin API (ureq, plain HTTP to the
//! configured `admin.address`, with the bearer token from `admin.token_file`). When the API
//! cannot be reached the caller falls back to reading the spool files where that makes sense.

use std::time::Duration;

use serde::Deserialize;

use super::protocol::{Action, MessageDetail, MessageSummary, Selector, SummaryRow};
use super::suspensions::SuspensionRecord;
use crate::config::Config;
use crate::queue::rfc3339;

/// A whole CLI call to the API must fit in this.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a call did not give an answer.
#[derive(Debug)]
pub enum CallError {
    /// Nothing answers at the admin address (the server is down, or the API is off).
    Unreachable(String),
    /// The API answered with an error status.
    Refused { status: u16, message: String },
    /// The answer made no sense.
    BadAnswer(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(why) => write!(f, "the admin API does not answer: {why}"),
            CallError::Refused { status, message } => write!(f, "the admin API refused ({status}): {message}"),
            CallError::BadAnswer(why) => write!(f, "the admin API's answer makes no sense: {why}"),
        }
    }
}

pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    /// The server's `admin.request_size_max` (the same configuration): bodies are cut to fit.
    pub request_bytes_max: usize,
}

impl Client {
    /// A client of the API `config` describes; `Unreachable` when the API is off.
    pub fn new(config: &Config) -> Result<Client, CallError> {
        if !config.admin.enabled {
            return Err(CallError::Unreachable("admin.enabled = false".into()));
        }
        let token = super::read_token(config).map_err(CallError::Unreachable)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(CALL_TIMEOUT))
            .build()
            .into();
        Ok(Client {
            agent,
            base: format!("http://{}", config.admin.address),
            token,
            request_bytes_max: config.admin.request_size_max.0 as usize,
        })
    }

    fn finish(&self, result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<String, CallError> {
        let mut response = result.map_err(|e| CallError::Unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| CallError::BadAnswer(e.to_string()))?;
        if status >= 400 {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or(body);
            return Err(CallError::Refused { status, message });
        }
        Ok(body)
    }

    /// GETs a body of any size (an export: the list is bounded, the default read limit is not
    /// its bound).
    pub fn get_bytes(&self, path_and_query: &str) -> Result<Vec<u8>, CallError> {
        let mut request = self.agent.get(format!("{}{path_and_query}", self.base));
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let mut response = request.call().map_err(|e| CallError::Unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .map_err(|e| CallError::BadAnswer(e.to_string()))?;
        if status >= 400 {
            return Err(CallError::Refused {
                status,
                message: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Ok(body)
    }

    pub fn get(&self, path_and_query: &str) -> Result<String, CallError> {
        let mut request = self.agent.get(format!("{}{path_and_query}", self.base));
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        self.finish(request.call())
    }

    /// POSTs a body of `content_type` as it is.
    pub fn post_bytes(&self, path: &str, content_type: &str, body: &[u8]) -> Result<String, CallError> {
        let mut request = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", content_type);
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        self.finish(request.send(body))
    }

    pub fn post(&self, path: &str, body: &serde_json::Value) -> Result<String, CallError> {
        let mut request = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json");
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        self.finish(request.send(body.to_string()))
    }
}

fn parse<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, CallError> {
    serde_json::from_str(text).map_err(|e| CallError::BadAnswer(e.to_string()))
}

/// Query parameters for a selector.
pub fn selector_query(selector: &Selector) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    let fields = [
        ("id", &selector.id),
        ("sender", &selector.sender),
        ("recipient", &selector.recipient),
        ("domain", &selector.domain),
        ("state", &selector.state),
    ];
    for (key, value) in fields {
        if let Some(v) = value {
            q.append_pair(key, v);
        }
    }
    if let Some(age) = selector.min_age_s {
        q.append_pair("min_age", &age.to_string());
    }
    q.finish()
}

#[derive(Deserialize)]
struct Page {
    matched: usize,
    messages: Vec<MessageSummary>,
}

/// Every message the selector matches, page by page (JSON when `json`).
pub fn list(client: &Client, selector: &Selector, page_size: usize, json: bool) -> Result<String, CallError> {
    let filter = selector_query(selector);
    let mut all: Vec<MessageSummary> = Vec::new();
    let mut matched = 0;
    loop {
        let text = client.get(&format!("/api/queue?{filter}&offset={}&limit={page_size}", all.len()))?;
        let page: Page = parse(&text)?;
        matched = page.matched.max(matched);
        let got = page.messages.len();
        all.extend(page.messages);
        if got < page_size || all.len() >= matched {
            break;
        }
    }
    if json {
        let value = serde_json::json!({ "matched": matched, "messages": all });
        return Ok(serde_json::to_string_pretty(&value).unwrap_or_default() + "\n");
    }
    let mut out = String::new();
    for m in &all {
        let sender = if m.sender == "<>" {
            m.sender.clone()
        } else {
            format!("<{}>", m.sender)
        };
        out.push_str(&format!(
            "{}  {:>10}  {}  {}/{} recipient(s) pending  received {}  {}",
            m.id,
            m.size_bytes,
            sender,
            m.recipients_pending,
            m.recipients_total,
            rfc3339(m.received_unix_s),
            m.state
        ));
        match &m.next_attempt {
            Some(_) if m.state == "held" => out.push_str(&format!("  attempts {}", m.attempts)),
            Some(next) => out.push_str(&format!("  attempts {}  next {next}", m.attempts)),
            None => {}
        }
        out.push('\n');
    }
    Ok(out)
}

/// One message in full, for people or as JSON.
pub fn show(client: &Client, id: &str, json: bool) -> Result<String, CallError> {
    let text = client.get(&format!(
        "/api/queue/{}",
        form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>()
    ))?;
    if json {
        return Ok(text);
    }
    let d: MessageDetail = parse(&text)?;
    let s = &d.summary;
    let mut out = format!(
        "id: {}\nshard: {}\nstate: {}\nsender: <{}>\nsize: {} bytes\nreceived: {} from {} ({})\nattempts: {}\n",
        s.id, s.shard, s.state, s.sender, s.size_bytes, s.received, d.client_ip, d.helo, s.attempts
    );
    if let Some(next) = &s.next_attempt {
        out.push_str(&format!("next attempt: {next}\n"));
    }
    if let Some(reply) = &d.last_reply {
        match &d.last_class {
            Some(class) => out.push_str(&format!("last reply: {reply} (class {class})\n")),
            None => out.push_str(&format!("last reply: {reply}\n")),
        }
    }
    for r in &d.recipients {
        out.push_str(&format!("recipient: <{}> {}\n", r.address, r.state));
    }
    if let Some(headers) = &d.headers {
        out.push('\n');
        out.push_str(headers);
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Shape {
    buckets: Vec<String>,
    destinations: Vec<SummaryRow>,
}

/// The queue's shape (qshape): recipients by destination domain and age.
pub fn summary(client: &Client, json: bool) -> Result<String, CallError> {
    let text = client.get("/api/queue/summary")?;
    if json {
        return Ok(text);
    }
    let shape: Shape = parse(&text)?;
    let mut out = format!("{:<40} {:>8}", "domain", "total");
    for b in &shape.buckets {
        out.push_str(&format!(" {b:>7}"));
    }
    out.push('\n');
    for row in &shape.destinations {
        out.push_str(&format!("{:<40} {:>8}", row.domain, row.total));
        for n in &row.by_age {
            out.push_str(&format!(" {n:>7}"));
        }
        out.push('\n');
    }
    Ok(out)
}

#[derive(Deserialize)]
struct Touched {
    count: usize,
    ids: Vec<String>,
    busy: Vec<String>,
}

/// Applies `action` (flush, hold, release, delete, bounce) to what `selector` matches
/// (everything when it is empty); `reason` goes with bounces.
pub fn act(
    client: &Client,
    action: Action,
    selector: &Selector,
    reason: Option<&str>,
    json: bool,
) -> Result<String, CallError> {
    let mut body = serde_json::to_value(selector).map_err(|e| CallError::BadAnswer(e.to_string()))?;
    if let Some(map) = body.as_object_mut() {
        map.retain(|_, v| !v.is_null());
        if map.is_empty() {
            map.insert("all".into(), serde_json::Value::Bool(true));
        }
        if let Some(reason) = reason {
            map.insert("reason".into(), serde_json::Value::String(reason.to_string()));
        }
    }
    let text = client.post(&format!("/api/queue/{}", action.name()), &body)?;
    if json {
        return Ok(text);
    }
    let touched: Touched = parse(&text)?;
    let verb = match action {
        Action::Flush => "deferred message(s) retried now",
        Action::Hold => "message(s) held",
        Action::Release => "message(s) released",
        Action::Delete => "message(s) deleted",
        Action::Bounce => "message(s) returned to their senders",
    };
    let mut out = format!("{} {verb}\n", touched.count);
    for id in touched.ids {
        out.push_str(&id);
        out.push('\n');
    }
    if !touched.busy.is_empty() {
        out.push_str(&format!(
            "{} being delivered right now, not touched (try again): {}\n",
            touched.busy.len(),
            touched.busy.join(" ")
        ));
    }
    Ok(out)
}

/// Suspends delivery to `domain` for `duration_s` seconds.
pub fn suspend(client: &Client, domain: &str, reason: &str, duration_s: u64, json: bool) -> Result<String, CallError> {
    let body = serde_json::json!({ "domain": domain, "reason": reason, "duration_s": duration_s });
    let text = client.post("/api/destinations/suspend", &body)?;
    if json {
        return Ok(text);
    }
    let record: SuspensionRecord = parse(&text)?;
    Ok(format!(
        "{} suspended until {}\n",
        record.domain,
        rfc3339(record.until_unix_s)
    ))
}

/// Ends the suspension of `domain`.
pub fn resume(client: &Client, domain: &str, json: bool) -> Result<String, CallError> {
    let text = client.post("/api/destinations/resume", &serde_json::json!({ "domain": domain }))?;
    if json {
        return Ok(text);
    }
    let v: serde_json::Value = parse(&text)?;
    Ok(format!("{domain} resumed: {} message(s) go now\n", v["released"]))
}

/// The suspensions in force, and the destinations down.
pub fn suspended(client: &Client, json: bool) -> Result<String, CallError> {
    let text = client.get("/api/destinations")?;
    if json {
        return Ok(text);
    }
    #[derive(Deserialize)]
    struct List {
        suspended: Vec<SuspensionRecord>,
        #[serde(default)]
        down: Vec<crate::admin::protocol::DownSite>,
        #[serde(default)]
        automatic: Vec<crate::admin::protocol::ShardSuspension>,
        #[serde(default)]
        slowed: Vec<crate::admin::protocol::ShardSlowdown>,
    }
    let list: List = parse(&text)?;
    let mut out = String::new();
    for s in list.suspended {
        out.push_str(&format!(
            "{}  until {}  {}\n",
            s.domain,
            rfc3339(s.until_unix_s),
            s.reason
        ));
    }
    for a in list.automatic {
        out.push_str(&format!(
            "{}  until {}  by a bounce action (shard {})\n",
            a.domain,
            rfc3339(a.until_unix_s),
            a.shard
        ));
    }
    for s in list.slowed {
        out.push_str(&format!(
            "{}  slowed to one message every {} ms until {} by a bounce action (shard {})\n",
            s.destination,
            s.interval_ms,
            rfc3339(s.until_unix_s),
            s.shard
        ));
    }
    for d in list.down {
        out.push_str(&format!(
            "{}  down since {} after {} connection failures in a row; next probe in {} s; {} waiting\n",
            d.destination,
            rfc3339(d.down_since_unix_s),
            d.failures,
            d.next_probe_in_s,
            d.waiting
        ));
    }
    Ok(out)
}
