//! Scenario 5, long-haul links: the impairment forwarder between client and
//! relay adds one-way delay and random loss; for each link and congestion
//! controller, a fresh tunnel measures the time to first byte of a
//! streaming request on the warm tunnel (in RTTs) and the throughput of a
//! download.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;

use crate::http::{HttpClient, client, drain, get};

use crate::impair::{Forwarder, Impairment};
use crate::report::{Section, fixed};
use crate::stack::{Tunnel, TunnelOptions, free_port};
use crate::stats::{median, percentile};
use crate::{Bench, Settings};

/// One link and controller's figures.
struct LinkResult {
    ttfb_rtts: f64,
    ttfb_p90_rtts: f64,
    /// Datagrams the forwarder dropped because its queue was full (not
    /// part of the emulated loss; should be 0).
    overflow_drops: u64,
    download_mbs: f64,
    /// Whether the whole download arrived within [`DOWNLOAD_LIMIT`].
    complete: bool,
}

/// passage's default per-stream window, MiB (`--stream-window-mib`).
const DEFAULT_WINDOW_MIB: u32 = 8;

/// Longest a long-haul download may run; the rate counts what arrived.
const DOWNLOAD_LIMIT: Duration = Duration::from_secs(40);

async fn measure(
    bench: &Bench,
    settings: &Settings,
    rtt_ms: u64,
    loss: f64,
    congestion: &str,
    window_mib: u32,
) -> anyhow::Result<LinkResult> {
    let args = vec![
        "--congestion".to_owned(),
        congestion.to_owned(),
        "--stream-window-mib".to_owned(),
        window_mib.to_string(),
    ];
    let impairment = Impairment {
        one_way_delay: Duration::from_millis(rtt_ms / 2),
        loss,
    };
    let (forwarder, tunnel) = start_behind_forwarder(bench, impairment, args).await?;
    let http = client();

    // Time to first byte of a streaming request on the warm tunnel.
    let url = format!("{}/v1/stamped?chunks=1&interval_ms=0", tunnel.url);
    let mut ttfb = Vec::new();
    for _ in 0..settings.longhaul_requests {
        let started = Instant::now();
        let response = get(&http, &url).await?;
        anyhow::ensure!(response.status() == 200, "status {}", response.status());
        let mut body = response.into_body();
        body.frame().await.transpose()?;
        ttfb.push(started.elapsed().as_secs_f64() * 1000.0 / rtt_ms as f64);
        drain(body).await?;
    }

    // The downloads: the median rate of up to three, since one transfer
    // over a lossy link varies a lot from run to run; a link too slow to
    // finish within the time limit is measured once, by what arrived.
    let url = format!("{}/download?bytes={}", tunnel.url, settings.longhaul_bytes);
    let mut rates = Vec::new();
    let mut complete = true;
    while complete && rates.len() < settings.longhaul_downloads {
        let (rate, finished) = download(&http, &url, settings.longhaul_bytes).await?;
        rates.push(rate);
        complete = finished;
    }
    let download_mbs = median(&rates);
    let overflow_drops = forwarder.overflow_drops();
    drop(tunnel);
    drop(forwarder);
    eprintln!(
        "passage-bench: longhaul rtt {rtt_ms} ms loss {:.0}% {congestion}: ttfb {:.2} RTT, {download_mbs:.2} MB/s{}",
        loss * 100.0,
        median(&ttfb),
        if complete { "" } else { " (time limit)" }
    );
    Ok(LinkResult {
        ttfb_rtts: median(&ttfb),
        ttfb_p90_rtts: percentile(&ttfb, 90.0),
        download_mbs,
        complete,
        overflow_drops,
    })
}

/// One download of `bytes` from `url`: MB/s, and whether it finished
/// within [`DOWNLOAD_LIMIT`] (if not, the rate counts what arrived).
async fn download(http: &HttpClient, url: &str, bytes: u64) -> anyhow::Result<(f64, bool)> {
    let started = Instant::now();
    let response = get(http, url).await?;
    anyhow::ensure!(
        response.status() == 200,
        "download status {}",
        response.status()
    );
    let mut body = response.into_body();
    let mut got = 0u64;
    let deadline = tokio::time::Instant::now() + DOWNLOAD_LIMIT;
    let mut timed_out = false;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(frame)) => got += frame?.into_data().map_or(0, |d| d.len() as u64),
            Ok(None) => break,
            Err(_) => {
                timed_out = true;
                break;
            }
        }
    }
    let complete = got == bytes;
    anyhow::ensure!(
        complete || timed_out,
        "download ended early: {got} of {bytes} bytes"
    );
    Ok((got as f64 / started.elapsed().as_secs_f64() / 1e6, complete))
}

