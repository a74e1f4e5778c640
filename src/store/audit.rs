//! The audit log (G10): an append-only table of everything that changes what the records
//! mean or who could change them — configuration loaded, reloaded or refused, version
//! changes, alarm acknowledgements, console logins, clock steps and corrections, unsynced
//! readings pruned, a damaged database moved aside, a source state reset, commands that
//! write to the store.
//!
//! Each entry carries the wall time, the time since boot on the monotonic clock
//! (`CLOCK_BOOTTIME`, so the order of events in one boot survives a wall-clock step) with
//! the kernel's boot id, the kind, the actor (the process user, a console user, or
//! `central`) and its details as JSON. Rows are never updated except for the `synced`
//! mark, and never pruned before they reached central.
//!
//! Components append through [`Store::audit`] (a durable write in the writer's next
//! group commit); code that holds the write connection itself (the writer, a command
//! run against a stopped agent's database) uses [`append`].

use super::{Store, StoreError};
use crate::clock::Clock;
use rusqlite::{params, Connection};
use serde::Serialize;

/// What happened. The string form (`as_str`) is what the table, `outpost audit --kind`
/// and central store; new kinds are appended, existing strings never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "&'static str")]
pub enum AuditKind {
    /// The agent started with a configuration (details: files and their SHA-256).
    ConfigLoaded,
    /// SIGHUP applied a new configuration (details: files, digests, changed keys).
    ConfigReloaded,
    /// A new configuration was refused; the old one stays (details: the problems).
    ConfigRefused,
    /// The agent's version differs from the one of the previous start.
    VersionChanged,
    /// An alarm was acknowledged (details: rule, device, note, channel).
    AlarmAcknowledged,
    /// A console user logged in.
    ConsoleLogin,
    /// A console login was refused (details: user name tried, address).
    ConsoleLoginFailed,
    /// The wall clock stepped (details: by how much, direction).
    ClockStep,
    /// Readings' times were corrected after a clock step (G8; details: range, offset).
    ClockCorrection,
    /// Unsynced readings were deleted to stay under the size cap (G4).
    PrunedUnsynced,
    /// A damaged database was moved aside and a fresh one created.
    DatabaseMovedAside,
    /// A source's durable state (cursors, sequences) was reset.
    SourceStateReset,
    /// A command wrote to the store (details: the command and its arguments).
    Command,
}

impl AuditKind {
    pub const ALL: [AuditKind; 13] = [
        AuditKind::ConfigLoaded,
        AuditKind::ConfigReloaded,
        AuditKind::ConfigRefused,
        AuditKind::VersionChanged,
        AuditKind::AlarmAcknowledged,
        AuditKind::ConsoleLogin,
        AuditKind::ConsoleLoginFailed,
        AuditKind::ClockStep,
        AuditKind::ClockCorrection,
        AuditKind::PrunedUnsynced,
        AuditKind::DatabaseMovedAside,
        AuditKind::SourceStateReset,
        AuditKind::Command,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::ConfigLoaded => "config.loaded",
            AuditKind::ConfigReloaded => "config.reloaded",
            AuditKind::ConfigRefused => "config.refused",
            AuditKind::VersionChanged => "version.changed",
            AuditKind::AlarmAcknowledged => "alarm.acknowledged",
            AuditKind::ConsoleLogin => "console.login",
            AuditKind::ConsoleLoginFailed => "console.login_failed",
            AuditKind::ClockStep => "clock.step",
            AuditKind::ClockCorrection => "clock.correction",
            AuditKind::PrunedUnsynced => "store.pruned_unsynced",
            AuditKind::DatabaseMovedAside => "store.moved_aside",
            AuditKind::SourceStateReset => "source_state.reset",
            AuditKind::Command => "command",
        }
    }

    pub fn parse(text: &str) -> Option<AuditKind> {
        AuditKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

impl From<AuditKind> for &'static str {
    fn from(kind: AuditKind) -> &'static str {
        kind.as_str()
    }
}

impl std::fmt::Display for AuditKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry before it is written.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub kind: AuditKind,
    /// `process:<user>` for the agent and commands, `console:<name>` for a console
    /// user, `central` for what came from central.
    pub actor: String,
    /// The details, a JSON object.
    pub details: serde_json::Value,
}

impl AuditEntry {
    pub fn new(kind: AuditKind, actor: impl Into<String>, details: serde_json::Value) -> Self {
        AuditEntry {
            kind,
            actor: actor.into(),
            details,
        }
    }

    /// An entry whose actor is the user this process runs as.
    pub fn by_process(kind: AuditKind, details: serde_json::Value) -> Self {
        AuditEntry::new(kind, process_actor(), details)
    }
}

/// `process:<user name>` (or `process:uid <n>` when the name is unknown).
pub fn process_actor() -> String {
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let name = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|line| {
                let mut fields = line.split(':');
                let name = fields.next()?;
                let id = fields.nth(1)?;
                (id.parse::<u32>().ok()? == uid).then(|| name.to_string())
            })
        });
    match name {
        Some(name) => format!("process:{name}"),
        None => format!("process:uid {uid}"),
    }
}

/// Microseconds since boot on `CLOCK_BOOTTIME` (counts suspend, never steps).
pub fn boottime_micros() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write into.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    // `time_t` and `c_long` are 32 bits on armhf: the casts are not no-ops there.
    #[allow(clippy::unnecessary_cast)]
    let micros = ts.tv_sec as i64 * 1_000_000 + ts.tv_nsec as i64 / 1_000;
    micros
}

