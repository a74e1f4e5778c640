//! Verification of a local database (`outpost verify`): one read transaction (a WAL
//! snapshot, so it runs beside the agent), streaming link by link with a prepared
//! statement over each link's id range; memory does not grow with the store (the
//! checkpoints and clock corrections it holds are few).

use super::*;
use crate::store::signing;
use std::path::Path;

/// What `outpost verify` checks beyond the chain itself.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// Only rows of links sealed at or after this time (µs) are hashed; older links
    /// are still chained (heads), and every signature is checked.
    pub since: Option<i64>,
    /// The public key the signatures must carry (the key file's), if known; else the
    /// first signature's key is expected throughout.
    pub public_key: Option<[u8; 32]>,
}

/// An intact store's figures.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub links: u64,
    /// Rows hashed and found as sealed.
    pub rows: u64,
    /// Links whose rows were (partly) pruned: their count and digest are not checked.
    pub links_pruned: u64,
    /// Links sealed before `since`: chained, rows not hashed.
    pub links_skipped: u64,
    pub signatures: u64,
    pub checkpoints: u64,
    /// Checkpoints not signed yet (written since the last signing).
    pub checkpoints_unsigned: u64,
    /// Clock corrections replayed.
    pub corrections: u64,
    /// Rows from before the chain existed (an upgrade), per table in [`Table::ALL`] order.
    pub pre_chain: [u64; 3],
    /// The newest signed seq and when it was signed (µs).
    pub newest_signed: Option<(i64, i64)>,
    /// The chain's newest seq.
    pub newest_seq: i64,
    /// Rows pruned up to these ids (per table; 0: never pruned).
    pub pruned_up_to: [i64; 3],
}

/// The first damage, with the time range of the rows concerned (µs), if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub damage: Damage,
    pub time_range: Option<(i64, i64)>,
    /// When the link concerned was sealed (µs), if the damage is in a link.
    pub sealed_at: Option<i64>,
}

impl From<Damage> for Failure {
    fn from(damage: Damage) -> Self {
        Failure {
            damage,
            time_range: None,
            sealed_at: None,
        }
    }
}

/// The public key in the key file beside the database, if there is one.
pub fn key_file_public_key(database: &Path) -> Option<[u8; 32]> {
    let path = signing::key_path(database);
    path.exists()
        .then(|| signing::load(&path).ok())
        .flatten()
        .map(|k| k.public_key())
}

fn time_column(tbl: Table) -> &'static str {
    match tbl {
        Table::Readings => "observed_at",
        Table::AlertEvents => "occurred_at",
        Table::AuditLog => "at",
    }
}

/// The time range of the rows of `tbl` with ids in `first..=last`.
fn time_range(conn: &Connection, tbl: Table, first: i64, last: i64) -> Option<(i64, i64)> {
    let col = time_column(tbl);
    conn.query_row(
        &format!(
            "SELECT MIN({col}), MAX({col}) FROM {} WHERE id >= ?1 AND id <= ?2",
            tbl.as_str()
        ),
        params![first, last],
        |r| Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, Option<i64>>(1)?)),
    )
    .ok()
    .and_then(|(a, b)| Some((a?, b?)))
}

fn first_row_between(
    conn: &Connection,
    tbl: Table,
    after: i64,
    before: i64,
) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        &format!(
            "SELECT id FROM {} WHERE id > ?1 AND id < ?2 ORDER BY id LIMIT 1",
            tbl.as_str()
        ),
        params![after, before],
        |r| r.get(0),
    )
    .optional()
}

fn not_covered(conn: &Connection, tbl: Table, id: i64, seq: i64) -> Failure {
    Failure {
        damage: Damage {
            kind: DamageKind::RowNotCovered { id },
            seq,
            tbl: Some(tbl),
            first_id: id,
            last_id: id,
        },
        time_range: time_range(conn, tbl, id, id),
        sealed_at: None,
    }
}

