//! HTTP bodies on a passage stream: [`FrameBody`] reads the `Data` frames up
//! to `End` as a body, and [`encode_whole_body`] writes a small body whole.
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
    /// The inspector set with [`FrameBody::inspect`] refused the body,
    /// for this reason (the inspector's own error, to be downcast by
    /// whoever set it).
    #[error("the body was refused: {0}")]
    Refused(InspectError),
    /// The body grew past the limit set with [`FrameBody::limited`].
    #[error("the body is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
}

/// The body frames of one direction of a stream, as an `http_body::Body`.
#[derive(Debug)]
pub struct FrameBody<R> {
    frames: FramedRead<R, FrameCodec>,
    /// Chunks already read from `frames` (a prefix the reader looked into).
    pending: std::collections::VecDeque<Bytes>,
    done: bool,
    /// Adds up the bytes of the chunks handed out, when set.
    counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Bytes handed out so far.
    seen: u64,
    /// Most bytes the body may have.
    limit: Option<u64>,
    /// Looks at every chunk read from the stream (not the prefix).
    inspector: Option<Inspector>,
    /// Kept until the prefix has been handed out, then dropped.
    prefix_hold: Option<PrefixHold>,
}

/// Something (a memory reservation) that a [`FrameBody`] keeps only while
/// it still holds its prefix; see [`FrameBody::hold_until_prefix_sent`].
pub struct PrefixHold(pub Box<dyn Send>);

impl std::fmt::Debug for PrefixHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrefixHold")
    }
}

/// A check run on each body chunk read from the stream; an `Err` aborts
/// the body with [`BodyError::Refused`].
pub struct Inspector(pub Box<InspectFn>);

/// What an [`Inspector`] runs: `Err(why)` refuses the body.
pub type InspectFn = dyn FnMut(&Bytes) -> Result<(), InspectError> + Send;

/// Why an [`Inspector`] refused a body: its own error, kept typed.
pub type InspectError = Box<dyn std::error::Error + Send + Sync>;

impl std::fmt::Debug for Inspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inspector")
    }
}

impl<R: AsyncRead + Unpin> FrameBody<R> {
    /// Reads the body from `frames`, whose head has already been taken.
    pub fn new(frames: FramedRead<R, FrameCodec>) -> Self {
        FrameBody::resume(frames, Vec::new(), false)
    }

    /// A body whose first chunks, `prefix`, were already read from `frames`
    /// (and, if `ended`, its `End` too); they come first, then the rest.
    pub fn resume(frames: FramedRead<R, FrameCodec>, prefix: Vec<Bytes>, ended: bool) -> Self {
        FrameBody {
            frames,
            pending: prefix.into(),
            done: ended,
            counter: None,
            seen: 0,
            limit: None,
            inspector: None,
            prefix_hold: None,
        }
    }

    /// Keeps `hold` until the prefix given to [`FrameBody::resume`] has been
    /// handed out (or the body is dropped), then drops it.
    pub fn hold_until_prefix_sent(mut self, hold: PrefixHold) -> Self {
        self.prefix_hold = Some(hold);
        self
    }

    /// Shows every chunk read from the stream from now on (not the prefix
    /// given to [`FrameBody::resume`]) to `inspector` before handing it out.
    pub fn inspect(mut self, inspector: Inspector) -> Self {
        self.inspector = Some(inspector);
        self
    }

    /// Fails the body (so the message it belongs to is aborted) once it
    /// grows past `limit` bytes.
    pub fn limited(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Adds the length of every chunk this body receives to `counter`
    /// (including one that crosses the limit).
    pub fn counting(mut self, counter: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.counter = Some(counter);
        self
    }

    fn chunk(&mut self, data: Bytes) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        self.seen += data.len() as u64;
        if let Some(counter) = &self.counter {
            counter.fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(limit) = self.limit
            && self.seen > limit
        {
            self.done = true;
            self.pending.clear();
            return Poll::Ready(Some(Err(BodyError::TooLarge { limit })));
        }
        Poll::Ready(Some(Ok(http_body::Frame::data(data))))
    }
}

impl<R: AsyncRead + Unpin> http_body::Body for FrameBody<R> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        if let Some(chunk) = self.pending.pop_front() {
            return self.chunk(chunk);
        }
        // Asked for more: the prefix is out.
        self.prefix_hold = None;
        if self.done {
            return Poll::Ready(None);
        }
        let next = ready!(self.frames.poll_next_unpin(cx));
        let result = match next {
            Some(Ok(Frame::Data(bytes))) => {
                let verdict = match &mut self.inspector {
                    Some(inspector) => (inspector.0)(&bytes),
                    None => Ok(()),
                };
                match verdict {
                    Ok(()) => return self.chunk(bytes),
                    Err(why) => BodyError::Refused(why),
                }
            }
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
        Poll::Ready(Some(Err(result)))
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty()
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
pub const INLINE_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

/// Whether `body` is small and sized, so [`encode_whole_body`] may take it.
pub fn is_inline<B: http_body::Body>(body: &B) -> bool {
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

/// Reads all of `body` and appends it to `batch` as `Data` frames and `End`,
/// showing each chunk to `observe` on the way. Meant for bodies
/// [`is_inline`] accepts: their size bounds the buffer.
pub async fn encode_whole_body<B>(
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
    fn the_prefix_hold_is_dropped_once_the_prefix_is_out() {
        struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut wire = BytesMut::new();
        for frame in [Frame::Data(Bytes::from_static(b"rest")), Frame::End] {
            encode_frame(&frame, &mut wire).expect("encodes");
        }
        let reader = std::io::Cursor::new(wire.to_vec());
        let prefix = vec![Bytes::from_static(b"pre"), Bytes::from_static(b"fix")];
        let mut body = FrameBody::resume(FramedRead::new(reader, FrameCodec), prefix, false)
            .hold_until_prefix_sent(PrefixHold(Box::new(Flag(dropped.clone()))));
        let held = || !dropped.load(std::sync::atomic::Ordering::SeqCst);
        block_on(async {
            for (expected, still_held) in [("pre", true), ("fix", true), ("rest", false)] {
                let chunk = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx))
                    .await
                    .expect("a chunk")
                    .expect("data");
                assert_eq!(chunk.into_data().expect("data"), expected);
                // The last prefix chunk is out only once more is asked for.
                assert_eq!(held(), still_held, "after {expected}");
            }
        });
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
