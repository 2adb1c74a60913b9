//! One SMTP connection: moves bytes between the socket and the sans-IO [`Session`], and does
//! what the session asks (commit a message, run a TLS handshake, check credentials). Timeouts
//! and shutdown are applied here.
//!
//! Timeouts are the session's deadlines (`smtp::deadline`): absolute instants that the session
//! names and that arriving bytes cannot move, raced against the read with a timer. (A socket
//! read timeout would re-arm with every byte, and through TLS with every byte of a record.)
//!
//! The connection owns its read buffer (never a buffered reader), so bytes that arrive after
//! STARTTLS and before the handshake are discarded exactly (CVE-2011-0411): they are never
//! executed as commands of the encrypted session.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;
use tracing::{debug, info};

use super::proxy::ProxyError;
use super::shard::{Refusal, SessionGuard, Shard, ShardSignal, Stage};
use super::tls::summarize;
use crate::config::mail_authentication::MailAuthentication;
use crate::config::{Listener, ListenerKind};
use crate::metrics;
use crate::smtp::deadline::Now;
use crate::smtp::received::TlsSummary;
use crate::smtp::reply;
use crate::smtp::session::{ListenerRules, MessageGate, MessageSink, Next, Session, REJECTION_REASONS};
use crate::spool::buffer::MessageBuffer;
use crate::transport::Transport;

type Stream = Transport<futures_rustls::server::TlsStream<TcpStream>>;

/// Smallest read buffer; it is at least one command line long.
const READ_BUFFER_BYTES_MIN: usize = 16 * 1024;
/// Shortest wait for a deadline (one that has just passed is checked on the next turn).
const WAIT_MIN: Duration = Duration::from_millis(1);

/// What ended a wait for input.
enum Wake {
    Read(std::io::Result<usize>),
    /// The shard's stage or stress changed; true if it entered stress.
    Signal(bool),
    /// The session's deadline came.
    Deadline,
}

/// The connection is over (the reason is logged where it happens).
struct Closed;

/// Why a TLS handshake did not complete.
#[derive(Debug)]
pub enum HandshakeError {
    AlreadyEncrypted,
    Failed(std::io::Error),
    TimedOut(Duration),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::AlreadyEncrypted => write!(f, "the connection is already encrypted"),
            HandshakeError::Failed(e) => write!(f, "{e}"),
            HandshakeError::TimedOut(t) => write!(f, "timed out after {t:?}"),
        }
    }
}

async fn write_all(stream: &mut Stream, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    metrics::with(|m| m.count_inbound_replies(out));
    let ok = stream.write_all(out).await.is_ok();
    out.clear();
    ok
}

/// Runs the server side of a TLS handshake on the plain stream; the whole handshake must end
/// within `timeout`.
async fn handshake(stream: &mut Stream, shard: &Shard, timeout: Duration) -> Result<TlsSummary, HandshakeError> {
    let tcp = stream.take_plain().ok_or(HandshakeError::AlreadyEncrypted)?;
    let accept = shard.tls_acceptor.accept(tcp);
    let result = futures_lite::future::or(async { Some(accept.await) }, async {
        glommio::timer::sleep(timeout).await;
        None
    })
    .await;
    let outcome = match result {
        Some(Ok(tls)) => {
            let summary = summarize(tls.get_ref().1);
            *stream = Transport::Tls(Box::new(tls));
            Ok(summary)
        }
        Some(Err(e)) => Err(HandshakeError::Failed(e)),
        None => Err(HandshakeError::TimedOut(timeout)),
    };
    let (version, result) = match &outcome {
        Ok(summary) => (metrics::tls_version_label(&summary.version), "ok"),
        Err(HandshakeError::TimedOut(_)) => ("none", "timeout"),
        Err(_) => ("none", "failed"),
    };
    metrics::with(|m| m.tls_handshakes.add(("inbound", version, result), 1));
    outcome
}

