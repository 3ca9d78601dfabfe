//! The upstream call and its answer: send the request, check and forward
//! the response head, then the body, whole with its head when it is small
//! and already here, else frame by frame as it arrives; `End`, or
//! `Failure` when the upstream broke off.

use bytes::{Bytes, BytesMut};
use futures_util::SinkExt;
use http::StatusCode;
use http::header::{CONTENT_LENGTH, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use passage_shared::body::{encode_if_prompt, send_data};
use passage_shared::error_body::ApiError;
use passage_shared::error_chain;
use passage_shared::frame::{
    Frame, FrameError, Header, RequestHead, ResponseHead, StreamFailure, encode_frame,
};
use passage_shared::http_map::{MAX_HEADERS, headers_to_wire};
use passage_shared::transport::write_last;
use tokio::io::AsyncWriteExt;

use crate::answer_cache::{CACHE_HEADER, CacheFill};
use crate::request_body::BodyRefusal;
use crate::upstream::UpstreamBody;
use crate::usage::UsageTap;

use super::{Outcome, Request, RequestRecord, Responder, StreamContext};

/// The request's straight path; returns how it ended.
pub(super) async fn proxy(req: &mut Request<'_>, head: RequestHead, body: UpstreamBody) -> Outcome {
    let (response, key) = match send_upstream(req, head, body).await {
        Ok(sent) => sent,
        Err(error) => return Outcome::Refused(error),
    };
    let (parts, mut body) = response.into_parts();
    req.ctx.upstream.report(key, parts.status, &parts.headers);
    let mut batch = match encode_head(req.record, &parts) {
        Ok(batch) => batch,
        Err(error) => return Outcome::Refused(error),
    };
    if let Some(outcome) = send_inline(req, &mut body, &mut batch).await {
        return outcome;
    }
    req.record.ttfb = Some(req.started.elapsed());
    if req.responder.get_mut().write_all(&batch).await.is_err() {
        return Outcome::ClientGone;
    }
    stream_body(req, body).await
}

/// Sends the request upstream and waits (up to the idle timeout) for the
/// response head; returns it with the key it went out with.
async fn send_upstream(
    req: &mut Request<'_>,
    head: RequestHead,
    body: UpstreamBody,
) -> Result<(http::Response<Incoming>, Option<usize>), ApiError> {
    let ctx = req.ctx;
    let (request, key) = ctx.upstream.request(head, body)?;
    match tokio::time::timeout(ctx.idle_read_timeout, ctx.upstream.send(request)).await {
        Ok(Ok((response, slot))) => {
            req.record.upstream_slot = Some(slot);
            Ok((response, key))
        }
        // The body may have refused itself (too large, a second model),
        // which aborted the request.
        Ok(Err(error)) => Err(req
            .record
            .body_refusal
            .refusal()
            .map_or(error, BodyRefusal::api_error)),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_timeout",
            format!(
                "the upstream sent no response within {} s",
                ctx.idle_read_timeout.as_secs()
            ),
        )),
    }
}

/// Checks the upstream's response head and encodes it for the app (marked
/// a cache miss where the request used the cache); sets up the usage tap
/// and, for a 200 cache miss, the cache fill.
fn encode_head(
    record: &mut RequestRecord,
    parts: &http::response::Parts,
) -> Result<BytesMut, ApiError> {
    if parts.headers.len() > MAX_HEADERS {
        // HTTP/1.1 heads stop at hyper's limit (fewer lines); HTTP/2
        // heads are bounded by size only.
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "invalid_upstream_response",
            format!(
                "the upstream's response head is larger than passage forwards (at most {MAX_HEADERS} header lines)"
            ),
        ));
    }
    let status = parts.status.as_u16();
    record.tap = Some(UsageTap::for_response(
        parts.status,
        parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    ));
    let mut headers = headers_to_wire(&parts.headers);
    if let Some(pending) = record.cache_plan.take() {
        headers.push(Header {
            name: CACHE_HEADER.into(),
            value: Bytes::from_static(b"miss"),
        });
        if status == 200 {
            record.cache_fill = Some(CacheFill::new(
                pending.key,
                pending.ttl,
                pending.max_entry,
                &headers,
            ));
        }
    }
    let head = Frame::ResponseHead(ResponseHead { status, headers });
    let mut batch = BytesMut::new();
    if let Err(e) = encode_frame(&head, &mut batch) {
        return Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "invalid_upstream_response",
            format!("the upstream response head cannot be forwarded: {e}"),
        ));
    }
    record.status = status;
    Ok(batch)
}

