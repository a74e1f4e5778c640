//! The alert engine: a state machine per (rule, device), fed with committed readings in
//! commit order and with a periodic tick for what happens without readings (`for`
//! timers, stale devices, reminders).
//!
//! [`Engine`] itself is synchronous and takes `now` explicitly, so every rule kind is
//! tested step by step; [`engine_task`] wraps it in the task that reads the store, writes
//! each decision with the cursor in one transaction, and wakes the notification worker.
//!
//! **Queues and waits (G9).** A feeder task follows the store's committed-readings
//! stream (its own read connection, woken by the writer's `watch`, which never blocks
//! the writer) and hands batches to the engine through a queue of two. The engine waits
//! for that queue, its tick, and the store writer (each decision's write); it wakes the
//! outbox worker with a `Notify`, which never blocks. The writer waits for neither the
//! engine nor the feeder, and the feeder waits only for the engine, so no wait depends
//! on itself.

use super::cumulative::{self, Measure, Recorded, Tally, TallyRow, TallySave};
use super::state::{self, Changes, NewEvent, Phase, SeenSeries, StateChange, StateRow};
use super::{
    AlertEvent, AlertRule, Clock, CompiledRule, Condition, CumulativeLimit, Direction, EventKind,
    MAX_RATE_SAMPLES,
};
use crate::model::{to_micros, Reading, Uid};
use crate::ratelimit::LogLimiter;
use crate::store::Store;
use chrono::{DateTime, Utc};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How often `for` timers, stale devices and reminders are checked.
pub const TICK: Duration = Duration::from_secs(1);
/// The cursor is saved at least this often when readings cause no transition (a crash
/// re-evaluates at most this much, which is harmless: the state was saved with it).
/// Each save is a commit of its own (a WAL frame and an fsync); at 2 s it was a fifth
/// of all commits of a 200-sensor site, so it is kept rare (docs/reliability.md,
/// "SD-card wear"). Transitions are still saved at once.
const CURSOR_SAVE_INTERVAL: Duration = Duration::from_secs(30);
/// Readings evaluated per step.
const READ_BATCH: usize = 1024;

/// Site and gateway, copied into every event.
#[derive(Debug, Clone, Default)]
pub struct EventContext {
    pub site: String,
    pub gateway_id: String,
    /// How values are shown in the events' texts.
    pub display: crate::display::DisplayConfig,
}

#[derive(Debug, Clone)]
struct Series {
    metric: String,
    phase: Option<Phase>,
    /// When the condition began (pending or firing start).
    since: DateTime<Utc>,
    value: Option<f64>,
    unit: Option<String>,
    last_seen: DateTime<Utc>,
    last_notified: Option<DateTime<Utc>>,
    /// Rate rules: `(observed_at, value)` within the period, oldest first.
    window: VecDeque<(DateTime<Utc>, f64)>,
    /// Rate rules after a clock step: no decision before this agent time, while the
    /// window refills with readings stamped after the step.
    rate_hold_until: Option<DateTime<Utc>>,
    /// Cumulative rules: the window's spans and excursions, and what it held at the
    /// last reading (shown in the events).
    tally: Option<Tally>,
    measure: Option<Measure>,
    /// When the alert fired (escalation delays count from it).
    fired_at: Option<DateTime<Utc>>,
    /// Escalation steps sent for this firing, and the notifiers they reached.
    escalations_sent: u32,
    escalated_to: Vec<String>,
    /// This firing was acknowledged: no more reminders or escalation.
    acked: bool,
}

impl Series {
    fn new(metric: &str, now: DateTime<Utc>) -> Series {
        Series {
            metric: metric.to_string(),
            phase: None,
            since: now,
            value: None,
            unit: None,
            last_seen: now,
            last_notified: None,
            window: VecDeque::new(),
            rate_hold_until: None,
            tally: None,
            measure: None,
            fired_at: None,
            escalations_sent: 0,
            escalated_to: Vec::new(),
            acked: false,
        }
    }
}

/// The rule evaluator. Feed it readings and ticks; collect [`Changes`] to persist.
pub struct Engine {
    rules: Vec<CompiledRule>,
    series: HashMap<(usize, String), Series>,
    context: EventContext,
    changes: Changes,
    /// The uid of the reading being evaluated, or `None` for timers: events carry it
    /// in their own uid, so two transitions of one series evaluated at the same `now`
    /// (a backlog caught up in one batch) stay two events.
    trigger: Option<Uid>,
    /// Cumulative series whose tally changed since it was last taken for saving, and
    /// tallies of removed or changed rules to delete.
    dirty_tallies: BTreeSet<(usize, String)>,
    tally_deletes: Vec<TallySave>,
    /// A clock step moved tallies: save them without waiting for the cursor's turn.
    tallies_urgent: bool,
}

fn elapsed(now: DateTime<Utc>, since: DateTime<Utc>) -> Duration {
    (now - since).to_std().unwrap_or_default()
}

impl Engine {
    pub fn new(rules: Vec<CompiledRule>, context: EventContext) -> Engine {
        Engine {
            rules,
            series: HashMap::new(),
            context,
            changes: Changes::default(),
            trigger: None,
            dirty_tallies: BTreeSet::new(),
            tally_deletes: Vec::new(),
            tallies_urgent: false,
        }
    }

