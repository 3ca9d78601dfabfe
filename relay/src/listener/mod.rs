//! The relay's listener: accepts tunnel connections over QUIC and over TLS
//! on TCP (the fallback for clients whose networks block UDP), admits
//! clients whose certificates chain to the CA, names each by its
//! certificate, and hands every stream to [`crate::stream::handle`]. Both
//! transports meet the same rules: the same verifier and revocation list,
//! the same refusals counted by the same reasons, the same welcome and
//! go-away; past the handshake a connection is a [`ClientConnection`] and
//! the code is one path.
//!
//! Shutdown: when the token fires, no new connection is accepted, every
//! client gets a `GoAway` (it sends new requests elsewhere), streams that
//! still arrive are refused unread ([`reset_code::REFUSED`]: the client may
//! resend them), and in-flight streams get up to the drain timeout to
//! finish and their clients to close the connection; then the endpoint
//! closes.
//!
//! Revocation and renewal: on a reload request (SIGHUP), when the PKI
//! files change on disk, and when a revocation set for later falls due,
//! the listener re-reads the revocation list and the relay's certificate
//! ([`PkiWatch`]); the TLS verifier refuses revoked certificates from then
//! on, open connections that present one are closed, and new handshakes
//! get a renewed relay certificate.
//!
//! While it runs, the listener logs a status line (connections, open
//! streams, live tasks) at most once per status interval and only when
//! those figures changed, so an operator can see them return to zero.

mod connection;
mod handshake;
mod live;

use std::sync::Arc;
use std::time::Duration;

use std::net::SocketAddr;

use passage_shared::revocation::Revocations;
use passage_shared::transport::TransportTuning;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::pki_watch::PkiWatch;
use crate::stream::StreamContext;

use handshake::{quic_connection, tcp_connection};
use live::{Live, Unannounced, due_instant, reload_pki, sleep_until_due};

/// Longest a TLS handshake may take before the attempt is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a shutting-down relay waits for its go-aways to be sent.
const GO_AWAY_WAIT: Duration = Duration::from_secs(1);

/// How often the relay looks for a QUIC client's new address (migration).
const ADDRESS_CHECK: Duration = Duration::from_secs(1);

