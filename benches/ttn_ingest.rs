//! TTN ingest benchmark: The Things Stack-format uplinks (about 800 bytes, three numeric
//! fields) are published to a private mosquitto as fast as it accepts them; the agent's
//! pipeline (TTN source → SQLite, `synchronous=FULL`) and `mosquitto_sub` drain the same
//! stream in the same run. Prints committed uplinks/s, the raw drain rate, their ratio,
//! peak RSS and the broker's dropped-message counter.
//!
//! `cargo bench --bench ttn_ingest` (release). `TTN_BENCH_UPLINKS=N` changes the count,
//! `TTN_BENCH_BATCH_ROWS` the store's `batch_max_rows`, `TTN_BENCH_MAX_QUEUED` the
//! broker's `max_queued_messages` (default 0, no limit).

#[path = "../tests/support/mod.rs"]
mod support;
use outpost::config::{Config, HumanDuration, Secret};
use outpost::run::pipeline::Pipeline;
use outpost::sources::mqtt_client::BrokerConfig;
use outpost::sources::ttn::{SimulatedUplinks, TtnConfig};
use outpost::sources::ttn_backfill::BackfillConfig;
use outpost::sources::SourceConfig;
use outpost::store::StoreOptions;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "v3/bench-app@ttn/devices/dev-1/up";

/// A child process (mosquitto_sub) killed and reaped on drop.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One ~800-byte uplink with three numeric fields, f_cnt `i`.
fn uplink(i: u64, base: chrono::DateTime<chrono::Utc>) -> String {
    let ns = base + chrono::Duration::microseconds(i as i64);
    let mut up: serde_json::Value =
        serde_json::from_str(include_str!("../tests/fixtures/ttn-uplink.json")).unwrap();
    // Trimmed to about 800 bytes: one gateway, fewer ids.
    up["end_device_ids"]["device_id"] = "dev-1".into();
    for key in ["join_eui", "dev_addr"] {
        up["end_device_ids"].as_object_mut().unwrap().remove(key);
    }
    up["correlation_ids"] = serde_json::json!(["as:up:01JDX4Q7Z3W9K2M8N5P6R7S8T9"]);
    let m = up["uplink_message"].as_object_mut().unwrap();
    for key in ["network_ids", "session_key_id", "consumed_airtime"] {
        m.remove(key);
    }
    m["rx_metadata"].as_array_mut().unwrap().truncate(1);
    m["rx_metadata"][0]
        .as_object_mut()
        .unwrap()
        .remove("uplink_token");
    up["uplink_message"]["f_cnt"] = i.into();
    up["uplink_message"]["received_at"] = ns.to_rfc3339().into();
    up["uplink_message"]["decoded_payload"] = serde_json::json!({
        "TempC_SHT": -17.9 + (i % 10) as f64 / 10.0, "Hum_SHT": 44.2, "BatV": 3.046
    });
    up.to_string()
}

/// The same uplinks as [`uplink`], byte for byte, from a template cut once: building
/// each one through a `serde_json::Value` cost the publisher about a fifth of the two
/// cores (measured with `perf`), which both contenders then lacked.
struct Uplinks {
    /// The JSON around the three values, and which value goes after each part
    /// (0: f_cnt, 1: NS `received_at`, 2: temperature).
    parts: Vec<String>,
    order: Vec<usize>,
    base: chrono::DateTime<chrono::Utc>,
}

