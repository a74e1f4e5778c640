//! One local day's summary per device and metric, computed from the local database.
//!
//! - **The day** is local midnight to local midnight in `agent.timezone`, taken from
//!   the zone: 23 hours on the spring daylight-saving day, 25 on the autumn one. A day
//!   whose midnight does not exist (a zone that changes at 00:00) starts at its first
//!   local minute that does.
//! - **A reading holds** until the next one, unless they are further apart than the gap
//!   threshold (the device's `gap`, else twice the day's median interval, else 1 h):
//!   such a pause is a *gap*, whose time is unknown — neither in range nor out of
//!   range. The time from the day's start to its first reading, and from its last
//!   reading to the day's end (or now, today), is a gap too when longer than that.
//! - **Time out of range** is counted per rule with a level (`above` or `below`) whose
//!   scope covers the series; an *excursion* is a run of consecutive readings beyond the
//!   level (a gap ends it).
//! - **Which series**: every device and metric with readings or alert events that day,
//!   and every `[[devices]]` entry (with "no readings" if it sent none).
//! - **Alarms** are the day's `alert_events` of the series, of every kind (firing,
//!   reminder, resolved, acknowledged, …), with who and a note when the event has them.

use super::{DeviceConfig, Tz};
use crate::alerts::{AlertRule, CompiledRule};
use crate::model::{from_micros, to_micros};
use chrono::{DateTime, Duration as CDuration, LocalResult, NaiveDate, TimeZone, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The gap threshold when the device sets none and the day has fewer than two readings.
pub const FALLBACK_GAP: Duration = Duration::from_secs(3600);

/// The bounds of one local day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayBounds {
    pub day: NaiveDate,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl DayBounds {
    /// The day `day` in `tz`; `None` only for dates at the end of chrono's range.
    pub fn of(tz: Tz, day: NaiveDate) -> Option<DayBounds> {
        Some(DayBounds {
            day,
            start: local_start(tz, day)?,
            end: local_start(tz, day.succ_opt()?)?,
        })
    }

    /// The local date of `t` in `tz`.
    pub fn date_of(tz: Tz, t: DateTime<Utc>) -> NaiveDate {
        t.with_timezone(&tz).date_naive()
    }

    /// The day's length in hours (23, 24 or 25 around daylight-saving changes).
    pub fn hours(&self) -> f64 {
        (self.end - self.start).num_seconds() as f64 / 3600.0
    }
}

/// The first instant of local `day`: midnight, or the first local minute after it that
/// exists.
fn local_start(tz: Tz, day: NaiveDate) -> Option<DateTime<Utc>> {
    let midnight = day.and_hms_opt(0, 0, 0)?;
    for minutes in 0..=(3 * 60) {
        let local = midnight + CDuration::minutes(minutes);
        match tz.from_local_datetime(&local) {
            LocalResult::Single(t) => return Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(first, _) => return Some(first.with_timezone(&Utc)),
            LocalResult::None => continue,
        }
    }
    None
}

/// What a summary is computed with.
pub struct Context<'a> {
    pub tz: Tz,
    pub rules: &'a [AlertRule],
    pub devices: &'a [DeviceConfig],
    /// The wall clock's now: today's summary covers the day so far.
    pub now: DateTime<Utc>,
}

/// A pause without readings longer than the gap threshold.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Gap {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// Time beyond one rule's level.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutOfRange {
    pub rule: String,
    /// `"above 8"` or `"below 2"`.
    pub condition: String,
    pub seconds: u64,
    pub excursions: u64,
}

/// One alert event of the day (any kind).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Alarm {
    pub at: DateTime<Utc>,
    pub kind: String,
    pub rule: String,
    pub severity: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Who acted (an acknowledgement's `by`), when the event says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One device and metric over one local day.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SeriesDay {
    pub device: String,
    /// Empty for a `[[devices]]` entry that never sent a reading.
    pub metric: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    pub readings: u64,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
    pub first_at: Option<DateTime<Utc>>,
    pub last_at: Option<DateTime<Utc>>,
    pub gap_threshold_seconds: u64,
    pub gaps: Vec<Gap>,
    pub gap_seconds: u64,
    pub out_of_range: Vec<OutOfRange>,
    pub alarms: Vec<Alarm>,
}

