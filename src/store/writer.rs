//! The store writer: the only thread that writes to the database.
//!
//! It takes batches of readings and write operations from two bounded channels, groups
//! them into one transaction (each batch and operation in its own savepoint, so one bad
//! batch cannot fail the others), commits with `synchronous=FULL`, and only then
//! resolves the acknowledgements and announces the newest committed reading id.

use super::chain::{BoundReadings, ReadingRow};
use super::{StorageConfig, StoreError};
use crate::model::{to_micros, Batch, Committed, Reading};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type OpFn = Box<dyn FnOnce(&Connection) -> Result<Completion, rusqlite::Error> + Send>;

/// A write of another component (alert state, outbox rows, sync marks, cursors) that
/// rides in the writer's next group transaction.
pub struct WriteOp {
    run: OpFn,
    /// How long it may wait for a commit the writer makes anyway (`None`: at once).
    within: Option<Duration>,
}

impl WriteOp {
    pub(super) fn new<T, F>(op: F, done: oneshot::Sender<Result<T, StoreError>>) -> WriteOp
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        WriteOp {
            run: Box::new(move |conn| match op(conn) {
                Ok(value) => Ok(Box::new(move |committed: Result<(), StoreError>| {
                    let _ = done.send(committed.map(|()| value));
                }) as Completion),
                Err(e) => {
                    let _ = done.send(Err(StoreError::from_sqlite(&e)));
                    Err(e)
                }
            }),
            within: None,
        }
    }

    /// An operation that may wait up to `within` for a commit made anyway (see
    /// [`Store::write_within`]).
    ///
    /// [`Store::write_within`]: super::Store::write_within
    pub(super) fn within(self, within: Duration) -> WriteOp {
        WriteOp {
            within: Some(within),
            ..self
        }
    }
}

/// Tells whether a reading may change an alert at once (see [`Store::set_urgency`]).
///
/// [`Store::set_urgency`]: super::Store::set_urgency
pub type Urgency = Box<dyn FnMut(&Reading) -> bool + Send>;

/// How long each batch may wait for its commit, shared by the store handles (which set
/// it) and the writer (which reads it as batches arrive). Only latency and the bytes
/// written per reading depend on it: a batch is still acknowledged only after its
/// commit (G1), whenever that is.
#[derive(Default)]
pub(super) struct CommitPolicy {
    /// Per source name: how long its readings may wait for their commit, when that is
    /// longer than `batch_max_delay` (sources that acknowledge nothing).
    lazy: std::sync::RwLock<HashMap<String, Duration>>,
    /// The alert engine's test of readings that must not wait (with its generation).
    urgency: std::sync::Mutex<Option<(u64, Urgency)>>,
    generation: AtomicU64,
    /// Asks the writer to commit the batches it holds now (see
    /// [`CommitPolicy::commit_held_now`]). A request made while nothing is held is
    /// remembered and commits the next group at once: harmless, one early commit.
    commit_held: tokio::sync::Notify,
}

impl std::fmt::Debug for CommitPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitPolicy").finish_non_exhaustive()
    }
}

impl CommitPolicy {
    pub(super) fn set_delay(&self, source: &str, delay: Option<Duration>) {
        if let Ok(mut lazy) = self.lazy.write() {
            match delay {
                Some(d) => lazy.insert(source.to_string(), d),
                None => lazy.remove(source),
            };
        }
    }

    /// `source`'s delay, if it has one (see [`CommitPolicy::set_delay`]).
    pub(super) fn delay_of(&self, source: &str) -> Option<Duration> {
        self.lazy.read().ok().and_then(|l| l.get(source).copied())
    }

    /// A source whose batches wait has no room left for more: the writer commits
    /// what it holds at once instead of at its due time, so a burst drains at full
    /// speed rather than one window per delay.
    pub(super) fn commit_held_now(&self) {
        self.commit_held.notify_one();
    }

    /// Installs `urgency`; returns its generation for [`CommitPolicy::clear_urgency`].
    pub(super) fn set_urgency(&self, urgency: Urgency) -> u64 {
        let generation = self.generation.fetch_add(1, Relaxed) + 1;
        if let Ok(mut slot) = self.urgency.lock() {
            *slot = Some((generation, urgency));
        }
        generation
    }

    /// Removes the test of `generation`, unless a newer one replaced it already.
    pub(super) fn clear_urgency(&self, generation: u64) {
        if let Ok(mut slot) = self.urgency.lock() {
            if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
                *slot = None;
            }
        }
    }

    /// How long `batch` may wait after it was taken: `None` for at once (a reading
    /// that may change an alert), else its source's delay if it has one (not for a
    /// backfill page).
    fn wait_of(&self, batch: &Batch) -> Option<Option<Duration>> {
        let mut urgent = false;
        if let Ok(mut slot) = self.urgency.lock() {
            if let Some((_, test)) = slot.as_mut() {
                // Every reading is shown (no short cut): the test follows each series.
                for r in &batch.readings {
                    urgent |= test(r);
                }
            }
        }
        if urgent {
            return None;
        }
        // Recovered readings (a backfill page) are not held: the backfill waits for
        // each page's commit before it fetches the next, and a page is already many
        // readings per commit.
        let first = batch.readings.first();
        if first.is_some_and(|r| r.flags & crate::model::flags::BACKFILLED != 0) {
            return Some(None);
        }
        let source = first.map(|r| r.source.as_str());
        Some(source.and_then(|s| self.lazy.read().ok().and_then(|l| l.get(s).copied())))
    }
}

