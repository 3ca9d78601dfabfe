//! passage-client: the local end of the tunnel. Apps send OpenAI API
//! requests to it on 127.0.0.1; it carries each over its own QUIC stream
//! to passage-relay.
//!
//! `server` is the local HTTP server, `tunnel` keeps a connection to
//! each relay up (QUIC, or TLS over TCP where UDP is blocked: `connect`),
//! and `forward` moves one request onto a stream and its response back;
//! `doctor` checks each hop when something does not work.

#![warn(missing_docs)]

mod connect;
mod doctor;
mod forward;
mod local_access;
mod metrics;
mod server;
mod server_context;
mod transport_memory;
mod tunnel;
mod websocket;

pub use connect::{Connection, Dialer, Established, TransportChoice};
pub use doctor::{DoctorOptions, examine};
pub use transport_memory::default_state_file;
pub use tunnel::TunnelSettings;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use passage_shared::bundle::Bundle;
use passage_shared::cert_expiry::CertificateExpiry;
use passage_shared::pki::{PkiError, parse_cert, parse_key};
use passage_shared::tls::{TlsError, client_tls_config};
use passage_shared::transport::TransportTuning;
use passage_shared::transport::quic::{self, QuicSetupError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::local_access::{LocalAccess, LocalAccessError};
use crate::metrics::ClientMetrics;
use crate::server_context::ServerContext;
use crate::transport_memory::TransportMemory;
use crate::tunnel::{RelayTarget, Tunnel, TunnelSetup};
use passage_shared::metrics_http::{MetricsBindError, MetricsListener};

/// Default address of the local endpoint.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8710";

/// Everything `passage-client run` needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The bundle issued by the relay operator.
    pub bundle: Bundle,
    /// Local address apps connect to.
    pub listen: SocketAddr,
    /// Relays to try after the bundle's, in order.
    pub extra_relays: Vec<String>,
    /// How long a request waits for the tunnel before failing with 503.
    pub connect_wait: Duration,
    /// How long in-flight responses may run on after a shutdown signal.
    pub drain_timeout: Duration,
    /// Largest WebSocket message either way, in bytes (1009 above it).
    pub ws_max_message: usize,
    /// Tunnel timing and transport choice.
    pub tunnel: TunnelSettings,
    /// The relays' TCP port, when it differs from the port in their address.
    pub tcp_port: Option<u16>,
    /// File that remembers which transport last worked per relay (none:
    /// remembered for this process only).
    pub state_file: Option<std::path::PathBuf>,
    /// Address to serve Prometheus metrics on, if any.
    pub metrics: Option<SocketAddr>,
    /// Whether `listen` may be an address other machines can reach
    /// (then an access token is required).
    pub allow_non_loopback: bool,
    /// The token apps must send as their API key, if any.
    pub access_token: Option<AccessToken>,
    /// Origins whose browser (CORS) requests are allowed.
    pub cors_origins: Vec<String>,
}

/// The local access token; never printed.
#[derive(Clone)]
pub struct AccessToken(pub String);

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

impl ClientConfig {
    /// A config with the documented defaults.
    pub fn new(bundle: Bundle, listen: SocketAddr) -> Self {
        ClientConfig {
            bundle,
            listen,
            extra_relays: Vec::new(),
            connect_wait: Duration::from_secs(4),
            drain_timeout: Duration::from_secs(30),
            ws_max_message: passage_shared::websocket::DEFAULT_MAX_MESSAGE,
            tunnel: TunnelSettings::default(),
            tcp_port: None,
            state_file: None,
            metrics: None,
            allow_non_loopback: false,
            access_token: None,
            cors_origins: Vec::new(),
        }
    }
}

