//! The narrow interface between request handling and the transports under it.
//!
//! Request handling — the client's `forward`, the relay's `stream` — sees
//! only a pair of stream halves: bytes out, bytes in, and the three
//! stream-level signals the protocol needs: *finish* (this direction is
//! complete), *reset* (abandon it; the peer sees an error, never a clean
//! end) and *stopped* (the peer no longer reads: the request was
//! cancelled; or it acknowledged everything sent). Two transports
//! implement them, side by side: [`quic`] (QUIC streams, the default) and
//! [`tcp`] (HTTP/2 streams over TLS 1.3 on TCP, for networks that block
//! UDP). [`stream_fault`] is the one place that reads either transport's
//! errors. The client's tunnel and the relay's listener pick the transport;
//! nothing above them knows which one carries a request.

pub mod quic;
pub mod tcp;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// Default per-stream receive window: what one request may have in flight (8 MiB).
pub const STREAM_RECEIVE_WINDOW: u32 = 8 << 20;
/// Requests a client may have in flight on one connection at once; sized
/// for thousands of held streaming responses (the connection window, not
/// this count, bounds the memory they can pin).
pub const MAX_CONCURRENT_STREAMS: u32 = 8192;

/// Which transport carries a tunnel connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// QUIC over UDP (the default).
    Quic,
    /// TLS 1.3 over TCP with HTTP/2 streams (the fallback).
    Tcp,
}

impl TransportKind {
    /// The lower-case name used in logs, metrics labels and `/healthz`.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Quic => "quic",
            TransportKind::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Congestion controller of a tunnel connection (it governs what each end sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 9438), loss-based; quinn's default.
    Cubic,
    /// BBR, model-based: keeps its rate through random loss, where CUBIC's
    /// collapses, so it is passage's default (the two side by side on
    /// emulated lossy links: BENCHMARKS.md, section 5).
    #[default]
    Bbr,
    /// NewReno, the classic loss-based controller.
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "newreno" => Ok(Congestion::NewReno),
            _ => Err(format!(
                "unknown congestion controller {s:?} (cubic, bbr, newreno)"
            )),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
            Congestion::NewReno => "newreno",
        })
    }
}

/// Transport settings of a tunnel connection; both ends have their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportTuning {
    /// Interval between keep-alive packets on an otherwise idle connection.
    pub keep_alive: Duration,
    /// Silence after which the connection counts as dead.
    pub idle_timeout: Duration,
    /// Congestion controller for what this end sends.
    pub congestion: Congestion,
    /// Per-stream receive window in bytes; the connection window is 2.5×
    /// this and the send window matches it.
    pub stream_window: u32,
}

impl Default for TransportTuning {
    fn default() -> Self {
        TransportTuning {
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            congestion: Congestion::default(),
            stream_window: STREAM_RECEIVE_WINDOW,
        }
    }
}

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
    /// Writes `data` and ends this direction in one step, where the
    /// transport can without waiting (HTTP/2: one DATA frame that carries
    /// END_STREAM, so the end does not follow in a segment of its own);
    /// `None` where it cannot: [`write_last`] then writes and finishes.
    fn write_last_now(&mut self, data: &[u8]) -> Option<std::io::Result<()>> {
        let _ = data;
        None
    }
}

/// Writes `data` and ends the sending half of `send`: in one step where
/// the transport can ([`SendHalf::write_last_now`]), else a write and
/// [`SendHalf::finish`] (QUIC sends both in one packet anyway).
pub async fn write_last(send: &mut dyn SendHalf, data: &[u8]) -> std::io::Result<()> {
    if let Some(done) = send.write_last_now(data) {
        return done;
    }
    tokio::io::AsyncWriteExt::write_all(send, data).await?;
    send.finish();
    Ok(())
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
    quic::fault(inner)
        .or_else(|| tcp::fault(inner))
        .unwrap_or(StreamFault::Other)
}

/// How a tunnel connection ended, as the relay sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// What happened, for the log.
    pub reason: String,
    /// The application code the client closed it with, if it gave one
    /// (see [`crate::frame::close_code`]).
    pub code: Option<u64>,
}

impl Ended {
    /// An end without a code from the client.
    pub fn failed(reason: String) -> Ended {
        Ended { reason, code: None }
    }
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
