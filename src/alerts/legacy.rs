//! Old entry point, kept only so that callers outside this branch (`pipeline.rs`,
//! `demo.rs`, `tests/alerts.rs`) compile until the merge; it is the only place in
//! `alerts` that reaches up to `config` and `notify`. Delete this file once they start
//! the two tasks themselves, as [`spawn_tasks`] shows.

use super::engine::{engine_task, EventContext, Task};
use crate::clock::Clock;
use crate::store::Store;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The futures that run alerting; the caller spawns them (as pipeline consumers).
pub struct AlertTasks {
    /// Ends when the committed-readings stream ends (after the sources stopped).
    pub engine: Option<Task>,
    /// Ends when the shutdown token is cancelled.
    pub outbox: Option<Task>,
}

/// Builds the engine and the outbox worker for `config` (none when there is nothing to
/// do). Fails on a notifier that cannot be built (e.g. an unreadable CA file).
pub fn spawn_tasks(
    config: &crate::config::Config,
    store: &Store,
    shutdown: CancellationToken,
    clock: Clock,
) -> anyhow::Result<AlertTasks> {
    let wake = Arc::new(tokio::sync::Notify::new());
    let certs = store.certs().clone().saving_to(store.clone());
    let outbox = crate::notify::outbox_task(
        &config.notifiers,
        &config.agent.gateway_id,
        store,
        certs,
        clock.clone(),
        wake.clone(),
        shutdown.clone(),
    )?;
    let context = EventContext {
        site: config.agent.site.clone(),
        gateway_id: config.agent.gateway_id.clone(),
        display: config.display.clone(),
    };
    let ttls = config
        .notifiers
        .iter()
        .map(|n| (n.name.clone(), n.ttl.get()))
        .collect();
    let engine = engine_task(&config.alerts, context, ttls, store, clock, wake, shutdown)?;
    Ok(AlertTasks { engine, outbox })
}
