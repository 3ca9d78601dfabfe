//! The tunnel: one QUIC connection per configured relay, each kept up by
//! its own link task, and streams for requests handed out over the first
//! healthy one.
//!
//! Relays are listed in order of preference (the bundle's, then `--relay`
//! additions). The client keeps a connection to every one of them, so a
//! standby is already up when the preferred relay dies; new requests go
//! to the first relay in the list whose connection is up and that has not
//! announced a shutdown. Requests that arrive while none is up wait up to
//! the connect wait for one.
//!
//! Reconnecting: a link starts a handshake at once, then another after
//! each backoff step (100 ms doubling to a 1 s cap, each step drawn from
//! its upper half), while earlier attempts are still waiting for an
//! answer; each attempt gives up after the connect timeout and the first
//! to complete wins. A relay that comes back is thus reached within about
//! a second, and a dead one costs a few small packets a second.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use passage_shared::bundle::relay_host;
use passage_shared::frame::{Frame, frame_reader};
use passage_shared::quic;
use passage_shared::transport::{BoxRecv, BoxSend, RecvHalf};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// A connection that lasted this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// Numbers every connection the client makes, so one that failed can be
/// told apart from its successor (quinn's `stable_id` is an address and
/// may be reused once the old connection is freed).
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

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

/// Timing of the tunnel.
#[derive(Debug, Clone, Copy)]
pub struct TunnelSettings {
    /// QUIC transport settings (keep-alive, idle timeout, congestion, windows).
    pub transport: quic::TransportTuning,
    /// Longest time one connection attempt (DNS + handshake) may take.
    pub connect_timeout: Duration,
    /// First reconnect step; doubles on each failed attempt.
    pub backoff_min: Duration,
    /// Cap of the reconnect step.
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
            backoff_max: Duration::from_secs(1),
            open_stream_timeout: Duration::from_secs(10),
        }
    }
}

/// Where the link to one relay stands.
#[derive(Debug, Clone)]
pub enum LinkState {
    /// No usable connection; the link is (re)connecting.
    Connecting {
        /// Why the last attempt or connection failed.
        last_error: Option<String>,
    },
    /// Connected; new requests may use it.
    Up {
        /// The live connection.
        connection: quinn::Connection,
        /// This client's number for the connection.
        id: u64,
    },
    /// The client is shutting down.
    Stopped,
}

/// One relay and the state of its link.
#[derive(Debug, Clone)]
pub struct RelayLink {
    /// The relay's address as configured.
    pub address: String,
    /// Its link's state.
    pub state: LinkState,
    /// Connections this link has established so far (reconnects: all but the first).
    pub established: u64,
}

impl RelayLink {
    /// The connection new requests may use: up, and not closed since.
    pub fn usable(&self) -> Option<(&quinn::Connection, u64)> {
        match &self.state {
            LinkState::Up { connection, id } if connection.close_reason().is_none() => {
                Some((connection, *id))
            }
            _ => None,
        }
    }
}

/// Why no stream could be had.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// No connection came up within the wait.
    #[error("no relay is reachable{}", .last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    Unavailable {
        /// Why the last attempts failed, per relay.
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

/// A stream opened for one request.
pub struct OpenedStream {
    /// The sending half.
    pub send: BoxSend,
    /// The receiving half; counted in [`Tunnel::open_streams`] until dropped.
    pub recv: BoxRecv,
    /// Identifies the connection it runs on (see [`Tunnel::open_stream`]'s `avoid`).
    pub connection_id: u64,
    /// The relay it goes to.
    pub relay: String,
}

/// Handle to the tunnel, cheap to clone; the link tasks run behind it.
#[derive(Debug, Clone)]
pub struct Tunnel {
    links: watch::Receiver<Vec<RelayLink>>,
    settings: TunnelSettings,
    open_streams: Arc<AtomicUsize>,
}

