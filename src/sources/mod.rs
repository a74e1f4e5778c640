//! Sources: everything that produces readings. The set is closed: each kind implements
//! [`SourceKind`] (its `type`, checks, TLS endpoints and `run`) in its own file or
//! folder, and one line per kind in the kind list ([`source_kinds!`], below) generates
//! the tagged enum [`SourceConfig`] (`type = "…"`) and every per-kind switch.
//!
//! - `simulated.rs`, `serial/` (with its line formats), `modbus/` (with its register
//!   decoding): the kinds that make or read readings locally; `port.rs` and
//!   `window.rs` are what serial and Modbus share (reopening the port, state rows,
//!   batches in flight).
//! - `ttn/` (with its Storage Integration backfill), `chirpstack.rs`, `mqtt_json.rs`:
//!   the kinds that subscribe to a broker, all through the one session driver in
//!   `mqtt/`.
//! - `mapping.rs` (field mapping, plausible ranges), `reasons.rs` (rejection reasons
//!   and their fixes), `rejects.rs` (counting rejected input, sequence numbers).
//!
//! Every source hands [`Batch`]es to the store through a bounded channel and
//! acknowledges its producer only after the batch's commit (G1). Sources stop when the
//! shutdown token is cancelled and drop their sender, which lets the writer finish.

pub mod chirpstack;
pub mod mapping;
pub mod modbus;
pub mod mqtt;
pub mod mqtt_json;
pub mod port;
pub mod reasons;
pub mod rejects;
pub mod serial;
pub mod simulated;
pub mod ttn;
pub mod window;

// Paths from before the `mqtt/` and `ttn/` folders (the CLI, benches, `crate::fuzzing`).
pub use mqtt as mqtt_client;
pub use ttn::backfill as ttn_backfill;
// The parsers under their paths from before the `serial/` and `modbus/` folders
// (tests, fuzz targets).
pub use modbus::decode as modbus_decode;
pub use serial::formats as serial_formats;

use crate::model::Batch;
use crate::settings::{check_identifier, quoted, Problems};
use crate::store::Store;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::future::Future;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What every kind of source declares about itself; [`SourceConfig`] and its methods
/// are generated from these by [`source_kinds!`], so shared code never names a kind.
pub trait SourceKind:
    Sized + Clone + PartialEq + std::fmt::Debug + Serialize + DeserializeOwned + Send + 'static
{
    /// The `type` value of its `[[sources]]` tables.
    const TYPE: &'static str;

    /// The source's `name`.
    fn name(&self) -> &str;

    /// Checks beyond deserialization, with key paths under `path` (`sources[2]`); the
    /// name is checked for every kind by [`SourceConfig::validate`].
    fn validate(&self, path: &str, problems: &mut Problems);

    /// The TLS servers it connects to, for the certificate watch (no default: every
    /// kind says whether it connects to one).
    fn tls_endpoints(&self) -> Vec<crate::tls::Endpoint>;

    /// Runs the source until `ctx.shutdown` is cancelled.
    fn run(self, ctx: SourceContext) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// A boxed kind (a large configuration) is the kind.
impl<K: SourceKind + Sync> SourceKind for Box<K> {
    const TYPE: &'static str = K::TYPE;

    fn name(&self) -> &str {
        (**self).name()
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        (**self).validate(path, problems)
    }

    fn tls_endpoints(&self) -> Vec<crate::tls::Endpoint> {
        (**self).tls_endpoints()
    }

    fn run(self, ctx: SourceContext) -> impl Future<Output = anyhow::Result<()>> + Send {
        (*self).run(ctx)
    }
}

/// Generates the closed enum [`SourceConfig`] (one variant per kind), the [`TYPES`]
/// list and every per-kind switch from the kind list below.
macro_rules! source_kinds {
    ($($variant:ident($config:ty),)+) => {
        /// One `[[sources]]` entry: serialized with its `type` first, like serde's
        /// internally tagged enums.
        #[derive(Debug, Clone, PartialEq)]
        pub enum SourceConfig {
            $($variant($config),)+
        }

        /// The `type` values, for messages.
        pub const TYPES: &[&str] = &[$(<$config as SourceKind>::TYPE,)+];

        impl SourceConfig {
            pub fn name(&self) -> &str {
                match self {
                    $(SourceConfig::$variant(c) => c.name(),)+
                }
            }

            /// The `type` value.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(SourceConfig::$variant(_) => <$config as SourceKind>::TYPE,)+
                }
            }

            /// The TLS servers this source connects to.
            pub fn tls_endpoints(&self) -> Vec<crate::tls::Endpoint> {
                match self {
                    $(SourceConfig::$variant(c) => c.tls_endpoints(),)+
                }
            }

            fn validate_kind(&self, path: &str, problems: &mut Problems) {
                match self {
                    $(SourceConfig::$variant(c) => c.validate(path, problems),)+
                }
            }

            /// Deserializes the kind `kind` (the `type` already taken out of `value`).
            fn deserialize_kind(
                kind: &str,
                value: Value,
                path: &str,
                problems: &mut Problems,
            ) -> Option<Option<SourceConfig>> {
                $(if kind == <$config as SourceKind>::TYPE {
                    return Some(problems.deserialize(value, path).map(SourceConfig::$variant));
                })+
                None
            }

            /// Runs the source until `shutdown` is cancelled.
            pub async fn run(self, ctx: SourceContext) -> anyhow::Result<()> {
                match self {
                    $(SourceConfig::$variant(c) => c.run(ctx).await,)+
                }
            }
        }

        impl Serialize for SourceConfig {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                match self {
                    $(SourceConfig::$variant(c) => Tagged {
                        kind: <$config as SourceKind>::TYPE,
                        config: c,
                    }
                    .serialize(serializer),)+
                }
            }
        }
    };
}

