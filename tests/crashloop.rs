//! Crash loop (issue 8.1): the real `outpost run` binary is killed with SIGKILL at
//! random moments and restarted, while every stage is busy at once:
//!
//! - ingest: a publisher sends ChirpStack v4 uplinks (JSON) at QoS 1 through a real
//!   mosquitto, steadily, with known deduplicationIds and fCnts;
//! - commit: group commits every few milliseconds;
//! - sync: PostgreSQL behind PgBouncer (transaction pooling) with a small batch size,
//!   so an upload transaction is open much of the time;
//! - notification: a threshold rule on a value that crosses it periodically, so events
//!   fire and resolve all the time, delivered to a webhook (the HTTP receiver) that
//!   sometimes answers slowly, past the notifier's timeout, or with a 503.
//!
//! At the end (publisher done, the last agent drained) every published message is in
//! SQLite and in PostgreSQL exactly once, `PRAGMA integrity_check` is ok, every alert
//! event reached the webhook at least once under one stable idempotency key, and
//! nothing is pending in the outbox.
//!
//! Kill moments come from a seeded RNG; the seed is printed. Environment:
//! - `OUTPOST_CRASH_LOOPS`: kill/restart cycles (default 10, about a minute; the full
//!   run in docs/reliability.md uses 1000);
//! - `OUTPOST_CRASH_SEED`: replay a seed.

mod support;

use outpost::model::Uid;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use rusqlite::{Connection, OpenFlags};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::agent::Agent;
use support::cold_room::{self, origin, EARLY_MS, EARLY_SHARE, FIELDS, RATE};
use support::publisher::QosPublisher;
use support::{HttpReceiver, Mosquitto, PgBouncer, Postgres, Reply};

const APP: &str = "0b9c3a52-6f0e-4d1a-9c3e-5a7b8c9d0e1f";
const GATEWAY: &str = "crash-gw";
const CLIENT_ID: &str = "outpost-crashloop";
/// Random run time of an agent before its SIGKILL, and pause before the restart.
const RUN_MS: std::ops::Range<u64> = 100..3000;
const PAUSE_MS: std::ops::Range<u64> = 0..500;
/// Added to every upload statement in PostgreSQL (a slow link to central).
const SYNC_DELAY: Duration = Duration::from_millis(25);
/// Generous: the box is small and shared. Plus a second per kill: whatever backlog
/// (unsynced readings, pending notifications) the kills left must drain at the end.
fn drain_deadline(loops: usize) -> Duration {
    Duration::from_secs(180 + loops as u64)
}

fn dedup_id(device: u64, f_cnt: u64) -> String {
    format!("crashloop-{device}-{f_cnt}")
}

fn dev_eui(device: u64) -> String {
    format!("70b3d57ed00000{device:02x}")
}

fn topic(device: u64) -> String {
    cold_room::topic(APP, &dev_eui(device))
}

/// The ChirpStack v4 JSON uplink event of message `n`, its device tagged with its room.
fn uplink(n: u64) -> Vec<u8> {
    let (device, f_cnt) = origin(n);
    let mut event = cold_room::uplink(APP, &dev_eui(device), n, &dedup_id(device, f_cnt));
    event["deviceInfo"]["tags"] = json!({ "room": "crash" });
    serde_json::to_vec(&event).expect("serialise uplink")
}

/// The reading uids of the first `messages` messages, in hex (as the agent derives them).
fn expected_uids(messages: u64) -> BTreeSet<String> {
    (0..messages)
        .flat_map(|n| {
            let (device, f_cnt) = origin(n);
            let id = dedup_id(device, f_cnt);
            FIELDS.map(|field| Uid::derive(&["chirpstack", &id, field]).to_hex())
        })
        .collect()
}

// ---- The agent ----------------------------------------------------------------------

