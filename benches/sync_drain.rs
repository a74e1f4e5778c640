//! Draining a backlog to central PostgreSQL through PgBouncer (transaction pooling),
//! against `psql` doing a staged `\copy` into an `ON COMMIT DROP` table plus
//! `INSERT … ON CONFLICT DO NOTHING` through the same PgBouncer, in the same run.
//!
//!     cargo bench --bench sync_drain
//!     ROWS=200000 BATCH=10000 CONNECTIONS=1 cargo bench --bench sync_drain
//!
//! (`BATCH` is `sync.batch_size`, `CONNECTIONS` is `sync.backlog_connections`; both
//! default to the agent's defaults.)
//!
//! The agent's path is the whole of it: reading unsynced rows from SQLite on its own
//! connection, the upload transactions (binary `COPY` into an `ON COMMIT DROP` staging
//! table, then `INSERT … SELECT … ON CONFLICT DO NOTHING`, up to `CONNECTIONS` of them
//! in flight), and the synced marks through the store writer (`synchronous=FULL`). The backlog is
//! written straight into SQLite first, as an outage leaves it. The central table is
//! emptied before each contender. RSS of this process is sampled while draining (every
//! 20 ms, with the progress read from the lowest unsynced id).

#[path = "../tests/support/mod.rs"]
mod support;

use outpost::config::{AgentConfig, HumanDuration};
use outpost::model::Uid;
use outpost::store::{StorageConfig, Store, StoreOptions};
use outpost::sync::central::{self, Layout};
use outpost::sync::postgres::{connect, ConnectOptions};
use outpost::sync::{SslMode, SyncConfig};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};
use support::{PgBouncer, Postgres};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Writes the backlog into SQLite and the same rows, as central will hold them, as CSV.
fn fill_backlog(db: &Path, csv: &Path, gateway: &str, rows: usize) {
    let mut conn = rusqlite::Connection::open(db).unwrap();
    let tx = conn.transaction().unwrap();
    let mut out = std::io::BufWriter::new(std::fs::File::create(csv).unwrap());
    let base = chrono::Utc::now() - chrono::Duration::days(2);
    let received = chrono::Utc::now();
    {
        let mut stmt = tx
            .prepare(
                "INSERT INTO readings (uid, source, device, metric, value, unit, observed_at, received_at, flags, meta) \
                 VALUES (?1, 'bench', ?2, 'temperature', ?3, '°C', ?4, ?5, 0, ?6)",
            )
            .unwrap();
        for i in 0..rows as i64 {
            let uid = Uid::derive(&[gateway, &i.to_string()]);
            let device = format!("device-{}", i % 50);
            let value = (i % 1000) as f64 / 10.0;
            let observed = base + chrono::Duration::milliseconds(i * 100);
            let meta = format!("{{\"f_cnt\":{i}}}");
            stmt.execute(rusqlite::params![
                uid.0.to_vec(),
                device,
                value,
                observed.timestamp_micros(),
                received.timestamp_micros(),
                meta
            ])
            .unwrap();
            let h = uid.to_hex();
            writeln!(
                out,
                "{gateway},{}-{}-{}-{}-{},{},{},bench,{device},temperature,{value},°C,0,\"{}\"",
                &h[0..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..32],
                observed.to_rfc3339(),
                received.to_rfc3339(),
                meta.replace('"', "\"\"")
            )
            .unwrap();
        }
    }
    tx.commit().unwrap();
    out.flush().unwrap();
}

fn psql_baseline(bouncer: &PgBouncer, csv: &Path) -> Duration {
    let script = format!(
        "BEGIN;\n\
         CREATE TEMP TABLE stage (LIKE outpost.readings INCLUDING DEFAULTS) ON COMMIT DROP;\n\
         \\copy stage (gateway_id, uid, observed_at, received_at, source, device, metric, value, unit, flags, meta) FROM '{}' WITH (FORMAT csv)\n\
         INSERT INTO outpost.readings (gateway_id, uid, observed_at, received_at, source, device, metric, value, unit, flags, meta) \
           SELECT gateway_id, uid, observed_at, received_at, source, device, metric, value, unit, flags, meta FROM stage \
           ON CONFLICT DO NOTHING;\n\
         COMMIT;\n",
        csv.display()
    );
    let file = csv.with_extension("sql");
    std::fs::write(&file, script).unwrap();
    let start = Instant::now();
    let out = std::process::Command::new("/usr/bin/psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", bouncer.host()])
        .args([
            "-p",
            &bouncer.port().to_string(),
            "-U",
            "outpost",
            "-d",
            "outpost",
            "-f",
        ])
        .arg(&file)
        .env("PGPASSWORD", "outpost-pass")
        .output()
        .expect("run psql");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

