//! Wiring: sources → bounded channel → store writer → committed readings → consumers.
//!
//! Shutdown flows downstream. Cancelling the token stops the sources; when the last
//! source has dropped its sender the writer commits what it holds and ends the
//! committed-readings streams; consumers finish and drop their store handles; the
//! writer closes. Nothing accepted is left uncommitted.
//!
//! The pipeline owns the agent's one certificate watch and its one clock and hands
//! them to every component it starts; no component finds them on its own.

use crate::backoff::{Backoff, Jitter};
use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::Batch;
use crate::run::health::{HealthProbe, Liveness};
use crate::sources::{SourceConfig, SourceContext};
use crate::store::{Store, StoreOptions};
use crate::tls::CertWatch;
use anyhow::Context;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// How long sources get to stop after shutdown before they are aborted. Together with
/// the writer's last commit this keeps the exit well inside systemd's stop timeout.
pub const SOURCE_GRACE: Duration = Duration::from_secs(3);

/// A running pipeline.
pub struct Pipeline {
    pub store: Store,
    pub metrics: Metrics,
    /// The certificates' expiry, configured and presented: `/metrics`, `/health`,
    /// the log.
    pub certs: CertWatch,
    /// The agent's wall clock, injected into everything that stamps or ages.
    pub clock: Clock,
    shutdown: CancellationToken,
    /// Kept so sources can be started on reload; dropped at shutdown so the writer
    /// drains.
    ingest: Option<mpsc::Sender<Batch>>,
    sources: HashMap<String, RunningSource>,
    consumers: JoinSet<()>,
    /// Consumers a reload may restart with new settings (sync, alerts), by name.
    named: HashMap<&'static str, (CancellationToken, JoinHandle<()>)>,
    writer_finished: tokio::sync::oneshot::Receiver<()>,
    writer_close: CancellationToken,
    /// `agent.gateway_id`, for sources (default MQTT client ids).
    gateway_id: String,
    /// `[[devices]] calibration_due`, for `/health` and `/metrics` (updated on reload).
    pub calibrations: crate::run::reports::Calibrations,
}

/// How long consumers get to finish once the readings have stopped.
pub const CONSUMER_GRACE: Duration = Duration::from_secs(3);

struct RunningSource {
    config: SourceConfig,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// What a reload changed, for the log and for tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SourceChanges {
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    pub restarted: Vec<String>,
}

