//! Running as a system service: the readiness protocol a `Type=notify` unit waits for
//! (sd_notify(3), read here from a datagram socket as systemd would), `gannet reload`, the
//! embedded default's delivery by MX on a host without DNS, and a listener on IPv6 loopback.

mod common;

use std::os::unix::fs::PermissionsExt;
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

fn nobody() -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, "nobody"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().parse::<u32>().unwrap()
    };
    (id("-u"), id("-g"))
}

#[test]
fn started_as_root_it_binds_then_serves_as_server_user_with_no_capabilities() {
    // SAFETY: geteuid has no arguments and cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test starts gannet as root (CI runs as root)"
    );
    let (uid, gid) = nobody();
    let sink = CaptureSink::start();
    let mut setup = Setup::new();
    setup.route("*", sink.addr).set("server", "user", "\"nobody\"");
    // The user must be able to reach its spool: the test's directory is 0700 until opened up.
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let g = Gannet::start_in(&setup, dir);
    assert!(g.wait_for_log("running as user nobody", WAIT), "{}", g.log_text());
    common::assert_unprivileged(g.pid(), uid, gid);

    // It still writes its spool and delivers.
    common::send_message(
        g.mx(),
        "me@example.org",
        &["you@remote.test"],
        "Subject: dropped\r\n\r\nhi\r\n",
    );
    assert_eq!(sink.wait_for(1, WAIT).len(), 1);
    for entry in std::fs::read_dir(&g.spool_dir).unwrap() {
        let entry = entry.unwrap();
        let owner = std::os::unix::fs::MetadataExt::uid(&entry.metadata().unwrap());
        assert_eq!(owner, uid, "{} belongs to nobody", entry.path().display());
    }
}

#[test]
fn started_as_root_without_server_user_it_refuses_to_serve() {
    // SAFETY: geteuid has no arguments and cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test starts gannet as root (CI runs as root)"
    );
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new();
    let text = setup.toml(&dir.path().join("spool")).replace("user = \"root\"\n", "");
    assert!(!text.contains("user ="));
    let config = dir.path().join("gannet.toml");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(BIN).arg("--config").arg(&config).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve as root") && stderr.contains("server.user = \"root\""),
        "{stderr}"
    );
    assert!(!dir.path().join("spool").join("shard-0").exists(), "nothing was served");
}

#[test]
fn started_unprivileged_with_cap_net_bind_service_it_binds_port_25_then_clears_it() {
    // As systemd starts the packaged unit: User=nobody-like, AmbientCapabilities=CAP_NET_BIND_SERVICE;
    // in a network namespace of its own, so port 25 is free.
    let (uid, gid) = nobody();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    std::os::unix::fs::chown(&spool, Some(uid), Some(gid)).unwrap();
    let mut setup = Setup::new();
    setup.set("server", "user", "\"nobody\"");
    let text = setup
        .toml(&spool)
        .replace(&format!("127.0.0.1:{}", setup.mx_port), "127.0.0.1:25");
    let config = dir.path().join("gannet.toml");
    std::fs::write(&config, text).unwrap();
    let script = format!(
        "ip link set lo up && exec setpriv --reuid={uid} --regid={gid} --clear-groups \
         --inh-caps=+net_bind_service --ambient-caps=+net_bind_service {BIN} --config {}",
        config.display()
    );
    let mut child = Command::new("unshare")
        .args(["--net", "sh", "-c", &script])
        .env("GANNET_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::stderr_lines(&mut child);
    let mut log = String::new();
    let ready = common::wait_for_line(&lines, "ready:", WAIT, &mut log).is_some();
    let pid = child.id() as i32;
    let checked = std::panic::catch_unwind(|| {
        assert!(ready && log.contains("127.0.0.1:25 (mx)"), "{log}");
        common::assert_unprivileged(pid, uid, gid);
    });
    // SAFETY: kill on the pid of our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = child.wait();
    if let Err(e) = checked {
        std::panic::resume_unwind(e);
    }
}
