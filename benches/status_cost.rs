//! What `outpost status` and one `/metrics` scrape cost on a large store whose readings
//! are all unsynced (a site offline for weeks), cold (the database's pages dropped from
//! the OS page cache) and warm, with the row counts they used to make (`COUNT(*)` of the
//! readings and of the unsynced ones) timed in the same run as the baseline.
//!
//!     cargo bench --bench status_cost
//!     STATUS_ROWS=1000000 cargo bench --bench status_cost
//!
//! Builds a store of `STATUS_ROWS` readings (default 5,000,000; 200 series, TTN-like
//! `meta`) at the schema version before the kept counts and times the migration that
//! adds them (a one-time cost at the upgrade); then times, each `STATUS_REPEAT` times
//! (default 5), the real release binary's `outpost status --db` (a whole process: start,
//! open, read, print) and a scrape of `/metrics` of `outpost run` on that store.
//! "Cold" evicts the database and WAL from the page cache first
//! (`posix_fadvise(POSIX_FADV_DONTNEED)`, no root needed).

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

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Drops the clean pages of the database and its WAL from the OS page cache.
fn evict(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", db.display());
        if let Ok(file) = std::fs::File::open(&path) {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid open descriptor; the call only advises the kernel.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

fn build_store(db: &Path, rows: u64) {
    let mut conn = rusqlite::Connection::open(db).unwrap();
    conn.pragma_update(None, "page_size", 1024).unwrap();
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .unwrap();
    conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    conn.pragma_update(None, "cache_size", -262_144).unwrap();
    // Below the kept counts, so that the migration counts the rows inserted here: they
    // bypass the store writer, which keeps the counts current in every commit, so
    // counts made before them would describe an empty table.
    let before = outpost::store::schema::COUNTS_VERSION - 1;
    outpost::store::schema::migrate_to(&mut conn, before).unwrap();
    let start = Instant::now();
    conn.execute(
        "WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i + 1 < ?1) \
         INSERT INTO readings(uid, source, device, metric, value, unit, observed_at, received_at, meta) \
         SELECT randomblob(16), 'ttn', printf('coldroom-%03d', (i / 3) % 200), \
                CASE i % 3 WHEN 0 THEN 'temperature' WHEN 1 THEN 'humidity' ELSE 'battery' END, \
                -18.0 + (i % 17) / 10.0, '°C', 1700000000000000 + i * 20000000, \
                1700000000000000 + i * 20000000, \
                '{\"f_port\":2,\"f_cnt\":' || (i / 600) || ',\"rssi\":-101,\"snr\":6.25}' \
         FROM c",
        [rows as i64],
    )
    .unwrap();
    conn.execute_batch(
        "INSERT INTO series (source, device, metric, value, unit, observed_at, received_at, count) \
         SELECT source, device, metric, value, unit, MAX(observed_at), MAX(received_at), COUNT(*) \
         FROM readings GROUP BY source, device, metric",
    )
    .unwrap();
    println!(
        "  built {rows} unsynced readings at schema {before} in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    evict(db);
    let start = Instant::now();
    outpost::store::schema::migrate(&mut conn).unwrap();
    println!(
        "  migration to schema {} (counting the store once and rebuilding the readings for the time-keyed dedupe, cold): {:.2} s",
        outpost::store::schema::CURRENT_VERSION,
        start.elapsed().as_secs_f64()
    );
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
}

/// Milliseconds of each call of `f`, cold (after [`evict`]) and warm.
fn time(db: &Path, repeat: u64, mut f: impl FnMut()) -> (Vec<f64>, Vec<f64>) {
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..repeat {
        evict(db);
        let start = Instant::now();
        f();
        cold.push(start.elapsed().as_secs_f64() * 1000.0);
        let start = Instant::now();
        f();
        warm.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    (cold, warm)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(
    what: &str,
    (cold, warm): &(Vec<f64>, Vec<f64>),
    baseline: Option<&(Vec<f64>, Vec<f64>)>,
) {
    let ratio = |mine: f64, base: Option<f64>| {
        base.map(|b| format!("  ({:.3}× the COUNT queries)", mine / b))
            .unwrap_or_default()
    };
    println!(
        "  {what:<40} cold median {:>9.2} ms (max {:>9.2}){}",
        median(cold),
        cold.iter().cloned().fold(0.0, f64::max),
        ratio(median(cold), baseline.map(|b| median(&b.0)))
    );
    println!(
        "  {what:<40} warm median {:>9.2} ms (max {:>9.2}){}",
        median(warm),
        warm.iter().cloned().fold(0.0, f64::max),
        ratio(median(warm), baseline.map(|b| median(&b.1)))
    );
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn main() {
    // `cargo test` builds benches but runs them only with `--bench`.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let rows = env_u64("STATUS_ROWS", 5_000_000);
    let repeat = env_u64("STATUS_REPEAT", 5).max(1);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outpost.db");
    println!("status_cost: {rows} readings, all unsynced; {repeat} cold and warm runs each");
    build_store(&db, rows);
    let bin = env!("CARGO_BIN_EXE_outpost");

    // The baseline: the two row counts `status` and `/metrics` made before.
    let baseline = time(&db, repeat, || {
        let conn = outpost::store::open_reader(&db, Duration::from_secs(5)).unwrap();
        let counts = outpost::store::counted_readings(&conn).unwrap();
        assert_eq!(counts.unsynced, rows as i64);
    });
    report("COUNT(*) queries (baseline)", &baseline, None);
    let kept = time(&db, repeat, || {
        let conn = outpost::store::open_reader(&db, Duration::from_secs(5)).unwrap();
        let counts = outpost::store::reading_counts(&conn).unwrap();
        assert_eq!(counts.unsynced, rows as i64);
    });
    report("kept counts (reading_counts)", &kept, Some(&baseline));

    let status = time(&db, repeat, || {
        let out = Command::new(bin)
            .args(["status", "--db"])
            .arg(&db)
            .stderr(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "outpost status failed");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("{rows} unsynced")),
            "outpost status shows the backlog"
        );
    });
    report(
        "`outpost status --db` (whole process)",
        &status,
        Some(&baseline),
    );

    // `outpost run` on the store: one simulated source reading once an hour, a size cap
    // above the store's (the default 1 GiB would prune the oldest unsynced readings).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ngateway_id = \"bench\"\n[storage]\npath = \"{}\"\nmax_size = \"16GiB\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             [[sources]]\ntype = \"simulated\"\nname = \"sim\"\nperiod = \"1h\"\n",
            db.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let _agent = Killed(
        Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap(),
    );
    // Up, and past its background integrity check of a large database (which reads
    // every page and would warm the cache).
    // A small store is checked before the agent opens it, silently.
    let checked_in_background = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0)
        > outpost::store::CHECK_AT_OPEN_MAX_BYTES;
    let deadline = Instant::now() + Duration::from_secs(600);
    while (checked_in_background
        && !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("integrity check"))
        || TcpStream::connect(("127.0.0.1", port)).is_err()
    {
        assert!(Instant::now() < deadline, "the agent did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The store's readings plus the few the simulated source added since its start.
    let metrics = time(&db, repeat, || {
        let text = scrape(port);
        let backlog = text
            .lines()
            .find(|l| l.contains("backlog_rows ") && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        assert!(
            backlog.is_some_and(|b| b >= rows as f64 && b <= rows as f64 + 1000.0),
            "the scrape shows the backlog ({backlog:?}):\n{text}"
        );
    });
    report("one `/metrics` scrape", &metrics, Some(&baseline));
}
