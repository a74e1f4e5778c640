//! Modbus RTU over RS-485 (`type = "modbus-rtu"`): one bus, several slaves, each with
//! its own register map, poll interval, timeout and retries.
//!
//! Guarantees:
//! - **One request at a time per bus**, with the RTU inter-frame gap (3.5 character
//!   times; 1.75ms above 19200 baud) before every request. One task owns the port.
//! - **A dead slave does not stall the others** (G5): a slave that does not answer
//!   after its retries is marked offline (a `slave.<id>` row in `source_state`, read by
//!   `outpost status` and health) and is then probed with one attempt at growing
//!   intervals (from 1s, doubling up to `offline_max_interval`), so it costs the bus
//!   one timeout per probe instead of `timeout × (retries + 1)` per interval. Slaves
//!   are served earliest-due first, so a late slave cannot starve the others.
//! - **Bad answers are never fatal**: Modbus exceptions (reported by name), CRC errors,
//!   truncated frames, wrong register counts, NaN floats and values outside the
//!   plausible range are counted per reason, logged rate-limited and kept in `rejected`.
//! - **Stable uids**: `derive(source, sequence, metric)`, one local sequence number per
//!   poll that never repeats across restarts.
//!
//! Bytes left over from a slave answering after its timeout are discarded before the
//! next request, so a late answer is never taken for another slave's.
//!
//! **Queues and waits (G9).** One task per bus: it waits for room in the store's batch
//! queue and, once more than `MAX_IN_FLIGHT` (8) polls are uncommitted, for the oldest
//! commit before the next poll (the acknowledgement of a Modbus reading is the next
//! poll). The store writer never waits for a source, so the bus can be slowed by the
//! store but never wedged.

use decode::{answer_len, classify_timeout, decode_bits, decode_registers, Order, ValueType};
pub mod decode;

use super::mapping::Plausible;
use super::port::{
    check_port, check_reopen_max_delay, PortOwner, PortRecords, PortSettings, ReopeningPort,
};
use super::{SourceContext, SourceKind};
use crate::backoff::{Backoff, Jitter};
use crate::model::{flags, Reading, Uid};
use crate::settings::{check_identifier, HumanDuration, Problems};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_modbus::client::Client;
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{Request, Response, Slave};
use tracing::Instrument;

/// `[[sources]]` with `type = "modbus-rtu"`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    /// A unique name for this source (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// The RS-485 adapter, preferably `/dev/serial/by-id/...`.
    pub path: String,
    /// Baud rate, parity, etc. Must match every slave on the bus (8E1 is common).
    #[serde(default)]
    pub port: PortSettings,
    /// Silence before each request; default 3.5 character times (1.75ms above 19200
    /// baud), as the RTU specification requires. Raise it for slow slaves.
    #[serde(default)]
    pub inter_frame_gap: Option<HumanDuration>,
    /// The longest interval between probes of an offline slave.
    #[serde(default = "default_offline_max_interval")]
    pub offline_max_interval: HumanDuration,
    /// The longest wait between attempts to reopen a missing adapter.
    #[serde(default = "default_reopen_max_delay")]
    pub reopen_max_delay: HumanDuration,
    /// The slaves on this bus.
    pub slaves: Vec<SlaveConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SlaveConfig {
    /// The slave address (1 to 247).
    pub id: u8,
    /// The device id stored with its readings (default: `<source>-<id>`).
    #[serde(default)]
    pub device: Option<String>,
    /// Time between polls.
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// How long to wait for each answer.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Further attempts after a request got no valid answer (0 to 5).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// What to read at each poll, one request per entry.
    pub registers: Vec<RegisterConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// The metric name stored; with `count` > 1 the values are `<metric>.0`, `.1`, ...
    pub metric: String,
    #[serde(default)]
    pub unit: Option<String>,
    /// 3 = holding registers, 4 = input registers, 1 = coils, 2 = discrete inputs.
    #[serde(default = "default_function")]
    pub function: u8,
    /// The first register (or bit), counted from 0 as on the wire (register 40001 in
    /// a manual's 1-based notation is address 0).
    pub address: u16,
    /// How many values of `type` (or bits) to read from `address` on.
    #[serde(default = "one_u16")]
    pub count: u16,
    /// `u16`, `i16`, `u32`, `i32` or `f32` (registers only; bits are always 0 or 1).
    #[serde(default, rename = "type")]
    pub value_type: ValueType,
    /// 32-bit values: `big` = high word first (Modbus convention), `little` = low first.
    #[serde(default)]
    pub word_order: Order,
    /// Bytes inside each register: `big` (standard) or `little` (swapped).
    #[serde(default)]
    pub byte_order: Order,
    /// `value = raw * scale + offset`.
    #[serde(default = "one_f64")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    /// Plausible range after scaling; values outside are rejected.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

fn default_offline_max_interval() -> HumanDuration {
    HumanDuration::from_secs(300)
}
fn default_reopen_max_delay() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_interval() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_millis(500)
}
fn default_retries() -> u32 {
    1
}
fn default_function() -> u8 {
    3
}
fn one_u16() -> u16 {
    1
}
fn one_f64() -> f64 {
    1.0
}

