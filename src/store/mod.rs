//! The local store: one SQLite database in WAL mode with `synchronous=FULL`.
//!
//! Guarantees:
//! - **A batch is acknowledged only after its commit** (G1). The single writer thread
//!   owns the write connection, groups batches into one transaction (up to
//!   `batch_max_rows` rows or `batch_max_delay`), commits, and only then resolves each
//!   batch's acknowledgement. A failed commit resolves them with the error instead.
//! - **Each uid is stored once** (G2): redeliveries count as duplicates.
//! - **Disk use is bounded** (G4): synced readings older than `retention` are pruned;
//!   above `max_size`, the oldest synced readings go next, and only then the oldest
//!   unsynced ones, counted and logged at error level. Other tables (alert events,
//!   notifications) are never pruned to make room.
//! - **A full disk does not stop the agent**: SQLITE_FULL fails the group (nothing is
//!   acknowledged), ingest pauses briefly and resumes by itself when space returns.
//! - **A corrupt database does not crash-loop the agent**: it is moved aside (kept for
//!   diagnosis) and a fresh one is created.
//!
//! Everyone else reads through their own read-only connections ([`Store::reader`]).
//!
//! **Queues and waits (G9).** The writer thread blocks only to take work from its two
//! bounded queues — batches (`channel_capacity`; sources wait for room) and write
//! operations (256; the alert engine, the outbox worker, sync marks and cursors wait
//! for room, then for their commit) — and on the disk. It hands results back through
//! oneshot senders and announces commits through a `watch`, and neither can block. So
//! every chain through the store ends at the writer, and the writer waits for none of
//! the stages that wait for it: no cycle can form here. `record_rejected` uses
//! `try_send` (a busy writer skips the diagnostic row) because the MQTT worker calls it.

pub mod audit;
pub mod chain;
mod checkpoint;
mod clock_steps;
mod read;
pub mod schema;
pub mod signing;
pub mod state;
mod writer;

pub use crate::model::StoreError;
pub use read::{
    backlog, backlog_from, counted_readings, counter, database_disk_free, disk_free_bytes,
    reading_counts, reading_from_row, series, BacklogSummary, CommittedReadings, ReadingCounts,
    SeriesSummary, StoredReading, DISK_FULL_BELOW, SELECT_READING,
};
pub use writer::{StoreStats, Urgency, WriteOp};

use crate::clock::Clock;
use crate::model::Batch;
use crate::settings::{ByteSize, HumanDuration, Problems};
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// `[storage]`: where and how readings are kept on the gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// The SQLite database file. Its directory must be writable (WAL needs it).
    #[serde(default = "default_path")]
    pub path: PathBuf,
    /// Group commit: a group holds at most this many readings (1 to 100000).
    #[serde(default = "default_batch_max_rows")]
    pub batch_max_rows: usize,
    /// The shortest time between two commits (at most 10s): a group is committed as
    /// soon as nothing more is queued, but not sooner than this after the previous
    /// commit. It bounds fsyncs per second (kinder to SD cards) and how long a
    /// reading waits for its acknowledgement. At a site whose readings arrive one by
    /// one, 1s halves the bytes written per reading compared with the 20ms default,
    /// at the price of up to a second per commit (docs/reliability.md, "SD-card wear").
    #[serde(default = "default_batch_max_delay")]
    pub batch_max_delay: HumanDuration,
    /// How long readings of The Things Stack sources may wait for their commit (at
    /// most 60s). Nobody waits for their acknowledgement (TTN publishes at QoS 0 and the
    /// Storage Integration backfill heals a gap), so one commit can carry many of them:
    /// fewer, larger commits write far fewer bytes per reading to the SD card. A
    /// reading that may change an alert is committed at once all the same; other
    /// readings reach `outpost status`, central and rate rules up to this much later
    /// (docs/reliability.md, "SD-card wear").
    #[serde(default = "default_ttn_commit_delay")]
    pub ttn_commit_delay: HumanDuration,
    /// Batches waiting for the writer; sources wait when it is full (1 to 65536).
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
    /// Synced readings older than this are deleted.
    #[serde(default = "default_retention")]
    pub retention: HumanDuration,
    /// The cap on the database's used size (at least 1MiB). See G4 for what is pruned.
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
    /// How often retention and the size cap are enforced.
    #[serde(default = "default_prune_interval")]
    pub prune_interval: HumanDuration,
    /// How long a reader waits for a lock before giving up.
    #[serde(default = "default_busy_timeout")]
    pub busy_timeout: HumanDuration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: default_path(),
            batch_max_rows: default_batch_max_rows(),
            batch_max_delay: default_batch_max_delay(),
            ttn_commit_delay: default_ttn_commit_delay(),
            channel_capacity: default_channel_capacity(),
            retention: default_retention(),
            max_size: default_max_size(),
            prune_interval: default_prune_interval(),
            busy_timeout: default_busy_timeout(),
        }
    }
}

