//! The local hash chain (G10): every committed reading, alert event and audit entry is
//! covered by a per-gateway chain of links, one per table per group commit, so a row
//! changed, deleted, inserted or reordered behind the agent's back is detected by
//! `outpost verify` (and, over the central copies, by `outpost central verify`).
//!
//! A link covers the rows of one table with ids in `first_id..=last_id` committed in one
//! group: `digest` is SHA-256 over the rows' canonical encodings in id order, and
//! `head` = SHA-256("outpost-chain-v1" ‖ previous head ‖ seq ‖ tbl ‖ first_id ‖ last_id ‖
//! rows ‖ digest), integers as big-endian i64, the table name length-prefixed, 32 zero
//! bytes as the previous head of seq 1. The writer seals the group's new rows just
//! before its commit ([`seal`]), so the chain is exactly what was committed.
//!
//! The encodings ([`encode_reading`], [`encode_alert_event`], [`encode_audit`]) take
//! plain values so the central verifier uses the very same functions; they cover what
//! is evidence and never legitimately changes (not `synced`; for readings not
//! `received_at`, which moves with clock steps, nor `meta`, which is source context).
//! Clock corrections (G8) change `observed_at` and `flags` of sealed readings; each is
//! recorded in the audit log with the exact ids, and the verifier replays them
//! ([`Corrections`]) to recover the sealed values.
//!
//! The verifier core ([`ChainVerifier`], [`LinkCheck`]) is pure and streaming: links in
//! seq order, and for each link its rows in id order; memory does not grow with the
//! store.

pub mod local;

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest as _, Sha256};

/// The domain separator of link heads.
pub const HEAD_DOMAIN: &[u8] = b"outpost-chain-v1";
/// The domain separator of signed messages (a head at a seq).
pub const SIGN_DOMAIN: &[u8] = b"outpost-head-v1";
/// The domain separator of signed pruning checkpoints.
pub const CHECKPOINT_DOMAIN: &[u8] = b"outpost-checkpoint-v1";
/// The previous head of the first link.
pub const GENESIS: [u8; 32] = [0; 32];

/// A SHA-256 value.
pub type Hash = [u8; 32];

/// The tables the chain covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Readings,
    AlertEvents,
    AuditLog,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Readings, Table::AlertEvents, Table::AuditLog];

    /// The table's name, as stored in `chain_links.tbl` and hashed into heads.
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Readings => "readings",
            Table::AlertEvents => "alert_events",
            Table::AuditLog => "audit_log",
        }
    }

    pub fn parse(text: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.as_str() == text)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------
// Canonical encoding

fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_bits().to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, v: &[u8]) {
    out.extend_from_slice(&(v.len() as u64).to_be_bytes());
    out.extend_from_slice(v);
}

fn put_str(out: &mut Vec<u8>, v: &str) {
    put_bytes(out, v.as_bytes());
}

/// Absent (0) and present (1 + value) are distinct, so `None` and `""` differ.
fn put_opt_str(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_str(out, s);
        }
    }
}

fn put_opt_f64(out: &mut Vec<u8>, v: Option<f64>) {
    match v {
        None => out.push(0),
        Some(x) => {
            out.push(1);
            put_f64(out, x);
        }
    }
}

fn put_opt_i64(out: &mut Vec<u8>, v: Option<i64>) {
    match v {
        None => out.push(0),
        Some(x) => {
            out.push(1);
            put_i64(out, x);
        }
    }
}

/// A reading as sealed: what the chain covers of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadingRow<'a> {
    pub id: i64,
    pub uid: &'a [u8],
    pub source: &'a str,
    pub device: &'a str,
    pub metric: &'a str,
    pub value: f64,
    pub unit: Option<&'a str>,
    /// µs since the epoch, as sealed (see [`Corrections`]).
    pub observed_at: i64,
    /// As sealed (see [`Corrections`]).
    pub flags: i64,
}

