//! A stub resolver, one per shard: asks the configured recursive servers over a fresh UDP socket
//! per query (random source port and id, random name case), falls back to TCP when the reply is
//! truncated, retries across servers, and shares answers with every shard through the cache.
//! Lookups for the same name on one shard share one query.

use crate::metrics;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpStream, UdpSocket};
use hickory_proto::rr::RecordType;

use super::cache::DnsCache;
use super::message::{build_query, parse_response, randomize_case, Answer, Parsed};

/// Largest UDP reply we read (EDNS is not used, so servers send at most 512 bytes; some send more).
const UDP_REPLY_BYTES_MAX: usize = 4096;
/// Largest TCP reply (the length prefix allows 64 KiB).
const TCP_REPLY_BYTES_MAX: usize = 65535;

pub struct Resolver {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    attempts: usize,
    cache: Arc<DnsCache>,
    inflight: RefCell<HashMap<(String, u16), Vec<Waker>>>,
    random: Cell<u64>,
}

/// Ready when no query for `key` is in flight on this shard.
struct Settled<'a> {
    resolver: &'a Resolver,
    key: (String, u16),
}

impl Future for Settled<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut inflight = self.resolver.inflight.borrow_mut();
        match inflight.get_mut(&self.key) {
            Some(waiters) => {
                waiters.push(cx.waker().clone());
                Poll::Pending
            }
            None => Poll::Ready(()),
        }
    }
}

/// Why one query to one server gave no answer (the next server or round is tried).
#[derive(Debug)]
enum QueryError {
    Socket(glommio::GlommioError<()>),
    Send(glommio::GlommioError<()>),
    TimedOut,
    Tcp(glommio::GlommioError<()>),
    BadTcpReply(gannet_dns::message::Rejected),
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueryError::Socket(e) => write!(f, "cannot open a UDP socket: {e}"),
            QueryError::Send(e) => write!(f, "send failed: {e}"),
            QueryError::TimedOut => write!(f, "timed out"),
            QueryError::Tcp(e) => write!(f, "TCP query failed: {e}"),
            QueryError::BadTcpReply(e) => write!(f, "bad TCP reply: {e:?}"),
        }
    }
}

/// Counts a lookup the cache answered: `hit` with records, `negative` without (NODATA,
/// NXDOMAIN, a remembered failure).
fn count_hit(answer: &Answer) {
    let result = match answer {
        Answer::Mx(_) | Answer::Addresses(_) | Answer::Txt(_) | Answer::Names(_) => "hit",
        _ => "negative",
    };
    metrics::with(|m| m.dns_lookups.add(result, 1));
}

