//! One outbound SMTP connection (the I/O half of `gannet_smtp::client`): connect, greeting,
//! EHLO (falling back to HELO), STARTTLS as the route's policy says (RFC 3207), AUTH PLAIN to
//! smarthosts that need it (RFC 4954, only over TLS), and reading whole replies within their
//! deadline.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;
use tracing::{info, warn};

use super::ipcap::IpSlot;
use crate::config::Config;
use crate::metrics;
use gannet_metrics::Slot;
use gannet_sched::Job;
use gannet_smtp::client::{Capabilities, ReplyError, ReplyParser, ServerReply, Transaction};

/// Read buffer for replies.
const REPLY_BUFFER_BYTES: usize = 8 * 1024;

/// The connection's byte stream: plain TCP, or TLS after STARTTLS.
type Transport = crate::transport::Transport<futures_rustls::client::TlsStream<TcpStream>>;

/// How to treat STARTTLS on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Use it when offered; plaintext otherwise, or when the handshake fails.
    Opportunistic,
    /// Never send plaintext: no STARTTLS or a failed handshake defers the mail.
    Required,
    /// Do not use it.
    Off,
}

/// Why an outbound connection or exchange failed. Its text is the diagnostic that deferrals,
/// failure notices and the log carry.
#[derive(Debug)]
pub enum LinkError {
    Connect {
        addr: SocketAddr,
        source: glommio::GlommioError<()>,
    },
    Greeting {
        addr: SocketAddr,
        reply: String,
    },
    HelloRefused {
        addr: SocketAddr,
        reply: String,
    },
    NoStartTls {
        addr: SocketAddr,
    },
    StartTlsRefused {
        addr: SocketAddr,
        reply: String,
    },
    /// Bytes after the 220 to STARTTLS (they could be injected into the encrypted session).
    DataAfterStartTls {
        addr: SocketAddr,
    },
    Handshake {
        addr: SocketAddr,
        source: glommio::GlommioError<()>,
    },
    NoTlsForAuth {
        addr: SocketAddr,
    },
    NoAuthPlain {
        addr: SocketAddr,
    },
    AuthRefused {
        addr: SocketAddr,
        reply: String,
    },
    Write(std::io::Error),
    Read(std::io::Error),
    BadReply(ReplyError),
    /// No complete reply within the deadline.
    Timeout(Duration),
    Closed,
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Connect { addr, source } => write!(f, "connect to {addr}: {source}"),
            LinkError::Greeting { addr, reply } => write!(f, "{addr} greeted with {reply}"),
            LinkError::HelloRefused { addr, reply } => write!(f, "{addr} refused EHLO and HELO: {reply}"),
            LinkError::NoStartTls { addr } => write!(f, "{addr} does not offer STARTTLS, which this route requires"),
            LinkError::StartTlsRefused { addr, reply } => write!(f, "{addr} refused STARTTLS: {reply}"),
            LinkError::DataAfterStartTls { addr } => write!(f, "{addr} sent data after its 220 to STARTTLS"),
            LinkError::Handshake { addr, source } => write!(f, "TLS handshake with {addr} failed: {source}"),
            LinkError::NoTlsForAuth { addr } => write!(f, "refusing to send credentials to {addr} without TLS"),
            LinkError::NoAuthPlain { addr } => write!(f, "{addr} does not offer AUTH PLAIN"),
            LinkError::AuthRefused { addr, reply } => write!(f, "{addr} refused our credentials: {reply}"),
            LinkError::Write(e) => write!(f, "write failed: {e}"),
            LinkError::Read(e) => write!(f, "read failed: {e}"),
            LinkError::BadReply(e) => write!(f, "bad reply from server: {e:?}"),
            LinkError::Timeout(t) => write!(f, "no complete reply within {t:?}"),
            LinkError::Closed => write!(f, "connection closed by the server"),
        }
    }
}

impl std::error::Error for LinkError {}

/// Why a connection could not be opened.
enum OpenError {
    /// TLS was attempted and failed; a plaintext retry may follow if policy allows.
    Tls(LinkError),
    Other(LinkError),
}

