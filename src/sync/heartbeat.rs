//! The heartbeat: one `outpost.gateways` row per gateway, upserted every sync interval,
//! so operators see which gateways are alive, how far behind they are and why.
//!
//! `last_seen` uses central's clock (a gateway's clock may be wrong, G8); the backlog
//! age is computed on the gateway, from its own clock on both ends.

use super::postgres::Central;
use super::SyncError;
use chrono::{DateTime, Utc};
use tokio_postgres::types::Type;

/// What a gateway reports about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    pub gateway_id: String,
    pub agent_version: String,
    pub site: String,
    pub boot_id: Option<String>,
    pub clock_synchronized: Option<bool>,
    pub backlog_rows: i64,
    pub oldest_unsynced_at: Option<DateTime<Utc>>,
    pub backlog_age_seconds: Option<f64>,
    pub last_sync_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
}

/// The kernel's id of the current boot (changes at every reboot).
pub use crate::store::audit::boot_id;

/// Whether the local clock is synchronised: the same answer the readings' flags and
/// `/health` get ([`crate::clock::is_synchronized`]), so the central row never
/// disagrees with the `CLOCK_UNSYNCED` flags of the readings it describes. Always
/// known (`Some`): "cannot tell" is reported as not synchronised, as on readings.
pub fn clock_synchronized() -> Option<bool> {
    Some(crate::clock::is_synchronized())
}

/// Upserts the gateway's row in one transaction.
pub async fn send(central: &Central, hb: &Heartbeat) -> Result<(), SyncError> {
    let error: Option<String> = hb
        .last_error
        .as_ref()
        .map(|e| e.chars().take(1000).collect());
    central
        .transaction(central.client().execute_typed(
            "INSERT INTO outpost.gateways (gateway_id, agent_version, site, boot_id, clock_synchronized, \
               backlog_rows, oldest_unsynced_at, backlog_age_seconds, last_sync_at, last_error, last_error_at, \
               first_seen, last_seen) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now(), now()) \
             ON CONFLICT (gateway_id) DO UPDATE SET agent_version = EXCLUDED.agent_version, \
               site = EXCLUDED.site, boot_id = EXCLUDED.boot_id, \
               clock_synchronized = EXCLUDED.clock_synchronized, backlog_rows = EXCLUDED.backlog_rows, \
               oldest_unsynced_at = EXCLUDED.oldest_unsynced_at, \
               backlog_age_seconds = EXCLUDED.backlog_age_seconds, \
               last_sync_at = COALESCE(EXCLUDED.last_sync_at, outpost.gateways.last_sync_at), \
               last_error = EXCLUDED.last_error, last_error_at = EXCLUDED.last_error_at, last_seen = now()",
            &[
                (&hb.gateway_id, Type::TEXT),
                (&hb.agent_version, Type::TEXT),
                (&hb.site, Type::TEXT),
                (&hb.boot_id, Type::TEXT),
                (&hb.clock_synchronized, Type::BOOL),
                (&hb.backlog_rows, Type::INT8),
                (&hb.oldest_unsynced_at, Type::TIMESTAMPTZ),
                (&hb.backlog_age_seconds, Type::FLOAT8),
                (&hb.last_sync_at, Type::TIMESTAMPTZ),
                (&error, Type::TEXT),
                (&hb.last_error_at, Type::TIMESTAMPTZ),
            ],
        ))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_id_is_read_on_linux() {
        let id = boot_id().expect("Linux has /proc/sys/kernel/random/boot_id");
        assert_eq!(id.len(), 36, "{id}");
    }

    /// The heartbeat and the readings' flags ask one function: they agree, whatever
    /// this machine's state is (the heartbeat used to ask `adjtimex` first and ignore
    /// `STA_UNSYNC`).
    #[test]
    fn heartbeat_and_readings_agree_on_the_clock_state() {
        for _ in 0..3 {
            let readings_unsynced = !crate::clock::is_synchronized();
            assert_eq!(clock_synchronized(), Some(!readings_unsynced));
        }
    }
}
