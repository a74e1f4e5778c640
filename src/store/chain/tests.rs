use super::*;

fn db() -> Connection {
    let mut conn = Connection::open_in_memory().unwrap();
    crate::store::schema::migrate(&mut conn).unwrap();
    conn
}

fn insert_reading(conn: &Connection, uid: u8, value: f64, unit: Option<&str>) -> i64 {
    conn.execute(
        "INSERT INTO readings (uid, source, device, metric, value, unit, observed_at, received_at) \
         VALUES (?1, 's', 'd', 'm', ?2, ?3, ?4, ?4)",
        params![vec![uid; 16], value, unit, 1_000_000 * uid as i64],
    )
    .unwrap();
    conn.last_insert_rowid()
}

/// Walks every link the way the local verifier does (no pruning, no corrections).
fn walk(conn: &Connection) -> Result<(u64, u64), Damage> {
    let mut v = ChainVerifier::new([TableStart::default(); 3]);
    let links: Vec<Link> = conn
        .prepare("SELECT seq, tbl, first_id, last_id, rows, digest, head, sealed_at FROM chain_links ORDER BY seq")
        .unwrap()
        .query_map([], |r| {
            Ok(Link {
                seq: r.get(0)?,
                tbl: Table::parse(&r.get::<_, String>(1)?).unwrap(),
                first_id: r.get(2)?,
                last_id: r.get(3)?,
                rows: r.get(4)?,
                digest: to_hash(&r.get::<_, Vec<u8>>(5)?),
                head: to_hash(&r.get::<_, Vec<u8>>(6)?),
                sealed_at: r.get(7)?,
            })
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for link in &links {
        let mut check = v.link(link)?;
        for_each_row(
            conn,
            link.tbl,
            link.first_id - 1,
            Some(link.last_id),
            None,
            |id, enc, _| check.row(id, enc),
        )
        .unwrap()?;
        let n = check.finish()?;
        v.add_rows(n);
    }
    Ok((v.links, v.rows))
}

#[test]
fn unit_absent_and_empty_encode_differently() {
    let r = ReadingRow {
        id: 1,
        uid: &[1; 16],
        source: "s",
        device: "d",
        metric: "m",
        value: 1.5,
        unit: None,
        observed_at: 7,
        flags: 0,
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    encode_reading(&r, &mut a);
    encode_reading(
        &ReadingRow {
            unit: Some(""),
            ..r
        },
        &mut b,
    );
    assert_ne!(a, b);
    // Field boundaries cannot shift: "ab"+"c" differs from "a"+"bc".
    let (mut c, mut d) = (Vec::new(), Vec::new());
    encode_reading(
        &ReadingRow {
            source: "ab",
            device: "c",
            ..r
        },
        &mut c,
    );
    encode_reading(
        &ReadingRow {
            source: "a",
            device: "bc",
            ..r
        },
        &mut d,
    );
    assert_ne!(c, d);
}

#[test]
fn head_is_fixed_by_the_format() {
    // A change of the head format breaks every stored chain: this pins it.
    let head = link_head(&GENESIS, 1, Table::Readings, 1, 3, 3, &[7; 32]);
    let again = link_head(&GENESIS, 1, Table::Readings, 1, 3, 3, &[7; 32]);
    assert_eq!(head, again);
    assert_ne!(
        head,
        link_head(&GENESIS, 1, Table::AuditLog, 1, 3, 3, &[7; 32])
    );
    assert_ne!(
        head,
        link_head(&GENESIS, 2, Table::Readings, 1, 3, 3, &[7; 32])
    );
}

#[test]
fn seal_covers_each_group_once_and_verifies() {
    let conn = db();
    insert_reading(&conn, 1, 1.0, Some("°C"));
    insert_reading(&conn, 2, 2.0, None);
    assert_eq!(seal(&conn, 10).unwrap(), 1);
    assert_eq!(seal(&conn, 11).unwrap(), 0, "nothing new, no link");
    insert_reading(&conn, 3, 3.0, Some(""));
    conn.execute(
        "INSERT INTO audit_log (at, boot_id, since_boot, kind, actor, details) VALUES (1, '', 2, 'command', 'process:x', '{}')",
        [],
    )
    .unwrap();
    assert_eq!(seal(&conn, 12).unwrap(), 2);
    assert_eq!(walk(&conn), Ok((3, 4)));
}

#[test]
fn tampering_is_found_with_its_kind() {
    let fresh = || {
        let conn = db();
        for uid in 1..=3 {
            insert_reading(&conn, uid, uid as f64, None);
        }
        seal(&conn, 1).unwrap();
        for uid in 4..=6 {
            insert_reading(&conn, uid, uid as f64, None);
        }
        seal(&conn, 2).unwrap();
        conn
    };
    let conn = fresh();
    conn.execute("UPDATE readings SET value = 9 WHERE id = 5", [])
        .unwrap();
    let d = walk(&conn).unwrap_err();
    assert_eq!((d.kind, d.seq), (DamageKind::DigestMismatch, 2));

    let conn = fresh();
    conn.execute(
        "UPDATE readings SET observed_at = observed_at + 1 WHERE id = 2",
        [],
    )
    .unwrap();
    assert_eq!(walk(&conn).unwrap_err().kind, DamageKind::DigestMismatch);

    let conn = fresh();
    conn.execute("DELETE FROM readings WHERE id = 2", [])
        .unwrap();
    let d = walk(&conn).unwrap_err();
    assert_eq!(
        (d.kind, d.seq),
        (
            DamageKind::RowsMissing {
                sealed: 3,
                found: 2
            },
            1
        )
    );

    let conn = fresh();
    // Swap the values of two rows of the same link.
    conn.execute(
        "UPDATE readings SET value = CASE id WHEN 4 THEN 5 ELSE 4 END WHERE id IN (4, 5)",
        [],
    )
    .unwrap();
    assert_eq!(walk(&conn).unwrap_err().kind, DamageKind::DigestMismatch);

    let conn = fresh();
    conn.execute(
        "UPDATE chain_links SET rows = 2, last_id = 2 WHERE seq = 1",
        [],
    )
    .unwrap();
    assert_eq!(walk(&conn).unwrap_err().kind, DamageKind::HeadMismatch);

    let conn = fresh();
    conn.execute("DELETE FROM chain_links WHERE seq = 1", [])
        .unwrap();
    assert_eq!(
        walk(&conn).unwrap_err().kind,
        DamageKind::SeqGap {
            expected: 1,
            found: 2
        }
    );
}

#[test]
fn corrections_recover_sealed_values() {
    let mut c = Corrections::default();
    c.push_details(
        &serde_json::json!({"shift_us": 5, "chain": {"ranges": [[2, 3]], "shift": 5}}).to_string(),
    );
    c.push(Correction {
        ranges: vec![(3, 3)],
        shift: 0,
        flags_set: 4,
    });
    assert_eq!(c.sealed(1, 100, 4), (100, 4));
    assert_eq!(c.sealed(2, 105, 4), (100, 4));
    assert_eq!(c.sealed(3, 105, 6), (100, 2));
    assert_eq!(c.within(4, 9).entries.len(), 0);
    assert_eq!(id_ranges(&[1, 2, 3, 5, 7, 8]), vec![(1, 3), (5, 5), (7, 8)]);
}

#[test]
fn pre_chain_rows_are_left_out_on_upgrade() {
    let mut conn = Connection::open_in_memory().unwrap();
    crate::store::schema::migrate_to(&mut conn, crate::store::schema::CHAIN_VERSION - 1).unwrap();
    insert_reading(&conn, 1, 1.0, None);
    insert_reading(&conn, 2, 1.0, None);
    crate::store::schema::migrate(&mut conn).unwrap();
    assert_eq!(sealed_up_to(&conn, Table::Readings).unwrap(), 2);
    insert_reading(&conn, 3, 1.0, None);
    seal(&conn, 1).unwrap();
    let first: i64 = conn
        .query_row("SELECT first_id FROM chain_links", [], |r| r.get(0))
        .unwrap();
    assert_eq!(first, 3);
}

/// Readings as the writer commits them: each group sealed; `synced` as given.
fn committed_groups(
    conn: &Connection,
    groups: usize,
    per_group: usize,
    age: chrono::Duration,
    synced: bool,
) {
    let t = crate::model::to_micros(chrono::Utc::now() - age);
    for _ in 0..groups {
        let tx = conn.unchecked_transaction().unwrap();
        for _ in 0..per_group {
            let uid: [u8; 16] = rand::random();
            tx.execute(
                "INSERT INTO readings (uid, source, device, metric, value, observed_at, received_at, synced, meta) \
                 VALUES (?1, 's', 'd', 'm', 1.5, ?2, ?2, ?3, ?4)",
                params![&uid[..], t, synced as i64, "x".repeat(200)],
            )
            .unwrap();
        }
        seal(&tx, t).unwrap();
        tx.commit().unwrap();
    }
}

fn verify_clean(conn: &Connection) -> local::Report {
    match local::verify(conn, &local::VerifyOptions::default(), |_, _| {}).unwrap() {
        Ok(report) => report,
        Err(f) => panic!("damaged: {f:?}"),
    }
}

fn store_conn(max_size: u64) -> (tempfile::TempDir, Connection, crate::store::StorageConfig) {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::store::StorageConfig {
        path: dir.path().join("t.db"),
        retention: crate::settings::HumanDuration::from_secs(86400),
        max_size: crate::settings::ByteSize(max_size),
        ..crate::store::StorageConfig::default()
    };
    let conn =
        crate::store::open_writer_connection(&config, &crate::store::StoreOptions::default())
            .unwrap();
    (dir, conn, config)
}

#[test]
fn retention_and_the_size_cap_leave_a_verifiable_chain() {
    use crate::store::writer::{prune, used_bytes, RetentionScan};
    let (_d, conn, mut config) = store_conn(1 << 30);
    committed_groups(&conn, 10, 100, chrono::Duration::days(3), true); // old, synced
    committed_groups(&conn, 5, 100, chrono::Duration::days(3), false); // old, unsynced
    committed_groups(&conn, 10, 100, chrono::Duration::hours(1), true);
    committed_groups(&conn, 10, 100, chrono::Duration::minutes(1), false);
    verify_clean(&conn);
    let stats = crate::store::StoreStats::default();
    prune(
        &conn,
        &config,
        chrono::Utc::now(),
        &stats,
        &mut RetentionScan::default(),
    )
    .unwrap();
    let left: i64 = conn
        .query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 2500, "retention pruned the old synced readings");
    let report = verify_clean(&conn);
    assert_eq!(report.pruned_up_to[0], 1000);
    assert_eq!(report.checkpoints_unsigned, report.checkpoints);

    // The size cap: synced first, then the oldest unsynced (audited).
    config.max_size = crate::settings::ByteSize(used_bytes(&conn).unwrap() / 3);
    prune(
        &conn,
        &config,
        chrono::Utc::now(),
        &stats,
        &mut RetentionScan::default(),
    )
    .unwrap();
    assert!(
        stats
            .pruned_unsynced
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    let audited: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM audit_log WHERE kind = 'store.pruned_unsynced'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(audited, 1);
    // Signing covers the checkpoints too; everything verifies.
    let key = crate::store::signing::GatewayKey::generate();
    let signed = crate::store::signing::sign_pending(&conn, &key, 1).unwrap();
    assert!(signed.head.is_some() && signed.checkpoints > 0);
    let report = match local::verify(
        &conn,
        &local::VerifyOptions {
            since: None,
            public_key: Some(key.public_key()),
        },
        |_, _| {},
    )
    .unwrap()
    {
        Ok(r) => r,
        Err(f) => panic!("damaged: {f:?}"),
    };
    assert_eq!(report.signatures, 1);
    assert_eq!(report.checkpoints_unsigned, 0);
    // The newest reading is never pruned: ids are never handed out twice.
    let newest: i64 = conn
        .query_row("SELECT MAX(id) FROM readings", [], |r| r.get(0))
        .unwrap();
    assert_eq!(newest, 3500);

    // A row deleted above the pruned range is still damage.
    committed_groups(&conn, 2, 100, chrono::Duration::minutes(1), false);
    verify_clean(&conn);
    conn.execute(
        "DELETE FROM readings WHERE id = (SELECT MAX(id) - 5 FROM readings)",
        [],
    )
    .unwrap();
    let failure = local::verify(&conn, &local::VerifyOptions::default(), |_, _| {})
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(failure.damage.kind, DamageKind::RowsMissing { .. }),
        "{failure:?}"
    );
    assert!(failure.time_range.is_some());
}

#[test]
fn a_forged_checkpoint_signature_is_found() {
    use crate::store::writer::{prune, RetentionScan};
    let (_d, conn, config) = store_conn(1 << 30);
    committed_groups(&conn, 3, 10, chrono::Duration::days(3), true);
    committed_groups(&conn, 1, 10, chrono::Duration::hours(1), true);
    let stats = crate::store::StoreStats::default();
    prune(
        &conn,
        &config,
        chrono::Utc::now(),
        &stats,
        &mut RetentionScan::default(),
    )
    .unwrap();
    let key = crate::store::signing::GatewayKey::generate();
    crate::store::signing::sign_pending(&conn, &key, 1).unwrap();
    conn.execute(
        "UPDATE chain_checkpoints SET pruned_up_to = pruned_up_to + 10",
        [],
    )
    .unwrap();
    let failure = local::verify(&conn, &local::VerifyOptions::default(), |_, _| {})
        .unwrap()
        .unwrap_err();
    assert_eq!(failure.damage.kind, DamageKind::CheckpointInvalid);
}

/// Inserts a reading as [`insert_reading`] does and adds it to `bound` as the writer's
/// fast path would.
fn insert_and_add(conn: &Connection, bound: &mut BoundReadings, uid: u8, value: f64) {
    let unit = (uid % 2 == 0).then_some("°C");
    let id = insert_reading(conn, uid, value, unit);
    bound.add(&ReadingRow {
        id,
        uid: &[uid; 16],
        source: "s",
        device: "d",
        metric: "m",
        value,
        unit,
        observed_at: 1_000_000 * uid as i64,
        flags: 0,
    });
}

/// Inserts readings with `values` and returns what the writer's fast path hashes of them.
fn insert_bound(conn: &Connection, first_uid: u8, values: &[f64]) -> BoundReadings {
    let mut bound = BoundReadings::new();
    for (i, &value) in values.iter().enumerate() {
        insert_and_add(conn, &mut bound, first_uid + i as u8, value);
    }
    bound
}

/// A link's first_id, last_id, rows, digest and head.
type LinkColumns = (i64, i64, i64, Vec<u8>, Vec<u8>);

fn links(conn: &Connection) -> Vec<LinkColumns> {
    conn.prepare("SELECT first_id, last_id, rows, digest, head FROM chain_links ORDER BY seq")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn readings_hashed_as_bound_seal_the_same_link_as_read_back() {
    // −0.0 comes back from SQLite as 0.0; integral, huge and tiny values come back
    // exactly.
    let values = [
        -0.0,
        0.0,
        1.5,
        -3.0,
        1e15,
        2f64.powi(60),
        -1e300,
        5e-324,
        f64::MAX,
    ];
    let read_back = db();
    insert_bound(&read_back, 1, &values);
    assert_eq!(seal(&read_back, 7).unwrap(), 1);
    let hashed = db();
    let bound = insert_bound(&hashed, 1, &values);
    assert_eq!(seal_bound(&hashed, 7, Some(bound)).unwrap(), 1);
    assert_eq!(links(&hashed), links(&read_back));
    assert_eq!(walk(&hashed), Ok((1, values.len() as u64)));

    // A second group continues the chain the same way.
    let bound = insert_bound(&hashed, 20, &[4.0, -0.0]);
    seal_bound(&hashed, 8, Some(bound)).unwrap();
    insert_bound(&read_back, 20, &[4.0, -0.0]);
    seal(&read_back, 8).unwrap();
    assert_eq!(links(&hashed), links(&read_back));
    assert_eq!(walk(&hashed), Ok((2, values.len() as u64 + 2)));
}

#[test]
fn bound_readings_that_miss_a_row_are_read_back() {
    // A reading inserted beside the bound ones (before, between or after them), one
    // of them changed or removed in the same transaction: the seal reads the rows, so
    // the link is what was committed and verifies.
    let cases: [&dyn Fn(&Connection) -> BoundReadings; 4] = [
        &|c| {
            insert_reading(c, 1, 1.0, None);
            insert_bound(c, 2, &[2.0, 3.0])
        },
        &|c| {
            let mut b = insert_bound(c, 1, &[1.0]);
            insert_reading(c, 2, 2.0, None);
            insert_and_add(c, &mut b, 3, 3.0);
            b
        },
        &|c| {
            let b = insert_bound(c, 1, &[1.0, 2.0]);
            insert_reading(c, 3, 3.0, None);
            b
        },
        &|c| {
            let b = insert_bound(c, 1, &[1.0, 2.0]);
            c.execute("DELETE FROM readings WHERE id = 2", []).unwrap();
            b
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        let conn = db();
        let bound = case(&conn);
        seal_bound(&conn, 1, Some(bound)).unwrap();
        let stored: i64 = conn
            .query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))
            .unwrap();
        assert_eq!(walk(&conn), Ok((1, stored as u64)), "case {i}");
    }
}

/// A reading changed after it was bound keeps the ids and the count, so only the hash
/// differs: the writer must not hand over such a group (it hashes as bound only when no
/// operation rides with the readings), and debug builds check every bound link.
#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "hashed as bound differ from the rows stored")]
fn a_reading_changed_after_it_was_bound_fails_the_debug_check() {
    let conn = db();
    let bound = insert_bound(&conn, 1, &[1.0, 2.0]);
    conn.execute(
        "UPDATE readings SET observed_at = observed_at + 5 WHERE id = 2",
        [],
    )
    .unwrap();
    let _ = seal_bound(&conn, 1, Some(bound));
}
