//! The local side of sync: which rows go next (read on the sync worker's own read
//! connection), the synced marks (written through the store writer after the central
//! commit), and the sync state `outpost status` shows.
//!
//! Rows are read straight into columns, the shape the upload sends (`unnest` of
//! arrays), so a batch costs one allocation per column rather than one per row.

use super::postgres::{RawJson, UuidBytes};
use crate::model::{flags, from_micros, Uid};
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};

/// The `source_state.source` under which sync keeps its state. Source names cannot
/// contain `@`, so it never collides with a configured source.
pub const STATE_SOURCE: &str = "@sync";

/// One local write that sync owes after a central commit (a synced mark, the sync
/// state).
type OwedWrite = Box<dyn FnOnce(&Connection) -> rusqlite::Result<()> + Send + Sync>;

/// The local writes a sync round owes, applied together in one store write (one commit)
/// instead of one each: at a site's rate a round's marks of readings, events, audit
/// rows, links and signatures, the signature of the head and the round's success were
/// six commits every interval, most of the SD-card wear left at 1× (issue 15,
/// docs/reliability.md). A write is owed only after the central commit it records, so
/// applying it late (or never, after a crash) only means rows are sent again and
/// deduplicated centrally (G2).
#[derive(Default)]
pub struct Owed(Vec<OwedWrite>);

impl Owed {
    /// Owes `write`; its count of changed rows is not needed.
    pub fn push<T: 'static>(
        &mut self,
        write: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + Sync + 'static,
    ) {
        self.0.push(Box::new(move |c| write(c).map(|_| ())));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Applies everything owed now, in one store write that commits at once.
    pub async fn apply(&mut self, store: &crate::store::Store) -> Result<(), super::SyncError> {
        if self.is_empty() {
            return Ok(());
        }
        store
            .write(self.take())
            .await
            .map_err(|e| super::SyncError::Local(e.to_string()))
    }

    /// Everything owed, as one write for [`crate::store::Store::write`]. Each owed
    /// write runs in its own savepoint: one that fails (a mark only: the rows are sent
    /// again) is rolled back alone and the others stand.
    pub fn take(&mut self) -> impl FnOnce(&Connection) -> rusqlite::Result<()> + Send + 'static {
        let writes = std::mem::take(&mut self.0);
        move |c| {
            for write in writes {
                c.execute_batch("SAVEPOINT owed")?;
                match write(c) {
                    Ok(()) => c.execute_batch("RELEASE owed")?,
                    Err(e) => {
                        c.execute_batch("ROLLBACK TO owed; RELEASE owed")?;
                        if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull) {
                            // The store's full handling applies to the whole write.
                            return Err(e);
                        }
                        tracing::warn!(error = %e, "A local write of sync failed; it is redone next round, or the rows it marks are sent again.");
                    }
                }
            }
            Ok(())
        }
    }
}

impl std::fmt::Debug for Owed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Owed({} writes)", self.0.len())
    }
}

/// Which unsynced readings to read next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Live first: ids in `(above, up_to]`, newest first.
    NewestFirst { above: i64, up_to: i64 },
    /// Backlog: ids in `(after, up_to]`, oldest first.
    OldestFirst { after: i64, up_to: i64 },
}

/// A batch of readings as columns, with their local ids.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReadingColumns {
    pub ids: Vec<i64>,
    pub uid: Vec<UuidBytes>,
    pub observed_at: Vec<DateTime<Utc>>,
    pub received_at: Vec<DateTime<Utc>>,
    pub source: Vec<String>,
    pub device: Vec<String>,
    pub metric: Vec<String>,
    pub value: Vec<f64>,
    pub unit: Vec<Option<String>>,
    pub flags: Vec<i32>,
    pub meta: Vec<Option<RawJson>>,
}

impl ReadingColumns {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    fn with_capacity(n: usize) -> Self {
        ReadingColumns {
            ids: Vec::with_capacity(n),
            uid: Vec::with_capacity(n),
            observed_at: Vec::with_capacity(n),
            received_at: Vec::with_capacity(n),
            source: Vec::with_capacity(n),
            device: Vec::with_capacity(n),
            metric: Vec::with_capacity(n),
            value: Vec::with_capacity(n),
            unit: Vec::with_capacity(n),
            flags: Vec::with_capacity(n),
            meta: Vec::with_capacity(n),
        }
    }
}