    /// Compiles the configured rules (already validated).
    pub fn from_config(rules: &[AlertRule], context: EventContext) -> anyhow::Result<Engine> {
        let compiled = rules
            .iter()
            .map(CompiledRule::new)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("invalid alert rule {e}"))?;
        Ok(Engine::new(compiled, context))
    }

    /// Whether some rule filters on tags (then restoring needs the readings' meta).
    pub fn needs_meta(&self) -> bool {
        self.rules.iter().any(|r| !r.def.tags.is_empty())
    }

    /// Takes back persisted state after a restart. States of rules that no longer exist
    /// (removed or changed) are dropped. Series seen before get a stale timer that
    /// starts no earlier than `now`: the agent cannot know what happened while it was
    /// down, so a device gets the full `after` to report again.
    pub fn restore(&mut self, states: Vec<StateRow>, seen: Vec<SeenSeries>, now: DateTime<Utc>) {
        for row in states {
            let Some(i) = self.rules.iter().position(|r| r.key == row.rule_key) else {
                tracing::info!(rule = %row.rule, device = %row.device, "Alert state of a removed or changed rule dropped.");
                self.changes.states.push(StateChange::Delete {
                    rule_key: row.rule_key,
                    device: row.device,
                    metric: row.metric,
                });
                continue;
            };
            let mut s = Series::new(&row.metric, now);
            s.phase = Some(row.phase);
            s.since = row.since;
            s.value = row.value;
            s.unit = row.unit;
            s.last_notified = row.last_notified;
            if row.phase == Phase::Firing {
                s.fired_at = Some(row.fired_at.unwrap_or(row.since));
                s.escalations_sent = row.escalations_sent;
                s.escalated_to = row.escalated_to;
                s.acked = row.ack.is_some();
            }
            self.series.insert((i, row.device), s);
        }
        for seen in seen {
            for (i, rule) in self.rules.iter().enumerate() {
                if rule.matches(&seen.device, &seen.metric, seen.meta.as_ref()) {
                    let s = self
                        .series
                        .entry((i, seen.device.clone()))
                        .or_insert_with(|| Series::new(&seen.metric, now));
                    s.last_seen = seen.last_received.max(now);
                }
            }
        }
    }

    /// The rate series whose windows should be reloaded: `(rule, device, metric, period)`.
    pub fn rate_series(&self) -> Vec<(usize, String, String, Duration)> {
        self.series
            .iter()
            .filter_map(|((i, device), s)| match self.rules[*i].condition {
                Condition::Rate { period, .. } => {
                    Some((*i, device.clone(), s.metric.clone(), period))
                }
                _ => None,
            })
            .collect()
    }

    /// Refills a rate window with stored samples (oldest first).
    pub fn seed_window(&mut self, rule: usize, device: &str, samples: Vec<(DateTime<Utc>, f64)>) {
        if let Some(s) = self.series.get_mut(&(rule, device.to_string())) {
            s.window = samples.into_iter().collect();
        }
    }

    /// Takes back the saved tallies of cumulative rules; those of rules that no longer
    /// exist (removed or changed) are deleted with the next save.
    pub fn restore_tallies(&mut self, rows: Vec<TallyRow>, now: DateTime<Utc>) {
        for row in rows {
            let i = self.rules.iter().position(|r| {
                r.key == row.rule_key && matches!(r.condition, Condition::Cumulative { .. })
            });
            let Some(i) = i else {
                self.tally_deletes.push(TallySave {
                    rule_key: row.rule_key,
                    device: row.device,
                    metric: row.metric,
                    tally: None,
                });
                continue;
            };
            let s = self
                .series
                .entry((i, row.device))
                .or_insert_with(|| Series::new(&row.metric, now));
            s.tally = Some(row.tally);
        }
    }

    /// The tallies to save with the cursor (changed ones and deletions); see
    /// [`Engine::retry_tallies`] when the save fails.
    pub fn take_tallies(&mut self) -> Vec<TallySave> {
        self.tallies_urgent = false;
        let mut out = std::mem::take(&mut self.tally_deletes);
        for key in std::mem::take(&mut self.dirty_tallies) {
            let (Some(s), Some(rule)) = (self.series.get(&key), self.rules.get(key.0)) else {
                continue;
            };
            out.push(TallySave {
                rule_key: rule.key.clone(),
                device: key.1.clone(),
                metric: s.metric.clone(),
                tally: s.tally.clone(),
            });
        }
        out
    }

    /// A save of `taken` failed: they are taken again (as they are then) next time.
    pub fn retry_tallies(&mut self, taken: Vec<TallySave>) {
        for t in taken {
            match self.rules.iter().position(|r| r.key == t.rule_key) {
                Some(i) if t.tally.is_some() => {
                    self.dirty_tallies.insert((i, t.device));
                }
                _ => self.tally_deletes.push(t),
            }
        }
        self.tallies_urgent = true;
    }

    /// Whether tallies must be saved now (after a clock step), not with the cursor.
    pub fn tallies_urgent(&self) -> bool {
        self.tallies_urgent
    }

    /// The wall clock was stepped by `step` (positive: forward; see [`crate::clock`]).
    /// The agent times the timers count from (pending `for`, stale, reminders) move
    /// with it, so a step neither fires nor delays them: durations keep following the
    /// monotonic clock. Rate windows hold readings stamped on both sides of the step,
    /// which would fake a rate (or hide one); they restart, and rate rules decide
    /// nothing (neither fire nor resolve) until one `period` after the step.
    pub fn clock_stepped(&mut self, step: chrono::Duration, now: DateTime<Utc>) {
        let mut changed = Vec::new();
        for (key, s) in self.series.iter_mut() {
            s.since += step;
            s.last_seen += step;
            if let Some(t) = s.last_notified.as_mut() {
                *t += step;
            }
            if let Some(t) = s.fired_at.as_mut() {
                *t += step;
            }
            if let Condition::Rate { period, .. } = self.rules[key.0].condition {
                s.window.clear();
                s.rate_hold_until =
                    Some(now + chrono::Duration::from_std(period).unwrap_or_default());
            }
            if let (Condition::Cumulative { max_gap, .. }, Some(tally)) =
                (&self.rules[key.0].condition, s.tally.as_mut())
            {
                // Readings stamped after the step may follow it for one `max_gap`.
                let until = now + chrono::Duration::from_std(*max_gap).unwrap_or_default();
                tally.clock_stepped(step, until);
                self.dirty_tallies.insert(key.clone());
                self.tallies_urgent = true;
            }
            if s.phase.is_some() {
                changed.push(key.clone());
            }
        }
        changed.sort();
        for key in changed {
            self.persist(&key);
        }
    }

    /// Evaluates one committed reading at `now`.
    pub fn on_reading(&mut self, r: &Reading, now: DateTime<Utc>) {
        self.trigger = Some(r.uid);
        self.evaluate_reading(r, now);
        self.trigger = None;
    }

    fn evaluate_reading(&mut self, r: &Reading, now: DateTime<Utc>) {
        for i in 0..self.rules.len() {
            if !self.rules[i].matches_reading(r) {
                continue;
            }
            let key = (i, r.device.clone());
            let s = self
                .series
                .entry(key.clone())
                .or_insert_with(|| Series::new(&r.metric, now));
            s.last_seen = now;
            s.unit.clone_from(&r.unit);
            match self.rules[i].condition.clone() {
                Condition::Threshold {
                    direction,
                    level,
                    clear,
                    hold,
                } => {
                    self.evaluate(&key, direction, r.value, level, clear, hold, r.value, now);
                }
                Condition::Rate {
                    direction,
                    delta,
                    clear,
                    period,
                    hold,
                } => {
                    let change = rate_change(&mut s.window, r, direction, period);
                    if s.rate_hold_until.is_some_and(|t| now < t) {
                        s.value = Some(r.value);
                        continue;
                    }
                    s.rate_hold_until = None;
                    self.evaluate(&key, direction, change, delta, clear, hold, r.value, now);
                }
                Condition::Cumulative {
                    direction,
                    level,
                    clear,
                    limit,
                    within,
                    max_gap,
                } => {
                    let tally = s.tally.get_or_insert_with(Tally::default);
                    let out = direction.breaches(r.value, level);
                    let ends = direction.clears(r.value, clear);
                    if tally.record(r.observed_at, out, ends, within, max_gap, now)
                        == Recorded::OutOfOrder
                    {
                        continue;
                    }
                    let m = tally.measure(within);
                    let reached = match limit {
                        CumulativeLimit::Total(total) => m.out >= total,
                        CumulativeLimit::Count(n) => m.excursions >= n,
                    };
                    s.value = Some(r.value);
                    s.measure = Some(m);
                    self.dirty_tallies.insert(key.clone());
                    match (s.phase, reached) {
                        (None | Some(Phase::Pending), true) => {
                            s.since = now;
                            self.fire(&key, now);
                        }
                        (Some(Phase::Firing), false) => self.resolve(&key, now),
                        _ => {}
                    }
                }
                Condition::Stale { .. } => {
                    if s.phase == Some(Phase::Firing) {
                        s.value = Some(r.value);
                        self.resolve(&key, now);
                    }
                    if let Some(s) = self.series.get_mut(&key) {
                        s.value = Some(r.value);
                    }
                }
            }
        }
    }

    /// One threshold step: `x` is compared with `level` (alert) and `clear` (resolve);
    /// `value` is what events report.
    #[allow(clippy::too_many_arguments)]
    fn evaluate(
        &mut self,
        key: &(usize, String),
        direction: Direction,
        x: f64,
        level: f64,
        clear: f64,
        hold: Duration,
        value: f64,
        now: DateTime<Utc>,
    ) {
        let Some(s) = self.series.get_mut(key) else {
            return;
        };
        match s.phase {
            None => {
                if direction.breaches(x, level) {
                    s.phase = Some(Phase::Pending);
                    s.since = now;
                    s.value = Some(value);
                    if hold.is_zero() {
                        self.fire(key, now);
                    } else {
                        self.persist(key);
                    }
                }
            }
            Some(Phase::Pending) => {
                if !direction.breaches(x, level) {
                    // Interrupted: `for` means without interruption.
                    s.phase = None;
                    s.value = Some(value);
                    self.persist(key);
                } else {
                    s.value = Some(value);
                    if elapsed(now, s.since) >= hold {
                        self.fire(key, now);
                    }
                }
            }
            Some(Phase::Firing) => {
                s.value = Some(value);
                if direction.clears(x, clear) {
                    self.resolve(key, now);
                }
            }
        }
    }

    /// Checks timers at `now`: pending alerts whose `for` has passed, stale devices and
    /// reminders.
    pub fn tick(&mut self, now: DateTime<Utc>) {
        let mut due: Vec<((usize, String), EventKind)> = Vec::new();
        for (key, s) in &self.series {
            let rule = &self.rules[key.0];
            match (&rule.condition, s.phase) {
                (Condition::Stale { after }, None) if elapsed(now, s.last_seen) >= *after => {
                    due.push((key.clone(), EventKind::Firing));
                }
                (
                    Condition::Threshold { hold, .. } | Condition::Rate { hold, .. },
                    Some(Phase::Pending),
                ) if elapsed(now, s.since) >= *hold => {
                    due.push((key.clone(), EventKind::Firing));
                }
                (_, Some(Phase::Firing)) if !s.acked => {
                    if let (Some(every), Some(last)) = (rule.def.reminder, s.last_notified) {
                        if elapsed(now, last) >= every.get() {
                            due.push((key.clone(), EventKind::Reminder));
                        }
                    }
                    if super::escalation_due(rule, s.escalations_sent, s.fired_at, now) {
                        due.push((key.clone(), EventKind::Escalated));
                    }
                }
                _ => {}
            }
        }
        due.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, kind) in due {
            match kind {
                EventKind::Firing => {
                    if let Some(s) = self.series.get_mut(&key) {
                        if s.phase.is_none() {
                            // stale: the condition began when the last reading came
                            s.since = s.last_seen;
                        }
                    }
                    self.fire(&key, now);
                }
                EventKind::Escalated => self.escalate(&key, now),
                _ => self.remind(&key, now),
            }
        }
    }

    /// The decisions since the last call, to be written with the cursor.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Firing alerts, for tests and diagnostics: `(rule, device)`.
    pub fn firing(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .series
            .iter()
            .filter(|(_, s)| s.phase == Some(Phase::Firing))
            .map(|((i, d), _)| (self.rules[*i].def.name.clone(), d.clone()))
            .collect();
        v.sort();
        v
    }

    fn fire(&mut self, key: &(usize, String), now: DateTime<Utc>) {
        if let Some(s) = self.series.get_mut(key) {
            s.phase = Some(Phase::Firing);
            s.last_notified = Some(now);
            s.fired_at = Some(now);
            s.escalations_sent = 0;
            s.escalated_to.clear();
            s.acked = false;
        }
        let notifiers = self.rules[key.0].def.notifiers.clone();
        self.emit(key, EventKind::Firing, now, notifiers, None);
        self.persist(key);
    }

    /// The rule's notifiers and those the sent escalation steps reached.
    fn everyone_notified(&self, key: &(usize, String)) -> Vec<String> {
        let mut out = self.rules[key.0].def.notifiers.clone();
        if let Some(s) = self.series.get(key) {
            for n in &s.escalated_to {
                if !out.contains(n) {
                    out.push(n.clone());
                }
            }
        }
        out
    }

    /// Reminders go to everyone notified so far (escalated notifiers included).
    fn remind(&mut self, key: &(usize, String), now: DateTime<Utc>) {
        if let Some(s) = self.series.get_mut(key) {
            s.last_notified = Some(now);
        }
        let notifiers = self.everyone_notified(key);
        self.emit(key, EventKind::Reminder, now, notifiers, None);
        self.persist(key);
    }

    /// Sends every escalation step that is due at `now` (several after a long
    /// downtime), each once: its uid derives from the firing and the step.
    fn escalate(&mut self, key: &(usize, String), now: DateTime<Utc>) {
        loop {
            let rule = &self.rules[key.0];
            let Some(s) = self.series.get(key) else {
                return;
            };
            if s.acked || !super::escalation_due(rule, s.escalations_sent, s.fired_at, now) {
                break;
            }
            let index = s.escalations_sent as usize;
            let Some(step) = rule.def.escalation.get(index) else {
                break;
            };
            let notifiers = step.notifiers.clone();
            let uid = Uid::derive(&[
                "alert-escalation",
                &rule.key,
                &key.1,
                &s.metric,
                &s.fired_at.map(to_micros).unwrap_or_default().to_string(),
                &index.to_string(),
            ]);
            let label = format!(
                "escalation step {} of {}",
                index + 1,
                rule.def.escalation.len()
            );
            if let Some(s) = self.series.get_mut(key) {
                s.escalations_sent += 1;
                for n in &notifiers {
                    if !s.escalated_to.contains(n) {
                        s.escalated_to.push(n.clone());
                    }
                }
            }
            self.emit(
                key,
                EventKind::Escalated,
                now,
                notifiers,
                Some((uid, label)),
            );
        }
        self.persist(key);
    }

    /// Resolution goes to everyone who was notified of this firing.
    fn resolve(&mut self, key: &(usize, String), now: DateTime<Utc>) {
        let notifiers = self.everyone_notified(key);
        self.emit(key, EventKind::Resolved, now, notifiers, None);
        if let Some(s) = self.series.get_mut(key) {
            s.phase = None;
            s.last_notified = None;
            s.fired_at = None;
            s.escalations_sent = 0;
            s.escalated_to.clear();
            s.acked = false;
        }
        self.persist(key);
    }

    /// Takes the acknowledgements written to the store by [`super::ack`] (polled by the
    /// engine task): `(rule_key, device, metric, fired_at µs)` of acknowledged firings.
    /// One for an earlier firing of the same series (it resolved since) is ignored.
    /// The steps recorded as sent with it replace the engine's (a step decided after
    /// the acknowledgement was dropped when written, and its notifiers get no
    /// resolution).
    pub fn apply_acks(&mut self, acks: &[state::AckedFiring]) {
        for ack in acks {
            let Some(i) = self.rules.iter().position(|r| r.key == ack.rule_key) else {
                continue;
            };
            if let Some(s) = self.series.get_mut(&(i, ack.device.clone())) {
                if s.phase == Some(Phase::Firing)
                    && s.metric == ack.metric
                    && s.fired_at.map(to_micros) == Some(ack.fired_at)
                {
                    s.acked = true;
                    s.escalations_sent = ack.escalations_sent;
                    s.escalated_to.clone_from(&ack.escalated_to);
                }
            }
        }
    }

    /// Whether the firing alert of `rule` on `device` is acknowledged (tests).
    pub fn is_acked(&self, rule: &str, device: &str) -> bool {
        self.series
            .iter()
            .any(|((i, d), s)| d == device && self.rules[*i].def.name == rule && s.acked)
    }

    fn emit(
        &mut self,
        key: &(usize, String),
        kind: EventKind,
        now: DateTime<Utc>,
        notifiers: Vec<String>,
        escalation: Option<(Uid, String)>,
    ) {
        let (Some(s), Some(rule)) = (self.series.get(key), self.rules.get(key.0)) else {
            return;
        };
        let device = &key.1;
        let trigger = self
            .trigger
            .map_or_else(|| "timer".to_string(), |uid| uid.to_hex());
        let (uid, note) = match escalation {
            Some((uid, label)) => (uid, Some(label)),
            None => (
                Uid::derive(&[
                    "alert-event",
                    &rule.key,
                    device,
                    &s.metric,
                    kind.as_str(),
                    &to_micros(now).to_string(),
                    &trigger,
                ]),
                None,
            ),
        };
        let mut condition = rule.describe(
            s.unit.as_deref(),
            self.context.display.precision_of(&s.metric),
        );
        if let (Condition::Cumulative { limit, .. }, Some(m)) = (&rule.condition, s.measure) {
            condition.push_str(&cumulative::describe_measure(*limit, m));
        }
        let event = AlertEvent {
            uid: uid.to_hex(),
            kind,
            rule: rule.def.name.clone(),
            severity: rule.def.severity,
            site: self.context.site.clone(),
            gateway_id: self.context.gateway_id.clone(),
            device: device.clone(),
            metric: s.metric.clone(),
            value: s.value,
            unit: s.unit.clone(),
            threshold: rule.threshold(),
            condition,
            precision: self.context.display.precision_of(&s.metric),
            since: s.since,
            at: now,
            actor: None,
            note,
            channel: None,
        };
        self.changes.events.push(NewEvent { event, notifiers });
    }

    fn persist(&mut self, key: &(usize, String)) {
        let (Some(s), Some(rule)) = (self.series.get(key), self.rules.get(key.0)) else {
            return;
        };
        let change = match s.phase {
            None => StateChange::Delete {
                rule_key: rule.key.clone(),
                device: key.1.clone(),
                metric: s.metric.clone(),
            },
            Some(phase) => StateChange::Upsert(StateRow {
                rule_key: rule.key.clone(),
                device: key.1.clone(),
                metric: s.metric.clone(),
                rule: rule.def.name.clone(),
                severity: rule.def.severity,
                phase,
                since: s.since,
                value: s.value,
                unit: s.unit.clone(),
                last_notified: s.last_notified,
                fired_at: s.fired_at,
                escalations_sent: s.escalations_sent,
                escalated_to: s.escalated_to.clone(),
                ack: None,
            }),
        };
        self.changes.states.push(change);
    }
}