impl Pipeline {
    /// Opens the store and starts every configured source.
    pub fn start(
        config: &Config,
        mut options: StoreOptions,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Pipeline> {
        let clock = options.clock.get_or_insert_with(Clock::system).clone();
        let (store, ingest) = Store::open(&config.storage, options).context("opening the store")?;
        // One watch for the agent: every connecting component records what its server
        // presents here, and it saves that for `outpost status`.
        let certs = crate::tls::CertWatch::default()
            .saving_to(store.clone())
            .with_clock(clock.clone());
        let calibrations = crate::run::reports::Calibrations::default();
        calibrations.set(config);
        let metrics = crate::run::collector::metrics(&store, &certs, &clock, &calibrations);
        let mut pipeline = Pipeline {
            store,
            metrics,
            certs,
            clock,
            shutdown,
            ingest: Some(ingest.sender),
            sources: HashMap::new(),
            consumers: JoinSet::new(),
            named: HashMap::new(),
            writer_finished: ingest.finished,
            writer_close: ingest.close,
            gateway_id: config.agent.gateway_id.clone(),
            calibrations,
        };
        for source in &config.sources {
            pipeline.start_source(source.clone());
        }
        // Signs the chain's head every minute and at the stop (G10).
        pipeline.spawn_consumer(crate::store::signing::sign_periodically(
            pipeline.store.clone(),
            pipeline.shutdown.clone(),
        ));
        Ok(pipeline)
    }

    fn start_source(&mut self, source: SourceConfig) {
        let Some(out) = self.ingest.clone() else {
            return;
        };
        let stop = self.shutdown.child_token();
        let ctx = SourceContext {
            out,
            shutdown: stop.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            gateway_id: self.gateway_id.clone(),
            clock: self.clock.clone(),
            certs: self.certs.clone(),
        };
        let name = source.name().to_string();
        // Nobody waits for a TTN reading's commit: it may wait `storage.ttn_commit_delay`.
        let lazy = matches!(source, SourceConfig::Ttn(_)).then(|| self.store.ttn_commit_delay());
        self.store.set_commit_delay(&name, lazy);
        let task = tokio::spawn(supervise_source(source.clone(), ctx));
        self.sources.insert(
            name,
            RunningSource {
                config: source,
                stop,
                task,
            },
        );
    }

    /// Stops one source and waits for it (its last batches are committed as usual).
    async fn stop_source(&mut self, name: &str) {
        if let Some(running) = self.sources.remove(name) {
            running.stop.cancel();
            let abort = running.task.abort_handle();
            if tokio::time::timeout(SOURCE_GRACE, running.task)
                .await
                .is_err()
            {
                tracing::warn!(source = %name, "The source did not stop in time; aborting it.");
                abort.abort();
            }
        }
    }

    /// Brings the running sources in line with `wanted`: sources that disappeared are
    /// stopped, new ones started, changed ones restarted; unchanged ones are not
    /// touched. Readings already handed to the store are committed either way.
    pub async fn apply_sources(&mut self, wanted: &[SourceConfig]) -> SourceChanges {
        let mut changes = SourceChanges::default();
        let names: Vec<String> = self.sources.keys().cloned().collect();
        for name in names {
            match wanted.iter().find(|s| s.name() == name) {
                None => {
                    self.stop_source(&name).await;
                    changes.stopped.push(name);
                }
                Some(new) if self.sources.get(&name).is_some_and(|r| &r.config != new) => {
                    self.stop_source(&name).await;
                    self.start_source(new.clone());
                    changes.restarted.push(name);
                }
                Some(_) => {}
            }
        }
        for source in wanted {
            if !self.sources.contains_key(source.name()) {
                self.start_source(source.clone());
                changes.started.push(source.name().to_string());
            }
        }
        changes
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

    /// Starts (or, after stopping the running one, restarts) the consumer `name`. `task`
    /// gets its own stop token, cancelled on shutdown or when it is replaced. `None`
    /// just stops it.
    pub async fn replace_consumer<F, Fut>(&mut self, name: &'static str, task: Option<F>)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if let Some((stop, handle)) = self.named.remove(name) {
            stop.cancel();
            let abort = handle.abort_handle();
            if tokio::time::timeout(CONSUMER_GRACE, handle).await.is_err() {
                tracing::warn!(consumer = name, "Did not stop in time; aborting it.");
                abort.abort();
            }
        }
        if let Some(task) = task {
            let stop = self.shutdown.child_token();
            let handle = tokio::spawn(task(stop.clone()));
            self.named.insert(name, (stop, handle));
        }
    }

    /// Waits for shutdown, then stops everything in order.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.stop().await;
    }

    /// Stops sources, lets the writer drain, waits for consumers and the writer.
    async fn stop(mut self) {
        self.shutdown.cancel();
        let names: Vec<String> = self.sources.keys().cloned().collect();
        let tasks: Vec<JoinHandle<()>> = self.sources.drain().map(|(_, r)| r.task).collect();
        let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
        if tokio::time::timeout(SOURCE_GRACE, futures_util::future::join_all(tasks))
            .await
            .is_err()
        {
            tracing::warn!(sources = ?names, "Some sources did not stop in time; they were aborted.");
            aborts.iter().for_each(|a| a.abort());
        }
        drop(self.ingest.take());
        drop(self.store);
        drop(self.metrics);
        for (_, (_, handle)) in self.named.drain() {
            self.consumers.spawn(async move {
                let _ = handle.await;
            });
        }
        let consumers = async { while self.consumers.join_next().await.is_some() {} };
        if tokio::time::timeout(CONSUMER_GRACE, consumers)
            .await
            .is_err()
        {
            tracing::warn!("Some consumers did not finish in time; aborting them.");
            self.consumers.abort_all();
            while self.consumers.join_next().await.is_some() {}
        }
        // Close the writer even if a store handle is still held somewhere.
        self.writer_close.cancel();
        let _ = self.writer_finished.await;
        tracing::info!("Store closed; everything accepted is committed.");
    }
}

