//! The task that keeps one relay's connection up: it races handshakes,
//! watches the live connection for silence and go-aways, probes QUIC
//! while on TCP, and reconnects on the backoff schedule.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use passage_shared::frame::close_code;
use passage_shared::transport::TransportKind;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::link_state::{LinkState, Liveness, RelayLink};
use super::retry::{AttemptErrors, Backoff};
use super::setup::{RelayTarget, TunnelSettings};
use crate::connect::{Dialer, Established, NO_REPLY, TransportChoice};
use crate::transport_memory::TransportMemory;

/// A connection that lasted this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// How often a link looks at what its connection has heard.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// Numbers every connection the client makes, so one that failed can be
/// told apart from its successor (quinn's `stable_id` is an address and
/// may be reused once the old connection is freed).
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

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
pub(super) struct Link {
    pub(super) index: usize,
    pub(super) target: RelayTarget,
    pub(super) dialer: Dialer,
    pub(super) settings: TunnelSettings,
    pub(super) links: Arc<watch::Sender<Vec<RelayLink>>>,
    pub(super) memory: Arc<TransportMemory>,
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

    pub(super) async fn run(self, shutdown: CancellationToken) {
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
            let (kind, liveness) = self.come_up(&established);
            last_good = Some(kind);
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
        self.stop().await;
    }

    /// Publishes a connection that has just been established as the
    /// link's, remembering its transport; returns the transport and the
    /// liveness the link keeps for it.
    fn come_up(&self, established: &Established) -> (TransportKind, Arc<Liveness>) {
        let relay = &self.target.address;
        let connection = established.connection.clone();
        let kind = connection.kind();
        self.memory.remember(relay, kind);
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
        (kind, liveness)
    }

    /// Marks the link stopped and gives its endpoints a moment to close
    /// their connections cleanly.
    async fn stop(&self) {
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
