//! The Things Stack v3 ("TTN") over MQTT, with gap backfill from the Storage Integration.
//!
//! The Things Stack publishes at **QoS 0 only**: whatever is published while Outpost is
//! disconnected is gone from MQTT, and so is an uplink dropped while connected. Gaps are
//! filled from the Storage Integration ([`backfill`]) at start-up, after every
//! reconnect (and once more when the integration has settled), after a batch could not
//! be stored, and by a periodic reconciliation while connected.
//!
//! Message format facts a reader cannot guess:
//! - Fields whose value is `""`, `0` or `false` are **omitted** by the server, so every
//!   field here has a default (`f_cnt` 0 is a real counter value).
//! - There are two `received_at`: the top-level one is the Application Server's, the one
//!   in `uplink_message` the Network Server's. The uid and `observed_at` use the NS one,
//!   which is also what a backfill returns for the same uplink.
//! - `frequency` is a string; `decoded_payload` may hold strings, which are not readings.
//! - Join accepts, downlink events and location updates arrive on sibling topics
//!   (`…/join`, `…/down/…`, `…/location/solved`); only `…/up` is subscribed to, and
//!   anything else that arrives is ignored.
//!
//! Each reading's uid is derived from application, device, f_cnt, NS `received_at` and
//! the raw field (G2), so a live uplink and its backfilled copy are stored once.

pub mod backfill;

