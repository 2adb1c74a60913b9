//! The admin API against the real binary: `/metrics` counted from known traffic (linted by
//! promtool, parsed by Python's prometheus_client), the queue API and `gannet queue` through it,
//! the bearer token, and the refusal of a non-loopback address without one.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::sink::CaptureSink;
use common::{Gannet, Raw, Setup, BIN};

const WAIT: Duration = Duration::from_secs(60);

/// Prints every sample of a Prometheus text exposition as `name{k="v",...} value`, labels
/// sorted, as Python's prometheus_client parser reads it.
const PARSE_METRICS: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        print("%s{%s} %r" % (s.name, labels, s.value))
"#;

/// The samples of a scrape, keyed `name{labels}` (labels sorted), parsed by prometheus_client.
fn scrape(g: &Gannet) -> HashMap<String, f64> {
    let (status, text) = g.http("GET", "/metrics", None, &[]);
    assert_eq!(status, 200, "{text}");
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    lint.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let linted = lint.wait_with_output().unwrap();
    assert!(
        linted.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );
    let mut parse = Command::new("/usr/bin/python3")
        .args(["-c", PARSE_METRICS])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (python3-prometheus-client)");
    parse.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let parsed = parse.wait_with_output().unwrap();
    assert!(parsed.status.success(), "prometheus_client could not parse:\n{text}");
    String::from_utf8(parsed.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_string(), value.parse::<f64>().unwrap())
        })
        .collect()
}

fn sample(samples: &HashMap<String, f64>, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or_else(|| {
        let mut names: Vec<_> = samples
            .keys()
            .filter(|k| k.starts_with(key.split('{').next().unwrap()))
            .collect();
        names.sort();
        panic!("no sample {key}; the family has {names:?}")
    })
}

/// Sends with Python's smtplib: `count` messages from `from` to `to`; refused recipients are
/// allowed (smtplib raises only when all are refused).
const SMTPLIB_SEND: &str = r#"
import smtplib, sys
port, count, sender = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rcpts = sys.argv[4:]
with smtplib.SMTP("127.0.0.1", port) as s:
    for i in range(count):
        s.sendmail(sender, rcpts, "Subject: m%d\r\n\r\nbody %d\r\n" % (i, i))
"#;

