//! The configuration: one TOML file (`/etc/outpost/outpost.toml`), optional drop-ins
//! (`conf.d/*.toml` beside it) and `OUTPOST__SECTION__KEY` environment overrides.
//!
//! Loading never stops at the first problem: every wrong type, unknown key, bad
//! duration, missing key, unset `${VAR}`, unreadable `*_file` and contradiction is
//! reported at once, each as `file:line: key.path: sentence` (G5).
//! `config/outpost.toml` in the repository documents every key.

mod load;
mod tables;
pub mod types;

pub use load::{expand_env, ConfigError, ConfigErrors, Origin, SECRET_KEYS};
pub use types::{ByteSize, HumanDuration, Secret};

use crate::alerts::AlertRule;
use crate::notify::NotifierConfig;
use crate::sources::SourceConfig;
use crate::store::StorageConfig;
use load::join_path;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tables::{Declared, Tables};

/// The default location of the main configuration file.
pub const DEFAULT_PATH: &str = "/etc/outpost/outpost.toml";

/// The whole agent configuration.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Config {
    pub agent: AgentConfig,
    pub storage: StorageConfig,
    pub log: LogConfig,
    pub http: crate::http::HttpConfig,
    pub display: crate::display::DisplayConfig,
    pub sources: Vec<SourceConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<crate::sync::SyncConfig>,
    pub alerts: Vec<AlertRule>,
    pub notifiers: Vec<NotifierConfig>,
}

/// `[agent]`: who this gateway is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The gateway's id in central (`outpost.gateways.gateway_id`); letters, digits,
    /// `.`, `_` and `-`, at most 64. Defaults to the host name.
    #[serde(default = "default_gateway_id")]
    pub gateway_id: String,
    /// A human name for the site, used in notifications.
    #[serde(default)]
    pub site: String,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            gateway_id: default_gateway_id(),
            site: String::new(),
        }
    }
}

fn default_gateway_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let cleaned: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect();
    if cleaned.is_empty() {
        "outpost".to_string()
    } else {
        cleaned
    }
}

/// `[log]`: what goes to the journal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `error`, `warn`, `info`, `debug`, `trace`, or per module
    /// like `info,outpost::sources=debug`. `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// Checks that names used as identifiers (gateway id, source names, devices) are plain.