fn default_path() -> PathBuf {
    PathBuf::from("/var/lib/outpost/outpost.db")
}
fn default_batch_max_rows() -> usize {
    1000
}
fn default_batch_max_delay() -> HumanDuration {
    HumanDuration::from_millis(20)
}
fn default_ttn_commit_delay() -> HumanDuration {
    HumanDuration::from_secs(5)
}
fn default_channel_capacity() -> usize {
    1024
}
fn default_retention() -> HumanDuration {
    HumanDuration::from_secs(7 * 86400)
}
fn default_max_size() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_prune_interval() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_busy_timeout() -> HumanDuration {
    HumanDuration::from_secs(5)
}

impl StorageConfig {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if self.path.as_os_str().is_empty() {
            problems.push(format!("{path}.path"), "must name the database file");
        }
        if !(1..=100_000).contains(&self.batch_max_rows) {
            problems.push(
                format!("{path}.batch_max_rows"),
                format!(
                    "must be between 1 and 100000, found {}",
                    self.batch_max_rows
                ),
            );
        }
        let delay = self.batch_max_delay.get();
        if delay.is_zero() || delay > std::time::Duration::from_secs(10) {
            problems.push(
                format!("{path}.batch_max_delay"),
                format!(
                    "must be more than 0 and at most 10s, found {}",
                    self.batch_max_delay
                ),
            );
        }
        if self.ttn_commit_delay.get() > std::time::Duration::from_secs(60) {
            problems.push(
                format!("{path}.ttn_commit_delay"),
                format!("must be at most 60s, found {}", self.ttn_commit_delay),
            );
        }
        if !(1..=65_536).contains(&self.channel_capacity) {
            problems.push(
                format!("{path}.channel_capacity"),
                format!(
                    "must be between 1 and 65536, found {}",
                    self.channel_capacity
                ),
            );
        }
        if self.retention.get() < std::time::Duration::from_secs(60) {
            problems.push(format!("{path}.retention"), "must be at least 1m");
        }
        if self.max_size.0 < (1 << 20) {
            problems.push(
                format!("{path}.max_size"),
                format!("must be at least 1MiB, found {}", self.max_size),
            );
        }
        if self.prune_interval.get() < std::time::Duration::from_secs(1) {
            problems.push(format!("{path}.prune_interval"), "must be at least 1s");
        }
        if self.busy_timeout.get() > std::time::Duration::from_secs(300) {
            problems.push(format!("{path}.busy_timeout"), "must be at most 5m");
        }
    }
}

/// Options that are not configuration: hooks for tests and tools.
#[derive(Default)]
pub struct StoreOptions {
    /// Caps the database at this many pages (`PRAGMA max_page_count`), e.g. to
    /// simulate a full disk in tests.
    pub max_page_count: Option<u64>,
    /// Called on each commit; returning `true` turns the commit into a rollback
    /// (SQLite's commit hook). For fault-injection tests.
    pub commit_hook: Option<Box<dyn FnMut() -> bool + Send>>,
    /// Databases larger than this are opened without waiting for `quick_check`, which
    /// then runs in the background (default [`CHECK_AT_OPEN_MAX_BYTES`]).
    pub check_at_open_max_bytes: Option<u64>,
    /// The wall clock that stamps rejected input and commits and ages readings for
    /// retention (default [`Clock::system`]); the pipeline passes the agent's one.
    pub clock: Option<Clock>,
}

