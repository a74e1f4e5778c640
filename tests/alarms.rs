//! Cold-chain alarm handling (issue 16, items 1, 2 and 7): acknowledgement from the CLI
//! while the agent runs and from central through PgBouncer (transaction pooling),
//! escalation steps with and without acknowledgement, kill -9 while an escalation is
//! pending, resolution to everyone notified, and bad input — against the real binary,
//! the real webhook receiver and aiosmtpd SMTP server, PostgreSQL and PgBouncer.
//!
//! Time is explicit: the agent runs on the real clock and the steps are seconds apart
//! (escalation accepts `after` from 1s); the reminder test waits out the 1-minute
//! minimum of `reminder`. The engine's timers themselves are tested step by step, with
//! explicit `now`, in `src/alerts/ack.rs` and `src/alerts/engine.rs`.

mod support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};
use support::agent::{outpost, Agent};
use support::{HttpReceiver, PgBouncer, Postgres, RecordedRequest, Reply, SmtpOptions, SmtpServer};

const DEADLINE: Duration = Duration::from_secs(60);

/// A simulated source `name` whose `device` reads about 11.5 °C from `after` for
/// `duration` (3.5 °C otherwise).
fn hot_source(name: &str, device: &str, after: &str, duration: &str) -> String {
    format!(
        "[[sources]]\ntype = \"simulated\"\nname = \"{name}\"\ndevices = [\"{device}\"]\nperiod = \"200ms\"\n\
         [[sources.metrics]]\nname = \"temperature\"\nunit = \"°C\"\nbase = 3.5\n\
         [sources.excursion]\ndevice = \"{device}\"\nmetric = \"temperature\"\nafter = \"{after}\"\nduration = \"{duration}\"\noffset = 8.0\n\n"
    )
}

fn webhook(name: &str, url: &str, path: &str) -> String {
    format!(
        "[[notifiers]]\nname = \"{name}\"\ntype = \"webhook\"\nurl = \"{url}/{path}\"\nsecret = \"s3cret\"\n\
         retry_initial = \"500ms\"\nretry_max = \"1s\"\ntimeout = \"2s\"\n\n"
    )
}

fn email(name: &str, smtp: &SmtpServer) -> String {
    format!(
        "[[notifiers]]\nname = \"{name}\"\ntype = \"email\"\nserver = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\
         from = \"outpost@example.com\"\nto = [\"boss@example.com\"]\nretry_initial = \"500ms\"\nretry_max = \"1s\"\n\n",
        smtp.port()
    )
}

fn sync_section(pg: &Postgres, bouncer: &PgBouncer) -> String {
    format!(
        "[sync]\nurl = \"postgres://{user}@127.0.0.1:{port}/{db}\"\npassword = \"{password}\"\nsslmode = \"disable\"\n\
         interval = \"1s\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\n\n",
        user = pg.user(),
        port = bouncer.port(),
        db = pg.database(),
        password = pg.password(),
    )
}

fn head(dir: &Path, gateway: &str) -> String {
    format!(
        "[agent]\ngateway_id = \"{gateway}\"\nsite = \"Alarm test\"\n\n[storage]\npath = \"{}\"\nbatch_max_delay = \"10ms\"\n\n\
         [http]\nenabled = false\n\n",
        dir.join("outpost.db").display()
    )
}

/// Applies the central schema through the CLI, as an operator would.
fn migrate_central(pg: &Postgres) {
    let (code, out, err) = outpost([
        "--config",
        "/nonexistent/outpost.toml",
        "central",
        "migrate",
        "--url",
        &pg.url(),
        "--sslmode",
        "disable",
    ]);
    assert_eq!(code, Some(0), "central migrate: {out}{err}");
}

fn ack(agent: &Agent, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["--config", agent.config_path().to_str().unwrap(), "ack"];
    all.extend_from_slice(args);
    outpost(all)
}

fn body(r: &RecordedRequest) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

