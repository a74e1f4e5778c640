//! Central sync against a real PostgreSQL 15 behind a real PgBouncer in transaction
//! pooling mode with a pool of 2 server connections.
//!
//! Backlogs are written straight into the agents' SQLite files (bulk inserts), which
//! is what an outage leaves behind, and keeps the suite fast.

mod support;

use outpost::config::{AgentConfig, HumanDuration, Secret};
use outpost::model::{flags, Reading, Uid};
use outpost::sync::central::{self, Layout};
use outpost::sync::postgres::{connect, ConnectOptions};
use outpost::sync::{SslMode, SyncConfig, SyncError};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};
use support::agent::InProcessAgent as Agent;
use support::util::wait_until_async;
use support::{PgBouncer, Postgres, TestCa};
use tokio_postgres::types::Type;

/// Generous: this box is small and shared.
const DEADLINE: Duration = Duration::from_secs(90);

fn options(url: &str) -> ConnectOptions {
    let mut sync = SyncConfig::with_url(url);
    sync.sslmode = SslMode::Disable;
    ConnectOptions::from_config(&sync, "test")
}

/// PostgreSQL + PgBouncer (transaction mode, pool 2), schema migrated through PgBouncer.
async fn central(layout: Layout) -> (Postgres, PgBouncer) {
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    let c = connect(&options(&bouncer.url()))
        .await
        .expect("connect through pgbouncer");
    central::migrate(&c, layout).await.expect("migrate");
    (pg, bouncer)
}

/// A fresh query connection straight to PostgreSQL (checks survive server restarts).
async fn pg_client(pg_url: &str) -> Option<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(client)
}

async fn pg_i64(pg_url: &str, sql: &str) -> Option<i64> {
    let client = pg_client(pg_url).await?;
    let rows = client.query_typed(sql, &[]).await.ok()?;
    rows.first().map(|r| r.get::<_, i64>(0))
}

fn fast_sync(url: &str) -> SyncConfig {
    let mut sync = SyncConfig::with_url(url);
    sync.sslmode = SslMode::Disable;
    sync.interval = HumanDuration::from_millis(1000);
    sync.batch_size = 2000;
    sync.backlog_rows_per_second = 0;
    sync.backoff_initial = HumanDuration::from_millis(100);
    sync.backoff_max = HumanDuration::from_millis(500);
    sync.backoff_jitter = false;
    sync.connect_timeout = HumanDuration::from_secs(5);
    sync.statement_timeout = HumanDuration::from_secs(30);
    sync
}

/// Starts the sync worker of `agent`'s gateway (it stops on [`Agent::shutdown`]).
fn start_sync(agent: &mut Agent, sync: SyncConfig) {
    let identity = AgentConfig {
        gateway_id: agent.gateway_id().into(),
        site: "test site".into(),
        ..Default::default()
    };
    let worker = outpost::sync::run(
        sync,
        identity,
        agent.store().clone(),
        agent.shutdown_token(),
    );
    agent.spawn(worker);
}

/// Rows not yet marked synced.
fn unsynced(agent: &Agent) -> i64 {
    agent.count("SELECT COUNT(*) FROM readings WHERE synced = 0")
}

/// The uids (lower-case hex) of the rows marked synced, or not.
fn local_uids(agent: &Agent, synced: bool) -> BTreeSet<String> {
    let conn = agent.conn();
    let mut stmt = conn
        .prepare("SELECT hex(uid) FROM readings WHERE synced = ?1")
        .unwrap();
    let rows = stmt
        .query_map([synced as i64], |r| r.get::<_, String>(0))
        .unwrap();
    rows.map(|r| r.unwrap().to_lowercase()).collect()
}

/// A read-write connection beside the agent, for what the test writes itself.
fn writable(agent: &Agent) -> rusqlite::Connection {
    rusqlite::Connection::open(agent.db()).unwrap()
}

/// Writes `n` unsynced readings straight into SQLite, observed from `start` on, one per
/// millisecond.
fn bulk_insert(agent: &Agent, n: usize, start: chrono::DateTime<chrono::Utc>, flags: u32) {
    let gateway = agent.gateway_id();
    let mut conn = writable(agent);
    conn.busy_timeout(Duration::from_secs(30)).unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut stmt = tx
            .prepare(
                "INSERT INTO readings (uid, source, device, metric, value, unit, observed_at, received_at, flags, meta) \
                 VALUES (?1, 'bulk', ?2, 'temperature', ?3, '°C', ?4, ?5, ?6, ?7)",
            )
            .unwrap();
        let received = chrono::Utc::now().timestamp_micros();
        let base = start.timestamp_micros();
        let offset: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM readings WHERE source = 'bulk'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        for i in 0..n as i64 {
            let k = offset + i;
            let uid = Uid::derive(&[gateway, "bulk", &k.to_string()]);
            stmt.execute(rusqlite::params![
                uid.0.to_vec(),
                format!("dev-{}", k % 10),
                k as f64 / 10.0,
                base + i * 1000,
                received,
                flags,
                format!("{{\"k\":{k}}}"),
            ])
            .unwrap();
        }
    }
    tx.commit().unwrap();
}

