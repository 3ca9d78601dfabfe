//! HTTP bodies on a passage stream: [`FrameBody`] reads the `Data` frames up
//! to `End` as a body, and [`encode_if_prompt`] writes a small body whole.
//!
//! The relay hands one to hyper as the upstream request body, the client as
//! the app's response body, so neither side buffers a whole body: each
//! frame becomes one body chunk the moment it arrives. Anything but a clean
//! `End` — a `Failure` frame, a reset, a stream that just stops — surfaces
//! as a body error, so hyper aborts the message instead of passing a
//! truncated body off as complete.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::frame::{Frame, FrameCodec, FrameError, MAX_DATA_CHUNK, StreamFailure, encode_frame};

/// Why a body read from a stream did not complete.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Reading or decoding frames failed (includes stream resets).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The sender reported that the body failed part-way.
    #[error("{}: {}", .0.code, .0.message)]
    Failure(StreamFailure),
    /// A frame that has no place inside a body arrived.
    #[error("unexpected {0} frame inside a body")]
    Unexpected(&'static str),
    /// The stream ended without an `End` frame.
    #[error("stream ended before the body was complete")]
    Truncated,
}

/// The body frames of one direction of a stream, as an `http_body::Body`.
#[derive(Debug)]
pub struct FrameBody<R> {
    frames: FramedRead<R, FrameCodec>,
    done: bool,
}

impl<R: AsyncRead + Unpin> FrameBody<R> {
    /// Reads the body from `frames`, whose head has already been taken.
    pub fn new(frames: FramedRead<R, FrameCodec>) -> Self {
        FrameBody {
            frames,
            done: false,
        }
    }

    /// The next chunk of the body; `None` after its `End`.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let error = match ready!(self.frames.poll_next_unpin(cx)) {
            Some(Ok(Frame::Data(bytes))) => return Poll::Ready(Some(Ok(bytes))),
            Some(Ok(Frame::End)) => {
                self.done = true;
                return Poll::Ready(None);
            }
            Some(Ok(Frame::Failure(failure))) => BodyError::Failure(failure),
            Some(Ok(other)) => BodyError::Unexpected(other.kind()),
            Some(Err(e)) => BodyError::Frame(e),
            None => BodyError::Truncated,
        };
        self.done = true;
        Poll::Ready(Some(Err(error)))
    }
}

