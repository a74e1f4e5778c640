//! The one MQTT session driver of the `ttn`, `chirpstack` and `mqtt` sources: a kind
//! gives its broker, its topics and the QoS it subscribes with
//! ([`Subscription`]) and a pure decoder ([`Decode`]); [`run`] does the rest.
//!
//! - [`broker`]: `[sources.broker]`, its checks, rumqttc options and TLS.
//! - [`session`]: the poll loop (never waits for anything but the socket, issue 12).
//! - [`worker`]: the decoding worker and the acker (PUBACKs after the commit).
//! - [`topics`]: topic filter and level checks.

pub mod broker;
pub mod session;
pub mod topics;
pub mod worker;

pub use broker::{check_client_id, default_client_id, tls_client_config, BrokerConfig};
pub use session::{run_session, Session, HANDOFF_CAPACITY};
pub use topics::{check_topic_filter, check_topic_level};
pub use worker::{reject, MAX_MESSAGES_PER_BATCH};

// The generic MQTT kind under its path from before this folder (tests/properties.rs,
// `crate::fuzzing`); the kind itself is `sources::mqtt_json`.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use super::mqtt_json::JsonDecoder;
pub use super::mqtt_json::{decode_json, MqttJsonConfig};

use crate::model::Reading;
use crate::settings::{ByteSize, Problems};
use crate::sources::SourceContext;
use chrono::{DateTime, Utc};
use rumqttc::QoS;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// What a kind subscribes to, and how.
pub struct Subscription {
    pub topics: Vec<String>,
    /// `QoS::AtLeastOnce`: a persistent session with manual acks, each message
    /// acknowledged only after its batch committed (G1). `QoS::AtMostOnce`: a clean
    /// session, nothing acknowledged.
    pub qos: QoS,
    /// User name and password instead of the broker's (TTN: application and API key).
    pub credentials: Option<(String, String)>,
}

impl Session {
    /// The session of source `source`: the broker's options (client id by default
    /// `outpost-<gateway_id>-<source>`, the broker's certificate recorded under
    /// `sources.<source>.broker`), `subscription`, fresh counters; no marks or gaps
    /// (TTN sets those for its backfill).
    pub fn new(
        source: &str,
        broker: &BrokerConfig,
        subscription: Subscription,
        ctx: &SourceContext,
    ) -> anyhow::Result<Session> {
        let client_id = broker
            .client_id
            .clone()
            .unwrap_or_else(|| default_client_id(&ctx.gateway_id, source));
        let at_least_once = subscription.qos != QoS::AtMostOnce;
        let recorder = ctx.cert_recorder(&broker.tls_endpoint(source).label, &broker.peer());
        let options = broker
            .mqtt_options(
                &client_id,
                !at_least_once,
                at_least_once,
                subscription.credentials,
                Some(recorder),
            )
            .map_err(|e| anyhow::anyhow!("source {source}: {e}"))?;
        Ok(Session {
            source: source.to_string(),
            options,
            connect_timeout: broker.connect_timeout.get(),
            subscriptions: subscription
                .topics
                .into_iter()
                .map(|t| (t, subscription.qos))
                .collect(),
            reconnect_min: broker.reconnect_min.get(),
            reconnect_max: broker.reconnect_max.get(),
            stats: Arc::new(SessionStats::default()),
            connected: None,
            committed_mark: None,
            gaps: None,
        })
    }

    /// Runs the session with `decoder` until shutdown (see [`session`]).
    pub async fn run(self, decoder: impl Decode, ctx: &SourceContext) -> anyhow::Result<()> {
        run_session(self, decoder, ctx).await
    }
}

/// An optional RFC 3339 time of a network server's JSON (`""` counts as absent, as the
/// servers omit empty fields); the error holds the start of the bad value.
pub fn parse_rfc3339(value: Option<&str>) -> Result<Option<DateTime<Utc>>, String> {
    match value {
        None | Some("") => Ok(None),
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| s.chars().take(64).collect()),
    }
}

/// The default `max_payload` of the MQTT sources.
pub fn default_max_payload() -> ByteSize {
    ByteSize(64 << 10)
}

/// Checks a source's `max_payload`.
pub fn check_max_payload(size: ByteSize, path: &str, problems: &mut Problems) {
    if size.0 < 256 || size.0 > (16 << 20) {
        problems.push(
            path,
            format!("must be between 256B and 16MiB, found {size}"),
        );
    }
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
    fn oversized_payloads_are_refused() {
        assert!(check_size(&[0u8; 10], 10).is_ok());
        let r = check_size(&[0u8; 11], 10).unwrap_err();
        assert_eq!(r.reason, "too_large");
    }
}
