//! Gap backfill from The Things Stack's Storage Integration.
//!
//! MQTT from The Things Stack is QoS 0: uplinks published while Outpost was not
//! connected are lost from MQTT, and so is any single uplink the broker or the network
//! drops while the connection stays up. The Storage Integration keeps them (24 hours on
//! The Things Network by default), so this task fetches
//! `GET {url}/api/v3/as/applications/{app}/packages/storage/uplink_message` with
//! `after`, `order=received_at`, a `limit` per page and a `field_mask` naming only the
//! fields Outpost reads. The body is newline-delimited JSON, one `{"result": {...}}` (or
//! `{"error": {...}}`) per line; it is streamed, mapped like live uplinks, and stored
//! with the BACKFILLED flag. Overlapping uplinks get the same uid as their live copy
//! and are stored once (G2).
//!
//! When it fetches ([`FetchReason`]):
//! - **reconnect**: at start-up and after every new MQTT connection, everything after
//!   the last stored uplink minus `overlap`;
//! - **gap**: after a batch of live uplinks could not be stored, from that batch on;
//! - **settle**: the Storage Integration writes in batches, so an uplink can be fetched
//!   only some time after The Things Stack received it (its documentation gives no
//!   figure). Uplinks from the last moments before a reconnect fetch may not be there
//!   yet, so `settle` after every reconnect fetch the same window is fetched once more,
//!   from the same cursor minus `overlap` (the gap is downloaded twice; duplicates are
//!   dropped);
//! - **reconcile**: while connected, every `reconcile_every`, the window since the
//!   previous reconciliation: from the newest uplink stored at that time minus
//!   max(`overlap`, `settle`), so an uplink that was not yet visible at one
//!   reconciliation is fetched at the next. Its start is kept in `source_state`
//!   (`ttn_reconcile_after`), so a restart does not skip the tail of the last run.
//!
//! Every fetch counts the readings it stored for the first time (duplicates of live
//! uplinks are not counted) per reason: `outpost_backfill_recovered_total` and the
//! `backfill.recovered.<reason>` rows in `source_state` that `outpost status` reads. A
//! site whose reconciliations keep recovering uplinks has a broker or network problem.
//!
//! The cursor (`source_state`, key `ttn_backfill_cursor`) only moves after the readings
//! before it have committed (G1). A missing integration (404), a refused key (401, an
//! ERROR: a person must make a new key), a key without rights (403), a timeout or an
//! unreachable server is logged (rate-limited) and retried with backoff and jitter;
//! live ingestion carries on meanwhile.
//!
//! **Queues and waits (G9).** The backfill task learns of reconnects and of the newest
//! committed mark through `watch` channels (never blocking the MQTT session) and of
//! gaps through a queue of 64 that the session's acker fills with `try_send` (never
//! waiting; a full queue already holds an earlier gap to fetch from). It waits for the
//! HTTP server, for room in the store's batch queue and for commits before moving its
//! cursor; nothing waits for it.

use super::{ApplicationUp, DecodeError, TtnConfig, Uplink, UplinkMapper};
use crate::backoff::Backoff;
use crate::model::{flags, Batch, Reading};
use crate::ratelimit::LogLimiter;
use crate::settings::{HumanDuration, Problems, Secret};
use crate::sources::{mqtt, SourceContext};
use crate::store::StoreError;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Where the cursor is kept in `source_state`.
pub const CURSOR_KEY: &str = "ttn_backfill_cursor";
/// Where the next reconciliation starts (`after`), kept in `source_state`.
pub const RECONCILE_KEY: &str = "ttn_reconcile_after";
/// `source_state` key prefix of the recovered totals, one row per [`FetchReason`].
const RECOVERED_PREFIX: &str = "backfill.recovered.";
/// `source_state` key of the last fetch that recovered anything (JSON).
const LAST_RECOVERY_KEY: &str = "backfill.last_recovery";
/// The fields Outpost reads of each stored uplink (paths rooted at `up`, the uplink
/// message; `end_device_ids` and the top-level `received_at` are always returned). The
/// rest (frm_payload, settings, session and network ids, correlation ids) is most of
/// a record's bytes.
const FIELD_MASK: &str = "up.uplink_message.f_port,up.uplink_message.f_cnt,\
up.uplink_message.received_at,up.uplink_message.decoded_payload,up.uplink_message.rx_metadata";
/// Uplinks committed per batch while backfilling.
const UPLINKS_PER_BATCH: usize = 500;
/// How often the live cursor is written to the database.
const PERSIST_EVERY: Duration = Duration::from_secs(30);

/// `[sources.backfill]` of a `ttn` source.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackfillConfig {
    /// Fetch missed uplinks from the Storage Integration (enable the integration for
    /// the application in The Things Stack first).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Base URL of The Things Stack's HTTP API. Default: `https://{broker.host}`.
    #[serde(default)]
    pub url: Option<String>,
    /// How far before the last stored uplink each fetch starts, so nothing on the edge
    /// is missed (the overlap is deduplicated).
    #[serde(default = "default_overlap")]
    pub overlap: HumanDuration,
    /// How far back the very first fetch goes (no uplink stored yet), at most 30d.
    #[serde(default = "default_initial_window")]
    pub initial_window: HumanDuration,
    /// Uplinks per request (1 to 10000); longer gaps are fetched page by page.
    #[serde(default = "default_page_limit")]
    pub page_limit: u32,
    /// A request fails when the server sends nothing for this long.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// After a failure the fetch is retried after a random wait between `retry_min` and
    /// a ceiling that starts at `retry_min` and doubles after each failure, up to
    /// `retry_max` (jitter, so a fleet does not retry in step).
    #[serde(default = "default_retry_min")]
    pub retry_min: HumanDuration,
    #[serde(default = "default_retry_max")]
    pub retry_max: HumanDuration,
    /// How long the Storage Integration may take to make an uplink retrievable (it
    /// writes in batches). Every fetch after a start or a reconnect is repeated once
    /// after this long, and reconciliation windows overlap by at least this much.
    #[serde(default = "default_settle")]
    pub settle: HumanDuration,
    /// While connected, fetch the window since the previous reconciliation this often, so
    /// an uplink MQTT (QoS 0) dropped while the connection stayed up is recovered too.
    /// `"0s"` turns it off.
    #[serde(default = "default_reconcile_every")]
    pub reconcile_every: HumanDuration,
    /// Ask the server only for the fields Outpost reads (`field_mask`), which makes
    /// each uplink several times smaller. Falls back to whole records by itself if the
    /// server refuses the mask (HTTP 400).
    #[serde(default = "yes")]
    pub field_mask: bool,
}

