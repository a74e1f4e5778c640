//! Configuration: the documented example, and malformed files that must each produce
//! a `file:line: key: sentence` error (and exit code 2 from `outpost check`).

mod support;

use outpost::config::{Config, ConfigErrors};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use support::agent::outpost;

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/outpost.toml")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn load_str(text: &str) -> (tempfile::TempDir, Result<Config, ConfigErrors>) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "outpost.toml", text);
    let result = Config::load(&path);
    (dir, result)
}

fn errors_of(text: &str) -> Vec<String> {
    let (dir, result) = load_str(text);
    let prefix = format!("{}/", dir.path().display());
    match result {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => {
            e.0.iter()
                .map(|e| e.to_string().replace(&prefix, ""))
                .collect()
        }
    }
}

fn assert_error(text: &str, expected: &str) {
    let errors = errors_of(text);
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with(expected) || e.contains(expected)),
        "expected an error containing {expected:?}, got {errors:#?}"
    );
}

#[test]
fn the_example_loads() {
    let config = Config::load(&example_path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.agent.gateway_id, "site-01");
    assert!(!config.sources.is_empty());
}

/// Every key the configuration accepts — including those of the source and notifier
/// types the example does not configure, which `support::config_keys` finds by probing
/// the loader — appears in config/outpost.toml: set at its place, or as a commented
/// `# key = …` line or `#[table]` header (secrets also as `# key_file = …`).
#[test]
fn the_example_documents_every_key() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let raw: serde_json::Value = toml::from_str(&text).unwrap();
    let mut documented = BTreeSet::new();
    collect_paths(&raw, "", &mut documented);
    let commented: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix('#'))
        .filter_map(|l| {
            let l = l.trim();
            if l.starts_with('[') && l.ends_with(']') {
                l.trim_matches(['[', ']'])
                    .rsplit('.')
                    .next()
                    .map(str::to_string)
            } else {
                l.split_once('=').map(|(k, _)| k.trim().to_string())
            }
        })
        .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    let missing: Vec<String> = support::config_keys::accepted_keys()
        .into_iter()
        .filter(|key| {
            // sources[ttn].mapping.fields.*.metric → sources[].mapping.fields.<any>.metric
            let pattern: Vec<String> = key
                .split('.')
                .map(|seg| match seg.split_once('[') {
                    Some((name, _)) => format!("{name}[]"),
                    None => seg.to_string(),
                })
                .collect();
            let set = documented.iter().any(|path| {
                let segs: Vec<&str> = path.split('.').collect();
                segs.len() == pattern.len()
                    && segs.iter().zip(&pattern).all(|(s, p)| p == "*" || s == p)
            });
            let leaf = pattern
                .last()
                .map(|l| l.trim_end_matches("[]"))
                .unwrap_or("");
            let secret_file = format!("{leaf}_file");
            !set && !commented.contains(leaf) && !commented.contains(&secret_file)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "keys the configuration accepts but config/outpost.toml does not show: {missing:#?}"
    );
}

