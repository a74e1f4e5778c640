//! Every console request passes here: checked (method, path, size), gated (login,
//! the "add a user" page, CSRF), routed ([`super::route`]) and given the security
//! headers.

use super::context::{self, html, redirect, text, Ctx, Method, Reply, Req};
use super::html::{esc, parse_pairs, percent_decode};
use super::session::{self, LoginLimiter, Lookup, Sessions, User};
use crate::clock::Clock;
use crate::config::http::Role;
use crate::config::Config;
use crate::run::health::HealthProbe;
use crate::store::Store;
use http_body_util::BodyExt;
use hyper::header::{HeaderName, HeaderValue};
use hyper::StatusCode;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// The largest POST body accepted; a larger one is refused with 413 unread.
pub const MAX_BODY: usize = 16 * 1024;
/// The longest request target (path and query) accepted; longer: 414.
pub const MAX_TARGET: usize = 4096;

/// The Content-Security-Policy of every console answer: no inline scripts or
/// styles, nothing from elsewhere, no framing.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'";

/// The console of one running agent.
pub struct Console {
    pub store: Store,
    pub clock: Clock,
    pub health: Arc<HealthProbe>,
    config: RwLock<Arc<Config>>,
    /// The configuration file the agent was started with (`--config`), which the
    /// gateway page checks as it is on disk now.
    pub config_path: std::path::PathBuf,
    /// The listen address is loopback: no login needed (fixed at start, like
    /// `http.listen`).
    pub loopback: bool,
    /// Serving over TLS (cookies get `Secure`).
    pub tls: bool,
    pub(crate) sessions: Mutex<Sessions>,
    pub(crate) limiter: Mutex<LoginLimiter>,
    /// One password check at a time: each takes Argon2id's 19 MiB and a good part of
    /// a core, so concurrent login attempts queue instead of exhausting memory.
    pub(crate) password_checks: tokio::sync::Semaphore,
    /// The last exact count of readings waiting for central (see
    /// [`super::overview::BacklogCache`]).
    pub(crate) backlog: Mutex<super::overview::BacklogCache>,
}

impl Console {
    pub fn new(
        config: &Config,
        config_path: std::path::PathBuf,
        store: Store,
        clock: Clock,
        health: Arc<HealthProbe>,
    ) -> Console {
        Console {
            config_path,
            store,
            clock,
            health,
            loopback: config.http.is_loopback(),
            tls: config.http.tls_cert_file.is_some(),
            sessions: Mutex::new(Sessions::new(
                config.http.session_idle.get(),
                config.http.session_max.get(),
            )),
            limiter: Mutex::new(LoginLimiter::default()),
            password_checks: tokio::sync::Semaphore::new(1),
            backlog: Mutex::new(Default::default()),
            config: RwLock::new(Arc::new(config.clone())),
        }
    }

