//! SIGHUP reload while readings flow: a valid configuration is applied (only changed
//! sources restart), an invalid one is refused and logged, nothing is lost.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::agent::AgentProcess as Agent;

fn config(db: &Path, sources: &[(&str, &str)], extra: &str) -> String {
    let mut text = format!(
        "[storage]\npath = \"{}\"\n[http]\nenabled = false\n{extra}",
        db.display()
    );
    for (name, period) in sources {
        text.push_str(&format!(
            "[[sources]]\ntype = \"simulated\"\nname = \"{name}\"\nperiod = \"{period}\"\n"
        ));
    }
    text
}

/// Readings of `source`; 0 while the agent has not created its tables yet (the
/// database file exists a moment before its schema).
fn count(db: &Path, source: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn.query_row(
        "SELECT COUNT(*) FROM readings WHERE source = ?1",
        [source],
        |r| r.get(0),
    )
    .unwrap_or(0)
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn hup(agent: &Agent) {
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGHUP) };
}

#[test]
fn sighup_applies_valid_changes_and_refuses_invalid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outpost.db");
    let path = dir.path().join("outpost.toml");
    let log = dir.path().join("agent.log");
    std::fs::write(&path, config(&db, &[("a", "50ms")], "")).unwrap();
    let agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["run", "--config"])
            .arg(&path)
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap(),
    );
    wait_until(Duration::from_secs(20), || {
        db.exists() && count(&db, "a") >= 5
    });

    // A valid change: a new source appears; `a` is unchanged and keeps running.
    std::fs::write(&path, config(&db, &[("a", "50ms"), ("b", "50ms")], "")).unwrap();
    hup(&agent);
    wait_until(Duration::from_secs(20), || count(&db, "b") >= 5);
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("Configuration reloaded"), "{log_text}");
    assert!(log_text.contains("started=[\"b\"]"), "{log_text}");
    assert!(
        !log_text.contains("restarted=[\"a\"]"),
        "an unchanged source is not restarted"
    );

    // An invalid file: refused with its errors, the running configuration stays.
    std::fs::write(
        &path,
        "[storage]\nbatch_max_rows = \"lots\"\n[[sources]]\ntype = \"simulated\"\n",
    )
    .unwrap();
    hup(&agent);
    wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("the running one stays in effect")
    });
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("storage.batch_max_rows: expected a whole number"),
        "{log_text}"
    );
    assert!(
        log_text.contains("sources[0].name: the required key `name` is missing"),
        "{log_text}"
    );
    let (a, b) = (count(&db, "a"), count(&db, "b"));
    wait_until(Duration::from_secs(20), || {
        count(&db, "a") > a + 3 && count(&db, "b") > b + 3
    });

    // Remove `b` and change `a`: `b` stops, `a` restarts with its new period.
    std::fs::write(&path, config(&db, &[("a", "20ms")], "")).unwrap();
    hup(&agent);
    wait_until(Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("stopped=[\"b\"]")
    });
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(log_text.contains("restarted=[\"a\"]"), "{log_text}");
    std::thread::sleep(Duration::from_millis(500));
    let b_after = count(&db, "b");
    let a_after = count(&db, "a");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(count(&db, "b"), b_after, "a removed source stops");
    assert!(count(&db, "a") > a_after, "the changed source runs again");

    // Alert rules and notifiers reload live: a new rule that holds at once fires.
    let rules = "[[notifiers]]\nname = \"journal\"\ntype = \"log\"\n\
                 [[alerts]]\nname = \"always\"\nkind = \"threshold\"\nmetric = \"temperature\"\n\
                 above = -100.0\nnotifiers = [\"journal\"]\n";
    std::fs::write(&path, config(&db, &[("a", "20ms")], rules)).unwrap();
    hup(&agent);
    wait_until(Duration::from_secs(20), || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.query_row(
            "SELECT COUNT(*) FROM alert_events WHERE kind = 'firing'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap_or(0)
            > 0
    });
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("Alert rules and notifiers reloaded"),
        "{log_text}"
    );

    // Shut down: everything accepted is committed and consistent.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let mut agent = agent;
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(5),
            "did not exit within 5 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let total: i64 = conn
        .query_row("SELECT COUNT(*) FROM readings", [], |r| r.get(0))
        .unwrap();
    let series: i64 = conn
        .query_row("SELECT SUM(count) FROM series", [], |r| r.get(0))
        .unwrap();
    assert_eq!(total, series, "every committed batch is complete");
}
