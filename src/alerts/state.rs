//! Alert persistence: the state of every alert that is not ok, the engine's cursor,
//! events and their outbox rows (all in one transaction per change), and the summary
//! `outpost status` prints.
//!
//! An alert in the ok state has no row: the table holds only pending and firing alerts,
//! so it stays small whatever the number of series. The tables themselves are created
//! by the store's migrations (`store/schema.rs`, migration 2).

use super::{AlertEvent, EventKind, Severity};
use crate::model::{from_micros, to_micros, Uid};
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// Where the engine keeps its cursor in `source_state`.
const CURSOR_SOURCE: &str = "alerts";
const CURSOR_KEY: &str = "cursor";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Pending,
    Firing,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Firing => "firing",
        }
    }
}

/// A persisted pending or firing alert.
#[derive(Debug, Clone, PartialEq)]
pub struct StateRow {
    pub rule_key: String,
    pub device: String,
    pub metric: String,
    pub rule: String,
    pub severity: Severity,
    pub phase: Phase,
    pub since: DateTime<Utc>,
    pub value: Option<f64>,
    pub unit: Option<String>,
    pub last_notified: Option<DateTime<Utc>>,
    /// When it fired (escalation delays count from it); none while pending.
    pub fired_at: Option<DateTime<Utc>>,
    /// Escalation steps sent for this firing.
    pub escalations_sent: u32,
    /// The notifiers those steps reached (the resolution goes to them too).
    pub escalated_to: Vec<String>,
    /// The acknowledgement of this firing. The engine never writes it (its upserts
    /// leave the columns alone); [`super::ack`] does, and a new firing row starts
    /// without one.
    pub ack: Option<Ack>,
}

/// Who acknowledged a firing alert, when, why and through which channel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ack {
    pub by: String,
    pub at: DateTime<Utc>,
    pub note: Option<String>,
    pub channel: String,
}

// Few changes are in flight at once (one engine step's); boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum StateChange {
    Upsert(StateRow),
    /// Back to ok (or the rule is gone).
    Delete {
        rule_key: String,
        device: String,
        metric: String,
    },
}

/// An event to store with the notifiers it goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub event: AlertEvent,
    pub notifiers: Vec<String>,
}

/// Everything the engine decided since its last write.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Changes {
    pub states: Vec<StateChange>,
    pub events: Vec<NewEvent>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.states.is_empty() && self.events.is_empty()
    }
    pub fn append(&mut self, mut other: Changes) {
        self.states.append(&mut other.states);
        self.events.append(&mut other.events);
    }
}

/// A series the store has seen, to start stale timers after a restart.
#[derive(Debug, Clone)]
pub struct SeenSeries {
    pub device: String,
    pub metric: String,
    pub last_received: DateTime<Utc>,
    /// The last reading's meta (only loaded when some rule filters on tags).
    pub meta: Option<serde_json::Value>,
}

/// What the engine reloads at start.
#[derive(Debug, Default)]
pub struct Loaded {
    pub cursor: Option<i64>,
    pub newest_reading: i64,
    pub states: Vec<StateRow>,
    pub seen: Vec<SeenSeries>,
}

