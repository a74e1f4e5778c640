//! Property tests of the pure decoders: arbitrary and hostile input never panics, and
//! valid generated input decodes back to what was encoded. Case counts are modest so the
//! whole file runs in seconds in a debug build.

use chrono::{DateTime, TimeZone, Utc};
use outpost::config::{expand_env, ByteSize, Config, HumanDuration};
use outpost::sources::chirpstack::{decode_chirpstack, DeviceIdFrom, EventMapper};
use outpost::sources::mapping::{flatten_numeric, Mapping};
use outpost::sources::modbus_decode::{decode_bits, decode_registers, Order, ValueType};
use outpost::sources::mqtt::{decode_json, MqttJsonConfig};
use outpost::sources::serial_formats::{
    parse_number, parse_timestamp, FieldRoles, FieldValue, Format, Frame, LineEnding, LineFramer,
    LineParser, TimestampFormat,
};
use outpost::sources::ttn::{decode_ttn, SimulatedUplinks, UplinkMapper};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const MAX: usize = 64 * 1024;

fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(256)
    }
}

/// Field names as sensors and payload formatters write them.
fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{0,11}"
}

/// Finite numbers that survive a JSON or text round trip exactly: integers, dyadic
/// fractions and arbitrary finite doubles (serde_json and Rust print the shortest
/// representation that parses back to the same double).
fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<i32>().prop_map(f64::from),
        (any::<i32>(), 0u32..16).prop_map(|(m, e)| f64::from(m) / f64::from(1u32 << e)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()),
    ]
}

/// Numbers as sensors and payload formatters send them in JSON: at most 15 significant
/// digits. serde_json (without its `float_roundtrip` feature) parses those exactly;
/// 16–17 digit doubles may come back one ULP off, which no sensor resolution notices.
fn decimal() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<i32>().prop_map(f64::from),
        (-999_999_999_999_999i64..=999_999_999_999_999, 0u32..12)
            .prop_map(|(m, k)| { format!("{m}e-{k}").parse::<f64>().unwrap_or(0.0) }),
    ]
}

/// Fields of a JSON payload.
fn fields() -> impl Strategy<Value = BTreeMap<String, f64>> {
    prop::collection::btree_map(name(), decimal(), 1..12)
}

/// Fields of a text line (Rust's float parsing is exact for every finite double).
fn text_fields() -> impl Strategy<Value = BTreeMap<String, f64>> {
    prop::collection::btree_map(name(), finite(), 1..12)
}

