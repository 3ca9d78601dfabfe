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
//!   acknowledgements (see `connection::keep_alive`). What proves the
//!   peer alive is any TCP segment carrying data from it, as the kernel
//!   counts them (`TCP_INFO`), in order or not: on a lossy link a lost
//!   segment holds back every byte behind it, and the PING's answer with
//!   them, while later segments still arrive. Bare acknowledgements count only while more than a few
//!   KiB of ours wait unacknowledged (a frozen peer's kernel still sends
//!   them, but on a slow path our PING waits behind that queue, and a peer
//!   with nothing to say can answer it only once it arrives). Nothing from
//!   the peer for the idle timeout closes the connection.
//!   `TCP_THIN_LINEAR_TIMEOUTS` keeps a thin stream (an SSE response)
//!   retransmitting every RTO instead of backing off exponentially, so
//!   heavy loss does not stall it for seconds; `TCP_RTO_MAX_MS` caps any
//!   backoff (see `socket::rto_max`); `TCP_USER_TIMEOUT` is only
//!   a backstop (3× the idle timeout); `TCP_NOTSENT_LOWAT` keeps the
//!   kernel's unsent queue short so a PING never waits behind megabytes
//!   of body.
//!
//! The code is laid out by concern: `stream_error` (reset codes and
//! errors), `stream` (one request stream's halves), `socket` (the TCP
//! socket and its kernel counters), `connection` (per-connection state
//! and liveness), `client` (dialing the relay) and `server` (the
//! relay's accepting side).
mod client;
mod connection;
mod server;
mod socket;
mod stream;
mod stream_error;
#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::transport::TransportTuning;

pub use client::{ClientConnection, ConnectError, ControlStream};
pub use server::{AcceptedTls, Closer, ServerConnection, accept_tls, peer_leaf};
pub use socket::CountedTcp;
pub use stream::{H2Recv, H2Send};
pub(super) use stream_error::fault;
pub use stream_error::{StreamError, code_for, reason_for};

/// Path of the request streams.
const STREAM_PATH: &str = "/stream";
/// Path of the control stream (the client's first).
const CONTROL_PATH: &str = "/control";
/// Largest HTTP/2 DATA frame either end accepts.
const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// Largest header block the relay reads: the heads of this protocol are a
/// few dozen bytes (the app's headers travel inside passage frames).
const MAX_HEADER_LIST: u32 = 4 * 1024;
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

/// HTTP/2 flow-control windows from the tuning: per stream, and 2.5× that
/// per connection, as on QUIC.
fn windows(tuning: &TransportTuning) -> (u32, u32) {
    let stream = tuning.stream_window.min(i32::MAX as u32);
    let connection = (u64::from(stream) * 5 / 2).min(i32::MAX as u64) as u32;
    (stream, connection)
}
