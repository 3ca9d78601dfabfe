//! Choosing and changing transports: `auto` falls back to TLS over TCP
//! where QUIC gets no answer, moves back to QUIC once a probe succeeds, and
//! says what each transport got when neither works; a relay that goes
//! silent is declared dead within the silence limit on either transport.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use passage_relay::TcpListen;
use passage_tests::Transport::{self, Quic, Tcp};
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{
    InProcessRelay, LocalClient, RelayLaunch, RelayProcess, TestPki, free_tcp_port, free_udp_port,
    sample, scrape,
};
use passage_tests::stack::{after_first_event, body_json, read_to_end};
use rstest::rstest;

/// Polls `/healthz` until it answers 200 over `transport`; returns how long it took.
async fn wait_for_transport(client: &LocalClient, transport: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let health = client.health().await;
        if health["status"] == "ok" && health["transport"] == transport {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "not up over {transport} within {limit:?}: {health}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A relay reachable at `tcp` over TCP only: its QUIC socket listens
/// elsewhere, so QUIC handshakes to `tcp`'s port get no answer (as where
/// UDP is blocked).
fn tcp_only_relay(pki: &TestPki, upstream: &MockUpstream, tcp: SocketAddr) -> InProcessRelay {
    InProcessRelay::start(pki, free_udp_port(), &upstream.url(), |config| {
        config.listen_tcp = TcpListen::At(tcp);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_where_quic_gets_no_answer() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let tcp = free_udp_port();
    let _relay = tcp_only_relay(&pki, &upstream, tcp);
    let started = Instant::now();
    let client = LocalClient::start(pki.issue("app", &[tcp]), |config| {
        config.metrics = Some("127.0.0.1:0".parse().expect("literal"));
    })
    .await;
    wait_for_transport(&client, "tcp", Duration::from_secs(3)).await;
    let up = started.elapsed();
    // The head start (300 ms) plus a TCP and TLS handshake on loopback.
    assert!(up < Duration::from_secs(2), "up over TCP after {up:?}");
    let response = client
        .post_json("/v1/chat/completions", &serde_json::json!({"model": "m"}))
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
    let text = scrape(client.metrics.expect("metrics on")).await;
    let relay = format!("relay=\"{tcp}\"");
    assert_eq!(
        sample(
            &text,
            &format!("passage_client_tunnel_transport{{{relay},transport=\"tcp\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("passage_client_transport_fallbacks_total{{{relay}}}")
        ),
        Some(1.0),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_probe_moves_new_requests_back_while_tcp_streams_finish() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let port = free_udp_port();
    let _tcp_relay = tcp_only_relay(&pki, &upstream, port);
    let client = LocalClient::start(pki.issue("app", &[port]), |config| {
        config.tunnel.probe_first = Duration::from_millis(500);
        config.tunnel.probe_max = Duration::from_secs(1);
    })
    .await;
    wait_for_transport(&client, "tcp", Duration::from_secs(3)).await;
    let mut on_tcp = after_first_event(
        client
            .get("/v1/endless?interval_ms=50")
            .await
            .expect("stream starts"),
    )
    .await;

    // QUIC starts answering on the bundle's port (UDP "unblocked").
    let _quic_relay = InProcessRelay::start(&pki, port, &upstream.url(), |config| {
        config.listen_tcp = TcpListen::Off;
    });
    wait_for_transport(&client, "quic", Duration::from_secs(5)).await;
    let response = client.get("/v1/models").await.expect("answer");
    assert_eq!(response.status(), 200);
    let health = client.health().await;
    assert!(
        health["relays"][0]["quic_probes"].as_u64() >= Some(1),
        "{health}"
    );
    // The stream that started on TCP is still flowing there.
    let (received, _) = read_to_end_for(&mut on_tcp, Duration::from_millis(300)).await;
    assert!(
        received > 0,
        "the TCP stream stopped when new requests moved to QUIC"
    );
}

/// Reads `body` for `period`; how many bytes arrived, and whether it ended.
async fn read_to_end_for(body: &mut hyper::body::Incoming, period: Duration) -> (usize, bool) {
    use http_body_util::BodyExt;
    let mut received = 0;
    let deadline = tokio::time::Instant::now() + period;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return (received, false),
            Ok(Some(Ok(frame))) => received += frame.data_ref().map_or(0, |d| d.len()),
            Ok(_) => return (received, true),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_no_transport_works_the_error_names_what_each_got() {
    let pki = TestPki::new();
    // Nothing listens there: TCP is refused, QUIC gets no answer.
    let nowhere = free_tcp_port();
    let client = LocalClient::start(pki.issue("app", &[nowhere]), |config| {
        config.tunnel.connect_timeout = Duration::from_millis(500);
        config.connect_wait = Duration::from_millis(1500);
    })
    .await;
    let response = client
        .post_json("/v1/chat/completions", &serde_json::json!({"model": "m"}))
        .await
        .expect("answer");
    assert_eq!(response.status(), 503);
    let body = body_json(response).await;
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert_eq!(body["error"]["code"], "tunnel_unavailable", "{body}");
    assert!(
        message.contains("QUIC: no reply to") && message.contains("UDP may be blocked"),
        "{message}"
    );
    assert!(
        message.contains("TCP: ") && message.to_lowercase().contains("refused"),
        "{message}"
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_relay_is_declared_dead_and_health_stops_saying_ok(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let addr = free_udp_port();
    let relay = RelayProcess::launch(&pki, addr, &upstream.url(), RelayLaunch::default()).await;
    let client = LocalClient::start_over(pki.issue("app", &[addr]), transport, |config| {
        config.connect_wait = Duration::from_secs(1);
    })
    .await;
    client.wait_for_relay(addr, Duration::from_secs(10)).await;
    let mut streaming = after_first_event(
        client
            .get("/v1/endless?interval_ms=100")
            .await
            .expect("stream starts"),
    )
    .await;

    // Frozen: its sockets stay open but nothing comes back.
    relay.signal("STOP");
    let frozen = Instant::now();
    let mut unconfirmed = None;
    while frozen.elapsed() < Duration::from_secs(4) {
        let status = client.get("/healthz").await.expect("healthz").status();
        if status == 503 {
            unconfirmed = Some(frozen.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unconfirmed = unconfirmed.expect("healthz kept saying ok for 4 s");
    assert!(
        unconfirmed < Duration::from_secs(3),
        "healthz said ok for {unconfirmed:?}"
    );
    let (_, outcome) = read_to_end(&mut streaming, Duration::from_secs(8)).await;
    let noticed = frozen.elapsed();
    assert!(outcome.is_err(), "a cut stream must not end cleanly");
    assert!(
        noticed < Duration::from_secs(5),
        "the app learned after {noticed:?}"
    );
    relay.signal("CONT");
    client.wait_for_relay(addr, Duration::from_secs(5)).await;
}
