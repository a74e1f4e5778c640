//! Outage matrix, local half: the real `outpost run` binary through outages of the
//! gateway itself — the disk filling up, a serial sensor unplugged and replugged, the
//! wall clock stepped back and forward. Each test checks that nothing accepted is lost
//! or duplicated, that the agent recovers without a restart (same PID), and that both
//! `/health` and `outpost status` (text and `--json`, a separate process reading the
//! database) show the condition while it lasts and clear afterwards.
//!
//! The disk-full test mounts a small tmpfs and needs root; without root it says so and
//! returns. Results and commands: docs/reliability.md, "Outage matrix — local".

mod support;

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::agent::{health_check, Agent};
use support::{free_port, SerialLink};

const WAIT: Duration = Duration::from_secs(30);

/// Starts `outpost run` on `config` (the `[storage]` path and `[http]` are added), with
/// `env` for the agent and its `outpost status`; returns once `/health` answers.
fn start(dir: &Path, db: &Path, config: &str, env: &[(&str, &str)]) -> Agent {
    let port = free_port();
    let config = format!(
        "[storage]\npath = \"{}\"\nbatch_max_delay = \"10ms\"\n{config}\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\nsource_max_silence = \"1h\"\n",
        db.display()
    );
    let mut agent = Agent::new(dir, &config)
        .log_filter("outpost=info")
        .deadline(WAIT);
    for (key, value) in env {
        agent = agent.env(key, value);
    }
    let agent = agent.start();
    agent.wait_for("/health to answer", || health(&agent));
    agent
}

/// `/health` as JSON (200 or 503).
fn health(agent: &Agent) -> Option<Value> {
    let (status, health) = agent.health()?;
    assert!(status == 200 || status == 503, "{status}: {health}");
    Some(health)
}

/// (ok, detail) of one `/health` check.
fn check(agent: &Agent, name: &str) -> Option<(bool, String)> {
    let health = health(agent)?;
    let check = health_check(&health, name)?;
    Some((
        check["ok"].as_bool()?,
        check["detail"].as_str()?.to_string(),
    ))
}

/// `outpost status` (text) and `--json`, each a separate process.
fn status(agent: &Agent) -> (String, Value) {
    (agent.status_text(), agent.status_json())
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn write_lines(link: &SerialLink, from: usize, to: usize) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(link.peer_path())
        .unwrap();
    for i in from..to {
        f.write_all(format!("n={i}\n").as_bytes()).unwrap();
    }
    f.flush().unwrap();
}

fn serial_source(link: &SerialLink) -> String {
    format!(
        "[[sources]]\ntype = \"serial\"\nname = \"ser\"\npath = \"{}\"\nformat = \"key-value\"\n\
         reopen_max_delay = \"500ms\"\n[sources.fields]\ndevice = \"p1\"\n",
        link.device_path().display()
    )
}

/// A tmpfs mounted for one test and unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `dir` with one file until it refuses more bytes.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x55u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(_) => break,
        }
    }
    // Smaller pieces into the last partial block.
    while let Ok(n) = f.write(&chunk[..512]) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    written
}

