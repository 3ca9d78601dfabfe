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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::net::SocketAddr;

use passage_shared::control::{self, ControlError, ControlMessage};
use passage_shared::frame::{ALPN_TCP, Welcome, close_code, reset_code};
use passage_shared::pki::certificate_common_name;
use passage_shared::revocation::{Fingerprint, Revocations, fingerprint};
use passage_shared::transport::{BoxRecv, BoxSend, Ended, TransportKind, TransportTuning, tcp};
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::pki_watch::PkiWatch;
use crate::stream::{self, StreamContext};

/// Longest a TLS handshake may take before the attempt is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a shutting-down relay waits for its go-aways to be sent.
const GO_AWAY_WAIT: Duration = Duration::from_secs(1);

/// How often the relay looks for a QUIC client's new address (migration).
const ADDRESS_CHECK: Duration = Duration::from_secs(1);

/// One open client connection: its certificate's fingerprint, the
/// client's name, and how to close it.
type LiveEntry = (Fingerprint, Arc<str>, Closer);

/// Open client connections by number, with their certificate's
/// fingerprint, so a reload can close the revoked ones.
#[derive(Debug, Default)]
struct Live {
    next: AtomicU64,
    connections: Mutex<HashMap<u64, LiveEntry>>,
}

impl Live {
    /// Records `connection`; it is forgotten when the returned guard drops.
    fn register(
        self: &Arc<Self>,
        print: Fingerprint,
        client: Arc<str>,
        connection: Closer,
    ) -> LiveGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, (print, client, connection));
        LiveGuard {
            live: self.clone(),
            id,
        }
    }

    /// Closes every open connection whose certificate is now revoked; returns how many.
    fn close_revoked(&self, revoked: &std::collections::HashSet<Fingerprint>) -> usize {
        let mut closed = 0;
        for (print, client, connection) in self.lock().values() {
            if revoked.contains(print) {
                warn!(client = %client, "closing a connection: its certificate was revoked");
                connection.close(close_code::REVOKED, "client certificate revoked");
                closed += 1;
            }
        }
        closed
    }

    /// Closes every open connection (the drain timeout has run out).
    fn close_all(&self) {
        for (_, _, connection) in self.lock().values() {
            connection.close(0, "relay shutting down");
        }
    }

    /// The registry, even after a panic elsewhere poisoned its lock (it
    /// must keep failing closed, not open).
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LiveEntry>> {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Removes a connection from [`Live`] when its task ends.
struct LiveGuard {
    live: Arc<Live>,
    id: u64,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.live.lock().remove(&self.id);
    }
}

/// Re-reads the PKI directory ([`PkiWatch::reload`]), closes open
/// connections of certificates now revoked, and returns when to look again
/// for a revocation set for later.
fn reload_pki(watch: &PkiWatch, live: &Live) -> Option<tokio::time::Instant> {
    let reloaded = watch.reload();
    if let Some(revoked) = &reloaded.revoked {
        let closed = live.close_revoked(revoked);
        info!(
            revoked = revoked.len(),
            closed_connections = closed,
            "revocation list reloaded"
        );
    }
    due_instant(reloaded.next_due)
}

/// The tokio instant of a wall-clock time (a second late: revocations are
/// stamped to the second).
fn due_instant(at: Option<time::OffsetDateTime>) -> Option<tokio::time::Instant> {
    let wait = at? - time::OffsetDateTime::now_utc() + time::Duration::seconds(1);
    let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
    Some(tokio::time::Instant::now() + wait)
}

/// Resolves at `due`; never without one.
async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One connection that has not yet sent its client the go-away; counted in
/// a shared number the shutdown waits on, until sent or dropped.
struct Unannounced(Arc<watch::Sender<usize>>);

impl Unannounced {
    fn register(count: &Arc<watch::Sender<usize>>) -> Unannounced {
        count.send_modify(|n| *n += 1);
        Unannounced(count.clone())
    }
}

