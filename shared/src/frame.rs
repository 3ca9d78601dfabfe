//! The wire protocol: the frames exchanged on each QUIC stream and their codec.
//!
//! Every request travels on its own bidirectional stream:
//!
//! ```text
//! client → relay:  RequestHead, Data*, End
//! relay  → client: ResponseHead, Data*, (End | Failure)
//! ```
//!
//! Once per connection, right after the handshake, the relay also opens a
//! unidirectional stream carrying one `Welcome` frame. In TLS 1.3 the client
//! finishes its handshake before the relay has checked the client
//! certificate, so the welcome is what tells the client it was accepted.
//! When the relay shuts down it opens one more, carrying `GoAway`: the
//! client sends new requests elsewhere while those in flight finish, and
//! any stream that crossed the go-away is reset with
//! [`reset_code::REFUSED`] unread, so the client may safely send it again.
//!
//! On the wire a frame is a 4-byte big-endian payload length followed by the
//! bincode encoding of [`Frame`]. The length is checked against
//! [`MAX_FRAME_LEN`] before a single byte is buffered for it, and bincode's
//! own limit stops any length claimed *inside* the payload from allocating
//! more than that, so a hostile peer cannot make either side allocate beyond
//! the limit. All calls to bincode live in this module: a later protocol
//! version can change the format without touching the rest of the code.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite};

/// ALPN protocol name of this wire format; a new incompatible format gets a new name.
pub const ALPN: &[u8] = b"passage/1";

/// ALPN of the same wire format carried over TLS on TCP, in HTTP/2 streams
/// (the fallback transport for networks that block UDP).
pub const ALPN_TCP: &[u8] = b"passage-tcp/1";

/// Largest encoded frame payload either side accepts or sends (1 MiB).
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Largest body chunk put into one [`Frame::Data`]; larger chunks are split.
///
/// Well under [`MAX_FRAME_LEN`] so that a data frame plus its encoding
/// overhead always fits, and small enough that one frame never holds the
/// stream for long.
pub const MAX_DATA_CHUNK: usize = 256 * 1024;

/// QUIC application error codes passage uses to reset or stop a stream.
pub mod reset_code {
    /// The reader went away: the app closed its connection or the client stopped.
    pub const CANCELLED: u32 = 1;
    /// The peer broke the frame protocol.
    pub const PROTOCOL_ERROR: u32 = 2;
    /// The request body could not be delivered.
    pub const BODY_FAILED: u32 = 3;
    /// The relay refused the stream unread (it is shutting down): nothing
    /// of the request went upstream, so the client may send it elsewhere.
    pub const REFUSED: u32 = 4;
}

/// Application codes that close a whole tunnel connection (QUIC's
/// CONNECTION_CLOSE; on TCP, the reset of the client's control stream).
pub mod close_code {
    /// The relay closed the connection: the client certificate was revoked.
    pub const REVOKED: u32 = 0x10;
    /// The client abandoned a connection it raced and no longer needs
    /// (another handshake won): routine, not a failure.
    pub const ABANDONED: u32 = 0x11;
    /// The client is shutting down.
    pub const CLIENT_SHUTDOWN: u32 = 0;
}

/// Starting size of a stream's frame buffers: a head fits, and they grow
/// for larger frames. Thousands of streams may be held open at once, so
/// tokio-util's 8 KiB default per buffer would add up.
pub const INITIAL_BUFFER: usize = 1024;

/// Reads frames from one direction of a stream.
pub fn frame_reader<R: tokio::io::AsyncRead>(inner: R) -> FramedRead<R, FrameCodec> {
    FramedRead::with_capacity(inner, FrameCodec, INITIAL_BUFFER)
}

/// Writes frames to one direction of a stream.
pub fn frame_writer<W: tokio::io::AsyncWrite>(inner: W) -> FramedWrite<W, FrameCodec> {
    FramedWrite::with_capacity(inner, FrameCodec, INITIAL_BUFFER)
}

/// Bytes of the length prefix in front of every frame.
const LEN_PREFIX: usize = 4;

/// One header line, carried byte for byte (names are lower-case HTTP/1.1 names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Raw header value; not necessarily UTF-8.
    pub value: Bytes,
}

/// The start of a request: what the relay needs to call the upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    /// Request id, chosen by the client, carried in both sides' logs.
    pub id: String,
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Origin-form target: path and optional query, always starting with `/`.
    pub path_and_query: String,
    /// End-to-end headers of the app's request (hop-by-hop ones removed).
    pub headers: Vec<Header>,
    /// Whether body frames follow; `false` means the request has no body at all.
    pub has_body: bool,
}