/// A JSON value of bounded size with hostile leaves (huge numbers, control
/// characters, deep nesting).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|i| json!(i)),
        finite().prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(12, 128, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(".{0,10}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    // 2000-01-01 .. 2100-01-01, whole microseconds.
    (946_684_800_000_000i64..4_102_444_800_000_000i64).prop_map(|us| {
        DateTime::from_timestamp_micros(us).unwrap_or_else(|| Utc.timestamp_opt(0, 0).unwrap())
    })
}

fn ttn_mapper() -> UplinkMapper {
    UplinkMapper {
        source: "ttn".into(),
        application: "app".into(),
        simulated: SimulatedUplinks::Tag,
        devices: Vec::new(),
        mapping: Arc::new(Mapping::default()),
    }
}

fn ttn_uplink(device: &str, f_cnt: u32, at: DateTime<Utc>, decoded: &Value) -> Vec<u8> {
    json!({
        "end_device_ids": {"device_id": device, "dev_eui": "70B3D57ED005A1B2"},
        "received_at": at.to_rfc3339(),
        "uplink_message": {
            "f_port": 1,
            "f_cnt": f_cnt,
            "decoded_payload": decoded,
            "rx_metadata": [{"gateway_ids": {"gateway_id": "gw"}, "rssi": -80.0, "snr": 7.5}],
            "received_at": at.to_rfc3339(),
        }
    })
    .to_string()
    .into_bytes()
}

fn chirpstack_event(dedup: &str, f_cnt: u32, object: &Value) -> Vec<u8> {
    json!({
        "deduplicationId": dedup,
        "time": "2024-05-01T12:00:00Z",
        "deviceInfo": {"deviceName": "probe", "devEui": "0102030405060708", "tags": {"room": "a"}},
        "fCnt": f_cnt,
        "fPort": 2,
        "object": object,
        "rxInfo": [{"gatewayId": "gw", "rssi": -90, "snr": 3.0}],
    })
    .to_string()
    .into_bytes()
}

fn chirpstack_mapper() -> EventMapper {
    EventMapper {
        source: "cs".into(),
        device_id: DeviceIdFrom::Name,
        devices: Vec::new(),
        mapping: Arc::new(Mapping::default()),
    }
}

fn mqtt_config(extra: Value) -> MqttJsonConfig {
    let mut base = json!({
        "name": "m",
        "broker": {"host": "localhost"},
        "topics": ["sensors/#"],
    });
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    serde_json::from_value(base).expect("the test's own MQTT config is valid")
}

fn sorted(mut v: Vec<(String, f64)>) -> Vec<(String, f64)> {
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

// ---------------------------------------------------------------------------------
// TTN

proptest! {
    #![proptest_config(config())]

    #[test]
    fn ttn_never_panics_on_bytes(topic in ".{0,40}", payload in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_ttn(&topic, &payload, MAX);
        let _ = decode_ttn("v3/app@ttn/devices/d/up", &payload, MAX);
    }

    #[test]
    fn ttn_never_panics_on_hostile_json(value in json_value(), decoded in json_value()) {
        let topic = "v3/app@ttn/devices/d/up";
        let _ = decode_ttn(topic, value.to_string().as_bytes(), MAX);
        // A well-formed envelope with a hostile decoded_payload goes all the way to readings.
        let payload = ttn_uplink("dev", 1, Utc::now(), &decoded);
        if let Ok(up) = decode_ttn(topic, &payload, MAX) {
            if let Ok(readings) = ttn_mapper().readings(&up, Utc::now(), 0) {
                prop_assert!(readings.iter().all(|r| r.value.is_finite()));
            }
        }
    }

    #[test]
    fn ttn_oversized_is_rejected_unread(payload in prop::collection::vec(any::<u8>(), 1..256)) {
        let got = decode_ttn("a/up", &payload, payload.len() - 1);
        prop_assert_eq!(got.map(|_| ()).map_err(|e| e.reason()), Err("too_large"));
    }

    #[test]
    fn ttn_decoded_payload_round_trips(
        device in "[a-z][a-z0-9-]{0,15}",
        f_cnt in any::<u32>(),
        at in time(),
        fields in fields(),
    ) {
        let decoded: Value = fields.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>().into();
        let payload = ttn_uplink(&device, f_cnt, at, &decoded);
        let up = decode_ttn("v3/app@ttn/devices/x/up", &payload, MAX).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&up.device_id, &device);
        prop_assert_eq!(up.f_cnt, f_cnt);
        prop_assert_eq!(up.ns_received_at, at);
        let readings = ttn_mapper().readings(&up, Utc::now(), 0).map_err(|r| TestCaseError::fail(r.detail))?;
        let got: BTreeMap<String, f64> = readings.iter().map(|r| (r.metric.clone(), r.value)).collect();
        prop_assert_eq!(got, fields);
        prop_assert!(readings.iter().all(|r| r.device == device && r.observed_at == at));
    }

    #[test]
    fn ttn_uids_are_deterministic(
        f_cnt in any::<u32>(),
        other in any::<u32>(),
        at in time(),
        fields in fields(),
    ) {
        prop_assume!(f_cnt != other);
        let decoded: Value = fields.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>().into();
        let uids = |f_cnt: u32| -> Result<Vec<_>, TestCaseError> {
            let payload = ttn_uplink("dev", f_cnt, at, &decoded);
            let up = decode_ttn("v3/app@ttn/devices/dev/up", &payload, MAX)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let readings = ttn_mapper()
                .readings(&up, Utc::now(), 0)
                .map_err(|r| TestCaseError::fail(r.detail))?;
            Ok(readings.into_iter().map(|r| r.uid).collect())
        };
        let first = uids(f_cnt)?;
        prop_assert_eq!(first.len(), fields.len());
        prop_assert_eq!(&first, &uids(f_cnt)?);
        let distinct: std::collections::HashSet<_> = first.iter().collect();
        prop_assert_eq!(distinct.len(), first.len(), "one uid per field");
        let second = uids(other)?;
        prop_assert!(first.iter().all(|u| !second.contains(u)), "another f_cnt shares a uid");
    }
}

// ---------------------------------------------------------------------------------
// ChirpStack

proptest! {
    #![proptest_config(config())]

    #[test]
    fn chirpstack_never_panics_on_bytes(payload in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_chirpstack("application/x/device/y/event/up", &payload, MAX);
        let mut proto = vec![0x0a];
        proto.extend_from_slice(&payload);
        let _ = decode_chirpstack("application/x/device/y/event/up", &proto, MAX);
    }

    #[test]
    fn chirpstack_never_panics_on_hostile_json(value in json_value(), object in json_value()) {
        let topic = "application/x/device/y/event/up";
        let _ = decode_chirpstack(topic, value.to_string().as_bytes(), MAX);
        if let Ok(up) = decode_chirpstack(topic, &chirpstack_event("d", 1, &object), MAX) {
            if let Ok(readings) = chirpstack_mapper().readings(&up, Utc::now()) {
                prop_assert!(readings.iter().all(|r| r.value.is_finite()));
            }
        }
    }

    #[test]
    fn chirpstack_object_round_trips_with_stable_uids(
        dedup in "[0-9a-f-]{1,36}",
        other in "[0-9a-f-]{1,36}",
        f_cnt in any::<u32>(),
        fields in fields(),
    ) {
        prop_assume!(dedup != other);
        let object: Value = fields.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<Map<_, _>>().into();
        let topic = "application/x/device/y/event/up";
        let read = |dedup: &str| -> Result<Vec<outpost::model::Reading>, TestCaseError> {
            let up = decode_chirpstack(topic, &chirpstack_event(dedup, f_cnt, &object), MAX)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(up.f_cnt, f_cnt);
            chirpstack_mapper().readings(&up, Utc::now()).map_err(|r| TestCaseError::fail(r.detail))
        };
        let first = read(&dedup)?;
        let got: BTreeMap<String, f64> = first.iter().map(|r| (r.metric.clone(), r.value)).collect();
        prop_assert_eq!(&got, &fields);
        let again: Vec<_> = read(&dedup)?.into_iter().map(|r| r.uid).collect();
        prop_assert_eq!(first.iter().map(|r| r.uid).collect::<Vec<_>>(), again);
        let other: Vec<_> = read(&other)?.into_iter().map(|r| r.uid).collect();
        prop_assert!(first.iter().all(|r| !other.contains(&r.uid)), "another event shares a uid");
    }
}

// ---------------------------------------------------------------------------------
// Generic MQTT JSON and field flattening

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mqtt_never_panics(
        topic in ".{0,40}",
        payload in prop::collection::vec(any::<u8>(), 0..512),
        value in json_value(),
        segment in 0usize..6,
        pointer in "(/[a-z0-9~]{0,4}){0,3}",
        format in prop_oneof![Just("auto"), Just("rfc3339"), Just("unix_s"), Just("unix_ms")],
    ) {
        let configs = [
            mqtt_config(json!({"device_segment": segment})),
            mqtt_config(json!({"device_pointer": pointer, "timestamp_pointer": pointer, "timestamp_format": format})),
            mqtt_config(json!({"device_segment": 1, "metrics": {"t": pointer}})),
        ];
        for c in &configs {
            let _ = decode_json(c, &topic, &payload);
            let _ = decode_json(c, &topic, value.to_string().as_bytes());
            let _ = decode_json(c, "sensors/dev/x", value.to_string().as_bytes());
        }
    }

    #[test]
    fn mqtt_fields_round_trip(
        device in "[a-z][a-z0-9_-]{0,15}",
        fields in fields(),
        secs in 946_684_800i64..4_102_444_800i64,
    ) {
        let mut payload: Map<String, Value> = fields.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        payload.insert("meta".into(), json!({"id": device, "ts": secs}));
        let c = mqtt_config(json!({"device_pointer": "/meta/id", "timestamp_pointer": "/meta/ts", "timestamp_format": "unix_s"}));
        let msg = decode_json(&c, "sensors/x", Value::Object(payload).to_string().as_bytes())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&msg.device, &device);
        prop_assert_eq!(msg.time, DateTime::from_timestamp(secs, 0));
        let mut expected: Vec<(String, f64)> = fields.into_iter().collect();
        expected.push(("meta.ts".into(), secs as f64));
        prop_assert_eq!(sorted(msg.fields), sorted(expected));
    }

    #[test]
    fn flatten_is_bounded_and_finite(value in json_value()) {
        let flat = flatten_numeric(&value);
        prop_assert!(flat.len() <= 1024, "{} fields", flat.len());
        prop_assert!(flat.iter().all(|(k, v)| !k.is_empty() && v.is_finite()));
    }

    #[test]
    fn flatten_round_trips_nested_objects(outer in name(), fields in text_fields(), list in prop::collection::vec(finite(), 0..5)) {
        let inner: Map<String, Value> = fields.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let value = json!({ outer.clone(): inner, "list": list });
        let mut expected: Vec<(String, f64)> = fields.iter().map(|(k, v)| (format!("{outer}.{k}"), *v)).collect();
        expected.extend(list.iter().enumerate().map(|(i, v)| (format!("list.{i}"), *v)));
        let got = flatten_numeric(&value);
        if outer == "list" {
            // The later key replaces the first in the JSON object.
            prop_assert_eq!(got.len(), list.len());
        } else {
            prop_assert_eq!(sorted(got), sorted(expected));
        }
    }
}

