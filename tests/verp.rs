//! Signed VERP return paths and the bounce domain, end to end with the real binary: each
//! delivery leaves with `bounces+<token>@bounce.test`; a DSN and an ARF report sent back with
//! Python's smtplib suppress the recipient they name (events name the original message); a
//! report whose token was not made for the address it names is ignored and counted; a report
//! that cannot be read is held; unknown addresses at the bounce domain are refused at RCPT.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::sink::CaptureSink;
use common::{Gannet, Raw, Setup};

const WAIT: Duration = Duration::from_secs(60);

/// Sends a file's bytes as one message with smtplib: argv port, envelope sender, recipient, file.
const SMTPLIB_SEND_FILE: &str = r#"
import smtplib, sys
port, sender, rcpt, path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
with smtplib.SMTP("127.0.0.1", port) as s:
    s.sendmail(sender, [rcpt], open(path, "rb").read())
print("sent")
"#;

fn send_file(g: &Gannet, sender: &str, rcpt: &str, name: &str, content: &str) {
    let path = g.dir.path().join(name);
    std::fs::write(&path, content).unwrap();
    let port = g.mx().port().to_string();
    let out = common::python(SMTPLIB_SEND_FILE, &[&port, sender, rcpt, path.to_str().unwrap()]);
    assert_eq!(out, "sent\n");
}

fn dsn(to: &str, final_recipient: &str) -> String {
    format!(
        "From: MAILER-DAEMON@mx.capture.test\r\nTo: {to}\r\nSubject: Undelivered Mail Returned to Sender\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n\
--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.capture.test\r\n\r\n\
Final-Recipient: rfc822; {final_recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n\
Diagnostic-Code: smtp; 550 5.1.1 <{final_recipient}>: Recipient address rejected: User unknown\r\n\
--B--\r\n"
    )
}

fn arf(return_path: &str, complainant: &str) -> String {
    format!(
        "From: feedback@fbl.capture.test\r\nTo: fbl@bounce.test\r\nSubject: FW: Our offers\r\n\
MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report; boundary=\"F\"\r\n\r\n\
--F\r\nContent-Type: text/plain\r\n\r\nThis is an email abuse report.\r\n\
--F\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nUser-Agent: FBL/1.0\r\nVersion: 1\r\n\
Original-Rcpt-To: <{complainant}>\r\n\
--F\r\nContent-Type: text/rfc822-headers\r\n\r\nReturn-Path: <{return_path}>\r\nFrom: s@back.test\r\nTo: {complainant}\r\nSubject: Our offers\r\n\
--F--\r\n"
    )
}

