//! Daily summaries (the HACCP log, issue 16 item 5) and calibration due dates (item 6),
//! through the real binary: `outpost report` on databases with explicit times (the
//! daylight-saving days of Europe/Berlin, a day without readings, gaps, excursions,
//! alarms and acknowledgements), its formats and bad input, and the configuration keys
//! `agent.timezone`, `[[devices]]` and `[[reports]]`.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use support::agent::{demo_database, outpost};

const MIN: i64 = 60_000_000;

fn micros(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_micros()
}

/// A database of this build's schema with `fill` run on it.
fn database(dir: &Path, fill: impl FnOnce(&rusqlite::Connection)) -> PathBuf {
    let path = dir.join("outpost.db");
    let mut conn = rusqlite::Connection::open(&path).unwrap();
    outpost::store::schema::migrate(&mut conn).unwrap();
    fill(&conn);
    path
}

static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn reading(conn: &rusqlite::Connection, device: &str, metric: &str, at_us: i64, value: f64) {
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let uid = format!("{n:032x}");
    conn.execute(
        "INSERT INTO readings (uid, source, device, metric, value, unit, observed_at, received_at)
         VALUES (?1, 'test', ?2, ?3, ?4, '°C', ?5, ?5)",
        rusqlite::params![hex_bytes(&uid), device, metric, value, at_us],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO series (source, device, metric, value, unit, observed_at, received_at, count)
         VALUES ('test', ?1, ?2, ?3, '°C', ?4, ?4, 1)
         ON CONFLICT (source, device, metric) DO UPDATE SET value = excluded.value,
             observed_at = MAX(observed_at, excluded.observed_at), count = count + 1",
        rusqlite::params![device, metric, value, at_us],
    )
    .unwrap();
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn event(conn: &rusqlite::Connection, kind: &str, device: &str, at_us: i64, message: Value) {
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    conn.execute(
        "INSERT INTO alert_events (uid, kind, rule, severity, device, metric, value, occurred_at, message)
         VALUES (?1, ?2, 'fridge-warm', 'critical', ?3, 'temperature', 9.5, ?4, ?5)",
        rusqlite::params![
            hex_bytes(&format!("{:032x}", n + (1 << 40))),
            kind,
            device,
            at_us,
            message.to_string()
        ],
    )
    .unwrap();
}

/// Readings every `step` minutes from `from` (inclusive) to `to` (exclusive), value 5.
fn every(conn: &rusqlite::Connection, device: &str, from: &str, to: &str, step: i64) -> usize {
    let (mut t, end) = (micros(from), micros(to));
    let mut n = 0;
    while t < end {
        reading(conn, device, "temperature", t, 5.0);
        t += step * MIN;
        n += 1;
    }
    n
}

fn config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("outpost.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[agent]
gateway_id = "report-test"
timezone = "Europe/Berlin"

[storage]
path = "{}"

[[alerts]]
name = "fridge-warm"
kind = "threshold"
metric = "temperature"
above = 8.0
severity = "critical"

[[alerts]]
name = "fridge-cold"
kind = "threshold"
metric = "temperature"
below = 2.0

[[devices]]
id = "fridge-1"
name = "Vaccine fridge"
location = "Pharmacy, room 2"
calibration_due = "2099-03-01"
{extra}
"#,
            dir.join("outpost.db").display()
        ),
    )
    .unwrap();
    path
}

fn report(config: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut all = vec!["--config", config.to_str().unwrap(), "report"];
    all.extend_from_slice(args);
    outpost(all)
}

fn report_json(config: &Path, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.extend(["--format", "json"]);
    let (code, out, err) = report(config, &args);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn series<'a>(report: &'a Value, device: &str) -> &'a Value {
    report["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["device"] == device)
        .unwrap_or_else(|| panic!("no series of {device} in {report:#}"))
}

