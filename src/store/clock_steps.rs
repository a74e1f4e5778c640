//! What the clock's step watch ([`crate::clock::watch_steps`]) does to the local store
//! (G8): readings stamped while the clock was not synchronised move with each step and
//! are marked corrected once it is, so sync sends them without waiting for
//! `clock_hold_max`; the last step is kept in `source_state` for `outpost status`.
//! Sync's clock hold (`sync.clock_hold_max`) is what the marks serve.

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
               AND (id <= ?3 OR received_at BETWEEN ?4 AND ?5)",
        );
        let (first_id, previous_id) = (window.first_id, window.previous_id);
        let result = self
            .write(move |conn| {
                conn.execute(
                    &sql,
                    rusqlite::params![shift, first_id, previous_id, from, to],
                )
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
             WHERE id > ?1 AND id <= ?2 AND synced = 0 AND (flags & {CLOCK_UNSYNCED}) != 0",
        );
        match self
            .write(move |conn| conn.execute(&sql, rusqlite::params![first_id, newest]))
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
        if let Err(e) = crate::store::state::write_rows(self, STEP_STATE.0, rows).await {
            tracing::debug!(error = %e, "Could not save the clock step.");
        }
    }
}
