//! Acknowledgement of firing alerts: a named person says "I am on it", with a note.
//!
//! **How the running engine learns of it.** An acknowledgement is written straight into
//! the store by whoever takes it (`outpost ack` on its own connection, the sync worker
//! for acks from central, the console through the store writer), in one transaction:
//! the `alert_state` row of each firing series gets `acked_at/acked_by/ack_note/
//! ack_channel`, and an `acknowledged` event is stored (and later synced). The engine
//! never writes those columns (its upserts leave them alone), polls the acknowledged
//! firings on its tick ([`super::state::acknowledged`]) and then stops reminders and
//! escalation for them; [`super::state::apply`] also drops a reminder or escalation
//! decided before the engine saw the acknowledgement. A resolution deletes the row, so
//! the next firing of the series starts unacknowledged: a new excursion needs a new
//! acknowledgement. The alert itself stays firing until its condition clears.
//!
//! Acknowledged events are stored and synced, not sent to notifiers.

use super::state::{self, Ack, NewEvent};
use super::{AlertEvent, EventKind};
use crate::model::{from_micros, to_micros, Uid};
use crate::settings::check_identifier;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// The longest note, in characters.
pub const MAX_NOTE: usize = 1000;
/// The longest name of the person acknowledging, in characters.
pub const MAX_BY: usize = 100;
/// The longest device id accepted.
pub const MAX_DEVICE: usize = 128;

/// Where an acknowledgement came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Cli,
    Console,
    Central,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Cli => "cli",
            Channel::Console => "console",
            Channel::Central => "central",
        }
    }
}

/// An acknowledgement to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct AckRequest {
    /// The rule's name.
    pub rule: String,
    /// One device, or every firing series of the rule.
    pub device: Option<String>,
    pub by: String,
    pub note: Option<String>,
    pub channel: Channel,
    /// Copied into the event, like the engine's events.
    pub site: String,
    pub gateway_id: String,
    /// Makes applying idempotent: an acknowledgement with the same id applied before
    /// returns that first outcome and writes nothing (central's `alert_acks.id`).
    pub idempotency_key: Option<String>,
}

/// A series the acknowledgement applied to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Acknowledged {
    pub rule: String,
    pub device: String,
    pub metric: String,
    pub firing_since: DateTime<Utc>,
}

/// What happened; none of these is an error.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AckOutcome {
    /// Applied to these firing series.
    Applied { alarms: Vec<Acknowledged> },
    /// Nothing of this rule (and device) is firing, and nothing of it resolved either.
    UnknownAlarm,
    /// It fired, but it has resolved since (no acknowledgement needed).
    AlreadyResolved,
    /// Every matching firing series is already acknowledged.
    AlreadyAcknowledged { by: String, at: DateTime<Utc> },
}

impl AckOutcome {
    /// The `result` written back to central's `alert_acks`.
    pub fn result(&self) -> &'static str {
        match self {
            AckOutcome::Applied { .. } => "applied",
            AckOutcome::UnknownAlarm => "unknown alarm",
            AckOutcome::AlreadyResolved => "already resolved",
            AckOutcome::AlreadyAcknowledged { .. } => "already acknowledged",
        }
    }
}

/// Checks a person's name: 1 to 100 characters, not blank, no control characters.
pub fn check_name(by: &str) -> Result<(), String> {
    if by.trim().is_empty() {
        return Err("the name (--by) must not be empty".into());
    }
    if by.chars().count() > MAX_BY {
        return Err(format!(
            "the name (--by) is longer than {MAX_BY} characters"
        ));
    }
    if by.chars().any(char::is_control) {
        return Err("the name (--by) contains control characters".into());
    }
    Ok(())
}

/// Checks a note: at most 1,000 characters, no control characters but line breaks
/// and tabs.
pub fn check_note(note: &str) -> Result<(), String> {
    let chars = note.chars().count();
    if chars > MAX_NOTE {
        return Err(format!(
            "the note is {chars} characters long; at most {MAX_NOTE} are accepted (put long reports elsewhere and reference them)"
        ));
    }
    if note
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
    {
        return Err("the note contains control characters".into());
    }
    Ok(())
}

