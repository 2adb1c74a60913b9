//! Delivery end to end: the real binary relays to a capture sink of the tests' own and to
//! Postfix's smtp-sink.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::sink::CaptureSink;
use common::{python, smtp_sink, tool, without_received, Gannet, Raw, Setup};

const WAIT: Duration = Duration::from_secs(60);

fn send(g: &Gannet, from: &str, to: &[&str], content: &str) -> String {
    common::send_message(g.mx(), from, to, content)
}

/// Stops the server cleanly and returns what the spool still holds.
fn stop_and_list(mut g: Gannet) -> Vec<String> {
    assert_eq!(g.stop().code(), Some(0), "{}", g.log_text());
    g.queued_ids()
}

const SMTPLIB_DOTS: &str = r#"
import smtplib, sys
port = int(sys.argv[1])
body = b"Subject: dots\r\n\r\n.\r\n..two\r\n.x\r\ncaf\xc3\xa9\r\nend\r\n"
s = smtplib.SMTP("127.0.0.1", port)
s.sendmail("from@dots.test", ["to@remote.test"], body, mail_options=["BODY=8BITMIME"])
s.quit()
"#;

#[test]
fn relays_bytes_exactly_with_dot_stuffing_both_ways() {
    let sink = CaptureSink::start();
    let mut setup = Setup::new();
    setup.route("*", sink.addr);
    let g = Gannet::start(&setup);
    python(SMTPLIB_DOTS, &[&g.mx().port().to_string()]);
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].from, "from@dots.test");
    assert_eq!(got[0].recipients, vec!["to@remote.test".to_string()]);
    assert_eq!(
        without_received(&got[0].content),
        b"Subject: dots\r\n\r\n.\r\n..two\r\n.x\r\ncaf\xc3\xa9\r\nend\r\n"
    );
    assert!(String::from_utf8_lossy(&got[0].content).starts_with("Received: from "));
    assert!(g.wait_for_log("delivered: 250 2.0.0 captured", WAIT));
    assert!(stop_and_list(g).is_empty(), "a delivered message leaves the queue");
}

#[test]
fn chunking_receivers_get_bdat_with_the_exact_bytes() {
    let sink = CaptureSink::start();
    sink.behaviour.chunking.store(true, Ordering::Release);
    let mut setup = Setup::new();
    setup.route("*", sink.addr);
    let g = Gannet::start(&setup);
    python(SMTPLIB_DOTS, &[&g.mx().port().to_string()]);
    let got = sink.wait_for(1, WAIT);
    assert!(got[0].via_bdat, "CHUNKING was offered, so BDAT is used");
    assert_eq!(
        without_received(&got[0].content),
        b"Subject: dots\r\n\r\n.\r\n..two\r\n.x\r\ncaf\xc3\xa9\r\nend\r\n"
    );
    assert!(g.wait_for_log("delivered: 250 2.0.0 captured", WAIT));
    assert!(stop_and_list(g).is_empty());
}

#[test]
fn gannet_relays_to_gannet_byte_for_byte() {
    // The receiver is a second Gannet (CHUNKING, PIPELINING); it keeps what it gets queued.
    let receiver = Gannet::start(&Setup::new());
    let mut setup = Setup::new();
    setup.route("*", receiver.mx());
    let sender = Gannet::start(&setup);
    python(SMTPLIB_DOTS, &[&sender.mx().port().to_string()]);
    assert!(
        sender.wait_for_log("delivered: 250 2.0.0 Ok: queued as", WAIT),
        "{}",
        sender.log_text()
    );
    let ids = receiver.queued_ids();
    assert_eq!(ids.len(), 1);
    let stored = receiver.stored(&ids[0]);
    // The receiver's Received header, then the sender's, then the client's bytes.
    assert_eq!(
        without_received(without_received(&stored)),
        b"Subject: dots\r\n\r\n.\r\n..two\r\n.x\r\ncaf\xc3\xa9\r\nend\r\n"
    );
    assert!(stop_and_list(sender).is_empty());
}

