//! Tamper evidence of the local store (issue 17, G10), black-box: the real binary
//! writes a store (`outpost demo`, `outpost run`), the test tampers with it behind the
//! agent's back as someone with the file would, and `outpost verify --db` must exit 1
//! naming the kind of damage and where — and exit 0 on an untouched store, including
//! after a clock correction, a crash loop and power cuts (LazyFS).
//!
//! Retention and size-cap pruning are covered beside the code
//! (`src/store/chain/tests.rs`), where the clock of the rows can be chosen.

mod support;

use outpost::store::chain;
use outpost::store::signing::{self, GatewayKey};
use rand::{Rng, SeedableRng};
use rusqlite::{params, Connection};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::agent::{outpost, Agent};
use support::lazyfs::LazyFs;
use support::{free_port, SerialLink};

/// `outpost verify --db DB`: (exit code, stdout).
fn verify(db: &Path) -> (i32, String) {
    let (code, out, err) = outpost(["verify", "--db", db.to_str().unwrap()]);
    assert!(
        code == Some(0) || code == Some(1),
        "verify exited {code:?}: {out}{err}"
    );
    (code.unwrap(), out)
}

fn assert_intact(db: &Path) -> String {
    let (code, out) = verify(db);
    assert_eq!(code, 0, "expected intact:\n{out}");
    assert!(out.contains(": intact"), "{out}");
    out
}

/// Asserts `outpost verify` finds damage whose description contains each of `words`.
fn assert_damaged(db: &Path, what: &str, words: &[&str]) {
    let (code, out) = verify(db);
    assert_eq!(code, 1, "{what}: expected damage, got:\n{out}");
    assert!(out.contains("DAMAGED"), "{what}: {out}");
    for w in words {
        assert!(out.contains(w), "{what}: expected {w:?} in:\n{out}");
    }
    eprintln!(
        "{what}: {}",
        out.lines().skip(1).collect::<Vec<_>>().join(" | ")
    );
}

/// A copy of the store `db` (with its WAL and key) in a new directory.
fn copy_store(db: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("outpost.db");
    // Fold the WAL in first so a plain file copy is the whole database.
    Connection::open(db)
        .unwrap()
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    std::fs::copy(db, &to).unwrap();
    let key = signing::key_path(db);
    if key.exists() {
        std::fs::copy(&key, signing::key_path(&to)).unwrap();
    }
    (dir, to)
}

fn tamper(db: &Path, sql: &str) {
    Connection::open(db).unwrap().execute_batch(sql).unwrap();
}

/// An audit entry written the way a command against a stopped agent's database does:
/// in its own transaction, sealed before the commit.
fn audit_entry(db: &Path) {
    let mut conn = Connection::open(db).unwrap();
    let tx = conn.transaction().unwrap();
    tx.execute(
        "INSERT INTO audit_log (at, boot_id, since_boot, kind, actor, details) \
         VALUES (?1, '', 0, 'command', 'process:test', '{\"command\":\"test\"}')",
        params![chrono::Utc::now().timestamp_micros()],
    )
    .unwrap();
    chain::seal(&tx, chrono::Utc::now().timestamp_micros()).unwrap();
    tx.commit().unwrap();
}

fn i64_of(db: &Path, sql: &str) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

