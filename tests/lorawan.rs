//! LoRaWAN ingestion against real peers: mosquitto (password auth, a TLS listener with a
//! CA made in the test) and a scripted HTTP server speaking the Storage Integration's
//! newline-delimited JSON. The agent is the real `outpost run` binary, so a SIGKILL is
//! a real crash.

mod support;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::agent::{outpost, Agent};
use support::{wait_until, HttpReceiver, Mosquitto, Reply, TestCa};

const APP: &str = "bistro-cold-chain";
const USER: &str = "bistro-cold-chain@ttn";
const API_KEY: &str = "NNSXS.TESTKEY";
/// Generous: the box is shared and loaded.
const DEADLINE: Duration = Duration::from_secs(60);

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn db(dir: &Path) -> PathBuf {
    dir.join("outpost.db")
}

/// The real agent on `config` in `dir`, with outpost's debug lines in its log.
fn start_agent(dir: &Path, config: &str) -> Agent {
    Agent::new(dir, config)
        .log_filter("info,outpost=debug")
        .deadline(DEADLINE)
        .start()
}

fn publish(m: &Mosquitto, topic: &str, payload: &[u8], qos: u8) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        m.host(),
        "-p",
        &m.port().to_string(),
        "-t",
        topic,
        "-q",
        &qos.to_string(),
        "-s",
    ]);
    if let Some((user, pass)) = m.credentials() {
        cmd.args(["-u", user, "-P", pass]);
    }
    let mut child = cmd.stdin(Stdio::piped()).spawn().expect("mosquitto_pub");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(payload).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "mosquitto_pub failed for {topic}");
}

fn ttn_topic(device: &str, kind: &str) -> String {
    format!("v3/{USER}/devices/{device}/{kind}")
}

/// A TTN uplink for `device` with NS time `ns` (AS time 200ms later) and these fields.
fn ttn_uplink(
    device: &str,
    f_cnt: u32,
    ns: chrono::DateTime<chrono::Utc>,
    decoded: Value,
) -> Value {
    let mut up = fixture("ttn-uplink.json");
    up["end_device_ids"]["device_id"] = json!(device);
    up["received_at"] = json!((ns + chrono::Duration::milliseconds(200)).to_rfc3339());
    up["uplink_message"]["f_cnt"] = json!(f_cnt);
    up["uplink_message"]["received_at"] = json!(ns.to_rfc3339());
    up["uplink_message"]["decoded_payload"] = decoded;
    up
}

fn ttn_config(dir: &Path, broker: &str, backfill: &str) -> String {
    format!(
        r#"
[agent]
gateway_id = "test-gw"
[storage]
path = "{db}"
batch_max_delay = "20ms"
[[sources]]
type = "ttn"
name = "ttn"
application = "{APP}"
tenant = "ttn"
api_key = "{API_KEY}"
simulated = "drop"
[sources.broker]
{broker}
reconnect_min = "100ms"
reconnect_max = "1s"
[sources.backfill]
{backfill}
"#,
        db = db(dir).display()
    )
}

/// The agent with a TTN source on `m` (plain MQTT) and this `[sources.backfill]`.
fn start_ttn_agent(dir: &Path, m: &Mosquitto, backfill: &str) -> Agent {
    let broker = format!("host = \"127.0.0.1\"\nport = {}\ntls = false", m.port());
    start_agent(dir, &ttn_config(dir, &broker, backfill))
}

/// Publishes `payload` every 300ms until `cond` holds: the agent subscribes at some
/// point after start, and QoS 0 messages before that are not delivered.
fn publish_until(
    m: &Mosquitto,
    topic: &str,
    payload: &[u8],
    agent: &Agent,
    mut cond: impl FnMut() -> bool,
) {
    let ok = wait_until(DEADLINE, || {
        if cond() {
            return true;
        }
        publish(m, topic, payload, 0);
        std::thread::sleep(Duration::from_millis(300));
        cond()
    });
    assert!(
        ok,
        "the agent never stored the probe; agent log:\n{}\nbroker log:\n{}",
        agent.log(),
        m.log()
    );
}