// ---------------------------------------------------------------------------------
// Serial line formats

fn all_parsers(columns: Vec<String>) -> Vec<LineParser> {
    let roles = |device: bool, metric: bool| FieldRoles {
        device_field: device.then(|| "device".into()),
        timestamp_field: Some("time".into()),
        timestamp_format: TimestampFormat::Rfc3339,
        metric_field: metric.then(|| "metric".into()),
        value_field: "value".into(),
        unit_field: metric.then(|| "unit".into()),
    };
    let regex = regex::Regex::new(r"^(?P<device>\w+)\s+(?P<temp>\S+)$").expect("valid");
    let mut parsers = Vec::new();
    for (device, metric) in [(false, false), (true, false), (true, true)] {
        parsers.push(LineParser::new(Format::Json, roles(device, metric)));
        parsers.push(LineParser::new(Format::KeyValue, roles(device, metric)));
        parsers.push(LineParser::new(
            Format::Csv {
                delimiter: ',',
                columns: None,
            },
            roles(device, metric),
        ));
        parsers.push(LineParser::new(
            Format::Csv {
                delimiter: ';',
                columns: Some(columns.clone()),
            },
            roles(device, metric),
        ));
        parsers.push(LineParser::new(
            Format::Regex(regex.clone()),
            roles(device, metric),
        ));
    }
    parsers
}

