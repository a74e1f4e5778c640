//! What the serial and Modbus sources share about their port: its line settings, and
//! [`ReopeningPort`], which opens it with backoff and reopens it when it disappears
//! (an unplugged USB adapter), and [`PortRecords`], what such a source records: the
//! `state` row (`open`, `waiting`, `stopped` with the path, since and error) that
//! `outpost status` shows, rejected input, sequence numbers and batches in flight.

use super::rejects::{RejectCounter, SequenceAllocator};
use super::window::BatchWindow;
use super::SourceContext;
use crate::backoff::{Backoff, Jitter};
use crate::settings::{HumanDuration, Problems};
use crate::store::state::StateWriter;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::time::{Instant, Interval};
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;

/// Line settings of the port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PortSettings {
    /// Bits per second, e.g. 9600 or 115200.
    #[serde(default = "default_baud")]
    pub baud: u32,
    /// 5, 6, 7 or 8.
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    /// `none`, `even` or `odd`.
    #[serde(default)]
    pub parity: ParityName,
    /// 1 or 2.
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    /// `none`, `software` (XON/XOFF) or `hardware` (RTS/CTS).
    #[serde(default)]
    pub flow_control: FlowControlName,
    /// Open the port exclusively (TIOCEXCL and a lock), so no other program can open
    /// it and steal bytes.
    #[serde(default = "yes")]
    pub exclusive: bool,
}

