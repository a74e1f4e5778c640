//! The `/metrics` gauges read at scrape time from outside the in-memory counters: the
//! unsynced backlog, alert states, the notification outbox and the last sync round
//! (SQLite), and the certificates' expiry (the certificate watch).
//!
//! They are [`Collector`]s registered on [`Metrics`] by [`metrics`]. Reading SQLite
//! blocks, so `/metrics` encodes on the blocking pool ([`encode`]), never on one of
//! the runtime's two workers.

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::tls::CertWatch;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// The agent's metrics: the in-memory counters plus the database and certificate
/// gauges of this module.
pub fn metrics(
    store: &Store,
    certs: &CertWatch,
    clock: &Clock,
    calibrations: &crate::run::reports::Calibrations,
) -> Metrics {
    Metrics::with_collectors(
        store,
        vec![
            Box::new(DatabaseCollector {
                store: store.clone(),
                clock: clock.clone(),
            }),
            Box::new(CertCollector {
                certs: certs.clone(),
                clock: clock.clone(),
            }),
            Box::new(CalibrationCollector {
                calibrations: calibrations.clone(),
                clock: clock.clone(),
            }),
        ],
    )
}

/// The Prometheus text exposition, encoded on the blocking pool (the collectors read
/// SQLite).
pub async fn encode(metrics: &Metrics) -> String {
    let metrics = metrics.clone();
    match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(text) => text,
        Err(e) => {
            tracing::warn!(error = %e, "Encoding metrics failed.");
            String::new()
        }
    }
}

/// `backlog_rows`, `backlog_oldest_age_seconds`, and the gauges of [`encode_db_gauges`].
#[derive(Debug)]
struct DatabaseCollector {
    store: Store,
    clock: Clock,
}

impl Collector for DatabaseCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(conn) = self.store.reader() else {
            return Ok(());
        };
        if let Ok(report) = crate::store::backlog(&conn) {
            let rows = encoder.encode_descriptor(
                "backlog_rows",
                "Readings not yet in central",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(report.rows).encode(rows)?;
            let age = report
                .oldest_received_at
                .map(|t| (self.clock.now() - t).num_milliseconds().max(0) as f64 / 1000.0)
                .unwrap_or(0.0);
            let oldest = encoder.encode_descriptor(
                "backlog_oldest_age_seconds",
                "Age of the oldest reading not yet in central (0 when none)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(age).encode(oldest)?;
        }
        encode_db_gauges(&conn, &mut encoder)
    }
}

/// `tls_certificate_expiry_days{certificate="sync.ca_file"}`, computed at scrape time.
#[derive(Debug)]
struct CertCollector {
    certs: CertWatch,
    clock: Clock,
}

impl Collector for CertCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let certs = self.certs.snapshot();
        if certs.is_empty() {
            return Ok(());
        }
        let now = self.clock.now();
        let mut family = encoder.encode_descriptor(
            "tls_certificate_expiry_days",
            "Days until the first certificate in each configured certificate file expires (negative: expired)",
            None,
            MetricType::Gauge,
        )?;
        for (label, info) in certs {
            ConstGauge::new(info.days_left(now))
                .encode(family.encode_family(&[("certificate", label.as_str())])?)?;
        }
        Ok(())
    }
}

/// `device_calibration_due_days{device="fridge-1"}`: days until each listed device's
/// calibration is due (negative: overdue), in local days of `agent.timezone`.
#[derive(Debug)]
struct CalibrationCollector {
    calibrations: crate::run::reports::Calibrations,
    clock: Clock,
}

impl Collector for CalibrationCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all = self.calibrations.all(self.clock.now());
        if all.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "device_calibration_due_days",
            "Days until each device's calibration is due (negative: overdue), from [[devices]] calibration_due",
            None,
            MetricType::Gauge,
        )?;
        for c in all {
            ConstGauge::new(c.days_left)
                .encode(family.encode_family(&[("device", c.device.as_str())])?)?;
        }
        Ok(())
    }
}

/// Gauges read from the database at scrape time: alert states, the notification
/// outbox and the last sync round. Tables a build does not have are skipped.
fn encode_db_gauges(
    conn: &rusqlite::Connection,
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let counts = |sql: &str| -> Vec<(String, i64)> {
        conn.prepare(sql)
            .and_then(|mut stmt| {
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .unwrap_or_default()
    };
    let families = [
        (
            "alerts",
            "Alert series by state (pending, firing)",
            ["pending", "firing"].as_slice(),
            counts("SELECT state, COUNT(*) FROM alert_state GROUP BY state"),
        ),
        (
            "notifications",
            "Notifications in the outbox by state (expired and failed need a person)",
            ["pending", "delivered", "failed", "expired"].as_slice(),
            counts("SELECT state, COUNT(*) FROM outbox GROUP BY state"),
        ),
    ];
    for (name, help, states, rows) in families {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for state in states {
            let n = rows
                .iter()
                .find(|(s, _)| s == state)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            ConstGauge::new(n).encode(family.encode_family(&[("state", *state)])?)?;
        }
    }
    if let Ok(sync) = crate::sync::local::read_state(conn) {
        for (name, help, at) in [
            (
                "sync_last_success_timestamp_seconds",
                "When central last committed a sync round (0: never)",
                sync.last_sync_at,
            ),
            (
                "sync_last_error_timestamp_seconds",
                "When a sync round last failed (0: never)",
                sync.last_error_at,
            ),
        ] {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(
                at.map(|t| t.timestamp_millis() as f64 / 1000.0)
                    .unwrap_or(0.0),
            )
            .encode(metric)?;
        }
    }
    Ok(())
}
