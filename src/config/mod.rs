//! The configuration: one TOML file (`/etc/outpost/outpost.toml`), optional drop-ins
//! (`conf.d/*.toml` beside it) and `OUTPOST__SECTION__KEY` environment overrides.
//!
//! Loading never stops at the first problem: every wrong type, unknown key, bad
//! duration, missing key, unset `${VAR}`, unreadable `*_file` and contradiction is
//! reported at once, each as `file:line: key.path: sentence` (G5).
//! `config/outpost.toml` in the repository documents every key.

pub mod http;
mod load;
mod tables;
#[cfg(test)]
mod tests;

pub use crate::settings::types;
pub use crate::settings::{check_identifier, quoted, ByteSize, HumanDuration, Problems, Secret};
pub use load::{expand_env, files, ConfigError, ConfigErrors, Origin, SECRET_KEYS};

use crate::alerts::AlertRule;
use crate::notify::NotifierConfig;
use crate::sources::SourceConfig;
use crate::store::StorageConfig;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tables::{Declared, Tables};

/// A log filter: a default level and levels per module, e.g.
/// `"info,outpost::sources=debug"` (`log.level`, `RUST_LOG`).
/// Each directive is a level, a module path, or `module=level`; anything else (e.g. the
/// span and field filters of `EnvFilter`) is refused rather than read as a module name.
pub fn log_filter(spec: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    use tracing_subscriber::filter::LevelFilter;
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (target, level) = match part.split_once('=') {
            Some((t, l)) => (t.trim(), Some(l.trim())),
            None => (part, None),
        };
        if level.is_none() && target.parse::<LevelFilter>().is_ok() {
            continue;
        }
        let module = |c: char| c.is_ascii_alphanumeric() || "_:-.".contains(c);
        if target.is_empty() || !target.chars().all(module) {
            return Err(format!("`{part}` is neither a level nor a module"));
        }
        if let Some(level) = level {
            level
                .parse::<LevelFilter>()
                .map_err(|e| format!("`{part}`: {e}"))?;
        }
    }
    spec.trim().parse().map_err(|e| format!("{e}"))
}

/// The default location of the main configuration file.
pub const DEFAULT_PATH: &str = "/etc/outpost/outpost.toml";

/// The whole agent configuration.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub struct Config {
    pub agent: AgentConfig,
    pub storage: StorageConfig,
    pub log: LogConfig,
    pub http: http::HttpConfig,
    pub display: crate::display::DisplayConfig,
    pub sources: Vec<SourceConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<crate::sync::SyncConfig>,
    pub alerts: Vec<AlertRule>,
    pub notifiers: Vec<NotifierConfig>,
    /// `[[devices]]`: names, locations and calibration due dates.
    pub devices: Vec<crate::report::DeviceConfig>,
    /// `[[reports]]`: the daily summary sent each morning.
    pub reports: Vec<crate::report::ReportConfig>,
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
    /// The IANA time zone of the site (e.g. `Europe/Berlin`): daily summaries cover
    /// local days, `[[reports]] at` is local time.
    #[serde(default = "default_timezone")]
    pub timezone: String,
}

fn default_timezone() -> String {
    crate::report::DEFAULT_TIMEZONE.to_string()
}