#[test]
fn disk_full_refuses_nothing_it_accepted_and_recovers_in_place() {
    if !support::util::is_root() {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(mnt) = Tmpfs::mount(&dir.path().join("mnt"), "64m") else {
        eprintln!("SKIPPED: mount -t tmpfs failed here");
        return;
    };
    let link = SerialLink::start();
    let bus = SerialLink::start();
    let _slave = support::ModbusSlave::start(
        bus.peer_path(),
        38400,
        serde_json::json!({"1": {"holding": [{"address": 0, "value": 7}]}}),
    );
    let db = mnt.0.join("outpost.db");
    let mut agent = start(
        dir.path(),
        &db,
        &format!(
            "[[sources]]\ntype = \"simulated\"\nname = \"sim\"\nperiod = \"50ms\"\n{}\
             [[sources]]\ntype = \"modbus-rtu\"\nname = \"bus\"\npath = \"{}\"\n\
             [sources.port]\nbaud = 38400\n[[sources.slaves]]\nid = 1\ndevice = \"plc\"\n\
             interval = \"100ms\"\ntimeout = \"1s\"\n\
             [[sources.slaves.registers]]\nmetric = \"v\"\naddress = 0\n",
            serial_source(&link),
            bus.device_path().display()
        ),
        &[],
    );
    let pid = agent.pid();
    agent.wait_for("the port and readings", || {
        (check(&agent, "source:ser")?.1 == "connected"
            && agent.count("SELECT COUNT(*) FROM readings WHERE source = 'sim'") >= 10
            && agent.count("SELECT COUNT(*) FROM readings WHERE source = 'bus'") >= 5)
            .then_some(())
    });
    write_lines(&link, 0, 20);
    agent.wait_for("20 serial readings", || {
        (agent.count("SELECT COUNT(*) FROM readings WHERE source = 'ser'") == 20).then_some(())
    });

    // The disk fills up.
    let filler = mnt.0.join("filler");
    fill(&filler);
    let (ok, detail) = agent.wait_for("/health to report the full disk", || {
        check(&agent, "store").filter(|(ok, _)| !ok)
    });
    assert!(!ok && detail.contains("disk is full"), "{detail}");
    let stored_when_full = agent.count("SELECT COUNT(*) FROM readings");
    // Serial lines keep coming while the disk is full.
    write_lines(&link, 20, 40);
    let (text, json) = status(&agent);
    assert!(text.contains("Disk FULL"), "{text}");
    assert_eq!(json["disk_full"], true, "{json:#}");
    assert_eq!(
        health(&agent).unwrap()["status"],
        "unhealthy",
        "/health is 503 while the disk is full"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM readings"),
        stored_when_full,
        "nothing is committed while the disk is full"
    );
    let refused = metric(&agent.metrics(), "outpost_store_refused_full_total");
    assert!(refused >= 1.0, "the store refused readings while full");
    agent.assert_running();

    // Space returns.
    std::fs::remove_file(&filler).unwrap();
    agent.wait_for("/health to report the store writable", || {
        check(&agent, "store").filter(|(ok, _)| *ok)
    });
    let (text, json) = status(&agent);
    assert!(!text.contains("Disk FULL"), "{text}");
    assert_eq!(json["disk_full"], false, "{json:#}");
    agent.wait_for("all 40 serial readings", || {
        (agent.count("SELECT COUNT(*) FROM readings WHERE source = 'ser'") == 40).then_some(())
    });
    let values = agent.count(
        "SELECT COUNT(DISTINCT value) FROM readings WHERE source = 'ser' AND value BETWEEN 0 AND 39",
    );
    assert_eq!(values, 40, "each line stored once");
    // Every simulated and Modbus reading counted as received was stored (batches
    // refused while full were offered again); allow the batches in flight.
    std::thread::sleep(Duration::from_millis(500));
    let mut counts = Vec::new();
    for (source, in_flight) in [("sim", 1.0), ("bus", 2.0)] {
        let name = format!("outpost_readings_received_total{{source=\"{source}\"}}");
        let received_before = metric(&agent.metrics(), &name);
        let stored = agent.count(&format!(
            "SELECT COUNT(*) FROM readings WHERE source = '{source}'"
        )) as f64;
        let received_after = metric(&agent.metrics(), &name);
        assert!(
            stored >= received_before - in_flight && stored <= received_after,
            "{source}: received {received_before}..{received_after}, stored {stored}"
        );
        counts.push((source, stored, received_after));
    }
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM readings")
            - agent.count("SELECT COUNT(DISTINCT uid) FROM readings"),
        0
    );
    agent.assert_running();
    assert_eq!(agent.pid(), pid, "recovered without a restart");
    assert_eq!(health(&agent).unwrap()["status"], "ok");
    eprintln!(
        "disk full: refused {refused} readings while full; serial 40/40 stored; (source, stored, received): {counts:?}"
    );
    drop(agent);
    drop(mnt);
}

