//! The hash chain at central (G10, issue 17): the gateway's key pinned in
//! `outpost.gateways`, the upload of the audit log, chain links, signatures and
//! checkpoints, and `outpost central verify`.
//!
//! **Uploads.** Each kind goes up in its own transaction (`unnest` of arrays through
//! `execute_typed`, `ON CONFLICT DO NOTHING`; PgBouncer transaction mode, G6) and is
//! marked synced locally after central committed, like readings. A link goes up only
//! once every row it covers has been synced (or pruned locally), and links go up in
//! chain order: so at central every link's rows are there, and a row missing under a
//! link is damage, not "not yet sent". Signatures and checkpoints follow the links they
//! sign. Rows above the newest link at central are *pending*.
//!
//! **Key pinning.** Every round presents the gateway's public key: the first one is
//! pinned; a different one is parked in `public_key_pending` and the gateway's chain
//! uploads are refused (readings, events and the audit log still go up) until an
//! operator runs `SELECT outpost.accept_gateway_key('<gateway>')` (docs/central.md). The
//! gateway reports the refusal in `outpost status`, `/health` and one ERROR log line.

use super::local::{self, Owed};
use super::postgres::Central;
use super::SyncError;
use crate::model::from_micros;
use crate::store::Store;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};
use tokio_postgres::types::Type;

/// What central said about the key this gateway presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStatus {
    /// The key is the pinned one (or was pinned just now).
    Pinned,
    /// Central has another key pinned: chain uploads wait for an operator.
    Refused { pinned: Vec<u8> },
}

/// Presents `public_key` for `gateway_id` (after the heartbeat, which creates the row):
/// pins it if no key is pinned yet, parks it in `public_key_pending` if another one is.
pub async fn pin_key(
    central: &Central,
    gateway_id: &str,
    public_key: &[u8],
) -> Result<KeyStatus, SyncError> {
    let key = public_key.to_vec();
    let rows = central
        .transaction(central.client().query_typed(
            "UPDATE outpost.gateways SET \
               public_key = COALESCE(public_key, $2), \
               public_key_pinned_at = CASE WHEN public_key IS NULL THEN now() ELSE public_key_pinned_at END, \
               public_key_pending = CASE WHEN public_key IS NULL OR public_key = $2 THEN NULL ELSE $2 END, \
               public_key_refused_at = CASE WHEN public_key IS NULL OR public_key = $2 THEN NULL \
                 WHEN public_key_pending = $2 THEN COALESCE(public_key_refused_at, now()) ELSE now() END \
             WHERE gateway_id = $1 RETURNING public_key",
            &[(&gateway_id, Type::TEXT), (&key, Type::BYTEA)],
        ))
        .await?;
    let pinned: Vec<u8> = rows
        .first()
        .and_then(|r| r.try_get(0).ok())
        .ok_or_else(|| {
            SyncError::Database(format!("no outpost.gateways row for {gateway_id:?}"))
        })?;
    Ok(if pinned == key {
        KeyStatus::Pinned
    } else {
        KeyStatus::Refused { pinned }
    })
}

/// The message the gateway shows while its key is refused.
pub fn refused_message(gateway_id: &str, presented: &[u8], pinned: &[u8]) -> String {
    format!(
        "central has another public key pinned for gateway {gateway_id} ({}), not this \
         gateway's key ({}): its hash chain is not uploaded (readings still are) until an \
         operator accepts the new key with SELECT outpost.accept_gateway_key('{gateway_id}'); \
         see docs/central.md",
        fingerprint(pinned),
        fingerprint(presented)
    )
}

/// A short, printable form of a public key: the first 8 bytes of its SHA-256, in hex.
pub fn fingerprint(key: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key);
    format!("SHA256:{}", hex::encode(&digest[..8]))
}

// ---------------------------------------------------------------------------------
// Uploads.

/// Audit entries as columns (the local `audit_log` table).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct AuditColumns {
    pub id: Vec<i64>,
    pub at: Vec<DateTime<Utc>>,
    pub boot_id: Vec<String>,
    pub since_boot: Vec<i64>,
    pub kind: Vec<String>,
    pub actor: Vec<String>,
    pub details: Vec<String>,
}

/// Up to `max` unsynced audit entries, oldest first.
pub fn select_audit(conn: &Connection, max: usize) -> rusqlite::Result<AuditColumns> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, at, boot_id, since_boot, kind, actor, details FROM audit_log \
         WHERE synced = 0 ORDER BY id LIMIT ?1",
    )?;
    let mut rows = stmt.query([max as i64])?;
    let mut out = AuditColumns::default();
    while let Some(row) = rows.next()? {
        out.id.push(row.get(0)?);
        out.at.push(from_micros(row.get(1)?));
        out.boot_id.push(row.get(2)?);
        out.since_boot.push(row.get(3)?);
        out.kind.push(row.get(4)?);
        out.actor.push(row.get(5)?);
        out.details.push(row.get(6)?);
    }
    Ok(out)
}

/// Marks audit entries synced (the only update the append-only trigger allows).
pub fn mark_audit_synced(conn: &Connection, ids: &[i64]) -> rusqlite::Result<usize> {
    let mut stmt =
        conn.prepare_cached("UPDATE audit_log SET synced = 1 WHERE id = ?1 AND synced = 0")?;
    let mut n = 0;
    for id in ids {
        n += stmt.execute([id])?;
    }
    Ok(n)
}

/// Uploads audit entries in one transaction; entries already there are skipped.
pub async fn upload_audit(
    central: &Central,
    gateway_id: &str,
    rows: &AuditColumns,
) -> Result<u64, SyncError> {
    if rows.id.is_empty() {
        return Ok(0);
    }
    central
        .transaction(central.client().execute_typed(
            "INSERT INTO outpost.audit_log (gateway_id, id, at, boot_id, since_boot, kind, actor, details) \
             SELECT $1, a.* FROM unnest($2::int8[], $3::timestamptz[], $4::text[], $5::int8[], $6::text[], \
               $7::text[], $8::text[]) AS a(id, at, boot_id, since_boot, kind, actor, details) \
             ON CONFLICT DO NOTHING",
            &[
                (&gateway_id, Type::TEXT),
                (&rows.id, Type::INT8_ARRAY),
                (&rows.at, Type::TIMESTAMPTZ_ARRAY),
                (&rows.boot_id, Type::TEXT_ARRAY),
                (&rows.since_boot, Type::INT8_ARRAY),
                (&rows.kind, Type::TEXT_ARRAY),
                (&rows.actor, Type::TEXT_ARRAY),
                (&rows.details, Type::TEXT_ARRAY),
            ],
        ))
        .await
}

/// Chain links as columns (the local `chain_links` table).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LinkColumns {
    pub seq: Vec<i64>,
    pub tbl: Vec<String>,
    pub first_id: Vec<i64>,
    pub last_id: Vec<i64>,
    pub rows: Vec<i64>,
    pub digest: Vec<Vec<u8>>,
    pub head: Vec<Vec<u8>>,
    pub sealed_at: Vec<DateTime<Utc>>,
}

/// The tables a link may cover (names are checked before they go into SQL).
pub const CHAIN_TABLES: [&str; 3] = ["readings", "alert_events", "audit_log"];