use super::mapping::{flatten_numeric, Mapping};
use super::mqtt::{
    self, check_max_payload, default_max_payload, BrokerConfig, Decode, Decoded, Rejection,
    Session, Subscription,
};
use super::{SourceContext, SourceKind};
use crate::model::{flags, Meta, Reading, Uid};
use crate::settings::{check_identifier, ByteSize, Problems, Secret};
use chrono::{DateTime, Utc};
use rumqttc::QoS;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TtnConfig {
    /// A unique name for this source (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// The application id in The Things Stack (Console → Applications).
    pub application: String,
    /// The tenant: `ttn` on The Things Network; your tenant id on The Things Industries
    /// Cloud; `""` for a single-tenant deployment (then the MQTT user is the bare
    /// application id).
    #[serde(default = "default_tenant")]
    pub tenant: String,
    /// An API key of the application with the rights "Read application traffic" (MQTT)
    /// and "Read Storage Integration data" (backfill). Prefer `api_key_file` or
    /// `${ENV}`.
    pub api_key: Secret,
    /// The MQTT server, e.g. `host = "eu1.cloud.thethings.network"` (TLS on 8883). The
    /// user name is `{application}@{tenant}` and the password the API key, so leave
    /// `username` and `password` out.
    pub broker: BrokerConfig,
    /// What to do with uplinks marked `simulated` (sent from the Console): `drop` them or
    /// `tag` them (stored with the SIMULATED flag).
    #[serde(default)]
    pub simulated: SimulatedUplinks,
    /// Only these device ids are stored; others are rejected as unknown devices. Empty:
    /// every device of the application.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Larger messages are rejected unread.
    #[serde(default = "default_max_payload")]
    pub max_payload: ByteSize,
    /// Gap filling from the Storage Integration.
    #[serde(default)]
    pub backfill: backfill::BackfillConfig,
    /// `decoded_payload` field → metric, unit, scale, offset (see `[sources.mapping]`).
    #[serde(default)]
    pub mapping: Mapping,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SimulatedUplinks {
    #[default]
    Drop,
    Tag,
}

fn default_tenant() -> String {
    "ttn".into()
}
impl TtnConfig {
    /// The Storage Integration as the TLS server the backfill connects to (its CA is
    /// the broker's `ca_file`, already watched under `sources.NAME.broker`).
    pub fn backfill_endpoint(&self) -> crate::tls::Endpoint {
        crate::tls::Endpoint::new(format!("sources.{}.backfill", self.name))
    }

    /// `{application}@{tenant}`, the MQTT user name and the topic's second level.
    pub fn app_user(&self) -> String {
        if self.tenant.is_empty() {
            self.application.clone()
        } else {
            format!("{}@{}", self.application, self.tenant)
        }
    }

    pub fn topic(&self) -> String {
        format!("v3/{}/devices/+/up", self.app_user())
    }
}

impl SourceKind for TtnConfig {
    const TYPE: &'static str = "ttn";

    fn name(&self) -> &str {
        &self.name
    }

    fn tls_endpoints(&self) -> Vec<crate::tls::Endpoint> {
        vec![
            self.broker.tls_endpoint(&self.name),
            self.backfill_endpoint(),
        ]
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        problems.check(
            format!("{path}.application"),
            mqtt::check_topic_level(&self.application, "the application id"),
        );
        if self.application.contains('@') {
            problems.push(
                format!("{path}.application"),
                "write the tenant in `tenant`, not after '@'",
            );
        }
        if !self.tenant.is_empty() {
            problems.check(
                format!("{path}.tenant"),
                mqtt::check_topic_level(&self.tenant, "the tenant"),
            );
        }
        if self.api_key.expose().trim().is_empty() {
            problems.push(format!("{path}.api_key"), "must not be empty");
        } else if self.api_key.expose().chars().any(char::is_whitespace) {
            problems.push(
                format!("{path}.api_key"),
                "contains white space (a stray newline in api_key_file?)",
            );
        }
        let broker = format!("{path}.broker");
        self.broker.validate(&broker, problems);
        if self.broker.username.is_some() {
            problems.push(
                format!("{broker}.username"),
                "is {application}@{tenant}; leave it out",
            );
        }
        if self.broker.password.is_some() {
            problems.push(format!("{broker}.password"), "is the api_key; leave it out");
        }
        for (i, d) in self.devices.iter().enumerate() {
            problems.check(
                format!("{path}.devices[{i}]"),
                check_identifier(d, "the device id"),
            );
        }
        check_max_payload(self.max_payload, &format!("{path}.max_payload"), problems);
        self.backfill
            .validate(&format!("{path}.backfill"), problems);
        self.mapping.validate(&format!("{path}.mapping"), problems);
    }

    fn run(self, ctx: SourceContext) -> impl Future<Output = anyhow::Result<()>> + Send {
        run(self, ctx)
    }
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("the payload has {size} bytes, more than max_payload ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("not valid JSON: {0}")]
    InvalidJson(String),
    #[error("a field has the wrong type: {0}")]
    WrongType(String),
    #[error("the message has no uplink_message")]
    NotAnUplink,
    #[error("the uplink names no device")]
    NoDevice,
    #[error("{field} {value:?} is not an RFC 3339 time")]
    BadTime { field: &'static str, value: String },
    #[error("the uplink has no received_at")]
    NoTime,
}

impl DecodeError {
    /// The label counted and kept in the `rejected` table.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::WrongType(_) => "wrong_type",
            DecodeError::NotAnUplink => "not_an_uplink",
            DecodeError::NoDevice => "no_device",
            DecodeError::BadTime { .. } | DecodeError::NoTime => "bad_time",
        }
    }

    /// Classifies a parse error of `payload`: a payload that is JSON but not the
    /// expected shape is `wrong_type`; anything else (plain text such as `23.5 C`,
    /// which serde_json starts reading as a number) is `invalid_json`.
    pub(super) fn from_json(e: serde_json::Error, payload: &[u8]) -> DecodeError {
        if super::reasons::is_json_of_wrong_shape(&e, payload) {
            DecodeError::WrongType(e.to_string())
        } else {
            DecodeError::InvalidJson(e.to_string())
        }
    }
}

/// The Things Stack's `ApplicationUp`, as far as Outpost reads it. Every field is
/// optional because the server omits zero values.
///
/// Strings are borrowed from the message where it has no escapes (decoding allocates
/// only what the readings keep); the parts Outpost does not read are skipped unparsed.
#[derive(Debug, Deserialize, Default)]
pub(super) struct ApplicationUp<'a> {
    #[serde(default, borrow)]
    end_device_ids: EndDeviceIds<'a>,
    #[serde(default, borrow)]
    received_at: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    uplink_message: Option<UplinkMessage<'a>>,
    #[serde(default)]
    simulated: bool,
}

#[derive(Debug, Deserialize, Default)]
struct EndDeviceIds<'a> {
    #[serde(default, borrow)]
    device_id: Cow<'a, str>,
    #[serde(default, borrow)]
    dev_eui: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize, Default)]
