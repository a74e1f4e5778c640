//! The MQTT session: the poll loop, which owns the connection, and how it hands
//! messages to the worker and writes the PUBACKs the acker hands back.
//!
//! What it guarantees:
//! - **The session never waits on itself (G9).** Three tasks and four bounded queues:
//!
//!   | queue | capacity | filled by | drained by |
//!   |---|---|---|---|
//!   | hand-off | [`HANDOFF_CAPACITY`] messages | poll loop (`try_send`, never waits) | worker |
//!   | store ingest | the store's | worker, acker (retries) | store writer thread |
//!   | ack pipeline | [`ACK_PIPELINE_CAPACITY`] batches (a delayed source: [`DELAYED_ACK_WINDOW_MESSAGES`] messages) | worker | acker |
//!   | owed PUBACKs | [`ACK_PIPELINE_CAPACITY`] batches | acker | poll loop |
//!
//!   The worker waits for the store and the acker; the acker waits for commits and,
//!   to retry a refused one, for room in the store's queue (the store writer never
//!   waits for a source), and for room in the owed-PUBACK queue; the poll loop drains
//!   that queue in every state it can be in — before each `poll()`, while paused,
//!   while backing off and at shutdown — and never waits for the worker, the acker or
//!   the store. So no wait depends on itself, whatever the broker sends. The acker also puts one ack of each batch into rumqttc's request
//!   queue with `try_ack` (never waiting): its only job is to wake a poll loop that is
//!   idle inside `poll()`; the other acks are written by the poll loop between polls,
//!   in one flush per batch (rumqttc writes one request per poll).
//! - **Back-pressure reaches the broker, and the connection stays alive.** When the
//!   hand-off queue is full (the store is behind), the poll loop keeps the message
//!   that did not fit and stops calling `poll()`, so nothing more is read: the broker
//!   keeps the rest, unread in its socket buffer or queued. While paused it still
//!   writes the PUBACKs of committed batches and a keep-alive ping every half
//!   keep-alive straight to the socket, and resumes as soon as the worker makes room.
//!   Memory stays bounded by the queues above (G4), whatever the backlog. No message
//!   is dropped by the agent at any QoS: for QoS 0 (TTN, generic MQTT) a broker that
//!   runs out of room for a slow subscriber may drop messages itself or disconnect it;
//!   a TTN reconnect triggers the Storage Integration backfill.
//!
//!   The broker's in-flight window does *not* bound what it sends: mosquitto 2.0.11
//!   honours `max_inflight_messages` (default 20) for a live session, but after a
//!   persistent session reconnects with a queued backlog every PUBACK releases up to a
//!   whole window of new messages (measured: 1,000 acks → 20,020 messages), and with
//!   `max_inflight_messages 0` it sends everything at once. Before this rule the poll
//!   loop awaited room in the hand-off queue while the acker awaited rumqttc's request
//!   queue, which only the poll loop drains: a backlog of ~45,000 wedged the session
//!   for good (issue 12).
//! - **Keep-alive survives a backlog.** mosquitto queues a PINGRESP behind the messages
//!   it is sending, so during a large backlog the answer to a ping can take longer
//!   than the keep-alive interval; every incoming message (and the end of a pause)
//!   counts as proof that the connection is alive, where rumqttc alone would drop it.
//! - **QoS 1 messages are acknowledged only after their batch committed** (G1). With
//!   `manual_acks`, the acker awaits each batch's commit in order and only then hands
//!   over its PUBACKs; a refused commit is retried, never acknowledged. A PUBACK goes
//!   only to the connection that delivered the message (packet ids belong to a
//!   connection); a message received but not acknowledged when the connection or the
//!   agent dies is redelivered by the broker (persistent session) and deduplicated by
//!   its uid (G2).
//! - **Reconnects back off.** rumqttc reconnects as soon as it is polled again; the
//!   poll loop sleeps an exponentially growing, fully jittered delay after every
//!   failure and resubscribes on every ConnAck.
//! - **The connection state is visible.** `/health` shows a disconnected source with
//!   the broker's error; the `state` row in `source_state` (`connected` or
//!   `disconnected`, broker, since, error) lets `outpost status` show it too.
//! - **Options are validated before rumqttc sees them** (its setters assert).

