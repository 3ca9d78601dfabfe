//! The tunnel manager: keeps one QUIC connection to a relay up, reconnects
//! with capped exponential backoff and jitter when it drops, and hands out
//! streams for requests.
//!
//! Relays are tried in order (the bundle's, then `--relay` additions): the
//! client fails over to the next when one cannot be reached, and after a
//! loss starts again from the first. Requests that arrive while there is no
//! connection wait up to the configured connect wait for one.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use futures_util::StreamExt;
use passage_shared::bundle::relay_host;
use passage_shared::frame::{Frame, frame_reader};
use passage_shared::quic;
use passage_shared::transport::{BoxRecv, BoxSend};

/// A connection that lasted this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// One relay the client may connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTarget {
    /// `HOST:PORT` as configured.
    pub address: String,
    /// TLS name the relay's certificate must carry.
    pub server_name: String,
}

impl RelayTarget {
    /// A target for `address`, verified as `server_name` or, if none, as the address's host.
    pub fn new(address: &str, server_name: Option<&str>) -> RelayTarget {
        RelayTarget {
            address: address.to_owned(),
            server_name: server_name.unwrap_or(relay_host(address)).to_owned(),
        }
    }
}

/// Timing of the tunnel manager.
#[derive(Debug, Clone, Copy)]
pub struct TunnelSettings {
    /// QUIC transport settings (keep-alive, idle timeout, congestion, windows).
    pub transport: quic::TransportTuning,
    /// Longest time one connection attempt (DNS + handshake) may take.
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles on each failed round.
    pub backoff_min: Duration,
    /// Cap of the reconnect delay.
    pub backoff_max: Duration,
    /// Longest wait for a free stream on an established connection.
    pub open_stream_timeout: Duration,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        TunnelSettings {
            transport: quic::TransportTuning::default(),
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            open_stream_timeout: Duration::from_secs(10),
        }
    }
}

/// Where the tunnel stands.
#[derive(Debug, Clone)]
pub enum TunnelState {
    /// No connection; the manager is (re)connecting.
    Connecting {
        /// Why the last attempt or connection failed.
        last_error: Option<String>,
    },
    /// Connected to `relay`.
    Up {
        /// The live connection.
        connection: quinn::Connection,
        /// The relay's address as configured.
        relay: String,
    },
    /// The client is shutting down.
    Stopped,
}

/// Why no stream could be had.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// No connection came up within the wait.
    #[error("the tunnel to the relay is down{}", .last_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Unavailable {
        /// Why the last attempt failed.
        last_error: Option<String>,
    },
    /// All streams of the connection stayed busy.
    #[error("no free tunnel stream within {0:?}")]
    StreamTimeout(Duration),
    /// The connection failed while opening the stream.
    #[error("tunnel connection failed: {0}")]
    Lost(#[from] quinn::ConnectionError),
    /// The client is shutting down.
    #[error("passage-client is shutting down")]
    Stopped,
}

/// Handle to the tunnel, cheap to clone; the manager task runs behind it.
#[derive(Debug, Clone)]
pub struct Tunnel {
    state: watch::Receiver<TunnelState>,
    settings: TunnelSettings,
}

impl Tunnel {
    /// Starts the manager task, which runs until `shutdown` fires; await
    /// the handle to let it close the connection cleanly.
    pub fn start(
        targets: Vec<RelayTarget>,
        client_config: quinn::ClientConfig,
        settings: TunnelSettings,
        shutdown: CancellationToken,
    ) -> (Tunnel, tokio::task::JoinHandle<()>) {
        let (state_tx, state) = watch::channel(TunnelState::Connecting { last_error: None });
        let manager = Manager {
            targets,
            client_config,
            settings,
            state: state_tx,
            v4: None,
            v6: None,
        };
        let handle = tokio::spawn(manager.run(shutdown));
        (Tunnel { state, settings }, handle)
    }

    /// The current state.
    pub fn state(&self) -> TunnelState {
        self.state.borrow().clone()
    }

    /// A live connection, waiting up to `wait` for one to come up.
    pub async fn connection(&self, wait: Duration) -> Result<quinn::Connection, TunnelError> {
        let mut state = self.state.clone();
        let ready = tokio::time::timeout(
            wait,
            state.wait_for(|s| matches!(s, TunnelState::Up { .. } | TunnelState::Stopped)),
        )
        .await;
        match ready {
            Ok(Ok(state)) => match &*state {
                TunnelState::Up { connection, .. } => Ok(connection.clone()),
                _ => Err(TunnelError::Stopped),
            },
            Ok(Err(_)) => Err(TunnelError::Stopped),
            Err(_) => match &*self.state.borrow() {
                TunnelState::Connecting { last_error } => Err(TunnelError::Unavailable {
                    last_error: last_error.clone(),
                }),
                TunnelState::Up { connection, .. } => Ok(connection.clone()),
                TunnelState::Stopped => Err(TunnelError::Stopped),
            },
        }
    }