/// Appends the canonical encoding of a reading to `out`.
pub fn encode_reading(r: &ReadingRow<'_>, out: &mut Vec<u8>) {
    out.push(b'R');
    put_i64(out, r.id);
    put_bytes(out, r.uid);
    put_str(out, r.source);
    put_str(out, r.device);
    put_str(out, r.metric);
    put_f64(out, r.value);
    put_opt_str(out, r.unit);
    put_i64(out, r.observed_at);
    put_i64(out, r.flags);
}

/// An alert event: every column fixed at insert (all but `synced`; nothing else of an
/// event is ever updated).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlertEventRow<'a> {
    pub id: i64,
    pub uid: &'a [u8],
    pub kind: &'a str,
    pub rule: &'a str,
    pub severity: &'a str,
    pub device: &'a str,
    pub metric: &'a str,
    pub value: Option<f64>,
    pub unit: Option<&'a str>,
    pub threshold: Option<f64>,
    pub since: Option<i64>,
    pub occurred_at: i64,
    pub message: &'a str,
    pub actor: Option<&'a str>,
    pub note: Option<&'a str>,
    pub channel: Option<&'a str>,
}

/// Appends the canonical encoding of an alert event to `out`.
pub fn encode_alert_event(e: &AlertEventRow<'_>, out: &mut Vec<u8>) {
    out.push(b'E');
    put_i64(out, e.id);
    put_bytes(out, e.uid);
    put_str(out, e.kind);
    put_str(out, e.rule);
    put_str(out, e.severity);
    put_str(out, e.device);
    put_str(out, e.metric);
    put_opt_f64(out, e.value);
    put_opt_str(out, e.unit);
    put_opt_f64(out, e.threshold);
    put_opt_i64(out, e.since);
    put_i64(out, e.occurred_at);
    put_str(out, e.message);
    put_opt_str(out, e.actor);
    put_opt_str(out, e.note);
    put_opt_str(out, e.channel);
}

/// An audit entry: every column but `synced`. `details` is the JSON text as stored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditRow<'a> {
    pub id: i64,
    pub at: i64,
    pub boot_id: &'a str,
    pub since_boot: i64,
    pub kind: &'a str,
    pub actor: &'a str,
    pub details: &'a str,
}

/// Appends the canonical encoding of an audit entry to `out`.
pub fn encode_audit(a: &AuditRow<'_>, out: &mut Vec<u8>) {
    out.push(b'A');
    put_i64(out, a.id);
    put_i64(out, a.at);
    put_str(out, a.boot_id);
    put_i64(out, a.since_boot);
    put_str(out, a.kind);
    put_str(out, a.actor);
    put_str(out, a.details);
}

// ---------------------------------------------------------------------------------------
// Links and heads

/// One link of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub seq: i64,
    pub tbl: Table,
    pub first_id: i64,
    pub last_id: i64,
    pub rows: i64,
    pub digest: Hash,
    pub head: Hash,
    /// µs since the epoch (not hashed: it is when, not what).
    pub sealed_at: i64,
}

/// The running digest of a link's rows: feed each row's canonical encoding in id order.
#[derive(Clone, Default)]
pub struct RowDigest {
    hasher: Sha256,
}

impl RowDigest {
    pub fn new() -> Self {
        RowDigest::default()
    }
    pub fn add(&mut self, encoding: &[u8]) {
        self.hasher.update(encoding);
    }
    pub fn finish(self) -> Hash {
        self.hasher.finalize().into()
    }
}

/// The head of link `seq` given the previous head.
pub fn link_head(
    previous: &Hash,
    seq: i64,
    tbl: Table,
    first_id: i64,
    last_id: i64,
    rows: i64,
    digest: &Hash,
) -> Hash {
    let mut h = Sha256::new();
    h.update(HEAD_DOMAIN);
    h.update(previous);
    h.update(seq.to_be_bytes());
    let name = tbl.as_str().as_bytes();
    h.update((name.len() as u64).to_be_bytes());
    h.update(name);
    h.update(first_id.to_be_bytes());
    h.update(last_id.to_be_bytes());
    h.update(rows.to_be_bytes());
    h.update(digest);
    h.finalize().into()
}

