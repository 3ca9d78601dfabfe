//! An in-process stand-in for the OpenAI API: a hyper server on 127.0.0.1
//! with just enough endpoints to exercise the tunnel, and a record of what
//! it saw (requests, cancellations) for tests to assert on.
//!
//! Routes:
//! - `POST /v1/chat/completions`: a chat completion, or with `"stream": true`
//!   an SSE stream of [`SSE_CHUNKS`] chunks spaced [`SSE_INTERVAL`] apart;
//! - `POST /v1/files`: digests the upload (streamed, never buffered) and
//!   answers with an OpenAI file object;
//! - `GET /v1/endless[?interval_ms=M]`: an SSE stream that only ends when
//!   the reader goes away, which it records as a cancellation;
//! - `GET /v1/stamped?chunks=N&interval_ms=M`: SSE events carrying their
//!   send time (`sent_ns`, Unix nanoseconds) for latency measurements;
//! - `GET /v1/slow-head`: answers only after 30 s, recording a cancellation
//!   if the caller gives up first (a long non-streaming generation);
//! - `GET /v1/broken`: starts an SSE stream, then fails mid-way;
//! - `GET /v1/broken-sized`: announces a small sized body, then fails;
//! - `GET /download?bytes=N`: N bytes of [`pattern_bytes`];
//! - `POST /sink`: counts the body's bytes (no digest: cheap enough not to
//!   be the bottleneck of an upload benchmark);
//! - `GET [/v1]/status/CODE`: an error response with `retry-after: 7`;
//! - `GET /v1/keyed`: 429 (`retry-after: 60`) when the Authorization holds
//!   "limited", else 200 naming the Authorization it got;
//! - `GET /v1/open-cors`: 200 with CORS headers that allow every origin and
//!   `vary: accept-encoding` (what a public API may send);
//! - `GET /v1/realtime`: a WebSocket session ([`crate::mock_realtime`]);
//! - anything else: echoes method, target, headers and a body digest as JSON.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Notify;

mod answers;
mod streams;
mod transfers;

use answers::{echo, key_is_rejected, keyed, many_headers, rejected_key, status};
pub use streams::unix_nanos;
use streams::{broken, broken_sized, chat, endless, query_u64, slow_head, stamped};
use transfers::{download, sink, upload};

/// Chunks in a streamed chat completion.
pub const SSE_CHUNKS: usize = 10;
/// Spacing of streamed chunks at the upstream.
pub const SSE_INTERVAL: Duration = Duration::from_millis(50);

/// The body of every mock response.
pub type MockBody = BoxBody<Bytes, std::io::Error>;

/// What the mock upstream observed.
#[derive(Debug, Default)]
pub struct MockRecord {
    /// Requests received, of any kind.
    pub requests: AtomicUsize,
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Headers of the most recent request.
    pub last_headers: Mutex<Option<http::HeaderMap>>,
    /// Endless streams whose reader went away, with when it happened.
    pub cancellations: Mutex<Vec<Instant>>,
    /// Signalled on every cancellation.
    pub cancelled: Notify,
    /// Bytes of `/download` bodies handed to the connection so far (what
    /// flow control let the upstream write).
    pub downloaded: AtomicU64,
    /// WebSocket sessions opened on `/v1/realtime`.
    pub ws_sessions: AtomicUsize,
    /// How each ended WebSocket session closed, in order.
    pub ws_closes: Mutex<Vec<crate::mock_realtime::SessionClose>>,
    /// Signalled whenever a WebSocket session ends.
    pub ws_closed: Notify,
}

/// A running mock upstream; stops when dropped.
pub struct MockUpstream {
    /// Its address.
    pub addr: SocketAddr,
    /// What it saw.
    pub record: Arc<MockRecord>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockUpstream {
    /// Starts the mock on an ephemeral 127.0.0.1 port.
    pub async fn start() -> std::io::Result<MockUpstream> {
        Self::start_on("127.0.0.1:0".parse().expect("literal address")).await
    }

    /// Starts the mock on `addr`.
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<MockUpstream> {
        Self::start_on_with_stream_limit(addr, 10_000).await
    }

    /// Starts the mock on an ephemeral port allowing `streams` concurrent
    /// streams per HTTP/2 connection, as real servers limit them.
    pub async fn start_with_stream_limit(streams: u32) -> std::io::Result<MockUpstream> {
        Self::start_on_with_stream_limit("127.0.0.1:0".parse().expect("literal address"), streams)
            .await
    }

