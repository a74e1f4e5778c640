//! Serial line sensors (`type = "serial"`): a port that prints one record per line.
//!
//! ```text
//! port ──bytes──▶ LineFramer (max length, LF/CRLF) ──line──▶ LineParser (JSON, CSV,
//!   key=value, regex) ──▶ Mapping + plausible ranges ──▶ readings ──batch──▶ store
//! ```
//!
//! Guarantees:
//! - **Bad input never stops the source** (G5): garbage, overlong lines, non-UTF-8
//!   bytes, lines cut by an unplug are counted per reason, logged rate-limited and kept
//!   in `rejected` (see [`super::rejects`]).
//! - **Unplug and replug need no restart**: a read of 0 bytes or an I/O error (EIO when
//!   a USB adapter goes away) closes the handle at once, so the kernel can reuse the
//!   device name, is reported once, and the port is reopened with backoff. A port that
//!   does not exist at start is waited for the same way.
//! - **Each reading has a stable uid**: `derive(source, sequence, metric)` with a local
//!   sequence that never repeats across restarts ([`SequenceAllocator`]).
//! - **Honest time** (G8): the line's own timestamp when it has one, else the local
//!   clock, flagged `CLOCK_UNSYNCED` while the clock is not synchronised.
//!
//! Lines are batched (up to `batch_max_lines` or `batch_max_delay`) so ingest keeps up
//! with fast sensors while the store groups commits.
//!
//! **Queues and waits (G9).** The reader task is the only stage of the source: it
//! waits for room in the store's batch queue, and for the oldest commit once more than
//! `MAX_IN_FLIGHT` (8) batches are unacknowledged. The store writer, which drains that
//! queue and resolves the commits, never waits for a source, so the reader can wait but
//! never wedge; meanwhile the bytes wait in the kernel's buffer (and the sensor's, with
//! flow control).

pub mod formats;

use super::mapping::Plausible;
use super::port::{
    check_port, check_reopen_max_delay, PortOwner, PortRecords, PortSettings, ReopeningPort,
};
use super::{SourceContext, SourceKind};
use crate::model::{flags, Reading, Uid};
use crate::settings::{check_identifier, HumanDuration, Problems};
use crate::sources::mapping::Mapping;
use formats::{
    check_timestamp_pattern, FieldRoles, Format, Frame, LineEnding, LineError, LineFramer,
    LineParser, TimestampFormat,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tracing::Instrument;

/// `[[sources]]` with `type = "serial"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A unique name for this source (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// The serial device. Prefer the stable `/dev/serial/by-id/...` name over
    /// `/dev/ttyUSB0`, which can change after an unplug. The agent's user must be in
    /// the `dialout` group.
    pub path: String,
    #[serde(default)]
    pub port: PortSettings,
    /// What ends a line: `lf` (LF or CRLF; the usual) or `cr` (CR alone).
    #[serde(default)]
    pub line_ending: LineEnding,
    /// The longest line accepted, in bytes (16 to 65536). Longer input is discarded up
    /// to the next line ending and counted as `line_too_long`.
    #[serde(default = "default_max_line_length")]
    pub max_line_length: usize,
    /// How each line is read: `json`, `csv`, `key-value` or `regex`.
    pub format: FormatName,
    #[serde(default)]
    pub csv: CsvConfig,
    /// For `format = "regex"`: a regular expression with named groups, e.g.
    /// `'^(?P<device>\S+) T=(?P<temperature>\S+)'`. Groups that hold numbers become
    /// readings named after the group.
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub fields: FieldsConfig,
    /// Raw field → metric name, unit, scale and offset (see the mapping section).
    #[serde(default)]
    pub mapping: Mapping,
    /// Plausible range per metric (after mapping); values outside are rejected as
    /// `implausible_value`: `plausible.temperature = { min = -40, max = 85 }`.
    #[serde(default)]
    pub plausible: BTreeMap<String, Plausible>,
    /// Commit after this many lines (1 to 10000) ...
    #[serde(default = "default_batch_max_lines")]
    pub batch_max_lines: usize,
    /// ... or after the first line of a batch waited this long (at most 1s).
    #[serde(default = "default_batch_max_delay")]
    pub batch_max_delay: HumanDuration,
    /// The longest wait between attempts to reopen a missing port (backoff doubles from
    /// 250ms up to this).
    #[serde(default = "default_reopen_max_delay")]
    pub reopen_max_delay: HumanDuration,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FormatName {
    Json,
    Csv,
    KeyValue,
    Regex,
}

/// For `format = "csv"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CsvConfig {
    /// One character between cells.
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// Column names in order (empty names skip a column). Without them, a line with no
    /// number in it is taken as the header line (sensors print it at power-up).
    #[serde(default)]
    pub columns: Option<Vec<String>>,
}

