//! The gateway's HTTP listeners, on hyper: `http.listen` serves `/metrics`
//! and `/healthz` to the operator's monitoring; `http.public_listen` serves
//! WebFinger to anyone. Only `GET` (and `HEAD`) of a few paths; request
//! bodies are never read.
//!
//! Bounds, whoever connects: [`MAX_CONNECTIONS`] at once and
//! [`MAX_PER_CLIENT`] from one address (IPv6: one /64; a /48 four times
//! that, see `latssiam::limits`), closed before a byte is read beyond that; request head within [`HEADER_TIMEOUT`] and at most
//! [`MAX_HEAD`] octets (hyper's limit; `431` beyond it); one request per
//! connection and the whole exchange within [`EXCHANGE_TIMEOUT`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Most connections at once, per listener.
pub const MAX_CONNECTIONS: usize = 256;
/// Most connections at once from one client address.
pub const MAX_PER_CLIENT: usize = 16;
/// Time for the request head to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a whole exchange, the request head to the end of the answer.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest request head, octets.
pub const MAX_HEAD: usize = 16 * 1024;

/// An answer: status, content type, body, and extra header fields.
pub struct Answer {
    /// The status.
    pub status: StatusCode,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Bytes,
    /// Further header fields.
    pub headers: Vec<(&'static str, &'static str)>,
}

impl Answer {
    /// A plain-text answer.
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self { status, content_type: "text/plain; charset=utf-8", body: Bytes::from(body.into()), headers: Vec::new() }
    }
}

/// What a listener serves: the answer to a `GET` of `path` with `query`.
pub trait Handler: Send + Sync + 'static {
    /// The answer.
    fn get(&self, path: &str, query: Option<&str>) -> impl Future<Output = Answer> + Send;
}

fn response(answer: Answer, head: bool) -> Response<Full<Bytes>> {
    let len = answer.body.len();
    let body = if head { Bytes::new() } else { answer.body };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = answer.status;
    let h = r.headers_mut();
    h.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(answer.content_type));
    h.insert(hyper::header::CONTENT_LENGTH, hyper::header::HeaderValue::from(len));
    h.insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
    for (name, value) in answer.headers {
        h.insert(name, hyper::header::HeaderValue::from_static(value));
    }
    r
}

async fn answer<H: Handler>(handler: &H, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let head = request.method() == Method::HEAD;
    if request.method() != Method::GET && !head {
        let mut r = response(Answer::text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n"), false);
        r.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    response(handler.get(request.uri().path(), request.uri().query()).await, head)
}

/// Serves `handler` on `listener` until `shutdown`, then lets exchanges in
/// flight finish (within [`EXCHANGE_TIMEOUT`]).
pub async fn serve<H: Handler>(
    listener: TcpListener,
    handler: Arc<H>,
    name: &'static str,
    requests_per_minute: u32,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let clients = Arc::new(latssiam::limits::PerClient::default());
    let requests = Arc::new(latssiam::limits::Lookups::new(requests_per_minute));
    let refusals = latssiam::limits::LogThrottle::default();
    let tracker = TaskTracker::new();
    loop {
        let (tcp, peer): (_, SocketAddr) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    warn!(listener = name, error = %e, "HTTP accept failed; backing off.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            if let Some(more) = refusals.admit() {
                info!(listener = name, %peer, also_refused = more, "Too many HTTP connections; closed.");
            }
            continue;
        };
        let Some(slot) = clients.admit(peer.ip(), MAX_PER_CLIENT) else {
            if let Some(more) = refusals.admit() {
                info!(listener = name, %peer, also_refused = more, "Too many HTTP connections from this address or its site; closed.");
            }
            continue;
        };
        let (handler, requests) = (Arc::clone(&handler), Arc::clone(&requests));
        tracker.spawn(async move {
            let _held = (permit, slot);
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let handler = Arc::clone(&handler);
                let allowed = requests.allow(peer.ip());
                async move {
                    if !allowed {
                        let mut slow = Answer::text(StatusCode::TOO_MANY_REQUESTS, "too many requests; slow down\n");
                        slow.headers.push(("retry-after", "60"));
                        return Ok::<_, Infallible>(response(slow, false));
                    }
                    Ok::<_, Infallible>(answer(&*handler, &request).await)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .keep_alive(false)
                .serve_connection(TokioIo::new(tcp), service);
            match tokio::time::timeout(EXCHANGE_TIMEOUT, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(listener = name, %peer, error = %e, "HTTP connection ended with an error."),
                Err(_) => debug!(listener = name, %peer, "HTTP exchange timed out; closed."),
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(EXCHANGE_TIMEOUT, tracker.wait()).await;
}
