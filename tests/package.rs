//! The Debian package: built by cargo-deb from the binary under test, installed with `dpkg -i` on
//! this machine, checked (files, owners, modes, the user, the conffile, the unit with
//! `systemd-analyze`), its binary run with the packaged configuration (ports moved) as root so
//! that it becomes `gannet`, then removed with `dpkg -r`, which leaves the spool, and purged.
//!
//! It changes the machine (a package, a system user): CI runs it as root on a throwaway host.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{free_port, python};

const WAIT: Duration = Duration::from_secs(30);
const SPOOL: &str = "/var/spool/gannet";

fn run(command: &mut Command) -> Output {
    let out = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// (uid, gid, home, shell) of a user, from getent.
fn passwd(user: &str) -> (u32, u32, String, String) {
    let out = run(Command::new("getent").args(["passwd", user]));
    let line = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = line.trim().split(':').collect();
    (
        fields[2].parse().unwrap(),
        fields[3].parse().unwrap(),
        fields[5].to_string(),
        fields[6].to_string(),
    )
}

/// Asserts a path's owner, group and permission bits.
fn assert_file(path: &str, uid: u32, gid: u32, mode: u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(
        (m.uid(), m.gid(), m.permissions().mode() & 0o7777),
        (uid, gid, mode),
        "{path}"
    );
}

/// Purges the package however the test ends, so that a failure leaves the machine as it was.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "gannet"]).output();
    }
}

#[test]
fn the_debian_package_installs_serves_as_gannet_and_removes_leaving_the_spool() {
    // SAFETY: geteuid has no arguments and cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "dpkg -i needs root (CI runs as root)");
    let _ = Command::new("dpkg").args(["--purge", "gannet"]).output();
    let dir = tempfile::tempdir().unwrap();
    let deb = dir.path().join("gannet.deb");
    // The binary under test (the dev profile's; cargo-deb warns that releases use --release).
    run(Command::new("cargo")
        .args(["deb", "--no-build", "--profile", "dev", "--strip", "--output"])
        .arg(&deb)
        .current_dir(env!("CARGO_MANIFEST_DIR")));
    let _purge = Purge;
    run(Command::new("dpkg").arg("-i").arg(&deb));

    // What it installed.
    let (uid, gid, home, shell) = passwd("gannet");
    assert!(uid < 1000, "a system user: uid {uid}");
    assert_eq!((home.as_str(), shell.as_str()), (SPOOL, "/usr/sbin/nologin"));
    assert_file("/usr/bin/gannet", 0, 0, 0o755);
    assert_file("/etc/gannet/gannet.toml", 0, gid, 0o640);
    assert_file(SPOOL, uid, gid, 0o750);
    assert_file("/usr/lib/systemd/system/gannet.service", 0, 0, 0o644);
    assert_file("/usr/lib/sysctl.d/90-gannet.conf", 0, 0, 0o644);
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f", "${Conffiles}", "gannet"]));
    assert!(String::from_utf8_lossy(&conffiles.stdout).contains("/etc/gannet/gannet.toml"));
    run(Command::new("/usr/bin/gannet").args(["check-config", "/etc/gannet/gannet.toml"]));

    // The unit: valid, and its sandbox scores as docs/service.md says.
    let unit = "/usr/lib/systemd/system/gannet.service";
    run(Command::new("systemd-analyze").args(["verify", unit]));
    let security = run(Command::new("systemd-analyze").args(["security", "--offline=true", unit]));
    let report = String::from_utf8_lossy(&security.stdout).to_string();
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for gannet.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{report}"));
    assert!(score <= 2.0, "exposure {score} (docs/service.md says 1.6):\n{report}");

    serve_with_the_packaged_configuration(dir.path(), uid, gid);

    // dpkg -r: the program goes; the spool (with the message queued above), the configuration
    // and the user stay.
    run(Command::new("dpkg").args(["-r", "gannet"]));
    assert!(!Path::new("/usr/bin/gannet").exists());
    assert!(
        Path::new("/etc/gannet/gannet.toml").exists(),
        "a conffile stays until purge"
    );
    assert!(Path::new(SPOOL).join("shard-0").is_dir(), "the spool stays");
    passwd("gannet");
    run(Command::new("dpkg").args(["--purge", "gannet"]));
    assert!(!Path::new(SPOOL).exists() && !Path::new("/etc/gannet/gannet.toml").exists());
}

/// Runs /usr/bin/gannet as root on /etc/gannet/gannet.toml with its ports moved to free ones on
/// loopback: it becomes gannet, keeps no capability, and spools a message into /var/spool/gannet.
fn serve_with_the_packaged_configuration(dir: &Path, uid: u32, gid: u32) {
    let packaged = std::fs::read_to_string("/etc/gannet/gannet.toml").unwrap();
    let mx = free_port();
    let mut text = packaged;
    for (from, to) in [
        ("\"0.0.0.0:25\"", format!("\"127.0.0.1:{mx}\"")),
        ("\"[::]:25\"", format!("\"[::1]:{}\"", free_port())),
        ("\"0.0.0.0:587\"", format!("\"127.0.0.1:{}\"", free_port())),
        ("\"[::]:587\"", format!("\"[::1]:{}\"", free_port())),
        ("\"0.0.0.0:465\"", format!("\"127.0.0.1:{}\"", free_port())),
        ("\"[::]:465\"", format!("\"[::1]:{}\"", free_port())),
    ] {
        assert!(text.contains(from), "the packaged configuration listens on {from}");
        text = text.replace(from, &to);
    }
    text.push_str(&format!("\n[admin]\naddress = \"127.0.0.1:{}\"\n", free_port()));
    let config = dir.join("ports-moved.toml");
    std::fs::write(&config, text).unwrap();

    let mut child = Command::new("/usr/bin/gannet")
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::stderr_lines(&mut child);
    let mut log = String::new();
    let ready = common::wait_for_line(&lines, "ready:", WAIT, &mut log);
    assert!(ready.is_some(), "not ready:\n{log}");
    // Every thread: the user, the group, no capability, no_new_privs.
    common::assert_unprivileged(child.id() as i32, uid, gid);

    python(
        r#"
import smtplib, sys
s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=20)
s.sendmail('me@example.org', ['you@example.com'], b'Subject: packaged\r\n\r\nhi\r\n')
s.quit()
"#,
        &[&mx.to_string()],
    );
    let segments: Vec<_> = std::fs::read_dir(Path::new(SPOOL).join("shard-0"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap())
        .collect();
    assert!(
        !segments.is_empty() && segments.iter().all(|m| m.uid() == uid),
        "the spool belongs to gannet"
    );
    // SAFETY: kill on the pid of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}