use super::broker::REQUEST_CAPACITY;
use super::worker::{acker, worker, AckRoute, AckWindow, Handoff, Pending, PubAckRef};
use super::{Decode, SessionStats};
use crate::backoff::Backoff;
use crate::ratelimit::LogLimiter;
use crate::sources::SourceContext;
use chrono::{DateTime, Utc};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, PubAck,
    QoS, Request, Subscribe, SubscribeFilter, SubscribeReasonCode,
};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Messages waiting between the poll loop and the decoding worker.
pub const HANDOFF_CAPACITY: usize = 1_024;
/// Batches sent to the store whose commit is still awaited (QoS 1 acks, cursors), and
/// batches of PUBACKs owed to the poll loop. With [`MAX_MESSAGES_PER_BATCH`] this
/// bounds the readings a session holds in memory: when the store falls behind, the
/// worker waits, the hand-off queue fills, and the poll loop stops reading (G4).
///
/// [`MAX_MESSAGES_PER_BATCH`]: super::MAX_MESSAGES_PER_BATCH
pub(super) const ACK_PIPELINE_CAPACITY: usize = 4;
/// For a source whose batches wait for their commit (`Store::commit_delay`: TTN's
/// `storage.ttn_commit_delay`): the most messages awaiting their commit, in up to as
/// many batches. At a site's rate every message is a batch of its own, and with
/// [`ACK_PIPELINE_CAPACITY`] batches a 5 s delay would hold only four or five
/// readings; this lets one commit carry the whole delay's worth (at most as much
/// memory as [`ACK_PIPELINE_CAPACITY`] full batches). When it is full, the store
/// commits what it holds at once, so a burst is not slowed to one window per delay.
pub(super) const DELAYED_ACK_WINDOW_MESSAGES: usize = HANDOFF_CAPACITY;
/// How long the session keeps polling at shutdown so PUBACKs of committed batches reach
/// the broker (must stay below the pipeline's source grace period).
const SHUTDOWN_FLUSH: Duration = Duration::from_millis(1500);

/// Everything a session needs besides the decoder.
pub struct Session {
    pub source: String,
    pub options: MqttOptions,
    pub connect_timeout: Duration,
    pub subscriptions: Vec<(String, QoS)>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub stats: Arc<SessionStats>,
    /// Incremented on every accepted ConnAck; carries the committed mark at that instant
    /// (TTN backfills from there).
    pub connected: Option<watch::Sender<(u64, Option<DateTime<Utc>>)>>,
    /// The newest mark among committed messages.
    pub committed_mark: Option<watch::Sender<Option<DateTime<Utc>>>>,
    /// The oldest mark of a batch that could not be committed and is not retried (QoS 0).
    pub gaps: Option<mpsc::Sender<DateTime<Utc>>>,
}

