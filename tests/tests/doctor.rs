//! `passage-client doctor`, run as a user runs it: for each way the path
//! can fail (relay down, UDP blocked, certificate revoked, expired or from
//! another CA, upstream key rejected, upstream unreachable) it names the
//! failing check and exits non-zero; on a working path it passes while a
//! `run` is up on the same bundle.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use passage_relay::upstream::ApiKey;
use passage_shared::bundle::Bundle;
use passage_shared::pki::PkiDir;
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{
    InProcessRelay, LocalClient, TestPki, free_tcp_port, free_udp_port, program,
};

/// What one doctor run printed and how it exited.
struct Finding {
    code: i32,
    report: serde_json::Value,
}

impl Finding {
    fn check(&self, name: &str) -> &serde_json::Value {
        self.report["checks"]
            .as_array()
            .and_then(|checks| checks.iter().find(|c| c["name"] == name))
            .unwrap_or_else(|| panic!("no {name} check in {}", self.report))
    }

    fn verdict(&self, name: &str) -> &str {
        self.check(name)["verdict"].as_str().unwrap_or_default()
    }

    fn detail(&self, name: &str) -> &str {
        self.check(name)["detail"].as_str().unwrap_or_default()
    }

    fn first_failure(&self) -> Option<&str> {
        self.report["first_failure"].as_str()
    }

    /// Asserts exit code 1, `check` as the first failure, and `needle` in its detail.
    fn assert_fails_at(&self, check: &str, needle: &str) {
        assert_eq!(self.code, 1, "{}", self.report);
        assert_eq!(self.first_failure(), Some(check), "{}", self.report);
        assert!(self.detail(check).contains(needle), "{}", self.report);
    }
}

fn write_bundle(dir: &Path, bundle: &Bundle) -> PathBuf {
    let path = dir.join(format!("{}.toml", bundle.name));
    let text = bundle.to_toml().expect("bundle toml");
    passage_shared::pki::write_new_file(&path, text.as_bytes(), 0o600).expect("write bundle");
    path
}

async fn doctor(bundle: &Path, extra: &[&str]) -> Finding {
    let bundle = bundle.to_str().expect("utf-8 path");
    let mut args = vec!["doctor", "--bundle", bundle, "--json", "--timeout", "2"];
    args.extend(["--transfer-seconds", "1", "--state-file", "none"]);
    args.extend(extra);
    run_doctor("passage-client", &args, &[]).await
}

/// Runs `program` with `args` (a doctor with `--json`) and reads its findings.
async fn run_doctor(program_name: &str, args: &[&str], env: &[(&str, &str)]) -> Finding {
    let output = tokio::process::Command::new(program(program_name))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "off")
        .output()
        .await
        .expect("doctor runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    Finding {
        code: output.status.code().unwrap_or(-1),
        report,
    }
}

