//! `outpost rejected`: the rejected input the agent kept (the newest 1000 messages), with
//! what was wrong and what to do, straight from the database (read-only; works while
//! the service runs).
//!
//! Payloads are shown as an excerpt a terminal can print safely: control characters
//! (escape sequences included) are escaped, and payloads that are not UTF-8 (binary,
//! often ChirpStack's Protobuf) are shown in hex.

use crate::model::from_micros;
use crate::sources::reasons;
use chrono::{DateTime, Utc};
use rusqlite::Connection;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The command-line arguments of `outpost rejected`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Read this database instead of the configured one.
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Only this source (its `name` in [[sources]]).
    #[arg(long)]
    pub source: Option<String>,
    /// Only this reason, e.g. `protobuf` or `invalid_json` (docs/technician.md lists them).
    #[arg(long)]
    pub reason: Option<String>,
    /// At most this many messages (1 to 1000).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

pub fn main(config_path: Option<&Path>, args: Args) -> ExitCode {
    let q = &Query {
        source: args.source,
        reason: args.reason,
        limit: args.limit,
    };
    if let Err(e) = q.validate() {
        eprintln!("outpost: {e}");
        return ExitCode::from(crate::exit::CONFIG);
    }
    match super::database_path(config_path, args.db)
        .and_then(|db| super::read_database(&db, |conn| query(conn, q)))
    {
        Ok(rows) => {
            print!("{}", render(&rows, args.format));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// What to list.
#[derive(Debug, Clone)]
pub struct Query {
    pub source: Option<String>,
    pub reason: Option<String>,
    /// Newest first, at most this many.
    pub limit: usize,
}

/// The largest `--limit`: the agent keeps no more messages than this.
pub const MAX_LIMIT: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

impl Query {
    /// Checks the command-line values; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.limit == 0 || self.limit > MAX_LIMIT {
            return Err(format!(
                "--limit must be between 1 and {MAX_LIMIT} (the agent keeps the newest {MAX_LIMIT} messages), found {}",
                self.limit
            ));
        }
        if let Some(source) = &self.source {
            crate::settings::check_identifier(source, "the source name")
                .map_err(|e| format!("--source: {e}"))?;
        }
        if let Some(reason) = &self.reason {
            if reasons::reason(reason).is_none() {
                let shown: String = reason.chars().take(64).collect();
                let known: Vec<&str> = reasons::REASONS.iter().map(|r| r.reason).collect();
                return Err(format!(
                    "--reason: unknown reason {shown:?}; one of {}",
                    known.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// One kept message.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct KeptRejection {
    pub id: i64,
    pub received_at: DateTime<Utc>,
    pub source: String,
    pub reason: String,
    /// The MQTT topic, for messages from a broker.
    pub topic: Option<String>,
    /// What was wrong with it, as the source said.
    pub detail: Option<String>,
    /// How many bytes were kept (at most 4 KiB of each message).
    pub payload_bytes: usize,
    /// The start of the payload, printable (see the module comment).
    pub payload: String,
    /// What to do about it.
    pub hint: &'static str,
}

/// Payload characters shown per message.
const EXCERPT_CHARS: usize = 200;

pub fn query(conn: &Connection, q: &Query) -> rusqlite::Result<Vec<KeptRejection>> {
    // Before the agent's first start after an upgrade the table has no topic yet.
    let has_topic: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('rejected') WHERE name = 'topic'",
        [],
        |r| r.get(0),
    )?;
    let sql = format!(
        "SELECT id, received_at, source, reason, {}, detail, payload FROM rejected
         WHERE (?1 IS NULL OR source = ?1) AND (?2 IS NULL OR reason = ?2)
         ORDER BY id DESC LIMIT ?3",
        if has_topic { "topic" } else { "NULL" }
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(
        rusqlite::params![q.source, q.reason, q.limit.clamp(1, MAX_LIMIT) as i64],
        |r| {
            let reason: String = r.get(3)?;
            let payload: Option<Vec<u8>> = r.get(6)?;
            let payload = payload.unwrap_or_default();
            Ok(KeptRejection {
                id: r.get(0)?,
                received_at: from_micros(r.get(1)?),
                source: r.get(2)?,
                hint: reasons::fix_for(&reason),
                reason,
                topic: r.get(4)?,
                detail: r.get(5)?,
                payload_bytes: payload.len(),
                payload: excerpt(&payload, EXCERPT_CHARS),
            })
        },
    )?;
    rows.collect()
}

/// At most `max` characters of `payload` that are safe to print: text with control
/// characters escaped, or `hex: 0a 24 …` when it is not UTF-8.
pub fn excerpt(payload: &[u8], max: usize) -> String {
    if payload.is_empty() {
        return String::new();
    }
    let Ok(text) = std::str::from_utf8(payload) else {
        let mut out = String::from("hex:");
        for b in payload.iter().take(max / 3) {
            let _ = write!(out, " {b:02x}");
        }
        if payload.len() > max / 3 {
            out.push_str(" …");
        }
        return out;
    };
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i >= max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

pub fn render(rows: &[KeptRejection], format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(rows).unwrap_or_default() + "\n",
        Format::Table => {
            if rows.is_empty() {
                return "No rejected input is kept (or none matches).\n".into();
            }
            let header = ["TIME", "SOURCE", "REASON", "TOPIC", "PAYLOAD", "DETAIL"];
            let cut = |s: &str, n: usize| {
                if s.chars().count() > n {
                    s.chars().take(n).collect::<String>() + "…"
                } else {
                    s.to_string()
                }
            };
            let body: Vec<[String; 6]> = rows
                .iter()
                .map(|r| {
                    [
                        r.received_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                        r.source.clone(),
                        r.reason.clone(),
                        r.topic
                            .as_deref()
                            .map_or("-".into(), |t| cut(&excerpt(t.as_bytes(), 80), 60)),
                        cut(&r.payload, 40),
                        cut(
                            &excerpt(r.detail.as_deref().unwrap_or("").as_bytes(), 200),
                            100,
                        ),
                    ]
                })
                .collect();
            let mut out = crate::display::table(&header, &body);
            let mut shown: Vec<&str> = Vec::new();
            for r in rows {
                if !shown.contains(&r.reason.as_str()) {
                    shown.push(&r.reason);
                }
            }
            out.push_str("\nWhat to do:\n");
            for reason in shown {
                let fix = reasons::fix_for(reason);
                let fix = if fix.is_empty() {
                    "see docs/technician.md"
                } else {
                    fix
                };
                let _ = writeln!(out, "  {reason}: {fix}");
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_safe_to_print() {
        assert_eq!(excerpt(b"23.5 C", 200), "23.5 C");
        assert_eq!(excerpt(b"a\x1b[2Jb\n", 200), "a\\u{1b}[2Jb\\n");
        assert_eq!(excerpt(b"abcdef", 3), "abc…");
        let pb = [0x0a, 0x24, 0x00, 0xff, 0x01, 0x02];
        assert_eq!(excerpt(&pb, 200), "hex: 0a 24 00 ff 01 02");
        assert_eq!(excerpt(&[0xffu8; 100], 9), "hex: ff ff ff …");
        assert_eq!(excerpt(&[0u8; 100], 2), "\\u{0}\\u{0}…");
        assert_eq!(excerpt(b"", 10), "");
    }

    #[test]
    fn flags_are_checked() {
        let q = |source: Option<&str>, reason: Option<&str>, limit| Query {
            source: source.map(str::to_string),
            reason: reason.map(str::to_string),
            limit,
        };
        assert!(q(Some("lorawan"), Some("protobuf"), 20).validate().is_ok());
        assert!(q(None, None, 0).validate().unwrap_err().contains("--limit"));
        assert!(q(None, None, 1001)
            .validate()
            .unwrap_err()
            .contains("--limit"));
        assert!(q(Some("a b"), None, 1)
            .validate()
            .unwrap_err()
            .contains("--source"));
        assert!(q(Some(""), None, 1)
            .validate()
            .unwrap_err()
            .contains("--source"));
        let e = q(None, Some("protobuff"), 1).validate().unwrap_err();
        assert!(
            e.starts_with("--reason: unknown reason \"protobuff\"; one of too_large"),
            "{e}"
        );
    }
}
