//! The relay as an operator configures it: per-client rules from the
//! config file, rate limits, and SIGHUP reloads. Real relay processes
//! where the config file matters, in-process relays where the test sets
//! the policy itself.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;
use std::num::NonZeroU32;

use passage_relay::policy::{Policy, PolicyTables};
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{InProcessRelay, TestPki, free_udp_port};
use passage_tests::requests::{
    WAIT, answer, chat, chat_stream, client_for, eventually, relay_with_config, rules, upload,
    write_config,
};
use passage_tests::stack::{after_first_event, body_json, read_to_end};

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
