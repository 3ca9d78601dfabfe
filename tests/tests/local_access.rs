//! The local endpoint is not an open door: a rebound DNS name, a foreign
//! web origin, or (off loopback) a request without the access token is
//! refused before anything reaches the tunnel.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use passage_client::{AccessToken, Client, ClientConfig, ClientError};
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{InProcessRelay, LocalClient, TestPki, free_udp_port};
use passage_tests::stack::body_json;

const TOKEN: &str = "local-access-token-7d1e0c55a2";

async fn request(
    client: &LocalClient,
    target: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{target}{path}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(Bytes::new())).expect("request");
    client.http.request(request).await.expect("an answer")
}

async fn setup(
    adjust: impl FnOnce(&mut ClientConfig),
) -> (MockUpstream, InProcessRelay, LocalClient, TestPki) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |_| {});
    let client = LocalClient::start(pki.issue("app", &[relay.addr]), adjust).await;
    client
        .wait_for_relay(relay.addr, Duration::from_secs(10))
        .await;
    (upstream, relay, client, pki)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebound_dns_name_is_refused() {
    let (upstream, _relay, client, _pki) = setup(|_| {}).await;
    let before = upstream.request_count();
    let hosts = [
        ("attacker.example", 403),
        ("attacker.example:8710", 403),
        ("10.1.2.3:8710", 403),
        ("localhost:8710", 200),
        ("127.0.0.1", 200),
        ("[::1]:8710", 200),
    ];
    for (host, expected) in hosts {
        let headers = [("host", host)];
        let response = request(&client, client.addr, Method::GET, "/v1/models", &headers).await;
        assert_eq!(response.status(), expected, "{host}");
        if expected == 403 {
            assert_eq!(
                body_json(response).await["error"]["code"],
                "host_not_allowed"
            );
        }
    }
    assert_eq!(
        upstream.request_count() - before,
        3,
        "only the loopback names got through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_need_an_allowed_origin_and_get_correct_cors() {
    let (upstream, _relay, client, _pki) = setup(|config| {
        config.cors_origins = vec![
            "http://localhost:3000".into(),
            "https://app.example:443/".into(),
            "chrome-extension://abcdefghijklmnop".into(),
        ];
    })
    .await;
    let before = upstream.request_count();
    let refused = request(
        &client,
        client.addr,
        Method::POST,
        "/v1/chat/completions",
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(refused.status(), 403);
    assert_eq!(
        body_json(refused).await["error"]["code"],
        "origin_not_allowed"
    );

    let preflight = request(
        &client,
        client.addr,
        Method::OPTIONS,
        "/v1/chat/completions",
        &[
            ("origin", "http://localhost:3000"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ],
    )
    .await;
    assert_eq!(preflight.status(), 204);
    let headers = preflight.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert_eq!(headers["access-control-allow-methods"], "POST");
    assert_eq!(
        headers["access-control-allow-headers"],
        "authorization, content-type"
    );
    assert!(headers.contains_key("access-control-max-age"));
    assert_eq!(
        upstream.request_count(),
        before,
        "neither reached the upstream"
    );

    let allowed = request(
        &client,
        client.addr,
        Method::GET,
        "/v1/models",
        &[("origin", "http://localhost:3000")],
    )
    .await;
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert_eq!(allowed.headers()["vary"], "Origin");
    assert_eq!(
        allowed.headers()["access-control-expose-headers"],
        "*",
        "apps may read x-request-id and the rate-limit headers"
    );
    assert_eq!(upstream.request_count() - before, 1);

    // Origins as browsers send them: no default port, any scheme.
    for origin in ["https://app.example", "chrome-extension://abcdefghijklmnop"] {
        let allowed = request(
            &client,
            client.addr,
            Method::GET,
            "/v1/models",
            &[("origin", origin)],
        )
        .await;
        assert_eq!(allowed.status(), 200, "{origin}");
        assert_eq!(allowed.headers()["access-control-allow-origin"], origin);
    }

    // The upstream's own CORS headers never reach a browser, with or
    // without an Origin, and every answer varies on Origin, so a cached
    // answer to a plain request is not one for a page elsewhere.
    for origin in [None, Some("http://localhost:3000")] {
        let headers: Vec<(&str, &str)> = origin.iter().map(|o| ("origin", *o)).collect();
        let answer = request(&client, client.addr, Method::GET, "/v1/open-cors", &headers).await;
        assert_eq!(answer.status(), 200);
        let allow: Vec<_> = answer
            .headers()
            .get_all("access-control-allow-origin")
            .iter()
            .collect();
        assert_eq!(allow, origin.iter().collect::<Vec<_>>(), "{origin:?}");
        assert!(
            !answer
                .headers()
                .contains_key("access-control-allow-credentials")
        );
        let vary: Vec<_> = answer.headers().get_all("vary").iter().collect();
        assert_eq!(vary, ["accept-encoding", "Origin"], "{origin:?}");
    }

    // passage's own answers (here the refusal of a rebound Host) vary on
    // Origin too.
    let local = request(
        &client,
        client.addr,
        Method::GET,
        "/v1/models",
        &[
            ("origin", "http://localhost:3000"),
            ("host", "evil.example"),
        ],
    )
    .await;
    assert_eq!(local.status(), 403);
    assert_eq!(local.headers()["vary"], "Origin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_loopback_the_access_token_is_required_and_kept_local() {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |_| {});
    passage_tests::secrets::register(TOKEN);
    let bundle = pki.issue("app", &[relay.addr]);

    // Off loopback: refused without the explicit flag, and without a token.
    let wide: SocketAddr = "0.0.0.0:0".parse().expect("literal");
    let mut config = ClientConfig::new(bundle.clone(), wide);
    let refused = Client::bind(config.clone()).await.expect_err("refused");
    assert!(matches!(refused, ClientError::NotLoopback(_)), "{refused}");
    config.allow_non_loopback = true;
    let refused = Client::bind(config).await.expect_err("refused");
    assert!(
        matches!(refused, ClientError::NoAccessToken(_)),
        "{refused}"
    );

    let client = LocalClient::start(bundle, |config| {
        config.listen = wide;
        config.allow_non_loopback = true;
        config.access_token = Some(AccessToken(TOKEN.into()));
        config.cors_origins = vec!["http://localhost:3000".into()];
    })
    .await;
    // The listener is on 0.0.0.0; reach it over loopback.
    let target: SocketAddr = format!("127.0.0.1:{}", client.addr.port())
        .parse()
        .expect("addr");
    let before = upstream.request_count();
    for authorization in [
        None,
        Some("Bearer not-the-token-at-all"),
        Some("Bearer sk-some-openai-key"),
    ] {
        let headers: Vec<(&str, &str)> = authorization
            .iter()
            .map(|v| ("authorization", *v))
            .collect();
        let response = request(&client, target, Method::GET, "/v1/models", &headers).await;
        assert_eq!(response.status(), 401, "{authorization:?}");
        assert_eq!(
            body_json(response).await["error"]["code"],
            "invalid_access_token"
        );
    }
    // A browser app from an allowed origin can read why it was refused.
    let response = request(
        &client,
        target,
        Method::GET,
        "/v1/models",
        &[("origin", "http://localhost:3000")],
    )
    .await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://localhost:3000"
    );
    assert_eq!(
        upstream.request_count(),
        before,
        "nothing without the token reached the upstream"
    );

    // The token as the API key, in any case of the scheme, and again
    // under `api-key` as some SDKs send it: none of it leaves the client.
    let lower_bearer = format!("bearer {TOKEN}");
    let response = request(
        &client,
        target,
        Method::POST,
        "/v1/echo",
        &[("authorization", &lower_bearer), ("api-key", TOKEN)],
    )
    .await;
    assert_eq!(response.status(), 200);
    let echo = body_json(response).await;
    let headers = echo["headers"].as_array().expect("headers").clone();
    assert!(
        !headers
            .iter()
            .any(|h| h[0] == "authorization" || h[0] == "api-key"),
        "the access token never leaves the client: {headers:?}"
    );

    // Without the token, health says up or down and nothing more.
    let health = request(&client, target, Method::GET, "/healthz", &[]).await;
    assert_eq!(health.status(), 200, "health needs no token");
    let bare = body_json(health).await;
    assert_eq!(bare, serde_json::json!({"status": "ok"}));
    let bearer = format!("Bearer {TOKEN}");
    let health = request(
        &client,
        target,
        Method::GET,
        "/healthz",
        &[("authorization", &bearer)],
    )
    .await;
    let detail = body_json(health).await;
    assert_eq!(
        detail["relays"][0]["address"],
        relay.addr.to_string(),
        "{detail}"
    );
}
