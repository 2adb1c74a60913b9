//! Real SMTP clients that nobody here wrote, against the real binary: lettre, Python's smtplib,
//! swaks and Postfix's smtp-source.

mod common;

use std::process::Command;

use common::{python, python_bytes, tool, without_received, Gannet, Setup};

#[test]
fn lettre_sends_a_message_that_lands_in_the_spool() {
    use lettre::message::header::ContentType;
    use lettre::{Message, SmtpTransport, Transport};

    let g = Gannet::start(&Setup::new());
    let email = Message::builder()
        .from("Sender <sender@client.test>".parse().unwrap())
        .to("Rcpt <rcpt@remote.test>".parse().unwrap())
        .subject("lettre test")
        .header(ContentType::TEXT_PLAIN)
        .body(String::from(".leading dot\r\nsecond line\r\n"))
        .unwrap();
    let transport = SmtpTransport::builder_dangerous("127.0.0.1")
        .port(g.mx().port())
        .build();
    let response = transport.send(&email).expect("lettre send");
    assert_eq!(response.code().to_string(), "250");
    let text = response.message().collect::<Vec<_>>().join(" ");
    let id = common::queued_id(&text).unwrap_or_else(|| panic!("no id in {text:?}"));
    assert_eq!(g.queued_ids(), vec![id.clone()]);
    let stored = g.stored(&id);
    let content = String::from_utf8_lossy(without_received(&stored)).to_string();
    assert!(content.contains("Subject: lettre test\r\n"), "{content}");
    assert!(content.contains("\r\n.leading dot\r\nsecond line\r\n"), "{content}");
    let envelope = String::from_utf8(g.command(&["queue", "show", &id, "--envelope"]).stdout).unwrap();
    assert!(envelope.contains("sender: <sender@client.test>"), "{envelope}");
    assert!(envelope.contains("recipient: <rcpt@remote.test>"), "{envelope}");
}