impl Default for CsvConfig {
    fn default() -> Self {
        CsvConfig {
            delimiter: default_delimiter(),
            columns: None,
        }
    }
}

/// Which fields of a line say what. A field is a JSON key (nested keys joined with
/// dots), a CSV column, a key of `key=value`, or a regex group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FieldsConfig {
    /// The device id for every reading of this port (default: the source name).
    #[serde(default)]
    pub device: Option<String>,
    /// ... or the field that names the device on each line.
    #[serde(default)]
    pub device_field: Option<String>,
    /// The field with the sensor's own timestamp; without it (or when a line lacks
    /// it) the local clock is used.
    #[serde(default)]
    pub timestamp_field: Option<String>,
    /// `rfc3339`, `unix`, `unix_ms`, or a strftime pattern like `"%Y-%m-%d %H:%M:%S"`
    /// (read as UTC unless it has `%z`).
    #[serde(default)]
    pub timestamp_format: TimestampFormat,
    /// For sensors that send one reading per line (`ws1,temperature,21.5`): the field
    /// with the metric name. Without it, every numeric field is a reading.
    #[serde(default)]
    pub metric_field: Option<String>,
    /// With `metric_field`: the field with the value.
    #[serde(default = "default_value_field")]
    pub value_field: String,
    /// With `metric_field`: the field with the unit (optional).
    #[serde(default)]
    pub unit_field: Option<String>,
}

impl Default for FieldsConfig {
    fn default() -> Self {
        FieldsConfig {
            device: None,
            device_field: None,
            timestamp_field: None,
            timestamp_format: TimestampFormat::default(),
            metric_field: None,
            value_field: default_value_field(),
            unit_field: None,
        }
    }
}

fn default_delimiter() -> String {
    ",".into()
}
fn default_value_field() -> String {
    "value".into()
}
fn default_batch_max_lines() -> usize {
    500
}
fn default_batch_max_delay() -> HumanDuration {
    HumanDuration::from_millis(20)
}
fn default_reopen_max_delay() -> HumanDuration {
    HumanDuration::from_secs(30)
}

fn default_max_line_length() -> usize {
    1024
}

impl SerialConfig {
    fn parser(&self) -> anyhow::Result<LineParser> {
        let format = match self.format {
            FormatName::Json => Format::Json,
            FormatName::Csv => Format::Csv {
                delimiter: self.csv.delimiter.chars().next().unwrap_or(','),
                columns: self.csv.columns.clone(),
            },
            FormatName::KeyValue => Format::KeyValue,
            FormatName::Regex => {
                let pattern = self.pattern.as_deref().unwrap_or_default();
                Format::Regex(
                    regex::RegexBuilder::new(pattern)
                        .size_limit(1 << 20)
                        .build()?,
                )
            }
        };
        let f = &self.fields;
        Ok(LineParser::new(
            format,
            FieldRoles {
                device_field: f.device_field.clone(),
                timestamp_field: f.timestamp_field.clone(),
                timestamp_format: f.timestamp_format.clone(),
                metric_field: f.metric_field.clone(),
                value_field: f.value_field.clone(),
                unit_field: f.unit_field.clone(),
            },
        ))
    }
}

