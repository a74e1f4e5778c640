//! Entry points of the fuzz targets in `fuzz/fuzz_targets/`, shared with
//! `tests/fuzz_corpus.rs`, which replays every committed corpus file through them in the
//! normal (stable) test suite. Nothing in the agent calls this module.
//!
//! Each function takes arbitrary bytes, picks the decoder's configuration (format,
//! roles, orders, mapping, topic, split points) from the first bytes, runs the decoder
//! the way the agent runs it, and panics only when an invariant is broken: a panic, an
//! endless loop or unbounded memory is what the fuzzer reports. The invariants:
//!
//! - every reading has a finite value, a non-empty metric and device, and the source's
//!   name; a rejection has a reason and a detail;
//! - serial framing is bounded by the line limit and does not depend on how the bytes
//!   are split across reads;
//! - decoded Modbus values are finite, as many as asked for, and encode back to the
//!   registers they came from;
//! - configuration loading either succeeds or names every problem with a message.
//!
//! See `docs/reliability.md` (`## Fuzzing`) for the commands and the results.

use crate::config::Config;
use crate::model::Reading;
use crate::sources::chirpstack::{ChirpStackDecoder, DeviceIdFrom, EventMapper};
use crate::sources::mapping::{FieldRule, Mapping, Unmapped};
use crate::sources::modbus_decode::{
    answer_len, classify_timeout, crc16, decode_bits, decode_registers, encode_value, FrameFault,
    Order, ValueType,
};
use crate::sources::mqtt::{JsonDecoder, MqttJsonConfig};
use crate::sources::mqtt_client::{Decode, Rejection};
use crate::sources::serial_formats::{
    FieldRoles, Format, Frame, LineEnding, LineFramer, LineParser, TimestampFormat,
};
use crate::sources::ttn::{SimulatedUplinks, TtnDecoder, UplinkMapper};
use chrono::{DateTime, Utc};
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// The arrival time given to decoders: fixed, so a corpus file always decodes the same.
fn received_at() -> DateTime<Utc> {
    DateTime::from_timestamp(1_714_564_800, 0).unwrap_or_default() // 2024-05-01T12:00:00Z
}

/// Splits `data` after the first `\n` (in its first 128 bytes) when `take` is set:
/// (topic, payload). Otherwise the topic is `default`.
fn split_topic<'a>(data: &'a [u8], take: bool, default: &str) -> (String, &'a [u8]) {
    if take {
        if let Some(i) = data.iter().take(128).position(|&b| b == b'\n') {
            return (
                String::from_utf8_lossy(&data[..i]).into_owned(),
                &data[i + 1..],
            );
        }
    }
    (default.to_string(), data)
}

/// One of four mappings, so scale, offset, renames, per-device rules, `ignore` and
/// `unmapped = "drop"` are all exercised.
fn mapping(selector: u8) -> Mapping {
    let rule = |metric: Option<&str>, scale: f64, offset: f64, ignore: bool| FieldRule {
        metric: metric.map(str::to_string),
        unit: metric.map(|_| "°C".to_string()),
        scale,
        offset,
        ignore,
    };
    let mut m = Mapping::default();
    match selector % 4 {
        0 => {}
        1 => {
            m.fields.insert(
                "TempC_SHT".into(),
                rule(Some("temperature"), 1.0, 0.0, false),
            );
            m.fields
                .insert("BatV".into(), rule(Some("battery"), 1000.0, 0.0, false));
            m.fields
                .insert("temp".into(), rule(None, 0.1, -40.0, false));
            m.fields.insert("rssi".into(), rule(None, 1.0, 0.0, true));
        }
        2 => {
            m.unmapped = Unmapped::Drop;
            m.fields
                .insert("temperature".into(), rule(Some("t"), 1e300, 1e300, false));
            m.fields
                .insert("value".into(), rule(None, -1.0, 0.5, false));
        }
        _ => {
            m.fields
                .insert("a.b".into(), rule(Some("ab"), 2.0, 1.0, false));
            let mut dev = crate::sources::mapping::DeviceMapping::default();
            dev.fields
                .insert("temp".into(), rule(Some("probe"), 1.0, -0.3, false));
            m.devices.insert("dev".into(), dev.clone());
            m.devices.insert("probe".into(), dev);
        }
    }
    m
}

/// What every reading of `source` must satisfy.
fn check_readings(source: &str, readings: &[Reading]) {
    for r in readings {
        assert!(r.value.is_finite(), "a reading with value {}", r.value);
        assert!(!r.metric.is_empty(), "a reading without metric: {r:?}");
        assert!(!r.device.is_empty(), "a reading without device: {r:?}");
        assert_eq!(r.source, source);
    }
}