/// Up to `max` unsynced links, in chain order, up to (not including) the first one
/// whose rows are not all synced yet: links go up only once their rows are at central.
pub fn select_links(conn: &Connection, max: usize) -> rusqlite::Result<LinkColumns> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, tbl, first_id, last_id, rows, digest, head, sealed_at FROM chain_links \
         WHERE synced = 0 ORDER BY seq LIMIT ?1",
    )?;
    let mut rows = stmt.query([max as i64])?;
    let mut out = LinkColumns::default();
    while let Some(row) = rows.next()? {
        let tbl: String = row.get(1)?;
        let (first, last): (i64, i64) = (row.get(2)?, row.get(3)?);
        if !rows_all_synced(conn, &tbl, first, last)? {
            break;
        }
        out.seq.push(row.get(0)?);
        out.tbl.push(tbl);
        out.first_id.push(first);
        out.last_id.push(last);
        out.rows.push(row.get(4)?);
        out.digest.push(row.get(5)?);
        out.head.push(row.get(6)?);
        out.sealed_at.push(from_micros(row.get(7)?));
    }
    Ok(out)
}

/// Whether no row of `tbl` with an id in `first..=last` waits for sync (rows pruned
/// locally are gone: they count as done; checkpoints say so).
fn rows_all_synced(conn: &Connection, tbl: &str, first: i64, last: i64) -> rusqlite::Result<bool> {
    let Some(tbl) = CHAIN_TABLES.iter().find(|t| **t == tbl) else {
        // A link on a table this agent does not know: never blocks the chain.
        return Ok(true);
    };
    let sql = format!(
        "SELECT NOT EXISTS (SELECT 1 FROM {tbl} WHERE id BETWEEN ?1 AND ?2 AND synced = 0)"
    );
    conn.prepare_cached(&sql)?
        .query_row(params![first, last], |r| r.get(0))
}

pub fn mark_links_synced(conn: &Connection, seqs: &[i64]) -> rusqlite::Result<usize> {
    let mut stmt = conn.prepare_cached("UPDATE chain_links SET synced = 1 WHERE seq = ?1")?;
    let mut n = 0;
    for s in seqs {
        n += stmt.execute([s])?;
    }
    Ok(n)
}

pub async fn upload_links(
    central: &Central,
    gateway_id: &str,
    rows: &LinkColumns,
) -> Result<u64, SyncError> {
    if rows.seq.is_empty() {
        return Ok(0);
    }
    central
        .transaction(central.client().execute_typed(
            "INSERT INTO outpost.chain_links (gateway_id, seq, tbl, first_id, last_id, rows, digest, head, sealed_at) \
             SELECT $1, l.* FROM unnest($2::int8[], $3::text[], $4::int8[], $5::int8[], $6::int8[], \
               $7::bytea[], $8::bytea[], $9::timestamptz[]) \
               AS l(seq, tbl, first_id, last_id, rows, digest, head, sealed_at) \
             ON CONFLICT DO NOTHING",
            &[
                (&gateway_id, Type::TEXT),
                (&rows.seq, Type::INT8_ARRAY),
                (&rows.tbl, Type::TEXT_ARRAY),
                (&rows.first_id, Type::INT8_ARRAY),
                (&rows.last_id, Type::INT8_ARRAY),
                (&rows.rows, Type::INT8_ARRAY),
                (&rows.digest, Type::BYTEA_ARRAY),
                (&rows.head, Type::BYTEA_ARRAY),
                (&rows.sealed_at, Type::TIMESTAMPTZ_ARRAY),
            ],
        ))
        .await
}

/// Signed heads as columns (the local `chain_signatures` table).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SignatureColumns {
    pub id: Vec<i64>,
    pub seq: Vec<i64>,
    pub head: Vec<Vec<u8>>,
    pub signature: Vec<Vec<u8>>,
    pub public_key: Vec<Vec<u8>>,
    pub signed_at: Vec<DateTime<Utc>>,
}

/// The newest link already at central (marked synced locally): signatures and
/// checkpoints of later links wait for them.
fn synced_links_up_to(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM chain_links WHERE synced = 1",
        [],
        |r| r.get(0),
    )
}

/// Up to `max` unsynced signatures of links already at central, oldest first.
pub fn select_signatures(conn: &Connection, max: usize) -> rusqlite::Result<SignatureColumns> {
    let up_to = synced_links_up_to(conn)?;
    let mut stmt = conn.prepare_cached(
        "SELECT id, seq, head, signature, public_key, signed_at FROM chain_signatures \
         WHERE synced = 0 AND seq <= ?1 ORDER BY id LIMIT ?2",
    )?;
    let mut rows = stmt.query(params![up_to, max as i64])?;
    let mut out = SignatureColumns::default();
    while let Some(row) = rows.next()? {
        out.id.push(row.get(0)?);
        out.seq.push(row.get(1)?);
        out.head.push(row.get(2)?);
        out.signature.push(row.get(3)?);
        out.public_key.push(row.get(4)?);
        out.signed_at.push(from_micros(row.get(5)?));
    }
    Ok(out)
}

pub fn mark_signatures_synced(conn: &Connection, ids: &[i64]) -> rusqlite::Result<usize> {
    let mut stmt = conn.prepare_cached("UPDATE chain_signatures SET synced = 1 WHERE id = ?1")?;
    let mut n = 0;
    for id in ids {
        n += stmt.execute([id])?;
    }
    Ok(n)
}

pub async fn upload_signatures(
    central: &Central,
    gateway_id: &str,
    rows: &SignatureColumns,
) -> Result<u64, SyncError> {
    if rows.id.is_empty() {
        return Ok(0);
    }
    central
        .transaction(central.client().execute_typed(
            "INSERT INTO outpost.chain_signatures (gateway_id, id, seq, head, signature, public_key, signed_at) \
             SELECT $1, s.* FROM unnest($2::int8[], $3::int8[], $4::bytea[], $5::bytea[], $6::bytea[], \
               $7::timestamptz[]) AS s(id, seq, head, signature, public_key, signed_at) \
             ON CONFLICT DO NOTHING",
            &[
                (&gateway_id, Type::TEXT),
                (&rows.id, Type::INT8_ARRAY),
                (&rows.seq, Type::INT8_ARRAY),
                (&rows.head, Type::BYTEA_ARRAY),
                (&rows.signature, Type::BYTEA_ARRAY),
                (&rows.public_key, Type::BYTEA_ARRAY),
                (&rows.signed_at, Type::TIMESTAMPTZ_ARRAY),
            ],
        ))
        .await
}

/// Signed pruning checkpoints as columns (the local `chain_checkpoints` table).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CheckpointColumns {
    pub id: Vec<i64>,
    pub tbl: Vec<String>,
    pub pruned_up_to: Vec<i64>,
    pub seq: Vec<i64>,
    pub head: Vec<Vec<u8>>,
    pub reason: Vec<String>,
    pub at: Vec<DateTime<Utc>>,
    pub signature: Vec<Option<Vec<u8>>>,
    pub public_key: Vec<Option<Vec<u8>>>,
}

/// Unsynced checkpoints that are signed and whose link is at central, oldest first.
pub fn select_checkpoints(conn: &Connection, max: usize) -> rusqlite::Result<CheckpointColumns> {
    let up_to = synced_links_up_to(conn)?;
    let mut stmt = conn.prepare_cached(
        "SELECT id, tbl, pruned_up_to, seq, head, reason, at, signature, public_key \
         FROM chain_checkpoints WHERE synced = 0 AND seq <= ?1 AND signature IS NOT NULL \
         ORDER BY id LIMIT ?2",
    )?;
    let mut rows = stmt.query(params![up_to, max as i64])?;
    let mut out = CheckpointColumns::default();
    while let Some(row) = rows.next()? {
        out.id.push(row.get(0)?);
        out.tbl.push(row.get(1)?);
        out.pruned_up_to.push(row.get(2)?);
        out.seq.push(row.get(3)?);
        out.head.push(row.get(4)?);
        out.reason.push(row.get(5)?);
        out.at.push(from_micros(row.get(6)?));
        out.signature.push(row.get(7)?);
        out.public_key.push(row.get(8)?);
    }
    Ok(out)
}

