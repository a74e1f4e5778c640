//! The layers of `src/` (written down in `src/lib.rs`, "Layers"): a top-level module
//! imports only lower layers — leaves may also import other leaves — and no group of
//! modules imports itself in a circle.
//!
//! Every `src/**/*.rs` is read (unit tests included): each `crate::X` path and each
//! name in a `use crate::{X::…, Y}` group counts as an import of the top-level module
//! `X` by the file's own top-level module. Comment lines are skipped. A failure names
//! the file and line of every offending import, and every cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layer table of `src/lib.rs`, bottom first. A module missing here fails the test:
/// a new top-level module needs a layer.
const LAYERS: &[(u8, &[&str])] = &[
    (
        1,
        &[
            "settings",
            "model",
            "display",
            "backoff",
            "ratelimit",
            "progress",
            "clock",
            "exit",
        ],
    ),
    (2, &["store"]),
    (3, &["tls"]),
    (4, &["metrics"]),
    (5, &["alerts"]),
    (6, &["notify", "sync", "report"]),
    (7, &["sources"]),
    (8, &["config"]),
    (9, &["run"]),
    // `fuzzing` is test and fuzz only (the `fuzzing` feature): it calls into the
    // sources' decoders and the configuration, and nothing imports it.
    (10, &["cli", "fuzzing"]),
];

/// Old module paths re-exported by `src/lib.rs` (none: every module is imported by
/// its own path); an import through one would count as one of the module it names.
const ALIASES: &[(&str, &str)] = &[];

/// Known upward imports, each with why it is allowed (none: an entry no longer needed
/// is reported so it can go).
const ALLOWED: &[(&str, &str, &str)] = &[];

/// One import: which module, where.
#[derive(Debug, Clone)]
struct Import {
    from: String,
    to: String,
    at: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`None` for the crate root and `main.rs`).
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" => None,
        f => Some(f.strip_suffix(".rs").unwrap_or(f).to_string()),
    }
}

/// The names a `use crate::{…}` group imports at its top level.
fn group_names(group: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut depth = 0usize;
    let mut item = String::new();
    for c in group.chars().chain(std::iter::once(',')) {
        match c {
            '{' => {
                depth += 1;
                item.push(c);
            }
            '}' => {
                depth = depth.saturating_sub(1);
                item.push(c);
            }
            ',' if depth == 0 => {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    names.push(name);
                }
                item.clear();
            }
            _ => item.push(c),
        }
    }
    names
}

/// Every `crate::` import of the file `text`, as (top-level name, line number).
fn imports_of(text: &str) -> Vec<(String, usize)> {
    let path = regex::Regex::new(r"\bcrate::(\w+)").expect("a valid pattern");
    let group = regex::Regex::new(r"(?s)\bcrate::\{(.*?)\};").expect("a valid pattern");
    // Comment lines are blanked (keeping line numbers) so doc links do not count.
    let code: String = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("//") {
                ""
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let line_of = |offset: usize| code[..offset].matches('\n').count() + 1;
    let mut found = Vec::new();
    for m in path.captures_iter(&code) {
        let name = m.get(1).expect("group 1");
        found.push((name.as_str().to_string(), line_of(name.start())));
    }
    for m in group.captures_iter(&code) {
        let inner = m.get(1).expect("group 1");
        for name in group_names(inner.as_str()) {
            found.push((name, line_of(inner.start())));
        }
    }
    found
}

fn layer_table() -> BTreeMap<&'static str, u8> {
    LAYERS
        .iter()
        .flat_map(|(layer, mods)| mods.iter().map(move |m| (*m, *layer)))
        .collect()
}

fn all_imports() -> (Vec<Import>, BTreeSet<String>) {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let aliases: BTreeMap<&str, &str> = ALIASES.iter().copied().collect();
    let mut modules = BTreeSet::new();
    let mut imports = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src").to_path_buf();
        let Some(from) = module_of(&rel) else {
            continue;
        };
        modules.insert(from.clone());
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        for (name, line) in imports_of(&text) {
            let to = aliases.get(name.as_str()).copied().unwrap_or(&name);
            if to != from {
                imports.push(Import {
                    from: from.clone(),
                    to: to.to_string(),
                    at: format!("src/{}:{line}", rel.display()),
                });
            }
        }
    }
    (imports, modules)
}

