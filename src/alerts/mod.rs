//! Local alerting (G3): rules from `[[alerts]]`, evaluated on the gateway against
//! committed readings, so a site stays protected while its internet link is down.
//!
//! - [`engine`]: the state machine (ok → pending → firing → resolved) per rule and
//!   series, driven by committed readings and a periodic tick.
//! - [`cumulative`]: the tally of cumulative rules (time out of range and excursions
//!   within a sliding window), kept with the engine's cursor.
//! - [`presets`]: `preset = "vaccine-fridge"` and the like, expanded to ordinary rules.
//! - [`state`]: its persistence in SQLite: alert state, the engine's reading cursor,
//!   events and their outbox rows, and the summary behind `outpost status`.
//!
//! Guarantees:
//! - **A restart neither re-fires nor forgets.** Every transition is written together
//!   with the cursor of the last reading evaluated, in one transaction; after a restart
//!   the engine resumes from that cursor with that state. A firing alert stays firing
//!   (no second firing event) and a pending timer keeps its start.
//! - **An event and its notifications are one write.** Each event row and one outbox row
//!   per notifier commit atomically (the `notify` module delivers them).
//! - **Reloaded rules keep their state** when their definition did not change: state is
//!   keyed by a hash of the rule's condition and scope ([`AlertRule::key`]), so editing
//!   severity, notifiers or reminders does not reset an alert.

pub mod ack;
pub mod cumulative;
pub mod engine;
pub mod escalation;
pub mod presets;
pub mod state;

use crate::model::Uid;
use crate::settings::{check_identifier, HumanDuration, Problems};
use chrono::{DateTime, Utc};
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub use engine::{engine_task, Engine, EventContext, Task};

/// One `[[alerts]]` rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// A unique name, shown in notifications and `outpost status` (letters, digits,
    /// `.`, `_`, `-`, `:`).
    pub name: String,
    /// `threshold` (with `above` or `below`), `stale` (with `after`), `rate` (with
    /// `delta` and `period`) or `cumulative` (with `above` or `below`, `total` or
    /// `count`, and `within`).
    pub kind: RuleKind,
    /// Device ids this rule watches; globs like `coldroom-*` work. Default: all.
    #[serde(default = "default_devices")]
    pub devices: Vec<String>,
    /// Only readings whose device carries all these tags (`key` or `key=value`, as the
    /// network server reports them in the reading's `meta.tags`, e.g. ChirpStack device
    /// tags). Default: no tag filter.
    #[serde(default)]
    pub tags: Vec<String>,
    /// The metric, as stored (e.g. `temperature`).
    pub metric: String,
    /// threshold: the alert condition is a value strictly above this level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    /// threshold: the alert condition is a value strictly below this level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    /// threshold and rate: the level at which a firing alert resolves (hysteresis). With
    /// `above`, the alert resolves at or below `clear` (so `clear` must not be above
    /// `above`); with `below`, at or above it. Default: the alert level itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clear: Option<f64>,
    /// threshold and rate: how long the condition must hold without interruption before
    /// the alert fires. Default: fire on the first reading.
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub hold: Option<HumanDuration>,
    /// stale: fire when a device sent no reading of `metric` for this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<HumanDuration>,
    /// rate: fire when the value rose by at least `delta` (or, when negative, fell by at
    /// least `-delta`) within `period`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<f64>,
    /// rate: the window the change is measured over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<HumanDuration>,
    /// cumulative: fire when the time out of range within `within` reaches this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<HumanDuration>,
    /// cumulative: fire when the number of distinct excursions within `within` reaches
    /// this (instead of `total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// cumulative: the sliding window, ending at the series' newest reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<HumanDuration>,
    /// cumulative: readings further apart than this leave the time between them
    /// unknown (counted neither in nor out of range). Default: 1h.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gap: Option<HumanDuration>,
    /// `critical`, `warning` or `info`; shown in notifications.
    #[serde(default)]
    pub severity: Severity,
    /// Names of `[[notifiers]]` that receive this rule's events. Empty: the alert shows
    /// in `outpost status` only.
    #[serde(default)]
    pub notifiers: Vec<String>,
    /// While the alert keeps firing, notify again this often. Default: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reminder: Option<HumanDuration>,
    /// Escalation steps (`[[alerts.escalation]]`), in order: each is sent once to its
    /// notifiers if the alert is still firing and unacknowledged `after` its firing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub escalation: Vec<escalation::EscalationStep>,
}