impl Default for BackfillConfig {
    fn default() -> Self {
        BackfillConfig {
            enabled: true,
            url: None,
            overlap: default_overlap(),
            initial_window: default_initial_window(),
            page_limit: default_page_limit(),
            timeout: default_timeout(),
            retry_min: default_retry_min(),
            retry_max: default_retry_max(),
            settle: default_settle(),
            reconcile_every: default_reconcile_every(),
            field_mask: true,
        }
    }
}

fn yes() -> bool {
    true
}
fn default_overlap() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_initial_window() -> HumanDuration {
    HumanDuration::from_secs(86_400)
}
fn default_page_limit() -> u32 {
    1000
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_retry_min() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_retry_max() -> HumanDuration {
    HumanDuration::from_secs(900)
}
fn default_settle() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_reconcile_every() -> HumanDuration {
    HumanDuration::from_secs(900)
}

impl BackfillConfig {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if let Some(url) = &self.url {
            if !(url.starts_with("https://") || url.starts_with("http://"))
                || url.contains(char::is_whitespace)
            {
                problems.push(
                    format!("{path}.url"),
                    format!("expected a URL like \"https://eu1.cloud.thethings.network\", found {url:?}"),
                );
            } else if reqwest::Url::parse(url).is_err() {
                problems.push(format!("{path}.url"), format!("{url:?} is not a valid URL"));
            }
        }
        if self.overlap.get() > Duration::from_secs(3600) {
            problems.push(format!("{path}.overlap"), "must be at most 1h");
        }
        if self.initial_window.get() > Duration::from_secs(30 * 86_400) {
            problems.push(format!("{path}.initial_window"), "must be at most 30d");
        }
        if !(1..=10_000).contains(&self.page_limit) {
            problems.push(
                format!("{path}.page_limit"),
                format!("must be between 1 and 10000, found {}", self.page_limit),
            );
        }
        let t = self.timeout.get();
        if t < Duration::from_secs(1) || t > Duration::from_secs(600) {
            problems.push(format!("{path}.timeout"), "must be between 1s and 10m");
        }
        if self.retry_min.get() < Duration::from_secs(1) {
            problems.push(format!("{path}.retry_min"), "must be at least 1s");
        }
        if self.retry_max < self.retry_min || self.retry_max.get() > Duration::from_secs(86_400) {
            problems.push(
                format!("{path}.retry_max"),
                "must be at least retry_min and at most 1d",
            );
        }
        let settle = self.settle.get();
        if settle < Duration::from_secs(1) || settle > Duration::from_secs(3600) {
            problems.push(
                format!("{path}.settle"),
                format!("must be between 1s and 1h, found {}", self.settle),
            );
        }
        let every = self.reconcile_every.get();
        if !every.is_zero()
            && (every < Duration::from_secs(1) || every > Duration::from_secs(86_400))
        {
            problems.push(
                format!("{path}.reconcile_every"),
                format!(
                    "must be \"0s\" (off) or between 1s and 1d (the Storage Integration keeps 24h on The Things Network), found {}",
                    self.reconcile_every
                ),
            );
        }
    }

    /// How far each settle re-fetch and reconciliation reaches back before the newest
    /// uplink seen at the time: max(`overlap`, `settle`).
    fn margin(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.overlap.get().max(self.settle.get())).unwrap_or_default()
    }

    /// `None` when reconciliation is off.
    fn reconcile_interval(&self) -> Option<Duration> {
        Some(self.reconcile_every.get()).filter(|d| !d.is_zero())
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(
        "The Things Stack refused the API key (HTTP 401): it is wrong, revoked or expired; \
         create a new API key for the application with the right \"Read application traffic \
         (uplink and downlink)\" and put it in api_key"
    )]
    KeyRefused,
    #[error(
        "the API key may not read the Storage Integration (HTTP 403); give it the right \
         \"Read application traffic (uplink and downlink)\""
    )]
    Forbidden,
    #[error(
        "the Storage Integration is not enabled for application {0:?}, or the application \
         does not exist (HTTP 404); enable it in the Console under Integrations → Storage Integration"
    )]
    NotFound(String),
    #[error("the server answered HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("no answer from the Storage Integration within {0}")]
    Timeout(HumanDuration),
    #[error("cannot reach the Storage Integration: {0}")]
    Network(String),
    #[error("the Storage Integration reported an error: {0}")]
    Remote(String),
    #[error("a line of the response is longer than {0} bytes")]
    LineTooLong(usize),
    #[error("the store did not accept backfilled readings: {0}")]
    Store(StoreError),
    #[error("shutting down")]
    Shutdown,
}

impl BackfillError {
    pub fn kind(&self) -> &'static str {
        match self {
            BackfillError::KeyRefused => "key_refused",
            BackfillError::Forbidden => "forbidden",
            BackfillError::NotFound(_) => "not_found",
            BackfillError::Http { .. } => "http",
            BackfillError::Timeout(_) => "timeout",
            BackfillError::Network(_) => "network",
            BackfillError::Remote(_) => "remote",
            BackfillError::LineTooLong(_) => "line_too_long",
            BackfillError::Store(_) => "store",
            BackfillError::Shutdown => "shutdown",
        }
    }

    /// Retrying alone will not help: a person must make a new key, give the key a right
    /// or enable the integration. Logged at ERROR rather than WARN.
    pub fn needs_a_person(&self) -> bool {
        matches!(
            self,
            BackfillError::KeyRefused | BackfillError::Forbidden | BackfillError::NotFound(_)
        )
    }
}

/// Counters of the backfill, for tests and status.
#[derive(Debug, Default)]
pub struct BackfillStats {
    pub fetches: AtomicU64,
    pub failures: AtomicU64,
    pub uplinks: AtomicU64,
    pub readings: AtomicU64,
}

/// One line of the Storage Integration's response.
#[derive(Deserialize)]
struct StorageLine<'a> {
    #[serde(default, borrow)]
    result: Option<ApplicationUp<'a>>,
    #[serde(default)]
    error: Option<Value>,
}

