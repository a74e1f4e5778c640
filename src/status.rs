//! `outpost status`: a human summary read straight from the database, so it works
//! whether or not the service runs (WAL readers never block the writer).

use crate::display::DisplayConfig;
use crate::store::StatusReport;
use chrono::{DateTime, Utc};
use std::fmt::Write;

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

/// Renders the report as aligned text, values with the default precision.
pub fn render(report: &StatusReport, database: &str) -> String {
    render_with(report, database, &DisplayConfig::default())
}

/// Renders the report as aligned text, values as `display` says ([`crate::display`]).
pub fn render_with(report: &StatusReport, database: &str, display: &DisplayConfig) -> String {
    let mut out = String::new();
    let now = report.now;
    let _ = writeln!(
        out,
        "Database: {database} (schema {})",
        report.schema_version
    );
    let backlog = match report.backlog.oldest_received_at {
        Some(oldest) => format!(
            "{} unsynced, oldest {} old",
            report.backlog.rows,
            age(now, oldest)
        ),
        None => "nothing unsynced".to_string(),
    };
    let _ = writeln!(
        out,
        "Readings: {} stored; backlog: {backlog}",
        report.total_readings
    );
    let sync = &report.sync;
    let last = match sync.last_sync_at {
        Some(t) => format!("last round {} ago", age(now, t)),
        None => "no round completed yet (or sync is not configured)".to_string(),
    };
    let _ = writeln!(out, "Central sync: {last}");
    if let (Some(error), Some(at)) = (&sync.last_error, sync.last_error_at) {
        let failing = match sync.last_sync_at {
            Some(ok) => ok < at,
            None => true,
        };
        if failing {
            let _ = writeln!(
                out,
                "Central sync is FAILING since {} ago: {error}",
                age(now, at)
            );
        } else {
            let _ = writeln!(
                out,
                "Central sync: last error {} ago: {error}",
                age(now, at)
            );
        }
    }
    if report.pruned_unsynced > 0 {
        let _ = writeln!(
            out,
            "WARNING: {} unsynced readings were deleted to respect storage.max_size",
            report.pruned_unsynced
        );
    }
    if report.disk_full {
        let _ = writeln!(
            out,
            "Disk FULL: {} bytes free where the database lives; the agent refuses new readings until space is freed",
            report.disk_free_bytes.unwrap_or(0)
        );
    }
    if let Some(step) = &report.clock_step {
        let _ = writeln!(
            out,
            "Clock: {} ({} ago)",
            step.describe(),
            age(now, step.at)
        );
    }
    if report.rejected > 0 {
        let _ = writeln!(
            out,
            "Rejected input kept for diagnosis: {}",
            report.rejected
        );
    }
    out.push_str(&crate::sources::rejects::render_summary(
        &report.rejections,
        now,
    ));
    out.push_str(&crate::alerts::state::render(&report.alerts, now, display));
    for note in &report.source_notes {
        let _ = writeln!(out, "{note}");
    }
    let _ = writeln!(out);
    if report.series.is_empty() {
        let _ = writeln!(out, "No readings yet.");
        return out;
    }
    let header = ["SOURCE", "DEVICE", "METRIC", "LAST VALUE", "AGE", "COUNT"];
    let rows: Vec<[String; 6]> = report
        .series
        .iter()
        .map(|s| {
            [
                s.source.clone(),
                s.device.clone(),
                s.metric.clone(),
                display.value(&s.metric, s.value, s.unit.as_deref()),
                age(now, s.observed_at),
                s.count.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&header, &rows));
    out
}

/// G9: the stages the running agent reports stalled (saved beside the database; see
/// [`crate::progress::save`]), one line each, with what a technician should do.
pub fn stall_lines(saved: &crate::progress::SavedStalls, now: DateTime<Utc>) -> Vec<String> {
    let running = std::path::Path::new(&format!("/proc/{}", saved.pid)).exists();
    let mut lines: Vec<String> = saved
        .stalled
        .iter()
        .map(|s| {
            format!(
                "STALLED: {}: {} (reported {} ago; stall_after {}s)",
                s.stage,
                s.describe(),
                age(now, saved.at),
                saved.stall_after_s
            )
        })
        .collect();
    if !lines.is_empty() {
        lines.push(if running {
            format!(
                "  The agent (pid {}) stopped feeding the systemd watchdog; systemd restarts it. \
                 If stalls come back, send `journalctl -u outpost` to support.",
                saved.pid
            )
        } else {
            format!(
                "  The agent that reported this (pid {}) is no longer running.",
                saved.pid
            )
        });
    }
    lines
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
    fn ages_and_values() {
        let now = Utc::now();
        assert_eq!(age(now, now - chrono::Duration::seconds(5)), "5s");
        assert_eq!(age(now, now - chrono::Duration::minutes(5)), "5m");
        assert_eq!(age(now, now - chrono::Duration::hours(5)), "5h");
        assert_eq!(age(now, now - chrono::Duration::days(5)), "5d");
        assert_eq!(age(now, now + chrono::Duration::days(5)), "in the future");
    }
}