/// The eligibility rule of G8, in SQL: a reading taken while the clock was not
/// synchronised waits until it is corrected (CLOCK_CORRECTED) or until its id is at most
/// `?release` — the newest id that has been in the store for `clock_hold_max` of
/// monotonic time (see [`super::HoldBack`]). Everything else goes at once.
fn eligible() -> String {
    format!(
        "synced = 0 AND ((flags & {unsynced}) = 0 OR (flags & {corrected}) != 0 OR id <= ?1)",
        unsynced = flags::CLOCK_UNSYNCED,
        corrected = flags::CLOCK_CORRECTED
    )
}

/// Reads up to `max` unsynced, eligible readings in `window`.
pub fn select_readings(
    conn: &Connection,
    window: Window,
    release_up_to: i64,
    max: usize,
) -> rusqlite::Result<ReadingColumns> {
    let columns =
        "id, uid, source, device, metric, value, unit, observed_at, received_at, flags, meta";
    let eligible = eligible();
    match window {
        Window::NewestFirst { above, up_to } => {
            let sql = format!(
                "SELECT {columns} FROM readings WHERE {eligible} AND id > ?2 AND id <= ?3 \
                 ORDER BY id DESC LIMIT ?4"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query(params![release_up_to, above, up_to, max as i64])?;
            read_columns(rows, max)
        }
        Window::OldestFirst { after, up_to } => {
            let sql = format!(
                "SELECT {columns} FROM readings WHERE {eligible} AND id > ?2 AND id <= ?3 \
                 ORDER BY id LIMIT ?4"
            );
            let mut stmt = conn.prepare_cached(&sql)?;
            let rows = stmt.query(params![release_up_to, after, up_to, max as i64])?;
            read_columns(rows, max)
        }
    }
}

fn read_columns(mut rows: rusqlite::Rows<'_>, max: usize) -> rusqlite::Result<ReadingColumns> {
    let mut out = ReadingColumns::with_capacity(max.min(100_000));
    while let Some(row) = rows.next()? {
        let uid: Vec<u8> = row.get(1)?;
        out.ids.push(row.get(0)?);
        out.uid.push(UuidBytes(uid_bytes(&uid)));
        out.source.push(clean_text(row.get(2)?));
        out.device.push(clean_text(row.get(3)?));
        out.metric.push(clean_text(row.get(4)?));
        out.value.push(row.get(5)?);
        out.unit
            .push(row.get::<_, Option<String>>(6)?.map(clean_text));
        out.observed_at.push(central_time(row.get(7)?));
        out.received_at.push(central_time(row.get(8)?));
        out.flags.push(row.get::<_, i64>(9)? as i32);
        out.meta
            .push(row.get::<_, Option<String>>(10)?.map(clean_json));
    }
    Ok(out)
}

/// A uid as 16 bytes. The store only writes 16-byte uids; anything else (a damaged row)
/// is hashed to 16 bytes, deterministically, so retries still dedupe.
fn uid_bytes(raw: &[u8]) -> [u8; 16] {
    match Uid::from_slice(raw) {
        Some(uid) => uid.0,
        None => Uid::derive(&["damaged-uid", &hex::encode(raw)]).0,
    }
}

/// PostgreSQL text cannot hold NUL characters; a hostile payload must not poison the
/// sync (G5). The replacement is deterministic, so retries still dedupe.
fn clean_text(s: String) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{fffd}")
    } else {
        s
    }
}

/// `jsonb` rejects invalid JSON and `\u0000`; such meta is sent as a JSON string.
fn clean_json(s: String) -> RawJson {
    let valid = serde_json::from_str::<serde::de::IgnoredAny>(&s).is_ok();
    if valid && !s.contains("\\u0000") {
        return RawJson(s);
    }
    let text = s.replace('\0', "\u{fffd}").replace("\\u0000", "\\ufffd");
    RawJson(serde_json::Value::String(text).to_string())
}

/// Microseconds to a timestamp PostgreSQL accepts: years 1 to 9999 (a damaged value is
/// clamped, deterministically, rather than failing the batch forever).
fn central_time(micros: i64) -> DateTime<Utc> {
    const MIN: i64 = -62_135_596_800_000_000; // 0001-01-01T00:00:00Z
    const MAX: i64 = 253_402_300_799_999_999; // 9999-12-31T23:59:59.999999Z
    from_micros(micros.clamp(MIN, MAX))
}

/// The newest reading id.
pub fn head(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT COALESCE(MAX(id), 0) FROM readings", [], |r| {
        r.get(0)
    })
}

