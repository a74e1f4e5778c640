//! `/alarms`: firing, pending and acknowledged alarms, then the recent history, each
//! with its timeline (fired, notified whom, escalated, acknowledged by whom with the
//! note, resolved); an **Acknowledge** form on every unacknowledged firing alarm for
//! users allowed to (operators, and anyone on a loopback console).

use super::context::{html, redirect, Ctx, Reply, Req};
use super::html::{esc, url};
use super::layout;
use crate::alerts::ack::{self, AckOutcome, AckRequest, Channel};
use crate::model::from_micros;
use chrono::{DateTime, Utc};
use hyper::StatusCode;
use rusqlite::Connection;
use std::fmt::Write;

/// One row of `alert_state`: an alarm pending or firing now.
#[derive(Debug, Clone)]
pub struct Alarm {
    pub rule: String,
    pub severity: String,
    pub device: String,
    pub metric: String,
    /// `pending` or `firing`.
    pub state: String,
    pub since: DateTime<Utc>,
    pub fired_at: Option<DateTime<Utc>>,
    pub value: Option<f64>,
    pub unit: Option<String>,
    pub acked: Option<crate::alerts::state::Ack>,
    pub escalations_sent: i64,
}

impl Alarm {
    pub fn firing(&self) -> bool {
        self.state == "firing"
    }
}

/// Every pending and firing alarm: firing unacknowledged first, then firing
/// acknowledged, then pending; oldest first within each.
pub fn current(conn: &Connection) -> rusqlite::Result<Vec<Alarm>> {
    let mut stmt = conn.prepare(
        "SELECT rule, severity, device, metric, state, since, fired_at, value, unit, \
                escalations_sent, acked_at, acked_by, ack_note, ack_channel \
         FROM alert_state ORDER BY state = 'firing' DESC, acked_at IS NULL DESC, since LIMIT 500",
    )?;
    let rows = stmt.query_map([], |r| {
        let acked_at: Option<i64> = r.get(10)?;
        Ok(Alarm {
            rule: r.get(0)?,
            severity: r.get(1)?,
            device: r.get(2)?,
            metric: r.get(3)?,
            state: r.get(4)?,
            since: from_micros(r.get(5)?),
            fired_at: r.get::<_, Option<i64>>(6)?.map(from_micros),
            value: r.get(7)?,
            unit: r.get(8)?,
            escalations_sent: r.get(9)?,
            acked: acked_at.map(|t| crate::alerts::state::Ack {
                at: from_micros(t),
                by: r
                    .get::<_, Option<String>>(11)
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
                note: r.get(12).ok().flatten(),
                channel: r
                    .get::<_, Option<String>>(13)
                    .ok()
                    .flatten()
                    .unwrap_or_default(),
            }),
        })
    })?;
    rows.collect()
}

/// One stored event of an alarm's timeline, with the notifications it caused.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: String,
    pub occurred_at: DateTime<Utc>,
    pub value: Option<f64>,
    pub unit: Option<String>,
    pub actor: Option<String>,
    pub note: Option<String>,
    pub channel: Option<String>,
    /// (notifier, delivery state) per outbox row.
    pub notified: Vec<(String, String)>,
}

/// The events of `rule` on `device`/`metric` from `from` (inclusive) to `until`
/// (exclusive), oldest first, at most 200.
pub fn timeline(
    conn: &Connection,
    rule: &str,
    device: &str,
    metric: &str,
    from: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
) -> rusqlite::Result<Vec<Event>> {
    let mut stmt = conn.prepare_cached(
        "SELECT e.kind, e.occurred_at, e.value, e.unit, e.actor, e.note, e.channel, \
                (SELECT group_concat(o.notifier || ' ' || o.state, char(10)) FROM outbox o WHERE o.event_uid = e.uid) \
         FROM alert_events e \
         WHERE e.rule = ?1 AND e.device = ?2 AND e.metric = ?3 AND e.occurred_at >= ?4 AND e.occurred_at < ?5 \
         ORDER BY e.occurred_at, e.id LIMIT 200",
    )?;
    let until = until.map(|t| t.timestamp_micros()).unwrap_or(i64::MAX);
    let rows = stmt.query_map(
        rusqlite::params![rule, device, metric, from.timestamp_micros(), until],
        |r| {
            let notified: Option<String> = r.get(7)?;
            Ok(Event {
                kind: r.get(0)?,
                occurred_at: from_micros(r.get(1)?),
                value: r.get(2)?,
                unit: r.get(3)?,
                actor: r.get(4)?,
                note: r.get(5)?,
                channel: r.get(6)?,
                notified: notified
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.rsplit_once(' '))
                    .map(|(n, s)| (n.to_string(), s.to_string()))
                    .collect(),
            })
        },
    )?;
    rows.collect()
}

