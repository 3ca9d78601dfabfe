//! The relay's end of a WebSocket session: opens the upstream WebSocket
//! with the relay's key over a connection of its own, answers the client
//! with the `101` head, then bridges messages (see
//! [`passage_shared::websocket`]). A refused upgrade goes back as the
//! ordinary response it is.

use bytes::Bytes;
use futures_util::SinkExt;
use http::StatusCode;
use http_body_util::{BodyExt, Either, Empty, Limited};
use hyper_util::rt::TokioIo;
use passage_shared::error_body::ApiError;
use passage_shared::frame::{Frame, FrameCodec, Header, RequestHead, ResponseHead, WsClose};
use passage_shared::http_map::headers_to_wire;
use passage_shared::transport::BoxRecv;
use passage_shared::websocket::{self, SessionEnd, UPGRADE_HEADER};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::codec::FramedRead;
use tracing::{debug, info};

use super::{Outcome, RequestRecord, Responder, StreamContext};
use crate::policy::Applied;
use crate::usage::{Usage, session_event_usage};

/// Largest body of a refused upgrade that is passed on (an error JSON).
const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// Whether `head` asks for a WebSocket session.
pub fn is_session(head: &RequestHead) -> bool {
    head.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case(UPGRADE_HEADER)
            && h.value
                .eq_ignore_ascii_case(websocket::UPGRADE_WEBSOCKET.as_bytes())
    })
}

/// Opens the upstream WebSocket for `head` and carries the session until
/// either side closes it.
///
/// Under model rules, the model must be named in `?model=` and allowed,
/// and every `session.update` or `response.create` the app sends that
/// names a model is checked too: a refused one closes the session with
/// 1008. Usage from `response.done` / `response.completed` events adds up
/// into the request's record.
pub(crate) async fn session(
    head: RequestHead,
    frames: FramedRead<BoxRecv, FrameCodec>,
    responder: &mut Responder,
    ctx: &StreamContext,
    session: Session<'_>,
) -> Outcome {
    let Session {
        client,
        applied,
        record,
        started,
    } = session;
    record.model = query_model(&head.path_and_query);
    if applied.restricts_models()
        && let Err(mut error) = applied.check_model(client, record.model.as_deref())
    {
        if record.model.is_none() {
            error.message = format!("{}; name the model in ?model=", error.message);
        }
        return Outcome::Refused(error);
    }
    let (response, key) = match send_upgrade(head, ctx).await {
        Ok(sent) => sent,
        Err(error) => return Outcome::Refused(error),
    };
    record.status = response.status().as_u16();
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return refused(response, responder, record).await;
    }
    let accepted = response
        .headers()
        .get("sec-websocket-accept")
        .is_some_and(|v| v.as_bytes() == derive_accept_key(key.as_bytes()).as_bytes());
    if !accepted {
        record.status = 0;
        return Outcome::Refused(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "invalid_upstream_response",
            "the upstream answered the WebSocket upgrade without a valid Sec-WebSocket-Accept",
        ));
    }
    let mut head_headers = headers_to_wire(response.headers());
    head_headers.retain(|h| !websocket::is_handshake_header(&h.name));
    let head = ResponseHead {
        status: StatusCode::SWITCHING_PROTOCOLS.as_u16(),
        headers: head_headers,
    };
    if responder.send(Frame::ResponseHead(head)).await.is_err() {
        return Outcome::ClientGone;
    }
    // The session's "first byte" is its `101` head.
    record.ttfb = Some(started.elapsed());
    let upgraded = match hyper::upgrade::on(response).await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            return Outcome::UpstreamBrokeOff {
                reason: format!("the upstream connection was not handed over: {e}"),
            };
        }
    };
    let session = Session {
        client,
        applied,
        record,
        started,
    };
    carry(upgraded, frames, responder, ctx, session).await
}

/// Sends the upgrade request for `head` over a connection of its own and
/// waits for the upstream's answer; returns it with the handshake key sent.
async fn send_upgrade(
    mut head: RequestHead,
    ctx: &StreamContext,
) -> Result<(http::Response<hyper::body::Incoming>, String), ApiError> {
    head.headers.retain(|h| {
        !h.name.eq_ignore_ascii_case(UPGRADE_HEADER) && !websocket::is_handshake_header(&h.name)
    });
    let key = generate_key();
    for (name, value) in [
        ("connection", "upgrade".to_owned()),
        ("upgrade", "websocket".to_owned()),
        ("sec-websocket-version", "13".to_owned()),
        ("sec-websocket-key", key.clone()),
    ] {
        head.headers.push(Header {
            name: name.to_owned(),
            value: Bytes::from(value),
        });
    }
    let (mut request, key_index) = ctx.upstream.request(head, Either::Left(Empty::new()))?;
    // The wire mapping drops hop-by-hop headers; the handshake needs two.
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    let response =
        match tokio::time::timeout(ctx.idle_read_timeout, ctx.upstream.send_upgrade(request)).await
        {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    format!(
                        "the upstream did not answer the WebSocket upgrade within {} s",
                        ctx.idle_read_timeout.as_secs()
                    ),
                ));
            }
        };
    ctx.upstream
        .report(key_index, response.status(), response.headers());
    Ok((response, key))
}