// The kind list: one line per kind of source.
source_kinds! {
    Simulated(simulated::SimulatedConfig),
    Ttn(ttn::TtnConfig),
    Chirpstack(chirpstack::ChirpStackConfig),
    Mqtt(mqtt_json::MqttJsonConfig),
    Serial(Box<serial::SerialConfig>),
    ModbusRtu(modbus::ModbusConfig),
}

/// A kind's configuration with its `type`.
#[derive(Serialize)]
struct Tagged<'a, T> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    config: &'a T,
}

impl SourceConfig {
    /// Deserializes one `[[sources]]` table, reporting problems with their key paths.
    /// (Done by hand rather than through serde's internally tagged enums, which lose
    /// the path of an error inside the variant.)
    pub fn from_json(
        mut value: Value,
        path: &str,
        problems: &mut Problems,
    ) -> Option<SourceConfig> {
        let kind = problems.take_type(&mut value, path, TYPES)?;
        match SourceConfig::deserialize_kind(&kind, value, path, problems) {
            Some(config) => config,
            None => {
                problems.push(
                    format!("{path}.type"),
                    format!(
                        "unknown source type {kind:?}; expected one of {}",
                        quoted(TYPES)
                    ),
                );
                None
            }
        }
    }

    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.check(
            format!("{path}.name"),
            check_identifier(self.name(), "the source name"),
        );
        self.validate_kind(path, problems);
    }
}

/// What a running source is given.
#[derive(Clone)]
pub struct SourceContext {
    /// Where batches go; bounded: a full channel makes the source wait.
    pub out: mpsc::Sender<Batch>,
    pub shutdown: CancellationToken,
    /// For durable source state (cursors, sequences) and read queries.
    pub store: Store,
    /// Counters (`received`, `rejected`) and the connection state shown by `/health`.
    pub metrics: crate::metrics::Metrics,
    /// `agent.gateway_id`, e.g. for default MQTT client ids.
    pub gateway_id: String,
    /// Where "now" comes from (`received_at`, state rows).
    pub clock: crate::clock::Clock,
    /// The certificate watch the TLS servers' certificates are recorded in.
    pub certs: crate::tls::CertWatch,
}