#[test]
fn a_pooled_connection_closed_by_the_server_does_not_delay_the_next_message() {
    let sink = CaptureSink::start();
    sink.behaviour.close_after_message.store(true, Ordering::Release);
    let mut setup = Setup::new();
    setup.route("*", sink.addr);
    // A deferral would wait an hour: the test would time out.
    setup.set("delivery", "retry_first", "\"1h\"");
    setup.set("delivery", "retry_max", "\"1h\"");
    let g = Gannet::start(&setup);
    send(&g, "a@x.test", &["b@remote.test"], "Subject: one\r\n\r\nx\r\n");
    sink.wait_for(1, WAIT);
    assert!(g.wait_for_log_count("delivered: ", 1, WAIT));
    send(&g, "a@x.test", &["b@remote.test"], "Subject: two\r\n\r\nx\r\n");
    sink.wait_for(2, WAIT);
    assert!(g.wait_for_log_count("delivered: ", 2, WAIT));
    assert!(!g.log_text().contains("deferred"), "{}", g.log_text());
    assert!(stop_and_list(g).is_empty());
}

#[test]
fn mail_without_a_route_expires_and_is_bounced() {
    let sink = CaptureSink::start();
    let mut setup = Setup::new();
    setup.route("routed.test", sink.addr);
    setup.set("delivery", "retry_first", "\"1s\"");
    setup.set("delivery", "queue_lifetime", "\"1s\"");
    let g = Gannet::start(&setup);
    send(
        &g,
        "sender@routed.test",
        &["someone@unrouted.test"],
        "Subject: lost\r\n\r\nx\r\n",
    );
    assert!(g.wait_for_log("deferred: 451 4.4.0 no route", WAIT), "{}", g.log_text());
    // After the lifetime the next attempt gives up and the sender (routed) gets the bounce.
    let got = sink.wait_for(1, WAIT);
    assert!(got[0].from.is_empty());
    assert_eq!(got[0].recipients, vec!["sender@routed.test".to_string()]);
    let text = String::from_utf8_lossy(&got[0].content).to_string();
    assert!(
        text.contains("Final-Recipient: rfc822; someone@unrouted.test"),
        "{text}"
    );
    assert!(text.contains("Status: 4.4.0") || text.contains("no route"), "{text}");
    assert!(g.wait_for_log("delivered: ", WAIT));
    assert!(stop_and_list(g).is_empty());
}

#[test]
fn a_long_deferral_sends_one_delay_notice() {
    let (deferring, sender_side) = (CaptureSink::start(), CaptureSink::start());
    deferring.behaviour.defer_data.store(usize::MAX, Ordering::Release);
    let mut setup = Setup::new();
    setup
        .route("remote.test", deferring.addr)
        .route("sender.test", sender_side.addr);
    setup.set("delivery", "retry_first", "\"1s\"");
    setup.set("delivery", "retry_max", "\"1s\"");
    setup.set("delivery", "delay_warning_after", "\"1s\"");
    let g = Gannet::start(&setup);
    send(
        &g,
        "me@sender.test",
        &["slow@remote.test"],
        "Subject: patience\r\n\r\nx\r\n",
    );
    let got = sender_side.wait_for(1, WAIT);
    assert!(got[0].from.is_empty());
    let text = String::from_utf8_lossy(&got[0].content).to_string();
    assert!(text.contains("Subject: Delayed Mail (still being retried)"), "{text}");
    assert!(text.contains("Action: delayed\r\nStatus: 4.3.0\r\n"), "{text}");
    // More attempts, still one notice.
    assert!(g.wait_for_log_count("deferred: 451 4.3.0", 3, WAIT));
    assert_eq!(sender_side.captured().len(), 1);
    assert_eq!(g.queued_ids().len(), 1, "the message itself is still queued");
}

