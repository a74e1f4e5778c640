//! MQTT plumbing shared by the `ttn`, `chirpstack` and `mqtt` sources.
//!
//! What it guarantees:
//! - **The session never waits on itself (G9).** Three tasks and four bounded queues:
//!
//!   | queue | capacity | filled by | drained by |
//!   |---|---|---|---|
//!   | hand-off | [`HANDOFF_CAPACITY`] messages | poll loop (`try_send`, never waits) | worker |
//!   | store ingest | the store's | worker, acker (retries) | store writer thread |
//!   | ack pipeline | [`ACK_PIPELINE_CAPACITY`] batches | worker | acker |
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

use super::SourceContext;
use crate::backoff::Backoff;
use crate::model::{Batch, Reading};
use crate::ratelimit::{KeyedLogLimiter, LogLimiter};
use crate::settings::{HumanDuration, Problems, Secret};
use crate::store::StoreError;
use chrono::{DateTime, Utc};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, PubAck,
    Publish, QoS, Request, Subscribe, SubscribeFilter, SubscribeReasonCode, TlsConfiguration,
    Transport,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Messages waiting between the poll loop and the decoding worker.
pub const HANDOFF_CAPACITY: usize = 1_024;
/// The most messages decoded into one batch.
pub const MAX_MESSAGES_PER_BATCH: usize = 250;
/// Batches sent to the store whose commit is still awaited (QoS 1 acks, cursors), and
/// batches of PUBACKs owed to the poll loop. With [`MAX_MESSAGES_PER_BATCH`] this
/// bounds the readings a session holds in memory: when the store falls behind, the
/// worker waits, the hand-off queue fills, and the poll loop stops reading (G4).
const ACK_PIPELINE_CAPACITY: usize = 4;
/// Requests waiting for the event loop (subscriptions, one wake-up PUBACK per batch).
const REQUEST_CAPACITY: usize = 4_096;
/// rumqttc drops the connection on a larger packet, so this is generous; the
/// decoders enforce the configured, much smaller `max_payload`.
const MAX_PACKET_SIZE: usize = 16 << 20;
/// How long the session keeps polling at shutdown so PUBACKs of committed batches reach
/// the broker (must stay below the pipeline's source grace period).
const SHUTDOWN_FLUSH: Duration = Duration::from_millis(1500);

/// `[sources.broker]`: how to reach an MQTT broker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Host name or IP address of the broker (no `mqtt://` prefix).
    pub host: String,
    /// TCP port; defaults to 8883 with TLS and 1883 without.
    #[serde(default)]
    pub port: Option<u16>,
    /// Use TLS (rustls). On by default; turn off only for a broker on the gateway itself.
    #[serde(default = "yes")]
    pub tls: bool,
    /// PEM file with the CA certificate(s) to trust instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for brokers that require one; needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// User name for password authentication.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (or `password_file`, or `${ENV}`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// The MQTT client id. Persistent sessions (QoS 1) are tied to it, so keep it fixed.
    /// Default: `outpost-<gateway_id>-<source name>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Keep-alive interval (5s to 18h); the broker drops the connection after 1.5× this
    /// without traffic.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: HumanDuration,
    /// How long a connection attempt (TCP, TLS and CONNACK) may take.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// First delay before reconnecting after a failure; it doubles up to `reconnect_max`
    /// (each delay randomised so a fleet does not reconnect in step).
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: HumanDuration,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: HumanDuration,
}

fn yes() -> bool {
    true
}
fn default_keep_alive() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_reconnect_min() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_reconnect_max() -> HumanDuration {
    HumanDuration::from_secs(120)
}

impl BrokerConfig {
    /// A plain configuration for `host:port` (tests, defaults).
    pub fn new(host: impl Into<String>) -> BrokerConfig {
        BrokerConfig {
            host: host.into(),
            port: None,
            tls: true,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            username: None,
            password: None,
            client_id: None,
            keep_alive: default_keep_alive(),
            connect_timeout: default_connect_timeout(),
            reconnect_min: default_reconnect_min(),
            reconnect_max: default_reconnect_max(),
        }
    }