impl SeriesDay {
    /// Seconds beyond any level (the largest of the rules' times).
    pub fn out_of_range_seconds(&self) -> u64 {
        self.out_of_range
            .iter()
            .map(|o| o.seconds)
            .max()
            .unwrap_or(0)
    }

    pub fn excursions(&self) -> u64 {
        self.out_of_range.iter().map(|o| o.excursions).sum()
    }
}

/// One local day of every series.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DayReport {
    pub day: NaiveDate,
    pub timezone: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub hours: f64,
    /// False for today: the summary covers the day until `computed_at`.
    pub complete: bool,
    pub computed_at: DateTime<Utc>,
    pub series: Vec<SeriesDay>,
}

impl DayReport {
    pub fn readings(&self) -> u64 {
        self.series.iter().map(|s| s.readings).sum()
    }
}

/// Computes `day` from the readings and alert events (for `device` only, if given).
pub fn compute(
    conn: &Connection,
    ctx: &Context<'_>,
    day: NaiveDate,
    device: Option<&str>,
) -> rusqlite::Result<DayReport> {
    let bounds = DayBounds::of(ctx.tz, day).ok_or_else(|| {
        rusqlite::Error::InvalidParameterName(format!("the date {day} is out of range"))
    })?;
    let covered_end = bounds.end.min(ctx.now).max(bounds.start);
    let mut keys: BTreeSet<(String, String)> = BTreeSet::new();
    {
        let mut stmt = conn.prepare(
            "SELECT DISTINCT device, metric FROM series WHERE ?1 IS NULL OR device = ?1",
        )?;
        let rows = stmt.query_map(params![device], |r| Ok((r.get(0)?, r.get(1)?)))?;
        for row in rows {
            keys.insert(row?);
        }
    }
    let mut alarms = day_alarms(conn, &bounds, device)?;
    for (d, m) in alarms.keys() {
        keys.insert((d.clone(), m.clone()));
    }
    for d in ctx.devices {
        if device.is_none_or(|only| only == d.id) && !keys.iter().any(|(k, _)| *k == d.id) {
            keys.insert((d.id.clone(), String::new()));
        }
    }
    let rules: Vec<CompiledRule> = ctx
        .rules
        .iter()
        .filter(|r| r.above.is_some() || r.below.is_some())
        .filter_map(|r| CompiledRule::new(r).ok())
        .collect();
    let mut series = Vec::with_capacity(keys.len());
    for (dev, metric) in keys {
        let config = ctx.devices.iter().find(|d| d.id == dev);
        let mut s = series_day(conn, &bounds, covered_end, &dev, &metric, config, &rules)?;
        s.alarms = alarms.remove(&(dev, metric)).unwrap_or_default();
        // A series no `[[devices]]` table lists appears on the days it has readings or
        // alarms; a listed device appears every day, saying "no readings" if so.
        if s.readings > 0 || !s.alarms.is_empty() || config.is_some() {
            series.push(s);
        }
    }
    Ok(DayReport {
        day,
        timezone: ctx.tz.name().to_string(),
        start: bounds.start,
        end: bounds.end,
        hours: bounds.hours(),
        complete: ctx.now >= bounds.end,
        computed_at: ctx.now,
        series,
    })
}

type Alarms = BTreeMap<(String, String), Vec<Alarm>>;

