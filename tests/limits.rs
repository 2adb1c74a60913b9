//! Every configured limit, enforced by the real server with the reply the configuration promises.

mod common;

use std::time::{Duration, Instant};

use common::{queued_id, Gannet, Raw, Setup};

fn start_transaction(c: &mut Raw) {
    c.hello();
    assert!(c.cmd("MAIL FROM:<a@l.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@remote.test>").starts_with("250"));
}

#[test]
fn recipients_past_the_limit_get_452_and_the_rest_is_delivered() {
    let mut setup = Setup::new();
    setup.set("limits", "recipients_max", "3");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    c.cmd("MAIL FROM:<a@l.test>");
    for n in 1..=3 {
        assert_eq!(
            c.cmd(&format!("RCPT TO:<r{n}@remote.test>")),
            "250 2.1.5 Recipient ok\r\n"
        );
    }
    assert_eq!(c.cmd("RCPT TO:<r4@remote.test>"), "452 4.5.3 Too many recipients\r\n");
    c.cmd("DATA");
    let id = queued_id(&c.cmd("x\r\n.")).unwrap();
    let envelope = String::from_utf8(g.command(&["queue", "show", &id, "--envelope"]).stdout).unwrap();
    assert_eq!(envelope.matches("recipient: ").count(), 3, "{envelope}");
}

#[test]
fn sessions_per_ip_are_limited_with_421() {
    let mut setup = Setup::new();
    setup.set("limits", "sessions_per_ip_max", "2");
    let g = Gannet::start(&setup);
    let mut a = Raw::connect(g.mx());
    let mut b = Raw::connect(g.mx());
    assert!(a.reply().unwrap().starts_with("220"));
    assert!(b.reply().unwrap().starts_with("220"));
    let mut c = Raw::connect(g.mx());
    assert_eq!(
        c.reply().unwrap(),
        "421 4.7.0 Too many connections from your address, try again later\r\n"
    );
    assert!(c.closed());
    // Another address is not affected.
    let mut d = Raw::connect_from(g.mx(), Some("127.0.0.2"));
    assert!(d.reply().unwrap().starts_with("220"));
    // Once a session ends its place is free again.
    assert_eq!(a.cmd("QUIT"), "221 2.0.0 Bye\r\n");
    assert!(a.closed());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut e = Raw::connect(g.mx());
        if e.reply().unwrap().starts_with("220") {
            break;
        }
        assert!(Instant::now() < deadline, "the freed place never came back");
    }
}

#[test]
fn sessions_per_shard_are_limited_with_421() {
    let mut setup = Setup::new();
    setup.set("limits", "sessions_per_shard_max", "2");
    let g = Gannet::start(&setup);
    let mut a = Raw::connect(g.mx());
    let mut b = Raw::connect_from(g.mx(), Some("127.0.0.2"));
    assert!(a.reply().unwrap().starts_with("220"));
    assert!(b.reply().unwrap().starts_with("220"));
    let mut c = Raw::connect_from(g.mx(), Some("127.0.0.3"));
    assert_eq!(
        c.reply().unwrap(),
        "421 4.7.0 Too many connections, try again later\r\n"
    );
}

#[test]
fn an_idle_client_is_timed_out_with_421() {
    let mut setup = Setup::new();
    setup.set("limits", "command_timeout", "\"1s\"");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    let t0 = Instant::now();
    assert_eq!(c.reply().unwrap(), "421 4.4.2 Timeout exceeded, closing connection\r\n");
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert!(c.closed());
}

#[test]
fn a_slow_message_hits_the_total_data_timeout() {
    let mut setup = Setup::new();
    setup.set("limits", "command_timeout", "\"10s\"");
    setup.set("limits", "data_timeout", "\"2s\"");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    start_transaction(&mut c);
    assert!(c.cmd("DATA").starts_with("354"));
    // A client that trickles one line every 200 ms never trips the idle timeout, only the total.
    c.stream.set_nonblocking(false).unwrap();
    let t0 = Instant::now();
    let mut reply = None;
    while t0.elapsed() < Duration::from_secs(20) {
        if c.stream.write_all_nonfatal(b"slow line\r\n").is_err() {
            break;
        }
        c.stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        if let Some(r) = c.reply() {
            reply = Some(r);
            break;
        }
    }
    assert_eq!(
        reply.as_deref(),
        Some("421 4.4.2 Timeout exceeded, closing connection\r\n")
    );
    assert!(t0.elapsed() >= Duration::from_millis(1900), "{:?}", t0.elapsed());
    assert!(g.queued_ids().is_empty());
}

/// Lets the trickle test write without panicking once the server has closed.
trait WriteNonFatal {
    fn write_all_nonfatal(&mut self, bytes: &[u8]) -> std::io::Result<()>;
}

impl WriteNonFatal for std::net::TcpStream {
    fn write_all_nonfatal(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        std::io::Write::write_all(self, bytes)
    }
}

