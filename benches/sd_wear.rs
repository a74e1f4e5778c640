//! SD-card wear: bytes the agent writes to disk per reading at a realistic site rate.
//!
//!     cargo bench --bench sd_wear                              # 10 min at the real rate
//!     WEAR_SPEED=10 WEAR_SECS=300 cargo bench --bench sd_wear  # 10x rate for 5 min
//!     WEAR_STORAGE='batch_max_delay = "1s"' cargo bench --bench sd_wear
//!     WEAR_STORAGE='ttn_commit_delay = "0s"' cargo bench --bench sd_wear  # as before it
//!
//! 200 LoRaWAN sensors (`WEAR_SENSORS`) each report once a minute (`WEAR_PERIOD_S`)
//! through The Things Stack's MQTT API (mosquitto here) to the release `outpost run`,
//! one reading per uplink. The sensors' phases are spread evenly, so uplinks arrive one
//! at a time, every 300 ms; `WEAR_SPEED=10` shortens every gap tenfold (30 ms) rather
//! than sending bursts, so readings still arrive individually. Sync runs against a real
//! PostgreSQL (interval 10 s, so synced marks are written), with the example alert
//! rules (threshold, rate, stale) and a log notifier, so the engine's cursor is saved.
//!
//! After `WEAR_WARMUP_S` (default 60 s, at the configured speed) the bench reads the
//! agent's `/proc/<pid>/io` (`write_bytes`: bytes it sent to the block layer, counted
//! when a page is dirtied, which includes WAL appends, checkpoints into the database
//! file and the mmapped `-shm` index), then again after `WEAR_SECS`, and reports bytes
//! per reading, bytes per second and write syscalls. A second connection polls the
//! newest reading id every 5 ms to time each uplink from publish to commit.
//! `WEAR_STORAGE` is added to `[storage]` (e.g. to compare `batch_max_delay`, or
//! `ttn_commit_delay = "0s"`, which commits TTN readings as every other source's: the
//! behaviour before that setting, the same-build baseline).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Default, Clone, Copy)]
struct Io {
    write_bytes: u64,
    wchar: u64,
    syscw: u64,
}

fn proc_io(pid: u32) -> Io {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Io {
        write_bytes: field("write_bytes:"),
        wchar: field("wchar:"),
        syscw: field("syscw:"),
    }
}

fn max_id(conn: &rusqlite::Connection) -> i64 {
    conn.query_row("SELECT COALESCE(MAX(id), 0) FROM readings", [], |r| {
        r.get(0)
    })
    .unwrap_or(0)
}

fn metric(port: u16, name: &str) -> f64 {
    support::agent::http_get(port, "/metrics")
        .map(|(_, body)| {
            body.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        })
        .unwrap_or(0.0)
}

fn uplink(device: usize, f_cnt: u64, value: f64) -> String {
    let mut up: serde_json::Value =
        serde_json::from_str(include_str!("../tests/fixtures/ttn-uplink.json")).unwrap();
    up["end_device_ids"]["device_id"] = format!("sensor-{device:03}").into();
    up["uplink_message"]["f_cnt"] = f_cnt.into();
    up["uplink_message"]["received_at"] = chrono::Utc::now().to_rfc3339().into();
    up["uplink_message"]["decoded_payload"] = serde_json::json!({ "TempC_SHT": value });
    up.to_string()
}