struct UplinkMessage<'a> {
    #[serde(default)]
    f_port: u32,
    #[serde(default)]
    f_cnt: u32,
    #[serde(default)]
    decoded_payload: Option<Value>,
    #[serde(default, borrow)]
    rx_metadata: Vec<RxMetadata<'a>>,
    #[serde(default, borrow)]
    received_at: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize, Default)]
struct RxMetadata<'a> {
    #[serde(default, borrow)]
    gateway_ids: GatewayIds<'a>,
    #[serde(default)]
    rssi: Option<f64>,
    #[serde(default)]
    channel_rssi: Option<f64>,
    #[serde(default)]
    snr: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
struct GatewayIds<'a> {
    #[serde(default, borrow)]
    gateway_id: Cow<'a, str>,
}

/// A decoded uplink: what Outpost keeps of an `ApplicationUp`.
#[derive(Debug, Clone, PartialEq)]
pub struct Uplink {
    pub device_id: String,
    pub dev_eui: Option<String>,
    pub f_port: u32,
    pub f_cnt: u32,
    /// The Network Server's `received_at` (falls back to the Application Server's).
    pub ns_received_at: DateTime<Utc>,
    /// The Application Server's `received_at`, which orders Storage Integration results.
    pub as_received_at: Option<DateTime<Utc>>,
    pub simulated: bool,
    pub decoded_payload: Option<Value>,
    /// The gateway with the best RSSI: (gateway id, RSSI, SNR).
    pub best_gateway: Option<(String, f64, f64)>,
}

/// Decodes an uplink published on `topic`. Other message types (join, downlink,
/// location) are reported as [`DecodeError::NotAnUplink`].
pub fn decode_ttn(topic: &str, payload: &[u8], max_payload: usize) -> Result<Uplink, DecodeError> {
    if payload.len() > max_payload {
        return Err(DecodeError::TooLarge {
            size: payload.len(),
            max: max_payload,
        });
    }
    if !topic.ends_with("/up") {
        return Err(DecodeError::NotAnUplink);
    }
    let up: ApplicationUp =
        serde_json::from_slice(payload).map_err(|e| DecodeError::from_json(e, payload))?;
    let topic_device = topic.rsplit('/').nth(1).unwrap_or_default();
    Uplink::from_message(up, topic_device)
}

impl Uplink {
    pub(super) fn from_message(
        up: ApplicationUp<'_>,
        fallback_device: &str,
    ) -> Result<Uplink, DecodeError> {
        let message = up.uplink_message.ok_or(DecodeError::NotAnUplink)?;
        let device_id = if up.end_device_ids.device_id.is_empty() {
            fallback_device.to_string()
        } else {
            up.end_device_ids.device_id.into_owned()
        };
        if device_id.is_empty() {
            return Err(DecodeError::NoDevice);
        }
        let as_received_at = parse_time(up.received_at.as_deref(), "received_at")?;
        let ns_received_at =
            parse_time(message.received_at.as_deref(), "uplink_message.received_at")?
                .or(as_received_at)
                .ok_or(DecodeError::NoTime)?;
        // An omitted rssi is 0 by the omission rule.
        let best_gateway = message
            .rx_metadata
            .iter()
            .map(|m| {
                let rssi = m.rssi.or(m.channel_rssi).unwrap_or(0.0);
                (&m.gateway_ids.gateway_id, rssi, m.snr.unwrap_or(0.0))
            })
            .max_by(|a, b| a.1.total_cmp(&b.1).then(a.2.total_cmp(&b.2)))
            .map(|(gateway, rssi, snr)| (gateway.to_string(), rssi, snr));
        Ok(Uplink {
            device_id,
            dev_eui: up
                .end_device_ids
                .dev_eui
                .filter(|s| !s.is_empty())
                .map(Cow::into_owned),
            f_port: message.f_port,
            f_cnt: message.f_cnt,
            ns_received_at,
            as_received_at,
            simulated: up.simulated,
            decoded_payload: message.decoded_payload,
            best_gateway,
        })
    }