#[test]
fn metrics_count_known_traffic_exactly() {
    let sink_port = common::free_port();
    let mut sink = common::smtp_sink(sink_port, &[]);
    let capture = CaptureSink::start();
    capture.behaviour.defer_data.store(1, Ordering::Release);
    *capture.behaviour.reject_rcpt.lock().unwrap() = Some("refuse".into());
    let mut setup = Setup::new();
    setup
        .route("sink.test", format!("127.0.0.1:{sink_port}").parse().unwrap())
        .route("capture.test", capture.addr)
        .set("delivery", "retry_first", "\"1h\"")
        .set("admin", "metrics_destination_attempts_min", "1");
    let g = Gannet::start(&setup);
    let port = g.mx().port().to_string();
    common::python(SMTPLIB_SEND, &[&port, "5", "s@sink.test", "a@sink.test"]);
    // One message, two recipients: one refused at RCPT by the receiver (failed, bounced to
    // s@sink.test), one deferred by a 451 after the dot.
    common::python(
        SMTPLIB_SEND,
        &[&port, "1", "s@sink.test", "ok@capture.test", "refuse@capture.test"],
    );
    // One recipient refused here: bad syntax (501 5.1.3).
    let mut raw = Raw::connect(g.mx());
    raw.hello();
    assert!(raw.cmd("MAIL FROM:<s@sink.test>").starts_with("250"));
    assert!(raw.cmd("RCPT TO:<not an address>").starts_with("501 5.1.3"));
    raw.cmd("QUIT");
    // 5 to the sink, 1 bounce to the sink.
    assert!(g.wait_for_log_count("delivered: ", 6, WAIT), "{}", g.log_text());
    assert!(g.wait_for_log("deferred: ", WAIT), "{}", g.log_text());
    assert!(g.wait_for_log("failed for good: ", WAIT), "{}", g.log_text());

    let m = scrape(&g);
    let mx = format!("listener=\"{}\"", g.mx());
    let sink_dest = format!("destination=\"127.0.0.1:{sink_port}\"");
    let capture_dest = format!("destination=\"{}\"", capture.addr);
    assert_eq!(sample(&m, &format!("gannet_messages_received_total{{{mx}}}")), 6.0);
    assert_eq!(
        sample(&m, &format!("gannet_connections_total{{{mx},result=\"accepted\"}}")),
        3.0
    );
    assert_eq!(
        sample(
            &m,
            &format!("gannet_messages_rejected_total{{{mx},reason=\"address\"}}")
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            &format!("gannet_delivery_attempts_total{{{sink_dest},result=\"delivered\"}}")
        ),
        6.0
    );
    assert_eq!(
        sample(
            &m,
            &format!("gannet_delivery_attempts_total{{{capture_dest},result=\"deferred\"}}")
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            &format!("gannet_delivery_attempts_total{{{capture_dest},result=\"failed\"}}")
        ),
        1.0
    );
    // The 550 5.1.1 at RCPT and the 451 4.3.0 after the dot, by class.
    assert_eq!(
        sample(
            &m,
            "gannet_bounces_total{class=\"invalid-recipient\",result=\"failed\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&m, "gannet_bounces_total{class=\"transient\",result=\"deferred\"}"),
        1.0
    );
    assert_eq!(sample(&m, "gannet_retries_total{}"), 0.0);
    // Our replies: six "250 2.0.0 Ok: queued", one 501 5.1.3.
    assert_eq!(
        sample(
            &m,
            "gannet_smtp_replies_total{code=\"250\",direction=\"inbound\",enhanced=\"2.0.0\"}"
        ),
        6.0
    );
    assert_eq!(
        sample(
            &m,
            "gannet_smtp_replies_total{code=\"501\",direction=\"inbound\",enhanced=\"5.1.3\"}"
        ),
        1.0
    );
    // The receivers' replies: the capture sink's 550 5.1.1 and 451 4.3.0.
    assert_eq!(
        sample(
            &m,
            "gannet_smtp_replies_total{code=\"550\",direction=\"outbound\",enhanced=\"5.1.1\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "gannet_smtp_replies_total{code=\"451\",direction=\"outbound\",enhanced=\"4.3.0\"}"
        ),
        1.0
    );
    // The deferred message waits; everything else is finished.
    assert_eq!(sample(&m, "gannet_queue_messages{state=\"deferred\"}"), 1.0);
    assert_eq!(sample(&m, "gannet_queue_recipients{state=\"deferred\"}"), 1.0);
    assert_eq!(sample(&m, "gannet_queue_time_seconds_count{}"), 6.0);
    assert_eq!(sample(&m, "gannet_delivery_duration_seconds_count{}"), 7.0);
    assert!(sample(&m, "gannet_fdatasync_seconds_count{}") >= 1.0);
    assert!(
        sample(&m, "gannet_commit_batch_messages_sum{}") >= 7.0,
        "6 received and 1 bounce"
    );
    assert!(sample(&m, "gannet_spool_segments{}") >= 1.0);
    let _ = sink.kill();
    let _ = sink.wait();
}

/// A queued message's id from `gannet queue list`.
fn listed_ids(g: &Gannet, args: &[&str]) -> Vec<String> {
    let mut all = vec!["queue", "list"];
    all.extend_from_slice(args);
    let out = g.command(&all);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
fn the_queue_api_lists_shows_summarizes_and_flushes_by_selection() {
    let deferring = CaptureSink::start();
    deferring.behaviour.defer_data.store(2, Ordering::Release);
    let mut setup = Setup::new();
    setup
        .route("a.test", deferring.addr)
        .route("b.test", deferring.addr)
        .set("delivery", "retry_first", "\"1h\"");
    let g = Gannet::start(&setup);
    let first = common::send_message(g.mx(), "s@src.test", &["x@a.test"], "Subject: a\r\n\r\nfor a\r\n");
    let second = common::send_message(g.mx(), "t@src.test", &["y@b.test"], "Subject: b\r\n\r\nfor b\r\n");
    assert!(g.wait_for_log_count("deferred: ", 2, WAIT), "{}", g.log_text());

    // Listing, filtered, through the API (curl) and the CLI.
    let (status, body) = g.http("GET", "/api/queue?domain=a.test", None, &[]);
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["matched"], 1);
    assert_eq!(page["messages"][0]["id"], first.as_str());
    assert_eq!(page["messages"][0]["state"], "deferred");
    assert_eq!(listed_ids(&g, &["--sender", "t@src.test"]), vec![second.clone()]);
    let mut both = listed_ids(&g, &[]);
    both.sort();
    let mut expected = vec![first.clone(), second.clone()];
    expected.sort();
    assert_eq!(both, expected);
    let (status, body) = g.http("GET", "/api/queue?state=lost", None, &[]);
    assert_eq!(status, 400, "{body}");

    // One message in full: its recipient, the receiver's last reply, its headers.
    let (status, body) = g.http("GET", &format!("/api/queue/{first}"), None, &[]);
    assert_eq!(status, 200, "{body}");
    let detail: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(detail["recipients"][0]["address"], "x@a.test");
    assert_eq!(detail["recipients"][0]["state"], "pending");
    assert!(
        detail["last_reply"].as_str().unwrap().contains("try again later"),
        "{body}"
    );
    assert!(detail["headers"].as_str().unwrap().contains("Subject: a"), "{body}");
    let shown = g.command(&["queue", "show", &first, "--json"]);
    assert!(String::from_utf8_lossy(&shown.stdout).contains("\"x@a.test\""));
    let (status, _) = g.http("GET", "/api/queue/01A2278EF947-00-000000", None, &[]);
    assert_eq!(status, 404);

    // The shape by domain.
    let out = g.command(&["queue", "summary", "--json"]);
    let shape: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let domains: Vec<&str> = shape["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["domain"].as_str().unwrap())
        .collect();
    assert!(domains.contains(&"a.test") && domains.contains(&"b.test"), "{shape}");

    // A flush of one domain retries only that message; an empty selector is refused.
    let (status, _) = g.http("POST", "/api/queue/flush", Some("{}"), &[]);
    assert_eq!(status, 400);
    let out = g.command(&["queue", "flush", "--domain", "a.test"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("1 deferred message(s) retried now"));
    let got = deferring.wait_for(1, WAIT);
    assert_eq!(got[0].recipients, vec!["x@a.test".to_string()]);
    assert!(g.wait_for_log("delivered: ", WAIT), "{}", g.log_text());
    assert_eq!(listed_ids(&g, &[]), vec![second.clone()]);

    // Hold and release by curl, delete by the CLI.
    let select = format!("{{\"id\": \"{second}\"}}");
    let (status, body) = g.http("POST", "/api/queue/hold", Some(&select), &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(listed_ids(&g, &["--state", "held"]), vec![second.clone()]);
    deferring.behaviour.defer_data.store(1, Ordering::Release);
    let (status, body) = g.http("POST", "/api/queue/release", Some(&select), &[]);
    assert!(status == 200 && body.contains("\"count\": 1"), "{body}");
    // Released, it is tried at once; the receiver defers it again (its last deferral).
    assert!(g.wait_for_log_count("deferred: ", 3, WAIT), "{}", g.log_text());
    let out = run_ok(&g, &["queue", "delete", "--id", &second]);
    assert!(out.starts_with("1 message(s) deleted"), "{out}");
    assert!(listed_ids(&g, &[]).is_empty());
}

#[test]
fn a_token_guards_the_api_and_a_public_address_needs_one() {
    let mut setup = Setup::new();
    let token_path = setup.files.path().join("admin.token");
    std::fs::write(&token_path, "s3cret-token-of-enough-length\n").unwrap();
    setup.set(
        "admin",
        "token_file",
        &format!("{:?}", token_path.display().to_string()),
    );
    let g = Gannet::start(&setup);
    let (status, _) = g.http("GET", "/metrics", None, &[]);
    assert_eq!(status, 401);
    let (status, _) = g.http(
        "GET",
        "/api/queue",
        None,
        &["-H", "Authorization: Bearer wrong-token-of-some-length"],
    );
    assert_eq!(status, 401);
    let (status, body) = g.http(
        "GET",
        "/metrics",
        None,
        &["-H", "Authorization: Bearer s3cret-token-of-enough-length"],
    );
    assert_eq!(status, 200, "{body}");
    // The CLI reads the same token file.
    let out = g.command(&["queue", "summary"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("public.toml");
    std::fs::write(&config, "[admin]\naddress = \"0.0.0.0:2580\"\n").unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&config).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin.token_file") && err.contains(":2: admin.address"),
        "{err}"
    );
}

#[test]
fn oversized_requests_and_unknown_paths_get_clear_errors() {
    let g = Gannet::start(&Setup::new());
    let big = format!("{{\"sender\": \"{}\"}}", "x".repeat(70 * 1024));
    let (status, _) = g.http("POST", "/api/queue/flush", Some(&big), &[]);
    assert_eq!(status, 413);
    let (status, body) = g.http("GET", "/api/nothing", None, &[]);
    assert_eq!(status, 404, "{body}");
    let (status, _) = g.http("DELETE", "/metrics", None, &[]);
    assert_eq!(status, 405);
}

/// Every `gannet_*` name in an expression, as written.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("gannet_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn expressions(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => expressions(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| expressions(v, out)),
        _ => {}
    }
}

#[test]
fn every_dashboard_query_uses_families_that_metrics_exposes() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/gannet.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "the dashboard has {} queries", exprs.len());
    let g = Gannet::start(&Setup::new());
    let (status, text) = g.http("GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    let types: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for expr in &exprs {
        for name in metric_names(expr) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| types.contains(f)))
                .unwrap_or(&name);
            assert!(
                types.contains(&family),
                "{name} (in {expr:?}) is not a family /metrics exposes"
            );
        }
    }
}

