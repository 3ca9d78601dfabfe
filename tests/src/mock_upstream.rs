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
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::Notify;

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

fn hex(bytes: &[u8]) -> String {
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

fn json(status: StatusCode, value: serde_json::Value) -> Response<MockBody> {
    let mut response = Response::new(full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

/// An answer whose CORS headers let any origin read it.
fn open_cors() -> Response<MockBody> {
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
fn bad_request(error: &dyn std::fmt::Display) -> Response<MockBody> {
    json(
        StatusCode::BAD_REQUEST,
        serde_json::json!({"error": error.to_string()}),
    )
}

fn full(bytes: Bytes) -> MockBody {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed()
}

fn sse(body: MockBody) -> Response<MockBody> {
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
async fn digest_body(mut body: Incoming) -> Result<(u64, String, Vec<u8>), hyper::Error> {
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

fn chunk_json(index: usize, content: &str, finish: Option<&str>) -> String {
    serde_json::json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "mock-model",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}],
        "sequence": index,
    })
    .to_string()
}

async fn chat(request: Request<Incoming>) -> Response<MockBody> {
    let Ok((_, _, body)) = digest_body(request.into_body()).await else {
        return json(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "body"}),
        );
    };
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if parsed["model"] == "mock-error" {
        return json(
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({"error": {"message": "the mock fails this model", "type": "server_error"}}),
        );
    }
    if parsed["stream"].as_bool() == Some(true) {
        // With include_usage, the real API sends one more chunk: no
        // choices, the usage of the whole stream.
        let usage = (parsed["stream_options"]["include_usage"].as_bool() == Some(true)).then(|| {
            serde_json::json!({
                "id": "chatcmpl-mock",
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": {"prompt_tokens": 7, "completion_tokens": SSE_CHUNKS, "total_tokens": 7 + SSE_CHUNKS},
            })
            .to_string()
        });
        let stream = futures_util::stream::unfold(0usize, move |index| {
            let usage = usage.clone();
            async move {
                if index > SSE_CHUNKS {
                    return None;
                }
                if index > 0 {
                    tokio::time::sleep(SSE_INTERVAL).await;
                }
                let event = if index == SSE_CHUNKS {
                    match usage {
                        Some(usage) => format!("data: {usage}\n\ndata: [DONE]\n\n"),
                        None => "data: [DONE]\n\n".to_owned(),
                    }
                } else {
                    let finish = (index == SSE_CHUNKS - 1).then_some("stop");
                    format!(
                        "data: {}\n\n",
                        chunk_json(index, &format!("tok{index} "), finish)
                    )
                };
                Some((
                    Ok::<_, std::io::Error>(Frame::data(Bytes::from(event))),
                    index + 1,
                ))
            }
        });
        return sse(BodyExt::boxed(StreamBody::new(stream)));
    }
    json(
        StatusCode::OK,
        serde_json::json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 0,
            "model": parsed["model"].as_str().unwrap_or("mock-model"),
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the mock upstream"},
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
        }),
    )
}

async fn upload(request: Request<Incoming>) -> Response<MockBody> {
    let boundary = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("boundary=").nth(1))
        .map(|b| b.trim_matches('"').to_owned());
    let (len, sha256, filename) = match boundary {
        // An SDK upload: digest the `file` part, as the real API stores it.
        Some(boundary) => match request.into_body().collect().await {
            Ok(body) => match multipart_file(&body.to_bytes(), &boundary) {
                Some((filename, content)) => (content.len() as u64, sha256_hex(content), filename),
                None => {
                    return json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({"error": "no file part"}),
                    );
                }
            },
            Err(e) => {
                return bad_request(&e);
            }
        },
        // A raw upload: digest it as it streams, never holding it.
        None => match digest_body(request.into_body()).await {
            Ok((len, sha256, _)) => (len, sha256, "upload".to_owned()),
            Err(e) => {
                return bad_request(&e);
            }
        },
    };
    json(
        StatusCode::OK,
        serde_json::json!({
            "id": "file-mock",
            "object": "file",
            "bytes": len,
            "created_at": 0,
            "filename": filename,
            "purpose": "assistants",
            "status": "processed",
            "sha256": sha256,
        }),
    )
}

/// The filename and content of the part named `file` in a multipart body.
fn multipart_file<'a>(body: &'a [u8], boundary: &str) -> Option<(String, &'a [u8])> {
    let delimiter = format!("--{boundary}");
    let mut rest = body;
    while let Some(start) = find(rest, delimiter.as_bytes()) {
        rest = &rest[start + delimiter.len()..];
        let headers_end = find(rest, b"\r\n\r\n")?;
        let headers = String::from_utf8_lossy(&rest[..headers_end]).into_owned();
        let content = &rest[headers_end + 4..];
        let content_end = find(content, format!("\r\n{delimiter}").as_bytes())?;
        if headers.contains("name=\"file\"") {
            let filename = headers
                .split("filename=\"")
                .nth(1)
                .and_then(|f| f.split('"').next())
                .unwrap_or("upload")
                .to_owned();
            return Some((filename, &content[..content_end]));
        }
        rest = &content[content_end..];
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Marks the stream as cancelled when hyper drops it (the reader went away).
struct CancelGuard(Arc<MockRecord>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0
            .cancellations
            .lock()
            .expect("lock")
            .push(Instant::now());
        self.0.cancelled.notify_waiters();
    }
}

fn endless(record: Arc<MockRecord>, interval: Duration) -> Response<MockBody> {
    let guard = CancelGuard(record);
    let stream = futures_util::stream::unfold((0usize, guard), move |(index, guard)| async move {
        if index > 0 {
            tokio::time::sleep(interval).await;
        }
        let event = format!("data: {}\n\n", chunk_json(index, "x", None));
        Some((
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(event))),
            (index + 1, guard),
        ))
    });
    sse(BodyExt::boxed(StreamBody::new(stream)))
}

