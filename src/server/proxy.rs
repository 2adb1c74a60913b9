//! The PROXY protocol, versions 1 (text) and 2 (binary), as HAProxy's proxy-protocol.txt
//! defines them: on a listener with `proxy_protocol = true`, a connection from one of the
//! listener's `proxy_from` networks begins with a header that names the real client, and that
//! address is the one relay policy, rate limits, logs and Received use. A connection from
//! anywhere else is closed unanswered (a client must not choose its own address).
//!
//! The header is read without reading past it: the bytes are peeked, and only the header's own
//! length is consumed, so what the client sends next stays in the socket for the SMTP session.
//! The header grammar is `ppp`'s (a well-kept parser of both versions); this module only
//! finds where the header ends and bounds the wait and the size.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;

/// A whole header must arrive within this after the connection is accepted.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest header accepted: v1 is at most 107 bytes; v2 is 16 bytes and its addresses
/// (at most 216, for AF_UNIX), plus TLVs, which load balancers keep short.
pub const HEADER_BYTES_MAX: usize = 1024;
/// A v1 header's longest form (the specification's 107 bytes, CRLF included).
const V1_BYTES_MAX: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: [u8; 12] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A];
const V2_FIXED_BYTES: usize = 16;

/// Why a connection's PROXY header was not accepted.
#[derive(Debug)]
pub enum ProxyError {
    /// The connection did not come from a `proxy_from` address.
    NotAllowed,
    /// The connection ended before the header did.
    Closed,
    TimedOut,
    TooLong(usize),
    /// Neither a v1 nor a v2 header, or one `ppp` refuses.
    Malformed(String),
    Io(std::io::Error),
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::NotAllowed => write!(f, "the connection is not from a proxy_from address"),
            ProxyError::Closed => write!(f, "the connection closed before the PROXY header ended"),
            ProxyError::TimedOut => write!(f, "no whole PROXY header within {HEADER_TIMEOUT:?}"),
            ProxyError::TooLong(n) => write!(f, "a PROXY header of {n} bytes is longer than {HEADER_BYTES_MAX}"),
            ProxyError::Malformed(why) => write!(f, "not a PROXY protocol header: {why}"),
            ProxyError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// The length of the header at the start of `bytes`, once `bytes` holds all of it; `None`
/// while more is needed. Refuses what cannot become a header.
pub fn header_len(bytes: &[u8]) -> Result<Option<usize>, ProxyError> {
    let signature = bytes.len().min(V2_SIGNATURE.len());
    if bytes[..signature] == V2_SIGNATURE[..signature] {
        if bytes.len() < V2_FIXED_BYTES {
            return Ok(None);
        }
        let total = V2_FIXED_BYTES + u16::from_be_bytes([bytes[14], bytes[15]]) as usize;
        return if total > HEADER_BYTES_MAX {
            Err(ProxyError::TooLong(total))
        } else {
            Ok(Some(total))
        };
    }
    let prefix = bytes.len().min(V1_PREFIX.len());
    if bytes[..prefix] != V1_PREFIX[..prefix] {
        return Err(ProxyError::Malformed(
            "it starts with neither \"PROXY \" nor the v2 signature".into(),
        ));
    }
    match memchr::memchr(b'\n', bytes) {
        Some(lf) if lf > 0 && bytes[lf - 1] == b'\r' && lf < V1_BYTES_MAX => Ok(Some(lf + 1)),
        Some(_) => Err(ProxyError::Malformed(
            "a v1 header must end with CRLF within 107 bytes".into(),
        )),
        None if bytes.len() >= V1_BYTES_MAX => Err(ProxyError::Malformed("no CRLF within 107 bytes".into())),
        None => Ok(None),
    }
}

/// The client a whole header names: `None` for a v2 LOCAL command (the proxy's own health
/// check) or a v1 UNKNOWN / v2 unspecified or AF_UNIX address, where the connection keeps the
/// proxy's address (as the specification says).
pub fn parse(header: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    if header.starts_with(&V2_SIGNATURE) {
        let parsed = ppp::v2::Header::try_from(header).map_err(|e| ProxyError::Malformed(format!("v2: {e}")))?;
        if parsed.command == ppp::v2::Command::Local {
            return Ok(None);
        }
        return Ok(match parsed.addresses {
            ppp::v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            ppp::v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            _ => None,
        });
    }
    let text = std::str::from_utf8(header).map_err(|_| ProxyError::Malformed("v1: not ASCII".into()))?;
    let parsed = ppp::v1::Header::try_from(text).map_err(|e| ProxyError::Malformed(format!("v1: {e}")))?;
    Ok(match parsed.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        ppp::v1::Addresses::Unknown => None,
    })
}

