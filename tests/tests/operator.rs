//! The relay as an operator runs it: per-client rules from the config
//! file, rate limits, the usage line, metrics on both ends, and SIGHUP
//! reloads. Real relay processes where the config file matters, in-process
//! relays where the test sets the policy itself.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;
use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use passage_relay::policy::{ClientRules, Policy, PolicyTables};
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{
    InProcessRelay, LocalClient, RelayLaunch, RelayProcess, TestPki, free_tcp_port, free_udp_port,
    sample, scrape,
};
use passage_tests::stack::{after_first_event, body_json, read_to_end};

const WAIT: Duration = Duration::from_secs(10);

fn chat(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

fn chat_stream(model: &str, include_usage: bool) -> serde_json::Value {
    serde_json::json!({
        "messages": [{"role": "user", "content": "hi"}],
        "model": model,
        "stream": true,
        "stream_options": {"include_usage": include_usage},
    })
}

/// A multipart upload whose form names `model`, then a file.
async fn upload(client: &LocalClient, model: &str) -> Response<Incoming> {
    let body = format!(
        "--XYZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n\
         --XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
         Content-Type: audio/wav\r\n\r\nRIFF....WAVE\r\n--XYZ--\r\n"
    );
    let request = Request::post(client.url("/v1/files"))
        .header("content-type", "multipart/form-data; boundary=XYZ")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    client.http.request(request).await.expect("answer")
}

/// Status and JSON body of a response.
async fn answer(response: Result<Response<Incoming>, String>) -> (u16, serde_json::Value) {
    let response = response.expect("an answer");
    let status = response.status().as_u16();
    let body = match status {
        200 if response
            .headers()
            .get("content-type")
            .is_some_and(|v| v != "application/json") =>
        {
            serde_json::Value::Null
        }
        _ => body_json(response).await,
    };
    (status, body)
}

fn write_config(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).expect("write the config");
    path
}

/// Polls `probe` every 20 ms until it yields a value; panics with `what`
/// after [`WAIT`].
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real relay started with `--config FILE` (holding `text`) plus `args`.
async fn relay_with_config(
    upstream: &MockUpstream,
    pki: &TestPki,
    text: &str,
    args: &[&str],
) -> (RelayProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(&dir, text);
    let mut launch = RelayLaunch {
        args: vec!["--config".into(), config.display().to_string()],
        ..RelayLaunch::default()
    };
    launch.args.extend(args.iter().map(|a| (*a).to_owned()));
    let relay = RelayProcess::launch(pki, free_udp_port(), &upstream.url(), launch).await;
    (relay, dir)
}

async fn client_for(
    pki: &TestPki,
    name: &str,
    relay: std::net::SocketAddr,
    transport: Transport,
) -> LocalClient {
    let client = LocalClient::start_over(pki.issue(name, &[relay]), transport, |_| {}).await;
    client.wait_for_relay(relay, WAIT).await;
    client
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tables_in_the_config_file_allow_paths_and_models(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let (relay, _dir) = relay_with_config(
        &upstream,
        &pki,
        r#"
idle_timeout = 60

[clients.alice]
allow_paths = ["/v1/chat/completions", "/v1/files"]
allow_models = ["gpt-4o-mini", "whisper*"]

[unlisted_clients]
allow_paths = ["/v1/models"]
"#,
        &[],
    )
    .await;
    let alice = client_for(&pki, "alice", relay.addr, transport).await;
    let bob = client_for(&pki, "bob", relay.addr, transport).await;
    let before = upstream.request_count();

    let (status, _) = answer(
        alice
            .post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
            .await,
    )
    .await;
    assert_eq!(status, 200, "an allowed model on an allowed path");
    let (status, body) = answer(
        alice
            .post_json("/v1/chat/completions", &chat("gpt-4o"))
            .await,
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "model_not_allowed");
    assert_eq!(body["error"]["type"], "passage_error");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("rule clients.alice.allow_models"),
        "{message}"
    );
    assert!(message.contains("'gpt-4o'"), "{message}");

    let no_model = serde_json::json!({"messages": []});
    let (status, body) = answer(alice.post_json("/v1/chat/completions", &no_model).await).await;
    assert_eq!(
        status, 403,
        "no model in the body: refused, not waved through: {body}"
    );

    let (status, body) = answer(alice.get("/v1/models").await).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["code"], "path_not_allowed");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("rule clients.alice.allow_paths"),
        "{body}"
    );

    let response = upload(&alice, "whisper-1").await;
    assert_eq!(response.status(), 200, "the multipart model field is read");
    let response = upload(&alice, "dall-e-3").await;
    assert_eq!(response.status(), 403);
    let body = body_json(response).await;
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("'dall-e-3'"),
        "{body}"
    );

    let (status, _) = answer(bob.get("/v1/models").await).await;
    assert_eq!(
        status, 200,
        "the unlisted clients' table lets bob list models"
    );
    let (status, body) = answer(
        bob.post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
            .await,
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("rule unlisted_clients.allow_paths"),
        "{body}"
    );

    assert_eq!(
        upstream.request_count() - before,
        3,
        "only the three allowed requests reached the upstream"
    );
    relay
        .wait_for_log(
            &["request", "client=bob", "ended=\"refused\"", "status=403"],
            WAIT,
        )
        .await;
}

