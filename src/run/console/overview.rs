//! `/`: every device and metric with its latest value, unit and age (stale ones
//! marked) and the state of each rule on it; firing unacknowledged alarms first, in
//! a banner; the site's sync state and storage in plain words.
//!
//! A series is *stale* when its newest reading is older than the `after` of a
//! `stale` rule watching it, or, without one, than `http.source_max_silence`.

use super::alarms::{self, Alarm};
use super::context::{html, Ctx, Reply, Req};
use super::html::{esc, url};
use super::layout;
use super::words::{bytes, span, thousands};
use crate::alerts::{CompiledRule, RuleKind};
use crate::store::{BacklogSummary, SeriesSummary};
use chrono::{DateTime, Utc};
use hyper::StatusCode;
use rusqlite::Connection;
use std::fmt::Write;
use std::time::Duration;

/// What the overview shows, read in one go on a read connection.
pub struct Facts {
    pub series: Vec<SeriesSummary>,
    pub alarms: Vec<Alarm>,
    pub backlog: BacklogSummary,
    pub sync: crate::sync::local::SyncState,
    pub storage: Storage,
}

/// The store's size and how fast it grows.
#[derive(Debug, Clone, Default)]
pub struct Storage {
    /// The database file's size (pages × page size).
    pub bytes: u64,
    /// Readings stored now (estimated from the row ids: retention deletes from the
    /// old end, so the ids of what remains are nearly dense).
    pub readings: i64,
    /// Readings per day, averaged over what is stored.
    pub per_day: Option<f64>,
    pub disk_free: Option<u64>,
}

impl Storage {
    pub fn bytes_per_reading(&self) -> Option<f64> {
        (self.readings > 0).then(|| self.bytes as f64 / self.readings as f64)
    }

    /// How long until readings that wait for central would have to be pruned: the
    /// room left under `max_size` (and on the disk) for waiting readings, at the
    /// current rate. Synced readings make room for them (G4), so only the backlog
    /// counts against the cap.
    pub fn offline_capacity(&self, max_size: u64, backlog: i64) -> Option<Duration> {
        let per_reading = self.bytes_per_reading()?;
        let per_day = self.per_day.filter(|r| *r > 0.0)?;
        let mut limit = max_size as f64;
        if let Some(free) = self.disk_free {
            limit = limit.min(self.bytes as f64 + free as f64);
        }
        let room = (limit - backlog as f64 * per_reading).max(0.0);
        let days = room / (per_reading * per_day);
        Some(Duration::from_secs_f64((days * 86400.0).min(1e10)))
    }
}

pub fn storage(conn: &Connection) -> rusqlite::Result<Storage> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let ends = |order: &str| -> rusqlite::Result<Option<(i64, i64)>> {
        let sql = format!("SELECT id, received_at FROM readings ORDER BY id {order} LIMIT 1");
        match conn.query_row(&sql, [], |r| Ok((r.get(0)?, r.get(1)?))) {
            Ok(v) => Ok(Some(v)),
            Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
            Err(e) => Err(e),
        }
    };
    let (first, last) = (ends("ASC")?, ends("DESC")?);
    let (readings, per_day) = match (first, last) {
        (Some((id0, t0)), Some((id1, t1))) => {
            let n = id1 - id0 + 1;
            let days = (t1 - t0) as f64 / 86_400_000_000.0;
            // Less than an hour of data says little about a day.
            let per_day = (days >= 1.0 / 24.0).then(|| (n - 1) as f64 / days);
            (n, per_day)
        }
        _ => (0, None),
    };
    Ok(Storage {
        bytes: (pages.max(0) * page_size.max(0)) as u64,
        readings,
        per_day,
        disk_free: crate::store::database_disk_free(conn),
    })
}

pub fn read_facts(conn: &Connection) -> rusqlite::Result<Facts> {
    Ok(Facts {
        series: crate::store::series(conn)?,
        alarms: alarms::current(conn)?,
        backlog: crate::store::backlog(conn)?,
        sync: crate::sync::local::read_state(conn)?,
        storage: storage(conn)?,
    })
}

pub async fn get(ctx: &Ctx, req: &Req) -> Reply {
    let facts = match ctx.read(read_facts).await {
        Ok(f) => f,
        Err(reply) => return reply,
    };
    let inner = render(ctx, &facts);
    if req.wants_live() {
        return html(StatusCode::OK, inner);
    }
    html(
        StatusCode::OK,
        layout::page(ctx, "Overview", "/", "", &layout::live("/", &inner)),
    )
}

/// The whole changing part: banner, sync and storage, the devices.
pub fn render(ctx: &Ctx, facts: &Facts) -> String {
    let mut out = String::new();
    out.push_str(&banner(ctx, &facts.alarms));
    out.push_str(&site_state(ctx, facts));
    out.push_str(&devices(ctx, facts));
    out
}

