//! One SMTP connection: moves bytes between the socket and the sans-IO [`Session`], hands
//! finished messages to the spool, and applies timeouts and shutdown.
//!
//! The connection owns its read buffer (never a buffered reader), so bytes that arrive after a
//! command that changes the stream (STARTTLS, in a later release) can be discarded exactly.

use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use tracing::{debug, info, warn};

use super::shard::{Refusal, Shard, Stage, StageChange};
use crate::config::ListenerKind;
use crate::queue::QueuedMessage;
use crate::smtp::received::unix_now_s;
use crate::smtp::reply;
use crate::smtp::session::{Next, Session};
use crate::spool::record::StoredEnvelope;

/// Smallest read buffer; it is at least one command line long.
const READ_BUFFER_BYTES_MIN: usize = 16 * 1024;
/// Shortest timeout handed to the socket (zero would mean "none").
const TIMEOUT_MIN: Duration = Duration::from_millis(1);

/// What ended a wait for input.
enum Wake {
    Read(std::io::Result<usize>),
    Stage,
}

async fn write_all(stream: &mut TcpStream, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    let ok = stream.write_all(out).await.is_ok();
    out.clear();
    ok
}

pub async fn serve(mut stream: TcpStream, shard: Rc<Shard>, kind: ListenerKind) {
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    let ip = peer.ip().to_canonical();
    let limits = &shard.config.limits;
    let command_timeout = limits.command_timeout.0;
    let data_timeout = limits.data_timeout.0;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(command_timeout));
    let mut out = Vec::with_capacity(1024);

    let guard = match shard.admit(ip) {
        Ok(guard) => guard,
        Err(refusal) => {
            let reply = match refusal {
                Refusal::ShardFull => reply::TOO_MANY_SESSIONS,
                Refusal::IpFull => reply::TOO_MANY_SESSIONS_FROM_IP,
            };
            info!(shard = shard.index, client = %ip, "connection refused: {}", reply.text);
            reply.write(&mut out);
            write_all(&mut stream, &mut out).await;
            return;
        }
    };
    debug!(shard = shard.index, client = %peer, ?kind, "connected");

    let mut session = Session::new(shard.session_config.clone(), ip);
    let mut sink = shard.appender.message_buffer();
    let mut buf = vec![0u8; READ_BUFFER_BYTES_MIN.max(2 * limits.line_length_max)];
    let (mut start, mut end) = (0usize, 0usize);
    let mut content_started: Option<Instant> = None;

    session.greeting(&mut out);
    if !write_all(&mut stream, &mut out).await {
        return;
    }
    loop {
        // Answer everything buffered (pipelining), committing messages on the way.
        loop {
            let step = session.receive(&buf[start..end], &mut sink, &mut out);
            start += step.consumed;
            match step.next {
                Next::NeedInput => break,
                Next::Close => {
                    write_all(&mut stream, &mut out).await;
                    return;
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
                                "queued"
                            );
                            shard.record_queued(
                                QueuedMessage {
                                    id,
                                    record_bytes,
                                    envelope: StoredEnvelope::from_envelope(env, session.origin(unix_now_s())),
                                    done: vec![false; env.recipient_count()],
                                    content_bytes,
                                    attempts: 0,
                                    jobs_outstanding: 0,
                                    delay_notified: false,
                                },
                                written,
                            );
                            let id = id.to_string();
                            session.committed(Ok(&id), &mut out);
                        }
                        Err(e) => {
                            warn!(shard = shard.index, client = %ip, "message refused by the spool: {e:?}");
                            session.committed(Err(e), &mut out);
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
        if !write_all(&mut stream, &mut out).await {
            sink_abandon(&mut session, &mut sink);
            return;
        }

        // The total content deadline runs from the first content byte to the end of the transaction.
        if !session.in_transaction() {
            content_started = None;
        } else if session.receiving_content() && content_started.is_none() {
            content_started = Some(Instant::now());
        }
        let timeout = match content_started {
            Some(t0) => match data_timeout.checked_sub(t0.elapsed()) {
                Some(left) => left.min(command_timeout),
                None => Duration::ZERO,
            },
            None => command_timeout,
        };
        if timeout.is_zero() {
            session.timed_out(&mut sink, &mut out);
            write_all(&mut stream, &mut out).await;
            return;
        }
        let _ = stream.set_read_timeout(Some(timeout.max(TIMEOUT_MIN)));
        debug_assert!(end < buf.len(), "the session consumes any full buffer");
        let wake = futures_lite::future::or(async { Wake::Read(stream.read(&mut buf[end..]).await) }, async {
            StageChange {
                shard: &shard,
                slot: &guard.slot,
                seen: stage,
            }
            .await;
            Wake::Stage
        })
        .await;
        match wake {
            Wake::Stage => continue,
            Wake::Read(Ok(0)) => {
                debug!(shard = shard.index, client = %peer, "client closed the connection");
                sink_abandon(&mut session, &mut sink);
                return;
            }
            Wake::Read(Ok(n)) => end += n,
            Wake::Read(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                info!(shard = shard.index, client = %peer, "timeout");
                session.timed_out(&mut sink, &mut out);
                write_all(&mut stream, &mut out).await;
                return;
            }
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