/// The message signed for the head `head` of link `seq`.
pub fn head_message(seq: i64, head: &Hash) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGN_DOMAIN.len() + 40);
    m.extend_from_slice(SIGN_DOMAIN);
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(head);
    m
}

/// The message signed for a pruning checkpoint.
pub fn checkpoint_message(
    tbl: Table,
    pruned_up_to: i64,
    seq: i64,
    head: &Hash,
    reason: &str,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 80);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    put_str(&mut m, tbl.as_str());
    put_i64(&mut m, pruned_up_to);
    put_i64(&mut m, seq);
    m.extend_from_slice(head);
    put_str(&mut m, reason);
    m
}

// ---------------------------------------------------------------------------------------
// Verification core

/// What is wrong, found at a position of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DamageKind {
    /// A link's head does not follow from the previous head and its fields: a link was
    /// edited (or the chain rewritten from here).
    HeadMismatch,
    /// Link seqs do not follow each other: a link was deleted or inserted.
    SeqGap { expected: i64, found: i64 },
    /// A link's id range overlaps or precedes the previous link of its table.
    RangeOutOfOrder { previous_last_id: i64 },
    /// The rows hash differently from what was sealed: a value or time changed, or two
    /// rows swapped.
    DigestMismatch,
    /// Fewer rows than sealed: rows deleted.
    RowsMissing { sealed: i64, found: i64 },
    /// More rows than sealed in a link's range: rows inserted.
    RowsExtra { sealed: i64, found: i64 },
    /// A row no link covers (between links, or after the last one): inserted.
    RowNotCovered { id: i64 },
    /// A signature does not verify against the head at its seq.
    SignatureInvalid,
    /// A signature was made with another key than the first one / the key file.
    KeyChanged,
    /// A signature names a seq the chain does not have, or a head that differs.
    SignedHeadDiffers,
    /// A pruning checkpoint does not match the chain or its signature.
    CheckpointInvalid,
}

impl std::fmt::Display for DamageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DamageKind::HeadMismatch => write!(f, "link edited (head mismatch)"),
            DamageKind::SeqGap { expected, found } => {
                write!(f, "link missing or inserted (expected seq {expected}, found {found})")
            }
            DamageKind::RangeOutOfOrder { previous_last_id } => write!(
                f,
                "link range out of order (previous link of the table ended at id {previous_last_id})"
            ),
            DamageKind::DigestMismatch => write!(
                f,
                "digest mismatch (a value or time changed, or rows swapped)"
            ),
            DamageKind::RowsMissing { sealed, found } => {
                write!(f, "row deleted ({sealed} sealed, {found} found)")
            }
            DamageKind::RowsExtra { sealed, found } => {
                write!(f, "row inserted ({sealed} sealed, {found} found)")
            }
            DamageKind::RowNotCovered { id } => write!(f, "row inserted (id {id} is in no link)"),
            DamageKind::SignatureInvalid => write!(f, "signature invalid"),
            DamageKind::KeyChanged => write!(f, "public key differs from the gateway's key"),
            DamageKind::SignedHeadDiffers => write!(f, "signed head differs from the chain"),
            DamageKind::CheckpointInvalid => write!(f, "pruning checkpoint invalid"),
        }
    }
}

/// The first damage found and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub kind: DamageKind,
    /// The link seq (0 when the damage is outside any link).
    pub seq: i64,
    pub tbl: Option<Table>,
    /// The id range concerned.
    pub first_id: i64,
    pub last_id: i64,
}

impl Damage {
    fn at(link: &Link, kind: DamageKind) -> Damage {
        Damage {
            kind,
            seq: link.seq,
            tbl: Some(link.tbl),
            first_id: link.first_id,
            last_id: link.last_id,
        }
    }
}

