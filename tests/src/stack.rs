//! [`TestStack`]: a real relay and client on 127.0.0.1 ephemeral ports in
//! front of a [`MockUpstream`], with a fresh PKI, plus a small HTTP client
//! for talking to the client's local endpoint.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use passage_client::{ClientConfig, TunnelSettings};
use passage_relay::upstream::{ApiKey, UpstreamBase};
use passage_relay::{Relay, RelayConfig};
use passage_shared::bundle::Bundle;
use passage_shared::pki::PkiDir;
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use crate::Transport;
use crate::mock_upstream::MockUpstream;

/// How a [`TestStack`] is put together.
#[derive(Debug, Default, Clone)]
pub struct StackOptions {
    /// The relay's API key (replaces the app's Authorization when set).
    pub api_key: Option<String>,
    /// Upstream URL instead of the mock's.
    pub upstream_url: Option<String>,
    /// Replaces the issued bundle before the client starts.
    pub bundle_override: Option<fn(&Bundle, &TempDir) -> Bundle>,
    /// How long a request waits for the tunnel (default 5 s).
    pub connect_wait: Option<Duration>,
    /// Whether the relay speaks HTTP/2 (h2c) to the upstream.
    pub upstream_http2: bool,
    /// The relay's upstream idle-read timeout (default 600 s).
    pub idle_read_timeout: Option<Duration>,
    /// The client's transport (default `auto`).
    pub transport: Transport,
}

/// A relay and a client wired to a mock upstream; everything stops on drop.
pub struct TestStack {
    /// The mock upstream.
    pub upstream: MockUpstream,
    /// The relay's address (UDP, and TCP on the same port).
    pub relay_addr: SocketAddr,
    /// The client's local HTTP address.
    pub client_addr: SocketAddr,
    /// The PKI directory (and room for other files).
    pub dir: TempDir,
    /// HTTP client for requests to the local endpoint.
    pub http: Client<HttpConnector, Full<Bytes>>,
    shutdown: CancellationToken,
}

impl Drop for TestStack {
    fn drop(&mut self) {
        self.shutdown.cancel();
        crate::secrets::assert_none_leaked();
    }
}

/// Logs in-process components at info (or `RUST_LOG`) into the captured
/// test output, every line checked for secrets.
pub fn init_test_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(crate::secrets::CheckedWriter)
        .try_init();
}

/// A plain HTTP/1.1 client like an app's.
pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

impl TestStack {
    /// A stack with default options; waits until the tunnel is up.
    pub async fn start() -> TestStack {
        Self::start_with(StackOptions::default()).await
    }

    /// A stack with default options whose client uses `transport`.
    pub async fn start_over(transport: Transport) -> TestStack {
        Self::start_with(StackOptions {
            transport,
            ..StackOptions::default()
        })
        .await
    }

