//! Console sessions, kept in memory only: a restart of the agent logs everyone out.
//!
//! A session is a random 256-bit id in an `HttpOnly; SameSite=Strict` cookie (plus
//! `Secure` over TLS) and carries its own CSRF token, required on every form. It ends
//! after `http.session_idle` without a request or `http.session_max` after it began.
//! Visitors who are not logged in get an anonymous session too, so the login form
//! has a CSRF token; on a loopback console the anonymous session is the user.
//! Failed logins are limited per client address ([`LoginLimiter`]).

use crate::config::http::Role;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The session cookie's name.
pub const COOKIE: &str = "outpost_session";

/// At most this many sessions are kept; the least recently used goes first.
const MAX_SESSIONS: usize = 512;

/// Who is behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The logged-in user's name; `None` when not logged in.
    pub name: Option<String>,
    /// What they may do (an anonymous visitor of a loopback console: operator; of a
    /// LAN console: nothing, they see only the login page).
    pub role: Option<Role>,
}

impl User {
    pub fn may_acknowledge(&self) -> bool {
        self.role == Some(Role::Operator)
    }
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub csrf: String,
    /// Logged-in user name and role; `None` for an anonymous session.
    pub login: Option<(String, Role)>,
    started: Instant,
    last_used: Instant,
}

/// Why a cookie's session is not valid (the login page says which).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    Valid,
    Expired,
    Unknown,
}

#[derive(Debug)]
pub struct Sessions {
    by_id: HashMap<String, Session>,
    idle: Duration,
    max: Duration,
}

impl Sessions {
    pub fn new(idle: Duration, max: Duration) -> Sessions {
        Sessions {
            by_id: HashMap::new(),
            idle,
            max,
        }
    }

    /// The session with this id, touched; or why there is none.
    pub fn get(&mut self, id: &str, now: Instant) -> (Lookup, Option<Session>) {
        let Some(session) = self.by_id.get_mut(id) else {
            return (Lookup::Unknown, None);
        };
        if now.duration_since(session.last_used) > self.idle
            || now.duration_since(session.started) > self.max
        {
            self.by_id.remove(id);
            return (Lookup::Expired, None);
        }
        session.last_used = now;
        (Lookup::Valid, Some(session.clone()))
    }

    /// A new session (anonymous or logged in) with fresh id and CSRF token.
    pub fn create(&mut self, login: Option<(String, Role)>, now: Instant) -> Session {
        self.by_id.retain(|_, s| {
            now.duration_since(s.last_used) <= self.idle
                && now.duration_since(s.started) <= self.max
        });
        if self.by_id.len() >= MAX_SESSIONS {
            // Anonymous sessions go first, then the least recently used.
            let victim = self
                .by_id
                .values()
                .min_by_key(|s| (s.login.is_some(), s.last_used))
                .map(|s| s.id.clone());
            if let Some(victim) = victim {
                self.by_id.remove(&victim);
            }
        }
        let session = Session {
            id: random_token(),
            csrf: random_token(),
            login,
            started: now,
            last_used: now,
        };
        self.by_id.insert(session.id.clone(), session.clone());
        session
    }

    pub fn remove(&mut self, id: &str) {
        self.by_id.remove(id);
    }
}

/// 32 random bytes from the operating system's generator, as hex.
pub fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Compares without an early exit, so the time taken does not tell how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The session id in a `Cookie` header, if any.
pub fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// The `Set-Cookie` value for session `id`.
pub fn set_cookie(id: &str, tls: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{}",
        if tls { "; Secure" } else { "" }
    )
}

/// Failed logins allowed per address within [`LOGIN_WINDOW`].
pub const LOGIN_FAILURES: usize = 5;
/// The window [`LOGIN_FAILURES`] counts in.
pub const LOGIN_WINDOW: Duration = Duration::from_secs(300);
/// At most this many addresses are remembered (the oldest are forgotten first).
const MAX_ADDRESSES: usize = 4096;

