//! The sync worker: one task that, every interval, sends a heartbeat, the alert events,
//! the readings that arrived since the previous round (newest first) and then as much
//! backlog (oldest first, paced) as fits before the next round is due.
//!
//! Batches are pipelined: while a backlog batch is uploading, the next is read from
//! SQLite, and the synced marks of batches already committed are written by the store
//! writer. Up to `sync.backlog_connections` backlog batches upload at once, each in its
//! own transaction on its own connection. A mark is only ever requested after the
//! central commit of its batch.
//!
//! **One local write per round.** The marks of the live readings, alert events and
//! summaries, the previous round's chain marks, the head's signature and the round's
//! success are owed and written together before the chain goes up ([`Worker::settle`]):
//! at a site's rate a round costs one commit, not six (issue 15: SD-card wear). The
//! backlog, which stays below the live readings, marks its batches as they commit; a
//! round that drained a full batch of it makes its one write at once rather than wait
//! for a commit of readings.
//!
//! **Queues and waits (G9).** The worker waits for PostgreSQL, for its own blocking
//! reads, and for the store writer to commit marks (one in flight while backlog is
//! pipelined, the ids that come due meanwhile merged into the next; the round's one
//! write before the chain goes up). Nothing waits for the
//! worker, and the writer never waits for anyone, so sync can be slow but never wedge
//! another stage or itself.

use super::heartbeat::{self, Heartbeat};
use super::local::{self, AlertEventColumns, Owed, ReadingColumns, Window};
use super::postgres::{connect, Central, ConnectOptions};
use super::{Gateway, SyncConfig, SyncContext, SyncError};
use crate::backoff::{Backoff, Jitter};
use crate::clock::Clock;
use crate::ratelimit::LogLimiter;
use crate::store::Store;
use chrono::{DateTime, Utc};
use rusqlite::Connection;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Holds back readings whose clock was not synchronised (G8) for `bound` of monotonic
/// time. It remembers, at a few points in time, the newest reading id in the store; a
/// held reading is released once its id is at most the newest id seen `bound` ago —
/// it has then waited at least `bound`. Clock jumps do not move the monotonic clock, so
/// a gateway whose clock jumps from 1970 to today does not release everything at once
/// before the correction could run. After a restart the wait starts again (held rows
/// wait longer, never shorter).
#[derive(Debug)]
pub struct HoldBack {
    bound: Duration,
    checkpoints: VecDeque<(Instant, i64)>,
    released: i64,
}

/// At most this many checkpoints are kept (closer ones merge), so memory is bounded
/// whatever the bound and the interval; a release is late by at most bound / this.
const MAX_CHECKPOINTS: u32 = 1000;

impl HoldBack {
    pub fn new(bound: Duration) -> HoldBack {
        HoldBack {
            bound,
            checkpoints: VecDeque::new(),
            released: 0,
        }
    }

    /// Records that the newest reading id was `head` at `now`.
    pub fn observe(&mut self, now: Instant, head: i64) {
        let merge_within = self.bound / MAX_CHECKPOINTS;
        match self.checkpoints.back_mut() {
            Some((_, last)) if *last >= head => {}
            Some((at, last)) if now.duration_since(*at) < merge_within => *last = head,
            _ => self.checkpoints.push_back((now, head)),
        }
    }

    /// The highest id of a held reading that may go now.
    pub fn release_up_to(&mut self, now: Instant) -> i64 {
        if self.bound.is_zero() {
            return i64::MAX;
        }
        while let Some(&(at, head)) = self.checkpoints.front() {
            if now.duration_since(at) < self.bound {
                break;
            }
            self.released = self.released.max(head);
            self.checkpoints.pop_front();
        }
        self.released
    }
}

/// What the worker does, reported to the observer of [`run_observed`] (the fleet
/// benchmark records every attempt towards central with it).
#[derive(Debug)]
pub enum SyncEvent<'a> {
    /// A round starts; `connect` when it opens a new connection first (the first round
    /// and every round after a failure).
    RoundStarted {
        connect: bool,
    },
    RoundSucceeded,
    /// The round failed; the next one starts after `retry_in`.
    RoundFailed {
        error: &'a SyncError,
        retry_in: Duration,
    },
}

