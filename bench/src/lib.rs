//! passage-bench: the benchmark suite behind `scripts/bench.sh`.
//!
//! Every figure is a ratio against a baseline run in the same invocation
//! (these machines are shared and noisy), and every scenario drives the
//! real release binaries with a user's defaults. [`run`] starts the mock
//! upstream and a tunnel, runs the chosen scenarios and renders
//! `BENCHMARKS.md`.

pub mod bulk;
pub mod cost;
#[cfg(target_os = "linux")]
pub mod hostile_net;
pub mod http;
pub mod impair;
pub mod linkem;
pub mod longhaul;
pub mod many_streams;
pub mod overhead;
pub mod report;
pub mod soak;
pub mod stack;
pub mod stats;
pub mod streaming;
pub mod stunnel;
pub mod teams;
pub mod transport;
pub mod websocket;

use std::path::PathBuf;
use std::time::Duration;

use crate::report::Section;
use crate::stack::{HopChain, Tunnel, TunnelOptions, Upstream};

/// Scenario names, in run order.
pub const SCENARIOS: [&str; 9] = [
    "overhead",
    "streaming",
    "bulk",
    "many",
    "longhaul",
    "transport",
    "cost",
    "websocket",
    "teams",
];

/// Sizes and durations of one run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Whether this is the short smoke run.
    pub quick: bool,
    /// Rounds of the wrk comparison.
    pub rounds: usize,
    /// Length of one wrk run.
    pub wrk_duration: Duration,
    /// Stamped streams per variant.
    pub stream_requests: usize,
    /// Events per stamped stream.
    pub stream_chunks: usize,
    /// Spacing of stamped events.
    pub stream_interval_ms: u64,
    /// Bytes per bulk transfer.
    pub bulk_bytes: u64,
    /// Streams held open at once.
    pub many_streams: usize,
    /// Long-haul: round-trip times to emulate, ms.
    pub longhaul_rtts_ms: Vec<u64>,
    /// Long-haul: loss probabilities to emulate.
    pub longhaul_losses: Vec<f64>,
    /// Long-haul: congestion controllers to compare.
    pub longhaul_controllers: Vec<&'static str>,
    /// The controller passage uses by default (its rows are judged).
    pub default_congestion: &'static str,
    /// Long-haul: stream windows (MiB) compared with the default controller.
    pub longhaul_windows_mib: Vec<u32>,
    /// Long-haul: the RTT at which windows are compared, ms.
    pub longhaul_window_rtt_ms: u64,
    /// Long-haul: streaming requests for the time to first byte.
    pub longhaul_requests: usize,
    /// Long-haul: bytes of the download.
    pub longhaul_bytes: u64,
    /// Long-haul: downloads per cell (their median counts).
    pub longhaul_downloads: usize,
}

impl Settings {
    /// The full suite's settings, or the seconds-long smoke version.
    pub fn new(quick: bool) -> Settings {
        if quick {
            Settings {
                quick,
                rounds: 1,
                wrk_duration: Duration::from_secs(1),
                stream_requests: 2,
                stream_chunks: 10,
                stream_interval_ms: 5,
                bulk_bytes: 16 << 20,
                many_streams: 100,
                longhaul_rtts_ms: vec![40],
                longhaul_losses: vec![0.0, 0.01],
                longhaul_controllers: vec!["bbr"],
                default_congestion: "bbr",
                longhaul_windows_mib: vec![2],
                longhaul_window_rtt_ms: 40,
                longhaul_requests: 3,
                longhaul_bytes: 1 << 20,
                longhaul_downloads: 1,
            }
        } else {
            Settings {
                quick,
                rounds: 3,
                wrk_duration: Duration::from_secs(5),
                stream_requests: 20,
                stream_chunks: 50,
                stream_interval_ms: 10,
                bulk_bytes: 1 << 30,
                many_streams: 5000,
                longhaul_rtts_ms: vec![100, 300],
                longhaul_losses: vec![0.0, 0.01, 0.05],
                longhaul_controllers: vec!["bbr", "cubic"],
                default_congestion: "bbr",
                longhaul_windows_mib: vec![2, 32],
                longhaul_window_rtt_ms: 300,
                longhaul_requests: 10,
                longhaul_bytes: 20 << 20,
                longhaul_downloads: 3,
            }
        }
    }
}

/// What the scenarios share: the binaries, the upstream and one tunnel.
pub struct Bench {
    /// Directory holding the binaries under test.
    pub bin_dir: PathBuf,
    /// The mock upstream process.
    pub upstream: Upstream,
    /// passage-relay and passage-client with default settings.
    pub tunnel: Tunnel,
    /// Two minimal forwarders in front of the upstream: the two-hop floor.
    pub hops: HopChain,
}

/// Starts the processes and runs `scenarios`; returns their sections.
pub async fn run(
    bin_dir: PathBuf,
    scenarios: &[String],
    settings: &Settings,
) -> anyhow::Result<Vec<Section>> {
    let upstream = Upstream::start(&bin_dir).await?;
    let tunnel = Tunnel::start(&bin_dir, &upstream.url, &TunnelOptions::default()).await?;
    let hops = HopChain::start(&bin_dir, upstream.addr).await?;
    let bench = Bench {
        bin_dir,
        upstream,
        tunnel,
        hops,
    };
    let mut sections = Vec::new();
    for scenario in scenarios {
        eprintln!("passage-bench: running {scenario}");
        let section = match scenario.as_str() {
            "overhead" => overhead::run(&bench, settings).await,
            "streaming" => streaming::run(&bench, settings).await,
            "bulk" => bulk::run(&bench, settings).await,
            "many" => many_streams::run(&bench, settings).await,
            "longhaul" => longhaul::run(&bench, settings).await,
            "transport" => transport::run(&bench, settings).await,
            "cost" => cost::run(&bench, settings).await,
            "websocket" => websocket::run(&bench, settings).await,
            "teams" => teams::run(&bench, settings).await,
            other => anyhow::bail!(
                "unknown scenario {other:?}; known: {}",
                SCENARIOS.join(", ")
            ),
        };
        sections.push(section.map_err(|e| e.context(format!("scenario {scenario}")))?);
    }
    Ok(sections)
}

/// Wall-clock time in nanoseconds since the Unix epoch (the mock upstream
/// stamps events with the same clock).
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A description of the machine for the report header.
pub fn machine_description() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({model}), {mem_gib:.0} GiB RAM, Linux {}",
        kernel.trim()
    )
}
