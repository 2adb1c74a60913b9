//! The outbound SMTP client, sans-IO: a reply parser, the server's capabilities, and one mail
//! transaction as a state machine. The delivery shell feeds it replies and writes what it asks.
//!
//! With PIPELINING the whole envelope (MAIL, every RCPT, DATA) goes out in one write and the
//! replies are matched in order (RFC 2920); without it, one command per round trip. Each
//! recipient ends up Delivered, Failed (5xx: bounce) or Deferred (4xx, or the connection broke).

/// Longest reply line we accept, and most lines in one reply: a server cannot make us buffer more.
const REPLY_LINE_BYTES_MAX: usize = 4096;
const REPLY_LINES_MAX: usize = 100;

/// One complete server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReply {
    pub code: u16,
    /// The text of each line, code and separator removed.
    pub lines: Vec<String>,
}

impl ServerReply {
    pub fn new(code: u16, text: &str) -> ServerReply {
        ServerReply {
            code,
            lines: vec![text.to_string()],
        }
    }

    pub fn class(&self) -> u16 {
        self.code / 100
    }

    pub fn is_positive(&self) -> bool {
        self.class() == 2
    }

    /// The whole reply on one line, as logs and bounces quote it.
    pub fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" "))
    }
}

/// Why the server's bytes make no sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyError {
    Malformed,
    TooLong,
}

/// Accumulates reply lines across reads.
#[derive(Debug, Default)]
pub struct ReplyParser {
    lines: Vec<String>,
    code: Option<u16>,
}

impl ReplyParser {
    /// Consumes complete lines from the front of `input` until a reply is complete. Returns the
    /// reply if one completed, and the bytes consumed either way (a partial last line is left).
    pub fn parse(&mut self, input: &[u8]) -> Result<(Option<ServerReply>, usize), ReplyError> {
        let mut pos = 0;
        loop {
            let Some(lf) = memchr::memchr(b'\n', &input[pos..]) else {
                if input.len() - pos > REPLY_LINE_BYTES_MAX {
                    return Err(ReplyError::TooLong);
                }
                return Ok((None, pos));
            };
            let line = &input[pos..pos + lf];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > REPLY_LINE_BYTES_MAX {
                return Err(ReplyError::TooLong);
            }
            if line.len() < 3 {
                return Err(ReplyError::Malformed);
            }
            let digits = &line[..3];
            if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
                return Err(ReplyError::Malformed);
            }
            let code =
                u16::from(digits[0] - b'0') * 100 + u16::from(digits[1] - b'0') * 10 + u16::from(digits[2] - b'0');
            if self.code.is_some_and(|c| c != code) {
                return Err(ReplyError::Malformed);
            }
            self.code = Some(code);
            let (last, text) = match line.get(3) {
                None => (true, &b""[..]),
                Some(b' ') => (true, &line[4..]),
                Some(b'-') => (false, &line[4..]),
                Some(_) => return Err(ReplyError::Malformed),
            };
            self.lines.push(reply_text(text));
            pos += lf + 1;
            if self.lines.len() > REPLY_LINES_MAX {
                return Err(ReplyError::TooLong);
            }
            if last {
                self.code = None;
                let reply = ServerReply {
                    code,
                    lines: std::mem::take(&mut self.lines),
                };
                return Ok((Some(reply), pos));
            }
        }
    }
}

/// A reply line's text as a string of at most [`REPLY_LINE_BYTES_MAX`] bytes: invalid UTF-8
/// becomes U+FFFD, which is three bytes for one, so the result is cut at a character boundary
/// to keep the line limit a limit on memory too (found by the `reply_parser` fuzz target).
fn reply_text(text: &[u8]) -> String {
    let s = String::from_utf8_lossy(text);
    let s = prefix_within(&s, REPLY_LINE_BYTES_MAX).to_owned();
    debug_assert!(s.len() <= REPLY_LINE_BYTES_MAX);
    s
}