/// Key paths with list indices collapsed to `[]`.
fn collect_paths(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                collect_paths(v, &p, out);
            }
        }
        serde_json::Value::Array(list) if list.iter().any(|e| e.is_object()) => {
            for e in list {
                collect_paths(e, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn an_empty_file_is_valid_with_defaults() {
    let (_dir, result) = load_str("");
    let config = result.unwrap();
    assert_eq!(config.storage.batch_max_rows, 1000);
    assert!(config.sources.is_empty());
}

#[test]
fn wrong_types_name_file_line_and_key() {
    assert_error(
        "[storage]\nbatch_max_rows = \"many\"\n",
        "outpost.toml:2: storage.batch_max_rows: expected a whole number, found string \"many\"",
    );
    assert_error(
        "[agent]\nsite = 42\n",
        "outpost.toml:2: agent.site: expected a string",
    );
    assert_error(
        "[[sources]]\ntype = \"simulated\"\nname = \"s\"\nperiod = 5\n",
        "outpost.toml:4: sources[0].period: expected a duration",
    );
    assert_error(
        "[[sources]]\ntype = \"simulated\"\nname = \"s\"\ndevices = \"a\"\n",
        "outpost.toml:4: sources[0].devices: expected a sequence",
    );
    assert_error("storage = 5\n", "outpost.toml:1: storage: expected a table");
    assert_error("sources = 5\n", "outpost.toml:1: sources: expected a list");
    assert_error(
        "[storage]\nbatch_max_rows = -5\n",
        "outpost.toml:2: storage.batch_max_rows: expected a whole number",
    );
}

#[test]
fn unknown_keys_and_sections() {
    assert_error(
        "[storage]\nbatch_max_row = 5\n",
        "outpost.toml:2: storage.batch_max_row: unknown key `batch_max_row`",
    );
    assert_error(
        "[storag]\npath = \"x\"\n",
        "outpost.toml:1: storag: unknown section",
    );
    assert_error(
        "[[sources]]\ntype = \"simulated\"\nname = \"s\"\ncolour = \"red\"\n",
        "outpost.toml:4: sources[0].colour: unknown key `colour`",
    );
    assert_error(
        "[[sources]]\ntype = \"teleporter\"\nname = \"s\"\n",
        "outpost.toml:2: sources[0].type: unknown source type \"teleporter\"",
    );
}

#[test]
fn bad_durations_and_sizes() {
    assert_error(
        "[storage]\nbatch_max_delay = \"soon\"\n",
        "outpost.toml:2: storage.batch_max_delay: expected a duration",
    );
    assert_error(
        "[storage]\nretention = \"\"\n",
        "outpost.toml:2: storage.retention: expected a duration",
    );
    assert_error(
        "[storage]\nbatch_max_delay = \"1h\"\n",
        "outpost.toml:2: storage.batch_max_delay: must be more than 0 and at most 10s",
    );
    assert_error(
        "[storage]\nmax_size = \"lots\"\n",
        "outpost.toml:2: storage.max_size: expected a size",
    );
    assert_error(
        "[storage]\nmax_size = \"1KiB\"\n",
        "outpost.toml:2: storage.max_size: must be at least 1MiB",
    );
}

#[test]
fn missing_required_keys() {
    assert_error(
        "[[sources]]\nname = \"s\"\n",
        "outpost.toml:1: sources[0].type: the required key `type` is missing",
    );
    assert_error(
        "[[sources]]\ntype = \"simulated\"\n",
        "outpost.toml:1: sources[0].name: the required key `name` is missing",
    );
}

/// A required key with a wrong value is one problem, not also "missing" (the loader
/// removes the bad key to look for further problems).
#[test]
fn a_required_key_with_a_bad_value_is_reported_once() {
    let errors = errors_of(
        "[[sources]]\ntype = \"serial\"\nname = \"probe\"\npath = \"/dev/ttyUSB9\"\nformat = \"jsn\"\n",
    );
    assert_eq!(
        errors,
        ["outpost.toml:5: sources[0].format: unknown value `jsn`; expected one of `json`, `csv`, `key-value`, `regex`"],
    );
}

#[test]
fn out_of_range_and_contradictions() {
    assert_error(
        "[storage]\nbatch_max_rows = 0\n",
        "outpost.toml:2: storage.batch_max_rows: must be between 1 and 100000",
    );
    assert_error(
        "[agent]\ngateway_id = \"my gateway\"\n",
        "outpost.toml:2: agent.gateway_id: the gateway id \"my gateway\" contains ' '",
    );
    assert_error(
        "[log]\nlevel = \"loud[\"\n",
        "outpost.toml:2: log.level: not a valid log filter",
    );
    assert_error(
        "[[sources]]\ntype = \"simulated\"\nname = \"a\"\n[[sources]]\ntype = \"simulated\"\nname = \"a\"\n",
        "outpost.toml:6: sources[1].name: another source is already called \"a\"",
    );
    assert_error(
        "[[sources]]\ntype = \"simulated\"\nname = \"a\"\ndevices = [\"x\"]\n[sources.excursion]\ndevice = \"y\"\nmetric = \"temperature\"\nafter = \"1s\"\nduration = \"1s\"\noffset = 1.0\n",
        "outpost.toml:6: sources[0].excursion.device: \"y\" is not one of this source's devices",
    );
    assert_error(
        "[[sources]]\ntype = \"simulated\"\nname = \"a\"\nperiod = \"1ms\"\n",
        "outpost.toml:4: sources[0].period: must be at least 10ms",
    );
}

/// A `ttn` source whose `[sources.backfill]` holds `backfill` (on line 9 onwards).
fn ttn_with_backfill(backfill: &str) -> String {
    format!(
        "[[sources]]\ntype = \"ttn\"\nname = \"t\"\napplication = \"app\"\napi_key = \"NNSXS.K\"\n[sources.broker]\nhost = \"eu1.cloud.thethings.network\"\n[sources.backfill]\n{backfill}\n"
    )
}

#[test]
fn ttn_backfill_settle_and_reconcile_keys() {
    // Missing: the defaults.
    let (_dir, config) = load_str(&ttn_with_backfill(""));
    let config = config.unwrap_or_else(|e| panic!("{e}"));
    let effective = serde_json::to_value(&config.sources[0]).unwrap();
    assert_eq!(effective["backfill"]["settle"], "1m");
    assert_eq!(effective["backfill"]["reconcile_every"], "15m");
    assert_eq!(effective["backfill"]["field_mask"], true);
    // "0s" turns reconciliation off and is valid.
    let (_dir, config) = load_str(&ttn_with_backfill(
        "settle = \"5s\"\nreconcile_every = \"0s\"\nfield_mask = false",
    ));
    config.unwrap_or_else(|e| panic!("{e}"));

    // Wrong types.
    assert_error(
        &ttn_with_backfill("settle = 60"),
        "outpost.toml:9: sources[0].backfill.settle: expected a duration",
    );
    assert_error(
        &ttn_with_backfill("reconcile_every = \"often\""),
        "outpost.toml:9: sources[0].backfill.reconcile_every: expected a duration",
    );
    assert_error(
        &ttn_with_backfill("field_mask = \"yes\""),
        "outpost.toml:9: sources[0].backfill.field_mask:",
    );
    // Out of range, both ways.
    assert_error(
        &ttn_with_backfill("settle = \"2h\""),
        "outpost.toml:9: sources[0].backfill.settle: must be between 1s and 1h, found 2h",
    );
    assert_error(
        &ttn_with_backfill("settle = \"0s\""),
        "outpost.toml:9: sources[0].backfill.settle: must be between 1s and 1h, found 0s",
    );
    assert_error(
        &ttn_with_backfill("reconcile_every = \"400d\""),
        "outpost.toml:9: sources[0].backfill.reconcile_every: must be \"0s\" (off) or between 1s and 1d",
    );
    assert_error(
        &ttn_with_backfill("reconcile_every = \"10ms\""),
        "outpost.toml:9: sources[0].backfill.reconcile_every: must be \"0s\" (off) or between 1s and 1d",
    );
    // Hostile values: negative, overflowing, enormous, control characters.
    for hostile in [
        "\"-1s\"",
        "\"99999999999999999999999d\"",
        "\"1e400s\"",
        "\"\"",
        "\"\\u0000\"",
        "-5",
        "[\"1m\"]",
        "{ seconds = 1 }",
    ] {
        for key in ["settle", "reconcile_every"] {
            let errors = errors_of(&ttn_with_backfill(&format!("{key} = {hostile}")));
            assert!(
                errors
                    .iter()
                    .any(|e| e.starts_with(&format!("outpost.toml:9: sources[0].backfill.{key}:"))),
                "{key} = {hostile}: {errors:#?}"
            );
        }
    }
    let long = format!("settle = \"{}s\"", "9".repeat(10_000));
    assert_error(
        &ttn_with_backfill(&long),
        "outpost.toml:9: sources[0].backfill.settle:",
    );
    // Every problem at once.
    let errors = errors_of(&ttn_with_backfill(
        "settle = \"2h\"\nreconcile_every = \"2d\"\npage_limit = 0",
    ));
    for key in ["settle", "reconcile_every", "page_limit"] {
        assert!(
            errors
                .iter()
                .any(|e| e.contains(&format!("sources[0].backfill.{key}:"))),
            "{key}: {errors:#?}"
        );
    }
}

#[test]
fn toml_syntax_errors_have_lines() {
    assert_error(
        "[storage]\npath = \"unterminated\n",
        "outpost.toml:2: TOML syntax error",
    );
    assert_error(
        "[agent]\ngateway_id = \"a\"\ngateway_id = \"b\"\n",
        "outpost.toml:3: TOML syntax error",
    );
    assert_error("[agent\n", "outpost.toml:1: TOML syntax error");
    // The parser leaves integer ranges to the reader (src/config/load.rs): one error,
    // with its line and key, and no second type error for the same key.
    let errors = errors_of("[storage]\n\nbatch_max_rows = 99999999999999999999\n");
    assert_eq!(
        errors
            .iter()
            .filter(|e| e.contains("storage.batch_max_rows"))
            .count(),
        1,
        "{errors:#?}"
    );
    assert_error(
        "[storage]\n\nbatch_max_rows = 99999999999999999999\n",
        "outpost.toml:3: storage.batch_max_rows: the number 99999999999999999999 is out of range",
    );
    assert_error(
        "[storage]\nbatch_max_rows = -0x1\n",
        "outpost.toml:2: TOML syntax error",
    );
}

#[test]
fn env_substitution_errors() {
    assert_error(
        "[agent]\nsite = \"${OUTPOST_TEST_SURELY_UNSET_VAR}\"\n",
        "outpost.toml:2: agent.site: environment variable OUTPOST_TEST_SURELY_UNSET_VAR is not set",
    );
    assert_error(
        "[agent]\nsite = \"${unterminated\"\n",
        "outpost.toml:2: agent.site: unterminated `${`",
    );
    let (_d, ok) = load_str("[agent]\nsite = \"${OUTPOST_TEST_SURELY_UNSET_VAR:-Depot}\"\n");
    assert_eq!(ok.unwrap().agent.site, "Depot");
}

#[test]
fn all_problems_are_reported_at_once() {
    let errors = errors_of(
        "[storage]\nbatch_max_rows = \"x\"\nbatch_max_delay = \"never\"\nnope = 1\n[agent]\ngateway_id = \"bad id\"\n",
    );
    assert!(errors.len() >= 4, "{errors:#?}");
    assert!(errors.iter().any(|e| e.starts_with("outpost.toml:2:")));
    assert!(errors.iter().any(|e| e.starts_with("outpost.toml:3:")));
    assert!(errors.iter().any(|e| e.starts_with("outpost.toml:4:")));
    assert!(errors.iter().any(|e| e.starts_with("outpost.toml:6:")));
}

#[test]
fn missing_file_and_hostile_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = Config::load(&dir.path().join("nope.toml")).unwrap_err();
    assert!(
        err.to_string().contains("nope.toml: cannot read this file"),
        "{err}"
    );

    let big = write(dir.path(), "big.toml", &"# padding\n".repeat(600_000));
    let err = Config::load(&big).unwrap_err();
    assert!(err.to_string().contains("is larger than"), "{err}");

    let binary = dir.path().join("bin.toml");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x41]).unwrap();
    let err = Config::load(&binary).unwrap_err();
    assert!(err.to_string().contains("not valid UTF-8"), "{err}");

    // Deeply nested inline tables must not crash the loader.
    let deep = format!(
        "[agent]\nsite = {}1{}\n",
        "{a=".repeat(200),
        "}".repeat(200)
    );
    let (_d, result) = load_str(&deep);
    assert!(result.is_err());
}

