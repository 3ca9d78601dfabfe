//! Scenario 3, bulk transfer: one large download and one large upload,
//! direct and through passage, with each program's peak RSS during the
//! passage transfer.

use std::time::Instant;

use http::Request;
use http_body_util::BodyExt;

use crate::http::{HttpClient, client, drain, get, repeat_body};
use crate::report::{Section, fixed};
use crate::{Bench, Settings};

async fn download(client: &HttpClient, base: &str, bytes: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let response = get(client, &format!("{base}/download?bytes={bytes}")).await?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    let got = drain(response.into_body()).await?;
    anyhow::ensure!(got == bytes, "downloaded {got} of {bytes} bytes");
    Ok(bytes as f64 / started.elapsed().as_secs_f64() / 1e6)
}

async fn upload(client: &HttpClient, base: &str, bytes: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let request = Request::post(format!("{base}/sink"))
        .header("content-type", "application/octet-stream")
        .header("content-length", bytes)
        .body(repeat_body(bytes))?;
    let response = client.request(request).await?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    let body = response.into_body().collect().await?.to_bytes();
    let value: serde_json::Value = serde_json::from_slice(&body)?;
    anyhow::ensure!(
        value["bytes"] == bytes,
        "upstream received {} of {bytes} bytes",
        value["bytes"]
    );
    Ok(bytes as f64 / started.elapsed().as_secs_f64() / 1e6)
}

/// Runs the scenario.
pub async fn run(bench: &Bench, settings: &Settings) -> anyhow::Result<Section> {
    let client = client();
    let bytes = settings.bulk_bytes;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut section = Section {
        title: "3. Bulk transfer".into(),
        method: format!(
            "One {} MiB download (`/download`) and one {} MiB upload (`/sink`, which only counts) \
             per variant, read and written by the benchmark's hyper client; MB/s is 10^6 bytes per \
             second of wall time from request to last byte. Peak RSS is each program's VmHWM, reset \
             (`/proc/PID/clear_refs`) before each passage transfer.",
            bytes >> 20,
            bytes >> 20
        ),
        ..Section::default()
    };
    section.table.push(
        [
            "direction",
            "direct MB/s",
            "passage MB/s",
            "passage / direct",
            "client peak RSS (MiB)",
            "relay peak RSS (MiB)",
        ]
        .map(String::from)
        .to_vec(),
    );
    let mut worst_rate = f64::MAX;
    let mut worst_rss = 0u64;
    for direction in ["download", "upload"] {
        let transfer = |base: String| {
            let client = &client;
            async move {
                if direction == "download" {
                    download(client, &base, bytes).await
                } else {
                    upload(client, &base, bytes).await
                }
            }
        };
        let direct = transfer(bench.upstream.url.clone()).await?;
        bench.tunnel.client.reset_peak()?;
        bench.tunnel.relay.reset_peak()?;
        let passage = transfer(bench.tunnel.url.clone()).await?;
        let client_peak = bench.tunnel.client.peak_rss_kib()?;
        let relay_peak = bench.tunnel.relay.peak_rss_kib()?;
        worst_rate = worst_rate.min(passage);
        worst_rss = worst_rss.max(client_peak).max(relay_peak);
        section.table.push(vec![
            direction.to_owned(),
            fixed(direct, 0),
            fixed(passage, 0),
            fixed(passage / direct, 2),
            fixed(mib(client_peak), 1),
            fixed(mib(relay_peak), 1),
        ]);
    }
    section.target(
        "bulk throughput, slower direction",
        format!("{worst_rate:.0} MB/s"),
        "≥ 250 MB/s",
        worst_rate >= 250.0,
    );
    section.target(
        "bulk peak RSS, largest program",
        format!("{:.1} MiB", mib(worst_rss)),
        "< 64 MiB",
        mib(worst_rss) < 64.0,
    );
    Ok(section)
}