/// The start of a response: status and end-to-end headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    /// HTTP status code.
    pub status: u16,
    /// End-to-end headers of the response (hop-by-hop ones removed).
    pub headers: Vec<Header>,
}

/// Why a response ended early; sent instead of [`Frame::End`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamFailure {
    /// Short machine-readable reason, e.g. `upstream_body_failed`.
    pub code: String,
    /// Human-readable detail.
    pub message: String,
}

/// One unit on a passage stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Client → relay: the request line and headers.
    RequestHead(RequestHead),
    /// Relay → client: the status line and headers.
    ResponseHead(ResponseHead),
    /// A chunk of body, in either direction.
    Data(Bytes),
    /// The body in this direction is complete.
    End,
    /// Relay → client: the response failed part-way and is incomplete.
    Failure(StreamFailure),
    /// Relay → client, once per connection: the client certificate was accepted.
    Welcome(Welcome),
    /// Relay → client, on its own stream: the relay is shutting down. Open
    /// no new streams on this connection; those in flight will finish.
    GoAway,
    /// Either way, after a `101` head: a WebSocket message or a piece of
    /// one (see [`crate::websocket`]).
    WsMessage(WsMessage),
    /// Either way, after a `101` head: the WebSocket session closes.
    WsClose(WsClose),
}

/// A WebSocket message, or one piece of a message larger than
/// [`MAX_DATA_CHUNK`]; the pieces of one message travel in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsMessage {
    /// Binary (`true`) or text (`false`, UTF-8 once whole).
    pub binary: bool,
    /// Whether this piece ends the message.
    pub last: bool,
    /// The piece's bytes.
    pub payload: Bytes,
}

/// The close of a WebSocket session, with the code and reason the closing
/// side gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WsClose {
    /// RFC 6455 status code; `None` when the close frame carried none.
    pub code: Option<u16>,
    /// The close reason, UTF-8, at most 123 bytes.
    pub reason: String,
}

/// The relay's greeting on a new connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The client's name as the relay read it from the certificate.
    pub client: String,
}

impl Frame {
    /// Short name of the frame kind, for error messages and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::RequestHead(_) => "request head",
            Frame::ResponseHead(_) => "response head",
            Frame::Data(_) => "data",
            Frame::End => "end",
            Frame::Failure(_) => "failure",
            Frame::Welcome(_) => "welcome",
            Frame::GoAway => "go-away",
            Frame::WsMessage(_) => "websocket message",
            Frame::WsClose(_) => "websocket close",
        }
    }
}

/// What can go wrong reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced or encoded length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated {
        /// Bytes of the incomplete frame that had arrived.
        buffered: usize,
    },
    /// The payload is not a valid frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The frame could not be encoded.
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// The underlying stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// bincode settings shared by both directions; the limit bounds any length
/// claimed inside a payload.
fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Encodes and decodes length-prefixed frames; plugs into `FramedRead`/`FramedWrite`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameCodec;

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        let total = LEN_PREFIX + len;
        if src.len() < total {
            // Only now, with the length known to be within the limit, make room.
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(LEN_PREFIX);
        let payload = src.split_to(len);
        decode_payload(&payload).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() => Ok(None),
            None => Err(FrameError::Truncated {
                buffered: src.len(),
            }),
        }
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame(&frame, dst)
    }
}

/// Decodes one frame payload (without its length prefix); trailing bytes are an error.
pub fn decode_payload(payload: &[u8]) -> Result<Frame, FrameError> {
    let (frame, used): (Frame, usize) =
        bincode::serde::decode_from_slice(payload, bincode_config())
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after a {} frame",
            payload.len() - used,
            frame.kind()
        )));
    }
    Ok(frame)
}