fn day_alarms(conn: &Connection, b: &DayBounds, device: Option<&str>) -> rusqlite::Result<Alarms> {
    let mut stmt = conn.prepare(
        "SELECT device, metric, kind, rule, severity, value, occurred_at, message FROM alert_events
         WHERE occurred_at >= ?1 AND occurred_at < ?2 AND (?3 IS NULL OR device = ?3)
         ORDER BY occurred_at, id",
    )?;
    let rows = stmt.query_map(params![to_micros(b.start), to_micros(b.end), device], |r| {
        let message: Option<String> = r.get(7)?;
        let json: Option<serde_json::Value> = message.and_then(|m| serde_json::from_str(&m).ok());
        let text = |keys: &[&str]| {
            keys.iter().find_map(|k| {
                json.as_ref()
                    .and_then(|j| j.get(*k))
                    .and_then(|v| v.as_str())
                    .map(|s| s.chars().take(500).collect::<String>())
            })
        };
        Ok((
            (r.get::<_, String>(0)?, r.get::<_, String>(1)?),
            Alarm {
                at: from_micros(r.get(6)?),
                kind: r.get(2)?,
                rule: r.get(3)?,
                severity: r.get(4)?,
                value: r.get(5)?,
                by: text(&["actor", "by", "acknowledged_by"]),
                note: text(&["note"]),
            },
        ))
    })?;
    let mut out: Alarms = BTreeMap::new();
    for row in rows {
        let (key, alarm) = row?;
        out.entry(key).or_default().push(alarm);
    }
    Ok(out)
}

fn series_day(
    conn: &Connection,
    b: &DayBounds,
    covered_end: DateTime<Utc>,
    device: &str,
    metric: &str,
    config: Option<&DeviceConfig>,
    rules: &[CompiledRule],
) -> rusqlite::Result<SeriesDay> {
    let mut stmt = conn.prepare_cached(
        "SELECT value, unit, observed_at, meta FROM readings
         WHERE device = ?1 AND metric = ?2 AND observed_at >= ?3 AND observed_at < ?4
         ORDER BY observed_at, id",
    )?;
    let mut points: Vec<(i64, f64)> = Vec::new();
    let mut unit: Option<String> = None;
    let mut meta: Option<serde_json::Value> = None;
    let mut rows = stmt.query(params![
        device,
        metric,
        to_micros(b.start),
        to_micros(b.end)
    ])?;
    while let Some(r) = rows.next()? {
        let value: f64 = r.get(0)?;
        if unit.is_none() {
            unit = r.get(1)?;
        }
        if meta.is_none() {
            meta = r
                .get::<_, Option<String>>(3)?
                .and_then(|m| serde_json::from_str(&m).ok());
        }
        if value.is_finite() {
            points.push((r.get(2)?, value));
        }
    }
    let threshold_us = gap_threshold(config.and_then(|c| c.gap.map(|g| g.get())), &points);
    let start_us = to_micros(b.start);
    let end_us = to_micros(covered_end);

    let mut gaps = Vec::new();
    let mut cursor = start_us;
    for &(t, _) in &points {
        if t - cursor > threshold_us {
            gaps.push((cursor, t));
        }
        cursor = cursor.max(t);
    }
    if end_us - cursor > threshold_us {
        gaps.push((cursor, end_us));
    }
    let gap_us: i64 = gaps.iter().map(|(a, z)| z - a).sum();

    let mut out_of_range = Vec::new();
    for rule in rules
        .iter()
        .filter(|r| r.matches(device, metric, meta.as_ref()))
    {
        let (condition, breaches): (String, Box<dyn Fn(f64) -> bool>) =
            match (rule.def.above, rule.def.below) {
                (Some(level), _) => (format!("above {level}"), Box::new(move |v| v > level)),
                (None, Some(level)) => (format!("below {level}"), Box::new(move |v| v < level)),
                (None, None) => continue,
            };
        let (mut us, mut excursions, mut inside) = (0i64, 0u64, false);
        for (i, &(t, v)) in points.iter().enumerate() {
            let next = points.get(i + 1).map_or(end_us, |p| p.0);
            // Up to the next reading; nothing into a gap (its time is unknown).
            let held_until = if next - t > threshold_us {
                t
            } else {
                next.min(end_us).max(t)
            };
            if breaches(v) {
                us += held_until - t;
                if !inside {
                    excursions += 1;
                }
                inside = true;
            } else {
                inside = false;
            }
            if next - t > threshold_us {
                inside = false;
            }
        }
        out_of_range.push(OutOfRange {
            rule: rule.def.name.clone(),
            condition,
            seconds: (us / 1_000_000) as u64,
            excursions,
        });
    }

    let n = points.len();
    let (min, max, mean) = if n == 0 {
        (None, None, None)
    } else {
        let min = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let max = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let mean = points.iter().map(|p| p.1).sum::<f64>() / n as f64;
        (Some(min), Some(max), Some(mean))
    };
    Ok(SeriesDay {
        device: device.to_string(),
        metric: metric.to_string(),
        name: config.and_then(|c| c.name.clone()),
        location: config.and_then(|c| c.location.clone()),
        unit,
        readings: n as u64,
        min,
        max,
        mean,
        first_at: points.first().map(|p| from_micros(p.0)),
        last_at: points.last().map(|p| from_micros(p.0)),
        gap_threshold_seconds: (threshold_us / 1_000_000) as u64,
        gaps: gaps
            .into_iter()
            .map(|(a, z)| Gap {
                from: from_micros(a),
                to: from_micros(z),
            })
            .collect(),
        gap_seconds: (gap_us / 1_000_000) as u64,
        out_of_range,
        alarms: Vec::new(),
    })
}

