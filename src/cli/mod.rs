//! The command line: one module per subcommand. Each parses its arguments, loads what
//! it needs through the helpers here (one runtime builder, one load-the-configuration-
//! or-exit, one database lookup) and calls the library. Signal handling lives here
//! ([`run`]), not in components.

pub mod ack;
pub mod audit;
pub mod central;
pub mod check;
pub mod demo;
pub mod notify_test;
pub mod passwd;
pub mod readings;
pub mod rejected;
pub mod report;
pub mod run;
pub mod status;
pub mod verify;

use crate::config::{self, Config};
use clap::{Parser, Subcommand};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code for a configuration that was rejected ([`crate::exit::CONFIG`]).
pub const EXIT_CONFIG: u8 = crate::exit::CONFIG;

#[derive(Parser, Debug)]
#[command(
    name = "outpost",
    version,
    about = "Store-and-forward edge agent: LoRaWAN and serial sensors, local alerts, sync to PostgreSQL.",
    long_about = "Outpost reads sensors on a site gateway, keeps every reading in SQLite before \
                  acknowledging it, evaluates alerts locally and syncs to a central PostgreSQL.\n\n\
                  Start with `outpost demo` (no configuration needed), then edit \
                  /etc/outpost/outpost.toml and run `outpost check`."
)]
pub struct Cli {
    /// The configuration file (drop-ins are read from conf.d/ beside it).
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "OUTPOST_CONFIG",
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent (what the systemd service does).
    Run,
    /// Validate the configuration and print it with secrets redacted (exit 2 if invalid).
    Check,
    /// Summarise the local database: last reading per device, backlog, problems.
    Status(status::Args),
    /// Acknowledge a firing alarm (stops its reminders and escalation; exit 1 if no
    /// such alarm is firing, 2 for bad arguments).
    Ack(ack::Args),
    /// The audit log (oldest first): configuration loads and reloads, version changes,
    /// acknowledgements, console logins, clock steps, pruning, commands that wrote.
    Audit(audit::Args),
    /// Check the local hash chain and signed heads (exit 0 intact, 1 at the first damage).
    Verify(verify::Args),
    /// Send a test notification through one configured notifier and print the outcome
    /// (exit 1 if it was not delivered).
    NotifyTest {
        /// The notifier's `name` in [[notifiers]].
        name: String,
    },
    /// Print the Argon2id hash of a web console password as `[[http.users]]` lines to
    /// paste into the configuration (asks twice without echo, or `--stdin`).
    Passwd(passwd::Args),
    /// Query local history (newest first).
    Readings(readings::Args),
    /// List the rejected input the agent kept (newest first): payload excerpt, topic,
    /// reason, what was wrong and what to do. `outpost status` shows the counts.
    Rejected(rejected::Args),
    /// The daily summary (HACCP log) of one local day in `agent.timezone`: per device
    /// and metric min, max, mean, readings, gaps, time out of range, excursions, alarms.
    Report(report::Args),
    /// Run simulated sensors into a local database and print readings as they commit.
    Demo(demo::Args),
    /// The central PostgreSQL schema: print it, apply it, maintain its partitions.
    Central {
        #[command(subcommand)]
        command: crate::sync::central::CentralCommand,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config_path = cli.config.as_deref();
    match cli.command {
        Command::Check => check::main(&config::resolve_path(config_path)),
        Command::Run => run::main(&config::resolve_path(config_path)),
        Command::Status(args) => status::main(config_path, args),
        Command::Ack(args) => ack::main(config_path, args),
        Command::Audit(args) => audit::main(config_path, args),
        Command::Verify(args) => verify::main(config_path, args),
        Command::NotifyTest { name } => {
            notify_test::main(&config::resolve_path(config_path), &name)
        }
        Command::Passwd(args) => passwd::main(args),
        Command::Readings(args) => readings::main(config_path, args),
        Command::Rejected(args) => rejected::main(config_path, args),
        Command::Report(args) => report::main(config_path, args),
        Command::Central { command } => central::main(&config::resolve_path(config_path), command),
        Command::Demo(args) => demo::main(args),
    }
}

/// The configuration at `path`, or the exit code after every problem was printed with
/// `summary(count)` as the last line.
pub fn load_config_or_exit(path: &Path, summary: fn(usize) -> String) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        eprintln!("{}", summary(errors.0.len()));
        ExitCode::from(crate::exit::CONFIG)
    })
}

/// The runtime a subcommand needs: the agent's two workers, or one thread for a
/// single conversation with a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// Two worker threads (`run`, `demo`); SQLite work goes to the blocking pool.
    Agent,
    /// The calling thread only (`notify-test`, `central`).
    CurrentThread,
}

/// Builds the runtime (the only place one is built) and runs `work` to completion on
/// it. `Err` carries the exit code when the runtime cannot start.
pub fn block_on<F: Future>(runtime: Runtime, work: F) -> Result<F::Output, ExitCode> {
    let mut builder = match runtime {
        Runtime::Agent => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(2);
            b
        }
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread(),
    };
    match builder.enable_all().build() {
        Ok(rt) => Ok(rt.block_on(work)),
        Err(e) => {
            eprintln!("outpost: cannot start the async runtime: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// How values are shown: `[display]` of the configuration when it loads, else the
/// defaults (e.g. `--db` on another machine's database without its configuration).
fn display_config(config_path: Option<&Path>) -> crate::display::DisplayConfig {
    Config::load(&config::resolve_path(config_path))
        .map(|c| c.display)
        .unwrap_or_default()
}

/// The database to read: `--db`, else the configured one.
fn database_path(config_path: Option<&Path>, db: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    let db =
        match db {
            Some(db) => db,
            None => load_config_or_exit(&config::resolve_path(config_path), |_| {
                "outpost: cannot find the database without a valid configuration; use --db PATH."
                    .to_string()
            })?
            .storage
            .path,
        };
    if !db.exists() {
        eprintln!(
            "outpost: no database at {} (has the agent run yet?)",
            db.display()
        );
        return Err(ExitCode::FAILURE);
    }
    Ok(db)
}

/// Opens `db` read-only and runs `read` on it; the error names the file.
fn read_database<T>(
    db: &Path,
    read: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T>,
) -> Result<T, ExitCode> {
    crate::store::open_reader(db, std::time::Duration::from_secs(5))
        .and_then(|conn| read(&conn))
        .map_err(|e| {
            eprintln!("outpost: cannot read {}: {e}", db.display());
            ExitCode::FAILURE
        })
}

/// Logs to stderr; under systemd (JOURNAL_STREAM set) without timestamps, which the
/// journal adds itself, and without colours unless stderr is a terminal. `RUST_LOG` overrides the configured level.
pub fn init_tracing(level: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // A `Targets` filter ("info,outpost::sources=debug"), not `EnvFilter`: the same
    // syntax for levels per module without the regex engine behind span and field
    // filters (issue 15: binary size).
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| crate::config::log_filter(&v).ok())
        .or_else(|| crate::config::log_filter(level).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder
            .without_time()
            .with_ansi(false)
            .finish()
            .with(filter)
            .try_init()
    } else {
        // Colours only on a terminal: a log file or pipe gets plain text.
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .finish()
            .with(filter)
            .try_init()
    };
}
