//! Embedded, versioned migrations of the local database (`PRAGMA user_version`).
//!
//! Migrations only ever move forward; each runs in its own transaction, so an
//! interrupted upgrade is retried whole at the next start. Every local table is
//! declared here, including those of alerting and notification: components above the
//! store append their tables here instead of creating them on the fly, and the store
//! imports none of them.

use rusqlite::Connection;

/// The triggers that keep `readings_count` (migration 10) right on deletes and
/// `synced` changes below `through`; created by migration 10 and again by migration 11,
/// whose rebuild of the readings table drops them with the old table.
macro_rules! readings_count_triggers {
    () => {
        r#"
    CREATE TRIGGER readings_count_delete AFTER DELETE ON readings
    WHEN OLD.id <= (SELECT through FROM readings_count WHERE one = 1)
    BEGIN
        UPDATE readings_count SET
            stored = stored - 1,
            unsynced = unsynced - (OLD.synced = 0),
            through = CASE WHEN stored = 1 THEN 0 ELSE through END
        WHERE one = 1;
    END;
    CREATE TRIGGER readings_count_synced AFTER UPDATE OF synced ON readings
    WHEN (OLD.synced = 0) IS NOT (NEW.synced = 0)
      AND OLD.id <= (SELECT through FROM readings_count WHERE one = 1)
    BEGIN
        UPDATE readings_count SET unsynced = unsynced + CASE WHEN NEW.synced = 0 THEN 1 ELSE -1 END
        WHERE one = 1;
    END;
    "#
    };
}

