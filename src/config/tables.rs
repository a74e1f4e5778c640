//! Checks between tables: unique names in `[[sources]]`, `[[notifiers]]` and
//! `[[alerts]]`, and the notifiers each rule names.
//!
//! They read the tables as written (JSON from the merged layers), before and whatever
//! the outcome of deserializing each one: a `[[sources]]` table with a quoted port must
//! not hide that its name is taken twice (G5, every problem at once). A reference to a
//! notifier whose own table is invalid says so, instead of calling it unknown.

use super::Problems;
use serde_json::Value;
use std::collections::HashMap;

/// One `[[…]]` table as written: its `name` when that is a string, and whether the
/// whole table deserialized (and so became part of the configuration).
#[derive(Debug, Default, Clone)]
pub struct Declared {
    pub name: Option<String>,
    pub valid: bool,
}

impl Declared {
    pub fn of(value: &Value) -> Declared {
        Declared {
            name: value
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string),
            valid: false,
        }
    }
}

/// Every declared table of each list, in file order (index = position in the list).
#[derive(Debug, Default)]
pub struct Tables {
    pub sources: Vec<Declared>,
    pub notifiers: Vec<Declared>,
    pub alerts: Vec<Declared>,
    /// The notifiers each `[[alerts]]` table names (`notifiers = [...]` and those of
    /// its `[[alerts.escalation]]` steps), as far as they are strings: (key below the
    /// rule, e.g. `notifiers[0]` or `escalation[1].notifiers[0]`, name).
    pub alert_notifiers: Vec<Vec<(String, String)>>,
    /// For each parsed rule, the position of its `[[alerts]]` table, and whether that
    /// table was a preset (one preset table expands to several rules).
    pub alert_rules_at: Vec<usize>,
    pub alert_rules_from_preset: Vec<bool>,
    /// The list positions of the `[[devices]]` and `[[reports]]` tables that
    /// deserialized, in order.
    pub devices: Vec<usize>,
    pub reports: Vec<usize>,
}

impl Tables {
    /// Records one `[[alerts]]` table's name and the notifiers it names.
    pub fn declare_alert(&mut self, value: &Value) {
        self.alerts.push(Declared::of(value));
        let names_at = |value: &Value, prefix: &str| -> Vec<(String, String)> {
            value
                .get("notifiers")
                .and_then(Value::as_array)
                .map(|list| {
                    list.iter()
                        .enumerate()
                        .filter_map(|(i, v)| {
                            Some((format!("{prefix}notifiers[{i}]"), v.as_str()?.to_string()))
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut names = names_at(value, "");
        if let Some(steps) = value.get("escalation").and_then(Value::as_array) {
            for (i, step) in steps.iter().enumerate() {
                names.extend(names_at(step, &format!("escalation[{i}].")));
            }
        }
        self.alert_notifiers.push(names);
    }

    /// The list positions of the tables that deserialized, in order: the `i`-th parsed
    /// source is `sources[positions[i]]` in the file.
    pub fn positions(list: &[Declared]) -> Vec<usize> {
        list.iter()
            .enumerate()
            .filter(|(_, d)| d.valid)
            .map(|(i, _)| i)
            .collect()
    }

    pub fn check(&self, problems: &mut Problems) {
        unique(&self.sources, "sources", "source", problems);
        unique(&self.notifiers, "notifiers", "notifier", problems);
        unique(&self.alerts, "alerts", "rule", problems);

        let mut notifiers: HashMap<&str, (usize, bool)> = HashMap::new();
        for (i, d) in self.notifiers.iter().enumerate() {
            if let Some(name) = &d.name {
                let entry = notifiers.entry(name.as_str()).or_insert((i, d.valid));
                // A name given twice is already reported; the reference resolves if
                // any of them is valid.
                entry.1 |= d.valid;
            }
        }
        let mut known: Vec<String> = notifiers.keys().map(|n| format!("{n:?}")).collect();
        known.sort();
        for (rule, names) in self.alert_notifiers.iter().enumerate() {
            for (at, name) in names {
                let path = format!("alerts[{rule}].{at}");
                match notifiers.get(name.as_str()) {
                    Some((_, true)) => {}
                    Some((at, false)) => problems.push(
                        path,
                        format!(
                            "notifier {name:?} exists but is invalid; fix the problems reported for notifiers[{at}]"
                        ),
                    ),
                    None if known.is_empty() => problems.push(
                        path,
                        format!("unknown notifier {name:?}; no [[notifiers]] are configured"),
                    ),
                    None => problems.push(
                        path,
                        format!(
                            "unknown notifier {name:?}; configured notifiers: {}",
                            known.join(", ")
                        ),
                    ),
                }
            }
        }
    }
}

fn unique(list: &[Declared], section: &str, what: &str, problems: &mut Problems) {
    let mut seen = std::collections::HashSet::new();
    for (i, d) in list.iter().enumerate() {
        if let Some(name) = &d.name {
            if !seen.insert(name.as_str()) {
                problems.push(
                    format!("{section}[{i}].name"),
                    format!("another {what} is already called {name:?}; names must be unique"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn declared(name: &str, valid: bool) -> Declared {
        Declared {
            name: Some(name.into()),
            valid,
        }
    }

    #[test]
    fn duplicates_count_invalid_tables_too() {
        let tables = Tables {
            sources: vec![declared("a", false), declared("a", true)],
            ..Default::default()
        };
        let mut p = Problems::default();
        tables.check(&mut p);
        assert_eq!(p.0.len(), 1, "{:?}", p.0);
        assert_eq!(p.0[0].0, "sources[1].name");
    }

    #[test]
    fn references_to_invalid_and_unknown_notifiers() {
        let mut tables = Tables {
            notifiers: vec![declared("ops", false), declared("mail", true)],
            ..Default::default()
        };
        tables.declare_alert(&json!({"name": "r", "notifiers": ["mail", "ops", "pager", 7]}));
        let mut p = Problems::default();
        tables.check(&mut p);
        assert_eq!(p.0.len(), 2, "{:?}", p.0);
        assert_eq!(p.0[0].0, "alerts[0].notifiers[1]");
        assert!(p.0[0].1.contains("exists but is invalid"), "{:?}", p.0);
        assert!(p.0[0].1.contains("notifiers[0]"), "{:?}", p.0);
        assert_eq!(p.0[1].0, "alerts[0].notifiers[2]");
        assert!(
            p.0[1]
                .1
                .contains("unknown notifier \"pager\"; configured notifiers: \"mail\", \"ops\""),
            "{:?}",
            p.0
        );
        assert_eq!(Tables::positions(&tables.notifiers), vec![1]);
    }
}