/// Runs one MQTT session until shutdown: the poll loop here, the decoding worker and
/// the acker as tasks.
pub async fn run_session(
    session: Session,
    decoder: impl Decode,
    ctx: &SourceContext,
) -> anyhow::Result<()> {
    let manual_acks = session.options.manual_acks();
    let keep_alive = session.options.keep_alive();
    let (client, mut eventloop) = AsyncClient::new(session.options.clone(), REQUEST_CAPACITY);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_connection_timeout(session.connect_timeout.as_secs().max(1));
    eventloop.set_network_options(network);

    let (handoff_tx, handoff_rx) = mpsc::channel::<Handoff>(HANDOFF_CAPACITY);
    // G9: messages received and not yet taken by the worker wait for this source.
    let handed_off = handoff_tx.downgrade();
    ctx.stage(&session.source).add_probe(Box::new(move || {
        let tx = handed_off.upgrade()?;
        Some(tx.max_capacity().saturating_sub(tx.capacity()) as u64)
    }));
    let window = AckWindow::new(
        ctx.store.commit_delay(&session.source).is_some(),
        ACK_PIPELINE_CAPACITY,
        DELAYED_ACK_WINDOW_MESSAGES,
    );
    let (pending_tx, pending_rx) = mpsc::channel::<Pending>(window.batches);
    let (owed_tx, mut owed_acks) = mpsc::channel::<Vec<PubAckRef>>(ACK_PIPELINE_CAPACITY);
    // The connection PUBACKs may go to: its number while connected, 0 otherwise.
    let live_connection = Arc::new(AtomicU64::new(0));
    let committed_mark = session.committed_mark.clone();
    let worker = tokio::spawn(worker(
        handoff_rx,
        decoder,
        ctx.clone(),
        session.source.clone(),
        manual_acks,
        pending_tx,
        window.messages,
        session.stats.clone(),
    ));
    let acker = tokio::spawn(acker(
        pending_rx,
        AckRoute {
            client: client.clone(),
            owed: owed_tx,
            live_connection: live_connection.clone(),
        },
        ctx.out.clone(),
        session.source.clone(),
        session.stats.clone(),
        committed_mark,
        session.gaps.clone(),
        ctx.shutdown.clone(),
    ));

    let source = session.source.as_str();
    let stats = &session.stats;
    let mut backoff = Backoff::new(session.reconnect_min, session.reconnect_max)
        .with_floor(session.reconnect_min);
    let mut generation: u64 = 0;
    let mut was_connected = false;
    let mut failure_log = LogLimiter::new(Duration::from_secs(300));
    // The message that found the hand-off queue full: nothing more is read from the
    // broker until the worker has made room for it.
    let mut held: Option<Handoff> = None;
    let broker = {
        let (host, port) = session.options.broker_address();
        format!("{host}:{port}")
    };
    let mut state = crate::store::state::StateWriter::new(source, ctx.store.clone());
    // The error last written to `source_state`, so a failing broker is written once
    // per distinct error rather than once per attempt.
    let mut recorded_error: Option<String> = None;
    'session: loop {
        let event = if let Err(error) =
            write_owed_acks(&mut eventloop, &mut owed_acks, &live_connection).await
        {
            Err(error)
        } else if let Some(item) = held.take() {
            let paused = std::time::Instant::now();
            let Paused::Room { permit, lost } = wait_for_room(
                &mut eventloop,
                &handoff_tx,
                &mut owed_acks,
                &live_connection,
                keep_alive,
                &ctx.shutdown,
            )
            .await
            else {
                break;
            };
            permit.send(item);
            stats
                .paused_ms
                .fetch_add(paused.elapsed().as_millis() as u64, Relaxed);
            // The broker's answer to rumqttc's last ping waits behind the messages not
            // read during the pause; the pings written meanwhile kept the connection up.
            eventloop.state.await_pingresp = false;
            match lost {
                Some(error) => Err(error),
                None => continue,
            }
        } else {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                event = eventloop.poll() => event,
            }
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                generation += 1;
                live_connection.store(generation, Relaxed);
                ctx.metrics.set_connected(source, true);
                stats.connects.fetch_add(1, Relaxed);
                if let Some(tx) = &session.connected {
                    let mark = session.committed_mark.as_ref().and_then(|m| *m.borrow());
                    tx.send_replace((generation, mark));
                }
                tracing::info!(
                    source,
                    broker = %session.options.broker_address().0,
                    session_present = ack.session_present,
                    "Connected to the MQTT broker; subscribing."
                );
                was_connected = true;
                recorded_error = None;
                state.put(vec![connection_state_row(
                    "connected",
                    &broker,
                    ctx.clock.now(),
                    None,
                )]);
                // Straight into rumqttc's outgoing queue: never blocks, and is sent
                // before anything else on this connection.
                let filters = session
                    .subscriptions
                    .iter()
                    .map(|(f, q)| SubscribeFilter::new(f.clone(), *q))
                    .collect::<Vec<_>>();
                eventloop
                    .pending
                    .push_back(Request::Subscribe(Subscribe::new_many(filters)));
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                stats.messages.fetch_add(1, Relaxed);
                // Any packet proves the connection alive. rumqttc counts only PINGRESP,
                // which mosquitto queues behind the messages it is sending, so during a
                // large backlog the answer can take longer than the keep-alive.
                eventloop.state.await_pingresp = false;
                let item = Handoff {
                    publish,
                    received_at: ctx.clock.now(),
                    connection: generation,
                };
                match handoff_tx.try_send(item) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(item)) => {
                        // The store is behind: stop reading, so the broker keeps the
                        // rest (back-pressure), and keep the connection alive.
                        stats.handoff_full.fetch_add(1, Relaxed);
                        held = Some(item);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                for (code, (filter, _)) in ack.return_codes.iter().zip(&session.subscriptions) {
                    if *code == SubscribeReasonCode::Failure {
                        tracing::error!(
                            source,
                            topic = %filter,
                            "The broker refused the subscription; check the user's ACL. No data arrives from this topic."
                        );
                    }
                }
            }
            Ok(_) => {}
            Err(error) => {
                live_connection.store(0, Relaxed);
                // Packet ids die with the connection (see `PubAckRef`).
                eventloop
                    .pending
                    .retain(|r| !matches!(r, Request::PubAck(_)));
                stats.connection_failures.fetch_add(1, Relaxed);
                ctx.metrics.set_connected(source, false);
                let text = error.to_string();
                let record = ctx
                    .metrics
                    .set_connection_error(source, &text, ctx.clock.now());
                if recorded_error.as_deref() != Some(text.as_str()) {
                    state.put(vec![connection_state_row(
                        "disconnected",
                        &broker,
                        record.since,
                        Some(&text),
                    )]);
                    recorded_error = Some(text);
                }
                let delay = backoff.next_delay();
                log_connection_error(source, &error, delay, was_connected, &mut failure_log);
                was_connected = false;
                let sleep = tokio::time::sleep(delay);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => break 'session,
                        _ = &mut sleep => break,
                        // Owed on the lost connection: redelivered after the reconnect.
                        Some(_) = owed_acks.recv() => {}
                    }
                }
            }
        }
    }

    // Shutdown: stop taking messages, let the worker hand its last batch to the store,
    // and keep polling briefly so PUBACKs of committed batches reach the broker.
    // Messages not acknowledged now are redelivered at the next start.
    drop(handoff_tx);
    drop(held);
    let mut worker = worker;
    loop {
        // The acker may be handing over PUBACKs while the worker waits for it.
        tokio::select! {
            _ = &mut worker => break,
            Some(acks) = owed_acks.recv() => {
                queue_acks(&mut eventloop, &acks, live_connection.load(Relaxed));
            }
        }
    }
    if manual_acks && live_connection.load(Relaxed) != 0 {
        let flush = async {
            let mut acker = acker;
            loop {
                tokio::select! {
                    _ = &mut acker => break,
                    Some(acks) = owed_acks.recv() => {
                        queue_acks(&mut eventloop, &acks, live_connection.load(Relaxed));
                    }
                    e = eventloop.poll() => if e.is_err() { break },
                }
            }
            while let Ok(acks) = owed_acks.try_recv() {
                queue_acks(&mut eventloop, &acks, live_connection.load(Relaxed));
            }
            let _ = client.try_disconnect();
            while let Ok(e) = eventloop.poll().await {
                if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(SHUTDOWN_FLUSH, flush).await;
    } else {
        acker.abort();
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    }
    Ok(())
}

/// At shutdown only: puts PUBACKs owed on the live connection into the event loop's
/// own queue, written by the polls that flush the session.
fn queue_acks(eventloop: &mut EventLoop, acks: &[PubAckRef], live_connection: u64) {
    for ack in acks.iter().filter(|a| a.connection == live_connection) {
        eventloop
            .pending
            .push_back(Request::PubAck(PubAck::new(ack.pkid)));
    }
}

/// Writes every PUBACK the acker handed over since the last poll, in one flush (the
/// event loop is not being polled, so nothing else writes meanwhile).
async fn write_owed_acks(
    eventloop: &mut EventLoop,
    owed: &mut mpsc::Receiver<Vec<PubAckRef>>,
    live_connection: &AtomicU64,
) -> Result<(), ConnectionError> {
    let live = live_connection.load(Relaxed);
    let mut packets = Vec::new();
    while let Ok(acks) = owed.try_recv() {
        packets.extend(
            acks.iter()
                .filter(|a| a.connection == live)
                .map(|a| Packet::PubAck(PubAck::new(a.pkid))),
        );
    }
    write_directly(eventloop, packets, live_connection).await
}

/// How a pause for room in the hand-off queue ended.
enum Paused<'a> {
    Room {
        permit: mpsc::Permit<'a, Handoff>,
        /// The connection failed during the pause; polling reconnects.
        lost: Option<ConnectionError>,
    },
    /// Shutdown, or the worker is gone.
    Stop,
}