/// Why a fetch runs: the `reason` label of `outpost_backfill_recovered_total`. When
/// reasons are merged into one fetch, the first in this order names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FetchReason {
    /// Start-up or a new MQTT connection: the time Outpost was not connected.
    Reconnect,
    /// A batch of live uplinks could not be stored.
    Gap,
    /// The same window again, once the Storage Integration has written its last batch.
    Settle,
    /// The periodic check for uplinks MQTT dropped while connected.
    Reconcile,
}

impl FetchReason {
    pub const ALL: [FetchReason; 4] = [
        FetchReason::Reconnect,
        FetchReason::Gap,
        FetchReason::Settle,
        FetchReason::Reconcile,
    ];

    pub fn label(self) -> &'static str {
        match self {
            FetchReason::Reconnect => "reconnect",
            FetchReason::Gap => "gap",
            FetchReason::Settle => "settle",
            FetchReason::Reconcile => "reconcile",
        }
    }
}

/// A fetch waiting to run (reasons merged: the earliest start wins).
#[derive(Debug, Clone, PartialEq)]
struct Pending {
    from: DateTime<Utc>,
    reason: FetchReason,
    /// Fetch the window again after `settle` (a start or reconnect fetch).
    settle_after: bool,
    /// A reconciliation is part of it; on success the next one starts at this newest
    /// stored uplink (seen when it was queued) minus the margin.
    reconcile_mark: Option<Option<DateTime<Utc>>>,
}

impl Pending {
    fn merge(&mut self, other: Pending) {
        self.from = self.from.min(other.from);
        self.reason = self.reason.min(other.reason);
        self.settle_after |= other.settle_after;
        self.reconcile_mark = match (self.reconcile_mark, other.reconcile_mark) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
}

/// What one fetch did, also when it failed half-way.
#[derive(Debug, Default, Clone, Copy)]
pub struct FetchProgress {
    /// Uplinks received.
    pub uplinks: u64,
    /// Readings stored for the first time (not duplicates of live uplinks).
    pub recovered: u64,
    /// The newest NS `received_at` committed by this fetch.
    pub newest: Option<DateTime<Utc>>,
}

/// When to fetch what: the schedule of the backfill task, kept apart from I/O so its
/// timing is tested on its own.
#[derive(Debug)]
struct Plan {
    margin: chrono::Duration,
    settle: Duration,
    reconcile_every: Option<Duration>,
    pending: Option<Pending>,
    /// No attempt before this (backoff after a failure).
    retry_at: Option<Instant>,
    /// The settle re-fetch: when, and from where.
    settle_due: Option<(Instant, DateTime<Utc>)>,
    reconcile_due: Option<Instant>,
    /// Where the next reconciliation starts (`None` until the first fetch succeeded).
    reconcile_after: Option<DateTime<Utc>>,
}

impl Plan {
    fn new(config: &BackfillConfig, now: Instant, reconcile_after: Option<DateTime<Utc>>) -> Plan {
        let reconcile_every = config.reconcile_interval();
        Plan {
            margin: config.margin(),
            settle: config.settle.get(),
            reconcile_every,
            pending: None,
            retry_at: None,
            settle_due: None,
            reconcile_due: reconcile_every.map(|every| now + every),
            reconcile_after,
        }
    }

    fn want(&mut self, from: DateTime<Utc>, reason: FetchReason) {
        self.add(Pending {
            from,
            reason,
            settle_after: reason == FetchReason::Reconnect,
            reconcile_mark: None,
        });
    }

    fn add(&mut self, pending: Pending) {
        match &mut self.pending {
            Some(p) => p.merge(pending),
            None => self.pending = Some(pending),
        }
    }

    /// Queues the settle re-fetch and the reconciliation whose time has come. A
    /// reconciliation is skipped while disconnected (the reconnect fetches the gap; the
    /// next reconciliation still starts where this one would have).
    fn fire(&mut self, now: Instant, connected: bool, newest_stored: Option<DateTime<Utc>>) {
        if let Some((due, from)) = self.settle_due {
            if due <= now {
                self.settle_due = None;
                self.want(from, FetchReason::Settle);
            }
        }
        if let (Some(due), Some(every)) = (self.reconcile_due, self.reconcile_every) {
            if due <= now {
                self.reconcile_due = Some(now + every);
                if let (true, Some(after)) = (connected, self.reconcile_after) {
                    self.add(Pending {
                        from: after,
                        reason: FetchReason::Reconcile,
                        settle_after: false,
                        reconcile_mark: Some(newest_stored),
                    });
                }
            }
        }
    }

    /// The fetch to run now, if any.
    fn take_due(&mut self, now: Instant) -> Option<Pending> {
        if self.retry_at.is_some_and(|t| t > now) {
            return None;
        }
        self.retry_at = None;
        self.pending.take()
    }

    /// The next instant something becomes due (`None`: only an event wakes the task).
    fn next_wake(&self) -> Option<Instant> {
        let retry = self
            .pending
            .as_ref()
            .map(|_| self.retry_at.unwrap_or_else(Instant::now));
        [retry, self.settle_due.map(|(t, _)| t), self.reconcile_due]
            .into_iter()
            .flatten()
            .min()
    }

    /// A reconnect is a fresh reason to try at once.
    fn retry_now(&mut self) {
        self.retry_at = None;
    }

    fn succeeded(&mut self, done: Pending, progress: &FetchProgress, now: Instant) {
        if done.settle_after {
            // The same window again: the same cursor minus overlap.
            let from = self.settle_due.map_or(done.from, |(_, f)| f.min(done.from));
            self.settle_due = Some((now + self.settle, from));
        }
        if let Some(Some(mark)) = done.reconcile_mark {
            self.reconcile_after = Some(mark - self.margin);
        }
        if self.reconcile_after.is_none() {
            self.reconcile_after = Some(match progress.newest {
                Some(newest) => done.from.max(newest - self.margin),
                None => done.from,
            });
        }
    }

