//! Command line of passage-relay: parses arguments and calls the library.

passage_shared::tuned_allocator!();

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use passage_relay::policy::{POLICY_SECTIONS, Policy, PolicyTables};
use passage_relay::state::{Backend, FailMode, StateConfig};
use passage_relay::upstream::{ApiKey, UpstreamBase};
use passage_relay::usage_report::{Format, Grouping};
use passage_relay::{Relay, RelayConfig, TcpListen, pki_cmd};
use passage_shared::config_file::{self, FileSetting};
use passage_shared::process::CommonArgs;

/// The relay end of passage: holds the API key and calls the upstream API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the relay keeps its state: `serve` keeps it there, `usage` reads it.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// Directory for the relay's own data, the usage ledger
    /// (usage.sqlite3) among it; default: the --pki directory.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Keep the limits and the usage ledger in this Redis, shared by every
    /// relay pointed at it: redis://[:PASSWORD@]HOST:PORT[/DB], rediss://
    /// for TLS. Default: this relay's memory and --data-dir.
    #[arg(
        long,
        value_name = "URL",
        env = "PASSAGE_STATE",
        hide_env_values = true
    )]
    state: Option<String>,
}

/// The flags of `serve`, which `doctor` takes too (so one config file serves both).
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML file setting any of these flags by name (e.g.
    /// `idle-timeout = 600`); flags given here win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// PKI directory made by `init`.
    #[arg(long)]
    pki: PathBuf,
    /// UDP address to listen on (QUIC); TLS over TCP is served on the
    /// same port unless --listen-tcp or --no-tcp says otherwise.
    #[arg(long, default_value = "0.0.0.0:4433")]
    listen: SocketAddr,
    /// TCP address for the fallback transport (TLS over TCP, for
    /// clients whose networks block UDP); default: --listen's.
    #[arg(long, value_name = "ADDR", conflicts_with = "no_tcp")]
    listen_tcp: Option<SocketAddr>,
    /// Serve QUIC only, no TCP fallback.
    #[arg(long)]
    no_tcp: bool,
    /// Upstream base URL; request paths are appended to it.
    #[arg(long, default_value = "https://api.openai.com")]
    upstream: String,
    /// Environment variable holding an upstream API key (repeatable:
    /// keys are used in turn, one that gets 401 or 429 rests); when
    /// set, the key replaces the app's Authorization header.
    #[arg(long)]
    api_key_env: Vec<String>,
    /// Speak only HTTP/2 to the upstream: prior knowledge (h2c) for an
    /// http:// upstream such as a local gateway; an https upstream must
    /// offer h2. One connection then carries every stream.
    #[arg(long)]
    upstream_http2: bool,
    /// Requests one upstream HTTP/2 connection carries at once; more
    /// open another connection rather than queue (servers allow 100 or
    /// more).
    #[arg(long, default_value_t = passage_relay::upstream::DEFAULT_STREAMS_PER_CONNECTION, value_parser = clap::value_parser!(u32).range(1..))]
    upstream_streams_per_connection: u32,
    /// Seconds to wait for a TCP connection to the upstream.
    #[arg(long, default_value_t = 10)]
    connect_timeout: u64,
    /// Seconds of upstream silence (before the head or between chunks)
    /// after which the request fails with 504.
    #[arg(long, default_value_t = 600)]
    idle_timeout: u64,
    /// Seconds without a message either way after which a WebSocket
    /// session is closed.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..))]
    ws_idle_timeout: u64,
    /// Seconds between status lines (connections, open streams, tasks),
    /// logged only when those figures changed.
    #[arg(long, default_value_t = 10)]
    status_interval: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// KiB of a request body read, at most, to find the model of a
    /// client whose models are restricted (`allow_models`).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
    model_scan_limit_kib: u64,
    /// Largest request body accepted, in MiB (413 above it).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    max_body_mib: u64,
    /// Request streams one client connection may have open at once;
    /// more wait for a free one.
    #[arg(long, default_value_t = passage_shared::transport::MAX_CONCURRENT_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    max_streams_per_connection: u32,
    #[command(flatten)]
    store: StoreArgs,
    /// While the --state store is unreachable: `open` serves under this
    /// relay's own limits, `closed` refuses limited clients' requests
    /// with 503 state_unavailable.
    #[arg(long, value_enum, default_value_t = FailMode::Open)]
    state_fail: FailMode,
    /// MiB the response cache may hold (in memory, or in the --state
    /// Redis); clients use it only where their rules say `cache`.
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
    /// Keep no usage ledger (the usage line and metrics stay).
    #[arg(long)]
    no_ledger: bool,
    #[command(flatten)]
    common: CommonArgs,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
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
    Usage {
        /// The relay's config file: its pki, data-dir and state settings
        /// say where the ledger is (flags given here win).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The relay's PKI directory (its data directory by default).
        #[arg(long)]
        pki: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
        /// The period: requests that ended within it (e.g. 30m, 24h, 30d).
        #[arg(long, default_value = "24h")]
        since: String,
        /// One row per client, model or UTC day.
        #[arg(long, value_enum, default_value_t = Grouping::Client)]
        by: Grouping,
        /// Print JSON.
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        /// Print CSV.
        #[arg(long)]
        csv: bool,
    },
}

