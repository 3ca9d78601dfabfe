//! Scenario 9, teams (issue 17's targets): what the shared state costs a
//! request (Redis against the embedded store, the embedded ledger against
//! none), what a cache hit saves against a miss, and how soon 1,000
//! streams start against an upstream that caps the streams of one HTTP/2
//! connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::report::{Section, fixed};
use crate::stack::{Proc, Tunnel, TunnelOptions, Upstream, find_program, free_port};
use crate::stats::percentile;
use crate::{Bench, Settings};

/// Redis's added p50 per request above the embedded store, µs, at most.
const TARGET_REDIS_US: f64 = 150.0;
/// The embedded ledger's added p50 per request, µs, at most.
const TARGET_LEDGER_US: f64 = 20.0;
/// A cache hit's p50 against a miss's, at most.
const TARGET_HIT_RATIO: f64 = 0.5;
/// Streams opened at once against the capped upstream.
const LANE_STREAMS: usize = 1000;
/// Their slowest first byte, at most.
const TARGET_LANES: Duration = Duration::from_secs(1);

/// Limits high enough never to refuse, so that every request runs the
/// admission and settlement paths (the worst case: a lease and token
/// windows); the cache only for requests that ask.
const RULES: &str = "[clients.bench]\n\
    requests_per_minute = 4000000000\n\
    concurrent_requests = 100000\n\
    tokens_per_minute = 1000000000000\n\
    tokens_per_day = 1000000000000\n\
    cache = \"opt-in\"\n";

/// The same client under one limit only: one Lua call per request, no
/// lease, no token windows.
const RPM_ONLY: &str = "[clients.bench]\nrequests_per_minute = 4000000000\n";

/// Round trips (µs) of `n` PINGs to the Redis at `addr`, one at a time:
/// what any Redis call costs on this machine, the floor of the Redis rows.
async fn redis_pings(addr: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut reply = [0u8; 7];
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n + 50 {
        let started = Instant::now();
        stream.write_all(b"PING\r\n").await?;
        stream.read_exact(&mut reply).await?;
        anyhow::ensure!(&reply == b"+PONG\r\n", "no PONG");
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    Ok(samples.split_off(50))
}

/// One keep-alive HTTP/1.1 connection, as an SDK holds one.
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Connection {
    async fn open(addr: SocketAddr) -> anyhow::Result<Connection> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Connection { sender, task, addr })
    }

    /// Microseconds for one chat completion with `body`, read to its end.
    async fn time(&mut self, body: &str, cache: bool) -> anyhow::Result<f64> {
        let mut request = Request::post("/v1/chat/completions")
            .header("host", self.addr.to_string())
            .header("content-type", "application/json");
        if cache {
            request = request.header("x-passage-cache", "use");
        }
        let request = request.body(Full::new(Bytes::from(body.to_owned())))?;
        let started = Instant::now();
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        anyhow::ensure!(response.status() == 200, "status {}", response.status());
        response.into_body().collect().await?;
        Ok(started.elapsed().as_secs_f64() * 1e6)
    }
}