impl<R: AsyncRead + Unpin> http_body::Body for FrameBody<R> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        self.poll_chunk(cx)
            .map(|chunk| chunk.map(|chunk| chunk.map(http_body::Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Sends one body chunk as `Data` frames, split so none exceeds
/// [`MAX_DATA_CHUNK`]; both directions' body pumps use it.
pub async fn send_data<W: AsyncWrite + Unpin>(
    writer: &mut FramedWrite<W, FrameCodec>,
    mut data: Bytes,
) -> Result<(), FrameError> {
    while data.len() > MAX_DATA_CHUNK {
        let chunk = data.split_to(MAX_DATA_CHUNK);
        writer.send(Frame::Data(chunk)).await?;
    }
    writer.send(Frame::Data(data)).await
}

/// Bodies whose length is known and at most this many bytes travel whole,
/// in the same write as their head (typically one QUIC packet), instead of
/// frame by frame; streams and large or unsized bodies are never held back.
pub const INLINE_BODY_LIMIT: u64 = 64 * 1024;

/// How long a sender waits for a small body to complete before it sends
/// what it has and streams the rest: enough for data already in flight on
/// loopback, too short to hold back a response anyone would notice.
const INLINE_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

/// Whether `body` is small and sized, so [`encode_whole_body`] may take it.
fn is_inline<B: http_body::Body>(body: &B) -> bool {
    body.size_hint()
        .exact()
        .is_some_and(|len| len <= INLINE_BODY_LIMIT)
}

/// Why a whole body could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum WholeBodyError<E> {
    /// Reading the body failed.
    #[error("reading the body: {0}")]
    Body(E),
    /// A frame could not be encoded.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Sends a small body with its head: if `body` is small and sized and
/// arrives whole within `INLINE_WAIT` (5 ms), appends it to `batch` as `Data`
/// frames and `End` (showing each chunk to `observe`). `None` when it is
/// not, or takes longer: what came so far is then in `batch`, to go out
/// now while the rest streams, so a slow body is never held back.
pub async fn encode_if_prompt<B>(
    body: &mut B,
    batch: &mut BytesMut,
    observe: impl FnMut(&Bytes),
) -> Option<Result<(), WholeBodyError<B::Error>>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    if !is_inline(body) {
        return None;
    }
    tokio::time::timeout(INLINE_WAIT, encode_whole_body(body, batch, observe))
        .await
        .ok()
}

/// Reads all of `body` and appends it to `batch` as `Data` frames and `End`,
/// showing each chunk to `observe` on the way. Meant for bodies
/// [`is_inline`] accepts: their size bounds the buffer.
async fn encode_whole_body<B>(
    body: &mut B,
    batch: &mut BytesMut,
    mut observe: impl FnMut(&Bytes),
) -> Result<(), WholeBodyError<B::Error>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
        if let Ok(data) = frame.map_err(WholeBodyError::Body)?.into_data() {
            observe(&data);
            encode_frame(&Frame::Data(data), batch)?;
        }
    }
    encode_frame(&Frame::End, batch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body;

    async fn collect(frames: &[Frame], eof_early: bool) -> (Vec<Bytes>, Option<BodyError>) {
        let mut wire = BytesMut::new();
        for frame in frames {
            encode_frame(frame, &mut wire).expect("encodes");
        }
        if eof_early {
            wire.truncate(wire.len() - 1);
        }
        let reader = std::io::Cursor::new(wire.to_vec());
        let mut body = FrameBody::new(FramedRead::new(reader, FrameCodec));
        let mut chunks = Vec::new();
        loop {
            let next = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            match next {
                Some(Ok(frame)) => chunks.push(frame.into_data().expect("data")),
                Some(Err(e)) => return (chunks, Some(e)),
                None => return (chunks, None),
            }
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn data_until_end_is_a_complete_body() {
        let frames = [
            Frame::Data(Bytes::from_static(b"ab")),
            Frame::Data(Bytes::from_static(b"c")),
            Frame::End,
        ];
        let (chunks, error) = block_on(collect(&frames, false));
        assert_eq!(
            chunks,
            [Bytes::from_static(b"ab"), Bytes::from_static(b"c")]
        );
        assert!(error.is_none());
    }

    #[test]
    fn a_whole_body_is_data_then_end() {
        let mut body = http_body_util::Full::new(Bytes::from_static(b"hello"));
        assert!(is_inline(&body));
        let mut batch = BytesMut::new();
        block_on(encode_whole_body(&mut body, &mut batch, |_| {})).expect("encodes");
        let mut codec = FrameCodec;
        use tokio_util::codec::Decoder;
        assert_eq!(
            codec.decode(&mut batch).expect("frame"),
            Some(Frame::Data(Bytes::from_static(b"hello")))
        );
        assert_eq!(codec.decode(&mut batch).expect("frame"), Some(Frame::End));
        let big = http_body_util::Full::new(Bytes::from(vec![0u8; INLINE_BODY_LIMIT as usize + 1]));
        assert!(!is_inline(&big));
    }

    #[test]
    fn failure_truncation_and_stray_frames_are_errors() {
        let failure = Frame::Failure(StreamFailure {
            code: "x".into(),
            message: "y".into(),
        });
        let (_, error) = block_on(collect(&[Frame::Data(Bytes::new()), failure], false));
        assert!(matches!(error, Some(BodyError::Failure(_))));

        let (_, error) = block_on(collect(&[Frame::Data(Bytes::from_static(b"a"))], false));
        assert!(matches!(error, Some(BodyError::Truncated)));

        let (_, error) = block_on(collect(&[Frame::Data(Bytes::from_static(b"a"))], true));
        assert!(matches!(
            error,
            Some(BodyError::Frame(FrameError::Truncated { .. }))
        ));

        let head = Frame::ResponseHead(crate::frame::ResponseHead {
            status: 200,
            headers: vec![],
        });
        let (_, error) = block_on(collect(&[head], false));
        assert!(matches!(error, Some(BodyError::Unexpected(_))));
    }
}
