//! The binary as a technician uses it: `demo`, `status`, `run` with SIGTERM, `--help`.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::agent::{demo_database, outpost, Agent};

const BIN: &str = env!("CARGO_BIN_EXE_outpost");

#[test]
fn demo_shows_committed_readings_within_5s_and_status_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(["demo", "--duration", "20s", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut first_commit = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line.contains("committed #") {
            first_commit = Some(started.elapsed());
            break;
        }
    }
    let first = first_commit.expect("the demo printed committed readings");
    assert!(
        first < Duration::from_secs(5),
        "first committed reading after {first:?}"
    );
    let _ = child.kill();
    let _ = child.wait();

    let db = dir.path().join("outpost.db");
    let (code, text, err) = outpost(["status", "--db", db.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        text.contains("coldroom-1") && text.contains("temperature"),
        "{text}"
    );
    assert!(text.contains("backlog:"), "{text}");

    let (_, json, _) = outpost(["status", "--json", "--db", db.to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(json["total_readings"].as_i64().unwrap() >= 1);
}

/// Eight devices every 10 ms, committed in batches of at most 200 ms.
fn fast_config(dir: &Path) -> String {
    format!(
        "[agent]\ngateway_id = \"t\"\n[storage]\npath = \"{}\"\nbatch_max_delay = \"200ms\"\n\
         [[sources]]\ntype = \"simulated\"\nname = \"fast\"\nperiod = \"10ms\"\n\
         devices = [\"a\", \"b\", \"c\", \"d\", \"e\", \"f\", \"g\", \"h\"]\n",
        dir.join("outpost.db").display()
    )
}

#[test]
fn sigterm_commits_everything_and_exits_within_5s() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::new(dir.path(), &fast_config(dir.path())).start();
    std::thread::sleep(Duration::from_secs(2));
    let status = agent.terminate_within(Duration::from_secs(5));
    assert!(status.success(), "exit status {status:?}");
    let log = agent.log();
    assert!(log.contains("everything accepted is committed"), "{log}");

    let conn = rusqlite::Connection::open(dir.path().join("outpost.db")).unwrap();
    let n: i64 = conn
        .query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))
        .unwrap();
    assert!(n >= 16, "readings were stored: {n}");
    assert_eq!(n % 8, 0, "batches of 8 devices are committed whole: {n}");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    // The series summary agrees with the table: every committed batch was complete.
    let series: i64 = conn
        .query_row("SELECT SUM(count) FROM series", [], |r| r.get(0))
        .unwrap();
    assert_eq!(series, n);
}