impl Uplinks {
    const MARKS: [&'static str; 3] = ["\"@F_CNT@\"", "\"@RECEIVED_AT@\"", "\"@TEMP@\""];

    fn new(base: chrono::DateTime<chrono::Utc>) -> Uplinks {
        let mut up: serde_json::Value = serde_json::from_str(&uplink(0, base)).unwrap();
        up["uplink_message"]["f_cnt"] = "@F_CNT@".into();
        up["uplink_message"]["received_at"] = "@RECEIVED_AT@".into();
        up["uplink_message"]["decoded_payload"]["TempC_SHT"] = "@TEMP@".into();
        let template = up.to_string();
        let mut at: Vec<(usize, usize)> = Self::MARKS
            .iter()
            .enumerate()
            .map(|(k, mark)| (template.find(mark).expect("the mark is in the template"), k))
            .collect();
        at.sort_unstable();
        let (mut parts, mut start) = (Vec::new(), 0);
        for &(pos, k) in &at {
            parts.push(template[start..pos].to_string());
            start = pos + Self::MARKS[k].len();
        }
        parts.push(template[start..].to_string());
        let uplinks = Uplinks {
            parts,
            order: at.iter().map(|&(_, k)| k).collect(),
            base,
        };
        for i in [0, 1, 9, 10, 12_345, 199_999] {
            assert_eq!(uplinks.get(i), uplink(i, base), "uplink {i}");
        }
        uplinks
    }

    fn get(&self, i: u64) -> String {
        let ns = self.base + chrono::Duration::microseconds(i as i64);
        let values = [
            i.to_string(),
            serde_json::Value::from(ns.to_rfc3339()).to_string(),
            serde_json::Value::from(-17.9 + (i % 10) as f64 / 10.0).to_string(),
        ];
        let mut out = String::with_capacity(1024);
        for (part, &k) in self.parts.iter().zip(&self.order) {
            out.push_str(part);
            out.push_str(&values[k]);
        }
        out.push_str(&self.parts[self.order.len()]);
        out
    }
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The `/proc/self/task/TID` directories of this process's threads named `name`.
fn threads_named(name: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
        .map(|task| task.path())
        .filter(|task| {
            std::fs::read_to_string(task.join("comm")).is_ok_and(|comm| comm.trim_end() == name)
        })
        .collect()
}

/// CPU time (user + system) so far of this process's threads named `name`: the
/// store's writer ("outpost-store"), its WAL checkpoint ("outpost-ckpt") and the
/// runtime the pipeline runs on ("tokio-rt-worker"; the publisher has its own unnamed
/// thread).
fn thread_cpu(name: &str) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0.0;
    for task in threads_named(name) {
        let stat = std::fs::read_to_string(task.join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        for i in [11, 12] {
            total += fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    Duration::from_secs_f64(total / ticks)
}

/// Time on a CPU and time waiting for one (runnable), so far, of this process's
/// threads named `name`, from `/proc/self/task/*/schedstat` (nanoseconds).
fn thread_sched(name: &str) -> (Duration, Duration) {
    let (mut run, mut wait) = (0u64, 0u64);
    for task in threads_named(name) {
        let stat = std::fs::read_to_string(task.join("schedstat")).unwrap_or_default();
        let mut fields = stat
            .split_whitespace()
            .map(|v| v.parse::<u64>().unwrap_or(0));
        run += fields.next().unwrap_or(0);
        wait += fields.next().unwrap_or(0);
    }
    (Duration::from_nanos(run), Duration::from_nanos(wait))
}

fn sys_value(port: u16, topic: &str) -> String {
    let out = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            topic,
            "-C",
            "1",
            "-W",
            "5",
        ])
        .output()
        .expect("mosquitto_sub");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn main() {
    // `cargo test` builds benches but runs them only with `--bench`.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let n: u64 = std::env::var("TTN_BENCH_UPLINKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().unwrap();
    // max_queued_messages: mosquitto's default (1000) drops QoS 0 messages for any
    // subscriber more than 1000 messages behind — at this rate even mosquitto_sub.
    let max_queued: u64 = std::env::var("TTN_BENCH_MAX_QUEUED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let broker = support::Mosquitto::builder()
        .max_queued_messages(max_queued)
        .sys_interval(1)
        .start();
    let port = broker.port();

    let base = chrono::Utc::now() - chrono::Duration::hours(1);
    // Generated while publishing, so the publisher adds little to the peak RSS.
    let avg = (0..100).map(|i| uplink(i, base).len()).sum::<usize>() / 100;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut config = Config::default();
    config.storage.path = dir.path().join("outpost.db");
    let mut broker = BrokerConfig::new("127.0.0.1");
    broker.port = Some(port);
    broker.tls = false;
    config.sources.push(SourceConfig::Ttn(TtnConfig {
        name: "ttn".into(),
        application: "bench-app".into(),
        tenant: "ttn".into(),
        api_key: Secret::new("bench"),
        broker,
        simulated: SimulatedUplinks::Drop,
        devices: vec![],
        max_payload: outpost::config::ByteSize(64 << 10),
        backfill: BackfillConfig {
            enabled: false,
            ..BackfillConfig::default()
        },
        mapping: Default::default(),
    }));
    config.storage.prune_interval = HumanDuration::from_secs(3600);
    if let Some(rows) = std::env::var("TTN_BENCH_BATCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.storage.batch_max_rows = rows;
    }
    let batch_rows = config.storage.batch_max_rows;
    let token = CancellationToken::new();
    let pipeline = runtime
        .block_on(async { Pipeline::start(&config, StoreOptions::default(), token.clone()) })
        .unwrap();
    let stats = pipeline.store.stats().clone();
    let waiter = runtime.spawn(pipeline.wait());

    // Publish probes until the agent stored one (it is not counted).
    let probe = uplink(4_000_000_000, base);
    let probe_deadline = Instant::now() + Duration::from_secs(30);
    while stats.readings_inserted.load(Relaxed) == 0 {
        assert!(
            Instant::now() < probe_deadline,
            "the agent never subscribed"
        );
        let _ = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                TOPIC,
                "-m",
                &probe,
            ])
            .status();
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let baseline_rows = stats.readings_inserted.load(Relaxed);
    // The raw baseline: mosquitto_sub draining the same stream.
    let mut sub = Killed(
        Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                "v3/+/devices/+/up",
                "-C",
                &n.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));

    // The publisher: QoS 1 with 100 in flight, so it goes as fast as the broker
    // acknowledges, and every message is known to have reached the broker.
    let uplinks = Uplinks::new(base);
    let threads = ["outpost-store", "outpost-ckpt", "tokio-rt-worker"];
    let cpu_before = threads.map(thread_cpu);
    let sched_before = thread_sched("outpost-store");
    let mut cpu_used = None;
    let mut writer_sched = None;
    let started = Instant::now();
    let publisher = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut options = rumqttc::MqttOptions::new("bench-publisher", "127.0.0.1", port);
            options
                .set_max_packet_size(1 << 20, 1 << 20)
                .set_inflight(100)
                .set_keep_alive(Duration::from_secs(30));
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1000);
            let feeder = tokio::spawn(async move {
                for i in 0..n {
                    let line = uplinks.get(i);
                    client
                        .publish(TOPIC, rumqttc::QoS::AtLeastOnce, false, line)
                        .await
                        .unwrap();
                }
                client
            });
            let mut acked = 0u64;
            while acked < n {
                if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) =
                    eventloop.poll().await
                {
                    acked += 1;
                }
            }
            let _ = feeder.await;
        });
        started.elapsed()
    });
    let mut sub_done = None;
    let mut agent_done = None;
    let mut published = None;
    let rss_before = rss_kib("VmRSS:");
    let mut peak_rss = 0;
    let want = baseline_rows + 3 * n;
    let deadline = Instant::now() + Duration::from_secs(600);
    while (sub_done.is_none() || agent_done.is_none()) && Instant::now() < deadline {
        if published.is_none() && publisher.is_finished() {
            published = Some(started.elapsed());
        }
        if sub_done.is_none() && matches!(sub.0.try_wait(), Ok(Some(_))) {
            sub_done = Some(started.elapsed());
        }
        if agent_done.is_none() && stats.readings_inserted.load(Relaxed) >= want {
            agent_done = Some(started.elapsed());
            let cpu_now = threads.map(thread_cpu);
            cpu_used = Some(std::array::from_fn::<_, 3, _>(|i| {
                cpu_now[i].saturating_sub(cpu_before[i])
            }));
            let (run, wait) = thread_sched("outpost-store");
            writer_sched = Some((
                run.saturating_sub(sched_before.0),
                wait.saturating_sub(sched_before.1),
            ));
        }
        peak_rss = peak_rss.max(rss_kib("VmRSS:"));
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let dropped = sys_value(port, "$SYS/broker/publish/messages/dropped");
    // mosquitto publishes the counter only once something was dropped.
    let dropped = if dropped.is_empty() {
        "0".to_string()
    } else {
        dropped
    };
    let stored = stats.readings_inserted.load(Relaxed) - baseline_rows;

    token.cancel();
    runtime.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(20), waiter).await;
    });

    let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN);
    let agent_rate = n as f64 / secs(agent_done);
    let sub_rate = n as f64 / secs(sub_done);
    println!("TTN ingest benchmark: {n} uplinks of ~{avg} bytes, 3 numeric fields each");
    println!("  storage.batch_max_rows             {batch_rows}");
    println!(
        "  publisher (QoS 1, 100 in flight) finished after {:.2}s",
        secs(published)
    );
    println!(
        "  mosquitto_sub drained all after    {:.2}s  → {:.0} uplinks/s",
        secs(sub_done),
        sub_rate
    );
    println!(
        "  outpost committed all after        {:.2}s  → {:.0} uplinks/s",
        secs(agent_done),
        agent_rate
    );
    println!(
        "  ratio outpost / mosquitto_sub       {:.2}",
        agent_rate / sub_rate
    );
    if let Some([writer, checkpoint, runtime]) = cpu_used {
        // Less noisy than the rates when other processes share the cores.
        let per_k = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        println!(
            "  agent CPU per 1,000 uplinks         store writer {:.1} ms, WAL checkpoint {:.1} ms, runtime {:.1} ms",
            per_k(writer),
            per_k(checkpoint),
            per_k(runtime)
        );
    }
    if let (Some((run, wait)), Some(done)) = (writer_sched, agent_done) {
        // Off a CPU without waiting for one: in fsync, or awaiting batches.
        println!(
            "  store writer thread                 on a CPU {:.2}s, runnable {:.2}s, asleep {:.2}s",
            run.as_secs_f64(),
            wait.as_secs_f64(),
            done.saturating_sub(run + wait).as_secs_f64()
        );
    }
    println!("  readings stored {stored} (expected {})", 3 * n);
    println!("  broker dropped messages ($SYS)     {dropped}");
    println!(
        "  peak RSS of the bench process       {} MiB during the run ({} MiB before publishing)",
        peak_rss / 1024,
        rss_before / 1024
    );
    if agent_done.is_none() || stored != 3 * n {
        println!("  INCOMPLETE: the agent did not store every uplink");
        std::process::exit(1);
    }
}
