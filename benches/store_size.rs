//! Bytes on disk per stored reading: how large the local SQLite database grows, for
//! sizing `storage.max_size` and working out how long a site can stay offline.
//!
//!     cargo bench --bench store_size
//!     ROWS=200000 cargo bench --bench store_size
//!
//! Writes `ROWS` readings (default 1,000,000) through the real store writer, in the
//! shapes the sources produce, then reports the database's used size (pages not on the
//! free list, the figure `storage.max_size` caps) per reading, split by table and index
//! (SQLite's `dbstat`), before and after the rows are marked synced.
//!
//! - `lorawan`: 200 devices, one uplink a minute each with three fields (temperature,
//!   humidity, battery), every reading carrying the TTN source's `meta` JSON (f_port,
//!   f_cnt, dev_eui, RSSI, SNR, gateway id), device ids like `coldroom-017`.
//! - `serial`: 200 series of one metric, no `meta` (as the serial, generic MQTT and
//!   simulated sources store them).

use chrono::{Duration, Utc};
use outpost::model::{Batch, Reading, Uid};
use outpost::store::{StorageConfig, Store, StoreOptions};
use serde_json::json;
use std::path::Path;

const DEVICES: u64 = 200;
const METRICS: [(&str, &str); 3] = [("temperature", "°C"), ("humidity", "%"), ("battery", "V")];

#[derive(Clone, Copy)]
enum Shape {
    Lorawan,
    Serial,
}

/// Reading `i` of `rows`; the newest is now, the others spaced as the site sends them.
fn reading(shape: Shape, i: u64, rows: u64, now: chrono::DateTime<Utc>) -> Reading {
    let per_uplink = match shape {
        Shape::Lorawan => METRICS.len() as u64,
        Shape::Serial => 1,
    };
    let uplink = i / per_uplink;
    let device = uplink % DEVICES;
    let minute = uplink / DEVICES;
    let last_minute = (rows / per_uplink) / DEVICES;
    let observed = now - Duration::minutes((last_minute - minute) as i64)
        + Duration::milliseconds((device * 250) as i64);
    let (metric, unit) = match shape {
        Shape::Lorawan => METRICS[(i % per_uplink) as usize],
        Shape::Serial => METRICS[0],
    };
    let meta = match shape {
        Shape::Lorawan => Some(json!({
            "f_port": 2,
            "f_cnt": minute,
            "dev_eui": format!("A84041C2A1B2{device:04X}"),
            "rssi": -97.0 - (device % 20) as f64,
            "snr": 6.25,
            "gateway_id": "site-01-gw",
        })),
        Shape::Serial => None,
    };
    Reading {
        uid: Uid::derive(&["size", &i.to_string()]),
        source: match shape {
            Shape::Lorawan => "ttn".into(),
            Shape::Serial => "rs485".into(),
        },
        device: format!("coldroom-{device:03}"),
        metric: metric.into(),
        value: 2.0 + (i % 700) as f64 / 100.0,
        unit: Some(unit.into()),
        observed_at: observed,
        received_at: observed + Duration::milliseconds(800),
        flags: 0,
        meta: meta.map(Into::into),
    }
}

/// Used bytes (as `storage.max_size` counts them) and the share of each table/index.
fn measure(path: &Path) -> (u64, Vec<(String, u64)>) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    let free: i64 = conn
        .query_row("PRAGMA freelist_count", [], |r| r.get(0))
        .unwrap();
    let size: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    let used = ((pages - free) * size) as u64;
    let mut stmt = conn
        .prepare(
            "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name HAVING name LIKE 'readings%' \
             OR name LIKE 'sqlite_autoindex_readings%' ORDER BY 2 DESC",
        )
        .unwrap();
    let parts = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    (used, parts)
}

async fn fill(path: &Path, shape: Shape, rows: u64) {
    let config = StorageConfig {
        path: path.to_path_buf(),
        // No pruning while measuring: nothing is synced yet, and the cap is out of reach.
        max_size: outpost::config::ByteSize(1 << 40),
        ..StorageConfig::default()
    };
    let (store, ingest) = Store::open(&config, StoreOptions::default()).unwrap();
    let now = Utc::now();
    let mut i = 0;
    while i < rows {
        let readings: Vec<Reading> = (i..(i + 1000).min(rows))
            .map(|j| reading(shape, j, rows, now))
            .collect();
        let (b, ack) = Batch::with_ack(readings);
        ingest.sender.send(b).await.unwrap();
        ack.await.unwrap().unwrap();
        i += 1000;
    }
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
}

async fn mark_synced(path: &Path) {
    let config = StorageConfig {
        path: path.to_path_buf(),
        max_size: outpost::config::ByteSize(1 << 40),
        ..StorageConfig::default()
    };
    let (store, ingest) = Store::open(&config, StoreOptions::default()).unwrap();
    store
        .write(|conn| conn.execute("UPDATE readings SET synced = 1 WHERE synced = 0", []))
        .await
        .unwrap();
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
    // Checkpoint the WAL so the main file holds everything, then hand back free pages.
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); PRAGMA incremental_vacuum;")
        .unwrap();
}

fn report(label: &str, path: &Path, rows: u64) {
    let (used, parts) = measure(path);
    let file = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    println!(
        "  {label:<28} used {:>7.1} MiB = {:>5.1} bytes/reading (file {:.1} MiB)",
        used as f64 / (1 << 20) as f64,
        used as f64 / rows as f64,
        file as f64 / (1 << 20) as f64
    );
    for (name, bytes) in parts {
        println!(
            "      {name:<36} {:>5.1} bytes/reading",
            bytes as f64 / rows as f64
        );
    }
}

fn main() {
    let rows: u64 = std::env::var("ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "store_size: {rows} readings per shape, dir {}",
        dir.path().display()
    );
    for (name, shape) in [("lorawan", Shape::Lorawan), ("serial", Shape::Serial)] {
        let path = dir.path().join(format!("{name}.db"));
        runtime.block_on(fill(&path, shape, rows));
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")
                .unwrap();
        }
        report(&format!("{name}, unsynced"), &path, rows);
        runtime.block_on(mark_synced(&path));
        report(&format!("{name}, synced"), &path, rows);
    }
}