fn plain_roles() -> FieldRoles {
    FieldRoles {
        value_field: "value".into(),
        ..FieldRoles::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn serial_never_panics_on_lines(
        lines in prop::collection::vec(prop_oneof![
            ".{0,120}",
            "[a-z0-9=,;:. \"-]{0,120}",
            prop::collection::vec(any::<u8>(), 0..120).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            json_value().prop_map(|v| v.to_string()),
        ], 1..8),
        columns in prop::collection::vec(".{0,8}", 0..6),
    ) {
        for mut parser in all_parsers(columns) {
            for line in &lines {
                let _ = parser.parse(line);
            }
            parser.reset();
        }
    }

    #[test]
    fn serial_framing_is_bounded_and_split_independent(
        bytes in prop::collection::vec(prop_oneof![any::<u8>(), Just(b'\n'), Just(b'\r')], 0..600),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        max in 1usize..64,
        cr in any::<bool>(),
    ) {
        let ending = if cr { LineEnding::Cr } else { LineEnding::Lf };
        #[derive(Debug, PartialEq)]
        enum Owned { Line(Vec<u8>), Overlong(usize) }
        let frames = |pieces: Vec<&[u8]>| {
            let mut framer = LineFramer::new(max, ending);
            let mut got = Vec::new();
            for piece in pieces {
                framer.push(piece, &mut |f| got.push(match f {
                    Frame::Line(l) => Owned::Line(l.to_vec()),
                    Frame::Overlong(n) => Owned::Overlong(n),
                }));
            }
            (got, framer.reset())
        };
        let whole = frames(vec![&bytes]);
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut pieces = Vec::new();
        let mut start = 0;
        for p in points {
            pieces.push(&bytes[start..p]);
            start = p;
        }
        pieces.push(&bytes[start..]);
        prop_assert_eq!(&frames(pieces), &whole);
        let end = if cr { b'\r' } else { b'\n' };
        let mut parsers = all_parsers(vec!["a".into(), "value".into()]);
        for f in &whole.0 {
            match f {
                Owned::Line(l) => {
                    prop_assert!(l.len() <= max && !l.contains(&end));
                    // Whatever bytes arrive, the parsers take the lossy text without panicking.
                    let text = String::from_utf8_lossy(l);
                    for parser in &mut parsers {
                        let _ = parser.parse(&text);
                    }
                }
                Owned::Overlong(n) => prop_assert!(*n > max),
            }
        }
    }

    #[test]
    fn serial_key_value_round_trips(
        fields in text_fields(),
        sep in prop_oneof![Just(" "), Just(","), Just(";"), Just(" , ")],
    ) {
        let line: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let line = line.join(sep);
        let mut parser = LineParser::new(Format::KeyValue, plain_roles());
        let parsed = parser.parse(&line).map_err(|e| TestCaseError::fail(e.to_string()))?
            .ok_or_else(|| TestCaseError::fail("no reading"))?;
        let got: BTreeMap<String, f64> = parsed.values.into_iter().map(|r| (r.key, r.value)).collect();
        prop_assert_eq!(got, fields);
    }

    #[test]
    fn serial_csv_with_header_round_trips(
        fields in text_fields(),
        device in "[a-z][a-z0-9_]{0,10}",
        rows in 1usize..4,
    ) {
        prop_assume!(!fields.contains_key("device"));
        let mut parser = LineParser::new(
            Format::Csv { delimiter: ',', columns: None },
            FieldRoles { device_field: Some("device".into()), ..plain_roles() },
        );
        let header: Vec<&str> = std::iter::once("device").chain(fields.keys().map(String::as_str)).collect();
        prop_assert_eq!(parser.parse(&header.join(",")), Ok(None), "the header line is learned");
        for _ in 0..rows {
            let row: Vec<String> = std::iter::once(format!("\"{device}\""))
                .chain(fields.values().map(|v| v.to_string()))
                .collect();
            let parsed = parser.parse(&row.join(",")).map_err(|e| TestCaseError::fail(e.to_string()))?
                .ok_or_else(|| TestCaseError::fail("no reading"))?;
            prop_assert_eq!(parsed.device.as_deref(), Some(device.as_str()));
            let got: BTreeMap<String, f64> = parsed.values.into_iter().map(|r| (r.key, r.value)).collect();
            prop_assert_eq!(&got, &fields);
        }
    }

    #[test]
    fn serial_csv_with_columns_round_trips(fields in text_fields()) {
        let columns: Vec<String> = fields.keys().cloned().collect();
        let mut parser = LineParser::new(
            Format::Csv { delimiter: ';', columns: Some(columns) },
            plain_roles(),
        );
        let row: Vec<String> = fields.values().map(|v| format!(" {v} ")).collect();
        let parsed = parser.parse(&row.join(";")).map_err(|e| TestCaseError::fail(e.to_string()))?
            .ok_or_else(|| TestCaseError::fail("no reading"))?;
        let got: BTreeMap<String, f64> = parsed.values.into_iter().map(|r| (r.key, r.value)).collect();
        prop_assert_eq!(got, fields);
    }

    #[test]
    fn serial_json_and_metric_field_round_trip(
        device in "[a-z][a-z0-9_]{0,10}",
        metric in "[a-z][a-z0-9_.:-]{0,20}",
        value in decimal(),
        at in time(),
    ) {
        let roles = FieldRoles {
            device_field: Some("device".into()),
            timestamp_field: Some("time".into()),
            metric_field: Some("metric".into()),
            unit_field: Some("unit".into()),
            ..plain_roles()
        };
        let line = json!({"device": device, "time": at.to_rfc3339(), "metric": metric, "value": value, "unit": "°C"});
        let mut parser = LineParser::new(Format::Json, roles);
        let parsed = parser.parse(&line.to_string()).map_err(|e| TestCaseError::fail(e.to_string()))?
            .ok_or_else(|| TestCaseError::fail("no reading"))?;
        prop_assert_eq!(parsed.device.as_deref(), Some(device.as_str()));
        prop_assert_eq!(parsed.observed_at, Some(at));
        prop_assert_eq!(parsed.values.len(), 1);
        prop_assert_eq!(&parsed.values[0].key, &metric);
        prop_assert_eq!(parsed.values[0].value, value);
        prop_assert_eq!(parsed.values[0].unit.as_deref(), Some("°C"));
    }

    #[test]
    fn parse_number_accepts_only_finite_numbers(text in ".{0,30}", n in finite()) {
        if let Some(v) = parse_number(&text) {
            prop_assert!(v.is_finite());
        }
        prop_assert_eq!(parse_number(&n.to_string()), Some(n));
        prop_assert_eq!(parse_number(&format!(" {n:e} ")), Some(n));
    }

    #[test]
    fn timestamps_never_panic(
        text in ".{0,40}",
        n in any::<f64>(),
        pattern in prop_oneof![Just("%Y-%m-%d %H:%M:%S".to_string()), Just("%s%z".to_string()), "[%a-zA-Z:. -]{0,12}"],
    ) {
        let formats = [
            TimestampFormat::Rfc3339,
            TimestampFormat::Unix,
            TimestampFormat::UnixMs,
            TimestampFormat::Pattern(pattern),
        ];
        for f in &formats {
            let _ = parse_timestamp(&FieldValue::Text(text.clone()), f);
            let _ = parse_timestamp(&FieldValue::Number(n), f);
        }
    }

    #[test]
    fn unix_timestamps_round_trip(at in time()) {
        let secs = at.timestamp_micros() as f64 / 1e6;
        let got = parse_timestamp(&FieldValue::Number(secs), &TimestampFormat::Unix)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        // Seconds as a double carry about microsecond precision at these magnitudes.
        prop_assert!((got - at).num_microseconds().unwrap_or(i64::MAX).abs() <= 1, "{got} != {at}");
        let ms = at.timestamp_millis();
        let got = parse_timestamp(&FieldValue::Text(ms.to_string()), &TimestampFormat::UnixMs)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got.timestamp_millis(), ms);
    }
}

