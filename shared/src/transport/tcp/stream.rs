//! One multiplexed request stream: its sending half ([`H2Send`]) and its
//! receiving half ([`H2Recv`]) over an HTTP/2 stream, with the flow control
//! and reset signals the transport interface asks for.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::Reason;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::connection::{ConnectionState, UNKNOWN};
use super::stream_error::{StreamError, code_for, reason_for};
use crate::transport::{RecvHalf, SendHalf, StreamEnd};

/// One HTTP/2 stream's sending side, shared by its two halves: the
/// receiving half resets through it ([`RecvHalf::stop`]).
pub(super) type SharedSend = Arc<Mutex<h2::SendStream<Bytes>>>;

pub(super) fn lock(stream: &SharedSend) -> MutexGuard<'_, h2::SendStream<Bytes>> {
    stream.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a stream can send no more: its reset reason if the peer reset it.
fn closed_error(stream: &mut h2::SendStream<Bytes>, cx: &mut Context<'_>) -> StreamError {
    match stream.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => StreamError::Reset(code_for(reason)),
        Poll::Ready(Err(e)) => StreamError::from_h2(e),
        Poll::Pending => StreamError::Other("the stream is closed for sending".to_owned()),
    }
}

/// The sending half of one request stream.
pub struct H2Send {
    pub(super) stream: SharedSend,
    /// Client side: how to tell whether the relay can have the request.
    delivery: Option<Delivery>,
    /// Bytes this stream may still write without waiting for capacity
    /// (see [`UNRESERVED_BUDGET`]).
    unreserved: usize,
    /// END_STREAM is sent: finishing again does nothing.
    finished: bool,
}

/// The first bytes of a stream, up to this many, are handed to h2 without
/// waiting for send capacity, which only the connection's task assigns:
/// each wait costs a flush of its own, so a small request went out as a
/// segment each for head, data and end, and a small answer likewise (see
/// BENCHMARKS.md, section 7 (Per-request cost), the note on the TCP
/// transport). The peer's window at the
/// start of a stream is far larger, so h2 sends them at once; past the
/// budget every write waits for capacity, which is the backpressure.
const UNRESERVED_BUDGET: usize = 64 * 1024;

/// What tells a client whether the relay can have a request, once the
/// connection is gone: HTTP/2 acknowledges nothing, but the relay's head
/// for the stream does, and so does the relay's kernel once it has
/// acknowledged a byte sent after the stream was opened.
#[derive(Clone)]
pub(super) struct Delivery {
    /// Set once the relay's head for this stream arrived.
    pub(super) head_arrived: Arc<AtomicBool>,
    /// Bytes this end had handed to the kernel when the stream was opened:
    /// every byte of the request comes after them.
    pub(super) sent_before: u64,
    pub(super) state: Arc<ConnectionState>,
}

impl Delivery {
    /// Whether the relay may have the request: its head arrived, or its
    /// kernel acknowledged a byte sent since the stream opened (or the
    /// kernel cannot say: then only the head counts).
    fn relay_may_have_it(&self) -> bool {
        if self.head_arrived.load(Ordering::Acquire) {
            return true;
        }
        match self.state.acked_at_end.load(Ordering::Acquire) {
            UNKNOWN => false,
            // The kernel counts the SYN among the bytes acknowledged.
            acked => acked.saturating_sub(1) > self.sent_before,
        }
    }
}

impl H2Send {
    pub(super) fn new(stream: SharedSend, delivery: Option<Delivery>) -> H2Send {
        H2Send {
            stream,
            delivery,
            unreserved: UNRESERVED_BUDGET,
            finished: false,
        }
    }

    /// Hands `data` to h2 at once, out of the stream's unreserved budget
    /// (see [`UNRESERVED_BUDGET`]); `None` when it does not fit.
    fn send_unreserved(&mut self, data: &[u8], end_of_stream: bool) -> Option<io::Result<()>> {
        self.unreserved = self.unreserved.checked_sub(data.len())?;
        let mut stream = lock(&self.stream);
        let sent = stream.send_data(Bytes::copy_from_slice(data), end_of_stream);
        Some(sent.map_err(|_| {
            // Only to read a reset that already came; nothing waits on it.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            closed_error(&mut stream, &mut cx).into_io()
        }))
    }
}

