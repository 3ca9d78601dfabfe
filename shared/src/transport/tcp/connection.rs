//! What both ends keep per connection: liveness (keep-alive PINGs, the
//! heartbeat, the idle watchdog) and how the connection ended.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::socket::{ByteCounts, kernel_counters};
use super::stream::lock;
use crate::transport::TransportTuning;

/// State both ends keep per connection: liveness and how it ended.
#[derive(Debug)]
pub(super) struct ConnectionState {
    pub(super) remote: SocketAddr,
    /// Bytes through the socket.
    pub(super) counts: Arc<ByteCounts>,
    /// A second handle on the socket, to read the kernel's counters, and
    /// what they said last; the handle is given up when the connection
    /// ends, so it never keeps a closed connection's socket open.
    pub(super) socket: Mutex<SocketWatch>,
    /// Bytes the peer's kernel had acknowledged when the connection ended
    /// ([`UNKNOWN`] until then, or where the kernel does not say).
    pub(super) acked_at_end: AtomicU64,
    /// Round-trip time of the last keep-alive, in microseconds.
    pub(super) rtt_micros: AtomicU64,
    /// Cancelled when the connection has ended or must end now.
    pub(super) closed: CancellationToken,
    reason: Mutex<Option<String>>,
}

impl ConnectionState {
    pub(super) fn new(
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
    pub(super) fn close(&self, reason: String) {
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
    pub(super) fn heard(&self) -> u64 {
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

    pub(super) fn reason(&self) -> Option<String> {
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
pub(super) async fn keep_alive(
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
pub(super) struct SocketWatch {
    pub(super) handle: Option<std::os::fd::OwnedFd>,
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
pub(super) const UNKNOWN: u64 = u64::MAX;
