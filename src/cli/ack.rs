//! `outpost ack RULE [--device D] --by NAME [--note TEXT | --note-file PATH]`:
//! acknowledges a firing alarm in the local database, while the agent runs or not.
//!
//! The command writes the acknowledgement itself, on a connection of its own (WAL,
//! the configured busy timeout, one `BEGIN IMMEDIATE` transaction): the alert state row
//! and an `acknowledged` event (see `alerts::ack`). The running engine sees it within
//! a tick and stops reminders and escalation for that firing.
//!
//! Exit codes: 0 acknowledged (or already acknowledged: nothing changed), 1 no such
//! firing alarm (never fired, or resolved already) or the database cannot be written,
//! 2 bad arguments or configuration (nothing is written).

use crate::alerts::ack::{self, AckOutcome, AckRequest, Channel};
use crate::config;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The command-line arguments of `outpost ack`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The rule's `name` in [[alerts]].
    pub rule: String,
    /// Only this device's alarm (default: every firing alarm of the rule).
    #[arg(long)]
    pub device: Option<String>,
    /// Who acknowledges (a person's name, up to 100 characters).
    #[arg(long)]
    pub by: String,
    /// Why, or what was done (up to 1,000 characters).
    #[arg(long, conflicts_with = "note_file")]
    pub note: Option<String>,
    /// Read the note from this file (`-`: standard input).
    #[arg(long, value_name = "PATH")]
    pub note_file: Option<PathBuf>,
    /// Write to this database instead of the configured one.
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

fn bad(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("outpost ack: {message}");
    ExitCode::from(crate::exit::CONFIG)
}