/// Called by the worker for every [`SyncEvent`]; must be quick (it runs on the worker).
pub type SyncObserver = std::sync::Arc<dyn Fn(&SyncEvent) + Send + Sync>;

/// Runs the sync worker until `shutdown` is cancelled. An upload in flight at shutdown
/// is abandoned: it was not marked, so it is retried (and deduplicated) next time.
///
/// Central's certificate is recorded in a watch of its own and the system clock is
/// used (tests, benchmarks); the agent passes its own with [`run_in`].
pub async fn run(
    config: SyncConfig,
    gateway: impl Into<Gateway>,
    store: Store,
    shutdown: CancellationToken,
) {
    run_observed(
        config,
        gateway,
        store,
        shutdown,
        std::sync::Arc::new(|_| {}),
    )
    .await
}

/// [`run`], reporting each round's start and outcome to `observe`.
pub async fn run_observed(
    config: SyncConfig,
    gateway: impl Into<Gateway>,
    store: Store,
    shutdown: CancellationToken,
    observe: SyncObserver,
) {
    let context = SyncContext {
        gateway: gateway.into(),
        certs: crate::tls::CertWatch::default().saving_to(store.clone()),
        store,
        clock: Clock::system(),
    };
    run_in(config, context, shutdown, observe).await
}

/// Runs the sync worker in `context` until `shutdown` is cancelled, reporting each
/// round's start and outcome to `observe`. An upload in flight at shutdown is
/// abandoned: it was not marked, so it is retried (and deduplicated) next time.
pub async fn run_in(
    config: SyncConfig,
    context: SyncContext,
    shutdown: CancellationToken,
    observe: SyncObserver,
) {
    let mut worker = Worker::new(config, context, shutdown.clone());
    tracing::info!(
        gateway = %worker.gateway_id,
        interval = %worker.config.interval,
        batch_size = worker.config.batch_size,
        "Central sync started."
    );
    let mut next = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next) => {}
        }
        let started = Instant::now();
        let deadline = started + worker.config.interval.get();
        observe(&SyncEvent::RoundStarted {
            connect: worker.central.is_none(),
        });
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => break,
            outcome = worker.round(deadline) => outcome,
        };
        worker.stage.set_waiting(0);
        match outcome {
            Ok(()) => {
                if worker.backoff.attempt() > 0 {
                    tracing::info!(target_db = worker.target(), "Central sync works again.");
                }
                worker.backoff.reset();
                worker.stage.progress();
                observe(&SyncEvent::RoundSucceeded);
                next = deadline;
            }
            Err(e) => {
                let wait = worker.backoff.next_delay();
                observe(&SyncEvent::RoundFailed {
                    error: &e,
                    retry_in: wait,
                });
                worker.failed(&e, wait).await;
                next = Instant::now() + wait;
            }
        }
    }
    if !worker.owed.is_empty() {
        // Marks of what central committed (the store writer outlives the worker); if
        // this does not make it, the rows are sent again and deduplicated.
        let _ =
            tokio::time::timeout(Duration::from_secs(2), worker.owed.apply(&worker.store)).await;
    }
    tracing::info!("Central sync stopped.");
}

struct Worker {
    config: SyncConfig,
    gateway_id: String,
    site: String,
    clock: Clock,
    options: ConnectOptions,
    store: Store,
    shutdown: CancellationToken,
    /// The worker's own read connection; `None` while a read runs on the blocking pool.
    /// (In a mutex only so that the worker is `Sync`; it is never contended.)
    reader: std::sync::Mutex<Option<Connection>>,
    central: Option<Central>,
    /// The connections besides `central` that upload backlog batches concurrently
    /// (`sync.backlog_connections` - 1 of them while a backlog drains, else none).
    backlog_central: Vec<Central>,
    /// Whether one connection was seen to be slower than `backlog_rows_per_second`: a
    /// backlog round on one connection ran to its end without the pacing ever holding
    /// it back. Only then (or without pacing) do extra connections open: where the
    /// pacing is the limit they would add connections to central and nothing else.
    one_too_slow: bool,
    backoff: Backoff,
    hold: HoldBack,
    /// The newest id at the start of the previous round: what arrived since is "live".
    live_floor: Option<i64>,
    last_sync_at: Option<DateTime<Utc>>,
    last_error: Option<(String, DateTime<Utc>)>,
    failure_log: LogLimiter,
    /// Acknowledgements from central that cannot be read or marked for lack of grants.
    ack_grant_log: LogLimiter,
    /// The hash chain's share of each round (issue 17): key pinning, audit log, links.
    chain: super::integrity::ChainSync,
    /// The local writes owed for what central committed (marks), applied in the round's
    /// one write ([`Worker::settle`]); the chain's wait for the next round's.
    owed: Owed,
    /// G9: a round under way is work waiting for this worker, except while it waits
    /// for central (bounded by the connect and statement timeouts; a failure is
    /// reported by the `sync` check, not as a stall).
    stage: crate::progress::Stage,
}

