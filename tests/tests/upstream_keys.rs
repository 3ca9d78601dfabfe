//! Several relay keys: used in turn, a rate-limited one rests and is
//! skipped, and when every key rests the app gets the upstream's 429.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;
use std::time::Duration;

use passage_relay::upstream::ApiKey;
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{InProcessRelay, LocalClient, TestPki, free_udp_port};
use passage_tests::stack::body_json;

async fn statuses(
    keys: &[&str],
    requests: usize,
    transport: Transport,
) -> Vec<(u16, serde_json::Value)> {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    for key in keys {
        passage_tests::secrets::register(key);
    }
    let keys: Vec<ApiKey> = keys.iter().map(|k| ApiKey::new((*k).to_owned())).collect();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |config| {
        config.api_keys = keys;
    });
    let client = LocalClient::start_over(pki.issue("app", &[relay.addr]), transport, |_| {}).await;
    client
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    let mut seen = Vec::new();
    for _ in 0..requests {
        let response = client.get("/v1/keyed").await.expect("answer");
        let status = response.status().as_u16();
        seen.push((status, body_json(response).await));
    }
    seen
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_key_rests_and_the_others_carry_the_load(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let seen = statuses(&["sk-limited", "sk-good"], 6, transport).await;
    assert_eq!(
        seen[0].0, 429,
        "the first key's 429 reaches the app unchanged"
    );
    for (status, body) in &seen[1..] {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["authorization"], "Bearer sk-good");
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_key_rests_the_app_gets_the_upstreams_429(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let seen = statuses(&["sk-limited-1", "sk-limited-2"], 4, transport).await;
    for (status, body) in &seen {
        assert_eq!(*status, 429, "{body}");
        assert_eq!(body["error"]["message"], "rate limited");
    }
}
