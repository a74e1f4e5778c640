//! `Mosquitto`: a private MQTT broker (/usr/sbin/mosquitto) on free ports.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::util::{
    free_port, is_root, log_stdio, port_open, port_owned_by, read_log, run, temp_dir, wait_until,
    ChildGuard, TlsFiles, HOST, PORT_RETRIES, START_TIMEOUT,
};
use super::TestCa;

pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// The most lines [`Mosquitto::publish_lines`] gives one `mosquitto_pub -l`.
pub const PUBLISH_LINES_CHUNK: usize = 50_000;

#[derive(Default, Clone)]
pub struct MosquittoBuilder {
    credentials: Option<(String, String)>,
    tls: Option<TlsFiles>,
    require_client_cert: bool,
    max_queued_messages: Option<u64>,
    max_inflight_messages: Option<u64>,
    persistence: bool,
    sys_interval: Option<u32>,
}

impl MosquittoBuilder {
    /// Require username/password (password file via `mosquitto_passwd`);
    /// anonymous clients are then refused on every listener.
    pub fn password(mut self, user: &str, password: &str) -> Self {
        self.credentials = Some((user.to_string(), password.to_string()));
        self
    }

    /// Add a TLS listener (second port) with the server certificate of `ca`.
    pub fn tls(mut self, ca: &TestCa) -> Self {
        self.tls = Some(TlsFiles::from_ca(ca));
        self
    }

    /// On the TLS listener, require a client certificate signed by the CA.
    pub fn require_client_cert(mut self) -> Self {
        self.require_client_cert = true;
        self
    }

    /// Publish the broker's `$SYS` statistics (e.g. dropped messages) every `secs`.
    pub fn sys_interval(mut self, secs: u32) -> Self {
        self.sys_interval = Some(secs);
        self
    }

    /// QoS 1/2 messages the broker sends a client before it waits for their
    /// acknowledgements (mosquitto's default is 20; 0 means no limit). Note: mosquitto
    /// 2.0.11 honours it only for a live session; after a persistent session
    /// reconnects with a backlog, each PUBACK releases up to a whole window.
    pub fn max_inflight_messages(mut self, n: u64) -> Self {
        self.max_inflight_messages = Some(n);
        self
    }

    /// QoS 1/2 messages the broker queues per client beyond those in flight, also for a
    /// disconnected client with a persistent session (mosquitto's default is 1000; the
    /// excess is dropped silently). 0 means no limit.
    pub fn max_queued_messages(mut self, n: u64) -> Self {
        self.max_queued_messages = Some(n);
        self
    }

    /// Keep sessions, subscriptions and queued QoS 1 messages across `stop()` /
    /// `start_again()` (saved in the broker's directory at shutdown), as a production
    /// broker does; up to 100,000 queued messages per offline client unless
    /// `max_queued_messages` says otherwise (mosquitto's default of 1,000 drops the
    /// rest of a long outage).
    pub fn persistence(mut self) -> Self {
        self.persistence = true;
        self
    }

    pub fn start(self) -> Mosquitto {
        let dir = temp_dir("mosquitto");
        let mut m = Mosquitto {
            conf: dir.path().join("mosquitto.conf"),
            log: dir.path().join("mosquitto.log"),
            passwd: dir.path().join("passwd"),
            dir,
            port: 0,
            tls_port: None,
            opts: self,
            child: ChildGuard::default(),
        };
        if let Some((user, pass)) = &m.opts.credentials {
            run(
                Command::new("mosquitto_passwd")
                    .args(["-b", "-c"])
                    .arg(&m.passwd)
                    .args([user, pass]),
                "mosquitto_passwd",
            );
        }
        for attempt in 1..=PORT_RETRIES {
            m.port = free_port();
            m.tls_port = m.opts.tls.as_ref().map(|_| free_port());
            m.write_config();
            match m.spawn() {
                Ok(()) => return m,
                Err(e) if e.contains("in use") && attempt < PORT_RETRIES => continue,
                Err(e) => panic!("mosquitto failed to start: {e}"),
            }
        }
        unreachable!()
    }
}

/// A running mosquitto broker; killed and its directory removed on drop.
pub struct Mosquitto {
    dir: tempfile::TempDir,
    conf: PathBuf,
    log: PathBuf,
    passwd: PathBuf,
    port: u16,
    tls_port: Option<u16>,
    opts: MosquittoBuilder,
    child: ChildGuard,
}

impl Mosquitto {
    /// Anonymous plain listener on a free port.
    pub fn start() -> Self {
        Self::builder().start()
    }

    pub fn builder() -> MosquittoBuilder {
        MosquittoBuilder::default()
    }

