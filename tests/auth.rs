//! SMTP AUTH against clients nobody here wrote: swaks (`--tls`, `--tlsc`), Python's smtplib
//! (`starttls` and `SMTP_SSL`) and lettre with rustls; refusals before TLS, throttling and
//! blocking after failures, the sender check, and the password file's reload on SIGHUP.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{password_line, python, tool, Gannet, Raw, Setup};

const WAIT: Duration = Duration::from_secs(30);
const USER: &str = "alice@example.test";
const PASSWORD: &str = "correct horse";

fn setup() -> Setup {
    let mut s = Setup::new();
    s.users(&[(USER, PASSWORD)]);
    s
}

fn swaks(args: &[&str]) -> std::process::Output {
    Command::new(tool("swaks"))
        .args(["--from", USER, "--to", "bob@remote.test", "--timeout", "30"])
        .args(["--auth-user", USER, "--auth-password", PASSWORD])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn swaks_starttls_and_implicit_tls_with_plain_and_login() {
    let g = Gannet::start(&setup());
    let submission = g.submission();
    let out = swaks(&[
        "--server",
        "127.0.0.1",
        "--port",
        &submission.port().to_string(),
        "--tls",
        "--auth",
        "PLAIN",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("235 2.7.0 Authentication successful"), "{text}");
    assert!(text.contains("250 2.0.0 Ok: queued as"), "{text}");

    let out = swaks(&[
        "--server",
        "127.0.0.1",
        "--port",
        &g.smtps().port().to_string(),
        "--tlsc",
        "--auth",
        "LOGIN",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("334 VXNlcm5hbWU6"), "LOGIN's challenges: {text}");
    assert!(text.contains("250 2.0.0 Ok: queued as"), "{text}");
    assert!(
        g.wait_for_log_count(&format!("user={USER}"), 2, WAIT),
        "{}",
        g.log_text()
    );
    assert_eq!(g.queued_ids().len(), 2);
}

const SMTPLIB: &str = r#"
import smtplib, ssl, sys
port, ssl_port, user, password = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
msg = "Subject: smtplib auth\r\n\r\nhello\r\n"
s = smtplib.SMTP("127.0.0.1", port, timeout=30)
s.ehlo("client.test")
print("auth before tls:", s.has_extn("auth"))
try:
    s.login(user, password)
    print("login without TLS worked")
except smtplib.SMTPNotSupportedError:
    print("login without TLS refused")
s.starttls(context=ctx)
s.ehlo("client.test")
print("auth after tls:", s.has_extn("auth"), s.esmtp_features.get("auth"))
print("login:", s.login(user, password))
print("refused:", s.sendmail(user, ["bob@remote.test"], msg))
s.quit()
s = smtplib.SMTP_SSL("127.0.0.1", ssl_port, context=ctx, timeout=30)
s.login(user, password)
print("ssl refused:", s.sendmail(user, ["carol@remote.test"], msg))
s.quit()
"#;

#[test]
fn smtplib_starttls_and_smtp_ssl_log_in_and_send() {
    let g = Gannet::start(&setup());
    let out = python(
        SMTPLIB,
        &[
            &g.submission().port().to_string(),
            &g.smtps().port().to_string(),
            USER,
            PASSWORD,
        ],
    );
    assert!(out.contains("auth before tls: False"), "{out}");
    assert!(out.contains("login without TLS refused"), "{out}");
    assert!(
        out.contains("auth after tls: True") && out.contains("PLAIN LOGIN"),
        "{out}"
    );
    assert!(
        out.contains("login: (235, b'2.7.0 Authentication successful')"),
        "{out}"
    );
    assert!(out.contains("refused: {}") && out.contains("ssl refused: {}"), "{out}");
    let ids = g.queued_ids();
    assert_eq!(ids.len(), 2);
    for id in ids {
        let stored = String::from_utf8(g.stored(&id)).unwrap();
        assert!(stored.contains("with ESMTPSA"), "{stored}");
    }
}

#[test]
fn lettre_with_rustls_on_submission_and_smtps() {
    use lettre::transport::smtp::authentication::{Credentials, Mechanism};
    use lettre::transport::smtp::client::{Tls, TlsParameters};
    use lettre::{Message, SmtpTransport, Transport};

    let g = Gannet::start(&setup());
    let tls = || {
        TlsParameters::builder("mx.test".into())
            .dangerous_accept_invalid_certs(true)
            .build_rustls()
            .unwrap()
    };
    let email = Message::builder()
        .from(USER.parse().unwrap())
        .to("bob@remote.test".parse().unwrap())
        .subject("lettre over TLS")
        .body(String::from("hello\r\n"))
        .unwrap();
    for (port, mode, mechanism) in [
        (g.submission().port(), Tls::Required(tls()), Mechanism::Plain),
        (g.smtps().port(), Tls::Wrapper(tls()), Mechanism::Login),
    ] {
        let transport = SmtpTransport::builder_dangerous("127.0.0.1")
            .port(port)
            .tls(mode)
            .credentials(Credentials::new(USER.into(), PASSWORD.into()))
            .authentication(vec![mechanism])
            .build();
        let response = transport.send(&email).expect("lettre send");
        assert_eq!(response.code().to_string(), "250");
    }
    assert_eq!(g.queued_ids().len(), 2);
}

#[test]
fn auth_before_tls_is_refused_and_submission_needs_auth() {
    let g = Gannet::start(&setup());
    let mut c = Raw::connect(g.submission());
    assert!(c.reply().unwrap().starts_with("220"));
    let ehlo = c.cmd("EHLO client.test");
    assert!(ehlo.contains("250-STARTTLS") && !ehlo.contains("AUTH"), "{ehlo}");
    assert_eq!(
        c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA=="),
        "538 5.7.11 Encryption required for requested authentication mechanism; use STARTTLS first\r\n"
    );
    assert_eq!(
        c.cmd("MAIL FROM:<alice@example.test>"),
        "530 5.7.0 Authentication required\r\n"
    );
    // mx offers no AUTH (not configured there), but accepts mail for local use as before.
    let mut m = Raw::connect(g.mx());
    assert!(m.reply().unwrap().starts_with("220"));
    assert!(!m.cmd("EHLO client.test").contains("AUTH"));
    assert_eq!(m.cmd("AUTH LOGIN"), "502 5.5.1 Command not implemented\r\n");
    assert!(g.queued_ids().is_empty());
}

/// Tries AUTH PLAIN over STARTTLS with smtplib; prints the result of each attempt and how long the
/// server took to answer it, then what a new connection is greeted with.
const WRONG_PASSWORDS: &str = r#"
import smtplib, ssl, sys, time
port, user, attempts, source = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
s = smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0))
s.starttls(context=ctx)
s.ehlo("client.test")
s.user, s.password = user, "wrong password"
for i in range(attempts):
    t0 = time.monotonic()
    try:
        # One mechanism per attempt (login() would try PLAIN, then LOGIN).
        s.auth("PLAIN", s.auth_plain)
        print("attempt", i, "accepted")
    except smtplib.SMTPAuthenticationError as e:
        print("attempt", i, e.smtp_code, e.smtp_error.decode(), "after %.3f" % (time.monotonic() - t0))
    except smtplib.SMTPServerDisconnected:
        print("attempt", i, "disconnected")
        break
try:
    s2 = smtplib.SMTP("127.0.0.1", port, timeout=60, source_address=(source, 0))
    print("new connection:", s2.ehlo())
except smtplib.SMTPConnectError as e:
    print("new connection refused:", e.smtp_code, e.smtp_error.decode())
except smtplib.SMTPServerDisconnected as e:
    print("new connection closed:", e)
"#;

#[test]
fn wrong_passwords_are_slowed_down_then_the_address_is_blocked() {
    let mut setup = setup();
    setup.set("auth", "failures_max", "3");
    setup.set("auth", "failure_delay", "\"200ms\"");
    setup.set("auth", "block_duration", "\"10m\"");
    setup.set("limits", "errors_max", "50");
    let g = Gannet::start(&setup);
    let port = g.submission().port().to_string();
    let out = python(WRONG_PASSWORDS, &[&port, USER, "5", "127.0.0.1"]);
    let attempts: Vec<&str> = out.lines().filter(|l| l.starts_with("attempt")).collect();
    assert_eq!(attempts.len(), 4, "three answers, then the connection is gone: {out}");
    // The delay doubles: at least 200 ms, then 400 ms (lower bounds only; the machine may be slow).
    for (line, floor) in attempts[..2].iter().zip([0.2, 0.4]) {
        assert!(line.contains("535 5.7.8 Authentication credentials invalid"), "{line}");
        let seconds: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(seconds >= floor, "{line}");
    }
    // The third failure blocks: 421, and the server closes the connection.
    assert!(
        attempts[2].contains("421 4.7.0 Too many authentication failures"),
        "{out}"
    );
    assert!(attempts[3].contains("disconnected"), "{out}");
    assert!(
        out.contains("new connection refused: 421 4.7.0 Too many authentication failures from your address"),
        "{out}"
    );
    assert!(g.wait_for_log("address blocked for 10m", WAIT), "{}", g.log_text());

    // Another address is not blocked, and an unknown user fails the same way as a wrong password.
    let other = python(WRONG_PASSWORDS, &[&port, "nobody@example.test", "1", "127.0.0.2"]);
    assert!(other.contains("attempt 0 535 5.7.8"), "{other}");
    assert!(other.contains("new connection: (250"), "{other}");
}

#[test]
fn the_sender_must_be_the_users_own_address_and_the_file_reloads_on_sighup() {
    let setup = setup();
    let g = Gannet::start(&setup);
    let send_as = |user: &str, password: &str, from: &str| {
        let out = swaks(&[
            "--server",
            "127.0.0.1",
            "--port",
            &g.submission().port().to_string(),
            "--tls",
            "--auth",
            "PLAIN",
            "--auth-user",
            user,
            "--auth-password",
            password,
            "--from",
            from,
        ]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let out = send_as(USER, PASSWORD, "mallory@example.test");
    assert!(
        out.contains("553 5.7.1 Sender address not owned by the authenticated user"),
        "{out}"
    );

    // A new user, with an extra address, appears after SIGHUP.
    let file = setup.files.path().join("users");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str(&password_line("bob", "hunter22", Some("bob@example.test,@bob.example")));
    std::fs::write(&file, text).unwrap();
    let started = Instant::now();
    g.signal(libc::SIGHUP);
    assert!(g.wait_for_log("reload: password file", WAIT), "{}", g.log_text());
    assert!(started.elapsed() < WAIT);
    let out = send_as("bob", "hunter22", "anything@bob.example");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");

    // A broken file keeps the users loaded before.
    std::fs::write(&file, "bob\n").unwrap();
    g.signal(libc::SIGHUP);
    assert!(
        g.wait_for_log("reload: password file unchanged", WAIT),
        "{}",
        g.log_text()
    );
    let out = send_as("bob", "hunter22", "bob@example.test");
    assert!(out.contains("250 2.0.0 Ok: queued as"), "{out}");
}