impl AsyncWrite for H2Send {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if let Some(sent) = self.send_unreserved(buf, false) {
            return Poll::Ready(sent.map(|()| buf.len()));
        }
        let mut stream = lock(&self.stream);
        // Send only what the peer's window and h2's send buffer have room
        // for: the rest waits here, which is the backpressure.
        stream.reserve_capacity(buf.len());
        loop {
            let capacity = stream.capacity();
            if capacity > 0 {
                let n = capacity.min(buf.len());
                return Poll::Ready(
                    match stream.send_data(Bytes::copy_from_slice(&buf[..n]), false) {
                        Ok(()) => Ok(n),
                        Err(_) => Err(closed_error(&mut stream, cx).into_io()),
                    },
                );
            }
            match ready!(stream.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(StreamError::from_h2(e).into_io())),
                None => return Poll::Ready(Err(closed_error(&mut stream, cx).into_io())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes whatever the stream has queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        SendHalf::finish(&mut *self);
        Poll::Ready(Ok(()))
    }
}

impl SendHalf for H2Send {
    fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        // Fails only if already reset: nothing left to do then.
        let _ = lock(&self.stream).send_data(Bytes::new(), true);
    }

    fn write_last_now(&mut self, data: &[u8]) -> Option<io::Result<()>> {
        if self.finished {
            return None;
        }
        let sent = self.send_unreserved(data, true)?;
        self.finished = true;
        Some(sent)
    }

    fn reset(&mut self, code: u32) {
        lock(&self.stream).send_reset(reason_for(code));
    }

    fn stopped(&self) -> Pin<Box<dyn Future<Output = StreamEnd> + Send + 'static>> {
        let stream = self.stream.clone();
        let delivery = self.delivery.clone();
        Box::pin(std::future::poll_fn(move |cx| {
            let outcome = match ready!(lock(&stream).poll_reset(cx)) {
                Ok(reason) => StreamError::Reset(code_for(reason)),
                Err(e) => StreamError::from_h2(e),
            };
            Poll::Ready(match outcome {
                StreamError::Reset(code) => StreamEnd::Stopped(code),
                _ if delivery.as_ref().is_some_and(Delivery::relay_may_have_it) => {
                    StreamEnd::Acknowledged
                }
                _ => StreamEnd::ConnectionLost,
            })
        }))
    }
}

/// Where the receiving half of a stream stands.
pub(super) enum RecvState {
    /// Client side: waiting for the relay's head for this stream.
    Waiting(h2::client::ResponseFuture),
    /// Reading DATA frames.
    Open(h2::RecvStream),
    /// The head was refused; nothing more to read.
    Failed(StreamError),
}

/// The receiving half of one request stream.
pub struct H2Recv {
    pub(super) state: RecvState,
    /// Bytes of the last DATA frame not yet read.
    pub(super) pending: Bytes,
    pub(super) stream: SharedSend,
    /// Client side: set once the relay's head for this stream arrived.
    pub(super) head_arrived: Option<Arc<AtomicBool>>,
    /// Client side: dropping this half before the end cancels the stream
    /// (as dropping a QUIC receive stream stops the sender).
    pub(super) cancel_on_drop: bool,
    pub(super) ended: bool,
}

impl AsyncRead for H2Recv {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                if let RecvState::Open(body) = &mut this.state {
                    // Open the window only for what the reader took.
                    let _ = body.flow_control().release_capacity(n);
                }
                return Poll::Ready(Ok(()));
            }
            match &mut this.state {
                RecvState::Waiting(response) => match ready!(Pin::new(response).poll(cx)) {
                    Ok(response) if response.status() == http::StatusCode::OK => {
                        if let Some(arrived) = &this.head_arrived {
                            arrived.store(true, Ordering::Release);
                        }
                        this.state = RecvState::Open(response.into_body());
                    }
                    Ok(response) => {
                        this.state =
                            RecvState::Failed(StreamError::Status(response.status().as_u16()));
                    }
                    Err(e) => this.state = RecvState::Failed(StreamError::from_h2(e)),
                },
                RecvState::Open(body) => match ready!(body.poll_data(cx)) {
                    Some(Ok(data)) => this.pending = data,
                    Some(Err(e)) => return Poll::Ready(Err(StreamError::from_h2(e).into_io())),
                    None => {
                        this.ended = true;
                        return Poll::Ready(Ok(()));
                    }
                },
                RecvState::Failed(error) => return Poll::Ready(Err(error.clone().into_io())),
            }
        }
    }
}

impl RecvHalf for H2Recv {
    fn stop(&mut self, code: u32) {
        lock(&self.stream).send_reset(reason_for(code));
    }
}

impl Drop for H2Recv {
    fn drop(&mut self) {
        // A response whose end has arrived, unread, needs no cancelling.
        let arrived_whole = matches!(&self.state, RecvState::Open(body) if body.is_end_stream());
        if self.cancel_on_drop && !self.ended && !arrived_whole {
            lock(&self.stream).send_reset(Reason::CANCEL);
        }
    }
}