/// Runs a source; if it fails (sources retry their own I/O, so this is unexpected),
/// restarts it with backoff rather than leaving the site unmonitored.
async fn supervise_source(source: SourceConfig, ctx: SourceContext) {
    let name = source.name().to_string();
    let kind = source.kind();
    // Registered while the source runs (G9).
    let stage = ctx.stage(&name);
    let mut backoff =
        Backoff::new(Duration::from_secs(1), Duration::from_secs(60)).with_jitter(Jitter::None);
    loop {
        // Work counted by a run that failed is not waiting any more.
        stage.set_waiting(0);
        tracing::info!(source = %name, kind, "Source started.");
        match source.clone().run(ctx.clone()).await {
            Ok(()) => {
                tracing::info!(source = %name, "Source stopped.");
                return;
            }
            Err(e) => {
                tracing::error!(source = %name, error = format!("{e:#}"), retry_in_s = backoff.ceiling().as_secs(), "Source failed; restarting it.");
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Runs the agent until `shutdown` is cancelled. Each message on `reload` (SIGHUP)
/// re-reads the configuration at `path`: a valid one is applied, an invalid one is
/// logged with all its errors and the running configuration stays in effect.
pub async fn run(
    path: std::path::PathBuf,
    config: Config,
    shutdown: CancellationToken,
    mut reload: mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    let mut config = config;
    // Learn the clock state from systemd-timedated (D-Bus) before sources stamp readings.
    let timedated = tokio::task::spawn_blocking(|| {
        crate::clock::timedated().wait_first(std::time::Duration::from_secs(2))
    })
    .await
    .ok()
    .flatten();
    tracing::info!(
        synchronized = crate::clock::is_synchronized(),
        timedated = ?timedated,
        "Clock synchronisation state (timesyncd flag, else systemd-timedated's NTPSynchronized, else adjtimex)."
    );
    let mut pipeline = Pipeline::start(&config, StoreOptions::default(), shutdown.clone())?;
    let liveness = Arc::new(Liveness::default());
    pipeline
        .store
        .progress()
        .set_stall_after(config.http.stall_after.get());
    pipeline.spawn_consumer(crate::run::systemd::supervise(
        pipeline.store.clone(),
        pipeline.clock.clone(),
        liveness.clone(),
        config.http.stall_after.get(),
        shutdown.clone(),
    ));
    pipeline.spawn_consumer(crate::clock::watch_steps(
        pipeline.store.clone(),
        shutdown.clone(),
    ));
    let probe = Arc::new(HealthProbe {
        store: pipeline.store.clone(),
        metrics: pipeline.metrics.clone(),
        certs: pipeline.certs.clone(),
        clock: pipeline.clock.clone(),
        liveness,
        sources: std::sync::Mutex::new(
            config
                .sources
                .iter()
                .map(|s| s.name().to_string())
                .collect(),
        ),
        started: std::time::Instant::now(),
        source_max_silence: config.http.source_max_silence.get(),
        stall_after: config.http.stall_after.get(),
        sync_enabled: sync_enabled(&config).into(),
        calibrations: pipeline.calibrations.clone(),
    });
    let console = Arc::new(crate::run::console::Console::new(
        &config,
        path.clone(),
        pipeline.store.clone(),
        pipeline.clock.clone(),
        probe.clone(),
    ));
    if config.http.enabled {
        pipeline.spawn_consumer(crate::run::http::run(
            config.http.listen.clone(),
            pipeline.metrics.clone(),
            probe.clone(),
            console.clone(),
            shutdown.clone(),
        ));
    }
    let certs = pipeline.certs.clone();
    let endpoints = config.tls_endpoints();
    crate::tls::record_and_log(&certs, &endpoints, pipeline.clock.now());
    crate::tls::forget_removed_servers(&certs, &endpoints, &pipeline.store).await;
    pipeline.spawn_consumer(crate::tls::remind_daily(certs, shutdown.clone()));
    // Downstream consumers that a reload may restart are named.
    start_alerts(&mut pipeline, &config).await;
    start_sync(&mut pipeline, config.sync.clone(), config.agent.clone()).await;
    start_reports(&mut pipeline, &config).await;
    crate::run::audit::record_start(&pipeline.store, &path).await;
    crate::run::systemd::notify_ready();
    tracing::info!(
        gateway = %config.agent.gateway_id,
        sources = config.sources.len(),
        database = %config.storage.path.display(),
        "Outpost is running."
    );
    tokio::spawn(unmap_startup_pages(shutdown.clone()));
    let store = pipeline.store.clone();
    let mut damaged = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            reason = store.damaged() => {
                damaged = Some(reason);
                shutdown.cancel();
                break;
            }
            Some(()) = reload.recv() => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                apply_reload(&mut pipeline, &path, &mut config, &probe).await;
                console.set_config(&config);
                crate::run::systemd::notify_ready();
            }
        }
    }
    drop(store);
    pipeline.wait().await;
    match damaged {
        Some(reason) => Err(anyhow::anyhow!(
            "the database {} is damaged ({reason}); the next start moves it aside",
            config.storage.path.display()
        )),
        None => Ok(()),
    }
}

/// Once the agent has settled, unmaps the code and read-only data only start-up touched
/// ([`crate::run::memory`]).
async fn unmap_startup_pages(shutdown: CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(STARTUP_SETTLES) => {}
    }
    if let Ok(done) = tokio::task::spawn_blocking(crate::run::memory::unmap_startup_pages).await {
        tracing::debug!(
            ranges = done.ranges,
            bytes = done.bytes,
            "Start-up pages unmapped."
        );
    }
}

