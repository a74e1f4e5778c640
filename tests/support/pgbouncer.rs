//! `PgBouncer`: transaction-pooling pgbouncer in front of a [`Postgres`].

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::postgres::{pg_bin, PgAuth, Postgres, PG_DATABASE, PG_PASSWORD, PG_USER};
use super::util::{
    free_port, give_to_service_user, port_open, port_owned_by, read_log, service_command, stop_pid,
    temp_dir, wait_until, HOST, PORT_RETRIES, START_TIMEOUT,
};

pub const PGBOUNCER: &str = "/usr/sbin/pgbouncer";
/// Admin user for the `pgbouncer` console database.
pub const ADMIN_USER: &str = "pgb_admin";
pub const ADMIN_PASSWORD: &str = "pgb-admin-pass";

#[derive(Debug, Clone)]
pub struct PgBouncerBuilder {
    pg_port: u16,
    auth: PgAuth,
    default_pool_size: u32,
    max_client_conn: u32,
    nofile: Option<u32>,
}

impl PgBouncerBuilder {
    /// `default_pool_size` (server connections per user/db pair), default 2.
    pub fn default_pool_size(mut self, n: u32) -> Self {
        self.default_pool_size = n;
        self
    }

    /// `max_client_conn`, default 100.
    pub fn max_client_conn(mut self, n: u32) -> Self {
        self.max_client_conn = n;
        self
    }

    /// Runs pgbouncer with this soft file descriptor limit (`ulimit -n`, at most the
    /// hard limit); default: what it inherits (1024 after `runuser` as root), which
    /// caps the clients at about 1000.
    pub fn nofile(mut self, n: u32) -> Self {
        self.nofile = Some(n);
        self
    }

    /// Client-facing `auth_type` (md5 or scram-sha-256); default: the backend's.
    pub fn auth(mut self, auth: PgAuth) -> Self {
        self.auth = auth;
        self
    }

    pub fn start(self) -> PgBouncer {
        assert!(
            Path::new(PGBOUNCER).exists(),
            "{PGBOUNCER} not found: run scripts/install-test-deps"
        );
        let dir = temp_dir("pgbouncer");
        let root = dir.path().to_path_buf();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let userlist = root.join("userlist.txt");
        // Plain-text secrets work for md5 and scram-sha-256, towards the
        // clients and towards the server.
        fs::write(
            &userlist,
            format!("\"{PG_USER}\" \"{PG_PASSWORD}\"\n\"{ADMIN_USER}\" \"{ADMIN_PASSWORD}\"\n"),
        )
        .unwrap();
        fs::set_permissions(&userlist, fs::Permissions::from_mode(0o600)).unwrap();
        let mut b = PgBouncer {
            conf: root.join("pgbouncer.ini"),
            pidfile: root.join("pgbouncer.pid"),
            log: root.join("pgbouncer.log"),
            userlist,
            dir,
            port: 0,
            running: false,
            opts: self,
        };
        for attempt in 1..=PORT_RETRIES {
            b.port = free_port();
            b.write_config();
            give_to_service_user(b.dir.path());
            match b.spawn() {
                Ok(()) => return b,
                Err(e) if e.contains("in use") && attempt < PORT_RETRIES => continue,
                Err(e) => panic!("pgbouncer failed to start: {e}"),
            }
        }
        unreachable!()
    }
}

/// A daemonized pgbouncer (`-d`, pidfile); stopped and removed on drop.
pub struct PgBouncer {
    dir: tempfile::TempDir,
    conf: PathBuf,
    pidfile: PathBuf,
    log: PathBuf,
    userlist: PathBuf,
    port: u16,
    running: bool,
    opts: PgBouncerBuilder,
}

impl PgBouncer {
    /// Transaction pooling, pool size 2, auth like the backend.
    pub fn start(pg: &Postgres) -> Self {
        Self::builder(pg).start()
    }

    pub fn builder(pg: &Postgres) -> PgBouncerBuilder {
        PgBouncerBuilder {
            pg_port: pg.port(),
            auth: pg.auth(),
            default_pool_size: 2,
            max_client_conn: 100,
            nofile: None,
        }
    }

    pub fn host(&self) -> &'static str {
        HOST
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://outpost:outpost-pass@127.0.0.1:PORT/outpost`
    pub fn url(&self) -> String {
        format!(
            "postgres://{PG_USER}:{PG_PASSWORD}@{HOST}:{}/{PG_DATABASE}",
            self.port
        )
    }

