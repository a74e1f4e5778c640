//! Central sync: readings, alert events and heartbeats to PostgreSQL, usually through
//! PgBouncer in transaction pooling mode.
//!
//! Guarantees:
//! - **Exactly-once effect centrally** (G2). Each batch is uploaded in one transaction
//!   with `INSERT … ON CONFLICT DO NOTHING` keyed on the reading's stable uid; rows are
//!   marked synced locally only after the central commit. A crash, a dropped
//!   connection or a restarted server at any instant leads to a retry, never to a
//!   duplicate or a gap.
//! - **Safe behind PgBouncer in transaction mode** (G6): only unnamed statements
//!   (`query_typed`, `execute_typed`) and `simple_query`, every statement inside an
//!   explicit transaction, `SET LOCAL` only, no `LISTEN`, no session advisory locks.
//! - **Live first**: every interval starts with the readings that arrived since the
//!   previous one, newest first; the backlog drains from the oldest end behind them,
//!   paced by `backlog_rows_per_second`, and yields to the next interval on time.
//! - **Honest time** (G8): readings taken while the clock was not synchronised are held
//!   back until they are corrected or until they have waited `clock_hold_max` (measured
//!   on the monotonic clock, which clock jumps do not move); then they are sent with
//!   their flag and never changed.
//! - **A recovering server is not stampeded**: failures back off exponentially with
//!   full jitter.
//!
//! Files: [`postgres`] (connection, TLS, errors, uploads), [`central`] (the central
//! schema, migrations, partitions), [`local`] (what to send next, marks), [`heartbeat`]
//! (the `outpost.gateways` row).

pub mod central;
pub mod heartbeat;
pub mod integrity;
pub mod local;
pub mod postgres;
mod worker;

pub use postgres::SyncError;
pub use worker::{run, run_in, run_observed, HoldBack, SyncEvent, SyncObserver};

use crate::settings::{HumanDuration, Problems, Secret};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Who this gateway is, as the central rows name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateway {
    /// The `gateway_id` of every row this gateway sends.
    pub gateway_id: String,
    /// The site, shown in the heartbeat row.
    pub site: String,
}

/// What the sync worker works with besides its `[sync]` section.
#[derive(Debug, Clone)]
pub struct SyncContext {
    pub gateway: Gateway,
    pub store: crate::store::Store,
    /// Where central's (or PgBouncer's) certificate is recorded, as `sync`.
    pub certs: crate::tls::CertWatch,
    /// Stamps the heartbeat's and the events' local times.
    pub clock: crate::clock::Clock,
}

/// `[sync]`: replication to the central PostgreSQL. Without this section nothing is
/// sent (readings stay in the local database until retention or the size cap).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Turns sync off without removing the section.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// The central database (or PgBouncer in front of it), as a URL
    /// `postgres://user@host:6432/dbname` or `host=… port=… user=… dbname=…`.
    /// Put the password in `password` / `password_file`, and TLS in `sslmode`, not here.
    pub url: String,
    /// The password; prefer `password_file` (e.g. a systemd credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// `disable` (plain TCP), `require` (encrypted, certificate not checked),
    /// `verify-ca` (certificate signed by the CA) or `verify-full` (also the host name).
    #[serde(default)]
    pub sslmode: SslMode,
    /// PEM file with the CA certificate(s) to trust; default: the system's CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// How often a sync round starts: a heartbeat, the fresh readings, then backlog
    /// until the next round is due. Fresh readings reach central within this interval.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// Readings per upload transaction (1 to 100000).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How fast an old backlog drains behind the fresh readings, in rows per second;
    /// 0 means as fast as central accepts. Keeps a fleet coming back from an outage
    /// from flooding the central server.
    #[serde(default = "default_backlog_rows_per_second")]
    pub backlog_rows_per_second: u64,
    /// Upload transactions in flight at once while a backlog drains, each on its own
    /// connection (1 to 4). The extra connections are opened only when a full batch of
    /// backlog is waiting and closed once it is drained; fresh readings, events and the
    /// heartbeat always use the first connection.
    #[serde(default = "default_backlog_connections")]
    pub backlog_connections: usize,
    /// How long to wait for a connection (TCP, TLS and authentication).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// The longest one upload transaction may take (sent as `SET LOCAL
    /// statement_timeout` and enforced on this side too).
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout: HumanDuration,
    /// The first wait after a failure; it doubles on every further failure...
    #[serde(default = "default_backoff_initial")]
    pub backoff_initial: HumanDuration,
    /// ... up to this.
    #[serde(default = "default_backoff_max")]
    pub backoff_max: HumanDuration,
    /// Waits a random time between 0 and the backoff ("full jitter"), so that gateways
    /// do not all reconnect at the same instant. Turn off only for tests.
    #[serde(default = "default_enabled")]
    pub backoff_jitter: bool,
    /// Readings taken before the clock was synchronised wait up to this long for their
    /// time to be corrected; then they are sent with the CLOCK_UNSYNCED flag as they are.
    #[serde(default = "default_clock_hold_max")]
    pub clock_hold_max: HumanDuration,
}