impl Tunnel {
    /// Starts one link task per target, which run until `shutdown` fires;
    /// await the handle to let them close their connections cleanly.
    pub fn start(
        targets: Vec<RelayTarget>,
        client_config: quinn::ClientConfig,
        settings: TunnelSettings,
        shutdown: CancellationToken,
    ) -> (Tunnel, tokio::task::JoinHandle<()>) {
        let initial = targets
            .iter()
            .map(|target| RelayLink {
                address: target.address.clone(),
                state: LinkState::Connecting { last_error: None },
                established: 0,
            })
            .collect();
        let (links_tx, links) = watch::channel(initial);
        let links_tx = Arc::new(links_tx);
        let mut tasks = JoinSet::new();
        for (index, target) in targets.into_iter().enumerate() {
            let link = Link {
                index,
                target,
                client_config: client_config.clone(),
                settings,
                links: links_tx.clone(),
                endpoints: Arc::new(Mutex::new(Endpoints::default())),
            };
            tasks.spawn(link.run(shutdown.clone()));
        }
        let handle = tokio::spawn(async move { while tasks.join_next().await.is_some() {} });
        let tunnel = Tunnel {
            links,
            settings,
            open_streams: Arc::new(AtomicUsize::new(0)),
        };
        (tunnel, handle)
    }

    /// Every relay and the state of its link, in order of preference.
    pub fn links(&self) -> Vec<RelayLink> {
        self.links.borrow().clone()
    }

    /// Request streams open now (opened and not yet dropped by their response).
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Relaxed)
    }

    /// The connection new requests should use, waiting up to `wait` for
    /// one; `avoid` skips a connection that just failed or refused.
    pub async fn connection(
        &self,
        wait: Duration,
        avoid: Option<u64>,
    ) -> Result<(quinn::Connection, u64), TunnelError> {
        let deadline = Instant::now() + wait;
        let mut links = self.links.clone();
        loop {
            {
                let current = links.borrow_and_update();
                if let Some(connection) = choose(&current, avoid) {
                    return Ok(connection);
                }
                if current
                    .iter()
                    .all(|l| matches!(l.state, LinkState::Stopped))
                {
                    return Err(TunnelError::Stopped);
                }
            }
            match tokio::time::timeout_at(deadline, links.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(TunnelError::Stopped),
                Err(_) => {
                    return Err(TunnelError::Unavailable {
                        last_error: last_errors(&links.borrow()),
                    });
                }
            }
        }
    }

    /// Opens a stream for one request on the preferred healthy relay,
    /// skipping connection `avoid`. A stream that could not be opened
    /// carried nothing, so one failure, or a connection whose streams all
    /// stayed busy, is retried once on another connection.
    pub async fn open_stream(
        &self,
        wait: Duration,
        mut avoid: Option<u64>,
    ) -> Result<OpenedStream, TunnelError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (connection, id) = self.connection(wait, avoid).await?;
            let opened =
                tokio::time::timeout(self.settings.open_stream_timeout, connection.open_bi()).await;
            match opened {
                Ok(Ok((send, recv))) => {
                    let recv = CountedRecv::new(recv, self.open_streams.clone());
                    return Ok(OpenedStream {
                        send: Box::new(send),
                        recv: Box::new(recv),
                        connection_id: id,
                        relay: connection.remote_address().to_string(),
                    });
                }
                Ok(Err(e)) if attempt < 2 => {
                    warn!(error = %e, "could not open a stream; retrying on another connection");
                    avoid = Some(id);
                }
                Ok(Err(e)) => return Err(e.into()),
                // Every stream of this connection stayed busy: another
                // relay that is up right now may have room.
                Err(_) if attempt < 2 && choose(&self.links.borrow(), Some(id)).is_some() => {
                    warn!("no free stream on this connection in time; trying another relay");
                    avoid = Some(id);
                }
                Err(_) => {
                    return Err(TunnelError::StreamTimeout(
                        self.settings.open_stream_timeout,
                    ));
                }
            }
        }
    }
}