/// Carries the open session's messages both ways until either side ends
/// it, checking the models the app asks for and adding up the usage.
async fn carry(
    upgraded: hyper::upgrade::Upgraded,
    frames: FramedRead<BoxRecv, FrameCodec>,
    responder: &mut Responder,
    ctx: &StreamContext,
    session: Session<'_>,
) -> Outcome {
    let Session {
        client,
        applied,
        record,
        ..
    } = session;
    let limits = ctx.ws_limits;
    let ws = WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Client,
        Some(websocket::config(limits.max_message)),
    )
    .await;
    info!("websocket session open");
    let mut usage: Option<Usage> = None;
    let mut bytes_out = 0u64;
    let mut from_upstream = |_binary: bool, message: &[u8]| {
        bytes_out += message.len() as u64;
        if let Some(found) = session_event_usage(message) {
            *usage.get_or_insert_default() += found;
        }
        Ok(())
    };
    let bytes_in = record.bytes_in.clone();
    let restricted = applied.restricts_models();
    let mut from_app = |binary: bool, message: &[u8]| {
        bytes_in.fetch_add(message.len() as u64, std::sync::atomic::Ordering::Relaxed);
        match requested_model(binary, message) {
            Some(model) if restricted => {
                applied
                    .check_model(client, Some(&model))
                    .map_err(|error| WsClose {
                        code: Some(websocket::CLOSE_POLICY),
                        reason: error.message,
                    })
            }
            _ => Ok(()),
        }
    };
    let end = websocket::bridge(
        ws,
        frames,
        &mut *responder,
        limits,
        &mut from_upstream,
        &mut from_app,
        ctx.ws_closing.cancelled(),
    )
    .await;
    debug!(?end, "websocket session ended");
    record.bytes_out = bytes_out;
    if let Some(usage) = usage {
        record.usage = Some(usage);
    }
    match end {
        SessionEnd::WebSocketClosed(_) | SessionEnd::TunnelClosed(_) | SessionEnd::TooBig(_) => {
            Outcome::Complete
        }
        SessionEnd::WebSocketFailed(reason) => Outcome::UpstreamBrokeOff { reason },
        SessionEnd::TunnelFailed(_) => Outcome::ClientGone,
        SessionEnd::Refused(close) => Outcome::Closed(close.reason),
    }
}

/// Who asked for a session, under which rules, and its record.
pub(crate) struct Session<'a> {
    /// The client's name.
    pub client: &'a str,
    /// Its rules.
    pub applied: &'a Applied,
    /// What the usage line will say.
    pub record: &'a mut RequestRecord,
    /// When the request's stream opened.
    pub started: std::time::Instant,
}

/// The `model` query parameter, if any.
fn query_model(path_and_query: &str) -> Option<String> {
    let (_, query) = path_and_query.split_once('?')?;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("model="))
        .map(str::to_owned)
}

/// The model a text message from the app names: in the session of a
/// `session.update`, in the response of a `response.create`, or at the top.
/// Other messages cost a substring search, not a parse.
fn requested_model(binary: bool, message: &[u8]) -> Option<String> {
    if binary || memchr::memmem::find(message, b"\"model\"").is_none() {
        return None;
    }
    let event: serde_json::Value = serde_json::from_slice(message).ok()?;
    let model = match event["type"].as_str() {
        Some("session.update") => &event["session"]["model"],
        Some("response.create") => &event["response"]["model"],
        _ => &event["model"],
    };
    model.as_str().map(str::to_owned)
}

/// Passes a refused upgrade (an error, a redirect) on as the response it is.
async fn refused(
    response: http::Response<hyper::body::Incoming>,
    responder: &mut Responder,
    record: &mut RequestRecord,
) -> Outcome {
    let (parts, body) = response.into_parts();
    let body = match Limited::new(body, MAX_REFUSAL_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return Outcome::UpstreamBrokeOff {
                reason: format!("the upstream's refusal could not be read: {e}"),
            };
        }
    };
    let head = ResponseHead {
        status: parts.status.as_u16(),
        headers: headers_to_wire(&parts.headers),
    };
    record.bytes_out = body.len() as u64;
    record.charge().await;
    let mut frames = vec![Frame::ResponseHead(head)];
    if !body.is_empty() {
        frames.push(Frame::Data(body));
    }
    frames.push(Frame::End);
    for frame in frames {
        if responder.feed(frame).await.is_err() {
            return Outcome::ClientGone;
        }
    }
    match responder.flush().await {
        Ok(()) => Outcome::Complete,
        Err(_) => Outcome::ClientGone,
    }
}