/// Counters the writer keeps for status, health and metrics.
#[derive(Debug)]
pub struct StoreStats {
    pub readings_inserted: AtomicU64,
    pub readings_duplicate: AtomicU64,
    /// Readings refused before insertion (a value that is not a finite number).
    pub readings_invalid: AtomicU64,
    pub commits: AtomicU64,
    pub commit_failures: AtomicU64,
    /// Readings not stored (and not acknowledged) because the disk was full.
    pub readings_refused_full: AtomicU64,
    pub pruned_synced: AtomicU64,
    pub pruned_unsynced: AtomicU64,
    pub disk_full: AtomicBool,
    /// Unix milliseconds of the last successful commit (0 before the first).
    pub last_commit_ms: AtomicU64,
    /// Duration of the last commit in microseconds.
    pub last_commit_us: AtomicU64,
    /// Every commit's duration, for `/metrics`.
    pub commit_latency: prometheus_client::metrics::histogram::Histogram,
}

impl Default for StoreStats {
    fn default() -> Self {
        StoreStats {
            readings_inserted: Default::default(),
            readings_duplicate: Default::default(),
            readings_invalid: Default::default(),
            commits: Default::default(),
            commit_failures: Default::default(),
            readings_refused_full: Default::default(),
            pruned_synced: Default::default(),
            pruned_unsynced: Default::default(),
            disk_full: Default::default(),
            last_commit_ms: Default::default(),
            last_commit_us: Default::default(),
            // 0.5 ms to about 4 s.
            commit_latency: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14),
            ),
        }
    }
}

const INSERT_READING: &str = "INSERT INTO readings \
    (uid, source, device, metric, value, unit, observed_at, received_at, flags, meta) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT DO NOTHING";

const UPSERT_SERIES: &str = "INSERT INTO series \
    (source, device, metric, value, unit, observed_at, received_at, count) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
    ON CONFLICT(source, device, metric) DO UPDATE SET \
      count = count + excluded.count, \
      value = CASE WHEN excluded.observed_at >= series.observed_at THEN excluded.value ELSE series.value END, \
      unit = CASE WHEN excluded.observed_at >= series.observed_at THEN excluded.unit ELSE series.unit END, \
      received_at = MAX(series.received_at, excluded.received_at), \
      observed_at = MAX(series.observed_at, excluded.observed_at)";

/// How long ingest pauses after the disk was found full before trying again.
const FULL_PAUSE: Duration = Duration::from_millis(500);

#[allow(clippy::too_many_arguments)]
pub(super) fn spawn(
    conn: Connection,
    config: StorageConfig,
    commit_hook: Option<Box<dyn FnMut() -> bool + Send>>,
    batches: mpsc::Receiver<Batch>,
    ops: mpsc::Receiver<WriteOp>,
    committed: watch::Sender<i64>,
    stats: Arc<StoreStats>,
    policy: Arc<CommitPolicy>,
    finished: oneshot::Sender<()>,
    close: CancellationToken,
    (stage, progress): (crate::progress::Stage, Arc<crate::progress::Registry>),
    clock: crate::clock::Clock,
) -> Result<(), StoreError> {
    if let Some(hook) = commit_hook {
        conn.commit_hook(Some(hook));
    }
    // Without the thread (it could not start), SQLite's auto-checkpoint stays.
    let started = super::checkpoint::Sizes::of(&conn)
        .map_err(|e| e.to_string())
        .and_then(|sizes| {
            let timeout = config.busy_timeout.get();
            super::checkpoint::Checkpointer::start(&conn, &config.path, timeout, sizes)
        });
    let checkpointer = match started {
        Ok(checkpointer) => Some(checkpointer),
        Err(e) => {
            tracing::warn!(error = %e, "The WAL checkpoint thread did not start; the store writer checkpoints the WAL itself.");
            None
        }
    };
    let writer = Writer {
        conn,
        _checkpointer: checkpointer,
        config,
        stats,
        committed: Some(committed),
        policy,
        last_full_log: None,
        retention_clock: None,
        scan: RetentionScan::default(),
        stage,
        progress,
        clock,
    };
    std::thread::Builder::new()
        .name("outpost-store".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(rt) => rt.block_on(writer.run(batches, ops, close)),
                Err(e) => {
                    tracing::error!(error = %e, "Cannot start the store writer's runtime.");
                    // Closed (and its checkpoint thread joined) before `finished`.
                    drop(writer);
                }
            }
            let _ = finished.send(());
        })
        .map(|_| ())
        .map_err(|e| StoreError::Sqlite(format!("cannot start the writer thread: {e}")))
}

