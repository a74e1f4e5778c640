//! `outpost central …`: the central PostgreSQL schema — print it, apply it, maintain
//! its partitions. The SQL lives in [`crate::sync::central`]; this module runs it.

use crate::sync::central::{
    maintain, migrate, readings_is_partitioned, resolve_connection, schema_sql, ConnectionArgs,
    Layout, LoadSync, DEFAULT_MONTHS_BACK,
};
use crate::sync::integrity::{fingerprint, verify, GatewayReport, VerifyOptions};
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
        CentralCommand::Verify {
            connection,
            gateway,
            since,
            until,
        } => {
            let options = VerifyOptions {
                gateway,
                since,
                until,
                page_rows: 10_000,
            };
            run_verify(config_path, load_sync, &connection, options)
        }
    }
}

/// `outpost central verify`: a summary per gateway as it is verified; exit 0 when all
/// verify, 1 on damage (or when central cannot be read).
fn run_verify(
    config_path: &Path,
    load_sync: LoadSync<'_>,
    args: &ConnectionArgs,
    options: VerifyOptions,
) -> ExitCode {
    let connect_options = match resolve_connection(config_path, load_sync, args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("outpost: {e}");
            return ExitCode::from(crate::exit::CONFIG);
        }
    };
    let done = super::block_on(super::Runtime::CurrentThread, async {
        let central = match connect(&connect_options).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("outpost: {e}");
                return ExitCode::FAILURE;
            }
        };
        let started = std::time::Instant::now();
        let now = Utc::now();
        let mut print = |r: &GatewayReport| print!("{}", describe_report(r, now));
        match verify(&central, &options, &mut print).await {
            Err(e) => {
                eprintln!("outpost: {e}");
                ExitCode::FAILURE
            }
            Ok(reports) => {
                let rows: u64 = reports.iter().map(|r| r.rows.iter().sum::<u64>()).sum();
                let damaged = reports.iter().filter(|r| !r.is_clean()).count();
                let secs = started.elapsed().as_secs_f64();
                println!(
                    "{} gateway(s), {} verified clean, {damaged} damaged; {rows} rows in {secs:.1} s ({:.0} rows/s).",
                    reports.len(),
                    reports.len() - damaged,
                    rows as f64 / secs.max(1e-6)
                );
                if reports.is_empty() {
                    if let Some(g) = &options.gateway {
                        eprintln!("outpost: no gateway {g:?} in central");
                        return ExitCode::FAILURE;
                    }
                }
                if damaged > 0 {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                }
            }
        }
    });
    done.unwrap_or_else(|code| code)
}

/// A gateway's summary, as `outpost central verify` prints it.
pub fn describe_report(r: &GatewayReport, now: chrono::DateTime<Utc>) -> String {
    use crate::display::age;
    let mut out = String::new();
    let key = match &r.public_key {
        Some(k) => format!("key {} pinned", fingerprint(k)),
        None => "no key pinned".to_string(),
    };
    let _ = writeln!(out, "Gateway {}: {key}", r.gateway_id);
    if let Some(since) = &r.key_pending_since {
        let when = since
            .map(|t| format!(" since {} ago", age(now, t)))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  a NEW KEY presented by the gateway is refused{when}: accept it with SELECT outpost.accept_gateway_key('{}'); (docs/central.md)",
            r.gateway_id
        );
    }
    let [readings, events, audit] = r.rows;
    let _ =
        writeln!(
        out,
        "  {} links verified{}: {readings} readings, {events} alert events, {audit} audit entries",
        r.links,
        if r.links_pruned > 0 {
            format!(" ({} partly pruned on the gateway before sync)", r.links_pruned)
        } else {
            String::new()
        }
    );
    if r.skipped_links > 0 {
        let _ = writeln!(
            out,
            "  {} links before --since: chained, rows not re-hashed",
            r.skipped_links
        );
    }
    match r.newest_signed {
        Some((seq, at)) => {
            let when = if at > now {
                format!("signed at {} (ahead of this clock)", at.to_rfc3339())
            } else {
                format!("signed {} ago", age(now, at))
            };
            let _ = writeln!(
                out,
                "  {} signatures valid; newest signed head: seq {seq}, {when}",
                r.signatures
            );
        }
        None => {
            let _ = writeln!(out, "  no signed head at central yet");
        }
    }
    let [pr, pe, pa] = r.pending_rows;
    if pr + pe + pa > 0 || r.backlog_rows > 0 {
        let _ = writeln!(
            out,
            "  pending (not yet covered by a link at central): {pr} readings, {pe} alert events, {pa} audit entries; {} readings not yet synced (last heartbeat)",
            r.backlog_rows
        );
    }
    match &r.damage {
        None => {
            let _ = writeln!(out, "  OK");
        }
        Some(d) => {
            let place = match &d.tbl {
                Some(t) if d.seq > 0 => {
                    format!("{t} link {} (ids {}..={})", d.seq, d.first_id, d.last_id)
                }
                Some(t) => format!("{t} (ids {}..={})", d.first_id, d.last_id),
                None => format!("seq {}", d.seq),
            };
            let times = d
                .time_range
                .map(|(a, b)| format!(", rows from {} to {}", a.to_rfc3339(), b.to_rfc3339()))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  DAMAGED: first at {place}{times}: {} [{}]; {} damaged link(s) or row(s) in all",
                d.kind, d.code, r.damaged_links
            );
        }
    }
    out
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