/// Reads the header from the start of `tcp`, consuming exactly its bytes, within
/// [`HEADER_TIMEOUT`]. Returns the client it names (see [`parse`]).
pub async fn read_header(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyError> {
    let deadline = Instant::now() + HEADER_TIMEOUT;
    let read = async {
        let mut header = [0u8; HEADER_BYTES_MAX];
        let mut have = 0;
        loop {
            // Peek at what has arrived (beyond what was already consumed), and consume only
            // what belongs to the header.
            let mut peeked = [0u8; HEADER_BYTES_MAX];
            let room = HEADER_BYTES_MAX - have;
            let n = tcp
                .peek(&mut peeked[..room])
                .await
                .map_err(|e| ProxyError::Io(e.into()))?;
            if n == 0 {
                return Err(ProxyError::Closed);
            }
            header[have..have + n].copy_from_slice(&peeked[..n]);
            let take = match header_len(&header[..have + n])? {
                Some(total) if total <= have + n => total - have,
                Some(_) | None if have + n == HEADER_BYTES_MAX => return Err(ProxyError::TooLong(have + n)),
                Some(_) | None => n,
            };
            tcp.read_exact(&mut header[have..have + take])
                .await
                .map_err(ProxyError::Io)?;
            have += take;
            if let Some(total) = header_len(&header[..have])? {
                if total == have {
                    return parse(&header[..have]);
                }
            }
        }
    };
    let timer = async {
        glommio::timer::sleep(deadline.saturating_duration_since(Instant::now())).await;
        Err(ProxyError::TimedOut)
    };
    futures_lite::future::or(read, timer).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[test]
    fn v1_headers_end_at_crlf_and_name_the_client() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO x\r\n";
        assert_eq!(header_len(&h[..10]).unwrap(), None);
        let len = header_len(h).unwrap().unwrap();
        assert_eq!(&h[len..], b"EHLO x\r\n");
        assert_eq!(parse(&h[..len]).unwrap(), Some("192.0.2.7:40000".parse().unwrap()));
        let h6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n";
        assert_eq!(parse(h6).unwrap(), Some("[2001:db8::7]:40000".parse().unwrap()));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap(), None);
    }

    #[test]
    fn v2_headers_are_measured_by_their_length_field() {
        let mut addresses = vec![192, 0, 2, 7, 198, 51, 100, 1];
        addresses.extend_from_slice(&40000u16.to_be_bytes());
        addresses.extend_from_slice(&25u16.to_be_bytes());
        let h = v2(1, 0x11, &addresses);
        assert_eq!(header_len(&h[..15]).unwrap(), None);
        assert_eq!(header_len(&h).unwrap(), Some(h.len()));
        assert_eq!(parse(&h).unwrap(), Some("192.0.2.7:40000".parse().unwrap()));
        // LOCAL: the proxy's own connection (a health check) keeps the proxy's address.
        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap(), None);
    }

    #[test]
    fn what_is_not_a_header_is_refused_with_a_reason() {
        assert!(matches!(header_len(b"EHLO x\r\n"), Err(ProxyError::Malformed(_))));
        assert!(matches!(
            header_len(b"PROXY TCP4 1.2.3.4\n"),
            Err(ProxyError::Malformed(_))
        ));
        assert!(matches!(
            header_len(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'x'].repeat(20)),
            Err(ProxyError::Malformed(_))
        ));
        let mut long = V2_SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(header_len(&long), Err(ProxyError::TooLong(65551))));
        assert!(matches!(
            parse(b"PROXY TCP4 999.0.0.1 1.2.3.4 1 2\r\n"),
            Err(ProxyError::Malformed(_))
        ));
    }
}