/// How long after "Outpost is running." the start-up pages are unmapped: the sources
/// have connected and stored their first readings. A second pass after the first minute
/// was measured and freed nothing lasting (docs/benchmarks.md, "Session 13").
const STARTUP_SETTLES: Duration = Duration::from_secs(3);

/// Starts or restarts the alert engine and the notification outbox for `config`.
async fn start_alerts(pipeline: &mut Pipeline, config: &Config) {
    if config.alerts.is_empty() && config.notifiers.is_empty() {
        pipeline
            .replace_consumer(
                "alerts",
                None::<fn(CancellationToken) -> std::future::Ready<()>>,
            )
            .await;
        return;
    }
    let (config, store) = (config.clone(), pipeline.store.clone());
    let (clock, certs) = (pipeline.clock.clone(), pipeline.certs.clone());
    pipeline
        .replace_consumer(
            "alerts",
            Some(move |stop: CancellationToken| async move {
                match super::alerting::spawn_tasks(&config, &store, certs, stop, clock) {
                    Ok(tasks) => {
                        let all = [tasks.engine, tasks.outbox].into_iter().flatten();
                        futures_util::future::join_all(all).await;
                    }
                    Err(e) => {
                        tracing::error!(
                            error = format!("{e:#}"),
                            "Cannot start alerting: ALERTS ARE NOT EVALUATED."
                        )
                    }
                }
            }),
        )
        .await;
}