struct Writer {
    conn: Connection,
    /// Checkpoints the WAL beside the writer. Declared after `conn`, so dropped (its
    /// thread joined, its connection closed) after it: the last connection's close
    /// checkpoints and removes the WAL at a clean shutdown.
    _checkpointer: Option<super::checkpoint::Checkpointer>,
    config: StorageConfig,
    stats: Arc<StoreStats>,
    /// Dropped once the readings channel is closed and drained, which ends every
    /// [`super::CommittedReadings`] stream.
    committed: Option<watch::Sender<i64>>,
    /// How long batches may wait for their commit.
    policy: Arc<CommitPolicy>,
    last_full_log: Option<Instant>,
    /// The time retention last pruned at, and when (monotonic): see `retention_now`.
    retention_clock: Option<(chrono::DateTime<chrono::Utc>, Instant)>,
    scan: RetentionScan,
    /// The writer's progress (G9): a group in hand counts as waiting work (the
    /// channels' depth is probed from outside); each commit is progress, for the
    /// writer and for the sources of its batches; a full disk is a known reason.
    stage: crate::progress::Stage,
    progress: Arc<crate::progress::Registry>,
    /// Stamps commits and ages readings for retention.
    clock: crate::clock::Clock,
}

#[derive(Default)]
struct Group {
    batches: Vec<Batch>,
    /// Operations to commit at once.
    ops: Vec<WriteOp>,
    /// Operations that may wait, each with the time it is due.
    lazy_ops: Vec<(tokio::time::Instant, WriteOp)>,
    rows: usize,
    /// When the group must be committed at the latest (if nothing fills it sooner):
    /// the earliest of what its members may wait.
    due: Option<tokio::time::Instant>,
    /// The earliest of what its batches alone may wait.
    batches_due: Option<tokio::time::Instant>,
    /// Whether every batch may wait longer than the spacing (its source's delay):
    /// only such batches are left out of a commit made for write operations.
    all_lazy: bool,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.batches.is_empty() && self.ops.is_empty() && self.lazy_ops.is_empty()
    }

    fn due_by(&mut self, at: tokio::time::Instant) {
        self.due = Some(self.due.map_or(at, |d| d.min(at)));
    }

    /// What to keep for a later commit when this group is committed now for write
    /// operations that cannot wait: all the batches if every one is a delayed
    /// source's, not yet due (they keep their due time, and their order, since they
    /// go first into the next group), and the operations that may wait and are not
    /// due, unless the batches commit now (they ride along for free). Another commit
    /// would cost the same pages for the operations and again for the readings; but
    /// the readings of a delayed source gain most from waiting together (one commit
    /// per delay rather than one per operation: cursors, state rows, health probes).
    /// Any batch due, or a full group, commits every batch it holds.
    fn split_held(&mut self, now: tokio::time::Instant, max_rows: usize) -> Group {
        let forced = !self.ops.is_empty();
        let keep_batches = forced
            && !self.batches.is_empty()
            && self.all_lazy
            && self.rows < max_rows
            && self.batches_due.is_some_and(|due| due > now);
        let keep_ops = forced && (keep_batches || self.batches.is_empty());
        let mut held = Group::default();
        if keep_batches {
            held.batches = std::mem::take(&mut self.batches);
            held.rows = std::mem::take(&mut self.rows);
            held.due = self.batches_due;
            held.batches_due = self.batches_due.take();
            held.all_lazy = true;
        }
        if keep_ops {
            let (later, due): (Vec<_>, Vec<_>) = std::mem::take(&mut self.lazy_ops)
                .into_iter()
                .partition(|(at, _)| *at > now);
            self.lazy_ops = due;
            for (at, op) in later {
                held.due_by(at);
                held.lazy_ops.push((at, op));
            }
        }
        if !held.is_empty() {
            self.due = Some(now);
        }
        held
    }

    /// A write operation is committed at once: its caller waits for it, and an alert
    /// event must be durable before it is sent (G3). One that may wait
    /// ([`Store::write_within`]) is due after its `within`, or with any commit sooner.
    ///
    /// [`Store::write_within`]: super::Store::write_within
    fn push_op(&mut self, op: WriteOp) {
        let due = tokio::time::Instant::now() + op.within.unwrap_or_default();
        self.due_by(due);
        if op.within.is_some() {
            self.lazy_ops.push((due, op));
        } else {
            self.ops.push(op);
        }
    }

    /// A batch waits for the spacing after the previous commit (`spacing`), or longer
    /// if its source may (`CommitPolicy`), or not at all if it may change an alert.
    /// After a burst (`pressed`: the previous group was full, or cut short because a
    /// source had no room left) a delayed source's batch waits only for the spacing:
    /// the burst's commits already carry many readings each, and its tail would
    /// otherwise sit out the whole delay for no saving.
    fn push_batch(
        &mut self,
        batch: Batch,
        policy: &CommitPolicy,
        spacing: tokio::time::Instant,
        pressed: bool,
    ) {
        let now = tokio::time::Instant::now();
        let (due, lazy) = match policy.wait_of(&batch) {
            None => (now, false),
            Some(None) => (spacing, false),
            Some(Some(_)) if pressed => (spacing, false),
            Some(Some(delay)) => (spacing.max(now + delay), now + delay > spacing),
        };
        self.all_lazy = lazy && (self.all_lazy || self.batches.is_empty());
        self.due_by(due);
        self.batches_due = Some(self.batches_due.map_or(due, |d| d.min(due)));
        self.rows += batch.readings.len();
        self.batches.push(batch);
    }
}

