//! LoRaWAN ingestion against real peers: mosquitto (password auth, a TLS listener with a
//! CA made in the test) and a scripted HTTP server speaking the Storage Integration's
//! newline-delimited JSON. The agent is the real `outpost run` binary, so a SIGKILL is
//! a real crash.

mod support;

use rusqlite::{Connection, OpenFlags};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
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

/// The real agent, killed on drop.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(dir: &Path, config: &str) -> Agent {
        let config_path = dir.join("outpost.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = unique(dir.join("agent"));
        let child = Command::new(env!("CARGO_BIN_EXE_outpost"))
            .arg("--config")
            .arg(&config_path)
            .arg("run")
            .env("RUST_LOG", "info,outpost=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start outpost");
        Agent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        // SIGKILL: no chance to commit or acknowledge anything.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unique(path: PathBuf) -> PathBuf {
    let mut n = 0;
    loop {
        let candidate = path.with_extension(format!("{n}.log"));
        if !candidate.exists() {
            return candidate;
        }
        n += 1;
    }
}

fn db(dir: &Path) -> PathBuf {
    dir.join("outpost.db")
}

/// Runs a query returning one integer; 0 while the database or table does not exist.
fn count(db: &Path, sql: &str) -> i64 {
    let Ok(conn) = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return 0;
    };
    let _ = conn.busy_timeout(Duration::from_secs(5));
    conn.query_row(sql, [], |r| r.get(0)).unwrap_or(0)
}

