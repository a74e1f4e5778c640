//! The frame every console page shares: head (CSS and the live-update script, both
//! embedded), navigation, who is logged in, a banner slot and the body.

use super::assets;
use super::html::esc;
use super::Ctx;
use std::fmt::Write;

/// The navigation: (path, label). A page whose path is listed here is marked current
/// when it passes that path as `nav` to [`page`].
pub const NAV: &[(&str, &str)] = &[
    ("/", "Overview"),
    ("/alarms", "Alarms"),
    ("/reports", "Reports"),
    ("/gateway", "Gateway"),
];

/// A whole page. `nav` is the [`NAV`] path to mark current (or ""); `banner` is HTML
/// shown above the body on a coloured band (empty: none); `body` is HTML. Both must be
/// built with [`esc`] around every outside text.
pub fn page(ctx: &Ctx, title: &str, nav: &str, banner: &str, body: &str) -> String {
    let site = if ctx.config.agent.site.is_empty() {
        &ctx.config.agent.gateway_id
    } else {
        &ctx.config.agent.site
    };
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · {site} · Outpost</title>
<link rel="stylesheet" href="/static/{css}">
<script src="/static/{js}" defer></script>
</head><body>
<header><span class="site">{site}</span><nav>"#,
        title = esc(title),
        site = esc(site),
        css = assets::CSS_NAME,
        js = assets::JS_NAME,
    );
    if ctx.user.role.is_some() {
        for (path, label) in NAV {
            let current = if *path == nav {
                r#" aria-current="page""#
            } else {
                ""
            };
            let _ = write!(out, r#"<a href="{path}"{current}>{label}</a>"#);
        }
    }
    out.push_str("</nav>");
    if let (Some(name), Some(role)) = (&ctx.user.name, ctx.user.role) {
        let _ = write!(
            out,
            r#"<form class="user" method="post" action="/logout">{csrf}<span>{name} ({role})</span> <button>Log out</button></form>"#,
            csrf = ctx.csrf_field(),
            name = esc(name),
            role = role.as_str(),
        );
    }
    out.push_str("</header>\n<p id=\"contact\" class=\"contact\" hidden></p>\n");
    if !banner.is_empty() {
        let _ = writeln!(out, "<section class=\"banner\">{banner}</section>");
    }
    let _ = write!(out, "<main>\n<h1>{}</h1>\n{body}</main>\n", esc(title));
    let _ = write!(
        out,
        "<footer>Outpost {} · {} · {}</footer>\n</body></html>\n",
        env!("CARGO_PKG_VERSION"),
        esc(&ctx.config.agent.gateway_id),
        ctx.now.format("%Y-%m-%d %H:%M:%S UTC"),
    );
    out
}

/// The part of a page that updates without a reload: the embedded script fetches
/// `path?live=1` every few seconds and replaces this element's content with the
/// answer (so that request must answer with `inner` alone; see
/// [`super::Req::wants_live`]). If the agent stops answering, the page says since
/// when.
pub fn live(path: &str, inner: &str) -> String {
    format!(
        r#"<div id="live" data-live="{}?live=1">{inner}</div>"#,
        esc(path)
    )
}