    /// A stack with `options`; waits until the tunnel is up unless the
    /// bundle was overridden (a broken bundle never brings it up).
    pub async fn start_with(options: StackOptions) -> TestStack {
        init_test_logging();
        let upstream = MockUpstream::start().await.expect("mock upstream starts");
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init(&[]).expect("PKI init");

        let shutdown = CancellationToken::new();
        let upstream_url = options
            .upstream_url
            .clone()
            .unwrap_or_else(|| upstream.url());
        let mut relay_config = RelayConfig::new(
            "127.0.0.1:0".parse().expect("literal"),
            dir.path().join("pki"),
            UpstreamBase::parse(&upstream_url).expect("upstream URL"),
        );
        crate::secrets::register("app-key");
        if let Some(key) = &options.api_key {
            crate::secrets::register(key);
        }
        relay_config.api_keys = options
            .api_key
            .clone()
            .map(ApiKey::new)
            .into_iter()
            .collect();
        relay_config.upstream_http2 = options.upstream_http2;
        if let Some(timeout) = options.idle_read_timeout {
            relay_config.idle_read_timeout = timeout;
        }
        let relay = Relay::bind(relay_config).expect("relay binds");
        let relay_addr = relay.local_addr().expect("relay address");
        tokio::spawn(relay.run(shutdown.clone()));

        let issued = pki
            .issue_client(
                "test-client",
                &[relay_addr.to_string()],
                Some("localhost"),
                1,
            )
            .expect("issue");
        let bundle = match options.bundle_override {
            Some(make) => make(&issued, &dir),
            None => issued,
        };
        let mut client_config = ClientConfig::new(bundle, "127.0.0.1:0".parse().expect("literal"));
        client_config.connect_wait = options.connect_wait.unwrap_or(Duration::from_secs(5));
        client_config.tunnel = TunnelSettings::default();
        client_config.tunnel.choice = options.transport;
        let client = passage_client::Client::bind(client_config)
            .await
            .expect("client binds");
        let client_addr = client.local_addr().expect("client address");
        tokio::spawn(client.run(shutdown.clone()));

        let stack = TestStack {
            upstream,
            relay_addr,
            client_addr,
            dir,
            http: http_client(),
            shutdown,
        };
        if options.bundle_override.is_none() {
            stack.wait_until_up(Duration::from_secs(10)).await;
            let forced = match options.transport {
                Transport::Quic => Some("quic"),
                Transport::Tcp => Some("tcp"),
                Transport::Auto => None,
            };
            if let Some(forced) = forced {
                let health = body_json(stack.get("/healthz").await.expect("healthz")).await;
                assert_eq!(health["transport"], forced, "{health}");
            }
        }
        stack
    }

    /// URL of `path` on the client's local endpoint.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.client_addr, path)
    }

    /// Polls `/healthz` until it answers 200; panics after `limit`.
    pub async fn wait_until_up(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(response) = self.get("/healthz").await
                && response.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "tunnel not up within {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a request to the local endpoint.
    pub async fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        self.http.request(request).await
    }

    /// `GET path` on the local endpoint.
    pub async fn get(
        &self,
        path: &str,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let request = Request::get(self.url(path))
            .body(Full::new(Bytes::new()))
            .expect("request");
        self.send(request).await
    }

    /// `POST path` with a JSON body on the local endpoint.
    pub async fn post_json(&self, path: &str, body: serde_json::Value) -> Response<Incoming> {
        let request = Request::post(self.url(path))
            .header("content-type", "application/json")
            .header("authorization", "Bearer app-key")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        self.send(request)
            .await
            .expect("request reaches the client")
    }
}

/// Reads a whole response body (bounded by the test's own data sizes).
pub async fn body_bytes(response: Response<Incoming>) -> Bytes {
    response
        .into_body()
        .collect()
        .await
        .expect("complete body")
        .to_bytes()
}

/// Reads `body` until it ends; `Err` if it ended with an error, panics after `limit`.
pub async fn read_to_end(body: &mut Incoming, limit: Duration) -> (Vec<u8>, Result<(), String>) {
    let mut received = Vec::new();
    let outcome = tokio::time::timeout(limit, async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    received.extend_from_slice(&frame.into_data().unwrap_or_default())
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => return Ok(()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the response body hung for {limit:?}"));
    (received, outcome)
}

/// Checks a streaming response is a 200 and reads its first event; the
/// returned body goes on from there.
pub async fn after_first_event(response: Response<Incoming>) -> Incoming {
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    body.frame()
        .await
        .expect("first event")
        .expect("first event");
    body
}

/// Reads a response body as JSON.
pub async fn body_json(response: Response<Incoming>) -> serde_json::Value {
    let bytes = body_bytes(response).await;
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

/// A chat completion request for `model`; a streaming one asks for its
/// usage in a last chunk, as the SDKs do with `include_usage`.
pub fn chat_request(model: &str, stream: bool) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
    });
    if stream {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    body
}
