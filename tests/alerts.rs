//! Alerting and notifications against real peers: aiosmtpd (AUTH, STARTTLS with a CA
//! made here, implicit TLS), the HTTP receiver (signature, idempotency key, outages,
//! permanent failures, expiry), a local program, and the real binary killed with
//! SIGKILL while an alert is pending and while one is firing.

mod support;

use hmac::{Hmac, Mac};
use outpost::config::Config;
use outpost::model::{Reading, Uid};
use rusqlite::Connection;
use sha2::Sha256;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::agent::{outpost, Agent, InProcessAgent};
use support::util::wait_until_async;
use support::{HttpReceiver, Reply, SmtpOptions, SmtpServer, TestCa};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");
/// Generous: the test box is small and shared.
const DEADLINE: Duration = Duration::from_secs(30);

/// The configuration: an agent section, the database in `dir`, then `body`.
fn config_text(dir: &Path, body: &str) -> String {
    format!(
        "[agent]\ngateway_id = \"gw-test\"\nsite = \"Test site\"\n\n[storage]\npath = \"{}\"\nbatch_max_delay = \"10ms\"\n\n{body}",
        dir.join("outpost.db").display()
    )
}

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("outpost.toml");
    std::fs::write(&path, config_text(dir, body)).unwrap();
    path
}