pub fn mark_checkpoints_synced(conn: &Connection, ids: &[i64]) -> rusqlite::Result<usize> {
    let mut stmt = conn.prepare_cached("UPDATE chain_checkpoints SET synced = 1 WHERE id = ?1")?;
    let mut n = 0;
    for id in ids {
        n += stmt.execute([id])?;
    }
    Ok(n)
}

pub async fn upload_checkpoints(
    central: &Central,
    gateway_id: &str,
    rows: &CheckpointColumns,
) -> Result<u64, SyncError> {
    if rows.id.is_empty() {
        return Ok(0);
    }
    central
        .transaction(central.client().execute_typed(
            "INSERT INTO outpost.chain_checkpoints \
               (gateway_id, id, tbl, pruned_up_to, seq, head, reason, at, signature, public_key) \
             SELECT $1, c.* FROM unnest($2::int8[], $3::text[], $4::int8[], $5::int8[], $6::bytea[], \
               $7::text[], $8::timestamptz[], $9::bytea[], $10::bytea[]) \
               AS c(id, tbl, pruned_up_to, seq, head, reason, at, signature, public_key) \
             ON CONFLICT DO NOTHING",
            &[
                (&gateway_id, Type::TEXT),
                (&rows.id, Type::INT8_ARRAY),
                (&rows.tbl, Type::TEXT_ARRAY),
                (&rows.pruned_up_to, Type::INT8_ARRAY),
                (&rows.seq, Type::INT8_ARRAY),
                (&rows.head, Type::BYTEA_ARRAY),
                (&rows.reason, Type::TEXT_ARRAY),
                (&rows.at, Type::TIMESTAMPTZ_ARRAY),
                (&rows.signature, Type::BYTEA_ARRAY),
                (&rows.public_key, Type::BYTEA_ARRAY),
            ],
        ))
        .await
}

/// Where each table's chain begins on this gateway (`chain_tips.start_id`).
pub fn select_starts(conn: &Connection) -> rusqlite::Result<(Vec<String>, Vec<i64>)> {
    let mut stmt = conn.prepare_cached("SELECT tbl, start_id FROM chain_tips ORDER BY tbl")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let mut out = (Vec::new(), Vec::new());
    for row in rows {
        let (tbl, start): (String, i64) = row?;
        out.0.push(tbl);
        out.1.push(start);
    }
    Ok(out)
}

/// Uploads the chain's starting points (once; they never change).
pub async fn upload_starts(
    central: &Central,
    gateway_id: &str,
    starts: &(Vec<String>, Vec<i64>),
) -> Result<u64, SyncError> {
    if starts.0.is_empty() {
        return Ok(0);
    }
    central
        .transaction(central.client().execute_typed(
            "INSERT INTO outpost.chain_starts (gateway_id, tbl, start_id) \
             SELECT $1, s.* FROM unnest($2::text[], $3::int8[]) AS s(tbl, start_id) \
             ON CONFLICT DO NOTHING",
            &[
                (&gateway_id, Type::TEXT),
                (&starts.0, Type::TEXT_ARRAY),
                (&starts.1, Type::INT8_ARRAY),
            ],
        ))
        .await
}

// ---------------------------------------------------------------------------------
// The sync worker's part: one call per round.

/// The public key of the gateway's signing key (beside the database), if there is one.
pub fn gateway_public_key(store: &Store) -> Option<Vec<u8>> {
    store.gateway_key().map(|k| k.public_key().to_vec())
}

/// The chain's share of a sync round: present the key, then the audit log, and (while
/// the key is pinned) the chain's starts, links, signatures and checkpoints. Keeps its
/// own read connection.
pub struct ChainSync {
    store: Store,
    public_key: Option<Vec<u8>>,
    batch: usize,
    /// (In a mutex only so that the sync worker is `Sync`; never contended.)
    reader: std::sync::Mutex<Option<Connection>>,
    /// The key central has pinned instead of ours, once refused (logged once).
    refused: Option<Vec<u8>>,
    /// Whether the sync state is known to hold no refusal (cleared once per run).
    cleared: bool,
    /// Uploads refused for lack of grants (SQLSTATE 42501).
    grant_log: crate::ratelimit::LogLimiter,
    starts_sent: bool,
}

impl ChainSync {
    /// `public_key`: the gateway's Ed25519 public key (None: no key, nothing pinned and
    /// no chain uploaded; the audit log still goes up).
    pub fn new(store: Store, public_key: Option<Vec<u8>>, batch: usize) -> ChainSync {
        ChainSync {
            store,
            public_key,
            batch: batch.clamp(1, 10_000),
            reader: std::sync::Mutex::new(None),
            refused: None,
            cleared: false,
            grant_log: crate::ratelimit::LogLimiter::new(std::time::Duration::from_secs(3600)),
            starts_sent: false,
        }
    }

    /// For the store's gateway key (see [`gateway_public_key`]).
    pub fn for_store(store: &Store, batch: usize) -> ChainSync {
        ChainSync::new(store.clone(), gateway_public_key(store), batch)
    }

