//! Field mapping, shared by every source: raw key → metric name, unit, scale, offset;
//! per source and optionally per device.
//!
//! ```toml
//! [sources.mapping]
//! unmapped = "keep"            # or "drop": fields without a rule
//! [sources.mapping.fields]
//! TempC_SHT = { metric = "temperature", unit = "°C" }
//! BatV      = { metric = "battery", unit = "V" }
//! [sources.mapping.devices."lht65-freezer".fields]
//! TempC_DS  = { metric = "probe_temperature", unit = "°C", offset = -0.3 }
//! ```
//!
//! Raw keys of nested objects are flattened with dots (`{"a": {"b": 1}}` → `a.b`);
//! booleans become 0 and 1; strings and nulls are not readings.

use crate::settings::{check_identifier, Problems};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The deepest nesting flattened; deeper parts of hostile payloads are ignored.
const MAX_DEPTH: usize = 8;
/// The most fields taken from one payload.
const MAX_FIELDS: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// What to do with fields that have no rule: `keep` them under their raw name, or
    /// `drop` them.
    #[serde(default)]
    pub unmapped: Unmapped,
    /// Rules by raw key, for every device of the source.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldRule>,
    /// Rules for one device, taking precedence over `fields`.
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceMapping>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Unmapped {
    #[default]
    Keep,
    Drop,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DeviceMapping {
    #[serde(default)]
    pub fields: BTreeMap<String, FieldRule>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldRule {
    /// The metric name stored (default: the raw key).
    #[serde(default)]
    pub metric: Option<String>,
    #[serde(default)]
    pub unit: Option<String>,
    /// `value = raw * scale + offset`.
    #[serde(default = "one")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    /// Set to true to ignore this field.
    #[serde(default)]
    pub ignore: bool,
}

fn one() -> f64 {
    1.0
}

/// A mapped value, ready to become a reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Mapped {
    pub metric: String,
    pub unit: Option<String>,
    pub value: f64,
}

impl Mapping {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        let check_rules =
            |rules: &BTreeMap<String, FieldRule>, prefix: &str, problems: &mut Problems| {
                for (key, rule) in rules {
                    let p = format!("{prefix}.{key}");
                    if let Some(metric) = &rule.metric {
                        problems.check(
                            format!("{p}.metric"),
                            check_identifier(metric, "the metric name"),
                        );
                    }
                    if !rule.scale.is_finite() || rule.scale == 0.0 {
                        problems.push(format!("{p}.scale"), "must be a finite number other than 0");
                    }
                    if !rule.offset.is_finite() {
                        problems.push(format!("{p}.offset"), "must be a finite number");
                    }
                }
            };
        check_rules(&self.fields, &format!("{path}.fields"), problems);
        for (device, d) in &self.devices {
            check_rules(
                &d.fields,
                &format!("{path}.devices.{device}.fields"),
                problems,
            );
        }
    }

    /// Maps one raw field of `device`; `None` when it is dropped or ignored.
    pub fn map(&self, device: &str, key: &str, raw: f64) -> Option<Mapped> {
        let rule = self
            .devices
            .get(device)
            .and_then(|d| d.fields.get(key))
            .or_else(|| self.fields.get(key));
        match rule {
            Some(rule) if rule.ignore => None,
            Some(rule) => Some(Mapped {
                metric: rule.metric.clone().unwrap_or_else(|| key.to_string()),
                unit: rule.unit.clone(),
                value: raw * rule.scale + rule.offset,
            }),
            None if self.unmapped == Unmapped::Keep => Some(Mapped {
                metric: key.to_string(),
                unit: None,
                value: raw,
            }),
            None => None,
        }
    }

    /// Flattens `decoded` and maps every numeric or boolean field of `device`.
    pub fn map_object(&self, device: &str, decoded: &Value) -> Vec<Mapped> {
        flatten_numeric(decoded)
            .into_iter()
            .filter_map(|(key, raw)| self.map(device, &key, raw))
            .filter(|m| m.value.is_finite())
            .collect()
    }
}

