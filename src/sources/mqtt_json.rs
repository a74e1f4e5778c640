//! Generic MQTT JSON (`type = "mqtt"`): sensors that already publish JSON to a broker,
//! usually one on the gateway itself.
//!
//! The device id comes from a topic level (`device_segment`, counted from 0) or a JSON
//! pointer (`device_pointer`); metrics from JSON pointers (`metrics`) or, if none are
//! given, from every numeric or boolean leaf (nested keys joined with dots; a bare
//! number is named after the last topic level, or `value` if it is empty); the time
//! from a JSON pointer (`timestamp_pointer`) or the arrival time. Every metric then
//! goes through the source's field mapping.
//!
//! With `qos = 1` the session is persistent and messages are acknowledged after their
//! commit, like ChirpStack. The uid is derived from source, device, field and time, so
//! a redelivered message with a timestamp in its payload is stored once; without one,
//! the arrival time is all there is and a redelivery after a crash is stored again.

use super::mapping::{flatten_numeric, Mapping};
use super::mqtt::{
    self, check_max_payload, default_max_payload, BrokerConfig, Decode, Decoded, Rejection,
    Session, Subscription,
};
use super::{SourceContext, SourceKind};
use crate::model::{Reading, Uid};
use crate::settings::{ByteSize, Problems};
use chrono::{DateTime, Utc};
use rumqttc::QoS;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttJsonConfig {
    /// A unique name for this source (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// The broker (often `host = "127.0.0.1"`, `tls = false`).
    pub broker: BrokerConfig,
    /// Topic filters to subscribe to (`+` one level, `#` the rest).
    pub topics: Vec<String>,
    /// 0: at most once. 1: at least once, with a persistent session and acknowledgement
    /// after the commit (set a fixed broker.client_id).
    #[serde(default)]
    pub qos: u8,
    /// The device id is this topic level, counted from 0 (`sensors/kitchen/data` → 1 is
    /// `kitchen`). Set this or `device_pointer`.
    #[serde(default)]
    pub device_segment: Option<usize>,
    /// The device id is the string or number at this JSON pointer, e.g. `/device/id`.
    #[serde(default)]
    pub device_pointer: Option<String>,
    /// Field name → JSON pointer, e.g. `temperature = "/env/t"`. The field name then
    /// goes through `mapping`. Empty: every numeric leaf of the payload.
    #[serde(default)]
    pub metrics: BTreeMap<String, String>,
    /// JSON pointer of the measurement time; absent: the arrival time.
    #[serde(default)]
    pub timestamp_pointer: Option<String>,
    /// How the time is written: `auto` (RFC 3339 text, or Unix seconds / milliseconds by
    /// size), `rfc3339`, `unix_s` or `unix_ms`.
    #[serde(default)]
    pub timestamp_format: TimestampFormat,
    /// Larger messages are rejected unread.
    #[serde(default = "default_max_payload")]
    pub max_payload: ByteSize,
    /// Field → metric, unit, scale, offset (see `[sources.mapping]`).
    #[serde(default)]
    pub mapping: Mapping,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    #[default]
    Auto,
    Rfc3339,
    UnixS,
    UnixMs,
}

fn check_pointer(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!(
            "{p:?} is not a JSON pointer; it starts with '/', e.g. \"/sensor/temperature\""
        ));
    }
    Ok(())
}

impl SourceKind for MqttJsonConfig {
    const TYPE: &'static str = "mqtt";

    fn name(&self) -> &str {
        &self.name
    }