    async fn read<T, F>(&mut self, f: F) -> Result<T, SyncError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.reader.get_mut().ok().and_then(|c| c.take());
        let store = self.store.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let conn = match conn {
                Some(c) => c,
                None => match store.reader() {
                    Ok(c) => c,
                    Err(e) => return (None, Err(SyncError::Local(e.to_string()))),
                },
            };
            let result = f(&conn).map_err(|e| SyncError::Local(e.to_string()));
            (Some(conn), result)
        })
        .await;
        match joined {
            Ok((conn, result)) => {
                if let Ok(slot) = self.reader.get_mut() {
                    *slot = conn;
                }
                result
            }
            Err(e) => Err(SyncError::Local(format!("the read task failed: {e}"))),
        }
    }

    /// Whether central refused this gateway's key in the latest round.
    pub fn refused(&self) -> bool {
        self.refused.is_some()
    }

    /// One round, after the readings and events of the round went up, were marked
    /// synced and the head was signed (the sync worker's one write of the round). The
    /// marks of what this uploads are added to `owed`: they ride in the next round's
    /// write (or sooner where a loop goes on past a full batch). A role without the
    /// schema-4 grants does not stop readings from syncing: the chain waits, with a
    /// warning at most once an hour.
    pub async fn round(
        &mut self,
        central: &Central,
        gateway_id: &str,
        owed: &mut Owed,
    ) -> Result<(), SyncError> {
        match self.upload(central, gateway_id, owed).await {
            Err(SyncError::Database(text)) if text.contains("SQLSTATE 42501") => {
                if let Some(suppressed) = self.grant_log.allow() {
                    tracing::warn!(error = %text, suppressed, "Cannot upload the hash chain or the audit log to central: grant the gateways' role INSERT on outpost.audit_log, outpost.chain_links, outpost.chain_signatures, outpost.chain_checkpoints and outpost.chain_starts (docs/operator.md); readings and events still sync.");
                }
                Ok(())
            }
            other => other,
        }
    }

    async fn upload(
        &mut self,
        central: &Central,
        gateway_id: &str,
        owed: &mut Owed,
    ) -> Result<(), SyncError> {
        let max = self.batch;
        loop {
            let rows = self.read(move |c| select_audit(c, max)).await?;
            if rows.id.is_empty() {
                break;
            }
            upload_audit(central, gateway_id, &rows).await?;
            let done = rows.id.len() < max;
            owed.push(move |c| mark_audit_synced(c, &rows.id));
            if done {
                break;
            }
            // The next select must not see these rows again.
            owed.apply(&self.store).await?;
        }
        let Some(key) = self.public_key.clone() else {
            return Ok(());
        };
        match pin_key(central, gateway_id, &key).await? {
            KeyStatus::Pinned => {
                if self.refused.take().is_some() {
                    tracing::info!(
                        key = %fingerprint(&key),
                        "Central accepted this gateway's public key; the hash chain uploads again."
                    );
                }
                if !self.cleared {
                    self.record_refusal(None).await;
                    self.cleared = true;
                }
            }
            KeyStatus::Refused { pinned } => {
                let message = refused_message(gateway_id, &key, &pinned);
                if self.refused.as_ref() != Some(&pinned) {
                    tracing::error!(error = %message, "Central refused this gateway's public key.");
                    self.refused = Some(pinned);
                    self.record_refusal(Some(message)).await;
                    self.cleared = false;
                }
                return Ok(());
            }
        }
        if !self.starts_sent {
            let starts = self.read(select_starts).await?;
            upload_starts(central, gateway_id, &starts).await?;
            self.starts_sent = true;
        }
        loop {
            let links = self.read(move |c| select_links(c, max)).await?;
            if links.seq.is_empty() {
                break;
            }
            upload_links(central, gateway_id, &links).await?;
            let done = links.seq.len() < max;
            owed.push(move |c| mark_links_synced(c, &links.seq));
            if done {
                break;
            }
            // The next select must not see these rows again.
            owed.apply(&self.store).await?;
        }
        loop {
            let sigs = self.read(move |c| select_signatures(c, max)).await?;
            if sigs.id.is_empty() {
                break;
            }
            upload_signatures(central, gateway_id, &sigs).await?;
            let done = sigs.id.len() < max;
            owed.push(move |c| mark_signatures_synced(c, &sigs.id));
            if done {
                break;
            }
            // The next select must not see these rows again.
            owed.apply(&self.store).await?;
        }
        loop {
            let cps = self.read(move |c| select_checkpoints(c, max)).await?;
            if cps.id.is_empty() {
                break;
            }
            upload_checkpoints(central, gateway_id, &cps).await?;
            let done = cps.id.len() < max;
            owed.push(move |c| mark_checkpoints_synced(c, &cps.id));
            if done {
                break;
            }
            // The next select must not see these rows again.
            owed.apply(&self.store).await?;
        }
        Ok(())
    }

    /// Keeps the refusal where `outpost status` and `/health` read the sync state.
    async fn record_refusal(&self, message: Option<String>) {
        let at = Utc::now();
        let written = self
            .store
            .write(move |c| local::record_key_refused(c, message.as_deref().map(|m| (m, at))))
            .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, "Recording the key's refusal failed.");
        }
    }
}

// ---------------------------------------------------------------------------------
// `outpost central verify`.

use crate::store::chain::{
    self, encode_alert_event, encode_audit, encode_reading, AlertEventRow, AuditRow, ChainVerifier,
    Corrections, Damage, DamageKind, Link, LinkCheck, ReadingRow, RowDigest, Table, TableStart,
};

/// What `outpost central verify` checks.
#[derive(Debug, Clone, Default)]
pub struct VerifyOptions {
    /// One gateway, or all of them.
    pub gateway: Option<String>,
    /// Rows of links sealed before this are not re-hashed (the links themselves are
    /// still chained from the start: they are small).
    pub since: Option<DateTime<Utc>>,
    /// Links sealed after this are not checked.
    pub until: Option<DateTime<Utc>>,
    /// Rows per page (one short transaction each).
    pub page_rows: usize,
}

/// The first damage found for a gateway, where, and the time range of its rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// A short stable name of the kind (`digest`, `rows-missing`, `rows-extra`,
    /// `not-covered`, `head`, `seq-gap`, `range`, `signature-invalid`, `key-changed`,
    /// `signed-head`, `checkpoint`, `unknown-table`, `no-key`).
    pub code: &'static str,
    /// The kind, in words.
    pub kind: String,
    pub seq: i64,
    pub tbl: Option<String>,
    pub first_id: i64,
    pub last_id: i64,
    /// Times of the rows concerned (observed_at, occurred_at or at).
    pub time_range: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

/// The summary of one gateway.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayReport {
    pub gateway_id: String,
    pub public_key: Option<Vec<u8>>,
    /// A key presented by the gateway and refused, waiting for an operator.
    pub key_pending_since: Option<Option<DateTime<Utc>>>,
    pub links: u64,
    /// Rows verified, per table in the order of [`Table::ALL`].
    pub rows: [u64; 3],
    /// Links whose rows were (partly) pruned on the gateway before they were synced.
    pub links_pruned: u64,
    pub signatures: u64,
    /// The newest signed link and when it was signed.
    pub newest_signed: Option<(i64, DateTime<Utc>)>,
    /// Rows at central above the newest link there: not covered yet (pending).
    pub pending_rows: [i64; 3],
    /// Readings the gateway had not synced yet, as of its last heartbeat.
    pub backlog_rows: i64,
    /// Links not checked because of --since/--until.
    pub skipped_links: u64,
    /// Links with damage (row-level damage does not stop the walk).
    pub damaged_links: u64,
    pub damage: Option<Finding>,
}

impl GatewayReport {
    pub fn is_clean(&self) -> bool {
        self.damage.is_none()
    }
}

fn code(kind: &DamageKind) -> &'static str {
    match kind {
        DamageKind::HeadMismatch => "head",
        DamageKind::SeqGap { .. } => "seq-gap",
        DamageKind::RangeOutOfOrder { .. } => "range",
        DamageKind::DigestMismatch => "digest",
        DamageKind::RowsMissing { .. } => "rows-missing",
        DamageKind::RowsExtra { .. } => "rows-extra",
        DamageKind::RowNotCovered { .. } => "not-covered",
        DamageKind::SignatureInvalid => "signature-invalid",
        DamageKind::KeyChanged => "key-changed",
        DamageKind::SignedHeadDiffers => "signed-head",
        DamageKind::CheckpointInvalid => "checkpoint",
    }
}

fn finding(d: &Damage, times: Option<(i64, i64)>) -> Finding {
    Finding {
        code: code(&d.kind),
        kind: d.kind.to_string(),
        seq: d.seq,
        tbl: d.tbl.map(|t| t.as_str().to_string()),
        first_id: d.first_id,
        last_id: d.last_id,
        time_range: times.map(|(a, b)| (from_micros(a), from_micros(b))),
    }
}

/// A row fetched from central: its id (the gateway's seq), canonical encoding, time.
struct CentralRow {
    id: i64,
    encoding: Vec<u8>,
    time: i64,
}

/// Rows of one table for one gateway, fetched in pages by `(gateway_id, seq)` keyset
/// (each page a short transaction of its own: PgBouncer transaction mode).
struct RowCursor {
    tbl: Table,
    after: i64,
    page: std::collections::VecDeque<CentralRow>,
    exhausted: bool,
}

impl RowCursor {
    fn new(tbl: Table, after: i64) -> RowCursor {
        RowCursor {
            tbl,
            after,
            page: Default::default(),
            exhausted: false,
        }
    }

    /// Forgets rows up to `id` without fetching them.
    fn skip_to(&mut self, id: i64) {
        while self.page.front().is_some_and(|r| r.id <= id) {
            self.page.pop_front();
        }
        if self.page.is_empty() && self.after < id {
            self.after = id;
            self.exhausted = false;
        }
    }