fn agent_config(
    dir: &Path,
    broker: &Mosquitto,
    bouncer: &PgBouncer,
    pg: &Postgres,
    hook: &str,
) -> String {
    format!(
        r#"
[agent]
gateway_id = "{GATEWAY}"
site = "Crash loop"

[storage]
path = "{db}"
batch_max_delay = "10ms"

[http]
enabled = false

[sync]
url = "postgres://{user}@127.0.0.1:{bouncer_port}/{database}"
password = "{password}"
sslmode = "disable"
interval = "1s"
batch_size = 40
backlog_rows_per_second = 0
connect_timeout = "5s"
statement_timeout = "30s"
backoff_initial = "100ms"
backoff_max = "500ms"

{source}
{rule}
[[notifiers]]
name = "hook"
type = "webhook"
url = "{hook}/alerts"
secret = "crash-secret"
timeout = "1s"
retry_initial = "100ms"
retry_max = "500ms"
ttl = "1h"
"#,
        db = dir.join("outpost.db").display(),
        user = pg.user(),
        password = pg.password(),
        database = pg.database(),
        bouncer_port = bouncer.port(),
        source = cold_room::chirpstack_source(APP, broker.port(), CLIENT_ID),
        rule = cold_room::alert_rule("crash-warm", "hook"),
    )
}

// ---- Central --------------------------------------------------------------------------

/// A direct connection to PostgreSQL (not through PgBouncer) for the checks.
struct Central {
    client: tokio_postgres::Client,
}

impl Central {
    async fn connect(url: &str) -> Central {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to postgres");
        tokio::spawn(conn);
        Central { client }
    }