#[test]
fn status_without_a_database_says_so() {
    let (code, _, err) = outpost(["status", "--db", "/nonexistent/outpost.db"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("no database at /nonexistent/outpost.db"));
}

#[test]
fn version_and_help() {
    let (_, version, _) = outpost(["--version"]);
    assert!(version.starts_with("outpost "));
    for cmd in [
        &["--help"][..],
        &["demo", "--help"],
        &["check", "--help"],
        &["status", "--help"],
        &["run", "--help"],
    ] {
        let (code, help, _) = outpost(cmd);
        assert_eq!(code, Some(0), "{cmd:?}");
        assert!(!help.is_empty());
    }
}

#[test]
fn readings_queries_local_history_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo_database(dir.path(), "3s");
    let run = |args: &[&str]| outpost([&["readings", "--db", db.to_str().unwrap()], args].concat());
    let (code, table, _) = run(&[
        "--device",
        "coldroom-2",
        "--metric",
        "humidity",
        "--limit",
        "2",
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(table.lines().count(), 3, "header and two rows:\n{table}");
    assert!(
        table.contains("coldroom-2") && !table.contains("coldroom-1"),
        "{table}"
    );

    let (_, csv, _) = run(&["--format", "csv", "--since", "1h"]);
    assert!(
        csv.starts_with("observed_at,device,metric,value,unit,source,flags,synced\n"),
        "{csv}"
    );
    assert!(csv.lines().count() > 4);

    let (_, json, _) = run(&[
        "--format",
        "json",
        "--metric",
        "temperature",
        "--limit",
        "3",
    ]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["metric"] == "temperature"));
    assert!(
        rows[0]["observed_at"].as_str().unwrap() >= rows[1]["observed_at"].as_str().unwrap(),
        "newest first"
    );

    let (_, none, _) = run(&["--device", "'; DROP TABLE readings; --"]);
    assert!(none.contains("No readings match"), "{none}");
    let (code, _, err) = run(&["--since", "last tuesday"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--since: expected a duration ago"), "{err}");
    let (code, _, err) = run(&["--limit", "0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--limit must be between"), "{err}");
    let (_, table, _) = run(&["--until", "2000-01-01T00:00:00Z"]);
    assert!(table.contains("No readings match"));
}

/// A database as the agent leaves it, with kept rejected messages (hostile ones too).
fn database_with_rejections(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("outpost.db");
    let mut conn = rusqlite::Connection::open(&path).unwrap();
    outpost::store::schema::migrate(&mut conn).unwrap();
    let now = chrono::Utc::now().timestamp_micros();
    let mut pb = vec![0x0a, 36, 0xff];
    pb.extend_from_slice(b"7c1d2a9e");
    type Row<'a> = (&'a str, &'a str, Option<&'a str>, &'a str, &'a [u8]);
    let rows: [Row; 4] = [
        (
            "chirp",
            "invalid_json",
            Some("application/a/device/01/event/up"),
            "not valid JSON: expected value",
            b"23.5 C",
        ),
        (
            "chirp",
            "protobuf",
            Some("application/a/device/01/event/up"),
            "the payload is Protobuf",
            &pb,
        ),
        (
            "probe",
            "not_json",
            None,
            "not JSON: x",
            b"\x1b[2J\x1b]0;pwned\x07",
        ),
        (
            "chirp",
            "invalid_json",
            Some("application/a/device/02/event/up"),
            "not valid JSON",
            b"hello",
        ),
    ];
    for (i, (source, reason, topic, detail, payload)) in rows.iter().enumerate() {
        conn.execute(
            "INSERT INTO rejected(source, reason, topic, detail, payload, received_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            rusqlite::params![source, reason, topic, detail, payload, now - 1000 + i as i64],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO rejected_reasons VALUES (?1, ?2, 1, ?3, ?4)
             ON CONFLICT(source, reason) DO UPDATE SET count = count + 1, last_at = excluded.last_at",
            rusqlite::params![source, reason, now - 1000 + i as i64, detail],
        )
        .unwrap();
    }
    path
}

/// `outpost ARGS… --db DB`: (exit code, stdout, stderr).
fn run_outpost(args: &[&str], db: &Path) -> (Option<i32>, String, String) {
    outpost([args, &["--db", db.to_str().unwrap()]].concat())
}

#[test]
fn rejected_lists_kept_messages_with_hints() {
    let dir = tempfile::tempdir().unwrap();
    let db = database_with_rejections(dir.path());

    let (code, table, err) = run_outpost(&["rejected"], &db);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("TIME") && lines[0].contains("PAYLOAD"),
        "{table}"
    );
    assert!(
        lines[1].contains("chirp") && lines[1].contains("hello"),
        "newest first:\n{table}"
    );
    assert!(
        table.contains("hex: 0a 24 ff 37"),
        "binary payloads in hex:\n{table}"
    );
    assert!(
        !table.contains('\x1b') && !table.contains('\x07'),
        "escape sequences are escaped:\n{table:?}"
    );
    assert!(table.contains("\\u{1b}[2J"), "{table}");
    assert!(table.contains("What to do:\n"), "{table}");
    assert!(
        table.contains("  protobuf: set `json = true` in [integration.mqtt] of chirpstack.toml"),
        "{table}"
    );

    let (code, json, _) = run_outpost(
        &[
            "rejected",
            "--source",
            "chirp",
            "--reason",
            "invalid_json",
            "--format",
            "json",
        ],
        &db,
    );
    assert_eq!(code, Some(0));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 2, "{json}");
    assert_eq!(rows[0]["payload"], "hello");
    assert_eq!(rows[1]["payload"], "23.5 C");
    assert_eq!(rows[1]["topic"], "application/a/device/01/event/up");
    assert_eq!(rows[1]["reason"], "invalid_json");
    assert!(rows[1]["hint"].as_str().unwrap().contains("send JSON"));
    assert!(rows[1]["received_at"].as_str().unwrap().contains('T'));

    let (_, json, _) = run_outpost(&["rejected", "--limit", "1", "--format", "json"], &db);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 1);
    let (_, none, _) = run_outpost(&["rejected", "--source", "nobody"], &db);
    assert!(none.contains("No rejected input"), "{none}");

    // Status: per source, the count by reason, when the last came and what to do.
    let (code, text, _) = run_outpost(&["status"], &db);
    assert_eq!(code, Some(0));
    let row = text
        .lines()
        .find(|l| l.starts_with("chirp") && l.contains("invalid_json"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.contains("  2  ")
            && row.contains("s ago")
            && row.contains("make the publisher send JSON"),
        "{row}"
    );
    assert!(
        text.contains("Rejected input (`outpost rejected` lists the messages):"),
        "{text}"
    );
    let (_, json, _) = run_outpost(&["status", "--json"], &db);
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let list = status["rejections"].as_array().unwrap();
    assert_eq!(list.len(), 3, "{list:?}");
    let protobuf = list.iter().find(|r| r["reason"] == "protobuf").unwrap();
    assert_eq!(protobuf["source"], "chirp");
    assert_eq!(protobuf["count"], 1);
    assert!(protobuf["hint"].as_str().unwrap().contains("json = true"));
    assert!(protobuf["last_at"].as_str().is_some());
}

