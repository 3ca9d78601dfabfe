//! Process setup both binaries share: the command line's run and exit
//! code, logging to stderr filtered by `RUST_LOG`, the async runtime, and a
//! shutdown token cancelled by SIGTERM or SIGINT.

use std::io::IsTerminal;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::transport::{Congestion, TransportTuning};

/// Command-line options both programs take: shutdown, runtime and QUIC tuning.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Seconds in-flight responses may run on after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    drain_timeout: u64,
    // The measurement: BENCHMARKS.md, section 1 (Request overhead), the
    // note on runtime and logging. (A `//` comment: clap shows `///` as help.)
    /// Runtime threads: 1 runs everything on one thread (measured fastest
    /// on small machines); more for a busy many-core host.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Congestion controller for what this end sends: bbr, cubic or newreno.
    #[arg(long, default_value = "bbr")]
    congestion: Congestion,
    /// Per-stream receive window in MiB (the connection window is 2.5×).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    stream_window_mib: u32,
    /// Seconds between keep-alive packets on an idle tunnel connection.
    #[arg(long, default_value = "1", value_parser = parse_seconds)]
    keep_alive: Duration,
    /// Seconds of silence after which a tunnel connection counts as dead
    /// (the lower of the two ends' values applies).
    #[arg(long, default_value = "5", value_parser = parse_seconds)]
    tunnel_idle_timeout: Duration,
    /// Largest WebSocket message either way, in MiB: a larger one closes
    /// the session with 1009.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    ws_max_message_mib: u32,
}

/// Parses a number of seconds from 0.01 to 3600, fractions allowed.
fn parse_seconds(value: &str) -> Result<Duration, String> {
    let seconds: f64 = value
        .parse()
        .map_err(|_| format!("{value:?} is not a number of seconds"))?;
    if !(0.01..=3600.0).contains(&seconds) {
        return Err(format!("{value} is not between 0.01 and 3600 seconds"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

impl CommonArgs {
    /// The drain timeout.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout)
    }

    /// The largest WebSocket message, in bytes.
    pub fn ws_max_message(&self) -> usize {
        (self.ws_max_message_mib as usize) << 20
    }

    /// Writes the QUIC options into `tuning`; refuses a keep-alive that
    /// would not fit inside the idle timeout.
    pub fn apply(&self, tuning: &mut TransportTuning) -> Result<(), String> {
        if self.keep_alive >= self.tunnel_idle_timeout {
            return Err(format!(
                "--keep-alive ({:?}) must be shorter than --tunnel-idle-timeout ({:?})",
                self.keep_alive, self.tunnel_idle_timeout
            ));
        }
        tuning.congestion = self.congestion;
        tuning.stream_window = self.stream_window_mib << 20;
        tuning.keep_alive = self.keep_alive;
        tuning.idle_timeout = self.tunnel_idle_timeout;
        Ok(())
    }

    /// The runtime with the chosen number of threads.
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        runtime(usize::from(self.threads))
    }
}

/// Logs to stderr at the level `RUST_LOG` sets (default `info`), with
/// colours only when stderr is a terminal.
///
/// Lines are written synchronously: a background writer thread
/// (tracing-appender) cost more per request than the write itself, because
/// every line woke that thread; see BENCHMARKS.md, section 1 (Request
/// overhead), the note on runtime and logging.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// The async runtime of a binary: with `threads` = 1 (the default of both
/// programs) a single-threaded runtime, else a multi-threaded one.
///
/// One thread per program measured faster, in throughput and latency, than
/// tokio's default multi-threaded runtime, whose cross-thread wake-ups cost
/// more than they bring when client, relay, app and upstream share few
/// cores; see BENCHMARKS.md, section 1 (Request overhead), the note on
/// runtime and logging.
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// A token cancelled on the first SIGTERM or SIGINT; must be called inside
/// a tokio runtime.
fn shutdown_on_signal() -> std::io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutdown signal received; draining in-flight requests");
        token.cancel();
    });
    Ok(shutdown)
}

/// The `main` of both programs: parses the command line (a `--config` file
/// may fill the flags of `subcommands` and the tables `sections`), runs
/// it, and on an error prints `PROGRAM: error: cause: …` and exits 1.
pub fn run_command_line<C, E>(
    program: &str,
    subcommands: &[&str],
    sections: &[&str],
    run: impl FnOnce(C) -> Result<(), E>,
) -> std::process::ExitCode
where
    C: clap::Parser,
    E: From<crate::config_file::ConfigFileError> + std::fmt::Display,
{
    let outcome = crate::config_file::parse_with_config::<C>(subcommands, sections)
        .map_err(E::from)
        .and_then(run);
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Why a program could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The async runtime could not be built.
    #[error("starting the async runtime")]
    Runtime(#[source] std::io::Error),
    /// The SIGTERM/SIGINT handlers could not be installed.
    #[error("installing the SIGTERM/SIGINT handlers")]
    Signals(#[source] std::io::Error),
}

/// Runs `serve` to its end on the runtime `common` asks for, handing it a
/// token that the first SIGTERM or SIGINT cancels.
pub fn serve_until_signal<F, E>(
    common: &CommonArgs,
    serve: impl FnOnce(CancellationToken) -> F,
) -> Result<(), E>
where
    F: std::future::Future<Output = Result<(), E>>,
    E: From<StartError>,
{
    let runtime = common.runtime().map_err(StartError::Runtime)?;
    runtime.block_on(async {
        let shutdown = shutdown_on_signal().map_err(StartError::Signals)?;
        serve(shutdown).await
    })
}
