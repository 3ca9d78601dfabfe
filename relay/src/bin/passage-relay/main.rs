//! Command line of passage-relay: parses arguments and calls the library.

mod cli;
mod serve_config;
mod usage_cmd;

passage_shared::tuned_allocator!();

use std::time::Duration;

use anyhow::Context;
use passage_relay::policy::POLICY_SECTIONS;
use passage_relay::usage_report::Format;
use passage_relay::{Relay, RelayConfig, pki_cmd};
use passage_shared::process::CommonArgs;

use cli::{CONFIGURED_SUBCOMMANDS, Cli, Command, ServeArgs, UsageArgs};
use serve_config::{ConfigFile, relay_config, reload_config};
use usage_cmd::StoreLocation;

fn main() -> std::process::ExitCode {
    passage_shared::process::run_command_line(
        "passage-relay",
        &CONFIGURED_SUBCOMMANDS,
        &POLICY_SECTIONS,
        run,
    )
}

/// Runs the subcommand `cli` names.
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
        Command::Usage(args) => usage(args),
        Command::Serve(args) => {
            passage_shared::process::init_logging();
            let (config, common, file) = relay_config(args)?;
            serve(config, &common, file)
        }
        Command::Doctor { serve, json } => doctor(serve, json),
    }
}

/// `usage`: finds the ledger (flags first, then the config file) and
/// prints its totals.
fn usage(args: UsageArgs) -> anyhow::Result<()> {
    let mut location = StoreLocation {
        pki: args.pki,
        data_dir: args.store.data_dir,
        state: args.store.state,
    };
    if let Some(path) = args.config {
        location.fill_from(&path)?;
    }
    let format = match (args.json, args.csv) {
        (true, _) => Format::Json,
        (_, true) => Format::Csv,
        _ => Format::Table,
    };
    usage_cmd::usage(location, &args.since, args.by, format)
}

/// `doctor`: prints its findings; fails (exit 1) when the relay would not
/// serve requests.
fn doctor(args: ServeArgs, json: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = match relay_config(args) {
        Ok((config, _, _)) => runtime.block_on(passage_relay::doctor::examine(&config)),
        // A flag, the config file or a key variable is unusable: `serve`
        // would stop here too.
        Err(e) => passage_shared::doctor::Report::new(vec![passage_shared::doctor::Check::fail(
            "config",
            format!("{e:#}"),
            "fix the flag, config file key or variable named",
        )]),
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

/// A grace period: `0`, or a number and s, m, h or d.
fn parse_grace(text: &str) -> anyhow::Result<Duration> {
    if text.trim().trim_end_matches(['s', 'm', 'h', 'd']) == "0" {
        return Ok(Duration::ZERO);
    }
    let ms = passage_relay::usage_report::parse_period(text)
        .map_err(|e| anyhow::anyhow!("--grace {e}"))?;
    Ok(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// `serve`: runs the relay until SIGTERM or SIGINT; SIGHUP reloads its
/// config file and PKI.
fn serve(config: RelayConfig, common: &CommonArgs, file: Option<ConfigFile>) -> anyhow::Result<()> {
    passage_shared::process::serve_until_signal(common, |shutdown| async move {
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
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        let reload = relay.reload_handle();
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!(
                    "SIGHUP: reloading the config file, the revocation list and the relay certificate"
                );
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
