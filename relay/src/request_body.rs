//! A request body on its way upstream: the app's frames (after a prefix
//! the relay may have read to find the model), counted, held to the size
//! limit and watched by an inspector, with the relay's own refusals of it
//! part-way (a body past the limit, a form that names a second model)
//! typed as [`BodyRefusal`] and kept for the answer.
//!
//! hyper polls the body in a task of its own and, over HTTP/2, only logs a
//! body's error (the upstream gets a reset, the send a reset stream), so a
//! refusal cannot come back through the send's result. The body therefore
//! also leaves it, once, in the request's [`RefusalSlot`], which the
//! request's own task reads when the send has failed.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::StatusCode;
use passage_shared::body::{BodyError, FrameBody};
use passage_shared::error_body::ApiError;
use passage_shared::frame::FrameCodec;
use passage_shared::transport::BoxRecv;
use tokio::io::AsyncRead;
use tokio_util::codec::FramedRead;

use crate::request_model::MultipartError;

/// Why the relay refused a request body after it began to go upstream.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BodyRefusal {
    /// The body grew past the relay's limit, in bytes (413).
    #[error("the request body is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// A model-checked form broke its rules, e.g. named a second model (403).
    #[error("client '{client}': {error}")]
    Model {
        /// The client whose form it is.
        client: Arc<str>,
        /// What the form did.
        error: MultipartError,
    },
}

impl BodyRefusal {
    /// The answer the app gets for the refused body.
    pub fn api_error(&self) -> ApiError {
        match self {
            BodyRefusal::TooLarge { limit } => too_large(*limit),
            BodyRefusal::Model { .. } => {
                ApiError::new(StatusCode::FORBIDDEN, "model_not_allowed", self.to_string())
            }
        }
    }
}

/// The 413 for a body over `max` bytes.
pub fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request_too_large",
        format!(
            "the request body is larger than this relay accepts ({} MiB)",
            max / (1024 * 1024)
        ),
    )
}

/// Where a request's body leaves its refusal, the first one only.
#[derive(Debug, Clone, Default)]
pub struct RefusalSlot(Arc<OnceLock<BodyRefusal>>);

impl RefusalSlot {
    /// The body's refusal, if it refused itself.
    pub fn refusal(&self) -> Option<&BodyRefusal> {
        self.0.get()
    }
}

/// A check run on each body chunk read from the stream (not on a prefix
/// read before): a refusal aborts the body.
pub type Inspector = Box<dyn FnMut(&Bytes) -> Result<(), BodyRefusal> + Send>;

/// Something (a reservation of the relay's budget) kept only while the
/// body still holds its prefix.
pub type PrefixHold = Box<dyn Send>;

/// Why a request body did not reach its end.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// The app's side broke it: a failure, a reset, a stream that stopped.
    #[error(transparent)]
    Broken(#[from] BodyError),
    /// The relay refused it part-way.
    #[error(transparent)]
    Refused(BodyRefusal),
}

/// The app's body frames as sent upstream: a prefix already read comes
/// first, then the rest of the stream; bytes are counted, the size limit
/// kept and each chunk shown to the inspector, and a refusal is also left
/// in the request's [`RefusalSlot`].
pub struct RequestBody<R = BoxRecv> {
    frames: FrameBody<R>,
    /// Chunks read from the stream before the body went upstream.
    prefix: VecDeque<Bytes>,
    /// Dropped once the prefix has been handed out.
    prefix_hold: Option<PrefixHold>,
    /// No more chunks: the stream's `End` came, or the body failed.
    done: bool,
    /// Adds up the bytes of the chunks handed out, when set.
    counter: Option<Arc<AtomicU64>>,
    /// Bytes handed out so far.
    seen: u64,
    /// Most bytes the body may have.
    limit: Option<u64>,
    inspector: Option<Inspector>,
    refusals: Option<RefusalSlot>,
}

