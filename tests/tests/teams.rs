//! What a team running several relays relies on: the usage ledger and its
//! report (`passage-relay usage`), on the embedded SQLite file and on a
//! real Redis shared by two relays, with the limits that Redis makes hold
//! across them, through Redis being killed and restarted.

use std::time::Duration;

use passage_tests::Transport::{self, Quic, Tcp};
use passage_tests::mock_upstream::{MockUpstream, SSE_CHUNKS};
use passage_tests::relays::{
    LocalClient, RelayLaunch, RelayProcess, TestPki, free_udp_port, relay_program,
};
use passage_tests::stack::{after_first_event, chat_request as chat, read_to_end};
use rstest::rstest;

const WAIT: Duration = Duration::from_secs(10);

async fn client_for(
    pki: &TestPki,
    name: &str,
    relays: &[std::net::SocketAddr],
    transport: Transport,
) -> LocalClient {
    let client = LocalClient::start_over(pki.issue(name, relays), transport, |_| {}).await;
    client.wait_for_relay(relays[0], WAIT).await;
    client
}

/// Sends a completion and reads its answer to the end; its status.
async fn complete(client: &LocalClient, model: &str, stream: bool) -> u16 {
    let response = client
        .post_json("/v1/chat/completions", &chat(model, stream))
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let (_, outcome) = read_to_end(&mut body, WAIT).await;
    assert!(outcome.is_ok(), "{outcome:?}");
    status
}

/// `passage-relay usage ARGS --json`, parsed.
fn usage_report(args: &[&str]) -> serde_json::Value {
    let output = std::process::Command::new(relay_program())
        .arg("usage")
        .args(args)
        .arg("--json")
        .env_remove("PASSAGE_STATE")
        .output()
        .expect("passage-relay usage runs");
    assert!(
        output.status.success(),
        "usage failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "usage printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// The row of `report` whose `column` is `key`.
fn row<'a>(report: &'a serde_json::Value, column: &str, key: &str) -> &'a serde_json::Value {
    report
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row[column] == key))
        .unwrap_or_else(|| panic!("no {column} {key} in {report:#}"))
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_keeps_every_request_through_sigterm_and_sigkill(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().display().to_string();
    let launch = RelayLaunch {
        args: vec!["--data-dir".into(), data_dir.clone()],
        ..RelayLaunch::default()
    };
    let addr = free_udp_port();
    let mut relay = RelayProcess::launch(&pki, addr, &upstream.url(), launch.clone()).await;
    let client = client_for(&pki, "alice", &[addr], transport).await;

    // Three whole answers (5 + 5 tokens each), a stream that reports its
    // usage (7 + 10), and a stream the app gives up on.
    for _ in 0..3 {
        assert_eq!(complete(&client, "gpt-x", false).await, 200);
    }
    assert_eq!(complete(&client, "gpt-x", true).await, 200);
    let endless = after_first_event(client.get("/v1/endless").await.expect("answer")).await;
    drop(endless);
    relay.wait_for_log(&["ended=\"client_gone\""], WAIT).await;

    // SIGTERM: the relay drains, writes the ledger out and exits.
    relay.signal("TERM");
    let status = relay
        .exited_within(WAIT)
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let report = usage_report(&["--data-dir", &data_dir, "--by", "client"]);
    let alice = row(&report, "client", "alice");
    assert_eq!(alice["requests"], 5, "{report:#}");
    assert_eq!(alice["failed"], 1, "the cancelled stream: {report:#}");
    assert_eq!(alice["input_tokens"], 3 * 5 + 7, "{report:#}");
    assert_eq!(alice["output_tokens"], 3 * 5 + SSE_CHUNKS, "{report:#}");
    let by_model = usage_report(&["--data-dir", &data_dir, "--by", "model"]);
    assert_eq!(row(&by_model, "model", "gpt-x")["requests"], 4);
    assert_eq!(row(&by_model, "model", "-")["requests"], 1);

    // SIGKILL: what ended a second before is on disk.
    let mut relay = RelayProcess::launch(&pki, addr, &upstream.url(), launch).await;
    client.wait_for_relay(addr, WAIT).await;
    for _ in 0..2 {
        assert_eq!(complete(&client, "gpt-y", false).await, 200);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    relay.kill().await;
    let report = usage_report(&["--data-dir", &data_dir, "--by", "day", "--since", "1h"]);
    let days = report.as_array().expect("rows");
    assert_eq!(days.len(), 1, "{report:#}");
    assert_eq!(days[0]["requests"], 7, "{report:#}");
    assert_eq!(days[0]["input_tokens"], 5 * 5 + 7, "{report:#}");
}

#[test]
fn the_usage_report_says_where_it_looked_and_reads_the_config_file() {
    let data = tempfile::tempdir().expect("data dir");
    let output = std::process::Command::new(relay_program())
        .args(["usage", "--data-dir"])
        .arg(data.path())
        .env_remove("PASSAGE_STATE")
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no usage ledger at"), "{stderr}");

    // The relay's own config file names the directory.
    let config = data.path().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "data-dir = {:?}\nidle-timeout = 60\n",
            data.path().join("elsewhere").display().to_string()
        ),
    )
    .expect("write config");
    let output = std::process::Command::new(relay_program())
        .args(["usage", "--config"])
        .arg(&config)
        .env_remove("PASSAGE_STATE")
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("elsewhere"), "{stderr}");
}

