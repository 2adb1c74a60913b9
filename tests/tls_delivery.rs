//! Outbound STARTTLS against a receiver nobody here wrote the TLS of: Python's `ssl` module
//! (OpenSSL), with a certificate made by the `openssl` command.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use common::sink::CaptureSink;
use common::{free_port, Gannet, Setup};

const WAIT: Duration = Duration::from_secs(60);

/// A minimal SMTP receiver. Modes: "ok" (STARTTLS offered and working), "broken" (STARTTLS
/// offered, but the 220 is followed by junk and the connection dropped), "auth" (as "ok", and
/// AUTH PLAIN for relayuser/s3cret once encrypted). Prints "ready", then one
/// JSON line per message: the TLS version it came over (null in plaintext).
const TLS_SINK: &str = r#"
import base64, json, socket, ssl, sys, threading
port, cert, key, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.minimum_version = ssl.TLSVersion.TLSv1_2
ctx.load_cert_chain(cert, key)
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(16)
print("ready", flush=True)
def serve(conn):
    state = {"sock": conn, "file": conn.makefile("rb"), "tls": None, "auth": None}
    def send(b): state["sock"].sendall(b)
    send(b"220 tls-sink ESMTP\r\n")
    while True:
        line = state["file"].readline()
        if not line:
            return
        cmd = line.strip().upper()
        if cmd.startswith(b"EHLO"):
            ext = b"250-STARTTLS\r\n" if state["tls"] is None else b""
            if mode == "auth" and state["tls"] is not None:
                ext += b"250-AUTH LOGIN PLAIN\r\n"
            send(b"250-tls-sink\r\n" + ext + b"250 8BITMIME\r\n")
        elif cmd == b"STARTTLS":
            if mode == "broken":
                send(b"220 go ahead\r\nthis is not TLS\r\n")
                conn.close()
                return
            send(b"220 go ahead\r\n")
            tls = ctx.wrap_socket(conn, server_side=True)
            state.update(sock=tls, file=tls.makefile("rb"), tls=tls.version())
        elif cmd.startswith(b"AUTH PLAIN ") and state["tls"] is not None:
            _, user, password = base64.b64decode(line.split()[2]).split(b"\0")
            if (user, password) == (b"relayuser", b"s3cret"):
                state["auth"] = user.decode()
                send(b"235 2.7.0 ok\r\n")
            else:
                send(b"535 5.7.8 bad credentials\r\n")
        elif cmd == b"DATA":
            send(b"354 go\r\n")
            size = 0
            while True:
                l = state["file"].readline()
                if l == b".\r\n" or not l:
                    break
                size += len(l)
            print(json.dumps({"tls": state["tls"], "auth": state["auth"], "bytes": size}), flush=True)
            send(b"250 2.0.0 captured\r\n")
        elif cmd == b"QUIT":
            send(b"221 bye\r\n")
            return
        else:
            send(b"250 ok\r\n")
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

struct TlsSink {
    child: Child,
    lines: BufReader<ChildStdout>,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsSink {
    fn start(mode: &str) -> TlsSink {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        make_certificate(&cert, &key);
        let port = free_port();
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(TLS_SINK)
            .args([&port.to_string(), cert.to_str().unwrap(), key.to_str().unwrap(), mode])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        lines.read_line(&mut ready).unwrap();
        assert_eq!(ready.trim(), "ready");
        TlsSink {
            child,
            lines,
            port,
            _dir: dir,
        }
    }

    /// The next message's report (blocks until the sink prints it).
    fn next_message(&mut self) -> String {
        let mut line = String::new();
        self.lines.read_line(&mut line).unwrap();
        line
    }
}

impl Drop for TlsSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn make_certificate(cert: &Path, key: &Path) {
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=tls-sink.test",
        ])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

fn send(g: &Gannet) {
    common::send_message(
        g.mx(),
        "a@x.test",
        &["b@remote.test"],
        "Subject: secret\r\n\r\nover TLS\r\n",
    );
}

#[test]
fn starttls_is_used_when_offered() {
    let mut sink = TlsSink::start("ok");
    let mut setup = Setup::new();
    setup.route("*", format!("127.0.0.1:{}", sink.port).parse().unwrap());
    let g = Gannet::start(&setup);
    send(&g);
    let report = sink.next_message();
    assert!(report.contains("\"tls\": \"TLSv1.3\""), "{report}");
    assert!(g.wait_for_log("delivered: 250 2.0.0 captured", WAIT));
    assert!(g.log_text().contains("STARTTLS"), "{}", g.log_text());
}

#[test]
fn a_failed_handshake_falls_back_to_plaintext_when_opportunistic() {
    let mut sink = TlsSink::start("broken");
    let mut setup = Setup::new();
    setup.route("*", format!("127.0.0.1:{}", sink.port).parse().unwrap());
    let g = Gannet::start(&setup);
    send(&g);
    let report = sink.next_message();
    assert!(report.contains("\"tls\": null"), "{report}");
    // The log line comes through a pipe: wait for it rather than race the sink.
    assert!(g.wait_for_log("delivering without TLS", WAIT), "{}", g.log_text());
}

#[test]
fn a_route_that_requires_tls_never_sends_plaintext() {
    let sink = CaptureSink::start(); // offers no STARTTLS
    let mut setup = Setup::new();
    setup.raw(&format!(
        "[[route]]\ndomain = \"*\"\nsmarthost = \"{}\"\ntls_required = true\n",
        sink.addr
    ));
    let g = Gannet::start(&setup);
    send(&g);
    assert!(
        g.wait_for_log("does not offer STARTTLS, which this route requires", WAIT),
        "{}",
        g.log_text()
    );
    assert!(g.wait_for_log("deferred: ", WAIT));
    assert!(sink.captured().is_empty());
    assert_eq!(g.queued_ids().len(), 1);
}

#[test]
fn smarthost_credentials_go_only_over_tls() {
    let mut sink = TlsSink::start("auth");
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("smarthost.password");
    std::fs::write(&password_file, "s3cret\n").unwrap();
    let mut setup = Setup::new();
    setup.raw(&format!(
        "[[route]]\ndomain = \"*\"\nsmarthost = \"127.0.0.1:{}\"\nauth_user = \"relayuser\"\nauth_password_file = {:?}\n",
        sink.port,
        password_file.display().to_string()
    ));
    let g = Gannet::start(&setup);
    send(&g);
    let report = sink.next_message();
    assert!(
        report.contains("\"tls\": \"TLSv1.3\"") && report.contains("\"auth\": \"relayuser\""),
        "{report}"
    );
    // The same credentials towards a server without STARTTLS are never sent: the mail waits.
    let plain = CaptureSink::start();
    let mut setup = Setup::new();
    setup.raw(&format!(
        "[[route]]\ndomain = \"*\"\nsmarthost = \"{}\"\nauth_user = \"relayuser\"\nauth_password_file = {:?}\n",
        plain.addr,
        password_file.display().to_string()
    ));
    let g2 = Gannet::start(&setup);
    send(&g2);
    assert!(
        g2.wait_for_log("does not offer STARTTLS, which this route requires", WAIT),
        "{}",
        g2.log_text()
    );
    assert!(plain.captured().is_empty());
}
