//! DKIM signing (RFC 6376, RFC 8463) checked by implementations nobody here wrote: dkimpy
//! (PyPI) and OpenDKIM's `opendkim-testmsg`, each reading the public keys that
//! `gannet dkim keygen` printed from a DNS server of the tests' own.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::dns::DnsServer;
use common::sink::CaptureSink;
use common::{python, send_message, Gannet, Raw, Setup};

const WAIT: Duration = Duration::from_secs(20);

/// A key made by `gannet dkim keygen`, and the TXT record it printed.
struct Key {
    path: std::path::PathBuf,
    record_name: String,
    record_value: String,
}

fn keygen(dir: &std::path::Path, domain: &str, selector: &str, algorithm: &str) -> Key {
    let path = dir.join(format!("{selector}.{domain}.key"));
    let out = Command::new(env!("CARGO_BIN_EXE_gannet"))
        .args(["dkim", "keygen", "--domain", domain, "--selector", selector])
        .args(["--algorithm", algorithm, "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains(" IN TXT "))
        .expect("a TXT record line");
    let (name, value) = line.split_once(" IN TXT ").unwrap();
    // The value is printed as quoted strings of at most 255 bytes each.
    let record_value: String = value.split('"').skip(1).step_by(2).collect();
    assert!(record_value.starts_with("v=DKIM1; k="), "{record_value}");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the key is readable by its owner only");
    Key {
        path,
        record_name: name.trim_end_matches('.').to_string(),
        record_value,
    }
}

fn dkim_entry(domain: &str, selector: &str, key: &Key, extra: &str) -> String {
    format!(
        "[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nkey = {:?}\n{extra}\n",
        key.path.display().to_string()
    )
}

/// dkimpy's verdict on each DKIM-Signature of `message`, top first, with the keys in `keys`.
fn dkimpy_verify(message: &[u8], keys: &[&Key]) -> Vec<bool> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("message.eml");
    std::fs::write(&file, message).unwrap();
    let records: Vec<String> = keys
        .iter()
        .map(|k| format!("{:?}: {:?}", k.record_name, k.record_value))
        .collect();
    let script = r#"
import json, sys, dkim
records = json.loads(sys.argv[1])
message = open(sys.argv[2], 'rb').read()
def dns(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    value = records.get(name.rstrip('.'))
    return value.encode() if value else None
d = dkim.DKIM(message)
count = sum(1 for h in d.headers if h[0].lower() == b'dkim-signature')
def verify(i):
    try:
        return bool(d.verify(idx=i, dnsfunc=dns))
    except dkim.ValidationError:
        return False
print(json.dumps([verify(i) for i in range(count)]))
"#;
    let out = python(
        script,
        &[&format!("{{{}}}", records.join(", ")), file.to_str().unwrap()],
    );
    out.trim()
        .trim_matches(|c| c == '[' || c == ']')
        .split(", ")
        .filter(|s| !s.is_empty())
        .map(|s| s == "true")
        .collect()
}

/// OpenDKIM's verdict: `opendkim-testmsg` verifies every signature and exits 0 with no output
/// when they all pass. It reads keys from the DNS of /etc/resolv.conf, so it runs in a mount
/// namespace whose resolv.conf names a test DNS server on port 53 of `dns_ip`.
fn opendkim_verify(message: &[u8], dns_ip: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {dns_ip}\noptions attempts:1 timeout:2\n")).unwrap();
    let file = dir.path().join("message.eml");
    std::fs::write(&file, message).unwrap();
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec /usr/sbin/opendkim-testmsg < {}",
        resolv.display(),
        file.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()
        .expect("unshare");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && text.trim().is_empty(), text)
}

fn signature_fields(content: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(content);
    let head = text.split("\r\n\r\n").next().unwrap().to_string();
    let mut fields: Vec<String> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some(last) = fields.last_mut() {
                last.push_str(line);
            }
        } else {
            fields.push(line.to_string());
        }
    }
    fields
        .into_iter()
        .filter(|f| f.to_ascii_lowercase().starts_with("dkim-signature:"))
        .collect()
}