fn chat_body(tag: usize) -> String {
    format!(r#"{{"model":"gpt-bench","messages":[{{"role":"user","content":"hi {tag}"}}]}}"#)
}

/// A redis-server of the benchmark's own on a free port, listening, or why not.
async fn start_redis() -> anyhow::Result<(Proc, String, tempfile::TempDir)> {
    let program = find_program("redis-server")
        .ok_or_else(|| anyhow::anyhow!("redis-server is not installed"))?;
    let port = free_port(false)?;
    let dir = tempfile::tempdir()?;
    let proc = Proc::spawn(
        "redis-server",
        tokio::process::Command::new(program)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    )?;
    crate::stack::wait_listening("redis-server", port).await?;
    Ok((proc, format!("redis://127.0.0.1:{port}"), dir))
}

/// Latencies (µs) of sequential completions through each of `addrs`,
/// the tunnels taking turns request by request so that they share the
/// machine's noise alike.
async fn interleaved(addrs: &[SocketAddr], n: usize) -> anyhow::Result<Vec<Vec<f64>>> {
    let mut connections = Vec::new();
    for addr in addrs {
        connections.push(Connection::open(*addr).await?);
    }
    let mut samples = vec![Vec::with_capacity(n); addrs.len()];
    // Unmeasured warm-up on each.
    for connection in &mut connections {
        for _ in 0..50 {
            connection.time(&chat_body(0), false).await?;
        }
    }
    for i in 0..n {
        for (connection, samples) in connections.iter_mut().zip(&mut samples) {
            samples.push(connection.time(&chat_body(i), false).await?);
        }
    }
    Ok(samples)
}

/// The slowest first byte of `n` streaming requests sent at once, each on
/// an app connection of its own made beforehand (so that the figure is
/// the requests', not the accept queue's).
async fn slowest_start(addr: SocketAddr, n: usize) -> anyhow::Result<Duration> {
    let connected = futures_util::future::join_all((0..n).map(|_| async move {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        anyhow::Ok((sender, task))
    }))
    .await;
    let mut senders = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    for result in connected {
        let (sender, task) = result?;
        senders.push(sender);
        tasks.push(task);
    }
    let started = Instant::now();
    let opened = futures_util::future::join_all(senders.into_iter().map(|mut sender| async move {
        let request = Request::get("/v1/endless?interval_ms=10000")
            .header("host", addr.to_string())
            .body(Full::new(Bytes::new()))?;
        let response = sender.send_request(request).await?;
        anyhow::ensure!(response.status() == 200, "status {}", response.status());
        let mut body = response.into_body();
        let first = tokio::time::timeout(Duration::from_secs(30), body.frame()).await;
        anyhow::ensure!(matches!(first, Ok(Some(Ok(_)))), "no first event");
        Ok((started.elapsed(), body))
    }))
    .await;
    let mut slowest = Duration::ZERO;
    let mut held = Vec::with_capacity(n);
    for result in opened {
        let (after, body) = result?;
        slowest = slowest.max(after);
        held.push(body);
    }
    for task in tasks {
        task.abort();
    }
    Ok(slowest)
}

fn p50(samples: &[f64]) -> f64 {
    percentile(samples, 50.0)
}

/// Runs the scenario.
pub async fn run(bench: &Bench, settings: &Settings) -> anyhow::Result<Section> {
    let n = if settings.quick { 100 } else { 3000 };
    let lane_streams = if settings.quick { 200 } else { LANE_STREAMS };
    let mut section = Section {
        title: "9. Teams: shared state, ledger, cache, upstream lanes".into(),
        method: method(n, lane_streams),
        ..Section::default()
    };
    section.table.push(
        ["what", "p50 (µs)", "p90 (µs)", "against"]
            .map(String::from)
            .to_vec(),
    );
    let tunnels = StateTunnels::start(bench).await?;
    state_costs(&mut section, &tunnels, n).await?;
    cache(&mut section, tunnels.ledger.addr, bench.upstream.addr, n).await?;
    drop(tunnels);
    lanes(&mut section, bench, lane_streams).await?;
    Ok(section)
}

/// The section's method paragraph, for `n` requests per row and
/// `lane_streams` streams opened at once.
fn method(n: usize, lane_streams: usize) -> String {
    format!(
        "Four fresh tunnels to the fixed-answer mock, the client under limits that never \
         refuse (so every request is admitted and settled by the store): the embedded store \
         with `--no-ledger`, the embedded store with its SQLite ledger (the default), and \
         `--state redis://` on a local redis-server (Debian's), once under all four limits \
         (one Lua call per request carrying the previous request's settlement: lease and \
         tokens) and once under `requests_per_minute` alone. {n} sequential small chat \
         completions on one keep-alive connection each, the four taking turns request by \
         request after 50 unmeasured ones; p50 of each, and the differences; then {n} bare \
         PINGs to the same Redis from the benchmark, the floor of any Redis call here. Cache: on the \
         ledger tunnel, with `cache = \"opt-in\"` and `x-passage-cache: use`, {n} misses \
         (each body unique) and {n} hits (one body, kept) taking turns; and the same requests \
         straight to the mock, the floor. Lanes: {lane_streams} streaming requests opened at \
         once through a tunnel with `--upstream-http2` to a mock that allows 100 streams per \
         HTTP/2 connection, against the same through one to a mock that allows 10,000; each \
         on an app connection made beforehand, the slowest first byte from the moment all \
         were sent."
    )
}

/// The tunnels whose state backends the scenario compares, and the Redis
/// behind the shared ones.
struct StateTunnels {
    /// The embedded store with `--no-ledger`.
    no_ledger: Tunnel,
    /// The embedded store with its SQLite ledger (the default).
    ledger: Tunnel,
    /// `--state redis://` under all four limits, then under one; empty
    /// when Redis could not start.
    shared: Vec<Tunnel>,
    /// The redis-server, its URL and its directory, or why it did not start.
    redis: anyhow::Result<(Proc, String, tempfile::TempDir)>,
    /// The relays' config files.
    _configs: tempfile::TempDir,
}

impl StateTunnels {
    /// Starts Redis (if it can) and the tunnels, each to the bench's upstream.
    async fn start(bench: &Bench) -> anyhow::Result<StateTunnels> {
        let configs = tempfile::tempdir()?;
        let config = configs.path().join("relay.toml");
        std::fs::write(&config, RULES)?;
        let rpm_only = configs.path().join("rpm-only.toml");
        std::fs::write(&rpm_only, RPM_ONLY)?;
        let with_config = |file: &std::path::Path, more: &[&str]| TunnelOptions {
            relay_args: ["--config", &file.display().to_string()]
                .iter()
                .chain(more)
                .map(|s| (*s).to_owned())
                .collect(),
            ..TunnelOptions::default()
        };
        let start = |options: TunnelOptions| async move {
            Tunnel::start(&bench.bin_dir, &bench.upstream.url, &options).await
        };
        let redis = start_redis().await;
        let no_ledger = start(with_config(&config, &["--no-ledger"])).await?;
        let ledger = start(with_config(&config, &[])).await?;
        let mut shared = Vec::new();
        if let Ok((_, url, _)) = &redis {
            for file in [&config, &rpm_only] {
                shared.push(start(with_config(file, &["--state", url])).await?);
            }
        }
        Ok(StateTunnels {
            no_ledger,
            ledger,
            shared,
            redis,
            _configs: configs,
        })
    }

    /// The app-side addresses, in the order of the table's rows.
    fn addrs(&self) -> Vec<SocketAddr> {
        [&self.no_ledger, &self.ledger]
            .into_iter()
            .chain(&self.shared)
            .map(|tunnel| tunnel.addr)
            .collect()
    }
}

/// Rows and targets for what each state backend adds per request, and the
/// bare Redis round trip beneath them.
async fn state_costs(
    section: &mut Section,
    tunnels: &StateTunnels,
    n: usize,
) -> anyhow::Result<()> {
    if let Err(e) = &tunnels.redis {
        section
            .notes
            .push(format!("The Redis rows were skipped: {e}."));
    }
    let samples = interleaved(&tunnels.addrs(), n).await?;
    let names = [
        "embedded, --no-ledger",
        "embedded, SQLite ledger (default)",
        "--state redis://, all four limits",
        "--state redis://, requests_per_minute only",
    ];
    for (i, row) in samples.iter().enumerate() {
        // Each row against the one it adds to: the ledger against none,
        // Redis against the embedded store with its ledger.
        let against = match i {
            0 => "-".to_owned(),
            _ => format!(
                "{:+.0} µs against {}",
                p50(row) - p50(&samples[1.min(i - 1)]),
                names[1.min(i - 1)]
            ),
        };
        section.table.push(vec![
            names[i].to_owned(),
            fixed(p50(row), 0),
            fixed(percentile(row, 90.0), 0),
            against,
        ]);
    }
    if let Ok((_, url, _)) = &tunnels.redis {
        let pings = redis_pings(url.trim_start_matches("redis://"), n).await?;
        section.table.push(vec![
            "a bare Redis PING round trip (the floor of a Redis call)".to_owned(),
            fixed(p50(&pings), 0),
            fixed(percentile(&pings, 90.0), 0),
            String::new(),
        ]);
    }
    let ledger_cost = p50(&samples[1]) - p50(&samples[0]);
    section.target(
        "the embedded ledger's added p50 per request",
        format!("{ledger_cost:.0} µs"),
        "≤ 20 µs",
        ledger_cost <= TARGET_LEDGER_US,
    );
    if let Some(redis_samples) = samples.get(2) {
        let redis_cost = p50(redis_samples) - p50(&samples[1]);
        section.target(
            "Redis's added p50 per request (against the embedded store; all four limits)",
            format!("{redis_cost:.0} µs"),
            "≤ 150 µs",
            redis_cost <= TARGET_REDIS_US,
        );
    }
    Ok(())
}

/// Rows and the target for cache hits against misses through the tunnel
/// at `tunnel`, with the upstream at `upstream` straight as the floor.
async fn cache(
    section: &mut Section,
    tunnel: SocketAddr,
    upstream: SocketAddr,
    n: usize,
) -> anyhow::Result<()> {
    let mut through = Connection::open(tunnel).await?;
    let mut direct = Connection::open(upstream).await?;
    let kept = chat_body(usize::MAX);
    through.time(&kept, true).await?;
    let (mut hits, mut misses, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        misses.push(through.time(&chat_body(1_000_000 + i), true).await?);
        hits.push(through.time(&kept, true).await?);
        floor.push(direct.time(&chat_body(i), false).await?);
    }
    for (name, row, against) in [
        ("cache miss (through the tunnel)", &misses, String::new()),
        (
            "cache hit (through the tunnel)",
            &hits,
            format!("{:.2}× the miss", p50(&hits) / p50(&misses)),
        ),
        ("the mock upstream straight", &floor, String::new()),
    ] {
        section.table.push(vec![
            name.to_owned(),
            fixed(p50(row), 0),
            fixed(percentile(row, 90.0), 0),
            against,
        ]);
    }
    let ratio = p50(&hits) / p50(&misses);
    section.target(
        "a cache hit's p50 against a miss's",
        format!("{ratio:.2}×"),
        "≤ 0.5×",
        ratio <= TARGET_HIT_RATIO,
    );
    Ok(())
}

/// Rows and the target for `lane_streams` streams opened at once to an
/// upstream that caps the streams of one HTTP/2 connection at 100, against
/// one that allows 10,000.
async fn lanes(section: &mut Section, bench: &Bench, lane_streams: usize) -> anyhow::Result<()> {
    let capped = Upstream::start_with(&bench.bin_dir, None, &["--h2-streams", "100"]).await?;
    let h2 = TunnelOptions {
        relay_args: vec!["--upstream-http2".into()],
        ..TunnelOptions::default()
    };
    let to_capped = Tunnel::start(&bench.bin_dir, &capped.url, &h2).await?;
    let to_roomy = Tunnel::start(&bench.bin_dir, &bench.upstream.url, &h2).await?;
    let roomy = slowest_start(to_roomy.addr, lane_streams).await?;
    let lanes = slowest_start(to_capped.addr, lane_streams).await?;
    for (name, slowest) in [
        ("upstream allows 10,000 streams per connection", roomy),
        ("upstream allows 100 streams per connection", lanes),
    ] {
        section.table.push(vec![
            format!("{lane_streams} streams, slowest first byte: {name}"),
            fixed(slowest.as_secs_f64() * 1e6, 0),
            String::new(),
            String::new(),
        ]);
    }
    section.target(
        &format!(
            "{lane_streams} streams to an upstream capped at 100 per connection: slowest first byte"
        ),
        format!("{:.0} ms", lanes.as_secs_f64() * 1e3),
        "≤ 1 s (at 1,000 streams)",
        lanes <= TARGET_LANES,
    );
    Ok(())
}