fn load(dir: &Path, body: &str) -> Config {
    let path = write_config(dir, body);
    Config::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// The store and the alert tasks in-process, with readings handed over through the
/// ingest channel exactly as a source would hand them over.
fn start_alerting(body: &str) -> InProcessAgent {
    let dir = tempfile::tempdir().unwrap();
    let config = load(dir.path(), body);
    start_alerting_in(dir, config)
}

fn start_alerting_in(dir: tempfile::TempDir, config: Config) -> InProcessAgent {
    let mut agent = InProcessAgent::open_in(dir, &config.storage);
    let alerting = outpost::run::alerting::spawn_tasks(
        &config,
        agent.store(),
        outpost::tls::CertWatch::default().saving_to(agent.store().clone()),
        agent.shutdown_token(),
        outpost::alerts::Clock::system(),
    )
    .unwrap();
    for task in [alerting.engine, alerting.outbox].into_iter().flatten() {
        agent.spawn(task);
    }
    agent.wait_for_alert_engine();
    agent
}

/// Stores a `temperature` reading of `device` now, and waits for its commit.
async fn reading(agent: &InProcessAgent, device: &str, value: f64) {
    let now = chrono::Utc::now();
    let r = Reading {
        uid: Uid::derive(&[
            "test",
            device,
            &now.timestamp_micros().to_string(),
            &value.to_string(),
        ]),
        source: "test".into(),
        device: device.into(),
        metric: "temperature".into(),
        value,
        unit: Some("°C".into()),
        observed_at: now,
        received_at: now,
        flags: 0,
        meta: None,
    };
    agent.ingest(vec![r]).await;
}

fn outbox_states(db: &Path) -> Vec<(String, i64, Option<String>)> {
    let conn = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut stmt = conn
        .prepare("SELECT state, attempts, last_error FROM outbox ORDER BY id")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows
}

fn verify_signature(secret: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

const RULE: &str = r#"
[[alerts]]
name = "coldroom-warm"
kind = "threshold"
devices = ["coldroom-*"]
metric = "temperature"
above = 8.0
clear = 6.0
severity = "critical"
notifiers = ["hook"]
"#;

fn webhook(url: &str, extra: &str) -> String {
    format!(
        "[[notifiers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"{url}/alerts\"\nsecret = \"s3cret\"\n\
         retry_initial = \"50ms\"\nretry_max = \"200ms\"\ntimeout = \"500ms\"\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_gets_signed_firing_and_resolved_events_with_idempotency_keys() {
    let receiver = HttpReceiver::start();
    let agent = start_alerting(&format!("{RULE}{}", webhook(&receiver.url(), "")));
    reading(&agent, "coldroom-1", 4.0).await;
    reading(&agent, "freezer-1", 20.0).await; // out of scope
    reading(&agent, "coldroom-1", 9.5).await;
    let reqs = receiver.wait_for_requests_async(1, DEADLINE).await;
    let firing = &reqs[0];
    assert_eq!(firing.method, "POST");
    assert_eq!(firing.path, "/alerts");
    assert!(verify_signature(
        "s3cret",
        &firing.body,
        firing.header("x-outpost-signature").unwrap()
    ));
    assert!(!verify_signature(
        "wrong",
        &firing.body,
        firing.header("x-outpost-signature").unwrap()
    ));
    let event: serde_json::Value = serde_json::from_slice(&firing.body).unwrap();
    assert_eq!(event["kind"], "firing");
    assert_eq!(event["device"], "coldroom-1");
    assert_eq!(event["value"], 9.5);
    assert_eq!(event["threshold"], 8.0);
    assert_eq!(event["severity"], "critical");
    assert_eq!(event["site"], "Test site");
    let uid = event["uid"].as_str().unwrap();
    assert_eq!(
        firing.header("idempotency-key"),
        Some(format!("{uid}:hook").as_str())
    );
    assert!(event["summary"]
        .as_str()
        .unwrap()
        .starts_with("FIRING [critical] Test site / coldroom-1"));

    // Hysteresis: 7 is below the alert level but above the clear level.
    reading(&agent, "coldroom-1", 7.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.requests().len(), 1);
    reading(&agent, "coldroom-1", 5.0).await;
    let reqs = receiver.wait_for_requests_async(2, DEADLINE).await;
    let resolved: serde_json::Value = serde_json::from_slice(&reqs[1].body).unwrap();
    assert_eq!(resolved["kind"], "resolved");
    assert_ne!(resolved["uid"], event["uid"]);
    wait_until_async("both delivered", DEADLINE, async || {
        outbox_states(agent.db())
            .iter()
            .filter(|s| s.0 == "delivered")
            .count()
            == 2
    })
    .await;
    assert_eq!(agent.count("SELECT COUNT(*) FROM alert_events"), 2);
    assert_eq!(agent.count("SELECT COUNT(*) FROM alert_state"), 0);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_outage_500_then_timeouts_then_recovery_keeps_the_key() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let receiver =
        HttpReceiver::start_with(move |_| match counter.fetch_add(1, Ordering::SeqCst) {
            0..=2 => Reply::status(500),
            3..=4 => Reply::ok().delay(Duration::from_secs(3)), // the notifier times out at 500ms
            _ => Reply::ok(),
        });
    let agent = start_alerting(&format!("{RULE}{}", webhook(&receiver.url(), "")));
    reading(&agent, "coldroom-1", 12.0).await;
    let reqs = receiver.wait_for_requests_async(6, DEADLINE).await;
    wait_until_async("delivery recorded", DEADLINE, async || {
        outbox_states(agent.db())[0].0 == "delivered"
    })
    .await;
    let keys: std::collections::HashSet<_> = reqs
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_string())
        .collect();
    assert_eq!(
        keys.len(),
        1,
        "the same idempotency key on every attempt: {keys:?}"
    );
    let (state, attempts, _) = &outbox_states(agent.db())[0];
    assert_eq!(state, "delivered");
    assert_eq!(*attempts, 6, "three 500s, two timeouts, one success");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.requests().len(), 6, "nothing after delivery");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_fails_permanently_and_an_expired_ttl_is_reported() {
    let receiver = HttpReceiver::start_with(|_| Reply::status(400));
    let down = HttpReceiver::start_with(|_| Reply::status(503));
    let body = format!(
        "{}{}",
        RULE.replace("[\"hook\"]", "[\"hook\", \"down\"]"),
        webhook(&receiver.url(), "")
    ) + &format!(
        "[[notifiers]]\nname = \"down\"\ntype = \"webhook\"\nurl = \"{}/x\"\nttl = \"1500ms\"\n\
                 retry_initial = \"50ms\"\nretry_max = \"100ms\"\n",
        down.url()
    );
    let agent = start_alerting(&body);
    reading(&agent, "coldroom-1", 12.0).await;
    wait_until_async("failed and expired", DEADLINE, async || {
        let s = outbox_states(agent.db());
        s.len() == 2
            && s.iter()
                .all(|(state, _, _)| state == "failed" || state == "expired")
    })
    .await;
    let states = outbox_states(agent.db());
    let failed = states.iter().find(|s| s.0 == "failed").unwrap();
    assert_eq!(failed.1, 1, "a 400 is not retried");
    assert!(failed.2.as_deref().unwrap().contains("400"));
    assert_eq!(receiver.requests().len(), 1);
    assert!(down.requests().len() >= 3, "retried until the ttl passed");
    let expired = states.iter().find(|s| s.0 == "expired").unwrap();
    assert!(expired.2.as_deref().unwrap().contains("503"));

    let report = outpost::cli::status::status_report(agent.db()).unwrap();
    assert_eq!(report.alerts.notifications_expired, 1);
    assert_eq!(report.alerts.notifications_failed, 1);
    assert_eq!(report.alerts.firing.len(), 1);
    let text = outpost::cli::status::render(&report, "db");
    assert!(text.contains("Alerts: 1 FIRING"), "{text}");
    assert!(text.contains("1 expired, 1 failed permanently"), "{text}");
    assert!(
        text.contains("EXPIRED") && text.contains("FAILED"),
        "{text}"
    );
    assert_eq!(
        agent.count("SELECT value FROM counters WHERE name = 'notifications_expired'"),
        1
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_with_auth_over_starttls_with_a_test_ca_and_smtp_outage() {
    let ca = TestCa::new();
    let mut smtp = SmtpServer::start(
        SmtpOptions::new()
            .auth("alerts", "pw")
            .starttls(&ca)
            .require_starttls(),
    );
    let body = format!(
        "{}[[notifiers]]\nname = \"mail\"\ntype = \"email\"\nserver = \"localhost\"\nport = {}\ntls = \"starttls\"\n\
         ca_file = \"{}\"\nusername = \"alerts\"\npassword = \"pw\"\nfrom = \"Outpost <outpost@example.com>\"\n\
         to = [\"a@example.com\", \"b@example.com\"]\ntimeout = \"5s\"\nretry_initial = \"100ms\"\nretry_max = \"300ms\"\n",
        RULE.replace("[\"hook\"]", "[\"mail\"]"),
        smtp.port(),
        ca.ca_pem().display()
    );
    let agent = start_alerting(&body);
    reading(&agent, "coldroom-2", 10.25).await;
    let mails = smtp.wait_for_messages_async(1, DEADLINE).await;
    let mail = &mails[0];
    assert_eq!(mail.auth_user.as_deref(), Some("alerts"));
    let mut to = mail.to.clone();
    to.sort();
    assert_eq!(to, vec!["a@example.com", "b@example.com"]);
    let data = mail.data_str();
    assert!(
        data.contains("Subject: FIRING [critical] Test site / coldroom-2: temperature 10.25"),
        "{data}"
    );
    assert!(
        data.contains("Condition: above 8 °C") || data.contains("Condition: above 8"),
        "{data}"
    );
    let conn = agent.conn();
    let uid: String = conn
        .query_row("SELECT hex(uid) FROM alert_events", [], |r| r.get(0))
        .unwrap();
    let message_id = format!(
        "Message-ID: <{}.mail@gw-test.outpost.invalid>",
        uid.to_lowercase()
    );
    assert!(data.contains(&message_id), "{message_id} in {data}");

    // The mail server goes away: the resolved mail waits and arrives after recovery.
    smtp.stop();
    reading(&agent, "coldroom-2", 3.0).await;
    wait_until_async("two failed attempts", DEADLINE, async || {
        outbox_states(agent.db()).get(1).is_some_and(|s| s.1 >= 2)
    })
    .await;
    smtp.start_again();
    let mails = smtp.wait_for_messages_async(2, DEADLINE).await;
    assert!(mails[1].data_str().contains("Subject: RESOLVED [critical]"));
    wait_until_async("delivered", DEADLINE, async || {
        outbox_states(agent.db())[1].0 == "delivered"
    })
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_implicit_tls_plain_relay_and_wrong_ca_through_notify_test() {
    let ca = TestCa::new();
    let smtps = SmtpServer::start(SmtpOptions::new().auth("u", "p").implicit_tls(&ca));
    let plain = SmtpServer::start(SmtpOptions::new());
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "[[notifiers]]\nname = \"smtps\"\ntype = \"email\"\nserver = \"127.0.0.1\"\nport = {}\ntls = \"implicit\"\n\
         ca_file = \"{ca}\"\nusername = \"u\"\npassword = \"p\"\nfrom = \"o@example.com\"\nto = [\"x@example.com\"]\n\
         [[notifiers]]\nname = \"relay\"\ntype = \"email\"\nserver = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         from = \"o@example.com\"\nto = [\"y@example.com\"]\n\
         [[notifiers]]\nname = \"wrongca\"\ntype = \"email\"\nserver = \"127.0.0.1\"\nport = {}\ntls = \"implicit\"\n\
         ca_file = \"{wrong}\"\nusername = \"u\"\npassword = \"p\"\nfrom = \"o@example.com\"\nto = [\"x@example.com\"]\ntimeout = \"5s\"\n",
        smtps.port(),
        plain.port(),
        smtps.port(),
        ca = ca.ca_pem().display(),
        wrong = ca.wrong_ca_pem().display(),
    );
    let config = load(dir.path(), &body);
    let ok = send_test(&config, "smtps").await.unwrap();
    assert_eq!(ok, outpost::notify::Outcome::Delivered);
    let mails = smtps.wait_for_messages_async(1, DEADLINE).await;
    assert!(mails[0].data_str().contains("Subject: TEST [info]"));
    assert_eq!(
        send_test(&config, "relay").await.unwrap(),
        outpost::notify::Outcome::Delivered
    );
    plain.wait_for_messages_async(1, DEADLINE).await;
    let wrong = send_test(&config, "wrongca").await.unwrap();
    assert!(
        matches!(&wrong, outpost::notify::Outcome::Retry(m) if m.to_lowercase().contains("certificate")),
        "{wrong:?}"
    );
    assert_eq!(
        smtps.messages().len(),
        1,
        "nothing sent to an unverified server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_notifier_runs_a_script_with_the_event() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record");
    let script = dir.path().join("siren.sh");
    std::fs::write(
        &script,
        format!("#!/bin/sh\ncat > {0}.json\nenv | grep ^OUTPOST_ | sort > {0}.env\necho \"$1\" > {0}.args\n", record.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let body = format!(
        "{}[[notifiers]]\nname = \"siren\"\ntype = \"exec\"\nprogram = \"{}\"\nargs = [\"--on\"]\ntimeout = \"5s\"\n",
        RULE.replace("[\"hook\"]", "[\"siren\"]"),
        script.display()
    );
    let config = load(dir.path(), &body);
    let agent = start_alerting_in(dir, config);
    reading(&agent, "coldroom-1", 9.0).await;
    let json_path = record.with_extension("json");
    wait_until_async("the script ran", DEADLINE, async || {
        outbox_states(agent.db())
            .first()
            .is_some_and(|s| s.0 == "delivered")
    })
    .await;
    let event: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert_eq!(event["kind"], "firing");
    assert_eq!(event["device"], "coldroom-1");
    let env = std::fs::read_to_string(record.with_extension("env")).unwrap();
    assert!(env.contains("OUTPOST_DEVICE=coldroom-1"), "{env}");
    assert!(env.contains("OUTPOST_EVENT_KIND=firing"), "{env}");
    assert!(env.contains("OUTPOST_VALUE=9"), "{env}");
    assert!(
        env.contains(&format!(
            "OUTPOST_IDEMPOTENCY_KEY={}:siren",
            event["uid"].as_str().unwrap()
        )),
        "{env}"
    );
    assert_eq!(
        std::fs::read_to_string(record.with_extension("args"))
            .unwrap()
            .trim(),
        "--on"
    );
    agent.shutdown().await;
}

#[test]
fn config_errors_name_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "[[alerts]]\nname = \"a\"\nkind = \"threshold\"\nmetric = \"t\"\nbelow = 2.0\nclear = 1.0\nnotifiers = [\"pager\"]\n\
         \n[[alerts]]\nname = \"b\"\nkind = \"stale\"\nmetric = \"t\"\nafter = \"often\"\n\
         \n[[notifiers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"ftp://x\"\n",
    );
    let (code, _, err) = outpost(["check", "-c", path.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("outpost.toml:14: alerts[0].clear: clear level 1 is below the alert level 2"),
        "{err}"
    );
    assert!(err.contains("outpost.toml:15: alerts[0].notifiers[0]: unknown notifier \"pager\"; configured notifiers: \"hook\""), "{err}");
    assert!(
        err.contains("outpost.toml:21: alerts[1].after: expected a duration"),
        "{err}"
    );
    assert!(
        err.contains("outpost.toml:26: notifiers[0].url: must start with https://"),
        "{err}"
    );
}

#[test]
fn notify_test_command_reports_the_outcome() {
    let receiver = HttpReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &webhook(&receiver.url(), ""));
    let notify_test =
        |notifier: &str| outpost(["notify-test", notifier, "-c", path.to_str().unwrap()]);
    let (code, stdout, stderr) = notify_test("hook");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("hook: delivered"));
    let req = &receiver.wait_for_requests(1, DEADLINE)[0];
    assert!(req.body_str().contains("\"kind\":\"test\""));
    receiver.set_handler(|_| Reply::status(401));
    let (code, _, stderr) = notify_test("hook");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("hook: NOT delivered (permanent failure): the webhook answered 401"));
    let (_, _, stderr) = notify_test("nope");
    assert!(stderr.contains("no notifier is called \"nope\""));
}

// ---- The real binary, killed with SIGKILL --------------------------------------------

/// The real agent in `dir`: a simulated cold room that goes warm at once, and a rule
/// that fires after `hold`, notifying the webhook at `url`.
fn binary_agent(dir: &Path, url: &str, hold: &str) -> Agent {
    let config = config_text(
        dir,
        &format!(
            "[[sources]]\ntype = \"simulated\"\nname = \"sim\"\ndevices = [\"coldroom-1\"]\nperiod = \"200ms\"\n\
             [[sources.metrics]]\nname = \"temperature\"\nunit = \"°C\"\nbase = 3.5\n\
             [sources.excursion]\ndevice = \"coldroom-1\"\nmetric = \"temperature\"\nafter = \"0s\"\nduration = \"1h\"\noffset = 8.0\n\
             \n[[alerts]]\nname = \"warm\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\nfor = \"{hold}\"\nnotifiers = [\"hook\"]\n\
             \n{}",
            webhook(url, "")
        ),
    );
    Agent::new(dir, &config).deadline(DEADLINE)
}

/// Reads `(state, since µs)` of the alert, if any, without disturbing the agent.
fn alert_state(db: &Path) -> Option<(String, i64)> {
    let conn = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    conn.query_row("SELECT state, since FROM alert_state", [], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .ok()
}

fn firing_events(db: &Path) -> Vec<(String, i64)> {
    let conn = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut stmt = conn
        .prepare("SELECT hex(uid), occurred_at FROM alert_events WHERE kind = 'firing'")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows
}

#[test]
fn sigkill_while_pending_keeps_the_timer_and_fires_once() {
    let receiver = HttpReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = binary_agent(dir.path(), &receiver.url(), "6s").start();
    let db = agent.db().to_path_buf();
    agent.wait_until("the alert to go pending", || {
        alert_state(&db).is_some_and(|s| s.0 == "pending")
    });
    let (_, pending_since) = alert_state(&db).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    agent.kill();
    assert!(
        firing_events(&db).is_empty(),
        "killed before the 6 s passed"
    );
    agent.start_again();
    let reqs = receiver.wait_for_requests(1, DEADLINE);
    let firing = firing_events(&db);
    assert_eq!(firing.len(), 1, "exactly one firing event");
    let (state, since) = alert_state(&db).unwrap();
    assert_eq!(state, "firing");
    assert_eq!(since, pending_since, "the pending start survived the kill");
    let took = Duration::from_micros((firing[0].1 - pending_since) as u64);
    // A reset timer would fire 6 s after the restart, i.e. 9 s or more after the start.
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_millis(8500),
        "fired {took:?} after the condition began"
    );
    let event: serde_json::Value = serde_json::from_slice(&reqs[0].body).unwrap();
    assert_eq!(event["kind"], "firing");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(receiver.requests().len(), 1, "no duplicate notification");
}

#[test]
fn sigkill_while_firing_neither_refires_nor_loses_the_notification() {
    // The receiver is down while the alert fires; the agent is killed with the
    // notification undelivered.
    let receiver = HttpReceiver::start_with(|_| Reply::status(503));
    let dir = tempfile::tempdir().unwrap();
    let mut agent = binary_agent(dir.path(), &receiver.url(), "0s").start();
    let db = agent.db().to_path_buf();
    receiver.wait_for_requests(2, DEADLINE);
    assert_eq!(alert_state(&db).map(|s| s.0).as_deref(), Some("firing"));
    agent.kill();
    let failed_keys: Vec<String> = receiver
        .requests()
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_string())
        .collect();

    receiver.set_handler(|_| Reply::ok());
    let before = receiver.requests().len();
    agent.start_again();
    agent.wait_until("delivery after the restart", || {
        outbox_states(&db)
            .first()
            .is_some_and(|s| s.0 == "delivered")
    });
    let after: Vec<_> = receiver.requests()[before..].to_vec();
    assert!(!after.is_empty());
    for r in &after {
        assert_eq!(
            r.header("idempotency-key"),
            Some(failed_keys[0].as_str()),
            "the same key after the restart"
        );
    }
    // The excursion goes on after the restart: still one firing event, still firing.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        firing_events(&db).len(),
        1,
        "no second firing event after the restart"
    );
    assert_eq!(alert_state(&db).map(|s| s.0).as_deref(), Some("firing"));
    assert_eq!(outbox_states(&db).len(), 1, "no new notification");
}

#[test]
fn demo_fires_and_resolves_its_alert_visibly() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["demo", "--duration", "40s", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let stdout = child.stdout.take().unwrap();
    let (mut fired, mut resolved) = (None, None);
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line.contains("ALERT FIRING") && line.contains("coldroom-1") {
            fired = Some(started.elapsed());
        }
        if line.contains("ALERT RESOLVED") && line.contains("coldroom-1") {
            resolved = Some(started.elapsed());
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let (fired, resolved) = (
        fired.expect("FIRING printed"),
        resolved.expect("RESOLVED printed"),
    );
    assert!(
        fired < resolved && resolved < Duration::from_secs(30),
        "{fired:?} {resolved:?}"
    );
    let report = outpost::cli::status::status_report(&dir.path().join("outpost.db")).unwrap();
    assert!(report.alerts.firing.is_empty());
}

/// `outpost notify-test`'s delivery, in-process.
async fn send_test(
    config: &outpost::config::Config,
    name: &str,
) -> anyhow::Result<outpost::notify::Outcome> {
    outpost::notify::send_test_event(
        &config.notifiers,
        &config.agent.site,
        &config.agent.gateway_id,
        name,
        &outpost::clock::Clock::system(),
    )
    .await
}
