//! `outpost central verify` over a large central table, through PgBouncer (transaction
//! pooling), against the raw read of the same rows in the same keyset pages, in the
//! same run.
//!
//!     cargo bench --bench central_verify
//!     ROWS=5000000 LINK_ROWS=500 cargo bench --bench central_verify
//!     OUTPOST_TEST_TMPDIR=/var/tmp/outpost-bench ROWS=50000000 cargo bench --bench central_verify
//!
//! PostgreSQL's data directory is in `/dev/shm` (RAM) by default, like every test's;
//! 50M rows with their indexes need about 25 GB, so the size runs with
//! `OUTPOST_TEST_TMPDIR` pointing at a disk (a directory the `postgres` user can enter).
//!
//! The readings are generated in PostgreSQL (`INSERT … SELECT generate_series`), and a
//! matching chain — links of `LINK_ROWS` readings, as group commits seal them, a signed
//! head every 100 links and at the end — is computed here with the gateway's own code
//! (`store::chain`) and inserted beside them. Two gateways are verified: a small one
//! (ROWS / 10) and the large one, each by the real binary as a child process whose peak
//! RSS (VmHWM) is sampled: memory must not grow with the table. The baseline streams
//! the same rows with the same query shape (`… WHERE gateway_id = $1 AND seq > $2
//! ORDER BY seq LIMIT 10000`, one short transaction each) and drops them.

#[path = "../tests/support/mod.rs"]
mod support;

use outpost::store::chain::{self, encode_reading, link_head, ReadingRow, RowDigest, Table};
use outpost::sync::central::{self, Layout};
use outpost::sync::postgres::{connect, ConnectOptions};
use outpost::sync::{SslMode, SyncConfig};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{PgBouncer, Postgres};
use tokio_postgres::types::Type;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// 2026-01-01T00:00:00Z in µs.
const BASE: i64 = 1_767_225_600_000_000;

fn uid(i: i64) -> [u8; 16] {
    let mut u = [0u8; 16];
    u[8..].copy_from_slice(&i.to_be_bytes());
    u
}

/// Generates `rows` readings of `gateway` in PostgreSQL (seq 1..=rows).
fn generate_rows(pg: &Postgres, gateway: &str, rows: usize) {
    let chunk = 1_000_000usize;
    let mut from = 1usize;
    while from <= rows {
        let to = (from + chunk - 1).min(rows);
        pg.psql(&format!(
            "INSERT INTO outpost.readings (gateway_id, uid, observed_at, received_at, source, device, metric, \
               value, unit, flags, seq) \
             SELECT '{gateway}', lpad(to_hex(i), 32, '0')::uuid, \
               '2026-01-01 00:00:00+00'::timestamptz + i * interval '100 milliseconds', \
               '2026-01-01 00:00:00+00'::timestamptz + i * interval '100 milliseconds', \
               'bench', 'device-' || (i % 50), 'temperature', (i % 1000)::float8 / 10.0::float8, '°C', 0, i \
             FROM generate_series({from}::bigint, {to}::bigint) AS i"
        ));
        from = to + 1;
    }
    pg.psql("ANALYZE outpost.readings");
}

