//! `outpost demo`: the agent's main job on an embedded configuration — simulated
//! sensors, a local database, readings printed as they are committed. Nothing to
//! configure.

use crate::config::{Config, HumanDuration};
use crate::pipeline::Pipeline;
use crate::sources::simulated::{Excursion, SimulatedConfig, SimulatedMetric};
use crate::sources::SourceConfig;
use crate::status::format_value;
use crate::store::StoreOptions;
use std::io::Write;
use std::path::Path;
use tokio_util::sync::CancellationToken;

/// The demo's configuration: two cold rooms; the first one's door is left open for a
/// while, which warms it up by 8 °C.
pub fn demo_config(dir: &Path) -> Config {
    let mut config = Config::default();
    config.agent.gateway_id = "demo".into();
    config.agent.site = "Demo cold store".into();
    config.storage.path = dir.join("outpost.db");
    config.storage.batch_max_delay = HumanDuration::from_millis(20);
    config
        .sources
        .push(SourceConfig::Simulated(SimulatedConfig {
            name: "demo".into(),
            devices: vec!["coldroom-1".into(), "coldroom-2".into()],
            metrics: vec![
                SimulatedMetric {
                    name: "temperature".into(),
                    unit: Some("°C".into()),
                    base: 3.5,
                    amplitude: 0.5,
                    cycle: HumanDuration::from_secs(120),
                    noise: 0.1,
                },
                SimulatedMetric {
                    name: "humidity".into(),
                    unit: Some("%".into()),
                    base: 80.0,
                    amplitude: 3.0,
                    cycle: HumanDuration::from_secs(300),
                    noise: 0.5,
                },
            ],
            period: HumanDuration::from_secs(1),
            seed: 42,
            excursion: Some(Excursion {
                device: "coldroom-1".into(),
                metric: "temperature".into(),
                after: HumanDuration::from_secs(8),
                duration: HumanDuration::from_secs(12),
                offset: 8.0,
            }),
        }));
    config
}

/// Runs the demo until `shutdown`, printing each committed reading to `out`.
pub async fn run(
    dir: &Path,
    shutdown: CancellationToken,
    mut out: impl Write + Send + 'static,
) -> anyhow::Result<()> {
    let config = demo_config(dir);
    let _ = writeln!(
        out,
        "Outpost demo: simulated cold rooms, database {}\nPress Ctrl-C to stop; then try `outpost status --db {}`.\n",
        config.storage.path.display(),
        config.storage.path.display()
    );
    let mut pipeline = Pipeline::start(&config, StoreOptions::default(), shutdown)?;
    let after = *pipeline.store.committed_watch().borrow();
    let mut committed = pipeline.store.committed_readings(after)?;
    pipeline.spawn_consumer(async move {
        while let Some(rows) = committed.next_batch(256).await {
            for row in rows {
                let r = &row.reading;
                let _ = writeln!(
                    out,
                    "{}  committed #{:<5} {:<11} {:<12} {:>10}",
                    r.observed_at.format("%H:%M:%S"),
                    row.id,
                    r.device,
                    r.metric,
                    format_value(r.value, r.unit.as_deref()),
                );
            }
            let _ = out.flush();
        }
    });
    pipeline.wait().await;
    Ok(())
}