#[test]
fn rejected_refuses_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let db = database_with_rejections(dir.path());
    for (args, expected) in [
        (
            &["rejected", "--limit", "0"][..],
            "--limit must be between 1 and 1000",
        ),
        (
            &["rejected", "--limit", "1001"],
            "--limit must be between 1 and 1000",
        ),
        (&["rejected", "--limit", "-1"], "unexpected argument '-1'"),
        (
            &["rejected", "--limit=-1"],
            "invalid value '-1' for '--limit",
        ),
        (
            &["rejected", "--limit", "99999999999999999999999"],
            "--limit",
        ),
        (&["rejected", "--limit", "many"], "--limit"),
        (
            &["rejected", "--reason", "protobuff"],
            "--reason: unknown reason \"protobuff\"; one of too_large",
        ),
        (&["rejected", "--reason", ""], "--reason: unknown reason"),
        (
            &["rejected", "--source", "'; DROP TABLE rejected; --"],
            "--source: the source name",
        ),
        (
            &["rejected", "--source", &"a".repeat(100_000)],
            "--source: the source name is longer than 64",
        ),
        (
            &["rejected", "--format", "xml"],
            "invalid value 'xml' for '--format",
        ),
        (
            &["rejected", "--source"],
            "a value is required for '--source",
        ),
    ] {
        let (code, _, err) = run_outpost(args, &db);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // The table is intact after the hostile source name.
    let (code, json, _) = run_outpost(&["rejected", "--format", "json"], &db);
    assert_eq!(code, Some(0));
    assert_eq!(
        serde_json::from_str::<Vec<serde_json::Value>>(&json)
            .unwrap()
            .len(),
        4
    );
    let (code, _, err) = run_outpost(&["rejected"], Path::new("/nonexistent/outpost.db"));
    assert_eq!(code, Some(1));
    assert!(err.contains("no database at"), "{err}");
}

/// `[display] precision` decides how `outpost readings` and `outpost status` show a
/// metric, the series table and the alert rows alike; other metrics keep the default.
#[test]
fn values_are_shown_with_the_configured_precision_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo_database(dir.path(), "3s");
    let config = dir.path().join("display.toml");
    std::fs::write(&config, "[display]\nprecision = { temperature = 3 }\n").unwrap();
    let run = |args: &[&str]| {
        let (code, stdout, stderr) = outpost(
            [
                &["--config", config.to_str().unwrap()],
                args,
                &["--db", db.to_str().unwrap()],
            ]
            .concat(),
        );
        assert_eq!(code, Some(0), "{stderr}");
        stdout
    };
    let three_decimals = |cell: &str| {
        let number = cell.trim().trim_end_matches("°C").trim();
        number.split_once('.').is_some_and(|(_, d)| d.len() == 3)
    };
    let table = run(&["readings", "--metric", "temperature", "--limit", "5"]);
    let values: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split("  ").find(|c| c.contains("°C")))
        .collect();
    assert_eq!(values.len(), 5, "{table}");
    assert!(values.iter().all(|v| three_decimals(v)), "{table}");

    let status = run(&["status"]);
    let temperatures: Vec<&str> = status
        .lines()
        .filter_map(|l| l.split("  ").find(|c| c.contains("°C")))
        .collect();
    assert!(!temperatures.is_empty(), "{status}");
    for cell in temperatures {
        let cell = cell.trim().trim_start_matches("temperature ");
        assert!(three_decimals(cell), "{cell:?} in\n{status}");
    }
    // A metric without a precision: at most two decimals, no trailing zero.
    let humidity = run(&["readings", "--metric", "humidity", "--limit", "20"]);
    for line in humidity.lines().skip(1) {
        let cell = line
            .split("  ")
            .find(|c| c.contains('%'))
            .unwrap_or_else(|| panic!("{humidity}"));
        let number = cell.trim().trim_end_matches('%').trim();
        let decimals = number.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(
            decimals <= 2 && !number.ends_with('0') || !number.contains('.'),
            "{cell:?}"
        );
    }
}