#[test]
fn serial_unplug_and_replug_keep_every_reading_and_show_the_port_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut link = SerialLink::start();
    let db = dir.path().join("outpost.db");
    let mut agent = start(dir.path(), &db, &serial_source(&link), &[]);
    let pid = agent.pid();
    agent.wait_for("the port to open", || {
        (check(&agent, "source:ser")?.1 == "connected").then_some(())
    });
    write_lines(&link, 0, 25);
    agent.wait_for("25 readings", || {
        (agent.count("SELECT COUNT(*) FROM readings") == 25).then_some(())
    });

    link.unplug();
    let (ok, detail) = agent.wait_for("/health to show the port disconnected", || {
        check(&agent, "source:ser").filter(|(_, d)| d.contains("disconnected"))
    });
    let (text, json) = agent.wait_for("status to show the port missing", || {
        let (text, json) = status(&agent);
        text.contains("Source ser: port").then_some((text, json))
    });
    assert!(text.contains("not available since"), "{text}");
    let notes = json["source_notes"].as_array().unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.as_str().unwrap().contains("Source ser: port")),
        "{json:#}"
    );
    eprintln!("while unplugged: /health source:ser ok={ok} {detail:?}; status: {notes:?}");

    link.replug();
    agent.wait_for("/health to show the port connected again", || {
        (check(&agent, "source:ser")?.1 == "connected").then_some(())
    });
    agent.wait_for("status to clear the port note", || {
        let (text, json) = status(&agent);
        (!text.contains("Source ser: port")
            && json["source_notes"]
                .as_array()
                .is_some_and(|n| n.is_empty()))
        .then_some(())
    });
    write_lines(&link, 25, 50);
    agent.wait_for("50 readings", || {
        (agent.count("SELECT COUNT(*) FROM readings") == 50).then_some(())
    });
    assert_eq!(
        agent.count("SELECT COUNT(DISTINCT value) FROM readings WHERE value BETWEEN 0 AND 49"),
        50,
        "every line before and after stored once"
    );
    assert_eq!(agent.count("SELECT COUNT(DISTINCT uid) FROM readings"), 50);
    agent.assert_running();
    assert_eq!(agent.pid(), pid);
}

/// Readings, alert events and retention across a wall clock stepped back by an hour,
/// then forward by a day, through the test offset file (`Clock::system`).
#[test]
fn clock_steps_lose_nothing_and_fire_or_prune_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let link = SerialLink::start();
    let db = dir.path().join("outpost.db");
    let offset = dir.path().join("clock-offset");
    std::fs::write(&offset, "0").unwrap();
    let notice_secs = 6;
    let env = [
        ("OUTPOST_TEST_CLOCK_OFFSET_FILE", offset.to_str().unwrap()),
        ("OUTPOST_TEST_CLOCK_STEP_NOTICE", &notice_secs.to_string()),
    ];
    // A pending alert whose `for` a forward step would complete, a firing alert whose
    // reminder a forward step would send, a stale rule a forward step would fire, and
    // retention of one day with a quick prune interval.
    let config = format!(
        "retention = \"1d\"\nprune_interval = \"1s\"\n\
         [[sources]]\ntype = \"simulated\"\nname = \"sim\"\nperiod = \"100ms\"\n{}\
         [[notifiers]]\nname = \"journal\"\ntype = \"log\"\n\
         [[alerts]]\nname = \"pending-30m\"\nkind = \"threshold\"\nmetric = \"temperature\"\n\
         above = -100.0\nfor = \"30m\"\nnotifiers = [\"journal\"]\n\
         [[alerts]]\nname = \"firing-reminder\"\nkind = \"threshold\"\nmetric = \"temperature\"\n\
         above = -100.0\nreminder = \"30m\"\nnotifiers = [\"journal\"]\n\
         [[alerts]]\nname = \"stale-10m\"\nkind = \"stale\"\nmetric = \"n\"\nafter = \"10m\"\n\
         notifiers = [\"journal\"]\n",
        serial_source(&link)
    );
    let mut agent = start(dir.path(), &db, &config, &env);
    let pid = agent.pid();
    let mut lines = 0;
    let step = |agent: &Agent, lines: &mut usize, seconds: i64, words: &str| {
        agent.wait_for("the port to open", || {
            (check(agent, "source:ser")?.1 == "connected").then_some(())
        });
        write_lines(&link, *lines, *lines + 10);
        *lines += 10;
        let n = *lines as i64;
        agent.wait_for("serial readings", || {
            (agent.count("SELECT COUNT(*) FROM readings WHERE source = 'ser'") == n).then_some(())
        });
        // Everything so far has reached central (as far as retention can tell).
        let conn = rusqlite::Connection::open(agent.db()).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute("UPDATE readings SET synced = 1 WHERE synced = 0", [])
            .unwrap();
        drop(conn);
        let old = std::fs::read_to_string(&offset).unwrap();
        let new = old.trim().parse::<i64>().unwrap() + seconds;
        std::fs::write(&offset, new.to_string()).unwrap();
        let (_, detail) = agent.wait_for("/health to show the step", || {
            check(agent, "clock").filter(|(_, d)| d.contains(words))
        });
        let (text, json) = status(agent);
        let status_words = format!("Clock: {}", words.trim_start_matches("clock "));
        assert!(text.contains(&status_words), "{text}");
        let stepped = json["clock_step"]["seconds"].as_f64().unwrap();
        assert!((stepped - seconds as f64).abs() < 2.5, "{json:#}");
        write_lines(&link, *lines, *lines + 10);
        *lines += 10;
        let n = *lines as i64;
        agent.wait_for("serial readings after the step", || {
            (agent.count("SELECT COUNT(*) FROM readings WHERE source = 'ser'") == n).then_some(())
        });
        // Retention runs every second; give it a few chances.
        std::thread::sleep(Duration::from_secs(3));
        agent.wait_for("the step notice to clear", || {
            let (_, d) = check(agent, "clock")?;
            let (text, json) = status(agent);
            (!d.contains("stepped") && !text.contains("Clock:") && json["clock_step"].is_null())
                .then_some(())
        });
        detail
    };
    let back = step(&agent, &mut lines, -3600, "clock stepped back by 1h");
    let forward = step(&agent, &mut lines, 86400, "clock stepped forward by 1day");
    eprintln!("/health clock: {back:?} then {forward:?}");

    let metrics = agent.metrics();
    assert_eq!(metric(&metrics, "outpost_readings_duplicate_total"), 0.0);
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM readings WHERE source = 'ser'"),
        lines as i64,
        "every serial line stored once, none pruned"
    );
    assert_eq!(
        agent.count("SELECT COUNT(DISTINCT value) FROM readings WHERE source = 'ser'"),
        lines as i64
    );
    let sim_stored = agent.count("SELECT COUNT(*) FROM readings WHERE source = 'sim'");
    assert_eq!(
        metric(&metrics, "outpost_store_pruned_synced_total"),
        0.0,
        "retention pruned nothing although the clock jumped a day ahead"
    );
    // The only alert event: the first firing of "firing-reminder".
    let conn = rusqlite::Connection::open(agent.db()).unwrap();
    let mut stmt = conn
        .prepare("SELECT rule || ':' || kind FROM alert_events ORDER BY id")
        .unwrap();
    let events: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        events,
        vec!["firing-reminder:firing".to_string()],
        "no alert fired, reminded or resolved because of a step"
    );
    agent.assert_running();
    assert_eq!(agent.pid(), pid);
    eprintln!(
        "clock steps: {lines} serial readings and {sim_stored} simulated stored, 0 duplicates, 0 pruned, events {events:?}"
    );
}