/// Each entry upgrades the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: readings, per-series summary, source state, rejected input, counters.
    r#"
    CREATE TABLE readings (
        id          INTEGER PRIMARY KEY,          -- local sequence, also the sync order
        uid         BLOB NOT NULL UNIQUE,         -- 16 bytes, stable across redeliveries (G2)
        source      TEXT NOT NULL,
        device      TEXT NOT NULL,
        metric      TEXT NOT NULL,
        value       REAL NOT NULL,
        unit        TEXT,
        observed_at INTEGER NOT NULL,             -- microseconds since the epoch, UTC
        received_at INTEGER NOT NULL,
        flags       INTEGER NOT NULL DEFAULT 0,
        meta        TEXT,                         -- JSON with source context (f_cnt, RSSI, ...)
        synced      INTEGER NOT NULL DEFAULT 0    -- 1 once central has committed it
    );
    CREATE INDEX readings_unsynced ON readings(id) WHERE synced = 0;
    CREATE INDEX readings_series ON readings(device, metric, observed_at);

    -- The last reading of each series, kept by the writer so `outpost status` and
    -- health never scan the readings table.
    CREATE TABLE series (
        source      TEXT NOT NULL,
        device      TEXT NOT NULL,
        metric      TEXT NOT NULL,
        value       REAL NOT NULL,
        unit        TEXT,
        observed_at INTEGER NOT NULL,
        received_at INTEGER NOT NULL,
        count       INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (source, device, metric)
    ) WITHOUT ROWID;

    -- Small durable state owned by sources: backfill cursors, local sequences.
    CREATE TABLE source_state (
        source TEXT NOT NULL,
        key    TEXT NOT NULL,
        value  TEXT NOT NULL,
        PRIMARY KEY (source, key)
    ) WITHOUT ROWID;

    -- Input that could not be used, kept (bounded) for diagnosis.
    CREATE TABLE rejected (
        id          INTEGER PRIMARY KEY,
        source      TEXT NOT NULL,
        reason      TEXT NOT NULL,
        detail      TEXT,
        payload     BLOB,
        received_at INTEGER NOT NULL
    );

    -- Durable counters that must survive restarts (e.g. readings pruned unsynced).
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 2: alert state, alert events and the notification outbox (the alerts engine and
    // the notify outbox read and write them; their layout is the store's).
    r#"
    -- Alerts that are pending or firing (ok = no row), keyed by the rule's definition
    -- hash so a changed rule starts afresh and an unchanged one keeps its state.
    CREATE TABLE alert_state (
        rule_key      TEXT NOT NULL,
        device        TEXT NOT NULL,
        metric        TEXT NOT NULL,
        rule          TEXT NOT NULL,
        severity      TEXT NOT NULL,
        state         TEXT NOT NULL,              -- 'pending' or 'firing'
        since         INTEGER NOT NULL,           -- µs: pending since, or firing since
        value         REAL,
        unit          TEXT,
        last_notified INTEGER,                    -- µs of the firing event or last reminder
        updated_at    INTEGER NOT NULL,
        PRIMARY KEY (rule_key, device, metric)
    ) WITHOUT ROWID;

    -- Firing, reminder and resolved events, with stable uids (G2). Never pruned to make
    -- room (G4); `synced` is for replication to central.
    CREATE TABLE alert_events (
        id       INTEGER PRIMARY KEY,
        uid      BLOB NOT NULL UNIQUE,
        kind     TEXT NOT NULL,
        rule     TEXT NOT NULL,
        severity TEXT NOT NULL,
        device   TEXT NOT NULL,
        metric   TEXT NOT NULL,
        value       REAL,
        unit        TEXT,
        threshold   REAL,
        since       INTEGER,                      -- µs: when the condition began
        occurred_at INTEGER NOT NULL,             -- µs: when this event happened
        message     TEXT NOT NULL,                -- the event as JSON, as notifiers get it
        synced      INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX alert_events_unsynced ON alert_events(id) WHERE synced = 0;

    -- One row per (event, notifier): the durable outbox, delivered at least once.
    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY,
        event_uid       BLOB NOT NULL,
        notifier        TEXT NOT NULL,
        state           TEXT NOT NULL DEFAULT 'pending',  -- pending, delivered, failed, expired
        attempts        INTEGER NOT NULL DEFAULT 0,
        created_at      INTEGER NOT NULL,
        next_attempt_at INTEGER NOT NULL,
        expires_at      INTEGER NOT NULL,
        last_error      TEXT,
        done_at         INTEGER,
        UNIQUE (event_uid, notifier)
    );
    CREATE INDEX outbox_due ON outbox(next_attempt_at) WHERE state = 'pending';
"#,
    // 3: the MQTT topic of rejected messages, and rejections counted per source and
    // reason (the `rejected` table keeps only the newest rows).
    r#"
    ALTER TABLE rejected ADD COLUMN topic TEXT;
    CREATE TABLE rejected_reasons (
        source      TEXT NOT NULL,
        reason      TEXT NOT NULL,
        count       INTEGER NOT NULL,
        last_at     INTEGER NOT NULL,             -- microseconds since the epoch, UTC
        last_detail TEXT,
        PRIMARY KEY (source, reason)
    ) WITHOUT ROWID;
    INSERT INTO rejected_reasons (source, reason, count, last_at, last_detail)
        SELECT source, reason, COUNT(*), MAX(received_at), NULL FROM rejected
        GROUP BY source, reason;
    "#,
    // 4: acknowledgement and escalation of firing alerts (issue 16): who acknowledged
    // the current firing of an alert, when it fired, which escalation steps went out to
    // whom; who/note/channel of `acknowledged` events.
    r#"
    ALTER TABLE alert_state ADD COLUMN fired_at INTEGER;        -- µs: when it fired (escalation counts from it)
    ALTER TABLE alert_state ADD COLUMN escalations_sent INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE alert_state ADD COLUMN escalated_to TEXT;       -- JSON list of notifiers the sent steps reached
    ALTER TABLE alert_state ADD COLUMN acked_at INTEGER;        -- µs; NULL: not acknowledged
    ALTER TABLE alert_state ADD COLUMN acked_by TEXT;
    ALTER TABLE alert_state ADD COLUMN ack_note TEXT;
    ALTER TABLE alert_state ADD COLUMN ack_channel TEXT;        -- cli, console or central
    ALTER TABLE alert_events ADD COLUMN actor TEXT;
    ALTER TABLE alert_events ADD COLUMN note TEXT;
    ALTER TABLE alert_events ADD COLUMN channel TEXT;
    "#,
    // 5: cumulative alert rules (alerts::cumulative): per rule and series, the tally
    // (the newest reading counted, a clock step not yet followed) and its spans out of
    // range or unknown, plus excursion starts; saved with the engine's cursor, pruned
    // beyond the rule's window.
    r#"
    CREATE TABLE alert_tallies (
        rule_key     TEXT NOT NULL,
        device       TEXT NOT NULL,
        metric       TEXT NOT NULL,
        last_at      INTEGER,                     -- µs: observed time of the newest reading counted
        last_out     INTEGER NOT NULL DEFAULT 0,  -- 1 if that reading was out of range
        in_excursion INTEGER NOT NULL DEFAULT 0,
        shift        INTEGER,                     -- µs: a clock step not yet followed
        shift_until  INTEGER,                     -- µs: agent time until it may be
        updated_at   INTEGER NOT NULL,
        PRIMARY KEY (rule_key, device, metric)
    ) WITHOUT ROWID;
    CREATE TABLE alert_spans (
        rule_key TEXT NOT NULL,
        device   TEXT NOT NULL,
        metric   TEXT NOT NULL,
        start_at INTEGER NOT NULL,                -- µs, observed time
        end_at   INTEGER NOT NULL,                -- µs; = start_at for 'start'
        kind     TEXT NOT NULL                    -- 'out', 'unknown', or 'start' (of an excursion)
    );
    CREATE INDEX alert_spans_series ON alert_spans(rule_key, device, metric);
    "#,
    // 6: daily summaries (the HACCP log, `report::summary`): one row per local day,
    // device and metric; `detail` is the whole summary as JSON, the other columns the
    // figures central and SQL read. Kept until synced and older than the retention.
    r#"
    CREATE TABLE daily_summaries (
        day                  TEXT NOT NULL,       -- local date YYYY-MM-DD in `timezone`
        device               TEXT NOT NULL,
        metric               TEXT NOT NULL,       -- '' for a listed device without readings
        timezone             TEXT NOT NULL,       -- IANA name (agent.timezone)
        day_start            INTEGER NOT NULL,    -- µs UTC: local midnight
        day_end              INTEGER NOT NULL,    -- µs UTC: the next local midnight
        complete             INTEGER NOT NULL,    -- 0 while the day is not over
        readings             INTEGER NOT NULL,
        min                  REAL,
        max                  REAL,
        mean                 REAL,
        gaps                 INTEGER NOT NULL,
        gap_seconds          INTEGER NOT NULL,
        out_of_range_seconds INTEGER NOT NULL,
        excursions           INTEGER NOT NULL,
        alarms               INTEGER NOT NULL,
        detail               TEXT NOT NULL,
        computed_at          INTEGER NOT NULL,
        synced               INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (day, device, metric)
    ) WITHOUT ROWID;
    CREATE INDEX daily_summaries_unsynced ON daily_summaries(day) WHERE synced = 0;
    "#,
    // 7: the audit log (G10, `store::audit`): append-only; the triggers refuse any
    // change but the `synced` mark, and any delete, so a mistake in the agent cannot
    // rewrite history (someone with the file can still drop them: the hash chain is
    // what detects that).
    r#"
    CREATE TABLE audit_log (
        id         INTEGER PRIMARY KEY,
        at         INTEGER NOT NULL,              -- µs since the epoch, UTC (wall clock)
        boot_id    TEXT NOT NULL,                 -- the kernel's boot id ('' if unknown)
        since_boot INTEGER NOT NULL,              -- µs since that boot (CLOCK_BOOTTIME)
        kind       TEXT NOT NULL,                 -- AuditKind::as_str
        actor      TEXT NOT NULL,                 -- process:<user>, console:<name>, central
        details    TEXT NOT NULL,                 -- JSON object
        synced     INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX audit_log_unsynced ON audit_log(id) WHERE synced = 0;
    CREATE TRIGGER audit_log_append_only_update BEFORE UPDATE ON audit_log
    WHEN NEW.id IS NOT OLD.id OR NEW.at IS NOT OLD.at OR NEW.boot_id IS NOT OLD.boot_id
      OR NEW.since_boot IS NOT OLD.since_boot OR NEW.kind IS NOT OLD.kind
      OR NEW.actor IS NOT OLD.actor OR NEW.details IS NOT OLD.details
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER audit_log_append_only_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    "#,
    // 8: the hash chain (G10, `store::chain`): links sealed by the writer in each group
    // commit, per-table tips (rows up to `start_id` predate the chain: an upgrade),
    // signed heads and pruning checkpoints.
    r#"
    CREATE TABLE chain_links (
        seq       INTEGER PRIMARY KEY,           -- 1, 2, ... in commit order
        tbl       TEXT NOT NULL,                 -- readings | alert_events | audit_log
        first_id  INTEGER NOT NULL,
        last_id   INTEGER NOT NULL,
        rows      INTEGER NOT NULL,
        digest    BLOB NOT NULL,                 -- SHA-256 over the rows' encodings
        head      BLOB NOT NULL,                 -- SHA-256 chaining the previous head
        sealed_at INTEGER NOT NULL,              -- µs since the epoch
        synced    INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX chain_links_unsynced ON chain_links(seq) WHERE synced = 0;
    -- Per table: where its chain begins (rows up to start_id predate it) and the last
    -- id sealed (the writer's cursor; the verifier trusts only the links).
    CREATE TABLE chain_tips (
        tbl      TEXT PRIMARY KEY,
        start_id INTEGER NOT NULL,
        last_id  INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO chain_tips SELECT 'readings', COALESCE(MAX(id), 0), COALESCE(MAX(id), 0) FROM readings;
    INSERT INTO chain_tips SELECT 'alert_events', COALESCE(MAX(id), 0), COALESCE(MAX(id), 0) FROM alert_events;
    INSERT INTO chain_tips SELECT 'audit_log', COALESCE(MAX(id), 0), COALESCE(MAX(id), 0) FROM audit_log;
    -- Signed heads: the head of link `seq` signed with the gateway's Ed25519 key.
    CREATE TABLE chain_signatures (
        id         INTEGER PRIMARY KEY,
        seq        INTEGER NOT NULL,
        head       BLOB NOT NULL,
        signature  BLOB NOT NULL,                -- 64 bytes
        public_key BLOB NOT NULL,                -- 32 bytes
        signed_at  INTEGER NOT NULL,             -- µs since the epoch
        synced     INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX chain_signatures_unsynced ON chain_signatures(id) WHERE synced = 0;
    -- Pruning boundaries: rows of `tbl` up to `pruned_up_to` may be gone (retention,
    -- size cap); the chain's seq and head at that moment; signed by the next signing.
    CREATE TABLE chain_checkpoints (
        id           INTEGER PRIMARY KEY,
        tbl          TEXT NOT NULL,
        pruned_up_to INTEGER NOT NULL,
        seq          INTEGER NOT NULL,
        head         BLOB NOT NULL,
        reason       TEXT NOT NULL,              -- retention | size_cap
        at           INTEGER NOT NULL,           -- µs since the epoch
        signature    BLOB,
        public_key   BLOB,
        synced       INTEGER NOT NULL DEFAULT 0
    );
"#,
    // 9: the series index covers `value` (the console's charts, issue 18): min/max/avg
    // per interval of one series come from the index alone, without a lookup of each
    // row in the table (5x faster for a 30-day chart, about 9 more bytes per reading;
    // docs/benchmarks.md, "Console"). Rebuilt once at the upgrade.
    r#"
    DROP INDEX readings_series;
    CREATE INDEX readings_series ON readings(device, metric, observed_at, value);
    "#,
    // 10: the counts `outpost status` and `/metrics` show (readings stored, unsynced
    // backlog), so that neither counts a 5M-row table (`store::read::reading_counts`).
    // `stored` and `unsynced` count the readings with `id <= through`; a reader adds
    // the few above it (a range of the primary key). The store writer moves `through`
    // forward in its commit once 1,024 readings are above it
    // (`store::read::advance_counts`): a trigger on every insert cost the writer about
    // 15 % of its throughput even with a `WHEN` that let it run once per 1,024 inserts
    // (docs/benchmarks.md). Deletes and `synced` changes below `through` adjust the
    // counts row by row in triggers (they are rarer and already update indexes). When
    // the last counted row goes, `through` drops to 0, so ids reused by an emptied
    // table are counted again.
    concat!(
        r#"
    CREATE TABLE readings_count (
        one      INTEGER PRIMARY KEY CHECK (one = 1),
        through  INTEGER NOT NULL,                -- readings with id <= through are counted
        stored   INTEGER NOT NULL,
        unsynced INTEGER NOT NULL
    );
    INSERT INTO readings_count (one, through, stored, unsynced)
        SELECT 1, COALESCE(MAX(id), 0), COUNT(*), COALESCE(SUM(synced = 0), 0) FROM readings;
    "#,
        readings_count_triggers!()
    ),
    // 11: the uid dedupe (G2) keyed by time (issue 15). UNIQUE(uid) put every insert at
    // a random place of a 16-byte-key index that outgrows the writer's page cache after
    // a few 100k rows (a read and a dirty page per commit). Two indexes replace it:
    // UNIQUE(observed_at, uid) for every reading, written at its right edge, and
    // UNIQUE(uid) only for the readings stamped with their arrival time
    // (observed_at = received_at), so a source that carries its message's time (the
    // ones that burst: TTN, ChirpStack and MQTT with a time) never touches a random
    // index. Together they refuse exactly what UNIQUE(uid) did,
    // given how every source derives its uids: a uid from the message's own time or
    // origin (ttn, mqtt_json, simulated, chirpstack with `time`) always comes with the
    // same observed_at; a uid that does not fix observed_at comes with its arrival time
    // (chirpstack without `time`) or is never reused (modbus and serial sequences); and
    // the clock-step moves shift both times of a row alike (docs/benchmarks.md,
    // "Session 8: the dedupe keyed by time"). The inline UNIQUE is an
    // index that cannot be dropped, so the table is rebuilt: ids, every column, the
    // other indexes and the count triggers are kept (the chain covers contents by id).
    concat!(
        r#"
    DROP TRIGGER readings_count_delete;
    DROP TRIGGER readings_count_synced;
    CREATE TABLE readings_rebuilt (
        id          INTEGER PRIMARY KEY,          -- local sequence, also the sync order
        uid         BLOB NOT NULL,                -- 16 bytes, stable across redeliveries (G2)
        source      TEXT NOT NULL,
        device      TEXT NOT NULL,
        metric      TEXT NOT NULL,
        value       REAL NOT NULL,
        unit        TEXT,
        observed_at INTEGER NOT NULL,             -- microseconds since the epoch, UTC
        received_at INTEGER NOT NULL,
        flags       INTEGER NOT NULL DEFAULT 0,
        meta        TEXT,                         -- JSON with source context (f_cnt, RSSI, ...)
        synced      INTEGER NOT NULL DEFAULT 0    -- 1 once central has committed it
    );
    INSERT INTO readings_rebuilt
        (id, uid, source, device, metric, value, unit, observed_at, received_at, flags, meta, synced)
        SELECT id, uid, source, device, metric, value, unit, observed_at, received_at, flags, meta, synced
        FROM readings ORDER BY id;
    DROP TABLE readings;
    ALTER TABLE readings_rebuilt RENAME TO readings;
    CREATE INDEX readings_unsynced ON readings(id) WHERE synced = 0;
    CREATE INDEX readings_series ON readings(device, metric, observed_at, value);
    CREATE UNIQUE INDEX readings_uid_time ON readings(observed_at, uid);
    CREATE UNIQUE INDEX readings_uid_arrival ON readings(uid) WHERE observed_at = received_at;
    "#,
        readings_count_triggers!()
    ),
];

/// The schema version that added the hash chain (G10): databases below it hold rows
/// from before the chain.
pub const CHAIN_VERSION: i64 = 8;

/// The schema version that added the kept reading counts (`readings_count`): databases
/// below it are counted row by row.
pub const COUNTS_VERSION: i64 = 10;

/// The schema version that keyed the readings' dedupe by time (`readings_uid_time`):
/// the rebuild of the readings table, logged with its duration at the upgrade.
pub const UID_TIME_VERSION: i64 = 11;

/// The schema version this build writes.
pub const CURRENT_VERSION: i64 = MIGRATIONS.len() as i64;

/// Applies every pending migration. Refuses a database from a newer version of the agent
/// rather than guessing at its layout.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<i64> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > CURRENT_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database has schema version {version}, newer than this agent's {CURRENT_VERSION}; \
             install the newer agent or move the database aside"
        )));
    }
    migrate_to(conn, CURRENT_VERSION)
}

