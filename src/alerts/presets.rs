//! Presets for common classes of cold-chain equipment: an `[[alerts]]` table with
//! `preset = "vaccine-fridge"` expands to ordinary rules (a high and a low
//! single-excursion threshold with a delay, a cumulative rule, and a stale rule for
//! holes in the record), so a site gets the usual alarms from one table. The numbers
//! and their sources are in docs/configuration.md ("Presets"); `outpost check` prints
//! the expanded rules.
//!
//! Expanded rules are named `NAME:high`, `NAME:low`, `NAME:cumulative` and
//! `NAME:stale`; their state is keyed like any rule's, so changing an override starts
//! that rule afresh and leaves the others alone.

use super::{AlertRule, RuleKind, Severity};
use crate::settings::{closest_choice, HumanDuration, Problems};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One class of equipment: its range, delays and windows. Levels in °C.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Preset {
    pub name: &'static str,
    /// Fire when above this for `high_for`.
    pub high: f64,
    pub high_for: u64,
    /// Fire when below this for `low_for` (none: no low rule).
    pub low: Option<f64>,
    pub low_for: u64,
    /// The cumulative rule: above this level for `total` within `within`.
    pub cumulative_above: f64,
    pub total: u64,
    pub within: u64,
    /// The stale rule: no reading for this long.
    pub stale_after: u64,
}

const MIN: u64 = 60;
const HOUR: u64 = 3600;

/// The presets. Sources (see docs/configuration.md): CDC Vaccine Storage and Handling
/// Toolkit (2–8 °C, −50 to −15 °C for varicella/MMRV, data loggers logging at least
/// every 30 minutes); FDA Food Code 3-501.16 (cold holding at 5 °C / 41 °F or below);
/// UK FSA (chilled food at 8 °C or below by law); Codex CXC 8-1976 and EU Directive
/// 89/108/EEC (quick-frozen food at −18 °C or colder, brief rises of at most 3 °C).
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "vaccine-fridge",
        high: 8.0,
        high_for: 15 * MIN,
        low: Some(2.0),
        low_for: 15 * MIN,
        cumulative_above: 8.0,
        total: HOUR,
        within: 24 * HOUR,
        stale_after: 30 * MIN,
    },
    Preset {
        name: "vaccine-freezer",
        high: -15.0,
        high_for: 15 * MIN,
        low: Some(-50.0),
        low_for: 15 * MIN,
        cumulative_above: -15.0,
        total: HOUR,
        within: 24 * HOUR,
        stale_after: 30 * MIN,
    },
    Preset {
        name: "food-cold-room",
        high: 8.0,
        high_for: 30 * MIN,
        low: None,
        low_for: 0,
        cumulative_above: 5.0,
        total: 2 * HOUR,
        within: 24 * HOUR,
        stale_after: HOUR,
    },
    Preset {
        name: "food-freezer",
        high: -15.0,
        high_for: 30 * MIN,
        low: None,
        low_for: 0,
        cumulative_above: -18.0,
        total: 2 * HOUR,
        within: 24 * HOUR,
        stale_after: HOUR,
    },
];

/// An `[[alerts]]` table with `preset`: the equipment class, the scope, who is told,
/// and optional overrides of the preset's numbers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PresetEntry {
    /// `vaccine-fridge`, `vaccine-freezer`, `food-cold-room` or `food-freezer`.
    pub preset: String,
    /// The base name: the rules are `NAME:high`, `NAME:low`, `NAME:cumulative`,
    /// `NAME:stale` (at most 54 characters, to leave room for the suffix).
    pub name: String,
    #[serde(default = "super::default_devices")]
    pub devices: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Default: `temperature`.
    #[serde(default = "default_metric")]
    pub metric: String,
    #[serde(default)]
    pub notifiers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reminder: Option<HumanDuration>,
    /// Escalation steps given to every rule of the preset (`[[alerts.escalation]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub escalation: Vec<super::escalation::EscalationStep>,
    /// Override: the upper limit (the high rule and the cumulative rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    /// Override: the lower limit (adds a low rule to presets without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    /// Override: the delay of the high and low rules.
    #[serde(default, rename = "for", skip_serializing_if = "Option::is_none")]
    pub hold: Option<HumanDuration>,
    /// Override: the cumulative rule's total.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<HumanDuration>,
    /// Override: the cumulative rule's window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<HumanDuration>,
    /// Override: the stale rule's silence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<HumanDuration>,
}

fn default_metric() -> String {
    "temperature".into()
}

/// The names of the presets, for messages.
pub fn names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

pub fn find(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name == name)
}

/// Whether an `[[alerts]]` table as written is a preset (it has a `preset` key).
pub fn is_preset(table: &Value) -> bool {
    table.get("preset").is_some()
}