    pub fn port(&self) -> u16 {
        match self.port {
            Some(p) => p,
            None if self.tls => 8883,
            None => 1883,
        }
    }

    /// Checks everything rumqttc would assert on, and loads the TLS files so that
    /// `outpost check` reports a bad certificate.
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        let host = self.host.trim();
        if host.is_empty() {
            problems.push(
                format!("{path}.host"),
                "must name the broker, e.g. \"eu1.cloud.thethings.network\"",
            );
        } else if host.contains("://") {
            problems.push(
                format!("{path}.host"),
                format!("{host:?} is a URL; write only the host name and set `port` and `tls`"),
            );
        } else if host.chars().any(|c| c.is_whitespace() || c == '/') || host.len() > 253 {
            problems.push(
                format!("{path}.host"),
                format!("{host:?} is not a host name or address"),
            );
        }
        if self.port == Some(0) {
            problems.push(format!("{path}.port"), "must be between 1 and 65535");
        }
        let keep_alive = self.keep_alive.get();
        if keep_alive < Duration::from_secs(5) || keep_alive > Duration::from_secs(u16::MAX as u64)
        {
            problems.push(
                format!("{path}.keep_alive"),
                format!("must be between 5s and 18h, found {}", self.keep_alive),
            );
        }
        let timeout = self.connect_timeout.get();
        if timeout < Duration::from_secs(1) || timeout > Duration::from_secs(300) {
            problems.push(
                format!("{path}.connect_timeout"),
                format!("must be between 1s and 5m, found {}", self.connect_timeout),
            );
        }
        if self.reconnect_min.get() < Duration::from_millis(100) {
            problems.push(format!("{path}.reconnect_min"), "must be at least 100ms");
        }
        if self.reconnect_max < self.reconnect_min
            || self.reconnect_max.get() > Duration::from_secs(3600)
        {
            problems.push(
                format!("{path}.reconnect_max"),
                "must be at least reconnect_min and at most 1h",
            );
        }
        if let Some(id) = &self.client_id {
            problems.check(format!("{path}.client_id"), check_client_id(id));
        }
        if let Some(user) = &self.username {
            if user.is_empty() || user.len() > 1024 {
                problems.push(
                    format!("{path}.username"),
                    "must be between 1 and 1024 characters",
                );
            }
        }
        if self.password.is_some() && self.username.is_none() {
            problems.push(format!("{path}.password"), "a password needs a `username`");
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) => problems.push(
                format!("{path}.client_key_file"),
                "is needed with client_cert_file",
            ),
            (None, Some(_)) => problems.push(
                format!("{path}.client_cert_file"),
                "is needed with client_key_file",
            ),
            _ => {}
        }
        if !self.tls {
            for (key, set) in [
                ("ca_file", self.ca_file.is_some()),
                ("client_cert_file", self.client_cert_file.is_some()),
            ] {
                if set {
                    problems.push(format!("{path}.{key}"), "is only used with tls = true");
                }
            }
        } else if let Err((key, message)) = self.tls_config(None) {
            problems.push(format!("{path}.{key}"), message);
        }
    }

    /// The rustls client configuration (ring provider): the CA file's certificates or
    /// the system's roots, and the client certificate if configured; the broker's
    /// certificate goes to `recorder`. Errors name the key at fault.
    pub fn tls_config(
        &self,
        recorder: Option<crate::tls::CertRecorder>,
    ) -> Result<rustls::ClientConfig, (&'static str, String)> {
        tls_client_config(
            self.ca_file.as_deref(),
            self.client_cert_file
                .as_deref()
                .zip(self.client_key_file.as_deref()),
            recorder,
        )
    }

    /// The broker as the TLS server source `source` connects to, with its files.
    pub fn tls_endpoint(&self, source: &str) -> crate::tls::Endpoint {
        let label = format!("sources.{source}.broker");
        crate::tls::Endpoint::new(label.clone())
            .with_file(format!("{label}.ca_file"), self.ca_file.as_ref())
            .with_file(
                format!("{label}.client_cert_file"),
                self.client_cert_file.as_ref(),
            )
    }

    /// Records the certificate this broker presents to `source` in `store`.
    pub fn cert_recorder(
        &self,
        source: &str,
        store: &crate::store::Store,
    ) -> crate::tls::CertRecorder {
        store.cert_recorder(
            &format!("sources.{source}.broker"),
            &format!("{}:{}", self.host.trim(), self.port()),
        )
    }

    /// rumqttc options for this broker; with TLS, its certificate goes to `recorder`.
    /// `validate` must have passed.
    pub fn mqtt_options(
        &self,
        client_id: &str,
        clean_session: bool,
        manual_acks: bool,
        credentials: Option<(String, String)>,
        recorder: Option<crate::tls::CertRecorder>,
    ) -> Result<MqttOptions, String> {
        check_client_id(client_id)?;
        let keep_alive = self.keep_alive.get();
        if keep_alive < Duration::from_secs(1) {
            return Err("keep_alive must be at least 1s".into());
        }
        let mut options = MqttOptions::new(client_id, self.host.trim(), self.port());
        options
            .set_keep_alive(keep_alive)
            .set_clean_session(clean_session)
            .set_manual_acks(manual_acks)
            .set_max_packet_size(MAX_PACKET_SIZE, 64 << 10)
            .set_request_channel_capacity(REQUEST_CAPACITY)
            .set_inflight(100);
        let credentials = credentials.or_else(|| {
            self.username.clone().map(|u| {
                (
                    u,
                    self.password
                        .as_ref()
                        .map(|p| p.expose().to_string())
                        .unwrap_or_default(),
                )
            })
        });
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        if self.tls {
            let config = self
                .tls_config(recorder)
                .map_err(|(key, message)| format!("{key}: {message}"))?;
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(config),
            )));
        }
        Ok(options)
    }
}