    fn tls_endpoints(&self) -> Vec<crate::tls::Endpoint> {
        vec![self.broker.tls_endpoint(&self.name)]
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        self.broker.validate(&format!("{path}.broker"), problems);
        if self.topics.is_empty() {
            problems.push(format!("{path}.topics"), "list at least one topic filter");
        }
        for (i, t) in self.topics.iter().enumerate() {
            problems.check(format!("{path}.topics[{i}]"), mqtt::check_topic_filter(t));
        }
        if self.qos > 1 {
            problems.push(
                format!("{path}.qos"),
                format!("must be 0 or 1, found {}", self.qos),
            );
        }
        match (&self.device_segment, &self.device_pointer) {
            (None, None) => problems.push(
                format!("{path}.device_segment"),
                "set device_segment (a topic level) or device_pointer (a JSON pointer) to name the device",
            ),
            (Some(_), Some(_)) => problems.push(format!("{path}.device_pointer"), "set only one of device_segment and device_pointer"),
            (Some(segment), None) => {
                if *segment > 64 {
                    problems.push(format!("{path}.device_segment"), "must be at most 64");
                }
            }
            (None, Some(p)) => problems.check(format!("{path}.device_pointer"), check_pointer(p)),
        }
        for (name, pointer) in &self.metrics {
            if name.is_empty() {
                problems.push(format!("{path}.metrics"), "a field name must not be empty");
            }
            problems.check(format!("{path}.metrics.{name}"), check_pointer(pointer));
        }
        if let Some(p) = &self.timestamp_pointer {
            problems.check(format!("{path}.timestamp_pointer"), check_pointer(p));
        }
        check_max_payload(self.max_payload, &format!("{path}.max_payload"), problems);
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
    #[error("no device id: {0}")]
    NoDevice(String),
    #[error("the time at {pointer} is missing or not a time: {value}")]
    BadTime { pointer: String, value: String },
}

impl DecodeError {
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::NoDevice(_) => "no_device",
            DecodeError::BadTime { .. } => "bad_time",
        }
    }
}

/// One decoded message: device, time (None = arrival) and raw fields.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonMessage {
    pub device: String,
    pub time: Option<DateTime<Utc>>,
    pub fields: Vec<(String, f64)>,
}

/// Decodes a message per the source's configuration.
pub fn decode_json(
    config: &MqttJsonConfig,
    topic: &str,
    payload: &[u8],
) -> Result<JsonMessage, DecodeError> {
    let max = config.max_payload.0 as usize;
    if payload.len() > max {
        return Err(DecodeError::TooLarge {
            size: payload.len(),
            max,
        });
    }
    let value: Value =
        serde_json::from_slice(payload).map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
    let device = match (&config.device_segment, &config.device_pointer) {
        (Some(i), _) => topic.split('/').nth(*i).unwrap_or_default().to_string(),
        (None, Some(p)) => match value.pointer(p) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        },
        (None, None) => String::new(),
    };
    if device.is_empty() || device.len() > 128 || device.chars().any(char::is_control) {
        return Err(DecodeError::NoDevice(format!(
            "{:?} on topic {topic:?}",
            device.chars().take(64).collect::<String>()
        )));
    }
    let time = match &config.timestamp_pointer {
        None => None,
        Some(p) => Some(
            parse_time(value.pointer(p), config.timestamp_format).ok_or_else(|| {
                DecodeError::BadTime {
                    pointer: p.clone(),
                    value: value
                        .pointer(p)
                        .map(|v| v.to_string().chars().take(64).collect())
                        .unwrap_or_else(|| "missing".into()),
                }
            })?,
        ),
    };
    let fields = if config.metrics.is_empty() {
        match &value {
            Value::Number(n) => n
                .as_f64()
                .filter(|f| f.is_finite())
                .map(|f| {
                    // A topic ending in `/` has an empty last level: the metric is `value`.
                    let level = topic.rsplit('/').next().filter(|l| !l.is_empty());
                    vec![(level.unwrap_or("value").to_string(), f)]
                })
                .unwrap_or_default(),
            other => flatten_numeric(other),
        }
    } else {
        config
            .metrics
            .iter()
            .filter_map(|(name, pointer)| {
                let raw = match value.pointer(pointer)? {
                    Value::Number(n) => n.as_f64()?,
                    Value::Bool(b) => f64::from(u8::from(*b)),
                    _ => return None,
                };
                raw.is_finite().then(|| (name.clone(), raw))
            })
            .collect()
    };
    Ok(JsonMessage {
        device,
        time,
        fields,
    })
}

