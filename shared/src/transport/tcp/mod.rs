//! The fallback transport: TLS 1.3 over TCP, requests multiplexed with
//! HTTP/2 (the `h2` crate), for networks that block or throttle UDP.
//!
//! It keeps QUIC's identities and rules: the same CA, client certificates,
//! revocation list and refusals (see [`crate::tls`]), under its own ALPN
//! ([`crate::frame::ALPN_TCP`]). HTTP/2 stands in for QUIC's streams:
//!
//! - **Control.** The client's first stream, `POST /control`, carries the
//!   relay's `Welcome` and, later, its `GoAway` frames (QUIC sends each on a
//!   unidirectional stream of its own).
//! - **Requests.** Every request gets its own stream, `POST /stream`, whose
//!   DATA frames carry the same passage frames as a QUIC stream, so
//!   request handling is the same code on both transports. The relay
//!   answers each new stream with an HTTP/2 `200` head at once, before its
//!   handler reads anything: that head is the client's proof that the relay
//!   has the request (QUIC's acknowledgement, see the client's `forward`).
//! - **Reset and stop.** RST_STREAM, with passage's codes mapped to HTTP/2
//!   reasons ([`reason_for`]). HTTP/2 cannot close one direction alone, so
//!   a client that stops reading a response resets the whole stream.
//! - **Flow control.** HTTP/2 windows sized as QUIC's (per stream and 2.5×
//!   that per connection), released as the reader consumes the bytes, so
//!   a slow reader holds back the sender.
//! - **Liveness.** An HTTP/2 PING every keep-alive interval keeps packets
//!   flowing both ways; while its answer is late, an empty DATA frame on
//!   the control stream goes out each interval instead, repeating our
//!   acknowledgements (see [`keep_alive`]). What proves the peer alive is any TCP segment
//!   carrying data from it, as the kernel counts them (`TCP_INFO`), in
//!   order or not: on a lossy link a lost segment holds back every byte
//!   behind it, and the PING's answer with them, while later segments
//!   still arrive. Bare acknowledgements count only while more than a few
//!   KiB of ours wait unacknowledged (a frozen peer's kernel still sends
//!   them, but on a slow path our PING waits behind that queue, and a peer
//!   with nothing to say can answer it only once it arrives). Nothing from
//!   the peer for the idle timeout closes the connection.
//!   `TCP_THIN_LINEAR_TIMEOUTS` keeps a thin stream (an SSE response)
//!   retransmitting every RTO instead of backing off exponentially, so
//!   heavy loss does not stall it for seconds; `TCP_RTO_MAX_MS` caps any
//!   backoff (see [`rto_max`]); `TCP_USER_TIMEOUT` is only
//!   a backstop (3× the idle timeout); `TCP_NOTSENT_LOWAT` keeps the
//!   kernel's unsent queue short so a PING never waits behind megabytes
//!   of body.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use h2::Reason;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{Congestion, Ended, RecvHalf, SendHalf, StreamEnd, StreamFault, TransportTuning};
use crate::frame::{Frame, encode_frame, reset_code};

/// Path of the request streams.
const STREAM_PATH: &str = "/stream";
/// Path of the control stream (the client's first).
const CONTROL_PATH: &str = "/control";
/// Largest HTTP/2 DATA frame either end accepts.
const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Largest header block the relay reads: the heads of this protocol are a
/// few dozen bytes (the app's headers travel inside passage frames).
const MAX_HEADER_LIST: u32 = 4 * 1024;
/// Unsent bytes the kernel may queue per socket (`TCP_NOTSENT_LOWAT`).
const NOTSENT_LOWAT: u32 = 128 * 1024;
/// Streams the client may reset before the relay has accepted them (HTTP/2
/// "rapid reset" guard); an app that cancels a burst of requests is normal.
///
/// h2's other guard, a cap on the resets it sends itself in answer to
/// frames for streams already closed, counts over the connection's whole
/// life; on a tunnel that carries every request for days it would end the
/// connection sooner or later (a cancelled stream whose last frames were
/// in flight is one such reset), so both ends turn it off. Both peers are
/// authenticated by the private CA; the relay's per-connection stream
/// limit still bounds what a client can open.
const PENDING_ACCEPT_RESETS: usize = 256;
/// Longest wait for the client's control stream after the TLS handshake.
const CONTROL_WAIT: Duration = Duration::from_secs(10);