/// The longest prefix of `s` of at most `bytes_max` bytes that ends at a character boundary.
pub fn prefix_within(s: &str, bytes_max: usize) -> &str {
    let mut end = s.len().min(bytes_max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What the server offered in its EHLO reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    pub esmtp: bool,
    pub pipelining: bool,
    /// SIZE limit; Some(0) means "offered without a number".
    pub size_bytes_max: Option<u64>,
    pub eightbitmime: bool,
    pub smtputf8: bool,
    pub chunking: bool,
    pub starttls: bool,
    pub dsn: bool,
    /// AUTH PLAIN offered (RFC 4954).
    pub auth_plain: bool,
}

impl Capabilities {
    /// Reads an EHLO reply's lines (the first is the server's name, the rest extensions).
    pub fn from_ehlo_lines<'a>(lines: impl Iterator<Item = &'a str>) -> Capabilities {
        let mut caps = Capabilities {
            esmtp: true,
            ..Capabilities::default()
        };
        for line in lines.skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else { continue };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size_bytes_max = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eightbitmime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "CHUNKING" => caps.chunking = true,
                "STARTTLS" => caps.starttls = true,
                "DSN" => caps.dsn = true,
                "AUTH" => caps.auth_plain = words.any(|m| m.eq_ignore_ascii_case("PLAIN")),
                _ => {}
            }
        }
        caps
    }
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecipientResult {
    Delivered(ServerReply),
    /// Permanent failure (5xx): bounce.
    Failed(ServerReply),
    /// Temporary failure (4xx, or no answer): retry later.
    Deferred(ServerReply),
}

/// The envelope of one outbound transaction.
#[derive(Debug, Clone)]
pub struct OutboundEnvelope<'a> {
    pub sender: &'a [u8],
    /// The recipients still to deliver, with their index in the stored envelope.
    pub recipients: Vec<(u32, &'a [u8])>,
    pub content_bytes: u64,
    pub eightbit: bool,
    pub smtputf8: bool,
}

/// Why a message cannot go to this server at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsendable {
    TooBig {
        limit: u64,
    },
    NeedsSmtpUtf8,
    /// Declared `BODY=8BITMIME`, and the server does not offer 8BITMIME. RFC 6152 allows only
    /// a MIME downgrade (re-encoding the body), which would break signatures over it (DKIM):
    /// Gannet returns the message instead.
    Needs8BitMime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxState {
    AwaitMail,
    AwaitRcpt(usize),
    AwaitData,
    AwaitFinal,
    Done,
}

/// What the shell must do after a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxStep {
    /// Write `out` (if not empty) and wait for the next reply.
    Continue,
    /// Send the dot-stuffed content and its end marker, then wait for the final reply.
    SendContent,
    /// Append the content as it is (it is the chunk of the `BDAT <n> LAST` just written), send,
    /// then wait for the final reply.
    SendRaw,
    /// The transaction is over. `needs_reset`: send RSET before the next MAIL.
    Done { needs_reset: bool },
}

/// One mail transaction.
#[derive(Debug)]
pub struct Transaction {
    pipelining: bool,
    /// CHUNKING (RFC 3030): the content goes as one `BDAT <n> LAST` chunk instead of DATA.
    chunking: bool,
    content_bytes: u64,
    state: TxState,
    rcpt_indexes: Vec<u32>,
    rcpt_replies: Vec<Option<ServerReply>>,
    results: Vec<(u32, RecipientResult)>,
    accepted: usize,
}

