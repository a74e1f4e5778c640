//! Reading the store: the stream of committed readings for downstream consumers, and
//! the store's own parts of the `outpost status` summary (series, backlog, counters,
//! free space); the summary itself is assembled by the command line
//! (`crate::cli::status`), which can see every component's state.

use crate::model::{from_micros, Meta, Reading, Uid};
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;
use tokio::sync::watch;

/// A committed reading with its local sequence number.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredReading {
    pub id: i64,
    pub reading: Reading,
    pub synced: bool,
}

pub const SELECT_READING: &str = "SELECT id, uid, source, device, metric, value, unit, \
    observed_at, received_at, flags, meta, synced FROM readings";

pub fn reading_from_row(row: &Row<'_>) -> rusqlite::Result<StoredReading> {
    let uid: Vec<u8> = row.get(1)?;
    let meta: Option<String> = row.get(10)?;
    Ok(StoredReading {
        id: row.get(0)?,
        reading: Reading {
            uid: Uid::from_slice(&uid).unwrap_or(Uid([0; 16])),
            source: row.get(2)?,
            device: row.get(3)?,
            metric: row.get(4)?,
            value: row.get(5)?,
            unit: row.get(6)?,
            observed_at: from_micros(row.get(7)?),
            received_at: from_micros(row.get(8)?),
            flags: row.get(9)?,
            meta: meta.and_then(Meta::from_text),
        },
        synced: row.get::<_, i64>(11)? != 0,
    })
}

/// Committed readings in commit order, read from the database after each commit
/// announcement. Memory stays bounded however far a consumer falls behind: what it has
/// not read yet waits in SQLite, not in a channel.
pub struct CommittedReadings {
    conn: Option<Connection>,
    watch: watch::Receiver<i64>,
    after: i64,
}

impl CommittedReadings {
    pub(super) fn new(
        conn: Connection,
        watch: watch::Receiver<i64>,
        after: i64,
    ) -> rusqlite::Result<Self> {
        Ok(CommittedReadings {
            conn: Some(conn),
            watch,
            after,
        })
    }

    /// The id of the last reading returned.
    pub fn position(&self) -> i64 {
        self.after
    }

    /// Up to `max` readings committed after the last one returned; waits for a commit
    /// when there are none. `None` once the writer has closed and all were returned.
    pub async fn next_batch(&mut self, max: usize) -> Option<Vec<StoredReading>> {
        loop {
            let newest = *self.watch.borrow_and_update();
            if newest > self.after {
                let rows = self.read(max).await;
                match rows {
                    Ok(rows) if !rows.is_empty() => {
                        self.after = rows.last().map(|r| r.id).unwrap_or(self.after);
                        return Some(rows);
                    }
                    Ok(_) => {
                        // Rows were pruned in between; skip ahead.
                        self.after = newest;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "Reading committed readings failed; retrying.");
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
                continue;
            }
            if self.watch.changed().await.is_err() {
                // The writer closed: deliver what is left, then end.
                let rows = self.read(max).await.unwrap_or_default();
                if rows.is_empty() {
                    return None;
                }
                self.after = rows.last().map(|r| r.id).unwrap_or(self.after);
                return Some(rows);
            }
        }
    }

    async fn read(&mut self, max: usize) -> rusqlite::Result<Vec<StoredReading>> {
        let Some(conn) = self.conn.take() else {
            return Ok(Vec::new());
        };
        let after = self.after;
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = read_after(&conn, after, max);
            (conn, result)
        })
        .await
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        self.conn = Some(conn);
        result
    }
}

pub(crate) fn read_after(
    conn: &Connection,
    after: i64,
    max: usize,
) -> rusqlite::Result<Vec<StoredReading>> {
    let mut stmt = conn.prepare_cached(&format!(
        "{SELECT_READING} WHERE id > ?1 ORDER BY id LIMIT ?2"
    ))?;
    let rows = stmt.query_map(params![after, max as i64], reading_from_row)?;
    rows.collect()
}

/// The last reading of one series (source, device, metric).
#[derive(Debug, Clone, Serialize)]
pub struct SeriesSummary {
    pub source: String,
    pub device: String,
    pub metric: String,
    pub value: f64,
    pub unit: Option<String>,
    pub observed_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
    pub count: i64,
}

/// Readings not yet in central.
#[derive(Debug, Clone, Serialize, Default)]
pub struct BacklogSummary {
    pub rows: i64,
    pub oldest_received_at: Option<DateTime<Utc>>,
}

/// Less free space than this on the database's filesystem counts as full (a commit
/// needs room for its WAL frames; a checkpoint for the pages it copies).
pub const DISK_FULL_BELOW: u64 = 1 << 20;

/// Free bytes for unprivileged users on the filesystem holding `path` (`statvfs`).
pub fn disk_free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty())?;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `stat` is plain data the call fills; `c_path` is a valid C string.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// How many readings the store holds, and how many of them central does not have yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ReadingCounts {
    pub stored: i64,
    pub unsynced: i64,
}