impl Drop for Unannounced {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

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

/// Accepts connections (QUIC on `endpoint`, TLS over TCP on `tcp` if
/// given) until `shutdown` fires, then drains in-flight streams.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    endpoint: quinn::Endpoint,
    tcp: Option<TcpSide>,
    ctx: Arc<StreamContext>,
    (tuning, max_streams): (TransportTuning, u32),
    drain_timeout: Duration,
    status_interval: Duration,
    pki: PkiWatch,
    shutdown: CancellationToken,
) {
    let live = Arc::new(Live::default());
    let streams = TaskTracker::new();
    let connections = TaskTracker::new();
    let (unannounced, _) = watch::channel(0usize);
    let unannounced = Arc::new(unannounced);
    let context = ConnectionContext {
        ctx,
        streams: streams.clone(),
        live: live.clone(),
        revocations: pki.revocations.clone(),
        tuning,
        max_streams,
        shutdown: shutdown.clone(),
    };
    // A zero period would make tokio's interval panic.
    let mut status = tokio::time::interval(status_interval.max(Duration::from_millis(100)));
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = None;
    let mut look = tokio::time::interval(crate::pki_watch::LOOK_EVERY);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut due = due_instant(pki.next_due());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = status.tick() => log_status(&connections, &streams, &mut last_status),
            () = pki.requested.notified() => due = reload_pki(&pki, &live),
            _ = look.tick() => if pki.changed_on_disk() {
                due = reload_pki(&pki, &live);
            },
            () = sleep_until_due(due) => due = reload_pki(&pki, &live),
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let unannounced = Unannounced::register(&unannounced);
                connections.spawn(quic_connection(incoming, context.clone(), unannounced));
            }
            accepted = accept_tcp(tcp.as_ref()) => match (accepted, &tcp) {
                (Ok((stream, remote)), Some(tcp)) => {
                    let unannounced = Unannounced::register(&unannounced);
                    let acceptor = tcp.acceptor.clone();
                    connections.spawn(tcp_connection(stream, remote, acceptor, context.clone(), unannounced));
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
        live.close_all();
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

/// Completes one QUIC handshake and serves the connection.
async fn quic_connection(
    incoming: quinn::Incoming,
    context: ConnectionContext,
    unannounced: Unannounced,
) {
    let remote = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            // The first packet may already fail the handshake (no common
            // protocol): counted by the same reasons.
            refused(&context, remote, handshake_failure_reason(&e), &e);
            return;
        }
    };
    let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            refused(&context, remote, handshake_failure_reason(&e), &e);
            return;
        }
        Err(_) => {
            refused(&context, remote, "timeout", &"no handshake in time");
            return;
        }
    };
    let leaf = leaf_certificate(&connection);
    serve_connection(
        ClientConnection::Quic(connection),
        leaf,
        remote,
        context,
        unannounced,
    )
    .await;
}

/// Completes one TLS-over-TCP handshake and serves the connection.
async fn tcp_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    context: ConnectionContext,
    unannounced: Unannounced,
) {
    let handshake = tcp::accept_tls(stream, &acceptor, &context.tuning);
    let accepted = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            refused(&context, remote, tls_failure_reason(&e), &e);
            return;
        }
        Err(_) => {
            refused(&context, remote, "timeout", &"no handshake in time");
            return;
        }
    };
    // rustls lets a client that offers no ALPN at all through; QUIC does not.
    if accepted.tls.get_ref().1.alpn_protocol() != Some(ALPN_TCP) {
        refused(&context, remote, "wrong_alpn", &"no passage-tcp/1 ALPN");
        return;
    }
    let leaf = tcp::peer_leaf(&accepted.tls);
    let connection =
        tcp::ServerConnection::handshake(accepted, remote, context.tuning, context.max_streams);
    let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connection).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            refused(&context, remote, "protocol", &e);
            return;
        }
        Err(_) => {
            refused(&context, remote, "timeout", &"no HTTP/2 handshake in time");
            return;
        }
    };
    serve_connection(
        ClientConnection::Tcp(Box::new(connection)),
        leaf,
        remote,
        context,
        unannounced,
    )
    .await;
}

/// Counts and logs a refused handshake. A peer that closes during its
/// handshake is routine (a client that raced two and took the other), so
/// only the other reasons are warnings.
fn refused(
    context: &ConnectionContext,
    remote: SocketAddr,
    reason: &'static str,
    error: &dyn std::fmt::Display,
) {
    if let Some(metrics) = &context.ctx.metrics {
        metrics.handshake_failed(reason);
    }
    if reason == "closed_by_peer" {
        debug!(%remote, reason, error = %error, "handshake abandoned by the peer");
    } else {
        warn!(%remote, reason, error = %error, "handshake refused");
    }
}

/// A client connection past its handshake, on either transport.
enum ClientConnection {
    Quic(quinn::Connection),
    Tcp(Box<tcp::ServerConnection>),
}

