//! The real `outpost` binary as a child process (killed on drop), and a plain HTTP
//! client for its `/metrics` and `/health` endpoint.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running agent; the process is killed and reaped on drop.
pub struct AgentProcess(pub Child);

impl AgentProcess {
    /// `outpost --config CONFIG run` (the binary of the test's own build), its log
    /// (stderr, `RUST_LOG=info`) appended to `log`.
    pub fn run(config: &Path, log: &Path) -> AgentProcess {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the agent log");
        let child = Command::new(env!("CARGO_BIN_EXE_outpost"))
            .arg("--config")
            .arg(config)
            .arg("run")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start outpost");
        AgentProcess(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// A field of `/proc/PID/status` in KiB, e.g. `VmHWM` (peak resident set) or
    /// `VmRSS`; `None` once the process is gone.
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        proc_status_kib(self.pid(), field)
    }

    /// SIGTERM, then the exit status; SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        None
    }
}

/// A field of `/proc/PID/status` in KiB (`VmHWM`, `VmRSS`, …).
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// One integer from the agent's SQLite database, read-only beside the running agent;
/// `None` while the database or the table does not exist yet.
pub fn db_i64(db: &Path, sql: &str) -> Option<i64> {
    use rusqlite::{Connection, OpenFlags};
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    conn.busy_timeout(Duration::from_secs(5)).ok()?;
    conn.query_row(sql, [], |r| r.get(0)).ok()
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1; returns (status, body), `None` while nothing
/// answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// Polls `f` every 100 ms until it returns `Some`; panics after `timeout`.
pub fn wait_for_some<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