fn default_devices() -> Vec<String> {
    vec!["*".into()]
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RuleKind {
    Threshold,
    Stale,
    Rate,
    Cumulative,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Threshold => "threshold",
            RuleKind::Stale => "stale",
            RuleKind::Rate => "rate",
            RuleKind::Cumulative => "cumulative",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    #[default]
    Warning,
    Info,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// Most samples a rate rule keeps per series; beyond it the oldest go first (the window
/// is then shorter than `period`, never the memory larger).
pub const MAX_RATE_SAMPLES: usize = 4096;

/// Reminders more often than this would flood a phone.
const MIN_REMINDER: Duration = Duration::from_secs(60);
/// Tags and globs per rule: more is a configuration mistake.
const MAX_SCOPE_ITEMS: usize = 256;

impl AlertRule {
    /// The hash that keys this rule's persisted state: everything that decides *whether*
    /// the alert holds (kind, scope, levels, durations), not who is told or how often.
    pub fn key(&self) -> String {
        let mut identity = serde_json::json!({
            "name": self.name, "kind": self.kind, "devices": self.devices, "tags": self.tags,
            "metric": self.metric, "above": self.above, "below": self.below, "clear": self.clear,
            "for": self.hold.map(|d| d.get().as_millis() as u64),
            "after": self.after.map(|d| d.get().as_millis() as u64),
            "delta": self.delta, "period": self.period.map(|d| d.get().as_millis() as u64),
        });
        // Only when set, so the keys of the older kinds (and their saved state) stay.
        for (key, value) in [
            ("total", self.total.map(|d| d.get().as_millis() as u64)),
            ("count", self.count.map(u64::from)),
            ("within", self.within.map(|d| d.get().as_millis() as u64)),
            ("max_gap", self.max_gap.map(|d| d.get().as_millis() as u64)),
        ] {
            if let (Some(v), Some(map)) = (value, identity.as_object_mut()) {
                map.insert(key.into(), v.into());
            }
        }
        Uid::derive(&["alert-rule", &identity.to_string()]).to_hex()
    }

    /// Checks one rule on its own. Its names and its references to notifiers are
    /// checked with the other tables by `config` (they must be seen even when this
    /// table has a problem of its own).
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.check(
            format!("{path}.name"),
            check_identifier(&self.name, "the rule name"),
        );
        problems.check(
            format!("{path}.metric"),
            check_identifier(&self.metric, "the metric"),
        );
        if self.devices.is_empty() {
            problems.push(
                format!("{path}.devices"),
                "list at least one device or glob (\"*\" for all)",
            );
        }
        if self.devices.len() > MAX_SCOPE_ITEMS {
            problems.push(
                format!("{path}.devices"),
                format!("at most {MAX_SCOPE_ITEMS} entries"),
            );
        }
        for (i, glob) in self.devices.iter().enumerate() {
            if glob.is_empty() || glob.len() > 128 {
                problems.push(
                    format!("{path}.devices[{i}]"),
                    "must be 1 to 128 characters",
                );
            } else if let Err(e) = Glob::new(glob) {
                problems.push(
                    format!("{path}.devices[{i}]"),
                    format!("not a valid glob: {}", e.kind()),
                );
            }
        }
        if self.tags.len() > MAX_SCOPE_ITEMS {
            problems.push(
                format!("{path}.tags"),
                format!("at most {MAX_SCOPE_ITEMS} entries"),
            );
        }
        for (i, tag) in self.tags.iter().enumerate() {
            let key = tag.split_once('=').map_or(tag.as_str(), |(k, _)| k);
            if key.is_empty() || tag.len() > 256 {
                problems.push(
                    format!("{path}.tags[{i}]"),
                    "write `key` or `key=value` (at most 256 characters)",
                );
            }
        }
        escalation::validate(&self.escalation, path, problems);
        if let Some(r) = self.reminder {
            if r.get() < MIN_REMINDER {
                problems.push(
                    format!("{path}.reminder"),
                    format!("must be at least 1m, found {r}"),
                );
            }
        }
        for (key, value) in [
            ("above", self.above),
            ("below", self.below),
            ("clear", self.clear),
            ("delta", self.delta),
        ] {
            if value.is_some_and(|v| !v.is_finite()) {
                problems.push(format!("{path}.{key}"), "must be a finite number");
            }
        }
        let mut not_for = |key: &str, set: bool, kind: &str| {
            if set {
                problems.push(
                    format!("{path}.{key}"),
                    format!("does not apply to a {kind} rule; remove it"),
                );
            }
        };
        if self.kind != RuleKind::Cumulative {
            for (key, set) in [
                ("total", self.total.is_some()),
                ("count", self.count.is_some()),
                ("within", self.within.is_some()),
                ("max_gap", self.max_gap.is_some()),
            ] {
                not_for(key, set, self.kind.as_str());
            }
        }
        match self.kind {
            RuleKind::Cumulative => {
                not_for("after", self.after.is_some(), "cumulative");
                not_for("delta", self.delta.is_some(), "cumulative");
                not_for("period", self.period.is_some(), "cumulative");
                not_for("for", self.hold.is_some(), "cumulative");
                self.check_side(path, "cumulative", problems);
                cumulative::validate(self, path, problems);
            }
            RuleKind::Threshold => {
                not_for("after", self.after.is_some(), "threshold");
                not_for("delta", self.delta.is_some(), "threshold");
                not_for("period", self.period.is_some(), "threshold");
                self.check_side(path, "threshold", problems);
            }
            RuleKind::Stale => {
                for (key, set) in [
                    ("above", self.above.is_some()),
                    ("below", self.below.is_some()),
                    ("clear", self.clear.is_some()),
                    ("for", self.hold.is_some()),
                    ("delta", self.delta.is_some()),
                    ("period", self.period.is_some()),
                ] {
                    not_for(key, set, "stale");
                }
                match self.after {
                    None => problems.push(
                        format!("{path}.after"),
                        "a stale rule needs `after` (e.g. \"15m\")",
                    ),
                    Some(a) if a.get() < Duration::from_secs(1) => {
                        problems.push(format!("{path}.after"), "must be at least 1s")
                    }
                    Some(_) => {}
                }
            }
            RuleKind::Rate => {
                not_for("above", self.above.is_some(), "rate");
                not_for("below", self.below.is_some(), "rate");
                not_for("after", self.after.is_some(), "rate");
                match self.delta {
                    None => problems.push(
                        format!("{path}.delta"),
                        "a rate rule needs `delta` (a rise, or a fall when negative)",
                    ),
                    Some(0.0) => problems.push(format!("{path}.delta"), "must not be 0"),
                    Some(d) => {
                        if let Some(clear) = self.clear {
                            if (d > 0.0 && clear > d) || (d < 0.0 && clear < d) {
                                problems.push(
                                    format!("{path}.clear"),
                                    format!("clear level {clear} is beyond the alert change {d}; it must lie between 0 and `delta`"),
                                );
                            }
                        }
                    }
                }
                match self.period {
                    None => problems.push(
                        format!("{path}.period"),
                        "a rate rule needs `period` (e.g. \"10m\")",
                    ),
                    Some(p)
                        if p.get() < Duration::from_secs(1)
                            || p.get() > Duration::from_secs(7 * 86400) =>
                    {
                        problems.push(format!("{path}.period"), "must be between 1s and 7d")
                    }
                    Some(_) => {}
                }
            }
        }
    }
}

impl AlertRule {
    /// `above` or `below` (one of them) and a `clear` on the right side of it.
    fn check_side(&self, path: &str, kind: &str, problems: &mut Problems) {
        match (self.above, self.below) {
            (None, None) => problems.push(
                format!("{path}.above"),
                format!("a {kind} rule needs `above` or `below`"),
            ),
            (Some(_), Some(_)) => problems.push(
                format!("{path}.below"),
                "set either `above` or `below`, not both (write two rules)",
            ),
            (Some(above), None) => {
                if let Some(clear) = self.clear.filter(|c| *c > above) {
                    problems.push(
                        format!("{path}.clear"),
                        format!("clear level {clear} is above the alert level {above}: with `above`, the alert resolves at or below `clear`, so it must not be higher"),
                    );
                }
            }
            (None, Some(below)) => {
                if let Some(clear) = self.clear.filter(|c| *c < below) {
                    problems.push(
                        format!("{path}.clear"),
                        format!("clear level {clear} is below the alert level {below}: with `below`, the alert resolves at or above `clear`, so it must not be lower"),
                    );
                }
            }
        }
    }
}

/// Which side of a level is the alert side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Above,
    Below,
}

