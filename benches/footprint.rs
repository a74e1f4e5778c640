//! Footprint of the real `outpost run` binary: resident memory after an idle period with
//! a TTN, a serial and a sync section configured, then while ingesting about 1,000
//! readings/s (300 TTN uplinks/s with three fields each, plus 100 serial lines/s).
//! The raw baseline in the same run is `mosquitto_sub` subscribed to the same uplinks.
//!
//!     cargo bench --bench footprint
//!     FOOTPRINT_IDLE_SECS=60 FOOTPRINT_LOAD_SECS=30 cargo bench --bench footprint
//!
//! `FOOTPRINT_BINARY=PATH` runs another `outpost` binary (e.g. a copy of main's) with
//! the same harness, for before/after runs back to back.
//!
//! Sync points at a closed port (a site whose uplink is down): the worker retries with
//! backoff and the backlog grows, which is the case where memory must stay flat.

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident and peak resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let field = status_fields(pid);
    (field("VmRSS:"), field("VmHWM:"))
}

/// A reader of the KiB fields of `/proc/PID/status` (0 for a missing one).
fn status_fields(pid: u32) -> impl Fn(&str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    move |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// The `outpost` binary to measure: `FOOTPRINT_BINARY`, else this build's.
fn binary() -> std::path::PathBuf {
    std::env::var_os("FOOTPRINT_BINARY")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_outpost").into())
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not become ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn uplink(i: u64) -> String {
    let mut up: serde_json::Value =
        serde_json::from_str(include_str!("../tests/fixtures/ttn-uplink.json")).unwrap();
    up["end_device_ids"]["device_id"] = format!("dev-{}", i % 20).into();
    up["uplink_message"]["f_cnt"] = i.into();
    up["uplink_message"]["received_at"] = chrono::Utc::now().to_rfc3339().into();
    up["uplink_message"]["decoded_payload"] = serde_json::json!({
        "TempC_SHT": -17.9 + (i % 10) as f64 / 10.0, "Hum_SHT": 44.2, "BatV": 3.046
    });
    up.to_string()
}

fn write_config(dir: &Path, mqtt_port: u16, serial: &Path) -> std::path::PathBuf {
    let path = dir.join("outpost.toml");
    std::fs::write(
        &path,
        format!(
            r#"[agent]
gateway_id = "bench"
[storage]
path = "{db}"
[http]
listen = "127.0.0.1:{http}"
[sync]
enabled = true
url = "postgres://outpost@127.0.0.1:1/fleet"
password = "unused"
sslmode = "disable"
[[sources]]
type = "ttn"
name = "ttn"
application = "bench-app"
tenant = "ttn"
api_key = "NNSXS.bench"
[sources.broker]
host = "127.0.0.1"
port = {mqtt_port}
tls = false
[sources.backfill]
enabled = false
[[sources]]
type = "serial"
name = "station"
path = "{serial}"
format = "json"
[sources.fields]
device = "station-1"
"#,
            db = dir.join("outpost.db").display(),
            http = free_port(),
            serial = serial.display(),
        ),
    )
    .unwrap();
    path
}

fn main() {
    // `cargo test` builds benches but runs them only with `--bench`.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let idle = env_secs("FOOTPRINT_IDLE_SECS", 60);
    let load = env_secs("FOOTPRINT_LOAD_SECS", 30);
    let dir = tempfile::tempdir().unwrap();

    let mqtt_port = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {mqtt_port} 127.0.0.1\nallow_anonymous true\nuser root\npersistence false\n"
        ),
    )
    .unwrap();
    let _broker = Killed(
        Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto"),
    );
    wait_for("mosquitto", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", mqtt_port)).is_ok()
    });

    let (dev, peer) = (dir.path().join("dev"), dir.path().join("peer"));
    let _pty = Killed(
        Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", dev.display()))
            .arg(format!("pty,raw,echo=0,link={}", peer.display()))
            .stderr(Stdio::null())
            .spawn()
            .expect("socat"),
    );
    wait_for("the pty pair", Duration::from_secs(10), || {
        dev.exists() && peer.exists()
    });

    let config = write_config(dir.path(), mqtt_port, &dev);
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let agent = Killed(
        Command::new(binary())
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let baseline = Killed(
        Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &mqtt_port.to_string(),
                "-t",
                "v3/#",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    println!("footprint: idle {idle}s, then ~1000 readings/s for {load}s (release binary)");
    std::thread::sleep(Duration::from_secs(idle));
    let (agent_idle, _) = rss_kib(agent.0.id());
    let anon_idle = status_fields(agent.0.id())("RssAnon:");
    let (base_idle, _) = rss_kib(baseline.0.id());
    println!(
        "  idle     outpost RSS {:>6} KiB   mosquitto_sub RSS {:>6} KiB   ratio {:.1}",
        agent_idle,
        base_idle,
        agent_idle as f64 / base_idle.max(1) as f64
    );

    // Load: 300 uplinks/s (900 readings) + 100 serial lines/s.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut serial = std::fs::OpenOptions::new().write(true).open(&peer).unwrap();
    let mut options = rumqttc::MqttOptions::new("footprint-publisher", "127.0.0.1", mqtt_port);
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
    let (mut peak_agent, mut peak_base, mut sum_agent, mut samples) = (0u64, 0u64, 0u64, 0u64);
    let mut peak_anon = 0u64;
    rt.block_on(async {
        let poll = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut i = 0u64;
        while start.elapsed() < Duration::from_secs(load) {
            tick.tick().await;
            // Every 10 ms: 3 uplinks and 1 serial line.
            for _ in 0..3 {
                let topic = format!("v3/bench-app@ttn/devices/dev-{}/up", i % 20);
                let _ = client
                    .publish(topic, rumqttc::QoS::AtMostOnce, false, uplink(i))
                    .await;
                i += 1;
            }
            let _ = writeln!(
                serial,
                "{{\"temperature\": {:.1}}}",
                20.0 + (i % 7) as f64 / 10.0
            );
            if i % 300 == 0 {
                let (a, _) = rss_kib(agent.0.id());
                let (b, _) = rss_kib(baseline.0.id());
                peak_agent = peak_agent.max(a);
                peak_anon = peak_anon.max(status_fields(agent.0.id())("RssAnon:"));
                peak_base = peak_base.max(b);
                sum_agent += a;
                samples += 1;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        poll.abort();
        println!("  published {i} uplinks and {} serial lines", i / 3);
    });
    let avg = sum_agent / samples.max(1);
    println!(
        "  loaded   outpost RSS avg {avg:>6} KiB, peak {peak_agent:>6} KiB   mosquitto_sub peak {peak_base:>6} KiB   ratio {:.1}",
        peak_agent as f64 / peak_base.max(1) as f64
    );
    println!("  outpost RssAnon idle {anon_idle:>6} KiB, loaded peak {peak_anon:>6} KiB (heap, stacks, SQLite caches)");
    let conn = rusqlite::Connection::open(dir.path().join("outpost.db")).unwrap();
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))
        .unwrap();
    let unsynced: i64 = conn
        .query_row("SELECT COUNT(*) FROM readings WHERE synced = 0", [], |r| {
            r.get(0)
        })
        .unwrap();
    println!("  stored {rows} readings ({unsynced} waiting for central, which is unreachable)");
    let binary = std::fs::metadata(binary()).map(|m| m.len()).unwrap_or(0);
    println!(
        "  binary size (this build): {:.1} MiB",
        binary as f64 / (1 << 20) as f64
    );
}
