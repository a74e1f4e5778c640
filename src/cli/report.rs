//! `outpost report`: the daily summary (HACCP log) of one local day, read-only from the
//! database, so it works while the service runs and offline.

use crate::report::render::{render, Format};
use crate::report::summary::{day_report, Context, DayBounds};
use crate::report::{parse_date, parse_timezone, Tz};
use chrono::NaiveDate;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The command-line arguments of `outpost report`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Read this database instead of the configured one.
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// The local day (`YYYY-MM-DD`, `today` or `yesterday`). Default: today so far.
    #[arg(long)]
    pub day: Option<String>,
    /// Only this device.
    #[arg(long)]
    pub device: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// The time zone of the days (IANA name). Default: `agent.timezone`, else UTC.
    #[arg(long, value_name = "ZONE")]
    pub timezone: Option<String>,
}

pub fn main(config_path: Option<&Path>, args: Args) -> ExitCode {
    let usage = |e: String| {
        eprintln!("outpost: {e}");
        ExitCode::from(crate::exit::CONFIG)
    };
    if let Some(device) = &args.device {
        if let Err(e) = crate::settings::check_identifier(device, "--device") {
            return usage(e);
        }
    }
    // With --db the configuration is optional (a database copied from another
    // gateway); without it, it names the database and must be valid.
    let config = match &args.db {
        Some(_) => crate::config::Config::load(&crate::config::resolve_path(config_path)).ok(),
        None => match super::load_config_or_exit(&crate::config::resolve_path(config_path), |n| {
            format!("outpost: {n} problem(s) in the configuration; `outpost check` shows them.")
        }) {
            Ok(c) => Some(c),
            Err(code) => return code,
        },
    };
    let tz: Tz = match (&args.timezone, &config) {
        (Some(name), _) => match parse_timezone(name) {
            Ok(tz) => tz,
            Err(e) => return usage(format!("--timezone: {e}")),
        },
        (None, Some(c)) => c.agent.tz(),
        (None, None) => Tz::UTC,
    };
    let now = crate::clock::Clock::system().now();
    let day = match parse_day(args.day.as_deref(), tz, now) {
        Ok(d) => d,
        Err(e) => return usage(format!("--day: {e}")),
    };
    let db = match super::database_path(config_path, args.db) {
        Ok(db) => db,
        Err(code) => return code,
    };
    let (rules, devices, display) = match config {
        Some(c) => (c.alerts, c.devices, c.display),
        None => Default::default(),
    };
    let ctx = Context {
        tz,
        rules: &rules,
        devices: &devices,
        now,
    };
    match super::read_database(&db, |conn| {
        day_report(conn, &ctx, day, args.device.as_deref())
    }) {
        Ok(report) => {
            print!("{}", render(&report, args.format, &display));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `--day`: a date, `today` or `yesterday` (local to `tz`); never after today.
pub fn parse_day(
    value: Option<&str>,
    tz: Tz,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<NaiveDate, String> {
    let today = DayBounds::date_of(tz, now);
    let day = match value {
        None | Some("today") => today,
        Some("yesterday") => today.pred_opt().ok_or("no day before today")?,
        Some(v) => parse_date(v)?,
    };
    if day > today {
        return Err(format!(
            "{day} has not begun yet in {} (today is {today})",
            tz.name()
        ));
    }
    if DayBounds::of(tz, day).is_none() || day.year_ce().1 < 1970 {
        return Err(format!("{day} is out of range"));
    }
    Ok(day)
}

use chrono::Datelike;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-10-25T23:30:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let berlin = parse_timezone("Europe/Berlin").unwrap();
        assert_eq!(
            parse_day(None, berlin, now).unwrap().to_string(),
            "2026-10-26"
        );
        assert_eq!(
            parse_day(Some("yesterday"), Tz::UTC, now)
                .unwrap()
                .to_string(),
            "2026-10-24"
        );
        assert!(parse_day(Some("2026-10-27"), berlin, now)
            .unwrap_err()
            .contains("has not begun"));
        assert!(parse_day(Some("2026-13-01"), berlin, now)
            .unwrap_err()
            .contains("YYYY-MM-DD"));
        assert!(parse_day(Some("0001-01-01"), berlin, now).is_err());
    }
}
