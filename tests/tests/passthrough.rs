//! What the app sends reaches the upstream intact (method, path, query,
//! end-to-end headers), what the upstream answers reaches the app intact
//! (including its errors), and the relay's key handling is exact.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use passage_tests::Transport::{self, Quic, Tcp};
use passage_tests::stack::{StackOptions, TestStack, body_bytes, body_json};
use rstest::rstest;

fn header_values(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().expect("string").to_owned())
        .collect()
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_path_query_and_headers_pass_through(#[values(Quic, Tcp)] transport: Transport) {
    let stack = TestStack::start_over(transport).await;
    for method in ["PUT", "PATCH", "DELETE", "GET", "POST"] {
        let request = Request::builder()
            .method(method)
            .uri(stack.url("/v1/some/thing?a=1&b=two%20words&a=3"))
            .header("x-custom", "hello")
            .header("x-multi", "one")
            .header("x-multi", "two")
            .header("connection", "x-hop")
            .header("x-hop", "connection-scoped")
            .header("user-agent", "OpenAI/Python 1.0")
            .body(Full::new(Bytes::from_static(b"payload")))
            .expect("request");
        let response = stack.send(request).await.expect("answers");
        assert_eq!(response.status(), 200, "{method}");
        let echo = body_json(response).await;
        assert_eq!(echo["method"], method);
        assert_eq!(echo["path"], "/v1/some/thing");
        assert_eq!(echo["query"], "a=1&b=two%20words&a=3");
        assert_eq!(echo["body_len"], 7);
        assert_eq!(header_values(&echo, "x-custom"), ["hello"]);
        assert_eq!(header_values(&echo, "x-multi"), ["one", "two"]);
        assert_eq!(header_values(&echo, "user-agent"), ["OpenAI/Python 1.0"]);
        assert!(
            header_values(&echo, "x-hop").is_empty(),
            "hop-by-hop header leaked"
        );
        assert_eq!(
            header_values(&echo, "host"),
            [stack.upstream.addr.to_string()]
        );
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_unchanged(#[values(Quic, Tcp)] transport: Transport) {
    let stack = TestStack::start_over(transport).await;
    for code in [429u16, 401, 500] {
        let response = stack
            .get(&format!("/status/{code}"))
            .await
            .expect("answers");
        assert_eq!(response.status().as_u16(), code);
        assert_eq!(response.headers()["retry-after"], "7");
        assert_eq!(response.headers()["x-request-id"], "req-mock");
        let body = body_json(response).await;
        assert_eq!(body["error"]["message"], format!("mock {code}"));
        assert_eq!(body["error"]["type"], "mock_error");
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_key_replaces_the_apps_authorization(#[values(Quic, Tcp)] transport: Transport) {
    let stack = TestStack::start_with(StackOptions {
        api_key: Some("sk-relay-held-key".into()),
        transport,
        ..StackOptions::default()
    })
    .await;
    let response = stack.post_json("/v1/echo", serde_json::json!({})).await;
    let echo = body_json(response).await;
    assert_eq!(
        header_values(&echo, "authorization"),
        ["Bearer sk-relay-held-key"]
    );

    let request = Request::get(stack.url("/v1/echo"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let echo = body_json(stack.send(request).await.expect("answers")).await;
    assert_eq!(
        header_values(&echo, "authorization"),
        ["Bearer sk-relay-held-key"],
        "added even when the app sends none"
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_relay_key_the_apps_authorization_passes_through(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let stack = TestStack::start_over(transport).await;
    let response = stack.post_json("/v1/echo", serde_json::json!({})).await;
    let echo = body_json(response).await;
    assert_eq!(header_values(&echo, "authorization"), ["Bearer app-key"]);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_a_502_passage_error(#[values(Quic, Tcp)] transport: Transport) {
    // Port 9 on loopback: nothing listens there on these machines.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let stack = TestStack::start_with(StackOptions {
        upstream_url: Some(url),
        transport,
        ..StackOptions::default()
    })
    .await;
    let response = stack
        .post_json("/v1/chat/completions", serde_json::json!({}))
        .await;
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = body_json(response).await;
    assert_eq!(body["error"]["type"], "passage_error");
    assert_eq!(body["error"]["code"], "upstream_unreachable");
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_requests_are_refused_locally(#[values(Quic, Tcp)] transport: Transport) {
    let stack = TestStack::start_over(transport).await;
    let request = Request::builder()
        .method("CONNECT")
        .uri(stack.client_addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = stack.send(request).await.expect("answers");
    assert_eq!(response.status(), 400);
    let body = body_bytes(response).await;
    assert!(String::from_utf8_lossy(&body).contains("invalid_request_target"));
    assert_eq!(stack.upstream.request_count(), 0);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_carries_streams_and_bodies(#[values(Quic, Tcp)] transport: Transport) {
    let stack = TestStack::start_with(StackOptions {
        upstream_http2: true,
        transport,
        ..StackOptions::default()
    })
    .await;
    let request = Request::post(stack.url("/v1/echo?q=1"))
        .header("x-custom", "h2")
        .body(Full::new(Bytes::from_static(b"over h2")))
        .expect("request");
    let echo = body_json(stack.send(request).await.expect("answers")).await;
    assert_eq!(echo["version"], "HTTP/2.0");
    assert_eq!(echo["query"], "q=1");
    assert_eq!(echo["body_len"], 7);
    assert_eq!(header_values(&echo, "x-custom"), ["h2"]);

    let response = stack
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({"model": "m", "stream": true, "messages": []}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let text = String::from_utf8(body_bytes(response).await.to_vec()).expect("utf-8");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}
