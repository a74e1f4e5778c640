//! `outpost central …`: the central PostgreSQL schema — print it, apply it, maintain
//! its partitions. The SQL lives in [`crate::sync::central`]; this module runs it.

use crate::sync::central::{
    maintain, migrate, readings_is_partitioned, resolve_connection, schema_sql, ConnectionArgs,
    Layout, LoadSync, DEFAULT_MONTHS_BACK,
};
use crate::sync::postgres::{connect, Central};
use crate::sync::SyncError;
use chrono::Utc;
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

pub use crate::sync::central::CentralCommand;

/// Runs `outpost central COMMAND`; the `[sync]` section is loaded only by the commands
/// that connect without `--url`.
pub fn main(path: &Path, command: CentralCommand) -> ExitCode {
    let load_sync = || {
        crate::config::Config::load(path)
            .map(|config| config.sync)
            .map_err(|errors| errors.to_string())
    };
    run_command(path, &load_sync, command)
}

/// Runs `outpost central …` and returns the exit code. `load_sync` loads the `[sync]`
/// section of the configuration at `config_path` (asked only by the commands that
/// connect, and only needed when no `--url` is given).
fn run_command(
    config_path: &std::path::Path,
    load_sync: LoadSync<'_>,
    command: CentralCommand,
) -> ExitCode {
    match command {
        CentralCommand::Schema { partitioned } => {
            let layout = if partitioned {
                Layout::Partitioned
            } else {
                Layout::Plain
            };
            print!("{}", schema_sql(layout, Utc::now().date_naive()));
            ExitCode::SUCCESS
        }
        CentralCommand::Migrate {
            connection,
            partitioned,
        } => run_admin(
            config_path,
            load_sync,
            &connection,
            move |central| async move {
                let layout = if partitioned {
                    Layout::Partitioned
                } else {
                    Layout::Plain
                };
                let m = migrate(&central, layout).await?;
                let mut out = if m.from_version == m.to_version {
                    format!(
                        "The central schema is up to date (version {}).",
                        m.to_version
                    )
                } else {
                    format!(
                        "The central schema was migrated from version {} to {}.",
                        m.from_version, m.to_version
                    )
                };
                if m.partitioned {
                    let _ = write!(
                        out,
                        " outpost.readings is partitioned by month; created partitions: {}. \
                     Run `outpost central maintain` daily.",
                        if m.partitions_created.is_empty() {
                            "none".to_string()
                        } else {
                            m.partitions_created.join(", ")
                        }
                    );
                }
                Ok(out)
            },
        ),
        CentralCommand::Maintain {
            connection,
            months_ahead,
        } => run_admin(
            config_path,
            load_sync,
            &connection,
            move |central| async move {
                if readings_is_partitioned(&central).await? == Some(false) {
                    return Ok("outpost.readings is not partitioned; nothing to do.".to_string());
                }
                let created = maintain(
                    &central,
                    Utc::now().date_naive(),
                    DEFAULT_MONTHS_BACK,
                    months_ahead.clamp(0, 120),
                )
                .await?;
                Ok(if created.is_empty() {
                    "Every partition exists already.".to_string()
                } else {
                    format!("Created partitions: {}.", created.join(", "))
                })
            },
        ),
    }
}

fn run_admin<F, Fut>(
    config_path: &std::path::Path,
    load_sync: LoadSync<'_>,
    args: &ConnectionArgs,
    work: F,
) -> ExitCode
where
    F: FnOnce(Central) -> Fut,
    Fut: std::future::Future<Output = Result<String, SyncError>>,
{
    let options = match resolve_connection(config_path, load_sync, args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("outpost: {e}");
            return ExitCode::from(crate::exit::CONFIG);
        }
    };
    let done = super::block_on(super::Runtime::CurrentThread, async {
        let result = match connect(&options).await {
            Ok(central) => work(central).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(message) => {
                println!("{message}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("outpost: {e}");
                ExitCode::FAILURE
            }
        }
    });
    done.unwrap_or_else(|code| code)
}
