//! Reading configuration layers and locating every problem in them.
//!
//! The `config` crate merges the layers (main file, `conf.d/*.toml` drop-ins, then
//! `OUTPOST__SECTION__KEY` environment variables), but its errors carry no file or line.
//! So each file is also parsed with `toml`'s spanned document (`toml::de::DeTable`, of
//! the same `toml` crate the `config` crate links: one TOML parser in the binary), and
//! every key path is indexed to the file and line that set it last. Errors found later
//! (types, unknown keys, contradictions) are reported as `outpost.toml:42: alerts[1].above: …`.
//!
//! Drop-ins merge table by table; arrays of tables (`[[sources]]`, `[[alerts]]`, …)
//! are appended, so a drop-in can add a source without repeating the others.

use crate::settings::join_path;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File { path: PathBuf, line: Option<usize> },
    Env(String),
    Unknown,
}

/// One problem in the configuration, with where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: Origin,
    /// The key path, e.g. `sources[1].period`; empty for file-level problems.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File {
                path,
                line: Some(line),
            } => write!(f, "{}:{}: ", path.display(), line)?,
            Origin::File { path, line: None } => write!(f, "{}: ", path.display())?,
            Origin::Env(var) => write!(f, "environment variable {var}: ")?,
            Origin::Unknown => {}
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found, reported together (G5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Keys holding secrets. Each may instead be given as `<key>_file`, a path whose
/// content (one trailing newline removed) is the secret.
pub const SECRET_KEYS: &[&str] = &["password", "api_key", "secret", "token"];

/// The largest secret file read; anything bigger is a wrong path, not a secret.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// The merged configuration as JSON, with an index from key paths to their origin.
pub struct Layers {
    pub value: Value,
    /// Top-level keys set in the files, including empty tables (which the `config`
    /// crate drops), so a misspelt empty section is still reported.
    pub file_sections: Vec<String>,
    index: HashMap<String, (usize, usize)>,
    files: Vec<PathBuf>,
    env: HashMap<String, String>,
}

impl Layers {
    /// Where `path` was set: the environment variable, or the file and line of the key
    /// (or of its nearest parent that has one).
    pub fn locate(&self, path: &str) -> Origin {
        let mut probe = path.to_string();
        loop {
            if let Some(var) = self.env.get(&probe) {
                return Origin::Env(var.clone());
            }
            if let Some(&(file, line)) = self.index.get(&probe) {
                return Origin::File {
                    path: self.files[file].clone(),
                    line: Some(line),
                };
            }
            match parent_path(&probe) {
                Some(parent) => probe = parent.to_string(),
                None => break,
            }
        }
        match self.files.first() {
            Some(path) => Origin::File {
                path: path.clone(),
                line: None,
            },
            None => Origin::Unknown,
        }
    }

    pub fn error(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            origin: self.locate(key),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// `a.b[2].c` → `a.b[2]` → `a.b` → `a` → None.
fn parent_path(path: &str) -> Option<&str> {
    let cut = path.rfind(['.', '['])?;
    Some(&path[..cut])
}

/// The files a configuration is read from, in merge order: the main file, then the
/// drop-ins `conf.d/*.toml` beside it sorted by name.
pub fn files(main: &Path) -> Vec<PathBuf> {
    let mut files = vec![main.to_path_buf()];
    if let Some(dir) = main.parent().map(|p| p.join("conf.d")) {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut dropins: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            dropins.sort();
            files.extend(dropins);
        }
    }
    files
}

/// Reads the main file, its drop-ins and the environment. Problems are pushed to
/// `errors`; a file with a syntax error is skipped so the others are still checked.
pub fn read_layers(main: &Path, errors: &mut Vec<ConfigError>) -> Layers {
    let files = files(main);

    let mut merged = Map::new();
    let mut index = HashMap::new();
    for (file_idx, path) in files.iter().enumerate() {
        let text = match read_limited(path, 4 * 1024 * 1024) {
            Ok(t) => t,
            Err(message) => {
                errors.push(ConfigError {
                    origin: Origin::File {
                        path: path.clone(),
                        line: None,
                    },
                    key: String::new(),
                    message,
                });
                continue;
            }
        };
        match toml::de::DeTable::parse(text.as_str()) {
            Ok(doc) => {
                let mut walker = Walker {
                    text: &text,
                    file: path,
                    file_idx,
                    index: &mut index,
                    errors: &mut *errors,
                };
                walker.merge_table(&mut merged, doc.get_ref(), "");
            }
            Err(e) => {
                let line = e.span().map(|s| line_of(&text, s.start));
                errors.push(ConfigError {
                    origin: Origin::File {
                        path: path.clone(),
                        line,
                    },
                    key: String::new(),
                    message: format!(
                        "TOML syntax error: {}",
                        e.message().trim().trim_end_matches('.')
                    ),
                });
            }
        }
    }

    // Environment overrides go through the `config` crate, as the design asks: it
    // splits OUTPOST__STORAGE__BATCH_MAX_ROWS into storage.batch_max_rows and parses
    // numbers and booleans.
    let mut env = HashMap::new();
    for (var, _) in std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v))) {
        if let Some(rest) = var.strip_prefix("OUTPOST__") {
            env.insert(rest.to_lowercase().replace("__", "."), var.clone());
        }
    }
    let file_sections = merged.keys().cloned().collect();
    let value = match layer_environment(Value::Object(merged.clone())) {
        Ok(v) => v,
        Err(e) => {
            errors.push(ConfigError {
                origin: Origin::Unknown,
                key: String::new(),
                message: format!("cannot apply OUTPOST__* environment overrides: {e}"),
            });
            Value::Object(merged)
        }
    };
    Layers {
        value,
        file_sections,
        index,
        files,
        env,
    }
}

