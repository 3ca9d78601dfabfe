//! The scenarios: each imposes a bad network (or a relay's death) on a
//! fresh client, measures what an app sees and records rows for the table.
//! A scenario that errors or overruns its time limit becomes a failed row.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::app::Client;
use super::bed::{CLIENT_ADDR, Impairment, MOVED_CLIENT_ADDR};
use super::procs::{Outcome, Stack, Transport};
use super::relay_faults::{doctor, relay_dead, relay_restart};

/// Scenario groups, in run order (names for `--only`).
pub const GROUPS: [&str; 8] = [
    "udp-blocked-start",
    "tcp-blocked",
    "udp-blocked-mid",
    "loss",
    "address-change",
    "relay-restart",
    "relay-dead",
    "doctor",
];

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was done.
    pub scenario: String,
    /// What must hold.
    pub target: String,
    /// What was seen.
    pub measured: String,
    /// Whether it held.
    pub pass: bool,
}

impl Row {
    pub(super) fn new(
        scenario: impl Into<String>,
        target: &str,
        measured: String,
        pass: bool,
    ) -> Row {
        Row {
            scenario: scenario.into(),
            target: target.to_owned(),
            measured,
            pass,
        }
    }

    pub(super) fn not_in_build(scenario: impl Into<String>, target: &str) -> Row {
        Row::new(
            scenario,
            target,
            "not run: this build has no TCP transport (passage-client run --transport, relay TCP listener)"
                .to_owned(),
            false,
        )
    }
}

/// The longest a group may run before it counts as failed.
fn time_limit(group: &str) -> Duration {
    Duration::from_secs(match group {
        "udp-blocked-mid" => 130,
        "loss" => 240,
        _ => 60,
    })
}

/// Runs `groups` in order, appending their rows to `rows`; between groups
/// the network is cleared, the client's address reset and the relay restarted
/// if it is down.
pub async fn run_all(
    stack: &mut Stack,
    groups: &[String],
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    for group in groups {
        note!("hostile-net: {group}");
        let before = rows.len();
        let limit = time_limit(group);
        match tokio::time::timeout(limit, run_group(group, stack, rows)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => rows.push(Row::new(
                group.as_str(),
                "runs",
                format!("error: {e:#}"),
                false,
            )),
            Err(_) => rows.push(Row::new(
                group.as_str(),
                "runs",
                format!("did not finish within {limit:?}"),
                false,
            )),
        }
        for row in &rows[before..] {
            let verdict = if row.pass { "pass" } else { "FAIL" };
            note!("  {verdict}: {}: {}", row.scenario, row.measured);
        }
        stack.bed.impose(Impairment::None)?;
        stack.bed.reset_client_address()?;
        stack.ensure_relay()?;
    }
    Ok(())
}

async fn run_group(group: &str, stack: &mut Stack, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    match group {
        "udp-blocked-start" => udp_blocked_start(stack, rows).await,
        "tcp-blocked" => tcp_blocked(stack, rows).await,
        "udp-blocked-mid" => udp_blocked_mid(stack, rows).await,
        "loss" => per_transport(stack, rows, "loss", loss).await,
        "address-change" => per_transport(stack, rows, "address change", address_change).await,
        "relay-restart" => per_transport(stack, rows, "relay restart", relay_restart).await,
        "relay-dead" => per_transport(stack, rows, "relay dead", relay_dead).await,
        "doctor" => doctor(stack, rows).await,
        other => anyhow::bail!("unknown scenario {other:?}; known: {}", GROUPS.join(", ")),
    }
}

/// The two forced transports a per-transport group runs on.
const TRANSPORTS: [Transport; 2] = [Transport::Quic, Transport::Tcp];

/// Runs `scenario` once per transport; an error on one becomes its row.
async fn per_transport<F>(
    stack: &mut Stack,
    rows: &mut Vec<Row>,
    label: &str,
    scenario: F,
) -> anyhow::Result<()>
where
    F: AsyncFn(&mut Stack, &mut Vec<Row>, Transport) -> anyhow::Result<()>,
{
    for transport in TRANSPORTS {
        if let Err(e) = scenario(stack, rows, transport).await {
            rows.push(Row::new(
                format!("{label} [{}]", transport.name()),
                "runs",
                format!("error: {e:#}"),
                false,
            ));
        }
        stack.bed.impose(Impairment::None)?;
        stack.bed.reset_client_address()?;
        stack.ensure_relay()?;
    }
    Ok(())
}