/// The config file of the Redis tests' relays.
const TEAM_RULES: &str = r#"
[clients.team]
requests_per_minute = 60

[clients.solo]
concurrent_requests = 1

[clients.budget]
tokens_per_minute = 15
"#;

/// What every Redis test starts with: a real Redis, the mock upstream, a
/// PKI and a config file holding [`TEAM_RULES`].
struct RedisBed {
    redis: passage_tests::redis_server::RedisServer,
    upstream: MockUpstream,
    pki: TestPki,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl RedisBed {
    /// The bed, or None (the reason printed) where Redis is not installed.
    async fn start() -> Option<RedisBed> {
        if !passage_tests::redis_server::available() {
            return None;
        }
        let dir = tempfile::tempdir().expect("dir");
        let config = dir.path().join("relay.toml");
        std::fs::write(&config, TEAM_RULES).expect("config");
        Some(RedisBed {
            redis: passage_tests::redis_server::RedisServer::start(),
            upstream: MockUpstream::start().await.expect("mock upstream"),
            pki: TestPki::new(),
            config,
            _dir: dir,
        })
    }

    /// A relay process with `--state` this Redis, the rules and `args`.
    async fn relay(&self, args: &[&str]) -> RelayProcess {
        let mut launch = RelayLaunch {
            args: vec![
                "--config".into(),
                self.config.display().to_string(),
                "--state".into(),
                self.redis.url(),
            ],
            ..RelayLaunch::default()
        };
        launch.args.extend(args.iter().map(|a| (*a).to_owned()));
        RelayProcess::launch(&self.pki, free_udp_port(), &self.upstream.url(), launch).await
    }
}

/// The status of `GET /v1/models` and the time it took.
async fn timed_get(client: &LocalClient) -> (u16, Duration) {
    let started = std::time::Instant::now();
    let response = client.get("/v1/models").await.expect("an answer");
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let _ = read_to_end(&mut body, WAIT).await;
    (status, started.elapsed())
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_redis_enforce_one_budget_and_keep_one_ledger(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let Some(bed) = RedisBed::start().await else {
        return;
    };
    let one = bed.relay(&[]).await;
    let two = bed.relay(&[]).await;
    // One client name, its bundle pointed at both relays: one app's
    // client prefers the first, another's the second.
    let via_one = client_for(&bed.pki, "team", &[one.addr, two.addr], transport).await;
    let via_two = client_for(&bed.pki, "team", &[two.addr, one.addr], transport).await;

    // 60 a minute: 100 requests within seconds, half through each relay.
    let mut admitted = 0;
    for i in 0..100 {
        let client = if i % 2 == 0 { &via_one } else { &via_two };
        let (status, _) = timed_get(client).await;
        assert!(status == 200 || status == 429, "status {status}");
        admitted += u32::from(status == 200);
    }
    assert!(
        (57..=63).contains(&admitted),
        "{admitted} of 100 admitted under one 60/minute budget"
    );
    for relay in [&one, &two] {
        relay
            .wait_for_log(&["client=team", "status=200"], WAIT)
            .await;
        relay
            .wait_for_log(&["client=team", "status=429", "across relays"], WAIT)
            .await;
    }

    // One concurrent request: a stream held through one relay keeps the
    // other from admitting a second.
    let solo_one = client_for(&bed.pki, "solo", &[one.addr], transport).await;
    let solo_two = client_for(&bed.pki, "solo", &[two.addr], transport).await;
    let held = after_first_event(solo_one.get("/v1/endless").await.expect("answer")).await;
    assert_eq!(timed_get(&solo_two).await.0, 429);
    drop(held);
    let deadline = std::time::Instant::now() + WAIT;
    while timed_get(&solo_two).await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot stayed taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Tokens: 10 through each relay put the client over 15 on both. A
    // relay's own next request meets its counts at once; the other relay
    // within 2 ms (the settlement waits that long for a request to carry
    // it), so the steps that change relay wait 10 ms.
    let budget_one = client_for(&bed.pki, "budget", &[one.addr], transport).await;
    let budget_two = client_for(&bed.pki, "budget", &[two.addr], transport).await;
    let other_relay_sees_it = || tokio::time::sleep(Duration::from_millis(10));
    assert_eq!(complete(&budget_one, "m", false).await, 200);
    other_relay_sees_it().await;
    assert_eq!(complete(&budget_two, "m", false).await, 200);
    other_relay_sees_it().await;
    assert_eq!(complete(&budget_one, "m", false).await, 429);
    assert_eq!(complete(&budget_two, "m", false).await, 429);

    // The ledger: both relays' requests, written out as they stop and
    // read back from Redis.
    for mut relay in [one, two] {
        relay.signal("TERM");
        let status = relay.exited_within(WAIT).await.expect("exits");
        assert!(status.success(), "{status:?}");
    }
    let report = usage_report(&["--state", &bed.redis.url(), "--by", "client"]);
    let team = row(&report, "client", "team");
    assert_eq!(team["requests"], 100, "{report:#}");
    assert_eq!(team["failed"], 100 - admitted, "{report:#}");
    let budget = row(&report, "client", "budget");
    assert_eq!(budget["requests"], 4, "{report:#}");
    assert_eq!(budget["input_tokens"], 10, "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_windows_let_old_buckets_go_and_say_when_the_next_leaves() {
    let Some(bed) = RedisBed::start().await else {
        return;
    };
    let relay = bed.relay(&[]).await;
    let team = client_for(&bed.pki, "team", &[relay.addr], Quic).await;
    // The window as a relay left it 30 s ago (30 requests) and 70 s ago
    // (29 requests, since gone): 30 of 60 count.
    let now = bed.redis.now();
    let (old, recent) = (now - 70, now - 30);
    let windows = "passage:{team}:windows";
    bed.redis
        .cli(&["RPUSH", "passage:{team}:rpm", &format!("{old}:29")]);
    bed.redis.cli(&[
        "HSET",
        windows,
        "rpm.t",
        "59",
        "rpm.s",
        &recent.to_string(),
        "rpm.c",
        "30",
        "rpm.x",
        &(old + 61).to_string(),
    ]);
    let mut admitted = 0;
    let mut retry_after = None;
    for _ in 0..40 {
        let response = team.get("/v1/models").await.expect("answer");
        match response.status().as_u16() {
            200 => admitted += 1,
            429 => {
                retry_after = response.headers()["retry-after"]
                    .to_str()
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok());
                break;
            }
            other => panic!("status {other}"),
        }
    }
    assert_eq!(admitted, 30, "the 29 of 70 s ago left the window");
    // The next to leave are the 30 of 30 s ago: in about 31 s.
    assert!(
        retry_after.is_some_and(|s| (29..=32).contains(&s)),
        "retry-after {retry_after:?}"
    );
    let total = bed.redis.cli(&["HGET", windows, "rpm.t"]);
    assert_eq!(total, "60");
}

/// The longest a request may take while the store is down or stalled:
/// the store's 250 ms, and room for a loaded test machine.
const STORE_DOWN_LIMIT: Duration = Duration::from_millis(250 + 400);

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_limits_fall_back_to_the_relays_own_then_come_back(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let Some(mut bed) = RedisBed::start().await else {
        return;
    };
    let metrics = passage_tests::relays::free_tcp_port();
    let metrics_arg = metrics.to_string();
    let relay = bed.relay(&["--metrics", &metrics_arg]).await;
    let solo = client_for(&bed.pki, "solo", &[relay.addr], transport).await;
    assert_eq!(timed_get(&solo).await.0, 200);
    let state_up = || async {
        let text = passage_tests::relays::scrape(metrics).await;
        passage_tests::relays::sample(&text, "passage_relay_state_up")
    };
    assert_eq!(state_up().await, Some(1.0));
    let health = passage_tests::relays::relay_health(metrics).await;
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["state"]["backend"], "redis", "{health}");

    // Killed: requests go on under the relay's own counts, never waiting
    // long on the store; the relay says so once.
    bed.redis.kill();
    for _ in 0..5 {
        let (status, took) = timed_get(&solo).await;
        assert_eq!(status, 200);
        assert!(took < STORE_DOWN_LIMIT, "a request took {took:?}");
    }
    relay
        .wait_for_log(&["WARN", "state store unreachable", "own limits"], WAIT)
        .await;
    assert_eq!(state_up().await, Some(0.0));
    let health = passage_tests::relays::relay_health(metrics).await;
    assert_eq!(health["status"], "degraded", "{health}");
    let text = passage_tests::relays::scrape(metrics).await;
    let failures = passage_tests::relays::sample(&text, "passage_relay_state_failures_total");
    assert!(failures.is_some_and(|n| n >= 1.0), "{text}");
    // The relay's own concurrency count holds meanwhile.
    let held = after_first_event(solo.get("/v1/endless").await.expect("answer")).await;
    assert_eq!(timed_get(&solo).await.0, 429);
    drop(held);

    // Back (empty): the relay finds it by itself and counts there again.
    bed.redis.restart();
    relay
        .wait_for_log(&["state store reachable again"], WAIT)
        .await;
    assert_eq!(state_up().await, Some(1.0));
    let held = after_first_event(solo.get("/v1/endless").await.expect("answer")).await;
    assert_eq!(timed_get(&solo).await.0, 429);
    drop(held);

    // Stalled (SIGSTOP: connections open, no answers): the first request
    // waits out the 250 ms, the next ones not at all.
    let deadline = std::time::Instant::now() + WAIT;
    while timed_get(&solo).await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot stayed taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bed.redis.signal("STOP");
    for _ in 0..3 {
        let (status, took) = timed_get(&solo).await;
        assert_eq!(status, 200);
        assert!(took < STORE_DOWN_LIMIT, "a request took {took:?}");
    }
    bed.redis.signal("CONT");
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_gone_and_fail_closed_limited_clients_get_503(
    #[values(Quic, Tcp)] transport: Transport,
) {
    let Some(mut bed) = RedisBed::start().await else {
        return;
    };
    let relay = bed.relay(&["--state-fail", "closed"]).await;
    let team = client_for(&bed.pki, "team", &[relay.addr], transport).await;
    let free = client_for(&bed.pki, "unlimited", &[relay.addr], transport).await;
    assert_eq!(timed_get(&team).await.0, 200);

    bed.redis.kill();
    let response = team.get("/v1/models").await.expect("an answer");
    assert_eq!(response.status(), 503);
    let body = passage_tests::stack::body_json(response).await;
    assert_eq!(body["error"]["code"], "state_unavailable", "{body}");
    let (status, took) = timed_get(&team).await;
    assert_eq!(status, 503);
    assert!(took < STORE_DOWN_LIMIT, "a refusal took {took:?}");
    // A client without limits does not need the store.
    assert_eq!(timed_get(&free).await.0, 200);

    bed.redis.restart();
    let deadline = std::time::Instant::now() + WAIT;
    while timed_get(&team).await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "still refused after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_capping_streams_per_connection_gets_more_connections(
    #[values(Quic, Tcp)] transport: Transport,
) {
    const STREAMS: usize = 1000;
    // Each stream holds a socket on the app side and one on the client's.
    if !passage_tests::allow_open_files(4 * STREAMS as u64 + 512) {
        eprintln!(
            "skipped: the open-file limit is below {}",
            4 * STREAMS + 512
        );
        return;
    }
    let upstream = MockUpstream::start_with_stream_limit(100)
        .await
        .expect("mock upstream");
    let pki = TestPki::new();
    let relay = passage_tests::relays::InProcessRelay::start(
        &pki,
        free_udp_port(),
        &upstream.url(),
        |config| config.upstream_http2 = true,
    );
    let client = client_for(&pki, "many", &[relay.addr], transport).await;
    let started = std::time::Instant::now();
    let streams = (0..STREAMS).map(|_| {
        let request = client.send(http::Method::GET, "/v1/endless", None);
        async move {
            let response = request.await.expect("an answer");
            assert_eq!(response.status(), 200);
            let mut body = response.into_body();
            use http_body_util::BodyExt;
            let first = body.frame().await;
            assert!(matches!(first, Some(Ok(_))), "{first:?}");
            let after = started.elapsed();
            (after, body)
        }
    });
    let answered = futures_util::future::join_all(streams).await;
    if std::env::var_os("PASSAGE_DEBUG_LANES").is_some() {
        let mut times: Vec<u128> = answered.iter().map(|(a, _)| a.as_millis()).collect();
        times.sort_unstable();
        eprintln!(
            "first bytes (ms): {:?}",
            times.iter().step_by(25).collect::<Vec<_>>()
        );
    }
    let slowest = answered
        .iter()
        .map(|(after, _)| *after)
        .max()
        .unwrap_or_default();
    let connections = upstream
        .record
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    // Queued behind the first connection's 100, 900 streams would never
    // start (the endless streams never end). The issue's 1 s is measured
    // on release builds (passage-bench --only lanes); this debug build of
    // app, client, relay and upstream in one process gets more room.
    let limit = if cfg!(debug_assertions) {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(1)
    };
    assert!(
        slowest < limit,
        "the slowest of {STREAMS} streams had its first byte after {slowest:?} ({connections} upstream connections)"
    );
    assert!(
        connections >= STREAMS / 100,
        "{connections} upstream connections for {STREAMS} streams at 100 each"
    );
    eprintln!(
        "{STREAMS} streams: slowest first byte {slowest:?}, {connections} upstream connections"
    );
}
