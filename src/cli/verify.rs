//! `outpost verify`: checks the local hash chain (G10) — every reading, alert event and
//! audit entry against the links sealed at commit, the links against each other, and
//! every signed head and pruning checkpoint against the gateway's key. Read-only (a
//! WAL snapshot: works while the service runs), streaming, with progress on a terminal.
//! Exit 0 when intact; 1 with the first broken position and the kind of damage.

use crate::model::from_micros;
use crate::store::chain::local::{self, Failure, Report, VerifyOptions};
use crate::store::chain::Table;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The command-line arguments of `outpost verify`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Verify this database instead of the configured one.
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Hash only the rows sealed from this time: a duration ago ("7d") or RFC 3339.
    /// Links and signatures are always checked from the start.
    #[arg(long)]
    pub since: Option<String>,
}

pub fn main(config_path: Option<&Path>, args: Args) -> ExitCode {
    let now = crate::clock::Clock::system().now();
    let since = match &args.since {
        None => None,
        Some(v) => match super::readings::parse_time(v, now) {
            Ok(t) => Some(t.timestamp_micros()),
            Err(e) => {
                eprintln!("outpost: --since: {e}");
                return ExitCode::from(crate::exit::CONFIG);
            }
        },
    };
    let db = match super::database_path(config_path, args.db) {
        Ok(db) => db,
        Err(code) => return code,
    };
    let options = VerifyOptions {
        since,
        public_key: local::key_file_public_key(&db),
    };
    let tty = std::io::stderr().is_terminal();
    let mut last_shown = std::time::Instant::now();
    let progress = |done: u64, total: u64| {
        if tty && (last_shown.elapsed().as_millis() >= 200 || done == total) {
            last_shown = std::time::Instant::now();
            eprint!("\rverifying: {done}/{total} links");
            if done == total {
                eprint!("\r\x1b[K");
            }
        }
    };
    let result = super::read_database(&db, |conn| {
        let tables: i64 = conn.query_row(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'chain_links'",
            [],
            |r| r.get(0),
        )?;
        if tables == 0 {
            return Ok(None);
        }
        local::verify(conn, &options, progress).map(Some)
    });
    match result {
        Err(code) => code,
        Ok(None) => {
            eprintln!(
                "outpost: {} has no hash chain yet (an older version's database); start the \
                 upgraded agent once so that it migrates the database, then retry",
                db.display()
            );
            ExitCode::FAILURE
        }
        Ok(Some(Ok(report))) => {
            print!("{}", render_report(&db, &report, now.timestamp_micros()));
            ExitCode::SUCCESS
        }
        Ok(Some(Err(failure))) => {
            print!("{}", render_failure(&db, &failure));
            ExitCode::from(crate::exit::FAILURE)
        }
    }
}

fn time(micros: i64) -> String {
    from_micros(micros).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The summary of an intact store.
pub fn render_report(db: &Path, r: &Report, now: i64) -> String {
    let mut out = format!("{}: intact\n", db.display());
    out += &format!(
        "  {} links, {} rows checked, {} signatures valid\n",
        r.links, r.rows, r.signatures
    );
    match r.newest_signed {
        Some((seq, at)) => {
            let age = std::time::Duration::from_secs(((now - at).max(0) / 1_000_000) as u64);
            out += &format!(
                "  newest signed head: link {seq} of {}, signed {} ({} ago)\n",
                r.newest_seq,
                time(at),
                humantime::format_duration(age)
            );
        }
        None if r.links > 0 => out += "  no signed head yet (the agent signs every minute)\n",
        None => {}
    }
    if r.links_skipped > 0 {
        out += &format!(
            "  {} links sealed before --since: chained, rows not hashed\n",
            r.links_skipped
        );
    }
    for tbl in Table::ALL {
        let i = tbl as usize;
        if r.pruned_up_to[i] > 0 {
            out += &format!(
                "  {tbl} pruned up to id {} (retention or size cap; {} checkpoints, {} not signed yet): \
                 rows there are not checked\n",
                r.pruned_up_to[i], r.checkpoints, r.checkpoints_unsigned
            );
        }
        if r.pre_chain[i] > 0 {
            let rows = match tbl {
                Table::Readings => "readings",
                Table::AlertEvents => "alert events",
                Table::AuditLog => "audit entries",
            };
            out += &format!(
                "  {} {rows} from before the chain (version upgrade) not covered\n",
                r.pre_chain[i]
            );
        }
    }
    if r.corrections > 0 {
        out += &format!(
            "  {} clock corrections replayed (see `outpost audit --kind clock.correction`)\n",
            r.corrections
        );
    }
    out
}

/// The first broken position.
pub fn render_failure(db: &Path, f: &Failure) -> String {
    let d = &f.damage;
    let mut out = format!("{}: DAMAGED\n  {}\n", db.display(), d.kind);
    let table = d.tbl.map(|t| t.as_str()).unwrap_or("-");
    if d.tbl.is_none() && d.seq > 0 {
        out += &format!("  the signed head of link {}\n", d.seq);
        return out;
    }
    if d.seq > 0 {
        out += &format!("  at link {} ({table}", d.seq);
    } else {
        out += &format!("  in {table} (no link");
    }
    if d.last_id > 0 {
        out += &format!(", ids {}..={}", d.first_id, d.last_id);
    }
    out += ")\n";
    if let Some((a, b)) = f.time_range {
        out += &format!("  rows from {} to {}\n", time(a), time(b));
    }
    if let Some(at) = f.sealed_at {
        out += &format!("  link sealed {}\n", time(at));
    }
    out
}