#[test]
fn dropins_merge_and_append_and_are_located() {
    let dir = tempfile::tempdir().unwrap();
    let main = write(
        dir.path(),
        "outpost.toml",
        "[agent]\ngateway_id = \"main\"\n[[sources]]\ntype = \"simulated\"\nname = \"a\"\n",
    );
    write(
        dir.path(),
        "conf.d/10-more.toml",
        "[agent]\nsite = \"From drop-in\"\n[[sources]]\ntype = \"simulated\"\nname = \"b\"\n",
    );
    write(dir.path(), "conf.d/README", "not toml, ignored");
    let config = Config::load(&main).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.agent.gateway_id, "main");
    assert_eq!(config.agent.site, "From drop-in");
    let names: Vec<_> = config
        .sources
        .iter()
        .map(|s| s.name().to_string())
        .collect();
    assert_eq!(names, ["a", "b"]);

    // An inline array (`sources = [{ … }]`) is a value: a drop-in's replaces the list
    // instead of appending to it, as any other value does.
    write(
        dir.path(),
        "conf.d/15-inline.toml",
        "sources = [{ type = \"simulated\", name = \"c\" }]\n",
    );
    let config = Config::load(&main).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<_> = config
        .sources
        .iter()
        .map(|s| s.name().to_string())
        .collect();
    assert_eq!(names, ["c"]);
    std::fs::remove_file(dir.path().join("conf.d/15-inline.toml")).unwrap();

    write(
        dir.path(),
        "conf.d/20-bad.toml",
        "\n\n[storage]\nbatch_max_rows = true\n",
    );
    let err = Config::load(&main).unwrap_err().to_string();
    assert!(
        err.contains("conf.d/20-bad.toml:4: storage.batch_max_rows"),
        "{err}"
    );
}