#[test]
fn a_demo_store_verifies_and_every_kind_of_tampering_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let db = support::agent::demo_database(dir.path(), "14s");
    audit_entry(&db);
    let out = assert_intact(&db);
    assert!(out.contains("signatures valid"), "{out}");
    assert!(
        out.contains("newest signed head"),
        "the demo signs at its stop:\n{out}"
    );
    assert!(
        i64_of(&db, "SELECT COUNT(*) FROM alert_events") > 0,
        "the demo's alarm fired"
    );
    let readings = i64_of(&db, "SELECT COUNT(*) FROM readings");
    assert!(readings > 20, "{readings}");

    let case = |what: &str, sql: &str, words: &[&str]| {
        let (_keep, copy) = copy_store(&db);
        assert_intact(&copy);
        tamper(&copy, sql);
        assert_damaged(&copy, what, words);
    };
    case(
        "value changed",
        "UPDATE readings SET value = value + 0.5 WHERE id = 10",
        &["digest mismatch", "(readings, ids", "rows from"],
    );
    case(
        "time changed",
        "UPDATE readings SET observed_at = observed_at - 60000000 WHERE id = 12",
        &["digest mismatch", "(readings"],
    );
    case(
        "row deleted",
        "DELETE FROM readings WHERE id = 15",
        &["row deleted", "(readings"],
    );
    case(
        "row inserted after the last link",
        "INSERT INTO readings (uid, source, device, metric, value, observed_at, received_at) \
         SELECT randomblob(16), source, device, metric, 2.0, observed_at + 1, received_at + 1 \
         FROM readings ORDER BY id DESC LIMIT 1",
        &["row inserted", "is in no link", "readings"],
    );
    case(
        "row inserted into a link's range",
        "DELETE FROM readings WHERE id = 20; \
         INSERT INTO readings (id, uid, source, device, metric, value, observed_at, received_at) \
         VALUES (20, randomblob(16), 'x', 'x', 'x', 1.0, 0, 0)",
        &["digest mismatch", "(readings"],
    );
    case(
        "two rows swapped",
        "UPDATE readings SET value = CASE id WHEN 8 THEN (SELECT value FROM readings WHERE id = 9) \
         ELSE (SELECT value FROM readings WHERE id = 8) END, \
         device = CASE id WHEN 8 THEN (SELECT device FROM readings WHERE id = 9) \
         ELSE (SELECT device FROM readings WHERE id = 8) END WHERE id IN (8, 9)",
        &["digest mismatch", "(readings"],
    );
    case(
        "audit entry deleted",
        "DROP TRIGGER audit_log_append_only_delete; DELETE FROM audit_log WHERE id = (SELECT MAX(id) FROM audit_log)",
        &["row deleted", "(audit_log"],
    );
    case(
        "alert event edited",
        "UPDATE alert_events SET value = 5.0 WHERE id = (SELECT MIN(id) FROM alert_events)",
        &["digest mismatch", "(alert_events"],
    );
    case(
        "link edited",
        "UPDATE chain_links SET rows = rows - 1, last_id = last_id - 1 WHERE seq = 3",
        &["link edited", "at link 3"],
    );
    case(
        "link deleted",
        "DELETE FROM chain_links WHERE seq = 4",
        &["link missing or inserted", "expected seq 4"],
    );

    // A signature forged with another key: the key differs from the key file.
    let other = GatewayKey::generate();
    let (_keep, copy) = copy_store(&db);
    let (seq, head) = chain::tip(&Connection::open(&copy).unwrap()).unwrap();
    let sig = other.sign(&chain::head_message(seq, &head));
    Connection::open(&copy)
        .unwrap()
        .execute(
            "UPDATE chain_signatures SET signature = ?1, public_key = ?2",
            params![&sig[..], &other.public_key()[..]],
        )
        .unwrap();
    assert_damaged(
        &copy,
        "signature forged with another key",
        &["public key differs"],
    );
    // ... and with the key file swapped too (a new key for the gateway): the first
    // signature's key no longer matches the file.
    let (_keep2, copy) = copy_store(&db);
    std::fs::write(signing::key_path(&copy), [7u8; 32]).unwrap();
    assert_damaged(&copy, "key file swapped", &["public key differs"]);
    // A signature altered under the right key.
    let (_keep3, copy) = copy_store(&db);
    tamper(
        &copy,
        "UPDATE chain_signatures SET signature = zeroblob(64) WHERE id = (SELECT MAX(id) FROM chain_signatures)",
    );
    assert_damaged(&copy, "signature altered", &["signature invalid"]);
    // A rewritten row with a recomputed chain (what root with the key file can do) is
    // not caught locally, but one without the key is: the old signature no longer
    // matches the rewritten head.
    let (_keep4, copy) = copy_store(&db);
    rewrite_chain_without_key(&copy);
    assert_damaged(
        &copy,
        "chain recomputed without the key",
        &["signed head differs"],
    );
}

/// Changes a reading and recomputes every link from there (digests and heads), as an
/// attacker who knows the format but not the key would.
fn rewrite_chain_without_key(db: &Path) {
    let conn = Connection::open(db).unwrap();
    conn.execute("UPDATE readings SET value = value + 1 WHERE id = 5", [])
        .unwrap();
    let links: Vec<(i64, String, i64, i64, i64)> = conn
        .prepare("SELECT seq, tbl, first_id, last_id, rows FROM chain_links ORDER BY seq")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut previous = chain::GENESIS;
    for (seq, tbl, first, last, rows) in links {
        let tbl = chain::Table::parse(&tbl).unwrap();
        let mut digest = chain::RowDigest::new();
        chain::for_each_row(&conn, tbl, first - 1, Some(last), None, |_, enc, _| {
            digest.add(enc);
            Ok(())
        })
        .unwrap()
        .unwrap();
        let digest = digest.finish();
        let head = chain::link_head(&previous, seq, tbl, first, last, rows, &digest);
        conn.execute(
            "UPDATE chain_links SET digest = ?2, head = ?3 WHERE seq = ?1",
            params![seq, &digest[..], &head[..]],
        )
        .unwrap();
        previous = head;
    }
}

