//! G9 — it keeps working, or it says so. Each stage of the real binary is made to hang
//! by the test-only fault switch (`OUTPOST_TEST_FAULT`, honoured only in debug builds;
//! the fault holds while the file named by `OUTPOST_TEST_FAULT_FILE` exists), with
//! `http.stall_after = 3s`. A stall must show everywhere a person or systemd looks:
//! `/health` 503 naming the stage, `outpost status` (text and `--json`), the
//! `outpost_stage_stalled` gauge, one ERROR line in the log, and no more `WATCHDOG=1`
//! on the agent's `NOTIFY_SOCKET`; and all of it must clear when the stage moves again.
//! Peers that are down (broker, serial port, PostgreSQL, mail server) are failures
//! reported as such, never stalls.

mod support;

use serde_json::Value;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::agent::{health_check, Agent};
use support::{free_port, Mosquitto, PgBouncer, Postgres, SerialLink};

const STALL_AFTER_S: u64 = 3;
/// systemd's `WatchdogSec` as the agent sees it: it feeds every half of it (1 s).
const WATCHDOG_USEC: u64 = 2_000_000;
/// How long any condition may take to show or clear.
const DEADLINE: Duration = Duration::from_secs(30);

/// The socket systemd gives a service for `sd_notify` (`NOTIFY_SOCKET`): here, to count
/// the agent's watchdog pings.
struct NotifySocket(UnixDatagram);

impl NotifySocket {
    fn bind(path: &Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket(socket)
    }

    /// The `WATCHDOG=1` datagrams received within `window`.
    fn watchdog_pings(&self, window: Duration) -> usize {
        let start = Instant::now();
        let mut pings = 0;
        let mut buf = [0u8; 512];
        while start.elapsed() < window {
            if let Ok(n) = self.0.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]);
                pings += text.lines().filter(|l| *l == "WATCHDOG=1").count();
            }
        }
        pings
    }

    /// Throws away the notifications received so far.
    fn drain(&self) {
        self.0.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        while self.0.recv(&mut buf).is_ok() {}
        self.0.set_nonblocking(false).unwrap();
    }
}

/// Starts `outpost run` with `body` after the common sections, the fault `fault` armed
/// (it holds once [`hang`] creates its file) and systemd's watchdog variables set,
/// `WATCHDOG_PID` being the agent's own pid (set by the shell that `exec`s it); returns
/// once it is healthy (notifications aside).
fn start(fault: &str, body: &str) -> (Agent, NotifySocket) {
    start_with_db(fault, body, None)
}

/// [`start`] with the database at `db` (default: in the agent's directory).
fn start_with_db(fault: &str, body: &str, db: Option<PathBuf>) -> (Agent, NotifySocket) {
    let port = free_port();
    let agent = Agent::in_temp_dir(|dir| {
        format!(
            "[agent]\ngateway_id = \"stall-gw\"\n[storage]\npath = \"{}\"\n\
             [http]\nlisten = \"127.0.0.1:{port}\"\nstall_after = \"{STALL_AFTER_S}s\"\n{body}",
            db.unwrap_or_else(|| dir.join("outpost.db")).display()
        )
    })
    .deadline(DEADLINE);
    let socket_path = agent.dir().join("notify.sock");
    let systemd = NotifySocket::bind(&socket_path);
    let as_systemd_starts_it: Vec<std::ffi::OsString> = vec![
        "env".into(),
        with_value("NOTIFY_SOCKET=", socket_path.as_os_str()),
        format!("WATCHDOG_USEC={WATCHDOG_USEC}").into(),
        format!("OUTPOST_TEST_FAULT={fault}").into(),
        with_value(
            "OUTPOST_TEST_FAULT_FILE=",
            agent.dir().join("hang").as_os_str(),
        ),
        "sh".into(),
        "-c".into(),
        "WATCHDOG_PID=$$; export WATCHDOG_PID; exec \"$0\" \"$@\"".into(),
    ];
    let agent = agent.through(&as_systemd_starts_it).start();
    // Healthy but for notifications: a test whose mail server is down from the start
    // may see its first notification fail before the first look.
    agent.wait_health("the agent to be healthy", |status, h| {
        status == 200
            || h["checks"].as_array().is_some_and(|checks| {
                checks
                    .iter()
                    .all(|c| c["ok"] == true || c["name"] == "notifications")
            })
    });
    (agent, systemd)
}

