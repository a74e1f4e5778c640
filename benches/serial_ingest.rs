//! Serial ingest throughput: lines per second parsed and committed from a pty (socat
//! pair) for each line format, and Modbus RTU polls per second against pymodbus, each
//! against a raw baseline in the same run:
//!
//! - lines: a minimal tokio-serial read loop that only counts line endings on the same
//!   kind of pty, fed by the same writer;
//! - Modbus: a bare tokio-modbus client reading the same register in a tight loop
//!   against the same pymodbus slave, once with the RTU inter-frame gap outpost keeps
//!   (the fair comparison) and once without (what the pty could do).
//!
//! ```text
//! cargo bench --bench serial_ingest
//! LINES=50000 POLL_SECS=5 cargo bench --bench serial_ingest
//! ```
//!
//! Needs socat and pymodbus (scripts/install-test-deps).

use outpost::config::Problems;
use outpost::sources::{SourceConfig, SourceContext};
use outpost::store::{StorageConfig, Store, StoreOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;

struct Pty {
    child: Child,
    device: PathBuf,
    peer: PathBuf,
}

impl Pty {
    fn start(dir: &Path, name: &str) -> Pty {
        let device = dir.join(format!("{name}-dev"));
        let peer = dir.join(format!("{name}-peer"));
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", device.display()))
            .arg(format!("pty,raw,echo=0,link={}", peer.display()))
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (scripts/install-test-deps)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(device.exists() && peer.exists()) {
            assert!(Instant::now() < deadline, "socat did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        Pty {
            child,
            device,
            peer,
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn source(toml_text: &str) -> SourceConfig {
    let value: toml::Value = toml::from_str(toml_text).unwrap();
    let mut problems = Problems::default();
    let c = SourceConfig::from_json(serde_json::to_value(value).unwrap(), "bench", &mut problems);
    assert!(problems.0.is_empty(), "{:?}", problems.0);
    c.unwrap()
}

/// Writes `data` to the peer from a thread (blocking when the reader lags).
fn feed(peer: &Path, data: Vec<u8>) -> std::thread::JoinHandle<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(peer).unwrap();
    std::thread::spawn(move || {
        for chunk in data.chunks(4096) {
            f.write_all(chunk).unwrap();
        }
        f.flush().unwrap();
    })
}

async fn baseline_lines(dir: &Path, data: &[u8], lines: u64) -> f64 {
    let pty = Pty::start(dir, "baseline");
    let mut port = tokio_serial::new(pty.device.to_string_lossy(), 115_200)
        .open_native_async()
        .unwrap();
    let start = Instant::now();
    let writer = feed(&pty.peer, data.to_vec());
    let mut buf = vec![0u8; 65536];
    let mut seen = 0u64;
    while seen < lines {
        let n = port.read(&mut buf).await.unwrap();
        assert!(n > 0, "pty closed");
        seen += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    writer.join().unwrap();
    lines as f64 / secs
}

async fn outpost_lines(
    dir: &Path,
    name: &str,
    rest: &str,
    data: &[u8],
    lines: u64,
    per_line: u64,
) -> (f64, u64) {
    let pty = Pty::start(dir, name);
    let storage = StorageConfig {
        path: dir.join(format!("{name}.db")),
        ..StorageConfig::default()
    };
    let (store, ingest) = Store::open(&storage, StoreOptions::default()).unwrap();
    let token = CancellationToken::new();
    let config = source(&format!(
        "type = \"serial\"\nname = \"{name}\"\npath = \"{}\"\n{rest}\n[port]\nbaud = 115200\n",
        pty.device.display()
    ));
    let ctx = SourceContext {
        out: ingest.sender.clone(),
        shutdown: token.clone(),
        store: store.clone(),
        metrics: outpost::metrics::Metrics::new(&store),
        gateway_id: "test".into(),
        clock: outpost::clock::Clock::system(),
        certs: outpost::tls::CertWatch::default(),
    };
    let task = tokio::spawn(config.run(ctx));
    // Wait until the port is open (the state row says so).
    let reader = store.reader().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open: Option<String> = reader
            .query_row(
                "SELECT value FROM source_state WHERE source = ?1 AND key = 'state'",
                [name],
                |r| r.get(0),
            )
            .ok();
        if open.is_some_and(|s| s.contains("\"open\"")) {
            break;
        }
        assert!(Instant::now() < deadline, "port did not open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = Instant::now();
    let writer = feed(&pty.peer, data.to_vec());
    let mut committed = store.committed_watch();
    let want = (lines * per_line) as i64;
    let base: i64 = reader
        .query_row("SELECT COALESCE(MAX(id), 0) FROM readings", [], |r| {
            r.get(0)
        })
        .unwrap();
    while *committed.borrow_and_update() < base + want {
        committed.changed().await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let rss = rss_kib("VmRSS:");
    writer.join().unwrap();
    token.cancel();
    task.await.unwrap().unwrap();
    drop((store, ingest.sender, reader));
    ingest.finished.await.unwrap();
    (lines as f64 / secs, rss)
}

struct Slave {
    child: Child,
}

impl Slave {
    fn start(dir: &Path, port: &Path, ids: &[u8]) -> Slave {
        let spec = dir.join("spec.json");
        let slaves: serde_json::Map<String, serde_json::Value> = ids
            .iter()
            .map(|id| {
                (
                    id.to_string(),
                    serde_json::json!({"holding": [{"address": 0, "type": "f32", "value": 21.5}]}),
                )
            })
            .collect();
        std::fs::write(
            &spec,
            serde_json::json!({"port": port, "baud": 115200, "slaves": slaves}).to_string(),
        )
        .unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/modbus_slave.py");
        let mut child =
            Command::new(std::env::var("OUTPOST_TEST_PYTHON").unwrap_or_else(|_| "python3".into()))
                .arg(script)
                .arg(&spec)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3 with pymodbus (scripts/install-test-deps)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "pymodbus slave did not start");
        Slave { child }
    }
}

impl Drop for Slave {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn baseline_polls(device: &Path, secs: f64, gap: Option<Duration>) -> f64 {
    use tokio_modbus::prelude::*;
    let port = tokio_serial::new(device.to_string_lossy(), 115_200)
        .open_native_async()
        .unwrap();
    let mut ctx = tokio_modbus::client::rtu::attach_slave(port, Slave(1));
    let start = Instant::now();
    let mut polls = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        if let Some(gap) = gap {
            tokio::time::sleep(gap).await;
        }
        let words = ctx.read_holding_registers(0, 2).await.unwrap().unwrap();
        assert_eq!(words.len(), 2);
        polls += 1;
    }
    polls as f64 / start.elapsed().as_secs_f64()
}

async fn outpost_polls(dir: &Path, device: &Path, ids: &[u8], secs: f64) -> (f64, u64) {
    let storage = StorageConfig {
        path: dir.join("modbus.db"),
        ..StorageConfig::default()
    };
    let (store, ingest) = Store::open(&storage, StoreOptions::default()).unwrap();
    let mut config = format!(
        "type = \"modbus-rtu\"\nname = \"bus\"\npath = \"{}\"\n[port]\nbaud = 115200\n",
        device.display()
    );
    for id in ids {
        // Intervals far below what the bus can serve: the bus is the limit.
        config += &format!(
            "[[slaves]]\nid = {id}\ninterval = \"10ms\"\ntimeout = \"1s\"\n\
             [[slaves.registers]]\nmetric = \"t\"\naddress = 0\ntype = \"f32\"\n"
        );
    }
    let token = CancellationToken::new();
    let ctx = SourceContext {
        out: ingest.sender.clone(),
        shutdown: token.clone(),
        store: store.clone(),
        metrics: outpost::metrics::Metrics::new(&store),
        gateway_id: "test".into(),
        clock: outpost::clock::Clock::system(),
        certs: outpost::tls::CertWatch::default(),
    };
    let task = tokio::spawn(source(&config).run(ctx));
    // Let the first polls settle, then count committed readings over the window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reader = store.reader().unwrap();
    let count = |r: &rusqlite::Connection| -> i64 {
        r.query_row("SELECT COUNT(*) FROM readings", [], |x| x.get(0))
            .unwrap()
    };
    let (c0, t0) = (count(&reader), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let (c1, elapsed) = (count(&reader), t0.elapsed().as_secs_f64());
    let rss = rss_kib("VmRSS:");
    token.cancel();
    task.await.unwrap().unwrap();
    drop((store, ingest.sender, reader));
    ingest.finished.await.unwrap();
    ((c1 - c0) as f64 / elapsed, rss)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let lines: u64 = std::env::var("LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let poll_secs: f64 = std::env::var("POLL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5.0);
    let dir = tempfile::tempdir().unwrap();
    println!("serial ingest: {lines} lines per format, each line gives 2 readings");
    println!(
        "| format | lines/s (outpost, committed) | lines/s (baseline read loop) | ratio | RSS after (MiB) |"
    );
    println!("|---|---|---|---|---|");
    type LineMaker = Box<dyn Fn(u64) -> String>;
    let formats: [(&str, &str, LineMaker); 4] = [
        ("json", "format = \"json\"\n[fields]\ndevice_field = \"id\"", Box::new(|i| {
            format!("{{\"id\":\"ws-{}\",\"t\":{}.5,\"rh\":{}}}\n", i % 8, i % 40, i % 100)
        })),
        ("csv", "format = \"csv\"\n[csv]\ncolumns = [\"id\", \"t\", \"rh\"]\n[fields]\ndevice_field = \"id\"", Box::new(|i| {
            format!("ws-{},{}.5,{}\n", i % 8, i % 40, i % 100)
        })),
        ("key-value", "format = \"key-value\"\n[fields]\ndevice_field = \"id\"", Box::new(|i| {
            format!("id=ws-{} t={}.5 rh={}\n", i % 8, i % 40, i % 100)
        })),
        ("regex", "format = \"regex\"\npattern = '^(?P<id>[\\w-]+) T=(?P<t>\\S+) RH=(?P<rh>\\S+)$'\n[fields]\ndevice_field = \"id\"", Box::new(|i| {
            format!("ws-{} T={}.5 RH={}\n", i % 8, i % 40, i % 100)
        })),
    ];
    for (name, rest, line) in &formats {
        let data: Vec<u8> = (0..lines).flat_map(|i| line(i).into_bytes()).collect();
        let base = baseline_lines(dir.path(), &data, lines).await;
        let (ours, rss) =
            outpost_lines(dir.path(), &name.replace('-', ""), rest, &data, lines, 2).await;
        println!(
            "| {name} | {ours:.0} | {base:.0} | {:.2} | {:.1} |",
            ours / base,
            rss as f64 / 1024.0
        );
    }

    let pty = Pty::start(dir.path(), "modbus");
    let ids: Vec<u8> = (1..=10).collect();
    let _slave = Slave::start(dir.path(), &pty.peer, &ids);
    let base = baseline_polls(&pty.device, poll_secs, None).await;
    let gap = Some(Duration::from_micros(1750));
    let base_gap = baseline_polls(&pty.device, poll_secs, gap).await;
    let (ours, rss) = outpost_polls(dir.path(), &pty.device, &ids, poll_secs).await;
    println!();
    println!(
        "modbus rtu against pymodbus 3.6.9 on a pty, 115200 baud configured (1.75ms \
         inter-frame gap), 10 slaves each polled every 10ms, {poll_secs}s windows"
    );
    println!(
        "| polls/s (outpost, committed) | polls/s (bare loop, same gap) | ratio | \
         polls/s (bare loop, no gap) | RSS after (MiB) |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {ours:.0} | {base_gap:.0} | {:.2} | {base:.0} | {:.1} |",
        ours / base_gap,
        rss as f64 / 1024.0
    );
    println!();
    println!(
        "peak RSS of the bench process: {:.1} MiB",
        rss_kib("VmHWM:") as f64 / 1024.0
    );
}