    async fn i64(&self, sql: &str) -> i64 {
        let rows = self
            .client
            .query_typed(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows[0].get(0)
    }

    async fn strings(&self, sql: &str) -> Vec<String> {
        let rows = self
            .client
            .query_typed(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Upload transactions of the agent open right now (through PgBouncer's server
    /// connections): active, or idle inside a transaction.
    async fn open_transactions(&self) -> i64 {
        self.i64(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
             AND backend_type = 'client backend' \
             AND (state = 'active' OR state LIKE 'idle in transaction%')",
        )
        .await
    }
}

// ---- What was going on at each kill ------------------------------------------------

#[derive(Debug, Default)]
struct KillStats {
    kills: usize,
    /// Kills within [`EARLY_MS`] of the start.
    early: usize,
    /// Published (broker-acknowledged) messages not yet committed locally.
    with_ingest_in_flight: usize,
    /// Readings committed but not yet marked synced.
    with_unsynced: usize,
    /// An upload transaction open in PostgreSQL.
    with_sync_transaction: usize,
    /// Outbox rows pending.
    with_outbox_pending: usize,
    /// A webhook request being answered slowly (the agent waits for it).
    with_delivery_in_flight: usize,
}

fn main_seed() -> u64 {
    std::env::var("OUTPOST_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

fn loops() -> usize {
    std::env::var("OUTPOST_CRASH_LOOPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

/// The webhook receiver's behaviour: mostly quick 200s; every 5th request takes 400 ms,
/// every 10th (from the 4th) 1.5 s, past the notifier's 1 s timeout (so the agent retries
/// it), every 23rd gets a 503. Records until when each slow reply is being sent.
fn webhook(busy: Arc<Mutex<Vec<Instant>>>) -> HttpReceiver {
    let calls = AtomicU64::new(0);
    HttpReceiver::start_with(move |_| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let delay = if n % 10 == 3 {
            Duration::from_millis(1500)
        } else if n % 5 == 1 {
            Duration::from_millis(400)
        } else {
            Duration::ZERO
        };
        if !delay.is_zero() {
            let mut busy = busy.lock().unwrap();
            let now = Instant::now();
            busy.retain(|until| *until > now);
            busy.push(now + delay);
        }
        if n % 23 == 7 {
            Reply::status(503).delay(delay)
        } else {
            Reply::ok().delay(delay)
        }
    })
}

#[test]
fn sigkill_at_random_moments_loses_nothing_duplicates_nothing_and_notifies_every_event() {
    let loops = loops();
    let seed = main_seed();
    eprintln!("crash loop: {loops} kills, seed {seed} (replay with OUTPOST_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // No per-client queue limit: mosquitto's default (1000) would silently drop the
    // excess queued for the agent's session while it is down.
    let broker = Mosquitto::builder().max_queued_messages(0).start();
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    let central = rt.block_on(async {
        let mut sync = outpost::sync::SyncConfig::with_url(bouncer.url());
        sync.sslmode = outpost::sync::SslMode::Disable;
        let options = outpost::sync::postgres::ConnectOptions::from_config(&sync, GATEWAY);
        let c = outpost::sync::postgres::connect(&options)
            .await
            .expect("connect through pgbouncer");
        outpost::sync::central::migrate(&c, outpost::sync::central::Layout::Plain)
            .await
            .expect("migrate");
        Central::connect(&pg.url()).await
    });
    // A slow link to central: every upload statement takes SYNC_DELAY longer, so an
    // upload transaction is open most of the time and kills land inside it.
    pg.psql(&format!(
        "CREATE FUNCTION outpost.crashloop_slow() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep({}); RETURN NULL; END $$; \
         CREATE TRIGGER crashloop_slow BEFORE INSERT ON outpost.readings \
         FOR EACH STATEMENT EXECUTE FUNCTION outpost.crashloop_slow();",
        SYNC_DELAY.as_secs_f64()
    ));
    let busy_replies = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let receiver = webhook(busy_replies.clone());

    let dir = tempfile::tempdir().expect("temp dir");
    let config = agent_config(dir.path(), &broker, &bouncer, &pg, &receiver.url());

    // 1. First start: the agent's persistent session and its subscription exist once a
    //    probe uplink (device "probe", outside the rule) is stored. Only then does the
    //    broker keep messages for the agent while it is down.
    let mut agent = Agent::new(dir.path(), &config).start();
    let probe_ok = {
        let probe = {
            let mut e: Value = serde_json::from_slice(&uplink(0)).unwrap();
            e["deduplicationId"] = json!("crashloop-probe");
            e["deviceInfo"]["deviceName"] = json!("probe");
            serde_json::to_vec(&e).unwrap()
        };
        let mut options = MqttOptions::new("crashloop-probe", "127.0.0.1", broker.port());
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        let poll = rt.spawn(async move { while eventloop.poll().await.is_ok() {} });
        let ok = support::wait_until(Duration::from_secs(60), || {
            let _ = client.try_publish(topic(0), QoS::AtLeastOnce, false, probe.clone());
            std::thread::sleep(Duration::from_millis(300));
            agent.try_count("SELECT COUNT(*) FROM readings WHERE device = 'probe'") == Some(2)
        });
        poll.abort();
        ok
    };
    assert!(
        probe_ok,
        "the probe was never stored:\n{}",
        agent.log_tail(80)
    );

    // 2. Steady publishing; SIGKILL at random moments, restart after a random pause.
    let publisher = QosPublisher::start(
        &rt,
        broker.port(),
        "crashloop-publisher",
        RATE,
        Box::new(|n| (topic(origin(n).0), uplink(n))),
    );
    let mut stats = KillStats::default();
    for i in 0..loops {
        let early = rng.gen_bool(EARLY_SHARE);
        let run = rng.gen_range(if early { EARLY_MS } else { RUN_MS });
        let pause = rng.gen_range(PAUSE_MS);
        std::thread::sleep(Duration::from_millis(run));
        // What is in flight right now (sampled just before the kill).
        let stored = agent
            .try_count("SELECT COUNT(*) FROM readings WHERE device LIKE 'dev-%'")
            .unwrap_or(0);
        let unsynced = agent
            .try_count("SELECT COUNT(*) FROM readings WHERE synced = 0")
            .unwrap_or(0);
        let pending = agent
            .try_count("SELECT COUNT(*) FROM outbox WHERE state = 'pending'")
            .unwrap_or(0);
        let transactions = rt.block_on(central.open_transactions());
        let now = Instant::now();
        let slow = busy_replies
            .lock()
            .unwrap()
            .iter()
            .filter(|u| **u > now)
            .count();
        let in_flight = (publisher.acked() as i64 * FIELDS.len() as i64 - stored).max(0);
        agent.kill();
        stats.kills += 1;
        stats.early += usize::from(early);
        stats.with_ingest_in_flight += usize::from(in_flight > 0);
        stats.with_unsynced += usize::from(unsynced > 0);
        stats.with_sync_transaction += usize::from(transactions > 0);
        stats.with_outbox_pending += usize::from(pending > 0);
        stats.with_delivery_in_flight += usize::from(slow > 0);
        eprintln!(
            "kill {i}: after {run} ms (pause {pause} ms); readings not yet stored {in_flight}, \
             unsynced {unsynced}, central transactions {transactions}, outbox pending {pending}, \
             slow webhook replies {slow}"
        );
        std::thread::sleep(Duration::from_millis(pause));
        agent.start_again();
    }

    // 3. The publisher stops; the broker took every message; the agent drains.
    let published = publisher.finish(&rt);
    let expected = expected_uids(published);
    let readings = expected.len() as i64;
    let drain_started = Instant::now();
    let mut last = String::new();
    let drained = support::wait_until(drain_deadline(loops), || {
        let q = |sql| agent.try_count(sql).unwrap_or(-1);
        let local = q("SELECT COUNT(*) FROM readings WHERE device LIKE 'dev-%'");
        let unsynced = q("SELECT COUNT(*) FROM readings WHERE synced = 0");
        let max_id = q("SELECT COALESCE(MAX(id), 0) FROM readings");
        let cursor = q(
            "SELECT COALESCE(CAST(value AS INTEGER), -1) FROM source_state \
             WHERE source = 'alerts' AND key = 'cursor'",
        );
        let pending = q("SELECT COUNT(*) FROM outbox WHERE state = 'pending'");
        let events_unsynced = q("SELECT COUNT(*) FROM alert_events WHERE synced = 0");
        let remote = rt.block_on(
            central.i64("SELECT COUNT(*) FROM outpost.readings WHERE device LIKE 'dev-%'"),
        );
        last = format!(
            "local {local}/{readings}, unsynced {unsynced}, central {remote}/{readings}, \
             alert cursor {cursor}/{max_id}, outbox pending {pending}, events unsynced {events_unsynced}"
        );
        local >= readings
            && remote >= readings
            && unsynced == 0
            && cursor >= max_id
            && pending == 0
            && events_unsynced == 0
    });
    assert!(
        drained,
        "not drained after {:?}: {last}\nagent log (tail):\n{}",
        drain_deadline(loops),
        agent.log_tail(80)
    );
    let drain = drain_started.elapsed();
    let status = agent.terminate();
    assert!(
        status.is_some_and(|s| s.success()),
        "the last agent did not stop cleanly on SIGTERM: {status:?}\n{}",
        agent.log_tail(80)
    );

    // 4. Exactly once, locally and centrally; the database is intact.
    let conn = Connection::open(agent.db()).expect("open the database");
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(integrity, "ok", "PRAGMA integrity_check");
    let column = |sql: &str| -> Vec<String> {
        let mut stmt = conn.prepare(sql).expect(sql);
        let rows = stmt.query_map([], |r| r.get::<_, String>(0)).expect(sql);
        rows.map(|r| r.expect(sql)).collect()
    };
    let local_uids = column("SELECT lower(hex(uid)) FROM readings WHERE device LIKE 'dev-%'");
    let local_set: BTreeSet<String> = local_uids.iter().cloned().collect();
    assert_eq!(
        local_uids.len(),
        local_set.len(),
        "duplicate uids in SQLite"
    );
    let local_per_origin: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM (SELECT device, json_extract(meta, '$.f_cnt') AS f, metric \
             FROM readings WHERE device LIKE 'dev-%' GROUP BY 1, 2, 3 HAVING COUNT(*) > 1)",
            [],
            |r| r.get(0),
        )
        .expect("duplicates by device and fCnt");
    assert_eq!(local_per_origin, 0, "a device+fCnt+metric stored twice");
    let missing: Vec<_> = expected.difference(&local_set).take(10).collect();
    let unknown: Vec<_> = local_set.difference(&expected).take(10).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "SQLite: {} of {} expected readings, missing e.g. {missing:?}, unexpected {unknown:?}",
        local_set.len(),
        expected.len()
    );

    let central_uids = rt.block_on(central.strings(&format!(
        "SELECT replace(uid::text, '-', '') FROM outpost.readings \
         WHERE gateway_id = '{GATEWAY}' AND device LIKE 'dev-%'"
    )));
    let central_set: BTreeSet<String> = central_uids.iter().cloned().collect();
    assert_eq!(
        central_uids.len(),
        central_set.len(),
        "duplicate uids in PostgreSQL"
    );
    let central_dupes = rt.block_on(central.i64(
        "SELECT COUNT(*) FROM (SELECT device, meta->>'f_cnt', metric FROM outpost.readings \
         WHERE device LIKE 'dev-%' GROUP BY 1, 2, 3 HAVING COUNT(*) > 1) d",
    ));
    assert_eq!(central_dupes, 0, "a device+fCnt+metric twice in PostgreSQL");
    assert!(
        central_set == expected,
        "PostgreSQL: {} of {} expected readings, missing e.g. {:?}",
        central_set.len(),
        expected.len(),
        expected
            .difference(&central_set)
            .take(10)
            .collect::<Vec<_>>()
    );

    // 5. Every alert event notified, under one stable key; nothing pending.
    let mut events: BTreeMap<String, String> = BTreeMap::new(); // uid -> kind
    {
        let mut stmt = conn
            .prepare("SELECT lower(hex(uid)), kind, message FROM alert_events")
            .expect("events");
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .expect("events");
        for row in rows {
            let (uid, kind, message) = row.expect("event row");
            let body: Value = serde_json::from_str(&message).expect("event message is JSON");
            assert_eq!(
                body["uid"],
                json!(uid),
                "the message carries the event's uid"
            );
            events.insert(uid, kind);
        }
    }
    let firing = events.values().filter(|k| *k == "firing").count();
    let resolved = events.values().filter(|k| *k == "resolved").count();
    assert!(
        firing > 0 && resolved > 0,
        "the rule fired {firing} and resolved {resolved} times"
    );
    let outbox_rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
        .expect("outbox");
    let not_delivered = column(
        "SELECT state || ' ' || COALESCE(last_error, '') FROM outbox WHERE state <> 'delivered'",
    );
    assert!(
        not_delivered.is_empty(),
        "outbox rows not delivered: {not_delivered:?}"
    );
    assert_eq!(
        outbox_rows as usize,
        events.len(),
        "one outbox row per event"
    );

    let requests = receiver.requests();
    let mut keys: HashMap<String, BTreeSet<String>> = HashMap::new();
    for r in &requests {
        let body: Value = serde_json::from_slice(&r.body).expect("webhook body is JSON");
        let uid = body["uid"].as_str().expect("body uid").to_string();
        let key = r
            .header("idempotency-key")
            .expect("idempotency key")
            .to_string();
        keys.entry(uid).or_default().insert(key);
    }
    let unknown_keys: Vec<_> = keys.keys().filter(|u| !events.contains_key(*u)).collect();
    assert!(
        unknown_keys.is_empty(),
        "deliveries for events that are not in the database: {unknown_keys:?}"
    );
    let undelivered: Vec<_> = events.keys().filter(|u| !keys.contains_key(*u)).collect();
    assert!(
        undelivered.is_empty(),
        "events never delivered to the webhook: {undelivered:?}"
    );
    for (uid, set) in &keys {
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            vec![&format!("{uid}:hook")],
            "every delivery of event {uid} carries the same key"
        );
    }
    let central_events = rt.block_on(central.strings(&format!(
        "SELECT replace(uid::text, '-', '') FROM outpost.alert_events WHERE gateway_id = '{GATEWAY}'"
    )));
    let central_events: BTreeSet<String> = central_events.into_iter().collect();
    let local_events: BTreeSet<String> = events.keys().cloned().collect();
    assert!(
        central_events == local_events,
        "alert events: {} local, {} central",
        local_events.len(),
        central_events.len()
    );

    // What passed so far, printed before the replay check so that a failing run still
    // reports it.
    eprintln!(
        "after {} kills: {published} messages = {readings} readings exactly once in SQLite and \
         PostgreSQL, integrity ok; {} alert events ({firing} firing, {resolved} resolved) all \
         delivered under one key ({} webhook requests), outbox empty",
        stats.kills,
        events.len(),
        requests.len()
    );

    // 6. The alert engine evaluated every committed reading exactly once, in commit
    //    order, across all the crashes: replaying the rule over the readings as stored
    //    gives exactly the stored events (kind and value, per device, in order).
    let mut replayed: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    let mut firing_now: HashMap<String, bool> = HashMap::new();
    {
        let mut stmt = conn
            .prepare(
                "SELECT device, value FROM readings WHERE device LIKE 'dev-%' \
                 AND metric = 'temperature' ORDER BY id",
            )
            .expect("readings in commit order");
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?)))
            .expect("readings in commit order");
        for row in rows {
            let (device, value) = row.expect("reading");
            let firing = firing_now.entry(device.clone()).or_default();
            if !*firing && value > 8.0 {
                *firing = true;
                replayed
                    .entry(device)
                    .or_default()
                    .push(("firing".into(), value));
            } else if *firing && value <= 6.0 {
                *firing = false;
                replayed
                    .entry(device)
                    .or_default()
                    .push(("resolved".into(), value));
            }
        }
    }
    let mut stored_events: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    {
        let mut stmt = conn
            .prepare("SELECT device, kind, value FROM alert_events ORDER BY id")
            .expect("events in order");
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, f64>(2)?,
                ))
            })
            .expect("events in order");
        for row in rows {
            let (device, kind, value) = row.expect("event");
            stored_events.entry(device).or_default().push((kind, value));
        }
    }
    for (device, expected_events) in &replayed {
        let got = stored_events.get(device).cloned().unwrap_or_default();
        if &got != expected_events {
            let at = got
                .iter()
                .zip(expected_events)
                .position(|(a, b)| a != b)
                .unwrap_or(got.len().min(expected_events.len()));
            panic!(
                "{device}: {} events stored, {} expected from the readings in commit order; \
                 first difference at event {at}: stored {:?}, expected {:?}",
                got.len(),
                expected_events.len(),
                got.get(at),
                expected_events.get(at)
            );
        }
    }
    assert_eq!(
        stored_events.keys().collect::<Vec<_>>(),
        replayed.keys().collect::<Vec<_>>()
    );

    // 7. The broker kept the agent's session across every kill: only the very first
    //    connection found no session.
    let log_text = agent.full_log();
    let fresh = log_text.matches("session_present=false").count();
    let resumed = log_text.matches("session_present=true").count();
    assert_eq!(
        fresh, 1,
        "connections without a stored session (only the first)"
    );

    eprintln!(
        "crash loop done in {:.1} s (seed {seed}): {} kills; {published} messages = {readings} readings, \
         exactly once in SQLite ({}) and PostgreSQL ({}); integrity ok; {} alert events \
         ({firing} firing, {resolved} resolved), {} webhook requests, every event delivered \
         under one key, outbox empty; drained in {:.1} s after the last restart's publishing ended",
        started.elapsed().as_secs_f64(),
        stats.kills,
        local_set.len(),
        central_set.len(),
        events.len(),
        requests.len(),
        drain.as_secs_f64()
    );
    eprintln!(
        "kills: {} within {EARLY_MS:?} ms of the start; with ingest in flight {}, unsynced \
         readings {}, a central transaction open {}, outbox pending {}, a slow webhook reply \
         in flight {}; {resumed} MQTT connections resumed the persistent session, 1 created it",
        stats.early,
        stats.with_ingest_in_flight,
        stats.with_unsynced,
        stats.with_sync_transaction,
        stats.with_outbox_pending,
        stats.with_delivery_in_flight
    );
}

