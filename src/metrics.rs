//! The in-memory metrics components increment (`/metrics`). Labels stay
//! low-cardinality: source names, reasons, never device ids.
//!
//! This layer counts; it never queries the database, the sync state or the
//! certificates. The gauges read from those at scrape time are collectors of the run
//! layer ([`crate::run::collector`]) registered through [`Metrics::with_collectors`];
//! `/metrics` encodes on the blocking pool because they may touch SQLite.

use crate::store::{Store, StoreStats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub source: String,
    pub reason: String,
}

/// Why a source is disconnected from its broker or device.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectionError {
    pub error: String,
    /// The first failure since the source was last connected.
    pub since: chrono::DateTime<chrono::Utc>,
}

/// Metrics shared by every component; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    readings_received: Family<SourceLabels, Counter>,
    readings_rejected: Family<RejectLabels, Counter>,
    source_connected: Family<SourceLabels, Gauge>,
    /// The same states, readable for `/health` (a `Family` cannot tell "never
    /// reported" from "disconnected").
    connections: std::sync::Mutex<std::collections::HashMap<String, bool>>,
    /// Why each disconnected source is disconnected, and since when (cleared on
    /// connect), for `/health`.
    connection_errors: std::sync::Mutex<std::collections::HashMap<String, ConnectionError>>,
    /// Readings the TTN backfill stored for the first time, by source and reason.
    backfill_recovered: Family<RejectLabels, Counter>,
}

impl Metrics {
    /// Metrics for the agent using `store`. The store's counters are read at scrape
    /// time, so its hot path pays nothing for them.
    pub fn new(store: &Store) -> Metrics {
        Metrics::with_collectors(store, Vec::new())
    }

    /// [`Metrics::new`] plus `collectors` encoded after the counters (the run layer's
    /// database, sync and certificate gauges). Collectors may block: [`Metrics::encode`]
    /// belongs on the blocking pool when any is registered.
    pub fn with_collectors(store: &Store, collectors: Vec<Box<dyn Collector>>) -> Metrics {
        let mut registry = Registry::with_prefix("outpost");
        let readings_received = Family::<SourceLabels, Counter>::default();
        let readings_rejected = Family::<RejectLabels, Counter>::default();
        let source_connected = Family::<SourceLabels, Gauge>::default();
        registry.register(
            "readings_received",
            "Readings decoded by each source (before dedupe)",
            readings_received.clone(),
        );
        registry.register(
            "readings_rejected",
            "Input a source could not use, by reason",
            readings_rejected.clone(),
        );
        registry.register(
            "source_connected",
            "1 when the source is connected to its broker or device, 0 when not",
            source_connected.clone(),
        );
        let backfill_recovered = register_backfill_recovered(&mut registry);
        registry.register(
            "store_commit_duration_seconds",
            "Duration of each group commit (synchronous=FULL)",
            store.stats().commit_latency.clone(),
        );
        registry.register_collector(Box::new(StoreCollector {
            stats: store.stats().clone(),
        }));
        register_progress(&mut registry, store);
        for collector in collectors {
            registry.register_collector(collector);
        }
        Metrics {
            inner: Arc::new(Inner {
                registry,
                readings_received,
                readings_rejected,
                source_connected,
                connections: Default::default(),
                connection_errors: Default::default(),
                backfill_recovered,
            }),
        }
    }

    pub fn received(&self, source: &str, n: u64) {
        self.inner
            .readings_received
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .inc_by(n);
    }