// ---------------------------------------------------------------------------------
// Modbus

fn order() -> impl Strategy<Value = Order> {
    prop_oneof![Just(Order::Big), Just(Order::Little)]
}

/// Registers of a 32-bit value as the device sends them, built from std byte order.
fn words32(be: [u8; 4], word_order: Order, byte_order: Order) -> Vec<u16> {
    let reg = |a: u8, b: u8| match byte_order {
        Order::Big => u16::from_be_bytes([a, b]),
        Order::Little => u16::from_le_bytes([a, b]),
    };
    let (hi, lo) = (reg(be[0], be[1]), reg(be[2], be[3]));
    match word_order {
        Order::Big => vec![hi, lo],
        Order::Little => vec![lo, hi],
    }
}

fn words16(be: [u8; 2], byte_order: Order) -> Vec<u16> {
    match byte_order {
        Order::Big => vec![u16::from_be_bytes(be)],
        Order::Little => vec![u16::from_le_bytes(be)],
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn modbus_never_panics(
        words in prop::collection::vec(any::<u16>(), 0..64),
        count in any::<u16>(),
        bits in prop::collection::vec(any::<bool>(), 0..64),
        ty in prop_oneof![Just(ValueType::U16), Just(ValueType::I16), Just(ValueType::U32), Just(ValueType::I32), Just(ValueType::F32)],
        w in order(),
        b in order(),
    ) {
        for c in [count, words.len() as u16, (words.len() / 2) as u16] {
            if let Ok(values) = decode_registers(&words, ty, c, w, b) {
                prop_assert_eq!(values.len(), usize::from(c));
                prop_assert!(values.iter().all(|v| v.is_finite()));
            }
        }
        for c in [count, bits.len() as u16, (bits.len() / 8) as u16] {
            if let Ok(values) = decode_bits(&bits, c) {
                prop_assert_eq!(values.len(), usize::from(c));
            }
        }
    }

    #[test]
    fn modbus_16_bit_round_trips(u in any::<u16>(), i in any::<i16>(), b in order(), w in order()) {
        prop_assert_eq!(decode_registers(&words16(u.to_be_bytes(), b), ValueType::U16, 1, w, b), Ok(vec![f64::from(u)]));
        prop_assert_eq!(decode_registers(&words16(i.to_be_bytes(), b), ValueType::I16, 1, w, b), Ok(vec![f64::from(i)]));
    }

    #[test]
    fn modbus_32_bit_round_trips(u in any::<u32>(), i in any::<i32>(), f in any::<f32>(), w in order(), b in order()) {
        prop_assert_eq!(decode_registers(&words32(u.to_be_bytes(), w, b), ValueType::U32, 1, w, b), Ok(vec![f64::from(u)]));
        prop_assert_eq!(decode_registers(&words32(i.to_be_bytes(), w, b), ValueType::I32, 1, w, b), Ok(vec![f64::from(i)]));
        let got = decode_registers(&words32(f.to_be_bytes(), w, b), ValueType::F32, 1, w, b);
        if f.is_finite() {
            prop_assert_eq!(got, Ok(vec![f64::from(f)]));
        } else {
            prop_assert_eq!(got.map_err(|e| e.reason()), Err("not_a_number"));
        }
    }

    #[test]
    fn modbus_several_values_round_trip(values in prop::collection::vec(any::<i32>(), 1..20), w in order(), b in order()) {
        let words: Vec<u16> = values.iter().flat_map(|v| words32(v.to_be_bytes(), w, b)).collect();
        let expected: Vec<f64> = values.iter().map(|v| f64::from(*v)).collect();
        prop_assert_eq!(decode_registers(&words, ValueType::I32, values.len() as u16, w, b), Ok(expected));
        // One register missing or extra is a count error, not a shifted decode.
        prop_assert!(decode_registers(&words[1..], ValueType::I32, values.len() as u16, w, b).is_err());
    }
}

// ---------------------------------------------------------------------------------
// Configuration values and loading

proptest! {
    #![proptest_config(config())]

    #[test]
    fn human_duration_round_trips(secs in 0u64..10 * 365 * 86_400, nanos in 0u32..1_000_000_000) {
        for d in [Duration::from_secs(secs), Duration::new(secs, nanos), Duration::from_millis(u64::from(nanos))] {
            let h = HumanDuration(d);
            let text = h.to_string();
            prop_assert_eq!(text.parse::<HumanDuration>(), Ok(h), "{}", text);
        }
    }

    #[test]
    fn human_duration_never_panics(text in ".{0,30}", n in any::<u64>(), unit in "[a-zµ]{0,6}") {
        let _ = text.parse::<HumanDuration>();
        let _ = format!("{n}{unit}").parse::<HumanDuration>();
    }

    #[test]
    fn byte_size_round_trips(n in any::<u64>(), small in 0u64..(1 << 20), shift in 0u32..24) {
        for size in [ByteSize(n), ByteSize(small), ByteSize(small << shift)] {
            let text = size.to_string();
            prop_assert_eq!(text.parse::<ByteSize>(), Ok(size), "{}", text);
        }
    }

    #[test]
    fn byte_size_never_panics(text in ".{0,30}", n in any::<f64>(), unit in "[kKmMgGtTiIbB]{0,3}") {
        let _ = text.parse::<ByteSize>();
        let _ = format!("{n}{unit}").parse::<ByteSize>();
    }

    #[test]
    fn expand_env_never_panics(text in "[$a-zA-Z_{}:-]{0,40}|.{0,40}") {
        let lookup = |name: &str| (name.len() % 2 == 0).then(|| format!("<{name}>"));
        let _ = expand_env(&text, lookup);
        let _ = expand_env(&text, |_| None);
    }

    #[test]
    fn expand_env_round_trips(plain in "[a-zA-Z0-9 _./:-]{0,30}", name in "[A-Z_][A-Z0-9_]{0,10}", value in "[^$]{0,20}", default in "[a-z0-9]{0,10}") {
        prop_assert_eq!(expand_env(&plain, |_| None), Ok(plain.clone()));
        let v = value.clone();
        let text = format!("{plain}${{{name}}}{plain}");
        prop_assert_eq!(expand_env(&text, move |_| Some(v.clone())), Ok(format!("{plain}{value}{plain}")));
        let text = format!("${{{name}:-{default}}}");
        prop_assert_eq!(expand_env(&text, |_| None), Ok(default.clone()));
        prop_assert_eq!(expand_env(&format!("$${{{name}}}"), |_| None), Ok(format!("${{{name}}}")));
    }
}

/// Loads `text` as a configuration file; an error must name at least one problem with a
/// message.
fn load(dir: &tempfile::TempDir, text: &[u8]) -> Result<(), TestCaseError> {
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, text).map_err(|e| TestCaseError::fail(e.to_string()))?;
    match Config::load(&path) {
        Ok(_) => Ok(()),
        Err(errors) => {
            prop_assert!(!errors.0.is_empty(), "Err without any problem");
            prop_assert!(
                errors.0.iter().all(|e| !e.message.trim().is_empty()),
                "a problem without a message: {errors:?}"
            );
            Ok(())
        }
    }
}

