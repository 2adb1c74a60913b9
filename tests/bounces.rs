//! Bounce classification end to end: the real binary delivers to a capture receiver of the
//! tests' own that answers each recipient with a receiver's published reply text (from
//! crates/bounce/default-rules.toml); the classes show in the metrics, the log, the DSN and
//! the queue API, and the configured actions act.

mod common;

use std::time::Duration;

use common::sink::CaptureSink;
use common::{Gannet, Setup};

const WAIT: Duration = Duration::from_secs(60);

/// Recipient local part, the receiver's reply to its RCPT, and the class it must get.
const SCRIPT: [(&str, &str, &str); 8] = [
    ("gone", "550 5.1.1 The email account that you tried to reach does not exist.", "invalid-recipient"),
    ("yahoo-dd", "554 delivery error: dd This user doesn't have a yahoo.com account (yahoo-dd@capture.test) [0] - mta1001.mail.bf1.yahoo.com", "invalid-recipient"),
    ("full", "552 5.2.2 The email account that you tried to reach is over quota.", "mailbox-full"),
    ("big", "552 5.3.4 Your message exceeded Google's message size limits.", "message-too-large"),
    ("spam", "554 5.7.1 Spam message rejected", "content-rejected"),
    ("listed", "553 5.7.1 [BL21] Connections will not be accepted from 192.0.2.1, because the ip is in Spamhaus's list; see https://postmaster.yahooinc.com/error-codes", "policy-block"),
    ("unauth", "550 5.7.26 This mail has been blocked because the sender is unauthenticated. Gmail requires all senders to authenticate with either SPF or DKIM.", "auth-required"),
    ("busy", "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered.", "rate-limited"),
];

#[test]
fn every_failure_gets_its_class_in_metrics_log_dsn_and_api() {
    let receiver = CaptureSink::start();
    let senders = CaptureSink::start();
    *receiver.behaviour.rcpt_replies.lock().unwrap() = SCRIPT
        .iter()
        .map(|(who, reply, _)| (format!("{who}@"), reply.to_string()))
        .collect();
    let mut setup = Setup::new();
    setup
        .route("capture.test", receiver.addr)
        .route("back.test", senders.addr)
        .set("delivery", "retry_first", "\"1h\"");
    let g = Gannet::start(&setup);
    let mut to: Vec<String> = SCRIPT.iter().map(|(who, _, _)| format!("{who}@capture.test")).collect();
    to.push("ok@capture.test".into());
    let to: Vec<&str> = to.iter().map(String::as_str).collect();
    common::send_message(g.mx(), "s@back.test", &to, "Subject: classes\r\n\r\nbody\r\n");
    receiver.wait_for(1, WAIT);
    // One DSN, for the seven that failed for good.
    let dsn = senders.wait_for(1, WAIT).remove(0);
    let dsn = String::from_utf8_lossy(&dsn.content).into_owned();
    for (who, _, class) in &SCRIPT[..7] {
        let block = format!("Final-Recipient: rfc822; {who}@capture.test\r\n");
        let at = dsn
            .find(&block)
            .unwrap_or_else(|| panic!("{who} not in the DSN:\n{dsn}"));
        let rest = &dsn[at..];
        let end = rest[block.len()..]
            .find("Final-Recipient")
            .map_or(rest.len(), |e| e + block.len());
        assert!(
            rest[..end].contains(&format!("X-Gannet-Bounce-Class: {class}\r\n")),
            "{who}: {}",
            &rest[..end]
        );
    }
    assert!(!dsn.contains("busy@capture.test"), "the deferred one is not in the DSN");
    let key = |class: &str, result: &str| format!("gannet_bounces_total{{class=\"{class}\",result=\"{result}\"}}");
    assert_eq!(g.metric(&key("invalid-recipient", "failed")), 2.0);
    for class in [
        "mailbox-full",
        "message-too-large",
        "content-rejected",
        "policy-block",
        "auth-required",
    ] {
        assert_eq!(g.metric(&key(class, "failed")), 1.0, "{class}");
    }
    assert_eq!(g.metric(&key("rate-limited", "deferred")), 1.0);
    assert!(g.wait_for_log("class=\"rate-limited\"", WAIT), "{}", g.log_text());
    assert!(g.log_text().contains("class=\"invalid-recipient\""), "{}", g.log_text());
    // The queue API names the deferred recipient's last class.
    let (status, list) = g.http("GET", "/api/queue", None, &[]);
    assert_eq!(status, 200, "{list}");
    let listed: serde_json::Value = serde_json::from_str(&list).unwrap();
    let id = listed["messages"][0]["id"]
        .as_str()
        .expect("one message queued")
        .to_string();
    let (status, shown) = g.http("GET", &format!("/api/queue/{id}"), None, &[]);
    assert_eq!(status, 200, "{shown}");
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["last_class"], "rate-limited", "{shown}");
}