/// `NAME=value` for `env`.
fn with_value(name: &str, value: &std::ffi::OsStr) -> std::ffi::OsString {
    let mut assignment = std::ffi::OsString::from(name);
    assignment.push(value);
    assignment
}

/// The armed fault holds from now on.
fn hang(agent: &Agent) {
    std::fs::write(agent.dir().join("hang"), "").unwrap();
}

fn release(agent: &Agent) {
    std::fs::remove_file(agent.dir().join("hang")).unwrap();
}

fn check<'a>(health: &'a Value, name: &str) -> &'a Value {
    health_check(health, name).unwrap_or_else(|| panic!("no {name} check in {health}"))
}

fn gauge(metrics: &str, name: &str, stage: &str) -> Option<f64> {
    let prefix = format!("{name}{{stage=\"{stage}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

fn gauge_total(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Runs the agent healthy, makes `stage` hang, checks every signal of the stall, lets
/// it go and checks that every signal clears.
fn assert_stall_is_reported(agent: &Agent, systemd: &NotifySocket, stage: &str) {
    assert_stall_is_reported_with(agent, systemd, stage, || {});
}

/// [`assert_stall_is_reported`], calling `give_work` once the hang holds.
fn assert_stall_is_reported_with(
    agent: &Agent,
    systemd: &NotifySocket,
    stage: &str,
    give_work: impl FnOnce(),
) {
    // Healthy: the watchdog is fed and the stage is not stalled.
    assert!(
        systemd.watchdog_pings(Duration::from_millis(2500)) >= 1,
        "the watchdog is fed while healthy\n{}",
        agent.log()
    );
    assert_eq!(
        check(&agent.health().unwrap().1, "progress")["ok"],
        true,
        "{}",
        agent.log()
    );

    hang(agent);
    give_work();
    let hung = Instant::now();
    let health = agent.wait_health(&format!("/health to name {stage} stalled"), |status, h| {
        status == 503
            && check(h, "progress")["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&format!("STALLED: {stage} (")))
    });
    let waited = hung.elapsed();
    assert!(
        waited >= Duration::from_secs(STALL_AFTER_S - 1),
        "reported after {waited:?}, before stall_after"
    );
    let progress = check(&health, "progress");
    assert_eq!(progress["ok"], false, "{health}");
    assert_eq!(health["status"], "unhealthy");
    // Only the stage where the wait starts is named.
    let detail = progress["detail"].as_str().unwrap();
    assert_eq!(detail.matches("STALLED").count(), 1, "{detail}");
    assert_eq!(
        detail.matches(" waiting, no progress for ").count(),
        1,
        "{detail}"
    );

    // The metric.
    let metrics = agent.metrics();
    assert_eq!(
        gauge(&metrics, "outpost_stage_stalled", stage),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        gauge(&metrics, "outpost_stage_waiting", stage).is_some_and(|w| w >= 1.0),
        "{metrics}"
    );

    // The watchdog is no longer fed. Pings already in flight are drained first.
    std::thread::sleep(Duration::from_millis(1200));
    systemd.drain();
    assert_eq!(
        systemd.watchdog_pings(Duration::from_secs(3)),
        0,
        "the watchdog must not be fed while {stage} is stalled\n{}",
        agent.log()
    );

    // `outpost status`, text and JSON, from the state the agent saved.
    let text = agent.status_text();
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("STALLED: {stage}: ")) && l.contains("waiting")),
        "{text}"
    );
    assert!(text.contains("watchdog"), "{text}");
    let json: Value = agent.status_json();
    let stalled = json["stalled"].as_array().unwrap();
    assert_eq!(stalled.len(), 1, "{json:#}");
    assert_eq!(stalled[0]["stage"], stage);
    assert_eq!(stalled[0]["state"], "stalled");
    assert!(stalled[0]["waiting"].as_u64().unwrap() >= 1);

    // One ERROR line, naming the stage and what waits.
    let log = agent.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains(&format!("Stage {stage} is STALLED")))
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(errors[0].contains(" waiting, no progress for "), "{log}");

    // It moves again: everything clears.
    release(agent);
    agent.wait_health(&format!("{stage} to recover"), |status, h| {
        status == 200 && check(h, "progress")["ok"] == true
    });
    assert!(
        systemd.watchdog_pings(Duration::from_millis(2500)) >= 1,
        "the watchdog is fed again"
    );
    assert_eq!(
        gauge(&agent.metrics(), "outpost_stage_stalled", stage),
        Some(0.0)
    );
    let json: Value = agent.status_json();
    assert_eq!(json["stalled"], serde_json::json!([]), "{json:#}");
    assert!(!agent.status_text().contains("STALLED"));
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN")
                && l.contains(&format!("Stage {stage} is no longer stalled"))),
        "{log}"
    );
    assert_eq!(
        log.matches(&format!("Stage {stage} is STALLED")).count(),
        1,
        "still said once: {log}"
    );
}