/// Marks readings synced. Runs on the store writer, after the central commit. A batch's
/// ids are mostly consecutive (a backlog read in id order), so they are marked as runs
/// of consecutive ids, one statement per run rather than one per row.
pub fn mark_readings_synced(conn: &Connection, ids: &[i64]) -> rusqlite::Result<usize> {
    let mut stmt = conn.prepare_cached(
        "UPDATE readings SET synced = 1 WHERE id BETWEEN ?1 AND ?2 AND synced = 0",
    )?;
    let mut n = 0;
    for (first, last) in runs(ids) {
        n += stmt.execute([first, last])?;
    }
    Ok(n)
}

/// `ids` (in any order, duplicates allowed) as runs of consecutive ids, each
/// `(first, last)` inclusive; every id of a run is in `ids`.
fn runs(ids: &[i64]) -> Vec<(i64, i64)> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for id in sorted {
        match runs.last_mut() {
            Some((_, last)) if id.checked_sub(1) == Some(*last) => *last = id,
            _ => runs.push((id, id)),
        }
    }
    runs
}

/// Alert events as columns. The local `alert_events` table belongs to the alerts
/// engine; sync reads `id, uid, rule, device, metric, kind, severity, value, threshold,
/// occurred_at (µs), message (JSON), synced`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AlertEventColumns {
    pub ids: Vec<i64>,
    pub uid: Vec<UuidBytes>,
    pub rule: Vec<String>,
    pub device: Vec<Option<String>>,
    pub metric: Vec<Option<String>>,
    pub kind: Vec<String>,
    pub severity: Vec<Option<String>>,
    pub value: Vec<Option<f64>>,
    pub threshold: Vec<Option<f64>>,
    pub occurred_at: Vec<DateTime<Utc>>,
    pub message: Vec<Option<RawJson>>,
    /// Acknowledged events: who, the note and the channel.
    pub actor: Vec<Option<String>>,
    pub note: Vec<Option<String>>,
    pub channel: Vec<Option<String>>,
    /// What the hash chain covers besides (issue 17): the unit, when the condition
    /// began, and the message exactly as stored (`message` above goes to a `jsonb`).
    pub unit: Vec<Option<String>>,
    pub since: Vec<Option<DateTime<Utc>>>,
    pub message_text: Vec<Option<String>>,
}

impl AlertEventColumns {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Whether the local database has an `alert_events` table (the alerts engine creates it).
pub fn has_alert_events(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alert_events')",
        [],
        |r| r.get(0),
    )
}

/// Up to `max` unsynced alert events, oldest first.
pub fn select_alert_events(conn: &Connection, max: usize) -> rusqlite::Result<AlertEventColumns> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, uid, rule, device, metric, kind, severity, value, threshold, occurred_at, message, \
         actor, note, channel, unit, since FROM alert_events WHERE synced = 0 ORDER BY id LIMIT ?1",
    )?;
    let mut rows = stmt.query([max as i64])?;
    let mut out = AlertEventColumns::default();
    while let Some(row) = rows.next()? {
        let uid: Vec<u8> = row.get(1)?;
        out.ids.push(row.get(0)?);
        out.uid.push(UuidBytes(uid_bytes(&uid)));
        out.rule.push(clean_text(row.get(2)?));
        out.device
            .push(row.get::<_, Option<String>>(3)?.map(clean_text));
        out.metric
            .push(row.get::<_, Option<String>>(4)?.map(clean_text));
        out.kind.push(clean_text(row.get(5)?));
        out.severity
            .push(row.get::<_, Option<String>>(6)?.map(clean_text));
        out.value.push(row.get(7)?);
        out.threshold.push(row.get(8)?);
        out.occurred_at.push(central_time(row.get(9)?));
        let message = row.get::<_, Option<String>>(10)?;
        out.message_text.push(message.clone().map(clean_text));
        out.message.push(message.map(clean_json));
        out.actor
            .push(row.get::<_, Option<String>>(11)?.map(clean_text));
        out.note
            .push(row.get::<_, Option<String>>(12)?.map(clean_text));
        out.channel
            .push(row.get::<_, Option<String>>(13)?.map(clean_text));
        out.unit
            .push(row.get::<_, Option<String>>(14)?.map(clean_text));
        out.since
            .push(row.get::<_, Option<i64>>(15)?.map(central_time));
    }
    Ok(out)
}