    /// The configuration pages show (devices, rules, users).
    pub fn config(&self) -> Arc<Config> {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// After a reload: new devices, rules and users apply to the next request (the
    /// listen address, TLS and session lifetimes keep their values until a restart).
    pub fn set_config(&self, config: &Config) {
        let mut running = config.clone();
        let old = self.config();
        running.http.listen = old.http.listen.clone();
        running.http.session_idle = old.http.session_idle;
        running.http.session_max = old.http.session_max;
        running.http.tls_cert_file = old.http.tls_cert_file.clone();
        running.http.tls_key_file = old.http.tls_key_file.clone();
        match self.config.write() {
            Ok(mut c) => *c = Arc::new(running),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(running),
        }
    }

    pub(crate) fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn backlog(&self) -> std::sync::MutexGuard<'_, super::overview::BacklogCache> {
        self.backlog.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn limiter(&self) -> std::sync::MutexGuard<'_, LoginLimiter> {
        self.limiter.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Answers one console request (anything but `/metrics` and `/health`).
pub async fn handle<B>(console: &Arc<Console>, request: hyper::Request<B>, peer: IpAddr) -> Reply
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut reply = checked(console, request, peer).await;
    secure(&mut reply);
    reply
}

/// Adds the security headers every console answer carries.
fn secure(reply: &mut Reply) {
    let headers = reply.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("referrer-policy", "no-referrer"),
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
    ] {
        headers.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    if !headers.contains_key(hyper::header::CACHE_CONTROL) {
        headers.insert(
            hyper::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
    }
}

async fn checked<B>(console: &Arc<Console>, request: hyper::Request<B>, peer: IpAddr) -> Reply
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let method = match *request.method() {
        hyper::Method::GET | hyper::Method::HEAD => Method::Get,
        hyper::Method::POST => Method::Post,
        _ => return context::method_not_allowed(),
    };
    let target = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if target.len() > MAX_TARGET {
        return text(StatusCode::URI_TOO_LONG, "The address is too long.");
    }
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let Some(path) = clean_path(raw_path) else {
        return text(StatusCode::NOT_FOUND, "No such page.");
    };
    let Some(query) = parse_pairs(raw_query) else {
        return text(
            StatusCode::BAD_REQUEST,
            "The query string is not valid (bad %-escape or not UTF-8).",
        );
    };
    // Assets carry no data: served without a session.
    if method == Method::Get {
        if let Some(name) = path.strip_prefix("/static/") {
            return super::assets::get(name);
        }
    }
    let cookie = request
        .headers()
        .get(hyper::header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(session::cookie_value)
        .map(str::to_string);
    let is_form = request
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    let form = if method == Method::Post {
        let declared = request
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_BODY as u64) {
            return too_large();
        }
        let body = match http_body_util::Limited::new(request.into_body(), MAX_BODY)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("The request body could not be read: {e}"),
                )
            }
        };
        if !is_form && !body.is_empty() {
            return text(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Forms are sent as application/x-www-form-urlencoded.",
            );
        }
        let Some(form) = std::str::from_utf8(&body).ok().and_then(parse_pairs) else {
            return text(
                StatusCode::BAD_REQUEST,
                "The form is not valid (bad %-escape or not UTF-8).",
            );
        };
        form
    } else {
        Vec::new()
    };
    let req = Req {
        method,
        path,
        query,
        form,
        peer,
    };
    gate(console, req, cookie).await
}

fn too_large() -> Reply {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("The form is larger than {} KiB.", MAX_BODY / 1024),
    )
}

/// The path percent-decoded, if it is valid UTF-8 and names no parent, hidden or
/// empty segment and no control character; `None` otherwise.
pub fn clean_path(raw: &str) -> Option<String> {
    if !raw.starts_with('/') {
        return None;
    }
    let decoded = percent_decode(raw, false)?;
    if decoded.chars().any(|c| c.is_control() || c == '\\') {
        return None;
    }
    if decoded == "/" {
        return Some(decoded);
    }
    let inner = decoded.strip_suffix('/').unwrap_or(&decoded);
    if inner[1..]
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return None;
    }
    Some(inner.to_string())
}

