//! Certificate lifecycle with live clients: `passage-relay renew --name`
//! hands a client a new bundle while its old one keeps working for the
//! grace period (then the relay revokes it by itself), and `renew --server`
//! puts a new relay certificate in place with no client change; neither
//! fails a request. Both programs show their certificate's expiry.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use passage_shared::bundle::Bundle;
use passage_shared::pki::{PkiDir, write_new_file};
use passage_tests::Transport::{self, Quic, Tcp};
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{
    InProcessRelay, LocalClient, TestPki, free_udp_port, program, relay_health, sample, scrape,
};
use rstest::rstest;

/// Sends requests through `client` one after another until stopped;
/// counts the answers and the failures (anything but 200).
struct Traffic {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(client: Arc<LocalClient>) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (stop, answered, failed) = (stop.clone(), answered.clone(), failed.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    match client.get("/v1/models").await {
                        Ok(response) if response.status() == 200 => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(response) => failed
                            .lock()
                            .expect("lock")
                            .push(format!("HTTP {}", response.status())),
                        Err(e) => failed.lock().expect("lock").push(e),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        Traffic {
            stop,
            answered,
            failed,
            task,
        }
    }

    /// Stops; the answers counted, and no failure.
    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("traffic task");
        let failed = self.failed.lock().expect("lock").clone();
        assert!(failed.is_empty(), "failed requests: {failed:?}");
        self.answered.load(Ordering::Relaxed)
    }
}

async fn renew(args: &[&str]) -> String {
    let output = tokio::process::Command::new(program("passage-relay"))
        .arg("renew")
        .args(args)
        .output()
        .await
        .expect("renew runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "renew failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn metrics_on(config: &mut passage_relay::RelayConfig) {
    config.metrics = Some("127.0.0.1:0".parse().expect("literal"));
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_renewed_while_connected_fails_no_request(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |_| {});
    // The bundle where `issue` writes it, as renew finds it.
    let old = pki.issue("alice", &[relay.addr]);
    let path = PkiDir::new(pki.path()).bundle_path("alice");
    write_new_file(&path, old.to_toml().expect("toml").as_bytes(), 0o600).expect("bundle");
    let client = Arc::new(
        LocalClient::start_over(old, transport, |config| {
            config.connect_wait = Duration::from_secs(1);
        })
        .await,
    );
    client
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    let health = client.health().await;
    assert!(
        health["certificate_expires_in_seconds"]
            .as_i64()
            .unwrap_or(0)
            > 0,
        "{health}"
    );
    let traffic = Traffic::start(client.clone());

    let dir = pki.path();
    let dir = dir.to_str().expect("utf-8 path");
    let printed = renew(&["--dir", dir, "--name", "alice", "--grace", "10s"]).await;
    assert!(printed.contains("stop working at"), "{printed}");
    let renewed_at = Instant::now();
    relay.reload();
    // The new bundle: same name and relay, another certificate.
    let fresh = Bundle::load(&path).expect("new bundle");
    assert_eq!(fresh.relays, vec![relay.addr.to_string()]);
    let newcomer = LocalClient::start_over(fresh, transport, |_| {}).await;
    newcomer
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    assert_eq!(
        newcomer.get("/v1/models").await.expect("answer").status(),
        200
    );
    // The old bundle served throughout the grace period, without a failure.
    let served = traffic.finish().await;
    assert!(
        renewed_at.elapsed() < Duration::from_secs(10),
        "the checks took longer than the grace period"
    );
    assert!(served > 0);

    // Then the relay revokes the old certificate by itself.
    let deadline = renewed_at + Duration::from_secs(30);
    loop {
        let health = client.health().await;
        if health["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("refused") || m.contains("revoked"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old bundle still works: {health}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        newcomer.get("/v1/models").await.expect("answer").status(),
        200
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_relay_certificate_needs_no_client_change(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), metrics_on);
    let metrics = relay.metrics.expect("metrics address");
    let before = relay_health(metrics).await["certificate_expires_in_seconds"]
        .as_i64()
        .expect("expiry in /healthz");
    assert!(before > 1000 * 86_400, "{before}");
    let bundle = pki.issue("alice", &[relay.addr]);
    let client = Arc::new(LocalClient::start_over(bundle.clone(), transport, |_| {}).await);
    client
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    let traffic = Traffic::start(client.clone());

    let dir = pki.path();
    let dir = dir.to_str().expect("utf-8 path");
    renew(&["--dir", dir, "--server", "--days", "100"]).await;
    relay.reload();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = relay_health(metrics).await["certificate_expires_in_seconds"]
            .as_i64()
            .unwrap_or(0);
        if left < 101 * 86_400 {
            assert!(left > 99 * 86_400, "{left}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gauge = sample(
        &scrape(metrics).await,
        "passage_relay_certificate_expiry_seconds",
    )
    .expect("expiry metric");
    assert!(gauge < 101.0 * 86_400.0, "{gauge}");

    // A client connecting now, with the same bundle, verifies the new
    // certificate against the CA it already trusts.
    let newcomer = LocalClient::start_over(bundle, transport, |_| {}).await;
    newcomer
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    assert_eq!(
        newcomer.get("/v1/models").await.expect("answer").status(),
        200
    );
    assert!(traffic.finish().await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_programs_warn_when_their_certificate_is_due_for_renewal() {
    use tokio::io::AsyncBufReadExt;
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let dir = pki.path();
    renew(&[
        "--dir",
        dir.to_str().expect("utf-8 path"),
        "--server",
        "--days",
        "5",
    ])
    .await;
    let relay =
        passage_tests::relays::RelayProcess::start(&pki, free_udp_port(), &upstream.url()).await;
    let line = relay
        .wait_for_log(
            &["WARN", "certificate expires soon", "days_left="],
            Duration::from_secs(10),
        )
        .await;
    assert!(line.contains("renew --server"), "{line}");
    assert!(
        line.contains("days_left=4") || line.contains("days_left=5"),
        "{line}"
    );

    // A client whose bundle has three days left says so as it starts.
    let bundle = PkiDir::new(&dir)
        .issue_client("alice", &[relay.addr.to_string()], Some("localhost"), 3)
        .expect("issue");
    let path = pki.dir.path().join("alice.toml");
    write_new_file(&path, bundle.to_toml().expect("toml").as_bytes(), 0o600).expect("bundle");
    let mut child = tokio::process::Command::new(program("passage-client"))
        .arg("run")
        .arg("--bundle")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0", "--state-file", "none"])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("passage-client starts");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("WARN") && line.contains("certificate expires soon") {
                return line;
            }
        }
        String::new()
    })
    .await
    .expect("a warning within 10 s");
    assert!(found.contains("renew --name"), "{found}");
    assert!(
        found.contains("days_left=2") || found.contains("days_left=3"),
        "{found}"
    );
}
