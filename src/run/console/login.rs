//! `/login` and `/logout`. A successful login replaces the visitor's anonymous
//! session with a new one (new id, new CSRF token); every login and failed login is
//! written to the audit log with the client's address.

use super::context::{html, redirect, text, Ctx, Reply, Req};
use super::html::esc;
use super::layout;
use crate::store::audit::{AuditEntry, AuditKind};
use hyper::header::{HeaderValue, RETRY_AFTER, SET_COOKIE};
use hyper::StatusCode;
use std::time::Instant;

pub async fn get(ctx: &Ctx, req: &Req) -> Reply {
    if ctx.console.loopback && ctx.user.name.is_none() {
        return redirect("/");
    }
    let notice = if req.query("expired") == Some("1") {
        "<p class=\"notice\">Your session has expired. Please log in again.</p>"
    } else {
        ""
    };
    html(StatusCode::OK, form_page(ctx, notice, ""))
}

fn form_page(ctx: &Ctx, notice: &str, name: &str) -> String {
    layout::page(
        ctx,
        "Log in",
        "",
        "",
        &format!(
            r#"{notice}<form method="post" action="/login">{csrf}
<p><label for="name">Name</label><input type="text" id="name" name="name" value="{name}" autocomplete="username" required autofocus></p>
<p><label for="password">Password</label><input type="password" id="password" name="password" autocomplete="current-password" required></p>
<p><button>Log in</button></p></form>"#,
            csrf = ctx.csrf_field(),
            name = esc(name),
        ),
    )
}

pub async fn post(ctx: &Ctx, req: &Req) -> Reply {
    let name = req.form("name").unwrap_or("").trim().to_string();
    let password = req.form("password").unwrap_or("").to_string();
    let address = req.peer;
    // Queued behind any other check, so the limit below sees its failures.
    let Ok(_permit) = ctx.console.password_checks.acquire().await else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "The agent is stopping.");
    };
    if let Err(wait) = ctx.console.limiter().check(address, Instant::now()) {
        let mut r = html(
            StatusCode::TOO_MANY_REQUESTS,
            form_page(
                ctx,
                &format!(
                    "<p class=\"notice error\">Too many failed logins from this address: try again in {} s.</p>",
                    wait.as_secs().max(1)
                ),
                &name,
            ),
        );
        if let Ok(v) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            r.headers_mut().insert(RETRY_AFTER, v);
        }
        return r;
    }
    let user = ctx.config.http.user(&name).cloned();
    // Without such a user a fixed hash is checked anyway, so the time taken does not
    // tell which names exist.
    let hash = user
        .as_ref()
        .map(|u| u.password_hash.clone())
        .unwrap_or_else(|| DUMMY_HASH.to_string());
    let verified = tokio::task::spawn_blocking(move || verify(&password, &hash))
        .await
        .unwrap_or(false);
    match user.filter(|_| verified) {
        Some(user) => {
            ctx.console.limiter().succeeded(address);
            let audit = ctx
                .store
                .audit(AuditEntry::new(
                    AuditKind::ConsoleLogin,
                    format!("console:{}", user.name),
                    serde_json::json!({"address": address.to_string(), "role": user.role.as_str()}),
                ))
                .await;
            if let Err(e) = audit {
                tracing::error!(error = %e, "Cannot write the console login to the audit log; login refused.");
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The login could not be recorded in the audit log (the store refused the write), so it was refused. Try again later.",
                );
            }
            tracing::info!(user = %user.name, address = %address, "Console login.");
            let session = {
                let mut sessions = ctx.console.sessions();
                sessions.remove(&ctx.session_id);
                sessions.create(Some((user.name.clone(), user.role)), Instant::now())
            };
            let mut r = redirect("/");
            if let Ok(v) =
                HeaderValue::from_str(&super::session::set_cookie(&session.id, ctx.console.tls))
            {
                r.headers_mut().insert(SET_COOKIE, v);
            }
            r
        }
        None => {
            ctx.console.limiter().failed(address, Instant::now());
            let shown: String = name.chars().take(64).collect();
            let _ = ctx
                .store
                .audit(AuditEntry::new(
                    AuditKind::ConsoleLoginFailed,
                    format!("console:{shown}"),
                    serde_json::json!({"address": address.to_string()}),
                ))
                .await;
            tracing::warn!(user = %shown, address = %address, "Failed console login.");
            html(
                StatusCode::UNAUTHORIZED,
                form_page(
                    ctx,
                    "<p class=\"notice error\">Wrong name or password.</p>",
                    &name,
                ),
            )
        }
    }
}

pub async fn post_logout(ctx: &Ctx, _req: &Req) -> Reply {
    ctx.console.sessions().remove(&ctx.session_id);
    let mut r = redirect(if ctx.console.loopback { "/" } else { "/login" });
    let expired = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        super::session::COOKIE,
        if ctx.console.tls { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&expired) {
        r.headers_mut().insert(SET_COOKIE, v);
    }
    r
}

/// An Argon2id hash of a random password nobody knows, checked when the name is
/// unknown.
const DUMMY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Vg4bRh4H3u0bX0zqKzJ2yYqj2m3wz9Zb0l7o5Q8dJ3E";

/// `password` matches the PHC string `hash` (Argon2id).
pub fn verify(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    argon2::Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// The Argon2id PHC string of `password` with a random salt (RustCrypto's default
/// parameters: 19 MiB, 2 passes, 1 lane), as `outpost passwd` prints it.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    use rand::RngCore;
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_are_accepted_by_the_configuration() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$"));
        assert!(verify("correct horse", &hash));
        assert!(!verify("wrong horse", &hash));
        assert!(!verify("x", "not a hash"));
        assert!(crate::config::http::check_password_hash(&hash).is_ok());
        assert!(crate::config::http::check_password_hash(DUMMY_HASH).is_ok());
        assert!(!verify("", DUMMY_HASH));
    }
}
