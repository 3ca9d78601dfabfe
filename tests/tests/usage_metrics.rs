//! What an operator sees of the traffic: the usage line and both programs'
//! metrics, and an upstream key that never reaches a log line or a metric.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{
    LocalClient, RelayLaunch, RelayProcess, TestPki, free_tcp_port, free_udp_port, sample, scrape,
};
use passage_tests::requests::{
    WAIT, answer, chat, chat_stream, client_for, eventually, with_key, write_config,
};
use passage_tests::stack::{after_first_event, body_json, read_to_end};

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_lines_and_metrics_on_both_ends(#[values(Quic, Tcp)] transport: Transport) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay_metrics = free_tcp_port();
    let launch = RelayLaunch {
        args: vec!["--metrics".into(), relay_metrics.to_string()],
        ..RelayLaunch::default()
    };
    let relay = RelayProcess::launch(&pki, free_udp_port(), &upstream.url(), launch).await;
    let client = LocalClient::start_over(pki.issue("app", &[relay.addr]), transport, |config| {
        config.metrics = Some("127.0.0.1:0".parse().expect("literal"));
    })
    .await;
    client.wait_for_relay(relay.addr, WAIT).await;

    let (status, _) = answer(
        client
            .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
            .await,
    )
    .await;
    assert_eq!(status, 200);
    let response = client
        .post_json("/v1/chat/completions", &chat_stream("gpt-4o-mini", true))
        .await
        .expect("answer");
    let mut body = response.into_body();
    let (_, outcome) = read_to_end(&mut body, WAIT).await;
    assert!(outcome.is_ok(), "{outcome:?}");
    assert_eq!(
        client.get("/v1/status/404").await.expect("answer").status(),
        404
    );

    // One usage line per request: who, what, how it went, how much.
    let line = relay
        .wait_for_log(
            &["client=app", "path=/v1/chat/completions", "prompt_tokens=7"],
            WAIT,
        )
        .await;
    for part in [
        "method=POST",
        "status=200",
        "model=\"gpt-4o-mini\"",
        "completion_tokens=10",
        "ttfb_ms=",
        "duration_ms=",
        "bytes_in=",
        "bytes_out=",
        "ended=\"complete\"",
    ] {
        assert!(line.contains(part), "{part} missing from: {line}");
    }

    // The relay's metrics.
    let text = eventually("the 404 was not counted", || async {
        let text = scrape(relay_metrics).await;
        let series = r#"passage_relay_requests_total{client="app",status="404"}"#;
        (sample(&text, series) == Some(1.0)).then_some(text)
    })
    .await;
    let expect = |series: &str, value: f64| {
        assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
    };
    expect(
        r#"passage_relay_requests_total{client="app",status="200"}"#,
        2.0,
    );
    expect(
        r#"passage_relay_usage_tokens_total{client="app",model="gpt-4o-mini",kind="prompt"}"#,
        12.0,
    );
    expect(
        r#"passage_relay_usage_tokens_total{client="app",model="gpt-4o-mini",kind="completion"}"#,
        15.0,
    );
    expect(
        r#"passage_relay_usage_requests_total{client="app",model="gpt-4o-mini"}"#,
        2.0,
    );
    expect(
        r#"passage_relay_request_duration_seconds_count{client="app",status="200"}"#,
        2.0,
    );
    expect(
        r#"passage_relay_time_to_first_byte_seconds_count{client="app"}"#,
        3.0,
    );
    expect(
        r#"passage_relay_usage_errors_total{client="app",model="unknown"}"#,
        1.0,
    );
    expect("passage_relay_active_streams", 0.0);
    expect("passage_relay_connections", 1.0);

    // A client whose certificate comes from another CA (but which trusts
    // the relay's) is refused at the handshake and counted by reason.
    let mut stranger = TestPki::new().issue("stranger", &[relay.addr]);
    stranger.ca_cert = pki.issue("helper", &[relay.addr]).ca_cert;
    let _stranger = LocalClient::start_over(stranger, transport, |_| {}).await;
    eventually("no bad_signature handshake failure counted", || async {
        let text = scrape(relay_metrics).await;
        let series = r#"passage_relay_handshake_failures_total{reason="bad_signature"}"#;
        sample(&text, series).filter(|n| *n >= 1.0)
    })
    .await;

    // The client's metrics, on loopback: only for a Host naming this
    // machine, so a page on a rebound DNS name cannot read them.
    let client_metrics = client.metrics.expect("client metrics on");
    let rebound = passage_tests::stack::http_client()
        .request(
            Request::get(format!("http://{client_metrics}/metrics"))
                .header("host", "attacker.example")
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("an answer");
    assert_eq!(rebound.status(), 403);
    let text = scrape(client_metrics).await;
    let relay_label = format!("{{relay=\"{}\"}}", relay.addr);
    assert_eq!(
        sample(&text, r#"passage_client_requests_total{status="200"}"#),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"passage_client_requests_total{status="404"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &format!("passage_client_tunnel_up{relay_label}")),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample(
            &text,
            &format!("passage_client_tunnel_rtt_seconds{relay_label}")
        )
        .is_some_and(|rtt| rtt > 0.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("passage_client_tunnel_reconnects_total{relay_label}")
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "passage_client_time_to_first_byte_seconds_count"),
        Some(3.0),
        "{text}"
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_key_never_reaches_a_log_line_or_the_metrics(
    #[values(Quic, Tcp)] transport: Transport,
) {
    const KEY: &str = "sk-passage-custody-test-4f9c2b7e";
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        &dir,
        "[clients.app]\nallow_paths = [\"/v1/\"]\nallow_models = [\"gpt-4o-mini\"]\nrequests_per_minute = 8\n",
    );
    let relay_metrics = free_tcp_port();
    let launch = RelayLaunch {
        args: vec![
            "--config".into(),
            config.display().to_string(),
            "--api-key-env".into(),
            "PASSAGE_CUSTODY_KEY".into(),
            "--metrics".into(),
            relay_metrics.to_string(),
        ],
        env: vec![("PASSAGE_CUSTODY_KEY".into(), KEY.into())],
        // Everything every crate logs, hyper's and quinn's wire detail included.
        rust_log: "trace".into(),
    };
    let relay = RelayProcess::launch(&pki, free_udp_port(), &upstream.url(), launch).await;
    let client = client_for(&pki, "app", relay.addr, transport).await;

    // Every path a request can take: through, refused by a rule, failing
    // upstream (401 rests the key), cut by the app, over the limit.
    let keyed = client.get("/v1/keyed").await.expect("answer");
    assert_eq!(keyed.status(), 200);
    assert_eq!(
        body_json(keyed).await["authorization"],
        format!("Bearer {KEY}"),
        "the key is used"
    );
    let (status, _) = answer(
        client
            .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
            .await,
    )
    .await;
    assert_eq!(status, 200);
    // What reaches the client side: the relay's own errors and the
    // upstream's error answers never carry the key.
    let mut answers = Vec::new();
    for (path, expected) in [("/v1/status/401", 401), ("/v1/status/500", 500)] {
        let (status, body) = answer(client.get(path).await).await;
        assert_eq!(status, expected);
        answers.push(body);
    }
    let (status, body) = answer(
        client
            .post_json("/v1/chat/completions", &chat("gpt-4o"))
            .await,
    )
    .await;
    assert_eq!(status, 403);
    answers.push(body);
    drop(after_first_event(client.get("/v1/endless").await.expect("answer")).await);
    // The app's own key, which the relay's replaces.
    let app_key = "sk-app-own-key-custody-91c3";
    passage_tests::secrets::register(app_key);
    let (status, _) = answer(with_key(&client, "/v1/models", app_key).await).await;
    assert_eq!(status, 200);
    let mut limited = false;
    for _ in 0..10 {
        let (status, body) = answer(client.get("/v1/models").await).await;
        if status == 429 {
            answers.push(body);
            limited = true;
            break;
        }
    }
    assert!(limited, "the rate limit tripped");
    for body in &answers {
        assert!(
            !body.to_string().contains(KEY),
            "the key reached the client side: {body}"
        );
    }
    relay.hang_up();
    relay.wait_for_log(&["config reloaded"], WAIT).await;
    let metrics = scrape(relay_metrics).await;

    let logs = relay.logs();
    assert!(
        logs.len() > 100,
        "trace logging produced {} lines",
        logs.len()
    );
    let leaks: Vec<&String> = logs.iter().filter(|line| line.contains(KEY)).collect();
    assert!(
        leaks.is_empty(),
        "the key is in the relay's log: {leaks:#?}"
    );
    assert!(!metrics.contains(KEY), "the key is in the metrics");
    assert!(
        !metrics.contains("Bearer") && !metrics.contains(app_key),
        "an Authorization value is in the metrics"
    );
    assert!(
        !logs.iter().any(|line| line.contains(app_key)),
        "the app's key is in the log"
    );

    // Without a relay key the app's key passes through: still never logged.
    let passing = RelayProcess::launch(
        &pki,
        free_udp_port(),
        &upstream.url(),
        RelayLaunch {
            rust_log: "trace".into(),
            ..RelayLaunch::default()
        },
    )
    .await;
    let client = client_for(&pki, "app", passing.addr, transport).await;
    let keyed = with_key(&client, "/v1/keyed", app_key)
        .await
        .expect("answer");
    assert_eq!(
        body_json(keyed).await["authorization"],
        format!("Bearer {app_key}")
    );
    assert_eq!(
        answer(with_key(&client, "/v1/status/401", app_key).await)
            .await
            .0,
        401
    );
    let logs = passing.logs();
    assert!(
        !logs.iter().any(|line| line.contains(app_key)),
        "the app's key is in the log"
    );
    passage_tests::secrets::assert_none_leaked();
}