/// Which readings may change an alert's state at once, judged as they enter the store
/// writer (before their commit), so that the writer commits them without delay
/// ([`Store::set_urgency`]): the event they cause is written in the commit after, and an
/// alert does not wait for a group's spacing or a source's commit delay. Each rule's
/// readings are sorted into zones — past the alert level, back at the clear level, in
/// between (for rate rules, of the change over the window as the engine computes it) —
/// and a reading is urgent when its zone differs from the series' previous one, and
/// for stale rules when the series was silent for `after`. For threshold and rate
/// rules a move between the clear level and the in-between zone is not urgent unless
/// the series was past the alert level since it last cleared: the engine starts an
/// alert only past the alert level, ends a pending one only when it leaves that zone,
/// and resolves a firing one only at the clear level, so such a move changes nothing
/// (a value hovering around the clear level would otherwise commit every reading
/// alone). A misjudgement costs only latency or a commit more: the engine still
/// decides on committed readings alone.
pub struct Urgency {
    rules: Vec<CompiledRule>,
    series: HashMap<(usize, String), Mark>,
}

#[derive(Default)]
struct Mark {
    zone: u8,
    /// Past the alert level since it last cleared (or unknown, after a start with a
    /// first reading out of range): only then can a return to the clear level resolve.
    armed: bool,
    seen: Option<std::time::Instant>,
    window: VecDeque<(DateTime<Utc>, f64)>,
}