/// A past firing: its first event and the events up to the next firing of the same
/// series.
#[derive(Debug, Clone)]
pub struct Episode {
    pub rule: String,
    pub severity: String,
    pub device: String,
    pub metric: String,
    pub events: Vec<Event>,
}

/// The newest `limit` firings of the last 30 days that have resolved, newest first.
pub fn history(
    conn: &Connection,
    now: DateTime<Utc>,
    limit: usize,
) -> rusqlite::Result<Vec<Episode>> {
    let from = (now - chrono::Duration::days(30)).timestamp_micros();
    let mut stmt = conn.prepare(
        "SELECT f.rule, f.severity, f.device, f.metric, f.occurred_at, \
                (SELECT MIN(n.occurred_at) FROM alert_events n WHERE n.kind = 'firing' AND n.rule = f.rule \
                   AND n.device = f.device AND n.metric = f.metric AND n.occurred_at > f.occurred_at) \
         FROM alert_events f \
         WHERE f.kind = 'firing' AND f.occurred_at >= ?1 \
           AND EXISTS (SELECT 1 FROM alert_events r WHERE r.kind = 'resolved' AND r.rule = f.rule \
                         AND r.device = f.device AND r.metric = f.metric AND r.occurred_at >= f.occurred_at) \
         ORDER BY f.occurred_at DESC LIMIT ?2",
    )?;
    let heads = stmt
        .query_map(rusqlite::params![from, limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                from_micros(r.get(4)?),
                r.get::<_, Option<i64>>(5)?.map(from_micros),
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(heads.len());
    for (rule, severity, device, metric, at, next) in heads {
        let events = timeline(conn, &rule, &device, &metric, at, next)?;
        // Only up to the resolution: a later event belongs to no firing.
        let end = events
            .iter()
            .position(|e| e.kind == "resolved")
            .map_or(events.len(), |i| i + 1);
        out.push(Episode {
            rule,
            severity,
            device,
            metric,
            events: events.into_iter().take(end).collect(),
        });
    }
    Ok(out)
}

struct Page {
    current: Vec<(Alarm, Vec<Event>)>,
    history: Vec<Episode>,
}

fn read_page(conn: &Connection, now: DateTime<Utc>) -> rusqlite::Result<Page> {
    let mut current = Vec::new();
    for alarm in self::current(conn)? {
        let events = if alarm.firing() {
            let from = alarm.fired_at.unwrap_or(alarm.since);
            timeline(conn, &alarm.rule, &alarm.device, &alarm.metric, from, None)?
        } else {
            Vec::new()
        };
        current.push((alarm, events));
    }
    Ok(Page {
        current,
        history: history(conn, now, 20)?,
    })
}

pub async fn get(ctx: &Ctx, req: &Req) -> Reply {
    let now = ctx.now;
    let page = match ctx.read(move |conn| read_page(conn, now)).await {
        Ok(p) => p,
        Err(reply) => return reply,
    };
    let inner = render(ctx, &page);
    if req.wants_live() {
        return html(StatusCode::OK, inner);
    }
    let notice = match req.query("ack") {
        Some("applied") => "<p class=\"notice\">Acknowledged: reminders and escalation stop; the alarm stays until its condition clears.</p>",
        Some("already") => "<p class=\"notice\">That alarm was already acknowledged; nothing changed.</p>",
        Some("resolved") => "<p class=\"notice\">That alarm has resolved since; no acknowledgement needed.</p>",
        Some("unknown") => "<p class=\"notice error\">That alarm is not firing; nothing changed.</p>",
        _ => "",
    };
    html(
        StatusCode::OK,
        layout::page(
            ctx,
            "Alarms",
            "/alarms",
            "",
            &format!("{notice}{}", layout::live("/alarms", &inner)),
        ),
    )
}

fn render(ctx: &Ctx, page: &Page) -> String {
    let display = &ctx.config.display;
    let mut out = String::new();
    let firing: Vec<_> = page
        .current
        .iter()
        .filter(|(a, _)| a.firing() && a.acked.is_none())
        .collect();
    let acked: Vec<_> = page
        .current
        .iter()
        .filter(|(a, _)| a.firing() && a.acked.is_some())
        .collect();
    let pending: Vec<_> = page.current.iter().filter(|(a, _)| !a.firing()).collect();
    for (title, list, class) in [
        ("Firing", &firing, "firing"),
        ("Acknowledged, still firing", &acked, "acked"),
        ("Pending", &pending, "pending"),
    ] {
        let _ = write!(out, "<h2>{title} ({})</h2>", list.len());
        if list.is_empty() {
            out.push_str("<p class=\"muted\">None.</p>");
        }
        for (alarm, events) in list.iter() {
            let value = alarm
                .value
                .map(|v| display.value(&alarm.metric, v, alarm.unit.as_deref()))
                .unwrap_or_default();
            let _ = write!(
                out,
                "<div class=\"card {class}\"><strong>{rule}</strong> <span class=\"tag {class}\">{state}</span> {sev} · <a href=\"/device/{durl}\">{device}</a> {metric} {value}<br><span class=\"muted\">{verb} {since} ({ago} ago)</span>",
                rule = esc(&alarm.rule),
                state = if alarm.firing() { "firing" } else { "pending" },
                sev = esc(&alarm.severity),
                durl = url(&alarm.device),
                device = esc(&alarm.device),
                metric = esc(&alarm.metric),
                value = esc(&value),
                verb = if alarm.firing() { "firing since" } else { "condition since" },
                since = alarm.since.format("%Y-%m-%d %H:%M:%S UTC"),
                ago = crate::display::age(ctx.now, alarm.since),
            );
            if !events.is_empty() {
                out.push_str(&render_timeline(ctx, &alarm.metric, events));
            }
            if alarm.firing() && alarm.acked.is_none() {
                out.push_str(&ack_form(ctx, alarm));
            }
            out.push_str("</div>");
        }
    }
    let _ = write!(
        out,
        "<h2>Recent history (30 days, {})</h2>",
        page.history.len()
    );
    if page.history.is_empty() {
        out.push_str("<p class=\"muted\">No alarm resolved in the last 30 days.</p>");
    }
    for episode in &page.history {
        let _ = write!(
            out,
            "<div class=\"card\"><strong>{}</strong> {} · <a href=\"/device/{}\">{}</a> {}",
            esc(&episode.rule),
            esc(&episode.severity),
            url(&episode.device),
            esc(&episode.device),
            esc(&episode.metric),
        );
        out.push_str(&render_timeline(ctx, &episode.metric, &episode.events));
        out.push_str("</div>");
    }
    out
}

fn render_timeline(ctx: &Ctx, metric: &str, events: &[Event]) -> String {
    let mut out = String::from("<ol class=\"timeline\">");
    for e in events {
        let value = e
            .value
            .map(|v| {
                format!(
                    " at {}",
                    ctx.config.display.value(metric, v, e.unit.as_deref())
                )
            })
            .unwrap_or_default();
        let what = match e.kind.as_str() {
            "firing" => format!("Fired{}", esc(&value)),
            "reminder" => "Reminder".to_string(),
            "escalated" => "Escalated".to_string(),
            "resolved" => format!("Resolved{}", esc(&value)),
            "acknowledged" => format!(
                "Acknowledged by <strong>{}</strong>{}{}",
                esc(e.actor.as_deref().unwrap_or("?")),
                e.channel
                    .as_deref()
                    .map(|c| format!(" ({})", esc(c)))
                    .unwrap_or_default(),
                e.note
                    .as_deref()
                    .filter(|n| !n.is_empty())
                    .map(|n| format!(": “{}”", esc(n)))
                    .unwrap_or_default()
            ),
            other => esc(other).to_string(),
        };
        let notified = if e.notified.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = e
                .notified
                .iter()
                .map(|(n, s)| format!("{} ({})", esc(n), esc(s)))
                .collect();
            format!("; notified {}", list.join(", "))
        };
        let _ = write!(
            out,
            "<li><time>{}</time> {what}{notified}</li>",
            e.occurred_at.format("%Y-%m-%d %H:%M:%S UTC")
        );
    }
    out.push_str("</ol>");
    out
}

fn ack_form(ctx: &Ctx, alarm: &Alarm) -> String {
    if !ctx.user.may_acknowledge() {
        return "<p class=\"muted\">Operators can acknowledge this alarm.</p>".into();
    }
    let name = match &ctx.user.name {
        Some(name) => format!(
            "<span class=\"muted\">as {}</span><input type=\"hidden\" name=\"by\" value=\"{}\">",
            esc(name),
            esc(name)
        ),
        None => format!(
            "<p><label>Your name<input type=\"text\" name=\"by\" maxlength=\"{}\" required></label></p>",
            ack::MAX_BY
        ),
    };
    format!(
        "<form class=\"ack\" method=\"post\" action=\"/alarms/ack\">{csrf}<input type=\"hidden\" name=\"rule\" value=\"{rule}\"><input type=\"hidden\" name=\"device\" value=\"{device}\">{name}<p><label>Note<input type=\"text\" name=\"note\" maxlength=\"{max}\" placeholder=\"what you are doing about it\"></label></p><p><button>Acknowledge</button></p></form>",
        csrf = ctx.csrf_field(),
        rule = esc(&alarm.rule),
        device = esc(&alarm.device),
        max = ack::MAX_NOTE,
    )
}

/// `POST /alarms/ack`: `rule`, `device`, `note` (and `by` on a loopback console
/// without login; a logged-in user's own name otherwise).
pub async fn post_ack(ctx: &Ctx, req: &Req) -> Reply {
    if !ctx.user.may_acknowledge() {
        return refused(
            ctx,
            StatusCode::FORBIDDEN,
            "Only operators may acknowledge alarms; you are logged in as a viewer. Nothing was changed.",
        );
    }
    let rule = req.form("rule").unwrap_or("").to_string();
    let device = req.form("device").unwrap_or("").to_string();
    let note = req
        .form("note")
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    let by = match &ctx.user.name {
        Some(name) => name.clone(),
        None => req.form("by").unwrap_or("").trim().to_string(),
    };
    if !ctx.config.alerts.iter().any(|r| r.name == rule) {
        return refused(
            ctx,
            StatusCode::BAD_REQUEST,
            "There is no alert rule of that name. Nothing was changed.",
        );
    }
    let request = AckRequest {
        rule,
        device: Some(device),
        by,
        note,
        channel: Channel::Console,
        site: ctx.config.agent.site.clone(),
        gateway_id: ctx.config.agent.gateway_id.clone(),
        idempotency_key: None,
    };
    let problems = request.problems();
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| esc(p).to_string()).collect();
        return refused(
            ctx,
            StatusCode::BAD_REQUEST,
            &format!(
                "The acknowledgement was not accepted: {}. Nothing was changed.",
                list.join("; ")
            ),
        );
    }
    tracing::info!(rule = %request.rule, device = ?request.device, by = %request.by, "Acknowledgement from the console.");
    match ack::acknowledge(&ctx.store, request, &ctx.clock).await {
        Ok(AckOutcome::Applied { .. }) => redirect("/alarms?ack=applied"),
        Ok(AckOutcome::AlreadyAcknowledged { .. }) => redirect("/alarms?ack=already"),
        Ok(AckOutcome::AlreadyResolved) => redirect("/alarms?ack=resolved"),
        Ok(AckOutcome::UnknownAlarm) => redirect("/alarms?ack=unknown"),
        Err(e) => refused(
            ctx,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "The acknowledgement could not be stored ({}). Try again.",
                esc(&e.to_string())
            ),
        ),
    }
}

/// A refusal as a page (`message` is HTML).
fn refused(ctx: &Ctx, status: StatusCode, message: &str) -> Reply {
    html(
        status,
        layout::page(
            ctx,
            "Not acknowledged",
            "/alarms",
            "",
            &format!(
                "<p class=\"notice error\">{message}</p><p><a href=\"/alarms\">Back to the alarms</a></p>"
            ),
        ),
    )
}
