//! Relays that die, go silent, shut down or come back: the client notices
//! in bounded time, fails what it must with a clear error, sends again only
//! what the relay provably never had, and carries on by itself.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;
use std::time::{Duration, Instant};

use http::Method;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{InProcessRelay, LocalClient, RelayProcess, TestPki, free_udp_port};
use passage_tests::stack::{after_first_event, body_json, read_to_end};

/// How soon an app learns that its relay died (issue target: 5 s from the
/// kill; the client declares a silent connection dead after 4 s).
const DETECTION_LIMIT: Duration = Duration::from_secs(5);

fn chat() -> serde_json::Value {
    serde_json::json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
}

/// Opens a streaming GET of `path` and reads its first event; the
/// returned body goes on from there.
async fn stream_started(client: &LocalClient, path: &str) -> Incoming {
    after_first_event(client.get(path).await.expect("head")).await
}

/// With no relay up, a chat completion waits out the 1 s connect wait,
/// then gets a 503 `tunnel_unavailable`.
async fn waits_then_gets_503(client: &LocalClient) {
    let asked = Instant::now();
    let response = client
        .post_json("/v1/chat/completions", &chat())
        .await
        .expect("answer");
    assert_eq!(response.status(), 503);
    assert!(
        asked.elapsed() >= Duration::from_millis(900),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(
        body_json(response).await["error"]["code"],
        "tunnel_unavailable"
    );
}

/// Waits until the upstream has seen `count` requests in all.
async fn upstream_saw(upstream: &MockUpstream, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.request_count() < count {
        assert!(
            Instant::now() < deadline,
            "the upstream never saw request {count}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_fails_in_flight_requests_and_is_used_again_once_back(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let addr = free_udp_port();
    let mut relay = RelayProcess::start(&pki, addr, &upstream.url()).await;
    let client = LocalClient::start_over(pki.issue("app", &[addr]), transport, |config| {
        config.connect_wait = Duration::from_secs(1);
    })
    .await;
    client.wait_for_relay(addr, Duration::from_secs(10)).await;

    // Two requests in flight: one streaming, one still waiting for its head.
    let mut streaming = stream_started(&client, "/v1/endless?interval_ms=100").await;
    let headless = tokio::spawn(client.send(Method::GET, "/v1/slow-head", None));
    upstream_saw(&upstream, 2).await;

    let killed = Instant::now();
    relay.kill().await;
    let (_, outcome) = read_to_end(&mut streaming, DETECTION_LIMIT + Duration::from_secs(2)).await;
    assert!(outcome.is_err(), "a cut stream must not end cleanly");
    let stream_cut = killed.elapsed();
    let response = headless.await.expect("request task").expect("an answer");
    let status = response.status();
    let error = body_json(response).await;
    let head_failed = killed.elapsed();
    assert_eq!(status, 502, "{error}");
    assert_eq!(error["error"]["type"], "passage_error");
    assert!(
        stream_cut < DETECTION_LIMIT && head_failed < DETECTION_LIMIT,
        "noticed after {stream_cut:?} / {head_failed:?}"
    );

    // While it is down: health says so, and requests wait the connect wait, then 503.
    let health = client.get("/healthz").await.expect("healthz");
    assert_eq!(health.status(), 503);
    waits_then_gets_503(&client).await;

    // Back on the same address: reached again within 2 s of listening.
    let _relay = RelayProcess::start(&pki, addr, &upstream.url()).await;
    let listening = Instant::now();
    loop {
        let response = client
            .post_json("/v1/chat/completions", &chat())
            .await
            .expect("answer");
        if response.status() == 200 {
            break;
        }
        assert!(
            listening.elapsed() < Duration::from_secs(2),
            "still {} {:?} after the relay came back",
            response.status(),
            listening.elapsed()
        );
    }
    assert!(
        listening.elapsed() < Duration::from_secs(2),
        "first success {:?} after the relay came back",
        listening.elapsed()
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_of_two_relays_killed_a_steady_stream_carries_on(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let (first, second) = (free_udp_port(), free_udp_port());
    let mut relay_a = RelayProcess::start(&pki, first, &upstream.url()).await;
    let _relay_b = RelayProcess::start(&pki, second, &upstream.url()).await;
    let client =
        LocalClient::start_over(pki.issue("app", &[first, second]), transport, |_| {}).await;
    client.wait_for_relay(first, Duration::from_secs(10)).await;
    let health = client.health().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut both_up = health["relays"][1]["state"] == "up";
    while !both_up {
        assert!(Instant::now() < deadline, "the standby never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
        both_up = client.health().await["relays"][1]["state"] == "up";
    }

    let run_for = Duration::from_secs(9);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let client_send = {
            let base = client.url("");
            let http = client.http.clone();
            move || {
                let request = http::Request::post(format!("{base}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(
                        chat().to_string(),
                    )))
                    .expect("request");
                let http = http.clone();
                async move { http.request(request).await }
            }
        };
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut hung) = (0u32, 0u32, 0u32);
            while started.elapsed() < run_for {
                match tokio::time::timeout(Duration::from_secs(15), client_send()).await {
                    Ok(Ok(response)) if response.status() == 200 => ok += 1,
                    Ok(_) => failed += 1,
                    Err(_) => hung += 1,
                }
            }
            (ok, failed, hung)
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay_a.kill().await;
    let (mut ok, mut failed, mut hung) = (0, 0, 0);
    for worker in workers {
        let (o, f, h) = worker.await.expect("worker");
        ok += o;
        failed += f;
        hung += h;
    }
    let total = ok + failed + hung;
    assert_eq!(hung, 0, "{hung} of {total} requests hung");
    assert!(
        f64::from(ok) >= 0.95 * f64::from(total),
        "only {ok} of {total} requests succeeded"
    );
    assert_eq!(client.health().await["relay"], second.to_string());
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_relay_never_acknowledged_is_sent_once_more_elsewhere(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let (first, second) = (free_udp_port(), free_udp_port());
    let mut relay_a = RelayProcess::start(&pki, first, &upstream.url()).await;
    let _relay_b = RelayProcess::start(&pki, second, &upstream.url()).await;
    let client =
        LocalClient::start_over(pki.issue("app", &[first, second]), transport, |_| {}).await;
    client.wait_for_relay(first, Duration::from_secs(10)).await;

    // The client has not noticed yet: the request goes to the dead relay,
    // which never acknowledges it; when the connection times out it is
    // sent to the other relay, and the upstream sees it once.
    relay_a.kill().await;
    let before = upstream.request_count();
    let sent = Instant::now();
    let response = client
        .post_json("/v1/chat/completions", &chat())
        .await
        .expect("answer");
    assert_eq!(response.status(), 200, "{}", body_json(response).await);
    assert!(sent.elapsed() < DETECTION_LIMIT, "{:?}", sent.elapsed());
    assert_eq!(upstream.request_count(), before + 1);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_upstream_may_have_seen_is_not_sent_again(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let (first, second) = (free_udp_port(), free_udp_port());
    let mut relay_a = RelayProcess::start(&pki, first, &upstream.url()).await;
    let _relay_b = RelayProcess::start(&pki, second, &upstream.url()).await;
    let client =
        LocalClient::start_over(pki.issue("app", &[first, second]), transport, |_| {}).await;
    client.wait_for_relay(first, Duration::from_secs(10)).await;

    let before = upstream.request_count();
    let pending = tokio::spawn(client.send(Method::GET, "/v1/slow-head", None));
    upstream_saw(&upstream, before + 1).await;
    relay_a.kill().await;
    let response = pending.await.expect("request task").expect("an answer");
    assert_eq!(response.status(), 502);
    assert_eq!(
        body_json(response).await["error"]["code"],
        "tunnel_stream_failed"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream.request_count(), before + 1, "sent twice");
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_shutting_down_finishes_in_flight_streams_while_new_requests_move_on(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let mut relay_a = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |config| {
        config.drain_timeout = Duration::from_secs(10);
    });
    let relay_b = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |_| {});
    let client = LocalClient::start_over(
        pki.issue("app", &[relay_a.addr, relay_b.addr]),
        transport,
        |_| {},
    )
    .await;
    client
        .wait_for_relay(relay_a.addr, Duration::from_secs(10))
        .await;

    let mut in_flight = stream_started(&client, "/v1/stamped?chunks=20&interval_ms=100").await;

    relay_a.begin_shutdown();
    client
        .wait_for_relay(relay_b.addr, Duration::from_secs(1))
        .await;
    let asked = Instant::now();
    let response = client
        .post_json("/v1/chat/completions", &chat())
        .await
        .expect("answer");
    assert_eq!(response.status(), 200);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );

    let (received, outcome) = read_to_end(&mut in_flight, Duration::from_secs(10)).await;
    assert_eq!(outcome, Ok(()), "the in-flight stream finishes cleanly");
    let events = String::from_utf8_lossy(&received).matches("data:").count();
    assert_eq!(events, 19, "every remaining event arrives");
    assert!(
        relay_a.finished_within(Duration::from_secs(5)).await,
        "the relay exits once drained"
    );
    assert!(!relay_b.is_finished());
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_only_relay_shutting_down_new_requests_wait_then_get_503(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |config| {
        config.drain_timeout = Duration::from_secs(10);
    });
    let client = LocalClient::start_over(pki.issue("app", &[relay.addr]), transport, |config| {
        config.connect_wait = Duration::from_secs(1);
    })
    .await;
    client
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    // Keep the relay draining with a stream in flight.
    let mut in_flight = stream_started(&client, "/v1/endless?interval_ms=100").await;

    relay.begin_shutdown();
    let deadline = Instant::now() + Duration::from_secs(2);
    while client.get("/healthz").await.expect("healthz").status() != 503 {
        assert!(Instant::now() < deadline, "still healthy after the go-away");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    waits_then_gets_503(&client).await;
    // The stream that was in flight still flows.
    in_flight
        .frame()
        .await
        .expect("still streaming")
        .expect("still streaming");
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_shutting_down_finishes_in_flight_responses(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |_| {});
    let mut client =
        LocalClient::start_over(pki.issue("app", &[relay.addr]), transport, |config| {
            config.drain_timeout = Duration::from_secs(10);
        })
        .await;
    client
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    let mut in_flight = stream_started(&client, "/v1/stamped?chunks=10&interval_ms=100").await;

    client.begin_shutdown();
    let (received, outcome) = read_to_end(&mut in_flight, Duration::from_secs(10)).await;
    assert_eq!(outcome, Ok(()));
    assert_eq!(
        String::from_utf8_lossy(&received).matches("data:").count(),
        9
    );
    assert!(client.finished_within(Duration::from_secs(5)).await);
    assert!(
        tokio::net::TcpStream::connect(client.addr).await.is_err(),
        "the listener is closed"
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacknowledged_request_waits_for_its_relay_to_come_back(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let addr = free_udp_port();
    let mut relay = RelayProcess::start(&pki, addr, &upstream.url()).await;
    let client = LocalClient::start_over(pki.issue("app", &[addr]), transport, |_| {}).await;
    client.wait_for_relay(addr, Duration::from_secs(10)).await;

    // Sent to the dead relay before the client notices; the relay is back
    // by the time the connection times out, and the request goes through
    // on the new connection (the old one's number is never reused).
    relay.kill().await;
    let before = upstream.request_count();
    let pending = tokio::spawn(client.send(Method::POST, "/v1/chat/completions", Some(&chat())));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _relay = RelayProcess::start(&pki, addr, &upstream.url()).await;
    let response = pending.await.expect("request task").expect("an answer");
    assert_eq!(response.status(), 200, "{}", body_json(response).await);
    assert_eq!(upstream.request_count(), before + 1);
}