/// TOML that parses, built from the real sections and keys with hostile values.
fn toml_document() -> impl Strategy<Value = String> {
    let section = prop_oneof![
        Just("[agent]"),
        Just("[storage]"),
        Just("[log]"),
        Just("[[sources]]"),
        Just("[[alerts]]"),
        Just("[sync]"),
        Just("[http]"),
        Just("[[notify]]"),
        Just("[bogus]"),
    ];
    let key = prop_oneof![
        Just("type"),
        Just("name"),
        Just("gateway_id"),
        Just("site"),
        Just("path"),
        Just("period"),
        Just("max_size"),
        Just("level"),
        Just("host"),
        Just("port"),
        Just("password"),
        Just("password_file"),
        Just("api_key"),
        Just("api_key_file"),
        Just("application"),
        Just("topics"),
        Just("max_payload"),
    ];
    let value = prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        finite().prop_map(|f| format!("{f:?}")),
        Just("true".to_string()),
        Just("\"simulated\"".to_string()),
        Just("\"ttn\"".to_string()),
        Just("\"10m\"".to_string()),
        Just("\"${NO_SUCH_OUTPOST_VAR}\"".to_string()),
        Just("\"${HOME:-x}\"".to_string()),
        Just("\"/nonexistent/secret\"".to_string()),
        Just("[\"a/#\", 1]".to_string()),
        Just("{ a = 1 }".to_string()),
        "[a-zA-Z0-9 ._/${}:-]{0,20}".prop_map(|s| format!("{s:?}")),
    ];
    prop::collection::vec((section, prop::collection::vec((key, value), 0..6)), 0..6).prop_map(
        |sections| {
            let mut out = String::new();
            for (section, pairs) in sections {
                out.push_str(section);
                out.push('\n');
                let mut seen = Vec::new();
                for (k, v) in pairs {
                    if !seen.contains(&k) {
                        seen.push(k);
                        out.push_str(&format!("{k} = {v}\n"));
                    }
                }
            }
            out
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..config() })]

    #[test]
    fn config_load_never_panics_on_bytes(text in prop::collection::vec(any::<u8>(), 0..400)) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        load(&dir, &text)?;
    }

    #[test]
    fn config_load_never_panics_on_text(text in "([\\[\\]a-z_.=\"{}, \n0-9#$-]|\\[\\[sources\\]\\]\n|type = \"ttn\"\n){0,60}") {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        load(&dir, text.as_bytes())?;
    }

    #[test]
    fn config_load_never_panics_on_structured_toml(text in toml_document()) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        load(&dir, text.as_bytes())?;
    }
}