/// G8: readings stamped while the clock was not synchronised move with the step that
/// synchronises it and are flagged corrected (so sync sends them at once); later
/// readings carry no flag.
#[test]
fn clock_synchronisation_corrects_readings_stamped_before() {
    let dir = tempfile::tempdir().unwrap();
    let link = SerialLink::start();
    let db = dir.path().join("outpost.db");
    let offset = dir.path().join("clock-offset");
    std::fs::write(&offset, "0 unsynchronized").unwrap();
    let env = [("OUTPOST_TEST_CLOCK_OFFSET_FILE", offset.to_str().unwrap())];
    let agent = start(dir.path(), &db, &serial_source(&link), &env);
    agent.wait_for("the port to open", || {
        (check(&agent, "source:ser")?.1 == "connected").then_some(())
    });
    write_lines(&link, 0, 10);
    agent.wait_for("10 readings flagged CLOCK_UNSYNCED", || {
        (agent.count("SELECT COUNT(*) FROM readings WHERE flags = 1") == 10).then_some(())
    });
    let before = agent.count("SELECT MAX(observed_at) FROM readings");
    // The clock was a day behind; synchronisation steps it forward.
    std::fs::write(&offset, "86400 synchronized").unwrap();
    agent.wait_for("the readings to be corrected", || {
        (agent.count("SELECT COUNT(*) FROM readings WHERE flags = 1 | 8") == 10).then_some(())
    });
    let after = agent.count("SELECT MAX(observed_at) FROM readings");
    let moved = (after - before) as f64 / 1e6;
    assert!((moved - 86400.0).abs() < 2.5, "moved by {moved} s");
    let (_, detail) = check(&agent, "clock").unwrap();
    assert!(
        detail.starts_with("synchronised; clock stepped forward by 1day"),
        "{detail}"
    );
    write_lines(&link, 10, 20);
    agent.wait_for("10 more readings without flags", || {
        (agent.count("SELECT COUNT(*) FROM readings WHERE flags = 0") == 10).then_some(())
    });
    let newest = agent.count("SELECT MAX(observed_at) FROM readings");
    assert!(newest >= after, "new readings follow the corrected ones");
    eprintln!("clock sync: 10 readings moved by {moved:.3} s and flagged corrected; 10 later ones unflagged");
}