fn write_config(dir: &Path, mqtt: u16, http: u16, pg: &support::Postgres) -> std::path::PathBuf {
    let path = dir.join("outpost.toml");
    let extra = std::env::var("WEAR_STORAGE").unwrap_or_default();
    std::fs::write(
        &path,
        format!(
            r#"[agent]
gateway_id = "wear"
[storage]
path = "{db}"
{extra}
[http]
listen = "127.0.0.1:{http}"
[sync]
url = "postgres://{user}@127.0.0.1:{port}/{database}"
password = "{password}"
sslmode = "disable"
[[sources]]
type = "ttn"
name = "ttn"
application = "wear-app"
tenant = "ttn"
api_key = "NNSXS.wear"
[sources.broker]
host = "127.0.0.1"
port = {mqtt}
tls = false
[sources.backfill]
enabled = false
[sources.mapping.fields]
TempC_SHT = {{ metric = "temperature", unit = "°C" }}
[[alerts]]
name = "coldroom-warm"
kind = "threshold"
metric = "temperature"
above = 8.0
clear = 6.0
for = "5m"
severity = "critical"
notifiers = ["journal"]
[[alerts]]
name = "sensor-silent"
kind = "stale"
metric = "temperature"
after = "15m"
notifiers = ["journal"]
[[alerts]]
name = "coldroom-rising"
kind = "rate"
metric = "temperature"
delta = 3.0
period = "10m"
notifiers = ["journal"]
[[notifiers]]
name = "journal"
type = "log"
"#,
            db = dir.join("outpost.db").display(),
            user = pg.user(),
            port = pg.port(),
            database = pg.database(),
            password = pg.password(),
        ),
    )
    .unwrap();
    path
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    // `cargo test` builds benches but runs them only with `--bench`.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let speed = env_f64("WEAR_SPEED", 1.0);
    let secs = env_f64("WEAR_SECS", 600.0);
    let warmup = env_f64("WEAR_WARMUP_S", 60.0);
    let sensors = env_f64("WEAR_SENSORS", 200.0) as usize;
    let period = env_f64("WEAR_PERIOD_S", 60.0);
    let gap = Duration::from_secs_f64(period / sensors as f64 / speed);

    // The database must be on a real disk: tmpfs writes are not counted as write_bytes.
    let dir = tempfile::Builder::new()
        .prefix("outpost-wear-")
        .tempdir_in(std::env::var("WEAR_DIR").unwrap_or_else(|_| "/var/tmp".into()))
        .unwrap();
    let pg = support::Postgres::start();
    pg.outpost_central_migrate();
    let broker = support::Mosquitto::start();
    let http = support::free_port();
    let config = write_config(dir.path(), broker.port(), http, &pg);
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let agent = support::agent::AgentProcess(
        Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let pid = agent.0.id();
    support::agent::wait_for_some(Duration::from_secs(30), || {
        support::agent::http_get(http, "/health")
    });
    std::thread::sleep(Duration::from_secs(2));
    println!(
        "sd_wear: {sensors} sensors every {period} s at {speed}x (one uplink every {:.0} ms), \
         warm-up {warmup} s, measured {secs} s; [storage] extra: {:?}",
        gap.as_secs_f64() * 1000.0,
        std::env::var("WEAR_STORAGE").unwrap_or_default()
    );

    let db = dir.path().join("outpost.db");
    let reader = outpost::store::open_reader(&db, Duration::from_secs(5)).unwrap();
    let base_id = max_id(&reader);
    // Publish times by message index; commit-visible times by reading id.
    let published: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let committed: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (committed, stop) = (committed.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = base_id;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let now_max = max_id(&reader);
                if now_max > last {
                    let at = Instant::now();
                    let mut c = committed.lock().unwrap();
                    for id in last + 1..=now_max {
                        c.push((id, at));
                    }
                    last = now_max;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mqtt_port = broker.port();
    let (start_io, end_io, measured_from, measured_to, start_metrics, end_metrics) =
        rt.block_on(async {
            let mut options = rumqttc::MqttOptions::new("wear-publisher", "127.0.0.1", mqtt_port);
            options.set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
            let poll = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
            let begin = tokio::time::Instant::now();
            let warm_until = begin + Duration::from_secs_f64(warmup);
            let end = warm_until + Duration::from_secs_f64(secs);
            let mut tick = tokio::time::interval(gap);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut i = 0u64;
            let mut start = None;
            while tokio::time::Instant::now() < end {
                tick.tick().await;
                if start.is_none() && tokio::time::Instant::now() >= warm_until {
                    let id = {
                        let conn =
                            outpost::store::open_reader(&db, Duration::from_secs(5)).unwrap();
                        max_id(&conn)
                    };
                    start = Some((
                        proc_io(pid),
                        Instant::now(),
                        id,
                        (
                            metric(http, "outpost_store_commits_total"),
                            metric(http, "outpost_backlog_rows"),
                        ),
                    ));
                }
                let device = (i % sensors as u64) as usize;
                let value =
                    4.0 + ((i / sensors as u64) % 20) as f64 / 10.0 + device as f64 / 1000.0;
                let topic = format!("v3/wear-app@ttn/devices/sensor-{device:03}/up");
                published.lock().unwrap().push(Instant::now());
                let _ = client
                    .publish(
                        topic,
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        uplink(device, i / sensors as u64, value),
                    )
                    .await;
                i += 1;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (io0, t0, id0, m0) = start.expect("the run is longer than its warm-up");
            let id1 = {
                let conn = outpost::store::open_reader(&db, Duration::from_secs(5)).unwrap();
                max_id(&conn)
            };
            let io1 = proc_io(pid);
            let m1 = (
                metric(http, "outpost_store_commits_total"),
                metric(http, "outpost_backlog_rows"),
            );
            poll.abort();
            (io0, io1, (t0, id0), (Instant::now(), id1), m0, m1)
        });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    poller.join().unwrap();

    let elapsed = measured_to.0.duration_since(measured_from.0).as_secs_f64();
    let readings = (measured_to.1 - measured_from.1).max(1) as f64;
    let bytes = end_io.write_bytes.saturating_sub(start_io.write_bytes) as f64;
    let wchar = end_io.wchar.saturating_sub(start_io.wchar) as f64;
    let syscw = end_io.syscw.saturating_sub(start_io.syscw) as f64;
    let commits = end_metrics.0 - start_metrics.0;
    let sent = published
        .lock()
        .unwrap()
        .iter()
        .filter(|t| **t >= measured_from.0)
        .count();
    println!(
        "  readings stored in the window: {readings:.0} ({:.2}/s; {sent} uplinks published)",
        readings / elapsed
    );
    println!(
        "  write_bytes: {:.0} B/reading, {:.1} KiB/s ({:.2} GiB/day); write syscalls {:.1}/s ({:.0} B/reading passed to write)",
        bytes / readings,
        bytes / elapsed / 1024.0,
        bytes / elapsed * 86400.0 / (1u64 << 30) as f64,
        syscw / elapsed,
        wchar / readings
    );
    println!(
        "  commits: {:.2}/s ({:.2} readings per commit); backlog at the end: {:.0} rows",
        commits / elapsed,
        readings / commits.max(1.0),
        end_metrics.1
    );
    // Publish -> commit latency of the measured messages (message k is reading id k+1).
    let published = published.lock().unwrap();
    let committed = committed.lock().unwrap();
    let mut lat: Vec<f64> = committed
        .iter()
        .filter(|(id, _)| *id > measured_from.1)
        .filter_map(|(id, at)| {
            let k = (id - base_id - 1) as usize;
            published
                .get(k)
                .map(|p| at.duration_since(*p).as_secs_f64() * 1000.0)
        })
        .collect();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = lat.iter().sum::<f64>() / lat.len().max(1) as f64;
    println!(
        "  publish -> commit visible (5 ms polling): mean {mean:.1} ms, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0.0)
    );
    let size = |suffix: &str| {
        std::fs::metadata(format!("{}{suffix}", db.display()))
            .map(|m| m.len() as f64 / 1048576.0)
            .unwrap_or(0.0)
    };
    println!(
        "  files: db {:.1} MiB, wal {:.1} MiB",
        size(""),
        size("-wal")
    );
    drop(agent);
}
