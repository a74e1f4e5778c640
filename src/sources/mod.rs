//! Sources: everything that produces readings. The set is closed, so configuration is a
//! tagged enum (`type = "…"`) and each variant runs its own component.
//!
//! Every source hands [`Batch`]es to the store through a bounded channel and
//! acknowledges its producer only after the batch's commit (G1). Sources stop when the
//! shutdown token is cancelled and drop their sender, which lets the writer finish.

pub mod chirpstack;
pub mod mapping;
pub mod modbus;
pub mod modbus_decode;
pub mod mqtt;
pub mod mqtt_client;
pub mod reasons;
pub mod rejects;
pub mod serial;
pub mod serial_formats;
pub mod simulated;
pub mod ttn;
pub mod ttn_backfill;

use crate::model::Batch;
use crate::settings::{check_identifier, quoted, Problems};
use crate::store::Store;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One `[[sources]]` entry.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum SourceConfig {
    Simulated(simulated::SimulatedConfig),
    Ttn(ttn::TtnConfig),
    Chirpstack(chirpstack::ChirpStackConfig),
    Mqtt(mqtt::MqttJsonConfig),
    Serial(Box<serial::SerialConfig>),
    ModbusRtu(modbus::ModbusConfig),
}

/// The `type` values, for messages.
const TYPES: &[&str] = &[
    "simulated",
    "ttn",
    "chirpstack",
    "mqtt",
    "serial",
    "modbus-rtu",
];

impl SourceConfig {
    pub fn name(&self) -> &str {
        match self {
            SourceConfig::Simulated(c) => &c.name,
            SourceConfig::Ttn(c) => &c.name,
            SourceConfig::Chirpstack(c) => &c.name,
            SourceConfig::Mqtt(c) => &c.name,
            SourceConfig::Serial(c) => &c.name,
            SourceConfig::ModbusRtu(c) => &c.name,
        }
    }

    /// The TLS servers this source connects to (every match arm is explicit, so a new
    /// kind must say whether it connects to one).
    pub fn tls_endpoints(&self) -> Vec<crate::tls::Endpoint> {
        match self {
            SourceConfig::Ttn(c) => vec![
                c.broker.tls_endpoint(&c.name),
                crate::tls::Endpoint::new(format!("sources.{}.backfill", c.name)),
            ],
            SourceConfig::Chirpstack(c) => vec![c.broker.tls_endpoint(&c.name)],
            SourceConfig::Mqtt(c) => vec![c.broker.tls_endpoint(&c.name)],
            SourceConfig::Simulated(_) | SourceConfig::Serial(_) | SourceConfig::ModbusRtu(_) => {
                Vec::new()
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::Simulated(_) => "simulated",
            SourceConfig::Ttn(_) => "ttn",
            SourceConfig::Chirpstack(_) => "chirpstack",
            SourceConfig::Mqtt(_) => "mqtt",
            SourceConfig::Serial(_) => "serial",
            SourceConfig::ModbusRtu(_) => "modbus-rtu",
        }
    }

    /// Deserializes one `[[sources]]` table, reporting problems with their key paths.
    /// (Done by hand rather than through serde's internally tagged enums, which lose
    /// the path of an error inside the variant.)
    pub fn from_json(
        mut value: Value,
        path: &str,
        problems: &mut Problems,
    ) -> Option<SourceConfig> {
        let kind = problems.take_type(&mut value, path, TYPES)?;
        match kind.as_str() {
            "simulated" => problems
                .deserialize(value, path)
                .map(SourceConfig::Simulated),
            "ttn" => problems.deserialize(value, path).map(SourceConfig::Ttn),
            "chirpstack" => problems
                .deserialize(value, path)
                .map(SourceConfig::Chirpstack),
            "mqtt" => problems.deserialize(value, path).map(SourceConfig::Mqtt),
            "serial" => problems
                .deserialize(value, path)
                .map(|c| SourceConfig::Serial(Box::new(c))),
            "modbus-rtu" => problems
                .deserialize(value, path)
                .map(SourceConfig::ModbusRtu),
            other => {
                problems.push(
                    format!("{path}.type"),
                    format!(
                        "unknown source type {other:?}; expected one of {}",
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
        match self {
            SourceConfig::Simulated(c) => c.validate(path, problems),
            SourceConfig::Ttn(c) => c.validate(path, problems),
            SourceConfig::Chirpstack(c) => c.validate(path, problems),
            SourceConfig::Mqtt(c) => c.validate(path, problems),
            SourceConfig::Serial(c) => c.validate(path, problems),
            SourceConfig::ModbusRtu(c) => c.validate(path, problems),
        }
    }

    /// Runs the source until `shutdown` is cancelled.
    pub async fn run(self, ctx: SourceContext) -> anyhow::Result<()> {
        match self {
            SourceConfig::Simulated(c) => simulated::run(c, ctx).await,
            SourceConfig::Ttn(c) => ttn::run(c, ctx).await,
            SourceConfig::Chirpstack(c) => chirpstack::run(c, ctx).await,
            SourceConfig::Mqtt(c) => mqtt::run(c, ctx).await,
            SourceConfig::Serial(c) => serial::run(*c, ctx).await,
            SourceConfig::ModbusRtu(c) => modbus::run(c, ctx).await,
        }
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
