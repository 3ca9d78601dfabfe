//! One request on the relay: a QUIC stream in, an upstream call out.
//!
//! The path is straight: read the request head → build the upstream request
//! (its body streams from the stream's remaining frames) → send it → write
//! the response head → forward each upstream body chunk as one frame the
//! moment it arrives → `End` (or `Failure` if the upstream broke off). A
//! small response of known length goes out whole, head and body in one write.
//!
//! Cancellation is structural: the whole exchange runs in a `select!`
//! against the stream's `stopped()` signal, so when the client stops reading
//! (the app went away) the upstream call is dropped at once, which closes
//! the upstream connection and stops token spend.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use http::header::{CONTENT_LENGTH, HeaderValue};
use http_body_util::{BodyExt, Either, Empty};
use passage_shared::body::{FrameBody, INLINE_WAIT, encode_whole_body, is_inline, send_data};
use passage_shared::error_body::ApiError;
use passage_shared::frame::{
    Frame, FrameCodec, FrameError, RequestHead, ResponseHead, StreamFailure, encode_frame,
    frame_reader, frame_writer, reset_code,
};
use passage_shared::http_map::headers_to_wire;
use passage_shared::transport::{BoxRecv, BoxSend};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::upstream::UpstreamClient;
use passage_shared::error_chain;

/// What every stream handler needs; shared by all connections.
#[derive(Debug)]
pub struct StreamContext {
    /// The client for the configured upstream.
    pub upstream: UpstreamClient,
    /// Longest wait for the request head after a stream opens.
    pub head_timeout: Duration,
    /// Longest silence from the upstream (before the head or between chunks).
    pub idle_read_timeout: Duration,
}

type Responder = FramedWrite<BoxSend, FrameCodec>;

/// How a request ended, for the log line.
#[derive(Debug)]
enum Outcome {
    /// The response was delivered in full.
    Complete { status: u16, bytes: u64 },
    /// The upstream failed after the head was sent; the client got `Failure`.
    UpstreamBrokeOff {
        status: u16,
        bytes: u64,
        reason: String,
    },
    /// passage answered with its own error.
    Refused(ApiError),
    /// The client went away (app cancelled or tunnel lost).
    ClientGone { bytes: u64 },
}

/// Serves one request stream from a client named `client`.
pub async fn handle(send: BoxSend, recv: BoxRecv, ctx: Arc<StreamContext>, client: Arc<str>) {
    let stopped = send.stopped();
    let mut responder = frame_writer(send);
    let mut frames = frame_reader(recv);

    let head = match tokio::time::timeout(ctx.head_timeout, frames.next()).await {
        Ok(Some(Ok(Frame::RequestHead(head)))) => head,
        other => {
            let why = match other {
                Ok(Some(Ok(frame))) => {
                    format!("expected a request head, got a {} frame", frame.kind())
                }
                Ok(Some(Err(e))) => e.to_string(),
                Ok(None) => "stream closed before the request head".to_owned(),
                Err(_) => "no request head in time".to_owned(),
            };
            warn!(client = %client, reason = %why, "stream refused");
            responder.get_mut().reset(reset_code::PROTOCOL_ERROR);
            frames.get_mut().stop(reset_code::PROTOCOL_ERROR);
            return;
        }
    };

    // The head's fields go into log lines: check them before they do.
    if let Err(error) = check_head(&head) {
        warn!(client = %client, code = error.code, message = %error.message, "request refused");
        if send_api_error(&mut responder, error).await.is_ok() {
            responder.get_mut().finish();
        }
        return;
    }
    let path = head
        .path_and_query
        .split('?')
        .next()
        .unwrap_or("")
        .to_owned();
    let span =
        info_span!("request", id = %head.id, client = %client, method = %head.method, path = %path);
    async move {
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = proxy(head, frames, &mut responder, &ctx) => outcome,
            _ = stopped => Outcome::ClientGone { bytes: 0 },
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match outcome {
            Outcome::Complete { status, bytes } => {
                responder.get_mut().finish();
                info!(status, bytes, elapsed_ms, "request complete");
            }
            Outcome::UpstreamBrokeOff { status, bytes, reason } => {
                responder.get_mut().finish();
                warn!(status, bytes, elapsed_ms, %reason, "upstream broke off mid-response");
            }
            Outcome::Refused(error) => {
                let status = error.status.as_u16();
                match send_api_error(&mut responder, error.clone()).await {
                    Ok(()) => {
                        responder.get_mut().finish();
                    }
                    Err(e) => debug!(error = %e, "could not deliver the error response"),
                }
                warn!(status, code = error.code, message = %error.message, elapsed_ms, "request refused");
            }
            Outcome::ClientGone { bytes } => {
                responder.get_mut().reset(reset_code::CANCELLED);
                info!(bytes, elapsed_ms, "client went away; upstream call dropped");
            }
        }
    }
    .instrument(span)
    .await
}

/// Longest request id a client may send (it generates 16 hex digits).
const MAX_ID_LEN: usize = 32;
/// Longest request target accepted; API paths are far shorter.
const MAX_TARGET_LEN: usize = 8 * 1024;

