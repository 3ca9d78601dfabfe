//! The client's end of a WebSocket session (the Realtime API and other
//! live sessions): carries the app's upgrade over one tunnel stream, and
//! once the relay has the upstream's `101`, answers the app's handshake
//! itself and bridges messages (see [`passage_shared::websocket`]).
//!
//! Key custody: whatever key the app sends is removed here, in
//! `Authorization` and in the browser-style `openai-insecure-api-key.*`
//! subprotocol; the relay adds its own.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use passage_shared::body::FrameBody;
use passage_shared::error_body::ApiError;
use passage_shared::frame::{
    Frame, FrameCodec, Header, RequestHead, ResponseHead, frame_reader, frame_writer,
};
use passage_shared::http_map::headers_to_wire;
use passage_shared::transport::{BoxRecv, BoxSend};
use passage_shared::websocket::{self, SessionLimits, UPGRADE_HEADER, UPGRADE_WEBSOCKET};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{Instrument, debug, info};

use crate::forward::{ResponseBody, or_error_response, origin_form_target, response_for};
use crate::server_context::ServerContext;
use crate::tunnel::TunnelError;

/// The session's frames to the relay.
type ToRelay = FramedWrite<BoxSend, FrameCodec>;

/// The session's frames from the relay.
type FromRelay = FramedRead<BoxRecv, FrameCodec>;

/// The subprotocol prefix under which browsers pass an API key.
const KEY_SUBPROTOCOL: &str = "openai-insecure-api-key.";

/// Carries the app's WebSocket upgrade `request` over the tunnel; every
/// failure becomes an OpenAI-shaped error response.
pub async fn upgrade(
    ctx: &ServerContext,
    id: String,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    or_error_response(try_upgrade(ctx, id, request).await)
}

async fn try_upgrade(
    ctx: &ServerContext,
    id: String,
    mut request: Request<Incoming>,
) -> Result<Response<ResponseBody>, ApiError> {
    let app_key = handshake_key(&request)?;
    let path_and_query = origin_form_target(request.method(), request.uri())?;
    let on_upgrade = hyper::upgrade::on(&mut request);
    let head = RequestHead {
        id,
        method: "GET".to_owned(),
        path_and_query,
        headers: wire_headers(request.headers()),
        has_body: false,
    };
    let (head, to_relay, from_relay) = ask_relay(ctx, head).await?;
    // Refused upstream (or by the relay): the app gets that answer.
    if head.status != StatusCode::SWITCHING_PROTOCOLS.as_u16() {
        return response_for(head, Either::Right(FrameBody::new(from_relay)));
    }
    let mut response = response_for(head, Either::Left(Full::new(Bytes::new())))?;
    answer_handshake(response.headers_mut(), &app_key)?;
    spawn_session(ctx, on_upgrade, from_relay, to_relay);
    Ok(response)
}

/// The app's `Sec-WebSocket-Key`, if its handshake is one this client
/// answers (version 13).
fn handshake_key(request: &Request<Incoming>) -> Result<HeaderValue, ApiError> {
    let headers = request.headers();
    headers
        .get("sec-websocket-key")
        .cloned()
        .filter(|_| {
            headers
                .get("sec-websocket-version")
                .is_some_and(|v| v == "13")
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_websocket_upgrade",
                "a WebSocket upgrade needs Sec-WebSocket-Key and Sec-WebSocket-Version: 13",
            )
        })
}

/// Sends the upgrade `head` over a new tunnel stream; the relay's response
/// head and the stream's two directions.
async fn ask_relay(
    ctx: &ServerContext,
    head: RequestHead,
) -> Result<(ResponseHead, ToRelay, FromRelay), ApiError> {
    let opened = ctx
        .tunnel
        .open_stream(ctx.connect_wait, None)
        .await
        .map_err(tunnel_error)?;
    let mut to_relay = frame_writer(opened.send);
    let mut from_relay = frame_reader(opened.recv);
    to_relay
        .send(Frame::RequestHead(head))
        .await
        .map_err(|e| stream_failed(format!("could not send the upgrade to the relay: {e}")))?;
    let head = match from_relay.next().await {
        Some(Ok(Frame::ResponseHead(head))) => head,
        Some(Ok(frame)) => {
            return Err(stream_failed(format!(
                "the relay sent a {} frame before the response head",
                frame.kind()
            )));
        }
        Some(Err(e)) => {
            return Err(stream_failed(format!(
                "the tunnel stream failed before the response head: {e}"
            )));
        }
        None => {
            return Err(stream_failed(
                "the relay closed the stream without a response".to_owned(),
            ));
        }
    };
    Ok((head, to_relay, from_relay))
}