#[test]
fn configured_actions_bounce_at_once_and_suspend_the_destination() {
    let receiver = CaptureSink::start();
    let senders = CaptureSink::start();
    *receiver.behaviour.rcpt_replies.lock().unwrap() = vec![
        ("full@".into(), "452 4.2.2 The recipient's inbox is out of storage space.".into()),
        ("busy@".into(), "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered.".into()),
    ];
    let mut setup = Setup::new();
    setup
        .route("capture.test", receiver.addr)
        .route("slow.test", receiver.addr)
        .route("back.test", senders.addr)
        .set("delivery", "retry_first", "\"1h\"")
        .set("bounces", "suspend_for", "\"1h\"")
        .set("bounces.actions", "mailbox-full", "\"bounce\"")
        .set("bounces.actions", "rate-limited", "\"suspend\"");
    let g = Gannet::start(&setup);
    // A 452 over quota: returned at once instead of retried.
    common::send_message(
        g.mx(),
        "s@back.test",
        &["full@capture.test"],
        "Subject: full\r\n\r\nx\r\n",
    );
    let dsn = senders.wait_for(1, WAIT).remove(0);
    let dsn = String::from_utf8_lossy(&dsn.content).into_owned();
    assert!(dsn.contains("Action: failed\r\nStatus: 4.2.2\r\n"), "{dsn}");
    assert!(dsn.contains("X-Gannet-Bounce-Class: mailbox-full"), "{dsn}");
    assert_eq!(g.metric("gannet_bounce_actions_total{action=\"bounce\"}"), 1.0);
    // A rate-limit reply suspends slow.test: the message parks on the suspension, without a
    // backoff step, and slow.test's next message is not tried at all.
    common::send_message(g.mx(), "s@back.test", &["busy@slow.test"], "Subject: busy\r\n\r\nx\r\n");
    assert!(
        g.wait_for_log("suspended by the rate-limited action", WAIT),
        "{}",
        g.log_text()
    );
    let connections = receiver.connections.load(std::sync::atomic::Ordering::Acquire);
    common::send_message(
        g.mx(),
        "s@back.test",
        &["other@slow.test"],
        "Subject: next\r\n\r\nx\r\n",
    );
    // Mail to another domain on the same receiver still flows.
    common::send_message(g.mx(), "s@back.test", &["ok@capture.test"], "Subject: ok\r\n\r\nx\r\n");
    let got = receiver.wait_for(1, WAIT);
    assert_eq!(got[0].recipients, ["ok@capture.test"]);
    let (status, list) = g.http("GET", "/api/queue", None, &[]);
    assert_eq!(status, 200, "{list}");
    let listed: serde_json::Value = serde_json::from_str(&list).unwrap();
    let messages = listed["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{list}");
    for m in messages {
        assert_eq!(m["state"], "suspended", "{list}");
        assert_eq!(m["attempts"], 0, "no backoff step: {list}");
    }
    assert_eq!(g.metric("gannet_bounce_actions_total{action=\"suspend\"}"), 1.0);
    // The API lists it apart from the operator's suspensions.
    let (status, destinations) = g.http("GET", "/api/destinations", None, &[]);
    assert_eq!(status, 200, "{destinations}");
    let destinations: serde_json::Value = serde_json::from_str(&destinations).unwrap();
    assert_eq!(destinations["automatic"][0]["domain"], "slow.test", "{destinations}");
    assert_eq!(
        destinations["suspended"].as_array().map(Vec::len),
        Some(0),
        "{destinations}"
    );
    assert!(
        receiver.connections.load(std::sync::atomic::Ordering::Acquire) <= connections + 1,
        "slow.test's second message opened no connection of its own"
    );
}

fn check_config(path: &std::path::Path) -> std::process::Output {
    std::process::Command::new(common::BIN)
        .arg("check-config")
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn a_broken_rules_file_or_action_is_refused_naming_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("bounce-rules.toml");
    std::fs::write(
        &rules,
        "# mine\n[[rule]]\nclass = \"rate-limited\"\ntext = \"(unclosed\"\n",
    )
    .unwrap();
    let config = dir.path().join("gannet.toml");
    std::fs::write(
        &config,
        format!("[bounces]\nrules_file = {:?}\n", rules.display().to_string()),
    )
    .unwrap();
    let out = check_config(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("{}:2", rules.display())), "{stderr}");
    assert!(stderr.contains("not a regular expression"), "{stderr}");
    // A file whose examples hold is taken, and its rules come first.
    std::fs::write(
        &rules,
        "[[rule]]\nclass = \"rate-limited\"\ntext = \"slow down please\"\nexample = \"451 4.7.1 slow down please\"\n",
    )
    .unwrap();
    let out = check_config(&config);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&config, "[bounces.actions]\nmailbox-full = \"drop\"\n").unwrap();
    let out = check_config(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("gannet.toml:2: bounces.actions.mailbox-full: unknown action"),
        "{stderr}"
    );
}