const MESSAGE: &str = "From: Alice <alice@example.com>\r\nTo: bob@dest.test\r\nSubject: signed\r\nDate: Wed, 02 Dec 2026 07:00:00 +0000\r\nMessage-ID: <1@example.com>\r\n\r\nHello Bob.\r\n..a line that starts with a dot\r\n";

#[test]
fn rsa_and_ed25519_signatures_verify_in_dkimpy_and_opendkim_and_tampering_fails() {
    let files = tempfile::tempdir().unwrap();
    let rsa = keygen(files.path(), "example.com", "rsa1", "rsa");
    let ed = keygen(files.path(), "example.com", "ed1", "ed25519");
    let sink = CaptureSink::start();
    let mut setup = Setup::new();
    setup.route("dest.test", sink.addr);
    setup.raw(&dkim_entry("example.com", "rsa1", &rsa, ""));
    setup.raw(&dkim_entry("Example.COM", "ed1", &ed, "expiry = \"7d\""));
    let g = Gannet::start(&setup);
    assert!(g.wait_for_log(
        "DKIM: signing mail from example.com with rsa1._domainkey.example.com",
        WAIT
    ));
    send_message(g.mx(), "alice@example.com", &["bob@dest.test"], MESSAGE);
    let got = sink.wait_for(1, WAIT);
    let content = &got[0].content;
    let fields = signature_fields(content);
    assert_eq!(fields.len(), 2, "{}", String::from_utf8_lossy(content));
    assert!(
        fields[0].contains("a=rsa-sha256") && fields[0].contains("s=rsa1"),
        "{}",
        fields[0]
    );
    assert!(
        fields[1].contains("a=ed25519-sha256") && fields[1].contains("x="),
        "{}",
        fields[1]
    );
    assert!(fields
        .iter()
        .all(|f| f.contains("d=example.com") && f.contains("c=relaxed/relaxed")));
    // From is oversigned: listed once more than it occurs.
    assert!(fields[0].replace(' ', "").to_ascii_lowercase().matches("from").count() >= 2);
    assert_eq!(dkimpy_verify(content, &[&rsa, &ed]), vec![true, true]);

    // The same message with one byte of its body changed fails both.
    let text = String::from_utf8(content.clone()).unwrap();
    let tampered = text.replace("Hello Bob.", "Hello Bub.");
    assert_eq!(dkimpy_verify(tampered.as_bytes(), &[&rsa, &ed]), vec![false, false]);

    let dns = DnsServer::start_on("127.0.0.53:53".parse::<SocketAddr>().unwrap());
    {
        let mut zone = dns.zone.lock().unwrap();
        zone.txt(&rsa.record_name, &rsa.record_value);
        zone.txt(&ed.record_name, &ed.record_value);
    }
    let (ok, why) = opendkim_verify(content, "127.0.0.53");
    assert!(ok, "opendkim-testmsg: {why}");
    let (ok, _) = opendkim_verify(tampered.as_bytes(), "127.0.0.53");
    assert!(!ok, "opendkim-testmsg passed a tampered message");

    let (status, metrics) = g.http("GET", "/metrics", None, &[]);
    assert_eq!(status, 200);
    assert!(
        metrics.contains("gannet_dkim_signatures_total{algorithm=\"rsa-sha256\",result=\"signed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("gannet_dkim_signatures_total{algorithm=\"ed25519-sha256\",result=\"signed\"} 1"));
    assert!(metrics.contains("gannet_dkim_sign_seconds_count 1"));
}

#[test]
fn a_deferred_message_sends_the_same_signature_after_retries_and_a_sigkill() {
    let files = tempfile::tempdir().unwrap();
    let rsa = keygen(files.path(), "example.com", "rsa1", "rsa");
    let sink = CaptureSink::start();
    sink.behaviour.defer_data.store(usize::MAX, Ordering::Release);
    let mut setup = Setup::new();
    setup.route("dest.test", sink.addr);
    setup.set("delivery", "retry_first", "\"1s\"");
    setup.set("delivery", "retry_max", "\"1s\"");
    setup.raw(&dkim_entry("example.com", "rsa1", &rsa, ""));
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let mut g = Gannet::start_in(&setup, dir.clone());
    let id = send_message(g.mx(), "alice@example.com", &["bob@dest.test"], MESSAGE);
    assert!(g.wait_for_log_count("deferred: 451 4.3.0", 2, WAIT), "{}", g.log_text());
    let stored = g.stored(&id);
    assert_eq!(
        signature_fields(&stored).len(),
        1,
        "{}",
        String::from_utf8_lossy(&stored)
    );
    g.kill();
    drop(g);
    let g = Gannet::start_in(&setup, dir);
    sink.behaviour.defer_data.store(0, Ordering::Release);
    let got = sink.wait_for(1, WAIT);
    // Byte for byte what was stored before the crash: signed once, at accept time.
    assert_eq!(got[0].content, stored);
    assert_eq!(dkimpy_verify(&got[0].content, &[&rsa]), vec![true]);
    assert!(g.wait_for_log("delivered: ", WAIT));
}

#[test]
fn strangers_are_not_signed_and_other_domains_get_the_fallback_key() {
    let files = tempfile::tempdir().unwrap();
    let own = keygen(files.path(), "example.com", "s1", "ed25519");
    let fallback = keygen(files.path(), "relay.example.net", "s1", "rsa");
    let sink = CaptureSink::start();
    let mut setup = Setup::new();
    setup.route("*", sink.addr);
    setup.set("relay", "trusted_networks", "[\"127.0.0.1/32\"]");
    setup.set("relay", "local_domains", "[\"inbound.test\"]");
    setup.raw(&dkim_entry("example.com", "s1", &own, ""));
    setup.raw(&dkim_entry("relay.example.net", "s1", &fallback, "fallback = true"));
    let g = Gannet::start(&setup);

    // A stranger (127.0.0.3, not trusted, not authenticated) sends to a local domain with a
    // From: we hold a key for: relayed as it came, unsigned.
    let mut c = Raw::connect_from(g.mx(), Some("127.0.0.3"));
    c.hello();
    assert!(c.cmd("MAIL FROM:<alice@example.com>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<postmaster@inbound.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(MESSAGE.as_bytes());
    assert!(c.cmd(".").starts_with("250"));
    assert!(g.wait_for_log("delivered: ", WAIT), "{}", g.log_text());
    let got = sink.wait_for(1, WAIT);
    assert!(signature_fields(&got[0].content).is_empty());

    // A trusted client's mail from a domain without a key of its own: the fallback signs.
    let other = MESSAGE.replace("alice@example.com", "carol@other.test");
    send_message(g.mx(), "carol@other.test", &["bob@dest.test"], &other);
    let got = sink.wait_for(2, WAIT);
    let fields = signature_fields(&got[1].content);
    assert_eq!(fields.len(), 1);
    assert!(fields[0].contains("d=relay.example.net"), "{}", fields[0]);
    assert_eq!(dkimpy_verify(&got[1].content, &[&fallback]), vec![true]);

    // A message without a From: address is relayed unsigned.
    send_message(
        g.mx(),
        "carol@other.test",
        &["bob@dest.test"],
        "Subject: no author\r\n\r\nx\r\n",
    );
    let got = sink.wait_for(3, WAIT);
    assert!(signature_fields(&got[2].content).is_empty());
}

#[test]
fn sighup_reloads_keys_and_a_broken_key_keeps_the_old_one() {
    let files = tempfile::tempdir().unwrap();
    let first = keygen(files.path(), "example.com", "s1", "rsa");
    let sink = CaptureSink::start();
    let mut setup = Setup::new();
    setup.route("dest.test", sink.addr);
    setup.raw(&dkim_entry("example.com", "s1", &first, ""));
    let g = Gannet::start(&setup);
    send_message(g.mx(), "alice@example.com", &["bob@dest.test"], MESSAGE);
    let got = sink.wait_for(1, WAIT);
    assert_eq!(dkimpy_verify(&got[0].content, &[&first]), vec![true]);

    // A new key in the same file: after SIGHUP, signatures verify with the new record only.
    let scratch = tempfile::tempdir().unwrap();
    let second = keygen(scratch.path(), "example.com", "s1", "ed25519");
    std::fs::copy(&second.path, &first.path).unwrap();
    g.signal(libc::SIGHUP);
    assert!(g.wait_for_log_count("DKIM: signing mail from example.com", 2, WAIT));
    send_message(g.mx(), "alice@example.com", &["bob@dest.test"], MESSAGE);
    let got = sink.wait_for(2, WAIT);
    assert!(signature_fields(&got[1].content)[0].contains("a=ed25519-sha256"));
    assert_eq!(dkimpy_verify(&got[1].content, &[&second]), vec![true]);
    assert_eq!(dkimpy_verify(&got[1].content, &[&first]), vec![false]);

    // A broken file: the reload says so and the loaded key goes on signing.
    std::fs::write(&first.path, "not a key\n").unwrap();
    g.signal(libc::SIGHUP);
    assert!(g.wait_for_log("reload: DKIM keys unchanged", WAIT), "{}", g.log_text());
    send_message(g.mx(), "alice@example.com", &["bob@dest.test"], MESSAGE);
    let got = sink.wait_for(3, WAIT);
    assert_eq!(dkimpy_verify(&got[2].content, &[&second]), vec![true]);
}

#[test]
fn unusable_keys_and_entries_are_refused_at_start_with_the_reason() {
    let files = tempfile::tempdir().unwrap();
    let short = files.path().join("short.key");
    let made = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:1024",
            "-out",
        ])
        .arg(&short)
        .output()
        .unwrap();
    assert!(made.status.success());
    let ed = keygen(files.path(), "example.com", "ed1", "ed25519");
    let cases = [
        (
            format!("key = {:?}", short.display().to_string()),
            "must have 2048 bits at least",
        ),
        ("key = \"/nonexistent/dkim.key\"".to_string(), "cannot read it"),
        (
            format!("key = {:?}\nalgorithm = \"rsa-sha256\"", ed.path.display().to_string()),
            "remove `algorithm` or give the right key",
        ),
        (
            format!("key = {:?}\nheaders = [\"Subject\"]", ed.path.display().to_string()),
            "must include \"From\"",
        ),
    ];
    for (entry, expected) in cases {
        let config = files.path().join("gannet.toml");
        std::fs::write(
            &config,
            format!("[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\n{entry}\n"),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_gannet"))
            .arg("check-config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{entry}: accepted");
        assert!(stderr.contains(expected), "{entry}: {stderr}");
        assert!(stderr.contains("gannet.toml"), "names the file: {stderr}");
    }
}

#[test]
fn messages_signed_together_each_carry_their_own_signature() {
    // Messages that end at the same moment go to the signer in one batch; each must come back
    // with the signature over its own bytes.
    let files = tempfile::tempdir().unwrap();
    let rsa = keygen(files.path(), "example.com", "rsa1", "rsa");
    let sink = CaptureSink::start();
    let mut setup = Setup::new();
    setup.route("dest.test", sink.addr);
    setup.raw(&dkim_entry("example.com", "rsa1", &rsa, ""));
    let g = Gannet::start(&setup);
    let mx = g.mx();
    let senders: Vec<_> = (0..40)
        .map(|i| {
            std::thread::spawn(move || {
                let body = MESSAGE.replace("Hello Bob.", &format!("Hello Bob, number {i}."));
                send_message(mx, "alice@example.com", &["bob@dest.test"], &body)
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    let got = sink.wait_for(40, WAIT);
    let mut numbers: Vec<usize> = Vec::new();
    for message in &got {
        assert_eq!(dkimpy_verify(&message.content, &[&rsa]), vec![true]);
        let text = String::from_utf8_lossy(&message.content);
        let n = text.split("number ").nth(1).unwrap().split('.').next().unwrap();
        numbers.push(n.parse().unwrap());
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (0..40).collect::<Vec<_>>());
    let (_, metrics) = g.http("GET", "/metrics", None, &[]);
    assert!(metrics.contains("gannet_dkim_signatures_total{algorithm=\"rsa-sha256\",result=\"signed\"} 40"));
}