/// Where verification of a table starts: rows with ids up to `start_id` are not
/// covered (from before the chain, or pruned up to a checkpoint).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStart {
    /// Rows with `id <= pre_chain` predate the chain (upgrade from an older version).
    pub pre_chain: i64,
    /// Rows with `id <= pruned_up_to` may have been pruned (retention, size cap).
    pub pruned_up_to: i64,
}

/// Checks links in seq order: seq continuity, each head, and per table that the id
/// ranges increase. Start at [`ChainVerifier::new`] (seq 1, genesis).
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    previous: Hash,
    next_seq: i64,
    last_id: [i64; 3],
    starts: [TableStart; 3],
    /// Links and rows checked so far.
    pub links: u64,
    pub rows: u64,
    /// Links whose rows were partly or wholly pruned (count and digest not checkable).
    pub links_pruned: u64,
}

impl ChainVerifier {
    /// `starts` in the order of [`Table::ALL`].
    pub fn new(starts: [TableStart; 3]) -> Self {
        ChainVerifier {
            previous: GENESIS,
            next_seq: 1,
            last_id: [
                starts[0].pre_chain,
                starts[1].pre_chain,
                starts[2].pre_chain,
            ],
            starts,
            links: 0,
            rows: 0,
            links_pruned: 0,
        }
    }

    /// The head of the last link accepted (genesis before the first).
    pub fn head(&self) -> Hash {
        self.previous
    }

    /// The seq of the last link accepted (0 before the first).
    pub fn seq(&self) -> i64 {
        self.next_seq - 1
    }

    /// The highest id covered so far in `tbl` (its pre-chain boundary before any link).
    pub fn last_id(&self, tbl: Table) -> i64 {
        self.last_id[tbl.index()]
    }

    /// Accepts the next link (checks its seq, head and range) and returns the check of
    /// its rows. Rows found between the previous link of the table and this one are
    /// the caller's to report ([`DamageKind::RowNotCovered`]): see [`Self::last_id`].
    pub fn link(&mut self, link: &Link) -> Result<LinkCheck, Damage> {
        if link.seq != self.next_seq {
            return Err(Damage::at(
                link,
                DamageKind::SeqGap {
                    expected: self.next_seq,
                    found: link.seq,
                },
            ));
        }
        let head = link_head(
            &self.previous,
            link.seq,
            link.tbl,
            link.first_id,
            link.last_id,
            link.rows,
            &link.digest,
        );
        if head != link.head {
            return Err(Damage::at(link, DamageKind::HeadMismatch));
        }
        let previous_last_id = self.last_id[link.tbl.index()];
        if link.first_id <= previous_last_id
            || link.last_id < link.first_id
            || link.rows < 1
            || link.rows > link.last_id - link.first_id + 1
        {
            return Err(Damage::at(
                link,
                DamageKind::RangeOutOfOrder { previous_last_id },
            ));
        }
        self.previous = head;
        self.next_seq += 1;
        self.last_id[link.tbl.index()] = link.last_id;
        self.links += 1;
        let pruned = link.first_id <= self.starts[link.tbl.index()].pruned_up_to;
        if pruned {
            self.links_pruned += 1;
        }
        Ok(LinkCheck {
            link: link.clone(),
            digest: RowDigest::new(),
            count: 0,
            last_row: link.first_id - 1,
            pruned,
        })
    }

    /// Counts rows checked by a finished [`LinkCheck`].
    pub fn add_rows(&mut self, rows: u64) {
        self.rows += rows;
    }
}

/// The rows of one link, fed in id order.
#[derive(Clone)]
pub struct LinkCheck {
    link: Link,
    digest: RowDigest,
    count: i64,
    last_row: i64,
    /// Rows of this link may have been pruned: only what remains is checked for range.
    pruned: bool,
}