/// A database (with its WAL) up to this size is checked with `quick_check` before it is
/// used. A larger one is opened at once and checked on a background thread: the check
/// reads every page, which takes ~20 s for 5M readings on a cold cache here and longer on
/// an SD card, and start-up must stay within seconds. If the background check finds
/// damage, it leaves a marker file beside the database and the agent stops with an error
/// (systemd restarts it); the next start sees the marker, checks before opening and
/// moves the damaged file aside as it always did.
pub const CHECK_AT_OPEN_MAX_BYTES: u64 = 64 << 20;

/// The page size of a database created by this agent (existing ones keep theirs).
pub const NEW_DATABASE_PAGE_SIZE: i64 = 1024;

/// The WAL is checkpointed into the database file after about this many bytes.
const WAL_CHECKPOINT_BYTES: i64 = 16 << 20;

/// The writer's SQLite page cache in KiB, with the time-keyed dedupe index (schema 11).
const WRITER_CACHE_KIB: i64 = 1024;

/// The writer's page cache in KiB while the readings table still has the random uid
/// index (a store whose rebuild waits for disk room).
const WRITER_CACHE_KIB_RANDOM_UID: i64 = 8192;

/// The marker a failed background check leaves: `<database>.check-failed`.
fn check_marker(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.check-failed", path.display()))
}

