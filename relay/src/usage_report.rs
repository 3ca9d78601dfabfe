//! `passage-relay usage`: totals of the usage ledger by client, model or
//! day over a period, as a table, JSON or CSV.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::ledger::LedgerEntry;

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

/// How the report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned columns for a terminal.
    Table,
    /// A JSON array of objects.
    Json,
    /// Comma-separated values with a header line.
    Csv,
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

/// Parses a period such as `30m`, `24h` or `7d` into milliseconds.
pub fn parse_period(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let split = text.len().saturating_sub(1);
    let (number, unit) = text.split_at(split);
    let unit_ms: i64 = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "'{text}': give a number and s, m, h or d (e.g. 24h, 30d)"
            ));
        }
    };
    let number: i64 = number
        .parse()
        .map_err(|_| format!("'{text}': give a number and s, m, h or d (e.g. 24h, 30d)"))?;
    number
        .checked_mul(unit_ms)
        .filter(|ms| *ms > 0)
        .ok_or_else(|| format!("'{text}': out of range"))
}

/// The report text of `rows` grouped by `grouping`, in `format`.
pub fn render(rows: &[UsageRow], grouping: Grouping, format: Format) -> String {
    let name = match grouping {
        Grouping::Client => "client",
        Grouping::Model => "model",
        Grouping::Day => "day",
    };
    match format {
        Format::Json => {
            let objects: Vec<serde_json::Value> = rows
                .iter()
                .map(|row| {
                    let mut object = serde_json::json!({
                        name: row.key,
                        "requests": row.requests,
                        "failed": row.failed,
                        "input_tokens": row.input_tokens,
                        "output_tokens": row.output_tokens,
                        "bytes_in": row.bytes_in,
                        "bytes_out": row.bytes_out,
                    });
                    object["mean_duration_ms"] = serde_json::json!(mean_ms(row));
                    object
                })
                .collect();
            let mut text = serde_json::to_string_pretty(&objects).unwrap_or_default();
            text.push('\n');
            text
        }
        Format::Csv => {
            let mut text = format!(
                "{name},requests,failed,input_tokens,output_tokens,bytes_in,bytes_out,mean_duration_ms\n"
            );
            for row in rows {
                let _ = writeln!(
                    text,
                    "{},{},{},{},{},{},{},{:.1}",
                    csv_field(&row.key),
                    row.requests,
                    row.failed,
                    row.input_tokens,
                    row.output_tokens,
                    row.bytes_in,
                    row.bytes_out,
                    mean_ms(row)
                );
            }
            text
        }
        Format::Table => table(rows, name),
    }
}

/// Mean time per request, in milliseconds with one decimal.
fn mean_ms(row: &UsageRow) -> f64 {
    if row.requests == 0 {
        return 0.0;
    }
    (row.duration_us as f64 / row.requests as f64 / 100.0).round() / 10.0
}

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// Aligned columns with a total line.
fn table(rows: &[UsageRow], name: &str) -> String {
    let mut total = UsageRow {
        key: "total".to_owned(),
        ..UsageRow::default()
    };
    for row in rows {
        total.requests += row.requests;
        total.failed += row.failed;
        total.input_tokens = total.input_tokens.saturating_add(row.input_tokens);
        total.output_tokens = total.output_tokens.saturating_add(row.output_tokens);
        total.bytes_in = total.bytes_in.saturating_add(row.bytes_in);
        total.bytes_out = total.bytes_out.saturating_add(row.bytes_out);
        total.duration_us = total.duration_us.saturating_add(row.duration_us);
    }
    let header = [
        name,
        "requests",
        "failed",
        "input tokens",
        "output tokens",
        "bytes in",
        "bytes out",
        "mean ms",
    ]
    .map(str::to_owned);
    let cells = |row: &UsageRow| {
        [
            row.key.clone(),
            row.requests.to_string(),
            row.failed.to_string(),
            row.input_tokens.to_string(),
            row.output_tokens.to_string(),
            row.bytes_in.to_string(),
            row.bytes_out.to_string(),
            format!("{:.1}", mean_ms(row)),
        ]
    };
    let mut lines: Vec<[String; 8]> = vec![header];
    lines.extend(rows.iter().map(cells));
    lines.push(cells(&total));
    let mut widths = [0usize; 8];
    for line in &lines {
        for (width, cell) in widths.iter_mut().zip(line) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for line in &lines {
        for (column, (cell, width)) in line.iter().zip(widths).enumerate() {
            if column == 0 {
                let _ = write!(text, "{cell:<width$}");
            } else {
                let _ = write!(text, "  {cell:>width$}");
            }
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_calendar_days() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(86_400_000 - 1), "1970-01-01");
        assert_eq!(utc_day(951_782_400_000), "2000-02-29");
        assert_eq!(utc_day(1_796_342_400_000), "2026-12-04");
    }

    #[test]
    fn periods_take_a_number_and_a_unit() {
        assert_eq!(parse_period("24h"), Ok(86_400_000));
        assert_eq!(parse_period("30m"), Ok(1_800_000));
        assert_eq!(parse_period("7d"), Ok(604_800_000));
        assert!(parse_period("24").is_err());
        assert!(parse_period("h").is_err());
        assert!(parse_period("0d").is_err());
        assert!(parse_period("-1d").is_err());
    }

    #[test]
    fn csv_quotes_what_needs_it_and_the_table_has_a_total() {
        let rows = vec![
            UsageRow {
                key: "a,b".into(),
                requests: 2,
                duration_us: 3000,
                ..UsageRow::default()
            },
            UsageRow {
                key: "c".into(),
                requests: 1,
                failed: 1,
                ..UsageRow::default()
            },
        ];
        let csv = render(&rows, Grouping::Client, Format::Csv);
        assert!(csv.starts_with("client,requests,"), "{csv}");
        assert!(csv.contains("\n\"a,b\",2,0,0,0,0,0,1.5\n"), "{csv}");
        let table = render(&rows, Grouping::Client, Format::Table);
        let last = table.lines().last().unwrap_or_default();
        assert!(last.starts_with("total"), "{table}");
        assert!(last.contains("  3  "), "{table}");
        let json: serde_json::Value =
            serde_json::from_str(&render(&rows, Grouping::Client, Format::Json)).expect("json");
        assert_eq!(json[1]["client"], "c");
        assert_eq!(json[1]["failed"], 1);
    }
}
