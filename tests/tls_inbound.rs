//! Inbound TLS against TLS clients nobody here wrote: `openssl s_client` (STARTTLS on 25/587,
//! implicit TLS on 465), Python's `ssl` module; certificates by SNI and their reload on SIGHUP.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{python, queued_id, Gannet, Raw, Setup};

const WAIT: Duration = Duration::from_secs(30);

/// Runs `openssl s_client` with `args`, feeding `input` lines (LF; `-crlf` makes them CRLF), and
/// returns what it printed (stdout and stderr).
fn s_client(args: &[&str], input: &str) -> String {
    let mut child = Command::new("timeout")
        .arg("30")
        .arg("openssl")
        .arg("s_client")
        .args(args)
        .args(["-crlf", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn plain_b64(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

const MESSAGE_LINES: &str = "RCPT TO:<b@remote.test>\nDATA\nSubject: over TLS\n\nencrypted\n.\nQUIT\n";

#[test]
fn openssl_starttls_on_mx_with_tls_1_3_and_1_2_is_recorded_in_received() {
    let g = Gannet::start(&Setup::new());
    let mx = g.mx().to_string();
    for (version_flag, version, cipher_prefix) in
        [("-tls1_3", "TLSv1.3", "TLS13_"), ("-tls1_2", "TLSv1.2", "TLS_ECDHE_")]
    {
        let out = s_client(
            &["-starttls", "smtp", "-connect", &mx, version_flag, "-quiet"],
            &format!("EHLO client.test\nMAIL FROM:<a@client.test>\n{MESSAGE_LINES}"),
        );
        let id = out
            .lines()
            .find_map(queued_id)
            .unwrap_or_else(|| panic!("not queued over {version}: {out}"));
        let stored = String::from_utf8(g.stored(&id)).unwrap();
        let expected = format!("with ESMTPS\r\n\t(using {version} with cipher {cipher_prefix}");
        assert!(stored.contains(&expected), "{expected:?} not in {stored}");
        assert!(stored.contains("\r\n\r\nencrypted\r\n"), "{stored}");
    }
    // Log lines come through a pipe: wait for them rather than race the spool.
    assert!(g.wait_for_log("TLS established", WAIT), "{}", g.log_text());
    assert!(
        g.wait_for_log("tls=TLSv1.2", WAIT),
        "the queued line records TLS: {}",
        g.log_text()
    );
}

#[test]
fn implicit_tls_on_smtps_needs_auth_before_mail() {
    let mut setup = Setup::new();
    setup.users(&[("alice@example.test", "secret")]);
    let g = Gannet::start(&setup);
    let out = s_client(
        &["-connect", &g.smtps().to_string(), "-quiet"],
        &format!(
            "EHLO client.test\nMAIL FROM:<alice@example.test>\nAUTH PLAIN {}\nMAIL FROM:<alice@example.test>\n{MESSAGE_LINES}",
            plain_b64("alice@example.test", "secret")
        ),
    );
    assert!(out.contains("220 mx.test ESMTP Gannet"), "{out}");
    assert!(out.contains("250-AUTH PLAIN LOGIN"), "{out}");
    assert!(!out.contains("STARTTLS"), "no STARTTLS inside implicit TLS: {out}");
    assert!(out.contains("530 5.7.0 Authentication required"), "{out}");
    assert!(out.contains("235 2.7.0 Authentication successful"), "{out}");
    let id = out.lines().find_map(queued_id).unwrap_or_else(|| panic!("{out}"));
    let stored = String::from_utf8(g.stored(&id)).unwrap();
    assert!(stored.contains("with ESMTPSA\r\n\t(using TLSv1.3"), "{stored}");
}

#[test]
fn tls_1_0_and_1_1_are_refused() {
    let g = Gannet::start(&Setup::new());
    let smtps = g.smtps().to_string();
    let mx = g.mx().to_string();
    for flag in ["-tls1", "-tls1_1"] {
        // SECLEVEL=0 lets this OpenSSL offer the old versions at all; the server must refuse.
        for target in [vec!["-connect", &smtps], vec!["-starttls", "smtp", "-connect", &mx]] {
            let mut args = target.clone();
            args.extend([flag, "-cipher", "DEFAULT@SECLEVEL=0"]);
            let out = s_client(&args, "");
            assert!(
                out.contains("alert handshake failure"),
                "{flag} {target:?} was not refused: {out}"
            );
            assert!(!out.contains("Cipher is ") || out.contains("Cipher is (NONE)"), "{out}");
        }
    }
    assert!(
        g.wait_for_log_count("TLS handshake failed: peer is incompatible", 4, WAIT),
        "{}",
        g.log_text()
    );
}

/// CVE-2011-0411: commands pipelined behind STARTTLS in the same packet must not run inside the
/// TLS session. The client sends `STARTTLS\r\nRSET\r\n` in one write; after the handshake its
/// first command's reply must be the first reply it gets.
const INJECTION: &str = r#"
import socket, ssl, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
f = s.makefile("rb")
def reply():
    lines = []
    while True:
        line = f.readline()
        lines.append(line.decode())
        if len(line) < 4 or line[3:4] != b"-":
            return "".join(lines)
print(reply(), end="")
s.sendall(b"EHLO injector.test\r\n")
print(reply(), end="")
s.sendall(b"STARTTLS\r\nRSET\r\n")
print(reply(), end="")
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(s)
t.sendall(b"NOOP\r\n")
tf = t.makefile("rb")
print("AFTER:" + tf.readline().decode(), end="")
t.sendall(b"QUIT\r\n")
print("AFTER:" + tf.readline().decode(), end="")
"#;

#[test]
fn commands_pipelined_after_starttls_are_discarded() {
    let g = Gannet::start(&Setup::new());
    let out = python(INJECTION, &[&g.mx().port().to_string()]);
    assert!(out.contains("250-STARTTLS"), "{out}");
    assert!(out.contains("220 2.0.0 Ready to start TLS\r\n"), "{out}");
    let after: Vec<&str> = out.lines().filter(|l| l.starts_with("AFTER:")).collect();
    assert_eq!(
        after,
        ["AFTER:250 2.0.0 Ok", "AFTER:221 2.0.0 Bye"],
        "RSET must not run: {out}"
    );
    assert!(
        g.wait_for_log("discarded 6 byte(s) sent after STARTTLS", WAIT),
        "{}",
        g.log_text()
    );
}

#[test]
fn failed_and_stalled_handshakes_are_logged_and_closed() {
    let mut setup = Setup::new();
    setup.set("tls", "handshake_timeout", "\"1s\"");
    let g = Gannet::start(&setup);
    // Plaintext SMTP to the implicit-TLS port is not a ClientHello.
    let mut c = Raw::connect(g.smtps());
    c.send(b"EHLO plain.test\r\n");
    assert!(c.closed(), "the server closes the connection");
    assert!(
        g.wait_for_log("TLS handshake failed: received corrupt message", WAIT),
        "{}",
        g.log_text()
    );
    // A client that never starts the handshake is cut off after handshake_timeout.
    let mut silent = Raw::connect(g.smtps());
    assert!(silent.closed());
    assert!(
        g.wait_for_log("TLS handshake failed: timed out after 1s", WAIT),
        "{}",
        g.log_text()
    );
    // The same after STARTTLS.
    let mut c = Raw::connect(g.mx());
    c.hello();
    assert!(c.cmd("STARTTLS").starts_with("220 2.0.0"));
    assert!(c.closed());
    assert!(
        g.wait_for_log_count("TLS handshake failed: timed out after 1s", 2, WAIT),
        "{}",
        g.log_text()
    );
    let peer_logged = g
        .log_text()
        .lines()
        .any(|l| l.contains("TLS handshake failed") && l.contains("client=127.0.0.1:"));
    assert!(peer_logged, "{}", g.log_text());
}

/// Makes a self-signed certificate for `name` with the openssl command.
fn make_certificate(dir: &Path, stem: &str, name: &str) {
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
        ])
        .arg("-keyout")
        .arg(dir.join(format!("{stem}.key")))
        .arg("-out")
        .arg(dir.join(format!("{stem}.pem")))
        .args([
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            &format!("subjectAltName=DNS:{name}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

/// The subject and fingerprint of the certificate the server presents for `sni`.
fn presented(mx: &str, sni: Option<&str>) -> String {
    let mut args = vec!["-starttls", "smtp", "-connect", mx, "-showcerts"];
    if let Some(name) = sni {
        args.extend(["-servername", name]);
    }
    let out = s_client(&args, "QUIT\n");
    let pem: String = {
        let start = out
            .find("-----BEGIN CERTIFICATE-----")
            .unwrap_or_else(|| panic!("{out}"));
        let end = out.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
        out[start..end].to_string()
    };
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-fingerprint", "-sha256"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(pem.as_bytes()).unwrap();
    String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
}

/// Holds a STARTTLS session open across the reload: prints the EHLO reply's last line, waits
/// for a line on stdin, then sends NOOP and prints its reply.
const HELD_SESSION: &str = r#"
import socket, ssl, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
f = s.makefile("rb")
f.readline()
s.sendall(b"EHLO held.test\r\n")
while f.readline()[3:4] == b"-": pass
s.sendall(b"STARTTLS\r\n"); f.readline()
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
t = ctx.wrap_socket(s); tf = t.makefile("rb")
t.sendall(b"EHLO held.test\r\n")
while True:
    line = tf.readline()
    if line[3:4] != b"-": break
print("encrypted", flush=True)
sys.stdin.readline()
t.sendall(b"NOOP\r\n")
print(tf.readline().decode().strip(), flush=True)
"#;

#[test]
fn certificates_are_chosen_by_sni_and_reloaded_on_sighup_without_dropping_sessions() {
    let mut setup = Setup::new();
    let dir = setup.files.path().to_path_buf();
    make_certificate(&dir, "main", "mx.test");
    make_certificate(&dir, "other", "other.test");
    setup.raw(&format!(
        "[[tls.certificate]]\nchain = {:?}\nkey = {:?}\n\n[[tls.certificate]]\nchain = {:?}\nkey = {:?}\n",
        dir.join("main.pem").display().to_string(),
        dir.join("main.key").display().to_string(),
        dir.join("other.pem").display().to_string(),
        dir.join("other.key").display().to_string(),
    ));
    let g = Gannet::start(&setup);
    let mx = g.mx().to_string();
    assert!(presented(&mx, None).contains("CN = mx.test"));
    assert!(
        presented(&mx, Some("unknown.test")).contains("CN = mx.test"),
        "unknown names get the default"
    );
    let before = presented(&mx, Some("other.test"));
    assert!(before.contains("CN = other.test"), "{before}");

    let mut held = Command::new("python3")
        .arg("-c")
        .arg(HELD_SESSION)
        .arg(g.mx().port().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut held_out = BufReader::new(held.stdout.take().unwrap());
    let mut line = String::new();
    held_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "encrypted");

    // A broken file: the reload keeps the old certificates.
    std::fs::write(dir.join("other.pem"), "garbage").unwrap();
    g.signal(libc::SIGHUP);
    assert!(
        g.wait_for_log("reload: TLS certificates unchanged", WAIT),
        "{}",
        g.log_text()
    );
    assert_eq!(presented(&mx, Some("other.test")), before);

    // A new certificate for other.test: new handshakes get it.
    make_certificate(&dir, "other", "other.test");
    g.signal(libc::SIGHUP);
    assert!(g.wait_for_log("reload: TLS certificate:", WAIT), "{}", g.log_text());
    let after = presented(&mx, Some("other.test"));
    assert!(after.contains("CN = other.test"), "{after}");
    assert_ne!(after, before, "the fingerprint changed");

    // The session that was encrypted before both reloads still works.
    held.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    held_out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "250 2.0.0 Ok");
    assert!(held.wait().unwrap().success());
}

#[test]
fn the_self_signed_certificate_is_made_once_and_kept() {
    let setup = Setup::new();
    let g = Gannet::start(&setup);
    assert!(
        g.log_text().contains("generated a self-signed certificate for mx.test"),
        "{}",
        g.log_text()
    );
    let first = presented(&g.mx().to_string(), None);
    assert!(first.contains("CN = mx.test"), "{first}");
    let g = g.restart();
    assert!(
        g.log_text().contains("using the self-signed certificate at"),
        "{}",
        g.log_text()
    );
    assert_eq!(presented(&g.mx().to_string(), None), first);
}