/// Closes a client connection from elsewhere (a revocation, the drain's end).
#[derive(Debug, Clone)]
enum Closer {
    Quic(quinn::Connection),
    Tcp(tcp::Closer),
}

impl Closer {
    fn close(&self, code: u32, reason: &str) {
        match self {
            Closer::Quic(connection) => connection.close(code.into(), reason.as_bytes()),
            Closer::Tcp(closer) => closer.close(reason),
        }
    }
}

impl ClientConnection {
    fn kind(&self) -> TransportKind {
        match self {
            ClientConnection::Quic(_) => TransportKind::Quic,
            ClientConnection::Tcp(_) => TransportKind::Tcp,
        }
    }

    fn closer(&self) -> Closer {
        match self {
            ClientConnection::Quic(connection) => Closer::Quic(connection.clone()),
            ClientConnection::Tcp(connection) => Closer::Tcp(connection.closer()),
        }
    }

    /// The client's address now, where it can change (a QUIC client may
    /// migrate; a TCP connection is bound to its address).
    fn current_address(&self) -> Option<SocketAddr> {
        match self {
            ClientConnection::Quic(connection) => Some(connection.remote_address()),
            ClientConnection::Tcp(_) => None,
        }
    }

    /// The next request stream; `Err` once the connection is over.
    async fn accept_stream(&mut self) -> Result<(BoxSend, BoxRecv), Ended> {
        match self {
            ClientConnection::Quic(connection) => match connection.accept_bi().await {
                Ok((send, recv)) => Ok((Box::new(send), Box::new(recv))),
                Err(quinn::ConnectionError::ApplicationClosed(close)) => Err(Ended {
                    code: Some(close.error_code.into_inner()),
                    reason: close.to_string(),
                }),
                Err(e) => Err(Ended::failed(e.to_string())),
            },
            ClientConnection::Tcp(connection) => match connection.accept_stream().await {
                Ok((send, recv)) => Ok((Box::new(send), Box::new(recv))),
                Err(ended) => Err(ended),
            },
        }
    }

    /// Sends a control frame (welcome, go-away) to the client.
    async fn send_control(&mut self, message: ControlMessage) -> Result<(), ControlError> {
        match self {
            ClientConnection::Quic(connection) => control::send_quic(connection, message).await,
            ClientConnection::Tcp(connection) => control::send_tcp(connection, message),
        }
    }

    /// Grants no more stream credit (QUIC); over TCP, streams that still
    /// come are refused one by one.
    fn stop_new_streams(&self) {
        if let ClientConnection::Quic(connection) = self {
            connection.set_max_concurrent_bi_streams(0u32.into());
        }
    }
}

/// Serves one admitted connection: identity, revocation, welcome, then
/// every stream until the client leaves; on shutdown, the go-away.
async fn serve_connection(
    mut connection: ClientConnection,
    leaf: Vec<u8>,
    remote: SocketAddr,
    context: ConnectionContext,
    unannounced: Unannounced,
) {
    let ConnectionContext {
        ctx,
        streams,
        live,
        revocations,
        shutdown,
        ..
    } = context;
    let transport = connection.kind();
    let client: Arc<str> = certificate_common_name(&leaf)
        .unwrap_or_else(|| "unknown".to_owned())
        .into();
    let _live = live.register(fingerprint(&leaf), client.clone(), connection.closer());
    // A reload that ran while this handshake was in flight did not see it.
    if revocations.is_revoked(&leaf) {
        if let Some(metrics) = &ctx.metrics {
            metrics.handshake_failed("revoked");
        }
        warn!(client = %client, %remote, %transport, "closing a connection: its certificate was revoked");
        connection
            .closer()
            .close(close_code::REVOKED, "client certificate revoked");
        return;
    }
    let span = info_span!("connection", client = %client, %remote, %transport);
    async move {
        let welcome = ControlMessage::Welcome(Welcome {
            client: client.to_string(),
        });
        if let Err(e) = connection.send_control(welcome).await {
            warn!(reason = %e, "could not greet the client");
            return;
        }
        info!("client connected");
        let _connected = ctx
            .metrics
            .as_ref()
            .map(|metrics| GaugeGuard::up(&metrics.connections));
        let mut unannounced = Some(unannounced);
        let mut address = remote;
        let migrates = connection.current_address().is_some();
        let mut address_check = tokio::time::interval(ADDRESS_CHECK);
        address_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled(), if unannounced.is_some() => {
                    // No more stream credit, and a go-away so the client
                    // stops opening streams here; open streams carry on.
                    connection.stop_new_streams();
                    if let Err(e) = connection.send_control(ControlMessage::GoAway).await {
                        debug!(reason = %e, "could not send the go-away");
                    }
                    unannounced = None;
                    continue;
                }
                _ = address_check.tick(), if migrates => {
                    let now = connection.current_address().unwrap_or(address);
                    if now != address {
                        info!(from = %address, to = %now, "client address changed; the connection follows it");
                        address = now;
                    }
                    continue;
                }
                accepted = connection.accept_stream() => accepted,
            };
            match accepted {
                Ok((mut send, mut recv)) if shutdown.is_cancelled() => {
                    // Crossed the go-away: refuse it unread, so the client
                    // knows it can send the request elsewhere.
                    debug!("refusing a stream opened after the go-away");
                    recv.stop(reset_code::REFUSED);
                    send.reset(reset_code::REFUSED);
                }
                Ok((send, recv)) => {
                    let handler = stream::handle(send, recv, ctx.clone(), client.clone());
                    streams.spawn(handler.in_current_span());
                }
                Err(ended) => {
                    let code = ended.code.and_then(|code| u32::try_from(code).ok());
                    if code == Some(close_code::ABANDONED) {
                        debug!("the client took another handshake and closed this one");
                    } else {
                        info!(reason = %ended.reason, "client disconnected");
                    }
                    return;
                }
            }
        }
    }
    .instrument(span)
    .await
}

