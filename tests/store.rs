//! The store's guarantees: acknowledgement only after commit (G1), dedupe by uid (G2),
//! recovery from a corrupt file, and a full disk that neither crashes nor loses
//! acknowledged data (G4).

use chrono::Utc;
use outpost::model::{Batch, Reading, Uid};
use outpost::store::{StorageConfig, Store, StoreError, StoreOptions};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn config(dir: &Path) -> StorageConfig {
    StorageConfig {
        path: dir.join("outpost.db"),
        batch_max_delay: outpost::config::HumanDuration::from_millis(5),
        ..StorageConfig::default()
    }
}

fn reading(i: u64) -> Reading {
    let now = Utc::now();
    Reading {
        uid: Uid::derive(&["test", &i.to_string()]),
        source: "test".into(),
        device: format!("dev-{}", i % 3),
        metric: "temperature".into(),
        value: i as f64,
        unit: Some("°C".into()),
        observed_at: now,
        received_at: now,
        flags: 0,
        meta: Some(serde_json::json!({"i": i}).into()),
    }
}

fn count(path: &Path) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))
        .unwrap()
}

fn uids_in(path: &Path) -> std::collections::HashSet<Vec<u8>> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn.prepare("SELECT uid FROM readings").unwrap();
    let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

async fn send(
    sender: &tokio::sync::mpsc::Sender<Batch>,
    readings: Vec<Reading>,
) -> Result<outpost::model::Committed, StoreError> {
    let (batch, ack) = Batch::with_ack(readings);
    sender.send(batch).await.unwrap();
    ack.await.unwrap()
}

#[tokio::test]
async fn a_batch_is_acknowledged_only_after_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // The first commit is turned into a rollback by SQLite's commit hook: the rows
    // were inserted, then the commit failed.
    let commits = Arc::new(AtomicUsize::new(0));
    let seen = commits.clone();
    let options = StoreOptions {
        commit_hook: Some(Box::new(move || seen.fetch_add(1, Ordering::SeqCst) == 0)),
        ..StoreOptions::default()
    };
    let (store, ingest) = Store::open(&cfg, options).unwrap();
    let failed = send(&ingest.sender, vec![reading(1), reading(2)]).await;
    assert_eq!(
        failed,
        Err(StoreError::RolledBack),
        "an uncommitted batch is never acknowledged as stored"
    );
    assert_eq!(
        count(&cfg.path),
        0,
        "nothing of the failed batch is in the database"
    );

    let ok = send(&ingest.sender, vec![reading(1), reading(2)])
        .await
        .unwrap();
    assert_eq!(ok.inserted, 2);
    // The acknowledgement came after the commit: a separate connection sees the rows.
    assert_eq!(count(&cfg.path), 2);
    drop(ingest.sender);
    drop(store);
    ingest.finished.await.unwrap();
}

#[tokio::test]
async fn duplicates_by_uid_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
    let first = send(&ingest.sender, (0..10).map(reading).collect())
        .await
        .unwrap();
    assert_eq!((first.inserted, first.duplicates), (10, 0));
    let again = send(&ingest.sender, (5..15).map(reading).collect())
        .await
        .unwrap();
    assert_eq!((again.inserted, again.duplicates), (5, 5));
    // The same uid twice within one batch.
    let inside = send(&ingest.sender, vec![reading(100), reading(100)])
        .await
        .unwrap();
    assert_eq!((inside.inserted, inside.duplicates), (1, 1));
    assert_eq!(count(&cfg.path), 16);
    let report = outpost::cli::status::status_report(&cfg.path).unwrap();
    let total: i64 = report.series.iter().map(|s| s.count).sum();
    assert_eq!(total, 16, "series counts only new rows");
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
}

#[tokio::test]
async fn non_finite_values_are_refused_without_failing_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
    let mut nan = reading(1);
    nan.value = f64::NAN;
    let mut inf = reading(2);
    inf.value = f64::INFINITY;
    let c = send(&ingest.sender, vec![nan, inf, reading(3)])
        .await
        .unwrap();
    assert_eq!(c.inserted, 1);
    assert_eq!(store.stats().readings_invalid.load(Ordering::Relaxed), 2);
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
}