/// One outbound SMTP connection with its read buffer and the server's capabilities.
pub struct OutboundConnection {
    stream: Transport,
    /// The address connected to.
    pub peer: SocketAddr,
    buf: Vec<u8>,
    /// Commands and content to send, reused across messages.
    pub out: Vec<u8>,
    start: usize,
    end: usize,
    parser: ReplyParser,
    pub caps: Capabilities,
    pub needs_reset: bool,
    pub messages: usize,
    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384" once encrypted.
    pub tls: Option<String>,
    /// The next job, whose MAIL/RCPT/DATA went out right behind the previous message's content
    /// (RFC 2920 3.1), and its transaction, waiting for those replies.
    pub ahead: Option<(Job, Transaction)>,
    /// This connection's place under the per-address cap, given back when it closes.
    _slot: Rc<IpSlot>,
    /// Where `gannet_outbound_connections_active` counts this connection, once it is counted.
    metrics_slot: Option<Slot>,
}

impl Drop for OutboundConnection {
    fn drop(&mut self) {
        if let Some(slot) = self.metrics_slot.take() {
            metrics::with(|m| m.destinations.closed(slot));
        }
    }
}

impl OutboundConnection {
    /// Counts this connection as open to `destination` (a site's metrics label) until dropped.
    pub fn count_as_open(&mut self, destination: &str) {
        debug_assert!(self.metrics_slot.is_none());
        metrics::with(|m| self.metrics_slot = Some(m.destinations.opened(destination)));
    }

    /// Connects, reads the greeting, says EHLO (falling back to HELO), and does STARTTLS as
    /// `policy` says. An opportunistic handshake that fails is retried once in plaintext.
    pub async fn open(
        slot: IpSlot,
        addr: SocketAddr,
        config: &Config,
        policy: TlsPolicy,
        auth: Option<(&str, &str)>,
    ) -> Result<OutboundConnection, LinkError> {
        let slot = Rc::new(slot);
        match OutboundConnection::open_once(slot.clone(), addr, config, policy, auth).await {
            Ok(c) => Ok(c),
            Err(OpenError::Tls(why)) if policy == TlsPolicy::Opportunistic => {
                warn!(destination = %addr, "{why}; delivering without TLS (opportunistic)");
                OutboundConnection::open_once(slot, addr, config, TlsPolicy::Off, None)
                    .await
                    .map_err(|e| match e {
                        OpenError::Tls(w) | OpenError::Other(w) => w,
                    })
            }
            Err(OpenError::Tls(why) | OpenError::Other(why)) => Err(why),
        }
    }

