//! `Postgres`: a private PostgreSQL 15 cluster on a free port.
//!
//! `initdb` runs once per test process into a template directory (removed at
//! process exit); every instance is a `cp -a` copy of it. As root, every
//! server command runs as the `postgres` user via `runuser`.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use super::util::{
    fast_temp_dir, free_port, give_to_service_user, port_open, read_log, run, service_command,
    stop_pid, wait_until, TlsFiles, HOST, PORT_RETRIES,
};
use super::TestCa;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Application role (LOGIN, owner of database `outpost`).
pub const PG_USER: &str = "outpost";
pub const PG_PASSWORD: &str = "outpost-pass";
pub const PG_DATABASE: &str = "outpost";

pub fn pg_bin(name: &str) -> PathBuf {
    Path::new(PG_BIN).join(name)
}

/// Password authentication method for TCP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PgAuth {
    /// `md5` in pg_hba.conf, password stored as an MD5 hash.
    Md5,
    /// `scram-sha-256` in pg_hba.conf (the PostgreSQL 15 default).
    #[default]
    Scram,
}

#[derive(Debug, Default, Clone)]
pub struct PostgresBuilder {
    auth: PgAuth,
    tls: Option<TlsFiles>,
    require_tls: bool,
}

impl PostgresBuilder {
    pub fn auth(mut self, auth: PgAuth) -> Self {
        self.auth = auth;
        self
    }

    /// `ssl = on` with the server certificate of `ca` (plain connections
    /// still allowed unless `.require_tls()`).
    pub fn tls(mut self, ca: &TestCa) -> Self {
        self.tls = Some(TlsFiles::from_ca(ca));
        self
    }

    /// Only `hostssl` lines in pg_hba.conf: non-TLS TCP connections are rejected.
    pub fn require_tls(mut self) -> Self {
        self.require_tls = true;
        self
    }

    pub fn start(self) -> Postgres {
        let template = template();
        let dir = fast_temp_dir("pg");
        let root = dir.path().to_path_buf();
        let data = root.join("data");
        run(
            Command::new("cp").arg("-a").arg(template).arg(&data),
            "copy postgres template",
        );
        let sock = root.join("sock");
        fs::create_dir(&sock).expect("create socket dir");

        let mut conf = String::from("\n# --- outpost test instance ---\n");
        if self.auth == PgAuth::Md5 {
            conf.push_str("password_encryption = md5\n");
        }
        if let Some(tls) = &self.tls {
            let cert = root.join("server.crt");
            let key = root.join("server.key");
            let ca = root.join("ca.crt");
            fs::copy(&tls.cert, &cert).expect("copy server cert");
            fs::copy(&tls.key, &key).expect("copy server key");
            fs::copy(&tls.ca, &ca).expect("copy CA cert");
            fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
            writeln!(
                conf,
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nssl_ca_file = '{}'",
                cert.display(),
                key.display(),
                ca.display()
            )
            .unwrap();
        }
        fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .expect("append postgresql.conf");

        let method = match self.auth {
            PgAuth::Md5 => "md5",
            PgAuth::Scram => "scram-sha-256",
        };
        let host = if self.require_tls { "hostssl" } else { "host" };
        let hba = format!(
            "local all all trust\n{host} all all 127.0.0.1/32 {method}\n{host} all all ::1/128 {method}\n"
        );
        fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        give_to_service_user(&root);

        let mut pg = Postgres {
            log: root.join("postgres.log"),
            data,
            sock,
            dir,
            port: 0,
            running: false,
            opts: self,
        };
        for attempt in 1..=PORT_RETRIES {
            pg.port = free_port();
            match pg.pg_ctl_start() {
                Ok(()) => break,
                Err(e) if e.contains("could not bind") && attempt < PORT_RETRIES => continue,
                Err(e) => panic!("postgres failed to start: {e}"),
            }
        }
        if pg.opts.auth == PgAuth::Md5 {
            // The template stored a SCRAM secret; re-store it as MD5.
            pg.psql_superuser(&format!("ALTER ROLE {PG_USER} PASSWORD '{PG_PASSWORD}'"));
        }
        pg
    }
}

/// A running PostgreSQL cluster; stopped (`-m immediate`) and removed on drop.
pub struct Postgres {
    dir: tempfile::TempDir,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    port: u16,
    running: bool,
    opts: PostgresBuilder,
}

impl Postgres {
    /// SCRAM password auth, no TLS.
    pub fn start() -> Self {
        Self::builder().start()
    }

    pub fn builder() -> PostgresBuilder {
        PostgresBuilder::default()
    }

