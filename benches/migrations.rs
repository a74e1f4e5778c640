//! Migrations and start-up at production size.
//!
//!     cargo bench --bench migrations                        # local and central
//!     MIGRATIONS_PART=local cargo bench --bench migrations  # only the SQLite part
//!     MIGRATIONS_PART=central CENTRAL_ROWS=50000000 cargo bench --bench migrations
//!
//! Local: a `LOCAL_ROWS`-row (default 5,000,000) database at schema version 1 is built
//! in one transaction (`WITH RECURSIVE`), twice: once as a site after a long outage
//! (every reading unsynced) and once as a site in steady state (every reading synced,
//! all within the retention window). On each it times, with the database's pages
//! dropped from the page cache first (`posix_fadvise(DONTNEED)`, "cold") and again
//! warm: `quick_check`, the migration to the current version on its own, the agent's
//! full start (`outpost run` until the "Outpost is running." line and until /health
//! answers, then until its first reading is committed), `outpost status`, and a second
//! start of the already migrated database.
//!
//! Central: a private PostgreSQL 15 cluster on disk (`OUTPOST_TEST_TMPDIR`, default
//! /var/tmp here; 50M rows need ~12 GB), `CENTRAL_ROWS` (default 50,000,000) rows
//! generated with `generate_series` into `outpost.readings` as the oldest (and so far
//! only) schema version creates it but without its two secondary indexes and without
//! `outpost.schema_version`; then `outpost central migrate` is timed three times:
//! building the missing indexes, on the complete table without a recorded version, and
//! the no-op re-run. Everything is deleted at the end.

#[path = "../tests/support/mod.rs"]
mod support;