/// Back-pressure: waits until the hand-off queue has room without reading anything
/// from the broker, which keeps the rest (unread in its socket buffer, in its queue,
/// or unsent for want of acknowledgements). The connection stays alive meanwhile:
/// PUBACKs of committed batches and keep-alive pings are written straight to the
/// socket, so neither the broker's in-flight window nor its keep-alive timer waits
/// for the store to catch up.
async fn wait_for_room<'a>(
    eventloop: &mut EventLoop,
    handoff: &'a mpsc::Sender<Handoff>,
    owed: &mut mpsc::Receiver<Vec<PubAckRef>>,
    live_connection: &AtomicU64,
    keep_alive: Duration,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Paused<'a> {
    // rumqttc pinged at most one keep-alive ago and the broker allows one and a half,
    // so the first ping goes out well within the remaining half.
    let mut next_ping = tokio::time::Instant::now() + (keep_alive / 4).min(Duration::from_secs(1));
    let mut lost = None;
    loop {
        let live = live_connection.load(Relaxed);
        let packets: Vec<Packet> = tokio::select! {
            _ = shutdown.cancelled() => return Paused::Stop,
            permit = handoff.reserve() => {
                return match permit {
                    Ok(permit) => Paused::Room { permit, lost },
                    Err(_) => Paused::Stop,
                };
            }
            Some(acks) = owed.recv() => acks
                .iter()
                .filter(|a| a.connection == live)
                .map(|a| Packet::PubAck(PubAck::new(a.pkid)))
                .collect(),
            _ = tokio::time::sleep_until(next_ping) => {
                next_ping += keep_alive / 2;
                vec![Packet::PingReq]
            }
        };
        if let Err(error) = write_directly(eventloop, packets, live_connection).await {
            lost.get_or_insert(error);
        }
    }
}

