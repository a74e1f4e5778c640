//! Gap backfill from The Things Stack's Storage Integration.
//!
//! MQTT from The Things Stack is QoS 0: uplinks published while Outpost was not
//! connected are lost from MQTT. The Storage Integration keeps them (24 hours on The
//! Things Network by default), so at start-up, after every reconnect and after a batch
//! could not be stored, this task fetches
//! `GET {url}/api/v3/as/applications/{app}/packages/storage/uplink_message` with
//! `after` = the last stored NS `received_at` minus `overlap`, `order=received_at` and a
//! `limit` per page. The body is newline-delimited JSON, one `{"result": {...}}` (or
//! `{"error": {...}}`) per line; it is streamed, mapped like live uplinks, and stored
//! with the BACKFILLED flag. Overlapping uplinks get the same uid as their live copy
//! and are stored once (G2).
//!
//! The cursor (`source_state`, key `ttn_backfill_cursor`) only moves after the readings
//! before it have committed (G1). A missing integration (404), a key without rights
//! (401/403), a timeout or an unreachable server is logged (rate-limited) and retried
//! with backoff; live ingestion carries on meanwhile.
//!
//! **Queues and waits (G9).** The backfill task learns of reconnects and of the newest
//! committed mark through `watch` channels (never blocking the MQTT session) and of
//! gaps through a queue of 64 that the session's acker fills with `try_send` (never
//! waiting; a full queue already holds an earlier gap to fetch from). It waits for the
//! HTTP server, for room in the store's batch queue and for commits before moving its
//! cursor; nothing waits for it.