/// The client id rules rumqttc and brokers impose.
pub fn check_client_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(
            "the client id must not be empty (a persistent session needs a fixed id)".into(),
        );
    }
    if id.len() > 128 {
        return Err("the client id is longer than 128 characters".into());
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "the client id {id:?} contains {c:?}; use printable ASCII without spaces"
        ));
    }
    Ok(())
}

/// The default client id: fixed per gateway and source, so persistent sessions survive
/// restarts.
pub fn default_client_id(gateway_id: &str, source: &str) -> String {
    let id: String = format!("outpost-{gateway_id}-{source}")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(128)
        .collect();
    id
}

/// Builds a rustls client configuration on the ring provider: the CA file's
/// certificates, or the system's roots when none is set; the server's certificate goes
/// to `recorder`.
pub fn tls_client_config(
    ca_file: Option<&std::path::Path>,
    client_auth: Option<(&std::path::Path, &std::path::Path)>,
    recorder: Option<crate::tls::CertRecorder>,
) -> Result<rustls::ClientConfig, (&'static str, String)> {
    let roots = crate::tls::root_store(ca_file, ca_file.is_none()).map_err(|e| ("ca_file", e))?;
    if roots.is_empty() {
        return Err((
            "ca_file",
            "no system CA certificates were found (install ca-certificates) and no ca_file is set"
                .into(),
        ));
    }
    crate::tls::client_config(roots, client_auth, recorder)
}

/// Why a message was not turned into readings. `reason` is a short, low-cardinality
/// label for counters and the `rejected` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: &'static str,
    pub detail: String,
    /// `false` for messages skipped on purpose (other message types, simulated uplinks
    /// configured to be dropped): counted, not logged or kept.
    pub record: bool,
}

/// The readings of one message, and its position for cursors (e.g. the network
/// server's `received_at`).
#[derive(Debug, Default)]
pub struct Decoded {
    pub readings: Vec<Reading>,
    pub mark: Option<DateTime<Utc>>,
}

