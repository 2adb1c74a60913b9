//! MX delivery end to end: the real binary resolves through a DNS server of the tests' own
//! (hickory-proto, loopback UDP and TCP) and delivers to a capture sink on `delivery.mx_port`.

mod common;

use std::time::Duration;

use common::dns::DnsServer;
use common::sink::CaptureSink;
use common::{Gannet, Setup};
use hickory_proto::rr::RecordType;

const WAIT: Duration = Duration::from_secs(60);

/// A sink on 127.0.0.1 at a port that 127.0.0.2 does not serve (MX fallback needs a dead host).
/// `free_port` only says the port was free when it looked; if it was taken since, take another.
fn sink() -> CaptureSink {
    for _ in 0..64 {
        let addr = format!("127.0.0.1:{}", common::free_port()).parse().unwrap();
        match CaptureSink::try_start_on(addr) {
            Ok(sink) => return sink,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("bind capture sink on {addr}: {e}"),
        }
    }
    panic!("no free port for the capture sink after 64 tries")
}

fn setup(dns: &DnsServer, sink: &CaptureSink) -> Setup {
    let mut s = Setup::new();
    s.mx_route("*");
    s.set("delivery", "mx_port", &sink.addr.port().to_string());
    s.set("dns", "servers", &format!("[\"{}\"]", dns.addr));
    s.set("dns", "timeout", "\"500ms\"");
    s.set("dns", "attempts", "1");
    s.set("dns", "ttl_min", "\"0s\"");
    s.set("dns", "failure_ttl", "\"1s\"");
    s
}

fn send(g: &Gannet, from: &str, to: &str) {
    common::send_message(g.mx(), from, &[to], &format!("Subject: to {to}\r\n\r\nx\r\n"));
}

#[test]
fn mx_hosts_are_tried_in_preference_order_with_fallback() {
    let dns = DnsServer::start();
    dns.zone
        .lock()
        .unwrap()
        .mx("mx.test", &[(20, "up.mx.test"), (10, "down.mx.test")])
        .a("down.mx.test", [127, 0, 0, 2])
        .a("up.mx.test", [127, 0, 0, 1]);
    let sink = sink();
    let g = Gannet::start(&setup(&dns, &sink));
    send(&g, "a@x.test", "user@mx.test");
    let got = sink.wait_for(1, WAIT);
    assert_eq!(got[0].recipients, vec!["user@mx.test".to_string()]);
    assert!(
        g.wait_for_log("trying the next address", WAIT),
        "the preferred (dead) host came first:\n{}",
        g.log_text()
    );
    // The question's letter case was randomised (0x20) and echoed.
    assert!(!dns.asked("mx.test", RecordType::MX).is_empty());
}

#[test]
fn a_domain_without_mx_is_its_own_mail_exchanger() {
    let dns = DnsServer::start();
    dns.zone.lock().unwrap().a("implicit.test", [127, 0, 0, 1]);
    let sink = sink();
    let g = Gannet::start(&setup(&dns, &sink));
    send(&g, "a@x.test", "user@implicit.test");
    sink.wait_for(1, WAIT);
    assert!(g.wait_for_log("delivered: ", WAIT));
}

#[test]
fn null_mx_and_missing_domains_bounce_at_once() {
    let dns = DnsServer::start();
    dns.zone
        .lock()
        .unwrap()
        .mx("null.test", &[(0, ".")])
        .mx("sender.test", &[(10, "up.sender.test")])
        .a("up.sender.test", [127, 0, 0, 1]);
    let sink = sink();
    let g = Gannet::start(&setup(&dns, &sink));
    send(&g, "me@sender.test", "user@null.test");
    send(&g, "me@sender.test", "user@nowhere.test");
    // Both come back to the sender, who is delivered through MX too.
    let got = sink.wait_for(2, WAIT);
    let texts: Vec<String> = got
        .iter()
        .map(|c| String::from_utf8_lossy(&c.content).to_string())
        .collect();
    assert!(got
        .iter()
        .all(|c| c.from.is_empty() && c.recipients == vec!["me@sender.test".to_string()]));
    assert!(
        texts
            .iter()
            .any(|t| t.contains("Status: 5.1.10") && t.contains("null MX")),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("Status: 5.1.2") && t.contains("does not exist")),
        "{texts:?}"
    );
}

#[test]
fn dns_failures_and_timeouts_defer() {
    let dns = DnsServer::start();
    {
        let mut zone = dns.zone.lock().unwrap();
        zone.servfail.insert("broken.test".into());
        zone.silent.insert("slow.test".into());
    }
    let sink = sink();
    let g = Gannet::start(&setup(&dns, &sink));
    send(&g, "a@x.test", "user@broken.test");
    send(&g, "a@x.test", "user@slow.test");
    assert!(g.wait_for_log_count("deferred: 451 4.4.3", 2, WAIT), "{}", g.log_text());
    assert!(g.log_text().contains("timed out"), "{}", g.log_text());
    assert!(sink.captured().is_empty());
    assert_eq!(g.queued_ids().len(), 2, "deferred mail stays queued");
}

#[test]
fn a_truncated_answer_is_asked_again_over_tcp() {
    let dns = DnsServer::start();
    {
        let mut zone = dns.zone.lock().unwrap();
        zone.mx("big.test", &[(10, "up.big.test")])
            .a("up.big.test", [127, 0, 0, 1]);
        zone.truncate_udp.insert("big.test".into());
    }
    let sink = sink();
    let g = Gannet::start(&setup(&dns, &sink));
    send(&g, "a@x.test", "user@big.test");
    sink.wait_for(1, WAIT);
    let asked = dns.asked("big.test", RecordType::MX);
    assert!(asked.iter().any(|q| !q.tcp) && asked.iter().any(|q| q.tcp), "{asked:?}");
}

#[test]
fn answers_are_cached_until_their_ttl_expires() {
    let dns = DnsServer::start();
    {
        let mut zone = dns.zone.lock().unwrap();
        zone.ttl_s = 1;
        zone.mx("ttl.test", &[(10, "up.ttl.test")])
            .a("up.ttl.test", [127, 0, 0, 1]);
    }
    let sink = sink();
    let mut s = setup(&dns, &sink);
    // A pooled connection needs no lookup; let it go before the third message.
    s.set("delivery", "idle_timeout", "\"300ms\"");
    let g = Gannet::start(&s);
    send(&g, "a@x.test", "one@ttl.test");
    sink.wait_for(1, WAIT);
    send(&g, "a@x.test", "two@ttl.test");
    sink.wait_for(2, WAIT);
    assert_eq!(
        dns.asked("ttl.test", RecordType::MX).len(),
        1,
        "the second message used the cache"
    );
    // The TTL itself is what is tested here: let one second of wall-clock time pass.
    std::thread::sleep(Duration::from_millis(1500));
    send(&g, "a@x.test", "three@ttl.test");
    sink.wait_for(3, WAIT);
    assert_eq!(
        dns.asked("ttl.test", RecordType::MX).len(),
        2,
        "asked again after the TTL"
    );
}