impl Writer {
    /// Runs until the readings channel is closed and either every store handle is gone
    /// or `close` is cancelled; operations still queued then are committed, later ones
    /// fail with `Closed`.
    async fn run(
        mut self,
        mut batches: mpsc::Receiver<Batch>,
        mut ops: mpsc::Receiver<WriteOp>,
        close: CancellationToken,
    ) {
        let mut closing = false;
        let mut batches_open = true;
        let mut ops_open = true;
        let mut prune_timer = tokio::time::interval(self.config.prune_interval.get());
        prune_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let max_rows = self.config.batch_max_rows.max(1);
        let max_delay = self.config.batch_max_delay.get();
        let mut last_commit = tokio::time::Instant::now();
        // The previous group was full or cut short for room (see `Group::push_batch`).
        let mut pressed = false;
        let policy = self.policy.clone();
        // Batches of delayed sources left out of a commit made for write operations:
        // they open the next group, with their own due time.
        let mut held = Group::default();
        while batches_open || (ops_open && !closing) {
            let mut group = std::mem::take(&mut held);
            // Group commit: a batch waits no sooner than `batch_max_delay` after the
            // previous commit (bounding fsyncs per second on SD cards), a batch of a
            // source that acknowledges nothing waits longer (`CommitPolicy`), a write
            // operation or a reading that may change an alert not at all. Everything
            // already queued joins the group, up to `batch_max_rows` rows; whatever
            // arrives during a commit's fsync forms the next group.
            //
            // A commit due for write operations alone leaves held batches of delayed
            // sources waiting for their own due time (`Group::split_held`), unless
            // their source has no room for more (`CommitPolicy::commit_held_now`).
            let spacing = last_commit + max_delay;
            if group.is_empty() {
                tokio::select! {
                    biased;
                    _ = close.cancelled(), if !closing => {
                        closing = true;
                        continue;
                    }
                    op = ops.recv(), if ops_open => match op {
                        Some(op) => group.push_op(op),
                        None => ops_open = false,
                    },
                    batch = batches.recv(), if batches_open => match batch {
                        Some(batch) => group.push_batch(batch, &policy, spacing, pressed),
                        None => batches_open = false,
                    },
                    _ = prune_timer.tick() => {
                        self.prune_now();
                        continue;
                    }
                }
            }
            if !group.is_empty() {
                let mut commit_held = false;
                while group.rows < max_rows && (batches_open || ops_open) {
                    let mut took = false;
                    if ops_open {
                        match ops.try_recv() {
                            Ok(op) => {
                                group.push_op(op);
                                took = true;
                            }
                            Err(mpsc::error::TryRecvError::Disconnected) => ops_open = false,
                            Err(mpsc::error::TryRecvError::Empty) => {}
                        }
                    }
                    if batches_open && group.rows < max_rows {
                        match batches.try_recv() {
                            Ok(batch) => {
                                group.push_batch(batch, &policy, spacing, pressed);
                                took = true;
                            }
                            Err(mpsc::error::TryRecvError::Disconnected) => batches_open = false,
                            Err(mpsc::error::TryRecvError::Empty) => {}
                        }
                    }
                    if took {
                        continue;
                    }
                    // Closing (or no more readings to come): nothing waits any more.
                    let due = match group.due {
                        Some(due) if !closing && batches_open => due,
                        _ => break,
                    };
                    if tokio::time::Instant::now() >= due {
                        break;
                    }
                    tokio::select! {
                        biased;
                        _ = close.cancelled(), if !closing => closing = true,
                        op = ops.recv(), if ops_open => match op {
                            Some(op) => group.push_op(op),
                            None => ops_open = false,
                        },
                        batch = batches.recv(), if batches_open => match batch {
                            Some(batch) => group.push_batch(batch, &policy, spacing, pressed),
                            None => batches_open = false,
                        },
                        _ = policy.commit_held.notified() => {
                            commit_held = true;
                            break;
                        }
                        _ = tokio::time::sleep_until(due) => break,
                    }
                }
                // Before `split_held`, which takes the rows of what it keeps.
                pressed = group.rows >= max_rows || commit_held;
                if !closing && batches_open && !commit_held {
                    held = group.split_held(tokio::time::Instant::now(), max_rows);
                }
                let full = self.commit(group).is_err();
                last_commit = tokio::time::Instant::now();
                if full {
                    tokio::time::sleep(FULL_PAUSE).await;
                }
            }
            if !batches_open && self.committed.is_some() {
                // Every reading that was accepted is committed: downstream streams end.
                self.committed = None;
            }
        }
        ops.close();
        // Nothing is held once the readings channel is closed (see `split_held`'s
        // caller), but whatever is must not be lost.
        let mut last = held;
        while let Ok(op) = ops.try_recv() {
            last.ops.push(op);
        }
        if !last.is_empty() {
            let _ = self.commit(last);
        }
    }

    /// Commits one group. Returns `Err` only when the disk is full.
    fn commit(&mut self, mut group: Group) -> Result<(), ()> {
        group.ops.extend(
            std::mem::take(&mut group.lazy_ops)
                .into_iter()
                .map(|(_, op)| op),
        );
        self.stage
            .set_waiting((group.batches.len() + group.ops.len()) as u64);
        crate::progress::fault::hold_blocking(crate::progress::fault::STORE_WRITER_HANG);
        let result = self.commit_group(group);
        self.stage.set_waiting(0);
        result
    }