fn parse_time(v: Option<&Value>, format: TimestampFormat) -> Option<DateTime<Utc>> {
    let from_number = |n: f64, millis: bool| {
        if !n.is_finite() || n < 0.0 {
            return None;
        }
        let ms = if millis { n } else { n * 1000.0 };
        if ms > 1e15 {
            return None;
        }
        DateTime::from_timestamp_millis(ms as i64)
    };
    match (v?, format) {
        (Value::String(s), TimestampFormat::Auto | TimestampFormat::Rfc3339) => {
            DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|t| t.with_timezone(&Utc))
        }
        (Value::Number(n), TimestampFormat::Auto) => {
            let n = n.as_f64()?;
            from_number(n, n > 1e11)
        }
        (Value::Number(n), TimestampFormat::UnixS) => from_number(n.as_f64()?, false),
        (Value::Number(n), TimestampFormat::UnixMs) => from_number(n.as_f64()?, true),
        _ => None,
    }
}

/// `pub(crate)` for [`crate::fuzzing`], which drives the decoder as the session does.
pub(crate) struct JsonDecoder {
    pub(crate) config: MqttJsonConfig,
    pub(crate) mapping: Arc<Mapping>,
}

impl Decode for JsonDecoder {
    fn decode(
        &mut self,
        topic: &str,
        payload: &[u8],
        received_at: DateTime<Utc>,
    ) -> Result<Decoded, Rejection> {
        let message = decode_json(&self.config, topic, payload).map_err(|e| Rejection {
            reason: e.reason(),
            detail: e.to_string(),
            record: true,
        })?;
        let observed_at = message.time.unwrap_or(received_at);
        let micros = observed_at.timestamp_micros().to_string();
        let readings = message
            .fields
            .iter()
            .filter_map(|(key, raw)| {
                let m = self.mapping.map(&message.device, key, *raw)?;
                m.value.is_finite().then(|| Reading {
                    uid: Uid::derive(&["mqtt", &self.config.name, &message.device, key, &micros]),
                    source: self.config.name.clone(),
                    device: message.device.clone(),
                    metric: m.metric,
                    value: m.value,
                    unit: m.unit,
                    observed_at,
                    received_at,
                    flags: 0,
                    meta: None,
                })
            })
            .collect();
        Ok(Decoded {
            readings,
            mark: message.time,
        })
    }
}