/// The first link, in order of preference, with a live connection other than `avoid`.
fn choose(links: &[RelayLink], avoid: Option<u64>) -> Option<(quinn::Connection, u64)> {
    links
        .iter()
        .filter_map(RelayLink::usable)
        .find(|(_, id)| Some(*id) != avoid)
        .map(|(connection, id)| (connection.clone(), id))
}

/// Each relay's last error ("ADDR: error; ..."), for 503 messages and
/// `/healthz`; `None` when no attempt has failed yet.
pub fn last_errors(links: &[RelayLink]) -> Option<String> {
    let errors: Vec<String> = links
        .iter()
        .filter_map(|link| match &link.state {
            LinkState::Connecting {
                last_error: Some(e),
            } => Some(format!("{}: {e}", link.address)),
            _ => None,
        })
        .collect();
    (!errors.is_empty()).then(|| errors.join("; "))
}

/// A receiving half counted in the tunnel's open streams while it lives.
struct CountedRecv {
    inner: quinn::RecvStream,
    open_streams: Arc<AtomicUsize>,
}

impl CountedRecv {
    fn new(inner: quinn::RecvStream, open_streams: Arc<AtomicUsize>) -> CountedRecv {
        open_streams.fetch_add(1, Ordering::Relaxed);
        CountedRecv {
            inner,
            open_streams,
        }
    }
}

