//! A fleet of simulated gateways against one PgBouncer (transaction pooling,
//! `default_pool_size = 20`) and one PostgreSQL, all in this process: each gateway is
//! the agent's own store (SQLite file, writer thread) and sync worker
//! (`outpost::sync::run_observed`), on one tokio runtime.
//!
//!     cargo bench --bench fleet
//!     GATEWAYS=500 ROWS=2000 BATCH=500 OUTAGE=60 FLEET_OUT=target/fleet cargo bench --bench fleet
//!     PHASES=drain,jitter,no-jitter cargo bench --bench fleet     # a subset
//!     PHASES=jitter-aligned,no-jitter-aligned WARMUP_MS=25000 cargo bench --bench fleet
//!     /usr/bin/python3 benches/plot_fleet.py docs/fleet-reconnects.png target/fleet
//!
//! Phase 1 (`drain`): every gateway starts at the same instant with a backlog of `ROWS`
//! readings; timed until no gateway has an unsynced row. Then central must hold every
//! row exactly once.
//!
//! Phase 2 (`jitter`, `no-jitter`, `jitter-aligned`, `no-jitter-aligned`: with
//! `sync.backoff_jitter` on and off): the gateways start at random points of one sync
//! interval (`-aligned`: all at the same instant, so their rounds stay in step, as after
//! a fleet-wide restart) and each receives one new
//! reading per second; PostgreSQL is stopped (`-m immediate`) for `OUTAGE` seconds while
//! PgBouncer stays up, then started again. Every round start (connection attempts
//! marked), success and failure is recorded with its time; the outage backlog is
//! drained when every reading stored before PostgreSQL returned is synced.
//!
//! Throughout, PgBouncer (`SHOW POOLS`, `SHOW SERVERS`) and `pg_stat_activity` are
//! sampled every `SAMPLE_MS` (150) ms. Every sync error's text is kept and counted by
//! kind. The raw series go to `FLEET_OUT` (default `target/fleet`): `events.csv` (every
//! round start / connection attempt / success / failure; `t` in seconds since the run's
//! PostgreSQL stop, or since the start for `drain`), `samples.csv` (`t` since the bench
//! started) and `runs.csv` (`down_s`: the stop, since the bench started; the other
//! times since the stop). The stores live in /dev/shm (each real gateway has its
//! own disk; 500 fsyncing stores on one VM disk would measure the disk).

#[path = "../tests/support/mod.rs"]
mod support;

use outpost::config::AgentConfig;
use outpost::model::{Batch, Reading, Uid};
use outpost::store::{Ingest, StorageConfig, Store, StoreOptions};
use outpost::sync::central::{self, Layout};
use outpost::sync::postgres::{connect, ConnectOptions};
use outpost::sync::{SslMode, SyncConfig, SyncError, SyncEvent, SyncObserver};
use rand::Rng;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::pgbouncer::{ADMIN_PASSWORD, ADMIN_USER};
use support::{PgBouncer, Postgres};
use tokio_util::sync::CancellationToken;

const POOL_SIZE: u32 = 20;
/// The sync interval of every gateway (the default).
const INTERVAL: Duration = Duration::from_secs(10);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (children, PgBouncer among them,
/// inherit it); returns (soft, hard).
fn raise_nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    (lim.rlim_cur, lim.rlim_max)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Start,
    Connect,
    Ok,
    Fail,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Start => "start",
            Kind::Connect => "connect",
            Kind::Ok => "ok",
            Kind::Fail => "fail",
        }
    }
}

struct Event {
    at: Instant,
    gateway: u32,
    kind: Kind,
    error: Option<String>,
}

/// Every worker event of the current run, with its time.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    fn observer(self: &Arc<Self>, gateway: u32) -> SyncObserver {
        let me = self.clone();
        Arc::new(move |e: &SyncEvent| {
            let (kind, error) = match e {
                SyncEvent::RoundStarted { connect: true } => (Kind::Connect, None),
                SyncEvent::RoundStarted { connect: false } => (Kind::Start, None),
                SyncEvent::RoundSucceeded => (Kind::Ok, None),
                SyncEvent::RoundFailed { error, .. } => (Kind::Fail, Some(error_kind(error))),
            };
            let event = Event {
                at: Instant::now(),
                gateway,
                kind,
                error,
            };
            if let Ok(mut events) = me.events.lock() {
                events.push(event);
            }
        })
    }

    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

