//! Crash safety: SIGKILL the server under load and check that every message a client saw `250`
//! for is in the spool after a restart.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::{tool, Gannet, Setup};

/// The ids smtp-source saw `250 ... queued as` for, from its verbose log.
fn acknowledged_ids(smtp_source_log: &str) -> BTreeSet<String> {
    smtp_source_log
        .lines()
        .filter(|l| l.contains("<<< 250 2.0.0 Ok: queued as "))
        .map(|l| l.rsplit(' ').next().unwrap().to_string())
        .collect()
}

fn crash_under_load(setup: &Setup, messages: usize, kill_after: usize, size_bytes: usize) {
    let mut g = Gannet::start(setup);
    let target = g.mx().to_string();
    let source = tool("smtp-source");
    let load = std::thread::spawn(move || {
        Command::new(source)
            .args([
                "-v",
                "-s",
                "20",
                "-m",
                &messages.to_string(),
                "-l",
                &size_bytes.to_string(),
            ])
            .args(["-f", "load@crash.test", "-t", "rcpt@remote.test"])
            .arg(target)
            .output()
            .unwrap()
    });
    // Kill once the server has acknowledged `kill_after` messages: mid-load, by event.
    assert!(
        g.wait_for_log_count("queued", kill_after, Duration::from_secs(120)),
        "the load never reached {kill_after} messages; log:\n{}",
        g.log_text()
    );
    g.kill();
    let out = load.join().unwrap();
    let acked = acknowledged_ids(&String::from_utf8_lossy(&out.stderr));
    // The server logs "queued" just before writing the 250, so a kill can land between the two:
    // the client may have seen slightly fewer acknowledgements than the log counted.
    assert!(
        acked.len() >= kill_after / 2,
        "smtp-source saw only {} acknowledgements",
        acked.len()
    );
    assert!(
        acked.len() < messages,
        "the kill came after the load had finished; nothing was tested"
    );
    let g = g.restart();
    let spooled: BTreeSet<String> = g.queued_ids().into_iter().collect();
    let lost: Vec<&String> = acked.difference(&spooled).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged message(s) lost after SIGKILL: {lost:?}",
        lost.len()
    );
    eprintln!(
        "crash test: {} acknowledged, {} spooled after restart (extra = written but not acknowledged), 0 lost",
        acked.len(),
        spooled.len()
    );
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_message() {
    crash_under_load(Setup::new().shards(2), 4000, 1500, 1024);
}

#[test]
fn sigkill_during_segment_rollover_loses_no_acknowledged_message() {
    // Small segments: the load rolls over segments many times before the kill.
    let mut setup = Setup::new();
    setup.shards(2);
    setup.set("spool", "segment_size", "\"2MiB\"");
    setup.set("limits", "message_size_max", "\"512KiB\"");
    setup.set("limits", "recipients_max", "100");
    crash_under_load(&setup, 3000, 1200, 20 * 1024);
}
