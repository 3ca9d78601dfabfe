//! Scenario 8, WebSocket sessions: the added latency of a message through
//! the tunnel, against the same session straight to the upstream, and the
//! resident memory of many idle sessions (issue 16's targets).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::report::{Section, fixed};
use crate::stack::{Tunnel, TunnelOptions};
use crate::stats::percentile;
use crate::{Bench, Settings};

/// Added latency per message above which the target is missed, µs (p50).
const TARGET_ADDED_P50_US: f64 = 150.0;
/// Growth of client + relay for the idle sessions, MiB, at most.
const TARGET_IDLE_MIB: f64 = 50.0;
/// Idle sessions the memory target is set for.
const TARGET_IDLE_SESSIONS: usize = 500;

/// Opens a session on `/v1/realtime` at `addr` and reads its greeting.
async fn open(addr: SocketAddr) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let url = format!("ws://{addr}/v1/realtime?model=gpt-realtime");
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
    match ws.next().await {
        Some(Ok(Message::Text(_))) => Ok(ws),
        other => anyhow::bail!("no session.created: {other:?}"),
    }
}

/// Round-trip times (µs) of `n` echoed 100-byte text messages, one at a time.
async fn echo_rtts(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut ws = open(addr).await?;
    let text = "x".repeat(100);
    let mut rtts = Vec::with_capacity(n);
    // A few unmeasured messages warm both paths.
    for i in 0..n + 20 {
        let sent = Instant::now();
        ws.send(Message::text(text.clone())).await?;
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(echo)))) if echo.len() == text.len() => {}
            other => anyhow::bail!("no echo: {other:?}"),
        }
        if i >= 20 {
            rtts.push(sent.elapsed().as_secs_f64() * 1e6);
        }
    }
    ws.close(None).await?;
    Ok(rtts)
}

/// Growth of client and relay RSS (KiB) while `n` idle sessions are open,
/// on a fresh tunnel: the shared one's allocators hold memory from the
/// scenarios before (bulk transfers), which would hide the sessions.
async fn idle_growth(bench: &Bench, n: usize) -> anyhow::Result<(u64, u64)> {
    let tunnel = Tunnel::start(
        &bench.bin_dir,
        &bench.upstream.url,
        &TunnelOptions::default(),
    )
    .await?;
    let addr: SocketAddr = tunnel.url.trim_start_matches("http://").parse()?;
    // One session first, closed: both processes' allocators are warm.
    drop(open(addr).await?);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (client_before, relay_before) = tunnel.rss_kib()?;
    let mut sessions = Vec::with_capacity(n);
    for batch in (0..n).collect::<Vec<_>>().chunks(64) {
        let opened = futures_util::future::join_all(batch.iter().map(|_| open(addr))).await;
        for session in opened {
            sessions.push(session?);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (client_during, relay_during) = tunnel.rss_kib()?;
    drop(sessions);
    Ok((
        client_during.saturating_sub(client_before),
        relay_during.saturating_sub(relay_before),
    ))
}

/// Runs the scenario.
pub async fn run(bench: &Bench, settings: &Settings) -> anyhow::Result<Section> {
    let messages = if settings.quick { 200 } else { 2000 };
    let rounds = settings.rounds;
    let sessions = if settings.quick {
        50
    } else {
        TARGET_IDLE_SESSIONS
    };
    let passage: SocketAddr = bench.tunnel.url.trim_start_matches("http://").parse()?;
    let direct = bench.upstream.addr;
    let mut section = Section {
        title: "8. WebSocket sessions (Realtime)".into(),
        method: format!(
            "A session on `/v1/realtime` of the mock upstream, straight to it (direct) and through \
             passage (QUIC, default settings), in {rounds} alternating rounds; in each, {messages} \
             text messages of 100 bytes, one at a time, each echoed by the upstream before the \
             next (20 more first, unmeasured). A message's latency through passage is taken as \
             half the added round trip (the message goes up and its echo comes down the same \
             way). p50/p99 over all rounds. Idle sessions: {sessions} sessions opened through \
             a fresh passage tunnel (64 at a time, each confirmed by its `session.created`), then \
             held; VmRSS of client and relay before (one warm session, closed) and while all are \
             open."
        ),
        ..Section::default()
    };
    let (mut direct_rtts, mut passage_rtts) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        direct_rtts.extend(echo_rtts(direct, messages).await?);
        passage_rtts.extend(echo_rtts(passage, messages).await?);
    }
    section.table.push(
        ["path", "round trip p50 (µs)", "round trip p99 (µs)"]
            .map(String::from)
            .to_vec(),
    );
    for (name, rtts) in [("direct", &direct_rtts), ("passage", &passage_rtts)] {
        section.table.push(vec![
            name.to_owned(),
            fixed(percentile(rtts, 50.0), 0),
            fixed(percentile(rtts, 99.0), 0),
        ]);
    }
    let added_p50 = (percentile(&passage_rtts, 50.0) - percentile(&direct_rtts, 50.0)) / 2.0;
    let added_p99 = (percentile(&passage_rtts, 99.0) - percentile(&direct_rtts, 99.0)) / 2.0;
    section.notes.push(format!(
        "Added per message (half the added round trip): p50 {added_p50:.0} µs, p99 {added_p99:.0} µs."
    ));
    section.target(
        "WebSocket added latency per message, p50",
        format!("{added_p50:.0} µs"),
        &format!("≤ {TARGET_ADDED_P50_US:.0} µs"),
        added_p50 <= TARGET_ADDED_P50_US,
    );

    let (client_kib, relay_kib) = idle_growth(bench, sessions).await?;
    let total_mib = (client_kib + relay_kib) as f64 / 1024.0;
    section.notes.push(format!(
        "{sessions} idle sessions: client +{:.1} MiB ({:.1} KiB each), relay +{:.1} MiB ({:.1} KiB each).",
        client_kib as f64 / 1024.0,
        client_kib as f64 / sessions as f64,
        relay_kib as f64 / 1024.0,
        relay_kib as f64 / sessions as f64,
    ));
    // The target is for 500 sessions; a smaller run scales it.
    let goal_mib = TARGET_IDLE_MIB * sessions as f64 / TARGET_IDLE_SESSIONS as f64;
    section.target(
        &format!("{sessions} idle WebSocket sessions: client + relay growth"),
        format!("{total_mib:.1} MiB"),
        &format!("≤ {goal_mib:.0} MiB"),
        total_mib <= goal_mib,
    );
    Ok(section)
}
