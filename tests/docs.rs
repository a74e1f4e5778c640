//! The documentation stays true to the code:
//!
//! - `docs/configuration.md` lists exactly the keys the configuration accepts: a key
//!   the loader accepts but the reference does not list fails, and so does a key the
//!   reference lists but the loader refuses. The accepted keys come from
//!   `support::config_keys::accepted_keys`, which asks the real loader (nothing is
//!   listed by hand).
//! - every `sql` block of `docs/operator.md` runs against a real PostgreSQL with the
//!   central schema applied by `outpost central migrate` (plain and partitioned), after
//!   the real agent synced readings, a firing alert and its heartbeat into it as the
//!   `outpost_gateway` role the page creates (so the page's GRANTs are tested too).
//!   Each query must find rows.

mod support;

use outpost::config::SECRET_KEYS;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use support::config_keys::accepted_keys;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The keys `docs/configuration.md` documents: every table row `| `key` | …` after a
/// `<!-- keys: PREFIX … -->` marker documents `PREFIX.key` for each prefix (no prefix:
/// a top-level key), up to the next marker.
fn documented_keys(text: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let mut prefixes: Option<Vec<String>> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("<!-- keys:") {
            let rest = rest.trim_end_matches("-->");
            let list: Vec<String> = rest.split_whitespace().map(str::to_string).collect();
            prefixes = Some(if list.is_empty() {
                vec![String::new()]
            } else {
                list
            });
            continue;
        }
        let Some(prefixes) = &prefixes else { continue };
        let Some(cell) = line.strip_prefix("| `") else {
            continue;
        };
        let Some((key, _)) = cell.split_once('`') else {
            continue;
        };
        for prefix in prefixes {
            let path = if prefix.is_empty() {
                key.to_string()
            } else {
                format!("{prefix}.{key}")
            };
            out.insert(path, i + 1);
        }
    }
    out
}

/// `a.password_file` is documented as a key when `a.password` is accepted.
fn secret_file_base(path: &str) -> Option<String> {
    let base = path.strip_suffix("_file")?;
    let leaf = base.rsplit('.').next()?;
    SECRET_KEYS.contains(&leaf).then(|| base.to_string())
}

#[test]
fn the_configuration_reference_lists_exactly_the_accepted_keys() {
    let accepted = accepted_keys();
    // The walk must reach deep keys; if it did not, the comparison proves nothing.
    for deep in [
        "storage.max_size",
        "sources[ttn].broker.host",
        "sources[modbus-rtu].slaves[].registers[].address",
        "alerts[].for",
        "notifiers[email].name",
    ] {
        assert!(
            accepted.contains(deep),
            "probe missed {deep}: {accepted:#?}"
        );
    }
    let text = std::fs::read_to_string(repo_file("docs/configuration.md")).unwrap();
    let documented = documented_keys(&text);
    if std::env::var_os("OUTPOST_PRINT_KEYS").is_some() {
        for k in &accepted {
            println!("{k}");
        }
    }
    let missing: Vec<_> = accepted
        .iter()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    let unknown: Vec<_> = documented
        .iter()
        .filter(|(k, _)| {
            !accepted.contains(*k)
                && !secret_file_base(k).is_some_and(|base| accepted.contains(&base))
        })
        .map(|(k, line)| format!("docs/configuration.md:{line}: {k}"))
        .collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "keys the configuration accepts but docs/configuration.md does not list: {missing:#?}\n\
         keys docs/configuration.md lists but the configuration refuses: {unknown:#?}"
    );
}

