//! A connection's byte stream, plain TCP or TLS over it, for both directions: the inbound
//! session (rustls server side after STARTTLS or on an smtps listener) and outbound delivery
//! (rustls client side after STARTTLS).

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

/// A TLS stream over a glommio TCP stream, whichever side of the handshake.
pub trait TlsOverTcp: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
}

impl TlsOverTcp for futures_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl TlsOverTcp for futures_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

pub enum Transport<T> {
    Plain(TcpStream),
    Tls(Box<T>),
    /// Only while a handshake holds the socket, or after it failed.
    Closed,
}

impl<T: TlsOverTcp> Transport<T> {
    /// The TCP stream underneath, for timeouts and addresses.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Transport::Plain(s) => Some(s),
            Transport::Tls(t) => Some(t.tcp()),
            Transport::Closed => None,
        }
    }

    pub async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Transport::Plain(s) => s.read(buf).await,
            Transport::Tls(t) => t.read(buf).await,
            Transport::Closed => Ok(0),
        }
    }

    /// Writes everything; through TLS, also flushes the records to the socket.
    pub async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Transport::Plain(s) => s.write_all(bytes).await,
            Transport::Tls(t) => {
                t.write_all(bytes).await?;
                t.flush().await
            }
            Transport::Closed => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// Takes the plain TCP stream out for a handshake, leaving `Closed`.
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(self, Transport::Closed) {
            Transport::Plain(s) => Some(s),
            other => {
                *self = other;
                None
            }
        }
    }
}
