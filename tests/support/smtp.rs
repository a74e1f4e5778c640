//! `SmtpServer`: aiosmtpd (Debian's python3-aiosmtpd under /usr/bin/python3)
//! running `smtp_server.py`, storing every message in a directory.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::util::{
    free_port, log_stdio, port_open, read_log, temp_dir, wait_until, ChildGuard, TlsFiles, HOST,
    PORT_RETRIES, START_TIMEOUT,
};
use super::TestCa;

/// Debian's interpreter (has python3-aiosmtpd); not the pyenv `python3` on PATH.
pub const PYTHON: &str = "/usr/bin/python3";
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/smtp_server.py");

/// Options of an [`SmtpServer`]; `SmtpOptions::default()` is plain SMTP
/// without AUTH or TLS.
#[derive(Debug, Clone, Default)]
pub struct SmtpOptions {
    credentials: Option<(String, String)>,
    auth_require_tls: bool,
    auth_optional: bool,
    tls: Option<TlsFiles>,
    require_starttls: bool,
    implicit_tls: bool,
}

impl SmtpOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// AUTH PLAIN/LOGIN with this user/password; mail without AUTH is then
    /// refused (530) unless `.auth_optional()`.
    pub fn auth(mut self, user: &str, password: &str) -> Self {
        self.credentials = Some((user.to_string(), password.to_string()));
        self
    }

    /// Only advertise/accept AUTH after STARTTLS (aiosmtpd's
    /// `auth_require_tls`); default false.
    pub fn auth_require_tls(mut self, yes: bool) -> Self {
        self.auth_require_tls = yes;
        self
    }

    /// Advertise AUTH but also accept unauthenticated mail.
    pub fn auth_optional(mut self) -> Self {
        self.auth_optional = true;
        self
    }

    /// Offer STARTTLS with the server certificate of `ca`.
    pub fn starttls(mut self, ca: &TestCa) -> Self {
        self.tls = Some(TlsFiles::from_ca(ca));
        self.implicit_tls = false;
        self
    }

    /// With `.starttls(..)`: refuse commands other than EHLO/STARTTLS before TLS.
    pub fn require_starttls(mut self) -> Self {
        self.require_starttls = true;
        self
    }

    /// Implicit TLS (SMTPS, TLS from the first byte) with the certificate of `ca`.
    pub fn implicit_tls(mut self, ca: &TestCa) -> Self {
        self.tls = Some(TlsFiles::from_ca(ca));
        self.implicit_tls = true;
        self
    }
}

/// One message the server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMail {
    /// Envelope sender (MAIL FROM).
    pub from: String,
    /// Envelope recipients (RCPT TO).
    pub to: Vec<String>,
    /// Raw message (headers + body, CRLF line ends) as received in DATA.
    pub data: Vec<u8>,
    /// Login name if the session authenticated.
    pub auth_user: Option<String>,
}

