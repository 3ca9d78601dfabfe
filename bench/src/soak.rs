//! The soak: hundreds of concurrent requests of every kind, with random
//! app cancellations and a relay restart half-way, against the real
//! binaries. It passes when no request hung and, once the load stops, the
//! client's and relay's open streams and live tasks are back at their idle
//! level and their memory near where it started.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};

use crate::http::{HttpClient, client, drain, get};
use crate::stack::{Tunnel, TunnelOptions, Upstream};

/// Sizes and durations of one soak.
#[derive(Debug, Clone)]
pub struct SoakSettings {
    /// Length of the load phase.
    pub duration: Duration,
    /// Requests kept in flight at once.
    pub concurrency: usize,
    /// A request running longer than this counts as hung.
    pub request_limit: Duration,
    /// The relay's drain timeout on its restart.
    pub relay_drain: Duration,
    /// How far above its starting RSS a program may end, MiB.
    pub rss_slack_mib: f64,
}

/// How requests ended.
#[derive(Debug, Default)]
struct Tally {
    ok: AtomicU64,
    cancelled: AtomicU64,
    failed: AtomicU64,
    hung: AtomicU64,
}

/// One idle-level reading of a program: open streams, live tasks, RSS.
#[derive(Debug, Clone, Copy)]
struct Level {
    open_streams: u64,
    tasks: u64,
    rss_mib: f64,
}

/// The relay's latest `status` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RelayStatus {
    connections: u64,
    open_streams: u64,
    tasks: u64,
}

/// Runs the soak; returns its report, or an error naming what did not hold.
pub async fn run(bin_dir: &std::path::Path, settings: &SoakSettings) -> anyhow::Result<String> {
    let upstream = Upstream::start(bin_dir).await?;
    let options = TunnelOptions {
        relay_args: vec![
            "--drain-timeout".into(),
            settings.relay_drain.as_secs().to_string(),
            "--status-interval".into(),
            "1".into(),
            // As with api.openai.com, one HTTP/2 connection carries every
            // upstream call, so no idle HTTP/1.1 pool outlives the load.
            "--upstream-http2".into(),
        ],
        ..TunnelOptions::default()
    };
    let mut tunnel = Tunnel::start(bin_dir, &upstream.url, &options).await?;
    let idle = Idle::read(&tunnel).await?;
    let load = load(&mut tunnel, settings).await?;
    let ended = Ended::settle(&tunnel, &idle).await?;
    verdict(settings, &idle, &load, &ended)
}

/// Both programs' idle levels after a warm-up, before the load.
struct Idle {
    /// The client's.
    client: Level,
    /// The relay's status line.
    relay: RelayStatus,
    /// The relay's RSS, MiB.
    relay_rss: f64,
}