#[test]
fn ttn_uplinks_over_tls_with_password_auth() {
    let ca = TestCa::new();
    let m = Mosquitto::builder()
        .password(USER, API_KEY)
        .tls(&ca)
        .start();
    let dir = tempfile::tempdir().unwrap();
    let broker = format!(
        "host = \"127.0.0.1\"\nport = {}\ntls = true\nca_file = \"{}\"",
        m.tls_port(),
        ca.ca_pem().display()
    );
    let agent = start_agent(
        dir.path(),
        &ttn_config(dir.path(), &broker, "enabled = false"),
    );
    let now = chrono::Utc::now();

    // Probe until subscribed; the fixture itself is the probe.
    let fixture_bytes = serde_json::to_vec(&fixture("ttn-uplink.json")).unwrap();
    publish_until(
        &m,
        &ttn_topic("walkin-freezer-2", "up"),
        &fixture_bytes,
        &agent,
        || {
            agent.try_count("SELECT COUNT(*) FROM readings WHERE device = 'walkin-freezer-2'")
                == Some(5)
        },
    );

    // Omitted fields: no f_cnt, f_port, dev_eui or snr.
    let mut omitted = ttn_uplink(
        "probe-3",
        0,
        now,
        json!({"t": 1.25, "nested": {"ok": true}}),
    );
    omitted["uplink_message"]
        .as_object_mut()
        .unwrap()
        .remove("f_cnt");
    omitted["uplink_message"]
        .as_object_mut()
        .unwrap()
        .remove("f_port");
    omitted["end_device_ids"]
        .as_object_mut()
        .unwrap()
        .remove("dev_eui");
    for md in omitted["uplink_message"]["rx_metadata"]
        .as_array_mut()
        .unwrap()
    {
        md.as_object_mut().unwrap().remove("snr");
    }
    publish(
        &m,
        &ttn_topic("probe-3", "up"),
        &serde_json::to_vec(&omitted).unwrap(),
        0,
    );
    // A simulated uplink (dropped as configured).
    let mut simulated = ttn_uplink("sim-dev", 7, now, json!({"t": 9.0}));
    simulated["simulated"] = json!(true);
    publish(
        &m,
        &ttn_topic("sim-dev", "up"),
        &serde_json::to_vec(&simulated).unwrap(),
        0,
    );
    // Join and downlink messages on sibling topics, and a location update.
    let join = json!({"end_device_ids": {"device_id": "joiner"}, "join_accept": {"received_at": now.to_rfc3339()}});
    publish(
        &m,
        &ttn_topic("joiner", "join"),
        join.to_string().as_bytes(),
        0,
    );
    let down = json!({"end_device_ids": {"device_id": "joiner"}, "downlink_queued": {"f_port": 1, "frm_payload": "AQ=="}});
    publish(
        &m,
        &ttn_topic("joiner", "down/queued"),
        down.to_string().as_bytes(),
        0,
    );
    publish(
        &m,
        &ttn_topic("joiner", "location/solved"),
        b"{\"location\": {}}",
        0,
    );
    // Garbage and wrong types on the uplink topic.
    publish(&m, &ttn_topic("bad", "up"), b"\xff\xfe not json at all", 0);
    let mut wrong = ttn_uplink("bad-type", 1, now, json!({"t": 1}));
    wrong["uplink_message"]["f_cnt"] = json!("one");
    publish(
        &m,
        &ttn_topic("bad-type", "up"),
        &serde_json::to_vec(&wrong).unwrap(),
        0,
    );
    // A last good uplink: once it is stored, everything before it was handled.
    let last = ttn_uplink("last", 3, now, json!({"v": 2}));
    publish(
        &m,
        &ttn_topic("last", "up"),
        &serde_json::to_vec(&last).unwrap(),
        0,
    );

    assert!(
        wait_until(DEADLINE, || agent
            .count("SELECT COUNT(*) FROM readings WHERE device = 'last'")
            == 1
            && agent.count("SELECT COUNT(*) FROM rejected") >= 2),
        "agent log:\n{}",
        agent.log()
    );
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM readings WHERE device = 'walkin-freezer-2'"),
        5,
        "the probe was deduplicated"
    );
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM readings WHERE device = 'probe-3'"),
        2
    );
    let meta = agent.strings("SELECT meta FROM readings WHERE device = 'probe-3' AND metric = 't'");
    let meta: Value = serde_json::from_str(&meta[0]).unwrap();
    assert_eq!(meta["f_cnt"], 0);
    assert_eq!(meta["f_port"], 0);
    assert_eq!(meta["snr"], 0.0);
    assert!(meta.get("dev_eui").is_none());
    assert_eq!(agent.count("SELECT COUNT(*) FROM readings WHERE device IN ('sim-dev', 'joiner', 'bad', 'bad-type')"), 0);
    let reasons = agent.strings("SELECT reason FROM rejected ORDER BY id");
    assert_eq!(
        reasons,
        vec!["invalid_json", "wrong_type"],
        "join/down/location are not even received"
    );
    // observed_at is the NS time of the fixture; the uid is stable.
    let observed =
        agent.count("SELECT observed_at FROM readings WHERE device = 'walkin-freezer-2' LIMIT 1");
    let ns_time = chrono::DateTime::parse_from_rfc3339("2026-11-26T03:14:07.705112233Z").unwrap();
    assert_eq!(
        observed,
        ns_time.timestamp_micros(),
        "the NS received_at, not the AS one"
    );
    let fixture_meta: Value = serde_json::from_str(
        &agent.strings("SELECT meta FROM readings WHERE device = 'walkin-freezer-2' LIMIT 1")[0],
    )
    .unwrap();
    assert_eq!(fixture_meta["rssi"], -97.0);
    assert_eq!(fixture_meta["dev_eui"], "A84041C2A1B2C3D4");
    assert_eq!(fixture_meta["gateway_id"], "bistro-gw-01");
    assert!(agent.log().contains("Connected to the MQTT broker"));
}

#[test]
fn ttn_wrong_api_key_is_reported_and_retried() {
    let m = Mosquitto::builder().password(USER, "the-right-key").start();
    let dir = tempfile::tempdir().unwrap();
    let agent = start_ttn_agent(dir.path(), &m, "enabled = false");
    assert!(
        wait_until(DEADLINE, || agent
            .log()
            .matches("refused the connection")
            .count()
            >= 3),
        "agent log:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("not authorised") && log.contains("API key"),
        "{log}"
    );
    assert!(!log.contains(API_KEY), "the API key is never logged");
}

#[test]
fn chirpstack_qos1_redelivered_after_sigkill_and_stored_once() {
    let m = Mosquitto::builder()
        .password("chirpstack", "cs-pass")
        .start();
    let dir = tempfile::tempdir().unwrap();
    let app = "1f6a3c2e-9d4b-4e8a-b7c5-2a1d0e9f8b7c";
    let config = |delay: &str| {
        format!(
            r#"
[agent]
gateway_id = "test-gw"
[storage]
path = "{db}"
batch_max_delay = "{delay}"
batch_max_rows = 100000
[[sources]]
type = "chirpstack"
name = "chirpstack"
application_id = "{app}"
[sources.broker]
host = "127.0.0.1"
port = {port}
tls = false
username = "chirpstack"
password = "cs-pass"
client_id = "outpost-test-cs"
reconnect_min = "100ms"
reconnect_max = "1s"
"#,
            db = db(dir.path()).display(),
            port = m.port()
        )
    };
    let topic = format!("application/{app}/device/a84041c2a1b2c3d4/event/up");
    let event = |id: &str| {
        let mut e = fixture("chirpstack-up.json");
        e["deduplicationId"] = json!(id);
        serde_json::to_vec(&e).unwrap()
    };

    // 1. First run: establishes the persistent session and its subscription.
    let mut agent = start_agent(dir.path(), &config("50ms"));
    let probe = event("probe");
    let ok = wait_until(DEADLINE, || {
        publish(&m, &topic, &probe, 1);
        std::thread::sleep(Duration::from_millis(300));
        agent.try_count("SELECT COUNT(*) FROM readings") == Some(4)
    });
    assert!(ok, "probe never stored; agent log:\n{}", agent.log());
    agent.terminate();

    // 2. While the agent is away the broker queues QoS 1 events for its session.
    for i in 0..5 {
        publish(&m, &topic, &event(&format!("queued-{i}")), 1);
    }
    publish(&m, &topic, &event("queued-0"), 1); // a duplicate event from ChirpStack

    // 3. Start with the store writer held before its commit (a long commit window is
    // not enough: any write operation, such as the health probe or the audit entry of
    // the start, commits the readings queued with it) and kill it between receipt and
    // commit.
    let mut agent = Agent::new(dir.path(), &config("10s"))
        .log_filter("info,outpost=debug")
        .deadline(DEADLINE)
        .env(
            outpost::progress::fault::ENV,
            outpost::progress::fault::STORE_WRITER_HANG,
        )
        .start();
    let connects = |m: &Mosquitto| m.log().matches("as outpost-test-cs").count();
    assert!(
        wait_until(DEADLINE, || connects(&m) >= 2),
        "broker log:\n{}",
        m.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    agent.kill();
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM readings"),
        4,
        "nothing of the queued events was committed"
    );

    // 4. Restart: the broker redelivers the unacknowledged events; each is stored once.
    let agent = start_agent(dir.path(), &config("50ms"));
    assert!(
        wait_until(DEADLINE, || agent.count("SELECT COUNT(*) FROM readings")
            >= 24),
        "agent log:\n{}\nbroker log:\n{}",
        agent.log(),
        m.log()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM readings"),
        24,
        "6 events × 4 fields, one duplicate"
    );
    assert_eq!(agent.count("SELECT COUNT(DISTINCT uid) FROM readings"), 24);
    let devices = agent.strings("SELECT DISTINCT device FROM readings");
    assert_eq!(devices, vec!["walkin-freezer-2"]);
    let meta: Value =
        serde_json::from_str(&agent.strings("SELECT meta FROM readings LIMIT 1")[0]).unwrap();
    assert_eq!(meta["tags"]["room"], "kitchen");

    // 5. Acknowledged now: a later restart gets nothing again.
    drop(agent);
    let agent = start_agent(dir.path(), &config("50ms"));
    assert!(wait_until(DEADLINE, || connects(&m) >= 4));
    // A Protobuf payload is reported with the hint and acknowledged (not redelivered).
    let mut pb = vec![0x0a, 36];
    pb.extend_from_slice(b"7c1d2a9e-5b0f-4f3e-9a61-0d8e2b4c6f10");
    publish(&m, &topic, &pb, 1);
    assert!(
        wait_until(DEADLINE, || agent
            .count("SELECT COUNT(*) FROM rejected WHERE reason = 'protobuf'")
            == 1),
        "agent log:\n{}",
        agent.log()
    );
    assert!(agent.log().contains("json = true"), "the hint is logged");
    assert_eq!(agent.count("SELECT COUNT(*) FROM readings"), 24);
}