/// The error's kind and text with numbers (ports, durations) masked, to count by.
fn error_kind(e: &SyncError) -> String {
    let variant = match e {
        SyncError::Url(_) => "url",
        SyncError::Connect { .. } => "connect",
        SyncError::WrongPassword { .. } => "password",
        SyncError::LoginRefused { .. } => "login-refused",
        SyncError::Tls { .. } => "tls",
        SyncError::SchemaMissing { .. } => "schema-missing",
        SyncError::SchemaTooOld { .. } | SyncError::SchemaTooNew { .. } => "schema-version",
        SyncError::Timeout(_) => "timeout",
        SyncError::Database(_) => "database",
        SyncError::Local(_) => "local",
    };
    let text: String = e
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    let mut masked = String::new();
    for c in text.chars() {
        if !(c == '#' && masked.ends_with('#')) {
            masked.push(c);
        }
    }
    format!("{variant}: {}", masked.replace([',', '\n'], ";"))
}

struct Gateway {
    id: String,
    store: Store,
    ingest: Ingest,
    /// The bench's own read connection (for progress).
    monitor: rusqlite::Connection,
}

impl Gateway {
    fn unsynced(&self, up_to: i64) -> i64 {
        self.monitor
            .query_row(
                "SELECT COUNT(*) FROM readings WHERE synced = 0 AND id <= ?1",
                [up_to],
                |r| r.get(0),
            )
            .unwrap()
    }
    fn head(&self) -> i64 {
        self.monitor
            .query_row("SELECT COALESCE(MAX(id), 0) FROM readings", [], |r| {
                r.get(0)
            })
            .unwrap()
    }
    fn total(&self) -> i64 {
        self.monitor
            .query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))
            .unwrap()
    }
}

fn open_gateway(dir: &Path, i: usize) -> Gateway {
    let storage = StorageConfig {
        path: dir.join(format!("gw-{i:04}.db")),
        ..StorageConfig::default()
    };
    let (store, ingest) = Store::open(&storage, StoreOptions::default()).unwrap();
    let monitor = store.reader().unwrap();
    Gateway {
        id: format!("fleet-gw-{i:04}"),
        store,
        ingest,
        monitor,
    }
}

/// Writes `rows` old readings into the gateway's store, as an outage leaves them.
async fn fill_backlog(store: Store, gateway: String, rows: usize) {
    store
        .write(move |c| {
            let base = chrono::Utc::now() - chrono::Duration::days(1);
            let received = chrono::Utc::now().timestamp_micros();
            let mut stmt = c.prepare(
                "INSERT INTO readings (uid, source, device, metric, value, unit, observed_at, received_at, flags, meta) \
                 VALUES (?1, 'fleet', ?2, 'temperature', ?3, '°C', ?4, ?5, 0, NULL)",
            )?;
            for i in 0..rows as i64 {
                let uid = Uid::derive(&[&gateway, "backlog", &i.to_string()]);
                let observed = base + chrono::Duration::milliseconds(i * 1000);
                stmt.execute(rusqlite::params![
                    uid.0.to_vec(),
                    format!("sensor-{}", i % 20),
                    (i % 400) as f64 / 10.0,
                    observed.timestamp_micros(),
                    received,
                ])?;
            }
            Ok(())
        })
        .await
        .unwrap();
}

/// One new reading per second through the store's ingest channel (the sources' path).
async fn trickle(
    gateway: String,
    sender: tokio::sync::mpsc::Sender<Batch>,
    stop: CancellationToken,
) {
    let phase = rand::thread_rng().gen_range(0..1000);
    tokio::time::sleep(Duration::from_millis(phase)).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let now = chrono::Utc::now();
        let reading = Reading {
            uid: Uid::derive(&[
                &gateway,
                "live",
                &n.to_string(),
                &now.timestamp_micros().to_string(),
            ]),
            source: "fleet".into(),
            device: "sensor-live".into(),
            metric: "temperature".into(),
            value: (n % 400) as f64 / 10.0,
            unit: Some("°C".into()),
            observed_at: now,
            received_at: now,
            flags: 0,
            meta: None,
        };
        let batch = Batch {
            readings: vec![reading],
            ack: None,
        };
        if sender.send(batch).await.is_err() {
            return;
        }
    }
}

