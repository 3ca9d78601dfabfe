//! An upstream that hangs, goes quiet mid-stream or streams for a long
//! time, and an app that reads slowly: each gets a bounded, clear outcome,
//! and the relay stays healthy.

use passage_tests::Transport::{self, Quic, Tcp};
use rstest::rstest;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use passage_tests::stack::{StackOptions, TestStack, after_first_event, body_json, read_to_end};

async fn stack_with_idle_timeout(timeout: Duration, transport: Transport) -> TestStack {
    TestStack::start_with(StackOptions {
        idle_read_timeout: Some(timeout),
        transport,
        ..StackOptions::default()
    })
    .await
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_silent_past_the_idle_timeout_is_a_504(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let stack = stack_with_idle_timeout(Duration::from_millis(500), transport).await;
    let asked = Instant::now();
    let response = stack.get("/v1/slow-head").await.expect("an answer");
    let waited = asked.elapsed();
    assert_eq!(response.status(), 504);
    let error = body_json(response).await;
    assert_eq!(error["error"]["code"], "upstream_timeout");
    assert_eq!(error["error"]["type"], "passage_error");
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // The relay dropped the upstream call and still serves.
    let deadline = Instant::now() + Duration::from_secs(2);
    while stack.upstream.cancellation_count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the upstream call was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let next = stack.get("/v1/models").await.expect("next request");
    assert_eq!(next.status(), 200);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_silent_mid_stream_cuts_the_app_stream(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let stack = stack_with_idle_timeout(Duration::from_millis(500), transport).await;
    let response = stack
        .get("/v1/endless?interval_ms=5000")
        .await
        .expect("head");
    let mut body = after_first_event(response).await;
    let started = Instant::now();
    let (_, outcome) = read_to_end(&mut body, Duration::from_secs(4)).await;
    assert!(
        outcome.is_err(),
        "a stream cut by the idle timeout must not end cleanly"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    let next = stack.get("/v1/models").await.expect("next request");
    assert_eq!(next.status(), 200);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_keeps_sending_outlives_the_idle_timeout(
    #[values(Quic, Tcp)] transport: Transport,
) {
    // No total timeout: only silence ends a response.
    let stack = stack_with_idle_timeout(Duration::from_millis(400), transport).await;
    let response = stack
        .get("/v1/stamped?chunks=15&interval_ms=100")
        .await
        .expect("head");
    assert_eq!(response.status(), 200);
    let started = Instant::now();
    let body = response.into_body().collect().await.expect("a clean end");
    assert!(started.elapsed() >= Duration::from_millis(1300));
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    assert_eq!(text.matches("data:").count(), 15);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_back_the_upstream(#[values(Quic, Tcp)] transport: Transport) {
    // 1 GiB offered, read at about 1 MB/s: flow control must keep what the
    // upstream has written within the windows and buffers on the way,
    // rather than let the download pile up in memory.
    let stack = TestStack::start_over(transport).await;
    let response = stack
        .get(&format!("/download?bytes={}", 1u64 << 30))
        .await
        .expect("head");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let rss_before = rss_kib();
    let started = Instant::now();
    let mut read = 0u64;
    let mut leads = Vec::new();
    while started.elapsed() < Duration::from_secs(6) {
        let frame = body.frame().await.expect("data").expect("data");
        read += frame.into_data().map_or(0, |d| d.len() as u64);
        // Pace to 1 MB/s.
        let due = Duration::from_secs_f64(read as f64 / 1e6);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let written = stack.upstream.record.downloaded.load(Ordering::Relaxed);
        leads.push((started.elapsed(), written.saturating_sub(read)));
    }
    let lead_mib = |at: Duration| {
        leads
            .iter()
            .filter(|(t, _)| *t >= at)
            .map(|(_, lead)| *lead)
            .max()
            .unwrap_or(0) as f64
            / (1 << 20) as f64
    };
    let (early, late) = (
        lead_mib(Duration::from_secs(2)),
        lead_mib(Duration::from_secs(4)),
    );
    // Windows (8 MiB stream) plus socket and HTTP buffers on both hops.
    assert!(
        early < 48.0 && late < 48.0,
        "upstream ran ahead: {early:.1} / {late:.1} MiB"
    );
    assert!(
        late <= early + 4.0,
        "the lead keeps growing: {early:.1} → {late:.1} MiB"
    );
    let grown_mib = (rss_kib().saturating_sub(rss_before)) as f64 / 1024.0;
    assert!(grown_mib < 64.0, "memory grew by {grown_mib:.1} MiB");
}

/// Resident memory of this test process (relay, client and upstream live in it), KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
