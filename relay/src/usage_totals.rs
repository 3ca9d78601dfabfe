//! One finished request as the ledger keeps it, and the sums of such
//! entries by client, model or day that both ledger stores and the usage
//! report give.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One finished request, as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// When it ended, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The client's certificate name.
    pub client: String,
    /// The model, where the body or session named one.
    pub model: Option<String>,
    /// The request path, without the query.
    pub path: String,
    /// The status the app got (0: none, the app went away first).
    pub status: u16,
    /// How it ended: complete, cache_hit, refused, client_gone,
    /// upstream_broke_off, closed_by_policy.
    pub outcome: String,
    /// Input (prompt) tokens the upstream reported.
    pub input_tokens: u64,
    /// Output (completion) tokens the upstream reported.
    pub output_tokens: u64,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// From the stream's request head to its end, in microseconds.
    pub duration_us: u64,
}

impl LedgerEntry {
    /// Milliseconds since the Unix epoch, now.
    pub fn now_ms() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// What the report's rows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Grouping {
    /// One row per client.
    Client,
    /// One row per model (`-`: none named).
    Model,
    /// One row per UTC day.
    Day,
}

/// The totals of one group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    /// The client, model or day.
    pub key: String,
    /// Requests that ended in the period.
    pub requests: u64,
    /// Of those, the ones that did not end complete (or from the cache)
    /// with a status below 400.
    pub failed: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// Time spent, summed over the requests, in microseconds.
    pub duration_us: u64,
}

impl UsageRow {
    /// Adds one entry to the totals.
    fn add(&mut self, entry: &LedgerEntry) {
        self.requests += 1;
        let ended_well = matches!(entry.outcome.as_str(), "complete" | "cache_hit");
        self.failed += u64::from(entry.status >= 400 || !ended_well);
        self.input_tokens = self.input_tokens.saturating_add(entry.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(entry.output_tokens);
        self.bytes_in = self.bytes_in.saturating_add(entry.bytes_in);
        self.bytes_out = self.bytes_out.saturating_add(entry.bytes_out);
        self.duration_us = self.duration_us.saturating_add(entry.duration_us);
    }
}

/// The UTC calendar day of a time in milliseconds since the epoch.
pub fn utc_day(at_ms: i64) -> String {
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let days = at_ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Sums `entries` into one row per group, sorted by key.
pub fn totals<'a>(
    entries: impl IntoIterator<Item = &'a LedgerEntry>,
    grouping: Grouping,
) -> Vec<UsageRow> {
    let mut groups: BTreeMap<String, UsageRow> = BTreeMap::new();
    for entry in entries {
        let key = match grouping {
            Grouping::Client => entry.client.clone(),
            Grouping::Model => entry.model.clone().unwrap_or_else(|| "-".to_owned()),
            Grouping::Day => utc_day(entry.at_ms),
        };
        groups
            .entry(key.clone())
            .or_insert_with(|| UsageRow {
                key,
                ..UsageRow::default()
            })
            .add(entry);
    }
    groups.into_values().collect()
}
