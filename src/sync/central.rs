//! The central schema `outpost`: versioned, idempotent migrations, the optional monthly
//! partitioning of `outpost.readings`, and `outpost central schema|migrate|maintain`.
//!
//! Every migration is idempotent (`IF NOT EXISTS`), runs in one transaction under a
//! transaction-scoped advisory lock (safe through PgBouncer in transaction mode, and two
//! operators running it at once simply queue), and records its version in
//! `outpost.schema_version`. The agent refuses to sync into a schema older or newer than
//! [`SCHEMA_VERSION`], with a message that says which command to run.

use super::postgres::{parse_url_allowing_password, Central, ConnectOptions};
use super::{SslMode, SyncConfig, SyncError};
use crate::settings::Secret;
use chrono::{Datelike, NaiveDate, Utc};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::types::Type;

/// The central schema version this agent writes.
pub const SCHEMA_VERSION: i32 = 4;

/// Key of the transaction-scoped advisory lock that serialises migrations and
/// partition maintenance (`pg_advisory_xact_lock`, released at commit).
const MIGRATION_LOCK: i64 = 0x6f75_7470_6f73_7401; // "outpost" + 1

/// Which layout `outpost.readings` gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One table. Simple; right up to a few hundred million rows.
    Plain,
    /// Native declarative partitioning by month on `observed_at`, plus a default
    /// partition so that an insert never fails.
    Partitioned,
}

struct Migration {
    version: i32,
    description: &'static str,
    sql: fn(Layout) -> String,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "gateways, readings, alert_events",
        sql: migration_1,
    },
    // 2: acknowledgements from central (issue 16, alarm-ack).
    Migration {
        version: 2,
        description: "alert_acks, who acknowledged in alert_events",
        sql: migration_2,
    },
    // 3: daily summaries (the HACCP log).
    Migration {
        version: 3,
        description: "daily_summaries",
        sql: migration_3,
    },
    // 4: the hash chain at central (issue 17): the local sequence on readings and alert
    // events, the audit log, links, signatures, checkpoints and the pinned key.
    Migration {
        version: 4,
        description:
            "hash chain: seq, audit_log, chain links, signatures, checkpoints, starts, pinned keys",
        sql: migration_4,
    },
];