/// Computes the chain of those rows and inserts links, signatures, the start and the
/// pinned key.
async fn insert_chain(
    client: &tokio_postgres::Client,
    gateway: &str,
    rows: i64,
    link_rows: i64,
    key: &ed25519_dalek::SigningKey,
) {
    let public = key.verifying_key().to_bytes().to_vec();
    client
        .execute_typed(
            "INSERT INTO outpost.gateways (gateway_id, agent_version, public_key, public_key_pinned_at) \
             VALUES ($1, 'bench', $2, now())",
            &[(&gateway, Type::TEXT), (&public, Type::BYTEA)],
        )
        .await
        .unwrap();
    client
        .execute_typed(
            "INSERT INTO outpost.chain_starts (gateway_id, tbl, start_id) VALUES ($1, 'readings', 0)",
            &[(&gateway, Type::TEXT)],
        )
        .await
        .unwrap();
    let mut head = chain::GENESIS;
    let mut buf = Vec::with_capacity(128);
    let (mut seqs, mut firsts, mut lasts, mut counts, mut digests, mut heads, mut sealed) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let (mut sig_ids, mut sig_seqs, mut sig_heads, mut sig_sigs, mut sig_keys, mut sig_at) = (
        Vec::<i64>::new(),
        Vec::<i64>::new(),
        Vec::<Vec<u8>>::new(),
        Vec::<Vec<u8>>::new(),
        Vec::<Vec<u8>>::new(),
        Vec::<chrono::DateTime<chrono::Utc>>::new(),
    );
    let links = (rows + link_rows - 1) / link_rows;
    for seq in 1..=links {
        let first = (seq - 1) * link_rows + 1;
        let last = (seq * link_rows).min(rows);
        let mut digest = RowDigest::new();
        for i in first..=last {
            buf.clear();
            let device = format!("device-{}", i % 50);
            encode_reading(
                &ReadingRow {
                    id: i,
                    uid: &uid(i),
                    source: "bench",
                    device: &device,
                    metric: "temperature",
                    value: (i % 1000) as f64 / 10.0,
                    unit: Some("°C"),
                    observed_at: BASE + i * 100_000,
                    flags: 0,
                },
                &mut buf,
            );
            digest.add(&buf);
        }
        let digest = digest.finish();
        let count = last - first + 1;
        head = link_head(&head, seq, Table::Readings, first, last, count, &digest);
        let at = outpost::model::from_micros(BASE + last * 100_000);
        seqs.push(seq);
        firsts.push(first);
        lasts.push(last);
        counts.push(count);
        digests.push(digest.to_vec());
        heads.push(head.to_vec());
        sealed.push(at);
        if seq % 100 == 0 || seq == links {
            let sig = ed25519_dalek::Signer::sign(key, &chain::head_message(seq, &head));
            sig_ids.push(sig_ids.len() as i64 + 1);
            sig_seqs.push(seq);
            sig_heads.push(head.to_vec());
            sig_sigs.push(sig.to_bytes().to_vec());
            sig_keys.push(public.clone());
            sig_at.push(at);
        }
        if seqs.len() == 10_000 || seq == links {
            client
                .execute_typed(
                    "INSERT INTO outpost.chain_links (gateway_id, seq, tbl, first_id, last_id, rows, digest, head, sealed_at) \
                     SELECT $1, l.seq, 'readings', l.f, l.l, l.r, l.d, l.h, l.s FROM unnest($2::int8[], $3::int8[], \
                       $4::int8[], $5::int8[], $6::bytea[], $7::bytea[], $8::timestamptz[]) AS l(seq, f, l, r, d, h, s)",
                    &[
                        (&gateway, Type::TEXT),
                        (&seqs, Type::INT8_ARRAY),
                        (&firsts, Type::INT8_ARRAY),
                        (&lasts, Type::INT8_ARRAY),
                        (&counts, Type::INT8_ARRAY),
                        (&digests, Type::BYTEA_ARRAY),
                        (&heads, Type::BYTEA_ARRAY),
                        (&sealed, Type::TIMESTAMPTZ_ARRAY),
                    ],
                )
                .await
                .unwrap();
            for v in [&mut seqs, &mut firsts, &mut lasts, &mut counts] {
                v.clear();
            }
            digests.clear();
            heads.clear();
            sealed.clear();
        }
    }
    client
        .execute_typed(
            "INSERT INTO outpost.chain_signatures (gateway_id, id, seq, head, signature, public_key, signed_at) \
             SELECT $1, s.* FROM unnest($2::int8[], $3::int8[], $4::bytea[], $5::bytea[], $6::bytea[], \
               $7::timestamptz[]) AS s",
            &[
                (&gateway, Type::TEXT),
                (&sig_ids, Type::INT8_ARRAY),
                (&sig_seqs, Type::INT8_ARRAY),
                (&sig_heads, Type::BYTEA_ARRAY),
                (&sig_sigs, Type::BYTEA_ARRAY),
                (&sig_keys, Type::BYTEA_ARRAY),
                (&sig_at, Type::TIMESTAMPTZ_ARRAY),
            ],
        )
        .await
        .unwrap();
}

