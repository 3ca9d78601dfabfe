//! Large bodies and many concurrent requests stream through intact.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use passage_tests::Transport::{self, Quic, Tcp};
use passage_tests::mock_upstream::{pattern_bytes, sha256_hex};
use passage_tests::stack::{TestStack, body_json};
use rstest::rstest;
use sha2::{Digest, Sha256};

const BULK_BYTES: usize = 24 << 20;

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_mib_upload_arrives_intact(#[values(Quic, Tcp)] transport: Transport) {
    let stack = TestStack::start_over(transport).await;
    let payload = Bytes::from(pattern_bytes(7, BULK_BYTES));
    let request = Request::post(stack.url("/v1/files"))
        .header("content-type", "application/octet-stream")
        .body(Full::new(payload.clone()))
        .expect("request");
    let response = stack.send(request).await.expect("answers");
    assert_eq!(response.status(), 200);
    let file = body_json(response).await;
    assert_eq!(file["bytes"], BULK_BYTES as u64);
    assert_eq!(file["sha256"], sha256_hex(&payload));
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_mib_download_arrives_intact(#[values(Quic, Tcp)] transport: Transport) {
    let stack = TestStack::start_over(transport).await;
    let response = stack
        .get(&format!("/download?bytes={BULK_BYTES}"))
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-length"], BULK_BYTES.to_string());
    let mut body = response.into_body();
    let mut hasher = Sha256::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let data = frame.expect("chunk").into_data().unwrap_or_default();
        len += data.len();
        hasher.update(&data);
    }
    assert_eq!(len, BULK_BYTES);
    let expected = sha256_hex(&pattern_bytes(0, BULK_BYTES));
    let got: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got, expected);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams_stay_intact(#[values(Quic, Tcp)] transport: Transport) {
    let stack = std::sync::Arc::new(TestStack::start_over(transport).await);
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let stack = stack.clone();
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(pattern_bytes(i * 7919, 1000 + (i as usize * 613) % 60_000));
            let request = Request::post(stack.url(&format!("/echo/{i}?n={i}")))
                .body(Full::new(body.clone()))
                .expect("request");
            let response = stack.send(request).await.expect("answers");
            assert_eq!(response.status(), 200);
            let echo = body_json(response).await;
            assert_eq!(echo["path"], format!("/echo/{i}"));
            assert_eq!(echo["query"], format!("n={i}"));
            assert_eq!(echo["body_len"], body.len() as u64);
            assert_eq!(echo["body_sha256"], sha256_hex(&body));
        }));
    }
    let all = futures_util::future::join_all(tasks);
    let results = tokio::time::timeout(std::time::Duration::from_secs(30), all)
        .await
        .expect("all finish in time");
    for result in results {
        result.expect("request task succeeded");
    }
    assert_eq!(stack.upstream.request_count(), 100);
}
