//! Scenario 6, transports: QUIC beside TLS over TCP (HTTP/2), the same
//! binaries with `passage-client --transport quic` and `--transport tcp`.
//! On loopback: wrk at 1 and 32 connections, bulk transfer and each
//! program's peak RSS; across the packet-level link emulator
//! ([`crate::linkem`], client in one namespace, relay and upstream in the
//! other): time to first SSE event at 50 ms RTT, without and with loss.
//! A measurement that fails (a transport answering errors) is reported as
//! failed, with the error and the programs' warnings, and the rest goes on.

use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::BodyExt;

use crate::bulk::{download, upload};
use crate::http::{client, drain, get};
use crate::linkem::{FAR_ADDR, Link, LinkConfig, ProbeResult, in_netns, unavailable_reason};
use crate::overhead::{WrkOutcome, WrkRun, wrk_outcome, wrk_script};
use crate::report::Section;
use crate::stack::{TICKS_PER_SECOND, Tunnel, TunnelOptions, Upstream, idle_share, machine_ticks};
use crate::stats::median;

mod report;
use crate::{Bench, Settings};

/// The transports compared: label in the report, value of `--transport`.
const TRANSPORTS: [(&str, &str); 2] = [("QUIC", "quic"), ("TCP", "tcp")];

/// Round-trip time of the emulated link.
const LINK_RTT: Duration = Duration::from_millis(50);

/// Loss per direction on the emulated link, one set of cells each.
const LINK_LOSSES: [f64; 2] = [0.0, 0.01];

/// Longest one request (or its first event) may take on the emulated link.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// Warnings quoted from one transport's logs when something failed.
const QUOTED_WARNINGS: usize = 3;

/// Whether this passage-client takes `--transport` (the TCP transport);
/// without it, the binaries speak QUIC only.
async fn client_has_transport_flag(bench: &Bench) -> anyhow::Result<bool> {
    let output = tokio::process::Command::new(bench.bin_dir.join("passage-client"))
        .args(["run", "--help"])
        .output()
        .await
        .context("running passage-client run --help")?;
    Ok(String::from_utf8_lossy(&output.stdout).contains("--transport"))
}

/// Client arguments selecting `flag`, when the binaries have the choice.
fn transport_args(flag: &str, selectable: bool) -> Vec<String> {
    if selectable {
        vec!["--transport".into(), flag.into()]
    } else {
        Vec::new()
    }
}

/// One transport's figures; a measurement that failed is missing and its
/// error is in `failures`.
#[derive(Default)]
struct Figures {
    wrk_1: Vec<WrkRun>,
    wrk_32: Vec<WrkRun>,
    /// wrk runs at 1 and at 32 connections that saw failed requests.
    failed_runs: [usize; 2],
    /// CPU of client + relay per request in each 32-connection run, µs.
    cpu_us_32: Vec<f64>,
    /// Share of the machine's CPU time idle during each 32-connection run, %.
    idle_32: Vec<f64>,
    download_mbs: Option<f64>,
    upload_mbs: Option<f64>,
    client_peak_kib: Option<u64>,
    relay_peak_kib: Option<u64>,
    /// TTFB samples at each of [`LINK_LOSSES`], ms.
    ttfb_ms: Vec<Option<Vec<f64>>>,
    /// What failed, one line each.
    failures: Vec<String>,
    /// WARN and ERROR lines of the programs' logs after a failure.
    warnings: Vec<String>,
}

impl Figures {
    fn wrk_median(&self, connections: u32, pick: fn(&WrkRun) -> f64) -> Option<f64> {
        let runs = if connections == 1 {
            &self.wrk_1
        } else {
            &self.wrk_32
        };
        some_median(&runs.iter().map(pick).collect::<Vec<_>>())
    }

    /// "failed requests in k of n runs" at `connections`, if any run saw some.
    fn wrk_mark(&self, connections: u32) -> Option<String> {
        let (failed, runs) = if connections == 1 {
            (self.failed_runs[0], self.wrk_1.len())
        } else {
            (self.failed_runs[1], self.wrk_32.len())
        };
        (failed > 0).then(|| format!("failed requests in {failed} of {runs} runs"))
    }

    /// Keeps a wrk run's figures; notes its failed requests, if any.
    fn wrk_run(&mut self, name: &str, connections: u32, outcome: WrkOutcome) {
        if let Some(failures) = &outcome.failures {
            let line = format!("wrk @{connections} conns: {failures}");
            eprintln!("passage-bench: transport {name}: {line}");
            self.failures.push(line);
            self.failed_runs[usize::from(connections != 1)] += 1;
        }
        if connections == 1 {
            self.wrk_1.push(outcome.run);
        } else {
            self.wrk_32.push(outcome.run);
        }
    }

    /// Records a failed measurement (and says so on stderr).
    fn failed(&mut self, name: &str, what: &str, error: &anyhow::Error) {
        // The error's chain without multi-line parts (wrk's whole output).
        let chain: Vec<String> = error
            .chain()
            .map(|cause| cause.to_string())
            .filter(|cause| !cause.trim().contains('\n'))
            .collect();
        let line = format!("{what}: {}", one_line(&chain.join(": ")));
        eprintln!("passage-bench: transport {name}: {line}");
        self.failures.push(line);
    }