/// Holds a gauge one higher while it lives.
struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl GaugeGuard {
    fn up(gauge: &prometheus_client::metrics::gauge::Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The metrics label for a failed handshake: the TLS alert the relay sent
/// (which certificate problem), a wrong protocol, or the connection's fate.
fn handshake_failure_reason(error: &quinn::ConnectionError) -> &'static str {
    match error {
        quinn::ConnectionError::TransportError(e) => {
            let code = u64::from(e.code);
            // QUIC carries TLS alerts as codes 0x100 + alert (RFC 9001 4.8).
            match code.checked_sub(0x100) {
                Some(42) => "bad_certificate",
                // Right CA, wrong kind: e.g. a server certificate.
                Some(43) => "not_a_client_certificate",
                Some(44) => "revoked",
                Some(45) => "expired_certificate",
                Some(48) => "unknown_ca",
                // A chain whose signatures do not verify: a certificate
                // from another CA that happens to share this CA's name.
                Some(51) => "bad_signature",
                Some(116) => "no_certificate",
                Some(120) => "wrong_alpn",
                Some(alert) if alert < 0x100 => "tls_other",
                _ => "protocol",
            }
        }
        quinn::ConnectionError::TimedOut => "timeout",
        // The client sent a TLS alert: it refused the relay's certificate.
        quinn::ConnectionError::ConnectionClosed(close)
            if (0x100..0x200).contains(&u64::from(close.error_code)) =>
        {
            "client_refused_relay"
        }
        quinn::ConnectionError::ConnectionClosed(_)
        | quinn::ConnectionError::ApplicationClosed(_) => "closed_by_peer",
        _ => "other",
    }
}

/// The metrics label for a failed TLS-over-TCP handshake, by the same
/// names as QUIC's (see [`handshake_failure_reason`]).
fn tls_failure_reason(error: &std::io::Error) -> &'static str {
    use rustls::CertificateError;
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(certificate)) => match certificate {
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "expired_certificate"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "not_a_client_certificate"
            }
            _ => "bad_certificate",
        },
        Some(rustls::Error::NoCertificatesPresented) => "no_certificate",
        Some(rustls::Error::NoApplicationProtocol) => "wrong_alpn",
        // The client sent an alert: it refused the relay's certificate.
        Some(rustls::Error::AlertReceived(_)) => "client_refused_relay",
        Some(_) => "tls_other",
        None => match error.kind() {
            std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe => "closed_by_peer",
            _ => "other",
        },
    }
}

/// The client's (already verified) certificate, DER; empty if absent. Its
/// common name is the client's identity.
fn leaf_certificate(connection: &quinn::Connection) -> Vec<u8> {
    connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|leaf| leaf.to_vec()))
        .unwrap_or_default()
}
