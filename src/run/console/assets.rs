//! The console's static files, embedded in the binary (no network at run time) and
//! found by exact name only: nothing here touches the file system.

use super::context::{respond, text, Reply};
use hyper::header::{HeaderValue, CACHE_CONTROL};
use hyper::StatusCode;

/// The stylesheet's name under `/static/` (versioned, so it may be cached).
pub const CSS_NAME: &str = concat!("console-", env!("CARGO_PKG_VERSION"), ".css");
/// The live-update script's name under `/static/`.
pub const JS_NAME: &str = concat!("console-", env!("CARGO_PKG_VERSION"), ".js");

const CSS: &str = include_str!("static/console.css");
const JS: &str = include_str!("static/console.js");

/// The asset called `name`, or 404.
pub fn get(name: &str) -> Reply {
    let (content_type, body) = match name {
        n if n == CSS_NAME => ("text/css; charset=utf-8", CSS),
        n if n == JS_NAME => ("text/javascript; charset=utf-8", JS),
        _ => return text(StatusCode::NOT_FOUND, "No such file."),
    };
    let mut r = respond(StatusCode::OK, content_type, body);
    r.headers_mut().insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    r
}