#[test]
fn the_spring_daylight_saving_day_has_23_hours_and_its_readings() {
    let dir = tempfile::tempdir().unwrap();
    database(dir.path(), |conn| {
        // Every 10 minutes from 22:00Z on the 28th (23:00 local) to 23:00Z on the 29th.
        every(
            conn,
            "fridge-1",
            "2026-03-28T22:00:00Z",
            "2026-03-29T23:00:00Z",
            10,
        );
    });
    let cfg = config(dir.path(), "");
    let r = report_json(&cfg, &["--day", "2026-03-29"]);
    assert_eq!(r["hours"], 23.0);
    assert_eq!(r["start"], "2026-03-28T23:00:00Z");
    assert_eq!(r["end"], "2026-03-29T22:00:00Z");
    assert_eq!(r["complete"], true);
    let s = series(&r, "fridge-1");
    assert_eq!(s["readings"], 23 * 6, "{s:#}");
    assert_eq!(s["first_at"], "2026-03-28T23:00:00Z");
    assert_eq!(s["last_at"], "2026-03-29T21:50:00Z");
    assert_eq!(s["gaps"].as_array().unwrap().len(), 0, "{s:#}");
    assert_eq!(s["name"], "Vaccine fridge");
    assert_eq!(s["location"], "Pharmacy, room 2");
    // The day before and after are ordinary 24-hour days.
    let before = report_json(&cfg, &["--day", "2026-03-28"]);
    assert_eq!(before["hours"], 24.0);
    assert_eq!(series(&before, "fridge-1")["readings"], 6);
}

#[test]
fn the_autumn_daylight_saving_day_has_25_hours_and_its_readings() {
    let dir = tempfile::tempdir().unwrap();
    database(dir.path(), |conn| {
        every(
            conn,
            "fridge-1",
            "2026-10-24T21:00:00Z",
            "2026-10-26T00:00:00Z",
            10,
        );
    });
    let cfg = config(dir.path(), "");
    let r = report_json(&cfg, &["--day", "2026-10-25"]);
    assert_eq!(r["hours"], 25.0);
    assert_eq!(r["start"], "2026-10-24T22:00:00Z");
    assert_eq!(r["end"], "2026-10-25T23:00:00Z");
    assert_eq!(series(&r, "fridge-1")["readings"], 25 * 6);
    // The table says which day, which zone and how long.
    let (code, out, _) = report(&cfg, &["--day", "2026-10-25"]);
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("Daily summary 2026-10-25 (Europe/Berlin, 25 h day), complete"),
        "{out}"
    );
}

