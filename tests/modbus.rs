//! Modbus RTU against a real slave (pymodbus on a pty pair): every register type and
//! order, coils and discrete inputs, exceptions by name, plausible ranges; a slave id
//! that never answers does not slow the others; garbled answers (CRC errors, truncated
//! frames, wrong register counts) from a scripted raw slave are counted, not fatal.

mod support;

use outpost::sources::modbus_decode::crc16;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;
use support::agent::InProcessAgent as Agent;
use support::{ModbusSlave, SerialLink};

/// The latest value of each metric of `device` (`series`).
fn latest(agent: &Agent, device: &str) -> BTreeMap<String, f64> {
    let conn = agent.conn();
    let mut stmt = conn
        .prepare("SELECT metric, value FROM series WHERE device = ?1")
        .unwrap();
    stmt.query_map([device], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// What the source saved under `key`, as JSON.
fn state(agent: &Agent, source: &str, key: &str) -> Option<serde_json::Value> {
    agent
        .source_state(source, key)
        .and_then(|s| serde_json::from_str(&s).ok())
}

/// (reason, detail) of each message the source rejected, oldest first.
fn rejected(agent: &Agent, source: &str) -> Vec<(String, String)> {
    let conn = agent.conn();
    let mut stmt = conn
        .prepare("SELECT reason, COALESCE(detail, '') FROM rejected WHERE source = ?1 ORDER BY id")
        .unwrap();
    stmt.query_map([source], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// (metric, function, address, type, word order, byte order, value on the slave, count)
const TYPED: &[(&str, u8, u16, &str, &str, &str, f64)] = &[
    ("u16_be", 3, 0, "u16", "big", "big", 65000.0),
    ("u16_le", 3, 1, "u16", "big", "little", 258.0),
    ("i16_be", 3, 2, "i16", "big", "big", -1234.0),
    ("i16_le", 3, 3, "i16", "big", "little", -2.0),
    ("u32_bb", 3, 4, "u32", "big", "big", 4_000_000_000.0),
    ("u32_lb", 3, 6, "u32", "little", "big", 123_456_789.0),
    ("i32_bl", 3, 8, "i32", "big", "little", -2_000_000_000.0),
    ("i32_ll", 3, 10, "i32", "little", "little", -7.0),
    ("f32_bb", 3, 12, "f32", "big", "big", 21.5),
    ("f32_lb", 3, 14, "f32", "little", "big", -0.25),
    ("f32_bl", 3, 16, "f32", "big", "little", 1013.25),
    ("f32_ll", 3, 18, "f32", "little", "little", 3.75),
    ("in_i16", 4, 0, "i16", "big", "big", -40.0),
    ("in_f32", 4, 1, "f32", "little", "big", 0.5),
    ("in_u32", 4, 3, "u32", "little", "little", 70000.0),
];

fn typed_slave_spec() -> serde_json::Value {
    let entries = |function: u8| -> Vec<serde_json::Value> {
        TYPED
            .iter()
            .filter(|t| t.1 == function)
            .map(|&(_, _, address, ty, wo, bo, value)| {
                json!({"address": address, "type": ty, "word_order": wo, "byte_order": bo, "value": value})
            })
            .collect()
    };
    let mut holding = entries(3);
    holding.push(json!({"address": 20, "type": "u16", "value": 900}));
    holding.push(json!({"address": 21, "type": "u16", "value": 7}));
    holding.push(json!({"address": 22, "type": "u16", "value": 8}));
    json!({"1": {
        "holding": holding,
        "input": entries(4),
        "coils": [{"address": 0, "values": [1, 0, 1]}],
        "discrete": [{"address": 0, "values": [0, 1]}],
    }})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_every_type_and_order_from_pymodbus() {
    let link = SerialLink::start();
    let _slave = ModbusSlave::start(link.peer_path(), 19200, typed_slave_spec());
    let mut registers = String::new();
    for &(metric, function, address, ty, wo, bo, _) in TYPED {
        let scale = if metric == "in_i16" {
            "scale = 0.5\noffset = 1.0\n"
        } else {
            ""
        };
        registers += &format!(
            "[[slaves.registers]]\nmetric = \"{metric}\"\nfunction = {function}\naddress = {address}\n\
             type = \"{ty}\"\nword_order = \"{wo}\"\nbyte_order = \"{bo}\"\n{scale}"
        );
    }
    registers += r#"
[[slaves.registers]]
metric = "implausible"
address = 20
max = 100.0
[[slaves.registers]]
metric = "pair"
address = 21
count = 2
unit = "bar"
[[slaves.registers]]
metric = "coil"
function = 1
address = 0
count = 3
[[slaves.registers]]
metric = "door"
function = 2
address = 1
[[slaves.registers]]
metric = "missing"
address = 500
"#;
    let mut agent = Agent::open();
    agent.start_source(&format!(
        "type = \"modbus-rtu\"\nname = \"bus\"\npath = \"{}\"\n[port]\nbaud = 19200\nparity = \"none\"\n\
         [[slaves]]\nid = 1\ndevice = \"plc\"\ninterval = \"200ms\"\ntimeout = \"1s\"\n{registers}",
        link.device_path().display()
    ));
    let expected_metrics = TYPED.len() + 2 + 3 + 1;
    agent
        .wait_for("every register", |a| {
            latest(a, "plc").len() == expected_metrics
        })
        .await;
    let got = latest(&agent, "plc");
    for &(metric, _, _, _, _, _, value) in TYPED {
        let value = if metric == "in_i16" {
            value * 0.5 + 1.0
        } else {
            value
        };
        assert_eq!(got.get(metric), Some(&value), "{metric}");
    }
    for (metric, value) in [
        ("pair.0", 7.0),
        ("pair.1", 8.0),
        ("coil.0", 1.0),
        ("coil.1", 0.0),
        ("coil.2", 1.0),
        ("door", 1.0),
    ] {
        assert_eq!(got.get(metric), Some(&value), "{metric}");
    }
    assert!(!got.contains_key("implausible"));
    assert!(
        agent.count("SELECT COUNT(*) FROM readings WHERE metric = 'pair.0' AND unit = 'bar'") > 0
    );
    let rejected = rejected(&agent, "bus");
    assert!(
        rejected.iter().any(|(r, d)| r == "modbus_exception"
            && d.contains("Illegal data address")
            && d.contains("missing")),
        "exceptions are reported by name: {rejected:?}"
    );
    assert!(rejected
        .iter()
        .any(|(r, d)| r == "implausible_value" && d.contains("900")));
    let state = state(&agent, "bus", "slave.1").expect("slave state row");
    assert_eq!(state["state"], "online", "{state}");
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_slave_does_not_slow_the_others() {
    let link = SerialLink::start();
    let slave = ModbusSlave::start(
        link.peer_path(),
        38400,
        json!({
            "1": {"holding": [{"address": 0, "value": 11}]},
            "2": {"holding": [{"address": 0, "value": 22}]},
        }),
    );
    let mut agent = Agent::open();
    let mut config = format!(
        "type = \"modbus-rtu\"\nname = \"bus\"\npath = \"{}\"\n[port]\nbaud = 38400\n",
        link.device_path().display()
    );
    // Slave 9 is configured but does not exist: every request to it times out.
    for (id, timeout) in [(1, "300ms"), (9, "250ms"), (2, "300ms")] {
        config += &format!(
            "[[slaves]]\nid = {id}\ninterval = \"100ms\"\ntimeout = \"{timeout}\"\nretries = 1\n\
             [[slaves.registers]]\nmetric = \"v\"\naddress = 0\n"
        );
    }
    agent.start_source(&config);
    agent
        .wait_for("slave 9 to be marked offline", |a| {
            state(a, "bus", "slave.9").is_some_and(|s| s["state"] == "offline")
        })
        .await;
    let marked_at = slave.requests().last().map(|r| r.0).unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let requests = slave.requests();
    let rate = |id: u8| {
        let times: Vec<f64> = requests
            .iter()
            .filter(|r| r.1 == id && r.0 > marked_at)
            .map(|r| r.0)
            .collect();
        let span = times.last().unwrap_or(&0.0) - times.first().unwrap_or(&0.0);
        (times.len().saturating_sub(1)) as f64 / span.max(1e-9)
    };
    let (r1, r2) = (rate(1), rate(2));
    eprintln!("live slave poll rates: {r1:.1}/s {r2:.1}/s");
    // Configured: 10 polls/s each. Without backoff the silent slave would hold the bus
    // for 500ms (2 × 250ms) in every 100ms round, leaving under 2 polls/s each.
    assert!(
        r1 >= 7.5 && r2 >= 7.5,
        "live slaves polled at {r1:.1}/s and {r2:.1}/s"
    );
    let s9 = state(&agent, "bus", "slave.9").unwrap();
    assert_eq!(s9["state"], "offline");
    assert!(
        s9["last_error"].as_str().unwrap().contains("no_answer"),
        "{s9}"
    );
    let probes = s9["polls"].as_u64().unwrap();
    assert!(
        probes <= 5,
        "the silent slave is probed with backoff, not every 100ms: {probes} polls"
    );
    assert_eq!(state(&agent, "bus", "slave.1").unwrap()["state"], "online");
    // `outpost status` names it.
    let report = outpost::cli::status::status_report(agent.db()).unwrap();
    assert!(
        report
            .source_notes
            .iter()
            .any(|n| n.contains("slave 9 (bus-9) OFFLINE")),
        "{:?}",
        report.source_notes
    );
    let stored = agent.count("SELECT COUNT(*) FROM readings WHERE device = 'bus-2' AND value = 22");
    assert!(stored >= 30, "{stored}");
    agent.shutdown().await;
}

/// A raw slave on the pty peer answering each request by its address:
/// 0 → 42, 1 → bad CRC, 2 → a truncated frame, 3 → one register where two were asked,
/// 4 → exception "illegal data address", 5 → exception "server device busy".
fn garbling_slave(link: &SerialLink) -> std::thread::JoinHandle<usize> {
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(link.peer_path())
        .unwrap();
    std::thread::spawn(move || {
        let mut served = 0;
        let mut req = [0u8; 8];
        while port.read_exact(&mut req).is_ok() {
            let (id, function, address) = (req[0], req[1], u16::from_be_bytes([req[2], req[3]]));
            let mut answer = match address {
                0 => vec![id, function, 2, 0, 42],
                1 => vec![id, function, 2, 0, 43],
                2 => vec![id, function, 2],
                3 => vec![id, function, 2, 0, 1],
                4 => vec![id, function | 0x80, 0x02],
                _ => vec![id, function | 0x80, 0x06],
            };
            if address != 2 {
                let mut crc = crc16(&answer).to_le_bytes();
                if address == 1 {
                    crc[0] ^= 0x55;
                }
                answer.extend_from_slice(&crc);
            }
            if port.write_all(&answer).is_err() {
                break;
            }
            served += 1;
        }
        served
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbled_answers_are_counted_by_reason() {
    let link = SerialLink::start();
    let _raw = garbling_slave(&link);
    let mut agent = Agent::open();
    agent.start_source(&format!(
        r#"type = "modbus-rtu"
name = "noisy"
path = "{}"
[[slaves]]
id = 3
interval = "200ms"
timeout = "150ms"
retries = 0
[[slaves.registers]]
metric = "good"
address = 0
[[slaves.registers]]
metric = "crc"
address = 1
[[slaves.registers]]
metric = "short"
address = 2
[[slaves.registers]]
metric = "wide"
address = 3
type = "u32"
[[slaves.registers]]
metric = "absent"
address = 4
[[slaves.registers]]
metric = "busy"
address = 5
"#,
        link.device_path().display()
    ));
    agent
        .wait_for("two polls of good values", |a| {
            a.count("SELECT COUNT(*) FROM readings WHERE metric = 'good' AND value = 42") >= 2
        })
        .await;
    agent
        .wait_for("every kind of rejection", |a| {
            let reasons: Vec<String> = rejected(a, "noisy").into_iter().map(|r| r.0).collect();
            [
                "crc_error",
                "truncated_frame",
                "wrong_register_count",
                "modbus_exception",
            ]
            .iter()
            .all(|r| reasons.iter().any(|x| x == r))
        })
        .await;
    let rejected = rejected(&agent, "noisy");
    assert!(rejected
        .iter()
        .any(|(r, d)| r == "modbus_exception" && d.contains("Illegal data address")));
    assert!(
        rejected
            .iter()
            .any(|(r, d)| r == "modbus_exception" && d.contains("busy")),
        "{rejected:?}"
    );
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM readings WHERE metric != 'good'"),
        0
    );
    // A garbling slave is alive: it stays online and keeps being polled.
    assert_eq!(
        state(&agent, "noisy", "slave.3").unwrap()["state"],
        "online"
    );
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapter_is_reopened_after_an_unplug() {
    let mut link = SerialLink::start();
    let _raw = garbling_slave(&link);
    let mut agent = Agent::open();
    agent.start_source(&format!(
        "type = \"modbus-rtu\"\nname = \"bus\"\npath = \"{}\"\nreopen_max_delay = \"500ms\"\n\
         [[slaves]]\nid = 4\ninterval = \"100ms\"\ntimeout = \"200ms\"\n\
         [[slaves.registers]]\nmetric = \"good\"\naddress = 0\n",
        link.device_path().display()
    ));
    let readings = |a: &Agent| a.count("SELECT COUNT(*) FROM readings WHERE value = 42");
    agent
        .wait_for("the first readings", |a| readings(a) >= 2)
        .await;
    link.unplug();
    agent
        .wait_for("the unplug to be noticed", |a| {
            state(a, "bus", "state").is_some_and(|s| s["state"] == "waiting")
        })
        .await;
    link.replug();
    let _raw_again = garbling_slave(&link);
    let before = readings(&agent);
    agent
        .wait_for("polling to resume", |a| readings(a) >= before + 2)
        .await;
    assert_eq!(state(&agent, "bus", "state").unwrap()["state"], "open");
    agent.shutdown().await;
}
