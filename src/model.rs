//! The data that flows through the agent: readings, their uids and flags, and the
//! batches sources hand to the store.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::{Arc, OnceLock};
use tokio::sync::oneshot;

/// A stable 128-bit identifier derived from a reading's origin (G2).
///
/// The same origin always gives the same uid, so a redelivered message, a backfilled
/// uplink or a retried upload dedupes locally and centrally.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid(pub [u8; 16]);

impl Uid {
    /// Derives a uid from the parts that identify an origin, e.g.
    /// `["ttn", device, f_cnt, received_at, metric]`. Parts are separated by a byte that
    /// cannot appear in UTF-8 text, so `["ab", "c"]` and `["a", "bc"]` differ.
    pub fn derive(parts: &[&str]) -> Uid {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update(part.as_bytes());
            hasher.update([0xff]);
        }
        let digest = hasher.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Uid(bytes)
    }

    /// The hash state after `parts`, to derive many uids that share them (the readings
    /// of one message): `Uid::prefix(&a).derive(b)` equals `Uid::derive(&[a…, b])`.
    pub fn prefix(parts: &[&str]) -> UidPrefix {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update(part.as_bytes());
            hasher.update([0xff]);
        }
        UidPrefix(hasher)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Uid> {
        <[u8; 16]>::try_from(bytes).ok().map(Uid)
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

/// The common first parts of several uids (see [`Uid::prefix`]).
#[derive(Clone)]
pub struct UidPrefix(Sha256);

impl UidPrefix {
    /// The uid of the prefix's parts followed by `last`.
    pub fn derive(&self, last: &str) -> Uid {
        let mut hasher = self.0.clone();
        hasher.update(last.as_bytes());
        hasher.update([0xff]);
        let digest = hasher.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Uid(bytes)
    }
}

impl fmt::Debug for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uid({})", self.to_hex())
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Uid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

/// Bit flags stored with every reading and sent centrally.
pub mod flags {
    /// The local clock was not known to be synchronised when the reading was taken (G8).
    pub const CLOCK_UNSYNCED: u32 = 1 << 0;
    /// The uplink was marked `simulated` by the network server.
    pub const SIMULATED: u32 = 1 << 1;
    /// The reading came from a backfill (e.g. The Things Stack Storage Integration).
    pub const BACKFILLED: u32 = 1 << 2;
    /// The timestamp was corrected after the clock synchronised (G8).
    pub const CLOCK_CORRECTED: u32 = 1 << 3;
}

/// One narrow reading: one value of one metric of one device at one instant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reading {
    pub uid: Uid,
    /// The name of the configured source that produced it.
    pub source: String,
    pub device: String,
    pub metric: String,
    pub value: f64,
    pub unit: Option<String>,
    /// The best timestamp available for the measurement (network-server time for LoRaWAN).
    pub observed_at: DateTime<Utc>,
    /// When the agent received it (local clock).
    pub received_at: DateTime<Utc>,
    pub flags: u32,
    /// Source-specific context kept with the reading (f_port, f_cnt, RSSI, …) as JSON.
    pub meta: Option<Meta>,
}

/// A reading's source context (f_port, f_cnt, RSSI, tags, …): its JSON text, made once
/// per message and shared by the message's readings, and the JSON value, parsed from
/// the text only when something reads it (an alert rule's tag filter). The store
/// writes the text as it is: serialising the value again for each reading, and freeing
/// a copy per reading, cost the store's writer thread about a quarter of its time at
/// full TTN ingest, and building and freeing the value cost the TTN source about a
/// tenth of its own (docs/benchmarks.md, "Session 10" and "Session 11").
#[derive(Clone)]
pub struct Meta(Arc<MetaInner>);

struct MetaInner {
    text: Box<str>,
    value: OnceLock<serde_json::Value>,
}

impl Meta {
    pub fn new(value: serde_json::Value) -> Meta {
        let text = value.to_string().into_boxed_str();
        Meta(Arc::new(MetaInner {
            text,
            value: OnceLock::from(value),
        }))
    }

    /// Meta serialised from `fields` (a struct of the source's context); the value is
    /// parsed from the text if something reads it. Serialising a struct of strings
    /// and numbers cannot fail (serde_json writes a non-finite number as `null`); if
    /// it did, the meta would be `null`.
    pub fn serialized<T: Serialize>(fields: &T) -> Meta {
        match serde_json::to_string(fields) {
            Ok(text) => Meta(Arc::new(MetaInner {
                text: text.into_boxed_str(),
                value: OnceLock::new(),
            })),
            Err(_) => Meta::new(serde_json::Value::Null),
        }
    }

    /// Meta as stored: the text is kept as it is; `None` when it is not JSON.
    pub fn from_text(text: String) -> Option<Meta> {
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(Meta(Arc::new(MetaInner {
            text: text.into_boxed_str(),
            value: OnceLock::from(value),
        })))
    }

    /// The JSON text the store writes.
    pub fn text(&self) -> &str {
        &self.0.text
    }

    fn value(&self) -> &serde_json::Value {
        // The text was serialised by `serialized`, so it parses; `null` is only a
        // fallback that keeps this total.
        self.0
            .value
            .get_or_init(|| serde_json::from_str(&self.0.text).unwrap_or(serde_json::Value::Null))
    }
}