/// Runs the scenario.
pub async fn run(bench: &Bench, settings: &Settings) -> anyhow::Result<Section> {
    let mut section = Section {
        title: "5. Long-haul links (delay and loss)".into(),
        method: method(settings),
        ..Section::default()
    };
    section.table.push(
        [
            "RTT",
            "loss",
            "controller",
            "stream window (MiB)",
            "TTFB p50 (RTTs)",
            "TTFB p90 (RTTs)",
            "download MB/s",
            "vs 0% loss",
            "forwarder overflow drops",
        ]
        .map(String::from)
        .to_vec(),
    );
    for (rtt_ms, congestion, window, losses) in cells(settings) {
        let mut lossless = None;
        for &loss in losses {
            let result = measure(bench, settings, rtt_ms, loss, congestion, window).await?;
            let baseline = *lossless.get_or_insert(result.download_mbs);
            let ratio = result.download_mbs / baseline;
            section.table.push(vec![
                format!("{rtt_ms} ms"),
                format!("{:.0}%", loss * 100.0),
                congestion.to_owned(),
                window.to_string(),
                fixed(result.ttfb_rtts, 2),
                fixed(result.ttfb_p90_rtts, 2),
                if result.complete {
                    fixed(result.download_mbs, 2)
                } else {
                    format!(
                        "{} (stopped at {} s)",
                        fixed(result.download_mbs, 2),
                        DOWNLOAD_LIMIT.as_secs()
                    )
                },
                fixed(ratio, 2),
                result.overflow_drops.to_string(),
            ]);
            let judged = congestion == settings.default_congestion && window == DEFAULT_WINDOW_MIB;
            if judged && (loss - 0.01).abs() < 1e-9 {
                section.target(
                    &format!("warm TTFB at {rtt_ms} ms RTT, 1% loss ({congestion})"),
                    format!("{:.2} RTT", result.ttfb_rtts),
                    "≤ 1.3 RTT",
                    result.ttfb_rtts <= 1.3,
                );
                if rtt_ms == 300 {
                    section.target(
                        &format!("download at 300 ms RTT, 1% vs 0% loss ({congestion})"),
                        format!("{ratio:.2}×"),
                        "≥ 0.6×",
                        ratio >= 0.6,
                    );
                }
            }
        }
    }
    Ok(section)
}

/// A forwarder with `impairment` and a tunnel whose client dials the relay
/// through it (`args` on both programs). The relay's port is chosen before
/// the relay binds it, so another socket may take it in between: then the
/// pair is made again on a new port, up to three times.
async fn start_behind_forwarder(
    bench: &Bench,
    impairment: Impairment,
    args: Vec<String>,
) -> anyhow::Result<(Forwarder, Tunnel)> {
    let mut attempt = 1;
    loop {
        let relay_port = free_port(true)?;
        let forwarder = Forwarder::start(([127, 0, 0, 1], relay_port).into(), impairment).await?;
        let options = TunnelOptions {
            relay_args: args.clone(),
            client_args: args.clone(),
            via: Some(forwarder.addr),
            relay_port: Some(relay_port),
            ..TunnelOptions::default()
        };
        match Tunnel::start(&bench.bin_dir, &bench.upstream.url, &options).await {
            Ok(tunnel) => return Ok((forwarder, tunnel)),
            Err(e) if attempt < 3 && format!("{e:#}").contains("Address already in use") => {
                eprintln!("passage-bench: relay port {relay_port} was taken; trying another");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The method paragraph.
fn method(settings: &Settings) -> String {
    format!(
        "A userspace UDP forwarder between client and relay delays each datagram by RTT/2 in \
         each direction and drops each with the given probability, independently. For every \
         link, congestion controller and stream window (set on both ends with \
         `--congestion` and `--stream-window-mib`), a fresh \
         tunnel: time to first byte of {} streaming requests on the warm tunnel (median and \
         90th percentile, in RTTs: one RTT is the floor), then {} MiB downloads (MB/s, the \
         median of {} on the same tunnel; a link too slow to finish within 40 s is measured \
         once, by what arrived). One tunnel per cell. The forwarder has no bandwidth limit: these links are long and lossy, not \
         narrow. Everything else at defaults.",
        settings.longhaul_requests,
        settings.longhaul_bytes >> 20,
        settings.longhaul_downloads
    )
}

/// The cells to measure, each a fresh tunnel: (RTT ms, controller, stream
/// window MiB, losses). The controllers at the default window, then other
/// windows with the default controller.
fn cells(settings: &Settings) -> Vec<(u64, &str, u32, &[f64])> {
    let mut cells: Vec<(u64, &str, u32, &[f64])> = Vec::new();
    for &rtt_ms in &settings.longhaul_rtts_ms {
        for congestion in &settings.longhaul_controllers {
            cells.push((
                rtt_ms,
                congestion,
                DEFAULT_WINDOW_MIB,
                &settings.longhaul_losses,
            ));
        }
    }
    for &window in &settings.longhaul_windows_mib {
        cells.push((
            settings.longhaul_window_rtt_ms,
            settings.default_congestion,
            window,
            &[0.0, 0.01],
        ));
    }
    cells
}