/// The alert engine's very first start evaluates from the newest reading on ("from now
/// on, not the whole history"). That starting point must be durable: a SIGKILL in the
/// first seconds of the first start, after a reading committed and before the engine
/// saved anything, must not move the start past that reading at the next start.
#[test]
fn a_sigkill_early_in_the_first_start_forgets_no_committed_reading() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let broker = Mosquitto::start();
    let receiver = HttpReceiver::start();
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    let dir = tempfile::tempdir().expect("temp dir");
    // Group commits at most every 300 ms: the engine's first save comes at least one
    // commit after the reading's, which leaves a wide window for the kill.
    let config = agent_config(dir.path(), &broker, &bouncer, &pg, &receiver.url())
        .replace("batch_max_delay = \"10ms\"", "batch_max_delay = \"300ms\"");
    // Central is not needed here: no schema, the sync worker just retries.
    let mut agent = Agent::new(dir.path(), &config).start();

    let mut options = MqttOptions::new("crashloop-early", "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let poll = rt.spawn(async move { while eventloop.poll().await.is_ok() {} });
    let publish = |payload: Vec<u8>| {
        rt.block_on(client.publish(topic(0), QoS::AtLeastOnce, false, payload))
            .expect("publish");
    };
    // Subscribed once a probe (outside the rule) is stored; quickly, well within the
    // engine's first cursor save.
    let probe = {
        let mut e: Value = serde_json::from_slice(&uplink(0)).unwrap();
        e["deduplicationId"] = json!("early-probe");
        e["deviceInfo"]["deviceName"] = json!("probe");
        serde_json::to_vec(&e).unwrap()
    };
    let started = Instant::now();
    let stored = support::wait_until(Duration::from_secs(30), || {
        publish(probe.clone());
        let deadline = Instant::now() + Duration::from_millis(100);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
            if agent.try_count("SELECT COUNT(*) FROM readings WHERE device = 'probe'") == Some(2) {
                return true;
            }
        }
        false
    });
    assert!(stored, "the probe was never stored");
    // A hot reading; SIGKILL the moment it is committed.
    let hot = {
        let mut e: Value = serde_json::from_slice(&uplink(0)).unwrap();
        e["deduplicationId"] = json!("early-hot");
        e["object"]["temperature"] = json!(12.5);
        serde_json::to_vec(&e).unwrap()
    };
    publish(hot);
    // Polled every millisecond on one connection.
    let committed = {
        let conn = loop {
            if let Ok(c) = Connection::open_with_flags(agent.db(), OpenFlags::SQLITE_OPEN_READ_ONLY)
            {
                break c;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let n: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM readings WHERE device = 'dev-0' AND metric = 'temperature'",
                    [],
                    |r| r.get(0),
                )
                .unwrap_or(0);
            if n == 1 || Instant::now() > deadline {
                break n == 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    assert!(committed, "the hot reading was never stored");
    agent.kill();
    let killed_after = started.elapsed();
    let events_before = agent
        .try_count("SELECT COUNT(*) FROM alert_events")
        .unwrap_or(0);
    eprintln!("killed {killed_after:?} after the probe started; {events_before} events saved");

    // Restart: the hot reading was committed (and acknowledged), so it is evaluated.
    agent.start_again();
    let fired = support::wait_until(Duration::from_secs(30), || {
        agent.try_count("SELECT COUNT(*) FROM alert_events WHERE kind = 'firing'") == Some(1)
    });
    poll.abort();
    agent.kill();
    assert!(
        fired,
        "the committed hot reading was never evaluated (the first start's cursor was \
         not saved); agent log:\n{}",
        agent.full_log()
    );
}
