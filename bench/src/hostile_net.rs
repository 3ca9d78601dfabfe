//! passage-hostile-net: the test bed for bad networks (issue 14, item 8).
//!
//! As root, it makes two network namespaces joined by a veth pair
//! (198.18.0.0/29, nothing routed anywhere else), runs the mock upstream and
//! passage-relay in one and passage-client in the other, imposes each
//! scenario with an nftables table in the client's namespace, and prints a
//! table: scenario | target | measured | pass. Namespaces, table and
//! processes go on every exit path: normal end, error, panic (unwinding),
//! SIGINT/SIGTERM/SIGHUP, and the watchdog that ends an overlong run.
//!
//! The harness's main thread moves into the client namespace (so it reaches
//! the client on 127.0.0.1 there) and runs everything on a current-thread
//! runtime, so every socket it opens is in that namespace.

/// Writes a line to stderr, ignoring errors: a closed pipe must not panic
/// the harness before it has cleaned up.
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Writes a line to stdout, ignoring errors (as `note!`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod app;
pub mod bed;
pub mod procs;
pub mod relay_faults;
pub mod scenarios;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use self::bed::TestBed;
use self::procs::{Capabilities, Stack};
use self::scenarios::{GROUPS, Row};
use crate::stack::find_program;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory with passage-relay, passage-client and passage-mock-upstream.
    pub bin_dir: PathBuf,
    /// Scenario groups to run, in order (all of [`GROUPS`] when empty).
    pub only: Vec<String>,
    /// The whole run ends (cleaned up, exit 3) after this long, whatever happens.
    pub time_limit: Duration,
    /// Where the programs' logs and the PKI go (a temporary directory when unset).
    pub log_dir: Option<PathBuf>,
}

/// Exit status when a row failed.
const EXIT_FAILED: u8 = 1;
/// Exit status when the run itself broke (or was interrupted).
const EXIT_ERROR: u8 = 2;
/// Exit status when the watchdog ended the run.
const EXIT_TIMEOUT: u8 = 3;

/// Whether the test bed can run here: the `ip` and `nft` programs, or why not.
pub fn preflight() -> Result<(PathBuf, PathBuf), String> {
    if !rustix::process::geteuid().is_root() {
        return Err("needs root (network namespaces and nftables)".to_owned());
    }
    let ip = find_program("ip").ok_or("the ip program (iproute2) is missing")?;
    let nft = find_program("nft").ok_or("the nft program (nftables) is missing")?;
    Ok((ip, nft))
}

/// Runs the test bed and prints the table; the process's exit status.
pub fn main(options: Options) -> ExitCode {
    let (ip, nft) = match preflight() {
        Ok(programs) => programs,
        Err(reason) => {
            say!("hostile-net: SKIP: {reason}");
            return ExitCode::SUCCESS;
        }
    };
    if let Err(e) = check_options(&options) {
        note!("hostile-net: {e:#}");
        return ExitCode::from(EXIT_ERROR);
    }
    bed::remove_stale(&ip);
    let bed = Arc::new(TestBed::new(ip, nft));
    let _teardown = Teardown(bed.clone());
    start_watchdog(bed.clone(), options.time_limit);

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            note!("hostile-net: cannot start a runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let mut rows = Vec::new();
    let result = runtime.block_on(run(bed.clone(), &options, &mut rows));
    // Kills the processes still held by tasks before the namespaces go.
    drop(runtime);
    bed.teardown();

    if !rows.is_empty() {
        say!("{}", scenarios::render(&rows));
    }
    let passed = rows.iter().filter(|r| r.pass).count();
    match result {
        Err(e) => {
            note!("hostile-net: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
        Ok(()) if passed == rows.len() => {
            say!("hostile-net: all {passed} rows pass");
            ExitCode::SUCCESS
        }
        Ok(()) => {
            say!(
                "hostile-net: {} of {} rows FAIL",
                rows.len() - passed,
                rows.len()
            );
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn check_options(options: &Options) -> anyhow::Result<()> {
    for program in ["passage-relay", "passage-client", "passage-mock-upstream"] {
        let path = options.bin_dir.join(program);
        anyhow::ensure!(
            path.is_file(),
            "{} is missing (build it: cargo build --release --bin {program})",
            path.display()
        );
    }
    for group in &options.only {
        anyhow::ensure!(
            GROUPS.contains(&group.as_str()),
            "unknown scenario {group:?}; known: {}",
            GROUPS.join(", ")
        );
    }
    Ok(())
}

/// Tears the test bed down when dropped (also while a panic unwinds).
struct Teardown(Arc<TestBed>);

impl Drop for Teardown {
    fn drop(&mut self) {
        self.0.teardown();
    }
}

/// After `limit`, tears down and exits with [`EXIT_TIMEOUT`], whatever the
/// main thread is doing.
fn start_watchdog(bed: Arc<TestBed>, limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        note!("hostile-net: the run passed its time limit ({limit:?}); tearing down");
        bed.teardown();
        std::process::exit(i32::from(EXIT_TIMEOUT));
    });
}

async fn run(bed: Arc<TestBed>, options: &Options, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    // Signals are caught from here on, so they end the run through teardown.
    let mut interrupt = signal(SignalKind::interrupt()).context("catching SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("catching SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("catching SIGHUP")?;

    let caps = Capabilities::detect(&options.bin_dir)?;
    note!(
        "hostile-net: namespaces {} and {}; client --transport: {}, relay TCP: {}",
        bed.names.client_ns,
        bed.names.relay_ns,
        yes_no(caps.client_transport),
        yes_no(caps.relay_tcp)
    );
    bed.create().context("creating the namespaces")?;
    bed.enter_client_namespace()?;

    let temp;
    let logs: &Path = match &options.log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir
        }
        None => {
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            temp.path()
        }
    };
    let groups: Vec<String> = if options.only.is_empty() {
        GROUPS.iter().map(|g| (*g).to_owned()).collect()
    } else {
        options.only.clone()
    };
    let work = async {
        let mut stack = Stack::start(bed.clone(), &options.bin_dir, logs, caps).await?;
        scenarios::run_all(&mut stack, &groups, rows).await
    };
    tokio::select! {
        result = work => result,
        _ = interrupt.recv() => anyhow::bail!("interrupted (SIGINT)"),
        _ = terminate.recv() => anyhow::bail!("interrupted (SIGTERM)"),
        _ = hangup.recv() => anyhow::bail!("interrupted (SIGHUP)"),
    }
}

fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}
