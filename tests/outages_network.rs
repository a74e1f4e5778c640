//! The outage matrix, network half: the real agent (`outpost run`) against real peers
//! that go away and come back — the MQTT broker, PgBouncer, PostgreSQL behind it, the
//! SMTP server, a webhook, and name resolution. Each test checks that
//!
//! - no accepted reading is lost: everything the agent stored (from a simulated source,
//!   and every message the MQTT publisher got a PUBACK for) is in SQLite once and, after
//!   the peer is back, in PostgreSQL exactly once; notifications arrive after recovery;
//! - the agent recovers by itself, without a restart (the same process throughout);
//! - `/health` and `outpost status` (text and `--json`) show the condition while it
//!   lasts and show it cleared afterwards.
//!
//! Outages that last "for minutes" last `OUTPOST_OUTAGE_SECS` seconds (default 15 in
//! the normal suite; the full run in docs/reliability.md uses 180):
//!
//! ```sh
//! OUTPOST_OUTAGE_SECS=180 cargo test --test outages_network -- --nocapture --test-threads 7
//! ```
//!
//! Each test prints one `OUTAGE …` line with its numbers (data counts, recovery time
//! after the peer returned).

mod support;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::agent::{health_check, outpost, Agent};
use support::{
    free_port, HttpReceiver, Mosquitto, PgBouncer, Postgres, Reply, SmtpOptions, SmtpServer,
};

/// How long any single condition may take to show or clear.
const DEADLINE: Duration = Duration::from_secs(60);

/// How long the "for minutes" outages last.
fn outage() -> Duration {
    let secs = std::env::var("OUTPOST_OUTAGE_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(15);
    Duration::from_secs(secs.max(4))
}

// ---- Central: PostgreSQL behind PgBouncer (transaction pooling) ----------------------

struct Central {
    pg: Postgres,
    bouncer: PgBouncer,
}

impl Central {
    fn start() -> Central {
        let pg = Postgres::start();
        let bouncer = PgBouncer::start(&pg);
        Central { pg, bouncer }
    }

    /// The `[sync]` section, reaching PgBouncer as `host`. Short backoff so the tests
    /// measure recovery in seconds (production defaults: 1 s doubling up to 5 min).
    fn sync_section(&self, host: &str) -> String {
        format!(
            "[sync]\nurl = \"postgres://outpost@{host}:{}/outpost\"\npassword = \"{}\"\n\
             sslmode = \"disable\"\ninterval = \"1s\"\nbatch_size = 500\nconnect_timeout = \"3s\"\n\
             statement_timeout = \"10s\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"3s\"\n",
            self.bouncer.port(),
            self.pg.password()
        )
    }

    /// `(uid, value, source)` of every central row of `gateway`, uid as lowercase hex.
    fn rows(&self, gateway: &str) -> Vec<(String, f64, String)> {
        let out = self.pg.psql(&format!(
            "SELECT replace(uid::text, '-', '') || '|' || value || '|' || source \
             FROM outpost.readings WHERE gateway_id = '{gateway}'"
        ));
        out.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let mut parts = l.splitn(3, '|');
                let uid = parts.next().unwrap().to_string();
                let value = parts.next().unwrap().parse().unwrap();
                (uid, value, parts.next().unwrap().to_string())
            })
            .collect()
    }
}

// ---- The agent ------------------------------------------------------------------------

/// The configuration of gateway `gateway`: its database in `dir`, `/health` on `port`,
/// then `body`.
fn config_text(dir: &Path, gateway: &str, port: u16, body: &str) -> String {
    format!(
        "[agent]\ngateway_id = \"{gateway}\"\nsite = \"Outage site\"\n\
         [storage]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n{body}",
        dir.join("outpost.db").display()
    )
}

/// The agent of gateway `gateway` in its own directory, not started yet.
fn agent(gateway: &str, body: &str) -> Agent {
    let port = free_port();
    Agent::in_temp_dir(|dir| config_text(dir, gateway, port, body)).deadline(DEADLINE)
}

/// Starts `agent`; returns once `/health` says ok.
fn start(agent: Agent) -> Agent {
    let agent = agent.start();
    agent.wait_health("the agent to answer /health", |_, h| h["status"] == "ok");
    agent
}