/// The baseline: the same rows in the same keyset pages through PgBouncer, dropped.
async fn raw_read(url: &str, gateway: &str) -> (u64, Duration) {
    let mut sync = SyncConfig::with_url(url);
    sync.sslmode = SslMode::Disable;
    let central = connect(&ConnectOptions::from_config(&sync, "bench"))
        .await
        .unwrap();
    let started = Instant::now();
    let mut after = 0i64;
    let mut total = 0u64;
    let limit = 10_000i64;
    loop {
        let rows = central
            .transaction(central.client().query_typed(
                "SELECT seq, uuid_send(uid), source, device, metric, value, unit, observed_at, flags \
                 FROM outpost.readings WHERE gateway_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                &[
                    (&gateway, Type::TEXT),
                    (&after, Type::INT8),
                    (&limit, Type::INT8),
                ],
            ))
            .await
            .unwrap();
        let Some(last) = rows.last() else { break };
        after = last.get(0);
        total += rows.len() as u64;
        if (rows.len() as i64) < limit {
            break;
        }
    }
    (total, started.elapsed())
}

/// Peak RSS of a process in KiB (VmHWM), 0 once it is gone.
fn hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `outpost central verify --gateway G` through PgBouncer: (wall time, peak RSS
/// KiB, its output).
fn run_verify(url: &str, gateway: &str) -> (Duration, u64, String) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args([
            "central",
            "verify",
            "--sslmode",
            "disable",
            "--url",
            url,
            "--gateway",
            gateway,
        ])
        .env("OUTPOST_CONFIG", "/nonexistent/outpost.toml")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run outpost central verify");
    let pid = child.id();
    let mut peak = 0;
    loop {
        peak = peak.max(hwm_kib(pid));
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "verify failed: {text}");
    (elapsed, peak, text)
}

fn main() {
    let rows = env_usize("ROWS", 2_000_000) as i64;
    let link_rows = env_usize("LINK_ROWS", 500) as i64;
    let small = (rows / 10).max(link_rows);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    let key = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    eprintln!("generating {rows} + {small} rows and their chains ...");
    let setup = Instant::now();
    runtime.block_on(async {
        let mut sync = SyncConfig::with_url(pg.url());
        sync.sslmode = SslMode::Disable;
        let c = connect(&ConnectOptions::from_config(&sync, "bench"))
            .await
            .unwrap();
        central::migrate(&c, Layout::Plain).await.unwrap();
        let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        generate_rows(&pg, "bench-large", rows as usize);
        insert_chain(&client, "bench-large", rows, link_rows, &key).await;
        generate_rows(&pg, "bench-small", small as usize);
        insert_chain(&client, "bench-small", small, link_rows, &key).await;
    });
    pg.psql("VACUUM ANALYZE outpost.readings");
    let size = pg.psql("SELECT pg_size_pretty(pg_total_relation_size('outpost.readings'))");
    eprintln!(
        "setup {:.0}s; outpost.readings is {size}",
        setup.elapsed().as_secs_f64()
    );

    // Warm the cache the same way for both contenders: the baseline first, then verify.
    let (raw_rows, raw_time) = runtime.block_on(raw_read(&bouncer.url(), "bench-large"));
    assert_eq!(raw_rows as i64, rows);
    let (small_time, small_peak, _) = run_verify(&bouncer.url(), "bench-small");
    let (large_time, large_peak, text) = run_verify(&bouncer.url(), "bench-large");
    assert!(text.contains("OK"), "{text}");
    let (raw_rows2, raw_time2) = runtime.block_on(raw_read(&bouncer.url(), "bench-large"));
    assert_eq!(raw_rows2, raw_rows);
    let raw_best = raw_time.min(raw_time2);

    let raw_rate = rows as f64 / raw_best.as_secs_f64();
    let verify_rate = rows as f64 / large_time.as_secs_f64();
    println!(
        "central_verify: {rows} readings of one gateway ({} links of {link_rows}), table {size}",
        (rows + link_rows - 1) / link_rows
    );
    println!(
        "  raw keyset read through PgBouncer (baseline): {:.1}s, {raw_rate:.0} rows/s",
        raw_best.as_secs_f64()
    );
    println!(
        "  outpost central verify:                        {:.1}s, {verify_rate:.0} rows/s (process start included)",
        large_time.as_secs_f64()
    );
    println!(
        "  ratio verify/raw time: {:.2}",
        large_time.as_secs_f64() / raw_best.as_secs_f64()
    );
    println!(
        "  peak RSS of verify: {:.1} MiB at {small} rows ({:.1}s), {:.1} MiB at {rows} rows",
        small_peak as f64 / 1024.0,
        small_time.as_secs_f64(),
        large_peak as f64 / 1024.0
    );
    println!(
        "  extrapolated to 50M rows at this rate: {:.0} s ({:.1} min)",
        50e6 / verify_rate,
        50e6 / verify_rate / 60.0
    );
}
