//! `outpost demo`: the agent's main job on an embedded configuration — simulated
//! sensors, a local database, readings printed as they are committed. Nothing to
//! configure.

use crate::alerts::{AlertRule, RuleKind, Severity};
use crate::config::Config;
use crate::display::format_value;
use crate::notify::{NotifierConfig, NotifierKind};
use crate::run::pipeline::Pipeline;
use crate::settings::HumanDuration;
use crate::sources::simulated::{Excursion, SimulatedConfig, SimulatedMetric};
use crate::sources::SourceConfig;
use crate::store::StoreOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// `outpost demo [--dir DIR] [--duration D]`: until Ctrl-C or for `duration`.
/// The command-line arguments of `outpost demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Where the demo database goes (default: a new directory under /tmp).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Stop after this long (e.g. "30s"); default: until Ctrl-C.
    #[arg(long, value_name = "DURATION")]
    pub duration: Option<HumanDuration>,
}

pub fn main(args: Args) -> ExitCode {
    let Args { dir, duration } = args;
    super::init_tracing("warn");
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("outpost-demo-{}", std::process::id())),
    };
    super::run::until_signal(move |token| {
        if let Some(d) = duration {
            let t = token.clone();
            tokio::spawn(async move {
                tokio::time::sleep(d.get()).await;
                t.cancel();
            });
        }
        async move { run(&dir, token, std::io::stdout()).await }
    })
}

/// The demo's configuration: two cold rooms and a freezer. The first cold room's door
/// is left open for a while, which warms it up by 8 °C (an alert fires and resolves);
/// from 25 s on the freezer's door stays open, so its alert is still firing when the
/// demo ends — acknowledge it with `outpost ack freezer-warm --by NAME --db …`.
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
    // The excursion takes coldroom-1 from about 3.5 °C to 11.5 °C for 12 s: the alert
    // goes pending, fires after 3 s above 8 °C, and resolves once back at 6 °C or below.
    config
        .sources
        .push(SourceConfig::Simulated(SimulatedConfig {
            name: "demo-freezer".into(),
            devices: vec!["freezer-1".into()],
            metrics: vec![SimulatedMetric {
                name: "temperature".into(),
                unit: Some("°C".into()),
                base: -20.0,
                amplitude: 0.5,
                cycle: HumanDuration::from_secs(120),
                noise: 0.1,
            }],
            period: HumanDuration::from_secs(1),
            seed: 7,
            excursion: Some(Excursion {
                device: "freezer-1".into(),
                metric: "temperature".into(),
                after: HumanDuration::from_secs(25),
                duration: HumanDuration::from_secs(24 * 3600),
                offset: 16.0,
            }),
        }));
    // The freezer's door stays open from 25 s: about −4 °C, above −15 °C, so its alert
    // fires after 3 s and stays firing until someone acknowledges (and closes the door).
    config.notifiers.push(NotifierConfig {
        name: "console".into(),
        ttl: HumanDuration::from_secs(3600),
        retry_initial: HumanDuration::from_secs(1),
        retry_max: HumanDuration::from_secs(10),
        subject: None,
        body: None,
        kind: NotifierKind::Log(Default::default()),
    });
    config
        .alerts
        .push(warm_rule("coldroom-warm", "coldroom-*", 8.0, 6.0));
    config
        .alerts
        .push(warm_rule("freezer-warm", "freezer-*", -15.0, -17.0));
    config
}

/// A critical rule of the demo: temperature above `above` for 3 s on `devices`,
/// resolved at or below `clear`, logged by the console notifier.
fn warm_rule(name: &str, devices: &str, above: f64, clear: f64) -> AlertRule {
    AlertRule {
        name: name.into(),
        kind: RuleKind::Threshold,
        devices: vec![devices.into()],
        tags: Vec::new(),
        metric: "temperature".into(),
        above: Some(above),
        below: None,
        clear: Some(clear),
        hold: Some(HumanDuration::from_secs(3)),
        after: None,
        delta: None,
        period: None,
        total: None,
        count: None,
        within: None,
        max_gap: None,
        severity: Severity::Critical,
        notifiers: vec!["console".into()],
        reminder: None,
        escalation: Vec::new(),
    }
}

/// Runs the demo until `shutdown`, printing each committed reading and each alert event
/// to `out`.
pub async fn run(
    dir: &Path,
    shutdown: CancellationToken,
    out: impl Write + Send + 'static,
) -> anyhow::Result<()> {
    let config = demo_config(dir);
    let out = Arc::new(Mutex::new(out));
    print(
        &out,
        &format!(
            "Outpost demo: simulated cold rooms, database {}\n\
             Rule coldroom-warm: temperature above 8 °C for 3s (clears at 6 °C); coldroom-1's door opens at 8s for 12s.\n\
             Press Ctrl-C to stop; then try `outpost status --db {}`.\n",
            config.storage.path.display(),
            config.storage.path.display()
        ),
    );
    let mut pipeline = Pipeline::start(&config, StoreOptions::default(), shutdown)?;
    let after = *pipeline.store.committed_watch().borrow();
    let mut committed = pipeline.store.committed_readings(after)?;
    let readings_out = out.clone();
    pipeline.spawn_consumer(async move {
        while let Some(rows) = committed.next_batch(256).await {
            let mut text = String::new();
            for row in rows {
                let r = &row.reading;
                text.push_str(&format!(
                    "{}  committed #{:<5} {:<11} {:<12} {:>10}\n",
                    r.observed_at.format("%H:%M:%S"),
                    row.id,
                    r.device,
                    r.metric,
                    format_value(r.value, r.unit.as_deref(), None),
                ));
            }
            print(&readings_out, &text);
        }
    });
    let alerting = crate::run::alerting::spawn_tasks(
        &config,
        &pipeline.store,
        pipeline.certs.clone(),
        pipeline.shutdown_token(),
        pipeline.clock.clone(),
    )?;
    for task in [alerting.engine, alerting.outbox].into_iter().flatten() {
        pipeline.spawn_consumer(task);
    }
    // Alert events, as they are stored (the "console" notifier also logs them).
    let (store, stop) = (pipeline.store.clone(), pipeline.shutdown_token());
    pipeline.spawn_consumer(async move {
        let mut last = 0i64;
        while !stop.is_cancelled() {
            let reader = store.clone();
            let events = tokio::task::spawn_blocking(move || {
                let conn = reader.reader()?;
                crate::alerts::state::events_after(&conn, last, 100)
            })
            .await;
            if let Ok(Ok(events)) = events {
                for (id, e) in events {
                    last = id;
                    print(
                        &out,
                        &format!(
                            "{}  ALERT {:<8} {} on {}: {} {} ({})\n",
                            e.at.format("%H:%M:%S"),
                            e.kind.as_str().to_uppercase(),
                            e.rule,
                            e.device,
                            e.metric,
                            e.value
                                .map(|v| format_value(v, e.unit.as_deref(), e.precision))
                                .unwrap_or_default(),
                            e.condition,
                        ),
                    );
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
            }
        }
    });
    pipeline.wait().await;
    Ok(())
}

fn print(out: &Mutex<impl Write>, text: &str) {
    if let Ok(mut out) = out.lock() {
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}