    /// Starts the mock on `addr`, allowing `streams` concurrent streams per
    /// HTTP/2 connection.
    pub async fn start_on_with_stream_limit(
        addr: SocketAddr,
        streams: u32,
    ) -> std::io::Result<MockUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let record = Arc::new(MockRecord::default());
        let task_record = record.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let record = task_record.clone();
                record.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |request| route(request, record.clone()));
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder.http2().max_concurrent_streams(streams);
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(MockUpstream { addr, record, task })
    }

    /// The base URL to configure as the relay's upstream.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Upstream calls the reader gave up on so far.
    pub fn cancellation_count(&self) -> usize {
        self.record.cancellations.lock().map_or(0, |c| c.len())
    }

    /// Requests received so far.
    pub fn request_count(&self) -> usize {
        self.record.requests.load(Ordering::SeqCst)
    }
}

/// Deterministic bytes for download checks: byte `i` of any download.
pub fn pattern_bytes(offset: u64, len: usize) -> Vec<u8> {
    (offset..offset + len as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn route(
    request: Request<Incoming>,
    record: Arc<MockRecord>,
) -> Result<Response<MockBody>, Infallible> {
    record.requests.fetch_add(1, Ordering::SeqCst);
    *record.last_headers.lock().expect("lock") = Some(request.headers().clone());
    let path = request.uri().path().to_owned();
    let response = match (request.method().as_str(), path.as_str()) {
        ("POST", "/v1/chat/completions") => chat(request).await,
        ("POST", "/v1/files") => upload(request).await,
        ("GET", "/v1/endless") => {
            let interval =
                query_u64(&request, "interval_ms").map_or(SSE_INTERVAL, Duration::from_millis);
            endless(record, interval)
        }
        ("GET", "/v1/stamped") => stamped(&request),
        (_, "/v1/slow-head") => slow_head(record).await,
        ("GET", "/v1/broken") => broken(),
        ("GET", "/v1/broken-sized") => broken_sized(),
        ("GET", "/download") => download(&request, record.clone()),
        ("GET", "/v1/keyed") => keyed(&request),
        ("GET", "/v1/models") if key_is_rejected(&request) => rejected_key(),
        ("GET", "/v1/open-cors") => open_cors(),
        ("GET", "/v1/realtime") => crate::mock_realtime::realtime(request, record.clone()),
        ("GET", "/v1/many-headers") => many_headers(query_u64(&request, "n").unwrap_or(300)),
        ("POST", "/sink") => sink(request).await,
        (_, p) if p.starts_with("/status/") || p.starts_with("/v1/status/") => status(p),
        _ => echo(request).await,
    };
    Ok(response)
}

pub(super) fn json(status: StatusCode, value: serde_json::Value) -> Response<MockBody> {
    let mut response = Response::new(full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// An answer whose CORS headers let any origin read it.
pub(super) fn open_cors() -> Response<MockBody> {
    let mut response = json(StatusCode::OK, serde_json::json!({"open": true}));
    let headers = response.headers_mut();
    for (name, value) in [
        ("access-control-allow-origin", "*"),
        ("access-control-allow-credentials", "true"),
        ("vary", "accept-encoding"),
    ] {
        headers.insert(name, header::HeaderValue::from_static(value));
    }
    response
}

/// A 400 naming what went wrong reading the request.
pub(super) fn bad_request(error: &dyn std::fmt::Display) -> Response<MockBody> {
    json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({"error": error.to_string()}),
    )
}

pub(super) fn full(bytes: Bytes) -> MockBody {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed()
}

pub(super) fn sse(body: MockBody) -> Response<MockBody> {
    let mut response = Response::new(body);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    response
}

/// Reads a whole body, returning its length and SHA-256 (hex) without keeping it.
pub(super) async fn digest_body(
    mut body: Incoming,
) -> Result<(u64, String, Vec<u8>), hyper::Error> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut head = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            len += data.len() as u64;
            if head.len() < 64 * 1024 {
                head.extend_from_slice(&data[..data.len().min(64 * 1024 - head.len())]);
            }
            hasher.update(&data);
        }
    }
    Ok((len, hex(&hasher.finalize()), head))
}