/// Marks alert events synced. Runs on the store writer, after the central commit.
pub fn mark_alert_events_synced(conn: &Connection, ids: &[i64]) -> rusqlite::Result<usize> {
    let mut stmt = conn.prepare_cached("UPDATE alert_events SET synced = 1 WHERE id = ?1")?;
    let mut n = 0;
    for id in ids {
        n += stmt.execute([id])?;
    }
    Ok(n)
}

/// Daily summaries as columns (the local `daily_summaries` table, migration 6).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SummaryColumns {
    /// `(day, device, metric, computed_at µs)`: what [`mark_summaries_synced`] matches.
    pub keys: Vec<(String, String, String, i64)>,
    pub day: Vec<String>,
    pub device: Vec<String>,
    pub metric: Vec<String>,
    pub timezone: Vec<String>,
    pub day_start: Vec<DateTime<Utc>>,
    pub day_end: Vec<DateTime<Utc>>,
    pub readings: Vec<i64>,
    pub min: Vec<Option<f64>>,
    pub max: Vec<Option<f64>>,
    pub mean: Vec<Option<f64>>,
    pub gaps: Vec<i32>,
    pub gap_seconds: Vec<i64>,
    pub out_of_range_seconds: Vec<i64>,
    pub excursions: Vec<i64>,
    pub alarms: Vec<i32>,
    pub detail: Vec<RawJson>,
    pub computed_at: Vec<DateTime<Utc>>,
}

impl SummaryColumns {
    pub fn len(&self) -> usize {
        self.keys.len()
    }
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Up to `max` unsynced complete daily summaries, oldest day first.
pub fn select_summaries(conn: &Connection, max: usize) -> rusqlite::Result<SummaryColumns> {
    let mut stmt = conn.prepare_cached(
        "SELECT day, device, metric, timezone, day_start, day_end, readings, min, max, mean, \
                gaps, gap_seconds, out_of_range_seconds, excursions, alarms, detail, computed_at \
         FROM daily_summaries WHERE synced = 0 AND complete = 1 ORDER BY day, device, metric LIMIT ?1",
    )?;
    let mut rows = stmt.query([max as i64])?;
    let mut out = SummaryColumns::default();
    while let Some(row) = rows.next()? {
        let (day, device, metric): (String, String, String) =
            (row.get(0)?, row.get(1)?, row.get(2)?);
        let computed_at: i64 = row.get(16)?;
        out.keys
            .push((day.clone(), device.clone(), metric.clone(), computed_at));
        out.day.push(day);
        out.device.push(clean_text(device));
        out.metric.push(clean_text(metric));
        out.timezone.push(clean_text(row.get(3)?));
        out.day_start.push(central_time(row.get(4)?));
        out.day_end.push(central_time(row.get(5)?));
        out.readings.push(row.get(6)?);
        out.min.push(row.get(7)?);
        out.max.push(row.get(8)?);
        out.mean.push(row.get(9)?);
        out.gaps
            .push(row.get::<_, i64>(10)?.clamp(0, i32::MAX as i64) as i32);
        out.gap_seconds.push(row.get(11)?);
        out.out_of_range_seconds.push(row.get(12)?);
        out.excursions.push(row.get(13)?);
        out.alarms
            .push(row.get::<_, i64>(14)?.clamp(0, i32::MAX as i64) as i32);
        out.detail.push(clean_json(row.get(15)?));
        out.computed_at.push(central_time(computed_at));
    }
    Ok(out)
}

/// Marks summaries synced, unless recomputed since they were read. Runs on the store
/// writer, after the central commit.
pub fn mark_summaries_synced(
    conn: &Connection,
    keys: &[(String, String, String, i64)],
) -> rusqlite::Result<usize> {
    let mut stmt = conn.prepare_cached(
        "UPDATE daily_summaries SET synced = 1 \
         WHERE day = ?1 AND device = ?2 AND metric = ?3 AND computed_at = ?4",
    )?;
    let mut n = 0;
    for (day, device, metric, at) in keys {
        n += stmt.execute(rusqlite::params![day, device, metric, at])?;
    }
    Ok(n)
}

/// What `outpost status` shows about sync, kept in `source_state` under `@sync`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SyncState {
    pub last_sync_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    /// The last round failed (its error is newer than the last completed round).
    pub failing: bool,
}

fn put(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO source_state(source, key, value) VALUES (?1, ?2, ?3) \
         ON CONFLICT(source, key) DO UPDATE SET value = excluded.value",
        params![STATE_SOURCE, key, value],
    )
    .map(|_| ())
}

