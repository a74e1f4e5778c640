//! SIGHUP reload while readings flow: a valid configuration is applied (only changed
//! sources restart), an invalid one is refused and logged, nothing is lost.

mod support;

use std::path::Path;
use std::time::Duration;
use support::agent::Agent;

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
fn readings(agent: &Agent, source: &str) -> i64 {
    agent
        .try_count(&format!(
            "SELECT COUNT(*) FROM readings WHERE source = '{source}'"
        ))
        .unwrap_or(0)
}

fn hup(agent: &Agent) {
    agent.signal(libc::SIGHUP);
}

#[test]
fn sighup_applies_valid_changes_and_refuses_invalid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outpost.db");
    let mut agent = Agent::new(dir.path(), &config(&db, &[("a", "50ms")], ""))
        .deadline(Duration::from_secs(20))
        .start();
    let path = agent.config_path().to_path_buf();
    agent.wait_until("readings of a", || readings(&agent, "a") >= 5);

    // A valid change: a new source appears; `a` is unchanged and keeps running.
    std::fs::write(&path, config(&db, &[("a", "50ms"), ("b", "50ms")], "")).unwrap();
    hup(&agent);
    agent.wait_until("readings of b", || readings(&agent, "b") >= 5);
    let log_text = agent.log();
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
    agent.wait_until("the refusal", || {
        agent.log().contains("the running one stays in effect")
    });
    let log_text = agent.log();
    assert!(
        log_text.contains("storage.batch_max_rows: expected a whole number"),
        "{log_text}"
    );
    assert!(
        log_text.contains("sources[0].name: the required key `name` is missing"),
        "{log_text}"
    );
    let (a, b) = (readings(&agent, "a"), readings(&agent, "b"));
    agent.wait_until("both sources to go on", || {
        readings(&agent, "a") > a + 3 && readings(&agent, "b") > b + 3
    });

    // Remove `b` and change `a`: `b` stops, `a` restarts with its new period.
    std::fs::write(&path, config(&db, &[("a", "20ms")], "")).unwrap();
    hup(&agent);
    agent.wait_until("b to stop", || agent.log().contains("stopped=[\"b\"]"));
    let log_text = agent.log();
    assert!(log_text.contains("restarted=[\"a\"]"), "{log_text}");
    std::thread::sleep(Duration::from_millis(500));
    let b_after = readings(&agent, "b");
    let a_after = readings(&agent, "a");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(readings(&agent, "b"), b_after, "a removed source stops");
    assert!(
        readings(&agent, "a") > a_after,
        "the changed source runs again"
    );

    // Alert rules and notifiers reload live: a new rule that holds at once fires.
    let rules = "[[notifiers]]\nname = \"journal\"\ntype = \"log\"\n\
                 [[alerts]]\nname = \"always\"\nkind = \"threshold\"\nmetric = \"temperature\"\n\
                 above = -100.0\nnotifiers = [\"journal\"]\n";
    std::fs::write(&path, config(&db, &[("a", "20ms")], rules)).unwrap();
    hup(&agent);
    agent.wait_until("the new rule to fire", || {
        agent.try_count("SELECT COUNT(*) FROM alert_events WHERE kind = 'firing'") > Some(0)
    });
    let log_text = agent.log();
    assert!(
        log_text.contains("Alert rules and notifiers reloaded"),
        "{log_text}"
    );

    // Shut down: everything accepted is committed and consistent.
    let status = agent.terminate_within(Duration::from_secs(5));
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