impl ModbusConfig {
    fn gap(&self) -> Duration {
        if let Some(gap) = self.inter_frame_gap {
            return gap.get();
        }
        if self.port.baud > 19_200 {
            Duration::from_micros(1750)
        } else {
            Duration::from_secs_f64(
                3.5 * f64::from(self.port.bits_per_char()) / f64::from(self.port.baud.max(1)),
            )
        }
    }
}

impl SourceKind for ModbusConfig {
    const TYPE: &'static str = "modbus-rtu";

    fn name(&self) -> &str {
        &self.name
    }

    fn tls_endpoints(&self) -> Vec<crate::tls::Endpoint> {
        Vec::new()
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        check_port(&self.path, &self.port, path, problems);
        if let Some(gap) = self.inter_frame_gap {
            if gap.get() > Duration::from_secs(1) {
                problems.push(format!("{path}.inter_frame_gap"), "must be at most 1s");
            }
        }
        if self.offline_max_interval.get() < Duration::from_secs(1) {
            problems.push(
                format!("{path}.offline_max_interval"),
                "must be at least 1s",
            );
        }
        check_reopen_max_delay(self.reopen_max_delay, path, problems);
        if self.slaves.is_empty() {
            problems.push(format!("{path}.slaves"), "list at least one slave");
        }
        let mut ids = std::collections::HashSet::new();
        for (i, slave) in self.slaves.iter().enumerate() {
            let p = format!("{path}.slaves[{i}]");
            if !(1..=247).contains(&slave.id) {
                problems.push(
                    format!("{p}.id"),
                    format!("must be between 1 and 247, found {}", slave.id),
                );
            } else if !ids.insert(slave.id) {
                problems.push(
                    format!("{p}.id"),
                    format!("slave {} is listed twice on this bus", slave.id),
                );
            }
            slave.validate(&p, problems);
        }
    }

    fn run(self, ctx: SourceContext) -> impl Future<Output = anyhow::Result<()>> + Send {
        run(self, ctx)
    }
}

impl SlaveConfig {
    fn validate(&self, path: &str, problems: &mut Problems) {
        if let Some(d) = &self.device {
            problems.check(
                format!("{path}.device"),
                check_identifier(d, "the device id"),
            );
        }
        if self.interval.get() < Duration::from_millis(10) {
            problems.push(format!("{path}.interval"), "must be at least 10ms");
        }
        let timeout = self.timeout.get();
        if timeout < Duration::from_millis(10) || timeout > Duration::from_secs(30) {
            problems.push(format!("{path}.timeout"), "must be between 10ms and 30s");
        }
        if self.retries > 5 {
            problems.push(
                format!("{path}.retries"),
                format!("must be at most 5, found {}", self.retries),
            );
        }
        if self.registers.is_empty() {
            problems.push(
                format!("{path}.registers"),
                "list at least one register to read",
            );
        }
        for (i, r) in self.registers.iter().enumerate() {
            r.validate(&format!("{path}.registers[{i}]"), problems);
        }
    }
}