impl Drop for CountedRecv {
    fn drop(&mut self) {
        self.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl tokio::io::AsyncRead for CountedRecv {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl RecvHalf for CountedRecv {
    fn stop(&mut self, code: u32) {
        RecvHalf::stop(&mut self.inner, code);
    }
}

/// Capped exponential backoff with jitter: each step is drawn from the
/// upper half of the current delay, which doubles up to the cap.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.current;
        self.current = (self.current * 2).min(self.max);
        delay.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    fn reset(&mut self) {
        self.current = self.min;
    }
}

/// The UDP endpoints of one link, made on first use per address family.
#[derive(Debug, Default)]
struct Endpoints {
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    fn for_address(&mut self, addr: std::net::SocketAddr) -> Result<quinn::Endpoint, String> {
        let (slot, bind): (_, std::net::SocketAddr) = if addr.is_ipv4() {
            (&mut self.v4, (std::net::Ipv4Addr::UNSPECIFIED, 0).into())
        } else {
            (&mut self.v6, (std::net::Ipv6Addr::UNSPECIFIED, 0).into())
        };
        if let Some(endpoint) = slot {
            return Ok(endpoint.clone());
        }
        let endpoint = quic::endpoint(bind, None).map_err(|e| passage_shared::error_chain(&e))?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    fn all(&self) -> Vec<quinn::Endpoint> {
        self.v4.iter().chain(self.v6.iter()).cloned().collect()
    }
}

/// The task that keeps one relay's connection up.
struct Link {
    index: usize,
    target: RelayTarget,
    client_config: quinn::ClientConfig,
    settings: TunnelSettings,
    links: Arc<watch::Sender<Vec<RelayLink>>>,
    endpoints: Arc<Mutex<Endpoints>>,
}

impl Link {
    fn publish(&self, state: LinkState) {
        self.links.send_modify(|links| {
            if let Some(link) = links.get_mut(self.index) {
                if matches!(state, LinkState::Up { .. }) {
                    link.established += 1;
                }
                link.state = state;
            }
        });
    }

    async fn run(self, shutdown: CancellationToken) {
        let relay = self.target.address.clone();
        let mut backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        let mut next_attempt = Instant::now();
        loop {
            let Some(connection) = self
                .establish(&mut backoff, &mut next_attempt, &shutdown)
                .await
            else {
                break;
            };
            info!(%relay, rtt_ms = connection.rtt().as_millis() as u64, "tunnel up");
            self.publish(LinkState::Up {
                connection: connection.clone(),
                id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
            });
            let up_since = Instant::now();
            let (reason, relay_leaving) = tokio::select! {
                _ = shutdown.cancelled() => {
                    connection.close(0u32.into(), b"client shutting down");
                    break;
                }
                reason = connection.closed() => (format!("connection lost: {reason}"), false),
                () = go_away(&connection) => ("the relay is shutting down".to_owned(), true),
            };
            warn!(%relay, %reason, "relay link down; reconnecting");
            self.publish(LinkState::Connecting {
                last_error: Some(reason),
            });
            // A connection that held, or a relay that left in good order, is
            // no reason to wait; one that dropped at once (a relay that
            // accepts and closes) must not make the client spin.
            if relay_leaving || up_since.elapsed() >= STABLE_CONNECTION {
                backoff.reset();
                next_attempt = Instant::now();
            } else {
                next_attempt = Instant::now() + backoff.next_delay();
            }
        }
        self.publish(LinkState::Stopped);
        let endpoints = match self.endpoints.lock() {
            Ok(endpoints) => endpoints.all(),
            Err(poisoned) => poisoned.into_inner().all(),
        };
        for endpoint in endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }

    /// Starts attempts on the backoff schedule until one completes; `None` on shutdown.
    async fn establish(
        &self,
        backoff: &mut Backoff,
        next_attempt: &mut Instant,
        shutdown: &CancellationToken,
    ) -> Option<quinn::Connection> {
        let mut attempts = FuturesUnordered::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep_until(*next_attempt) => {
                    attempts.push(attempt(
                        self.target.clone(),
                        self.client_config.clone(),
                        self.endpoints.clone(),
                        self.settings.connect_timeout,
                    ));
                    *next_attempt = Instant::now() + backoff.next_delay();
                }
                Some(result) = attempts.next(), if !attempts.is_empty() => match result {
                    Ok(connection) => return Some(connection),
                    Err(e) => {
                        warn!(relay = %self.target.address, error = %e, "cannot reach relay");
                        self.publish(LinkState::Connecting { last_error: Some(e) });
                    }
                },
            }
        }
    }
}

/// One connection attempt: resolve, handshake, welcome, within `timeout`.
async fn attempt(
    target: RelayTarget,
    client_config: quinn::ClientConfig,
    endpoints: Arc<Mutex<Endpoints>>,
    timeout: Duration,
) -> Result<quinn::Connection, String> {
    tokio::time::timeout(timeout, handshake(&target, client_config, &endpoints))
        .await
        .unwrap_or_else(|_| Err(format!("no handshake within {timeout:?}")))
}

async fn handshake(
    target: &RelayTarget,
    client_config: quinn::ClientConfig,
    endpoints: &Mutex<Endpoints>,
) -> Result<quinn::Connection, String> {
    let addr = tokio::net::lookup_host(&target.address)
        .await
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| "the name resolves to no address".to_owned())?;
    let endpoint = endpoints
        .lock()
        .map_err(|_| "endpoint lock poisoned".to_owned())?
        .for_address(addr)?;
    let connecting = endpoint
        .connect_with(client_config, addr, &target.server_name)
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

/// Resolves when the relay announces its shutdown; never if the connection ends first.
async fn go_away(connection: &quinn::Connection) {
    while let Ok(stream) = connection.accept_uni().await {
        if let Some(Ok(Frame::GoAway)) = frame_reader(stream).next().await {
            return;
        }
    }
    std::future::pending().await
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

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut backoff = Backoff::new(min, max);
        let mut nominal = min;
        for _ in 0..10 {
            let delay = backoff.next_delay();
            assert!(
                delay >= nominal / 2 && delay <= nominal,
                "{delay:?} vs {nominal:?}"
            );
            nominal = (nominal * 2).min(max);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= min);
    }
}
