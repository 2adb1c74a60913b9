//! The inbound SMTP session as a sans-IO state machine (RFC 5321, with PIPELINING, SIZE, 8BITMIME,
//! SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING, DSN, STARTTLS and AUTH).
//!
//! The shell feeds received bytes to [`Session::receive`], which consumes as many as it can,
//! appends replies to an output buffer and says what the shell must do next ([`Next`]). Replies to
//! pipelined commands accumulate in the output buffer; the shell writes them in one go once the
//! session needs more input (RFC 2920 section 3.1). Message content goes straight from the input
//! buffer into a [`MessageSink`] (the spool's write buffer); the session never holds a copy.
//!
//! Invariants:
//! - An incomplete command line is never consumed; the shell keeps it and reads more.
//! - A command line longer than `line_length_max` is answered once and then discarded as it
//!   streams in, so it never has to fit in any buffer.
//! - `250` for a message is only written by [`Session::committed`], i.e. after the spool said the
//!   bytes are durable.
//! - After `220` to STARTTLS the session consumes nothing more until [`Session::tls_started`]; the
//!   shell throws away whatever the client pipelined behind STARTTLS (CVE-2011-0411), and the
//!   session starts over as if just greeted.
//! - AUTH is offered and accepted only once TLS is on; the session decodes the SASL exchange and
//!   the shell checks the password ([`Next::Authenticate`]).

use std::net::IpAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::address::{AddressError, Path};
use crate::data::{BareLineEndingScanner, BareLineEndings, DataDecoder};
use crate::deadline::{Deadlines, Expiry, Now, Timeouts};
use crate::envelope::{notify, BodyType, Envelope, Origin, Ret};
use crate::identity::Identity;
use crate::limits::{ENVID_BYTES_MAX, MAIL_AUTH_BYTES_MAX, ORCPT_BYTES_MAX, TARPIT_DELAY_MAX};
use crate::parser::{parse_command, Command, Params, ParseError};
use crate::policy::{RelayDecision, RelayPolicy};
use crate::received::{write_received, TlsSummary, Trace};
use crate::reply::{self, write_line, Reply};
use crate::sasl::{self, Credentials, Mechanism, SaslError};

/// The session's fixed settings, shared by every session of a shard.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    /// Longest command line, CRLF included.
    pub line_length_max: usize,
    pub message_size_max: u64,
    pub recipients_max: usize,
    /// After this many error replies the session is closed with 421.
    pub errors_max: u32,
    pub bare_line_endings: BareLineEndings,
    pub relay: RelayPolicy,
    /// Recipients accepted over one connection, all transactions together.
    pub recipients_per_session_max: usize,
    /// Error replies past this count are delayed by `tarpit_delay` times the excess.
    pub tarpit_after_errors: u32,
    pub tarpit_delay: Duration,
    /// An authenticated user's MAIL FROM must be one of its own addresses.
    pub sender_must_match: bool,
    /// Deadlines for command lines and content.
    pub timeouts: Timeouts,
    /// NOOP, RSET, VRFY and HELP past this many since the last accepted message count as errors
    /// (Postfix's `smtpd_junk_command_limit`): a client cannot hold a session with them.
    pub junk_commands_max: u32,
}

/// What the listener a session arrived on offers and demands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerRules {
    /// STARTTLS is offered (until TLS is on).
    pub starttls: bool,
    /// AUTH is offered once TLS is on (a listener that allows it, and a password file).
    pub auth: bool,
    /// MAIL needs AUTH first (submission).
    pub auth_required: bool,
    /// The shell checks the sender (SPF, on mx listeners) of a client that did not
    /// authenticate before MAIL is answered: [`Next::CheckSender`].
    pub check_sender: bool,
}

/// Per-client message rates, kept by the shell (the shard). `admit_message` takes one message
/// from the client's allowance, or says it is spent.
pub trait MessageGate {
    fn admit_message(&self, client_ip: IpAddr, user: Option<&str>) -> bool;
}

/// A gate that admits everything (tests, benchmarks, fuzzing).
pub struct OpenGate;

impl MessageGate for OpenGate {
    fn admit_message(&self, _client_ip: IpAddr, _user: Option<&str>) -> bool {
        true
    }
}

/// The shell's verdict on credentials handed over with [`Next::Authenticate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthOutcome {
    Success(Identity),
    /// Wrong user name or password: 535 5.7.8.
    Invalid,
    /// Too many failures from this address: 421 4.7.0 and close.
    Blocked,
    /// The user list cannot be consulted: 454 4.7.0.
    Unavailable,
}

/// The shell's verdict on the sender handed over with [`Next::CheckSender`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderVerdict {
    /// 250: the transaction opens.
    Accept,
    /// The shell's refusal (a 4xx or 5xx code, its enhanced code and one sentence); the
    /// transaction does not open.
    Refuse {
        code: u16,
        enhanced: &'static str,
        text: String,
    },
}

/// Where message content goes while it streams in. The spool implements this with its aligned
/// write buffers; tests use a `Vec`.
pub trait MessageSink {
    /// Starts a message with this envelope. On error the content is still read and discarded,
    /// and the message is refused with 452 at its end.
    fn begin(&mut self, envelope: &Envelope, origin: Origin<'_>) -> Result<(), SinkFull>;
    /// Appends content. On error the same applies as for `begin`.
    fn append(&mut self, bytes: &[u8]) -> Result<(), SinkFull>;
    /// Drops the message being built (refused, reset or connection lost).
    fn abandon(&mut self);
    /// Whether a relayed recipient (the client is on a trusted network or authenticated) is
    /// on the shell's suppression list for this `sender`: the sentence of the `550 5.1.1`
    /// reply that refuses it. Mail for local domains and `<Postmaster>` is never asked about.
    fn suppressed(&mut self, _recipient: &crate::address::Mailbox<'_>, _sender: &[u8]) -> Option<String> {
        None
    }
    /// Whether a recipient at one of the local domains has no mailbox here (e.g. an address
    /// at the bounce domain that is neither a return path nor the complaints address): the
    /// sentence of the `550 5.1.1` reply.
    fn unknown_local(&mut self, _recipient: &crate::address::Mailbox<'_>) -> Option<String> {
        None
    }
}

/// The sink has no room for this message (its memory budget is spent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkFull;

/// Why a finished message was not made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitError {
    /// No room: the spool is at its size limit or the disk is (nearly) full. 452 4.3.1.
    NoSpace,
    /// A write or fdatasync failed. 451 4.3.0.
    Io,
    /// The shell judged the content and refused it (mail authentication under enforcement);
    /// the reply says why in one sentence.
    Refused {
        code: u16,
        enhanced: &'static str,
        text: String,
    },
}

/// Why a transaction step was refused: the `reason` label of the shell's
/// `gannet_messages_rejected_total`, derived from the refusal's enhanced status code.
pub const REJECTION_REASONS: [&str; 11] = [
    "relay_denied",
    "authentication",
    "auth_required",
    "rate_limited",
    "address",
    "too_many_recipients",
    "size",
    "storage",
    "content",
    "protocol",
    "other",
];

/// Counts of refusals by [`REJECTION_REASONS`] index.
pub type Rejections = [u32; REJECTION_REASONS.len()];

/// The [`REJECTION_REASONS`] index for a refusal with this enhanced status code.
pub fn rejection_reason(enhanced: &str) -> usize {
    let mut parts = enhanced.splitn(3, '.');
    let (class, subject, detail) = (parts.next(), parts.next(), parts.next());
    let reason = match (class, subject, detail) {
        (Some("5"), Some("7"), Some("1")) => "relay_denied",
        // RFC 7372: the sender's SPF, DKIM or DMARC (x.7.20 to x.7.29).
        (_, Some("7"), Some(d)) if d.len() == 2 && d.starts_with('2') => "authentication",
        (_, Some("7"), Some("0" | "8" | "57")) => "auth_required",
        (Some("4"), Some("7"), _) => "rate_limited",
        (_, Some("5"), Some("3")) => "too_many_recipients",
        (_, Some("1"), _) => "address",
        (_, Some("3"), Some("4")) | (_, Some("2"), Some("3")) => "size",
        (_, Some("3"), Some("0" | "1")) => "storage",
        (_, Some("6"), _) => "content",
        (_, Some("5"), _) => "protocol",
        _ => "other",
    };
    REJECTION_REASONS
        .iter()
        .position(|r| *r == reason)
        .unwrap_or(REJECTION_REASONS.len() - 1)
}

/// What the shell must do after [`Session::receive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Flush replies, then read more input.
    NeedInput,
    /// Commit the message in the sink to the spool, then call [`Session::committed`].
    Commit,
    /// Flush replies and close the connection.
    Close,
    /// Flush replies (the 220), throw away any input already received, run the TLS handshake,
    /// then call [`Session::tls_started`].
    StartTls,
    /// Check [`Session::take_credentials`], then call [`Session::authenticated`].
    Authenticate,
    /// Check the sender of [`Session::envelope`] (MAIL was accepted so far), then call
    /// [`Session::sender_checked`].
    CheckSender,
}

/// What one call to [`Session::receive`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub consumed: usize,
    pub next: Next,
}

/// Where the session is. One variant per protocol state.
#[derive(Debug)]
enum Phase {
    /// Connected, greeting sent, no HELO/EHLO yet.
    Greeted,
    /// HELO/EHLO done, no transaction open.
    Idle,
    /// MAIL accepted; RCPT, DATA or BDAT may follow.
    Mail,
    /// Reading DATA content.
    Data(DataDecoder),
    /// Reading a BDAT chunk of `chunk_bytes` into the message.
    Bdat {
        remaining_bytes: u64,
        chunk_bytes: u64,
        last: bool,
    },
    /// Between BDAT chunks of one message.
    BdatBetween,
    /// Reading a refused BDAT chunk, to throw it away. `reply` is sent once it is consumed.
    BdatDiscard {
        remaining_bytes: u64,
        reply: Reply,
    },
    /// Waiting for the spool.
    Committing,
    /// 220 sent to STARTTLS; waiting for the handshake.
    StartingTls,
    /// Reading the client's next SASL response.
    Auth(AuthStep),
    /// Credentials decoded; waiting for the shell's check.
    Authenticating,
    /// MAIL parsed and allowed so far; waiting for the shell's check of the sender.
    CheckingSender,
    Closed,
}

/// Which SASL response the client owes.
#[derive(Debug)]
enum AuthStep {
    /// PLAIN without an initial response: `authzid NUL authcid NUL passwd`.
    PlainResponse,
    LoginUser,
    LoginPassword {
        user: String,
    },
}

/// Per-message facts gathered while the content streams in.
#[derive(Debug, Default)]
struct Content {
    size_bytes: u64,
    too_big: bool,
    sink_full: bool,
    /// A bare CR or LF was seen (DATA decoder or BDAT scanner).
    bare_line_ending: bool,
    bare_scanner: BareLineEndingScanner,
    /// When the content began (the Received header's time).
    received_unix_s: u64,
}

pub struct Session {
    config: Rc<SessionConfig>,
    rules: ListenerRules,
    gate: Rc<dyn MessageGate>,
    client_ip: IpAddr,
    phase: Phase,
    tls: Option<TlsSummary>,
    user: Option<Identity>,
    credentials: Option<Credentials>,
    /// Recipients accepted in this session, all transactions together.
    recipients_accepted: usize,
    /// How long the shell should wait before sending the replies now pending (tarpit).
    reply_delay: Duration,
    helo: Vec<u8>,
    esmtp: bool,
    envelope: Envelope,
    /// RCPT commands seen in this transaction, accepted or not.
    recipients_attempted: u32,
    content: Content,
    errors: u32,
    /// The rest of an overlong command line is being thrown away.
    discarding_line: bool,
    /// The time of the latest call from the shell.
    now: Now,
    deadlines: Deadlines,
    /// NOOP, RSET, VRFY and HELP since the last accepted message.
    junk_commands: u32,
    /// The command being answered is MAIL, RCPT, DATA or BDAT (or the content's end): its
    /// refusals count as rejections.
    transaction_step: bool,
    /// Refusals of transaction steps since the shell last took them.
    rejections: Rejections,
}