    async fn peek(
        &mut self,
        central: &Central,
        gateway: &str,
        corrections: &Corrections,
        page_rows: usize,
    ) -> Result<Option<&CentralRow>, SyncError> {
        if self.page.is_empty() && !self.exhausted {
            let rows = fetch_rows(
                central,
                gateway,
                self.tbl,
                self.after,
                page_rows,
                corrections,
            )
            .await?;
            self.exhausted = rows.len() < page_rows;
            if let Some(last) = rows.last() {
                self.after = last.id;
            }
            self.page.extend(rows);
        }
        Ok(self.page.front())
    }
}

fn micros(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(|t| t.timestamp_micros())
}

async fn fetch_rows(
    central: &Central,
    gateway: &str,
    tbl: Table,
    after: i64,
    limit: usize,
    corrections: &Corrections,
) -> Result<Vec<CentralRow>, SyncError> {
    let limit = limit as i64;
    let sql = match tbl {
        Table::Readings => {
            "SELECT seq, uuid_send(uid), source, device, metric, value, unit, observed_at, flags \
             FROM outpost.readings WHERE gateway_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        }
        Table::AlertEvents => {
            "SELECT seq, uuid_send(uid), kind, rule, severity, device, metric, value, unit, threshold, \
               since, occurred_at, COALESCE(message_text, message::text), actor, note, channel \
             FROM outpost.alert_events WHERE gateway_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        }
        Table::AuditLog => {
            "SELECT id, at, boot_id, since_boot, kind, actor, details \
             FROM outpost.audit_log WHERE gateway_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        }
    };
    let rows = central
        .transaction(central.client().query_typed(
            sql,
            &[
                (&gateway, Type::TEXT),
                (&after, Type::INT8),
                (&limit, Type::INT8),
            ],
        ))
        .await?;
    let bad = |e: tokio_postgres::Error| SyncError::Database(format!("reading {tbl}: {e}"));
    let mut out = Vec::with_capacity(rows.len());
    let mut encoding = Vec::new();
    let corrections = match (tbl, rows.first(), rows.last()) {
        (Table::Readings, Some(a), Some(b)) if !corrections.is_empty() => {
            let (a, b): (i64, i64) = (a.try_get(0).map_err(bad)?, b.try_get(0).map_err(bad)?);
            Some(corrections.within(a, b))
        }
        _ => None,
    };
    for r in &rows {
        encoding.clear();
        let id: i64 = r.try_get(0).map_err(bad)?;
        let time = match tbl {
            Table::Readings => {
                let observed: DateTime<Utc> = r.try_get(7).map_err(bad)?;
                let observed = observed.timestamp_micros();
                let flags = i64::from(r.try_get::<_, i32>(8).map_err(bad)?);
                let (observed_at, flags) = match &corrections {
                    Some(c) => c.sealed(id, observed, flags),
                    None => (observed, flags),
                };
                encode_reading(
                    &ReadingRow {
                        id,
                        uid: r.try_get::<_, &[u8]>(1).map_err(bad)?,
                        source: r.try_get(2).map_err(bad)?,
                        device: r.try_get(3).map_err(bad)?,
                        metric: r.try_get(4).map_err(bad)?,
                        value: r.try_get(5).map_err(bad)?,
                        unit: r.try_get(6).map_err(bad)?,
                        observed_at,
                        flags,
                    },
                    &mut encoding,
                );
                observed
            }
            Table::AlertEvents => {
                let occurred: DateTime<Utc> = r.try_get(11).map_err(bad)?;
                let occurred_at = occurred.timestamp_micros();
                encode_alert_event(
                    &AlertEventRow {
                        id,
                        uid: r.try_get::<_, &[u8]>(1).map_err(bad)?,
                        kind: r.try_get(2).map_err(bad)?,
                        rule: r.try_get(3).map_err(bad)?,
                        severity: r.try_get::<_, Option<&str>>(4).map_err(bad)?.unwrap_or(""),
                        device: r.try_get::<_, Option<&str>>(5).map_err(bad)?.unwrap_or(""),
                        metric: r.try_get::<_, Option<&str>>(6).map_err(bad)?.unwrap_or(""),
                        value: r.try_get(7).map_err(bad)?,
                        unit: r.try_get(8).map_err(bad)?,
                        threshold: r.try_get(9).map_err(bad)?,
                        since: micros(r.try_get(10).map_err(bad)?),
                        occurred_at,
                        message: r.try_get::<_, Option<&str>>(12).map_err(bad)?.unwrap_or(""),
                        actor: r.try_get(13).map_err(bad)?,
                        note: r.try_get(14).map_err(bad)?,
                        channel: r.try_get(15).map_err(bad)?,
                    },
                    &mut encoding,
                );
                occurred_at
            }
            Table::AuditLog => {
                let at: DateTime<Utc> = r.try_get(1).map_err(bad)?;
                let at = at.timestamp_micros();
                encode_audit(
                    &AuditRow {
                        id,
                        at,
                        boot_id: r.try_get(2).map_err(bad)?,
                        since_boot: r.try_get(3).map_err(bad)?,
                        kind: r.try_get(4).map_err(bad)?,
                        actor: r.try_get(5).map_err(bad)?,
                        details: r.try_get(6).map_err(bad)?,
                    },
                    &mut encoding,
                );
                at
            }
        };
        out.push(CentralRow {
            id,
            encoding: encoding.clone(),
            time,
        });
    }
    Ok(out)
}

/// Verifies an Ed25519 signature of the head `head` at `seq`.
pub fn signature_valid(public_key: &[u8], seq: i64, head: &[u8; 32], signature: &[u8]) -> bool {
    crate::store::signing::verify(public_key, &chain::head_message(seq, head), signature)
}

/// The gateways to verify, in order.
async fn gateways(central: &Central, only: Option<&str>) -> Result<Vec<String>, SyncError> {
    let rows = central
        .transaction(central.client().query_typed(
            "SELECT gateway_id FROM (SELECT gateway_id FROM outpost.gateways \
               UNION SELECT DISTINCT gateway_id FROM outpost.chain_links) g \
             WHERE $1::text IS NULL OR gateway_id = $1 ORDER BY gateway_id",
            &[(&only, Type::TEXT)],
        ))
        .await?;
    Ok(rows.iter().filter_map(|r| r.try_get(0).ok()).collect())
}

/// Verifies every gateway (or the one asked for); `progress` gets a line per gateway.
pub async fn verify(
    central: &Central,
    options: &VerifyOptions,
    progress: &mut (dyn FnMut(&GatewayReport) + Send),
) -> Result<Vec<GatewayReport>, SyncError> {
    let mut reports = Vec::new();
    for gateway in gateways(central, options.gateway.as_deref()).await? {
        let report = verify_gateway(central, &gateway, options).await?;
        progress(&report);
        reports.push(report);
    }
    Ok(reports)
}

/// The keys whose signatures count for `gateway`: the pinned one and those it replaced.
async fn pinned_keys(
    central: &Central,
    gateway: &str,
    report: &mut GatewayReport,
) -> Result<Vec<Vec<u8>>, SyncError> {
    let client = central.client();
    let (current, retired) = central
        .transaction(async {
            let current = client
                .query_typed(
                    "SELECT public_key, public_key_pending IS NOT NULL, public_key_refused_at, backlog_rows \
                     FROM outpost.gateways WHERE gateway_id = $1",
                    &[(&gateway, Type::TEXT)],
                )
                .await?;
            let retired = client
                .query_typed(
                    "SELECT public_key FROM outpost.gateway_keys WHERE gateway_id = $1",
                    &[(&gateway, Type::TEXT)],
                )
                .await?;
            Ok((current, retired))
        })
        .await?;
    let mut keys = Vec::new();
    if let Some(row) = current.first() {
        report.public_key = row.try_get(0).ok().flatten();
        if row.try_get::<_, bool>(1).unwrap_or(false) {
            report.key_pending_since = Some(row.try_get(2).ok().flatten());
        }
        report.backlog_rows = row.try_get(3).unwrap_or(0);
    }
    keys.extend(report.public_key.clone());
    keys.extend(
        retired
            .iter()
            .filter_map(|r| r.try_get::<_, Vec<u8>>(0).ok()),
    );
    Ok(keys)
}

/// Starts (pre-chain boundaries), checkpoints (pruned boundaries) and corrections.
async fn table_starts(
    central: &Central,
    gateway: &str,
    keys: &[Vec<u8>],
) -> Result<([TableStart; 3], Corrections, Vec<Finding>), SyncError> {
    let client = central.client();
    let (starts, checkpoints, corrections) = central
        .transaction(async {
            let starts = client
                .query_typed(
                    "SELECT tbl, start_id FROM outpost.chain_starts WHERE gateway_id = $1",
                    &[(&gateway, Type::TEXT)],
                )
                .await?;
            let checkpoints = client
                .query_typed(
                    "SELECT tbl, pruned_up_to, seq, head, reason, signature, public_key \
                     FROM outpost.chain_checkpoints WHERE gateway_id = $1 ORDER BY id",
                    &[(&gateway, Type::TEXT)],
                )
                .await?;
            let corrections = client
                .query_typed(
                    "SELECT details FROM outpost.audit_log \
                     WHERE gateway_id = $1 AND kind = 'clock.correction' ORDER BY id",
                    &[(&gateway, Type::TEXT)],
                )
                .await?;
            Ok((starts, checkpoints, corrections))
        })
        .await?;
    let mut out = [TableStart::default(); 3];
    for r in &starts {
        let (Ok(tbl), Ok(start)) = (r.try_get::<_, &str>(0), r.try_get::<_, i64>(1)) else {
            continue;
        };
        if let Some(t) = Table::parse(tbl) {
            out[t as usize].pre_chain = start;
        }
    }
    let mut problems = Vec::new();
    for r in &checkpoints {
        let tbl: &str = r.try_get(0).unwrap_or("");
        let pruned: i64 = r.try_get(1).unwrap_or(0);
        let seq: i64 = r.try_get(2).unwrap_or(0);
        let head = chain::to_hash(r.try_get::<_, &[u8]>(3).unwrap_or(&[]));
        let reason: &str = r.try_get(4).unwrap_or("");
        let signature: Option<&[u8]> = r.try_get(5).ok().flatten();
        let key: Option<&[u8]> = r.try_get(6).ok().flatten();
        let Some(t) = Table::parse(tbl) else { continue };
        let message = chain::checkpoint_message(t, pruned, seq, &head, reason);
        let valid = match (signature, key) {
            (Some(sig), Some(key)) if keys.iter().any(|k| k.as_slice() == key) => {
                crate::store::signing::verify(key, &message, sig)
            }
            _ => false,
        };
        if !valid {
            problems.push(Finding {
                code: "checkpoint",
                kind: format!(
                    "pruning checkpoint of {tbl} up to id {pruned} is not signed by a pinned key"
                ),
                seq,
                tbl: Some(tbl.to_string()),
                first_id: 0,
                last_id: pruned,
                time_range: None,
            });
            continue;
        }
        let start = &mut out[t as usize];
        start.pruned_up_to = start.pruned_up_to.max(pruned);
    }
    let mut c = Corrections::default();
    for r in &corrections {
        if let Ok(details) = r.try_get::<_, &str>(0) {
            c.push_details(details);
        }
    }
    Ok((out, c, problems))
}

/// A signature row at central.
struct CentralSignature {
    id: i64,
    seq: i64,
    head: Vec<u8>,
    signature: Vec<u8>,
    public_key: Vec<u8>,
    signed_at: DateTime<Utc>,
}

async fn fetch_links(
    central: &Central,
    gateway: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<(Result<Link, String>, i64)>, SyncError> {
    let rows = central
        .transaction(central.client().query_typed(
            "SELECT seq, tbl, first_id, last_id, rows, digest, head, sealed_at \
             FROM outpost.chain_links WHERE gateway_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            &[
                (&gateway, Type::TEXT),
                (&after, Type::INT8),
                (&limit, Type::INT8),
            ],
        ))
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let seq: i64 = r
            .try_get(0)
            .map_err(|e| SyncError::Database(e.to_string()))?;
        let tbl: String = r.try_get(1).unwrap_or_default();
        let link = match Table::parse(&tbl) {
            None => Err(tbl),
            Some(t) => Ok(Link {
                seq,
                tbl: t,
                first_id: r.try_get(2).unwrap_or(0),
                last_id: r.try_get(3).unwrap_or(0),
                rows: r.try_get(4).unwrap_or(0),
                digest: chain::to_hash(r.try_get::<_, &[u8]>(5).unwrap_or(&[])),
                head: chain::to_hash(r.try_get::<_, &[u8]>(6).unwrap_or(&[])),
                sealed_at: r
                    .try_get::<_, DateTime<Utc>>(7)
                    .map(|t| t.timestamp_micros())
                    .unwrap_or(0),
            }),
        };
        out.push((link, seq));
    }
    Ok(out)
}

async fn fetch_signatures(
    central: &Central,
    gateway: &str,
    after: (i64, i64),
    limit: i64,
) -> Result<Vec<CentralSignature>, SyncError> {
    let rows = central
        .transaction(central.client().query_typed(
            "SELECT id, seq, head, signature, public_key, signed_at FROM outpost.chain_signatures \
             WHERE gateway_id = $1 AND (seq, id) > ($2, $3) ORDER BY seq, id LIMIT $4",
            &[
                (&gateway, Type::TEXT),
                (&after.0, Type::INT8),
                (&after.1, Type::INT8),
                (&limit, Type::INT8),
            ],
        ))
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            Some(CentralSignature {
                id: r.try_get(0).ok()?,
                seq: r.try_get(1).ok()?,
                head: r.try_get(2).ok()?,
                signature: r.try_get(3).ok()?,
                public_key: r.try_get(4).ok()?,
                signed_at: r.try_get(5).ok()?,
            })
        })
        .collect())
}

