//! WebSocket sessions (the Realtime API) through the tunnel: the app's
//! upgrade reaches the upstream with the relay's key and none of the app's,
//! messages pass both ways whole (text, binary, larger than a tunnel
//! frame), a close on one side reaches the other, and a refused upgrade
//! reaches the app as the upstream's answer.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use passage_tests::Transport::{self, Quic, Tcp};
use passage_tests::mock_realtime::USAGE;
use passage_tests::stack::{StackOptions, TestStack};
use rstest::rstest;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error, Message};

const RELAY_KEY: &str = "sk-relay-websocket-0123456789";

async fn stack(transport: Transport) -> TestStack {
    TestStack::start_with(StackOptions {
        transport,
        api_key: Some(RELAY_KEY.to_owned()),
        ..StackOptions::default()
    })
    .await
}

/// Opens a WebSocket to `path` on the client like the SDKs do: the app's
/// key in `Authorization` and, browser-style, in a subprotocol.
async fn connect(
    stack: &TestStack,
    path: &str,
) -> Result<
    (
        WebSocketStream<TcpStream>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    Error,
> {
    connect_to(stack.client_addr, path).await
}

/// [`connect`] for a client at `addr`.
async fn connect_to(
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<
    (
        WebSocketStream<TcpStream>,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    Error,
> {
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    let headers = request.headers_mut();
    headers.insert("authorization", "Bearer app-key".parse().expect("value"));
    headers.insert(
        "sec-websocket-protocol",
        "realtime, openai-insecure-api-key.app-key"
            .parse()
            .expect("value"),
    );
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tokio_tungstenite::client_async(request, tcp).await
}

/// The first session close the mock upstream saw; panics if none came
/// within `limit`.
async fn upstream_close(
    upstream: &passage_tests::mock_upstream::MockUpstream,
    limit: Duration,
) -> passage_tests::mock_realtime::SessionClose {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(close) = upstream.record.ws_closes.lock().expect("lock").first() {
            return close.clone();
        }
        assert!(
            Instant::now() < deadline,
            "the upstream saw no close within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn next_json(ws: &mut WebSocketStream<TcpStream>) -> serde_json::Value {
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => serde_json::from_str(&text).expect("JSON event"),
        other => panic!("expected a text message, got {other:?}"),
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realtime_session_carries_messages_both_ways_with_the_relays_key(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let stack = stack(transport).await;
    let (mut ws, response) = connect(&stack, "/v1/realtime?model=gpt-realtime")
        .await
        .expect("handshake");
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["sec-websocket-protocol"], "realtime");

    let created = next_json(&mut ws).await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["session"]["model"], "gpt-realtime");
    // The relay's key, and nothing of the app's, reached the upstream.
    assert_eq!(created["authorization"], format!("Bearer {RELAY_KEY}"));
    assert_eq!(created["protocols"], serde_json::json!(["realtime"]));

    ws.send(Message::text(r#"{"type":"response.create"}"#))
        .await
        .expect("send");
    let mut deltas = String::new();
    let done = loop {
        let event = next_json(&mut ws).await;
        match event["type"].as_str() {
            Some("response.output_text.delta") => {
                deltas.push_str(event["delta"].as_str().unwrap_or_default())
            }
            Some("response.done") => break event,
            other => panic!("unexpected event {other:?}"),
        }
    };
    assert_eq!(deltas, "Hello!");
    assert_eq!(done["response"]["usage"]["input_tokens"], USAGE.0);

    // Binary, larger than one tunnel frame: it comes back whole.
    let blob: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    ws.send(Message::binary(blob.clone())).await.expect("send");
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Binary(echo)))) => assert!(echo[..] == blob[..], "echo differs"),
        other => panic!("expected the binary echo, got {other:?}"),
    }

    // The app closes: the upstream sees the same close soon after.
    let closed_at = Instant::now();
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("close");
    let close = upstream_close(&stack.upstream, Duration::from_secs(2)).await;
    assert_eq!(close.code, Some(1000));
    let took = close.at.duration_since(closed_at);
    assert!(took < Duration::from_millis(500), "close took {took:?}");
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_close_reaches_the_app_with_its_code(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let stack = stack(transport).await;
    let (mut ws, _) = connect(&stack, "/v1/realtime").await.expect("handshake");
    assert_eq!(next_json(&mut ws).await["type"], "session.created");
    ws.send(Message::text(r#"{"type":"mock.close","code":4000}"#))
        .await
        .expect("send");
    match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
        Ok(Some(Ok(Message::Close(Some(frame))))) => {
            assert_eq!(u16::from(frame.code), 4000);
            assert_eq!(frame.reason, "closed by the mock");
        }
        other => panic!("expected the upstream's close, got {other:?}"),
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_reaches_the_app_as_the_upstreams_answer(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let stack = stack(transport).await;
    match connect(&stack, "/v1/status/404").await {
        Err(Error::Http(response)) => assert_eq!(response.status(), 404),
        other => panic!(
            "expected the upstream's 404, got {:?}",
            other.map(|(_, r)| r)
        ),
    }
    // Nothing was opened at the upstream.
    assert_eq!(
        stack
            .upstream
            .record
            .ws_sessions
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

/// The close the app gets next (panics after 8 s or on anything else).
async fn close_of(ws: &mut WebSocketStream<TcpStream>) -> CloseFrame {
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => return frame,
            Ok(Some(Ok(Message::Text(_) | Message::Binary(_)))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_closes_both_sides_with_1009(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let stack = stack(transport).await;
    let (mut ws, _) = connect(&stack, "/v1/realtime").await.expect("handshake");
    assert_eq!(next_json(&mut ws).await["type"], "session.created");
    let huge = vec![7u8; (16 << 20) + 1];
    // The client may close before it has read the whole message.
    let _ = ws.send(Message::binary(huge)).await;
    assert_eq!(u16::from(close_of(&mut ws).await.code), 1009);
    let close = upstream_close(&stack.upstream, Duration::from_secs(2)).await;
    assert_eq!(close.code, Some(1009));
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_relay_closes_the_apps_session_with_1011(#[values(Quic, Tcp)] transport: Transport) {
    use passage_tests::mock_upstream::MockUpstream;
    use passage_tests::relays::{LocalClient, RelayProcess, TestPki, free_udp_port};
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let addr = free_udp_port();
    let mut relay = RelayProcess::start(&pki, addr, &upstream.url()).await;
    let client = LocalClient::start_over(pki.issue("app", &[addr]), transport, |_| {}).await;
    client.wait_for_relay(addr, Duration::from_secs(10)).await;
    let (mut ws, _) = connect_to(client.addr, "/v1/realtime")
        .await
        .expect("handshake");
    assert_eq!(next_json(&mut ws).await["type"], "session.created");
    let killed = Instant::now();
    relay.kill().await;
    let close = close_of(&mut ws).await;
    assert_eq!(u16::from(close.code), 1011, "{close:?}");
    assert!(close.reason.contains("tunnel"), "{close:?}");
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "the app learned after {:?}",
        killed.elapsed()
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_usage_reaches_the_relays_usage_line(#[values(Quic, Tcp)] transport: Transport) {
    use passage_tests::mock_upstream::MockUpstream;
    use passage_tests::relays::{LocalClient, RelayProcess, TestPki, free_udp_port};
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let addr = free_udp_port();
    let relay = RelayProcess::start(&pki, addr, &upstream.url()).await;
    let client = LocalClient::start_over(pki.issue("app", &[addr]), transport, |_| {}).await;
    client.wait_for_relay(addr, Duration::from_secs(10)).await;
    let (mut ws, _) = connect_to(client.addr, "/v1/realtime?model=gpt-realtime")
        .await
        .expect("handshake");
    assert_eq!(next_json(&mut ws).await["type"], "session.created");
    for _ in 0..2 {
        ws.send(Message::text(r#"{"type":"response.create"}"#))
            .await
            .expect("send");
        while next_json(&mut ws).await["type"] != "response.done" {}
    }
    ws.close(None).await.expect("close");
    // Two responses: their usage adds up in the session's one line.
    let (input, output) = USAGE;
    let line = relay
        .wait_for_log(
            &[
                "client=app",
                "path=/v1/realtime",
                &format!("prompt_tokens={}", 2 * input),
            ],
            Duration::from_secs(5),
        )
        .await;
    for part in [
        "status=101",
        "model=\"gpt-realtime\"",
        &format!("completion_tokens={}", 2 * output),
        "ended=\"complete\"",
    ] {
        assert!(line.contains(part), "{part} missing from: {line}");
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_rules_and_the_concurrency_limit_hold_for_sessions(
    #[values(Quic, Tcp)] transport: Transport,
) {
    use passage_relay::policy::{ClientRules, Policy, PolicyTables};
    use passage_tests::mock_upstream::MockUpstream;
    use passage_tests::relays::{InProcessRelay, LocalClient, TestPki, free_udp_port};
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let mut tables = PolicyTables::default();
    let rules = ClientRules {
        allow_models: Some(vec!["gpt-realtime*".into()]),
        concurrent_requests: std::num::NonZeroU32::new(1),
        ..ClientRules::default()
    };
    tables.clients.insert("voice".into(), rules);
    let policy = Policy::new(tables).expect("valid policy");
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |config| {
        config.policy = policy;
    });
    let client =
        LocalClient::start_over(pki.issue("voice", &[relay.addr]), transport, |_| {}).await;
    client
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    let status_of = |result: Result<_, Error>| match result {
        Err(Error::Http(response)) => response.status().as_u16(),
        Ok((_, response)) => {
            let response: tokio_tungstenite::tungstenite::handshake::client::Response = response;
            response.status().as_u16()
        }
        Err(e) => panic!("handshake failed: {e}"),
    };

    // A model outside the rules, or none named: refused before the upstream.
    assert_eq!(
        status_of(connect_to(client.addr, "/v1/realtime?model=gpt-4o").await),
        403
    );
    assert_eq!(
        status_of(connect_to(client.addr, "/v1/realtime").await),
        403
    );
    let sessions = || {
        upstream
            .record
            .ws_sessions
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    assert_eq!(sessions(), 0);

    // An allowed one opens; while it lives it holds the one slot.
    let (mut ws, _) = connect_to(client.addr, "/v1/realtime?model=gpt-realtime-mini")
        .await
        .expect("handshake");
    assert_eq!(next_json(&mut ws).await["type"], "session.created");
    assert_eq!(
        status_of(connect_to(client.addr, "/v1/realtime?model=gpt-realtime").await),
        429
    );

    // Switching to a model outside the rules closes the session (1008).
    ws.send(Message::text(
        r#"{"type":"session.update","session":{"model":"gpt-4o"}}"#,
    ))
    .await
    .expect("send");
    let close = close_of(&mut ws).await;
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    assert!(close.reason.contains("gpt-realtime*"), "{close:?}");

    // The slot is free again once the session is over.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match connect_to(client.addr, "/v1/realtime?model=gpt-realtime").await {
            Ok(_) => break,
            Err(Error::Http(response)) if response.status() == 429 => {
                assert!(Instant::now() < deadline, "the slot stayed taken");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("handshake failed: {e}"),
        }
    }
}

/// A relay in this process with `adjust` applied, and a client to it.
async fn relay_and_client(
    transport: Transport,
    upstream: &passage_tests::mock_upstream::MockUpstream,
    adjust: impl FnOnce(&mut passage_relay::RelayConfig),
) -> (
    passage_tests::relays::InProcessRelay,
    passage_tests::relays::LocalClient,
) {
    use passage_tests::relays::{InProcessRelay, LocalClient, TestPki, free_udp_port};
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), adjust);
    let client = LocalClient::start_over(pki.issue("app", &[relay.addr]), transport, |_| {}).await;
    client
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    (relay, client)
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_closed_on_both_sides(#[values(Quic, Tcp)] transport: Transport) {
    let upstream = passage_tests::mock_upstream::MockUpstream::start()
        .await
        .expect("mock upstream");
    let (_relay, client) = relay_and_client(transport, &upstream, |config| {
        config.ws_limits.idle = Duration::from_secs(1);
    })
    .await;
    let (mut ws, _) = connect_to(client.addr, "/v1/realtime")
        .await
        .expect("handshake");
    assert_eq!(next_json(&mut ws).await["type"], "session.created");
    let quiet = Instant::now();
    let close = close_of(&mut ws).await;
    assert_eq!(u16::from(close.code), 1000, "{close:?}");
    assert!(close.reason.contains("no message"), "{close:?}");
    let after = quiet.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "closed after {after:?}"
    );
    upstream_close(&upstream, Duration::from_secs(2)).await;
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_relay_closes_sessions_with_1001_after_the_drain_period(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = passage_tests::mock_upstream::MockUpstream::start()
        .await
        .expect("mock upstream");
    let (relay, client) = relay_and_client(transport, &upstream, |config| {
        config.drain_timeout = Duration::from_secs(1);
    })
    .await;
    let (mut ws, _) = connect_to(client.addr, "/v1/realtime")
        .await
        .expect("handshake");
    assert_eq!(next_json(&mut ws).await["type"], "session.created");
    relay.begin_shutdown();
    let asked = Instant::now();
    // Within the drain period the session still works.
    ws.send(Message::text("still here")).await.expect("send");
    match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
        Ok(Some(Ok(Message::Text(text)))) => assert_eq!(text, "still here"),
        other => panic!("expected the echo, got {other:?}"),
    }
    let close = close_of(&mut ws).await;
    assert_eq!(u16::from(close.code), 1001, "{close:?}");
    let after = asked.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(4),
        "closed after {after:?}"
    );
    let close = upstream_close(&upstream, Duration::from_secs(2)).await;
    assert_eq!(close.code, Some(1001));
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_client_closes_its_sessions(#[values(Quic, Tcp)] transport: Transport) {
    use passage_shared::pki::PkiDir;
    use passage_tests::mock_upstream::MockUpstream;
    use passage_tests::relays::{InProcessRelay, LocalClient, TestPki, free_udp_port};
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |_| {});
    let alice = LocalClient::start_over(pki.issue("alice", &[relay.addr]), transport, |_| {}).await;
    alice
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    let (mut ws, _) = connect_to(alice.addr, "/v1/realtime")
        .await
        .expect("handshake");
    assert_eq!(next_json(&mut ws).await["type"], "session.created");
    assert_eq!(PkiDir::new(pki.path()).revoke("alice").expect("revoke"), 1);
    relay.reload();
    let close = close_of(&mut ws).await;
    assert_eq!(u16::from(close.code), 1011, "{close:?}");
    // The upstream side was closed too, not left open.
    upstream_close(&upstream, Duration::from_secs(3)).await;
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_access_token_guards_upgrades_and_stays_local(
    #[values(Quic, Tcp)] transport: Transport,
) {
    use passage_tests::mock_upstream::MockUpstream;
    use passage_tests::relays::{InProcessRelay, LocalClient, TestPki, free_udp_port};
    const TOKEN: &str = "local-token-websocket-0123";
    passage_tests::secrets::register(TOKEN);
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |_| {});
    let client = LocalClient::start_over(pki.issue("app", &[relay.addr]), transport, |config| {
        config.access_token = Some(passage_client::AccessToken(TOKEN.into()));
    })
    .await;
    // With the token as its key the app gets its session (once the tunnel
    // is up: the health detail needs the token, so the handshake is the
    // probe); the token stays here.
    let with_token = || async {
        let mut request = format!("ws://{}/v1/realtime", client.addr)
            .into_client_request()
            .expect("request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {TOKEN}").parse().expect("value"),
        );
        let tcp = TcpStream::connect(client.addr).await.expect("connect");
        tokio_tungstenite::client_async(request, tcp).await
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ws = loop {
        match with_token().await {
            Ok((ws, _)) => break ws,
            Err(Error::Http(response)) if response.status() == 503 => {
                assert!(Instant::now() < deadline, "the tunnel never came up");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("handshake failed: {e}"),
        }
    };
    let created = next_json(&mut ws).await;
    assert_eq!(created["type"], "session.created");
    assert!(!created.to_string().contains(TOKEN), "{created}");
    // `connect_to` sends a wrong key: refused before the tunnel.
    match connect_to(client.addr, "/v1/realtime").await {
        Err(Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected 401, got {:?}", other.map(|(_, r)| r)),
    }
    assert_eq!(
        upstream
            .record
            .ws_sessions
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}