impl SourceKind for SerialConfig {
    const TYPE: &'static str = "serial";

    fn name(&self) -> &str {
        &self.name
    }

    fn tls_endpoints(&self) -> Vec<crate::tls::Endpoint> {
        Vec::new()
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        check_port(&self.path, &self.port, path, problems);
        if !(16..=65_536).contains(&self.max_line_length) {
            problems.push(
                format!("{path}.max_line_length"),
                format!(
                    "must be between 16 and 65536, found {}",
                    self.max_line_length
                ),
            );
        }
        match (self.format, &self.pattern) {
            (FormatName::Regex, None) => problems.push(
                format!("{path}.pattern"),
                "format \"regex\" needs a `pattern` with named groups",
            ),
            (FormatName::Regex, Some(p)) => match regex::RegexBuilder::new(p)
                .size_limit(1 << 20)
                .build()
            {
                Ok(re) if re.capture_names().flatten().next().is_none() => problems.push(
                    format!("{path}.pattern"),
                    "has no named group; name the parts to keep, e.g. (?P<temperature>[-0-9.]+)",
                ),
                Ok(_) => {}
                Err(e) => problems.push(
                    format!("{path}.pattern"),
                    format!("not a valid regular expression: {e}"),
                ),
            },
            (_, Some(_)) => problems.push(
                format!("{path}.pattern"),
                "is only used with format = \"regex\"",
            ),
            (_, None) => {}
        }
        if self.csv.delimiter.chars().count() != 1 || self.csv.delimiter == "\"" {
            problems.push(
                format!("{path}.csv.delimiter"),
                format!(
                    "must be one character other than '\"', found {:?}",
                    self.csv.delimiter
                ),
            );
        }
        if let Some(columns) = &self.csv.columns {
            if columns.iter().all(|c| c.is_empty()) {
                problems.push(format!("{path}.csv.columns"), "name at least one column");
            }
            if columns.len() > formats::MAX_FIELDS {
                problems.push(format!("{path}.csv.columns"), "at most 256 columns");
            }
        }
        let f = &self.fields;
        if let Some(d) = &f.device {
            problems.check(
                format!("{path}.fields.device"),
                check_identifier(d, "the device id"),
            );
        }
        if f.device.is_some() && f.device_field.is_some() {
            problems.push(
                format!("{path}.fields.device"),
                "give either `device` or `device_field`, not both",
            );
        }
        for (key, v) in [
            ("device_field", &f.device_field),
            ("timestamp_field", &f.timestamp_field),
            ("metric_field", &f.metric_field),
            ("unit_field", &f.unit_field),
        ] {
            if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
                problems.push(format!("{path}.fields.{key}"), "must not be empty");
            }
        }
        if f.value_field.trim().is_empty() {
            problems.push(format!("{path}.fields.value_field"), "must not be empty");
        }
        if let TimestampFormat::Pattern(p) = &f.timestamp_format {
            problems.check(
                format!("{path}.fields.timestamp_format"),
                check_timestamp_pattern(p),
            );
        }
        self.mapping.validate(&format!("{path}.mapping"), problems);
        for (metric, range) in &self.plausible {
            range.validate(&format!("{path}.plausible.{metric}"), problems);
        }
        if !(1..=10_000).contains(&self.batch_max_lines) {
            problems.push(
                format!("{path}.batch_max_lines"),
                format!(
                    "must be between 1 and 10000, found {}",
                    self.batch_max_lines
                ),
            );
        }
        let delay = self.batch_max_delay.get();
        if delay.is_zero() || delay > Duration::from_secs(1) {
            problems.push(
                format!("{path}.batch_max_delay"),
                "must be more than 0 and at most 1s",
            );
        }
        check_reopen_max_delay(self.reopen_max_delay, path, problems);
    }

    fn run(self, ctx: SourceContext) -> impl Future<Output = anyhow::Result<()>> + Send {
        run(self, ctx)
    }
}