fn check_rejection(r: &Rejection) {
    assert!(!r.reason.is_empty(), "a rejection without reason: {r:?}");
    assert!(
        !r.detail.trim().is_empty(),
        "a rejection without detail: {r:?}"
    );
}

/// TTN (The Things Stack v3) uplinks. Byte 0: bits 0–1 the topic (an uplink of device
/// `dev`, a join, one taken from the input up to `\n`, an uplink without device level),
/// bit 2 a 256-byte payload limit, bit 3 drop simulated uplinks, bit 4 a `devices`
/// allow-list, bits 5–6 the mapping. The rest is the MQTT payload.
pub fn ttn_uplink(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (topic, payload) = match sel & 3 {
        0 => ("v3/app@ttn/devices/dev/up".to_string(), rest),
        1 => ("v3/app@ttn/devices/dev/join".to_string(), rest),
        2 => split_topic(rest, true, "v3/app@ttn/devices/dev/up"),
        _ => ("up".to_string(), rest),
    };
    let mut decoder = TtnDecoder {
        mapper: UplinkMapper {
            source: "ttn".into(),
            application: "app".into(),
            simulated: if sel & 8 != 0 {
                SimulatedUplinks::Drop
            } else {
                SimulatedUplinks::Tag
            },
            devices: if sel & 16 != 0 {
                vec!["dev".into(), "lht65-freezer".into()]
            } else {
                Vec::new()
            },
            mapping: Arc::new(mapping(sel >> 5)),
        },
        max_payload: if sel & 4 != 0 { 256 } else { 64 * 1024 },
    };
    match decoder.decode(&topic, payload, received_at()) {
        Ok(decoded) => {
            check_readings("ttn", &decoded.readings);
            assert!(decoded.mark.is_some(), "an uplink without its network time");
        }
        Err(rejection) => check_rejection(&rejection),
    }
    if let Ok(up) = crate::sources::ttn::decode_ttn(&topic, payload, 64 * 1024) {
        // Serialised from a struct: the same text as the JSON object of the same
        // fields (what the store kept before, and central has).
        let mut object = serde_json::json!({ "f_port": up.f_port, "f_cnt": up.f_cnt });
        if let Some(eui) = &up.dev_eui {
            object["dev_eui"] = serde_json::json!(eui);
        }
        if let Some((gateway, rssi, snr)) = &up.best_gateway {
            object["rssi"] = serde_json::json!(rssi);
            object["snr"] = serde_json::json!(snr);
            if !gateway.is_empty() {
                object["gateway_id"] = serde_json::json!(gateway);
            }
        }
        assert_eq!(up.meta().text(), object.to_string(), "the meta's text");
    }
}

/// ChirpStack v4 `event/up` messages. Byte 0: bits 0–1 the topic (an uplink, a join
/// event, one from the input up to `\n`, an uplink of another application), bit 2 a
/// 256-byte payload limit, bit 3 device id from the DevEUI, bit 4 a `devices`
/// allow-list, bits 5–6 the mapping. The rest is the MQTT payload.
pub fn chirpstack_uplink(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (topic, payload) = match sel & 3 {
        0 => (
            "application/app/device/0102030405060708/event/up".to_string(),
            rest,
        ),
        1 => (
            "application/app/device/0102030405060708/event/join".to_string(),
            rest,
        ),
        2 => split_topic(rest, true, "application/app/device/x/event/up"),
        _ => ("application/other/device/x/event/up".to_string(), rest),
    };
    let mut decoder = ChirpStackDecoder {
        mapper: EventMapper {
            source: "cs".into(),
            device_id: if sel & 8 != 0 {
                DeviceIdFrom::DevEui
            } else {
                DeviceIdFrom::Name
            },
            devices: if sel & 16 != 0 {
                vec!["probe".into(), "0102030405060708".into()]
            } else {
                Vec::new()
            },
            mapping: Arc::new(mapping(sel >> 5)),
        },
        max_payload: if sel & 4 != 0 { 256 } else { 64 * 1024 },
    };
    match decoder.decode(&topic, payload, received_at()) {
        Ok(decoded) => check_readings("cs", &decoded.readings),
        Err(rejection) => check_rejection(&rejection),
    }
}