/// A rate rule's step: `r` joins the series' `window` (in observed order; samples older
/// than `period` before it, or beyond [`MAX_RATE_SAMPLES`], leave it) and the change
/// of `r` against the window's minimum (`Above`) or maximum (`Below`), 0 when none.
/// The engine and the urgency test keep their own windows and share this step.
fn rate_change(
    window: &mut VecDeque<(DateTime<Utc>, f64)>,
    r: &Reading,
    direction: Direction,
    period: std::time::Duration,
) -> f64 {
    if window.back().is_none_or(|(t, _)| r.observed_at >= *t) {
        window.push_back((r.observed_at, r.value));
    }
    let horizon =
        r.observed_at - chrono::Duration::from_std(period).unwrap_or(chrono::Duration::MAX);
    while window.front().is_some_and(|(t, _)| *t < horizon) || window.len() > MAX_RATE_SAMPLES {
        window.pop_front();
    }
    let values = window.iter().map(|(_, v)| *v);
    let change = match direction {
        Direction::Above => r.value - values.fold(f64::INFINITY, f64::min),
        Direction::Below => r.value - values.fold(f64::NEG_INFINITY, f64::max),
    };
    if change.is_finite() {
        change
    } else {
        0.0
    }
}

/// 0: cleared, 1: in between, 2: past the alert level.
fn zone(direction: Direction, x: f64, level: f64, clear: f64) -> u8 {
    if direction.breaches(x, level) {
        2
    } else if direction.clears(x, clear) {
        0
    } else {
        1
    }
}

impl Urgency {
    /// For the configured rules (already validated); `None` without rules.
    pub fn from_config(rules: &[AlertRule]) -> anyhow::Result<Option<Urgency>> {
        if rules.is_empty() {
            return Ok(None);
        }
        let rules = rules
            .iter()
            .map(CompiledRule::new)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("invalid alert rule {e}"))?;
        Ok(Some(Urgency {
            rules,
            series: HashMap::new(),
        }))
    }

    /// Whether `r` may change an alert at once; follows each series.
    pub fn check(&mut self, r: &Reading) -> bool {
        if !r.value.is_finite() {
            return false;
        }
        let now = std::time::Instant::now();
        let mut urgent = false;
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.matches_reading(r) {
                continue;
            }
            let key = (i, r.device.clone());
            let mark = self.series.entry(key).or_default();
            let first = mark.seen.is_none();
            let zone = match rule.condition {
                Condition::Threshold {
                    direction,
                    level,
                    clear,
                    ..
                } => zone(direction, r.value, level, clear),
                Condition::Cumulative {
                    direction,
                    level,
                    clear,
                    ..
                } => {
                    // Every reading out of range may reach the limit.
                    let z = zone(direction, r.value, level, clear);
                    urgent |= z != 0;
                    z
                }
                Condition::Rate {
                    direction,
                    delta,
                    clear,
                    period,
                    ..
                } => {
                    let change = rate_change(&mut mark.window, r, direction, period);
                    zone(direction, change, delta, clear)
                }
                Condition::Stale { after } => {
                    // A reading after the silence resolves a stale alert (after a
                    // restart the silence is unknown: the first reading counts).
                    urgent |= mark
                        .seen
                        .is_none_or(|seen| now.duration_since(seen) >= after);
                    0
                }
            };
            let changed = if first { zone != 0 } else { zone != mark.zone };
            let hysteresis = matches!(
                rule.condition,
                Condition::Threshold { .. } | Condition::Rate { .. }
            );
            let may_change = !hysteresis || first || zone == 2 || mark.zone == 2 || mark.armed;
            urgent |= changed && may_change;
            if zone == 2 || (first && zone != 0) {
                mark.armed = true;
            } else if zone == 0 {
                mark.armed = false;
            }
            mark.zone = zone;
            mark.seen = Some(now);
        }
        urgent
    }
}

