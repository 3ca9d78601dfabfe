//! Only clients with a certificate from the relay's CA get through; the
//! upstream never sees a request from anyone else.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;
use std::time::Duration;

use passage_shared::bundle::Bundle;
use passage_shared::pki::PkiDir;
use passage_tests::stack::{StackOptions, TestStack, body_json};
use tempfile::TempDir;

/// A bundle that trusts the real CA but presents a certificate from another CA.
fn foreign_client(issued: &Bundle, dir: &TempDir) -> Bundle {
    let foreign = PkiDir::new(dir.path().join("foreign-pki"));
    foreign.init(&[]).expect("foreign PKI");
    let impostor = foreign
        .issue_client("test-client", &issued.relays, Some("localhost"), 1)
        .expect("foreign issue");
    Bundle {
        cert: impostor.cert,
        key: impostor.key,
        ..issued.clone()
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_client_is_refused(#[values(Quic, Tcp)] transport: Transport) {
    let stack = TestStack::start_with(StackOptions {
        bundle_override: Some(foreign_client),
        connect_wait: Some(Duration::from_millis(800)),
        transport,
        ..StackOptions::default()
    })
    .await;

    // Poll /healthz until a handshake attempt has been refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let health = loop {
        let response = stack.get("/healthz").await.expect("healthz answers");
        assert_eq!(response.status(), 503);
        let health = body_json(response).await;
        let message = health["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if message.contains("refused the connection") {
            break health;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no refusal reported: {message}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(health["error"]["code"], "tunnel_unavailable");

    let response = stack
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({"model": "m", "messages": []}),
        )
        .await;
    assert_eq!(response.status(), 503);
    let body = body_json(response).await;
    assert_eq!(body["error"]["type"], "passage_error");
    assert_eq!(body["error"]["code"], "tunnel_unavailable");
    assert_eq!(
        stack.upstream.request_count(),
        0,
        "the upstream saw nothing"
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_from_another_ca_is_not_trusted(#[values(Quic, Tcp)] transport: Transport) {
    /// A bundle whose CA is not the one that signed the relay's certificate.
    fn wrong_ca(issued: &Bundle, dir: &TempDir) -> Bundle {
        let other = PkiDir::new(dir.path().join("other-pki"));
        other.init(&[]).expect("other PKI");
        let other_bundle = other
            .issue_client("test-client", &issued.relays, Some("localhost"), 1)
            .expect("other issue");
        Bundle {
            ca_cert: other_bundle.ca_cert,
            ..issued.clone()
        }
    }
    let stack = TestStack::start_with(StackOptions {
        bundle_override: Some(wrong_ca),
        connect_wait: Some(Duration::from_millis(800)),
        transport,
        ..StackOptions::default()
    })
    .await;
    let response = stack.get("/v1/models").await.expect("answers");
    assert_eq!(response.status(), 503);
    assert_eq!(stack.upstream.request_count(), 0);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_the_tunnel_up(#[values(Quic, Tcp)] transport: Transport) {
    let stack = TestStack::start_over(transport).await;
    let response = stack.get("/healthz").await.expect("answers");
    assert_eq!(response.status(), 200);
    let body = body_json(response).await;
    assert_eq!(body["status"], "ok");
    assert_eq!(body["relay"], stack.relay_addr.to_string());
    assert_eq!(
        stack.upstream.request_count(),
        0,
        "healthz is answered locally"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = PkiDir::new(dir.path());
    pki.init(&[]).expect("init");
    let bundle = pki
        .issue_client("c", &["127.0.0.1:4433".into()], None, 1)
        .expect("issue");
    let config = passage_client::ClientConfig::new(bundle, "0.0.0.0:0".parse().expect("literal"));
    let error = passage_client::Client::bind(config)
        .await
        .expect_err("a non-loopback listen address is refused");
    assert!(error.to_string().contains("loopback"), "{error}");
}