/// The acknowledgement in columns `at..at + 3` (acked_at, acked_by, ack_note,
/// ack_channel) of a row.
fn ack_from(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<Ack>> {
    let acked_at: Option<i64> = r.get(at)?;
    Ok(match acked_at {
        Some(t) => Some(Ack {
            at: from_micros(t),
            by: r.get::<_, Option<String>>(at + 1)?.unwrap_or_default(),
            note: r.get(at + 2)?,
            channel: r.get::<_, Option<String>>(at + 3)?.unwrap_or_default(),
        }),
        None => None,
    })
}

fn severity_from(s: &str) -> Severity {
    match s {
        "critical" => Severity::Critical,
        "info" => Severity::Info,
        _ => Severity::Warning,
    }
}

pub fn load(conn: &Connection, with_meta: bool) -> rusqlite::Result<Loaded> {
    let cursor = conn
        .query_row(
            "SELECT value FROM source_state WHERE source = ?1 AND key = ?2",
            params![CURSOR_SOURCE, CURSOR_KEY],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .and_then(|v| v.parse::<i64>().ok());
    let newest_reading = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM readings", [], |r| {
        r.get(0)
    })?;
    let mut stmt = conn.prepare(
        "SELECT rule_key, device, metric, rule, severity, state, since, value, unit, last_notified, \
         fired_at, escalations_sent, escalated_to, acked_at, acked_by, ack_note, ack_channel FROM alert_state",
    )?;
    let states = stmt
        .query_map([], |r| {
            let state: String = r.get(5)?;
            let escalated_to: Option<String> = r.get(12)?;
            Ok(StateRow {
                fired_at: r.get::<_, Option<i64>>(10)?.map(from_micros),
                escalations_sent: r.get::<_, i64>(11)?.clamp(0, u32::MAX as i64) as u32,
                escalated_to: escalated_to
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default(),
                ack: ack_from(r, 13)?,
                rule_key: r.get(0)?,
                device: r.get(1)?,
                metric: r.get(2)?,
                rule: r.get(3)?,
                severity: severity_from(&r.get::<_, String>(4)?),
                phase: if state == "firing" {
                    Phase::Firing
                } else {
                    Phase::Pending
                },
                since: from_micros(r.get(6)?),
                value: r.get(7)?,
                unit: r.get(8)?,
                last_notified: r.get::<_, Option<i64>>(9)?.map(from_micros),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut stmt = conn
        .prepare("SELECT device, metric, MAX(received_at) FROM series GROUP BY device, metric")?;
    let mut seen = stmt
        .query_map([], |r| {
            Ok(SeenSeries {
                device: r.get(0)?,
                metric: r.get(1)?,
                last_received: from_micros(r.get(2)?),
                meta: None,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if with_meta {
        let mut stmt = conn.prepare_cached(
            "SELECT meta FROM readings WHERE device = ?1 AND metric = ?2 ORDER BY observed_at DESC LIMIT 1",
        )?;
        for s in &mut seen {
            let meta: Option<String> = stmt
                .query_row(params![s.device, s.metric], |r| r.get(0))
                .optional()?
                .flatten();
            s.meta = meta.and_then(|m| serde_json::from_str(&m).ok());
        }
    }
    Ok(Loaded {
        cursor,
        newest_reading,
        states,
        seen,
    })
}

/// The samples a rate rule needs after a restart: `(observed_at, value)` of one series
/// since `since`, oldest first, at most [`super::MAX_RATE_SAMPLES`] (the newest).
pub fn rate_samples(
    conn: &Connection,
    device: &str,
    metric: &str,
    since: DateTime<Utc>,
) -> rusqlite::Result<Vec<(DateTime<Utc>, f64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT observed_at, value FROM readings WHERE device = ?1 AND metric = ?2 AND observed_at >= ?3 \
         ORDER BY observed_at DESC LIMIT ?4",
    )?;
    let mut rows = stmt
        .query_map(
            params![
                device,
                metric,
                to_micros(since),
                super::MAX_RATE_SAMPLES as i64
            ],
            |r| Ok((from_micros(r.get(0)?), r.get::<_, f64>(1)?)),
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.reverse();
    Ok(rows)
}

/// Writes the engine's decisions in one go (inside the writer's transaction): state
/// rows, events, one outbox row per (event, notifier), and the cursor. `ttl` gives each
/// notifier's time-to-live; an unknown notifier gets `default_ttl`.
pub fn apply(
    conn: &Connection,
    changes: &Changes,
    cursor: Option<i64>,
    ttl: &HashMap<String, Duration>,
    default_ttl: Duration,
    now: DateTime<Utc>,
) -> rusqlite::Result<()> {
    let now_us = to_micros(now);
    for change in &changes.states {
        match change {
            StateChange::Upsert(s) => {
                conn.prepare_cached(
                    "INSERT INTO alert_state (rule_key, device, metric, rule, severity, state, since, value, unit, last_notified, updated_at, \
                     fired_at, escalations_sent, escalated_to) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14) \
                     ON CONFLICT(rule_key, device, metric) DO UPDATE SET rule = excluded.rule, severity = excluded.severity, \
                     state = excluded.state, since = excluded.since, value = excluded.value, unit = excluded.unit, \
                     last_notified = excluded.last_notified, updated_at = excluded.updated_at, \
                     fired_at = excluded.fired_at, \
                     escalations_sent = CASE WHEN alert_state.acked_at IS NOT NULL AND alert_state.fired_at IS excluded.fired_at \
                       THEN alert_state.escalations_sent ELSE excluded.escalations_sent END, \
                     escalated_to = CASE WHEN alert_state.acked_at IS NOT NULL AND alert_state.fired_at IS excluded.fired_at \
                       THEN alert_state.escalated_to ELSE excluded.escalated_to END",
                     // (An acknowledged firing escalates no further: a step the engine
                     // decided before it saw the acknowledgement is dropped below, and
                     // not counted as sent here.)
                )?
                .execute(params![
                    s.rule_key,
                    s.device,
                    s.metric,
                    s.rule,
                    s.severity.as_str(),
                    s.phase.as_str(),
                    to_micros(s.since),
                    s.value,
                    s.unit,
                    s.last_notified.map(to_micros),
                    now_us,
                    s.fired_at.map(to_micros),
                    s.escalations_sent,
                    (!s.escalated_to.is_empty())
                        .then(|| serde_json::to_string(&s.escalated_to).unwrap_or_default()),
                ])?;
            }
            StateChange::Delete {
                rule_key,
                device,
                metric,
            } => {
                conn.prepare_cached(
                    "DELETE FROM alert_state WHERE rule_key = ?1 AND device = ?2 AND metric = ?3",
                )?
                .execute(params![rule_key, device, metric])?;
            }
        }
    }
    for NewEvent { event, notifiers } in &changes.events {
        if matches!(event.kind, EventKind::Reminder | EventKind::Escalated)
            && is_acknowledged(conn, &event.rule, &event.device, &event.metric)?
        {
            // Acknowledged after the engine last looked: the acknowledgement, written
            // by another connection, wins (no reminder or escalation after it).
            continue;
        }
        let uid = event_uid_bytes(&event.uid);
        let body = serde_json::to_string(event)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        let inserted = conn
            .prepare_cached(
                "INSERT INTO alert_events (uid, kind, rule, severity, device, metric, value, unit, threshold, since, occurred_at, message, \
                 actor, note, channel) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) ON CONFLICT(uid) DO NOTHING",
            )?
            .execute(params![
                uid,
                event.kind.as_str(),
                event.rule,
                event.severity.as_str(),
                event.device,
                event.metric,
                event.value,
                event.unit,
                event.threshold,
                to_micros(event.since),
                to_micros(event.at),
                body,
                event.actor,
                event.note,
                event.channel,
            ])?;
        if inserted == 0 {
            continue; // already stored (a replay): its outbox rows exist too
        }
        for notifier in notifiers {
            let ttl = ttl.get(notifier).copied().unwrap_or(default_ttl);
            let expires = to_micros(
                now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::days(365)),
            );
            conn.prepare_cached(
                "INSERT INTO outbox (event_uid, notifier, created_at, next_attempt_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?3, ?4) ON CONFLICT(event_uid, notifier) DO NOTHING",
            )?
            .execute(params![uid, notifier, now_us, expires])?;
        }
    }
    if let Some(cursor) = cursor {
        conn.prepare_cached(
            "INSERT INTO source_state (source, key, value) VALUES (?1, ?2, ?3) \
             ON CONFLICT(source, key) DO UPDATE SET value = excluded.value",
        )?
        .execute(params![CURSOR_SOURCE, CURSOR_KEY, cursor.to_string()])?;
    }
    Ok(())
}

/// Whether the firing alert of `rule` (by name) on `device`/`metric` is acknowledged.
pub fn is_acknowledged(
    conn: &Connection,
    rule: &str,
    device: &str,
    metric: &str,
) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM alert_state WHERE rule = ?1 AND device = ?2 AND metric = ?3 \
         AND state = 'firing' AND acked_at IS NOT NULL)",
    )?
    .query_row(params![rule, device, metric], |r| r.get(0))
}

/// An acknowledged firing, as the engine picks it up.
#[derive(Debug, Clone, PartialEq)]
pub struct AckedFiring {
    pub rule_key: String,
    pub device: String,
    pub metric: String,
    /// µs; identifies the firing (an earlier one of the series does not count).
    pub fired_at: i64,
    /// The escalation steps really sent (one decided after the acknowledgement is not).
    pub escalations_sent: u32,
    pub escalated_to: Vec<String>,
}

/// The acknowledgements of firing alerts, for the engine to pick up (it polls them on
/// its tick).
pub fn acknowledged(conn: &Connection) -> rusqlite::Result<Vec<AckedFiring>> {
    let mut stmt = conn.prepare_cached(
        "SELECT rule_key, device, metric, COALESCE(fired_at, since), escalations_sent, escalated_to \
         FROM alert_state WHERE state = 'firing' AND acked_at IS NOT NULL",
    )?;
    let rows = stmt
        .query_map([], |r| {
            let escalated_to: Option<String> = r.get(5)?;
            Ok(AckedFiring {
                rule_key: r.get(0)?,
                device: r.get(1)?,
                metric: r.get(2)?,
                fired_at: r.get(3)?,
                escalations_sent: r.get::<_, i64>(4)?.clamp(0, u32::MAX as i64) as u32,
                escalated_to: escalated_to
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default(),
            })
        })?
        .collect();
    rows
}

/// Records `start` as the engine's cursor unless one is saved, and returns the saved
/// cursor. The very first start evaluates from the newest reading on; saving that point
/// at once means a crash before the engine's first save cannot move it past readings
/// committed (and acknowledged) meanwhile, which would then never be evaluated.
pub fn anchor_cursor(conn: &Connection, start: i64) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO source_state (source, key, value) VALUES (?1, ?2, ?3) \
         ON CONFLICT(source, key) DO NOTHING",
    )?
    .execute(params![CURSOR_SOURCE, CURSOR_KEY, start.to_string()])?;
    let saved: String = conn.query_row(
        "SELECT value FROM source_state WHERE source = ?1 AND key = ?2",
        params![CURSOR_SOURCE, CURSOR_KEY],
        |r| r.get(0),
    )?;
    Ok(saved.parse().unwrap_or(start))
}

/// The 16 uid bytes of an event uid in hex (events made here always have one).
pub fn event_uid_bytes(hex_uid: &str) -> Vec<u8> {
    hex::decode(hex_uid).unwrap_or_else(|_| Uid::derive(&["event", hex_uid]).0.to_vec())
}

/// Stored events with an id above `after`, oldest first: `(id, event)`.
pub fn events_after(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> rusqlite::Result<Vec<(i64, AlertEvent)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, message FROM alert_events WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![after, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(id, body)| serde_json::from_str(&body).ok().map(|e| (id, e)))
        .collect())
}

/// A firing alert for `outpost status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FiringAlert {
    pub rule: String,
    pub severity: Severity,
    pub device: String,
    pub metric: String,
    pub value: Option<f64>,
    pub unit: Option<String>,
    pub since: DateTime<Utc>,
    /// Who acknowledged this firing, if anyone.
    pub acknowledged: Option<Ack>,
    /// Escalation steps sent so far.
    pub escalations_sent: u32,
}