fn read_link(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Link>> {
    let tbl: String = r.get(1)?;
    let Some(tbl) = Table::parse(&tbl) else {
        return Ok(None);
    };
    Ok(Some(Link {
        seq: r.get(0)?,
        tbl,
        first_id: r.get(2)?,
        last_id: r.get(3)?,
        rows: r.get(4)?,
        digest: to_hash(&r.get::<_, Vec<u8>>(5)?),
        head: to_hash(&r.get::<_, Vec<u8>>(6)?),
        sealed_at: r.get(7)?,
    }))
}

/// Verifies the chain, checkpoints and signatures of the database on `conn` (a read
/// connection; the whole check runs in one read transaction). `progress` is called
/// with (links done, links in all) now and then.
pub fn verify(
    conn: &Connection,
    options: &VerifyOptions,
    mut progress: impl FnMut(u64, u64),
) -> rusqlite::Result<Result<Report, Failure>> {
    conn.execute_batch("BEGIN")?;
    let result = verify_in(conn, options, &mut progress);
    let _ = conn.execute_batch("COMMIT");
    result
}

fn verify_in(
    conn: &Connection,
    options: &VerifyOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> rusqlite::Result<Result<Report, Failure>> {
    let mut report = Report::default();
    // Where each table's chain begins.
    let mut starts = [TableStart::default(); 3];
    for tbl in Table::ALL {
        let start: i64 = conn
            .query_row(
                "SELECT start_id FROM chain_tips WHERE tbl = ?1",
                [tbl.as_str()],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        starts[tbl.index()].pre_chain = start;
        report.pre_chain[tbl.index()] = conn.query_row(
            &format!("SELECT COUNT(*) FROM {} WHERE id <= ?1", tbl.as_str()),
            [start],
            |r| r.get::<_, i64>(0),
        )? as u64;
    }
    let mut key = options.public_key;
    let mut check_key = |pk: &[u8], damage: Damage| -> Result<(), Failure> {
        match key {
            Some(expected) if expected[..] != *pk => Err(Failure::from(Damage {
                kind: DamageKind::KeyChanged,
                ..damage
            })),
            Some(_) => Ok(()),
            None => {
                key = Some(to_hash(pk));
                Ok(())
            }
        }
    };
    // Checkpoints (few): their signatures now, their heads against the links below.
    let mut checkpoints: Vec<(i64, Hash, Table, i64)> = Vec::new();
    {
        let mut stmt = conn.prepare(
            "SELECT tbl, pruned_up_to, seq, head, reason, signature, public_key \
             FROM chain_checkpoints ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let Some(tbl) = Table::parse(r.get_ref(0)?.as_str()?) else {
                continue;
            };
            let up_to: i64 = r.get(1)?;
            let seq: i64 = r.get(2)?;
            let head = to_hash(&r.get::<_, Vec<u8>>(3)?);
            let reason: String = r.get(4)?;
            let signature: Option<Vec<u8>> = r.get(5)?;
            let public_key: Option<Vec<u8>> = r.get(6)?;
            let damage = Damage {
                kind: DamageKind::CheckpointInvalid,
                seq,
                tbl: Some(tbl),
                first_id: 0,
                last_id: up_to,
            };
            report.checkpoints += 1;
            match (signature, public_key) {
                (Some(sig), Some(pk)) => {
                    if let Err(f) = check_key(&pk, damage.clone()) {
                        return Ok(Err(f));
                    }
                    let message = checkpoint_message(tbl, up_to, seq, &head, &reason);
                    if !signing::verify(&pk, &message, &sig) {
                        return Ok(Err(Failure::from(damage)));
                    }
                }
                _ => report.checkpoints_unsigned += 1,
            }
            let s = &mut starts[tbl.index()];
            s.pruned_up_to = s.pruned_up_to.max(up_to);
            checkpoints.push((seq, head, tbl, up_to));
        }
    }
    checkpoints.sort_by_key(|c| c.0);
    for tbl in Table::ALL {
        report.pruned_up_to[tbl.index()] = starts[tbl.index()].pruned_up_to;
    }
    // Clock corrections, from the audit log (verified as part of the chain below).
    let mut corrections = Corrections::default();
    {
        let mut stmt = conn
            .prepare("SELECT details FROM audit_log WHERE kind = 'clock.correction' ORDER BY id")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            corrections.push_details(r.get_ref(0)?.as_str()?);
            report.corrections += 1;
        }
    }
    let total: u64 = conn.query_row("SELECT COUNT(*) FROM chain_links", [], |r| {
        r.get::<_, i64>(0)
    })? as u64;
    progress(0, total);
    let mut chain = ChainVerifier::new(starts);
    let mut next_checkpoint = 0usize;
    {
        let mut stmt = conn.prepare(
            "SELECT seq, tbl, first_id, last_id, rows, digest, head, sealed_at \
             FROM chain_links ORDER BY seq",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let Some(link) = read_link(r)? else {
                let seq: i64 = r.get(0)?;
                return Ok(Err(Failure::from(Damage {
                    kind: DamageKind::HeadMismatch,
                    seq,
                    tbl: None,
                    first_id: 0,
                    last_id: 0,
                })));
            };
            let tbl = link.tbl;
            let previous_last = chain.last_id(tbl);
            let mut check = match chain.link(&link) {
                Ok(c) => c,
                Err(d) => {
                    let time_range = time_range(conn, tbl, link.first_id, link.last_id);
                    return Ok(Err(Failure {
                        damage: d,
                        time_range,
                        sealed_at: Some(link.sealed_at),
                    }));
                }
            };
            while let Some((seq, head, ctbl, up_to)) = checkpoints.get(next_checkpoint) {
                if *seq > link.seq {
                    break;
                }
                if *seq == link.seq && *head != link.head {
                    return Ok(Err(Failure::from(Damage {
                        kind: DamageKind::CheckpointInvalid,
                        seq: *seq,
                        tbl: Some(*ctbl),
                        first_id: 0,
                        last_id: *up_to,
                    })));
                }
                next_checkpoint += 1;
            }
            if let Some(id) = first_row_between(conn, tbl, previous_last, link.first_id)? {
                return Ok(Err(not_covered(conn, tbl, id, link.seq)));
            }
            if options.since.is_some_and(|since| link.sealed_at < since) {
                report.links_skipped += 1;
            } else {
                let local = (tbl == Table::Readings && !corrections.is_empty())
                    .then(|| corrections.within(link.first_id, link.last_id));
                let walked = for_each_row(
                    conn,
                    tbl,
                    link.first_id - 1,
                    Some(link.last_id),
                    local.as_ref(),
                    |id, enc, _| check.row(id, enc),
                )?;
                let finished = walked.and_then(|()| check.finish());
                match finished {
                    Ok(n) => chain.add_rows(n),
                    Err(d) => {
                        let time_range = time_range(conn, tbl, link.first_id, link.last_id);
                        return Ok(Err(Failure {
                            damage: d,
                            time_range,
                            sealed_at: Some(link.sealed_at),
                        }));
                    }
                }
            }
            if chain.links % 1024 == 0 {
                progress(chain.links, total);
            }
        }
    }
    progress(chain.links, total);
    // Checkpoints naming a seq beyond the chain.
    if let Some((seq, _, tbl, up_to)) = checkpoints.get(next_checkpoint) {
        return Ok(Err(Failure::from(Damage {
            kind: DamageKind::CheckpointInvalid,
            seq: *seq,
            tbl: Some(*tbl),
            first_id: 0,
            last_id: *up_to,
        })));
    }
    // Rows after the last link of their table: inserted behind the agent's back.
    for tbl in Table::ALL {
        if let Some(id) = first_row_between(conn, tbl, chain.last_id(tbl), i64::MAX)? {
            return Ok(Err(not_covered(conn, tbl, id, 0)));
        }
    }
    report.links = chain.links;
    report.rows = chain.rows;
    report.links_pruned = chain.links_pruned;
    report.newest_seq = chain.seq();
    // Signatures: each against the (verified) head at its seq.
    {
        let mut stmt = conn.prepare(
            "SELECT s.seq, s.head, s.signature, s.public_key, s.signed_at, l.head \
             FROM chain_signatures s LEFT JOIN chain_links l ON l.seq = s.seq ORDER BY s.id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            let head = to_hash(&r.get::<_, Vec<u8>>(1)?);
            let signature: Vec<u8> = r.get(2)?;
            let public_key: Vec<u8> = r.get(3)?;
            let signed_at: i64 = r.get(4)?;
            let link_head: Option<Vec<u8>> = r.get(5)?;
            let damage = Damage {
                kind: DamageKind::SignatureInvalid,
                seq,
                tbl: None,
                first_id: 0,
                last_id: 0,
            };
            if let Err(f) = check_key(&public_key, damage.clone()) {
                return Ok(Err(f));
            }
            if !signing::verify(&public_key, &head_message(seq, &head), &signature) {
                return Ok(Err(Failure::from(damage)));
            }
            if link_head.as_deref() != Some(&head[..]) {
                return Ok(Err(Failure::from(Damage {
                    kind: DamageKind::SignedHeadDiffers,
                    ..damage
                })));
            }
            report.signatures += 1;
            if report.newest_signed.is_none_or(|(s, _)| seq >= s) {
                report.newest_signed = Some((seq, signed_at));
            }
        }
    }
    Ok(Ok(report))
}