/// The reading counts from the `readings_count` row (schema migration 10: moved forward
/// by the writer, adjusted by triggers on deletes and syncs) plus the few readings above
/// its `through` (fewer than [`COUNTS_STEP`] after each commit, a range of the primary
/// key): microseconds whatever the store's size, where `COUNT(*)` read the
/// whole table (2–3 s cold at 5M rows). A database of an older schema (`--db` on a
/// store the agent has not upgraded yet) is counted the old way.
pub fn reading_counts(conn: &Connection) -> rusqlite::Result<ReadingCounts> {
    let kept = conn
        .prepare_cached(
            "SELECT c.stored + (SELECT COUNT(*) FROM readings WHERE id > c.through), \
                    c.unsynced + (SELECT COUNT(*) FROM readings WHERE id > c.through AND synced = 0) \
             FROM readings_count AS c WHERE c.one = 1",
        )
        .and_then(|mut stmt| {
            stmt.query_row([], |r| {
                Ok(ReadingCounts {
                    stored: r.get(0)?,
                    unsynced: r.get(1)?,
                })
            })
            .optional()
        });
    match kept {
        Ok(Some(counts)) => Ok(counts),
        Ok(None) => counted_readings(conn),
        Err(e) if e.to_string().contains("no such table") => counted_readings(conn),
        Err(e) => Err(e),
    }
}

/// How many readings above `through` make the store writer move it forward
/// ([`advance_counts`]).
pub const COUNTS_STEP: i64 = 1024;

/// Moves the kept counts' `through` to the newest reading once [`COUNTS_STEP`] or more
/// readings are above it, counting them (a range of the primary key). The store writer
/// calls it in each commit, so fewer than `COUNTS_STEP` readings are above `through`
/// after every commit and [`reading_counts`] stays cheap. Nothing to do (and no error)
/// on a database without the kept counts.
pub fn advance_counts(conn: &Connection) -> rusqlite::Result<()> {
    let result = conn
        .prepare_cached(
            "UPDATE readings_count SET \
                 stored = stored + (SELECT COUNT(*) FROM readings WHERE id > readings_count.through), \
                 unsynced = unsynced + (SELECT COUNT(*) FROM readings \
                                        WHERE id > readings_count.through AND synced = 0), \
                 through = (SELECT MAX(id) FROM readings) \
             WHERE one = 1 AND (SELECT MAX(id) FROM readings) >= through + ?1",
        )
        .and_then(|mut stmt| stmt.execute([COUNTS_STEP]));
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("no such table") => Ok(()),
        Err(e) => Err(e),
    }
}

/// The reading counts by counting rows: what [`reading_counts`] replaces, kept for
/// databases without the kept counts and as the benchmarks' baseline.
pub fn counted_readings(conn: &Connection) -> rusqlite::Result<ReadingCounts> {
    Ok(ReadingCounts {
        stored: conn.query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))?,
        unsynced: conn.query_row("SELECT COUNT(*) FROM readings WHERE synced = 0", [], |r| {
            r.get(0)
        })?,
    })
}

/// The unsynced backlog: its size and the arrival time of its oldest reading.
pub fn backlog(conn: &Connection) -> rusqlite::Result<BacklogSummary> {
    backlog_from(conn, reading_counts(conn)?)
}

/// The backlog with its size taken from `counts` (read once by `outpost status`).
pub fn backlog_from(conn: &Connection, counts: ReadingCounts) -> rusqlite::Result<BacklogSummary> {
    // Ids follow arrival, so the lowest unsynced id is the oldest (and uses the index).
    let oldest: Option<i64> = conn
        .query_row(
            "SELECT received_at FROM readings WHERE synced = 0 ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(BacklogSummary {
        rows: counts.unsynced,
        oldest_received_at: oldest.map(from_micros),
    })
}

/// The last reading of every series, ordered by source, device and metric (from the
/// per-series summary the writer keeps, never a scan of the readings).
pub fn series(conn: &Connection) -> rusqlite::Result<Vec<SeriesSummary>> {
    let mut stmt = conn.prepare(
        "SELECT source, device, metric, value, unit, observed_at, received_at, count \
         FROM series ORDER BY source, device, metric",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(SeriesSummary {
            source: r.get(0)?,
            device: r.get(1)?,
            metric: r.get(2)?,
            value: r.get(3)?,
            unit: r.get(4)?,
            observed_at: from_micros(r.get(5)?),
            received_at: from_micros(r.get(6)?),
            count: r.get(7)?,
        })
    })?;
    rows.collect()
}

