//! WebSocket sessions through the tunnel (the Realtime API and other live
//! sessions), shared by both ends.
//!
//! The client answers the app's upgrade itself and the relay opens the
//! upstream WebSocket itself: each end speaks WebSocket only to its own
//! neighbour (tungstenite handles framing, fragmentation, ping/pong and
//! the close handshake there), and the tunnel stream between them carries
//! whole messages as [`Frame::WsMessage`] pieces and the close as
//! [`Frame::WsClose`]:
//!
//! ```text
//! client → relay:  RequestHead (marked, see UPGRADE_HEADER), then WsMessage* / WsClose
//! relay  → client: ResponseHead 101, then WsMessage* / WsClose
//! ```
//!
//! A refused upgrade is an ordinary response (`ResponseHead`, `Data*`,
//! `End`) that the client hands to the app as it is.

use bytes::{Bytes, BytesMut};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use http::{HeaderMap, Method};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

use crate::frame::{Frame, FrameError, MAX_DATA_CHUNK, WsClose, WsMessage};

/// The request-head header that marks a WebSocket upgrade on the wire
/// (`Upgrade` itself is hop-by-hop). The client removes any copy an app
/// sends and sets it only for a genuine upgrade; the relay removes it
/// before the upstream sees the request.
pub const UPGRADE_HEADER: &str = "passage-upgrade";

/// The value of [`UPGRADE_HEADER`] for a WebSocket.
pub const UPGRADE_WEBSOCKET: &str = "websocket";

/// Headers that belong to one WebSocket handshake (one hop), never
/// carried across the tunnel: each end makes its own.
pub const HANDSHAKE_HEADERS: [&str; 4] = [
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-accept",
    "sec-websocket-extensions",
];

/// Whether `name` (in any case) is one of [`HANDSHAKE_HEADERS`].
pub fn is_handshake_header(name: &str) -> bool {
    HANDSHAKE_HEADERS
        .iter()
        .any(|header| header.eq_ignore_ascii_case(name))
}

/// Close code for a session the tunnel broke (RFC 6455: internal error).
pub const CLOSE_TUNNEL_LOST: u16 = 1011;

/// Close code for a message above the size limit (RFC 6455: too big).
pub const CLOSE_TOO_BIG: u16 = 1009;

/// Close code for a session passage ends because it shuts down (RFC 6455:
/// going away).
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// Close code for a message the rules refuse (RFC 6455: policy violation).
pub const CLOSE_POLICY: u16 = 1008;

/// Whether a request asks for a WebSocket (RFC 6455 §4.2.1): a GET with
/// `Connection: upgrade` and `Upgrade: websocket`, in any case.
pub fn is_upgrade_request(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::GET
        && has_token(headers, http::header::CONNECTION, "upgrade")
        && has_token(headers, http::header::UPGRADE, "websocket")
}

/// Whether one of `name`'s comma-separated values is `token`.
fn has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|part| part.trim().eq_ignore_ascii_case(token))
}

/// tungstenite's settings for one side of a session: messages up to
/// `max_message` bytes, no frame larger than that, and small buffers.
/// Its defaults (128 KiB to read, 128 KiB to gather writes) are touched
/// on the first read and cost about 140 KiB of resident memory per idle
/// session on each end; the bridge flushes every message anyway, so a
/// write buffer would gather nothing.
pub fn config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Read buffer of one WebSocket end: a typical Realtime event fits; a
/// larger message is read in several passes.
const READ_BUFFER: usize = 4 * 1024;

/// How a bridged session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The WebSocket side closed, with this code; the close went on through
    /// the tunnel.
    WebSocketClosed(Option<u16>),
    /// The tunnel side closed, with this code; the close went on to the
    /// WebSocket.
    TunnelClosed(Option<u16>),
    /// A message above the limit arrived (from the side named); both sides
    /// were closed with 1009.
    TooBig(&'static str),
    /// The WebSocket connection failed; the tunnel side was told with 1011.
    WebSocketFailed(String),
    /// The tunnel stream failed or broke the protocol; the WebSocket was
    /// closed with 1011 and the reason.
    TunnelFailed(String),
    /// passage ended the session (a watch refused a message, it was idle,
    /// or passage shuts down); both sides got this close.
    Refused(WsClose),
}

