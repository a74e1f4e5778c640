//! The agent under test, two ways:
//!
//! - [`Agent`]: the real `outpost` binary of this build, started on a configuration
//!   file, stopped with SIGTERM or SIGKILL and started again on the same directory;
//!   read through what a technician would look at (its database, `/health`,
//!   `/metrics`, `outpost status` and `--json`, its log).
//! - [`InProcessAgent`]: the library's store with the tasks a test starts on it
//!   (sources, alerting, sync) in the test's own tokio runtime, for tests that hand
//!   readings over as a source would or drive one component alone.
//!
//! ```ignore
//! let mut agent = Agent::new(dir.path(), &config).start();
//! agent.wait_until("the first reading", || agent.try_count(READINGS) >= Some(1));
//! agent.kill(); // SIGKILL: nothing is committed or acknowledged any more
//! agent.start_again();
//! assert_eq!(agent.count("SELECT COUNT(DISTINCT uid) FROM readings"), 24);
//! ```
//!
//! Also here: [`AgentProcess`] (the bare child process both ways of stopping work on),
//! [`db_i64`], [`http_get`] and [`wait_for_some`] for tests that need only those.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `outpost` binary of the test's own build.
pub const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// How long [`Agent::terminate`] waits after SIGTERM before it sends SIGKILL.
pub const TERMINATE_GRACE: Duration = Duration::from_secs(20);

/// How long the `wait_*` methods of [`Agent`] wait unless [`Agent::deadline`] says
/// otherwise. Generous: the test box is small and shared.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

// ---- The real binary -------------------------------------------------------------------

/// The real agent (`outpost --config DIR/outpost.toml run`), killed on drop.
///
/// Its database and HTTP port are read from the configuration (`[storage] path`,
/// `[http] listen`); its log (stderr) is appended to `DIR/agent.log`, one marker line
/// per start.
pub struct Agent {
    /// Killed (on drop) before the directory goes.
    process: Option<AgentProcess>,
    dir: PathBuf,
    config: PathBuf,
    db: PathBuf,
    port: Option<u16>,
    gateway_id: Option<String>,
    log: PathBuf,
    log_filter: String,
    env: Vec<(String, String)>,
    /// A program (with arguments) the binary runs through, e.g. `eatmydata`.
    launcher: Vec<OsString>,
    deadline: Duration,
    starts: usize,
    /// Present when the agent owns its directory ([`Agent::in_temp_dir`]).
    owned_dir: Option<tempfile::TempDir>,
}

impl Agent {
    /// Writes `config` to `dir/outpost.toml`; the agent is not started yet (see
    /// [`Agent::start`]).
    pub fn new(dir: &Path, config: &str) -> Agent {
        let path = dir.join("outpost.toml");
        std::fs::write(&path, config).expect("write the agent's configuration");
        let known = KnownKeys::of(config);
        Agent {
            process: None,
            dir: dir.to_path_buf(),
            config: path,
            db: known.db.unwrap_or_else(|| dir.join("outpost.db")),
            port: known.port,
            gateway_id: known.gateway_id,
            log: dir.join("agent.log"),
            log_filter: "info".into(),
            env: Vec::new(),
            launcher: Vec::new(),
            deadline: DEFAULT_DEADLINE,
            starts: 0,
            owned_dir: None,
        }
    }

    /// [`Agent::new`] in a fresh temporary directory (removed on drop); `config` gets
    /// the directory's path, for the database path.
    pub fn in_temp_dir(config: impl FnOnce(&Path) -> String) -> Agent {
        let temp = tempfile::tempdir().expect("create the agent's directory");
        let mut agent = Agent::new(temp.path(), &config(temp.path()));
        agent.owned_dir = Some(temp);
        agent
    }

    /// `RUST_LOG` for the agent (default `info`).
    pub fn log_filter(mut self, filter: &str) -> Agent {
        self.log_filter = filter.into();
        self
    }

    /// An environment variable for the agent and for its `outpost status`.
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Agent {
        let value = value.as_ref().to_string_lossy().into_owned();
        self.env.push((key.into(), value));
        self
    }

    /// Runs the binary through `launcher` (a program and its arguments, e.g.
    /// `["eatmydata"]`), which gets `outpost --config … run` appended.
    pub fn through<S: AsRef<std::ffi::OsStr>>(mut self, launcher: &[S]) -> Agent {
        self.run_through(launcher);
        self
    }

    /// [`Agent::through`] from the next start on.
    pub fn run_through<S: AsRef<std::ffi::OsStr>>(&mut self, launcher: &[S]) {
        self.launcher = launcher.iter().map(|s| s.as_ref().to_owned()).collect();
    }

