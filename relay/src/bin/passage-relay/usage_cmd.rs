//! `passage-relay usage`: where the ledger is, and its report.

use std::path::PathBuf;

use anyhow::Context;
use passage_relay::usage_report::{Format, Grouping};

/// Where a relay keeps its ledger, as `usage` was told.
pub(crate) struct StoreLocation {
    pub(crate) pki: Option<PathBuf>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) state: Option<String>,
}

impl StoreLocation {
    /// Takes the settings the flags left unset from the relay's config file.
    pub(crate) fn fill_from(&mut self, path: &std::path::Path) -> anyhow::Result<()> {
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
pub(crate) fn usage(
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