    pub fn default_pool_size(&self) -> u32 {
        self.opts.default_pool_size
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Runs an admin console command (`SHOW POOLS`, `SHOW CONFIG`, `PAUSE`, ...)
    /// on the `pgbouncer` database; returns psql's unaligned output *with* a
    /// header line, columns separated by `|`, no footer. Panics on failure.
    pub fn admin_psql(&self, cmd: &str) -> String {
        let out = Command::new(pg_bin("psql"))
            .args(["-X", "-A", "-q", "-P", "footer=off"])
            .args(["-h", HOST, "-p", &self.port.to_string()])
            .args(["-U", ADMIN_USER, "-d", "pgbouncer", "-c", cmd])
            .env("PGPASSWORD", ADMIN_PASSWORD)
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "pgbouncer admin command {cmd:?} failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_string()
    }

    /// [`admin_psql`](Self::admin_psql) parsed into one map (column -> value) per row.
    pub fn admin_rows(&self, cmd: &str) -> Vec<HashMap<String, String>> {
        let text = self.admin_psql(cmd);
        let mut lines = text.lines();
        let header: Vec<&str> = match lines.next() {
            Some(h) => h.split('|').collect(),
            None => return Vec::new(),
        };
        lines
            .map(|l| {
                header
                    .iter()
                    .map(|h| h.to_string())
                    .zip(l.split('|').map(str::to_string))
                    .collect()
            })
            .collect()
    }

    /// Stops pgbouncer (SIGTERM = immediate shutdown); the port is closed.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        if let Some(pid) = self.pid() {
            stop_pid(pid, libc::SIGTERM, Duration::from_secs(5));
        }
        wait_until(Duration::from_secs(5), || !port_open(self.port));
        let _ = fs::remove_file(&self.pidfile);
        self.running = false;
    }

    /// Starts pgbouncer again on the same port after `stop()`.
    pub fn start_again(&mut self) {
        assert!(!self.running, "pgbouncer is already running");
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
            "pgbouncer failed to start again on port {}: {last}",
            self.port
        );
    }

    /// `stop()` + `start_again()` on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn pid(&self) -> Option<i32> {
        fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    fn write_config(&self) {
        let o = &self.opts;
        let auth = match o.auth {
            PgAuth::Md5 => "md5",
            PgAuth::Scram => "scram-sha-256",
        };
        let d = self.dir.path().display();
        let mut c = String::new();
        writeln!(
            c,
            "[databases]\n{PG_DATABASE} = host={HOST} port={} dbname={PG_DATABASE}\n",
            o.pg_port
        )
        .unwrap();
        writeln!(
            c,
            "[pgbouncer]\n\
             listen_addr = {HOST}\n\
             listen_port = {port}\n\
             unix_socket_dir = {d}\n\
             auth_type = {auth}\n\
             auth_file = {userlist}\n\
             admin_users = {ADMIN_USER}\n\
             stats_users = {ADMIN_USER}\n\
             pool_mode = transaction\n\
             default_pool_size = {pool}\n\
             max_client_conn = {maxc}\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             pidfile = {pidfile}\n\
             logfile = {logfile}\n\
             server_login_retry = 1\n\
             server_connect_timeout = 5",
            port = self.port,
            userlist = self.userlist.display(),
            pool = o.default_pool_size,
            maxc = o.max_client_conn,
            pidfile = self.pidfile.display(),
            logfile = self.log.display(),
        )
        .unwrap();
        fs::write(&self.conf, c).expect("write pgbouncer.ini");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log_start = fs::metadata(&self.log)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        let new_log = |me: &Self| {
            fs::read(&me.log)
                .map(|b| b.get(log_start..).unwrap_or_default().to_vec())
                .unwrap_or_default()
        };
        let mut command = match self.opts.nofile {
            Some(n) => {
                let mut c = service_command("/bin/sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec {PGBOUNCER} -d \"$0\""))
                    .arg(&self.conf);
                c
            }
            None => {
                let mut c = service_command(PGBOUNCER);
                c.arg("-d").arg(&self.conf);
                c
            }
        };
        let out = command
            .stdin(Stdio::null())
            .output()
            .expect("run pgbouncer");
        let stderr = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let fail = |me: &Self, why: &str| {
            Err(format!(
                "pgbouncer {why} (port {}): {stderr}\nlog {}:\n{}",
                me.port,
                me.log.display(),
                me.log()
            ))
        };
        if !out.status.success() {
            return fail(self, "exited with an error");
        }
        let mut exited = false;
        let ready = wait_until(START_TIMEOUT, || match self.pid() {
            Some(pid) if !super::util::pid_alive(pid) => {
                exited = true;
                true
            }
            // pgbouncer does not exit when it cannot bind the TCP port; it
            // logs "cannot listen on ...: Address already in use" and keeps
            // serving the unix socket.
            _ if {
                let log = String::from_utf8_lossy(&new_log(self)).into_owned();
                log.contains("FATAL") || log.contains("cannot listen on")
            } =>
            {
                exited = true;
                true
            }
            Some(pid) => port_owned_by(self.port, pid as u32),
            None => false,
        });
        if ready && !exited {
            self.running = true;
            return Ok(());
        }
        if let Some(pid) = self.pid() {
            stop_pid(pid, libc::SIGKILL, Duration::from_secs(5));
        }
        let _ = fs::remove_file(&self.pidfile);
        fail(
            self,
            if exited {
                "exited"
            } else {
                "not ready in time"
            },
        )
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}