/// The kernel's id of the current boot (changes at every reboot).
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && s.len() <= 64)
}

/// Appends `entry` on `conn` (inside the caller's transaction, if any) and returns its id.
pub fn append(conn: &Connection, clock: &Clock, entry: &AuditEntry) -> rusqlite::Result<i64> {
    append_at(conn, clock.now(), entry)
}

/// [`append`] stamped with `at`, for writes that already took their time (one
/// acknowledgement: the alarm's state, its event and this entry carry the same time).
pub fn append_at(
    conn: &Connection,
    at: chrono::DateTime<chrono::Utc>,
    entry: &AuditEntry,
) -> rusqlite::Result<i64> {
    let details = serde_json::to_string(&entry.details).unwrap_or_else(|_| "{}".to_string());
    conn.execute(
        "INSERT INTO audit_log (at, boot_id, since_boot, kind, actor, details) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            at.timestamp_micros(),
            boot_id().unwrap_or_default(),
            boottime_micros(),
            entry.kind.as_str(),
            entry.actor,
            details
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

/// One stored entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredAuditEntry {
    pub id: i64,
    /// Wall time, microseconds since the epoch (UTC).
    pub at: i64,
    pub boot_id: String,
    /// Microseconds since that boot (`CLOCK_BOOTTIME`).
    pub since_boot: i64,
    pub kind: String,
    pub actor: String,
    pub details: serde_json::Value,
    pub synced: bool,
}

/// Which entries [`list`] returns.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only entries at or after this wall time (µs since the epoch).
    pub since: Option<i64>,
    pub kind: Option<AuditKind>,
    /// At most this many, newest first (all when `None`).
    pub limit: Option<usize>,
}

/// Entries matching `filter`, oldest first.
pub fn list(conn: &Connection, filter: &AuditFilter) -> rusqlite::Result<Vec<StoredAuditEntry>> {
    let mut stmt = conn.prepare(
        "SELECT id, at, boot_id, since_boot, kind, actor, details, synced FROM audit_log \
         WHERE (?1 IS NULL OR at >= ?1) AND (?2 IS NULL OR kind = ?2) \
         ORDER BY id DESC LIMIT ?3",
    )?;
    let limit = filter.limit.map(|l| l as i64).unwrap_or(-1);
    let rows = stmt.query_map(
        params![filter.since, filter.kind.map(|k| k.as_str()), limit],
        |r| {
            let details: String = r.get(6)?;
            Ok(StoredAuditEntry {
                id: r.get(0)?,
                at: r.get(1)?,
                boot_id: r.get(2)?,
                since_boot: r.get(3)?,
                kind: r.get(4)?,
                actor: r.get(5)?,
                details: serde_json::from_str(&details)
                    .unwrap_or(serde_json::Value::String(details)),
                synced: r.get::<_, i64>(7)? != 0,
            })
        },
    )?;
    let mut entries = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    entries.reverse();
    Ok(entries)
}

impl Store {
    /// Appends `entry` to the audit log in the writer's next group commit and resolves
    /// once it is durable.
    pub async fn audit(&self, entry: AuditEntry) -> Result<i64, StoreError> {
        let clock = self.clock.clone();
        self.write(move |conn| append(conn, &clock, &entry)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema::migrate(&mut conn).unwrap();
        conn
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in AuditKind::ALL {
            assert_eq!(AuditKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(AuditKind::parse("nonsense"), None);
    }

    #[test]
    fn entries_are_listed_oldest_first_and_filtered() {
        let conn = db();
        let clock = Clock::system();
        let ack = AuditEntry::new(
            AuditKind::AlarmAcknowledged,
            "console:maria",
            serde_json::json!({"rule": "freezer-warm", "note": "door closed"}),
        );
        let first = append(&conn, &clock, &ack).unwrap();
        let loaded = AuditEntry::by_process(AuditKind::ConfigLoaded, serde_json::json!({}));
        let second = append(&conn, &clock, &loaded).unwrap();
        assert!(second > first);
        let all = list(&conn, &AuditFilter::default()).unwrap();
        assert_eq!(
            all.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![first, second]
        );
        assert_eq!(all[0].details["note"], "door closed");
        assert_eq!(all[0].actor, "console:maria");
        assert!(all[1].actor.starts_with("process:"));
        assert!(all[0].since_boot > 0);
        let acks = list(
            &conn,
            &AuditFilter {
                kind: Some(AuditKind::AlarmAcknowledged),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(acks.len(), 1);
        let newest = list(
            &conn,
            &AuditFilter {
                limit: Some(1),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(newest[0].id, second);
    }

    #[test]
    fn the_table_refuses_updates_and_deletes_of_entries() {
        let conn = db();
        let id = append(
            &conn,
            &Clock::system(),
            &AuditEntry::by_process(AuditKind::Command, serde_json::json!({"command": "ack"})),
        )
        .unwrap();
        let change = conn.execute("UPDATE audit_log SET actor = 'x' WHERE id = ?1", [id]);
        assert!(change.is_err(), "{change:?}");
        let delete = conn.execute("DELETE FROM audit_log WHERE id = ?1", [id]);
        assert!(delete.is_err(), "{delete:?}");
        conn.execute("UPDATE audit_log SET synced = 1 WHERE id = ?1", [id])
            .unwrap();
    }
}