/// Parses a preset table at `path` and expands it; every problem goes to `problems`.
/// The rules are validated by the caller like any rule (at `path`, so a bad override
/// is reported at its own key).
pub fn expand_table(table: Value, path: &str, problems: &mut Problems) -> Option<Vec<AlertRule>> {
    let entry: PresetEntry = problems.deserialize(table, path)?;
    let Some(preset) = find(&entry.preset) else {
        let mut message = format!(
            "unknown preset {:?}; expected one of {}",
            entry.preset.chars().take(64).collect::<String>(),
            crate::settings::quoted(&names())
        );
        if let Some(meant) = closest_choice(&entry.preset, &names()) {
            message = format!("{message}; did you mean {meant:?}?");
        }
        problems.push(format!("{path}.preset"), message);
        return None;
    };
    if entry.name.len() > 54 {
        problems.push(
            format!("{path}.name"),
            "a preset's name is at most 54 characters (its rules add `:cumulative`)",
        );
        return None;
    }
    let high = entry.above.unwrap_or(preset.high);
    if let Some(low) = entry.below.or(preset.low) {
        if low.is_finite() && high.is_finite() && low >= high {
            problems.push(
                format!("{path}.below"),
                format!("the lower limit {low} is not below the upper limit {high}"),
            );
            return None;
        }
    }
    Some(expand(&entry, preset))
}

/// The rules `entry` expands to with `preset`'s numbers and the entry's overrides.
pub fn expand(entry: &PresetEntry, preset: &Preset) -> Vec<AlertRule> {
    let secs = HumanDuration::from_secs;
    let rule = |suffix: &str, kind: RuleKind| AlertRule {
        name: format!("{}:{suffix}", entry.name),
        kind,
        devices: entry.devices.clone(),
        tags: entry.tags.clone(),
        metric: entry.metric.clone(),
        above: None,
        below: None,
        clear: None,
        hold: None,
        after: None,
        delta: None,
        period: None,
        total: None,
        count: None,
        within: None,
        max_gap: None,
        severity: Severity::Critical,
        notifiers: entry.notifiers.clone(),
        reminder: entry.reminder,
        escalation: entry.escalation.clone(),
    };
    let mut rules = Vec::new();
    rules.push(AlertRule {
        above: Some(entry.above.unwrap_or(preset.high)),
        hold: Some(entry.hold.unwrap_or(secs(preset.high_for))),
        ..rule("high", RuleKind::Threshold)
    });
    if let Some(low) = entry.below.or(preset.low) {
        rules.push(AlertRule {
            below: Some(low),
            hold: Some(
                entry
                    .hold
                    .unwrap_or(secs(preset.low_for.max(preset.high_for))),
            ),
            ..rule("low", RuleKind::Threshold)
        });
    }
    rules.push(AlertRule {
        above: Some(entry.above.unwrap_or(preset.cumulative_above)),
        total: Some(entry.total.unwrap_or(secs(preset.total))),
        within: Some(entry.within.unwrap_or(secs(preset.within))),
        ..rule("cumulative", RuleKind::Cumulative)
    });
    rules.push(AlertRule {
        after: Some(entry.after.unwrap_or(secs(preset.stale_after))),
        severity: Severity::Warning,
        ..rule("stale", RuleKind::Stale)
    });
    rules
}