impl RegisterConfig {
    fn validate(&self, path: &str, problems: &mut Problems) {
        problems.check(
            format!("{path}.metric"),
            check_identifier(&self.metric, "the metric name"),
        );
        let bits = matches!(self.function, 1 | 2);
        if !matches!(self.function, 1..=4) {
            problems.push(
                format!("{path}.function"),
                format!(
                    "must be 3 (holding registers), 4 (input registers), 1 (coils) or 2 (discrete inputs), found {}",
                    self.function
                ),
            );
        }
        if bits && self.value_type != ValueType::U16 {
            problems.push(
                format!("{path}.type"),
                "coils and discrete inputs are bits; leave `type` out",
            );
        }
        let quantity = self.quantity();
        let limit = if bits { 2000 } else { 125 };
        if self.count == 0 || quantity > limit {
            problems.push(
                format!("{path}.count"),
                format!(
                    "must be at least 1 and read at most {limit} {} in one request, found {} ({quantity})",
                    if bits { "bits" } else { "registers" },
                    self.count
                ),
            );
        }
        if u32::from(self.address) + quantity > 65_536 {
            problems.push(
                format!("{path}.address"),
                "the read runs past address 65535",
            );
        }
        if !self.scale.is_finite() || self.scale == 0.0 {
            problems.push(
                format!("{path}.scale"),
                "must be a finite number other than 0",
            );
        }
        if !self.offset.is_finite() {
            problems.push(format!("{path}.offset"), "must be a finite number");
        }
        if self.min.is_some() || self.max.is_some() {
            self.plausible().validate(path, problems);
        }
    }

    /// Registers (or bits) read.
    fn quantity(&self) -> u32 {
        if matches!(self.function, 1 | 2) {
            u32::from(self.count)
        } else {
            u32::from(self.count) * u32::from(self.value_type.width())
        }
    }

    fn plausible(&self) -> Plausible {
        Plausible {
            min: self.min,
            max: self.max,
        }
    }

    fn request(&self) -> Request<'static> {
        let q = self.quantity() as u16;
        match self.function {
            1 => Request::ReadCoils(self.address, q),
            2 => Request::ReadDiscreteInputs(self.address, q),
            4 => Request::ReadInputRegisters(self.address, q),
            _ => Request::ReadHoldingRegisters(self.address, q),
        }
    }

    fn metric_name(&self, index: usize) -> String {
        if self.count > 1 {
            format!("{}.{index}", self.metric)
        } else {
            self.metric.clone()
        }
    }
}

/// The serial port shared by successive tokio-modbus contexts, with what the current
/// request has received (to tell a CRC error from silence) and when the line was last
/// busy (for the inter-frame gap).
#[derive(Debug)]
struct PortState {
    stream: tokio_serial::SerialStream,
    received: Vec<u8>,
    discard_before_write: bool,
    discarded: usize,
    line_free_at: Instant,
    micros_per_byte: f64,
}

/// The transport handed to tokio-modbus. The lock is held only inside one poll call,
/// never across an await.
#[derive(Debug, Clone)]
struct SharedPort(Arc<Mutex<PortState>>);

const MAX_CAPTURE: usize = 512;

impl SharedPort {
    fn lock(&self) -> std::sync::MutexGuard<'_, PortState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a new exchange: forget what the last one received, and drop whatever is
    /// still arriving from it before the request goes out.
    fn begin_request(&self) -> Instant {
        let mut s = self.lock();
        s.received.clear();
        s.discard_before_write = true;
        s.line_free_at
    }

    fn received(&self) -> Vec<u8> {
        self.lock().received.clone()
    }

    fn take_discarded(&self) -> usize {
        std::mem::take(&mut self.lock().discarded)
    }
}

impl AsyncRead for SharedPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let mut s = self.lock();
        let before = buf.filled().len();
        let result = Pin::new(&mut s.stream).poll_read(cx, buf);
        let new = &buf.filled()[before..];
        if !new.is_empty() {
            let room = MAX_CAPTURE.saturating_sub(s.received.len());
            let take = new.len().min(room);
            let new = new[..take].to_vec();
            s.received.extend_from_slice(&new);
            s.line_free_at = Instant::now();
        }
        result
    }
}