/// Offset of passage's own reset codes among HTTP/2 reasons (ASCII "PA"),
/// far from the codes HTTP/2 defines.
const PASSAGE_REASONS: u32 = 0x5041_0000;
/// Offset of HTTP/2's own reasons that have no passage meaning, among the
/// codes [`StreamFault::Reset`] reports, so they never read as passage's.
const HTTP2_REASONS: u64 = 1 << 32;

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
/// halves return, and read back by [`super::stream_fault`].
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
    fn from_h2(error: h2::Error) -> StreamError {
        if error.is_reset() {
            StreamError::Reset(error.reason().map_or(HTTP2_REASONS, code_for))
        } else if error.is_io() || error.is_go_away() || error.reason().is_some() {
            StreamError::ConnectionLost(error.to_string())
        } else {
            StreamError::Other(error.to_string())
        }
    }

    fn into_io(self) -> io::Error {
        let kind = match self {
            StreamError::ConnectionLost(_) => io::ErrorKind::ConnectionAborted,
            StreamError::Reset(_) => io::ErrorKind::ConnectionReset,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

/// What an error of this transport says about the stream, if it is one.
pub(super) fn fault(
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

/// One HTTP/2 stream's sending side, shared by its two halves: the
/// receiving half resets through it ([`RecvHalf::stop`]).
type SharedSend = Arc<Mutex<h2::SendStream<Bytes>>>;

fn lock(stream: &SharedSend) -> MutexGuard<'_, h2::SendStream<Bytes>> {
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
    stream: SharedSend,
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
/// each wait costs a flush of its own, so a small request went out as
/// three segments (head, data, end) and a small answer as three too
/// (measured with `scripts/request_cost.py`). The peer's window at the
/// start of a stream is far larger, so h2 sends them at once; past the
/// budget every write waits for capacity, which is the backpressure.
const UNRESERVED_BUDGET: usize = 64 * 1024;

/// What tells a client whether the relay can have a request, once the
/// connection is gone: HTTP/2 acknowledges nothing, but the relay's head
/// for the stream does, and so does the relay's kernel once it has
/// acknowledged a byte sent after the stream was opened.
#[derive(Clone)]
struct Delivery {
    /// Set once the relay's head for this stream arrived.
    head_arrived: Arc<AtomicBool>,
    /// Bytes this end had handed to the kernel when the stream was opened:
    /// every byte of the request comes after them.
    sent_before: u64,
    state: Arc<ConnectionState>,
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
    fn new(stream: SharedSend, delivery: Option<Delivery>) -> H2Send {
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
enum RecvState {
    /// Client side: waiting for the relay's head for this stream.
    Waiting(h2::client::ResponseFuture),
    /// Reading DATA frames.
    Open(h2::RecvStream),
    /// The head was refused; nothing more to read.
    Failed(StreamError),
}

/// The receiving half of one request stream.
pub struct H2Recv {
    state: RecvState,
    /// Bytes of the last DATA frame not yet read.
    pending: Bytes,
    stream: SharedSend,
    /// Client side: set once the relay's head for this stream arrived.
    head_arrived: Option<Arc<AtomicBool>>,
    /// Client side: dropping this half before the end cancels the stream
    /// (as dropping a QUIC receive stream stops the sender).
    cancel_on_drop: bool,
    ended: bool,
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

/// Bytes through one tunnel socket, counted below TLS.
#[derive(Debug, Default)]
struct ByteCounts {
    /// Received from the peer (a sign of life where the kernel's counters
    /// cannot be read).
    received: AtomicU64,
    /// Handed to the kernel to send: compared with what the peer's kernel
    /// acknowledged, it tells whether a request can have reached the relay.
    sent: AtomicU64,
}

/// A TCP socket that counts the bytes through it (see [`ByteCounts`]).
pub struct CountedTcp {
    inner: TcpStream,
    counts: Arc<ByteCounts>,
}

impl AsyncRead for CountedTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        let read = (buf.filled().len() - before) as u64;
        self.counts.received.fetch_add(read, Ordering::Relaxed);
        Poll::Ready(result)
    }
}

impl CountedTcp {
    fn new(inner: TcpStream) -> (CountedTcp, Arc<ByteCounts>) {
        let counts = Arc::new(ByteCounts::default());
        (
            CountedTcp {
                inner,
                counts: counts.clone(),
            },
            counts,
        )
    }

    fn count_sent(&self, written: &io::Result<usize>) {
        if let Ok(n) = written {
            self.counts.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

impl AsyncWrite for CountedTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        self.count_sent(&written);
        Poll::Ready(written)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs));
        self.count_sent(&written);
        Poll::Ready(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Socket options for a tunnel connection, best effort: a kernel without
/// one of them still carries the tunnel.
fn tune_socket(tcp: &TcpStream, tuning: &TransportTuning) {
    let _ = tcp.set_nodelay(true);
    let socket = socket2::SockRef::from(tcp);
    let _ = socket.set_tcp_user_timeout(Some(tuning.idle_timeout * 3));
    let _ = socket.set_tcp_thin_linear_timeouts(true);
    let _ = socket.set_tcp_notsent_lowat(NOTSENT_LOWAT);
    if tuning.congestion == Congestion::Bbr {
        // Only where the kernel has BBR; otherwise its default (CUBIC) stays.
        let _ = socket.set_tcp_congestion(b"bbr");
    }
    set_rto_max(tcp, rto_max(tuning));
}

/// The longest retransmission timeout a tunnel socket backs off to: a fifth
/// of the idle timeout (1 s by default; the kernel takes nothing below
/// 1 s). A segment lost twice in a row then still leaves room for a third
/// try within the client's silence limit (60% of the idle timeout),
/// where the kernel's own cap (120 s) would let two losses keep the peer
/// silent past it.
fn rto_max(tuning: &TransportTuning) -> Duration {
    (tuning.idle_timeout / 5).max(Duration::from_secs(1))
}

/// `TCP_RTO_MAX_MS` (Linux 6.15 and later; the libc crate has no name for
/// it yet); older kernels refuse it and keep their cap.
#[cfg(target_os = "linux")]
fn set_rto_max(tcp: &TcpStream, max: Duration) {
    use std::os::fd::AsRawFd;
    const TCP_RTO_MAX_MS: libc::c_int = 44;
    let millis = libc::c_int::try_from(max.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: passes a plain int of the size given; the descriptor is open
    // (borrowed from `tcp`).
    let _ = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_RTO_MAX_MS,
            (&millis as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

#[cfg(not(target_os = "linux"))]
fn set_rto_max(_tcp: &TcpStream, _max: Duration) {}

/// State both ends keep per connection: liveness and how it ended.
#[derive(Debug)]
struct ConnectionState {
    remote: SocketAddr,
    /// Bytes through the socket.
    counts: Arc<ByteCounts>,
    /// A second handle on the socket, to read the kernel's counters, and
    /// what they said last; the handle is given up when the connection
    /// ends, so it never keeps a closed connection's socket open.
    socket: Mutex<SocketWatch>,
    /// Bytes the peer's kernel had acknowledged when the connection ended
    /// ([`UNKNOWN`] until then, or where the kernel does not say).
    acked_at_end: AtomicU64,
    /// Round-trip time of the last keep-alive, in microseconds.
    rtt_micros: AtomicU64,
    /// Cancelled when the connection has ended or must end now.
    closed: CancellationToken,
    reason: Mutex<Option<String>>,
}

impl ConnectionState {
    fn new(
        remote: SocketAddr,
        counts: Arc<ByteCounts>,
        socket: Option<std::os::fd::OwnedFd>,
    ) -> Arc<ConnectionState> {
        Arc::new(ConnectionState {
            remote,
            counts,
            socket: Mutex::new(SocketWatch {
                handle: socket,
                acked: 0,
                acked_while_queued: 0,
            }),
            acked_at_end: AtomicU64::new(UNKNOWN),
            rtt_micros: AtomicU64::new(0),
            closed: CancellationToken::new(),
            reason: Mutex::new(None),
        })
    }

    /// Ends the connection, keeping the first reason given.
    fn close(&self, reason: String) {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(reason);
        let socket = self
            .socket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .handle
            .take();
        // Read before the streams learn of the end (see `H2Send::stopped`).
        if let Some(counters) = socket.as_ref().and_then(kernel_counters) {
            self.acked_at_end
                .store(counters.bytes_acked, Ordering::Release);
        }
        self.closed.cancel();
    }

    /// A count that grows with every sign that the peer is alive: a TCP
    /// segment with data from it, as the kernel counts them (out of order
    /// included), or its kernel acknowledging more of a queue of ours
    /// longer than [`QUEUE_AHEAD_OF_PING`]. The second matters on a slow
    /// path: the peer cannot answer our PING before the PING reaches it,
    /// and a peer with nothing to say sends only acknowledgements
    /// meanwhile. A short queue (PINGs and window updates alone) does not
    /// count, so a frozen peer, whose kernel still acknowledges, is found
    /// silent once our PING is in. Where the kernel does not say, the
    /// bytes read.
    fn heard(&self) -> u64 {
        let mut watch = self.socket.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(counters) = watch.handle.as_ref().and_then(kernel_counters) else {
            return self.counts.received.load(Ordering::Relaxed);
        };
        if counters.bytes_acked != watch.acked {
            watch.acked = counters.bytes_acked;
            // The kernel counts the SYN among the bytes acknowledged.
            let queued = self
                .counts
                .sent
                .load(Ordering::Relaxed)
                .saturating_sub(counters.bytes_acked.saturating_sub(1));
            if queued > QUEUE_AHEAD_OF_PING {
                watch.acked_while_queued += 1;
            }
        }
        counters.data_segments_in + watch.acked_while_queued
    }

    fn reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Pings the peer every keep-alive interval (keeping packets flowing and
/// measuring the RTT), and closes the connection once nothing at all has
/// arrived from the peer for the idle timeout. While a PING's answer is a
/// whole interval late, an empty DATA frame on the control stream
/// (`heartbeat`, which the peer discards) goes out each interval instead:
/// every segment repeats our acknowledgement, so a lost one does not
/// leave the peer waiting out a retransmission timeout (a second or more
/// after repeated losses), with our PING's answer stuck behind it and
/// this end silent.
async fn keep_alive(
    mut ping_pong: h2::PingPong,
    heartbeat: std::sync::Weak<Mutex<h2::SendStream<Bytes>>>,
    state: Arc<ConnectionState>,
    tuning: TransportTuning,
) {
    let pinger = async {
        loop {
            tokio::time::sleep(tuning.keep_alive).await;
            let sent = Instant::now();
            let pong = ping_pong.ping(h2::Ping::opaque());
            tokio::pin!(pong);
            loop {
                tokio::select! {
                    answered = &mut pong => match answered {
                        Ok(_) => {
                            state
                                .rtt_micros
                                .store(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
                            break;
                        }
                        // The connection has ended; its task records why.
                        Err(_) => return,
                    },
                    () = tokio::time::sleep(tuning.keep_alive) => {
                        // Held weakly: a connection is over once its
                        // owner lets go of the control stream. A stream
                        // that has ended cannot carry it; the connection
                        // is then ending too.
                        if let Some(control) = heartbeat.upgrade() {
                            let _ = lock(&control).send_data(Bytes::new(), false);
                        }
                    }
                }
            }
        }
    };
    let watchdog = async {
        let mut heard = state.heard();
        let mut heard_at = Instant::now();
        loop {
            tokio::time::sleep(tuning.keep_alive.min(Duration::from_millis(250))).await;
            let now = state.heard();
            if now != heard {
                heard = now;
                heard_at = Instant::now();
            } else if heard_at.elapsed() >= tuning.idle_timeout {
                state.close(format!(
                    "nothing heard from the peer for {:?}",
                    tuning.idle_timeout
                ));
                return;
            }
        }
    };
    tokio::select! {
        _ = state.closed.cancelled() => {}
        () = pinger => {}
        () = watchdog => {}
    }
}

/// The counter handle on a connection's socket and what it last said
/// (see [`ConnectionState::heard`]).
#[derive(Debug)]
struct SocketWatch {
    handle: Option<std::os::fd::OwnedFd>,
    /// `tcpi_bytes_acked` at the last look.
    acked: u64,
    /// Looks at which the acknowledged bytes had grown while more than
    /// [`QUEUE_AHEAD_OF_PING`] of ours were still unacknowledged.
    acked_while_queued: u64,
}

/// Unacknowledged bytes above which a PING of ours is taken to wait behind
/// data: control frames alone (a PING is 39 bytes in its TLS record, a
/// window update 35) never queue this much.
const QUEUE_AHEAD_OF_PING: u64 = 4096;

/// No figure: the connection has not ended, or the kernel does not say.
const UNKNOWN: u64 = u64::MAX;

/// What the kernel counts for a TCP socket (`TCP_INFO`).
#[derive(Debug, Clone, Copy)]
struct KernelCounters {
    /// Segments with data received, in order or not (`tcpi_data_segs_in`).
    /// Pure acknowledgements do not count: a frozen peer's kernel still
    /// acknowledges.
    data_segments_in: u64,
    /// Bytes sent that the peer acknowledged (`tcpi_bytes_acked`).
    bytes_acked: u64,
    /// Segments sent, retransmissions included (`tcpi_segs_out`).
    segments_out: u64,
    /// Segments retransmitted over the connection's life (`tcpi_total_retrans`).
    retransmitted: u64,
}

/// The kernel's counters for `socket`, if it says.
#[cfg(target_os = "linux")]
fn kernel_counters(socket: &std::os::fd::OwnedFd) -> Option<KernelCounters> {
    use std::os::fd::AsRawFd;
    // SAFETY: `info` is a plain C struct the kernel fills up to `len`
    // bytes; `len` starts at its size, and the descriptor is open (owned).
    let (result, info) = unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let result = libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (result, info)
    };
    (result == 0).then_some(KernelCounters {
        data_segments_in: u64::from(info.tcpi_data_segs_in),
        bytes_acked: info.tcpi_bytes_acked,
        segments_out: u64::from(info.tcpi_segs_out),
        retransmitted: u64::from(info.tcpi_total_retrans),
    })
}

/// Elsewhere the bytes read stand in (see [`ConnectionState::heard`]).
#[cfg(not(target_os = "linux"))]
fn kernel_counters(_socket: &std::os::fd::OwnedFd) -> Option<KernelCounters> {
    None
}

/// A second handle on `tcp` for reading its kernel counters.
fn counter_handle(tcp: &TcpStream) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    tcp.as_fd().try_clone_to_owned().ok()
}

/// HTTP/2 flow-control windows from the tuning: per stream, and 2.5× that
/// per connection, as on QUIC.
fn windows(tuning: &TransportTuning) -> (u32, u32) {
    let stream = tuning.stream_window.min(i32::MAX as u32);
    let connection = (u64::from(stream) * 5 / 2).min(i32::MAX as u64) as u32;
    (stream, connection)
}

/// Why a connection to a relay could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connection failed.
    #[error("TCP: {0}")]
    Tcp(io::Error),
    /// The server name is not a valid TLS name.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    /// The TLS handshake failed.
    #[error("TLS: {0}")]
    Tls(io::Error),
    /// The HTTP/2 handshake or the control stream failed.
    #[error("HTTP/2: {0}")]
    Http2(StreamError),
}

/// The client's end of one TCP tunnel connection; cheap to clone.
#[derive(Clone)]
pub struct ClientConnection {
    send_request: h2::client::SendRequest<Bytes>,
    state: Arc<ConnectionState>,
    stream_uri: http::Uri,
}

impl std::fmt::Debug for ClientConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConnection")
            .field("remote", &self.state.remote)
            .finish_non_exhaustive()
    }
}

/// The client's control stream: the relay's welcome and go-away arrive on
/// `recv`; `send` stays open while the connection lives.
pub struct ControlStream {
    /// The relay's control frames.
    pub recv: H2Recv,
    /// The client's side, open for the connection's life.
    pub send: H2Send,
}

impl ClientConnection {
    /// Connects to `addr`, verifies the relay as `server_name` with `tls`
    /// (whose ALPN must be [`crate::frame::ALPN_TCP`]), sets up HTTP/2 and
    /// opens the control stream. The relay's welcome is the caller's to read.
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
        tuning: TransportTuning,
    ) -> Result<(ClientConnection, ControlStream), ConnectError> {
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| ConnectError::ServerName(server_name.to_owned()))?;
        let started = Instant::now();
        let tcp = TcpStream::connect(addr).await.map_err(ConnectError::Tcp)?;
        // The TCP handshake took one round trip: the first RTT estimate,
        // until the first keep-alive measures it again.
        let first_rtt = started.elapsed();
        tune_socket(&tcp, &tuning);
        let counters = counter_handle(&tcp);
        let (io, counts) = CountedTcp::new(tcp);
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(name, io)
            .await
            .map_err(ConnectError::Tls)?;
        let (stream_window, connection_window) = windows(&tuning);
        let (send_request, mut connection) = h2::client::Builder::new()
            .initial_window_size(stream_window)
            .initial_connection_window_size(connection_window)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_local_error_reset_streams(None)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| ConnectError::Http2(StreamError::from_h2(e)))?;
        let state = ConnectionState::new(addr, counts, counters);
        state
            .rtt_micros
            .store(first_rtt.as_micros().max(1) as u64, Ordering::Relaxed);
        let ping_pong = connection.ping_pong();
        let driver_state = state.clone();
        tokio::spawn(async move {
            let reason = tokio::select! {
                ended = &mut connection => match ended {
                    Ok(()) => "closed by the relay".to_owned(),
                    Err(e) => e.to_string(),
                },
                _ = driver_state.closed.cancelled() => String::new(),
            };
            driver_state.close(reason);
            // Dropping the connection fails every stream still open on it.
        });
        let authority = format!("{server_name}:{}", addr.port());
        let uri = |path: &str| {
            http::Uri::builder()
                .scheme("https")
                .authority(authority.as_str())
                .path_and_query(path)
                .build()
        };
        let (Ok(stream_uri), Ok(control_uri)) = (uri(STREAM_PATH), uri(CONTROL_PATH)) else {
            return Err(ConnectError::ServerName(server_name.to_owned()));
        };
        let connection = ClientConnection {
            send_request,
            state,
            stream_uri,
        };
        let (send, recv) = connection
            .open(control_uri)
            .await
            .map_err(ConnectError::Http2)?;
        if let Some(ping_pong) = ping_pong {
            let heartbeat = Arc::downgrade(&send.stream);
            tokio::spawn(keep_alive(
                ping_pong,
                heartbeat,
                connection.state.clone(),
                tuning,
            ));
        }
        Ok((connection, ControlStream { recv, send }))
    }

    /// Opens a request stream, waiting while the relay's stream limit is reached.
    pub async fn open_stream(&self) -> Result<(H2Send, H2Recv), StreamError> {
        self.open(self.stream_uri.clone()).await
    }

    async fn open(&self, uri: http::Uri) -> Result<(H2Send, H2Recv), StreamError> {
        let lost = |e: h2::Error| match self.state.reason() {
            Some(reason) => StreamError::ConnectionLost(reason),
            None => StreamError::from_h2(e),
        };
        let mut send_request = self.send_request.clone().ready().await.map_err(lost)?;
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        let sent_before = self.state.counts.sent.load(Ordering::Relaxed);
        let (response, send) = send_request.send_request(request, false).map_err(lost)?;
        // The stream may wait in h2's queue while the relay's stream limit
        // is reached: it is open once this handle is ready again.
        std::future::poll_fn(|cx| send_request.poll_ready(cx))
            .await
            .map_err(lost)?;
        let stream = Arc::new(Mutex::new(send));
        let head_arrived = Arc::new(AtomicBool::new(false));
        let recv = H2Recv {
            state: RecvState::Waiting(response),
            pending: Bytes::new(),
            stream: stream.clone(),
            head_arrived: Some(head_arrived.clone()),
            cancel_on_drop: true,
            ended: false,
        };
        let send = H2Send::new(
            stream,
            Some(Delivery {
                head_arrived,
                sent_before,
                state: self.state.clone(),
            }),
        );
        Ok((send, recv))
    }

    /// Ends the connection now; streams still open on it fail.
    pub fn close(&self, reason: &str) {
        self.state.close(reason.to_owned());
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        if self.state.closed.is_cancelled() {
            Some(self.state.reason().unwrap_or_default())
        } else {
            None
        }
    }

    /// Resolves when the connection has ended, with the reason.
    pub async fn closed(&self) -> String {
        self.state.closed.cancelled().await;
        self.state.reason().unwrap_or_default()
    }

    /// Round-trip time of the last keep-alive.
    pub fn rtt(&self) -> Duration {
        Duration::from_micros(self.state.rtt_micros.load(Ordering::Relaxed))
    }

    /// The relay's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.state.remote
    }

    /// A count that grows whenever data arrives from the relay (TCP
    /// segments, out of order included): the tunnel's sign of life.
    pub fn heard(&self) -> u64 {
        self.state.heard()
    }

    /// Segments this end has sent and of those retransmitted, as the
    /// kernel counts them (none where it does not say, or once closed).
    pub fn sent_and_retransmitted(&self) -> Option<(u64, u64)> {
        let watch = self.state.socket.lock().ok()?;
        let counters = kernel_counters(watch.handle.as_ref()?)?;
        Some((counters.segments_out, counters.retransmitted))
    }
}

/// The relay's TLS acceptor side of a new TCP connection: tunes the socket
/// and runs the handshake, whose verifier checks the client certificate.
pub async fn accept_tls(
    tcp: TcpStream,
    acceptor: &tokio_rustls::TlsAcceptor,
    tuning: &TransportTuning,
) -> io::Result<AcceptedTls> {
    tune_socket(&tcp, tuning);
    let counters = counter_handle(&tcp);
    let (io, counts) = CountedTcp::new(tcp);
    let tls = acceptor.accept(io).await?;
    Ok(AcceptedTls {
        tls,
        counts,
        counters,
    })
}

/// A TCP connection whose TLS handshake the relay has accepted.
pub struct AcceptedTls {
    /// The TLS stream.
    pub tls: tokio_rustls::server::TlsStream<CountedTcp>,
    counts: Arc<ByteCounts>,
    counters: Option<std::os::fd::OwnedFd>,
}

/// The client's certificate (DER) on a finished TLS connection; empty if absent.
pub fn peer_leaf(tls: &tokio_rustls::server::TlsStream<CountedTcp>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain: &[CertificateDer<'static>]| chain.first())
        .map(|leaf| leaf.to_vec())
        .unwrap_or_default()
}

/// A handle that ends a connection from elsewhere (a revocation).
#[derive(Debug, Clone)]
pub struct Closer(Arc<ConnectionState>);

impl Closer {
    /// Ends the connection now with `reason`.
    pub fn close(&self, reason: &str) {
        self.0.close(reason.to_owned());
    }
}

/// The relay's end of one TCP tunnel connection.
pub struct ServerConnection {
    connection: h2::server::Connection<tokio_rustls::server::TlsStream<CountedTcp>, Bytes>,
    /// The relay's side of the client's control stream (the keep-alive
    /// task sends heartbeats on it while this holds it).
    control: SharedSend,
    state: Arc<ConnectionState>,
    /// Set once the client reset its control stream, with its code.
    leaving: Option<Option<u64>>,
    /// Streams already read off the connection, not yet handed out.
    ready: std::collections::VecDeque<AcceptedStream>,
}

/// A request stream as h2 hands it over.
type AcceptedStream = (
    http::Request<h2::RecvStream>,
    h2::server::SendResponse<Bytes>,
);

impl ServerConnection {
    /// Sets up HTTP/2 on a verified TLS connection and waits for the
    /// client's control stream; `max_streams` request streams may be open
    /// at once.
    pub async fn handshake(
        accepted: AcceptedTls,
        remote: SocketAddr,
        tuning: TransportTuning,
        max_streams: u32,
    ) -> Result<ServerConnection, StreamError> {
        let AcceptedTls {
            tls,
            counts,
            counters,
        } = accepted;
        let (stream_window, connection_window) = windows(&tuning);
        let mut connection = h2::server::Builder::new()
            .initial_window_size(stream_window)
            .initial_connection_window_size(connection_window)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(MAX_HEADER_LIST)
            // One more for the control stream.
            .max_concurrent_streams(max_streams.saturating_add(1))
            .max_pending_accept_reset_streams(PENDING_ACCEPT_RESETS)
            .max_local_error_reset_streams(None)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(StreamError::from_h2)?;
        let first = tokio::time::timeout(CONTROL_WAIT, connection.accept())
            .await
            .map_err(|_| StreamError::Other("no control stream in time".to_owned()))?;
        let (request, mut respond) = match first {
            Some(Ok(accepted)) => accepted,
            Some(Err(e)) => return Err(StreamError::from_h2(e)),
            None => {
                return Err(StreamError::ConnectionLost(
                    "closed before its control stream".to_owned(),
                ));
            }
        };
        if request.uri().path() != CONTROL_PATH {
            respond.send_reset(Reason::PROTOCOL_ERROR);
            return Err(StreamError::Other(format!(
                "expected the control stream, got {}",
                request.uri().path()
            )));
        }
        let control = respond
            .send_response(http::Response::new(()), false)
            .map_err(StreamError::from_h2)?;
        let control = Arc::new(Mutex::new(control));
        let state = ConnectionState::new(remote, counts, counters);
        if let Some(ping_pong) = connection.ping_pong() {
            let heartbeat = Arc::downgrade(&control);
            tokio::spawn(keep_alive(ping_pong, heartbeat, state.clone(), tuning));
        }
        Ok(ServerConnection {
            connection,
            control,
            state,
            leaving: None,
            ready: std::collections::VecDeque::new(),
        })
    }

    /// Sends one control frame (welcome, go-away) to the client. Control
    /// frames are a few bytes, so they skip flow control and never wait.
    pub fn send_control(&mut self, frame: Frame) -> Result<(), String> {
        let mut encoded = BytesMut::new();
        encode_frame(&frame, &mut encoded).map_err(|e| e.to_string())?;
        lock(&self.control)
            .send_data(encoded.freeze(), false)
            .map_err(|e| e.to_string())
    }

    /// The next request stream, answered at once with the `200` head that
    /// tells the client the relay has it. Drives the connection while it
    /// waits; `Err` once the connection is over.
    pub async fn accept_stream(&mut self) -> Result<(H2Send, H2Recv), Ended> {
        loop {
            // Streams read in one go are handed out before the connection
            // is driven again, so their heads leave in one write when it
            // is (one segment for a burst, not one per stream), and still
            // before any of their handlers has run.
            if let Some(accepted) = self.ready.pop_front() {
                match answer(accepted) {
                    Some(stream) => return Ok(stream),
                    None => continue,
                }
            }
            let (connection, control) = (&mut self.connection, &self.control);
            let next = tokio::select! {
                _ = self.state.closed.cancelled() => {
                    return Err(Ended::failed(self.state.reason().unwrap_or_default()));
                }
                reset = std::future::poll_fn(|cx| lock(control).poll_reset(cx)), if self.leaving.is_none() => {
                    // The client is leaving this connection; its streams in
                    // flight still need the connection driven to the end.
                    self.leaving = Some(reset.ok().map(code_for));
                    continue;
                }
                next = connection.accept() => next,
            };
            match next {
                Some(Ok(accepted)) => {
                    self.ready.push_back(accepted);
                    while let Some(Some(Ok(more))) =
                        futures_util::FutureExt::now_or_never(self.connection.accept())
                    {
                        self.ready.push_back(more);
                    }
                }
                Some(Err(e)) => return Err(Ended::failed(e.to_string())),
                None => {
                    // The client said goodbye: let its last streams finish.
                    // Its control stream's reset may have come in the same
                    // read as its goodbye: look once more for its code.
                    if self.leaving.is_none() {
                        let control = &self.control;
                        let reset = std::future::poll_fn(|cx| lock(control).poll_reset(cx));
                        if let Some(reset) = futures_util::FutureExt::now_or_never(reset) {
                            self.leaving = Some(reset.ok().map(code_for));
                        }
                    }
                    tokio::select! {
                        _ = self.state.closed.cancelled() => {}
                        _ = std::future::poll_fn(|cx| self.connection.poll_closed(cx)) => {}
                    }
                    return Err(Ended {
                        reason: "closed by the client".to_owned(),
                        code: self.leaving.flatten(),
                    });
                }
            }
        }
    }

    /// A handle that ends this connection from elsewhere.
    pub fn closer(&self) -> Closer {
        Closer(self.state.clone())
    }
}

/// Answers an accepted request stream with the `200` head that tells the
/// client the relay has it; `None` for a stream that is not a request
/// stream (reset) or that went away.
fn answer((request, mut respond): AcceptedStream) -> Option<(H2Send, H2Recv)> {
    if request.uri().path() != STREAM_PATH {
        respond.send_reset(Reason::PROTOCOL_ERROR);
        return None;
    }
    let send = respond.send_response(http::Response::new(()), false).ok()?;
    let stream = Arc::new(Mutex::new(send));
    let recv = H2Recv {
        state: RecvState::Open(request.into_body()),
        pending: Bytes::new(),
        stream: stream.clone(),
        head_arrived: None,
        cancel_on_drop: false,
        ended: false,
    };
    Some((H2Send::new(stream, None), recv))
}

impl Drop for ServerConnection {
    fn drop(&mut self) {
        // Stops its keep-alive task and lets go of the counter handle.
        self.state.close("connection ended".to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passage_codes_survive_the_http2_mapping() {
        for code in [
            reset_code::CANCELLED,
            reset_code::PROTOCOL_ERROR,
            reset_code::BODY_FAILED,
            reset_code::REFUSED,
            0x11,
        ] {
            assert_eq!(code_for(reason_for(code)), u64::from(code));
        }
        // HTTP/2's own reasons never read as one of passage's codes.
        assert_eq!(code_for(Reason::INTERNAL_ERROR), HTTP2_REASONS | 2);
        assert_eq!(code_for(Reason::NO_ERROR), HTTP2_REASONS);
    }

    /// The retransmission cap is set where the kernel has the option.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn tunnel_sockets_cap_their_retransmission_timeout() {
        use std::os::fd::AsRawFd;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let addr = listener.local_addr().expect("address");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let tuning = TransportTuning::default();
        tune_socket(&tcp, &tuning);
        let mut millis: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: reads a plain int into `millis`, `len` bytes at most.
        let result = unsafe {
            libc::getsockopt(
                tcp.as_raw_fd(),
                libc::IPPROTO_TCP,
                44,
                (&mut millis as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if result != 0 {
            println!("SKIP: this kernel has no TCP_RTO_MAX_MS (Linux 6.15+)");
            return;
        }
        assert_eq!(millis, 1000);
        assert_eq!(rto_max(&tuning), Duration::from_secs(1));
    }

    /// Real sockets on 127.0.0.1: the reader never sends a byte, so only
    /// its kernel's acknowledgements can tell it is alive.
    #[cfg(target_os = "linux")]
    #[test]
    fn acknowledgements_are_a_sign_of_life_only_behind_a_queue() {
        use std::io::{Read, Write};
        use std::thread::sleep;
        let settle = Duration::from_millis(100);
        // A small receive buffer: a reader that stops reading soon closes
        // its window.
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        listener.set_recv_buffer_size(8 * 1024).expect("SO_RCVBUF");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        listener.bind(&any.into()).expect("bind");
        listener.listen(1).expect("listen");
        let addr = listener
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("inet");
        let mut writer = std::net::TcpStream::connect(addr).expect("connect");
        let (reader, _) = listener.accept().expect("accept");
        let mut reader = std::net::TcpStream::from(reader);
        writer.set_nonblocking(true).expect("nonblocking");
        let counts = Arc::new(ByteCounts::default());
        let handle = std::os::fd::OwnedFd::from(writer.try_clone().expect("clone"));
        let state = ConnectionState::new(addr, counts.clone(), Some(handle));
        let mut write = |bytes: &[u8]| match writer.write(bytes) {
            Ok(n) => {
                counts.sent.fetch_add(n as u64, Ordering::Relaxed);
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("write: {e}"),
        };

        // A PING alone, acknowledged at once: no sign of life.
        let quiet = state.heard();
        write(&[0; 39]);
        sleep(settle);
        assert_eq!(state.heard(), quiet, "a bare acknowledgement counted");

        // Far more than the reader takes: a queue, then a closed window.
        let mut queued = 0;
        while queued < (4 << 20) {
            match write(&[1; 64 * 1024]) {
                0 => break,
                n => queued += n,
            }
        }
        sleep(settle);
        let stalled = state.heard();
        sleep(settle);
        assert_eq!(state.heard(), stalled, "a closed window counted");

        // The reader takes some: its kernel acknowledges more of our queue.
        let mut sink = vec![0; 64 * 1024];
        reader.read_exact(&mut sink).expect("read");
        sleep(settle);
        assert!(
            state.heard() > stalled,
            "acknowledgements behind a queue did not count"
        );
    }
}