/// What ended one direction of the bridge, before the other is told.
enum Ended {
    WebSocket(Option<CloseFrame>),
    WebSocketGone,
    WebSocketTooBig,
    WebSocketError(String),
    Tunnel(WsClose),
    TunnelTooBig,
    TunnelError(String),
    Refused(WsClose),
}

/// Looks at each whole message one direction of a session carries
/// (binary or not, its bytes) before it goes on; a close instead ends the
/// session, both sides getting that close (a policy refusal).
pub type Watch<'a> = &'a mut (dyn FnMut(bool, &[u8]) -> Result<(), WsClose> + Send);

/// Moves messages between `ws` and the tunnel stream (`from_tunnel`,
/// `to_tunnel`) both ways as they come, until either side closes or fails;
/// then tells the other side and returns how it ended. Text and binary
/// messages pass whole (pieces on the tunnel are joined, up to
/// `max_message` bytes), each shown first to the watch of its direction;
/// pings are answered by each WebSocket end itself. Backpressure flows
/// through: a direction reads its next message only once the last one
/// was written.
pub async fn bridge<S, In, Out>(
    ws: WebSocketStream<S>,
    mut from_tunnel: In,
    mut to_tunnel: Out,
    limits: SessionLimits,
    watch_websocket: Watch<'_>,
    watch_tunnel: Watch<'_>,
    closing: impl std::future::Future<Output = ()>,
) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
    In: Stream<Item = Result<Frame, FrameError>> + Unpin,
    Out: Sink<Frame, Error = FrameError> + Unpin,
{
    let max_message = limits.max_message;
    let (mut ws_out, mut ws_in) = ws.split();
    // Milliseconds after `opened` of the last message either way.
    let opened = tokio::time::Instant::now();
    let last_message = std::sync::atomic::AtomicU64::new(0);
    let mut watch_websocket = |binary: bool, message: &[u8]| {
        note_activity(&last_message, opened);
        watch_websocket(binary, message)
    };
    let mut watch_tunnel = |binary: bool, message: &[u8]| {
        note_activity(&last_message, opened);
        watch_tunnel(binary, message)
    };
    let ended = tokio::select! {
        ended = websocket_to_tunnel(&mut ws_in, &mut to_tunnel, &mut watch_websocket) => ended,
        ended = tunnel_to_websocket(&mut from_tunnel, &mut ws_out, max_message, &mut watch_tunnel) => ended,
        () = idle(limits.idle, &last_message, opened) => Ended::Refused(WsClose {
            code: Some(1000),
            reason: format!("no message either way for {} s", limits.idle.as_secs()),
        }),
        () = closing => Ended::Refused(WsClose {
            code: Some(CLOSE_GOING_AWAY),
            reason: "passage is shutting down".to_owned(),
        }),
    };
    let end = tell_the_other_side(ended, &mut ws_out, &mut to_tunnel, max_message).await;
    // End the tunnel stream in order: our side finished (after the close
    // frame), then what the peer still sends read to its end. Dropping the
    // halves instead could reset the stream, and over HTTP/2 a reset
    // discards the close frame still queued.
    let _ = to_tunnel.close().await;
    let _ = tokio::time::timeout(LINGER, async {
        while let Some(Ok(_)) = from_tunnel.next().await {}
    })
    .await;
    end
}

/// Default largest message either way (16 MiB).
pub const DEFAULT_MAX_MESSAGE: usize = 16 << 20;

/// Default silence either way after which a session closes (10 min).
pub const DEFAULT_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// The limits of one session.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    /// Largest message either way, in bytes (1009 above it).
    pub max_message: usize,
    /// Silence either way after which the session is closed.
    pub idle: std::time::Duration,
}

fn note_activity(last_message: &std::sync::atomic::AtomicU64, opened: tokio::time::Instant) {
    let now = opened.elapsed().as_millis() as u64;
    last_message.store(now, std::sync::atomic::Ordering::Relaxed);
}

