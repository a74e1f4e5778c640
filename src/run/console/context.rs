//! What a page handler gets and gives back.

use super::session::User;
use super::Console;
use crate::clock::Clock;
use crate::config::Config;
use crate::run::health::HealthProbe;
use crate::store::Store;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE, LOCATION};
use hyper::{Response, StatusCode};
use std::net::IpAddr;
use std::sync::Arc;

/// An answer. [`super::server`] adds the security headers.
pub type Reply = Response<Full<Bytes>>;

/// The request context: everything a page may use.
#[derive(Clone)]
pub struct Ctx {
    pub store: Store,
    /// The configuration the agent runs with (updated on reload).
    pub config: Arc<Config>,
    pub clock: Clock,
    pub health: Arc<HealthProbe>,
    /// Who is asking (see [`User`]).
    pub user: User,
    /// This session's CSRF token: every form carries it ([`Ctx::csrf_field`]).
    pub csrf: String,
    /// This request's session id.
    pub session_id: String,
    /// `clock.now()` when the request arrived.
    pub now: DateTime<Utc>,
    /// The console itself (sessions, login limits), for the login pages.
    pub console: Arc<Console>,
}

impl Ctx {
    /// The hidden form field with the CSRF token, for every `<form method="post">`.
    pub fn csrf_field(&self) -> String {
        format!(
            r#"<input type="hidden" name="csrf" value="{}">"#,
            super::html::esc(&self.csrf)
        )
    }

    /// Runs `query` on a fresh read connection on the blocking pool (never on a
    /// runtime worker). An error becomes a 500 page naming it.
    pub async fn read<T, F>(&self, query: F) -> Result<T, Reply>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || {
            let conn = store.reader()?;
            query(&conn)
        })
        .await;
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(server_error(&format!("reading the store failed: {e}"))),
            Err(e) => Err(server_error(&format!("reading the store failed: {e}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

/// A request that passed [`super::server`]'s checks.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: Method,
    /// Percent-decoded, valid UTF-8, without `..` or empty inner segments.
    pub path: String,
    /// The decoded query pairs, in order.
    pub query: Vec<(String, String)>,
    /// The decoded form fields of a POST (`application/x-www-form-urlencoded`).
    pub form: Vec<(String, String)>,
    /// The client's address.
    pub peer: IpAddr,
}

impl Req {
    /// The first query value named `key`.
    pub fn query(&self, key: &str) -> Option<&str> {
        first(&self.query, key)
    }

    /// The first form value named `key`.
    pub fn form(&self, key: &str) -> Option<&str> {
        first(&self.form, key)
    }

    /// `?live=1`: the page's live part alone (see [`super::layout::live`]).
    pub fn wants_live(&self) -> bool {
        self.query("live") == Some("1")
    }
}

fn first<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A response with `body` and `content_type`.
pub fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// An HTML page with data: never cached.
pub fn html(status: StatusCode, body: String) -> Reply {
    let mut r = respond(status, "text/html; charset=utf-8", body);
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A JSON document: never cached.
pub fn json(value: &serde_json::Value) -> Reply {
    let mut r = respond(
        StatusCode::OK,
        "application/json",
        serde_json::to_string(value).unwrap_or_default(),
    );
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A CSV download named `filename` (letters, digits, `.`, `_`, `-`; others become
/// `_`).
pub fn csv(filename: &str, body: String) -> Reply {
    let mut r = respond(StatusCode::OK, "text/csv; charset=utf-8", body);
    let safe: String = filename
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{safe}\"")) {
        r.headers_mut().insert(CONTENT_DISPOSITION, v);
    }
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `303 See Other` to `location` (a path of this console).
pub fn redirect(location: &str) -> Reply {
    let mut r = respond(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(LOCATION, v);
    }
    r
}

/// Plain text with a status, for refusals (a person reads them).
pub fn text(status: StatusCode, message: &str) -> Reply {
    respond(status, "text/plain; charset=utf-8", format!("{message}\n"))
}

pub fn not_found(_ctx: &Ctx) -> Reply {
    text(
        StatusCode::NOT_FOUND,
        "No such page. The console starts at /; /metrics and /health are here too.",
    )
}

pub fn method_not_allowed() -> Reply {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "This address does not take that method.",
    );
    r.headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static("GET"));
    r
}

pub fn server_error(message: &str) -> Reply {
    tracing::warn!(error = message, "A console page failed.");
    text(StatusCode::INTERNAL_SERVER_ERROR, message)
}
