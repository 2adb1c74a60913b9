//! Receiving sites against the real binary, with DNS from a server of the tests' own: domains
//! whose MX hosts are the same share one site and its connection cap (MX rollup); the cap on
//! connections per receiving IP holds across sites. (`sites_memory.rs`: the table of sites
//! stays bounded, and memory flat, with mail to far more domains than it may hold.)

mod common;

use std::time::Duration;

use common::dns::DnsServer;
use common::sink::CaptureSink;
use common::{python, Gannet, Setup};

const WAIT: Duration = Duration::from_secs(120);

fn setup(dns: &DnsServer, sink: &CaptureSink) -> Setup {
    let mut s = Setup::new();
    s.mx_route("*");
    s.set("delivery", "mx_port", &sink.addr.port().to_string());
    s.set("dns", "servers", &format!("[\"{}\"]", dns.addr));
    s.set("dns", "timeout", "\"2s\"");
    s.set("limits", "recipients_max", "1000");
    s
}

/// Sends `messages` messages of `per_message` recipients each, recipient `i` of message `m`
/// being `user@d<m * per_message + i>.test`, over one connection with Python's smtplib.
fn send_to_domains(g: &Gannet, messages: usize, per_message: usize) {
    let out = python(
        r#"
import smtplib, sys
port, messages, per = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
    for m in range(messages):
        rcpts = [f"user@d{m * per + i}.test" for i in range(per)]
        refused = s.sendmail("a@sender.test", rcpts, b"Subject: many domains\r\n\r\nhello\r\n")
        assert not refused, refused
print("sent")
"#,
        &[
            &g.mx().port().to_string(),
            &messages.to_string(),
            &per_message.to_string(),
        ],
    );
    assert_eq!(out.trim(), "sent");
}

#[test]
fn thousands_of_domains_sharing_one_mx_host_stay_within_its_connection_cap() {
    const DOMAINS: usize = 2000;
    let dns = DnsServer::start();
    {
        let mut zone = dns.zone.lock().unwrap();
        for n in 0..DOMAINS {
            zone.mx(&format!("d{n}.test"), &[(10, "mx.shared.test")]);
        }
        zone.a("mx.shared.test", [127, 0, 0, 1]);
    }
    let sink = CaptureSink::start();
    let mut setup = setup(&dns, &sink);
    setup.set("delivery", "connections_per_destination_max", "4");
    let g = Gannet::start(&setup);
    // One message per domain (not one message for them all): 2,000 jobs for 2,000 domains.
    send_to_domains(&g, DOMAINS, 1);
    sink.wait_for(DOMAINS, WAIT);
    let most = sink.active_max.load(std::sync::atomic::Ordering::Acquire);
    assert!(
        (1..=4).contains(&most),
        "{most} connections at once to the one MX host of {DOMAINS} domains (cap 4)"
    );
}

#[test]
fn the_cap_per_receiving_address_holds_across_sites() {
    let dns = DnsServer::start();
    {
        let mut zone = dns.zone.lock().unwrap();
        // Three domains with MX hosts of their own names, all on one address.
        for n in 0..3 {
            zone.mx(&format!("d{n}.test"), &[(10, &format!("mx{n}.provider.test"))]);
            zone.a(&format!("mx{n}.provider.test"), [127, 0, 0, 1]);
        }
    }
    let sink = CaptureSink::start();
    let mut setup = setup(&dns, &sink);
    setup.set("delivery", "connections_per_destination_max", "10");
    setup.set("delivery", "connections_per_ip_max", "3");
    let g = Gannet::start(&setup);
    // 300 messages, a hundred for each of the three sites.
    let out = python(
        r#"
import smtplib, sys
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=120) as s:
    for m in range(300):
        s.sendmail("a@sender.test", [f"user@d{m % 3}.test"], b"Subject: x\r\n\r\nhello\r\n")
print("sent")
"#,
        &[&g.mx().port().to_string()],
    );
    assert_eq!(out.trim(), "sent");
    sink.wait_for(300, WAIT);
    let most = sink.active_max.load(std::sync::atomic::Ordering::Acquire);
    assert!(
        (1..=3).contains(&most),
        "{most} connections at once to one address (cap 3)"
    );
}
