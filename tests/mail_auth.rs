//! Inbound mail authentication through the running server: messages signed by dkimpy verify
//! (and tampered ones fail), SPF and DMARC pass/fail/none from the tests' own DNS server end up
//! in the Authentication-Results header, a forged header claiming our authserv-id is renamed,
//! and under enforcement a DMARC p=reject failure gets 550 5.7.1 and a DNS failure 451 4.7.5.

mod common;

use std::process::Command;
use std::time::Duration;

use common::dns::DnsServer;
use common::sink::CaptureSink;
use common::{Gannet, Setup};

const WAIT: Duration = Duration::from_secs(20);

/// An RSA key for dkimpy (PKCS#1 PEM) and its DKIM TXT record value.
fn rsa_key(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let key = dir.join(format!("{name}.pem"));
    let out = Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&key)
        .arg("2048")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("openssl")
        .args(["rsa", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    use base64::Engine;
    let p = base64::engine::general_purpose::STANDARD.encode(out.stdout);
    (key, format!("v=DKIM1; k=rsa; p={p}"))
}

/// Sends `message` from `source` with MAIL FROM `mail_from` to bob@mx.test on `port`, signing
/// it first with dkimpy when `key` is given, `signatures` times (then `tamper` changes the body
/// after signing). Prints `accepted`, `refused CODE TEXT` (after the data) or `refused at MAIL
/// CODE TEXT`.
const SEND: &str = r#"
import smtplib, sys, dkim
port, source, mail_from, key, tamper = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
signatures = int(sys.argv[6])
message = sys.stdin.buffer.read()
if key != '-':
    signed = message
    for _ in range(signatures):
        sig = dkim.sign(message, b'sel', b'sender.example', open(key, 'rb').read(),
                        include_headers=[b'from', b'to', b'subject'])
        signed = sig + signed
    message = signed
if tamper == 'yes':
    message = message.replace(b'Hello Bob.', b'Hello Bub.')
s = smtplib.SMTP('127.0.0.1', port, source_address=(source, 0), local_hostname='mail.sender.example', timeout=30)
try:
    s.sendmail(mail_from, ['bob@mx.test'], message)
    print('accepted')
except smtplib.SMTPDataError as e:
    print('refused', e.smtp_code, e.smtp_error.decode())
except smtplib.SMTPSenderRefused as e:
    print('refused at MAIL', e.smtp_code, e.smtp_error.decode())
s.quit()
"#;

fn send(port: u16, mail_from: &str, key: Option<&std::path::Path>, tamper: bool, message: &str) -> String {
    send_signed(port, mail_from, key, 1, tamper, message)
}

fn send_signed(
    port: u16,
    mail_from: &str,
    key: Option<&std::path::Path>,
    signatures: usize,
    tamper: bool,
    message: &str,
) -> String {
    use std::io::Write;
    let key = key.map_or("-".to_string(), |k| k.display().to_string());
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(SEND)
        .args([
            port.to_string().as_str(),
            "127.0.0.2",
            mail_from,
            key.as_str(),
            if tamper { "yes" } else { "no" },
            signatures.to_string().as_str(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(message.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

const MESSAGE: &str =
    "From: Alice <alice@sender.example>\r\nTo: bob@mx.test\r\nSubject: verified\r\n\r\nHello Bob.\r\n";

/// The Authentication-Results header Gannet put on a delivered message, unfolded.
fn our_header(content: &[u8]) -> String {
    let text = String::from_utf8_lossy(content);
    let start = text
        .find("Authentication-Results: mx.test")
        .unwrap_or_else(|| panic!("no header in:\n{text}"));
    let rest = &text[start..];
    let mut header = String::new();
    for (i, line) in rest.split("\r\n").enumerate() {
        if i > 0 && !line.starts_with([' ', '\t']) {
            break;
        }
        header.push_str(line.trim());
        header.push(' ');
    }
    header
}

struct World {
    g: Gannet,
    sink: CaptureSink,
    dns: DnsServer,
    enforcing: u16,
    key: std::path::PathBuf,
    arc_key: std::path::PathBuf,
    _files: tempfile::TempDir,
}

fn world() -> World {
    world_with(|_, _| {})
}

/// A world whose configuration `extra` may add to (given the setup and the files directory).
fn world_with(extra: impl FnOnce(&mut Setup, &std::path::Path)) -> World {
    let files = tempfile::tempdir().unwrap();
    let (key, record) = rsa_key(files.path(), "sel");
    let (arc_key, arc_record) = rsa_key(files.path(), "arc");
    let dns = DnsServer::start();
    {
        let mut zone = dns.zone.lock().unwrap();
        zone.txt("sel._domainkey.sender.example", &record);
        zone.txt("arc._domainkey.forwarder.example", &arc_record);
        zone.txt("sender.example", "v=spf1 include:_spf.sender.example -all");
        zone.txt("_spf.sender.example", "v=spf1 ip4:127.0.0.2 -all");
        zone.txt("_dmarc.sender.example", "v=DMARC1; p=reject");
        zone.txt("bounces.example", "v=spf1 -all");
        zone.servfail.insert("_dmarc.flaky.example".into());
        zone.servfail.insert("spf-flaky.example".into());
        zone.txt("_dmarc.q.example", "v=DMARC1; p=quarantine");
    }
    let sink = CaptureSink::start();
    let enforcing = common::free_port();
    let mut setup = Setup::new();
    setup
        .route("mx.test", sink.addr)
        .set("relay", "trusted_networks", "[\"127.0.0.1/32\"]")
        .set("relay", "local_domains", "[\"mx.test\"]")
        .set("dns", "servers", &format!("[\"{}\"]", dns.addr))
        .raw(&format!(
            "[[listener]]\naddress = \"127.0.0.1:{enforcing}\"\nkind = \"mx\"\nmail_authentication = \"enforce\"\n"
        ));
    extra(&mut setup, files.path());
    let g = Gannet::start(&setup);
    World {
        g,
        sink,
        dns,
        enforcing,
        key,
        arc_key,
        _files: files,
    }
}

#[test]
fn verdicts_from_dkimpy_signatures_spf_and_dmarc_are_recorded() {
    let w = world();
    let mx = w.g.mx().port();
    // Signed by dkimpy, sent from the address SPF allows (through an include).
    assert_eq!(
        send(mx, "alice@sender.example", Some(&w.key), false, MESSAGE),
        "accepted"
    );
    // The same signature over a changed body, from an envelope domain whose SPF allows nobody.
    assert_eq!(
        send(mx, "bounce@bounces.example", Some(&w.key), true, MESSAGE),
        "accepted"
    );
    // Unsigned, from a domain with no SPF or DMARC at all.
    let unsigned = MESSAGE.replace("sender.example", "quiet.example");
    assert_eq!(send(mx, "carol@quiet.example", None, false, &unsigned), "accepted");

    let got = w.sink.wait_for(3, WAIT);
    let good = our_header(&got[0].content);
    for expected in [
        "dkim=pass",
        "header.i=@sender.example header.s=sel",
        "spf=pass",
        "smtp.mailfrom=alice@sender.example",
        "dmarc=pass header.from=sender.example policy.dmarc=reject",
    ] {
        assert!(good.contains(expected), "{expected} in {good}");
    }
    let bad = our_header(&got[1].content);
    // mail-auth names a body that no longer matches its hash "neutral" (RFC 8601 2.7.1 leaves
    // fail or neutral to the verifier); either way it is not a pass.
    for expected in [
        "dkim=neutral (body hash did not verify)",
        "spf=fail",
        "dmarc=fail header.from=sender.example policy.dmarc=reject",
    ] {
        assert!(bad.contains(expected), "{expected} in {bad}");
    }
    let none = our_header(&got[2].content);
    assert!(
        none.contains("spf=none") && !none.contains("dkim=pass") && !none.contains("dmarc=pass"),
        "{none}"
    );
    // Exactly one header of ours, on top of the message.
    let text = String::from_utf8_lossy(&got[0].content);
    assert!(text.starts_with("Authentication-Results: mx.test;"), "{text}");
    assert_eq!(text.matches("Authentication-Results:").count(), 1, "{text}");
    // Every lookup went to the tests' DNS server, through Gannet's resolver.
    assert!(!w
        .dns
        .asked("_spf.sender.example", hickory_proto::rr::RecordType::TXT)
        .is_empty());
    assert!(!w
        .dns
        .asked("sel._domainkey.sender.example", hickory_proto::rr::RecordType::TXT)
        .is_empty());
    let (_, metrics) = w.g.http("GET", "/metrics", None, &[]);
    assert!(
        metrics.contains("gannet_mail_authentication_total{method=\"dmarc\",result=\"pass\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("gannet_mail_authentication_total{method=\"dmarc\",result=\"fail\"} 1"));
}

#[test]
fn a_forged_header_claiming_our_authserv_id_is_renamed() {
    let w = world();
    let forged = format!("Authentication-Results: mx.test; dkim=pass header.d=bank.example\r\n{MESSAGE}");
    assert_eq!(
        send(w.g.mx().port(), "alice@sender.example", None, false, &forged),
        "accepted"
    );
    let got = w.sink.wait_for(1, WAIT);
    let text = String::from_utf8_lossy(&got[0].content);
    assert!(
        text.contains("X-Removed-Auth-Results: mx.test; dkim=pass header.d=bank.example"),
        "{text}"
    );
    assert_eq!(text.matches("Authentication-Results: mx.test").count(), 1, "{text}");
    assert!(!our_header(&got[0].content).contains("bank.example"));
}

#[test]
fn enforcement_refuses_dmarc_reject_failures_and_defers_on_dns_failure() {
    let w = world();
    // No DKIM, envelope domain with an SPF fail: DMARC fails under p=reject.
    let refused = send(w.enforcing, "bounce@bounces.example", None, false, MESSAGE);
    assert!(refused.starts_with("refused 550 5.7.1"), "{refused}");
    assert!(refused.contains("DMARC policy of sender.example"), "{refused}");
    // A DNS failure for the DMARC record: try again later.
    let flaky = MESSAGE.replace("sender.example", "flaky.example");
    let deferred = send(w.enforcing, "x@flaky.example", None, false, &flaky);
    assert!(deferred.starts_with("refused 451 4.7.5"), "{deferred}");
    // What passes is accepted, with its header.
    assert_eq!(
        send(w.enforcing, "alice@sender.example", Some(&w.key), false, MESSAGE),
        "accepted"
    );
    let got = w.sink.wait_for(1, WAIT);
    assert!(our_header(&got[0].content).contains("dmarc=pass"));
    assert_eq!(w.sink.captured().len(), 1, "the refused messages were not delivered");
    // The record-only listener takes the same failing message.
    assert_eq!(
        send(w.g.mx().port(), "bounce@bounces.example", None, false, MESSAGE),
        "accepted"
    );
}

/// Seals `message` as forwarder.example would (dkimpy's arc_sign over the forwarder's own
/// Authentication-Results), optionally changes its body afterwards, and sends it.
const SEAL_AND_SEND: &str = r#"
import smtplib, sys, dkim
port, key, tamper = int(sys.argv[1]), sys.argv[2], sys.argv[3]
message = (b'Authentication-Results: forwarder.example; spf=pass smtp.mailfrom=alice@sender.example\r\n'
           + sys.stdin.buffer.read())
seal = dkim.arc_sign(message, b'arc', b'forwarder.example', open(key, 'rb').read(), b'forwarder.example')
message = b''.join(seal) + message
if tamper == 'yes':
    message = message.replace(b'Hello Bob.', b'Hello Bub.')
s = smtplib.SMTP('127.0.0.1', port, source_address=('127.0.0.2', 0), local_hostname='relay.forwarder.example', timeout=30)
s.sendmail('list@forwarder.example', ['bob@mx.test'], message)
s.quit()
"#;

#[test]
fn an_arc_chain_sealed_by_dkimpy_verifies_and_a_broken_one_fails() {
    use std::io::Write;
    let w = world();
    for tamper in ["no", "yes"] {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(SEAL_AND_SEND)
            .args([
                w.g.mx().port().to_string().as_str(),
                &w.arc_key.display().to_string(),
                tamper,
            ])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(MESSAGE.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let got = w.sink.wait_for(2, WAIT);
    let sealed = our_header(&got[0].content);
    assert!(sealed.contains("arc=pass"), "{sealed}");
    let broken = our_header(&got[1].content);
    assert!(broken.contains("arc=fail"), "{broken}");
}

/// Verifies the ARC chain of `message` with dkimpy, the sealer's key record given for
/// `seal._domainkey.seal.example`; prints the chain's cv and dkimpy's reason.
const ARC_VERIFY: &str = r#"
import sys, dkim
record = sys.argv[1].encode()
def dns(name, timeout=5):
    return record if name == b'seal._domainkey.seal.example.' else None
cv, results, reason = dkim.arc_verify(sys.stdin.buffer.read(), dnsfunc=dns)
print(cv.decode(), reason)
"#;

#[test]
fn verified_mail_is_arc_sealed_and_dkimpy_verifies_the_seal() {
    use std::io::Write;
    let mut seal_record = String::new();
    let w = world_with(|setup, files| {
        let (key, record) = rsa_key(files, "seal");
        seal_record = record;
        setup.raw(&format!(
            "[mail_authentication.arc_seal]\ndomain = \"seal.example\"\nselector = \"seal\"\nkey = {:?}\n",
            key.display().to_string()
        ));
    });
    assert_eq!(
        send(w.g.mx().port(), "alice@sender.example", Some(&w.key), false, MESSAGE),
        "accepted"
    );
    let got = w.sink.wait_for(1, WAIT);
    let text = String::from_utf8_lossy(&got[0].content).to_string();
    assert!(
        text.starts_with("ARC-Seal: i=1;") && text.lines().next().unwrap().contains("cv=none"),
        "{text}"
    );
    assert!(text.contains("ARC-Authentication-Results: i=1; mx.test;"), "{text}");
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(ARC_VERIFY)
        .arg(&seal_record)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&got[0].content).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let verdict = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(verdict.starts_with("pass"), "dkimpy: {verdict}\n{text}");
}

#[test]
fn with_reject_spf_fail_the_sender_is_refused_at_mail_from() {
    let w = world_with(|s, _| {
        s.set("mail_authentication", "reject_spf_fail", "true");
    });
    // SPF fail: refused before any content is sent.
    let refused = send(w.enforcing, "bounce@bounces.example", None, false, MESSAGE);
    assert!(refused.starts_with("refused at MAIL 550 5.7.23"), "{refused}");
    assert!(refused.contains("SPF record of the sender's domain"), "{refused}");
    // The SPF record cannot be looked up: try later.
    let deferred = send(w.enforcing, "x@spf-flaky.example", None, false, MESSAGE);
    assert!(deferred.starts_with("refused at MAIL 451 4.7.24"), "{deferred}");
    // SPF pass: accepted, and the header reports the result found at MAIL FROM.
    assert_eq!(
        send(w.enforcing, "alice@sender.example", Some(&w.key), false, MESSAGE),
        "accepted"
    );
    let got = w.sink.wait_for(1, WAIT);
    let header = our_header(&got[0].content);
    assert!(
        header.contains("spf=pass") && header.contains("smtp.mailfrom=alice@sender.example"),
        "{header}"
    );
    assert!(header.contains("dmarc=pass"), "{header}");
    // The record-only listener refuses nothing: the failing sender's message is taken.
    assert_eq!(
        send(w.g.mx().port(), "bounce@bounces.example", None, false, MESSAGE),
        "accepted"
    );
    let got = w.sink.wait_for(2, WAIT);
    assert!(our_header(&got[1].content).contains("spf=fail"));
    assert_eq!(
        w.g.log_text().matches("sender refused by SPF").count(),
        2,
        "{}",
        w.g.log_text()
    );
    // SPF is counted once per transaction (at MAIL FROM), not again with the message.
    let (_, metrics) = w.g.http("GET", "/metrics", None, &[]);
    assert!(metrics.contains("reason=\"authentication\"} 2"), "{metrics}");
    for (result, count) in [("pass", 1), ("fail", 2), ("temperror", 1)] {
        let line = format!("gannet_mail_authentication_total{{method=\"spf\",result=\"{result}\"}} {count}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
}

#[test]
fn quarantine_failures_get_a_header_or_are_accepted_as_configured() {
    let quarantined = MESSAGE.replace("sender.example", "q.example");
    let w = world();
    assert_eq!(send(w.enforcing, "x@q.example", None, false, &quarantined), "accepted");
    let got = w.sink.wait_for(1, WAIT);
    let text = String::from_utf8_lossy(&got[0].content);
    assert!(
        text.contains("X-Gannet-Quarantine: DMARC failed and the policy of q.example is quarantine"),
        "{text}"
    );
    assert!(our_header(&got[0].content).contains("dmarc=fail header.from=q.example policy.dmarc=quarantine"));
    // The record-only listener adds no quarantine header.
    assert_eq!(
        send(w.g.mx().port(), "x@q.example", None, false, &quarantined),
        "accepted"
    );
    let got = w.sink.wait_for(2, WAIT);
    assert!(!String::from_utf8_lossy(&got[1].content).contains("X-Gannet-Quarantine"));

    let w = world_with(|s, _| {
        s.set("mail_authentication", "quarantine", "\"accept\"");
    });
    assert_eq!(send(w.enforcing, "x@q.example", None, false, &quarantined), "accepted");
    let got = w.sink.wait_for(1, WAIT);
    let text = String::from_utf8_lossy(&got[0].content);
    assert!(!text.contains("X-Gannet-Quarantine"), "{text}");
    assert!(our_header(&got[0].content).contains("dmarc=fail"));
}

#[test]
fn dkim_signatures_past_the_limit_are_not_verified() {
    let w = world_with(|s, _| {
        s.set("mail_authentication", "dkim_signatures_max", "3");
    });
    assert_eq!(
        send_signed(w.g.mx().port(), "alice@sender.example", Some(&w.key), 5, false, MESSAGE),
        "accepted"
    );
    let got = w.sink.wait_for(1, WAIT);
    let header = our_header(&got[0].content);
    assert_eq!(header.matches("dkim=pass").count(), 3, "{header}");
    assert!(
        header.contains("dkim=policy (not verified: 2 more DKIM signatures than the 3 checked per message)"),
        "{header}"
    );
    assert!(header.contains("dmarc=pass"), "{header}");
    let (_, metrics) = w.g.http("GET", "/metrics", None, &[]);
    assert!(
        metrics.contains("gannet_mail_authentication_total{method=\"dkim\",result=\"pass\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("gannet_mail_authentication_total{method=\"dkim\",result=\"policy\"} 1"));
}