#[test]
fn secrets_from_files_and_their_errors() {
    // No section takes a secret in the core yet, so the file handling is exercised
    // through the errors it reports; a valid secret file is read and then refused as
    // an unknown key, which proves it was read.
    let dir = tempfile::tempdir().unwrap();
    let secret = write(dir.path(), "secret", "s3cret\n");
    let main = write(
        dir.path(),
        "outpost.toml",
        &format!("[agent]\npassword_file = \"{}\"\n", secret.display()),
    );
    let err = Config::load(&main).unwrap_err().to_string();
    assert!(err.contains("agent.password: unknown key"), "{err}");
    assert!(
        !err.contains("s3cret"),
        "a secret must never be printed: {err}"
    );

    let main = write(
        dir.path(),
        "outpost.toml",
        "[agent]\npassword_file = \"/nonexistent/secret\"\n",
    );
    let err = Config::load(&main).unwrap_err().to_string();
    assert!(
        err.contains("outpost.toml:2: agent.password_file: cannot use /nonexistent/secret"),
        "{err}"
    );

    let empty = write(dir.path(), "empty", "");
    let main = write(
        dir.path(),
        "outpost.toml",
        &format!("[agent]\ntoken_file = \"{}\"\n", empty.display()),
    );
    let err = Config::load(&main).unwrap_err().to_string();
    assert!(
        err.contains("agent.token_file:") && err.contains("is empty"),
        "{err}"
    );

    let main = write(
        dir.path(),
        "outpost.toml",
        &format!(
            "[agent]\nsecret = \"x\"\nsecret_file = \"{}\"\n",
            secret.display()
        ),
    );
    let err = Config::load(&main).unwrap_err().to_string();
    assert!(
        err.contains("set either `secret` or `secret_file`, not both"),
        "{err}"
    );
}

