//! Bad input and visible source state, shared by the serial and Modbus sources.
//!
//! Rejected input is counted per reason (also in `/metrics` as
//! `outpost_readings_rejected{source, reason}`), logged at most once a minute per source
//! and reason (so the first of every reason is logged, with its hint from
//! [`super::reasons`], and how many were suppressed), kept in the bounded `rejected`
//! table and counted in `rejected_reasons` (see [`summary`]). Counts and the
//! source's state (port open, slave offline, …) are written to `source_state` rows,
//! which `outpost status` and health read without the agent's help:
//!
//! | key                 | value                                         |
//! |---------------------|-----------------------------------------------|
//! | `rejected.<reason>` | how many inputs were rejected for that reason |
//! | `state`             | JSON: `{"state": "open" \| "waiting", …}`     |
//! | `state` (MQTT)      | JSON: `{"state": "connected" \| "disconnected", "broker", …}` |
//! | `slave.<id>`        | JSON: `{"state": "online" \| "offline", …}`   |

use crate::metrics::Metrics;
use crate::ratelimit::KeyedLogLimiter;
use crate::store::state::{read_state, write_rows};
use crate::store::Store;
use std::collections::BTreeMap;
use std::fmt::Display;

/// Counts, logs (rate-limited) and records rejected input of one source.
pub struct RejectCounter {
    source: String,
    store: Store,
    metrics: Metrics,
    counts: BTreeMap<&'static str, u64>,
    limiter: KeyedLogLimiter,
    dirty: bool,
}

impl RejectCounter {
    pub fn new(source: &str, store: Store, metrics: Metrics) -> RejectCounter {
        RejectCounter {
            source: source.to_string(),
            store,
            metrics,
            counts: BTreeMap::new(),
            limiter: KeyedLogLimiter::default(),
            dirty: false,
        }
    }

    /// Counts one rejected input, keeps it in `rejected` and logs it unless a line was
    /// logged recently.
    pub fn reject(&mut self, reason: &'static str, detail: &dyn Display, payload: &[u8]) {
        let count = self.counts.entry(reason).or_insert(0);
        *count += 1;
        let count = *count;
        self.dirty = true;
        self.metrics.rejected(&self.source, reason);
        let detail = detail.to_string();
        if let Some(suppressed) = self.limiter.allow(reason) {
            tracing::warn!(
                source = %self.source,
                reason,
                detail = %detail,
                hint = super::reasons::fix_for(reason),
                count,
                suppressed,
                "Input rejected (logged at most once a minute per reason; every one is counted and kept: `outpost rejected`)."
            );
        }
        self.store
            .record_rejected(&self.source, reason, &detail, payload);
    }

    pub fn count(&self, reason: &str) -> u64 {
        self.counts.get(reason).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The `rejected.<reason>` rows, if anything changed since the last call.
    pub fn take_changed_rows(&mut self) -> Vec<(String, String)> {
        if !std::mem::take(&mut self.dirty) {
            return Vec::new();
        }
        self.counts
            .iter()
            .map(|(reason, n)| (format!("rejected.{reason}"), n.to_string()))
            .collect()
    }
}

/// Hands out the local sequence numbers that make serial and Modbus uids (G2:
/// `uid = derive(source, sequence, metric)`), never reusing one across restarts.
///
/// Numbers are reserved in blocks: the end of the block is committed to `source_state`
/// before any number of it is used, and a restart continues after the last reserved
/// block. A crash wastes the rest of a block (gaps are harmless); it never reuses a
/// number, which would make a new reading look like a duplicate of an old one.
pub struct SequenceAllocator {
    source: String,
    store: Store,
    next: u64,
    limit: u64,
    block: u64,
}

const SEQUENCE_KEY: &str = "sequence_reserved";

impl SequenceAllocator {
    /// Loads the last reserved block end of `source`.
    pub async fn load(source: &str, store: Store, block: u64) -> anyhow::Result<SequenceAllocator> {
        let reader_store = store.clone();
        let key_source = source.to_string();
        let stored = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<String>> {
            let conn = reader_store.reader()?;
            Ok(read_state(&conn, &key_source, SEQUENCE_KEY)?)
        })
        .await??;
        let start = match stored {
            Some(v) => v.parse::<u64>().map_err(|_| {
                anyhow::anyhow!("source_state {SEQUENCE_KEY} of {source:?} is not a number: {v:?}")
            })?,
            None => 0,
        };
        Ok(SequenceAllocator {
            source: source.to_string(),
            store,
            next: start,
            limit: start,
            block: block.max(1),
        })
    }