/// Strongly connected groups of more than one module (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<String, usize>,
        low: BTreeMap<String, usize>,
        stack: Vec<String>,
        on_stack: BTreeSet<String>,
        groups: Vec<Vec<String>>,
    }
    fn visit(s: &mut State<'_>, v: &str) {
        let i = s.index.len();
        s.index.insert(v.to_string(), i);
        s.low.insert(v.to_string(), i);
        s.stack.push(v.to_string());
        s.on_stack.insert(v.to_string());
        let next: Vec<String> = s
            .edges
            .get(v)
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default();
        for w in next {
            if !s.index.contains_key(&w) {
                visit(s, &w);
                let low = s.low[v].min(s.low[&w]);
                s.low.insert(v.to_string(), low);
            } else if s.on_stack.contains(&w) {
                let low = s.low[v].min(s.index[&w]);
                s.low.insert(v.to_string(), low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut group = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(&w);
                let done = w == v;
                group.push(w);
                if done {
                    break;
                }
            }
            if group.len() > 1 {
                group.sort();
                s.groups.push(group);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        groups: Vec::new(),
    };
    let nodes: BTreeSet<String> = edges
        .iter()
        .flat_map(|(a, bs)| std::iter::once(a.clone()).chain(bs.iter().cloned()))
        .collect();
    for v in nodes {
        if !s.index.contains_key(&v) {
            visit(&mut s, &v);
        }
    }
    s.groups
}

#[test]
fn no_module_imports_a_higher_layer_and_none_imports_itself_in_a_circle() {
    let layers = layer_table();
    let (imports, modules) = all_imports();
    let unplaced: Vec<&String> = modules
        .iter()
        .filter(|m| !layers.contains_key(m.as_str()))
        .collect();
    assert!(
        unplaced.is_empty(),
        "top-level modules without a layer (add them to src/lib.rs and LAYERS): {unplaced:?}"
    );
    let allowed = |i: &Import| ALLOWED.iter().any(|(a, b, _)| *a == i.from && *b == i.to);
    let mut problems = Vec::new();
    let mut used_allowances = BTreeSet::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for import in &imports {
        // Names that are not modules (e.g. a macro exported at the root) are no edge.
        let Some(&to_layer) = layers.get(import.to.as_str()) else {
            continue;
        };
        let from_layer = layers[import.from.as_str()];
        if allowed(import) {
            used_allowances.insert((import.from.clone(), import.to.clone()));
            continue;
        }
        edges
            .entry(import.from.clone())
            .or_default()
            .insert(import.to.clone());
        let upward = to_layer > from_layer || (to_layer == from_layer && from_layer != 1);
        if upward {
            problems.push(format!(
                "{}: {} (layer {from_layer}) imports {} (layer {to_layer})",
                import.at, import.from, import.to
            ));
        }
    }
    for group in cycles(&edges) {
        let witnesses: Vec<String> = imports
            .iter()
            .filter(|i| group.contains(&i.from) && group.contains(&i.to) && !allowed(i))
            .map(|i| format!("  {} -> {} ({})", i.from, i.to, i.at))
            .collect();
        problems.push(format!(
            "cycle among {}:\n{}",
            group.join(", "),
            witnesses.join("\n")
        ));
    }
    for (from, to, why) in ALLOWED {
        if !used_allowances.contains(&(from.to_string(), to.to_string())) {
            println!("note: the allowance {from} -> {to} ({why}) is no longer needed");
        }
    }
    assert!(
        problems.is_empty(),
        "the layers of src/lib.rs are broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn imports_are_found_in_paths_and_groups() {
    let text = "use crate::{config::Config, store, sync::{a, b}};\n\
                // crate::cli in a comment\n\
                fn f() { crate::tls::x(); }\n";
    let found = imports_of(text);
    let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"config") && names.contains(&"store") && names.contains(&"sync"));
    assert!(found.contains(&("tls".to_string(), 3)), "{found:?}");
    assert!(!names.contains(&"cli"), "{found:?}");
}