/// The gap threshold in µs: configured, else twice the median interval, else 1 h.
fn gap_threshold(configured: Option<Duration>, points: &[(i64, f64)]) -> i64 {
    if let Some(d) = configured {
        return d.as_micros() as i64;
    }
    let mut diffs: Vec<i64> = points
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .filter(|d| *d > 0)
        .collect();
    if diffs.is_empty() {
        return FALLBACK_GAP.as_micros() as i64;
    }
    diffs.sort_unstable();
    (diffs[diffs.len() / 2] * 2).max(1_000_000)
}

/// Writes `report`'s series into `daily_summaries` (a row whose content changed is
/// marked unsynced again).
pub fn save(conn: &Connection, report: &DayReport) -> rusqlite::Result<usize> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO daily_summaries (day, device, metric, timezone, day_start, day_end,
             complete, readings, min, max, mean, gaps, gap_seconds, out_of_range_seconds,
             excursions, alarms, detail, computed_at, synced)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, 0)
         ON CONFLICT (day, device, metric) DO UPDATE SET
             timezone = excluded.timezone, day_start = excluded.day_start,
             day_end = excluded.day_end, complete = excluded.complete,
             readings = excluded.readings, min = excluded.min, max = excluded.max,
             mean = excluded.mean, gaps = excluded.gaps, gap_seconds = excluded.gap_seconds,
             out_of_range_seconds = excluded.out_of_range_seconds,
             excursions = excluded.excursions, alarms = excluded.alarms,
             detail = excluded.detail, computed_at = excluded.computed_at, synced = 0
         WHERE daily_summaries.detail IS NOT excluded.detail
            OR daily_summaries.timezone IS NOT excluded.timezone
            OR daily_summaries.complete IS NOT excluded.complete",
    )?;
    let mut changed = 0;
    for s in &report.series {
        let detail = serde_json::to_string(s)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        changed += stmt.execute(params![
            report.day.to_string(),
            s.device,
            s.metric,
            report.timezone,
            to_micros(report.start),
            to_micros(report.end),
            report.complete,
            s.readings as i64,
            s.min,
            s.max,
            s.mean,
            s.gaps.len() as i64,
            s.gap_seconds as i64,
            s.out_of_range_seconds() as i64,
            s.excursions() as i64,
            s.alarms.len() as i64,
            detail,
            to_micros(report.computed_at),
        ])?;
    }
    Ok(changed)
}