/// Checks a device id: 1 to 128 characters, no control characters.
pub fn check_device(device: &str) -> Result<(), String> {
    if device.is_empty() || device.chars().count() > MAX_DEVICE {
        return Err(format!(
            "the device id must be 1 to {MAX_DEVICE} characters"
        ));
    }
    if device.chars().any(char::is_control) {
        return Err("the device id contains control characters".into());
    }
    Ok(())
}

impl AckRequest {
    /// Every problem of the request, each a sentence (empty: valid).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = check_identifier(&self.rule, "the rule name") {
            out.push(e);
        }
        if let Some(d) = &self.device {
            if let Err(e) = check_device(d) {
                out.push(e);
            }
        }
        if let Err(e) = check_name(&self.by) {
            out.push(e);
        }
        if let Some(n) = &self.note {
            if let Err(e) = check_note(n) {
                out.push(e);
            }
        }
        out
    }
}

/// Where applied idempotency keys are remembered (`source_state`).
const APPLIED_SOURCE: &str = "alerts-acks";

/// Applies `req` at `now` inside the caller's transaction (the store writer's, or one
/// `BEGIN IMMEDIATE` of the CLI). The request must be valid ([`AckRequest::problems`]);
/// an invalid one is refused with `InvalidParameterName` and nothing is written.
pub fn acknowledge_in(
    conn: &Connection,
    req: &AckRequest,
    now: DateTime<Utc>,
) -> rusqlite::Result<AckOutcome> {
    if let Some(problem) = req.problems().into_iter().next() {
        return Err(rusqlite::Error::InvalidParameterName(problem));
    }
    if let Some(key) = &req.idempotency_key {
        let earlier: Option<String> = conn
            .query_row(
                "SELECT value FROM source_state WHERE source = ?1 AND key = ?2",
                params![APPLIED_SOURCE, key],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(outcome) = earlier.and_then(|j| outcome_from_json(&j)) {
            return Ok(outcome);
        }
    }
    let outcome = apply_ack(conn, req, now)?;
    if let Some(key) = &req.idempotency_key {
        let json = serde_json::to_string(&outcome).unwrap_or_default();
        conn.execute(
            "INSERT INTO source_state (source, key, value) VALUES (?1, ?2, ?3) \
             ON CONFLICT(source, key) DO UPDATE SET value = excluded.value",
            params![APPLIED_SOURCE, key, json],
        )?;
    }
    Ok(outcome)
}

fn outcome_from_json(json: &str) -> Option<AckOutcome> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(match v.get("result")?.as_str()? {
        "applied" => AckOutcome::Applied { alarms: Vec::new() },
        "unknown_alarm" => AckOutcome::UnknownAlarm,
        "already_resolved" => AckOutcome::AlreadyResolved,
        "already_acknowledged" => AckOutcome::AlreadyAcknowledged {
            by: v.get("by")?.as_str()?.to_string(),
            at: serde_json::from_value(v.get("at")?.clone()).ok()?,
        },
        _ => return None,
    })
}

struct FiringRow {
    rule_key: String,
    device: String,
    metric: String,
    severity: String,
    value: Option<f64>,
    unit: Option<String>,
    since: i64,
    fired_at: i64,
    ack: Option<Ack>,
}