/// Why the client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The bundle's certificates or key are unusable.
    #[error("bundle: {0}")]
    Bundle(#[from] PkiError),
    /// The client certificate's validity cannot be read.
    #[error("bundle: the client certificate's validity cannot be read")]
    Certificate,
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// QUIC could not be configured.
    #[error(transparent)]
    Quic(#[from] QuicSetupError),
    /// The local address is reachable from other machines.
    #[error(
        "refusing to listen on {0}: anyone who can reach it spends the relay's key; \
         to serve other machines, pass --allow-non-loopback with --access-token-env"
    )]
    NotLoopback(SocketAddr),
    /// A non-loopback address without an access token.
    #[error(
        "refusing to listen on {0} without an access token: set --access-token-env \
         so that only apps with the token can use it"
    )]
    NoAccessToken(SocketAddr),
    /// The access token or a CORS origin is unusable.
    #[error(transparent)]
    LocalAccess(#[from] LocalAccessError),
    /// The metrics address could not be bound.
    #[error(transparent)]
    Metrics(#[from] MetricsBindError),
    /// The local address could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The bundle's identity as the two transports present it: QUIC's client
/// configuration, and TLS over TCP's under its own ALPN.
pub fn tunnel_tls(
    bundle: &Bundle,
    tuning: TransportTuning,
) -> Result<(quinn::ClientConfig, Arc<rustls::ClientConfig>), ClientError> {
    let tls = client_tls_config(
        parse_cert(&bundle.ca_cert, "the CA certificate")?,
        vec![parse_cert(&bundle.cert, "the client certificate")?],
        parse_key(&bundle.key, "the client key")?,
    )?;
    let mut tcp_tls = tls.clone();
    tcp_tls.alpn_protocols = vec![passage_shared::frame::ALPN_TCP.to_vec()];
    let quic = quic::client_config(tls, tuning)?;
    Ok((quic, Arc::new(tcp_tls)))
}

/// The relays to use, in order of preference: the bundle's, then `extra`.
pub fn relay_targets(bundle: &Bundle, extra: &[String], tcp_port: Option<u16>) -> Vec<RelayTarget> {
    bundle
        .relays
        .iter()
        .chain(extra)
        .map(|address| {
            let mut target = RelayTarget::new(address, bundle.server_name.as_deref());
            target.tcp_port = tcp_port;
            target
        })
        .collect()
}

/// A bound client, ready to run.
#[derive(Debug)]
pub struct Client {
    listener: TcpListener,
    quic: quinn::ClientConfig,
    tls: Arc<rustls::ClientConfig>,
    targets: Vec<RelayTarget>,
    config: ClientConfig,
    metrics: Option<MetricsListener>,
    access: LocalAccess,
    expiry: CertificateExpiry,
}

impl Client {
    /// Checks the bundle and binds the local listener.
    pub async fn bind(config: ClientConfig) -> Result<Client, ClientError> {
        let loopback = config.listen.ip().is_loopback();
        if !loopback && !config.allow_non_loopback {
            return Err(ClientError::NotLoopback(config.listen));
        }
        if !loopback && config.access_token.is_none() {
            return Err(ClientError::NoAccessToken(config.listen));
        }
        let access = LocalAccess::new(
            loopback,
            config.access_token.as_ref().map(|t| t.0.as_str()),
            &config.cors_origins,
        )?;
        let (quic, tls) = tunnel_tls(&config.bundle, config.tunnel.transport)?;
        let expiry =
            CertificateExpiry::of(&parse_cert(&config.bundle.cert, "the client certificate")?)
                .ok_or(ClientError::Certificate)?;
        let targets = relay_targets(&config.bundle, &config.extra_relays, config.tcp_port);
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ClientError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let metrics = MetricsListener::bind(config.metrics)?;
        Ok(Client {
            listener,
            quic,
            tls,
            targets,
            config,
            metrics,
            access,
            expiry,
        })
    }

    /// The address metrics are served on, if `--metrics` is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(MetricsListener::local_addr)
    }

    /// The local address apps connect to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs the tunnel and the local server until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) {
        let local = self
            .listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let relays: Vec<&str> = self.targets.iter().map(|t| t.address.as_str()).collect();
        info!(
            listen = %local,
            relays = ?relays,
            transport = %self.config.tunnel.choice,
            client = %self.config.bundle.name,
            "client serving"
        );
        // The tunnel outlives the server by the drain time, so in-flight
        // responses can finish after the listener closes.
        let tunnel_shutdown = CancellationToken::new();
        let setup = TunnelSetup {
            quic: self.quic,
            tls: self.tls,
            settings: self.config.tunnel,
            memory: Arc::new(TransportMemory::load(self.config.state_file.clone())),
        };
        let (tunnel, manager) = Tunnel::start(self.targets, setup, tunnel_shutdown.clone());
        let metrics = self.metrics.map(|listener| {
            let metrics = Arc::new(ClientMetrics::new());
            let render = {
                let (metrics, tunnel, expiry) =
                    (metrics.clone(), tunnel.clone(), self.expiry.clone());
                Arc::new(move || metrics.render(&tunnel, &expiry))
                    as passage_shared::metrics_http::Render
            };
            let task = listener.spawn(render, None, shutdown.clone());
            (metrics, task)
        });
        let ctx = Arc::new(ServerContext {
            tunnel,
            client_name: self.config.bundle.name.clone(),
            connect_wait: self.config.connect_wait,
            metrics: metrics.as_ref().map(|(metrics, _)| metrics.clone()),
            access: self.access,
            ws_max_message: self.config.ws_max_message,
            sessions: tokio_util::task::TaskTracker::new(),
            sessions_closing: tokio_util::sync::CancellationToken::new(),
            expiry: self.expiry.clone(),
        });
        let expiry_warnings = tokio::spawn(self.expiry.clone().warn_while_due(
            "client",
            "ask the relay's operator for a new bundle (`passage-relay renew --name NAME`)",
        ));
        server::serve(self.listener, ctx, self.config.drain_timeout, shutdown).await;
        if let Some((_, task)) = metrics {
            task.abort();
        }
        tunnel_shutdown.cancel();
        // Let the manager send CONNECTION_CLOSE so the relay frees the
        // connection now rather than after its idle timeout.
        let _ = tokio::time::timeout(Duration::from_secs(2), manager).await;
        expiry_warnings.abort();
        info!("client stopped");
    }
}