fn strings(db: &Path, sql: &str) -> Vec<String> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut stmt = conn.prepare(sql).unwrap();
    let rows = stmt.query_map([], |r| r.get::<_, String>(0)).unwrap();
    rows.map(Result::unwrap).collect()
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
    let agent = Agent::start(
        dir.path(),
        &ttn_config(dir.path(), &broker, "enabled = false"),
    );
    let db = db(dir.path());
    let now = chrono::Utc::now();

    // Probe until subscribed; the fixture itself is the probe.
    let fixture_bytes = serde_json::to_vec(&fixture("ttn-uplink.json")).unwrap();
    publish_until(
        &m,
        &ttn_topic("walkin-freezer-2", "up"),
        &fixture_bytes,
        &agent,
        || {
            count(
                &db,
                "SELECT COUNT(*) FROM readings WHERE device = 'walkin-freezer-2'",
            ) == 5
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
        wait_until(DEADLINE, || count(
            &db,
            "SELECT COUNT(*) FROM readings WHERE device = 'last'"
        ) == 1
            && count(&db, "SELECT COUNT(*) FROM rejected") >= 2),
        "agent log:\n{}",
        agent.log()
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM readings WHERE device = 'walkin-freezer-2'"
        ),
        5,
        "the probe was deduplicated"
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM readings WHERE device = 'probe-3'"
        ),
        2
    );
    let meta = strings(
        &db,
        "SELECT meta FROM readings WHERE device = 'probe-3' AND metric = 't'",
    );
    let meta: Value = serde_json::from_str(&meta[0]).unwrap();
    assert_eq!(meta["f_cnt"], 0);
    assert_eq!(meta["f_port"], 0);
    assert_eq!(meta["snr"], 0.0);
    assert!(meta.get("dev_eui").is_none());
    assert_eq!(count(&db, "SELECT COUNT(*) FROM readings WHERE device IN ('sim-dev', 'joiner', 'bad', 'bad-type')"), 0);
    let reasons = strings(&db, "SELECT reason FROM rejected ORDER BY id");
    assert_eq!(
        reasons,
        vec!["invalid_json", "wrong_type"],
        "join/down/location are not even received"
    );
    // observed_at is the NS time of the fixture; the uid is stable.
    let observed = count(
        &db,
        "SELECT observed_at FROM readings WHERE device = 'walkin-freezer-2' LIMIT 1",
    );
    let ns_time = chrono::DateTime::parse_from_rfc3339("2026-11-26T03:14:07.705112233Z").unwrap();
    assert_eq!(
        observed,
        ns_time.timestamp_micros(),
        "the NS received_at, not the AS one"
    );
    let fixture_meta: Value = serde_json::from_str(
        &strings(
            &db,
            "SELECT meta FROM readings WHERE device = 'walkin-freezer-2' LIMIT 1",
        )[0],
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
    let broker = format!("host = \"127.0.0.1\"\nport = {}\ntls = false", m.port());
    let agent = Agent::start(
        dir.path(),
        &ttn_config(dir.path(), &broker, "enabled = false"),
    );
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
    let db = db(dir.path());
    let topic = format!("application/{app}/device/a84041c2a1b2c3d4/event/up");
    let event = |id: &str| {
        let mut e = fixture("chirpstack-up.json");
        e["deduplicationId"] = json!(id);
        serde_json::to_vec(&e).unwrap()
    };

    // 1. First run: establishes the persistent session and its subscription.
    let mut agent = Agent::start(dir.path(), &config("50ms"));
    let probe = event("probe");
    let ok = wait_until(DEADLINE, || {
        publish(&m, &topic, &probe, 1);
        std::thread::sleep(Duration::from_millis(300));
        count(&db, "SELECT COUNT(*) FROM readings") == 4
    });
    assert!(ok, "probe never stored; agent log:\n{}", agent.log());
    agent.terminate();

    // 2. While the agent is away the broker queues QoS 1 events for its session.
    for i in 0..5 {
        publish(&m, &topic, &event(&format!("queued-{i}")), 1);
    }
    publish(&m, &topic, &event("queued-0"), 1); // a duplicate event from ChirpStack

    // 3. Start with a long commit window and kill it between receipt and commit.
    let mut agent = Agent::start(dir.path(), &config("10s"));
    let connects = |m: &Mosquitto| m.log().matches("as outpost-test-cs").count();
    assert!(
        wait_until(DEADLINE, || connects(&m) >= 2),
        "broker log:\n{}",
        m.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    agent.kill();
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM readings"),
        4,
        "nothing of the queued events was committed"
    );

    // 4. Restart: the broker redelivers the unacknowledged events; each is stored once.
    let agent = Agent::start(dir.path(), &config("50ms"));
    assert!(
        wait_until(DEADLINE, || count(&db, "SELECT COUNT(*) FROM readings")
            >= 24),
        "agent log:\n{}\nbroker log:\n{}",
        agent.log(),
        m.log()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM readings"),
        24,
        "6 events × 4 fields, one duplicate"
    );
    assert_eq!(count(&db, "SELECT COUNT(DISTINCT uid) FROM readings"), 24);
    let devices = strings(&db, "SELECT DISTINCT device FROM readings");
    assert_eq!(devices, vec!["walkin-freezer-2"]);
    let meta: Value =
        serde_json::from_str(&strings(&db, "SELECT meta FROM readings LIMIT 1")[0]).unwrap();
    assert_eq!(meta["tags"]["room"], "kitchen");

    // 5. Acknowledged now: a later restart gets nothing again.
    drop(agent);
    let agent = Agent::start(dir.path(), &config("50ms"));
    assert!(wait_until(DEADLINE, || connects(&m) >= 4));
    // A Protobuf payload is reported with the hint and acknowledged (not redelivered).
    let mut pb = vec![0x0a, 36];
    pb.extend_from_slice(b"7c1d2a9e-5b0f-4f3e-9a61-0d8e2b4c6f10");
    publish(&m, &topic, &pb, 1);
    assert!(
        wait_until(DEADLINE, || count(
            &db,
            "SELECT COUNT(*) FROM rejected WHERE reason = 'protobuf'"
        ) == 1),
        "agent log:\n{}",
        agent.log()
    );
    assert!(agent.log().contains("json = true"), "the hint is logged");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM readings"), 24);
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
    let agent = Agent::start(dir.path(), &config);
    let db = db(dir.path());
    let payload = br#"{"env": {"t": 4.5, "h": 40}, "ts": "2026-01-01T00:00:00Z", "name": "x"}"#;
    publish_until(&m, "sensors/fridge-1/json", payload, &agent, || {
        count(&db, "SELECT COUNT(*) FROM readings") == 2
    });
    publish(&m, "sensors/fridge-1/json", b"not json", 0);
    assert!(wait_until(DEADLINE, || count(
        &db,
        "SELECT COUNT(*) FROM rejected"
    ) == 1));
    assert_eq!(
        strings(&db, "SELECT metric || '|' || device || '|' || COALESCE(unit, '') FROM readings ORDER BY metric"),
        vec!["rh|fridge-1|%", "temperature|fridge-1|°C"]
    );
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM readings WHERE observed_at = 1767225600000000"
        ),
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
                    after.map_or(true, |a| at > a)
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
    let db = db(dir.path());
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

    let broker = format!("host = \"127.0.0.1\"\nport = {}\ntls = false", m.port());
    let backfill = format!(
        "url = \"{}\"\noverlap = \"1m\"\npage_limit = 2\ntimeout = \"1s\"\nretry_min = \"1s\"\nretry_max = \"1s\"",
        h.url()
    );
    let agent = Agent::start(dir.path(), &ttn_config(dir.path(), &broker, &backfill));

    // Live uplink U1 (also kept by the Storage Integration: the overlap).
    let u1 = ttn_uplink("dev-1", 11, t1, json!({"t": 1.5}));
    storage.add(u1.clone());
    publish_until(
        &m,
        &ttn_topic("dev-1", "up"),
        &serde_json::to_vec(&u1).unwrap(),
        &agent,
        || count(&db, "SELECT COUNT(*) FROM readings WHERE device = 'dev-1'") == 1,
    );
    assert!(
        wait_until(DEADLINE, || count(
            &db,
            "SELECT COUNT(*) FROM readings WHERE device = 'dev-0'"
        ) == 1),
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
        wait_until(DEADLINE, || count(
            &db,
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
        count(&db, "SELECT COUNT(*) FROM readings WHERE device = 'dev-1'"),
        1
    );
    assert_eq!(
        count(&db, "SELECT flags FROM readings WHERE device = 'dev-1'"),
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT MIN(flags & 4) FROM readings WHERE device IN ('dev-0', 'dev-2', 'dev-3')"
        ),
        4,
        "BACKFILLED"
    );
    // The cursor is kept for the next start.
    let newest = vec![t3.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)];
    let cursor = || {
        strings(
            &db,
            "SELECT value FROM source_state WHERE key = 'ttn_backfill_cursor'",
        )
    };
    assert!(
        wait_until(DEADLINE, || cursor() == newest),
        "cursor saved: {:?}",
        cursor()
    );
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
    let agent = Agent::start(dir.path(), &config);
    let db = db(dir.path());
    let topic = format!("application/{app}/device/a84041c2a1b2c3d4/event/up");
    let probe = serde_json::to_vec(&fixture("chirpstack-up.json")).unwrap();
    publish_until(&m, &topic, &probe, &agent, || {
        count(&db, "SELECT COUNT(*) FROM readings") > 0
    });

    for i in 0..10 {
        publish(&m, &topic, format!("{i}.5 C").as_bytes(), 0);
    }
    publish(&m, &topic, b"[1, 2, 3]", 0);
    let mut pb = vec![0x0a, 36];
    pb.extend_from_slice(b"7c1d2a9e-5b0f-4f3e-9a61-0d8e2b4c6f10");
    publish(&m, &topic, &pb, 0);
    assert!(
        wait_until(DEADLINE, || count(&db, "SELECT COUNT(*) FROM rejected")
            == 12),
        "agent log:\n{}",
        agent.log()
    );
    assert_eq!(
        strings(
            &db,
            "SELECT reason || ' ' || count FROM rejected_reasons ORDER BY reason"
        ),
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
        let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(args)
            .arg("--db")
            .arg(&db)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
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