/// The generic MQTT JSON source configurations the target picks from.
fn mqtt_configs() -> &'static [MqttJsonConfig] {
    static CONFIGS: OnceLock<Vec<MqttJsonConfig>> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        use serde_json::json;
        let variants = [
            json!({"device_segment": 1}),
            json!({"device_segment": 1, "timestamp_pointer": "/ts"}),
            json!({"device_pointer": "/id", "timestamp_pointer": "/time", "timestamp_format": "rfc3339"}),
            json!({"device_pointer": "/meta/id", "timestamp_pointer": "/meta/ts", "timestamp_format": "unix_s"}),
            json!({"device_segment": 2, "timestamp_pointer": "/ts", "timestamp_format": "unix_ms"}),
            json!({"device_segment": 1, "metrics": {"temperature": "/env/t", "humidity": "/env/h", "on": "/relay/0"}}),
            json!({"device_pointer": "/id", "metrics": {"value": "/v", "t": "/a~1b/0"}, "max_payload": "256B"}),
            json!({"device_segment": 7}),
        ];
        variants
            .into_iter()
            .filter_map(|extra| {
                let mut base = json!({
                    "name": "m",
                    "broker": {"host": "localhost"},
                    "topics": ["sensors/#"],
                });
                if let (Some(b), serde_json::Value::Object(e)) = (base.as_object_mut(), extra) {
                    b.extend(e);
                }
                serde_json::from_value(base).ok()
            })
            .collect()
    })
}

/// Generic MQTT JSON with a field mapping. Byte 0: bits 0–2 the source configuration
/// (device from a topic level or a JSON pointer, timestamp pointer and format, explicit
/// metric pointers, payload limit), bit 3 the topic taken from the input up to `\n`
/// (else `sensors/dev/temp`), bits 4–5 the mapping. The rest is the payload.
pub fn mqtt_json(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let configs = mqtt_configs();
    assert_eq!(configs.len(), 8, "every fuzz configuration is valid");
    let config = configs[usize::from(sel & 7)].clone();
    let (topic, payload) = split_topic(rest, sel & 8 != 0, "sensors/dev/temp");
    let mut decoder = JsonDecoder {
        mapping: Arc::new(mapping(sel >> 4)),
        config,
    };
    match decoder.decode(&topic, payload, received_at()) {
        Ok(decoded) => check_readings("m", &decoded.readings),
        Err(rejection) => check_rejection(&rejection),
    }
}

/// The serial line parser picked by `sel`: bits 0–2 the format, bits 3–4 the roles
/// (none; device; device, metric and unit; device and time), bits 5–6 the timestamp
/// format.
fn serial_parser(sel: u8) -> LineParser {
    let timestamp_format = match (sel >> 5) & 3 {
        0 => TimestampFormat::Rfc3339,
        1 => TimestampFormat::Unix,
        2 => TimestampFormat::UnixMs,
        _ => TimestampFormat::Pattern("%Y-%m-%d %H:%M:%S".into()),
    };
    let (device, time, metric) = match (sel >> 3) & 3 {
        0 => (false, false, false),
        1 => (true, false, false),
        2 => (true, true, true),
        _ => (true, true, false),
    };
    let roles = FieldRoles {
        device_field: device.then(|| "device".into()),
        timestamp_field: time.then(|| "time".into()),
        timestamp_format,
        metric_field: metric.then(|| "metric".into()),
        value_field: "value".into(),
        unit_field: metric.then(|| "unit".into()),
    };
    // Compiled once: building a regex per input would be most of the time spent.
    static REGEXES: OnceLock<Vec<Format>> = OnceLock::new();
    let regexes = REGEXES.get_or_init(|| {
        [
            r"^(?P<device>\w+)\s+(?P<temp>\S+)\s*(?P<value>\S*)$",
            r"^(?P<time>\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d\S*)\s+(?P<device>[\w.-]+)\s+(?P<metric>\S+)=(?P<value>\S+)(?:\s+(?P<unit>\S+))?$",
        ]
        .iter()
        .map(|pattern| {
            regex::RegexBuilder::new(pattern)
                .size_limit(1 << 20)
                .build()
                .map(Format::Regex)
                .unwrap_or(Format::KeyValue)
        })
        .collect()
    });
    let format = match sel & 7 {
        0 | 7 => Format::Json,
        1 => Format::Csv {
            delimiter: ',',
            columns: None,
        },
        2 => Format::Csv {
            delimiter: ';',
            columns: Some(
                ["device", "time", "metric", "value", "unit", "temp"]
                    .map(String::from)
                    .to_vec(),
            ),
        },
        3 => Format::KeyValue,
        4 => regexes[0].clone(),
        5 => regexes[1].clone(),
        _ => Format::Csv {
            delimiter: '\t',
            columns: None,
        },
    };
    LineParser::new(format, roles)
}