/// Serves one accepted connection to its end. `listener_index` is the listener's place in the
/// configuration (its metrics).
pub async fn serve(mut tcp: TcpStream, shard: Rc<Shard>, listener: Listener, listener_index: usize) {
    let Ok(mut peer) = tcp.peer_addr() else {
        return;
    };
    shard.take_reloaded_config();
    if listener.proxy_protocol {
        match proxied_client(&mut tcp, &listener, peer).await {
            Ok(client) => peer = client,
            Err(e) => {
                info!(shard = shard.index, proxy = %peer, "connection closed: {e}");
                metrics::with(|m| m.listener(listener_index).connections.add("refused_proxy", 1));
                return;
            }
        }
    }
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_write_timeout(Some(shard.config().limits.command_timeout.0));
    let mut stream = Stream::Plain(tcp);
    let ip = peer.ip().to_canonical();
    let guard = match shard.admit(ip) {
        Ok(guard) => guard,
        Err(refusal) => {
            metrics::with(|m| {
                m.listener(listener_index).connections.add(refusal.result_label(), 1);
                m.rate_limited.add(refusal.limit_label(), 1);
            });
            return refuse(&mut stream, &shard, listener.kind, ip, refusal).await;
        }
    };
    debug!(shard = shard.index, client = %peer, kind = ?listener.kind, "connected");
    let _active = ActiveSession::open(listener_index);
    let Some(conn) = Conn::open(stream, shard, &listener, listener_index, peer, guard).await else {
        return;
    };
    conn.run().await;
}

/// The client behind the load balancer at `proxy`: only a `proxy_from` address may say who
/// its client is. A v2 LOCAL or an UNKNOWN header keeps the proxy's own address.
async fn proxied_client(tcp: &mut TcpStream, listener: &Listener, proxy: SocketAddr) -> Result<SocketAddr, ProxyError> {
    let ip = proxy.ip().to_canonical();
    if !listener.proxy_from.iter().any(|n| n.0.contains(ip)) {
        return Err(ProxyError::NotAllowed);
    }
    let client = super::proxy::read_header(tcp).await?.unwrap_or(proxy);
    debug!(client = %client, proxy = %proxy, "PROXY header read");
    Ok(client)
}

/// Counts a session as accepted and active for as long as it lives.
struct ActiveSession(usize);

impl ActiveSession {
    fn open(listener: usize) -> ActiveSession {
        metrics::with(|m| {
            let l = m.listener(listener);
            l.connections.add("accepted", 1);
            l.connections_active += 1;
        });
        ActiveSession(listener)
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        metrics::with(|m| m.listener(self.0).connections_active -= 1);
    }
}

/// Answers a connection the shard's limits turn away, then closes it.
async fn refuse(stream: &mut Stream, shard: &Shard, kind: ListenerKind, ip: IpAddr, refusal: Refusal) {
    let reply = match refusal {
        Refusal::ShardFull => reply::TOO_MANY_SESSIONS,
        Refusal::IpFull => reply::TOO_MANY_SESSIONS_FROM_IP,
        Refusal::ConnectionRate => reply::CONNECTION_RATE,
        Refusal::AuthBlocked => reply::AUTH_BLOCKED,
    };
    info!(shard = shard.index, client = %ip, "connection refused: {}", reply.text);
    // On smtps the refusal can only be read through TLS.
    if kind == ListenerKind::Smtps
        && handshake(stream, shard, shard.config().tls.handshake_timeout.0)
            .await
            .is_err()
    {
        return;
    }
    let mut out = Vec::new();
    reply.write(&mut out);
    write_all(stream, &mut out).await;
}

/// A session in progress: the socket, the session, the message buffer, the read buffer.
struct Conn {
    shard: Rc<Shard>,
    listener: usize,
    guard: SessionGuard,
    peer: SocketAddr,
    stream: Stream,
    session: Session,
    sink: MessageBuffer,
    buf: Vec<u8>,
    /// Unconsumed input is `buf[start..end]`.
    start: usize,
    end: usize,
    out: Vec<u8>,
    /// The shard entered stress since the last wait: apply the stress deadline this once.
    swept: bool,
    stress_entries_seen: u64,
    /// SPF's results for the open transaction, found when its MAIL FROM was checked.
    sender_spf: Option<crate::authentication::SenderSpf>,
}