pub fn check_identifier(value: &str, what: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if value.len() > 64 {
        return Err(format!("{what} is longer than 64 characters"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
    {
        return Err(format!(
            "{what} {value:?} contains {c:?}; use letters, digits, '.', '_', '-' or ':'"
        ));
    }
    Ok(())
}

/// Collects `(key path, sentence)` problems while checking a configuration.
#[derive(Default)]
pub struct Problems(pub Vec<(String, String)>);

impl Problems {
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push((path.into(), message.into()));
    }

    /// Records `check`'s error, if any, under `path`.
    pub fn check(&mut self, path: impl Into<String>, check: Result<(), String>) {
        if let Err(message) = check {
            self.push(path, message);
        }
    }

    /// Removes and returns the `type` key of a tagged table (`[[sources]]`,
    /// `[[notifiers]]`), recording why when the value is not a table or the key is
    /// missing or not a string. Whether the type is one of `choices` is the caller's
    /// match to decide.
    pub fn take_type(&mut self, value: &mut Value, path: &str, choices: &[&str]) -> Option<String> {
        let Some(map) = value.as_object_mut() else {
            self.push(path, "expected a table");
            return None;
        };
        match map.remove("type") {
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.push(
                    format!("{path}.type"),
                    format!("expected a string, found {other}"),
                );
                None
            }
            None => {
                self.push(
                    format!("{path}.type"),
                    format!(
                        "the required key `type` is missing; one of {}",
                        quoted(choices)
                    ),
                );
                None
            }
        }
    }

    /// Deserializes `value` into `T`, recording every problem (not just the first one)
    /// under `prefix`. Returns `None` if there was any.
    pub fn deserialize<T: DeserializeOwned>(
        &mut self,
        mut value: Value,
        prefix: &str,
    ) -> Option<T> {
        let mut failed = false;
        // Keys removed after a problem was reported for them: their "missing" in a
        // later round is a consequence, not a second problem.
        let mut removed: Vec<String> = Vec::new();
        // Keys an unknown key was taken for ("did you mean"): their "missing" is the
        // same mistake (a misspelt required key), not a second problem.
        let mut suggested: Vec<String> = Vec::new();
        // Each round reports one problem and removes the offending key, so the next
        // round finds the next problem. The bound stops a pathological file.
        for _ in 0..64 {
            match serde_path_to_error::deserialize::<_, T>(value.clone()) {
                Ok(t) => return (!failed).then_some(t),
                Err(e) => {
                    failed = true;
                    let mut segments: Vec<String> = e
                        .path()
                        .iter()
                        .map(|s| match s {
                            serde_path_to_error::Segment::Seq { index } => format!("[{index}]"),
                            other => other.to_string(),
                        })
                        .collect();
                    let raw = e.inner().to_string();
                    let named = backticked_after(&raw, "unknown field `")
                        .or_else(|| backticked_after(&raw, "missing field `"));
                    if let Some(field) = named {
                        if segments.last() != Some(&field) {
                            segments.push(field);
                        }
                    }
                    let rel = segments
                        .iter()
                        .fold(String::new(), |acc, s| join_path(&acc, s));
                    let missing = raw.starts_with("missing field");
                    let mut message = humanize(&raw);
                    if raw.starts_with("unknown field") {
                        if let Some(meant) = closest_field(&raw) {
                            message = format!("{message}; did you mean `{meant}`?");
                            let parent = &segments[..segments.len().saturating_sub(1)];
                            let mut meant_path = parent.to_vec();
                            meant_path.push(meant);
                            suggested.push(
                                meant_path
                                    .iter()
                                    .fold(String::new(), |acc, s| join_path(&acc, s)),
                            );
                        }
                    }
                    if !(missing && (removed.contains(&rel) || suggested.contains(&rel))) {
                        self.push(join_path(prefix, &rel), message);
                    }
                    if missing || !remove_path(&mut value, &segments) {
                        return None;
                    }
                    removed.push(rel);
                }
            }
        }
        None
    }
}

/// `"a", "b", "c"` — a list of choices for a message.
pub fn quoted(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// For serde's "unknown field `x`, expected one of `a`, `b`": the expected field
/// closest to `x`, when it is close enough to be a misspelling.
fn closest_field(raw: &str) -> Option<String> {
    let unknown = backticked_after(raw, "unknown field `")?;
    let (_, expected) = raw.split_once("expected ")?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|field| (edit_distance(&unknown, field), field))
        .filter(|(d, field)| *d > 0 && *d <= 2.max(field.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, field)| field.to_string())
}

/// Levenshtein distance (keys are short; quadratic is fine).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

fn backticked_after(message: &str, marker: &str) -> Option<String> {
    let start = message.find(marker)? + marker.len();
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

fn remove_path(value: &mut Value, segments: &[String]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut cur = value;
    for seg in parents {
        let next = match seg.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            Some(i) => i.parse::<usize>().ok().and_then(|i| cur.get_mut(i)),
            None => cur.get_mut(seg.as_str()),
        };
        match next {
            Some(v) => cur = v,
            None => return false,
        }
    }
    match (
        cur,
        last.strip_prefix('[').and_then(|s| s.strip_suffix(']')),
    ) {
        (Value::Array(list), Some(i)) => match i.parse::<usize>() {
            Ok(i) if i < list.len() => {
                list.remove(i);
                true
            }
            _ => false,
        },
        (Value::Object(map), None) => map.remove(last.as_str()).is_some(),
        _ => false,
    }
}

/// Turns serde's wording into a sentence for a technician.
fn humanize(raw: &str) -> String {
    let words = |s: &str| {
        s.replace("u64", "a whole number")
            .replace("u32", "a whole number")
            .replace("u16", "a whole number")
            .replace("u8", "a whole number")
            .replace("usize", "a whole number")
            .replace("i64", "a whole number")
            .replace("i32", "a whole number")
            .replace("f64", "a number")
            .replace("f32", "a number")
            .replace("a string like", "a value like")
            .replace("integer `", "the number `")
            .replace("floating point `", "the number `")
    };
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = raw.strip_prefix(prefix) {
            if let Some((found, expected)) = rest.split_once(", expected ") {
                return words(&format!("expected {expected}, found {found}"));
            }
        }
    }
    if let Some(rest) = raw.strip_prefix("unknown field ") {
        return format!(
            "unknown key {}",
            rest.replacen(", expected", "; expected", 1)
        )
        .replace(", there are no fields", "; this table takes no keys");
    }
    if let Some(rest) = raw.strip_prefix("unknown variant ") {
        return format!(
            "unknown value {}",
            rest.replacen(", expected", "; expected", 1)
        );
    }
    if let Some(rest) = raw.strip_prefix("missing field ") {
        return format!("the required key {rest} is missing");
    }
    words(raw)
}