impl AsyncWrite for SharedPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut s = self.lock();
        if std::mem::take(&mut s.discard_before_write) {
            // A late answer to a timed-out request may still sit in the kernel buffer.
            let mut scratch = [0u8; 256];
            loop {
                let mut rb = ReadBuf::new(&mut scratch);
                match Pin::new(&mut s.stream).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                        s.discarded += rb.filled().len()
                    }
                    _ => break,
                }
            }
        }
        let result = Pin::new(&mut s.stream).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &result {
            let on_wire = Duration::from_micros((s.micros_per_byte * *n as f64) as u64);
            s.line_free_at = Instant::now() + on_wire;
        }
        result
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.lock().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.lock().stream).poll_shutdown(cx)
    }
}

/// Why one request gave no values.
#[derive(Debug)]
enum RequestError {
    /// No valid answer in time (silence, CRC error, truncated or unexpected frame).
    NoValidAnswer(&'static str, Vec<u8>),
    /// The slave answered with a Modbus exception.
    Exception(tokio_modbus::ExceptionCode),
    /// The answer was valid but unusable (wrong count, NaN).
    Decode(decode::DecodeError),
    /// The framing broke (tokio-modbus gave up on the byte stream); the context must be
    /// rebuilt but the port is fine.
    Framing(String),
    /// The port itself failed: the adapter is gone.
    Bus(std::io::Error),
}

/// A slave's poll schedule and visible state.
struct SlaveRuntime {
    config: SlaveConfig,
    device: String,
    next_due: Instant,
    online: Option<bool>,
    backoff: Backoff,
    polls: u64,
    failed_polls: u64,
    last_error: Option<String>,
    since: chrono::DateTime<chrono::Utc>,
}

struct ModbusSource {
    config: ModbusConfig,
    ctx: SourceContext,
    slaves: Vec<SlaveRuntime>,
    records: PortRecords,
    bus_open: bool,
}

/// The first wait before probing a slave that went offline (or its interval if longer).
const OFFLINE_FIRST_PROBE: Duration = Duration::from_secs(1);

pub async fn run(config: ModbusConfig, ctx: SourceContext) -> anyhow::Result<()> {
    let span = tracing::info_span!("source", name = %config.name, kind = "modbus-rtu");
    async move {
        let now = Instant::now();
        let slaves = config
            .slaves
            .iter()
            .map(|s| SlaveRuntime {
                device: s
                    .device
                    .clone()
                    .unwrap_or_else(|| format!("{}-{}", config.name, s.id)),
                next_due: now,
                online: None,
                backoff: Backoff::new(
                    s.interval.get().max(OFFLINE_FIRST_PROBE),
                    config.offline_max_interval.get(),
                )
                .with_jitter(Jitter::Spread(0.2)),
                polls: 0,
                failed_polls: 0,
                last_error: None,
                since: ctx.clock.now(),
                config: s.clone(),
            })
            .collect();
        let mut source = ModbusSource {
            records: PortRecords::load(
                &ctx,
                &config.name,
                "Modbus",
                "Modbus readings wait (the bus is not polled)",
            )
            .await?,
            bus_open: false,
            slaves,
            config,
            ctx,
        };
        source.run().await
    }
    .instrument(span)
    .await
}

impl ModbusSource {
    async fn run(&mut self) -> anyhow::Result<()> {
        let mut adapter = ReopeningPort::new(
            &self.config.path,
            &self.config.port,
            self.config.reopen_max_delay.get(),
        );
        let mut publish = tokio::time::interval(Duration::from_secs(5));
        publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let micros_per_byte = 1e6 * f64::from(self.config.port.bits_per_char())
            / f64::from(self.config.port.baud.max(1));
        let shutdown = self.ctx.shutdown.clone();
        while let Some(stream) = adapter.open(self, &shutdown, &mut publish).await {
            let port = SharedPort(Arc::new(Mutex::new(PortState {
                stream,
                received: Vec::new(),
                discard_before_write: false,
                discarded: 0,
                line_free_at: Instant::now(),
                micros_per_byte,
            })));
            match self.poll_bus(&port, &mut publish).await {
                BusOutcome::Shutdown => break,
                BusOutcome::Gone(e) => {
                    drop(port);
                    if !adapter.lost(self, &e.to_string(), &shutdown).await {
                        break;
                    }
                }
            }
        }
        self.records.window.drain().await;
        self.set_state("stopped", None);
        let slaves = self.slave_rows();
        self.records.finish(slaves).await;
        Ok(())
    }