fn main() -> std::process::ExitCode {
    let parsed = passage_shared::config_file::parse_with_config::<Cli>(
        &["serve", "doctor"],
        &POLICY_SECTIONS,
    )
    .map_err(anyhow::Error::from)
    .and_then(run);
    match parsed {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("passage-relay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init { dir, hosts } => pki_cmd::init(&dir, &hosts),
        Command::Issue {
            dir,
            name,
            relays,
            server_name,
            days,
            out,
        } => pki_cmd::issue(&dir, &name, &relays, server_name.as_deref(), days, out).map(|_| ()),
        Command::Revoke { dir, name } => pki_cmd::revoke(&dir, &name),
        Command::List { dir } => pki_cmd::list(&dir),
        Command::Renew {
            dir,
            name,
            server,
            grace,
            days,
            out,
        } => match name {
            Some(name) if !server => {
                let grace = parse_grace(&grace)?;
                let days = days.unwrap_or(passage_shared::pki::DEFAULT_CLIENT_DAYS);
                pki_cmd::renew_client(&dir, &name, grace, days, out).map(|_| ())
            }
            _ => pki_cmd::renew_server(&dir, days.unwrap_or(passage_shared::pki::RELAY_DAYS)),
        },
        Command::Usage {
            config,
            pki,
            store,
            since,
            by,
            json,
            csv,
        } => {
            let mut location = StoreLocation {
                pki,
                data_dir: store.data_dir,
                state: store.state,
            };
            if let Some(path) = config {
                location.fill_from(&path)?;
            }
            let format = match (json, csv) {
                (true, _) => Format::Json,
                (_, true) => Format::Csv,
                _ => Format::Table,
            };
            usage(location, &since, by, format)
        }
        Command::Serve(args) => {
            passage_shared::process::init_logging();
            let (config, common, file) = relay_config(args)?;
            serve(config, &common, file)
        }
        Command::Doctor { serve, json } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let report = match relay_config(serve) {
                Ok((config, _, _)) => runtime.block_on(passage_relay::doctor::examine(&config)),
                // A flag, the config file or a key variable is unusable:
                // `serve` would stop here too.
                Err(e) => {
                    passage_shared::doctor::Report::new(vec![passage_shared::doctor::Check::fail(
                        "config",
                        format!("{e:#}"),
                        "fix the flag, config file key or variable named",
                    )])
                }
            };
            if json {
                println!("{}", report.json());
            } else {
                print!("{}", report.text());
            }
            if !report.ok {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// The relay's configuration from the flags of `serve` (and its config file).
fn relay_config(args: ServeArgs) -> anyhow::Result<(RelayConfig, CommonArgs, Option<ConfigFile>)> {
    let ServeArgs {
        config: config_path,
        pki,
        listen,
        listen_tcp,
        no_tcp,
        upstream,
        api_key_env,
        connect_timeout,
        idle_timeout,
        ws_idle_timeout,
        status_interval,
        metrics,
        model_scan_limit_kib,
        max_body_mib,
        max_streams_per_connection,
        upstream_http2,
        upstream_streams_per_connection,
        store,
        state_fail,
        cache_mib,
        no_ledger,
        common,
    } = args;
    let upstream = UpstreamBase::parse(&upstream)?;
    let mut config = RelayConfig::new(listen, pki.clone(), upstream);
    config.state = StateConfig {
        backend: match store.state {
            Some(url) => Backend::Redis { url },
            None => Backend::Embedded {
                required: store.data_dir.is_some(),
                data_dir: store.data_dir.unwrap_or(pki),
            },
        },
        fail: state_fail,
        cache_bytes: cache_mib.saturating_mul(1024 * 1024),
        ledger: !no_ledger,
    };
    config.listen_tcp = match (no_tcp, listen_tcp) {
        (true, _) => TcpListen::Off,
        (false, Some(addr)) => TcpListen::At(addr),
        (false, None) => TcpListen::SamePort,
    };
    config.api_keys = api_key_env
        .iter()
        .map(|var| read_api_key(var))
        .collect::<anyhow::Result<_>>()?;
    config.connect_timeout = Duration::from_secs(connect_timeout);
    config.upstream_http2 = upstream_http2;
    config.upstream_streams_per_connection = upstream_streams_per_connection;
    config.idle_read_timeout = Duration::from_secs(idle_timeout);
    anyhow::ensure!(status_interval > 0, "--status-interval must be at least 1");
    config.status_interval = Duration::from_secs(status_interval);
    config.drain_timeout = common.drain_timeout();
    config.metrics = metrics;
    config.max_body = max_body_mib * 1024 * 1024;
    config.ws_limits = passage_shared::websocket::SessionLimits {
        max_message: common.ws_max_message(),
        idle: Duration::from_secs(ws_idle_timeout),
    };
    config.max_streams_per_connection = max_streams_per_connection;
    config.model_scan_limit = usize::try_from(model_scan_limit_kib * 1024)
        .context("--model-scan-limit-kib is too large")?;
    common
        .apply(&mut config.transport)
        .map_err(anyhow::Error::msg)?;
    let file = match config_path {
        Some(path) => {
            config.policy = load_policy(&path).map_err(anyhow::Error::msg)?;
            Some(ConfigFile {
                settings: current_settings().map_err(anyhow::Error::msg)?,
                path,
            })
        }
        None => None,
    };
    Ok((config, common, file))
}

/// A grace period: `0`, or a number and s, m, h or d.
fn parse_grace(text: &str) -> anyhow::Result<Duration> {
    if text.trim().trim_end_matches(['s', 'm', 'h', 'd']) == "0" {
        return Ok(Duration::ZERO);
    }
    let ms = passage_relay::usage_report::parse_period(text)
        .map_err(|e| anyhow::anyhow!("--grace {e}"))?;
    Ok(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// Where a relay keeps its ledger, as `usage` was told.
struct StoreLocation {
    pki: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    state: Option<String>,
}

impl StoreLocation {
    /// Takes the settings the flags left unset from the relay's config file.
    fn fill_from(&mut self, path: &std::path::Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("{} is not TOML", path.display()))?;
        let text_of = |key: &str| {
            table
                .get(key)
                .or_else(|| table.get(&key.replace('-', "_")))
                .and_then(toml::Value::as_str)
                .map(str::to_owned)
        };
        self.pki = self
            .pki
            .take()
            .or_else(|| text_of("pki").map(PathBuf::from));
        self.data_dir = self
            .data_dir
            .take()
            .or_else(|| text_of("data-dir").map(PathBuf::from));
        self.state = self.state.take().or_else(|| text_of("state"));
        Ok(())
    }
}

/// `passage-relay usage`: reads the ledger where the relay keeps it.
fn usage(
    location: StoreLocation,
    since: &str,
    grouping: Grouping,
    format: Format,
) -> anyhow::Result<()> {
    let period = passage_relay::usage_report::parse_period(since)
        .map_err(|e| anyhow::anyhow!("--since {e}"))?;
    let since_ms = passage_relay::ledger::LedgerEntry::now_ms().saturating_sub(period);
    let rows = match (location.state, location.data_dir.or(location.pki)) {
        (Some(url), _) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime
                .block_on(passage_relay::state::redis::read_totals(
                    &url, since_ms, grouping,
                ))
                .map_err(anyhow::Error::msg)?
        }
        (None, Some(dir)) => {
            let path = dir.join(passage_relay::ledger::LEDGER_FILE);
            anyhow::ensure!(
                path.exists(),
                "no usage ledger at {} (has a relay run with this --data-dir or --pki?)",
                path.display()
            );
            passage_relay::ledger::read_totals(&path, since_ms, grouping)?
        }
        (None, None) => anyhow::bail!(
            "say where the ledger is: --config FILE, --data-dir DIR, --pki DIR or --state URL"
        ),
    };
    print!(
        "{}",
        passage_relay::usage_report::render(&rows, grouping, format)
    );
    Ok(())
}

/// The config file a relay was started with, for reloads.
struct ConfigFile {
    path: PathBuf,
    /// The flag settings it gave at start, to tell which changed.
    settings: Vec<FileSetting>,
}

/// Parses the process's command line and config file again, as at start.
fn current_settings() -> Result<Vec<FileSetting>, String> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    config_file::try_parse_with_config::<Cli>(&argv, &["serve", "doctor"], &POLICY_SECTIONS)
        .map(|(_, settings)| settings)
        .map_err(|e| e.to_string())
}

/// Reads and checks the `[clients.NAME]` and `[unlisted_clients]` tables.
fn load_policy(path: &std::path::Path) -> Result<Policy, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let tables: PolicyTables =
        toml::from_str(&text).map_err(|e| config_file::section_error(path, &text, &e))?;
    Policy::new(tables).map_err(|e| format!("{}: {e}", path.display()))
}

/// SIGHUP: re-reads the config file (whole, as at start) and puts its
/// policy in force, or keeps the old one if the file is refused; then
/// re-reads the revocation list either way.
fn reload_config(file: Option<&ConfigFile>, handle: &passage_relay::ReloadHandle) {
    if let Some(file) = file {
        let checked =
            current_settings().and_then(|settings| Ok((settings, load_policy(&file.path)?)));
        match checked {
            Ok((settings, policy)) => {
                handle.set_policy(policy);
                for key in changed_keys(&file.settings, &settings) {
                    tracing::warn!(key = %key, "changed in the config file; takes effect after a restart");
                }
                tracing::info!(file = %file.path.display(), "config reloaded: client rules and limits in force");
            }
            Err(e) => tracing::warn!(
                error = %e,
                "config refused on reload; the previous one stays in force"
            ),
        }
    }
    handle.reload();
}

/// Keys whose flag settings differ between two reads of the file.
fn changed_keys(before: &[FileSetting], after: &[FileSetting]) -> Vec<String> {
    let mut keys: Vec<String> = before
        .iter()
        .filter(|old| !after.contains(old))
        .chain(after.iter().filter(|new| !before.contains(new)))
        .map(|setting| setting.key.clone())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

fn read_api_key(var: &str) -> anyhow::Result<ApiKey> {
    let key = std::env::var(var)
        .with_context(|| format!("--api-key-env {var}: the variable is not set or not UTF-8"))?;
    let key = key.trim().to_owned();
    anyhow::ensure!(
        !key.is_empty(),
        "--api-key-env {var}: the variable is empty"
    );
    Ok(ApiKey::new(key))
}

fn serve(config: RelayConfig, common: &CommonArgs, file: Option<ConfigFile>) -> anyhow::Result<()> {
    let runtime = common.runtime().context("starting the async runtime")?;
    runtime.block_on(async {
        let relay = Relay::bind(config.clone()).with_context(|| {
            format!(
                "starting the relay on {} with PKI {}",
                config.listen,
                config.pki_dir.display()
            )
        })?;
        if !config.api_keys.is_empty() {
            tracing::info!(
                keys = config.api_keys.len(),
                "the relay's API keys replace the apps' Authorization"
            );
        } else {
            tracing::info!("no API key configured: apps' Authorization is passed through");
        }
        let shutdown = passage_shared::process::shutdown_on_signal()
            .context("installing the SIGTERM/SIGINT handlers")?;
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        let reload = relay.reload_handle();
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the config file, the revocation list and the relay certificate");
                // A reload that panics must not end the reloads that follow.
                let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    reload_config(file.as_ref(), &reload);
                }));
                if attempt.is_err() {
                    tracing::error!(
                        "the reload failed unexpectedly; the previous config stays in force"
                    );
                    reload.reload();
                }
            }
        });
        relay.run(shutdown).await;
        Ok(())
    })
}
