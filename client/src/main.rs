//! Command line of passage-client: parses arguments and calls the library.

passage_shared::tuned_allocator!();

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use passage_client::{Client, ClientConfig, DEFAULT_LISTEN, TransportChoice, TunnelSettings};
use passage_shared::bundle::Bundle;
use passage_shared::process::CommonArgs;
use passage_shared::transport::TransportTuning;

/// The local end of passage: an OpenAI-compatible endpoint on 127.0.0.1
/// whose requests travel through a tunnel (QUIC, or TLS over TCP where UDP
/// is blocked) to passage-relay.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the local endpoint and keep the tunnel up.
    Run(RunArgs),
    /// Check each hop to the upstream (bundle, name, relay, QUIC, TCP,
    /// certificate, upstream, round trip, loss, throughput) and name the
    /// first that fails; exits 0 when requests would work.
    Doctor {
        #[command(flatten)]
        run: RunArgs,
        /// Print the findings as one JSON object.
        #[arg(long)]
        json: bool,
        /// Seconds to wait for each handshake and each answer.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=120))]
        timeout: u64,
        /// Seconds each throughput transfer (up, then down) runs.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=60))]
        transfer_seconds: u64,
    },
}

/// The flags of `run`, which `doctor` takes too (so one config file serves both).
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// TOML file setting any of these flags by name (e.g.
    /// `connect-wait = 10`); flags given here win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bundle file from `passage-relay issue`.
    #[arg(long)]
    bundle: PathBuf,
    /// Local address apps connect to (base_url http://ADDR/v1).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Another relay HOST:PORT to fail over to, after the bundle's (repeatable).
    #[arg(long = "relay")]
    relays: Vec<String>,
    /// Transport to the relays: auto (QUIC, falling back to TLS over TCP
    /// where UDP is blocked), quic or tcp.
    #[arg(long, default_value = "auto")]
    transport: TransportChoice,
    /// The relays' TCP port, when the relay serves TCP on another port
    /// than its UDP one (its --listen-tcp).
    #[arg(long)]
    tcp_port: Option<u16>,
    /// File remembering which transport last worked per relay, so a
    /// restart on a network that blocks UDP goes straight to TCP
    /// (default: $XDG_STATE_HOME or ~/.local/state, then
    /// passage-client/transports.json); `none` keeps it in memory.
    #[arg(long, value_name = "FILE")]
    state_file: Option<PathBuf>,
    /// Seconds a request waits for the tunnel before failing with 503.
    #[arg(long, default_value_t = 4)]
    connect_wait: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Environment variable holding a local access token (16+
    /// characters): apps must then send it as their API key, and it
    /// goes no further than this client.
    #[arg(long, value_name = "VAR")]
    access_token_env: Option<String>,
    /// Allow --listen on an address other machines can reach (needs
    /// --access-token-env).
    #[arg(long)]
    allow_non_loopback: bool,
    /// A web origin (scheme://host[:port]) whose browser requests are
    /// allowed, with CORS headers (repeatable); other origins get 403.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> std::process::ExitCode {
    passage_shared::process::run_command_line("passage-client", &["run", "doctor"], &[], run)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => serve(args),
        Command::Doctor {
            run,
            json,
            timeout,
            transfer_seconds,
        } => doctor(run, json, timeout, transfer_seconds),
    }
}

/// `doctor`: prints its findings; fails (exit 1) when requests would not work.
fn doctor(args: RunArgs, json: bool, timeout: u64, transfer_seconds: u64) -> anyhow::Result<()> {
    let mut tuning = TransportTuning::default();
    args.common.apply(&mut tuning).map_err(anyhow::Error::msg)?;
    let options = passage_client::DoctorOptions {
        extra_relays: args.relays,
        choice: args.transport,
        tcp_port: args.tcp_port,
        tuning,
        timeout: Duration::from_secs(timeout),
        transfer_time: Duration::from_secs(transfer_seconds),
    };
    let runtime = args
        .common
        .runtime()
        .context("starting the async runtime")?;
    let report = runtime.block_on(passage_client::examine(&args.bundle, &options));
    if json {
        println!("{}", report.json());
    } else {
        print!("{}", report.text());
    }
    if report.ok {
        Ok(())
    } else {
        std::process::exit(1)
    }
}

fn serve(args: RunArgs) -> anyhow::Result<()> {
    let RunArgs {
        config: _,
        bundle,
        listen,
        relays,
        transport: choice,
        tcp_port,
        state_file,
        connect_wait,
        metrics,
        access_token_env,
        allow_non_loopback,
        cors_origins,
        common,
    } = args;
    passage_shared::process::init_logging();
    let mut transport = TransportTuning::default();
    common.apply(&mut transport).map_err(anyhow::Error::msg)?;
    let bundle = Bundle::load(&bundle)?;
    let mut config = ClientConfig::new(bundle, listen);
    config.extra_relays = relays;
    config.connect_wait = Duration::from_secs(connect_wait);
    config.drain_timeout = common.drain_timeout();
    config.ws_max_message = common.ws_max_message();
    config.tunnel = TunnelSettings::for_transport(transport);
    config.tunnel.choice = choice;
    config.tcp_port = tcp_port;
    config.state_file = match state_file {
        Some(path) if path.as_os_str() == "none" => None,
        Some(path) => Some(path),
        None => passage_client::default_state_file(),
    };
    config.metrics = metrics;
    config.allow_non_loopback = allow_non_loopback;
    config.cors_origins = cors_origins;
    if let Some(var) = access_token_env {
        let token = std::env::var(&var).with_context(|| {
            format!("--access-token-env {var}: the variable is not set or not UTF-8")
        })?;
        config.access_token = Some(passage_client::AccessToken(token.trim().to_owned()));
    }
    passage_shared::process::serve_until_signal(&common, |shutdown| async {
        let client = Client::bind(config)
            .await
            .context("starting passage-client")?;
        client.run(shutdown).await;
        Ok(())
    })
}
