//! Revoking a client: after `revoke` and a reload (SIGHUP), the relay
//! closes that client's connection and refuses its handshakes, while other
//! clients carry on.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;
use std::time::{Duration, Instant};

use passage_shared::pki::PkiDir;
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{InProcessRelay, LocalClient, RelayProcess, TestPki, free_udp_port};
use passage_tests::stack::body_json;

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_is_cut_off_and_others_carry_on(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |_| {});
    let alice = LocalClient::start_over(pki.issue("alice", &[relay.addr]), transport, |config| {
        config.connect_wait = Duration::from_millis(500);
    })
    .await;
    let bob = LocalClient::start_over(pki.issue("bob", &[relay.addr]), transport, |_| {}).await;
    alice
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    bob.wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;

    // Revoked on disk only: nothing changes until the relay reloads (on
    // SIGHUP, or when it next looks at the files, within 30 s).
    assert_eq!(PkiDir::new(pki.path()).revoke("alice").expect("revoke"), 1);
    let models = alice.get("/v1/models").await.expect("answer");
    assert_eq!(models.status(), 200);

    relay.reload();
    let deadline = Instant::now() + Duration::from_secs(5);
    let health = loop {
        let health = alice.health().await;
        let message = health["error"]["message"].as_str().unwrap_or_default();
        if message.contains("refused") {
            break health;
        }
        assert!(
            Instant::now() < deadline,
            "alice is still served after the reload: {health}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health["error"]["code"], "tunnel_unavailable");
    let refused = alice.get("/v1/models").await.expect("answer");
    assert_eq!(refused.status(), 503);
    assert_eq!(
        body_json(refused).await["error"]["code"],
        "tunnel_unavailable"
    );

    // Bob's connection was never touched.
    assert_eq!(bob.health().await["status"], "ok");
    let models = bob.get("/v1/models").await.expect("answer");
    assert_eq!(models.status(), 200);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_makes_the_relay_program_apply_a_revocation(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let addr = free_udp_port();
    let relay = RelayProcess::start(&pki, addr, &upstream.url()).await;
    let alice = LocalClient::start_over(pki.issue("alice", &[addr]), transport, |config| {
        config.connect_wait = Duration::from_millis(500);
    })
    .await;
    alice.wait_for_relay(addr, Duration::from_secs(10)).await;
    let served = alice.get("/v1/models").await.expect("answer");
    assert_eq!(served.status(), 200);

    PkiDir::new(pki.path()).revoke("alice").expect("revoke");
    relay.hang_up();
    let deadline = Instant::now() + Duration::from_secs(5);
    while alice.get("/v1/models").await.expect("answer").status() != 503 {
        assert!(
            Instant::now() < deadline,
            "alice is still served after SIGHUP"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