#[test]
fn time_out_of_range_excursions_gaps_and_alarms_with_acknowledgements() {
    let dir = tempfile::tempdir().unwrap();
    database(dir.path(), |conn| {
        // 2026-11-20 in Berlin: 2026-11-19T23:00Z to 2026-11-20T23:00Z. Every 10 min,
        // except a pause 10:00Z–12:00Z; 9.5 °C at 06:00, 06:10, 06:20 (one excursion of
        // 30 min) and 1.0 °C at 15:00 (10 min below 2).
        let mut t = micros("2026-11-19T23:00:00Z");
        let end = micros("2026-11-20T23:00:00Z");
        while t < end {
            let hm = (t - micros("2026-11-20T00:00:00Z")) / MIN;
            let skip = (600..720).contains(&hm);
            let value = match hm {
                360 | 370 | 380 => 9.5,
                900 => 1.0,
                _ => 5.0,
            };
            if !skip {
                reading(conn, "fridge-1", "temperature", t, value);
            }
            t += 10 * MIN;
        }
        reading(
            conn,
            "fridge-2",
            "temperature",
            micros("2026-11-21T08:00:00Z"),
            4.0,
        );
        event(
            conn,
            "firing",
            "fridge-1",
            micros("2026-11-20T06:00:00Z"),
            serde_json::json!({}),
        );
        event(
            conn,
            "acknowledged",
            "fridge-1",
            micros("2026-11-20T06:05:00Z"),
            serde_json::json!({"by": "Anna Schmidt", "note": "door was open, closed it"}),
        );
        event(
            conn,
            "resolved",
            "fridge-1",
            micros("2026-11-20T06:30:00Z"),
            serde_json::json!({}),
        );
    });
    let cfg = config(dir.path(), "");
    let r = report_json(&cfg, &["--day", "2026-11-20"]);
    let s = series(&r, "fridge-1");
    assert_eq!(s["readings"], 144 - 12, "{s:#}");
    assert_eq!(s["max"], 9.5);
    assert_eq!(s["min"], 1.0);
    let warm = s["out_of_range"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["rule"] == "fridge-warm")
        .unwrap();
    assert_eq!(warm["seconds"], 1800, "{s:#}");
    assert_eq!(warm["excursions"], 1);
    assert_eq!(warm["condition"], "above 8");
    let cold = s["out_of_range"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["rule"] == "fridge-cold")
        .unwrap();
    assert_eq!(cold["seconds"], 600);
    let gaps = s["gaps"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{s:#}");
    assert_eq!(gaps[0]["from"], "2026-11-20T09:50:00Z");
    assert_eq!(gaps[0]["to"], "2026-11-20T12:00:00Z");
    let kinds: Vec<&str> = s["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["firing", "acknowledged", "resolved"]);
    assert_eq!(s["alarms"][1]["by"], "Anna Schmidt");
    assert_eq!(s["alarms"][1]["note"], "door was open, closed it");
    // fridge-2 (not in [[devices]]) has readings only on the next day: not listed.
    assert!(!r["series"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["device"] == "fridge-2"));

    let (code, out, err) = report(&cfg, &["--day", "2026-11-20"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("fridge-warm above 8: 30m out of range, 1 excursion(s)"),
        "{out}"
    );
    assert!(out.contains("no readings 10:50–13:00 (2h10m)"), "{out}");
    assert!(
        out.contains("07:05 acknowledged fridge-warm (critical) by Anna Schmidt: \"door was open, closed it\""),
        "{out}"
    );
    assert!(out.contains("Vaccine fridge (Pharmacy, room 2)"), "{out}");

    let (code, csv, _) = report(&cfg, &["--day", "2026-11-20", "--format", "csv"]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[0].starts_with("day,timezone,hours,complete,device,name,location,metric"));
    assert!(
        lines[1].starts_with(
            "2026-11-20,Europe/Berlin,24,true,fridge-1,Vaccine fridge,\"Pharmacy, room 2\",temperature,°C,132,1,9.5,"
        ),
        "{csv}"
    );
    assert!(lines[1].ends_with(",1,7800,1800,2,3,1"), "{csv}");

    // --device: only that device (fridge-2 has readings on the next day only).
    let only = report_json(&cfg, &["--day", "2026-11-21", "--device", "fridge-2"]);
    assert_eq!(only["series"].as_array().unwrap().len(), 1);
    assert_eq!(only["series"][0]["device"], "fridge-2");
    assert_eq!(only["series"][0]["readings"], 1);
    let (code, out, _) = report(&cfg, &["--day", "2026-11-20", "--device", "fridge-2"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("No readings on 2026-11-20 (Europe/Berlin)."),
        "{out}"
    );
}

#[test]
fn a_day_without_readings_says_so() {
    let dir = tempfile::tempdir().unwrap();
    database(dir.path(), |_| {});
    let cfg = config(dir.path(), "");
    let (code, out, err) = report(&cfg, &["--day", "2026-01-15"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("No readings on 2026-01-15 (Europe/Berlin)."),
        "{out}"
    );
    // The listed device is there, with no readings and the whole day as a gap.
    let r = report_json(&cfg, &["--day", "2026-01-15"]);
    let s = series(&r, "fridge-1");
    assert_eq!(s["readings"], 0);
    assert_eq!(s["metric"], "");
    assert_eq!(s["gap_seconds"], 86400);
    let (_, csv, _) = report(&cfg, &["--day", "2026-01-15", "--format", "csv"]);
    assert_eq!(csv.lines().count(), 2, "{csv}");
}

#[test]
fn bad_days_devices_and_zones_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    database(dir.path(), |_| {});
    let cfg = config(dir.path(), "");
    for (day, expected) in [
        (
            "2026-02-30",
            "expected a date like \"2027-03-01\" (YYYY-MM-DD), found \"2026-02-30\"",
        ),
        ("05.12.2026", "YYYY-MM-DD"),
        ("tomorrow", "YYYY-MM-DD"),
        ("2999-01-01", "has not begun yet in Europe/Berlin"),
        ("", "YYYY-MM-DD"),
    ] {
        let (code, out, err) = report(&cfg, &["--day", day]);
        assert_eq!(code, Some(2), "{day}: {out} {err}");
        assert!(
            err.contains("--day: ") && err.contains(expected),
            "{day}: {err}"
        );
        assert!(out.is_empty());
    }
    let long = "x".repeat(100_000);
    let (code, _, err) = report(&cfg, &["--day", &long]);
    assert_eq!(code, Some(2));
    assert!(err.len() < 500, "the error repeats the whole input");
    let (code, _, err) = report(&cfg, &["--device", "fridge 1; DROP TABLE readings"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--device"), "{err}");
    let (code, _, err) = report(&cfg, &["--timezone", "Mars/Olympus_Mons"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("unknown time zone \"Mars/Olympus_Mons\""),
        "{err}"
    );
    let (code, _, err) = report(&cfg, &["--format", "xml"]);
    assert_eq!(code, Some(2), "{err}");
}

fn check(dir: &Path, agent_extra: &str, extra: &str) -> (Option<i32>, String) {
    let path = dir.join("check.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\ngateway_id = \"gw\"\n{agent_extra}\n[storage]\npath = \"{}\"\n\n[[notifiers]]\ntype = \"log\"\nname = \"qa-log\"\n{extra}\n",
            dir.join("x.db").display()
        ),
    )
    .unwrap();
    let (code, out, err) = outpost(["--config", path.to_str().unwrap(), "check"]);
    (code, format!("{out}{err}"))
}

#[test]
fn configuration_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = check(dir.path(), "timezone = \"Mars/Olympus_Mons\"", "");
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("agent.timezone: unknown time zone \"Mars/Olympus_Mons\""),
        "{out}"
    );
    let (code, out) = check(dir.path(), "timezone = 5", "");
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("agent.timezone"), "{out}");
    let (code, out) = check(dir.path(), "timezone = \"Europe/Berlin\"", "");
    assert_eq!(code, Some(0), "{out}");

    let (code, out) = check(
        dir.path(),
        "",
        r#"
[[devices]]
id = "fridge-1"
calibration_due = "2027-02-30"
[[devices]]
id = "fridge-1"
[[devices]]
id = "bad id!"
name = "line\nbreak"
[[devices]]
calibration_due = "soon"
[[reports]]
at = "7am"
notifiers = ["qa-mail"]
[[reports]]
notifiers = []
"#,
    );
    assert_eq!(code, Some(2), "{out}");
    for expected in [
        "devices[0].calibration_due: expected a date like \"2027-03-01\" (YYYY-MM-DD), found \"2027-02-30\"",
        "devices[1].id: device id \"fridge-1\" is already used by devices[0]",
        "devices[2].id: the device id \"bad id!\" contains ' '",
        "devices[2].name: at most 200 characters, no control characters",
        "devices[3].id: the required key `id` is missing",
        "reports[0].at: expected a local time like \"07:00\" (HH:MM, 24-hour), found \"7am\"",
        "reports[0].notifiers[0]: no `[[notifiers]]` table is named \"qa-mail\"",
        "reports[1].notifiers: name at least one `[[notifiers]]` table",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    let (code, out) = check(
        dir.path(),
        "",
        "[[notifiers]]\ntype = \"webhook\"\nname = \"hook\"\nurl = \"https://example.com/h\"\n[[reports]]\nnotifiers = [\"hook\"]\n",
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("reports[0].notifiers[0]: \"hook\" is a webhook notifier; reports are sent by email or log notifiers"),
        "{out}"
    );
    let huge = "n".repeat(1 << 20);
    let (code, out) = check(
        dir.path(),
        "",
        &format!("[[devices]]\nid = \"f\"\nlocation = \"{huge}\"\n"),
    );
    assert_eq!(code, Some(2));
    assert!(out.contains("devices[0].location: at most 200 characters"));
    assert!(out.len() < 10_000, "the error repeats the whole value");

    let (code, out) = check(
        dir.path(),
        "timezone = \"America/New_York\"",
        "[[devices]]\nid = \"fridge-1\"\nname = \"Vaccine fridge\"\nlocation = \"Room 2\"\ncalibration_due = \"2027-03-01\"\ngap = \"20m\"\n[[reports]]\nat = \"06:30\"\nnotifiers = [\"qa-log\"]\ndevices = [\"fridge-*\"]\n",
    );
    assert_eq!(code, Some(0), "{out}");
}

#[test]
fn a_demo_database_reports_without_a_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let db = demo_database(dir.path(), "3s");
    let (code, out, err) = outpost([
        "--config",
        "/nonexistent/outpost.toml",
        "report",
        "--db",
        db.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("Daily summary "), "{out}");
    assert!(out.contains("(UTC, 24 h day), so far, until"), "{out}");
    assert!(out.contains("DEVICE"), "{out}");
}

/// The running agent keeps yesterday's summary in `daily_summaries`, emails it with
/// its CSV once `at` has passed (real aiosmtpd), warns about calibration in the log,
/// `/health`, `/metrics` and `outpost status`, notifies each threshold once, and sends
/// nothing twice after a restart.
#[test]
fn the_agent_keeps_and_mails_the_daily_summary_and_warns_about_calibration() {
    use support::agent::Agent;
    use support::{free_port, SmtpOptions, SmtpServer};
    let smtp = SmtpServer::start(SmtpOptions::new());
    let dir = tempfile::tempdir().unwrap();
    let tz = outpost::report::Tz::load("Europe/Berlin").unwrap();
    let now = chrono::Utc::now();
    let yesterday = (now.with_timezone(&tz).date_naive()).pred_opt().unwrap();
    let bounds = outpost::report::summary::DayBounds::of(tz, yesterday).unwrap();
    let start_us = bounds.start.timestamp_micros();
    database(dir.path(), |conn| {
        let mut n = 0;
        let mut t = start_us;
        while t < bounds.end.timestamp_micros() {
            reading(
                conn,
                "fridge-1",
                "temperature",
                t,
                if n == 3 { 9.0 } else { 5.0 },
            );
            t += 15 * MIN;
            n += 1;
        }
    });
    let today = now.with_timezone(&tz).date_naive();
    let overdue = (today - chrono::Days::new(3)).to_string();
    let soon = (today + chrono::Days::new(10)).to_string();
    let port = free_port();
    let extra = format!(
        r#"
[[devices]]
id = "fridge-2"
name = "Freezer"
calibration_due = "{overdue}"

[[devices]]
id = "fridge-3"
calibration_due = "{soon}"

[[reports]]
at = "00:00"
notifiers = ["qa-mail"]

[[notifiers]]
name = "qa-mail"
type = "email"
server = "127.0.0.1"
port = {}
tls = "none"
from = "outpost@example.com"
to = ["qa@example.com"]
timeout = "5s"

[http]
listen = "127.0.0.1:{port}"
"#,
        smtp.port()
    );
    let cfg = config(dir.path(), &extra);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut agent = Agent::new(dir.path(), &text).start();

    // The closed day is kept, complete, per device and metric.
    let day = yesterday.to_string();
    agent.wait_until("yesterday's summary", || {
        agent.try_count(&format!(
            "SELECT COUNT(*) FROM daily_summaries WHERE day = '{day}' AND device = 'fridge-1' AND complete = 1"
        )) == Some(1)
    });
    let readings = agent.count(&format!(
        "SELECT readings FROM daily_summaries WHERE day = '{day}' AND device = 'fridge-1'"
    ));
    assert_eq!(readings as f64, bounds.hours() * 4.0);
    assert_eq!(
        agent.count(&format!(
            "SELECT out_of_range_seconds FROM daily_summaries WHERE day = '{day}' AND device = 'fridge-1'"
        )),
        900
    );

    // `outpost report` reads the same while the service runs: the stored day, and
    // today so far.
    let (code, out, err) = report(&cfg, &["--day", "yesterday", "--format", "json"]);
    assert_eq!(code, Some(0), "{err}");
    let stored: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stored["day"], day.as_str());
    assert_eq!(stored["complete"], true);
    assert_eq!(series(&stored, "fridge-1")["readings"], readings);
    let (code, out, err) = report(&cfg, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("so far, until"), "{out}");

    // Two calibration notices (overdue, soon) and the report.
    let mails = smtp.wait_for_messages(3, std::time::Duration::from_secs(30));
    assert_eq!(mails.len(), 3);
    let all: Vec<String> = mails.iter().map(|m| m.data_str()).collect();
    let report = all
        .iter()
        .find(|m| m.contains(&format!("Daily summary {day}")))
        .unwrap_or_else(|| panic!("no report in {all:#?}"));
    assert!(report.contains("multipart/mixed"), "{report}");
    assert!(
        report.contains(&format!("filename=\"summary-{day}.csv\"")),
        "{report}"
    );
    assert!(report.contains("text/csv"), "{report}");
    assert!(
        report.contains("fridge-warm above 8: 15m out of range, 1 excursion(s)"),
        "{report}"
    );
    // The CSV part carries the header (base64 or quoted-printable: decode loosely).
    assert!(
        report.contains("day,timezone,hours,complete,device")
            || report.contains(&base64_of("day,timezone,hours,complete,device")[..20]),
        "{report}"
    );
    assert!(
        all.iter()
            .any(|m| m.contains("fridge-2 (Freezer): calibration due")
                && m.contains("overdue by 3 days")),
        "{all:#?}"
    );
    assert!(all
        .iter()
        .any(|m| m.contains("fridge-3: calibration due") && m.contains("in 10 days")));

    // /health: informational, never failing; /metrics: days left per device.
    let health = agent.wait_check("calibration", |c| c["ok"] == true);
    let detail = health["detail"].as_str().unwrap();
    assert!(
        detail.contains("overdue by 3 days") && detail.contains("in 10 days"),
        "{detail}"
    );
    let metrics = agent.metrics();
    assert!(
        metrics.contains("outpost_device_calibration_due_days{device=\"fridge-2\"} -3"),
        "{metrics}"
    );
    assert!(metrics.contains("outpost_device_calibration_due_days{device=\"fridge-3\"} 10"));
    let status = agent.status_text();
    assert!(
        status.contains("Calibration: fridge-2 (Freezer): calibration due"),
        "{status}"
    );
    assert!(
        !status.contains("Calibration: fridge-1"),
        "not due for decades: {status}"
    );
    let json = agent.status_json();
    assert_eq!(json["calibration"].as_array().unwrap().len(), 3);
    assert!(agent.log().contains("calibration due"), "warned in the log");

    // A restart sends nothing again: the report and each threshold are remembered.
    agent.terminate();
    agent.start_again();
    agent.wait_check("calibration", |c| c["ok"] == true);
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(smtp.messages().len(), 3, "sent again after a restart");
}

fn base64_of(text: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = text.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// Closed days' summaries reach `outpost.daily_summaries` (central schema version 3)
/// through a real PgBouncer in transaction mode, one row per gateway, day, device and
/// metric, are marked synced locally, and a day recomputed after a late reading
/// replaces its central row.
#[test]
fn summaries_sync_to_central_through_pgbouncer() {
    use support::agent::Agent;
    use support::{PgBouncer, Postgres};
    let pg = Postgres::start();
    let bouncer = PgBouncer::start(&pg);
    pg.outpost_central_migrate();
    assert_eq!(
        pg.psql("SELECT MAX(version) FROM outpost.schema_version")
            .trim(),
        outpost::sync::central::SCHEMA_VERSION.to_string()
    );
    let dir = tempfile::tempdir().unwrap();
    let tz = outpost::report::Tz::load("Europe/Berlin").unwrap();
    let now = chrono::Utc::now();
    let yesterday = now.with_timezone(&tz).date_naive().pred_opt().unwrap();
    let bounds = outpost::report::summary::DayBounds::of(tz, yesterday).unwrap();
    database(dir.path(), |conn| {
        for i in 0..6 {
            reading(
                conn,
                "fridge-1",
                "temperature",
                bounds.start.timestamp_micros() + i * 60 * MIN,
                [4.0, 5.0, 9.0, 9.0, 5.0, 4.0][i as usize],
            );
        }
    });
    let extra = format!(
        "[sync]\nurl = \"postgres://{}@127.0.0.1:{}/{}\"\npassword = \"{}\"\nsslmode = \"disable\"\ninterval = \"1s\"\n",
        pg.user(),
        bouncer.port(),
        pg.database(),
        pg.password()
    );
    let cfg = config(dir.path(), &extra);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let agent = Agent::new(dir.path(), &text)
        .env("OUTPOST_TEST_REPORT_ROUND", "1")
        .start();
    let day = yesterday.to_string();
    let query = format!(
        "SELECT gateway_id, day, device, metric, timezone, readings, min, max, \
         out_of_range_seconds, excursions, detail->>'name' FROM outpost.daily_summaries \
         WHERE device = 'fridge-1' AND day = '{day}'"
    );
    agent.wait_until("the summary in central", || {
        pg.psql(&query).contains("report-test")
    });
    let row = pg.psql(&query);
    let cells: Vec<&str> = row.trim().split('|').collect();
    assert_eq!(
        cells,
        [
            "report-test",
            day.as_str(),
            "fridge-1",
            "temperature",
            "Europe/Berlin",
            "6",
            "4",
            "9",
            "7200",
            "1",
            "Vaccine fridge"
        ],
        "{row}"
    );
    agent.wait_until("marked synced", || {
        agent.try_count("SELECT COUNT(*) FROM daily_summaries WHERE synced = 0") == Some(0)
    });
    // A late reading of yesterday (e.g. a backfill): the day is recomputed and its
    // central row replaced, not duplicated.
    {
        let conn = rusqlite::Connection::open(dir.path().join("outpost.db")).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        reading(
            &conn,
            "fridge-1",
            "temperature",
            bounds.start.timestamp_micros() + 6 * 60 * MIN,
            3.0,
        );
    }
    agent.wait_until("the recomputed day in central", || {
        pg.psql(&format!(
            "SELECT readings FROM outpost.daily_summaries WHERE device = 'fridge-1' AND day = '{day}'"
        ))
        .trim()
            == "7"
    });
    assert_eq!(
        pg.psql(&format!(
            "SELECT min FROM outpost.daily_summaries WHERE device = 'fridge-1' AND day = '{day}'"
        ))
        .trim(),
        "3"
    );

    // One row per day and series: the retention's closed days (no readings: 0).
    assert_eq!(
        pg.psql(&format!(
            "SELECT COUNT(*) FROM outpost.daily_summaries WHERE gateway_id = 'report-test' AND day = '{day}'"
        ))
        .trim(),
        "1"
    );
    assert_eq!(
        pg.psql(
            "SELECT COUNT(*) FROM outpost.daily_summaries WHERE gateway_id = 'report-test' AND readings = 0"
        )
        .trim(),
        "7",
        "the other closed days of the 7-day retention say they had no readings"
    );
}

/// G8: the morning report follows the agent's wall clock; when that clock is stepped
/// back (here: two days ahead, then corrected), no day is sent twice, before or after
/// a restart.
#[test]
fn a_clock_stepped_back_never_sends_a_report_again() {
    use support::agent::Agent;
    use support::{SmtpOptions, SmtpServer};
    let smtp = SmtpServer::start(SmtpOptions::new());
    let dir = tempfile::tempdir().unwrap();
    database(dir.path(), |_| {});
    let offset = dir.path().join("clock-offset");
    std::fs::write(&offset, "172800\n").unwrap();
    let extra = format!(
        "[[reports]]\nat = \"00:00\"\nnotifiers = [\"qa-mail\"]\n\n[[notifiers]]\nname = \"qa-mail\"\ntype = \"email\"\nserver = \"127.0.0.1\"\nport = {}\ntls = \"none\"\nfrom = \"outpost@example.com\"\nto = [\"qa@example.com\"]\ntimeout = \"5s\"\n",
        smtp.port()
    );
    let cfg = config(dir.path(), &extra);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut agent = Agent::new(dir.path(), &text)
        .env("OUTPOST_TEST_CLOCK_OFFSET_FILE", &offset)
        .start();
    let tz = outpost::report::Tz::load("Europe/Berlin").unwrap();
    let stepped_yesterday = (chrono::Utc::now() + chrono::Duration::days(2))
        .with_timezone(&tz)
        .date_naive()
        .pred_opt()
        .unwrap();
    let mails = smtp.wait_for_messages(1, std::time::Duration::from_secs(30));
    assert!(
        mails[0]
            .data_str()
            .contains(&format!("Daily summary {stepped_yesterday}")),
        "{}",
        mails[0].data_str()
    );
    // The clock is corrected: "yesterday" is two days earlier than the day sent.
    std::fs::write(&offset, "0\n").unwrap();
    agent.terminate();
    agent.start_again();
    agent.wait_until("the agent's first round", || {
        agent.try_count("SELECT COUNT(*) FROM source_state WHERE source = 'reports'") == Some(1)
    });
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(
        smtp.messages().len(),
        1,
        "a day was sent again after the clock step"
    );
}