/// A small sized answer (a whole chat completion) that is already
/// arriving goes out whole with its head, in one write (one datagram when
/// it fits). One that takes longer is not held back: `None`, and what came
/// so far is in `batch`, to leave now while the rest streams.
async fn send_inline(
    req: &mut Request<'_>,
    body: &mut Incoming,
    batch: &mut BytesMut,
) -> Option<Outcome> {
    let record = &mut *req.record;
    let mut bytes = 0u64;
    let (tap, fill) = (&mut record.tap, &mut record.cache_fill);
    let whole = encode_if_prompt(body, batch, |data| {
        bytes += data.len() as u64;
        if let Some(tap) = tap {
            tap.observe(data);
        }
        if let Some(fill) = fill {
            fill.observe(data);
        }
    });
    match whole.await {
        Some(Ok(())) => {
            record.ttfb = Some(req.started.elapsed());
            record.bytes_out = bytes;
            // Counted (and kept, if cached) before the app has its
            // answer, so its next request already meets both.
            record.charge().await;
            keep_answer(record, req.ctx).await;
            // The whole answer, and the end of the stream with it (over
            // HTTP/2 in one frame).
            Some(
                match write_last(&mut **req.responder.get_mut(), batch).await {
                    Ok(()) => Outcome::Complete,
                    Err(_) => Outcome::ClientGone,
                },
            )
        }
        Some(Err(e)) => {
            // As on the streaming path: the upstream's head and what
            // arrived, then a response cut short.
            record.ttfb = Some(req.started.elapsed());
            if req.responder.get_mut().write_all(batch).await.is_err() {
                return Some(Outcome::ClientGone);
            }
            record.bytes_out = bytes;
            let reason = error_chain(&e);
            Some(fail(req.responder, record, "upstream_body_failed", reason).await)
        }
        None => {
            // What arrived so far (if anything) is in `batch` and goes out next.
            record.bytes_out = bytes;
            None
        }
    }
}

/// Forwards the rest of the upstream body, each chunk as one frame the
/// moment it arrives, then `End`.
async fn stream_body(req: &mut Request<'_>, mut body: Incoming) -> Outcome {
    let (ctx, responder, record) = (req.ctx, &mut *req.responder, &mut *req.record);
    loop {
        let next = match tokio::time::timeout(ctx.idle_read_timeout, body.frame()).await {
            Ok(next) => next,
            Err(_) => {
                let reason = format!("upstream silent for {} s", ctx.idle_read_timeout.as_secs());
                return fail(responder, record, "upstream_timeout", reason).await;
            }
        };
        match next {
            Some(Ok(frame)) => {
                // Trailers have no place in the OpenAI API; they are dropped.
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                record.bytes_out += data.len() as u64;
                if let Some(tap) = &mut record.tap {
                    tap.observe(&data);
                }
                if let Some(fill) = &mut record.cache_fill {
                    fill.observe(&data);
                }
                if send_data(responder, data).await.is_err() {
                    return Outcome::ClientGone;
                }
            }
            Some(Err(e)) => {
                let reason = error_chain(&e);
                return fail(responder, record, "upstream_body_failed", reason).await;
            }
            None => {
                record.charge().await;
                keep_answer(record, ctx).await;
                if responder.send(Frame::End).await.is_err() {
                    return Outcome::ClientGone;
                }
                return Outcome::Complete;
            }
        }
    }
}

/// Keeps a cache miss's whole answer, now that it has arrived, before its
/// end goes to the app: the app's next identical request is a hit.
async fn keep_answer(record: &mut RequestRecord, ctx: &StreamContext) {
    if let Some(fill) = record.cache_fill.take() {
        let key = fill.key;
        if let Some(answer) = fill.finish() {
            ctx.state.cache_put(key, answer).await;
        }
    }
}

/// Tells the client the response is incomplete, so it never mistakes a
/// truncated body for a whole one.
async fn fail(
    responder: &mut Responder,
    record: &mut RequestRecord,
    code: &str,
    reason: String,
) -> Outcome {
    record.charge().await;
    let failure = Frame::Failure(StreamFailure {
        code: code.to_owned(),
        message: reason.clone(),
    });
    if responder.send(failure).await.is_err() {
        return Outcome::ClientGone;
    }
    Outcome::UpstreamBrokeOff { reason }
}

/// Sends a passage error as a complete response on the stream.
pub(super) async fn send_api_error(
    responder: &mut Responder,
    error: ApiError,
) -> Result<(), FrameError> {
    let response: http::Response<Bytes> = error.into_response();
    let (mut parts, body) = response.into_parts();
    parts
        .headers
        .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    responder
        .send(Frame::ResponseHead(ResponseHead {
            status: parts.status.as_u16(),
            headers: headers_to_wire(&parts.headers),
        }))
        .await?;
    responder.send(Frame::Data(body)).await?;
    responder.send(Frame::End).await
}