impl Worker {
    fn new(config: SyncConfig, context: SyncContext, shutdown: CancellationToken) -> Worker {
        let SyncContext {
            gateway,
            store,
            certs,
            clock,
        } = context;
        let stage = store.progress().stage(
            crate::progress::SYNC,
            "sync round under way",
            Some(crate::progress::STORE),
        );
        Worker {
            options: ConnectOptions {
                certs: Some(certs),
                ..ConnectOptions::from_config(&config, &gateway.gateway_id)
            },
            backoff: Backoff::new(config.backoff_initial.get(), config.backoff_max.get())
                .with_jitter(if config.backoff_jitter {
                    Jitter::Full
                } else {
                    Jitter::None
                }),
            hold: HoldBack::new(config.clock_hold_max.get()),
            chain: super::integrity::ChainSync::for_store(&store, config.batch_size),
            owed: Owed::default(),
            gateway_id: gateway.gateway_id,
            site: gateway.site,
            clock,
            config,
            store,
            shutdown,
            reader: std::sync::Mutex::new(None),
            central: None,
            backlog_central: Vec::new(),
            one_too_slow: false,
            live_floor: None,
            last_sync_at: None,
            last_error: None,
            failure_log: LogLimiter::new(Duration::from_secs(300)),
            ack_grant_log: LogLimiter::new(Duration::from_secs(3600)),
            stage,
        }
    }

    fn target(&self) -> &str {
        self.central.as_ref().map(|c| c.target()).unwrap_or("")
    }

