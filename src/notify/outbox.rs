//! The outbox worker: picks due rows from the `outbox` table, delivers them with bounded
//! concurrency, and records each outcome (delivered, retry later, failed, expired).
//!
//! Rows are read on the worker's own read connection and updated through the store
//! writer. A row being delivered is not picked twice; a row whose delivery was cut by a
//! crash or shutdown is still `pending` and is delivered again after the restart, with
//! the same idempotency key.
//!
//! Each notifier gets its notifications in the order they were raised, also after an
//! outage: only a notifier's oldest pending row is ever due (rows have their own
//! jittered backoff, so a younger RESOLVED would otherwise often go out before its
//! FIRING), and a delivery makes that notifier's waiting rows due at once, so the
//! queue drains as soon as the peer is back instead of after each row's backoff.
//!
//! **Queues and waits (G9).** The worker waits for its wake-up (`Notify`) or its
//! interval, for its read connection, for at most `MAX_CONCURRENT` deliveries and for
//! the store writer to record outcomes. Nothing waits for the worker: the alert engine
//! only writes rows and calls `notify_one`, and the writer never waits for anyone.

use super::{Notifier, NotifierConfig, Outcome, MAX_CONCURRENT};
use crate::alerts::AlertEvent;
use crate::clock::Clock;
use crate::model::{from_micros, to_micros};
use crate::ratelimit::LogLimiter;
use crate::store::Store;
use crate::tls::CertWatch;
use chrono::{DateTime, Utc};
use rand::Rng;
use rusqlite::{params, Connection};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The worker looks for due rows at least this often even without a wake-up.
const POLL: Duration = Duration::from_secs(5);
/// In-flight deliveries get this long to finish at shutdown; the rest stay pending.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Delivered, failed and expired rows are kept this long for `outpost status` and
/// diagnosis, then deleted (events themselves are kept).
const KEEP_DONE: Duration = Duration::from_secs(30 * 86400);

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct NotifyStats {
    pub delivered: AtomicU64,
    pub retried: AtomicU64,
    pub failed: AtomicU64,
    pub expired: AtomicU64,
}

/// A pending outbox row with its event.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub notifier: String,
    pub attempts: i64,
    pub next_attempt_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub body: String,
}