/// A future the caller spawns (as a pipeline consumer).
pub type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The alert engine for `rules`, as a task for the caller to spawn (none without
/// rules). It follows the store's committed readings until that stream ends (after the
/// sources stopped), writes each decision with its outbox rows, and notifies `wake`
/// (the notification worker's, see `notify::outbox_task`) when it wrote some.
/// `notifier_ttls` gives each notifier's `ttl` (the outbox rows' expiry). `urgency`, if
/// given, is installed in the store writer ([`Store::set_urgency`]) once the engine
/// knows where it starts, until it stops. Fails on a rule that cannot be compiled.
#[allow(clippy::too_many_arguments)]
pub fn engine_task(
    rules: &[AlertRule],
    context: EventContext,
    notifier_ttls: HashMap<String, Duration>,
    store: &Store,
    clock: Clock,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
    urgency: Option<Urgency>,
) -> anyhow::Result<Option<Task>> {
    if rules.is_empty() {
        return Ok(None);
    }
    let engine = Engine::from_config(rules, context)?;
    Ok(Some(Box::pin(
        run_engine(
            engine,
            store.clone(),
            clock,
            wake,
            notifier_ttls,
            shutdown,
            urgency,
        )
        .instrument(tracing::info_span!("alerts")),
    )))
}

/// Runs a blocking read on a fresh read connection.
async fn read<T: Send + 'static>(
    store: &Store,
    f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let store = store.clone();
    let result = tokio::task::spawn_blocking(move || {
        let conn = store.reader()?;
        f(&conn)
    })
    .await?;
    Ok(result?)
}

async fn run_engine(
    mut engine: Engine,
    store: Store,
    clock: Clock,
    wake: Arc<Notify>,
    ttl: HashMap<String, Duration>,
    stop: CancellationToken,
    urgency: Option<Urgency>,
) {
    let with_meta = engine.needs_meta();
    let mut attempt = 0u32;
    let loaded = loop {
        match read(&store, move |conn| state::load(conn, with_meta)).await {
            Ok(l) => break l,
            Err(e) if attempt < 10 => {
                attempt += 1;
                tracing::warn!(
                    error = format!("{e:#}"),
                    "Cannot load alert state yet; retrying."
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "Cannot load alert state: ALERTS ARE NOT EVALUATED."
                );
                return;
            }
        }
    };
    engine.restore(loaded.states, loaded.seen, clock.now());
    match read(&store, cumulative::load).await {
        Ok(tallies) => engine.restore_tallies(tallies, clock.now()),
        Err(e) => {
            // Starting with empty tallies would forget excursion time: stop instead, as
            // for the alert state above.
            tracing::error!(
                error = format!("{e:#}"),
                "Cannot load the tallies of cumulative rules: ALERTS ARE NOT EVALUATED."
            );
            return;
        }
    }
    for (rule, device, metric, period) in engine.rate_series() {
        let since = clock.now() - chrono::Duration::from_std(period).unwrap_or_default();
        let (d, m) = (device.clone(), metric);
        match read(&store, move |conn| state::rate_samples(conn, &d, &m, since)).await {
            Ok(samples) => engine.seed_window(rule, &device, samples),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "Cannot reload a rate window; it refills from new readings."
            ),
        }
    }
    // On the very first start, evaluate from now on, not the whole history. That point
    // is saved before anything is evaluated: a SIGKILL before the first save would
    // otherwise move it, at the next start, past readings committed meanwhile.
    let (start, mut saved_cursor) = match loaded.cursor {
        Some(cursor) => (cursor, Some(cursor)),
        None => {
            let newest = loaded.newest_reading;
            match store
                .write(move |conn| state::anchor_cursor(conn, newest))
                .await
            {
                Ok(cursor) => (cursor, Some(cursor)),
                Err(crate::store::StoreError::Closed) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot save the alert engine's starting point yet; it is saved with the first change.");
                    (newest, None)
                }
            }
        }
    };
    tracing::info!(cursor = start, "Alert engine started.");
    // Only now: readings committed sooner for it before the starting point was fixed
    // would be passed over on a first start.
    let _urgency = urgency.map(|mut u| store.set_urgency(Box::new(move |r| u.check(r))));

    // The committed-readings stream is read by its own task: its `next_batch` is not
    // safe to cancel, and the select below must also serve the tick. Two batches in
    // flight at most.
    let (tx, mut rx) = mpsc::channel::<Vec<crate::store::StoredReading>>(2);
    let mut stream = match store.committed_readings(start) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "Cannot read committed readings: ALERTS ARE NOT EVALUATED.");
            return;
        }
    };
    let feeder = tokio::spawn(async move {
        while let Some(rows) = stream.next_batch(READ_BATCH).await {
            if tx.send(rows).await.is_err() {
                break;
            }
        }
    });

    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut position = start;
    // G9: committed readings not yet evaluated wait for the engine (seen from outside,
    // so a hung engine is still measured); each evaluated batch is progress.
    let stage = store.progress().stage(
        crate::progress::ALERTS,
        "committed readings not yet evaluated",
        Some(crate::progress::STORE),
    );
    let evaluated = Arc::new(std::sync::atomic::AtomicI64::new(start));
    let (committed, seen) = (store.committed_watch(), Arc::downgrade(&evaluated));
    stage.add_probe(Box::new(move || {
        let seen = seen.upgrade()?.load(std::sync::atomic::Ordering::Relaxed);
        Some((*committed.borrow()).saturating_sub(seen).max(0) as u64)
    }));
    let mut unsaved = engine.take_changes();
    let mut ack_reader: Option<rusqlite::Connection> = None;
    let mut last_save = tokio::time::Instant::now();
    let mut save_failures = LogLimiter::default();
    // Wall-clock steps, seen against tokio's monotonic clock (paused in tests).
    let mut steps = crate::clock::StepDetector::default();
    let mut stepped = chrono::Duration::zero();
    let mut now_after_steps = |engine: &mut Engine, stepped: &mut chrono::Duration| {
        let now = clock.now();
        if let Some(step) = steps.observe(now, tokio::time::Instant::now().into_std()) {
            engine.clock_stepped(step, now);
            *stepped += step;
        }
        now
    };
    loop {
        let open = tokio::select! {
            rows = rx.recv() => match rows {
                Some(rows) => {
                    crate::progress::fault::hold(crate::progress::fault::ALERTS_HANG).await;
                    let now = now_after_steps(&mut engine, &mut stepped);
                    for row in &rows {
                        engine.on_reading(&row.reading, now);
                        position = row.id;
                    }
                    evaluated.store(position, std::sync::atomic::Ordering::Relaxed);
                    stage.progress();
                    true
                }
                None => false,
            },
            _ = ticker.tick() => {
                // Acknowledgements are written by other connections (the CLI, the
                // sync worker, the console): pick them up before deciding reminders
                // and escalations (`state::apply` also drops any decided meanwhile).
                if let Some(acks) = poll_acks(&store, &mut ack_reader).await {
                    engine.apply_acks(&acks);
                }
                let now = now_after_steps(&mut engine, &mut stepped);
                engine.tick(now);
                true
            }
            // Stopped for a reload or at shutdown: save the cursor and state; readings
            // not evaluated yet are evaluated by the next engine from that cursor.
            _ = stop.cancelled() => false,
        };
        unsaved.append(engine.take_changes());
        if !stepped.is_zero() {
            // Pending notifications keep their retry delays and TTLs across the step.
            let shift = std::mem::take(&mut stepped).num_microseconds().unwrap_or(0);
            let result = store
                .write(move |conn| {
                    conn.execute(
                        "UPDATE outbox SET next_attempt_at = next_attempt_at + ?1, \
                         expires_at = expires_at + ?1 WHERE state = 'pending'",
                        [shift],
                    )
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "Cannot move notification deadlines after a clock step.");
            }
        }
        let cursor_due = saved_cursor != Some(position)
            && (last_save.elapsed() >= CURSOR_SAVE_INTERVAL || !open);
        if !unsaved.is_empty() || cursor_due || engine.tallies_urgent() {
            let changes = unsaved.clone();
            let (ttl, now) = (ttl.clone(), clock.now());
            let events = changes.events.len();
            // Cumulative tallies as they are at `position`: saved with it, so a restart
            // neither counts a reading twice nor loses one.
            let tallies = Arc::new(engine.take_tallies());
            let saving = tallies.clone();
            let result = store
                .write(move |conn| {
                    state::apply(conn, &changes, Some(position), &ttl, DEFAULT_TTL, now)?;
                    cumulative::save(conn, &saving, now)
                })
                .await;
            if result.is_err() {
                engine.retry_tallies(Arc::try_unwrap(tallies).unwrap_or_else(|t| (*t).clone()));
            }
            match result {
                Ok(()) => {
                    unsaved = Changes::default();
                    saved_cursor = Some(position);
                    last_save = tokio::time::Instant::now();
                    if events > 0 {
                        wake.notify_one();
                    }
                }
                Err(crate::store::StoreError::Closed) => {
                    if !unsaved.is_empty() {
                        tracing::warn!("The store closed before alert changes were saved; they are re-evaluated at the next start.");
                    }
                    break;
                }
                Err(e) => {
                    if let Some(suppressed) = save_failures.allow() {
                        tracing::error!(error = %e, suppressed, "Cannot save alert state; retrying (alerts are still evaluated).");
                    }
                }
            }
        }
        if !open {
            break;
        }
    }
    feeder.abort();
    tracing::info!(cursor = position, "Alert engine stopped.");
}

