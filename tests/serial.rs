//! Serial line sources against pseudo-terminal pairs (socat): every format mixed with
//! garbage, overlong lines, CRLF and non-UTF-8 bytes; unplug and replug; a port missing
//! at start; the local sequence across restarts.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;
use support::agent::InProcessAgent as Agent;
use support::SerialLink;

fn write_peer(link: &SerialLink, chunks: &[&[u8]]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(link.peer_path())
        .unwrap();
    for chunk in chunks {
        f.write_all(chunk).unwrap();
        f.flush().unwrap();
    }
}

fn readings_of(agent: &Agent, source: &str) -> Vec<String> {
    agent
        .query::<String>(&format!(
            "SELECT device || ' ' || metric || '=' || value || COALESCE(' ' || unit, '') || ' ' || (flags & 1)
               || CASE WHEN observed_at = 1714564800000000 THEN ' at-line-time' ELSE '' END
             FROM readings WHERE source = '{source}' ORDER BY id"
        ))
        .into_iter()
        .map(|mut r| r.remove(0))
        .collect()
}

fn rejected_reasons(agent: &Agent, source: &str) -> BTreeMap<String, i64> {
    agent
        .query::<String>(&format!(
            "SELECT key, value FROM source_state WHERE source = '{source}' AND key LIKE 'rejected.%'"
        ))
        .into_iter()
        .map(|r| (r[0].trim_start_matches("rejected.").to_string(), r[1].parse().unwrap()))
        .collect()
}

fn port_config(name: &str, path: &Path, rest: &str) -> String {
    format!(
        "type = \"serial\"\nname = \"{name}\"\npath = \"{}\"\n{rest}",
        path.display()
    )
}

