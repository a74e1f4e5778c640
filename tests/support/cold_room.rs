//! The message stream of the crash tests (`crashloop.rs`, `powercut.rs`): ChirpStack v4
//! JSON uplinks from [`DEVICES`] cold rooms, two readings each ([`FIELDS`]), whose
//! temperature crosses a threshold rule's 8 °C back and forth, so alert events fire and
//! resolve all the time while the agent is killed. Also the share of kills that land
//! during start-up.

use serde_json::{json, Value};

/// Devices the publisher cycles through.
pub const DEVICES: u64 = 4;
/// Uplinks per second, all devices together.
pub const RATE: u64 = 100;
/// Each device's temperature is hot (10 °C and a bit) for this many uplinks, then cold
/// (2 °C and a bit) as long: with [`RATE`] and [`DEVICES`] every device fires and
/// resolves about once a second.
pub const HALF_CYCLE: u64 = 25;
/// Numeric fields per uplink (`temperature`, `battery`): readings per message.
pub const FIELDS: [&str; 2] = ["temperature", "battery"];
/// One kill in [`EARLY_SHARE`] lands this early after a start: while the agent opens and
/// checks (or recovers) its database, loads alert state, connects and resumes its MQTT
/// session.
pub const EARLY_MS: std::ops::Range<u64> = 10..300;
pub const EARLY_SHARE: f64 = 0.2;

/// The `[[sources]]` table of a ChirpStack source `chirpstack` that receives the stream
/// of application `app` from the broker on 127.0.0.1:`port` as `client_id` (a persistent
/// session), reconnecting quickly.
pub fn chirpstack_source(app: &str, port: u16, client_id: &str) -> String {
    format!(
        "[[sources]]\ntype = \"chirpstack\"\nname = \"chirpstack\"\napplication_id = \"{app}\"\n\
         [sources.broker]\nhost = \"127.0.0.1\"\nport = {port}\ntls = false\n\
         client_id = \"{client_id}\"\nkeep_alive = \"5s\"\n\
         reconnect_min = \"100ms\"\nreconnect_max = \"500ms\"\n"
    )
}

/// A `[[alerts]]` table: a threshold rule on every device of the stream that fires when
/// a room goes hot and resolves when it is cold again, notifying `notifier`.
pub fn alert_rule(name: &str, notifier: &str) -> String {
    format!(
        "[[alerts]]\nname = \"{name}\"\nkind = \"threshold\"\ndevices = [\"dev-*\"]\n\
         metric = \"temperature\"\nabove = 8.0\nclear = 6.0\nseverity = \"critical\"\n\
         notifiers = [\"{notifier}\"]\n"
    )
}

/// Message `n` (from 0): (device index, fCnt). fCnt counts per device from 1.
pub fn origin(n: u64) -> (u64, u64) {
    (n % DEVICES, n / DEVICES + 1)
}

/// The device name of device index `device`, as the rule's `dev-*` matches it.
pub fn device_name(device: u64) -> String {
    format!("dev-{device}")
}

/// The ChirpStack topic of `dev_eui`'s uplinks in application `app`.
pub fn topic(app: &str, dev_eui: &str) -> String {
    format!("application/{app}/device/{dev_eui}/event/up")
}

/// The ChirpStack v4 uplink event of message `n` from device `dev_eui` of application
/// `app`, with this deduplicationId.
pub fn uplink(app: &str, dev_eui: &str, n: u64, dedup_id: &str) -> Value {
    let (device, f_cnt) = origin(n);
    let hot = (f_cnt / HALF_CYCLE) % 2 == 1;
    let temperature = if hot { 10.0 } else { 2.0 } + (f_cnt % 7) as f64 / 10.0;
    let battery = 3.0 + (f_cnt % 50) as f64 / 100.0;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    json!({
        "deduplicationId": dedup_id,
        "time": now,
        "deviceInfo": {
            "tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242",
            "applicationId": app,
            "deviceName": device_name(device),
            "devEui": dev_eui,
        },
        "fCnt": f_cnt,
        "fPort": 2,
        "object": { "temperature": temperature, "battery": battery },
        "rxInfo": [{ "gatewayId": "0016c001f153a14c", "rssi": -80, "snr": 7.5, "nsTime": now }]
    })
}