pub async fn run(config: MqttJsonConfig, ctx: SourceContext) -> anyhow::Result<()> {
    let subscription = Subscription {
        topics: config.topics.clone(),
        qos: if config.qos == 1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        },
        credentials: None,
    };
    let session = Session::new(&config.name, &config.broker, subscription, &ctx)?;
    let decoder = JsonDecoder {
        mapping: Arc::new(config.mapping.clone()),
        config,
    };
    session.run(decoder, &ctx).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(extra: Value) -> MqttJsonConfig {
        let mut base = json!({"name": "local", "broker": {"host": "127.0.0.1", "tls": false}, "topics": ["sensors/+/data"]});
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn device_from_topic_and_all_numeric_leaves() {
        let c = config(json!({"device_segment": 1}));
        let m = decode_json(
            &c,
            "sensors/kitchen/data",
            br#"{"t": 4.5, "env": {"h": 40}, "ok": true, "label": "x"}"#,
        )
        .unwrap();
        assert_eq!(m.device, "kitchen");
        assert!(m.time.is_none());
        let mut fields = m.fields.clone();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            fields,
            vec![
                ("env.h".into(), 40.0),
                ("ok".into(), 1.0),
                ("t".into(), 4.5)
            ]
        );
        // A bare number is named after the last topic level.
        let m = decode_json(&c, "sensors/kitchen/data", b"21.5").unwrap();
        assert_eq!(m.fields, vec![("data".into(), 21.5)]);
        // Found by fuzzing (docs/reliability.md, `## Fuzzing`): a topic ending in `/`
        // named the reading with an empty metric.
        let m = decode_json(&c, "sensors/kitchen/", b"21.5").unwrap();
        assert_eq!(m.fields, vec![("value".into(), 21.5)]);
        // A missing topic level is no device.
        assert_eq!(
            decode_json(&c, "sensors", b"{}").unwrap_err().reason(),
            "no_device"
        );
    }

    #[test]
    fn pointers_for_device_metrics_and_time() {
        let c = config(json!({
            "device_pointer": "/id", "metrics": {"temperature": "/env/t", "door": "/door", "missing": "/nope"},
            "timestamp_pointer": "/ts"
        }));
        let m = decode_json(
            &c,
            "x",
            br#"{"id": "f1", "env": {"t": -18.5}, "door": false, "ts": "2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(m.device, "f1");
        assert_eq!(m.time.unwrap().to_rfc3339(), "2026-01-01T00:00:00+00:00");
        let mut fields = m.fields.clone();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            fields,
            vec![("door".into(), 0.0), ("temperature".into(), -18.5)]
        );
        // Numeric ids and Unix times.
        let m = decode_json(&c, "x", br#"{"id": 17, "env": {"t": 1}, "ts": 1767225600}"#).unwrap();
        assert_eq!(m.device, "17");
        assert_eq!(m.time.unwrap().to_rfc3339(), "2026-01-01T00:00:00+00:00");
        let m = decode_json(&c, "x", br#"{"id": "a", "ts": 1767225600000}"#).unwrap();
        assert_eq!(m.time.unwrap().to_rfc3339(), "2026-01-01T00:00:00+00:00");
        // Wrong and hostile values.
        for bad in [
            &br#"{"id": "a", "ts": "noon"}"#[..],
            br#"{"id": "a"}"#,
            br#"{"id": "a", "ts": -5}"#,
            br#"{"id": "a", "ts": 1e300}"#,
        ] {
            assert_eq!(
                decode_json(&c, "x", bad).unwrap_err().reason(),
                "bad_time",
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        for bad in [
            &br#"{"id": {"x": 1}}"#[..],
            br#"{"id": ""}"#,
            br#"{}"#,
            br#"{"id": "a\u0000b"}"#,
        ] {
            assert_eq!(decode_json(&c, "x", bad).unwrap_err().reason(), "no_device");
        }
        assert_eq!(
            decode_json(&c, "x", b"\xff garbage").unwrap_err().reason(),
            "invalid_json"
        );
        let deep = "[".repeat(10_000);
        assert_eq!(
            decode_json(&c, "x", deep.as_bytes()).unwrap_err().reason(),
            "invalid_json"
        );
        let big = vec![b' '; 70_000];
        assert_eq!(
            decode_json(&c, "x", &big).unwrap_err().reason(),
            "too_large"
        );
    }

    #[test]
    fn readings_have_stable_uids_from_payload_time() {
        let c = config(json!({"device_segment": 1, "timestamp_pointer": "/ts"}));
        let mut d = JsonDecoder {
            mapping: Arc::new(Mapping::default()),
            config: c,
        };
        let payload = br#"{"t": 1, "ts": "2026-01-01T00:00:00Z"}"#;
        let a = d.decode("sensors/k/data", payload, Utc::now()).unwrap();
        let b = d.decode("sensors/k/data", payload, Utc::now()).unwrap();
        assert_eq!(a.readings[0].uid, b.readings[0].uid);
        assert_eq!(a.readings[0].device, "k");
    }

    #[test]
    fn config_validation() {
        let c = config(
            json!({"topics": [], "qos": 2, "metrics": {"t": "env/t"}, "timestamp_pointer": "ts"}),
        );
        let mut p = Problems::default();
        c.validate("s", &mut p);
        let keys: Vec<_> = p.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "s.topics",
                "s.qos",
                "s.device_segment",
                "s.metrics.t",
                "s.timestamp_pointer"
            ]
        );
        let c = config(json!({"topics": ["a/#/b"], "device_segment": 1, "device_pointer": "/id"}));
        let mut p = Problems::default();
        c.validate("s", &mut p);
        let keys: Vec<_> = p.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["s.topics[0]", "s.device_pointer"]);
    }
}