#[test]
fn generic_mqtt_json_with_pointers() {
    let m = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[storage]
path = "{db}"
batch_max_delay = "20ms"
[[sources]]
type = "mqtt"
name = "local"
topics = ["sensors/+/json"]
device_segment = 1
timestamp_pointer = "/ts"
metrics = {{ temperature = "/env/t", humidity = "/env/h", missing = "/nope" }}
[sources.broker]
host = "127.0.0.1"
port = {port}
tls = false
[sources.mapping.fields]
temperature = {{ unit = "°C" }}
humidity = {{ metric = "rh", unit = "%" }}
"#,
        db = db(dir.path()).display(),
        port = m.port()
    );
    let agent = start_agent(dir.path(), &config);
    let payload = br#"{"env": {"t": 4.5, "h": 40}, "ts": "2026-01-01T00:00:00Z", "name": "x"}"#;
    publish_until(&m, "sensors/fridge-1/json", payload, &agent, || {
        agent.try_count("SELECT COUNT(*) FROM readings") == Some(2)
    });
    publish(&m, "sensors/fridge-1/json", b"not json", 0);
    assert!(wait_until(DEADLINE, || agent
        .count("SELECT COUNT(*) FROM rejected")
        == 1));
    assert_eq!(
        agent.strings("SELECT metric || '|' || device || '|' || COALESCE(unit, '') FROM readings ORDER BY metric"),
        vec!["rh|fridge-1|%", "temperature|fridge-1|°C"]
    );
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM readings WHERE observed_at = 1767225600000000"),
        2
    );
}

/// A scripted Storage Integration: answers 401, then 404, then hangs, then serves its
/// uplinks after `after`, `limit` per page, ordered by AS `received_at`.
struct StorageIntegration {
    uplinks: Arc<Mutex<Vec<Value>>>,
    requests: Arc<AtomicUsize>,
}

fn query_param(path: &str, key: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.replace("%3A", ":").replace("%2B", "+"))
    })
}