#[tokio::test]
async fn committed_readings_stream_in_order_and_end_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
    let mut stream = store.committed_readings(0).unwrap();
    for chunk in 0..5u64 {
        send(
            &ingest.sender,
            (chunk * 10..chunk * 10 + 10).map(reading).collect(),
        )
        .await
        .unwrap();
    }
    drop(ingest.sender);
    drop(store);
    let mut ids = Vec::new();
    while let Some(rows) = stream.next_batch(7).await {
        ids.extend(rows.iter().map(|r| r.id));
    }
    assert_eq!(ids, (1..=50).collect::<Vec<i64>>());
    ingest.finished.await.unwrap();
}

#[tokio::test]
async fn a_corrupt_database_is_moved_aside_and_a_fresh_one_created() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::write(
        &cfg.path,
        b"this is not an SQLite database, it is garbage \x00\x01\x02".repeat(200),
    )
    .unwrap();
    let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
    send(&ingest.sender, vec![reading(1)]).await.unwrap();
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
    let aside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("outpost.db.corrupt-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the damaged file is kept for diagnosis");
    assert!(std::fs::read(aside[0].path())
        .unwrap()
        .starts_with(b"this is not"));
    assert_eq!(count(&cfg.path), 1);
    // The fresh database's audit log says what happened to the old one (G10).
    let conn = rusqlite::Connection::open(&cfg.path).unwrap();
    let details: String = conn
        .query_row(
            "SELECT details FROM audit_log WHERE kind = 'store.moved_aside'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(details.contains("outpost.db.corrupt-"), "{details}");
}

#[tokio::test]
async fn a_database_with_damaged_pages_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    {
        let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
        for chunk in 0..20u64 {
            send(
                &ingest.sender,
                (chunk * 100..chunk * 100 + 100).map(reading).collect(),
            )
            .await
            .unwrap();
        }
        drop((store, ingest.sender));
        ingest.finished.await.unwrap();
    }
    let conn = rusqlite::Connection::open(&cfg.path).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    drop(conn);
    // Overwrite pages in the middle of the file with garbage.
    let mut bytes = std::fs::read(&cfg.path).unwrap();
    let len = bytes.len();
    assert!(len > 40_000);
    for b in &mut bytes[len / 3..len / 3 + 16384] {
        *b = 0xA5;
    }
    std::fs::write(&cfg.path, &bytes).unwrap();
    let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
    send(&ingest.sender, vec![reading(999_999)]).await.unwrap();
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
    assert_eq!(
        count(&cfg.path),
        1,
        "a fresh database replaced the damaged one"
    );
    assert!(std::fs::read_dir(dir.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("outpost.db.corrupt-")));
}

#[tokio::test]
async fn damage_in_a_large_database_is_found_in_the_background_and_moved_aside_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    // Every database counts as large here: it is opened before it is checked.
    let large = || StoreOptions {
        check_at_open_max_bytes: Some(0),
        ..StoreOptions::default()
    };
    {
        let (store, ingest) = Store::open(&cfg, large()).unwrap();
        for chunk in 0..20u64 {
            send(
                &ingest.sender,
                (chunk * 100..chunk * 100 + 100).map(reading).collect(),
            )
            .await
            .unwrap();
        }
        drop((store, ingest.sender));
        ingest.finished.await.unwrap();
    }
    let conn = rusqlite::Connection::open(&cfg.path).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    drop(conn);
    let mut bytes = std::fs::read(&cfg.path).unwrap();
    let len = bytes.len();
    for b in &mut bytes[len / 3..len / 3 + 16384] {
        *b = 0xA5;
    }
    std::fs::write(&cfg.path, &bytes).unwrap();
    let marker = dir.path().join("outpost.db.check-failed");
    let (store, ingest) = Store::open(&cfg, large()).unwrap();
    let reason = tokio::time::timeout(std::time::Duration::from_secs(30), store.damaged())
        .await
        .expect("the background check reports the damage");
    assert!(!reason.is_empty());
    assert!(marker.exists(), "the next start must know");
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
    // The next start checks before opening and moves the file aside.
    let (store, ingest) = Store::open(&cfg, large()).unwrap();
    send(&ingest.sender, vec![reading(999_999)]).await.unwrap();
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
    assert_eq!(
        count(&cfg.path),
        1,
        "a fresh database replaced the damaged one"
    );
    assert!(!marker.exists());
    assert!(std::fs::read_dir(dir.path()).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("outpost.db.corrupt-")));
}