#[test]
fn destination_rules_cap_connections_and_rate() {
    let sink = CaptureSink::start();
    let mut setup = Setup::new();
    setup.route("*", sink.addr);
    setup.raw(&format!(
        "[[destination]]\nmatch = \"{}\"\nconnections_max = 1\nmessages_per_second = 4\n",
        sink.addr
    ));
    let g = Gannet::start(&setup);
    let t0 = std::time::Instant::now();
    let out = Command::new(tool("smtp-source"))
        .args([
            "-s",
            "4",
            "-m",
            "6",
            "-l",
            "300",
            "-f",
            "a@rate.test",
            "-t",
            "b@remote.test",
        ])
        .arg(g.mx().to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    sink.wait_for(6, WAIT);
    // Six messages at four a second: the last starts at least 5 x 250 ms after the first. A
    // lower bound only: the rate is the behaviour under test, not a speed.
    assert!(t0.elapsed() >= Duration::from_millis(1200), "{:?}", t0.elapsed());
    assert_eq!(sink.connections.load(Ordering::Acquire), 1);
    assert!(g.wait_for_log_count("delivered: ", 6, WAIT));
    assert!(stop_and_list(g).is_empty());
}

#[test]
fn the_shard_wide_connection_cap_holds_across_destinations() {
    let one = CaptureSink::start();
    let two = CaptureSink::start_sharing_gauge(&one);
    let mut setup = Setup::new();
    setup.route("one.test", one.addr).route("two.test", two.addr);
    setup.set("delivery", "connections_per_shard_max", "1");
    // Idle connections are not delivering ones: close them after each message so that the
    // gauge sees only delivering connections.
    setup.set("delivery", "messages_per_connection_max", "1");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    for i in 0..20 {
        let domain = if i % 2 == 0 { "one.test" } else { "two.test" };
        assert!(c.cmd("MAIL FROM:<a@cap.test>").starts_with("250"));
        assert!(c.cmd(&format!("RCPT TO:<b{i}@{domain}>")).starts_with("250"));
        c.cmd("DATA");
        assert!(c.cmd("x\r\n.").starts_with("250"));
    }
    one.wait_for(10, WAIT);
    two.wait_for(10, WAIT);
    assert!(g.wait_for_log_count("delivered: ", 20, WAIT));
    // One delivering connection at a time over both destinations (a closing one may overlap
    // the next by a moment at the sink).
    let most = one.active_max.load(Ordering::Acquire);
    assert!(most <= 2, "{most} connections open at once");
    assert!(stop_and_list(g).is_empty());
}

#[test]
fn a_deferral_is_retried_and_delivered_once() {
    let sink = CaptureSink::start();
    sink.behaviour.defer_data.store(1, Ordering::Release);
    let mut setup = Setup::new();
    setup.route("*", sink.addr);
    setup.set("delivery", "retry_first", "\"1s\"");
    let g = Gannet::start(&setup);
    send(&g, "a@retry.test", &["b@remote.test"], "Subject: retry\r\n\r\nbody\r\n");
    assert!(
        g.wait_for_log("deferred: 451 4.3.0 try again later", WAIT),
        "{}",
        g.log_text()
    );
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got.len(), 1);
    // The first attempt sent the copy kept from the commit; the retry read it back from disk.
    assert_eq!(without_received(&got[0].content), b"Subject: retry\r\n\r\nbody\r\n");
    assert!(g.wait_for_log("delivered: ", WAIT));
    assert!(stop_and_list(g).is_empty());
    assert_eq!(sink.captured().len(), 1, "delivered exactly once");
}

