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

/// Per-stream receive window: what one request may have in flight (8 MiB).
pub const STREAM_RECEIVE_WINDOW: u32 = 8 << 20;
/// Per-connection receive window: bounds all streams together (20 MiB).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 20 << 20;
/// Send buffer per connection, at least the peer's receive window.
pub const SEND_WINDOW: u64 = 20 << 20;
/// Streams a client may have open on one connection at once.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// UDP socket buffer size requested from the kernel (it may grant less).
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Liveness timing of a tunnel connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// Interval between keep-alive packets on an otherwise idle connection.
    pub keep_alive: Duration,
    /// Silence after which the connection counts as dead.
    pub idle_timeout: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
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
    #[error("UDP socket on {addr}: {source}")]
    Socket {
        /// The address to bind.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// `incoming_bidi`/`incoming_uni`: streams the peer may open towards us.
fn transport(
    liveness: Liveness,
    incoming_bidi: u32,
    incoming_uni: u32,
) -> Result<TransportConfig, QuicSetupError> {
    let mut transport = TransportConfig::default();
    transport
        .keep_alive_interval(Some(liveness.keep_alive))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(liveness.idle_timeout)
                .map_err(|_| QuicSetupError::IdleTimeout(liveness.idle_timeout))?,
        ))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .max_concurrent_bidi_streams(VarInt::from_u32(incoming_bidi))
        .max_concurrent_uni_streams(VarInt::from_u32(incoming_uni))
        .initial_mtu(1200);
    Ok(transport)
}

/// The relay's QUIC server config; accepts up to [`MAX_CONCURRENT_STREAMS`]
/// request streams per connection.
pub fn server_config(
    tls: rustls::ServerConfig,
    liveness: Liveness,
) -> Result<quinn::ServerConfig, QuicSetupError> {
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| QuicSetupError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport(liveness, MAX_CONCURRENT_STREAMS, 0)?));
    Ok(config)
}

/// The client's QUIC config; the relay opens only the one welcome stream.
pub fn client_config(
    tls: rustls::ClientConfig,
    liveness: Liveness,
) -> Result<quinn::ClientConfig, QuicSetupError> {
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| QuicSetupError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport(liveness, 0, 1)?));
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
