//! Group-commit throughput of the store (rows/s with `synchronous=FULL`, WAL) against a
//! plain rusqlite loop committing one transaction per 1,000 rows, in the same run.
//!
//!     cargo bench --bench store_commit
//!     ROWS=500000 cargo bench --bench store_commit
//!
//! The agent's path includes everything a source pays for: building `Reading`s,
//! the bounded channel, the writer thread, uid dedupe, the per-series summary and the
//! acknowledgement after each commit.

use chrono::Utc;
use outpost::model::{Batch, Reading, Uid};
use outpost::store::{StorageConfig, Store, StoreOptions};
use std::time::Instant;

fn reading(i: u64) -> Reading {
    let now = Utc::now();
    Reading {
        uid: Uid::derive(&["bench", &i.to_string()]),
        source: "bench".into(),
        device: format!("device-{}", i % 50),
        metric: "temperature".into(),
        value: (i % 1000) as f64 / 10.0,
        unit: Some("°C".into()),
        observed_at: now,
        received_at: now,
        flags: 0,
        meta: None,
    }
}

type Acked =
    tokio::sync::oneshot::Receiver<Result<outpost::model::Committed, outpost::store::StoreError>>;

fn baseline(path: &std::path::Path, rows: u64) -> f64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE readings (id INTEGER PRIMARY KEY, uid BLOB NOT NULL UNIQUE, source TEXT NOT NULL,
           device TEXT NOT NULL, metric TEXT NOT NULL, value REAL NOT NULL, unit TEXT,
           observed_at INTEGER NOT NULL, received_at INTEGER NOT NULL, flags INTEGER NOT NULL DEFAULT 0,
           meta TEXT, synced INTEGER NOT NULL DEFAULT 0);",
    )
    .unwrap();
    let start = Instant::now();
    let mut i = 0;
    while i < rows {
        let tx = conn.unchecked_transaction().unwrap();
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO readings (uid, source, device, metric, value, unit, observed_at, received_at, flags, meta) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .unwrap();
            for j in i..(i + 1000).min(rows) {
                let r = reading(j);
                stmt.execute(rusqlite::params![
                    &r.uid.0[..],
                    r.source,
                    r.device,
                    r.metric,
                    r.value,
                    r.unit,
                    r.observed_at.timestamp_micros(),
                    r.received_at.timestamp_micros(),
                    r.flags,
                    None::<String>
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
        i += 1000;
    }
    rows as f64 / start.elapsed().as_secs_f64()
}

async fn agent(path: &std::path::Path, rows: u64, batch: u64) -> f64 {
    let config = StorageConfig {
        path: path.to_path_buf(),
        batch_max_rows: 1000,
        ..StorageConfig::default()
    };
    let (store, ingest) = Store::open(&config, StoreOptions::default()).unwrap();
    // Acknowledgements are awaited by a separate task, as a source with many
    // producers in flight would; the channel bound applies backpressure.
    let (acks_tx, mut acks_rx) = tokio::sync::mpsc::channel::<Acked>(100_000);
    let waiter = tokio::spawn(async move {
        let mut stored = 0usize;
        while let Some(ack) = acks_rx.recv().await {
            stored += ack.await.unwrap().unwrap().inserted;
        }
        stored
    });
    let start = Instant::now();
    let mut i = 0;
    while i < rows {
        let readings: Vec<Reading> = (i..(i + batch).min(rows)).map(reading).collect();
        let (b, ack) = Batch::with_ack(readings);
        ingest.sender.send(b).await.unwrap();
        acks_tx.send(ack).await.unwrap();
        i += batch;
    }
    drop(acks_tx);
    let stored = waiter.await.unwrap();
    let rate = rows as f64 / start.elapsed().as_secs_f64();
    assert_eq!(stored as u64, rows);
    let commits = store
        .stats()
        .commits
        .load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "    ({commits} commits, {:.0} rows per commit)",
        rows as f64 / commits.max(1) as f64
    );
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
    rate
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn main() {
    let rows: u64 = std::env::var("ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    // On the real disk (not tmpfs), where fsync costs what it costs on a gateway.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "store_commit: {rows} rows, synchronous=FULL, WAL, dir {}",
        dir.path().display()
    );
    let base = baseline(&dir.path().join("baseline.db"), rows);
    println!("  baseline  rusqlite, 1 transaction per 1000 rows: {base:>10.0} rows/s");
    for batch in [1u64, 10, 100] {
        // The hash chain's cost (G10): the same writer without sealing, same run.
        std::env::set_var(outpost::store::chain::BENCH_NO_CHAIN_ENV, "1");
        let path = dir.path().join(format!("nochain-{batch}.db"));
        let plain = runtime.block_on(agent(&path, rows, batch));
        std::env::remove_var(outpost::store::chain::BENCH_NO_CHAIN_ENV);
        println!(
            "  outpost   without the chain, batches of {batch:>3} rows: {plain:>10.0} rows/s   ratio {:.2}",
            plain / base
        );
        let path = dir.path().join(format!("agent-{batch}.db"));
        let rate = runtime.block_on(agent(&path, rows, batch));
        println!(
            "  outpost   store writer, batches of {batch:>3} rows:   {rate:>10.0} rows/s   ratio {:.2}   chain/no chain {:.3}",
            rate / base,
            rate / plain
        );
    }
    println!("  peak RSS of the bench process: {} KiB", rss_kib());
}