fn write_command(out: &mut Vec<u8>, parts: &[&[u8]]) {
    for part in parts {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

impl Transaction {
    /// Checks the message against the server's capabilities and writes the opening commands.
    pub fn begin(
        envelope: &OutboundEnvelope<'_>,
        caps: &Capabilities,
        out: &mut Vec<u8>,
    ) -> Result<Transaction, Unsendable> {
        if let Some(limit) = caps.size_bytes_max.filter(|&l| l > 0) {
            if envelope.content_bytes > limit {
                return Err(Unsendable::TooBig { limit });
            }
        }
        if envelope.smtputf8 && !caps.smtputf8 {
            return Err(Unsendable::NeedsSmtpUtf8);
        }
        if envelope.eightbit && !caps.eightbitmime {
            return Err(Unsendable::Needs8BitMime);
        }
        debug_assert!(!envelope.recipients.is_empty());
        let mut mail = Vec::with_capacity(64);
        mail.extend_from_slice(b"MAIL FROM:<");
        mail.extend_from_slice(envelope.sender);
        mail.push(b'>');
        if caps.size_bytes_max.is_some() {
            mail.extend_from_slice(format!(" SIZE={}", envelope.content_bytes).as_bytes());
        }
        if envelope.eightbit {
            mail.extend_from_slice(b" BODY=8BITMIME");
        }
        if envelope.smtputf8 {
            mail.extend_from_slice(b" SMTPUTF8");
        }
        write_command(out, &[&mail]);
        let tx = Transaction {
            pipelining: caps.pipelining,
            chunking: caps.chunking,
            content_bytes: envelope.content_bytes,
            state: TxState::AwaitMail,
            rcpt_indexes: envelope.recipients.iter().map(|(i, _)| *i).collect(),
            rcpt_replies: vec![None; envelope.recipients.len()],
            results: Vec::with_capacity(envelope.recipients.len()),
            accepted: 0,
        };
        if caps.pipelining {
            for (_, rcpt) in &envelope.recipients {
                write_command(out, &[b"RCPT TO:<", rcpt, b">"]);
            }
            if caps.chunking {
                tx.write_bdat(out);
            } else {
                write_command(out, &[b"DATA"]);
            }
        }
        Ok(tx)
    }

    fn write_bdat(&self, out: &mut Vec<u8>) {
        write_command(out, &[format!("BDAT {} LAST", self.content_bytes).as_bytes()]);
    }

    /// With PIPELINING and CHUNKING the whole transaction goes in one write: the shell appends
    /// the content, as it is, right after the commands `begin` wrote.
    pub fn wants_content_now(&self) -> bool {
        self.pipelining && self.chunking
    }

    fn recipients_of(&self, envelope: &OutboundEnvelope<'_>, i: usize) -> Vec<u8> {
        let mut line = b"RCPT TO:<".to_vec();
        line.extend_from_slice(envelope.recipients[i].1);
        line.push(b'>');
        line
    }

    /// Classifies every recipient that has no result yet by `reply`.
    fn settle_rest(&mut self, reply: &ServerReply) {
        for (i, idx) in self.rcpt_indexes.iter().enumerate() {
            if self.results.iter().any(|(r, _)| r == idx) {
                continue;
            }
            let accepted_before = self.rcpt_replies[i].as_ref().is_some_and(|r| r.is_positive());
            let unasked = self.rcpt_replies[i].is_none();
            if accepted_before || unasked {
                self.results.push((*idx, classify(reply.clone(), false)));
            }
        }
    }

    /// Feeds one reply. `out` receives any command to send next.
    pub fn on_reply(&mut self, reply: ServerReply, envelope: &OutboundEnvelope<'_>, out: &mut Vec<u8>) -> TxStep {
        match self.state {
            TxState::AwaitMail => {
                if !reply.is_positive() {
                    self.settle_rest(&reply);
                    // With pipelining the RCPTs and DATA are answered too; read them and discard.
                    self.state = if self.pipelining {
                        TxState::AwaitRcpt(0)
                    } else {
                        TxState::Done
                    };
                    if !self.pipelining {
                        return TxStep::Done { needs_reset: true };
                    }
                    return TxStep::Continue;
                }
                self.state = TxState::AwaitRcpt(0);
                if !self.pipelining {
                    write_command(out, &[&self.recipients_of(envelope, 0)]);
                }
                TxStep::Continue
            }
            TxState::AwaitRcpt(i) => {
                let mail_failed =
                    !self.results.is_empty() && self.accepted == 0 && self.rcpt_replies.iter().all(Option::is_none);
                if !mail_failed {
                    if reply.is_positive() {
                        self.accepted += 1;
                    } else {
                        self.results
                            .push((self.rcpt_indexes[i], classify(reply.clone(), false)));
                    }
                    self.rcpt_replies[i] = Some(reply);
                }
                let next = i + 1;
                if next < self.rcpt_indexes.len() {
                    self.state = TxState::AwaitRcpt(next);
                    if !self.pipelining {
                        write_command(out, &[&self.recipients_of(envelope, next)]);
                    }
                    return TxStep::Continue;
                }
                if self.pipelining {
                    // The next reply answers DATA, or (CHUNKING) the whole BDAT chunk.
                    self.state = if self.chunking {
                        TxState::AwaitFinal
                    } else {
                        TxState::AwaitData
                    };
                    return TxStep::Continue;
                }
                if self.accepted == 0 {
                    self.state = TxState::Done;
                    return TxStep::Done { needs_reset: true };
                }
                if self.chunking {
                    self.write_bdat(out);
                    self.state = TxState::AwaitFinal;
                    return TxStep::SendRaw;
                }
                self.state = TxState::AwaitData;
                write_command(out, &[b"DATA"]);
                TxStep::Continue
            }
            TxState::AwaitData => {
                if self.accepted == 0 || self.results.len() == self.rcpt_indexes.len() {
                    // Nothing accepted: DATA was refused (or must not be used); end here.
                    self.state = TxState::Done;
                    return TxStep::Done { needs_reset: true };
                }
                if reply.code != 354 {
                    self.settle_rest(&reply);
                    self.state = TxState::Done;
                    return TxStep::Done { needs_reset: true };
                }
                self.state = TxState::AwaitFinal;
                TxStep::SendContent
            }
            TxState::AwaitFinal => {
                if self.accepted == 0 {
                    // A pipelined BDAT chunk after refused recipients: its reply is an error
                    // that changes nothing; the recipients' own replies stand.
                    self.state = TxState::Done;
                    return TxStep::Done { needs_reset: true };
                }
                for (i, idx) in self.rcpt_indexes.iter().enumerate() {
                    if self.rcpt_replies[i].as_ref().is_some_and(|r| r.is_positive()) {
                        self.results.push((*idx, classify(reply.clone(), true)));
                    }
                }
                self.state = TxState::Done;
                TxStep::Done { needs_reset: false }
            }
            TxState::Done => TxStep::Done { needs_reset: false },
        }
    }

    /// The connection broke or timed out: every recipient without a result is deferred.
    /// Returns whether the content had been sent completely (a possible duplicate delivery).
    pub fn broken(&mut self, why: &str) -> bool {
        let after_dot = self.state == TxState::AwaitFinal;
        let reply = ServerReply::new(421, why);
        for idx in self.rcpt_indexes.clone() {
            if !self.results.iter().any(|(r, _)| *r == idx) {
                self.results.push((idx, RecipientResult::Deferred(reply.clone())));
            }
        }
        self.state = TxState::Done;
        after_dot
    }

    /// The next reply is the one after the content (the final reply).
    pub fn awaiting_final(&self) -> bool {
        self.state == TxState::AwaitFinal
    }

    pub fn is_done(&self) -> bool {
        self.state == TxState::Done
    }

    /// Results per recipient index (every recipient has one once the transaction is done).
    pub fn results(&self) -> &[(u32, RecipientResult)] {
        &self.results
    }
}

fn classify(reply: ServerReply, final_reply: bool) -> RecipientResult {
    match reply.class() {
        2 if final_reply => RecipientResult::Delivered(reply),
        5 => RecipientResult::Failed(reply),
        _ => RecipientResult::Deferred(reply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, text: &str) -> ServerReply {
        ServerReply::new(code, text)
    }

    #[test]
    fn a_line_of_invalid_utf8_stays_within_the_line_limit() {
        let mut input = b"250 ".to_vec();
        input.extend(std::iter::repeat_n(0xff, REPLY_LINE_BYTES_MAX - 4));
        input.extend_from_slice(b"\r\n");
        let (reply, used) = ReplyParser::default().parse(&input).unwrap();
        assert_eq!(used, input.len());
        let reply = reply.unwrap();
        assert!(reply.lines[0].len() <= REPLY_LINE_BYTES_MAX, "{}", reply.lines[0].len());
        assert!(reply.lines[0].starts_with('\u{fffd}'));
    }

    #[test]
    fn parses_single_and_multiline_replies_across_reads() {
        let mut p = ReplyParser::default();
        assert_eq!(
            p.parse(b"220 mx.example ESMTP\r\n250-a"),
            Ok((Some(reply(220, "mx.example ESMTP")), 22))
        );
        // Continuation lines are consumed into the parser; the partial line is left.
        assert_eq!(p.parse(b"250-mx\r\n250-PIPELIN"), Ok((None, 8)));
        assert_eq!(
            p.parse(b"250-PIPELINING\r\n250 SIZE 1000\r\n"),
            Ok((
                Some(ServerReply {
                    code: 250,
                    lines: vec!["mx".into(), "PIPELINING".into(), "SIZE 1000".into()],
                }),
                31
            ))
        );
        assert_eq!(p.parse(b"xyz\r\n"), Err(ReplyError::Malformed));
        let mut p = ReplyParser::default();
        assert_eq!(p.parse(b"250-a\r\n251 b\r\n"), Err(ReplyError::Malformed));
        let mut p = ReplyParser::default();
        assert_eq!(p.parse(&vec![b'2'; 5000]), Err(ReplyError::TooLong));
    }

    #[test]
    fn reads_capabilities() {
        let caps = Capabilities::from_ehlo_lines(
            [
                "mx.example",
                "PIPELINING",
                "SIZE 10240000",
                "8BITMIME",
                "SMTPUTF8",
                "CHUNKING",
                "STARTTLS",
                "DSN",
            ]
            .into_iter(),
        );
        assert!(caps.pipelining && caps.eightbitmime && caps.smtputf8 && caps.chunking && caps.starttls && caps.dsn);
        assert_eq!(caps.size_bytes_max, Some(10_240_000));
        assert!(!caps.auth_plain);
        assert!(Capabilities::from_ehlo_lines(["mx", "AUTH LOGIN PLAIN"].into_iter()).auth_plain);
    }

    fn envelope(recipients: &[&'static str]) -> OutboundEnvelope<'static> {
        OutboundEnvelope {
            sender: b"s@x.test",
            recipients: recipients
                .iter()
                .enumerate()
                .map(|(i, r)| (i as u32, r.as_bytes()))
                .collect(),
            content_bytes: 100,
            eightbit: false,
            smtputf8: false,
        }
    }

    #[test]
    fn pipelined_transaction_with_mixed_recipient_replies() {
        let caps = Capabilities {
            esmtp: true,
            pipelining: true,
            size_bytes_max: Some(0),
            eightbitmime: true,
            ..Default::default()
        };
        let env = OutboundEnvelope {
            eightbit: true,
            ..envelope(&["a@y", "b@y", "c@y"])
        };
        let mut out = Vec::new();
        let mut tx = Transaction::begin(&env, &caps, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "MAIL FROM:<s@x.test> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<a@y>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nDATA\r\n"
        );
        out.clear();
        assert_eq!(tx.on_reply(reply(250, "ok"), &env, &mut out), TxStep::Continue);
        assert_eq!(tx.on_reply(reply(250, "ok"), &env, &mut out), TxStep::Continue);
        assert_eq!(
            tx.on_reply(reply(550, "no such user"), &env, &mut out),
            TxStep::Continue
        );
        assert_eq!(tx.on_reply(reply(450, "try later"), &env, &mut out), TxStep::Continue);
        assert_eq!(tx.on_reply(reply(354, "go"), &env, &mut out), TxStep::SendContent);
        assert_eq!(
            tx.on_reply(reply(250, "queued"), &env, &mut out),
            TxStep::Done { needs_reset: false }
        );
        assert!(out.is_empty());
        let mut results = tx.results().to_vec();
        results.sort_by_key(|(i, _)| *i);
        assert_eq!(
            results,
            vec![
                (0, RecipientResult::Delivered(reply(250, "queued"))),
                (1, RecipientResult::Failed(reply(550, "no such user"))),
                (2, RecipientResult::Deferred(reply(450, "try later"))),
            ]
        );
    }

    #[test]
    fn lockstep_transaction_without_pipelining() {
        let caps = Capabilities::default();
        let env = envelope(&["a@y", "b@y"]);
        let mut out = Vec::new();
        let mut tx = Transaction::begin(&env, &caps, &mut out).unwrap();
        assert_eq!(out, b"MAIL FROM:<s@x.test>\r\n");
        out.clear();
        tx.on_reply(reply(250, "ok"), &env, &mut out);
        assert_eq!(out, b"RCPT TO:<a@y>\r\n");
        out.clear();
        tx.on_reply(reply(250, "ok"), &env, &mut out);
        assert_eq!(out, b"RCPT TO:<b@y>\r\n");
        out.clear();
        tx.on_reply(reply(250, "ok"), &env, &mut out);
        assert_eq!(out, b"DATA\r\n");
        out.clear();
        assert_eq!(tx.on_reply(reply(354, "go"), &env, &mut out), TxStep::SendContent);
        assert_eq!(
            tx.on_reply(reply(451, "local error"), &env, &mut out),
            TxStep::Done { needs_reset: false }
        );
        assert!(tx
            .results()
            .iter()
            .all(|(_, r)| matches!(r, RecipientResult::Deferred(_))));
        assert_eq!(tx.results().len(), 2);
    }

    #[test]
    fn refused_sender_settles_everyone_and_asks_for_reset() {
        let caps = Capabilities {
            pipelining: true,
            ..Default::default()
        };
        let env = envelope(&["a@y", "b@y"]);
        let mut out = Vec::new();
        let mut tx = Transaction::begin(&env, &caps, &mut out).unwrap();
        assert_eq!(
            tx.on_reply(reply(553, "sender rejected"), &env, &mut out),
            TxStep::Continue
        );
        assert_eq!(tx.on_reply(reply(503, "need mail"), &env, &mut out), TxStep::Continue);
        assert_eq!(tx.on_reply(reply(503, "need mail"), &env, &mut out), TxStep::Continue);
        assert_eq!(
            tx.on_reply(reply(503, "need rcpt"), &env, &mut out),
            TxStep::Done { needs_reset: true }
        );
        assert_eq!(tx.results().len(), 2);
        assert!(tx
            .results()
            .iter()
            .all(|(_, r)| matches!(r, RecipientResult::Failed(x) if x.code == 553)));
    }

    #[test]
    fn all_recipients_refused_means_no_content() {
        let caps = Capabilities {
            pipelining: true,
            ..Default::default()
        };
        let env = envelope(&["a@y"]);
        let mut out = Vec::new();
        let mut tx = Transaction::begin(&env, &caps, &mut out).unwrap();
        tx.on_reply(reply(250, "ok"), &env, &mut out);
        tx.on_reply(reply(550, "unknown"), &env, &mut out);
        assert_eq!(
            tx.on_reply(reply(554, "no valid recipients"), &env, &mut out),
            TxStep::Done { needs_reset: true }
        );
        assert_eq!(tx.results(), &[(0, RecipientResult::Failed(reply(550, "unknown")))]);
    }

    #[test]
    fn a_connection_lost_after_the_dot_defers_and_flags_a_possible_duplicate() {
        let caps = Capabilities {
            pipelining: true,
            ..Default::default()
        };
        let env = envelope(&["a@y"]);
        let mut out = Vec::new();
        let mut tx = Transaction::begin(&env, &caps, &mut out).unwrap();
        tx.on_reply(reply(250, "ok"), &env, &mut out);
        tx.on_reply(reply(250, "ok"), &env, &mut out);
        assert_eq!(tx.on_reply(reply(354, "go"), &env, &mut out), TxStep::SendContent);
        assert!(tx.broken("connection lost"));
        assert!(matches!(tx.results(), [(0, RecipientResult::Deferred(_))]));
    }

    #[test]
    fn chunking_sends_the_whole_transaction_in_one_write() {
        let caps = Capabilities {
            pipelining: true,
            chunking: true,
            ..Default::default()
        };
        let env = envelope(&["a@y", "b@y"]);
        let mut out = Vec::new();
        let mut tx = Transaction::begin(&env, &caps, &mut out).unwrap();
        assert!(tx.wants_content_now());
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            "MAIL FROM:<s@x.test>\r\nRCPT TO:<a@y>\r\nRCPT TO:<b@y>\r\nBDAT 100 LAST\r\n"
        );
        out.clear();
        tx.on_reply(reply(250, "ok"), &env, &mut out);
        tx.on_reply(reply(250, "ok"), &env, &mut out);
        assert_eq!(tx.on_reply(reply(550, "no"), &env, &mut out), TxStep::Continue);
        assert_eq!(
            tx.on_reply(reply(250, "queued"), &env, &mut out),
            TxStep::Done { needs_reset: false }
        );
        let mut results = tx.results().to_vec();
        results.sort_by_key(|(i, _)| *i);
        assert_eq!(
            results,
            vec![
                (0, RecipientResult::Delivered(reply(250, "queued"))),
                (1, RecipientResult::Failed(reply(550, "no")))
            ]
        );
        // Without PIPELINING: BDAT after the last RCPT reply, content raw.
        let caps = Capabilities {
            chunking: true,
            ..Default::default()
        };
        let env = envelope(&["a@y"]);
        let mut out = Vec::new();
        let mut tx = Transaction::begin(&env, &caps, &mut out).unwrap();
        assert!(!tx.wants_content_now());
        out.clear();
        tx.on_reply(reply(250, "ok"), &env, &mut out);
        out.clear();
        assert_eq!(tx.on_reply(reply(250, "ok"), &env, &mut out), TxStep::SendRaw);
        assert_eq!(out, b"BDAT 100 LAST\r\n");
        // Every recipient refused in a pipelined chunked transaction: the chunk reply changes nothing.
        let caps = Capabilities {
            pipelining: true,
            chunking: true,
            ..Default::default()
        };
        let mut tx = Transaction::begin(&env, &caps, &mut Vec::new()).unwrap();
        tx.on_reply(reply(250, "ok"), &env, &mut out);
        tx.on_reply(reply(550, "no"), &env, &mut out);
        assert_eq!(
            tx.on_reply(reply(503, "no valid recipients"), &env, &mut out),
            TxStep::Done { needs_reset: true }
        );
        assert_eq!(tx.results(), &[(0, RecipientResult::Failed(reply(550, "no")))]);
    }

    #[test]
    fn size_and_smtputf8_are_checked_before_sending() {
        let mut env = envelope(&["a@y"]);
        env.content_bytes = 2000;
        let caps = Capabilities {
            size_bytes_max: Some(1000),
            ..Default::default()
        };
        assert_eq!(
            Transaction::begin(&env, &caps, &mut Vec::new()).unwrap_err(),
            Unsendable::TooBig { limit: 1000 }
        );
        env.content_bytes = 10;
        env.smtputf8 = true;
        assert_eq!(
            Transaction::begin(&env, &caps, &mut Vec::new()).unwrap_err(),
            Unsendable::NeedsSmtpUtf8
        );
        env.smtputf8 = false;
        env.eightbit = true;
        assert_eq!(
            Transaction::begin(&env, &caps, &mut Vec::new()).unwrap_err(),
            Unsendable::Needs8BitMime
        );
        let caps = Capabilities {
            eightbitmime: true,
            ..caps
        };
        let mut out = Vec::new();
        Transaction::begin(&env, &caps, &mut out).unwrap();
        assert!(
            out.starts_with(b"MAIL FROM:<s@x.test> SIZE=10 BODY=8BITMIME\r\n"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
}