const SECTIONS: &[&str] = &[
    "agent",
    "storage",
    "log",
    "http",
    "display",
    "sources",
    "sync",
    "alerts",
    "notifiers",
];

impl Config {
    /// Loads and checks the configuration at `path` with its drop-ins and environment.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let mut errors = Vec::new();
        let mut layers = load::read_layers(path, &mut errors);
        load::substitute(&mut layers, &mut errors);

        let mut problems = Problems::default();
        let mut root = match std::mem::take(&mut layers.value) {
            Value::Object(map) => map,
            _ => Default::default(),
        };
        let mut top: Vec<&String> = root.keys().chain(layers.file_sections.iter()).collect();
        top.sort();
        top.dedup();
        for key in top {
            if !SECTIONS.contains(&key.as_str()) {
                problems.push(
                    key.clone(),
                    format!(
                        "unknown section; expected one of {}",
                        SECTIONS
                            .iter()
                            .map(|s| format!("`{s}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
        let mut section = |name: &str, problems: &mut Problems| -> Option<Value> {
            root.remove(name).filter(|v| {
                if v.is_object() {
                    true
                } else {
                    problems.push(name, format!("expected a table `[{name}]`"));
                    false
                }
            })
        };
        let agent = section("agent", &mut problems)
            .and_then(|v| problems.deserialize(v, "agent"))
            .unwrap_or_default();
        let storage = section("storage", &mut problems)
            .and_then(|v| problems.deserialize(v, "storage"))
            .unwrap_or_default();
        let log = section("log", &mut problems)
            .and_then(|v| problems.deserialize(v, "log"))
            .unwrap_or_default();
        let http = section("http", &mut problems)
            .and_then(|v| problems.deserialize(v, "http"))
            .unwrap_or_default();
        let display = section("display", &mut problems)
            .and_then(|v| problems.deserialize(v, "display"))
            .unwrap_or_default();
        let sync = section("sync", &mut problems).and_then(|v| problems.deserialize(v, "sync"));
        let mut tables = Tables::default();
        let mut sources = Vec::new();
        match root.remove("sources") {
            None => {}
            Some(Value::Array(list)) => {
                for (i, v) in list.into_iter().enumerate() {
                    let mut declared = Declared::of(&v);
                    if let Some(s) =
                        SourceConfig::from_json(v, &format!("sources[{i}]"), &mut problems)
                    {
                        sources.push(s);
                        declared.valid = true;
                    }
                    tables.sources.push(declared);
                }
            }
            Some(_) => problems.push("sources", "expected a list of `[[sources]]` tables"),
        }
        let mut alerts = Vec::new();
        match root.remove("alerts") {
            None => {}
            Some(Value::Array(list)) => {
                for (i, v) in list.into_iter().enumerate() {
                    tables.declare_alert(&v);
                    if let Some(a) = problems.deserialize(v, &format!("alerts[{i}]")) {
                        alerts.push(a);
                        if let Some(d) = tables.alerts.last_mut() {
                            d.valid = true;
                        }
                    }
                }
            }
            Some(_) => problems.push("alerts", "expected a list of `[[alerts]]` tables"),
        }
        let mut notifiers = Vec::new();
        match root.remove("notifiers") {
            None => {}
            Some(Value::Array(list)) => {
                for (i, v) in list.into_iter().enumerate() {
                    let mut declared = Declared::of(&v);
                    if let Some(n) =
                        NotifierConfig::from_json(v, &format!("notifiers[{i}]"), &mut problems)
                    {
                        notifiers.push(n);
                        declared.valid = true;
                    }
                    tables.notifiers.push(declared);
                }
            }
            Some(_) => problems.push("notifiers", "expected a list of `[[notifiers]]` tables"),
        }

        let config = Config {
            agent,
            storage,
            log,
            http,
            display,
            sources,
            sync,
            alerts,
            notifiers,
        };
        tables.check(&mut problems);
        config.validate_each(&tables, &mut problems);
        for (key, message) in problems.0 {
            errors.push(layers.error(&key, message));
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Checks that types alone cannot express, for a configuration built in code (every
    /// table valid and at its place).
    pub fn validate(&self, problems: &mut Problems) {
        let valid = |name: &str| Declared {
            name: Some(name.to_string()),
            valid: true,
        };
        let mut tables = Tables {
            sources: self.sources.iter().map(|s| valid(s.name())).collect(),
            notifiers: self.notifiers.iter().map(|n| valid(&n.name)).collect(),
            ..Default::default()
        };
        for rule in &self.alerts {
            tables.declare_alert(&serde_json::json!({
                "name": rule.name,
                "notifiers": rule.notifiers,
            }));
            if let Some(d) = tables.alerts.last_mut() {
                d.valid = true;
            }
        }
        tables.check(problems);
        self.validate_each(&tables, problems);
    }

    /// Checks each section and each valid table on its own; `tables` gives each parsed
    /// table's place in its list, so a problem is reported at the right key even when
    /// an earlier table of the list was invalid.
    fn validate_each(&self, tables: &Tables, problems: &mut Problems) {
        problems.check(
            "agent.gateway_id",
            check_identifier(&self.agent.gateway_id, "the gateway id"),
        );
        if self.agent.site.len() > 200 {
            problems.push("agent.site", "the site name is longer than 200 characters");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.push(
                "log.level",
                format!("not a valid log filter ({e}); try \"info\" or \"debug\""),
            );
        }
        self.storage.validate("storage", problems);
        self.http.validate("http", problems);
        self.display.validate("display", problems);
        if let Some(sync) = &self.sync {
            sync.validate("sync", problems);
        }
        let at = Tables::positions(&tables.sources);
        for (source, i) in self.sources.iter().zip(at) {
            source.validate(&format!("sources[{i}]"), problems);
        }
        let at = Tables::positions(&tables.notifiers);
        for (notifier, i) in self.notifiers.iter().zip(at) {
            notifier.validate(&format!("notifiers[{i}]"), problems);
        }
        let at = Tables::positions(&tables.alerts);
        for (rule, i) in self.alerts.iter().zip(at) {
            rule.validate(&format!("alerts[{i}]"), problems);
        }
    }

    /// The effective configuration as TOML, secrets shown as `<redacted>`.
    pub fn to_redacted_toml(&self) -> String {
        match toml::to_string_pretty(self) {
            Ok(s) => s,
            Err(e) => format!("# cannot print the configuration: {e}\n"),
        }
    }
}

/// Where the configuration lives: `--config`, `OUTPOST_CONFIG`, or the default.
pub fn resolve_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("OUTPOST_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humanized_messages() {
        assert_eq!(
            humanize("invalid type: string \"x\", expected u64"),
            "expected a whole number, found string \"x\""
        );
        assert_eq!(
            humanize("unknown field `foo`, expected one of `a`, `b`"),
            "unknown key `foo`; expected one of `a`, `b`"
        );
        assert_eq!(
            humanize("missing field `name`"),
            "the required key `name` is missing"
        );
    }

    #[test]
    fn misspellings_are_recognised() {
        assert_eq!(edit_distance("aplication_id", "application_id"), 1);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(
            closest_field(
                "unknown field `aplication_id`, expected one of `name`, `application_id`"
            ),
            Some("application_id".into())
        );
        assert_eq!(
            closest_field("unknown field `colour`, expected one of `name`, `period`"),
            None
        );
        assert_eq!(
            closest_field("unknown field `x`, there are no fields"),
            None
        );
    }

    #[test]
    fn identifiers() {
        assert!(check_identifier("site-01.a_b", "x").is_ok());
        assert!(check_identifier("", "x").is_err());
        assert!(check_identifier("a b", "x").is_err());
        assert!(check_identifier(&"a".repeat(65), "x").is_err());
        assert!(check_identifier("'; DROP TABLE", "x").is_err());
    }
}
