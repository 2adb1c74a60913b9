//! Throughput of the command parser, the DATA decoder and the whole session on realistic input.
//! Run with `cargo bench --bench parser`; figures in bytes/s.

use std::hint::black_box;
use std::rc::Rc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gannet_smtp::data::{dot_stuff, BareLineEndings, DataDecoder};
use gannet_smtp::deadline::{Now, Timeouts};
use gannet_smtp::envelope::{Envelope, Origin};
use gannet_smtp::parser::{parse_command, Params};
use gannet_smtp::policy::RelayPolicy;
use gannet_smtp::session::{ListenerRules, MessageSink, Next, OpenGate, Session, SessionConfig, SinkFull};

/// 1000 pipelined transactions' worth of commands, as a bulk client sends them.
fn pipelined_commands() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..1000 {
        out.extend_from_slice(
            format!(
                "MAIL FROM:<newsletter-bounces+{i}@lists.example.com> SIZE=20480 BODY=8BITMIME\r\n\
                 RCPT TO:<subscriber.{i}@mail.example.net> NOTIFY=FAILURE ORCPT=rfc822;subscriber.{i}@mail.example.net\r\n\
                 RCPT TO:<\"quoted {i}\"@[192.0.2.{}]>\r\nDATA\r\nRSET\r\nNOOP\r\n",
                i % 250
            )
            .as_bytes(),
        );
    }
    out
}

/// A 1 MiB body of 76-character lines (base64-like), dot-stuffed for the wire.
fn body_76(dot_every: usize) -> Vec<u8> {
    let line: Vec<u8> = (0..76)
        .map(|i| b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[i % 64])
        .collect();
    let mut content = Vec::with_capacity(1 << 20);
    let mut n = 0;
    while content.len() < (1 << 20) {
        if dot_every > 0 && n % dot_every == 0 {
            content.push(b'.');
        }
        content.extend_from_slice(&line);
        content.extend_from_slice(b"\r\n");
        n += 1;
    }
    let mut wire = Vec::with_capacity(content.len() + content.len() / 70);
    dot_stuff(&content, &mut wire);
    wire
}

fn bench_parser(c: &mut Criterion) {
    let input = pipelined_commands();
    let mut group = c.benchmark_group("command_parser");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.bench_function("pipelined_transactions", |b| {
        b.iter(|| {
            let mut rest = &input[..];
            let mut params = 0usize;
            while let Some(lf) = memchr::memchr(b'\n', rest) {
                let line = &rest[..lf - 1];
                match parse_command(black_box(line)) {
                    Ok(gannet_smtp::parser::Command::Mail { params: p, .. })
                    | Ok(gannet_smtp::parser::Command::Rcpt { params: p, .. }) => params += Params::new(p).count(),
                    Ok(_) => {}
                    Err(e) => panic!("{e:?}"),
                }
                rest = &rest[lf + 1..];
            }
            black_box(params)
        })
    });
    group.finish();
}

fn bench_decoder(c: &mut Criterion) {
    let mut group = c.benchmark_group("data_decoder");
    for (name, dots) in [("76_char_lines", 0), ("every_line_leading_dot", 1)] {
        let wire = body_76(dots);
        let mut out = Vec::with_capacity(wire.len());
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                let mut decoder = DataDecoder::new(BareLineEndings::Reject);
                let d = decoder.decode(black_box(&wire), |s| out.extend_from_slice(s));
                assert!(d.end);
                black_box(out.len())
            })
        });
    }
    group.finish();
}

/// A sink that keeps only a length: measures the session, not memory copies into a spool.
struct CountingSink(usize);

impl MessageSink for CountingSink {
    fn begin(&mut self, _: &Envelope, _: Origin<'_>) -> Result<(), SinkFull> {
        self.0 = 0;
        Ok(())
    }
    fn append(&mut self, bytes: &[u8]) -> Result<(), SinkFull> {
        self.0 += bytes.len();
        Ok(())
    }
    fn abandon(&mut self) {}
}

fn bench_session(c: &mut Criterion) {
    let config = Rc::new(SessionConfig {
        hostname: "mx.bench".into(),
        line_length_max: 2048,
        message_size_max: 50 << 20,
        recipients_max: 1000,
        errors_max: 1_000_000,
        bare_line_endings: BareLineEndings::Reject,
        relay: RelayPolicy {
            local_domains: vec![],
            trusted_networks: vec!["127.0.0.0/8".parse().unwrap()],
        },
        recipients_per_session_max: usize::MAX,
        tarpit_after_errors: u32::MAX,
        tarpit_delay: std::time::Duration::ZERO,
        sender_must_match: false,
        timeouts: Timeouts::RELAXED,
        junk_commands_max: u32::MAX,
    });
    let rules = ListenerRules {
        starttls: false,
        auth: false,
        auth_required: false,
        check_sender: false,
    };
    // 100 transactions of 20 KiB messages, pipelined, as one stream.
    let mut content = Vec::new();
    while content.len() < 20 * 1024 {
        content.extend_from_slice(b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tem\r\n");
    }
    let mut body = Vec::new();
    dot_stuff(&content, &mut body);
    let mut stream = b"EHLO client.bench\r\n".to_vec();
    for i in 0..100 {
        stream.extend_from_slice(
            format!("MAIL FROM:<s{i}@bench.test>\r\nRCPT TO:<r{i}@remote.test>\r\nDATA\r\n").as_bytes(),
        );
        stream.extend_from_slice(&body);
    }
    let mut group = c.benchmark_group("session");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("pipelined_20KiB_transactions", |b| {
        let mut out = Vec::with_capacity(64 * 1024);
        b.iter(|| {
            let now = Now::read();
            let mut session = Session::new(
                config.clone(),
                rules,
                Rc::new(OpenGate),
                "127.0.0.1".parse().unwrap(),
                now,
            );
            let mut sink = CountingSink(0);
            let mut pos = 0;
            let mut commits = 0;
            out.clear();
            loop {
                let step = session.receive(&stream[pos..], now, &mut sink, &mut out);
                pos += step.consumed;
                match step.next {
                    Next::Commit => {
                        commits += 1;
                        session.committed(Ok("ID"), now.instant, &mut out);
                    }
                    Next::NeedInput | Next::Close | Next::StartTls | Next::Authenticate | Next::CheckSender => break,
                }
            }
            assert_eq!(commits, 100);
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group!(benches, bench_parser, bench_decoder, bench_session);
criterion_main!(benches);