/// A notification that is waiting, or that gave up.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NotificationProblem {
    pub notifier: String,
    pub state: String,
    pub kind: String,
    pub rule: String,
    pub device: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// The alerting part of `outpost status`.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct AlertsSummary {
    pub firing: Vec<FiringAlert>,
    pub pending_alerts: i64,
    pub notifications_pending: i64,
    pub oldest_pending_notification: Option<DateTime<Utc>>,
    pub notifications_expired: i64,
    pub notifications_failed: i64,
    /// The newest pending, expired or failed notifications (at most 10).
    pub notifications: Vec<NotificationProblem>,
}

/// Reads the summary; a database from before alerting existed gives an empty one.
pub fn summary(conn: &Connection) -> rusqlite::Result<AlertsSummary> {
    let exists: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(AlertsSummary::default());
    }
    let mut stmt = conn.prepare(
        "SELECT rule, severity, device, metric, value, unit, since, escalations_sent, acked_at, acked_by, ack_note, ack_channel \
         FROM alert_state WHERE state = 'firing' ORDER BY since LIMIT 100",
    )?;
    let firing = stmt
        .query_map([], |r| {
            Ok(FiringAlert {
                escalations_sent: r.get::<_, i64>(7)?.clamp(0, u32::MAX as i64) as u32,
                acknowledged: ack_from(r, 8)?,
                rule: r.get(0)?,
                severity: severity_from(&r.get::<_, String>(1)?),
                device: r.get(2)?,
                metric: r.get(3)?,
                value: r.get(4)?,
                unit: r.get(5)?,
                since: from_micros(r.get(6)?),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let pending_alerts = conn.query_row(
        "SELECT COUNT(*) FROM alert_state WHERE state = 'pending'",
        [],
        |r| r.get(0),
    )?;
    let (notifications_pending, oldest): (i64, Option<i64>) = conn.query_row(
        "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state = 'pending'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let count = |state: &str| -> rusqlite::Result<i64> {
        conn.query_row(
            "SELECT COUNT(*) FROM outbox WHERE state = ?1",
            [state],
            |r| r.get(0),
        )
    };
    let mut stmt = conn.prepare(
        "SELECT o.notifier, o.state, e.kind, e.rule, e.device, o.attempts, o.last_error, o.created_at \
         FROM outbox o JOIN alert_events e ON e.uid = o.event_uid \
         WHERE o.state IN ('pending', 'expired', 'failed') ORDER BY o.id DESC LIMIT 10",
    )?;
    let notifications = stmt
        .query_map([], |r| {
            Ok(NotificationProblem {
                notifier: r.get(0)?,
                state: r.get(1)?,
                kind: r.get(2)?,
                rule: r.get(3)?,
                device: r.get(4)?,
                attempts: r.get(5)?,
                last_error: r.get(6)?,
                created_at: from_micros(r.get(7)?),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(AlertsSummary {
        firing,
        pending_alerts,
        notifications_pending,
        oldest_pending_notification: oldest.map(from_micros),
        notifications_expired: count("expired")?,
        notifications_failed: count("failed")?,
        notifications,
    })
}

/// The alerting lines of `outpost status`.
pub fn render(
    summary: &AlertsSummary,
    now: DateTime<Utc>,
    display: &crate::display::DisplayConfig,
) -> String {
    use crate::display::{age, table};
    use std::fmt::Write;
    let mut out = String::new();
    if summary.firing.is_empty() {
        let _ = writeln!(
            out,
            "Alerts: none firing ({} pending)",
            summary.pending_alerts
        );
    } else {
        let _ = writeln!(
            out,
            "Alerts: {} FIRING ({} pending)",
            summary.firing.len(),
            summary.pending_alerts
        );
        let rows: Vec<[String; 5]> = summary
            .firing
            .iter()
            .map(|a| {
                [
                    a.rule.clone(),
                    a.severity.as_str().to_string(),
                    a.device.clone(),
                    format!(
                        "{} {}",
                        a.metric,
                        a.value
                            .map(|v| display.value(&a.metric, v, a.unit.as_deref()))
                            .unwrap_or_default()
                    ),
                    format!("{} ago", age(now, a.since)),
                ]
            })
            .collect();
        out.push_str(&table(
            &["RULE", "SEVERITY", "DEVICE", "VALUE", "SINCE"],
            &rows,
        ));
        for a in &summary.firing {
            match &a.acknowledged {
                Some(ack) => {
                    let _ = writeln!(out, "  {} / {}: {}", a.rule, a.device, describe_ack(ack));
                }
                None if a.escalations_sent > 0 => {
                    let _ = writeln!(
                        out,
                        "  {} / {}: NOT acknowledged, escalated {} step(s)",
                        a.rule, a.device, a.escalations_sent
                    );
                }
                None => {}
            }
        }
    }
    let pending = match summary.oldest_pending_notification {
        Some(oldest) => format!(
            "{} pending (oldest {} old)",
            summary.notifications_pending,
            age(now, oldest)
        ),
        None => "none pending".to_string(),
    };
    let _ = writeln!(
        out,
        "Notifications: {pending}; {} expired, {} failed permanently",
        summary.notifications_expired, summary.notifications_failed
    );
    if !summary.notifications.is_empty() {
        let rows: Vec<[String; 5]> = summary
            .notifications
            .iter()
            .map(|n| {
                [
                    n.state.to_uppercase(),
                    n.notifier.clone(),
                    format!("{} {} {}", n.kind, n.rule, n.device),
                    format!("{} attempts", n.attempts),
                    n.last_error
                        .clone()
                        .unwrap_or_default()
                        .chars()
                        .take(80)
                        .collect(),
                ]
            })
            .collect();
        out.push_str(&table(
            &["STATE", "NOTIFIER", "EVENT", "ATTEMPTS", "LAST ERROR"],
            &rows,
        ));
    }
    out
}

/// "acknowledged by Maria at 2026-12-05 03:12:00 UTC (cli): door left open" — how
/// `outpost status` shows an acknowledgement. The note is shown on one line, without
/// control characters, at most 200 characters.
pub fn describe_ack(ack: &Ack) -> String {
    let mut text = format!(
        "acknowledged by {} at {} ({})",
        clean_line(&ack.by, 100),
        ack.at.format("%Y-%m-%d %H:%M:%S UTC"),
        ack.channel
    );
    if let Some(note) = ack.note.as_deref().filter(|n| !n.is_empty()) {
        text.push_str(": ");
        text.push_str(&clean_line(note, 200));
    }
    text
}

fn clean_line(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}
