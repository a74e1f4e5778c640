//! Daily summaries (the HACCP log) and device records (calibration due dates).
//!
//! - [`summary`]: one local day (in `agent.timezone`) per device and metric: min, max,
//!   mean, count, gaps, time out of range and excursions per threshold rule, and the
//!   day's alert events (every kind, acknowledgements included). Computed from the
//!   local database, so it works offline; closed days are kept in `daily_summaries`.
//! - [`render`]: the day as a table, CSV or JSON (`outpost report`, the morning email).
//! - [`calibration`]: `[[devices]] calibration_due`: days left, warnings, thresholds.
//!
//! Layer: above `store` and `alerts` (it reads readings and alert events and uses the
//! rules' scopes), beside `notify` and `sync` (it imports neither: the run layer sends
//! the morning email, and sync reads the `daily_summaries` table itself).

pub mod calibration;
pub mod render;
pub mod summary;
pub mod zone;

use crate::settings::{check_identifier, HumanDuration, Problems};
use chrono::{NaiveDate, NaiveTime};
use serde::{Deserialize, Serialize};

pub use zone::{Tz, TzError};

/// The time zone when `agent.timezone` is not set.
pub const DEFAULT_TIMEZONE: &str = "UTC";

/// Parses an IANA time zone name (`Europe/Berlin`, `UTC`) and reads the zone from the
/// system's database ([`zone`]), with a clear error.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    Tz::load(name).map_err(|e| e.to_string())
}

/// Parses a calendar date `YYYY-MM-DD`, with a clear error.
pub fn parse_date(value: &str) -> Result<NaiveDate, String> {
    let shown: String = value.chars().take(40).collect();
    if value.len() != 10 {
        return Err(format!(
            "expected a date like \"2027-03-01\" (YYYY-MM-DD), found {shown:?}"
        ));
    }
    NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .map_err(|_| format!("expected a date like \"2027-03-01\" (YYYY-MM-DD), found {shown:?}"))
}

/// Parses a local time of day `HH:MM`.
pub fn parse_time_of_day(value: &str) -> Result<NaiveTime, String> {
    let shown: String = value.chars().take(40).collect();
    if value.len() != 5 {
        return Err(format!(
            "expected a local time like \"07:00\" (HH:MM, 24-hour), found {shown:?}"
        ));
    }
    NaiveTime::parse_from_str(value, "%H:%M").map_err(|_| {
        format!("expected a local time like \"07:00\" (HH:MM, 24-hour), found {shown:?}")
    })
}

/// Most `[[devices]]` and `[[reports]]` tables.
const MAX_TABLES: usize = 10_000;
/// The longest device name or location.
const MAX_TEXT: usize = 200;

/// One `[[devices]]` table: what a site knows about a device beyond its readings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The device id as stored (e.g. `coldroom-1`).
    pub id: String,
    /// A human name, shown in the daily report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Where it is, shown in the daily report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The date the device's calibration is due, `YYYY-MM-DD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_due: Option<String>,
    /// A pause between two readings longer than this is a gap in the daily report.
    /// Default: twice the day's typical (median) interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<HumanDuration>,
}

impl DeviceConfig {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.check(
            format!("{path}.id"),
            check_identifier(&self.id, "the device id"),
        );
        for (key, value) in [("name", &self.name), ("location", &self.location)] {
            if let Some(v) = value {
                if v.chars().count() > MAX_TEXT || v.chars().any(char::is_control) {
                    problems.push(
                        format!("{path}.{key}"),
                        format!("at most {MAX_TEXT} characters, no control characters"),
                    );
                }
            }
        }
        if let Some(due) = &self.calibration_due {
            problems.check(
                format!("{path}.calibration_due"),
                parse_date(due).map(|_| ()),
            );
        }
        if let Some(gap) = self.gap {
            if gap.get() < std::time::Duration::from_secs(1)
                || gap.get() > std::time::Duration::from_secs(86_400)
            {
                problems.push(format!("{path}.gap"), "must be between 1s and 24h");
            }
        }
    }

    /// The calibration due date (validated).
    pub fn calibration_due_date(&self) -> Option<NaiveDate> {
        self.calibration_due
            .as_deref()
            .and_then(|d| parse_date(d).ok())
    }
}