fn main() {
    let rows = env_usize("ROWS", 1_000_000);
    let defaults = SyncConfig::with_url("postgres://bench@localhost/bench");
    let batch = env_usize("BATCH", defaults.batch_size);
    let connections = env_usize("CONNECTIONS", defaults.backlog_connections);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outpost.db");
    let csv = dir.path().join("backlog.csv");

    let storage = StorageConfig {
        path: db.clone(),
        ..StorageConfig::default()
    };
    let (store, ingest) = Store::open(&storage, StoreOptions::default()).unwrap();
    eprintln!("Writing a backlog of {rows} rows ...");
    fill_backlog(&db, &csv, "bench-gw", rows);

    let mut sync = SyncConfig::with_url(bouncer.url());
    sync.sslmode = SslMode::Disable;
    sync.batch_size = batch;
    sync.backlog_connections = connections;
    sync.backlog_rows_per_second = 0;
    sync.interval = HumanDuration::from_secs(10);
    let options = ConnectOptions::from_config(&sync, "bench");

    runtime.block_on(async {
        let c = connect(&options).await.unwrap();
        central::migrate(&c, Layout::Plain).await.unwrap();
    });

    // Baseline first, then empty the table for the agent.
    eprintln!("psql baseline ...");
    let psql = psql_baseline(&bouncer, &csv);
    assert_eq!(
        pg.psql("SELECT COUNT(*) FROM outpost.readings"),
        rows.to_string()
    );
    pg.psql("TRUNCATE outpost.readings");

    eprintln!("outpost drain ...");
    let token = tokio_util::sync::CancellationToken::new();
    let agent = AgentConfig {
        gateway_id: "bench-gw".into(),
        site: String::new(),
        ..Default::default()
    };
    let reader = rusqlite::Connection::open(&db).unwrap();
    // The lowest unsynced id (one lookup in the partial index, so polling costs the
    // contender nothing; a COUNT(*) every poll walked up to a million index entries):
    // the backlog drains oldest first, so the rows below it are done. After the first
    // round's live batch (the newest rows) this is exact to within one batch.
    let unsynced = || -> i64 {
        let lowest: Option<i64> = reader
            .query_row("SELECT MIN(id) FROM readings WHERE synced = 0", [], |r| {
                r.get(0)
            })
            .unwrap();
        lowest.map_or(0, |id| rows as i64 - (id - 1))
    };
    let rss_before = rss_kib();
    let mut rss_samples = Vec::new();
    let start = Instant::now();
    let worker = runtime.spawn(outpost::sync::run(
        sync,
        agent,
        store.clone(),
        token.clone(),
    ));
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let left = unsynced();
        rss_samples.push((rows as i64 - left, rss_kib()));
        if left == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(1800),
            "the drain takes too long"
        );
    }
    let drain = start.elapsed();
    token.cancel();
    runtime.block_on(async {
        let _ = worker.await;
    });
    drop(store);
    drop(ingest);
    assert_eq!(
        pg.psql("SELECT COUNT(*) FROM outpost.readings"),
        rows.to_string()
    );

    let agent_rate = rows as f64 / drain.as_secs_f64();
    let psql_rate = rows as f64 / psql.as_secs_f64();
    let at = |fraction: f64| {
        rss_samples
            .iter()
            .find(|(done, _)| *done as f64 >= fraction * rows as f64)
            .map(|(_, r)| *r)
            .unwrap_or(0)
    };
    let max = rss_samples.iter().map(|(_, r)| *r).max().unwrap_or(0);
    println!("rows {rows}, batch {batch}, backlog connections {connections}");
    println!(
        "outpost drain: {:.1}s, {agent_rate:.0} rows/s",
        drain.as_secs_f64()
    );
    println!(
        "psql \\copy + INSERT … ON CONFLICT DO NOTHING: {:.1}s, {psql_rate:.0} rows/s",
        psql.as_secs_f64()
    );
    println!("ratio outpost/psql: {:.2}", agent_rate / psql_rate);
    println!(
        "RSS (MiB): before {:.1}; at 10% {:.1}, 50% {:.1}, 90% {:.1}; max {:.1}",
        rss_before as f64 / 1024.0,
        at(0.1) as f64 / 1024.0,
        at(0.5) as f64 / 1024.0,
        at(0.9) as f64 / 1024.0,
        max as f64 / 1024.0
    );
}