impl Direction {
    fn breaches(self, value: f64, level: f64) -> bool {
        match self {
            Direction::Above => value > level,
            Direction::Below => value < level,
        }
    }
    fn clears(self, value: f64, clear: f64) -> bool {
        match self {
            Direction::Above => value <= clear,
            Direction::Below => value >= clear,
        }
    }
}

/// A rule's condition, checked and ready for the engine.
#[derive(Debug, Clone)]
pub enum Condition {
    Threshold {
        direction: Direction,
        level: f64,
        clear: f64,
        hold: Duration,
    },
    Stale {
        after: Duration,
    },
    Rate {
        direction: Direction,
        delta: f64,
        clear: f64,
        period: Duration,
        hold: Duration,
    },
    /// Fires when the window's time out of range reaches `limit` (or its excursions
    /// reach a count); resolves when it falls back under.
    Cumulative {
        direction: Direction,
        level: f64,
        /// Where an excursion ends (the alert level unless `clear` is set).
        clear: f64,
        limit: CumulativeLimit,
        within: Duration,
        max_gap: Duration,
    },
}

/// What a cumulative rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CumulativeLimit {
    Total(Duration),
    Count(u32),
}

/// A rule compiled for evaluation: globs built, condition resolved, state key computed.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    pub def: AlertRule,
    pub key: String,
    devices: GlobSet,
    tags: Vec<(String, Option<String>)>,
    pub condition: Condition,
}

