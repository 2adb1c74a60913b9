//! HTTP/1.1 for the admin API, served by hyper on the admin thread's glommio executor: a small
//! adapter from glommio's TcpStream to hyper's I/O traits, the accept loop with its limits
//! (connections at once, a deadline per connection, the largest request), and the bearer
//! token check. hyper parses HTTP; nothing here does.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::Semaphore;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tracing::{debug, warn};

/// Bytes read from the socket per call into hyper's buffer.
const READ_CHUNK_BYTES: usize = 8 * 1024;

/// glommio's stream with hyper's I/O traits.
struct HyperStream(TcpStream);

impl hyper::rt::Read for HyperStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        // Read into initialized memory and copy: no unsafe, and admin traffic is small.
        let mut chunk = [0u8; READ_CHUNK_BYTES];
        let want = buf.remaining().min(READ_CHUNK_BYTES);
        let n = ready!(Pin::new(&mut self.0).poll_read(cx, &mut chunk[..want]))?;
        buf.put_slice(&chunk[..n]);
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for HyperStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

/// The admin listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub connections_max: usize,
    pub request_bytes_max: usize,
    pub connection_timeout: Duration,
}

/// A request as the routes see it: method, path, query and a body already read (bounded).
pub struct AdminRequest {
    pub method: hyper::Method,
    pub path: String,
    pub query: String,
    pub body: Bytes,
}

pub type AdminResponse = Response<Full<Bytes>>;

/// A response with a body and content type.
pub fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> AdminResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// `{"error": "..."}` with a status.
pub fn error(status: StatusCode, message: &str) -> AdminResponse {
    let body = serde_json::json!({ "error": message }).to_string();
    respond(status, "application/json", body)
}

/// Compares in time independent of where the strings differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request carries the bearer token (always true without a token).
fn authorized(req: &Request<Incoming>, token: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    given.is_some_and(|g| same_secret(g.trim().as_bytes(), token.as_bytes()))
}

/// Serves HTTP on `listener` until the task is dropped; each request goes to `route`.
pub async fn serve<R, F>(listener: TcpListener, limits: HttpLimits, token: Option<Rc<str>>, route: R)
where
    R: Fn(AdminRequest) -> F + Clone + 'static,
    F: Future<Output = AdminResponse> + 'static,
{
    let permits = Rc::new(Semaphore::new(limits.connections_max as u64));
    loop {
        let Ok(permit) = permits.acquire_static_permit(1).await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("admin: accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (route, token) = (route.clone(), token.clone());
        glommio::spawn_local(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let (route, token) = (route.clone(), token.clone());
                async move { Ok::<_, Infallible>(handle(req, limits, token.as_deref(), route).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.max_buf_size(limits.request_bytes_max.max(8192));
            let connection = builder.serve_connection(HyperStream(stream), service);
            match glommio::timer::timeout(limits.connection_timeout, async {
                connection
                    .await
                    .map_err(|e| glommio::GlommioError::IoError(io::Error::other(e)))
            })
            .await
            {
                Ok(()) => {}
                Err(e) => debug!("admin connection ended: {e}"),
            }
        })
        .detach();
    }
}

async fn handle<R, F>(req: Request<Incoming>, limits: HttpLimits, token: Option<&str>, route: R) -> AdminResponse
where
    R: Fn(AdminRequest) -> F,
    F: Future<Output = AdminResponse>,
{
    if !authorized(&req, token) {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is required (admin.token_file)",
        );
        response.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let body = match Limited::new(req.into_body(), limits.request_bytes_max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request is larger than admin.request_size_max",
            )
        }
    };
    route(AdminRequest {
        method,
        path,
        query,
        body,
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }
}
