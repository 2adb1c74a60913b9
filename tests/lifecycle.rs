//! Start-up, shutdown, restart and recovery of the real process.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{queued_id, tool, Gannet, Raw, Setup, BIN};

fn send_one(c: &mut Raw, body: &str) -> String {
    assert!(c.cmd("MAIL FROM:<a@life.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<b@remote.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let reply = c.cmd(&format!("{body}\r\n."));
    queued_id(&reply).unwrap_or_else(|| panic!("not queued: {reply}"))
}

#[test]
fn sigterm_lets_transactions_finish_and_tells_idle_sessions_421() {
    let mut g = Gannet::start(&Setup::new());
    let mut busy = Raw::connect(g.mx());
    busy.hello();
    busy.cmd("MAIL FROM:<a@life.test>");
    busy.cmd("RCPT TO:<b@remote.test>");
    assert!(busy.cmd("DATA").starts_with("354"));
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n");
    let mut idle = Raw::connect(g.mx());
    idle.hello();

    g.signal(libc::SIGTERM);
    assert!(g.wait_for_log("shutting down", Duration::from_secs(10)));
    assert_eq!(
        idle.reply().unwrap(),
        "421 4.3.2 Service shutting down, try again later\r\n"
    );
    assert!(idle.closed());
    // New connections are no longer accepted once the shard has stopped listening.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(g.mx()).is_ok_and(|mut s| {
        use std::io::Read;
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut b = [0u8; 64];
        matches!(s.read(&mut b), Ok(n) if n > 0 && b.starts_with(b"220"))
    }) {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
    }

    // The transaction in flight completes, then the session is closed with 421.
    busy.send(b"second half\r\n.\r\n");
    let id = queued_id(&busy.reply().unwrap()).expect("the in-flight message is accepted");
    assert_eq!(
        busy.reply().unwrap(),
        "421 4.3.2 Service shutting down, try again later\r\n"
    );
    let status = g.wait();
    assert_eq!(status.code(), Some(0), "{}", g.log_text());
    assert_eq!(g.queued_ids(), vec![id]);
}

#[test]
fn the_shutdown_deadline_cuts_off_slow_transactions_with_421() {
    let mut setup = Setup::new();
    setup.set("server", "shutdown_timeout", "\"1s\"");
    let mut g = Gannet::start(&setup);
    let mut slow = Raw::connect(g.mx());
    slow.hello();
    slow.cmd("MAIL FROM:<a@life.test>");
    slow.cmd("RCPT TO:<b@remote.test>");
    slow.cmd("DATA");
    slow.send(b"never finished\r\n");
    let t0 = Instant::now();
    g.signal(libc::SIGTERM);
    assert_eq!(
        slow.reply().unwrap(),
        "421 4.3.2 Service shutting down, try again later\r\n"
    );
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert_eq!(g.wait().code(), Some(0));
    assert!(g.queued_ids().is_empty(), "an unfinished message is never spooled");
}

#[test]
fn a_second_signal_exits_at_once() {
    let mut setup = Setup::new();
    setup.set("server", "shutdown_timeout", "\"60s\"");
    let mut g = Gannet::start(&setup);
    let mut slow = Raw::connect(g.mx());
    slow.hello();
    slow.cmd("MAIL FROM:<a@life.test>");
    g.signal(libc::SIGTERM);
    assert!(g.wait_for_log("shutting down", Duration::from_secs(10)));
    let t0 = Instant::now();
    g.signal(libc::SIGINT);
    let status = g.wait();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert!(status.signal().is_none());
}

#[test]
fn a_second_server_on_the_same_spool_is_refused() {
    let g = Gannet::start(&Setup::new());
    // Same spool, other ports: the lock file says who holds it.
    let other = Setup::new();
    let spool = g.spool_dir.clone();
    let config = g.dir.path().join("second.toml");
    std::fs::write(&config, other.toml(&spool)).unwrap();
    let out = Command::new(BIN).arg("--config").arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another gannet process"), "{err}");
    assert!(err.contains(&format!("pid {}", g.pid())), "{err}");
}

#[test]
fn a_port_already_in_use_is_refused_even_with_reuseport() {
    let g = Gannet::start(&Setup::new());
    // Another spool, the same mx port: SO_REUSEPORT would share it silently; we refuse.
    let mut other = g.setup.clone();
    other.submission_port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("g.toml");
    std::fs::write(&config, other.toml(&dir.path().join("spool"))).unwrap();
    let out = Command::new(BIN).arg("--config").arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {}", g.mx())), "{err}");
}