use super::mqtt_client;
use super::ttn::{ApplicationUp, DecodeError, TtnConfig, Uplink, UplinkMapper};
use super::SourceContext;
use crate::backoff::Backoff;
use crate::config::{HumanDuration, Problems, Secret};
use crate::model::{flags, Batch, Reading};
use crate::ratelimit::LogLimiter;
use crate::store::StoreError;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Where the cursor is kept in `source_state`.
pub const CURSOR_KEY: &str = "ttn_backfill_cursor";
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
    /// After a failure the fetch is retried after `retry_min`, doubling up to `retry_max`.
    #[serde(default = "default_retry_min")]
    pub retry_min: HumanDuration,
    #[serde(default = "default_retry_max")]
    pub retry_max: HumanDuration,
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
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error(
        "the API key may not read the Storage Integration (HTTP {0}); give it the right \
         \"Read application traffic (uplink and downlink)\""
    )]
    Unauthorized(u16),
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
            BackfillError::Unauthorized(_) => "unauthorized",
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
struct StorageLine {
    #[serde(default)]
    result: Option<ApplicationUp>,
    #[serde(default)]
    error: Option<Value>,
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
            let recorder = ctx.store.cert_recorder(
                &format!("sources.{}.backfill", config.name),
                &crate::tls::url_peer(&base_url),
            );
            let tls = mqtt_client::tls_client_config(
                config.broker.ca_file.as_deref(),
                None,
                Some(recorder),
            )
            .map_err(|(key, e)| anyhow::anyhow!("source {}: broker.{key}: {e}", config.name))?;
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
            stats: Arc::new(BackfillStats::default()),
        })
    }

    /// Runs until shutdown: fetches at start-up, on every new connection (`connected`
    /// carries the committed mark at ConnAck) and for every gap reported by the session.
    pub async fn run(
        self,
        mut connected: watch::Receiver<(u64, Option<DateTime<Utc>>)>,
        committed: watch::Receiver<Option<DateTime<Utc>>>,
        mut gaps: mpsc::Receiver<DateTime<Utc>>,
    ) {
        let overlap = chrono::Duration::from_std(self.config.overlap.get()).unwrap_or_default();
        let initial =
            chrono::Duration::from_std(self.config.initial_window.get()).unwrap_or_default();
        let mut cursor = self.load_cursor().await;
        let mut persisted = cursor;
        let start_of = |known: Option<DateTime<Utc>>| match known {
            Some(t) => t - overlap,
            None => crate::clock::now() - initial,
        };
        let mut wanted = Some(start_of(cursor));
        let mut retry = Backoff::new(self.config.retry_min.get(), self.config.retry_max.get())
            .with_floor(self.config.retry_min.get());
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut persist = tokio::time::interval(PERSIST_EVERY);
        persist.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut limiter = LogLimiter::new(Duration::from_secs(600));
        let mut last_kind = "";
        connected.borrow_and_update();
        loop {
            let due = retry_at.map_or(true, |t| t <= tokio::time::Instant::now());
            if let (Some(from), true) = (wanted, due) {
                self.stats.fetches.fetch_add(1, Relaxed);
                match self.fetch_from(from, &mut cursor).await {
                    Ok(uplinks) => {
                        if uplinks > 0 || !last_kind.is_empty() {
                            tracing::info!(
                                source = %self.source,
                                uplinks,
                                after = %rfc3339(from),
                                "Backfilled uplinks from the Storage Integration."
                            );
                        }
                        wanted = None;
                        retry.reset();
                        retry_at = None;
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
                            tracing::warn!(
                                source = %self.source,
                                kind = error.kind(),
                                error = %error,
                                retry_in = %humantime::format_duration(Duration::from_secs(delay.as_secs())),
                                suppressed,
                                "Backfill from the Storage Integration failed; live uplinks are still stored. Will retry."
                            );
                        }
                        // Whatever was committed before the failure need not be fetched again.
                        wanted = Some(match cursor {
                            Some(c) if c - overlap > from => c - overlap,
                            _ => from,
                        });
                        retry_at = Some(tokio::time::Instant::now() + delay);
                    }
                }
                if cursor != persisted {
                    persisted = cursor;
                    self.persist(cursor).await;
                }
            }
            let sleep_until = retry_at
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(86_400));
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => break,
                changed = connected.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let (generation, mark) = *connected.borrow_and_update();
                    if generation > 0 {
                        let known = cursor.max(mark);
                        let from = start_of(known);
                        wanted = Some(wanted.map_or(from, |w| w.min(from)));
                        // A reconnect is a fresh reason to try at once.
                        retry_at = None;
                    }
                }
                Some(gap) = gaps.recv() => {
                    let from = gap - overlap;
                    wanted = Some(wanted.map_or(from, |w| w.min(from)));
                }
                _ = tokio::time::sleep_until(sleep_until), if retry_at.is_some() => {}
                _ = persist.tick() => {
                    let live = *committed.borrow();
                    cursor = cursor.max(live);
                    if cursor != persisted {
                        persisted = cursor;
                        self.persist(cursor).await;
                    }
                }
            }
        }
        let live = *committed.borrow();
        cursor = cursor.max(live);
        if cursor != persisted {
            self.persist(cursor).await;
        }
    }

    /// Fetches every uplink after `from`, page by page, and stores it. Moves `cursor`
    /// forward as batches commit. Returns the number of uplinks received.
    pub async fn fetch_from(
        &self,
        from: DateTime<Utc>,
        cursor: &mut Option<DateTime<Utc>>,
    ) -> Result<u64, BackfillError> {
        let mut after = from;
        let mut total = 0u64;
        loop {
            let page = self.fetch_page(after, cursor).await?;
            total += page.count;
            if page.count < self.config.page_limit as u64 {
                return Ok(total);
            }
            match page.last_received_at {
                Some(last) if last > after => after = last,
                _ => {
                    tracing::warn!(
                        source = %self.source,
                        after = %rfc3339(after),
                        "A full page of the Storage Integration did not advance in time; raise backfill.page_limit."
                    );
                    return Ok(total);
                }
            }
        }
    }

    async fn fetch_page(
        &self,
        after: DateTime<Utc>,
        cursor: &mut Option<DateTime<Utc>>,
    ) -> Result<Page, BackfillError> {
        let url = format!(
            "{}/api/v3/as/applications/{}/packages/storage/uplink_message",
            self.base_url, self.application
        );
        let limit = self.config.page_limit.to_string();
        let request = self
            .http
            .get(&url)
            .query(&[
                ("after", rfc3339(after).as_str()),
                ("order", "received_at"),
                ("limit", limit.as_str()),
            ])
            .bearer_auth(self.api_key.expose())
            .header(reqwest::header::ACCEPT, "text/event-stream");
        let response = tokio::select! {
            _ = self.ctx.shutdown.cancelled() => return Err(BackfillError::Shutdown),
            r = request.send() => r.map_err(|e| self.http_error(e))?,
        };
        let status = response.status().as_u16();
        match status {
            200..=299 => {}
            401 | 403 => return Err(BackfillError::Unauthorized(status)),
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
                    self.commit(&mut chunk, cursor).await?;
                    return Err(self.http_error(e));
                }
                None => break,
            };
            buffer.extend_from_slice(&bytes);
            while let Some(pos) = buffer.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=pos).collect();
                self.take_line(&line, &mut page, &mut chunk)?;
                if chunk.uplinks >= UPLINKS_PER_BATCH {
                    self.commit(&mut chunk, cursor).await?;
                }
            }
            if buffer.len() > max_line {
                self.commit(&mut chunk, cursor).await?;
                return Err(BackfillError::LineTooLong(max_line));
            }
        }
        let rest = std::mem::take(&mut buffer);
        self.take_line(&rest, &mut page, &mut chunk)?;
        self.commit(&mut chunk, cursor).await?;
        Ok(page)
    }

    /// Parses one line into the current chunk.
    fn take_line(
        &self,
        line: &[u8],
        page: &mut Page,
        chunk: &mut Chunk,
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
            serde_json::from_slice(line).map_err(DecodeError::from_json);
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
            Ok(_) => return Ok(()),
            Err(e) => {
                self.reject(e.reason(), &e.to_string(), line);
                return Ok(());
            }
        };
        page.count += 1;
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
            .readings(&uplink, crate::clock::now(), flags::BACKFILLED)
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
            Ok(Ok(_)) => {
                *cursor = (*cursor).max(chunk.max_mark);
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

    async fn load_cursor(&self) -> Option<DateTime<Utc>> {
        let store = self.ctx.store.clone();
        let source = self.source.clone();
        tokio::task::spawn_blocking(move || {
            let conn = store.reader().ok()?;
            let value: String = conn
                .query_row(
                    "SELECT value FROM source_state WHERE source = ?1 AND key = ?2",
                    rusqlite::params![source, CURSOR_KEY],
                    |r| r.get(0),
                )
                .ok()?;
            DateTime::parse_from_rfc3339(&value)
                .ok()
                .map(|t| t.with_timezone(&Utc))
        })
        .await
        .ok()
        .flatten()
    }

    async fn persist(&self, cursor: Option<DateTime<Utc>>) {
        let Some(cursor) = cursor else { return };
        let (source, value) = (self.source.clone(), rfc3339(cursor));
        let result = self
            .ctx
            .store
            .write(move |conn| {
                conn.execute(
                    "INSERT INTO source_state(source, key, value) VALUES (?1, ?2, ?3) \
                     ON CONFLICT(source, key) DO UPDATE SET value = excluded.value",
                    rusqlite::params![source, CURSOR_KEY, value],
                )
            })
            .await;
        if let Err(e) = result {
            tracing::debug!(source = %self.source, error = %e, "The backfill cursor was not saved; it will be next time.");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let mut c = BackfillConfig::default();
        let mut p = Problems::default();
        c.validate("b", &mut p);
        assert!(p.0.is_empty());
        c.url = Some("eu1.cloud.thethings.network".into());
        c.overlap = HumanDuration::from_secs(7200);
        c.initial_window = HumanDuration::from_secs(90 * 86_400);
        c.page_limit = 0;
        c.timeout = HumanDuration::from_millis(10);
        c.retry_min = HumanDuration::from_millis(10);
        c.retry_max = HumanDuration::from_millis(5);
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
                "b.retry_max"
            ]
        );
    }

    #[test]
    fn timestamps_round_trip() {
        let t = DateTime::parse_from_rfc3339("2026-11-26T03:14:07.705112233Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(rfc3339(t), "2026-11-26T03:14:07.705112233Z");
    }
}
