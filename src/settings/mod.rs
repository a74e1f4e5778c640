//! The vocabulary every component's configuration is written in: durations, sizes and
//! secrets ([`types`]), plain identifiers, and [`Problems`], which collects every
//! mistake in a section as `(key path, sentence)` instead of stopping at the first.
//!
//! A leaf: it imports nothing from the crate, so each component can check its own
//! section while [`crate::config`] assembles the whole file from them.

pub mod types;

pub use types::{ByteSize, HumanDuration, Secret};

use serde::de::DeserializeOwned;
use serde_json::Value;

/// `a.b` + `c` → `a.b.c`; `a.b` + `[2]` → `a.b[2]`.
pub fn join_path(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else if key.starts_with('[') {
        format!("{prefix}{key}")
    } else {
        format!("{prefix}.{key}")
    }
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

/// The choice closest to `word`, when it is close enough to be a misspelling (for
/// "did you mean" in messages about names that are not keys, e.g. a preset).
pub fn closest_choice<'a>(word: &str, choices: &[&'a str]) -> Option<&'a str> {
    if word.len() > 256 {
        return None;
    }
    choices
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d > 0 && *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
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