/// Lines from one read that are waiting to be committed.
struct Pending {
    readings: Vec<Reading>,
    lines: usize,
    since: Option<Instant>,
}

/// One serial port's running state.
struct SerialSource {
    config: SerialConfig,
    ctx: SourceContext,
    parser: LineParser,
    framer: LineFramer,
    records: PortRecords,
    pending: Pending,
    /// Lines accepted since start (for tests and benchmarks through the log).
    accepted_lines: u64,
}

pub async fn run(config: SerialConfig, ctx: SourceContext) -> anyhow::Result<()> {
    let span = tracing::info_span!("source", name = %config.name, kind = "serial");
    async move {
        let parser = config.parser()?;
        let records = PortRecords::load(
            &ctx,
            &config.name,
            "serial",
            "serial readings wait (the port is not read)",
        )
        .await?;
        let mut source = SerialSource {
            framer: LineFramer::new(config.max_line_length, config.line_ending),
            parser,
            records,
            pending: Pending {
                readings: Vec::new(),
                lines: 0,
                since: None,
            },
            accepted_lines: 0,
            config,
            ctx,
        };
        source.run().await
    }
    .instrument(span)
    .await
}

impl SerialSource {
    async fn run(&mut self) -> anyhow::Result<()> {
        let mut port = ReopeningPort::new(
            &self.config.path,
            &self.config.port,
            self.config.reopen_max_delay.get(),
        );
        let mut publish = tokio::time::interval(Duration::from_secs(5));
        publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown = self.ctx.shutdown.clone();
        while let Some(stream) = port.open(self, &shutdown, &mut publish).await {
            // A sensor that was unplugged starts over: it will send its header again.
            self.parser.reset();
            let outcome = self.read_port(stream, &mut publish).await?;
            // The port is closed here (dropped), so the kernel can reuse the device name.
            let partial = self.framer.reset();
            if partial > 0 {
                self.records.rejects.reject(
                    "truncated_line",
                    &format_args!("{partial} bytes of a line cut off when the port closed"),
                    &[],
                );
            }
            self.flush().await;
            match outcome {
                ReadOutcome::Shutdown => break,
                ReadOutcome::Gone(reason) => {
                    if !port.lost(self, &reason, &shutdown).await {
                        break;
                    }
                }
            }
        }
        self.flush().await;
        self.records.window.drain().await;
        self.set_state("stopped", None);
        self.records.finish(Vec::new()).await;
        tracing::debug!(
            accepted_lines = self.accepted_lines,
            rejected = self.records.rejects.total(),
            "Serial source stopped."
        );
        Ok(())
    }