/// The chain at central (G10, issue 17). `seq` is the gateway's local row id (the
/// position its chain links cover; NULL for rows sent by agents from before the chain).
/// Links, signatures, checkpoints and the audit log mirror the gateway's tables, keyed by
/// gateway. The gateway's Ed25519 public key is pinned at first contact; a different key
/// is parked in `public_key_pending` and refused until an operator runs
/// `SELECT outpost.accept_gateway_key('<gateway>')` (docs/central.md), which keeps the
/// previous key in `outpost.gateway_keys` so that what it signed still verifies.
fn migration_4(_: Layout) -> String {
    "\
-- The gateway's local row id: the position its hash chain covers (NULL: sent by an older agent).
ALTER TABLE outpost.readings ADD COLUMN IF NOT EXISTS seq bigint;
CREATE INDEX IF NOT EXISTS readings_gateway_seq ON outpost.readings (gateway_id, seq) WHERE seq IS NOT NULL;
-- Rows without a chain position: those an older agent sent, and any inserted behind its back.
CREATE INDEX IF NOT EXISTS readings_unsequenced ON outpost.readings (gateway_id, inserted_at) WHERE seq IS NULL;
-- Alert events: the local id, and the columns the chain covers that central did not keep
-- (message_text: the event's JSON exactly as the gateway stored it; jsonb reorders keys).
ALTER TABLE outpost.alert_events ADD COLUMN IF NOT EXISTS seq bigint;
ALTER TABLE outpost.alert_events ADD COLUMN IF NOT EXISTS unit text;
ALTER TABLE outpost.alert_events ADD COLUMN IF NOT EXISTS since timestamptz;
ALTER TABLE outpost.alert_events ADD COLUMN IF NOT EXISTS message_text text;
CREATE INDEX IF NOT EXISTS alert_events_gateway_seq ON outpost.alert_events (gateway_id, seq) WHERE seq IS NOT NULL;

-- The gateways' audit logs (append-only on the gateway): details exactly as written (JSON text).
CREATE TABLE IF NOT EXISTS outpost.audit_log (
    gateway_id  text NOT NULL,
    id          bigint NOT NULL,              -- the gateway's local id (chain position)
    at          timestamptz NOT NULL,         -- gateway's wall clock
    boot_id     text NOT NULL,
    since_boot  bigint NOT NULL,              -- µs since that boot (CLOCK_BOOTTIME)
    kind        text NOT NULL,
    actor       text NOT NULL,
    details     text NOT NULL,                -- JSON object, the exact text the chain covers
    inserted_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT audit_log_unique UNIQUE (gateway_id, id)
);
CREATE INDEX IF NOT EXISTS audit_log_gateway_time ON outpost.audit_log (gateway_id, at DESC);
CREATE INDEX IF NOT EXISTS audit_log_kind_time ON outpost.audit_log (kind, at DESC);

-- The hash chain: one link per table per group commit on the gateway.
CREATE TABLE IF NOT EXISTS outpost.chain_links (
    gateway_id  text NOT NULL,
    seq         bigint NOT NULL,
    tbl         text NOT NULL,                -- readings, alert_events or audit_log
    first_id    bigint NOT NULL,
    last_id     bigint NOT NULL,
    rows        bigint NOT NULL,
    digest      bytea NOT NULL,
    head        bytea NOT NULL,
    sealed_at   timestamptz NOT NULL,
    inserted_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT chain_links_unique UNIQUE (gateway_id, seq)
);
-- Signed heads (Ed25519 over the head at link `seq`).
CREATE TABLE IF NOT EXISTS outpost.chain_signatures (
    gateway_id  text NOT NULL,
    id          bigint NOT NULL,              -- the gateway's local id
    seq         bigint NOT NULL,
    head        bytea NOT NULL,
    signature   bytea NOT NULL,
    public_key  bytea NOT NULL,
    signed_at   timestamptz NOT NULL,
    inserted_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT chain_signatures_unique UNIQUE (gateway_id, id)
);
CREATE INDEX IF NOT EXISTS chain_signatures_seq ON outpost.chain_signatures (gateway_id, seq);
-- Where the gateway pruned a table (retention, size cap): its rows up to pruned_up_to may
-- be gone (those pruned before they were synced never reach central).
CREATE TABLE IF NOT EXISTS outpost.chain_checkpoints (
    gateway_id   text NOT NULL,
    id           bigint NOT NULL,             -- the gateway's local id
    tbl          text NOT NULL,
    pruned_up_to bigint NOT NULL,
    seq          bigint NOT NULL,             -- the link (and head) at that point
    head         bytea NOT NULL,
    reason       text NOT NULL,               -- retention or size_cap
    at           timestamptz NOT NULL,
    signature    bytea,
    public_key   bytea,
    inserted_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT chain_checkpoints_unique UNIQUE (gateway_id, id)
);
-- Where each table's chain begins on the gateway: rows up to start_id predate the chain
-- (a gateway upgraded from a version without it).
CREATE TABLE IF NOT EXISTS outpost.chain_starts (
    gateway_id text NOT NULL,
    tbl        text NOT NULL,
    start_id   bigint NOT NULL,
    CONSTRAINT chain_starts_unique UNIQUE (gateway_id, tbl)
);

-- The gateway's public key, pinned at first contact; a different one waits for an operator.
ALTER TABLE outpost.gateways ADD COLUMN IF NOT EXISTS public_key bytea;
ALTER TABLE outpost.gateways ADD COLUMN IF NOT EXISTS public_key_pinned_at timestamptz;
ALTER TABLE outpost.gateways ADD COLUMN IF NOT EXISTS public_key_pending bytea;
ALTER TABLE outpost.gateways ADD COLUMN IF NOT EXISTS public_key_refused_at timestamptz;
-- Keys pinned before the current one (accepted replacements): what they signed still verifies.
CREATE TABLE IF NOT EXISTS outpost.gateway_keys (
    gateway_id  text NOT NULL,
    public_key  bytea NOT NULL,
    pinned_at   timestamptz,
    retired_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT gateway_keys_unique UNIQUE (gateway_id, public_key)
);
-- The documented way to accept a gateway's new key: SELECT outpost.accept_gateway_key('gw-1');
CREATE OR REPLACE FUNCTION outpost.accept_gateway_key(gateway text) RETURNS bytea
LANGUAGE sql AS $fn$
    INSERT INTO outpost.gateway_keys (gateway_id, public_key, pinned_at)
        SELECT gateway_id, public_key, public_key_pinned_at FROM outpost.gateways
        WHERE gateway_id = gateway AND public_key IS NOT NULL AND public_key_pending IS NOT NULL
        ON CONFLICT DO NOTHING;
    UPDATE outpost.gateways
       SET public_key = public_key_pending, public_key_pinned_at = now(),
           public_key_pending = NULL, public_key_refused_at = NULL
     WHERE gateway_id = gateway AND public_key_pending IS NOT NULL
    RETURNING public_key;
$fn$;
"
    .to_string()
}

/// `outpost.daily_summaries`: one row per gateway, local day, device and metric, as the
/// gateway computed it (`outpost report`); a recomputed day (late readings) replaces it.
fn migration_3(_: Layout) -> String {
    "\
CREATE TABLE IF NOT EXISTS outpost.daily_summaries (
    gateway_id           text NOT NULL,
    day                  date NOT NULL,               -- the local date in `timezone`
    device               text NOT NULL,
    metric               text NOT NULL,               -- '' for a listed device without readings
    timezone             text NOT NULL,
    day_start            timestamptz NOT NULL,        -- local midnight
    day_end              timestamptz NOT NULL,        -- the next local midnight (23 to 25 h later)
    readings             bigint NOT NULL,
    min                  double precision,
    max                  double precision,
    mean                 double precision,
    gaps                 integer NOT NULL,
    gap_seconds          bigint NOT NULL,
    out_of_range_seconds bigint NOT NULL,
    excursions           bigint NOT NULL,
    alarms               integer NOT NULL,
    detail               jsonb NOT NULL,              -- the whole summary: gaps, rules, alarms
    computed_at          timestamptz NOT NULL,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gateway_id, day, device, metric)
);
CREATE INDEX IF NOT EXISTS daily_summaries_day ON outpost.daily_summaries (day DESC, gateway_id);
"
    .to_string()
}

