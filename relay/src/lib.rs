//! passage-relay: the end of the tunnel that runs abroad, holds the API key
//! and calls the upstream API.
//!
//! Its modules, from a connection inward: `listener` accepts QUIC and TCP
//! connections and their streams; `stream` serves one request in stages
//! (head checks, body, response, record), helped by `request_body`,
//! `request_model` and `body_prefix` (the body and its model), `limits`
//! (this relay's own counts) and `usage` (tokens read from the answer);
//! [`upstream`] is the HTTP client for the configured upstream, with its
//! `keys`, `upstream_config` and `upstream_check` (the doctor's upstream
//! question); [`state`] keeps limits, the usage [`ledger`] (its entries
//! and sums in `usage_totals`) and the `answer_cache`, in this process or
//! in Redis ([`state::redis`]); `metrics` and `pki_watch` (certificate and
//! revocation reloads) serve the running relay. The public modules are
//! what the command line and the tests configure and call: [`policy`],
//! [`state`], [`upstream`], [`ledger`], [`usage_report`], [`pki_cmd`]
//! (`init`, `issue`, `revoke`, `list`, `renew`) and [`doctor`].

#![warn(missing_docs)]

mod answer_cache;
mod body_prefix;
pub mod doctor;
mod keys;
pub mod ledger;
mod limits;
mod listener;
mod metrics;
pub mod pki_cmd;
mod pki_watch;
pub mod policy;
mod request_body;
mod request_model;
pub mod state;
mod stream;
pub mod upstream;
mod upstream_check;
mod upstream_config;
mod usage;
pub mod usage_report;
mod usage_totals;

pub use answer_cache::{CacheKey, CachedAnswer};
pub use request_model::{BodyKind, MultipartError, MultipartScanner, json_model};
pub use stream::check_head;
pub use usage::{Usage, UsageTap};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use passage_shared::cert_expiry::CertificateExpiry;
use passage_shared::frame::ALPN_TCP;
use passage_shared::pki::{PkiDir, PkiError};
use passage_shared::revocation::Revocations;
use passage_shared::tls::{RelayCertificate, TlsError, relay_tls_config};
use passage_shared::transport::quic::{self, QuicSetupError};
use passage_shared::transport::{MAX_CONCURRENT_STREAMS, TransportTuning};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::listener::TcpSide;
use crate::metrics::RelayMetrics;
use crate::pki_watch::PkiWatch;
use crate::policy::Policy;
use crate::state::{Backend, FailMode, StateConfig, StateError, StateStore};
use crate::stream::StreamContext;
use crate::upstream::{ApiKey, UpstreamBase, UpstreamClient, UpstreamConfigError};
use passage_shared::metrics_http::{MetricsBindError, MetricsListener};

/// Default largest request body: 1 GiB, room for any audio or file upload
/// the API takes.
pub const DEFAULT_MAX_BODY: u64 = 1024 * 1024 * 1024;

/// Everything `passage-relay serve` needs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Where to serve the TCP fallback.
    pub listen_tcp: TcpListen,
    /// PKI directory made by `init`.
    pub pki_dir: PathBuf,
    /// The one upstream every request goes to.
    pub upstream: UpstreamBase,
    /// Keys that replace the app's Authorization, used in turn (none: the
    /// app's Authorization passes through).
    pub api_keys: Vec<ApiKey>,
    /// Longest time to open a TCP connection to the upstream.
    pub connect_timeout: Duration,
    /// Speak only HTTP/2 to the upstream (h2 prior knowledge on http://).
    pub upstream_http2: bool,
    /// Requests one upstream HTTP/2 connection carries at once before
    /// another opens.
    pub upstream_streams_per_connection: u32,
    /// Longest upstream silence before the response head or between chunks.
    pub idle_read_timeout: Duration,
    /// Longest wait for a request head on a new stream.
    pub head_timeout: Duration,
    /// How long in-flight requests may run on after a shutdown signal.
    pub drain_timeout: Duration,
    /// How often the status line may be logged (only when it changed).
    pub status_interval: Duration,
    /// QUIC transport settings of client connections.
    pub transport: TransportTuning,
    /// Who may do what (the config file's client tables).
    pub policy: Policy,
    /// Most body bytes read to find the model for a model-restricted client.
    pub model_scan_limit: usize,
    /// Address to serve Prometheus metrics on, if any.
    pub metrics: Option<SocketAddr>,
    /// Largest request body accepted, in bytes (413 above it).
    pub max_body: u64,
    /// Limits of WebSocket sessions: largest message, and the silence
    /// either way after which a session closes.
    pub ws_limits: passage_shared::websocket::SessionLimits,
    /// Request streams one client connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Where limits are counted and the usage ledger kept.
    pub state: StateConfig,
}

