//! Model and path rules against a client that tries to get around them,
//! and the read-ahead budget a model check holds while it reads a body.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use passage_relay::policy::{Policy, PolicyTables};
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{InProcessRelay, TestPki, free_udp_port};
use passage_tests::requests::{WAIT, answer, chat, client_for, eventually, form, rules, send};

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
