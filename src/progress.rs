//! Progress of every stage of the pipeline (G9: it keeps working, or it says so).
//!
//! Each stage — each source, the store writer, the alert engine, the notification
//! outbox, central sync — holds a [`Stage`] from the one [`Registry`] (kept by the
//! store, which every component holds) and reports two things:
//! - **progress**: it finished a piece of work (a commit, a batch of readings
//!   evaluated, a delivery attempt, an upload);
//! - **work waiting** for it: a count it sets, plus *probes* the registry reads when it
//!   evaluates (e.g. the depth of a channel, which a hung stage cannot report itself).
//!
//! A stage with work waiting, no progress for `http.stall_after` and no *known reason*
//! is **stalled**. Known reasons are conditions that are reported elsewhere and are not
//! the stage's fault: a full disk ([`Stage::blocked_by`]), or a stalled or blocked
//! stage it hands its work to (its *downstream*: a source waits for the store). Only
//! the stage where the wait starts is named. Sources whose broker or port is gone have
//! no readings in hand, so they are not waiting; sync and the outbox count a failed
//! attempt as an answer (the existing `sync` and `notifications` checks report it).
//!
//! | stage | work waiting | progress | not a stall |
//! |---|---|---|---|
//! | `store` | batches and writes queued for the writer (channel depth, probed) or in hand | a commit (answered, even with an error) | the disk is full (until a batch is stored) |
//! | `source:<name>` | MQTT: messages in the hand-off queue (probed); serial, Modbus: batches awaiting their commit; simulated: the batch in hand | a commit of its readings (by the writer); MQTT: messages taken off the hand-off queue | waiting for a stalled or blocked store; no broker or port means nothing in hand |
//! | `alerts` | committed readings beyond the engine's position (probed) | a batch of readings evaluated | waiting for the store |
//! | `outbox` | deliveries still running a second after their own attempt timeout (probed) | an attempt recorded, delivered or not | a notifier failing or slow within its timeout |
//! | `sync` | a round under way, except while waiting for central or pacing the backlog | central answered; a round completed | central unreachable or slow within the connect and statement timeouts |
//!
//! Times are taken from the monotonic clock (`std::time::Instant`), so a wall-clock
//! step neither fakes nor hides a stall. The hot path is atomics only; probes and the
//! blocked reason are read at evaluation time (about once a second).
//!
//! Whoever evaluates ([`Registry::evaluate`]): `/health` (503 naming the stage),
//! `/metrics` (`outpost_stage_*` gauges), the supervisor in [`crate::systemd`] (one
//! ERROR line per stall, the watchdog not fed, the state saved beside the database
//! for `outpost status`: see [`save`] and [`load_saved`]).
//!
//! [`fault`] is the test-only switch that makes a stage hang (compiled out of release
//! builds).

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// `http.stall_after` when not configured.
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(120);

/// Well-known stage names (sources are `source:<name>`).
pub const STORE: &str = "store";
pub const ALERTS: &str = "alerts";
pub const OUTBOX: &str = "outbox";
pub const SYNC: &str = "sync";

/// The stage name of the source `name`.
pub fn source_stage(name: &str) -> String {
    format!("source:{name}")
}

/// A probe: the amount of work waiting that it sees, or `None` once what it watches
/// is gone (the probe is then dropped).
pub type Probe = Box<dyn Fn() -> Option<u64> + Send + Sync>;

