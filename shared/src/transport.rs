//! The narrow interface between request handling and the transport under it.
//!
//! Request handling — the client's `forward`, the relay's `stream` — sees
//! only a pair of stream halves: bytes out, bytes in, and the three
//! stream-level signals the protocol needs: *finish* (this direction is
//! complete), *reset* (abandon it; the peer sees an error, never a clean
//! end) and *stopped* (the peer no longer reads: the request was
//! cancelled). QUIC streams implement them here. A fallback transport for
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
    /// Resolves once the peer stops reading or the stream or its connection
    /// ends; request handling races its work against it to notice a
    /// cancellation while it has nothing to write.
    fn stopped(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
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

    fn stopped(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let stopped = quinn::SendStream::stopped(self);
        Box::pin(async move {
            let _ = stopped.await;
        })
    }
}

impl RecvHalf for quinn::RecvStream {
    fn stop(&mut self, code: u32) {
        let _ = quinn::RecvStream::stop(self, code.into());
    }
}