impl LinkCheck {
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Whether the link lies (partly) in a pruned range.
    pub fn pruned(&self) -> bool {
        self.pruned
    }

    /// Adds the row `id` with its canonical encoding.
    pub fn row(&mut self, id: i64, encoding: &[u8]) -> Result<(), Damage> {
        if id <= self.last_row || id > self.link.last_id {
            return Err(Damage::at(&self.link, DamageKind::RowNotCovered { id }));
        }
        self.last_row = id;
        self.count += 1;
        if !self.pruned {
            self.digest.add(encoding);
        }
        Ok(())
    }

    /// Ends the link: its rows must be those sealed. Returns the rows counted.
    pub fn finish(self) -> Result<u64, Damage> {
        let sealed = self.link.rows;
        let found = self.count;
        if self.pruned {
            if found > sealed {
                return Err(Damage::at(
                    &self.link,
                    DamageKind::RowsExtra { sealed, found },
                ));
            }
            return Ok(found as u64);
        }
        if found < sealed {
            return Err(Damage::at(
                &self.link,
                DamageKind::RowsMissing { sealed, found },
            ));
        }
        if found > sealed {
            return Err(Damage::at(
                &self.link,
                DamageKind::RowsExtra { sealed, found },
            ));
        }
        if self.digest.finish() != self.link.digest {
            return Err(Damage::at(&self.link, DamageKind::DigestMismatch));
        }
        Ok(found as u64)
    }
}

// ---------------------------------------------------------------------------------------
// Clock corrections (G8) replayed

/// The clock corrections of readings recorded in the audit log, to recover sealed
/// `observed_at` and `flags` from the current ones. Each entry: the ids (inclusive
/// ranges) it touched that were already sealed, and either a shift of `observed_at` or
/// flag bits set.
#[derive(Debug, Clone, Default)]
pub struct Corrections {
    entries: Vec<Correction>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Correction {
    /// Inclusive id ranges of sealed readings touched.
    pub ranges: Vec<(i64, i64)>,
    /// µs added to `observed_at` (0 for a flag change).
    #[serde(default)]
    pub shift: i64,
    /// Flag bits set (0 for a shift).
    #[serde(default)]
    pub flags_set: i64,
}

impl Corrections {
    pub fn push(&mut self, c: Correction) {
        self.entries.push(c);
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Parses the `details` of a `clock.correction` audit entry (its `chain` member).
    pub fn push_details(&mut self, details: &str) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(details) else {
            return;
        };
        if let Some(c) = v
            .get("chain")
            .and_then(|c| serde_json::from_value::<Correction>(c.clone()).ok())
        {
            self.push(c);
        }
    }

    /// The corrections touching ids in `first..=last` (to filter once per link).
    pub fn within(&self, first: i64, last: i64) -> Corrections {
        Corrections {
            entries: self
                .entries
                .iter()
                .filter(|c| c.ranges.iter().any(|&(a, b)| a <= last && b >= first))
                .cloned()
                .collect(),
        }
    }