    fn commit_group(&mut self, group: Group) -> Result<(), ()> {
        let started = Instant::now();
        match self.try_commit(&group.batches, group.ops) {
            Ok(Outcome {
                per_batch,
                completions,
                max_id,
            }) => {
                let elapsed = started.elapsed();
                let now_ms = self.clock.now().timestamp_millis().max(0) as u64;
                self.stats.commits.fetch_add(1, Relaxed);
                self.stats.last_commit_ms.store(now_ms, Relaxed);
                self.stats
                    .last_commit_us
                    .store(elapsed.as_micros() as u64, Relaxed);
                // A commit without readings (the watchdog's probe, a cursor) says
                // nothing about the room for readings: only a stored batch ends a full
                // disk (else `/health` and the block of G9 flap while it lasts).
                if !group.batches.is_empty() {
                    if self.stats.disk_full.swap(false, Relaxed) {
                        tracing::warn!("Disk space is available again; ingest resumed.");
                    }
                    self.stage.unblock();
                }
                self.stage.progress();
                let mut sources: Vec<&str> = group
                    .batches
                    .iter()
                    .filter_map(|b| b.readings.first().map(|r| r.source.as_str()))
                    .collect();
                sources.sort_unstable();
                sources.dedup();
                for source in sources {
                    self.progress
                        .progress_of(&crate::progress::source_stage(source));
                }
                for (batch, result) in group.batches.into_iter().zip(per_batch) {
                    if let Ok(c) = &result {
                        self.stats
                            .readings_inserted
                            .fetch_add(c.inserted as u64, Relaxed);
                        self.stats
                            .readings_duplicate
                            .fetch_add(c.duplicates as u64, Relaxed);
                    }
                    if let Some(ack) = batch.ack {
                        let _ = ack.send(result);
                    }
                }
                for done in completions {
                    done(Ok(()));
                }
                if let (Some(id), Some(tx)) = (max_id, &self.committed) {
                    tx.send_replace(id);
                }
                Ok(())
            }
            Err((error, completions)) => {
                self.stats.commit_failures.fetch_add(1, Relaxed);
                let full = error == StoreError::Full;
                if full {
                    self.stats
                        .readings_refused_full
                        .fetch_add(group.rows as u64, Relaxed);
                    self.stats.disk_full.store(true, Relaxed);
                    self.stage.blocked_by("the disk is full");
                    let now = Instant::now();
                    let quiet = match self.last_full_log {
                        Some(t) => now.duration_since(t) < Duration::from_secs(60),
                        None => false,
                    };
                    if !quiet {
                        self.last_full_log = Some(now);
                        tracing::error!(
                            path = %self.config.path.display(),
                            refused = self.stats.readings_refused_full.load(Relaxed),
                            "The disk is full: readings are not acknowledged and ingest pauses until space returns."
                        );
                    }
                } else {
                    // Answered (with an error the log and the commit failure count
                    // report): not a stall.
                    self.stage.progress();
                    tracing::error!(error = %error, rows = group.rows, "A commit failed; its batches were not acknowledged.");
                }
                for batch in group.batches {
                    if let Some(ack) = batch.ack {
                        let _ = ack.send(Err(error.clone()));
                    }
                }
                for done in completions {
                    done(Err(error.clone()));
                }
                if full {
                    // Retention may free room for new readings.
                    self.prune_now();
                    Err(())
                } else {
                    Ok(())
                }
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn try_commit(
        &mut self,
        batches: &[Batch],
        ops: Vec<WriteOp>,
    ) -> Result<Outcome, (StoreError, Vec<Completion>)> {
        let conn = &self.conn;
        let mut completions = Vec::with_capacity(ops.len());
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            return Err((StoreError::from_sqlite(&e), completions));
        }
        let fail = |e: &rusqlite::Error| {
            let _ = conn.execute_batch("ROLLBACK");
            StoreError::from_sqlite(e)
        };
        // Fast path: no savepoint per batch. A batch can only fail on something
        // unexpected (the insert ignores duplicates, non-finite values are filtered);
        // then the group is redone with a savepoint per batch, so only that batch fails.
        let mut fast = true;
        let (per_batch, series, max_id, bound) = loop {
            let mut per_batch = Vec::with_capacity(batches.len());
            let mut series: Touched<'_> = HashMap::new();
            let mut max_id = None;
            let mut redo = false;
            // The chain's link of these readings, hashed as they are bound; only on the
            // fast path (a batch rolled back to its savepoint would leave its rows in
            // the hash) and when no operation rides with them (one may change a reading
            // not yet sealed, e.g. a clock step's move), else the seal reads the rows
            // back.
            let mut bound = (fast && ops.is_empty()).then(BoundReadings::new);
            for batch in batches {
                match insert_batch(
                    conn,
                    &batch.readings,
                    &self.stats,
                    &mut series,
                    !fast,
                    bound.as_mut(),
                ) {
                    Ok((committed, id)) => {
                        max_id = max_id.max(id);
                        per_batch.push(Ok(committed));
                    }
                    Err(e) if is_full(&e) => return Err((fail(&e), completions)),
                    Err(_) if fast => {
                        redo = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "A batch was refused by the store; the others proceed.");
                        per_batch.push(Err(StoreError::from_sqlite(&e)));
                    }
                }
            }
            if !redo {
                break (per_batch, series, max_id, bound);
            }
            fast = false;
            let _ = conn.execute_batch("ROLLBACK");
            if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
                return Err((StoreError::from_sqlite(&e), completions));
            }
        };
        for op in ops {
            let result = conn
                .execute_batch("SAVEPOINT op")
                .and_then(|()| (op.run)(conn))
                .and_then(|done| conn.execute_batch("RELEASE op").map(|()| done));
            match result {
                Ok(done) => completions.push(done),
                Err(e) => {
                    let _ = conn.execute_batch("ROLLBACK TO op; RELEASE op");
                    if is_full(&e) {
                        return Err((fail(&e), completions));
                    }
                }
            }
        }
        let upsert = conn.prepare_cached(UPSERT_SERIES).and_then(|mut stmt| {
            for ((source, device, metric), (r, count)) in &series {
                stmt.execute(params![
                    source,
                    device,
                    metric,
                    r.value,
                    r.unit,
                    to_micros(r.observed_at),
                    to_micros(r.received_at),
                    count
                ])?;
            }
            Ok(())
        });
        if let Err(e) = upsert {
            return Err((fail(&e), completions));
        }
        // The group transaction is about to commit: every row of this commit is
        // written above (readings, operations, series); per-commit work that must be
        // in the same transaction goes here, and only here.
        if let Err(e) = super::read::advance_counts(conn) {
            return Err((fail(&e), completions));
        }
        if let Err(e) = super::chain::seal_bound(conn, self.clock.now().timestamp_micros(), bound) {
            return Err((fail(&e), completions));
        }
        if let Err(e) = conn.execute_batch("COMMIT") {
            let error = if is_full(&e) {
                StoreError::Full
            } else {
                StoreError::RolledBack
            };
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            tracing::debug!(error = %e, "Commit failed.");
            return Err((error, completions));
        }
        Ok(Outcome {
            per_batch,
            completions,
            max_id,
        })
    }

