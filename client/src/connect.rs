//! One tunnel connection to one relay, over QUIC or over TLS on TCP: the
//! handshake, the relay's welcome, and a handle that hides which transport
//! carries it.
//!
//! The tunnel ([`crate::tunnel`]) decides which transports to try and when;
//! this module only knows how. Above it, request handling sees stream
//! halves ([`passage_shared::transport`]) and nothing else.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use passage_shared::control::{ControlError, ControlMessage, ControlReader};
use passage_shared::frame::close_code;
use passage_shared::transport::tcp;
use passage_shared::transport::{BoxRecv, BoxSend, SendHalf, TransportKind, TransportTuning, quic};

/// Which transports the client may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// QUIC first; TLS over TCP raced after a head start and used when it
    /// wins, with QUIC probed again in the background.
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only.
    Tcp,
}

impl std::str::FromStr for TransportChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(TransportChoice::Auto),
            "quic" => Ok(TransportChoice::Quic),
            "tcp" => Ok(TransportChoice::Tcp),
            _ => Err(format!("unknown transport {s:?} (auto, quic, tcp)")),
        }
    }
}

impl std::fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportChoice::Auto => "auto",
            TransportChoice::Quic => "quic",
            TransportChoice::Tcp => "tcp",
        })
    }
}

/// A live tunnel connection, cheap to clone.
#[derive(Debug, Clone)]
pub enum Connection {
    /// Over QUIC.
    Quic(quinn::Connection),
    /// Over TLS on TCP.
    Tcp(tcp::ClientConnection),
}

impl Connection {
    /// The transport under it.
    pub fn kind(&self) -> TransportKind {
        match self {
            Connection::Quic(_) => TransportKind::Quic,
            Connection::Tcp(_) => TransportKind::Tcp,
        }
    }

    /// Opens a request stream, waiting while the relay's stream limit is reached.
    pub async fn open_stream(&self) -> Result<(BoxSend, BoxRecv), String> {
        match self {
            Connection::Quic(connection) => match connection.open_bi().await {
                Ok((send, recv)) => Ok((Box::new(send), Box::new(recv))),
                Err(e) => Err(e.to_string()),
            },
            Connection::Tcp(connection) => match connection.open_stream().await {
                Ok((send, recv)) => Ok((Box::new(send), Box::new(recv))),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    /// Ends the connection now with `code`; streams still open on it fail.
    pub fn close(&self, code: u32, reason: &str) {
        match self {
            Connection::Quic(connection) => connection.close(code.into(), reason.as_bytes()),
            Connection::Tcp(connection) => connection.close(reason),
        }
    }

    /// Why the connection ended, once it has.
    pub fn close_reason(&self) -> Option<String> {
        match self {
            Connection::Quic(connection) => connection.close_reason().map(|r| r.to_string()),
            Connection::Tcp(connection) => connection.close_reason(),
        }
    }

    /// Resolves when the connection has ended, with the reason.
    pub async fn closed(&self) -> String {
        match self {
            Connection::Quic(connection) => connection.closed().await.to_string(),
            Connection::Tcp(connection) => connection.closed().await,
        }
    }

    /// The current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        match self {
            Connection::Quic(connection) => connection.rtt(),
            Connection::Tcp(connection) => connection.rtt(),
        }
    }

    /// The relay's address.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Connection::Quic(connection) => connection.remote_address(),
            Connection::Tcp(connection) => connection.remote_address(),
        }
    }

    /// Packets (QUIC) or segments (TCP) this end has sent, and of those
    /// lost (QUIC's loss detection) or retransmitted (TCP), where known.
    pub fn sent_and_lost(&self) -> Option<(u64, u64)> {
        match self {
            Connection::Quic(connection) => {
                let path = connection.stats().path;
                Some((path.sent_packets, path.lost_packets))
            }
            Connection::Tcp(connection) => connection.sent_and_retransmitted(),
        }
    }

    /// A count that grows whenever anything arrives from the relay
    /// (datagrams on QUIC, segments on TCP): the tunnel's sign of life.
    pub fn heard(&self) -> u64 {
        match self {
            Connection::Quic(connection) => connection.stats().udp_rx.datagrams,
            Connection::Tcp(connection) => connection.heard(),
        }
    }
}

/// A connection whose relay has welcomed this client.
pub struct Established {
    /// The connection.
    pub connection: Connection,
    /// Its control messages.
    pub control: ControlReader,
}

impl Established {
    /// Closes a connection this client raced and no longer needs, with a
    /// code the relay logs as routine ([`close_code::ABANDONED`]).
    pub fn abandon(self) {
        self.leave(close_code::ABANDONED, "another handshake won");
    }

