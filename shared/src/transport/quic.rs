//! QUIC transport settings and endpoint construction shared by both ends.
//!
//! The numbers follow docs/DESIGN.md ("The tunnel"): windows sized for long
//! lossy links but bounded so a slow reader holds back the sender, many
//! concurrent streams, keep-alive well under the idle timeout, and UDP
//! socket buffers raised before the endpoint exists. Also the QUIC side of
//! the stream-half traits, and how its errors read as [`StreamFault`]s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use sha2::{Digest, Sha256};

use super::{Congestion, RecvHalf, SendHalf, StreamEnd, StreamFault, TransportTuning};

/// UDP socket buffer size requested from the kernel (it may grant less).
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

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

/// The relay's endpoint identity across restarts, derived from a secret
/// only it holds (its private key): the key of its stateless resets and of
/// its connection IDs.
///
/// quinn draws both at random per process by default. Then a relay killed
/// and restarted neither recognises its old connection IDs nor sends a reset
/// its clients can verify, so they only notice after their idle timeout.
/// With keys that survive a restart, the new process answers the first
/// packet of an old connection with a stateless reset the client accepts,
/// and the client reconnects at once.
pub fn stable_endpoint_config(secret: &[u8]) -> EndpointConfig {
    let derive = |label: &[u8]| -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(b"passage quic endpoint ");
        hash.update(label);
        hash.update(secret);
        hash.finalize().into()
    };
    let reset = derive(b"stateless reset");
    let cid = derive(b"connection id");
    let cid_key = u64::from_le_bytes([
        cid[0], cid[1], cid[2], cid[3], cid[4], cid[5], cid[6], cid[7],
    ]);
    let mut config = EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &reset,
    )));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// Binds a UDP socket with enlarged buffers and makes a QUIC endpoint on it;
/// with `server` set it accepts connections too. `config` is quinn's
/// default unless given (see [`stable_endpoint_config`]).
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    config: Option<EndpointConfig>,
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
    quinn::Endpoint::new(config.unwrap_or_default(), server, socket, runtime).map_err(socket_error)
}

/// What a quinn stream error says about the stream, if it is one.
pub(super) fn fault(
    inner: &(dyn std::error::Error + Send + Sync + 'static),
) -> Option<StreamFault> {
    if let Some(read) = inner.downcast_ref::<quinn::ReadError>() {
        return Some(match read {
            quinn::ReadError::Reset(code) => StreamFault::Reset(code.into_inner()),
            quinn::ReadError::ConnectionLost(_) => StreamFault::ConnectionLost,
            _ => StreamFault::Other,
        });
    }
    if let Some(write) = inner.downcast_ref::<quinn::WriteError>() {
        return Some(match write {
            quinn::WriteError::Stopped(code) => StreamFault::Reset(code.into_inner()),
            quinn::WriteError::ConnectionLost(_) => StreamFault::ConnectionLost,
            _ => StreamFault::Other,
        });
    }
    None
}

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