    /// Queues the failed fetch again (what committed before the failure is not
    /// fetched again) for `retry_at`.
    fn failed(&mut self, mut undone: Pending, progress: &FetchProgress, retry_at: Instant) {
        if let Some(newest) = progress.newest {
            undone.from = undone.from.max(newest - self.margin);
        }
        self.add(undone);
        self.retry_at = Some(retry_at);
    }
}

/// The backfill task of one `ttn` source.
pub struct Backfill {
    source: String,
    application: String,
    base_url: String,
    api_key: Secret,
    config: BackfillConfig,
    mapper: UplinkMapper,
    max_payload: usize,
    ctx: SourceContext,
    http: reqwest::Client,
    /// The server answered 400 to a request with `field_mask`: whole records from now on.
    mask_refused: AtomicBool,
    pub stats: Arc<BackfillStats>,
}

impl Backfill {
    pub fn new(
        config: &TtnConfig,
        mapper: UplinkMapper,
        ctx: SourceContext,
    ) -> anyhow::Result<Backfill> {
        let base_url = config
            .backfill
            .url
            .clone()
            .unwrap_or_else(|| format!("https://{}", config.broker.host.trim()));
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(config.backfill.timeout.get())
            .user_agent(concat!("outpost/", env!("CARGO_PKG_VERSION")));
        if base_url.starts_with("https://") {
            let recorder = ctx.cert_recorder(
                &config.backfill_endpoint().label,
                &crate::tls::url_peer(&base_url),
            );
            let tls =
                mqtt::tls_client_config(config.broker.ca_file.as_deref(), None, Some(recorder))
                    .map_err(|(key, e)| {
                        anyhow::anyhow!("source {}: broker.{key}: {e}", config.name)
                    })?;
            builder = builder.use_preconfigured_tls(tls);
        }
        let http = builder.build().map_err(|e| {
            anyhow::anyhow!("source {}: cannot set up the HTTP client: {e}", config.name)
        })?;
        Ok(Backfill {
            source: config.name.clone(),
            application: config.application.clone(),
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: config.api_key.clone(),
            config: config.backfill.clone(),
            mapper,
            max_payload: config.max_payload.0 as usize,
            ctx,
            http,
            mask_refused: AtomicBool::new(false),
            stats: Arc::new(BackfillStats::default()),
        })
    }

