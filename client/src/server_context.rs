//! What every handler of the local server needs, in a module of its own:
//! the server and the WebSocket sessions it starts both read it, and
//! neither has to import the other for it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::local_access::LocalAccess;
use crate::metrics::ClientMetrics;
use crate::tunnel::Tunnel;

/// What each request handler needs.
#[derive(Debug)]
pub struct ServerContext {
    /// The tunnel requests go through.
    pub tunnel: Tunnel,
    /// The client's name (from its certificate), for logs.
    pub client_name: String,
    /// How long a request waits for the tunnel before failing with 503.
    pub connect_wait: Duration,
    /// Metrics, when `--metrics` is on.
    pub metrics: Option<Arc<ClientMetrics>>,
    /// Who may use the endpoint (Host, Origin, access token).
    pub access: LocalAccess,
    /// Largest WebSocket message either way, in bytes.
    pub ws_max_message: usize,
    /// The WebSocket sessions in progress (the drain waits for them).
    pub sessions: tokio_util::task::TaskTracker,
    /// Cancelled when the drain timeout has run out: sessions still open
    /// close with 1001.
    pub sessions_closing: CancellationToken,
    /// The client certificate's expiry, for `/healthz`.
    pub expiry: passage_shared::cert_expiry::CertificateExpiry,
}