/// Writes packets to the broker past rumqttc's request queue, between polls. On
/// failure the connection is dropped the way rumqttc drops it (`clean`); the next
/// poll reconnects.
async fn write_directly(
    eventloop: &mut EventLoop,
    packets: Vec<Packet>,
    live_connection: &AtomicU64,
) -> Result<(), ConnectionError> {
    if packets.is_empty() {
        return Ok(());
    }
    let timeout = Duration::from_secs(eventloop.network_options().connection_timeout());
    let Some(network) = eventloop.network.as_mut() else {
        return Ok(());
    };
    let written = tokio::time::timeout(timeout, async {
        for packet in packets {
            network.write(packet).await?;
        }
        network.flush().await
    })
    .await;
    let error = match written {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(error)) => ConnectionError::MqttState(error),
        Err(_) => ConnectionError::FlushTimeout,
    };
    live_connection.store(0, Relaxed);
    eventloop.clean();
    eventloop
        .pending
        .retain(|r| !matches!(r, Request::PubAck(_)));
    Err(error)
}

/// The `state` row of an MQTT source in `source_state` (read by `outpost status`).
fn connection_state_row(
    state: &str,
    broker: &str,
    since: DateTime<Utc>,
    error: Option<&str>,
) -> (String, String) {
    let value = serde_json::json!({
        "state": state,
        "broker": broker,
        "since": since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "error": error,
    });
    ("state".to_string(), value.to_string())
}