impl AgentConfig {
    /// The configured time zone (validated; UTC if it somehow is not).
    pub fn tz(&self) -> crate::report::Tz {
        crate::report::parse_timezone(&self.timezone).unwrap_or(crate::report::Tz::UTC)
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            gateway_id: default_gateway_id(),
            site: String::new(),
            timezone: default_timezone(),
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
    "devices",
    "reports",
];

impl Config {
    /// Every TLS server the configured sections connect to, as they declare them.
    pub fn tls_endpoints(&self) -> Vec<crate::tls::Endpoint> {
        let mut endpoints: Vec<crate::tls::Endpoint> = self
            .sources
            .iter()
            .flat_map(|s| s.tls_endpoints())
            .collect();
        endpoints.extend(self.sync.iter().map(|s| s.tls_endpoint()));
        endpoints.extend(self.notifiers.iter().flat_map(|n| n.tls_endpoints()));
        endpoints.extend(self.http.tls_endpoint());
        endpoints
    }

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
                    let path = format!("alerts[{i}]");
                    // A `preset` table expands to several ordinary rules.
                    let from_preset = crate::alerts::presets::is_preset(&v);
                    let rules = if from_preset {
                        crate::alerts::presets::expand_table(v, &path, &mut problems)
                    } else {
                        problems.deserialize(v, &path).map(|a| vec![a])
                    };
                    if let Some(rules) = rules {
                        for rule in rules {
                            alerts.push(rule);
                            tables.alert_rules_at.push(i);
                            tables.alert_rules_from_preset.push(from_preset);
                        }
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

        let mut devices = Vec::new();
        let mut device_at = Vec::new();
        match root.remove("devices") {
            None => {}
            Some(Value::Array(list)) => {
                for (i, v) in list.into_iter().enumerate() {
                    if let Some(d) = problems.deserialize(v, &format!("devices[{i}]")) {
                        devices.push(d);
                        device_at.push(i);
                    }
                }
            }
            Some(_) => problems.push("devices", "expected a list of `[[devices]]` tables"),
        }
        let mut reports = Vec::new();
        let mut report_at = Vec::new();
        match root.remove("reports") {
            None => {}
            Some(Value::Array(list)) => {
                for (i, v) in list.into_iter().enumerate() {
                    if let Some(r) = problems.deserialize(v, &format!("reports[{i}]")) {
                        reports.push(r);
                        report_at.push(i);
                    }
                }
            }
            Some(_) => problems.push("reports", "expected a list of `[[reports]]` tables"),
        }
        tables.devices = device_at;
        tables.reports = report_at;

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
            devices,
            reports,
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
                "escalation": rule.escalation,
            }));
            if let Some(d) = tables.alerts.last_mut() {
                d.valid = true;
            }
        }
        tables.devices = (0..self.devices.len()).collect();
        tables.reports = (0..self.reports.len()).collect();
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
        problems.check(
            "agent.timezone",
            crate::report::parse_timezone(&self.agent.timezone).map(|_| ()),
        );
        if let Err(e) = log_filter(&self.log.level) {
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
        // A preset table is several rules: each is checked at its table's position.
        let at = if tables.alert_rules_at.len() == self.alerts.len() {
            tables.alert_rules_at.clone()
        } else {
            Tables::positions(&tables.alerts)
        };
        for (rule, i) in self.alerts.iter().zip(&at) {
            rule.validate(&format!("alerts[{i}]"), problems);
        }
        crate::alerts::presets::check_unique_names(
            &self.alerts,
            &at,
            &tables.alert_rules_from_preset,
            problems,
        );
        let devices: Vec<(usize, &crate::report::DeviceConfig)> =
            tables.devices.iter().copied().zip(&self.devices).collect();
        for (i, device) in &devices {
            device.validate(&format!("devices[{i}]"), problems);
        }
        crate::report::validate_devices(&devices, problems);
        let notifier_names: Vec<&str> = self.notifiers.iter().map(|n| n.name.as_str()).collect();
        for (i, report) in tables.reports.iter().copied().zip(&self.reports) {
            report.validate(&format!("reports[{i}]"), problems);
            for (j, name) in report.notifiers.iter().enumerate() {
                if let Some(n) = self.notifiers.iter().find(|n| n.name == *name) {
                    if !crate::notify::DOCUMENT_TYPES.contains(&n.kind_name()) {
                        problems.push(
                            format!("reports[{i}].notifiers[{j}]"),
                            format!(
                                "{name:?} is a {} notifier; reports are sent by {} notifiers",
                                n.kind_name(),
                                crate::notify::DOCUMENT_TYPES.join(" or ")
                            ),
                        );
                    }
                } else if !notifier_names.contains(&name.as_str()) {
                    let shown: String = name.chars().take(64).collect();
                    problems.push(
                        format!("reports[{i}].notifiers[{j}]"),
                        format!(
                            "no `[[notifiers]]` table is named {shown:?}; known: {}",
                            if notifier_names.is_empty() {
                                "none".to_string()
                            } else {
                                quoted(&notifier_names)
                            }
                        ),
                    );
                }
            }
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

impl From<AgentConfig> for crate::sync::Gateway {
    fn from(agent: AgentConfig) -> crate::sync::Gateway {
        crate::sync::Gateway {
            gateway_id: agent.gateway_id,
            site: agent.site,
        }
    }
}