/// Sends messages with `body` until one is refused (at most 20); returns how many were accepted
/// and the refusal.
fn send_until_refused(g: &Gannet, c: &mut Raw, body: &str) -> (usize, Option<String>) {
    for accepted in 0..20 {
        c.cmd("MAIL FROM:<a@l.test>");
        c.cmd("RCPT TO:<b@remote.test>");
        c.cmd("DATA");
        c.send(body.as_bytes());
        let Some(reply) = c.cmd_opt(".") else {
            panic!("connection lost; log:\n{}", g.log_text());
        };
        if !reply.starts_with("250 ") {
            return (accepted, Some(reply));
        }
    }
    (20, None)
}

#[test]
fn a_full_spool_answers_452_and_keeps_serving() {
    let mut setup = Setup::new();
    setup.set("spool", "segment_size", "\"1MiB\"");
    setup.set("spool", "size_max", "\"2MiB\"");
    setup.set("limits", "message_size_max", "\"256KiB\"");
    setup.set("limits", "recipients_max", "10");
    let g = Gannet::start(&setup);
    let body = format!("{}\r\n", "m".repeat(998)).repeat(200); // ~200 KiB
    let mut c = Raw::connect(g.mx());
    c.hello();
    let (accepted, refusal) = send_until_refused(&g, &mut c, &body);
    assert_eq!(
        refusal.as_deref(),
        Some("452 4.3.1 Insufficient system storage, try again later\r\n"),
        "{}",
        g.log_text()
    );
    // Two 1 MiB segments hold 4 or 5 such records each.
    assert!((8..=10).contains(&accepted), "{accepted} accepted");
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok\r\n");
    assert_eq!(g.queued_ids().len(), accepted);
    assert!(g.wait_for_log("spool full", Duration::from_secs(5)));
}

#[test]
fn a_spool_write_error_answers_451_and_keeps_serving() {
    let mut setup = Setup::new();
    setup.set("spool", "segment_size", "\"1MiB\"");
    setup.set("limits", "message_size_max", "\"256KiB\"");
    setup.set("limits", "recipients_max", "10");
    let g = Gannet::start(&setup);
    // Pull the directory out from under the shard: the open segment still takes writes, but the
    // next segment cannot be created (ENOENT), a real I/O error in the appender.
    std::fs::remove_dir_all(gannet::spool::shard_dir(&g.spool_dir, 0)).unwrap();
    let body = format!("{}\r\n", "w".repeat(998)).repeat(200); // ~200 KiB
    let mut c = Raw::connect(g.mx());
    c.hello();
    let (_, refusal) = send_until_refused(&g, &mut c, &body);
    assert_eq!(
        refusal.as_deref(),
        Some("451 4.3.0 Local error writing the message, try again later\r\n"),
        "{}",
        g.log_text()
    );
    assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok\r\n", "the shard keeps serving");
    assert!(
        g.wait_for_log("cannot create segment", Duration::from_secs(30)),
        "{}",
        g.log_text()
    );
}

#[test]
fn a_nearly_full_file_system_answers_452() {
    let mut setup = Setup::new();
    setup.set("spool", "min_free", "\"1000000GiB\"");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    start_transaction(&mut c);
    c.cmd("DATA");
    assert_eq!(
        c.cmd("x\r\n."),
        "452 4.3.1 Insufficient system storage, try again later\r\n"
    );
    assert!(
        g.wait_for_log("file system nearly full", Duration::from_secs(30)),
        "{}",
        g.log_text()
    );
}

#[test]
fn the_shard_memory_budget_refuses_with_452_instead_of_growing() {
    let mut setup = Setup::new();
    setup.set("limits", "message_size_max", "\"512KiB\"");
    setup.set("limits", "recipients_max", "10");
    setup.set("spool", "memory_max", "\"1100KiB\"");
    let g = Gannet::start(&setup);
    // ~400 KiB: buffers of 16 + 64 + 256 + 256 KiB each, so two do not fit in 1100 KiB.
    let chunk = format!("{}\r\n", "q".repeat(998)).repeat(400);
    let mut a = Raw::connect(g.mx());
    start_transaction(&mut a);
    a.cmd("DATA");
    a.send(chunk.as_bytes());
    // B's message no longer fits beside A's buffers.
    let mut b = Raw::connect(g.mx());
    start_transaction(&mut b);
    b.cmd("DATA");
    b.send(chunk.as_bytes());
    a.send(b".\r\n");
    let a_reply = a.reply().unwrap();
    let b_reply = b.cmd(".");
    let replies = [a_reply.as_str(), b_reply.as_str()];
    assert_eq!(
        replies.iter().filter(|r| r.starts_with("452 4.3.1 ")).count(),
        1,
        "exactly one of two concurrent messages fits: {replies:?}"
    );
    assert_eq!(
        replies.iter().filter(|r| r.starts_with("250 2.0.0 Ok: queued")).count(),
        1,
        "{replies:?}"
    );
    // With the memory back, the next message fits.
    b.cmd("MAIL FROM:<a@l.test>");
    b.cmd("RCPT TO:<b@remote.test>");
    b.cmd("DATA");
    b.send(chunk.as_bytes());
    assert!(b.cmd(".").starts_with("250 2.0.0 Ok: queued"));
}

