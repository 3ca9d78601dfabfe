//! Requests an attacker or a broken app might send to the local endpoint:
//! none turns passage into an open proxy, and every one over a limit gets a
//! clear OpenAI-shaped error.
//!
//! A listener stands in for "somewhere else": requests name it in their
//! target or Host, and the test checks that nothing ever connects to it.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{InProcessRelay, LocalClient, TestPki, free_udp_port};
use passage_tests::stack::{after_first_event, body_json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_BODY: u64 = 1024 * 1024;

/// A TCP listener that counts the connections it gets.
struct Elsewhere {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl Elsewhere {
    async fn start() -> Elsewhere {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((_stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        Elsewhere { addr, connections }
    }
}

/// Sends `head` (and `body`) as raw bytes; returns the status and the body
/// of the answer (the connection is closed after it).
async fn raw(target: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(target)
        .await
        .expect("connect");
    stream.write_all(head.as_bytes()).await.expect("write head");
    // The server may answer and close before it has read a refused body.
    let _ = stream.write_all(body).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "no answer to {head:?}");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn error_code(body: &str) -> String {
    // A body may arrive chunked: take the JSON object inside it.
    let start = body.find('{').unwrap_or(0);
    let end = body.rfind('}').map_or(body.len(), |i| i + 1);
    let value: serde_json::Value = serde_json::from_str(&body[start..end])
        .unwrap_or_else(|e| panic!("not an OpenAI-shaped error ({e}): {body:?}"));
    assert_eq!(value["error"]["type"], "passage_error", "{body}");
    value["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn setup(transport: Transport) -> (MockUpstream, InProcessRelay, LocalClient) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |config| {
        config.max_body = MAX_BODY;
        config.max_streams_per_connection = 2;
    });
    let client = LocalClient::start_over(pki.issue("app", &[relay.addr]), transport, |_| {}).await;
    client
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    (upstream, relay, client)
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_makes_passage_connect_anywhere_but_the_upstream(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let (upstream, _relay, client) = setup(transport).await;
    let elsewhere = Elsewhere::start().await;
    let evil = elsewhere.addr;
    let before = upstream.request_count();

    let refused = [
        format!(
            "GET http://{evil}/v1/models HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n"
        ),
        format!("CONNECT {evil} HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n"),
        "GET /../v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_owned(),
        "GET /v1/%2e%2E/admin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_owned(),
        "GET /v1/./models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_owned(),
        "GET /v1/x/..%2Fadmin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_owned(),
    ];
    for head in &refused {
        let (status, body) = raw(client.addr, head, b"").await;
        assert_eq!(status, 400, "{head:?}: {body}");
        assert_eq!(error_code(&body), "invalid_request_target", "{head:?}");
    }
    assert_eq!(
        upstream.request_count(),
        before,
        "none of those was forwarded"
    );

    // A Host naming another server (on loopback, so it passes the Host
    // check) and a path that looks like a network path both go to the
    // configured upstream, and only there.
    let spoofed = format!("GET /v1/echo HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n");
    let (status, body) = raw(client.addr, &spoofed, b"").await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
    let hosts: Vec<&serde_json::Value> = echo["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter(|h| h[0] == "host")
        .collect();
    assert_eq!(hosts.len(), 1);
    assert_ne!(
        hosts[0][1],
        evil.to_string(),
        "the upstream gets its own Host"
    );

    let network_path =
        format!("GET //{evil}/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let (status, body) = raw(client.addr, &network_path, b"").await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
    assert_eq!(
        echo["path"],
        format!("//{evil}/x"),
        "it reached the configured upstream"
    );

    // An encoded slash that makes no dot segment is a path like any other
    // (some model ids need one) when no path rule applies.
    let encoded =
        "GET /v1/echo/org%2Fmodel HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let (status, body) = raw(client.addr, encoded, b"").await;
    assert_eq!(status, 200, "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
    assert_eq!(echo["path"], "/v1/echo/org%2Fmodel");

    assert_eq!(upstream.request_count() - before, 3);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        elsewhere.connections.load(Ordering::SeqCst),
        0,
        "nothing ever connected elsewhere"
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_get_431(#[values(Quic, Tcp)] transport: Transport) {
    let (upstream, _relay, client) = setup(transport).await;
    let before = upstream.request_count();
    let lines = |n: usize| -> String { (0..n).map(|i| format!("x-h{i}: 1\r\n")).collect() };
    let big = format!("x-big: {}\r\n", "a".repeat(70 * 1024));
    let head = |extra: &str| {
        format!("GET /v1/models HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n")
    };
    // Over passage's limits (80 lines, 64 KiB): its own 431.
    for extra in [lines(85), big] {
        let (status, body) = raw(client.addr, &head(&extra), b"").await;
        assert_eq!(status, 431, "{body}");
        assert_eq!(error_code(&body), "request_header_fields_too_large");
    }
    // Far over (more lines than hyper parses): still a 431, hyper's own.
    let (status, _) = raw(client.addr, &head(&lines(150)), b"").await;
    assert_eq!(status, 431);
    // Within the limit.
    let (status, body) = raw(client.addr, &head(&lines(70)), b"").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(upstream.request_count(), before + 1);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_declared_or_not(#[values(Quic, Tcp)] transport: Transport) {
    let (upstream, _relay, client) = setup(transport).await;
    let before = upstream.request_count();
    let body = vec![b'x'; (MAX_BODY + 1) as usize];

    let declared = format!(
        "POST /sink HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let (status, answer) = raw(client.addr, &declared, &body).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(error_code(&answer), "request_too_large");
    assert_eq!(
        upstream.request_count(),
        before,
        "refused from its head alone"
    );

    // Chunked: no length to judge by; the relay cuts it off at the limit.
    let mut chunked = Vec::new();
    for piece in body.chunks(256 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let head = "POST /sink HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let (status, answer) = raw(client.addr, head, &chunked).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(error_code(&answer), "request_too_large");

    // At the limit exactly, it goes through.
    let fits = format!(
        "POST /sink HTTP/1.1\r\nHost: localhost\r\nContent-Length: {MAX_BODY}\r\nConnection: close\r\n\r\n"
    );
    let (status, answer) = raw(client.addr, &fits, &body[..MAX_BODY as usize]).await;
    assert_eq!(status, 200, "{answer}");
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holds_only_its_share_of_streams(#[values(Quic, Tcp)] transport: Transport) {
    let (upstream, _relay, client) = setup(transport).await;
    let first = after_first_event(client.get("/v1/endless").await.expect("answer")).await;
    let _second = after_first_event(client.get("/v1/endless").await.expect("answer")).await;
    let before = upstream.request_count();
    let third = tokio::spawn(client.send(http::Method::GET, "/v1/models", None));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "a third stream waits for credit");
    assert_eq!(
        upstream.request_count(),
        before,
        "and has not reached the upstream"
    );
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the third goes once a stream is free")
        .expect("task")
        .expect("answer");
    assert_eq!(answer.status(), 200);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answer_with_too_many_headers_is_a_502(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let (_upstream, _relay, client) = setup(transport).await;
    // Up to the 100 lines the relay reads from an HTTP/1.1 upstream, an
    // answer passes whole; past it, the app gets passage's own 502.
    let (status, body) = raw(
        client.addr,
        "GET /v1/many-headers?n=90 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, r#"{"headers":90}"#);
    let refused = client.get("/v1/many-headers?n=300").await.expect("answer");
    assert_eq!(refused.status(), 502);
    let body = body_json(refused).await;
    assert_eq!(body["error"]["code"], "invalid_upstream_response", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("100 header lines")),
        "{body}"
    );
}