    /// How long the `wait_*` methods wait (default [`DEFAULT_DEADLINE`]).
    pub fn deadline(mut self, deadline: Duration) -> Agent {
        self.deadline = deadline;
        self
    }

    /// Starts the agent.
    pub fn start(mut self) -> Agent {
        self.start_again();
        self
    }

    /// Starts the agent (again) on the same directory, configuration and database.
    pub fn start_again(&mut self) {
        assert!(self.process.is_none(), "the agent is already running");
        self.starts += 1;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open the agent log");
        writeln!(log, "===== start {} =====", self.starts).expect("write the agent log");
        let mut cmd = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", &self.log_filter)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.process = Some(AgentProcess(cmd.spawn().expect("start outpost")));
    }

    /// SIGTERM, and the exit status once it exited; SIGKILL after [`TERMINATE_GRACE`]
    /// (`None`).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut process = self.process.take().expect("the agent is running");
        process.terminate(TERMINATE_GRACE)
    }

    /// SIGKILL: no chance to commit, acknowledge, mark or flush anything.
    pub fn kill(&mut self) {
        self.process = None; // AgentProcess kills and reaps on drop
    }

    /// SIGTERM, and the exit status; panics unless the agent exits within `limit`.
    pub fn terminate_within(&mut self, limit: Duration) -> ExitStatus {
        let mut process = self.process.take().expect("the agent is running");
        process
            .terminate(limit)
            .unwrap_or_else(|| panic!("did not exit within {limit:?} of SIGTERM"))
    }

    /// SIGTERM and wait ([`Agent::terminate`]), then start again.
    pub fn restart(&mut self) -> Option<ExitStatus> {
        let status = self.terminate();
        self.start_again();
        status
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`, or SIGTERM without waiting) to the agent.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe {
            libc::kill(self.pid() as i32, signal);
        }
    }

    pub fn pid(&self) -> u32 {
        self.process().pid()
    }

    /// The running process (e.g. for [`AgentProcess::status_kib`]).
    pub fn process(&self) -> &AgentProcess {
        self.process.as_ref().expect("the agent is running")
    }

    /// The exit status once the process has exited; `None` while it runs (or after
    /// [`Agent::kill`]).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.process
            .as_mut()?
            .0
            .try_wait()
            .expect("wait for the agent")
    }

    /// Whether the process runs (false once it exited, or after [`Agent::kill`]).
    pub fn is_running(&mut self) -> bool {
        self.process.is_some() && self.exit_status().is_none()
    }

    /// Panics, with the log, unless the agent still runs.
    pub fn assert_running(&mut self) {
        assert!(self.process.is_some(), "the agent was stopped");
        if let Some(status) = self.exit_status() {
            panic!("the agent exited ({status}); log:\n{}", self.log());
        }
    }

    /// Panics unless the agent still runs and was started once: the same process
    /// throughout, which did not restart itself either.
    pub fn assert_started_once(&mut self) {
        self.assert_running();
        assert_eq!(self.starts, 1, "the test started the agent once");
        assert_eq!(
            self.full_log().matches("Outpost is running.").count(),
            1,
            "started once"
        );
    }

    /// `[agent] gateway_id` of the configuration.
    pub fn gateway_id(&self) -> &str {
        self.gateway_id
            .as_deref()
            .expect("the configuration has no `[agent] gateway_id`")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn db(&self) -> &Path {
        &self.db
    }

    /// The HTTP port of `[http] listen`.
    pub fn port(&self) -> u16 {
        self.port
            .expect("the configuration has no `[http] listen` (the agent's HTTP port)")
    }

    /// The log of the latest start.
    pub fn log(&self) -> String {
        let all = self.full_log();
        let marker = format!("===== start {} =====\n", self.starts);
        match all.rfind(&marker) {
            Some(at) => all[at + marker.len()..].to_string(),
            None => all,
        }
    }

    /// The log of every start on this directory, each under a marker line.
    pub fn full_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.full_log();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    // ---- Its database ----------------------------------------------------------------

    /// A read-only connection to the agent's database, beside the running agent.
    pub fn conn(&self) -> rusqlite::Connection {
        use rusqlite::{Connection, OpenFlags};
        let conn = Connection::open_with_flags(&self.db, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.db.display()));
        conn.busy_timeout(Duration::from_secs(5))
            .expect("set the busy timeout");
        conn
    }

    /// The integer `sql` returns (its first row); panics when the query fails.
    pub fn count(&self, sql: &str) -> i64 {
        self.conn()
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// [`Agent::count`], or `None` while the database or its table does not exist yet
    /// (the agent creates them once it starts).
    pub fn try_count(&self, sql: &str) -> Option<i64> {
        db_i64(&self.db, sql)
    }

    /// The first column of every row `sql` returns, as text.
    pub fn strings(&self, sql: &str) -> Vec<String> {
        let conn = self.conn();
        let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows.map(|r| r.unwrap_or_else(|e| panic!("{sql}: {e}")))
            .collect()
    }

    // ---- What a technician looks at ------------------------------------------------

    /// `/health`: (HTTP status, document); `None` while nothing answers. Panics unless
    /// the two agree (200 exactly when the document says `ok`).
    pub fn health(&self) -> Option<(u16, Value)> {
        let (status, body) = http_get(self.port(), "/health")?;
        let health: Value = serde_json::from_str(&body).ok()?;
        assert_eq!(
            status == 200,
            health["status"] == "ok",
            "HTTP status and body agree: {status} {health}"
        );
        Some((status, health))
    }

    /// `/metrics` (empty while nothing answers).
    pub fn metrics(&self) -> String {
        http_get(self.port(), "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    /// Polls `/health` until `ok(status, document)` holds; returns the document.
    pub fn wait_health(&self, what: &str, ok: impl Fn(u16, &Value) -> bool) -> Value {
        let mut last = None;
        let found = self.poll(|| match self.health() {
            Some((status, health)) if ok(status, &health) => Some(health),
            Some(other) => {
                last = Some(other);
                None
            }
            None => None,
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out waiting for {what}; last /health: {last:?}\nagent log:\n{}",
                self.log()
            )
        })
    }

    /// Polls `/health` until its check `name` satisfies `pred`; returns the check.
    pub fn wait_check(&self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let health = self.wait_health(&format!("check {name}"), |_, h| {
            health_check(h, name).is_some_and(&pred)
        });
        health_check(&health, name)
            .expect("the check is there")
            .clone()
    }

    /// `outpost status --config …` as a separate process: its text.
    pub fn status_text(&self) -> String {
        self.outpost_status(false)
    }

    /// `outpost status --json --config …` as a separate process.
    pub fn status_json(&self) -> Value {
        let text = self.outpost_status(true);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status --json: {e}\n{text}"))
    }

    fn outpost_status(&self, json: bool) -> String {
        let mut cmd = Command::new(BIN);
        cmd.arg("status").arg("--config").arg(&self.config);
        if json {
            cmd.arg("--json");
        }
        let out = cmd
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run outpost status");
        assert!(
            out.status.success(),
            "outpost status{} failed: {}",
            if json { " --json" } else { "" },
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("outpost status prints UTF-8")
    }

    // ---- Waiting -------------------------------------------------------------------------

    /// Polls `cond` every 100 ms until it holds; panics (with the log) after the deadline.
    pub fn wait_until(&self, what: &str, mut cond: impl FnMut() -> bool) {
        self.wait_for(what, || cond().then_some(()));
    }

    /// Polls `f` every 100 ms until it returns `Some`; panics (with the log) after the
    /// deadline.
    pub fn wait_for<T>(&self, what: &str, f: impl FnMut() -> Option<T>) -> T {
        self.poll(f).unwrap_or_else(|| {
            panic!(
                "timed out after {:?} waiting for {what}; agent log:\n{}",
                self.deadline,
                self.log()
            )
        })
    }

    fn poll<T>(&self, mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return Some(v);
            }
            if start.elapsed() >= self.deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The check `name` of a `/health` document (`{"checks": [{"name": …, "ok": …,
/// "detail": …}, …]}`).
pub fn health_check<'a>(health: &'a Value, name: &str) -> Option<&'a Value> {
    health["checks"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

/// What the harness reads from the configuration text.
struct KnownKeys {
    /// `[storage] path`
    db: Option<PathBuf>,
    /// The port of `[http] listen`, unless `[http] enabled = false`.
    port: Option<u16>,
    /// `[agent] gateway_id`
    gateway_id: Option<String>,
}

impl KnownKeys {
    fn of(config: &str) -> KnownKeys {
        // A test of a broken configuration gets none of them.
        let doc = config.parse::<toml::Table>().unwrap_or_default();
        let text = |table: &str, key: &str| {
            doc.get(table)
                .and_then(|t| t.get(key))
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        let http_enabled = doc
            .get("http")
            .and_then(|h| h.get("enabled"))
            .and_then(|e| e.as_bool())
            .unwrap_or(true);
        KnownKeys {
            db: text("storage", "path").map(PathBuf::from),
            port: text("http", "listen")
                .and_then(|l| l.rsplit_once(':')?.1.parse().ok())
                .filter(|_| http_enabled),
            gateway_id: text("agent", "gateway_id"),
        }
    }
}

// ---- One-shot commands ---------------------------------------------------------------------

/// `outpost ARGS…` (this build's binary) run to completion, without `OUTPOST_CONFIG`
/// from the test's environment: (exit code, stdout, stderr).
pub fn outpost<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("OUTPOST_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run outpost");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `outpost demo --duration DURATION --dir DIR` to its end; returns the database it
/// left (`DIR/outpost.db`).
pub fn demo_database(dir: &Path, duration: &str) -> PathBuf {
    let status = Command::new(BIN)
        .args(["demo", "--duration", duration, "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run outpost demo");
    assert!(status.success(), "outpost demo: {status}");
    dir.join("outpost.db")
}

// ---- The bare process --------------------------------------------------------------------

/// A running agent process; killed and reaped on drop.
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
        let child = Command::new(BIN)
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
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
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

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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

// ---- In this process -----------------------------------------------------------------------

pub use in_process::InProcessAgent;

mod in_process {
    use std::future::Future;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use outpost::config::{HumanDuration, Problems};
    use outpost::model::{Batch, Reading};
    use outpost::sources::{SourceConfig, SourceContext};
    use outpost::store::{StorageConfig, Store, StoreOptions};
    use tokio::sync::{mpsc, oneshot};
    use tokio::task::{JoinHandle, JoinSet};
    use tokio_util::sync::CancellationToken;

    /// How long [`InProcessAgent::wait_for`] waits, and how long its tasks may take to
    /// stop.
    const DEADLINE: Duration = Duration::from_secs(30);

    /// The store in a temporary directory and the tasks a test starts on it: like
    /// `outpost run` without the rest. Sources stop on their own tokens (so a test can
    /// stop them and keep the store); other tasks stop on [`InProcessAgent::shutdown`].
    pub struct InProcessAgent {
        gateway_id: String,
        db: PathBuf,
        store: Option<Store>,
        ingest: Option<mpsc::Sender<Batch>>,
        /// Fires once the store's writer has committed everything and stopped.
        finished: Option<oneshot::Receiver<()>>,
        sources: Vec<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
        shutdown: CancellationToken,
        tasks: JoinSet<()>,
        _dir: tempfile::TempDir,
    }

    impl InProcessAgent {
        /// Opens a store in a fresh temporary directory (batches commit after 10 ms),
        /// for gateway `test`.
        pub fn open() -> InProcessAgent {
            InProcessAgent::open_as("test")
        }

        /// [`InProcessAgent::open`] for gateway `gateway_id`.
        pub fn open_as(gateway_id: &str) -> InProcessAgent {
            let dir = tempfile::tempdir().expect("create the agent's directory");
            let storage = StorageConfig {
                path: dir.path().join("outpost.db"),
                batch_max_delay: HumanDuration::from_millis(10),
                ..StorageConfig::default()
            };
            let mut agent = InProcessAgent::open_in(dir, &storage);
            agent.gateway_id = gateway_id.into();
            agent
        }

        /// Opens the store `storage` describes; `dir` is removed on drop.
        pub fn open_in(dir: tempfile::TempDir, storage: &StorageConfig) -> InProcessAgent {
            let _ = tracing_subscriber::fmt()
                .with_test_writer()
                .with_env_filter(
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "outpost=info".into()),
                )
                .try_init();
            let (store, ingest) =
                Store::open(storage, StoreOptions::default()).expect("open the store");
            InProcessAgent {
                gateway_id: "test".into(),
                db: storage.path.clone(),
                store: Some(store),
                ingest: Some(ingest.sender),
                finished: Some(ingest.finished),
                sources: Vec::new(),
                shutdown: CancellationToken::new(),
                tasks: JoinSet::new(),
                _dir: dir,
            }
        }

        pub fn gateway_id(&self) -> &str {
            &self.gateway_id
        }

        pub fn db(&self) -> &Path {
            &self.db
        }

        pub fn store(&self) -> &Store {
            self.store.as_ref().expect("the store is open")
        }

        /// Cancelled by [`InProcessAgent::shutdown`], for the tasks given to
        /// [`InProcessAgent::spawn`].
        pub fn shutdown_token(&self) -> CancellationToken {
            self.shutdown.clone()
        }

        /// Runs `task` until [`InProcessAgent::shutdown`] (which waits for it).
        pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
            self.tasks.spawn(task);
        }

        /// Starts the source one `[[sources]]` table (as TOML, without the header)
        /// describes; panics on a configuration problem.
        pub fn start_source(&mut self, toml_text: &str) {
            let config = source_config(toml_text);
            let token = CancellationToken::new();
            let ctx = SourceContext {
                out: self.ingest.clone().expect("the store is open"),
                shutdown: token.clone(),
                store: self.store().clone(),
                metrics: outpost::metrics::Metrics::new(self.store()),
                gateway_id: self.gateway_id.clone(),
                clock: outpost::clock::Clock::system(),
                certs: outpost::tls::CertWatch::default(),
            };
            self.sources.push((token, tokio::spawn(config.run(ctx))));
        }

        /// Stops the sources (they flush and publish their state), keeping the store;
        /// panics unless each ends without an error.
        pub async fn stop_sources(&mut self) {
            for (token, task) in self.sources.drain(..) {
                token.cancel();
                task.await
                    .expect("the source task")
                    .expect("the source ends without an error");
            }
        }

        /// Hands `readings` to the store writer as a source does, and waits for the
        /// commit.
        pub async fn ingest(&self, readings: Vec<Reading>) {
            let (batch, ack) = Batch::with_ack(readings);
            let sender = self.ingest.as_ref().expect("the store is open");
            sender.send(batch).await.expect("the store takes the batch");
            ack.await
                .expect("the store answers")
                .expect("the batch is committed");
        }

        /// A read-only connection to the database.
        pub fn conn(&self) -> rusqlite::Connection {
            self.store().reader().expect("open a reader")
        }

        /// The integer `sql` returns (its first row); panics when the query fails.
        pub fn count(&self, sql: &str) -> i64 {
            self.conn()
                .query_row(sql, [], |r| r.get(0))
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        }

        /// Waits until the alert engine has fixed its starting point (its cursor row).
        /// On a first start it evaluates only readings committed after that point, so
        /// a reading a test stores sooner would be passed over.
        pub fn wait_for_alert_engine(&self) {
            let started = crate::support::util::wait_until(Duration::from_secs(30), || {
                self.count(
                    "SELECT COUNT(*) FROM source_state WHERE source = 'alerts' AND key = 'cursor'",
                ) > 0
            });
            assert!(started, "the alert engine did not start within 30 s");
        }

        /// Every row `sql` returns, every column as a `T`.
        pub fn query<T: rusqlite::types::FromSql>(&self, sql: &str) -> Vec<Vec<T>> {
            let conn = self.conn();
            let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            let n = stmt.column_count();
            stmt.query_map([], |r| (0..n).map(|i| r.get::<_, T>(i)).collect())
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .collect::<Result<_, _>>()
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
        }

        /// What a source saved under `key` (`source_state`).
        pub fn source_state(&self, source: &str, key: &str) -> Option<String> {
            self.conn()
                .query_row(
                    "SELECT value FROM source_state WHERE source = ?1 AND key = ?2",
                    [source, key],
                    |r| r.get(0),
                )
                .ok()
        }

        /// Polls `cond` every 25 ms until it holds; panics after 30 s.
        pub async fn wait_for(&self, what: &str, mut cond: impl FnMut(&InProcessAgent) -> bool) {
            let deadline = tokio::time::Instant::now() + DEADLINE;
            while !cond(self) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "timed out waiting for {what}"
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }

        /// Stops the sources, then the other tasks, then the store writer (once every
        /// sender and store handle is gone); panics unless each stops cleanly within 30 s.
        pub async fn shutdown(mut self) {
            self.stop_sources().await;
            self.shutdown.cancel();
            while let Some(joined) = tokio::time::timeout(DEADLINE, self.tasks.join_next())
                .await
                .expect("the tasks stop on shutdown")
            {
                joined.expect("a task panicked");
            }
            self.ingest.take();
            self.store.take();
            let finished = self.finished.take().expect("not shut down yet");
            tokio::time::timeout(DEADLINE, finished)
                .await
                .expect("the store writer stops")
                .expect("the store writer finishes cleanly");
        }
    }

    /// The source one `[[sources]]` table describes, validated as `outpost check` does.
    pub fn source_config(toml_text: &str) -> SourceConfig {
        let value: toml::Value = toml::from_str(toml_text).expect("the source's TOML");
        let json = serde_json::to_value(value).expect("TOML as JSON");
        let mut problems = Problems::default();
        let config = SourceConfig::from_json(json, "sources[0]", &mut problems);
        if let Some(c) = &config {
            c.validate("sources[0]", &mut problems);
        }
        assert!(problems.0.is_empty(), "config problems: {:?}", problems.0);
        config.expect("a source configuration")
    }
}