/// The oldest pending row of each notifier, in due order (the first `limit`).
pub fn pending(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<OutboxRow>> {
    let mut stmt = conn.prepare_cached(
        "SELECT o.id, o.notifier, o.attempts, o.next_attempt_at, o.expires_at, e.message \
         FROM outbox o JOIN alert_events e ON e.uid = o.event_uid \
         WHERE o.state = 'pending' \
           AND o.id IN (SELECT MIN(id) FROM outbox WHERE state = 'pending' GROUP BY notifier) \
         ORDER BY o.next_attempt_at, o.id LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit as i64], |r| {
        Ok(OutboxRow {
            id: r.get(0)?,
            notifier: r.get(1)?,
            attempts: r.get(2)?,
            next_attempt_at: from_micros(r.get(3)?),
            expires_at: from_micros(r.get(4)?),
            body: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// Records the final state of a row (`delivered`, `failed` or `expired`), counting the
/// bad ones durably.
pub fn finish(
    conn: &Connection,
    id: i64,
    state: &str,
    error: Option<&str>,
    now: DateTime<Utc>,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE outbox SET state = ?2, last_error = COALESCE(?3, last_error), done_at = ?4, \
         attempts = attempts + (?2 != 'expired') WHERE id = ?1 AND state = 'pending'",
        params![id, state, error, to_micros(now)],
    )?;
    if state != "delivered" {
        conn.execute(
            "INSERT INTO counters(name, value) VALUES (?1, 1) ON CONFLICT(name) DO UPDATE SET value = value + 1",
            [format!("notifications_{state}")],
        )?;
    }
    Ok(())
}

/// After a delivery through `notifier`: its other pending rows are due now (the peer
/// answers again; their backoff was for the outage).
pub fn due_now(conn: &Connection, notifier: &str, now: DateTime<Utc>) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE outbox SET next_attempt_at = ?2 \
         WHERE state = 'pending' AND notifier = ?1 AND next_attempt_at > ?2",
        params![notifier, to_micros(now)],
    )
}

/// Schedules another attempt.
pub fn retry_at(
    conn: &Connection,
    id: i64,
    next: DateTime<Utc>,
    error: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?2, last_error = ?3 WHERE id = ?1 AND state = 'pending'",
        params![id, to_micros(next), error],
    )?;
    Ok(())
}

/// Pending rows of notifiers that are no longer configured cannot be delivered: they
/// fail, so they do not wait forever.
pub fn fail_orphans(
    conn: &Connection,
    known: &[String],
    now: DateTime<Utc>,
) -> rusqlite::Result<usize> {
    let mut stmt = conn.prepare("SELECT id, notifier FROM outbox WHERE state = 'pending'")?;
    let orphans: Vec<(i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?
        .into_iter()
        .filter(|(_, n)| !known.contains(n))
        .collect();
    for (id, notifier) in &orphans {
        finish(
            conn,
            *id,
            "failed",
            Some(&format!(
                "the notifier {notifier:?} is no longer configured"
            )),
            now,
        )?;
    }
    conn.execute(
        "DELETE FROM outbox WHERE state != 'pending' AND done_at < ?1",
        [to_micros(now) - KEEP_DONE.as_micros() as i64],
    )?;
    Ok(orphans.len())
}

/// Exponential backoff with full jitter: a random wait between 0 and
/// `min(max, initial · 2^(attempt-1))` (at least 10 ms).
pub fn backoff(attempt: u32, initial: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let cap = initial
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
        .min(max);
    let millis = cap.as_millis().max(10) as u64;
    Duration::from_millis(rng.gen_range(10..=millis.max(10)))
}

/// The notification worker for `notifiers`, as a task for the caller to spawn (none
/// without notifiers); it runs until `shutdown`. The alert engine, given the same
/// `wake`, notifies it when it wrote rows. Fails on a notifier that cannot be built
/// (e.g. an unreadable CA file).
pub fn outbox_task(
    notifiers: &[NotifierConfig],
    gateway_id: &str,
    store: &Store,
    certs: CertWatch,
    clock: Clock,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>> {
    use tracing::Instrument;
    if notifiers.is_empty() {
        return Ok(None);
    }
    let worker = OutboxWorker::new(notifiers, gateway_id, store.clone(), certs, clock, wake)?;
    Ok(Some(Box::pin(
        worker
            .run(shutdown)
            .instrument(tracing::info_span!("notify")),
    )))
}

/// Delivers the outbox.
pub struct OutboxWorker {
    store: Store,
    certs: CertWatch,
    notifiers: HashMap<String, Arc<Notifier>>,
    clock: Clock,
    wake: Arc<Notify>,
    stats: Arc<NotifyStats>,
}

struct Attempt {
    id: i64,
    notifier: Arc<Notifier>,
    attempts: i64,
    expires_at: DateTime<Utc>,
    event: Option<AlertEvent>,
}

impl OutboxWorker {
    /// Builds every configured notifier (the certificates their servers present go to
    /// `certs`). `wake` is notified when new rows were written.
    pub fn new(
        notifiers: &[NotifierConfig],
        gateway_id: &str,
        store: Store,
        certs: CertWatch,
        clock: Clock,
        wake: Arc<Notify>,
    ) -> anyhow::Result<OutboxWorker> {
        let mut built = HashMap::new();
        for n in notifiers {
            let notifier = Notifier::build(n, gateway_id, Some(&certs))
                .map_err(|e| anyhow::anyhow!("notifiers: {:?}: {e:#}", n.name))?;
            built.insert(n.name.clone(), Arc::new(notifier));
        }
        Ok(OutboxWorker {
            store,
            certs,
            notifiers: built,
            clock,
            wake,
            stats: Arc::new(NotifyStats::default()),
        })
    }

    pub fn stats(&self) -> Arc<NotifyStats> {
        self.stats.clone()
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || f(&store.reader()?)).await??)
    }

    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let known: Vec<String> = self.notifiers.keys().cloned().collect();
        let now = self.clock.now();
        match self.store.write(move |conn| fail_orphans(conn, &known, now)).await {
            Ok(n) if n > 0 => tracing::warn!(count = n, "Pending notifications of notifiers that are no longer configured were marked failed."),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Cannot check the outbox for removed notifiers."),
        }
        tracing::info!(
            notifiers = self.notifiers.len(),
            "Notification worker started."
        );
        let mut certificate_watches = JoinSet::new();
        for notifier in self.notifiers.values() {
            if let Some(task) = notifier.watch_server_certificate(&self.certs, shutdown.clone()) {
                certificate_watches.spawn(task);
            }
        }
        let mut in_flight: JoinSet<(Attempt, Outcome)> = JoinSet::new();
        let mut busy: HashSet<i64> = HashSet::new();
        let mut read_failures = LogLimiter::default();
        // G9: every recorded attempt, delivered or failed, is progress. An attempt
        // waits for its notifier (a failing one backs off: not a stall) but must
        // answer within its own timeout; one that outlived it by a second is work this
        // worker left waiting. Measured when evaluated, so a stuck loop is seen too.
        let stage = self.store.progress().stage(
            crate::progress::OUTBOX,
            "notifications whose delivery outlived its timeout",
            Some(crate::progress::STORE),
        );
        let deadlines: Arc<std::sync::Mutex<HashMap<i64, tokio::time::Instant>>> = Arc::default();
        let watched = Arc::downgrade(&deadlines);
        stage.add_probe(Box::new(move || {
            let deadlines = watched.upgrade()?;
            let now = tokio::time::Instant::now();
            let late = deadlines
                .lock()
                .map(|d| d.values().filter(|at| **at < now).count())
                .unwrap_or(0);
            Some(late as u64)
        }));
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let now = self.clock.now();
            let mut wake_at = now + chrono::Duration::from_std(POLL).unwrap_or_default();
            let free = MAX_CONCURRENT.saturating_sub(in_flight.len());
            let limit = busy.len() + MAX_CONCURRENT + 1;
            match self.read(move |conn| pending(conn, limit)).await {
                Ok(rows) => {
                    let mut started = 0;
                    let rows: Vec<OutboxRow> =
                        rows.into_iter().filter(|r| !busy.contains(&r.id)).collect();
                    for row in rows {
                        if row.next_attempt_at > now {
                            wake_at = wake_at.min(row.next_attempt_at);
                            break;
                        }
                        if started >= free {
                            break;
                        }
                        if now >= row.expires_at {
                            self.expire(&row, now).await;
                            continue;
                        }
                        let Some(notifier) = self.notifiers.get(&row.notifier).cloned() else {
                            continue; // failed as an orphan at start; not ours
                        };
                        started += 1;
                        busy.insert(row.id);
                        if let Ok(mut d) = deadlines.lock() {
                            let late = notifier.attempt_timeout + Duration::from_secs(1);
                            d.insert(row.id, tokio::time::Instant::now() + late);
                        }
                        let attempt = Attempt {
                            id: row.id,
                            notifier,
                            attempts: row.attempts,
                            expires_at: row.expires_at,
                            event: serde_json::from_str(&row.body).ok(),
                        };
                        in_flight.spawn(deliver(attempt));
                    }
                }
                Err(e) => {
                    if let Some(suppressed) = read_failures.allow() {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            suppressed,
                            "Cannot read the outbox; retrying."
                        );
                    }
                    wake_at = now + chrono::Duration::seconds(1);
                }
            }
            let sleep = (wake_at - self.clock.now()).to_std().unwrap_or_default();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                done = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Some(Ok((attempt, outcome))) = done {
                        busy.remove(&attempt.id);
                        if let Ok(mut d) = deadlines.lock() {
                            d.remove(&attempt.id);
                        }
                        self.record(attempt, outcome).await;
                        stage.progress();
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        // Let deliveries in flight finish briefly so their outcome is recorded; the
        // others stay pending and go out after the restart.
        let finishing = async {
            while let Some(done) = in_flight.join_next().await {
                if let Ok((attempt, outcome)) = done {
                    self.record(attempt, outcome).await;
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, finishing)
            .await
            .is_err()
        {
            in_flight.abort_all();
        }
        certificate_watches.abort_all();
        tracing::info!("Notification worker stopped.");
    }

    async fn expire(&self, row: &OutboxRow, now: DateTime<Utc>) {
        let id = row.id;
        if self
            .store
            .write(move |conn| finish(conn, id, "expired", None, now))
            .await
            .is_ok()
        {
            self.stats.expired.fetch_add(1, Relaxed);
            let event: Option<AlertEvent> = serde_json::from_str(&row.body).ok();
            tracing::error!(
                notifier = %row.notifier,
                attempts = row.attempts,
                rule = event.as_ref().map(|e| e.rule.as_str()).unwrap_or("?"),
                device = event.as_ref().map(|e| e.device.as_str()).unwrap_or("?"),
                kind = event.as_ref().map(|e| e.kind.as_str()).unwrap_or("?"),
                "A notification EXPIRED undelivered (its ttl passed); nobody was told through this notifier."
            );
        }
    }

    async fn record(&self, attempt: Attempt, outcome: Outcome) {
        let now = self.clock.now();
        let id = attempt.id;
        let n = &attempt.notifier;
        let (rule, device) = attempt
            .event
            .as_ref()
            .map(|e| (e.rule.clone(), e.device.clone()))
            .unwrap_or_default();
        let write = match &outcome {
            Outcome::Delivered => {
                self.stats.delivered.fetch_add(1, Relaxed);
                tracing::info!(notifier = %n.name, rule = %rule, device = %device, "Notification delivered.");
                let notifier = n.name.clone();
                self.store
                    .write(move |conn| {
                        finish(conn, id, "delivered", None, now)?;
                        due_now(conn, &notifier, now).map(|_| ())
                    })
                    .await
            }
            Outcome::Failed(reason) => {
                self.stats.failed.fetch_add(1, Relaxed);
                tracing::error!(
                    notifier = %n.name, kind = n.kind, rule = %rule, device = %device, error = %reason,
                    "A notification FAILED permanently; fix the notifier (see `outpost notify-test`)."
                );
                let reason = reason.clone();
                self.store
                    .write(move |conn| finish(conn, id, "failed", Some(&reason), now))
                    .await
            }
            Outcome::Retry(reason) => {
                self.stats.retried.fetch_add(1, Relaxed);
                let attempts = attempt.attempts as u32 + 1;
                let wait = backoff(
                    attempts,
                    n.retry_initial,
                    n.retry_max,
                    &mut rand::thread_rng(),
                );
                let next = (now + chrono::Duration::from_std(wait).unwrap_or_default())
                    .min(attempt.expires_at);
                if attempts == 1 {
                    tracing::warn!(notifier = %n.name, rule = %rule, device = %device, error = %reason, "A notification could not be delivered; retrying with backoff.");
                } else {
                    tracing::debug!(notifier = %n.name, attempts, error = %reason, retry_in = ?wait, "Notification retry failed.");
                }
                let reason = reason.clone();
                self.store
                    .write(move |conn| retry_at(conn, id, next, &reason))
                    .await
            }
        };
        if let Err(e) = write {
            tracing::warn!(error = %e, "Cannot record a notification outcome; it may be delivered again.");
        }
    }
}

async fn deliver(attempt: Attempt) -> (Attempt, Outcome) {
    crate::progress::fault::hold(crate::progress::fault::OUTBOX_HANG).await;
    let outcome = match &attempt.event {
        None => Outcome::Failed("the stored event cannot be read".into()),
        Some(event) => match tokio::time::timeout(
            attempt.notifier.attempt_timeout,
            attempt.notifier.deliver(event),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Retry("the attempt timed out".into()),
        },
    };
    (attempt, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn each_notifier_gets_its_rows_in_order_and_a_delivery_makes_the_rest_due() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema::migrate(&mut conn).unwrap();
        // (notifier, next attempt µs): "mail" has an old row waiting long and a young
        // one due sooner (its backoff is shorter), "hook" one row.
        for (i, (notifier, next)) in [("mail", 900), ("mail", 100), ("hook", 500)]
            .into_iter()
            .enumerate()
        {
            conn.execute(
                "INSERT INTO alert_events (uid, kind, rule, severity, device, metric, occurred_at, message) \
                 VALUES (?1, 'firing', 'r', 'critical', 'd', 'm', 0, '{}')",
                [vec![i as u8; 16]],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO outbox (event_uid, notifier, created_at, next_attempt_at, expires_at) \
                 VALUES (?1, ?2, 0, ?3, 10000000)",
                params![vec![i as u8; 16], notifier, next],
            )
            .unwrap();
        }
        let ids = |conn: &Connection| -> Vec<i64> {
            pending(conn, 10).unwrap().iter().map(|r| r.id).collect()
        };
        assert_eq!(ids(&conn), [3, 1], "only the oldest row of each notifier");
        finish(&conn, 1, "delivered", None, from_micros(200)).unwrap();
        assert_eq!(due_now(&conn, "mail", from_micros(200)).unwrap(), 0);
        assert_eq!(ids(&conn), [2, 3]);
        // A delivery brings the notifier's waiting rows forward, not other notifiers'.
        conn.execute("UPDATE outbox SET next_attempt_at = 5000 WHERE id = 2", [])
            .unwrap();
        assert_eq!(due_now(&conn, "mail", from_micros(300)).unwrap(), 1);
        let rows = pending(&conn, 10).unwrap();
        assert_eq!(rows[0].id, 2);
        assert_eq!(to_micros(rows[0].next_attempt_at), 300);
        assert_eq!(to_micros(rows[1].next_attempt_at), 500);
    }

    #[test]
    fn backoff_grows_with_full_jitter_and_is_capped() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let initial = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        for attempt in 1..40u32 {
            let cap = initial.saturating_mul(1 << (attempt - 1).min(20)).min(max);
            for _ in 0..50 {
                let d = backoff(attempt, initial, max, &mut rng);
                assert!(
                    d <= cap.max(Duration::from_millis(10)),
                    "attempt {attempt}: {d:?} > {cap:?}"
                );
                assert!(d >= Duration::from_millis(10));
            }
        }
        // Jitter: the waits of one attempt spread out.
        let waits: HashSet<u128> = (0..20)
            .map(|_| backoff(6, initial, max, &mut rng).as_millis())
            .collect();
        assert!(waits.len() > 10);
    }
}