fn rules(edit: impl FnOnce(&mut ClientRules)) -> ClientRules {
    let mut rules = ClientRules::default();
    edit(&mut rules);
    rules
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after(#[values(Quic, Tcp)] transport: Transport) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let mut tables = PolicyTables::default();
    tables.clients.insert(
        "rpm".into(),
        rules(|r| r.requests_per_minute = NonZeroU32::new(3)),
    );
    tables.clients.insert(
        "one-at-a-time".into(),
        rules(|r| {
            r.concurrent_requests = NonZeroU32::new(1);
            r.allow_models = Some(vec!["m".into()]);
        }),
    );
    tables
        .clients
        .insert("tokens".into(), rules(|r| r.tokens_per_minute = Some(15)));
    tables
        .clients
        .insert("streamer".into(), rules(|r| r.tokens_per_day = Some(16)));
    tables
        .clients
        .insert("estimated".into(), rules(|r| r.tokens_per_day = Some(16)));
    let policy = Policy::new(tables).expect("valid policy");
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |config| {
        config.policy = policy;
    });

    // Requests per minute: three, then a 429 that says when to come back.
    let rpm = client_for(&pki, "rpm", relay.addr, transport).await;
    for _ in 0..3 {
        assert_eq!(rpm.get("/v1/models").await.expect("answer").status(), 200);
    }
    let refused = rpm.get("/v1/models").await.expect("answer");
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert!((1..=61).contains(&retry_after), "retry-after {retry_after}");
    let body = body_json(refused).await;
    assert_eq!(body["error"]["code"], "requests_per_minute_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("rule clients.rpm")
    );

    // Concurrency: a second request while one streams is refused; once
    // the first is gone, the next is admitted.
    let single = client_for(&pki, "one-at-a-time", relay.addr, transport).await;
    let streaming = after_first_event(single.get("/v1/endless").await.expect("answer")).await;
    let refused = single.get("/v1/models").await.expect("answer");
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    assert_eq!(
        body_json(refused).await["error"]["code"],
        "concurrent_requests_exceeded"
    );
    drop(streaming);
    eventually("still refused after the stream ended", || async {
        (single.get("/v1/models").await.expect("answer").status() == 200).then_some(())
    })
    .await;
    // A slot is free by the time the app has its answer, whichever way the
    // answer came: so requests sent back to back are never refused.
    for _ in 0..20 {
        let (status, _) = answer(single.post_json("/v1/chat/completions", &chat("m")).await).await;
        assert_eq!(status, 200, "a completion");
        let (status, body) =
            answer(single.post_json("/v1/chat/completions", &chat("x")).await).await;
        assert_eq!(status, 403, "a refused model: {body}");
        let (status, _) = answer(single.get("/v1/models").await).await;
        assert_eq!(status, 200, "the model list");
    }

    // Tokens per minute from the JSON usage (10 per mock completion): the
    // second request is admitted at 10 < 15, the third is over.
    let tokens = client_for(&pki, "tokens", relay.addr, transport).await;
    for _ in 0..2 {
        let (status, _) = answer(tokens.post_json("/v1/chat/completions", &chat("m")).await).await;
        assert_eq!(status, 200);
    }
    let refused = tokens
        .post_json("/v1/chat/completions", &chat("m"))
        .await
        .expect("answer");
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert!(
        (55..=61).contains(&retry_after),
        "retry-after {retry_after}"
    );
    assert_eq!(
        body_json(refused).await["error"]["code"],
        "tokens_per_minute_exceeded"
    );

    // Tokens per day from a stream: its usage chunk (17 tokens) when it
    // asked for one, else an estimate (a quarter of the request's bytes
    // plus one per event, here about 40); either puts the client over its
    // limit of 16. The relay counts them before the stream's last frame.
    for (name, include_usage) in [("streamer", true), ("estimated", false)] {
        let streamer = client_for(&pki, name, relay.addr, transport).await;
        let response = streamer
            .post_json("/v1/chat/completions", &chat_stream("m", include_usage))
            .await
            .expect("answer");
        assert_eq!(response.status(), 200, "{name}");
        let mut body = response.into_body();
        let (events, outcome) = read_to_end(&mut body, WAIT).await;
        assert!(outcome.is_ok(), "{outcome:?}");
        assert!(String::from_utf8_lossy(&events).contains("[DONE]"));
        let refused = streamer.get("/v1/models").await.expect("answer");
        assert_eq!(refused.status(), 429, "{name}");
        assert_eq!(
            body_json(refused).await["error"]["code"],
            "tokens_per_day_exceeded"
        );
    }
}

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
async fn sighup_reloads_the_config_and_keeps_the_old_one_when_the_new_is_bad(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let (relay, dir) = relay_with_config(
        &upstream,
        &pki,
        "idle_timeout = 60\n[clients.app]\nallow_paths = [\"/v1/models\", \"/v1/endless\"]\n",
        &[],
    )
    .await;
    let client = client_for(&pki, "app", relay.addr, transport).await;
    let (status, _) = answer(client.post_json("/v1/chat/completions", &chat("m")).await).await;
    assert_eq!(status, 403, "not allowed yet");

    // A request in flight across both reloads.
    let mut streaming = after_first_event(client.get("/v1/endless").await.expect("answer")).await;

    write_config(
        &dir,
        "idle_timeout = 30\n[clients.app]\nallow_paths = [\"/v1/models\", \"/v1/endless\", \"/v1/chat/\"]\n",
    );
    relay.hang_up();
    relay.wait_for_log(&["config reloaded"], WAIT).await;
    let line = relay
        .wait_for_log(&["takes effect after a restart"], WAIT)
        .await;
    assert!(line.contains("idle_timeout"), "{line}");
    let (status, body) = answer(client.post_json("/v1/chat/completions", &chat("m")).await).await;
    assert_eq!(status, 200, "the reloaded rules are in force: {body}");

    write_config(&dir, "[clients.app]\nallow_path = [\"/v1/models\"]\n");
    relay.hang_up();
    let line = relay
        .wait_for_log(&["config refused on reload"], WAIT)
        .await;
    assert!(
        line.contains("allow_path"),
        "the refusal names the key: {line}"
    );
    let (status, _) = answer(client.post_json("/v1/chat/completions", &chat("m")).await).await;
    assert_eq!(status, 200, "the previous config stays in force");

    use http_body_util::BodyExt;
    for _ in 0..3 {
        let frame = tokio::time::timeout(WAIT, streaming.frame()).await;
        assert!(
            matches!(frame, Ok(Some(Ok(_)))),
            "the stream in flight carries on after both reloads"
        );
    }
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

/// `GET path` with the app's own API key.
async fn with_key(
    client: &LocalClient,
    path: &str,
    key: &str,
) -> Result<Response<Incoming>, String> {
    let request = Request::get(client.url(path))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    client
        .http
        .request(request)
        .await
        .map_err(|e| e.to_string())
}

/// Sends a prepared request to the client; status and JSON body.
async fn send(client: &LocalClient, request: Request<Full<Bytes>>) -> (u16, serde_json::Value) {
    answer(
        client
            .http
            .request(request)
            .await
            .map_err(|e| e.to_string()),
    )
    .await
}

/// A multipart upload whose form is `parts` (name header parameter, value).
async fn form(
    client: &LocalClient,
    content_type: &str,
    parts: &[(&str, String)],
) -> (u16, serde_json::Value) {
    let mut body = String::new();
    for (name, value) in parts {
        body.push_str(&format!(
            "--XYZ\r\nContent-Disposition: form-data; {name}\r\n\r\n{value}\r\n"
        ));
    }
    body.push_str("--XYZ--\r\n");
    let request = Request::post(client.url("/v1/files"))
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    send(client, request).await
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_and_path_rules_resist_tricks(#[values(Quic, Tcp)] transport: Transport) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let mut tables = PolicyTables::default();
    tables.clients.insert(
        "app".into(),
        rules(|r| {
            r.allow_paths = Some(vec![
                "/v1/files".into(),
                "/v1/chat/".into(),
                "/v1/echo".into(),
            ]);
            r.allow_models = Some(vec!["whisper-1".into()]);
            r.tokens_per_day = Some(1_000_000);
        }),
    );
    let policy = Policy::new(tables).expect("valid policy");
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |config| {
        config.policy = policy;
        config.model_scan_limit = 4 * 1024;
    });
    let client = client_for(&pki, "app", relay.addr, transport).await;
    let multipart = "multipart/form-data; boundary=XYZ";
    let model = |value: &str| ("name=\"model\"", value.to_owned());

    let (status, body) = form(
        &client,
        multipart,
        &[
            model("whisper-1"),
            ("name=\"file\"; filename=\"a.wav\"", "RIFF".into()),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // A second model field, far past what the relay reads ahead, in any
    // spelling: the upload is cut off and refused.
    for second in ["name=\"model\"", "name=model", "name*=utf-8''model"] {
        let pad = ("name=\"pad\"", "p".repeat(256 * 1024));
        let (status, body) = form(
            &client,
            multipart,
            &[
                model("whisper-1"),
                pad,
                (second, "gpt-4o-transcribe".into()),
            ],
        )
        .await;
        assert_eq!(status, 403, "{second}: {body}");
        assert_eq!(body["error"]["code"], "model_not_allowed");
    }
    // Two boundaries, one per parser.
    let (status, body) = form(
        &client,
        "multipart/form-data; boundary=AAA; boundary=XYZ",
        &[model("x")],
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_content_type");

    // A JSON body too big to check, and a body that names no model.
    let big = serde_json::json!({"messages": [{"role": "user", "content": "x".repeat(8 * 1024)}], "model": "whisper-1"});
    let (status, body) = answer(client.post_json("/v1/chat/completions", &big).await).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "model_check_body_too_large");
    // A JSON body of exactly the scan limit is read whole.
    let mut exact = serde_json::json!({"model": "whisper-1", "pad": ""});
    let room = 4 * 1024 - exact.to_string().len();
    exact["pad"] = "p".repeat(room).into();
    assert_eq!(exact.to_string().len(), 4 * 1024);
    let (status, body) = answer(client.post_json("/v1/echo", &exact).await).await;
    assert_eq!(status, 200, "{body}");
    let request = Request::post(client.url("/v1/chat/completions"))
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(b"model=whisper-1")))
        .expect("request");
    let (status, _) = send(&client, request).await;
    assert_eq!(status, 403);

    // Paths a prefix rule could misread.
    for path in [
        "/v1/chat/..%2ffiles",
        "/v1/chat/%2e%2e%5cfiles",
        "/v1/chat//../files",
        "/v1/files%2F..%2Fadmin",
    ] {
        let (status, body) = answer(client.get(path).await).await;
        assert_eq!(status, 400, "{path}: {body}");
    }

    // Token limits need readable usage: the upstream is asked for none
    // of the compression the app offered.
    let request = Request::get(client.url("/v1/echo"))
        .header("accept-encoding", "gzip, br")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let (status, echo) = send(&client, request).await;
    assert_eq!(status, 200);
    let encodings: Vec<&serde_json::Value> = echo["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter(|h| h[0] == "accept-encoding")
        .map(|h| &h[1])
        .collect();
    assert_eq!(encodings, ["identity"]);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_checks_reserve_only_what_a_body_needs(#[values(Quic, Tcp)] transport: Transport) {
    // 80 requests waiting on their answers, each under a model rule with
    // the default 1 MiB scan limit: reserving the limit per request would
    // let only 64 through the relay's 64 MiB read-ahead budget.
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let mut tables = PolicyTables::default();
    tables.clients.insert(
        "app".into(),
        rules(|r| r.allow_models = Some(vec!["gpt-4o-mini".into()])),
    );
    let policy = Policy::new(tables).expect("valid policy");
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |config| {
        config.policy = policy;
    });
    let client = std::sync::Arc::new(client_for(&pki, "app", relay.addr, transport).await);
    let waiting: Vec<_> = (0..80)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .post_json("/v1/slow-head", &chat("gpt-4o-mini"))
                    .await
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while upstream
        .record
        .requests
        .load(std::sync::atomic::Ordering::SeqCst)
        < 80
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 80 requests reached the upstream",
            upstream
                .record
                .requests
                .load(std::sync::atomic::Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for task in waiting {
        task.abort();
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_the_whole_read_ahead_budget(
    #[values(Quic, Tcp)] transport: Transport,
) {
    // Chunked JSON bodies (no length, so each reserves the whole 1 MiB
    // scan limit) that stop after a few bytes: the relay holds their
    // reservations while it waits for the rest. One client may hold a
    // quarter of the 64 MiB budget; past it its requests get 503 at once,
    // while another client's requests go through.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let mut tables = PolicyTables::default();
    for name in ["app", "bob"] {
        tables.clients.insert(
            name.into(),
            rules(|r| r.allow_models = Some(vec!["gpt-4o-mini".into()])),
        );
    }
    let policy = Policy::new(tables).expect("valid policy");
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |config| {
        config.policy = policy;
    });
    let app = client_for(&pki, "app", relay.addr, transport).await;
    let bob = client_for(&pki, "bob", relay.addr, transport).await;
    let stalled_head = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n\
                        Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
                        5\r\n{\"mod\r\n";
    let mut stalled = Vec::new();
    for _ in 0..16 {
        let mut stream = tokio::net::TcpStream::connect(app.addr)
            .await
            .expect("connect");
        stream
            .write_all(stalled_head.as_bytes())
            .await
            .expect("write");
        stalled.push(stream);
    }
    // The reservations are taken as the heads arrive at the relay.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for stream in &mut stalled {
        let mut byte = [0u8; 1];
        let answered =
            tokio::time::timeout(Duration::from_millis(10), stream.read(&mut byte)).await;
        assert!(answered.is_err(), "a stalled upload is still waiting");
    }

    let (status, body) = answer(
        app.post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
            .await,
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "relay_busy");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("'app'")),
        "{body}"
    );
    let (status, body) = answer(
        bob.post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
            .await,
    )
    .await;
    assert_eq!(status, 200, "another client is not held up: {body}");

    drop(stalled);
    eventually(
        "the stalled uploads' reservations were not given back",
        || async {
            let (status, _) = answer(
                app.post_json("/v1/chat/completions", &chat("gpt-4o-mini"))
                    .await,
            )
            .await;
            (status == 200).then_some(())
        },
    )
    .await;
}
