//! The web console under load (issue 18): a store of 5,000,000 readings (100 series —
//! 50 devices × temperature and humidity — evenly over the last 30 days, 50,000 per
//! series), the real release binary ingesting about 1,000 readings/s into it (a
//! simulated source on the same 50 devices every 100 ms), while the overview (`/`) and
//! a 30-day device chart (`/device/dev-07?span=30d`) are requested again and again.
//!
//!     cargo bench --bench console
//!     CONSOLE_ROWS=1000000 CONSOLE_REQUESTS=50 cargo bench --bench console
//!
//! Baselines in the same run: the chart's own SQL (the 30-day downsampling query of
//! one series) through rusqlite directly, on the same file while the agent ingests,
//! and `/health` on the same port. Also printed: the overview's page weight, the
//! binary's size, and the agent's RSS idle, under ingest and after the requests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
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

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One GET; (status, body bytes).
fn get(port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, raw[split + 4..].to_vec()))
}

struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
}

fn stats(mut ms: Vec<f64>) -> Stats {
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
    Stats {
        p50: at(0.50),
        p99: at(0.99),
        max: ms[ms.len() - 1],
    }
}

fn print(label: &str, s: &Stats) {
    println!(
        "  {label:<44} p50 {:>7.1} ms   p99 {:>7.1} ms   max {:>7.1} ms",
        s.p50, s.p99, s.max
    );
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// The store: `rows` readings of 100 series spread evenly over the last 30 days,
/// all synced (a healthy site), plus the per-series summary the writer keeps.
fn build_store(db: &Path, rows: u64) {
    let mut conn = rusqlite::Connection::open(db).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    outpost::store::schema::migrate(&mut conn).unwrap();
    let series: Vec<(String, &str, &str)> = (0..50)
        .flat_map(|d| {
            [
                (format!("dev-{d:02}"), "temperature", "°C"),
                (format!("dev-{d:02}"), "humidity", "%"),
            ]
        })
        .collect();
    let per_series = rows / series.len() as u64;
    let end = now_micros() - 60_000_000;
    let span = 30 * 86_400_000_000i64;
    let step = span / per_series.max(1) as i64;
    let start = end - span;
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO readings (uid, source, device, metric, value, unit, observed_at, \
                 received_at, meta, synced) VALUES (?1, 'history', ?2, ?3, ?4, ?5, ?6, ?6, \
                 '{\"rssi\":-80}', 1)",
            )
            .unwrap();
        let mut n: u64 = 0;
        for i in 0..per_series {
            let t = start + i as i64 * step;
            for (k, (device, metric, unit)) in series.iter().enumerate() {
                n += 1;
                let mut uid = [0u8; 16];
                uid[..8].copy_from_slice(&n.to_le_bytes());
                uid[8..]
                    .copy_from_slice(&(k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
                let value = 4.0 + ((t / 60_000_000 + k as i64) % 97) as f64 / 10.0;
                insert
                    .execute(rusqlite::params![&uid[..], device, metric, value, unit, t])
                    .unwrap();
            }
        }
        let mut summary = tx
            .prepare(
                "INSERT INTO series (source, device, metric, value, unit, observed_at, received_at, count) \
                 VALUES ('history', ?1, ?2, 5.0, ?3, ?4, ?4, ?5)",
            )
            .unwrap();
        for (device, metric, unit) in &series {
            summary
                .execute(rusqlite::params![
                    device,
                    metric,
                    unit,
                    end,
                    per_series as i64
                ])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); ANALYZE;")
        .unwrap();
}

fn config(dir: &Path, port: u16, ingest: bool) -> String {
    let devices: Vec<String> = (0..50).map(|d| format!("\"dev-{d:02}\"")).collect();
    let source = if ingest {
        format!(
            "[[sources]]\ntype = \"simulated\"\nname = \"live\"\ndevices = [{}]\nperiod = \"100ms\"\n\
             [[sources.metrics]]\nname = \"temperature\"\nunit = \"°C\"\nbase = 4.0\n\
             [[sources.metrics]]\nname = \"humidity\"\nunit = \"%\"\nbase = 60.0\n",
            devices.join(", ")
        )
    } else {
        String::new()
    };
    format!(
        "[agent]\ngateway_id = \"bench\"\nsite = \"Console bench\"\n\n\
         [storage]\npath = \"{}\"\nretention = \"60d\"\nmax_size = \"8GiB\"\n\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [[alerts]]\nname = \"warm\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 12.0\n\n{source}",
        dir.join("outpost.db").display()
    )
}

fn start_agent(dir: &Path, port: u16, ingest: bool, name: &str) -> Killed {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config(dir, port, ingest)).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let agent = Killed(
        Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while get(port, "/health").is_none() {
        assert!(Instant::now() < deadline, "the agent did not answer");
        std::thread::sleep(Duration::from_millis(100));
    }
    agent
}

fn timed(port: u16, path: &str, n: u64, check: impl Fn(u16, &[u8])) -> Stats {
    let mut ms = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t = Instant::now();
        let (status, body) = get(port, path).expect(path);
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        check(status, &body);
    }
    stats(ms)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rows = env_u64("CONSOLE_ROWS", 5_000_000);
    let requests = env_u64("CONSOLE_REQUESTS", 200);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outpost.db");
    let t = Instant::now();
    build_store(&db, rows);
    let size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    println!(
        "console: store of {rows} readings (100 series over 30 days) built in {:.0} s, {:.0} MiB",
        t.elapsed().as_secs_f64(),
        size as f64 / 1048576.0
    );
    let binary = std::fs::metadata(env!("CARGO_BIN_EXE_outpost"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "  binary {} bytes ({:.2} MiB)",
        binary,
        binary as f64 / 1048576.0
    );

    // Idle: no source, nothing requested yet but /health.
    let port = free_port();
    {
        let agent = start_agent(dir.path(), port, false, "idle");
        std::thread::sleep(Duration::from_secs(env_u64("CONSOLE_IDLE_SECS", 20)));
        let idle = rss_kib(agent.0.id());
        for _ in 0..20 {
            get(port, "/").unwrap();
            get(port, "/device/dev-07?span=30d").unwrap();
        }
        std::thread::sleep(Duration::from_secs(2));
        let after = rss_kib(agent.0.id());
        println!(
            "  idle RSS {idle} KiB; after 20 overviews and 20 charts {after} KiB (+{} KiB)",
            after.saturating_sub(idle)
        );
    }

    let port = free_port();
    let agent = start_agent(dir.path(), port, true, "ingest");
    std::thread::sleep(Duration::from_secs(5));
    let start_count = outpost_count(&db);
    let ingest_started = Instant::now();

    // The raw baseline: the chart's SQL on its own connection.
    let reader = rusqlite::Connection::open_with_flags(
        &db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap();
    let window = outpost::run::console::chart::Span::Month.window(chrono::Utc::now());
    let mut raw = Vec::new();
    for _ in 0..requests.min(100) {
        let t = Instant::now();
        let b = outpost::run::console::chart::downsample(&reader, "dev-07", "temperature", window)
            .unwrap();
        raw.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(b.len() > 300, "{} buckets", b.len());
    }
    let raw = stats(raw);

    let ok =
        |status: u16, body: &[u8]| assert_eq!(status, 200, "{}", String::from_utf8_lossy(body));
    let health = timed(port, "/health", requests, |s, _| {
        assert!(s == 200 || s == 503)
    });
    let overview = timed(port, "/", requests, ok);
    let chart = timed(port, "/device/dev-07?span=30d", requests, ok);
    let day = timed(port, "/device/dev-07", requests, ok);
    let ingested = outpost_count(&db) - start_count;
    let rate = ingested as f64 / ingest_started.elapsed().as_secs_f64();
    let weight = get(port, "/").map(|(_, b)| b.len()).unwrap_or(0);
    let chart_weight = get(port, "/device/dev-07?span=30d")
        .map(|(_, b)| b.len())
        .unwrap_or(0);
    let rss = rss_kib(agent.0.id());
    println!("  while ingesting ({requests} requests each, sequential):");
    print("baseline: chart SQL through rusqlite (30 d)", &raw);
    print("baseline: /health", &health);
    print("overview /", &overview);
    print("device chart 30 d (/device/dev-07?span=30d)", &chart);
    print("device chart 24 h (/device/dev-07)", &day);
    println!(
        "  ratio p99 chart / raw SQL {:.2}; overview p99 / health p99 {:.2}",
        chart.p99 / raw.p99.max(0.001),
        overview.p99 / health.p99.max(0.001)
    );
    println!(
        "  page weight: overview {weight} bytes (HTML; CSS and JS are cached assets), 30-day chart page {chart_weight} bytes"
    );
    println!(
        "  readings ingested meanwhile: {ingested} ({rate:.0}/s); agent RSS at the end {rss} KiB"
    );
}

fn outpost_count(db: &Path) -> i64 {
    rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row("SELECT MAX(id) FROM readings", [], |r| r.get(0)))
        .unwrap_or(0)
}