    /// Context kept with each reading: f_port, f_cnt, the DevEUI and the best
    /// gateway's id, RSSI and SNR, in the order a JSON object of them is written.
    pub fn meta(&self) -> Meta {
        #[derive(Serialize)]
        struct UplinkMeta<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            dev_eui: Option<&'a str>,
            f_cnt: u32,
            f_port: u32,
            #[serde(skip_serializing_if = "Option::is_none")]
            gateway_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            rssi: Option<f64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            snr: Option<f64>,
        }
        let gateway = self.best_gateway.as_ref();
        Meta::serialized(&UplinkMeta {
            dev_eui: self.dev_eui.as_deref(),
            f_cnt: self.f_cnt,
            f_port: self.f_port,
            gateway_id: gateway
                .map(|(id, _, _)| id.as_str())
                .filter(|id| !id.is_empty()),
            rssi: gateway.map(|g| g.1),
            snr: gateway.map(|g| g.2),
        })
    }
}

fn parse_time(
    value: Option<&str>,
    field: &'static str,
) -> Result<Option<DateTime<Utc>>, DecodeError> {
    mqtt::parse_rfc3339(value).map_err(|value| DecodeError::BadTime { field, value })
}

/// Turns uplinks into readings for one configured source.
#[derive(Clone)]
pub struct UplinkMapper {
    pub source: String,
    pub application: String,
    pub simulated: SimulatedUplinks,
    pub devices: Vec<String>,
    pub mapping: Arc<Mapping>,
}

impl UplinkMapper {
    pub fn new(config: &TtnConfig) -> UplinkMapper {
        UplinkMapper {
            source: config.name.clone(),
            application: config.application.clone(),
            simulated: config.simulated,
            devices: config.devices.clone(),
            mapping: Arc::new(config.mapping.clone()),
        }
    }