async fn slow_head(record: Arc<MockRecord>) -> Response<MockBody> {
    let guard = CancelGuard(record);
    tokio::time::sleep(Duration::from_secs(30)).await;
    std::mem::forget(guard);
    json(StatusCode::OK, serde_json::json!({"slow": true}))
}

/// The value of query parameter `name`, if it is a number.
fn query_u64(request: &Request<Incoming>, name: &str) -> Option<u64> {
    request
        .uri()
        .query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.parse().ok())
}

/// Wall-clock time in nanoseconds since the Unix epoch.
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// SSE events stamped with their send time, for latency measurements:
/// `chunks` events `interval_ms` apart, each `data: {"seq":N,"sent_ns":T}`.
fn stamped(request: &Request<Incoming>) -> Response<MockBody> {
    let chunks = query_u64(request, "chunks").unwrap_or(SSE_CHUNKS as u64);
    let interval = Duration::from_millis(query_u64(request, "interval_ms").unwrap_or(10));
    let stream = futures_util::stream::unfold(0u64, move |seq| async move {
        if seq >= chunks {
            return None;
        }
        if seq > 0 {
            tokio::time::sleep(interval).await;
        }
        let event = format!("data: {{\"seq\":{seq},\"sent_ns\":{}}}\n\n", unix_nanos());
        Some((
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(event))),
            seq + 1,
        ))
    });
    sse(BodyExt::boxed(StreamBody::new(stream)))
}

/// A small response that announces 1000 bytes and dies after 10.
fn broken_sized() -> Response<MockBody> {
    let stream = futures_util::stream::iter(0..2).then(|index| async move {
        if index == 0 {
            Ok(Frame::data(Bytes::from_static(b"{\"partial\"")))
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err(std::io::Error::other("mock upstream died"))
        }
    });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response.headers_mut().insert(
        header::CONTENT_LENGTH,
        header::HeaderValue::from_static("1000"),
    );
    response
        .headers_mut()
        .insert("x-upstream", header::HeaderValue::from_static("kept"));
    response
}

fn broken() -> Response<MockBody> {
    let stream = futures_util::stream::iter(0..3).then(|index| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if index < 2 {
            Ok(Frame::data(Bytes::from(format!(
                "data: {}\n\n",
                chunk_json(index, "y", None)
            ))))
        } else {
            Err(std::io::Error::other("mock upstream died"))
        }
    });
    sse(BodyExt::boxed(StreamBody::new(stream)))
}

use futures_util::StreamExt as _;

/// Streams `len` pattern bytes in 64 KiB chunks.
struct PatternStream {
    offset: u64,
    len: u64,
    record: Arc<MockRecord>,
}

impl futures_util::Stream for PatternStream {
    type Item = Result<Frame<Bytes>, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.offset >= self.len {
            return Poll::Ready(None);
        }
        let n = (self.len - self.offset).min(64 * 1024) as usize;
        let chunk = pattern_bytes(self.offset, n);
        self.offset += n as u64;
        self.record
            .downloaded
            .fetch_add(n as u64, Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }
}

fn download(request: &Request<Incoming>, record: Arc<MockRecord>) -> Response<MockBody> {
    let len = query_u64(request, "bytes").unwrap_or(0);
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(PatternStream {
        offset: 0,
        len,
        record,
    })));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    response
}

async fn sink(request: Request<Incoming>) -> Response<MockBody> {
    let mut body = request.into_body();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => len += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => {
                return bad_request(&e);
            }
        }
    }
    json(StatusCode::OK, serde_json::json!({"bytes": len}))
}

/// Whether the request's key is one this mock refuses: any whose
/// Authorization contains `rejected`, as the API refuses a revoked key.
fn key_is_rejected(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("rejected"))
}

/// The API's answer to a key it does not know.
fn rejected_key() -> Response<MockBody> {
    json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({"error": {
            "message": "Incorrect API key provided: sk-rejected-0000. You can find your API key at https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "code": "invalid_api_key"
        }}),
    )
}

fn keyed(request: &Request<Incoming>) -> Response<MockBody> {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if authorization.contains("limited") {
        let mut response = json(
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({"error": {"message": "rate limited", "type": "requests"}}),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
        return response;
    }
    json(
        StatusCode::OK,
        serde_json::json!({"authorization": authorization}),
    )
}

/// A small answer with `n` extra header lines.
fn many_headers(n: u64) -> Response<MockBody> {
    let mut response = json(StatusCode::OK, serde_json::json!({"headers": n}));
    for i in 0..n {
        let name = header::HeaderName::try_from(format!("x-extra-{i}")).expect("valid name");
        response
            .headers_mut()
            .insert(name, header::HeaderValue::from_static("1"));
    }
    response
}

fn status(path: &str) -> Response<MockBody> {
    let code = path
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .parse::<u16>()
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::IM_A_TEAPOT);
    let mut response = json(
        code,
        serde_json::json!({"error": {"message": format!("mock {}", code.as_u16()), "type": "mock_error", "code": "mock"}}),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("7"));
    response
        .headers_mut()
        .insert("x-request-id", header::HeaderValue::from_static("req-mock"));
    response
}

async fn echo(request: Request<Incoming>) -> Response<MockBody> {
    let (parts, body) = request.into_parts();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let (len, sha256) = match digest_body(body).await {
        Ok((len, sha256, _)) => (len, sha256),
        Err(e) => {
            return bad_request(&e);
        }
    };
    json(
        StatusCode::OK,
        serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_len": len,
            "body_sha256": sha256,
        }),
    )
}