    /// The sealed `(observed_at, flags)` of reading `id` from its current values.
    pub fn sealed(&self, id: i64, observed_at: i64, flags: i64) -> (i64, i64) {
        let mut observed = observed_at;
        let mut set = 0i64;
        for c in &self.entries {
            if c.ranges.iter().any(|&(a, b)| a <= id && id <= b) {
                observed = observed.wrapping_sub(c.shift);
                set |= c.flags_set;
            }
        }
        (observed, flags & !set)
    }
}

/// Compresses sorted ids into inclusive ranges.
pub fn id_ranges(ids: &[i64]) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for &id in ids {
        match out.last_mut() {
            Some((_, b)) if *b + 1 == id => *b = id,
            _ => out.push((id, id)),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Sealing (the writer)

/// The row encodings of `tbl` with ids in `after+1..=up_to` (all above `after` when
/// `up_to` is `None`), in id order, as `(id, encoding)` pairs handed to `f`.
/// Readings are encoded as stored (the caller applies [`Corrections`] when verifying).
pub fn for_each_row(
    conn: &Connection,
    tbl: Table,
    after: i64,
    up_to: Option<i64>,
    corrections: Option<&Corrections>,
    mut f: impl FnMut(i64, &[u8], Option<i64>) -> Result<(), Damage>,
) -> rusqlite::Result<Result<(), Damage>> {
    let up_to = up_to.unwrap_or(i64::MAX);
    let mut buf = Vec::with_capacity(256);
    match tbl {
        Table::Readings => {
            let mut stmt = conn.prepare_cached(
                "SELECT id, uid, source, device, metric, value, unit, observed_at, flags \
                 FROM readings WHERE id > ?1 AND id <= ?2 ORDER BY id",
            )?;
            let mut rows = stmt.query(params![after, up_to])?;
            while let Some(r) = rows.next()? {
                let id: i64 = r.get(0)?;
                let uid = r.get_ref(1)?.as_blob_or_null()?.unwrap_or_default();
                let observed: i64 = r.get(7)?;
                let flags: i64 = r.get(8)?;
                let (observed_at, flags) = match corrections {
                    Some(c) => c.sealed(id, observed, flags),
                    None => (observed, flags),
                };
                buf.clear();
                encode_reading(
                    &ReadingRow {
                        id,
                        uid,
                        source: r.get_ref(2)?.as_str()?,
                        device: r.get_ref(3)?.as_str()?,
                        metric: r.get_ref(4)?.as_str()?,
                        value: r.get(5)?,
                        unit: r.get_ref(6)?.as_str_or_null()?,
                        observed_at,
                        flags,
                    },
                    &mut buf,
                );
                if let Err(d) = f(id, &buf, Some(observed)) {
                    return Ok(Err(d));
                }
            }
        }
        Table::AlertEvents => {
            let mut stmt = conn.prepare_cached(
                "SELECT id, uid, kind, rule, severity, device, metric, value, unit, threshold, \
                 since, occurred_at, message, actor, note, channel \
                 FROM alert_events WHERE id > ?1 AND id <= ?2 ORDER BY id",
            )?;
            let mut rows = stmt.query(params![after, up_to])?;
            while let Some(r) = rows.next()? {
                let id: i64 = r.get(0)?;
                let occurred_at: i64 = r.get(11)?;
                buf.clear();
                encode_alert_event(
                    &AlertEventRow {
                        id,
                        uid: r.get_ref(1)?.as_blob_or_null()?.unwrap_or_default(),
                        kind: r.get_ref(2)?.as_str()?,
                        rule: r.get_ref(3)?.as_str()?,
                        severity: r.get_ref(4)?.as_str()?,
                        device: r.get_ref(5)?.as_str()?,
                        metric: r.get_ref(6)?.as_str()?,
                        value: r.get(7)?,
                        unit: r.get_ref(8)?.as_str_or_null()?,
                        threshold: r.get(9)?,
                        since: r.get(10)?,
                        occurred_at,
                        message: r.get_ref(12)?.as_str()?,
                        actor: r.get_ref(13)?.as_str_or_null()?,
                        note: r.get_ref(14)?.as_str_or_null()?,
                        channel: r.get_ref(15)?.as_str_or_null()?,
                    },
                    &mut buf,
                );
                if let Err(d) = f(id, &buf, Some(occurred_at)) {
                    return Ok(Err(d));
                }
            }
        }
        Table::AuditLog => {
            let mut stmt = conn.prepare_cached(
                "SELECT id, at, boot_id, since_boot, kind, actor, details \
                 FROM audit_log WHERE id > ?1 AND id <= ?2 ORDER BY id",
            )?;
            let mut rows = stmt.query(params![after, up_to])?;
            while let Some(r) = rows.next()? {
                let id: i64 = r.get(0)?;
                let at: i64 = r.get(1)?;
                buf.clear();
                encode_audit(
                    &AuditRow {
                        id,
                        at,
                        boot_id: r.get_ref(2)?.as_str()?,
                        since_boot: r.get(3)?,
                        kind: r.get_ref(4)?.as_str()?,
                        actor: r.get_ref(5)?.as_str()?,
                        details: r.get_ref(6)?.as_str()?,
                    },
                    &mut buf,
                );
                if let Err(d) = f(id, &buf, Some(at)) {
                    return Ok(Err(d));
                }
            }
        }
    }
    Ok(Ok(()))
}

/// The newest link's seq and head (0 and genesis for an empty chain).
pub fn tip(conn: &Connection) -> rusqlite::Result<(i64, Hash)> {
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, head FROM chain_links ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(match row {
        Some((seq, head)) => (seq, to_hash(&head)),
        None => (0, GENESIS),
    })
}

/// The last id sealed of `tbl` (the writer's cursor).
pub fn sealed_up_to(conn: &Connection, tbl: Table) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT last_id FROM chain_tips WHERE tbl = ?1")?
        .query_row([tbl.as_str()], |r| r.get(0))
        .optional()
        .map(|v| v.unwrap_or(0))
}

/// A hash from a stored blob (zeros when it has the wrong length, which then fails
/// verification).
pub fn to_hash(bytes: &[u8]) -> Hash {
    bytes.try_into().unwrap_or([0; 32])
}

/// Benchmarks only (the `fuzzing` feature): set, the writer seals nothing.
#[cfg(feature = "fuzzing")]
pub const BENCH_NO_CHAIN_ENV: &str = "OUTPOST_BENCH_NO_CHAIN";

/// The readings a group transaction inserted, hashed as the writer bound them, in
/// insert order: what [`seal`] would read back, handed to [`seal_bound`] so that it
/// need not read them (the read-back was about a tenth of the writer's time at full
/// ingest, docs/benchmarks.md "Session 10").
#[derive(Default)]
pub struct BoundReadings {
    first: Option<i64>,
    last: i64,
    rows: i64,
    digest: RowDigest,
    buf: Vec<u8>,
}

impl BoundReadings {
    pub fn new() -> Self {
        BoundReadings::default()
    }

    /// Adds the row just inserted as `row.id`.
    pub fn add(&mut self, row: &ReadingRow<'_>) {
        self.first.get_or_insert(row.id);
        self.last = row.id;
        self.rows += 1;
        self.buf.clear();
        // As SQLite gives the value back: it stores an integral REAL as an integer, so
        // −0.0 is read as 0.0 (`+ 0.0` maps −0.0 to 0.0 and leaves every other value).
        let row = ReadingRow {
            value: row.value + 0.0,
            ..*row
        };
        encode_reading(&row, &mut self.buf);
        self.digest.add(&self.buf);
    }

    /// The link of these rows, if they are exactly the readings above `after` (else
    /// the caller reads them back): they start right after it, have no gaps and end at
    /// the table's highest id, so no row was inserted, removed or reused beside them.
    fn covering(self, conn: &Connection, after: i64) -> rusqlite::Result<Option<LinkRows>> {
        let Some(first_id) = self.first else {
            return Ok(None);
        };
        if first_id != after + 1 || self.rows != self.last - after {
            return Ok(None);
        }
        let max: Option<i64> = conn
            .prepare_cached("SELECT MAX(id) FROM readings")?
            .query_row([], |r| r.get(0))?;
        if max != Some(self.last) {
            return Ok(None);
        }
        let link = LinkRows {
            first_id,
            last_id: self.last,
            rows: self.rows,
            digest: self.digest.finish(),
        };
        // Every test that commits readings through the writer checks that the hash of
        // the rows as bound is the hash of the rows as stored.
        #[cfg(debug_assertions)]
        assert_eq!(
            read_back(conn, Table::Readings, after)?.as_ref(),
            Some(&link),
            "readings {first_id}..={} hashed as bound differ from the rows stored",
            link.last_id
        );
        Ok(Some(link))
    }
}

/// What a link covers of its table: the id range, the row count and their digest.
#[derive(Debug, PartialEq)]
struct LinkRows {
    first_id: i64,
    last_id: i64,
    rows: i64,
    digest: Hash,
}

/// The link of the rows of `tbl` above `after`, read from the table (`None` when there
/// are none).
fn read_back(conn: &Connection, tbl: Table, after: i64) -> rusqlite::Result<Option<LinkRows>> {
    let mut digest = RowDigest::new();
    let mut first = None;
    let mut last = after;
    let mut rows = 0i64;
    let walked = for_each_row(conn, tbl, after, None, None, |id, enc, _| {
        first.get_or_insert(id);
        last = id;
        rows += 1;
        digest.add(enc);
        Ok(())
    })?;
    debug_assert!(walked.is_ok());
    Ok(first.map(|first_id| LinkRows {
        first_id,
        last_id: last,
        rows,
        digest: digest.finish(),
    }))
}

/// Seals the rows the current transaction added: for each table with rows above its
/// last sealed id, one link. Called by the writer inside the group transaction, just
/// before it commits. Returns the number of links written.
pub fn seal(conn: &Connection, now_micros: i64) -> rusqlite::Result<usize> {
    seal_bound(conn, now_micros, None)
}

/// [`seal`], with the readings' link taken from `bound` when it covers exactly the
/// readings above the last sealed id (see [`BoundReadings::covering`]); read back
/// otherwise.
pub fn seal_bound(
    conn: &Connection,
    now_micros: i64,
    mut bound: Option<BoundReadings>,
) -> rusqlite::Result<usize> {
    // Benchmarks measure the chain's cost against the same run without it; the agent
    // binary is never built with this feature.
    #[cfg(feature = "fuzzing")]
    if std::env::var_os(BENCH_NO_CHAIN_ENV).is_some() {
        return Ok(0);
    }
    let (mut seq, mut head) = tip(conn)?;
    let mut sealed = 0;
    for tbl in Table::ALL {
        let after = sealed_up_to(conn, tbl)?;
        // `Table::ALL` starts with the readings, which `bound` is about.
        let covered = match (tbl, bound.take()) {
            (Table::Readings, Some(b)) => b.covering(conn, after)?,
            _ => None,
        };
        let link = match covered {
            Some(link) => link,
            None => match read_back(conn, tbl, after)? {
                Some(link) => link,
                None => continue,
            },
        };
        let LinkRows {
            first_id: first,
            last_id: last,
            rows,
            digest,
        } = link;
        seq += 1;
        head = link_head(&head, seq, tbl, first, last, rows, &digest);
        conn.prepare_cached(
            "INSERT INTO chain_links (seq, tbl, first_id, last_id, rows, digest, head, sealed_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            seq,
            tbl.as_str(),
            first,
            last,
            rows,
            &digest[..],
            &head[..],
            now_micros
        ])?;
        conn.prepare_cached("UPDATE chain_tips SET last_id = ?2 WHERE tbl = ?1")?
            .execute(params![tbl.as_str(), last])?;
        sealed += 1;
    }
    Ok(sealed)
}

/// Records that rows of `tbl` up to id `pruned_up_to` may be gone (`reason`:
/// `retention` or `size_cap`), with the chain's seq and head at this moment; signed
/// by the next signing ([`super::signing::sign_pending`]).
pub fn checkpoint(
    conn: &Connection,
    tbl: Table,
    pruned_up_to: i64,
    reason: &str,
    at: i64,
) -> rusqlite::Result<()> {
    let (seq, head) = tip(conn)?;
    conn.prepare_cached(
        "INSERT INTO chain_checkpoints (tbl, pruned_up_to, seq, head, reason, at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        tbl.as_str(),
        pruned_up_to,
        seq,
        &head[..],
        reason,
        at
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests;
