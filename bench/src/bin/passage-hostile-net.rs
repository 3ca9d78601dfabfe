//! passage-hostile-net: relay and client in two network namespaces with
//! nftables imposing bad networks (see `passage_bench::hostile_net`). Needs
//! root; elsewhere it prints a skip line and exits 0. Exits 1 when a row
//! fails, 2 when the run breaks, 3 when it overruns its time limit.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Runs the hostile-network scenarios and prints scenario | target | measured | pass.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Directory with passage-relay, passage-client and passage-mock-upstream.
    bin_dir: PathBuf,
    /// Scenario groups to run (comma-separated; default all): udp-blocked-start,
    /// tcp-blocked, udp-blocked-mid, loss, address-change, relay-restart, relay-dead.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Seconds after which the whole run is torn down and exits 3.
    #[arg(long, default_value_t = 480)]
    time_limit: u64,
    /// Where to keep the programs' logs (default: a temporary directory).
    #[arg(long)]
    log_dir: Option<PathBuf>,
}

#[cfg(target_os = "linux")]
fn main() -> ExitCode {
    let cli = Cli::parse();
    passage_bench::hostile_net::main(passage_bench::hostile_net::Options {
        bin_dir: cli.bin_dir,
        only: cli.only,
        time_limit: std::time::Duration::from_secs(cli.time_limit),
        log_dir: cli.log_dir,
    })
}

#[cfg(not(target_os = "linux"))]
fn main() -> ExitCode {
    let _ = Cli::parse();
    println!("hostile-net: SKIP: needs Linux (network namespaces and nftables)");
    ExitCode::SUCCESS
}