impl Idle {
    /// Warms the tunnel up, then reads the idle levels (each reading on a
    /// fresh connection, so idle app connections do not count).
    async fn read(tunnel: &Tunnel) -> anyhow::Result<Idle> {
        {
            let warm = client();
            for _ in 0..20 {
                one_request(&warm, &tunnel.url, false).await?;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let client = client_level(tunnel).await?;
        wait_relay_idle(tunnel, None, Duration::from_secs(10)).await?;
        // The status line comes at most once a second and only on a change:
        // read it again after more than one interval, so a task started late
        // by the warm-up (hyper's pool timer) is in the idle level.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let relay = wait_relay_idle(tunnel, None, Duration::from_secs(10)).await?;
        let relay_rss = tunnel.relay.rss_kib()? as f64 / 1024.0;
        Ok(Idle {
            client,
            relay,
            relay_rss,
        })
    }
}

/// What the load phase saw.
struct Load {
    /// Requests that completed, were cancelled by the app, failed, hung.
    ok: u64,
    cancelled: u64,
    failed: u64,
    hung: u64,
    /// The most open streams the client reported.
    peak_client_streams: u64,
    /// When the relay came back from its restart, from the load's start.
    restarted_at: Duration,
    /// How long the load ran.
    load_time: Duration,
}

/// Keeps `settings.concurrency` requests of every kind in flight for
/// `settings.duration`, restarting the relay half-way.
async fn load(tunnel: &mut Tunnel, settings: &SoakSettings) -> anyhow::Result<Load> {
    let http = client();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let slots: Vec<_> = (0..settings.concurrency)
        .map(|slot| {
            let (http, url) = (http.clone(), tunnel.url.clone());
            let (tally, stop) = (tally.clone(), stop.clone());
            let limit = settings.request_limit;
            tokio::spawn(async move { load_slot(slot, &http, &url, &tally, &stop, limit).await })
        })
        .collect();
    let started = Instant::now();
    tokio::time::sleep(settings.duration / 2).await;
    let mut peak_client_streams = health(&tunnel.url).await?.0;
    eprintln!(
        "passage-soak: restarting the relay (SIGTERM, drain {:?})",
        settings.relay_drain
    );
    tunnel
        .restart_relay(settings.relay_drain + Duration::from_secs(10))
        .await?;
    let restarted_at = started.elapsed();
    tokio::time::sleep(settings.duration.saturating_sub(started.elapsed())).await;
    peak_client_streams = peak_client_streams.max(health(&tunnel.url).await?.0);
    stop.store(true, Ordering::Relaxed);
    for slot in slots {
        slot.await.context("a load task panicked")?;
    }
    let load_time = started.elapsed();
    // Close the load's idle app connections, as apps going away would.
    drop(http);
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);
    Ok(Load {
        ok: count(&tally.ok),
        cancelled: count(&tally.cancelled),
        failed: count(&tally.failed),
        hung: count(&tally.hung),
        peak_client_streams,
        restarted_at,
        load_time,
    })
}

/// One slot of the load: requests of random kinds one after another until
/// `stop`, each counted by how it ended.
async fn load_slot(
    slot: usize,
    http: &HttpClient,
    url: &str,
    tally: &Tally,
    stop: &AtomicBool,
    limit: Duration,
) {
    let mut rng = fastrand::Rng::with_seed(slot as u64);
    while !stop.load(Ordering::Relaxed) {
        let kind = rng.u32(0..10);
        let outcome = tokio::time::timeout(limit, one_op(http, url, kind, &mut rng)).await;
        let counter = match &outcome {
            Ok(Ok(true)) => &tally.ok,
            Ok(Ok(false)) => &tally.cancelled,
            Ok(Err(_)) => &tally.failed,
            Err(_) => &tally.hung,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if matches!(outcome, Ok(Err(_))) {
            // A failed request (the relay restarting) is not repeated in a hot loop.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Both programs' levels once the load has stopped and they settled.
struct Ended {
    /// The client's level.
    client: Level,
    /// The relay's status line, or why it did not return to idle.
    relay: anyhow::Result<RelayStatus>,
    /// RSS at the end and at its peak, MiB.
    relay_rss: f64,
    client_peak_rss: f64,
    relay_peak_rss: f64,
}

impl Ended {
    /// Waits up to 15 s for the counts to return to their idle level, then
    /// reads where they and the memory ended.
    async fn settle(tunnel: &Tunnel, idle: &Idle) -> anyhow::Result<Ended> {
        let settle = Duration::from_secs(15);
        let deadline = Instant::now() + settle;
        let client = loop {
            let level = client_level(tunnel).await?;
            if (level.open_streams == 0 && level.tasks <= idle.client.tasks)
                || Instant::now() > deadline
            {
                break level;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let relay = wait_relay_idle(tunnel, Some(idle.relay.tasks), settle).await;
        Ok(Ended {
            client,
            relay,
            relay_rss: tunnel.relay.rss_kib()? as f64 / 1024.0,
            client_peak_rss: tunnel.client.peak_rss_kib()? as f64 / 1024.0,
            relay_peak_rss: tunnel.relay.peak_rss_kib()? as f64 / 1024.0,
        })
    }
}

/// The report, and whether the soak passed: no request hung, at most 10%
/// failed, both programs back at idle and within the RSS slack.
fn verdict(
    settings: &SoakSettings,
    idle: &Idle,
    load: &Load,
    ended: &Ended,
) -> anyhow::Result<String> {
    let Load {
        ok,
        cancelled,
        failed,
        hung,
        ..
    } = *load;
    let total = ok + cancelled + failed + hung;
    let mut report = format!(
        "soak: {} s of load, {} requests in flight at once, relay restarted (SIGTERM, --drain-timeout {}) at {:.0} s\n\
         requests: {total} ({ok} complete, {cancelled} cancelled by the app as planned, {failed} failed, {hung} hung past {:?})\n\
         client: open streams {} → peak {} → {}; tasks {} → {}; RSS {:.1} → peak {:.1} → {:.1} MiB\n",
        load.load_time.as_secs(),
        settings.concurrency,
        settings.relay_drain.as_secs(),
        load.restarted_at.as_secs_f64(),
        settings.request_limit,
        idle.client.open_streams,
        load.peak_client_streams,
        ended.client.open_streams,
        idle.client.tasks,
        ended.client.tasks,
        idle.client.rss_mib,
        ended.client_peak_rss,
        ended.client.rss_mib,
    );
    let mut problems = Vec::new();
    match &ended.relay {
        Ok(end) => report.push_str(&format!(
            "relay: idle status before (1 connection) {} streams / {} tasks → after {} connection(s), {} streams / {} tasks; RSS {:.1} MiB (first process, idle) → peak {:.1} → {:.1} MiB (restarted process, under and after its share of the load)\n",
            idle.relay.open_streams, idle.relay.tasks, end.connections, end.open_streams, end.tasks,
            idle.relay_rss, ended.relay_peak_rss, ended.relay_rss,
        )),
        Err(e) => problems.push(format!("relay: {e:#}")),
    }
    if hung > 0 {
        problems.push(format!("{hung} requests hung"));
    }
    if failed * 10 > total {
        problems.push(format!(
            "{failed} of {total} requests failed (more than 10%)"
        ));
    }
    if ended.client.open_streams != 0 || ended.client.tasks > idle.client.tasks {
        problems.push(format!(
            "the client did not return to idle: {} open streams, {} tasks (idle: {})",
            ended.client.open_streams, ended.client.tasks, idle.client.tasks
        ));
    }
    for (name, start, end) in [
        ("client", idle.client.rss_mib, ended.client.rss_mib),
        ("relay", idle.relay_rss, ended.relay_rss),
    ] {
        if end > start + settings.rss_slack_mib {
            problems.push(format!(
                "{name} RSS ended at {end:.1} MiB, more than {} MiB above its start ({start:.1} MiB)",
                settings.rss_slack_mib
            ));
        }
    }
    if problems.is_empty() {
        report.push_str("result: pass\n");
        Ok(report)
    } else {
        anyhow::bail!("{report}result: FAIL: {}", problems.join("; "))
    }
}

/// One request of kind `kind` (0-9): true if it completed, false if the
/// app gave up on it on purpose, an error if passage failed it.
async fn one_op(
    http: &HttpClient,
    base: &str,
    kind: u32,
    rng: &mut fastrand::Rng,
) -> anyhow::Result<bool> {
    match kind {
        // An endless stream the app abandons after a while.
        0..=3 => {
            let response = get(http, &format!("{base}/v1/endless?interval_ms=100")).await?;
            anyhow::ensure!(response.status() == 200, "status {}", response.status());
            let mut body = response.into_body();
            let read_for = Duration::from_millis(rng.u64(100..3000));
            let read = tokio::time::timeout(read_for, async {
                while let Some(frame) = body.frame().await {
                    frame?;
                }
                anyhow::bail!("an endless stream ended")
            })
            .await;
            match read {
                // Still streaming when the app gives up: a planned cancellation.
                Err(_) => Ok(false),
                // Cut by passage (the relay restarting).
                Ok(outcome) => outcome.map(|()| false),
            }
        }
        // A generation the app gives up on before its head arrives.
        4 => {
            let wait = Duration::from_millis(rng.u64(50..1000));
            let _ = tokio::time::timeout(wait, get(http, &format!("{base}/v1/slow-head"))).await;
            Ok(false)
        }
        // Complete streaming and plain chat completions.
        5..=7 => one_request(http, base, true).await.map(|()| true),
        _ => one_request(http, base, false).await.map(|()| true),
    }
}

/// A chat completion (streaming or not) read to its end.
async fn one_request(http: &HttpClient, base: &str, stream: bool) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "model": "gpt-soak",
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let request = Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|e| match e {})
                .boxed(),
        )?;
    let response = http.request(request).await?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    drain(response.into_body()).await?;
    Ok(())
}

/// `/healthz`'s open streams and tasks, asked on a fresh connection.
async fn health(base: &str) -> anyhow::Result<(u64, u64)> {
    let response = get(&client(), &format!("{base}/healthz")).await?;
    let bytes = response.into_body().collect().await?.to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&bytes)?;
    let field = |name: &str| {
        value[name]
            .as_u64()
            .with_context(|| format!("/healthz has no {name}: {value}"))
    };
    Ok((field("open_streams")?, field("tasks")?))
}

async fn client_level(tunnel: &Tunnel) -> anyhow::Result<Level> {
    let (open_streams, tasks) = health(&tunnel.url).await?;
    Ok(Level {
        open_streams,
        tasks,
        rss_mib: tunnel.client.rss_kib()? as f64 / 1024.0,
    })
}

/// Waits for the relay's status line to show one connection, no open
/// streams and (when given) at most `tasks` live tasks.
async fn wait_relay_idle(
    tunnel: &Tunnel,
    tasks: Option<u64>,
    limit: Duration,
) -> anyhow::Result<RelayStatus> {
    let deadline = Instant::now() + limit;
    let mut last = None;
    loop {
        let log = std::fs::read_to_string(tunnel.relay_log()).unwrap_or_default();
        last = log.lines().rev().find_map(parse_status).or(last);
        if let Some(status) = last
            && status.connections == 1
            && status.open_streams == 0
            && tasks.is_none_or(|tasks| status.tasks <= tasks)
        {
            return Ok(status);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the relay did not return to idle within {limit:?}; last status {last:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads `connections=… open_streams=… tasks=…` from a relay `status` log line.
fn parse_status(line: &str) -> Option<RelayStatus> {
    if !line.contains(" status ") && !line.ends_with(" status") {
        return None;
    }
    let field = |name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(RelayStatus {
        connections: field("connections")?,
        open_streams: field("open_streams")?,
        tasks: field("tasks")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_status_lines_are_read() {
        let line = "2026-11-25T17:16:34.159467Z  INFO passage_relay::listener: status connections=1 open_streams=0 tasks=7";
        assert_eq!(
            parse_status(line),
            Some(RelayStatus {
                connections: 1,
                open_streams: 0,
                tasks: 7
            })
        );
        assert_eq!(parse_status("INFO passage_relay: relay serving"), None);
    }
}