/// Turns one MQTT message into readings. Implemented by each source with a pure decoder.
pub trait Decode: Send + 'static {
    fn decode(
        &mut self,
        topic: &str,
        payload: &[u8],
        received_at: DateTime<Utc>,
    ) -> Result<Decoded, Rejection>;
}

/// Counters of one MQTT session, for tests, status and metrics.
#[derive(Debug, Default)]
pub struct SessionStats {
    pub connects: AtomicU64,
    pub connection_failures: AtomicU64,
    pub messages: AtomicU64,
    pub readings: AtomicU64,
    pub committed_messages: AtomicU64,
    pub ignored: AtomicU64,
    pub rejected: AtomicU64,
    /// Rejections by reason.
    pub rejected_by_reason: Mutex<BTreeMap<&'static str, u64>>,
    /// Batches whose commit failed (retried for QoS 1, backfilled for TTN).
    pub commit_failures: AtomicU64,
    /// Times the session stopped reading from the broker because the hand-off queue
    /// was full (back-pressure).
    pub handoff_full: AtomicU64,
    /// Milliseconds spent not reading for that reason.
    pub paused_ms: AtomicU64,
}

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

struct Handoff {
    publish: Publish,
    received_at: DateTime<Utc>,
    /// The connection that delivered it (see [`PubAckRef`]).
    connection: u64,
}

/// A PUBACK owed for a committed QoS 1 message. Packet ids belong to the connection
/// that delivered the message: after a reconnect the broker redelivers everything not
/// yet acknowledged, so an ack owed on an older connection is dropped (the redelivered
/// copy is deduplicated by its uid and acknowledged in turn), as rumqttc itself does
/// with the PUBACKs in its queue when a connection ends.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PubAckRef {
    connection: u64,
    pkid: u16,
}

