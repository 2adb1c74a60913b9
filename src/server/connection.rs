//! One SMTP connection: moves bytes between the socket and the sans-IO [`Session`], hands
//! finished messages to the spool, and applies timeouts and shutdown.
//!
//! Timeouts are the session's deadlines (`smtp::deadline`): absolute instants that the session
//! names and that arriving bytes cannot move, raced against the read with a timer. (A socket
//! read timeout would re-arm with every byte, and through TLS with every byte of a record.)
//!
//! The connection owns its read buffer (never a buffered reader), so bytes that arrive after
//! STARTTLS and before the handshake are discarded exactly (CVE-2011-0411): they are never
//! executed as commands of the encrypted session.

use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;
use tracing::{debug, info, warn};

use super::shard::{Refusal, Shard, ShardSignal, Stage};
use super::tls::summarize;
use crate::config::{Listener, ListenerKind};
use crate::smtp::deadline::Now;
use crate::smtp::received::TlsSummary;
use crate::smtp::reply;
use crate::smtp::session::{ListenerRules, MessageGate, Next, Session};
use crate::spool::record::EnvelopeBytes;
use crate::transport::Transport;
use gannet_sched::QueuedMessage;

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

async fn write_all(stream: &mut Stream, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    let ok = stream.write_all(out).await.is_ok();
    out.clear();
    ok
}

/// Writes the pending replies, first holding them back as long as the session asks (tarpit).
async fn flush(stream: &mut Stream, session: &mut Session, out: &mut Vec<u8>) -> bool {
    let delay = session.take_reply_delay();
    if !delay.is_zero() && !out.is_empty() {
        glommio::timer::sleep(delay).await;
    }
    write_all(stream, out).await
}

/// Runs the server side of a TLS handshake on the plain stream; the whole handshake must end
/// within `timeout`.
async fn handshake(stream: &mut Stream, shard: &Shard, timeout: Duration) -> Result<TlsSummary, String> {
    let tcp = stream.take_plain().ok_or("the connection is already encrypted")?;
    let accept = shard.tls_acceptor.accept(tcp);
    let result = futures_lite::future::or(async { Some(accept.await) }, async {
        glommio::timer::sleep(timeout).await;
        None
    })
    .await;
    match result {
        Some(Ok(tls)) => {
            let summary = summarize(tls.get_ref().1);
            *stream = Transport::Tls(Box::new(tls));
            Ok(summary)
        }
        Some(Err(e)) => Err(e.to_string()),
        None => Err(format!("timed out after {timeout:?}")),
    }
}