/// Login, sessions and CSRF; then the page.
async fn gate(console: &Arc<Console>, req: Req, cookie: Option<String>) -> Reply {
    let config = console.config();
    let now = Instant::now();
    let make_ctx = |user: User, session: &session::Session| Ctx {
        store: console.store.clone(),
        config: config.clone(),
        clock: console.clock.clone(),
        health: console.health.clone(),
        user,
        csrf: session.csrf.clone(),
        session_id: session.id.clone(),
        now: console.clock.now(),
        console: console.clone(),
    };
    if !console.loopback && config.http.users.is_empty() {
        return no_users_page(&config);
    }
    let (lookup, found) = match &cookie {
        Some(id) => console.sessions().get(id, now),
        None => (Lookup::Unknown, None),
    };
    let (session, new_cookie) = match found {
        Some(s) => (s, false),
        None => (console.sessions().create(None, now), true),
    };
    let user = match (&session.login, console.loopback) {
        (Some((name, role)), _) => User {
            name: Some(name.clone()),
            role: Some(*role),
        },
        (None, true) => User {
            name: None,
            role: Some(Role::Operator),
        },
        (None, false) => User {
            name: None,
            role: None,
        },
    };
    let ctx = make_ctx(user, &session);
    let mut reply = if req.method == Method::Post && !csrf_ok(&req, &session.csrf, new_cookie) {
        csrf_refused(&ctx, lookup)
    } else if ctx.user.role.is_none() && !matches!(req.path.as_str(), "/login" | "/logout") {
        if req.wants_live() {
            text(StatusCode::UNAUTHORIZED, "Log in again.")
        } else if lookup == Lookup::Expired {
            redirect("/login?expired=1")
        } else {
            redirect("/login")
        }
    } else {
        super::route(&ctx, &req).await
    };
    if new_cookie && !reply.headers().contains_key(hyper::header::SET_COOKIE) {
        if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&session.id, console.tls)) {
            reply.headers_mut().insert(hyper::header::SET_COOKIE, v);
        }
    }
    reply
}

fn csrf_ok(req: &Req, expected: &str, new_session: bool) -> bool {
    !new_session
        && req
            .form("csrf")
            .is_some_and(|t| session::constant_time_eq(t.as_bytes(), expected.as_bytes()))
}

fn csrf_refused(ctx: &Ctx, lookup: Lookup) -> Reply {
    let why = match lookup {
        Lookup::Expired => "Your session has expired, so this form was not accepted.",
        _ => "This form was not accepted: it lacked this session's security token (CSRF), perhaps because it was opened before the agent restarted or in another browser.",
    };
    html(
        StatusCode::FORBIDDEN,
        super::layout::page(
            ctx,
            "Form refused",
            "",
            "",
            &format!(
                "<p class=\"notice error\">{why} Nothing was changed.</p><p><a href=\"/\">Back to the console</a></p>"
            ),
        ),
    )
}

/// A LAN console without `[[http.users]]`: how to add one, and no data at all.
fn no_users_page(config: &Config) -> Reply {
    let body = format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Add a console user · Outpost</title>
<link rel="stylesheet" href="/static/{css}">
</head><body><main>
<h1>Add a console user</h1>
<p>This console listens on <code>{listen}</code>, which other machines can reach, so it
shows nothing until someone can log in. On the gateway, make a password hash:</p>
<pre>sudo outpost passwd anna</pre>
<p>and add what it prints to <code>/etc/outpost/outpost.toml</code>:</p>
<pre>[[http.users]]
name = "anna"
role = "operator"   # or "viewer": sees everything, cannot acknowledge
password_hash = "$argon2id$v=19$..."</pre>
<p>then restart the agent (<code>sudo systemctl restart outpost</code>). Or set
<code>http.listen</code> to <code>127.0.0.1:9464</code> to use the console only on the
gateway itself (through an SSH tunnel), without a login.</p>
<p><code>/metrics</code> and <code>/health</code> answer as before.</p>
</main></body></html>
"#,
        css = super::assets::CSS_NAME,
        listen = esc(&config.http.listen),
    );
    html(StatusCode::FORBIDDEN, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_or_refused() {
        assert_eq!(clean_path("/").as_deref(), Some("/"));
        assert_eq!(clean_path("/alarms/").as_deref(), Some("/alarms"));
        assert_eq!(
            clean_path("/device/K%C3%BChlraum").as_deref(),
            Some("/device/Kühlraum")
        );
        for bad in [
            "/../etc/passwd",
            "/static/..%2f..%2fetc%2fpasswd",
            "/static/%2e%2e/x",
            "//x",
            "/a/./b",
            "/%ff",
            "/a%00b",
            "/a\\b",
            "x",
            "/a%2",
        ] {
            assert_eq!(clean_path(bad), None, "{bad}");
        }
    }
}