/// Checks the fields of a request head that end up in logs: a short plain
/// id, a valid method token, and a target with no control characters.
fn check_head(head: &RequestHead) -> Result<(), ApiError> {
    let refuse = |code, message: &str| Err(ApiError::new(StatusCode::BAD_REQUEST, code, message));
    if head.id.is_empty()
        || head.id.len() > MAX_ID_LEN
        || !head
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return refuse(
            "invalid_request_id",
            "the request id must be 1 to 32 letters, digits or '-'",
        );
    }
    if head.method.len() > 32 || http::Method::from_bytes(head.method.as_bytes()).is_err() {
        return refuse("invalid_method", "invalid HTTP method");
    }
    if head.path_and_query.len() > MAX_TARGET_LEN
        || head
            .path_and_query
            .parse::<http::uri::PathAndQuery>()
            .is_err()
    {
        return refuse(
            "invalid_request_target",
            "the request target is not a valid path",
        );
    }
    Ok(())
}

/// The request's straight path; returns how it ended.
async fn proxy(
    head: RequestHead,
    frames: FramedRead<BoxRecv, FrameCodec>,
    responder: &mut Responder,
    ctx: &StreamContext,
) -> Outcome {
    let body = if head.has_body {
        Either::Right(FrameBody::new(frames))
    } else {
        // Dropping `frames` here is fine: a bodiless request sends only
        // `End` after its head, and the client does not wait on it.
        Either::Left(Empty::<Bytes>::new())
    };
    let (request, key) = match ctx.upstream.request(head, body) {
        Ok(request) => request,
        Err(error) => return Outcome::Refused(error),
    };
    let response =
        match tokio::time::timeout(ctx.idle_read_timeout, ctx.upstream.send(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Outcome::Refused(error),
            Err(_) => {
                return Outcome::Refused(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "the upstream sent no response within {} s",
                        ctx.idle_read_timeout.as_secs()
                    ),
                ));
            }
        };

    let (parts, mut body) = response.into_parts();
    ctx.upstream.report(key, parts.status, &parts.headers);
    let status = parts.status.as_u16();
    let head = Frame::ResponseHead(ResponseHead {
        status,
        headers: headers_to_wire(&parts.headers),
    });
    let mut batch = BytesMut::new();
    if let Err(e) = encode_frame(&head, &mut batch) {
        return Outcome::Refused(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "invalid_upstream_response",
            format!("the upstream response head cannot be forwarded: {e}"),
        ));
    }
    if is_inline(&body) {
        // A small sized answer (a whole chat completion) that is already
        // arriving goes out whole with its head, in one write (one datagram
        // when it fits). One that takes longer is not held back: what came
        // so far leaves now and the rest streams below.
        let bytes = http_body::Body::size_hint(&body).exact().unwrap_or(0);
        match tokio::time::timeout(INLINE_WAIT, encode_whole_body(&mut body, &mut batch)).await {
            Ok(Ok(())) => {
                return match responder.get_mut().write_all(&batch).await {
                    Ok(()) => Outcome::Complete { status, bytes },
                    Err(_) => Outcome::ClientGone { bytes: 0 },
                };
            }
            Ok(Err(e)) => {
                // As on the streaming path: the upstream's head and what
                // arrived, then a response cut short.
                if responder.get_mut().write_all(&batch).await.is_err() {
                    return Outcome::ClientGone { bytes: 0 };
                }
                return fail(
                    responder,
                    status,
                    0,
                    "upstream_body_failed",
                    error_chain(&e),
                )
                .await;
            }
            Err(_) => {}
        }
    }
    if responder.get_mut().write_all(&batch).await.is_err() {
        return Outcome::ClientGone { bytes: 0 };
    }

    let mut bytes = 0u64;
    loop {
        let next = match tokio::time::timeout(ctx.idle_read_timeout, body.frame()).await {
            Ok(next) => next,
            Err(_) => {
                let reason = format!("upstream silent for {} s", ctx.idle_read_timeout.as_secs());
                return fail(responder, status, bytes, "upstream_timeout", reason).await;
            }
        };
        match next {
            Some(Ok(frame)) => {
                // Trailers have no place in the OpenAI API; they are dropped.
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                bytes += data.len() as u64;
                if send_data(responder, data).await.is_err() {
                    return Outcome::ClientGone { bytes };
                }
            }
            Some(Err(e)) => {
                let reason = error_chain(&e);
                return fail(responder, status, bytes, "upstream_body_failed", reason).await;
            }
            None => {
                if responder.send(Frame::End).await.is_err() {
                    return Outcome::ClientGone { bytes };
                }
                return Outcome::Complete { status, bytes };
            }
        }
    }
}

/// Tells the client the response is incomplete, so it never mistakes a
/// truncated body for a whole one.
async fn fail(
    responder: &mut Responder,
    status: u16,
    bytes: u64,
    code: &str,
    reason: String,
) -> Outcome {
    let failure = Frame::Failure(StreamFailure {
        code: code.to_owned(),
        message: reason.clone(),
    });
    if responder.send(failure).await.is_err() {
        return Outcome::ClientGone { bytes };
    }
    Outcome::UpstreamBrokeOff {
        status,
        bytes,
        reason,
    }
}

/// Sends a passage error as a complete response on the stream.
async fn send_api_error(responder: &mut Responder, error: ApiError) -> Result<(), FrameError> {
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