/// Records `f` as the gateway's first damage (later ones are only counted).
fn damaged(report: &mut GatewayReport, f: Finding) {
    report.damaged_links += 1;
    if report.damage.is_none() {
        report.damage = Some(f);
    }
}

/// Walks one gateway's chain at central: links in seq order (each head recomputed),
/// each link's rows (digest recomputed from the central columns with the gateway's own
/// encoding, clock corrections replayed), and signatures against the pinned keys.
pub async fn verify_gateway(
    central: &Central,
    gateway: &str,
    options: &VerifyOptions,
) -> Result<GatewayReport, SyncError> {
    let page = options.page_rows.clamp(100, 100_000);
    let link_page = 1000i64;
    let mut report = GatewayReport {
        gateway_id: gateway.to_string(),
        ..Default::default()
    };
    let keys = pinned_keys(central, gateway, &mut report).await?;
    let (starts, corrections, problems) = table_starts(central, gateway, &keys).await?;
    for p in problems {
        damaged(&mut report, p);
    }
    let mut verifier = ChainVerifier::new(starts);
    let mut cursors: Vec<RowCursor> = Table::ALL
        .iter()
        .map(|t| RowCursor::new(*t, starts[*t as usize].pre_chain))
        .collect();
    let mut sigs: std::collections::VecDeque<CentralSignature> = Default::default();
    let mut sig_after = (0i64, 0i64);
    let mut sigs_exhausted = false;
    let since = micros(options.since);
    let until = micros(options.until);
    let mut after = 0i64;
    let mut stopped = false;
    'links: loop {
        let links = fetch_links(central, gateway, after, link_page).await?;
        let Some(&(_, last_seq)) = links.last() else {
            break;
        };
        let full = links.len() as i64 == link_page;
        after = last_seq;
        for (link, seq) in links {
            let link = match link {
                Ok(l) => l,
                Err(tbl) => {
                    damaged(
                        &mut report,
                        Finding {
                            code: "unknown-table",
                            kind: format!("link on an unknown table {tbl:?}"),
                            seq,
                            tbl: Some(tbl),
                            first_id: 0,
                            last_id: 0,
                            time_range: None,
                        },
                    );
                    stopped = true;
                    break 'links;
                }
            };
            if until.is_some_and(|u| link.sealed_at > u) {
                stopped = true;
                break 'links;
            }
            let cursor = &mut cursors[link.tbl as usize];
            // Rows between the previous link of this table and this one: in no link.
            let covered_to = verifier.last_id(link.tbl);
            let skip_rows = since.is_some_and(|s| link.sealed_at < s);
            if skip_rows {
                cursor.skip_to(link.first_id - 1);
            } else {
                while let Some(row) = cursor.peek(central, gateway, &corrections, page).await? {
                    if row.id >= link.first_id {
                        break;
                    }
                    let (id, time) = (row.id, row.time);
                    cursor.page.pop_front();
                    if id > covered_to {
                        damaged(
                            &mut report,
                            finding(
                                &Damage {
                                    kind: DamageKind::RowNotCovered { id },
                                    seq: link.seq,
                                    tbl: Some(link.tbl),
                                    first_id: id,
                                    last_id: id,
                                },
                                Some((time, time)),
                            ),
                        );
                    }
                }
            }
            let check = match verifier.link(&link) {
                Ok(c) => c,
                Err(d) => {
                    damaged(&mut report, finding(&d, None));
                    stopped = true;
                    break 'links;
                }
            };
            if skip_rows {
                report.skipped_links += 1;
                cursor.skip_to(link.last_id);
            } else {
                let outcome =
                    check_rows(central, gateway, cursor, check, &corrections, page).await?;
                match outcome {
                    Ok(rows) => {
                        report.rows[link.tbl as usize] += rows;
                        verifier.add_rows(rows);
                    }
                    Err((d, times)) => damaged(&mut report, finding(&d, times)),
                }
            }
            // Signatures of the heads up to this link.
            loop {
                if sigs.is_empty() && !sigs_exhausted {
                    let more = fetch_signatures(central, gateway, sig_after, link_page).await?;
                    sigs_exhausted = (more.len() as i64) < link_page;
                    if let Some(s) = more.last() {
                        sig_after = (s.seq, s.id);
                    }
                    sigs.extend(more);
                }
                let Some(sig) = sigs.front() else { break };
                if sig.seq > link.seq {
                    break;
                }
                let sig = sigs.pop_front().expect("peeked");
                if sig.seq < link.seq {
                    // Its link was refused above (seq gap): reported there.
                    continue;
                }
                check_signature(&mut report, &keys, &link, &sig);
            }
        }
        if !full {
            break;
        }
    }
    report.links = verifier.links;
    report.links_pruned = verifier.links_pruned;
    if !stopped {
        // Signatures of seqs central has no link for: links deleted from the end.
        let last = verifier.seq();
        if let Some(sig) = sigs.front().filter(|s| s.seq > last) {
            damaged(
                &mut report,
                Finding {
                    code: "signed-head",
                    kind: format!(
                        "a signature covers seq {} but central's chain ends at seq {last}: links deleted",
                        sig.seq
                    ),
                    seq: sig.seq,
                    tbl: None,
                    first_id: 0,
                    last_id: 0,
                    time_range: None,
                },
            );
        } else if !sigs_exhausted {
            let more = fetch_signatures(central, gateway, (last, i64::MAX), 1).await?;
            if let Some(sig) = more.first() {
                damaged(
                    &mut report,
                    Finding {
                        code: "signed-head",
                        kind: format!(
                            "a signature covers seq {} but central's chain ends at seq {last}: links deleted",
                            sig.seq
                        ),
                        seq: sig.seq,
                        tbl: None,
                        first_id: 0,
                        last_id: 0,
                        time_range: None,
                    },
                );
            }
        }
        if report.links > 0 {
            for tbl in [Table::Readings, Table::AlertEvents] {
                if let Some(f) = unsequenced(central, gateway, tbl).await? {
                    damaged(&mut report, f);
                }
            }
        }
        if until.is_none() {
            for t in Table::ALL {
                report.pending_rows[t as usize] =
                    count_above(central, gateway, t, verifier.last_id(t)).await?;
            }
        }
    }
    Ok(report)
}

