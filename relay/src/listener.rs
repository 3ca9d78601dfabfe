//! The relay's QUIC listener: accepts connections from clients whose
//! certificates chain to the CA, names each by its certificate, and hands
//! every stream to [`crate::stream::handle`].
//!
//! Shutdown: when the token fires, no new connection is accepted, every
//! client gets a `GoAway` (it sends new requests elsewhere), streams that
//! still arrive are refused unread ([`reset_code::REFUSED`]: the client may
//! resend them), and in-flight streams get up to the drain timeout to
//! finish and their clients to close the connection; then the endpoint
//! closes.
//!
//! Revocation: on a reload request (SIGHUP) the listener re-reads the PKI
//! directory's revocation list; the TLS verifier refuses revoked
//! certificates from then on, and open connections that present one are
//! closed.
//!
//! While it runs, the listener logs a status line (connections, open
//! streams, live tasks) at most once per status interval and only when
//! those figures changed, so an operator can see them return to zero.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::SinkExt;
use passage_shared::frame::{Frame, Welcome, frame_writer, reset_code};
use passage_shared::pki::{PkiDir, certificate_common_name};
use passage_shared::revocation::{Fingerprint, Revocations, fingerprint};
use rustls::pki_types::CertificateDer;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::stream::{self, StreamContext};

/// Longest a TLS handshake may take before the attempt is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a shutting-down relay waits for its go-aways to be sent.
const GO_AWAY_WAIT: Duration = Duration::from_secs(1);

/// Application close code for a connection whose certificate was revoked.
pub const CLOSE_REVOKED: u32 = 0x10;

/// The revocation list of a running relay and how to reload it.
#[derive(Debug)]
pub struct Revocation {
    /// The PKI directory holding `revoked.toml`.
    pub pki_dir: PathBuf,
    /// The set the TLS verifier checks.
    pub revocations: Revocations,
    /// Signalled to reload (SIGHUP).
    pub requested: Arc<tokio::sync::Notify>,
}

/// One open client connection: its certificate's fingerprint, the
/// client's name, the connection.
type LiveEntry = (Fingerprint, Arc<str>, quinn::Connection);

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
        connection: quinn::Connection,
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
                warn!(client = %client, remote = %connection.remote_address(), "closing a connection: its certificate was revoked");
                connection.close(CLOSE_REVOKED.into(), b"client certificate revoked");
                closed += 1;
            }
        }
        closed
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