    /// The time retention prunes at: the wall clock, but never further ahead of the
    /// previous pruning time than the monotonic clock moved. A wall clock stepped
    /// forward (by a day, say) does not make a day of readings look old; it is believed
    /// after a restart. A step back is followed at once (that prunes less).
    fn retention_now(&mut self) -> chrono::DateTime<chrono::Utc> {
        let wall = self.clock.now();
        let mono = Instant::now();
        let now = match self.retention_clock {
            Some((last, at)) => {
                let moved = chrono::Duration::from_std(mono.duration_since(at))
                    .unwrap_or(chrono::Duration::MAX);
                wall.min(last.checked_add_signed(moved).unwrap_or(wall))
            }
            None => wall,
        };
        self.retention_clock = Some((now, mono));
        now
    }

    fn prune_now(&mut self) {
        let now = self.retention_now();
        if let Err(e) = prune(&self.conn, &self.config, now, &self.stats, &mut self.scan) {
            if !is_full(&e) {
                tracing::warn!(error = %e, "Pruning the store failed; will retry.");
            }
        }
    }
}

struct Outcome {
    per_batch: Vec<Result<Committed, StoreError>>,
    completions: Vec<Completion>,
    max_id: Option<i64>,
}

fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
}

type Touched<'a> = HashMap<(&'a str, &'a str, &'a str), (&'a Reading, i64)>;

/// Inserts one batch, adding the series it touched to `series` and the rows it
/// inserted to `bound`; returns what was inserted and the highest new id. `guarded`
/// wraps it in a savepoint so a failure leaves no trace of this batch (and nothing in
/// `series`; the caller passes no `bound` then).
fn insert_batch<'a>(
    conn: &Connection,
    readings: &'a [Reading],
    stats: &StoreStats,
    series: &mut Touched<'a>,
    guarded: bool,
    mut bound: Option<&mut BoundReadings>,
) -> rusqlite::Result<(Committed, Option<i64>)> {
    let mut local: Touched<'a> = HashMap::new();
    let target = if guarded {
        conn.execute_batch("SAVEPOINT batch")?;
        &mut local
    } else {
        &mut *series
    };
    let result = (|| {
        let mut stmt = conn.prepare_cached(INSERT_READING)?;
        let mut committed = Committed::default();
        let mut max_id = None;
        for r in readings {
            if !r.value.is_finite() {
                // SQLite would store NaN as NULL and fail the whole batch.
                stats.readings_invalid.fetch_add(1, Relaxed);
                continue;
            }
            let n = stmt.execute(params![
                &r.uid.0[..],
                r.source,
                r.device,
                r.metric,
                r.value,
                r.unit,
                to_micros(r.observed_at),
                to_micros(r.received_at),
                r.flags,
                r.meta.as_ref().map(|m| m.text())
            ])?;
            if n == 1 {
                let id = conn.last_insert_rowid();
                committed.inserted += 1;
                max_id = Some(id);
                touch(target, r, 1);
                if let Some(bound) = bound.as_deref_mut() {
                    bound.add(&ReadingRow {
                        id,
                        uid: &r.uid.0,
                        source: &r.source,
                        device: &r.device,
                        metric: &r.metric,
                        value: r.value,
                        unit: r.unit.as_deref(),
                        observed_at: to_micros(r.observed_at),
                        flags: i64::from(r.flags),
                    });
                }
            } else {
                committed.duplicates += 1;
            }
        }
        Ok((committed, max_id))
    })();
    if !guarded {
        return result;
    }
    match result {
        Ok(v) => {
            conn.execute_batch("RELEASE batch")?;
            for (_, (r, count)) in local {
                touch(series, r, count);
            }
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO batch; RELEASE batch");
            Err(e)
        }
    }
}

