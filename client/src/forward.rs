//! Carries one app request over the tunnel and returns the response.
//!
//! The path is straight: open a stream → send the request head → pump the
//! app's body up in its own task while waiting for the response head →
//! return a response whose body reads the stream's frames as they arrive.
//! A small body of known length skips the pump: it is read first and sent
//! with the head in one write.
//!
//! Cancellation needs no flags: the response body owns the stream's
//! receive half, so when the app goes away hyper drops the body, the
//! transport tells the relay (QUIC's STOP_SENDING, HTTP/2's RST_STREAM),
//! and the relay drops its upstream call.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use passage_shared::body::{FrameBody, encode_if_prompt, send_data};
use passage_shared::error_body::ApiError;
use passage_shared::frame::{
    Frame, FrameCodec, FrameError, RequestHead, ResponseHead, encode_frame, frame_reader,
    frame_writer, reset_code,
};
use passage_shared::http_map::{extend_from_wire, headers_to_wire};
use passage_shared::transport::{
    BoxRecv, BoxSend, StreamEnd, StreamFault, stream_fault, write_last,
};
use tokio::io::AsyncWriteExt;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{Instrument, debug};

use crate::tunnel::{OpenedStream, Tunnel, TunnelError};

/// The body of a response given to the app: a local error, or the stream's frames.
pub type ResponseBody = Either<Full<Bytes>, FrameBody<BoxRecv>>;

type Sender = FramedWrite<BoxSend, FrameCodec>;

/// Forwards `request` over the tunnel; every failure becomes an
/// OpenAI-shaped error response.
pub async fn forward(
    tunnel: &Tunnel,
    connect_wait: Duration,
    id: String,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    or_error_response(try_forward(tunnel, connect_wait, id, request).await)
}

/// The response, or the error as an OpenAI-shaped response.
pub(crate) fn or_error_response(
    result: Result<Response<ResponseBody>, ApiError>,
) -> Response<ResponseBody> {
    result.unwrap_or_else(|error| error.into_response::<Full<Bytes>>().map(Either::Left))
}

async fn try_forward(
    tunnel: &Tunnel,
    connect_wait: Duration,
    id: String,
    request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    // One budget for the whole wait on the tunnel, however many
    // connections the request tries: a request taken while a relay dies
    // unnoticed is answered within it plus the time to notice.
    let deadline = tokio::time::Instant::now() + connect_wait;
    let (parts, mut body) = request.into_parts();
    let path_and_query = origin_form_target(&parts.method, &parts.uri)?;
    let has_body = !body.is_end_stream();
    let head = RequestHead {
        id,
        method: parts.method.as_str().to_owned(),
        path_and_query,
        headers: headers_to_wire(&parts.headers),
        has_body,
    };
    let mut batch = BytesMut::new();
    encode_frame(&Frame::RequestHead(head), &mut batch).map_err(invalid_request)?;
    // A small request that is already here (the usual case) leaves whole
    // with its head in one write (one datagram when it fits); one that
    // trickles in is not waited for: what came goes now, the pump sends
    // the rest.
    let mut pump = has_body;
    if !has_body {
        encode_frame(&Frame::End, &mut batch).map_err(invalid_request)?;
    } else if let Some(whole) = encode_if_prompt(&mut body, &mut batch, |_| {}).await {
        whole.map_err(invalid_request)?;
        pump = false;
    }

    // A request held whole here can be sent again if the relay provably
    // never had it; one whose body streams from the app cannot.
    let mut body = pump.then_some(body);
    let mut avoid = None;
    let (head, frames) = loop {
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        let opened = tunnel
            .open_stream(wait, avoid)
            .await
            .map_err(tunnel_error)?;
        let connection_id = opened.connection_id;
        match exchange(opened, &batch, body.take()).await {
            Exchange::Answered(head, frames) => break (head, frames),
            Exchange::Failed(error) => return Err(error),
            Exchange::Unsent(why) if avoid.is_none() => {
                debug!(%why, "the relay never had the request; sending it on another connection");
                avoid = Some(connection_id);
            }
            Exchange::Unsent(why) => {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "tunnel_stream_failed",
                    format!("the request could not be delivered to a relay: {why}"),
                ));
            }
        }
    };
    response_for(head, Either::Right(FrameBody::new(frames)))
}

/// The app's response from the relay's head and `body`: 502 for a status
/// or headers that HTTP cannot carry.
pub(crate) fn response_for(
    head: ResponseHead,
    body: ResponseBody,
) -> Result<Response<ResponseBody>, ApiError> {
    let status = StatusCode::from_u16(head.status).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "invalid_upstream_response",
            format!(
                "the upstream answered with an invalid status {}",
                head.status
            ),
        )
    })?;
    let mut response = Response::new(body);
    *response.status_mut() = status;
    extend_from_wire(response.headers_mut(), head.headers).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "invalid_upstream_response",
            e.to_string(),
        )
    })?;
    Ok(response)
}

/// How one attempt to send a request over a stream went.
enum Exchange {
    /// The response head arrived; the frames carry the body.
    Answered(ResponseHead, FrameStream),
    /// The relay never had the request (the stream was refused unread, or
    /// the connection failed before the relay acknowledged it): safe to
    /// send again.
    Unsent(String),
    /// Anything else; the request may have reached the upstream.
    Failed(ApiError),
}

