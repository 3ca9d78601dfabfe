//! The tunnel: one connection per configured relay, each kept up by its
//! own link task, and streams for requests handed out over the first
//! healthy one.
//!
//! Relays are listed in order of preference (the bundle's, then `--relay`
//! additions). The client keeps a connection to every one of them, so a
//! standby is already up when the preferred relay dies; new requests go
//! to the first relay in the list whose connection is up and that has not
//! announced a shutdown. Requests that arrive while none is up wait up to
//! the connect wait for one.
//!
//! Transports: with `auto` (the default) a link starts QUIC handshakes; if
//! none has completed after a short head start, it races TLS-over-TCP
//! handshakes beside them and takes whichever completes first. While it
//! runs on TCP it probes QUIC again in the background (after 10 s, then
//! backing off to 60 s) and moves new requests to QUIC once a probe
//! succeeds; requests in flight finish on TCP. A link whose last good
//! connection was TCP (in this process or, through the state file, the
//! previous one) races both at once next time.
//!
//! Reconnecting: a link starts a handshake at once, then another after
//! each backoff step (100 ms doubling to a 1 s cap, each step drawn from
//! its upper half), while earlier attempts are still waiting for an
//! answer; each attempt gives up after the connect timeout and the first
//! to complete wins. A relay that comes back is thus reached within about
//! a second, and a dead one costs a few small packets a second. Attempts
//! that lose the race are closed as abandoned, which the relay logs as
//! routine.
//!
//! Liveness: both transports keep the connection busy with keep-alives,
//! and the link watches what arrives. A connection from which nothing was
//! heard for the silence limit (3 s) is closed as dead, well before the
//! transport's own idle timeout: requests the relay never received are
//! then sent again elsewhere. One silent for longer than the confirmation
//! window (2.5 keep-alives) is not confirmed alive, and `/healthz` says so.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use passage_shared::bundle::relay_host;
use passage_shared::frame::close_code;
use passage_shared::transport::{BoxRecv, BoxSend, RecvHalf, TransportKind, TransportTuning};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::connect::{Connection, Dialer, Endpoints, Established, NO_REPLY, TransportChoice};
use crate::transport_memory::TransportMemory;

/// A connection that lasted this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// How often a link looks at what its connection has heard.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

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

/// When a connection last heard from its relay.
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    /// Milliseconds after `started` of the last sign of life.
    heard_at_ms: AtomicU64,
}

impl Liveness {
    fn new() -> Liveness {
        Liveness {
            started: Instant::now(),
            heard_at_ms: AtomicU64::new(0),
        }
    }

    fn heard_now(&self) {
        self.heard_at_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long nothing has arrived from the relay.
    pub fn silent_for(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(
            self.heard_at_ms.load(Ordering::Relaxed),
        ))
    }
}

/// Where the link to one relay stands.
#[derive(Debug, Clone)]
pub enum LinkState {
    /// No usable connection; the link is (re)connecting.
    Connecting {
        /// Why the last attempts or connection failed.
        last_error: Option<String>,
    },
    /// Connected; new requests may use it.
    Up {
        /// The live connection.
        connection: Connection,
        /// This client's number for the connection.
        id: u64,
        /// When it last heard from the relay.
        liveness: Arc<Liveness>,
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
    /// Times the link came up on TCP while `auto` would have preferred QUIC.
    pub fallbacks: u64,
    /// QUIC probes made while on TCP, and how many of them succeeded.
    pub probes: u64,
    /// QUIC probes that succeeded (the link then moved to QUIC).
    pub probes_succeeded: u64,
}

impl RelayLink {
    /// The connection new requests may use: up, and not closed since.
    pub fn usable(&self) -> Option<(&Connection, u64)> {
        match &self.state {
            LinkState::Up { connection, id, .. } if connection.close_reason().is_none() => {
                Some((connection, *id))
            }
            _ => None,
        }
    }

