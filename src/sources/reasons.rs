//! Every reason a source rejects input for, with its usual cause and what fixes it.
//!
//! This is the one list: the log line of the first rejection of each reason, `outpost
//! status`, `outpost rejected` and docs/technician.md all quote it (tests/docs.rs
//! checks the document against it, and that every reason the sources use is here).

/// One rejection reason as a technician reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RejectReason {
    /// The label counted in `/metrics` and kept in the `rejected` table.
    pub reason: &'static str,
    /// The source types that use it.
    pub sources: &'static str,
    /// What usually causes it.
    pub cause: &'static str,
    /// What to do about it: printed as the hint.
    pub fix: &'static str,
}

const fn r(
    reason: &'static str,
    sources: &'static str,
    cause: &'static str,
    fix: &'static str,
) -> RejectReason {
    RejectReason {
        reason,
        sources,
        cause,
        fix,
    }
}

/// All reasons, grouped by source type.
pub const REASONS: &[RejectReason] = &[
    // MQTT sources (ttn, chirpstack, mqtt) and the TTN Storage Integration backfill.
    r(
        "too_large",
        "ttn, chirpstack, mqtt",
        "the message is larger than the source's `max_payload`",
        "raise `max_payload` of the source if such messages are genuine; otherwise find the publisher sending them",
    ),
    r(
        "invalid_json",
        "ttn, chirpstack, mqtt",
        "the payload is not JSON (plain text, binary or cut off)",
        "make the publisher send JSON; look at the payload with `outpost rejected --reason invalid_json`",
    ),
    r(
        "wrong_type",
        "ttn, chirpstack",
        "the payload is JSON but not in the network server's uplink format (e.g. a number where an object belongs)",
        "check that the topic carries this source type's uplink events (a `ttn` source reads The Things Stack, `chirpstack` ChirpStack v4); use an `mqtt` source for other JSON",
    ),
    r(
        "protobuf",
        "chirpstack",
        "ChirpStack publishes its events as Protobuf, not JSON",
        "set `json = true` in [integration.mqtt] of chirpstack.toml (ChirpStack's MQTT integration) and restart ChirpStack",
    ),
    r(
        "not_an_uplink",
        "ttn, chirpstack",
        "a message on an uplink topic that is not an uplink event",
        "check the source's `topic`; other event types (join, status, ack) are ignored without being kept",
    ),
    r(
        "no_result",
        "ttn (backfill)",
        "a Storage Integration record with neither `result` nor `error` (a proxy or server answering something else)",
        "check `backfill.url` points at The Things Stack's Storage Integration; look at the record with `outpost rejected --reason no_result`",
    ),
    r(
        "no_deduplication_id",
        "chirpstack",
        "a ChirpStack uplink event without `deduplicationId`, which Outpost needs to store it exactly once",
        "upgrade ChirpStack to v4; v3 events are not supported",
    ),
    r(
        "no_device",
        "ttn, chirpstack, mqtt",
        "the message names no device (no device id in the event, or nothing at the configured `device_segment`/`device_pointer`)",
        "for `mqtt` sources fix `device_segment` or `device_pointer`; for LoRaWAN sources check the network server's integration",
    ),
    r(
        "bad_time",
        "ttn, chirpstack, mqtt",
        "the message's time is missing or not a time Outpost can read",
        "for `mqtt` sources fix `timestamp_pointer` and `timestamp_format`, or remove them to use the arrival time",
    ),
    r(
        "unknown_device",
        "ttn, chirpstack",
        "the device is not in the source's `devices` list",
        "add the device to `devices` of the source, or set `devices = []` to take every device",
    ),
    r(
        "no_decoded_payload",
        "ttn",
        "the uplink has no `decoded_payload`: the device has no payload formatter",
        "set up a payload formatter for the device (or its application) in The Things Stack Console",
    ),
    r(
        "no_object",
        "chirpstack",
        "the uplink has no `object`: the device profile has no codec",
        "set up a codec (JavaScript functions) in the device profile in ChirpStack",
    ),
    r(
        "simulated",
        "ttn",
        "an uplink sent with the Console's \"simulate uplink\" (counted, not kept)",
        "nothing, if intended; set `simulated = \"tag\"` to store such uplinks flagged",
    ),
    // Serial lines.
    r(
        "not_json",
        "serial (format json)",
        "a line that is not JSON",
        "check `baud` and the other settings in [sources.port] (garbage usually means a wrong speed), or the source's `format`",
    ),
    r(
        "not_json_object",
        "serial (format json)",
        "a JSON line that is not an object",
        "check the sensor's output mode; each line must be one JSON object",
    ),
    r(
        "csv_no_header",
        "serial (format csv)",
        "a data line arrived before the sensor's header line",
        "set `columns` in [sources.csv] for a sensor that never prints a header; otherwise wait for it to print its header (often at power-up)",
    ),
    r(
        "csv_column_count",
        "serial (format csv)",
        "a line with another number of columns than the header",
        "check `delimiter` in [sources.csv] and the sensor's output; a garbled line now and then is noise",
    ),
    r(
        "no_key_value_pairs",
        "serial (format key-value)",
        "a line without any `key=value` pair",
        "check the sensor's output mode, or the source's `format`",
    ),
    r(
        "regex_no_match",
        "serial (format regex)",
        "a line the configured `pattern` does not match",
        "test `pattern` against a line shown by `outpost rejected --reason regex_no_match`",
    ),
    r(
        "missing_device",
        "serial",
        "the line has no device field (the key named by `device_field`)",
        "fix `device_field` in [sources.fields], or set `device` there for a port with one sensor",
    ),
    r(
        "bad_device",
        "serial",
        "the device id on the line is empty, too long or has characters other than letters, digits, '.', '_', '-', ':'",
        "fix the sensor's id, or set `device` in [sources.fields] for the port",
    ),
    r(
        "missing_metric",
        "serial",
        "the line has no metric field (the key named by `metric_field`)",
        "fix `metric_field` in [sources.fields] to the sensor's key",
    ),
    r(
        "bad_metric",
        "serial",
        "the metric name on the line is empty, too long or has characters other than letters, digits, '.', '_', '-', ':'",
        "map the raw name to a clean one in [sources.mapping.fields]",
    ),
    r(
        "bad_value",
        "serial",
        "a value that is not a number (text, NaN or infinite)",
        "check the sensor; a sensor writing \"NaN\" or \"err\" has no value to give",
    ),
    r(
        "bad_timestamp",
        "serial",
        "the line's time field is not a time Outpost can read",
        "fix `timestamp_field` or `timestamp_format` in [sources.fields], or remove them to use the arrival time",
    ),
    r(
        "no_values",
        "serial",
        "a line that parsed but holds no numeric value",
        "check the sensor's output and the source's field mapping",
    ),
    r(
        "truncated_line",
        "serial",
        "a line cut off when the port closed (unplug, power loss)",
        "nothing, if the sensor was unplugged; otherwise check the cable and the USB power",
    ),
    r(
        "line_too_long",
        "serial",
        "more bytes than `max_line_length` without a line ending",
        "check `baud` in [sources.port] and `line_ending`; raise `max_line_length` for long lines",
    ),
    r(
        "implausible_value",
        "serial, modbus-rtu",
        "a value outside the plausible range (`min`/`max` in `[sources.plausible.<metric>]`, or of the Modbus register)",
        "check the sensor, or widen the range if the value is genuine",
    ),
    // Modbus RTU.
    r(
        "modbus_exception",
        "modbus-rtu",
        "the slave answered with a Modbus exception (illegal function or address, device busy or failing)",
        "check the register's `function` and `address` against the device's manual",
    ),
    r(
        "wrong_register_count",
        "modbus-rtu",
        "the slave sent another number of registers than asked for",
        "check the register's `type` and `count` against the device's manual",
    ),
    r(
        "not_a_number",
        "modbus-rtu",
        "an f32 register holding NaN or infinity (many devices say \"no value\" this way)",
        "check the sensor attached to the device",
    ),
    r(
        "no_answer",
        "modbus-rtu",
        "the slave did not answer in time",
        "check the slave's `id`, the bus wiring (A/B), `baud` and `parity` in [sources.port] and the slave's power; raise the slave's `timeout` for slow devices",
    ),
    r(
        "crc_error",
        "modbus-rtu",
        "an answer with a wrong checksum (electrical noise)",
        "check the termination resistors, the cable's shield and its length",
    ),
    r(
        "truncated_frame",
        "modbus-rtu",
        "an answer shorter than a Modbus frame",
        "check `baud` and `parity` in [sources.port], and the termination at both ends of the bus",
    ),
    r(
        "unexpected_frame",
        "modbus-rtu",
        "a valid frame that was not the answer (another slave or a late answer)",
        "give every slave its own `id`; raise the slave's `timeout` if answers arrive late",
    ),
    r(
        "bad_frame",
        "modbus-rtu",
        "the Modbus byte stream broke or the answer did not fit the request (noise, or a second master on the bus)",
        "make sure Outpost is the only master on the bus; check the wiring and termination",
    ),
];