/// `(kind, device)` of the webhook requests, in order.
fn kinds(requests: &[RecordedRequest]) -> Vec<(String, String)> {
    requests
        .iter()
        .map(|r| {
            let b = body(r);
            (
                b["kind"].as_str().unwrap_or("").to_string(),
                b["device"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn firing_count(agent: &Agent) -> i64 {
    agent
        .try_count("SELECT COUNT(*) FROM alert_state WHERE state = 'firing'")
        .unwrap_or(0)
}

#[test]
fn cli_ack_while_running_stops_reminders_and_escalation_shows_in_status_and_syncs() {
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    migrate_central(&pg);
    let hook = HttpReceiver::start();
    let smtp = SmtpServer::start(SmtpOptions::new());
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}{}{}{}{}{}\
         [[alerts]]\nname = \"warm\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\n\
         severity = \"critical\"\nnotifiers = [\"hook\"]\nreminder = \"1m\"\n\
         [[alerts.escalation]]\nafter = \"10s\"\nnotifiers = [\"night\"]\n",
        head(dir.path(), "gw-ack"),
        sync_section(&pg, &bouncer),
        hot_source("sim1", "coldroom-1", "0s", "1h"),
        hot_source("sim2", "coldroom-2", "0s", "1h"),
        webhook("hook", &hook.url(), "alerts"),
        email("night", &smtp),
    );
    let mut agent = Agent::new(dir.path(), &config).deadline(DEADLINE).start();
    agent.wait_until("both cold rooms firing", || firing_count(&agent) == 2);
    let fired = Instant::now();

    let (code, out, err) = ack(
        &agent,
        &[
            "warm",
            "--device",
            "coldroom-1",
            "--by",
            "Maria Lopez",
            "--note",
            "door was open, closed it",
        ],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("Acknowledged warm on coldroom-1"), "{out}");

    // The status shows it, as text and as JSON.
    let text = agent.status_text();
    assert!(
        text.contains("warm / coldroom-1: acknowledged by Maria Lopez at ")
            && text.contains("(cli): door was open, closed it"),
        "{text}"
    );
    let json = agent.status_json();
    let firing = json["alerts"]["firing"].as_array().unwrap();
    let one = firing.iter().find(|f| f["device"] == "coldroom-1").unwrap();
    assert_eq!(one["acknowledged"]["by"], "Maria Lopez");
    assert_eq!(one["acknowledged"]["channel"], "cli");
    assert_eq!(one["acknowledged"]["note"], "door was open, closed it");
    let two = firing.iter().find(|f| f["device"] == "coldroom-2").unwrap();
    assert!(two["acknowledged"].is_null(), "{two}");

    // The acknowledged event reaches central with who, note and channel.
    let synced = support::util::wait_until(DEADLINE, || {
        pg.try_psql(
            "SELECT actor || '|' || note || '|' || channel FROM outpost.alert_events \
             WHERE gateway_id = 'gw-ack' AND kind = 'acknowledged'",
        )
        .is_ok_and(|o| o == "Maria Lopez|door was open, closed it|cli")
    });
    assert!(
        synced,
        "the acknowledged event was not synced; log:\n{}",
        agent.log()
    );

    // Bad input: clear errors, exit 2, nothing written.
    let (code, _, err) = ack(&agent, &["wrm", "--by", "Maria"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("unknown rule \"wrm\"; configured rules: warm"),
        "{err}"
    );
    let big = dir.path().join("note.txt");
    std::fs::write(&big, "x".repeat(1024 * 1024)).unwrap();
    let (code, _, err) = ack(
        &agent,
        &[
            "warm",
            "--device",
            "coldroom-2",
            "--by",
            "Maria",
            "--note-file",
            big.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("at most 1000") && err.contains("nothing was written"),
        "{err}"
    );
    let (code, _, err) = ack(&agent, &["warm", "--by", ""]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("must not be empty"), "{err}");
    let (code, _, err) = ack(&agent, &["warm", "--by", "Eve\u{1b}[2J"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("control characters"), "{err}");
    let (code, _, err) = ack(&agent, &["warm", "--device", "freezer-9", "--by", "Maria"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("no firing alarm warm on freezer-9"), "{err}");
    let (code, out, _) = ack(&agent, &["warm", "--device", "coldroom-1", "--by", "Bob"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("already acknowledged (by Maria Lopez"),
        "{out}"
    );
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM alert_events WHERE kind = 'acknowledged'"),
        1
    );
    assert_eq!(
        agent.count(
            "SELECT COUNT(*) FROM alert_state WHERE device = 'coldroom-2' AND acked_at IS NULL"
        ),
        1,
        "the refused acknowledgements wrote nothing"
    );

    // The unacknowledged alarm escalates (one mail, about coldroom-2 only) and gets its
    // reminder after a minute; the acknowledged one gets neither.
    let mails = smtp.wait_for_messages(1, DEADLINE);
    assert!(
        mails[0].data_str().contains("coldroom-2"),
        "{}",
        mails[0].data_str()
    );
    let wait = Duration::from_secs(68).saturating_sub(fired.elapsed());
    std::thread::sleep(wait);
    let seen = kinds(&hook.requests());
    assert!(
        seen.contains(&("reminder".into(), "coldroom-2".into())),
        "{seen:?}"
    );
    let about_one: Vec<_> = seen.iter().filter(|(_, d)| d == "coldroom-1").collect();
    assert_eq!(
        about_one,
        [&("firing".to_string(), "coldroom-1".to_string())]
    );
    let escalations = smtp
        .messages()
        .iter()
        .filter(|m| m.data_str().contains("ESCALATED"))
        .count();
    assert_eq!(escalations, 1, "one escalation, once");
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM alert_events WHERE kind IN ('reminder', 'escalated') AND device = 'coldroom-1'"),
        0
    );
    agent.assert_running();
}

#[test]
fn central_acks_through_pgbouncer_are_applied_and_reported_back() {
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    migrate_central(&pg);
    let hook = HttpReceiver::start();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}{}{}{}\
         [[alerts]]\nname = \"warm\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\n\
         notifiers = [\"hook\"]\n\
         [[alerts.escalation]]\nafter = \"25s\"\nnotifiers = [\"hook\"]\n",
        head(dir.path(), "gw-central"),
        sync_section(&pg, &bouncer),
        hot_source("sim", "coldroom-1", "0s", "15s"),
        webhook("hook", &hook.url(), "alerts"),
    );
    let mut agent = Agent::new(dir.path(), &config).deadline(DEADLINE).start();
    let synced = support::util::wait_until(DEADLINE, || {
        pg.try_psql("SELECT COUNT(*) FROM outpost.alert_events WHERE gateway_id = 'gw-central' AND kind = 'firing'")
            .is_ok_and(|o| o == "1")
    });
    assert!(synced, "firing not synced; log:\n{}", agent.log());

    pg.psql(
        "INSERT INTO outpost.alert_acks (gateway_id, rule, device, acked_by, note) VALUES \
         ('gw-central', 'warm', 'coldroom-1', 'Ops Centre', 'called the site, door closed'), \
         ('gw-central', 'nope', NULL, 'Ops Centre', NULL), \
         ('gw-central', 'warm', NULL, 'Ops Centre', repeat('x', 1048576)), \
         ('gw-central', 'warm', NULL, 'Ops Centre', 'second time'), \
         ('gw-other', 'warm', NULL, 'Ops Centre', 'not for this gateway')",
    );
    let applied = support::util::wait_until(DEADLINE, || {
        pg.try_psql("SELECT COUNT(*) FROM outpost.alert_acks WHERE applied_at IS NOT NULL")
            .is_ok_and(|o| o == "4")
    });
    assert!(applied, "acks not applied; log:\n{}", agent.log());
    let results = pg.psql(
        "SELECT id || ':' || COALESCE(result, 'pending') FROM outpost.alert_acks ORDER BY id",
    );
    let results: Vec<&str> = results.lines().collect();
    assert_eq!(results[0], "1:applied");
    assert_eq!(results[1], "2:unknown alarm");
    assert!(
        results[2].starts_with("3:invalid: the note is 1048576 characters long; at most 1000"),
        "{}",
        results[2]
    );
    assert_eq!(results[3], "4:already acknowledged");
    assert_eq!(
        results[4], "5:pending",
        "another gateway's ack stays pending"
    );

    // Applied locally with channel central; the event goes back up.
    assert_eq!(
        agent.strings("SELECT acked_by || '|' || ack_channel || '|' || ack_note FROM alert_state"),
        ["Ops Centre|central|called the site, door closed"]
    );
    let back = support::util::wait_until(DEADLINE, || {
        pg.try_psql(
            "SELECT actor || '|' || channel FROM outpost.alert_events WHERE gateway_id = 'gw-central' AND kind = 'acknowledged'",
        )
        .is_ok_and(|o| o == "Ops Centre|central")
    });
    assert!(back, "acknowledged event not synced; log:\n{}", agent.log());

    // The acknowledgement survives a restart (G3): still firing, still acknowledged,
    // no second acknowledged event.
    agent.terminate();
    agent.start_again();
    let text = agent.status_text();
    assert!(
        text.contains("warm / coldroom-1: acknowledged by Ops Centre at ")
            && text.contains("(central): called the site, door closed"),
        "{text}"
    );
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM alert_events WHERE kind IN ('acknowledged', 'firing')"),
        2
    );

    // After the excursion the alarm resolves; an ack then is reported back as such,
    // and the acknowledged alarm never escalated.
    agent.wait_until("the alarm to resolve", || {
        agent.try_count("SELECT COUNT(*) FROM alert_events WHERE kind = 'resolved'") == Some(1)
    });
    pg.psql("INSERT INTO outpost.alert_acks (gateway_id, rule, acked_by) VALUES ('gw-central', 'warm', 'Late Larry')");
    let late = support::util::wait_until(DEADLINE, || {
        pg.try_psql("SELECT result FROM outpost.alert_acks WHERE acked_by = 'Late Larry'")
            .is_ok_and(|o| o == "already resolved")
    });
    assert!(
        late,
        "late ack: {}",
        pg.psql("SELECT * FROM outpost.alert_acks")
    );
    let seen = kinds(&hook.requests());
    assert!(!seen.iter().any(|(k, _)| k == "escalated"), "{seen:?}");
    assert!(seen.iter().any(|(k, _)| k == "resolved"), "{seen:?}");
}

#[test]
fn escalation_is_sent_exactly_once_across_kill_9_and_resolution_reaches_everyone_notified() {
    let hook = HttpReceiver::start();
    // The night phone's gateway fails until after the kill: the first step's
    // notification is pending when the agent dies.
    let night = HttpReceiver::start_with(|_| Reply::status(503));
    let smtp = SmtpServer::start(SmtpOptions::new());
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{}{}{}{}{}\
         [[alerts]]\nname = \"warm\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\n\
         severity = \"critical\"\nnotifiers = [\"hook\"]\n\
         [[alerts.escalation]]\nafter = \"2s\"\nnotifiers = [\"night\"]\n\
         [[alerts.escalation]]\nafter = \"12s\"\nnotifiers = [\"boss\", \"night\"]\n",
        head(dir.path(), "gw-esc"),
        hot_source("sim", "coldroom-1", "0s", "25s"),
        webhook("hook", &hook.url(), "alerts"),
        webhook("night", &night.url(), "night"),
        email("boss", &smtp),
    );
    let mut agent = Agent::new(dir.path(), &config).deadline(DEADLINE).start();
    night.wait_for_requests(1, DEADLINE);
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM alert_events WHERE kind = 'escalated'"),
        1
    );
    agent.kill();
    let escalated_uid: String = agent
        .strings("SELECT hex(uid) FROM alert_events WHERE kind = 'escalated'")
        .remove(0);
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM outbox WHERE notifier = 'night' AND state = 'pending'"),
        1,
        "killed with the step's notification undelivered"
    );
    let failed_before = night.requests().len();
    night.set_handler(|_| Reply::ok());
    agent.start_again();

    // Step 2 (12 s after the firing, counted across the restart) goes to the boss by
    // mail and to the night phone; step 1 is delivered, and not decided again.
    let mails = smtp.wait_for_messages(1, DEADLINE);
    assert!(
        mails[0].data_str().contains("ESCALATED"),
        "{}",
        mails[0].data_str()
    );
    agent.wait_until("the resolution", || {
        agent.try_count("SELECT COUNT(*) FROM alert_events WHERE kind = 'resolved'") == Some(1)
    });
    agent.wait_until("every notification delivered", || {
        agent.try_count("SELECT COUNT(*) FROM outbox WHERE state <> 'delivered'") == Some(0)
    });
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM alert_events WHERE kind = 'escalated'"),
        2,
        "each step decided once"
    );
    assert_eq!(
        agent.strings("SELECT hex(uid) FROM alert_events WHERE kind = 'escalated' ORDER BY id")[0],
        escalated_uid
    );
    let after: Vec<RecordedRequest> = night.requests()[failed_before..].to_vec();
    let events: BTreeSet<(String, String)> = after
        .iter()
        .map(|r| {
            let b = body(r);
            (
                b["kind"].as_str().unwrap_or("").to_string(),
                b["uid"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let night_kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        night_kinds,
        ["escalated", "escalated", "resolved"],
        "two steps and the resolution, each delivered as one event: {events:?}"
    );
    let ok_deliveries = after.len();
    assert_eq!(ok_deliveries, 3, "no duplicate delivery after the restart");
    // The boss (reached by step 2 only) gets the resolution too; so does the rule's
    // own notifier.
    let mails = smtp.wait_for_messages(2, DEADLINE);
    assert!(
        mails[1].data_str().contains("RESOLVED"),
        "{}",
        mails[1].data_str()
    );
    let seen = kinds(&hook.requests());
    assert!(
        seen.contains(&("resolved".into(), "coldroom-1".into())),
        "{seen:?}"
    );
    assert!(
        !seen.iter().any(|(k, _)| k == "escalated"),
        "steps go to their own notifiers only"
    );
}

#[test]
fn a_gateway_role_without_the_ack_grant_still_syncs_and_applies_acks_once_granted() {
    let pg = Postgres::start();
    migrate_central(&pg);
    // The role of operator.md as it was before schema 2 (connecting directly: the
    // test PgBouncer knows only the test's own user): no grant on alert_acks.
    pg.psql_superuser(
        "CREATE ROLE old_gateway LOGIN PASSWORD 'old-pass';
         GRANT USAGE ON SCHEMA outpost TO old_gateway;
         GRANT SELECT ON outpost.schema_version TO old_gateway;
         GRANT INSERT ON outpost.readings, outpost.alert_events TO old_gateway;
         GRANT SELECT, INSERT, UPDATE ON outpost.gateways TO old_gateway;",
    );
    let dir = tempfile::tempdir().unwrap();
    let sync = format!(
        "[sync]\nurl = \"postgres://old_gateway@127.0.0.1:{port}/{db}\"\npassword = \"old-pass\"\nsslmode = \"disable\"\n\
         interval = \"1s\"\nbackoff_initial = \"100ms\"\nbackoff_max = \"1s\"\n\n",
        port = pg.port(),
        db = pg.database(),
    );
    let config = format!(
        "{}{}{}\
         [[alerts]]\nname = \"warm\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\n",
        head(dir.path(), "gw-grant"),
        sync,
        hot_source("sim", "coldroom-1", "0s", "1h"),
    );
    let agent = Agent::new(dir.path(), &config).deadline(DEADLINE).start();
    let synced = support::util::wait_until(DEADLINE, || {
        pg.try_psql(
            "SELECT (SELECT COUNT(*) FROM outpost.readings WHERE gateway_id = 'gw-grant') > 0 \
             AND (SELECT COUNT(*) FROM outpost.alert_events WHERE gateway_id = 'gw-grant' AND kind = 'firing') = 1",
        )
        .is_ok_and(|o| o == "t")
    });
    assert!(
        synced,
        "readings and events must sync without the grant; log:\n{}",
        agent.log()
    );
    agent.wait_until("the grant warning", || {
        agent
            .log()
            .contains("grant the gateways' role SELECT, UPDATE on outpost.alert_acks")
    });
    pg.psql("INSERT INTO outpost.alert_acks (gateway_id, rule, acked_by) VALUES ('gw-grant', 'warm', 'Ops Centre')");
    pg.psql_superuser("GRANT SELECT, UPDATE ON outpost.alert_acks TO old_gateway;");
    let applied = support::util::wait_until(DEADLINE, || {
        pg.try_psql("SELECT result FROM outpost.alert_acks WHERE gateway_id = 'gw-grant'")
            .is_ok_and(|o| o == "applied")
    });
    assert!(applied, "log:\n{}", agent.log());
}