/// Re-reads the revocation list, swaps it into the verifier and closes
/// open connections of revoked certificates. A list that cannot be read
/// leaves the old one in force.
fn reload_revocations(revocation: &Revocation, live: &Live) {
    match PkiDir::new(&revocation.pki_dir).revoked_fingerprints() {
        Ok(revoked) => {
            // Swap first, then close: a connection registering meanwhile is
            // either seen here or re-checks against the new list itself.
            let count = revocation.revocations.replace(revoked.clone());
            let closed = live.close_revoked(&revoked);
            info!(
                revoked = count,
                closed_connections = closed,
                "revocation list reloaded"
            );
        }
        Err(e) => warn!(
            error = %passage_shared::error_chain(&e),
            "cannot read the revocation list; the previous one stays in force"
        ),
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

/// Accepts connections until `shutdown` fires, then drains in-flight streams.
pub async fn serve(
    endpoint: quinn::Endpoint,
    ctx: Arc<StreamContext>,
    drain_timeout: Duration,
    status_interval: Duration,
    revocation: Revocation,
    shutdown: CancellationToken,
) {
    let live = Arc::new(Live::default());
    let streams = TaskTracker::new();
    let connections = TaskTracker::new();
    let (unannounced, _) = watch::channel(0usize);
    let unannounced = Arc::new(unannounced);
    // A zero period would make tokio's interval panic.
    let mut status = tokio::time::interval(status_interval.max(Duration::from_millis(100)));
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = None;
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = status.tick() => {
                log_status(&connections, &streams, &mut last_status);
                continue;
            }
            () = revocation.requested.notified() => {
                reload_revocations(&revocation, &live);
                continue;
            }
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        connections.spawn(connection(
            incoming,
            ctx.clone(),
            streams.clone(),
            Unannounced::register(&unannounced),
            (live.clone(), revocation.revocations.clone()),
            shutdown.clone(),
        ));
    }
    // Refuse new connections while the old ones drain.
    endpoint.set_server_config(None);
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
    }
    endpoint.close(0u32.into(), b"relay shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
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

/// Completes one handshake and serves the connection's streams.
async fn connection(
    incoming: quinn::Incoming,
    ctx: Arc<StreamContext>,
    streams: TaskTracker,
    unannounced: Unannounced,
    (live, revocations): (Arc<Live>, Revocations),
    shutdown: CancellationToken,
) {
    let remote = incoming.remote_address();
    let failed = |reason| {
        if let Some(metrics) = &ctx.metrics {
            metrics.handshake_failed(reason);
        }
    };
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            // The first packet may already fail the handshake (no common
            // protocol): counted by the same reasons.
            failed(handshake_failure_reason(&e));
            warn!(%remote, error = %e, "connection attempt dropped");
            return;
        }
    };
    let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            failed(handshake_failure_reason(&e));
            warn!(%remote, reason = %e, "handshake refused");
            return;
        }
        Err(_) => {
            failed("timeout");
            warn!(%remote, "handshake timed out");
            return;
        }
    };
    let leaf = leaf_certificate(&connection);
    let client: Arc<str> = certificate_common_name(&leaf)
        .unwrap_or_else(|| "unknown".to_owned())
        .into();
    let _live = live.register(fingerprint(&leaf), client.clone(), connection.clone());
    // A reload that ran while this handshake was in flight did not see it.
    if revocations.is_revoked(&leaf) {
        failed("revoked");
        warn!(client = %client, %remote, "closing a connection: its certificate was revoked");
        connection.close(CLOSE_REVOKED.into(), b"client certificate revoked");
        return;
    }
    let span = info_span!("connection", client = %client, %remote);
    async move {
        if let Err(e) = welcome(&connection, &client).await {
            warn!(reason = %e, "could not greet the client");
            return;
        }
        info!("client connected");
        let _connected = ctx
            .metrics
            .as_ref()
            .map(|metrics| GaugeGuard::up(&metrics.connections));
        let mut unannounced = Some(unannounced);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled(), if unannounced.is_some() => {
                    // No more stream credit, and a go-away so the client
                    // stops opening streams here; open streams carry on.
                    connection.set_max_concurrent_bi_streams(0u32.into());
                    if let Err(e) = go_away(&connection).await {
                        debug!(reason = %e, "could not send the go-away");
                    }
                    unannounced = None;
                    continue;
                }
                accepted = connection.accept_bi() => accepted,
            };
            match accepted {
                Ok((mut send, mut recv)) if shutdown.is_cancelled() => {
                    // Crossed the go-away: refuse it unread, so the client
                    // knows it can send the request elsewhere.
                    debug!("refusing a stream opened after the go-away");
                    let _ = recv.stop(reset_code::REFUSED.into());
                    let _ = send.reset(reset_code::REFUSED.into());
                }
                Ok((send, recv)) => {
                    let handler =
                        stream::handle(Box::new(send), Box::new(recv), ctx.clone(), client.clone());
                    streams.spawn(handler.in_current_span());
                }
                Err(e) => {
                    info!(reason = %e, "client disconnected");
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

/// Tells the client the relay is shutting down (see [`Frame::GoAway`]).
async fn go_away(connection: &quinn::Connection) -> Result<(), String> {
    let send = connection.open_uni().await.map_err(|e| e.to_string())?;
    let mut writer = frame_writer(send);
    writer
        .send(Frame::GoAway)
        .await
        .map_err(|e| e.to_string())?;
    writer.get_mut().finish().map_err(|e| e.to_string())
}

/// Tells the client its certificate was accepted (see [`Frame::Welcome`]).
async fn welcome(connection: &quinn::Connection, client: &str) -> Result<(), String> {
    let send = connection.open_uni().await.map_err(|e| e.to_string())?;
    let mut writer = frame_writer(send);
    writer
        .send(Frame::Welcome(Welcome {
            client: client.to_owned(),
        }))
        .await
        .map_err(|e| e.to_string())?;
    writer.get_mut().finish().map_err(|e| e.to_string())
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