/// The entry of `reason`, if it is one.
pub fn reason(reason: &str) -> Option<&'static RejectReason> {
    REASONS.iter().find(|r| r.reason == reason)
}

/// What to do about `reason`; empty for a label not in [`REASONS`].
pub fn fix_for(reason: &str) -> &'static str {
    self::reason(reason).map_or("", |r| r.fix)
}

/// Whether `e` (from parsing `payload`) means valid JSON of another shape than expected
/// (`wrong_type`), rather than a payload that is not JSON at all (`invalid_json`):
/// serde_json reads plain text like `23.5 C` as far as the number and reports a data
/// error, which alone would look like a wrong type.
pub fn is_json_of_wrong_shape(e: &serde_json::Error, payload: &[u8]) -> bool {
    e.classify() == serde_json::error::Category::Data
        && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_unique_and_complete_sentences() {
        let mut seen = std::collections::HashSet::new();
        for r in REASONS {
            assert!(seen.insert(r.reason), "{} twice", r.reason);
            assert!(
                r.reason
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}",
                r.reason
            );
            for text in [r.cause, r.fix] {
                assert!(!text.is_empty() && !text.contains('|'), "{}", r.reason);
            }
        }
        assert!(fix_for("protobuf").contains("json = true"));
        assert_eq!(fix_for("no_such_reason"), "");
    }

    #[test]
    fn plain_text_is_not_json_of_the_wrong_shape() {
        #[derive(Debug, serde::Deserialize)]
        struct Event {
            #[allow(dead_code)]
            a: u32,
        }
        let wrong_shape = |payload: &[u8]| match serde_json::from_slice::<Event>(payload) {
            Ok(_) => panic!("{payload:?} parsed"),
            Err(e) => is_json_of_wrong_shape(&e, payload),
        };
        for text in [
            &b"23.5 C"[..],
            b"12",
            b"hello",
            b"true story",
            b"{\"a\": ",
            b"\xff\xfe",
        ] {
            assert_eq!(
                wrong_shape(text),
                text == b"12",
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
        assert!(wrong_shape(b"{\"a\": \"x\"}"));
        assert!(wrong_shape(b"[\"x\"]"));
    }
}