impl Resolver {
    pub fn new(
        servers: Vec<SocketAddr>,
        timeout: Duration,
        attempts: usize,
        cache: Arc<DnsCache>,
        shard: u16,
    ) -> Resolver {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(shard) << 48)
            ^ u64::from(std::process::id());
        Resolver {
            servers,
            timeout,
            attempts: attempts.max(1),
            cache,
            inflight: RefCell::new(HashMap::new()),
            random: Cell::new(seed | 1),
        }
    }

    fn next_random(&self) -> u64 {
        // xorshift64*: unpredictable enough for ids and 0x20 bits together with fresh ports.
        let mut x = self.random.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.random.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// The shared cache this resolver reads and fills (for readers on other threads, such as
    /// mail authentication's evaluation on the blocking thread).
    pub fn shared_cache(&self) -> Arc<DnsCache> {
        self.cache.clone()
    }

    /// The answer for `name` and `rtype` if the cache has it (no query).
    pub fn cached(&self, name: &str, rtype: RecordType) -> Option<Arc<Answer>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let answer = self.cache.get(&name, rtype, Instant::now());
        if let Some(answer) = &answer {
            count_hit(answer);
        }
        answer
    }

    /// The answer for `name` and `rtype`, from the cache or the servers.
    pub async fn lookup(&self, name: &str, rtype: RecordType) -> Arc<Answer> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let key = (name.clone(), u16::from(rtype));
        loop {
            if let Some(answer) = self.cache.get(&name, rtype, Instant::now()) {
                count_hit(&answer);
                return answer;
            }
            if self.inflight.borrow().contains_key(&key) {
                Settled {
                    resolver: self,
                    key: key.clone(),
                }
                .await;
                continue;
            }
            self.inflight.borrow_mut().insert(key.clone(), Vec::new());
            let started = Instant::now();
            let parsed = self.query(&name, rtype).await;
            let took = started.elapsed().as_secs_f64();
            metrics::with(|m| {
                m.dns_lookups.add("miss", 1);
                m.dns_query.observe(took);
            });
            let answer = Arc::new(parsed.answer.clone());
            self.cache
                .insert(&name, rtype, parsed.answer, parsed.ttl_s, Instant::now());
            if let Some(waiters) = self.inflight.borrow_mut().remove(&key) {
                for waker in waiters {
                    waker.wake();
                }
            }
            return answer;
        }
    }

    async fn query(&self, name: &str, rtype: RecordType) -> Parsed {
        let mut last_failure = String::from("no DNS server configured");
        for _ in 0..self.attempts {
            for &server in &self.servers {
                let random = self.next_random();
                let id = random as u16;
                let qname = randomize_case(name, random >> 16);
                let Ok(query) = build_query(id, &qname, rtype) else {
                    // Not encodable as a DNS name: it cannot exist.
                    return Parsed {
                        answer: Answer::NxDomain,
                        ttl_s: 0,
                        truncated: false,
                    };
                };
                let result = match self.udp(server, &query, id, &qname, rtype).await {
                    Ok(p) if p.truncated => self.tcp(server, &query, id, &qname, rtype).await,
                    other => other,
                };
                match result {
                    Ok(Parsed {
                        answer: Answer::ServerFailure(why),
                        ..
                    }) => last_failure = format!("{server}: {why}"),
                    Ok(parsed) => return parsed,
                    Err(why) => last_failure = format!("{server}: {why}"),
                }
            }
        }
        Parsed {
            answer: Answer::ServerFailure(last_failure),
            ttl_s: 0,
            truncated: false,
        }
    }

    async fn udp(
        &self,
        server: SocketAddr,
        query: &[u8],
        id: u16,
        qname: &str,
        rtype: RecordType,
    ) -> Result<Parsed, QueryError> {
        let bind = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket = UdpSocket::bind(bind).map_err(QueryError::Socket)?;
        socket.send_to(query, server).await.map_err(QueryError::Send)?;
        let deadline = Instant::now() + self.timeout;
        let mut buf = vec![0u8; UDP_REPLY_BYTES_MAX];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QueryError::TimedOut);
            }
            let (n, from) = glommio::timer::timeout(left, async { socket.recv_from(&mut buf).await })
                .await
                .map_err(|_| QueryError::TimedOut)?;
            if from != server {
                continue; // Not from the server we asked: ignore.
            }
            if let Ok(parsed) = parse_response(&buf[..n], id, qname, rtype) {
                return Ok(parsed);
            }
            // A bogus or spoofed reply: keep waiting for the real one.
        }
    }

    async fn tcp(
        &self,
        server: SocketAddr,
        query: &[u8],
        id: u16,
        qname: &str,
        rtype: RecordType,
    ) -> Result<Parsed, QueryError> {
        let exchange = async {
            let mut stream = TcpStream::connect_timeout(server, self.timeout).await?;
            let mut framed = (query.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(query);
            stream.write_all(&framed).await?;
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await?;
            let len = usize::from(u16::from_be_bytes(len)).min(TCP_REPLY_BYTES_MAX);
            let mut reply = vec![0u8; len];
            stream.read_exact(&mut reply).await?;
            Ok(reply)
        };
        let reply = glommio::timer::timeout(self.timeout, exchange)
            .await
            .map_err(QueryError::Tcp)?;
        parse_response(&reply, id, qname, rtype).map_err(QueryError::BadTcpReply)
    }
}
