//! `/reports`: the daily summaries (the HACCP log), one local day per page
//! (`/reports/<YYYY-MM-DD>`), printable (the stylesheet's print rules drop the
//! navigation and forms), and each day as CSV (`/reports/<day>.csv`, the columns of
//! `outpost report --format csv`). A past day comes from `daily_summaries` when it
//! was kept, else it is computed, exactly as `outpost report` does.

use super::context::{html, text, Ctx, Reply, Req};
use super::html::esc;
use super::layout;
use crate::report::summary::{day_report, Context, DayBounds, DayReport, SeriesDay};
use chrono::{Datelike, NaiveDate};
use hyper::StatusCode;
use rusqlite::Connection;
use std::fmt::Write;

/// How many days the index lists.
const DAYS_LISTED: usize = 62;

/// One line of the index: a kept day and its totals.
struct DayLine {
    day: String,
    series: i64,
    readings: i64,
    out_of_range_seconds: i64,
    excursions: i64,
    alarms: i64,
    gaps: i64,
}

/// `/reports`, `/reports/<day>` and `/reports/<day>.csv`.
pub async fn get(ctx: &Ctx, req: &Req) -> Reply {
    let rest = req.path.strip_prefix("/reports").unwrap_or("");
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    if rest.is_empty() {
        return index(ctx).await;
    }
    let (day, csv) = match rest.strip_suffix(".csv") {
        Some(d) => (d, true),
        None => (rest, false),
    };
    let tz = ctx.config.agent.tz();
    let today = DayBounds::date_of(tz, ctx.now);
    let day = match crate::report::parse_date(day) {
        Ok(d) if d <= today && d.year() >= 1971 && DayBounds::of(tz, d).is_some() => d,
        Ok(d) => {
            return text(
                StatusCode::NOT_FOUND,
                &format!(
                    "No report for {d}: it is not a day this gateway has seen (today is {today})."
                ),
            )
        }
        Err(e) => return text(StatusCode::NOT_FOUND, &format!("No such report: {e}.")),
    };
    let config = ctx.config.clone();
    let now = ctx.now;
    let report = match ctx
        .read(move |conn| {
            let c = Context {
                tz,
                rules: &config.alerts,
                devices: &config.devices,
                now,
            };
            day_report(conn, &c, day, None)
        })
        .await
    {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    if csv {
        return super::context::csv(
            &format!("outpost-{}-{day}.csv", ctx.config.agent.gateway_id),
            crate::report::render::csv(&report),
        );
    }
    let body = render_day(ctx, &report, today);
    html(
        StatusCode::OK,
        layout::page(ctx, &format!("Daily report {day}"), "/reports", "", &body),
    )
}

async fn index(ctx: &Ctx) -> Reply {
    let tz = ctx.config.agent.tz();
    let zone = tz.name().to_string();
    let days = match ctx.read(move |conn| kept_days(conn, &zone)).await {
        Ok(d) => d,
        Err(reply) => return reply,
    };
    let today = DayBounds::date_of(tz, ctx.now);
    let mut body = format!(
        "<p>The daily summary of every device and metric (the HACCP log): lowest, highest \
         and mean value, time out of range, excursions, gaps and alarms, per local day in {}. \
         Open a day to print it or download it as CSV.</p>\n\
         <p><a class=\"button\" href=\"/reports/{today}\">Today so far</a> \
         <a href=\"/reports/{yesterday}\">Yesterday</a></p>\n",
        esc(tz.name()),
        yesterday = today.pred_opt().unwrap_or(today),
    );
    if days.is_empty() {
        body.push_str(
            "<p class=\"notice\">No complete day is kept yet: the gateway keeps each day's \
             summary after local midnight.</p>\n",
        );
    } else {
        body.push_str(
            "<div class=\"wrap\"><table><thead><tr><th>Day</th><th class=\"num\">Series</th>\
             <th class=\"num\">Readings</th><th class=\"num\">Out of range</th>\
             <th class=\"num hide-narrow\">Excursions</th><th class=\"num\">Alarms</th>\
             <th class=\"num hide-narrow\">Gaps</th><th class=\"noprint\">CSV</th></tr></thead><tbody>",
        );
        for d in &days {
            let flag = if d.out_of_range_seconds > 0 || d.alarms > 0 {
                " class=\"state bad\""
            } else {
                ""
            };
            let _ = write!(
                body,
                "<tr{flag}><td><a href=\"/reports/{day}\">{day}</a></td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num hide-narrow\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num hide-narrow\">{}</td>\
                 <td class=\"noprint\"><a href=\"/reports/{day}.csv\">CSV</a></td></tr>",
                d.series,
                super::words::thousands(d.readings),
                minutes(d.out_of_range_seconds.max(0) as u64),
                d.excursions,
                d.alarms,
                d.gaps,
                day = esc(&d.day),
            );
        }
        body.push_str("</tbody></table></div>\n");
    }
    html(
        StatusCode::OK,
        layout::page(ctx, "Reports", "/reports", "", &body),
    )
}

/// The newest kept complete days in `zone`, with their totals.
fn kept_days(conn: &Connection, zone: &str) -> rusqlite::Result<Vec<DayLine>> {
    let mut stmt = conn.prepare(
        "SELECT day, COUNT(*), SUM(readings), MAX(out_of_range_seconds), SUM(excursions), \
                SUM(alarms), SUM(gaps) \
         FROM daily_summaries WHERE timezone = ?1 AND complete = 1 \
         GROUP BY day ORDER BY day DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(rusqlite::params![zone, DAYS_LISTED as i64], |r| {
        Ok(DayLine {
            day: r.get(0)?,
            series: r.get(1)?,
            readings: r.get(2)?,
            out_of_range_seconds: r.get(3)?,
            excursions: r.get(4)?,
            alarms: r.get(5)?,
            gaps: r.get(6)?,
        })
    })?;
    rows.collect()
}