/// The durable counter `name` (0 when never counted), e.g. `pruned_unsynced`.
pub fn counter(conn: &Connection, name: &str) -> rusqlite::Result<i64> {
    Ok(conn
        .query_row("SELECT value FROM counters WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?
        .unwrap_or(0))
}

/// Free bytes on the filesystem of the database `conn` reads (`None` for an
/// in-memory database or when the filesystem cannot tell).
pub fn database_disk_free(conn: &Connection) -> Option<u64> {
    conn.path()
        .filter(|p| !p.is_empty())
        .and_then(|p| disk_free_bytes(std::path::Path::new(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema::migrate(&mut conn).unwrap();
        conn
    }

    fn insert(conn: &Connection, from: i64, n: i64) {
        let mut stmt = conn
            .prepare(
                "INSERT INTO readings(uid, source, device, metric, value, observed_at, received_at) \
                 VALUES (?1, 's', 'd', 'm', 1, ?2, ?2)",
            )
            .unwrap();
        for i in from..from + n {
            stmt.execute(params![Uid::derive(&[&i.to_string()]).0.to_vec(), i])
                .unwrap();
            // As the writer does once per commit; here after each insert, so that
            // `through` moves at every possible point.
            advance_counts(conn).unwrap();
        }
    }

    fn check(conn: &Connection, what: &str) {
        assert_eq!(
            reading_counts(conn).unwrap(),
            counted_readings(conn).unwrap(),
            "{what}"
        );
    }

    #[test]
    fn kept_counts_follow_inserts_syncs_and_deletes() {
        let conn = db();
        check(&conn, "empty");
        insert(&conn, 0, 3000);
        check(&conn, "3,000 inserted");
        // Synced below and above `through`, newest first and in the middle.
        conn.execute("UPDATE readings SET synced = 1 WHERE id > 2900", [])
            .unwrap();
        conn.execute(
            "UPDATE readings SET synced = 1 WHERE id BETWEEN 100 AND 1500",
            [],
        )
        .unwrap();
        check(&conn, "some synced");
        // Setting it again changes nothing; a reading made unsynced again counts.
        conn.execute(
            "UPDATE readings SET synced = 1 WHERE id BETWEEN 100 AND 200",
            [],
        )
        .unwrap();
        conn.execute("UPDATE readings SET synced = 0 WHERE id = 150", [])
            .unwrap();
        check(&conn, "resynced");
        conn.execute("DELETE FROM readings WHERE id <= 1200", [])
            .unwrap();
        conn.execute("DELETE FROM readings WHERE id > 2990", [])
            .unwrap();
        check(&conn, "pruned at both ends");
        insert(&conn, 10_000, 2100);
        check(&conn, "more inserted");
        // Emptied: ids start again at 1, below the old `through`.
        conn.execute("DELETE FROM readings", []).unwrap();
        check(&conn, "emptied");
        insert(&conn, 20_000, 1500);
        conn.execute("UPDATE readings SET synced = 1 WHERE id % 3 = 0", [])
            .unwrap();
        check(&conn, "refilled");
        insert(&conn, 30_000, 700);
        conn.execute("DELETE FROM readings WHERE id % 5 = 0", [])
            .unwrap();
        check(&conn, "refilled and pruned");
        assert_eq!(
            backlog(&conn).unwrap().rows,
            counted_readings(&conn).unwrap().unsynced
        );
    }

    #[test]
    fn readings_above_through_are_counted_until_the_writer_moves_it() {
        let conn = db();
        // Inserted without the writer: nothing moves `through`, the reader counts them.
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000) \
             INSERT INTO readings(uid, source, device, metric, value, observed_at, received_at) \
             SELECT randomblob(16), 's', 'd', 'm', 1, i, i FROM n",
        )
        .unwrap();
        let through = |c: &Connection| -> i64 {
            c.query_row("SELECT through FROM readings_count", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(through(&conn), 0);
        check(&conn, "all above through");
        advance_counts(&conn).unwrap();
        assert_eq!(through(&conn), 3000);
        check(&conn, "moved");
        // Fewer than COUNTS_STEP above: left where it is.
        insert(&conn, 10_000, 0);
        conn.execute_batch(
            "INSERT INTO readings(uid, source, device, metric, value, observed_at, received_at) \
             VALUES (randomblob(16), 's', 'd', 'm', 1, 1, 1)",
        )
        .unwrap();
        advance_counts(&conn).unwrap();
        assert_eq!(through(&conn), 3000);
        check(&conn, "one above");
    }

    #[test]
    fn the_migration_counts_an_existing_store() {
        let mut conn = Connection::open_in_memory().unwrap();
        let before = crate::store::schema::COUNTS_VERSION - 1;
        crate::store::schema::migrate_to(&mut conn, before).unwrap();
        insert(&conn, 0, 2500);
        conn.execute("UPDATE readings SET synced = 1 WHERE id <= 700", [])
            .unwrap();
        crate::store::schema::migrate(&mut conn).unwrap();
        check(&conn, "after the upgrade");
        insert(&conn, 5000, 1000);
        conn.execute("DELETE FROM readings WHERE id <= 800", [])
            .unwrap();
        check(&conn, "after the upgrade, more inserted and pruned");
    }

    #[test]
    fn an_older_schema_is_counted_by_rows() {
        let mut conn = Connection::open_in_memory().unwrap();
        let before = crate::store::schema::COUNTS_VERSION - 1;
        crate::store::schema::migrate_to(&mut conn, before).unwrap();
        insert(&conn, 0, 10);
        assert_eq!(
            reading_counts(&conn).unwrap(),
            ReadingCounts {
                stored: 10,
                unsynced: 10
            }
        );
    }
}