/// Lays the `OUTPOST__*` variables (read by the `config` crate) over the files. The
/// files are merged here rather than inside the `config` crate, whose paths split keys
/// on dots: a quoted TOML key such as `"env.t"` (a flattened payload field in a field
/// map) must stay one key.
fn layer_environment(files: Value) -> Result<Value, config::ConfigError> {
    let env = config::Config::builder()
        .add_source(
            config::Environment::with_prefix("OUTPOST")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        )
        .build()?
        .try_deserialize::<Value>()?;
    let mut merged = files;
    overlay(&mut merged, env);
    Ok(merged)
}

/// Deep-merges `top` into `base`: tables key by key, anything else replaced.
fn overlay(base: &mut Value, top: Value) {
    match (base, top) {
        (Value::Object(b), Value::Object(t)) => {
            for (k, v) in t {
                match b.get_mut(&k) {
                    Some(slot) => overlay(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, top) => *slot = top,
    }
}

fn read_limited(path: &Path, limit: u64) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read this file: {e}"))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read this file: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "the file is larger than {limit} bytes; is this the right file?"
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "the file is not valid UTF-8 (at byte {})",
            e.utf8_error().valid_up_to()
        )
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

struct Walker<'a> {
    text: &'a str,
    file: &'a Path,
    file_idx: usize,
    index: &'a mut HashMap<String, (usize, usize)>,
    errors: &'a mut Vec<ConfigError>,
}

type Spanned<T> = toml::Spanned<T>;

impl Walker<'_> {
    fn record(&mut self, path: &str, span: std::ops::Range<usize>) {
        let line = line_of(self.text, span.start);
        self.index.insert(path.to_string(), (self.file_idx, line));
    }

    /// `[[name]]` headers: the parser gives each table of such an array the span of its
    /// own header, where an inline array of tables (`name = [{ … }]`) has the span of
    /// each `{`. Only the former appends across files.
    fn is_array_of_tables(&self, array: &toml::de::DeArray<'_>) -> bool {
        !array.is_empty()
            && array.iter().all(|elem| {
                elem.get_ref().is_table()
                    && self
                        .text
                        .get(elem.span().start..)
                        .is_some_and(|rest| rest.starts_with("[["))
            })
    }

    fn merge_table(
        &mut self,
        dst: &mut Map<String, Value>,
        table: &toml::de::DeTable<'_>,
        prefix: &str,
    ) {
        for (key, item) in table.iter() {
            let path = join_path(prefix, key.get_ref());
            let key_span = key.span();
            match item.get_ref() {
                toml::de::DeValue::Table(t) => {
                    // A `[table]` header's span, or the key of an implicit or inline table.
                    let span = item.span();
                    let header = self
                        .text
                        .get(span.start..)
                        .is_some_and(|r| r.starts_with('['));
                    self.record(&path, if header { span } else { key_span });
                    let slot = dst
                        .entry(key.get_ref().to_string())
                        .or_insert_with(|| Value::Object(Map::new()));
                    if !slot.is_object() {
                        *slot = Value::Object(Map::new());
                    }
                    if let Value::Object(m) = slot {
                        self.merge_table(m, t, &path);
                    }
                }
                toml::de::DeValue::Array(arr) if self.is_array_of_tables(arr) => {
                    let slot = dst
                        .entry(key.get_ref().to_string())
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if !slot.is_array() {
                        *slot = Value::Array(Vec::new());
                    }
                    if let Value::Array(list) = slot {
                        for t in arr.iter() {
                            let elem_path = format!("{path}[{}]", list.len());
                            self.record(&elem_path, t.span());
                            let mut m = Map::new();
                            if let toml::de::DeValue::Table(t) = t.get_ref() {
                                self.merge_table(&mut m, t, &elem_path);
                            }
                            list.push(Value::Object(m));
                        }
                    }
                }
                _ => {
                    self.record(&path, key_span);
                    if let Some(json) = self.value_to_json(item, &path) {
                        dst.insert(key.get_ref().to_string(), json);
                    }
                }
            }
        }
    }

    /// `None` for a value that cannot be represented (an integer beyond 64 bits): its
    /// error is pushed here, and the key is left out so that no second, confusing type
    /// error follows for it.
    fn value_to_json(&mut self, v: &Spanned<toml::de::DeValue<'_>>, path: &str) -> Option<Value> {
        use toml::de::DeValue as T;
        Some(match v.get_ref() {
            T::String(s) => Value::String(s.to_string()),
            T::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) => Value::from(n),
                Err(_) => {
                    // The parser leaves the range to the reader; TOML integers are i64.
                    self.errors.push(ConfigError {
                        origin: Origin::File {
                            path: self.file.to_path_buf(),
                            line: Some(line_of(self.text, v.span().start)),
                        },
                        key: path.to_string(),
                        message: format!(
                            "the number {i} is out of range (TOML integers are 64-bit signed)"
                        ),
                    });
                    return None;
                }
            },
            T::Float(f) => match f.as_str().parse::<f64>() {
                Ok(x) => serde_json::Number::from_f64(x)
                    .map(Value::Number)
                    .unwrap_or_else(|| Value::String(x.to_string())),
                Err(_) => Value::String(f.as_str().to_string()),
            },
            T::Boolean(b) => Value::Bool(*b),
            T::Datetime(d) => Value::String(d.to_string()),
            T::Array(a) => {
                let mut list = Vec::with_capacity(a.len());
                for (i, elem) in a.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    self.record(&p, elem.span());
                    list.extend(self.value_to_json(elem, &p));
                }
                Value::Array(list)
            }
            T::Table(t) => {
                let mut m = Map::new();
                self.merge_table(&mut m, t, path);
                Value::Object(m)
            }
        })
    }
}