    /// Runs `f` on the read connection on the blocking pool.
    fn start_read<T, F>(&self, f: F) -> JoinHandle<(Option<Connection>, Result<T, SyncError>)>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.reader.lock().ok().and_then(|mut c| c.take());
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match conn {
                Some(c) => c,
                None => match store.reader() {
                    Ok(c) => c,
                    Err(e) => return (None, Err(SyncError::Local(e.to_string()))),
                },
            };
            let result = f(&conn).map_err(|e| SyncError::Local(e.to_string()));
            (Some(conn), result)
        })
    }

    /// The result of a [`Worker::start_read`]; its connection goes back to the worker.
    fn finished_read<T>(
        &self,
        joined: Result<(Option<Connection>, Result<T, SyncError>), tokio::task::JoinError>,
    ) -> Result<T, SyncError> {
        match joined {
            Ok((conn, result)) => {
                if let Ok(mut slot) = self.reader.lock() {
                    *slot = conn;
                }
                result
            }
            Err(e) => Err(SyncError::Local(format!("the read task failed: {e}"))),
        }
    }

    async fn finish_read<T>(
        &self,
        handle: JoinHandle<(Option<Connection>, Result<T, SyncError>)>,
    ) -> Result<T, SyncError> {
        self.finished_read(handle.await)
    }

    async fn read<T, F>(&self, f: F) -> Result<T, SyncError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let handle = self.start_read(f);
        self.finish_read(handle).await
    }

    /// Marks uploaded readings synced, in the background (the store writer commits it
    /// with its next group). A failed mark only means the rows are sent again.
    fn spawn_mark(&self, ids: Vec<i64>) -> JoinHandle<()> {
        let store = self.store.clone();
        tokio::spawn(async move {
            if let Err(e) = store
                .write(move |c| local::mark_readings_synced(c, &ids))
                .await
            {
                tracing::warn!(error = %e, "Marking readings synced failed; they will be sent again.");
            }
        })
    }

    async fn connected(&mut self) -> Result<(), SyncError> {
        if self.central.is_none() {
            let central = connect(&self.options).await?;
            central.check_schema().await?;
            tracing::info!(
                target_db = central.target(),
                "Connected to central PostgreSQL."
            );
            self.central = Some(central);
        }
        Ok(())
    }

    /// One round: heartbeat, alert events, live readings, then backlog until `deadline`,
    /// then the round's one local write ([`Worker::settle`]), then the hash chain.
    async fn round(&mut self, deadline: Instant) -> Result<(), SyncError> {
        self.connected().await?;
        self.stage.set_waiting(1);
        let head = self.read(local::head).await?;
        let now = Instant::now();
        self.hold.observe(now, head);
        let release = self.hold.release_up_to(now);
        self.heartbeat().await?;
        self.apply_central_acks().await?;
        self.sync_alert_events().await?;
        self.sync_summaries().await?;
        let floor = self
            .live_floor
            .unwrap_or_else(|| head.saturating_sub(self.config.batch_size as i64));
        self.send_live(floor, head, release).await?;
        self.live_floor = Some(head);
        // The live readings' marks are owed until `settle`: the backlog stays below them.
        let drained = self.drain_backlog(deadline, release, floor).await?;
        let at = self.clock.now();
        self.settle(at, drained).await?;
        self.sync_chain().await?;
        self.last_sync_at = Some(at);
        Ok(())
    }

    /// The round's one local write: every mark owed (this round's readings, events and
    /// summaries, the previous round's audit rows, links and signatures), the signature
    /// of the chain's head (uploaded next, with the links those marks make eligible) and
    /// the round's success (`at`). At a site's rate that is one commit per interval
    /// rather than one per kind of row, and usually not even that: it rides with the
    /// next commit of readings (issue 15: SD-card wear). After a round that drained at
    /// least a full batch of backlog (`drained` rows) it is written at once: those
    /// marks made a commit per batch, so waiting saves next to nothing, and the round's
    /// newest readings would show as unsynced for up to [`SETTLE_WITHIN`] after the
    /// backlog is in central (a quiet site's writer may make no other commit
    /// meanwhile). Less than a batch (readings released after a clock hold, G8, at a
    /// site's rate) still waits.
    async fn settle(&mut self, at: DateTime<Utc>, drained: u64) -> Result<(), SyncError> {
        // Each in its own savepoint (`Owed`): a signature that fails leaves the marks.
        if let Some(sign) = self.store.head_signing() {
            self.owed.push(sign);
        }
        self.owed.push(move |c| local::record_success(c, at));
        // It may wait for a commit the writer makes anyway (readings held for their
        // delay): nothing waits on these rows but the chain's upload below.
        let owed = self.owed.take();
        let written = if drained >= self.config.batch_size as u64 {
            self.store.write(owed).await
        } else {
            let within = (self.config.interval.get() / 2).min(SETTLE_WITHIN);
            self.store.write_within(within, owed).await
        };
        written.map_err(|e| SyncError::Local(e.to_string()))
    }

    async fn heartbeat(&mut self) -> Result<(), SyncError> {
        let crate::store::BacklogSummary {
            rows,
            oldest_received_at: oldest,
        } = self.read(crate::store::backlog).await?;
        let hb = Heartbeat {
            gateway_id: self.gateway_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            site: self.site.clone(),
            boot_id: heartbeat::boot_id(),
            clock_synchronized: heartbeat::clock_synchronized(),
            backlog_rows: rows,
            oldest_unsynced_at: oldest,
            backlog_age_seconds: oldest
                .map(|t| (self.clock.now() - t).num_milliseconds() as f64 / 1000.0),
            last_sync_at: self.last_sync_at,
            last_error: self.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_at: self.last_error.as_ref().map(|(_, t)| *t),
        };
        let central = self.central.as_ref().ok_or_else(not_connected)?;
        self.stage.set_waiting(0);
        let sent = heartbeat::send(central, &hb).await;
        self.stage.set_waiting(1);
        self.stage.progress();
        sent
    }

    /// Acknowledgements taken centrally for this gateway: each is checked, applied
    /// locally (idempotent: keyed by its central id) and marked applied centrally with
    /// its result; an unknown or resolved alarm is a result, not an error. The
    /// `acknowledged` events this writes go up in the same round.
    async fn apply_central_acks(&mut self) -> Result<(), SyncError> {
        let central = self.central.as_ref().ok_or_else(not_connected)?;
        self.stage.set_waiting(0);
        let pending = central.pending_acks(&self.gateway_id, ACKS_PER_ROUND).await;
        self.stage.set_waiting(1);
        let pending = match pending {
            Err(e) if is_missing_grant(&e) => {
                // A role without the schema-2 grant must not stop readings from
                // syncing: acknowledgements from central wait, the rest goes on.
                if let Some(suppressed) = self.ack_grant_log.allow() {
                    tracing::warn!(error = %e, suppressed, "Cannot read acknowledgements from central: grant the gateways' role SELECT, UPDATE on outpost.alert_acks (docs/operator.md); readings and events still sync.");
                }
                return Ok(());
            }
            other => other?,
        };
        for ack in pending {
            let req = crate::alerts::ack::AckRequest {
                rule: ack.rule,
                device: ack.device,
                by: ack.acked_by,
                note: ack.note,
                channel: crate::alerts::ack::Channel::Central,
                site: self.site.clone(),
                gateway_id: self.gateway_id.clone(),
                idempotency_key: Some(format!("central:{}", ack.id)),
            };
            let problems = req.problems();
            let result = if !problems.is_empty() {
                let why: String = problems.join("; ").chars().take(500).collect();
                format!("invalid: {why}")
            } else {
                crate::alerts::ack::acknowledge(&self.store, req, &self.clock)
                    .await
                    .map_err(|e| SyncError::Local(e.to_string()))?
                    .result()
                    .to_string()
            };
            tracing::info!(id = ack.id, %result, "Acknowledgement from central applied.");
            let central = self.central.as_ref().ok_or_else(not_connected)?;
            self.stage.set_waiting(0);
            let marked = central
                .mark_ack_applied(&self.gateway_id, ack.id, &result)
                .await;
            self.stage.set_waiting(1);
            match marked {
                Err(e) if is_missing_grant(&e) => {
                    // Applied locally (and remembered by its id): marked at a later
                    // round once the grant is there, with the same result.
                    if let Some(suppressed) = self.ack_grant_log.allow() {
                        tracing::warn!(error = %e, suppressed, "Cannot mark acknowledgements applied in central: grant the gateways' role UPDATE on outpost.alert_acks (docs/operator.md).");
                    }
                    return Ok(());
                }
                other => {
                    other?;
                }
            }
        }
        Ok(())
    }

    /// Alert events, oldest first, every one of them each round (they are few).
    async fn sync_alert_events(&mut self) -> Result<(), SyncError> {
        if !self.read(local::has_alert_events).await? {
            return Ok(());
        }
        let max = self.config.batch_size;
        loop {
            let events: AlertEventColumns = self
                .read(move |c| local::select_alert_events(c, max))
                .await?;
            if events.is_empty() {
                return Ok(());
            }
            let central = self.central.as_ref().ok_or_else(not_connected)?;
            self.stage.set_waiting(0);
            let uploaded = central.upload_alert_events(&self.gateway_id, &events).await;
            self.stage.set_waiting(1);
            self.stage.progress();
            uploaded?;
            let count = events.len();
            let ids = events.ids;
            self.owed
                .push(move |c| local::mark_alert_events_synced(c, &ids));
            if count < max {
                return Ok(());
            }
            // The next select must not see these rows again.
            self.owed.apply(&self.store).await?;
        }
    }

    /// Daily summaries of closed days (few: one per device and metric a day).
    async fn sync_summaries(&mut self) -> Result<(), SyncError> {
        let max = self.config.batch_size;
        loop {
            let rows = self.read(move |c| local::select_summaries(c, max)).await?;
            if rows.is_empty() {
                return Ok(());
            }
            let central = self.central.as_ref().ok_or_else(not_connected)?;
            self.stage.set_waiting(0);
            let uploaded = central.upload_summaries(&self.gateway_id, &rows).await;
            self.stage.set_waiting(1);
            self.stage.progress();
            uploaded?;
            let count = rows.len();
            let keys = rows.keys;
            self.owed
                .push(move |c| local::mark_summaries_synced(c, &keys));
            if count < max {
                return Ok(());
            }
            // The next select must not see these rows again.
            self.owed.apply(&self.store).await?;
        }
    }

    /// The audit log, the hash chain's links, signatures and checkpoints (after the rows
    /// they cover), and the key pinned centrally.
    async fn sync_chain(&mut self) -> Result<(), SyncError> {
        let central = self.central.as_ref().ok_or_else(not_connected)?;
        self.stage.set_waiting(0);
        let done = self
            .chain
            .round(central, &self.gateway_id, &mut self.owed)
            .await;
        self.stage.set_waiting(1);
        self.stage.progress();
        done
    }

    /// Live first: everything that arrived since the previous round, newest first. The
    /// marks are owed to the round's one write.
    async fn send_live(&mut self, floor: i64, head: i64, release: i64) -> Result<(), SyncError> {
        let max = self.config.batch_size;
        let mut up_to = head;
        while up_to > floor && !self.shutdown.is_cancelled() {
            let window = Window::NewestFirst {
                above: floor,
                up_to,
            };
            let rows = self
                .read(move |c| local::select_readings(c, window, release, max))
                .await?;
            let Some(&lowest) = rows.ids.last() else {
                break;
            };
            self.upload(&rows).await?;
            let ids = rows.ids;
            self.owed
                .push(move |c| local::mark_readings_synced(c, &ids));
            up_to = lowest - 1;
        }
        Ok(())
    }

    /// The backlog, oldest first, paced to `backlog_rows_per_second`, until `deadline`.
    ///
    /// Up to `backlog_connections` batches upload at once, each in its own transaction
    /// on its own connection, while the next batch is read. Batches commit in any order:
    /// each row carries its own `seq`, and each batch's rows are marked synced after its
    /// own commit (marks that come due while one is being written are merged into the
    /// next). Memory: the batches in flight plus the one being read. Ids above `up_to`
    /// are the round's live readings, sent already and marked in the round's write.
    /// Returns the rows uploaded.
    async fn drain_backlog(
        &mut self,
        deadline: Instant,
        release: i64,
        up_to: i64,
    ) -> Result<u64, SyncError> {
        let max = self.config.batch_size;
        let window = Window::OldestFirst { after: 0, up_to };
        let first = self
            .read(move |c| local::select_readings(c, window, release, max))
            .await?;
        let unpaced = self.config.backlog_rows_per_second == 0 || self.one_too_slow;
        if first.len() < max || !unpaced {
            // No more than a batch, or one connection keeps up with the pacing: one
            // connection is plenty.
            self.backlog_central.clear();
        } else {
            self.open_backlog_connections().await;
        }
        let alone = self.backlog_central.is_empty();
        let Drained { paced, rows } = self.drain_batches(first, deadline, release, up_to).await?;
        if !self.shutdown.is_cancelled() && Instant::now() < deadline {
            // Drained before the deadline: the extra connections are not needed now.
            self.backlog_central.clear();
            self.one_too_slow = false;
        } else if alone {
            // A whole round on one connection: did the pacing ever hold it back?
            self.one_too_slow = !paced;
        }
        Ok(rows)
    }

    /// Opens the extra backlog connections that are missing. One that cannot be opened
    /// only means fewer uploads in flight this round.
    async fn open_backlog_connections(&mut self) {
        let wanted = self.config.backlog_connections.saturating_sub(1);
        while self.backlog_central.len() < wanted && !self.shutdown.is_cancelled() {
            match connect(&self.options).await {
                Ok(central) => self.backlog_central.push(central),
                Err(e) => {
                    tracing::debug!(error = %e, "An extra connection for the backlog failed; draining with fewer.");
                    return;
                }
            }
        }
    }

    /// Uploads the backlog from `first` on (ids up to `up_to`), on the connections there
    /// are, until it is exhausted, `deadline` passes or an upload fails.
    async fn drain_batches(
        &self,
        first: ReadingColumns,
        deadline: Instant,
        release: i64,
        up_to: i64,
    ) -> Result<Drained, SyncError> {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let max = self.config.batch_size;
        let rate = self.config.backlog_rows_per_second;
        let started = Instant::now();
        let central = self.central.as_ref().ok_or_else(not_connected)?;
        let mut idle: Vec<&Central> = self.backlog_central.iter().rev().collect();
        idle.push(central);
        let mut uploads = FuturesUnordered::new();
        // The next batch: read (`ready`) or being read (`reading`); `None` in both once
        // the backlog is exhausted.
        let mut ready = (!first.is_empty()).then_some(first);
        let mut reading = None;
        let mut sent = 0u64;
        let mut marking: Option<JoinHandle<()>> = None;
        let mut unmarked: Vec<i64> = Vec::new();
        let mut result = Ok(());
        let mut drained = Drained::default();
        loop {
            let stopping =
                result.is_err() || self.shutdown.is_cancelled() || Instant::now() >= deadline;
            let due = (rate > 0)
                .then(|| started + Duration::from_secs_f64(sent as f64 / rate as f64))
                .filter(|due| *due > Instant::now());
            if result.is_err() {
                // The round fails; uploads still in flight are abandoned (not marked,
                // so sent again and deduplicated).
                break;
            }
            if !stopping && due.is_none() && ready.is_some() {
                if let Some(on) = idle.pop() {
                    let rows = ready.take().unwrap_or_default();
                    if let Some(&last) = rows.ids.last() {
                        let window = Window::OldestFirst { after: last, up_to };
                        reading =
                            Some(self.start_read(move |c| {
                                local::select_readings(c, window, release, max)
                            }));
                    }
                    sent += rows.len() as u64;
                    uploads.push(async move {
                        let uploaded = self.upload_on(on, &rows).await;
                        (on, rows.ids, uploaded)
                    });
                    continue;
                }
            }
            let exhausted = ready.is_none() && reading.is_none();
            if uploads.is_empty() && (stopping || exhausted) {
                break;
            }
            let waiting_for_batch = ready.is_none() && reading.is_some();
            self.stage.set_waiting(u64::from(uploads.is_empty()));
            tokio::select! {
                Some((on, ids, uploaded)) = uploads.next(), if !uploads.is_empty() => {
                    idle.push(on);
                    self.stage.progress();
                    match uploaded {
                        Ok(_) => {
                            drained.rows += ids.len() as u64;
                            unmarked.extend(ids);
                            if marking.is_none() {
                                marking = Some(self.spawn_mark(std::mem::take(&mut unmarked)));
                            }
                        }
                        Err(e) => {
                            if result.is_ok() {
                                result = Err(e);
                            }
                        }
                    }
                }
                joined = async { reading.as_mut().expect("guarded").await }, if waiting_for_batch => {
                    reading = None;
                    match self.finished_read(joined) {
                        Ok(rows) if rows.is_empty() => {}
                        Ok(rows) => ready = Some(rows),
                        Err(e) => {
                            if result.is_ok() {
                                result = Err(e);
                            }
                        }
                    }
                }
                _ = async { marking.as_mut().expect("guarded").await }, if marking.is_some() => {
                    marking = None;
                    if !unmarked.is_empty() {
                        marking = Some(self.spawn_mark(std::mem::take(&mut unmarked)));
                    }
                }
                // Paced on purpose: not a stall.
                _ = tokio::time::sleep_until(due.unwrap_or(deadline).min(deadline)), if due.is_some() && !stopping => {
                    drained.paced = true;
                }
                _ = self.shutdown.cancelled(), if !stopping => {}
            }
        }
        self.stage.set_waiting(1);
        drop(uploads);
        if let Some(handle) = reading {
            // Give the read connection back (the read itself is harmless).
            let _ = self.finished_read(handle.await);
        }
        if let Some(m) = marking {
            let _ = m.await;
        }
        if !unmarked.is_empty() {
            let _ = self.spawn_mark(unmarked).await;
        }
        result.map(|()| drained)
    }

    async fn upload_on(&self, central: &Central, rows: &ReadingColumns) -> Result<u64, SyncError> {
        crate::progress::fault::hold(crate::progress::fault::SYNC_HANG).await;
        central.upload_readings(&self.gateway_id, rows).await
    }

    async fn upload(&self, rows: &ReadingColumns) -> Result<u64, SyncError> {
        crate::progress::fault::hold(crate::progress::fault::SYNC_HANG).await;
        let central = self.central.as_ref().ok_or_else(not_connected)?;
        self.stage.set_waiting(0);
        let uploaded = central.upload_readings(&self.gateway_id, rows).await;
        self.stage.set_waiting(1);
        self.stage.progress();
        uploaded
    }

    /// After a failed round: drop the connection (its state is unknown), remember and
    /// report the error, log it without flooding the journal.
    async fn failed(&mut self, e: &SyncError, wait: Duration) {
        self.central = None;
        self.backlog_central.clear();
        let at = self.clock.now();
        let message = e.to_string();
        self.last_error = Some((message.clone(), at));
        let stored = message.clone();
        // What central committed before the failure is still owed: marked now, with
        // the error (one write).
        let marks = self.owed.take();
        let _ = self
            .store
            .write(move |c| {
                marks(c)?;
                local::record_error(c, at, &stored)
            })
            .await;
        if let Some(suppressed) = self.failure_log.allow() {
            if e.needs_a_person() {
                tracing::error!(error = %message, retry_in = ?wait, suppressed, "Central sync cannot proceed; a person must act.");
            } else {
                tracing::warn!(error = %message, retry_in = ?wait, suppressed, "Central sync failed; retrying with backoff.");
            }
        }
    }
}

