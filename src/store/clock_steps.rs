//! What the clock's step watch ([`crate::clock::watch_steps`]) does to the local store
//! (G8): readings stamped while the clock was not synchronised move with each step and
//! are marked corrected once it is, so sync sends them without waiting for
//! `clock_hold_max`; the last step is kept in `source_state` for `outpost status`.
//! Sync's clock hold (`sync.clock_hold_max`) is what the marks serve.
//!
//! Both changes rewrite sealed readings, so each appends, in the same write, a
//! `clock.correction` audit entry naming the exact ids it touched that were already
//! sealed and the shift or the flag set (its `chain` member, [`Correction`]): the
//! verifier replays them to recover the sealed values (G10). Each step is audited too.

use super::audit::{self, AuditEntry, AuditKind};
use super::chain::{self, Correction, Table};
use super::Store;
use crate::clock::{ClockStep, StepStore, StepWindow, STEP_STATE};
use crate::model::flags::{CLOCK_CORRECTED, CLOCK_UNSYNCED};

impl StepStore for Store {
    fn newest_committed(&self) -> i64 {
        *self.committed_watch().borrow()
    }

    async fn move_unsynced(&self, window: StepWindow) {
        let Some(shift) = window.step.num_microseconds() else {
            return;
        };
        let lag = chrono::Duration::milliseconds(500);
        let from = crate::model::to_micros(window.previous_wall - lag);
        let to = crate::model::to_micros(
            window.previous_wall + window.since + chrono::Duration::milliseconds(200),
        );
        let sql = format!(
            "UPDATE readings SET observed_at = observed_at + ?1, received_at = received_at + ?1 \
             WHERE id > ?2 AND synced = 0 AND (flags & {CLOCK_UNSYNCED}) != 0 \
               AND (flags & {CLOCK_CORRECTED}) = 0 \
               AND (id <= ?3 OR received_at BETWEEN ?4 AND ?5) RETURNING id",
        );
        let (first_id, previous_id) = (window.first_id, window.previous_id);
        let clock = self.clock().clone();
        let step_seconds = window.step.num_milliseconds() as f64 / 1000.0;
        let result = self
            .write(move |conn| {
                let ids = updated_ids(
                    conn,
                    &sql,
                    rusqlite::params![shift, first_id, previous_id, from, to],
                )?;
                let correction = Correction {
                    ranges: sealed_ranges(conn, &ids)?,
                    shift,
                    flags_set: 0,
                };
                if !ids.is_empty() {
                    audit_correction(
                        conn,
                        &clock,
                        serde_json::json!({
                            "action": "moved with the clock step",
                            "step_seconds": step_seconds,
                            "readings": ids.len(),
                            "ranges": chain::id_ranges(&ids),
                            "chain": correction,
                        }),
                    )?;
                }
                Ok(ids.len())
            })
            .await;
        match result {
            Ok(n) if n > 0 => {
                tracing::info!(
                    readings = n,
                    "Readings stamped before the clock step were moved with it."
                )
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "Cannot move unsynchronised readings with the clock step.")
            }
        }
    }

    async fn mark_corrected(&self, first_id: i64, newest: i64) {
        let sql = format!(
            "UPDATE readings SET flags = flags | {CLOCK_CORRECTED} \
             WHERE id > ?1 AND id <= ?2 AND synced = 0 AND (flags & {CLOCK_UNSYNCED}) != 0 \
               AND (flags & {CLOCK_CORRECTED}) = 0 RETURNING id",
        );
        let clock = self.clock().clone();
        match self
            .write(move |conn| {
                let ids = updated_ids(conn, &sql, rusqlite::params![first_id, newest])?;
                let correction = Correction {
                    ranges: sealed_ranges(conn, &ids)?,
                    shift: 0,
                    flags_set: CLOCK_CORRECTED as i64,
                };
                if !ids.is_empty() {
                    audit_correction(
                        conn,
                        &clock,
                        serde_json::json!({
                            "action": "marked corrected (the clock is synchronised)",
                            "readings": ids.len(),
                            "ranges": chain::id_ranges(&ids),
                            "chain": correction,
                        }),
                    )?;
                }
                Ok(ids.len())
            })
            .await
        {
            Ok(n) => tracing::info!(
                readings = n,
                "The clock is synchronised; readings stamped before are marked corrected."
            ),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot mark readings corrected after clock synchronisation.")
            }
        }
    }

    async fn save_step(&self, step: &ClockStep) {
        let Ok(json) = serde_json::to_string(step) else {
            return;
        };
        let rows = vec![(STEP_STATE.1.to_string(), json)];
        let entry = AuditEntry::by_process(
            AuditKind::ClockStep,
            serde_json::json!({
                "at": step.at.to_rfc3339(),
                "seconds": step.seconds,
                "direction": if step.seconds < 0.0 { "back" } else { "forward" },
                "description": step.describe(),
            }),
        );
        // Both queued at once: they ride in the same group commit (no added latency
        // before the step shows in `/health`).
        let (saved, audited) = tokio::join!(
            crate::store::state::write_rows(self, STEP_STATE.0, rows),
            self.audit(entry)
        );
        if let Err(e) = saved {
            tracing::debug!(error = %e, "Could not save the clock step.");
        }
        if let Err(e) = audited {
            tracing::debug!(error = %e, "Could not audit the clock step.");
        }
    }
}

/// Runs an `UPDATE … RETURNING id` and returns the ids, sorted.
fn updated_ids(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> rusqlite::Result<Vec<i64>> {
    let mut stmt = conn.prepare(sql)?;
    let mut ids = stmt
        .query_map(params, |r| r.get::<_, i64>(0))?
        .collect::<rusqlite::Result<Vec<i64>>>()?;
    ids.sort_unstable();
    Ok(ids)
}

/// The ranges of `ids` that were already sealed (rows of the group being written are
/// sealed with their corrected values, so no correction applies to them).
fn sealed_ranges(conn: &rusqlite::Connection, ids: &[i64]) -> rusqlite::Result<Vec<(i64, i64)>> {
    let sealed = chain::sealed_up_to(conn, Table::Readings)?;
    let end = ids.partition_point(|&id| id <= sealed);
    Ok(chain::id_ranges(&ids[..end]))
}

fn audit_correction(
    conn: &rusqlite::Connection,
    clock: &crate::clock::Clock,
    details: serde_json::Value,
) -> rusqlite::Result<i64> {
    audit::append(
        conn,
        clock,
        &AuditEntry::by_process(AuditKind::ClockCorrection, details),
    )
}