/// Counts `count` new rows of `r`'s series and keeps its newest reading.
fn touch<'a>(series: &mut Touched<'a>, r: &'a Reading, count: i64) {
    let slot = series
        .entry((r.source.as_str(), r.device.as_str(), r.metric.as_str()))
        .or_insert((r, 0));
    if r.observed_at >= slot.0.observed_at {
        slot.0 = r;
    }
    slot.1 += count;
}

/// Bytes in use by the database (pages that are not on the free list).
pub(crate) fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(((pages - free).max(0) * size) as u64)
}

const PRUNE_CHUNK: usize = 5000;

/// At most this many ids of the range where synced and unsynced readings interleave are
/// scanned per retention pass (see [`prune_retention`]).
const RETENTION_SCAN_WINDOW: i64 = 50_000;

/// Where the retention pass left off in the interleaved range; kept by the writer
/// between passes (a restart simply begins again at the start of the range).
#[derive(Debug, Default)]
pub(crate) struct RetentionScan {
    after: i64,
}

/// The largest id whose reading arrived before `cutoff`, found by bisection over ids
/// (a few index lookups instead of a scan): ids follow arrival, so `received_at` grows
/// with the id except across a clock step. The result only limits which ids a pass
/// looks at; every deletion still checks `received_at < cutoff` itself, so a clock step
/// can delay the deletion of a row but never delete a recent one. 0 if there is none.
fn retention_bound(conn: &Connection, cutoff: i64) -> rusqlite::Result<i64> {
    let first_at = |id: i64| -> rusqlite::Result<Option<(i64, i64)>> {
        conn.prepare_cached(
            "SELECT id, received_at FROM readings WHERE id >= ?1 ORDER BY id LIMIT 1",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
    };
    let Some((mut lo, received)) = first_at(i64::MIN)? else {
        return Ok(0);
    };
    if received >= cutoff {
        return Ok(0);
    }
    let mut hi: i64 = conn.query_row("SELECT MAX(id) FROM readings", [], |r| r.get(0))?;
    // Invariant: lo <= hi, and the row at or after lo arrived before the cutoff.
    while lo < hi {
        let mid = lo + (hi - lo + 1) / 2;
        match first_at(mid)? {
            Some((id, at)) if at < cutoff => lo = id.min(hi),
            _ => hi = mid - 1,
        }
    }
    Ok(lo)
}

/// Deletes synced readings that arrived before `cutoff` without scanning the table:
/// below the oldest unsynced reading every row is synced, so the pass walks only the
/// rows it deletes (up to the bisected [`retention_bound`]). Between the oldest
/// unsynced reading and that bound, synced and unsynced rows can interleave (live
/// readings are synced newest first while a backlog drains; G8 holds some back); that
/// range is scanned [`RETENTION_SCAN_WINDOW`] ids per pass, resuming where the last
/// pass stopped, so a long outage's backlog is not re-read every minute.
fn prune_retention(
    conn: &Connection,
    cutoff: i64,
    scan: &mut RetentionScan,
    newest: i64,
    at: i64,
) -> rusqlite::Result<usize> {
    let bound = retention_bound(conn, cutoff)?.min(newest - 1);
    if bound <= 0 {
        return Ok(0);
    }
    let oldest_unsynced: Option<i64> = conn
        .query_row(
            "SELECT id FROM readings WHERE synced = 0 ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let delete_range = |after: i64, up_to: i64| -> rusqlite::Result<usize> {
        let mut deleted = 0;
        loop {
            let n = delete_checkpointed(
                conn,
                "DELETE FROM readings WHERE id IN (SELECT id FROM readings \
                 WHERE id > ?1 AND id <= ?2 AND synced = 1 AND received_at < ?3 \
                 ORDER BY id LIMIT ?4) RETURNING id",
                params![after, up_to, cutoff, PRUNE_CHUNK],
                "retention",
                at,
            )?
            .0;
            deleted += n;
            if n < PRUNE_CHUNK {
                return Ok(deleted);
            }
        }
    };
    let below = oldest_unsynced.map_or(bound, |u| bound.min(u - 1));
    let mut deleted = delete_range(i64::MIN, below)?;
    if let Some(u) = oldest_unsynced.filter(|&u| u <= bound) {
        let from = scan.after.max(u - 1);
        let to = bound.min(from.saturating_add(RETENTION_SCAN_WINDOW));
        deleted += delete_range(from, to)?;
        scan.after = if to >= bound { 0 } else { to };
    }
    Ok(deleted)
}

/// Runs one pruning `DELETE … RETURNING id` of readings and, in the same transaction
/// (a savepoint), records a chain checkpoint up to the highest id it deleted (G10), so
/// `outpost verify` knows rows up to there may be gone. Returns the rows deleted and
/// the range of their ids.
fn delete_checkpointed(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    reason: &str,
    at: i64,
) -> rusqlite::Result<(usize, Option<(i64, i64)>)> {
    conn.execute_batch("SAVEPOINT prune")?;
    let result = (|| {
        let mut stmt = conn.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        let (mut n, mut range) = (0usize, None::<(i64, i64)>);
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            n += 1;
            range = Some(range.map_or((id, id), |(a, b)| (a.min(id), b.max(id))));
        }
        if let Some((_, last)) = range {
            super::chain::checkpoint(conn, super::chain::Table::Readings, last, reason, at)?;
        }
        Ok((n, range))
    })();
    match result {
        Ok(v) => conn.execute_batch("RELEASE prune").map(|()| v),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO prune; RELEASE prune");
            Err(e)
        }
    }
}