    /// Quotes the first distinct warnings of `tunnel`'s logs, if anything failed.
    fn quote_warnings(&mut self, tunnel: &Tunnel) {
        if self.failures.is_empty() {
            return;
        }
        for log in [tunnel.client_log(), tunnel.relay_log().to_owned()] {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            for line in text
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            {
                // Without the timestamp, so that repeats are recognised.
                let message = line.split_once(' ').map_or(line, |(_, rest)| rest).trim();
                let message = truncate(message, 300);
                if self.warnings.len() < QUOTED_WARNINGS && !self.warnings.contains(&message) {
                    self.warnings.push(message);
                }
            }
        }
    }
}

/// The median, or `None` without samples.
fn some_median(samples: &[f64]) -> Option<f64> {
    (!samples.is_empty()).then(|| median(samples))
}

/// `text` on one line, at most 400 characters.
fn one_line(text: &str) -> String {
    truncate(&text.split_whitespace().collect::<Vec<_>>().join(" "), 400)
}

/// The first `limit` characters of `text` (with `…` if cut), `|` escaped for tables.
fn truncate(text: &str, limit: usize) -> String {
    let mut out: String = text.chars().take(limit).collect();
    if text.chars().count() > limit {
        out.push('…');
    }
    out.replace('|', "\\|")
}

/// Measures the loopback half: wrk rounds with the transports taking
/// turns, then one download and one upload each.
async fn loopback(
    settings: &Settings,
    tunnels: &[(&str, Tunnel)],
    figures: &mut [Figures],
) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir()?;
    let script = wrk_script(scratch.path())?;
    let path = "/v1/chat/completions";
    for ((name, tunnel), figures) in tunnels.iter().zip(figures.iter_mut()) {
        let url = format!("{}{path}", tunnel.url);
        match wrk_outcome(&script, &url, 4, Duration::from_secs(1)).await {
            Ok(WrkOutcome {
                failures: Some(failures),
                ..
            }) => figures.failures.push(format!("wrk warm-up: {failures}")),
            Ok(_) => {}
            Err(e) => figures.failed(name, "wrk warm-up", &e),
        }
        tunnel.client.reset_peak()?;
        tunnel.relay.reset_peak()?;
    }
    for _ in 0..settings.rounds {
        for connections in [1u32, 32] {
            for ((name, tunnel), figures) in tunnels.iter().zip(figures.iter_mut()) {
                let url = format!("{}{path}", tunnel.url);
                let ticks = || -> anyhow::Result<u64> {
                    Ok(tunnel.client.cpu_ticks()? + tunnel.relay.cpu_ticks()?)
                };
                let (ticks_before, machine_before) = (ticks()?, machine_ticks()?);
                let outcome =
                    match wrk_outcome(&script, &url, connections, settings.wrk_duration).await {
                        Ok(outcome) => outcome,
                        Err(e) => {
                            figures.failed(name, &format!("wrk @{connections} conns"), &e);
                            continue;
                        }
                    };
                if connections != 1 {
                    let used = ticks()?.saturating_sub(ticks_before) as f64 / TICKS_PER_SECOND;
                    let requests = outcome.run.rps * settings.wrk_duration.as_secs_f64();
                    figures.cpu_us_32.push(used * 1e6 / requests.max(1.0));
                    figures
                        .idle_32
                        .push(idle_share(machine_before, machine_ticks()?) * 100.0);
                }
                figures.wrk_run(name, connections, outcome);
            }
        }
    }
    let http = client();
    for ((name, tunnel), figures) in tunnels.iter().zip(figures.iter_mut()) {
        match download(&http, &tunnel.url, settings.bulk_bytes).await {
            Ok(rate) => figures.download_mbs = Some(rate),
            Err(e) => figures.failed(name, "download", &e),
        }
        match upload(&http, &tunnel.url, settings.bulk_bytes).await {
            Ok(rate) => figures.upload_mbs = Some(rate),
            Err(e) => figures.failed(name, "upload", &e),
        }
        figures.client_peak_kib = Some(tunnel.client.peak_rss_kib()?);
        figures.relay_peak_kib = Some(tunnel.relay.peak_rss_kib()?);
        figures.quote_warnings(tunnel);
    }
    Ok(())
}

