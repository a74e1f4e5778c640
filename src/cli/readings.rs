//! `outpost readings`: local history for technicians on site, straight from the
//! database (read-only; works while the service runs).

use crate::display::table;
use crate::display::DisplayConfig;
use crate::model::to_micros;
use crate::store::StoredReading;
use chrono::{DateTime, Utc};
use rusqlite::Connection;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The command-line arguments of `outpost readings`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Read this database instead of the configured one.
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Only this device.
    #[arg(long)]
    pub device: Option<String>,
    /// Only this metric.
    #[arg(long)]
    pub metric: Option<String>,
    /// From this time: a duration ago ("2h") or RFC 3339 ("2026-11-26T08:00:00Z").
    #[arg(long)]
    pub since: Option<String>,
    /// Until this time (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many readings.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

pub fn main(config_path: Option<&Path>, args: Args) -> ExitCode {
    let now = crate::clock::Clock::system().now();
    let parse = |v: Option<String>, flag: &str| match v {
        None => Ok(None),
        Some(v) => parse_time(&v, now)
            .map(Some)
            .map_err(|e| format!("--{flag}: {e}")),
    };
    let (since, until) = match (parse(args.since, "since"), parse(args.until, "until")) {
        (Ok(s), Ok(u)) => (s, u),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("outpost: {e}");
            return ExitCode::from(crate::exit::CONFIG);
        }
    };
    if args.limit == 0 || args.limit > MAX_LIMIT {
        eprintln!("outpost: --limit must be between 1 and {MAX_LIMIT}");
        return ExitCode::from(crate::exit::CONFIG);
    }
    let q = Query {
        device: args.device,
        metric: args.metric,
        since,
        until,
        limit: args.limit,
    };
    let rows = match super::database_path(config_path, args.db)
        .and_then(|db| super::read_database(&db, |conn| query(conn, &q)))
    {
        Ok(rows) => rows,
        Err(code) => return code,
    };
    print!(
        "{}",
        render(&rows, args.format, &super::display_config(config_path))
    );
    ExitCode::SUCCESS
}

/// What to select.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub device: Option<String>,
    pub metric: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Newest first, at most this many.
    pub limit: usize,
}

/// The largest `--limit` accepted.
pub const MAX_LIMIT: usize = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// Parses `--since`/`--until`: a duration ago (`"2h"`) or an RFC 3339 time.
pub fn parse_time(value: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&Utc));
    }
    let ago: crate::settings::HumanDuration = value
        .parse()
        .map_err(|_| format!("expected a duration ago like \"2h\" or a time like \"2026-11-26T08:00:00Z\", found {value:?}"))?;
    chrono::Duration::from_std(ago.get())
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .ok_or_else(|| format!("{value:?} is too far in the past"))
}

pub fn query(conn: &Connection, q: &Query) -> rusqlite::Result<Vec<StoredReading>> {
    let mut sql = format!("{} WHERE 1 = 1", crate::store::SELECT_READING);
    let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
    if let Some(d) = &q.device {
        args.push(Box::new(d.clone()));
        let _ = write!(sql, " AND device = ?{}", args.len());
    }
    if let Some(m) = &q.metric {
        args.push(Box::new(m.clone()));
        let _ = write!(sql, " AND metric = ?{}", args.len());
    }
    if let Some(t) = q.since {
        args.push(Box::new(to_micros(t)));
        let _ = write!(sql, " AND observed_at >= ?{}", args.len());
    }
    if let Some(t) = q.until {
        args.push(Box::new(to_micros(t)));
        let _ = write!(sql, " AND observed_at < ?{}", args.len());
    }
    args.push(Box::new(q.limit.clamp(1, MAX_LIMIT) as i64));
    let _ = write!(
        sql,
        " ORDER BY observed_at DESC, id DESC LIMIT ?{}",
        args.len()
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(
        rusqlite::params_from_iter(args.iter()),
        crate::store::reading_from_row,
    )?;
    rows.collect()
}

pub fn render(rows: &[StoredReading], format: Format, display: &DisplayConfig) -> String {
    match format {
        Format::Json => {
            let list: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "id": r.id,
                        "uid": r.reading.uid,
                        "source": r.reading.source,
                        "device": r.reading.device,
                        "metric": r.reading.metric,
                        "value": r.reading.value,
                        "unit": r.reading.unit,
                        "observed_at": r.reading.observed_at.to_rfc3339(),
                        "received_at": r.reading.received_at.to_rfc3339(),
                        "flags": r.reading.flags,
                        "synced": r.synced,
                    })
                })
                .collect();
            serde_json::to_string_pretty(&list).unwrap_or_default() + "\n"
        }
        Format::Csv => {
            let mut out =
                String::from("observed_at,device,metric,value,unit,source,flags,synced\n");
            for r in rows {
                let cells = [
                    r.reading.observed_at.to_rfc3339(),
                    r.reading.device.clone(),
                    r.reading.metric.clone(),
                    r.reading.value.to_string(),
                    r.reading.unit.clone().unwrap_or_default(),
                    r.reading.source.clone(),
                    r.reading.flags.to_string(),
                    r.synced.to_string(),
                ];
                let line: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
                out.push_str(&line.join(","));
                out.push('\n');
            }
            out
        }
        Format::Table => {
            if rows.is_empty() {
                return "No readings match.\n".into();
            }
            let body: Vec<[String; 5]> = rows
                .iter()
                .map(|r| {
                    [
                        r.reading
                            .observed_at
                            .format("%Y-%m-%d %H:%M:%S")
                            .to_string(),
                        r.reading.device.clone(),
                        r.reading.metric.clone(),
                        display.value(
                            &r.reading.metric,
                            r.reading.value,
                            r.reading.unit.as_deref(),
                        ),
                        if r.synced { "synced" } else { "pending" }.to_string(),
                    ]
                })
                .collect();
            table(
                &["OBSERVED (UTC)", "DEVICE", "METRIC", "VALUE", "CENTRAL"],
                &body,
            )
        }
    }
}

/// Quotes a CSV field when needed; a leading `=`, `+`, `-` or `@` is prefixed with `'`
/// so a spreadsheet does not run a device name as a formula.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '@']) || (s.starts_with('-') && s.parse::<f64>().is_err()) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_ago_or_rfc3339() {
        let now = Utc::now();
        assert_eq!(
            parse_time("2h", now).unwrap(),
            now - chrono::Duration::hours(2)
        );
        assert_eq!(
            parse_time("2026-11-26T08:00:00Z", now)
                .unwrap()
                .to_rfc3339(),
            "2026-11-26T08:00:00+00:00"
        );
        assert!(parse_time("yesterday-ish", now).is_err());
        assert!(parse_time("", now).is_err());
        assert!(parse_time("999999999999d", now).is_err());
    }

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(csv_field("-4.5"), "-4.5");
    }
}