/// Enforces retention and the size cap (G4), in this order: synced readings older than
/// the retention window; then, while over `max_size`, the oldest synced readings; then
/// the oldest unsynced ones (counted durably and logged at error level). Only the
/// readings and rejected tables are ever pruned.
pub(crate) fn prune(
    conn: &Connection,
    config: &StorageConfig,
    now: chrono::DateTime<chrono::Utc>,
    stats: &StoreStats,
    scan: &mut RetentionScan,
) -> rusqlite::Result<()> {
    let retention =
        chrono::Duration::from_std(config.retention.get()).unwrap_or(chrono::Duration::MAX);
    let cutoff = to_micros(
        now.checked_sub_signed(retention)
            .unwrap_or(chrono::DateTime::UNIX_EPOCH),
    );
    // The newest reading is never pruned: SQLite gives a new row the highest id + 1,
    // and an emptied table would hand out ids the chain already covers (G10).
    let newest: i64 = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM readings", [], |r| {
        r.get(0)
    })?;
    let at = to_micros(now);
    let mut synced = prune_retention(conn, cutoff, scan, newest, at)?;
    conn.execute(
        "DELETE FROM rejected WHERE id <= (SELECT MAX(id) FROM rejected) - 1000",
        [],
    )?;
    let cap = config.max_size.0;
    while used_bytes(conn)? > cap {
        let (n, _) = delete_checkpointed(
            conn,
            "DELETE FROM readings WHERE id IN (SELECT id FROM readings WHERE synced = 1 \
             AND id < ?1 ORDER BY id LIMIT ?2) RETURNING id",
            params![newest, PRUNE_CHUNK],
            "size_cap",
            at,
        )?;
        synced += n;
        if n == 0 {
            break;
        }
    }
    let mut unsynced = 0usize;
    let mut unsynced_ids: Option<(i64, i64)> = None;
    while used_bytes(conn)? > cap {
        let (n, range) = delete_checkpointed(
            conn,
            "DELETE FROM readings WHERE id IN (SELECT id FROM readings WHERE synced = 0 \
             AND id < ?1 ORDER BY id LIMIT ?2) RETURNING id",
            params![newest, PRUNE_CHUNK],
            "size_cap",
            at,
        )?;
        if n == 0 {
            break;
        }
        unsynced += n;
        if let Some((first, last)) = range {
            unsynced_ids = Some(unsynced_ids.map_or((first, last), |(a, b): (i64, i64)| {
                (a.min(first), b.max(last))
            }));
        }
    }
    if unsynced > 0 {
        conn.execute(
            "INSERT INTO counters(name, value) VALUES ('pruned_unsynced', ?1) \
             ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            [unsynced as i64],
        )?;
        let (first_id, last_id) = unsynced_ids.unwrap_or((0, 0));
        // The entry is sealed at once (pruning runs between group commits).
        conn.execute_batch("SAVEPOINT pruned_unsynced")?;
        let entry = super::audit::append(
            conn,
            &crate::clock::Clock::from_fn(move || now),
            &super::audit::AuditEntry::by_process(
                super::audit::AuditKind::PrunedUnsynced,
                serde_json::json!({
                    "readings": unsynced,
                    "first_id": first_id,
                    "last_id": last_id,
                    "max_size": config.max_size.0,
                }),
            ),
        )
        .and_then(|_| super::chain::seal(conn, at));
        match entry {
            Ok(_) => conn.execute_batch("RELEASE pruned_unsynced")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK TO pruned_unsynced; RELEASE pruned_unsynced");
                return Err(e);
            }
        }
        stats.pruned_unsynced.fetch_add(unsynced as u64, Relaxed);
        tracing::error!(
            pruned = unsynced,
            max_size = %config.max_size,
            "The store reached storage.max_size: the oldest UNSYNCED readings were deleted and will never reach central."
        );
    }
    if synced > 0 {
        stats.pruned_synced.fetch_add(synced as u64, Relaxed);
        tracing::debug!(pruned = synced, "Pruned synced readings.");
    }
    if synced + unsynced > 0 {
        // Hand freed pages back to the filesystem (auto_vacuum = INCREMENTAL).
        conn.execute_batch("PRAGMA incremental_vacuum")?;
    }
    Ok(())
}
