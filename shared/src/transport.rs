//! The narrow interface between request handling and the transport under it.
//!
//! Request handling — the client's `forward`, the relay's `stream` — sees
//! only a pair of stream halves: bytes out, bytes in, and the three
//! stream-level signals the protocol needs: *finish* (this direction is
//! complete), *reset* (abandon it; the peer sees an error, never a clean
//! end) and *stopped* (the peer no longer reads: the request was
//! cancelled; or it acknowledged everything sent). QUIC streams implement
//! them here, and [`stream_fault`] is the one place that reads the
//! transport's errors. A fallback transport for
//! networks that block UDP (TLS over TCP with a stream multiplexer) would
//! implement the same two traits and plug into the client's tunnel and the
//! relay's listener without touching request handling.

use std::future::Future;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// The sending half of one request stream.
pub trait SendHalf: AsyncWrite + Send + Unpin + 'static {
    /// Ends this direction cleanly: everything written will be delivered.
    fn finish(&mut self);
    /// Abandons this direction with `code`; the peer sees a reset.
    fn reset(&mut self, code: u32);
    /// Resolves once the peer stops reading, acknowledges everything sent
    /// after [`SendHalf::finish`], or the connection ends. The relay races
    /// its work against it to notice a cancellation while it has nothing to
    /// write; the client uses it to learn that the relay has its request.
    fn stopped(&self) -> Pin<Box<dyn Future<Output = StreamEnd> + Send + 'static>>;
}

/// How the sending direction of a stream ended, as [`SendHalf::stopped`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Finished, and the peer acknowledged receipt of every byte.
    Acknowledged,
    /// The peer asked us to stop sending, with this code.
    Stopped(u64),
    /// The connection ended first.
    ConnectionLost,
}

/// What an I/O error from a stream half says about the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFault {
    /// The peer reset (receiving) or stopped (sending) the stream with this code.
    Reset(u64),
    /// The whole connection failed or was closed.
    ConnectionLost,
    /// Anything else.
    Other,
}

/// Classifies an error returned by a stream half's read or write.
pub fn stream_fault(error: &std::io::Error) -> StreamFault {
    let Some(inner) = error.get_ref() else {
        return StreamFault::Other;
    };
    if let Some(read) = inner.downcast_ref::<quinn::ReadError>() {
        return match read {
            quinn::ReadError::Reset(code) => StreamFault::Reset(code.into_inner()),
            quinn::ReadError::ConnectionLost(_) => StreamFault::ConnectionLost,
            _ => StreamFault::Other,
        };
    }
    if let Some(write) = inner.downcast_ref::<quinn::WriteError>() {
        return match write {
            quinn::WriteError::Stopped(code) => StreamFault::Reset(code.into_inner()),
            quinn::WriteError::ConnectionLost(_) => StreamFault::ConnectionLost,
            _ => StreamFault::Other,
        };
    }
    StreamFault::Other
}

/// The receiving half of one request stream.
pub trait RecvHalf: AsyncRead + Send + Unpin + 'static {
    /// Tells the peer to stop sending with `code`.
    fn stop(&mut self, code: u32);
}

/// A boxed sending half, as request handling holds it.
pub type BoxSend = Box<dyn SendHalf>;
/// A boxed receiving half, as request handling holds it.
pub type BoxRecv = Box<dyn RecvHalf>;

impl SendHalf for quinn::SendStream {
    fn finish(&mut self) {
        // Fails only if already finished or reset: nothing left to do then.
        let _ = quinn::SendStream::finish(self);
    }

    fn reset(&mut self, code: u32) {
        let _ = quinn::SendStream::reset(self, code.into());
    }

    fn stopped(&self) -> Pin<Box<dyn Future<Output = StreamEnd> + Send + 'static>> {
        let stopped = quinn::SendStream::stopped(self);
        Box::pin(async move {
            match stopped.await {
                Ok(None) => StreamEnd::Acknowledged,
                Ok(Some(code)) => StreamEnd::Stopped(code.into_inner()),
                Err(_) => StreamEnd::ConnectionLost,
            }
        })
    }
}

impl RecvHalf for quinn::RecvStream {
    fn stop(&mut self, code: u32) {
        let _ = quinn::RecvStream::stop(self, code.into());
    }
}