use outpost::store::schema;
use rusqlite::Connection;
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
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
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn bench_dir() -> PathBuf {
    let base = std::env::var_os("OUTPOST_TEST_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    // Support's Postgres (fast_temp_dir) must land on disk too.
    std::env::set_var("OUTPOST_TEST_TMPDIR", &base);
    base
}

/// Drops the file's pages from the page cache (only this file's, unlike drop_caches).
fn drop_cache(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", path.display()));
        if let Ok(f) = std::fs::File::open(&p) {
            // SAFETY: a valid open descriptor; advice only.
            unsafe {
                libc::fdatasync(f.as_raw_fd());
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn main() {
    // `cargo test` builds benches but runs them only with `--bench`.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let part = std::env::var("MIGRATIONS_PART").unwrap_or_else(|_| "all".into());
    let base = bench_dir();
    if part == "all" || part == "local" {
        local(&base, env_u64("LOCAL_ROWS", 5_000_000));
    }
    if part == "all" || part == "central" {
        central(env_u64("CENTRAL_ROWS", 50_000_000));
    }
}

// ---------------------------------------------------------------------------------
// Local
// ---------------------------------------------------------------------------------

/// A schema-version-1 database of `rows` readings from 200 devices, `step_us` apart,
/// the newest received just now.
fn build_v1(path: &Path, rows: u64, synced: bool, step_us: i64) -> Duration {
    let started = Instant::now();
    let mut conn = Connection::open(path).unwrap();
    // As the agent creates it: page size and auto_vacuum before the first table, WAL.
    conn.pragma_update(None, "page_size", outpost::store::NEW_DATABASE_PAGE_SIZE)
        .unwrap();
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
        .unwrap();
    let _: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    conn.pragma_update(None, "cache_size", -524_288).unwrap();
    assert_eq!(schema::migrate_to(&mut conn, 1).unwrap(), 1);
    let now = chrono::Utc::now().timestamp_micros();
    let first = now - rows as i64 * step_us;
    let tx = conn.transaction().unwrap();
    tx.execute(
        "INSERT INTO readings (uid, source, device, metric, value, unit, observed_at, \
         received_at, flags, meta, synced) \
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
         SELECT randomblob(16), 'ttn', 'dev-' || (i % 200), 'temperature', \
                20.0 + (i % 100) / 10.0, '°C', ?2 + i * ?3 - 1500000, ?2 + i * ?3, 0, \
                '{\"f_cnt\":' || (i / 200) || ',\"rssi\":-97,\"snr\":6.25,\"gateway\":\"site-gw-01\"}', ?4 \
         FROM n",
        rusqlite::params![rows as i64, first, step_us, synced as i64],
    )
    .unwrap();
    tx.execute(
        "INSERT INTO series (source, device, metric, value, unit, observed_at, received_at, count) \
         SELECT source, device, metric, value, unit, MAX(observed_at), MAX(received_at), COUNT(*) \
         FROM readings GROUP BY source, device, metric",
        [],
    )
    .unwrap();
    tx.commit().unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    drop(conn);
    started.elapsed()
}

fn write_config(dir: &Path, db: &Path, http: u16) -> PathBuf {
    let path = dir.join("outpost.toml");
    std::fs::write(
        &path,
        format!(
            r#"[agent]
gateway_id = "bench"
[storage]
path = "{db}"
# 5M readings take ~1.1 GB: above the 1 GiB default cap the first pass would delete
# the oldest readings, which is G4 at work but not what is timed here.
max_size = "4GiB"
[http]
listen = "127.0.0.1:{http}"
[sync]
enabled = true
url = "postgres://outpost@127.0.0.1:1/fleet"
password = "unused"
sslmode = "disable"
[[sources]]
type = "simulated"
name = "ttn"
devices = ["dev-0"]
period = "1s"
[[sources.metrics]]
name = "temperature"
unit = "°C"
base = 4.0
[[alerts]]
name = "warm"
kind = "threshold"
metric = "temperature"
above = 40.0
for = "5m"
notifiers = ["journal"]
[[alerts]]
name = "rising"
kind = "rate"
metric = "temperature"
delta = 3.0
period = "10m"
notifiers = ["journal"]
[[alerts]]
name = "silent"
kind = "stale"
metric = "temperature"
after = "15m"
notifiers = ["journal"]
[[notifiers]]
name = "journal"
type = "log"
"#,
            db = db.display(),
        ),
    )
    .unwrap();
    path
}

fn max_id(db: &Path) -> i64 {
    outpost::store::open_reader(db, Duration::from_secs(5))
        .and_then(|c| {
            c.query_row("SELECT COALESCE(MAX(id), 0) FROM readings", [], |r| {
                r.get(0)
            })
        })
        .unwrap_or(0)
}

struct Startup {
    running_line: Duration,
    health: Duration,
    first_commit: Duration,
}

/// Starts `outpost run` and times the "Outpost is running." line, the first answer of
/// /health, and the first reading committed after the start; then stops it (SIGTERM).
fn start_agent(dir: &Path, config: &Path, db: &Path, http: u16) -> Startup {
    let before = max_id(db);
    let log_path = dir.join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let started = Instant::now();
    let agent = Killed(
        Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap(),
    );
    let deadline = started + Duration::from_secs(300);
    let (mut running_line, mut health, mut first_commit) = (None, None, None);
    while running_line.is_none() || health.is_none() || first_commit.is_none() {
        assert!(
            Instant::now() < deadline,
            "the agent did not start in 300 s"
        );
        if running_line.is_none() {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("Outpost is running.") {
                running_line = Some(started.elapsed());
            }
        }
        if health.is_none() && support::agent::http_get(http, "/health").is_some() {
            health = Some(started.elapsed());
        }
        if first_commit.is_none() && max_id(db) > before {
            first_commit = Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGTERM: a clean stop, as systemd does.
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(agent.0.id() as i32, libc::SIGTERM);
    }
    let mut agent = agent;
    let stop = Instant::now();
    while agent.0.try_wait().unwrap().is_none() {
        assert!(
            stop.elapsed() < Duration::from_secs(60),
            "the agent did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    for line in log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("WARN"))
    {
        if !line.contains("sync") && !line.contains("central") {
            println!("      agent: {line}");
        }
    }
    Startup {
        running_line: running_line.unwrap(),
        health: health.unwrap(),
        first_commit: first_commit.unwrap(),
    }
}

fn print_startup(label: &str, s: &Startup) {
    println!(
        "    {label:<34} running line {}, /health {}, first reading committed {}",
        secs(s.running_line),
        secs(s.health),
        secs(s.first_commit)
    );
}

fn status(config: &Path) -> (Duration, String) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["status", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("Readings:"))
        .unwrap_or("")
        .to_string();
    (elapsed, line)
}

fn local(base: &Path, rows: u64) {
    let dir = tempfile::Builder::new()
        .prefix("outpost-migrations-")
        .tempdir_in(base)
        .unwrap();
    println!(
        "local: {rows} readings at schema version 1 -> {} (in {})",
        schema::CURRENT_VERSION,
        dir.path().display()
    );
    // 5M readings over 17.4 days (200 sensors once a minute) unsynced; or over 6.5 days
    // (within the 7 d retention) synced.
    let window_backlog_us = 300_000;
    let window_synced_us = (6.5 * 86_400e6 / rows as f64) as i64;
    for (name, synced, step) in [
        ("outage backlog (all unsynced)", false, window_backlog_us),
        ("steady state (all synced)", true, window_synced_us),
    ] {
        println!("  {name}:");
        let v1 = dir.path().join("v1.db");
        let built = build_v1(&v1, rows, synced, step);
        println!(
            "    built in {} ({:.0} MiB)",
            secs(built),
            file_size(&v1) as f64 / 1048576.0
        );
        // (a) quick_check and the migration on their own, on a copy.
        let copy = dir.path().join("copy.db");
        std::fs::copy(&v1, &copy).unwrap();
        for cold in [true, false] {
            if cold {
                drop_cache(&copy);
            }
            let conn = Connection::open(&copy).unwrap();
            let t = Instant::now();
            let check: String = conn
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .unwrap();
            assert_eq!(check, "ok");
            println!(
                "    quick_check ({})              {}",
                if cold { "cold" } else { "warm" },
                secs(t.elapsed())
            );
        }
        drop_cache(&copy);
        let mut conn = Connection::open(&copy).unwrap();
        let _: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        let t = Instant::now();
        let before = schema::UID_TIME_VERSION - 1;
        let v = schema::migrate_to(&mut conn, before).unwrap();
        println!(
            "    schema::migrate 1 -> {v} (cold)        {}",
            secs(t.elapsed())
        );
        // The rebuild of the readings table for the time-keyed dedupe (schema 11).
        let t = Instant::now();
        let v = schema::migrate(&mut conn).unwrap();
        println!(
            "    schema::migrate {before} -> {v} (rebuild)    {}   ({:.0} MiB after)",
            secs(t.elapsed()),
            file_size(&copy) as f64 / 1048576.0
        );
        drop(conn);
        std::fs::remove_file(&copy).unwrap();
        let _ = std::fs::remove_file(dir.path().join("copy.db-wal"));
        let _ = std::fs::remove_file(dir.path().join("copy.db-shm"));

        // (b) the agent's full start on the version-1 database, then again.
        let http = support::free_port();
        let config = write_config(dir.path(), &v1, http);
        drop_cache(&v1);
        let s = start_agent(dir.path(), &config, &v1, http);
        print_startup("start, migrating (cold)", &s);
        drop_cache(&v1);
        let (t, line) = status(&config);
        println!(
            "    outpost status (cold)             {}   [{line}]",
            secs(t)
        );
        let (t, _) = status(&config);
        println!("    outpost status (warm)             {}", secs(t));
        drop_cache(&v1);
        let s = start_agent(dir.path(), &config, &v1, http);
        print_startup("start, already migrated (cold)", &s);
        let s = start_agent(dir.path(), &config, &v1, http);
        print_startup("start, already migrated (warm)", &s);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", v1.display()));
        }
    }
}

// ---------------------------------------------------------------------------------
// Central
// ---------------------------------------------------------------------------------

fn central(rows: u64) {
    let pg = support::Postgres::start();
    println!(
        "central: {rows} readings in outpost.readings (PostgreSQL 15 in {})",
        pg.dir().display()
    );
    // A production-like server: WAL on, checkpoints not forced every 1 GB.
    pg.psql_superuser("ALTER SYSTEM SET max_wal_size = '8GB'");
    pg.psql_superuser("SELECT pg_reload_conf()");
    // The table exactly as migration 1 creates it (printed by `outpost central schema`),
    // without the two secondary indexes, and no schema_version: what an operator has who
    // loaded the table by hand, or whose index builds were interrupted.
    let schema = outpost::sync::central::schema_sql(
        outpost::sync::central::Layout::Plain,
        chrono::Utc::now().date_naive(),
    );
    let table: String = schema
        .lines()
        .filter(|l| !l.starts_with("CREATE INDEX IF NOT EXISTS readings_"))
        .filter(|l| !l.starts_with("INSERT INTO outpost.schema_version"))
        .collect::<Vec<_>>()
        .join("\n");
    pg.psql(&format!(
        "{table}\nALTER TABLE outpost.readings DROP CONSTRAINT readings_unique;"
    ));
    // 50 gateways x 100 devices, one reading every 600 ms per gateway-ish; unique uids.
    let chunk = 5_000_000u64;
    let load = Instant::now();
    let mut done = 0u64;
    while done < rows {
        let n = chunk.min(rows - done);
        pg.psql(&format!(
            "INSERT INTO outpost.readings (gateway_id, uid, observed_at, received_at, source, device, \
             metric, value, unit, flags, meta, inserted_at) \
             SELECT 'gw-' || (i % 50), gen_random_uuid(), ts, ts + interval '2 s', 'ttn', \
                    'dev-' || (i % 5000), (ARRAY['temperature','humidity','battery'])[1 + i % 3], \
                    (i % 400) / 10.0, '°C', 0, \
                    jsonb_build_object('f_cnt', i / 5000, 'rssi', -97), ts + interval '3 s' \
             FROM generate_series({from}::bigint, {to}::bigint) AS g(i), \
                  LATERAL (SELECT timestamptz '2025-01-01' + i * interval '600 ms') AS t(ts)",
            from = done + 1,
            to = done + n
        ));
        done += n;
        println!("    loaded {done} rows ({})", secs(load.elapsed()));
    }
    let t = Instant::now();
    pg.psql(
        "ALTER TABLE outpost.readings ADD CONSTRAINT readings_unique UNIQUE (gateway_id, uid, observed_at)",
    );
    pg.psql("ANALYZE outpost.readings");
    pg.psql_superuser("CHECKPOINT");
    let t = t.elapsed();
    println!(
        "    rows loaded in {}; unique constraint + ANALYZE in {}",
        secs(load.elapsed() - t),
        secs(t)
    );
    let size = pg.psql_superuser(
        "SELECT pg_size_pretty(pg_total_relation_size('outpost.readings')), \
         pg_size_pretty(pg_relation_size('outpost.readings'))",
    );
    println!("    outpost.readings total / heap: {}", size.trim());

    // While each migrate runs, a second session tries a sync-style insert with a 1 s
    // lock_timeout every 5 s: does migrate block the agents?
    let probe = |pg: &support::Postgres| {
        pg.try_psql(
            "SET lock_timeout = '1s'; INSERT INTO outpost.readings (gateway_id, uid, observed_at, \
             received_at, source, device, metric, value) VALUES ('probe', gen_random_uuid(), now(), \
             now(), 'probe', 'probe', 'probe', 1) ON CONFLICT DO NOTHING",
        )
        .is_ok()
    };
    for label in [
        "migrate, secondary indexes missing",
        "migrate, complete table, no version",
        "migrate, no-op re-run",
    ] {
        if label.contains("no version") {
            pg.psql("TRUNCATE outpost.schema_version");
        }
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (blocked, ok) = std::thread::scope(|s| {
            let prober = s.spawn(|| {
                let (mut blocked, mut ok) = (0, 0);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if probe(&pg) {
                        ok += 1;
                    } else {
                        blocked += 1;
                    }
                    for _ in 0..50 {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                (blocked, ok)
            });
            let (t, first) = pg.outpost_central_migrate();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            println!("    {label:<38} {}   [{first}]", secs(t));
            prober.join().unwrap()
        });
        println!(
            "      sync-style inserts meanwhile: {ok} went through, {blocked} timed out on a lock"
        );
    }
    let size =
        pg.psql_superuser("SELECT pg_size_pretty(pg_total_relation_size('outpost.readings'))");
    println!("    outpost.readings total after: {}", size.trim());
    let _ = std::io::stdout().flush();
    // Dropping the cluster deletes its directory (and the ~12 GB with it).
    drop(pg);
}