pub async fn serve(tcp: TcpStream, shard: Rc<Shard>, listener: Listener) {
    let Ok(peer) = tcp.peer_addr() else {
        return;
    };
    let ip = peer.ip().to_canonical();
    let limits = &shard.config.limits;
    let command_timeout = limits.command_timeout.0;
    let handshake_timeout = shard.config.tls.handshake_timeout.0;
    let _ = tcp.set_nodelay(true);
    let _ = tcp.set_write_timeout(Some(command_timeout));
    let mut stream = Stream::Plain(tcp);
    let mut out = Vec::with_capacity(1024);
    let kind = listener.kind;

    let guard = match shard.admit(ip) {
        Ok(guard) => guard,
        Err(refusal) => {
            let reply = match refusal {
                Refusal::ShardFull => reply::TOO_MANY_SESSIONS,
                Refusal::IpFull => reply::TOO_MANY_SESSIONS_FROM_IP,
                Refusal::ConnectionRate => reply::CONNECTION_RATE,
                Refusal::AuthBlocked => reply::AUTH_BLOCKED,
            };
            info!(shard = shard.index, client = %ip, "connection refused: {}", reply.text);
            // On smtps the refusal can only be read through TLS.
            if kind == ListenerKind::Smtps && handshake(&mut stream, &shard, handshake_timeout).await.is_err() {
                return;
            }
            reply.write(&mut out);
            write_all(&mut stream, &mut out).await;
            return;
        }
    };
    debug!(shard = shard.index, client = %peer, ?kind, "connected");

    let rules = ListenerRules {
        starttls: listener.offers_starttls(),
        auth: listener.offers_auth() && shard.reloadable.auth_configured(),
        auth_required: listener.requires_auth(),
    };
    let gate: Rc<dyn MessageGate> = shard.clone();
    let mut session = Session::new(shard.session_config.clone(), rules, gate, ip, Now::read());
    if kind == ListenerKind::Smtps {
        match handshake(&mut stream, &shard, handshake_timeout).await {
            Ok(summary) => {
                info!(shard = shard.index, client = %peer, version = %summary.version, cipher = %summary.cipher, "TLS established (implicit)");
                session = session.with_implicit_tls(summary);
            }
            Err(reason) => {
                info!(shard = shard.index, client = %peer, "TLS handshake failed: {reason}");
                return;
            }
        }
    }
    let mut sink = shard.appender.message_buffer();
    let mut buf = vec![0u8; READ_BUFFER_BYTES_MIN.max(2 * limits.line_length_max)];
    let (mut start, mut end) = (0usize, 0usize);
    // The shard entered stress since the last wait: apply the stress deadline this once.
    let mut swept = false;
    let mut stress_entries_seen = shard.stress_entries();

    session.greeting(Instant::now(), &mut out);
    if !write_all(&mut stream, &mut out).await {
        return;
    }
    loop {
        // Answer everything buffered (pipelining), committing messages on the way.
        let now = Now::read();
        loop {
            let step = session.receive(&buf[start..end], now, &mut sink, &mut out);
            start += step.consumed;
            match step.next {
                Next::NeedInput => break,
                Next::Close => {
                    flush(&mut stream, &mut session, &mut out).await;
                    return;
                }
                Next::StartTls => {
                    if !write_all(&mut stream, &mut out).await {
                        return;
                    }
                    let discarded = end - start;
                    if discarded > 0 {
                        info!(
                            shard = shard.index,
                            client = %peer,
                            "discarded {discarded} byte(s) sent after STARTTLS before the handshake (command injection, CVE-2011-0411)"
                        );
                    }
                    (start, end) = (0, 0);
                    match handshake(&mut stream, &shard, handshake_timeout).await {
                        Ok(summary) => {
                            info!(shard = shard.index, client = %peer, version = %summary.version, cipher = %summary.cipher, "TLS established");
                            session.tls_started(summary, Instant::now());
                        }
                        Err(reason) => {
                            info!(shard = shard.index, client = %peer, "TLS handshake failed: {reason}");
                            return;
                        }
                    }
                }
                Next::Authenticate => {
                    let Some(credentials) = session.take_credentials() else {
                        unreachable!("the session hands over credentials with Next::Authenticate");
                    };
                    let outcome = shard.check_credentials(ip, credentials).await;
                    session.authenticated(outcome, Instant::now(), &mut sink, &mut out);
                }
                Next::Commit => {
                    let message = sink.take();
                    let content_bytes = message.content_bytes;
                    let record_bytes = message.record_len();
                    let keep = shard.deliverer.wants_record(record_bytes as usize);
                    let result = shard.appender.commit_keeping(message, keep).await;
                    match result {
                        Ok((id, written)) => {
                            let env = session.envelope();
                            info!(
                                shard = shard.index,
                                %id,
                                client = %ip,
                                from = %String::from_utf8_lossy(env.sender()),
                                recipients = env.recipient_count(),
                                size = content_bytes,
                                tls = %session.tls().map_or("none", |t| t.version.as_str()),
                                user = %session.user().map_or("-", |u| u.user.as_str()),
                                "queued"
                            );
                            let envelope = EnvelopeBytes::from_envelope(env, session.origin());
                            shard.record_queued(QueuedMessage::new(id, record_bytes, content_bytes, envelope), written);
                            let id = id.to_string();
                            session.committed(Ok(&id), Instant::now(), &mut out);
                        }
                        Err(e) => {
                            warn!(shard = shard.index, client = %ip, "message refused by the spool: {e:?}");
                            session.committed(Err(e), Instant::now(), &mut out);
                        }
                    }
                }
            }
        }
        if start == end {
            (start, end) = (0, 0);
        } else if start > 0 {
            buf.copy_within(start..end, 0);
            (start, end) = (0, end - start);
        }

        let stage = shard.stage();
        if stage == Stage::Forced || (stage == Stage::Draining && !session.in_transaction()) {
            session.shutting_down(&mut sink, &mut out);
            write_all(&mut stream, &mut out).await;
            return;
        }
        if !flush(&mut stream, &mut session, &mut out).await {
            sink_abandon(&mut session, &mut sink);
            return;
        }

        let stressed = shard.stressed() || std::mem::take(&mut swept);
        let now = Instant::now();
        if let Some(expiry) = session.check_deadline(now, stressed, &mut sink, &mut out) {
            let why = expiry.sentence(&shard.session_config.timeouts, stressed);
            info!(shard = shard.index, client = %peer, "timeout: {why}");
            write_all(&mut stream, &mut out).await;
            return;
        }
        let deadline = session.deadline(stressed).unwrap_or(now + command_timeout);
        let wait = deadline.saturating_duration_since(now).max(WAIT_MIN);
        debug_assert!(end < buf.len(), "the session consumes any full buffer");
        let read = async { Wake::Read(stream.read(&mut buf[end..]).await) };
        let signal = async {
            let entered = ShardSignal {
                shard: &shard,
                slot: &guard.slot,
                seen_stage: stage,
                seen_stressed: shard.stressed(),
                seen_stress_entries: stress_entries_seen,
            }
            .await;
            Wake::Signal(entered)
        };
        let timer = async {
            glommio::timer::sleep(wait).await;
            Wake::Deadline
        };
        let wake = futures_lite::future::or(read, futures_lite::future::or(signal, timer)).await;
        match wake {
            Wake::Signal(entered) => {
                swept |= entered;
                stress_entries_seen = shard.stress_entries();
                continue;
            }
            Wake::Deadline => continue,
            Wake::Read(Ok(0)) => {
                debug!(shard = shard.index, client = %peer, "client closed the connection");
                sink_abandon(&mut session, &mut sink);
                return;
            }
            Wake::Read(Ok(n)) => end += n,
            Wake::Read(Err(e)) => {
                debug!(shard = shard.index, client = %peer, "read failed: {e}");
                sink_abandon(&mut session, &mut sink);
                return;
            }
        }
    }
}

/// The connection is gone mid-transaction: drop whatever message was being built.
fn sink_abandon(session: &mut Session, sink: &mut impl crate::smtp::session::MessageSink) {
    if session.in_transaction() {
        sink.abandon();
    }
}