/// Whether `quick_check` must run before the database at `path` is used.
fn check_at_open(path: &Path, max_bytes: u64) -> bool {
    let size = |suffix: &str| {
        std::fs::metadata(format!("{}{suffix}", path.display()))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    check_marker(path).exists() || size("") + size("-wal") <= max_bytes
}

/// A cloneable handle to the store: sends writes to the writer thread and opens
/// read connections.
#[derive(Clone, Debug)]
pub struct Store {
    path: Arc<PathBuf>,
    busy_timeout: std::time::Duration,
    ops: mpsc::Sender<WriteOp>,
    committed: watch::Receiver<i64>,
    stats: Arc<StoreStats>,
    /// Set by the background integrity check when it finds damage.
    damaged: watch::Receiver<Option<String>>,
    /// Every stage's progress (G9), kept here because every component holds the store.
    progress: Arc<crate::progress::Registry>,
    /// The wall clock of [`StoreOptions::clock`].
    clock: Clock,
    /// The gateway's signing key (G10, [`signing`]); `None` if it cannot be read.
    key: Option<signing::GatewayKey>,
    /// How long batches may wait for their commit (shared with the writer).
    policy: Arc<writer::CommitPolicy>,
    /// `storage.ttn_commit_delay`.
    ttn_commit_delay: std::time::Duration,
    /// `storage.batch_max_delay`.
    batch_max_delay: std::time::Duration,
}

/// Keeps a test of [`Store::set_urgency`] installed; dropping it removes the test
/// (unless a newer one replaced it already).
#[must_use = "the test is removed when the guard is dropped"]
pub struct UrgencyGuard {
    policy: Arc<writer::CommitPolicy>,
    generation: u64,
}

impl Drop for UrgencyGuard {
    fn drop(&mut self) {
        self.policy.clear_urgency(self.generation);
    }
}

/// What [`Store::open`] returns besides the handle: the ingest side of the pipeline and
/// the writer's completion.
pub struct Ingest {
    /// Sources send their batches here. When every clone is dropped, the writer
    /// commits what it holds and stops accepting readings.
    pub sender: mpsc::Sender<Batch>,
    /// Resolves when the writer thread has committed everything and closed.
    pub finished: oneshot::Receiver<()>,
    /// Cancel once the sources have stopped to close the writer even if some store
    /// handle is still alive somewhere: queued writes are committed, later ones fail
    /// with `Closed`. (Without it the writer closes when the last handle is dropped.)
    pub close: tokio_util::sync::CancellationToken,
}

impl Store {
    /// Opens (creating, migrating or recovering) the database and starts the writer.
    pub fn open(
        config: &StorageConfig,
        options: StoreOptions,
    ) -> Result<(Store, Ingest), StoreError> {
        let max_bytes = options
            .check_at_open_max_bytes
            .unwrap_or(CHECK_AT_OPEN_MAX_BYTES);
        let background_check = !check_at_open(&config.path, max_bytes);
        let clock = options.clock.clone().unwrap_or_else(Clock::system);
        let conn = open_writer_connection(config, &options)?;
        let key = match signing::load_or_create(&signing::key_path(&config.path)) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::error!(error = %e, "The chain's heads will not be signed.");
                None
            }
        };
        let (damaged_tx, damaged_rx) = watch::channel(None);
        if background_check {
            spawn_background_check(config.path.clone(), config.busy_timeout.get(), damaged_tx);
        }
        let (batch_tx, batch_rx) = mpsc::channel(config.channel_capacity.max(1));
        let (op_tx, op_rx) = mpsc::channel(256);
        let last_id: i64 = conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM readings", [], |r| {
                r.get(0)
            })
            .map_err(|e| StoreError::from_sqlite(&e))?;
        let (committed_tx, committed_rx) = watch::channel(last_id);
        let stats = Arc::new(StoreStats::default());
        let policy = Arc::new(writer::CommitPolicy::default());
        let (finished_tx, finished_rx) = oneshot::channel();
        let close = tokio_util::sync::CancellationToken::new();
        let progress = Arc::new(crate::progress::Registry::default());
        let stage = progress.stage(
            crate::progress::STORE,
            "batches and writes not yet committed",
            None,
        );
        // What is queued for the writer, seen from outside: a hung writer cannot count.
        let (batches_queued, ops_queued) = (batch_tx.downgrade(), op_tx.downgrade());
        stage.add_probe(Box::new(move || {
            let depth = |capacity: usize, max: usize| (max - capacity.min(max)) as u64;
            let batches = batches_queued
                .upgrade()
                .map(|s| depth(s.capacity(), s.max_capacity()));
            let ops = ops_queued
                .upgrade()
                .map(|s| depth(s.capacity(), s.max_capacity()));
            match (batches, ops) {
                (None, None) => None,
                (b, o) => Some(b.unwrap_or(0) + o.unwrap_or(0)),
            }
        }));
        writer::spawn(
            conn,
            config.clone(),
            options.commit_hook,
            batch_rx,
            op_rx,
            committed_tx,
            stats.clone(),
            policy.clone(),
            finished_tx,
            close.clone(),
            (stage, progress.clone()),
            clock.clone(),
        )?;
        Ok((
            Store {
                path: Arc::new(config.path.clone()),
                busy_timeout: config.busy_timeout.get(),
                ops: op_tx,
                committed: committed_rx,
                stats,
                damaged: damaged_rx,
                progress,
                clock,
                key,
                policy,
                ttn_commit_delay: config.ttn_commit_delay.get(),
                batch_max_delay: config.batch_max_delay.get(),
            },
            Ingest {
                sender: batch_tx,
                finished: finished_rx,
                close,
            },
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> &Arc<StoreStats> {
        &self.stats
    }

    /// The wall clock the store stamps with ([`StoreOptions::clock`]).
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The progress of every stage (G9): register a stage here, evaluate stalls here.
    pub fn progress(&self) -> &Arc<crate::progress::Registry> {
        &self.progress
    }

    /// Resolves (with the reason) if the background integrity check of a large
    /// database found damage; never resolves otherwise. The agent then stops with an
    /// error so that the next start moves the database aside.
    pub async fn damaged(&self) -> String {
        let mut rx = self.damaged.clone();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                // The check passed (or never ran): nothing will ever be reported.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Lets readings of `source` wait up to `delay` for their commit (when longer than
    /// `storage.batch_max_delay`); `None` restores the default. For sources whose
    /// readings nobody acknowledges (see [`Store::ttn_commit_delay`]).
    pub fn set_commit_delay(&self, source: &str, delay: Option<std::time::Duration>) {
        self.policy.set_delay(source, delay);
    }

    /// How long readings of `source` may wait for their commit, if longer than
    /// `storage.batch_max_delay` (see [`Store::set_commit_delay`]): such a source
    /// keeps more batches awaiting their commit, so that they can wait together.
    pub fn commit_delay(&self, source: &str) -> Option<std::time::Duration> {
        self.policy
            .delay_of(source)
            .filter(|d| *d > self.batch_max_delay)
    }

    /// Commits the batches the writer holds for their sources' delay now rather than
    /// at their due time: for a source that has no room left for more batches
    /// awaiting their commit (a burst), so that it drains at full speed.
    pub fn commit_held_now(&self) {
        self.policy.commit_held_now();
    }

    /// `storage.ttn_commit_delay`: how long readings of The Things Stack sources may
    /// wait for their commit.
    pub fn ttn_commit_delay(&self) -> std::time::Duration {
        self.ttn_commit_delay
    }

    /// Installs the alert engine's test of readings that may change an alert: the
    /// writer commits a batch holding one at once instead of letting it wait (the
    /// spacing, a source's commit delay), so the alert's event, written in the next
    /// commit, is not delayed by them. It is called on the writer thread for every
    /// reading taken, in order, and must be quick. It changes only when a batch is
    /// committed, never whether or what (G1, G3). Replaces any earlier test; the test
    /// stays until the guard is dropped.
    pub fn set_urgency(&self, urgency: Urgency) -> UrgencyGuard {
        UrgencyGuard {
            policy: self.policy.clone(),
            generation: self.policy.set_urgency(urgency),
        }
    }

    /// A new read-only connection (WAL readers never block the writer).
    pub fn reader(&self) -> rusqlite::Result<Connection> {
        open_reader(&self.path, self.busy_timeout)
    }

    /// Runs `op` inside the writer's next group transaction (in its own savepoint) and
    /// resolves after that transaction committed. `op` must be quick: it runs on the
    /// thread that commits every reading.
    pub async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit_op(WriteOp::new(op, tx), rx).await
    }

    /// [`Store::write`] for an operation that may wait up to `within` for a commit
    /// the writer makes anyway (readings held for their delay, another operation)
    /// rather than cost a commit of its own: one WAL append and fsync fewer on the SD
    /// card (issue 15). For writes nobody waits on at once, e.g. sync's marks of what
    /// central committed; never for an alert event (G3) or a cursor an acknowledgement
    /// depends on.
    pub async fn write_within<T, F>(
        &self,
        within: std::time::Duration,
        op: F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit_op(WriteOp::new(op, tx).within(within), rx)
            .await
    }

    async fn submit_op<T>(
        &self,
        op: WriteOp,
        done: oneshot::Receiver<Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.ops.send(op).await.map_err(|_| StoreError::Closed)?;
        done.await.map_err(|_| StoreError::Closed)?
    }

    /// Keeps input that could not be used in the bounded `rejected` table (the newest
    /// 1000 rows) for diagnosis. Never waits: if the writer is busy the row is skipped,
    /// which is acceptable for diagnostics (the caller counts rejections anyway).
    pub fn record_rejected(&self, source: &str, reason: &str, detail: &str, payload: &[u8]) {
        self.record_rejected_message(source, reason, None, detail, payload);
    }

    /// [`Store::record_rejected`] for a message that arrived on an MQTT `topic`. Also
    /// counts it in `rejected_reasons` (per source and reason, with the last time and
    /// detail), which `outpost status` shows and which pruning never touches.
    pub fn record_rejected_message(
        &self,
        source: &str,
        reason: &str,
        topic: Option<&str>,
        detail: &str,
        payload: &[u8],
    ) {
        const MAX_PAYLOAD: usize = 4096;
        const MAX_TEXT: usize = 1024;
        let cut = |s: &str| s.chars().take(MAX_TEXT).collect::<String>();
        let (source, reason, detail) = (source.to_string(), reason.to_string(), cut(detail));
        let topic = topic.map(cut);
        let payload = payload[..payload.len().min(MAX_PAYLOAD)].to_vec();
        let (tx, _rx) = oneshot::channel();
        let clock = self.clock.clone();
        let op = WriteOp::new(
            move |conn| {
                let now = clock.now().timestamp_micros();
                conn.execute(
                    "INSERT INTO rejected(source, reason, topic, detail, payload, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    rusqlite::params![source, reason, topic, detail, payload, now],
                )?;
                conn.execute(
                    "INSERT INTO rejected_reasons(source, reason, count, last_at, last_detail) VALUES (?1, ?2, 1, ?3, ?4)
                     ON CONFLICT(source, reason) DO UPDATE SET count = count + 1,
                         last_at = excluded.last_at, last_detail = excluded.last_detail",
                    rusqlite::params![source, reason, now, detail],
                )
                .map(|_| ())
            },
            tx,
        );
        let _ = self.ops.try_send(op);
    }

    /// The id of the newest committed reading; changes after every commit.
    pub fn committed_watch(&self) -> watch::Receiver<i64> {
        self.committed.clone()
    }

    /// Committed readings with an id above `after`, as they are committed. The stream
    /// ends after the writer has closed and every row was delivered.
    pub fn committed_readings(&self, after: i64) -> rusqlite::Result<CommittedReadings> {
        CommittedReadings::new(self.reader()?, self.committed.clone(), after)
    }
}

pub fn open_reader(path: &Path, busy_timeout: std::time::Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    conn.busy_timeout(busy_timeout)?;
    Ok(conn)
}

/// Opens the write connection; a database that cannot be opened or fails
/// `quick_check` is moved aside and replaced by a fresh one.
fn open_writer_connection(
    config: &StorageConfig,
    options: &StoreOptions,
) -> Result<Connection, StoreError> {
    let path = &config.path;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: format!("cannot create its directory: {e}"),
        })?;
    }
    match try_open(config, options) {
        Ok(conn) => Ok(conn),
        Err(OpenFailure::Unusable(reason)) => {
            let aside = move_aside(path).map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                reason: format!("{reason}; moving it aside failed too: {e}"),
            })?;
            let _ = std::fs::remove_file(check_marker(path));
            tracing::error!(
                path = %path.display(),
                moved_to = %aside.display(),
                reason = %reason,
                "The database is unusable; it was moved aside and a fresh one created. Unsynced readings in it were not sent."
            );
            let conn = try_open(config, options).map_err(|f| StoreError::Open {
                path: path.display().to_string(),
                reason: f.to_string(),
            })?;
            let clock = options.clock.clone().unwrap_or_else(Clock::system);
            let entry = audit::AuditEntry::by_process(
                audit::AuditKind::DatabaseMovedAside,
                serde_json::json!({
                    "path": path.display().to_string(),
                    "moved_to": aside.display().to_string(),
                    "reason": reason.to_string(),
                }),
            );
            if let Err(e) = audit::append(&conn, &clock, &entry) {
                tracing::warn!(error = %e, "Cannot write to the audit log.");
            }
            Ok(conn)
        }
        Err(f @ OpenFailure::Environment(_)) => Err(StoreError::Open {
            path: path.display().to_string(),
            reason: f.to_string(),
        }),
    }
}

