//! A day's summary as people and spreadsheets read it: an aligned table (with the
//! gaps and alarms listed below it), CSV (one row per device and metric) or JSON.

use super::summary::{DayReport, SeriesDay};
use super::Tz;
use crate::display::{table, DisplayConfig};
use chrono::{DateTime, Utc};
use std::fmt::Write;

/// The output formats of `outpost report`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

pub fn render(report: &DayReport, format: Format, display: &DisplayConfig) -> String {
    match format {
        Format::Table => text(report, display),
        Format::Csv => csv(report),
        Format::Json => json(report),
    }
}

fn tz_of(report: &DayReport) -> Tz {
    report.timezone.parse().unwrap_or(Tz::UTC)
}

fn local(tz: Tz, t: DateTime<Utc>) -> String {
    t.with_timezone(&tz).format("%H:%M").to_string()
}

fn minutes(seconds: u64) -> String {
    if seconds == 0 {
        "0".into()
    } else if seconds < 60 {
        "<1m".into()
    } else {
        let m = seconds / 60;
        if m >= 60 {
            format!("{}h{:02}m", m / 60, m % 60)
        } else {
            format!("{m}m")
        }
    }
}

/// One line saying which day this is, in which zone, and whether it is complete.
pub fn heading(report: &DayReport) -> String {
    let tz = tz_of(report);
    let until = if report.complete {
        "complete".to_string()
    } else {
        format!("so far, until {}", local(tz, report.computed_at))
    };
    format!(
        "Daily summary {} ({}, {} h day), {}",
        report.day,
        report.timezone,
        fmt_hours(report.hours),
        until
    )
}

fn fmt_hours(h: f64) -> String {
    if h.fract() == 0.0 {
        format!("{h:.0}")
    } else {
        format!("{h:.2}")
    }
}

/// Text from the database or the configuration as a terminal or mail shows it safely:
/// control characters (escape sequences, line breaks) become `?`.
pub fn plain(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The plain-text form: heading, a table, then gaps and alarms by series.
pub fn text(report: &DayReport, display: &DisplayConfig) -> String {
    let tz = tz_of(report);
    let mut out = heading(report);
    out.push('\n');
    if report.readings() == 0 {
        let _ = writeln!(out, "No readings on {} ({}).", report.day, report.timezone);
    }
    if report.series.is_empty() {
        return out;
    }
    let value = |s: &SeriesDay, v: Option<f64>| match v {
        Some(v) => display.value(&s.metric, v, s.unit.as_deref()),
        None => "-".into(),
    };
    let rows: Vec<[String; 11]> = report
        .series
        .iter()
        .map(|s| {
            let who = match (&s.name, &s.location) {
                (Some(n), Some(l)) => format!("{n} ({l})"),
                (Some(n), None) => n.clone(),
                (None, Some(l)) => format!("({l})"),
                (None, None) => String::new(),
            };
            [
                plain(&s.device),
                plain(&who),
                if s.metric.is_empty() {
                    "-".into()
                } else {
                    plain(&s.metric)
                },
                if s.readings == 0 {
                    "no readings".into()
                } else {
                    s.readings.to_string()
                },
                value(s, s.min),
                value(s, s.max),
                value(s, s.mean),
                if s.gaps.is_empty() {
                    "0".into()
                } else {
                    format!("{} ({})", s.gaps.len(), minutes(s.gap_seconds))
                },
                minutes(s.out_of_range_seconds()),
                s.excursions().to_string(),
                s.alarms.len().to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "DEVICE",
            "NAME",
            "METRIC",
            "READINGS",
            "MIN",
            "MAX",
            "MEAN",
            "GAPS",
            "OUT OF RANGE",
            "EXCURSIONS",
            "ALARMS",
        ],
        &rows,
    ));
    for s in &report.series {
        let label = plain(&format!("{} {}", s.device, s.metric));
        for o in s.out_of_range.iter().filter(|o| o.seconds > 0) {
            let _ = writeln!(
                out,
                "{label}: {} {}: {} out of range, {} excursion(s)",
                o.rule,
                o.condition,
                minutes(o.seconds),
                o.excursions
            );
        }
        for g in &s.gaps {
            let _ = writeln!(
                out,
                "{label}: no readings {}–{} ({})",
                local(tz, g.from),
                local(tz, g.to),
                minutes((g.to - g.from).num_seconds().max(0) as u64)
            );
        }
        for a in &s.alarms {
            let mut line = format!(
                "{label}: {} {} {} ({})",
                local(tz, a.at),
                plain(&a.kind),
                plain(&a.rule),
                plain(&a.severity)
            );
            if let Some(by) = &a.by {
                let _ = write!(line, " by {}", plain(by));
            }
            if let Some(note) = &a.note {
                let _ = write!(line, ": {note:?}");
            }
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// The CSV header of [`csv`].
pub const CSV_HEADER: &str = "day,timezone,hours,complete,device,name,location,metric,unit,readings,min,max,mean,first_at,last_at,gaps,gap_seconds,out_of_range_seconds,excursions,alarms,acknowledgements";

/// One row per device and metric (RFC 4180 quoting; a text cell that a spreadsheet
/// would run as a formula gets a leading `'`).
pub fn csv(report: &DayReport) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push_str("\r\n");
    let num = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
    for s in &report.series {
        let cells = [
            report.day.to_string(),
            report.timezone.clone(),
            fmt_hours(report.hours),
            report.complete.to_string(),
            cell(&s.device),
            cell(s.name.as_deref().unwrap_or("")),
            cell(s.location.as_deref().unwrap_or("")),
            cell(&s.metric),
            cell(s.unit.as_deref().unwrap_or("")),
            s.readings.to_string(),
            num(s.min),
            num(s.max),
            num(s.mean),
            time(s.first_at),
            time(s.last_at),
            s.gaps.len().to_string(),
            s.gap_seconds.to_string(),
            s.out_of_range_seconds().to_string(),
            s.excursions().to_string(),
            s.alarms.len().to_string(),
            s.alarms
                .iter()
                .filter(|a| a.kind.starts_with("ack"))
                .count()
                .to_string(),
        ];
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    }
    out
}

/// A CSV text cell: quoted when needed, formula-looking text defused.
pub fn cell(text: &str) -> String {
    let mut t: String = text
        .chars()
        .filter(|c| !c.is_control() || *c == '\t')
        .collect();
    if t.starts_with(['=', '+', '-', '@']) {
        t.insert(0, '\'');
    }
    if t.contains([',', '"', '\n', '\r']) || t.starts_with(' ') || t.ends_with(' ') {
        format!("\"{}\"", t.replace('"', "\"\""))
    } else {
        t
    }
}

pub fn json(report: &DayReport) -> String {
    let mut s = serde_json::to_string_pretty(report)
        .unwrap_or_else(|e| format!("{{\"error\": {:?}}}", e.to_string()));
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_cells_are_quoted_and_defused() {
        assert_eq!(cell("fridge-1"), "fridge-1");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(cell("-5"), "'-5");
        assert_eq!(cell("line\nbreak"), "linebreak");
        assert_eq!(plain("fridge\u{1b}[2J-1\nx"), "fridge?[2J-1?x");
    }
}
