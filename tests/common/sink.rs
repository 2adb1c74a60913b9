//! A capture sink for delivery tests: a small SMTP server (PIPELINING, 8BITMIME, SMTPUTF8) that
//! records every transaction with its exact, unstuffed content, counts connections, and can be
//! told to answer 4xx or 5xx.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One received transaction.
#[derive(Debug, Clone)]
pub struct Captured {
    pub from: String,
    pub recipients: Vec<String>,
    /// Content with dot-stuffing removed, as the sender's MTA stored it.
    pub content: Vec<u8>,
    /// Whether it came as BDAT chunks (CHUNKING) rather than DATA.
    pub via_bdat: bool,
}

#[derive(Default)]
pub struct Behaviour {
    /// Answer `451` after the final dot for this many transactions, then `250`.
    pub defer_data: AtomicUsize,
    /// Answer `550` to RCPT for addresses containing this.
    pub reject_rcpt: Mutex<Option<String>>,
    /// Scripted RCPT replies: an address containing the first string gets the second as its
    /// whole reply line (without CRLF), e.g. a receiver's published reply text.
    pub rcpt_replies: Mutex<Vec<(String, String)>>,
    /// Offer CHUNKING (RFC 3030) and accept BDAT.
    pub chunking: AtomicBool,
    /// Close the connection right after each accepted message, without waiting for QUIT (as a
    /// server with a short idle timeout does).
    pub close_after_message: AtomicBool,
    /// Every RCPT address the sink was given, in order (whatever it answered).
    pub rcpts_seen: Mutex<Vec<String>>,
}

pub struct CaptureSink {
    pub addr: SocketAddr,
    pub behaviour: Arc<Behaviour>,
    captured: Arc<(Mutex<Vec<Captured>>, Condvar)>,
    pub connections: Arc<AtomicUsize>,
    /// Connections open now, and the most ever open at once (shareable between sinks).
    pub active: Arc<AtomicUsize>,
    pub active_max: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl CaptureSink {
    pub fn start() -> CaptureSink {
        CaptureSink::start_on("127.0.0.1:0".parse().unwrap())
    }

    pub fn start_on(addr: SocketAddr) -> CaptureSink {
        CaptureSink::try_start_on(addr).expect("bind capture sink")
    }

    /// Like `start_on`, but returns the bind error (for callers that choose another port).
    pub fn try_start_on(addr: SocketAddr) -> std::io::Result<CaptureSink> {
        let listener = TcpListener::bind(addr)?;
        Ok(CaptureSink::serve_on(
            listener,
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        ))
    }

    /// A second sink whose open-connection gauge is shared with `other`.
    pub fn start_sharing_gauge(other: &CaptureSink) -> CaptureSink {
        CaptureSink::start_with(
            "127.0.0.1:0".parse().unwrap(),
            other.active.clone(),
            other.active_max.clone(),
        )
    }

    fn start_with(addr: SocketAddr, active: Arc<AtomicUsize>, active_max: Arc<AtomicUsize>) -> CaptureSink {
        let listener = TcpListener::bind(addr).expect("bind capture sink");
        CaptureSink::serve_on(listener, active, active_max)
    }

    fn serve_on(listener: TcpListener, active: Arc<AtomicUsize>, active_max: Arc<AtomicUsize>) -> CaptureSink {
        let addr = listener.local_addr().unwrap();
        let sink = CaptureSink {
            addr,
            behaviour: Arc::new(Behaviour::default()),
            captured: Arc::new((Mutex::new(Vec::new()), Condvar::new())),
            connections: Arc::new(AtomicUsize::new(0)),
            active,
            active_max,
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (behaviour, captured, connections, stop) = (
            sink.behaviour.clone(),
            sink.captured.clone(),
            sink.connections.clone(),
            sink.stop.clone(),
        );
        let (active, active_max) = (sink.active.clone(), sink.active_max.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                connections.fetch_add(1, Ordering::AcqRel);
                let (behaviour, captured) = (behaviour.clone(), captured.clone());
                let (active, active_max) = (active.clone(), active_max.clone());
                let now = active.fetch_add(1, Ordering::AcqRel) + 1;
                active_max.fetch_max(now, Ordering::AcqRel);
                std::thread::spawn(move || {
                    // A session that said QUIT counts as gone before its 221 goes out, so
                    // that a client which opens its next connection on the 221 is never
                    // seen holding two.
                    let left = std::cell::Cell::new(false);
                    let leave = || {
                        if !left.replace(true) {
                            active.fetch_sub(1, Ordering::AcqRel);
                        }
                    };
                    let _ = serve(stream, &behaviour, &captured, &leave);
                    leave();
                });
            }
        });
        sink
    }