#[derive(Debug, thiserror::Error)]
enum OpenFailure {
    /// The file is damaged or not a database: move it aside.
    #[error("{0}")]
    Unusable(String),
    /// Permissions, a read-only filesystem, a newer schema: moving aside would not help.
    #[error("{0}")]
    Environment(String),
}

fn try_open(config: &StorageConfig, options: &StoreOptions) -> Result<Connection, OpenFailure> {
    use rusqlite::ErrorCode::*;
    let classify = |e: rusqlite::Error| match e.sqlite_error_code() {
        Some(DatabaseCorrupt | NotADatabase) => OpenFailure::Unusable(e.to_string()),
        _ => OpenFailure::Environment(e.to_string()),
    };
    let mut conn = Connection::open(&config.path).map_err(classify)?;
    conn.busy_timeout(config.busy_timeout.get())
        .map_err(classify)?;
    // page_size and auto_vacuum must be chosen before the first table exists (both are
    // ignored for an existing database). 1 KiB pages: a commit of one reading changes
    // about five pages (row, uid index, backlog index, series index, series summary),
    // each a whole WAL frame, and with 4 KiB pages a site whose readings arrive one by
    // one wrote over twice the bytes per reading (docs/reliability.md, "SD-card
    // wear"). INCREMENTAL lets the pruner hand freed pages back to the filesystem
    // (which matters on a full disk).
    conn.pragma_update(None, "page_size", NEW_DATABASE_PAGE_SIZE)
        .map_err(classify)?;
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .map_err(classify)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(classify)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OpenFailure::Environment(format!(
            "cannot switch to WAL mode (got {mode}); is the filesystem writable?"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(classify)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(classify)?;
    // Checkpoint the WAL into the database every ~16 MiB rather than every 4 MiB:
    // fewer checkpoint fsyncs under sustained ingest, and a page changed by many
    // commits meanwhile is written to the database file once. The writer hands this
    // to a thread of its own (`checkpoint`); the auto-checkpoint stays for the
    // migrations and for a writer whose thread could not start.
    let page_size: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(classify)?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        WAL_CHECKPOINT_BYTES / page_size.max(512),
    )
    .map_err(classify)?;
    let max_bytes = options
        .check_at_open_max_bytes
        .unwrap_or(CHECK_AT_OPEN_MAX_BYTES);
    if check_at_open(&config.path, max_bytes) {
        let mut verdict = quick_check(&conn).map_err(classify)?;
        if let CheckVerdict::Unreadable(found) = &verdict {
            // A read error says nothing about the contents: check again before moving
            // a possibly healthy database (and its unsynced readings) aside. Only a
            // file that stays unreadable is given up, so that the agent does not
            // crash-loop on it.
            tracing::warn!(path = %config.path.display(), found = %found, "The integrity check could not read the database (an I/O error); checking again.");
            std::thread::sleep(std::time::Duration::from_secs(1));
            verdict = quick_check(&conn).map_err(classify)?;
        }
        match verdict {
            CheckVerdict::Ok => {}
            CheckVerdict::Damaged(found) => {
                return Err(OpenFailure::Unusable(format!(
                    "quick_check failed: {found}"
                )));
            }
            CheckVerdict::Unreadable(found) => {
                return Err(OpenFailure::Unusable(format!(
                    "quick_check could not read the database twice (I/O errors): {found}"
                )));
            }
        }
        let _ = std::fs::remove_file(check_marker(&config.path));
    } else {
        // A large database: the full check runs in the background (see
        // CHECK_AT_OPEN_MAX_BYTES). Reading the schema still catches a damaged header
        // or catalogue before anything is written.
        conn.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(classify)?;
    }
    if let Some(pages) = options.max_page_count {
        conn.pragma_update(None, "max_page_count", pages)
            .map_err(classify)?;
    }
    let version = schema::migrate(&mut conn).map_err(|e| match e {
        rusqlite::Error::InvalidParameterName(msg) => OpenFailure::Environment(msg),
        other => classify(other),
    })?;
    // The writer's page cache, sized by the layout of the readings' dedupe index. Since
    // schema 11 every index takes its inserts at a right edge (or is small), so a 1 MiB
    // cache keeps ingest at full speed and holds a 1,000-reading group's dirty pages;
    // an 8 MiB one only filled with pages written once (+7-10 MiB of RSS at 1,000
    // readings/s, docs/benchmarks.md "Session 8"). A store still on the random uid
    // index (its rebuild waits for disk room, so `migrate` stopped below schema 11)
    // keeps 8 MiB so its upper levels stay cached. Pages are allocated only as used,
    // so an idle agent pays for neither.
    let cache_kib: i64 = if version < schema::UID_TIME_VERSION {
        WRITER_CACHE_KIB_RANDOM_UID
    } else {
        WRITER_CACHE_KIB
    };
    conn.pragma_update(None, "cache_size", -cache_kib)
        .map_err(classify)?;
    // What the writer reads first; damage here counts as damage, not as an error that
    // would stop every start.
    conn.query_row("SELECT COALESCE(MAX(id), 0) FROM readings", [], |r| {
        r.get::<_, i64>(0)
    })
    .map_err(classify)?;
    Ok(conn)
}

/// What `PRAGMA quick_check` found.
#[derive(Debug, PartialEq, Eq)]
enum CheckVerdict {
    Ok,
    /// The database is damaged: it is moved aside.
    Damaged(String),
    /// Pages could not be read (an I/O error: a failing card, a file system that went
    /// away under the check). That proves nothing about the file, and moving a healthy
    /// database aside would strand its unsynced readings: the background check only
    /// logs it, the check at open tries again first.
    Unreadable(String),
}

/// Runs `quick_check` and classifies what it reports.
fn quick_check(conn: &Connection) -> rusqlite::Result<CheckVerdict> {
    let mut stmt = conn.prepare("PRAGMA quick_check")?;
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(check_verdict(&rows))
}

/// SQLite reports each problem on a line of its own (several per row); a page it could
/// not read reads "Tree 3 page 72932: unable to get the page. error code=266", where
/// the code's low byte 10 is SQLITE_IOERR (266 = SQLITE_IOERR_READ). A short read (522)
/// means the file is shorter than its pages: that is damage, not an I/O error.
fn check_verdict(rows: &[String]) -> CheckVerdict {
    if rows.len() == 1 && rows[0] == "ok" {
        return CheckVerdict::Ok;
    }
    let lines: Vec<&str> = rows.iter().flat_map(|r| r.lines()).collect();
    let summary = lines
        .iter()
        .filter(|l| !l.starts_with("***"))
        .take(3)
        .copied()
        .collect::<Vec<_>>()
        .join("; ");
    let summary = if summary.is_empty() {
        lines.join("; ")
    } else {
        summary
    };
    let io_error = |line: &&str| {
        line.rsplit_once("error code=")
            .and_then(|(_, code)| code.trim().parse::<i32>().ok())
            .is_some_and(|code| code & 0xff == 10 && code != 522)
    };
    if lines.iter().any(io_error) {
        CheckVerdict::Unreadable(summary)
    } else {
        CheckVerdict::Damaged(summary)
    }
}

/// Runs `quick_check` on its own read-only connection. Damage leaves the marker for the
/// next start and is reported on `damaged`; a check that cannot run (e.g. busy) or
/// cannot read the file (an I/O error) is only logged, since it proves nothing either way.
fn spawn_background_check(
    path: PathBuf,
    busy_timeout: std::time::Duration,
    damaged: watch::Sender<Option<String>>,
) {
    let run = move || {
        let started = std::time::Instant::now();
        let result = open_reader(&path, busy_timeout).and_then(|conn| quick_check(&conn));
        use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
        let problem = match result {
            Ok(CheckVerdict::Ok) => {
                tracing::info!(
                    path = %path.display(),
                    seconds = started.elapsed().as_secs_f64(),
                    "The database passed its integrity check (quick_check)."
                );
                return;
            }
            Ok(CheckVerdict::Damaged(found)) => format!("quick_check failed: {found}"),
            Ok(CheckVerdict::Unreadable(found)) => {
                tracing::warn!(path = %path.display(), found = %found, "The background integrity check could not read the database (an I/O error, not damage); it is checked again at the next start.");
                return;
            }
            Err(e) if matches!(e.sqlite_error_code(), Some(DatabaseCorrupt | NotADatabase)) => {
                e.to_string()
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "The background integrity check could not run; the database is checked again at the next start.");
                return;
            }
        };
        if let Err(e) = std::fs::write(check_marker(&path), format!("{problem}\n")) {
            tracing::error!(error = %e, "Cannot write the integrity-check marker.");
        }
        tracing::error!(
            path = %path.display(),
            reason = %problem,
            "The database is damaged: stopping, so that the next start moves it aside."
        );
        let _ = damaged.send(Some(problem));
    };
    if let Err(e) = std::thread::Builder::new()
        .name("outpost-check".into())
        .spawn(run)
    {
        tracing::warn!(error = %e, "Cannot start the background integrity check.");
    }
}

/// Renames the database and its WAL/SHM files to `<name>.corrupt-<unix time>`.
fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S");
    let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    std::fs::rename(path, &aside)?;
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", path.display()));
        if side.exists() {
            let _ = std::fs::rename(&side, format!("{}{suffix}", aside.display()));
        }
    }
    Ok(aside)
}

#[cfg(test)]
mod tests;