#[test]
fn check_config_prints_the_effective_configuration_or_the_file_line_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[limits]\nrecipients_max = 50\n").unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&good).output().unwrap();
    assert!(out.status.success());
    let effective = String::from_utf8(out.stdout).unwrap();
    assert!(effective.contains("recipients_max = 50"), "{effective}");
    assert!(
        effective.contains("message_size_max = \"10MiB\""),
        "defaults are filled in: {effective}"
    );
    assert!(effective.contains("durability = \"fsync\""), "{effective}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[spool]\ndurability = \"fsync\"\nsegmnet_size = \"8MiB\"\n").unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(&format!("{}:3:", bad.display())), "{err}");
    assert!(err.contains("segment_size"), "names the valid key: {err}");

    let combo = dir.path().join("combo.toml");
    std::fs::write(&combo, "[limits]\nmessage_size_max = \"100MiB\"\n").unwrap();
    let out = Command::new(BIN).arg("--config").arg(&combo).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("spool.segment_size") && err.contains("raise spool.segment_size"),
        "{err}"
    );

    let shards = dir.path().join("shards.toml");
    std::fs::write(&shards, "[server]\nshards = 512\n").unwrap();
    let out = Command::new(BIN).arg("--config").arg(&shards).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("512 shards asked for"));
}

#[test]
fn help_documents_every_flag_and_command() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for word in ["--config", "check-config", "queue", "default-config", "--version"] {
        assert!(help.contains(word), "{word} missing from --help:\n{help}");
    }
    let out = Command::new(BIN).args(["queue", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("list") && help.contains("show"), "{help}");
}

#[test]
fn connections_land_on_more_than_one_shard() {
    if gannet::server::allowed_cpus().len() < 2 {
        panic!("this test needs two CPUs; the project's machines have two");
    }
    let g = Gannet::start(Setup::new().shards(2));
    let out = Command::new(tool("smtp-source"))
        .args([
            "-v",
            "-s",
            "20",
            "-m",
            "200",
            "-l",
            "200",
            "-f",
            "a@life.test",
            "-t",
            "b@remote.test",
        ])
        .arg(g.mx().to_string())
        .output()
        .unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    let shards: BTreeSet<String> = log
        .lines()
        .filter_map(|l| l.split("queued as ").nth(1))
        .map(|id| id.trim().split('-').nth(1).unwrap().to_string())
        .collect();
    assert_eq!(
        shards,
        BTreeSet::from(["00".to_string(), "01".to_string()]),
        "shards seen: {shards:?}"
    );
}

#[test]
fn restart_recovers_every_message_and_ids_stay_unique() {
    let mut g = Gannet::start(Setup::new().shards(2));
    let mut ids = BTreeSet::new();
    for i in 0..5 {
        let mut c = Raw::connect(g.mx());
        c.hello();
        ids.insert(send_one(&mut c, &format!("message {i}")));
    }
    assert_eq!(g.stop().code(), Some(0));
    let g = g.restart();
    let listed: BTreeSet<String> = g.queued_ids().into_iter().collect();
    assert_eq!(listed, ids);
    assert!(g.wait_for_log_count("recovered", 2, Duration::from_secs(5)));
    let mut c = Raw::connect(g.mx());
    c.hello();
    let new_id = send_one(&mut c, "after restart");
    assert!(!ids.contains(&new_id));
    assert_eq!(g.queued_ids().len(), 6);
}

#[test]
fn a_damaged_record_is_quarantined_and_the_rest_survive() {
    let mut g = Gannet::start(&Setup::new());
    let mut c = Raw::connect(g.mx());
    c.hello();
    let ids: Vec<String> = (0..3).map(|i| send_one(&mut c, &format!("m{i}"))).collect();
    g.stop();
    // Flip a byte inside the second record's payload (records are 4 KiB aligned).
    let second: gannet::spool::MessageId = ids[1].parse().unwrap();
    let segment = gannet::spool::shard_dir(&g.spool_dir, 0).join(gannet::spool::segment_file_name(second.segment_seq));
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[second.offset_bytes() as usize + 40] ^= 0x5a;
    std::fs::write(&segment, &bytes).unwrap();
    let g = g.restart();
    let listed = g.queued_ids();
    assert_eq!(listed, vec![ids[0].clone(), ids[2].clone()]);
    assert!(g.log_text().contains("quarantined as"), "{}", g.log_text());
    let quarantined = std::fs::read_dir(g.spool_dir.join("quarantine")).unwrap().count();
    assert_eq!(quarantined, 1);
}