// ---------------------------------------------------------------------------------
// What the fuzz targets cover beyond the properties above: Modbus RTU frame checks and
// encoding, field mapping with scale and offset, validated timestamp patterns,
// drop-ins and environment overrides, and the fuzz entry functions themselves (the
// decoders exactly as the sources drive them, with their invariants).

use outpost::sources::mapping::FieldRule;
use outpost::sources::modbus_decode::{
    answer_len, classify_timeout, crc16, encode_value, FrameFault,
};
use outpost::sources::serial_formats::check_timestamp_pattern;

fn value_type() -> impl Strategy<Value = ValueType> {
    prop_oneof![
        Just(ValueType::U16),
        Just(ValueType::I16),
        Just(ValueType::U32),
        Just(ValueType::I32),
        Just(ValueType::F32),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn modbus_frames_are_classified(
        body in prop::collection::vec(any::<u8>(), 2..64),
        flip in any::<prop::sample::Index>(),
        function in 1u8..=4,
        quantity in 0u16..200,
    ) {
        prop_assert_eq!(classify_timeout(&[], answer_len(function, quantity)), FrameFault::NoAnswer);
        let mut frame = body.clone();
        frame.extend_from_slice(&crc16(&body).to_le_bytes());
        let exception = frame[1] & 0x80 != 0;
        let whole = classify_timeout(&frame, frame.len());
        if !exception || frame.len() == 5 {
            prop_assert_eq!(whole, FrameFault::Unexpected);
            // One flipped bit is always caught by the CRC.
            let i = flip.index(frame.len());
            let mut noisy = frame.clone();
            noisy[i] ^= 1;
            if noisy[1] & 0x80 == frame[1] & 0x80 {
                prop_assert_eq!(classify_timeout(&noisy, frame.len()), FrameFault::CrcError);
            }
        }
        if !exception {
            prop_assert_eq!(classify_timeout(&frame[..frame.len() - 1], frame.len()), FrameFault::Truncated);
        }
        let expected = answer_len(function, quantity);
        prop_assert!(expected >= 5);
        let _ = classify_timeout(&body, expected);
    }

    #[test]
    fn modbus_encode_decode_round_trips(
        ty in value_type(),
        w in order(),
        b in order(),
        raw in any::<u32>(),
    ) {
        let words = match ty.width() {
            1 => vec![raw as u16],
            _ => vec![(raw >> 16) as u16, raw as u16],
        };
        match decode_registers(&words, ty, 1, w, b) {
            Ok(values) => prop_assert_eq!(encode_value(values[0], ty, w, b), words),
            Err(e) => prop_assert!(ty == ValueType::F32 && e.reason() == "not_a_number"),
        }
    }

    #[test]
    fn mapping_applies_rules_and_stays_finite(
        value in json_value(),
        scale in prop_oneof![finite(), Just(1e308), Just(-1e308)],
        offset in prop_oneof![finite(), Just(1e308)],
        key in name(),
        drop in any::<bool>(),
    ) {
        let mut mapping = Mapping::default();
        if drop {
            mapping.unmapped = outpost::sources::mapping::Unmapped::Drop;
        }
        mapping.fields.insert(key.clone(), FieldRule { metric: Some("m".into()), unit: None, scale, offset, ignore: false });
        for m in mapping.map_object("dev", &value) {
            prop_assert!(m.value.is_finite());
            prop_assert!(!m.metric.is_empty());
            prop_assert!(!drop || m.metric == "m");
        }
        let wrapped = json!({ key.clone(): 2.0 });
        let expected = 2.0 * scale + offset;
        let got = mapping.map_object("dev", &wrapped);
        if expected.is_finite() {
            prop_assert_eq!(got.len(), 1);
            prop_assert_eq!(got[0].value, expected);
        } else {
            prop_assert!(got.is_empty());
        }
    }

    #[test]
    fn validated_timestamp_patterns_never_panic(
        pattern in "(%[YmdHMSsfzjbBaAeIpT:%+.]|[-: /T.a-z0-9]){0,12}",
        text in "[-0-9 :/T.a-zA-Z+]{0,30}",
    ) {
        if check_timestamp_pattern(&pattern).is_ok() {
            let f = TimestampFormat::Pattern(pattern.clone());
            if let Ok(t) = parse_timestamp(&FieldValue::Text(text.clone()), &f) {
                prop_assert!(t.timestamp() >= 946_684_800);
            }
        }
    }

    #[test]
    fn fuzz_entry_functions_hold_on_random_bytes(data in prop::collection::vec(any::<u8>(), 0..600)) {
        outpost::fuzzing::ttn_uplink(&data);
        outpost::fuzzing::chirpstack_uplink(&data);
        outpost::fuzzing::mqtt_json(&data);
        outpost::fuzzing::serial_line(&data);
        outpost::fuzzing::modbus_registers(&data);
    }

    #[test]
    fn fuzz_entry_functions_hold_on_json(sel in any::<u8>(), value in json_value(), decoded in json_value()) {
        let body = value.to_string();
        let up = ttn_uplink("dev", 3, Utc::now(), &decoded);
        let cs = chirpstack_event("d", 3, &decoded);
        for (f, payload) in [
            (outpost::fuzzing::ttn_uplink as fn(&[u8]), up.as_slice()),
            (outpost::fuzzing::chirpstack_uplink, cs.as_slice()),
            (outpost::fuzzing::mqtt_json, body.as_bytes()),
            (outpost::fuzzing::ttn_uplink, body.as_bytes()),
        ] {
            let mut data = vec![sel];
            data.extend_from_slice(payload);
            f(&data);
        }
        let mut line = vec![sel & !(1 << 2), 0, 64, 192];
        line.extend_from_slice(body.as_bytes());
        line.push(b'\n');
        outpost::fuzzing::serial_line(&line);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..config() })]

    /// Drop-ins append sources and override tables; `OUTPOST__*` variables override
    /// both; whatever the pieces, loading succeeds or names every problem.
    #[test]
    fn config_dropins_and_env_layer(
        names in prop::collection::btree_set("[a-z][a-z0-9]{0,6}", 1..4),
        batch in 1u32..5000,
        site in "[a-zA-Z ]{0,12}",
        noise in "([\\[\\]a-z_.=\"{}, \n0-9#$-]|\\[\\[sources\\]\\]\n){0,40}",
    ) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let path = dir.path().join("outpost.toml");
        std::fs::write(&path, "[agent]\ngateway_id = \"gw\"\n[storage]\nbatch_max_rows = 1\n")
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let conf_d = dir.path().join("conf.d");
        std::fs::create_dir(&conf_d).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (i, n) in names.iter().enumerate() {
            std::fs::write(conf_d.join(format!("{i}.toml")), format!("[[sources]]\ntype = \"simulated\"\nname = \"{n}\"\n"))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        std::fs::write(conf_d.join("9.toml"), format!("[storage]\nbatch_max_rows = {batch}\n[agent]\nsite = {site:?}\n"))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let config = Config::load(&path).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(config.sources.len(), names.len());
        prop_assert_eq!(config.agent.site.as_str(), site.as_str());
        let text = format!(
            "[agent]\ngateway_id = \"gw\"\n{}{noise}{}STORAGE__BATCH_MAX_ROWS={batch}\n",
            outpost::fuzzing::DROPIN_MARKER,
            outpost::fuzzing::ENV_MARKER,
        );
        let fuzz_dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        outpost::fuzzing::config_load(fuzz_dir.path(), text.as_bytes());
    }
}