impl Session {
    pub fn new(
        config: Rc<SessionConfig>,
        rules: ListenerRules,
        gate: Rc<dyn MessageGate>,
        client_ip: IpAddr,
        now: Now,
    ) -> Session {
        Session {
            config,
            rules,
            gate,
            client_ip,
            phase: Phase::Greeted,
            tls: None,
            user: None,
            credentials: None,
            recipients_accepted: 0,
            reply_delay: Duration::ZERO,
            helo: Vec::new(),
            esmtp: false,
            envelope: Envelope::default(),
            recipients_attempted: 0,
            content: Content::default(),
            errors: 0,
            discarding_line: false,
            now,
            deadlines: Deadlines::new(now.instant),
            junk_commands: 0,
            transaction_step: false,
            rejections: [0; REJECTION_REASONS.len()],
        }
    }

    /// The 220 greeting; the wait for the first command starts now.
    pub fn greeting(&mut self, now: Instant, out: &mut Vec<u8>) {
        self.deadlines.line_done(now);
        let text = format!("{} ESMTP Gannet", self.config.hostname);
        write_line(out, 220, ' ', "", text.as_bytes());
    }

    /// TLS is on from the first byte (implicit TLS, RFC 8314): STARTTLS is not offered.
    pub fn with_implicit_tls(mut self, summary: TlsSummary) -> Session {
        self.tls = Some(summary);
        self
    }

    /// The handshake after STARTTLS succeeded: the session starts over (RFC 3207 4.2: the
    /// client must say EHLO again, and nothing learnt before TLS is kept).
    pub fn tls_started(&mut self, summary: TlsSummary, now: Instant) {
        debug_assert!(matches!(self.phase, Phase::StartingTls));
        self.deadlines.line_done(now);
        self.tls = Some(summary);
        self.helo.clear();
        self.esmtp = false;
        self.end_transaction();
        self.phase = Phase::Greeted;
    }

    /// The client's address.
    pub fn client_ip(&self) -> IpAddr {
        self.client_ip
    }

    /// The TLS the session runs over, if any.
    pub fn tls(&self) -> Option<&TlsSummary> {
        self.tls.as_ref()
    }

    /// The user this session authenticated as.
    pub fn user(&self) -> Option<&Identity> {
        self.user.as_ref()
    }

    /// The credentials to check after [`Next::Authenticate`].
    pub fn take_credentials(&mut self) -> Option<Credentials> {
        self.credentials.take()
    }

    /// The shell's verdict on the credentials.
    pub fn authenticated(
        &mut self,
        outcome: AuthOutcome,
        now: Instant,
        sink: &mut impl MessageSink,
        out: &mut Vec<u8>,
    ) {
        debug_assert!(matches!(self.phase, Phase::Authenticating));
        self.deadlines.line_done(now);
        self.phase = Phase::Idle;
        match outcome {
            AuthOutcome::Success(identity) => {
                self.user = Some(identity);
                reply::AUTH_OK.write(out);
            }
            AuthOutcome::Invalid => self.error(reply::AUTH_INVALID, sink, out),
            AuthOutcome::Blocked => self.close_with(reply::AUTH_BLOCKED, sink, out),
            AuthOutcome::Unavailable => self.error(reply::AUTH_UNAVAILABLE, sink, out),
        }
    }

    /// The shell's verdict on the sender handed over with [`Next::CheckSender`]: 250 and the
    /// transaction opens, or the refusal and it does not.
    pub fn sender_checked(
        &mut self,
        verdict: SenderVerdict,
        now: Instant,
        sink: &mut impl MessageSink,
        out: &mut Vec<u8>,
    ) {
        debug_assert!(matches!(self.phase, Phase::CheckingSender));
        self.deadlines.line_done(now);
        match verdict {
            SenderVerdict::Accept => {
                self.phase = Phase::Mail;
                reply::SENDER_OK.write(out);
            }
            SenderVerdict::Refuse { code, enhanced, text } => {
                debug_assert!((400..600).contains(&code));
                self.envelope.clear();
                self.phase = Phase::Idle;
                self.error_text(code, enhanced, &text, sink, out);
            }
        }
    }

    /// How long to hold back the replies now pending (tarpitting a client that keeps erring);
    /// resets to zero.
    pub fn take_reply_delay(&mut self) -> Duration {
        std::mem::take(&mut self.reply_delay)
    }

