//! systemd integration: `READY=1` once the store is open and sources started,
//! `WATCHDOG=1` only while the pipeline makes progress, `STOPPING=1` at shutdown.
//!
//! Progress is proven end to end: every few seconds a no-op write goes through the
//! store writer's queue and commit. A stuck writer (a hung fsync, a deadlock) stops
//! the feed, and systemd restarts the service after `WatchdogSec`.

use crate::health::Liveness;
use crate::store::Store;
use sd_notify::NotifyState;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The store probe's period when systemd's watchdog is off (it still feeds `/health`).
pub const PROBE_PERIOD: Duration = Duration::from_secs(5);

pub fn notify_ready() {
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
}

pub fn notify_stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

/// Probes the store and feeds the watchdog until `shutdown`.
pub async fn supervise(store: Store, liveness: Arc<Liveness>, shutdown: CancellationToken) {
    let mut usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut usec) && usec > 0;
    // systemd recommends feeding at half the interval.
    let period = if watchdog {
        PROBE_PERIOD.min(Duration::from_micros(usec) / 2)
    } else {
        PROBE_PERIOD
    };
    if watchdog {
        tracing::info!(
            interval_ms = usec / 1000,
            "systemd watchdog enabled; feeding it while the store makes progress."
        );
    }
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match tokio::time::timeout(period, store.write(|_| Ok(()))).await {
            Ok(Ok(())) => {
                liveness.store_ok();
                if watchdog {
                    let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
                }
                if stalled {
                    stalled = false;
                    tracing::warn!("The store writer answers again.");
                }
            }
            Ok(Err(e)) if !stalled => {
                stalled = true;
                tracing::error!(error = %e, "The store refused a probe write; the watchdog is not fed.");
            }
            Err(_) if !stalled => {
                stalled = true;
                tracing::error!(
                    "The store writer did not answer in time; the watchdog is not fed."
                );
            }
            _ => {}
        }
    }
    notify_stopping();
}
