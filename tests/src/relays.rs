//! Pieces for resilience tests, where relays stop, die and come back: a
//! PKI, relays run in-process (stopped gracefully, as by SIGTERM) or as
//! real `passage-relay` processes (killed outright), and a client whose
//! relays and timing the test chooses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use passage_client::ClientConfig;
use passage_relay::upstream::UpstreamBase;
use passage_relay::{Relay, RelayConfig, ReloadHandle};
use passage_shared::bundle::Bundle;
use passage_shared::pki::PkiDir;
use tempfile::TempDir;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

use crate::Transport;
use crate::stack::{http_client, init_test_logging};

/// A fresh CA and relay certificate in a temporary directory.
pub struct TestPki {
    /// The directory (the PKI is in `pki/` below it).
    pub dir: TempDir,
}

impl TestPki {
    /// Makes the CA and the relay certificate (for localhost and loopback).
    pub fn new() -> TestPki {
        init_test_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        PkiDir::new(dir.path().join("pki"))
            .init(&[])
            .expect("PKI init");
        TestPki { dir }
    }

    /// The PKI directory.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// A bundle for a client named `name` listing `relays` in order.
    pub fn issue(&self, name: &str, relays: &[SocketAddr]) -> Bundle {
        let relays: Vec<String> = relays.iter().map(SocketAddr::to_string).collect();
        let pki = PkiDir::new(self.path());
        let bundle = pki
            .issue_client(name, &relays, Some("localhost"), 1)
            .expect("issue");
        pki.record_issued(name, &bundle.cert).expect("record");
        bundle
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// A free port on 127.0.0.1 for a listener a test starts later. It is
/// picked below Linux's ephemeral range (32768 and up), so no socket bound
/// to port 0 meanwhile (every QUIC client endpoint) can take it, and never
/// twice in one test process; `free` says whether it is free now.
fn unused_port(free: impl Fn(SocketAddr) -> bool) -> SocketAddr {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..1000 {
        let port = fastrand::u16(20_000..32_000);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if !handed_out.contains(&port) && free(addr) {
            handed_out.push(port);
            return addr;
        }
    }
    panic!("no free port on 127.0.0.1 between 20000 and 32000");
}

/// An address on 127.0.0.1 whose port was free a moment ago for both UDP
/// and TCP: a relay serves QUIC and TCP on the same port.
pub fn free_udp_port() -> SocketAddr {
    unused_port(|addr| {
        std::net::UdpSocket::bind(addr).is_ok() && std::net::TcpListener::bind(addr).is_ok()
    })
}

/// A TCP address on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> SocketAddr {
    unused_port(|addr| std::net::TcpListener::bind(addr).is_ok())
}

/// `GET http://addr/metrics`: the Prometheus text.
pub async fn scrape(addr: SocketAddr) -> String {
    get_text(addr, "/metrics").await
}

/// `GET http://addr/healthz` of a relay's metrics address, parsed.
pub async fn relay_health(addr: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&get_text(addr, "/healthz").await).expect("health is JSON")
}

/// The body of a 200 answer to `GET http://addr{path}`.
async fn get_text(addr: SocketAddr, path: &str) -> String {
    let response = http_client()
        .get(format!("http://{addr}{path}").parse().expect("URL"))
        .await
        .expect("an answer");
    assert_eq!(response.status(), 200, "GET {path}");
    let bytes = crate::stack::body_bytes(response).await;
    String::from_utf8(bytes.to_vec()).expect("text")
}