    async fn read_port(
        &mut self,
        mut port: tokio_serial::SerialStream,
        publish: &mut tokio::time::Interval,
    ) -> anyhow::Result<ReadOutcome> {
        let mut buf = vec![0u8; 8192];
        loop {
            let deadline = self
                .pending
                .since
                .map(|t| t + self.config.batch_max_delay.get());
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => return Ok(ReadOutcome::Shutdown),
                read = port.read(&mut buf) => match read {
                    Ok(0) => return Ok(ReadOutcome::Gone("end of file (the device was closed)".into())),
                    Ok(n) => {
                        self.take_bytes(&buf[..n]).await;
                        if self.pending.lines >= self.config.batch_max_lines {
                            self.flush().await;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted || e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Ok(ReadOutcome::Gone(e.to_string())),
                },
                _ = sleep_until_opt(deadline) => self.flush().await,
                // A commit result, so a batch refused by a full disk is offered again
                // even when no new line arrives.
                result = self.records.window.next_ack() => self.records.window.settle_oldest(result).await,
                _ = publish.tick() => self.publish_state(),
            }
        }
    }

    /// Frames and parses bytes just read; readings go to `pending`.
    async fn take_bytes(&mut self, bytes: &[u8]) {
        let mut lines: Vec<Result<Vec<u8>, usize>> = Vec::new();
        self.framer.push(bytes, &mut |frame| match frame {
            Frame::Line(l) => lines.push(Ok(l.to_vec())),
            Frame::Overlong(n) => lines.push(Err(n)),
        });
        if lines.is_empty() {
            return;
        }
        let now = self.ctx.clock.now();
        let clock_unsynced = !crate::clock::is_synchronized();
        for line in lines {
            match line {
                Ok(bytes) => self.take_line(&bytes, now, clock_unsynced).await,
                Err(n) => self.records.rejects.reject(
                    "line_too_long",
                    &format_args!(
                        "{n} bytes without a line ending (max_line_length {})",
                        self.config.max_line_length
                    ),
                    &[],
                ),
            }
        }
    }

    async fn take_line(
        &mut self,
        bytes: &[u8],
        now: chrono::DateTime<chrono::Utc>,
        clock_unsynced: bool,
    ) {
        let text = String::from_utf8_lossy(bytes);
        let parsed = match self.parser.parse(&text) {
            Ok(Some(p)) => p,
            Ok(None) => return,
            Err(e) => {
                self.reject_line(&e, bytes);
                return;
            }
        };
        let device = parsed
            .device
            .or_else(|| self.config.fields.device.clone())
            .unwrap_or_else(|| self.config.name.clone());
        let (observed_at, flags) = match parsed.observed_at {
            Some(t) => (t, 0),
            None => (
                now,
                if clock_unsynced {
                    flags::CLOCK_UNSYNCED
                } else {
                    0
                },
            ),
        };
        let mut readings = Vec::with_capacity(parsed.values.len());
        for raw in parsed.values {
            let Some(mapped) = self.config.mapping.map(&device, &raw.key, raw.value) else {
                continue;
            };
            if !mapped.value.is_finite() {
                continue;
            }
            if let Some(range) = self.config.plausible.get(&mapped.metric) {
                if !range.contains(mapped.value) {
                    self.records.rejects.reject(
                        "implausible_value",
                        &format_args!(
                            "{} of {device} = {} is outside {:?}..{:?}",
                            mapped.metric, mapped.value, range.min, range.max
                        ),
                        bytes,
                    );
                    continue;
                }
            }
            readings.push((mapped.metric, mapped.unit.or(raw.unit), mapped.value));
        }
        if readings.is_empty() {
            return;
        }
        let Some(sequence) = self.records.next_sequence(readings.len()).await else {
            return;
        };
        let readings_len = readings.len();
        for (metric, unit, value) in readings {
            self.pending.readings.push(Reading {
                uid: Uid::derive(&[&self.config.name, &sequence, &metric]),
                source: self.config.name.clone(),
                device: device.clone(),
                metric,
                value,
                unit,
                observed_at,
                received_at: now,
                flags,
                meta: None,
            });
        }
        self.ctx
            .metrics
            .received(&self.config.name, readings_len as u64);
        self.pending.lines += 1;
        self.accepted_lines += 1;
        self.pending.since.get_or_insert_with(Instant::now);
    }

    fn reject_line(&mut self, e: &LineError, bytes: &[u8]) {
        self.records.rejects.reject(e.reason(), e, bytes);
    }

    /// Sends the pending readings as one batch; waits only when too many batches are
    /// still waiting for their commit.
    async fn flush(&mut self) {
        self.pending.since = None;
        self.pending.lines = 0;
        if self.pending.readings.is_empty() {
            return;
        }
        let readings = std::mem::take(&mut self.pending.readings);
        // When the writer is behind, the reader waits here and the bytes wait in the
        // kernel's buffer (and the sensor's, with flow control).
        self.records.window.send(readings).await;
    }
}

impl PortOwner for SerialSource {
    const WHAT: &'static str = "Serial port";

    fn set_state(&mut self, state: &str, error: Option<&str>) {
        self.ctx
            .metrics
            .set_connected(&self.config.name, state == "open");
        let since = self.ctx.clock.now();
        self.records
            .set_state(state, &self.config.path, since, error);
        self.publish_state();
    }