/// All stages of the running agent. Stages are held weakly: a stage whose component
/// ended disappears.
pub struct Registry {
    stages: Mutex<Vec<Weak<StageInner>>>,
    /// `http.stall_after` in milliseconds, for evaluators without the configuration.
    stall_after_ms: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            stages: Mutex::default(),
            stall_after_ms: AtomicU64::new(DEFAULT_STALL_AFTER.as_millis() as u64),
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

struct StageInner {
    name: String,
    /// What waits for this stage, for people: "readings not yet stored".
    what: &'static str,
    /// The stage this one hands its work to; a stall there is not a stall here.
    downstream: Option<&'static str>,
    origin: Instant,
    /// Milliseconds after `origin`, plus one, of the last progress (0: never).
    last_progress_ms: AtomicU64,
    /// Milliseconds after `origin`, plus one, since which work has been waiting (0:
    /// none waiting).
    waiting_since_ms: AtomicU64,
    /// Work waiting as counted by the stage itself.
    waiting: AtomicU64,
    blocked: AtomicBool,
    blocked_reason: Mutex<Option<String>>,
    probes: Mutex<Vec<Probe>>,
}

impl StageInner {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64 + 1
    }
}

/// One stage's handle; cheap to clone. The stage is registered as long as a handle
/// lives.
#[derive(Clone)]
pub struct Stage(Arc<StageInner>);

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Stage").field(&self.0.name).finish()
    }
}

impl Registry {
    /// Sets `http.stall_after` (at start; it changes only at restart).
    pub fn set_stall_after(&self, stall_after: Duration) {
        self.stall_after_ms
            .store(stall_after.as_millis() as u64, Relaxed);
    }

    pub fn stall_after(&self) -> Duration {
        Duration::from_millis(self.stall_after_ms.load(Relaxed))
    }

    /// The live stage called `name`, or a new one. `what` names the work that waits for
    /// it; `downstream` the stage it hands work to.
    pub fn stage(&self, name: &str, what: &'static str, downstream: Option<&'static str>) -> Stage {
        let mut stages = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        stages.retain(|w| w.strong_count() > 0);
        if let Some(existing) = stages
            .iter()
            .filter_map(Weak::upgrade)
            .find(|s| s.name == name)
        {
            return Stage(existing);
        }
        let inner = Arc::new(StageInner {
            name: name.to_string(),
            what,
            downstream,
            origin: Instant::now(),
            last_progress_ms: AtomicU64::new(0),
            waiting_since_ms: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            blocked: AtomicBool::new(false),
            blocked_reason: Mutex::new(None),
            probes: Mutex::new(Vec::new()),
        });
        stages.push(Arc::downgrade(&inner));
        Stage(inner)
    }

    /// Records progress of the live stage `name`, if there is one (the store writer
    /// does this for the source of every batch it commits).
    pub fn progress_of(&self, name: &str) {
        let stages = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        for s in stages.iter().filter_map(Weak::upgrade) {
            if s.name == name {
                Stage(s).progress();
            }
        }
    }

    fn live(&self) -> Vec<Arc<StageInner>> {
        let mut stages = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        stages.retain(|w| w.strong_count() > 0);
        stages.iter().filter_map(Weak::upgrade).collect()
    }

    /// Every live stage's state, sorted by name.
    pub fn evaluate(&self, stall_after: Duration) -> Vec<StageReport> {
        let mut reports: Vec<StageReport> = self
            .live()
            .iter()
            .map(|s| evaluate_one(s, stall_after))
            .collect();
        reports.sort_by(|a, b| a.stage.cmp(&b.stage));
        // Only the stage where the wait starts is stalled.
        let troubled: Vec<(String, String)> = reports
            .iter()
            .filter_map(|r| match &r.state {
                StageState::Stalled => Some((r.stage.clone(), "stalled".to_string())),
                StageState::Blocked { reason } => Some((r.stage.clone(), reason.clone())),
                _ => None,
            })
            .collect();
        for r in &mut reports {
            if r.state != StageState::Stalled {
                continue;
            }
            let Some(down) = &r.downstream else { continue };
            if let Some((stage, reason)) = troubled.iter().find(|(s, _)| s == down) {
                r.state = StageState::WaitingFor {
                    stage: stage.clone(),
                    reason: reason.clone(),
                };
            }
        }
        reports
    }
}