/// Resolves once no message has passed either way for `limit`.
async fn idle(
    limit: std::time::Duration,
    last_message: &std::sync::atomic::AtomicU64,
    opened: tokio::time::Instant,
) {
    loop {
        let last = last_message.load(std::sync::atomic::Ordering::Relaxed);
        let deadline = std::time::Duration::from_millis(last)
            .checked_add(limit)
            .and_then(|after| opened.checked_add(after));
        // A limit too far out to reach: never idle.
        let Some(deadline) = deadline else {
            return std::future::pending().await;
        };
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// How long a finished session waits for the peer to end its side of the
/// tunnel stream.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);

/// Passes the end of one direction on to the other side.
async fn tell_the_other_side<S, Out>(
    ended: Ended,
    ws_out: &mut futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    to_tunnel: &mut Out,
    max_message: usize,
) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin,
    Out: Sink<Frame, Error = FrameError> + Unpin,
{
    let ended_by_websocket = matches!(ended, Ended::WebSocketTooBig);
    match ended {
        Ended::WebSocket(frame) => {
            let code = frame.as_ref().map(|f| u16::from(f.code));
            let close = WsClose {
                code,
                reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
            };
            let _ = to_tunnel.send(Frame::WsClose(close)).await;
            SessionEnd::WebSocketClosed(code)
        }
        Ended::WebSocketGone => {
            let reason = "the WebSocket connection ended without a close";
            let _ = to_tunnel.send(close_frame(CLOSE_TUNNEL_LOST, reason)).await;
            SessionEnd::WebSocketFailed(reason.to_owned())
        }
        Ended::WebSocketError(error) => {
            let _ = to_tunnel.send(close_frame(CLOSE_TUNNEL_LOST, &error)).await;
            SessionEnd::WebSocketFailed(error)
        }
        Ended::WebSocketTooBig | Ended::TunnelTooBig => {
            let reason = format!("message above the limit of {max_message} bytes");
            let _ = ws_out.send(close_message(CLOSE_TOO_BIG, &reason)).await;
            let _ = to_tunnel.send(close_frame(CLOSE_TOO_BIG, &reason)).await;
            SessionEnd::TooBig(if ended_by_websocket {
                "websocket"
            } else {
                "tunnel"
            })
        }
        Ended::Tunnel(close) => {
            let code = close.code;
            let message = match close.code.map(CloseCode::from) {
                Some(code) if code.is_allowed() => close_message(code.into(), &close.reason),
                // 1005/1006 and the like describe a close, they are never sent.
                _ => Message::Close(None),
            };
            let _ = ws_out.send(message).await;
            SessionEnd::TunnelClosed(code)
        }
        Ended::Refused(close) => {
            let code = close.code.unwrap_or(CLOSE_POLICY);
            let _ = ws_out.send(close_message(code, &close.reason)).await;
            let _ = to_tunnel.send(close_frame(code, &close.reason)).await;
            SessionEnd::Refused(close)
        }
        Ended::TunnelError(error) => {
            let _ = ws_out.send(close_message(CLOSE_TUNNEL_LOST, &error)).await;
            SessionEnd::TunnelFailed(error)
        }
    }
}

async fn websocket_to_tunnel<S, Out>(
    ws_in: &mut futures_util::stream::SplitStream<WebSocketStream<S>>,
    to_tunnel: &mut Out,
    watch: Watch<'_>,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
    Out: Sink<Frame, Error = FrameError> + Unpin,
{
    loop {
        let (binary, payload) = match ws_in.next().await {
            Some(Ok(Message::Text(text))) => (false, Bytes::from(text)),
            Some(Ok(Message::Binary(bytes))) => (true, bytes),
            // tungstenite answers pings itself; pongs are its business.
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
            Some(Ok(Message::Close(frame))) => return Ended::WebSocket(frame),
            Some(Err(tungstenite::Error::Capacity(_))) => return Ended::WebSocketTooBig,
            Some(Err(e)) => return Ended::WebSocketError(e.to_string()),
            None => return Ended::WebSocketGone,
        };
        if let Err(close) = watch(binary, &payload) {
            return Ended::Refused(close);
        }
        if let Err(e) = send_message(to_tunnel, binary, payload).await {
            return Ended::TunnelError(e.to_string());
        }
    }
}

/// Sends one message as pieces of at most [`MAX_DATA_CHUNK`] bytes.
async fn send_message<Out>(
    to_tunnel: &mut Out,
    binary: bool,
    mut payload: Bytes,
) -> Result<(), FrameError>
where
    Out: Sink<Frame, Error = FrameError> + Unpin,
{
    loop {
        let piece = payload.split_to(payload.len().min(MAX_DATA_CHUNK));
        let last = payload.is_empty();
        let frame = Frame::WsMessage(WsMessage {
            binary,
            last,
            payload: piece,
        });
        if last {
            return to_tunnel.send(frame).await;
        }
        to_tunnel.feed(frame).await?;
    }
}

async fn tunnel_to_websocket<S, In>(
    from_tunnel: &mut In,
    ws_out: &mut futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    max_message: usize,
    watch: Watch<'_>,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
    In: Stream<Item = Result<Frame, FrameError>> + Unpin,
{
    // The pieces of a message larger than one frame, until its last.
    let mut partial: Option<(bool, BytesMut)> = None;
    loop {
        let piece = match from_tunnel.next().await {
            Some(Ok(Frame::WsMessage(piece))) => piece,
            Some(Ok(Frame::WsClose(close))) => return Ended::Tunnel(close),
            Some(Ok(frame)) => {
                return Ended::TunnelError(format!(
                    "a {} frame inside a WebSocket session",
                    frame.kind()
                ));
            }
            Some(Err(e)) => return Ended::TunnelError(format!("passage tunnel lost: {e}")),
            None => {
                return Ended::TunnelError(
                    "passage tunnel stream ended without a close".to_owned(),
                );
            }
        };
        let (binary, payload) = match partial.take() {
            None if piece.last => (piece.binary, piece.payload),
            None => {
                if piece.payload.len() > max_message {
                    return Ended::TunnelTooBig;
                }
                partial = Some((piece.binary, BytesMut::from(&piece.payload[..])));
                continue;
            }
            Some((binary, mut joined)) => {
                if joined.len() + piece.payload.len() > max_message {
                    return Ended::TunnelTooBig;
                }
                joined.extend_from_slice(&piece.payload);
                if !piece.last {
                    partial = Some((binary, joined));
                    continue;
                }
                (binary, joined.freeze())
            }
        };
        if payload.len() > max_message {
            return Ended::TunnelTooBig;
        }
        if let Err(close) = watch(binary, &payload) {
            return Ended::Refused(close);
        }
        let message = if binary {
            Message::Binary(payload)
        } else {
            match Utf8Bytes::try_from(payload) {
                Ok(text) => Message::Text(text),
                Err(_) => return Ended::TunnelError("a text message that is not UTF-8".to_owned()),
            }
        };
        if let Err(e) = ws_out.send(message).await {
            return Ended::WebSocketError(e.to_string());
        }
    }
}

/// A close frame for the tunnel.
fn close_frame(code: u16, reason: &str) -> Frame {
    Frame::WsClose(WsClose {
        code: Some(code),
        reason: close_reason(reason),
    })
}

/// A close message for a WebSocket.
fn close_message(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from(close_reason(reason)),
    }))
}

/// `reason` cut to the 123 bytes a close frame holds, at a character
/// boundary.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_requests_are_recognised_in_any_case() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", "keep-alive, Upgrade".parse().expect("value"));
        headers.insert("upgrade", "WebSocket".parse().expect("value"));
        assert!(is_upgrade_request(&Method::GET, &headers));
        assert!(!is_upgrade_request(&Method::POST, &headers));
        headers.insert("upgrade", "h2c".parse().expect("value"));
        assert!(!is_upgrade_request(&Method::GET, &headers));
    }

    #[test]
    fn close_reasons_fit_a_close_frame() {
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= 123);
        assert!(long.starts_with(&cut));
    }
}
