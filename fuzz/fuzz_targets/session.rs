//! The whole inbound session driven by arbitrary bytes, in arbitrary splits, with STARTTLS and
//! AUTH answered by a pretend shell. Invariants checked:
//! - it never panics and never consumes more than it was given;
//! - what it keeps unconsumed while waiting is shorter than the longest allowed line;
//! - every reply line is `ddd` then space or dash, and ends in CRLF (no injected line breaks);
//! - nothing is accepted after the session closed;
//! - with a clock that advances by a few hundred milliseconds per piece, the deadlines the
//!   session names are never in the past once checked, and a passed one closes it with 421.
#![no_main]

use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use gannet_smtp::data::BareLineEndings;
use gannet_smtp::deadline::{Now, Timeouts};
use gannet_smtp::envelope::{Envelope, Origin};
use gannet_smtp::identity::Identity;
use gannet_smtp::policy::RelayPolicy;
use gannet_smtp::received::TlsSummary;
use gannet_smtp::session::{
    AuthOutcome, ListenerRules, MessageSink, Next, OpenGate, SenderVerdict, Session, SessionConfig, SinkFull,
};
use libfuzzer_sys::fuzz_target;

const LINE_LENGTH_MAX: usize = 512;

/// Keeps at most 64 KiB of a message, like a small memory budget.
#[derive(Default)]
struct BoundedSink {
    open: bool,
    bytes: usize,
}

impl MessageSink for BoundedSink {
    fn begin(&mut self, _envelope: &Envelope, _origin: Origin<'_>) -> Result<(), SinkFull> {
        self.open = true;
        self.bytes = 0;
        Ok(())
    }
    fn append(&mut self, bytes: &[u8]) -> Result<(), SinkFull> {
        assert!(self.open, "append without begin");
        self.bytes += bytes.len();
        if self.bytes > 64 * 1024 {
            return Err(SinkFull);
        }
        Ok(())
    }
    fn abandon(&mut self) {
        self.open = false;
    }
}

fn check_replies(out: &[u8]) {
    assert!(out.is_empty() || out.ends_with(b"\r\n"), "replies end in CRLF");
    for line in out.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        let line = line.strip_suffix(b"\r").expect("every reply line ends in CRLF");
        assert!(!line.contains(&b'\r'), "no bare CR in a reply: {line:?}");
        assert!(line.len() >= 3 && line[..3].iter().all(u8::is_ascii_digit), "{line:?}");
        assert!(line.len() == 3 || line[3] == b' ' || line[3] == b'-', "{line:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let (control, input) = data.split_at(data.len().min(2));
    let flags = control.first().copied().unwrap_or(0);
    let split = control.get(1).map_or(64, |&b| usize::from(b) % 97 + 1);
    let config = SessionConfig {
        hostname: "mx.fuzz".into(),
        line_length_max: LINE_LENGTH_MAX,
        message_size_max: 32 * 1024,
        recipients_max: 5,
        errors_max: 30,
        bare_line_endings: if flags & 8 == 0 {
            BareLineEndings::Reject
        } else {
            BareLineEndings::Normalize
        },
        relay: RelayPolicy {
            local_domains: vec!["local.fuzz".into()],
            trusted_networks: vec!["127.0.0.0/8".parse().unwrap()],
        },
        recipients_per_session_max: 12,
        tarpit_after_errors: 3,
        tarpit_delay: Duration::from_millis(10),
        sender_must_match: flags & 16 != 0,
        timeouts: Timeouts {
            command: Duration::from_secs(3),
            stress_command: Duration::from_secs(1),
            data: Duration::from_secs(20),
            data_rate_min_bytes_per_s: 4,
            data_rate_window: Duration::from_secs(2),
        },
        junk_commands_max: 10,
    };
    let stressed = flags & 64 != 0;
    let step_ms = u64::from(control.get(1).copied().unwrap_or(0)) * 4;
    let t0 = Instant::now();
    let mut now = Now {
        instant: t0,
        unix_s: 1_700_000_000,
    };
    let rules = ListenerRules {
        starttls: flags & 1 != 0,
        auth: flags & 2 != 0,
        auth_required: flags & 4 != 0,
        check_sender: flags & 128 != 0,
    };
    let ip: IpAddr = if flags & 32 == 0 { "127.0.0.1" } else { "192.0.2.9" }.parse().unwrap();
    let mut session = Session::new(Rc::new(config), rules, Rc::new(OpenGate), ip, now);
    let mut sink = BoundedSink::default();
    let mut out = Vec::new();
    session.greeting(now.instant, &mut out);
    let mut pending: Vec<u8> = Vec::new();
    for piece in input.chunks(split) {
        now.instant += Duration::from_millis(step_ms);
        pending.extend_from_slice(piece);
        loop {
            let step = session.receive(&pending, now, &mut sink, &mut out);
            assert!(step.consumed <= pending.len());
            pending.drain(..step.consumed);
            match step.next {
                Next::NeedInput => break,
                Next::Close => {
                    assert!(session.is_closed());
                    check_replies(&out);
                    return;
                }
                Next::Commit => {
                    sink.open = false;
                    session.committed(Ok("ID"), now.instant, &mut out);
                }
                Next::StartTls => {
                    pending.clear();
                    session.tls_started(
                        TlsSummary {
                            version: "TLSv1.3".into(),
                            cipher: "TLS13_AES_128_GCM_SHA256".into(),
                        },
                        now.instant,
                    );
                }
                Next::Authenticate => {
                    let credentials = session.take_credentials().expect("credentials come with Authenticate");
                    let outcome = match credentials.password.first().copied().unwrap_or(0) % 4 {
                        0 => AuthOutcome::Success(Identity::new(&credentials.user, &["@fuzz".to_string()])),
                        1 => AuthOutcome::Invalid,
                        2 => AuthOutcome::Blocked,
                        _ => AuthOutcome::Unavailable,
                    };
                    session.authenticated(outcome, now.instant, &mut sink, &mut out);
                }
                Next::CheckSender => {
                    // The sender decides: a domain starting with a digit is refused.
                    let refuse = {
                        let sender = session.envelope().sender();
                        let at = sender.iter().rposition(|&b| b == b'@').map_or(0, |i| i + 1);
                        sender.get(at).is_some_and(|b| b.is_ascii_digit())
                    };
                    let verdict = if refuse {
                        SenderVerdict::Refuse {
                            code: 550,
                            enhanced: "5.7.23",
                            text: "fuzz refusal".into(),
                        }
                    } else {
                        SenderVerdict::Accept
                    };
                    session.sender_checked(verdict, now.instant, &mut sink, &mut out);
                    assert_eq!(
                        session.in_transaction(),
                        !refuse,
                        "a transaction opens only for an accepted sender"
                    );
                }
            }
        }
        assert!(
            pending.len() < LINE_LENGTH_MAX,
            "an incomplete line is never kept past the limit ({} bytes)",
            pending.len()
        );
        let _ = session.take_reply_delay();
        if session
            .check_deadline(now.instant, stressed, &mut sink, &mut out)
            .is_some()
        {
            assert!(session.is_closed(), "a passed deadline closes the session");
            assert!(out.ends_with(b"421 4.4.2 Timeout exceeded, closing connection\r\n"));
            check_replies(&out);
            return;
        }
        if let Some(deadline) = session.deadline(stressed) {
            assert!(deadline > now.instant, "a checked deadline lies ahead");
        }
    }
    check_replies(&out);
});