    /// Runs until shutdown: fetches at start-up, on every new connection (`connected`
    /// carries the committed mark at ConnAck), for every gap reported by the session,
    /// once more after `settle`, and every `reconcile_every` while connected.
    pub async fn run(
        self,
        mut connected: watch::Receiver<(u64, Option<DateTime<Utc>>)>,
        committed: watch::Receiver<Option<DateTime<Utc>>>,
        mut gaps: mpsc::Receiver<DateTime<Utc>>,
    ) {
        let overlap = chrono::Duration::from_std(self.config.overlap.get()).unwrap_or_default();
        let initial =
            chrono::Duration::from_std(self.config.initial_window.get()).unwrap_or_default();
        let mut cursor = self.load_time(CURSOR_KEY).await;
        let mut persisted = cursor;
        let clock = self.ctx.clock.clone();
        let start_of = |known: Option<DateTime<Utc>>| match known {
            Some(t) => t - overlap,
            None => clock.now() - initial,
        };
        // Not clamped with the local clock, which may be wrong at boot (G8); the server
        // keeps only its retention anyway.
        let saved_reconcile = self.load_time(RECONCILE_KEY).await;
        let mut reconcile_persisted = saved_reconcile;
        let mut plan = Plan::new(&self.config, Instant::now(), saved_reconcile);
        plan.want(start_of(cursor), FetchReason::Reconnect);
        let mut totals = self.load_recovered().await;
        let mut retry = Backoff::new(self.config.retry_min.get(), self.config.retry_max.get())
            .with_floor(self.config.retry_min.get());
        let mut persist = tokio::time::interval(PERSIST_EVERY);
        persist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut limiter = LogLimiter::new(Duration::from_secs(600));
        let mut last_kind = "";
        connected.borrow_and_update();
        loop {
            let newest_stored = cursor.max(*committed.borrow());
            plan.fire(Instant::now(), self.is_connected(), newest_stored);
            if let Some(job) = plan.take_due(Instant::now()) {
                self.stats.fetches.fetch_add(1, Relaxed);
                let mut progress = FetchProgress::default();
                let result = self.fetch_from(job.from, &mut cursor, &mut progress).await;
                self.count_recovered(job.reason, &progress, &mut totals)
                    .await;
                match result {
                    Ok(()) => {
                        // Worth an INFO line: something was missing, or a failure is over.
                        // A reconciliation that finds only duplicates is routine.
                        if progress.recovered > 0 || !last_kind.is_empty() {
                            tracing::info!(
                                source = %self.source,
                                reason = job.reason.label(),
                                uplinks = progress.uplinks,
                                recovered = progress.recovered,
                                after = %rfc3339(job.from),
                                "Backfilled uplinks from the Storage Integration."
                            );
                        } else {
                            tracing::debug!(
                                source = %self.source,
                                reason = job.reason.label(),
                                uplinks = progress.uplinks,
                                after = %rfc3339(job.from),
                                "Fetched from the Storage Integration; nothing was missing."
                            );
                        }
                        plan.succeeded(job, &progress, Instant::now());
                        retry.reset();
                        last_kind = "";
                    }
                    Err(BackfillError::Shutdown) => break,
                    Err(error) => {
                        self.stats.failures.fetch_add(1, Relaxed);
                        let delay = retry.next_delay();
                        // A new kind of failure is always reported; repeats are rate-limited.
                        let fresh = error.kind() != last_kind;
                        last_kind = error.kind();
                        let suppressed = if fresh { Some(0) } else { limiter.allow() };
                        if let Some(suppressed) = suppressed {
                            self.log_failure(&error, job.reason, delay, suppressed);
                        }
                        plan.failed(job, &progress, Instant::now() + delay);
                    }
                }
                if cursor != persisted {
                    persisted = cursor;
                    self.persist_time(CURSOR_KEY, cursor).await;
                }
                if plan.reconcile_after != reconcile_persisted {
                    reconcile_persisted = plan.reconcile_after;
                    self.persist_time(RECONCILE_KEY, reconcile_persisted).await;
                }
                continue;
            }
            let wake = plan.next_wake();
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => break,
                changed = connected.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let (generation, mark) = *connected.borrow_and_update();
                    if generation > 0 {
                        plan.want(start_of(cursor.max(mark)), FetchReason::Reconnect);
                        plan.retry_now();
                    }
                }
                Some(gap) = gaps.recv() => plan.want(gap - overlap, FetchReason::Gap),
                _ = sleep_until_some(wake) => {}
                _ = persist.tick() => {
                    let live = *committed.borrow();
                    cursor = cursor.max(live);
                    if cursor != persisted {
                        persisted = cursor;
                        self.persist_time(CURSOR_KEY, cursor).await;
                    }
                }
            }
        }
        let live = *committed.borrow();
        cursor = cursor.max(live);
        if cursor != persisted {
            self.persist_time(CURSOR_KEY, cursor).await;
        }
    }

    /// Connected to the broker (or not reported yet): reconciliations run only then.
    fn is_connected(&self) -> bool {
        self.ctx.metrics.connected(&self.source) != Some(false)
    }

    fn log_failure(
        &self,
        error: &BackfillError,
        reason: FetchReason,
        delay: Duration,
        suppressed: u64,
    ) {
        // The wait actually drawn (randomised), to the millisecond.
        let retry_in = humantime::format_duration(Duration::from_millis(delay.as_millis() as u64));
        if error.needs_a_person() {
            tracing::error!(
                source = %self.source,
                kind = error.kind(),
                reason = reason.label(),
                error = %error,
                retry_in = %retry_in,
                suppressed,
                "Backfill from the Storage Integration failed and will keep failing until the API key or the application is fixed; live uplinks are still stored, gaps are not filled. Will retry."
            );
        } else {
            tracing::warn!(
                source = %self.source,
                kind = error.kind(),
                reason = reason.label(),
                error = %error,
                retry_in = %retry_in,
                suppressed,
                "Backfill from the Storage Integration failed; live uplinks are still stored. Will retry."
            );
        }
    }

    /// Counts what a fetch recovered: `/metrics`, and the totals in `source_state` that
    /// `outpost status` reads.
    async fn count_recovered(
        &self,
        reason: FetchReason,
        progress: &FetchProgress,
        totals: &mut BTreeMap<FetchReason, u64>,
    ) {
        if progress.recovered == 0 {
            return;
        }
        self.ctx
            .metrics
            .backfill_recovered(&self.source, reason.label(), progress.recovered);
        let total = totals.entry(reason).or_insert(0);
        *total += progress.recovered;
        let last = serde_json::json!({
            "reason": reason.label(),
            "readings": progress.recovered,
            "at": rfc3339(self.ctx.clock.now()),
        });
        let rows = vec![
            (recovered_key(reason), total.to_string()),
            (LAST_RECOVERY_KEY.to_string(), last.to_string()),
        ];
        if let Err(e) = crate::store::state::write_rows(&self.ctx.store, &self.source, rows).await {
            tracing::debug!(source = %self.source, error = %e, "The backfill counts were not saved; they will be next time.");
        }
    }

    /// Fetches every uplink after `from`, page by page, and stores it. Moves `cursor`
    /// forward as batches commit; `progress` says what was done, also on failure.
    pub async fn fetch_from(
        &self,
        from: DateTime<Utc>,
        cursor: &mut Option<DateTime<Utc>>,
        progress: &mut FetchProgress,
    ) -> Result<(), BackfillError> {
        let mut after = from;
        loop {
            let page = self.fetch_page(after, cursor, progress).await?;
            if page.count < self.config.page_limit as u64 {
                return Ok(());
            }
            match page.last_received_at {
                Some(last) if last > after => after = last,
                _ => {
                    tracing::warn!(
                        source = %self.source,
                        after = %rfc3339(after),
                        "A full page of the Storage Integration did not advance in time; raise backfill.page_limit."
                    );
                    return Ok(());
                }
            }
        }
    }

    async fn fetch_page(
        &self,
        after: DateTime<Utc>,
        cursor: &mut Option<DateTime<Utc>>,
        progress: &mut FetchProgress,
    ) -> Result<Page, BackfillError> {
        let url = format!(
            "{}/api/v3/as/applications/{}/packages/storage/uplink_message",
            self.base_url, self.application
        );
        let limit = self.config.page_limit.to_string();
        let after_text = rfc3339(after);
        let response = loop {
            let masked = self.config.field_mask && !self.mask_refused.load(Relaxed);
            let mut query = vec![
                ("after", after_text.as_str()),
                ("order", "received_at"),
                ("limit", limit.as_str()),
            ];
            if masked {
                query.push(("field_mask", FIELD_MASK));
            }
            let request = self
                .http
                .get(&url)
                .query(&query)
                .bearer_auth(self.api_key.expose())
                .header(reqwest::header::ACCEPT, "text/event-stream");
            let response = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return Err(BackfillError::Shutdown),
                r = request.send() => r.map_err(|e| self.http_error(e))?,
            };
            if masked && response.status().as_u16() == 400 {
                // An older or different server may not know a path of the mask: whole
                // records cost more bytes but lose nothing.
                let body = response.text().await.unwrap_or_default();
                self.mask_refused.store(true, Relaxed);
                tracing::warn!(
                    source = %self.source,
                    answer = %body.chars().take(200).collect::<String>(),
                    "The Storage Integration refused the field_mask (HTTP 400); fetching whole records from now on (more bytes per fetch)."
                );
                continue;
            }
            break response;
        };
        let status = response.status().as_u16();
        match status {
            200..=299 => {}
            401 => return Err(BackfillError::KeyRefused),
            403 => return Err(BackfillError::Forbidden),
            404 => return Err(BackfillError::NotFound(self.application.clone())),
            _ => {
                let body = response.text().await.unwrap_or_default();
                return Err(BackfillError::Http {
                    status,
                    body: body.chars().take(200).collect(),
                });
            }
        }
        let mut stream = response.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        let mut page = Page::default();
        let mut chunk = Chunk::default();
        let max_line = self.max_payload + 64;
        loop {
            let next = tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return Err(BackfillError::Shutdown),
                next = stream.next() => next,
            };
            let bytes = match next {
                Some(Ok(bytes)) => bytes,
                Some(Err(e)) => {
                    // Keep what was complete before the failure.
                    self.commit(&mut chunk, cursor, progress).await?;
                    return Err(self.http_error(e));
                }
                None => break,
            };
            buffer.extend_from_slice(&bytes);
            while let Some(pos) = buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=pos).collect();
                self.take_line(&line, &mut page, &mut chunk, progress)?;
                if chunk.uplinks >= UPLINKS_PER_BATCH {
                    self.commit(&mut chunk, cursor, progress).await?;
                }
            }
            if buffer.len() > max_line {
                self.commit(&mut chunk, cursor, progress).await?;
                return Err(BackfillError::LineTooLong(max_line));
            }
        }
        let rest = std::mem::take(&mut buffer);
        self.take_line(&rest, &mut page, &mut chunk, progress)?;
        self.commit(&mut chunk, cursor, progress).await?;
        Ok(page)
    }

    /// Parses one line into the current chunk.
    fn take_line(
        &self,
        line: &[u8],
        page: &mut Page,
        chunk: &mut Chunk,
        progress: &mut FetchProgress,
    ) -> Result<(), BackfillError> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(());
        }
        // Server-sent-event framing, in case a proxy adds it.
        let line = line
            .strip_prefix(b"data:")
            .map(<[u8]>::trim_ascii)
            .unwrap_or(line);
        let parsed: Result<StorageLine, DecodeError> =
            serde_json::from_slice(line).map_err(|e| DecodeError::from_json(e, line));
        let up = match parsed {
            Ok(StorageLine { error: Some(e), .. }) => {
                let message = e
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or_else(|| e.to_string());
                return Err(BackfillError::Remote(message.chars().take(300).collect()));
            }
            Ok(StorageLine {
                result: Some(up), ..
            }) => up,
            Ok(_) => {
                // Neither an uplink nor an error: garbage like any other, kept for diagnosis.
                self.reject(
                    "no_result",
                    "a record with neither \"result\" nor \"error\"",
                    line,
                );
                return Ok(());
            }
            Err(e) => {
                self.reject(e.reason(), &e.to_string(), line);
                return Ok(());
            }
        };
        page.count += 1;
        progress.uplinks += 1;
        self.stats.uplinks.fetch_add(1, Relaxed);
        let uplink = match Uplink::from_message(up, "") {
            Ok(u) => u,
            Err(e) => {
                self.reject(e.reason(), &e.to_string(), line);
                return Ok(());
            }
        };
        let position = uplink.as_received_at.unwrap_or(uplink.ns_received_at);
        page.last_received_at = Some(page.last_received_at.map_or(position, |p| p.max(position)));
        chunk.uplinks += 1;
        chunk.max_mark = Some(
            chunk
                .max_mark
                .map_or(uplink.ns_received_at, |m| m.max(uplink.ns_received_at)),
        );
        match self
            .mapper
            .readings(&uplink, self.ctx.clock.now(), flags::BACKFILLED)
        {
            Ok(readings) => chunk.readings.extend(readings),
            Err(r) if r.record => self.reject(r.reason, &r.detail, line),
            Err(_) => {}
        }
        Ok(())
    }

    fn reject(&self, reason: &'static str, detail: &str, line: &[u8]) {
        self.ctx.metrics.rejected(&self.source, reason);
        self.ctx
            .store
            .record_rejected(&self.source, reason, &format!("backfill: {detail}"), line);
    }

    /// Stores the chunk and waits for its commit, then moves the cursor.
    async fn commit(
        &self,
        chunk: &mut Chunk,
        cursor: &mut Option<DateTime<Utc>>,
        progress: &mut FetchProgress,
    ) -> Result<(), BackfillError> {
        let chunk = std::mem::take(chunk);
        if chunk.uplinks == 0 {
            return Ok(());
        }
        self.stats
            .readings
            .fetch_add(chunk.readings.len() as u64, Relaxed);
        self.ctx
            .metrics
            .received(&self.source, chunk.readings.len() as u64);
        let (batch, ack) = Batch::with_ack(chunk.readings);
        if self.ctx.out.send(batch).await.is_err() {
            return Err(BackfillError::Shutdown);
        }
        match ack.await {
            Ok(Ok(committed)) => {
                *cursor = (*cursor).max(chunk.max_mark);
                progress.recovered += committed.inserted as u64;
                progress.newest = progress.newest.max(chunk.max_mark);
                Ok(())
            }
            Ok(Err(StoreError::Closed)) | Err(_) => Err(BackfillError::Shutdown),
            Ok(Err(e)) => Err(BackfillError::Store(e)),
        }
    }

    fn http_error(&self, e: reqwest::Error) -> BackfillError {
        if e.is_timeout() {
            return BackfillError::Timeout(self.config.timeout);
        }
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        // hyper reports a read timeout as a plain I/O error in the chain.
        if text.contains("timed out") {
            return BackfillError::Timeout(self.config.timeout);
        }
        BackfillError::Network(text.replace(self.api_key.expose(), "<redacted>"))
    }

    /// A time kept in `source_state` under `key`.
    async fn load_time(&self, key: &'static str) -> Option<DateTime<Utc>> {
        let store = self.ctx.store.clone();
        let source = self.source.clone();
        tokio::task::spawn_blocking(move || {
            let conn = store.reader().ok()?;
            let value = crate::store::state::read_state(&conn, &source, key).ok()??;
            DateTime::parse_from_rfc3339(&value)
                .ok()
                .map(|t| t.with_timezone(&Utc))
        })
        .await
        .ok()
        .flatten()
    }

    /// The recovered totals of earlier runs, so status shows the source's whole history.
    async fn load_recovered(&self) -> BTreeMap<FetchReason, u64> {
        let store = self.ctx.store.clone();
        let source = self.source.clone();
        tokio::task::spawn_blocking(move || {
            let mut totals = BTreeMap::new();
            let Ok(conn) = store.reader() else {
                return totals;
            };
            for reason in FetchReason::ALL {
                let value = crate::store::state::read_state(&conn, &source, &recovered_key(reason));
                if let Some(n) = value.ok().flatten().and_then(|v| v.parse::<u64>().ok()) {
                    totals.insert(reason, n);
                }
            }
            totals
        })
        .await
        .unwrap_or_default()
    }

    async fn persist_time(&self, key: &'static str, value: Option<DateTime<Utc>>) {
        let Some(value) = value else { return };
        let rows = vec![(key.to_string(), rfc3339(value))];
        if let Err(e) = crate::store::state::write_rows(&self.ctx.store, &self.source, rows).await {
            tracing::debug!(source = %self.source, key, error = %e, "Backfill state was not saved; it will be next time.");
        }
    }
}