/// Applies the pending migrations up to `target` (at most [`CURRENT_VERSION`]) and
/// returns the version reached. [`migrate`] is this with the current version; tools
/// and benchmarks use it to build a database of an older version.
pub fn migrate_to(conn: &mut Connection, target: i64) -> rusqlite::Result<i64> {
    migrate_with(conn, target, super::read::database_disk_free)
}

/// [`migrate_to`] with the free disk space for migration 11's rebuild told by `free`.
fn migrate_with(
    conn: &mut Connection,
    target: i64,
    free: fn(&Connection) -> Option<u64>,
) -> rusqlite::Result<i64> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let target = target.min(CURRENT_VERSION);
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target.max(0) as usize)
        .skip(version.max(0) as usize)
    {
        let started = std::time::Instant::now();
        let rebuild = if (i + 1) as i64 == UID_TIME_VERSION {
            match rebuild_room(conn, free(conn))? {
                Room::Empty => None,
                Room::Enough(rows) => {
                    tracing::warn!(
                        readings = rows,
                        "Rebuilding the readings table once for the time-keyed dedupe index (schema 11); \
                         this takes about 7 s per million readings on a fast disk and several times that on an SD card. Do not interrupt: \
                         an interrupted rebuild is rolled back and starts again."
                    );
                    // Under systemd the start must not time out mid-rebuild (it would be
                    // rolled back and retried at every start): extend the start timeout
                    // generously, 2 min plus 2 min per million readings.
                    let usec =
                        120_000_000u64.saturating_add((rows.max(0) as u64).saturating_mul(120));
                    let _ = sd_notify::notify(
                        false,
                        &[sd_notify::NotifyState::ExtendTimeoutUsec(
                            usec.min(u32::MAX as u64) as u32,
                        )],
                    );
                    Some(rows)
                }
                Room::Short { need, free } => {
                    tracing::warn!(
                        need_mib = need >> 20,
                        free_mib = free >> 20,
                        "Not enough free disk to rebuild the readings table for the time-keyed dedupe \
                         index (schema 11); the store stays at schema 10 (dedupe by the uid index, slower \
                         ingest) and the upgrade is tried again at the next start."
                    );
                    return Ok(i as i64);
                }
            }
        } else {
            None
        };
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        if let Some(rows) = rebuild {
            // The copy went through the WAL: write it back now and give the WAL file's
            // space back rather than keep a file the size of the table. (The old
            // table's pages stay in the database as free pages, which new readings
            // reuse; `storage.max_size` counts only pages in use.)
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            tracing::warn!(
                readings = rows,
                seconds = started.elapsed().as_secs_f64(),
                "Rebuilt the readings table (schema 11)."
            );
        }
    }
    Ok(version.max(target))
}

