//! `ModbusSlave`: a real Modbus RTU slave (pymodbus, see `modbus_slave.py`) serving
//! one or more slave ids on a serial path, usually a [`super::SerialLink`]'s peer end.
//!
//! ```rust,ignore
//! let link = SerialLink::start();
//! let slave = ModbusSlave::start(link.peer_path(), 9600, json!({"1": {"holding": [
//!     {"address": 0, "type": "f32", "word_order": "little", "value": 21.5}]}}));
//! slave.requests()   // [(monotonic seconds, slave id, function code)], as served
//! ```
//! The Python process exits when its stdin closes and is killed on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

use super::util::{read_log, temp_dir, ChildGuard, START_TIMEOUT};

/// The interpreter with pymodbus installed (pyenv's `python3` here); override with
/// `OUTPOST_TEST_PYTHON`.
fn python() -> String {
    std::env::var("OUTPOST_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

pub struct ModbusSlave {
    _dir: tempfile::TempDir,
    spec: PathBuf,
    log: PathBuf,
    child: ChildGuard,
}

impl ModbusSlave {
    /// Starts serving `slaves` (`{"<id>": {"holding": [...], "input": [...], "coils":
    /// [...], "discrete": [...]}}`) on `port` and waits until it is ready.
    pub fn start(port: &Path, baud: u32, slaves: serde_json::Value) -> ModbusSlave {
        let dir = temp_dir("modbus");
        let spec = dir.path().join("spec.json");
        let log = dir.path().join("slave.log");
        let body = serde_json::json!({"port": port, "baud": baud, "slaves": slaves});
        std::fs::write(&spec, body.to_string()).expect("write modbus spec");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/modbus_slave.py");
        let stderr = std::fs::File::create(&log).expect("create modbus slave log");
        let mut child = Command::new(python())
            .arg(&script)
            .arg(&spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} {}: {e}", python(), script.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut slave = ModbusSlave {
            _dir: dir,
            spec,
            log,
            child: ChildGuard::new(child),
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) if line.trim() == "ready" => {}
            other => {
                slave.child.kill();
                panic!(
                    "pymodbus slave not ready ({other:?}); is pymodbus installed (scripts/install-test-deps)? log:\n{}",
                    slave.log()
                );
            }
        }
        slave
    }

    /// Every request served so far: (monotonic seconds, slave id, function code).
    pub fn requests(&self) -> Vec<(f64, u8, u8)> {
        let path = PathBuf::from(format!("{}.requests", self.spec.display()));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                Some((
                    parts.next()?.parse().ok()?,
                    parts.next()?.parse().ok()?,
                    parts.next()?.parse().ok()?,
                ))
            })
            .collect()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    pub fn stop(&mut self) {
        self.child.kill();
    }
}

impl Drop for ModbusSlave {
    fn drop(&mut self) {
        self.child.kill();
    }
}