#[test]
fn logs_can_be_json_or_logfmt_and_carry_the_message_id() {
    for format in ["json", "logfmt"] {
        let sink = CaptureSink::start();
        let mut setup = Setup::new();
        setup
            .set("log", "format", &format!("\"{format}\""))
            .route("dst.test", sink.addr);
        let g = Gannet::start(&setup);
        let id = common::send_message(g.mx(), "s@src.test", &["r@dst.test"], "Subject: log\r\n\r\nx\r\n");
        assert!(g.wait_for_log("queued", WAIT));
        assert!(g.wait_for_log("delivered: ", WAIT), "{}", g.log_text());
        let text = g.log_text();
        let line = text
            .lines()
            .find(|l| l.contains("queued") && l.contains(&id))
            .unwrap_or_else(|| panic!("{text}"));
        match format {
            "json" => {
                let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
                assert_eq!(v["message"], "queued", "{line}");
                assert_eq!(v["id"], id.as_str(), "{line}");
                assert_eq!(v["from"], "s@src.test", "{line}");
                assert_eq!(v["level"], "INFO", "{line}");
                // The attempt's line: recipient, site, the address that answered, TLS, time.
                let text = g.log_text();
                let attempt = text.lines().find(|l| l.contains("delivered: ")).unwrap();
                let a: serde_json::Value = serde_json::from_str(attempt).unwrap_or_else(|e| panic!("{e}: {attempt}"));
                assert_eq!(a["id"], id.as_str(), "{attempt}");
                assert_eq!(a["to"], "r@dst.test", "{attempt}");
                assert_eq!(a["relay"], sink.addr.to_string().as_str(), "{attempt}");
                assert_eq!(a["mx"], sink.addr.to_string().as_str(), "{attempt}");
                assert!(a["took_ms"].is_u64() && a["tls"].is_string(), "{attempt}");
            }
            _ => {
                assert!(line.contains(&format!("id={id}")), "{line}");
                assert!(line.contains("level=info"), "{line}");
                assert!(line.contains("from=s@src.test"), "{line}");
                let text = g.log_text();
                let attempt = text.lines().find(|l| l.contains("delivered: ")).unwrap();
                assert!(
                    attempt.contains(&format!("id={id}")) && attempt.contains("took_ms="),
                    "{attempt}"
                );
            }
        }
    }
}

