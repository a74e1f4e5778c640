//! What the running agent writes to the audit log (G10) about itself: the configuration
//! it started with and every reload applied or refused (each file with its SHA-256, and
//! which keys changed), and a version change since the previous start.

use crate::config::Config;
use crate::store::audit::{AuditEntry, AuditKind};
use crate::store::Store;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Where the version of the previous start is kept (`source_state`).
const VERSION_STATE: (&str, &str) = ("agent", "version");

/// Records the start: the configuration's files, and a version change if the database
/// was last used by another version. Failures are logged, never fatal.
pub async fn record_start(store: &Store, path: &Path) {
    let version = env!("CARGO_PKG_VERSION");
    let loaded = AuditEntry::by_process(
        AuditKind::ConfigLoaded,
        json!({ "files": file_digests(path), "version": version }),
    );
    log_failure(store.audit(loaded).await.map(drop));
    let reader = store.clone();
    let previous = tokio::task::spawn_blocking(move || {
        let conn = reader.reader().ok()?;
        crate::store::state::read_state(&conn, VERSION_STATE.0, VERSION_STATE.1)
            .ok()
            .flatten()
    })
    .await
    .ok()
    .flatten();
    if previous.as_deref() == Some(version) {
        return;
    }
    if let Some(previous) = &previous {
        let direction = match compare_versions(previous, version) {
            std::cmp::Ordering::Less => "upgrade",
            std::cmp::Ordering::Greater => "downgrade",
            std::cmp::Ordering::Equal => "rebuild",
        };
        tracing::info!(from = %previous, to = version, direction, "The agent's version changed since the last start.");
        let entry = AuditEntry::by_process(
            AuditKind::VersionChanged,
            json!({ "from": previous, "to": version, "direction": direction }),
        );
        log_failure(store.audit(entry).await.map(drop));
    }
    let rows = vec![(VERSION_STATE.1.to_string(), version.to_string())];
    log_failure(crate::store::state::write_rows(store, VERSION_STATE.0, rows).await);
}

/// Records a reload: applied (with the keys that changed) or refused (with the problems).
pub async fn record_reload(
    store: &Store,
    path: &Path,
    outcome: Result<(&Config, &Config), &crate::config::ConfigErrors>,
) {
    let files = file_digests(path);
    let entry = match outcome {
        Ok((old, new)) => AuditEntry::by_process(
            AuditKind::ConfigReloaded,
            json!({ "files": files, "changed": changed_keys(old, new) }),
        ),
        Err(errors) => {
            let problems: Vec<String> = errors.0.iter().take(50).map(|e| e.to_string()).collect();
            AuditEntry::by_process(
                AuditKind::ConfigRefused,
                json!({ "files": files, "problems": problems, "count": errors.0.len() }),
            )
        }
    };
    log_failure(store.audit(entry).await.map(drop));
}

fn log_failure(result: Result<(), crate::store::StoreError>) {
    if let Err(e) = result {
        tracing::warn!(error = %e, "Cannot write to the audit log.");
    }
}

/// Each configuration file with its SHA-256 (or why it could not be read).
pub fn file_digests(main: &Path) -> Vec<Value> {
    crate::config::files(main)
        .into_iter()
        .map(|file| match std::fs::read(&file) {
            Ok(bytes) => json!({
                "path": file.display().to_string(),
                "sha256": hex::encode(Sha256::digest(&bytes)),
                "bytes": bytes.len(),
            }),
            Err(e) => json!({ "path": file.display().to_string(), "error": e.to_string() }),
        })
        .collect()
}

/// The dotted paths of the keys whose effective values differ (secrets are redacted
/// in both, so a changed password shows only in the files' digests).
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (old, new) = (
        serde_json::to_value(old).unwrap_or(Value::Null),
        serde_json::to_value(new).unwrap_or(Value::Null),
    );
    let mut out = Vec::new();
    diff("", &old, &new, &mut out);
    out
}

fn diff(path: &str, old: &Value, new: &Value, out: &mut Vec<String>) {
    const MAX: usize = 200;
    if out.len() >= MAX || old == new {
        return;
    }
    let join = |key: &str| {
        if path.is_empty() {
            key.to_string()
        } else {
            format!("{path}.{key}")
        }
    };
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let null = Value::Null;
                diff(
                    &join(key),
                    a.get(key).unwrap_or(&null),
                    b.get(key).unwrap_or(&null),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), x, y, out);
            }
        }
        _ => out.push(if path.is_empty() {
            "(all)".into()
        } else {
            path.to_string()
        }),
    }
}

/// Orders `a.b.c` versions numerically where both parts are numbers.
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |v: &str| -> Vec<u64> {
        v.split(['.', '-', '+'])
            .map_while(|p| p.parse().ok())
            .collect()
    };
    parts(a).cmp(&parts(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_name_the_leaves_that_differ() {
        let old = Config::default();
        let mut new = Config::default();
        new.http.listen = "127.0.0.1:1".into();
        new.storage.batch_max_rows += 1;
        let keys = changed_keys(&old, &new);
        assert_eq!(keys, vec!["http.listen", "storage.batch_max_rows"]);
        assert!(changed_keys(&old, &old).is_empty());
    }

    #[test]
    fn versions_compare_numerically() {
        use std::cmp::Ordering::*;
        assert_eq!(compare_versions("0.9.0", "0.10.0"), Less);
        assert_eq!(compare_versions("1.2.0", "1.1.9"), Greater);
        assert_eq!(compare_versions("1.2.0", "1.2.0"), Equal);
    }

    #[test]
    fn digests_cover_the_main_file_and_drop_ins() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("outpost.toml");
        std::fs::write(&main, "a").unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(dir.path().join("conf.d/10-x.toml"), "b").unwrap();
        std::fs::write(dir.path().join("conf.d/README"), "c").unwrap();
        let files = file_digests(&main);
        assert_eq!(files.len(), 2);
        assert_eq!(
            files[0]["sha256"],
            "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"
        );
        assert!(files[1]["path"].as_str().unwrap().ends_with("10-x.toml"));
    }
}