/// Expands `${VAR}` (and `${VAR:-default}`; `$${` is a literal `${`) in every string,
/// then replaces each `<secret>_file` key by the content of that file.
pub fn substitute(layers: &mut Layers, errors: &mut Vec<ConfigError>) {
    let mut problems = Vec::new();
    substitute_value(&mut layers.value, "", &mut problems);
    for (path, message) in problems {
        errors.push(layers.error(&path, message));
    }
}

fn substitute_value(v: &mut Value, path: &str, problems: &mut Vec<(String, String)>) {
    match v {
        Value::String(s) => match expand_env(s, |name| std::env::var(name).ok()) {
            Ok(expanded) => *s = expanded,
            Err(message) => problems.push((path.to_string(), message)),
        },
        Value::Array(list) => {
            for (i, elem) in list.iter_mut().enumerate() {
                substitute_value(elem, &format!("{path}[{i}]"), problems);
            }
        }
        Value::Object(map) => {
            for (key, elem) in map.iter_mut() {
                substitute_value(elem, &join_path(path, key), problems);
            }
            for secret in SECRET_KEYS {
                let file_key = format!("{secret}_file");
                let Some(file_value) = map.remove(&file_key) else {
                    continue;
                };
                let file_path = join_path(path, &file_key);
                if map.contains_key(*secret) {
                    problems.push((
                        file_path,
                        format!("set either `{secret}` or `{file_key}`, not both"),
                    ));
                    continue;
                }
                let Value::String(p) = file_value else {
                    problems.push((file_path, "expected a file path (a string)".into()));
                    continue;
                };
                match read_secret_file(Path::new(&p)) {
                    Ok(content) => {
                        map.insert(secret.to_string(), Value::String(content));
                    }
                    Err(message) => problems.push((file_path, message)),
                }
            }
        }
        _ => {}
    }
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    let content = read_limited(path, MAX_SECRET_FILE)
        .map_err(|e| format!("cannot use {}: {e}", path.display()))?;
    let secret = content
        .strip_suffix("\r\n")
        .or_else(|| content.strip_suffix('\n'))
        .unwrap_or(&content);
    if secret.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(secret.to_string())
}

