//! `outpost status`: a human summary read straight from the database, so it works
//! whether or not the service runs (WAL readers never block the writer).

use crate::clock::STEP_STATE as STEP;
use crate::display::DisplayConfig;
use crate::display::{age, table};
use chrono::{DateTime, Utc};
use rusqlite::Connection;
use serde::Serialize;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// What `outpost status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub now: DateTime<Utc>,
    pub series: Vec<crate::store::SeriesSummary>,
    pub total_readings: i64,
    pub backlog: crate::store::BacklogSummary,
    pub pruned_unsynced: i64,
    pub rejected: i64,
    pub schema_version: i64,
    /// Central sync: last completed round and last error.
    pub sync: crate::sync::local::SyncState,
    /// Firing alerts and notifications waiting or given up.
    pub alerts: crate::alerts::state::AlertsSummary,
    /// Device-level state of serial and Modbus sources (port open, slaves offline).
    pub source_notes: Vec<String>,
    /// Rejected input per source and reason, with the last time and a hint.
    pub rejections: Vec<crate::sources::rejects::RejectionSummary>,
    /// Bytes an unprivileged writer can still use on the database's filesystem.
    pub disk_free_bytes: Option<u64>,
    /// Below [`crate::store::DISK_FULL_BELOW`] free: the agent's commits fail with SQLITE_FULL.
    pub disk_full: bool,
    /// A step of the wall clock the agent saw recently (see [`crate::clock`]).
    pub clock_step: Option<crate::clock::ClockStep>,
}

/// The status summary, read from the database at `path` without the agent's help.
pub fn status_report(path: &Path) -> rusqlite::Result<StatusReport> {
    let conn = crate::store::open_reader(path, std::time::Duration::from_secs(5))?;
    report(&conn, crate::clock::Clock::system().now())
}

/// The summary from the store and from what each component keeps in it.
pub fn report(conn: &Connection, now: DateTime<Utc>) -> rusqlite::Result<StatusReport> {
    let disk_free_bytes = crate::store::database_disk_free(conn);
    let counts = crate::store::reading_counts(conn)?;
    Ok(StatusReport {
        now,
        series: crate::store::series(conn)?,
        total_readings: counts.stored,
        backlog: crate::store::backlog_from(conn, counts)?,
        pruned_unsynced: crate::store::counter(conn, "pruned_unsynced")?,
        rejected: conn.query_row("SELECT COUNT(*) FROM rejected", [], |r| r.get(0))?,
        schema_version: conn.query_row("PRAGMA user_version", [], |r| r.get(0))?,
        sync: crate::sync::local::read_state(conn)?,
        alerts: crate::alerts::state::summary(conn)?,
        source_notes: crate::sources::rejects::status_notes(conn)?,
        rejections: crate::sources::rejects::summary(conn)?,
        disk_free_bytes,
        disk_full: disk_free_bytes.is_some_and(|b| b < crate::store::DISK_FULL_BELOW),
        clock_step: crate::clock::ClockStep::recent_from_json(
            crate::store::state::read_state(conn, STEP.0, STEP.1)?.as_deref(),
            now,
        ),
    })
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
        if sync.failing {
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

/// The command-line arguments of `outpost status`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Read this database instead of the configured one.
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn main(config_path: Option<&Path>, args: Args) -> ExitCode {
    let Args { db, json } = args;
    // `[[devices]] calibration_due` from the configuration, when it loads.
    let calibrations = crate::config::Config::load(&crate::config::resolve_path(config_path))
        .map(|c| {
            let today = crate::report::summary::DayBounds::date_of(
                c.agent.tz(),
                crate::clock::Clock::system().now(),
            );
            crate::report::calibration::all(&c.devices, today)
        })
        .unwrap_or_default();
    // Without --db the configuration is at hand: its certificate files are checked too.
    let certificates = match db {
        None => crate::config::Config::load(&crate::config::resolve_path(config_path))
            .map(|c| crate::tls::status_of(&c.tls_endpoints(), crate::clock::Clock::system().now()))
            .unwrap_or_default(),
        Some(_) => Vec::new(),
    };
    let db = match super::database_path(config_path, db) {
        Ok(db) => db,
        Err(code) => return code,
    };
    // What the servers presented, as the running agent saved it.
    let mut certificates = certificates;
    certificates.extend(crate::tls::presented_status(&db, chrono::Utc::now()));
    // G9: stalled stages, as the running agent saved them.
    let stalls = crate::progress::load_saved(&db);
    match status_report(&db) {
        Ok(report) if json => match serde_json::to_value(&report).map(|mut v| {
            if let Some(map) = v.as_object_mut() {
                map.insert("certificates".into(), serde_json::json!(certificates));
                map.insert("calibration".into(), serde_json::json!(calibrations));
                map.insert(
                    "stalled".into(),
                    serde_json::json!(stalls.as_ref().map(|s| &s.stalled).unwrap_or(&Vec::new())),
                );
            }
            v
        }) {
            Ok(mut v) => {
                if let Some(map) = v.as_object_mut() {
                    let recovered = backfill_recovered(&db);
                    map.insert("backfill_recovered".into(), serde_json::json!(recovered));
                }
                println!("{v:#}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("outpost: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(report) => {
            print!(
                "{}",
                render_with(
                    &report,
                    &db.display().to_string(),
                    &super::display_config(config_path)
                )
            );
            for source in backfill_recovered(&db) {
                println!("{}", source.describe());
            }
            for line in crate::tls::status_lines(&certificates) {
                println!("{line}");
            }
            for c in calibrations
                .iter()
                .filter(|c| c.state != crate::report::calibration::Due::Ok)
            {
                println!("Calibration: {}.", c.describe());
            }
            if let Some(stalls) = &stalls {
                for line in stall_lines(stalls, crate::clock::Clock::system().now()) {
                    println!("{line}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outpost: cannot read {}: {e}", db.display());
            ExitCode::FAILURE
        }
    }
}

/// What the TTN backfill recovered per source (empty when the database cannot tell).
fn backfill_recovered(db: &Path) -> Vec<crate::sources::ttn_backfill::RecoveryStatus> {
    crate::store::open_reader(db, std::time::Duration::from_secs(5))
        .and_then(|conn| crate::sources::ttn_backfill::recovery_status(&conn))
        .unwrap_or_default()
}