/// A setup where 127.0.0.1 is a stranger: not trusted, so the per-IP rates apply to it and it
/// may only send to the local domain.
fn stranger_setup() -> Setup {
    let mut setup = Setup::new();
    setup.set("relay", "trusted_networks", "[\"10.0.0.0/8\"]");
    setup.set("relay", "local_domains", "[\"local.test\"]");
    setup
}

#[test]
fn connections_per_ip_per_minute_are_limited_with_421() {
    let mut setup = stranger_setup();
    setup.set("limits", "connections_per_ip_per_minute", "3");
    let g = Gannet::start(&setup);
    for _ in 0..3 {
        let mut c = Raw::connect(g.mx());
        assert!(c.reply().unwrap().starts_with("220"));
    }
    let mut c = Raw::connect(g.mx());
    assert_eq!(
        c.reply().unwrap(),
        "421 4.7.0 Too many connections from your address per minute, try again later\r\n"
    );
    assert!(c.closed());
    // Trusted networks are exempt.
    let mut setup = Setup::new();
    setup.set("limits", "connections_per_ip_per_minute", "1");
    let g = Gannet::start(&setup);
    for _ in 0..3 {
        let mut c = Raw::connect(g.mx());
        assert!(c.reply().unwrap().starts_with("220"));
    }
}

#[test]
fn messages_per_ip_and_per_user_per_minute_are_limited_with_450() {
    let mut setup = stranger_setup();
    setup.set("limits", "messages_per_ip_per_minute", "2");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    for _ in 0..2 {
        assert!(c.cmd("MAIL FROM:<a@remote.test>").starts_with("250"));
        assert!(c.cmd("RSET").starts_with("250"));
    }
    assert_eq!(
        c.cmd("MAIL FROM:<a@remote.test>"),
        "450 4.7.1 Message rate limit exceeded, try again later\r\n"
    );
    assert!(g.wait_for_log("message rate limit reached for the address", Duration::from_secs(10)));

    // Per user: applies to authenticated users even from a trusted network.
    let mut setup = Setup::new();
    setup.users(&[("alice@example.test", "pw")]);
    setup.set("limits", "messages_per_user_per_minute", "1");
    let g = Gannet::start(&setup);
    let script = r#"
import smtplib, ssl, sys
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=30)
s.starttls(context=ctx)
s.login("alice@example.test", "pw")
for i in range(2):
    print(s.mail("alice@example.test"))
    s.rset()
"#;
    let out = common::python(script, &[&g.submission().port().to_string()]);
    assert!(out.contains("(250, b'2.1.0 Sender ok')"), "{out}");
    assert!(
        out.contains("(450, b'4.7.1 Message rate limit exceeded, try again later')"),
        "{out}"
    );
}

#[test]
fn recipients_per_connection_are_capped_with_452() {
    let mut setup = Setup::new();
    setup.set("limits", "recipients_max", "2");
    setup.set("limits", "recipients_per_session_max", "3");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    c.cmd("MAIL FROM:<a@l.test>");
    assert!(c.cmd("RCPT TO:<r1@remote.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<r2@remote.test>").starts_with("250"));
    assert!(c.cmd("RSET").starts_with("250"));
    c.cmd("MAIL FROM:<a@l.test>");
    assert!(c.cmd("RCPT TO:<r3@remote.test>").starts_with("250"));
    assert_eq!(
        c.cmd("RCPT TO:<r4@remote.test>"),
        "452 4.5.3 Too many recipients for this connection, send the rest in a new one\r\n"
    );
    // A new connection starts a new count.
    let mut d = Raw::connect(g.mx());
    d.hello();
    d.cmd("MAIL FROM:<a@l.test>");
    assert!(d.cmd("RCPT TO:<r4@remote.test>").starts_with("250"));
}

#[test]
fn a_client_that_keeps_erring_is_tarpitted() {
    let mut setup = Setup::new();
    setup.set("limits", "tarpit_after_errors", "1");
    setup.set("limits", "tarpit_delay", "\"300ms\"");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    assert!(c.cmd("BOGUS").starts_with("500 5.5.2"));
    let t1 = Instant::now();
    assert!(c.cmd("BOGUS").starts_with("500 5.5.2"));
    let t2 = Instant::now();
    assert!(c.cmd("BOGUS").starts_with("500 5.5.2"));
    // Lower bounds only: a slow machine can only make these longer.
    assert!(
        t2.elapsed() >= Duration::from_millis(600),
        "third error: {:?}",
        t2.elapsed()
    );
    assert!(t2 - t1 >= Duration::from_millis(300), "second error: {:?}", t2 - t1);
    assert!(c.cmd("NOOP").starts_with("250"));
}
