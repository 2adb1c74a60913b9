//! Slow clients (slowloris) against the real binary: a command line, an AUTH response and a
//! message's content each have a deadline that trickled bytes cannot move, the content has a
//! minimum rate, and a shard nearly full of sessions shortens the waits (stress mode). Honest
//! slow clients, within the limits, still get their mail through.

mod common;

use std::io::Write;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{python, Gannet, Raw, Setup};

const TIMEOUT_REPLY: &str = "421 4.4.2 Timeout exceeded, closing connection\r\n";

/// Sends `bytes` one at a time, `interval` apart, until the server answers; returns the answer
/// and when it came, or None if `give_up` passes first (or the bytes run out).
fn trickle(c: &mut Raw, bytes: &[u8], interval: Duration, give_up: Duration) -> Option<(String, Instant)> {
    let started = Instant::now();
    c.stream.set_read_timeout(Some(interval)).unwrap();
    for &byte in bytes.iter().cycle() {
        if started.elapsed() > give_up {
            return None;
        }
        if c.stream.write_all(&[byte]).is_err() {
            // Closed under us: the reply, if any, is already in the socket.
            c.stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            return c.reply().map(|r| (r, Instant::now()));
        }
        let mut one = [0u8; 1];
        match c.stream.peek(&mut one) {
            Ok(0) => return None,
            Ok(_) => {
                c.stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                return c.reply().map(|r| (r, Instant::now()));
            }
            Err(_) => {} // no answer within the interval: the next byte
        }
    }
    None
}

#[test]
fn trickling_clients_are_closed_at_the_command_deadline_while_mail_flows() {
    let mut setup = Setup::new();
    setup.set("limits", "command_timeout", "\"3s\"");
    setup.set("limits", "sessions_per_ip_max", "100");
    let g = Gannet::start(&setup);
    const TRICKLERS: usize = 40;
    let greeted = Arc::new(Barrier::new(TRICKLERS + 1));
    let mut threads = Vec::new();
    for _ in 0..TRICKLERS {
        let (addr, greeted) = (g.mx(), greeted.clone());
        threads.push(std::thread::spawn(move || {
            let mut c = Raw::connect(addr);
            assert!(c.reply().unwrap().starts_with("220 "));
            let t0 = Instant::now();
            greeted.wait();
            // One byte a second of a line that never ends (on main, each byte re-armed the
            // timeout and these sessions stayed open for good).
            let answer = trickle(
                &mut c,
                b"NOOP xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                Duration::from_secs(1),
                Duration::from_secs(20),
            );
            let (reply, at) = answer.expect("the server never cut the trickling session off");
            (reply, at - t0, c.closed())
        }));
    }
    greeted.wait();
    // Meanwhile an ordinary client (Python's smtplib) gets its mail accepted.
    let out = python(
        r#"
import smtplib, sys
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30) as s:
    s.ehlo("honest.test")
    code, text = s.docmd("MAIL FROM:<a@honest.test>")
    assert code == 250, (code, text)
    s.rcpt("b@remote.test")
    code, text = s.data(b"Subject: meanwhile\r\n\r\nhello\r\n")
    print(code, text.decode())
"#,
        &[&g.mx().port().to_string()],
    );
    assert!(out.starts_with("250 2.0.0 Ok: queued as"), "{out}");
    for t in threads {
        let (reply, after, closed) = t.join().unwrap();
        assert_eq!(reply, TIMEOUT_REPLY);
        assert!(closed, "closed after the 421");
        // 3 s after the greeting, with room for a loaded machine.
        assert!(
            after >= Duration::from_millis(2900) && after < Duration::from_secs(8),
            "cut off after {after:?}"
        );
    }
    assert_eq!(g.queued_ids().len(), 1);
    assert!(g.wait_for_log("timeout: command line not complete within 3s", Duration::from_secs(5)));
}