fn checked(g: &Gannet, address: &str) -> serde_json::Value {
    let (status, text) = g.http("GET", &format!("/api/suppressions/check?address={address}"), None, &[]);
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

#[test]
fn reports_to_signed_return_paths_suppress_forged_ones_do_not_and_unreadable_ones_are_held() {
    let (mut hook, events, hook_port) = common::event_receiver(0);
    let receiver = CaptureSink::start();
    let mut setup = Setup::new();
    setup
        .route("capture.test", receiver.addr)
        .set("verp", "enabled", "true")
        .set("verp", "domain", "\"bounce.test\"")
        .set("events", "url", &format!("\"http://127.0.0.1:{hook_port}/hook\""));
    let g = Gannet::start(&setup);
    let id = common::send_message(
        g.mx(),
        "s@back.test",
        &["user@capture.test", "other@capture.test", "third@capture.test"],
        "Subject: offers\r\n\r\nx\r\n",
    );
    // One transaction per recipient, each with its own signed return path.
    let got = receiver.wait_for(3, WAIT);
    let paths: HashMap<String, String> = got.iter().map(|c| (c.recipients[0].clone(), c.from.clone())).collect();
    assert_eq!(paths.len(), 3, "{got:?}");
    for (rcpt, from) in &paths {
        assert!(
            from.starts_with(&format!("bounces+{}.", id.to_ascii_lowercase())),
            "{rcpt}: {from}"
        );
        assert!(
            from.ends_with("@bounce.test") && from.split('@').next().unwrap().len() <= 64,
            "{from}"
        );
    }

    // A DSN to the return path it names: suppressed, and an event for the original message.
    send_file(
        &g,
        "",
        &paths["user@capture.test"],
        "dsn.eml",
        &dsn(&paths["user@capture.test"], "user@capture.test"),
    );
    assert!(g.wait_for_log("report read:", WAIT), "{}", g.log_text());
    let entry = checked(&g, "user@capture.test");
    assert_eq!(entry["suppressed"], true, "{entry}");
    assert_eq!(entry["entry"]["source"], "hard-bounce");
    assert!(
        entry["entry"]["reason"].as_str().unwrap().contains("invalid-recipient"),
        "{entry}"
    );

    // An ARF complaint to the complaints address, its token in the original's Return-Path.
    send_file(
        &g,
        "feedback@fbl.capture.test",
        "fbl@bounce.test",
        "arf.eml",
        &arf(&paths["other@capture.test"], "other@capture.test"),
    );
    assert!(g.wait_for_log_count("report read:", 2, WAIT), "{}", g.log_text());
    let entry = checked(&g, "other@capture.test");
    assert_eq!(entry["entry"]["source"], "complaint", "{entry}");

    let mut seen: Vec<(String, String, String)> = Vec::new();
    while seen.len() < 2 {
        let line = events.recv_timeout(WAIT).expect("report events never came");
        let e: serde_json::Value = serde_json::from_str(&line).unwrap();
        if e["kind"] == "bounce_report" || e["kind"] == "complaint" {
            seen.push((
                e["kind"].as_str().unwrap().into(),
                e["message_id"].as_str().unwrap().into(),
                e["recipient"].as_str().unwrap().into(),
            ));
        }
    }
    assert_eq!(
        seen,
        vec![
            ("bounce_report".into(), id.clone(), "user@capture.test".into()),
            ("complaint".into(), id.clone(), "other@capture.test".into()),
        ]
    );

    // Forged: a real token, but for another address than the one the report names; and a
    // made-up token. Neither suppresses; both are counted.
    send_file(
        &g,
        "",
        &paths["third@capture.test"],
        "forged.eml",
        &dsn(&paths["third@capture.test"], "victim@capture.test"),
    );
    let made_up = format!("bounces+{}.0.0011223344556677@bounce.test", id.to_ascii_lowercase());
    send_file(&g, "", &made_up, "made-up.eml", &dsn(&made_up, "user2@capture.test"));
    assert!(g.wait_for_log_count("ignored as forged", 2, WAIT), "{}", g.log_text());
    assert_eq!(
        g.metric("gannet_bounce_reports_total{kind=\"dsn\",result=\"forged\"}"),
        2.0
    );
    assert_eq!(checked(&g, "victim@capture.test")["suppressed"], false);
    assert_eq!(checked(&g, "user2@capture.test")["suppressed"], false);
    assert_eq!(checked(&g, "third@capture.test")["suppressed"], false);

    // Unreadable: held for the operator, not lost.
    send_file(
        &g,
        "",
        &paths["third@capture.test"],
        "note.eml",
        "Subject: hello\r\n\r\nJust a note to the bounce address.\r\n",
    );
    assert!(g.wait_for_log("held for the operator", WAIT), "{}", g.log_text());
    assert_eq!(
        g.metric("gannet_bounce_reports_total{kind=\"unknown\",result=\"unparseable\"}"),
        1.0
    );
    let (_, held) = g.http("GET", "/api/queue?state=held", None, &[]);
    let held: serde_json::Value = serde_json::from_str(&held).unwrap();
    assert_eq!(held["matched"], 1, "{held}");
    assert_eq!(
        g.metric("gannet_bounce_reports_total{kind=\"dsn\",result=\"suppressed\"}"),
        1.0
    );
    assert_eq!(
        g.metric("gannet_bounce_reports_total{kind=\"arf\",result=\"suppressed\"}"),
        1.0
    );
    // Nothing sent to the bounce domain was relayed: the receiver still has the three.
    assert_eq!(receiver.captured().len(), 3);

    // Only return paths and the complaints address are mailboxes at the bounce domain.
    let mut c = Raw::connect(g.mx());
    c.hello();
    assert!(c.cmd("MAIL FROM:<>").starts_with("250"));
    let refused = c.cmd("RCPT TO:<postmaster-wannabe@bounce.test>");
    assert!(
        refused.starts_with("550 5.1.1 no such mailbox at the bounce domain"),
        "{refused}"
    );
    assert!(c.cmd("RCPT TO:<FBL@bounce.test>").starts_with("250"));
    let _ = hook.kill();
}

#[test]
fn the_verp_key_is_made_once_and_kept_and_a_bad_domain_is_refused_at_start() {
    let mut setup = Setup::new();
    setup
        .set("verp", "enabled", "true")
        .set("verp", "domain", "\"bounce.test\"");
    let g = Gannet::start(&setup);
    let key_path = g.spool_dir.join("verp.key");
    let key = std::fs::read(&key_path).unwrap();
    assert_eq!(key.len(), 64, "32 random bytes as hex");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let g = g.restart();
    assert_eq!(std::fs::read(&key_path).unwrap(), key, "kept across restarts");
    drop(g);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("verp.toml");
    std::fs::write(&config, "[verp]\nenabled = true\ndomain = \"not a domain\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gannet"))
        .args(["check-config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(":3: verp.domain"), "{err}");
}
