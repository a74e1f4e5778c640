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
    crate::store::schema::migrate_to(&mut conn, crate::store::schema::CURRENT_VERSION - 1).unwrap();
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