/// The stored, complete summary of `day` in `tz` (for `device` only, if given), if the
/// gateway computed it.
pub fn load(
    conn: &Connection,
    tz: Tz,
    day: NaiveDate,
    device: Option<&str>,
) -> rusqlite::Result<Option<DayReport>> {
    let mut stmt = conn.prepare(
        "SELECT day_start, day_end, detail, computed_at FROM daily_summaries
         WHERE day = ?1 AND timezone = ?2 AND complete = 1 AND (?3 IS NULL OR device = ?3)
         ORDER BY device, metric",
    )?;
    let mut rows = stmt.query(params![day.to_string(), tz.name(), device])?;
    let mut report: Option<DayReport> = None;
    while let Some(r) = rows.next()? {
        let detail: String = r.get(2)?;
        let Ok(series) = serde_json::from_str::<SeriesDay>(&detail) else {
            return Ok(None);
        };
        let report = report.get_or_insert_with(|| DayReport {
            day,
            timezone: tz.name().to_string(),
            start: from_micros(r.get(0).unwrap_or_default()),
            end: from_micros(r.get(1).unwrap_or_default()),
            hours: 0.0,
            complete: true,
            computed_at: from_micros(r.get(3).unwrap_or_default()),
            series: Vec::new(),
        });
        report.hours = (report.end - report.start).num_seconds() as f64 / 3600.0;
        report.series.push(series);
    }
    Ok(report)
}

/// Whether a complete summary of `day` in `tz` is stored.
pub fn is_stored(conn: &Connection, tz: Tz, day: NaiveDate) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT 1 FROM daily_summaries WHERE day = ?1 AND timezone = ?2 AND complete = 1 LIMIT 1",
        params![day.to_string(), tz.name()],
        |_| Ok(()),
    )
    .optional()
    .map(|r| r.is_some())
}

/// Deletes synced summaries of days that ended before `before`.
pub fn prune(conn: &Connection, before: DateTime<Utc>) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM daily_summaries WHERE synced = 1 AND day_end < ?1",
        params![to_micros(before)],
    )
}

/// The day `outpost report` shows and the gateway keeps: stored when complete and
/// kept, else computed now.
pub fn day_report(
    conn: &Connection,
    ctx: &Context<'_>,
    day: NaiveDate,
    device: Option<&str>,
) -> rusqlite::Result<DayReport> {
    let today = DayBounds::date_of(ctx.tz, ctx.now);
    if day < today {
        if let Some(stored) = load(conn, ctx.tz, day, device)? {
            return Ok(stored);
        }
    }
    compute(conn, ctx, day, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tz(name: &str) -> Tz {
        super::super::parse_timezone(name).unwrap()
    }

    #[test]
    fn daylight_saving_days_have_23_and_25_hours() {
        let berlin = tz("Europe/Berlin");
        let d = |y, m, day| NaiveDate::from_ymd_opt(y, m, day).unwrap();
        assert_eq!(DayBounds::of(berlin, d(2026, 3, 29)).unwrap().hours(), 23.0);
        assert_eq!(
            DayBounds::of(berlin, d(2026, 10, 25)).unwrap().hours(),
            25.0
        );
        let normal = DayBounds::of(berlin, d(2026, 12, 5)).unwrap();
        assert_eq!(normal.hours(), 24.0);
        assert_eq!(normal.start.to_rfc3339(), "2026-12-04T23:00:00+00:00");
        // A zone whose clocks skip midnight: the day starts at 01:00 local.
        let havana = tz("America/Havana");
        let b = DayBounds::of(havana, d(2026, 3, 8)).unwrap();
        assert_eq!(b.hours(), 23.0);
    }

    #[test]
    fn gap_threshold_is_twice_the_median() {
        let pts: Vec<(i64, f64)> = (0..10).map(|i| (i * 60_000_000, 1.0)).collect();
        assert_eq!(gap_threshold(None, &pts), 120_000_000);
        assert_eq!(
            gap_threshold(None, &pts[..1]),
            FALLBACK_GAP.as_micros() as i64
        );
        assert_eq!(gap_threshold(Some(Duration::from_secs(5)), &pts), 5_000_000);
    }
}
