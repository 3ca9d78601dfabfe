//! One admitted client connection, the same on both transports: its
//! identity and revocation check, the welcome, every stream until the
//! client leaves, and the go-away on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use passage_shared::control::{self, ControlError, ControlMessage};
use passage_shared::frame::{Welcome, close_code, reset_code};
use passage_shared::pki::certificate_common_name;
use passage_shared::revocation::fingerprint;
use passage_shared::transport::{BoxRecv, BoxSend, Ended, TransportKind, tcp};
use tracing::{Instrument, debug, info, info_span, warn};

use super::live::Unannounced;
use super::{ADDRESS_CHECK, ConnectionContext};
use crate::stream;

/// A client connection past its handshake, on either transport.
pub(super) enum ClientConnection {
    Quic(quinn::Connection),
    Tcp(Box<tcp::ServerConnection>),
}

/// Closes a client connection from elsewhere (a revocation, the drain's end).
#[derive(Debug, Clone)]
pub(super) enum Closer {
    Quic(quinn::Connection),
    Tcp(tcp::Closer),
}

impl Closer {
    pub(super) fn close(&self, code: u32, reason: &str) {
        match self {
            Closer::Quic(connection) => connection.close(code.into(), reason.as_bytes()),
            Closer::Tcp(closer) => closer.close(reason),
        }
    }
}

impl ClientConnection {
    pub(super) fn kind(&self) -> TransportKind {
        match self {
            ClientConnection::Quic(_) => TransportKind::Quic,
            ClientConnection::Tcp(_) => TransportKind::Tcp,
        }
    }

    pub(super) fn closer(&self) -> Closer {
        match self {
            ClientConnection::Quic(connection) => Closer::Quic(connection.clone()),
            ClientConnection::Tcp(connection) => Closer::Tcp(connection.closer()),
        }
    }

    /// The client's address now, where it can change (a QUIC client may
    /// migrate; a TCP connection is bound to its address).
    pub(super) fn current_address(&self) -> Option<SocketAddr> {
        match self {
            ClientConnection::Quic(connection) => Some(connection.remote_address()),
            ClientConnection::Tcp(_) => None,
        }
    }

    /// The next request stream; `Err` once the connection is over.
    pub(super) async fn accept_stream(&mut self) -> Result<(BoxSend, BoxRecv), Ended> {
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
    pub(super) async fn send_control(
        &mut self,
        message: ControlMessage,
    ) -> Result<(), ControlError> {
        match self {
            ClientConnection::Quic(connection) => control::send_quic(connection, message).await,
            ClientConnection::Tcp(connection) => control::send_tcp(connection, message),
        }
    }

    /// Grants no more stream credit (QUIC); over TCP, streams that still
    /// come are refused one by one.
    pub(super) fn stop_new_streams(&self) {
        if let ClientConnection::Quic(connection) = self {
            connection.set_max_concurrent_bi_streams(0u32.into());
        }
    }
}

/// Serves one admitted connection: identity, revocation, welcome, then
/// every stream until the client leaves; on shutdown, the go-away.
pub(super) async fn serve_connection(
    mut connection: ClientConnection,
    leaf: Vec<u8>,
    remote: SocketAddr,
    context: ConnectionContext,
    unannounced: Unannounced,
) {
    let transport = connection.kind();
    let client: Arc<str> = certificate_common_name(&leaf)
        .unwrap_or_else(|| "unknown".to_owned())
        .into();
    let _live = context
        .live
        .register(fingerprint(&leaf), client.clone(), connection.closer());
    // A reload that ran while this handshake was in flight did not see it.
    if context.revocations.is_revoked(&leaf) {
        if let Some(metrics) = &context.ctx.metrics {
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
        let _connected = context
            .ctx
            .metrics
            .as_ref()
            .map(|metrics| GaugeGuard::up(&metrics.connections));
        serve_streams(connection, client, remote, &context, unannounced).await;
    }
    .instrument(span)
    .await
}

/// Hands every stream the client opens to [`crate::stream::handle`] until
/// it leaves; follows a QUIC client to a new address; on shutdown sends
/// the go-away and refuses the streams that cross it.
async fn serve_streams(
    mut connection: ClientConnection,
    client: Arc<str>,
    remote: SocketAddr,
    context: &ConnectionContext,
    unannounced: Unannounced,
) {
    let shutdown = &context.shutdown;
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
                let handler = stream::handle(send, recv, context.ctx.clone(), client.clone());
                context.streams.spawn(handler.in_current_span());
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

/// Holds a gauge one higher while it lives.
pub(super) struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl GaugeGuard {
    pub(super) fn up(gauge: &prometheus_client::metrics::gauge::Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