/// `outpost central migrate` through the `[sync]` of `body` (PgBouncer).
fn migrate_central(gateway: &str, body: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, config_text(dir.path(), gateway, 1, body)).unwrap();
    let (code, _, stderr) = outpost(["central", "migrate", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "central migrate: {stderr}");
}

/// The uids `sql` returns, in lower-case hex.
fn uids(agent: &Agent, sql: &str) -> BTreeSet<String> {
    agent
        .strings(sql)
        .into_iter()
        .map(|uid| uid.to_lowercase())
        .collect()
}

/// Everything stored locally up to now reaches central exactly once. Returns
/// (local rows, central rows) at the end and how long the drain took.
fn assert_all_in_central_once(agent: &Agent, central: &Central) -> (usize, usize, Duration) {
    let start = Instant::now();
    let upto = agent.count("SELECT COALESCE(MAX(id), 0) FROM readings");
    while agent.count(&format!(
        "SELECT COUNT(*) FROM readings WHERE id <= {upto} AND synced = 0"
    )) > 0
    {
        assert!(
            start.elapsed() < DEADLINE * 2,
            "the backlog did not drain:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let drained = start.elapsed();
    // Marks move only after the central commit: what is marked now is in central.
    let marked = uids(agent, "SELECT hex(uid) FROM readings WHERE synced = 1");
    let rows = central.rows(agent.gateway_id());
    let all = uids(agent, "SELECT hex(uid) FROM readings");
    let central_uids: BTreeSet<String> = rows.iter().map(|r| r.0.clone()).collect();
    assert_eq!(central_uids.len(), rows.len(), "duplicates in central");
    let missing: Vec<_> = marked.difference(&central_uids).take(5).collect();
    assert!(
        missing.is_empty(),
        "marked synced but not in central: {missing:?}"
    );
    let foreign: Vec<_> = central_uids.difference(&all).take(5).collect();
    assert!(foreign.is_empty(), "in central but not local: {foreign:?}");
    let upto_uids = uids(
        agent,
        &format!("SELECT hex(uid) FROM readings WHERE id <= {upto}"),
    );
    assert!(upto_uids.is_subset(&central_uids));
    (all.len(), rows.len(), drained)
}

fn detail(check: &Value) -> String {
    check["detail"].as_str().unwrap_or_default().to_string()
}

fn source_note(status: &Value, source: &str) -> Option<String> {
    status["source_notes"]
        .as_array()?
        .iter()
        .filter_map(|n| n.as_str())
        .find(|n| n.starts_with(&format!("Source {source}:")))
        .map(str::to_string)
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

// ---- An MQTT publisher that sends at QoS 1 and knows what was acknowledged -----------

/// Publishes `{"value": seq, "ts": ms}` to `sensors/<device>/data` at QoS 1, one
/// message at a time with `mosquitto_pub` (exit 0 = PUBACK received), retrying each
/// message (same payload, so the same uid) until the broker takes it: like a sensor
/// that buffers while its broker is away.
struct Publisher {
    stop: Arc<AtomicBool>,
    attempted: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<u64>>>,
}

const MQTT_SOURCE: &str =
    "[[sources]]\ntype = \"mqtt\"\nname = \"mq\"\ntopics = [\"sensors/+/data\"]\n\
    qos = 1\ndevice_segment = 1\ntimestamp_pointer = \"/ts\"\ntimestamp_format = \"unix_ms\"\n\
    [sources.metrics]\nvalue = \"/value\"\n";

fn mqtt_source(host: &str, port: u16, gateway: &str) -> String {
    format!(
        "{MQTT_SOURCE}[sources.broker]\nhost = \"{host}\"\nport = {port}\ntls = false\n\
         client_id = \"outpost-{gateway}\"\nreconnect_min = \"200ms\"\nreconnect_max = \"2s\"\n"
    )
}

fn mosquitto_pub(port: u16, device: &str, payload: &str) -> bool {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
        .args(["-t", &format!("sensors/{device}/data"), "-m", payload])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Publisher {
    fn start(port: u16, device: &'static str, period: Duration) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let attempted = Arc::new(AtomicU64::new(0));
        let (stop2, attempted2) = (stop.clone(), attempted.clone());
        let thread = std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut seq = 0u64;
            while !stop2.load(Ordering::SeqCst) {
                let ts = chrono::Utc::now().timestamp_millis();
                let payload = format!("{{\"value\": {seq}, \"ts\": {ts}}}");
                attempted2.store(seq + 1, Ordering::SeqCst);
                let mut failures = 0;
                loop {
                    if mosquitto_pub(port, device, &payload) {
                        acked.push(seq);
                        break;
                    }
                    failures += 1;
                    // Once told to stop, give up on a message the broker never takes.
                    if stop2.load(Ordering::SeqCst) && failures > 50 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                seq += 1;
                std::thread::sleep(period);
            }
            acked
        });
        Publisher {
            stop,
            attempted,
            thread: Some(thread),
        }
    }

    /// Stops and returns the acknowledged sequence numbers.
    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Every acknowledged message is stored once locally and in central once; returns
/// (acked, stored locally, in central).
fn assert_published_stored_once(
    agent: &Agent,
    central: &Central,
    acked: &[u64],
    attempted: u64,
) -> (usize, usize, usize) {
    let start = Instant::now();
    let local = loop {
        let conn = agent.conn();
        let mut stmt = conn
            .prepare("SELECT CAST(value AS INTEGER), COUNT(*) FROM readings WHERE source = 'mq' GROUP BY 1")
            .unwrap();
        let local: BTreeMap<u64, i64> = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        if acked.iter().all(|s| local.contains_key(s)) {
            break local;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "acknowledged messages missing locally: {:?}",
            acked
                .iter()
                .filter(|s| !local.contains_key(s))
                .take(10)
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(local.values().all(|&n| n == 1), "a message stored twice");
    assert!(
        local.keys().all(|&s| s < attempted),
        "only what was published is stored"
    );
    assert_all_in_central_once(agent, central);
    let mut in_central: BTreeMap<u64, u32> = BTreeMap::new();
    for (_, value, source) in central.rows(agent.gateway_id()) {
        if source == "mq" {
            *in_central.entry(value as u64).or_default() += 1;
        }
    }
    assert!(in_central.values().all(|&n| n == 1), "twice in central");
    let missing: Vec<_> = acked
        .iter()
        .filter(|s| !in_central.contains_key(s))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not in central: {missing:?}"
    );
    (acked.len(), local.len(), in_central.len())
}

/// The agent with a simulated source (10 readings/s), optionally an MQTT source, and
/// sync to `central` as `central_host`.
fn agent_body(central: &Central, central_host: &str, extra: &str) -> String {
    format!(
        "[[sources]]\ntype = \"simulated\"\nname = \"sim\"\nperiod = \"100ms\"\n{extra}{}",
        central.sync_section(central_host)
    )
}

fn start_synced_agent(gateway: &str, central: &Central, host: &str, extra: &str) -> Agent {
    let body = agent_body(central, host, extra);
    migrate_central(gateway, &body);
    start(agent(gateway, &body))
}

fn readings_between(
    agent: &Agent,
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
) -> i64 {
    agent.count(&format!(
        "SELECT COUNT(*) FROM readings WHERE received_at >= {} AND received_at < {}",
        from.timestamp_micros(),
        to.timestamp_micros()
    ))
}

// ---- 1. Broker restarted while a QoS 1 publisher sends ---------------------------------

#[test]
fn broker_restarts_while_a_qos1_publisher_sends() {
    let central = Central::start();
    let mut broker = Mosquitto::builder().persistence().start();
    let mut agent = start_synced_agent(
        "gw-broker-restart",
        &central,
        "127.0.0.1",
        &mqtt_source("127.0.0.1", broker.port(), "gw-broker-restart"),
    );
    agent.wait_check("source:mq", |c| detail(c) == "connected");
    let publisher = Publisher::start(broker.port(), "room-1", Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(2));
    let mut recoveries = Vec::new();
    for round in 0..3 {
        broker.stop();
        let c = agent.wait_check("source:mq", |c| {
            c["ok"] == false && detail(c).contains("Connection refused")
        });
        assert!(detail(&c).starts_with("disconnected for"), "{c}");
        if round == 0 {
            let note = source_note(&agent.status_json(), "mq").expect("a status note");
            assert!(
                note.contains("DISCONNECTED from the MQTT broker 127.0.0.1:"),
                "{note}"
            );
            assert!(agent.status_text().contains(&note), "text and json agree");
        }
        broker.start_again();
        let back = Instant::now();
        agent.wait_check("source:mq", |c| c["ok"] == true && detail(c) == "connected");
        recoveries.push(back.elapsed());
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(
        source_note(&agent.status_json(), "mq"),
        None,
        "cleared in status"
    );
    let attempted = publisher.attempted.load(Ordering::SeqCst);
    let acked = publisher.finish();
    let (acked, local, in_central) =
        assert_published_stored_once(&agent, &central, &acked, attempted);
    let (rows, central_rows, drained) = assert_all_in_central_once(&agent, &central);
    agent.wait_health("all clear", |_, h| h["status"] == "ok");
    agent.assert_started_once();
    println!(
        "OUTAGE broker-restart: 3 restarts; published+acked {acked}, stored {local}, in central {in_central} \
         (all readings: {rows} local, {central_rows} central, 0 duplicates); reconnected after {} s; drained {}",
        recoveries.iter().map(|d| format!("{:.1}", d.as_secs_f64())).collect::<Vec<_>>().join("/"),
        secs(drained)
    );
}

// ---- 2. Broker unreachable for minutes -------------------------------------------------

#[test]
fn broker_unreachable_for_minutes() {
    let central = Central::start();
    let mut broker = Mosquitto::builder().persistence().start();
    let mut agent = start_synced_agent(
        "gw-broker-down",
        &central,
        "127.0.0.1",
        &mqtt_source("127.0.0.1", broker.port(), "gw-broker-down"),
    );
    agent.wait_check("source:mq", |c| detail(c) == "connected");
    let publisher = Publisher::start(broker.port(), "room-2", Duration::from_millis(50));
    std::thread::sleep(Duration::from_secs(2));

    broker.stop();
    let down_at = chrono::Utc::now();
    agent.wait_check("source:mq", |c| {
        c["ok"] == false && detail(c).contains("Connection refused")
    });
    let h = agent.health().unwrap();
    assert_eq!(h.0, 503, "{}", h.1);
    let note = source_note(&agent.status_json(), "mq").expect("status note");
    assert!(note.contains("DISCONNECTED"), "{note}");
    assert!(agent
        .status_text()
        .contains("Source mq: DISCONNECTED from the MQTT broker"));
    std::thread::sleep(outage().saturating_sub(Duration::from_secs(2)));
    let c = agent.wait_check("source:mq", |c| c["ok"] == false);
    assert!(
        detail(&c).contains("disconnected for"),
        "still shown at the end: {c}"
    );

    broker.start_again();
    let back = Instant::now();
    let back_at = chrono::Utc::now();
    agent.wait_check("source:mq", |c| detail(c) == "connected");
    let reconnected = back.elapsed();
    agent.wait_health("all clear", |_, h| h["status"] == "ok");
    assert_eq!(source_note(&agent.status_json(), "mq"), None);
    std::thread::sleep(Duration::from_secs(2));
    let during = readings_between(&agent, down_at, back_at);
    let attempted = publisher.attempted.load(Ordering::SeqCst);
    let acked = publisher.finish();
    let (acked, local, in_central) =
        assert_published_stored_once(&agent, &central, &acked, attempted);
    let (rows, central_rows, drained) = assert_all_in_central_once(&agent, &central);
    agent.assert_started_once();
    println!(
        "OUTAGE broker-down {}: published+acked {acked}, stored {local}, in central {in_central}; \
         {during} simulated readings stored during the outage; all readings {rows} local, {central_rows} central; \
         reconnected {} after the broker returned; drained {}",
        secs(outage()),
        secs(reconnected),
        secs(drained)
    );
}

// ---- 3. PgBouncer restarted during sync ------------------------------------------------

#[test]
fn pgbouncer_restarts_during_sync() {
    let mut central = Central::start();
    // A busier source: 5 devices every 20 ms, so uploads are in flight when it goes.
    let extra = "[[sources]]\ntype = \"simulated\"\nname = \"busy\"\nperiod = \"20ms\"\n\
                 devices = [\"b1\", \"b2\", \"b3\", \"b4\", \"b5\"]\n";
    let mut agent = start_synced_agent("gw-bouncer", &central, "127.0.0.1", extra);
    agent.wait_check("sync", |c| detail(c).starts_with("last completed round"));
    let mut recoveries = Vec::new();
    for round in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        central.bouncer.stop();
        let c = agent.wait_check("sync", |c| c["ok"] == false);
        assert!(detail(&c).starts_with("failing: "), "{c}");
        assert!(detail(&c).contains("backlog"), "{c}");
        if round == 0 {
            let s = agent.status_json();
            assert_eq!(s["sync"]["failing"], true, "{}", s["sync"]);
            assert!(s["sync"]["last_error"].as_str().is_some());
            assert!(agent
                .status_text()
                .contains("Central sync is FAILING since"));
        }
        central.bouncer.start_again();
        let back = Instant::now();
        agent.wait_check("sync", |c| c["ok"] == true);
        recoveries.push(back.elapsed());
    }
    let s = agent.status_json();
    assert_eq!(s["sync"]["failing"], false);
    assert!(!agent.status_text().contains("FAILING"));
    let (rows, central_rows, drained) = assert_all_in_central_once(&agent, &central);
    agent.wait_health("all clear", |_, h| h["status"] == "ok");
    agent.assert_started_once();
    assert!(!central
        .pg
        .log()
        .to_lowercase()
        .contains("prepared statement"));
    println!(
        "OUTAGE pgbouncer-restart: 3 restarts at ~260 readings/s; {rows} readings local, {central_rows} in central, \
         0 duplicates; sync ok again {} s after PgBouncer returned; drained {}",
        recoveries.iter().map(|d| format!("{:.1}", d.as_secs_f64())).collect::<Vec<_>>().join("/"),
        secs(drained)
    );
}

// ---- 4. PostgreSQL down for minutes behind PgBouncer -----------------------------------

#[test]
fn postgres_down_for_minutes_behind_pgbouncer() {
    let mut central = Central::start();
    let mut agent = start_synced_agent("gw-pg-down", &central, "127.0.0.1", "");
    agent.wait_check("sync", |c| detail(c).starts_with("last completed round"));

    central.pg.stop_immediate();
    let down_at = chrono::Utc::now();
    let c = agent.wait_check("sync", |c| c["ok"] == false);
    assert!(detail(&c).starts_with("failing: "), "{c}");
    let error = agent.status_json()["sync"]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    let first_backlog = agent.status_json()["backlog"]["rows"].as_i64().unwrap();
    std::thread::sleep(outage().saturating_sub(Duration::from_secs(1)));
    let s = agent.status_json();
    assert_eq!(s["sync"]["failing"], true, "{}", s["sync"]);
    let backlog = s["backlog"]["rows"].as_i64().unwrap();
    assert!(
        backlog > first_backlog,
        "the backlog grows: {first_backlog} -> {backlog}"
    );
    let text = agent.status_text();
    assert!(text.contains("Central sync is FAILING since"), "{text}");
    let c = health_check(&agent.health().unwrap().1, "sync")
        .unwrap()
        .clone();
    assert!(
        !c["ok"].as_bool().unwrap() && detail(&c).contains("backlog"),
        "{c}"
    );

    central.pg.start_again();
    let back = Instant::now();
    let back_at = chrono::Utc::now();
    agent.wait_check("sync", |c| c["ok"] == true);
    let recovered = back.elapsed();
    let during = readings_between(&agent, down_at, back_at);
    let (rows, central_rows, drained) = assert_all_in_central_once(&agent, &central);
    agent.wait_health("all clear", |_, h| h["status"] == "ok");
    assert_eq!(agent.status_json()["sync"]["failing"], false);
    agent.assert_started_once();
    println!(
        "OUTAGE postgres-down {}: {during} readings stored during the outage, backlog peaked at >= {backlog}; \
         {rows} local, {central_rows} in central, 0 duplicates; sync ok {} after PostgreSQL returned, \
         backlog drained {} later; error shown: {error}",
        secs(outage()),
        secs(recovered),
        secs(drained)
    );
}

// ---- 5. SMTP server down while an alert fires ------------------------------------------

const ALERT: &str =
    "[[alerts]]\nname = \"room-warm\"\nkind = \"threshold\"\ndevices = [\"room-*\"]\n\
    metric = \"value\"\nabove = 8.0\nclear = 6.0\nseverity = \"critical\"\n";

fn publish_value(broker: &Mosquitto, device: &str, value: f64) {
    let payload = format!(
        "{{\"value\": {value}, \"ts\": {}}}",
        chrono::Utc::now().timestamp_millis()
    );
    assert!(mosquitto_pub(broker.port(), device, &payload));
}

#[test]
fn smtp_down_while_an_alert_fires_delivers_after_it_returns() {
    let central = Central::start();
    let broker = Mosquitto::start();
    let mut smtp = SmtpServer::start(SmtpOptions::new());
    let extra = format!(
        "{}{ALERT}notifiers = [\"mail\"]\n[[notifiers]]\nname = \"mail\"\ntype = \"email\"\n\
         server = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nfrom = \"outpost@example.com\"\n\
         to = [\"oncall@example.com\"]\ntimeout = \"3s\"\nretry_initial = \"200ms\"\nretry_max = \"3s\"\n",
        mqtt_source("127.0.0.1", broker.port(), "gw-smtp"),
        smtp.port()
    );
    let mut agent = start_synced_agent("gw-smtp", &central, "127.0.0.1", &extra);
    agent.wait_check("source:mq", |c| detail(c) == "connected");

    smtp.stop();
    publish_value(&broker, "room-5", 4.0);
    publish_value(&broker, "room-5", 12.5);
    let c = agent.wait_check("notifications", |c| c["ok"] == false);
    assert!(detail(&c).contains("last error (mail"), "{c}");
    let shown = detail(&c);
    let s = agent.status_json();
    assert_eq!(s["alerts"]["firing"].as_array().unwrap().len(), 1);
    assert_eq!(s["alerts"]["notifications_pending"], 1);
    let problem = &s["alerts"]["notifications"][0];
    assert_eq!(problem["state"], "pending");
    assert!(problem["last_error"].as_str().is_some(), "{problem}");
    let text = agent.status_text();
    assert!(text.contains("Alerts: 1 FIRING"), "{text}");
    assert!(text.contains("Notifications: 1 pending"), "{text}");
    std::thread::sleep(outage() / 2);
    // It resolves while the server is still down: a second mail waits behind the first.
    publish_value(&broker, "room-5", 3.0);
    std::thread::sleep(outage() / 2);
    agent.wait_check("notifications", |c| c["ok"] == false);
    let attempts = agent.status_json()["alerts"]["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["attempts"].as_i64().unwrap())
        .max()
        .unwrap();
    assert!(attempts >= 2, "retried while down: {attempts}");

    smtp.start_again();
    let back = Instant::now();
    let mails = smtp.wait_for_messages(2, DEADLINE);
    let delivered = back.elapsed();
    // In the order they were raised, although the younger one's backoff was shorter.
    assert!(
        mails[0].data_str().contains("Subject: FIRING [critical]"),
        "{}",
        mails[0].data_str()
    );
    assert!(mails[1].data_str().contains("Subject: RESOLVED [critical]"));
    agent.wait_check("notifications", |c| {
        c["ok"] == true && detail(c) == "none pending"
    });
    let cleared = back.elapsed();
    let s = agent.status_json();
    assert_eq!(s["alerts"]["notifications_pending"], 0);
    assert!(agent.status_text().contains("Notifications: none pending"));
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM outbox WHERE state = 'delivered'"),
        2
    );
    let (rows, central_rows, _) = assert_all_in_central_once(&agent, &central);
    agent.wait_health("all clear", |_, h| h["status"] == "ok");
    agent.assert_started_once();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(smtp.messages().len(), 2, "each mail once");
    println!(
        "OUTAGE smtp-down {}: 2 mails (firing, resolved) queued, {attempts} attempts for the first; both delivered \
         in order {} after the SMTP server returned, health clear after {}; {rows} readings local, \
         {central_rows} central; health showed: {shown}",
        secs(outage()),
        secs(delivered),
        secs(cleared),
    );
}

// ---- 6. Webhook answering 500, then timing out, then recovering ------------------------

#[test]
fn webhook_500_then_timeouts_then_recovery() {
    let central = Central::start();
    let broker = Mosquitto::start();
    // 0: 500, 1: answers after 5 s (the notifier gives up after 1 s), 2: 200.
    let mode = Arc::new(AtomicU8::new(0));
    let m = mode.clone();
    let hook = HttpReceiver::start_with(move |_| match m.load(Ordering::SeqCst) {
        0 => Reply::status(500),
        1 => Reply::ok().delay(Duration::from_secs(5)),
        _ => Reply::ok(),
    });
    let extra = format!(
        "{}{ALERT}notifiers = [\"hook\"]\n[[notifiers]]\nname = \"hook\"\ntype = \"webhook\"\n\
         url = \"{}/alerts\"\ntimeout = \"1s\"\nretry_initial = \"200ms\"\nretry_max = \"3s\"\n",
        mqtt_source("127.0.0.1", broker.port(), "gw-hook"),
        hook.url()
    );
    let mut agent = start_synced_agent("gw-hook", &central, "127.0.0.1", &extra);
    agent.wait_check("source:mq", |c| detail(c) == "connected");

    publish_value(&broker, "room-6", 11.0);
    let c = agent.wait_check("notifications", |c| {
        c["ok"] == false && detail(c).contains("the webhook answered 500")
    });
    assert!(detail(&c).contains("last error (hook"), "{c}");
    let text = agent.status_text();
    assert!(text.contains("the webhook answered 500"), "{text}");
    std::thread::sleep(outage() / 2);

    mode.store(1, Ordering::SeqCst);
    let c = agent.wait_check("notifications", |c| {
        detail(c).contains("the webhook did not answer in time")
    });
    assert_eq!(c["ok"], false);
    let s = agent.status_json();
    assert_eq!(
        s["alerts"]["notifications"][0]["last_error"],
        "the webhook did not answer in time"
    );
    std::thread::sleep(outage() / 2);

    mode.store(2, Ordering::SeqCst);
    let back = Instant::now();
    agent.wait_check("notifications", |c| {
        c["ok"] == true && detail(c) == "none pending"
    });
    let cleared = back.elapsed();
    let requests = hook.requests();
    let keys: BTreeSet<_> = requests
        .iter()
        .map(|r| r.header("idempotency-key").unwrap_or_default().to_string())
        .collect();
    assert_eq!(keys.len(), 1, "one notification, one idempotency key");
    let attempts = agent.count("SELECT attempts FROM outbox");
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM outbox WHERE state = 'delivered'"),
        1
    );
    assert!(agent.status_text().contains("Notifications: none pending"));
    let (rows, central_rows, _) = assert_all_in_central_once(&agent, &central);
    agent.wait_health("all clear", |_, h| h["status"] == "ok");
    agent.assert_started_once();
    println!(
        "OUTAGE webhook {}: 500s for {}, then timeouts for {}; delivered on attempt {attempts} ({} requests, one key), \
         health clear {} after the webhook recovered; {rows} readings local, {central_rows} central",
        secs(outage()),
        secs(outage() / 2),
        secs(outage() / 2),
        requests.len(),
        secs(cleared)
    );
}

// ---- 7. Name resolution fails for a while ---------------------------------------------

/// Whether this process may create a mount namespace and bind-mount over /etc files.
fn can_unshare() -> Result<(), String> {
    if !support::util::is_root() {
        return Err("not root: cannot bind-mount over /etc/hosts".into());
    }
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--",
            "sh",
            "-c",
            "mount --bind /etc/hosts /etc/hosts",
        ])
        .output()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "unshare --mount failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn is_resolution_error(text: &str) -> bool {
    let t = text.to_lowercase();
    t.contains("lookup") || t.contains("resolve") || t.contains("name or service")
}

const HOSTS_OK: &str = "127.0.0.1 localhost\n127.0.0.1 outpost-broker.test outpost-central.test\n";
const HOSTS_BROKEN: &str = "127.0.0.1 localhost\n";

#[test]
fn dns_failure_for_a_while_then_recovery() {
    // The agent runs in its own mount namespace where /etc/hosts is a file this test
    // edits in place (glibc reads it on every lookup) and /etc/nsswitch.conf says
    // `hosts: files`, so a removed name fails at once instead of asking a real DNS
    // server. The broker and central are reached by those names only.
    if let Err(why) = can_unshare() {
        println!("SKIPPED dns_failure_for_a_while_then_recovery: {why}");
        return;
    }
    let mut central = Central::start();
    let mut broker = Mosquitto::builder().persistence().start();
    let files = tempfile::tempdir().unwrap();
    let hosts = files.path().join("hosts");
    let nsswitch = files.path().join("nsswitch.conf");
    std::fs::write(&hosts, HOSTS_OK).unwrap();
    std::fs::write(&nsswitch, "passwd: files\ngroup: files\nhosts: files\n").unwrap();
    let body = agent_body(
        &central,
        "outpost-central.test",
        &mqtt_source("outpost-broker.test", broker.port(), "gw-dns"),
    );
    // The schema goes in by address, from outside the namespace.
    migrate_central("gw-dns", &agent_body(&central, "127.0.0.1", ""));
    let in_namespace: Vec<&std::ffi::OsStr> = vec![
        "unshare".as_ref(),
        "--mount".as_ref(),
        "--".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        "mount --bind \"$1\" /etc/hosts && mount --bind \"$2\" /etc/nsswitch.conf \
         && shift 2 && exec \"$@\""
            .as_ref(),
        "sh".as_ref(),
        hosts.as_os_str(),
        nsswitch.as_os_str(),
    ];
    let mut agent = start(agent("gw-dns", &body).through(&in_namespace));
    agent.wait_check("source:mq", |c| detail(c) == "connected");
    agent.wait_check("sync", |c| detail(c).starts_with("last completed round"));
    let publisher = Publisher::start(broker.port(), "room-7", Duration::from_millis(50));
    std::thread::sleep(Duration::from_secs(2));

    // The names stop resolving; both peers drop their connections, so the agent must
    // look the names up again to reconnect.
    std::fs::write(&hosts, HOSTS_BROKEN).unwrap();
    let down_at = chrono::Utc::now();
    broker.restart();
    central.bouncer.restart();
    // The first error may be the dropped connection; the lookups fail next.
    let c = agent.wait_check("source:mq", |c| {
        c["ok"] == false && is_resolution_error(&detail(c))
    });
    let source_error = detail(&c);
    let c = agent.wait_check("sync", |c| {
        c["ok"] == false && is_resolution_error(&detail(c))
    });
    let sync_error = detail(&c);
    let s = agent.status_json();
    assert_eq!(s["sync"]["failing"], true);
    assert!(source_note(&s, "mq").is_some_and(|n| n.contains("outpost-broker.test")));
    std::thread::sleep(outage().saturating_sub(Duration::from_secs(2)));
    agent.wait_check("source:mq", |c| c["ok"] == false);
    agent.wait_check("sync", |c| c["ok"] == false);

    std::fs::write(&hosts, HOSTS_OK).unwrap();
    let back = Instant::now();
    let back_at = chrono::Utc::now();
    agent.wait_check("source:mq", |c| detail(c) == "connected");
    let mqtt_back = back.elapsed();
    agent.wait_check("sync", |c| c["ok"] == true);
    let sync_back = back.elapsed();
    agent.wait_health("all clear", |_, h| h["status"] == "ok");
    let s = agent.status_json();
    assert_eq!(s["sync"]["failing"], false);
    assert_eq!(source_note(&s, "mq"), None);
    std::thread::sleep(Duration::from_secs(2));
    let during = readings_between(&agent, down_at, back_at);
    let attempted = publisher.attempted.load(Ordering::SeqCst);
    let acked = publisher.finish();
    let (acked, local, in_central) =
        assert_published_stored_once(&agent, &central, &acked, attempted);
    let (rows, central_rows, drained) = assert_all_in_central_once(&agent, &central);
    agent.assert_started_once();
    println!(
        "OUTAGE dns {}: published+acked {acked}, stored {local}, in central {in_central}; {during} readings stored \
         during the outage; {rows} local, {central_rows} central; MQTT back {} and sync ok {} after the names \
         resolved again; drained {}; health showed: {source_error} | {sync_error}",
        secs(outage()),
        secs(mqtt_back),
        secs(sync_back),
        secs(drained)
    );
}