/// How the connection to central is protected.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    Disable,
    Require,
    VerifyCa,
    #[default]
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

fn default_enabled() -> bool {
    true
}
fn default_interval() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_batch_size() -> usize {
    5000
}
fn default_backlog_rows_per_second() -> u64 {
    20_000
}
/// Two: a second transaction lets central use a second core; measured slightly ahead
/// of one on an unpaced drain (docs/benchmarks.md, "Central sync", session 7).
fn default_backlog_connections() -> usize {
    2
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_statement_timeout() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_backoff_initial() -> HumanDuration {
    HumanDuration::from_secs(1)
}
/// One minute: with full jitter the fleet's retries spread over up to a minute, and a
/// gateway is back at most a minute after central (at 5 minutes, the fleet benchmark's
/// gateways came back up to 250 s after a 60 s outage; docs/reliability.md).
fn default_backoff_max() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_clock_hold_max() -> HumanDuration {
    HumanDuration::from_secs(3600)
}

/// The most connections one gateway opens to drain a backlog: a fleet shares central's
/// (or PgBouncer's) server connections.
const MAX_BACKLOG_CONNECTIONS: usize = 4;

/// The longest URL accepted; anything longer is a paste accident.
const MAX_URL_LEN: usize = 2048;

impl SyncConfig {
    /// Central PostgreSQL (or PgBouncer) as the TLS server sync connects to.
    pub fn tls_endpoint(&self) -> crate::tls::Endpoint {
        crate::tls::Endpoint::new("sync")
            .with_file("sync.ca_file".to_string(), self.ca_file.as_ref())
    }

    /// A configuration with every default, for `outpost central … --url` and tests.
    pub fn with_url(url: impl Into<String>) -> SyncConfig {
        SyncConfig {
            enabled: true,
            url: url.into(),
            password: None,
            sslmode: SslMode::default(),
            ca_file: None,
            interval: default_interval(),
            batch_size: default_batch_size(),
            backlog_rows_per_second: default_backlog_rows_per_second(),
            backlog_connections: default_backlog_connections(),
            connect_timeout: default_connect_timeout(),
            statement_timeout: default_statement_timeout(),
            backoff_initial: default_backoff_initial(),
            backoff_max: default_backoff_max(),
            backoff_jitter: true,
            clock_hold_max: default_clock_hold_max(),
        }
    }

    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if let Err(e) = postgres::parse_url(&self.url) {
            problems.push(format!("{path}.url"), e);
        }
        match (&self.ca_file, self.sslmode) {
            (Some(_), SslMode::Disable | SslMode::Require) => problems.push(
                format!("{path}.ca_file"),
                format!(
                    "is only used with sslmode \"verify-ca\" or \"verify-full\", not {:?}",
                    self.sslmode.as_str()
                ),
            ),
            (Some(file), _) => {
                if let Err(e) = crate::tls::root_store(Some(file), false) {
                    problems.push(format!("{path}.ca_file"), e);
                }
            }
            (None, _) => {}
        }
        let mut range = |key: &str, value: Duration, min: Duration, max: Duration, words: &str| {
            if value < min || value > max {
                problems.push(format!("{path}.{key}"), format!("must be {words}"));
            }
        };
        let s = Duration::from_secs;
        range(
            "interval",
            self.interval.get(),
            s(1),
            s(3600),
            "between 1s and 1h",
        );
        range(
            "connect_timeout",
            self.connect_timeout.get(),
            s(1),
            s(300),
            "between 1s and 5m",
        );
        range(
            "statement_timeout",
            self.statement_timeout.get(),
            s(1),
            s(3600),
            "between 1s and 1h",
        );
        range(
            "backoff_initial",
            self.backoff_initial.get(),
            Duration::from_millis(10),
            s(3600),
            "between 10ms and 1h",
        );
        range(
            "backoff_max",
            self.backoff_max.get(),
            Duration::from_millis(10),
            s(86400),
            "between 10ms and 1d",
        );
        range(
            "clock_hold_max",
            self.clock_hold_max.get(),
            s(0),
            s(30 * 86400),
            "at most 30d",
        );
        if self.backoff_max < self.backoff_initial {
            problems.push(
                format!("{path}.backoff_max"),
                format!(
                    "must not be shorter than backoff_initial ({})",
                    self.backoff_initial
                ),
            );
        }
        if !(1..=100_000).contains(&self.batch_size) {
            problems.push(
                format!("{path}.batch_size"),
                format!("must be between 1 and 100000, found {}", self.batch_size),
            );
        }
        if !(1..=MAX_BACKLOG_CONNECTIONS).contains(&self.backlog_connections) {
            problems.push(
                format!("{path}.backlog_connections"),
                format!(
                    "must be between 1 and {MAX_BACKLOG_CONNECTIONS}, found {}",
                    self.backlog_connections
                ),
            );
        }
        if self.backlog_rows_per_second > 10_000_000 {
            problems.push(
                format!("{path}.backlog_rows_per_second"),
                "must be at most 10000000 (0 means unlimited)",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(value: serde_json::Value) -> Vec<(String, String)> {
        let mut problems = Problems::default();
        if let Some(config) = problems.deserialize::<SyncConfig>(value, "sync") {
            config.validate("sync", &mut problems);
        }
        problems.0
    }

    fn keys(problems: &[(String, String)]) -> Vec<&str> {
        problems.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn defaults_are_valid_and_secure() {
        let problems = check(json!({"url": "postgres://outpost@central.example:6432/fleet"}));
        assert!(problems.is_empty(), "{problems:?}");
        let c: SyncConfig = serde_json::from_value(json!({"url": "postgres://u@h/d"})).unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert!(c.backoff_jitter);
        assert_eq!(c, SyncConfig::with_url("postgres://u@h/d"));
    }

    #[test]
    fn missing_url_is_reported() {
        let problems = check(json!({"interval": "5s"}));
        assert_eq!(keys(&problems), ["sync.url"], "{problems:?}");
        assert!(problems[0].1.contains("required"), "{problems:?}");
    }

    #[test]
    fn wrong_types_and_values_are_all_reported() {
        let problems = check(json!({
            "url": "postgres://u@h/d",
            "batch_size": "many",
            "interval": "soon",
            "sslmode": "verify-maybe",
            "backoff_jitter": "yes",
            "bogus": 1,
        }));
        let mut k = keys(&problems);
        k.sort();
        assert_eq!(
            k,
            [
                "sync.backoff_jitter",
                "sync.batch_size",
                "sync.bogus",
                "sync.interval",
                "sync.sslmode"
            ],
            "{problems:?}"
        );
        let sslmode = &problems
            .iter()
            .find(|(k, _)| k == "sync.sslmode")
            .unwrap()
            .1;
        assert!(sslmode.contains("verify-full"), "{sslmode}");
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let problems = check(json!({
            "url": "postgres://u@h/d",
            "batch_size": 0,
            "interval": "0s",
            "connect_timeout": "1d",
            "statement_timeout": "0s",
            "backoff_initial": "10m",
            "backoff_max": "1m",
            "clock_hold_max": "365d",
            "backlog_rows_per_second": 99_999_999u64,
        }));
        let mut k = keys(&problems);
        k.sort();
        assert_eq!(
            k,
            [
                "sync.backlog_rows_per_second",
                "sync.backoff_max",
                "sync.batch_size",
                "sync.clock_hold_max",
                "sync.connect_timeout",
                "sync.interval",
                "sync.statement_timeout"
            ],
            "{problems:?}"
        );
        let problems = check(json!({"url": "postgres://u@h/d", "batch_size": 1_000_000}));
        assert_eq!(keys(&problems), ["sync.batch_size"]);
        let problems = check(json!({"url": "postgres://u@h/d", "batch_size": -1}));
        assert_eq!(keys(&problems), ["sync.batch_size"]);
    }

    #[test]
    fn backlog_connections_are_bounded() {
        let c: SyncConfig = serde_json::from_value(json!({"url": "postgres://u@h/d"})).unwrap();
        assert_eq!(c.backlog_connections, 2, "the measured default");
        for ok in [1, 4] {
            let problems = check(json!({"url": "postgres://u@h/d", "backlog_connections": ok}));
            assert!(problems.is_empty(), "{ok}: {problems:?}");
        }
        for bad in [
            json!(0),
            json!(5),
            json!(1_000_000),
            json!(-1),
            json!("two"),
            json!(1.5),
        ] {
            let problems = check(json!({"url": "postgres://u@h/d", "backlog_connections": bad}));
            assert_eq!(
                keys(&problems),
                ["sync.backlog_connections"],
                "{bad}: {problems:?}"
            );
        }
        let problems = check(json!({"url": "postgres://u@h/d", "backlog_connections": 9}));
        assert!(problems[0].1.contains("between 1 and 4"), "{problems:?}");
    }

    #[test]
    fn hostile_and_oversized_urls_are_rejected() {
        for url in [
            "",
            "not a url at all",
            "postgres://",
            "mysql://u@h/d",
            "postgres://u@h/d?sslmode=verify-full",
            "host=h user=u sslmode=require",
            "postgres://u@h:99999/d",
            "postgres://u@h/d?options=-c%20search_path%3Devil",
        ] {
            let problems = check(json!({ "url": url }));
            assert_eq!(keys(&problems), ["sync.url"], "{url:?}: {problems:?}");
        }
        let long = format!("postgres://u@h/{}", "d".repeat(5000));
        let problems = check(json!({ "url": long }));
        assert_eq!(keys(&problems), ["sync.url"]);
        assert!(problems[0].1.contains("longer"), "{problems:?}");
    }

    #[test]
    fn ca_file_must_match_the_mode_and_hold_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let problems = check(json!({"url": "postgres://u@h/d", "ca_file": missing}));
        assert_eq!(keys(&problems), ["sync.ca_file"]);
        assert!(problems[0].1.contains("cannot read"), "{problems:?}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "this is not PEM\n").unwrap();
        let problems = check(json!({"url": "postgres://u@h/d", "ca_file": garbage}));
        assert_eq!(keys(&problems), ["sync.ca_file"]);
        assert!(problems[0].1.contains("no PEM certificate"), "{problems:?}");
        let problems =
            check(json!({"url": "postgres://u@h/d", "sslmode": "disable", "ca_file": garbage}));
        assert_eq!(keys(&problems), ["sync.ca_file"]);
        assert!(problems[0].1.contains("only used"), "{problems:?}");
    }

    #[test]
    fn the_password_is_never_printed() {
        let c: SyncConfig =
            serde_json::from_value(json!({"url": "postgres://u@h/d", "password": "hunter2"}))
                .unwrap();
        let printed = toml::to_string(&c).unwrap();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