impl RelayConfig {
    /// A config with the documented defaults for everything but the essentials.
    pub fn new(listen: SocketAddr, pki_dir: PathBuf, upstream: UpstreamBase) -> Self {
        RelayConfig {
            listen,
            listen_tcp: TcpListen::SamePort,
            pki_dir: pki_dir.clone(),
            upstream,
            api_keys: Vec::new(),
            connect_timeout: Duration::from_secs(10),
            upstream_http2: false,
            upstream_streams_per_connection: crate::upstream::DEFAULT_STREAMS_PER_CONNECTION,
            idle_read_timeout: Duration::from_secs(600),
            head_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            status_interval: Duration::from_secs(10),
            transport: TransportTuning::default(),
            policy: Policy::default(),
            model_scan_limit: 1024 * 1024,
            metrics: None,
            max_body: DEFAULT_MAX_BODY,
            ws_limits: passage_shared::websocket::SessionLimits {
                max_message: passage_shared::websocket::DEFAULT_MAX_MESSAGE,
                idle: passage_shared::websocket::DEFAULT_IDLE,
            },
            max_streams_per_connection: MAX_CONCURRENT_STREAMS,
            state: StateConfig {
                backend: Backend::Embedded {
                    data_dir: pki_dir.clone(),
                    required: false,
                },
                fail: FailMode::Open,
                cache_bytes: crate::state::DEFAULT_CACHE_BYTES,
                ledger: true,
            },
        }
    }
}

/// Where the relay serves TLS over TCP, the fallback for clients whose
/// networks block UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpListen {
    /// On the UDP listener's address and port (the default).
    SamePort,
    /// On this address.
    At(SocketAddr),
    /// Not at all (`--no-tcp`).
    Off,
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The PKI directory could not be read.
    #[error("PKI: {0}")]
    Pki(#[from] PkiError),
    /// The relay certificate's validity cannot be read.
    #[error("PKI: the relay certificate's validity cannot be read")]
    Certificate,
    /// TLS could not be configured.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The QUIC endpoint could not be made.
    #[error(transparent)]
    Quic(#[from] QuicSetupError),
    /// The TCP listener could not be bound.
    #[error("TCP listener on {addr}")]
    Tcp {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The upstream is misconfigured.
    #[error(transparent)]
    Upstream(#[from] UpstreamConfigError),
    /// The state store could not be opened.
    #[error("state store: {0}")]
    State(#[from] StateError),
    /// The metrics address could not be bound.
    #[error(transparent)]
    Metrics(#[from] MetricsBindError),
}

/// A bound relay, ready to serve.
#[derive(Debug)]
pub struct Relay {
    endpoint: quinn::Endpoint,
    tcp: Option<TcpSide>,
    tuning: (TransportTuning, u32),
    ctx: Arc<StreamContext>,
    drain_timeout: Duration,
    status_interval: Duration,
    pki: PkiWatch,
    metrics: Option<(MetricsListener, Arc<RelayMetrics>)>,
    state: Arc<dyn StateStore>,
}

/// Changes a running relay's policy and revocation list (what SIGHUP does).
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    revocations: Arc<tokio::sync::Notify>,
    ctx: Arc<StreamContext>,
}

impl ReloadHandle {
    /// Requests a re-read of the revocation list; the relay performs it
    /// as soon as it can.
    pub fn reload(&self) {
        self.revocations.notify_one();
    }

    /// Puts `policy` in force for every request that starts from now on;
    /// requests in flight finish under the rules they started with.
    pub fn set_policy(&self, policy: Policy) {
        self.ctx.set_policy(policy);
    }
}

impl Relay {
    /// Loads the PKI and binds the UDP socket; must run inside a tokio runtime.
    pub fn bind(config: RelayConfig) -> Result<Relay, RelayError> {
        let pki = PkiDir::new(&config.pki_dir);
        let identity = pki.load_relay_identity()?;
        let revocations = Revocations::new(pki.revoked_fingerprints()?);
        let endpoint_config = quic::stable_endpoint_config(identity.key.secret_der());
        let leaf = identity
            .chain
            .first()
            .map(|c| c.to_vec())
            .unwrap_or_default();
        let expiry = CertificateExpiry::of(&leaf).ok_or(RelayError::Certificate)?;
        let certificate = Arc::new(RelayCertificate::new(identity.chain, identity.key)?);
        let tls = relay_tls_config(identity.ca, certificate.clone(), revocations.clone())?;
        // The same identity and verifier over TCP, under the TCP ALPN.
        let mut tcp_tls = tls.clone();
        tcp_tls.alpn_protocols = vec![ALPN_TCP.to_vec()];
        let server = quic::server_config(tls, config.transport, config.max_streams_per_connection)?;
        let (endpoint, tcp) = bind_sockets(&config, server, endpoint_config)?;
        let tcp = tcp.map(|listener| TcpSide {
            listener,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tcp_tls)),
        });
        let upstream = UpstreamClient::new(
            config.upstream,
            &config.api_keys,
            config.connect_timeout,
            config.upstream_http2,
            config.upstream_streams_per_connection,
        )?;
        let state = crate::state::open(&config.state)?;
        let metrics = MetricsListener::bind(config.metrics)?
            .map(|listener| (listener, Arc::new(RelayMetrics::new())));
        Ok(Relay {
            endpoint,
            tcp,
            tuning: (config.transport, config.max_streams_per_connection),
            ctx: Arc::new(StreamContext {
                upstream,
                head_timeout: config.head_timeout,
                idle_read_timeout: config.idle_read_timeout,
                policy: std::sync::RwLock::new(Arc::new(config.policy)),
                state: state.clone(),
                model_scan_limit: config.model_scan_limit,
                max_body: config.max_body,
                ws_limits: config.ws_limits,
                ws_closing: tokio_util::sync::CancellationToken::new(),
                prefix_budget: crate::body_prefix::PrefixBudget::new(
                    crate::body_prefix::PREFIX_BUDGET,
                ),
                metrics: metrics.as_ref().map(|(_, m)| m.clone()),
            }),
            metrics,
            state,
            drain_timeout: config.drain_timeout,
            status_interval: config.status_interval,
            pki: PkiWatch::new(config.pki_dir, revocations, certificate, expiry),
        })
    }

    /// A handle that makes the running relay re-read its revocation list,
    /// refuse revoked certificates from then on and close their connections.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            revocations: self.pki.requested.clone(),
            ctx: self.ctx.clone(),
        }
    }

    /// The address metrics are served on, if `--metrics` is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr())
    }

    /// The UDP address the relay listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The TCP address the relay listens on, unless TCP is off.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
            .as_ref()
            .and_then(|tcp| tcp.listener.local_addr().ok())
    }

    /// Serves until `shutdown` fires, then drains and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        info!(
            listen = %self.endpoint.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            listen_tcp = %self.tcp_addr().map(|a| a.to_string()).unwrap_or_else(|| "off".to_owned()),
            upstream = %self.ctx.upstream.base(),
            "relay serving"
        );
        let expiry = self.pki.expiry.clone();
        let metrics_task = self.metrics.map(|(listener, metrics)| {
            listener.spawn(
                metrics.renderer(self.state.clone(), expiry.clone()),
                Some(health_renderer(self.state.clone(), expiry.clone())),
                shutdown.clone(),
            )
        });
        let expiry_warnings = tokio::spawn(expiry.warn_while_due(
            "relay",
            "renew it with `passage-relay renew --server`; the relay loads it within 30 s or on SIGHUP",
        ));
        let (tuning, max_streams) = self.tuning;
        let serving = listener::Listener {
            endpoint: self.endpoint,
            tcp: self.tcp,
            ctx: self.ctx,
            tuning,
            max_streams,
            drain_timeout: self.drain_timeout,
            status_interval: self.status_interval,
            pki: self.pki,
        };
        listener::serve(serving, shutdown).await;
        if let Some(task) = metrics_task {
            task.abort();
        }
        expiry_warnings.abort();
        // Every request has ended: what the ledger holds is written out.
        self.state.close().await;
        info!("relay stopped");
    }
}