/// Appends one length-prefixed frame to `dst`; on error `dst` is left as it was.
pub fn encode_frame(frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
    let start = dst.len();
    dst.put_u32(0);
    let mut writer = dst.writer();
    let written = bincode::serde::encode_into_std_write(frame, &mut writer, bincode_config());
    let dst = writer.into_inner();
    let len = match written {
        Ok(len) if len <= MAX_FRAME_LEN => len,
        Ok(len) => {
            dst.truncate(start);
            return Err(FrameError::TooLarge {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        Err(e) => {
            dst.truncate(start);
            return Err(FrameError::Encode(e.to_string()));
        }
    };
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len,
        max: MAX_FRAME_LEN,
    })?;
    dst[start..start + LEN_PREFIX].copy_from_slice(&prefix.to_be_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_frames() -> Vec<Frame> {
        vec![
            Frame::RequestHead(RequestHead {
                id: "7f3a".into(),
                method: "POST".into(),
                path_and_query: "/v1/chat/completions?x=1".into(),
                headers: vec![
                    Header {
                        name: "content-type".into(),
                        value: Bytes::from_static(b"application/json"),
                    },
                    Header {
                        name: "x-raw".into(),
                        value: Bytes::from_static(&[0xff, 0x00, 0x80]),
                    },
                ],
                has_body: true,
            }),
            Frame::ResponseHead(ResponseHead {
                status: 429,
                headers: vec![Header {
                    name: "retry-after".into(),
                    value: Bytes::from_static(b"7"),
                }],
            }),
            Frame::Data(Bytes::from(vec![42u8; 70_000])),
            Frame::Data(Bytes::new()),
            Frame::End,
            Frame::Failure(StreamFailure {
                code: "upstream_body_failed".into(),
                message: "connection reset".into(),
            }),
            Frame::Welcome(Welcome {
                client: "alice".into(),
            }),
            Frame::GoAway,
        ]
    }

    fn encode_all(frames: &[Frame]) -> BytesMut {
        let mut buf = BytesMut::new();
        for frame in frames {
            encode_frame(frame, &mut buf).expect("encodes");
        }
        buf
    }

    #[test]
    fn frames_round_trip() {
        let frames = sample_frames();
        let mut buf = encode_all(&frames);
        let mut codec = FrameCodec;
        let mut decoded = Vec::new();
        while let Some(frame) = codec.decode_eof(&mut buf).expect("decodes") {
            decoded.push(frame);
        }
        assert_eq!(decoded, frames);
        assert!(buf.is_empty());
    }

    #[test]
    fn frames_decode_when_fed_byte_by_byte() {
        let frames = sample_frames();
        let wire = encode_all(&frames);
        let mut codec = FrameCodec;
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for byte in wire.iter() {
            buf.put_u8(*byte);
            while let Some(frame) = codec.decode(&mut buf).expect("decodes") {
                decoded.push(frame);
            }
        }
        assert_eq!(decoded, frames);
    }

    #[test]
    fn truncated_input_is_an_error_at_eof() {
        let wire = encode_all(&sample_frames()[..1]);
        for cut in 1..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut codec = FrameCodec;
            let result = codec.decode_eof(&mut buf);
            assert!(
                matches!(result, Err(FrameError::Truncated { .. })),
                "cut at {cut}: {result:?}"
            );
        }
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        buf.put_slice(b"abc");
        let capacity_before = buf.capacity();
        let result = FrameCodec.decode(&mut buf);
        assert!(matches!(
            result,
            Err(FrameError::TooLarge { len, max: MAX_FRAME_LEN }) if len == u32::MAX as usize
        ));
        assert_eq!(buf.capacity(), capacity_before, "nothing reserved");
    }

    #[test]
    fn inner_length_claims_are_bounded() {
        // A data frame whose inner byte-string length claims 1 TiB.
        let mut payload = BytesMut::new();
        payload.put_u8(2); // variant index of Frame::Data
        payload.put_u8(253); // bincode varint marker for a u64
        payload.put_u64_le(1 << 40);
        let result = decode_payload(&payload);
        assert!(
            matches!(result, Err(FrameError::Malformed(_))),
            "{result:?}"
        );
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|i| (seed.rotate_left(i as u32) & 0xff) as u8)
                .collect();
            let mut buf = BytesMut::new();
            buf.put_u32(len as u32);
            buf.put_slice(&bytes);
            // Either a valid frame (unlikely) or an error; never a panic.
            let _ = FrameCodec.decode_eof(&mut buf);
        }
        let mut unknown_variant = BytesMut::new();
        unknown_variant.put_u32(1);
        unknown_variant.put_u8(99);
        assert!(matches!(
            FrameCodec.decode(&mut unknown_variant),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_in_a_payload_are_refused() {
        let mut buf = BytesMut::new();
        encode_frame(&Frame::End, &mut buf).expect("encodes");
        // Grow the payload by one byte and fix up the prefix.
        buf.put_u8(0);
        let len = (buf.len() - LEN_PREFIX) as u32;
        buf[..LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(
            FrameCodec.decode(&mut buf),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_frames_are_not_encoded() {
        let mut buf = BytesMut::from(&b"keep"[..]);
        let huge = Frame::Data(Bytes::from(vec![0u8; MAX_FRAME_LEN + 1]));
        assert!(matches!(
            encode_frame(&huge, &mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(&buf[..], b"keep");
    }
}