#[tokio::test]
async fn a_sound_large_database_passes_the_background_check() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let options = || StoreOptions {
        check_at_open_max_bytes: Some(0),
        ..StoreOptions::default()
    };
    let (store, ingest) = Store::open(&cfg, options()).unwrap();
    send(&ingest.sender, vec![reading(1)]).await.unwrap();
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
    let (store, ingest) = Store::open(&cfg, options()).unwrap();
    let damaged = tokio::time::timeout(std::time::Duration::from_secs(2), store.damaged()).await;
    assert!(damaged.is_err(), "nothing is reported for a sound database");
    assert!(!dir.path().join("outpost.db.check-failed").exists());
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
    assert_eq!(count(&cfg.path), 1);
}

#[tokio::test]
async fn a_full_disk_loses_nothing_acknowledged_and_ingest_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let options = StoreOptions {
        // The schema's tables and indexes, a few free pages left by the readings
        // table's rebuild (schema 11), and room for a few hundred readings.
        max_page_count: Some(56),
        ..StoreOptions::default()
    };
    let (store, ingest) = Store::open(&cfg, options).unwrap();
    let mut acknowledged = Vec::new();
    let mut full = 0;
    let mut i = 0u64;
    while full < 3 && i < 100_000 {
        let batch: Vec<Reading> = (i..i + 50).map(reading).collect();
        i += 50;
        match send(&ingest.sender, batch.clone()).await {
            Ok(_) => acknowledged.extend(batch.iter().map(|r| r.uid.0.to_vec())),
            Err(StoreError::Full) => full += 1,
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(full, 3, "the page cap must be reached");
    assert!(store.stats().disk_full.load(Ordering::Relaxed));
    let stored = uids_in(&cfg.path);
    assert!(
        acknowledged.iter().all(|u| stored.contains(u)),
        "every acknowledged reading is stored"
    );
    assert_eq!(
        stored.len(),
        acknowledged.len(),
        "nothing unacknowledged was stored"
    );

    // Space returns (the cap is lifted on the writer's own connection).
    let mut lifted = false;
    for _ in 0..20 {
        if store
            .write(|conn| conn.pragma_update(None, "max_page_count", 1_000_000))
            .await
            .is_ok()
        {
            lifted = true;
            break;
        }
    }
    assert!(lifted);
    let resumed = send(&ingest.sender, (i..i + 50).map(reading).collect())
        .await
        .unwrap();
    assert_eq!(resumed.inserted, 50, "ingest resumes by itself");
    assert!(!store.stats().disk_full.load(Ordering::Relaxed));
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
    let conn = rusqlite::Connection::open(&cfg.path).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[tokio::test]
async fn a_database_from_a_newer_agent_is_refused_not_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let conn = rusqlite::Connection::open(&cfg.path).unwrap();
    conn.execute_batch("PRAGMA user_version = 9999; CREATE TABLE future(x);")
        .unwrap();
    drop(conn);
    let err = Store::open(&cfg, StoreOptions::default()).err().unwrap();
    assert!(err.to_string().contains("newer than this agent"), "{err}");
    let conn = rusqlite::Connection::open(&cfg.path).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, 9999, "the file was left alone");
}

