//! The in-flight batch window of the sources that read a port (serial, Modbus): a
//! batch goes to the store as soon as it is complete, and at most [`MAX_IN_FLIGHT`]
//! wait for their commit; more make the source wait (and with it the port: bytes
//! wait in the kernel's buffer, slaves are not polled).
//!
//! A batch refused because the disk is full is offered again (same uids, so never
//! stored twice) as soon as another commit succeeded or [`super::FULL_RETRY`] passed,
//! until it is stored; meanwhile the source reads nothing new. Only a shutdown while
//! the disk is still full loses it (logged with the count).

use super::rejects::SequenceAllocator;
use super::{AckResult, SourceContext};
use crate::model::{Batch, Committed, Reading};
use crate::store::StoreError;
use std::collections::VecDeque;
use tokio::sync::oneshot;

/// The most batches awaiting their commit at once; more makes the source wait.
pub const MAX_IN_FLIGHT: usize = 8;

/// A batch sent to the store: a copy of its readings and its commit result.
type InFlight = (
    Vec<Reading>,
    oneshot::Receiver<Result<Committed, StoreError>>,
);

/// Batches sent and not yet committed, with a copy of their readings to offer again if
/// the disk was full; and what the store refused.
pub struct BatchWindow {
    ctx: SourceContext,
    source: String,
    /// "serial", "Modbus": for the log.
    what: &'static str,
    /// What a full disk does to this source, for the log.
    waiting: &'static str,
    in_flight: VecDeque<InFlight>,
    store_refusals: u64,
    /// Waits for a full disk (for rate-limited logging).
    full_waits: u64,
}

impl BatchWindow {
    pub fn new(
        ctx: &SourceContext,
        source: &str,
        what: &'static str,
        waiting: &'static str,
    ) -> BatchWindow {
        BatchWindow {
            ctx: ctx.clone(),
            source: source.to_string(),
            what,
            waiting,
            in_flight: VecDeque::new(),
            store_refusals: 0,
            full_waits: 0,
        }
    }

    /// The next sequence number for the uids of `readings` readings; while the disk is
    /// full, waits for room like a refused batch does. `None` if the store refused
    /// (counted and logged: the readings are lost).
    pub async fn next_sequence(
        &mut self,
        sequence: &mut SequenceAllocator,
        readings: usize,
    ) -> Option<String> {
        loop {
            match sequence.next().await {
                Ok(s) => return Some(s.to_string()),
                Err(StoreError::Full) if !self.ctx.shutdown.is_cancelled() => {
                    super::note_disk_full(self.waiting, &mut self.full_waits);
                    self.ctx.wait_for_disk_room().await;
                }
                Err(e) => {
                    self.refused(&e, readings);
                    return None;
                }
            }
        }
    }

    /// Sends `readings` as one batch; waits only when more than [`MAX_IN_FLIGHT`]
    /// batches wait for their commit, and settles those already committed.
    pub async fn send(&mut self, readings: Vec<Reading>) {
        let (batch, ack) = Batch::with_ack(readings.clone());
        // The channel is bounded: when the writer is behind, the source waits here.
        if self.ctx.out.send(batch).await.is_err() {
            return;
        }
        self.in_flight.push_back((readings, ack));
        self.set_waiting();
        while self.in_flight.len() > MAX_IN_FLIGHT {
            if let Some((readings, ack)) = self.in_flight.pop_front() {
                let result = ack.await;
                self.settle(readings, result).await;
            }
        }
        while let Some(Ok(result)) = self.in_flight.front_mut().map(|(_, a)| a.try_recv()) {
            if let Some((readings, _)) = self.in_flight.pop_front() {
                self.settle(readings, Ok(result)).await;
            }
        }
    }

    /// The commit result of the oldest batch in flight; never ready when there is none.
    /// Cancel-safe: hand the result to [`settle_oldest`](Self::settle_oldest).
    pub async fn next_ack(&mut self) -> AckResult {
        match self.in_flight.front_mut() {
            Some((_, ack)) => ack.await,
            None => std::future::pending().await,
        }
    }

    /// Settles the oldest batch with the result [`next_ack`](Self::next_ack) gave, so a
    /// batch refused by a full disk is offered again even when nothing new arrives.
    pub async fn settle_oldest(&mut self, result: AckResult) {
        if let Some((readings, _)) = self.in_flight.pop_front() {
            self.settle(readings, result).await;
        }
    }

    /// Waits for every batch in flight (at shutdown).
    pub async fn drain(&mut self) {
        while let Some((readings, ack)) = self.in_flight.pop_front() {
            let result = ack.await;
            self.settle(readings, result).await;
        }
    }

    /// Handles a batch's commit result (see the module's documentation).
    async fn settle(&mut self, readings: Vec<Reading>, result: AckResult) {
        self.set_waiting();
        let result = self
            .ctx
            .resend_while_full(&readings, result, self.waiting, &mut self.full_waits)
            .await;
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.refused(&e, readings.len()),
            Err(_) => self.refused(&StoreError::Closed, 0),
        }
    }

    fn set_waiting(&self) {
        self.ctx
            .stage(&self.source)
            .set_waiting(self.in_flight.len() as u64);
    }

    /// Counts readings the store refused; logs at every power of two.
    fn refused(&mut self, e: &StoreError, readings: usize) {
        self.store_refusals += 1;
        if self.store_refusals.is_power_of_two() {
            tracing::error!(error = %e, readings, refusals = self.store_refusals, "The store refused {} readings; they are lost.", self.what);
        }
    }
}
