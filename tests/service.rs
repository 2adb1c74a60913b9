//! Running as a system service: the readiness protocol a `Type=notify` unit waits for
//! (sd_notify(3), read here from a datagram socket as systemd would), `gannet reload`, the
//! embedded default's delivery by MX on a host without DNS, and a listener on IPv6 loopback.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::sink::CaptureSink;
use common::{python, Gannet, Setup, BIN};

const WAIT: Duration = Duration::from_secs(20);

fn next_notification(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification before the timeout");
    String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
}

#[test]
fn the_service_manager_hears_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let mut setup = Setup::new();
    setup.shards(2);
    setup.env.push(("NOTIFY_SOCKET".into(), path.display().to_string()));
    let mut g = Gannet::start(&setup);
    let ready = next_notification(&socket);
    assert!(
        ready.contains("READY=1") && ready.contains("STATUS=2 shards serving"),
        "{ready}"
    );
    // READY=1 comes once every shard serves: the listener answers now.
    let mut c = common::Raw::connect(g.mx());
    assert!(c.reply().unwrap().starts_with("220"));

    let out = g.command(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("pid {}", g.pid())));
    assert_eq!(next_notification(&socket), "RELOADING=1");
    assert!(next_notification(&socket).contains("READY=1"));
    assert!(g.wait_for_log("SIGHUP: reloading", WAIT));

    g.signal(libc::SIGTERM);
    assert_eq!(next_notification(&socket), "STOPPING=1");
    assert!(g.wait().success());
    // Nothing runs on the spool any more: reload says so and fails.
    let out = g.command(&["reload"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no gannet process runs on spool") && stderr.contains("nothing to reload"),
        "{stderr}"
    );
}

#[test]
fn the_embedded_default_delivers_by_mx_and_says_so_when_there_is_no_dns() {
    // README's run command on a host whose resolver does not answer: a network namespace with
    // only loopback, and a resolv.conf naming 127.0.0.1, where nothing listens on port 53.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("resolv.conf"), "nameserver 127.0.0.1\n").unwrap();
    let send = r#"
import smtplib, sys, time
for _ in range(200):
    try:
        s = smtplib.SMTP('127.0.0.1', 2525, timeout=10)
        break
    except OSError:
        time.sleep(0.05)
s.sendmail('me@example.org', ['you@example.com'], b'Subject: by MX\r\n\r\nhi\r\n')
s.quit()
"#;
    let script = format!(
        "ip link set lo up && mount --bind resolv.conf /etc/resolv.conf && \
         ({BIN} > gannet.log 2>&1 & echo $! > pid) && python3 -c \"$SEND\" && \
         for i in $(seq 200); do grep -q 'deferred: ' gannet.log && break; sleep 0.1; done; \
         kill -TERM $(cat pid); wait"
    );
    let out = Command::new("unshare")
        .args(["--mount", "--net", "sh", "-c", &script])
        .current_dir(dir.path())
        .env("SEND", send)
        .env("GANNET_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("unshare");
    let log = std::fs::read_to_string(dir.path().join("gannet.log")).unwrap_or_default();
    assert!(out.status.success(), "{}\n{log}", String::from_utf8_lossy(&out.stderr));
    let deferred = log
        .lines()
        .find(|l| l.contains("deferred: "))
        .unwrap_or_else(|| panic!("no deferral in the log:\n{log}"));
    assert!(deferred.contains("you@example.com"), "{deferred}");
    // The reason says what failed and where: "451 4.4.3 cannot look up MX of example.com:
    // 127.0.0.1:53: timed out".
    assert!(
        deferred.contains("451 4.4.3 cannot look up MX of example.com: 127.0.0.1:53"),
        "{deferred}"
    );
    assert!(!log.contains("no route"), "{log}");
}

#[test]
fn a_listener_on_ipv6_loopback_serves_a_real_client() {
    let sink = CaptureSink::start();
    let mut setup = Setup::new();
    setup.route("*", sink.addr);
    let port = common::free_port();
    setup.raw(&format!("[[listener]]\naddress = \"[::1]:{port}\"\nkind = \"mx\"\n"));
    let g = Gannet::start(&setup);
    assert!(g.wait_for_log(&format!("[::1]:{port} (mx)"), WAIT), "{}", g.log_text());
    // Python's smtplib over IPv6; ::1 is in the default trusted networks.
    python(
        r#"
import smtplib, sys
s = smtplib.SMTP('::1', int(sys.argv[1]), timeout=10)
s.sendmail('me@example.org', ['you@remote.test'], b'Subject: over IPv6\r\n\r\nhi\r\n')
s.quit()
"#,
        &[&port.to_string()],
    );
    let got = sink.wait_for(1, WAIT);
    let text = String::from_utf8_lossy(&got[0].content);
    assert!(text.contains("Subject: over IPv6"), "{text}");
    assert!(
        text.contains("[IPv6:::1]") || text.contains("::1"),
        "the Received header names the client: {text}"
    );
}