const PREAMBLE: &str = "\
CREATE SCHEMA IF NOT EXISTS outpost;
CREATE TABLE IF NOT EXISTS outpost.schema_version (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
";

fn migration_1(layout: Layout) -> String {
    let partition_by = match layout {
        Layout::Plain => "",
        Layout::Partitioned => " PARTITION BY RANGE (observed_at)",
    };
    let default_partition = match layout {
        Layout::Plain => "",
        Layout::Partitioned => {
            "-- Readings for months without their own partition land here; \
             `outpost central maintain` moves them out when it creates that month.\n\
             CREATE TABLE IF NOT EXISTS outpost.readings_default PARTITION OF outpost.readings DEFAULT;\n"
        }
    };
    format!(
        "\
-- One row per gateway, upserted by its heartbeat every sync interval.
CREATE TABLE IF NOT EXISTS outpost.gateways (
    gateway_id          text PRIMARY KEY,
    agent_version       text NOT NULL,
    site                text,
    first_seen          timestamptz NOT NULL DEFAULT now(),
    last_seen           timestamptz NOT NULL DEFAULT now(),   -- central's clock
    boot_id             text,
    clock_synchronized  boolean,                              -- NULL: unknown
    backlog_rows        bigint NOT NULL DEFAULT 0,
    oldest_unsynced_at  timestamptz,                          -- gateway's clock
    backlog_age_seconds double precision,
    last_sync_at        timestamptz,
    last_error          text,
    last_error_at       timestamptz
);

-- Readings. A row is final once sent: observed_at never changes for a uid (G8).
-- The unique key includes observed_at so that the table can be partitioned by time.
CREATE TABLE IF NOT EXISTS outpost.readings (
    gateway_id  text NOT NULL,
    uid         uuid NOT NULL,
    observed_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    source      text NOT NULL,
    device      text NOT NULL,
    metric      text NOT NULL,
    value       double precision NOT NULL,
    unit        text,
    flags       integer NOT NULL DEFAULT 0,   -- 1 clock unsynchronised, 2 simulated, 4 backfilled, 8 clock corrected
    meta        jsonb,
    inserted_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT readings_unique UNIQUE (gateway_id, uid, observed_at)
){partition_by};
{default_partition}-- A device's recent readings; a gateway's last hour.
CREATE INDEX IF NOT EXISTS readings_device_time ON outpost.readings (device, metric, observed_at DESC);
CREATE INDEX IF NOT EXISTS readings_gateway_time ON outpost.readings (gateway_id, observed_at DESC);

-- Alert events (firing, reminder, resolved) as the gateways evaluated them.
CREATE TABLE IF NOT EXISTS outpost.alert_events (
    gateway_id  text NOT NULL,
    uid         uuid NOT NULL,
    rule        text NOT NULL,
    device      text,
    metric      text,
    kind        text NOT NULL,                -- firing, reminder or resolved
    severity    text,
    value       double precision,
    threshold   double precision,
    occurred_at timestamptz NOT NULL,
    message     jsonb,
    inserted_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT alert_events_unique UNIQUE (gateway_id, uid)
);
CREATE INDEX IF NOT EXISTS alert_events_gateway_time ON outpost.alert_events (gateway_id, occurred_at DESC);
CREATE INDEX IF NOT EXISTS alert_events_device_time ON outpost.alert_events (device, occurred_at DESC);
"
    )
}

/// Acknowledgements taken centrally (operators insert rows; each gateway picks up its
/// own on its sync rounds, applies them and sets `applied_at` and `result`), and who
/// acknowledged, with the note and channel, on `acknowledged` events. The new event
/// columns are nullable, so inserts that do not name them keep working.
fn migration_2(_: Layout) -> String {
    "\
-- Acknowledgements of firing alarms, inserted by operators; the gateway applies them.
CREATE TABLE IF NOT EXISTS outpost.alert_acks (
    id          bigserial PRIMARY KEY,
    gateway_id  text NOT NULL,
    rule        text NOT NULL,
    device      text,                         -- NULL: every firing series of the rule
    acked_by    text NOT NULL,
    note        text,                         -- at most 1,000 characters
    acked_at    timestamptz NOT NULL DEFAULT now(),   -- central's clock
    applied_at  timestamptz,                  -- set by the gateway; NULL: pending
    result      text                          -- applied, unknown alarm, already resolved,
                                              -- already acknowledged, or invalid: <why>
);
CREATE INDEX IF NOT EXISTS alert_acks_pending ON outpost.alert_acks (gateway_id, id) WHERE applied_at IS NULL;

-- Acknowledged events: who, their note, and the channel (cli, console or central);
-- escalated events name their step in `note`.
ALTER TABLE outpost.alert_events ADD COLUMN IF NOT EXISTS actor text;
ALTER TABLE outpost.alert_events ADD COLUMN IF NOT EXISTS note text;
ALTER TABLE outpost.alert_events ADD COLUMN IF NOT EXISTS channel text;
"
    .to_string()
}

fn record_version(m: &Migration) -> String {
    format!(
        "INSERT INTO outpost.schema_version (version, description) VALUES ({}, '{}') ON CONFLICT DO NOTHING;\n",
        m.version, m.description
    )
}

/// The first day of the month `offset` months from `day`'s month.
fn month_start(day: NaiveDate, offset: i32) -> NaiveDate {
    let index = day.year() * 12 + day.month0() as i32 + offset;
    NaiveDate::from_ymd_opt(index.div_euclid(12), index.rem_euclid(12) as u32 + 1, 1).unwrap_or(day)
}

/// `outpost.readings_y2025m01` for January 2025.
pub fn partition_name(month: NaiveDate) -> String {
    format!("readings_y{:04}m{:02}", month.year(), month.month())
}

fn bound(day: NaiveDate) -> String {
    format!("{} 00:00:00+00", day.format("%Y-%m-%d"))
}

/// The SQL `outpost central schema` prints: the whole schema at [`SCHEMA_VERSION`],
/// idempotent, in one transaction. For the partitioned layout it also creates the
/// partitions around `today` (see [`maintain`] for later months).
pub fn schema_sql(layout: Layout, today: NaiveDate) -> String {
    let mut sql = String::new();
    let name = match layout {
        Layout::Plain => "plain",
        Layout::Partitioned => "partitioned",
    };
    let _ = writeln!(
        sql,
        "-- Outpost central schema, version {SCHEMA_VERSION}, {name} layout (outpost {}).\n\
         -- Idempotent: safe to run again. `outpost central migrate` applies the same SQL.\n\
         BEGIN;\nSELECT pg_advisory_xact_lock({MIGRATION_LOCK});",
        env!("CARGO_PKG_VERSION")
    );
    sql.push_str(PREAMBLE);
    for m in MIGRATIONS {
        let _ = writeln!(sql, "\n-- Migration {}: {}", m.version, m.description);
        sql.push_str(&(m.sql)(layout));
        sql.push_str(&record_version(m));
    }
    if layout == Layout::Partitioned {
        sql.push_str("\n-- Monthly partitions around today; `outpost central maintain` adds the coming ones.\n");
        for offset in -DEFAULT_MONTHS_BACK..=DEFAULT_MONTHS_AHEAD {
            let from = month_start(today, offset);
            let to = month_start(today, offset + 1);
            let _ = writeln!(
                sql,
                "CREATE TABLE IF NOT EXISTS outpost.{} PARTITION OF outpost.readings FOR VALUES FROM ('{}') TO ('{}');",
                partition_name(from),
                bound(from),
                bound(to)
            );
        }
    }
    sql.push_str("COMMIT;\n");
    sql
}

/// Months before the current one that `maintain` makes sure exist.
pub const DEFAULT_MONTHS_BACK: i32 = 1;
/// Months after the current one that `maintain` makes sure exist.
pub const DEFAULT_MONTHS_AHEAD: i32 = 3;

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub from_version: i32,
    pub to_version: i32,
    pub partitioned: bool,
    pub partitions_created: Vec<String>,
}