fn evaluate_one(s: &Arc<StageInner>, stall_after: Duration) -> StageReport {
    let mut waiting = s.waiting.load(Relaxed);
    {
        let mut probes = s.probes.lock().unwrap_or_else(|e| e.into_inner());
        probes.retain(|p| match p() {
            Some(n) => {
                waiting = waiting.saturating_add(n);
                true
            }
            None => false,
        });
    }
    let now = s.now_ms();
    if waiting == 0 {
        s.waiting_since_ms.store(0, Relaxed);
    } else {
        let _ = s
            .waiting_since_ms
            .compare_exchange(0, now, Relaxed, Relaxed);
    }
    let last = s.last_progress_ms.load(Relaxed);
    let since_progress = (last > 0).then(|| Duration::from_millis(now.saturating_sub(last)));
    let waiting_since = s.waiting_since_ms.load(Relaxed);
    // The clock of a stall starts at the later of the last progress and the moment
    // work began to wait: an idle stage is not late when work arrives.
    let quiet = Duration::from_millis(now.saturating_sub(last.max(waiting_since)));
    let blocked = if s.blocked.load(Relaxed) {
        s.blocked_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    } else {
        None
    };
    let state = match blocked {
        Some(reason) => StageState::Blocked { reason },
        None if waiting == 0 => StageState::Idle,
        None if quiet >= stall_after => StageState::Stalled,
        None => StageState::Working,
    };
    StageReport {
        stage: s.name.clone(),
        state,
        waiting,
        what: s.what.to_string(),
        since_progress_s: since_progress.map(|d| d.as_secs_f64()),
        quiet_s: if waiting > 0 {
            quiet.as_secs_f64()
        } else {
            0.0
        },
        downstream: s.downstream.map(str::to_string),
    }
}

impl Stage {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// A piece of work is done.
    pub fn progress(&self) {
        self.0.last_progress_ms.store(self.0.now_ms(), Relaxed);
    }

    /// Sets the work waiting as counted by the stage (probes add to it).
    pub fn set_waiting(&self, n: u64) {
        self.0.waiting.store(n, Relaxed);
        self.note_waiting(n);
    }

    /// `n` more pieces of work are waiting.
    pub fn add_waiting(&self, n: u64) {
        let total = self.0.waiting.fetch_add(n, Relaxed).saturating_add(n);
        self.note_waiting(total);
    }

    /// `n` pieces of work left (done or given up); not progress by itself.
    pub fn remove_waiting(&self, n: u64) {
        let before = self
            .0
            .waiting
            .fetch_update(Relaxed, Relaxed, |w| Some(w.saturating_sub(n)))
            .unwrap_or(0);
        if before <= n {
            self.note_waiting(0);
        }
    }

    /// Holds `n` pieces of work until the guard is dropped (it removes them); call
    /// [`Hold::done`] when they were finished, which also counts as progress.
    pub fn hold(&self, n: u64) -> Hold {
        self.add_waiting(n);
        Hold {
            stage: self.clone(),
            n,
        }
    }

    fn note_waiting(&self, total: u64) {
        if total > 0 {
            let _ = self
                .0
                .waiting_since_ms
                .compare_exchange(0, self.0.now_ms(), Relaxed, Relaxed);
        } else {
            // Probes may still see work: the next evaluation starts the clock again.
            self.0.waiting_since_ms.store(0, Relaxed);
        }
    }

    /// Adds a probe of waiting work, read at each evaluation until it returns `None`.
    pub fn add_probe(&self, probe: Probe) {
        self.0
            .probes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(probe);
    }

    /// The stage cannot make progress for a known, reported reason (e.g. the disk is
    /// full): not a stall.
    pub fn blocked_by(&self, reason: &str) {
        let mut current = self
            .0
            .blocked_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if current.as_deref() != Some(reason) {
            *current = Some(reason.to_string());
        }
        self.0.blocked.store(true, Relaxed);
    }