/// Reads a note file without reading more than a too-long note needs.
fn read_note(path: &Path) -> Result<String, String> {
    let limit = (ack::MAX_NOTE * 4 + 1) as u64;
    let mut bytes = Vec::new();
    let result = if path == Path::new("-") {
        std::io::stdin().take(limit).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    };
    result.map_err(|e| format!("cannot read the note: {e}"))?;
    if bytes.len() as u64 >= limit {
        return Err(format!(
            "the note is longer than {} characters; at most {} are accepted",
            ack::MAX_NOTE,
            ack::MAX_NOTE
        ));
    }
    let text = String::from_utf8(bytes).map_err(|_| "the note is not UTF-8 text".to_string())?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

/// What the command needs from the configuration.
struct Setup {
    rules: Vec<String>,
    db: PathBuf,
    busy_timeout: std::time::Duration,
    site: String,
    gateway_id: String,
}

/// The configuration's rules and database; with `--db` and no valid configuration (a
/// database copied from a gateway, the demo's), the rules and the gateway the database
/// itself knows.
fn setup(config_path: Option<&Path>, db: Option<&Path>) -> Result<Setup, ExitCode> {
    match config::Config::load(&config::resolve_path(config_path)) {
        Ok(c) => Ok(Setup {
            rules: c.alerts.iter().map(|r| r.name.clone()).collect(),
            db: db.map_or_else(|| c.storage.path.clone(), Path::to_path_buf),
            busy_timeout: c.storage.busy_timeout.get(),
            site: c.agent.site.clone(),
            gateway_id: c.agent.gateway_id.clone(),
        }),
        Err(errors) => {
            let Some(db) = db else {
                eprintln!("{errors}");
                return Err(bad(format!(
                    "the configuration has {} problem(s); fix them first (`outpost check`), or name the database with --db",
                    errors.0.len()
                )));
            };
            if !db.exists() {
                eprintln!("outpost ack: no database at {}", db.display());
                return Err(ExitCode::FAILURE);
            }
            let known = crate::store::open_reader(db, std::time::Duration::from_secs(5))
                .and_then(|conn| known_to_database(&conn))
                .map_err(|e| {
                    eprintln!("outpost ack: cannot read {}: {e}", db.display());
                    ExitCode::FAILURE
                })?;
            eprintln!(
                "outpost ack: no valid configuration; using the rules the database {} knows",
                db.display()
            );
            let mut rules = known.0;
            if known.2 == "demo" || rules.is_empty() {
                // `outpost demo`'s database: its rules are those of its built-in
                // configuration, fired or not.
                for rule in super::demo::demo_config(db.parent().unwrap_or(db)).alerts {
                    if !rules.contains(&rule.name) {
                        rules.push(rule.name);
                    }
                }
            }
            Ok(Setup {
                rules,
                db: db.to_path_buf(),
                busy_timeout: std::time::Duration::from_secs(5),
                site: known.1,
                gateway_id: known.2,
            })
        }
    }
}

/// The rule names in the database, and the site and gateway of its newest event.
fn known_to_database(
    conn: &rusqlite::Connection,
) -> rusqlite::Result<(Vec<String>, String, String)> {
    let mut stmt = conn.prepare(
        "SELECT rule FROM alert_state UNION SELECT rule FROM alert_events ORDER BY 1 LIMIT 1000",
    )?;
    let rules = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let message: Option<String> = conn
        .query_row(
            "SELECT message FROM alert_events ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .ok();
    let json: serde_json::Value = message
        .and_then(|m| serde_json::from_str(&m).ok())
        .unwrap_or_default();
    let text = |k: &str| {
        json.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string()
    };
    Ok((rules, text("site"), text("gateway_id")))
}

pub fn main(config_path: Option<&Path>, args: Args) -> ExitCode {
    let config = match setup(config_path, args.db.as_deref()) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let note = match (&args.note, &args.note_file) {
        (Some(n), _) => Some(n.clone()),
        (None, Some(path)) => match read_note(path) {
            Ok(n) => Some(n),
            Err(e) => return bad(format!("{e}; nothing was written")),
        },
        (None, None) => None,
    };
    let req = AckRequest {
        rule: args.rule.clone(),
        device: args.device.clone(),
        by: args.by.clone(),
        note,
        channel: Channel::Cli,
        site: config.site.clone(),
        gateway_id: config.gateway_id.clone(),
        idempotency_key: None,
    };
    let problems = req.problems();
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("outpost ack: {p}");
        }
        return bad("nothing was written");
    }
    if !config.rules.contains(&req.rule) {
        let names: Vec<&str> = config.rules.iter().map(String::as_str).collect();
        return bad(if names.is_empty() {
            format!(
                "unknown rule {:?}: no [[alerts]] rules are configured",
                req.rule
            )
        } else {
            format!(
                "unknown rule {:?}; configured rules: {}",
                req.rule,
                names.join(", ")
            )
        });
    }
    let db = config.db.clone();
    if !db.exists() {
        eprintln!(
            "outpost ack: no database at {} (has the agent run yet?)",
            db.display()
        );
        return ExitCode::FAILURE;
    }
    let now = crate::clock::Clock::system().now();
    let outcome = match ack::acknowledge_file(&db, config.busy_timeout, &req, now) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("outpost ack: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcome).unwrap_or_default()
        );
    }
    let scope = match &req.device {
        Some(d) => format!("{} on {d}", req.rule),
        None => req.rule.clone(),
    };
    match outcome {
        AckOutcome::Applied { alarms } => {
            if !args.json {
                for a in &alarms {
                    println!(
                        "Acknowledged {} on {} ({}, firing since {}) by {}.",
                        a.rule,
                        a.device,
                        a.metric,
                        a.firing_since.format("%Y-%m-%d %H:%M:%S UTC"),
                        req.by
                    );
                }
                println!(
                    "Reminders and escalation stop; the alarm resolves when its condition clears."
                );
            }
            ExitCode::SUCCESS
        }
        AckOutcome::AlreadyAcknowledged { by, at } => {
            if !args.json {
                println!(
                    "{scope} is already acknowledged (by {by} at {}); nothing changed.",
                    at.format("%Y-%m-%d %H:%M:%S UTC")
                );
            }
            ExitCode::SUCCESS
        }
        AckOutcome::AlreadyResolved => {
            eprintln!("outpost ack: no firing alarm {scope}: it has resolved already; nothing to acknowledge.");
            ExitCode::FAILURE
        }
        AckOutcome::UnknownAlarm => {
            eprintln!(
                "outpost ack: no firing alarm {scope} (`outpost status` lists the firing ones)."
            );
            ExitCode::FAILURE
        }
    }
}