fn apply_ack(
    conn: &Connection,
    req: &AckRequest,
    now: DateTime<Utc>,
) -> rusqlite::Result<AckOutcome> {
    let mut stmt = conn.prepare_cached(
        "SELECT rule_key, device, metric, severity, value, unit, since, COALESCE(fired_at, since), \
         acked_at, acked_by, ack_note, ack_channel FROM alert_state \
         WHERE rule = ?1 AND state = 'firing' AND (?2 IS NULL OR device = ?2) ORDER BY device, metric",
    )?;
    let rows = stmt
        .query_map(params![req.rule, req.device], |r| {
            let acked_at: Option<i64> = r.get(8)?;
            Ok(FiringRow {
                rule_key: r.get(0)?,
                device: r.get(1)?,
                metric: r.get(2)?,
                severity: r.get(3)?,
                value: r.get(4)?,
                unit: r.get(5)?,
                since: r.get(6)?,
                fired_at: r.get(7)?,
                ack: match acked_at {
                    Some(at) => Some(Ack {
                        at: from_micros(at),
                        by: r.get::<_, Option<String>>(9)?.unwrap_or_default(),
                        note: r.get(10)?,
                        channel: r.get::<_, Option<String>>(11)?.unwrap_or_default(),
                    }),
                    None => None,
                },
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if rows.is_empty() {
        let resolved: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM alert_events WHERE rule = ?1 AND kind = 'resolved' \
             AND (?2 IS NULL OR device = ?2))",
            params![req.rule, req.device],
            |r| r.get(0),
        )?;
        return Ok(if resolved {
            AckOutcome::AlreadyResolved
        } else {
            AckOutcome::UnknownAlarm
        });
    }
    let open: Vec<&FiringRow> = rows.iter().filter(|r| r.ack.is_none()).collect();
    if open.is_empty() {
        let first = rows.iter().find_map(|r| r.ack.clone());
        let (by, at) = first.map(|a| (a.by, a.at)).unwrap_or_default();
        return Ok(AckOutcome::AlreadyAcknowledged { by, at });
    }
    let note = req.note.clone().filter(|n| !n.is_empty());
    let now_us = to_micros(now);
    let mut events = Vec::new();
    let mut alarms = Vec::new();
    for row in open {
        conn.prepare_cached(
            "UPDATE alert_state SET acked_at = ?4, acked_by = ?5, ack_note = ?6, ack_channel = ?7 \
             WHERE rule_key = ?1 AND device = ?2 AND metric = ?3 AND acked_at IS NULL",
        )?
        .execute(params![
            row.rule_key,
            row.device,
            row.metric,
            now_us,
            req.by,
            note,
            req.channel.as_str()
        ])?;
        let uid = Uid::derive(&[
            "alert-ack",
            &row.rule_key,
            &row.device,
            &row.metric,
            &row.fired_at.to_string(),
        ]);
        let event = AlertEvent {
            uid: uid.to_hex(),
            kind: EventKind::Acknowledged,
            rule: req.rule.clone(),
            severity: severity_from(&row.severity),
            site: req.site.clone(),
            gateway_id: req.gateway_id.clone(),
            device: row.device.clone(),
            metric: row.metric.clone(),
            value: row.value,
            unit: row.unit.clone(),
            threshold: None,
            condition: format!("acknowledged by {}", req.by),
            precision: None,
            since: from_micros(row.since),
            at: now,
            actor: Some(req.by.clone()),
            note: note.clone(),
            channel: Some(req.channel.as_str().to_string()),
        };
        events.push(NewEvent {
            event,
            notifiers: Vec::new(),
        });
        alarms.push(Acknowledged {
            rule: req.rule.clone(),
            device: row.device.clone(),
            metric: row.metric.clone(),
            firing_since: from_micros(row.since),
        });
    }
    let changes = state::Changes {
        states: Vec::new(),
        events,
    };
    state::apply(
        conn,
        &changes,
        None,
        &HashMap::new(),
        Duration::from_secs(3600),
        now,
    )?;
    Ok(AckOutcome::Applied { alarms })
}

fn severity_from(s: &str) -> super::Severity {
    match s {
        "critical" => super::Severity::Critical,
        "info" => super::Severity::Info,
        _ => super::Severity::Warning,
    }
}

/// Acknowledges through the running agent's store (the console's and the sync
/// worker's way): one write on the store writer, stamped with `clock`.
pub async fn acknowledge(
    store: &crate::store::Store,
    req: AckRequest,
    clock: &crate::clock::Clock,
) -> Result<AckOutcome, crate::store::StoreError> {
    let now = clock.now();
    store
        .write(move |conn| acknowledge_in(conn, &req, now))
        .await
}

/// Acknowledges in the database file at `path` on a connection of its own (the CLI's
/// way, while the agent runs or not): WAL, `busy_timeout`, one `BEGIN IMMEDIATE`
/// transaction, so the agent's writer and this never interleave.
pub fn acknowledge_file(
    path: &std::path::Path,
    busy_timeout: Duration,
    req: &AckRequest,
    now: DateTime<Utc>,
) -> Result<AckOutcome, String> {
    let mut conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    conn.busy_timeout(busy_timeout)
        .and_then(|_| conn.pragma_update(None, "synchronous", "FULL"))
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let has_columns = conn
        .prepare("SELECT acked_at FROM alert_state LIMIT 0")
        .is_ok();
    if !has_columns {
        return Err(format!(
            "the database {} has no acknowledgement columns yet (or no alert tables); start the upgraded agent once so that it migrates the database, then retry",
            path.display()
        ));
    }
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| format!("cannot write to {}: {e}", path.display()))?;
    let outcome = acknowledge_in(&tx, req, now).map_err(|e| match e {
        rusqlite::Error::InvalidParameterName(problem) => problem,
        e => format!("cannot write to {}: {e}", path.display()),
    })?;
    // Rows written outside the agent's writer are sealed here (G10).
    crate::store::chain::seal(&tx, now.timestamp_micros())
        .and_then(|_| tx.commit())
        .map_err(|e| format!("cannot write to {}: {e}", path.display()))?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::engine::{Engine, EventContext};
    use crate::alerts::state::Changes;
    use crate::alerts::AlertRule;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema::migrate(&mut conn).unwrap();
        conn
    }

    fn req(rule: &str, device: Option<&str>) -> AckRequest {
        AckRequest {
            rule: rule.into(),
            device: device.map(Into::into),
            by: "Maria Lopez".into(),
            note: Some("door was open, closed it".into()),
            channel: Channel::Cli,
            site: "Site".into(),
            gateway_id: "gw".into(),
            idempotency_key: None,
        }
    }

    const HOT: &str = "name = \"hot\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\nclear = 6.0\nnotifiers = [\"ops\"]\nreminder = \"1m\"\n[[escalation]]\nafter = \"5m\"\nnotifiers = [\"night\"]";

    use crate::alerts::test_reading as reading;

    fn save(conn: &Connection, c: &Changes, now: DateTime<Utc>) {
        state::apply(
            conn,
            c,
            None,
            &HashMap::new(),
            Duration::from_secs(3600),
            now,
        )
        .unwrap();
    }

    fn kinds(c: &Changes) -> Vec<EventKind> {
        c.events.iter().map(|e| e.event.kind).collect()
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn an_ack_stops_reminders_and_escalation_and_survives_a_restart() {
        let conn = db();
        let rule: AlertRule = toml::from_str(HOT).unwrap();
        let mut e =
            Engine::from_config(std::slice::from_ref(&rule), EventContext::default()).unwrap();
        e.on_reading(&reading("a", 9.0, at(0)), at(0));
        e.on_reading(&reading("b", 9.0, at(0)), at(0));
        save(&conn, &e.take_changes(), at(0));

        let outcome = acknowledge_in(&conn, &req("hot", Some("a")), at(30)).unwrap();
        assert!(matches!(&outcome, AckOutcome::Applied { alarms } if alarms.len() == 1));
        assert_eq!(outcome.result(), "applied");
        e.apply_acks(&state::acknowledged(&conn).unwrap());
        assert!(e.is_acked("hot", "a"));
        assert!(!e.is_acked("hot", "b"));

        // Reminder at 60 s and escalation at 5 min only for b.
        e.tick(at(60));
        e.tick(at(300));
        let c = e.take_changes();
        assert_eq!(
            kinds(&c),
            vec![
                EventKind::Reminder,
                EventKind::Reminder,
                EventKind::Escalated
            ],
            "{c:?}"
        );
        assert!(c.events.iter().all(|n| n.event.device == "b"));
        assert_eq!(c.events[2].notifiers, vec!["night".to_string()]);
        save(&conn, &c, at(300));

        // The status shows who acknowledged.
        let summary = state::summary(&conn).unwrap();
        let a = summary.firing.iter().find(|f| f.device == "a").unwrap();
        let ack = a.acknowledged.as_ref().unwrap();
        assert_eq!(ack.by, "Maria Lopez");
        assert_eq!(ack.channel, "cli");
        let text = state::render(&summary, at(310), &Default::default());
        assert!(
            text.contains("hot / a: acknowledged by Maria Lopez at 2023-11-14 22:13:50 UTC (cli): door was open, closed it"),
            "{text}"
        );
        assert!(
            text.contains("hot / b: NOT acknowledged, escalated 1 step(s)"),
            "{text}"
        );

        // A restart keeps the acknowledgement and the sent step.
        let loaded = state::load(&conn, false).unwrap();
        let mut after =
            Engine::from_config(std::slice::from_ref(&rule), EventContext::default()).unwrap();
        after.restore(loaded.states, Vec::new(), at(400));
        assert!(after.is_acked("hot", "a"));
        after.tick(at(400));
        let c = after.take_changes();
        assert!(c.events.iter().all(|n| n.event.device == "b"), "{c:?}");
        assert!(
            !c.events
                .iter()
                .any(|n| n.event.kind == EventKind::Escalated),
            "the step is not sent twice"
        );

        // The acknowledged event is stored with who, note and channel, for sync.
        let (actor, note, channel): (String, String, String) = conn
            .query_row(
                "SELECT actor, note, channel FROM alert_events WHERE kind = 'acknowledged'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(
            (actor.as_str(), note.as_str(), channel.as_str()),
            ("Maria Lopez", "door was open, closed it", "cli")
        );
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM outbox o JOIN alert_events e ON e.uid = o.event_uid WHERE e.kind = 'acknowledged'"),
            0,
            "acknowledgements are not sent to notifiers"
        );
    }

    #[test]
    fn a_new_excursion_needs_a_new_ack_and_resolution_reaches_the_escalated() {
        let conn = db();
        let rule: AlertRule = toml::from_str(HOT).unwrap();
        let mut e =
            Engine::from_config(std::slice::from_ref(&rule), EventContext::default()).unwrap();
        e.on_reading(&reading("a", 9.0, at(0)), at(0));
        e.tick(at(300));
        let c = e.take_changes();
        assert!(kinds(&c).contains(&EventKind::Escalated));
        save(&conn, &c, at(300));
        acknowledge_in(&conn, &req("hot", None), at(301)).unwrap();
        e.apply_acks(&state::acknowledged(&conn).unwrap());
        e.on_reading(&reading("a", 5.0, at(400)), at(400));
        let c = e.take_changes();
        assert_eq!(kinds(&c), vec![EventKind::Resolved]);
        assert_eq!(
            c.events[0].notifiers,
            vec!["ops".to_string(), "night".to_string()],
            "resolution goes to everyone notified"
        );
        save(&conn, &c, at(400));
        assert_eq!(
            acknowledge_in(&conn, &req("hot", Some("a")), at(401)).unwrap(),
            AckOutcome::AlreadyResolved
        );
        // Fires again: unacknowledged, reminders and escalation start over.
        e.on_reading(&reading("a", 9.5, at(500)), at(500));
        save(&conn, &e.take_changes(), at(500));
        e.apply_acks(&state::acknowledged(&conn).unwrap());
        assert!(!e.is_acked("hot", "a"));
        e.tick(at(800));
        let c = e.take_changes();
        assert_eq!(kinds(&c), vec![EventKind::Reminder, EventKind::Escalated]);
        save(&conn, &c, at(800));
        let outcome = acknowledge_in(&conn, &req("hot", Some("a")), at(801)).unwrap();
        assert_eq!(outcome.result(), "applied");
        assert!(matches!(
            acknowledge_in(&conn, &req("hot", Some("a")), at(802)).unwrap(),
            AckOutcome::AlreadyAcknowledged { ref by, .. } if by == "Maria Lopez"
        ));
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM alert_events WHERE kind = 'acknowledged'"
            ),
            2
        );
    }

    #[test]
    fn an_ack_written_after_the_engine_decided_still_wins() {
        let conn = db();
        let rule: AlertRule = toml::from_str(HOT).unwrap();
        let mut e =
            Engine::from_config(std::slice::from_ref(&rule), EventContext::default()).unwrap();
        e.on_reading(&reading("a", 9.0, at(0)), at(0));
        save(&conn, &e.take_changes(), at(0));
        e.tick(at(300)); // reminder + escalation decided, not yet written
        let c = e.take_changes();
        acknowledge_in(&conn, &req("hot", Some("a")), at(299)).unwrap();
        save(&conn, &c, at(300));
        assert_eq!(
            count(
                &conn,
                "SELECT COUNT(*) FROM alert_events WHERE kind IN ('reminder', 'escalated')"
            ),
            0
        );
        assert_eq!(
            count(&conn, "SELECT COUNT(*) FROM alert_state WHERE escalations_sent = 0 AND escalated_to IS NULL"),
            1,
            "the dropped step is not recorded as sent"
        );
        // The engine learns it too: the resolution goes to the rule's notifiers only.
        e.apply_acks(&state::acknowledged(&conn).unwrap());
        e.on_reading(&reading("a", 5.0, at(400)), at(400));
        let c = e.take_changes();
        assert_eq!(kinds(&c), vec![EventKind::Resolved]);
        assert_eq!(c.events[0].notifiers, vec!["ops".to_string()]);
    }

    #[test]
    fn unknown_and_invalid_requests() {
        let conn = db();
        assert_eq!(
            acknowledge_in(&conn, &req("hot", None), at(0)).unwrap(),
            AckOutcome::UnknownAlarm
        );
        let mut bad = req("hot", None);
        bad.note = Some("x".repeat(1024 * 1024));
        let err = acknowledge_in(&conn, &bad, at(0)).unwrap_err().to_string();
        assert!(err.contains("at most 1000"), "{err}");
        let mut bad = req("hot", None);
        bad.by = "  ".into();
        assert!(!bad.problems().is_empty());
        bad.by = "a\u{1b}[31m".into();
        assert!(!bad.problems().is_empty());
        let mut bad = req("'; DROP TABLE alert_state; --", Some("a\nb"));
        bad.note = Some("bell \u{7}".into());
        assert_eq!(bad.problems().len(), 3, "{:?}", bad.problems());
        let mut ok = req("hot", None);
        ok.note = Some("é".repeat(1000));
        assert!(ok.problems().is_empty());
        ok.note = Some("line one\nline two".into());
        assert!(ok.problems().is_empty());
    }

    #[test]
    fn an_idempotency_key_applies_once() {
        let conn = db();
        let rule: AlertRule = toml::from_str(HOT).unwrap();
        let mut e =
            Engine::from_config(std::slice::from_ref(&rule), EventContext::default()).unwrap();
        e.on_reading(&reading("a", 9.0, at(0)), at(0));
        save(&conn, &e.take_changes(), at(0));
        let mut r = req("hot", None);
        r.channel = Channel::Central;
        r.idempotency_key = Some("central:7".into());
        assert_eq!(
            acknowledge_in(&conn, &r, at(1)).unwrap().result(),
            "applied"
        );
        assert_eq!(
            acknowledge_in(&conn, &r, at(2)).unwrap().result(),
            "applied",
            "applied again after a lost mark: the first outcome"
        );
        r.idempotency_key = Some("central:8".into());
        assert_eq!(
            acknowledge_in(&conn, &r, at(3)).unwrap().result(),
            "already acknowledged"
        );
    }
}