#[tokio::test]
async fn a_failing_batch_fails_alone_within_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.batch_max_delay = outpost::config::HumanDuration::from_millis(300);
    let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
    store
        .write(|conn| {
            conn.execute_batch(
                "CREATE TRIGGER poison BEFORE INSERT ON readings WHEN NEW.device = 'poison' \
                 BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
            )
        })
        .await
        .unwrap();
    // Both batches are queued before the next commit is allowed, so they share a group.
    let mut bad = reading(1);
    bad.device = "poison".into();
    let (good_batch, good_ack) = Batch::with_ack(vec![reading(2), reading(3)]);
    let (bad_batch, bad_ack) = Batch::with_ack(vec![reading(4), bad]);
    let (later_batch, later_ack) = Batch::with_ack(vec![reading(5)]);
    ingest.sender.send(good_batch).await.unwrap();
    ingest.sender.send(bad_batch).await.unwrap();
    ingest.sender.send(later_batch).await.unwrap();
    assert_eq!(good_ack.await.unwrap().unwrap().inserted, 2);
    assert!(matches!(bad_ack.await.unwrap(), Err(StoreError::Sqlite(_))));
    assert_eq!(later_ack.await.unwrap().unwrap().inserted, 1);
    let stored = uids_in(&cfg.path);
    assert_eq!(
        stored.len(),
        3,
        "nothing of the failed batch, all of the others"
    );
    assert!(!stored.contains(reading(4).uid.0.as_slice()));
    assert_eq!(
        store.stats().commits.load(Ordering::Relaxed),
        2,
        "the write op, then one group"
    );
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
}

#[tokio::test]
async fn close_ends_the_writer_even_while_a_handle_is_held() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
    send(&ingest.sender, vec![reading(1)]).await.unwrap();
    let stray = store.clone();
    drop(ingest.sender);
    ingest.close.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(5), ingest.finished)
        .await
        .expect("the writer closes although a handle is alive")
        .unwrap();
    assert_eq!(stray.write(|_| Ok(())).await, Err(StoreError::Closed));
    assert_eq!(count(&cfg.path), 1);
}

/// A source with a commit delay (`storage.ttn_commit_delay`) lets its batches wait in
/// the writer; a write operation commits without them (issue 15), while a reading the
/// urgency test marks and closing the store each commit them at once, and only then
/// are they acknowledged (G1).
#[tokio::test]
async fn a_delayed_source_is_committed_with_the_next_urgent_reading_or_close() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
    store.set_commit_delay("test", Some(Duration::from_secs(3600)));
    let _urgency = store.set_urgency(Box::new(|r: &Reading| r.value >= 100.0));

    // Held: not committed, not acknowledged, not even by a write operation's commit.
    let (batch, mut ack) = Batch::with_ack(vec![reading(1)]);
    ingest.sender.send(batch).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        ack.try_recv().is_err(),
        "not acknowledged before its commit"
    );
    assert_eq!(count(&cfg.path), 0);
    let commits = store.stats().commits.load(Ordering::Relaxed);
    store.write(|_| Ok(())).await.unwrap();
    assert_eq!(store.stats().commits.load(Ordering::Relaxed), commits + 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(ack.try_recv().is_err(), "left waiting by the operation");
    assert_eq!(count(&cfg.path), 0);

    // Held batches go, in order, with the next reading that may change an alert.
    let (batch, held) = Batch::with_ack(vec![reading(2)]);
    ingest.sender.send(batch).await.unwrap();
    let urgent = tokio::time::timeout(
        Duration::from_secs(60),
        send(&ingest.sender, vec![reading(100)]),
    )
    .await
    .expect("an urgent reading does not wait for the source's delay");
    assert_eq!(urgent.map(|c| c.inserted), Ok(1));
    assert_eq!(ack.await.unwrap().map(|c| c.inserted), Ok(1));
    assert_eq!(held.await.unwrap().map(|c| c.inserted), Ok(1));
    assert_eq!(values_by_id(&cfg.path), vec![1.0, 2.0, 100.0]);

    // A backfill page of the delayed source keeps the default spacing: the backfill
    // waits for each page's commit.
    let mut recovered = reading(5);
    recovered.flags |= outpost::model::flags::BACKFILLED;
    let stored = tokio::time::timeout(
        Duration::from_secs(60),
        send(&ingest.sender, vec![recovered]),
    )
    .await
    .expect("a backfill page is committed after the spacing");
    assert_eq!(stored.map(|c| c.inserted), Ok(1));

    // Another source keeps the default spacing.
    let mut other = reading(3);
    other.source = "other".into();
    let stored = tokio::time::timeout(Duration::from_secs(60), send(&ingest.sender, vec![other]))
        .await
        .expect("a source without a delay is committed after the spacing");
    assert_eq!(stored.map(|c| c.inserted), Ok(1));

    // Closing commits what is held.
    let (batch, last) = Batch::with_ack(vec![reading(4)]);
    ingest.sender.send(batch).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(ingest.sender);
    ingest.close.cancel();
    let done = tokio::time::timeout(Duration::from_secs(60), last)
        .await
        .expect("closing does not wait for the delay");
    assert_eq!(done.unwrap().map(|c| c.inserted), Ok(1));
    assert_eq!(count(&cfg.path), 6);
}

