//! The mock upstream's WebSocket endpoint, `GET /v1/realtime`: a Realtime
//! API stand-in, enough to carry sessions through the tunnel and assert on
//! what the upstream saw.
//!
//! On open it sends `session.created` naming the model (`?model=`), the
//! `Authorization` and the subprotocols it was offered. A text message
//! `{"type":"response.create"}` gets three `response.output_text.delta`
//! events and a `response.done` with usage; `{"type":"mock.close","code":N}`
//! makes the mock close the session with code N; any other message, text
//! or binary, comes back as it was sent. It picks the subprotocol `realtime`
//! when offered, and records every session it opened and how each closed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::mock_upstream::{MockBody, MockRecord};

/// Usage the mock's `response.done` reports.
pub const USAGE: (u64, u64) = (11, 7);

/// How one session at the mock ended.
#[derive(Debug, Clone)]
pub struct SessionClose {
    /// The close code the other side sent; `None` if the connection ended
    /// without a close frame or with one that carried no code.
    pub code: Option<u16>,
    /// When the mock saw the end.
    pub at: Instant,
}

/// Answers a WebSocket upgrade on `/v1/realtime` and serves the session in
/// its own task; anything that is not an upgrade gets 426.
pub fn realtime(mut request: Request<Incoming>, record: Arc<MockRecord>) -> Response<MockBody> {
    let headers = request.headers();
    let key = headers.get("sec-websocket-key").cloned();
    let upgrade = passage_shared::websocket::is_upgrade_request(request.method(), headers);
    let Some(key) = key.filter(|_| upgrade) else {
        return Response::builder()
            .status(StatusCode::UPGRADE_REQUIRED)
            .body(empty())
            .expect("static response");
    };
    let offered: Vec<String> = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let model = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("model=")))
        .unwrap_or_default()
        .to_owned();
    let greeting = serde_json::json!({
        "type": "session.created",
        "session": {"model": model},
        "authorization": authorization,
        "protocols": offered,
    });
    let on_upgrade = hyper::upgrade::on(&mut request);
    let session_record = record.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        session_record.ws_sessions.fetch_add(1, Ordering::SeqCst);
        let code = serve(ws, greeting).await;
        session_record
            .ws_closes
            .lock()
            .expect("lock")
            .push(SessionClose {
                code,
                at: Instant::now(),
            });
        session_record.ws_closed.notify_waiters();
    });
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()));
    if offered.iter().any(|p| p == "realtime") {
        response = response.header("sec-websocket-protocol", "realtime");
    }
    response.body(empty()).expect("static response")
}

/// Plays the session; returns the close code the other side sent (or the
/// mock's own, when it closed first).
async fn serve(
    mut ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    greeting: serde_json::Value,
) -> Option<u16> {
    if ws.send(Message::text(greeting.to_string())).await.is_err() {
        return None;
    }
    while let Some(message) = ws.next().await {
        let reply = match message {
            Ok(Message::Text(text)) if close_asked(&text).is_some() => {
                let code = close_asked(&text).unwrap_or(1000);
                let frame = CloseFrame {
                    code: CloseCode::from(code),
                    reason: "closed by the mock".into(),
                };
                let _ = ws.close(Some(frame)).await;
                // The close handshake: read until the other side's answer.
                while let Some(Ok(_)) = ws.next().await {}
                return Some(code);
            }
            Ok(Message::Text(text)) if is_response_create(&text) => {
                if respond(&mut ws).await.is_err() {
                    return None;
                }
                continue;
            }
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => message,
            Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(_) => return None,
        };
        if ws.send(reply).await.is_err() {
            return None;
        }
    }
    None
}

/// The code of a `mock.close` message.
fn close_asked(text: &Utf8Bytes) -> Option<u16> {
    let value = serde_json::from_str::<serde_json::Value>(text.as_str()).ok()?;
    (value["type"] == "mock.close").then(|| {
        value["code"]
            .as_u64()
            .and_then(|c| u16::try_from(c).ok())
            .unwrap_or(1000)
    })
}

fn is_response_create(text: &Utf8Bytes) -> bool {
    serde_json::from_str::<serde_json::Value>(text.as_str())
        .is_ok_and(|v| v["type"] == "response.create")
}

/// Three deltas and the `response.done` that carries the usage.
async fn respond(
    ws: &mut WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    for delta in ["Hel", "lo", "!"] {
        let event = serde_json::json!({"type": "response.output_text.delta", "delta": delta});
        ws.send(Message::text(event.to_string())).await?;
    }
    let (input, output) = USAGE;
    let done = serde_json::json!({
        "type": "response.done",
        "response": {
            "status": "completed",
            "usage": {"input_tokens": input, "output_tokens": output, "total_tokens": input + output},
        },
    });
    ws.send(Message::text(done.to_string())).await
}

fn empty() -> MockBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}
