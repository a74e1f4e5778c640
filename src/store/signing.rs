//! The gateway's Ed25519 key and the signed heads of the chain (G10).
//!
//! The key is a 32-byte seed in `gateway.key` beside the database, generated at the
//! first start (mode 0600, written to a temporary file and linked into place, so it
//! is never half-written and never replaced), and never logged. The store signs the
//! chain's newest head when new links exist — every minute
//! ([`sign_periodically`]) and at every sync round ([`Store::sign_head`]) — and every
//! pruning checkpoint not yet signed. Signature rows go through the writer like any
//! other write.

use super::chain::{self, Hash, Table};
use super::{Store, StoreError};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rusqlite::{params, Connection, OptionalExtension};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The key file's name, in the database's directory.
pub const KEY_FILE: &str = "gateway.key";

/// How often the agent signs the head when new links exist.
pub const SIGN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// The gateway's signing key. Its `Debug` shows only the public key.
#[derive(Clone)]
pub struct GatewayKey {
    key: Arc<SigningKey>,
}

impl std::fmt::Debug for GatewayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GatewayKey({})", hex::encode(self.public_key()))
    }
}

impl GatewayKey {
    pub fn from_seed(seed: &[u8; 32]) -> GatewayKey {
        GatewayKey {
            key: Arc::new(SigningKey::from_bytes(seed)),
        }
    }

    /// A fresh random key (tests, tools).
    pub fn generate() -> GatewayKey {
        let mut seed = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
        let key = GatewayKey::from_seed(&seed);
        zeroize_seed(&mut seed);
        key
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

fn zeroize_seed(seed: &mut [u8; 32]) {
    for b in seed.iter_mut() {
        // SAFETY: `b` is a valid, aligned byte; a volatile write is not optimised away.
        unsafe { std::ptr::write_volatile(b, 0) };
    }
}

/// Whether `signature` over `message` verifies with `public_key`.
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let (Ok(pk), Ok(sig)) = (
        <[u8; 32]>::try_from(public_key),
        <[u8; 64]>::try_from(signature),
    ) else {
        return false;
    };
    let Ok(vk) = VerifyingKey::from_bytes(&pk) else {
        return false;
    };
    vk.verify_strict(message, &Signature::from_bytes(&sig))
        .is_ok()
}

/// `<database directory>/gateway.key`.
pub fn key_path(database: &Path) -> PathBuf {
    database
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join(KEY_FILE)
}

/// Reads the key at `path`.
pub fn load(path: &Path) -> Result<GatewayKey, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the gateway key {}: {e}", path.display()))?;
    let Ok(mut seed) = <[u8; 32]>::try_from(bytes.as_slice()) else {
        return Err(format!(
            "the gateway key {} is damaged ({} bytes, expected 32); move it aside to \
             generate a new one (central will report the changed key)",
            path.display(),
            bytes.len()
        ));
    };
    let key = GatewayKey::from_seed(&seed);
    zeroize_seed(&mut seed);
    Ok(key)
}

/// Reads the key at `path`, or generates it there if there is none: written with mode
/// 0600 to `<path>.tmp` (O_EXCL), synced, then hard-linked to `path` (which fails
/// rather than replace a key another process created meanwhile).
pub fn load_or_create(path: &Path) -> Result<GatewayKey, String> {
    if path.exists() {
        return load(path);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(format!(
            "the directory of the gateway key {} does not exist",
            path.display()
        ));
    }
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    let _ = std::fs::remove_file(&tmp);
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&seed)?;
        file.sync_all()
    })();
    zeroize_seed(&mut seed);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "cannot write the gateway key {}: {e}",
            tmp.display()
        ));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    match linked {
        Ok(()) => {
            let key = load(path)?;
            tracing::info!(
                path = %path.display(),
                public_key = %hex::encode(key.public_key()),
                "Generated the gateway's signing key."
            );
            Ok(key)
        }
        // Another process created it first: use that one.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load(path),
        Err(e) => Err(format!(
            "cannot create the gateway key {}: {e}",
            path.display()
        )),
    }
}

/// What one signing did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signed {
    /// The seq whose head was signed, if a new one was.
    pub head: Option<i64>,
    /// Pruning checkpoints signed.
    pub checkpoints: usize,
}

