//! One handshake with a relay over one transport, and how it went: welcomed,
//! refused (and why, read from either transport's wording), or no answer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use passage_shared::transport::TransportKind;

use crate::connect::{Dialer, Established, NO_REPLY};

/// How one handshake went.
pub(super) enum Dial {
    /// The relay welcomed this client (boxed: the others are small).
    Welcomed(Box<Established>, Duration),
    /// The relay (or this end, judging the relay) refused the certificates.
    Refused(Refusal, Duration),
    /// Nothing answered in time.
    NoReply,
    /// The path failed another way (refused connection, unreachable, …).
    Failed(String),
}

impl Dial {
    pub(super) fn reached_relay(&self) -> bool {
        matches!(self, Dial::Welcomed(..) | Dial::Refused(..))
    }
}

/// Why a handshake that reached the relay was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The relay has this client's certificate on its revocation list.
    Revoked,
    /// The relay found the client certificate expired.
    Expired,
    /// The relay does not know the CA of the client certificate.
    UnknownClientCa,
    /// The relay's certificate is not from the bundle's CA, or does not
    /// name the relay.
    RelayNotTrusted(String),
    /// Refused for another reason, as given.
    Other(String),
}

/// Reads a handshake's error, as the transports word it: the relay's TLS
/// alert (TCP: rustls names it; QUIC: its crypto error code, 0x100 plus the
/// alert) or passage's own close reason, and this end's verdict on the
/// relay's certificate.
pub(super) fn refusal(error: &str) -> Option<Refusal> {
    let has = |needle: &str| error.contains(needle);
    if has("CertificateRevoked") || has("error 44") || has("certificate revoked") {
        Some(Refusal::Revoked)
    } else if has("CertificateExpired") || has("error 45") {
        Some(Refusal::Expired)
    } else if has("UnknownCA") || has("error 48") || has("BadCertificate") || has("error 42") {
        Some(Refusal::UnknownClientCa)
    } else if has("invalid peer certificate") {
        Some(Refusal::RelayNotTrusted(error.to_owned()))
    } else if has("refused the connection") {
        Some(Refusal::Other(error.to_owned()))
    } else {
        None
    }
}

/// One handshake over `kind` with the relay at `addr`, given up after `limit`.
pub(super) async fn dial(
    dialer: &Dialer,
    addr: SocketAddr,
    kind: TransportKind,
    limit: Duration,
) -> Dial {
    let started = Instant::now();
    let attempt = async {
        match kind {
            TransportKind::Quic => dialer.quic(addr).await,
            TransportKind::Tcp => dialer.tcp(addr).await,
        }
    };
    match tokio::time::timeout(limit, attempt).await {
        Err(_) => Dial::NoReply,
        Ok(Ok(established)) => Dial::Welcomed(Box::new(established), started.elapsed()),
        Ok(Err(error)) if error == NO_REPLY => Dial::NoReply,
        Ok(Err(error)) => match refusal(&error) {
            Some(refusal) => Dial::Refused(refusal, started.elapsed()),
            None => Dial::Failed(error),
        },
    }
}