fn log_connection_error(
    source: &str,
    error: &ConnectionError,
    delay: Duration,
    was_connected: bool,
    limiter: &mut LogLimiter,
) {
    let delay_text =
        humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)).to_string();
    match error {
        ConnectionError::ConnectionRefused(code) => {
            // Logged once per backoff step: the delays grow, so this stays readable.
            let reason = match code {
                ConnectReturnCode::BadUserNamePassword => {
                    "bad user name or password (check the API key / password)"
                }
                ConnectReturnCode::NotAuthorized => {
                    "not authorised (check the user name and the API key / password, and the user's rights)"
                }
                ConnectReturnCode::BadClientId => "client id rejected",
                ConnectReturnCode::ServiceUnavailable => "service unavailable",
                ConnectReturnCode::RefusedProtocolVersion => "MQTT 3.1.1 not supported",
                ConnectReturnCode::Success => "success",
            };
            tracing::error!(source, reason, retry_in = %delay_text, "The MQTT broker refused the connection.");
        }
        _ if was_connected => {
            tracing::warn!(source, error = %error, retry_in = %delay_text, "Lost the MQTT connection; reconnecting.");
        }
        _ => {
            if let Some(suppressed) = limiter.allow() {
                tracing::warn!(source, error = %error, retry_in = %delay_text, suppressed, "Cannot connect to the MQTT broker; retrying.");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BrokerConfig, Decoded, Rejection};
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
            .with_floor(Duration::from_secs(1));
        let first = b.next_delay();
        assert_eq!(first, Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            let ceiling = b.ceiling();
            let d = b.next_delay();
            assert!(
                d >= Duration::from_secs(1) && d <= ceiling,
                "{d:?} within [1s, {ceiling:?}]"
            );
            ceilings.push(ceiling);
        }
        assert_eq!(ceilings[0], Duration::from_secs(2));
        assert_eq!(
            *ceilings.last().unwrap(),
            Duration::from_secs(30),
            "capped at max"
        );
        // Jitter: many draws at the cap are not all equal.
        let draws: std::collections::BTreeSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(draws.len() > 5, "{draws:?}");
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
        // Huge attempt counts do not overflow.
        let mut big = Backoff::new(Duration::from_secs(1), Duration::from_secs(3600))
            .with_floor(Duration::from_secs(1));
        for _ in 0..200 {
            assert!(big.next_delay() <= Duration::from_secs(3600));
        }
    }

    struct Nothing;
    impl Decode for Nothing {
        fn decode(&mut self, _: &str, _: &[u8], _: DateTime<Utc>) -> Result<Decoded, Rejection> {
            Ok(Decoded::default())
        }
    }

    /// rumqttc would reconnect in a tight loop; the session backs off exponentially.
    #[tokio::test(start_paused = true)]
    async fn reconnects_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::store::StorageConfig {
            path: dir.path().join("db"),
            ..Default::default()
        };
        let (store, ingest) = crate::store::Store::open(&storage, Default::default()).unwrap();
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut broker = BrokerConfig::new("127.0.0.1");
        broker.tls = false;
        broker.port = Some(port);
        let stats = Arc::new(SessionStats::default());
        let session = Session {
            source: "test".into(),
            options: broker
                .mqtt_options("outpost-test", true, false, None, None)
                .unwrap(),
            connect_timeout: Duration::from_secs(5),
            subscriptions: vec![("x".into(), QoS::AtMostOnce)],
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(8),
            stats: stats.clone(),
            connected: None,
            committed_mark: None,
            gaps: None,
        };
        let ctx = SourceContext::for_test(store, ingest.sender.clone());
        let shutdown = ctx.shutdown.clone();
        let task = tokio::spawn(async move { run_session(session, Nothing, &ctx).await });
        tokio::time::sleep(Duration::from_secs(60)).await;
        let failures = stats.connection_failures.load(Relaxed);
        // Delays 1s, ≤2s, ≤4s, then ≤8s each: between 60/8 and 60/1 attempts, and
        // nowhere near a tight loop.
        assert!((7..=40).contains(&failures), "{failures} attempts in 60s");
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }
}
