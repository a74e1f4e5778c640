//! The decoding worker and the acker of an MQTT session (see [`super::session`] for
//! the queues between them and the poll loop, and why none waits on itself).

use super::{Decode, Rejection, SessionStats};
use crate::backoff::Backoff;
use crate::model::{Batch, Reading};
use crate::ratelimit::{KeyedLogLimiter, LogLimiter};
use crate::sources::SourceContext;
use crate::store::StoreError;
use chrono::{DateTime, Utc};
use rumqttc::{AsyncClient, Publish, QoS};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

/// The most messages decoded into one batch.
pub const MAX_MESSAGES_PER_BATCH: usize = 250;

pub(super) struct Handoff {
    pub(super) publish: Publish,
    pub(super) received_at: DateTime<Utc>,
    /// The connection that delivered it (see [`PubAckRef`]).
    pub(super) connection: u64,
}

/// A PUBACK owed for a committed QoS 1 message. Packet ids belong to the connection
/// that delivered the message: after a reconnect the broker redelivers everything not
/// yet acknowledged, so an ack owed on an older connection is dropped (the redelivered
/// copy is deduplicated by its uid and acknowledged in turn), as rumqttc itself does
/// with the PUBACKs in its queue when a connection ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct PubAckRef {
    pub(super) connection: u64,
    pub(super) pkid: u16,
}

/// A batch sent to the store whose commit the acker awaits.
pub(super) struct Pending {
    ack: oneshot::Receiver<Result<crate::model::Committed, StoreError>>,
    /// PUBACKs to send after the commit (manual acks only).
    acks: Vec<PubAckRef>,
    /// A copy of the readings to resend if the commit fails (manual acks only).
    retry: Option<Vec<Reading>>,
    messages: usize,
    min_mark: Option<DateTime<Utc>>,
    max_mark: Option<DateTime<Utc>>,
    /// Its messages' share of the window ([`AckWindow::messages`]), given back when
    /// the acker is done with the batch.
    _room: Option<OwnedSemaphorePermit>,
}

/// How much of a session's input may await its commit at once: at most `batches`
/// batches (the ack pipeline's capacity) and, for a source whose batches wait for
/// their commit, at most [`AckWindow::messages`] messages. When the window is full
/// the worker waits, the hand-off queue fills and the poll loop stops reading (G4).
pub(super) struct AckWindow {
    pub(super) batches: usize,
    /// Permits of one message each; `None` for a source committed at once, which
    /// [`MAX_MESSAGES_PER_BATCH`] and `batches` bound.
    pub(super) messages: Option<Arc<Semaphore>>,
}

impl AckWindow {
    /// A source committed at once keeps at most `eager_batches` batches awaiting
    /// their commit: its batches grow while it waits, so a few are enough. A source
    /// whose batches wait for their commit (`delayed`: TTN's `ttn_commit_delay`) sees
    /// its messages arrive one by one, a batch each, at a site's rate; it keeps up to
    /// `lazy_messages` messages, in as many batches, so that one commit can carry a
    /// whole delay's worth of them.
    /// `lazy_messages` is at least [`MAX_MESSAGES_PER_BATCH`], so a batch always fits.
    pub(super) fn new(delayed: bool, eager_batches: usize, lazy_messages: usize) -> AckWindow {
        if delayed {
            let messages = lazy_messages.max(MAX_MESSAGES_PER_BATCH);
            AckWindow {
                batches: messages,
                messages: Some(Arc::new(Semaphore::new(messages))),
            }
        } else {
            AckWindow {
                batches: eager_batches.max(1),
                messages: None,
            }
        }
    }
}

