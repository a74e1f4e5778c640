//! MQTT backlog drain benchmark (issue 12): a private mosquitto (`max_queued_messages
//! 0`, default in-flight window) holds the same backlog of ChirpStack v4 uplinks
//! (about 470 bytes, two numeric fields) for two persistent QoS 1 sessions:
//!
//! - **mosquitto_sub** (`-c -i ID -q 1 -C N`), the raw baseline: receives and
//!   acknowledges every message, stores nothing;
//! - **outpost**: the real `outpost run` binary (release) with a ChirpStack source:
//!   decodes, commits with `synchronous=FULL`, then acknowledges.
//!
//! Both sessions are created first (subscribed, then disconnected), the backlog is
//! published once (so both queues hold the same messages), and each drains it in turn
//! from its own start until the last message is received (mosquitto_sub) or committed
//! (outpost). Prints both rates, their ratio and the agent's peak RSS (`VmHWM`).
//!
//! `cargo bench --bench mqtt_backlog`; `OUTPOST_BACKLOG=N` changes the backlog (default
//! 200,000).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::agent::{db_i64, proc_status_kib, AgentProcess};
use support::Mosquitto;

const APP: &str = "0b9c3a52-6f0e-4d1a-9c3e-5a7b8c9d0e1f";
const DEV_EUI: &str = "70b3d57ed0000001";
const AGENT_ID: &str = "outpost-bench-backlog";
const SUB_ID: &str = "mosquitto-sub-bench-backlog";

fn topic() -> String {
    format!("application/{APP}/device/{DEV_EUI}/event/up")
}

/// Uplink `n`: a ChirpStack v4 JSON event, its uid derived from `n`.
fn uplink(n: u64) -> String {
    let at = (chrono::Utc::now() + chrono::Duration::milliseconds(n as i64))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    serde_json::json!({
        "deduplicationId": format!("bench-backlog-{n}"),
        "time": at,
        "deviceInfo": {
            "tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242",
            "applicationId": APP,
            "deviceName": "bench-1",
            "devEui": DEV_EUI,
            "tags": { "room": "bench" }
        },
        "fCnt": n + 1,
        "fPort": 2,
        "object": { "temperature": 2.0 + (n % 7) as f64 / 10.0, "battery": 3.0 },
        "rxInfo": [{ "gatewayId": "0016c001f153a14c", "rssi": -80, "snr": 7.5, "nsTime": at }]
    })
    .to_string()
}

fn stored(db: &Path) -> i64 {
    db_i64(db, "SELECT COUNT(*) FROM readings").unwrap_or(0)
}

/// `mosquitto_sub` on the persistent session: `-C count` exits after that many.
fn sub(broker: &Mosquitto, count: u64) -> Command {
    let mut cmd = Command::new("mosquitto_sub");
    cmd.args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .args(["-c", "-i", SUB_ID, "-q", "1", "-t", &topic()])
        .args(["-C", &count.to_string()])
        .stdout(Stdio::null());
    cmd
}

fn main() {
    // `cargo test` builds benches but runs them only with `--bench`.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let n: u64 = std::env::var("OUTPOST_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let dir = tempfile::tempdir().expect("temporary directory");
    let db = dir.path().join("outpost.db");
    let config = dir.path().join("outpost.toml");
    let log = dir.path().join("agent.log");
    std::fs::write(
        &config,
        format!(
            r#"[agent]
gateway_id = "bench-gw"
[storage]
path = "{db}"
[http]
enabled = false
[[sources]]
type = "chirpstack"
name = "cs"
application_id = "{APP}"
[sources.broker]
host = "127.0.0.1"
port = {port}
tls = false
client_id = "{AGENT_ID}"
"#,
            db = db.display(),
            port = broker.port()
        ),
    )
    .expect("write the configuration");

    // Both sessions subscribe once, with a probe each receives, then disconnect.
    let mut probe_sub = sub(&broker, 1).spawn().expect("mosquitto_sub");
    let mut agent = AgentProcess::run(&config, &log);
    let ready = support::wait_until(Duration::from_secs(60), || {
        broker.publish_lines(&topic(), 1, [uplink(1_000_000_000)]);
        support::wait_until(Duration::from_millis(500), || {
            stored(&db) > 0 && matches!(probe_sub.try_wait(), Ok(Some(_)))
        })
    });
    assert!(ready, "the sessions were not created");
    agent.terminate(Duration::from_secs(20));
    let _ = probe_sub.kill();
    let _ = probe_sub.wait();
    let before = stored(&db);

    let published = Instant::now();
    broker.publish_lines(&topic(), 1, (0..n).map(uplink));
    let publish_secs = published.elapsed().as_secs_f64();

    // The raw baseline drains its copy of the backlog.
    let started = Instant::now();
    let status = sub(&broker, n).status().expect("mosquitto_sub");
    let sub_secs = started.elapsed().as_secs_f64();
    assert!(status.success(), "mosquitto_sub failed");

    // The agent drains the same backlog.
    let want = before + 2 * n as i64;
    let started = Instant::now();
    let agent = AgentProcess::run(&config, &log);
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut peak_rss_kib = 0;
    while stored(&db) < want && Instant::now() < deadline {
        peak_rss_kib = proc_status_kib(agent.pid(), "VmHWM").unwrap_or(peak_rss_kib);
        std::thread::sleep(Duration::from_millis(50));
    }
    let agent_secs = started.elapsed().as_secs_f64();
    peak_rss_kib = proc_status_kib(agent.pid(), "VmHWM").unwrap_or(peak_rss_kib);
    let done = stored(&db) - before;
    let timeouts = broker.timeouts();
    drop(agent);

    let sub_rate = n as f64 / sub_secs;
    let agent_rate = n as f64 / agent_secs;
    println!(
        "MQTT backlog benchmark: {n} ChirpStack uplinks (QoS 1) queued for two persistent sessions"
    );
    println!("  published in                        {publish_secs:.1}s");
    println!("  mosquitto_sub -c -q 1 drained all in {sub_secs:.1}s → {sub_rate:.0} uplinks/s");
    println!("  outpost committed all in            {agent_secs:.1}s → {agent_rate:.0} uplinks/s");
    println!(
        "  ratio outpost / mosquitto_sub        {:.2}",
        agent_rate / sub_rate
    );
    println!(
        "  peak RSS of the agent (VmHWM)        {} MiB",
        peak_rss_kib / 1024
    );
    println!("  readings stored {done} (expected {})", 2 * n);
    println!("  broker timeouts of a client          {}", timeouts.len());
    if done != 2 * n as i64 || !timeouts.is_empty() {
        println!("  INCOMPLETE");
        std::process::exit(1);
    }
}
