//! Cumulative rules and presets (issue 16, items 3 and 4): the store and the alert
//! engine in process with readings at explicit observed times, across a restart and a
//! clock step of the engine's clock; the excursion counter; presets expanded and
//! printed by `outpost check`; bad input refused with clear errors.

mod support;

use chrono::{DateTime, Utc};
use outpost::config::Config;
use outpost::model::{Reading, Uid};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use support::agent::{outpost, InProcessAgent};

fn config_text(dir: &Path, body: &str) -> String {
    format!(
        "[agent]\ngateway_id = \"gw-test\"\nsite = \"Test site\"\n\n[storage]\npath = \"{}\"\nbatch_max_delay = \"10ms\"\n\n{body}",
        dir.join("outpost.db").display()
    )
}

fn load(dir: &Path, body: &str) -> Config {
    let path = dir.join("outpost.toml");
    std::fs::write(&path, config_text(dir, body)).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// The store and the alert engine in process on the database in `data` (which
/// outlives the agent, for restarts), with `clock` as the agent's wall clock.
fn start(data: &Path, body: &str, clock: outpost::clock::Clock) -> InProcessAgent {
    let config = load(data, body);
    let mut agent = InProcessAgent::open_in(tempfile::tempdir().unwrap(), &config.storage);
    let alerting = outpost::run::alerting::spawn_tasks(
        &config,
        agent.store(),
        outpost::tls::CertWatch::default().saving_to(agent.store().clone()),
        agent.shutdown_token(),
        clock,
    )
    .unwrap();
    for task in [alerting.engine, alerting.outbox].into_iter().flatten() {
        agent.spawn(task);
    }
    agent.wait_for_alert_engine();
    agent
}

/// [`start`], with the engine spawned apart so the test can abort it: a crash of the
/// engine between two saves (its unsaved decisions are lost, the readings are not).
fn start_abortable(data: &Path, body: &str) -> (InProcessAgent, tokio::task::JoinHandle<()>) {
    let config = load(data, body);
    let mut agent = InProcessAgent::open_in(tempfile::tempdir().unwrap(), &config.storage);
    let alerting = outpost::run::alerting::spawn_tasks(
        &config,
        agent.store(),
        outpost::tls::CertWatch::default().saving_to(agent.store().clone()),
        agent.shutdown_token(),
        outpost::clock::Clock::system(),
    )
    .unwrap();
    if let Some(outbox) = alerting.outbox {
        agent.spawn(outbox);
    }
    let engine = tokio::spawn(alerting.engine.expect("an engine"));
    (agent, engine)
}

fn reading(value: f64, observed_at: DateTime<Utc>) -> Reading {
    Reading {
        uid: Uid::derive(&[
            "cumulative-test",
            &observed_at.timestamp_micros().to_string(),
            &value.to_string(),
        ]),
        source: "test".into(),
        device: "fridge-1".into(),
        metric: "temperature".into(),
        value,
        unit: Some("°C".into()),
        observed_at,
        received_at: observed_at,
        flags: 0,
        meta: None,
    }
}

/// `(kind, condition)` of the stored alert events, oldest first.
fn events(agent: &InProcessAgent) -> Vec<(String, String)> {
    agent
        .query::<String>(
            "SELECT kind, json_extract(message, '$.condition') FROM alert_events ORDER BY id",
        )
        .into_iter()
        .map(|row| (row[0].clone(), row[1].clone()))
        .collect()
}

/// Waits until the engine evaluated every committed reading (its cursor is saved at
/// shutdown, and with every transition): here, by the event count.
async fn wait_events(agent: &InProcessAgent, n: i64) {
    agent
        .wait_for(&format!("{n} alert events"), |a| {
            a.count("SELECT COUNT(*) FROM alert_events") >= n
        })
        .await;
}

const TOTAL_30M: &str = r#"
[[alerts]]
name = "warm-total"
kind = "cumulative"
metric = "temperature"
above = 8.0
total = "30m"
within = "24h"
"#;

fn minutes(m: i64) -> chrono::Duration {
    chrono::Duration::minutes(m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cumulative_rule_keeps_its_tally_across_a_restart() {
    let data = tempfile::tempdir().unwrap();
    // The events also go to a real webhook receiver: one firing, one resolved.
    let receiver = support::HttpReceiver::start();
    let config = format!(
        "{TOTAL_30M}notifiers = [\"hook\"]\n\n[[notifiers]]\nname = \"hook\"\ntype = \"webhook\"\n\
         url = \"{}/alerts\"\nretry_initial = \"50ms\"\nretry_max = \"200ms\"\n",
        receiver.url()
    );
    let config = config.as_str();
    let t0 = Utc::now() - chrono::Duration::hours(3);
    let agent = start(data.path(), config, outpost::clock::Clock::system());
    // 20 minutes out of range, then the agent stops.
    for m in [0, 10, 20] {
        agent.ingest(vec![reading(9.0, t0 + minutes(m))]).await;
    }
    agent
        .wait_for("the engine took the readings", |a| {
            a.count("SELECT COUNT(*) FROM readings") == 3
        })
        .await;
    // Let the engine evaluate the batch before stopping (a stop mid-batch would only
    // move the work to the next start).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    agent.shutdown().await;

    let agent = start(data.path(), config, outpost::clock::Clock::system());
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM alert_tallies"),
        1,
        "the tally was saved"
    );
    assert_eq!(
        agent.query::<i64>(
            "SELECT (end_at - start_at) / 60000000 FROM alert_spans WHERE kind = 'out'"
        ),
        vec![vec![20]],
        "20 minutes out of range, counted once"
    );
    agent.ingest(vec![reading(9.0, t0 + minutes(25))]).await;
    agent.ingest(vec![reading(9.0, t0 + minutes(30))]).await;
    wait_events(&agent, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let ev = events(&agent);
    assert_eq!(
        ev,
        vec![(
            "firing".to_string(),
            "above 8 °C for 30m in total within 1day (now 30m out of range)".to_string()
        )],
        "fires at 30 minutes: nothing lost, nothing counted twice"
    );
    // Back in range for the rest of the window: still 30 minutes, still firing; the
    // next restart does not fire again.
    agent.ingest(vec![reading(5.0, t0 + minutes(40))]).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    agent.shutdown().await;
    let agent = start(data.path(), config, outpost::clock::Clock::system());
    agent.ingest(vec![reading(5.0, t0 + minutes(50))]).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        events(&agent).len(),
        1,
        "no second firing after the restart"
    );
    // A day later the excursion has slid out of the window: resolved.
    agent
        .ingest(vec![reading(
            5.0,
            t0 + chrono::Duration::hours(24) + minutes(31),
        )])
        .await;
    wait_events(&agent, 2).await;
    let ev = events(&agent);
    assert_eq!(ev[1].0, "resolved");
    // The reading at 30 min held until the one at 40; from 31 min on, 9 minutes are
    // inside the window, and the silent day since the 50-minute reading is unknown.
    assert_eq!(
        ev[1].1,
        "above 8 °C for 30m in total within 1day (now 9m out of range, 23h 41m unknown)"
    );
    let requests = receiver
        .wait_for_requests_async(2, std::time::Duration::from_secs(30))
        .await;
    let sent: Vec<(String, String)> = requests
        .iter()
        .map(|r| {
            let body: serde_json::Value = serde_json::from_str(&r.body_str()).unwrap();
            (
                body["kind"].as_str().unwrap().to_string(),
                body["condition"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(sent, ev, "the webhook got each event once");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_saves_re_evaluates_from_the_saved_cursor() {
    let data = tempfile::tempdir().unwrap();
    let t0 = Utc::now() - chrono::Duration::hours(3);
    let (agent, engine) = start_abortable(data.path(), TOTAL_30M);
    agent
        .wait_for("the engine's starting point", |a| {
            a.count("SELECT COUNT(*) FROM source_state WHERE source = 'alerts'") == 1
        })
        .await;
    for m in [0, 10, 20] {
        agent.ingest(vec![reading(9.0, t0 + minutes(m))]).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM alert_tallies"),
        0,
        "no transition yet: nothing saved before the crash"
    );
    engine.abort();
    let _ = engine.await;
    agent.shutdown().await;

    // The next start evaluates the three readings again from the saved cursor, once.
    let agent = start(data.path(), TOTAL_30M, outpost::clock::Clock::system());
    agent.ingest(vec![reading(9.0, t0 + minutes(25))]).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        events(&agent).is_empty(),
        "25 minutes: {:?}",
        events(&agent)
    );
    agent.ingest(vec![reading(9.0, t0 + minutes(30))]).await;
    wait_events(&agent, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        events(&agent),
        vec![(
            "firing".to_string(),
            "above 8 °C for 30m in total within 1day (now 30m out of range)".to_string()
        )]
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_step_neither_creates_nor_erases_excursion_time() {
    let data = tempfile::tempdir().unwrap();
    // The agent's wall clock: the system clock plus an offset the test steps.
    let offset = Arc::new(AtomicI64::new(0));
    let o = offset.clone();
    let clock = outpost::clock::Clock::from_fn(move || {
        Utc::now() + chrono::Duration::microseconds(o.load(Ordering::SeqCst))
    });
    let agent = start(data.path(), TOTAL_30M, clock.clone());
    // A serial-like series stamped by the local clock: out of range at 0 and 10 min.
    let t0 = clock.now() - minutes(20);
    agent.ingest(vec![reading(9.0, t0)]).await;
    agent.ingest(vec![reading(9.0, t0 + minutes(10))]).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // The clock jumps 10 hours forward (e.g. the first NTP synchronisation).
    let step = chrono::Duration::hours(10);
    offset.store(step.num_microseconds().unwrap(), Ordering::SeqCst);
    agent
        .wait_for("the engine saw the step", |a| {
            a.count("SELECT COUNT(*) FROM alert_tallies WHERE shift IS NOT NULL") == 1
        })
        .await;
    // The series goes on, stamped after the step: 10 minutes of real time apart.
    agent
        .ingest(vec![reading(9.0, t0 + minutes(20) + step)])
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(
        events(&agent).is_empty(),
        "the step did not become 10 hours out of range: {:?}",
        events(&agent)
    );
    agent
        .ingest(vec![reading(5.0, t0 + minutes(30) + step)])
        .await;
    wait_events(&agent, 1).await;
    assert_eq!(
        events(&agent)[0].1,
        "above 8 °C for 30m in total within 1day (now 30m out of range)",
        "the 20 minutes before the step were kept, none unknown"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_excursion_counter_fires_on_the_third_excursion_and_says_so() {
    let data = tempfile::tempdir().unwrap();
    let rule = r#"
[[alerts]]
name = "door-openings"
kind = "cumulative"
metric = "temperature"
above = 8.0
clear = 7.0
count = 3
within = "24h"
max_gap = "30m"
"#;
    let agent = start(data.path(), rule, outpost::clock::Clock::system());
    let t0 = Utc::now() - chrono::Duration::hours(5);
    // 9, 7.5 (not back at `clear`: the same excursion), 9, 6: one excursion; then a
    // second one; then two hours without a reading (unknown, not in range); a third.
    let series = [
        (0, 9.0),
        (5, 7.5),
        (6, 9.0),
        (10, 6.0),
        (20, 9.0),
        (25, 6.0),
        (145, 6.5),
        (150, 8.5),
    ];
    for (i, (m, v)) in series.iter().enumerate() {
        agent.ingest(vec![reading(*v, t0 + minutes(*m))]).await;
        if i + 1 < series.len() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    wait_events(&agent, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        events(&agent),
        vec![(
            "firing".to_string(),
            "3 excursions above 8 °C within 1day (now 3 excursions, 14m out of range, 2h unknown)"
                .to_string()
        )]
    );
    agent.shutdown().await;
}

fn check(dir: &Path, body: &str) -> (Option<i32>, String, String) {
    let path = dir.join("outpost.toml");
    std::fs::write(&path, config_text(dir, body)).unwrap();
    outpost(["check", "--config", path.to_str().unwrap()])
}

#[test]
fn outpost_check_prints_the_expansion_of_a_preset() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = check(
        dir.path(),
        "[[notifiers]]\nname = \"journal\"\ntype = \"log\"\n\n[[alerts]]\npreset = \"vaccine-fridge\"\nname = \"vaccines\"\ndevices = [\"fridge-*\"]\nnotifiers = [\"journal\"]\n",
    );
    assert_eq!(code, Some(0), "{stderr}");
    let body: String = stdout
        .lines()
        .skip_while(|l| l.starts_with('#') || l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    let printed: toml::Value = toml::from_str(&body).unwrap();
    let alerts = printed["alerts"].as_array().unwrap();
    let summary: Vec<String> = alerts
        .iter()
        .map(|a| {
            let level = a
                .get("above")
                .map(|v| format!("above {v}"))
                .or_else(|| a.get("below").map(|v| format!("below {v}")))
                .unwrap_or_default();
            let extra = ["for", "total", "within", "after"]
                .iter()
                .filter_map(|k| Some(format!("{k}={}", a.get(*k)?.as_str()?)))
                .collect::<Vec<_>>()
                .join(" ");
            format!(
                "{} {} {level} {extra}",
                a["name"].as_str().unwrap(),
                a["kind"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            "vaccines:high threshold above 8.0 for=15m",
            "vaccines:low threshold below 2.0 for=15m",
            "vaccines:cumulative cumulative above 8.0 total=1h within=1day",
            "vaccines:stale stale  after=30m",
        ],
        "{stdout}"
    );
    for a in alerts {
        assert_eq!(
            a["devices"].as_array().unwrap()[0].as_str(),
            Some("fridge-*")
        );
        assert_eq!(
            a["notifiers"].as_array().unwrap()[0].as_str(),
            Some("journal")
        );
    }
    // The printed rules are ordinary rules: they load as such.
    let printed_alerts: String = stdout
        .split("[[alerts]]")
        .skip(1)
        .map(|t| format!("[[alerts]]{}", t.split("[[notifiers]]").next().unwrap()))
        .collect();
    let dir2 = tempfile::tempdir().unwrap();
    let (code, _, stderr) = check(
        dir2.path(),
        &format!("[[notifiers]]\nname = \"journal\"\ntype = \"log\"\n\n{printed_alerts}"),
    );
    assert_eq!(code, Some(0), "{stderr}\n{printed_alerts}");
}

/// Each bad input: exit 2, and the message names the file, line and key.
#[test]
fn bad_cumulative_rules_and_presets_are_refused_with_clear_errors() {
    let rule = |extra: &str| {
        format!("[[alerts]]\nname = \"c\"\nkind = \"cumulative\"\nmetric = \"temperature\"\nabove = 8.0\n{extra}\n")
    };
    let cases: Vec<(String, &str)> = vec![
        (
            "[[alerts]]\npreset = \"vacine-fridge\"\nname = \"v\"\n".into(),
            "outpost.toml:10: alerts[0].preset: unknown preset \"vacine-fridge\"; expected one of \"vaccine-fridge\", \"vaccine-freezer\", \"food-cold-room\", \"food-freezer\"; did you mean \"vaccine-fridge\"?",
        ),
        (
            rule("total = \"25h\"\nwithin = \"24h\""),
            "alerts[0].total: 1day 1h is longer than the window `within` = 1day: it could never be reached",
        ),
        (
            rule("total = \"1h\"\ncount = 3\nwithin = \"24h\""),
            "alerts[0].count: set either `total` or `count`, not both (write two rules)",
        ),
        (rule("total = \"-5m\"\nwithin = \"24h\""), "alerts[0].total:"),
        (rule("total = \"1h\"\nwithin = \"-24h\""), "alerts[0].within:"),
        (rule("count = -1\nwithin = \"24h\""), "alerts[0].count:"),
        (
            rule("count = 0\nwithin = \"24h\""),
            "alerts[0].count: must be between 1 and 1000, found 0",
        ),
        (rule("count = 99999999999\nwithin = \"24h\""), "alerts[0].count:"),
        (
            rule("within = \"24h\""),
            "alerts[0].total: a cumulative rule needs `total`",
        ),
        (
            rule("total = \"1h\""),
            "alerts[0].within: a cumulative rule needs `within`",
        ),
        (
            rule("total = \"1h\"\nwithin = \"400d\""),
            "alerts[0].within: must be between 1m and 31d",
        ),
        (
            rule("total = \"1h\"\nwithin = \"24h\"\nmax_gap = \"0s\""),
            "alerts[0].max_gap: must be between 1s and 7d",
        ),
        (
            rule("total = \"1h\"\nwithin = \"24h\"\nfor = \"5m\""),
            "alerts[0].for: does not apply to a cumulative rule; remove it",
        ),
        (
            rule("total = \"1h\"\nwithin = \"24h\"\nclear = 7.0"),
            "alerts[0].clear: does not apply with `total`",
        ),
        (
            "[[alerts]]\nname = \"t\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\nwithin = \"24h\"\n".into(),
            "alerts[0].within: does not apply to a threshold rule; remove it",
        ),
        (
            "[[alerts]]\npreset = \"vaccine-fridge\"\nname = \"v\"\nkind = \"threshold\"\n".into(),
            "alerts[0].kind: unknown key",
        ),
        (
            "[[alerts]]\npreset = \"vaccine-fridge\"\nname = \"v\"\ntotal = \"2d\"\n".into(),
            "alerts[0].total: 2days is longer than the window",
        ),
        (
            "[[alerts]]\npreset = \"food-freezer\"\nname = \"v\"\n\n[[alerts]]\nname = \"v:high\"\nkind = \"stale\"\nmetric = \"temperature\"\nafter = \"1h\"\n".into(),
            "the rule name \"v:high\" is also used by alerts[0]",
        ),
        (rule("total = 5\nwithin = \"24h\""), "alerts[0].total:"),
        (rule("count = \"three\"\nwithin = \"24h\""), "alerts[0].count:"),
        (
            rule("total = \"1h\"\nwithin = \"30s\""),
            "alerts[0].within: must be between 1m and 31d, found 30s",
        ),
        (
            rule("total = \"1h\"\nwithin = \"24h\"\nmax_gap = \"8d\""),
            "alerts[0].max_gap: must be between 1s and 7d, found 8days",
        ),
        (
            rule("total = \"0s\"\nwithin = \"24h\""),
            "alerts[0].total: must be at least 1s",
        ),
        (
            "[[alerts]]\npreset = 5\nname = \"v\"\n".into(),
            "alerts[0].preset:",
        ),
        (
            "[[alerts]]\npreset = \"vaccine-fridge\"\nname = \"'; DROP TABLE alert_spans; --\"\n".into(),
            "alerts[0].name:",
        ),
        (
            "[[alerts]]\npreset = \"vaccine-fridge\"\nname = \"v\"\nfor = \"-1m\"\n".into(),
            "alerts[0].for:",
        ),
        (
            "[[alerts]]\npreset = \"vaccine-fridge\"\nname = \"v\"\nbelow = 9.0\n".into(),
            "alerts[0].below: the lower limit 9 is not below the upper limit 8",
        ),
        (
            format!("[[alerts]]\npreset = \"{}\"\nname = \"v\"\n", "x".repeat(100_000)),
            "alerts[0].preset: unknown preset \"xxxxxxxx",
        ),
    ];
    for (body, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (code, _, stderr) = check(dir.path(), &body);
        assert_eq!(code, Some(2), "{body}\n{stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} for\n{}\ngot: {stderr}",
            body.chars().take(300).collect::<String>()
        );
        assert!(stderr.len() < 4000, "a clear, short message: {stderr}");
    }
}
