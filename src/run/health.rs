//! `/health`: is this gateway doing its job? 200 when every check passes, 503 with the
//! reasons otherwise. Checks: the store accepts writes (the writer answered a probe
//! recently and the disk is not full), and each source was heard from recently or
//! reports itself connected, and no TLS certificate (configured or presented) has expired (one
//! expiring within 30 days is reported but still ok). Peers are checked too: a source
//! that cannot reach its broker is unhealthy with the broker's error; `sync` fails
//! while central sync rounds fail (with the last error and the backlog) and
//! `notifications` while pending notifications fail to be delivered (with the last
//! error). Each clears as soon as the peer answers again. The `clock` check is
//! informational (always ok): synchronised or not, and a recent step of the wall clock.
//! The `progress` check (G9) fails while a stage is stalled and names it.

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::tls::CertWatch;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Progress evidence shared by the watchdog and `/health`.
#[derive(Debug)]
pub struct Liveness {
    /// Monotonic origin of the timestamps below (a wall-clock step does not make the
    /// store look stuck or fresh).
    origin: std::time::Instant,
    /// Milliseconds after `origin` (plus one) when the store writer last completed a
    /// probe write; 0 before the first.
    last_store_ok_ms: AtomicI64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            origin: std::time::Instant::now(),
            last_store_ok_ms: AtomicI64::new(0),
        }
    }
}

impl Liveness {
    pub fn store_ok(&self) {
        let ms = self.origin.elapsed().as_millis() as i64 + 1;
        self.last_store_ok_ms.store(ms, Relaxed);
    }

    /// Since the last successful probe write (monotonic).
    pub fn store_probe_age(&self) -> Option<Duration> {
        match self.last_store_ok_ms.load(Relaxed) {
            0 => None,
            ms => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms as u64 - 1)),
            ),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct HealthReport {
    pub status: &'static str,
    pub checks: Vec<Check>,
}

