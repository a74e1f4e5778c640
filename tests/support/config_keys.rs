//! Every key the configuration accepts, found by asking the real loader
//! ([`Config::load`]): a probe key `__probe__` placed in a table is refused with
//! "unknown key `__probe__`; expected one of `a`, `b`, …", which names every key that
//! table takes; probing each of those keys with a table (or a list of tables, or a map
//! of tables) finds the nested tables, and so on down. Nothing is listed by hand, so a
//! new field in any config struct shows up. Used by tests/docs.rs (the configuration
//! reference) and tests/config.rs (the example configuration).

use outpost::config::Config;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

const PROBE: &str = "__probe__";

/// Writes `root` as TOML (inline tables only, so any nesting is one line per top-level
/// key) and returns every `(key path, message)` the loader reports.
struct Loader {
    dir: tempfile::TempDir,
}

impl Loader {
    fn new() -> Self {
        Loader {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn errors(&self, root: &Value) -> Vec<(String, String)> {
        let mut text = String::new();
        for (k, v) in root.as_object().expect("the root is a table") {
            text.push_str(&format!("{} = {}\n", toml_key(k), inline_toml(v)));
        }
        let path = self.dir.path().join("outpost.toml");
        std::fs::write(&path, text).unwrap();
        match Config::load(&path) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.into_iter().map(|e| (e.key, e.message)).collect(),
        }
    }

    /// The keys the table at `err_path` takes, if the value `root` puts there is a
    /// table that rejects the probe key (i.e. a config struct).
    fn struct_keys(&self, root: &Value, err_path: &str) -> Option<Vec<String>> {
        let probe_path = format!("{err_path}.{PROBE}");
        let errors = self.errors(root);
        let message = errors
            .iter()
            .find(|(k, m)| *k == probe_path && m.starts_with(&format!("unknown key `{PROBE}`")))
            .map(|(_, m)| m.clone())?;
        if message.contains("this table takes no keys") {
            return Some(Vec::new());
        }
        let (_, expected) = message.split_once("expected")?;
        Some(backticked(expected))
    }
}

fn toml_key(k: &str) -> String {
    serde_json::to_string(k).unwrap()
}

fn inline_toml(v: &Value) -> String {
    match v {
        Value::Object(map) => format!(
            "{{ {} }}",
            map.iter()
                .map(|(k, v)| format!("{} = {}", toml_key(k), inline_toml(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Array(list) => format!(
            "[{}]",
            list.iter().map(inline_toml).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}

/// `a`, `b` → ["a", "b"].
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_string())
        .collect()
}

/// `"a", "b"` → ["a", "b"].
fn quoted_choices(text: &str) -> Vec<String> {
    text.split('"')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_string())
        .collect()
}

type Place<'a> = &'a dyn Fn(Value) -> Value;

/// Adds the key paths of the struct at `place` (its probe error path `err`, its
/// documented path `canon`) and of everything nested in it.
fn explore(
    loader: &Loader,
    place: Place,
    err: &str,
    canon: &str,
    keys: &[String],
    out: &mut BTreeSet<String>,
) {
    for key in keys {
        let canon_key = format!("{canon}.{key}");
        out.insert(canon_key.clone());
        let err_key = format!("{err}.{key}");
        let at_key = |v: Value| place(json!({ key.as_str(): v }));
        // A table (a struct or an optional struct)?
        if let Some(inner) = loader.struct_keys(&at_key(json!({ PROBE: 1 })), &err_key) {
            explore(loader, &at_key, &err_key, &canon_key, &inner, out);
            continue;
        }
        // A list of tables?
        let in_list = |v: Value| at_key(json!([v]));
        let err_list = format!("{err_key}[0]");
        if let Some(inner) = loader.struct_keys(&in_list(json!({ PROBE: 1 })), &err_list) {
            explore(
                loader,
                &in_list,
                &err_list,
                &format!("{canon_key}[]"),
                &inner,
                out,
            );
            continue;
        }
        // A map from names the technician chooses to tables?
        let in_map = |v: Value| at_key(json!({ "name": v }));
        let err_map = format!("{err_key}.name");
        if let Some(inner) = loader.struct_keys(&in_map(json!({ PROBE: 1 })), &err_map) {
            explore(
                loader,
                &in_map,
                &err_map,
                &format!("{canon_key}.*"),
                &inner,
                out,
            );
        }
    }
}

/// Every key path the configuration accepts, e.g. `storage.retention`,
/// `sources[ttn].broker.host`, `sources[modbus-rtu].slaves[].registers[].address`,
/// `sources[serial].mapping.fields.*.metric`, `alerts[].for`,
/// `notifiers[email].smtp_host`. Secrets' `<key>_file` variants are not included.
pub fn accepted_keys() -> BTreeSet<String> {
    let loader = Loader::new();
    let mut out = BTreeSet::new();
    let errors = loader.errors(&json!({ PROBE: 1 }));
    let sections = errors
        .iter()
        .find(|(k, _)| k == PROBE)
        .map(|(_, m)| backticked(m))
        .expect("an unknown section is reported with the list of sections");
    assert!(sections.len() >= 5, "{sections:?}");
    for section in &sections {
        out.insert(section.clone());
        let at = |v: Value| json!({ section.as_str(): v });
        if let Some(keys) = loader.struct_keys(&at(json!({ PROBE: 1 })), section) {
            explore(&loader, &at, section, section, &keys, &mut out);
            continue;
        }
        let in_list = |v: Value| at(json!([v]));
        let err_list = format!("{section}[0]");
        if let Some(keys) = loader.struct_keys(&in_list(json!({ PROBE: 1 })), &err_list) {
            explore(
                &loader,
                &in_list,
                &err_list,
                &format!("{section}[]"),
                &keys,
                &mut out,
            );
            continue;
        }
        // A list of tagged tables (`type = "…"`): explore each type.
        let errors = loader.errors(&in_list(json!({})));
        let types = errors
            .iter()
            .find(|(k, m)| *k == format!("{err_list}.type") && m.contains("one of"))
            .map(|(_, m)| quoted_choices(m.split_once("one of").unwrap().1))
            .unwrap_or_else(|| panic!("cannot tell what `{section}` holds: {errors:#?}"));
        assert!(!types.is_empty());
        for ty in types {
            let canon = format!("{section}[{ty}]");
            out.insert(format!("{canon}.type"));
            let typed = |v: Value| {
                let mut map = match v {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                map.insert("type".into(), json!(ty));
                in_list(Value::Object(map))
            };
            let mut keys = loader
                .struct_keys(&typed(json!({ PROBE: 1 })), &err_list)
                .unwrap_or_else(|| panic!("`{canon}` does not reject unknown keys"));
            if section == "notifiers" {
                // The keys every notifier type shares are checked apart from the type's.
                keys.extend(outpost::notify::COMMON_KEYS.iter().map(|k| k.to_string()));
            }
            explore(&loader, &typed, &err_list, &canon, &keys, &mut out);
        }
    }
    out
}