/// Starts or restarts the daily summaries, morning reports and calibration reminders.
async fn start_reports(pipeline: &mut Pipeline, config: &Config) {
    pipeline.calibrations.set(config);
    let (config, store) = (config.clone(), pipeline.store.clone());
    let (clock, certs) = (pipeline.clock.clone(), pipeline.certs.clone());
    pipeline
        .replace_consumer(
            "reports",
            Some(move |stop: CancellationToken| {
                super::reports::run(config, store, clock, certs, stop)
            }),
        )
        .await;
}

/// Starts, restarts or stops the central sync worker for `config`.
async fn start_sync(
    pipeline: &mut Pipeline,
    sync: Option<crate::sync::SyncConfig>,
    agent: crate::config::AgentConfig,
) {
    let sync = sync.filter(|s| s.enabled);
    let context = crate::sync::SyncContext {
        gateway: agent.into(),
        store: pipeline.store.clone(),
        certs: pipeline.certs.clone(),
        clock: pipeline.clock.clone(),
    };
    pipeline
        .replace_consumer(
            "sync",
            sync.map(|sync| {
                move |stop| crate::sync::run_in(sync, context, stop, std::sync::Arc::new(|_| {}))
            }),
        )
        .await;
}

fn sync_enabled(config: &Config) -> bool {
    config.sync.as_ref().is_some_and(|s| s.enabled)
}

async fn apply_reload(
    pipeline: &mut Pipeline,
    path: &std::path::Path,
    current: &mut Config,
    probe: &HealthProbe,
) {
    let new = match Config::load(path) {
        Ok(new) => new,
        Err(errors) => {
            crate::run::audit::record_reload(&pipeline.store, path, Err(&errors)).await;
            for e in &errors.0 {
                tracing::error!(problem = %e, "Rejected configuration.");
            }
            tracing::error!(
                problems = errors.0.len(),
                "The new configuration is invalid; the running one stays in effect."
            );
            return;
        }
    };
    for (section, changed) in [
        ("storage", new.storage != current.storage),
        ("http", new.http != current.http),
        ("log", new.log != current.log),
        ("agent", new.agent != current.agent),
    ] {
        if changed {
            tracing::warn!(
                section,
                "This section changed; it takes effect at the next restart."
            );
        }
    }
    crate::run::audit::record_reload(&pipeline.store, path, Ok((current, &new))).await;
    let changes = pipeline.apply_sources(&new.sources).await;
    if new.sync != current.sync {
        // The running [agent] section stays: it changes only at restart.
        start_sync(pipeline, new.sync.clone(), current.agent.clone()).await;
        tracing::info!("Central sync restarted with the new settings.");
    }
    if new.alerts != current.alerts || new.notifiers != current.notifiers {
        // Rule state is keyed by the rule's definition: unchanged rules keep theirs.
        let mut running = new.clone();
        running.agent = current.agent.clone();
        start_alerts(pipeline, &running).await;
        tracing::info!("Alert rules and notifiers reloaded.");
    }
    if new.devices != current.devices
        || new.reports != current.reports
        || new.alerts != current.alerts
        || new.notifiers != current.notifiers
    {
        let mut running = new.clone();
        running.agent = current.agent.clone();
        running.storage = current.storage.clone();
        start_reports(pipeline, &running).await;
    }
    let endpoints = new.tls_endpoints();
    crate::tls::record_and_log(&pipeline.certs, &endpoints, pipeline.clock.now());
    crate::tls::forget_removed_servers(&pipeline.certs, &endpoints, &pipeline.store).await;
    probe
        .sync_enabled
        .store(sync_enabled(&new), std::sync::atomic::Ordering::Relaxed);
    if let Ok(mut names) = probe.sources.lock() {
        *names = new.sources.iter().map(|s| s.name().to_string()).collect();
    }
    tracing::info!(
        started = ?changes.started,
        stopped = ?changes.stopped,
        restarted = ?changes.restarted,
        "Configuration reloaded."
    );
    // Sections that need a restart keep their running values.
    let running = std::mem::replace(current, new);
    current.storage = running.storage;
    current.http = running.http;
    current.log = running.log;
    current.agent = running.agent;
}
