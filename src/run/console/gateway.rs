//! `/gateway`: the gateway itself, for the technician. The health checks (sources,
//! store, sync, notifications, clock, certificates — what `/health` answers), rejected
//! input per source with what to do about it, every certificate and calibration due
//! date, the store (size, cap, retention, bytes per reading, how long it can stay
//! offline), version and uptime, and the check of the configuration file on disk (so
//! an edit is checked before `systemctl reload outpost`).

use super::context::{html, Ctx, Reply, Req};
use super::html::esc;
use super::layout;
use super::overview::{storage, Storage};
use super::words::{bytes, span, thousands};
use crate::sources::rejects::RejectionSummary;
use crate::store::BacklogSummary;
use hyper::StatusCode;
use std::fmt::Write;

struct Facts {
    rejections: Vec<RejectionSummary>,
    storage: Storage,
    backlog: BacklogSummary,
}

pub async fn get(ctx: &Ctx, _req: &Req) -> Reply {
    let facts = match ctx
        .read(|conn| {
            Ok(Facts {
                rejections: crate::sources::rejects::summary(conn)?,
                storage: storage(conn)?,
                backlog: crate::store::backlog(conn)?,
            })
        })
        .await
    {
        Ok(f) => f,
        Err(reply) => return reply,
    };
    let health = ctx.health.report().await;
    let config_path = ctx.console.config_path.clone();
    let check = {
        let path = config_path.clone();
        tokio::task::spawn_blocking(move || crate::config::Config::load(&path).map(|_| ()))
            .await
            .unwrap_or(Ok(()))
    };
    let tz = ctx.config.agent.tz();
    let mut body = String::with_capacity(16 * 1024);

    // Health, as /health answers it.
    let _ = write!(
        body,
        "<div class=\"state{}\">{}</div>\n<h2>Health</h2>\n<div class=\"wrap\"><table><thead>\
         <tr><th>Check</th><th>State</th><th>Detail</th></tr></thead><tbody>",
        if health.healthy() { "" } else { " bad" },
        if health.healthy() {
            "Every check passes."
        } else {
            "Something needs attention: see the checks marked below."
        }
    );
    for c in &health.checks {
        let _ = write!(
            body,
            "<tr><td>{}</td><td><span class=\"tag {}\">{}</span></td><td>{}</td></tr>",
            esc(&c.name),
            if c.ok { "ok" } else { "firing" },
            if c.ok { "ok" } else { "problem" },
            esc(&c.detail)
        );
    }
    body.push_str("</tbody></table></div>\n");

    // Rejected input.
    body.push_str("<h2>Rejected messages</h2>\n");
    if facts.rejections.is_empty() {
        body.push_str("<p class=\"muted\">No source rejected anything.</p>\n");
    } else {
        body.push_str(
            "<div class=\"wrap\"><table><thead><tr><th>Source</th><th>Reason</th>\
             <th class=\"num\">Count</th><th>Last</th><th>What to do</th></tr></thead><tbody>",
        );
        for r in &facts.rejections {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}{}</td><td class=\"num\">{}</td><td>{} ago</td><td>{}</td></tr>",
                esc(&r.source),
                esc(&r.reason),
                r.last_detail
                    .as_deref()
                    .map(|d| format!(
                        "<br><span class=\"muted\">{}</span>",
                        esc(&d.chars().take(200).collect::<String>())
                    ))
                    .unwrap_or_default(),
                thousands(r.count),
                crate::display::age(ctx.now, r.last_at),
                esc(r.hint),
            );
        }
        body.push_str("</tbody></table></div>\n<p class=\"muted\"><code>outpost rejected</code> shows the kept messages.</p>\n");
    }

    // Certificates and calibration.
    body.push_str("<h2>Certificates</h2>\n");
    let certs = ctx.health.certs.snapshot();
    if certs.is_empty() {
        body.push_str("<p class=\"muted\">No TLS certificate in use or seen yet.</p>\n");
    } else {
        body.push_str(
            "<div class=\"wrap\"><table><thead><tr><th>Used by</th><th>Certificate</th>\
             <th>Expires</th></tr></thead><tbody>",
        );
        for (label, info) in &certs {
            let days = info.days_left(ctx.now);
            let class = if days < 0.0 {
                "firing"
            } else if days < 30.0 {
                "pending"
            } else {
                "ok"
            };
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}<br><span class=\"muted\">{}</span></td>\
                 <td><span class=\"tag {class}\">{}</span> {}</td></tr>",
                esc(label),
                esc(&info.subject_hint),
                esc(&info.origin),
                if days < 0.0 {
                    "expired".to_string()
                } else {
                    format!("in {} d", days.floor())
                },
                info.not_after.with_timezone(&tz).format("%Y-%m-%d"),
            );
        }
        body.push_str("</tbody></table></div>\n");
    }
    body.push_str("<h2>Calibration</h2>\n");
    let today = ctx.now.with_timezone(&tz).date_naive();
    let calibrations = crate::report::calibration::all(&ctx.config.devices, today);
    if calibrations.is_empty() {
        body.push_str(
            "<p class=\"muted\">No device has a <code>calibration_due</code> date \
             (<code>[[devices]]</code> in the configuration).</p>\n",
        );
    } else {
        body.push_str("<ul>");
        for c in &calibrations {
            let _ = write!(
                body,
                "<li><span class=\"tag {}\">{}</span> {}</li>",
                match c.state.as_str() {
                    "overdue" => "firing",
                    "soon" => "pending",
                    _ => "ok",
                },
                esc(c.state.as_str()),
                esc(&c.describe())
            );
        }
        body.push_str("</ul>\n");
    }

    // Clock.
    let _ = write!(
        body,
        "<h2>Clock</h2>\n<p>{}. Local time {} ({}).</p>\n",
        if crate::clock::is_synchronized() {
            "Synchronised"
        } else {
            "<strong>Not synchronised</strong>: readings taken now are flagged until the clock is set"
        },
        ctx.now.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S"),
        esc(tz.name())
    );

    // The store.
    let s = &facts.storage;
    let cap = ctx.config.storage.max_size.0;
    let _ = write!(
        body,
        "<h2>Store</h2>\n<div class=\"wrap\"><table><tbody>\
         <tr><th>File</th><td>{}</td></tr>\
         <tr><th>Size</th><td>{} of a {} cap ({}%)</td></tr>\
         <tr><th>Readings</th><td>about {}{}</td></tr>\
         <tr><th>Per reading</th><td>{}</td></tr>\
         <tr><th>Retention</th><td>synced readings are kept {}</td></tr>\
         <tr><th>Waiting for central</th><td>{}</td></tr>\
         <tr><th>Free disk</th><td>{}</td></tr>\
         <tr><th>Offline capacity</th><td>{}</td></tr>\
         </tbody></table></div>\n",
        esc(&ctx.config.storage.path.display().to_string()),
        bytes(s.bytes),
        bytes(cap),
        (s.bytes * 100).checked_div(cap).unwrap_or(0),
        thousands(s.readings),
        s.per_day
            .map(|d| format!(", {} a day", thousands(d.round() as i64)))
            .unwrap_or_default(),
        s.bytes_per_reading()
            .map(|b| format!("{b:.0} bytes"))
            .unwrap_or_else(|| "–".into()),
        span(ctx.config.storage.retention.get()),
        match facts.backlog.oldest_received_at {
            Some(oldest) if facts.backlog.rows > 0 => format!(
                "{} readings, the oldest from {} ago",
                thousands(facts.backlog.rows),
                span((ctx.now - oldest).to_std().unwrap_or_default())
            ),
            _ => "none".into(),
        },
        s.disk_free.map(bytes).unwrap_or_else(|| "unknown".into()),
        s.offline_capacity(cap, facts.backlog.rows)
            .map(|d| format!(
                "room for about {} more without central, at today's rate",
                span(d)
            ))
            .unwrap_or_else(|| "unknown until readings arrive".into()),
    );

    // Version, uptime, configuration.
    let _ = write!(
        body,
        "<h2>Agent</h2>\n<div class=\"wrap\"><table><tbody>\
         <tr><th>Version</th><td>Outpost {}</td></tr>\
         <tr><th>Gateway</th><td>{}</td></tr>\
         <tr><th>Running for</th><td>{}</td></tr>\
         <tr><th>Configuration</th><td>{}</td></tr></tbody></table></div>\n",
        env!("CARGO_PKG_VERSION"),
        esc(&ctx.config.agent.gateway_id),
        span(ctx.health.started.elapsed()),
        match &check {
            Ok(()) => format!(
                "<span class=\"tag ok\">valid</span> {} (as on disk now; \
                 <code>systemctl reload outpost</code> applies an edit)",
                esc(&config_path.display().to_string())
            ),
            Err(e) => format!(
                "<span class=\"tag firing\">invalid</span> {}: the agent keeps running with \
                 the configuration it loaded; fix the file before a reload or restart.\
                 <pre>{}</pre>",
                esc(&config_path.display().to_string()),
                esc(&e.to_string())
            ),
        }
    );
    html(
        StatusCode::OK,
        layout::page(ctx, "Gateway", "/gateway", "", &body),
    )
}
