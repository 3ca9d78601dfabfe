//! `serve`'s configuration from its flags and config file, the API key
//! variables, and the SIGHUP reload of that file.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use passage_relay::policy::{POLICY_SECTIONS, Policy, PolicyTables};
use passage_relay::state::{Backend, StateConfig};
use passage_relay::upstream::{ApiKey, UpstreamBase};
use passage_relay::{RelayConfig, TcpListen};
use passage_shared::config_file::{self, FileSetting};
use passage_shared::process::CommonArgs;

use crate::cli::{CONFIGURED_SUBCOMMANDS, Cli, ServeArgs};

/// The relay's configuration from the flags of `serve` (and its config file).
pub(crate) fn relay_config(
    args: ServeArgs,
) -> anyhow::Result<(RelayConfig, CommonArgs, Option<ConfigFile>)> {
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

/// The config file a relay was started with, for reloads.
pub(crate) struct ConfigFile {
    pub(crate) path: PathBuf,
    /// The flag settings it gave at start, to tell which changed.
    pub(crate) settings: Vec<FileSetting>,
}

/// Parses the process's command line and config file again, as at start.
pub(crate) fn current_settings() -> Result<Vec<FileSetting>, String> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    config_file::try_parse_with_config::<Cli>(&argv, &CONFIGURED_SUBCOMMANDS, &POLICY_SECTIONS)
        .map(|(_, settings)| settings)
        .map_err(|e| e.to_string())
}

/// Reads and checks the `[clients.NAME]` and `[unlisted_clients]` tables.
pub(crate) fn load_policy(path: &std::path::Path) -> Result<Policy, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let tables: PolicyTables =
        toml::from_str(&text).map_err(|e| config_file::section_error(path, &text, &e))?;
    Policy::new(tables).map_err(|e| format!("{}: {e}", path.display()))
}

/// SIGHUP: re-reads the config file (whole, as at start) and puts its
/// policy in force, or keeps the old one if the file is refused; then
/// re-reads the revocation list either way.
pub(crate) fn reload_config(file: Option<&ConfigFile>, handle: &passage_relay::ReloadHandle) {
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
pub(crate) fn changed_keys(before: &[FileSetting], after: &[FileSetting]) -> Vec<String> {
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

pub(crate) fn read_api_key(var: &str) -> anyhow::Result<ApiKey> {
    let key = std::env::var(var)
        .with_context(|| format!("--api-key-env {var}: the variable is not set or not UTF-8"))?;
    let key = key.trim().to_owned();
    anyhow::ensure!(
        !key.is_empty(),
        "--api-key-env {var}: the variable is empty"
    );
    Ok(ApiKey::new(key))
}