/// Failed logins per client address: after [`LOGIN_FAILURES`] within
/// [`LOGIN_WINDOW`] further attempts from that address are refused unchecked until
/// the oldest failure leaves the window.
#[derive(Debug, Default)]
pub struct LoginLimiter {
    failures: HashMap<IpAddr, VecDeque<Instant>>,
}

impl LoginLimiter {
    /// `Err(wait)` while `address` is blocked.
    pub fn check(&mut self, address: IpAddr, now: Instant) -> Result<(), Duration> {
        let Some(times) = self.failures.get_mut(&address) else {
            return Ok(());
        };
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= LOGIN_WINDOW)
        {
            times.pop_front();
        }
        if times.len() < LOGIN_FAILURES {
            return Ok(());
        }
        let oldest = times.front().copied().unwrap_or(now);
        Err(LOGIN_WINDOW.saturating_sub(now.duration_since(oldest)))
    }

    pub fn failed(&mut self, address: IpAddr, now: Instant) {
        if self.failures.len() >= MAX_ADDRESSES && !self.failures.contains_key(&address) {
            self.failures.retain(|_, t| {
                t.back()
                    .is_some_and(|t| now.duration_since(*t) < LOGIN_WINDOW)
            });
            if self.failures.len() >= MAX_ADDRESSES {
                let oldest = self
                    .failures
                    .iter()
                    .min_by_key(|(_, t)| t.back().copied())
                    .map(|(a, _)| *a);
                if let Some(a) = oldest {
                    self.failures.remove(&a);
                }
            }
        }
        let times = self.failures.entry(address).or_default();
        times.push_back(now);
        if times.len() > LOGIN_FAILURES {
            times.pop_front();
        }
    }

    pub fn succeeded(&mut self, address: IpAddr) {
        self.failures.remove(&address);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_when_idle_and_at_their_maximum_age() {
        let t0 = Instant::now();
        let mut sessions = Sessions::new(Duration::from_secs(60), Duration::from_secs(150));
        let s = sessions.create(Some(("ann".into(), Role::Viewer)), t0);
        assert_eq!(
            sessions.get(&s.id, t0 + Duration::from_secs(50)).0,
            Lookup::Valid
        );
        assert_eq!(
            sessions.get(&s.id, t0 + Duration::from_secs(100)).0,
            Lookup::Valid
        );
        assert_eq!(
            sessions.get(&s.id, t0 + Duration::from_secs(151)).0,
            Lookup::Expired
        );
        let s = sessions.create(None, t0);
        assert_eq!(
            sessions.get(&s.id, t0 + Duration::from_secs(61)).0,
            Lookup::Expired
        );
        assert_eq!(sessions.get("nope", t0).0, Lookup::Unknown);
    }

    #[test]
    fn sessions_are_bounded() {
        let t0 = Instant::now();
        let mut sessions = Sessions::new(Duration::from_secs(60), Duration::from_secs(60));
        let kept = sessions.create(Some(("ann".into(), Role::Operator)), t0);
        for _ in 0..2 * MAX_SESSIONS {
            sessions.create(None, t0);
        }
        assert!(sessions.by_id.len() <= MAX_SESSIONS);
        assert_eq!(sessions.get(&kept.id, t0).0, Lookup::Valid);
    }

    #[test]
    fn logins_are_limited_per_address() {
        let t0 = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut limiter = LoginLimiter::default();
        for _ in 0..LOGIN_FAILURES {
            assert!(limiter.check(a, t0).is_ok());
            limiter.failed(a, t0);
        }
        assert!(limiter.check(a, t0 + Duration::from_secs(1)).is_err());
        assert!(limiter.check(b, t0).is_ok());
        assert!(limiter.check(a, t0 + LOGIN_WINDOW).is_ok());
    }

    #[test]
    fn cookies_and_tokens() {
        assert_eq!(cookie_value("a=1; outpost_session=xyz; b=2"), Some("xyz"));
        assert_eq!(cookie_value("a=1"), None);
        assert!(set_cookie("x", true).ends_with("; Secure"));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_ne!(random_token(), random_token());
    }
}
