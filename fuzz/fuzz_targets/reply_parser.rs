//! What a remote server sends, as the outbound client reads it: the reply parser fed arbitrary
//! bytes in arbitrary splits, and the replies it produces driven through an EHLO capability
//! parse and a pipelined transaction. Invariants checked:
//! - it never panics and never consumes more than it was given;
//! - every reply has a code of 200-599, at most 100 lines of at most 4096 bytes;
//! - splitting the input differently gives the same replies (up to the first error);
//! - a transaction that reaches Done has exactly one result per recipient, and one that breaks
//!   has one per recipient too.
#![no_main]

use gannet_smtp::client::{Capabilities, OutboundEnvelope, ReplyParser, ServerReply, Transaction, TxStep};
use libfuzzer_sys::fuzz_target;

/// Parses `input` fed `split` bytes at a time; returns the replies up to the first error.
fn parse_all(input: &[u8], split: usize) -> Vec<ServerReply> {
    let mut parser = ReplyParser::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut replies = Vec::new();
    for piece in input.chunks(split.max(1)) {
        pending.extend_from_slice(piece);
        loop {
            match parser.parse(&pending) {
                Ok((reply, used)) => {
                    assert!(used <= pending.len());
                    pending.drain(..used);
                    match reply {
                        Some(r) => replies.push(r),
                        None => break,
                    }
                }
                Err(_) => return replies,
            }
        }
    }
    replies
}

fuzz_target!(|data: &[u8]| {
    let (control, input) = data.split_at(data.len().min(1));
    let split = control.first().map_or(7, |&b| usize::from(b) % 61 + 1);
    let replies = parse_all(input, split);
    let whole = parse_all(input, input.len().max(1));
    assert_eq!(replies, whole, "the split changed the replies");
    for reply in &replies {
        assert!((200..600).contains(&reply.code), "{reply:?}");
        assert!(!reply.lines.is_empty() && reply.lines.len() <= 100);
        assert!(reply.lines.iter().all(|l| l.len() <= 4096));
    }
    let caps = match replies.first() {
        Some(ehlo) => Capabilities::from_ehlo_lines(ehlo.lines.iter().map(String::as_str)),
        None => Capabilities::default(),
    };
    let recipients: Vec<(u32, &[u8])> = vec![(0, b"a@x.test"), (2, b"b@y.test"), (5, b"c@z.test")];
    let envelope = OutboundEnvelope {
        sender: b"s@l.test",
        recipients,
        content_bytes: 100,
        eightbit: false,
        smtputf8: false,
    };
    let mut out = Vec::new();
    let Ok(mut tx) = Transaction::begin(&envelope, &caps, &mut out) else {
        return;
    };
    for reply in replies.into_iter().skip(1) {
        out.clear();
        if let TxStep::Done { .. } = tx.on_reply(reply, &envelope, &mut out) {
            break;
        }
    }
    if !tx.is_done() {
        tx.broken("fuzz: connection lost");
    }
    let results = tx.results();
    assert_eq!(results.len(), 3, "one result per recipient: {results:?}");
    for index in [0, 2, 5] {
        assert_eq!(results.iter().filter(|(i, _)| *i == index).count(), 1);
    }
});