/// Turns the upstream's `101` headers into this client's answer to the
/// app's handshake: the upstream's handshake headers out, the app's
/// accept key in.
fn answer_handshake(headers: &mut http::HeaderMap, app_key: &HeaderValue) -> Result<(), ApiError> {
    for name in websocket::HANDSHAKE_HEADERS {
        headers.remove(name);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let accept = HeaderValue::from_str(&derive_accept_key(app_key.as_bytes())).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            e.to_string(),
        )
    })?;
    headers.insert("sec-websocket-accept", accept);
    Ok(())
}

/// Bridges the session in a task of its own once hyper hands the app's
/// connection over.
fn spawn_session(
    ctx: &ServerContext,
    on_upgrade: hyper::upgrade::OnUpgrade,
    from_relay: FromRelay,
    to_relay: ToRelay,
) {
    let limits = SessionLimits {
        max_message: ctx.ws_max_message,
        // The relay closes idle sessions; its timeout applies.
        idle: Duration::MAX,
    };
    let closing = ctx.sessions_closing.clone().cancelled_owned();
    ctx.sessions.spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    debug!(error = %e, "the app's connection was not handed over");
                    return;
                }
            };
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(websocket::config(limits.max_message)),
            )
            .await;
            info!("websocket session open");
            // The rules are the relay's to apply: nothing to watch here.
            let end = websocket::bridge(
                ws,
                from_relay,
                to_relay,
                limits,
                &mut |_, _| Ok(()),
                &mut |_, _| Ok(()),
                closing,
            )
            .await;
            info!(end = ?end, "websocket session ended");
        }
        .in_current_span(),
    );
}

/// The app's headers as they travel: end-to-end ones, without its
/// handshake, its keys, or a marker it may have forged; then the marker.
fn wire_headers(headers: &http::HeaderMap) -> Vec<Header> {
    let mut wire: Vec<Header> = headers_to_wire(headers)
        .into_iter()
        .filter(|h| {
            !h.name.eq_ignore_ascii_case(UPGRADE_HEADER)
                && !h.name.eq_ignore_ascii_case(header::AUTHORIZATION.as_str())
                && !websocket::is_handshake_header(&h.name)
        })
        .filter_map(|h| {
            if !h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
                return Some(h);
            }
            let kept = String::from_utf8_lossy(&h.value)
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty() && !p.starts_with(KEY_SUBPROTOCOL))
                .collect::<Vec<_>>()
                .join(", ");
            (!kept.is_empty()).then(|| Header {
                name: h.name,
                value: Bytes::from(kept),
            })
        })
        .collect();
    wire.push(Header {
        name: UPGRADE_HEADER.to_owned(),
        value: Bytes::from_static(UPGRADE_WEBSOCKET.as_bytes()),
    });
    wire
}

fn stream_failed(why: String) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "tunnel_stream_failed", why)
}

fn tunnel_error(error: TunnelError) -> ApiError {
    crate::forward::tunnel_error(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_leave_the_client() {
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", "Bearer sk-app".parse().expect("value"));
        headers.insert(
            "sec-websocket-protocol",
            "realtime, openai-insecure-api-key.sk-app, openai-beta.realtime-v1"
                .parse()
                .expect("value"),
        );
        headers.insert(
            "sec-websocket-key",
            "dGhlIHNhbXBsZSBub25jZQ==".parse().expect("value"),
        );
        headers.insert(UPGRADE_HEADER, "forged".parse().expect("value"));
        let wire = wire_headers(&headers);
        let text = format!("{wire:?}");
        assert!(!text.contains("sk-app"), "{text}");
        assert!(!text.contains("forged"), "{text}");
        assert!(!text.contains("sec-websocket-key"), "{text}");
        let protocols = wire
            .iter()
            .find(|h| h.name == "sec-websocket-protocol")
            .expect("protocols kept");
        assert_eq!(&protocols.value[..], b"realtime, openai-beta.realtime-v1");
        assert!(
            wire.iter()
                .any(|h| h.name == UPGRADE_HEADER && &h.value[..] == b"websocket")
        );
    }
}
