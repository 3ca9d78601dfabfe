//! QUIC transport settings and endpoint construction shared by both ends.
//!
//! The numbers follow DESIGN.md ("The tunnel"): windows sized for long
//! lossy links but bounded so a slow reader holds back the sender, many
//! concurrent streams, keep-alive well under the idle timeout, and UDP
//! socket buffers raised before the endpoint exists.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, IdleTimeout, TransportConfig, VarInt};

/// Default per-stream receive window: what one request may have in flight (8 MiB).
pub const STREAM_RECEIVE_WINDOW: u32 = 8 << 20;
/// Requests a client may have in flight on one connection at once; sized
/// for thousands of held streaming responses (the connection window, not
/// this count, bounds the memory they can pin).
pub const MAX_CONCURRENT_STREAMS: u32 = 8192;
/// UDP socket buffer size requested from the kernel (it may grant less).
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Congestion controller of a tunnel connection (it governs what each end sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 9438), loss-based; quinn's default.
    Cubic,
    /// BBR, model-based: keeps its rate through random loss. passage's
    /// default: on an emulated 300 ms link with 1% loss it kept about three
    /// quarters of its lossless throughput where CUBIC fell to 0.02×
    /// (BENCHMARKS.md, one run per cell).
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

/// Why an endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuicSetupError {
    /// The TLS config is not usable for QUIC (needs TLS 1.3).
    #[error("TLS config unusable for QUIC: {0}")]
    Tls(String),
    /// The idle timeout is out of range.
    #[error("idle timeout out of range: {0:?}")]
    IdleTimeout(Duration),
    /// The UDP socket could not be made.
    #[error("UDP socket on {addr}")]
    Socket {
        /// The address to bind.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// `incoming_bidi`/`incoming_uni`: streams the peer may open towards us.
fn transport(
    tuning: TransportTuning,
    incoming_bidi: u32,
    incoming_uni: u32,
) -> Result<TransportConfig, QuicSetupError> {
    let mut transport = TransportConfig::default();
    let connection_window = u64::from(tuning.stream_window) * 5 / 2;
    transport
        .keep_alive_interval(Some(tuning.keep_alive))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(tuning.idle_timeout)
                .map_err(|_| QuicSetupError::IdleTimeout(tuning.idle_timeout))?,
        ))
        .stream_receive_window(VarInt::from_u32(tuning.stream_window))
        .receive_window(VarInt::from_u64(connection_window).unwrap_or(VarInt::MAX))
        .send_window(connection_window)
        .max_concurrent_bidi_streams(VarInt::from_u32(incoming_bidi))
        .max_concurrent_uni_streams(VarInt::from_u32(incoming_uni))
        .initial_mtu(1200);
    match tuning.congestion {
        Congestion::Cubic => transport
            .congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default())),
        Congestion::Bbr => transport
            .congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default())),
        Congestion::NewReno => transport
            .congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default())),
    };
    Ok(transport)
}

/// The relay's QUIC server config; accepts up to `max_streams` request
/// streams per connection at once (a client waits for more credit).
pub fn server_config(
    tls: rustls::ServerConfig,
    tuning: TransportTuning,
    max_streams: u32,
) -> Result<quinn::ServerConfig, QuicSetupError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicSetupError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport(tuning, max_streams, 0)?));
    Ok(config)
}

/// The client's QUIC config; the relay opens only the one welcome stream.
pub fn client_config(
    tls: rustls::ClientConfig,
    tuning: TransportTuning,
) -> Result<quinn::ClientConfig, QuicSetupError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicSetupError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = transport(tuning, 0, 1)?;
    // Ask the relay to acknowledge every packet at once. The relay's QUIC
    // driver then sends the ACK for a request before its stream task even
    // sees the request, so "not acknowledged when the connection died"
    // proves the upstream never saw it, and the client may send it again
    // (see the client's forward module).
    let mut ack_frequency = quinn::AckFrequencyConfig::default();
    ack_frequency.ack_eliciting_threshold(0u32.into());
    transport.ack_frequency_config(Some(ack_frequency));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Binds a UDP socket with enlarged buffers and makes a QUIC endpoint on it;
/// with `server` set it accepts connections too.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, QuicSetupError> {
    let socket_error = |source| QuicSetupError::Socket { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(socket_error)?;
    if addr.is_ipv6() {
        // Best effort: a dual-stack socket also reaches IPv4 relays.
        let _ = socket.set_only_v6(false);
    }
    // The kernel caps these at net.core.{r,w}mem_max; a smaller grant is fine.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into()).map_err(socket_error)?;
    let socket: std::net::UdpSocket = socket.into();
    let runtime = quinn::default_runtime().ok_or_else(|| QuicSetupError::Socket {
        addr,
        source: std::io::Error::other("no async runtime for QUIC"),
    })?;
    quinn::Endpoint::new(EndpointConfig::default(), server, socket, runtime).map_err(socket_error)
}