    async fn open_once(
        slot: Rc<IpSlot>,
        addr: SocketAddr,
        config: &Config,
        policy: TlsPolicy,
        auth: Option<(&str, &str)>,
    ) -> Result<OutboundConnection, OpenError> {
        let d = &config.delivery;
        let stream = TcpStream::connect_timeout(addr, d.connect_timeout.0)
            .await
            .map_err(|source| OpenError::Other(LinkError::Connect { addr, source }))?;
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(d.reply_timeout.0));
        let mut conn = OutboundConnection {
            stream: Transport::Plain(stream),
            peer: addr,
            buf: vec![0; REPLY_BUFFER_BYTES],
            out: Vec::new(),
            start: 0,
            end: 0,
            parser: ReplyParser::default(),
            caps: Capabilities::default(),
            needs_reset: false,
            messages: 0,
            ahead: None,
            tls: None,
            _slot: slot,
            metrics_slot: None,
        };
        let greeting = conn.read_reply(d.reply_timeout.0).await.map_err(OpenError::Other)?;
        if greeting.code != 220 {
            return Err(OpenError::Other(LinkError::Greeting {
                addr,
                reply: greeting.text(),
            }));
        }
        conn.hello(config).await.map_err(OpenError::Other)?;
        match (policy, conn.caps.starttls) {
            (TlsPolicy::Off, _) | (TlsPolicy::Opportunistic, false) => return Ok(conn),
            (TlsPolicy::Required, false) => {
                return Err(OpenError::Other(LinkError::NoStartTls { addr }));
            }
            (_, true) => {}
        }
        let reply = conn
            .command(b"STARTTLS\r\n", d.reply_timeout.0)
            .await
            .map_err(OpenError::Other)?;
        if reply.code != 220 {
            return Err(OpenError::Tls(LinkError::StartTlsRefused {
                addr,
                reply: reply.text(),
            }));
        }
        // Mirror of the CVE-2011-0411 rule: nothing may follow the 220 in plaintext.
        if conn.start != conn.end {
            return Err(OpenError::Tls(LinkError::DataAfterStartTls { addr }));
        }
        let Transport::Plain(tcp) = std::mem::replace(&mut conn.stream, Transport::Closed) else {
            unreachable!("STARTTLS on a plain connection");
        };
        let connector = futures_rustls::TlsConnector::from(super::tls::opportunistic_client_config());
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let handshake = async { connector.connect(name, tcp).await.map_err(glommio::GlommioError::from) };
        let tls = glommio::timer::timeout(d.reply_timeout.0, handshake).await;
        let tls = match tls {
            Ok(tls) => tls,
            Err(e) => {
                let result = match e {
                    glommio::GlommioError::TimedOut(_) => "timeout",
                    _ => "failed",
                };
                metrics::with(|m| m.tls_handshakes.add(("outbound", "none", result), 1));
                return Err(OpenError::Tls(LinkError::Handshake { addr, source: e }));
            }
        };
        let session = tls.get_ref().1;
        let version = metrics::tls_version_label(&crate::server::tls::summarize(session).version);
        metrics::with(|m| m.tls_handshakes.add(("outbound", version, "ok"), 1));
        conn.tls = Some(format!(
            "{:?} {:?}",
            session
                .protocol_version()
                .map_or(rustls::ProtocolVersion::Unknown(0), |v| v),
            session.negotiated_cipher_suite().map(|c| c.suite())
        ));
        conn.stream = Transport::Tls(Box::new(tls));
        // RFC 3207: forget what the server said before TLS and ask again.
        conn.hello(config).await.map_err(OpenError::Tls)?;
        info!(destination = %addr, tls = %conn.tls.as_deref().unwrap_or(""), "STARTTLS");
        if let Some((user, password)) = auth {
            conn.authenticate(user, password, d.reply_timeout.0)
                .await
                .map_err(OpenError::Other)?;
        }
        Ok(conn)
    }

    /// AUTH PLAIN (RFC 4954, RFC 4616), only ever on an encrypted connection.
    async fn authenticate(&mut self, user: &str, password: &str, timeout: Duration) -> Result<(), LinkError> {
        use base64::Engine;
        if self.tls.is_none() {
            return Err(LinkError::NoTlsForAuth { addr: self.peer });
        }
        if !self.caps.auth_plain {
            return Err(LinkError::NoAuthPlain { addr: self.peer });
        }
        let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        let reply = self
            .command(format!("AUTH PLAIN {token}\r\n").as_bytes(), timeout)
            .await?;
        if reply.code != 235 {
            return Err(LinkError::AuthRefused {
                addr: self.peer,
                reply: reply.text(),
            });
        }
        Ok(())
    }

    /// EHLO, or HELO if EHLO is refused; records the server's capabilities.
    async fn hello(&mut self, config: &Config) -> Result<(), LinkError> {
        let timeout = config.delivery.reply_timeout.0;
        let ehlo = format!("EHLO {}\r\n", config.helo_name());
        let reply = self.command(ehlo.as_bytes(), timeout).await?;
        if reply.is_positive() {
            self.caps = Capabilities::from_ehlo_lines(reply.lines.iter().map(String::as_str));
            return Ok(());
        }
        let helo = format!("HELO {}\r\n", config.helo_name());
        let reply = self.command(helo.as_bytes(), timeout).await?;
        if !reply.is_positive() {
            return Err(LinkError::HelloRefused {
                addr: self.peer,
                reply: reply.text(),
            });
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.stream.write_all(bytes).await.map_err(LinkError::Write)
    }

    pub async fn command(&mut self, line: &[u8], timeout: Duration) -> Result<ServerReply, LinkError> {
        self.send(line).await?;
        self.read_reply(timeout).await
    }

    /// Reads one whole reply, which must arrive within `timeout` however the server spreads
    /// its bytes (a deadline, not a per-read timeout that each byte would re-arm).
    pub async fn read_reply(&mut self, timeout: Duration) -> Result<ServerReply, LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            let (reply, used) = self
                .parser
                .parse(&self.buf[self.start..self.end])
                .map_err(LinkError::BadReply)?;
            self.start += used;
            if let Some(reply) = reply {
                metrics::with(|m| m.count_outbound_reply(reply.code, reply.lines.first().map_or("", String::as_str)));
                return Ok(reply);
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::Timeout(timeout));
            }
            let (stream, free) = (&mut self.stream, &mut self.buf[self.end..]);
            let read = async { Some(stream.read(free).await) };
            let timer = async {
                glommio::timer::sleep(left).await;
                None
            };
            let n = match futures_lite::future::or(read, timer).await {
                Some(result) => result.map_err(LinkError::Read)?,
                None => return Err(LinkError::Timeout(timeout)),
            };
            if n == 0 {
                return Err(LinkError::Closed);
            }
            self.end += n;
        }
    }

    pub async fn quit(&mut self) {
        let _ = self.command(b"QUIT\r\n", Duration::from_secs(5)).await;
    }
}