/// The value of the sample `name{labels}` in Prometheus `text` (labels in
/// the order the exposition writes them), if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A relay running as a task of the test, stopped as SIGTERM stops one.
pub struct InProcessRelay {
    /// Its UDP address.
    pub addr: SocketAddr,
    /// Its metrics address, when the config asked for one.
    pub metrics: Option<SocketAddr>,
    reload: ReloadHandle,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessRelay {
    /// Starts a relay on `listen` in front of `upstream`, after `adjust` has
    /// had its say on the configuration.
    pub fn start(
        pki: &TestPki,
        listen: SocketAddr,
        upstream: &str,
        adjust: impl FnOnce(&mut RelayConfig),
    ) -> InProcessRelay {
        let mut config = RelayConfig::new(
            listen,
            pki.path(),
            UpstreamBase::parse(upstream).expect("upstream URL"),
        );
        init_test_logging();
        adjust(&mut config);
        let relay = Relay::bind(config).expect("relay binds");
        let addr = relay.local_addr().expect("relay address");
        let metrics = relay.metrics_addr();
        let reload = relay.reload_handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        InProcessRelay {
            addr,
            metrics,
            reload,
            shutdown,
            task,
        }
    }

    /// Starts the graceful shutdown (what SIGTERM does to the real program).
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Re-reads the revocation list (what SIGHUP does to the real program).
    pub fn reload(&self) {
        self.reload.reload();
    }

    /// Puts a new policy in force (what SIGHUP does with a changed config file).
    pub fn set_policy(&self, policy: passage_relay::policy::Policy) {
        self.reload.set_policy(policy);
    }

    /// Whether the relay has finished.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits up to `limit` for the relay to finish; true if it did.
    pub async fn finished_within(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, &mut self.task).await.is_ok()
    }
}

impl Drop for InProcessRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
        crate::secrets::assert_none_leaked();
    }
}

/// The `passage-relay` program built next to this test.
pub fn relay_program() -> PathBuf {
    program("passage-relay")
}

/// A program of the workspace (`passage-relay`, `passage-client`) built
/// next to this test.
pub fn program(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let program = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join(name);
    assert!(
        program.is_file(),
        "{} is not built: run `cargo test --workspace` (or `cargo build --workspace --bins`) first",
        program.display()
    );
    program
}

/// Extra settings for a [`RelayProcess`].
#[derive(Debug, Clone)]
pub struct RelayLaunch {
    /// More arguments after `serve --pki DIR --listen ADDR --upstream URL`.
    pub args: Vec<String>,
    /// Environment variables to set (keys are registered as secrets).
    pub env: Vec<(String, String)>,
    /// `RUST_LOG` of the process.
    pub rust_log: String,
}

impl Default for RelayLaunch {
    fn default() -> Self {
        RelayLaunch {
            args: Vec::new(),
            env: Vec::new(),
            rust_log: "info".to_owned(),
        }
    }
}

/// A real `passage-relay serve` process, killed outright when dropped. Its
/// log lines are kept (see [`RelayProcess::logs`]) and checked for secrets.
pub struct RelayProcess {
    child: tokio::process::Child,
    /// Its UDP address.
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

impl RelayProcess {
    /// Starts `passage-relay serve` on `listen` and waits until it serves.
    pub async fn start(pki: &TestPki, listen: SocketAddr, upstream: &str) -> RelayProcess {
        Self::launch(pki, listen, upstream, RelayLaunch::default()).await
    }

    /// Starts `passage-relay serve` with `launch`'s extras and waits until it serves.
    pub async fn launch(
        pki: &TestPki,
        listen: SocketAddr,
        upstream: &str,
        launch: RelayLaunch,
    ) -> RelayProcess {
        let mut command = tokio::process::Command::new(relay_program());
        command
            .arg("serve")
            .arg("--pki")
            .arg(pki.path())
            .args(["--listen", &listen.to_string(), "--upstream", upstream])
            .args(&launch.args)
            .env("RUST_LOG", &launch.rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (name, value) in &launch.env {
            crate::secrets::register(value);
            command.env(name, value);
        }
        let mut child = command.spawn().expect("passage-relay starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (serving_tx, serving_rx) = tokio::sync::oneshot::channel();
        let kept = logs.clone();
        // Keep reading its log so it never blocks on a full pipe.
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut serving = Some(serving_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                crate::secrets::scan(&line);
                if line.contains("relay serving")
                    && let Some(tx) = serving.take()
                {
                    let _ = tx.send(());
                }
                kept.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(line);
            }
        });
        let serving = tokio::time::timeout(Duration::from_secs(10), serving_rx).await;
        assert!(
            matches!(serving, Ok(Ok(()))),
            "passage-relay did not start serving: {:?}",
            logs.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        );
        RelayProcess {
            child,
            addr: listen,
            logs,
        }
    }