pub async fn readings_is_partitioned(central: &Central) -> Result<Option<bool>, SyncError> {
    let rows = central
        .transaction(central.client().query_typed(
            "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'outpost' AND c.relname = 'readings'",
            &[],
        ))
        .await?;
    Ok(rows.first().and_then(|r| r.try_get::<_, bool>(0).ok()))
}

/// Applies every pending migration (idempotent). With [`Layout::Partitioned`] a new
/// `readings` table is partitioned and the partitions around today are created; an
/// existing plain table is left alone and reported (converting it is an operator's
/// decision, see docs/central.md).
pub async fn migrate(central: &Central, layout: Layout) -> Result<Migrated, SyncError> {
    let existing = readings_is_partitioned(central).await?;
    if layout == Layout::Partitioned && existing == Some(false) {
        return Err(SyncError::Database(
            "outpost.readings already exists without partitions; migrating it to the partitioned \
             layout means copying the data (see docs/central.md, \"Switching layouts\")"
                .into(),
        ));
    }
    let client = central.client();
    let from_version = central
        .transaction(async {
            client
                .batch_execute(&format!(
                    "SELECT pg_advisory_xact_lock({MIGRATION_LOCK}); {PREAMBLE}"
                ))
                .await?;
            let rows = client
                .query_typed(
                    "SELECT COALESCE(MAX(version), 0) FROM outpost.schema_version",
                    &[],
                )
                .await?;
            let found: i32 = rows.first().map(|r| r.get(0)).unwrap_or(0);
            for m in MIGRATIONS.iter().filter(|m| m.version > found) {
                client.batch_execute(&(m.sql)(layout)).await?;
                client.batch_execute(&record_version(m)).await?;
            }
            Ok(found)
        })
        .await?;
    if from_version > SCHEMA_VERSION {
        return Err(SyncError::SchemaTooNew {
            found: from_version,
            known: SCHEMA_VERSION,
        });
    }
    let partitioned = readings_is_partitioned(central).await? == Some(true);
    let partitions_created = if partitioned {
        maintain(
            central,
            Utc::now().date_naive(),
            DEFAULT_MONTHS_BACK,
            DEFAULT_MONTHS_AHEAD,
        )
        .await?
    } else {
        Vec::new()
    };
    Ok(Migrated {
        from_version,
        to_version: SCHEMA_VERSION.max(from_version),
        partitioned,
        partitions_created,
    })
}