/// Firing alarms nobody acknowledged yet, first and loud.
pub fn banner(ctx: &Ctx, alarms: &[Alarm]) -> String {
    let open: Vec<&Alarm> = alarms
        .iter()
        .filter(|a| a.firing() && a.acked.is_none())
        .collect();
    if open.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "<section class=\"banner\"><strong>{} firing alarm{} not acknowledged</strong><ul>",
        open.len(),
        if open.len() == 1 { "" } else { "s" }
    );
    for a in open {
        let value = a
            .value
            .map(|v| ctx.config.display.value(&a.metric, v, a.unit.as_deref()))
            .unwrap_or_default();
        let _ = write!(
            out,
            "<li><strong>{}</strong> ({}) on <a href=\"/device/{}\">{}</a> {} {} — firing for {}</li>",
            esc(&a.rule),
            esc(&a.severity),
            url(&a.device),
            esc(&a.device),
            esc(&a.metric),
            esc(&value),
            span((ctx.now - a.since).to_std().unwrap_or_default()),
        );
    }
    out.push_str("</ul><a href=\"/alarms\">Acknowledge on the alarm page</a></section>");
    out
}

/// Sync and storage in plain words.
pub fn site_state(ctx: &Ctx, facts: &Facts) -> String {
    let waiting = facts.backlog.rows;
    let capacity = facts
        .storage
        .offline_capacity(ctx.config.storage.max_size.0, waiting)
        .map(|d| format!("; room for about {} more", span_days(d)))
        .unwrap_or_default();
    let (class, sync) = match &ctx.config.sync {
        Some(s) if s.enabled => {
            let offline_since = if facts.sync.failing || waiting > 0 {
                facts.sync.last_sync_at.or(facts.backlog.oldest_received_at)
            } else {
                None
            };
            match (facts.sync.failing, offline_since) {
                (true, since) => {
                    let how_long = since
                        .map(|t| {
                            format!(" for {}", span((ctx.now - t).to_std().unwrap_or_default()))
                        })
                        .unwrap_or_default();
                    let error = facts
                        .sync
                        .last_error
                        .as_deref()
                        .map(|e| format!("<br><span class=\"muted\">Last error: {}</span>", esc(e)))
                        .unwrap_or_default();
                    (
                        "bad",
                        format!(
                            "Central offline{how_long}, {} readings waiting{capacity}.{error}",
                            thousands(waiting)
                        ),
                    )
                }
                (false, _) => {
                    let last = facts
                        .sync
                        .last_sync_at
                        .map(|t| format!(" (last sync {} ago)", crate::display::age(ctx.now, t)))
                        .unwrap_or_else(|| " (no sync round finished yet)".into());
                    let class = if facts.sync.last_sync_at.is_some() {
                        ""
                    } else {
                        "warn"
                    };
                    (
                        class,
                        format!("Central reachable, {} waiting{last}.", thousands(waiting)),
                    )
                }
            }
        }
        _ => (
            "warn",
            format!(
                "Central sync is not configured: readings are kept on this gateway only{capacity}."
            ),
        ),
    };
    let s = &facts.storage;
    let per_reading = s
        .bytes_per_reading()
        .map(|b| format!(", about {b:.0} bytes per reading"))
        .unwrap_or_default();
    let per_day = s
        .per_day
        .map(|r| format!(", {} readings a day", thousands(r.round() as i64)))
        .unwrap_or_default();
    let free = s
        .disk_free
        .map(|f| format!(", {} free on the disk", bytes(f)))
        .unwrap_or_default();
    format!(
        "<div class=\"state {class}\">{sync}</div><p class=\"muted\">Store: {} of {} ({} readings{per_reading}{per_day}{free}).</p>",
        bytes(s.bytes),
        bytes(ctx.config.storage.max_size.0),
        thousands(s.readings),
    )
}

/// "9 days", "about 20 hours": offline capacity, rounded down.
fn span_days(d: Duration) -> String {
    let hours = d.as_secs() / 3600;
    match hours {
        0 => "less than an hour".into(),
        1..=47 => format!("{hours} hours"),
        _ if hours / 24 > 3650 => "more than 10 years".into(),
        _ => format!("{} days", hours / 24),
    }
}