fn check_signature(
    report: &mut GatewayReport,
    keys: &[Vec<u8>],
    link: &Link,
    sig: &CentralSignature,
) {
    let fail = |report: &mut GatewayReport, kind: DamageKind| {
        let d = Damage {
            kind,
            seq: link.seq,
            tbl: Some(link.tbl),
            first_id: link.first_id,
            last_id: link.last_id,
        };
        damaged(report, finding(&d, None));
    };
    if !keys.contains(&sig.public_key) {
        fail(report, DamageKind::KeyChanged);
        return;
    }
    if sig.head != link.head {
        fail(report, DamageKind::SignedHeadDiffers);
        return;
    }
    if !signature_valid(&sig.public_key, sig.seq, &link.head, &sig.signature) {
        fail(report, DamageKind::SignatureInvalid);
        return;
    }
    report.signatures += 1;
    report.newest_signed = Some((sig.seq, sig.signed_at));
}

/// Feeds a link's rows from `cursor` into `check`. Ok(rows) or the damage with the time
/// range of the rows seen.
async fn check_rows(
    central: &Central,
    gateway: &str,
    cursor: &mut RowCursor,
    mut check: LinkCheck,
    corrections: &Corrections,
    page: usize,
) -> Result<Result<u64, (Damage, Option<(i64, i64)>)>, SyncError> {
    let link = check.link().clone();
    // On a pruned link the core checks only ranges; central usually has every row
    // (pruned after sync): then the digest is checked here.
    let mut own = check.pruned().then(RowDigest::new);
    let mut count = 0i64;
    let mut times: Option<(i64, i64)> = None;
    let mut first_damage: Option<Damage> = None;
    while let Some(row) = cursor.peek(central, gateway, corrections, page).await? {
        if row.id > link.last_id {
            break;
        }
        let row = cursor.page.pop_front().expect("peeked");
        times = Some(match times {
            None => (row.time, row.time),
            Some((a, b)) => (a.min(row.time), b.max(row.time)),
        });
        if first_damage.is_some() {
            continue;
        }
        count += 1;
        if let Some(d) = own.as_mut() {
            d.add(&row.encoding);
        }
        if let Err(d) = check.row(row.id, &row.encoding) {
            first_damage = Some(d);
        }
    }
    if let Some(d) = first_damage {
        return Ok(Err((d, times)));
    }
    match check.finish() {
        Err(d) => Ok(Err((d, times))),
        Ok(rows) => {
            if let Some(d) = own {
                if count == link.rows && d.finish() != link.digest {
                    let d = Damage {
                        kind: DamageKind::DigestMismatch,
                        seq: link.seq,
                        tbl: Some(link.tbl),
                        first_id: link.first_id,
                        last_id: link.last_id,
                    };
                    return Ok(Err((d, times)));
                }
            }
            Ok(Ok(rows))
        }
    }
}