impl CompiledRule {
    /// Compiles a validated rule. Fails only on what validation rejects.
    pub fn new(def: &AlertRule) -> Result<CompiledRule, String> {
        let mut builder = GlobSetBuilder::new();
        for glob in &def.devices {
            builder.add(Glob::new(glob).map_err(|e| format!("{}: {e}", def.name))?);
        }
        let devices = builder.build().map_err(|e| format!("{}: {e}", def.name))?;
        let tags = def
            .tags
            .iter()
            .map(|t| match t.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (t.clone(), None),
            })
            .collect();
        let hold = def.hold.map(HumanDuration::get).unwrap_or_default();
        let condition = match def.kind {
            RuleKind::Threshold => match (def.above, def.below) {
                (Some(level), None) => Condition::Threshold {
                    direction: Direction::Above,
                    level,
                    clear: def.clear.unwrap_or(level),
                    hold,
                },
                (None, Some(level)) => Condition::Threshold {
                    direction: Direction::Below,
                    level,
                    clear: def.clear.unwrap_or(level),
                    hold,
                },
                _ => {
                    return Err(format!(
                        "{}: set exactly one of `above` and `below`",
                        def.name
                    ))
                }
            },
            RuleKind::Cumulative => {
                let (direction, level) = match (def.above, def.below) {
                    (Some(level), None) => (Direction::Above, level),
                    (None, Some(level)) => (Direction::Below, level),
                    _ => {
                        return Err(format!(
                            "{}: set exactly one of `above` and `below`",
                            def.name
                        ))
                    }
                };
                let limit = match (def.total, def.count) {
                    (Some(total), None) => CumulativeLimit::Total(total.get()),
                    (None, Some(count)) => CumulativeLimit::Count(count),
                    _ => {
                        return Err(format!(
                            "{}: set exactly one of `total` and `count`",
                            def.name
                        ))
                    }
                };
                Condition::Cumulative {
                    direction,
                    level,
                    clear: def.clear.unwrap_or(level),
                    limit,
                    within: def
                        .within
                        .ok_or_else(|| format!("{}: `within` is missing", def.name))?
                        .get(),
                    max_gap: def
                        .max_gap
                        .map_or(cumulative::DEFAULT_MAX_GAP, HumanDuration::get),
                }
            }
            RuleKind::Stale => Condition::Stale {
                after: def
                    .after
                    .ok_or_else(|| format!("{}: `after` is missing", def.name))?
                    .get(),
            },
            RuleKind::Rate => {
                let delta = def
                    .delta
                    .ok_or_else(|| format!("{}: `delta` is missing", def.name))?;
                Condition::Rate {
                    direction: if delta > 0.0 {
                        Direction::Above
                    } else {
                        Direction::Below
                    },
                    delta,
                    clear: def.clear.unwrap_or(delta),
                    period: def
                        .period
                        .ok_or_else(|| format!("{}: `period` is missing", def.name))?
                        .get(),
                    hold,
                }
            }
        };
        Ok(CompiledRule {
            key: def.key(),
            def: def.clone(),
            devices,
            tags,
            condition,
        })
    }

    /// Whether a reading of `device`/`metric` with `meta` is in this rule's scope.
    pub fn matches(&self, device: &str, metric: &str, meta: Option<&serde_json::Value>) -> bool {
        self.matches_with(device, metric, || meta)
    }

    /// [`CompiledRule::matches`] for a reading: its meta (parsed from its text on
    /// first use, see [`crate::model::Meta`]) is read only by a rule with tags, and
    /// only once the metric and device match. Readings are shown to rules on the store
    /// writer's thread too (a reading that may change an alert commits at once).
    pub fn matches_reading(&self, r: &crate::model::Reading) -> bool {
        self.matches_with(&r.device, &r.metric, || r.meta.as_deref())
    }

    /// The metric, then the device, then (only for a rule with tags) the meta.
    fn matches_with<'m>(
        &self,
        device: &str,
        metric: &str,
        meta: impl FnOnce() -> Option<&'m serde_json::Value>,
    ) -> bool {
        metric == self.def.metric
            && self.devices.is_match(device)
            && (self.tags.is_empty() || self.tags_match(meta()))
    }

    fn tags_match(&self, meta: Option<&serde_json::Value>) -> bool {
        let Some(tags) = meta.and_then(|m| m.get("tags")).and_then(|t| t.as_object()) else {
            return false;
        };
        self.tags.iter().all(|(k, v)| match (tags.get(k), v) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(serde_json::Value::String(s)), Some(v)) => s == v,
            (Some(other), Some(v)) => {
                serde_json::from_str::<serde_json::Value>(v).ok().as_ref() == Some(other)
            }
        })
    }

    /// "above 8 °C for 5m" — the condition as a technician reads it.
    pub fn describe(&self, unit: Option<&str>, precision: Option<u8>) -> String {
        let with_unit = |v: f64| crate::display::format_value(v, unit, precision);
        let hold = |d: Duration| {
            if d.is_zero() {
                String::new()
            } else {
                format!(" for {}", humantime::format_duration(d))
            }
        };
        match &self.condition {
            Condition::Threshold {
                direction,
                level,
                hold: h,
                ..
            } => {
                let side = if *direction == Direction::Above {
                    "above"
                } else {
                    "below"
                };
                format!("{side} {}{}", with_unit(*level), hold(*h))
            }
            Condition::Stale { after } => {
                format!("no reading for {}", humantime::format_duration(*after))
            }
            Condition::Cumulative {
                direction,
                level,
                limit,
                within,
                ..
            } => {
                let side = if *direction == Direction::Above {
                    "above"
                } else {
                    "below"
                };
                let within = humantime::format_duration(*within);
                match limit {
                    CumulativeLimit::Total(total) => format!(
                        "{side} {} for {} in total within {within}",
                        with_unit(*level),
                        humantime::format_duration(*total)
                    ),
                    CumulativeLimit::Count(n) => format!(
                        "{n} excursions {side} {} within {within}",
                        with_unit(*level)
                    ),
                }
            }
            Condition::Rate {
                delta,
                period,
                hold: h,
                ..
            } => {
                let verb = if *delta > 0.0 { "rose" } else { "fell" };
                format!(
                    "{verb} by {} within {}{}",
                    with_unit(delta.abs()),
                    humantime::format_duration(*period),
                    hold(*h)
                )
            }
        }
    }

    /// The alert level reported in events (the threshold, the change, none for stale).
    pub fn threshold(&self) -> Option<f64> {
        match &self.condition {
            Condition::Threshold { level, .. } | Condition::Cumulative { level, .. } => {
                Some(*level)
            }
            Condition::Rate { delta, .. } => Some(*delta),
            Condition::Stale { .. } => None,
        }
    }
}