#[derive(Default)]
struct Page {
    count: u64,
    last_received_at: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct Chunk {
    readings: Vec<Reading>,
    uplinks: usize,
    max_mark: Option<DateTime<Utc>>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn recovered_key(reason: FetchReason) -> String {
    format!("{RECOVERED_PREFIX}{}", reason.label())
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the backfill of one `ttn` source recovered, for `outpost status` (read from
/// `source_state`, so it works while the agent runs or not).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RecoveryStatus {
    pub source: String,
    /// Readings stored for the first time, by [`FetchReason`] label.
    pub recovered: BTreeMap<String, u64>,
    /// The last fetch that recovered anything: `{"reason", "readings", "at"}`.
    pub last: Option<Value>,
}

impl RecoveryStatus {
    pub fn total(&self) -> u64 {
        self.recovered.values().sum()
    }

    /// One line for `outpost status`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = FetchReason::ALL
            .iter()
            .filter_map(|r| {
                let n = self.recovered.get(r.label()).copied().unwrap_or(0);
                (n > 0).then(|| format!("{} {n}", r.label()))
            })
            .collect();
        let mut line = format!(
            "Source {}: the Storage Integration backfill recovered {} readings MQTT did not deliver ({})",
            self.source,
            self.total(),
            parts.join(", ")
        );
        if let Some(last) = &self.last {
            let text = |k: &str| {
                last.get(k)
                    .map(|v| v.to_string().trim_matches('"').to_string())
            };
            if let (Some(n), Some(reason), Some(at)) =
                (text("readings"), text("reason"), text("at"))
            {
                line.push_str(&format!("; last {n} by {reason} at {at}"));
            }
        }
        if self.recovered.get("reconcile").copied().unwrap_or(0) > 0 {
            line.push_str(
                "; uplinks recovered by reconciliation were dropped while connected: \
                 a broker or network problem worth looking at if it keeps growing",
            );
        }
        line
    }
}

/// The recovered counts of every source that has any.
pub fn recovery_status(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<RecoveryStatus>> {
    let mut stmt = conn.prepare(
        "SELECT source, key, value FROM source_state WHERE key LIKE 'backfill.%' ORDER BY source, key",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut out: Vec<RecoveryStatus> = Vec::new();
    for (source, key, value) in rows {
        if out.last().map(|s| s.source != source).unwrap_or(true) {
            out.push(RecoveryStatus {
                source: source.clone(),
                ..RecoveryStatus::default()
            });
        }
        let Some(entry) = out.last_mut() else {
            continue;
        };
        if let Some(reason) = key.strip_prefix(RECOVERED_PREFIX) {
            if let Ok(n) = value.parse::<u64>() {
                entry.recovered.insert(reason.to_string(), n);
            }
        } else if key == LAST_RECOVERY_KEY {
            entry.last = serde_json::from_str(&value).ok();
        }
    }
    out.retain(|s| s.total() > 0);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let mut c = BackfillConfig::default();
        let mut p = Problems::default();
        c.validate("b", &mut p);
        assert!(p.0.is_empty());
        c.reconcile_every = HumanDuration::from_secs(0);
        c.validate("b", &mut p);
        assert!(p.0.is_empty(), "\"0s\" turns reconciliation off");
        c.url = Some("eu1.cloud.thethings.network".into());
        c.overlap = HumanDuration::from_secs(7200);
        c.initial_window = HumanDuration::from_secs(90 * 86_400);
        c.page_limit = 0;
        c.timeout = HumanDuration::from_millis(10);
        c.retry_min = HumanDuration::from_millis(10);
        c.retry_max = HumanDuration::from_millis(5);
        c.settle = HumanDuration::from_secs(7200);
        c.reconcile_every = HumanDuration::from_millis(500);
        let mut p = Problems::default();
        c.validate("b", &mut p);
        let keys: Vec<_> = p.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "b.url",
                "b.overlap",
                "b.initial_window",
                "b.page_limit",
                "b.timeout",
                "b.retry_min",
                "b.retry_max",
                "b.settle",
                "b.reconcile_every"
            ]
        );
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn config(settle: u64, reconcile_every: u64) -> BackfillConfig {
        BackfillConfig {
            overlap: HumanDuration::from_secs(60),
            settle: HumanDuration::from_secs(settle),
            reconcile_every: HumanDuration::from_secs(reconcile_every),
            ..BackfillConfig::default()
        }
    }

    fn progress(newest: Option<DateTime<Utc>>) -> FetchProgress {
        FetchProgress {
            uplinks: 1,
            recovered: 1,
            newest,
        }
    }

    #[test]
    fn a_reconnect_fetch_is_repeated_once_after_settle() {
        let now = Instant::now();
        let mut plan = Plan::new(&config(90, 0), now, None);
        let gap_start = at("2026-12-04T10:00:00Z");
        plan.want(gap_start, FetchReason::Reconnect);
        let job = plan.take_due(now).unwrap();
        assert_eq!((job.from, job.reason), (gap_start, FetchReason::Reconnect));
        assert!(plan.take_due(now).is_none());
        // The fetch found uplinks up to 10:20; the settle re-fetch asks for the same
        // window again.
        plan.succeeded(job, &progress(Some(at("2026-12-04T10:20:00Z"))), now);
        assert_eq!(plan.next_wake(), Some(now + Duration::from_secs(90)));
        plan.fire(now + Duration::from_secs(89), true, None);
        assert!(plan.take_due(now + Duration::from_secs(89)).is_none());
        plan.fire(now + Duration::from_secs(90), true, None);
        let settle = plan.take_due(now + Duration::from_secs(90)).unwrap();
        assert_eq!(
            (settle.from, settle.reason),
            (gap_start, FetchReason::Settle)
        );
        // Once: a settle fetch is not followed by another.
        plan.succeeded(settle, &progress(None), now + Duration::from_secs(91));
        assert_eq!(plan.next_wake(), None, "reconciliation is off");

        // Two reconnects before the Storage Integration settled: one re-fetch, from the
        // earlier start, after the later fetch has settled.
        plan.want(gap_start, FetchReason::Reconnect);
        let job = plan.take_due(now).unwrap();
        plan.succeeded(job, &FetchProgress::default(), now);
        let later = now + Duration::from_secs(30);
        plan.want(at("2026-12-04T10:30:00Z"), FetchReason::Reconnect);
        let job = plan.take_due(later).unwrap();
        plan.succeeded(job, &FetchProgress::default(), later);
        plan.fire(now + Duration::from_secs(90), true, None);
        assert!(plan.take_due(now + Duration::from_secs(90)).is_none());
        plan.fire(later + Duration::from_secs(90), true, None);
        let settle = plan.take_due(later + Duration::from_secs(90)).unwrap();
        assert_eq!(
            (settle.from, settle.reason),
            (gap_start, FetchReason::Settle)
        );
        assert!(plan.take_due(later + Duration::from_secs(200)).is_none());
    }

    #[test]
    fn reconciliation_fetches_the_window_since_the_previous_one() {
        let now = Instant::now();
        let mut plan = Plan::new(&config(30, 600), now, None);
        plan.want(at("2026-12-04T09:00:00Z"), FetchReason::Reconnect);
        let job = plan.take_due(now).unwrap();
        plan.succeeded(job, &progress(Some(at("2026-12-04T10:00:00Z"))), now);
        // Before any reconciliation ran, the first starts where the start-up fetch's
        // newest uplink minus the margin (max(60s, 30s)) is.
        assert_eq!(plan.reconcile_after, Some(at("2026-12-04T09:59:00Z")));
        let settle_time = now + Duration::from_secs(30);
        plan.fire(settle_time, true, None);
        let settle = plan.take_due(settle_time).unwrap();
        plan.succeeded(settle, &progress(None), settle_time);

        let t1 = now + Duration::from_secs(600);
        assert_eq!(plan.next_wake(), Some(t1));
        plan.fire(t1, true, Some(at("2026-12-04T10:10:00Z")));
        let first = plan.take_due(t1).unwrap();
        assert_eq!(
            (first.from, first.reason),
            (at("2026-12-04T09:59:00Z"), FetchReason::Reconcile)
        );
        plan.succeeded(first, &progress(None), t1);
        assert_eq!(plan.reconcile_after, Some(at("2026-12-04T10:09:00Z")));

        // Disconnected at the next tick: skipped, and the window is kept for later.
        let t2 = t1 + Duration::from_secs(600);
        plan.fire(t2, false, Some(at("2026-12-04T10:20:00Z")));
        assert!(plan.take_due(t2).is_none());
        let t3 = t2 + Duration::from_secs(600);
        assert_eq!(plan.next_wake(), Some(t3));
        plan.fire(t3, true, Some(at("2026-12-04T10:30:00Z")));
        let third = plan.take_due(t3).unwrap();
        assert_eq!(third.from, at("2026-12-04T10:09:00Z"));

        // A failed reconciliation keeps its window (minus what committed) for the retry.
        plan.failed(
            third,
            &progress(Some(at("2026-12-04T10:15:00Z"))),
            t3 + Duration::from_secs(5),
        );
        assert!(plan.take_due(t3 + Duration::from_secs(4)).is_none());
        let retry = plan.take_due(t3 + Duration::from_secs(5)).unwrap();
        assert_eq!(
            (retry.from, retry.reason),
            (at("2026-12-04T10:14:00Z"), FetchReason::Reconcile)
        );
        plan.succeeded(retry, &progress(None), t3 + Duration::from_secs(5));
        assert_eq!(plan.reconcile_after, Some(at("2026-12-04T10:29:00Z")));
    }

    #[test]
    fn merged_fetches_start_at_the_earliest_and_keep_every_duty() {
        let now = Instant::now();
        let mut plan = Plan::new(&config(60, 600), now, Some(at("2026-12-04T08:00:00Z")));
        plan.fire(
            now + Duration::from_secs(600),
            true,
            Some(at("2026-12-04T09:00:00Z")),
        );
        plan.want(at("2026-12-04T08:30:00Z"), FetchReason::Reconnect);
        let job = plan.take_due(now).unwrap();
        assert_eq!(job.from, at("2026-12-04T08:00:00Z"));
        assert_eq!(job.reason, FetchReason::Reconnect);
        assert!(job.settle_after);
        assert_eq!(job.reconcile_mark, Some(Some(at("2026-12-04T09:00:00Z"))));
    }

    #[test]
    fn reconcile_every_0s_never_reconciles() {
        let now = Instant::now();
        let mut plan = Plan::new(&config(60, 0), now, Some(at("2026-12-04T08:00:00Z")));
        plan.fire(now + Duration::from_secs(86_400 * 7), true, None);
        assert!(plan
            .take_due(now + Duration::from_secs(86_400 * 7))
            .is_none());
        assert_eq!(plan.next_wake(), None);
    }

    #[test]
    fn recovery_status_reads_what_the_task_wrote() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(
            r#"CREATE TABLE source_state (source TEXT, key TEXT, value TEXT);
            INSERT INTO source_state VALUES
              ('lora', 'backfill.recovered.reconnect', '30'),
              ('lora', 'backfill.recovered.reconcile', '2'),
              ('lora', 'backfill.last_recovery', '{"reason":"reconcile","readings":2,"at":"2026-12-04T10:00:00Z"}'),
              ('lora', 'ttn_backfill_cursor', '2026-12-04T10:00:00Z'),
              ('quiet', 'backfill.recovered.settle', '0'),
              ('odd', 'backfill.recovered.settle', 'many');"#,
        )
        .unwrap();
        let status = recovery_status(&conn).unwrap();
        assert_eq!(status.len(), 1, "{status:?}");
        assert_eq!(status[0].total(), 32);
        let line = status[0].describe();
        assert!(
            line.starts_with(
                "Source lora: the Storage Integration backfill recovered 32 readings MQTT did not \
                 deliver (reconnect 30, reconcile 2); last 2 by reconcile at 2026-12-04T10:00:00Z"
            ),
            "{line}"
        );
        assert!(line.contains("broker or network problem"), "{line}");
    }

    #[test]
    fn a_refused_key_and_a_missing_right_get_their_own_advice() {
        let refused = BackfillError::KeyRefused.to_string();
        assert!(refused.contains("HTTP 401") && refused.contains("create a new API key"));
        let forbidden = BackfillError::Forbidden.to_string();
        assert!(forbidden.contains("HTTP 403") && forbidden.contains("give it the right"));
        assert!(!forbidden.contains("new API key"));
        assert!(BackfillError::KeyRefused.needs_a_person());
        assert!(!BackfillError::Timeout(HumanDuration::from_secs(1)).needs_a_person());
    }

    #[test]
    fn timestamps_round_trip() {
        let t = DateTime::parse_from_rfc3339("2026-11-26T03:14:07.705112233Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(rfc3339(t), "2026-11-26T03:14:07.705112233Z");
    }
}