#[test]
fn a_refused_recipient_is_bounced_to_the_sender_and_the_others_are_delivered() {
    let sink = CaptureSink::start();
    *sink.behaviour.reject_rcpt.lock().unwrap() = Some("nobody".into());
    let mut setup = Setup::new();
    setup.route("*", sink.addr);
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    c.cmd("MAIL FROM:<sender@x.test> RET=HDRS ENVID=ENV-7");
    c.cmd("RCPT TO:<nobody@remote.test> ORCPT=rfc822;nobody@remote.test");
    c.cmd("RCPT TO:<someone@remote.test>");
    c.cmd("DATA");
    let id = common::queued_id(&c.cmd("Subject: to bounce\r\n\r\nsecret body\r\n.")).unwrap();
    // The original (to the recipient that exists) and the bounce (to the sender) both arrive.
    let got = sink.wait_for(2, WAIT);
    let original = got.iter().find(|c| c.from == "sender@x.test").expect("the original");
    assert_eq!(original.recipients, vec!["someone@remote.test".to_string()]);
    let bounce = got.iter().find(|c| c.from.is_empty()).expect("a bounce from <>");
    assert_eq!(bounce.recipients, vec!["sender@x.test".to_string()]);
    let text = String::from_utf8_lossy(&bounce.content).to_string();
    for needle in [
        "Subject: Undelivered Mail Returned to Sender\r\n",
        "Content-Type: multipart/report; report-type=delivery-status;",
        "Original-Envelope-Id: ENV-7\r\n",
        "Final-Recipient: rfc822; nobody@remote.test\r\n",
        "Original-Recipient: rfc822;nobody@remote.test\r\n",
        "Action: failed\r\n",
        "Status: 5.1.1\r\n",
        "Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n",
        "Content-Type: text/rfc822-headers",
        "Subject: to bounce\r\n",
        &format!("Message-ID: <{id}.failed@mx.test>"),
    ] {
        assert!(text.contains(needle), "{needle:?} missing from the bounce:\n{text}");
    }
    assert!(!text.contains("secret body"), "RET=HDRS returns the headers only");
    assert!(g.wait_for_log("failed notice queued", WAIT));
    assert!(stop_and_list(g).is_empty());
}

#[test]
fn the_null_sender_and_notify_never_are_not_bounced() {
    let sink = CaptureSink::start();
    *sink.behaviour.reject_rcpt.lock().unwrap() = Some("nobody".into());
    let mut setup = Setup::new();
    setup.route("*", sink.addr);
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    for (from, params) in [("", ""), ("sender@x.test", " NOTIFY=NEVER")] {
        c.cmd(&format!("MAIL FROM:<{from}>"));
        c.cmd(&format!("RCPT TO:<nobody@remote.test>{params}"));
        c.cmd("DATA");
        assert!(c.cmd("Subject: x\r\n\r\nx\r\n.").starts_with("250"));
    }
    assert!(g.wait_for_log_count("failed for good", 2, WAIT));
    assert!(!g.log_text().contains("notice queued"), "{}", g.log_text());
    // A clean stop writes the state; nothing may be left, and no bounce was ever queued.
    assert!(stop_and_list(g).is_empty());
    assert!(sink.captured().is_empty(), "{:?}", sink.captured());
}

