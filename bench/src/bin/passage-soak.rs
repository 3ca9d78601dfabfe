//! passage-soak: the resilience soak behind `scripts/soak.sh` (see
//! `passage_bench::soak`). Exits non-zero, with the reason, when a request
//! hung or the programs did not return to idle.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use passage_bench::soak::{SoakSettings, run};

/// Soaks a tunnel with concurrent requests, cancellations and a relay restart.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Directory with passage-relay, passage-client and passage-mock-upstream.
    #[arg(long)]
    bin_dir: PathBuf,
    /// Seconds of load (the relay restarts half-way).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// How far above its starting RSS each program may end, MiB.
    #[arg(long, default_value_t = 32.0)]
    rss_slack_mib: f64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let settings = SoakSettings {
        duration: Duration::from_secs(cli.seconds),
        concurrency: cli.concurrency,
        request_limit: Duration::from_secs(30),
        relay_drain: Duration::from_secs(2),
        rss_slack_mib: cli.rss_slack_mib,
    };
    match run(&cli.bin_dir, &settings).await {
        Ok(report) => {
            print!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