/// Times the first SSE event of `requests` streaming requests on a warm
/// tunnel whose client runs in namespace `ns`, ms (after one unmeasured request).
async fn ttfb(ns: &str, url: String, requests: usize) -> anyhow::Result<Vec<f64>> {
    in_netns(ns, move || async move {
        let http = client();
        let url = format!("{url}/v1/stamped?chunks=1&interval_ms=0");
        let mut samples = Vec::with_capacity(requests);
        for index in 0..=requests {
            let started = Instant::now();
            let response = tokio::time::timeout(REQUEST_LIMIT, get(&http, &url))
                .await
                .context("no response head within the limit")??;
            anyhow::ensure!(response.status() == 200, "status {}", response.status());
            let mut body = response.into_body();
            tokio::time::timeout(REQUEST_LIMIT, body.frame())
                .await
                .context("no first event within the limit")?
                .context("the stream ended before its first event")??;
            if index > 0 {
                samples.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            tokio::time::timeout(REQUEST_LIMIT, drain(body))
                .await
                .context("the stream did not end within the limit")??;
        }
        Ok(samples)
    })
    .await
}

/// What the emulated half measured besides each transport's TTFB.
struct LinkReport {
    /// The link check at each of [`LINK_LOSSES`].
    probes: Vec<ProbeResult>,
    /// Packets carried client → relay and relay → client.
    packets: (u64, u64),
    /// Packets dropped by a full delay queue.
    overflow: u64,
}

/// Measures the emulated half on `link`: a fresh tunnel per transport and
/// loss, adding each transport's TTFB samples to `figures`.
async fn emulated(
    bench: &Bench,
    settings: &Settings,
    selectable: bool,
    link: &Link,
    figures: &mut [Figures],
) -> anyhow::Result<LinkReport> {
    let requests = if settings.quick { 5 } else { 100 };
    let probes = if settings.quick { 100 } else { 1000 };
    let upstream = Upstream::start_in(&bench.bin_dir, Some(&link.far)).await?;
    let mut report = LinkReport {
        probes: Vec::new(),
        packets: (0, 0),
        overflow: 0,
    };
    for loss in LINK_LOSSES {
        link.set_config(LinkConfig::symmetric(LINK_RTT, loss));
        report
            .probes
            .push(link.probe(probes, Duration::from_millis(2)).await?);
        for ((name, flag), figures) in TRANSPORTS.into_iter().zip(figures.iter_mut()) {
            let options = TunnelOptions {
                client_args: transport_args(flag, selectable),
                relay_ip: Some(FAR_ADDR.into()),
                relay_netns: Some(link.far.clone()),
                client_netns: Some(link.near.clone()),
                ..TunnelOptions::default()
            };
            let tunnel = Tunnel::start(&bench.bin_dir, &upstream.url, &options)
                .await
                .with_context(|| format!("{name} tunnel across the emulated link"))?;
            let what = format!("TTFB at {:.0}% loss", loss * 100.0);
            match ttfb(&link.near, tunnel.url.clone(), requests).await {
                Ok(samples) => {
                    eprintln!(
                        "passage-bench: transport {name} at {} ms RTT, {:.0}% loss: TTFB p50 {:.1} ms",
                        LINK_RTT.as_millis(),
                        loss * 100.0,
                        median(&samples)
                    );
                    figures.ttfb_ms.push(Some(samples));
                }
                Err(e) => {
                    figures.failed(name, &what, &e);
                    figures.quote_warnings(&tunnel);
                    figures.ttfb_ms.push(None);
                }
            }
        }
    }
    let (up, down) = link.counts();
    report.packets = (up.packets, down.packets);
    report.overflow = up.overflow + down.overflow;
    Ok(report)
}

/// Runs the scenario.
pub async fn run(bench: &Bench, settings: &Settings) -> anyhow::Result<Section> {
    let selectable = client_has_transport_flag(bench).await?;
    let transports = if selectable { 2 } else { 1 };
    let mut figures: Vec<Figures> = (0..transports).map(|_| Figures::default()).collect();
    let mut tunnels = Vec::new();
    for (name, flag) in TRANSPORTS.into_iter().take(transports) {
        let options = TunnelOptions {
            client_args: transport_args(flag, selectable),
            ..TunnelOptions::default()
        };
        let tunnel = Tunnel::start(&bench.bin_dir, &bench.upstream.url, &options)
            .await
            .with_context(|| format!("{name} tunnel on loopback"))?;
        tunnels.push((name, tunnel));
    }
    loopback(settings, &tunnels, &mut figures).await?;
    drop(tunnels);

    let mut notes = Vec::new();
    let mut link_report = None;
    let link = match unavailable_reason() {
        Some(reason) => Err(anyhow::anyhow!("{reason}")),
        None => Link::start(LinkConfig::symmetric(LINK_RTT, 0.0)).await,
    };
    match link {
        Err(e) => {
            let skipped = format!(
                "The emulated-link rows (TTFB at {} ms RTT) were skipped: the link emulator \
                 cannot run here ({e:#}).",
                LINK_RTT.as_millis()
            );
            eprintln!("passage-bench: transport: {skipped}");
            notes.push(skipped);
        }
        Ok(link) => {
            let measured = emulated(bench, settings, selectable, &link, &mut figures).await;
            drop(link);
            link_report = Some(measured?);
        }
    }

    Ok(report::section(
        settings,
        selectable,
        &figures,
        link_report.as_ref(),
        notes,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_text_fits_a_table_cell() {
        assert_eq!(truncate("a|b", 10), "a\\|b");
        assert_eq!(truncate("abcdef", 3), "abc…");
        assert_eq!(one_line("x\n   y"), "x y");
    }
}
