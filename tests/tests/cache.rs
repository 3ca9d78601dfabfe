//! The response cache: opt-in per client, hit and miss marked on the
//! answer, `x-passage-cache: skip|use` per request, streams replayed as
//! they came, errors never kept, and one client's answers never given to
//! another. On the embedded cache and on a real Redis.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use passage_relay::policy::{CacheSetting, ClientRules, Policy, PolicyTables};
use passage_tests::Transport::{self, Quic, Tcp};
use passage_tests::mock_upstream::MockUpstream;
use passage_tests::relays::{
    InProcessRelay, LocalClient, RelayLaunch, RelayProcess, TestPki, free_udp_port,
};
use passage_tests::stack::{chat_request as chat, read_to_end};
use rstest::rstest;

const WAIT: Duration = Duration::from_secs(10);

/// What the app saw of one answer.
#[derive(Debug)]
struct Seen {
    status: u16,
    /// The `x-passage-cache` header, if any.
    cache: Option<String>,
    content_type: String,
    body: Vec<u8>,
}

/// POSTs `body` to the chat endpoint with `x-passage-cache: asked` if given.
async fn ask(client: &LocalClient, body: &serde_json::Value, asked: Option<&str>) -> Seen {
    let mut request = Request::post(client.url("/v1/chat/completions"))
        .header("content-type", "application/json");
    if let Some(asked) = asked {
        request = request.header("x-passage-cache", asked);
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let response = client.http.request(request).await.expect("an answer");
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let cache = header("x-passage-cache");
    let content_type = header("content-type").unwrap_or_default();
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let (bytes, outcome) = read_to_end(&mut body, WAIT).await;
    assert!(outcome.is_ok(), "{outcome:?}");
    Seen {
        status,
        cache,
        content_type,
        body: bytes,
    }
}

fn rules(cache: Option<CacheSetting>) -> ClientRules {
    ClientRules {
        cache,
        ..ClientRules::default()
    }
}

/// The policy of the cache tests: two cached clients, an opt-in one, and
/// one without the cache.
fn cache_policy() -> Policy {
    let mut tables = PolicyTables::default();
    for name in ["alice", "bob"] {
        tables
            .clients
            .insert(name.into(), rules(Some(CacheSetting::Switch(true))));
    }
    tables.clients.insert(
        "careful".into(),
        rules(Some(CacheSetting::Word("opt-in".into()))),
    );
    tables.clients.insert("plain".into(), rules(None));
    Policy::new(tables).expect("valid policy")
}

/// Runs the cache checks against clients of a relay at `relay`.
async fn check_the_cache(
    pki: &TestPki,
    upstream: &MockUpstream,
    relay: std::net::SocketAddr,
    transport: Transport,
) {
    let client = |name: &'static str| async move {
        let client = LocalClient::start_over(pki.issue(name, &[relay]), transport, |_| {}).await;
        client.wait_for_relay(relay, WAIT).await;
        client
    };
    let calls = || upstream.record.requests.load(Ordering::SeqCst);
    let alice = client("alice").await;
    let request = chat("gpt-cache", false);

    // A miss goes upstream; the same request again is a hit that does not.
    let before = calls();
    let miss = ask(&alice, &request, None).await;
    assert_eq!((miss.status, miss.cache.as_deref()), (200, Some("miss")));
    assert_eq!(calls(), before + 1);
    let cached_headers = upstream.record.last_headers.lock().expect("lock").clone();
    assert!(
        cached_headers.is_some_and(|h| !h.contains_key("x-passage-cache")),
        "the cache header stays on the relay"
    );
    let hit = ask(&alice, &request, None).await;
    assert_eq!((hit.status, hit.cache.as_deref()), (200, Some("hit")));
    assert_eq!(hit.body, miss.body);
    assert_eq!(hit.content_type, "application/json");
    assert_eq!(calls(), before + 1, "a hit does not call the upstream");

    // `skip` passes this request by, in both directions.
    let skipped = ask(&alice, &request, Some("skip")).await;
    assert_eq!((skipped.status, skipped.cache), (200, None));
    assert_eq!(calls(), before + 2);

    // A stream: kept whole, replayed with the same events.
    let streaming = chat("gpt-cache", true);
    let first = ask(&alice, &streaming, None).await;
    assert_eq!(first.cache.as_deref(), Some("miss"));
    let again = ask(&alice, &streaming, None).await;
    assert_eq!(again.cache.as_deref(), Some("hit"));
    assert!(again.content_type.starts_with("text/event-stream"));
    assert_eq!(
        String::from_utf8_lossy(&again.body),
        String::from_utf8_lossy(&first.body)
    );
    assert!(String::from_utf8_lossy(&again.body).ends_with("data: [DONE]\n\n"));

    // Errors are never kept.
    let failing = chat("mock-error", false);
    for _ in 0..2 {
        let seen = ask(&alice, &failing, None).await;
        assert_eq!((seen.status, seen.cache.as_deref()), (500, Some("miss")));
    }

    // Another client's identical request is its own miss.
    let bob = client("bob").await;
    let bobs = ask(&bob, &request, None).await;
    assert_eq!(bobs.cache.as_deref(), Some("miss"));
    assert_eq!(
        ask(&bob, &request, None).await.cache.as_deref(),
        Some("hit")
    );

    // Opt-in: only requests that say `use`.
    let careful = client("careful").await;
    assert_eq!(ask(&careful, &request, None).await.cache, None);
    assert_eq!(
        ask(&careful, &request, Some("use")).await.cache.as_deref(),
        Some("miss")
    );
    assert_eq!(
        ask(&careful, &request, Some("use")).await.cache.as_deref(),
        Some("hit")
    );

    // No cache in the rules: `use` changes nothing.
    let plain = client("plain").await;
    let before = calls();
    assert_eq!(ask(&plain, &request, Some("use")).await.cache, None);
    assert_eq!(ask(&plain, &request, Some("use")).await.cache, None);
    assert_eq!(calls(), before + 2);
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_cache_serves_repeats_per_client(#[values(Quic, Tcp)] transport: Transport) {
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let relay = InProcessRelay::start(&pki, free_udp_port(), &upstream.url(), |config| {
        config.policy = cache_policy();
    });
    check_the_cache(&pki, &upstream, relay.addr, transport).await;
}

#[rstest]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_cache_serves_repeats_per_client_across_relays(
    #[values(Quic, Tcp)] transport: Transport,
) {
    if !passage_tests::redis_server::available() {
        return;
    }
    let redis = passage_tests::redis_server::RedisServer::start();
    let upstream = MockUpstream::start().await.expect("mock upstream");
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[clients.alice]\ncache = true\n[clients.bob]\ncache = true\n\
         [clients.careful]\ncache = \"opt-in\"\n[clients.plain]\n",
    )
    .expect("config");
    let launch = RelayLaunch {
        args: vec![
            "--config".into(),
            config.display().to_string(),
            "--state".into(),
            redis.url(),
        ],
        ..RelayLaunch::default()
    };
    let one = RelayProcess::launch(&pki, free_udp_port(), &upstream.url(), launch.clone()).await;
    check_the_cache(&pki, &upstream, one.addr, transport).await;

    // A second relay on the same Redis answers from what the first kept.
    let two = RelayProcess::launch(&pki, free_udp_port(), &upstream.url(), launch).await;
    let alice = LocalClient::start_over(pki.issue("alice", &[two.addr]), transport, |_| {}).await;
    alice.wait_for_relay(two.addr, WAIT).await;
    let before = upstream.record.requests.load(Ordering::SeqCst);
    let seen = ask(&alice, &chat("gpt-cache", false), None).await;
    assert_eq!(seen.cache.as_deref(), Some("hit"));
    assert_eq!(upstream.record.requests.load(Ordering::SeqCst), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_cache_keeps_to_its_byte_cap() {
    use passage_relay::state::{FailMode, StateStore};
    use passage_relay::{CacheKey, CachedAnswer};
    if !passage_tests::redis_server::available() {
        return;
    }
    let redis = passage_tests::redis_server::RedisServer::start();
    let cap = 64 * 1024;
    let store =
        passage_relay::state::redis::RedisState::open(&redis.url(), FailMode::Open, cap, false)
            .expect("store");
    // 4 KiB answers, each due a second after the one before.
    for i in 0..64u8 {
        let answer = CachedAnswer {
            status: 200,
            headers: Vec::new(),
            pieces: vec![Bytes::from(vec![b'x'; 4096])],
            ttl: Duration::from_secs(60 + u64::from(i)),
        };
        store.cache_put(CacheKey([i; 32]), answer).await;
    }
    let total: u64 = redis
        .cli(&["GET", "passage:{cache}:total"])
        .parse()
        .expect("a byte count");
    assert!(total <= cap, "{total} bytes kept under a cap of {cap}");
    assert!(total >= cap / 2, "it keeps what fits: {total}");
    assert!(
        store.cache_get(&CacheKey([63; 32])).await.is_some(),
        "the newest is kept"
    );
    assert!(
        store.cache_get(&CacheKey([0; 32])).await.is_none(),
        "the one due soonest went first"
    );
}