    /// Every log line the process wrote so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits up to `limit` for a log line containing every one of `parts`.
    pub async fn wait_for_log(&self, parts: &[&str], limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self
                .logs()
                .into_iter()
                .find(|line| parts.iter().all(|part| line.contains(part)))
            {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?} within {limit:?}; log: {:#?}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGHUP (the relay re-reads its revocation list).
    pub fn hang_up(&self) {
        self.signal("HUP");
    }

    /// Sends signal `name` (`HUP`, `STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("passage-relay is running");
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Kills the process outright (SIGKILL): no goodbye on the wire.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill passage-relay");
    }

    /// Waits up to `limit` for the process to exit; its status if it did.
    pub async fn exited_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        crate::secrets::assert_none_leaked();
    }
}

/// A passage client running in the test, with its own shutdown.
pub struct LocalClient {
    /// Its local HTTP address.
    pub addr: SocketAddr,
    /// Its metrics address, when the config asked for one.
    pub metrics: Option<SocketAddr>,
    /// An app-like HTTP client.
    pub http: Client<HttpConnector, Full<Bytes>>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl LocalClient {
    /// Starts a client with `bundle`, after `adjust` has had its say on the configuration.
    pub async fn start(bundle: Bundle, adjust: impl FnOnce(&mut ClientConfig)) -> LocalClient {
        let mut config = ClientConfig::new(bundle, "127.0.0.1:0".parse().expect("literal"));
        adjust(&mut config);
        let client = passage_client::Client::bind(config)
            .await
            .expect("client binds");
        let addr = client.local_addr().expect("client address");
        let metrics = client.metrics_addr();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(client.run(shutdown.clone()));
        LocalClient {
            addr,
            metrics,
            http: http_client(),
            shutdown,
            task,
        }
    }

    /// Starts a client with `bundle` on `transport`, after `adjust` has had
    /// its say on the configuration.
    pub async fn start_over(
        bundle: Bundle,
        transport: Transport,
        adjust: impl FnOnce(&mut ClientConfig),
    ) -> LocalClient {
        Self::start(bundle, |config| {
            config.tunnel.choice = transport;
            adjust(config);
        })
        .await
    }

    /// URL of `path` on the local endpoint.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// A request to the local endpoint, as a future that owns what it
    /// needs (so it can be spawned); `json` is sent as the body if given.
    pub fn send(
        &self,
        method: http::Method,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> impl std::future::Future<Output = Result<Response<Incoming>, String>> + Send + 'static
    {
        let http = self.http.clone();
        let mut request = Request::builder().method(method).uri(self.url(path));
        let body = match json {
            Some(value) => {
                request = request.header("content-type", "application/json");
                Bytes::from(value.to_string())
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body)).expect("request");
        async move { http.request(request).await.map_err(|e| e.to_string()) }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Response<Incoming>, String> {
        self.send(http::Method::GET, path, None).await
    }

    /// `POST path` with a small JSON body.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Response<Incoming>, String> {
        self.send(http::Method::POST, path, Some(body)).await
    }

    /// The `/healthz` document (whatever its status).
    pub async fn health(&self) -> serde_json::Value {
        let response = self.get("/healthz").await.expect("healthz answers");
        crate::stack::body_json(response).await
    }

    /// Polls `/healthz` until `relay` is the one in use; panics after `limit`.
    pub async fn wait_for_relay(&self, relay: SocketAddr, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let health = self.health().await;
            if health["relay"] == relay.to_string() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay {relay} not in use within {limit:?}: {health}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the graceful shutdown (what SIGTERM does to the real program).
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits up to `limit` for the client to finish; true if it did.
    pub async fn finished_within(&mut self, limit: Duration) -> bool {
        tokio::time::timeout(limit, &mut self.task).await.is_ok()
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