/// The acknowledged firings ([`state::acknowledged`]) on the engine's own read
/// connection, kept between ticks; `None` (logged at debug) when the read failed.
async fn poll_acks(
    store: &Store,
    reader: &mut Option<rusqlite::Connection>,
) -> Option<Vec<state::AckedFiring>> {
    let conn = reader.take();
    let store = store.clone();
    let joined = tokio::task::spawn_blocking(move || {
        let conn = match conn {
            Some(c) => c,
            None => store.reader()?,
        };
        let acks = state::acknowledged(&conn);
        acks.map(|a| (conn, a))
    })
    .await;
    match joined {
        Ok(Ok((conn, acks))) => {
            *reader = Some(conn);
            Some(acks)
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "Cannot read acknowledgements; retrying at the next tick.");
            None
        }
        Err(_) => None,
    }
}

/// TTL for a notifier missing from the map (cannot happen with a validated config).
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    use crate::alerts::test_reading as reading;

    fn engine(rule_toml: &str) -> Engine {
        let rule: AlertRule = toml::from_str(rule_toml).unwrap();
        Engine::from_config(
            &[rule],
            EventContext {
                site: "Site".into(),
                gateway_id: "gw".into(),
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn kinds(changes: &Changes) -> Vec<EventKind> {
        changes.events.iter().map(|e| e.event.kind).collect()
    }

    const HOT: &str = "name = \"hot\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\nclear = 6.0\nfor = \"10s\"\nnotifiers = [\"ops\"]\nreminder = \"1m\"";

    /// The firing and the resolved notification show their values by one rule: the
    /// metric's `[display] precision`, or the default (never "12.80" then "4").
    #[test]
    fn firing_and_resolved_texts_format_values_alike() {
        let rule: AlertRule = toml::from_str(&HOT.replace("for = \"10s\"\n", "")).unwrap();
        let texts = |display: crate::display::DisplayConfig| {
            let context = EventContext {
                display,
                ..Default::default()
            };
            let mut e = Engine::from_config(std::slice::from_ref(&rule), context).unwrap();
            e.on_reading(&reading("a", 12.8, at(0)), at(0));
            e.on_reading(&reading("a", 4.0, at(5)), at(5));
            e.take_changes()
                .events
                .iter()
                .map(|n| {
                    let ev = &n.event;
                    let value = ev.value.map_or_else(
                        || "-".to_string(),
                        |v| crate::display::format_value(v, ev.unit.as_deref(), ev.precision),
                    );
                    let kind = ev.kind.as_str().to_uppercase();
                    format!("{kind} {} {value} ({})", ev.metric, ev.condition)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            texts(Default::default()),
            [
                "FIRING temperature 12.8 °C (above 8 °C)",
                "RESOLVED temperature 4 °C (above 8 °C)"
            ]
        );
        let one_decimal = crate::display::DisplayConfig {
            precision: [("temperature".to_string(), 1)].into(),
        };
        assert_eq!(
            texts(one_decimal),
            [
                "FIRING temperature 12.8 °C (above 8.0 °C)",
                "RESOLVED temperature 4.0 °C (above 8.0 °C)"
            ]
        );
    }

    /// Readings are urgent when they may change an alert: a crossing of the alert or
    /// the clear level (either way), the first reading past a level, a reading after a
    /// stale rule's silence; steady readings on either side are not.
    #[test]
    fn urgency_marks_crossings_not_steady_readings() {
        let rules: Vec<AlertRule> = [
            "name = \"warm\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\nclear = 6.0\nfor = \"5m\"",
            "name = \"rise\"\nkind = \"rate\"\nmetric = \"temperature\"\ndelta = 3.0\nperiod = \"10m\"",
        ]
        .iter()
        .map(|t| toml::from_str(t).unwrap())
        .collect();
        let mut u = Urgency::from_config(&rules).unwrap().unwrap();
        let mut check = |secs: i64, value: f64| u.check(&reading("fridge", value, at(secs)));
        assert!(!check(0, 4.0), "a first reading in range");
        assert!(!check(60, 4.5));
        assert!(check(120, 9.0), "past the alert level (and a rise of 4.5)");
        assert!(!check(180, 9.5), "still past it, no new rise");
        assert!(check(240, 7.0), "back between the levels");
        assert!(check(300, 5.0), "back at the clear level");
        assert!(!check(360, 5.5));
        // Between the levels and back without passing the alert level: nothing can
        // change (issue 15: a value hovering at the clear level is not urgent).
        assert!(
            !check(960, 6.5),
            "above the clear level, never past the alert level"
        );
        assert!(!check(1020, 5.9), "back at the clear level, nothing fired");
        assert!(!check(1080, 6.9));
        assert!(check(1140, 8.5), "past the alert level");
        assert!(check(1200, 6.9), "between the levels: ends a pending alert");
        assert!(!check(1260, 7.5));
        assert!(
            check(1320, 5.0),
            "at the clear level: resolves a firing alert"
        );
        // A first reading between the levels may meet a firing alert restored at start.
        let mut u = Urgency::from_config(&rules).unwrap().unwrap();
        assert!(
            u.check(&reading("fridge", 7.0, at(0))),
            "first, between the levels"
        );
        assert!(
            u.check(&reading("fridge", 5.0, at(60))),
            "then at the clear level"
        );
        assert!(!Urgency::from_config(&rules)
            .unwrap()
            .unwrap()
            .check(&reading("fridge", f64::NAN, at(0))));
        let stale: AlertRule = toml::from_str(
            "name = \"silent\"\nkind = \"stale\"\nmetric = \"temperature\"\nafter = \"15m\"",
        )
        .unwrap();
        let mut u = Urgency::from_config(&[stale]).unwrap().unwrap();
        assert!(
            u.check(&reading("fridge", 4.0, at(0))),
            "the first after a start"
        );
        assert!(!u.check(&reading("fridge", 4.0, at(60))));
        assert!(Urgency::from_config(&[]).unwrap().is_none());
    }

    #[test]
    fn a_clock_step_neither_completes_nor_delays_timers() {
        let stale = "name = \"quiet\"\nkind = \"stale\"\nmetric = \"temperature\"\nafter = \"1m\"\nnotifiers = [\"ops\"]";
        let rules: Vec<AlertRule> = [HOT, stale]
            .iter()
            .map(|t| toml::from_str(t).unwrap())
            .collect();
        let mut e = Engine::from_config(&rules, EventContext::default()).unwrap();
        e.on_reading(&reading("a", 9.0, at(0)), at(0));
        e.take_changes();
        // Forward by a day at 5 s: the 10 s `for` and the 1 m stale timer keep counting
        // from where they were.
        let day = chrono::Duration::days(1);
        e.clock_stepped(day, at(5) + day);
        e.tick(at(6) + day);
        assert!(e.take_changes().events.is_empty(), "nothing is due yet");
        e.tick(at(10) + day);
        assert_eq!(
            kinds(&e.take_changes()),
            vec![EventKind::Firing],
            "for = 10s"
        );
        // Back by an hour: the reminder (1m) still comes 1 m after the firing.
        let hour = chrono::Duration::hours(1);
        e.clock_stepped(-hour, at(20) + day - hour);
        e.on_reading(&reading("a", 9.0, at(21) + day - hour), at(21) + day - hour);
        e.tick(at(69) + day - hour);
        assert!(e.take_changes().events.is_empty());
        e.tick(at(70) + day - hour);
        assert_eq!(kinds(&e.take_changes()), vec![EventKind::Reminder]);
    }

    #[test]
    fn rate_rules_wait_one_period_after_a_step() {
        let mut e = engine("name = \"door\"\nkind = \"rate\"\nmetric = \"temperature\"\ndelta = 3.0\nperiod = \"1m\"");
        e.on_reading(&reading("a", 1.0, at(0)), at(0));
        // Back by an hour: the readings before and after the step must not make a rate.
        let hour = chrono::Duration::hours(1);
        e.clock_stepped(-hour, at(10) - hour);
        e.on_reading(&reading("a", 2.0, at(10) - hour), at(10) - hour);
        e.on_reading(&reading("a", 5.5, at(60) - hour), at(60) - hour);
        assert!(e.take_changes().events.is_empty(), "held for one period");
        e.on_reading(&reading("a", 9.0, at(71) - hour), at(71) - hour);
        assert_eq!(
            kinds(&e.take_changes()),
            vec![EventKind::Firing],
            "9.0 - 5.5 within a minute"
        );
    }

    #[test]
    fn threshold_for_must_hold_without_interruption() {
        let mut e = engine(HOT);
        e.on_reading(&reading("a", 9.0, at(0)), at(0));
        let c = e.take_changes();
        assert!(c.events.is_empty());
        assert!(matches!(&c.states[0], StateChange::Upsert(s) if s.phase == Phase::Pending));
        // Interrupted at 5 s: back to ok, the timer restarts.
        e.on_reading(&reading("a", 7.0, at(5)), at(5));
        assert!(matches!(
            e.take_changes().states[0],
            StateChange::Delete { .. }
        ));
        e.on_reading(&reading("a", 9.0, at(6)), at(6));
        e.tick(at(15));
        assert!(
            e.take_changes().events.is_empty(),
            "only 9 s since the restart"
        );
        e.tick(at(16));
        let c = e.take_changes();
        assert_eq!(kinds(&c), vec![EventKind::Firing]);
        let ev = &c.events[0];
        assert_eq!(ev.event.since, at(6));
        assert_eq!(ev.event.at, at(16));
        assert_eq!(ev.event.value, Some(9.0));
        assert_eq!(ev.event.condition, "above 8 °C for 10s");
        assert_eq!(ev.notifiers, vec!["ops".to_string()]);
        assert_eq!(e.firing(), vec![("hot".into(), "a".into())]);
    }

    #[test]
    fn crossings_evaluated_at_the_same_instant_are_distinct_events() {
        // A backlog caught up in one batch: every reading is evaluated at the same
        // `now`. Each crossing must keep its own event (found by the 1,000-kill crash
        // loop: the second firing shared the first one's uid and was dropped).
        let instant = "name = \"hot\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\nclear = 6.0\nnotifiers = [\"ops\"]";
        let mut e = engine(instant);
        let now = at(100);
        for (i, value) in [9.0, 5.0, 9.5, 5.5].into_iter().enumerate() {
            e.on_reading(&reading("a", value, at(i as i64)), now);
        }
        let c = e.take_changes();
        assert_eq!(
            kinds(&c),
            vec![
                EventKind::Firing,
                EventKind::Resolved,
                EventKind::Firing,
                EventKind::Resolved
            ]
        );
        let uids: std::collections::HashSet<_> = c.events.iter().map(|e| &e.event.uid).collect();
        assert_eq!(uids.len(), 4, "one uid per event");
    }

    #[test]
    fn hysteresis_resolves_only_at_the_clear_level() {
        let mut e = engine(HOT);
        e.on_reading(&reading("a", 9.0, at(0)), at(0));
        e.tick(at(10));
        assert_eq!(kinds(&e.take_changes()), vec![EventKind::Firing]);
        // Between clear (6) and alert (8): still firing, no new event.
        e.on_reading(&reading("a", 7.0, at(11)), at(11));
        e.on_reading(&reading("a", 8.5, at(12)), at(12));
        e.on_reading(&reading("a", 6.5, at(13)), at(13));
        assert!(e.take_changes().events.is_empty());
        e.on_reading(&reading("a", 6.0, at(14)), at(14));
        let c = e.take_changes();
        assert_eq!(kinds(&c), vec![EventKind::Resolved]);
        assert_eq!(c.events[0].event.value, Some(6.0));
        assert!(matches!(c.states.last(), Some(StateChange::Delete { .. })));
        assert!(e.firing().is_empty());
    }

    #[test]
    fn reminders_repeat_while_firing() {
        let mut e = engine(HOT);
        e.on_reading(&reading("a", 9.0, at(0)), at(0));
        e.tick(at(10));
        e.take_changes();
        e.tick(at(69));
        assert!(e.take_changes().events.is_empty());
        e.tick(at(70));
        assert_eq!(kinds(&e.take_changes()), vec![EventKind::Reminder]);
        e.tick(at(100));
        assert!(e.take_changes().events.is_empty());
        e.tick(at(130));
        let c = e.take_changes();
        assert_eq!(kinds(&c), vec![EventKind::Reminder]);
        assert_ne!(c.events[0].event.uid, "");
        e.on_reading(&reading("a", 1.0, at(131)), at(131));
        assert_eq!(kinds(&e.take_changes()), vec![EventKind::Resolved]);
        e.tick(at(300));
        assert!(
            e.take_changes().events.is_empty(),
            "no reminders once resolved"
        );
    }

    #[test]
    fn below_with_zero_for_fires_at_once() {
        let mut e = engine("name = \"cold\"\nkind = \"threshold\"\nmetric = \"temperature\"\nbelow = -25.0\nclear = -20.0\ndevices = [\"freezer-*\"]");
        e.on_reading(&reading("coldroom-1", -30.0, at(0)), at(0));
        assert!(e.take_changes().is_empty(), "out of scope");
        e.on_reading(&reading("freezer-1", -30.0, at(0)), at(0));
        assert_eq!(kinds(&e.take_changes()), vec![EventKind::Firing]);
        e.on_reading(&reading("freezer-1", -21.0, at(1)), at(1));
        assert!(e.take_changes().events.is_empty());
        e.on_reading(&reading("freezer-1", -20.0, at(2)), at(2));
        assert_eq!(kinds(&e.take_changes()), vec![EventKind::Resolved]);
    }

    #[test]
    fn stale_fires_after_silence_and_resolves_on_the_next_reading() {
        let mut e = engine(
            "name = \"silent\"\nkind = \"stale\"\nmetric = \"temperature\"\nafter = \"15m\"",
        );
        e.on_reading(&reading("a", 4.0, at(0)), at(0));
        e.tick(at(899));
        assert!(e.take_changes().events.is_empty());
        e.tick(at(900));
        let c = e.take_changes();
        assert_eq!(kinds(&c), vec![EventKind::Firing]);
        assert_eq!(
            c.events[0].event.since,
            at(0),
            "silent since the last reading"
        );
        assert_eq!(c.events[0].event.value, Some(4.0));
        e.tick(at(2000));
        assert!(e.take_changes().events.is_empty(), "fires once");
        e.on_reading(&reading("a", 4.1, at(2001)), at(2001));
        assert_eq!(kinds(&e.take_changes()), vec![EventKind::Resolved]);
    }

    #[test]
    fn stale_after_restart_gives_devices_the_full_wait() {
        let mut e = engine(
            "name = \"silent\"\nkind = \"stale\"\nmetric = \"temperature\"\nafter = \"15m\"",
        );
        let seen = vec![SeenSeries {
            device: "a".into(),
            metric: "temperature".into(),
            last_received: at(-7200),
            meta: None,
        }];
        e.restore(Vec::new(), seen, at(0));
        e.tick(at(899));
        assert!(e.take_changes().events.is_empty());
        e.tick(at(900));
        assert_eq!(kinds(&e.take_changes()), vec![EventKind::Firing]);
    }

    #[test]
    fn rate_of_change_over_the_window() {
        let mut e = engine("name = \"door\"\nkind = \"rate\"\nmetric = \"temperature\"\ndelta = 3.0\nclear = 1.0\nperiod = \"10m\"");
        // A slow drift of 0.1 per minute never fires.
        for m in 0..60 {
            e.on_reading(&reading("a", 4.0 + 0.1 * m as f64, at(m * 60)), at(m * 60));
        }
        assert!(e.take_changes().events.is_empty());
        // A jump of 3.6 within 2 minutes fires (the window's minimum is 9.2, 10 min ago).
        let base = 60 * 60;
        e.on_reading(&reading("a", 13.5, at(base + 120)), at(base + 120));
        let c = e.take_changes();
        assert_eq!(kinds(&c), vec![EventKind::Firing]);
        assert_eq!(c.events[0].event.value, Some(13.5));
        assert_eq!(c.events[0].event.condition, "rose by 3 °C within 10m");
        // Holding the new level: the rise leaves the window and the alert resolves.
        e.on_reading(&reading("a", 13.5, at(base + 300)), at(base + 300));
        assert!(
            e.take_changes().events.is_empty(),
            "still within the window"
        );
        e.on_reading(&reading("a", 13.5, at(base + 800)), at(base + 800));
        assert_eq!(kinds(&e.take_changes()), vec![EventKind::Resolved]);
    }

    #[test]
    fn falling_rate() {
        let mut e = engine("name = \"drop\"\nkind = \"rate\"\nmetric = \"temperature\"\ndelta = -5.0\nperiod = \"1m\"");
        e.on_reading(&reading("a", 20.0, at(0)), at(0));
        e.on_reading(&reading("a", 14.0, at(30)), at(30));
        assert_eq!(kinds(&e.take_changes()), vec![EventKind::Firing]);
    }

    /// The engine against the clock the agent's tasks use, with tokio's time paused and
    /// advanced by hand: `for`, reminders and stale timers follow it without sleeping.
    #[tokio::test(start_paused = true)]
    async fn timers_follow_paused_tokio_time() {
        let clock = Clock::tokio(at(0));
        let mut e = engine(HOT);
        let mut silent =
            engine("name = \"silent\"\nkind = \"stale\"\nmetric = \"temperature\"\nafter = \"2m\"");
        e.on_reading(&reading("a", 9.0, clock.now()), clock.now());
        silent.on_reading(&reading("a", 9.0, clock.now()), clock.now());
        let mut fired_at = None;
        let mut reminders = 0;
        for _ in 0..150 {
            tokio::time::advance(TICK).await;
            e.tick(clock.now());
            silent.tick(clock.now());
            for ev in e.take_changes().events {
                match ev.event.kind {
                    EventKind::Firing => fired_at = Some(ev.event.at),
                    EventKind::Reminder => reminders += 1,
                    _ => {}
                }
            }
        }
        assert_eq!(
            fired_at,
            Some(at(10)),
            "fires when `for` has passed, on the tick"
        );
        assert_eq!(reminders, 2, "reminders at 70 s and 130 s");
        assert_eq!(clock.now(), at(150));
        let stale = silent.take_changes();
        assert_eq!(kinds(&stale), vec![EventKind::Firing]);
        assert_eq!(stale.events[0].event.at, at(120));
    }

    #[test]
    fn restore_keeps_firing_and_pending_and_drops_changed_rules() {
        let mut e = engine(HOT);
        e.on_reading(&reading("a", 9.0, at(0)), at(0));
        e.tick(at(10));
        e.on_reading(&reading("b", 9.0, at(20)), at(20));
        let states: Vec<StateRow> = e
            .take_changes()
            .states
            .into_iter()
            .filter_map(|c| match c {
                StateChange::Upsert(s) => Some(s),
                _ => None,
            })
            .collect();
        let mut latest: HashMap<String, StateRow> = HashMap::new();
        for s in states {
            latest.insert(s.device.clone(), s);
        }
        let mut rows: Vec<StateRow> = latest.into_values().collect();
        rows.push(StateRow {
            rule_key: "gone".into(),
            ..rows[0].clone()
        });

        let mut after = engine(HOT);
        after.restore(rows, Vec::new(), at(25));
        let c = after.take_changes();
        assert!(
            matches!(&c.states[..], [StateChange::Delete { rule_key, .. }] if rule_key == "gone")
        );
        assert_eq!(after.firing(), vec![("hot".into(), "a".into())]);
        // No second firing event for the firing one; the pending one fires on time.
        after.on_reading(&reading("a", 9.5, at(26)), at(26));
        after.tick(at(29));
        assert!(after.take_changes().events.is_empty());
        after.tick(at(30));
        let c = after.take_changes();
        assert_eq!(kinds(&c), vec![EventKind::Firing]);
        assert_eq!(c.events[0].event.device, "b");
    }
}