    pub fn host(&self) -> &'static str {
        HOST
    }

    /// Plain MQTT port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// TLS port; panics if the broker was built without `.tls(..)`.
    pub fn tls_port(&self) -> u16 {
        self.tls_port
            .expect("Mosquitto was started without .tls(&ca)")
    }

    /// (user, password) if built with `.password(..)`.
    pub fn credentials(&self) -> Option<(&str, &str)> {
        self.opts
            .credentials
            .as_ref()
            .map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// CA file clients should trust for the TLS port.
    pub fn ca_file(&self) -> Option<&Path> {
        self.opts.tls.as_ref().map(|t| t.ca.as_path())
    }

    /// `mqtt://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("mqtt://{HOST}:{}", self.port)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_running()
    }

    /// Stops the broker (SIGTERM, then SIGKILL); its ports become unreachable.
    pub fn stop(&mut self) {
        self.child.terminate(Duration::from_secs(5));
        wait_until(Duration::from_secs(5), || !port_open(self.port));
    }

    /// Starts the broker again on the same port(s) after `stop()`.
    pub fn start_again(&mut self) {
        assert!(!self.child.is_running(), "mosquitto is already running");
        // The port may briefly be unavailable after a stop; retry a few times.
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
            "mosquitto failed to start again on port {}: {last}",
            self.port
        );
    }

    /// `stop()` + `start_again()` (in-memory state such as retained messages is lost).
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Publishes each line of `lines` as one message on `topic` with `mosquitto_pub -l`
    /// (about 20,000 messages/s at QoS 1); panics if it fails. At most
    /// [`PUBLISH_LINES_CHUNK`] lines go to one `mosquitto_pub`: mosquitto_pub 2.0.11
    /// given 200,000 lines at QoS 1 exits 0 after the broker received only 68,945 of
    /// them (probably message-id wrap-around), while 66,000 arrive complete.
    pub fn publish_lines(&self, topic: &str, qos: u8, lines: impl IntoIterator<Item = String>) {
        let mut lines = lines.into_iter().peekable();
        while lines.peek().is_some() {
            self.publish_chunk(topic, qos, lines.by_ref().take(PUBLISH_LINES_CHUNK));
        }
    }

    fn publish_chunk(&self, topic: &str, qos: u8, lines: impl Iterator<Item = String>) {
        use std::io::Write;
        let mut cmd = Command::new("mosquitto_pub");
        cmd.args(["-h", HOST, "-p", &self.port.to_string(), "-t", topic])
            .args(["-q", &qos.to_string(), "-l"]);
        if let Some((user, pass)) = self.credentials() {
            cmd.args(["-u", user, "-P", pass]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("run mosquitto_pub");
        {
            let mut stdin = std::io::BufWriter::new(child.stdin.take().expect("stdin"));
            for line in lines {
                assert!(!line.contains('\n'), "one message per line");
                writeln!(stdin, "{line}").expect("write to mosquitto_pub");
            }
        }
        let status = child.wait().expect("wait for mosquitto_pub");
        assert!(status.success(), "mosquitto_pub -l failed for {topic}");
    }

    /// Lines of the broker's log that say it dropped a client for silence
    /// (`Client … has exceeded timeout, disconnecting.`).
    pub fn timeouts(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("exceeded timeout"))
            .map(str::to_string)
            .collect()
    }

    fn write_config(&self) {
        let mut c = String::new();
        // Running as root, mosquitto drops privileges to user "mosquitto",
        // which cannot read our private temp dir; `user root` keeps root.
        if is_root() {
            c.push_str("user root\n");
        }
        c.push_str("per_listener_settings false\n");
        if self.opts.persistence {
            writeln!(
                c,
                "persistence true\npersistence_location {}/\nautosave_interval 1",
                self.dir.path().display()
            )
            .unwrap();
        } else {
            c.push_str("persistence false\n");
        }
        let queued = (self.opts.max_queued_messages).or(self.opts.persistence.then_some(100_000));
        if let Some(n) = queued {
            writeln!(c, "max_queued_messages {n}").unwrap();
        }
        if let Some(n) = self.opts.max_inflight_messages {
            writeln!(c, "max_inflight_messages {n}").unwrap();
        }
        if let Some(secs) = self.opts.sys_interval {
            writeln!(c, "sys_interval {secs}").unwrap();
        }
        c.push_str("log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\nconnection_messages true\n");
        match &self.opts.credentials {
            Some(_) => {
                writeln!(
                    c,
                    "allow_anonymous false\npassword_file {}",
                    self.passwd.display()
                )
                .unwrap();
            }
            None => c.push_str("allow_anonymous true\n"),
        }
        writeln!(c, "\nlistener {} {HOST}", self.port).unwrap();
        if let (Some(tls), Some(port)) = (&self.opts.tls, self.tls_port) {
            writeln!(c, "\nlistener {port} {HOST}").unwrap();
            writeln!(c, "cafile {}", tls.ca.display()).unwrap();
            writeln!(c, "certfile {}", tls.cert.display()).unwrap();
            writeln!(c, "keyfile {}", tls.key.display()).unwrap();
            if self.opts.require_client_cert {
                c.push_str("require_certificate true\n");
            }
        }
        fs::write(&self.conf, c).expect("write mosquitto.conf");
    }

    /// Spawns the broker and waits for its ports; Err(log) when it exits.
    fn spawn(&mut self) -> Result<(), String> {
        let (out, err) = log_stdio(&self.log);
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {MOSQUITTO}: {e}"));
        self.child = ChildGuard::new(child);
        let ports: Vec<u16> = std::iter::once(self.port).chain(self.tls_port).collect();
        let mut exited = false;
        let ready = wait_until(START_TIMEOUT, || {
            if !self.child.is_running() {
                exited = true;
                return true;
            }
            let pid = self.child.id().unwrap_or(0);
            ports.iter().all(|p| port_owned_by(*p, pid))
        });
        if ready && !exited {
            return Ok(());
        }
        self.child.kill();
        let why = if exited {
            "exited"
        } else {
            "not ready in time"
        };
        Err(format!(
            "mosquitto {why} (ports {ports:?}); log {}:\n{}",
            self.log.display(),
            self.log()
        ))
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.child.kill();
    }
}