/// Makes sure the monthly partitions from `months_back` months before `today`'s month
/// to `months_ahead` after it exist; returns the ones it created. Idempotent. Rows
/// already in the default partition for a new month are moved into it, in the same
/// transaction. Does nothing if `readings` is not partitioned.
pub async fn maintain(
    central: &Central,
    today: NaiveDate,
    months_back: i32,
    months_ahead: i32,
) -> Result<Vec<String>, SyncError> {
    match readings_is_partitioned(central).await? {
        None => {
            return Err(SyncError::SchemaMissing {
                target: central.target().to_string(),
            })
        }
        Some(false) => return Ok(Vec::new()),
        Some(true) => {}
    }
    let client = central.client();
    let mut created = Vec::new();
    for offset in -months_back..=months_ahead {
        let from = month_start(today, offset);
        let to = month_start(today, offset + 1);
        let name = partition_name(from);
        let qualified = format!("outpost.{name}");
        let made = central
            .transaction(async {
                client
                    .batch_execute(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
                    .await?;
                let exists = client
                    .query_typed("SELECT to_regclass($1) IS NOT NULL", &[(&qualified, Type::TEXT)])
                    .await?;
                if exists.first().map(|r| r.get::<_, bool>(0)).unwrap_or(false) {
                    return Ok(false);
                }
                // Create it detached, move the month's rows out of the default partition,
                // then attach: creating it attached would fail if the default partition
                // already holds rows of that month.
                let (lo, hi) = (bound(from), bound(to));
                client
                    .batch_execute(&format!(
                        "LOCK TABLE outpost.readings_default IN ACCESS EXCLUSIVE MODE;
                         CREATE TABLE {qualified} (LIKE outpost.readings INCLUDING DEFAULTS);
                         WITH moved AS (DELETE FROM outpost.readings_default
                                        WHERE observed_at >= '{lo}' AND observed_at < '{hi}' RETURNING *)
                           INSERT INTO {qualified} SELECT * FROM moved;
                         ALTER TABLE outpost.readings ATTACH PARTITION {qualified}
                           FOR VALUES FROM ('{lo}') TO ('{hi}');"
                    ))
                    .await?;
                Ok(true)
            })
            .await?;
        if made {
            created.push(name);
        }
    }
    Ok(created)
}

/// `outpost central …`.
#[derive(clap::Subcommand, Debug)]
pub enum CentralCommand {
    /// Print the central schema SQL (idempotent; for review or for `psql -f`).
    Schema {
        /// Partition `outpost.readings` by month (for large fleets; see docs/central.md).
        #[arg(long)]
        partitioned: bool,
    },
    /// Create or upgrade the central schema (directly or through PgBouncer).
    Migrate {
        #[command(flatten)]
        connection: ConnectionArgs,
        /// Partition `outpost.readings` by month (for large fleets; see docs/central.md).
        #[arg(long)]
        partitioned: bool,
    },
    /// Create the coming months' partitions (run daily from cron or a systemd timer).
    Maintain {
        #[command(flatten)]
        connection: ConnectionArgs,
        /// How many months ahead of the current one must exist.
        #[arg(long, default_value_t = DEFAULT_MONTHS_AHEAD)]
        months_ahead: i32,
    },
    /// Verify the gateways' hash chains in the central tables (docs/integrity.md): every
    /// link's rows, heads and signatures against the pinned keys. Exit 0 when all
    /// verify, 1 on damage.
    Verify {
        #[command(flatten)]
        connection: ConnectionArgs,
        /// Only this gateway (default: every gateway).
        #[arg(long, value_name = "ID")]
        gateway: Option<String>,
        /// Re-hash only the rows of links sealed at or after this time (RFC 3339, or a
        /// date); the links before are still chained.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        since: Option<chrono::DateTime<Utc>>,
        /// Stop at links sealed after this time.
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        until: Option<chrono::DateTime<Utc>>,
    },
}

/// `2026-03-01T12:00:00Z`, `2026-03-01 12:00`, or a date `2026-03-01` (midnight UTC).
pub fn parse_time(text: &str) -> Result<chrono::DateTime<Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc());
    }
    Err(format!(
        "{text:?}: expected a time like 2026-03-01T12:00:00Z or a date like 2026-03-01 (UTC)"
    ))
}