/// What happened to an alert; the `kind` of an event.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Firing,
    Reminder,
    Resolved,
    /// A person acknowledged the firing alert (`actor`, `note`, `channel` say who,
    /// why and how); stored and synced, not sent to notifiers.
    Acknowledged,
    /// An escalation step was sent (to that step's notifiers).
    Escalated,
    /// Sent by `outpost notify-test`; never stored.
    Test,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Firing => "firing",
            EventKind::Reminder => "reminder",
            EventKind::Resolved => "resolved",
            EventKind::Acknowledged => "acknowledged",
            EventKind::Escalated => "escalated",
            EventKind::Test => "test",
        }
    }
}

/// An alert event as stored in `alert_events.message` and sent to notifiers (the webhook
/// body, the exec notifier's stdin).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AlertEvent {
    /// Stable: derived from rule, series, kind and transition time (G2).
    pub uid: String,
    pub kind: EventKind,
    pub rule: String,
    pub severity: Severity,
    pub site: String,
    pub gateway_id: String,
    pub device: String,
    pub metric: String,
    /// The value that triggered the event (for stale alerts: the last value seen).
    pub value: Option<f64>,
    pub unit: Option<String>,
    /// The alert level (threshold, or change for rate rules); none for stale rules.
    pub threshold: Option<f64>,
    /// The condition in words, e.g. "above 8 °C for 5m".
    pub condition: String,
    /// Decimals to show `value` and `threshold` with (`[display] precision` of the
    /// metric); none: the default rule of [`crate::display`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<u8>,
    /// When the alert started firing (for a firing event: now).
    pub since: DateTime<Utc>,
    /// When this event happened.
    pub at: DateTime<Utc>,
    /// Acknowledged events: who acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Acknowledged events: the note given with it; escalated events: which step
    /// ("escalation step 1 of 2").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Acknowledged events: `cli`, `console` or `central`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
}

