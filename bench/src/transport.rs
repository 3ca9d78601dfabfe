//! Scenario 6, transports: QUIC beside TLS over TCP (HTTP/2), the same
//! binaries with `passage-client --transport quic` and `--transport tcp`.
//! On loopback: wrk at 1 and 32 connections, bulk transfer and each
//! program's peak RSS; across the packet-level link emulator
//! ([`crate::linkem`], client in one namespace, relay and upstream in the
//! other): time to first SSE event at 50 ms RTT, without and with loss.

use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::BodyExt;

use crate::bulk::{download, upload};
use crate::http::{client, drain, get};
use crate::linkem::{FAR_ADDR, Link, LinkConfig, ProbeResult, in_netns, unavailable_reason};
use crate::overhead::{WrkRun, wrk, wrk_script};
use crate::report::{Section, fixed};
use crate::stack::{TICKS_PER_SECOND, Tunnel, TunnelOptions, Upstream, idle_share, machine_ticks};
use crate::stats::{median, percentile};
use crate::{Bench, Settings};

/// The transports compared: label in the report, value of `--transport`.
const TRANSPORTS: [(&str, &str); 2] = [("QUIC", "quic"), ("TCP", "tcp")];

/// Round-trip time of the emulated link.
const LINK_RTT: Duration = Duration::from_millis(50);

/// Loss per direction on the emulated link, one set of cells each.
const LINK_LOSSES: [f64; 2] = [0.0, 0.01];

/// Longest one request (or its first event) may take on the emulated link.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);

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

/// One transport's loopback figures.
#[derive(Default)]
struct Loopback {
    wrk_1: Vec<WrkRun>,
    wrk_32: Vec<WrkRun>,
    /// CPU of client + relay per request in each 32-connection run, µs.
    cpu_us_32: Vec<f64>,
    /// Share of the machine's CPU time idle during each 32-connection run, %.
    idle_32: Vec<f64>,
    download_mbs: f64,
    upload_mbs: f64,
    client_peak_kib: u64,
    relay_peak_kib: u64,
}

impl Loopback {
    fn wrk_median(&self, connections: u32, pick: fn(&WrkRun) -> f64) -> f64 {
        let runs = if connections == 1 {
            &self.wrk_1
        } else {
            &self.wrk_32
        };
        median(&runs.iter().map(pick).collect::<Vec<_>>())
    }
}