    /// The readings of one uplink, or why it gives none.
    pub fn readings(
        &self,
        uplink: &Uplink,
        received_at: DateTime<Utc>,
        extra_flags: u32,
    ) -> Result<Vec<Reading>, Rejection> {
        let mut flags = extra_flags;
        if uplink.simulated {
            match self.simulated {
                SimulatedUplinks::Drop => {
                    return Err(Rejection {
                        reason: "simulated",
                        detail: "a simulated uplink (dropped as configured)".into(),
                        record: false,
                    })
                }
                SimulatedUplinks::Tag => flags |= flags::SIMULATED,
            }
        }
        if !self.devices.is_empty() && !self.devices.contains(&uplink.device_id) {
            return Err(Rejection {
                reason: "unknown_device",
                detail: format!(
                    "device {:?} is not in this source's `devices`",
                    truncate(&uplink.device_id)
                ),
                record: true,
            });
        }
        let Some(decoded) = &uplink.decoded_payload else {
            return Err(Rejection {
                reason: "no_decoded_payload",
                detail: format!(
                    "device {:?} sent an uplink without decoded_payload; set up a payload formatter in The Things Stack",
                    truncate(&uplink.device_id)
                ),
                record: true,
            });
        };
        let f_cnt = uplink.f_cnt.to_string();
        let ns = uplink
            .ns_received_at
            .timestamp_nanos_opt()
            .unwrap_or_else(|| {
                uplink
                    .ns_received_at
                    .timestamp_micros()
                    .saturating_mul(1000)
            })
            .to_string();
        let meta = uplink.meta();
        // The parts every reading of this uplink shares are hashed once.
        let prefix = Uid::prefix(&["ttn", &self.application, &uplink.device_id, &f_cnt, &ns]);
        let readings = flatten_numeric(decoded)
            .into_iter()
            .filter_map(|(key, raw)| {
                let mapped = self.mapping.map(&uplink.device_id, &key, raw)?;
                mapped.value.is_finite().then(|| Reading {
                    uid: prefix.derive(&key),
                    source: self.source.clone(),
                    device: uplink.device_id.clone(),
                    metric: mapped.metric,
                    value: mapped.value,
                    unit: mapped.unit,
                    observed_at: uplink.ns_received_at,
                    received_at,
                    flags,
                    meta: Some(meta.clone()),
                })
            })
            .collect();
        Ok(readings)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `pub(crate)` for [`crate::fuzzing`], which drives the decoder as the session does.
pub(crate) struct TtnDecoder {
    pub(crate) mapper: UplinkMapper,
    pub(crate) max_payload: usize,
}

impl Decode for TtnDecoder {
    fn decode(
        &mut self,
        topic: &str,
        payload: &[u8],
        received_at: DateTime<Utc>,
    ) -> Result<Decoded, Rejection> {
        let uplink = decode_ttn(topic, payload, self.max_payload).map_err(|e| Rejection {
            reason: e.reason(),
            record: e != DecodeError::NotAnUplink || topic.ends_with("/up"),
            detail: e.to_string(),
        })?;
        let readings = self.mapper.readings(&uplink, received_at, 0)?;
        Ok(Decoded {
            readings,
            mark: Some(uplink.ns_received_at),
        })
    }
}

/// Runs the source: the MQTT session and the backfill task.
pub async fn run(config: TtnConfig, ctx: SourceContext) -> anyhow::Result<()> {
    // QoS 0 only, so there is no session worth keeping.
    let subscription = Subscription {
        topics: vec![config.topic()],
        qos: QoS::AtMostOnce,
        credentials: Some((config.app_user(), config.api_key.expose().to_string())),
    };
    let mut session = Session::new(&config.name, &config.broker, subscription, &ctx)?;
    let (connected_tx, connected_rx) = watch::channel((0u64, None));
    let (mark_tx, mark_rx) = watch::channel(None);
    let (gap_tx, gap_rx) = mpsc::channel(64);
    session.connected = Some(connected_tx);
    session.committed_mark = Some(mark_tx);
    session.gaps = Some(gap_tx);
    let mapper = UplinkMapper::new(&config);
    let backfill = if config.backfill.enabled {
        let task = backfill::Backfill::new(&config, mapper.clone(), ctx.clone())?;
        Some(tokio::spawn(task.run(connected_rx, mark_rx, gap_rx)))
    } else {
        None
    };
    let decoder = TtnDecoder {
        mapper,
        max_payload: config.max_payload.0 as usize,
    };
    let result = session.run(decoder, &ctx).await;
    if let Some(task) = backfill {
        let _ = task.await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIXTURE: &str = include_str!("../../../tests/fixtures/ttn-uplink.json");
    const TOPIC: &str = "v3/bistro-cold-chain@ttn/devices/walkin-freezer-2/up";

    fn mapper() -> UplinkMapper {
        UplinkMapper {
            source: "ttn".into(),
            application: "bistro-cold-chain".into(),
            simulated: SimulatedUplinks::Drop,
            devices: vec![],
            mapping: Arc::new(Mapping::default()),
        }
    }

    fn fixture() -> Value {
        serde_json::from_str(FIXTURE).unwrap()
    }

    fn decode_value(v: &Value) -> Result<Uplink, DecodeError> {
        decode_ttn(TOPIC, &serde_json::to_vec(v).unwrap(), 64 << 10)
    }

    #[test]
    fn the_fixture_decodes() {
        let up = decode_ttn(TOPIC, FIXTURE.as_bytes(), 64 << 10).unwrap();
        assert_eq!(up.device_id, "walkin-freezer-2");
        assert_eq!(up.dev_eui.as_deref(), Some("A84041C2A1B2C3D4"));
        assert_eq!((up.f_port, up.f_cnt), (2, 1842));
        // The NS time, not the AS time.
        assert_eq!(
            up.ns_received_at.to_rfc3339(),
            "2026-11-26T03:14:07.705112233+00:00"
        );
        assert_eq!(
            up.as_received_at.unwrap().to_rfc3339(),
            "2026-11-26T03:14:07.912345678+00:00"
        );
        let (gw, rssi, snr) = up.best_gateway.clone().unwrap();
        assert_eq!((gw.as_str(), rssi, snr), ("bistro-gw-01", -97.0, 6.25));
        let now = Utc::now();
        let readings = mapper().readings(&up, now, 0).unwrap();
        let mut metrics: Vec<_> = readings
            .iter()
            .map(|r| (r.metric.as_str(), r.value))
            .collect();
        metrics.sort_by(|a, b| a.0.cmp(b.0));
        assert_eq!(
            metrics,
            vec![
                ("BatV", 3.046),
                ("Bat_status", 3.0),
                ("Hum_SHT", 44.2),
                ("TempC_DS", -18.42),
                ("TempC_SHT", -17.9)
            ],
            "the string Ext_sensor is not a reading"
        );
        let r = &readings[0];
        assert_eq!(r.observed_at, up.ns_received_at);
        assert_eq!(r.received_at, now);
        let meta = r.meta.as_ref().unwrap();
        assert_eq!(meta["f_cnt"], 1842);
        assert_eq!(meta["f_port"], 2);
        assert_eq!(meta["rssi"], -97.0);
        assert_eq!(meta["snr"], 6.25);
        assert_eq!(meta["dev_eui"], "A84041C2A1B2C3D4");
        assert_eq!(
            meta.text(),
            r#"{"dev_eui":"A84041C2A1B2C3D4","f_cnt":1842,"f_port":2,"gateway_id":"bistro-gw-01","rssi":-97.0,"snr":6.25}"#,
            "the text a JSON object of the fields gives (stored, and synced to central)"
        );
        // Uids are stable and distinct per field.
        let again = mapper().readings(&up, Utc::now(), 0).unwrap();
        assert_eq!(
            readings.iter().map(|r| r.uid).collect::<Vec<_>>(),
            again.iter().map(|r| r.uid).collect::<Vec<_>>()
        );
        let uids: std::collections::BTreeSet<_> = readings.iter().map(|r| r.uid).collect();
        assert_eq!(uids.len(), readings.len());
    }

    #[test]
    fn omitted_fields_take_their_zero_values() {
        let mut v = fixture();
        let m = v["uplink_message"].as_object_mut().unwrap();
        m.remove("f_cnt");
        m.remove("f_port");
        for md in m["rx_metadata"].as_array_mut().unwrap() {
            md.as_object_mut().unwrap().remove("snr");
        }
        v["end_device_ids"]
            .as_object_mut()
            .unwrap()
            .remove("dev_eui");
        let up = decode_value(&v).unwrap();
        assert_eq!((up.f_cnt, up.f_port), (0, 0));
        assert_eq!(up.best_gateway.as_ref().unwrap().2, 0.0);
        assert!(up.dev_eui.is_none());
        assert!(!mapper().readings(&up, Utc::now(), 0).unwrap().is_empty());

        // A minimal uplink: almost everything omitted.
        let minimal = json!({
            "end_device_ids": {"device_id": "d1"},
            "uplink_message": {"decoded_payload": {"t": 1.5}, "received_at": "2026-01-01T00:00:00Z"}
        });
        let up = decode_value(&minimal).unwrap();
        assert!(up.best_gateway.is_none());
        let readings = mapper().readings(&up, Utc::now(), 0).unwrap();
        assert_eq!(readings.len(), 1);
        assert_eq!(readings[0].meta.as_ref().unwrap()["f_cnt"], 0);
        assert_eq!(
            readings[0].meta.as_ref().unwrap().text(),
            r#"{"f_cnt":0,"f_port":0}"#
        );
        // A gateway without an id keeps its RSSI and SNR.
        let mut no_id = fixture();
        no_id["uplink_message"]["rx_metadata"] =
            json!([{"gateway_ids": {"gateway_id": ""}, "rssi": -40, "snr": 2.5}]);
        assert_eq!(
            decode_value(&no_id).unwrap().meta().text(),
            r#"{"dev_eui":"A84041C2A1B2C3D4","f_cnt":1842,"f_port":2,"rssi":-40.0,"snr":2.5}"#
        );

        // Without the NS time the AS time is used.
        let as_only = json!({"received_at": "2026-01-01T00:00:01Z", "end_device_ids": {"device_id": "d1"},
                             "uplink_message": {"decoded_payload": {"t": 1}}});
        assert_eq!(
            decode_value(&as_only).unwrap().ns_received_at.to_rfc3339(),
            "2026-01-01T00:00:01+00:00"
        );
        // The device id falls back to the topic.
        let no_device = json!({"uplink_message": {"received_at": "2026-01-01T00:00:01Z"}});
        assert_eq!(
            decode_value(&no_device).unwrap().device_id,
            "walkin-freezer-2"
        );
        assert_eq!(
            decode_ttn(
                "v3/a@ttn/devices//up",
                br#"{"uplink_message":{"received_at":"2026-01-01T00:00:01Z"}}"#,
                1000
            ),
            Err(DecodeError::NoDevice)
        );
    }

    #[test]
    fn simulated_uplinks_are_dropped_or_tagged() {
        let mut v = fixture();
        v["simulated"] = json!(true);
        let up = decode_value(&v).unwrap();
        let err = mapper().readings(&up, Utc::now(), 0).unwrap_err();
        assert_eq!((err.reason, err.record), ("simulated", false));
        let tagging = UplinkMapper {
            simulated: SimulatedUplinks::Tag,
            ..mapper()
        };
        let readings = tagging.readings(&up, Utc::now(), 0).unwrap();
        assert!(readings.iter().all(|r| r.flags & flags::SIMULATED != 0));
    }

    #[test]
    fn other_message_types_and_bad_input_are_rejected() {
        let join = json!({"end_device_ids": {"device_id": "d"}, "join_accept": {"received_at": "2026-01-01T00:00:00Z"}});
        let bytes = serde_json::to_vec(&join).unwrap();
        assert_eq!(
            decode_ttn("v3/a@ttn/devices/d/join", &bytes, 1000),
            Err(DecodeError::NotAnUplink)
        );
        assert_eq!(
            decode_ttn("v3/a@ttn/devices/d/up", &bytes, 1000),
            Err(DecodeError::NotAnUplink)
        );
        assert_eq!(
            decode_ttn("v3/a@ttn/devices/d/down/queued", b"{}", 1000),
            Err(DecodeError::NotAnUplink)
        );

        // Garbage bytes, truncated JSON, wrong types.
        for garbage in [
            &b"\xff\xfe\x00garbage"[..],
            b"",
            b"{\"uplink_message\": {",
            b"null",
            b"[1,2]",
            b"42",
        ] {
            let e = decode_ttn(TOPIC, garbage, 1000).unwrap_err();
            assert!(
                matches!(e, DecodeError::InvalidJson(_) | DecodeError::WrongType(_)),
                "{garbage:?}: {e:?}"
            );
        }
        let mut v = fixture();
        v["uplink_message"]["f_cnt"] = json!("1842");
        assert!(matches!(decode_value(&v), Err(DecodeError::WrongType(_))));
        let mut v = fixture();
        v["uplink_message"]["f_cnt"] = json!(-1);
        assert!(matches!(decode_value(&v), Err(DecodeError::WrongType(_))));
        let mut v = fixture();
        v["uplink_message"]["received_at"] = json!("yesterday");
        assert_eq!(decode_value(&v).unwrap_err().reason(), "bad_time");
        let mut v = fixture();
        v["uplink_message"]["rx_metadata"] = json!("none");
        assert!(matches!(decode_value(&v), Err(DecodeError::WrongType(_))));

        // Plain text is not JSON, even when it starts like a number; JSON of another
        // shape is a wrong type.
        for text in ["23.5 C", "12", "hello", "OK\n"] {
            let reason = decode_ttn(TOPIC, text.as_bytes(), 1000)
                .unwrap_err()
                .reason();
            let expected = if text == "12" {
                "wrong_type"
            } else {
                "invalid_json"
            };
            assert_eq!(reason, expected, "{text:?}");
        }

        // Oversized payloads are refused before parsing.
        let big = vec![b' '; 2000];
        assert!(matches!(
            decode_ttn(TOPIC, &big, 1000),
            Err(DecodeError::TooLarge {
                size: 2000,
                max: 1000
            })
        ));

        // Hostile nesting: serde_json's recursion limit, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            decode_ttn(TOPIC, deep.as_bytes(), 1 << 20),
            Err(DecodeError::InvalidJson(_) | DecodeError::WrongType(_))
        ));
        let deep_objects = "{\"a\":".repeat(100_000);
        assert!(matches!(
            decode_ttn(TOPIC, deep_objects.as_bytes(), 1 << 20),
            Err(DecodeError::InvalidJson(_))
        ));
        let deep_payload = format!(
            r#"{{"uplink_message":{{"received_at":"2026-01-01T00:00:00Z","decoded_payload":{}1{}}}}}"#,
            r#"{"a":"#.repeat(100),
            "}".repeat(100)
        );
        let up = decode_ttn(TOPIC, deep_payload.as_bytes(), 1 << 20).unwrap();
        assert!(
            mapper().readings(&up, Utc::now(), 0).unwrap().is_empty(),
            "too deep to flatten"
        );

        // Numbers out of range are invalid JSON, not infinities.
        let mut text = FIXTURE.replace("3.046", "1e999");
        assert!(decode_ttn(TOPIC, text.as_bytes(), 1 << 20).is_err());
        text = FIXTURE.replace("\"BatV\": 3.046", "\"BatV\": null");
        let up = decode_ttn(TOPIC, text.as_bytes(), 1 << 20).unwrap();
        assert!(mapper()
            .readings(&up, Utc::now(), 0)
            .unwrap()
            .iter()
            .all(|r| r.metric != "BatV"));
    }

    #[test]
    fn unknown_devices_and_missing_payloads_are_rejected() {
        let up = decode_ttn(TOPIC, FIXTURE.as_bytes(), 1 << 20).unwrap();
        let only = UplinkMapper {
            devices: vec!["other".into()],
            ..mapper()
        };
        assert_eq!(
            only.readings(&up, Utc::now(), 0).unwrap_err().reason,
            "unknown_device"
        );
        let mut v = fixture();
        v["uplink_message"]
            .as_object_mut()
            .unwrap()
            .remove("decoded_payload");
        let up = decode_value(&v).unwrap();
        assert_eq!(
            mapper().readings(&up, Utc::now(), 0).unwrap_err().reason,
            "no_decoded_payload"
        );
    }

    #[test]
    fn mapping_applies_to_decoded_payload() {
        let m: Mapping = serde_json::from_value(json!({
            "unmapped": "drop",
            "fields": {"TempC_SHT": {"metric": "temperature", "unit": "°C"}},
            "devices": {"walkin-freezer-2": {"fields": {"BatV": {"metric": "battery_mv", "scale": 1000.0}}}}
        }))
        .unwrap();
        let mapper = UplinkMapper {
            mapping: Arc::new(m),
            ..mapper()
        };
        let up = decode_ttn(TOPIC, FIXTURE.as_bytes(), 1 << 20).unwrap();
        let mut got: Vec<_> = mapper
            .readings(&up, Utc::now(), 0)
            .unwrap()
            .into_iter()
            .map(|r| (r.metric, r.unit, r.value))
            .collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got,
            vec![
                ("battery_mv".into(), None, 3046.0),
                ("temperature".into(), Some("°C".into()), -17.9)
            ]
        );
    }