    /// How long the usable connection has been silent, if there is one.
    pub fn silent_for(&self) -> Option<Duration> {
        match &self.state {
            LinkState::Up { liveness, .. } if self.usable().is_some() => {
                Some(liveness.silent_for())
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
    Lost(String),
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

impl Tunnel {
    /// Starts one link task per target, which run until `shutdown` fires;
    /// await the handle to let them close their connections cleanly.
    pub fn start(
        targets: Vec<RelayTarget>,
        setup: TunnelSetup,
        shutdown: CancellationToken,
    ) -> (Tunnel, tokio::task::JoinHandle<()>) {
        let settings = setup.settings;
        let initial = targets
            .iter()
            .map(|target| RelayLink {
                address: target.address.clone(),
                state: LinkState::Connecting { last_error: None },
                established: 0,
                fallbacks: 0,
                probes: 0,
                probes_succeeded: 0,
            })
            .collect();
        let (links_tx, links) = watch::channel(initial);
        let links_tx = Arc::new(links_tx);
        let mut tasks = JoinSet::new();
        for (index, target) in targets.into_iter().enumerate() {
            let link = Link {
                index,
                dialer: Dialer {
                    server_name: target.server_name.clone(),
                    quic: setup.quic.clone(),
                    tls: setup.tls.clone(),
                    tuning: settings.transport,
                    endpoints: Arc::new(Mutex::new(Endpoints::default())),
                },
                target,
                settings,
                links: links_tx.clone(),
                memory: setup.memory.clone(),
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

    /// The tunnel's timing.
    pub fn settings(&self) -> &TunnelSettings {
        &self.settings
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
    ) -> Result<(Connection, u64), TunnelError> {
        let deadline = Instant::now() + wait;
        let mut links = self.links.clone();
        loop {
            {
                let current = links.borrow_and_update();
                if let Some(connection) = choose(&current, avoid, self.settings.confirm_within) {
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
                tokio::time::timeout(self.settings.open_stream_timeout, connection.open_stream())
                    .await;
            match opened {
                Ok(Ok((send, recv))) => {
                    let recv = CountedRecv::new(recv, self.open_streams.clone());
                    return Ok(OpenedStream {
                        send,
                        recv: Box::new(recv),
                        connection_id: id,
                        relay: connection.remote_address().to_string(),
                    });
                }
                Ok(Err(e)) if attempt < 2 => {
                    warn!(error = %e, "could not open a stream; retrying on another connection");
                    avoid = Some(id);
                }
                Ok(Err(e)) => return Err(TunnelError::Lost(e)),
                // Every stream of this connection stayed busy: another
                // relay that is up right now may have room.
                Err(_)
                    if attempt < 2
                        && choose(&self.links.borrow(), Some(id), self.settings.confirm_within)
                            .is_some() =>
                {
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

/// The first link, in order of preference, with a live connection other
/// than `avoid`; one heard from within `confirm_within` comes before one
/// that has gone quiet (it may be dead and not yet known to be).
fn choose(
    links: &[RelayLink],
    avoid: Option<u64>,
    confirm_within: Duration,
) -> Option<(Connection, u64)> {
    let candidates = || {
        links
            .iter()
            .filter_map(|link| link.usable().map(|usable| (link, usable)))
            .filter(|(_, (_, id))| Some(*id) != avoid)
    };
    candidates()
        .find(|(link, _)| link.silent_for().is_some_and(|s| s <= confirm_within))
        .or_else(|| candidates().next())
        .map(|(_, (connection, id))| (connection.clone(), id))
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
    inner: BoxRecv,
    open_streams: Arc<AtomicUsize>,
}

impl CountedRecv {
    fn new(inner: BoxRecv, open_streams: Arc<AtomicUsize>) -> CountedRecv {
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
        self.inner.stop(code);
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

/// What the failed attempts of one transport said.
#[derive(Debug, Default)]
struct TransportErrors {
    last: Option<String>,
    /// Consecutive attempts that got no reply at all.
    no_reply: u32,
}

/// What the failed attempts to reach one relay said, per transport.
#[derive(Debug, Default)]
struct AttemptErrors {
    quic: TransportErrors,
    tcp: TransportErrors,
}

impl AttemptErrors {
    fn record(&mut self, kind: TransportKind, error: String) {
        let errors = match kind {
            TransportKind::Quic => &mut self.quic,
            TransportKind::Tcp => &mut self.tcp,
        };
        if error == NO_REPLY {
            errors.no_reply += 1;
        } else {
            errors.no_reply = 0;
        }
        errors.last = Some(error);
    }

    /// One line naming each transport tried and what it got.
    fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(last) = &self.quic.last {
            parts.push(match self.quic.no_reply {
                0 => format!("QUIC: {last}"),
                1 => "QUIC: no reply to a handshake — UDP may be blocked".to_owned(),
                n => format!("QUIC: no reply to {n} handshakes — UDP may be blocked"),
            });
        }
        if let Some(last) = &self.tcp.last {
            parts.push(format!("TCP: {last}"));
        }
        parts.join("; ")
    }
}

/// How holding a connection ended.
enum Held {
    /// The client is shutting down.
    Shutdown,
    /// The connection failed, went silent, or the relay is leaving.
    Lost { reason: String, relay_leaving: bool },
    /// A QUIC probe succeeded: new requests move to this connection.
    Replaced(Box<Established>),
}

/// An attempt's transport and outcome.
type Attempt = BoxFuture<'static, (TransportKind, Result<Established, String>)>;

/// Lets attempts that lost the race finish in the background and closes
/// those that connect as abandoned, so the relay logs them as routine
/// rather than as handshakes aborted half-way.
fn abandon(attempts: FuturesUnordered<Attempt>) {
    if attempts.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut attempts = attempts;
        while let Some((kind, result)) = attempts.next().await {
            if let Ok(established) = result {
                debug!(transport = %kind, "closing a handshake that lost the race");
                established.abandon();
            }
        }
    });
}

/// The task that keeps one relay's connection up.
struct Link {
    index: usize,
    target: RelayTarget,
    dialer: Dialer,
    settings: TunnelSettings,
    links: Arc<watch::Sender<Vec<RelayLink>>>,
    memory: Arc<TransportMemory>,
}

impl Link {
    fn update(&self, change: impl FnOnce(&mut RelayLink)) {
        self.links.send_modify(|links| {
            if let Some(link) = links.get_mut(self.index) {
                change(link);
            }
        });
    }

    fn publish(&self, state: LinkState) {
        self.update(|link| {
            if matches!(state, LinkState::Up { .. }) {
                link.established += 1;
            }
            link.state = state;
        });
    }

    async fn run(self, shutdown: CancellationToken) {
        let relay = self.target.address.clone();
        let mut backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        let mut next_attempt = Instant::now();
        let mut last_good = self.memory.get(&relay);
        let mut replacement = None;
        // The pause before the next QUIC probe while on TCP; it keeps
        // growing across connections while QUIC keeps failing soon after
        // a probe (UDP that lets handshakes through, then drops data).
        let mut probe_delay = self.settings.probe_first;
        let mut moved_to_quic: Option<Instant> = None;
        loop {
            let (mut established, pending_quic) = match replacement.take() {
                Some(established) => (established, FuturesUnordered::new()),
                None => match self
                    .establish(&mut backoff, &mut next_attempt, last_good, &shutdown)
                    .await
                {
                    Some(won) => won,
                    None => break,
                },
            };
            let connection = established.connection.clone();
            let kind = connection.kind();
            last_good = Some(kind);
            self.memory.remember(&relay, kind);
            info!(%relay, transport = %kind, rtt_ms = connection.rtt().as_millis() as u64, "tunnel up");
            let liveness = Arc::new(Liveness::new());
            liveness.heard_now();
            if kind == TransportKind::Tcp && self.settings.choice == TransportChoice::Auto {
                self.update(|link| link.fallbacks += 1);
            }
            self.publish(LinkState::Up {
                connection,
                id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
                liveness: liveness.clone(),
            });
            let up_since = Instant::now();
            let (reason, relay_leaving) = match self
                .hold(
                    &mut established,
                    pending_quic,
                    &mut probe_delay,
                    &liveness,
                    &shutdown,
                )
                .await
            {
                Held::Shutdown => break,
                Held::Replaced(quic) => {
                    info!(%relay, "QUIC answers again; new requests move to it, those in flight finish over TCP");
                    established.leave(close_code::CLIENT_SHUTDOWN, "moved to QUIC");
                    replacement = Some(*quic);
                    moved_to_quic = Some(Instant::now());
                    continue;
                }
                Held::Lost {
                    reason,
                    relay_leaving,
                } => (reason, relay_leaving),
            };
            warn!(%relay, transport = %kind, %reason, "relay link down; reconnecting");
            match moved_to_quic.take() {
                // QUIC held only briefly after a probe: TCP is what works
                // here, and the next probe waits longer.
                Some(moved)
                    if kind == TransportKind::Quic && moved.elapsed() < STABLE_CONNECTION =>
                {
                    last_good = Some(TransportKind::Tcp);
                    probe_delay = (probe_delay * 2).min(self.settings.probe_max);
                }
                _ => probe_delay = self.settings.probe_first,
            }
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
        let endpoints = match self.dialer.endpoints.lock() {
            Ok(endpoints) => endpoints.all(),
            Err(poisoned) => poisoned.into_inner().all(),
        };
        for endpoint in endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }

    /// Watches a live connection until it fails, goes silent, the relay
    /// leaves, a QUIC probe replaces it, or the client shuts down. QUIC
    /// handshakes still pending when TCP won (`probes`) count as the first
    /// probes: QUIC is taken as soon as one completes.
    async fn hold(
        &self,
        established: &mut Established,
        mut probes: FuturesUnordered<Attempt>,
        probe_delay: &mut Duration,
        liveness: &Liveness,
        shutdown: &CancellationToken,
    ) -> Held {
        let Established {
            connection,
            control,
        } = established;
        let go_away = control.go_away();
        tokio::pin!(go_away);
        let mut heard = connection.heard();
        let mut heard_at = Instant::now();
        let mut watch = tokio::time::interval(WATCH_INTERVAL);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let probing = connection.kind() == TransportKind::Tcp
            && self.settings.choice == TransportChoice::Auto;
        let mut probe_at = probing.then(|| Instant::now() + *probe_delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    connection.close(close_code::CLIENT_SHUTDOWN, "client shutting down");
                    return Held::Shutdown;
                }
                reason = connection.closed() => {
                    return Held::Lost { reason: format!("connection lost: {reason}"), relay_leaving: false };
                }
                () = &mut go_away => {
                    return Held::Lost { reason: "the relay is shutting down".to_owned(), relay_leaving: true };
                }
                _ = watch.tick() => {
                    let now = connection.heard();
                    if now != heard {
                        heard = now;
                        heard_at = Instant::now();
                        liveness.heard_now();
                    } else if heard_at.elapsed() >= self.settings.silence_limit {
                        let reason = format!(
                            "nothing heard from the relay for {:.1} s",
                            heard_at.elapsed().as_secs_f64()
                        );
                        connection.close(close_code::CLIENT_SHUTDOWN, &reason);
                        return Held::Lost { reason, relay_leaving: false };
                    }
                }
                _ = sleep_until_some(probe_at), if probes.is_empty() && probe_at.is_some() => {
                    probes.push(self.attempt(TransportKind::Quic));
                }
                Some((_, result)) = probes.next(), if !probes.is_empty() => {
                    let succeeded = result.is_ok();
                    self.update(|link| {
                        link.probes += 1;
                        link.probes_succeeded += u64::from(succeeded);
                    });
                    match result {
                        Ok(quic) => {
                            abandon(std::mem::take(&mut probes));
                            return Held::Replaced(Box::new(quic));
                        }
                        Err(e) if probes.is_empty() => {
                            debug!(relay = %self.target.address, error = %e, "QUIC probe failed; staying on TCP");
                            *probe_delay = (*probe_delay * 2).min(self.settings.probe_max);
                            probe_at = Some(Instant::now() + *probe_delay);
                        }
                        Err(_) => {}
                    }
                }
            }
        }
    }

    /// Starts attempts on the backoff schedule until one completes; `None`
    /// on shutdown. With `auto`, TCP attempts start after the head start
    /// (at once when TCP was what worked last) on a schedule of their own.
    /// When TCP wins, the QUIC attempts still pending come back with it:
    /// QUIC may yet answer, and is preferred when it does.
    async fn establish(
        &self,
        backoff: &mut Backoff,
        next_attempt: &mut Instant,
        last_good: Option<TransportKind>,
        shutdown: &CancellationToken,
    ) -> Option<(Established, FuturesUnordered<Attempt>)> {
        let start = *next_attempt;
        let (mut next_quic, mut next_tcp) = match self.settings.choice {
            TransportChoice::Quic => (Some(start), None),
            TransportChoice::Tcp => (None, Some(start)),
            TransportChoice::Auto if last_good == Some(TransportKind::Tcp) => {
                (Some(start), Some(start))
            }
            TransportChoice::Auto => (Some(start), Some(start + self.settings.tcp_head_start)),
        };
        let mut tcp_backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        let mut quic: FuturesUnordered<Attempt> = FuturesUnordered::new();
        let mut tcp: FuturesUnordered<Attempt> = FuturesUnordered::new();
        let mut errors = AttemptErrors::default();
        loop {
            let (kind, result) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                Some(done) = quic.next(), if !quic.is_empty() => done,
                Some(done) = tcp.next(), if !tcp.is_empty() => done,
                _ = sleep_until_some(next_quic), if next_quic.is_some() => {
                    quic.push(self.attempt(TransportKind::Quic));
                    let delay = backoff.next_delay();
                    next_quic = Some(Instant::now() + delay);
                    *next_attempt = Instant::now() + delay;
                    continue;
                }
                _ = sleep_until_some(next_tcp), if next_tcp.is_some() => {
                    tcp.push(self.attempt(TransportKind::Tcp));
                    next_tcp = Some(Instant::now() + tcp_backoff.next_delay());
                    continue;
                }
            };
            match result {
                Ok(established) if kind == TransportKind::Quic => {
                    abandon(quic);
                    abandon(tcp);
                    return Some((established, FuturesUnordered::new()));
                }
                Ok(established) => {
                    abandon(tcp);
                    return Some((established, quic));
                }
                Err(e) => {
                    warn!(relay = %self.target.address, transport = %kind, error = %e, "cannot reach relay");
                    errors.record(kind, e);
                    self.publish(LinkState::Connecting {
                        last_error: Some(errors.summary()),
                    });
                }
            }
        }
    }

    /// One connection attempt over `kind`: resolve, handshake, welcome,
    /// within the connect timeout.
    fn attempt(&self, kind: TransportKind) -> Attempt {
        let dialer = self.dialer.clone();
        let address = self.target.address.clone();
        let tcp_port = self.target.tcp_port;
        let timeout = self.settings.connect_timeout;
        Box::pin(async move {
            let dial = async {
                let addr = resolve(&address).await?;
                match kind {
                    TransportKind::Quic => dialer.quic(addr).await,
                    TransportKind::Tcp => {
                        let port = tcp_port.unwrap_or(addr.port());
                        dialer.tcp(SocketAddr::new(addr.ip(), port)).await
                    }
                }
            };
            let result = match tokio::time::timeout(timeout, dial).await {
                Ok(result) => result,
                Err(_) if kind == TransportKind::Quic => Err(NO_REPLY.to_owned()),
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
            (kind, result)
        })
    }
}

/// The first address `address` resolves to.
async fn resolve(address: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or_else(|| "the name resolves to no address".to_owned())
}

/// Sleeps until `at`; never returns when there is none.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