/// Signs, on `conn` (inside the caller's transaction), the newest head if no signature
/// covers it yet, and every unsigned checkpoint.
pub fn sign_pending(
    conn: &Connection,
    key: &GatewayKey,
    now_micros: i64,
) -> rusqlite::Result<Signed> {
    let mut signed = Signed::default();
    let (seq, head) = chain::tip(conn)?;
    let last_signed: Option<i64> = conn
        .query_row(
            "SELECT seq FROM chain_signatures ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if seq > 0 && last_signed != Some(seq) {
        let signature = key.sign(&chain::head_message(seq, &head));
        conn.execute(
            "INSERT INTO chain_signatures (seq, head, signature, public_key, signed_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                seq,
                &head[..],
                &signature[..],
                &key.public_key()[..],
                now_micros
            ],
        )?;
        signed.head = Some(seq);
    }
    let pending: Vec<(i64, String, i64, i64, Vec<u8>, String)> = conn
        .prepare(
            "SELECT id, tbl, pruned_up_to, seq, head, reason FROM chain_checkpoints \
             WHERE signature IS NULL ORDER BY id",
        )?
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    for (id, tbl, up_to, seq, head, reason) in pending {
        let Some(tbl) = Table::parse(&tbl) else {
            continue;
        };
        let head: Hash = chain::to_hash(&head);
        let signature = key.sign(&chain::checkpoint_message(tbl, up_to, seq, &head, &reason));
        conn.execute(
            "UPDATE chain_checkpoints SET signature = ?2, public_key = ?3 WHERE id = ?1",
            params![id, &signature[..], &key.public_key()[..]],
        )?;
        signed.checkpoints += 1;
    }
    Ok(signed)
}

impl Store {
    /// The gateway's signing key (`None` if it could not be read or created; the
    /// error was logged at start).
    pub fn gateway_key(&self) -> Option<&GatewayKey> {
        self.key.as_ref()
    }

    /// Signs the chain's newest head (if not signed yet) and unsigned pruning
    /// checkpoints, in the writer's next commit.
    pub async fn sign_head(&self) -> Result<Signed, StoreError> {
        match self.head_signing() {
            Some(sign) => self.write(sign).await,
            None => Ok(Signed::default()),
        }
    }

    /// [`Store::sign_head`] as a write to make part of another (the sync worker's
    /// one write per round, before it uploads signatures); `None` without a key.
    pub fn head_signing(
        &self,
    ) -> Option<impl FnOnce(&Connection) -> rusqlite::Result<Signed> + Send + 'static> {
        let key = self.key.clone()?;
        let clock = self.clock().clone();
        Some(move |conn: &Connection| sign_pending(conn, &key, clock.now().timestamp_micros()))
    }
}

/// Signs the head every [`SIGN_INTERVAL`] when new links exist, and once more when
/// `stop` is cancelled (the agent stops).
pub async fn sign_periodically(store: Store, stop: tokio_util::sync::CancellationToken) {
    if store.gateway_key().is_none() {
        return;
    }
    let mut timer = tokio::time::interval(SIGN_INTERVAL);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = timer.tick() => {}
            _ = stop.cancelled() => {
                // After the sources' last batches (most are committed within this).
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), store.sign_head()).await;
                return;
            }
        }
        if let Err(e) = store.sign_head().await {
            tracing::debug!(error = %e, "Could not sign the chain's head; will retry.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_with_mode_0600_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = key_path(&dir.path().join("outpost.db"));
        let a = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        assert!(!format!("{a:?}").is_empty());
        std::fs::write(&path, b"short").unwrap();
        assert!(load_or_create(&path).unwrap_err().contains("damaged"));
        let missing = dir.path().join("nope").join(KEY_FILE);
        assert!(load_or_create(&missing)
            .unwrap_err()
            .contains("does not exist"));
    }

    #[test]
    fn signatures_verify_only_with_their_key_and_message() {
        let key = GatewayKey::generate();
        let other = GatewayKey::generate();
        let m = chain::head_message(3, &[1; 32]);
        let sig = key.sign(&m);
        assert!(verify(&key.public_key(), &m, &sig));
        assert!(!verify(&other.public_key(), &m, &sig));
        assert!(!verify(
            &key.public_key(),
            &chain::head_message(4, &[1; 32]),
            &sig
        ));
        assert!(!verify(&key.public_key(), &m, &sig[..10]));
    }
}
