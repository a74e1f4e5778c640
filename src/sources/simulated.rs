//! Simulated sensors: deterministic readings for the demo and tests.
//!
//! Each metric follows `base + amplitude · sin(2π t / cycle)` plus noise from a seeded
//! hash, so the same seed and tick give the same value. An optional excursion adds an
//! offset to one device's metric for a while (a freezer door left open), which is what
//! makes the demo's alert fire and resolve.

use super::{SourceContext, SourceKind};
use crate::model::{Batch, Reading, Uid};
use crate::settings::{check_identifier, HumanDuration, Problems};
use crate::store::StoreError;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimulatedConfig {
    /// A unique name for this source (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// Device ids to simulate.
    #[serde(default = "default_devices")]
    pub devices: Vec<String>,
    /// What each device measures.
    #[serde(default = "default_metrics")]
    pub metrics: Vec<SimulatedMetric>,
    /// Time between readings of each device (at least 10ms).
    #[serde(default = "default_period")]
    pub period: HumanDuration,
    /// Seed for the noise; the same seed gives the same values.
    #[serde(default)]
    pub seed: u64,
    /// An optional excursion, e.g. a freezer warming up.
    #[serde(default)]
    pub excursion: Option<Excursion>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimulatedMetric {
    pub name: String,
    #[serde(default)]
    pub unit: Option<String>,
    /// The middle value.
    #[serde(default)]
    pub base: f64,
    /// Swing of the slow sine wave around `base`.
    #[serde(default)]
    pub amplitude: f64,
    /// Period of the sine wave.
    #[serde(default = "default_cycle")]
    pub cycle: HumanDuration,
    /// Peak of the uniform noise added to each reading.
    #[serde(default)]
    pub noise: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Excursion {
    pub device: String,
    pub metric: String,
    /// When it starts, counted from the source's start.
    pub after: HumanDuration,
    /// How long it lasts.
    pub duration: HumanDuration,
    /// What it adds to the value.
    pub offset: f64,
}

fn default_devices() -> Vec<String> {
    vec!["sim-1".into()]
}
fn default_metrics() -> Vec<SimulatedMetric> {
    vec![SimulatedMetric {
        name: "temperature".into(),
        unit: Some("°C".into()),
        base: 4.0,
        amplitude: 0.5,
        cycle: default_cycle(),
        noise: 0.1,
    }]
}
fn default_period() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_cycle() -> HumanDuration {
    HumanDuration::from_secs(600)
}

impl SimulatedConfig {
    /// The value of `metric` on `device` at `elapsed` since start, for tick `tick`.
    pub fn value_at(
        &self,
        device: &str,
        metric: &SimulatedMetric,
        elapsed: Duration,
        tick: u64,
    ) -> f64 {
        let phase = elapsed.as_secs_f64() / metric.cycle.get().as_secs_f64().max(1e-9);
        let mut value = metric.base + metric.amplitude * (phase * std::f64::consts::TAU).sin();
        if metric.noise > 0.0 {
            let h = Uid::derive(&[
                &self.seed.to_string(),
                device,
                &metric.name,
                &tick.to_string(),
            ]);
            let unit =
                u32::from_le_bytes([h.0[0], h.0[1], h.0[2], h.0[3]]) as f64 / u32::MAX as f64;
            value += (unit * 2.0 - 1.0) * metric.noise;
        }
        if let Some(x) = &self.excursion {
            let start = x.after.get();
            if x.device == device
                && x.metric == metric.name
                && elapsed >= start
                && elapsed < start + x.duration.get()
            {
                value += x.offset;
            }
        }
        value
    }
}

impl SourceKind for SimulatedConfig {
    const TYPE: &'static str = "simulated";

    fn name(&self) -> &str {
        &self.name
    }

    fn tls_endpoints(&self) -> Vec<crate::tls::Endpoint> {
        Vec::new()
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        if self.devices.is_empty() {
            problems.push(format!("{path}.devices"), "list at least one device");
        }
        for (i, d) in self.devices.iter().enumerate() {
            problems.check(
                format!("{path}.devices[{i}]"),
                check_identifier(d, "the device id"),
            );
        }
        if self.metrics.is_empty() {
            problems.push(format!("{path}.metrics"), "list at least one metric");
        }
        for (i, m) in self.metrics.iter().enumerate() {
            let p = format!("{path}.metrics[{i}]");
            problems.check(
                format!("{p}.name"),
                check_identifier(&m.name, "the metric name"),
            );
            for (key, v) in [
                ("base", m.base),
                ("amplitude", m.amplitude),
                ("noise", m.noise),
            ] {
                if !v.is_finite() {
                    problems.push(format!("{p}.{key}"), "must be a finite number");
                }
            }
            if m.noise < 0.0 {
                problems.push(format!("{p}.noise"), "must not be negative");
            }
            if m.cycle.get().is_zero() {
                problems.push(format!("{p}.cycle"), "must be more than 0");
            }
        }
        if self.period.get() < Duration::from_millis(10) {
            problems.push(
                format!("{path}.period"),
                format!("must be at least 10ms, found {}", self.period),
            );
        }
        if let Some(x) = &self.excursion {
            if !self.devices.contains(&x.device) {
                problems.push(
                    format!("{path}.excursion.device"),
                    format!("{:?} is not one of this source's devices", x.device),
                );
            }
            if !self.metrics.iter().any(|m| m.name == x.metric) {
                problems.push(
                    format!("{path}.excursion.metric"),
                    format!("{:?} is not one of this source's metrics", x.metric),
                );
            }
            if !x.offset.is_finite() {
                problems.push(
                    format!("{path}.excursion.offset"),
                    "must be a finite number",
                );
            }
        }
    }

    fn run(self, ctx: SourceContext) -> impl Future<Output = anyhow::Result<()>> + Send {
        run(self, ctx)
    }
}

pub async fn run(config: SimulatedConfig, ctx: SourceContext) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval(config.period.get());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut tick: u64 = 0;
    let mut refused: u64 = 0;
    let stage = ctx.stage(&config.name);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let elapsed = started.elapsed();
        let now = ctx.clock.now();
        let micros = now.timestamp_micros().to_string();
        let mut readings = Vec::with_capacity(config.devices.len() * config.metrics.len());
        for device in &config.devices {
            for metric in &config.metrics {
                readings.push(Reading {
                    uid: Uid::derive(&["simulated", &config.name, device, &metric.name, &micros]),
                    source: config.name.clone(),
                    device: device.clone(),
                    metric: metric.name.clone(),
                    value: config.value_at(device, metric, elapsed, tick),
                    unit: metric.unit.clone(),
                    observed_at: now,
                    received_at: now,
                    flags: 0,
                    meta: None,
                });
            }
        }
        tick += 1;
        ctx.metrics.received(&config.name, readings.len() as u64);
        // Wait for the commit so a full disk stops the simulation instead of queueing:
        // a batch refused because the disk is full is offered again (same uids) until
        // stored, and no new readings are made meanwhile (missed ticks
        // are skipped), like a sensor that waits for its gateway.
        let held = stage.hold(1);
        crate::progress::fault::hold(crate::progress::fault::SOURCE_HANG).await;
        let (batch, ack) = Batch::with_ack(readings.clone());
        if ctx.out.send(batch).await.is_err() {
            return Ok(());
        }
        let result = ctx
            .resend_while_full(
                &readings,
                ack.await,
                "simulated readings wait",
                &mut refused,
            )
            .await;
        drop(held);
        match result {
            Ok(Ok(_)) => {}
            // Stopping while the disk is still full, or the pipeline closed.
            Ok(Err(StoreError::Full)) | Err(_) => return Ok(()),
            Ok(Err(e)) => {
                tracing::warn!(source = %config.name, error = %e, "Simulated readings were not stored.");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SimulatedConfig {
        SimulatedConfig {
            name: "sim".into(),
            devices: vec!["a".into()],
            metrics: default_metrics(),
            period: default_period(),
            seed: 7,
            excursion: Some(Excursion {
                device: "a".into(),
                metric: "temperature".into(),
                after: HumanDuration::from_secs(10),
                duration: HumanDuration::from_secs(5),
                offset: 20.0,
            }),
        }
    }

    #[test]
    fn deterministic_with_excursion() {
        let c = config();
        let m = &c.metrics[0];
        let v1 = c.value_at("a", m, Duration::from_secs(3), 3);
        assert_eq!(v1, c.value_at("a", m, Duration::from_secs(3), 3));
        assert!((v1 - 4.0).abs() < 1.0);
        let during = c.value_at("a", m, Duration::from_secs(12), 12);
        assert!(during > 20.0, "excursion adds its offset: {during}");
        let after = c.value_at("a", m, Duration::from_secs(16), 16);
        assert!(after < 10.0);
    }
}