#[test]
fn environment_overrides() {
    // Runs in a child process so the variable does not leak into other tests.
    let dir = tempfile::tempdir().unwrap();
    let main = write(
        dir.path(),
        "outpost.toml",
        "[storage]\nbatch_max_rows = 10\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["check", "--config"])
        .arg(&main)
        .env("OUTPOST__STORAGE__BATCH_MAX_ROWS", "77")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("batch_max_rows = 77"), "{stdout}");

    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["check", "--config"])
        .arg(&main)
        .env("OUTPOST__STORAGE__BATCH_MAX_ROWS", "lots")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("environment variable OUTPOST__STORAGE__BATCH_MAX_ROWS: storage.batch_max_rows: expected a whole number"),
        "{stderr}"
    );
}

#[test]
fn check_exits_2_with_all_errors_and_0_with_redacted_config() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.toml",
        "[storage]\nbatch_max_rows = \"x\"\n[nope]\n",
    );
    let (code, _, stderr) = outpost(["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("bad.toml:2: storage.batch_max_rows"),
        "{stderr}"
    );
    assert!(
        stderr.contains("bad.toml:3: nope: unknown section"),
        "{stderr}"
    );
    assert!(stderr.contains("2 problem(s)"), "{stderr}");

    let (code, stdout, stderr) = outpost(["check", "--config", example_path().to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("gateway_id = \"site-01\""), "{stdout}");
    // The printed configuration is itself valid TOML.
    let body: String = stdout
        .lines()
        .skip_while(|l| l.starts_with('#') || l.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    toml::from_str::<toml::Value>(&body).unwrap();

    let (code, _, _) = outpost(["run", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2), "run refuses a bad configuration too");
}

#[test]
fn quoted_keys_with_dots_stay_one_key() {
    // A flattened payload field ("env.t") in a field map must not become nested tables.
    let (_d, result) = load_str(
        "[[sources]]\ntype = \"simulated\"\nname = \"s\"\n[sources.excursion]\ndevice = \"sim-1\"\nmetric = \"temperature\"\nafter = \"1s\"\nduration = \"1s\"\noffset = 1.0\n",
    );
    result.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "outpost.toml",
        "[agent]\n\"site.name\" = \"x\"\n",
    );
    let err = Config::load(&path).unwrap_err().to_string();
    assert!(
        err.contains("unknown key `site.name`"),
        "the dotted key is kept whole: {err}"
    );
}

/// G9's `http.stall_after`: a duration between 1s and 24h, 2 minutes when missing. The
/// test-only stall faults are not configuration: no key or `OUTPOST__` variable sets them.
#[test]
fn stall_after_is_validated_and_faults_are_not_configuration() {
    let (_d, ok) = load_str("[http]\n");
    assert_eq!(
        ok.unwrap().http.stall_after.get(),
        std::time::Duration::from_secs(120)
    );
    let (_d, ok) = load_str("[http]\nstall_after = \"3s\"\n");
    assert_eq!(
        ok.unwrap().http.stall_after.get(),
        std::time::Duration::from_secs(3)
    );
    assert_error(
        "[http]\nstall_after = 5\n",
        "outpost.toml:2: http.stall_after: expected a duration",
    );
    assert_error(
        "[http]\nstall_after = \"soon\"\n",
        "outpost.toml:2: http.stall_after: expected a duration",
    );
    assert_error(
        "[http]\nstall_after = \"\"\n",
        "outpost.toml:2: http.stall_after: expected a duration",
    );
    for out_of_range in ["0s", "500ms", "25h", "10years"] {
        assert_error(
            &format!("[http]\nstall_after = \"{out_of_range}\"\n"),
            "outpost.toml:2: http.stall_after: must be between 1s and 24h",
        );
    }
    // Oversized and hostile values: refused with the key, never a panic.
    for hostile in [
        "99999999999999999999999s".to_string(),
        format!("{}s", "9".repeat(10_000)),
        "-5s".to_string(),
        "1s; rm -rf /".to_string(),
        "\\u0000".to_string(),
    ] {
        let errors = errors_of(&format!("[http]\nstall_after = \"{hostile}\"\n"));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("outpost.toml:2: http.stall_after: ")),
            "{hostile:?}: {errors:#?}"
        );
    }
    assert_error(
        "[http]\nstall_after = [\"1m\"]\n",
        "outpost.toml:2: http.stall_after: expected a duration",
    );
    // The fault switch is not a key of any section.
    assert_error(
        "[http]\ntest_fault = \"store_writer_hang\"\n",
        "outpost.toml:2: http.test_fault: unknown key `test_fault`",
    );
    let dir = tempfile::tempdir().unwrap();
    let main = write(dir.path(), "outpost.toml", "[http]\n");
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["check", "--config"])
        .arg(&main)
        .env("OUTPOST__TEST_FAULT", "store_writer_hang")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("environment variable OUTPOST__TEST_FAULT: test_fault: unknown section"),
        "{stderr}"
    );
}