#[test]
fn an_older_database_upgrades_and_its_earlier_readings_are_reported_uncovered() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outpost.db");
    {
        let mut conn = Connection::open(&db).unwrap();
        outpost::store::schema::migrate_to(&mut conn, outpost::store::schema::CHAIN_VERSION - 1)
            .unwrap();
        for i in 0..5i64 {
            conn.execute(
                "INSERT INTO readings (uid, source, device, metric, value, observed_at, received_at) \
                 VALUES (randomblob(16), 's', 'd', 'm', ?1, ?2, ?2)",
                params![i as f64, 1_700_000_000_000_000 + i],
            )
            .unwrap();
        }
    }
    let (code, _, err) = outpost(["verify", "--db", db.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no hash chain yet"), "{err}");
    let port = free_port();
    let mut agent = Agent::new(
        dir.path(),
        &format!(
            "[storage]\npath = \"{}\"\nbatch_max_delay = \"10ms\"\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\n\
             [[sources]]\ntype = \"simulated\"\nname = \"sim\"\nperiod = \"50ms\"\n",
            db.display()
        ),
    )
    .start();
    agent.wait_until("new readings", || {
        agent.try_count("SELECT COUNT(*) FROM readings") >= Some(15)
    });
    agent.terminate();
    let out = assert_intact(&db);
    assert!(
        out.contains("5 readings from before the chain (version upgrade) not covered"),
        "{out}"
    );
}

/// Issue 15: the upgrade that keys the readings' dedupe by time (schema 11) rebuilds the
/// table. Every row keeps its id and columns, the kept counts stay right, a redelivery
/// of a pre-upgrade reading is still refused (G2) both where its uid fixes its time
/// (TTN) and where it comes with its arrival time (sequences, ChirpStack without
/// `time`), and the chain sealed before the upgrade still verifies intact (G10).
#[tokio::test]
async fn the_time_keyed_dedupe_upgrade_keeps_every_row_and_still_dedupes() {
    use outpost::model::{Batch, Reading, Uid};
    use outpost::store::{schema, StorageConfig, Store, StoreOptions};
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outpost.db");
    // An hour ago: within the retention window, so the first pruning pass keeps them.
    let base = chrono::Utc::now().timestamp_micros() - 3_600_000_000;
    let ttn_uid = |i: i64| Uid::derive(&["ttn", "app", "dev", &i.to_string(), "t"]);
    let seq_uid = |i: i64| Uid::derive(&["station", &i.to_string(), "t"]);
    {
        let mut conn = Connection::open(&db).unwrap();
        conn.pragma_update(None, "page_size", 1024).unwrap();
        let _: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        schema::migrate_to(&mut conn, schema::UID_TIME_VERSION - 1).unwrap();
        for i in 0..300i64 {
            // Network-server time, received 1.5 s later; and arrival-stamped.
            conn.execute(
                "INSERT INTO readings (uid, source, device, metric, value, unit, observed_at, \
                 received_at, flags, meta) VALUES (?1, 'ttn', 'dev', 't', ?2, '°C', ?3, ?4, 0, ?5)",
                params![
                    &ttn_uid(i).0[..],
                    i as f64,
                    base + i,
                    base + i + 1_500_000,
                    format!("{{\"f_cnt\":{i}}}")
                ],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO readings (uid, source, device, metric, value, observed_at, received_at, flags) \
                 VALUES (?1, 'station', 'st', 't', ?2, ?3, ?3, 1)",
                params![&seq_uid(i).0[..], i as f64 / 2.0, base + i * 1000],
            )
            .unwrap();
        }
        chain::seal(&conn, base + 10_000_000).unwrap();
        conn.execute("UPDATE readings SET synced = 1 WHERE id <= 100", [])
            .unwrap();
    }
    let rows = |db: &Path| -> Vec<Vec<rusqlite::types::Value>> {
        let conn = Connection::open(db).unwrap();
        let mut stmt = conn.prepare("SELECT * FROM readings ORDER BY id").unwrap();
        let n = stmt.column_count();
        let all = stmt
            .query_map([], |r| {
                (0..n).map(|c| r.get(c)).collect::<Result<Vec<_>, _>>()
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        all
    };
    let before = rows(&db);
    assert_eq!(before.len(), 600);
    let cfg = StorageConfig {
        path: db.clone(),
        batch_max_delay: outpost::config::HumanDuration::from_millis(5),
        ..StorageConfig::default()
    };
    let (store, ingest) = Store::open(&cfg, StoreOptions::default()).unwrap();
    assert_eq!(rows(&db), before, "every row, id and column kept");
    {
        let conn = Connection::open(&db).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, schema::CURRENT_VERSION);
        let auto: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'sqlite_autoindex_readings%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(auto, 0, "the random uid index is gone");
        let counts = outpost::store::reading_counts(&conn).unwrap();
        assert_eq!((counts.stored, counts.unsynced), (600, 500));
    }
    let now = chrono::Utc::now();
    let reading = |uid: Uid, source: &str, observed: chrono::DateTime<chrono::Utc>| Reading {
        uid,
        source: source.into(),
        device: "dev".into(),
        metric: "t".into(),
        value: 1.0,
        unit: None,
        observed_at: observed,
        received_at: if source == "ttn" { now } else { observed },
        flags: 0,
        meta: None,
    };
    let at = |us: i64| outpost::model::from_micros(us);
    let (batch, ack) = Batch::with_ack(vec![
        // Redeliveries: a TTN uplink (same NS time, new arrival), a sequence reading
        // stamped again on arrival (a new time for the same uid).
        reading(ttn_uid(7), "ttn", at(base + 7)),
        reading(seq_uid(7), "station", now),
        // New readings.
        reading(ttn_uid(1000), "ttn", at(base + 1000)),
        reading(seq_uid(1000), "station", now),
    ]);
    ingest.sender.send(batch).await.unwrap();
    let committed = ack.await.unwrap().unwrap();
    assert_eq!((committed.inserted, committed.duplicates), (2, 2));
    drop(store);
    drop(ingest.sender);
    ingest.finished.await.unwrap();
    let out = assert_intact(&db);
    assert!(out.contains("602 rows checked"), "{out}");
    // Deletes and sync marks still move the kept counts (the triggers were rebuilt).
    let conn = Connection::open(&db).unwrap();
    conn.execute("DELETE FROM readings WHERE id <= 10", [])
        .unwrap();
    conn.execute(
        "UPDATE readings SET synced = 1 WHERE id BETWEEN 101 AND 150",
        [],
    )
    .unwrap();
    let counts = outpost::store::reading_counts(&conn).unwrap();
    let counted = outpost::store::counted_readings(&conn).unwrap();
    assert_eq!(
        (counts.stored, counts.unsynced),
        (counted.stored, counted.unsynced)
    );
    assert_eq!((counts.stored, counts.unsynced), (592, 452));
}

/// G8: readings stamped while the clock was not synchronised are moved with the step
/// and flagged corrected; the audit entries let the verifier recover what was sealed.
#[test]
fn a_clock_correction_keeps_the_store_verifiable() {
    let dir = tempfile::tempdir().unwrap();
    let link = SerialLink::start();
    let db = dir.path().join("outpost.db");
    let offset = dir.path().join("clock-offset");
    std::fs::write(&offset, "0 unsynchronized").unwrap();
    let port = free_port();
    let config = format!(
        "[storage]\npath = \"{}\"\nbatch_max_delay = \"10ms\"\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\nsource_max_silence = \"1h\"\n\
         [[sources]]\ntype = \"serial\"\nname = \"ser\"\npath = \"{}\"\nformat = \"key-value\"\n\
         reopen_max_delay = \"500ms\"\n[sources.fields]\ndevice = \"p1\"\n",
        db.display(),
        link.device_path().display()
    );
    let mut agent = Agent::new(dir.path(), &config)
        .env("OUTPOST_TEST_CLOCK_OFFSET_FILE", &offset)
        .deadline(Duration::from_secs(60))
        .start();
    let write_lines = |from: usize, to: usize| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(link.peer_path())
            .unwrap();
        for i in from..to {
            f.write_all(format!("n={i}\n").as_bytes()).unwrap();
        }
        f.flush().unwrap();
    };
    // The port opens shortly after the start; lines written before are lost, so
    // write until the first readings arrive.
    let mut written = 0;
    agent.wait_until("the first unsynchronised readings", || {
        write_lines(written, written + 1);
        written += 1;
        std::thread::sleep(Duration::from_millis(200));
        agent.try_count("SELECT COUNT(*) FROM readings WHERE flags = 1") >= Some(1)
    });
    write_lines(written, written + 10);
    agent.wait_until("10 more readings flagged CLOCK_UNSYNCED", || {
        agent.try_count("SELECT COUNT(*) FROM readings WHERE flags = 1") >= Some(11)
    });
    assert_intact(&db);
    std::fs::write(&offset, "86400 synchronized").unwrap();
    agent.wait_until("the readings to be corrected", || {
        agent.try_count("SELECT COUNT(*) FROM readings WHERE flags = 1 | 8") >= Some(11)
    });
    write_lines(1000, 1005);
    agent.wait_until("readings after the correction", || {
        agent.try_count("SELECT COUNT(*) FROM readings WHERE flags = 0") >= Some(5)
    });
    let out = assert_intact(&db);
    assert!(out.contains("clock corrections replayed"), "{out}");
    let audited = i64_of(
        &db,
        "SELECT COUNT(*) FROM audit_log WHERE kind IN ('clock.step', 'clock.correction')",
    );
    assert!(audited >= 3, "a step, a move and a mark: {audited}");
    agent.terminate();
    let out = assert_intact(&db);
    eprintln!("clock correction: {out}");
    // Without the audit entries the corrected rows no longer match what was sealed.
    let (_keep, copy) = copy_store(&db);
    tamper(
        &copy,
        "DROP TRIGGER audit_log_append_only_update; \
         UPDATE audit_log SET details = '{}' WHERE kind = 'clock.correction'",
    );
    let (code, _) = verify(&copy);
    assert_eq!(code, 1);
}

/// Killed with SIGKILL mid-ingest a few times: the chain holds exactly what committed.
#[test]
fn a_crash_loop_leaves_a_verifiable_store() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outpost.db");
    let port = free_port();
    let config = format!(
        "[storage]\npath = \"{}\"\nbatch_max_delay = \"5ms\"\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\n\
         [[sources]]\ntype = \"simulated\"\nname = \"sim\"\nperiod = \"10ms\"\n",
        db.display()
    );
    let seed: u64 = std::env::var("OUTPOST_INTEGRITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash loop seed {seed} (OUTPOST_INTEGRITY_SEED)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut agent = Agent::new(dir.path(), &config).start();
    for _ in 0..5 {
        let before = agent
            .try_count("SELECT COUNT(*) FROM readings")
            .unwrap_or(0);
        agent.wait_until("readings committed", || {
            agent.try_count("SELECT COUNT(*) FROM readings") > Some(before + 20)
        });
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..700)));
        agent.kill();
        assert_intact(&db);
        agent.start_again();
    }
    agent.wait_until("more readings", || {
        agent.try_count("SELECT COUNT(*) FROM readings") >= Some(200)
    });
    agent.terminate();
    let out = assert_intact(&db);
    eprintln!("crash loop: {out}");
}