    /// The known reason is gone (cheap when there was none).
    pub fn unblock(&self) {
        if self.0.blocked.swap(false, Relaxed) {
            *self
                .0
                .blocked_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

/// Work held by a stage: see [`Stage::hold`].
#[must_use = "the work stays counted while the guard lives"]
pub struct Hold {
    stage: Stage,
    n: u64,
}

impl Hold {
    /// The work is finished: progress.
    pub fn done(self) {
        self.stage.progress();
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.stage.remove_waiting(self.n);
    }
}

/// What a stage is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum StageState {
    /// Nothing waits for it.
    Idle,
    /// Work waits and it made progress within `stall_after`.
    Working,
    /// It cannot go on for a known, reported reason.
    Blocked { reason: String },
    /// It would be stalled, but the stage it hands work to is stalled or blocked.
    WaitingFor { stage: String, reason: String },
    /// Work waits, no progress for `stall_after`, no known reason.
    Stalled,
}

/// One stage as `/health`, `/metrics`, the log and `outpost status` see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageReport {
    pub stage: String,
    #[serde(flatten)]
    pub state: StageState,
    /// Work waiting (0 when idle).
    pub waiting: u64,
    /// What waits: "readings not yet stored", …
    pub what: String,
    /// Seconds since the last progress (`None`: none since the agent started).
    pub since_progress_s: Option<f64>,
    /// Seconds without progress while work waited (0 when idle).
    pub quiet_s: f64,
    pub downstream: Option<String>,
}

impl StageReport {
    pub fn stalled(&self) -> bool {
        self.state == StageState::Stalled
    }

    /// "3 readings not yet stored, no progress for 5s".
    pub fn describe(&self) -> String {
        format!(
            "{} {} waiting, no progress for {}s",
            self.waiting,
            self.what,
            self.quiet_s.floor()
        )
    }
}

/// Logs each stall once at ERROR when it starts and at WARN when it ends.
#[derive(Debug, Default)]
pub struct StallLog {
    stalled: Vec<String>,
}

impl StallLog {
    /// Logs what changed since the last call; returns true when the set of stalled
    /// stages changed.
    pub fn update(&mut self, reports: &[StageReport], stall_after: Duration) -> bool {
        let now: Vec<&StageReport> = reports.iter().filter(|r| r.stalled()).collect();
        let mut changed = false;
        for r in &now {
            if !self.stalled.contains(&r.stage) {
                changed = true;
                tracing::error!(
                    stage = %r.stage,
                    waiting = r.waiting,
                    what = %r.what,
                    quiet_s = r.quiet_s.floor(),
                    stall_after = %humantime::format_duration(stall_after),
                    "Stage {} is STALLED: {}; /health fails and the systemd watchdog is no longer fed.",
                    r.stage,
                    r.describe()
                );
            }
        }
        for stage in &self.stalled {
            if !now.iter().any(|r| &r.stage == stage) {
                changed = true;
                match reports.iter().find(|r| &r.stage == stage) {
                    Some(r) => tracing::warn!(
                        stage = %stage,
                        state = ?r.state,
                        "Stage {stage} is no longer stalled."
                    ),
                    None => tracing::warn!(stage = %stage, "Stage {stage} ended while stalled."),
                }
            }
        }
        self.stalled = now.iter().map(|r| r.stage.clone()).collect();
        changed
    }

    pub fn any(&self) -> bool {
        !self.stalled.is_empty()
    }
}

/// The stall state saved for `outpost status` (a separate process): a small JSON
/// file beside the database, `<database>.stalled`, present only while a stage is
/// stalled. A file rather than a `source_state` row because a stalled store writer
/// could not commit the row that says so.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedStalls {
    /// When the agent saved this (wall clock, for people).
    pub at: chrono::DateTime<chrono::Utc>,
    /// The agent's process id.
    pub pid: u32,
    pub stall_after_s: f64,
    pub stalled: Vec<StageReport>,
}

