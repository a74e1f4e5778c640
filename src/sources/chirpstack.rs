//! ChirpStack v4 over MQTT (`application/{application_id}/device/{dev_eui}/event/up`).
//!
//! QoS 1 with a persistent session (`clean_session = false`, a fixed client id): the
//! broker keeps what arrives while Outpost is away, and redelivers every message that
//! was not acknowledged. Outpost acknowledges a message only after the readings from it
//! committed (manual acks, G1); a redelivered message has the same
//! `deduplicationId`, hence the same uids, and is stored once (G2). Subscriptions are
//! renewed on every ConnAck.
//!
//! ChirpStack's MQTT integration must use JSON encoding (`json = true` in
//! `[integration.mqtt]` of chirpstack.toml). A Protobuf payload is recognised and
//! reported with that hint. As in The Things Stack, fields equal to `""`, `0` or
//! `false` are omitted from the JSON, so all of them have defaults here.

use super::mapping::{flatten_numeric, Mapping};
use super::mqtt::{
    self, check_max_payload, default_max_payload, BrokerConfig, Decode, Decoded, Rejection,
    Session, Subscription,
};
use super::{SourceContext, SourceKind};
use crate::model::{Meta, Reading, Uid};
use crate::settings::{check_identifier, ByteSize, Problems};
use chrono::{DateTime, Utc};
use rumqttc::QoS;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChirpStackConfig {
    /// A unique name for this source (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// The application's id (a UUID, shown in ChirpStack's web interface).
    pub application_id: String,
    /// The MQTT broker ChirpStack publishes to. Set a fixed `client_id` if several
    /// gateways share one broker account; the persistent session belongs to it.
    pub broker: BrokerConfig,
    /// The subscription; default `application/{application_id}/device/+/event/up`.
    /// Change it only if ChirpStack's `event_topic` template was changed.
    #[serde(default)]
    pub topic: Option<String>,
    /// Which id names the device in readings: `name` (deviceInfo.deviceName) or
    /// `dev_eui` (deviceInfo.devEui).
    #[serde(default)]
    pub device_id: DeviceIdFrom,
    /// Only these devices are stored; others are rejected as unknown. Empty: all.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Larger messages are rejected unread (and acknowledged, so they do not return).
    #[serde(default = "default_max_payload")]
    pub max_payload: ByteSize,
    /// `object` field → metric, unit, scale, offset (see `[sources.mapping]`).
    #[serde(default)]
    pub mapping: Mapping,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceIdFrom {
    #[default]
    Name,
    DevEui,
}

impl ChirpStackConfig {
    pub fn topic(&self) -> String {
        self.topic
            .clone()
            .unwrap_or_else(|| format!("application/{}/device/+/event/up", self.application_id))
    }
}

impl SourceKind for ChirpStackConfig {
    const TYPE: &'static str = "chirpstack";

    fn name(&self) -> &str {
        &self.name
    }

    fn tls_endpoints(&self) -> Vec<crate::tls::Endpoint> {
        vec![self.broker.tls_endpoint(&self.name)]
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        problems.check(
            format!("{path}.application_id"),
            mqtt::check_topic_level(&self.application_id, "the application id"),
        );
        if let Some(topic) = &self.topic {
            problems.check(format!("{path}.topic"), mqtt::check_topic_filter(topic));
        }
        self.broker.validate(&format!("{path}.broker"), problems);
        for (i, d) in self.devices.iter().enumerate() {
            problems.check(
                format!("{path}.devices[{i}]"),
                check_identifier(d, "the device id"),
            );
        }
        check_max_payload(self.max_payload, &format!("{path}.max_payload"), problems);
        self.mapping.validate(&format!("{path}.mapping"), problems);
    }

    fn run(self, ctx: SourceContext) -> impl Future<Output = anyhow::Result<()>> + Send {
        run(self, ctx)
    }
}

/// Why a ChirpStack message could not be decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("the payload has {size} bytes, more than max_payload ({max})")]
    TooLarge { size: usize, max: usize },
    #[error(
        "the payload is Protobuf, not JSON; set `json = true` in [integration.mqtt] of \
         chirpstack.toml (ChirpStack's MQTT integration) and restart ChirpStack"
    )]
    Protobuf,
    #[error("not valid JSON: {0}")]
    InvalidJson(String),
    #[error("a field has the wrong type: {0}")]
    WrongType(String),
    #[error("not an uplink event")]
    NotAnUplink,
    #[error("the event has no deduplicationId")]
    NoDeduplicationId,
    #[error("the event names no device")]
    NoDevice,
    #[error("{field} {value:?} is not an RFC 3339 time")]
    BadTime { field: &'static str, value: String },
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Protobuf => "protobuf",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::WrongType(_) => "wrong_type",
            DecodeError::NotAnUplink => "not_an_uplink",
            DecodeError::NoDeduplicationId => "no_deduplication_id",
            DecodeError::NoDevice => "no_device",
            DecodeError::BadTime { .. } => "bad_time",
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UplinkEvent {
    #[serde(default)]
    deduplication_id: String,
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    device_info: DeviceInfo,
    #[serde(default)]
    f_cnt: u32,
    #[serde(default)]
    f_port: u32,
    #[serde(default)]
    object: Option<Value>,
    #[serde(default)]
    rx_info: Vec<RxInfo>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DeviceInfo {
    #[serde(default)]
    device_name: String,
    #[serde(default)]
    dev_eui: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RxInfo {
    #[serde(default)]
    gateway_id: String,
    #[serde(default)]
    rssi: Option<f64>,
    #[serde(default)]
    snr: Option<f64>,
    #[serde(default)]
    ns_time: Option<String>,
}

/// What Outpost keeps of a ChirpStack uplink event.
#[derive(Debug, Clone, PartialEq)]
pub struct ChirpStackUplink {
    pub deduplication_id: String,
    /// `time`, else the first gateway's `nsTime`, else `None` (arrival time is used).
    pub time: Option<DateTime<Utc>>,
    pub device_name: String,
    pub dev_eui: String,
    pub tags: BTreeMap<String, String>,
    pub f_cnt: u32,
    pub f_port: u32,
    pub object: Option<Value>,
    /// The gateway with the best RSSI: (gateway id, RSSI, SNR).
    pub best_gateway: Option<(String, f64, f64)>,
}

/// Decodes an `event/up` message.
pub fn decode_chirpstack(
    topic: &str,
    payload: &[u8],
    max_payload: usize,
) -> Result<ChirpStackUplink, DecodeError> {
    if payload.len() > max_payload {
        return Err(DecodeError::TooLarge {
            size: payload.len(),
            max: max_payload,
        });
    }
    if !topic.ends_with("/up") {
        return Err(DecodeError::NotAnUplink);
    }
    if looks_like_protobuf(payload) {
        return Err(DecodeError::Protobuf);
    }
    let event: UplinkEvent = serde_json::from_slice(payload).map_err(|e| {
        if super::reasons::is_json_of_wrong_shape(&e, payload) {
            DecodeError::WrongType(e.to_string())
        } else {
            DecodeError::InvalidJson(e.to_string())
        }
    })?;
    if event.deduplication_id.is_empty() {
        return Err(DecodeError::NoDeduplicationId);
    }
    if event.device_info.device_name.is_empty() && event.device_info.dev_eui.is_empty() {
        return Err(DecodeError::NoDevice);
    }
    let time = match parse_time(event.time.as_deref(), "time")? {
        Some(t) => Some(t),
        None => parse_time(
            event.rx_info.first().and_then(|r| r.ns_time.as_deref()),
            "rxInfo.nsTime",
        )?,
    };
    let best_gateway = event
        .rx_info
        .iter()
        .map(|r| {
            (
                r.gateway_id.clone(),
                r.rssi.unwrap_or(0.0),
                r.snr.unwrap_or(0.0),
            )
        })
        .max_by(|a, b| a.1.total_cmp(&b.1).then(a.2.total_cmp(&b.2)));
    Ok(ChirpStackUplink {
        deduplication_id: event.deduplication_id,
        time,
        device_name: event.device_info.device_name,
        dev_eui: event.device_info.dev_eui,
        tags: event.device_info.tags,
        f_cnt: event.f_cnt,
        f_port: event.f_port,
        object: event.object,
        best_gateway,
    })
}

/// ChirpStack's Protobuf `UplinkEvent` starts with field 1 (`deduplication_id`, a
/// length-delimited string): tag byte 0x0a. JSON starts with `{` (after white space).
fn looks_like_protobuf(payload: &[u8]) -> bool {
    payload.first() == Some(&0x0a)
        && payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{')
}

fn parse_time(
    value: Option<&str>,
    field: &'static str,
) -> Result<Option<DateTime<Utc>>, DecodeError> {
    mqtt::parse_rfc3339(value).map_err(|value| DecodeError::BadTime { field, value })
}

/// Turns uplink events into readings for one configured source.
pub struct EventMapper {
    pub source: String,
    pub device_id: DeviceIdFrom,
    pub devices: Vec<String>,
    pub mapping: Arc<Mapping>,
}

impl EventMapper {
    pub fn readings(
        &self,
        up: &ChirpStackUplink,
        received_at: DateTime<Utc>,
    ) -> Result<Vec<Reading>, Rejection> {
        let device = match self.device_id {
            DeviceIdFrom::Name if !up.device_name.is_empty() => &up.device_name,
            DeviceIdFrom::DevEui if !up.dev_eui.is_empty() => &up.dev_eui,
            _ if up.device_name.is_empty() => &up.dev_eui,
            _ => &up.device_name,
        };
        if !self.devices.is_empty() && !self.devices.iter().any(|d| d == device) {
            return Err(Rejection {
                reason: "unknown_device",
                detail: format!(
                    "device {:?} is not in this source's `devices`",
                    device.chars().take(64).collect::<String>()
                ),
                record: true,
            });
        }
        let Some(object) = &up.object else {
            return Err(Rejection {
                reason: "no_object",
                detail: format!("device {device:?} sent an uplink without `object`; set up a codec in its device profile"),
                record: true,
            });
        };
        let mut meta = json!({ "f_port": up.f_port, "f_cnt": up.f_cnt, "dev_eui": up.dev_eui });
        if let Some((gateway, rssi, snr)) = &up.best_gateway {
            meta["rssi"] = json!(rssi);
            meta["snr"] = json!(snr);
            meta["gateway_id"] = json!(gateway);
        }
        if !up.tags.is_empty() {
            meta["tags"] = json!(up.tags);
        }
        let meta = Meta::new(meta);
        let observed_at = up.time.unwrap_or(received_at);
        Ok(flatten_numeric(object)
            .into_iter()
            .filter_map(|(key, raw)| {
                let m = self.mapping.map(device, &key, raw)?;
                m.value.is_finite().then(|| Reading {
                    uid: Uid::derive(&["chirpstack", &up.deduplication_id, &key]),
                    source: self.source.clone(),
                    device: device.clone(),
                    metric: m.metric,
                    value: m.value,
                    unit: m.unit,
                    observed_at,
                    received_at,
                    flags: 0,
                    meta: Some(meta.clone()),
                })
            })
            .collect())
    }
}

/// `pub(crate)` for [`crate::fuzzing`], which drives the decoder as the session does.
pub(crate) struct ChirpStackDecoder {
    pub(crate) mapper: EventMapper,
    pub(crate) max_payload: usize,
}

impl Decode for ChirpStackDecoder {
    fn decode(
        &mut self,
        topic: &str,
        payload: &[u8],
        received_at: DateTime<Utc>,
    ) -> Result<Decoded, Rejection> {
        let up = decode_chirpstack(topic, payload, self.max_payload).map_err(|e| Rejection {
            reason: e.reason(),
            record: e != DecodeError::NotAnUplink,
            detail: e.to_string(),
        })?;
        Ok(Decoded {
            readings: self.mapper.readings(&up, received_at)?,
            mark: up.time,
        })
    }
}

pub async fn run(config: ChirpStackConfig, ctx: SourceContext) -> anyhow::Result<()> {
    // Persistent session + manual acks: acknowledged only after the commit.
    let subscription = Subscription {
        topics: vec![config.topic()],
        qos: QoS::AtLeastOnce,
        credentials: None,
    };
    let session = Session::new(&config.name, &config.broker, subscription, &ctx)?;
    let decoder = ChirpStackDecoder {
        mapper: EventMapper {
            source: config.name.clone(),
            device_id: config.device_id,
            devices: config.devices.clone(),
            mapping: Arc::new(config.mapping.clone()),
        },
        max_payload: config.max_payload.0 as usize,
    };
    session.run(decoder, &ctx).await
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/chirpstack-up.json");
    const TOPIC: &str =
        "application/1f6a3c2e-9d4b-4e8a-b7c5-2a1d0e9f8b7c/device/a84041c2a1b2c3d4/event/up";

    fn mapper() -> EventMapper {
        EventMapper {
            source: "cs".into(),
            device_id: DeviceIdFrom::Name,
            devices: vec![],
            mapping: Arc::new(Mapping::default()),
        }
    }

    fn decode_value(v: &Value) -> Result<ChirpStackUplink, DecodeError> {
        decode_chirpstack(TOPIC, &serde_json::to_vec(v).unwrap(), 1 << 20)
    }

    #[test]
    fn the_fixture_decodes() {
        let up = decode_chirpstack(TOPIC, FIXTURE.as_bytes(), 1 << 20).unwrap();
        assert_eq!(up.deduplication_id, "7c1d2a9e-5b0f-4f3e-9a61-0d8e2b4c6f10");
        assert_eq!(
            up.time.unwrap().to_rfc3339(),
            "2026-11-26T03:14:07.705112+00:00"
        );
        assert_eq!((up.f_cnt, up.f_port), (1842, 2));
        assert_eq!(up.tags.get("room").map(String::as_str), Some("kitchen"));
        let readings = mapper().readings(&up, Utc::now()).unwrap();
        assert_eq!(
            readings.len(),
            4,
            "four numbers; the string is not a reading"
        );
        assert!(readings.iter().all(|r| r.device == "walkin-freezer-2"));
        let meta = readings[0].meta.as_ref().unwrap();
        assert_eq!(meta["dev_eui"], "a84041c2a1b2c3d4");
        assert_eq!(meta["rssi"], -97.0);
        assert_eq!(meta["tags"]["kind"], "freezer");
        let by_eui = EventMapper {
            device_id: DeviceIdFrom::DevEui,
            ..mapper()
        };
        assert!(by_eui
            .readings(&up, Utc::now())
            .unwrap()
            .iter()
            .all(|r| r.device == "a84041c2a1b2c3d4"));
        // The uid comes from the deduplication id: a redelivery gives the same uids.
        let again = mapper().readings(&up, Utc::now()).unwrap();
        assert_eq!(readings[0].uid, again[0].uid);
        assert_eq!(
            readings[0].uid,
            Uid::derive(&["chirpstack", &up.deduplication_id, &readings[0].metric])
        );
    }

    #[test]
    fn omitted_fields_and_fallbacks() {
        let minimal =
            json!({"deduplicationId": "x", "deviceInfo": {"devEui": "0102"}, "object": {"t": 1}});
        let up = decode_value(&minimal).unwrap();
        assert_eq!((up.f_cnt, up.f_port), (0, 0));
        assert!(up.time.is_none());
        let now = Utc::now();
        let r = mapper().readings(&up, now).unwrap();
        assert_eq!(r[0].device, "0102", "falls back to the DevEUI");
        assert_eq!(r[0].observed_at, now, "arrival time without `time`");
        let ns_only = json!({"deduplicationId": "x", "deviceInfo": {"deviceName": "d"},
                             "rxInfo": [{"nsTime": "2026-01-01T00:00:00Z"}]});
        assert_eq!(
            decode_value(&ns_only).unwrap().time.unwrap().to_rfc3339(),
            "2026-01-01T00:00:00+00:00"
        );
        assert_eq!(
            mapper()
                .readings(&decode_value(&ns_only).unwrap(), now)
                .unwrap_err()
                .reason,
            "no_object"
        );
    }

    #[test]
    fn bad_input_is_classified() {
        let topic = "application/a/device/0102030405060708/event/up";
        for (text, expected) in [
            ("23.5 C", "invalid_json"),
            ("temperature=4", "invalid_json"),
            ("[1]", "wrong_type"),
        ] {
            let e = decode_chirpstack(topic, text.as_bytes(), 1000).unwrap_err();
            assert_eq!(e.reason(), expected, "{text:?}");
        }
        assert_eq!(
            decode_value(&json!({"deviceInfo": {"deviceName": "d"}})).unwrap_err(),
            DecodeError::NoDeduplicationId
        );
        assert_eq!(
            decode_value(&json!({"deduplicationId": "x"})).unwrap_err(),
            DecodeError::NoDevice
        );
        assert!(matches!(
            decode_value(&json!({"deduplicationId": 5})).unwrap_err(),
            DecodeError::WrongType(_)
        ));
        assert!(matches!(
            decode_value(&json!({"deduplicationId": "x", "deviceInfo": {"deviceName": "d", "tags": {"a": 1}}})).unwrap_err(),
            DecodeError::WrongType(_)
        ));
        assert_eq!(
            decode_value(
                &json!({"deduplicationId": "x", "deviceInfo": {"deviceName": "d"}, "time": "noon"})
            )
            .unwrap_err()
            .reason(),
            "bad_time"
        );
        // A Protobuf UplinkEvent: field 1, length 36, a UUID.
        let mut pb = vec![0x0a, 36];
        pb.extend_from_slice(b"7c1d2a9e-5b0f-4f3e-9a61-0d8e2b4c6f10");
        pb.extend_from_slice(&[0x12, 0x05, 0x08, 0x01]);
        let e = decode_chirpstack(TOPIC, &pb, 1 << 20).unwrap_err();
        assert_eq!(e, DecodeError::Protobuf);
        assert!(
            e.to_string().contains("json = true"),
            "the hint names the setting"
        );
        // JSON after a newline is still JSON.
        assert!(decode_chirpstack(TOPIC, format!("\n{FIXTURE}").as_bytes(), 1 << 20).is_ok());
        for garbage in [&b"\xff\xfe\x00"[..], b"", b"{", b"\"x\"", b"[1]"] {
            let e = decode_chirpstack(TOPIC, garbage, 1 << 20).unwrap_err();
            assert!(
                matches!(e, DecodeError::InvalidJson(_) | DecodeError::WrongType(_)),
                "{garbage:?}: {e:?}"
            );
        }
        // serde reads an array as a struct: still rejected, for lack of an id.
        assert!(decode_chirpstack(TOPIC, b"[]", 1 << 20).is_err());
        let deep = "{\"object\":".repeat(50_000);
        assert!(matches!(
            decode_chirpstack(TOPIC, deep.as_bytes(), 1 << 20),
            Err(DecodeError::InvalidJson(_))
        ));
        assert!(matches!(
            decode_chirpstack(TOPIC, &[b' '; 100], 99),
            Err(DecodeError::TooLarge { size: 100, max: 99 })
        ));
        assert_eq!(
            decode_chirpstack("application/a/device/b/event/join", b"{}", 100),
            Err(DecodeError::NotAnUplink)
        );
    }

    #[test]
    fn unknown_devices_are_rejected() {
        let up = decode_chirpstack(TOPIC, FIXTURE.as_bytes(), 1 << 20).unwrap();
        let only = EventMapper {
            devices: vec!["other".into()],
            ..mapper()
        };
        assert_eq!(
            only.readings(&up, Utc::now()).unwrap_err().reason,
            "unknown_device"
        );
    }

    #[test]
    fn config_validation() {
        let c: ChirpStackConfig = serde_json::from_value(json!({
            "name": "cs", "application_id": "a/b", "topic": "application/#/x",
            "broker": {"host": "localhost", "tls": false, "client_id": ""},
            "devices": ["bad device"], "max_payload": 10
        }))
        .unwrap();
        let mut p = Problems::default();
        c.validate("sources[1]", &mut p);
        let keys: Vec<_> = p.0.iter().map(|(k, _)| k.as_str()).collect();
        for key in [
            "sources[1].application_id",
            "sources[1].topic",
            "sources[1].broker.client_id",
            "sources[1].devices[0]",
            "sources[1].max_payload",
        ] {
            assert!(keys.contains(&key), "{key} in {keys:?}");
        }
        assert!(serde_json::from_value::<ChirpStackConfig>(json!({
            "name": "cs", "application_id": "a", "broker": {"host": "h"}, "device_id": "serial"
        }))
        .is_err());
    }
}
