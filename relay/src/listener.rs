//! The relay's QUIC listener: accepts connections from clients whose
//! certificates chain to the CA, names each by its certificate, and hands
//! every stream to [`crate::stream::handle`].
//!
//! Shutdown: when the token fires, no new connection or stream is accepted;
//! in-flight streams get up to the drain timeout to finish, then the
//! endpoint closes.

use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use passage_shared::frame::{Frame, Welcome, frame_writer};
use passage_shared::pki::certificate_common_name;
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::stream::{self, StreamContext};

/// Longest a TLS handshake may take before the attempt is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections until `shutdown` fires, then drains in-flight streams.
pub async fn serve(
    endpoint: quinn::Endpoint,
    ctx: Arc<StreamContext>,
    drain_timeout: Duration,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { break };
        tracker.spawn(connection(
            incoming,
            ctx.clone(),
            tracker.clone(),
            shutdown.clone(),
        ));
    }
    // Refuse new connections while the old ones drain.
    endpoint.set_server_config(None);
    tracker.close();
    if tokio::time::timeout(drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            drain_timeout_s = drain_timeout.as_secs(),
            "drain timeout reached; closing the remaining streams"
        );
    }
    endpoint.close(0u32.into(), b"relay shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// Completes one handshake and serves the connection's streams.
async fn connection(
    incoming: quinn::Incoming,
    ctx: Arc<StreamContext>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let remote = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            warn!(%remote, error = %e, "connection attempt dropped");
            return;
        }
    };
    let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            warn!(%remote, reason = %e, "handshake refused");
            return;
        }
        Err(_) => {
            warn!(%remote, "handshake timed out");
            return;
        }
    };
    let client: Arc<str> = client_name(&connection).into();
    let span = info_span!("connection", client = %client, %remote);
    async move {
        if let Err(e) = welcome(&connection, &client).await {
            warn!(reason = %e, "could not greet the client");
            return;
        }
        info!("client connected");
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => {
                    // Stop granting stream credit; open streams carry on.
                    connection.set_max_concurrent_bi_streams(0u32.into());
                    break;
                }
                accepted = connection.accept_bi() => accepted,
            };
            match accepted {
                Ok((send, recv)) => {
                    let handler =
                        stream::handle(Box::new(send), Box::new(recv), ctx.clone(), client.clone());
                    tracker.spawn(handler.in_current_span());
                }
                Err(e) => {
                    info!(reason = %e, "client disconnected");
                    return;
                }
            }
        }
        debug!("no longer accepting streams");
    }
    .instrument(span)
    .await
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

/// The client's identity: the common name of its (already verified) certificate.
fn client_name(connection: &quinn::Connection) -> String {
    connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(|leaf| certificate_common_name(leaf)))
        .unwrap_or_else(|| "unknown".to_owned())
}