fn run_ok(g: &Gannet, args: &[&str]) -> String {
    let out = g.command(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn holds_survive_sigkill_and_deletes_and_bounces_are_for_good() {
    let receiver = CaptureSink::start();
    receiver.behaviour.defer_data.store(usize::MAX, Ordering::Release);
    let senders = CaptureSink::start();
    let mut setup = Setup::new();
    setup
        .route("a.test", receiver.addr)
        .route("b.test", receiver.addr)
        .route("c.test", receiver.addr)
        .route("d.test", receiver.addr)
        .route("src.test", senders.addr)
        .set("delivery", "retry_first", "\"1h\"");
    let g = Gannet::start(&setup);
    let held = common::send_message(g.mx(), "s@src.test", &["x@a.test"], "Subject: hold me\r\n\r\nx\r\n");
    let deleted = common::send_message(g.mx(), "s@src.test", &["y@b.test"], "Subject: delete me\r\n\r\ny\r\n");
    let bounced = common::send_message(g.mx(), "s@src.test", &["z@c.test"], "Subject: bounce me\r\n\r\nz\r\n");
    common::send_message(
        g.mx(),
        "s@src.test",
        &["w@d.test"],
        "Subject: bounce me too\r\n\r\nw\r\n",
    );
    assert!(g.wait_for_log_count("deferred: ", 4, WAIT), "{}", g.log_text());

    assert!(run_ok(&g, &["queue", "hold", "--domain", "a.test"]).starts_with("1 message(s) held"));
    let (status, body) = g.http("POST", "/api/queue/delete", Some(r#"{"domain": "b.test"}"#), &[]);
    assert_eq!(status, 200, "{body}");
    let deleted_ids: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(deleted_ids["ids"][0], deleted.as_str());
    let (status, _) = g.http("POST", "/api/queue/bounce", Some(r#"{"domain": "c.test"}"#), &[]);
    assert_eq!(status, 400, "a bounce needs a reason");
    let out = run_ok(
        &g,
        &["queue", "bounce", "--domain", "c.test", "--reason", "spam run reported"],
    );
    assert!(out.starts_with("1 message(s) returned to their senders"), "{out}");
    assert!(out.contains(&bounced), "{out}");
    // The sender gets an RFC 3464 report naming the operator's reason.
    let notice = senders.wait_for(1, WAIT);
    let text = String::from_utf8_lossy(&notice[0].content);
    assert_eq!(notice[0].from, "", "from the null sender");
    assert!(text.contains("report-type=delivery-status"), "{text}");
    assert!(text.contains("spam run reported"), "{text}");
    assert!(text.contains("Subject: bounce me"), "{text}");
    // And by the API.
    let (status, body) = g.http(
        "POST",
        "/api/queue/bounce",
        Some(r#"{"domain": "d.test", "reason": "returned through the API"}"#),
        &[],
    );
    assert!(status == 200 && body.contains("\"count\": 1"), "{body}");
    let notices = senders.wait_for(2, WAIT);
    assert!(String::from_utf8_lossy(&notices[1].content).contains("returned through the API"));

    // SIGKILL: the hold, the delete and the bounce were durable when they were reported.
    let g = g.restart();
    // (The notice may be back too: its delivery's state record is not waited for, and a crash
    // repeats such a delivery, at least once. It is from the null sender.)
    assert_eq!(listed_ids(&g, &["--sender", "s@src.test"]), vec![held.clone()]);
    assert_eq!(listed_ids(&g, &["--state", "held"]), vec![held.clone()]);
    receiver.behaviour.defer_data.store(0, Ordering::Release);
    // A flush of everything leaves held mail alone.
    assert!(run_ok(&g, &["queue", "flush", "--sender", "s@src.test"]).starts_with("0 deferred message(s) retried now"));
    let (status, body) = g.http("GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    assert!(
        body.lines().any(|l| l == "gannet_queue_messages{state=\"held\"} 1"),
        "{body}"
    );
    // Released, it goes at once, and nothing deleted or bounced ever reaches the receiver.
    assert!(run_ok(&g, &["queue", "release", "--id", &held]).starts_with("1 message(s) released"));
    let got = receiver.wait_for(1, WAIT);
    assert_eq!(got[0].recipients, vec!["x@a.test".to_string()]);
    assert!(g.wait_for_log("delivered: ", WAIT), "{}", g.log_text());
    assert!(listed_ids(&g, &["--sender", "s@src.test"]).is_empty());
    assert_eq!(receiver.wait_for(1, Duration::from_millis(1)).len(), 1);
}

#[test]
fn the_event_webhook_gets_every_event_at_least_once_with_unique_ids() {
    let (mut receiver, rx, port) = common::event_receiver(2);
    let sink = CaptureSink::start();
    let mut setup = Setup::new();
    setup
        .route("sink.test", sink.addr)
        .set("events", "url", &format!("\"http://127.0.0.1:{port}/hook\""))
        .set("events", "batch_events_max", "3")
        .set("events", "retry_first", "\"100ms\"")
        .set("events", "retry_max", "\"200ms\"");
    let g = Gannet::start(&setup);
    let ids: Vec<String> = (0..4)
        .map(|i| {
            common::send_message(
                g.mx(),
                "s@src.test",
                &["r@sink.test"],
                &format!("Subject: {i}\r\n\r\nx\r\n"),
            )
        })
        .collect();
    let mut failed = 0;
    let mut seen: HashMap<String, serde_json::Value> = HashMap::new();
    let mut copies = 0;
    while seen.len() < 8 {
        let line = rx.recv_timeout(WAIT).expect("events stopped coming");
        if line == "FAILED" {
            failed += 1;
            continue;
        }
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        copies += 1;
        seen.insert(event["id"].as_str().unwrap().to_string(), event);
    }
    assert_eq!(failed, 2, "the receiver refused two posts, which were retried");
    assert!(copies >= 8);
    for id in &ids {
        for kind in ["received", "delivered"] {
            let found = seen
                .values()
                .filter(|e| e["message_id"] == id.as_str() && e["kind"] == kind)
                .count();
            assert_eq!(found, 1, "{kind} event of {id}: {seen:?}");
        }
    }
    let delivered = seen.values().find(|e| e["kind"] == "delivered").unwrap();
    assert_eq!(delivered["recipient"], "r@sink.test");
    assert_eq!(delivered["sender"], "s@src.test");
    let m = scrape(&g);
    assert_eq!(sample(&m, "gannet_events_failed_posts_total{}"), 2.0);
    assert_eq!(sample(&m, "gannet_events_dropped_total{}"), 0.0);
    let _ = receiver.kill();
    let _ = receiver.wait();
}

#[test]
fn check_config_names_a_webhook_url_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    for (url, says) in [
        ("https://hooks.example/x", "https is not supported yet"),
        ("ftp://x", "must be an http:// URL"),
    ] {
        let config = dir.path().join("events.toml");
        std::fs::write(&config, format!("[events]\nurl = \"{url}\"\n")).unwrap();
        let out = Command::new(BIN).arg("check-config").arg(&config).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(":2: events.url") && err.contains(says), "{err}");
    }
}

#[test]
fn a_suspended_destination_gets_nothing_until_resumed_or_expired_even_across_a_crash() {
    let receiver = CaptureSink::start();
    let mut setup = Setup::new();
    setup.route("a.test", receiver.addr).route("b.test", receiver.addr);
    let g = Gannet::start(&setup);
    let out = run_ok(
        &g,
        &[
            "queue",
            "suspend",
            "a.test",
            "--reason",
            "the provider asked us to pause",
            "--for",
            "3600",
        ],
    );
    assert!(out.starts_with("a.test suspended until"), "{out}");
    let waiting = common::send_message(g.mx(), "s@src.test", &["x@a.test"], "Subject: wait\r\n\r\nx\r\n");
    common::send_message(g.mx(), "s@src.test", &["y@b.test"], "Subject: go\r\n\r\ny\r\n");
    let got = receiver.wait_for(1, WAIT);
    assert_eq!(got[0].recipients, vec!["y@b.test".to_string()]);
    let (status, body) = g.http("GET", "/api/queue?state=suspended", None, &[]);
    assert_eq!(status, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["messages"][0]["id"], waiting.as_str(), "{body}");
    assert_eq!(
        page["messages"][0]["attempts"], 0,
        "a suspension is not an attempt: {body}"
    );

    // SIGKILL and restart: the suspension holds, the message waits again.
    let g = g.restart();
    assert!(run_ok(&g, &["queue", "suspended"]).contains("a.test"));
    assert_eq!(listed_ids(&g, &["--state", "suspended"]), vec![waiting.clone()]);
    // (y@b.test may come again: a crash repeats the deliveries whose state was not yet written.)
    let to_a = |got: &[common::sink::Captured]| got.iter().filter(|c| c.recipients == ["x@a.test"]).count();
    assert_eq!(to_a(&receiver.captured()), 0);

    let out = run_ok(&g, &["queue", "resume", "a.test"]);
    assert!(out.contains("a.test resumed: 1 message(s) go now"), "{out}");
    let mut seen = receiver.captured().len();
    while to_a(&receiver.captured()) == 0 {
        seen += 1;
        receiver.wait_for(seen, WAIT);
    }
    assert_eq!(to_a(&receiver.captured()), 1);
    let (status, _) = g.http("POST", "/api/destinations/resume", Some(r#"{"domain": "a.test"}"#), &[]);
    assert_eq!(status, 404);

    // A suspension that expires lets the mail go by itself.
    let (status, body) = g.http(
        "POST",
        "/api/destinations/suspend",
        Some(r#"{"domain": "b.test", "duration_s": 1}"#),
        &[],
    );
    assert_eq!(status, 200, "{body}");
    common::send_message(g.mx(), "s@src.test", &["z@b.test"], "Subject: later\r\n\r\nz\r\n");
    assert!(
        g.wait_for_log("a suspension expired: 1 message(s) go now", WAIT),
        "{}",
        g.log_text()
    );
    let mut seen = receiver.captured().len();
    while !receiver.captured().iter().any(|c| c.recipients == ["z@b.test"]) {
        seen += 1;
        receiver.wait_for(seen, WAIT);
    }
    let (status, _) = g.http(
        "POST",
        "/api/destinations/suspend",
        Some(r#"{"domain": "not a domain"}"#),
        &[],
    );
    assert_eq!(status, 400);
}