/// Whether the disk has room for the rebuild of migration 11.
enum Room {
    /// No readings: the rebuild is instant.
    Empty,
    /// About this many readings to copy.
    Enough(i64),
    /// The copy and its WAL need `need` bytes; `free` are available.
    Short { need: u64, free: u64 },
}

/// The rebuild of migration 11 writes a second copy of the readings table and its
/// indexes, all of it into the WAL first (one transaction), before the old pages are
/// freed: about twice the database's size must be free, or the migration would fail on
/// a full disk at every start (and the agent with it).
fn rebuild_room(conn: &Connection, free: Option<u64>) -> rusqlite::Result<Room> {
    let rows: i64 = conn.query_row(
        "SELECT COALESCE(MAX(id) - MIN(id) + 1, 0) FROM readings",
        [],
        |r| r.get(0),
    )?;
    if rows == 0 {
        return Ok(Room::Empty);
    }
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let need = (pages.max(0) as u64 * size.max(0) as u64).saturating_mul(2) + (64 << 20);
    match free {
        Some(free) if free < need => Ok(Room::Short { need, free }),
        _ => Ok(Room::Enough(rows)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insert(conn: &Connection, uid: &[u8], observed: i64, received: i64) -> usize {
        conn.execute(
            "INSERT INTO readings (uid, source, device, metric, value, observed_at, received_at) \
             VALUES (?1, 's', 'd', 'm', 1.0, ?2, ?3) ON CONFLICT DO NOTHING",
            rusqlite::params![uid, observed, received],
        )
        .unwrap()
    }

    /// A store whose disk has no room for the rebuild stays at schema 10, keeps its
    /// `UNIQUE(uid)` (the writer's `ON CONFLICT DO NOTHING` dedupes by it), and is
    /// upgraded at a later start once there is room.
    #[test]
    fn the_rebuild_waits_for_disk_room_and_the_old_layout_keeps_deduping() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("outpost.db")).unwrap();
        migrate_to(&mut conn, UID_TIME_VERSION - 1).unwrap();
        assert_eq!(insert(&conn, &[1; 16], 10, 20), 1);
        let v = migrate_with(&mut conn, CURRENT_VERSION, |_| Some(0)).unwrap();
        assert_eq!(v, UID_TIME_VERSION - 1, "deferred");
        // Another time with the same uid: still a duplicate on the old layout.
        assert_eq!(insert(&conn, &[1; 16], 11, 21), 0);
        let v = migrate_with(&mut conn, CURRENT_VERSION, |_| Some(u64::MAX)).unwrap();
        assert_eq!(v, CURRENT_VERSION);
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
        // The new layout: the same uid and time, or an arrival-stamped redelivery with
        // another time, are duplicates; a new uid is not.
        assert_eq!(insert(&conn, &[1; 16], 10, 30), 0);
        assert_eq!(insert(&conn, &[2; 16], 40, 40), 1);
        assert_eq!(insert(&conn, &[2; 16], 50, 50), 0);
        assert_eq!(insert(&conn, &[3; 16], 10, 30), 1);
    }
}