impl Conn {
    /// The session, after the implicit TLS handshake of an smtps listener; greeted.
    async fn open(
        mut stream: Stream,
        shard: Rc<Shard>,
        listener: &Listener,
        listener_index: usize,
        peer: SocketAddr,
        guard: SessionGuard,
    ) -> Option<Conn> {
        let rules = ListenerRules {
            starttls: listener.offers_starttls(),
            auth: listener.offers_auth() && shard.reloadable.auth_configured(),
            auth_required: listener.requires_auth(),
            check_sender: shard.verification_policy(listener_index, peer.ip().to_canonical())
                != MailAuthentication::Off,
        };
        let gate: Rc<dyn MessageGate> = shard.clone();
        let ip = peer.ip().to_canonical();
        let mut session = Session::new(shard.session_config(), rules, gate, ip, Now::read());
        if listener.kind == ListenerKind::Smtps {
            match handshake(&mut stream, &shard, shard.config().tls.handshake_timeout.0).await {
                Ok(summary) => {
                    info!(shard = shard.index, client = %peer, version = %summary.version, cipher = %summary.cipher, "TLS established (implicit)");
                    session = session.with_implicit_tls(summary);
                }
                Err(e) => {
                    info!(shard = shard.index, client = %peer, "TLS handshake failed: {e}");
                    return None;
                }
            }
        }
        let buffer_bytes = READ_BUFFER_BYTES_MIN.max(2 * shard.config().limits.line_length_max);
        let mut conn = Conn {
            sink: shard.appender.message_buffer(),
            stress_entries_seen: shard.stress_entries(),
            shard,
            listener: listener_index,
            guard,
            peer,
            stream,
            session,
            buf: vec![0u8; buffer_bytes],
            start: 0,
            end: 0,
            out: Vec::with_capacity(1024),
            swept: false,
            sender_spf: None,
        };
        conn.session.greeting(Instant::now(), &mut conn.out);
        write_all(&mut conn.stream, &mut conn.out).await.then_some(conn)
    }

    async fn run(mut self) {
        while self.turn().await.is_ok() {}
    }

    /// Answers what is buffered, writes the replies, and waits for more input.
    async fn turn(&mut self) -> Result<(), Closed> {
        self.answer_buffered().await?;
        self.compact();
        let stage = self.shard.stage();
        if stage == Stage::Forced || (stage == Stage::Draining && !self.session.in_transaction()) {
            self.session.shutting_down(&mut self.sink, &mut self.out);
            write_all(&mut self.stream, &mut self.out).await;
            return Err(Closed);
        }
        if !self.flush().await {
            self.abandon();
            return Err(Closed);
        }
        self.wait_for_input(stage).await
    }

    /// Feeds the buffered input to the session (pipelining: many commands at once), doing what
    /// it asks on the way, until it needs more input.
    async fn answer_buffered(&mut self) -> Result<(), Closed> {
        let now = Now::read();
        loop {
            let step = self
                .session
                .receive(&self.buf[self.start..self.end], now, &mut self.sink, &mut self.out);
            self.start += step.consumed;
            self.count_rejections();
            match step.next {
                Next::NeedInput => return Ok(()),
                Next::Close => {
                    self.flush().await;
                    return Err(Closed);
                }
                Next::StartTls => self.start_tls().await?,
                Next::Authenticate => {
                    let Some(credentials) = self.session.take_credentials() else {
                        unreachable!("the session hands over credentials with Next::Authenticate");
                    };
                    let outcome = self.shard.check_credentials(self.ip(), credentials).await;
                    self.session
                        .authenticated(outcome, Instant::now(), &mut self.sink, &mut self.out);
                }
                Next::CheckSender => {
                    let (verdict, spf) = self.shard.check_sender(&self.session, self.listener).await;
                    self.sender_spf = spf;
                    self.session
                        .sender_checked(verdict, Instant::now(), &mut self.sink, &mut self.out);
                }
                Next::Commit => {
                    let spf = self.sender_spf.take();
                    let result = self
                        .shard
                        .commit_and_enqueue(&self.session, &mut self.sink, self.listener, spf)
                        .await;
                    let id = result.map(|id| id.to_string());
                    self.session
                        .committed(id.as_deref().map_err(|e| e.clone()), Instant::now(), &mut self.out);
                }
            }
        }
    }

