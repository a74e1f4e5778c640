//! systemd integration: `READY=1` once the store is open and sources started,
//! `WATCHDOG=1` only while the pipeline makes progress, `STOPPING=1` at shutdown.
//!
//! Progress is proven two ways. End to end: every few seconds a no-op write goes
//! through the store writer's queue and commit. Per stage (G9, [`crate::progress`]):
//! a stage with work waiting and no progress for `http.stall_after` is stalled. A
//! failed probe or any stalled stage stops the feed, and systemd restarts the service
//! after `WatchdogSec`.

use crate::clock::Clock;
use crate::run::health::Liveness;
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

/// How often the stages' progress is evaluated (stall log, saved state, watchdog).
pub const EVALUATE_PERIOD: Duration = Duration::from_secs(1);

/// Probes the store, watches every stage's progress and feeds the watchdog until
/// `shutdown`. The watchdog is fed only while the last store probe succeeded and no
/// stage is stalled (G9); each stall is logged once and saved beside the database for
/// `outpost status`.
pub async fn supervise(
    store: Store,
    clock: Clock,
    liveness: Arc<Liveness>,
    stall_after: Duration,
    shutdown: CancellationToken,
) {
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
            "systemd watchdog enabled; feeding it while every stage makes progress."
        );
    }
    let database = store.path().to_path_buf();
    // A file left by a previous run says nothing about this one.
    save_stalls(&database, None).await;
    let probe = tokio::spawn(probe_store(
        store.clone(),
        liveness.clone(),
        period,
        shutdown.clone(),
    ));
    // Decided afresh at every evaluation, so a stall stops the very next feed.
    let mut evaluate = tokio::time::interval(EVALUATE_PERIOD.min(period));
    evaluate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalls = crate::progress::StallLog::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = evaluate.tick() => {}
        }
        let reports = store.progress().evaluate(stall_after);
        if stalls.update(&reports, stall_after) {
            let stalled: Vec<_> = reports.into_iter().filter(|r| r.stalled()).collect();
            let saved = (!stalled.is_empty()).then(|| crate::progress::SavedStalls {
                at: clock.now(),
                pid: std::process::id(),
                stall_after_s: stall_after.as_secs_f64(),
                stalled,
            });
            save_stalls(&database, saved).await;
        }
        // The probe answers within `period`, so its age tells whether it succeeded
        // lately.
        let probe_fresh = liveness
            .store_probe_age()
            .is_some_and(|age| age <= period * 2 + Duration::from_secs(1));
        if watchdog && probe_fresh && !stalls.any() {
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        }
    }
    probe.abort();
    // The agent stops cleanly: nothing is stalled any more.
    save_stalls(&database, None).await;
    notify_stopping();
}

/// Saves (or clears) the stall state off the async threads; never waits long (the
/// disk may be what hangs).
async fn save_stalls(database: &std::path::Path, saved: Option<crate::progress::SavedStalls>) {
    let database = database.to_path_buf();
    let task =
        tokio::task::spawn_blocking(move || crate::progress::save(&database, saved.as_ref()));
    match tokio::time::timeout(Duration::from_secs(2), task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "Cannot save the stall state for outpost status.")
        }
        _ => tracing::warn!("Saving the stall state for outpost status did not finish in time."),
    }
}

/// Every `period`, a no-op write through the store writer's queue and commit: proof
/// end to end that the store takes writes (for `/health` and the watchdog).
async fn probe_store(
    store: Store,
    liveness: Arc<Liveness>,
    period: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match tokio::time::timeout(period, store.write(|_| Ok(()))).await {
            Ok(Ok(())) => {
                liveness.store_ok();
                if failing {
                    failing = false;
                    tracing::warn!("The store writer answers again.");
                }
            }
            Ok(Err(e)) if !failing => {
                failing = true;
                tracing::error!(error = %e, "The store refused a probe write; the watchdog is not fed.");
            }
            Err(_) if !failing => {
                failing = true;
                tracing::error!(
                    "The store writer did not answer in time; the watchdog is not fed."
                );
            }
            _ => {}
        }
    }
}
