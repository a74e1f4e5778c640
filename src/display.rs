//! How a value is shown to a person: one rule for notifications, `outpost status`,
//! `outpost readings`, the demo and the log notifier, so the same reading never reads
//! "12.80" in one place and "13" in another.
//!
//! A metric with a configured precision (`[display] precision = { temperature = 1 }`)
//! shows exactly that many decimals ("4.0 °C", "12.8 °C"). Any other value shows at
//! most two decimals without trailing zeros ("12.8", "4", "4.26"), and values below 1
//! three significant digits ("0.00345"), so small quantities do not read as 0.
//!
//! Also the other shapes text takes for people: ages ("4s", "12m", "3h", "2d") and
//! aligned tables. This module is a leaf: every layer may use it.

use crate::settings::{check_identifier, Problems};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;

/// The most decimals a precision may ask for.
pub const MAX_PRECISION: u8 = 6;

/// `[display]`: how values are shown to people (never how they are stored or synced).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DisplayConfig {
    /// Decimals per metric (0 to 6), e.g. `{ temperature = 1, humidity = 0 }`. Other
    /// metrics: at most two decimals, trailing zeros dropped.
    #[serde(default)]
    pub precision: BTreeMap<String, u8>,
}

impl DisplayConfig {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        for (metric, decimals) in &self.precision {
            let key = format!("{path}.precision.{metric}");
            problems.check(key.clone(), check_identifier(metric, "the metric"));
            if *decimals > MAX_PRECISION {
                problems.push(
                    key,
                    format!("must be between 0 and {MAX_PRECISION} decimals, found {decimals}"),
                );
            }
        }
    }

    /// The configured decimals of `metric`, if any.
    pub fn precision_of(&self, metric: &str) -> Option<u8> {
        self.precision.get(metric).copied()
    }

    /// `value` of `metric` with its unit, as a person reads it.
    pub fn value(&self, metric: &str, value: f64, unit: Option<&str>) -> String {
        format_value(value, unit, self.precision_of(metric))
    }
}

/// The one formatting rule (see the module comment): `value` with `precision` decimals
/// when given, else the default, then a space and `unit` when there is one.
pub fn format_value(value: f64, unit: Option<&str>, precision: Option<u8>) -> String {
    let mut s = match precision {
        _ if !value.is_finite() => value.to_string(),
        Some(p) => {
            let p = usize::from(p.min(MAX_PRECISION));
            format!("{value:.p$}")
        }
        None => {
            let decimals = if value != 0.0 && value.abs() < 1.0 {
                // Three significant digits: 0.5 → 1 decimal place needed … 0.00345 → 5.
                let leading_zeros = (-value.abs().log10()).floor() as usize;
                (leading_zeros + 3).min(usize::from(MAX_PRECISION) + 3)
            } else {
                2
            };
            let fixed = format!("{value:.decimals$}");
            if fixed.contains('.') {
                fixed
                    .trim_end_matches('0')
                    .trim_end_matches('.')
                    .to_string()
            } else {
                fixed
            }
        }
    };
    if s == "-0" || (s.starts_with("-0") && s.trim_start_matches(['-', '0', '.']).is_empty()) {
        s.remove(0);
    }
    if let Some(u) = unit.filter(|u| !u.is_empty()) {
        s.push(' ');
        s.push_str(u);
    }
    s
}

/// "4s", "12m", "3h", "2d" — ages as a technician reads them.
pub fn age(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    let secs = (now - then).num_seconds();
    if secs < 0 {
        return "in the future".into();
    }
    let secs = secs as u64;
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        let now = Utc::now();
        assert_eq!(age(now, now - chrono::Duration::seconds(5)), "5s");
        assert_eq!(age(now, now - chrono::Duration::minutes(5)), "5m");
        assert_eq!(age(now, now - chrono::Duration::hours(5)), "5h");
        assert_eq!(age(now, now - chrono::Duration::days(5)), "5d");
        assert_eq!(age(now, now + chrono::Duration::days(5)), "in the future");
    }

    #[test]
    fn the_default_drops_trailing_zeros_at_two_decimals() {
        assert_eq!(format_value(12.8, Some("°C"), None), "12.8 °C");
        assert_eq!(format_value(4.0, Some("°C"), None), "4 °C");
        assert_eq!(format_value(4.256, None, None), "4.26");
        assert_eq!(format_value(12.999, None, None), "13");
        assert_eq!(format_value(-3.5, Some(""), None), "-3.5");
        assert_eq!(format_value(1013.25, Some("hPa"), None), "1013.25 hPa");
        assert_eq!(format_value(0.0, None, None), "0");
        assert_eq!(format_value(-0.001, None, None), "-0.001");
        assert_eq!(format_value(0.5, None, None), "0.5");
        assert_eq!(format_value(0.00345, Some("V"), None), "0.00345 V");
        assert_eq!(format_value(1e-300, None, None), "0");
        assert_eq!(format_value(2.5e15, None, None), "2500000000000000");
        assert_eq!(format_value(f64::NAN, None, None), "NaN");
    }

    #[test]
    fn a_configured_precision_is_exact() {
        assert_eq!(format_value(4.0, Some("°C"), Some(1)), "4.0 °C");
        assert_eq!(format_value(12.8, Some("°C"), Some(1)), "12.8 °C");
        assert_eq!(format_value(12.85, None, Some(0)), "13");
        assert_eq!(format_value(-0.04, None, Some(1)), "0.0");
        assert_eq!(format_value(1.0, None, Some(200)), "1.000000");
        let display = DisplayConfig {
            precision: [("temperature".to_string(), 1)].into(),
        };
        assert_eq!(display.value("temperature", 4.0, Some("°C")), "4.0 °C");
        assert_eq!(display.value("humidity", 40.0, Some("%")), "40 %");
    }

    #[test]
    fn bad_precisions_are_reported() {
        let display = DisplayConfig {
            precision: [("temperature".to_string(), 7), ("bad name".to_string(), 1)].into(),
        };
        let mut p = Problems::default();
        display.validate("display", &mut p);
        assert_eq!(p.0.len(), 2, "{:?}", p.0);
        assert!(p.0.iter().any(|(k, m)| k == "display.precision.temperature"
            && m == "must be between 0 and 6 decimals, found 7"));
        assert!(p.0.iter().any(|(k, _)| k == "display.precision.bad name"));
    }
}