    /// The envelope of the transaction in progress (for the shell's log and queue index).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Where the transaction in progress comes from, stamped with the time its content began.
    pub fn origin(&self) -> Origin<'_> {
        Origin {
            client_ip: self.client_ip,
            helo: &self.helo,
            received_unix_s: self.content.received_unix_s,
        }
    }

    /// A mail transaction is open (MAIL accepted and not yet finished).
    pub fn in_transaction(&self) -> bool {
        matches!(
            self.phase,
            Phase::Mail | Phase::Data(_) | Phase::Bdat { .. } | Phase::BdatBetween | Phase::Committing
        ) || matches!(self.phase, Phase::BdatDiscard { .. } if self.envelope.recipient_count() > 0)
    }

    /// Message content is streaming in: the data timeout applies rather than the command timeout.
    pub fn receiving_content(&self) -> bool {
        matches!(
            self.phase,
            Phase::Data(_) | Phase::Bdat { .. } | Phase::BdatDiscard { .. }
        )
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// The instant by which the session must be looked at again ([`Session::check_deadline`])
    /// while it waits for input; `None` while the shell, not the client, owes the next step.
    /// `stressed`: the shard is nearly full of sessions (shorter waits).
    pub fn deadline(&self, stressed: bool) -> Option<Instant> {
        let t = &self.config.timeouts;
        match self.phase {
            Phase::Data(_) | Phase::Bdat { .. } | Phase::BdatDiscard { .. } => {
                Some(self.deadlines.content_deadline(t, stressed))
            }
            Phase::Greeted | Phase::Idle | Phase::Mail | Phase::BdatBetween | Phase::Auth(_) => {
                Some(self.deadlines.command_deadline(t, stressed))
            }
            Phase::Committing | Phase::StartingTls | Phase::Authenticating | Phase::CheckingSender | Phase::Closed => {
                None
            }
        }
    }

    /// Checks the deadlines at `now`. When one has passed, writes `421 4.4.2`, closes the session
    /// and says which.
    pub fn check_deadline(
        &mut self,
        now: Instant,
        stressed: bool,
        sink: &mut impl MessageSink,
        out: &mut Vec<u8>,
    ) -> Option<Expiry> {
        let t = self.config.timeouts;
        let expiry = match self.phase {
            Phase::Data(_) | Phase::Bdat { .. } | Phase::BdatDiscard { .. } => {
                self.deadlines.check_content(now, &t, stressed)
            }
            Phase::Greeted | Phase::Idle | Phase::Mail | Phase::BdatBetween | Phase::Auth(_) => {
                self.deadlines.check_command(now, &t, stressed)
            }
            Phase::Committing | Phase::StartingTls | Phase::Authenticating | Phase::CheckingSender | Phase::Closed => {
                None
            }
        };
        if expiry.is_some() {
            self.close_with(reply::TIMEOUT, sink, out);
        }
        expiry
    }

    /// The server is shutting down: 421 4.3.2 and close.
    pub fn shutting_down(&mut self, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        self.close_with(reply::SHUTTING_DOWN, sink, out);
    }

    fn close_with(&mut self, reply: Reply, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        if !self.is_closed() {
            if self.in_transaction() {
                sink.abandon();
            }
            reply.write(out);
            self.phase = Phase::Closed;
        }
    }

    /// The spool's answer for the message handed over with [`Next::Commit`].
    pub fn committed(&mut self, result: Result<&str, CommitError>, now: Instant, out: &mut Vec<u8>) {
        debug_assert!(matches!(self.phase, Phase::Committing));
        self.deadlines.line_done(now);
        match result {
            Ok(id) => {
                self.junk_commands = 0;
                let text = format!("Ok: queued as {id}");
                write_line(out, 250, ' ', "2.0.0", text.as_bytes());
            }
            // The shell counts these itself (it knows the spool's reason).
            Err(CommitError::NoSpace) => reply::NO_STORAGE.write(out),
            Err(CommitError::Io) => reply::SPOOL_ERROR.write(out),
            Err(CommitError::Refused { code, enhanced, text }) => {
                debug_assert!((400..600).contains(&code));
                write_line(out, code, ' ', enhanced, text.as_bytes());
            }
        }
        self.end_transaction();
    }

    fn end_transaction(&mut self) {
        self.envelope.clear();
        self.recipients_attempted = 0;
        self.content = Content::default();
        self.deadlines.content_ends();
        self.phase = Phase::Idle;
    }

    /// Consumes input, writing replies to `out`. Stops when input runs out, a message must be
    /// committed, or the session closes.
    pub fn receive(&mut self, input: &[u8], now: Now, sink: &mut impl MessageSink, out: &mut Vec<u8>) -> Step {
        self.now = now;
        let mut pos = 0;
        loop {
            match self.phase {
                Phase::Closed => {
                    return Step {
                        consumed: pos,
                        next: Next::Close,
                    }
                }
                Phase::Committing => {
                    return Step {
                        consumed: pos,
                        next: Next::Commit,
                    }
                }
                Phase::StartingTls => {
                    return Step {
                        consumed: pos,
                        next: Next::StartTls,
                    }
                }
                Phase::Authenticating => {
                    return Step {
                        consumed: pos,
                        next: Next::Authenticate,
                    }
                }
                Phase::CheckingSender => {
                    return Step {
                        consumed: pos,
                        next: Next::CheckSender,
                    }
                }
                Phase::Data(_) => {
                    let (used, end) = self.receive_data(&input[pos..], sink);
                    self.deadlines.content_bytes(used);
                    pos += used;
                    if !end {
                        return Step {
                            consumed: pos,
                            next: Next::NeedInput,
                        };
                    }
                    if let Some(next) = self.finish_message(sink, out) {
                        return Step { consumed: pos, next };
                    }
                }
                Phase::Bdat { .. } | Phase::BdatDiscard { .. } => {
                    let used = self.receive_chunk(&input[pos..], sink, out);
                    self.deadlines.content_bytes(used);
                    pos += used;
                    if matches!(self.phase, Phase::Bdat { .. } | Phase::BdatDiscard { .. }) {
                        return Step {
                            consumed: pos,
                            next: Next::NeedInput,
                        };
                    }
                    if matches!(self.phase, Phase::Committing) {
                        return Step {
                            consumed: pos,
                            next: Next::Commit,
                        };
                    }
                }
                Phase::Greeted | Phase::Idle | Phase::Mail | Phase::BdatBetween | Phase::Auth(_) => {
                    let rest = &input[pos..];
                    if self.discarding_line {
                        match memchr::memchr(b'\n', rest) {
                            Some(lf) => {
                                pos += lf + 1;
                                self.discarding_line = false;
                                self.deadlines.line_done(now.instant);
                                continue;
                            }
                            None => {
                                return Step {
                                    consumed: input.len(),
                                    next: Next::NeedInput,
                                }
                            }
                        }
                    }
                    let Some(lf) = memchr::memchr(b'\n', rest) else {
                        if rest.len() >= self.config.line_length_max {
                            self.discarding_line = true;
                            self.error(reply::LINE_TOO_LONG, sink, out);
                            continue;
                        }
                        return Step {
                            consumed: pos,
                            next: Next::NeedInput,
                        };
                    };
                    pos += lf + 1;
                    self.deadlines.line_done(now.instant);
                    if lf + 1 > self.config.line_length_max {
                        self.error(reply::LINE_TOO_LONG, sink, out);
                        continue;
                    }
                    let line = &rest[..lf];
                    let Some(line) = line.strip_suffix(b"\r") else {
                        self.error(reply::BARE_LF_COMMAND, sink, out);
                        continue;
                    };
                    if line.contains(&b'\r') {
                        self.error(reply::BARE_LF_COMMAND, sink, out);
                        continue;
                    }
                    if line.iter().any(|&b| b < 0x20 && b != b'\t' || b == 0x7f) {
                        self.error(reply::BAD_CHARACTERS, sink, out);
                        continue;
                    }
                    if matches!(self.phase, Phase::Auth(_)) {
                        self.auth_response(line, sink, out);
                    } else {
                        self.command(line, sink, out);
                    }
                }
            }
        }
    }

    /// Writes an error reply and counts it; past the limit, closes the session.
    fn error(&mut self, reply: Reply, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        debug_assert!(reply.is_error());
        reply.write(out);
        self.note_rejection(reply.enhanced);
        self.count_error(sink, out);
    }

    fn error_text(&mut self, code: u16, enhanced: &str, text: &str, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        write_line(out, code, ' ', enhanced, text.as_bytes());
        self.note_rejection(enhanced);
        self.count_error(sink, out);
    }

    fn note_rejection(&mut self, enhanced: &str) {
        if self.transaction_step {
            let slot = &mut self.rejections[rejection_reason(enhanced)];
            *slot = slot.saturating_add(1);
        }
    }

    /// Transaction steps refused since the last call, by [`REJECTION_REASONS`] index.
    pub fn take_rejections(&mut self) -> Rejections {
        std::mem::take(&mut self.rejections)
    }

    fn count_error(&mut self, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        self.errors += 1;
        if let Some(excess) = self.errors.checked_sub(self.config.tarpit_after_errors) {
            let delay = (self.config.tarpit_delay * excess).min(TARPIT_DELAY_MAX);
            self.reply_delay = self.reply_delay.max(delay);
        }
        if self.errors >= self.config.errors_max {
            self.close_with(reply::TOO_MANY_ERRORS, sink, out);
        }
    }

    fn command(&mut self, line: &[u8], sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        let command = parse_command(line);
        self.transaction_step = matches!(
            command,
            Ok(Command::Mail { .. } | Command::Rcpt { .. } | Command::Data | Command::Bdat { .. })
                | Err(ParseError::MailSyntax
                    | ParseError::RcptSyntax
                    | ParseError::Sender(_)
                    | ParseError::Recipient(_))
        );
        let command = match command {
            Ok(command) => command,
            Err(e) => return self.parse_error(e, sink, out),
        };
        if matches!(self.phase, Phase::BdatBetween)
            && !matches!(
                command,
                Command::Bdat { .. } | Command::Rset | Command::Quit | Command::Noop
            )
        {
            return self.error(reply::MIXED_DATA_BDAT, sink, out);
        }
        match command {
            Command::Helo(domain) => self.hello(domain, false, sink, out),
            Command::Ehlo(domain) => self.hello(domain, true, sink, out),
            Command::Mail { from, params } => self.mail(from, params, sink, out),
            Command::Rcpt { to, params } => self.rcpt(to, params, sink, out),
            Command::Data => self.data(sink, out),
            Command::Bdat { size_bytes, last } => self.bdat(size_bytes, last, sink),
            Command::Rset => {
                if self.in_transaction() {
                    sink.abandon();
                }
                let greeted = !matches!(self.phase, Phase::Greeted);
                self.end_transaction();
                if !greeted {
                    self.phase = Phase::Greeted;
                }
                reply::RESET_OK.write(out);
                self.junk(sink, out);
            }
            Command::Noop => {
                reply::NOOP_OK.write(out);
                self.junk(sink, out);
            }
            Command::Quit => {
                if self.in_transaction() {
                    sink.abandon();
                }
                reply::BYE.write(out);
                self.phase = Phase::Closed;
            }
            Command::Vrfy(_) => {
                reply::VRFY_CANNOT.write(out);
                self.junk(sink, out);
            }
            Command::Help => {
                reply::HELP.write(out);
                self.junk(sink, out);
            }
            Command::StartTls => self.starttls(sink, out),
            Command::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response, sink, out),
            Command::NotImplemented => self.error(reply::NOT_IMPLEMENTED, sink, out),
        }
    }

    /// Counts a command that moves no mail; past the limit each counts as an error.
    fn junk(&mut self, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        self.junk_commands = self.junk_commands.saturating_add(1);
        if self.junk_commands > self.config.junk_commands_max {
            self.count_error(sink, out);
        }
    }

    fn parse_error(&mut self, e: ParseError, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        match e {
            ParseError::Unrecognized => self.error(reply::UNRECOGNIZED, sink, out),
            ParseError::NoArgumentsAllowed => self.error(reply::NO_ARGUMENTS_ALLOWED, sink, out),
            ParseError::HeloNeedsDomain => self.error(reply::HELO_NEEDS_DOMAIN, sink, out),
            ParseError::VrfyNeedsArgument => self.error(reply::VRFY_NEEDS_ARGUMENT, sink, out),
            ParseError::MailSyntax => {
                self.error_text(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]", sink, out)
            }
            ParseError::RcptSyntax => {
                self.error_text(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]", sink, out)
            }
            ParseError::BdatSyntax => {
                // The chunk size is unknown, so its bytes cannot be skipped: the only safe course
                // is to end the session (RFC 3030 leaves this to the server).
                self.error_text(501, "5.5.4", "Syntax: BDAT <size> [LAST]", sink, out);
                self.close_with(
                    Reply::new(
                        421,
                        "4.5.0",
                        "Cannot find the end of the BDAT chunk, closing connection",
                    ),
                    sink,
                    out,
                );
            }
            ParseError::AuthSyntax => {
                self.error_text(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]", sink, out)
            }
            ParseError::Sender(a) => self.address_error(501, "5.1.7", a, sink, out),
            ParseError::Recipient(a) => self.address_error(501, "5.1.3", a, sink, out),
        }
    }

    fn address_error(
        &mut self,
        code: u16,
        enhanced: &str,
        e: AddressError,
        sink: &mut impl MessageSink,
        out: &mut Vec<u8>,
    ) {
        self.error_text(code, enhanced, e.sentence(), sink, out);
    }

    fn hello(&mut self, domain: &[u8], esmtp: bool, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        // RFC 5321 4.1.4: HELO/EHLO in the middle of a transaction resets it.
        if self.in_transaction() {
            sink.abandon();
        }
        self.end_transaction();
        self.helo.clear();
        self.helo.extend_from_slice(domain);
        self.esmtp = esmtp;
        let config = &self.config;
        if !esmtp {
            write_line(out, 250, ' ', "", config.hostname.as_bytes());
            return;
        }
        write_line(out, 250, '-', "", config.hostname.as_bytes());
        for extension in ["PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING"] {
            write_line(out, 250, '-', "", extension.as_bytes());
        }
        if self.rules.starttls && self.tls.is_none() {
            write_line(out, 250, '-', "", b"STARTTLS");
        }
        if self.rules.auth && self.tls.is_some() && self.user.is_none() {
            write_line(out, 250, '-', "", b"AUTH PLAIN LOGIN");
        }
        let size = format!("SIZE {}", config.message_size_max);
        write_line(out, 250, '-', "", size.as_bytes());
        write_line(out, 250, ' ', "", b"DSN");
    }

    fn mail(&mut self, from: Path<'_>, params: &[u8], sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        match self.phase {
            Phase::Greeted => return self.error(reply::NEED_HELO, sink, out),
            Phase::Idle => {}
            _ => return self.error(reply::NESTED_MAIL, sink, out),
        }
        if self.rules.auth_required && self.user.is_none() {
            return self.error(reply::AUTH_REQUIRED, sink, out);
        }
        self.envelope.clear();
        let mut seen = 0u8;
        for param in Params::new(params) {
            let Ok((key, value)) = param else {
                return self.error(reply::BAD_PARAMETER_VALUE, sink, out);
            };
            let (bit, known) = match_keyword(key, &[b"SIZE", b"BODY", b"SMTPUTF8", b"RET", b"ENVID", b"AUTH"]);
            if !known {
                return self.error(reply::UNKNOWN_PARAMETER, sink, out);
            }
            if seen & bit != 0 {
                return self.error(reply::DUPLICATE_PARAMETER, sink, out);
            }
            seen |= bit;
            let ok = match (bit, value) {
                (1, Some(v)) => match parse_decimal(v) {
                    Some(n) if n > self.config.message_size_max => {
                        return self.error(reply::SIZE_DECLARED_TOO_BIG, sink, out);
                    }
                    Some(n) => {
                        self.envelope.size_declared_bytes = Some(n);
                        true
                    }
                    None => false,
                },
                (2, Some(v)) if v.eq_ignore_ascii_case(b"7BIT") => {
                    self.envelope.body = BodyType::SevenBit;
                    true
                }
                (2, Some(v)) if v.eq_ignore_ascii_case(b"8BITMIME") => {
                    self.envelope.body = BodyType::EightBitMime;
                    true
                }
                (4, None) => {
                    self.envelope.smtputf8 = true;
                    true
                }
                (8, Some(v)) if v.eq_ignore_ascii_case(b"FULL") => {
                    self.envelope.ret = Ret::Full;
                    true
                }
                (8, Some(v)) if v.eq_ignore_ascii_case(b"HDRS") => {
                    self.envelope.ret = Ret::Headers;
                    true
                }
                (16, Some(v)) if v.len() <= ENVID_BYTES_MAX && v.is_ascii() => {
                    self.envelope.set_envid(v);
                    true
                }
                // RFC 4954 section 5: the identity that submitted the message, when the client
                // relays for someone. Checked as xtext and otherwise not trusted: the Received
                // header records the session's own authentication.
                (32, Some(v)) => {
                    v.len() <= MAIL_AUTH_BYTES_MAX && v.iter().all(|&b| (0x21..0x7f).contains(&b) && b != b'=')
                }
                _ => false,
            };
            if !ok {
                return self.error(reply::BAD_PARAMETER_VALUE, sink, out);
            }
        }
        if let Path::Mailbox(m) = from {
            if m.utf8 && !self.envelope.smtputf8 {
                self.envelope.clear();
                return self.error(reply::UTF8_NOT_ALLOWED, sink, out);
            }
            self.envelope.set_sender(|buf| m.write_to(buf));
        }
        if let Some(user) = &self.user {
            let sender = self.envelope.sender();
            if self.config.sender_must_match && !sender.is_empty() && !user.may_send_as(sender) {
                self.envelope.clear();
                return self.error(reply::SENDER_NOT_OWNED, sink, out);
            }
        }
        if !self
            .gate
            .admit_message(self.client_ip, self.user.as_ref().map(|u| u.user.as_str()))
        {
            // Not counted as an error: the client did nothing wrong but send too fast.
            self.envelope.clear();
            reply::MESSAGE_RATE.write(out);
            return;
        }
        if self.rules.check_sender && self.user.is_none() {
            self.phase = Phase::CheckingSender;
            return;
        }
        self.phase = Phase::Mail;
        reply::SENDER_OK.write(out);
    }

    fn rcpt(&mut self, to: crate::address::Mailbox<'_>, params: &[u8], sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        match self.phase {
            Phase::Mail => {}
            Phase::Greeted => return self.error(reply::NEED_HELO, sink, out),
            _ => return self.error(reply::NEED_MAIL, sink, out),
        }
        self.recipients_attempted += 1;
        if self.envelope.recipient_count() >= self.config.recipients_max {
            // Not counted as a client error: RFC 5321 4.5.3.1.10 says the client should retry
            // the rest in another transaction.
            reply::TOO_MANY_RECIPIENTS.write(out);
            return;
        }
        if self.recipients_accepted >= self.config.recipients_per_session_max {
            reply::TOO_MANY_RECIPIENTS_IN_SESSION.write(out);
            return;
        }
        let mut notify_flags = 0u8;
        let mut orcpt: &[u8] = &[];
        let mut seen = 0u8;
        for param in Params::new(params) {
            let Ok((key, value)) = param else {
                return self.error(reply::BAD_PARAMETER_VALUE, sink, out);
            };
            let (bit, known) = match_keyword(key, &[b"NOTIFY", b"ORCPT"]);
            if !known {
                return self.error(reply::UNKNOWN_PARAMETER, sink, out);
            }
            if seen & bit != 0 {
                return self.error(reply::DUPLICATE_PARAMETER, sink, out);
            }
            seen |= bit;
            let ok = match (bit, value) {
                (1, Some(v)) => match parse_notify(v) {
                    Some(flags) => {
                        notify_flags = flags;
                        true
                    }
                    None => false,
                },
                (2, Some(v)) if v.len() <= ORCPT_BYTES_MAX && v.contains(&b';') => {
                    orcpt = v;
                    true
                }
                _ => false,
            };
            if !ok {
                return self.error(reply::BAD_PARAMETER_VALUE, sink, out);
            }
        }
        if to.utf8 && !self.envelope.smtputf8 {
            return self.error(reply::UTF8_NOT_ALLOWED, sink, out);
        }
        let decision = self.config.relay.decide(self.client_ip, self.user.is_some(), to.domain);
        if !decision.accepted() {
            return self.error(reply::RELAY_DENIED, sink, out);
        }
        if decision == RelayDecision::LocalDomain {
            if let Some(sentence) = sink.unknown_local(&to) {
                return self.error_text(550, "5.1.1", &sentence, sink, out);
            }
        }
        if matches!(decision, RelayDecision::TrustedNetwork | RelayDecision::Authenticated) {
            if let Some(sentence) = sink.suppressed(&to, self.envelope.sender()) {
                // Not counted against the client's error allowance: a list sender's batch may
                // hold many suppressed recipients, and each refusal is the server's policy,
                // not the client's mistake.
                write_line(out, 550, ' ', "5.1.1", sentence.as_bytes());
                self.note_rejection("5.1.1");
                return;
            }
        }
        self.envelope.add_recipient(|buf| to.write_to(buf), notify_flags, orcpt);
        self.recipients_accepted += 1;
        reply::RECIPIENT_OK.write(out);
    }

    /// Checks that a transaction may move on to its content, and starts the message in the sink.
    fn start_content(&mut self, sink: &mut impl MessageSink) -> Result<(), Reply> {
        match self.phase {
            Phase::Mail if self.envelope.recipient_count() > 0 => {}
            Phase::Mail if self.recipients_attempted > 0 => return Err(reply::NO_VALID_RECIPIENTS),
            Phase::Mail => return Err(reply::NEED_RCPT),
            Phase::Greeted => return Err(reply::NEED_HELO),
            _ => return Err(reply::NEED_MAIL_BEFORE_DATA),
        }
        self.content = Content {
            received_unix_s: self.now.unix_s,
            ..Content::default()
        };
        self.deadlines.content_begins(self.now.instant);
        let received_unix_s = self.now.unix_s;
        let origin = Origin {
            client_ip: self.client_ip,
            helo: &self.helo,
            received_unix_s,
        };
        if sink.begin(&self.envelope, origin).is_err() {
            self.content.sink_full = true;
            return Ok(());
        }
        let mut header = Vec::with_capacity(256);
        let single_recipient = (self.envelope.recipient_count() == 1)
            .then(|| self.envelope.recipients().next().map(|(a, _, _)| a))
            .flatten();
        let protocol = protocol_name(
            self.esmtp,
            self.envelope.smtputf8,
            self.tls.is_some(),
            self.user.is_some(),
        );
        write_received(
            &Trace {
                helo: &self.helo,
                client_ip: self.client_ip,
                hostname: &self.config.hostname,
                protocol,
                tls: self.tls.as_ref(),
                single_recipient,
                unix_time_s: received_unix_s,
            },
            &mut header,
        );
        if sink.append(&header).is_err() {
            self.content.sink_full = true;
            sink.abandon();
        }
        Ok(())
    }

    fn starttls(&mut self, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        if self.tls.is_some() {
            return self.error(reply::TLS_ALREADY_ACTIVE, sink, out);
        }
        if !self.rules.starttls {
            return self.error(reply::NOT_IMPLEMENTED, sink, out);
        }
        match self.phase {
            Phase::Greeted => return self.error(reply::NEED_HELO, sink, out),
            Phase::Idle => {}
            _ => return self.error(reply::NOT_IN_TRANSACTION, sink, out),
        }
        reply::READY_FOR_TLS.write(out);
        self.phase = Phase::StartingTls;
    }

    fn auth(&mut self, mechanism: &[u8], initial: Option<&[u8]>, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        match self.phase {
            Phase::Greeted => return self.error(reply::NEED_HELO, sink, out),
            Phase::Idle => {}
            _ => return self.error(reply::NOT_IN_TRANSACTION, sink, out),
        }
        if !self.rules.auth {
            return self.error(reply::NOT_IMPLEMENTED, sink, out);
        }
        if self.user.is_some() {
            return self.error(reply::ALREADY_AUTHENTICATED, sink, out);
        }
        if self.tls.is_none() {
            return self.error(reply::ENCRYPTION_REQUIRED, sink, out);
        }
        let Some(mechanism) = Mechanism::from_name(mechanism) else {
            return self.error(reply::UNKNOWN_MECHANISM, sink, out);
        };
        match (mechanism, initial) {
            (Mechanism::Plain, Some(response)) => self.sasl_result(sasl::plain(response), sink, out),
            (Mechanism::Plain, None) => {
                write_line(out, 334, ' ', "", b"");
                self.phase = Phase::Auth(AuthStep::PlainResponse);
            }
            (Mechanism::Login, Some(user)) => match sasl::login_user(user) {
                Ok(user) => self.ask_login_password(user, out),
                Err(e) => self.sasl_error(e, sink, out),
            },
            (Mechanism::Login, None) => {
                write_line(out, 334, ' ', "", sasl::LOGIN_USER_CHALLENGE.as_bytes());
                self.phase = Phase::Auth(AuthStep::LoginUser);
            }
        }
    }

    fn ask_login_password(&mut self, user: String, out: &mut Vec<u8>) {
        write_line(out, 334, ' ', "", sasl::LOGIN_PASSWORD_CHALLENGE.as_bytes());
        self.phase = Phase::Auth(AuthStep::LoginPassword { user });
    }

    /// One line of a SASL exchange.
    fn auth_response(&mut self, line: &[u8], sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        let Phase::Auth(step) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!("auth_response outside AUTH");
        };
        match step {
            AuthStep::PlainResponse => self.sasl_result(sasl::plain(line), sink, out),
            AuthStep::LoginUser => match sasl::login_user(line) {
                Ok(user) => self.ask_login_password(user, out),
                Err(e) => self.sasl_error(e, sink, out),
            },
            AuthStep::LoginPassword { user } => {
                let result = sasl::login_password(line).map(|password| Credentials {
                    mechanism: "LOGIN",
                    user,
                    password,
                });
                self.sasl_result(result, sink, out);
            }
        }
    }

    fn sasl_result(&mut self, result: Result<Credentials, SaslError>, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        match result {
            Ok(credentials) => {
                self.credentials = Some(credentials);
                self.phase = Phase::Authenticating;
            }
            Err(e) => self.sasl_error(e, sink, out),
        }
    }

    fn sasl_error(&mut self, e: SaslError, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        self.phase = Phase::Idle;
        let enhanced = if e == SaslError::Cancelled { "5.0.0" } else { "5.5.2" };
        self.error_text(501, enhanced, e.sentence(), sink, out);
    }

    fn data(&mut self, sink: &mut impl MessageSink, out: &mut Vec<u8>) {
        if let Err(reply) = self.start_content(sink) {
            return self.error(reply, sink, out);
        }
        self.phase = Phase::Data(DataDecoder::new(self.config.bare_line_endings));
        reply::START_DATA.write(out);
    }

    /// Feeds DATA content to the decoder and the sink. Returns bytes used and whether the end
    /// marker was reached.
    fn receive_data(&mut self, input: &[u8], sink: &mut impl MessageSink) -> (usize, bool) {
        let Phase::Data(decoder) = &mut self.phase else {
            unreachable!("receive_data outside DATA");
        };
        let content = &mut self.content;
        let size_max = self.config.message_size_max;
        let decoded = decoder.decode(input, |bytes| content.take(bytes, size_max, sink));
        content.bare_line_ending |= decoder.bare_line_ending_seen();
        (decoded.consumed, decoded.end)
    }

    fn bdat(&mut self, size_bytes: u64, last: bool, sink: &mut impl MessageSink) {
        let first_chunk = !matches!(self.phase, Phase::BdatBetween);
        if first_chunk {
            if let Err(reply) = self.start_content(sink) {
                // The chunk's bytes follow the command whatever we answer; skip them, under
                // the content deadlines.
                self.deadlines.content_begins(self.now.instant);
                self.phase = Phase::BdatDiscard {
                    remaining_bytes: size_bytes,
                    reply,
                };
                return;
            }
        }
        if self.content.size_bytes.saturating_add(size_bytes) > self.config.message_size_max {
            self.content.too_big = true;
        }
        self.phase = Phase::Bdat {
            remaining_bytes: size_bytes,
            chunk_bytes: size_bytes,
            last,
        };
    }

    /// Consumes BDAT chunk bytes. Returns bytes used; moves the phase on when the chunk is done.
    fn receive_chunk(&mut self, input: &[u8], sink: &mut impl MessageSink, out: &mut Vec<u8>) -> usize {
        match &mut self.phase {
            Phase::BdatDiscard { remaining_bytes, reply } => {
                let used = input.len().min(usize::try_from(*remaining_bytes).unwrap_or(usize::MAX));
                *remaining_bytes -= used as u64;
                if *remaining_bytes == 0 {
                    let reply = *reply;
                    self.deadlines.content_ends();
                    self.phase = if self.envelope.recipient_count() > 0 {
                        Phase::Mail
                    } else if self.helo.is_empty() {
                        Phase::Greeted
                    } else {
                        Phase::Idle
                    };
                    self.error(reply, sink, out);
                }
                used
            }
            Phase::Bdat {
                remaining_bytes,
                chunk_bytes,
                last,
            } => {
                let used = input.len().min(usize::try_from(*remaining_bytes).unwrap_or(usize::MAX));
                *remaining_bytes -= used as u64;
                let (done, last, chunk_bytes) = (*remaining_bytes == 0, *last, *chunk_bytes);
                let size_max = self.config.message_size_max;
                let policy = self.config.bare_line_endings;
                let content = &mut self.content;
                let mut scanner = std::mem::take(&mut content.bare_scanner);
                scanner.scan(&input[..used], policy, |bytes| content.take(bytes, size_max, sink));
                if done && last {
                    scanner.finish(policy, |bytes| content.take(bytes, size_max, sink));
                }
                content.bare_line_ending |= scanner.seen();
                content.bare_scanner = scanner;
                if done {
                    if last {
                        if let Some(Next::Close) = self.finish_message(sink, out) {
                            return used;
                        }
                    } else {
                        let text = format!("{chunk_bytes} octets received");
                        write_line(out, 250, ' ', "2.0.0", text.as_bytes());
                        self.phase = Phase::BdatBetween;
                    }
                }
                used
            }
            _ => unreachable!("receive_chunk outside BDAT"),
        }
    }

    /// The end of the content: refuse or hand over for commit. Returns `Some(Next::Commit)` when
    /// the shell must commit, `Some(Next::Close)` when the session closed, `None` to carry on.
    fn finish_message(&mut self, sink: &mut impl MessageSink, out: &mut Vec<u8>) -> Option<Next> {
        self.transaction_step = true;
        let refusal = if self.content.bare_line_ending && self.config.bare_line_endings == BareLineEndings::Reject {
            Some(reply::BARE_LINE_ENDING)
        } else if self.content.too_big {
            Some(reply::MESSAGE_TOO_BIG)
        } else if self.content.sink_full {
            Some(reply::NO_STORAGE)
        } else {
            None
        };
        match refusal {
            None => {
                self.phase = Phase::Committing;
                Some(Next::Commit)
            }
            Some(reply) => {
                sink.abandon();
                self.end_transaction();
                self.error(reply, sink, out);
                self.is_closed().then_some(Next::Close)
            }
        }
    }
}