const SMTPLIB_EXACT: &str = r#"
import smtplib, sys
port = int(sys.argv[1])
# Dot lines, 8-bit bytes, a line of only a dot, and a long line: smtplib stuffs them itself.
body = (b"Subject: exact\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        b".\r\n..two dots\r\n.x\r\ncaf\xc3\xa9 \xff\xfe\r\n" + b"y" * 900 + b"\r\nend\r\n")
s = smtplib.SMTP("127.0.0.1", port)
code, _ = s.ehlo("py.test")
assert code == 250
assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("smtputf8")
assert s.has_extn("chunking") and s.has_extn("dsn") and s.has_extn("enhancedstatuscodes")
assert int(s.esmtp_features["size"]) == 1048576
s.mail("from@py.test", ["BODY=8BITMIME"])
s.rcpt("to@remote.test")
code, msg = s.data(body)
assert code == 250, (code, msg)
sys.stdout.write(msg.decode().split("queued as ")[1] + "\n")
sys.stdout.buffer.write(body)
s.quit()
"#;

#[test]
fn smtplib_bytes_are_preserved_exactly() {
    let g = Gannet::start(&Setup::new());
    let out = python_bytes(SMTPLIB_EXACT, &[&g.mx().port().to_string()]);
    let newline = out.iter().position(|&b| b == b'\n').unwrap();
    let id = std::str::from_utf8(&out[..newline]).unwrap();
    let sent = &out[newline + 1..];
    let stored = g.stored(id);
    assert_eq!(without_received(&stored), sent);
}

const SMTPLIB_UTF8: &str = r#"
import smtplib, sys
port = int(sys.argv[1])
s = smtplib.SMTP("127.0.0.1", port)
s.ehlo("py.test")
body = "Subject: utf8\r\n\r\nПривет\r\n".encode()
refused = s.sendmail("用户@例子.test", ["δοκιμή@παράδειγμα.test", "plain@remote.test"], body,
                     mail_options=["SMTPUTF8", "BODY=8BITMIME"])
assert refused == {}, refused
# Without SMTPUTF8 a non-ASCII sender is refused with 553 5.6.7.
code, msg = s.docmd("MAIL FROM:<用户@例子.test>")
print(code, msg.decode())
s.quit()
"#;

#[test]
fn smtplib_sends_smtputf8_addresses_only_with_the_parameter() {
    let g = Gannet::start(&Setup::new());
    let out = python(SMTPLIB_UTF8, &[&g.mx().port().to_string()]);
    assert!(out.starts_with("553 5.6.7 "), "{out}");
    let ids = g.queued_ids();
    assert_eq!(ids.len(), 1);
    let envelope = String::from_utf8(g.command(&["queue", "show", &ids[0], "--envelope"]).stdout).unwrap();
    assert!(envelope.contains("sender: <用户@例子.test>"), "{envelope}");
    assert!(envelope.contains("recipient: <δοκιμή@παράδειγμα.test>"), "{envelope}");
    assert!(envelope.contains("smtputf8: true"), "{envelope}");
    let stored = g.stored(&ids[0]);
    assert!(
        String::from_utf8_lossy(&stored).contains("with UTF8SMTP"),
        "Received records the protocol"
    );
}

const SMTPLIB_SIZE: &str = r#"
import smtplib, sys
port = int(sys.argv[1])
s = smtplib.SMTP("127.0.0.1", port)
s.ehlo("py.test")
big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 1100
try:
    s.sendmail("a@py.test", ["b@remote.test"], big)
    print("accepted")
except smtplib.SMTPSenderRefused as e:
    # smtplib announces SIZE= itself; the server refuses at MAIL.
    print(e.smtp_code, e.smtp_error.decode())
# Lie about the size: the body is refused after its end, and nothing is spooled.
s.docmd("MAIL FROM:<a@py.test> SIZE=10")
s.docmd("RCPT TO:<b@remote.test>")
code, msg = s.data(big)
print(code, msg.decode())
code, msg = s.noop()
print(code, msg.decode())
s.quit()
"#;

#[test]
fn smtplib_oversized_messages_are_refused_with_552() {
    let g = Gannet::start(&Setup::new());
    let out = python(SMTPLIB_SIZE, &[&g.mx().port().to_string()]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "552 5.3.4 Message size exceeds fixed maximum message size");
    assert_eq!(lines[1], "552 5.3.4 Message size exceeds fixed maximum message size");
    assert_eq!(lines[2], "250 2.0.0 Ok", "the session stays usable");
    assert!(g.queued_ids().is_empty());
}

#[test]
fn swaks_pipelines_a_transaction() {
    let g = Gannet::start(&Setup::new());
    let out = Command::new(tool("swaks"))
        .args([
            "--server",
            &g.mx().to_string(),
            "--pipeline",
            "--from",
            "s@swaks.test",
            "--to",
            "a@remote.test,b@remote.test",
        ])
        .args(["--helo", "swaks.test", "--body", "line one\n.\n..two\nlast"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("PIPELINING"), "{text}");
    let id = text
        .lines()
        .find_map(|l| l.split("queued as ").nth(1))
        .expect("queued as")
        .trim()
        .to_string();
    let stored = g.stored(&id);
    let content = String::from_utf8_lossy(without_received(&stored)).to_string();
    // swaks turns the body's newlines into CRLF and stuffs the dots; we store them unstuffed.
    assert!(
        content.contains("\r\n\r\nline one\r\n.\r\n..two\r\nlast\r\n"),
        "{content:?}"
    );
    let envelope = String::from_utf8(g.command(&["queue", "show", &id, "--envelope"]).stdout).unwrap();
    assert!(
        envelope.contains("recipient: <a@remote.test>\nrecipient: <b@remote.test>"),
        "{envelope}"
    );
}

#[test]
fn swaks_reports_relay_refusal_for_strangers() {
    let mut setup = Setup::new();
    setup.set("relay", "trusted_networks", "[\"127.0.0.1/32\"]");
    setup.set("relay", "local_domains", "[\"local.test\"]");
    let g = Gannet::start(&setup);
    let out = Command::new(tool("swaks"))
        .args(["--server", &g.mx().to_string(), "--local-interface", "127.0.0.2"])
        .args(["--from", "s@swaks.test", "--to", "victim@elsewhere.test"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("554 5.7.1 Relay access denied"), "{text}");
    // The same stranger may send to a local domain.
    let out = Command::new(tool("swaks"))
        .args(["--server", &g.mx().to_string(), "--local-interface", "127.0.0.2"])
        .args(["--from", "s@swaks.test", "--to", "user@local.test"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(g.queued_ids().len(), 1);
}

#[test]
fn smtp_source_messages_are_all_spooled() {
    let g = Gannet::start(Setup::new().shards(2));
    let out = Command::new(tool("smtp-source"))
        .args([
            "-s",
            "10",
            "-m",
            "200",
            "-l",
            "2048",
            "-f",
            "a@source.test",
            "-t",
            "b@remote.test",
        ])
        .arg(g.mx().to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(g.queued_ids().len(), 200);
}