/// Rule names must be unique after expansion too: a preset's `NAME:high` may collide
/// with a rule written by hand or another preset. `at` gives each rule's table
/// position; `from_preset` whether that table was a preset.
pub fn check_unique_names(
    rules: &[AlertRule],
    at: &[usize],
    from_preset: &[bool],
    problems: &mut Problems,
) {
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, rule) in rules.iter().enumerate() {
        match seen.get(rule.name.as_str()) {
            Some(&first)
                if from_preset.get(i).copied().unwrap_or(false)
                    || from_preset.get(first).copied().unwrap_or(false) =>
            {
                let (here, there) = (
                    at.get(i).copied().unwrap_or(i),
                    at.get(first).copied().unwrap_or(first),
                );
                problems.push(
                    format!("alerts[{here}].name"),
                    format!(
                        "the rule name {:?} is also used by alerts[{there}] (a preset's rules are named NAME:high, NAME:low, NAME:cumulative, NAME:stale)",
                        rule.name
                    ),
                );
            }
            Some(_) => {} // two hand-written tables: reported by the table check
            None => {
                seen.insert(&rule.name, i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_toml(text: &str) -> Result<Vec<AlertRule>, Vec<(String, String)>> {
        let table: toml::Table = toml::from_str(text).unwrap();
        let value = serde_json::to_value(table).unwrap();
        let mut p = Problems::default();
        let rules = expand_table(value, "alerts[0]", &mut p);
        for r in rules.iter().flatten() {
            r.validate("alerts[0]", &mut p);
        }
        if p.0.is_empty() {
            Ok(rules.unwrap())
        } else {
            Err(p.0)
        }
    }

    #[test]
    fn every_preset_expands_to_valid_rules() {
        for preset in PRESETS {
            let rules = expand_toml(&format!("preset = {:?}\nname = \"unit\"", preset.name))
                .unwrap_or_else(|p| panic!("{}: {p:?}", preset.name));
            let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
            assert!(names.contains(&"unit:high"), "{names:?}");
            assert!(names.contains(&"unit:cumulative"));
            assert!(names.contains(&"unit:stale"));
            assert_eq!(names.contains(&"unit:low"), preset.low.is_some());
            for r in &rules {
                assert_eq!(r.metric, "temperature");
                super::super::CompiledRule::new(r).unwrap();
            }
        }
    }

    #[test]
    fn escalation_steps_go_to_every_expanded_rule() {
        let rules = expand_toml(
            "preset = \"vaccine-fridge\"\nname = \"f\"\nnotifiers = [\"mail\"]\n\
             [[escalation]]\nafter = \"15m\"\nnotifiers = [\"night-phone\"]",
        )
        .unwrap_or_else(|p| panic!("{p:?}"));
        assert!(!rules.is_empty());
        for r in &rules {
            assert_eq!(r.escalation.len(), 1, "{}", r.name);
            assert_eq!(r.escalation[0].notifiers, ["night-phone"]);
        }
    }

    #[test]
    fn vaccine_fridge_numbers_and_overrides() {
        let rules = expand_toml(
            "preset = \"vaccine-fridge\"\nname = \"f\"\ndevices = [\"fridge-*\"]\nnotifiers = [\"ops\"]",
        )
        .unwrap();
        let high = &rules[0];
        assert_eq!(
            (high.above, high.hold),
            (Some(8.0), Some(HumanDuration::from_secs(900)))
        );
        let low = &rules[1];
        assert_eq!(low.below, Some(2.0));
        let cumulative = &rules[2];
        assert_eq!(cumulative.total, Some(HumanDuration::from_secs(3600)));
        assert_eq!(cumulative.within, Some(HumanDuration::from_secs(86400)));
        assert_eq!(rules[3].after, Some(HumanDuration::from_secs(1800)));
        assert!(rules
            .iter()
            .all(|r| r.notifiers == ["ops"] && r.devices == ["fridge-*"]));

        let rules = expand_toml(
            "preset = \"food-freezer\"\nname = \"f\"\nabove = -12.0\nbelow = -40.0\ntotal = \"3h\"\nafter = \"2h\"\nfor = \"1h\"",
        )
        .unwrap();
        assert_eq!(rules.len(), 4, "below adds a low rule");
        assert_eq!(rules[0].above, Some(-12.0));
        assert_eq!(rules[1].below, Some(-40.0));
        assert_eq!(rules[2].above, Some(-12.0));
        assert_eq!(rules[2].total, Some(HumanDuration::from_secs(3 * 3600)));
        assert_eq!(rules[3].after, Some(HumanDuration::from_secs(7200)));
    }

    #[test]
    fn a_misspelt_preset_gets_a_suggestion() {
        let p = expand_toml("preset = \"vacine-fridge\"\nname = \"f\"").unwrap_err();
        assert_eq!(p[0].0, "alerts[0].preset");
        assert!(
            p[0].1.contains("did you mean \"vaccine-fridge\"?"),
            "{}",
            p[0].1
        );
        let p = expand_toml("preset = \"blood-bank\"\nname = \"f\"").unwrap_err();
        assert!(
            p[0].1.contains("unknown preset \"blood-bank\""),
            "{}",
            p[0].1
        );
        assert!(!p[0].1.contains("did you mean"), "{}", p[0].1);
        let huge = "x".repeat(1 << 20);
        let p = expand_toml(&format!("preset = \"{huge}\"\nname = \"f\"")).unwrap_err();
        assert!(p[0].1.len() < 400, "the message stays short");
    }

    #[test]
    fn bad_overrides_are_reported_at_their_key() {
        let p =
            expand_toml("preset = \"vaccine-fridge\"\nname = \"f\"\ntotal = \"2d\"").unwrap_err();
        assert!(
            p.iter()
                .any(|(k, m)| k == "alerts[0].total" && m.contains("longer than the window")),
            "{p:?}"
        );
        let p = expand_toml("preset = \"vaccine-fridge\"\nname = \"f\"\nkind = \"threshold\"")
            .unwrap_err();
        assert_eq!(p[0].0, "alerts[0].kind", "{p:?}");
        let p = expand_toml("preset = \"vaccine-fridge\"").unwrap_err();
        assert_eq!(p[0].0, "alerts[0].name", "{p:?}");
        let p =
            expand_toml("preset = \"vaccine-fridge\"\nname = \"f\"\nabove = \"warm\"").unwrap_err();
        assert_eq!(p[0].0, "alerts[0].above", "{p:?}");
        let p = expand_toml(&format!(
            "preset = \"vaccine-fridge\"\nname = \"{}\"",
            "n".repeat(60)
        ))
        .unwrap_err();
        assert_eq!(p[0].0, "alerts[0].name", "{p:?}");
    }
}