fn unsynced() -> String {
    // Readings stamped by the local clock carry CLOCK_UNSYNCED (bit 0) when this
    // machine's clock is not synchronised.
    u8::from(!outpost::clock::is_synchronized()).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_with_garbage_overlong_lines_and_crlf() {
    let links: Vec<SerialLink> = (0..5).map(|_| SerialLink::start()).collect();
    let mut agent = Agent::open();
    let overlong = format!("{{\"id\":\"ws-1\",\"t\":{}}}\n", "1".repeat(400));
    agent.start_source(&port_config(
        "json",
        links[0].device_path(),
        r#"format = "json"
max_line_length = 256
[port]
baud = 115200
[fields]
device_field = "id"
timestamp_field = "ts"
[plausible.t]
min = -50
max = 100
"#,
    ));
    agent.start_source(&port_config(
        "csvh",
        links[1].device_path(),
        r#"format = "csv"
[fields]
device_field = "device"
"#,
    ));
    agent.start_source(&port_config(
        "csvc",
        links[2].device_path(),
        r#"format = "csv"
[csv]
delimiter = ";"
columns = ["device", "temp", ""]
[fields]
device_field = "device"
"#,
    ));
    agent.start_source(&port_config(
        "kv",
        links[3].device_path(),
        r#"format = "key-value"
line_ending = "lf"
[fields]
device = "boiler"
timestamp_field = "t"
timestamp_format = "unix"
[mapping.fields.temp]
metric = "water_temperature"
unit = "°C"
scale = 0.1
"#,
    ));
    agent.start_source(&port_config(
        "re",
        links[4].device_path(),
        r#"format = "regex"
pattern = '^(?P<dev>[\w-]+): (?P<metric>\w+)=(?P<value>\S+) (?P<unit>\S+)$'
[fields]
device_field = "dev"
metric_field = "metric"
unit_field = "unit"
"#,
    ));
    for name in ["json", "csvh", "csvc", "kv", "re"] {
        agent
            .wait_for("the ports to open", |a| {
                a.source_state(name, "state")
                    .is_some_and(|s| s.contains("\"open\""))
            })
            .await;
    }

    write_peer(
        &links[0],
        &[
            b"{\"id\":\"ws-1\",\"t\":21.5,\"rh\":40}\r\n",
            b"garbage\n",
            b"{\"id\":\"ws-1\",\"ts\":\"2024-05-01T12:00:00Z\",\"t\":22}\n",
            overlong.as_bytes(),
            b"{\"id\":\"ws-2\",\"t\":500}\n",
            b"{\"id\":\"ws-3\",\"note\":\"\xff\xfe\",\"t\":-1.5}\n",
            b"{\"id\":\"ws-1\",",
            b"\"t\":23}\n",
            b"{\"id\":\"bad id\",\"t\":1}\n\x00\x01\x02\n",
        ],
    );
    write_peer(
        &links[1],
        &[
            b"ws-9,1,2\r\n",
            b"device,temp,rh\r\n",
            b"ws-1,20.5,50\r\n",
            b"ws-1,abc\r\n",
            b"\xff\xff\xff\r\n",
            b"ws-2,-3,\"70\"\r\n",
        ],
    );
    write_peer(
        &links[2],
        &[b"a;1;x\n", b"b;2\n", b";;;;\n", b"c;3.25;y\r\n"],
    );
    write_peer(
        &links[3],
        &[
            b"t=1714564800 temp=215 rh=41\n",
            b"hello world\n",
            b"t=yesterday temp=1\n",
            b"temp=200\r\n",
        ],
    );
    write_peer(
        &links[4],
        &[
            b"tank-1: level=1.25 m\n",
            b"tank-1 level 1.25 m\n",
            b"tank-2: level=high m\n",
            b"tank-2: pressure=2.5e0 bar\r\n",
        ],
    );

    let expected: [(&str, usize); 5] =
        [("json", 5), ("csvh", 4), ("csvc", 2), ("kv", 3), ("re", 2)];
    agent
        .wait_for("every accepted reading", |a| {
            expected.iter().all(|(s, n)| readings_of(a, s).len() >= *n)
        })
        .await;
    agent.stop_sources().await;

    let u = unsynced();
    assert_eq!(
        readings_of(&agent, "json"),
        vec![
            format!("ws-1 rh=40.0 {u}"),
            format!("ws-1 t=21.5 {u}"),
            "ws-1 t=22.0 0 at-line-time".to_string(),
            format!("ws-3 t=-1.5 {u}"),
            format!("ws-1 t=23.0 {u}"),
        ],
        "JSON: CRLF, split writes and non-UTF-8 text are fine"
    );
    assert_eq!(
        rejected_reasons(&agent, "json"),
        BTreeMap::from([
            ("bad_device".into(), 1),
            ("implausible_value".into(), 1),
            ("line_too_long".into(), 1),
            ("not_json".into(), 2),
        ])
    );
    assert_eq!(
        readings_of(&agent, "csvh"),
        vec![
            format!("ws-1 temp=20.5 {u}"),
            format!("ws-1 rh=50.0 {u}"),
            format!("ws-2 temp=-3.0 {u}"),
            format!("ws-2 rh=70.0 {u}"),
        ]
    );
    assert_eq!(
        rejected_reasons(&agent, "csvh"),
        BTreeMap::from([("csv_column_count".into(), 2), ("csv_no_header".into(), 1),])
    );
    assert_eq!(
        readings_of(&agent, "csvc"),
        vec![format!("a temp=1.0 {u}"), format!("c temp=3.25 {u}")]
    );
    assert_eq!(
        rejected_reasons(&agent, "csvc"),
        BTreeMap::from([("csv_column_count".into(), 2)])
    );
    assert_eq!(
        readings_of(&agent, "kv"),
        vec![
            "boiler water_temperature=21.5 °C 0 at-line-time".to_string(),
            "boiler rh=41.0 0 at-line-time".to_string(),
            format!("boiler water_temperature=20.0 °C {u}"),
        ]
    );
    assert_eq!(
        rejected_reasons(&agent, "kv"),
        BTreeMap::from([
            ("bad_timestamp".into(), 1),
            ("no_key_value_pairs".into(), 1)
        ])
    );
    assert_eq!(
        readings_of(&agent, "re"),
        vec![
            format!("tank-1 level=1.25 m {u}"),
            format!("tank-2 pressure=2.5 bar {u}")
        ]
    );
    assert_eq!(
        rejected_reasons(&agent, "re"),
        BTreeMap::from([("bad_value".into(), 1), ("regex_no_match".into(), 1)])
    );
    // Rejected input is kept for diagnosis, with its bytes.
    let kept = agent.count("SELECT COUNT(*) FROM rejected WHERE source = 'json' AND reason = 'not_json' AND payload IS NOT NULL");
    assert_eq!(kept, 2);
    // Every uid is distinct: one sequence number per line.
    assert_eq!(
        agent.count("SELECT COUNT(DISTINCT uid) FROM readings"),
        agent.count("SELECT COUNT(*) FROM readings")
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplug_and_replug_lose_and_duplicate_nothing() {
    let mut link = SerialLink::start();
    let mut agent = Agent::open();
    agent.start_source(&port_config(
        "probe",
        link.device_path(),
        "format = \"key-value\"\nreopen_max_delay = \"500ms\"\n[fields]\ndevice = \"p1\"\n",
    ));
    let open = |a: &Agent| {
        a.source_state("probe", "state")
            .is_some_and(|s| s.contains("\"open\""))
    };
    agent.wait_for("the port to open", open).await;

    let lines: String = (0..100).map(|i| format!("n={i}\r\n")).collect();
    write_peer(&link, &[lines.as_bytes(), b"n=999"]);
    agent
        .wait_for("the first 100 readings", |a| {
            a.count("SELECT COUNT(*) FROM readings") == 100
        })
        .await;
    // Let the partial line reach the agent, then pull the cable.
    tokio::time::sleep(Duration::from_millis(200)).await;
    link.unplug();
    agent
        .wait_for("the unplug to be noticed", |a| {
            a.source_state("probe", "state")
                .is_some_and(|s| s.contains("\"waiting\""))
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    link.replug();
    agent.wait_for("the port to reopen", open).await;

    let lines: String = (100..200).map(|i| format!("n={i}\n")).collect();
    write_peer(&link, &[lines.as_bytes()]);
    agent
        .wait_for("all 200 readings", |a| {
            a.count("SELECT COUNT(*) FROM readings") >= 200
        })
        .await;
    // A second unplug and replug, to show recovery repeats.
    link.unplug();
    agent
        .wait_for("the second unplug", |a| {
            a.source_state("probe", "state")
                .is_some_and(|s| s.contains("\"waiting\""))
        })
        .await;
    link.replug();
    agent.wait_for("the port to reopen again", open).await;
    write_peer(&link, &[b"n=200\n"]);
    agent
        .wait_for("the last reading", |a| {
            a.count("SELECT COUNT(*) FROM readings") >= 201
        })
        .await;
    agent.stop_sources().await;

    let values: Vec<i64> = agent
        .query::<f64>("SELECT value FROM readings ORDER BY value")
        .into_iter()
        .map(|r| r[0] as i64)
        .collect();
    assert_eq!(
        values,
        (0..=200).collect::<Vec<_>>(),
        "every line exactly once, the cut one not at all"
    );
    assert_eq!(
        rejected_reasons(&agent, "probe").get("truncated_line"),
        Some(&1)
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_missing_at_start_is_waited_for() {
    let mut link = SerialLink::start();
    link.unplug();
    let mut agent = Agent::open();
    agent.start_source(&port_config(
        "late",
        link.device_path(),
        "format = \"json\"\nreopen_max_delay = \"500ms\"\n",
    ));
    agent
        .wait_for("the missing port to be reported", |a| {
            a.source_state("late", "state")
                .is_some_and(|s| s.contains("\"waiting\""))
        })
        .await;
    link.replug();
    agent
        .wait_for("the port to open", |a| {
            a.source_state("late", "state")
                .is_some_and(|s| s.contains("\"open\""))
        })
        .await;
    write_peer(&link, &[b"{\"t\":1}\n"]);
    agent
        .wait_for("the reading", |a| {
            a.count("SELECT COUNT(*) FROM readings WHERE device = 'late'") == 1
        })
        .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sequence_continues_after_a_restart() {
    let link = SerialLink::start();
    let mut agent = Agent::open();
    let config = port_config("seq", link.device_path(), "format = \"key-value\"\n");
    let open = |a: &Agent| {
        a.source_state("seq", "state")
            .is_some_and(|s| s.contains("\"open\""))
    };
    for round in 0..3 {
        agent.start_source(&config);
        agent.wait_for("the port to open", open).await;
        // The same line every round: only the sequence tells them apart.
        write_peer(&link, &[b"x=1\n"]);
        agent
            .wait_for("the reading", |a| {
                a.count("SELECT COUNT(*) FROM readings") == round + 1
            })
            .await;
        agent.stop_sources().await;
    }
    assert_eq!(agent.count("SELECT COUNT(DISTINCT uid) FROM readings"), 3);
    agent.shutdown().await;
}