fn minutes(seconds: u64) -> String {
    if seconds == 0 {
        "0".into()
    } else if seconds < 60 {
        "< 1 min".into()
    } else {
        super::words::span(std::time::Duration::from_secs(seconds / 60 * 60))
    }
}

fn render_day(ctx: &Ctx, report: &DayReport, today: NaiveDate) -> String {
    let tz = ctx.config.agent.tz();
    let local = |t: chrono::DateTime<chrono::Utc>| t.with_timezone(&tz).format("%H:%M").to_string();
    let mut out = format!(
        "<p>{}</p>\n<p class=\"noprint\"><a class=\"button\" href=\"/reports/{day}.csv\">Download CSV</a> \
         <a href=\"/reports/{prev}\">← {prev}</a>",
        esc(&crate::report::render::heading(report)),
        day = report.day,
        prev = report.day.pred_opt().unwrap_or(report.day),
    );
    if let Some(next) = report.day.succ_opt().filter(|d| *d <= today) {
        let _ = write!(out, " · <a href=\"/reports/{next}\">{next} →</a>");
    }
    out.push_str(" · <span class=\"muted\">Print with your browser (Ctrl+P): the page prints without navigation.</span></p>\n");
    if report.series.is_empty() {
        out.push_str("<p class=\"notice\">No readings this day.</p>\n");
        return out;
    }
    out.push_str(
        "<div class=\"wrap\"><table class=\"report\"><thead><tr><th>Device</th><th>Metric</th>\
         <th class=\"num\">Readings</th><th class=\"num\">Min</th><th class=\"num\">Max</th>\
         <th class=\"num\">Mean</th><th class=\"num\">Out of range</th>\
         <th class=\"num\">Excursions</th><th class=\"num\">Gaps</th><th class=\"num\">Alarms</th>\
         </tr></thead><tbody>",
    );
    for s in &report.series {
        let value = |v: Option<f64>| {
            v.map(|v| ctx.config.display.value(&s.metric, v, s.unit.as_deref()))
                .unwrap_or_else(|| "–".into())
        };
        let bad = s.out_of_range_seconds() > 0 || s.alarms.iter().any(|a| a.kind == "firing");
        let _ = write!(
            out,
            "<tr{}><td><a href=\"/device/{}\">{}</a>{}</td><td>{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td></tr>",
            if bad { " class=\"state bad\"" } else { "" },
            super::html::url(&s.device),
            esc(&s.device),
            about(s),
            esc(&s.metric),
            super::words::thousands(s.readings as i64),
            esc(&value(s.min)),
            esc(&value(s.max)),
            esc(&value(s.mean)),
            minutes(s.out_of_range_seconds()),
            s.excursions(),
            s.gaps.len(),
            s.alarms.iter().filter(|a| a.kind == "firing").count(),
        );
    }
    out.push_str("</tbody></table></div>\n");
    // Details: each gap, each rule's time out of range, each alarm event.
    let mut details = String::new();
    for s in &report.series {
        let mut items = Vec::new();
        for o in &s.out_of_range {
            if o.seconds > 0 || o.excursions > 0 {
                items.push(format!(
                    "{} ({}): {} out of range, {} excursion(s)",
                    esc(&o.rule),
                    esc(&o.condition),
                    minutes(o.seconds),
                    o.excursions
                ));
            }
        }
        for g in &s.gaps {
            items.push(format!("no readings {} – {}", local(g.from), local(g.to)));
        }
        for a in &s.alarms {
            let mut line = format!(
                "<time>{}</time> {} {} ({})",
                local(a.at),
                esc(&a.rule),
                esc(&a.kind),
                esc(&a.severity)
            );
            if let Some(by) = &a.by {
                let _ = write!(line, " by {}", esc(by));
            }
            if let Some(note) = &a.note {
                let _ = write!(line, ": “{}”", esc(note));
            }
            items.push(line);
        }
        if !items.is_empty() {
            let _ = writeln!(
                details,
                "<h3>{} {}</h3><ul>{}</ul>",
                esc(&s.device),
                esc(&s.metric),
                items
                    .iter()
                    .map(|i| format!("<li>{i}</li>"))
                    .collect::<String>()
            );
        }
    }
    if !details.is_empty() {
        out.push_str("<h2>Excursions, gaps and alarms</h2>\n");
        out.push_str(&details);
    }
    out
}

fn about(s: &SeriesDay) -> String {
    let parts: Vec<String> = [s.name.as_deref(), s.location.as_deref()]
        .into_iter()
        .flatten()
        .map(|p| esc(p).to_string())
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("<br><span class=\"muted\">{}</span>", parts.join(" · "))
    }
}