/// One `[[reports]]` table: the daily summary of the previous day, sent each morning.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// The local time (in `agent.timezone`) to send yesterday's summary, `HH:MM`.
    #[serde(default = "default_at")]
    pub at: String,
    /// Names of `[[notifiers]]` (email: plain text plus a CSV attachment; others get
    /// the text).
    pub notifiers: Vec<String>,
    /// Only these devices (ids or globs). Default: all.
    #[serde(default = "default_devices")]
    pub devices: Vec<String>,
}

fn default_at() -> String {
    "07:00".into()
}

fn default_devices() -> Vec<String> {
    vec!["*".into()]
}

impl ReportConfig {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.check(
            format!("{path}.at"),
            parse_time_of_day(&self.at).map(|_| ()),
        );
        if self.notifiers.is_empty() {
            problems.push(
                format!("{path}.notifiers"),
                "name at least one `[[notifiers]]` table to send the report to",
            );
        }
        if self.devices.is_empty() || self.devices.len() > 256 {
            problems.push(
                format!("{path}.devices"),
                "list 1 to 256 device ids or globs (\"*\" for all)",
            );
        }
        for (i, glob) in self.devices.iter().enumerate() {
            if glob.is_empty() || glob.len() > 128 {
                problems.push(
                    format!("{path}.devices[{i}]"),
                    "must be 1 to 128 characters",
                );
            } else if let Err(e) = globset::Glob::new(glob) {
                problems.push(
                    format!("{path}.devices[{i}]"),
                    format!("not a valid glob: {}", e.kind()),
                );
            }
        }
    }

    /// The send time (validated).
    pub fn at_time(&self) -> NaiveTime {
        parse_time_of_day(&self.at).unwrap_or(NaiveTime::MIN)
    }

    /// Whether `device` is in this report.
    pub fn includes(&self, device: &str) -> bool {
        self.devices.iter().any(|g| {
            globset::Glob::new(g)
                .map(|g| g.compile_matcher().is_match(device))
                .unwrap_or(false)
        })
    }
}

/// Checks across `[[devices]]`: duplicate ids, too many tables.
pub fn validate_devices(devices: &[(usize, &DeviceConfig)], problems: &mut Problems) {
    if devices.len() > MAX_TABLES {
        problems.push("devices", format!("at most {MAX_TABLES} devices"));
    }
    let mut seen = std::collections::HashMap::new();
    for (i, d) in devices {
        if let Some(first) = seen.insert(d.id.as_str(), *i) {
            problems.push(
                format!("devices[{i}].id"),
                format!(
                    "device id {:?} is already used by devices[{first}]; each device is listed once",
                    d.id
                ),
            );
            seen.insert(d.id.as_str(), first);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_zones() {
        assert!(parse_timezone("Europe/Berlin").is_ok());
        assert!(parse_timezone("UTC").is_ok());
        let e = parse_timezone("Mars/Olympus_Mons").unwrap_err();
        assert!(e.contains("unknown time zone \"Mars/Olympus_Mons\""), "{e}");
        let e = parse_timezone(&"x".repeat(10_000)).unwrap_err();
        assert!(e.len() < 300, "{e}");
        assert!(parse_timezone("Europe/Berlin\n").is_err());
        assert!(parse_timezone("").is_err());
    }

    #[test]
    fn dates_and_times() {
        assert_eq!(
            parse_date("2027-03-01").unwrap(),
            NaiveDate::from_ymd_opt(2027, 3, 1).unwrap()
        );
        for bad in [
            "2027-02-30",
            "2027-3-1",
            "01.03.2027",
            "",
            "2027-03-01T00:00",
        ] {
            let e = parse_date(bad).unwrap_err();
            assert!(e.contains("YYYY-MM-DD"), "{bad}: {e}");
        }
        assert!(parse_time_of_day("07:00").is_ok());
        for bad in ["7:00", "24:00", "07:60", "seven", ""] {
            assert!(parse_time_of_day(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn duplicate_devices_are_refused() {
        let d = |id: &str| DeviceConfig {
            id: id.into(),
            name: None,
            location: None,
            calibration_due: None,
            gap: None,
        };
        let (a, b, c) = (d("fridge-1"), d("fridge-2"), d("fridge-1"));
        let mut problems = Problems::default();
        validate_devices(&[(0, &a), (1, &b), (2, &c)], &mut problems);
        assert_eq!(problems.0.len(), 1);
        assert_eq!(problems.0[0].0, "devices[2].id");
        assert!(problems.0[0].1.contains("devices[0]"));
    }
}