const SIMULATED: &str =
    "[[sources]]\ntype = \"simulated\"\nname = \"sim\"\nperiod = \"200ms\"\ndevices = [\"sim-1\"]\n";

#[test]
fn a_hung_store_writer_is_reported_and_the_watchdog_starves() {
    let (agent, systemd) = start("store_writer_hang", SIMULATED);
    assert_stall_is_reported(&agent, &systemd, "store");
    // The source waited for the store; it was not blamed.
    assert!(!agent.log().contains("Stage source:sim is STALLED"));
}

#[test]
fn a_hung_source_is_reported() {
    let (agent, systemd) = start("source_hang", SIMULATED);
    assert_stall_is_reported(&agent, &systemd, "source:sim");
}

fn mqtt_source(broker: &Mosquitto) -> String {
    format!(
        "[[sources]]\ntype = \"mqtt\"\nname = \"mq\"\ntopics = [\"sensors/+/data\"]\nqos = 1\n\
         device_segment = 1\n[sources.metrics]\nvalue = \"/value\"\n\
         [sources.broker]\nhost = \"127.0.0.1\"\nport = {}\ntls = false\n\
         reconnect_min = \"200ms\"\nreconnect_max = \"1s\"\n",
        broker.port()
    )
}

/// Publishes a QoS 1 reading every 100 ms until dropped.
struct Publisher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Publisher {
    fn start(port: u16) -> Publisher {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !stopped.load(Ordering::Relaxed) {
                i += 1;
                let _ = Command::new("mosquitto_pub")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1"])
                    .args([
                        "-t",
                        "sensors/d1/data",
                        "-m",
                        &format!("{{\"value\": {i}}}"),
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Publisher {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The shape of issue 12's wedge: the MQTT session keeps receiving while its worker
/// takes nothing off the hand-off queue, so nothing is committed.
#[test]
fn a_wedged_mqtt_session_is_reported() {
    let broker = Mosquitto::start();
    let (agent, systemd) = start("mqtt_worker_hang", &mqtt_source(&broker));
    let _publisher = Publisher::start(broker.port());
    agent.wait_health("readings from the broker", |_, h| {
        check(h, "source:mq")["detail"] == "connected"
    });
    assert_stall_is_reported(&agent, &systemd, "source:mq");
}

/// A rule that fires on every reading of the simulated source, and a notifier.
const ALERTING: &str =
    "[[alerts]]\nname = \"always\"\nkind = \"threshold\"\nmetric = \"temperature\"\n\
     above = -1000.0\nnotifiers = [\"journal\"]\n\
     [[notifiers]]\nname = \"journal\"\ntype = \"log\"\n";

#[test]
fn a_hung_alert_engine_is_reported() {
    let (agent, systemd) = start("alerts_hang", &format!("{SIMULATED}{ALERTING}"));
    assert_stall_is_reported(&agent, &systemd, "alerts");
}

#[test]
fn a_hung_notification_delivery_is_reported() {
    // The alert fires only once the delivery hangs: the test publishes the hot reading.
    let broker = Mosquitto::start();
    let alerting = ALERTING
        .replace("above = -1000.0", "above = 50.0")
        .replace("metric = \"temperature\"", "metric = \"value\"");
    let (agent, systemd) = start(
        "outbox_hang",
        &format!("{}{alerting}", mqtt_source(&broker)),
    );
    assert_stall_is_reported_with(&agent, &systemd, "outbox", || {
        let published = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.port().to_string(),
                "-q",
                "1",
            ])
            .args(["-t", "sensors/d1/data", "-m", "{\"value\": 100}"])
            .status()
            .unwrap();
        assert!(published.success());
    });
}

fn sync_section(bouncer: &PgBouncer, pg: &Postgres) -> String {
    format!(
        "[sync]\nurl = \"postgres://outpost@127.0.0.1:{}/outpost\"\npassword = \"{}\"\n\
         sslmode = \"disable\"\ninterval = \"1s\"\nconnect_timeout = \"2s\"\n\
         statement_timeout = \"5s\"\nbackoff_initial = \"200ms\"\nbackoff_max = \"1s\"\n",
        bouncer.port(),
        pg.password()
    )
}

#[test]
fn a_hung_sync_round_is_reported() {
    let pg = Postgres::start();
    pg.outpost_central_migrate();
    let bouncer = PgBouncer::start(&pg);
    let (agent, systemd) = start(
        "sync_hang",
        &format!("{SIMULATED}{}", sync_section(&bouncer, &pg)),
    );
    agent.wait_health("a sync round", |_, h| {
        check(h, "sync")["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("last completed round"))
    });
    assert_stall_is_reported(&agent, &systemd, "sync");
}

/// A broker that is down, an unplugged serial port, a PostgreSQL that is down and a mail
/// server that refuses connections are failures, reported by their own checks — not
/// stalls: the progress check stays ok and the watchdog stays fed.
#[test]
fn peers_that_are_down_are_not_stalls() {
    let mut broker = Mosquitto::start();
    let mut link = SerialLink::start();
    let mut pg = Postgres::start();
    pg.outpost_central_migrate();
    let bouncer = PgBouncer::start(&pg);
    let closed_port = free_port();
    let body = format!(
        "{SIMULATED}\
         {}\
         [[sources]]\ntype = \"serial\"\nname = \"ser\"\npath = \"{}\"\nformat = \"key-value\"\n\
         reopen_max_delay = \"500ms\"\n[sources.fields]\ndevice = \"p1\"\n\
         [[alerts]]\nname = \"always\"\nkind = \"threshold\"\nmetric = \"temperature\"\n\
         above = -1000.0\nnotifiers = [\"mail\"]\n\
         [[notifiers]]\nname = \"mail\"\ntype = \"email\"\nserver = \"127.0.0.1\"\nport = {closed_port}\n\
         tls = \"none\"\nfrom = \"outpost@example.com\"\nto = [\"ops@example.com\"]\n{}",
        mqtt_source(&broker),
        link.device_path().display(),
        sync_section(&bouncer, &pg),
    );
    let (agent, systemd) = start("", &body);
    agent.wait_health("sync and the sources to be up", |_, h| {
        check(h, "sync")["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("last completed round"))
            && check(h, "source:mq")["detail"] == "connected"
    });
    // Readings flow from the broker, then it goes away with the others.
    let publisher = Publisher::start(broker.port());
    let stored = |a: &Agent| {
        gauge_total(
            &a.metrics(),
            "outpost_readings_received_total{source=\"mq\"}",
        )
    };
    assert!(
        support::wait_until(DEADLINE, || stored(&agent) >= 3.0),
        "readings from the broker"
    );
    drop(publisher);

    broker.stop();
    link.unplug();
    pg.stop_immediate();
    // Failing, as reported today.
    let health = agent.wait_health("the outages to be reported", |_, h| {
        check(h, "source:mq")["ok"] == false
            && check(h, "sync")["ok"] == false
            && check(h, "notifications")["ok"] == false
    });
    assert!(
        check(&health, "source:mq")["detail"]
            .as_str()
            .unwrap()
            .starts_with("disconnected for"),
        "{health}"
    );
    // …and never stalled, for well over stall_after.
    systemd.drain();
    let watch = Instant::now();
    let mut pings = 0;
    while watch.elapsed() < Duration::from_secs(3 * STALL_AFTER_S) {
        let (_, health) = agent.health().unwrap();
        let progress = check(&health, "progress");
        assert_eq!(progress["ok"], true, "{health}\n{}", agent.log());
        pings += systemd.watchdog_pings(Duration::from_millis(500));
    }
    assert!(
        pings >= 5,
        "the watchdog stays fed ({pings} pings)\n{}",
        agent.log()
    );
    let metrics = agent.metrics();
    for stage in ["source:mq", "source:ser", "sync", "outbox", "store"] {
        assert_eq!(
            gauge(&metrics, "outpost_stage_stalled", stage),
            Some(0.0),
            "{stage}: {metrics}"
        );
    }
    assert!(!agent.log().contains("STALLED"));
    let json: Value = agent.status_json();
    assert_eq!(json["stalled"], serde_json::json!([]));
    drop(bouncer);
}

/// A full disk is reported as such (`store` check, `Disk FULL`), not as a stall of the
/// store or of the sources waiting for it. Needs root (a tmpfs); skipped loudly without.
#[test]
fn a_full_disk_is_not_a_stall() {
    if !support::util::is_root() {
        eprintln!("SKIPPED: a_full_disk_is_not_a_stall mounts a tmpfs, which needs root");
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: a_full_disk_is_not_a_stall: mount -t tmpfs failed here");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let (agent, _systemd) = start_with_db(
        "",
        &format!("{SIMULATED}{ALERTING}"),
        Some(mnt.join("outpost.db")),
    );
    // Fill the file system.
    let mut filler = std::fs::File::create(mnt.join("filler")).unwrap();
    let chunk = vec![0x55u8; 64 * 1024];
    while std::io::Write::write(&mut filler, &chunk).is_ok_and(|n| n > 0) {}
    while std::io::Write::write(&mut filler, &chunk[..512]).is_ok_and(|n| n > 0) {}
    agent.wait_health("the full disk", |_, h| {
        check(h, "store")["detail"]
            .as_str()
            .is_some_and(|d| d.contains("disk is full"))
    });
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(3 * STALL_AFTER_S) {
        let (_, health) = agent.health().unwrap();
        assert_eq!(check(&health, "progress")["ok"], true, "{health}");
        assert_eq!(check(&health, "store")["ok"], false, "{health}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let metrics = agent.metrics();
    for stage in ["store", "source:sim", "alerts"] {
        assert_eq!(
            gauge(&metrics, "outpost_stage_stalled", stage),
            Some(0.0),
            "{stage}: {metrics}"
        );
    }
    assert!(!agent.log().contains("STALLED"), "{}", agent.log());
    assert!(agent.status_text().contains("Disk FULL"));
    // Space returns: healthy again, without a restart.
    drop(filler);
    std::fs::remove_file(mnt.join("filler")).unwrap();
    agent.wait_health("the store to take readings again", |status, _| {
        status == 200
    });
}

/// The saved stall state of a previous run says nothing about this one.
#[test]
fn a_stale_saved_stall_is_cleared_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("outpost.db");
    let saved = Path::new(&format!("{}.stalled", db.display())).to_path_buf();
    std::fs::write(
        &saved,
        r#"{"at":"2026-01-01T00:00:00Z","pid":1,"stall_after_s":3.0,"stalled":[]}"#,
    )
    .unwrap();
    let port = free_port();
    let config = format!(
        "[storage]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n{SIMULATED}",
        db.display()
    );
    let _agent = Agent::new(dir.path(), &config).start();
    assert!(
        support::wait_until(DEADLINE, || !saved.exists()),
        "the agent removes the file of a previous run"
    );
}
