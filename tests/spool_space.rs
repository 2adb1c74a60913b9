//! A spool on a small file system of the test's own (a loop-mounted ext4 image, or tmpfs), filled
//! until the server answers `452`, then drained by delivery: every acknowledged message is
//! delivered once, and new mail is accepted again within seconds without a restart, and also
//! after a SIGKILL and restart on the full disk.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sink::CaptureSink;
use common::{free_port, Gannet, Raw, Setup};

const WAIT: Duration = Duration::from_secs(60);

/// A file system of `size_mib` mounted on a fresh directory, unmounted on drop.
struct SmallFs {
    mount: PathBuf,
    image: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    /// A loop-mounted ext4 image (like a real spool disk), else tmpfs; Err says why neither.
    fn mount(size_mib: u64) -> Result<SmallFs, String> {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        let image = dir.path().join("spool.img");
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(size_mib << 20).unwrap();
        drop(file);
        let ext4 = run("mkfs.ext4", &["-q", "-F", "-m", "0", image.to_str().unwrap()]).and_then(|()| {
            run(
                "mount",
                &["-o", "loop", image.to_str().unwrap(), mount.to_str().unwrap()],
            )
        });
        if ext4.is_ok() {
            return Ok(SmallFs {
                mount,
                image: Some(image),
                _dir: dir,
            });
        }
        let size = format!("size={size_mib}m");
        match run("mount", &["-t", "tmpfs", "-o", &size, "tmpfs", mount.to_str().unwrap()]) {
            Ok(()) => Ok(SmallFs {
                mount,
                image: None,
                _dir: dir,
            }),
            Err(tmpfs) => Err(format!("loop-mounted ext4: {}; tmpfs: {tmpfs}", ext4.unwrap_err())),
        }
    }

    fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", self.mount.to_str().unwrap()]);
        if let Some(image) = &self.image {
            let _ = std::fs::remove_file(image);
        }
    }
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A message of about 300 KiB whose body names `token`.
fn message(token: &str) -> String {
    let line = format!("{}\r\n", "p".repeat(998));
    format!("Subject: {token}\r\nX-Token: {token}\r\n\r\n{}", line.repeat(300))
}

/// Sends messages on one connection until one is refused; returns the tokens of those accepted
/// and the refusal.
fn fill(g: &Gannet, prefix: &str) -> (Vec<String>, String) {
    let mut c = Raw::connect(g.mx());
    c.hello();
    let mut accepted = Vec::new();
    for n in 0..1000 {
        let token = format!("{prefix}-{n}");
        assert!(c.cmd("MAIL FROM:<a@l.test>").starts_with("250"));
        assert!(c.cmd("RCPT TO:<b@remote.test>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(message(&token).as_bytes());
        let reply = c.cmd(".");
        if !reply.starts_with("250 ") {
            return (accepted, reply);
        }
        accepted.push(token);
    }
    panic!("the small spool never filled; log:\n{}", g.log_text());
}

/// Tries one message every 100 ms until one is accepted; panics after `WAIT`.
fn send_when_accepted(g: &Gannet, token: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut c = Raw::connect(g.mx());
        c.hello();
        c.cmd("MAIL FROM:<a@l.test>");
        c.cmd("RCPT TO:<b@remote.test>");
        c.cmd("DATA");
        c.send(message(token).as_bytes());
        let reply = c.cmd(".");
        if reply.starts_with("250 ") {
            return;
        }
        assert!(reply.starts_with("452 4.3.1"), "{reply}");
        assert!(
            Instant::now() < deadline,
            "still refused after {WAIT:?}; log:\n{}",
            g.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each token arrived exactly once.
fn assert_each_once(sink: &CaptureSink, tokens: &[String]) {
    let mut copies: HashMap<String, usize> = HashMap::new();
    for m in sink.captured() {
        // The token is in the second line of the client's header (after our Received).
        let head = String::from_utf8_lossy(&m.content[..m.content.len().min(4096)]).into_owned();
        if let Some(token) = head.split("\r\nX-Token: ").nth(1).and_then(|t| t.split("\r\n").next()) {
            *copies.entry(token.to_string()).or_default() += 1;
        }
    }
    for token in tokens {
        assert_eq!(
            copies.get(token),
            Some(&1),
            "{token} delivered {:?} times",
            copies.get(token)
        );
    }
}

fn flush(g: &Gannet) {
    let out = g.command(&["queue", "flush"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_full_spool_gives_its_space_back_once_delivered_also_after_a_restart() {
    let fs = match SmallFs::mount(64) {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("skipped: this machine lets the test mount no file system of its own ({why})");
            return;
        }
    };
    let next_hop = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut setup = Setup::new();
    setup.set("spool", "segment_size", "\"4MiB\"");
    setup.set("spool", "min_free", "\"8MiB\"");
    setup.set("spool", "size_max", "\"1GiB\"");
    setup.set("delivery", "retry_first", "\"1h\"");
    setup.route("*", next_hop);
    let dir = Arc::new(tempfile::tempdir_in(fs.path()).unwrap());
    let g = Gannet::start_in(&setup, dir.clone());

    // The next hop is down: the disk fills with deferred mail until 452.
    let (first, refusal) = fill(&g, "first");
    assert_eq!(refusal, "452 4.3.1 Insufficient system storage, try again later\r\n");
    assert!(first.len() >= 20, "only {} accepted", first.len());
    for extra in 0..5 {
        let (more, _) = fill(&g, &format!("refused-{extra}"));
        assert!(more.is_empty(), "accepted {more:?} on a full disk");
    }
    assert_eq!(
        g.log_text().matches("file system nearly full").count(),
        1,
        "one warning per change, not per message:\n{}",
        g.log_text()
    );

    // The next hop comes up: everything acknowledged is delivered once, and the spool takes
    // mail again within seconds, without a restart.
    let sink = CaptureSink::start_on(next_hop);
    flush(&g);
    sink.wait_for(first.len(), WAIT);
    assert_each_once(&sink, &first);
    send_when_accepted(&g, "after-drain");
    assert!(g.wait_for_log("spool has room again", WAIT), "{}", g.log_text());
    sink.wait_for(first.len() + 1, WAIT);

    // Fill it again with the next hop refusing, then crash and restart on the full disk.
    sink.behaviour.defer_data.store(usize::MAX, Ordering::Release);
    let (second, refusal) = fill(&g, "second");
    assert!(refusal.starts_with("452 4.3.1"), "{refusal}");
    assert!(second.len() >= 20, "only {} accepted the second time", second.len());
    let g = g.restart();
    sink.behaviour.defer_data.store(0, Ordering::Release);
    flush(&g);
    sink.wait_for(first.len() + 1 + second.len(), WAIT);
    assert_each_once(&sink, &second);
    send_when_accepted(&g, "after-restart");
    sink.wait_for(first.len() + second.len() + 2, WAIT);
    assert_each_once(&sink, &["after-drain".into(), "after-restart".into()]);
    // Nothing delivered before the crash came back after it.
    assert_each_once(&sink, &first);
}