impl Content {
    /// Takes decoded content: counts it against the size limit and passes it to the sink until
    /// either refuses.
    fn take(&mut self, bytes: &[u8], size_max: u64, sink: &mut impl MessageSink) {
        self.size_bytes += bytes.len() as u64;
        if self.size_bytes > size_max && !self.too_big {
            self.too_big = true;
            if !self.sink_full {
                sink.abandon();
            }
        }
        if self.too_big || self.sink_full {
            return;
        }
        if sink.append(bytes).is_err() {
            self.sink_full = true;
            sink.abandon();
        }
    }
}

/// The `with` word of the Received header (RFC 3848, RFC 6531).
fn protocol_name(esmtp: bool, smtputf8: bool, tls: bool, authenticated: bool) -> &'static str {
    match (esmtp || smtputf8, smtputf8, tls, authenticated) {
        (false, _, _, _) => "SMTP",
        (true, false, false, false) => "ESMTP",
        (true, false, true, false) => "ESMTPS",
        (true, false, false, true) => "ESMTPA",
        (true, false, true, true) => "ESMTPSA",
        (true, true, false, false) => "UTF8SMTP",
        (true, true, true, false) => "UTF8SMTPS",
        (true, true, false, true) => "UTF8SMTPA",
        (true, true, true, true) => "UTF8SMTPSA",
    }
}