#[test]
fn many_messages_share_few_connections() {
    let sink = CaptureSink::start();
    let mut setup = Setup::new();
    setup.shards(2).route("*", sink.addr);
    setup.set("delivery", "connections_per_destination_max", "2");
    let g = Gannet::start(&setup);
    let out = Command::new(tool("smtp-source"))
        .args([
            "-s",
            "10",
            "-m",
            "300",
            "-l",
            "500",
            "-f",
            "a@reuse.test",
            "-t",
            "b@remote.test",
        ])
        .arg(g.mx().to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    sink.wait_for(300, WAIT);
    let connections = sink.connections.load(Ordering::Acquire);
    assert!(
        connections <= 2,
        "300 messages over {connections} connections (at most 2 in all, split 1 per shard)"
    );
    assert!(stop_and_list(g).is_empty());
}

#[test]
fn routes_send_each_domain_to_its_smarthost() {
    let (one, other) = (CaptureSink::start(), CaptureSink::start());
    let mut setup = Setup::new();
    setup.route("one.test", one.addr).route("*", other.addr);
    let g = Gannet::start(&setup);
    send(
        &g,
        "a@x.test",
        &["r1@one.test", "r2@two.test", "r3@ONE.test"],
        "split\r\n",
    );
    let a = one.wait_for(1, WAIT);
    let b = other.wait_for(1, WAIT);
    assert_eq!(
        a[0].recipients,
        vec!["r1@one.test".to_string(), "r3@ONE.test".to_string()]
    );
    assert_eq!(b[0].recipients, vec!["r2@two.test".to_string()]);
    assert!(stop_and_list(g).is_empty());
}

#[test]
fn postfix_smtp_sink_receives_every_message() {
    let port = common::free_port();
    let mut sink = smtp_sink(port, &["-c"]);
    let mut setup = Setup::new();
    setup.shards(2).route("*", format!("127.0.0.1:{port}").parse().unwrap());
    let g = Gannet::start(&setup);
    let out = Command::new(tool("smtp-source"))
        .args([
            "-s",
            "20",
            "-m",
            "1000",
            "-l",
            "2000",
            "-f",
            "a@sink.test",
            "-t",
            "b@remote.test",
        ])
        .arg(g.mx().to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(g.wait_for_log_count("delivered: ", 1000, WAIT), "{}", g.log_text());
    assert!(stop_and_list(g).is_empty());
    let _ = sink.kill();
    let mut counter = String::new();
    sink.stdout.take().unwrap().read_to_string(&mut counter).unwrap();
    let _ = sink.wait();
    let last = counter.rsplit("mesg=").next().unwrap();
    let count: usize = last.trim_matches(|c: char| !c.is_ascii_digit()).parse().unwrap();
    assert_eq!(count, 1000, "smtp-sink counted {count} messages");
}

#[test]
fn mail_queued_while_the_receiver_is_down_is_delivered_after_a_crash_and_restart() {
    let sink_port = common::free_port();
    let mut setup = Setup::new();
    setup
        .shards(2)
        .route("*", format!("127.0.0.1:{sink_port}").parse().unwrap());
    // The retry schedule survives the restart: keep it short so the test need not wait.
    setup.set("delivery", "retry_first", "\"2s\"");
    setup.set("delivery", "retry_max", "\"2s\"");
    // Every message defers on its own here (the deferrals are what survives the crash): never
    // mark the destination down (tests below cover that).
    setup.set("delivery", "down_after_failures", "0");
    let mut g = Gannet::start(&setup);
    let mut subjects = Vec::new();
    for i in 0..20 {
        let subject = format!("queued-{i}");
        send(
            &g,
            "a@x.test",
            &["b@remote.test"],
            &format!("Subject: {subject}\r\n\r\nbody\r\n"),
        );
        subjects.push(subject);
    }
    // Every message has met the closed port once (one "cannot deliver" per destination attempt).
    assert!(
        g.wait_for_log_count("deferred: 421 connect to", 20, WAIT),
        "{}",
        g.log_text()
    );
    g.kill();
    let sink = CaptureSink::start_on(format!("127.0.0.1:{sink_port}").parse().unwrap());
    let g = g.restart();
    let got = sink.wait_for(20, WAIT);
    let mut received: Vec<String> = got
        .iter()
        .map(|c| {
            let text = String::from_utf8_lossy(&c.content).to_string();
            text.split("Subject: ")
                .nth(1)
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    received.sort();
    subjects.sort();
    assert_eq!(received, subjects);
    assert!(stop_and_list(g).is_empty());
}

/// Connection attempts to `port` in the log (each failed one says "connect to ...: why").
fn connect_attempts(g: &Gannet, port: u16) -> usize {
    g.log_text().matches(&format!("connect to 127.0.0.1:{port}: ")).count()
}

#[test]
fn a_destination_that_refuses_connections_is_marked_down_and_probed_instead_of_tried_per_message() {
    let sink_port = common::free_port();
    let mut setup = Setup::new();
    setup.route("*", format!("127.0.0.1:{sink_port}").parse().unwrap());
    setup.set("delivery", "probe_interval", "\"1s\"");
    setup.set("delivery", "probe_interval_max", "\"2s\"");
    // The few messages deferred before the destination was down wait for their retry like any
    // deferral: keep it short.
    setup.set("delivery", "retry_first", "\"1s\"");
    setup.set("delivery", "retry_max", "\"2s\"");
    let g = Gannet::start(&setup);
    // 200 messages from Postfix's smtp-source while nothing listens at the next hop.
    let out = std::process::Command::new(common::tool("smtp-source"))
        .args(["-s", "5", "-m", "200", "-f", "a@x.test", "-t", "b@remote.test"])
        .arg(g.mx().to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(g.wait_for_log_count("queued shard=", 200, WAIT), "{}", g.log_text());
    assert!(
        g.wait_for_log("destination down after 3 connection failures in a row", WAIT),
        "{}",
        g.log_text()
    );
    assert!(g.wait_for_log("probe failed", WAIT), "{}", g.log_text());
    // A few attempts and the probes, not one (or more) per message as before.
    let attempts = connect_attempts(&g, sink_port);
    eprintln!("{attempts} connection attempts for 200 messages while the next hop was down");
    assert!(
        (4..30).contains(&attempts),
        "{attempts} connection attempts:\n{}",
        g.log_text()
    );
    let (status, body) = g.http("GET", "/api/destinations", None, &[]);
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    let down = listed["down"].as_array().unwrap();
    assert_eq!(down.len(), 1, "one entry (per shard; the test runs one): {body}");
    let waiting: u64 = down.iter().map(|d| d["waiting"].as_u64().unwrap()).sum();
    assert!(waiting >= 190, "most of the mail waits for the probe: {body}");
    assert_eq!(down[0]["destination"], format!("127.0.0.1:{sink_port}"));
    let (_, metrics) = g.http("GET", "/metrics", None, &[]);
    assert!(metrics.contains("gannet_destinations_down 1"), "{metrics}");
    assert!(
        metrics.contains("gannet_destination_health_total{event=\"down\"} 1"),
        "{metrics}"
    );
    // The next hop comes up: the next probe finds it and everything goes, each message once.
    let sink = CaptureSink::start_on(format!("127.0.0.1:{sink_port}").parse().unwrap());
    let got = sink.wait_for(200, WAIT);
    assert_eq!(got.len(), 200);
    assert!(g.wait_for_log("destination up again after", WAIT), "{}", g.log_text());
    let (_, metrics) = g.http("GET", "/metrics", None, &[]);
    assert!(metrics.contains("gannet_destinations_down 0"), "{metrics}");
    assert!(stop_and_list(g).is_empty());
}

#[test]
fn spool_disk_use_returns_to_near_zero_after_a_batch() {
    let sink = CaptureSink::start();
    let mut setup = Setup::new();
    setup.route("*", sink.addr);
    setup.set("spool", "segment_size", "\"1MiB\"");
    setup.set("limits", "message_size_max", "\"64KiB\"");
    setup.set("limits", "recipients_max", "10");
    let g = Gannet::start(&setup);
    let out = Command::new(tool("smtp-source"))
        .args([
            "-s",
            "5",
            "-m",
            "400",
            "-l",
            "20000",
            "-f",
            "a@gc.test",
            "-t",
            "b@remote.test",
        ])
        .arg(g.mx().to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    sink.wait_for(400, WAIT);
    // 400 records of 24 KiB filled ~10 segments of 1 MiB; once delivered they are deleted.
    assert!(g.wait_for_log("drained segment(s)", WAIT), "{}", g.log_text());
    let dir = gannet::spool::shard_dir(&g.spool_dir, 0);
    let mut collections = 1;
    loop {
        // Active segment, perhaps a spare, perhaps one whose last state write is still in flight.
        let segments = std::fs::read_dir(&dir).unwrap().count();
        if segments <= 3 {
            break;
        }
        collections += 1;
        assert!(
            g.wait_for_log_count("drained segment(s)", collections, WAIT),
            "{segments} segments left after the batch was delivered: {:?}\n{}",
            std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>(),
            g.log_text()
        );
    }
    assert!(stop_and_list(g).is_empty());
}

#[test]
fn an_8bitmime_message_to_a_server_without_8bitmime_is_returned_to_its_sender() {
    // Postfix's smtp-sink with -8 does not announce 8BITMIME.
    let port = common::free_port();
    let mut seven_bit = smtp_sink(port, &["-8"]);
    let sender_side = CaptureSink::start();
    let mut setup = Setup::new();
    setup
        .route("remote.test", format!("127.0.0.1:{port}").parse().unwrap())
        .route("sender.test", sender_side.addr);
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    assert!(c.cmd("MAIL FROM:<me@sender.test> BODY=8BITMIME").starts_with("250"));
    assert!(c.cmd("RCPT TO:<you@remote.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    assert!(c
        .cmd("Subject: caf\u{e9}\r\n\r\nd\u{e9}j\u{e0} vu\r\n.")
        .starts_with("250"));
    let bounce = &sender_side.wait_for(1, WAIT)[0];
    assert!(bounce.from.is_empty());
    let text = String::from_utf8_lossy(&bounce.content).to_string();
    assert!(text.contains("Status: 5.6.3"), "{text}");
    assert!(text.contains("does not offer 8BITMIME"), "{text}");
    assert!(stop_and_list(g).is_empty());
    let _ = seven_bit.kill();
    let _ = seven_bit.wait();
}

fn segment_files(g: &Gannet) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(g.spool_dir.join("shard-0"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    names.sort();
    names
}

#[test]
fn a_long_deferred_message_is_copied_forward_and_its_old_segment_deleted() {
    let (stuck, ok) = (CaptureSink::start(), CaptureSink::start());
    stuck.behaviour.defer_data.store(usize::MAX, Ordering::Release);
    let mut setup = Setup::new();
    setup.route("stuck.test", stuck.addr).route("ok.test", ok.addr);
    setup.set("spool", "segment_size", "\"1MiB\"");
    setup.set("spool", "copy_forward_segments", "3");
    setup.set("limits", "message_size_max", "\"256KiB\"");
    setup.set("limits", "recipients_max", "100");
    setup.set("delivery", "retry_first", "\"1s\"");
    setup.set("delivery", "retry_max", "\"2s\"");
    let g = Gannet::start(&setup);
    let stuck_content = "Subject: stuck\r\n\r\nwaits for a long time\r\n";
    let original = send(&g, "a@sender.test", &["who@stuck.test"], stuck_content);
    assert!(g.wait_for_log("deferred: ", WAIT), "{}", g.log_text());
    let first_segment = segment_files(&g)[0].clone();
    // Fill several segments with mail that is delivered at once.
    let body = format!("Subject: filler\r\n\r\n{}\r\n", "x".repeat(150 * 1024));
    for _ in 0..24 {
        send(&g, "a@sender.test", &["who@ok.test"], &body);
    }
    ok.wait_for(24, WAIT);
    assert!(
        g.wait_for_log("copied forward out of segment", WAIT),
        "{}",
        g.log_text()
    );
    let deadline = std::time::Instant::now() + WAIT;
    while segment_files(&g).contains(&first_segment) {
        assert!(
            std::time::Instant::now() < deadline,
            "the old segment was never deleted: {:?}",
            segment_files(&g)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let queued = g.queued_ids();
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_ne!(queued[0], original, "the message has a new id");

    // A crash now: the copy (and only the copy) comes back.
    let g = g.restart();
    assert_eq!(g.queued_ids(), queued);
    // The receiver recovers: the message is delivered once, byte for byte.
    stuck.behaviour.defer_data.store(0, Ordering::Release);
    let got = stuck.wait_for(1, WAIT);
    assert_eq!(without_received(&got[0].content), stuck_content.as_bytes());
    assert!(stop_and_list(g).is_empty());
    assert_eq!(stuck.captured().len(), 1);
}

#[test]
fn a_restart_keeps_the_retry_schedule_of_deferred_mail() {
    let deferring = CaptureSink::start();
    deferring.behaviour.defer_data.store(usize::MAX, Ordering::Release);
    let mut setup = Setup::new();
    setup.route("remote.test", deferring.addr);
    setup.set("delivery", "retry_first", "\"1h\"");
    let mut g = Gannet::start(&setup);
    send(&g, "a@sender.test", &["b@remote.test"], "Subject: later\r\n\r\nx\r\n");
    assert!(g.wait_for_log("deferred: ", WAIT), "{}", g.log_text());
    assert_eq!(g.stop().code(), Some(0), "{}", g.log_text());
    let listing = String::from_utf8(g.command(&["queue", "list"]).stdout).unwrap();
    assert!(listing.contains("  attempts 1  next "), "{listing}");

    let g = Gannet::start_in(&setup, g.dir.clone());
    assert!(
        g.wait_for_log("1 recovered message(s) wait for their next attempt", WAIT),
        "retried at once instead: {}",
        g.log_text()
    );
}

#[test]
fn queue_flush_retries_deferred_mail_at_once() {
    let deferring = CaptureSink::start();
    deferring.behaviour.defer_data.store(1, Ordering::Release);
    let mut setup = Setup::new();
    setup.route("remote.test", deferring.addr);
    setup.set("delivery", "retry_first", "\"1h\"");
    let g = Gannet::start(&setup);
    send(&g, "a@sender.test", &["b@remote.test"], "Subject: flush\r\n\r\nx\r\n");
    assert!(g.wait_for_log("deferred: ", WAIT), "{}", g.log_text());
    // The receiver accepts from now on; without the flush the retry would be an hour away.
    let out = g.command(&["queue", "flush"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(deferring.wait_for(1, WAIT).len(), 1);
    assert!(g.wait_for_log("queue flush: 1 deferred message(s) retried now", WAIT));
    assert!(stop_and_list(g).is_empty());

    // With no server running, flush says so.
    let mut g = Gannet::start(&Setup::new());
    assert_eq!(g.stop().code(), Some(0));
    let out = g.command(&["queue", "flush"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no gannet process runs on spool"));
}

/// A receiver that offers PIPELINING (no CHUNKING), greets only once told to on stdin, and after
/// each message's final dot waits a moment before its 250 to see whether the next MAIL is
/// already on its way: prints `message N ahead=True|False`, then `done`.
const AHEAD_RECEIVER: &str = r#"
import select, socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(8)
print("ready", flush=True)
sys.stdin.readline()
conn, _ = srv.accept()
buf = b""
def more(timeout):
    global buf
    r, _, _ = select.select([conn], [], [], timeout)
    if r:
        chunk = conn.recv(65536)
        if not chunk: raise SystemExit
        buf += chunk
        return True
    return False
def line():
    global buf
    while b"\r\n" not in buf: more(30)
    l, buf = buf.split(b"\r\n", 1)
    return l
conn.sendall(b"220 ahead-receiver ESMTP\r\n")
n = 0
while True:
    l = line().upper()
    if l.startswith(b"EHLO"): conn.sendall(b"250-ahead\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    elif l.startswith(b"MAIL") or l.startswith(b"RCPT") or l == b"RSET": conn.sendall(b"250 ok\r\n")
    elif l == b"DATA":
        conn.sendall(b"354 go\r\n")
        while b"\r\n.\r\n" not in buf: more(30)
        buf = buf.split(b"\r\n.\r\n", 1)[1]
        while b"MAIL FROM" not in buf.upper() and more(2): pass
        n += 1
        print("message", n, "ahead=%s" % (b"MAIL FROM" in buf.upper()), flush=True)
        conn.sendall(b"250 accepted\r\n")
    elif l == b"QUIT":
        conn.sendall(b"221 bye\r\n"); break
    else: conn.sendall(b"500 what\r\n")
print("done", flush=True)
"#;

#[test]
fn the_next_envelope_goes_out_right_behind_the_previous_message() {
    use std::io::{BufRead, BufReader, Write};
    let port = common::free_port();
    let mut receiver = Command::new("python3")
        .arg("-c")
        .arg(AHEAD_RECEIVER)
        .arg(port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(receiver.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut setup = Setup::new();
    setup.route("*", addr);
    // One connection, so both messages queue behind it.
    setup.raw(&format!("[[destination]]\nmatch = \"{addr}\"\nconnections_max = 1\n"));
    let g = Gannet::start(&setup);
    send(&g, "a@x.test", &["one@remote.test"], "Subject: one\r\n\r\n1\r\n");
    send(&g, "a@x.test", &["two@remote.test"], "Subject: two\r\n\r\n2\r\n");
    receiver.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "message 1 ahead=True");
    assert_eq!(lines.next().unwrap().unwrap(), "message 2 ahead=False");
    assert!(g.wait_for_log_count("delivered: ", 2, WAIT), "{}", g.log_text());
    assert!(stop_and_list(g).is_empty());
    let _ = receiver.kill();
    let _ = receiver.wait();
}