    /// The next unused sequence number; waits for a commit once per block.
    pub async fn next(&mut self) -> Result<u64, crate::store::StoreError> {
        if self.next >= self.limit {
            let limit = self.next + self.block;
            write_rows(
                &self.store,
                &self.source,
                vec![(SEQUENCE_KEY.to_string(), limit.to_string())],
            )
            .await?;
            self.limit = limit;
        }
        let n = self.next;
        self.next += 1;
        Ok(n)
    }
}

/// One line per serial port or Modbus bus that is not open and per Modbus slave that
/// is offline, for `outpost status`: what a technician on site needs to look at.
pub fn status_notes(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT source, key, value FROM source_state
         WHERE key = 'state' OR key LIKE 'slave.%' ORDER BY source, key",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut notes = Vec::new();
    for (source, key, value) in rows {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&value) else {
            continue;
        };
        let text = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
        let state = text("state");
        let error = match text("error").as_str() {
            "" => match text("last_error").as_str() {
                "" => String::new(),
                e => format!(" ({e})"),
            },
            e => format!(" ({e})"),
        };
        if key == "state" && state == "waiting" {
            notes.push(format!(
                "Source {source}: port {} not available since {}{error}; retrying",
                text("path"),
                text("since")
            ));
        } else if key == "state" && state == "disconnected" {
            notes.push(format!(
                "Source {source}: DISCONNECTED from the MQTT broker {} since {}{error}; reconnecting",
                text("broker"),
                text("since")
            ));
        } else if let Some(id) = key.strip_prefix("slave.") {
            if state == "offline" {
                notes.push(format!(
                    "Source {source}: Modbus slave {id} ({}) OFFLINE since {}{error}",
                    text("device"),
                    text("since")
                ));
            }
        }
    }
    Ok(notes)
}

/// Rejections of one source for one reason, for `outpost status` (text and JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RejectionSummary {
    pub source: String,
    pub reason: String,
    /// How many were recorded (since the database was created; the `rejected` table
    /// itself keeps only the newest messages).
    pub count: i64,
    /// When the last one arrived, and what was wrong with it.
    pub last_at: chrono::DateTime<chrono::Utc>,
    pub last_detail: Option<String>,
    /// What to do about it ([`super::reasons`]).
    pub hint: &'static str,
}

/// Every (source, reason) with rejections, newest first.
pub fn summary(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<RejectionSummary>> {
    // A database not yet migrated by this version of the agent (read before its first
    // start after an upgrade) has only the kept messages to count.
    let migrated: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'rejected_reasons'",
        [],
        |r| r.get(0),
    )?;
    let mut stmt = conn.prepare(if migrated {
        "SELECT source, reason, count, last_at, last_detail FROM rejected_reasons
         ORDER BY source, last_at DESC, reason"
    } else {
        "SELECT source, reason, COUNT(*), MAX(received_at), NULL FROM rejected
         GROUP BY source, reason ORDER BY source, 4 DESC, reason"
    })?;
    let rows = stmt.query_map([], |r| {
        let reason: String = r.get(1)?;
        Ok(RejectionSummary {
            source: r.get(0)?,
            hint: super::reasons::fix_for(&reason),
            reason,
            count: r.get(2)?,
            last_at: crate::model::from_micros(r.get(3)?),
            last_detail: r.get(4)?,
        })
    })?;
    rows.collect()
}