/// Matches `key` case-insensitively against `words`; returns (1 << index, found).
fn match_keyword(key: &[u8], words: &[&[u8]]) -> (u8, bool) {
    match words.iter().position(|w| w.eq_ignore_ascii_case(key)) {
        Some(i) => (1 << i, true),
        None => (0, false),
    }
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// `NEVER`, or a comma list of SUCCESS, FAILURE, DELAY (RFC 3461 4.1).
fn parse_notify(v: &[u8]) -> Option<u8> {
    if v.eq_ignore_ascii_case(b"NEVER") {
        return Some(notify::NEVER);
    }
    let mut flags = 0;
    for word in v.split(|&b| b == b',') {
        flags |= match word {
            w if w.eq_ignore_ascii_case(b"SUCCESS") => notify::SUCCESS,
            w if w.eq_ignore_ascii_case(b"FAILURE") => notify::FAILURE,
            w if w.eq_ignore_ascii_case(b"DELAY") => notify::DELAY,
            _ => return None,
        };
    }
    Some(flags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Network;

    /// A sink that keeps the message in memory, with an optional size budget.
    #[derive(Default)]
    struct VecSink {
        message: Vec<u8>,
        open: bool,
        budget_bytes: Option<usize>,
        committed: Vec<Vec<u8>>,
        /// Recipients the shell's suppression list holds, and the (recipient, sender) pairs asked.
        suppressed: Vec<&'static str>,
        asked: Vec<(String, String)>,
    }

    impl MessageSink for VecSink {
        fn begin(&mut self, _envelope: &Envelope, _origin: Origin<'_>) -> Result<(), SinkFull> {
            self.message.clear();
            self.open = true;
            Ok(())
        }
        fn append(&mut self, bytes: &[u8]) -> Result<(), SinkFull> {
            assert!(self.open, "append without begin");
            if self.budget_bytes.is_some_and(|b| self.message.len() + bytes.len() > b) {
                return Err(SinkFull);
            }
            self.message.extend_from_slice(bytes);
            Ok(())
        }
        fn abandon(&mut self) {
            self.message.clear();
            self.open = false;
        }
        fn unknown_local(&mut self, recipient: &crate::address::Mailbox<'_>) -> Option<String> {
            recipient
                .local
                .starts_with(b"nobody")
                .then(|| "no such mailbox here".to_string())
        }
        fn suppressed(&mut self, recipient: &crate::address::Mailbox<'_>, sender: &[u8]) -> Option<String> {
            let mut address = Vec::new();
            recipient.write_to(&mut address);
            let address = String::from_utf8(address).unwrap();
            self.asked
                .push((address.clone(), String::from_utf8(sender.to_vec()).unwrap()));
            self.suppressed
                .contains(&address.as_str())
                .then(|| format!("{address} is suppressed"))
        }
    }

    fn config() -> SessionConfig {
        SessionConfig {
            hostname: "mx.test".into(),
            line_length_max: 512,
            message_size_max: 1000,
            recipients_max: 3,
            errors_max: 5,
            bare_line_endings: BareLineEndings::Reject,
            relay: RelayPolicy {
                local_domains: vec!["local.test".into()],
                trusted_networks: vec!["127.0.0.1/32".parse::<Network>().unwrap()],
            },
            recipients_per_session_max: 5,
            tarpit_after_errors: 2,
            tarpit_delay: Duration::from_millis(100),
            sender_must_match: true,
            timeouts: Timeouts::RELAXED,
            junk_commands_max: 100,
        }
    }

    const PLAIN_RULES: ListenerRules = ListenerRules {
        starttls: false,
        auth: false,
        auth_required: false,
        check_sender: false,
    };
    const SUBMISSION_RULES: ListenerRules = ListenerRules {
        starttls: true,
        auth: true,
        auth_required: true,
        check_sender: false,
    };

    /// A gate that admits a fixed number of messages.
    struct CountingGate(std::cell::Cell<u32>);

    impl MessageGate for CountingGate {
        fn admit_message(&self, _client_ip: IpAddr, _user: Option<&str>) -> bool {
            let left = self.0.get();
            self.0.set(left.saturating_sub(1));
            left > 0
        }
    }

    /// The tests' clock: real time (the deadline tests pass their own instants).
    fn now() -> Now {
        Now::read()
    }

    fn tls_summary() -> TlsSummary {
        TlsSummary {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
        }
    }

    struct Harness {
        session: Session,
        sink: VecSink,
        /// The spool's answer for the next commit.
        commit_result: Result<&'static str, CommitError>,
        /// The shell's verdict on the next credentials, and the credentials it saw.
        auth_outcome: AuthOutcome,
        credentials_seen: Vec<Credentials>,
        /// Input thrown away at STARTTLS (the shell's CVE-2011-0411 defence).
        discarded_at_starttls: Vec<u8>,
        /// The shell's verdict on the next sender, and the senders it was asked about.
        sender_verdict: SenderVerdict,
        senders_seen: Vec<Vec<u8>>,
        /// The time the harness passes in, when a test sets it (else the real clock).
        fixed_now: Option<Now>,
    }

    impl Harness {
        fn new(config: SessionConfig, ip: &str) -> Harness {
            Harness::with_rules(config, PLAIN_RULES, ip)
        }

        fn with_rules(config: SessionConfig, rules: ListenerRules, ip: &str) -> Harness {
            Harness {
                session: Session::new(Rc::new(config), rules, Rc::new(OpenGate), ip.parse().unwrap(), now()),
                sink: VecSink::default(),
                commit_result: Ok("ID1"),
                auth_outcome: AuthOutcome::Invalid,
                credentials_seen: Vec::new(),
                discarded_at_starttls: Vec::new(),
                sender_verdict: SenderVerdict::Accept,
                senders_seen: Vec::new(),
                fixed_now: None,
            }
        }

        /// From now on the harness passes `instant` in as the time.
        fn at(&mut self, instant: Instant) -> &mut Harness {
            self.fixed_now = Some(Now {
                instant,
                unix_s: 1_700_000_000,
            });
            self
        }

        /// The deadline check the shell makes before it waits: the replies it wrote.
        fn check(&mut self, instant: Instant, stressed: bool) -> (Option<Expiry>, String) {
            let mut out = Vec::new();
            let expiry = self.session.check_deadline(instant, stressed, &mut self.sink, &mut out);
            (expiry, String::from_utf8(out).unwrap())
        }

        /// Feeds `input` in pieces of `split` bytes; returns all replies and whether it closed.
        fn feed_split(&mut self, input: &[u8], split: usize) -> (String, bool) {
            let mut out = Vec::new();
            let mut pending: Vec<u8> = Vec::new();
            let mut closed = false;
            let now = self.fixed_now.unwrap_or_else(Now::read);
            for piece in input.chunks(split.max(1)) {
                pending.extend_from_slice(piece);
                loop {
                    let step = self.session.receive(&pending, now, &mut self.sink, &mut out);
                    pending.drain(..step.consumed);
                    match step.next {
                        Next::NeedInput => break,
                        Next::Close => {
                            closed = true;
                            break;
                        }
                        Next::Commit => {
                            self.sink.committed.push(std::mem::take(&mut self.sink.message));
                            self.sink.open = false;
                            self.session
                                .committed(self.commit_result.clone(), now.instant, &mut out);
                        }
                        Next::StartTls => {
                            self.discarded_at_starttls.append(&mut pending);
                            self.session.tls_started(tls_summary(), now.instant);
                        }
                        Next::Authenticate => {
                            self.credentials_seen.push(self.session.take_credentials().unwrap());
                            self.session.authenticated(
                                self.auth_outcome.clone(),
                                now.instant,
                                &mut self.sink,
                                &mut out,
                            );
                        }
                        Next::CheckSender => {
                            self.senders_seen.push(self.session.envelope().sender().to_vec());
                            let verdict = self.sender_verdict.clone();
                            self.session
                                .sender_checked(verdict, now.instant, &mut self.sink, &mut out);
                        }
                    }
                }
                if closed {
                    break;
                }
            }
            (String::from_utf8(out).unwrap(), closed)
        }

        fn feed(&mut self, input: &str) -> String {
            self.feed_split(input.as_bytes(), usize::MAX).0
        }
    }

    fn codes(replies: &str) -> Vec<&str> {
        replies
            .split("\r\n")
            .filter(|l| !l.is_empty() && l.as_bytes().get(3) == Some(&b' '))
            .map(|l| &l[..9.min(l.len())])
            .collect()
    }

    /// The client's content: what follows our Received header and its folded lines.
    fn content_after_received(message: &[u8]) -> &[u8] {
        assert!(message.starts_with(b"Received: "));
        let mut pos = 0;
        loop {
            let lf = memchr::memchr(b'\n', &message[pos..]).expect("header ends") + pos;
            pos = lf + 1;
            if message.get(pos) != Some(&b'\t') {
                return &message[pos..];
            }
        }
    }

    #[test]
    fn a_pipelined_transaction_is_answered_in_order() {
        let mut h = Harness::new(config(), "127.0.0.1");
        let replies = h.feed(
            "EHLO client.test\r\nMAIL FROM:<a@x.test> SIZE=100\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@local.test>\r\nDATA\r\n",
        );
        assert!(replies.starts_with("250-mx.test\r\n250-PIPELINING\r\n"), "{replies}");
        assert!(replies.contains("250-SIZE 1000\r\n250 DSN\r\n"), "{replies}");
        assert_eq!(
            codes(&replies),
            vec!["250 DSN", "250 2.1.0", "250 2.1.5", "250 2.1.5", "354 End d"]
        );
        let replies = h.feed("Subject: t\r\n\r\n..dot\r\n.\r\nQUIT\r\n");
        assert_eq!(replies, "250 2.0.0 Ok: queued as ID1\r\n221 2.0.0 Bye\r\n");
        assert_eq!(
            content_after_received(&h.sink.committed[0]),
            b"Subject: t\r\n\r\n.dot\r\n"
        );
        let header = String::from_utf8_lossy(&h.sink.committed[0]);
        assert!(
            header.starts_with("Received: from client.test ([127.0.0.1])\r\n\tby mx.test (Gannet) with ESMTP;"),
            "{header}"
        );
    }

    #[test]
    fn every_split_of_the_input_gives_the_same_replies_and_bytes() {
        let input = b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nline\r\n.\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 6\r\nab\r\ncdBDAT 0 LAST\r\nQUIT\r\n";
        let mut first = None;
        for split in [1, 2, 3, 5, 8, 13, 1000] {
            let mut h = Harness::new(config(), "127.0.0.1");
            let (replies, closed) = h.feed_split(input, split);
            assert!(closed);
            let bodies: Vec<Vec<u8>> = h
                .sink
                .committed
                .iter()
                .map(|m| content_after_received(m).to_vec())
                .collect();
            assert_eq!(bodies, vec![b"line\r\n".to_vec(), b"ab\r\ncd".to_vec()]);
            match &first {
                None => first = Some(replies),
                Some(f) => assert_eq!(&replies, f, "split {split}"),
            }
        }
        assert!(first.unwrap().contains("250 2.0.0 6 octets received\r\n"));
    }

    #[test]
    fn sequencing_errors_get_503_and_syntax_errors_501() {
        let mut cfg = config();
        cfg.errors_max = 100;
        let mut h = Harness::new(cfg, "127.0.0.1");
        assert_eq!(
            h.feed("MAIL FROM:<a@x.test>\r\n"),
            "503 5.5.1 Send HELO or EHLO first\r\n"
        );
        assert_eq!(h.feed("HELO c\r\n"), "250 mx.test\r\n");
        assert_eq!(h.feed("RCPT TO:<b@y.test>\r\n"), "503 5.5.1 Need MAIL before RCPT\r\n");
        assert_eq!(
            h.feed("DATA\r\n"),
            "503 5.5.1 Need MAIL and RCPT before DATA or BDAT\r\n"
        );
        h.feed("MAIL FROM:<a@x.test>\r\n");
        assert_eq!(h.feed("MAIL FROM:<a@x.test>\r\n"), "503 5.5.1 Nested MAIL command\r\n");
        assert_eq!(h.feed("DATA\r\n"), "503 5.5.1 Need RCPT before DATA\r\n");
        assert_eq!(h.feed("RCPT TO:<b@@y.test>\r\n"), "501 5.1.3 Bad domain in address\r\n");
        assert_eq!(h.feed("FOO\r\n"), "500 5.5.2 Command not recognized\r\n");
        assert_eq!(h.feed("STARTTLS\r\n"), "502 5.5.1 Command not implemented\r\n");
    }

    #[test]
    fn the_error_limit_closes_the_session() {
        let mut h = Harness::new(config(), "127.0.0.1");
        let (replies, closed) = h.feed_split(b"FOO\r\nFOO\r\nFOO\r\nFOO\r\nFOO\r\nNOOP\r\n", 1000);
        assert!(closed);
        assert!(
            replies.ends_with("500 5.5.2 Command not recognized\r\n421 4.7.0 Too many errors, closing connection\r\n"),
            "{replies}"
        );
        assert!(!replies.contains("250"), "NOOP after the limit must not run");
    }

    #[test]
    fn relay_is_refused_for_strangers_but_local_domains_accepted() {
        let mut h = Harness::new(config(), "192.0.2.9");
        h.feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\n");
        assert_eq!(
            h.feed("RCPT TO:<b@elsewhere.test>\r\n"),
            "554 5.7.1 Relay access denied\r\n"
        );
        assert_eq!(h.feed("RCPT TO:<b@LOCAL.test>\r\n"), "250 2.1.5 Recipient ok\r\n");
        assert_eq!(h.feed("RCPT TO:<postmaster>\r\n"), "250 2.1.5 Recipient ok\r\n");
        let mut h = Harness::new(config(), "192.0.2.9");
        h.feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@elsewhere.test>\r\n");
        assert_eq!(h.feed("DATA\r\n"), "554 5.5.1 No valid recipients\r\n");
    }

    #[test]
    fn suppressed_recipients_of_relayed_mail_are_refused_without_counting_as_errors() {
        let mut c = config();
        c.errors_max = 1;
        let mut h = Harness::new(c, "127.0.0.1");
        h.sink.suppressed = vec!["gone@y.test", "gone@local.test"];
        h.feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\n");
        assert_eq!(
            h.feed("RCPT TO:<gone@y.test>\r\n"),
            "550 5.1.1 gone@y.test is suppressed\r\n"
        );
        assert_eq!(
            h.feed("RCPT TO:<gone@y.test>\r\n"),
            "550 5.1.1 gone@y.test is suppressed\r\n",
            "still open"
        );
        assert_eq!(h.feed("RCPT TO:<ok@y.test>\r\n"), "250 2.1.5 Recipient ok\r\n");
        assert_eq!(
            h.feed("RCPT TO:<gone@local.test>\r\n"),
            "250 2.1.5 Recipient ok\r\n",
            "local mail is not asked about"
        );
        assert_eq!(h.sink.asked.len(), 3);
        // An unknown local mailbox is the client's error (a dictionary attack's), and counts.
        assert_eq!(
            h.feed("RCPT TO:<nobody@local.test>\r\n"),
            "550 5.1.1 no such mailbox here\r\n421 4.7.0 Too many errors, closing connection\r\n"
        );
        assert_eq!(h.sink.asked[0], ("gone@y.test".to_string(), "a@x.test".to_string()));
        assert_eq!(h.session.take_rejections()[rejection_reason("5.1.1")], 3);
        // A stranger's relay attempt is refused for relaying, before any suppression check.
        let mut h = Harness::new(config(), "192.0.2.9");
        h.sink.suppressed = vec!["gone@y.test"];
        h.feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\n");
        assert_eq!(h.feed("RCPT TO:<gone@y.test>\r\n"), "554 5.7.1 Relay access denied\r\n");
        assert!(h.sink.asked.is_empty());
    }

    #[test]
    fn limits_on_size_recipients_and_line_length() {
        let mut h = Harness::new(config(), "127.0.0.1");
        h.feed("EHLO c\r\n");
        assert_eq!(
            h.feed("MAIL FROM:<a@x.test> SIZE=1001\r\n"),
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        );
        h.feed("MAIL FROM:<a@x.test>\r\nRCPT TO:<1@y.test>\r\nRCPT TO:<2@y.test>\r\nRCPT TO:<3@y.test>\r\n");
        assert_eq!(h.feed("RCPT TO:<4@y.test>\r\n"), "452 4.5.3 Too many recipients\r\n");
        h.feed("DATA\r\n");
        let big = format!("{}\r\n.\r\n", "x".repeat(1100));
        assert_eq!(
            h.feed(&big),
            "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        );
        assert!(h.sink.committed.is_empty());
        // The session is still usable, and an overlong line is answered once and skipped.
        let long = format!("NOOP {}\r\nNOOP\r\n", "y".repeat(2000));
        assert_eq!(
            h.feed_split(long.as_bytes(), 100).0,
            "500 5.5.2 Line too long\r\n250 2.0.0 Ok\r\n"
        );
    }

    #[test]
    fn bare_line_endings_in_data_are_refused_and_the_session_survives() {
        for evil in ["a\n.\nb\r\n", "a\n.\r\nb\r\n", "a\r\n.\nb\r\n", "a\rb\r\n"] {
            let mut h = Harness::new(config(), "127.0.0.1");
            h.feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
            let replies = h.feed(&format!("{evil}.\r\nNOOP\r\n"));
            assert_eq!(
                replies, "550 5.5.2 Message contains a bare CR or LF; end every line with CRLF\r\n250 2.0.0 Ok\r\n",
                "{evil:?}"
            );
            assert!(h.sink.committed.is_empty());
        }
        let mut cfg = config();
        cfg.bare_line_endings = BareLineEndings::Normalize;
        let mut h = Harness::new(cfg, "127.0.0.1");
        h.feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
        assert_eq!(h.feed("a\nb\r\n.\r\n"), "250 2.0.0 Ok: queued as ID1\r\n");
        assert_eq!(content_after_received(&h.sink.committed[0]), b"a\r\nb\r\n");
    }

    #[test]
    fn commands_with_bare_lf_or_control_bytes_are_refused() {
        let mut h = Harness::new(config(), "127.0.0.1");
        assert_eq!(
            h.feed("NOOP\n"),
            "500 5.5.2 Command line ends in a bare LF or contains a bare CR; end lines with CRLF\r\n"
        );
        assert_eq!(
            h.feed("NO\0OP\r\n"),
            "500 5.5.2 Command contains control characters\r\n"
        );
    }

    #[test]
    fn smtputf8_addresses_need_the_parameter() {
        let mut h = Harness::new(config(), "127.0.0.1");
        h.feed("EHLO c\r\n");
        assert_eq!(
            h.feed("MAIL FROM:<用户@例子.test>\r\n"),
            "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter on MAIL FROM\r\n"
        );
        assert_eq!(
            h.feed("MAIL FROM:<用户@例子.test> SMTPUTF8\r\n"),
            "250 2.1.0 Sender ok\r\n"
        );
        assert_eq!(
            h.feed("RCPT TO:<δοκιμή@παράδειγμα.test>\r\n"),
            "250 2.1.5 Recipient ok\r\n"
        );
        assert_eq!(h.session.envelope().sender(), "用户@例子.test".as_bytes());
    }

    #[test]
    fn esmtp_parameters_are_kept_and_checked() {
        let mut h = Harness::new(config(), "127.0.0.1");
        h.feed("EHLO c\r\n");
        assert_eq!(
            h.feed("MAIL FROM:<a@x.test> BODY=8BITMIME RET=HDRS ENVID=abc123 SMTPUTF8\r\n"),
            "250 2.1.0 Sender ok\r\n"
        );
        assert_eq!(
            h.feed("RCPT TO:<b@y.test> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b@y.test\r\n"),
            "250 2.1.5 Recipient ok\r\n"
        );
        let env = h.session.envelope();
        assert_eq!(
            (env.body, env.ret, env.envid()),
            (BodyType::EightBitMime, Ret::Headers, &b"abc123"[..])
        );
        let (_, notify_flags, orcpt) = env.recipients().next().unwrap();
        assert_eq!(notify_flags, notify::SUCCESS | notify::DELAY);
        assert_eq!(orcpt, b"rfc822;b@y.test");
        assert_eq!(
            h.feed("RCPT TO:<c@y.test> NOTIFY=SOMETIMES\r\n"),
            "501 5.5.4 Bad parameter value\r\n"
        );
        assert_eq!(
            h.feed("RCPT TO:<c@y.test> FOO=1\r\n"),
            "555 5.5.4 Parameter not recognized\r\n"
        );
        h.feed("RSET\r\n");
        assert_eq!(
            h.feed("MAIL FROM:<a@x.test> BODY=BINARYMIME\r\n"),
            "501 5.5.4 Bad parameter value\r\n"
        );
        assert_eq!(
            h.feed("MAIL FROM:<a@x.test> SIZE=1 SIZE=2\r\n"),
            "501 5.5.4 Parameter given twice\r\n"
        );
    }

    #[test]
    fn bdat_chunks_are_counted_and_refused_ones_skipped() {
        let mut h = Harness::new(config(), "127.0.0.1");
        // A BDAT without a transaction: refused, and its bytes are not read as commands.
        let replies = h.feed("EHLO c\r\nBDAT 6\r\nQUIT\r\nNOOP\r\n");
        assert!(
            replies.ends_with("503 5.5.1 Need MAIL and RCPT before DATA or BDAT\r\n250 2.0.0 Ok\r\n"),
            "{replies}"
        );
        h.feed("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n");
        assert_eq!(h.feed("BDAT 600\r\n"), "");
        let replies = h.feed(&format!("{}BDAT 600 LAST\r\n{}", "a".repeat(600), "b".repeat(600)));
        assert_eq!(
            replies,
            "250 2.0.0 600 octets received\r\n552 5.3.4 Message size exceeds fixed maximum message size\r\n"
        );
        assert!(h.sink.committed.is_empty());
        h.feed("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nBDAT 3\r\n");
        assert_eq!(
            h.feed("a\nbDATA\r\n"),
            "250 2.0.0 3 octets received\r\n503 5.5.1 DATA and BDAT cannot be mixed in one transaction\r\n"
        );
        assert_eq!(
            h.feed("BDAT 0 LAST\r\n"),
            "550 5.5.2 Message contains a bare CR or LF; end every line with CRLF\r\n"
        );
    }

    #[test]
    fn spool_failures_never_answer_250() {
        let mut h = Harness::new(config(), "127.0.0.1");
        h.commit_result = Err(CommitError::NoSpace);
        h.feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
        assert_eq!(
            h.feed("x\r\n.\r\n"),
            "452 4.3.1 Insufficient system storage, try again later\r\n"
        );
        h.commit_result = Err(CommitError::Io);
        h.feed("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
        assert_eq!(
            h.feed("x\r\n.\r\n"),
            "451 4.3.0 Local error writing the message, try again later\r\n"
        );
        let mut h = Harness::new(config(), "127.0.0.1");
        h.sink.budget_bytes = Some(400);
        h.feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
        assert_eq!(
            h.feed(&format!("{}\r\n.\r\n", "z".repeat(500))),
            "452 4.3.1 Insufficient system storage, try again later\r\n"
        );
    }

    #[test]
    fn rset_helo_vrfy_help_noop_and_quit() {
        let mut h = Harness::new(config(), "127.0.0.1");
        h.feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\n");
        assert_eq!(h.feed("RSET\r\n"), "250 2.0.0 Reset ok\r\n");
        assert_eq!(h.feed("RCPT TO:<b@y.test>\r\n"), "503 5.5.1 Need MAIL before RCPT\r\n");
        assert_eq!(
            h.feed("VRFY bob\r\n"),
            "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
        );
        assert_eq!(h.feed("VRFY\r\n"), "501 5.5.4 VRFY needs an argument\r\n");
        assert!(h.feed("HELP\r\n").starts_with("214 2.0.0 "));
        assert_eq!(
            h.feed("EHLO\r\n"),
            "501 5.5.4 HELO and EHLO need a domain or address literal\r\n"
        );
        let (replies, closed) = h.feed_split(b"QUIT\r\nNOOP\r\n", 100);
        assert_eq!(replies, "221 2.0.0 Bye\r\n");
        assert!(closed);
    }

    /// Timeouts for the deadline tests: 10 s per command line, 2 s under stress, 100 s per
    /// message, at least 10 bytes per second over 5 s windows.
    fn timed_config() -> SessionConfig {
        SessionConfig {
            timeouts: Timeouts {
                command: Duration::from_secs(10),
                stress_command: Duration::from_secs(2),
                data: Duration::from_secs(100),
                data_rate_min_bytes_per_s: 10,
                data_rate_window: Duration::from_secs(5),
            },
            ..config()
        }
    }

    fn after(t0: Instant, millis: u64) -> Instant {
        t0 + Duration::from_millis(millis)
    }

    const TIMEOUT_REPLY: &str = "421 4.4.2 Timeout exceeded, closing connection\r\n";

    #[test]
    fn a_command_trickled_a_byte_at_a_time_is_cut_off_at_its_deadline() {
        let t0 = Instant::now();
        let mut h = Harness::new(timed_config(), "127.0.0.1");
        h.at(t0).session.greeting(t0, &mut Vec::new());
        // One byte of "NOOP" a second never completes the line; the deadline does not move.
        for (i, byte) in ["N", "O", "O", "P", " ", "x"].iter().enumerate() {
            let t = after(t0, 1000 * (i as u64 + 1));
            assert_eq!(h.at(t).feed(byte), "");
            assert_eq!(h.check(t, false), (None, String::new()));
            assert_eq!(h.session.deadline(false), Some(after(t0, 10_000)));
        }
        assert_eq!(
            h.check(after(t0, 10_000), false),
            (Some(Expiry::Command), TIMEOUT_REPLY.to_string())
        );
        assert!(h.session.is_closed());
    }

    #[test]
    fn every_complete_line_and_every_answer_starts_a_new_wait() {
        let t0 = Instant::now();
        let mut h = Harness::new(timed_config(), "127.0.0.1");
        h.at(t0).session.greeting(t0, &mut Vec::new());
        assert!(h.at(after(t0, 9000)).feed("EHLO c\r\n").starts_with("250-"));
        assert_eq!(h.session.deadline(false), Some(after(t0, 19_000)));
        assert_eq!(h.check(after(t0, 18_999), false).0, None);
        // Under stress the same wait is 2 s.
        assert_eq!(h.session.deadline(true), Some(after(t0, 11_000)));
        assert_eq!(h.check(after(t0, 11_000), true).0, Some(Expiry::Command));
    }

    #[test]
    fn content_trickled_below_the_minimum_rate_is_cut_off_and_dropped() {
        let t0 = Instant::now();
        let mut h = Harness::new(timed_config(), "127.0.0.1");
        h.at(t0)
            .feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
        assert!(h.session.receiving_content());
        // The first window carries 60 bytes (enough), the second 4.
        h.at(after(t0, 1000)).feed(&"y".repeat(60));
        assert_eq!(h.check(after(t0, 5000), false).0, None, "first window met the rate");
        assert_eq!(h.session.deadline(false), Some(after(t0, 10_000)));
        h.at(after(t0, 6000)).feed("abcd");
        assert_eq!(h.check(after(t0, 9999), false).0, None);
        let (expiry, replies) = h.check(after(t0, 10_000), false);
        assert_eq!(
            expiry,
            Some(Expiry::ContentRate {
                window_bytes: 4,
                required_bytes: 50
            })
        );
        assert_eq!(replies, TIMEOUT_REPLY);
        assert!(!h.sink.open, "the half-received message is dropped");
    }

    #[test]
    fn content_at_the_minimum_rate_passes_and_the_total_bound_still_holds() {
        let t0 = Instant::now();
        let mut config = timed_config();
        config.message_size_max = 100_000;
        let mut h = Harness::new(config, "127.0.0.1");
        h.at(t0)
            .feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
        // 12 bytes a second for 20 s: every window carries 60 of the 50 needed.
        for second in 1..=20u64 {
            h.at(after(t0, second * 1000)).feed("0123456789\r\n");
            assert_eq!(h.check(after(t0, second * 1000), false).0, None, "at {second} s");
        }
        assert_eq!(h.at(after(t0, 20_500)).feed(".\r\n"), "250 2.0.0 Ok: queued as ID1\r\n");
        // The total bound: 100 s from the first content byte, however fast the bytes come.
        h.at(after(t0, 30_000))
            .feed("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
        for second in 31..=140u64 {
            h.at(after(t0, second * 1000)).feed(&"z".repeat(60));
            if let (Some(expiry), replies) = h.check(after(t0, second * 1000), false) {
                assert_eq!((expiry, second), (Expiry::ContentTotal, 130));
                assert_eq!(replies, TIMEOUT_REPLY);
                return;
            }
        }
        panic!("the total content bound never struck");
    }

    #[test]
    fn each_auth_response_line_has_the_command_deadline() {
        let t0 = Instant::now();
        let mut h = Harness::with_rules(timed_config(), SUBMISSION_RULES, "127.0.0.1");
        h.at(t0).feed("EHLO c\r\nSTARTTLS\r\n");
        h.feed("EHLO c\r\n");
        assert_eq!(h.at(after(t0, 1000)).feed("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
        h.at(after(t0, 2000)).feed("YWxp");
        assert_eq!(h.check(after(t0, 10_999), false).0, None);
        assert_eq!(h.check(after(t0, 11_000), false).0, Some(Expiry::Command));
    }

    #[test]
    fn junk_commands_past_the_limit_count_as_errors_until_a_message_is_accepted() {
        let mut config = config();
        config.junk_commands_max = 2;
        config.tarpit_after_errors = 100;
        let mut h = Harness::new(config, "127.0.0.1");
        h.feed("EHLO c\r\n");
        assert_eq!(h.feed("NOOP\r\nNOOP\r\n"), "250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n");
        // Each one past the limit is answered as usual and counted (errors_max is 5).
        for _ in 0..4 {
            assert_eq!(h.feed("NOOP\r\n"), "250 2.0.0 Ok\r\n");
        }
        assert!(!h.session.is_closed());
        // An accepted message resets the count.
        h.feed("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\nhi\r\n.\r\n");
        assert_eq!(h.feed("NOOP\r\nHELP\r\n").matches("\r\n").count(), 2);
        assert!(!h.session.is_closed());
        let (replies, closed) = h.feed_split(b"VRFY a\r\nNOOP\r\nNOOP\r\nNOOP\r\nNOOP\r\n", 1000);
        assert!(closed, "{replies}");
        assert!(
            replies.ends_with("421 4.7.0 Too many errors, closing connection\r\n"),
            "{replies}"
        );
    }

    #[test]
    fn shutdown_closes_with_421() {
        let mut h = Harness::new(config(), "127.0.0.1");
        h.feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\npartial");
        assert!(h.session.in_transaction() && h.session.receiving_content());
        let mut out = Vec::new();
        h.session.shutting_down(&mut h.sink, &mut out);
        assert_eq!(out, b"421 4.3.2 Service shutting down, try again later\r\n");
        assert!(!h.sink.open, "the half-received message is dropped");
    }

    fn b64(text: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn starttls_throws_away_pipelined_commands_and_starts_over() {
        let mut h = Harness::with_rules(config(), SUBMISSION_RULES, "192.0.2.1");
        let ehlo = h.feed("EHLO c\r\n");
        assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");
        assert!(!ehlo.contains("AUTH"), "AUTH only over TLS: {ehlo}");
        let replies = h.feed("STARTTLS\r\nRSET\r\nMAIL FROM:<x@y.test>\r\n");
        assert_eq!(
            replies, "220 2.0.0 Ready to start TLS\r\n",
            "nothing after STARTTLS runs"
        );
        assert_eq!(h.discarded_at_starttls, b"RSET\r\nMAIL FROM:<x@y.test>\r\n");
        // The session starts over: no HELO, and the EHLO reply now offers AUTH, not STARTTLS.
        assert_eq!(
            h.feed("MAIL FROM:<x@y.test>\r\n"),
            "503 5.5.1 Send HELO or EHLO first\r\n"
        );
        let ehlo = h.feed("EHLO c\r\n");
        assert!(
            ehlo.contains("250-AUTH PLAIN LOGIN\r\n") && !ehlo.contains("STARTTLS"),
            "{ehlo}"
        );
        assert_eq!(h.feed("STARTTLS\r\n"), "503 5.5.1 TLS is already active\r\n");
    }

    #[test]
    fn starttls_refusals() {
        let mut h = Harness::with_rules(config(), SUBMISSION_RULES, "192.0.2.1");
        assert_eq!(h.feed("STARTTLS\r\n"), "503 5.5.1 Send HELO or EHLO first\r\n");
        h.feed("EHLO c\r\n");
        assert_eq!(
            h.feed("STARTTLS now\r\n"),
            "501 5.5.4 This command takes no arguments\r\n"
        );
        let mut h = Harness::new(config(), "127.0.0.1");
        h.feed("EHLO c\r\nMAIL FROM:<a@x.test>\r\n");
        assert_eq!(h.feed("STARTTLS\r\n"), "502 5.5.1 Command not implemented\r\n");
    }

    #[test]
    fn submission_needs_tls_then_auth_before_mail() {
        let mut h = Harness::with_rules(
            SessionConfig {
                errors_max: 50,
                ..config()
            },
            SUBMISSION_RULES,
            "192.0.2.1",
        );
        h.feed("EHLO c\r\n");
        assert_eq!(
            h.feed("MAIL FROM:<alice@example.test>\r\n"),
            "530 5.7.0 Authentication required\r\n"
        );
        let plain = b64("\0alice@example.test\0pw");
        assert_eq!(
            h.feed(&format!("AUTH PLAIN {plain}\r\n")),
            "538 5.7.11 Encryption required for requested authentication mechanism; use STARTTLS first\r\n"
        );
        h.feed("STARTTLS\r\n");
        h.feed("EHLO c\r\n");
        assert_eq!(
            h.feed("AUTH CRAM-MD5\r\n"),
            "504 5.5.4 Unrecognized authentication type; use PLAIN or LOGIN\r\n"
        );
        h.auth_outcome = AuthOutcome::Invalid;
        assert_eq!(
            h.feed(&format!("AUTH PLAIN {plain}\r\n")),
            "535 5.7.8 Authentication credentials invalid\r\n"
        );
        h.auth_outcome = AuthOutcome::Success(Identity::new("alice@example.test", &[]));
        assert_eq!(
            h.feed(&format!("AUTH PLAIN {plain}\r\n")),
            "235 2.7.0 Authentication successful\r\n"
        );
        assert_eq!(h.credentials_seen.len(), 2);
        assert_eq!(h.credentials_seen[1].user, "alice@example.test");
        assert_eq!(h.credentials_seen[1].password, b"pw");
        assert_eq!(
            h.feed(&format!("AUTH PLAIN {plain}\r\n")),
            "503 5.5.1 Already authenticated\r\n"
        );
        assert!(!h.feed("EHLO c\r\n").contains("AUTH"), "not offered once authenticated");
        assert_eq!(
            h.feed("MAIL FROM:<mallory@example.test>\r\n"),
            "553 5.7.1 Sender address not owned by the authenticated user\r\n"
        );
        // An authenticated client from a stranger's address may relay anywhere.
        let replies =
            h.feed("MAIL FROM:<Alice@Example.test> AUTH=<>\r\nRCPT TO:<bob@elsewhere.test>\r\nDATA\r\nHi\r\n.\r\n");
        assert_eq!(
            codes(&replies),
            ["250 2.1.0", "250 2.1.5", "354 End d", "250 2.0.0"],
            "{replies}"
        );
        let message = String::from_utf8(h.sink.committed[0].clone()).unwrap();
        assert!(
            message.contains("with ESMTPSA\r\n\t(using TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256)"),
            "{message}"
        );
    }

    #[test]
    fn the_shell_checks_the_sender_of_unauthenticated_clients_before_mail_is_answered() {
        let rules = ListenerRules {
            check_sender: true,
            ..PLAIN_RULES
        };
        let mut h = Harness::with_rules(config(), rules, "192.0.2.1");
        h.feed("EHLO c\r\n");
        // Accepted: the transaction opens as usual, pipelined commands and all.
        let replies = h.feed("MAIL FROM:<a@x.example>\r\nRCPT TO:<c@local.test>\r\nRSET\r\n");
        assert_eq!(codes(&replies), ["250 2.1.0", "250 2.1.5", "250 2.0.0"]);
        assert_eq!(h.senders_seen, [b"a@x.example".to_vec()]);
        // Refused: the shell's reply, no transaction (so the pipelined RCPT and DATA fail).
        h.sender_verdict = SenderVerdict::Refuse {
            code: 550,
            enhanced: "5.7.23",
            text: "SPF says no".into(),
        };
        let replies = h.feed("MAIL FROM:<a@forged.example>\r\nRCPT TO:<c@local.test>\r\nDATA\r\n");
        assert!(replies.starts_with("550 5.7.23 SPF says no\r\n"), "{replies}");
        assert_eq!(codes(&replies)[1..], ["503 5.5.1", "503 5.5.1"]);
        assert!(h.session.envelope().sender().is_empty());
        assert!(!h.session.in_transaction());
        assert_eq!(h.senders_seen.len(), 2);
        // The shell owes the next step while it checks: no deadline of the client's.
        assert!(h.sink.committed.is_empty());
    }

    #[test]
    fn refusals_are_counted_by_their_enhanced_code() {
        let reason = |code| REJECTION_REASONS[rejection_reason(code)];
        assert_eq!(reason("5.7.23"), "authentication");
        assert_eq!(reason("4.7.24"), "authentication");
        assert_eq!(reason("5.7.1"), "relay_denied");
        assert_eq!(reason("4.7.1"), "rate_limited");
        assert_eq!(reason("5.7.2"), "other");
        assert_eq!(reason("5.1.1"), "address");
    }

    #[test]
    fn an_authenticated_client_is_not_sender_checked() {
        let rules = ListenerRules {
            check_sender: true,
            ..SUBMISSION_RULES
        };
        let mut h = Harness::with_rules(config(), rules, "192.0.2.1");
        h.auth_outcome = AuthOutcome::Success(Identity::new("alice@example.test", &[]));
        h.feed("EHLO c\r\nSTARTTLS\r\n");
        h.feed("EHLO c\r\n");
        assert!(h
            .feed(&format!("AUTH PLAIN {}\r\n", b64("\0bob\0pw")))
            .starts_with("235"));
        assert!(h.feed("MAIL FROM:<alice@example.test>\r\n").starts_with("250"));
        assert!(h.senders_seen.is_empty());
    }

    #[test]
    fn auth_login_steps_cancel_and_block() {
        let mut h = Harness::with_rules(config(), SUBMISSION_RULES, "192.0.2.1");
        h.feed("EHLO c\r\nSTARTTLS\r\n");
        h.feed("EHLO c\r\n");
        assert_eq!(h.feed("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
        assert_eq!(h.feed(&format!("{}\r\n", b64("bob"))), "334 UGFzc3dvcmQ6\r\n");
        h.auth_outcome = AuthOutcome::Unavailable;
        assert_eq!(
            h.feed(&format!("{}\r\n", b64("secret"))),
            "454 4.7.0 Temporary authentication failure\r\n"
        );
        assert_eq!(h.credentials_seen[0].user, "bob");
        assert_eq!(h.credentials_seen[0].password, b"secret");
        assert_eq!(
            h.feed("AUTH LOGIN\r\n*\r\n"),
            "334 VXNlcm5hbWU6\r\n501 5.0.0 Authentication cancelled\r\n"
        );
        assert_eq!(
            h.feed("AUTH PLAIN\r\n!!\r\n"),
            "334 \r\n501 5.5.2 Cannot decode the response: it is not base64\r\n"
        );
        assert_eq!(
            h.feed(&format!("AUTH LOGIN {}\r\n", b64("carol"))),
            "334 UGFzc3dvcmQ6\r\n"
        );
        h.auth_outcome = AuthOutcome::Blocked;
        let (replies, closed) = h.feed_split(format!("{}\r\nNOOP\r\n", b64("x")).as_bytes(), 1000);
        assert_eq!(
            replies,
            "421 4.7.0 Too many authentication failures from your address, try again later\r\n"
        );
        assert!(closed);
    }

    #[test]
    fn mx_without_auth_never_relays_for_strangers_and_never_offers_auth() {
        let rules = ListenerRules {
            starttls: true,
            auth: false,
            auth_required: false,
            check_sender: false,
        };
        let mut h = Harness::with_rules(config(), rules, "192.0.2.1");
        h.feed("EHLO c\r\nSTARTTLS\r\n");
        assert!(h.session.tls.is_some());
        let ehlo = h.feed("EHLO c\r\n");
        assert!(!ehlo.contains("AUTH"), "{ehlo}");
        assert_eq!(
            h.feed("AUTH PLAIN AGEAYg==\r\n"),
            "502 5.5.1 Command not implemented\r\n"
        );
        let replies = h.feed("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@elsewhere.test>\r\nRCPT TO:<b@local.test>\r\n");
        assert_eq!(codes(&replies), ["250 2.1.0", "554 5.7.1", "250 2.1.5"], "{replies}");
    }

    #[test]
    fn recipients_per_session_message_gate_and_tarpit() {
        let mut h = Harness::new(config(), "127.0.0.1");
        h.feed("EHLO c\r\n");
        // recipients_max is 3 per transaction, recipients_per_session_max 5 per connection.
        let first = h
            .feed("MAIL FROM:<a@x.test>\r\nRCPT TO:<1@y.test>\r\nRCPT TO:<2@y.test>\r\nRCPT TO:<3@y.test>\r\nRSET\r\n");
        assert_eq!(
            codes(&first),
            ["250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5", "250 2.0.0"]
        );
        let second =
            h.feed("MAIL FROM:<a@x.test>\r\nRCPT TO:<4@y.test>\r\nRCPT TO:<5@y.test>\r\nRCPT TO:<6@y.test>\r\n");
        assert_eq!(
            codes(&second),
            ["250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3"],
            "{second}"
        );
        assert!(second.contains("Too many recipients for this connection"));
        assert_eq!(h.session.take_reply_delay(), Duration::ZERO, "no errors yet");

        // Errors past tarpit_after_errors (2) hold the replies back, more for each.
        h.feed("BOGUS\r\nBOGUS\r\n");
        assert_eq!(h.session.take_reply_delay(), Duration::ZERO);
        h.feed("BOGUS\r\n");
        assert_eq!(h.session.take_reply_delay(), Duration::from_millis(100));
        h.feed("BOGUS\r\n");
        assert_eq!(h.session.take_reply_delay(), Duration::from_millis(200));

        let mut h = Harness::new(config(), "127.0.0.1");
        h.session = Session::new(
            Rc::new(config()),
            PLAIN_RULES,
            Rc::new(CountingGate(std::cell::Cell::new(1))),
            "127.0.0.1".parse().unwrap(),
            now(),
        );
        h.feed("EHLO c\r\n");
        let replies = h.feed("MAIL FROM:<a@x.test>\r\nRSET\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\n");
        assert_eq!(
            codes(&replies),
            ["250 2.1.0", "250 2.0.0", "450 4.7.1", "503 5.5.1"],
            "{replies}"
        );
    }
}
