//! `/device/<id>`: a chart of each metric over the last 24 h, 7 d or 30 d
//! (`?span=`; see [`super::chart`]), the latest readings as a table (updated live),
//! and a form for the CSV download of a chosen range (`/device/<id>/csv`, see
//! [`super::csv`]).

use super::chart::{self, Bucket, Chart, Span};
use super::context::{html, text, Ctx, Reply, Req};
use super::csv::{self as download, CsvRange};
use super::html::{esc, url};
use super::layout;
use crate::store::SeriesSummary;
use hyper::StatusCode;
use rusqlite::Connection;
use std::fmt::Write;

/// How many of the newest readings the table shows.
const LATEST: usize = 20;

/// One metric's chart data, read in one go.
struct MetricChart {
    series: SeriesSummary,
    buckets: Vec<Bucket>,
    alarms: Vec<chart::AlarmMark>,
}

/// `/device/<id>` and `/device/<id>/csv`.
pub async fn get(ctx: &Ctx, req: &Req) -> Reply {
    let rest = &req.path["/device/".len()..];
    let (device, csv) = match rest.strip_suffix("/csv") {
        Some(d) => (d.to_string(), true),
        None => (rest.to_string(), false),
    };
    if device.is_empty() || device.contains('/') || device.chars().count() > 200 {
        return super::context::not_found(ctx);
    }
    let name = device.clone();
    let series = match ctx.read(move |conn| device_series(conn, &name)).await {
        Ok(s) => s,
        Err(reply) => return reply,
    };
    let configured = ctx.config.devices.iter().find(|d| d.id == device);
    if series.is_empty() && configured.is_none() {
        return super::context::not_found(ctx);
    }
    if csv {
        return csv_download(ctx, req, &device).await;
    }
    let span = match req.query("span") {
        None => Span::Day,
        Some(s) => match Span::parse(s) {
            Some(span) => span,
            None => return text(StatusCode::BAD_REQUEST, "span must be 24h, 7d or 30d."),
        },
    };
    let latest = {
        let name = device.clone();
        match ctx.read(move |conn| latest(conn, &name)).await {
            Ok(rows) => rows,
            Err(reply) => return reply,
        }
    };
    let table = latest_table(ctx, &latest);
    if req.wants_live() {
        return html(StatusCode::OK, table);
    }
    let window = span.window(ctx.now);
    let charts = {
        let (name, series) = (device.clone(), series.clone());
        match ctx
            .read(move |conn| {
                series
                    .into_iter()
                    .map(|s| {
                        Ok(MetricChart {
                            buckets: chart::downsample(conn, &name, &s.metric, window)?,
                            alarms: chart::alarms(conn, &name, &s.metric, window)?,
                            series: s,
                        })
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .await
        {
            Ok(c) => c,
            Err(reply) => return reply,
        }
    };

    let mut body = String::with_capacity(32 * 1024);
    if let Some(d) = configured {
        let about: Vec<String> = [d.name.as_deref(), d.location.as_deref()]
            .into_iter()
            .flatten()
            .map(|s| esc(s).to_string())
            .collect();
        if !about.is_empty() {
            let _ = writeln!(body, "<p>{}</p>", about.join(" · "));
        }
    }
    let _ = write!(body, "<p class=\"noprint\">Show the last ");
    for (i, s) in Span::ALL.iter().enumerate() {
        if i > 0 {
            body.push_str(" · ");
        }
        if *s == span {
            let _ = write!(body, "<strong>{}</strong>", s.as_str());
        } else {
            let _ = write!(
                body,
                "<a href=\"/device/{}?span={}\">{}</a>",
                url(&device),
                s.as_str(),
                s.as_str()
            );
        }
    }
    body.push_str("</p>\n");
    if charts.is_empty() {
        body.push_str("<p class=\"notice\">No readings from this device yet.</p>\n");
    }
    let tz = ctx.config.agent.tz();
    let gap = configured.and_then(|d| d.gap).map(|g| g.get());
    for c in &charts {
        let unit = c.series.unit.as_deref();
        let thresholds = chart::thresholds(&ctx.config.alerts, &device, &c.series.metric);
        let drawing = Chart {
            device: &device,
            metric: &c.series.metric,
            unit,
            span,
            window,
            buckets: &c.buckets,
            gap_threshold: chart::gap_threshold(&c.buckets, gap),
            thresholds: &thresholds,
            alarms: &c.alarms,
            tz,
            precision: ctx.config.display.precision_of(&c.series.metric),
        };
        let _ = write!(
            body,
            "<section class=\"metric\"><h2>{} <span class=\"muted\">{} · {} ago</span></h2>\n{}\n",
            esc(&c.series.metric),
            esc(&ctx
                .config
                .display
                .value(&c.series.metric, c.series.value, unit)),
            crate::display::age(ctx.now, c.series.observed_at),
            drawing.svg()
        );
        let _ = writeln!(
            body,
            "<p class=\"legend muted\">Band: lowest to highest per {} · line: average · \
             dashed: alarm thresholds · ▼ an alarm fired · grey: no data. Times in {}.</p></section>",
            words_of(span.bucket()),
            esc(tz.name())
        );
    }
    body.push_str("<h2>Latest readings</h2>\n");
    body.push_str(&layout::live(&format!("/device/{}", url(&device)), &table));
    body.push_str(&csv_form(ctx, &device, &series));
    let title = format!("Device {device}");
    html(StatusCode::OK, layout::page(ctx, &title, "", "", &body))
}

fn words_of(d: chrono::Duration) -> String {
    super::words::span(d.to_std().unwrap_or_default())
}

/// The series of `device`, by metric (from the per-series summary, not the readings).
fn device_series(conn: &Connection, device: &str) -> rusqlite::Result<Vec<SeriesSummary>> {
    Ok(crate::store::series(conn)?
        .into_iter()
        .filter(|s| s.device == device)
        .collect())
}

/// The newest readings of `device` over all its metrics: the newest few of each
/// metric through the series index, merged.
fn latest(conn: &Connection, device: &str) -> rusqlite::Result<Vec<crate::store::StoredReading>> {
    let metrics: Vec<String> = device_series(conn, device)?
        .into_iter()
        .map(|s| s.metric)
        .collect();
    let mut stmt = conn.prepare_cached(&format!(
        "{} WHERE device = ?1 AND metric = ?2 ORDER BY observed_at DESC LIMIT ?3",
        crate::store::SELECT_READING
    ))?;
    let mut rows = Vec::new();
    for m in metrics {
        let found = stmt.query_map(
            rusqlite::params![device, m, LATEST as i64],
            crate::store::reading_from_row,
        )?;
        for r in found {
            rows.push(r?);
        }
    }
    rows.sort_by_key(|r| std::cmp::Reverse((r.reading.observed_at, r.id)));
    rows.truncate(LATEST);
    Ok(rows)
}

fn latest_table(ctx: &Ctx, rows: &[crate::store::StoredReading]) -> String {
    if rows.is_empty() {
        return "<p class=\"muted\">No readings.</p>".into();
    }
    let tz = ctx.config.agent.tz();
    let mut out = String::from(
        "<div class=\"wrap\"><table><thead><tr><th>Observed</th><th>Metric</th>\
         <th class=\"num\">Value</th><th class=\"hide-narrow\">Source</th>\
         <th class=\"hide-narrow\">Central</th></tr></thead><tbody>",
    );
    for r in rows {
        let reading = &r.reading;
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"hide-narrow\">{}</td>\
             <td class=\"hide-narrow\">{}</td></tr>",
            reading
                .observed_at
                .with_timezone(&tz)
                .format("%Y-%m-%d %H:%M:%S"),
            esc(&reading.metric),
            esc(&ctx
                .config
                .display
                .value(&reading.metric, reading.value, reading.unit.as_deref())),
            esc(&reading.source),
            if r.synced { "synced" } else { "waiting" },
        );
    }
    out.push_str("</tbody></table></div>");
    out
}

/// The download form: a GET form (it changes nothing, so it needs no CSRF token).
fn csv_form(ctx: &Ctx, device: &str, series: &[SeriesSummary]) -> String {
    let tz = ctx.config.agent.tz();
    let today = ctx.now.with_timezone(&tz).date_naive();
    let week_ago = today - chrono::Duration::days(6);
    let mut out = format!(
        "<h2>Download readings (CSV)</h2>\n<form class=\"csv noprint\" method=\"get\" \
         action=\"/device/{}/csv\"><label>From <input type=\"date\" name=\"from\" value=\"{week_ago}\"></label> \
         <label>To (inclusive) <input type=\"date\" name=\"to\" value=\"{today}\"></label> \
         <label>Metric <select name=\"metric\"><option value=\"\">all</option>",
        url(device)
    );
    for s in series {
        let _ = write!(
            out,
            "<option value=\"{m}\">{m}</option>",
            m = esc(&s.metric)
        );
    }
    let _ = write!(
        out,
        "</select></label> <button>Download</button></form>\n<p class=\"muted\">Local days in {}; \
         at most {} days and {} readings per file. The same columns as \
         <code>outpost readings --format csv</code>, oldest first.</p>\n",
        esc(tz.name()),
        download::MAX_RANGE.num_days(),
        super::words::thousands(download::MAX_ROWS)
    );
    out
}

async fn csv_download(ctx: &Ctx, req: &Req, device: &str) -> Reply {
    let range: CsvRange =
        match download::parse_range(device, &req.query, ctx.config.agent.tz(), ctx.now) {
            Ok(r) => r,
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("Cannot download: {e}.")),
        };
    let file_name = range.file_name(ctx.config.agent.tz());
    let result = ctx
        .read(move |conn| {
            let n = download::count(conn, &range)?;
            if n > download::MAX_ROWS {
                return Ok(Err(n));
            }
            let mut body = String::from(download::HEADER);
            download::write_rows(conn, &range, |chunk| {
                body.push_str(&chunk);
                true
            })?;
            Ok(Ok(body))
        })
        .await;
    match result {
        Ok(Ok(body)) => super::context::csv(&file_name, body),
        Ok(Err(_)) => text(
            StatusCode::UNPROCESSABLE_ENTITY,
            &format!(
                "Cannot download: the range holds more than {} readings; choose a shorter range \
                 or one metric.",
                super::words::thousands(download::MAX_ROWS)
            ),
        ),
        Err(reply) => reply,
    }
}