/// Rows without a chain position that central received after the gateway's chain
/// reached it: every row an agent with the chain sends has one, so these were inserted
/// behind its back. (Rows from before the chain, sent by an older agent, arrived before
/// its first link did.)
async fn unsequenced(
    central: &Central,
    gateway: &str,
    tbl: Table,
) -> Result<Option<Finding>, SyncError> {
    let (table, time) = match tbl {
        Table::Readings => ("readings", "observed_at"),
        Table::AlertEvents => ("alert_events", "occurred_at"),
        Table::AuditLog => return Ok(None),
    };
    let sql = format!(
        "SELECT count(*), min({time}), max({time}) FROM outpost.{table} \
         WHERE gateway_id = $1 AND seq IS NULL AND inserted_at >= \
           (SELECT min(inserted_at) FROM outpost.chain_links WHERE gateway_id = $1)"
    );
    let rows = central
        .transaction(
            central
                .client()
                .query_typed(&sql, &[(&gateway, Type::TEXT)]),
        )
        .await?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let count: i64 = row.try_get(0).unwrap_or(0);
    if count == 0 {
        return Ok(None);
    }
    let first: Option<DateTime<Utc>> = row.try_get(1).ok().flatten();
    let last: Option<DateTime<Utc>> = row.try_get(2).ok().flatten();
    Ok(Some(Finding {
        code: "not-covered",
        kind: format!(
            "row inserted: {count} {table} row(s) without a chain position arrived after the chain started"
        ),
        seq: 0,
        tbl: Some(table.to_string()),
        first_id: 0,
        last_id: 0,
        time_range: first.zip(last),
    }))
}

/// Rows of `tbl` at central above `id` (not covered by a link there yet).
async fn count_above(
    central: &Central,
    gateway: &str,
    tbl: Table,
    id: i64,
) -> Result<i64, SyncError> {
    let sql = match tbl {
        Table::Readings => {
            "SELECT count(*) FROM outpost.readings WHERE gateway_id = $1 AND seq > $2"
        }
        Table::AlertEvents => {
            "SELECT count(*) FROM outpost.alert_events WHERE gateway_id = $1 AND seq > $2"
        }
        Table::AuditLog => {
            "SELECT count(*) FROM outpost.audit_log WHERE gateway_id = $1 AND id > $2"
        }
    };
    let rows = central
        .transaction(
            central
                .client()
                .query_typed(sql, &[(&gateway, Type::TEXT), (&id, Type::INT8)]),
        )
        .await?;
    Ok(rows.first().and_then(|r| r.try_get(0).ok()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::local::tests::{db, insert};

    #[test]
    fn links_go_up_in_order_and_only_once_their_rows_are_synced() {
        let conn = db();
        for group in 0..3 {
            for i in 1..=4 {
                insert(&conn, group * 4 + i, 0);
            }
            chain::seal(&conn, 1_000 + group).unwrap();
        }
        assert!(
            select_links(&conn, 10).unwrap().seq.is_empty(),
            "nothing synced yet"
        );
        conn.execute("UPDATE readings SET synced = 1 WHERE id <= 4", [])
            .unwrap();
        assert_eq!(select_links(&conn, 10).unwrap().seq, [1]);
        // The third group synced before the second: the chain waits for the second.
        conn.execute("UPDATE readings SET synced = 1 WHERE id > 8", [])
            .unwrap();
        assert_eq!(select_links(&conn, 10).unwrap().seq, [1]);
        conn.execute("UPDATE readings SET synced = 1", []).unwrap();
        let links = select_links(&conn, 10).unwrap();
        assert_eq!(links.seq, [1, 2, 3]);
        assert_eq!(
            (links.first_id[1], links.last_id[1], links.rows[1]),
            (5, 8, 4)
        );
        assert_eq!(select_links(&conn, 2).unwrap().seq, [1, 2]);
        // Rows pruned locally (gone) do not hold a link back.
        conn.execute("DELETE FROM readings WHERE id <= 2", [])
            .unwrap();
        mark_links_synced(&conn, &[1]).unwrap();
        assert_eq!(select_links(&conn, 10).unwrap().seq, [2, 3]);
    }

    #[test]
    fn signatures_wait_for_the_link_they_sign() {
        let conn = db();
        insert(&conn, 1, 0);
        chain::seal(&conn, 1).unwrap();
        insert(&conn, 2, 0);
        chain::seal(&conn, 2).unwrap();
        for seq in [1i64, 2] {
            conn.execute(
                "INSERT INTO chain_signatures (seq, head, signature, public_key, signed_at) \
                 VALUES (?1, zeroblob(32), zeroblob(64), zeroblob(32), 0)",
                [seq],
            )
            .unwrap();
        }
        assert!(select_signatures(&conn, 10).unwrap().id.is_empty());
        mark_links_synced(&conn, &[1]).unwrap();
        assert_eq!(select_signatures(&conn, 10).unwrap().seq, [1]);
        mark_links_synced(&conn, &[2]).unwrap();
        let sigs = select_signatures(&conn, 10).unwrap();
        assert_eq!(sigs.seq, [1, 2]);
        mark_signatures_synced(&conn, &sigs.id).unwrap();
        assert!(select_signatures(&conn, 10).unwrap().id.is_empty());
    }

    #[test]
    fn audit_entries_are_read_in_order_and_marked_despite_the_append_only_trigger() {
        let conn = db();
        let clock = crate::clock::Clock::system();
        for i in 0..3 {
            crate::store::audit::append(
                &conn,
                &clock,
                &crate::store::audit::AuditEntry::new(
                    crate::store::audit::AuditKind::Command,
                    "process:test",
                    serde_json::json!({"n": i}),
                ),
            )
            .unwrap();
        }
        let rows = select_audit(&conn, 2).unwrap();
        assert_eq!(rows.id, [1, 2]);
        assert_eq!(rows.details[1], r#"{"n":1}"#);
        assert_eq!(mark_audit_synced(&conn, &rows.id).unwrap(), 2);
        assert_eq!(select_audit(&conn, 10).unwrap().id, [3]);
    }

    #[test]
    fn a_refused_key_reads_as_failing_sync_until_cleared() {
        let conn = db();
        let at = from_micros(1_700_000_000_000_000);
        local::record_success(&conn, at).unwrap();
        let message = refused_message("gw-1", &[1; 32], &[2; 32]);
        assert!(message.contains("SELECT outpost.accept_gateway_key('gw-1')"));
        assert_ne!(fingerprint(&[1; 32]), fingerprint(&[2; 32]));
        local::record_key_refused(&conn, Some((&message, at))).unwrap();
        local::record_success(&conn, from_micros(1_700_000_100_000_000)).unwrap();
        let state = local::read_state(&conn).unwrap();
        assert!(state.failing);
        assert_eq!(state.last_error.as_deref(), Some(message.as_str()));
        assert_eq!(state.last_error_at, Some(at));
        local::record_key_refused(&conn, None).unwrap();
        let state = local::read_state(&conn).unwrap();
        assert!(!state.failing);
    }

    #[test]
    fn signatures_verify_only_for_their_head_and_key() {
        let seed = [7u8; 32];
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let head = [9u8; 32];
        let sig = ed25519_dalek::Signer::sign(&key, &chain::head_message(3, &head)).to_bytes();
        let pk = key.verifying_key().to_bytes();
        assert!(signature_valid(&pk, 3, &head, &sig));
        assert!(!signature_valid(&pk, 4, &head, &sig));
        assert!(!signature_valid(&pk, 3, &[8; 32], &sig));
        assert!(!signature_valid(&[1; 32], 3, &head, &sig));
        assert!(!signature_valid(&pk, 3, &head, &sig[..63]));
    }
}
