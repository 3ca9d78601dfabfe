//! The mock's chat completions and its SSE streams: endless, stamped, slow
//! to answer, and broken part-way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

use super::{MockBody, MockRecord, SSE_CHUNKS, SSE_INTERVAL, digest_body, json, sse};

pub(super) fn chunk_json(index: usize, content: &str, finish: Option<&str>) -> String {
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

pub(super) async fn chat(request: Request<Incoming>) -> Response<MockBody> {
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

/// Marks the stream as cancelled when hyper drops it (the reader went away).
pub(super) struct CancelGuard(Arc<MockRecord>);

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

pub(super) fn endless(record: Arc<MockRecord>, interval: Duration) -> Response<MockBody> {
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

pub(super) async fn slow_head(record: Arc<MockRecord>) -> Response<MockBody> {
    let guard = CancelGuard(record);
    tokio::time::sleep(Duration::from_secs(30)).await;
    std::mem::forget(guard);
    json(StatusCode::OK, serde_json::json!({"slow": true}))
}

/// The value of query parameter `name`, if it is a number.
pub(super) fn query_u64(request: &Request<Incoming>, name: &str) -> Option<u64> {
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
pub(super) fn stamped(request: &Request<Incoming>) -> Response<MockBody> {
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
pub(super) fn broken_sized() -> Response<MockBody> {
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

pub(super) fn broken() -> Response<MockBody> {
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