const TTN_LORAWAN: &str = "[[sources]]\ntype = \"ttn\"\nname = \"lorawan\"\napplication = \"app\"\napi_key = \"k\"\n[sources.broker]\nhost = \"127.0.0.1\"\nport = 1883\ntls = false\n";
const CHIRPSTACK_LORAWAN: &str = "[[sources]]\ntype = \"chirpstack\"\nname = \"lorawan\"\napplication_id = \"1f6a3c2e-9d4b-4e8a-b7c5-2a1d0e9f8b7c\"\n[sources.broker]\nhost = \"127.0.0.1\"\ntls = false\n";

/// Every problem of `text`, checking that each is one `outpost.toml:LINE: KEY: sentence`.
fn located_errors(text: &str) -> Vec<String> {
    let errors = errors_of(text);
    for e in &errors {
        let mut parts = e.splitn(4, ": ");
        let (file, key, sentence) = (parts.next(), parts.next(), parts.next());
        let line_ok = file
            .and_then(|f| f.strip_prefix("outpost.toml:"))
            .is_some_and(|l| l.parse::<usize>().is_ok());
        assert!(
            line_ok && key.is_some_and(|k| !k.contains(' ')) && sentence.is_some(),
            "not `file:line: key: sentence`: {e}"
        );
    }
    errors
}