    pub fn rejected(&self, source: &str, reason: &str) {
        self.inner
            .readings_rejected
            .get_or_create(&RejectLabels {
                source: source.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn set_connected(&self, source: &str, connected: bool) {
        self.inner
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(source.to_string(), connected);
        self.inner
            .source_connected
            .get_or_create(&SourceLabels {
                source: source.into(),
            })
            .set(connected as i64);
        if connected {
            self.inner
                .connection_errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(source);
        }
    }

    /// Records why `source` cannot connect; `since` stays at the first failure until
    /// the source connects again. Returns the record.
    pub fn set_connection_error(
        &self,
        source: &str,
        error: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> ConnectionError {
        let mut errors = self
            .inner
            .connection_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = errors
            .entry(source.to_string())
            .or_insert_with(|| ConnectionError {
                error: String::new(),
                since: now,
            });
        entry.error = error.chars().take(500).collect();
        entry.clone()
    }

    /// The last connection error of a source that is not connected.
    pub fn connection_error(&self, source: &str) -> Option<ConnectionError> {
        self.inner
            .connection_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(source)
            .cloned()
    }

    /// `Some(true/false)` once a source has reported its connection state.
    pub fn connected(&self, source: &str) -> Option<bool> {
        let states = self
            .inner
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        states.get(source).copied()
    }

    /// Readings a gap backfill stored that MQTT had not delivered (`reason`: reconnect,
    /// gap, settle or reconcile).
    pub fn backfill_recovered(&self, source: &str, reason: &str, n: u64) {
        self.inner
            .backfill_recovered
            .get_or_create(&RejectLabels {
                source: source.into(),
                reason: reason.into(),
            })
            .inc_by(n);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            tracing::warn!(error = %e, "Encoding metrics failed.");
        }
        out
    }
}

#[derive(Debug)]
struct StoreCollector {
    stats: Arc<StoreStats>,
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let counters = [
            (
                "readings_stored",
                "Readings committed to the local store",
                &s.readings_inserted,
            ),
            (
                "readings_duplicate",
                "Readings whose uid was already stored (redeliveries)",
                &s.readings_duplicate,
            ),
            (
                "readings_invalid",
                "Readings refused by the store (value not a finite number)",
                &s.readings_invalid,
            ),
            ("store_commits", "Group commits", &s.commits),
            (
                "store_commit_failures",
                "Group commits that failed (nothing acknowledged)",
                &s.commit_failures,
            ),
            (
                "store_refused_full",
                "Readings not stored because the disk was full",
                &s.readings_refused_full,
            ),
            (
                "store_pruned_synced",
                "Synced readings deleted by retention or the size cap",
                &s.pruned_synced,
            ),
            (
                "store_pruned_unsynced",
                "UNSYNCED readings deleted by the size cap (data lost)",
                &s.pruned_unsynced,
            ),
        ];
        for (name, help, value) in counters {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value.load(Relaxed)).encode(metric)?;
        }
        let full = encoder.encode_descriptor(
            "store_disk_full",
            "1 while the disk is full",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(s.disk_full.load(Relaxed) as i64).encode(full)?;
        Ok(())
    }
}

/// G9: per stage (`stage="store"`, `"alerts"`, `"outbox"`, `"sync"`,
/// `"source:<name>"`), `stage_stalled` (1 while stalled), `stage_waiting` (work waiting)
/// and `stage_seconds_since_progress`, evaluated at scrape time.
fn register_progress(registry: &mut Registry, store: &Store) {
    registry.register_collector(Box::new(ProgressCollector {
        progress: store.progress().clone(),
    }));
}

#[derive(Debug)]
struct ProgressCollector {
    progress: Arc<crate::progress::Registry>,
}

impl Collector for ProgressCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stages = self.progress.evaluate(self.progress.stall_after());
        if stages.is_empty() {
            return Ok(());
        }
        let mut stalled = encoder.encode_descriptor(
            "stage_stalled",
            "1 while the stage has work waiting and made no progress for http.stall_after",
            None,
            MetricType::Gauge,
        )?;
        for s in &stages {
            ConstGauge::new(s.stalled() as i64)
                .encode(stalled.encode_family(&[("stage", s.stage.as_str())])?)?;
        }
        let mut waiting = encoder.encode_descriptor(
            "stage_waiting",
            "Work waiting for the stage (batches, readings, notifications, rounds)",
            None,
            MetricType::Gauge,
        )?;
        for s in &stages {
            ConstGauge::new(s.waiting as i64)
                .encode(waiting.encode_family(&[("stage", s.stage.as_str())])?)?;
        }
        let mut age = encoder.encode_descriptor(
            "stage_seconds_since_progress",
            "Seconds since the stage last made progress (-1: none since the agent started)",
            None,
            MetricType::Gauge,
        )?;
        for s in &stages {
            ConstGauge::new(s.since_progress_s.unwrap_or(-1.0))
                .encode(age.encode_family(&[("stage", s.stage.as_str())])?)?;
        }
        Ok(())
    }
}

/// `outpost_backfill_recovered_total{source, reason}`.
fn register_backfill_recovered(registry: &mut Registry) -> Family<RejectLabels, Counter> {
    let family = Family::<RejectLabels, Counter>::default();
    registry.register(
        "backfill_recovered",
        "Readings the Storage Integration backfill stored that MQTT had not delivered, by reason (reconnect, gap, settle, reconcile); reconcile counts uplinks dropped while connected",
        family.clone(),
    );
    family
}
