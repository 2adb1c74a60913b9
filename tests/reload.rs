//! SIGHUP reloads the configuration file: routes, limits and the relay networks change for new
//! connections and delivery attempts while sessions in progress go on; a broken file keeps the
//! old configuration and the log names the file and line; what needs a restart is said so.

mod common;

use std::time::Duration;

use common::sink::CaptureSink;
use common::{send_message, Gannet, Raw, Setup};

const WAIT: Duration = Duration::from_secs(20);

/// Opens a session from `local` and says EHLO.
fn session(g: &Gannet, local: &str) -> Raw {
    let mut c = Raw::connect_from(g.mx(), Some(local));
    c.hello();
    c
}

/// Rewrites the running server's configuration file and sends SIGHUP; waits for `needle` to
/// appear in the log once more than it did before.
fn reload(g: &Gannet, edit: impl Fn(String) -> String, needle: &str) {
    let before = g.log_text().matches(needle).count();
    let text = std::fs::read_to_string(&g.config_path).unwrap();
    let edited = edit(text.clone());
    assert_ne!(text, edited, "the edit changes the file");
    std::fs::write(&g.config_path, edited).unwrap();
    g.signal(libc::SIGHUP);
    assert!(
        g.wait_for_log_count(needle, before + 1, WAIT),
        "no `{needle}` after SIGHUP; log:\n{}",
        g.log_text()
    );
}

#[test]
fn routes_limits_and_relay_networks_change_on_sighup_without_dropping_sessions() {
    let first = CaptureSink::start();
    let second = CaptureSink::start();
    let mut setup = Setup::new();
    setup
        .route("a.test", first.addr)
        .set("limits", "recipients_max", "5")
        .set("relay", "trusted_networks", "[\"127.0.0.0/8\"]");
    let g = Gannet::start(&setup);

    // Before: 127.0.0.2 is trusted and may relay; mail for a.test goes to the first receiver.
    let mut c = session(&g, "127.0.0.2");
    assert!(c.cmd("MAIL FROM:<me@x.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<you@a.test>").starts_with("250"));
    c.cmd("QUIT");
    send_message(g.mx(), "me@x.test", &["one@a.test"], "Subject: before\r\n\r\nhi\r\n");
    assert_eq!(first.wait_for(1, WAIT).len(), 1);

    // A session that began before the reload.
    let mut old = session(&g, "127.0.0.1");

    let first_route = format!("smarthost = \"{}\"", first.addr);
    let second_route = format!("smarthost = \"{}\"", second.addr);
    reload(
        &g,
        |t| {
            t.replace(&first_route, &second_route)
                .replace("recipients_max = 5", "recipients_max = 1")
                .replace(
                    "trusted_networks = [\"127.0.0.0/8\"]",
                    "trusted_networks = [\"127.0.0.1/32\"]",
                )
        },
        "configuration reloaded",
    );

    // The relay networks: 127.0.0.2 is a stranger now.
    let mut c = session(&g, "127.0.0.2");
    assert!(c.cmd("MAIL FROM:<me@x.test>").starts_with("250"));
    let refused = c.cmd("RCPT TO:<you@a.test>");
    assert!(refused.starts_with("554 5.7.1"), "{refused}");
    // The limit: one recipient per message for new sessions.
    let mut c = session(&g, "127.0.0.1");
    assert!(c.cmd("MAIL FROM:<me@x.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<two@a.test>").starts_with("250"));
    let over = c.cmd("RCPT TO:<three@a.test>");
    assert!(over.starts_with("452 4.5.3"), "{over}");
    assert!(c.cmd("DATA").starts_with("354"));
    assert!(c.cmd("Subject: after\r\n\r\nhi\r\n.").starts_with("250"));
    // The route: the second receiver gets it.
    let got = second.wait_for(1, WAIT);
    assert_eq!(got[0].recipients, vec!["two@a.test".to_string()]);

    // The session from before still serves, with the limits it began with.
    assert!(old.cmd("MAIL FROM:<me@x.test>").starts_with("250"));
    assert!(old.cmd("RCPT TO:<four@a.test>").starts_with("250"));
    assert!(old.cmd("RCPT TO:<five@a.test>").starts_with("250"));
    assert!(old.cmd("DATA").starts_with("354"));
    assert!(old.cmd("Subject: old session\r\n\r\nhi\r\n.").starts_with("250"));
    let got = second.wait_for(2, WAIT);
    assert_eq!(got[1].recipients.len(), 2);
    assert_eq!(first.captured().len(), 1, "nothing more went to the old route");

    // A broken file: the old configuration stays, and the log names the file and line.
    let good = std::fs::read_to_string(&g.config_path).unwrap();
    reload(
        &g,
        |t| t.replace("[limits]", "[limits\n"),
        "reload: configuration unchanged",
    );
    let log = g.log_text();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("configuration unchanged"))
        .unwrap();
    assert!(line.contains(&format!("{}:", g.config_path.display())), "{line}");
    send_message(g.mx(), "me@x.test", &["six@a.test"], "Subject: still\r\n\r\nhi\r\n");
    assert_eq!(second.wait_for(3, WAIT).len(), 3);

    // What needs a restart is kept, and said so; the rest of the file still applies.
    std::fs::write(&g.config_path, &good).unwrap();
    reload(
        &g,
        |t| t.replace("shutdown_timeout = \"10s\"", "shutdown_timeout = \"11s\""),
        "takes effect at the next restart",
    );
    assert!(g.log_text().contains("reload: [server] changed"), "{}", g.log_text());
}

#[test]
fn the_log_level_and_format_change_on_sighup() {
    let mut setup = Setup::new();
    // An empty GANNET_LOG leaves the level to the file.
    setup.env.push(("GANNET_LOG".into(), String::new()));
    setup.set("log", "level", "\"info\"");
    let g = Gannet::start(&setup);
    let mut c = Raw::connect(g.mx());
    c.hello();
    c.cmd("QUIT");
    assert!(!g.log_text().contains("connected"), "no debug lines at info");

    reload(
        &g,
        |t| t.replace("level = \"info\"", "level = \"debug\"\nformat = \"json\""),
        "configuration reloaded",
    );
    assert!(
        g.log_text().contains("reload: log level debug, format json"),
        "{}",
        g.log_text()
    );
    let mut c = Raw::connect(g.mx());
    c.hello();
    c.cmd("QUIT");
    assert!(g.wait_for_log("\"connected\"", WAIT), "{}", g.log_text());
    let line = g
        .log_text()
        .lines()
        .find(|l| l.contains("\"connected\""))
        .unwrap()
        .to_string();
    let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(event["level"], "DEBUG", "{line}");
}