/// Takes room for `messages` in the window; when there is none, asks the store to
/// commit the batches it holds now (they would otherwise wait for their delay while
/// the source cannot read), then waits. `None` if the window is closed.
async fn reserve(
    window: &Option<Arc<Semaphore>>,
    messages: usize,
    ctx: &SourceContext,
) -> Option<Option<OwnedSemaphorePermit>> {
    let Some(window) = window else {
        return Some(None);
    };
    // A batch holds 1 to MAX_MESSAGES_PER_BATCH messages; the window holds at least that.
    let n = messages.clamp(1, MAX_MESSAGES_PER_BATCH) as u32;
    match window.clone().try_acquire_many_owned(n) {
        Ok(permit) => Some(Some(permit)),
        Err(tokio::sync::TryAcquireError::Closed) => None,
        Err(tokio::sync::TryAcquireError::NoPermits) => {
            ctx.store.commit_held_now();
            window.clone().acquire_many_owned(n).await.ok().map(Some)
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn worker(
    mut rx: mpsc::Receiver<Handoff>,
    mut decoder: impl Decode,
    ctx: SourceContext,
    source: String,
    manual_acks: bool,
    pending: mpsc::Sender<Pending>,
    window: Option<Arc<Semaphore>>,
    stats: Arc<SessionStats>,
) {
    let mut buf = Vec::with_capacity(MAX_MESSAGES_PER_BATCH);
    let mut limiter = KeyedLogLimiter::new(Duration::from_secs(60));
    while rx.recv_many(&mut buf, MAX_MESSAGES_PER_BATCH).await > 0 {
        // G9: taking messages off the hand-off queue is progress (after the test-only hang).
        crate::progress::fault::hold(crate::progress::fault::MQTT_WORKER_HANG).await;
        ctx.stage(&source).progress();
        let messages = buf.len();
        let mut readings = Vec::with_capacity(messages * 4);
        let mut acks = Vec::new();
        let (mut min_mark, mut max_mark) = (None::<DateTime<Utc>>, None::<DateTime<Utc>>);
        for item in buf.drain(..) {
            match decoder.decode(&item.publish.topic, &item.publish.payload, item.received_at) {
                Ok(decoded) => {
                    readings.extend(decoded.readings);
                    if let Some(m) = decoded.mark {
                        min_mark = Some(min_mark.map_or(m, |x| x.min(m)));
                        max_mark = Some(max_mark.map_or(m, |x| x.max(m)));
                    }
                }
                Err(rejection) => reject(
                    &ctx,
                    &source,
                    &stats,
                    &mut limiter,
                    &item.publish.topic,
                    &item.publish.payload,
                    &rejection,
                ),
            }
            // Subscriptions are QoS 0 or 1, so a PUBACK is the whole acknowledgement.
            if manual_acks && item.publish.qos != QoS::AtMostOnce {
                acks.push(PubAckRef {
                    connection: item.connection,
                    pkid: item.publish.pkid,
                });
            }
        }
        stats.readings.fetch_add(readings.len() as u64, Relaxed);
        ctx.metrics.received(&source, readings.len() as u64);
        if readings.is_empty() && acks.is_empty() {
            continue;
        }
        // Room in the window before the batch goes to the store: what awaits its
        // commit is bounded (G4).
        let Some(room) = reserve(&window, messages, &ctx).await else {
            break;
        };
        let retry = manual_acks.then(|| readings.clone());
        let (batch, ack) = Batch::with_ack(readings);
        if ctx.out.send(batch).await.is_err() {
            break;
        }
        let item = Pending {
            ack,
            acks,
            retry,
            messages,
            min_mark,
            max_mark,
            _room: room,
        };
        if pending.send(item).await.is_err() {
            break;
        }
    }
}

/// Counts, logs (rate-limited) and keeps (bounded) a message that gave no readings.
pub fn reject(
    ctx: &SourceContext,
    source: &str,
    stats: &SessionStats,
    limiter: &mut KeyedLogLimiter,
    topic: &str,
    payload: &[u8],
    rejection: &Rejection,
) {
    if !rejection.record {
        stats.ignored.fetch_add(1, Relaxed);
        return;
    }
    stats.rejected.fetch_add(1, Relaxed);
    ctx.metrics.rejected(source, rejection.reason);
    if let Ok(mut by_reason) = stats.rejected_by_reason.lock() {
        *by_reason.entry(rejection.reason).or_default() += 1;
    }
    let rejected = stats.rejected.load(Relaxed);
    // Per reason, so the first message of every reason is logged with its hint.
    if let Some(suppressed) = limiter.allow(rejection.reason) {
        tracing::warn!(
            source,
            topic,
            reason = rejection.reason,
            detail = %rejection.detail,
            hint = crate::sources::reasons::fix_for(rejection.reason),
            rejected,
            suppressed,
            "A message was rejected (logged at most once a minute per reason; all are kept: `outpost rejected`)."
        );
    }
    ctx.store.record_rejected_message(
        source,
        rejection.reason,
        Some(topic),
        &rejection.detail,
        payload,
    );
}

/// How the acker hands PUBACKs to the session without waiting for the event loop to
/// be polled: a committed batch's acks go through `owed`, which the poll loop drains
/// in every state (before each poll, while paused for room, while backing off, at
/// shutdown) and writes in one flush; one ack also goes into rumqttc's request queue
/// (never waiting), only to wake a poll loop that is idle in `poll()`.
pub(super) struct AckRoute {
    pub(super) client: AsyncClient,
    pub(super) owed: mpsc::Sender<Vec<PubAckRef>>,
    pub(super) live_connection: Arc<AtomicU64>,
}

impl AckRoute {
    /// `false` once the session is gone.
    async fn send(&self, mut acks: Vec<PubAckRef>) -> bool {
        let live = self.live_connection.load(Relaxed);
        acks.retain(|a| a.connection == live);
        let Some(wake) = acks.pop() else {
            return true;
        };
        if !acks.is_empty() && self.owed.send(acks).await.is_err() {
            return false;
        }
        let mut probe = Publish::new("", QoS::AtLeastOnce, Vec::new());
        probe.pkid = wake.pkid;
        // A full request queue means the poll loop is busy with it and comes round to
        // `owed` shortly.
        self.client.try_ack(&probe).is_ok() || self.owed.send(vec![wake]).await.is_ok()
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn acker(
    mut rx: mpsc::Receiver<Pending>,
    route: AckRoute,
    out: mpsc::Sender<Batch>,
    source: String,
    stats: Arc<SessionStats>,
    committed_mark: Option<watch::Sender<Option<DateTime<Utc>>>>,
    gaps: Option<mpsc::Sender<DateTime<Utc>>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut limiter = LogLimiter::new(Duration::from_secs(60));
    while let Some(mut item) = rx.recv().await {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
            .with_floor(Duration::from_millis(200));
        loop {
            match (&mut item.ack).await {
                Ok(Ok(_)) => {
                    stats
                        .committed_messages
                        .fetch_add(item.messages as u64, Relaxed);
                    if !item.acks.is_empty() && !route.send(std::mem::take(&mut item.acks)).await {
                        return;
                    }
                    if let (Some(tx), Some(mark)) = (&committed_mark, item.max_mark) {
                        tx.send_if_modified(|current| {
                            if current.is_none_or(|c| c < mark) {
                                *current = Some(mark);
                                true
                            } else {
                                false
                            }
                        });
                    }
                    break;
                }
                // The store is closing: unacknowledged messages are redelivered later.
                Ok(Err(StoreError::Closed)) | Err(_) => return,
                Ok(Err(error)) => {
                    stats.commit_failures.fetch_add(1, Relaxed);
                    if let Some(suppressed) = limiter.allow() {
                        tracing::warn!(source = %source, error = %error, suppressed, "A batch was not stored.");
                    }
                    let Some(readings) = &item.retry else {
                        if let (Some(gaps), Some(from)) = (&gaps, item.min_mark) {
                            let _ = gaps.try_send(from);
                        }
                        break;
                    };
                    // Not acknowledged: try the same readings again after a pause.
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    let (batch, ack) = Batch::with_ack(readings.clone());
                    if out.send(batch).await.is_err() {
                        return;
                    }
                    item.ack = ack;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::session::ACK_PIPELINE_CAPACITY;
    use super::super::Decoded;
    use super::*;
    use rumqttc::MqttOptions;

    /// One reading per message, its uid from the payload.
    struct OneReading;
    impl Decode for OneReading {
        fn decode(
            &mut self,
            _: &str,
            payload: &[u8],
            at: DateTime<Utc>,
        ) -> Result<Decoded, Rejection> {
            let n = String::from_utf8_lossy(payload).to_string();
            Ok(Decoded {
                readings: vec![Reading {
                    uid: crate::model::Uid::derive(&["window", &n]),
                    source: "lazy".into(),
                    device: format!("d{}", n.len()),
                    metric: "m".into(),
                    value: 1.0,
                    unit: None,
                    observed_at: at,
                    received_at: at,
                    flags: 0,
                    meta: None,
                }],
                mark: None,
            })
        }
    }

    fn handoff(n: usize) -> Handoff {
        Handoff {
            publish: Publish::new("t", QoS::AtMostOnce, n.to_string().into_bytes()),
            received_at: Utc::now(),
            connection: 1,
        }
    }

    /// A store whose source "lazy" waits `delay` for its commit, and a context for it.
    fn lazy_store(dir: &std::path::Path, delay: Duration) -> (SourceContext, crate::store::Ingest) {
        let storage = crate::store::StorageConfig {
            path: dir.join("db"),
            batch_max_rows: 100_000,
            ..Default::default()
        };
        let (store, ingest) = crate::store::Store::open(&storage, Default::default()).unwrap();
        store.set_commit_delay("lazy", Some(delay));
        assert_eq!(store.commit_delay("lazy"), Some(delay));
        assert_eq!(store.commit_delay("other"), None);
        let ctx = SourceContext::for_test(store, ingest.sender.clone());
        (ctx, ingest)
    }

    /// Starts the worker of source "lazy" with `window` and a hand-off queue of
    /// `handoff` messages; returns that queue, the ack pipeline and the task.
    fn spawn_lazy_worker(
        ctx: SourceContext,
        window: &AckWindow,
        handoff: usize,
    ) -> (
        mpsc::Sender<Handoff>,
        mpsc::Receiver<Pending>,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, rx) = mpsc::channel(handoff);
        let (pending_tx, pending) = mpsc::channel::<Pending>(window.batches);
        let task = tokio::spawn(worker(
            rx,
            OneReading,
            ctx,
            "lazy".into(),
            false,
            pending_tx,
            window.messages.clone(),
            Arc::new(SessionStats::default()),
        ));
        (tx, pending, task)
    }

    /// Sends `n` messages one by one, each taken by the worker before the next, so each
    /// is a batch of its own (as at a site's rate); stops early, returning how many were
    /// taken, when the worker stops taking them.
    async fn feed_one_by_one(tx: &mpsc::Sender<Handoff>, from: usize, n: usize) -> usize {
        for i in 0..n {
            tx.send(handoff(from + i)).await.unwrap();
            let taken = tokio::time::timeout(Duration::from_millis(500), async {
                while tx.capacity() < tx.max_capacity() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await;
            if taken.is_err() {
                return i;
            }
        }
        n
    }

    /// A delayed source keeps up to its window of messages awaiting their commit, one
    /// batch each at a site's rate (not four batches: issue 15), and no more (G4):
    /// the worker waits, and asks the store to commit what it holds.
    #[tokio::test]
    async fn a_delayed_sources_window_is_bounded_by_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (mut ctx, _ingest) = lazy_store(dir.path(), Duration::from_secs(3600));
        // Batches go to a queue nobody drains: nothing is ever committed here.
        let (out, mut sent) = mpsc::channel(10_000);
        ctx.out = out;
        let window = AckWindow::new(true, ACK_PIPELINE_CAPACITY, 300);
        assert_eq!(window.batches, 300);
        let (tx, mut pending, task) = spawn_lazy_worker(ctx, &window, 16);
        let taken = feed_one_by_one(&tx, 0, 400).await;
        // 300 sent, the 301st taken and waiting for room.
        assert_eq!(taken, 301);
        let mut batches = 0;
        while let Ok(batch) = sent.try_recv() {
            assert_eq!(batch.readings.len(), 1, "a batch per message");
            batches += 1;
        }
        assert_eq!(batches, 300, "the window holds 300 messages, no more");
        // The acker is done with ten: ten more go.
        for _ in 0..10 {
            drop(pending.recv().await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let taken = feed_one_by_one(&tx, 1000, 20).await;
        // The 301st, the 302nd (left in the hand-off queue) and eight more fill the
        // room again; the ninth is taken and waits.
        assert_eq!(taken, 9);
        let mut more = 0;
        while sent.try_recv().is_ok() {
            more += 1;
        }
        assert_eq!(more, 10);
        task.abort();

        // A source committed at once keeps its four batches (and one in hand).
        let window = AckWindow::new(false, ACK_PIPELINE_CAPACITY, 300);
        assert_eq!(window.batches, ACK_PIPELINE_CAPACITY);
        assert!(window.messages.is_none());
    }

    /// A burst of a delayed source drains at full speed: a full window commits what
    /// the store holds at once instead of waiting for the delay. Here 20 windows with
    /// a 10 s delay: 200 s if each waited; only the last one does.
    #[tokio::test]
    async fn a_burst_of_a_delayed_source_drains_without_waiting_for_the_delay() {
        let dir = tempfile::tempdir().unwrap();
        let delay = Duration::from_secs(10);
        let (ctx, ingest) = lazy_store(dir.path(), delay);
        let store = ctx.store.clone();
        let window = AckWindow::new(true, ACK_PIPELINE_CAPACITY, 256);
        let (tx, mut pending, worker) = spawn_lazy_worker(ctx, &window, 1024);
        // The acker's part: await each commit in order.
        let acker = tokio::spawn(async move {
            let mut committed = 0;
            while let Some(item) = pending.recv().await {
                match item.ack.await {
                    Ok(Ok(c)) => committed += c.inserted,
                    other => panic!("not committed: {other:?}"),
                }
                if committed == 5_000 {
                    break;
                }
            }
            committed
        });
        let started = std::time::Instant::now();
        for i in 0..5_000 {
            tx.send(handoff(i)).await.unwrap();
            if i % 7 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let committed = tokio::time::timeout(Duration::from_secs(120), acker)
            .await
            .expect("the burst drains without waiting for the delay")
            .unwrap();
        assert_eq!(committed, 5_000);
        let took = started.elapsed();
        assert!(took < delay * 4, "{took:?} for 20 windows");
        let commits = store.stats().commits.load(Relaxed);
        assert!(
            commits >= 5_000 / 256,
            "{commits} commits: each window is committed when full"
        );
        drop(tx);
        worker.await.unwrap();
        drop((store, ingest.sender));
    }

    /// The acker never waits for the event loop: acks owed on an older connection are
    /// dropped, one ack per batch goes into rumqttc's queue (to wake `poll()`), the
    /// rest into the owed queue, and a full rumqttc queue sends the wake-up ack there
    /// too.
    #[tokio::test]
    async fn acks_are_handed_over_without_waiting_for_the_event_loop() {
        let options = MqttOptions::new("outpost-test", "127.0.0.1", 1883);
        // Never polled, as when the poll loop is paused or busy.
        let (client, _eventloop) = AsyncClient::new(options, 1);
        let (owed_tx, mut owed) = mpsc::channel(ACK_PIPELINE_CAPACITY);
        let live = Arc::new(AtomicU64::new(2));
        let route = AckRoute {
            client,
            owed: owed_tx,
            live_connection: live.clone(),
        };
        let acks = |connection: u64, ids: &[u16]| -> Vec<PubAckRef> {
            ids.iter()
                .map(|&pkid| PubAckRef { connection, pkid })
                .collect()
        };
        let mut batch = acks(1, &[1, 2]);
        batch.extend(acks(2, &[3, 4, 5]));
        assert!(route.send(batch).await);
        assert_eq!(owed.try_recv().ok(), Some(acks(2, &[3, 4])));
        assert!(owed.try_recv().is_err(), "5 went to rumqttc's queue");
        // rumqttc's queue (capacity 1) is full now.
        assert!(route.send(acks(2, &[6, 7])).await);
        assert_eq!(owed.try_recv().ok(), Some(acks(2, &[6])));
        assert_eq!(owed.try_recv().ok(), Some(acks(2, &[7])));
        // Disconnected: nothing is owed to anyone.
        live.store(0, Relaxed);
        assert!(route.send(acks(2, &[8])).await);
        assert!(owed.try_recv().is_err());
    }
}