    /// Polls slaves, earliest due first, until shutdown or the port fails.
    async fn poll_bus(
        &mut self,
        port: &SharedPort,
        publish: &mut tokio::time::Interval,
    ) -> BusOutcome {
        let mut client = tokio_modbus::client::rtu::attach_slave(port.clone(), Slave(1));
        loop {
            let Some(i) = (0..self.slaves.len()).min_by_key(|&i| (self.slaves[i].next_due, i))
            else {
                return BusOutcome::Shutdown;
            };
            let due = self.slaves[i].next_due;
            tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => return BusOutcome::Shutdown,
                _ = publish.tick() => { self.publish_state(); continue; }
                _ = tokio::time::sleep_until(due) => {}
            }
            match self.poll_slave(i, &mut client, port).await {
                Ok(()) => {}
                Err(PollAbort::Bus(e)) => return BusOutcome::Gone(e),
                Err(PollAbort::Rebuild) => {
                    client = tokio_modbus::client::rtu::attach_slave(port.clone(), Slave(1));
                }
            }
            let discarded = port.take_discarded();
            if discarded > 0 {
                tracing::debug!(bytes = discarded, "Discarded late bytes before a request.");
            }
        }
    }

    /// One poll of slave `i`: every register entry in order. An offline slave gets a
    /// single attempt at its first entry (a probe) before the rest.
    async fn poll_slave(
        &mut self,
        i: usize,
        client: &mut tokio_modbus::client::Context,
        port: &SharedPort,
    ) -> Result<(), PollAbort> {
        let gap = self.config.gap();
        let slave = &self.slaves[i];
        let id = slave.config.id;
        let offline = slave.online == Some(false);
        let attempts = if offline { 1 } else { 1 + slave.config.retries };
        let timeout = slave.config.timeout.get();
        let registers = slave.config.registers.clone();
        let device = slave.device.clone();
        client.set_slave(Slave(id));

        let mut values: Vec<(String, Option<String>, f64)> = Vec::new();
        let mut answered = false;
        let mut failure: Option<(&'static str, String)> = None;
        let mut observed_at = self.ctx.clock.now();
        let mut rebuild = false;
        for reg in &registers {
            let mut outcome = None;
            for _ in 0..attempts {
                let r = request(client, port, reg, timeout, gap).await;
                let retry = matches!(
                    r,
                    Err(RequestError::NoValidAnswer(..)) | Err(RequestError::Framing(_))
                );
                if matches!(r, Err(RequestError::Framing(_))) {
                    *client = tokio_modbus::client::rtu::attach_slave(port.clone(), Slave(id));
                    rebuild = true;
                }
                outcome = Some(r);
                if !retry {
                    break;
                }
            }
            observed_at = self.ctx.clock.now();
            match outcome {
                None => {}
                Some(Ok(raw)) => {
                    answered = true;
                    for (k, v) in raw.into_iter().enumerate() {
                        let metric = reg.metric_name(k);
                        let value = v * reg.scale + reg.offset;
                        if !reg.plausible().contains(value) {
                            self.records.rejects.reject(
                                "implausible_value",
                                &format_args!(
                                    "slave {id} {metric} = {value} is outside {:?}..{:?}",
                                    reg.min, reg.max
                                ),
                                &[],
                            );
                            continue;
                        }
                        values.push((metric, reg.unit.clone(), value));
                    }
                }
                Some(Err(RequestError::Exception(code))) => {
                    answered = true;
                    self.records.rejects.reject(
                        "modbus_exception",
                        &format_args!(
                            "slave {id} function {} address {} ({}): {} (exception {:#04x})",
                            reg.function,
                            reg.address,
                            reg.metric,
                            code,
                            u8::from(code)
                        ),
                        &[],
                    );
                }
                Some(Err(RequestError::Decode(e))) => {
                    answered = true;
                    self.records.rejects.reject(
                        e.reason(),
                        &format_args!(
                            "slave {id} function {} address {} ({}): {e}",
                            reg.function, reg.address, reg.metric
                        ),
                        &[],
                    );
                }
                Some(Err(RequestError::NoValidAnswer(reason, _))) if reason == "no_answer" => {
                    // Silence: the slave is absent or dead; stop this poll here.
                    failure = Some((
                        reason,
                        format!("{reason} after {attempts} attempt(s) of {timeout:?}"),
                    ));
                    break;
                }
                Some(Err(RequestError::NoValidAnswer(reason, bytes))) => {
                    // The slave said something, but garbled: it is alive; keep the bytes
                    // for diagnosis and go on with the next register.
                    answered = true;
                    self.records.rejects.reject(
                        reason,
                        &format_args!(
                            "slave {id} function {} address {} ({}) after {attempts} attempt(s)",
                            reg.function, reg.address, reg.metric
                        ),
                        &bytes,
                    );
                }
                Some(Err(RequestError::Framing(e))) => {
                    answered = true;
                    self.records
                        .rejects
                        .reject("bad_frame", &format_args!("slave {id}: {e}"), &[]);
                }
                Some(Err(RequestError::Bus(e))) => return Err(PollAbort::Bus(e)),
            }
        }
        self.finish_poll(i, answered, failure, values, observed_at, &device)
            .await;
        if rebuild {
            return Err(PollAbort::Rebuild);
        }
        Ok(())
    }

    async fn finish_poll(
        &mut self,
        i: usize,
        answered: bool,
        failure: Option<(&'static str, String)>,
        values: Vec<(String, Option<String>, f64)>,
        observed_at: chrono::DateTime<chrono::Utc>,
        device: &str,
    ) {
        let now = Instant::now();
        let now_wall = self.ctx.clock.now();
        let slave = &mut self.slaves[i];
        slave.polls += 1;
        let was = slave.online;
        let mut changed = false;
        match (&failure, answered) {
            (Some((_, text)), _) => {
                slave.failed_polls += 1;
                slave.last_error = Some(text.clone());
                if was != Some(false) {
                    tracing::warn!(
                        slave = slave.config.id,
                        device = %slave.device,
                        error = %text,
                        "Modbus slave does not answer; marked offline and polled with backoff."
                    );
                    slave.online = Some(false);
                    slave.since = now_wall;
                    changed = true;
                }
                slave.next_due = now + slave.backoff.next_delay();
            }
            (None, _) => {
                if was != Some(true) {
                    if was == Some(false) {
                        tracing::info!(slave = slave.config.id, device = %slave.device, "Modbus slave answers again.");
                    }
                    slave.online = Some(true);
                    slave.since = now_wall;
                    slave.backoff.reset();
                    changed = true;
                }
                let next = slave.next_due + slave.config.interval.get();
                slave.next_due = if next < now { now } else { next };
            }
        }
        if changed {
            self.publish_state();
        }
        if values.is_empty() {
            return;
        }
        let Some(sequence) = self.records.next_sequence(values.len()).await else {
            return;
        };
        let flags = if crate::clock::is_synchronized() {
            0
        } else {
            flags::CLOCK_UNSYNCED
        };
        let slave_id = self.slaves[i].config.id;
        let readings: Vec<Reading> = values
            .into_iter()
            .map(|(metric, unit, value)| Reading {
                uid: Uid::derive(&[&self.config.name, &sequence, &metric]),
                source: self.config.name.clone(),
                device: device.to_string(),
                metric,
                value,
                unit,
                observed_at,
                received_at: observed_at,
                flags,
                meta: Some(serde_json::json!({ "slave": slave_id }).into()),
            })
            .collect();
        self.ctx
            .metrics
            .received(&self.config.name, readings.len() as u64);
        self.records.window.send(readings).await;
    }

    fn slave_rows(&self) -> Vec<(String, String)> {
        self.slaves
            .iter()
            .map(|s| {
                let state = match s.online {
                    Some(true) => "online",
                    Some(false) => "offline",
                    None => "unknown",
                };
                let value = serde_json::json!({
                    "state": state,
                    "device": s.device,
                    "since": s.since.to_rfc3339(),
                    "polls": s.polls,
                    "failed_polls": s.failed_polls,
                    "last_error": s.last_error,
                });
                (format!("slave.{}", s.config.id), value.to_string())
            })
            .collect()
    }
}

impl PortOwner for ModbusSource {
    const WHAT: &'static str = "Modbus adapter";

    fn set_state(&mut self, state: &str, error: Option<&str>) {
        self.bus_open = state == "open";
        let since = self.ctx.clock.now();
        self.records
            .set_state(state, &self.config.path, since, error);
        self.publish_state();
    }

    fn publish_state(&mut self) {
        // Health: connected while the bus is open and some slave is not offline.
        let bus_open = self.bus_open;
        let any_alive = self.slaves.iter().any(|s| s.online != Some(false));
        self.ctx
            .metrics
            .set_connected(&self.config.name, bus_open && any_alive);
        let slaves = self.slave_rows();
        self.records.publish(slaves);
    }

    fn log_open(&self, back_after: Option<Duration>) {
        if back_after.is_some() {
            tracing::info!(path = %self.config.path, "Modbus adapter is back; polling again.");
        } else {
            tracing::info!(path = %self.config.path, baud = self.config.port.baud, slaves = self.slaves.len(), "Modbus bus open.");
        }
    }
}

enum BusOutcome {
    Shutdown,
    Gone(std::io::Error),
}

enum PollAbort {
    Bus(std::io::Error),
    /// The tokio-modbus context broke its framing; make a new one on the same port.
    Rebuild,
}

/// One request/answer exchange, after the inter-frame gap.
async fn request(
    client: &mut tokio_modbus::client::Context,
    port: &SharedPort,
    reg: &RegisterConfig,
    timeout: Duration,
    gap: Duration,
) -> Result<Vec<f64>, RequestError> {
    let line_free_at = port.begin_request();
    tokio::time::sleep_until(line_free_at + gap).await;
    let answer = tokio::time::timeout(timeout, client.call(reg.request())).await;
    let response = match answer {
        Err(_elapsed) => {
            let received = port.received();
            let fault =
                classify_timeout(&received, answer_len(reg.function, reg.quantity() as u16));
            return Err(RequestError::NoValidAnswer(fault.reason(), received));
        }
        Ok(Err(tokio_modbus::Error::Transport(e))) => {
            return Err(match e.kind() {
                std::io::ErrorKind::InvalidData => RequestError::Framing(e.to_string()),
                _ => RequestError::Bus(e),
            })
        }
        Ok(Err(tokio_modbus::Error::Protocol(e))) => {
            return Err(
                RequestError::NoValidAnswer("unexpected_frame", port.received()).with_detail(e),
            )
        }
        Ok(Ok(Err(code))) => return Err(RequestError::Exception(code)),
        Ok(Ok(Ok(response))) => response,
    };
    let decoded = match response {
        Response::ReadCoils(bits) | Response::ReadDiscreteInputs(bits) => {
            decode_bits(&bits, reg.count)
        }
        Response::ReadHoldingRegisters(words) | Response::ReadInputRegisters(words) => {
            decode_registers(
                &words,
                reg.value_type,
                reg.count,
                reg.word_order,
                reg.byte_order,
            )
        }
        other => {
            return Err(RequestError::Framing(format!(
                "unexpected response {other:?}"
            )));
        }
    };
    decoded.map_err(RequestError::Decode)
}

impl RequestError {
    fn with_detail(self, e: tokio_modbus::ProtocolError) -> RequestError {
        tracing::debug!(error = %e, "Modbus answer did not match the request.");
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn problems_of(value: serde_json::Value) -> Vec<String> {
        let mut problems = Problems::default();
        if let Some(c) = problems.deserialize::<ModbusConfig>(value, "sources[0]") {
            c.validate("sources[0]", &mut problems);
        }
        problems.0.into_iter().map(|(path, _)| path).collect()
    }

    #[test]
    fn a_minimal_config_is_valid() {
        let ok = json!({"name": "bus", "path": "/dev/ttyUSB0",
                        "slaves": [{"id": 1, "registers": [{"metric": "v", "address": 0}]}]});
        assert!(problems_of(ok).is_empty());
    }

    #[test]
    fn wrong_values_are_all_reported() {
        let got = problems_of(json!({
            "name": "bus", "path": "", "inter_frame_gap": "2s", "offline_max_interval": "10ms",
            "slaves": [
                {"id": 0, "registers": []},
                {"id": 5, "interval": "1ms", "timeout": "1ms", "retries": 9, "device": "a b",
                 "registers": [
                    {"metric": "bad name", "function": 5, "address": 0},
                    {"metric": "wide", "address": 0, "count": 63, "type": "f32"},
                    {"metric": "tail", "address": 65535, "type": "u32"},
                    {"metric": "coil", "function": 1, "address": 0, "type": "f32", "count": 0},
                    {"metric": "s", "address": 0, "scale": 0.0, "min": 10.0, "max": 1.0}
                 ]},
                {"id": 5, "registers": [{"metric": "v", "address": 0}]},
                {"id": 248, "registers": [{"metric": "v", "address": 0}]}
            ]
        }));
        for path in [
            "sources[0].path",
            "sources[0].inter_frame_gap",
            "sources[0].offline_max_interval",
            "sources[0].slaves[0].id",
            "sources[0].slaves[0].registers",
            "sources[0].slaves[1].interval",
            "sources[0].slaves[1].timeout",
            "sources[0].slaves[1].retries",
            "sources[0].slaves[1].device",
            "sources[0].slaves[1].registers[0].metric",
            "sources[0].slaves[1].registers[0].function",
            "sources[0].slaves[1].registers[1].count",
            "sources[0].slaves[1].registers[2].address",
            "sources[0].slaves[1].registers[3].type",
            "sources[0].slaves[1].registers[3].count",
            "sources[0].slaves[1].registers[4].scale",
            "sources[0].slaves[1].registers[4].min",
            "sources[0].slaves[2].id",
            "sources[0].slaves[3].id",
        ] {
            assert!(
                got.iter().any(|p| p == path),
                "{path} not reported in {got:#?}"
            );
        }
        let none = problems_of(json!({"name": "bus", "path": "/dev/x", "slaves": []}));
        assert_eq!(none, vec!["sources[0].slaves"]);
        let typo = problems_of(json!({"name": "bus", "path": "/dev/x", "slaves": [
            {"id": 1, "registers": [{"metric": "v", "address": 0, "type": "f64", "word_order": "middle"}]}]}));
        assert!(
            typo.iter().any(|p| p.ends_with("registers[0].type")),
            "{typo:?}"
        );
        assert!(
            typo.iter().any(|p| p.ends_with("registers[0].word_order")),
            "{typo:?}"
        );
    }

    #[test]
    fn the_inter_frame_gap_follows_the_baud_rate() {
        let mut c: ModbusConfig =
            serde_json::from_value(json!({"name": "b", "path": "/dev/x", "slaves": []})).unwrap();
        // 9600 baud, 8N1: 10 bits per character, 3.5 characters ≈ 3.65ms.
        assert_eq!(c.gap().as_micros(), 3645);
        c.port.baud = 115_200;
        assert_eq!(c.gap(), Duration::from_micros(1750));
        c.inter_frame_gap = Some(HumanDuration::from_millis(8));
        assert_eq!(c.gap(), Duration::from_millis(8));
    }
}
