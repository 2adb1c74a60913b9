//! The suppression list end to end, with the real binary: a hard bounce from a capture
//! receiver (Gmail's published 5.1.1 text) suppresses the recipient; Python's smtplib then
//! meets `550 5.1.1` at RCPT and the receiver never sees the address again, also after a
//! SIGKILL and restart; queued mail for a newly suppressed address is dropped without a
//! notice; `at_rcpt = "accept"` drops with an event; the API and `gannet suppress` list,
//! check, add, remove, import (in pieces) and export.

mod common;

use std::time::Duration;

use common::sink::CaptureSink;
use common::{Gannet, Setup};

const WAIT: Duration = Duration::from_secs(60);
const GONE: &str = "550 5.1.1 The email account that you tried to reach does not exist.";

/// Sends one message with smtplib; prints `refused <code> <text>` per refused recipient, then
/// `sent` or `all refused`.
const SMTPLIB_TRY: &str = r#"
import smtplib, sys
port, sender, rcpts = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
with smtplib.SMTP("127.0.0.1", port) as s:
    try:
        refused = s.sendmail(sender, rcpts, "Subject: again\r\n\r\nbody\r\n")
        for r, (code, text) in refused.items():
            print("refused", r, code, text.decode())
        print("sent")
    except smtplib.SMTPRecipientsRefused as e:
        for r, (code, text) in e.recipients.items():
            print("refused", r, code, text.decode())
        print("all refused")
"#;