/// Where `outpost central migrate|maintain` connect: `[sync]` of the configuration, or
/// these options.
#[derive(clap::Args, Debug)]
pub struct ConnectionArgs {
    /// The database URL (default: `sync.url` of the configuration). A password may be
    /// given here or in the PGPASSWORD environment variable.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// disable, require, verify-ca or verify-full (default: `sync.sslmode`, else verify-full).
    #[arg(long, value_name = "MODE")]
    pub sslmode: Option<String>,
    /// PEM file with the CA certificate(s) (default: `sync.ca_file`).
    #[arg(long, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
}

/// Loads the configuration's `[sync]` section (the configuration's error as text).
pub type LoadSync<'a> = &'a dyn Fn() -> Result<Option<SyncConfig>, String>;

pub fn resolve_connection(
    config_path: &std::path::Path,
    load_sync: LoadSync<'_>,
    args: &ConnectionArgs,
) -> Result<ConnectOptions, String> {
    let configured = match load_sync() {
        Ok(sync) => sync,
        Err(errors) if args.url.is_none() => {
            return Err(format!(
                "{errors}\ncannot read sync.url from {}; fix it or pass --url",
                config_path.display()
            ))
        }
        Err(_) => None,
    };
    let mut sync = configured.unwrap_or_else(|| SyncConfig::with_url(""));
    if let Some(url) = &args.url {
        let parsed = parse_url_allowing_password(url).map_err(|e| format!("--url {e}"))?;
        if parsed.get_password().is_some() {
            sync.password = None;
        }
        sync.url = url.clone();
    }
    if sync.password.is_none() {
        if let Ok(p) = std::env::var("PGPASSWORD") {
            sync.password = Some(Secret::new(p));
        }
    }
    if sync.url.is_empty() {
        return Err(format!(
            "no central database: set [sync] url in {} or pass --url",
            config_path.display()
        ));
    }
    if let Some(mode) = &args.sslmode {
        sync.sslmode = match mode.as_str() {
            "disable" => SslMode::Disable,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "--sslmode {other:?}: expected disable, require, verify-ca or verify-full"
                ))
            }
        };
    }
    if let Some(ca) = &args.ca_file {
        sync.ca_file = Some(ca.clone());
    }
    let mut options = ConnectOptions::from_config(&sync, "central-admin");
    // DDL on a big table can take a while; the admin commands wait longer.
    options.statement_timeout = Duration::from_secs(3600);
    options.application_name = "outpost central".into();
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_roll_over_years() {
        let d = NaiveDate::from_ymd_opt(2025, 1, 17).unwrap();
        assert_eq!(month_start(d, 0).to_string(), "2025-01-01");
        assert_eq!(month_start(d, -1).to_string(), "2024-12-01");
        assert_eq!(month_start(d, 12).to_string(), "2026-01-01");
        assert_eq!(month_start(d, -13).to_string(), "2023-12-01");
        assert_eq!(partition_name(month_start(d, -1)), "readings_y2024m12");
    }

    #[test]
    fn printed_schema_is_complete_and_idempotent() {
        let d = NaiveDate::from_ymd_opt(2025, 1, 17).unwrap();
        let plain = schema_sql(Layout::Plain, d);
        for needle in [
            "CREATE SCHEMA IF NOT EXISTS outpost",
            "outpost.gateways",
            "UNIQUE (gateway_id, uid, observed_at)",
            "outpost.alert_events",
            "ON CONFLICT DO NOTHING",
            "pg_advisory_xact_lock",
        ] {
            assert!(plain.contains(needle), "{needle} missing");
        }
        assert!(!plain.contains("PARTITION"));
        // Every CREATE is idempotent.
        for line in plain.lines().filter(|l| l.starts_with("CREATE")) {
            assert!(
                line.contains("IF NOT EXISTS") || line.starts_with("CREATE OR REPLACE"),
                "{line}"
            );
        }
        let partitioned = schema_sql(Layout::Partitioned, d);
        assert!(partitioned.contains("PARTITION BY RANGE (observed_at)"));
        assert!(partitioned.contains("readings_default PARTITION OF outpost.readings DEFAULT"));
        assert!(partitioned.contains(
            "outpost.readings_y2024m12 PARTITION OF outpost.readings FOR VALUES FROM ('2024-12-01 00:00:00+00') TO ('2025-01-01 00:00:00+00')"
        ));
        assert!(partitioned.contains("readings_y2025m04"));
        assert!(!partitioned.contains("readings_y2025m05"));
    }
}
