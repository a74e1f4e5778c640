//! `outpost audit`: the audit log (G10) — who changed what the records mean, and when —
//! straight from the database (read-only; works while the service runs).

use crate::model::from_micros;
use crate::store::audit::{self, AuditFilter, AuditKind, StoredAuditEntry};
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The command-line arguments of `outpost audit`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Read this database instead of the configured one.
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// From this time: a duration ago ("7d") or RFC 3339 ("2026-11-26T08:00:00Z").
    #[arg(long)]
    pub since: Option<String>,
    /// Only this kind, e.g. `alarm.acknowledged` or `config.reloaded`.
    #[arg(long)]
    pub kind: Option<String>,
    /// At most this many entries (the newest), 1 to 1000000.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// The largest `--limit` accepted.
pub const MAX_LIMIT: usize = 1_000_000;

pub fn main(config_path: Option<&Path>, args: Args) -> ExitCode {
    let filter = match filter(&args, crate::clock::Clock::system().now()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("outpost: {e}");
            return ExitCode::from(crate::exit::CONFIG);
        }
    };
    match super::database_path(config_path, args.db)
        .and_then(|db| super::read_database(&db, |conn| audit::list(conn, &filter)))
    {
        Ok(entries) => {
            print!("{}", render(&entries, args.format));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// The filter the arguments ask for; the message names the flag.
pub fn filter(args: &Args, now: chrono::DateTime<chrono::Utc>) -> Result<AuditFilter, String> {
    if args.limit == 0 || args.limit > MAX_LIMIT {
        return Err(format!(
            "--limit must be between 1 and {MAX_LIMIT}, found {}",
            args.limit
        ));
    }
    let since = match &args.since {
        None => None,
        Some(v) => Some(
            super::readings::parse_time(v, now)
                .map_err(|e| format!("--since: {e}"))?
                .timestamp_micros(),
        ),
    };
    let kind = match &args.kind {
        None => None,
        Some(k) => Some(AuditKind::parse(k).ok_or_else(|| {
            let shown: String = k.chars().take(64).collect();
            let known: Vec<&str> = AuditKind::ALL.iter().map(|k| k.as_str()).collect();
            format!(
                "--kind: unknown kind {shown:?}; one of {}",
                known.join(", ")
            )
        })?),
    };
    Ok(AuditFilter {
        since,
        kind,
        limit: Some(args.limit),
    })
}

/// The entries as a table (oldest first) or as JSON lines.
pub fn render(entries: &[StoredAuditEntry], format: Format) -> String {
    let mut out = String::new();
    match format {
        Format::Json => {
            for e in entries {
                let _ = writeln!(
                    out,
                    "{}",
                    serde_json::json!({
                        "id": e.id,
                        "at": from_micros(e.at).to_rfc3339(),
                        "boot_id": e.boot_id,
                        "since_boot_us": e.since_boot,
                        "kind": e.kind,
                        "actor": e.actor,
                        "details": e.details,
                        "synced": e.synced,
                    })
                );
            }
        }
        Format::Table => {
            if entries.is_empty() {
                out.push_str("No audit entries.\n");
                return out;
            }
            let rows: Vec<[String; 4]> = entries
                .iter()
                .map(|e| {
                    [
                        from_micros(e.at).format("%Y-%m-%d %H:%M:%S").to_string(),
                        e.kind.clone(),
                        printable(&e.actor),
                        printable(&e.details.to_string()),
                    ]
                })
                .collect();
            out.push_str(&crate::display::table(
                &["time (UTC)", "kind", "actor", "details"],
                &rows,
            ));
        }
    }
    out
}

/// Text safe for a terminal: control characters escaped.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            db: None,
            since: None,
            kind: None,
            limit: 1000,
            format: Format::Table,
        }
    }

    #[test]
    fn bad_flags_are_refused_with_the_flag_named() {
        let now = chrono::Utc::now();
        let e = filter(&Args { limit: 0, ..args() }, now).unwrap_err();
        assert!(e.contains("--limit"), "{e}");
        let e = filter(
            &Args {
                kind: Some("x\u{1b}[2J".repeat(100)),
                ..args()
            },
            now,
        )
        .unwrap_err();
        assert!(e.starts_with("--kind: unknown kind"), "{e}");
        assert!(e.len() < 600, "{e}");
        let e = filter(
            &Args {
                since: Some("yesterday".into()),
                ..args()
            },
            now,
        )
        .unwrap_err();
        assert!(e.contains("--since"), "{e}");
        let f = filter(
            &Args {
                since: Some("2h".into()),
                kind: Some("alarm.acknowledged".into()),
                ..args()
            },
            now,
        )
        .unwrap();
        assert_eq!(f.kind, Some(AuditKind::AlarmAcknowledged));
        assert!(f.since.is_some());
    }

    #[test]
    fn hostile_details_do_not_reach_the_terminal_raw() {
        let entry = StoredAuditEntry {
            id: 1,
            at: 0,
            boot_id: String::new(),
            since_boot: 0,
            kind: "command".into(),
            actor: "console:\u{1b}[31mmallory".into(),
            details: serde_json::json!({"note": "\u{7}"}),
            synced: false,
        };
        let text = render(&[entry], Format::Table);
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(!text.contains('\u{7}'), "{text}");
    }
}
