//! Command line of passage-client: parses arguments and calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use passage_client::{Client, ClientConfig, DEFAULT_LISTEN};
use passage_shared::bundle::Bundle;

/// The local end of passage: an OpenAI-compatible endpoint on 127.0.0.1
/// whose requests travel through a QUIC tunnel to passage-relay.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the local endpoint and keep the tunnel up.
    Run {
        /// Bundle file from `passage-relay issue`.
        #[arg(long)]
        bundle: PathBuf,
        /// Local address apps connect to (base_url http://ADDR/v1).
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Another relay HOST:PORT to fail over to, after the bundle's (repeatable).
        #[arg(long = "relay")]
        relays: Vec<String>,
        /// Seconds a request waits for the tunnel before failing with 503.
        #[arg(long, default_value_t = 5)]
        connect_wait: u64,
        /// Seconds in-flight responses may run on after SIGTERM/SIGINT.
        #[arg(long, default_value_t = 30)]
        drain_timeout: u64,
        /// Runtime threads: 1 runs everything on one thread (measured
        /// fastest on small machines); more for a busy many-core host.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        threads: u16,
        /// Congestion controller for what this end sends: bbr, cubic or newreno.
        #[arg(long, default_value = "bbr")]
        congestion: passage_shared::quic::Congestion,
        /// Per-stream receive window in MiB (the connection window is 2.5×).
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
        stream_window_mib: u32,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("passage-client: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Command::Run {
        bundle,
        listen,
        relays,
        connect_wait,
        drain_timeout,
        threads,
        congestion,
        stream_window_mib,
    } = cli.command;
    passage_shared::process::init_logging();
    let bundle = Bundle::load(&bundle)?;
    let mut config = ClientConfig::new(bundle, listen);
    config.extra_relays = relays;
    config.connect_wait = Duration::from_secs(connect_wait);
    config.drain_timeout = Duration::from_secs(drain_timeout);
    config.tunnel.transport.congestion = congestion;
    config.tunnel.transport.stream_window = stream_window_mib << 20;
    let runtime = passage_shared::process::runtime(usize::from(threads))
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let client = Client::bind(config)
            .await
            .context("starting passage-client")?;
        let shutdown = passage_shared::process::shutdown_on_signal()
            .context("installing the SIGTERM/SIGINT handlers")?;
        client.run(shutdown).await;
        Ok(())
    })
}