/// The TCP side of the listener: its socket and how to run its handshakes.
pub struct TcpSide {
    /// The bound listener.
    pub listener: TcpListener,
    /// TLS with the relay's identity, the client verifier and ALPN `passage-tcp/1`.
    pub acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for TcpSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpSide")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// What each connection task needs besides its connection.
#[derive(Clone)]
struct ConnectionContext {
    ctx: Arc<StreamContext>,
    streams: TaskTracker,
    live: Arc<Live>,
    revocations: Revocations,
    tuning: TransportTuning,
    max_streams: u32,
    shutdown: CancellationToken,
}

/// What the listener serves with: its sockets, the requests' context, the
/// transport's settings and the PKI it watches.
pub struct Listener {
    /// The QUIC endpoint.
    pub endpoint: quinn::Endpoint,
    /// TLS over TCP, unless it is off.
    pub tcp: Option<TcpSide>,
    /// What every request stream shares.
    pub ctx: Arc<StreamContext>,
    /// Keep-alive, idle timeout and windows of every connection.
    pub tuning: TransportTuning,
    /// Most request streams open at once per connection.
    pub max_streams: u32,
    /// How long in-flight streams may run on after shutdown.
    pub drain_timeout: Duration,
    /// Least time between two status lines.
    pub status_interval: Duration,
    /// The revocation list and relay certificate, and when to re-read them.
    pub pki: PkiWatch,
}

/// The tasks of a running listener: one per connection, one per stream,
/// and the count of clients yet to hear the go-away.
struct Running {
    context: ConnectionContext,
    connections: TaskTracker,
    unannounced: Arc<watch::Sender<usize>>,
}

/// Accepts connections (QUIC, and TLS over TCP if on) until `shutdown`
/// fires, then drains in-flight streams.
pub async fn serve(listener: Listener, shutdown: CancellationToken) {
    let running = Running {
        context: ConnectionContext {
            ctx: listener.ctx.clone(),
            streams: TaskTracker::new(),
            live: Arc::new(Live::default()),
            revocations: listener.pki.revocations.clone(),
            tuning: listener.tuning,
            max_streams: listener.max_streams,
            shutdown,
        },
        connections: TaskTracker::new(),
        unannounced: Arc::new(watch::channel(0usize).0),
    };
    accept_until_shutdown(&listener, &running).await;
    drain(listener, running).await;
}

/// Accepts connections on both transports, logs the status and reloads
/// the PKI when asked, when its files change and when a revocation falls
/// due, until shutdown.
async fn accept_until_shutdown(listener: &Listener, running: &Running) {
    let (context, pki, tcp) = (&running.context, &listener.pki, &listener.tcp);
    let live = &context.live;
    // A zero period would make tokio's interval panic.
    let mut status =
        tokio::time::interval(listener.status_interval.max(Duration::from_millis(100)));
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = None;
    let mut look = tokio::time::interval(crate::pki_watch::LOOK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due = due_instant(pki.next_due());
    loop {
        tokio::select! {
            _ = context.shutdown.cancelled() => break,
            _ = status.tick() => log_status(&running.connections, &context.streams, &mut last_status),
            () = pki.requested.notified() => due = reload_pki(pki, live),
            _ = look.tick() => if pki.changed_on_disk() {
                due = reload_pki(pki, live);
            },
            () = sleep_until_due(due) => due = reload_pki(pki, live),
            incoming = listener.endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let unannounced = Unannounced::register(&running.unannounced);
                running.connections.spawn(quic_connection(incoming, context.clone(), unannounced));
            }
            accepted = accept_tcp(tcp.as_ref()) => match (accepted, tcp) {
                (Ok((stream, remote)), Some(tcp)) => {
                    let unannounced = Unannounced::register(&running.unannounced);
                    let acceptor = tcp.acceptor.clone();
                    running.connections.spawn(tcp_connection(stream, remote, acceptor, context.clone(), unannounced));
                }
                (Ok(_), None) => {}
                (Err(e), _) => {
                    // Out of file descriptors and the like: wait, then go on.
                    warn!(error = %e, "cannot accept a TCP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Refuses new connections, makes sure every client heard the go-away,
/// waits up to the drain timeout for streams and connections to end, then
/// closes what is left and the endpoint.
async fn drain(listener: Listener, running: Running) {
    let Listener {
        endpoint,
        tcp,
        drain_timeout,
        ..
    } = listener;
    let Running {
        context,
        connections,
        unannounced,
    } = running;
    let streams = &context.streams;
    // Refuse new connections while the old ones drain.
    endpoint.set_server_config(None);
    drop(tcp);
    // Every client hears the go-away before the drain starts, even when no
    // stream is in flight and the endpoint is about to close.
    let _ = tokio::time::timeout(
        GO_AWAY_WAIT,
        unannounced.subscribe().wait_for(|pending| *pending == 0),
    )
    .await;
    streams.close();
    connections.close();
    info!(
        open_streams = streams.len(),
        drain_timeout_s = drain_timeout.as_secs(),
        "shutting down: draining in-flight streams"
    );
    // Drained means every stream task ended and then every client closed
    // its connection: a passage client does that once it has read the last
    // of its responses, so nothing still in flight is cut by the close.
    let drained = async {
        streams.wait().await;
        connections.wait().await;
    };
    if tokio::time::timeout(drain_timeout, drained).await.is_err() {
        warn!(
            open_streams = streams.len(),
            connections = connections.len(),
            drain_timeout_s = drain_timeout.as_secs(),
            "drain timeout reached; closing the remaining connections"
        );
        // WebSocket sessions still open close with 1001 first, not cut.
        context.ctx.ws_closing.cancel();
        let _ = tokio::time::timeout(SESSION_CLOSE_WAIT, streams.wait()).await;
        context.live.close_all();
    }
    endpoint.close(0u32.into(), b"relay shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// How long WebSocket sessions get to send their 1001 close once the drain
/// timeout has run out.
const SESSION_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The next TCP connection; never resolves without a TCP listener.
async fn accept_tcp(tcp: Option<&TcpSide>) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match tcp {
        Some(tcp) => tcp.listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Logs connections, open streams and live tasks if they changed since the last line.
fn log_status(
    connections: &TaskTracker,
    streams: &TaskTracker,
    last: &mut Option<(usize, usize, usize)>,
) {
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let now = (connections.len(), streams.len(), tasks);
    if last.is_some_and(|last| last == now) {
        return;
    }
    *last = Some(now);
    info!(
        connections = now.0,
        open_streams = now.1,
        tasks = now.2,
        "status"
    );
}