/// After a burst (a full group) a delayed source's next batch waits only for the
/// spacing, so a burst's tail is not held for the whole delay; once a group is no
/// longer full, the delay applies again.
#[tokio::test]
async fn a_bursts_tail_is_not_held_for_the_delay() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let cfg = StorageConfig {
        batch_max_rows: 10,
        ..config(dir.path())
    };
    let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
    store.set_commit_delay("test", Some(Duration::from_secs(3600)));

    let full = tokio::time::timeout(
        Duration::from_secs(60),
        send(&ingest.sender, (1..=10).map(reading).collect()),
    )
    .await
    .expect("a full group is committed at once");
    assert_eq!(full.map(|c| c.inserted), Ok(10));
    let tail = tokio::time::timeout(
        Duration::from_secs(60),
        send(&ingest.sender, vec![reading(11)]),
    )
    .await
    .expect("the tail of a burst waits only for the spacing");
    assert_eq!(tail.map(|c| c.inserted), Ok(1));

    // The group of the tail was not full: the next batch is held again.
    let (batch, mut held) = Batch::with_ack(vec![reading(12)]);
    ingest.sender.send(batch).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        held.try_recv().is_err(),
        "held for the delay after the burst"
    );
    drop(ingest.sender);
    ingest.close.cancel();
    let done = tokio::time::timeout(Duration::from_secs(60), held)
        .await
        .expect("closing commits it");
    assert_eq!(done.unwrap().map(|c| c.inserted), Ok(1));
    assert_eq!(count(&cfg.path), 12);
    drop(store);
}

fn values_by_id(path: &Path) -> Vec<f64> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare("SELECT value FROM readings ORDER BY id")
        .unwrap();
    let rows = stmt.query_map([], |r| r.get::<_, f64>(0)).unwrap();
    rows.map(Result::unwrap).collect()
}

