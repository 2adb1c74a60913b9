//! Behind a load balancer: Debian's HAProxy in front of Gannet on loopback, sending the PROXY
//! protocol (v1 with `send-proxy`, v2 with `send-proxy-v2`). The address HAProxy reports is the
//! one relay policy, logs and the Received header use; only the configured proxies may speak
//! the protocol.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::sink::CaptureSink;
use common::{free_port, python, Gannet, Raw, Setup};

const WAIT: Duration = Duration::from_secs(20);

struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts HAProxy with a v1 and a v2 frontend in front of `backend`; returns once both accept.
fn haproxy(dir: &std::path::Path, v1: u16, v2: u16, backend: u16) -> Haproxy {
    let config = format!(
        "global\n  maxconn 64\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend v1\n  bind 127.0.0.1:{v1}\n  default_backend gannet_v1\n\
         frontend v2\n  bind 127.0.0.1:{v2}\n  default_backend gannet_v2\n\
         backend gannet_v1\n  server g 127.0.0.1:{backend} send-proxy\n\
         backend gannet_v2\n  server g 127.0.0.1:{backend} send-proxy-v2\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("haproxy (Debian's haproxy package; scripts/test installs it)");
    let proxy = Haproxy(child);
    // Its frontends listen once it has parsed the file and bound them.
    let deadline = Instant::now() + WAIT;
    for port in [v1, v2] {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    proxy
}

/// Sends a message through `port` from `source` with smtplib; prints the outcome per recipient.
const SEND: &str = r#"
import smtplib, sys
port, source, rcpt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
s = smtplib.SMTP('127.0.0.1', port, source_address=(source, 0), timeout=20)
try:
    s.sendmail('me@example.org', [rcpt], b'Subject: via haproxy\r\n\r\nhi\r\n')
    print('accepted')
except smtplib.SMTPRecipientsRefused as e:
    code, text = e.recipients[rcpt]
    print('refused', code, text.decode())
s.quit()
"#;

fn send(port: u16, source: &str, rcpt: &str) -> String {
    python(SEND, &[&port.to_string(), source, rcpt]).trim().to_string()
}

#[test]
fn haproxy_v1_and_v2_clients_are_judged_by_their_own_address() {
    let sink = CaptureSink::start();
    let proxied = free_port();
    let (v1, v2) = (free_port(), free_port());
    let mut setup = Setup::new();
    setup
        .route("*", sink.addr)
        .set("relay", "trusted_networks", "[\"127.0.0.1/32\"]")
        .set("relay", "local_domains", "[\"local.test\"]")
        .raw(&format!(
            "[[listener]]\naddress = \"127.0.0.1:{proxied}\"\nkind = \"mx\"\nproxy_protocol = true\nproxy_from = [\"127.0.0.1/32\"]\n"
        ));
    let g = Gannet::start(&setup);
    let _proxy = haproxy(g.dir.path(), v1, v2, proxied);

    for (version, port) in [("v1", v1), ("v2", v2)] {
        // 127.0.0.2 behind the proxy is a stranger, as it would be directly.
        let outcome = send(port, "127.0.0.2", "you@remote.test");
        assert!(outcome.starts_with("refused 554 5.7.1"), "{version}: {outcome}");
        // 127.0.0.1 behind the proxy is trusted and may relay.
        assert_eq!(send(port, "127.0.0.1", "you@remote.test"), "accepted", "{version}");
    }
    // A stranger may still send to our own domain; its Received header names it, not the proxy.
    assert_eq!(send(v1, "127.0.0.2", "me@local.test"), "accepted");
    assert_eq!(send(v2, "127.0.0.3", "me@local.test"), "accepted");
    let got = sink.wait_for(4, WAIT);
    let received: Vec<String> = got
        .iter()
        .filter(|m| m.recipients == ["me@local.test"])
        .map(|m| {
            let text = String::from_utf8_lossy(&m.content).to_string();
            text.lines().find(|l| l.starts_with("Received:")).unwrap().to_string()
        })
        .collect();
    assert_eq!(received.len(), 2, "{got:?}");
    assert!(received[0].contains("[127.0.0.2]"), "{}", received[0]);
    assert!(received[1].contains("[127.0.0.3]"), "{}", received[1]);
    assert!(
        g.log_text().contains("client=127.0.0.3"),
        "the log names the client: {}",
        g.log_text()
    );
}

#[test]
fn only_the_configured_proxies_may_send_a_proxy_header() {
    let proxied = free_port();
    let mut setup = Setup::new();
    setup.raw(&format!(
        "[[listener]]\naddress = \"127.0.0.1:{proxied}\"\nkind = \"mx\"\nproxy_protocol = true\nproxy_from = [\"127.0.0.1/32\"]\n"
    ));
    let g = Gannet::start(&setup);
    let addr = SocketAddr::from(([127, 0, 0, 1], proxied));

    // From an address that is not a proxy: closed unanswered, whatever it sends.
    let mut c = Raw::connect_from(addr, Some("127.0.0.2"));
    c.send(b"PROXY TCP4 192.0.2.1 127.0.0.1 1000 25\r\n");
    assert!(c.closed());
    assert!(
        g.wait_for_log("not from a proxy_from address", WAIT),
        "{}",
        g.log_text()
    );

    // From the proxy, but no header: closed, and the log says why.
    let mut c = Raw::connect_from(addr, Some("127.0.0.1"));
    c.send(b"EHLO client.test\r\n");
    assert!(c.closed());
    assert!(g.wait_for_log("not a PROXY protocol header", WAIT), "{}", g.log_text());

    // A header split over several writes, with the client's first command right behind it in
    // the last one: the session gets exactly the bytes after the header.
    let mut c = Raw::connect_from(addr, Some("127.0.0.1"));
    c.stream.set_nodelay(true).unwrap();
    c.send(b"PROXY TCP4 192.0.2.9 ");
    // Not a wait for an event: a pause so that the header's halves arrive apart.
    std::thread::sleep(Duration::from_millis(50));
    c.send(b"127.0.0.1 1000 25\r\nNOOP\r\n");
    let greeting = c.reply().unwrap();
    assert!(greeting.starts_with("220 "), "{greeting}");
    let noop = c.reply().unwrap();
    assert!(noop.starts_with("250"), "{noop}");
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    // The session is 192.0.2.9's, which is not in the trusted networks (the proxy is).
    assert!(c.cmd("MAIL FROM:<me@example.org>").starts_with("250"));
    let refused = c.cmd("RCPT TO:<you@remote.test>");
    assert!(refused.starts_with("554 5.7.1"), "{refused}");
}