/// `<database>.stalled`.
pub fn saved_path(database: &Path) -> PathBuf {
    PathBuf::from(format!("{}.stalled", database.display()))
}

/// Saves the stalled stages (removes the file when there are none). Blocking.
pub fn save(database: &Path, stalled: Option<&SavedStalls>) -> std::io::Result<()> {
    let path = saved_path(database);
    match stalled {
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(s) => {
            let tmp = PathBuf::from(format!("{}.tmp", path.display()));
            let json = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
            std::fs::write(&tmp, json)?;
            std::fs::rename(&tmp, &path)
        }
    }
}

/// What the agent last saved, if a stage is stalled (or was when the agent stopped).
pub fn load_saved(database: &Path) -> Option<SavedStalls> {
    let text = std::fs::read(saved_path(database)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// **Test only**: faults that make a stage hang, to prove that a stall is detected.
///
/// `OUTPOST_TEST_FAULT` names the faults (comma-separated; e.g. `store_writer_hang`);
/// while `OUTPOST_TEST_FAULT_FILE` names a file, a fault holds only while that file
/// exists, so a test can start and end the hang. Honoured only in debug builds (the
/// tests run those); in release builds — the `.deb` — the switch is compiled out. It is
/// an environment variable, not a configuration key, so no configuration file can set
/// it.
pub mod fault {
    use std::time::Duration;

    /// The environment variable naming the faults.
    pub const ENV: &str = "OUTPOST_TEST_FAULT";
    /// The environment variable naming the file whose presence holds the faults.
    pub const FILE_ENV: &str = "OUTPOST_TEST_FAULT_FILE";

    /// The store writer hangs before a commit.
    pub const STORE_WRITER_HANG: &str = "store_writer_hang";
    /// A source hangs with readings in hand (the simulated source).
    pub const SOURCE_HANG: &str = "source_hang";
    /// An MQTT session's decoding worker hangs while the poll loop keeps receiving
    /// (the shape of the wedge of issue 12).
    pub const MQTT_WORKER_HANG: &str = "mqtt_worker_hang";
    /// The alert engine hangs before evaluating committed readings.
    pub const ALERTS_HANG: &str = "alerts_hang";
    /// A notification delivery hangs.
    pub const OUTBOX_HANG: &str = "outbox_hang";
    /// Central sync hangs before an upload.
    pub const SYNC_HANG: &str = "sync_hang";

    /// Whether the fault `name` holds now.
    #[cfg(debug_assertions)]
    pub fn active(name: &str) -> bool {
        let Ok(spec) = std::env::var(ENV) else {
            return false;
        };
        if !spec.split(',').any(|f| f.trim() == name) {
            return false;
        }
        match std::env::var_os(FILE_ENV) {
            Some(file) => std::path::Path::new(&file).exists(),
            None => true,
        }
    }

    #[cfg(not(debug_assertions))]
    #[inline(always)]
    pub fn active(_name: &str) -> bool {
        false
    }

    const POLL: Duration = Duration::from_millis(100);

    /// Blocks the thread while the fault `name` holds.
    pub fn hold_blocking(name: &str) {
        while active(name) {
            std::thread::sleep(POLL);
        }
    }

    /// Waits while the fault `name` holds.
    pub async fn hold(name: &str) {
        while active(name) {
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(50);

    fn state_of(r: &Registry, name: &str) -> StageState {
        r.evaluate(SHORT)
            .into_iter()
            .find(|s| s.stage == name)
            .map(|s| s.state)
            .unwrap_or(StageState::Idle)
    }

    #[test]
    fn idle_working_stalled_and_recovered() {
        let r = Registry::default();
        let s = r.stage("store", "batches", None);
        assert_eq!(state_of(&r, "store"), StageState::Idle);
        s.set_waiting(3);
        assert_eq!(state_of(&r, "store"), StageState::Working);
        std::thread::sleep(SHORT * 2);
        assert_eq!(state_of(&r, "store"), StageState::Stalled);
        s.progress();
        assert_eq!(state_of(&r, "store"), StageState::Working);
        s.set_waiting(0);
        std::thread::sleep(SHORT * 2);
        assert_eq!(
            state_of(&r, "store"),
            StageState::Idle,
            "idle is never stalled"
        );
    }

    #[test]
    fn an_idle_stage_is_not_late_when_work_arrives() {
        let r = Registry::default();
        let s = r.stage("outbox", "notifications", None);
        s.progress();
        std::thread::sleep(SHORT * 2);
        let hold = s.hold(1);
        assert_eq!(state_of(&r, "outbox"), StageState::Working);
        hold.done();
        assert_eq!(s.0.waiting.load(Relaxed), 0);
    }

    #[test]
    fn blocked_and_downstream_stalls_are_not_stalls_here() {
        let r = Registry::default();
        let store = r.stage("store", "batches", None);
        let source = r.stage("source:a", "readings", Some("store"));
        store.set_waiting(1);
        source.set_waiting(1);
        std::thread::sleep(SHORT * 2);
        let reports = r.evaluate(SHORT);
        assert_eq!(reports[1].stage, "store");
        assert!(reports[1].stalled());
        assert_eq!(
            reports[0].state,
            StageState::WaitingFor {
                stage: "store".into(),
                reason: "stalled".into()
            }
        );
        store.blocked_by("the disk is full");
        assert!(r.evaluate(SHORT).iter().all(|s| !s.stalled()));
        store.unblock();
        assert!(r.evaluate(SHORT)[1].stalled());
    }

    #[test]
    fn probes_count_until_gone_and_dropped_stages_disappear() {
        let r = Registry::default();
        let s = r.stage("alerts", "readings", None);
        let depth = Arc::new(AtomicU64::new(4));
        let weak = Arc::downgrade(&depth);
        s.add_probe(Box::new(move || weak.upgrade().map(|d| d.load(Relaxed))));
        assert_eq!(r.evaluate(SHORT)[0].waiting, 4);
        drop(depth);
        assert_eq!(r.evaluate(SHORT)[0].waiting, 0);
        assert_eq!(s.0.probes.lock().unwrap().len(), 0);
        let again = r.stage("alerts", "readings", None);
        assert!(Arc::ptr_eq(&again.0, &s.0), "one stage per name");
        drop((s, again));
        assert!(r.evaluate(SHORT).is_empty());
    }

    #[test]
    fn the_stall_log_says_it_once() {
        let r = Registry::default();
        let s = r.stage("sync", "rounds", None);
        let mut log = StallLog::default();
        s.set_waiting(1);
        std::thread::sleep(SHORT * 2);
        assert!(log.update(&r.evaluate(SHORT), SHORT));
        assert!(log.any());
        assert!(!log.update(&r.evaluate(SHORT), SHORT), "said once");
        s.progress();
        assert!(log.update(&r.evaluate(SHORT), SHORT));
        assert!(!log.any());
    }

    #[test]
    fn saved_stalls_round_trip_and_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("outpost.db");
        assert_eq!(load_saved(&db), None);
        let r = Registry::default();
        let s = r.stage("store", "batches", None);
        s.set_waiting(2);
        std::thread::sleep(SHORT * 2);
        let saved = SavedStalls {
            at: chrono::Utc::now(),
            pid: 7,
            stall_after_s: 0.05,
            stalled: r.evaluate(SHORT),
        };
        save(&db, Some(&saved)).unwrap();
        assert_eq!(load_saved(&db), Some(saved));
        save(&db, None).unwrap();
        save(&db, None).unwrap();
        assert_eq!(load_saved(&db), None);
    }

    #[test]
    fn faults_hold_only_when_named() {
        // The variable is not set in unit tests.
        assert!(!fault::active(fault::STORE_WRITER_HANG));
    }
}
