//! The audit log (G10) of a running agent: the configuration it started with, reloads
//! applied and refused with what changed, a version change since the last start, an
//! acknowledgement — read back with `outpost audit`.

mod support;

use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use support::agent::{outpost, Agent};

fn config(db: &Path, period: &str) -> String {
    format!(
        "[storage]\npath = \"{}\"\nbatch_max_delay = \"10ms\"\n[http]\nenabled = false\n\
         [[sources]]\ntype = \"simulated\"\nname = \"room\"\nperiod = \"{period}\"\n",
        db.display()
    )
}

/// `outpost audit --format json` of the agent's database, one value per entry.
fn audit(agent: &Agent, extra: &[&str]) -> Vec<Value> {
    let db = agent.db().to_str().unwrap().to_string();
    let mut args = vec!["audit", "--db", db.as_str(), "--format", "json"];
    args.extend_from_slice(extra);
    let (code, out, err) = outpost(args);
    assert_eq!(code, Some(0), "outpost audit: {out}{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON entry per line"))
        .collect()
}

fn kinds(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn starts_reloads_refusals_and_version_changes_are_in_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outpost.db");
    let mut agent = Agent::new(dir.path(), &config(&db, "100ms"))
        .deadline(Duration::from_secs(20))
        .start();
    agent.wait_until("the start is audited", || {
        agent
            .try_count("SELECT COUNT(*) FROM audit_log WHERE kind = 'config.loaded'")
            .unwrap_or(0)
            == 1
    });
    let loaded = &audit(&agent, &["--kind", "config.loaded"])[0];
    assert!(loaded["actor"].as_str().unwrap().starts_with("process:"));
    let file = &loaded["details"]["files"][0];
    assert_eq!(file["path"], agent.config_path().display().to_string());
    assert_eq!(file["sha256"].as_str().unwrap().len(), 64);
    assert!(loaded["since_boot_us"].as_i64().unwrap() > 0);

    // A valid reload: the changed key is named.
    let path = agent.config_path().to_path_buf();
    std::fs::write(&path, config(&db, "50ms")).unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_until("the reload is audited", || {
        agent
            .try_count("SELECT COUNT(*) FROM audit_log WHERE kind = 'config.reloaded'")
            .unwrap_or(0)
            == 1
    });
    let reloaded = &audit(&agent, &["--kind", "config.reloaded"])[0];
    assert_eq!(
        reloaded["details"]["changed"],
        serde_json::json!(["sources[0].period"])
    );
    assert_ne!(reloaded["details"]["files"][0]["sha256"], file["sha256"]);

    // An invalid file: refused, with the problem.
    std::fs::write(&path, config(&db, "yesterday")).unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_until("the refusal is audited", || {
        agent
            .try_count("SELECT COUNT(*) FROM audit_log WHERE kind = 'config.refused'")
            .unwrap_or(0)
            == 1
    });
    let refused = &audit(&agent, &["--kind", "config.refused"])[0];
    let problems = refused["details"]["problems"].to_string();
    assert!(problems.contains("period"), "{problems}");

    // The database was last used by another version: the next start says so.
    std::fs::write(&path, config(&db, "100ms")).unwrap();
    agent.terminate();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let updated = conn
        .execute(
            "UPDATE source_state SET value = '0.0.1' WHERE source = 'agent' AND key = 'version'",
            [],
        )
        .unwrap();
    assert_eq!(updated, 1, "the version of the last start is kept");
    drop(conn);
    agent.start_again();
    agent.wait_until("the upgrade is audited", || {
        agent
            .try_count("SELECT COUNT(*) FROM audit_log WHERE kind = 'version.changed'")
            .unwrap_or(0)
            == 1
    });
    let changed = &audit(&agent, &["--kind", "version.changed"])[0];
    assert_eq!(changed["details"]["from"], "0.0.1");
    assert_eq!(changed["details"]["direction"], "upgrade");
    agent.terminate();

    // Oldest first; a third start of the same version records no version change.
    agent.start_again();
    agent.wait_until("the third start is audited", || {
        agent
            .try_count("SELECT COUNT(*) FROM audit_log WHERE kind = 'config.loaded'")
            .unwrap_or(0)
            == 3
    });
    agent.terminate();
    let all = kinds(&audit(&agent, &[]));
    assert_eq!(
        all,
        [
            "config.loaded",
            "config.reloaded",
            "config.refused",
            "config.loaded",
            "version.changed",
            "config.loaded"
        ]
    );
    let newest = kinds(&audit(&agent, &["--limit", "1"]));
    assert_eq!(newest, ["config.loaded"]);
    // The log is append-only: the agent's own database refuses to rewrite it.
    let conn = rusqlite::Connection::open(&db).unwrap();
    assert!(conn.execute("DELETE FROM audit_log", []).is_err());
    assert!(conn
        .execute("UPDATE audit_log SET actor = 'someone else'", [])
        .is_err());
}

#[test]
fn an_acknowledgement_from_the_command_line_is_audited_with_who_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let db = support::agent::demo_database(dir.path(), "35s");
    let db_arg = db.to_str().unwrap();
    let (code, out, err) = outpost([
        "ack",
        "freezer-warm",
        "--by",
        "Maria",
        "--note",
        "door was open; closed it",
        "--db",
        db_arg,
    ]);
    assert_eq!(code, Some(0), "ack: {out}{err}");
    let (code, out, err) = outpost([
        "audit",
        "--db",
        db_arg,
        "--kind",
        "alarm.acknowledged",
        "--format",
        "json",
    ]);
    assert_eq!(code, Some(0), "audit: {out}{err}");
    let entry: Value = serde_json::from_str(out.trim()).expect("one entry");
    assert!(entry["actor"].as_str().unwrap().starts_with("process:"));
    assert_eq!(entry["details"]["by"], "Maria");
    assert_eq!(entry["details"]["note"], "door was open; closed it");
    assert_eq!(entry["details"]["channel"], "cli");
    assert_eq!(entry["details"]["rule"], "freezer-warm");
    // The table form is readable and names the kind.
    let (code, out, _) = outpost(["audit", "--db", db_arg]);
    assert_eq!(code, Some(0));
    assert!(out.contains("alarm.acknowledged"), "{out}");
    // Wrong flags: a clear error, exit 2.
    let (code, _, err) = outpost(["audit", "--db", db_arg, "--kind", "nonsense"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--kind: unknown kind"), "{err}");
}