impl<R> std::fmt::Debug for RequestBody<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("seen", &self.seen)
            .field("limit", &self.limit)
            .field("refusals", &self.refusals)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> RequestBody<R> {
    /// The body read from `frames`, whose head has already been taken.
    pub fn new(frames: FramedRead<R, FrameCodec>) -> Self {
        RequestBody::resume(frames, Vec::new(), false)
    }

    /// A body whose first chunks, `prefix`, were already read from
    /// `frames` (and, if `ended`, its `End` too); they come first, then
    /// the rest.
    pub fn resume(frames: FramedRead<R, FrameCodec>, prefix: Vec<Bytes>, ended: bool) -> Self {
        RequestBody {
            frames: FrameBody::new(frames),
            prefix: prefix.into(),
            prefix_hold: None,
            done: ended,
            counter: None,
            seen: 0,
            limit: None,
            inspector: None,
            refusals: None,
        }
    }

    /// Keeps `hold` until the prefix has been handed out (or the body is
    /// dropped), then drops it.
    pub fn hold_until_prefix_sent(mut self, hold: PrefixHold) -> Self {
        self.prefix_hold = Some(hold);
        self
    }

    /// Adds the length of every chunk to `counter` (including one that
    /// crosses the limit).
    pub fn counting(mut self, counter: Arc<AtomicU64>) -> Self {
        self.counter = Some(counter);
        self
    }

    /// Refuses the body once it grows past `limit` bytes.
    pub fn limited(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Shows every chunk read from the stream from now on (not the prefix)
    /// to `inspector` before handing it out.
    pub fn inspect(mut self, inspector: Inspector) -> Self {
        self.inspector = Some(inspector);
        self
    }

    /// Leaves the body's refusals in `refusals`, for the request's task.
    pub fn reporting(mut self, refusals: RefusalSlot) -> Self {
        self.refusals = Some(refusals);
        self
    }

    /// Hands `data` out, unless it takes the body past its limit.
    fn chunk(&mut self, data: Bytes) -> Result<http_body::Frame<Bytes>, RequestBodyError> {
        self.seen += data.len() as u64;
        if let Some(counter) = &self.counter {
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        match self.limit {
            Some(limit) if self.seen > limit => Err(self.refuse(BodyRefusal::TooLarge { limit })),
            _ => Ok(http_body::Frame::data(data)),
        }
    }

    /// Ends the body with `refusal`, left in the slot too (the first only:
    /// a body ends at its first error).
    fn refuse(&mut self, refusal: BodyRefusal) -> RequestBodyError {
        self.done = true;
        self.prefix.clear();
        if let Some(slot) = &self.refusals {
            let _ = slot.0.set(refusal.clone());
        }
        RequestBodyError::Refused(refusal)
    }
}

impl<R: AsyncRead + Unpin> http_body::Body for RequestBody<R> {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, RequestBodyError>>> {
        if let Some(chunk) = self.prefix.pop_front() {
            return Poll::Ready(Some(self.chunk(chunk)));
        }
        // Asked for more: the prefix is out.
        self.prefix_hold = None;
        if self.done {
            return Poll::Ready(None);
        }
        let chunk = match ready!(self.frames.poll_chunk(cx)) {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                self.done = true;
                return Poll::Ready(Some(Err(e.into())));
            }
            None => {
                self.done = true;
                return Poll::Ready(None);
            }
        };
        let verdict = match &mut self.inspector {
            Some(inspector) => inspector(&chunk),
            None => Ok(()),
        };
        Poll::Ready(Some(match verdict {
            Ok(()) => self.chunk(chunk),
            Err(refusal) => Err(self.refuse(refusal)),
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use http_body::Body;
    use passage_shared::frame::{Frame, encode_frame};

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    fn wire(frames: &[Frame]) -> FramedRead<std::io::Cursor<Vec<u8>>, FrameCodec> {
        let mut wire = BytesMut::new();
        for frame in frames {
            encode_frame(frame, &mut wire).expect("encodes");
        }
        FramedRead::new(std::io::Cursor::new(wire.to_vec()), FrameCodec)
    }

    /// Polls `body` to its end: the chunks, then the error it ended with.
    fn drain<R: AsyncRead + Unpin>(
        mut body: RequestBody<R>,
    ) -> (Vec<Bytes>, Option<RequestBodyError>) {
        block_on(async {
            let mut chunks = Vec::new();
            loop {
                match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                    Some(Ok(frame)) => chunks.push(frame.into_data().expect("data")),
                    Some(Err(e)) => return (chunks, Some(e)),
                    None => return (chunks, None),
                }
            }
        })
    }

    #[test]
    fn a_body_past_its_limit_is_refused_and_the_refusal_kept() {
        let slot = RefusalSlot::default();
        let counted = Arc::new(AtomicU64::new(0));
        let frames = wire(&[
            Frame::Data(Bytes::from_static(b"12345")),
            Frame::Data(Bytes::from_static(b"678")),
            Frame::End,
        ]);
        let body = RequestBody::resume(frames, vec![Bytes::from_static(b"ab")], false)
            .counting(counted.clone())
            .limited(8)
            .reporting(slot.clone());
        let (chunks, error) = drain(body);
        assert_eq!(chunks, ["ab", "12345"]);
        assert!(matches!(
            error,
            Some(RequestBodyError::Refused(BodyRefusal::TooLarge {
                limit: 8
            }))
        ));
        assert!(matches!(
            slot.refusal(),
            Some(BodyRefusal::TooLarge { limit: 8 })
        ));
        // The chunk that crossed the limit counts too.
        assert_eq!(counted.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn the_inspector_sees_the_stream_not_the_prefix_and_may_refuse() {
        let slot = RefusalSlot::default();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let frames = wire(&[
            Frame::Data(Bytes::from_static(b"ok")),
            Frame::Data(Bytes::from_static(b"bad")),
            Frame::End,
        ]);
        let log = seen.clone();
        let body = RequestBody::resume(frames, vec![Bytes::from_static(b"prefix")], false)
            .inspect(Box::new(move |chunk: &Bytes| {
                log.lock().expect("log").push(chunk.clone());
                if chunk.as_ref() == b"bad" {
                    Err(BodyRefusal::TooLarge { limit: 0 })
                } else {
                    Ok(())
                }
            }))
            .reporting(slot.clone());
        let (chunks, error) = drain(body);
        assert_eq!(chunks, ["prefix", "ok"]);
        assert!(matches!(error, Some(RequestBodyError::Refused(_))));
        assert!(slot.refusal().is_some());
        assert_eq!(*seen.lock().expect("log"), ["ok", "bad"]);
    }

    #[test]
    fn an_ended_prefix_is_the_whole_body_and_a_broken_stream_an_error() {
        let ended = RequestBody::resume(wire(&[]), vec![Bytes::from_static(b"all")], true);
        let (chunks, error) = drain(ended);
        assert_eq!(chunks, ["all"]);
        assert!(error.is_none());
        let broken = RequestBody::new(wire(&[Frame::Data(Bytes::from_static(b"a"))]));
        let (chunks, error) = drain(broken);
        assert_eq!(chunks, ["a"]);
        assert!(matches!(
            error,
            Some(RequestBodyError::Broken(BodyError::Truncated))
        ));
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
        let mut body = RequestBody::resume(FramedRead::new(reader, FrameCodec), prefix, false)
            .hold_until_prefix_sent(Box::new(Flag(dropped.clone())));
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
}
