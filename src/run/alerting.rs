//! Alerting as the pipeline runs it: the rule engine and the notification outbox,
//! sharing one wake-up (the engine wakes the outbox when it queued a notification).
//! Wired here, above `alerts` and `notify`, so neither imports the other.

use crate::alerts::engine::{engine_task, EventContext, Task, Urgency};
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
    certs: crate::tls::CertWatch,
    shutdown: CancellationToken,
    clock: Clock,
) -> anyhow::Result<AlertTasks> {
    let wake = Arc::new(tokio::sync::Notify::new());
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
    // The writer commits readings that may change an alert at once (the engine's
    // event then follows in the next commit), while the engine runs.
    let urgency = Urgency::from_config(&config.alerts)?;
    let engine = engine_task(
        &config.alerts,
        context,
        ttls,
        store,
        clock,
        wake,
        shutdown,
        urgency,
    )?;
    Ok(AlertTasks { engine, outbox })
}