impl SourceContext {
    /// A context for unit tests: `store`, its readings channel `out`, the system clock.
    #[cfg(test)]
    pub(crate) fn for_test(store: Store, out: mpsc::Sender<Batch>) -> SourceContext {
        SourceContext {
            out,
            shutdown: CancellationToken::new(),
            metrics: crate::metrics::Metrics::new(&store),
            store,
            gateway_id: "gw".into(),
            clock: crate::clock::Clock::system(),
            certs: crate::tls::CertWatch::default(),
        }
    }
}

/// Counts one more wait for a full disk in `waits` and logs "The disk is full: {what}
/// until the store takes them." at every power of two.
pub fn note_disk_full(what: &str, waits: &mut u64) {
    *waits += 1;
    if waits.is_power_of_two() {
        tracing::warn!(
            waits = *waits,
            "The disk is full: {what} until the store takes them."
        );
    }
}

/// What a batch's acknowledgement resolves to: its commit, the store's refusal, or an
/// error when the writer stopped before answering.
pub type AckResult = Result<
    Result<crate::model::Committed, crate::store::StoreError>,
    tokio::sync::oneshot::error::RecvError,
>;

/// How long a source waits at most before offering a batch refused because the disk
/// is full again.
pub const FULL_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl SourceContext {
    /// Records the certificate the TLS server `peer` presents for the endpoint `label`
    /// (`sources.NAME.broker`, `sources.NAME.backfill`).
    pub fn cert_recorder(&self, label: &str, peer: &str) -> crate::tls::CertRecorder {
        self.certs.recorder(label, peer)
    }

    /// The progress stage of the source `name` (G9): the store writer records its
    /// progress at every commit of its readings; the source counts the readings in
    /// hand that wait for their commit. The pipeline holds it while the source runs.
    pub fn stage(&self, name: &str) -> crate::progress::Stage {
        self.store.progress().stage(
            &crate::progress::source_stage(name),
            "batches of readings not yet stored",
            Some(crate::progress::STORE),
        )
    }

    /// After the store refused a batch because the disk is full: waits until some
    /// commit has succeeded since (the writer then clears `disk_full`, so a backlog of
    /// refused batches goes at once) or [`FULL_RETRY`] has passed (someone has to try).
    /// Returns false on shutdown.
    pub async fn wait_for_disk_room(&self) -> bool {
        let deadline = tokio::time::Instant::now() + FULL_RETRY;
        let stats = self.store.stats().clone();
        loop {
            if !stats.disk_full.load(std::sync::atomic::Ordering::Relaxed)
                || tokio::time::Instant::now() >= deadline
            {
                return true;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return false,
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            }
        }
    }

    /// While the store refuses `readings` because the disk is full, offers them again
    /// (same uids, so never stored twice) once there may be room
    /// ([`wait_for_disk_room`](Self::wait_for_disk_room)); the source makes or reads
    /// nothing new meanwhile. `waits` counts the refusals, and every power of two of
    /// them logs "The disk is full: {what} until the store takes them." Returns the
    /// last result: still the refusal when the agent stops while the disk is full.
    pub async fn resend_while_full(
        &self,
        readings: &[crate::model::Reading],
        mut result: AckResult,
        what: &str,
        waits: &mut u64,
    ) -> AckResult {
        while let Ok(Err(crate::store::StoreError::Full)) = result {
            note_disk_full(what, waits);
            if !self.wait_for_disk_room().await {
                break;
            }
            let (batch, ack) = Batch::with_ack(readings.to_vec());
            if self.out.send(batch).await.is_err() {
                break;
            }
            result = ack.await;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A minimal `[[sources]]` table of every kind (without `type` and `name`). A new
    /// kind must add one, so the checks below cover it.
    fn samples() -> Vec<(&'static str, Value)> {
        let broker = json!({ "host": "broker.example", "tls": false });
        vec![
            (
                "simulated",
                json!({ "devices": ["d1"], "metrics": [{ "name": "t" }] }),
            ),
            (
                "ttn",
                json!({ "application": "app", "api_key": "NNSXS.KEY", "broker": broker }),
            ),
            (
                "chirpstack",
                json!({ "application_id": "1f6a3c2e", "broker": broker }),
            ),
            (
                "mqtt",
                json!({ "topics": ["sensors/+/json"], "device_segment": 1, "broker": broker }),
            ),
            (
                "serial",
                json!({ "path": "/dev/ttyUSB0", "format": "json" }),
            ),
            (
                "modbus-rtu",
                json!({ "path": "/dev/ttyUSB1", "slaves": [] }),
            ),
        ]
    }

    fn parse(kind: &str, mut value: Value) -> SourceConfig {
        value["type"] = json!(kind);
        value["name"] = json!("s1");
        let mut problems = Problems::default();
        let config = SourceConfig::from_json(value, "sources[0]", &mut problems);
        assert!(problems.0.is_empty(), "{kind}: {:?}", problems.0);
        config.unwrap_or_else(|| panic!("{kind} did not deserialize"))
    }

    #[test]
    fn every_kind_in_the_list_has_a_sample() {
        let samples = samples();
        for kind in TYPES {
            assert!(
                samples.iter().any(|(k, _)| k == kind),
                "add a sample of {kind:?} to samples()"
            );
        }
    }

    /// Every kind that connects to a broker declares it (`sources.NAME.broker`), and
    /// TTN its Storage Integration too, so the certificate watch covers them.
    #[test]
    fn every_kind_that_connects_declares_its_tls_endpoints() {
        for (kind, value) in samples() {
            let connects = value.get("broker").is_some();
            let config = parse(kind, value);
            assert_eq!(config.kind(), kind);
            assert_eq!(config.name(), "s1");
            let labels: Vec<String> = config
                .tls_endpoints()
                .into_iter()
                .map(|e| e.label)
                .collect();
            let mut expected = Vec::new();
            if connects {
                expected.push("sources.s1.broker".to_string());
            }
            if kind == "ttn" {
                expected.push("sources.s1.backfill".to_string());
            }
            assert_eq!(labels, expected, "{kind}");
        }
    }

    /// The generated serializer writes `type` like serde's internally tagged enums, so
    /// a printed configuration reads back the same (secrets print redacted).
    #[test]
    fn serialized_sources_read_back_the_same() {
        for (kind, value) in samples() {
            let config = parse(kind, value);
            let printed = serde_json::to_value(&config).unwrap();
            assert_eq!(printed["type"], json!(kind));
            let mut problems = Problems::default();
            let again = SourceConfig::from_json(printed.clone(), "sources[0]", &mut problems)
                .unwrap_or_else(|| panic!("{kind}: {:?}", problems.0));
            assert_eq!(serde_json::to_value(&again).unwrap(), printed, "{kind}");
            // As `outpost config` prints it.
            let text = toml::to_string(&config).unwrap();
            let read: toml::Value = toml::from_str(&text).unwrap();
            let back = SourceConfig::from_json(
                serde_json::to_value(read).unwrap(),
                "sources[0]",
                &mut problems,
            );
            let back = back.unwrap_or_else(|| panic!("{kind}: {:?}\n{text}", problems.0));
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                printed,
                "{kind}:\n{text}"
            );
        }
    }

    #[test]
    fn unknown_types_name_the_known_ones() {
        let mut problems = Problems::default();
        let value = json!({ "type": "lorawan", "name": "s1" });
        assert!(SourceConfig::from_json(value, "sources[0]", &mut problems).is_none());
        let text = format!("{:?}", problems.0);
        assert!(text.contains("sources[0].type"), "{text}");
        assert!(text.contains("modbus-rtu"), "{text}");
    }
}
