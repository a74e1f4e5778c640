//! Retention and the size cap (G4), tested on a connection with an explicit clock.

use super::writer::{prune, used_bytes, RetentionScan};
use super::*;
use crate::model::to_micros;
use chrono::{Duration as Age, Utc};

fn setup(max_size: u64) -> (tempfile::TempDir, Connection, StorageConfig) {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        path: dir.path().join("t.db"),
        retention: HumanDuration::from_secs(86400),
        max_size: ByteSize(max_size),
        ..StorageConfig::default()
    };
    let conn = open_writer_connection(&config, &StoreOptions::default()).unwrap();
    (dir, conn, config)
}

fn insert(conn: &Connection, n: usize, age: Age, synced: bool) {
    let tx = conn.unchecked_transaction().unwrap();
    let t = to_micros(Utc::now() - age);
    let base: i64 = tx
        .query_row("SELECT COALESCE(MAX(id), 0) FROM readings", [], |r| {
            r.get(0)
        })
        .unwrap();
    for i in 0..n {
        let id = base + i as i64 + 1;
        tx.execute(
            "INSERT INTO readings(id, uid, source, device, metric, value, observed_at, received_at, synced, meta) \
             VALUES (?1, ?2, 's', 'd', 'm', 1.0, ?3, ?3, ?4, ?5)",
            rusqlite::params![id, id.to_le_bytes().to_vec(), t, synced as i64, "x".repeat(200)],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

fn counts(conn: &Connection) -> (i64, i64) {
    conn.query_row(
        "SELECT COALESCE(SUM(synced = 1), 0), COALESCE(SUM(synced = 0), 0) FROM readings",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

#[test]
fn retention_prunes_only_old_synced_readings() {
    let (_d, conn, config) = setup(1 << 30);
    insert(&conn, 100, Age::days(3), true); // old, synced: pruned
    insert(&conn, 100, Age::days(3), false); // old, unsynced: kept
    insert(&conn, 100, Age::hours(1), true); // recent, synced: kept
    conn.execute_batch(
        "INSERT INTO alert_events (uid, kind, rule, severity, device, metric, occurred_at, message) \
         VALUES (x'00', 'firing', 'r', 'warning', 'd', 'm', 0, '{}');",
    )
    .unwrap();
    let stats = StoreStats::default();
    prune(
        &conn,
        &config,
        Utc::now(),
        &stats,
        &mut RetentionScan::default(),
    )
    .unwrap();
    assert_eq!(counts(&conn), (100, 100));
    assert_eq!(
        stats
            .pruned_unsynced
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let events: i64 = conn
        .query_row("SELECT COUNT(*) FROM alert_events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(events, 1);
}

#[test]
fn the_size_cap_prunes_synced_first_then_oldest_unsynced_and_counts_them() {
    let (_d, conn, mut config) = setup(1 << 30);
    insert(&conn, 3000, Age::hours(2), false);
    insert(&conn, 3000, Age::hours(1), true);
    insert(&conn, 3000, Age::minutes(1), false);
    let full = used_bytes(&conn).unwrap();

    // A cap that synced rows alone can satisfy: no unsynced row goes.
    config.max_size = ByteSize(full * 3 / 4);
    let stats = StoreStats::default();
    prune(
        &conn,
        &config,
        Utc::now(),
        &stats,
        &mut RetentionScan::default(),
    )
    .unwrap();
    let (synced, unsynced) = counts(&conn);
    assert_eq!(unsynced, 6000);
    assert!(synced < 3000);
    assert!(used_bytes(&conn).unwrap() <= config.max_size.0);

    // A smaller cap: every synced row goes, then the OLDEST unsynced ones.
    config.max_size = ByteSize(full / 3);
    prune(
        &conn,
        &config,
        Utc::now(),
        &stats,
        &mut RetentionScan::default(),
    )
    .unwrap();
    let (synced, unsynced) = counts(&conn);
    assert_eq!(synced, 0);
    assert!(unsynced < 6000);
    let lost = stats
        .pruned_unsynced
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(lost as i64, 6000 - unsynced);
    let min_id: i64 = conn
        .query_row("SELECT MIN(id) FROM readings", [], |r| r.get(0))
        .unwrap();
    assert!(min_id > 3000, "the oldest unsynced readings went first");
    let counted: i64 = conn
        .query_row(
            "SELECT value FROM counters WHERE name = 'pruned_unsynced'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        counted as u64, lost,
        "the loss is recorded durably for `outpost status`"
    );
    assert!(used_bytes(&conn).unwrap() <= config.max_size.0);
}

#[test]
fn retention_finds_old_synced_readings_behind_an_unsynced_backlog() {
    let (_d, conn, config) = setup(1 << 30);
    insert(&conn, 100, Age::days(3), false); // old backlog, not sent yet: kept
    insert(&conn, 100, Age::days(3), true); // old, synced newest first: pruned
    insert(&conn, 100, Age::hours(1), true); // recent, synced: kept
    let stats = StoreStats::default();
    prune(
        &conn,
        &config,
        Utc::now(),
        &stats,
        &mut RetentionScan::default(),
    )
    .unwrap();
    assert_eq!(counts(&conn), (100, 100));
}

#[test]
fn retention_never_deletes_recent_readings_across_a_clock_step() {
    let (_d, conn, config) = setup(1 << 30);
    insert(&conn, 50, Age::days(3), true); // old: pruned
    insert(&conn, 50, Age::hours(1), true); // recent: kept
    insert(&conn, 50, Age::days(3), true); // the clock stepped back: old-looking, later ids
    insert(&conn, 50, Age::hours(1), true); // recent: kept
    let stats = StoreStats::default();
    let mut scan = RetentionScan::default();
    prune(&conn, &config, Utc::now(), &stats, &mut scan).unwrap();
    let (synced, _) = counts(&conn);
    // The first 50 go; the recent ones stay whatever the bisection found.
    assert!((100..=150).contains(&synced), "{synced}");
    let recent: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM readings WHERE received_at >= ?1",
            [to_micros(Utc::now() - Age::days(1))],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(recent, 100);
}

/// Seen in the power-cut test (tests/powercut.rs): LazyFS crashed while the background
/// check read the database, and every page read failed. That is not damage; before the
/// fix the agent wrote the damage marker (the next start moves the database aside).
#[test]
fn quick_check_read_errors_are_not_damage() {
    use super::{check_verdict, CheckVerdict};
    let rows = |s: &str| vec![s.to_string()];
    assert_eq!(check_verdict(&rows("ok")), CheckVerdict::Ok);
    let unreadable = "*** in database main ***\n\
        Tree 12 page 18006: unable to get the page. error code=266\n\
        Tree 3 page 76815 right child: Failed to read ptrmap key=72793\n\
        Tree 3 page 72793: unable to get the page. error code=266";
    assert!(matches!(
        check_verdict(&rows(unreadable)),
        CheckVerdict::Unreadable(s) if s.starts_with("Tree 12 page 18006")
    ));
    let damaged = "*** in database main ***\n\
        Tree 2 page 5 cell 0: invalid page number 4000\n\
        Page 7: btreeInitPage() returns error code 11";
    assert!(matches!(
        check_verdict(&rows(damaged)),
        CheckVerdict::Damaged(_)
    ));
    let short = "*** in database main ***\nTree 2 page 9: unable to get the page. error code=522";
    assert!(matches!(
        check_verdict(&rows(short)),
        CheckVerdict::Damaged(_)
    ));
}
