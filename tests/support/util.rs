//! Small helpers shared by the peers: free ports, readiness polling,
//! running commands as the `postgres` service user when we are root, and
//! a child-process guard that never leaves processes behind.

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Loopback address every peer listens on.
pub const HOST: &str = "127.0.0.1";

/// Default deadline for a peer to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times a start is retried with fresh ports after a port collision.
pub const PORT_RETRIES: usize = 5;

/// The unprivileged user that postgres/pgbouncer run as when we are root.
pub const SERVICE_USER: &str = "postgres";

/// A port that was free a moment ago (bind `127.0.0.1:0`, read it, drop it).
/// Callers must be prepared for a collision and retry with a new port.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Whether process `pid` itself holds a listening TCP socket on
/// `127.0.0.1:port` (per /proc/net/tcp and /proc/PID/fd). Unlike
/// [`port_open`] this cannot be fooled by another process that happens to
/// listen on the same port (a collision after [`free_port`]).
pub fn port_owned_by(port: u16, pid: u32) -> bool {
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|e| e.ok())
        .filter_map(|e| fs::read_link(e.path()).ok())
        .any(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
}

/// Polls `cond` every 20 ms until it is true (returns true) or `timeout`
/// passes (returns false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` every 100 ms without blocking the runtime until it holds; panics after
/// `timeout`, naming `what`.
pub async fn wait_until_async(what: &str, timeout: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A `Command` for `program`, run as [`SERVICE_USER`] via `runuser` when we
/// are root (postgres and pgbouncer refuse to run as root), directly otherwise.
pub fn service_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", SERVICE_USER, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Gives `path` (recursively) to [`SERVICE_USER`] when we are root; a no-op
/// otherwise. Also makes `path` itself traversable.
pub fn give_to_service_user(path: &Path) {
    if is_root() {
        run(
            Command::new("chown")
                .arg("-R")
                .arg(format!("{SERVICE_USER}:{SERVICE_USER}"))
                .arg(path),
            "chown to the service user",
        );
    }
}

/// Runs `cmd` to completion, panicking with its output when it fails.
pub fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what}: {cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// The last 16 KiB of a log file (or a note that it cannot be read).
pub fn read_log(path: &Path) -> String {
    match fs::File::open(path) {
        Ok(mut f) => {
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            let start = buf.len().saturating_sub(16 * 1024);
            String::from_utf8_lossy(&buf[start..]).into_owned()
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// A fresh private temporary directory for one peer instance.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("outpost-{prefix}-"))
        .tempdir()
        .expect("create temp dir")
}

/// Like [`temp_dir`] but on a RAM-backed file system (`/dev/shm`) when one
/// is usable, for data-heavy peers (PostgreSQL copies ~25 MB per instance,
/// which takes ~6x longer on this machine's disk). `OUTPOST_TEST_TMPDIR`
/// overrides the location.
pub fn fast_temp_dir(prefix: &str) -> tempfile::TempDir {
    let base = std::env::var_os("OUTPOST_TEST_TMPDIR")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let shm = Path::new("/dev/shm");
            let usable = fs::metadata(shm).is_ok_and(|m| m.is_dir())
                // SAFETY: access(2) on a NUL-terminated literal path.
                && unsafe { libc::access(c"/dev/shm".as_ptr(), libc::W_OK | libc::X_OK) } == 0;
            usable.then(|| shm.to_path_buf())
        });
    match base {
        Some(base) => tempfile::Builder::new()
            .prefix(&format!("outpost-{prefix}-"))
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("create temp dir in {}: {e}", base.display())),
        None => temp_dir(prefix),
    }
}

/// Opens (creates / appends) a log file for a child's stdout/stderr.
pub fn log_stdio(path: &Path) -> (Stdio, Stdio) {
    let f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()));
    let f2 = f.try_clone().expect("clone log file handle");
    (Stdio::from(f), Stdio::from(f2))
}

/// Owns a child process; kills and reaps it on drop (also on panic paths).
#[derive(Debug, Default)]
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        ChildGuard(Some(child))
    }

    pub fn id(&self) -> Option<u32> {
        self.0.as_ref().map(|c| c.id())
    }

    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.0.as_mut()
    }

    /// Whether the child is still running (false once it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.0.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends SIGTERM, waits up to `grace` for the exit, then SIGKILLs.
    pub fn terminate(&mut self, grace: Duration) {
        if let Some(mut c) = self.0.take() {
            if let Ok(None) = c.try_wait() {
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe {
                    libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
                }
                let gone = wait_until(grace, || !matches!(c.try_wait(), Ok(None)));
                if !gone {
                    let _ = c.kill();
                }
            }
            let _ = c.wait();
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether process `pid` (not necessarily our child) still runs. A zombie
/// (exited, not yet reaped by init, which can take a while here) counts as gone.
pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence/permission.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Format: "pid (comm) S ..."; comm may contain spaces/parens.
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().chars().next()),
            Some(Some('Z' | 'X'))
        ),
        Err(_) => false,
    }
}

/// Sends `sig` to `pid`, waits up to `grace` for it to disappear, then
/// SIGKILLs it. For daemonized processes that are not our children.
pub fn stop_pid(pid: i32, sig: i32, grace: Duration) {
    if pid <= 0 {
        return;
    }
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(pid, sig);
    }
    if !wait_until(grace, || !pid_alive(pid)) {
        // SAFETY: plain kill(2).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        wait_until(Duration::from_secs(5), || !pid_alive(pid));
    }
}

/// Files of a TLS server identity (PEM paths), usually from a `TestCa`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl TlsFiles {
    pub fn from_ca(ca: &super::TestCa) -> Self {
        TlsFiles {
            ca: ca.ca_pem().to_path_buf(),
            cert: ca.server_cert().to_path_buf(),
            key: ca.server_key().to_path_buf(),
        }
    }
}