impl StorageIntegration {
    fn install(h: &HttpReceiver) -> StorageIntegration {
        let uplinks: Arc<Mutex<Vec<Value>>> = Arc::default();
        let requests = Arc::new(AtomicUsize::new(0));
        let (u, r) = (uplinks.clone(), requests.clone());
        h.set_handler(move |req| {
            let n = r.fetch_add(1, Ordering::SeqCst);
            match n {
                0 => return Reply::status(401).body(r#"{"code":16,"message":"unauthenticated"}"#),
                1 => return Reply::status(404).body(r#"{"code":5,"message":"not found"}"#),
                2 => return Reply::ok().delay(Duration::from_secs(4)),
                _ => {}
            }
            let after = query_param(&req.path, "after")
                .and_then(|a| chrono::DateTime::parse_from_rfc3339(&a).ok())
                .map(|t| t.with_timezone(&chrono::Utc));
            let limit: usize = query_param(&req.path, "limit")
                .and_then(|l| l.parse().ok())
                .unwrap_or(1000);
            let mut selected: Vec<Value> = u
                .lock()
                .unwrap()
                .iter()
                .filter(|up| {
                    let at =
                        chrono::DateTime::parse_from_rfc3339(up["received_at"].as_str().unwrap())
                            .unwrap();
                    after.is_none_or(|a| at > a)
                })
                .cloned()
                .collect();
            selected.sort_by_key(|up| up["received_at"].as_str().unwrap().to_string());
            selected.truncate(limit);
            let lines: Vec<String> = selected
                .iter()
                .map(|up| json!({ "result": up }).to_string())
                .collect();
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            Reply::ok().ndjson_lines(&lines, Duration::from_millis(5))
        });
        StorageIntegration { uplinks, requests }
    }

    fn add(&self, up: Value) {
        self.uplinks.lock().unwrap().push(up);
    }
}

#[test]
fn ttn_backfill_fills_gaps_dedupes_overlap_and_survives_errors() {
    let mut m = Mosquitto::builder().password(USER, API_KEY).start();
    let h = HttpReceiver::start();
    let storage = StorageIntegration::install(&h);
    let dir = tempfile::tempdir().unwrap();
    let round = |t: chrono::DateTime<chrono::Utc>| {
        chrono::DateTime::from_timestamp(t.timestamp(), 0).unwrap()
    };
    let now = round(chrono::Utc::now());
    let t0 = now - chrono::Duration::minutes(30);
    let t1 = now - chrono::Duration::minutes(10);
    let t2 = now - chrono::Duration::minutes(5);
    let t3 = now - chrono::Duration::minutes(4);
    // Stored before the agent ever ran: fetched at start-up, once the errors are over.
    storage.add(ttn_uplink("dev-0", 10, t0, json!({"t": 0.5})));
    let backfill = format!(
        "url = \"{}\"\noverlap = \"1m\"\npage_limit = 2\ntimeout = \"1s\"\nretry_min = \"1s\"\nretry_max = \"1s\"",
        h.url()
    );
    let agent = start_ttn_agent(dir.path(), &m, &backfill);

    // Live uplink U1 (also kept by the Storage Integration: the overlap).
    let u1 = ttn_uplink("dev-1", 11, t1, json!({"t": 1.5}));
    storage.add(u1.clone());
    publish_until(
        &m,
        &ttn_topic("dev-1", "up"),
        &serde_json::to_vec(&u1).unwrap(),
        &agent,
        || agent.try_count("SELECT COUNT(*) FROM readings WHERE device = 'dev-1'") == Some(1),
    );
    assert!(
        wait_until(DEADLINE, || agent
            .count("SELECT COUNT(*) FROM readings WHERE device = 'dev-0'")
            == 1),
        "start-up backfill after 401, 404 and a timeout; agent log:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(log.contains("HTTP 401"), "{log}");
    assert!(
        log.contains("HTTP 404") && log.contains("Storage Integration is not enabled"),
        "{log}"
    );
    assert!(log.contains("within 1s"), "the timeout is reported: {log}");

    // The broker goes away; uplinks published meanwhile only reach the Storage Integration.
    m.stop();
    storage.add(ttn_uplink("dev-2", 12, t2, json!({"t": 2.5})));
    storage.add(ttn_uplink("dev-3", 13, t3, json!({"t": 3.5, "h": 50})));
    let before = storage.requests.load(Ordering::SeqCst);
    m.start_again();
    assert!(
        wait_until(DEADLINE, || agent.count(
            "SELECT COUNT(*) FROM readings WHERE device IN ('dev-2', 'dev-3')"
        ) == 3),
        "backfill after reconnect; agent log:\n{}",
        agent.log()
    );
    assert!(storage.requests.load(Ordering::SeqCst) > before);
    // The fetch after the reconnect starts one overlap before the last stored uplink.
    let wanted =
        (t1 - chrono::Duration::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
    let requests = h.requests();
    assert!(
        requests
            .iter()
            .any(|r| query_param(&r.path, "after").as_deref() == Some(wanted.as_str())),
        "a request with after={wanted}: {:#?}",
        requests.iter().map(|r| r.path.clone()).collect::<Vec<_>>()
    );
    let r = requests.last().unwrap();
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {API_KEY}").as_str())
    );
    assert_eq!(r.header("accept"), Some("text/event-stream"));
    assert!(r.path.starts_with(&format!(
        "/api/v3/as/applications/{APP}/packages/storage/uplink_message?"
    )));
    assert_eq!(
        query_param(&r.path, "order").as_deref(),
        Some("received_at")
    );
    assert_eq!(query_param(&r.path, "limit").as_deref(), Some("2"));

    // Overlap deduplicated: U1 is stored once, as its live copy.
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM readings WHERE device = 'dev-1'"),
        1
    );
    assert_eq!(
        agent.count("SELECT flags FROM readings WHERE device = 'dev-1'"),
        0
    );
    assert_eq!(
        agent.count(
            "SELECT MIN(flags & 4) FROM readings WHERE device IN ('dev-0', 'dev-2', 'dev-3')"
        ),
        4,
        "BACKFILLED"
    );
    // The cursor is kept for the next start.
    let newest = vec![t3.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)];
    let cursor =
        || agent.strings("SELECT value FROM source_state WHERE key = 'ttn_backfill_cursor'");
    assert!(
        wait_until(DEADLINE, || cursor() == newest),
        "cursor saved: {:?}",
        cursor()
    );
}

/// A Storage Integration written from The Things Stack's API reference: application
/// uplinks after `after` (by AS `received_at`), `limit` per page, `order`, a bearer
/// key, and a `field_mask` of paths rooted at `up` (`end_device_ids` and the top-level
/// `received_at` are always returned). The body is `text/event-stream` holding
/// newline-delimited JSON results, separated by blank lines as the real server does.
///
/// It writes in batches like the real one: an uplink is retrievable only `delay` after
/// it was added (received by The Things Stack).
struct DelayedStorage {
    uplinks: Arc<Mutex<Vec<(std::time::Instant, Value)>>>,
    /// Uplinks a request's window held that were not yet retrievable.
    hidden: Arc<AtomicUsize>,
    /// (path and query, body bytes) of every 200 answer.
    served: Arc<Mutex<Vec<(String, usize)>>>,
    delay: Duration,
}

impl DelayedStorage {
    fn install(h: &HttpReceiver, delay: Duration) -> DelayedStorage {
        let storage = DelayedStorage {
            uplinks: Arc::default(),
            hidden: Arc::default(),
            served: Arc::default(),
            delay,
        };
        let (uplinks, hidden, served) = (
            storage.uplinks.clone(),
            storage.hidden.clone(),
            storage.served.clone(),
        );
        h.set_handler(move |req| {
            let url = reqwest::Url::parse(&format!("http://storage{}", req.path)).unwrap();
            let param = |key: &str| {
                url.query_pairs()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.into_owned())
            };
            if req.header("authorization") != Some(format!("Bearer {API_KEY}").as_str()) {
                return Reply::status(401).body(r#"{"code":16,"message":"unauthenticated"}"#);
            }
            let after = param("after").map(|a| {
                chrono::DateTime::parse_from_rfc3339(&a)
                    .unwrap_or_else(|e| panic!("after={a:?}: {e}"))
                    .with_timezone(&chrono::Utc)
            });
            let limit: usize = param("limit").and_then(|l| l.parse().ok()).unwrap_or(1000);
            let mask: Option<Vec<String>> =
                param("field_mask").map(|m| m.split(',').map(str::to_string).collect());
            if let Some(paths) = &mask {
                if let Some(bad) = paths.iter().find(|p| !p.starts_with("up.")) {
                    return Reply::status(400).body(format!(
                        r#"{{"code":3,"message":"invalid field mask path {bad}"}}"#
                    ));
                }
            }
            let now = std::time::Instant::now();
            let as_time = |up: &Value| {
                chrono::DateTime::parse_from_rfc3339(up["received_at"].as_str().unwrap()).unwrap()
            };
            let mut selected: Vec<Value> = Vec::new();
            for (visible_at, up) in uplinks.lock().unwrap().iter() {
                if after.is_some_and(|a| as_time(up) <= a) {
                    continue;
                }
                if *visible_at > now {
                    hidden.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                selected.push(up.clone());
            }
            selected.sort_by_key(as_time);
            selected.truncate(limit);
            let mut body = String::new();
            for up in selected {
                let up = match &mask {
                    Some(paths) => apply_field_mask(&up, paths),
                    None => up,
                };
                body.push_str(&json!({ "result": up }).to_string());
                body.push_str("\n\n");
            }
            served.lock().unwrap().push((req.path.clone(), body.len()));
            Reply::ok()
                .header("content-type", "text/event-stream")
                .body(body)
        });
        storage
    }

    /// The Things Stack received `up` now.
    fn add(&self, up: Value) {
        self.uplinks
            .lock()
            .unwrap()
            .push((std::time::Instant::now() + self.delay, up));
    }
}

/// What The Things Stack returns for `paths` (rooted at `up`, i.e. the uplink itself).
fn apply_field_mask(up: &Value, paths: &[String]) -> Value {
    let mut out = json!({
        "end_device_ids": up["end_device_ids"],
        "received_at": up["received_at"],
        "uplink_message": {},
    });
    for path in paths {
        let Some(field) = path.strip_prefix("up.uplink_message.") else {
            continue;
        };
        if let Some(v) = up["uplink_message"].get(field) {
            out["uplink_message"][field] = v.clone();
        }
    }
    out
}

/// What the backfill of source `ttn` recovered for `reason`, as `outpost status` shows it.
fn recovered(status: &Value, reason: &str) -> u64 {
    status["backfill_recovered"]
        .as_array()
        .and_then(|sources| sources.iter().find(|s| s["source"] == "ttn"))
        .and_then(|s| s["recovered"][reason].as_u64())
        .unwrap_or(0)
}

/// Publishes the uplink of device `probe` (also kept by the Storage Integration, through
/// `keep`) until the agent stored it: the agent is subscribed from then on. Returns the
/// (device, f_cnt) stored.
fn probe_until_stored(m: &Mosquitto, agent: &Agent, keep: impl FnOnce(Value)) -> (String, u32) {
    let probe = ttn_uplink("probe", 1, chrono::Utc::now(), json!({"t": 1}));
    keep(probe.clone());
    publish_until(
        m,
        &ttn_topic("probe", "up"),
        &serde_json::to_vec(&probe).unwrap(),
        agent,
        || agent.try_count("SELECT COUNT(*) FROM readings") == Some(1),
    );
    ("probe".to_string(), 1)
}

/// Every uplink stored exactly once: one reading per (device, f_cnt), all present.
fn assert_each_stored_once(expected: &[(String, u32)], agent: &Agent) {
    let stored = agent
        .strings("SELECT device || '/' || json_extract(meta, '$.f_cnt') FROM readings ORDER BY 1");
    let mut wanted: Vec<String> = expected.iter().map(|(d, f)| format!("{d}/{f}")).collect();
    wanted.sort();
    assert_eq!(stored, wanted, "agent log:\n{}", agent.log());
}

/// Uplinks from the last moments before a reconnect are not yet in the Storage
/// Integration when the agent fetches the gap; the settle re-fetch gets them. With
/// `reconcile_every = "0s"` nothing is fetched after that.
#[test]
fn ttn_backfill_refetches_the_gap_once_the_storage_integration_settles() {
    let visibility = Duration::from_secs(5);
    let mut m = Mosquitto::builder().password(USER, API_KEY).start();
    let h = HttpReceiver::start();
    let storage = DelayedStorage::install(&h, visibility);
    let dir = tempfile::tempdir().unwrap();
    let backfill = format!(
        "url = \"{}\"\noverlap = \"1m\"\nsettle = \"7s\"\nreconcile_every = \"0s\"\npage_limit = 4\nretry_min = \"1s\"\nretry_max = \"1s\"",
        h.url()
    );
    let agent = start_ttn_agent(dir.path(), &m, &backfill);
    let mut expected = vec![probe_until_stored(&m, &agent, |up| storage.add(up))];

    // The broker goes away; what is sent meanwhile reaches only the Storage Integration,
    // the last of it just before the agent reconnects.
    m.stop();
    for f_cnt in 0..12u32 {
        let device = format!("edge-{}", f_cnt % 3);
        storage.add(ttn_uplink(
            &device,
            f_cnt,
            chrono::Utc::now(),
            json!({"t": f_cnt}),
        ));
        expected.push((device, f_cnt));
        std::thread::sleep(Duration::from_millis(50));
    }
    let hidden_before = storage.hidden.load(Ordering::SeqCst);
    m.start_again();

    assert!(
        wait_until(DEADLINE, || agent.count("SELECT COUNT(*) FROM readings")
            == expected.len() as i64),
        "agent log:\n{}",
        agent.log()
    );
    assert!(
        storage.hidden.load(Ordering::SeqCst) > hidden_before,
        "the reconnect fetch came after the uplinks became visible: the test did not exercise the edge"
    );
    assert_each_stored_once(&expected, &agent);
    // The counts are saved right after each fetch, a moment after its readings.
    assert!(
        wait_until(Duration::from_secs(20), || recovered(
            &agent.status_json(),
            "settle"
        ) > 0),
        "the settle re-fetch recovered the edge: {:#}\nagent log:\n{}",
        agent.status_json()["backfill_recovered"],
        agent.log()
    );
    assert_eq!(recovered(&agent.status_json(), "reconcile"), 0);

    // reconcile_every = "0s": after the settle re-fetch nothing more is fetched.
    std::thread::sleep(Duration::from_secs(9));
    let quiet = h.requests().len();
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        h.requests().len(),
        quiet,
        "no request after the settle re-fetch: {:#?}",
        h.requests()[quiet..]
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
    assert!(
        h.requests()
            .iter()
            .all(|r| r.path.contains("field_mask=up.uplink_message.")),
        "every request names the fields it needs"
    );
}

/// A tiny deterministic generator, so a failing run can be repeated with its seed.
struct Lcg(u64);

impl Lcg {
    fn next_below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// QoS 0 uplinks dropped on MQTT while the connection stays up (they reach only the
/// Storage Integration, a few seconds late), plus a broker outage: at the end every
/// uplink is stored exactly once, and what reconciliation recovered is counted in
/// `/metrics` and `outpost status`.
#[test]
fn ttn_backfill_recovers_uplinks_dropped_while_connected_exactly_once() {
    let visibility = Duration::from_secs(2);
    let mut m = Mosquitto::builder().password(USER, API_KEY).start();
    let h = HttpReceiver::start();
    let storage = DelayedStorage::install(&h, visibility);
    let dir = tempfile::tempdir().unwrap();
    let http_port = support::free_port();
    let backfill = format!(
        "url = \"{}\"\noverlap = \"2s\"\nsettle = \"3s\"\nreconcile_every = \"4s\"\npage_limit = 7\nretry_min = \"1s\"\nretry_max = \"1s\"\n[http]\nlisten = \"127.0.0.1:{http_port}\"",
        h.url()
    );
    let agent = start_ttn_agent(dir.path(), &m, &backfill);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("drop pattern seed: {seed}");
    let mut random = Lcg(seed);
    let mut expected = vec![probe_until_stored(&m, &agent, |up| storage.add(up))];

    let mut dropped_while_connected = 0;
    let total = 45u32;
    for f_cnt in 0..total {
        let device = format!("dev-{}", f_cnt % 5);
        let up = ttn_uplink(&device, f_cnt, chrono::Utc::now(), json!({"t": f_cnt}));
        storage.add(up.clone());
        expected.push((device.clone(), f_cnt));
        match f_cnt {
            // The broker is down: only the Storage Integration has these.
            15 => m.stop(),
            20 => m.start_again(),
            _ => {}
        }
        let broker_up = !(15..20).contains(&f_cnt);
        // About one in three is dropped while connected, and always the last one (so
        // that only a reconciliation can recover it).
        let drop = f_cnt == total - 1 || random.next_below(3) == 0;
        if broker_up && drop {
            dropped_while_connected += 1;
        } else if broker_up {
            publish(
                &m,
                &ttn_topic(&device, "up"),
                &serde_json::to_vec(&up).unwrap(),
                0,
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("{dropped_while_connected} uplinks dropped while connected");

    assert!(
        wait_until(DEADLINE, || agent.count("SELECT COUNT(*) FROM readings")
            >= expected.len() as i64),
        "{} of {} stored; agent log:\n{}",
        agent.count("SELECT COUNT(*) FROM readings"),
        expected.len(),
        agent.log()
    );
    // Another reconciliation or two: nothing is stored twice.
    std::thread::sleep(Duration::from_secs(5));
    assert_each_stored_once(&expected, &agent);
    assert!(
        storage.hidden.load(Ordering::SeqCst) > 0,
        "some fetch came before uplinks were visible"
    );

    let live = agent.count("SELECT COUNT(*) FROM readings WHERE flags & 4 = 0") as u64;
    let all_recovered = |status: &Value| -> u64 {
        ["reconnect", "gap", "settle", "reconcile"]
            .iter()
            .map(|r| recovered(status, r))
            .sum()
    };
    // The counts are saved right after each fetch, a moment after its readings.
    assert!(
        wait_until(Duration::from_secs(20), || all_recovered(
            &agent.status_json()
        ) + live
            >= expected.len() as u64),
        "{:#}",
        agent.status_json()["backfill_recovered"]
    );
    let status = agent.status_json();
    assert_eq!(
        all_recovered(&status) + live,
        expected.len() as u64,
        "each reading is counted once, as live or as recovered: {:#}",
        status["backfill_recovered"]
    );
    let by_reconcile = recovered(&status, "reconcile");
    assert!(
        by_reconcile >= 1,
        "reconciliation recovered the uplinks dropped while connected: {:#}",
        status["backfill_recovered"]
    );
    let (code, metrics) = support::agent::http_get(http_port, "/metrics").unwrap();
    assert_eq!(code, 200);
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("outpost_backfill_recovered_total{")
                && l.contains("source=\"ttn\"")
                && l.contains("reason=\"reconcile\"")
        })
        .unwrap_or_else(|| panic!("no reconcile counter in:\n{metrics}"));
    assert_eq!(
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap(),
        by_reconcile,
        "/metrics and status agree (one run)"
    );
    let text = agent.status_text();
    assert!(
        text.contains("Source ttn: the Storage Integration backfill recovered")
            && text.contains(&format!("reconcile {by_reconcile}")),
        "{text}"
    );
}

/// Each reconciliation asks only for what came after the newest uplink stored at the
/// previous one, minus max(overlap, settle).
#[test]
fn ttn_reconciliation_asks_only_for_the_window_since_the_previous_one() {
    let m = Mosquitto::builder().password(USER, API_KEY).start();
    let h = HttpReceiver::start();
    let _storage = DelayedStorage::install(&h, Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let backfill = format!(
        "url = \"{}\"\noverlap = \"2s\"\nsettle = \"1s\"\nreconcile_every = \"2s\"\nretry_min = \"1s\"\nretry_max = \"1s\"",
        h.url()
    );
    let agent = start_ttn_agent(dir.path(), &m, &backfill);
    let round = |t: chrono::DateTime<chrono::Utc>| {
        chrono::DateTime::from_timestamp(t.timestamp(), 0).unwrap()
    };
    let after_of = |r: &support::RecordedRequest| {
        query_param(&r.path, "after").map(|a| {
            chrono::DateTime::parse_from_rfc3339(&a)
                .unwrap()
                .with_timezone(&chrono::Utc)
        })
    };
    let wait_for_after = |wanted: chrono::DateTime<chrono::Utc>| {
        assert!(
            wait_until(DEADLINE, || h
                .requests()
                .iter()
                .any(|r| after_of(r) == Some(wanted))),
            "a reconciliation with after={wanted}: {:#?}\nagent log:\n{}",
            h.requests()
                .iter()
                .map(|r| r.path.clone())
                .collect::<Vec<_>>(),
            agent.log()
        );
        h.requests()
            .iter()
            .position(|r| after_of(r) == Some(wanted))
            .unwrap()
    };

    let t1 = round(chrono::Utc::now());
    let l1 = ttn_uplink("dev-1", 1, t1, json!({"t": 1}));
    publish_until(
        &m,
        &ttn_topic("dev-1", "up"),
        &serde_json::to_vec(&l1).unwrap(),
        &agent,
        || agent.try_count("SELECT COUNT(*) FROM readings") == Some(1),
    );
    let first = wait_for_after(t1 - chrono::Duration::seconds(2));

    std::thread::sleep(Duration::from_millis(1100));
    let t2 = round(chrono::Utc::now());
    assert!(t2 > t1);
    let l2 = ttn_uplink("dev-2", 2, t2, json!({"t": 2}));
    publish(
        &m,
        &ttn_topic("dev-2", "up"),
        &serde_json::to_vec(&l2).unwrap(),
        0,
    );
    let second = wait_for_after(t2 - chrono::Duration::seconds(2));
    assert!(second > first);

    let requests = h.requests();
    for r in &requests[first..] {
        let after = after_of(r).unwrap();
        assert!(
            after >= t1 - chrono::Duration::seconds(2),
            "no reconciliation reaches back before the previous window: {}",
            r.path
        );
        assert!(
            r.path.contains("field_mask=")
                && query_param(&r.path, "order").as_deref() == Some("received_at"),
            "{}",
            r.path
        );
    }
    for r in &requests[second..] {
        assert_eq!(
            after_of(r),
            Some(t2 - chrono::Duration::seconds(2)),
            "{}",
            r.path
        );
    }
}

/// A refused key (HTTP 401) needs a person: ERROR with the advice to make a new key. A
/// record with neither `result` nor `error` is kept in the `rejected` table. A server
/// that refuses the field mask gets whole-record requests instead.
#[test]
fn ttn_backfill_refused_key_is_an_error_and_empty_records_are_rejected() {
    let m = Mosquitto::builder().password(USER, API_KEY).start();
    let h = HttpReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap();
    let good = [
        ttn_uplink(
            "dev-a",
            1,
            now - chrono::Duration::minutes(5),
            json!({"t": 1}),
        ),
        ttn_uplink(
            "dev-b",
            2,
            now - chrono::Duration::minutes(4),
            json!({"t": 2}),
        ),
    ];
    let served = Arc::new(AtomicUsize::new(0));
    let n = served.clone();
    h.set_handler(move |req| {
        if n.fetch_add(1, Ordering::SeqCst) < 2 {
            return Reply::status(401).body(r#"{"code":16,"message":"token rejected"}"#);
        }
        // A server that does not know a path of the mask.
        if req.path.contains("field_mask=") {
            return Reply::status(400).body(r#"{"code":3,"message":"invalid field mask"}"#);
        }
        let lines = [
            json!({ "result": good[0] }).to_string(),
            "{}".to_string(),
            r#"{"keep_alive": true}"#.to_string(),
            json!({ "result": good[1] }).to_string(),
        ];
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        Reply::ok()
            .header("content-type", "text/event-stream")
            .ndjson_lines(&lines, Duration::ZERO)
    });
    let backfill = format!(
        "url = \"{}\"\nsettle = \"1h\"\nreconcile_every = \"0s\"\nretry_min = \"1s\"\nretry_max = \"4s\"",
        h.url()
    );
    let agent = start_ttn_agent(dir.path(), &m, &backfill);
    assert!(
        wait_until(DEADLINE, || agent
            .try_count("SELECT COUNT(*) FROM readings")
            == Some(2)
            && agent.try_count("SELECT COUNT(*) FROM rejected") == Some(2)),
        "agent log:\n{}",
        agent.log()
    );
    assert_eq!(
        agent.strings("SELECT reason FROM rejected ORDER BY id"),
        vec!["no_result", "no_result"]
    );
    let log = agent.log();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("HTTP 401")).collect();
    assert!(!refused.is_empty(), "{log}");
    for line in &refused {
        assert!(line.contains("ERROR"), "{line}");
        assert!(
            line.contains("create a new API key")
                && line.contains("Read application traffic (uplink and downlink)"),
            "{line}"
        );
        assert!(
            !line.contains("give it the right"),
            "not the 403 advice: {line}"
        );
        // The randomised wait actually used, to the millisecond (1s to the ceiling).
        let retry_in = line
            .split("retry_in=")
            .nth(1)
            .and_then(|rest| rest.split(" suppressed").next())
            .unwrap_or_else(|| panic!("{line}"));
        let wait = humantime::parse_duration(retry_in.trim_matches('"'))
            .unwrap_or_else(|e| panic!("{retry_in:?}: {e}"));
        assert!(
            wait >= Duration::from_secs(1) && wait <= Duration::from_secs(4),
            "{line}"
        );
    }
    assert!(!log.contains(API_KEY), "the API key is never logged");
    // The refused field_mask: whole records from then on, said once.
    assert_eq!(
        log.matches("refused the field_mask (HTTP 400)").count(),
        1,
        "{log}"
    );
    // Two refused (401) and one refused mask (400) with field_mask, none after that.
    let masked: Vec<bool> = h
        .requests()
        .iter()
        .map(|r| r.path.contains("field_mask="))
        .collect();
    assert!(masked.len() > 3, "{masked:?}");
    assert_eq!(masked[..3], [true, true, true]);
    assert!(masked[3..].iter().all(|m| !m), "{masked:?}");
}

/// Bytes one reconciliation downloads on a metered link, with and without `field_mask`:
/// 200 devices reporting once a minute, default `reconcile_every` (15m) plus the margin
/// (max(overlap, settle) = 1m) = 16 minutes = 3,200 uplinks shaped like the fixture (two
/// gateways, six decoded fields). The start-up fetch of a fresh agent asks for exactly
/// such a window, so its bytes are measured. Figures are in docs/deployment.md.
#[test]
fn ttn_reconciliation_bytes_for_200_devices_with_and_without_field_mask() {
    let devices = 200;
    let minutes = 16;
    let mut sizes = Vec::new();
    for field_mask in [true, false] {
        let m = Mosquitto::builder().password(USER, API_KEY).start();
        let h = HttpReceiver::start();
        let storage = DelayedStorage::install(&h, Duration::ZERO);
        let now = chrono::Utc::now();
        for minute in 0..minutes {
            for d in 0..devices {
                // Distinct times: each device once a minute, 300 ms apart.
                let ns = now - chrono::Duration::seconds((minutes - minute) * 60)
                    + chrono::Duration::milliseconds(d * 300);
                storage.add(ttn_uplink(
                    &format!("sensor-{d:03}"),
                    minute as u32 + 1000,
                    ns,
                    fixture("ttn-uplink.json")["uplink_message"]["decoded_payload"].clone(),
                ));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let backfill = format!(
            "url = \"{}\"\nsettle = \"1h\"\nreconcile_every = \"0s\"\nfield_mask = {field_mask}",
            h.url()
        );
        let agent = start_ttn_agent(dir.path(), &m, &backfill);
        let uplinks = devices * minutes;
        assert!(
            wait_until(DEADLINE, || agent.try_count(
                "SELECT COUNT(DISTINCT device || json_extract(meta, '$.f_cnt')) FROM readings"
            ) == Some(uplinks)),
            "agent log:\n{}",
            agent.log()
        );
        let mut served = storage.served.lock().unwrap().clone();
        assert!(served
            .iter()
            .all(|(path, _)| path.contains("field_mask=") == field_mask));
        // When the MQTT subscription comes up after the start-up fetch began, its
        // connection fetches once more from the newest uplink (it may have missed
        // what arrived in between): one short request after the four pages, not part
        // of the walk measured here.
        if served.len() == 5 {
            assert!(served[4].1 < served[0].1 / 2, "{served:?}");
            served.truncate(4);
        }
        assert_eq!(served.len(), 4, "1,000 uplinks per page: {served:?}");
        let bytes: usize = served.iter().map(|(_, b)| b).sum();
        println!(
            "field_mask = {field_mask}: {bytes} bytes in {} requests for {uplinks} uplinks ({} bytes each)",
            served.len(),
            bytes / uplinks as usize
        );
        sizes.push(bytes);
        // The readings are the same either way.
        assert_eq!(
            agent.count("SELECT COUNT(*) FROM readings"),
            uplinks * 5,
            "five numeric fields per uplink"
        );
    }
    // rx_metadata (all gateways, whole: a mask cannot select inside a list) is most of
    // what remains. For comparison, the bytes of only the identifying fields (what a
    // reconciliation that first lists and then fetches only the missing uplinks would
    // download; not implemented).
    let thin: usize = (0..devices * minutes)
        .map(|i| {
            let up = ttn_uplink(
                &format!("sensor-{:03}", i % devices),
                1000,
                chrono::Utc::now(),
                fixture("ttn-uplink.json")["uplink_message"]["decoded_payload"].clone(),
            );
            let paths =
                ["up.uplink_message.f_cnt", "up.uplink_message.received_at"].map(str::to_string);
            json!({ "result": apply_field_mask(&up, &paths) })
                .to_string()
                .len()
                + 2
        })
        .sum();
    println!("identifying fields only: {thin} bytes");
    assert!(
        sizes[0] * 4 < sizes[1] * 3,
        "the mask saves at least a quarter: {sizes:?}"
    );
    assert!(thin < sizes[0]);
}

/// The commented LoRaWAN examples in config/outpost.toml load once uncommented, and
/// every key of the three source types appears in them (set or as `# key = …`).
#[test]
fn the_lorawan_examples_load_and_document_every_key() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/outpost.toml"))
            .unwrap();
    let start = text
        .find("# --- LoRaWAN sources")
        .expect("the LoRaWAN block");
    let end = text
        .find("# --- end of LoRaWAN sources ---")
        .expect("its end");
    let block = &text[start..end];
    let uncommented: String = block
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .filter(|l| !l.is_empty() && !l.starts_with(' ') && !l.starts_with('-'))
        .map(|l| format!("{l}\n"))
        .collect();
    let commented: std::collections::BTreeSet<String> = block
        .lines()
        .filter_map(|l| l.strip_prefix("# "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k.trim().to_string())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("outpost.toml");
    std::fs::write(
        &file,
        format!(
            "[storage]\npath = \"{}\"\n{uncommented}",
            db(dir.path()).display()
        ),
    )
    .unwrap();
    std::env::set_var("TTN_API_KEY", "NNSXS.EXAMPLE");
    std::env::set_var("CHIRPSTACK_MQTT_PASSWORD", "example");
    let config =
        outpost::config::Config::load(&file).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    let kinds: Vec<_> = config.sources.iter().map(|s| s.kind()).collect();
    assert_eq!(kinds, vec!["ttn", "chirpstack", "mqtt"]);
    let effective = serde_json::to_value(&config.sources).unwrap();
    let raw: Value = toml::from_str(&uncommented).unwrap();
    let mut set_anywhere = Vec::new();
    for source in raw["sources"].as_array().unwrap() {
        collect_keys(source, "", &mut set_anywhere);
    }
    let set_leaves: std::collections::BTreeSet<String> = set_anywhere
        .iter()
        .map(|k| k.rsplit('.').next().unwrap().to_string())
        .collect();
    let mut missing = Vec::new();
    for (i, source) in effective.as_array().unwrap().iter().enumerate() {
        let mut keys = Vec::new();
        collect_keys(source, "", &mut keys);
        for key in keys {
            let set = pointer_exists(&raw["sources"][i], &key);
            let leaf = key.rsplit('.').next().unwrap().to_string();
            // Map entries (fields.<raw key>, devices.<id>) are examples, not keys.
            let user_named =
                key.contains("fields.") || key.contains("devices.") || key.starts_with("metrics.");
            if !set
                && !set_leaves.contains(&leaf)
                && !commented.contains(&leaf)
                && !commented.contains(&format!("{leaf}_file"))
                && !user_named
            {
                missing.push(format!("sources[{i}].{key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys missing from the LoRaWAN examples: {missing:#?}"
    );
}

fn collect_keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Object(map) = v {
        for (k, v) in map {
            let p = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.push(p.clone());
            collect_keys(v, &p, out);
        }
    }
}

fn pointer_exists(v: &Value, dotted: &str) -> bool {
    let mut cur = v;
    for part in dotted.split('.') {
        match cur.get(part) {
            Some(next) => cur = next,
            None => return false,
        }
    }
    true
}

/// What a technician meets when ChirpStack is set up wrong: ten bad payloads, then
/// Protobuf. The log still shows the first message of every reason with its hint (the
/// rate limit is per reason), plain text is `invalid_json`, and `outpost status` and
/// `outpost rejected` show the counts, the messages and what to do.
#[test]
fn every_rejection_reason_is_logged_once_with_its_hint_and_shown() {
    let m = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let app = "1f6a3c2e-9d4b-4e8a-b7c5-2a1d0e9f8b7c";
    let config = format!(
        r#"
[storage]
path = "{db}"
batch_max_delay = "20ms"
[[sources]]
type = "chirpstack"
name = "cs"
application_id = "{app}"
[sources.broker]
host = "127.0.0.1"
port = {port}
tls = false
"#,
        db = db(dir.path()).display(),
        port = m.port()
    );
    let agent = start_agent(dir.path(), &config);
    let topic = format!("application/{app}/device/a84041c2a1b2c3d4/event/up");
    let probe = serde_json::to_vec(&fixture("chirpstack-up.json")).unwrap();
    publish_until(&m, &topic, &probe, &agent, || {
        agent.try_count("SELECT COUNT(*) FROM readings") > Some(0)
    });

    for i in 0..10 {
        publish(&m, &topic, format!("{i}.5 C").as_bytes(), 0);
    }
    publish(&m, &topic, b"[1, 2, 3]", 0);
    let mut pb = vec![0x0a, 36];
    pb.extend_from_slice(b"7c1d2a9e-5b0f-4f3e-9a61-0d8e2b4c6f10");
    publish(&m, &topic, &pb, 0);
    assert!(
        wait_until(DEADLINE, || agent.count("SELECT COUNT(*) FROM rejected")
            == 12),
        "agent log:\n{}",
        agent.log()
    );
    assert_eq!(
        agent.strings("SELECT reason || ' ' || count FROM rejected_reasons ORDER BY reason"),
        ["invalid_json 10", "protobuf 1", "wrong_type 1"],
        "plain text is invalid_json, not wrong_type"
    );

    let log = agent.log();
    let logged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("A message was rejected"))
        .collect();
    assert_eq!(logged.len(), 3, "one line per reason:\n{log}");
    for (reason, hint) in [
        ("invalid_json", "make the publisher send JSON"),
        (
            "wrong_type",
            "check that the topic carries this source type's uplink events",
        ),
        (
            "protobuf",
            "hint=\"set `json = true` in [integration.mqtt] of chirpstack.toml",
        ),
    ] {
        assert!(
            logged
                .iter()
                .any(|l| l.contains(&format!("reason=\"{reason}\"")) && l.contains(hint)),
            "{reason} logged with its hint:\n{log}"
        );
    }

    let outpost = |args: &[&str]| {
        let (code, stdout, stderr) =
            outpost([args, &["--db", agent.db().to_str().unwrap()]].concat());
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        stdout
    };
    let status = outpost(&["status"]);
    let row = status
        .lines()
        .find(|l| l.starts_with("cs ") && l.contains("protobuf"))
        .unwrap_or_else(|| panic!("{status}"));
    assert!(
        row.contains(" 1 ") && row.contains("ago") && row.contains("json = true"),
        "{row}"
    );
    let listed: Vec<Value> = serde_json::from_str(&outpost(&[
        "rejected", "--reason", "protobuf", "--format", "json",
    ]))
    .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["topic"], topic.as_str());
    assert_eq!(listed[0]["source"], "cs");
    assert!(
        listed[0]["payload"].as_str().unwrap().contains("7c1d2a9e"),
        "{listed:?}"
    );
    assert!(listed[0]["hint"]
        .as_str()
        .unwrap()
        .contains("restart ChirpStack"));
    let plain: Vec<Value> = serde_json::from_str(&outpost(&[
        "rejected",
        "--source",
        "cs",
        "--reason",
        "invalid_json",
        "--limit",
        "3",
        "--format",
        "json",
    ]))
    .unwrap();
    assert_eq!(plain.len(), 3);
    assert_eq!(plain[0]["payload"], "9.5 C", "newest first");
}