/// Every device with its metrics: value, age, rule states.
pub fn devices(ctx: &Ctx, facts: &Facts) -> String {
    let rules: Vec<CompiledRule> = ctx
        .config
        .alerts
        .iter()
        .filter_map(|r| CompiledRule::new(r).ok())
        .collect();
    let silence = ctx.config.http.source_max_silence.get();
    let mut out = String::from("<h2>Devices</h2>");
    if facts.series.is_empty() {
        out.push_str("<p class=\"muted\">No readings stored yet.</p>");
    }
    let mut by_device: Vec<(&str, Vec<&SeriesSummary>)> = Vec::new();
    for s in &facts.series {
        match by_device.iter_mut().find(|(d, _)| *d == s.device) {
            Some((_, list)) => list.push(s),
            None => by_device.push((&s.device, vec![s])),
        }
    }
    by_device.sort_by(|a, b| a.0.cmp(b.0));
    out.push_str("<div class=\"wrap\"><table><thead><tr><th>Device</th><th>Metric</th><th>Value</th><th>Age</th><th>Rules</th></tr></thead><tbody>");
    for (device, list) in by_device {
        let config = ctx.config.devices.iter().find(|d| d.id == device);
        let label = config
            .and_then(|d| d.name.as_deref())
            .map(|n| format!("<br><span class=\"muted\">{}</span>", esc(n)))
            .unwrap_or_default();
        for (i, s) in list.iter().enumerate() {
            let device_cell = if i == 0 {
                format!(
                    "<td rowspan=\"{}\"><a href=\"/device/{}\">{}</a>{label}</td>",
                    list.len(),
                    url(device),
                    esc(device)
                )
            } else {
                String::new()
            };
            let matching: Vec<&CompiledRule> = rules
                .iter()
                .filter(|r| r.def.metric == s.metric && r.matches(&s.device, &s.metric, None))
                .collect();
            let limit = matching
                .iter()
                .filter(|r| r.def.kind == RuleKind::Stale)
                .filter_map(|r| r.def.after.map(|a| a.get()))
                .min()
                .unwrap_or(silence);
            let age = (ctx.now - s.received_at.max(s.observed_at))
                .to_std()
                .unwrap_or_default();
            let stale = age > limit;
            let mut tags = String::new();
            let mut shown: Vec<&str> = Vec::new();
            for a in facts
                .alarms
                .iter()
                .filter(|a| a.device == s.device && a.metric == s.metric)
            {
                let (class, word) = match (a.firing(), &a.acked) {
                    (true, None) => ("firing", "firing"),
                    (true, Some(_)) => ("acked", "firing, acknowledged"),
                    (false, _) => ("pending", "pending"),
                };
                let _ = write!(
                    tags,
                    "<span class=\"tag {class}\">{}: {word}</span>",
                    esc(&a.rule)
                );
                shown.push(&a.rule);
            }
            for r in &matching {
                if !shown.contains(&r.def.name.as_str()) {
                    let _ = write!(
                        tags,
                        "<span class=\"tag ok\" title=\"{}\">{}: ok</span>",
                        esc(&r.describe(
                            s.unit.as_deref(),
                            ctx.config.display.precision_of(&s.metric)
                        )),
                        esc(&r.def.name)
                    );
                }
            }
            let _ = write!(
                out,
                "<tr{row_class}>{device_cell}<td>{metric}</td><td class=\"num\">{value}</td><td>{age}{stale}</td><td>{tags}</td></tr>",
                row_class = if stale { " class=\"stale\"" } else { "" },
                metric = esc(&s.metric),
                value = esc(&ctx.config.display.value(&s.metric, s.value, s.unit.as_deref())),
                age = age_words(ctx.now, s.observed_at),
                stale = if stale { " <span class=\"tag stale\">stale</span>" } else { "" },
            );
        }
    }
    out.push_str("</tbody></table></div>");
    out
}

fn age_words(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    format!(
        "<time title=\"{}\">{} ago</time>",
        then.format("%Y-%m-%d %H:%M:%S UTC"),
        crate::display::age(now, then)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_capacity_counts_only_the_backlog_against_the_cap() {
        let s = Storage {
            bytes: 100 << 20,
            readings: 1_000_000,
            per_day: Some(100_000.0),
            disk_free: None,
        };
        // ~105 bytes a reading, 10.5 MB a day; a 1 GiB cap with nothing waiting.
        let d = s.offline_capacity(1 << 30, 0).unwrap();
        assert_eq!(d.as_secs() / 86400, 102);
        // Half the cap already waiting.
        let d = s.offline_capacity(1 << 30, 5_000_000).unwrap();
        assert_eq!(d.as_secs() / 86400, 52);
        // A nearly full disk limits it.
        let s = Storage {
            disk_free: Some(10 << 20),
            ..s
        };
        assert_eq!(
            s.offline_capacity(1 << 30, 1_000_000).unwrap().as_secs() / 86400,
            1
        );
        assert_eq!(Storage::default().offline_capacity(1 << 30, 0), None);
        assert_eq!(span_days(Duration::from_secs(9 * 86400 + 5)), "9 days");
        assert_eq!(span_days(Duration::from_secs(20 * 3600)), "20 hours");
    }
}