pub use crate::clock::Clock;

/// Whether the next escalation step of `rule` (after `sent` steps) is due at `now` for
/// an alert that fired at `fired_at`.
pub fn escalation_due(
    rule: &CompiledRule,
    sent: u32,
    fired_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> bool {
    let (Some(step), Some(fired_at)) = (rule.def.escalation.get(sent as usize), fired_at) else {
        return false;
    };
    (now - fired_at).to_std().unwrap_or_default() >= step.after.get()
}

/// A temperature reading of `device` at `t` for the alerting unit tests (engine,
/// acknowledgement, cumulative rules).
#[cfg(test)]
pub(crate) fn test_reading(device: &str, value: f64, t: DateTime<Utc>) -> crate::model::Reading {
    crate::model::Reading {
        uid: Uid::derive(&[device, &t.to_rfc3339(), &value.to_string()]),
        source: "sim".into(),
        device: device.into(),
        metric: "temperature".into(),
        value,
        unit: Some("°C".into()),
        observed_at: t,
        received_at: t,
        flags: 0,
        meta: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(toml_text: &str) -> AlertRule {
        toml::from_str(toml_text).unwrap()
    }

    fn problems_of(rule: &AlertRule) -> Vec<(String, String)> {
        let mut p = Problems::default();
        rule.validate("alerts[0]", &mut p);
        p.0
    }

    const WARM: &str = r#"
        name = "coldroom-warm"
        kind = "threshold"
        devices = ["coldroom-*"]
        metric = "temperature"
        above = 8.0
        clear = 6.0
        for = "5m"
        severity = "critical"
        notifiers = ["ops"]
        reminder = "1h"
    "#;

    #[test]
    fn a_good_rule_validates_and_compiles() {
        let r = rule(WARM);
        assert!(problems_of(&r).is_empty());
        let c = CompiledRule::new(&r).unwrap();
        assert!(c.matches("coldroom-1", "temperature", None));
        assert!(!c.matches("freezer-1", "temperature", None));
        assert!(!c.matches("coldroom-1", "humidity", None));
        assert_eq!(c.describe(Some("°C"), None), "above 8 °C for 5m");
        assert_eq!(c.describe(Some("°C"), Some(1)), "above 8.0 °C for 5m");
    }

    #[test]
    fn clear_on_the_wrong_side_is_rejected() {
        let mut r = rule(WARM);
        r.clear = Some(9.0);
        let p = problems_of(&r);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "alerts[0].clear");
        assert!(p[0].1.contains("above the alert level"), "{}", p[0].1);

        let mut r = rule(WARM);
        r.above = None;
        r.below = Some(2.0);
        r.clear = Some(1.0);
        let p = problems_of(&r);
        assert!(p[0].1.contains("below the alert level"), "{p:?}");
    }

    #[test]
    fn contradictions_are_all_reported() {
        let mut r = rule(WARM);
        r.after = Some(HumanDuration::from_secs(5));
        r.above = Some(f64::NAN);
        r.reminder = Some(HumanDuration::from_secs(1));
        r.devices = vec!["[".into()];
        let p = problems_of(&r);
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        for k in [
            "alerts[0].after",
            "alerts[0].above",
            "alerts[0].reminder",
            "alerts[0].devices[0]",
        ] {
            assert!(keys.contains(&k), "{k} missing from {p:?}");
        }
    }

    #[test]
    fn kind_specific_keys() {
        let stale = rule("name = \"s\"\nkind = \"stale\"\nmetric = \"t\"\nafter = \"15m\"");
        assert!(problems_of(&stale).is_empty());
        let mut bad = stale.clone();
        bad.after = None;
        bad.hold = Some(HumanDuration::from_secs(1));
        let p = problems_of(&bad);
        assert!(p.iter().any(|(k, _)| k == "alerts[0].after"));
        assert!(p.iter().any(|(k, _)| k == "alerts[0].for"));

        let rate = rule("name = \"r\"\nkind = \"rate\"\nmetric = \"t\"\ndelta = 2.0\nperiod = \"10m\"\nclear = 1.0");
        assert!(problems_of(&rate).is_empty());
        let mut bad = rate.clone();
        bad.delta = Some(0.0);
        bad.period = None;
        assert_eq!(problems_of(&bad).len(), 2);
        let mut bad = rate.clone();
        bad.clear = Some(3.0);
        assert!(problems_of(&bad)[0].1.contains("beyond"));

        let none = rule("name = \"t\"\nkind = \"threshold\"\nmetric = \"t\"");
        assert_eq!(problems_of(&none)[0].0, "alerts[0].above");
    }

    #[test]
    fn hostile_names_and_unknown_keys() {
        let mut r = rule(WARM);
        r.name = "'; DROP TABLE alert_state; --".into();
        r.metric = String::new();
        r.tags = vec!["=x".into(), "k".repeat(300)];
        let p = problems_of(&r);
        assert!(p.iter().any(|(k, _)| k == "alerts[0].name"));
        assert!(p.iter().any(|(k, _)| k == "alerts[0].metric"));
        assert!(p.iter().any(|(k, _)| k == "alerts[0].tags[0]"));
        assert!(p.iter().any(|(k, _)| k == "alerts[0].tags[1]"));
        assert!(toml::from_str::<AlertRule>(
            "name = \"x\"\nkind = \"threshold\"\nmetric = \"t\"\nabove = 1\nabov = 2"
        )
        .is_err());
        assert!(
            toml::from_str::<AlertRule>("name = \"x\"\nkind = \"spike\"\nmetric = \"t\"").is_err()
        );
        assert!(toml::from_str::<AlertRule>(
            "name = \"x\"\nkind = \"threshold\"\nmetric = \"t\"\nabove = \"hot\""
        )
        .is_err());
    }

    #[test]
    fn tags_match_meta() {
        let mut r = rule(WARM);
        r.tags = vec!["zone=north".into(), "critical".into()];
        let c = CompiledRule::new(&r).unwrap();
        let meta = serde_json::json!({"tags": {"zone": "north", "critical": "yes"}});
        assert!(c.matches("coldroom-1", "temperature", Some(&meta)));
        let meta = serde_json::json!({"tags": {"zone": "south", "critical": "yes"}});
        assert!(!c.matches("coldroom-1", "temperature", Some(&meta)));
        assert!(!c.matches("coldroom-1", "temperature", None));
    }

    #[test]
    fn key_ignores_who_is_told_but_not_the_condition() {
        let r = rule(WARM);
        let mut told = r.clone();
        told.notifiers.clear();
        told.severity = Severity::Info;
        told.reminder = None;
        assert_eq!(r.key(), told.key());
        let mut changed = r.clone();
        changed.above = Some(9.0);
        assert_ne!(r.key(), changed.key());
    }
}