/// Measures the loopback half: wrk rounds with the transports taking
/// turns, then one download and one upload each.
async fn loopback(
    settings: &Settings,
    tunnels: &[(&str, Tunnel)],
) -> anyhow::Result<Vec<Loopback>> {
    let scratch = tempfile::tempdir()?;
    let script = wrk_script(scratch.path())?;
    let path = "/v1/chat/completions";
    let mut results: Vec<Loopback> = tunnels.iter().map(|_| Loopback::default()).collect();
    for (_, tunnel) in tunnels {
        wrk(
            &script,
            &format!("{}{path}", tunnel.url),
            4,
            Duration::from_secs(1),
        )
        .await?;
        tunnel.client.reset_peak()?;
        tunnel.relay.reset_peak()?;
    }
    for _ in 0..settings.rounds {
        for connections in [1u32, 32] {
            for ((_, tunnel), result) in tunnels.iter().zip(results.iter_mut()) {
                let url = format!("{}{path}", tunnel.url);
                let ticks = || -> anyhow::Result<u64> {
                    Ok(tunnel.client.cpu_ticks()? + tunnel.relay.cpu_ticks()?)
                };
                let (ticks_before, machine_before) = (ticks()?, machine_ticks()?);
                let run = wrk(&script, &url, connections, settings.wrk_duration).await?;
                if connections == 1 {
                    result.wrk_1.push(run);
                } else {
                    let used = ticks()?.saturating_sub(ticks_before) as f64 / TICKS_PER_SECOND;
                    let requests = run.rps * settings.wrk_duration.as_secs_f64();
                    result.cpu_us_32.push(used * 1e6 / requests.max(1.0));
                    result
                        .idle_32
                        .push(idle_share(machine_before, machine_ticks()?) * 100.0);
                    result.wrk_32.push(run);
                }
            }
        }
    }
    let http = client();
    for ((name, tunnel), result) in tunnels.iter().zip(results.iter_mut()) {
        result.download_mbs = download(&http, &tunnel.url, settings.bulk_bytes)
            .await
            .with_context(|| format!("{name} download"))?;
        result.upload_mbs = upload(&http, &tunnel.url, settings.bulk_bytes)
            .await
            .with_context(|| format!("{name} upload"))?;
        result.client_peak_kib = tunnel.client.peak_rss_kib()?;
        result.relay_peak_kib = tunnel.relay.peak_rss_kib()?;
    }
    Ok(results)
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

/// One loss setting of the emulated link: the link check and each transport's TTFB samples.
struct LinkCell {
    loss: f64,
    probe: ProbeResult,
    ttfb_ms: Vec<Option<Vec<f64>>>,
}

/// Measures the emulated half on `link`: a fresh tunnel per transport and loss.
async fn emulated(
    bench: &Bench,
    settings: &Settings,
    selectable: bool,
    link: &Link,
) -> anyhow::Result<(Vec<LinkCell>, (u64, u64), u64)> {
    let requests = if settings.quick { 5 } else { 100 };
    let probes = if settings.quick { 100 } else { 1000 };
    let upstream = Upstream::start_in(&bench.bin_dir, Some(&link.far)).await?;
    let mut cells = Vec::new();
    for loss in LINK_LOSSES {
        link.set_config(LinkConfig::symmetric(LINK_RTT, loss));
        let probe = link.probe(probes, Duration::from_millis(2)).await?;
        let mut ttfb_ms = Vec::new();
        for (name, flag) in TRANSPORTS {
            if flag == "tcp" && !selectable {
                ttfb_ms.push(None);
                continue;
            }
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
            let samples = ttfb(&link.near, tunnel.url.clone(), requests)
                .await
                .with_context(|| format!("{name} TTFB at {:.0}% loss", loss * 100.0))?;
            eprintln!(
                "passage-bench: transport {name} at {} ms RTT, {:.0}% loss: TTFB p50 {:.1} ms",
                LINK_RTT.as_millis(),
                loss * 100.0,
                median(&samples)
            );
            ttfb_ms.push(Some(samples));
        }
        cells.push(LinkCell {
            loss,
            probe,
            ttfb_ms,
        });
    }
    let (up, down) = link.counts();
    let overflow = up.overflow + down.overflow;
    drop(upstream);
    Ok((cells, (up.packets, down.packets), overflow))
}

/// One table row: what, QUIC's figure, TCP's (if measured), decimals, how.
struct Row {
    measure: String,
    quic: f64,
    tcp: Option<f64>,
    digits: usize,
    how: String,
}

impl Row {
    fn cells(&self) -> Vec<String> {
        vec![
            self.measure.clone(),
            fixed(self.quic, self.digits),
            self.tcp
                .map_or_else(|| "not measured".to_owned(), |t| fixed(t, self.digits)),
            self.tcp
                .filter(|_| self.quic > 0.0)
                .map_or_else(|| "–".to_owned(), |t| fixed(t / self.quic, 2)),
            self.how.clone(),
        ]
    }
}

/// Runs the scenario.
pub async fn run(bench: &Bench, settings: &Settings) -> anyhow::Result<Section> {
    let selectable = client_has_transport_flag(bench).await?;
    let mut tunnels = Vec::new();
    for (name, flag) in TRANSPORTS {
        if flag == "tcp" && !selectable {
            continue;
        }
        let options = TunnelOptions {
            client_args: transport_args(flag, selectable),
            ..TunnelOptions::default()
        };
        let tunnel = Tunnel::start(&bench.bin_dir, &bench.upstream.url, &options)
            .await
            .with_context(|| format!("{name} tunnel on loopback"))?;
        tunnels.push((name, tunnel));
    }
    let measured = loopback(settings, &tunnels).await?;
    drop(tunnels);
    let quic = &measured[0];
    let tcp = measured.get(1);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let wrk_how = format!(
        "wrk 1 thread, {} s per run, median of {} rounds (transports take turns)",
        settings.wrk_duration.as_secs(),
        settings.rounds
    );
    let mut rows = Vec::new();
    for connections in [1u32, 32] {
        let conns = if connections == 1 { "conn" } else { "conns" };
        for (what, pick, digits) in [
            ("req/s", (|r: &WrkRun| r.rps) as fn(&WrkRun) -> f64, 0),
            ("p50 (µs)", |r: &WrkRun| r.p50_us, 0),
            ("p99 (µs)", |r: &WrkRun| r.p99_us, 0),
        ] {
            rows.push(Row {
                measure: format!("{what} @{connections} {conns}"),
                quic: quic.wrk_median(connections, pick),
                tcp: tcp.map(|t| t.wrk_median(connections, pick)),
                digits,
                how: wrk_how.clone(),
            });
        }
    }
    rows.push(Row {
        measure: "client + relay CPU per request @32 conns (µs)".into(),
        quic: median(&quic.cpu_us_32),
        tcp: tcp.map(|t| median(&t.cpu_us_32)),
        digits: 0,
        how: "user + system time of both programs during a run / requests served; median".into(),
    });
    rows.push(Row {
        measure: "machine idle @32 conns (%)".into(),
        quic: median(&quic.idle_32),
        tcp: tcp.map(|t| median(&t.idle_32)),
        digits: 0,
        how: "share of all cores' time `/proc/stat` counts idle during a run; median".into(),
    });
    let bulk_how = format!(
        "one {} MiB transfer, 10^6 bytes per second of wall time",
        settings.bulk_bytes >> 20
    );
    rows.push(Row {
        measure: "download MB/s".into(),
        quic: quic.download_mbs,
        tcp: tcp.map(|t| t.download_mbs),
        digits: 0,
        how: bulk_how.clone(),
    });
    rows.push(Row {
        measure: "upload MB/s".into(),
        quic: quic.upload_mbs,
        tcp: tcp.map(|t| t.upload_mbs),
        digits: 0,
        how: bulk_how,
    });
    let rss_how = "VmHWM, reset after warm-up; peak over the wrk runs and both transfers";
    rows.push(Row {
        measure: "client peak RSS (MiB)".into(),
        quic: mib(quic.client_peak_kib),
        tcp: tcp.map(|t| mib(t.client_peak_kib)),
        digits: 1,
        how: rss_how.into(),
    });
    rows.push(Row {
        measure: "relay peak RSS (MiB)".into(),
        quic: mib(quic.relay_peak_kib),
        tcp: tcp.map(|t| mib(t.relay_peak_kib)),
        digits: 1,
        how: rss_how.into(),
    });

    let mut notes = Vec::new();
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
            let measured = emulated(bench, settings, selectable, &link).await;
            drop(link);
            let (cells, (up_packets, down_packets), overflow) = measured?;
            for cell in &cells {
                let loss = format!("{:.0}% loss", cell.loss * 100.0);
                let samples = |index: usize| cell.ttfb_ms.get(index).cloned().flatten();
                let quic_ttfb = samples(0).unwrap_or_default();
                let tcp_ttfb = samples(1);
                let how = format!(
                    "{} warm streaming requests one after another, time to the first event",
                    quic_ttfb.len()
                );
                for (what, p) in [("p50", 50.0), ("p99", 99.0)] {
                    rows.push(Row {
                        measure: format!(
                            "TTFB {what} (ms), {} ms RTT, {loss}",
                            LINK_RTT.as_millis()
                        ),
                        quic: percentile(&quic_ttfb, p),
                        tcp: tcp_ttfb.as_ref().map(|t| percentile(t, p)),
                        digits: 1,
                        how: how.clone(),
                    });
                }
                let probe = &cell.probe;
                let expected = 1.0 - (1.0 - cell.loss).powi(2);
                notes.push(format!(
                "Link check at {loss} per direction (UDP echo across the emulator, {} probes 2 ms \
                 apart, before the tunnels): round trip min {:.1} / p50 {:.1} / p99 {:.1} ms for \
                 a configured {} ms; {:.1}% of probes lost (either way), {:.1}% expected.",
                probe.sent,
                probe.rtt_min_ms,
                probe.rtt_p50_ms,
                probe.rtt_p99_ms,
                LINK_RTT.as_millis(),
                probe.lost_share() * 100.0,
                expected * 100.0
            ));
            }
            notes.push(format!(
            "The emulator carried {up_packets} packets client → relay and {down_packets} relay → \
             client in these runs; {overflow} were dropped by a full delay queue (beyond the \
             emulated loss; the figures are clean when this is 0)."
        ));
        }
    }
    if tcp.is_none() {
        notes.insert(
            0,
            "TCP not measured: these binaries' passage-client has no `--transport` option (QUIC \
             only), so only the QUIC half ran."
                .into(),
        );
    }

    let mut section = Section {
        title: "6. Transports: QUIC beside TCP".into(),
        method: format!(
            "The same binaries, one tunnel per transport started side by side: the relay at its \
             defaults (QUIC on UDP and TLS over TCP with HTTP/2 on the same port number), the \
             client with `--transport quic` or `--transport tcp`, everything else at defaults. \
             Loopback rows: wrk POSTs the fixed chat completion of section 1 through each \
             tunnel (1 thread, {} s per run, {} rounds, the transports back to back in each \
             round; medians), then one {} MiB download and one upload as in section 3. \
             Emulated-link rows: two network namespaces joined by TUN devices and a userspace \
             forwarder in passage-bench (`bench/src/linkem.rs`) that carries every IP packet, \
             TCP and UDP alike, with a fixed one-way delay of {} ms and independent random loss \
             in each direction (MTU 1500, no bandwidth limit); passage-client runs in one \
             namespace, passage-relay and the mock upstream in the other, and a fresh tunnel \
             per transport and loss measures the time to the first SSE event (`/v1/stamped`, \
             one event) of streaming requests sent one at a time from inside the client's \
             namespace. TCP / QUIC is the TCP figure divided by the QUIC one.",
            settings.wrk_duration.as_secs(),
            settings.rounds,
            settings.bulk_bytes >> 20,
            LINK_RTT.as_millis() / 2
        ),
        notes,
        ..Section::default()
    };
    section.table.push(
        ["measure", "QUIC", "TCP", "TCP / QUIC", "how"]
            .map(String::from)
            .to_vec(),
    );
    section.table.extend(rows.iter().map(Row::cells));

    let not_measured = || "not measured (no TCP transport in these binaries)".to_owned();
    match tcp {
        Some(tcp) => {
            let ratio = tcp.wrk_median(32, |r| r.rps) / quic.wrk_median(32, |r| r.rps);
            section.target(
                "TCP vs QUIC req/s @32 conns",
                format!("{ratio:.2}×"),
                "≥ 0.8×",
                ratio >= 0.8,
            );
            let slower = tcp.download_mbs.min(tcp.upload_mbs);
            section.target(
                "TCP bulk throughput, slower direction",
                format!("{slower:.0} MB/s"),
                "≥ 250 MB/s",
                slower >= 250.0,
            );
            let client = tcp.client_peak_kib as f64 / quic.client_peak_kib.max(1) as f64;
            let relay = tcp.relay_peak_kib as f64 / quic.relay_peak_kib.max(1) as f64;
            section.target(
                "TCP vs QUIC peak RSS (client, relay)",
                format!("{client:.2}×, {relay:.2}×"),
                "≤ 1.10× each",
                client <= 1.10 && relay <= 1.10,
            );
        }
        None => {
            for (name, goal) in [
                ("TCP vs QUIC req/s @32 conns", "≥ 0.8×"),
                ("TCP bulk throughput, slower direction", "≥ 250 MB/s"),
                ("TCP vs QUIC peak RSS (client, relay)", "≤ 1.10× each"),
            ] {
                section.target(name, not_measured(), goal, false);
            }
        }
    }
    Ok(section)
}
