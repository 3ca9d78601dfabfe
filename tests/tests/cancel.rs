//! When the app goes away mid-response, the upstream call is dropped at
//! once: that is what stops token spend.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use passage_tests::stack::TestStack;

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_disconnect_cancels_the_upstream_request(#[values(Quic, Tcp)] transport: Transport) {
    let stack = TestStack::start_over(transport).await;
    let response = stack.get("/v1/endless").await.expect("head arrives");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    for _ in 0..2 {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("chunk in time")
            .expect("stream open")
            .expect("chunk");
        assert!(frame.is_data());
    }
    assert_eq!(stack.upstream.cancellation_count(), 0);

    let cancelled = stack.upstream.record.cancelled.notified();
    tokio::pin!(cancelled);
    cancelled.as_mut().enable();
    // Dropping a body mid-stream closes the app's connection.
    let dropped_at = Instant::now();
    drop(body);
    tokio::time::timeout(Duration::from_secs(2), cancelled)
        .await
        .expect("the upstream saw the cancellation");
    let took = dropped_at.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "upstream cancelled only after {took:?}"
    );
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_giving_up_before_the_response_head_cancels_the_upstream_request(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let stack = TestStack::start_over(transport).await;
    let cancelled = stack.upstream.record.cancelled.notified();
    tokio::pin!(cancelled);
    cancelled.as_mut().enable();

    // The app waits 300 ms for a slow non-streaming answer, then gives up
    // (dropping the request future closes its connection).
    let attempt =
        tokio::time::timeout(Duration::from_millis(300), stack.get("/v1/slow-head")).await;
    assert!(attempt.is_err(), "the slow upstream answered early");
    let gave_up_at = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), cancelled)
        .await
        .expect("the upstream saw the cancellation");
    let took = gave_up_at.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "upstream cancelled only after {took:?}"
    );
}
