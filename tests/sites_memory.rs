//! The table of receiving sites stays bounded (`delivery.destinations_max`) and the process's
//! memory flat when mail goes to far more domains than the table may hold: 8,000 domains, each
//! with an MX host of its own, against a table of 100. A file of its own, so that no other
//! test's server runs beside it while memory is measured.

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
    s
}

/// The resident memory of the server once idle, in KiB: compared at rest, after the pooled
/// connections' idle time (1 s here) has closed them, not in the middle of a burst.
fn idle_rss_kib(g: &Gannet) -> u64 {
    std::thread::sleep(Duration::from_secs(3));
    rss_kib(g)
}

/// The resident memory of the server, in KiB.
fn rss_kib(g: &Gannet) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", g.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends batch `b` of 1,000 domains (`d<b*1000>` to `d<b*1000+999>`), ten messages of a
/// hundred recipients, on a connection of its own.
fn send_batch(g: &Gannet, b: usize) {
    let out = python(
        r#"
import smtplib, sys
b = int(sys.argv[2])
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=120) as s:
    for m in range(b * 10, b * 10 + 10):
        s.sendmail("a@sender.test", [f"user@d{m * 100 + i}.test" for i in range(100)], b"Subject: x\r\n\r\nhello\r\n")
print("sent")
"#,
        &[&g.mx().port().to_string(), &b.to_string()],
    );
    assert_eq!(out.trim(), "sent");
}

#[test]
fn mail_to_far_more_domains_than_the_site_table_holds_keeps_memory_flat() {
    const BATCHES: usize = 8;
    let dns = DnsServer::start();
    {
        let mut zone = dns.zone.lock().unwrap();
        // Every domain has an MX host of its own: a site each.
        for n in 0..BATCHES * 1000 {
            zone.mx(&format!("d{n}.test"), &[(10, &format!("mx.d{n}.test"))]);
            zone.a(&format!("mx.d{n}.test"), [127, 0, 0, 1]);
        }
    }
    let sink = CaptureSink::start();
    let mut setup = setup(&dns, &sink);
    setup.set("delivery", "destinations_max", "100");
    setup.set("delivery", "idle_timeout", "\"1s\"");
    setup.set("dns", "cache_entries_max", "500");
    // mimalloc gives freed pages back at once, so that resident memory follows live memory.
    setup.env.push(("MIMALLOC_PURGE_DELAY".into(), "0".into()));
    // Nor are 8,000 delivery lines queued up for the log writer in the middle of it.
    setup.env.push((
        "GANNET_LOG".into(),
        "info,glommio::reactor=off,gannet::delivery::finish=warn,gannet::server::connection=warn".into(),
    ));
    let g = Gannet::start(&setup);
    // Resident memory at rest every 2,000 domains: the first half warms the process up
    // (allocator, pools, code paths); the second half must not need more.
    let mut at_rest_kib = Vec::new();
    for b in 0..BATCHES {
        send_batch(&g, b);
        sink.wait_for((b + 1) * 1000, WAIT);
        if b % 2 == 1 {
            at_rest_kib.push(idle_rss_kib(&g));
        }
    }
    let (first, second) = at_rest_kib.split_at(at_rest_kib.len() / 2);
    let (baseline_kib, end_kib) = (*first.iter().max().unwrap(), *second.iter().max().unwrap());
    assert!(
        g.wait_for_log("destination table full (100 per shard", Duration::from_secs(5)),
        "{}",
        g.log_text()
    );
    eprintln!("RSS at rest every 2,000 domains: {at_rest_kib:?} KiB");
    // A site costs about 600 bytes: kept, the last 4,000 would add 2.4 MB.
    assert!(
        end_kib < baseline_kib + 1536,
        "memory grew from {baseline_kib} KiB to {end_kib} KiB while 4,000 more sites came and went ({at_rest_kib:?})"
    );
}