/// Records a completed sync round. The last error stays, with its time, for diagnosis.
pub fn record_success(conn: &Connection, at: DateTime<Utc>) -> rusqlite::Result<()> {
    put(conn, "last_sync_at", &at.timestamp_micros().to_string())
}

/// Records a failed sync round.
pub fn record_error(conn: &Connection, at: DateTime<Utc>, error: &str) -> rusqlite::Result<()> {
    let error: String = error.chars().take(1000).collect();
    put(conn, "last_error", &error)?;
    put(conn, "last_error_at", &at.timestamp_micros().to_string())
}

/// Records that central refused this gateway's public key (`message`), or that it no
/// longer does (`None`). While refused, the sync state reads as failing with `message`,
/// so `outpost status` and `/health` report it.
pub fn record_key_refused(
    conn: &Connection,
    refused: Option<(&str, DateTime<Utc>)>,
) -> rusqlite::Result<usize> {
    let (message, at) = match refused {
        Some((m, at)) => (
            m.chars().take(1000).collect(),
            at.timestamp_micros().to_string(),
        ),
        None => (String::new(), String::new()),
    };
    put(conn, "key_refused", &message)?;
    put(conn, "key_refused_at", &at)?;
    Ok(1)
}

/// Reads the sync state (empty if sync never ran).
pub fn read_state(conn: &Connection) -> rusqlite::Result<SyncState> {
    let mut stmt = conn.prepare("SELECT key, value FROM source_state WHERE source = ?1")?;
    let mut rows = stmt.query([STATE_SOURCE])?;
    let mut state = SyncState::default();
    let time = |v: &str| v.parse::<i64>().ok().map(from_micros);
    let mut key_refused = None;
    let mut key_refused_at = None;
    while let Some(row) = rows.next()? {
        let key: String = row.get(0)?;
        let value: String = row.get(1)?;
        match key.as_str() {
            "last_sync_at" => state.last_sync_at = time(&value),
            "last_error" => state.last_error = Some(value),
            "last_error_at" => state.last_error_at = time(&value),
            "key_refused" if !value.is_empty() => key_refused = Some(value),
            "key_refused_at" => key_refused_at = time(&value),
            _ => {}
        }
    }
    state.failing = match (state.last_error_at, state.last_sync_at) {
        (Some(error), Some(ok)) => ok < error,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if let Some(refused) = key_refused {
        // Rounds complete (readings go up), but the chain waits for a person.
        state.last_error = Some(refused);
        state.last_error_at = key_refused_at.or(state.last_error_at);
        state.failing = true;
    }
    Ok(state)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A migrated in-memory store (also for the tests of `sync::integrity`).
    pub(crate) fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema::migrate(&mut conn).unwrap();
        conn
    }

    /// Reading `n` (value `n`, observed at `n` seconds) with `flags`.
    pub(crate) fn insert(conn: &Connection, n: i64, flags: u32) {
        conn.execute(
            "INSERT INTO readings(uid, source, device, metric, value, observed_at, received_at, flags) \
             VALUES (?1, 's', 'd', 'm', ?2, ?3, ?3, ?4)",
            params![
                Uid::derive(&[&n.to_string()]).0.to_vec(),
                n as f64,
                n * 1_000_000,
                flags
            ],
        )
        .unwrap();
    }

    #[test]
    fn windows_select_the_right_ends() {
        let conn = db();
        for i in 1..=10 {
            insert(&conn, i, 0);
        }
        let newest =
            select_readings(&conn, Window::NewestFirst { above: 5, up_to: 9 }, 0, 3).unwrap();
        assert_eq!(newest.ids, [9, 8, 7]);
        let oldest = select_readings(
            &conn,
            Window::OldestFirst {
                after: 2,
                up_to: i64::MAX,
            },
            0,
            3,
        )
        .unwrap();
        assert_eq!(oldest.ids, [3, 4, 5]);
        mark_readings_synced(&conn, &[3, 4]).unwrap();
        let oldest = select_readings(
            &conn,
            Window::OldestFirst {
                after: 0,
                up_to: i64::MAX,
            },
            0,
            3,
        )
        .unwrap();
        assert_eq!(oldest.ids, [1, 2, 5]);
        assert_eq!(crate::store::backlog(&conn).unwrap().rows, 8);
        assert_eq!(head(&conn).unwrap(), 10);
    }

    #[test]
    fn marks_touch_exactly_the_ids_given() {
        assert_eq!(runs(&[7, 3, 4, 5, 9, 4, 10]), [(3, 5), (7, 7), (9, 10)]);
        assert_eq!(runs(&[]), []);
        assert_eq!(
            runs(&[i64::MIN, i64::MAX]),
            [(i64::MIN, i64::MIN), (i64::MAX, i64::MAX)]
        );
        let conn = db();
        for i in 1..=12 {
            insert(&conn, i, 0);
        }
        // Gaps (rows held back, or sent in another batch) stay unsynced.
        assert_eq!(
            mark_readings_synced(&conn, &[2, 3, 4, 6, 8, 9, 11]).unwrap(),
            7
        );
        assert_eq!(
            mark_readings_synced(&conn, &[3, 4, 5]).unwrap(),
            1,
            "3, 4 already"
        );
        let left = select_readings(
            &conn,
            Window::OldestFirst {
                after: 0,
                up_to: i64::MAX,
            },
            0,
            100,
        )
        .unwrap();
        assert_eq!(left.ids, [1, 7, 10, 12]);
    }

    #[test]
    fn unsynchronised_clock_readings_wait_for_correction_or_release() {
        let conn = db();
        insert(&conn, 1, 0);
        insert(&conn, 2, flags::CLOCK_UNSYNCED);
        insert(&conn, 3, flags::CLOCK_UNSYNCED | flags::CLOCK_CORRECTED);
        insert(&conn, 4, flags::CLOCK_UNSYNCED);
        insert(&conn, 5, flags::SIMULATED);
        let all = Window::OldestFirst {
            after: 0,
            up_to: i64::MAX,
        };
        assert_eq!(select_readings(&conn, all, 0, 10).unwrap().ids, [1, 3, 5]);
        // Released up to id 2: held for long enough; sent with its flag unchanged.
        let released = select_readings(&conn, all, 2, 10).unwrap();
        assert_eq!(released.ids, [1, 2, 3, 5]);
        assert_eq!(released.flags[1] as u32, flags::CLOCK_UNSYNCED);
        assert_eq!(
            select_readings(&conn, all, 4, 10).unwrap().ids,
            [1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn hostile_values_are_made_acceptable_deterministically() {
        let conn = db();
        conn.execute(
            "INSERT INTO readings(uid, source, device, metric, value, observed_at, received_at, meta) \
             VALUES (X'0102', 's', ?2, 'm', 1, ?1, 0, '{not json')",
            params![i64::MIN, "de\u{0}v"],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO readings(uid, source, device, metric, value, observed_at, received_at, meta) \
             VALUES (X'0203', 's', 'd', 'm', 1, ?1, 0, '{\"a\":\"x\\u0000y\"}')",
            [i64::MAX],
        )
        .unwrap();
        let rows = select_readings(
            &conn,
            Window::OldestFirst {
                after: 0,
                up_to: i64::MAX,
            },
            0,
            10,
        )
        .unwrap();
        assert_eq!(rows.device[0], "de\u{fffd}v");
        assert_eq!(rows.uid[0], UuidBytes(uid_bytes(&[1, 2])));
        assert_ne!(rows.uid[0], rows.uid[1]);
        assert_eq!(
            rows.observed_at[0].to_rfc3339(),
            "0001-01-01T00:00:00+00:00"
        );
        assert!(rows.observed_at[1].to_rfc3339().starts_with("9999-12-31"));
        let meta0 = &rows.meta[0].as_ref().unwrap().0;
        assert_eq!(serde_json::from_str::<String>(meta0).unwrap(), "{not json");
        let meta1 = &rows.meta[1].as_ref().unwrap().0;
        assert!(
            !meta1.contains("\\u0000") && serde_json::from_str::<serde_json::Value>(meta1).is_ok()
        );
    }

    #[test]
    fn sync_state_round_trips() {
        let conn = db();
        assert_eq!(read_state(&conn).unwrap(), SyncState::default());
        let t = from_micros(1_700_000_000_000_000);
        record_error(&conn, t, "central PostgreSQL: boom").unwrap();
        let s = read_state(&conn).unwrap();
        assert_eq!(s.last_error.as_deref(), Some("central PostgreSQL: boom"));
        assert_eq!(s.last_error_at, Some(t));
        assert!(s.failing);
        let later = from_micros(1_700_000_001_000_000);
        record_success(&conn, later).unwrap();
        assert!(!read_state(&conn).unwrap().failing);
        record_success(&conn, t).unwrap();
        let s = read_state(&conn).unwrap();
        assert_eq!(s.last_sync_at, Some(t));
        assert_eq!(s.last_error.as_deref(), Some("central PostgreSQL: boom"));
    }
}