/// A delayed source's batches wait for their own due time, not for the next write
/// operation (sync marks, cursors and state rows commit without them, issue 15): an
/// operation commits at once, the held batches at their delay, together, in order.
/// `commit_held_now` (a source with no room left) commits them at once.
#[tokio::test]
async fn a_delayed_sources_batches_wait_for_their_due_time_not_for_an_operation() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
    let delay = Duration::from_millis(1500);
    store.set_commit_delay("test", Some(delay));

    let sent = Instant::now();
    let (batch, first) = Batch::with_ack(vec![reading(1)]);
    ingest.sender.send(batch).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let commits = store.stats().commits.load(Ordering::Relaxed);
    // Operations come and go, each committed at once and alone.
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_millis(1000), store.write(|_| Ok(())))
            .await
            .expect("an operation is committed at once")
            .unwrap();
    }
    let (batch, second) = Batch::with_ack(vec![reading(2)]);
    ingest.sender.send(batch).await.unwrap();
    store.write(|_| Ok(())).await.unwrap();
    assert_eq!(store.stats().commits.load(Ordering::Relaxed), commits + 4);
    assert_eq!(
        count(&cfg.path),
        0,
        "the operations left the readings waiting"
    );

    let first = tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .expect("committed by its due time");
    let waited = sent.elapsed();
    assert_eq!(first.unwrap().map(|c| c.inserted), Ok(1));
    assert!(
        waited >= delay - Duration::from_millis(100),
        "committed after {waited:?}, before its delay"
    );
    assert_eq!(second.await.unwrap().map(|c| c.inserted), Ok(1));
    assert_eq!(values_by_id(&cfg.path), vec![1.0, 2.0]);
    assert_eq!(
        store.stats().commits.load(Ordering::Relaxed),
        commits + 5,
        "both readings in one commit"
    );

    // No room left at the source: held batches are committed at once.
    store.set_commit_delay("test", Some(Duration::from_secs(3600)));
    let (batch, third) = Batch::with_ack(vec![reading(3)]);
    ingest.sender.send(batch).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    store.write(|_| Ok(())).await.unwrap();
    store.commit_held_now();
    let third = tokio::time::timeout(Duration::from_secs(30), third)
        .await
        .expect("committed when asked, not after an hour");
    assert_eq!(third.unwrap().map(|c| c.inserted), Ok(1));

    // A source without a delay still rides with an operation's commit.
    let mut eager = reading(4);
    eager.source = "other".into();
    let (batch, fourth) = Batch::with_ack(vec![eager]);
    ingest.sender.send(batch).await.unwrap();
    store.write(|_| Ok(())).await.unwrap();
    assert_eq!(fourth.await.unwrap().map(|c| c.inserted), Ok(1));
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
}

/// An operation that may wait (`Store::write_within`, sync's marks) costs no commit of
/// its own where one is made anyway: it rides with a delayed source's batches, stays
/// with them when an operation that cannot wait commits alone, and without anything
/// else commits alone at its own due time (issue 15: SD-card wear).
#[tokio::test]
async fn an_operation_that_may_wait_rides_with_the_held_readings() {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
    let delay = Duration::from_millis(1500);
    store.set_commit_delay("test", Some(delay));
    let marks = |value: f64| {
        move |c: &rusqlite::Connection| {
            c.execute(
                "INSERT INTO counters(name, value) VALUES ('lazy', ?1) \
                 ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                [value],
            )
        }
    };

    let (batch, held) = Batch::with_ack(vec![reading(1)]);
    ingest.sender.send(batch).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let commits = store.stats().commits.load(Ordering::Relaxed);
    let lazy = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write_within(Duration::from_secs(60), marks(1.0))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // An operation that cannot wait (a health probe) commits alone: the held batch
    // and the operation that may wait stay.
    store.write(|_| Ok(())).await.unwrap();
    assert_eq!(store.stats().commits.load(Ordering::Relaxed), commits + 1);
    assert!(!lazy.is_finished(), "left waiting by the probe's commit");
    assert_eq!(count(&cfg.path), 0);
    // The held batch's due time commits both, in one commit.
    assert_eq!(held.await.unwrap().map(|c| c.inserted), Ok(1));
    assert_eq!(lazy.await.unwrap(), Ok(1));
    assert_eq!(store.stats().commits.load(Ordering::Relaxed), commits + 2);

    // Alone, it is committed at its own due time.
    let started = Instant::now();
    let within = Duration::from_millis(300);
    assert_eq!(store.write_within(within, marks(2.0)).await, Ok(1));
    assert!(started.elapsed() >= within - Duration::from_millis(50));
    assert_eq!(store.stats().commits.load(Ordering::Relaxed), commits + 3);
    let value: f64 = rusqlite::Connection::open(&cfg.path)
        .unwrap()
        .query_row("SELECT value FROM counters WHERE name = 'lazy'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(value, 2.0);
    drop((store, ingest.sender));
    ingest.finished.await.unwrap();
}
