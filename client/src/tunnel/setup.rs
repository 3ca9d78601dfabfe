//! What the tunnel is given: the relays it may reach, its timing, and what
//! every link shares to dial them.

use std::sync::Arc;
use std::time::Duration;

use passage_shared::bundle::relay_host;
use passage_shared::transport::TransportTuning;

use crate::connect::TransportChoice;
use crate::transport_memory::TransportMemory;

/// One relay the client may connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// `HOST:PORT` as configured.
    pub address: String,
    /// TLS name the relay's certificate must carry.
    pub server_name: String,
    /// The relay's TCP port, when it is not the address's.
    pub tcp_port: Option<u16>,
}

impl RelayTarget {
    /// A target for `address`, verified as `server_name` or, if none, as the address's host.
    pub fn new(address: &str, server_name: Option<&str>) -> RelayTarget {
        RelayTarget {
            address: address.to_owned(),
            server_name: server_name.unwrap_or(relay_host(address)).to_owned(),
            tcp_port: None,
        }
    }
}

/// Timing of the tunnel.
#[derive(Debug, Clone, Copy)]
pub struct TunnelSettings {
    /// Transport settings (keep-alive, idle timeout, congestion, windows).
    pub transport: TransportTuning,
    /// Which transports to use.
    pub choice: TransportChoice,
    /// With `auto`: how long QUIC runs alone before TCP is raced beside it.
    pub tcp_head_start: Duration,
    /// With `auto`, while on TCP: the first QUIC probe's delay; it doubles
    /// after each failed probe up to [`TunnelSettings::probe_max`].
    pub probe_first: Duration,
    /// The longest pause between QUIC probes.
    pub probe_max: Duration,
    /// Longest time one connection attempt (DNS + handshake) may take.
    pub connect_timeout: Duration,
    /// First reconnect step; doubles on each failed attempt.
    pub backoff_min: Duration,
    /// Cap of the reconnect step.
    pub backoff_max: Duration,
    /// Longest wait for a free stream on an established connection.
    pub open_stream_timeout: Duration,
    /// A connection from which nothing was heard for this long is dead.
    pub silence_limit: Duration,
    /// A connection is confirmed alive while something was heard within this.
    pub confirm_within: Duration,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        TunnelSettings::for_transport(TransportTuning::default())
    }
}

impl TunnelSettings {
    /// The defaults, with liveness timing derived from `transport`: dead
    /// after 60% of its idle timeout without a sound (with keep-alives every
    /// second from both ends, three in a row lost or unanswered), confirmed while
    /// something arrived within 2.5 keep-alive intervals.
    pub fn for_transport(transport: TransportTuning) -> TunnelSettings {
        TunnelSettings {
            transport,
            choice: TransportChoice::Auto,
            tcp_head_start: Duration::from_millis(300),
            probe_first: Duration::from_secs(10),
            probe_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            open_stream_timeout: Duration::from_secs(10),
            silence_limit: transport.idle_timeout.mul_f64(0.6),
            confirm_within: transport
                .keep_alive
                .mul_f64(2.5)
                .min(transport.idle_timeout),
        }
    }
}

/// What every link shares: how to reach a relay, and the tunnel's timing.
#[derive(Debug, Clone)]
pub struct TunnelSetup {
    /// QUIC client configuration.
    pub quic: quinn::ClientConfig,
    /// TLS configuration for TCP.
    pub tls: Arc<rustls::ClientConfig>,
    /// Timing and transport choice.
    pub settings: TunnelSettings,
    /// Which transport last worked per relay.
    pub memory: Arc<TransportMemory>,
}
