//! The TCP socket under a tunnel connection: byte counting below TLS,
//! socket options (keep-alive-friendly timeouts, BBR, a short unsent
//! queue) and the kernel's own counters (`TCP_INFO`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::transport::{Congestion, TransportTuning};

/// Unsent bytes the kernel may queue per socket (`TCP_NOTSENT_LOWAT`).
const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Bytes through one tunnel socket, counted below TLS.
#[derive(Debug, Default)]
pub(super) struct ByteCounts {
    /// Received from the peer (a sign of life where the kernel's counters
    /// cannot be read).
    pub(super) received: AtomicU64,
    /// Handed to the kernel to send: compared with what the peer's kernel
    /// acknowledged, it tells whether a request can have reached the relay.
    pub(super) sent: AtomicU64,
}

/// A TCP socket that counts the bytes through it (see `ByteCounts`).
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
    pub(super) fn new(inner: TcpStream) -> (CountedTcp, Arc<ByteCounts>) {
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
pub(super) fn tune_socket(tcp: &TcpStream, tuning: &TransportTuning) {
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
pub(super) fn rto_max(tuning: &TransportTuning) -> Duration {
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

/// What the kernel counts for a TCP socket (`TCP_INFO`).
#[derive(Debug, Clone, Copy)]
pub(super) struct KernelCounters {
    /// Segments with data received, in order or not (`tcpi_data_segs_in`).
    /// Pure acknowledgements do not count: a frozen peer's kernel still
    /// acknowledges.
    pub(super) data_segments_in: u64,
    /// Bytes sent that the peer acknowledged (`tcpi_bytes_acked`).
    pub(super) bytes_acked: u64,
    /// Segments sent, retransmissions included (`tcpi_segs_out`).
    pub(super) segments_out: u64,
    /// Segments retransmitted over the connection's life (`tcpi_total_retrans`).
    pub(super) retransmitted: u64,
}

/// The kernel's counters for `socket`, if it says.
#[cfg(target_os = "linux")]
pub(super) fn kernel_counters(socket: &std::os::fd::OwnedFd) -> Option<KernelCounters> {
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

/// Elsewhere the bytes read stand in (see [`super::connection::ConnectionState::heard`]).
#[cfg(not(target_os = "linux"))]
pub(super) fn kernel_counters(_socket: &std::os::fd::OwnedFd) -> Option<KernelCounters> {
    None
}

/// A second handle on `tcp` for reading its kernel counters.
pub(super) fn counter_handle(tcp: &TcpStream) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::AsFd;
    tcp.as_fd().try_clone_to_owned().ok()
}