/// Power cuts (LazyFS drops everything not fsynced): what survived verifies.
#[test]
fn power_cuts_leave_a_chain_consistent_with_what_was_committed() {
    let lazyfs = match LazyFs::unavailable() {
        Ok(binary) => binary,
        Err(why) => {
            eprintln!("SKIPPED power_cuts_leave_a_chain_consistent_with_what_was_committed: {why}");
            return;
        }
    };
    let mut fs = LazyFs::mount(&lazyfs);
    let db = fs.path().join("outpost.db");
    let mut agent = Agent::in_temp_dir(|_| {
        format!(
            "[storage]\npath = \"{}\"\nbatch_max_delay = \"5ms\"\n[http]\nenabled = false\n\
             [[sources]]\ntype = \"simulated\"\nname = \"sim\"\nperiod = \"10ms\"\n",
            db.display()
        )
    })
    .start();
    let survived = tempfile::tempdir().unwrap();
    for cut in 0..3 {
        let before = agent
            .try_count("SELECT COUNT(*) FROM readings")
            .unwrap_or(0);
        agent.wait_until("readings committed", || {
            agent.try_count("SELECT COUNT(*) FROM readings") > Some(before + 50)
        });
        agent.kill();
        fs.power_cut();
        // What survived: the backing directory, copied (with its WAL) and verified.
        let to = survived.path().join(format!("cut{cut}"));
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(fs.root()).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
        let out = assert_intact(&to.join("outpost.db"));
        eprintln!("power cut {cut}: {}", out.lines().nth(1).unwrap_or(""));
        fs.remount();
        agent.start_again();
    }
    agent.terminate();
}