#[test]
fn a_reply_rule_pauses_the_destination_on_every_shard_for_its_time_and_then_it_resumes() {
    let receiver = CaptureSink::start();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("bounce-rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nclass = \"rate-limited\"\ntext = \"\\\\[TSS04\\\\]\"\naction = \"suspend\"\nsuspend_for = \"10s\"\n",
    )
    .unwrap();
    // Yahoo's published deferral for too much volume, at RCPT.
    *receiver.behaviour.rcpt_replies.lock().unwrap() = vec![(
        "@yahoo.test".into(),
        "451 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes".into(),
    )];
    let mut setup = Setup::new();
    setup
        .shards(2)
        .route("yahoo.test", receiver.addr)
        .route("other.test", receiver.addr)
        .set("delivery", "retry_first", "\"1h\"")
        .set("bounces", "rules_file", &format!("{:?}", rules.display().to_string()));
    let g = Gannet::start(&setup);
    common::send_message(g.mx(), "s@other.test", &["a@yahoo.test"], "Subject: y\r\n\r\nx\r\n");
    assert!(
        g.wait_for_log("suspended by the rate-limited action for 10s", WAIT),
        "{}",
        g.log_text()
    );
    // The other shard suspends it too.
    assert!(
        g.wait_for_log("suspended as another shard asked", WAIT),
        "{}",
        g.log_text()
    );
    let (_, destinations) = g.http("GET", "/api/destinations", None, &[]);
    let destinations: serde_json::Value = serde_json::from_str(&destinations).unwrap();
    assert_eq!(
        destinations["automatic"].as_array().map(Vec::len),
        Some(2),
        "one per shard: {destinations}"
    );
    // The receiver takes mail again; more for yahoo.test waits whichever shard took it, and
    // other destinations never stopped.
    receiver.behaviour.rcpt_replies.lock().unwrap().clear();
    for n in 0..4 {
        common::send_message(
            g.mx(),
            "s@other.test",
            &[&format!("{n}@yahoo.test")],
            "Subject: y\r\n\r\nx\r\n",
        );
    }
    common::send_message(g.mx(), "s@other.test", &["b@other.test"], "Subject: o\r\n\r\nx\r\n");
    let first = receiver.wait_for(1, WAIT);
    assert_eq!(first[0].recipients, ["b@other.test"]);
    assert_eq!(receiver.captured().len(), 1, "nothing went to the suspended domain");
    // After the rule's 10 s, not the hour of the message's own retry schedule, all go.
    let all = receiver.wait_for(6, WAIT);
    let mut yahoo: Vec<&str> = all[1..].iter().map(|c| c.recipients[0].as_str()).collect();
    yahoo.sort();
    assert_eq!(
        yahoo,
        [
            "0@yahoo.test",
            "1@yahoo.test",
            "2@yahoo.test",
            "3@yahoo.test",
            "a@yahoo.test"
        ]
    );
    assert!(g.wait_for_log("a suspension expired", WAIT), "{}", g.log_text());
}

#[test]
fn sighup_rereads_the_rules_file_and_a_broken_one_keeps_the_rules_in_force() {
    let receiver = CaptureSink::start();
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("bounce-rules.toml");
    std::fs::write(&rules, "# nothing of ours yet\n").unwrap();
    *receiver.behaviour.rcpt_replies.lock().unwrap() = vec![(
        "@slow.test".into(),
        "451 4.7.1 Slow down please, you send too fast".into(),
    )];
    let mut setup = Setup::new();
    setup
        .route("slow.test", receiver.addr)
        .set("delivery", "retry_first", "\"1h\"")
        .set("bounces", "rules_file", &format!("{:?}", rules.display().to_string()));
    let g = Gannet::start(&setup);
    let deferred = |class: &str| {
        g.metric(&format!(
            "gannet_bounces_total{{class=\"{class}\",result=\"deferred\"}}"
        ))
    };
    let send_and_wait = |n: usize| {
        common::send_message(g.mx(), "s@slow.test", &["a@slow.test"], "Subject: s\r\n\r\nx\r\n");
        assert!(g.wait_for_log_count("deferred: 451 4.7.1", n, WAIT), "{}", g.log_text());
    };
    send_and_wait(1);
    assert_eq!(deferred("policy-block"), 1.0, "x.7.1 alone");
    let reloaded = |n: usize| {
        g.signal(libc::SIGHUP);
        assert!(
            g.wait_for_log_count("reload: configuration", n, WAIT),
            "{}",
            g.log_text()
        );
    };
    std::fs::write(
        &rules,
        "[[rule]]\nclass = \"rate-limited\"\ntext = \"slow down please\"\nexample = \"451 4.7.1 Slow down please\"\n",
    )
    .unwrap();
    reloaded(1);
    send_and_wait(2);
    assert_eq!(deferred("rate-limited"), 1.0, "the new rule is in force");
    std::fs::write(&rules, "[[rule]]\nclass = \"rate-limited\"\ntext = \"(broken\"\n").unwrap();
    reloaded(2);
    assert!(
        g.log_text().contains("reload: configuration unchanged"),
        "{}",
        g.log_text()
    );
    send_and_wait(3);
    assert_eq!(deferred("rate-limited"), 2.0, "the last good rules stay");
}