/// How long to wait for a fresh client's tunnel before the scenario starts.
const UP_LIMIT: Duration = Duration::from_secs(10);

/// Starts a client on `transport` and waits until its tunnel is up on it.
pub(super) async fn client_on(stack: &mut Stack, transport: Transport) -> anyhow::Result<Client> {
    let client = stack.start_client(transport)?;
    client.wait_on(transport, UP_LIMIT).await?;
    Ok(client)
}

async fn udp_blocked_start(stack: &mut Stack, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    stack.bed.impose(Impairment::BlockUdp)?;
    let client = stack.start_client(Transport::Auto)?;
    let outcome = client.first_chat(Duration::from_secs(15)).await;
    let secs = outcome.secs_since(client.started);
    let transport = transport_label(client.transport().await);
    rows.push(Row::new(
        "UDP blocked from the start [auto]",
        "first request 200 ≤ 3 s after the client starts",
        format!("{} after {secs:.2} s ({transport})", outcome.detail),
        outcome.ok && secs <= 3.0,
    ));
    Ok(())
}

async fn tcp_blocked(stack: &mut Stack, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    const ROUNDS: usize = 3;
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut problems = Vec::new();
    for _ in 0..ROUNDS {
        for (i, impairment) in [Impairment::None, Impairment::BlockTcp]
            .into_iter()
            .enumerate()
        {
            stack.bed.impose(impairment)?;
            let client = stack.start_client(Transport::Auto)?;
            let outcome = client.first_chat(Duration::from_secs(10)).await;
            times[i].push(outcome.secs_since(client.started));
            // Still on QUIC a moment later: no switch to a (blocked) TCP.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let transport = client.transport().await;
            let label = if i == 0 { "no rules" } else { "TCP blocked" };
            if !outcome.ok {
                problems.push(format!("{label}: {}", outcome.detail));
            } else if transport.as_deref() != Some("quic") {
                problems.push(format!("{label}: on {}", transport_label(transport)));
            }
        }
    }
    let [plain, blocked] = times.map(median);
    let mut measured =
        format!("{blocked:.2} s vs {plain:.2} s with no rules (medians of {ROUNDS}), quic");
    if !problems.is_empty() {
        measured = format!("{measured}; {}", problems.join("; "));
    }
    rows.push(Row::new(
        "TCP blocked, UDP open [auto]",
        "stays on QUIC; first 200 no later than with no rules (+0.1 s)",
        measured,
        problems.is_empty() && blocked <= plain + 0.1,
    ));
    Ok(())
}

async fn udp_blocked_mid(stack: &mut Stack, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    const REQUESTS: u32 = 32;
    const SPACING: Duration = Duration::from_millis(250);
    let mid = "UDP blocked mid-session [auto]";
    let mid_target = "every new request 200; all answered ≤ 6 s after the block";
    let back = "UDP unblocked again [auto]";
    let back_target = "new requests on QUIC again ≤ 70 s after the unblock";

    // With auto, the client must start on QUIC for the block to mean anything.
    let client = stack.start_client(Transport::Auto)?;
    client
        .wait_on(Transport::Quic, UP_LIMIT)
        .await
        .map_err(|e| e.context("the auto client did not come up on QUIC"))?;
    let warm = client.chat(Duration::from_secs(5)).await;
    anyhow::ensure!(warm.ok, "request before the block: {}", warm.detail);

    let block = Instant::now();
    stack.bed.impose(Impairment::BlockUdp)?;
    let outcomes = join_all((0..REQUESTS).map(|i| {
        let client = &client;
        async move {
            tokio::time::sleep(SPACING * i).await;
            client.chat(Duration::from_secs(15)).await
        }
    }))
    .await;
    let transport = client.transport().await;
    let first_ok = outcomes.iter().filter(|o| o.ok).map(|o| o.ended).min();
    // The requests that waited: those sent before the first answer came back.
    let answered_by = first_ok.map(|first| {
        outcomes
            .iter()
            .filter(|o| o.sent <= first)
            .map(|o| o.secs_since(block))
            .fold(0.0, f64::max)
    });
    let failed = summarize_failures(&outcomes);
    let measured = match (answered_by, failed.is_empty()) {
        (Some(by), true) => format!(
            "all {REQUESTS} 200; the waiting ones answered by {by:.2} s (now on {})",
            transport_label(transport.clone())
        ),
        (Some(by), false) => format!(
            "{failed}; first 200 by {by:.2} s (now on {})",
            transport_label(transport.clone())
        ),
        (None, _) => format!("no request answered 200: {failed}"),
    };
    rows.push(Row::new(
        mid,
        mid_target,
        measured,
        failed.is_empty() && answered_by.is_some_and(|by| by <= 6.0),
    ));

    if transport.as_deref() != Some("tcp") {
        rows.push(Row::new(
            back,
            back_target,
            format!(
                "not measurable: the client was not on TCP before the unblock ({})",
                transport_label(transport)
            ),
            false,
        ));
        return Ok(());
    }
    back_to_quic(stack, &client, back, back_target, rows).await
}