/// Numeric and boolean leaves of a JSON value, nested keys joined with dots, at most
/// [`MAX_FIELDS`] of them and [`MAX_DEPTH`] levels deep. Arrays are indexed (`a.0`).
pub fn flatten_numeric(value: &Value) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    walk(value, String::new(), 0, &mut out);
    out
}

fn walk(value: &Value, prefix: String, depth: usize, out: &mut Vec<(String, f64)>) {
    if out.len() >= MAX_FIELDS || depth > MAX_DEPTH {
        return;
    }
    let child = |key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                if !prefix.is_empty() {
                    out.push((prefix, f));
                }
            }
        }
        Value::Bool(b) if !prefix.is_empty() => out.push((prefix, if *b { 1.0 } else { 0.0 })),
        Value::Object(map) => {
            for (k, v) in map {
                walk(v, child(k), depth + 1, out);
            }
        }
        Value::Array(list) => {
            for (i, v) in list.iter().enumerate() {
                walk(v, child(&i.to_string()), depth + 1, out);
            }
        }
        _ => {}
    }
}

/// The range a value must lie in to be believed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Plausible {
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

impl Plausible {
    pub fn contains(&self, v: f64) -> bool {
        self.min.is_none_or(|min| v >= min) && self.max.is_none_or(|max| v <= max)
    }

    pub fn validate(&self, path: &str, problems: &mut Problems) {
        for (key, v) in [("min", self.min), ("max", self.max)] {
            if v.is_some_and(|v| !v.is_finite()) {
                problems.push(format!("{path}.{key}"), "must be a finite number");
            }
        }
        if let (Some(min), Some(max)) = (self.min, self.max) {
            if min > max {
                problems.push(
                    format!("{path}.min"),
                    format!("min {min} is above max {max}"),
                );
            }
        }
        if self.min.is_none() && self.max.is_none() {
            problems.push(path, "give `min`, `max` or both");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flattens_numbers_and_booleans() {
        let v = json!({"a": 1, "b": {"c": 2.5, "d": true, "e": "text", "f": null}, "g": [3]});
        let mut got = flatten_numeric(&v);
        got.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            got,
            vec![
                ("a".into(), 1.0),
                ("b.c".into(), 2.5),
                ("b.d".into(), 1.0),
                ("g.0".into(), 3.0)
            ]
        );
        assert!(
            flatten_numeric(&json!(5)).is_empty(),
            "a bare number has no key"
        );
    }

    #[test]
    fn hostile_payloads_are_bounded() {
        let mut deep = json!(1);
        for _ in 0..100 {
            deep = json!({ "x": deep });
        }
        assert!(flatten_numeric(&deep).is_empty());
        let wide: serde_json::Map<String, Value> =
            (0..10_000).map(|i| (format!("k{i}"), json!(i))).collect();
        assert_eq!(flatten_numeric(&Value::Object(wide)).len(), MAX_FIELDS);
    }

    #[test]
    fn rules_apply_per_device_first() {
        let m: Mapping = serde_json::from_value(json!({
            "unmapped": "drop",
            "fields": {"TempC_SHT": {"metric": "temperature", "unit": "°C"}, "Noise": {"ignore": true}},
            "devices": {"probe": {"fields": {"TempC_SHT": {"metric": "probe", "scale": 0.1, "offset": -1.0}}}}
        }))
        .unwrap();
        assert_eq!(m.map("a", "TempC_SHT", 4.0).unwrap().metric, "temperature");
        let p = m.map("probe", "TempC_SHT", 40.0).unwrap();
        assert_eq!((p.metric.as_str(), p.value), ("probe", 3.0));
        assert!(m.map("a", "Other", 1.0).is_none(), "unmapped = drop");
        assert!(m.map("a", "Noise", 1.0).is_none(), "ignored");
        let keep = Mapping::default();
        assert_eq!(keep.map("a", "Other", 1.0).unwrap().metric, "Other");
    }

    #[test]
    fn validation_rejects_bad_rules() {
        let m: Mapping = serde_json::from_value(json!({
            "fields": {"x": {"metric": "bad name", "scale": 0.0}}
        }))
        .unwrap();
        let mut problems = Problems::default();
        m.validate("sources[0].mapping", &mut problems);
        assert_eq!(problems.0.len(), 2, "{:?}", problems.0);
    }
}
