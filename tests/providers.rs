//! Providers against the real binary, with DNS from a server of the tests' own: forty domains
//! whose MX hosts all differ (forty sites) but end in one provider's suffix share the
//! provider's connection cap; a scripted rate-limit reply (Gmail's published 4.7.28 text)
//! matching a `slow` rule lowers the provider's rate for the rule's time, visible in the API,
//! and the rate comes back; another provider's mail keeps flowing meanwhile; Yahoo's TSS04
//! text pauses the whole provider on every shard, and the mail waiting at it can be deleted
//! meanwhile.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::dns::DnsServer;
use common::sink::CaptureSink;
use common::{python, Gannet, Setup};

const WAIT: Duration = Duration::from_secs(120);
const DOMAINS: usize = 40;
const RATE_REPLY: &str = "421 4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP address. To protect our users from spam, mail sent from your IP address has been temporarily rate limited.";

fn send(g: &Gannet, rcpts: &[String]) {
    let out = python(
        r#"
import smtplib, sys
port, rcpts = int(sys.argv[1]), sys.argv[2:]
with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
    for r in rcpts:
        s.sendmail("a@sender.test", [r], b"Subject: provider\r\n\r\nhello\r\n")
print("sent")
"#,
        &std::iter::once(g.mx().port().to_string())
            .chain(rcpts.iter().cloned())
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(out.trim(), "sent");
}

/// Forty customers of one provider (`p<n>.test`, MX `mx<n>.bigmail.test` on 127.0.0.1) and
/// one domain elsewhere (`elsewhere.test`, on 127.0.0.2), with a capture sink on each.
fn two_providers(dns: &DnsServer) -> (CaptureSink, CaptureSink) {
    let bigmail = CaptureSink::start_on("127.0.0.1:0".parse().unwrap());
    let port = bigmail.addr.port();
    let other =
        CaptureSink::try_start_on(format!("127.0.0.2:{port}").parse().unwrap()).expect("127.0.0.2 on the same port");
    let mut zone = dns.zone.lock().unwrap();
    for n in 0..DOMAINS {
        let host = format!("mx{n}.bigmail.test");
        zone.mx(&format!("p{n}.test"), &[(10, &host)]);
        zone.a(&host, [127, 0, 0, 1]);
    }
    zone.mx("elsewhere.test", &[(10, "mx.other.test")]);
    zone.a("mx.other.test", [127, 0, 0, 2]);
    (bigmail, other)
}

/// MX delivery to the sinks' port through `dns`, with `rules` as the bounce rules file and
/// the provider `bigmail` at `connections_max`.
fn setup(dns: &DnsServer, port: u16, rules: &str, connections_max: usize) -> Setup {
    let mut setup = Setup::new();
    let path = setup.files.path().join("rules.toml");
    std::fs::write(&path, rules).unwrap();
    setup
        .mx_route("*")
        .set("delivery", "mx_port", &port.to_string())
        .set("delivery", "connections_per_destination_max", "10")
        .set("delivery", "connections_per_ip_max", "100")
        .set("delivery", "retry_first", "\"1h\"")
        .set("dns", "servers", &format!("[\"{}\"]", dns.addr))
        .set("bounces", "rules_file", &format!("{:?}", path.display().to_string()))
        .raw(&format!(
            "[[provider]]\nname = \"bigmail\"\nmx = [\"bigmail.test\"]\nconnections_max = {connections_max}\n"
        ));
    setup
}

#[test]
fn a_providers_sites_share_its_connections_and_a_rate_reply_slows_it_for_a_while() {
    let dns = DnsServer::start();
    let (bigmail, other) = two_providers(&dns);
    *bigmail.behaviour.rcpt_replies.lock().unwrap() = vec![("slowme@".into(), RATE_REPLY.into())];
    let setup = setup(
        &dns,
        bigmail.addr.port(),
        "[[rule]]\nclass = \"rate-limited\"\nstatus = \"4.7.28\"\naction = \"slow\"\nslow_rate = 0.5\nslow_for = \"3s\"\n",
        2,
    );
    let g = Gannet::start(&setup);
    let rcpts: Vec<String> = (0..DOMAINS).map(|n| format!("user@p{n}.test")).collect();
    send(&g, &rcpts);
    bigmail.wait_for(DOMAINS, WAIT);
    let most = bigmail.active_max.load(Ordering::Acquire);
    assert!(
        (1..=2).contains(&most),
        "{most} connections at once to the provider's {DOMAINS} sites (provider cap 2, site cap 10)"
    );

    // Gmail's rate reply: the rule slows the provider (not just the site), for 3 s.
    send(&g, &["slowme@p0.test".to_string()]);
    assert!(
        g.wait_for_log("slowed by the rate-limited action", WAIT),
        "{}",
        g.log_text()
    );
    assert!(
        g.log_text().contains("destination=\"provider bigmail\""),
        "{}",
        g.log_text()
    );
    assert_eq!(g.metric("gannet_bounce_actions_total{action=\"slow\"}"), 1.0);
    let (_, listed) = g.http("GET", "/api/destinations", None, &[]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["slowed"][0]["destination"], "provider bigmail", "{listed}");
    assert_eq!(listed["slowed"][0]["interval_ms"], 2000, "{listed}");
    // Another provider's mail flows meanwhile.
    send(&g, &["someone@elsewhere.test".to_string()]);
    other.wait_for(1, WAIT);
    // The slow-down ends by itself: polled, not slept for.
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, listed) = g.http("GET", "/api/destinations", None, &[]);
        let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
        if listed["slowed"].as_array().is_some_and(|a| a.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "the slow-down never ended: {listed}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

const TSS04: &str = "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes";

/// Gannet on `shards` shards, with a rule that pauses a provider for `suspend_for` on Yahoo's
/// TSS04 text, after `bigmail` answered it to `tss@p0.test`: the provider is paused.
fn paused_by_tss04(dns: &DnsServer, suspend_for: &str, shards: usize) -> (Gannet, CaptureSink, CaptureSink) {
    let (bigmail, other) = two_providers(dns);
    *bigmail.behaviour.rcpt_replies.lock().unwrap() = vec![("tss@".into(), TSS04.into())];
    let rule = format!(
        "[[rule]]\nclass = \"rate-limited\"\ntext = \"TSS04\"\naction = \"suspend\"\nsuspend_for = \"{suspend_for}\"\n"
    );
    let mut setup = setup(dns, bigmail.addr.port(), &rule, 10);
    setup.shards(shards);
    let g = Gannet::start(&setup);
    send(&g, &["tss@p0.test".to_string()]);
    assert!(
        g.wait_for_log("provider paused by the rate-limited action", WAIT),
        "{}",
        g.log_text()
    );
    (g, bigmail, other)
}

#[test]
fn a_rate_reply_pauses_the_whole_provider_for_the_rules_time_and_its_mail_then_goes() {
    let dns = DnsServer::start();
    let (g, bigmail, other) = paused_by_tss04(&dns, "10s", 2);
    // The other shard pauses it too.
    assert!(
        g.wait_for_log("provider paused as another shard asked", WAIT),
        "{}",
        g.log_text()
    );
    // The receiver would take it now; the pause decides.
    bigmail.behaviour.rcpt_replies.lock().unwrap().clear();
    let (_, listed) = g.http("GET", "/api/destinations", None, &[]);
    assert_eq!(
        listed.matches("\"provider bigmail\"").count(),
        2,
        "one per shard: {listed}"
    );
    // Other customers of the paused provider wait, whichever shard their connection reached;
    // another provider's mail flows.
    for n in 1..=4 {
        send(&g, &[format!("user@p{n}.test")]);
    }
    send(&g, &["someone@elsewhere.test".to_string()]);
    other.wait_for(1, WAIT);
    assert!(bigmail.captured().is_empty(), "nothing went to the paused provider");
    // The pause ends after its 10 s, not after the message's 1 h backoff: all go.
    assert!(g.wait_for_log("a provider's pause ended", WAIT), "{}", g.log_text());
    let got = bigmail.wait_for(5, WAIT);
    let mut to: Vec<&str> = got.iter().map(|c| c.recipients[0].as_str()).collect();
    to.sort();
    assert_eq!(
        to,
        [
            "tss@p0.test",
            "user@p1.test",
            "user@p2.test",
            "user@p3.test",
            "user@p4.test"
        ]
    );
    assert_eq!(g.metric("gannet_bounce_actions_total{action=\"suspend\"}"), 1.0);
    assert_eq!(
        g.metric("gannet_retries_total"),
        0.0,
        "the paused message never took a backoff step"
    );
}

#[test]
fn mail_waiting_at_a_paused_provider_can_be_deleted_while_the_pause_lasts() {
    let dns = DnsServer::start();
    let (g, bigmail, _other) = paused_by_tss04(&dns, "1h", 1);
    send(&g, &["user@p1.test".to_string()]);
    // Both wait in their sites' queues for an hour; neither is busy for the operator. A
    // message is busy only while its job is on a connection or being routed, which ends
    // within moments here, so the delete is asked again until both are gone.
    let deadline = Instant::now() + WAIT;
    let mut deleted: Vec<String> = Vec::new();
    while deleted.len() < 2 {
        assert!(Instant::now() < deadline, "still busy: {deleted:?}\n{}", g.log_text());
        let (status, body) = g.http("POST", "/api/queue/delete", Some(r#"{"all": true}"#), &[]);
        assert_eq!(status, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        deleted.extend(
            answer["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string()),
        );
        if deleted.len() < 2 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(g.metric("gannet_queue_messages{state=\"delivering\"}"), 0.0);
    let (_, listed) = g.http("GET", "/api/queue", None, &[]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["matched"], 0, "{listed}");
    assert!(bigmail.captured().is_empty(), "nothing went to the paused provider");
    assert_eq!(
        bigmail.connections.load(Ordering::SeqCst),
        1,
        "only the paused attempt connected"
    );
    assert_eq!(*bigmail.behaviour.rcpts_seen.lock().unwrap(), ["tss@p0.test"]);
}
