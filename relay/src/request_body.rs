//! A request body on its way upstream: the app's frames, with the relay's
//! own refusals of it part-way (a body past the size limit, a form that
//! names a second model) typed as [`BodyRefusal`] and kept for the answer.
//!
//! hyper polls the body in a task of its own and, over HTTP/2, only logs a
//! body's error (the upstream gets a reset, the send a reset stream), so a
//! refusal cannot come back through the send's result. The body therefore
//! also leaves it, once, in the request's [`RefusalSlot`], which the
//! request's own task reads when the send has failed.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::StatusCode;
use passage_shared::body::{BodyError, FrameBody};
use passage_shared::error_body::ApiError;
use passage_shared::transport::BoxRecv;

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

/// The app's body frames as sent upstream; a refusal among its errors is
/// also left in its [`RefusalSlot`].
pub struct RequestBody {
    frames: FrameBody<BoxRecv>,
    refusals: Option<RefusalSlot>,
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("refusals", &self.refusals)
            .finish_non_exhaustive()
    }
}

impl RequestBody {
    /// A body that cannot refuse itself (no limit, no inspector).
    pub fn new(frames: FrameBody<BoxRecv>) -> Self {
        RequestBody {
            frames,
            refusals: None,
        }
    }

    /// A body whose refusals (past its limit, or a [`BodyRefusal`] from its
    /// inspector) are left in `refusals`.
    pub fn reporting(frames: FrameBody<BoxRecv>, refusals: RefusalSlot) -> Self {
        RequestBody {
            frames,
            refusals: Some(refusals),
        }
    }

    /// Leaves the refusal `error` stands for, if it is one, in the slot.
    fn note(&self, error: &BodyError) {
        let Some(slot) = &self.refusals else {
            return;
        };
        let refusal = match error {
            BodyError::TooLarge { limit } => BodyRefusal::TooLarge { limit: *limit },
            BodyError::Refused(why) => match why.downcast_ref::<BodyRefusal>() {
                Some(refusal) => refusal.clone(),
                None => return,
            },
            _ => return,
        };
        // Only the first refusal counts; a body ends at its first error.
        let _ = slot.0.set(refusal);
    }
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.frames).poll_frame(cx);
        if let Poll::Ready(Some(Err(error))) = &polled {
            self.note(error);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.frames.size_hint()
    }
}