/// The ```sql blocks of a Markdown file, with the line each starts on.
fn sql_blocks(text: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        match &mut current {
            None if line.trim() == "```sql" => current = Some((i + 2, String::new())),
            None => {}
            Some(_) if line.trim() == "```" => blocks.extend(current.take()),
            Some((_, sql)) => {
                sql.push_str(line);
                sql.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unterminated ```sql block");
    blocks
}

/// The statement without its leading comment lines.
fn without_comments(sql: &str) -> String {
    sql.lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs one gateway (the real agent: simulated sensors, a threshold alert that fires,
/// sync as the `outpost_gateway` role of operator.md) until central holds its
/// heartbeat, readings and firing event.
fn sync_one_gateway(pg: &support::postgres::Postgres, dir: &Path) {
    let config = format!(
        r#"
[agent]
gateway_id = "site-01"
site = "Docs test"
[storage]
path = "{db}"
[http]
enabled = false
[sync]
url = "postgres://outpost_gateway@127.0.0.1:{port}/{database}"
password = "change-me"
sslmode = "disable"
interval = "1s"
backoff_initial = "100ms"
backoff_max = "1s"
[[sources]]
type = "simulated"
name = "sim"
devices = ["coldroom-1", "coldroom-2"]
period = "100ms"
[sources.excursion]
device = "coldroom-1"
metric = "temperature"
after = "500ms"
duration = "1h"
offset = 10.0
[[alerts]]
name = "coldroom-warm"
kind = "threshold"
metric = "temperature"
above = 8.0
severity = "critical"
"#,
        db = dir.join("outpost.db").display(),
        port = pg.port(),
        database = pg.database(),
    );
    let mut agent = support::agent::Agent::new(dir, &config).start();
    let synced = support::util::wait_until(std::time::Duration::from_secs(60), || {
        if !agent.is_running() {
            return true; // exited: reported below
        }
        pg.try_psql(
            "SELECT (SELECT count(*) FROM outpost.gateways WHERE gateway_id = 'site-01') > 0 \
             AND (SELECT count(*) FROM outpost.readings WHERE gateway_id = 'site-01') > 0 \
             AND (SELECT count(*) FROM outpost.alert_events WHERE kind = 'firing') > 0",
        )
        .is_ok_and(|out| out == "t")
    });
    let exited = !agent.is_running();
    assert!(
        synced && !exited,
        "the gateway did not sync within 60 s; agent log:\n{}",
        agent.log()
    );
}

/// Gateways in other states, so that every query has something to find.
const OTHER_GATEWAYS: &str = "
INSERT INTO outpost.gateways (gateway_id, agent_version, site, last_seen, backlog_rows,
    oldest_unsynced_at, backlog_age_seconds, last_sync_at, last_error, last_error_at, clock_synchronized)
VALUES ('site-02', '0.1.0', 'Depot', now() - interval '2 hours', 48000, now() - interval '3 hours',
        10800, now() - interval '3 hours', 'cannot reach central PostgreSQL at db:6432/fleet',
        now() - interval '2 hours', true),
       ('site-03', '0.1.0', 'Harbour', now(), 0, NULL, NULL, now(), NULL, NULL, NULL);
INSERT INTO outpost.readings (gateway_id, uid, observed_at, received_at, source, device, metric, value, unit, flags)
SELECT 'site-03', md5('docs' || i)::uuid, now() - i * interval '1 minute', now(), 'ttn',
       'freezer-' || (i % 3), 'temperature', -18.5, '°C', 1
FROM generate_series(1, 30) AS i;
INSERT INTO outpost.daily_summaries (gateway_id, day, device, metric, timezone, day_start, day_end,
    readings, min, max, mean, gaps, gap_seconds, out_of_range_seconds, excursions, alarms, detail, computed_at)
VALUES ('site-03', current_date - 2, 'freezer-1', 'temperature', 'Europe/Berlin',
        now() - interval '3 days', now() - interval '2 days', 96, -21.5, -12.0, -18.4, 1, 2700, 1800, 1, 2,
        '{\"name\": \"Freezer 1\", \"alarms\": [{\"at\": \"2026-12-04T06:00:00Z\", \"kind\": \"firing\", \"rule\": \"freezer-warm\", \"severity\": \"critical\"}, {\"at\": \"2026-12-04T06:05:00Z\", \"kind\": \"acknowledged\", \"rule\": \"freezer-warm\", \"severity\": \"critical\", \"by\": \"Anna\", \"note\": \"door closed\"}]}',
        now());
";

/// An alarm another gateway had acknowledged (central schema 2), for the audit-trail
/// query.
const ACKNOWLEDGED_ELSEWHERE: &str = "
INSERT INTO outpost.alert_events (gateway_id, uid, rule, device, metric, kind, severity, occurred_at,
    message, actor, note, channel)
VALUES ('site-03', md5('docs-ack')::uuid, 'freezer-warm', 'freezer-1', 'temperature', 'acknowledged',
        'critical', now() - interval '5 minutes',
        jsonb_build_object('since', now() - interval '20 minutes'), 'J. Smith',
        'compressor restarted', 'central');
";

fn check_operator_queries(partitioned: bool) {
    let layout = if partitioned { "partitioned" } else { "plain" };
    let pg = support::postgres::Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let no_config = dir.path().join("none.toml");
    let url = pg.url();
    let mut full = vec![
        "--config",
        no_config.to_str().unwrap(),
        "central",
        "migrate",
        "--url",
        &url,
        "--sslmode",
        "disable",
    ];
    if partitioned {
        full.push("--partitioned");
    }
    let (code, _, stderr) = support::agent::outpost(&full);
    assert_eq!(
        code,
        Some(0),
        "outpost central migrate ({layout}): {stderr}"
    );

    let text = std::fs::read_to_string(repo_file("docs/operator.md")).unwrap();
    let blocks = sql_blocks(&text);
    assert!(blocks.len() >= 8, "only {} sql blocks", blocks.len());
    let (role_line, role_block) = blocks
        .iter()
        .find(|(_, sql)| sql.contains("CREATE ROLE outpost_gateway"))
        .expect("operator.md creates the gateways' role");
    pg.psql_superuser(role_block);
    println!("{layout}: docs/operator.md:{role_line}: role created");
    sync_one_gateway(&pg, dir.path());
    pg.psql(OTHER_GATEWAYS);
    pg.psql(ACKNOWLEDGED_ELSEWHERE);
    if partitioned {
        // A reading from a gateway whose clock was years off lands in the default partition.
        pg.psql(
            "INSERT INTO outpost.readings (gateway_id, uid, observed_at, received_at, source, device, metric, value) \
             VALUES ('site-03', md5('old')::uuid, '2020-01-01T00:00:00Z', now(), 'ttn', 'freezer-1', 'temperature', -18)",
        );
    }

    for (line, sql) in &blocks {
        if sql.contains("CREATE ROLE") {
            continue;
        }
        if sql.contains("-- partitioned layout only") && !partitioned {
            continue;
        }
        let out = pg.psql_superuser(sql);
        let statement = without_comments(sql);
        let is_query = statement
            .trim_start()
            .to_ascii_uppercase()
            .starts_with("SELECT")
            || statement
                .trim_start()
                .to_ascii_uppercase()
                .starts_with("WITH");
        assert!(
            !is_query || !out.is_empty(),
            "docs/operator.md:{line} ({layout} layout) found nothing:\n{sql}"
        );
        println!(
            "{layout}: docs/operator.md:{line}: {} row(s)",
            out.lines().count()
        );
    }
}

#[test]
fn the_operator_queries_run_on_the_plain_central_schema() {
    check_operator_queries(false);
}

#[test]
fn the_operator_queries_run_on_the_partitioned_central_schema() {
    check_operator_queries(true);
}

/// `docs/technician.md` lists every rejection reason exactly as the program prints it:
/// the rows after the `<!-- rejection reasons` marker are `src/sources/reasons.rs`'s
/// list, in order, word for word.
#[test]
fn the_technicians_guide_lists_every_rejection_reason_as_the_program_prints_it() {
    let text = std::fs::read_to_string(repo_file("docs/technician.md")).unwrap();
    let start = text
        .find("<!-- rejection reasons")
        .expect("the rejection reasons marker in docs/technician.md");
    let rows: Vec<Vec<String>> = text[start..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    let expected: Vec<Vec<String>> = outpost::sources::reasons::REASONS
        .iter()
        .map(|r| {
            vec![
                format!("`{}`", r.reason),
                r.sources.to_string(),
                r.cause.to_string(),
                r.fix.to_string(),
            ]
        })
        .collect();
    for (i, (doc, code)) in rows.iter().zip(&expected).enumerate() {
        assert_eq!(doc, code, "row {} of the rejection reasons", i + 1);
    }
    assert_eq!(
        rows.len(),
        expected.len(),
        "the table has {} rows, the code {} reasons",
        rows.len(),
        expected.len()
    );
}

/// Every reason a source rejects input for is in `src/sources/reasons.rs` (and so in
/// the guide): the labels are read from the sources' code — `fn reason` arms,
/// `reason: "…"` fields and `reject("…"` calls — and each listed reason is used.
#[test]
fn every_rejection_reason_in_the_sources_is_listed() {
    let mut used = std::collections::BTreeSet::new();
    let label = |s: &str| -> Option<String> {
        let rest = s.trim_start().strip_prefix('"')?;
        let end = rest.find('"')?;
        let l = &rest[..end];
        (!l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            .then(|| l.to_string())
    };
    // The kinds' files and folders (`serial/`, `mqtt/`, …).
    let mut files = Vec::new();
    let mut dirs = vec![repo_file("src/sources")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    for path in files {
        if path.file_name().is_some_and(|n| n == "reasons.rs") {
            continue;
        }
        let code = std::fs::read_to_string(&path).unwrap();
        // Unit tests assert reasons too; only the code before them counts.
        let code = code.split("#[cfg(test)]").next().unwrap_or("");
        let mut in_reason_fn = false;
        let mut pending_reject = false;
        for line in code.lines() {
            let t = line.trim();
            if t.starts_with("pub fn reason(") || t.starts_with("fn reason(") {
                in_reason_fn = true;
            } else if in_reason_fn && t == "}" && !line.starts_with("        ") {
                in_reason_fn = false;
            }
            if in_reason_fn {
                if let Some((_, arm)) = t.split_once("=> ") {
                    used.extend(label(arm));
                }
            }
            if let Some(rest) = t.strip_prefix("reason: ") {
                used.extend(label(rest));
            }
            if pending_reject {
                used.extend(label(t));
                pending_reject = false;
            }
            if let Some((_, rest)) = t.split_once("reject(") {
                match label(rest) {
                    Some(l) => {
                        used.insert(l);
                    }
                    None => pending_reject = rest.is_empty(),
                }
            }
        }
    }
    let listed: std::collections::BTreeSet<String> = outpost::sources::reasons::REASONS
        .iter()
        .map(|r| r.reason.to_string())
        .collect();
    // Sanity: the scan finds reasons of every kind of source.
    for known in [
        "protobuf",
        "no_object",
        "not_json",
        "line_too_long",
        "crc_error",
        "modbus_exception",
        "too_large",
    ] {
        assert!(used.contains(known), "the scan missed {known}: {used:?}");
    }
    let unlisted: Vec<_> = used.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "used in src/sources but not in reasons.rs: {unlisted:?}"
    );
    let unused: Vec<_> = listed.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "listed in reasons.rs but used nowhere: {unused:?}"
    );
}