impl From<serde_json::Value> for Meta {
    fn from(value: serde_json::Value) -> Meta {
        Meta::new(value)
    }
}

impl std::ops::Deref for Meta {
    type Target = serde_json::Value;
    fn deref(&self) -> &serde_json::Value {
        self.value()
    }
}

impl PartialEq for Meta {
    /// The same text is the same meta (without parsing it); else the values compare.
    fn eq(&self, other: &Meta) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || self.0.text == other.0.text
            || self.value() == other.value()
    }
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.value(), f)
    }
}

impl Serialize for Meta {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(s)
    }
}

/// What the store reports for a committed batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Rows written for the first time.
    pub inserted: usize,
    /// Rows whose uid was already stored (a redelivery).
    pub duplicates: usize,
}

/// Resolved once the batch's transaction has committed with `synchronous=FULL`, or with
/// the reason it was not stored. A source acknowledges its producer only on `Ok` (G1).
pub type Ack = oneshot::Sender<Result<Committed, StoreError>>;

/// Why the store could not do what was asked (re-exported as `store::StoreError`;
/// it is defined here because every acknowledgement carries it). Cloneable so one commit failure can be
/// reported to every batch of the group.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("the disk is full (SQLITE_FULL); nothing of this batch was stored")]
    Full,
    #[error("the store is shutting down")]
    Closed,
    #[error("the commit was rolled back; nothing of this batch was stored")]
    RolledBack,
    #[error("cannot open the database {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("SQLite: {0}")]
    Sqlite(String),
}

impl StoreError {
    pub fn from_sqlite(e: &rusqlite::Error) -> StoreError {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::Full,
            Some(rusqlite::ErrorCode::OperationAborted) => StoreError::RolledBack,
            _ => StoreError::Sqlite(e.to_string()),
        }
    }
}

/// A group of readings from one source, with an optional acknowledgement.
#[derive(Debug)]
pub struct Batch {
    pub readings: Vec<Reading>,
    pub ack: Option<Ack>,
}

impl Batch {
    /// A batch whose commit is awaited through the returned receiver.
    pub fn with_ack(
        readings: Vec<Reading>,
    ) -> (Batch, oneshot::Receiver<Result<Committed, StoreError>>) {
        let (tx, rx) = oneshot::channel();
        (
            Batch {
                readings,
                ack: Some(tx),
            },
            rx,
        )
    }
}

/// Microseconds since the Unix epoch, the store's and central's time resolution.
pub fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or(DateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_is_stable_and_separates_parts() {
        let a = Uid::derive(&["ttn", "dev", "42"]);
        assert_eq!(a, Uid::derive(&["ttn", "dev", "42"]));
        assert_ne!(Uid::derive(&["ab", "c"]), Uid::derive(&["a", "bc"]));
        // Pinned: changing the derivation would break dedupe against central.
        assert_eq!(a.to_hex().len(), 32);
        assert_eq!(Uid::from_slice(&a.0), Some(a));
        assert_eq!(Uid::from_slice(&[1, 2, 3]), None);
        let prefix = Uid::prefix(&["ttn", "dev"]);
        assert_eq!(prefix.derive("42"), a);
        assert_eq!(Uid::prefix(&[]).derive("x"), Uid::derive(&["x"]));
    }

    #[test]
    fn meta_is_serialised_once_and_shared() {
        let value = serde_json::json!({"f_cnt": 7, "rssi": -97.5, "tags": {"zone": "n"}});
        let meta = Meta::new(value.clone());
        assert_eq!(meta.text(), value.to_string());
        assert_eq!(meta["tags"]["zone"], "n");
        let copy = meta.clone();
        assert!(
            std::ptr::eq(meta.text(), copy.text()),
            "clones share the text"
        );
        assert_eq!(serde_json::to_value(&meta).unwrap(), value);
        assert_eq!(format!("{meta:?}"), format!("{value:?}"));
    }

    #[test]
    fn meta_serialized_from_fields_parses_its_value_when_read() {
        #[derive(Serialize)]
        struct Fields<'a> {
            f_cnt: u32,
            gateway_id: &'a str,
            rssi: f64,
            snr: f64,
        }
        let fields = Fields {
            f_cnt: 7,
            gateway_id: "gw \"one\"\n",
            rssi: -97.0,
            snr: f64::NAN,
        };
        let meta = Meta::serialized(&fields);
        let value = serde_json::json!({"f_cnt": 7, "gateway_id": "gw \"one\"\n", "rssi": -97.0, "snr": null});
        assert_eq!(meta.text(), value.to_string(), "the text a value gives");
        assert_eq!(meta["gateway_id"], "gw \"one\"\n");
        assert_eq!(meta.clone(), Meta::new(value));
    }

    #[test]
    fn meta_from_stored_text_keeps_it_and_refuses_what_is_not_json() {
        let stored = r#"{"slave":3, "note":"spaced as stored"}"#.to_string();
        let meta = Meta::from_text(stored.clone()).unwrap();
        assert_eq!(meta.text(), stored);
        assert_eq!(meta["slave"], 3);
        assert_eq!(Meta::from_text("{\"f_cnt\": ".into()), None);
        assert_eq!(Meta::from_text(String::new()), None);
        assert_eq!(Meta::from_text("\u{0}".into()), None);
    }
}