/// Every gateway's `[sync]`: the defaults (interval 10 s, backoff 1 s doubling up to
/// 300 s, connect timeout 10 s, statement timeout 60 s) but for TLS and the batch size.
fn sync_config(url: &str, batch: usize, jitter: bool) -> SyncConfig {
    let mut sync = SyncConfig::with_url(url);
    sync.sslmode = SslMode::Disable;
    sync.batch_size = batch;
    sync.interval = outpost::config::HumanDuration::from_secs(INTERVAL.as_secs());
    sync.backoff_jitter = jitter;
    sync
}

/// Starts every gateway's sync worker (after a random delay within `spread`).
fn start_workers(
    runtime: &tokio::runtime::Runtime,
    fleet: &[Gateway],
    config: &SyncConfig,
    spread: Duration,
    recorder: &Arc<Recorder>,
    stop: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    fleet
        .iter()
        .enumerate()
        .map(|(i, gw)| {
            let sync = config.clone();
            let agent = AgentConfig {
                gateway_id: gw.id.clone(),
                site: "fleet".into(),
                ..Default::default()
            };
            let delay = if spread.is_zero() {
                Duration::ZERO
            } else {
                rand::thread_rng().gen_range(Duration::ZERO..spread)
            };
            let store = gw.store.clone();
            let stop = stop.clone();
            let observer = recorder.observer(i as u32);
            runtime.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                outpost::sync::run_observed(sync, agent, store, stop, observer).await
            })
        })
        .collect()
}

#[derive(Default, Clone)]
struct Sample {
    servers: i64,
    sv_active: i64,
    sv_idle: i64,
    sv_used: i64,
    sv_login: i64,
    cl_active: i64,
    cl_waiting: i64,
    maxwait: i64,
    pg_backends: i64,
}

struct Samples {
    rows: Mutex<Vec<(Instant, String, Sample)>>,
    run: Mutex<String>,
}

fn num(row: &tokio_postgres::SimpleQueryRow, col: &str) -> i64 {
    row.try_get(col)
        .ok()
        .flatten()
        .and_then(|v| v.parse().ok())
        .unwrap_or(-1)
}

async fn try_connect(url: &str) -> Option<tokio_postgres::Client> {
    let connecting = tokio_postgres::connect(url, tokio_postgres::NoTls);
    match tokio::time::timeout(Duration::from_secs(1), connecting).await {
        Ok(Ok((client, conn))) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Some(client)
        }
        _ => None,
    }
}

/// Samples PgBouncer and pg_stat_activity every `every` until `stop`.
async fn sample(
    admin_url: String,
    pg_url: String,
    every: Duration,
    samples: Arc<Samples>,
    stop: CancellationToken,
) {
    let mut admin: Option<tokio_postgres::Client> = None;
    let mut pg: Option<tokio_postgres::Client> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let at = Instant::now();
        let mut s = Sample {
            servers: -1,
            pg_backends: -1,
            ..Sample::default()
        };
        if admin.as_ref().is_none_or(|c| c.is_closed()) {
            admin = try_connect(&admin_url).await;
        }
        if let Some(c) = &admin {
            if let Ok(msgs) = c.simple_query("SHOW POOLS").await {
                for m in msgs {
                    if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                        if r.try_get("database").ok().flatten() == Some("outpost") {
                            s.sv_active = num(&r, "sv_active");
                            s.sv_idle = num(&r, "sv_idle");
                            s.sv_used = num(&r, "sv_used");
                            s.sv_login = num(&r, "sv_login");
                            s.cl_active = num(&r, "cl_active");
                            s.cl_waiting = num(&r, "cl_waiting");
                            s.maxwait = num(&r, "maxwait");
                        }
                    }
                }
            }
            if let Ok(msgs) = c.simple_query("SHOW SERVERS").await {
                s.servers = msgs
                    .iter()
                    .filter(|m| {
                        matches!(m, tokio_postgres::SimpleQueryMessage::Row(r)
                        if r.try_get("database").ok().flatten() == Some("outpost"))
                    })
                    .count() as i64;
            }
        }
        if pg.as_ref().is_none_or(|c| c.is_closed()) {
            pg = try_connect(&pg_url).await;
        }
        if let Some(c) = &pg {
            // PgBouncer's server connections come over TCP; the bench's own psql checks
            // use the socket.
            let q = c.simple_query(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'outpost' \
                 AND backend_type = 'client backend' AND pid <> pg_backend_pid() \
                 AND client_addr IS NOT NULL",
            );
            if let Ok(Ok(msgs)) = tokio::time::timeout(Duration::from_secs(1), q).await {
                for m in msgs {
                    if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                        s.pg_backends = num(&r, "count");
                    }
                }
            }
        }
        let run = samples.run.lock().unwrap().clone();
        samples.rows.lock().unwrap().push((at, run, s));
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// Peak of events per bucket of `width` seconds among `times`.
fn peak_per_bucket(times: &[f64], width: f64) -> (usize, f64) {
    let mut buckets: BTreeMap<i64, usize> = BTreeMap::new();
    for t in times {
        *buckets.entry((t / width).floor() as i64).or_default() += 1;
    }
    buckets
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(b, n)| (*n, *b as f64 * width))
        .unwrap_or((0, 0.0))
}

