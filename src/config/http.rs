//! `[http]`: where `/metrics` and `/health` are served and when a stage counts as
//! stalled. The section sits here, not beside the server (`crate::run::http`), because
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
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: default_listen(),
            source_max_silence: default_source_max_silence(),
            stall_after: default_stall_after(),
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
    }
}