/// The `outpost status` section: per source, the count by reason, when the last one
/// arrived and what to do.
pub fn render_summary(rows: &[RejectionSummary], now: chrono::DateTime<chrono::Utc>) -> String {
    if rows.is_empty() {
        return String::new();
    }
    let header = ["SOURCE", "REASON", "COUNT", "LAST", "WHAT TO DO"];
    let body: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.source.clone(),
                r.reason.clone(),
                r.count.to_string(),
                format!("{} ago", crate::display::age(now, r.last_at)),
                if r.hint.is_empty() {
                    "see `outpost rejected`".to_string()
                } else {
                    r.hint.to_string()
                },
            ]
        })
        .collect();
    format!(
        "Rejected input (`outpost rejected` lists the messages):\n{}",
        crate::display::table(&header, &body)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_summarised_per_source_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = rusqlite::Connection::open(dir.path().join("db")).unwrap();
        crate::store::schema::migrate(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO rejected_reasons VALUES
               ('chirp', 'protobuf', 11, 1000000, 'the payload is Protobuf'),
               ('chirp', 'invalid_json', 2, 3000000, NULL),
               ('ttn', 'made_up', 1, 2000000, NULL);",
        )
        .unwrap();
        let rows = summary(&conn).unwrap();
        let keys: Vec<(&str, &str, i64)> = rows
            .iter()
            .map(|r| (r.source.as_str(), r.reason.as_str(), r.count))
            .collect();
        assert_eq!(
            keys,
            [
                ("chirp", "invalid_json", 2),
                ("chirp", "protobuf", 11),
                ("ttn", "made_up", 1)
            ]
        );
        assert!(rows[1].hint.contains("json = true"));
        let now = crate::model::from_micros(63_000_000);
        let text = render_summary(&rows, now);
        assert!(
            text.contains("chirp   protobuf      11     62s ago  set `json = true`"),
            "{text}"
        );
        assert!(
            text.contains("ttn     made_up       1      61s ago  see `outpost rejected`"),
            "{text}"
        );
        assert_eq!(render_summary(&[], now), "");
    }

    #[test]
    fn status_notes_name_missing_ports_and_offline_slaves() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(
            r#"CREATE TABLE source_state (source TEXT, key TEXT, value TEXT);
            INSERT INTO source_state VALUES
              ('ws', 'state', '{"state":"waiting","path":"/dev/ttyUSB0","since":"T1","error":"No such file"}'),
              ('ws', 'rejected.not_json', '3'),
              ('bus', 'state', '{"state":"open","path":"/dev/ttyUSB1","since":"T0","error":null}'),
              ('bus', 'slave.1', '{"state":"online","device":"m1","since":"T0"}'),
              ('bus', 'slave.9', '{"state":"offline","device":"m9","since":"T2","last_error":"no_answer"}'),
              ('bus', 'slave.10', 'not json'),
              ('lora', 'state', '{"state":"disconnected","broker":"eu1.cloud.thethings.network:8883","since":"T3","error":"I/O: Connection refused"}'),
              ('local', 'state', '{"state":"connected","broker":"127.0.0.1:1883","since":"T4","error":null}');"#,
        )
        .unwrap();
        assert_eq!(
            status_notes(&conn).unwrap(),
            vec![
                "Source bus: Modbus slave 9 (m9) OFFLINE since T2 (no_answer)".to_string(),
                "Source lora: DISCONNECTED from the MQTT broker eu1.cloud.thethings.network:8883 \
                 since T3 (I/O: Connection refused); reconnecting"
                    .to_string(),
                "Source ws: port /dev/ttyUSB0 not available since T1 (No such file); retrying"
                    .to_string(),
            ]
        );
    }
}