/// Whether the relay had a finished request, asked (through its sending
/// half's `stopped`) once the connection failed: it acknowledged all of
/// it, or stopped it (which it does only to a stream it read, unless
/// refusing it).
async fn relay_had(stopped: impl Future<Output = StreamEnd>) -> bool {
    // The connection is gone, so the answer is immediate; a transport that
    // cannot tell in time counts as "had it": never risk a duplicate.
    match tokio::time::timeout(Duration::from_millis(100), stopped).await {
        Ok(StreamEnd::Acknowledged) => true,
        Ok(StreamEnd::Stopped(code)) => code != REFUSED,
        Ok(StreamEnd::ConnectionLost) => false,
        Err(_) => true,
    }
}

/// [`reset_code::REFUSED`] as the transport reports stream codes.
const REFUSED: u64 = reset_code::REFUSED as u64;

/// The response frames of one stream.
type FrameStream = FramedRead<BoxRecv, FrameCodec>;

/// Sends the encoded request `batch` (then `body`, if it streams from the
/// app) on `opened` and waits for the response head.
async fn exchange(opened: OpenedStream, batch: &[u8], body: Option<Incoming>) -> Exchange {
    let OpenedStream { mut send, recv, .. } = opened;
    let replayable = body.is_none();
    // A request held whole ends with this write (over HTTP/2 in the same
    // frame); one whose body streams from the app goes on in the pump.
    let written = if replayable {
        write_last(&mut *send, batch).await
    } else {
        send.write_all(batch).await
    };
    if let Err(e) = written {
        return match stream_fault(&e) {
            StreamFault::ConnectionLost | StreamFault::Reset(REFUSED) if replayable => {
                Exchange::Unsent(e.to_string())
            }
            _ => Exchange::Failed(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "tunnel_stream_failed",
                format!("could not send the request to the relay: {e}"),
            )),
        };
    }
    let mut frames = frame_reader(recv);
    // A request held whole keeps its sending half: if the connection fails
    // before the answer, that half tells whether the relay acknowledged it.
    let held = match body {
        Some(body) => {
            tokio::spawn(pump_body(body, frame_writer(send)).in_current_span());
            None
        }
        None => Some(send),
    };
    let first = frames.next().await;
    let why = match first {
        Some(Ok(Frame::ResponseHead(head))) => return Exchange::Answered(head, frames),
        Some(Ok(frame)) => format!(
            "the relay sent a {} frame before the response head",
            frame.kind()
        ),
        Some(Err(FrameError::Io(e))) => {
            let unsent = match (stream_fault(&e), &held) {
                (StreamFault::Reset(REFUSED), Some(_)) => true,
                (StreamFault::ConnectionLost, Some(send)) => !relay_had(send.stopped()).await,
                _ => false,
            };
            if unsent {
                return Exchange::Unsent(e.to_string());
            }
            format!("the tunnel stream failed before the response head: {e}")
        }
        Some(Err(e)) => format!("the tunnel stream failed before the response head: {e}"),
        None => "the relay closed the stream without a response".to_owned(),
    };
    Exchange::Failed(ApiError::new(
        StatusCode::BAD_GATEWAY,
        "tunnel_stream_failed",
        why,
    ))
}

/// Streams the app's body up as frames; resets the stream if the app's
/// body fails, so the relay never forwards a truncated request as whole.
async fn pump_body(mut body: Incoming, mut sender: Sender) {
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if let Err(e) = send_data(&mut sender, data).await {
                    // The relay stopped reading: it answered early or the request was cancelled.
                    debug!(error = %e, "request body no longer wanted");
                    return;
                }
            }
            Some(Err(e)) => {
                debug!(error = %e, "the app's request body failed; resetting the stream");
                sender.get_mut().reset(reset_code::BODY_FAILED);
                return;
            }
            None => {
                if sender.send(Frame::End).await.is_ok() {
                    sender.get_mut().finish();
                }
                return;
            }
        }
    }
}

/// The path and query of an origin-form request target, the only form
/// that travels. An absolute-form target (`GET http://host/...`, what an
/// app sends to a proxy) names another server: refused, not quietly
/// redirected; authority-form (CONNECT) has nothing to forward.
pub(crate) fn origin_form_target(method: &Method, uri: &http::Uri) -> Result<String, ApiError> {
    let origin_form = uri.scheme().is_none() && uri.authority().is_none();
    match uri.path_and_query() {
        Some(pq) if origin_form && method != Method::CONNECT && pq.as_str().starts_with('/') => {
            Ok(pq.as_str().to_owned())
        }
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_target",
            "passage forwards only origin-form requests such as POST /v1/chat/completions",
        )),
    }
}

/// The app's request could not be read or encoded.
fn invalid_request(error: impl std::fmt::Display) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        format!("passage could not read the request: {error}"),
    )
}

/// The API error for a request the tunnel could not take.
pub(crate) fn tunnel_error(error: TunnelError) -> ApiError {
    let status = match error {
        TunnelError::Lost(_) => StatusCode::BAD_GATEWAY,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let code = match error {
        TunnelError::Unavailable { .. } => "tunnel_unavailable",
        TunnelError::StreamTimeout(_) => "tunnel_busy",
        TunnelError::Lost(_) => "tunnel_lost",
        TunnelError::Stopped => "client_shutting_down",
    };
    ApiError::new(status, code, format!("passage: {error}"))
}
