//! How a stream of this transport fails: passage's reset codes carried as
//! HTTP/2 reasons, and the [`StreamError`] its halves report.

use std::io;

use h2::Reason;

use crate::frame::reset_code;
use crate::transport::StreamFault;

/// Offset of passage's own reset codes among HTTP/2 reasons (ASCII "PA"),
/// far from the codes HTTP/2 defines.
const PASSAGE_REASONS: u32 = 0x5041_0000;
/// Offset of HTTP/2's own reasons that have no passage meaning, among the
/// codes [`StreamFault::Reset`] reports, so they never read as passage's.
pub(super) const HTTP2_REASONS: u64 = 1 << 32;

/// The HTTP/2 reason that carries passage reset `code`.
pub fn reason_for(code: u32) -> Reason {
    match code {
        reset_code::CANCELLED => Reason::CANCEL,
        reset_code::PROTOCOL_ERROR => Reason::PROTOCOL_ERROR,
        // HTTP/2 defines REFUSED_STREAM just so: nothing was processed.
        reset_code::REFUSED => Reason::REFUSED_STREAM,
        other => Reason::from(PASSAGE_REASONS | (other & 0xffff)),
    }
}

/// The passage reset code an HTTP/2 reason carries (see [`reason_for`]).
pub fn code_for(reason: Reason) -> u64 {
    let raw = u32::from(reason);
    if reason == Reason::CANCEL {
        u64::from(reset_code::CANCELLED)
    } else if reason == Reason::PROTOCOL_ERROR {
        u64::from(reset_code::PROTOCOL_ERROR)
    } else if reason == Reason::REFUSED_STREAM {
        u64::from(reset_code::REFUSED)
    } else if raw & 0xffff_0000 == PASSAGE_REASONS {
        u64::from(raw & 0xffff)
    } else {
        HTTP2_REASONS | u64::from(raw)
    }
}

/// How a stream of this transport failed; wrapped in the `io::Error`s its
/// halves return, and read back by [`crate::transport::stream_fault`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    /// The stream was reset with this passage code.
    #[error("stream reset (code {0})")]
    Reset(u64),
    /// The connection ended.
    #[error("tunnel connection lost: {0}")]
    ConnectionLost(String),
    /// The relay answered the stream with something other than 200.
    #[error("the relay answered the stream with HTTP/2 status {0}")]
    Status(u16),
    /// Anything else HTTP/2 reported.
    #[error("HTTP/2: {0}")]
    Other(String),
}

impl StreamError {
    pub(super) fn from_h2(error: h2::Error) -> StreamError {
        if error.is_reset() {
            StreamError::Reset(error.reason().map_or(HTTP2_REASONS, code_for))
        } else if error.is_io() || error.is_go_away() || error.reason().is_some() {
            StreamError::ConnectionLost(error.to_string())
        } else {
            StreamError::Other(error.to_string())
        }
    }

    pub(super) fn into_io(self) -> io::Error {
        let kind = match self {
            StreamError::ConnectionLost(_) => io::ErrorKind::ConnectionAborted,
            StreamError::Reset(_) => io::ErrorKind::ConnectionReset,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

/// What an error of this transport says about the stream, if it is one.
pub(in crate::transport) fn fault(
    inner: &(dyn std::error::Error + Send + Sync + 'static),
) -> Option<StreamFault> {
    inner
        .downcast_ref::<StreamError>()
        .map(|error| match error {
            StreamError::Reset(code) => StreamFault::Reset(*code),
            StreamError::ConnectionLost(_) => StreamFault::ConnectionLost,
            StreamError::Status(_) | StreamError::Other(_) => StreamFault::Other,
        })
}
