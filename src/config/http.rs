//! `[http]`: where `/metrics`, `/health` and the web console are served, who may log
//! in to the console, and when a stage counts as stalled. The section sits here, not
//! beside the server (`crate::run::http`), because
//! the configuration is a lower layer than the run layer that serves it.

use crate::settings::{HumanDuration, Problems};
use serde::{Deserialize, Serialize};

/// `[http]`: the metrics and health endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve `/metrics` and `/health`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Address and port. Keep it on 127.0.0.1 unless a firewall protects the port:
    /// the endpoint has no authentication.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `/health` reports a source unhealthy when it has not produced a reading for this
    /// long (a source that reports itself connected is healthy regardless).
    #[serde(default = "default_source_max_silence")]
    pub source_max_silence: HumanDuration,
    /// A stage (a source, the store writer, the alert engine, the notification
    /// outbox, central sync) with work waiting and no progress for this long, and no
    /// known reason such as a full disk or an unreachable server, is *stalled*:
    /// `/health` fails naming it, the log says so at ERROR and the systemd watchdog is
    /// no longer fed, so systemd restarts the agent (G9).
    #[serde(default = "default_stall_after")]
    pub stall_after: HumanDuration,
    /// `[[http.users]]`: who may log in to the console. A console on a loopback
    /// `listen` needs no login; on any other address it shows nothing until a user
    /// exists.
    #[serde(default)]
    pub users: Vec<ConsoleUser>,
    /// A console session ends after this long without a request.
    #[serde(default = "default_session_idle")]
    pub session_idle: HumanDuration,
    /// A console session ends this long after the login, used or not.
    #[serde(default = "default_session_max")]
    pub session_max: HumanDuration,
    /// Serve HTTPS with this certificate chain (PEM); with `tls_key_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// The private key of `tls_cert_file` (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<std::path::PathBuf>,
}

/// `[[http.users]]`: one console user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleUser {
    /// The login name, also the name written with an acknowledgement.
    pub name: String,
    /// `viewer` sees everything; `operator` may also acknowledge alarms.
    pub role: Role,
    /// Argon2id PHC string printed by `outpost passwd`.
    pub password_hash: String,
}

/// What a console user may do.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: default_listen(),
            source_max_silence: default_source_max_silence(),
            stall_after: default_stall_after(),
            users: Vec::new(),
            session_idle: default_session_idle(),
            session_max: default_session_max(),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_source_max_silence() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
fn default_session_idle() -> HumanDuration {
    HumanDuration::from_secs(30 * 60)
}
fn default_session_max() -> HumanDuration {
    HumanDuration::from_secs(12 * 3600)
}
fn default_stall_after() -> HumanDuration {
    HumanDuration::from_secs(crate::progress::DEFAULT_STALL_AFTER.as_secs())
}

/// Bounds of `http.stall_after`: long enough for a slow SD-card commit, short enough
/// that systemd restarts a stalled agent the same day.
pub const STALL_AFTER_MIN: std::time::Duration = std::time::Duration::from_secs(1);
pub const STALL_AFTER_MAX: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl HttpConfig {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(
                format!("{path}.listen"),
                format!(
                    "expected an address and port like \"127.0.0.1:9464\", found {:?}",
                    self.listen
                ),
            );
        }
        if self.source_max_silence.get() < std::time::Duration::from_secs(1) {
            problems.push(format!("{path}.source_max_silence"), "must be at least 1s");
        }
        let stall_after = self.stall_after.get();
        if !(STALL_AFTER_MIN..=STALL_AFTER_MAX).contains(&stall_after) {
            problems.push(format!("{path}.stall_after"), "must be between 1s and 24h");
        }
        let (idle, max) = (self.session_idle.get(), self.session_max.get());
        let minute = std::time::Duration::from_secs(60);
        let week = std::time::Duration::from_secs(7 * 24 * 3600);
        // Below a minute only for tests of expiry (debug builds).
        let floor = if cfg!(debug_assertions) {
            std::time::Duration::from_secs(1)
        } else {
            minute
        };
        if !(floor..=week).contains(&idle) {
            problems.push(format!("{path}.session_idle"), "must be between 1m and 7d");
        }
        if !(floor..=week).contains(&max) {
            problems.push(format!("{path}.session_max"), "must be between 1m and 7d");
        } else if max < idle {
            problems.push(
                format!("{path}.session_max"),
                "must be at least session_idle",
            );
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => problems.push(
                format!("{path}.tls_key_file"),
                "tls_cert_file is set: the key file is needed too",
            ),
            (None, Some(_)) => problems.push(
                format!("{path}.tls_cert_file"),
                "tls_key_file is set: the certificate file is needed too",
            ),
            _ => {}
        }
        let mut seen = std::collections::HashSet::new();
        for (i, user) in self.users.iter().enumerate() {
            let at = format!("{path}.users[{i}]");
            if !valid_user_name(&user.name) {
                problems.push(
                    format!("{at}.name"),
                    format!(
                        "expected 1 to 64 letters, digits, '.', '_', '-' or '@', found {:?}",
                        user.name
                    ),
                );
            } else if !seen.insert(user.name.as_str()) {
                problems.push(
                    format!("{at}.name"),
                    format!("user {:?} is listed twice", user.name),
                );
            }
            if let Err(why) = check_password_hash(&user.password_hash) {
                problems.push(format!("{at}.password_hash"), why);
            }
        }
    }

    /// `listen` is a loopback address: the console needs no login.
    pub fn is_loopback(&self) -> bool {
        self.listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
    }

    /// The HTTPS certificate for the certificate watch (expiry in the log, `/health`,
    /// `/metrics` and `outpost status`).
    pub fn tls_endpoint(&self) -> Option<crate::tls::Endpoint> {
        self.tls_cert_file.as_ref().map(|cert| {
            crate::tls::Endpoint::new("http")
                .with_file("http.tls_cert_file".to_string(), Some(cert))
        })
    }

    /// The user named `name`, if configured.
    pub fn user(&self, name: &str) -> Option<&ConsoleUser> {
        self.users.iter().find(|u| u.name == name)
    }
}

