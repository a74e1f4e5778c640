//! `source_state`: a small key-value table of `(owner, key) → value` rows that
//! components keep across restarts and that `outpost status` reads without the
//! agent's help — a source's counters and port state, the clock's steps (`@clock`),
//! certificates servers presented (`@tls`), the backfill's position.
//!
//! Owners are source names or `@`-prefixed pseudo-owners; this module gives no key a
//! meaning.

use super::{Store, StoreError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Writes `source_state` rows in the background, one write at a time, so a source
/// never waits for a commit to publish its state. Rows put while a write runs are
/// merged (the newest value per key wins) and written right after it.
pub struct StateWriter {
    source: String,
    store: Store,
    shared: Arc<Mutex<PendingRows>>,
}

#[derive(Default)]
struct PendingRows {
    rows: BTreeMap<String, String>,
    writing: bool,
}

impl StateWriter {
    pub fn new(source: &str, store: Store) -> StateWriter {
        StateWriter {
            source: source.to_string(),
            store,
            shared: Arc::default(),
        }
    }

    /// Queues `rows` and starts a background write unless one is running.
    pub fn put(&mut self, rows: Vec<(String, String)>) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.rows.extend(rows);
        if shared.writing || shared.rows.is_empty() {
            return;
        }
        shared.writing = true;
        let (store, source, pending) =
            (self.store.clone(), self.source.clone(), self.shared.clone());
        tokio::spawn(async move {
            loop {
                let rows: Vec<(String, String)> = {
                    let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
                    if p.rows.is_empty() {
                        p.writing = false;
                        return;
                    }
                    std::mem::take(&mut p.rows).into_iter().collect()
                };
                if let Err(e) = write_rows(&store, &source, rows).await {
                    tracing::debug!(source = %source, error = %e, "Could not save the source state.");
                }
            }
        });
    }

    /// Writes everything queued plus `rows` and waits for the commit (at shutdown).
    pub async fn flush(&mut self, rows: Vec<(String, String)>) {
        let all: Vec<(String, String)> = {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            shared.rows.extend(rows);
            std::mem::take(&mut shared.rows).into_iter().collect()
        };
        if !all.is_empty() {
            if let Err(e) = write_rows(&self.store, &self.source, all).await {
                tracing::debug!(source = %self.source, error = %e, "Could not save the source state.");
            }
        }
    }
}

/// Upserts `(key, value)` rows of `source` in `source_state`.
pub async fn write_rows(
    store: &Store,
    source: &str,
    rows: Vec<(String, String)>,
) -> Result<(), StoreError> {
    let source = source.to_string();
    store
        .write(move |conn| {
            let mut stmt = conn.prepare_cached(
                "INSERT INTO source_state(source, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT(source, key) DO UPDATE SET value = excluded.value",
            )?;
            for (key, value) in &rows {
                stmt.execute(rusqlite::params![source, key, value])?;
            }
            Ok(())
        })
        .await
}

/// Reads one `source_state` value (blocking; call from `spawn_blocking`).
pub fn read_state(
    conn: &rusqlite::Connection,
    source: &str,
    key: &str,
) -> rusqlite::Result<Option<String>> {
    use rusqlite::OptionalExtension;
    conn.query_row(
        "SELECT value FROM source_state WHERE source = ?1 AND key = ?2",
        rusqlite::params![source, key],
        |r| r.get(0),
    )
    .optional()
}
