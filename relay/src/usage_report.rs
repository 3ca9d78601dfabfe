//! `passage-relay usage`: totals of the usage ledger by client, model or
//! day over a period, as a table, JSON or CSV.

use std::fmt::Write as _;

pub use crate::usage_totals::Grouping;
use crate::usage_totals::UsageRow;

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
    use crate::usage_totals::utc_day;

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