#[test]
fn a_message_trickled_below_the_minimum_rate_is_cut_off() {
    let mut setup = Setup::new();
    setup.set("limits", "command_timeout", "\"30s\"");
    setup.set("limits", "data_timeout", "\"60s\"");
    setup.set("limits", "data_rate_min_bytes_per_second", "100");
    setup.set("limits", "data_rate_window", "\"2s\"");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    assert!(c.cmd("MAIL FROM:<a@l.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@remote.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let t0 = Instant::now();
    // Five bytes a second against a minimum of 100: the first 2 s window fails.
    let answer = trickle(
        &mut c,
        b"Subject: slow\r\n",
        Duration::from_millis(200),
        Duration::from_secs(20),
    );
    let (reply, at) = answer.expect("the trickled message was never cut off");
    assert_eq!(reply, TIMEOUT_REPLY);
    let after = at - t0;
    assert!(
        after >= Duration::from_millis(1900) && after < Duration::from_secs(7),
        "{after:?}"
    );
    assert!(c.closed());
    assert!(g.queued_ids().is_empty(), "the half-received message is not queued");
    assert!(
        g.wait_for_log("below the minimum of 200", Duration::from_secs(5)),
        "{}",
        g.log_text()
    );
}

#[test]
fn slow_but_honest_clients_within_the_limits_get_their_mail_through() {
    let mut setup = Setup::new();
    setup.set("limits", "command_timeout", "\"3s\"");
    setup.set("limits", "data_rate_min_bytes_per_second", "100");
    setup.set("limits", "data_rate_window", "\"2s\"");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    // A command in three pieces, the whole line within its 3 s.
    for piece in ["MAIL FR", "OM:<a@l.", "test>\r\n"] {
        c.send(piece.as_bytes());
        std::thread::sleep(Duration::from_millis(600));
    }
    assert!(c.reply().unwrap().starts_with("250 "));
    assert!(c.cmd("RCPT TO:<b@remote.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    // 300 bytes a second for 7 s: several windows, each well above the minimum of 200 bytes.
    let t0 = Instant::now();
    let line = format!("{}\r\n", "s".repeat(28));
    while t0.elapsed() < Duration::from_secs(7) {
        c.send(line.as_bytes());
        std::thread::sleep(Duration::from_millis(100));
    }
    let reply = c.cmd(".");
    assert!(reply.starts_with("250 2.0.0 Ok: queued as"), "{reply}");
    assert_eq!(g.queued_ids().len(), 1);
}

#[test]
fn under_stress_idle_sessions_get_the_shorter_deadline() {
    let mut setup = Setup::new();
    setup.set("limits", "sessions_per_shard_max", "10");
    setup.set("limits", "stress_sessions_fraction", "0.5");
    setup.set("limits", "command_timeout", "\"60s\"");
    setup.set("limits", "stress_command_timeout", "\"1s\"");
    let g = Gannet::start(&setup);
    // Four idle sessions: below the threshold of 5, they keep the 60 s wait...
    let mut early: Vec<(Raw, Instant)> = (0..4)
        .map(|_| {
            let mut c = Raw::connect(g.mx());
            assert!(c.reply().unwrap().starts_with("220 "));
            (c, Instant::now())
        })
        .collect();
    // ...for the 1.5 s until the fifth arrives and puts the shard under stress.
    std::thread::sleep(Duration::from_millis(1500));
    let mut fifth = Raw::connect(g.mx());
    assert!(fifth.reply().unwrap().starts_with("220 "));
    let stress_began = Instant::now();
    assert!(g.wait_for_log("under stress: 5 of 10 sessions open", Duration::from_secs(10)));
    for (c, greeted) in early.iter_mut() {
        assert_eq!(c.reply().as_deref(), Some(TIMEOUT_REPLY), "{}", g.log_text());
        let waited = greeted.elapsed();
        assert!(
            waited >= Duration::from_millis(1500),
            "not cut before the stress: {waited:?}"
        );
        assert!(
            stress_began.elapsed() < Duration::from_secs(6),
            "cut within the stress deadline"
        );
    }
    // With those four gone the shard is out of stress (3 below 4), and the fifth, younger than
    // the stress deadline when stress ended, has its full wait again: it can talk after 1.5 s.
    assert!(
        g.wait_for_log("no longer under stress", Duration::from_secs(10)),
        "{}",
        g.log_text()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(fifth.cmd("NOOP"), "250 2.0.0 Ok\r\n");
    // One line per change, not one per session.
    let log = g.log_text();
    assert_eq!(log.matches("sessions open; command waits").count(), 1, "{log}");
    assert_eq!(log.matches("no longer under stress").count(), 1, "{log}");
}

/// A TLS record trickled a byte at a time: every socket read brings a byte, but the record (and
/// so the command) never completes. The deadline must hold through TLS too.
#[test]
fn a_tls_record_trickled_a_byte_at_a_time_is_cut_off() {
    let mut setup = Setup::new();
    setup.set("limits", "command_timeout", "\"3s\"");
    let g = Gannet::start(&setup);
    let out = python(
        r#"
import socket, ssl, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
f = s.makefile("rb")
def reply():
    lines = []
    while True:
        line = f.readline().decode()
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            return "".join(lines)
assert reply().startswith("220 ")
s.sendall(b"EHLO trickle.test\r\n"); reply()
s.sendall(b"STARTTLS\r\n"); assert reply().startswith("220 ")
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
tls = ctx.wrap_bio(incoming, outgoing, server_hostname="mx.test")
while True:
    try:
        tls.do_handshake()
        break
    except ssl.SSLWantReadError:
        s.sendall(outgoing.read())
        incoming.write(s.recv(65536))
s.sendall(outgoing.read())
tls.write(b"EHLO trickle.test\r\n")
s.sendall(outgoing.read())
# The EHLO reply (and TLS 1.3 session tickets) come back whole.
text = b""
while b"250 " not in text:
    incoming.write(s.recv(65536))
    try:
        text += tls.read(65536)
    except ssl.SSLWantReadError:
        pass
# The next command as one record, sent a byte a second.
tls.write(b"NOOP\r\n")
record = outgoing.read()
t0 = time.monotonic()
s.settimeout(1.0)
answer = b""
for byte in record:
    s.sendall(bytes([byte]))
    try:
        data = s.recv(65536)
    except socket.timeout:
        continue
    if not data:
        break
    incoming.write(data)
    try:
        answer += tls.read(65536)
    except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
        pass
    if answer:
        break
print(f"{time.monotonic() - t0:.1f} {len(record)} {answer.decode()}", end="")
"#,
        &[&g.mx().port().to_string()],
    );
    let mut parts = out.splitn(3, ' ');
    let elapsed: f64 = parts.next().unwrap().parse().unwrap();
    let record_len: usize = parts.next().unwrap().parse().unwrap();
    let answer = parts.next().unwrap_or("");
    assert!(record_len > 6, "a record longer than the command: {record_len}");
    assert_eq!(answer, TIMEOUT_REPLY, "{out}");
    assert!((2.5..8.0).contains(&elapsed), "cut off after {elapsed} s");
}

/// The other direction: a receiver that sends its greeting a byte a second. Delivery gives up on
/// it at the reply deadline instead of holding a worker for as long as the bytes keep coming.
#[test]
fn a_receiver_that_trickles_its_greeting_is_given_up_at_the_reply_deadline() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let receiver = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                for &byte in b"220 slow.test ESMTP and on and on and on and on and on and on\r\n" {
                    if stream.write_all(&[byte]).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }
    });
    let mut setup = Setup::new();
    setup.set("delivery", "reply_timeout", "\"2s\"");
    setup.route("*", receiver);
    let g = Gannet::start(&setup);
    common::send_message(g.mx(), "a@l.test", &["b@remote.test"], "Subject: x\r\n\r\nhi\r\n");
    assert!(
        g.wait_for_log("no complete reply within 2s", Duration::from_secs(15)),
        "{}",
        g.log_text()
    );
    assert!(g.wait_for_log("deferred", Duration::from_secs(5)), "{}", g.log_text());
}