/// A console user name: what the login form and acknowledgements carry.
pub fn valid_user_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
}

/// A password hash as `outpost passwd` prints it: an Argon2id PHC string.
pub fn check_password_hash(hash: &str) -> Result<(), String> {
    if !hash.starts_with("$argon2id$") {
        return Err(
            "expected an Argon2id hash (\"$argon2id$v=19$...\") as `outpost passwd` prints it"
                .into(),
        );
    }
    let invalid =
        |why: String| format!("not a valid Argon2id hash ({why}); make one with `outpost passwd`");
    let parsed = argon2::PasswordHash::new(hash).map_err(|e| invalid(e.to_string()))?;
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err(invalid("no salt or no hash".into()));
    }
    argon2::Params::try_from(&parsed)
        .map(|_| ())
        .map_err(|e| invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed Argon2id PHC string.
    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Vg4bRh4H3u0bX0zqKzJ2yYqj2m3wz9Zb0l7o5Q8dJ3E";

    fn problems(http: &HttpConfig) -> Vec<(String, String)> {
        let mut p = Problems::default();
        http.validate("http", &mut p);
        p.0
    }

    fn user(name: &str, hash: &str) -> ConsoleUser {
        ConsoleUser {
            name: name.into(),
            role: Role::Viewer,
            password_hash: hash.into(),
        }
    }

    #[test]
    fn users_are_checked_with_clear_errors() {
        let http = HttpConfig {
            users: vec![
                user("anna", HASH),
                user("anna", HASH),
                user("bad name", HASH),
                user("bob", "hunter2"),
                user("carl", "$argon2id$v=19$garbage"),
            ],
            ..HttpConfig::default()
        };
        let p = problems(&http);
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "http.users[1].name",
                "http.users[2].name",
                "http.users[3].password_hash",
                "http.users[4].password_hash"
            ],
            "{p:?}"
        );
        assert!(p[0].1.contains("listed twice"));
        assert!(p[2].1.contains("outpost passwd"), "{}", p[2].1);
        assert!(problems(&HttpConfig::default()).is_empty());
    }

    #[test]
    fn sessions_and_tls_are_checked() {
        let http = HttpConfig {
            session_idle: HumanDuration::from_secs(3600),
            session_max: HumanDuration::from_secs(60),
            tls_cert_file: Some("/etc/outpost/console.crt".into()),
            ..HttpConfig::default()
        };
        let p = problems(&http);
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["http.session_max", "http.tls_key_file"], "{p:?}");
        let http = HttpConfig {
            session_idle: HumanDuration::from_secs(30 * 86400),
            ..HttpConfig::default()
        };
        assert_eq!(problems(&http)[0].0, "http.session_idle");
    }

    #[test]
    fn loopback_listen_addresses() {
        for (listen, loopback) in [
            ("127.0.0.1:9464", true),
            ("[::1]:9464", true),
            ("127.0.0.2:80", true),
            ("0.0.0.0:9464", false),
            ("192.168.1.10:9464", false),
            ("[::]:9464", false),
            ("nonsense", false),
        ] {
            let http = HttpConfig {
                listen: listen.into(),
                ..HttpConfig::default()
            };
            assert_eq!(http.is_loopback(), loopback, "{listen}");
        }
    }
}