fn run_ok(g: &Gannet, args: &[&str]) -> String {
    let out = g.command(args);
    assert!(
        out.status.success(),
        "gannet {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_hard_bounce_suppresses_and_the_next_message_is_refused_at_rcpt_even_after_sigkill() {
    let receiver = CaptureSink::start();
    let senders = CaptureSink::start();
    *receiver.behaviour.rcpt_replies.lock().unwrap() = vec![("gone@".into(), GONE.into())];
    let mut setup = Setup::new();
    setup
        .route("capture.test", receiver.addr)
        .route("back.test", senders.addr);
    let g = Gannet::start(&setup);
    common::send_message(g.mx(), "s@back.test", &["gone@capture.test"], "Subject: 1\r\n\r\nx\r\n");
    let dsn = senders.wait_for(1, WAIT).remove(0);
    assert!(String::from_utf8_lossy(&dsn.content).contains("Status: 5.1.1"));
    assert!(
        g.wait_for_log("suppressed after a hard bounce", WAIT),
        "{}",
        g.log_text()
    );
    assert_eq!(g.metric("gannet_suppression_added_total{source=\"hard-bounce\"}"), 1.0);
    assert_eq!(g.metric("gannet_suppression_entries"), 1.0);
    assert_eq!(g.metric("gannet_bounce_actions_total{action=\"suppress\"}"), 1.0);

    let port = g.mx().port().to_string();
    let tried = common::python(
        SMTPLIB_TRY,
        &[&port, "s@back.test", "Gone@Capture.test", "ok@capture.test"],
    );
    assert!(
        tried.contains("refused Gone@Capture.test 550 5.1.1 Gone@Capture.test is on this server's suppression list"),
        "{tried}"
    );
    assert!(tried.ends_with("sent\n"), "the other recipient goes: {tried}");
    let got = receiver.wait_for(1, WAIT);
    assert_eq!(
        got[0].recipients,
        vec!["ok@capture.test".to_string()],
        "only the other one"
    );
    assert_eq!(g.metric("gannet_suppressed_total{stage=\"rcpt\"}"), 1.0);

    // SIGKILL: the entry was synced before it was relied upon.
    let g = g.restart();
    let checked = run_ok(&g, &["suppress", "check", "gone@capture.test"]);
    assert!(
        checked.starts_with("suppressed: gone@capture.test  scope global  hard-bounce"),
        "{checked}"
    );
    assert!(
        checked.contains("5.1.1"),
        "the reason is the receiver's reply: {checked}"
    );
    let port = g.mx().port().to_string();
    let tried = common::python(SMTPLIB_TRY, &[&port, "s@back.test", "gone@capture.test"]);
    assert!(
        tried.contains("550 5.1.1") && tried.ends_with("all refused\n"),
        "{tried}"
    );
    // (ok@ may be delivered twice: the kill can land between its delivery and the record of
    // it, and delivery is at least once.)
    let seen = receiver.behaviour.rcpts_seen.lock().unwrap().clone();
    assert_eq!(
        seen.iter().filter(|r| r.starts_with("gone@")).count(),
        1,
        "after its bounce, the suppressed address never reached the receiver again: {seen:?}"
    );
}

#[test]
fn queued_mail_for_a_suppressed_recipient_is_dropped_without_a_notice_and_accept_mode_drops_with_an_event() {
    let (mut hook, events, hook_port) = common::event_receiver(0);
    let receiver = CaptureSink::start();
    let senders = CaptureSink::start();
    *receiver.behaviour.rcpt_replies.lock().unwrap() = vec![("later@".into(), "451 4.3.0 try again later".into())];
    let mut setup = Setup::new();
    setup
        .route("capture.test", receiver.addr)
        .route("back.test", senders.addr)
        .set("delivery", "retry_first", "\"1h\"")
        .set("suppression", "at_rcpt", "\"accept\"")
        .set("events", "url", &format!("\"http://127.0.0.1:{hook_port}/hook\""));
    let g = Gannet::start(&setup);
    let id = common::send_message(
        g.mx(),
        "s@back.test",
        &["later@capture.test"],
        "Subject: q\r\n\r\nx\r\n",
    );
    assert!(g.wait_for_log("deferred: 451 4.3.0", WAIT), "{}", g.log_text());
    let added = run_ok(
        &g,
        &["suppress", "add", "later@capture.test", "--reason", "asked to stop"],
    );
    assert_eq!(added, "added 1, removed 0, refused (list full) 0\n");
    run_ok(&g, &["queue", "flush"]);
    assert!(g.wait_for_log("suppressed: not delivered", WAIT), "{}", g.log_text());
    let (_, listed) = g.http("GET", "/api/queue", None, &[]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["matched"], 0, "the message is finished: {listed}");
    // Accept mode: RCPT says 250, and the message is dropped before delivery.
    let second = common::send_message(
        g.mx(),
        "s@back.test",
        &["later@capture.test"],
        "Subject: r\r\n\r\nx\r\n",
    );
    assert!(
        g.wait_for_log_count("suppressed: not delivered", 2, WAIT),
        "{}",
        g.log_text()
    );
    assert_eq!(g.metric("gannet_suppressed_total{stage=\"delivery\"}"), 2.0);
    assert_eq!(g.metric("gannet_suppressed_total{stage=\"rcpt\"}"), 0.0);
    let mut suppressed = Vec::new();
    while suppressed.len() < 2 {
        let line = events.recv_timeout(WAIT).expect("the suppressed events never came");
        let event: serde_json::Value = serde_json::from_str(&line).unwrap();
        if event["kind"] == "suppressed" {
            assert_eq!(event["recipient"], "later@capture.test");
            assert!(event["reply"].as_str().unwrap().contains("asked to stop"), "{event}");
            suppressed.push(event["message_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(suppressed, vec![id, second]);
    // No notice for either: the senders' receiver got nothing, and no bounce was counted.
    assert!(senders.captured().is_empty());
    assert_eq!(
        g.metric("gannet_bounces_total{class=\"transient\",result=\"failed\"}"),
        0.0
    );
    let _ = hook.kill();
}

#[test]
fn the_api_and_cli_list_check_add_remove_import_and_export() {
    let mut setup = Setup::new();
    // Small requests: the CLI must cut the import into pieces.
    setup.set("admin", "request_size_max", "\"16KiB\"");
    let g = Gannet::start(&setup);
    let file = g.dir.path().join("import.csv");
    let mut csv = String::from("address,reason\n");
    for i in 0..2000 {
        csv.push_str(&format!("user{i}@imported.test,\"from the old MTA, list {i}\"\n"));
    }
    std::fs::write(&file, &csv).unwrap();
    let imported = run_ok(&g, &["suppress", "import", file.to_str().unwrap()]);
    assert_eq!(imported, "added 2000, removed 0, refused (list full) 0\n");
    let (status, page) = g.http(
        "GET",
        "/api/suppressions?source=import&contains=list+1999&limit=5",
        None,
        &[],
    );
    assert_eq!(status, 200, "{page}");
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["matched"], 1, "{page}");
    assert_eq!(page["entries"][0]["address"], "user1999@imported.test");
    assert_eq!(page["entries"][0]["reason"], "from the old MTA, list 1999");

    // A scoped entry: only mail from that sender domain is stopped.
    let body = r#"{"address": "Tired@Example.org", "scope": "news.example.com", "reason": "unsubscribed"}"#;
    let (status, added) = g.http("POST", "/api/suppressions/add", Some(body), &[]);
    assert_eq!((status, added.contains("\"added\": 1")), (200, true), "{added}");
    let check = |sender: &str| {
        let (status, text) = g.http(
            "GET",
            &format!("/api/suppressions/check?address=tired@example.org&sender={sender}"),
            None,
            &[],
        );
        assert_eq!(status, 200, "{text}");
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["suppressed"] == true
    };
    assert!(check("a@news.example.com"));
    assert!(!check("a@shop.example.com"));
    let listed = run_ok(&g, &["suppress", "list", "--source", "operator"]);
    assert!(
        listed.starts_with("tired@example.org  scope news.example.com  operator"),
        "{listed}"
    );

    // Export: every entry, as CSV a spreadsheet (and Python's csv module) reads.
    let out = g.dir.path().join("export.csv");
    run_ok(&g, &["suppress", "export", "--out", out.to_str().unwrap()]);
    let rows = common::python(
        "import csv, sys\nrows = list(csv.DictReader(open(sys.argv[1])))\nprint(len(rows), sorted(set(r['source'] for r in rows)), [r['reason'] for r in rows if r['address'] == 'user7@imported.test'][0])",
        &[out.to_str().unwrap()],
    );
    assert_eq!(rows, "2001 ['import', 'operator'] from the old MTA, list 7\n");

    // Remove: of every scope when none is named.
    let removed = run_ok(&g, &["suppress", "remove", "tired@example.org"]);
    assert_eq!(removed, "added 0, removed 1, refused (list full) 0\n");
    assert!(!check("a@news.example.com"));
    let (status, _) = g.http(
        "POST",
        "/api/suppressions/remove",
        Some(r#"{"address": "user1@imported.test"}"#),
        &[],
    );
    assert_eq!(status, 200);
    assert_eq!(g.metric("gannet_suppression_entries"), 1999.0);

    // Bad input: a clear error naming the line, nothing imported; bad requests get 400.
    std::fs::write(&file, "address,expires_unix_s\nok@x.test,0\nnot-an-address,0\n").unwrap();
    let out = g.command(&["suppress", "import", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("import.csv: line 3"), "{err}");
    assert_eq!(g.metric("gannet_suppression_entries"), 1999.0);
    let (status, text) = g.http("POST", "/api/suppressions/add", Some(r#"{"address": "nobody"}"#), &[]);
    assert_eq!(status, 400, "{text}");
    let (status, text) = g.http("GET", "/api/suppressions?limit=0", None, &[]);
    assert_eq!(status, 400, "{text}");
}

#[test]
fn a_full_list_refuses_new_entries_and_keeps_the_old() {
    let mut setup = Setup::new();
    setup.set("suppression", "entries_max", "2");
    let g = Gannet::start(&setup);
    for who in ["a", "b"] {
        let body = format!(r#"{{"address": "{who}@x.test"}}"#);
        assert_eq!(g.http("POST", "/api/suppressions/add", Some(&body), &[]).0, 200);
    }
    let (status, text) = g.http("POST", "/api/suppressions/add", Some(r#"{"address": "c@x.test"}"#), &[]);
    assert_eq!(status, 507, "{text}");
    assert!(text.contains("\"refused_full\": 1"), "{text}");
    assert_eq!(g.metric("gannet_suppression_refused_full_total"), 1.0);
    assert!(run_ok(&g, &["suppress", "check", "a@x.test"]).starts_with("suppressed"));
    assert!(run_ok(&g, &["suppress", "check", "c@x.test"]).starts_with("not suppressed"));
}

#[test]
fn a_damaged_journal_stops_the_start_naming_the_line() {
    let setup = Setup::new();
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(
        spool.join("suppressions.csv"),
        "add,global,a@x.test,operator,1,0,r\nadd,global,b@x.test,operator,yesterday,0,r\n",
    )
    .unwrap();
    let mut g = Gannet::spawn(&setup, dir);
    let status = g.wait();
    assert!(!status.success());
    let log = g.log_text();
    assert!(
        log.contains("suppressions.csv: line 2") && log.contains("\"yesterday\""),
        "{log}"
    );
}