impl Default for PortSettings {
    fn default() -> Self {
        PortSettings {
            baud: default_baud(),
            data_bits: default_data_bits(),
            parity: ParityName::default(),
            stop_bits: default_stop_bits(),
            flow_control: FlowControlName::default(),
            exclusive: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ParityName {
    #[default]
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FlowControlName {
    #[default]
    None,
    Software,
    Hardware,
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn yes() -> bool {
    true
}

impl PortSettings {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if !(50..=4_000_000).contains(&self.baud) {
            problems.push(
                format!("{path}.baud"),
                format!("must be between 50 and 4000000, found {}", self.baud),
            );
        }
        if !(5..=8).contains(&self.data_bits) {
            problems.push(
                format!("{path}.data_bits"),
                format!("must be 5, 6, 7 or 8, found {}", self.data_bits),
            );
        }
        if !(1..=2).contains(&self.stop_bits) {
            problems.push(
                format!("{path}.stop_bits"),
                format!("must be 1 or 2, found {}", self.stop_bits),
            );
        }
    }

    /// A tokio-serial builder with these settings (values checked by `validate`).
    pub fn builder(&self, path: &str) -> tokio_serial::SerialPortBuilder {
        use tokio_serial::{DataBits, FlowControl, Parity, StopBits};
        tokio_serial::new(path, self.baud)
            .data_bits(match self.data_bits {
                5 => DataBits::Five,
                6 => DataBits::Six,
                7 => DataBits::Seven,
                _ => DataBits::Eight,
            })
            .parity(match self.parity {
                ParityName::None => Parity::None,
                ParityName::Even => Parity::Even,
                ParityName::Odd => Parity::Odd,
            })
            .stop_bits(if self.stop_bits == 2 {
                StopBits::Two
            } else {
                StopBits::One
            })
            .flow_control(match self.flow_control {
                FlowControlName::None => FlowControl::None,
                FlowControlName::Software => FlowControl::Software,
                FlowControlName::Hardware => FlowControl::Hardware,
            })
            .exclusive(self.exclusive)
    }

    /// Bits on the wire per character (start + data + parity + stop).
    pub fn bits_per_char(&self) -> u32 {
        1 + u32::from(self.data_bits)
            + u32::from(self.parity != ParityName::None)
            + u32::from(self.stop_bits)
    }
}

/// Checks the device `device` and its line settings (`{path}.path`, `{path}.port`).
pub fn check_port(device: &str, settings: &PortSettings, path: &str, problems: &mut Problems) {
    if device.trim().is_empty() {
        problems.push(
            format!("{path}.path"),
            "must name the serial device, e.g. /dev/serial/by-id/...",
        );
    }
    settings.validate(&format!("{path}.port"), problems);
}

/// Checks `{path}.reopen_max_delay`, the cap of [`ReopeningPort`]'s backoff.
pub fn check_reopen_max_delay(delay: HumanDuration, path: &str, problems: &mut Problems) {
    let delay = delay.get();
    if delay < Duration::from_millis(250) || delay > Duration::from_secs(3600) {
        problems.push(
            format!("{path}.reopen_max_delay"),
            "must be between 250ms and 1h",
        );
    }
}

/// What a source that reads a port does when the port opens, fails or is lost.
pub trait PortOwner {
    /// How log lines name the port: "Serial port", "Modbus adapter".
    const WHAT: &'static str;

    /// Records the port's state (`open`, `waiting`) with the error, and publishes it.
    fn set_state(&mut self, state: &str, error: Option<&str>);

    /// Publishes the state rows (every few seconds while the port is missing).
    fn publish_state(&mut self);

    /// Logs that the port is open; `back_after` is how long it was gone, if it had
    /// been open before.
    fn log_open(&self, back_after: Option<Duration>);
}

/// A port opened with backoff (250 ms doubling up to `reopen_max_delay`, jittered)
/// and reopened the same way after it failed.
pub struct ReopeningPort {
    path: String,
    settings: PortSettings,
    backoff: Backoff,
    reported_missing: bool,
    gone_since: Option<Instant>,
}

impl ReopeningPort {
    pub fn new(path: &str, settings: &PortSettings, reopen_max_delay: Duration) -> ReopeningPort {
        ReopeningPort {
            path: path.to_string(),
            settings: settings.clone(),
            backoff: Backoff::new(Duration::from_millis(250), reopen_max_delay)
                .with_jitter(Jitter::Spread(0.2)),
            reported_missing: false,
            gone_since: None,
        }
    }

    /// Opens the port, retrying with backoff until it opens (state `waiting` with the
    /// error meanwhile, then `open`); `None` at shutdown. While waiting, `publish`
    /// ticks publish the owner's state and try again at once.
    pub async fn open<O: PortOwner>(
        &mut self,
        owner: &mut O,
        shutdown: &CancellationToken,
        publish: &mut Interval,
    ) -> Option<tokio_serial::SerialStream> {
        let port = loop {
            match self.settings.builder(&self.path).open_native_async() {
                Ok(port) => break port,
                Err(e) => {
                    if !self.reported_missing {
                        self.reported_missing = true;
                        tracing::warn!(path = %self.path, error = %e, "{} cannot be opened; retrying with backoff.", O::WHAT);
                        owner.set_state("waiting", Some(&e.to_string()));
                    } else {
                        tracing::debug!(path = %self.path, error = %e, "{} still cannot be opened.", O::WHAT);
                    }
                    let delay = self.backoff.next_delay();
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(delay) => {}
                        _ = publish.tick() => owner.publish_state(),
                    }
                }
            }
        };
        self.backoff.reset();
        owner.log_open(self.gone_since.take().map(|t| t.elapsed()));
        owner.set_state("open", None);
        Some(port)
    }

    /// After the open port failed (and was dropped, so the kernel can reuse the device
    /// name): logs, records state `waiting` and waits the next delay. `false` at
    /// shutdown.
    pub async fn lost<O: PortOwner>(
        &mut self,
        owner: &mut O,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> bool {
        tracing::warn!(path = %self.path, reason = %reason, "{} disappeared; reopening with backoff.", O::WHAT);
        owner.set_state("waiting", Some(reason));
        self.gone_since = Some(Instant::now());
        self.reported_missing = true;
        let delay = self.backoff.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// What a source that reads a port records: sequence numbers for its uids, rejected
/// input, its `source_state` rows (the port's `state` row and the counts of
/// [`RejectCounter`]) and the batches awaiting their commit.
pub struct PortRecords {
    pub rejects: RejectCounter,
    pub window: BatchWindow,
    sequence: SequenceAllocator,
    state: StateWriter,
    state_rows: Vec<(String, String)>,
}

/// Sequence numbers reserved per commit of the reservation.
const SEQUENCE_BLOCK: u64 = 10_000;

impl PortRecords {
    /// `what` names the readings in log lines ("serial"); `waiting` says what a full
    /// disk does to the source.
    pub async fn load(
        ctx: &SourceContext,
        source: &str,
        what: &'static str,
        waiting: &'static str,
    ) -> anyhow::Result<PortRecords> {
        Ok(PortRecords {
            sequence: SequenceAllocator::load(source, ctx.store.clone(), SEQUENCE_BLOCK).await?,
            rejects: RejectCounter::new(source, ctx.store.clone(), ctx.metrics.clone()),
            window: BatchWindow::new(ctx, source, what, waiting),
            state: StateWriter::new(source, ctx.store.clone()),
            state_rows: Vec::new(),
        })
    }

    /// The next sequence number for the uids of `readings` readings (see
    /// [`BatchWindow::next_sequence`]).
    pub async fn next_sequence(&mut self, readings: usize) -> Option<String> {
        self.window
            .next_sequence(&mut self.sequence, readings)
            .await
    }

    /// Sets the `state` row (`open`, `waiting`, `stopped`) of the port at `path`.
    pub fn set_state(
        &mut self,
        state: &str,
        path: &str,
        since: DateTime<Utc>,
        error: Option<&str>,
    ) {
        let value = serde_json::json!({
            "state": state,
            "path": path,
            "since": since.to_rfc3339(),
            "error": error,
        });
        self.state_rows.retain(|(k, _)| k != "state");
        self.state_rows.push(("state".into(), value.to_string()));
    }

    /// Writes the changed rows, with the source's `extra` rows, in the background.
    pub fn publish(&mut self, extra: Vec<(String, String)>) {
        let rows = self.take_rows(extra);
        self.state.put(rows);
    }

    /// At stop, after the batches in flight were drained: writes the last rows.
    pub async fn finish(&mut self, extra: Vec<(String, String)>) {
        let rows = self.take_rows(extra);
        self.state.flush(rows).await;
    }

    fn take_rows(&mut self, extra: Vec<(String, String)>) -> Vec<(String, String)> {
        let mut rows = std::mem::take(&mut self.state_rows);
        rows.extend(extra);
        rows.extend(self.rejects.take_changed_rows());
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500))
            .with_jitter(Jitter::Spread(0.2));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(80) && delays[0] <= Duration::from_millis(120));
        assert!(delays[1] >= Duration::from_millis(160) && delays[1] <= Duration::from_millis(240));
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(500)));
        assert!(delays[5] >= Duration::from_millis(400));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
