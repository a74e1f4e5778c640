//! The local web console, served on the agent's HTTP port beside `/metrics` and
//! `/health` (which [`crate::run::http`] answers itself, unchanged).
//!
//! - [`server`]: parses and checks each request (methods, paths, body size), the
//!   access gate (login unless the listen address is loopback, the "add a user" page,
//!   sessions, CSRF), security headers on every answer, and calls [`route`].
//! - [`context`]: what a page handler gets ([`Ctx`]: store, configuration, clock,
//!   health, user and role, CSRF token; [`Req`]: path, query, form) and the reply
//!   helpers.
//! - [`layout`]: the shared page frame ([`layout::page`]); [`html`]: escaping;
//!   [`assets`]: the embedded CSS and JS; [`session`]: sessions, tokens, login limits.
//! - Pages, one file each: [`overview`], [`alarms`], [`login`].
//!
//! **Adding a page** is one file with `pub async fn get(ctx: &Ctx, req: &Req) ->
//! Reply` (and `post` for a form), its `mod` line below and its line in [`route`]
//! (plus a [`layout::NAV`] entry if it belongs in the navigation). A page that updates
//! live renders its changing part through [`layout::live`] and answers `?live=1`
//! with that part alone; the embedded script polls it.

pub mod alarms;
pub mod assets;
pub mod chart;
pub mod context;
pub mod csv;
pub mod device;
pub mod gateway;
pub mod html;
pub mod layout;
pub mod login;
pub mod overview;
pub mod reports;
pub mod server;
pub mod session;
pub mod words;

pub use context::{Ctx, Method, Reply, Req};
pub use server::Console;

/// Which page answers a request that passed the gate. `path` is decoded, valid UTF-8
/// and free of `..` segments.
pub async fn route(ctx: &Ctx, req: &Req) -> Reply {
    use Method::{Get, Post};
    match (req.method, req.path.as_str()) {
        (Get, "/") => overview::get(ctx, req).await,
        (Get, "/alarms") => alarms::get(ctx, req).await,
        (Get, p) if p.starts_with("/device/") => device::get(ctx, req).await,
        (Get, "/gateway") => gateway::get(ctx, req).await,
        (Get, p) if p == "/reports" || p.starts_with("/reports/") => reports::get(ctx, req).await,
        (Post, "/alarms/ack") => alarms::post_ack(ctx, req).await,
        (Get, "/login") => login::get(ctx, req).await,
        (Post, "/login") => login::post(ctx, req).await,
        (Post, "/logout") => login::post_logout(ctx, req).await,
        (Get, p) if p.starts_with("/static/") => assets::get(&p["/static/".len()..]),
        (Post, _) => context::method_not_allowed(),
        _ => context::not_found(ctx),
    }
}