    pub fn host(&self) -> &'static str {
        HOST
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn user(&self) -> &'static str {
        PG_USER
    }

    pub fn password(&self) -> &'static str {
        PG_PASSWORD
    }

    pub fn database(&self) -> &'static str {
        PG_DATABASE
    }

    pub fn auth(&self) -> PgAuth {
        self.opts.auth
    }

    /// `postgres://outpost:outpost-pass@127.0.0.1:PORT/outpost`
    pub fn url(&self) -> String {
        format!(
            "postgres://{PG_USER}:{PG_PASSWORD}@{HOST}:{}/{PG_DATABASE}",
            self.port
        )
    }

    /// Directory of the unix socket (superuser `postgres`, trust auth).
    pub fn socket_dir(&self) -> &Path {
        &self.sock
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Runs `sql` as the application role `outpost` on database `outpost`
    /// (unix socket, trust) with `psql -X -A -t -v ON_ERROR_STOP=1`; returns
    /// stdout with the trailing newline trimmed (tuples only, columns
    /// separated by `|`). Objects it creates belong to `outpost`, like the
    /// agent's own. Panics if psql fails.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql)
            .unwrap_or_else(|e| panic!("psql failed for {sql:?}: {e}"))
    }

    /// Like [`psql`](Self::psql) but returns Err(stderr) on failure.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        self.psql_as(PG_USER, sql)
    }

    /// Like [`psql`](Self::psql) but as superuser `postgres` (for
    /// `pg_authid`, `pg_terminate_backend`, ...).
    /// Runs `outpost central migrate` (the binary under test) against this instance
    /// over plain TCP as role `outpost`; panics with its output unless it succeeds.
    /// Returns how long it took and its first output line.
    pub fn outpost_central_migrate(&self) -> (std::time::Duration, String) {
        let started = std::time::Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["central", "migrate", "--sslmode", "disable", "--url"])
            .arg(format!(
                "postgres://{}@127.0.0.1:{}/{}",
                self.user(),
                self.port(),
                self.database()
            ))
            .env("PGPASSWORD", self.password())
            .env("OUTPOST_CONFIG", "/nonexistent/outpost.toml")
            .output()
            .expect("run outpost central migrate");
        let elapsed = started.elapsed();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "outpost central migrate failed: {text}"
        );
        (elapsed, text.lines().next().unwrap_or("").to_string())
    }

    pub fn psql_superuser(&self, sql: &str) -> String {
        self.psql_as("postgres", sql)
            .unwrap_or_else(|e| panic!("psql (superuser) failed for {sql:?}: {e}"))
    }

    fn psql_as(&self, user: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(pg_bin("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.sock)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", user, "-d", PG_DATABASE, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout)
                .trim_end_matches('\n')
                .to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Crash-stop the server (`pg_ctl stop -m immediate`); the port is closed.
    pub fn stop_immediate(&mut self) {
        if !self.running {
            return;
        }
        let out = service_command(pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdin(Stdio::null())
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            self.kill_postmaster();
        }
        self.running = false;
    }

    /// Starts the server again on the same port after `stop_immediate()`.
    pub fn start_again(&mut self) {
        assert!(!self.running, "postgres is already running");
        let mut last = String::new();
        for _ in 0..20 {
            match self.pg_ctl_start() {
                Ok(()) => return,
                Err(e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
        panic!(
            "postgres failed to start again on port {}: {last}",
            self.port
        );
    }

    /// `stop_immediate()` + `start_again()`.
    pub fn restart(&mut self) {
        self.stop_immediate();
        self.start_again();
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        read_log(&self.log)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses={HOST}",
            self.port,
            self.sock.display()
        );
        let out = service_command(pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .arg("-o")
            .arg(opts)
            .args(["-w", "-t", "30", "start"])
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl");
        if out.status.success() && port_open(self.port) {
            self.running = true;
            return Ok(());
        }
        // pg_ctl may have left a half-started postmaster behind.
        self.kill_postmaster();
        Err(format!(
            "pg_ctl start on port {} failed ({}): {}{}\nlog {}:\n{}",
            self.port,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log.display(),
            self.log()
        ))
    }

    fn kill_postmaster(&self) {
        let pid = fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = pid {
            stop_pid(pid, libc::SIGQUIT, Duration::from_secs(5));
        }
        wait_until(Duration::from_secs(5), || !port_open(self.port));
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop_immediate();
    }
}

static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn remove_template() {
    if let Some(dir) = TEMPLATE.get() {
        if let Some(parent) = dir.parent() {
            let _ = fs::remove_dir_all(parent);
        }
    }
}

/// The initdb'ed template data directory (created once per test process).
fn template() -> &'static Path {
    TEMPLATE.get_or_init(|| {
        let initdb = pg_bin("initdb");
        assert!(
            initdb.exists(),
            "{} not found: run scripts/install-test-deps",
            initdb.display()
        );
        let root = fast_temp_dir("pg-template").keep();
        // SAFETY: registering a plain extern "C" fn; it runs at exit().
        unsafe {
            libc::atexit(remove_template);
        }
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        give_to_service_user(&root);
        let data = root.join("data");
        run(
            service_command(&initdb).arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]),
            "initdb",
        );
        // Create the application role and database in single-user mode
        // (no server, no port needed).
        let mut child = service_command(pg_bin("postgres"))
            .args(["--single", "-F", "-D"])
            .arg(&data)
            .arg("postgres")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run postgres --single");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(
                format!(
                    "CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}';\n\
                     CREATE DATABASE {PG_DATABASE} OWNER {PG_USER};\n"
                )
                .as_bytes(),
            )
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !stdout.contains("ERROR"),
            "postgres --single failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Test instances trade durability for speed.
        let conf = "\n# --- outpost test template ---\n\
                    fsync = off\nfull_page_writes = off\n\
                    shared_buffers = 16MB\nmax_connections = 50\n\
                    log_min_messages = warning\nlog_connections = off\n";
        fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .expect("append template postgresql.conf");
        give_to_service_user(&root);
        data
    })
}