    /// Stops using the connection: requests in flight on it finish, then
    /// it closes (QUIC closes at once: it is never retired for another).
    pub fn leave(self, code: u32, reason: &str) {
        match (self.connection, self.control) {
            (connection @ Connection::Quic(_), _) => connection.close(code, reason),
            (Connection::Tcp(_), ControlReader::Tcp { mut send, .. }) => {
                // Resetting the control stream tells the relay; with every
                // handle dropped, HTTP/2 closes once the last stream ends.
                send.reset(code);
            }
            (Connection::Tcp(connection), ControlReader::Quic(_)) => connection.close(reason),
        }
    }
}

/// What a connection attempt needs to know about its relay.
#[derive(Debug, Clone)]
pub struct Dialer {
    /// TLS name the relay's certificate must carry.
    pub server_name: String,
    /// QUIC client configuration.
    pub quic: quinn::ClientConfig,
    /// TLS configuration for TCP (its ALPN is `passage-tcp/1`).
    pub tls: Arc<rustls::ClientConfig>,
    /// Transport settings (keep-alive, idle timeout, windows).
    pub tuning: TransportTuning,
    /// The UDP endpoints, made on first use per address family.
    pub endpoints: Arc<Mutex<Endpoints>>,
}

impl Dialer {
    /// One QUIC handshake to `addr` and the relay's welcome.
    pub async fn quic(&self, addr: SocketAddr) -> Result<Established, String> {
        let endpoint = self
            .endpoints
            .lock()
            .map_err(|_| "endpoint lock poisoned".to_owned())?
            .for_address(addr)?;
        let connecting = endpoint
            .connect_with(self.quic.clone(), addr, &self.server_name)
            .map_err(|e| e.to_string())?;
        let connection = connecting.await.map_err(|e| match e {
            quinn::ConnectionError::TimedOut => NO_REPLY.to_owned(),
            e => e.to_string(),
        })?;
        let mut control = ControlReader::Quic(connection.clone());
        let connection = Connection::Quic(connection);
        welcome(&mut control, &connection).await?;
        Ok(Established {
            connection,
            control,
        })
    }

    /// One TLS-over-TCP handshake to `addr` and the relay's welcome.
    pub async fn tcp(&self, addr: SocketAddr) -> Result<Established, String> {
        let (connection, control) =
            tcp::ClientConnection::connect(addr, &self.server_name, self.tls.clone(), self.tuning)
                .await
                .map_err(|e| match e {
                    tcp::ConnectError::Tcp(e) => e.to_string(),
                    e => e.to_string(),
                })?;
        let mut control = ControlReader::tcp(control);
        let connection = Connection::Tcp(connection);
        welcome(&mut control, &connection).await?;
        Ok(Established {
            connection,
            control,
        })
    }
}

/// How a QUIC handshake that got no answer reads in errors.
pub const NO_REPLY: &str = "no reply";

/// Reads the relay's welcome: in TLS 1.3 the client finishes its handshake
/// before the relay has judged its certificate, so only the welcome proves
/// it was accepted. A refusal carries the connection's end as the relay
/// gave it (its TLS alert, or passage's close reason).
async fn welcome(control: &mut ControlReader, connection: &Connection) -> Result<(), String> {
    let refused = |detail: Option<String>| {
        let why = connection.close_reason().or(detail).unwrap_or_default();
        if why.is_empty() {
            "the relay refused the connection".to_owned()
        } else {
            format!("the relay refused the connection: {why}")
        }
    };
    match control.next().await {
        Some(Ok(ControlMessage::Welcome(_))) => Ok(()),
        Some(Ok(ControlMessage::GoAway)) => {
            Err("the relay sent a go-away frame instead of a welcome".to_owned())
        }
        Some(Err(ControlError::Unexpected(kind))) => Err(format!(
            "the relay sent a {kind} frame instead of a welcome"
        )),
        Some(Err(e)) => Err(refused(Some(e.to_string()))),
        None => Err(refused(None)),
    }
}

/// The UDP endpoints of one link, made on first use per address family.
#[derive(Debug, Default)]
pub struct Endpoints {
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    fn for_address(&mut self, addr: SocketAddr) -> Result<quinn::Endpoint, String> {
        let (slot, bind): (_, SocketAddr) = if addr.is_ipv4() {
            (&mut self.v4, (std::net::Ipv4Addr::UNSPECIFIED, 0).into())
        } else {
            (&mut self.v6, (std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        };
        if let Some(endpoint) = slot {
            return Ok(endpoint.clone());
        }
        let endpoint =
            quic::endpoint(bind, None, None).map_err(|e| passage_shared::error_chain(&e))?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// Every endpoint made so far.
    pub fn all(&self) -> Vec<quinn::Endpoint> {
        self.v4.iter().chain(self.v6.iter()).cloned().collect()
    }
}