    /// Opens a stream for one request. A stream that could not be opened
    /// carried nothing, so one failure is retried on the next connection.
    pub async fn open_stream(&self, wait: Duration) -> Result<(BoxSend, BoxRecv), TunnelError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let connection = self.connection(wait).await?;
            let opened =
                tokio::time::timeout(self.settings.open_stream_timeout, connection.open_bi()).await;
            match opened {
                Ok(Ok((send, recv))) => return Ok((Box::new(send), Box::new(recv))),
                Ok(Err(e)) if attempt < 2 => {
                    warn!(error = %e, "could not open a stream; retrying on a new connection");
                    // Let the manager notice the loss before asking again.
                    let mut state = self.state.clone();
                    let _ = tokio::time::timeout(
                        wait,
                        state.wait_for(|s| match s {
                            TunnelState::Up { connection: c, .. } => {
                                c.stable_id() != connection.stable_id()
                            }
                            _ => true,
                        }),
                    )
                    .await;
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => {
                    return Err(TunnelError::StreamTimeout(
                        self.settings.open_stream_timeout,
                    ));
                }
            }
        }
    }
}

/// The task that owns the connection attempts.
struct Manager {
    targets: Vec<RelayTarget>,
    client_config: quinn::ClientConfig,
    settings: TunnelSettings,
    state: watch::Sender<TunnelState>,
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl Manager {
    async fn run(mut self, shutdown: CancellationToken) {
        let settings = self.settings;
        let new_backoff = || {
            ExponentialBuilder::default()
                .with_min_delay(settings.backoff_min)
                .with_max_delay(settings.backoff_max)
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut backoff = new_backoff();
        'rounds: loop {
            let mut last_error = None;
            for index in 0..self.targets.len() {
                let target = self.targets[index].clone();
                let attempt = tokio::select! {
                    _ = shutdown.cancelled() => break 'rounds,
                    attempt = self.connect(&target) => attempt,
                };
                match attempt {
                    Ok(connection) => {
                        info!(relay = %target.address, rtt_ms = connection.rtt().as_millis() as u64, "tunnel up");
                        self.state.send_replace(TunnelState::Up {
                            connection: connection.clone(),
                            relay: target.address.clone(),
                        });
                        let up_since = tokio::time::Instant::now();
                        let reason = tokio::select! {
                            _ = shutdown.cancelled() => {
                                connection.close(0u32.into(), b"client shutting down");
                                break 'rounds;
                            }
                            reason = connection.closed() => reason,
                        };
                        warn!(relay = %target.address, %reason, "tunnel lost; reconnecting");
                        let lost = format!("connection to {} lost: {reason}", target.address);
                        self.state.send_replace(TunnelState::Connecting {
                            last_error: Some(lost.clone()),
                        });
                        if up_since.elapsed() >= STABLE_CONNECTION {
                            // A connection that held is no reason to wait.
                            backoff = new_backoff();
                            continue 'rounds;
                        }
                        // One that dropped at once (a relay that accepts and
                        // closes) must not make the client spin: back off.
                        last_error = Some(lost);
                        break;
                    }
                    Err(e) => {
                        warn!(relay = %target.address, error = %e, "cannot reach relay");
                        last_error = Some(format!("{}: {e}", target.address));
                    }
                }
            }
            self.state
                .send_replace(TunnelState::Connecting { last_error });
            let delay = backoff.next().unwrap_or(settings.backoff_max);
            tokio::select! {
                _ = shutdown.cancelled() => break 'rounds,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.state.send_replace(TunnelState::Stopped);
        for endpoint in [self.v4.take(), self.v6.take()].into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }

    /// One connection attempt: resolve, handshake, all within the connect timeout.
    async fn connect(&mut self, target: &RelayTarget) -> Result<quinn::Connection, String> {
        let timeout = self.settings.connect_timeout;
        tokio::time::timeout(timeout, self.connect_inner(target))
            .await
            .unwrap_or_else(|_| Err(format!("no handshake within {timeout:?}")))
    }

    async fn connect_inner(&mut self, target: &RelayTarget) -> Result<quinn::Connection, String> {
        let addr = tokio::net::lookup_host(&target.address)
            .await
            .map_err(|e| format!("cannot resolve: {e}"))?
            .next()
            .ok_or_else(|| "the name resolves to no address".to_owned())?;
        let slot = if addr.is_ipv4() {
            &mut self.v4
        } else {
            &mut self.v6
        };
        if slot.is_none() {
            let bind: std::net::SocketAddr = if addr.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            *slot = Some(quic::endpoint(bind, None).map_err(|e| e.to_string())?);
        }
        let endpoint = slot.as_ref().ok_or("no endpoint")?;
        let connecting = endpoint
            .connect_with(self.client_config.clone(), addr, &target.server_name)
            .map_err(|e| e.to_string())?;
        let connection = connecting.await.map_err(|e| e.to_string())?;
        // The TLS 1.3 client finishes before the relay has judged its
        // certificate: only the relay's welcome proves it was accepted.
        let welcome = connection
            .accept_uni()
            .await
            .map_err(|e| format!("the relay refused the connection: {e}"))?;
        match frame_reader(welcome).next().await {
            Some(Ok(Frame::Welcome(_))) => Ok(connection),
            Some(Ok(frame)) => Err(format!(
                "the relay sent a {} frame instead of a welcome",
                frame.kind()
            )),
            Some(Err(e)) => Err(format!("reading the relay's welcome: {e}")),
            None => Err("the relay closed the welcome stream early".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_defaults_to_the_host() {
        assert_eq!(
            RelayTarget::new("relay.example:4433", None).server_name,
            "relay.example"
        );
        assert_eq!(RelayTarget::new("[::1]:4433", None).server_name, "::1");
        assert_eq!(
            RelayTarget::new("10.0.0.1:1", Some("relay")).server_name,
            "relay"
        );
    }
}
