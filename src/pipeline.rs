//! Wiring: sources → bounded channel → store writer → committed readings → consumers.
//!
//! Shutdown flows downstream. Cancelling the token stops the sources; when the last
//! source has dropped its sender the writer commits what it holds and ends the
//! committed-readings streams; consumers finish and drop their store handles; the
//! writer closes. Nothing accepted is left uncommitted.

use crate::config::Config;
use crate::health::{HealthProbe, Liveness};
use crate::metrics::Metrics;
use crate::sources::SourceContext;
use crate::store::{Store, StoreOptions};
use anyhow::Context;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long sources get to stop after shutdown before they are aborted. Together with
/// the writer's last commit this keeps the exit well inside systemd's stop timeout.
pub const SOURCE_GRACE: Duration = Duration::from_secs(3);

/// A running pipeline.
pub struct Pipeline {
    pub store: Store,
    pub metrics: Metrics,
    shutdown: CancellationToken,
    sources: JoinSet<()>,
    consumers: JoinSet<()>,
    writer_finished: tokio::sync::oneshot::Receiver<()>,
}

impl Pipeline {
    /// Opens the store and starts every configured source.
    pub fn start(
        config: &Config,
        options: StoreOptions,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Pipeline> {
        let (store, ingest) = Store::open(&config.storage, options).context("opening the store")?;
        let metrics = Metrics::new(&store);
        let mut sources = JoinSet::new();
        for source in config.sources.iter().cloned() {
            let ctx = SourceContext {
                out: ingest.sender.clone(),
                shutdown: shutdown.clone(),
                store: store.clone(),
                metrics: metrics.clone(),
            };
            let name = source.name().to_string();
            let kind = source.kind();
            sources.spawn(async move {
                tracing::info!(source = %name, kind, "Source started.");
                match source.run(ctx).await {
                    Ok(()) => tracing::info!(source = %name, "Source stopped."),
                    Err(e) => {
                        tracing::error!(source = %name, error = format!("{e:#}"), "Source failed.")
                    }
                }
            });
        }
        // The sources hold the only senders now: when they end, the writer drains.
        drop(ingest.sender);
        Ok(Pipeline {
            store,
            metrics,
            shutdown,
            sources,
            consumers: JoinSet::new(),
            writer_finished: ingest.finished,
        })
    }

    /// The shutdown token, for consumers that run on timers rather than on committed
    /// readings (sync, notification delivery): they stop when it is cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Runs a downstream consumer (e.g. something reading committed readings). It must
    /// end by itself once its input ends, and drop its store handles.
    pub fn spawn_consumer(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.consumers.spawn(task);
    }

    /// Waits for shutdown, then stops everything in order.
    pub async fn wait(mut self) {
        self.shutdown.cancelled().await;
        let stopping = async { while self.sources.join_next().await.is_some() {} };
        if tokio::time::timeout(SOURCE_GRACE, stopping).await.is_err() {
            tracing::warn!("Some sources did not stop in time; aborting them.");
            self.sources.abort_all();
            while self.sources.join_next().await.is_some() {}
        }
        drop(self.store);
        drop(self.metrics);
        while self.consumers.join_next().await.is_some() {}
        let _ = self.writer_finished.await;
        tracing::info!("Store closed; everything accepted is committed.");
    }
}

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut pipeline = Pipeline::start(&config, StoreOptions::default(), shutdown.clone())?;
    let liveness = Arc::new(Liveness::default());
    pipeline.spawn_consumer(crate::systemd::supervise(
        pipeline.store.clone(),
        liveness.clone(),
        shutdown.clone(),
    ));
    if config.http.enabled {
        let probe = Arc::new(HealthProbe {
            store: pipeline.store.clone(),
            metrics: pipeline.metrics.clone(),
            liveness,
            sources: config
                .sources
                .iter()
                .map(|s| s.name().to_string())
                .collect(),
            started: std::time::Instant::now(),
            source_max_silence: config.http.source_max_silence.get(),
        });
        pipeline.spawn_consumer(crate::http::run(
            config.http.listen.clone(),
            pipeline.metrics.clone(),
            probe,
            shutdown.clone(),
        ));
    }
    // Downstream consumers (alerts, notifications, sync) are started here with
    // `pipeline.spawn_consumer(...)`.
    crate::systemd::notify_ready();
    tracing::info!(
        gateway = %config.agent.gateway_id,
        sources = config.sources.len(),
        database = %config.storage.path.display(),
        "Outpost is running."
    );
    pipeline.wait().await;
    Ok(())
}
