//! The command line of passage-relay: its subcommands and their flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use passage_relay::state::FailMode;
use passage_relay::usage_report::Grouping;
use passage_shared::process::CommonArgs;

/// The subcommands whose flags a `--config` file may set; the SIGHUP
/// reload parses the command line with the same list as the start did.
pub(crate) const CONFIGURED_SUBCOMMANDS: [&str; 2] = ["serve", "doctor"];

/// The relay end of passage: holds the API key and calls the upstream API.
#[derive(Debug, Parser)]
#[command(version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Where the relay keeps its state: `serve` keeps it there, `usage` reads it.
#[derive(Debug, clap::Args)]
pub(crate) struct StoreArgs {
    /// Directory for the relay's own data, the usage ledger
    /// (usage.sqlite3) among it; default: the --pki directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// Keep the limits and the usage ledger in this Redis, shared by every
    /// relay pointed at it: redis://[:PASSWORD@]HOST:PORT[/DB], rediss://
    /// for TLS. Default: this relay's memory and --data-dir.
    #[arg(
        long,
        value_name = "URL",
        env = "PASSAGE_STATE",
        hide_env_values = true
    )]
    pub(crate) state: Option<String>,
}

/// The flags of `serve`, which `doctor` takes too (so one config file serves both).
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// TOML file setting any of these flags by name (e.g.
    /// `idle-timeout = 600`); flags given here win over it.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// PKI directory made by `init`.
    #[arg(long)]
    pub(crate) pki: PathBuf,
    /// UDP address to listen on (QUIC); TLS over TCP is served on the
    /// same port unless --listen-tcp or --no-tcp says otherwise.
    #[arg(long, default_value = "0.0.0.0:4433")]
    pub(crate) listen: SocketAddr,
    /// TCP address for the fallback transport (TLS over TCP, for
    /// clients whose networks block UDP); default: --listen's.
    #[arg(long, value_name = "ADDR", conflicts_with = "no_tcp")]
    pub(crate) listen_tcp: Option<SocketAddr>,
    /// Serve QUIC only, no TCP fallback.
    #[arg(long)]
    pub(crate) no_tcp: bool,
    /// Upstream base URL; request paths are appended to it.
    #[arg(long, default_value = "https://api.openai.com")]
    pub(crate) upstream: String,
    /// Environment variable holding an upstream API key (repeatable:
    /// keys are used in turn, one that gets 401 or 429 rests); when
    /// set, the key replaces the app's Authorization header.
    #[arg(long)]
    pub(crate) api_key_env: Vec<String>,
    /// Speak only HTTP/2 to the upstream: prior knowledge (h2c) for an
    /// http:// upstream such as a local gateway; an https upstream must
    /// offer h2. One connection then carries every stream.
    #[arg(long)]
    pub(crate) upstream_http2: bool,
    /// Requests one upstream HTTP/2 connection carries at once; more
    /// open another connection rather than queue (servers allow 100 or
    /// more).
    #[arg(long, default_value_t = passage_relay::upstream::DEFAULT_STREAMS_PER_CONNECTION, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) upstream_streams_per_connection: u32,
    /// Seconds to wait for a TCP connection to the upstream.
    #[arg(long, default_value_t = 10)]
    pub(crate) connect_timeout: u64,
    /// Seconds of upstream silence (before the head or between chunks)
    /// after which the request fails with 504.
    #[arg(long, default_value_t = 600)]
    pub(crate) idle_timeout: u64,
    /// Seconds without a message either way after which a WebSocket
    /// session is closed.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) ws_idle_timeout: u64,
    /// Seconds between status lines (connections, open streams, tasks),
    /// logged only when those figures changed.
    #[arg(long, default_value_t = 10)]
    pub(crate) status_interval: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics: Option<SocketAddr>,
    /// KiB of a request body read, at most, to find the model of a
    /// client whose models are restricted (`allow_models`).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub(crate) model_scan_limit_kib: u64,
    /// Largest request body accepted, in MiB (413 above it).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub(crate) max_body_mib: u64,
    /// Request streams one client connection may have open at once;
    /// more wait for a free one.
    #[arg(long, default_value_t = passage_shared::transport::MAX_CONCURRENT_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_streams_per_connection: u32,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// While the --state store is unreachable: `open` serves under this
    /// relay's own limits, `closed` refuses limited clients' requests
    /// with 503 state_unavailable.
    #[arg(long, value_enum, default_value_t = FailMode::Open)]
    pub(crate) state_fail: FailMode,
    /// MiB the response cache may hold (in memory, or in the --state
    /// Redis); clients use it only where their rules say `cache`.
    #[arg(long, default_value_t = 256)]
    pub(crate) cache_mib: u64,
    /// Keep no usage ledger (the usage line and metrics stay).
    #[arg(long)]
    pub(crate) no_ledger: bool,
    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Make a private CA and the relay certificate.
    Init {
        /// Directory for the PKI (created, mode 0700).
        #[arg(long)]
        dir: PathBuf,
        /// DNS name or IP address clients use to reach the relay (repeatable;
        /// default: localhost, 127.0.0.1, ::1).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Issue a client certificate and write its bundle file.
    Issue {
        /// PKI directory made by `init`.
        #[arg(long)]
        dir: PathBuf,
        /// Client name (letters, digits, '.', '_', '-').
        #[arg(long)]
        name: String,
        /// Relay address HOST:PORT the client connects to (repeatable).
        #[arg(long = "relay", required = true)]
        relays: Vec<String>,
        /// TLS name to verify the relay by (default: each relay's host).
        #[arg(long)]
        server_name: Option<String>,
        /// Days the client certificate is valid.
        #[arg(long, default_value_t = passage_shared::pki::DEFAULT_CLIENT_DAYS)]
        days: i64,
        /// Bundle file to write (default: DIR/clients/NAME.toml).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke every certificate issued to a client (a running relay applies it within 30 s, or on SIGHUP).
    Revoke {
        /// PKI directory made by `init`.
        #[arg(long)]
        dir: PathBuf,
        /// Client name given to `issue`.
        #[arg(long)]
        name: String,
    },
    /// Renew a client's bundle (--name) or the relay's certificate (--server).
    #[command(group(clap::ArgGroup::new("which").required(true).args(["name", "server"])))]
    Renew {
        /// PKI directory made by `init`.
        #[arg(long)]
        dir: PathBuf,
        /// The client whose bundle to renew: same name, relays and server
        /// name, a new key and certificate, written over its bundle file.
        #[arg(long)]
        name: Option<String>,
        /// Renew the relay's own certificate (same CA and names); a running
        /// relay loads it within 30 s or on SIGHUP, clients need no change.
        #[arg(long)]
        server: bool,
        /// With --name: how long the client's older certificates keep
        /// working (e.g. 24h, 7d, 0s to revoke them at once).
        #[arg(long, default_value = "24h")]
        grace: String,
        /// Days the new certificate is valid (default: 730 for a client,
        /// 1825 for the relay).
        #[arg(long)]
        days: Option<i64>,
        /// With --name: the client's bundle file (default: DIR/clients/NAME.toml).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List issued client certificates with their expiry and state.
    List {
        /// PKI directory made by `init`.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Accept tunnel connections and forward requests to the upstream.
    Serve(ServeArgs),
    /// Check what `serve` with these flags needs (PKI and certificate,
    /// listen sockets, API keys, upstream reach and the keys' verdict, the
    /// state backend) and name the first that fails; exits 0 when it would serve.
    Doctor {
        #[command(flatten)]
        serve: ServeArgs,
        /// Print the findings as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the usage ledger's totals by client, model or day.
    Usage(UsageArgs),
}

/// The flags of `usage`.
#[derive(Debug, clap::Args)]
pub(crate) struct UsageArgs {
    /// The relay's config file: its pki, data-dir and state settings
    /// say where the ledger is (flags given here win).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// The relay's PKI directory (its data directory by default).
    #[arg(long)]
    pub(crate) pki: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// The period: requests that ended within it (e.g. 30m, 24h, 30d).
    #[arg(long, default_value = "24h")]
    pub(crate) since: String,
    /// One row per client, model or UTC day.
    #[arg(long, value_enum, default_value_t = Grouping::Client)]
    pub(crate) by: Grouping,
    /// Print JSON.
    #[arg(long, conflicts_with = "csv")]
    pub(crate) json: bool,
    /// Print CSV.
    #[arg(long)]
    pub(crate) csv: bool,
}