impl HealthReport {
    pub fn healthy(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// What a source looks like from outside.
#[derive(Debug, Clone)]
pub struct SourceView {
    pub name: String,
    /// Since the last reading was received (None: never, or not since start).
    pub silent_for: Option<Duration>,
    pub connected: Option<bool>,
}

/// Everything `/health` decides on, gathered so the decision is a pure function.
#[derive(Debug, Clone)]
pub struct HealthInputs {
    pub store_probe_age: Option<Duration>,
    pub disk_full: bool,
    pub uptime: Duration,
    pub sources: Vec<SourceView>,
}

/// How stale the last store probe may be before the store counts as stuck.
pub const STORE_PROBE_BOUND: Duration = Duration::from_secs(20);

pub fn evaluate(inputs: &HealthInputs, source_max_silence: Duration) -> HealthReport {
    let mut checks = Vec::new();
    let store = match (inputs.store_probe_age, inputs.disk_full) {
        (_, true) => (false, "the disk is full: readings are refused".to_string()),
        (Some(age), false) if age <= STORE_PROBE_BOUND => {
            (true, format!("writable (probe {}ms ago)", age.as_millis()))
        }
        (Some(age), false) => (
            false,
            format!("the store writer has not answered for {}s", age.as_secs()),
        ),
        (None, false) if inputs.uptime <= STORE_PROBE_BOUND => (true, "starting".to_string()),
        (None, false) => (false, "the store writer has never answered".to_string()),
    };
    checks.push(Check {
        name: "store".into(),
        ok: store.0,
        detail: store.1,
    });
    for s in &inputs.sources {
        let bound = humantime::format_duration(source_max_silence);
        let (ok, detail) = match (s.connected, s.silent_for) {
            (Some(true), _) => (true, "connected".to_string()),
            (connected, Some(age)) if age <= source_max_silence => (
                true,
                format!(
                    "{}last reading {}s ago",
                    if connected == Some(false) {
                        "disconnected; "
                    } else {
                        ""
                    },
                    age.as_secs()
                ),
            ),
            (connected, Some(age)) => (
                false,
                format!(
                    "silent for {} (bound {bound}){}",
                    humantime::format_duration(Duration::from_secs(age.as_secs())),
                    if connected == Some(false) {
                        "; disconnected"
                    } else {
                        ""
                    }
                ),
            ),
            (connected, None) if inputs.uptime <= source_max_silence => (
                true,
                if connected == Some(false) {
                    "connecting"
                } else {
                    "no reading yet"
                }
                .to_string(),
            ),
            (_, None) => (false, format!("no reading since start (bound {bound})")),
        };
        checks.push(Check {
            name: format!("source:{}", s.name),
            ok,
            detail,
        });
    }
    let status = if checks.iter().all(|c| c.ok) {
        "ok"
    } else {
        "unhealthy"
    };
    HealthReport { status, checks }
}

/// Gathers the inputs from the running agent.
pub struct HealthProbe {
    pub store: Store,
    pub metrics: Metrics,
    /// The certificates' expiry (the pipeline's one watch).
    pub certs: CertWatch,
    /// The agent's wall clock.
    pub clock: Clock,
    pub liveness: Arc<Liveness>,
    /// Configured source names (updated on reload).
    pub sources: std::sync::Mutex<Vec<String>>,
    pub started: std::time::Instant,
    pub source_max_silence: Duration,
    /// `http.stall_after`: see [`progress_check`].
    pub stall_after: Duration,
    /// Central sync is configured and enabled (updated on reload): `/health` then has
    /// a `sync` check.
    pub sync_enabled: AtomicBool,
    /// `[[devices]] calibration_due`: the informational `calibration` check.
    pub calibrations: crate::run::reports::Calibrations,
}

/// What `/health` reads from the database besides the sources.
#[derive(Debug, Default)]
struct StoredState {
    last_heard: HashMap<String, i64>,
    sync: Option<(crate::sync::local::SyncState, crate::store::BacklogSummary)>,
    outbox: Option<OutboxView>,
}

fn read_stored_state(conn: &rusqlite::Connection, sync: bool) -> rusqlite::Result<StoredState> {
    let mut stmt = conn.prepare("SELECT source, MAX(received_at) FROM series GROUP BY source")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let last_heard = rows.collect::<rusqlite::Result<HashMap<_, _>>>()?;
    let sync = if sync {
        Some((
            crate::sync::local::read_state(conn)?,
            crate::store::backlog(conn)?,
        ))
    } else {
        None
    };
    Ok(StoredState {
        last_heard,
        sync,
        outbox: OutboxView::read(conn)?,
    })
}

/// The notification outbox as `/health` sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxView {
    pub pending: i64,
    /// Pending notifications whose delivery failed at least once.
    pub failing: i64,
    pub oldest_pending: Option<chrono::DateTime<chrono::Utc>>,
    /// (notifier, attempts, error) of the newest failing notification.
    pub last_error: Option<(String, i64, String)>,
    pub expired: i64,
    pub failed: i64,
}

impl OutboxView {
    /// `None` when there is no outbox or it never held a notification.
    pub fn read(conn: &rusqlite::Connection) -> rusqlite::Result<Option<OutboxView>> {
        use rusqlite::OptionalExtension;
        let used: bool = conn.query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'outbox'",
            [],
            |r| r.get(0),
        )? && conn
            .query_row("SELECT EXISTS (SELECT 1 FROM outbox)", [], |r| r.get(0))?;
        if !used {
            return Ok(None);
        }
        let (pending, failing, oldest): (i64, i64, Option<i64>) = conn.query_row(
            "SELECT COUNT(*), COALESCE(SUM(attempts > 0), 0), MIN(created_at) \
             FROM outbox WHERE state = 'pending'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let last_error = conn
            .query_row(
                "SELECT notifier, attempts, last_error FROM outbox \
                 WHERE state = 'pending' AND attempts > 0 AND last_error IS NOT NULL \
                 ORDER BY id DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let count = |state: &str| -> rusqlite::Result<i64> {
            conn.query_row(
                "SELECT COUNT(*) FROM outbox WHERE state = ?1",
                [state],
                |r| r.get(0),
            )
        };
        Ok(Some(OutboxView {
            pending,
            failing,
            oldest_pending: oldest.map(crate::model::from_micros),
            last_error,
            expired: count("expired")?,
            failed: count("failed")?,
        }))
    }
}

/// `sync`: failing while the last round failed, with its error; the backlog either way.
pub fn sync_check(
    sync: &crate::sync::local::SyncState,
    backlog: &crate::store::BacklogSummary,
    now: chrono::DateTime<chrono::Utc>,
) -> Check {
    use crate::display::age;
    let backlog_text = match backlog.oldest_received_at {
        Some(oldest) => format!(
            "backlog {} readings, oldest {} old",
            backlog.rows,
            age(now, oldest)
        ),
        None => "no backlog".to_string(),
    };
    let last_round = match sync.last_sync_at {
        Some(t) => format!("last completed round {} ago", age(now, t)),
        None => "no round completed yet".to_string(),
    };
    let (ok, detail) = match (&sync.last_error, sync.failing) {
        (Some(error), true) => (
            false,
            format!("failing: {error}; {last_round}; {backlog_text}"),
        ),
        _ if sync.last_sync_at.is_none() => (true, format!("starting; {backlog_text}")),
        _ => (true, format!("{last_round}; {backlog_text}")),
    };
    Check {
        name: "sync".into(),
        ok,
        detail,
    }
}

/// `notifications`: failing while a pending notification could not be delivered.
/// Expired and permanently failed ones are mentioned (they need a person) but do not
/// fail the check for ever: `outpost status` lists them.
pub fn notifications_check(outbox: &OutboxView, now: chrono::DateTime<chrono::Utc>) -> Check {
    use crate::display::age;
    let mut detail = match (&outbox.last_error, outbox.oldest_pending) {
        (Some((notifier, attempts, error)), _) if outbox.failing > 0 => format!(
            "{} of {} pending failing; last error ({notifier}, {attempts} attempt{}): {error}",
            outbox.failing,
            outbox.pending,
            if *attempts == 1 { "" } else { "s" }
        ),
        (_, Some(oldest)) => format!(
            "{} pending, oldest {} old",
            outbox.pending,
            age(now, oldest)
        ),
        _ => "none pending".to_string(),
    };
    if outbox.expired > 0 || outbox.failed > 0 {
        detail.push_str(&format!(
            "; {} expired and {} failed permanently (see outpost status)",
            outbox.expired, outbox.failed
        ));
    }
    Check {
        name: "notifications".into(),
        ok: outbox.failing == 0,
        detail,
    }
}

/// A source that cannot reach its broker is unhealthy, whatever its last reading.
pub fn mark_disconnected(
    check: &mut Check,
    error: &crate::metrics::ConnectionError,
    now: chrono::DateTime<chrono::Utc>,
) {
    check.ok = false;
    // The silence check already said "disconnected"; this says it with the error.
    let rest = check
        .detail
        .strip_prefix("disconnected; ")
        .unwrap_or(&check.detail);
    check.detail = format!(
        "disconnected for {}: {}; {rest}",
        crate::display::age(now, error.since),
        error.error,
    );
}

impl HealthProbe {
    pub async fn report(&self) -> HealthReport {
        let now = self.clock.now();
        let store = self.store.clone();
        let sync_enabled = self.sync_enabled.load(Relaxed);
        // Last reading per source from the per-series summary (never a table scan),
        // the sync state and the outbox.
        let stored: StoredState = tokio::task::spawn_blocking(move || {
            let conn = store.reader()?;
            read_stored_state(&conn, sync_enabled)
        })
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
        let last_heard = &stored.last_heard;
        let started_at =
            now - chrono::Duration::from_std(self.started.elapsed()).unwrap_or_default();
        let names = self.sources.lock().map(|n| n.clone()).unwrap_or_default();
        let sources = names
            .iter()
            .map(|name| {
                let heard = last_heard
                    .get(name)
                    .map(|&us| crate::model::from_micros(us))
                    // Readings from before this start say nothing about now.
                    .filter(|t| *t >= started_at - chrono::Duration::seconds(1));
                SourceView {
                    name: name.clone(),
                    silent_for: heard.map(|t| (now - t).to_std().unwrap_or_default()),
                    connected: self.metrics.connected(name),
                }
            })
            .collect();
        let inputs = HealthInputs {
            store_probe_age: self.liveness.store_probe_age(),
            disk_full: self.store.stats().disk_full.load(Relaxed),
            uptime: self.started.elapsed(),
            sources,
        };
        let mut report = evaluate(&inputs, self.source_max_silence);
        for name in &names {
            if self.metrics.connected(name) != Some(false) {
                continue;
            }
            let check_name = format!("source:{name}");
            let check = report.checks.iter_mut().find(|c| c.name == check_name);
            if let (Some(check), Some(error)) = (check, self.metrics.connection_error(name)) {
                mark_disconnected(check, &error, now);
            }
        }
        if let Some((sync, backlog)) = &stored.sync {
            report.checks.push(sync_check(sync, backlog, now));
        }
        if let Some(outbox) = &stored.outbox {
            report.checks.push(notifications_check(outbox, now));
        }
        report.checks.push(progress_check(
            &self.store.progress().evaluate(self.stall_after),
        ));
        if !report.healthy() {
            report.status = "unhealthy";
        }
        report.checks.push(clock_check(
            now,
            crate::clock::is_synchronized(),
            crate::clock::last_step(),
        ));
        if let Some((ok, detail)) =
            crate::run::reports::calibration_check(&self.calibrations.all(now))
        {
            report.checks.push(Check {
                name: "calibration".into(),
                ok,
                detail,
            });
        }
        if let Some(check) = certificates_check(&self.certs.snapshot(), now) {
            if !check.ok {
                report.status = "unhealthy";
            }
            report.checks.push(check);
        }
        report
    }
}

/// `progress` (G9): fails while a stage is stalled — work waiting for it, no progress
/// for `http.stall_after`, no known reason — and names each stalled stage with what
/// waits. A stage waiting for a stalled or blocked stage is mentioned, not blamed.
pub fn progress_check(stages: &[crate::progress::StageReport]) -> Check {
    use crate::progress::StageState;
    let stalled: Vec<String> = stages
        .iter()
        .filter(|s| s.stalled())
        .map(|s| format!("{} ({})", s.stage, s.describe()))
        .collect();
    let waiting: Vec<String> = stages
        .iter()
        .filter_map(|s| match &s.state {
            StageState::WaitingFor { stage, .. } => Some(format!("{} waits for {stage}", s.stage)),
            StageState::Blocked { reason } => Some(format!("{}: {reason}", s.stage)),
            _ => None,
        })
        .collect();
    let mut detail = if stalled.is_empty() {
        "every stage is keeping up".to_string()
    } else {
        format!("STALLED: {}", stalled.join("; "))
    };
    if !waiting.is_empty() {
        detail.push_str(&format!(" ({})", waiting.join("; ")));
    }
    Check {
        name: "progress".into(),
        ok: stalled.is_empty(),
        detail,
    }
}

/// The `clock` check: whether the clock is synchronised and any recent step. It never
/// fails the report: an unsynchronised clock is handled (readings are flagged and held
/// back, G8) and a step is over once it happened; both are shown so a person can see
/// why timestamps look odd.
pub fn clock_check(
    now: chrono::DateTime<chrono::Utc>,
    synchronized: bool,
    last_step: Option<crate::clock::ClockStep>,
) -> Check {
    let mut detail = if synchronized {
        "synchronised".to_string()
    } else {
        "not synchronised (local readings are flagged)".to_string()
    };
    if let Some(step) = last_step.filter(|s| s.is_recent(now)) {
        detail.push_str("; clock ");
        detail.push_str(&step.describe());
    }
    Check {
        name: "clock".into(),
        ok: true,
        detail,
    }
}

/// The `certificates` check: informational, from what the watch recorded.
fn certificates_check(
    certs: &[(String, crate::tls::CertInfo)],
    now: chrono::DateTime<chrono::Utc>,
) -> Option<Check> {
    crate::tls::certificates_health(certs, now).map(|h| Check {
        name: "certificates".into(),
        ok: h.ok,
        detail: h.detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(sources: Vec<SourceView>) -> HealthInputs {
        HealthInputs {
            store_probe_age: Some(Duration::from_secs(1)),
            disk_full: false,
            uptime: Duration::from_secs(7200),
            sources,
        }
    }

    fn source(silent: Option<u64>, connected: Option<bool>) -> SourceView {
        SourceView {
            name: "s".into(),
            silent_for: silent.map(Duration::from_secs),
            connected,
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn the_clock_check_shows_a_recent_step_and_never_fails() {
        let now = chrono::Utc::now();
        let step = crate::clock::ClockStep {
            at: now - chrono::Duration::seconds(30),
            seconds: -3600.0,
        };
        let c = clock_check(now, true, Some(step.clone()));
        assert!(c.ok);
        assert!(
            c.detail
                .starts_with("synchronised; clock stepped back by 1h at "),
            "{c:?}"
        );
        let later = now + chrono::Duration::hours(1);
        assert_eq!(
            clock_check(later, false, Some(step)).detail,
            "not synchronised (local readings are flagged)"
        );
    }

    #[test]
    fn a_disconnected_source_says_so_within_its_bound() {
        let r = evaluate(&inputs(vec![source(Some(10), Some(false))]), HOUR);
        assert!(r.healthy());
        assert_eq!(r.checks[1].detail, "disconnected; last reading 10s ago");
    }

    #[test]
    fn healthy_when_store_answers_and_sources_speak() {
        let r = evaluate(&inputs(vec![source(Some(10), None)]), HOUR);
        assert!(r.healthy(), "{r:?}");
        assert_eq!(r.status, "ok");
    }

    #[test]
    fn a_silent_source_is_unhealthy_unless_connected() {
        let r = evaluate(&inputs(vec![source(Some(7200), None)]), HOUR);
        assert!(!r.healthy());
        assert!(
            r.checks[1].detail.contains("silent for 2h"),
            "{:?}",
            r.checks[1]
        );
        // A connected LoRaWAN source may simply have quiet sensors.
        assert!(evaluate(&inputs(vec![source(Some(7200), Some(true))]), HOUR).healthy());
        let never = evaluate(&inputs(vec![source(None, Some(false))]), HOUR);
        assert!(!never.healthy());
    }

    #[test]
    fn a_new_start_gets_grace_and_a_stuck_store_does_not() {
        let mut i = inputs(vec![source(None, Some(false))]);
        i.uptime = Duration::from_secs(5);
        i.store_probe_age = None;
        let r = evaluate(&i, HOUR);
        assert!(r.healthy(), "{r:?}");
        i.uptime = Duration::from_secs(600);
        i.store_probe_age = Some(Duration::from_secs(120));
        let r = evaluate(&i, HOUR);
        assert!(!r.checks[0].ok);
        i.store_probe_age = Some(Duration::from_secs(1));
        i.disk_full = true;
        assert!(!evaluate(&i, HOUR).checks[0].ok);
    }

    #[test]
    fn sync_fails_while_rounds_fail_and_clears_after() {
        use crate::store::BacklogSummary;
        use crate::sync::local::SyncState;
        let now = chrono::Utc::now();
        let backlog = BacklogSummary {
            rows: 120,
            oldest_received_at: Some(now - chrono::Duration::seconds(30)),
        };
        let failing = SyncState {
            last_sync_at: Some(now - chrono::Duration::seconds(31)),
            last_error: Some("central PostgreSQL: connection refused".into()),
            last_error_at: Some(now - chrono::Duration::seconds(1)),
            failing: true,
        };
        let c = sync_check(&failing, &backlog, now);
        assert!(!c.ok);
        assert_eq!(
            c.detail,
            "failing: central PostgreSQL: connection refused; last completed round 31s ago; \
             backlog 120 readings, oldest 30s old"
        );
        let recovered = SyncState {
            last_sync_at: Some(now),
            failing: false,
            ..failing
        };
        let c = sync_check(&recovered, &BacklogSummary::default(), now);
        assert!(c.ok, "{c:?}");
        assert_eq!(c.detail, "last completed round 0s ago; no backlog");
        let c = sync_check(&SyncState::default(), &BacklogSummary::default(), now);
        assert!(c.ok && c.detail.starts_with("starting"), "{c:?}");
    }

    #[test]
    fn notifications_fail_while_a_pending_one_fails() {
        let now = chrono::Utc::now();
        let mut outbox = OutboxView {
            pending: 2,
            failing: 1,
            oldest_pending: Some(now - chrono::Duration::seconds(5)),
            last_error: Some(("mail".into(), 3, "connection refused".into())),
            expired: 0,
            failed: 0,
        };
        let c = notifications_check(&outbox, now);
        assert!(!c.ok);
        assert_eq!(
            c.detail,
            "1 of 2 pending failing; last error (mail, 3 attempts): connection refused"
        );
        outbox.failing = 0;
        outbox.expired = 1;
        let c = notifications_check(&outbox, now);
        assert!(c.ok);
        assert_eq!(
            c.detail,
            "2 pending, oldest 5s old; 1 expired and 0 failed permanently (see outpost status)"
        );
    }

    #[test]
    fn the_progress_check_names_stalled_stages_only() {
        use crate::progress::{StageReport, StageState};
        let stage = |name: &str, state: StageState, waiting: u64| StageReport {
            stage: name.into(),
            state,
            waiting,
            what: "batches".into(),
            since_progress_s: Some(7.5),
            quiet_s: 7.5,
            downstream: None,
        };
        let c = progress_check(&[
            stage("outbox", StageState::Idle, 0),
            stage("store", StageState::Working, 2),
        ]);
        assert!(c.ok);
        assert_eq!(c.detail, "every stage is keeping up");
        let c = progress_check(&[
            stage(
                "source:a",
                StageState::WaitingFor {
                    stage: "store".into(),
                    reason: "stalled".into(),
                },
                1,
            ),
            stage("store", StageState::Stalled, 2),
        ]);
        assert!(!c.ok);
        assert_eq!(
            c.detail,
            "STALLED: store (2 batches waiting, no progress for 7s) (source:a waits for store)"
        );
        let c = progress_check(&[stage(
            "store",
            StageState::Blocked {
                reason: "the disk is full".into(),
            },
            3,
        )]);
        assert!(
            c.ok,
            "a full disk is reported by the store check, not as a stall"
        );
        assert_eq!(
            c.detail,
            "every stage is keeping up (store: the disk is full)"
        );
    }

    #[test]
    fn a_disconnected_source_is_unhealthy_with_the_broker_error() {
        let now = chrono::Utc::now();
        let r = evaluate(&inputs(vec![source(Some(3), Some(false))]), HOUR);
        let mut check = r.checks[1].clone();
        assert!(check.ok, "a recent reading alone keeps it ok: {check:?}");
        mark_disconnected(
            &mut check,
            &crate::metrics::ConnectionError {
                error: "I/O: Connection refused (os error 111)".into(),
                since: now - chrono::Duration::seconds(12),
            },
            now,
        );
        assert!(!check.ok);
        assert_eq!(
            check.detail,
            "disconnected for 12s: I/O: Connection refused (os error 111); last reading 3s ago"
        );
    }
}