/// A frame with its bytes owned, to compare framings.
#[derive(Debug, PartialEq)]
enum OwnedFrame {
    Line(Vec<u8>),
    Overlong(usize),
}

fn frame_all(max: usize, ending: LineEnding, pieces: &[&[u8]]) -> (Vec<OwnedFrame>, usize) {
    let mut framer = LineFramer::new(max, ending);
    let mut frames = Vec::new();
    for piece in pieces {
        framer.push(piece, &mut |f| {
            frames.push(match f {
                Frame::Line(l) => OwnedFrame::Line(l.to_vec()),
                Frame::Overlong(n) => OwnedFrame::Overlong(n),
            })
        });
    }
    let partial = framer.reset();
    (frames, partial)
}

/// Serial lines: framing and every line format. Byte 0 picks the parser (see
/// `serial_parser`); byte 1: bit 0 CR instead of LF line endings, bits 1–7 the line
/// limit (`0` → 4096 bytes, else 2 × value); bytes 2 and 3 are where the stream is cut
/// into three reads (as fractions of its length). The rest is the byte stream of the
/// port. The stream is framed whole and in pieces (the frames must be equal), then
/// every line is parsed as the serial source parses it.
pub fn serial_line(data: &[u8]) {
    let [sel, framing, cut1, cut2, stream @ ..] = data else {
        return;
    };
    let ending = if framing & 1 != 0 {
        LineEnding::Cr
    } else {
        LineEnding::Lf
    };
    let max = match usize::from(framing >> 1) {
        0 => 4096,
        n => n * 2,
    };
    let at = |c: u8| stream.len() * usize::from(c) / 255;
    let (a, b) = (at(*cut1).min(at(*cut2)), at(*cut1).max(at(*cut2)));
    let whole = frame_all(max, ending, &[stream]);
    let pieces = frame_all(max, ending, &[&stream[..a], &stream[a..b], &stream[b..]]);
    assert_eq!(whole, pieces, "framing depends on how the bytes were split");
    let end = match ending {
        LineEnding::Lf => b'\n',
        LineEnding::Cr => b'\r',
    };
    assert!(whole.1 <= stream.len());
    let mut parser = serial_parser(*sel);
    for frame in &whole.0 {
        match frame {
            OwnedFrame::Line(line) => {
                assert!(line.len() <= max, "a line of {} > {max} bytes", line.len());
                assert!(!line.contains(&end), "a line with its ending inside");
                let text = String::from_utf8_lossy(line);
                match parser.parse(&text) {
                    Ok(Some(parsed)) => {
                        assert!(!parsed.values.is_empty(), "a parsed line without values");
                        for v in &parsed.values {
                            assert!(v.value.is_finite(), "{} = {}", v.key, v.value);
                            assert!(!v.key.is_empty(), "a value without a name: {parsed:?}");
                        }
                        if let Some(d) = &parsed.device {
                            assert!(!d.is_empty() && d.len() <= 64, "device {d:?}");
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        assert!(!e.reason().is_empty());
                        let _ = e.to_string();
                    }
                }
            }
            OwnedFrame::Overlong(n) => assert!(*n > max, "overlong {n} <= {max}"),
        }
    }
}

/// Modbus register and bit decoding, and the RTU frame checks. Byte 0: bits 0–2 the
/// value type, bit 3 little word order, bit 4 little byte order, bits 5–7 the function
/// code for [`answer_len`]; byte 1 a value count. The rest is read as big-endian
/// registers, as bits (LSB first, as Modbus sends coils), and as a raw RTU frame.
pub fn modbus_registers(data: &[u8]) {
    let [sel, count, rest @ ..] = data else {
        return;
    };
    let ty = match sel & 7 {
        0 | 5 => ValueType::U16,
        1 | 6 => ValueType::I16,
        2 => ValueType::U32,
        3 => ValueType::I32,
        _ => ValueType::F32,
    };
    let order = |bit: u8| {
        if sel & bit != 0 {
            Order::Little
        } else {
            Order::Big
        }
    };
    let (word_order, byte_order) = (order(8), order(16));
    let words: Vec<u16> = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let width = usize::from(ty.width());
    let fitting = u16::try_from(words.len() / width).unwrap_or(u16::MAX);
    for c in [u16::from(*count), fitting] {
        match decode_registers(&words, ty, c, word_order, byte_order) {
            Ok(values) => {
                assert_eq!(values.len(), usize::from(c));
                for (value, chunk) in values.iter().zip(words.chunks_exact(width)) {
                    assert!(value.is_finite());
                    let again = encode_value(*value, ty, word_order, byte_order);
                    assert_eq!(again, chunk, "{value} does not encode back");
                }
            }
            Err(e) => {
                assert!(!e.reason().is_empty());
                let _ = e.to_string();
            }
        }
    }
    let bits: Vec<bool> = rest
        .iter()
        .flat_map(|byte| (0..8).map(move |i| byte & (1 << i) != 0))
        .collect();
    let fitting_bits = u16::try_from(bits.len()).unwrap_or(u16::MAX);
    for c in [
        u16::from(*count),
        fitting_bits,
        fitting_bits.saturating_sub(7),
    ] {
        if let Ok(values) = decode_bits(&bits, c) {
            assert_eq!(values.len(), usize::from(c));
            assert!(values.iter().all(|v| *v == 0.0 || *v == 1.0));
        }
    }
    let function = (sel >> 5) + 1;
    let expected = answer_len(function, u16::from(*count));
    let _ = classify_timeout(rest, expected).reason();
    // The same bytes with a correct CRC: a whole valid frame is "unexpected", never a
    // CRC error.
    let mut frame = rest.to_vec();
    frame.extend_from_slice(&crc16(rest).to_le_bytes());
    let fault = classify_timeout(&frame, frame.len());
    let exception = frame.get(1).is_some_and(|f| f & 0x80 != 0);
    if frame.len() >= 4 && (!exception || frame.len() == 5) {
        assert_eq!(fault, FrameFault::Unexpected, "{frame:02x?}");
    }
}

/// The marker that starts a drop-in (`conf.d/NN.toml`) in a `config_load` input.
pub const DROPIN_MARKER: &str = "\n#%dropin\n";
/// The marker that starts `OUTPOST__*` environment overrides (`NAME=value` lines).
pub const ENV_MARKER: &str = "\n#%env\n";

/// Configuration loading from TOML text with drop-ins and environment overrides. The
/// input is the main file, then up to four drop-ins each after [`DROPIN_MARKER`], then
/// optionally `NAME=value` lines after [`ENV_MARKER`], set as `OUTPOST__NAME` while
/// loading (so only one load may run at a time in a process). `dir` is an empty
/// directory the function owns. `${VAR}` expansion sees the real environment.
pub fn config_load(dir: &Path, data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (files, env) = match text.split_once(ENV_MARKER) {
        Some((files, env)) => (files, Some(env)),
        None => (&*text, None),
    };
    let mut parts = files.split(DROPIN_MARKER);
    let main = parts.next().unwrap_or_default();
    let conf_d = dir.join("conf.d");
    let _ = std::fs::remove_dir_all(&conf_d);
    let path = dir.join("outpost.toml");
    // Invalid UTF-8 is a case of its own: write the raw bytes when there is no marker.
    let main_bytes = if env.is_none() && !files.contains(DROPIN_MARKER) {
        data
    } else {
        main.as_bytes()
    };
    if std::fs::write(&path, main_bytes).is_err() {
        return;
    }
    for (i, dropin) in parts.take(4).enumerate() {
        if std::fs::create_dir_all(&conf_d).is_err()
            || std::fs::write(conf_d.join(format!("{i:02}.toml")), dropin).is_err()
        {
            return;
        }
    }
    let vars: Vec<(String, String)> = env
        .into_iter()
        .flat_map(str::lines)
        .filter_map(|l| l.split_once('='))
        .filter(|(k, v)| {
            let k = k.trim();
            !k.is_empty()
                && k.len() <= 64
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !v.contains('\0')
        })
        .take(8)
        .map(|(k, v)| {
            (
                format!("OUTPOST__{}", k.trim().to_uppercase()),
                v.to_string(),
            )
        })
        .collect();
    for (k, v) in &vars {
        std::env::set_var(k, v);
    }
    let result = Config::load(&path);
    for (k, _) in &vars {
        std::env::remove_var(k);
    }
    match result {
        Ok(config) => {
            let _ = config.to_redacted_toml();
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "Err without any problem");
            for e in &errors.0 {
                assert!(
                    !e.message.trim().is_empty(),
                    "a problem without a message: {e:?}"
                );
            }
            let _ = errors.to_string();
        }
    }
}