#[test]
fn lorawan_fixtures_are_valid_alone() {
    let (_d, ok) = load_str(TTN_LORAWAN);
    ok.unwrap_or_else(|e| panic!("{e}"));
    let (_d, ok) = load_str(CHIRPSTACK_LORAWAN);
    ok.unwrap_or_else(|e| panic!("{e}"));
    // Alone, the duplicate is reported at the second name.
    assert_eq!(
        located_errors(&format!("{TTN_LORAWAN}{CHIRPSTACK_LORAWAN}")),
        ["outpost.toml:12: sources[1].name: another source is already called \"lorawan\"; names must be unique"]
    );
}

/// A `[[sources]]` table with a type problem of its own still counts for unique names.
#[test]
fn a_duplicate_source_name_is_reported_beside_a_quoted_port() {
    let text =
        format!("{TTN_LORAWAN}{CHIRPSTACK_LORAWAN}").replace("port = 1883", "port = \"1883\"");
    assert_eq!(
        located_errors(&text),
        [
            "outpost.toml:8: sources[0].broker.port: expected a whole number, found string \"1883\"",
            "outpost.toml:12: sources[1].name: another source is already called \"lorawan\"; names must be unique",
        ]
    );
}

#[test]
fn a_duplicate_source_name_is_reported_beside_a_misspelled_key() {
    let text =
        format!("{TTN_LORAWAN}{CHIRPSTACK_LORAWAN}").replace("application_id =", "aplication_id =");
    let errors = located_errors(&text);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0]
            .starts_with("outpost.toml:13: sources[1].aplication_id: unknown key `aplication_id`"),
        "{errors:#?}"
    );
    assert!(
        errors[0].ends_with("; did you mean `application_id`?"),
        "{errors:#?}"
    );
    assert_eq!(errors[1], "outpost.toml:12: sources[1].name: another source is already called \"lorawan\"; names must be unique");
}

/// The held-out technician's file: a misspelled key, a quoted number and a duplicated
/// source name give three located lines, nothing more.
#[test]
fn three_mistakes_give_three_lines() {
    let text = format!("[storage]\nbatch_max_row = 500\n{TTN_LORAWAN}{CHIRPSTACK_LORAWAN}")
        .replace("port = 1883", "port = \"1883\"");
    let errors = located_errors(&text);
    assert_eq!(errors.len(), 3, "{errors:#?}");
    // A misspelt required key is one mistake too, not also a missing key.
    let misspelt_required = format!("{TTN_LORAWAN}{CHIRPSTACK_LORAWAN}")
        .replace("port = 1883", "port = \"1883\"")
        .replace("application =", "applicaton =");
    assert_eq!(located_errors(&misspelt_required).len(), 3);

    // And `outpost check` prints exactly those three lines and the count.
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "outpost.toml", &text);
    let (code, _, stderr) = outpost(["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    let located: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("outpost.toml:"))
        .collect();
    assert_eq!(located.len(), 3, "{stderr}");
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("outpost.toml:2: storage.batch_max_row: unknown key")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e
                .starts_with("outpost.toml:10: sources[0].broker.port: expected a whole number")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e
                .starts_with("outpost.toml:14: sources[1].name: another source is already called")),
        "{errors:#?}"
    );
}

