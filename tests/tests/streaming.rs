//! Responses reach the app as the upstream produces them: whole JSON
//! answers, SSE chunk by chunk with their spacing intact, and a stream the
//! upstream breaks off ends with an error rather than a clean end.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use passage_tests::Transport::{self, Quic, Tcp};
use passage_tests::mock_upstream::{SSE_CHUNKS, SSE_INTERVAL};
use passage_tests::stack::{TestStack, body_json, read_to_end};
use rstest::rstest;

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_chat_completion_round_trips(#[values(Quic, Tcp)] transport: Transport) {
    let stack = TestStack::start_over(transport).await;
    let response = stack
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = body_json(response).await;
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Hello from the mock upstream"
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_chunks_arrive_spaced_as_sent(#[values(Quic, Tcp)] transport: Transport) {
    let stack = TestStack::start_over(transport).await;
    let response = stack
        .post_json(
            "/v1/chat/completions",
            serde_json::json!({"model": "m", "stream": true, "messages": []}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");

    // Record when each SSE event becomes readable at the app.
    let mut body = response.into_body();
    let mut buffer = Vec::new();
    let mut arrivals = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(frame) = tokio::time::timeout_at(deadline.into(), body.frame())
        .await
        .expect("stream finishes in time")
    {
        let frame = frame.expect("body frame");
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = Instant::now();
        buffer.extend_from_slice(&data);
        let events = String::from_utf8_lossy(&buffer).matches("\n\n").count();
        while arrivals.len() < events {
            arrivals.push(now);
        }
    }
    let text = String::from_utf8(buffer).expect("utf-8");
    assert_eq!(
        arrivals.len(),
        SSE_CHUNKS + 1,
        "all events and [DONE]: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"));

    // Each event left the upstream SSE_INTERVAL after the previous one; if
    // anything on the way buffered, several would arrive together.
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    let bunched = gaps.iter().filter(|g| **g < SSE_INTERVAL / 2).count();
    assert!(bunched <= 1, "events arrived bunched, gaps: {gaps:?}");
    let spread = arrivals[arrivals.len() - 1] - arrivals[0];
    assert!(
        spread >= SSE_INTERVAL * (SSE_CHUNKS as u32 - 1),
        "events spread over only {spread:?}"
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_dying_mid_stream_ends_the_app_stream_with_an_error(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let stack = TestStack::start_over(transport).await;
    let response = stack.get("/v1/broken").await.expect("head arrives");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let (received, outcome) = read_to_end(&mut body, Duration::from_secs(5)).await;
    assert!(outcome.is_err(), "a truncated stream must not end cleanly");
    assert!(
        String::from_utf8_lossy(&received).contains("data: "),
        "the chunks before the failure arrived"
    );
    // The relay is still healthy for the next request.
    let next = stack.get("/v1/models").await.expect("next request");
    assert_eq!(next.status(), 200);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_sized_body_that_breaks_keeps_the_upstream_head_and_is_cut(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let stack = TestStack::start_over(transport).await;
    let response = stack.get("/v1/broken-sized").await.expect("head arrives");
    assert_eq!(
        response.status(),
        200,
        "the upstream's status, not a passage error"
    );
    assert_eq!(response.headers()["x-upstream"], "kept");
    let outcome = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .expect("no hang");
    assert!(outcome.is_err(), "a cut body must not end cleanly");
}