struct Out {
    dir: PathBuf,
    events: std::io::BufWriter<std::fs::File>,
    runs: std::io::BufWriter<std::fs::File>,
    errors: BTreeMap<String, usize>,
}

impl Out {
    /// Writes `events` relative to `zero` under the run's name and counts the errors.
    fn events(&mut self, run: &str, zero: Instant, events: &[Event]) {
        for e in events {
            let t = e.at.saturating_duration_since(zero).as_secs_f64()
                - zero.saturating_duration_since(e.at).as_secs_f64();
            writeln!(
                self.events,
                "{run},{t:.4},{},{},{}",
                e.gateway,
                e.kind.name(),
                e.error.as_deref().unwrap_or("")
            )
            .unwrap();
            if let Some(kind) = &e.error {
                *self.errors.entry(format!("[{run}] {kind}")).or_default() += 1;
            }
        }
    }
}

fn secs(zero: Instant, at: Instant) -> f64 {
    at.saturating_duration_since(zero).as_secs_f64()
        - zero.saturating_duration_since(at).as_secs_f64()
}

fn main() {
    let gateways = env_u64("GATEWAYS", 500) as usize;
    let rows = env_u64("ROWS", 2000) as usize;
    let batch = env_u64("BATCH", 500) as usize;
    let outage = Duration::from_secs(env_u64("OUTAGE", 60));
    let sample_every = Duration::from_millis(env_u64("SAMPLE_MS", 150));
    // From the workers' start to PostgreSQL's stop; with the default 20 s (two
    // intervals) the stop meets the aligned gateways' third round start.
    let warmup = Duration::from_millis(env_u64("WARMUP_MS", 20_000));
    let phases = std::env::var("PHASES")
        .unwrap_or_else(|_| "drain,jitter,no-jitter,jitter-aligned,no-jitter-aligned".into());
    let out_dir =
        PathBuf::from(std::env::var("FLEET_OUT").unwrap_or_else(|_| "target/fleet".into()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let (soft, hard) = raise_nofile();
    eprintln!(
        "RLIMIT_NOFILE {soft} (hard {hard}); {gateways} gateways x {rows} rows, batch {batch}"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut pg = Postgres::start();
    let max_client_conn = (2 * gateways as u32).max(1000);
    let bouncer = PgBouncer::builder(&pg)
        .default_pool_size(POOL_SIZE)
        .max_client_conn(max_client_conn)
        .nofile((max_client_conn + 1000).min(hard.min(u32::MAX as u64) as u32))
        .start();
    let fd_line = bouncer
        .log()
        .lines()
        .find(|l| l.contains("file descriptor limit"))
        .map(|l| l.to_string())
        .unwrap_or_default();
    eprintln!("PgBouncer: pool {POOL_SIZE}, max_client_conn {max_client_conn}; {fd_line}");
    let url = bouncer.url();
    let admin_url = format!(
        "postgres://{ADMIN_USER}:{ADMIN_PASSWORD}@127.0.0.1:{}/pgbouncer",
        bouncer.port()
    );
    runtime.block_on(async {
        let options = ConnectOptions::from_config(&SyncConfig::with_url(pg.url()), "bench");
        let mut options = options;
        options.sslmode = SslMode::Disable;
        let c = connect(&options).await.unwrap();
        central::migrate(&c, Layout::Plain).await.unwrap();
    });

    let dir = support::util::fast_temp_dir("fleet");
    eprintln!("Opening {gateways} stores in {} ...", dir.path().display());
    let fleet: Vec<Gateway> = (0..gateways).map(|i| open_gateway(dir.path(), i)).collect();

    let samples = Arc::new(Samples {
        rows: Mutex::new(Vec::new()),
        run: Mutex::new("setup".into()),
    });
    let sampler_stop = CancellationToken::new();
    let sampler = runtime.spawn(sample(
        admin_url,
        pg.url(),
        sample_every,
        samples.clone(),
        sampler_stop.clone(),
    ));
    let epoch = Instant::now();
    let mut out = Out {
        events: std::io::BufWriter::new(std::fs::File::create(out_dir.join("events.csv")).unwrap()),
        runs: std::io::BufWriter::new(std::fs::File::create(out_dir.join("runs.csv")).unwrap()),
        dir: out_dir.clone(),
        errors: BTreeMap::new(),
    };
    writeln!(out.events, "run,t,gateway,event,error").unwrap();
    writeln!(
        out.runs,
        "run,start_s,down_s,up_s,drained_s,attempts,peak_100ms,peak_1s"
    )
    .unwrap();
    let recorder = Arc::new(Recorder::default());
    let mut report: Vec<String> = Vec::new();
    let set_run = |name: &str| *samples.run.lock().unwrap() = name.to_string();
    let wait_drained = |fleet: &[Gateway], heads: &[i64], since: Instant, limit: Duration| {
        let mut done: Vec<Option<f64>> = vec![None; fleet.len()];
        loop {
            for (i, gw) in fleet.iter().enumerate() {
                if done[i].is_none() && gw.unsynced(heads[i]) == 0 {
                    done[i] = Some(since.elapsed().as_secs_f64());
                }
            }
            if done.iter().all(Option::is_some) || since.elapsed() > limit {
                return done;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    if phases.contains("drain") {
        eprintln!("Writing {rows} backlog rows into each of {gateways} stores ...");
        let t = Instant::now();
        runtime.block_on(async {
            let fills: Vec<_> = fleet
                .iter()
                .map(|gw| tokio::spawn(fill_backlog(gw.store.clone(), gw.id.clone(), rows)))
                .collect();
            for f in fills {
                f.await.unwrap();
            }
        });
        eprintln!("... {:.1}s. Phase 1: drain.", t.elapsed().as_secs_f64());
        set_run("drain");
        let stop = CancellationToken::new();
        let heads: Vec<i64> = fleet.iter().map(Gateway::head).collect();
        let start = Instant::now();
        let workers = start_workers(
            &runtime,
            &fleet,
            &sync_config(&url, batch, true),
            Duration::ZERO,
            &recorder,
            &stop,
        );
        let done = wait_drained(&fleet, &heads, start, Duration::from_secs(1800));
        let drain = start.elapsed();
        stop.cancel();
        runtime.block_on(async {
            for w in workers {
                let _ = w.await;
            }
        });
        set_run("idle");
        let events = recorder.take();
        out.events("drain", start, &events);
        let mut per_gw: Vec<f64> = done.iter().map(|d| d.unwrap_or(f64::NAN)).collect();
        per_gw.sort_by(f64::total_cmp);
        let total = (gateways * rows) as i64;
        let central: i64 = pg
            .psql("SELECT COUNT(*) FROM outpost.readings")
            .parse()
            .unwrap();
        let distinct: i64 = pg
            .psql("SELECT COUNT(*) FROM (SELECT DISTINCT gateway_id, uid FROM outpost.readings) d")
            .parse()
            .unwrap();
        let gws: i64 = pg
            .psql("SELECT COUNT(DISTINCT gateway_id) FROM outpost.readings")
            .parse()
            .unwrap();
        let txs = events.iter().filter(|e| e.kind == Kind::Ok).count();
        let fails = events.iter().filter(|e| e.kind == Kind::Fail).count();
        writeln!(
            out.runs,
            "drain,{:.3},,,{:.3},,,",
            secs(epoch, start),
            drain.as_secs_f64()
        )
        .unwrap();
        report.push(format!(
            "Phase 1: {gateways} gateways x {rows} rows = {total} rows, batch {batch}, all started at once\n  \
             drain {:.1}s ({:.0} rows/s); per gateway done after p50 {:.1}s, p90 {:.1}s, max {:.1}s\n  \
             central rows {central}, distinct (gateway, uid) {distinct}, gateways {gws}: duplicates {}, missing {}\n  \
             rounds ok {txs}, failed {fails}",
            drain.as_secs_f64(),
            total as f64 / drain.as_secs_f64(),
            percentile(&per_gw, 0.5),
            percentile(&per_gw, 0.9),
            percentile(&per_gw, 1.0),
            central - distinct,
            total - distinct,
        ));
        assert_eq!(central, total, "central holds every row once");
        assert_eq!(distinct, total);
    }

    for name in phases.split(',').filter(|p| *p != "drain") {
        let jitter = match name.trim_end_matches("-aligned") {
            "jitter" => true,
            "no-jitter" => false,
            other => panic!("unknown phase {other:?}: drain, jitter, no-jitter, jitter-aligned, no-jitter-aligned"),
        };
        // Gateways start at random points of one interval, or all at once ("aligned":
        // their rounds then stay in step, as after a fleet-wide restart).
        let spread = if name.ends_with("-aligned") {
            Duration::ZERO
        } else {
            INTERVAL
        };
        eprintln!(
            "Phase 2 ({name}): workers start within {spread:?}, trickle 1 reading/s each ..."
        );
        set_run(name);
        let stop = CancellationToken::new();
        let trickle_stop = CancellationToken::new();
        let start = Instant::now();
        let workers = start_workers(
            &runtime,
            &fleet,
            &sync_config(&url, batch, jitter),
            spread,
            &recorder,
            &stop,
        );
        let trickles: Vec<_> = fleet
            .iter()
            .map(|gw| {
                runtime.spawn(trickle(
                    gw.id.clone(),
                    gw.ingest.sender.clone(),
                    trickle_stop.clone(),
                ))
            })
            .collect();
        std::thread::sleep(warmup);
        eprintln!("Stopping PostgreSQL for {}s ...", outage.as_secs());
        let down = Instant::now();
        pg.stop_immediate();
        std::thread::sleep(outage.saturating_sub(down.elapsed()));
        pg.start_again();
        let up = Instant::now();
        eprintln!(
            "PostgreSQL is back after {:.1}s; waiting for every backlog ...",
            secs(down, up)
        );
        let heads: Vec<i64> = fleet.iter().map(Gateway::head).collect();
        let done = wait_drained(&fleet, &heads, up, Duration::from_secs(900));
        let drained = up.elapsed();
        // Everything, including the trickle, must reach central once: stop the trickle
        // and let the workers finish.
        trickle_stop.cancel();
        runtime.block_on(async {
            for t in trickles {
                let _ = t.await;
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let heads: Vec<i64> = fleet.iter().map(Gateway::head).collect();
        let all = wait_drained(&fleet, &heads, Instant::now(), Duration::from_secs(900));
        assert!(
            all.iter().all(Option::is_some),
            "every reading is synced at the end"
        );
        stop.cancel();
        runtime.block_on(async {
            for w in workers {
                let _ = w.await;
            }
        });
        set_run("idle");
        let events = recorder.take();
        out.events(name, down, &events);

        // Connection attempts from the stop until the backlog was drained.
        let end = secs(down, up) + drained.as_secs_f64();
        let attempts: Vec<f64> = events
            .iter()
            .filter(|e| e.kind == Kind::Connect)
            .map(|e| secs(down, e.at))
            .filter(|t| (0.0..=end).contains(t))
            .collect();
        let (peak100, at100) = peak_per_bucket(&attempts, 0.1);
        let (peak1s, at1s) = peak_per_bucket(&attempts, 1.0);
        let up_s = secs(down, up);
        let after_up: Vec<f64> = attempts.iter().copied().filter(|t| *t >= up_s).collect();
        let (peak100_up, _) = peak_per_bucket(&after_up, 0.1);
        // Per gateway: the first successful round after PostgreSQL returned.
        let mut back: Vec<f64> = (0..gateways as u32)
            .filter_map(|g| {
                events
                    .iter()
                    .filter(|e| e.gateway == g && e.kind == Kind::Ok && e.at >= up)
                    .map(|e| secs(up, e.at))
                    .next()
            })
            .collect();
        back.sort_by(f64::total_cmp);
        let mut per_gw: Vec<f64> = done.iter().map(|d| d.unwrap_or(f64::NAN)).collect();
        per_gw.sort_by(f64::total_cmp);
        let failed = events.iter().filter(|e| e.kind == Kind::Fail).count();
        writeln!(
            out.runs,
            "{name},{:.3},{:.3},{:.3},{:.3},{},{},{}",
            secs(down, start),
            secs(epoch, down),
            up_s,
            end,
            attempts.len(),
            peak100,
            peak1s
        )
        .unwrap();
        report.push(format!(
            "Phase 2 ({name}): PostgreSQL down {up_s:.1}s (PgBouncer up), trickle 1 reading/s per gateway\n  \
             connection attempts from the stop to drained: {}; failed rounds {failed}\n  \
             peak per 100 ms: {peak100} (at t={at100:.1}s), after the return: {peak100_up}; peak per 1 s: {peak1s} (at t={at1s:.0}s)\n  \
             first successful round after the return ({} gateways): min {:.1}s, p10 {:.1}s, p50 {:.1}s, p90 {:.1}s, max {:.1}s\n  \
             outage backlog drained: all {:.1}s after the return (per gateway p50 {:.1}s, p90 {:.1}s)",
            attempts.len(),
            back.len(),
            percentile(&back, 0.0),
            percentile(&back, 0.1),
            percentile(&back, 0.5),
            percentile(&back, 0.9),
            percentile(&back, 1.0),
            drained.as_secs_f64(),
            percentile(&per_gw, 0.5),
            percentile(&per_gw, 0.9),
        ));
    }
    sampler_stop.cancel();
    runtime.block_on(async {
        let _ = sampler.await;
    });

    // Central: every reading exactly once.
    let local_total: i64 = fleet.iter().map(Gateway::total).sum();
    let central: i64 = pg
        .psql("SELECT COUNT(*) FROM outpost.readings")
        .parse()
        .unwrap();
    let distinct: i64 = pg
        .psql("SELECT COUNT(*) FROM (SELECT DISTINCT gateway_id, uid FROM outpost.readings) d")
        .parse()
        .unwrap();
    report.push(format!(
        "End: local rows {local_total}, central rows {central}, distinct (gateway, uid) {distinct}: duplicates {}, missing {}",
        central - distinct,
        local_total - distinct
    ));

    // Pool samples.
    let rows_s = samples.rows.lock().unwrap().clone();
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(out.dir.join("samples.csv")).unwrap());
    writeln!(
        f,
        "run,t,servers,sv_active,sv_idle,sv_used,sv_login,cl_active,cl_waiting,maxwait,pg_backends"
    )
    .unwrap();
    let mut by_run: BTreeMap<String, (usize, i64, i64, i64, i64)> = BTreeMap::new();
    for (at, run, s) in &rows_s {
        writeln!(
            f,
            "{run},{:.3},{},{},{},{},{},{},{},{},{}",
            secs(epoch, *at),
            s.servers,
            s.sv_active,
            s.sv_idle,
            s.sv_used,
            s.sv_login,
            s.cl_active,
            s.cl_waiting,
            s.maxwait,
            s.pg_backends
        )
        .unwrap();
        let e = by_run.entry(run.clone()).or_default();
        e.0 += 1;
        e.1 = e.1.max(s.servers);
        e.2 = e.2.max(s.sv_active + s.sv_idle + s.sv_used + s.sv_login);
        e.3 = e.3.max(s.pg_backends);
        e.4 = e.4.max(s.cl_waiting);
    }
    f.flush().unwrap();
    for (run, (n, servers, pools, backends, waiting)) in &by_run {
        report.push(format!(
            "Samples [{run}]: {n}; max SHOW SERVERS {servers}, max sv_* sum {pools}, max pg_stat_activity backends {backends} (pool {POOL_SIZE}); max cl_waiting {waiting}"
        ));
    }
    let over = rows_s
        .iter()
        .filter(|(_, _, s)| s.servers > POOL_SIZE as i64 || s.pg_backends > POOL_SIZE as i64)
        .count();
    report.push(format!("Samples above the pool size: {over}"));
    let prepared = out
        .errors
        .iter()
        .filter(|(k, _)| k.to_ascii_lowercase().contains("prepared statement"))
        .map(|(_, n)| n)
        .sum::<usize>();
    report.push(format!("Prepared-statement errors: {prepared}"));
    report.push("Sync errors by kind:".into());
    for (k, n) in &out.errors {
        report.push(format!("  {n:6}  {k}"));
    }
    out.events.flush().unwrap();
    out.runs.flush().unwrap();
    drop(fleet);
    let text = report.join("\n");
    println!("{text}");
    std::fs::write(out.dir.join("summary.txt"), format!("{text}\n")).unwrap();
    eprintln!("Raw series in {}", out.dir.display());
}