    /// Waits until `n` transactions have arrived; returns them all.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Captured> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.captured;
        let mut got = lock.lock().unwrap();
        while got.len() < n {
            let now = Instant::now();
            assert!(now < deadline, "only {} of {n} transactions arrived", got.len());
            got = cv.wait_timeout(got, deadline - now).unwrap().0;
        }
        got.clone()
    }

    pub fn captured(&self) -> Vec<Captured> {
        self.captured.0.lock().unwrap().clone()
    }
}

impl Drop for CaptureSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(
    stream: TcpStream,
    behaviour: &Behaviour,
    captured: &(Mutex<Vec<Captured>>, Condvar),
    leave: &dyn Fn(),
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut out = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    out.write_all(b"220 capture.test ESMTP\r\n")?;
    let (mut from, mut recipients) = (String::new(), Vec::new());
    let mut bdat_content: Vec<u8> = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).trim_end().to_string();
        let upper = text.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            if behaviour.chunking.load(Ordering::Acquire) {
                out.write_all(b"250-capture.test\r\n250-CHUNKING\r\n")?;
            } else {
                out.write_all(b"250-capture.test\r\n")?;
            }
            out.write_all(b"250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 100000000\r\n")?;
        } else if let Some(args) = upper.strip_prefix("BDAT ") {
            let mut words = args.split_whitespace();
            let size: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let last = words.next() == Some("LAST");
            let mut chunk = vec![0u8; size];
            std::io::Read::read_exact(&mut reader, &mut chunk)?;
            bdat_content.extend_from_slice(&chunk);
            if !last {
                out.write_all(format!("250 2.0.0 {size} octets\r\n").as_bytes())?;
                continue;
            }
            if recipients.is_empty() {
                bdat_content.clear();
                out.write_all(b"554 5.5.1 no valid recipients\r\n")?;
                continue;
            }
            let (lock, cv) = captured;
            lock.lock().unwrap().push(Captured {
                from: from.clone(),
                recipients: recipients.clone(),
                content: std::mem::take(&mut bdat_content),
                via_bdat: true,
            });
            cv.notify_all();
            out.write_all(b"250 2.0.0 captured\r\n")?;
        } else if upper.starts_with("HELO") {
            out.write_all(b"250 capture.test\r\n")?;
        } else if upper.starts_with("MAIL FROM:") {
            from = text[10..]
                .split('>')
                .next()
                .unwrap_or("")
                .trim_start_matches('<')
                .to_string();
            recipients.clear();
            out.write_all(b"250 2.1.0 ok\r\n")?;
        } else if upper.starts_with("RCPT TO:") {
            let rcpt = text[8..]
                .split('>')
                .next()
                .unwrap_or("")
                .trim_start_matches('<')
                .to_string();
            behaviour.rcpts_seen.lock().unwrap().push(rcpt.clone());
            let reject = behaviour
                .reject_rcpt
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|r| rcpt.contains(r.as_str()));
            let scripted = behaviour
                .rcpt_replies
                .lock()
                .unwrap()
                .iter()
                .find(|(part, _)| rcpt.contains(part.as_str()))
                .map(|(_, reply)| reply.clone());
            if let Some(reply) = scripted {
                out.write_all(format!("{reply}\r\n").as_bytes())?;
            } else if reject {
                out.write_all(b"550 5.1.1 no such user\r\n")?;
            } else {
                recipients.push(rcpt);
                out.write_all(b"250 2.1.5 ok\r\n")?;
            }
        } else if upper == "DATA" {
            if recipients.is_empty() {
                out.write_all(b"554 5.5.1 no valid recipients\r\n")?;
                continue;
            }
            out.write_all(b"354 go ahead\r\n")?;
            let mut content = Vec::new();
            loop {
                line.clear();
                if reader.read_until(b'\n', &mut line)? == 0 {
                    return Ok(());
                }
                if line == b".\r\n" {
                    break;
                }
                let unstuffed = if line.starts_with(b".") { &line[1..] } else { &line[..] };
                content.extend_from_slice(unstuffed);
            }
            let defer = behaviour
                .defer_data
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok();
            if defer {
                out.write_all(b"451 4.3.0 try again later\r\n")?;
            } else {
                let (lock, cv) = captured;
                lock.lock().unwrap().push(Captured {
                    from: from.clone(),
                    recipients: recipients.clone(),
                    content,
                    via_bdat: false,
                });
                cv.notify_all();
                out.write_all(b"250 2.0.0 captured\r\n")?;
                if behaviour.close_after_message.load(Ordering::Acquire) {
                    return Ok(());
                }
            }
        } else if upper == "RSET" || upper == "NOOP" {
            out.write_all(b"250 2.0.0 ok\r\n")?;
        } else if upper == "QUIT" {
            leave();
            out.write_all(b"221 2.0.0 bye\r\n")?;
            return Ok(());
        } else {
            out.write_all(b"500 5.5.2 what\r\n")?;
        }
    }
}