/// A statement refused for lack of privileges (SQLSTATE 42501); the connection is
/// still usable (the failed transaction was rolled back).
fn is_missing_grant(e: &SyncError) -> bool {
    matches!(e, SyncError::Database(text) if text.contains("SQLSTATE 42501"))
}

/// What a backlog drain did.
#[derive(Debug, Default)]
struct Drained {
    /// The pacing held it back at least once.
    paced: bool,
    /// Rows uploaded (committed centrally).
    rows: u64,
}

/// How long the round's one write may wait for a commit of readings at most (the
/// default `storage.ttn_commit_delay`): it then costs no commit of its own.
const SETTLE_WITHIN: Duration = Duration::from_secs(5);

/// Acknowledgements from central applied per round, at most.
const ACKS_PER_ROUND: i64 = 100;

fn not_connected() -> SyncError {
    SyncError::Database("not connected".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_without_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1))
            .with_jitter(Jitter::None);
        let waits: Vec<_> = (0..6).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(
            b.next_delay(),
            Duration::from_secs(1),
            "no overflow after many failures"
        );
    }

    #[test]
    fn full_jitter_spreads_waits_between_zero_and_the_cap() {
        let waits: Vec<Duration> = (0..200)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(8));
                b.next_delay()
            })
            .collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_secs(8)));
        assert!(waits.iter().any(|w| *w < Duration::from_secs(2)));
        assert!(waits.iter().any(|w| *w > Duration::from_secs(6)));
    }

    #[tokio::test(start_paused = true)]
    async fn held_readings_are_released_after_the_bound_of_monotonic_time() {
        let mut hold = HoldBack::new(Duration::from_secs(3600));
        let t0 = Instant::now();
        hold.observe(t0, 100);
        assert_eq!(hold.release_up_to(t0), 0);
        tokio::time::advance(Duration::from_secs(1800)).await;
        hold.observe(Instant::now(), 250);
        assert_eq!(
            hold.release_up_to(Instant::now()),
            0,
            "nothing has waited an hour yet"
        );
        tokio::time::advance(Duration::from_secs(1800)).await;
        assert_eq!(
            hold.release_up_to(Instant::now()),
            100,
            "ids up to 100 waited an hour"
        );
        tokio::time::advance(Duration::from_secs(1799)).await;
        assert_eq!(hold.release_up_to(Instant::now()), 100);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(hold.release_up_to(Instant::now()), 250);
    }

    #[tokio::test(start_paused = true)]
    async fn hold_back_memory_is_bounded() {
        let mut hold = HoldBack::new(Duration::from_secs(3600));
        for i in 0..100_000 {
            // As the worker does every round.
            hold.observe(Instant::now(), i);
            hold.release_up_to(Instant::now());
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert!(
            hold.checkpoints.len() <= MAX_CHECKPOINTS as usize + 1,
            "{}",
            hold.checkpoints.len()
        );
        assert!(hold.release_up_to(Instant::now()) > 0);
    }

    #[test]
    fn zero_bound_holds_nothing() {
        let mut hold = HoldBack::new(Duration::ZERO);
        assert_eq!(hold.release_up_to(Instant::now()), i64::MAX);
    }
}