impl ReceivedMail {
    pub fn data_str(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// A running test SMTP server; killed and its directory removed on drop.
pub struct SmtpServer {
    dir: tempfile::TempDir,
    maildir: PathBuf,
    log: PathBuf,
    port: u16,
    opts: SmtpOptions,
    child: ChildGuard,
}

impl SmtpServer {
    pub fn start(opts: SmtpOptions) -> Self {
        assert!(
            Path::new(PYTHON).exists(),
            "{PYTHON} not found: run scripts/install-test-deps"
        );
        let dir = temp_dir("smtp");
        let maildir = dir.path().join("mail");
        fs::create_dir(&maildir).expect("create maildir");
        let mut s = SmtpServer {
            log: dir.path().join("smtp.log"),
            maildir,
            dir,
            port: 0,
            opts,
            child: ChildGuard::default(),
        };
        for attempt in 1..=PORT_RETRIES {
            s.port = free_port();
            match s.spawn() {
                Ok(()) => return s,
                Err(e) if e.contains("in use") && attempt < PORT_RETRIES => continue,
                Err(e) => panic!("SMTP server failed to start: {e}"),
            }
        }
        unreachable!()
    }

    pub fn host(&self) -> &'static str {
        HOST
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// (user, password) if started with `.auth(..)`.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.opts
            .credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// Directory with the NNNNN.eml / NNNNN.json files.
    pub fn maildir(&self) -> &Path {
        &self.maildir
    }

    /// All messages received so far, in arrival order.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        let mut metas: Vec<PathBuf> = fs::read_dir(&self.maildir)
            .expect("read maildir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        metas.sort();
        metas
            .iter()
            .map(|p| {
                let meta: serde_json::Value =
                    serde_json::from_slice(&fs::read(p).expect("read mail meta"))
                        .expect("parse mail meta");
                let eml = self.maildir.join(meta["eml"].as_str().expect("eml name"));
                ReceivedMail {
                    from: meta["from"].as_str().unwrap_or_default().to_string(),
                    to: meta["to"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                    data: fs::read(&eml).expect("read .eml"),
                    auth_user: meta["auth_user"].as_str().map(str::to_string),
                }
            })
            .collect()
    }

    /// Blocks until at least `n` messages arrived and returns them all;
    /// panics (with the server log) after `timeout`.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let deadline = Instant::now() + timeout;
        loop {
            let msgs = self.messages();
            if msgs.len() >= n {
                return msgs;
            }
            if Instant::now() >= deadline {
                panic!(
                    "SMTP server: expected {n} messages within {timeout:?}, got {}\nlog:\n{}",
                    msgs.len(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Async variant of [`wait_for_messages`](Self::wait_for_messages) for
    /// `#[tokio::test]` (does not block the runtime).
    pub async fn wait_for_messages_async(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let deadline = Instant::now() + timeout;
        loop {
            let msgs = self.messages();
            if msgs.len() >= n {
                return msgs;
            }
            if Instant::now() >= deadline {
                panic!(
                    "SMTP server: expected {n} messages within {timeout:?}, got {}\nlog:\n{}",
                    msgs.len(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server (the port is closed); received messages are kept.
    pub fn stop(&mut self) {
        self.child.terminate(Duration::from_secs(5));
        wait_until(Duration::from_secs(5), || !port_open(self.port));
    }

    /// Starts the server again on the same port after `stop()`.
    pub fn start_again(&mut self) {
        assert!(!self.child.is_running(), "SMTP server is already running");
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
        panic!(
            "SMTP server failed to start again on port {}: {last}",
            self.port
        );
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let o = &self.opts;
        let mut cmd = Command::new(PYTHON);
        cmd.arg(SCRIPT)
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--maildir")
            .arg(&self.maildir);
        if let Some((u, p)) = &o.credentials {
            cmd.args(["--user", u, "--password", p]);
            if o.auth_require_tls {
                cmd.arg("--auth-require-tls");
            }
            if o.auth_optional {
                cmd.arg("--auth-optional");
            }
        }
        if let Some(tls) = &o.tls {
            cmd.arg("--cert").arg(&tls.cert).arg("--key").arg(&tls.key);
            if o.implicit_tls {
                cmd.arg("--implicit-tls");
            } else if o.require_starttls {
                cmd.arg("--require-starttls");
            }
        }
        let (_, err) = log_stdio(&self.log);
        let mut child = cmd
            // stdin stays open while we live: the script exits on EOF, so it
            // dies with the test process even if Drop never runs.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .env("PYTHONUNBUFFERED", "1")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {PYTHON} {SCRIPT}: {e}"));
        let stdout = child.stdout.take().unwrap();
        self.child = ChildGuard::new(child);
        // Forward the script's stdout into the log and report the READY line.
        let (tx, rx) = std::sync::mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(mut f) = fs::OpenOptions::new().append(true).create(true).open(&log) {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                if line.starts_with("READY") || line.starts_with("START FAILED") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line);
                    }
                }
            }
        });
        let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_default();
        if line.starts_with("READY") && port_open(self.port) {
            return Ok(());
        }
        self.child.kill();
        Err(format!(
            "aiosmtpd on port {}: {}\nlog {}:\n{}",
            self.port,
            if line.is_empty() {
                "no READY line"
            } else {
                &line
            },
            self.log.display(),
            self.log()
        ))
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.child.kill();
    }
}