    /// STARTTLS: the 220 out, every byte pipelined behind it thrown away (CVE-2011-0411), the
    /// handshake, and the session starts over.
    async fn start_tls(&mut self) -> Result<(), Closed> {
        if !write_all(&mut self.stream, &mut self.out).await {
            return Err(Closed);
        }
        let discarded = self.end - self.start;
        if discarded > 0 {
            info!(
                shard = self.shard.index,
                client = %self.peer,
                "discarded {discarded} byte(s) sent after STARTTLS before the handshake (command injection, CVE-2011-0411)"
            );
        }
        (self.start, self.end) = (0, 0);
        match handshake(
            &mut self.stream,
            &self.shard,
            self.shard.config().tls.handshake_timeout.0,
        )
        .await
        {
            Ok(summary) => {
                info!(shard = self.shard.index, client = %self.peer, version = %summary.version, cipher = %summary.cipher, "TLS established");
                self.session.tls_started(summary, Instant::now());
                Ok(())
            }
            Err(e) => {
                info!(shard = self.shard.index, client = %self.peer, "TLS handshake failed: {e}");
                Err(Closed)
            }
        }
    }

    /// Waits for input, the shard's signal, or the session's deadline; past the deadline,
    /// 421 4.4.2 and close.
    async fn wait_for_input(&mut self, stage: Stage) -> Result<(), Closed> {
        let shard = self.shard.clone();
        let stressed = shard.stressed() || std::mem::take(&mut self.swept);
        let now = Instant::now();
        if let Some(expiry) = self
            .session
            .check_deadline(now, stressed, &mut self.sink, &mut self.out)
        {
            let why = expiry.sentence(&shard.session_config().timeouts, stressed);
            info!(shard = shard.index, client = %self.peer, "timeout: {why}");
            write_all(&mut self.stream, &mut self.out).await;
            return Err(Closed);
        }
        let command_timeout = shard.config().limits.command_timeout.0;
        let deadline = self.session.deadline(stressed).unwrap_or(now + command_timeout);
        let wait = deadline.saturating_duration_since(now).max(WAIT_MIN);
        debug_assert!(self.end < self.buf.len(), "the session consumes any full buffer");
        let (stream, free) = (&mut self.stream, &mut self.buf[self.end..]);
        let read = async { Wake::Read(stream.read(free).await) };
        let signal = async {
            let entered = ShardSignal {
                shard: &shard,
                slot: &self.guard.slot,
                seen_stage: stage,
                seen_stressed: shard.stressed(),
                seen_stress_entries: self.stress_entries_seen,
            }
            .await;
            Wake::Signal(entered)
        };
        let timer = async {
            glommio::timer::sleep(wait).await;
            Wake::Deadline
        };
        match futures_lite::future::or(read, futures_lite::future::or(signal, timer)).await {
            Wake::Signal(entered) => {
                self.swept |= entered;
                self.stress_entries_seen = shard.stress_entries();
                Ok(())
            }
            Wake::Deadline => Ok(()),
            Wake::Read(Ok(0)) => {
                debug!(shard = shard.index, client = %self.peer, "client closed the connection");
                self.abandon();
                Err(Closed)
            }
            Wake::Read(Ok(n)) => {
                self.end += n;
                Ok(())
            }
            Wake::Read(Err(e)) => {
                debug!(shard = shard.index, client = %self.peer, "read failed: {e}");
                self.abandon();
                Err(Closed)
            }
        }
    }

    /// Adds the transaction steps the session refused to the listener's metrics.
    fn count_rejections(&mut self) {
        let rejected = self.session.take_rejections();
        if rejected.iter().all(|&n| n == 0) {
            return;
        }
        metrics::with(|m| {
            let listener = m.listener(self.listener);
            for (reason, &n) in REJECTION_REASONS.iter().zip(&rejected) {
                if n > 0 {
                    listener.messages_rejected.add(reason, u64::from(n));
                }
            }
        });
    }

    fn ip(&self) -> IpAddr {
        self.peer.ip().to_canonical()
    }

    /// Moves unconsumed input to the front of the buffer.
    fn compact(&mut self) {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
    }

    /// Writes the pending replies, first holding them back as long as the session asks
    /// (tarpit).
    async fn flush(&mut self) -> bool {
        let delay = self.session.take_reply_delay();
        if !delay.is_zero() && !self.out.is_empty() {
            glommio::timer::sleep(delay).await;
        }
        write_all(&mut self.stream, &mut self.out).await
    }

    /// The connection is gone mid-transaction: drop whatever message was being built.
    fn abandon(&mut self) {
        if self.session.in_transaction() {
            self.sink.abandon();
        }
    }
}
