//! One handshake on either transport up to an admitted connection, and the
//! reasons a refused one is counted and logged under.

use std::net::SocketAddr;

use passage_shared::frame::ALPN_TCP;
use passage_shared::transport::tcp;
use rustls::pki_types::CertificateDer;
use tracing::{debug, warn};

use super::connection::{ClientConnection, serve_connection};
use super::live::Unannounced;
use super::{ConnectionContext, HANDSHAKE_TIMEOUT};

/// Completes one QUIC handshake and serves the connection.
pub(super) async fn quic_connection(
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
pub(super) async fn tcp_connection(
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
pub(super) fn refused(
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

/// The metrics label for a failed handshake: the TLS alert the relay sent
/// (which certificate problem), a wrong protocol, or the connection's fate.
pub(super) fn handshake_failure_reason(error: &quinn::ConnectionError) -> &'static str {
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
pub(super) fn tls_failure_reason(error: &std::io::Error) -> &'static str {
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
pub(super) fn leaf_certificate(connection: &quinn::Connection) -> Vec<u8> {
    connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().map(|leaf| leaf.to_vec()))
        .unwrap_or_default()
}