/// `GET /healthz` on the metrics address: `ok`, or `degraded` with why
/// (the relay serves either way), with the state store's health and the
/// relay certificate's expiry.
fn health_renderer(
    state: Arc<dyn StateStore>,
    expiry: CertificateExpiry,
) -> passage_shared::metrics_http::Render {
    Arc::new(move || {
        let (status, detail) = match state.health() {
            crate::state::StoreHealth::Ok => ("ok", "ok".to_owned()),
            crate::state::StoreHealth::Degraded(why) => ("degraded", why),
        };
        let mut body = serde_json::json!({
            "status": status,
            "state": {"backend": state.backend(), "status": detail},
        });
        expiry.health_fields(&mut body);
        format!("{body}\n")
    })
}

/// Binds the UDP endpoint and, unless TCP is off, the TCP listener. With
/// TCP on the same port and port 0 asked for, the port the UDP socket got
/// may be taken for TCP: then both are bound again, a few times.
fn bind_sockets(
    config: &RelayConfig,
    server: quinn::ServerConfig,
    endpoint_config: quinn::EndpointConfig,
) -> Result<(quinn::Endpoint, Option<TcpListener>), RelayError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let endpoint = quic::endpoint(
            config.listen,
            Some(server.clone()),
            Some(endpoint_config.clone()),
        )?;
        let addr = match config.listen_tcp {
            TcpListen::Off => return Ok((endpoint, None)),
            TcpListen::At(addr) => addr,
            TcpListen::SamePort => {
                let port = endpoint
                    .local_addr()
                    .map_err(|source| RelayError::Tcp {
                        addr: config.listen,
                        source,
                    })?
                    .port();
                SocketAddr::new(config.listen.ip(), port)
            }
        };
        let bound = std::net::TcpListener::bind(addr).and_then(|listener| {
            listener.set_nonblocking(true)?;
            TcpListener::from_std(listener)
        });
        match bound {
            Ok(listener) => return Ok((endpoint, Some(listener))),
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && config.listen.port() == 0
                    && config.listen_tcp == TcpListen::SamePort
                    && tries < 20 =>
            {
                continue;
            }
            Err(source) => return Err(RelayError::Tcp { addr, source }),
        }
    }
}