#[test]
fn a_torn_tail_is_cut_and_serving_continues() {
    let mut g = Gannet::start(&Setup::new());
    let mut c = Raw::connect(g.mx());
    c.hello();
    let ids: Vec<String> = (0..2).map(|i| send_one(&mut c, &format!("m{i}"))).collect();
    g.stop();
    // A half-written record after the last one (message or delivery state): a header whose
    // payload never made it.
    let last: gannet::spool::MessageId = ids[1].parse().unwrap();
    let segment = gannet::spool::shard_dir(&g.spool_dir, 0).join(gannet::spool::segment_file_name(last.segment_seq));
    let mut bytes = std::fs::read(&segment).unwrap();
    let torn = gannet::spool::recovery::scan_segment(&bytes, 0, last.segment_seq).end_offset as usize;
    bytes[torn..torn + 9].copy_from_slice(&[200, 0, 0, 0, 1, 1, 2, 3, 4]);
    std::fs::write(&segment, &bytes).unwrap();
    let g = g.restart();
    assert_eq!(g.queued_ids(), ids);
    assert!(g.log_text().contains("torn tail"), "{}", g.log_text());
}

#[test]
fn the_embedded_default_configuration_serves() {
    // README's first command runs this: no --config, ports 2525/2587, spool in ./gannet-spool.
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .env("GANNET_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = common::stderr_lines(&mut child);
    let mut log = String::new();
    let Some(ready) = common::wait_for_line(&lines, "ready:", Duration::from_secs(60), &mut log) else {
        let _ = child.kill();
        panic!("no ready line:\n{log}");
    };
    assert!(
        ready.contains("127.0.0.1:2525 (mx)")
            && ready.contains("127.0.0.1:2587 (submission)")
            && ready.contains("127.0.0.1:2465 (smtps)"),
        "{ready}"
    );
    let mut c = Raw::connect("127.0.0.1:2525".parse().unwrap());
    c.hello();
    send_one(&mut c, "default config");
    // Submission is for users: STARTTLS is offered (self-signed certificate), MAIL needs AUTH.
    let mut s = Raw::connect("127.0.0.1:2587".parse().unwrap());
    assert!(s.reply().unwrap().starts_with("220"));
    assert!(s.cmd("EHLO client.test").contains("250-STARTTLS"));
    assert_eq!(
        s.cmd("MAIL FROM:<a@client.test>"),
        "530 5.7.0 Authentication required\r\n"
    );
    // SAFETY (test): signal our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(dir.path().join("gannet-spool").join("shard-0").exists());
}

/// How many of the server's `shard-N-…` threads run with a scheduler slice of `slice_ns`
/// (`se.slice` in /proc). Each shard has its executor thread and glommio's helper thread, both so
/// named; only the executor asks for the slice (threads it starts later, such as io_uring's
/// workers, inherit it).
fn threads_with_slice(pid: i32, slice_ns: u64) -> usize {
    let mut count = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if !comm.starts_with("shard-") {
            continue;
        }
        let sched = std::fs::read_to_string(task.join("sched")).unwrap();
        let slice: u64 = sched
            .lines()
            .find(|l| l.starts_with("se.slice"))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no se.slice in {}:\n{sched}", task.display()));
        if slice == slice_ns {
            count += 1;
        }
    }
    count
}

#[test]
fn shards_run_with_the_configured_scheduler_slice() {
    let g = Gannet::start(Setup::new().shards(2));
    assert_eq!(
        threads_with_slice(g.pid(), 300_000),
        2,
        "the default, 300us, on both shards"
    );
    drop(g);

    let g = Gannet::start(Setup::new().shards(2).set("server", "sched_slice", "\"2ms\""));
    assert_eq!(threads_with_slice(g.pid(), 2_000_000), 2);
    assert_eq!(threads_with_slice(g.pid(), 300_000), 0);
    drop(g);

    let g = Gannet::start(Setup::new().shards(1).set("server", "sched_slice", "\"0s\""));
    assert_eq!(
        threads_with_slice(g.pid(), 300_000),
        0,
        "\"0s\" leaves the kernel's default"
    );
    drop(g);

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("slice.toml");
    std::fs::write(&bad, "[server]\nshards = 1\nsched_slice = \"50us\"\n").unwrap();
    let out = Command::new(BIN).arg("check-config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(&format!("{}:3:", bad.display())), "{err}");
    assert!(err.contains("server.sched_slice") && err.contains("100us"), "{err}");
}