/// A batch sent to the store whose commit the acker awaits.
struct Pending {
    ack: oneshot::Receiver<Result<crate::model::Committed, StoreError>>,
    /// PUBACKs to send after the commit (manual acks only).
    acks: Vec<PubAckRef>,
    /// A copy of the readings to resend if the commit fails (manual acks only).
    retry: Option<Vec<Reading>>,
    messages: usize,
    min_mark: Option<DateTime<Utc>>,
    max_mark: Option<DateTime<Utc>>,
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
    let (pending_tx, pending_rx) = mpsc::channel::<Pending>(ACK_PIPELINE_CAPACITY);
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
                    Utc::now(),
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
                    received_at: crate::clock::now(),
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
                let record = ctx.metrics.set_connection_error(source, &text, Utc::now());
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

async fn worker(
    mut rx: mpsc::Receiver<Handoff>,
    mut decoder: impl Decode,
    ctx: SourceContext,
    source: String,
    manual_acks: bool,
    pending: mpsc::Sender<Pending>,
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
            hint = super::reasons::fix_for(rejection.reason),
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
struct AckRoute {
    client: AsyncClient,
    owed: mpsc::Sender<Vec<PubAckRef>>,
    live_connection: Arc<AtomicU64>,
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
async fn acker(
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
                            if current.map_or(true, |c| c < mark) {
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

/// Checks an MQTT topic filter: levels split by `/`, `+` only as a whole level, `#`
/// only as the whole last level.
pub fn check_topic_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("the topic filter must not be empty".into());
    }
    if filter.len() > 65_535 || filter.contains('\0') {
        return Err("the topic filter is not valid MQTT".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != levels.len() - 1) {
            return Err(format!("{filter:?}: '#' must be the whole last level"));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("{filter:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

/// Checks one topic level given in configuration (an application id): no wildcards or
/// separators.
pub fn check_topic_level(value: &str, what: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#' | '\0') || c.is_whitespace())
    {
        return Err(format!(
            "{what} {value:?} contains {c:?}, which cannot appear in an MQTT topic level"
        ));
    }
    Ok(())
}

/// A payload larger than `max` is refused before parsing.
pub fn check_size(payload: &[u8], max: usize) -> Result<(), Rejection> {
    if payload.len() > max {
        return Err(Rejection {
            reason: "too_large",
            detail: format!(
                "the payload has {} bytes, more than max_payload ({max})",
                payload.len()
            ),
            record: true,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn topic_filters_are_checked() {
        for ok in ["a/b", "a/+/c", "#", "a/#", "+", "v3/app@ttn/devices/+/up"] {
            assert!(check_topic_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/#/b", "a/b#", "a/+b", "a+/b", "x\0y"] {
            assert!(check_topic_filter(bad).is_err(), "{bad:?}");
        }
        assert!(check_topic_level("bistro", "app").is_ok());
        for bad in ["", "a/b", "a+", "#", "a b"] {
            assert!(check_topic_level(bad, "app").is_err(), "{bad:?}");
        }
    }

    fn problems_of(b: &BrokerConfig) -> Vec<String> {
        let mut p = Problems::default();
        b.validate("sources[0].broker", &mut p);
        p.0.into_iter().map(|(k, m)| format!("{k}: {m}")).collect()
    }

    #[test]
    fn broker_validation_catches_what_rumqttc_would_assert() {
        let mut b = BrokerConfig::new("localhost");
        b.tls = false;
        assert!(problems_of(&b).is_empty(), "{:?}", problems_of(&b));
        assert_eq!(b.port(), 1883);
        b.tls = true;
        b.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(problems_of(&b)
            .iter()
            .any(|p| p.contains("ca_file: cannot read")));
        let mut bad = BrokerConfig::new("mqtts://host:8883");
        bad.tls = false;
        bad.port = Some(0);
        bad.keep_alive = HumanDuration::from_millis(500);
        bad.client_id = Some("has space".into());
        bad.password = Some(Secret::new("x"));
        bad.client_cert_file = Some("/x".into());
        bad.reconnect_min = HumanDuration::from_secs(10);
        bad.reconnect_max = HumanDuration::from_secs(5);
        let problems = problems_of(&bad);
        for expected in [
            "host: \"mqtts://host:8883\" is a URL",
            "port: must be between",
            "keep_alive: must be between 5s",
            "client_id: the client id",
            "password: a password needs",
            "client_key_file: is needed",
            "reconnect_max: must be at least",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected:?} in {problems:#?}"
            );
        }
        assert!(problems_of(&BrokerConfig::new(""))
            .iter()
            .any(|p| p.contains("host: must name")));
    }

    #[test]
    fn options_never_panic_on_bad_input() {
        let mut b = BrokerConfig::new("localhost");
        b.tls = false;
        assert!(
            b.mqtt_options("", false, true, None, None).is_err(),
            "empty id with a persistent session"
        );
        assert!(b.mqtt_options("a b", true, false, None, None).is_err());
        let o = b
            .mqtt_options(
                "outpost-gw-src",
                false,
                true,
                Some(("u".into(), "p".into())),
                None,
            )
            .unwrap();
        assert!(!o.clean_session());
        assert!(o.manual_acks());
        assert_eq!(o.credentials().map(|l| l.username), Some("u".to_string()));
        assert_eq!(default_client_id("gw 1", "src"), "outpost-gw1-src");
    }

    #[test]
    fn tls_config_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, b"\x00\x01 not pem").unwrap();
        let err = tls_client_config(Some(&garbage), None, None).unwrap_err();
        assert_eq!(err.0, "ca_file");
        assert!(err.1.contains("no PEM certificate"), "{}", err.1);
        // System roots exist on this machine (ca-certificates).
        if std::path::Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
            assert!(tls_client_config(None, None, None).is_ok());
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
        let ctx = SourceContext {
            out: ingest.sender.clone(),
            shutdown: tokio_util::sync::CancellationToken::new(),
            metrics: crate::metrics::Metrics::new(&store),
            store,
            gateway_id: "gw".into(),
        };
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

    #[test]
    fn oversized_payloads_are_refused() {
        assert!(check_size(&[0u8; 10], 10).is_ok());
        let r = check_size(&[0u8; 11], 10).unwrap_err();
        assert_eq!(r.reason, "too_large");
    }
}
