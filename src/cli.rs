//! The command line. Each subcommand parses its arguments, loads what it needs and
//! calls the library; signal handling lives here, not in components.

use crate::config::{self, Config};
use crate::settings::HumanDuration;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Exit code for a configuration that was rejected.
pub const EXIT_CONFIG: u8 = 2;

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
    Status {
        /// Read this database instead of the configured one.
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send a test notification through one configured notifier and print the outcome
    /// (exit 1 if it was not delivered).
    NotifyTest {
        /// The notifier's `name` in [[notifiers]].
        name: String,
    },
    /// Query local history (newest first).
    Readings {
        /// Read this database instead of the configured one.
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Only this metric.
        #[arg(long)]
        metric: Option<String>,
        /// From this time: a duration ago ("2h") or RFC 3339 ("2026-11-26T08:00:00Z").
        #[arg(long)]
        since: Option<String>,
        /// Until this time (same forms as --since).
        #[arg(long)]
        until: Option<String>,
        /// At most this many readings.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Output format.
        #[arg(long, value_enum, default_value_t = crate::readings::Format::Table)]
        format: crate::readings::Format,
    },
    /// List the rejected input the agent kept (newest first): payload excerpt, topic,
    /// reason, what was wrong and what to do. `outpost status` shows the counts.
    Rejected {
        /// Read this database instead of the configured one.
        #[arg(long, value_name = "PATH")]
        db: Option<PathBuf>,
        /// Only this source (its `name` in [[sources]]).
        #[arg(long)]
        source: Option<String>,
        /// Only this reason, e.g. `protobuf` or `invalid_json` (docs/technician.md lists them).
        #[arg(long)]
        reason: Option<String>,
        /// At most this many messages (1 to 1000).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Output format.
        #[arg(long, value_enum, default_value_t = crate::rejected::Format::Table)]
        format: crate::rejected::Format,
    },
    /// Run simulated sensors into a local database and print readings as they commit.
    Demo {
        /// Where the demo database goes (default: a new directory under /tmp).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Stop after this long (e.g. "30s"); default: until Ctrl-C.
        #[arg(long, value_name = "DURATION")]
        duration: Option<HumanDuration>,
    },
    /// The central PostgreSQL schema: print it, apply it, maintain its partitions.
    Central {
        #[command(subcommand)]
        command: crate::sync::central::CentralCommand,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check => check(&config::resolve_path(cli.config.as_deref())),
        Command::Run => {
            let path = config::resolve_path(cli.config.as_deref());
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!(
                        "outpost: the configuration has {} problem(s); not starting.",
                        errors.0.len()
                    );
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_tracing(&config.log.level);
            run_async(|token| {
                let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
                spawn_reload_handler(reload_tx);
                crate::pipeline::run(path, config, token, reload_rx)
            })
        }
        Command::Status { db, json } => status(cli.config.as_deref(), db, json),
        Command::NotifyTest { name } => {
            notify_test(&config::resolve_path(cli.config.as_deref()), &name)
        }
        Command::Readings {
            db,
            device,
            metric,
            since,
            until,
            limit,
            format,
        } => {
            let now = crate::clock::now();
            let parse = |v: Option<String>, flag: &str| match v {
                None => Ok(None),
                Some(v) => crate::readings::parse_time(&v, now)
                    .map(Some)
                    .map_err(|e| format!("--{flag}: {e}")),
            };
            let (since, until) = match (parse(since, "since"), parse(until, "until")) {
                (Ok(s), Ok(u)) => (s, u),
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("outpost: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            if limit == 0 || limit > crate::readings::MAX_LIMIT {
                eprintln!(
                    "outpost: --limit must be between 1 and {}",
                    crate::readings::MAX_LIMIT
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            let query = crate::readings::Query {
                device,
                metric,
                since,
                until,
                limit,
            };
            readings(cli.config.as_deref(), db, &query, format)
        }
        Command::Rejected {
            db,
            source,
            reason,
            limit,
            format,
        } => {
            let query = crate::rejected::Query {
                source,
                reason,
                limit,
            };
            if let Err(e) = query.validate() {
                eprintln!("outpost: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            rejected(cli.config.as_deref(), db, &query, format)
        }
        Command::Central { command } => {
            crate::sync::central::command(&config::resolve_path(cli.config.as_deref()), command)
        }
        Command::Demo { dir, duration } => {
            init_tracing("warn");
            let dir = match dir {
                Some(d) => d,
                None => std::env::temp_dir().join(format!("outpost-demo-{}", std::process::id())),
            };
            run_async(move |token| {
                if let Some(d) = duration {
                    let t = token.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(d.get()).await;
                        t.cancel();
                    });
                }
                async move { crate::demo::run(&dir, token, std::io::stdout()).await }
            })
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            println!(
                "# {}: the configuration is valid. Effective configuration:\n",
                path.display()
            );
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "outpost: {} problem(s) in the configuration.",
                errors.0.len()
            );
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn notify_test(path: &Path, name: &str) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!(
                "outpost: the configuration has {} problem(s).",
                errors.0.len()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_tracing("warn");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::notify::send_test(&config, name)) {
        Ok(crate::notify::Outcome::Delivered) => {
            println!("{name}: delivered.");
            ExitCode::SUCCESS
        }
        Ok(crate::notify::Outcome::Retry(why)) => {
            eprintln!("{name}: NOT delivered (the agent would retry): {why}");
            ExitCode::FAILURE
        }
        Ok(crate::notify::Outcome::Failed(why)) => {
            eprintln!("{name}: NOT delivered (permanent failure): {why}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
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
    let db = match db {
        Some(db) => db,
        None => match Config::load(&config::resolve_path(config_path)) {
            Ok(c) => c.storage.path,
            Err(errors) => {
                eprintln!("{errors}");
                eprintln!("outpost: cannot find the database without a valid configuration; use --db PATH.");
                return Err(ExitCode::from(EXIT_CONFIG));
            }
        },
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

fn readings(
    config_path: Option<&Path>,
    db: Option<PathBuf>,
    query: &crate::readings::Query,
    format: crate::readings::Format,
) -> ExitCode {
    let db = match database_path(config_path, db) {
        Ok(db) => db,
        Err(code) => return code,
    };
    let result = crate::store::open_reader(&db, std::time::Duration::from_secs(5))
        .and_then(|conn| crate::readings::query(&conn, query));
    match result {
        Ok(rows) => {
            print!(
                "{}",
                crate::readings::render(&rows, format, &display_config(config_path))
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outpost: cannot read {}: {e}", db.display());
            ExitCode::FAILURE
        }
    }
}

fn rejected(
    config_path: Option<&Path>,
    db: Option<PathBuf>,
    query: &crate::rejected::Query,
    format: crate::rejected::Format,
) -> ExitCode {
    let db = match database_path(config_path, db) {
        Ok(db) => db,
        Err(code) => return code,
    };
    let result = crate::store::open_reader(&db, std::time::Duration::from_secs(5))
        .and_then(|conn| crate::rejected::query(&conn, query));
    match result {
        Ok(rows) => {
            print!("{}", crate::rejected::render(&rows, format));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outpost: cannot read {}: {e}", db.display());
            ExitCode::FAILURE
        }
    }
}

fn status(config_path: Option<&Path>, db: Option<PathBuf>, json: bool) -> ExitCode {
    // Without --db the configuration is at hand: its certificate files are checked too.
    let certificates = match db {
        None => Config::load(&config::resolve_path(config_path))
            .map(|c| crate::tls::status_of(&c.tls_endpoints(), crate::clock::now()))
            .unwrap_or_default(),
        Some(_) => Vec::new(),
    };
    let db = match database_path(config_path, db) {
        Ok(db) => db,
        Err(code) => return code,
    };
    // What the servers presented, as the running agent saved it.
    let mut certificates = certificates;
    certificates.extend(crate::tls::presented_status(&db, chrono::Utc::now()));
    // G9: stalled stages, as the running agent saved them.
    let stalls = crate::progress::load_saved(&db);
    match crate::store::status_report(&db) {
        Ok(report) if json => match serde_json::to_value(&report).map(|mut v| {
            if let Some(map) = v.as_object_mut() {
                map.insert("certificates".into(), serde_json::json!(certificates));
                map.insert(
                    "stalled".into(),
                    serde_json::json!(stalls.as_ref().map(|s| &s.stalled).unwrap_or(&Vec::new())),
                );
            }
            v
        }) {
            Ok(mut v) => {
                if let Some(map) = v.as_object_mut() {
                    let recovered = backfill_recovered(&db);
                    map.insert("backfill_recovered".into(), serde_json::json!(recovered));
                }
                println!("{v:#}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("outpost: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(report) => {
            print!(
                "{}",
                crate::status::render_with(
                    &report,
                    &db.display().to_string(),
                    &display_config(config_path)
                )
            );
            for source in backfill_recovered(&db) {
                println!("{}", source.describe());
            }
            for line in crate::tls::status_lines(&certificates) {
                println!("{line}");
            }
            if let Some(stalls) = &stalls {
                for line in crate::status::stall_lines(stalls, crate::clock::now()) {
                    println!("{line}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outpost: cannot read {}: {e}", db.display());
            ExitCode::FAILURE
        }
    }
}

/// What the TTN backfill recovered per source (empty when the database cannot tell).
fn backfill_recovered(db: &Path) -> Vec<crate::sources::ttn_backfill::RecoveryStatus> {
    crate::store::open_reader(db, std::time::Duration::from_secs(5))
        .and_then(|conn| crate::sources::ttn_backfill::recovery_status(&conn))
        .unwrap_or_default()
}

/// Runs `f` on a multi-threaded runtime with a shutdown token cancelled by SIGTERM or
/// SIGINT.
fn run_async<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let token = CancellationToken::new();
        spawn_signal_handler(token.clone());
        match f(token).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "Outpost stopped with an error.");
                eprintln!("outpost: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// SIGHUP (`systemctl reload outpost`) asks for a configuration reload. Requests that
/// arrive while one is pending are merged.
fn spawn_reload_handler(reload: tokio::sync::mpsc::Sender<()>) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::error!("Cannot install the SIGHUP handler; reload is unavailable.");
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received; reloading the configuration.");
            let _ = reload.try_send(());
        }
    });
}

fn spawn_signal_handler(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("Cannot install signal handlers.");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received; shutting down."),
            _ = int.recv() => tracing::info!("SIGINT received; shutting down."),
        }
        token.cancel();
    });
}

/// Logs to stderr; under systemd (JOURNAL_STREAM set) without timestamps, which the
/// journal adds itself, and without colours unless stderr is a terminal. `RUST_LOG` overrides the configured level.
pub fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).try_init()
    } else {
        // Colours only on a terminal: a log file or pipe gets plain text.
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init()
    };
}