/// Expands `${NAME}` and `${NAME:-default}`; `$${` stands for a literal `${`.
pub fn expand_env(s: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    if !s.contains("${") {
        return Ok(s.to_string());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find("${") {
        if pos > 0 && rest[..pos].ends_with('$') {
            out.push_str(&rest[..pos - 1]);
            out.push_str("${");
            rest = &rest[pos + 2..];
            continue;
        }
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 2..];
        let end = after.find('}').ok_or_else(|| {
            format!("unterminated `${{` in {s:?}; write `$${{` for a literal `${{`")
        })?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(format!(
                "`${{{inner}}}` is not a valid variable reference; names are letters, digits and _"
            ));
        }
        match lookup(name).or_else(|| default.map(str::to_string)) {
            Some(value) => out.push_str(&value),
            None => {
                return Err(format!(
                    "environment variable {name} is not set (write `${{{name}:-default}}` to give a default)"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        (name == "HOME_DIR").then(|| "/home/x".to_string())
    }

    #[test]
    fn env_expansion() {
        assert_eq!(expand_env("${HOME_DIR}/db", lookup).unwrap(), "/home/x/db");
        assert_eq!(expand_env("${NOPE:-fallback}", lookup).unwrap(), "fallback");
        assert_eq!(expand_env("$${HOME_DIR}", lookup).unwrap(), "${HOME_DIR}");
        assert_eq!(expand_env("plain $ text", lookup).unwrap(), "plain $ text");
        assert!(expand_env("${NOPE}", lookup)
            .unwrap_err()
            .contains("NOPE is not set"));
        assert!(expand_env("${HOME_DIR", lookup)
            .unwrap_err()
            .contains("unterminated"));
        assert!(expand_env("${bad name}", lookup)
            .unwrap_err()
            .contains("not a valid"));
        assert!(expand_env("${}", lookup).is_err());
    }

    #[test]
    fn parents() {
        assert_eq!(parent_path("a.b[2].c"), Some("a.b[2]"));
        assert_eq!(parent_path("a.b[2]"), Some("a.b"));
        assert_eq!(parent_path("a"), None);
    }
}