    #[test]
    fn config_validation_reports_every_problem() {
        let config = serde_json::from_value::<TtnConfig>(json!({
            "name": "ttn",
            "application": "bad app/+",
            "tenant": "t#",
            "api_key": "NNSXS.abc\n",
            "broker": {"host": "eu1.cloud.thethings.network", "username": "x", "password": "y"},
            "devices": ["ok", "not ok"],
            "max_payload": "10MiB0",
        }));
        assert!(config.is_err(), "a bad size is a type error");
        let config: TtnConfig = serde_json::from_value(json!({
            "name": "ttn",
            "application": "bad app/+",
            "tenant": "t#",
            "api_key": "NNSXS.abc\n",
            "broker": {"host": "eu1.cloud.thethings.network", "username": "x", "password": "y"},
            "devices": ["ok", "not ok"],
            "max_payload": "1GiB",
            "backfill": {"overlap": "0s", "page_limit": 0}
        }))
        .unwrap();
        let mut problems = Problems::default();
        config.validate("sources[0]", &mut problems);
        let text: Vec<String> = problems
            .0
            .iter()
            .map(|(k, m)| format!("{k}: {m}"))
            .collect();
        for key in [
            "sources[0].application",
            "sources[0].tenant",
            "sources[0].api_key",
            "sources[0].broker.username",
            "sources[0].broker.password",
            "sources[0].devices[1]",
            "sources[0].max_payload",
            "sources[0].backfill.page_limit",
        ] {
            assert!(
                text.iter().any(|t| t.starts_with(key)),
                "{key} in {text:#?}"
            );
        }
        let unknown = serde_json::from_value::<TtnConfig>(json!({
            "name": "t", "application": "a", "api_key": "k", "broker": {"host": "h"}, "colour": "red"
        }));
        assert!(unknown.is_err(), "unknown keys are errors");
    }
}