/// After an invalid table, the next table's own problems keep their place in the list.
#[test]
fn problems_after_an_invalid_table_keep_their_index() {
    let errors = located_errors(
        "[[sources]]\ntype = \"simulated\"\nname = \"a\"\nperiod = 5\n[[sources]]\ntype = \"simulated\"\nname = \"b\"\nperiod = \"1ms\"\n",
    );
    assert_eq!(
        errors,
        [
            "outpost.toml:4: sources[0].period: expected a duration string like \"30s\", \"10m\" or \"7d\", found the number `5`",
            "outpost.toml:8: sources[1].period: must be at least 10ms, found 1ms",
        ],
    );
}

const LOG_NOTIFIER: &str = "[[notifiers]]\nname = \"journal\"\ntype = \"log\"\n";
const RULE: &str = "[[alerts]]\nname = \"warm\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\nnotifiers = [\"journal\"]\n";

#[test]
fn a_duplicate_notifier_name_is_reported_beside_a_bad_ttl() {
    let text = format!("{LOG_NOTIFIER}{LOG_NOTIFIER}ttl = \"forever\"\n");
    let errors = located_errors(&text);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("outpost.toml:7: notifiers[1].ttl: expected a duration")),
        "{errors:#?}"
    );
    assert!(errors.iter().any(|e| e == "outpost.toml:5: notifiers[1].name: another notifier is already called \"journal\"; names must be unique"), "{errors:#?}");
}

#[test]
fn a_duplicate_rule_name_is_reported_beside_a_quoted_level() {
    let text = format!("{LOG_NOTIFIER}{RULE}{RULE}").replacen("above = 8.0", "above = \"8\"", 1);
    let errors = located_errors(&text);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors.iter().any(|e| e
            .starts_with("outpost.toml:8: alerts[0].above: expected a number, found string \"8\"")),
        "{errors:#?}"
    );
    assert!(errors.iter().any(|e| e == "outpost.toml:11: alerts[1].name: another rule is already called \"warm\"; names must be unique"), "{errors:#?}");
}

/// A rule naming a notifier whose table is invalid hears that it is invalid, not unknown.
#[test]
fn a_rule_naming_an_invalid_notifier_says_it_is_invalid() {
    let text = format!("{LOG_NOTIFIER}retry_initial = 5\n{RULE}");
    let errors = located_errors(&text);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].starts_with("outpost.toml:4: notifiers[0].retry_initial: expected a duration"),
        "{errors:#?}"
    );
    assert_eq!(
        errors[1],
        "outpost.toml:10: alerts[0].notifiers[0]: notifier \"journal\" exists but is invalid; fix the problems reported for notifiers[0]"
    );
}

/// A rule with a problem of its own still has its notifier references checked.
#[test]
fn an_unknown_notifier_is_reported_beside_the_rules_own_problem() {
    let text = format!("{LOG_NOTIFIER}{RULE}")
        .replace("above = 8.0", "above = 8.0\nfor = 5")
        .replace("[\"journal\"]", "[\"journal\", \"pager\"]");
    let errors = located_errors(&text);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].starts_with("outpost.toml:9: alerts[0].for: expected a duration"),
        "{errors:#?}"
    );
    assert_eq!(
        errors[1],
        "outpost.toml:10: alerts[0].notifiers[1]: unknown notifier \"pager\"; configured notifiers: \"journal\""
    );
    // With no notifier table at all.
    let errors = located_errors(RULE);
    assert_eq!(
        errors,
        ["outpost.toml:6: alerts[0].notifiers[0]: unknown notifier \"journal\"; no [[notifiers]] are configured"]
    );
}