/// Lifts the UDP block and times the auto client's way back to QUIC
/// (its probes find the path again), then checks a request on it.
async fn back_to_quic(
    stack: &mut Stack,
    client: &Client,
    back: &str,
    back_target: &str,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let probes_before = client.counter("passage_client_quic_probes_total").await;
    let unblock = Instant::now();
    stack.bed.impose(Impairment::None)?;
    let limit = Duration::from_secs(75);
    let mut on_quic = None;
    while unblock.elapsed() < limit {
        if client.transport().await.as_deref() == Some("quic") {
            on_quic = Some(unblock.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let probes = client.counter("passage_client_quic_probes_total").await - probes_before;
    let after = client.chat(Duration::from_secs(5)).await;
    let measured = match on_quic {
        Some(secs) => format!(
            "on QUIC after {secs:.1} s (QUIC probes: {probes}); next request {}",
            after.detail
        ),
        None => format!("still not on QUIC after {limit:?} (QUIC probes: {probes})"),
    };
    rows.push(Row::new(
        back,
        back_target,
        measured,
        after.ok && on_quic.is_some_and(|secs| secs <= 70.0),
    ));
    Ok(())
}

/// Loss levels: percent dropped each way, and the download's size. TCP is
/// slow at 20% both ways on any stack (retransmission timeouts back off:
/// 1 MiB took 80 s with curl over this veth), so that level downloads less.
const LOSS_LEVELS: [(u8, u64); 2] = [(5, 4 << 20), (20, 256 << 10)];

async fn loss(stack: &mut Stack, rows: &mut Vec<Row>, transport: Transport) -> anyhow::Result<()> {
    const STREAMS: usize = 8;
    const LIMIT: Duration = Duration::from_secs(90);
    let target = |bytes: u64| {
        format!(
            "every stream intact ({STREAMS} streamed chats, a {} download with every byte checked)",
            size(bytes)
        )
    };
    let t = transport.name();
    if !stack.caps.supports(transport) {
        for (percent, bytes) in LOSS_LEVELS {
            rows.push(Row::not_in_build(
                format!("{percent}% loss both ways [{t}]"),
                &target(bytes),
            ));
        }
        return Ok(());
    }
    let client = client_on(stack, transport).await?;
    for (percent, bytes) in LOSS_LEVELS {
        let scenario = format!("{percent}% loss both ways [{t}]");
        // The previous level may have left the tunnel reconnecting.
        if let Err(e) = client.wait_on(transport, UP_LIMIT).await {
            rows.push(Row::new(
                scenario,
                &target(bytes),
                format!("not run: {e:#}"),
                false,
            ));
            continue;
        }
        let reconnects_before = client
            .counter("passage_client_tunnel_reconnects_total")
            .await;
        stack.bed.impose(Impairment::Loss(percent))?;
        let start = Instant::now();
        let (streams, download) = tokio::join!(
            join_all((0..STREAMS).map(|_| client.stream_chat(LIMIT))),
            client.download(bytes, LIMIT),
        );
        let secs = start.elapsed().as_secs_f64();
        let (seen, dropped) = stack.bed.packet_counts();
        stack.bed.impose(Impairment::None)?;
        // A link the loss broke reconnects only now: count that too.
        let _ = client.wait_on(transport, UP_LIMIT).await;
        let reconnects = client
            .counter("passage_client_tunnel_reconnects_total")
            .await
            - reconnects_before;
        let intact = streams.iter().filter(|o| o.ok).count();
        let mut measured = format!(
            "{intact}/{STREAMS} streams, download {} in {secs:.1} s; {dropped} of {seen} packets dropped, {reconnects} reconnects",
            if download.ok { "intact" } else { "broken" }
        );
        let broken: Vec<&Outcome> = streams
            .iter()
            .chain([&download])
            .filter(|o| !o.ok)
            .collect();
        if let Some(first) = broken.first() {
            measured = format!("{measured}; first failure: {}", first.detail);
        }
        rows.push(Row::new(
            scenario,
            &target(bytes),
            measured,
            broken.is_empty(),
        ));
    }
    Ok(())
}

async fn address_change(
    stack: &mut Stack,
    rows: &mut Vec<Row>,
    transport: Transport,
) -> anyhow::Result<()> {
    const EVENTS: u64 = 60;
    let t = transport.name();
    let name = format!("client address change mid-stream [{t}]");
    let target = match transport {
        Transport::Tcp => {
            "tunnel reconnects: a request sent right after the change 200 ≤ 6 s (retried if never delivered)"
        }
        _ => "in-flight stream intact; a request sent right after the change 200 ≤ 6 s",
    };
    if !stack.caps.supports(transport) {
        rows.push(Row::not_in_build(name, target));
        return Ok(());
    }
    let client = client_on(stack, transport).await?;
    let bed = stack.bed.clone();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let stream = client.stamped(EVENTS, 50, Duration::from_secs(20), Some(first_tx));
    let change = async {
        first_rx
            .await
            .map_err(|_| anyhow::anyhow!("the stream broke before its first event"))?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let changed = Instant::now();
        bed.move_client_address(CLIENT_ADDR, MOVED_CLIENT_ADDR)?;
        let request = client.chat(Duration::from_secs(15)).await;
        anyhow::Ok((changed, request))
    };
    let (stream, change) = tokio::join!(stream, change);
    let (changed, request) = change?;
    let secs = request.secs_since(changed);
    let request_text = format!("request after the change {} in {secs:.2} s", request.detail);
    let request_ok = request.ok && secs <= 6.0;
    let (measured, pass) = match transport {
        Transport::Tcp => (
            format!(
                "{request_text}; in-flight stream {} (not required on TCP)",
                stream.detail
            ),
            request_ok,
        ),
        _ => (
            format!("stream {}; {request_text}", stream.detail),
            stream.ok && request_ok,
        ),
    };
    rows.push(Row::new(name, target, measured, pass));
    Ok(())
}

/// `3/32 failed: 503 tunnel_unavailable ×3`, or empty when none failed.
pub(super) fn summarize_failures(outcomes: &[Outcome]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for outcome in outcomes.iter().filter(|o| !o.ok) {
        *counts.entry(outcome.detail.as_str()).or_default() += 1;
    }
    if counts.is_empty() {
        return String::new();
    }
    let failed: usize = counts.values().sum();
    let kinds: Vec<String> = counts
        .iter()
        .map(|(detail, n)| format!("{detail} ×{n}"))
        .collect();
    format!("{failed}/{} failed: {}", outcomes.len(), kinds.join(", "))
}

/// `4 MiB`, `256 KiB`.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

fn transport_label(transport: Option<String>) -> String {
    transport.unwrap_or_else(|| "tunnel down".to_owned())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The table in Markdown: scenario | target | measured | pass.
pub fn render(rows: &[Row]) -> String {
    let mut out = String::from("| scenario | target | measured | pass |\n|---|---|---|---|\n");
    for row in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            row.scenario.replace('|', "\\|"),
            row.target.replace('|', "\\|"),
            row.measured.replace('|', "\\|"),
            if row.pass { "pass" } else { "**FAIL**" }
        ));
    }
    out
}