fn relay_with_key(pki: &TestPki, upstream: &str, key: &str) -> InProcessRelay {
    passage_tests::secrets::register(key);
    let key = key.to_owned();
    InProcessRelay::start(pki, free_udp_port(), upstream, move |config| {
        config.api_keys = vec![ApiKey::new(key)];
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_working_path_passes_every_check_beside_a_running_client() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = relay_with_key(&pki, &upstream.url(), "sk-doctor-good");
    // A year's certificate: one due for renewal within 14 days only warns.
    let bundle = PkiDir::new(pki.path())
        .issue_client("laptop", &[relay.addr.to_string()], Some("localhost"), 365)
        .expect("issue");
    let path = write_bundle(pki.dir.path(), &bundle);
    let running = LocalClient::start(bundle, |_| {}).await;
    running
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;

    let found = doctor(&path, &[]).await;
    assert_eq!(found.code, 0, "{}", found.report);
    assert_eq!(found.report["ok"], true);
    for name in [
        "bundle",
        "dns",
        "relay",
        "quic",
        "tcp",
        "certificate",
        "upstream",
        "rtt",
        "throughput",
    ] {
        assert_eq!(found.verdict(name), "ok", "{name}: {}", found.report);
    }
    assert!(
        found.detail("upstream").contains("accepted"),
        "{}",
        found.report
    );
    assert!(
        found.detail("throughput").contains("Mbit/s"),
        "{}",
        found.report
    );
    // The running client was not disturbed.
    assert_eq!(
        running.get("/v1/models").await.expect("answer").status(),
        200
    );

    // Over TCP alone, the same.
    let found = doctor(&path, &["--transport", "tcp"]).await;
    assert_eq!(found.code, 0, "{}", found.report);
    assert!(found.detail("rtt").contains("over tcp"), "{}", found.report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_is_down_is_named() {
    let pki = TestPki::new();
    let bundle = pki.issue("laptop", &[free_udp_port()]);
    let path = write_bundle(pki.dir.path(), &bundle);
    let found = doctor(&path, &[]).await;
    found.assert_fails_at("relay", "refused");
    assert_eq!(found.verdict("upstream"), "skip");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_udp_warns_under_auto_and_fails_under_quic() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    // The relay serves TCP on a port of its own; the bundle's UDP port has
    // nothing behind it, as when a network drops UDP.
    let tcp = free_tcp_port();
    let _relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), move |config| {
        config.listen_tcp = passage_relay::TcpListen::At(tcp);
    });
    let silent: SocketAddr = free_udp_port();
    let bundle = pki.issue("laptop", &[silent]);
    let path = write_bundle(pki.dir.path(), &bundle);
    let port = tcp.port().to_string();

    let found = doctor(&path, &["--tcp-port", &port]).await;
    assert_eq!(found.code, 0, "{}", found.report);
    assert_eq!(found.verdict("quic"), "warn", "{}", found.report);
    assert!(
        found.detail("quic").contains("no reply"),
        "{}",
        found.report
    );
    assert_eq!(found.verdict("tcp"), "ok", "{}", found.report);
    assert!(found.detail("rtt").contains("over tcp"), "{}", found.report);

    let found = doctor(&path, &["--tcp-port", &port, "--transport", "quic"]).await;
    assert_eq!(found.code, 1, "{}", found.report);
    assert_eq!(found.first_failure(), Some("quic"), "{}", found.report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_named() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let addr = free_udp_port();
    let bundle = pki.issue("laptop", &[addr]);
    PkiDir::new(pki.path()).revoke("laptop").expect("revoke");
    let _relay = InProcessRelay::start(&pki, addr, &upstream.url(), |_| {});
    let path = write_bundle(pki.dir.path(), &bundle);
    for transport in ["auto", "tcp"] {
        let found = doctor(&path, &["--transport", transport]).await;
        found.assert_fails_at("certificate", "revoked");
        assert_eq!(found.verdict("relay"), "ok", "{}", found.report);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_named() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let addr = free_udp_port();
    let bundle = PkiDir::new(pki.path())
        .issue_client("laptop", &[addr.to_string()], Some("localhost"), -1)
        .expect("issue");
    let _relay = InProcessRelay::start(&pki, addr, &upstream.url(), |_| {});
    let path = write_bundle(pki.dir.path(), &bundle);
    let found = doctor(&path, &[]).await;
    found.assert_fails_at("certificate", "expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_from_another_ca_is_named() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let other = TestPki::new();
    let addr = free_udp_port();
    let _relay = InProcessRelay::start(&pki, addr, &upstream.url(), |_| {});
    let bundle = other.issue("stranger", &[addr]);
    let path = write_bundle(other.dir.path(), &bundle);
    let found = doctor(&path, &[]).await;
    found.assert_fails_at("certificate", "not trusted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_upstream_key_is_named() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = relay_with_key(&pki, &upstream.url(), "sk-rejected-by-upstream");
    let path = write_bundle(pki.dir.path(), &pki.issue("laptop", &[relay.addr]));
    let found = doctor(&path, &[]).await;
    assert_eq!(found.code, 1, "{}", found.report);
    assert_eq!(found.first_failure(), Some("upstream"), "{}", found.report);
    let detail = found.detail("upstream");
    assert!(
        detail.contains("rejected") && detail.contains("401"),
        "{detail}"
    );
    assert!(
        !found.report.to_string().contains("sk-rejected-by"),
        "{}",
        found.report
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_named() {
    let pki = TestPki::new();
    let closed = format!("http://{}", free_tcp_port());
    let relay = relay_with_key(&pki, &closed, "sk-doctor-good");
    let path = write_bundle(pki.dir.path(), &pki.issue("laptop", &[relay.addr]));
    let found = doctor(&path, &[]).await;
    found.assert_fails_at("upstream", "cannot reach");
}

/// `passage-relay doctor` with `args` after `--pki DIR`: its findings.
async fn relay_doctor(pki: &TestPki, args: &[&str], env: &[(&str, &str)]) -> Finding {
    let dir = pki.path();
    let mut all = vec![
        "doctor",
        "--pki",
        dir.to_str().expect("utf-8 path"),
        "--json",
    ];
    all.extend(args);
    run_doctor("passage-relay", &all, env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_doctor_passes_beside_a_serving_relay_and_names_what_breaks() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = relay_with_key(&pki, &upstream.url(), "sk-relay-doctor");
    let listen = relay.addr.to_string();
    let url = upstream.url();
    let key = [("DOCTOR_KEY", "sk-relay-doctor")];
    let serving = [
        "--listen",
        listen.as_str(),
        "--upstream",
        url.as_str(),
        "--api-key-env",
        "DOCTOR_KEY",
    ];

    // The serving relay's own ports pass: it is the relay of this PKI.
    let found = relay_doctor(&pki, &serving, &key).await;
    assert_eq!(found.code, 0, "{}", found.report);
    for name in [
        "pki",
        "certificate",
        "ca",
        "revocations",
        "udp",
        "tcp",
        "keys",
        "upstream",
        "state",
    ] {
        assert_eq!(found.verdict(name), "ok", "{name}: {}", found.report);
    }
    assert!(
        found.detail("tcp").contains("running now"),
        "{}",
        found.report
    );

    // A key variable that is not set stops it as it would stop `serve`.
    let found = relay_doctor(&pki, &serving, &[]).await;
    assert_eq!(found.first_failure(), Some("config"), "{}", found.report);

    // A Redis that does not answer is named.
    let mut with_redis = serving.to_vec();
    let closed = format!("redis://{}", free_tcp_port());
    with_redis.extend(["--state", closed.as_str()]);
    let found = relay_doctor(&pki, &with_redis, &key).await;
    assert_eq!(found.code, 1, "{}", found.report);
    assert_eq!(found.first_failure(), Some("state"), "{}", found.report);

    // A port taken by something else is named.
    let other = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = other.local_addr().expect("addr").to_string();
    let found = relay_doctor(
        &pki,
        &[
            "--listen",
            "127.0.0.1:0",
            "--listen-tcp",
            taken.as_str(),
            "--upstream",
            url.as_str(),
        ],
        &[],
    )
    .await;
    assert_eq!(found.first_failure(), Some("tcp"), "{}", found.report);
}