    fn publish_state(&mut self) {
        self.records.publish(Vec::new());
    }

    fn log_open(&self, back_after: Option<Duration>) {
        match back_after {
            Some(after) => {
                tracing::info!(path = %self.config.path, after = ?after, "Serial port is back; reading again.")
            }
            None => {
                tracing::info!(path = %self.config.path, baud = self.config.port.baud, "Serial port open.")
            }
        }
    }
}

enum ReadOutcome {
    Shutdown,
    Gone(String),
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems_of(value: serde_json::Value) -> Vec<String> {
        let mut problems = Problems::default();
        if let Some(c) = problems.deserialize::<SerialConfig>(value, "sources[0]") {
            c.validate("sources[0]", &mut problems);
        }
        problems.0.into_iter().map(|(path, _)| path).collect()
    }

    #[test]
    fn a_minimal_config_is_valid() {
        assert!(
            problems_of(json!({"name": "s", "path": "/dev/ttyUSB0", "format": "json"})).is_empty()
        );
    }

    #[test]
    fn wrong_values_are_all_reported() {
        let got = problems_of(json!({
            "name": "s", "path": " ", "format": "csv", "pattern": "(?P<x>1)",
            "max_line_length": 1, "batch_max_lines": 0, "batch_max_delay": "5s",
            "reopen_max_delay": "1ms",
            "port": {"baud": 0, "data_bits": 9, "stop_bits": 3},
            "csv": {"delimiter": "ab", "columns": ["", ""]},
            "fields": {"device": "a b", "device_field": "id", "value_field": "",
                       "timestamp_format": "%Q"},
            "plausible": {"t": {"min": 5.0, "max": 1.0}, "u": {}},
            "mapping": {"fields": {"x": {"scale": 0.0}}}
        }));
        for path in [
            "sources[0].path",
            "sources[0].pattern",
            "sources[0].max_line_length",
            "sources[0].batch_max_lines",
            "sources[0].batch_max_delay",
            "sources[0].reopen_max_delay",
            "sources[0].port.baud",
            "sources[0].port.data_bits",
            "sources[0].port.stop_bits",
            "sources[0].csv.delimiter",
            "sources[0].csv.columns",
            "sources[0].fields.device",
            "sources[0].fields.value_field",
            "sources[0].fields.timestamp_format",
            "sources[0].plausible.t.min",
            "sources[0].plausible.u",
            "sources[0].mapping.fields.x.scale",
        ] {
            assert!(
                got.iter().any(|p| p == path),
                "{path} not reported in {got:#?}"
            );
        }
    }

    #[test]
    fn regex_patterns_are_checked() {
        let base = |pattern: &str| json!({"name": "s", "path": "/dev/x", "format": "regex", "pattern": pattern});
        assert!(problems_of(base(r"^(?P<t>\d+)$")).is_empty());
        assert_eq!(
            problems_of(base(r"^(\d+)$")),
            vec!["sources[0].pattern"],
            "no named group"
        );
        assert_eq!(
            problems_of(base(r"(?P<t>")),
            vec!["sources[0].pattern"],
            "invalid"
        );
        // A pattern whose compiled form is huge is refused instead of eating memory.
        assert_eq!(
            problems_of(base(r"(?P<t>\w{1000}){1000}")),
            vec!["sources[0].pattern"]
        );
        let missing = json!({"name": "s", "path": "/dev/x", "format": "regex"});
        assert_eq!(problems_of(missing), vec!["sources[0].pattern"]);
    }

    #[test]
    fn wrong_types_and_unknown_keys() {
        let got = problems_of(json!({
            "name": "s", "path": "/dev/x", "format": "xml", "port": {"parity": "mark", "baud": "fast"},
            "colour": "red"
        }));
        assert!(got.iter().any(|p| p == "sources[0].format"), "{got:?}");
        assert!(got.iter().any(|p| p == "sources[0].port.parity"), "{got:?}");
        assert!(got.iter().any(|p| p == "sources[0].colour"), "{got:?}");
    }
}