/// A central PostgreSQL behind PgBouncer and an agent `name` whose store holds `rows`
/// unsynced readings observed from `age` ago on: a gateway back from an outage.
async fn with_backlog(
    layout: Layout,
    name: &str,
    rows: usize,
    age: chrono::Duration,
) -> (Postgres, PgBouncer, Agent) {
    let (pg, bouncer) = central(layout).await;
    let agent = Agent::open_as(name);
    bulk_insert(&agent, rows, chrono::Utc::now() - age, 0);
    (pg, bouncer, agent)
}

fn fresh_reading(gateway: &str, tag: &str) -> Reading {
    let now = chrono::Utc::now();
    Reading {
        uid: Uid::derive(&[gateway, "live", tag]),
        source: "live".into(),
        device: "coldroom-1".into(),
        metric: "temperature".into(),
        value: 4.25,
        unit: Some("°C".into()),
        observed_at: now,
        received_at: now,
        flags: 0,
        meta: Some(serde_json::json!({"tag": tag}).into()),
    }
}

async fn central_uids(pg_url: &str, gateway: &str) -> Vec<String> {
    let client = pg_client(pg_url).await.unwrap();
    let rows = client
        .query_typed(
            "SELECT replace(uid::text, '-', '') FROM outpost.readings WHERE gateway_id = $1",
            &[(&gateway, Type::TEXT)],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

/// Every local row is in central exactly once, and marked synced locally.
async fn assert_exactly_once(pg_url: &str, agent: &Agent, expected: usize) {
    let central = central_uids(pg_url, agent.gateway_id()).await;
    let distinct: BTreeSet<String> = central.iter().cloned().collect();
    assert_eq!(
        central.len(),
        distinct.len(),
        "{}: duplicates in central",
        agent.gateway_id()
    );
    assert_eq!(
        central.len(),
        expected,
        "{}: rows in central",
        agent.gateway_id()
    );
    assert_eq!(
        unsynced(agent),
        0,
        "{}: unsynced rows left",
        agent.gateway_id()
    );
    assert_eq!(
        local_uids(agent, true),
        distinct,
        "{}: local marks and central differ",
        agent.gateway_id()
    );
}

async fn wait_drained(pg_url: &str, agent: &Agent, expected: usize) {
    let gw = agent.gateway_id().to_string();
    let sql = format!("SELECT COUNT(*) FROM outpost.readings WHERE gateway_id = '{gw}'");
    wait_until_async(&format!("{gw} to drain"), DEADLINE, async || {
        unsynced(agent) == 0 && pg_i64(pg_url, &sql).await == Some(expected as i64)
    })
    .await;
}

fn assert_no_prepared_statement_errors(pg: &Postgres, bouncer: &PgBouncer) {
    for (name, log) in [("postgres", pg.log()), ("pgbouncer", bouncer.log())] {
        assert!(
            !log.to_lowercase().contains("prepared statement"),
            "{name} log mentions prepared statements:\n{log}"
        );
    }
}

async fn three_agents_through_a_pool_of_two(layout: Layout) {
    let (pg, bouncer) = central(layout).await;
    let pg_url = pg.url();
    let mut agents: Vec<Agent> = ["gw-a", "gw-b", "gw-c"]
        .iter()
        .map(|g| Agent::open_as(g))
        .collect();
    let start = chrono::Utc::now() - chrono::Duration::hours(2);
    for a in &agents {
        bulk_insert(a, 12_000, start, 0);
    }
    for a in &mut agents {
        let mut sync = fast_sync(&bouncer.url());
        sync.batch_size = 1500;
        start_sync(a, sync);
    }
    // Live readings arrive while the backlogs drain.
    for i in 0..20 {
        for a in &agents {
            a.ingest(vec![fresh_reading(a.gateway_id(), &i.to_string())])
                .await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for a in &agents {
        wait_drained(&pg_url, a, 12_020).await;
    }
    for a in &agents {
        assert_exactly_once(&pg_url, a, 12_020).await;
    }
    // Heartbeats: one row per gateway, with a boot id and the backlog.
    wait_until_async("heartbeats with an empty backlog", DEADLINE, async || {
        pg_i64(
            &pg_url,
            "SELECT COUNT(*) FROM outpost.gateways WHERE backlog_rows = 0 AND length(boot_id) = 36",
        )
        .await
            == Some(3)
    })
    .await;
    assert_eq!(
        pg_i64(&pg_url, "SELECT COUNT(*) FROM outpost.gateways WHERE agent_version <> '' AND last_seen > now() - interval '1 minute'").await,
        Some(3)
    );
    assert_no_prepared_statement_errors(&pg, &bouncer);
    for a in agents {
        a.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_sync_through_a_transaction_pool_of_two_exactly_once() {
    three_agents_through_a_pool_of_two(Layout::Plain).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_sync_exactly_once_into_the_partitioned_layout() {
    three_agents_through_a_pool_of_two(Layout::Partitioned).await;
}

/// Client connections of the agents (not the admin console) that PgBouncer holds.
fn agent_clients(bouncer: &PgBouncer) -> usize {
    bouncer
        .admin_rows("SHOW CLIENTS")
        .iter()
        .filter(|c| c.get("database").map(String::as_str) == Some("outpost"))
        .count()
}

/// Drains a backlog of `total` readings with `sync.backlog_connections = connections`
/// and `backlog_rows_per_second = rate`: every row arrives exactly once, each with its
/// own `seq`. Returns the most agent connections PgBouncer held at once, and leaves the
/// agent running.
async fn drain_counting_connections(
    name: &str,
    connections: usize,
    rate: u64,
    total: usize,
) -> (Postgres, PgBouncer, Agent, usize) {
    let (pg, bouncer, mut agent) =
        with_backlog(Layout::Plain, name, total, chrono::Duration::hours(1)).await;
    let pg_url = pg.url();
    let mut sync = fast_sync(&bouncer.url());
    sync.batch_size = 1000;
    sync.backlog_connections = connections;
    sync.backlog_rows_per_second = rate;
    start_sync(&mut agent, sync);
    let sql = format!(
        "SELECT COUNT(*) FROM outpost.readings WHERE gateway_id = '{}'",
        agent.gateway_id()
    );
    let mut most = 0;
    let started = Instant::now();
    while unsynced(&agent) > 0 || pg_i64(&pg_url, &sql).await != Some(total as i64) {
        assert!(started.elapsed() < DEADLINE, "the backlog did not drain");
        most = most.max(tokio::task::block_in_place(|| agent_clients(&bouncer)));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_exactly_once(&pg_url, &agent, total).await;
    let seqs = format!(
        "SELECT COUNT(DISTINCT seq) FILTER (WHERE seq BETWEEN 1 AND {total}) FROM outpost.readings"
    );
    assert_eq!(
        pg_i64(&pg_url, &seqs).await,
        Some(total as i64),
        "seq per row"
    );
    (pg, bouncer, agent, most)
}

/// `sync.backlog_connections` without pacing: a backlog drains over that many
/// connections (two transactions in flight); once drained the extra connection is
/// closed. With 1, only one connection is ever open.
async fn drain_with_connections(connections: usize) {
    let name = format!("gw-conns-{connections}");
    let (pg, bouncer, agent, most) =
        drain_counting_connections(&name, connections, 0, 40_000).await;
    if connections == 1 {
        assert_eq!(most, 1, "one connection only");
    } else {
        assert_eq!(most, connections, "uploads on {connections} connections");
        wait_until_async("the extra connection to close", DEADLINE, async || {
            tokio::task::block_in_place(|| agent_clients(&bouncer)) == 1
        })
        .await;
    }
    assert_no_prepared_statement_errors(&pg, &bouncer);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_drains_over_two_connections_then_keeps_one() {
    drain_with_connections(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backlog_connection_means_one_connection() {
    drain_with_connections(1).await;
}

/// With pacing that one connection keeps up with (here 2,000 rows/s, far below what one
/// connection uploads), `backlog_connections = 2` never opens the second: it would
/// hold a connection to central and add nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_backlog_that_one_connection_keeps_up_with_uses_one() {
    let (_pg, _bouncer, agent, most) =
        drain_counting_connections("gw-conns-paced", 2, 2_000, 8_000).await;
    assert_eq!(most, 1, "the pacing is the limit: one connection");
    agent.shutdown().await;
}

/// What is interrupted in the middle of a batch.
#[derive(Clone, Copy)]
enum Outage {
    PostgresCrash,
    PgBouncerRestart,
}

async fn interrupted_mid_sync(layout: Layout, outage: Outage) {
    let total = 60_000;
    let (mut pg, mut bouncer, mut agent) =
        with_backlog(layout, "gw-crash", total, chrono::Duration::hours(3)).await;
    let pg_url = pg.url();
    let mut sync = fast_sync(&bouncer.url());
    sync.batch_size = 5000;
    start_sync(&mut agent, sync);
    let sql = "SELECT COUNT(*) FROM outpost.readings";
    wait_until_async("the first batches", DEADLINE, async || {
        pg_i64(&pg_url, sql).await.unwrap_or(0) >= 5000
    })
    .await;
    match outage {
        Outage::PostgresCrash => {
            tokio::task::block_in_place(|| pg.stop_immediate());
            tokio::time::sleep(Duration::from_millis(700)).await;
            tokio::task::block_in_place(|| pg.start_again());
        }
        Outage::PgBouncerRestart => {
            tokio::task::block_in_place(|| bouncer.stop());
            tokio::time::sleep(Duration::from_millis(700)).await;
            tokio::task::block_in_place(|| bouncer.start_again());
        }
    }
    let partial = pg_i64(&pg_url, sql).await.unwrap_or(0);
    assert!(
        partial < total as i64,
        "the outage must hit the middle of the sync ({partial} rows)"
    );
    wait_drained(&pg_url, &agent, total).await;
    assert_exactly_once(&pg_url, &agent, total).await;
    assert_no_prepared_statement_errors(&pg, &bouncer);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_mid_batch_leaves_every_row_exactly_once() {
    interrupted_mid_sync(Layout::Plain, Outage::PostgresCrash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_mid_batch_partitioned_leaves_every_row_exactly_once() {
    interrupted_mid_sync(Layout::Partitioned, Outage::PostgresCrash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_restart_mid_sync_leaves_every_row_exactly_once() {
    interrupted_mid_sync(Layout::Plain, Outage::PgBouncerRestart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_restart_mid_sync_partitioned_leaves_every_row_exactly_once() {
    interrupted_mid_sync(Layout::Partitioned, Outage::PgBouncerRestart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_reported_with_the_keys_to_fix() {
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    let url = format!("postgres://outpost@127.0.0.1:{}/outpost", bouncer.port());
    let mut opts = options(&url);
    opts.password = Some(Secret::new("not-the-password"));
    let err = connect(&opts)
        .await
        .err()
        .expect("a wrong password must fail");
    assert!(matches!(err, SyncError::WrongPassword { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("refused the password for user \"outpost\""),
        "{text}"
    );
    assert!(text.contains("sync.password_file"), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");

    // The worker reports it in `outpost status` and keeps retrying.
    let mut agent = Agent::open_as("gw-pass");
    let mut sync = fast_sync(&url);
    sync.password = Some(Secret::new("not-the-password"));
    start_sync(&mut agent, sync);
    let path = agent.db().to_path_buf();
    wait_until_async("the error in the local status", DEADLINE, async || {
        outpost::cli::status::status_report(&path)
            .ok()
            .and_then(|r| r.sync.last_error)
            .is_some_and(|e| e.contains("refused the password"))
    })
    .await;
    let report = outpost::cli::status::status_report(&path).unwrap();
    let rendered = outpost::cli::status::render(&report, "test.db");
    assert!(rendered.contains("Central sync is FAILING"), "{rendered}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_mismatched_schema_says_what_to_run() {
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    let c = connect(&options(&bouncer.url())).await.unwrap();
    let err = c.check_schema().await.expect_err("no schema yet");
    assert!(matches!(err, SyncError::SchemaMissing { .. }), "{err:?}");
    assert!(
        err.to_string().contains("run `outpost central migrate`"),
        "{err}"
    );

    central::migrate(&c, Layout::Plain).await.unwrap();
    assert_eq!(c.check_schema().await.unwrap(), central::SCHEMA_VERSION);
    // Migrating again changes nothing.
    let again = central::migrate(&c, Layout::Plain).await.unwrap();
    assert_eq!(
        (again.from_version, again.to_version),
        (central::SCHEMA_VERSION, central::SCHEMA_VERSION)
    );

    pg.psql("INSERT INTO outpost.schema_version (version, description) VALUES (99, 'future')");
    let err = c.check_schema().await.expect_err("a newer schema");
    assert!(
        err.to_string().contains("upgrade outpost on this gateway"),
        "{err}"
    );
    pg.psql("DELETE FROM outpost.schema_version");
    let err = c.check_schema().await.expect_err("no version recorded");
    assert!(err.to_string().contains("outpost central migrate"), "{err}");
}

fn tls_options(pg: &Postgres, mode: SslMode, ca: Option<&Path>, host: &str) -> ConnectOptions {
    let mut sync = SyncConfig::with_url(format!("postgres://outpost@{host}:{}/outpost", pg.port()));
    sync.password = Some(Secret::new(pg.password()));
    sync.sslmode = mode;
    sync.ca_file = ca.map(Path::to_path_buf);
    ConnectOptions::from_config(&sync, "test")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_verified_and_a_wrong_ca_is_reported() {
    let ca = TestCa::new();
    let pg = Postgres::builder().tls(&ca).require_tls().start();

    let err = connect(&tls_options(
        &pg,
        SslMode::VerifyFull,
        Some(ca.wrong_ca_pem()),
        "localhost",
    ))
    .await
    .err()
    .expect("a certificate from another CA must be refused");
    assert!(matches!(err, SyncError::Tls { .. }), "{err:?}");
    assert!(
        err.to_string().contains("not signed by a trusted CA"),
        "{err}"
    );
    assert!(err.to_string().contains("sync.ca_file"), "{err}");

    // verify-full with the right CA works, end to end.
    let c = connect(&tls_options(
        &pg,
        SslMode::VerifyFull,
        Some(ca.ca_pem()),
        "localhost",
    ))
    .await
    .expect("verify-full with the right CA");
    central::migrate(&c, Layout::Plain).await.unwrap();
    let ssl = c
        .transaction(c.client().query_typed(
            "SELECT ssl::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(ssl[0].get::<_, String>(0), "true");

    // A host name the certificate does not carry (db.example, reached at 127.0.0.1):
    // refused by verify-full with the documented message, accepted by verify-ca.
    let mut misnamed = tls_options(&pg, SslMode::VerifyFull, Some(ca.ca_pem()), "localhost");
    misnamed.url = format!(
        "host=db.example hostaddr=127.0.0.1 port={} user=outpost dbname=outpost",
        pg.port()
    );
    let err = connect(&misnamed)
        .await
        .err()
        .expect("the name is not in the certificate");
    assert!(matches!(err, SyncError::Tls { .. }), "{err:?}");
    assert!(
        err.to_string().contains("not valid for the host name"),
        "{err}"
    );
    misnamed.sslmode = SslMode::VerifyCa;
    assert!(
        connect(&misnamed).await.is_ok(),
        "verify-ca ignores the name"
    );
    assert!(connect(&tls_options(
        &pg,
        SslMode::VerifyCa,
        Some(ca.ca_pem()),
        "localhost"
    ))
    .await
    .is_ok());
    assert!(
        connect(&tls_options(&pg, SslMode::Require, None, "localhost"))
            .await
            .is_ok()
    );

    // Plain TCP to a TLS-only server is refused with the server's reason.
    let err = connect(&tls_options(&pg, SslMode::Disable, None, "localhost"))
        .await
        .err()
        .expect("no TLS");
    assert!(matches!(err, SyncError::LoginRefused { .. }), "{err:?}");
}

async fn partition_of(client: &tokio_postgres::Client, uid_hex: &str) -> String {
    let rows = client
        .query_typed(
            "SELECT c.relname::text FROM outpost.readings r JOIN pg_class c ON c.oid = r.tableoid \
             WHERE replace(r.uid::text, '-', '') = $1",
            &[(&uid_hex, Type::TEXT)],
        )
        .await
        .unwrap();
    rows[0].get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_rows_land_in_their_month_and_maintain_is_idempotent() {
    let (pg, bouncer) = central(Layout::Partitioned).await;
    let c = connect(&options(&bouncer.url())).await.unwrap();
    let now = chrono::Utc::now();
    let this_month = central::partition_name(now.date_naive());

    let mut agent = Agent::open_as("gw-part");
    let next_month = now + chrono::Duration::days(32);
    let long_ago = chrono::DateTime::parse_from_rfc3339("2001-05-17T10:00:00Z")
        .unwrap()
        .to_utc();
    let far_future = chrono::DateTime::parse_from_rfc3339("2030-06-10T10:00:00Z")
        .unwrap()
        .to_utc();
    for (tag, at) in [
        ("now", now),
        ("next", next_month),
        ("old", long_ago),
        ("future", far_future),
    ] {
        let mut r = fresh_reading("gw-part", tag);
        r.observed_at = at;
        agent.ingest(vec![r]).await;
    }
    start_sync(&mut agent, fast_sync(&bouncer.url()));
    wait_drained(&pg.url(), &agent, 4).await;
    let client = pg_client(&pg.url()).await.unwrap();
    let uid = |tag: &str| Uid::derive(&["gw-part", "live", tag]).to_hex();
    assert_eq!(partition_of(&client, &uid("now")).await, this_month);
    assert_eq!(
        partition_of(&client, &uid("next")).await,
        central::partition_name(next_month.date_naive())
    );
    assert_eq!(partition_of(&client, &uid("old")).await, "readings_default");
    assert_eq!(
        partition_of(&client, &uid("future")).await,
        "readings_default"
    );

    // Maintain is idempotent.
    let today = now.date_naive();
    assert_eq!(
        central::maintain(&c, today, 1, 3).await.unwrap(),
        Vec::<String>::new()
    );
    let count_partitions =
        "SELECT COUNT(*) FROM pg_inherits WHERE inhparent = 'outpost.readings'::regclass";
    let before = pg_i64(&pg.url(), count_partitions).await;
    assert_eq!(
        central::maintain(&c, today, 1, 3).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(pg_i64(&pg.url(), count_partitions).await, before);

    // A month created later takes its rows out of the default partition.
    let june_2030 = chrono::NaiveDate::from_ymd_opt(2030, 6, 15).unwrap();
    let created = central::maintain(&c, june_2030, 0, 0).await.unwrap();
    assert_eq!(created, ["readings_y2030m06"]);
    assert_eq!(
        partition_of(&client, &uid("future")).await,
        "readings_y2030m06"
    );
    assert_eq!(
        central::maintain(&c, june_2030, 0, 0).await.unwrap(),
        Vec::<String>::new()
    );
    // The moved row keeps its uniqueness: re-sending it changes nothing.
    writable(&agent)
        .execute("UPDATE readings SET synced = 0", [])
        .unwrap();
    wait_drained(&pg.url(), &agent, 4).await;
    assert_eq!(central_uids(&pg.url(), "gw-part").await.len(), 4);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_reading_reaches_central_within_one_interval_despite_a_200k_backlog() {
    let backlog = 200_000;
    let (pg, bouncer, mut agent) =
        with_backlog(Layout::Plain, "gw-live", backlog, chrono::Duration::days(1)).await;
    let pg_url = pg.url();
    let interval = Duration::from_secs(2);
    let mut sync = fast_sync(&bouncer.url());
    sync.interval = HumanDuration(interval);
    sync.batch_size = 5000;
    sync.backlog_rows_per_second = 20_000;
    start_sync(&mut agent, sync);
    let count = "SELECT COUNT(*) FROM outpost.readings";
    wait_until_async("the backlog to start draining", DEADLINE, async || {
        pg_i64(&pg_url, count).await.unwrap_or(0) > 0
    })
    .await;

    agent.ingest(vec![fresh_reading("gw-live", "now")]).await;
    let committed = Instant::now();
    let uid = Uid::derive(&["gw-live", "live", "now"]).to_hex();
    let probe = format!(
        "SELECT COUNT(*) FROM outpost.readings WHERE replace(uid::text, '-', '') = '{uid}'"
    );
    wait_until_async("the fresh reading in central", DEADLINE, async || {
        pg_i64(&pg_url, &probe).await == Some(1)
    })
    .await;
    let took = committed.elapsed();
    let drained = pg_i64(&pg_url, count).await.unwrap();
    eprintln!("fresh reading visible after {took:?}; {drained} backlog rows in central by then");
    // One interval, plus the batch that may be in flight and this box's slowness. Without
    // live first it would wait for the backlog: 200,000 rows at 20,000/s, 10 s.
    assert!(
        took <= interval + Duration::from_millis(2500),
        "took {took:?}"
    );
    assert!(
        drained < backlog as i64,
        "the backlog was not still draining ({drained} rows)"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsynchronised_clock_readings_are_held_then_sent_flagged() {
    let (pg, bouncer) = central(Layout::Plain).await;
    let pg_url = pg.url();
    let mut agent = Agent::open_as("gw-clock");
    let start = chrono::Utc::now() - chrono::Duration::minutes(10);
    bulk_insert(&agent, 100, start, 0);
    bulk_insert(&agent, 50, start, flags::CLOCK_UNSYNCED);
    // One corrected reading goes at once.
    writable(&agent)
        .execute(
            &format!(
                "UPDATE readings SET flags = {} WHERE id = (SELECT MAX(id) FROM readings)",
                flags::CLOCK_UNSYNCED | flags::CLOCK_CORRECTED
            ),
            [],
        )
        .unwrap();
    let mut sync = fast_sync(&bouncer.url());
    sync.clock_hold_max = HumanDuration::from_secs(4);
    start_sync(&mut agent, sync);
    let held = Instant::now();
    let total = "SELECT COUNT(*) FROM outpost.readings";
    wait_until_async("the synchronised readings", DEADLINE, async || {
        pg_i64(&pg_url, total).await == Some(101)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if held.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            pg_i64(&pg_url, total).await,
            Some(101),
            "held readings must wait for the bound"
        );
    }
    wait_drained(&pg_url, &agent, 150).await;
    assert!(
        held.elapsed() >= Duration::from_secs(4),
        "released before the bound"
    );
    let flagged = format!(
        "SELECT COUNT(*) FROM outpost.readings WHERE flags = {}",
        flags::CLOCK_UNSYNCED
    );
    assert_eq!(
        pg_i64(&pg_url, &flagged).await,
        Some(49),
        "sent with their flag"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_events_sync_from_a_local_table() {
    // The alerts engine owns the local `alert_events` table; this fixture has the columns
    // sync reads.
    let (pg, bouncer) = central(Layout::Plain).await;
    let mut agent = Agent::open_as("gw-alerts");
    writable(&agent)
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS alert_events (id INTEGER PRIMARY KEY, uid BLOB NOT NULL UNIQUE, rule TEXT NOT NULL, \
               device TEXT, metric TEXT, kind TEXT NOT NULL, severity TEXT, value REAL, threshold REAL, \
               occurred_at INTEGER NOT NULL, message TEXT, synced INTEGER NOT NULL DEFAULT 0);",
        )
        .unwrap();
    {
        let conn = writable(&agent);
        for (i, kind) in ["firing", "reminder", "resolved"].iter().enumerate() {
            conn.execute(
                "INSERT INTO alert_events (uid, rule, device, metric, kind, severity, value, threshold, occurred_at, message) \
                 VALUES (?1, 'coldroom-warm', 'coldroom-1', 'temperature', ?2, 'critical', ?3, 8.0, ?4, ?5)",
                rusqlite::params![
                    Uid::derive(&["event", &i.to_string()]).0.to_vec(),
                    kind,
                    9.5 - i as f64,
                    chrono::Utc::now().timestamp_micros() + i as i64,
                    r#"{"text":"Cold room 1 is warm"}"#,
                ],
            )
            .unwrap();
        }
    }
    start_sync(&mut agent, fast_sync(&bouncer.url()));
    let path = agent.db().to_path_buf();
    wait_until_async("the events in central and marked", DEADLINE, async || {
        let marked: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM alert_events WHERE synced = 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        marked == 3
            && pg_i64(&pg.url(), "SELECT COUNT(*) FROM outpost.alert_events").await == Some(3)
    })
    .await;
    assert_eq!(
        pg_i64(
            &pg.url(),
            "SELECT COUNT(*) FROM outpost.alert_events WHERE gateway_id = 'gw-alerts' AND kind IN ('firing', 'reminder', 'resolved') \
             AND message->>'text' = 'Cold room 1 is warm' AND threshold = 8"
        )
        .await,
        Some(3)
    );
    agent.shutdown().await;
}

/// `outpost ARGS…` without a configuration file: (success, stdout, stderr).
fn outpost_without_config(args: &[&str]) -> (bool, String, String) {
    let (code, stdout, stderr) =
        support::agent::outpost([&["--config", "/nonexistent/outpost.toml"], args].concat());
    (code == Some(0), stdout, stderr)
}

#[test]
fn central_commands_print_migrate_and_maintain() {
    let (ok, sql, _) = outpost_without_config(&["central", "schema", "--partitioned"]);
    assert!(
        ok && sql.contains("PARTITION BY RANGE (observed_at)"),
        "{sql}"
    );

    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    // The printed SQL applies as it is, twice.
    let plain = outpost_without_config(&["central", "schema"]).1;
    pg.psql(&plain);
    pg.psql(&plain);
    assert_eq!(
        pg.psql("SELECT MAX(version) FROM outpost.schema_version"),
        central::SCHEMA_VERSION.to_string()
    );
    pg.psql("DROP SCHEMA outpost CASCADE");

    let url = bouncer.url();
    let (ok, out, err) = outpost_without_config(&[
        "central",
        "migrate",
        "--url",
        &url,
        "--sslmode",
        "disable",
        "--partitioned",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!(
            "migrated from version 0 to {}",
            central::SCHEMA_VERSION
        )) && out.contains("partitioned"),
        "{out}"
    );
    let (ok, out, err) = outpost_without_config(&[
        "central",
        "migrate",
        "--url",
        &url,
        "--sslmode",
        "disable",
        "--partitioned",
    ]);
    assert!(ok && out.contains("up to date"), "{out}{err}");
    let (ok, out, err) =
        outpost_without_config(&["central", "maintain", "--url", &url, "--sslmode", "disable"]);
    assert!(
        ok && out.contains("Every partition exists already"),
        "{out}{err}"
    );
    let (ok, out, err) = outpost_without_config(&[
        "central",
        "maintain",
        "--url",
        &url,
        "--sslmode",
        "disable",
        "--months-ahead",
        "6",
    ]);
    assert!(ok && out.contains("Created partitions"), "{out}{err}");

    let (ok, _, err) = outpost_without_config(&["central", "migrate"]);
    assert!(!ok && err.contains("pass --url"), "{err}");
    let (ok, _, err) = outpost_without_config(&[
        "central",
        "migrate",
        "--url",
        &url,
        "--sslmode",
        "sometimes",
    ]);
    assert!(!ok && err.contains("verify-full"), "{err}");
}

/// Issue 15 (SD-card wear): at a site's rate a round writes locally once — the marks of
/// its live readings, the previous round's chain marks, the head's signature and the
/// round's success in one commit — and everything still reaches central exactly once,
/// the chain included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_at_a_sites_rate_costs_one_local_commit() {
    use std::sync::atomic::Ordering;
    let (pg, bouncer) = central(Layout::Plain).await;
    let pg_url = pg.url();
    let mut agent = Agent::open_as("gw-one-write");
    let identity = AgentConfig {
        gateway_id: agent.gateway_id().into(),
        site: "test site".into(),
        ..Default::default()
    };
    let (rounds_tx, mut rounds) = tokio::sync::mpsc::unbounded_channel();
    let observe: outpost::sync::SyncObserver = std::sync::Arc::new(move |event| {
        if matches!(event, outpost::sync::SyncEvent::RoundSucceeded) {
            let _ = rounds_tx.send(());
        }
    });
    let mut sync = fast_sync(&bouncer.url());
    sync.interval = HumanDuration::from_millis(1500);
    let worker = outpost::sync::run_observed(
        sync,
        identity,
        agent.store().clone(),
        agent.shutdown_token(),
        observe,
    );
    agent.spawn(worker);
    let round = async |rounds: &mut tokio::sync::mpsc::UnboundedReceiver<()>| {
        tokio::time::timeout(DEADLINE, rounds.recv())
            .await
            .expect("a sync round succeeds in time")
            .expect("the worker runs");
    };
    round(&mut rounds).await;
    let commits = || agent.store().stats().commits.load(Ordering::SeqCst);
    let mut sent = 0;
    let mut per_round = Vec::new();
    for i in 0..4 {
        // Readings of a site's rate, committed between two rounds (their own commits
        // are not the round's).
        for j in 0..3 {
            agent
                .ingest(vec![fresh_reading("gw-one-write", &format!("{i}-{j}"))])
                .await;
            sent += 1;
        }
        let before = commits();
        round(&mut rounds).await;
        per_round.push(commits() - before);
    }
    // The first of these rounds may be one whose start raced the readings above.
    assert!(
        per_round[1..].iter().all(|&n| n == 1),
        "local commits per round: {per_round:?}"
    );
    round(&mut rounds).await;
    wait_drained(&pg_url, &agent, sent).await;
    assert_exactly_once(&pg_url, &agent, sent).await;
    // The chain went up with signatures of its head, and its marks were written.
    let links = "SELECT COUNT(*) FROM outpost.chain_links WHERE gateway_id = 'gw-one-write'";
    let signatures =
        "SELECT COUNT(*) FROM outpost.chain_signatures WHERE gateway_id = 'gw-one-write'";
    assert!(pg_i64(&pg_url, links).await.unwrap_or(0) > 0);
    assert!(pg_i64(&pg_url, signatures).await.unwrap_or(0) > 0);
    round(&mut rounds).await;
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM chain_links WHERE synced = 0 AND seq < (SELECT MAX(seq) FROM chain_links)"),
        0,
        "links uploaded in earlier rounds are marked synced"
    );
    agent.shutdown().await;
}

/// A round that drained a backlog makes its one local write at once instead of waiting
/// up to 5 s for a commit of readings that a quiet site may never make: the drain's own
/// marks made a commit per batch, and the round's newest readings would otherwise show
/// as unsynced for seconds after everything is in central (found by `sync_drain`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backlog_is_marked_as_soon_as_central_has_it() {
    let total = 8_000;
    let (pg, bouncer, mut agent) = with_backlog(
        Layout::Plain,
        "gw-drained-settle",
        total,
        chrono::Duration::hours(1),
    )
    .await;
    let pg_url = pg.url();
    // A long interval: a round's write may wait min(interval / 2, 5 s) for a commit.
    let mut sync = fast_sync(&bouncer.url());
    sync.interval = HumanDuration::from_secs(30);
    start_sync(&mut agent, sync);
    let sql = "SELECT COUNT(*) FROM outpost.readings";
    let mut in_central = None;
    wait_until_async("central to hold the backlog", DEADLINE, async || {
        let all = pg_i64(&pg_url, sql).await == Some(total as i64);
        if all && in_central.is_none() {
            in_central = Some(Instant::now());
        }
        all
    })
    .await;
    wait_until_async("the backlog to be marked", DEADLINE, async || {
        unsynced(&agent) == 0
    })
    .await;
    // Marking 8,000 rows takes a fraction of a second; waiting for a commit that never
    // comes would take the full 5 s.
    let took = in_central.expect("set above").elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the last rows were marked {took:?} after central had them: the round's write waited"
    );
    assert_exactly_once(&pg_url, &agent, total).await;
    agent.shutdown().await;
}
