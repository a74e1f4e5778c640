//! Cumulative rules (`kind = "cumulative"`): the time a series spent out of range, or the
//! number of distinct excursions, within a sliding window (WHO-style "cumulative"
//! alarms, beside the single-event threshold rule).
//!
//! What is counted, exactly:
//! - **Time is measured between readings, on their observed times.** The state of a
//!   reading holds until the next reading of the series: the span from a reading out of
//!   range to the next reading is out of range, whatever the next reading says (as data
//!   loggers count it: samples × logging interval).
//! - **A gap is unknown, not in range.** A span between two readings longer than
//!   `max_gap` counts neither as in nor as out of range; it is kept as *unknown* and shown
//!   next to the total.
//! - **The window ends at the series' newest reading** (`within` before it). Spans
//!   partly inside are counted for their part inside.
//! - **An excursion** starts at a reading out of range after a reading that ended the
//!   previous one (in range, or back at `clear` when `clear` is set); a gap does not end
//!   an excursion. It counts while its start lies within the window.
//! - **Readings evaluated once.** The tally is saved with the alert engine's cursor in
//!   the same transaction, so a restart neither counts a reading twice nor forgets one.
//! - **Clock steps (G8)** neither create nor erase excursion time. The engine reports a
//!   detected step; the next reading of a series whose timestamps followed the step
//!   (its time since the previous reading is closer to the step than to zero) moves the
//!   whole tally by the step, so the span across the step is the real time between the
//!   two readings. A series whose timestamps jump back with no step seen (by more than
//!   `max_gap`) is re-anchored the same way and the jump counts as nothing; a smaller
//!   jump back is a reading out of order and is not counted. A forward jump with no step
//!   seen is a gap (unknown, never out of range).

use super::AlertRule;
use crate::model::{from_micros, to_micros};
use crate::settings::Problems;
use chrono::{DateTime, Utc};
use rusqlite::{params, Connection};
use std::collections::VecDeque;
use std::time::Duration;

/// The longest window: the tally of a series is kept (and saved) for this long.
pub const MAX_WITHIN: Duration = Duration::from_secs(31 * 24 * 3600);
/// More excursions than this is a configuration mistake (and bounded memory).
pub const MAX_COUNT: u32 = 1000;

/// The checks of the keys only cumulative rules take (`above`/`below` and `clear` are
/// checked with the threshold rule's).
pub fn validate(rule: &AlertRule, path: &str, problems: &mut Problems) {
    match (rule.total, rule.count) {
        (None, None) => problems.push(
            format!("{path}.total"),
            "a cumulative rule needs `total` (time out of range, e.g. \"60m\") or `count` (number of excursions)",
        ),
        (Some(_), Some(_)) => problems.push(
            format!("{path}.count"),
            "set either `total` or `count`, not both (write two rules)",
        ),
        (None, Some(count)) => {
            if count == 0 || count > MAX_COUNT {
                problems.push(
                    format!("{path}.count"),
                    format!("must be between 1 and {MAX_COUNT}, found {count}"),
                );
            }
        }
        (Some(total), None) => {
            if total.get() < Duration::from_secs(1) {
                problems.push(format!("{path}.total"), "must be at least 1s");
            }
            if rule.clear.is_some() {
                problems.push(
                    format!("{path}.clear"),
                    "does not apply with `total` (it sets where an excursion ends, for `count`); remove it",
                );
            }
        }
    }
    match rule.within {
        None => problems.push(
            format!("{path}.within"),
            "a cumulative rule needs `within`, the sliding window (e.g. \"24h\")",
        ),
        Some(w) if w.get() < Duration::from_secs(60) || w.get() > MAX_WITHIN => problems.push(
            format!("{path}.within"),
            format!("must be between 1m and 31d, found {w}"),
        ),
        Some(w) => {
            if let Some(total) = rule.total.filter(|t| t.get() > w.get()) {
                problems.push(
                    format!("{path}.total"),
                    format!("{total} is longer than the window `within` = {w}: it could never be reached"),
                );
            }
        }
    }
    if let Some(gap) = rule.max_gap {
        if gap.get() < Duration::from_secs(1) || gap.get() > Duration::from_secs(7 * 24 * 3600) {
            problems.push(
                format!("{path}.max_gap"),
                format!("must be between 1s and 7d, found {gap}"),
            );
        }
    }
}

/// Most spans and excursion starts a series keeps; beyond it the oldest go first (the
/// window then under-counts, memory never grows). 24 h of one-second readings flipping
/// in and out of range would need 43,200; real sites stay far below.
pub const MAX_SPANS: usize = 10_000;

/// Default `max_gap`: readings further apart than this leave the time between them
/// unknown. CDC VFC data loggers log at least every 30 minutes; one missed reading is
/// tolerated.
pub const DEFAULT_MAX_GAP: Duration = Duration::from_secs(3600);

/// What a span of time was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Out,
    Unknown,
}

impl SpanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SpanKind::Out => "out",
            SpanKind::Unknown => "unknown",
        }
    }
    pub fn parse(s: &str) -> Option<SpanKind> {
        match s {
            "out" => Some(SpanKind::Out),
            "unknown" => Some(SpanKind::Unknown),
            _ => None,
        }
    }
}

/// `[start, end)` in the series' observed time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub kind: SpanKind,
}

/// What the window holds after a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Measure {
    pub out: Duration,
    pub unknown: Duration,
    pub excursions: u32,
}

/// How a reading was taken into the tally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    Counted,
    /// Older than the series' newest reading: not counted (out of order).
    OutOfOrder,
}

/// The per-series state of a cumulative rule; persisted with the engine's cursor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// The newest reading counted: its observed time and whether it was out of range.
    pub last: Option<(DateTime<Utc>, bool)>,
    /// An excursion is under way (no reading ended it yet).
    pub in_excursion: bool,
    /// Out-of-range and unknown spans, oldest first; adjacent out spans are merged.
    pub spans: VecDeque<Span>,
    /// Start times of excursions, oldest first.
    pub starts: VecDeque<DateTime<Utc>>,
    /// A clock step the engine saw that no reading of this series has followed yet,
    /// and the agent time until which a reading may still follow it.
    pub pending_shift: Option<(chrono::Duration, DateTime<Utc>)>,
}

fn to_chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

fn overlap(span: &Span, from: DateTime<Utc>, to: DateTime<Utc>) -> Duration {
    let start = span.start.max(from);
    let end = span.end.min(to);
    (end - start).to_std().unwrap_or_default()
}

impl Tally {
    /// Takes one reading: observed at `at`, `out` of range, and whether it `ends` an
    /// excursion. `now` is the agent's time (for clock-step bookkeeping only).
    pub fn record(
        &mut self,
        at: DateTime<Utc>,
        out: bool,
        ends: bool,
        within: Duration,
        max_gap: Duration,
        now: DateTime<Utc>,
    ) -> Recorded {
        let max_gap_c = to_chrono(max_gap);
        if let Some((mut last_at, last_out)) = self.last {
            let mut dt = at - last_at;
            if let Some((shift, until)) = self.pending_shift {
                if now > until {
                    self.pending_shift = None;
                } else if (dt - shift).abs() < dt.abs() {
                    // This series' timestamps followed the step: so does its history.
                    self.shift(shift);
                    last_at += shift;
                    dt = at - last_at;
                    self.pending_shift = None;
                }
            }
            if dt < chrono::Duration::zero() {
                if -dt > max_gap_c {
                    // The series' clock went back and no step was seen (e.g. it
                    // happened while the agent was down): keep the history's age.
                    self.shift(dt);
                    last_at = at;
                    dt = chrono::Duration::zero();
                } else {
                    return Recorded::OutOfOrder;
                }
            }
            if dt > max_gap_c {
                self.push(Span {
                    start: last_at,
                    end: at,
                    kind: SpanKind::Unknown,
                });
            } else if last_out && dt > chrono::Duration::zero() {
                self.push(Span {
                    start: last_at,
                    end: at,
                    kind: SpanKind::Out,
                });
            }
        }
        if out && !self.in_excursion {
            self.starts.push_back(at);
            self.in_excursion = true;
        }
        if ends {
            self.in_excursion = false;
        }
        self.last = Some((at, out));
        self.prune(at - to_chrono(within));
        while self.spans.len() > MAX_SPANS {
            self.spans.pop_front();
        }
        while self.starts.len() > MAX_SPANS {
            self.starts.pop_front();
        }
        Recorded::Counted
    }

    fn push(&mut self, span: Span) {
        if let Some(last) = self.spans.back_mut() {
            if last.kind == span.kind && last.end == span.start {
                last.end = span.end;
                return;
            }
        }
        self.spans.push_back(span);
    }

    /// Moves the whole history by `by` (a clock step the series followed).
    fn shift(&mut self, by: chrono::Duration) {
        for s in &mut self.spans {
            s.start += by;
            s.end += by;
        }
        for t in &mut self.starts {
            *t += by;
        }
        if let Some((t, _)) = self.last.as_mut() {
            *t += by;
        }
    }

    /// Drops what ended before `horizon`.
    fn prune(&mut self, horizon: DateTime<Utc>) {
        while self.spans.front().is_some_and(|s| s.end <= horizon) {
            self.spans.pop_front();
        }
        while self.starts.front().is_some_and(|t| *t <= horizon) {
            self.starts.pop_front();
        }
    }

    /// The engine saw the wall clock step by `step`; a reading of this series may follow
    /// it until `until` (agent time).
    pub fn clock_stepped(&mut self, step: chrono::Duration, until: DateTime<Utc>) {
        let total = self
            .pending_shift
            .map_or(step, |(s, _)| s.checked_add(&step).unwrap_or(step));
        self.pending_shift = Some((total, until));
    }

    /// What the window of length `within` ending at the newest reading holds.
    pub fn measure(&self, within: Duration) -> Measure {
        let Some((end, _)) = self.last else {
            return Measure::default();
        };
        let from = end - to_chrono(within);
        let mut m = Measure::default();
        for s in &self.spans {
            let d = overlap(s, from, end);
            match s.kind {
                SpanKind::Out => m.out += d,
                SpanKind::Unknown => m.unknown += d,
            }
        }
        m.excursions = self
            .starts
            .iter()
            .filter(|t| **t > from && **t <= end)
            .count()
            .try_into()
            .unwrap_or(u32::MAX);
        m
    }
}

/// " (now 1h 5m out of range, 2h unknown)": what the window held, for the events.
pub fn describe_measure(limit: super::CumulativeLimit, m: Measure) -> String {
    let mut text = match limit {
        super::CumulativeLimit::Total(_) => format!(" (now {} out of range", short_duration(m.out)),
        super::CumulativeLimit::Count(_) => format!(
            " (now {} excursion{}, {} out of range",
            m.excursions,
            if m.excursions == 1 { "" } else { "s" },
            short_duration(m.out)
        ),
    };
    if !m.unknown.is_zero() {
        text.push_str(&format!(", {} unknown", short_duration(m.unknown)));
    }
    text.push(')');
    text
}

/// A saved tally, as loaded at start.
#[derive(Debug, Clone, PartialEq)]
pub struct TallyRow {
    pub rule_key: String,
    pub device: String,
    pub metric: String,
    pub tally: Tally,
}

/// A tally to save (`None`: delete it, the rule is gone).
#[derive(Debug, Clone, PartialEq)]
pub struct TallySave {
    pub rule_key: String,
    pub device: String,
    pub metric: String,
    pub tally: Option<Tally>,
}

/// The saved tallies (local schema migration 5: `alert_tallies`, `alert_spans`).
pub fn load(conn: &Connection) -> rusqlite::Result<Vec<TallyRow>> {
    let mut stmt = conn.prepare(
        "SELECT rule_key, device, metric, last_at, last_out, in_excursion, shift, shift_until \
         FROM alert_tallies ORDER BY rule_key, device, metric",
    )?;
    let mut rows = stmt
        .query_map([], |r| {
            let last_at: Option<i64> = r.get(3)?;
            let shift: Option<i64> = r.get(6)?;
            let until: Option<i64> = r.get(7)?;
            Ok(TallyRow {
                rule_key: r.get(0)?,
                device: r.get(1)?,
                metric: r.get(2)?,
                tally: Tally {
                    last: last_at.map(|t| (from_micros(t), r.get::<_, bool>(4).unwrap_or(false))),
                    in_excursion: r.get(5)?,
                    pending_shift: shift
                        .zip(until)
                        .map(|(s, u)| (chrono::Duration::microseconds(s), from_micros(u))),
                    ..Default::default()
                },
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut spans = conn.prepare_cached(
        "SELECT start_at, end_at, kind FROM alert_spans WHERE rule_key = ?1 AND device = ?2 \
         AND metric = ?3 ORDER BY start_at, end_at",
    )?;
    for row in &mut rows {
        let list = spans
            .query_map(params![row.rule_key, row.device, row.metric], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for (start, end, kind) in list {
            match (kind.as_str(), SpanKind::parse(&kind)) {
                ("start", _) => row.tally.starts.push_back(from_micros(start)),
                (_, Some(kind)) => row.tally.spans.push_back(Span {
                    start: from_micros(start),
                    end: from_micros(end),
                    kind,
                }),
                // Written by a newer agent: not understood, not counted.
                (_, None) => {}
            }
        }
    }
    Ok(rows)
}

/// Saves tallies (inside the engine's transaction, with its cursor): each one replaces
/// the series' rows, so what lies beyond the window is pruned with it.
pub fn save(conn: &Connection, saves: &[TallySave], now: DateTime<Utc>) -> rusqlite::Result<()> {
    for save in saves {
        let key = params![save.rule_key, save.device, save.metric];
        conn.prepare_cached(
            "DELETE FROM alert_spans WHERE rule_key = ?1 AND device = ?2 AND metric = ?3",
        )?
        .execute(key)?;
        let Some(tally) = &save.tally else {
            conn.prepare_cached(
                "DELETE FROM alert_tallies WHERE rule_key = ?1 AND device = ?2 AND metric = ?3",
            )?
            .execute(key)?;
            continue;
        };
        conn.prepare_cached(
            "INSERT INTO alert_tallies (rule_key, device, metric, last_at, last_out, in_excursion, shift, shift_until, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
             ON CONFLICT(rule_key, device, metric) DO UPDATE SET last_at = excluded.last_at, \
             last_out = excluded.last_out, in_excursion = excluded.in_excursion, shift = excluded.shift, \
             shift_until = excluded.shift_until, updated_at = excluded.updated_at",
        )?
        .execute(params![
            save.rule_key,
            save.device,
            save.metric,
            tally.last.map(|(t, _)| to_micros(t)),
            tally.last.is_some_and(|(_, out)| out),
            tally.in_excursion,
            tally.pending_shift.map(|(s, _)| s.num_microseconds().unwrap_or(0)),
            tally.pending_shift.map(|(_, u)| to_micros(u)),
            to_micros(now),
        ])?;
        let mut insert = conn.prepare_cached(
            "INSERT INTO alert_spans (rule_key, device, metric, start_at, end_at, kind) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for span in &tally.spans {
            insert.execute(params![
                save.rule_key,
                save.device,
                save.metric,
                to_micros(span.start),
                to_micros(span.end),
                span.kind.as_str()
            ])?;
        }
        for t in &tally.starts {
            insert.execute(params![
                save.rule_key,
                save.device,
                save.metric,
                to_micros(*t),
                to_micros(*t),
                "start"
            ])?;
        }
    }
    Ok(())
}

/// "1h 5m" without seconds' noise for long spans.
pub fn short_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let rounded = if secs >= 3600 { secs - secs % 60 } else { secs };
    humantime::format_duration(Duration::from_secs(rounded)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(mins: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + mins * 60, 0).unwrap()
    }
    const H24: Duration = Duration::from_secs(24 * 3600);
    const GAP: Duration = Duration::from_secs(3600);
    fn mins(m: u64) -> Duration {
        Duration::from_secs(m * 60)
    }

    /// Feeds `(minute, out)` readings; an excursion ends at each in-range reading.
    fn feed(t: &mut Tally, readings: &[(i64, bool)]) {
        for (m, out) in readings {
            t.record(at(*m), *out, !*out, H24, GAP, at(*m));
        }
    }

    #[test]
    fn time_out_of_range_is_counted_from_a_reading_to_the_next() {
        let mut t = Tally::default();
        feed(
            &mut t,
            &[(0, false), (10, true), (20, true), (30, false), (40, false)],
        );
        let m = t.measure(H24);
        assert_eq!(m.out, mins(20), "from 10 to 30");
        assert_eq!(m.unknown, Duration::ZERO);
        assert_eq!(m.excursions, 1);
        assert_eq!(t.spans.len(), 1, "adjacent spans merge");
        // The newest reading out of range counts nothing until the next reading.
        feed(&mut t, &[(50, true)]);
        assert_eq!(t.measure(H24).out, mins(20));
        assert_eq!(t.measure(H24).excursions, 2);
        feed(&mut t, &[(55, true)]);
        assert_eq!(t.measure(H24).out, mins(25));
    }

    #[test]
    fn the_window_slides_and_cuts_spans_at_its_edge() {
        let mut t = Tally::default();
        let w = mins(60);
        for (m, out) in [(0, true), (30, false), (70, false), (80, false)] {
            t.record(at(m), out, !out, w, GAP, at(m));
        }
        // Window (20, 80]: 10 of the 30 minutes out of range are inside.
        assert_eq!(t.measure(w).out, mins(10));
        assert_eq!(t.measure(w).excursions, 0, "the start at 0 slid out");
        t.record(at(90), false, true, w, GAP, at(90));
        assert_eq!(t.measure(w).out, Duration::ZERO);
        assert!(t.spans.is_empty(), "pruned beyond the window");
        // Exactly at the edge: a span ending at the horizon is gone.
        let mut t = Tally::default();
        for (m, out) in [(0, true), (10, false), (70, false)] {
            t.record(at(m), out, !out, w, GAP, at(m));
        }
        assert_eq!(t.measure(w).out, Duration::ZERO);
    }

    #[test]
    fn a_gap_is_unknown_not_in_range_and_does_not_end_an_excursion() {
        let mut t = Tally::default();
        // Out at 0, then nothing for 3 h, then still out.
        feed(&mut t, &[(0, true), (180, true), (190, false)]);
        let m = t.measure(H24);
        assert_eq!(m.out, mins(10), "only 180 → 190 is known to be out");
        assert_eq!(m.unknown, mins(180));
        assert_eq!(m.excursions, 1, "one excursion across the gap");
        // A gap of exactly max_gap still counts.
        let mut t = Tally::default();
        feed(&mut t, &[(0, true), (60, false)]);
        assert_eq!(t.measure(H24).out, mins(60));
        assert_eq!(t.measure(H24).unknown, Duration::ZERO);
    }

    #[test]
    fn excursions_are_distinct_runs_and_clear_adds_hysteresis() {
        let mut t = Tally::default();
        feed(
            &mut t,
            &[
                (0, true),
                (1, true),
                (2, false),
                (3, true),
                (4, false),
                (5, true),
            ],
        );
        assert_eq!(t.measure(H24).excursions, 3);
        // With a clear level, 8.1 / 7.9 / 8.1 is one excursion: 7.9 does not end it.
        let mut t = Tally::default();
        for (m, out, ends) in [
            (0, true, false),
            (1, false, false),
            (2, true, false),
            (3, false, true),
        ] {
            t.record(at(m), out, ends, H24, GAP, at(m));
        }
        assert_eq!(t.measure(H24).excursions, 1);
        assert_eq!(
            t.measure(H24).out,
            mins(2),
            "time still follows the alert level"
        );
    }

    #[test]
    fn readings_out_of_order_are_not_counted() {
        let mut t = Tally::default();
        feed(&mut t, &[(0, true), (10, true)]);
        assert_eq!(
            t.record(at(5), false, true, H24, GAP, at(11)),
            Recorded::OutOfOrder
        );
        feed(&mut t, &[(20, false)]);
        assert_eq!(t.measure(H24).out, mins(20));
        assert_eq!(t.measure(H24).excursions, 1);
    }

    #[test]
    fn a_step_the_series_followed_moves_its_history() {
        // Out of range from 0; at 30 the clock jumps forward 10 h; readings continue
        // every 10 minutes of real time.
        let step = chrono::Duration::hours(10);
        let mut t = Tally::default();
        feed(&mut t, &[(0, true), (10, true), (20, true)]);
        t.clock_stepped(step, at(25) + step + GAP);
        t.record(at(30) + step, true, false, H24, GAP, at(30) + step);
        t.record(at(40) + step, false, true, H24, GAP, at(40) + step);
        let m = t.measure(H24);
        assert_eq!(m.out, mins(40), "no 10 h created");
        assert_eq!(m.unknown, Duration::ZERO);
        // A backward step of 10 h: nothing erased, nothing ignored.
        let mut t = Tally::default();
        feed(&mut t, &[(0, true), (10, true)]);
        t.clock_stepped(-step, at(15) - step + GAP);
        t.record(at(20) - step, true, false, H24, GAP, at(20) - step);
        t.record(at(30) - step, false, true, H24, GAP, at(30) - step);
        assert_eq!(t.measure(H24).out, mins(30));
        // A short backward step (readings would otherwise be "out of order").
        let mut t = Tally::default();
        feed(&mut t, &[(0, true), (10, true)]);
        let back = chrono::Duration::minutes(-8);
        t.clock_stepped(back, at(10) + GAP);
        assert_eq!(
            t.record(at(12) + back, true, false, H24, GAP, at(12) + back),
            Recorded::Counted
        );
        assert_eq!(t.measure(H24).out, mins(12));
    }

    #[test]
    fn a_series_that_did_not_follow_the_step_keeps_its_timeline() {
        // Network-server timestamps do not move with the gateway's clock.
        let step = chrono::Duration::hours(10);
        let mut t = Tally::default();
        feed(&mut t, &[(0, true), (10, true)]);
        t.clock_stepped(step, at(15) + step + GAP);
        t.record(at(20), true, false, H24, GAP, at(20) + step);
        assert_eq!(t.measure(H24).out, mins(20));
        assert!(t.pending_shift.is_some(), "kept until it expires");
        t.record(at(30), false, true, H24, GAP, at(30) + step + GAP);
        assert_eq!(t.measure(H24).out, mins(30));
        assert!(t.pending_shift.is_none(), "expired");
    }

    #[test]
    fn unexplained_jumps_never_create_excursion_time() {
        // Forward 10 h with no step seen: a gap, unknown.
        let mut t = Tally::default();
        feed(&mut t, &[(0, true), (600, true), (610, false)]);
        assert_eq!(t.measure(H24).out, mins(10));
        assert_eq!(t.measure(H24).unknown, mins(600));
        // Back 10 h with no step seen: re-anchored, the history keeps its age.
        let mut t = Tally::default();
        feed(
            &mut t,
            &[(0, true), (10, true), (-590, true), (-580, false)],
        );
        assert_eq!(t.measure(H24).out, mins(20));
    }

    #[test]
    fn memory_is_bounded() {
        let mut t = Tally::default();
        for m in 0..(2 * MAX_SPANS as i64 + 10) {
            let out = m % 2 == 0;
            t.record(
                at(m),
                out,
                !out,
                Duration::from_secs(100 * 24 * 3600),
                GAP,
                at(m),
            );
        }
        assert!(t.spans.len() <= MAX_SPANS);
        assert!(t.starts.len() <= MAX_SPANS);
    }

    // The rule in the engine: firing, resolving, the events' text, restart.

    use crate::alerts::engine::{Engine, EventContext};
    use crate::alerts::EventKind;
    use crate::model::Reading;

    /// A reading of the one series these tests watch.
    fn reading(value: f64, t: DateTime<Utc>) -> Reading {
        crate::alerts::test_reading("fridge-1", value, t)
    }

    fn engine(rule: &str) -> Engine {
        let rule: AlertRule = toml::from_str(rule).unwrap();
        let mut p = Problems::default();
        rule.validate("alerts[0]", &mut p);
        assert!(p.0.is_empty(), "{:?}", p.0);
        Engine::from_config(&[rule], EventContext::default()).unwrap()
    }

    const TOTAL: &str = "name = \"warm-total\"\nkind = \"cumulative\"\nmetric = \"temperature\"\nabove = 8.0\ntotal = \"30m\"\nwithin = \"2h\"";

    fn events(e: &mut Engine) -> Vec<(EventKind, String)> {
        e.take_changes()
            .events
            .into_iter()
            .map(|n| (n.event.kind, n.event.condition))
            .collect()
    }

    #[test]
    fn fires_when_the_total_is_reached_and_resolves_when_it_slides_out() {
        let mut e = engine(TOTAL);
        // Three separate 10-minute excursions, none long enough for a threshold alarm.
        for (m, v) in [(0, 9.0), (10, 5.0), (30, 9.0), (40, 5.0), (60, 9.0)] {
            e.on_reading(&reading(v, at(m)), at(m));
        }
        assert!(events(&mut e).is_empty(), "20 minutes so far");
        e.on_reading(&reading(5.0, at(70)), at(70));
        assert_eq!(
            events(&mut e),
            vec![(
                EventKind::Firing,
                "above 8 °C for 30m in total within 2h (now 30m out of range)".to_string()
            )]
        );
        // At 125 the window (5, 125] holds 5 + 10 + 10 minutes.
        e.on_reading(&reading(5.0, at(125)), at(125));
        let ev = events(&mut e);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].0, EventKind::Resolved);
        assert!(ev[0].1.ends_with("(now 25m out of range)"), "{}", ev[0].1);
        e.on_reading(&reading(5.0, at(130)), at(130));
        assert!(events(&mut e).is_empty());
        let saved = e.take_tallies();
        assert_eq!(saved.len(), 1);
        assert_eq!(saved[0].tally.as_ref().unwrap().spans.len(), 2, "pruned");
    }

    #[test]
    fn counts_excursions_and_reports_unknown_time() {
        let mut e = engine("name = \"door\"\nkind = \"cumulative\"\nmetric = \"temperature\"\nabove = 8.0\nclear = 7.0\ncount = 3\nwithin = \"24h\"\nmax_gap = \"30m\"");
        for (m, v) in [
            (0, 9.0),
            (5, 7.5),
            (6, 9.0),
            (10, 6.0),
            (20, 9.0),
            (25, 6.0),
            (200, 6.5),
        ] {
            e.on_reading(&reading(v, at(m)), at(m));
        }
        assert!(
            events(&mut e).is_empty(),
            "7.5 did not end the first excursion"
        );
        e.on_reading(&reading(8.5, at(210)), at(210));
        let ev = events(&mut e);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            ev[0].1,
            "3 excursions above 8 °C within 1day (now 3 excursions, 14m out of range, 2h 55m unknown)"
        );
    }

    #[test]
    fn a_restart_keeps_the_tally_without_counting_twice() {
        let mut e = engine(TOTAL);
        for (m, v) in [(0, 9.0), (10, 9.0), (20, 9.0)] {
            e.on_reading(&reading(v, at(m)), at(m));
        }
        let saved = e.take_tallies();
        let rows: Vec<TallyRow> = saved
            .into_iter()
            .map(|s| TallyRow {
                rule_key: s.rule_key,
                device: s.device,
                metric: s.metric,
                tally: s.tally.unwrap(),
            })
            .collect();
        let mut after = engine(TOTAL);
        after.restore_tallies(rows.clone(), at(21));
        after.on_reading(&reading(9.0, at(25)), at(25));
        assert!(events(&mut after).is_empty(), "25m");
        after.on_reading(&reading(9.0, at(30)), at(30));
        assert_eq!(events(&mut after)[0].0, EventKind::Firing);
        // A changed rule drops the old tally.
        let mut changed = engine(&TOTAL.replace("30m", "40m"));
        changed.restore_tallies(rows, at(21));
        let saved = changed.take_tallies();
        assert!(matches!(&saved[..], [TallySave { tally: None, .. }]));
    }

    #[test]
    fn the_tally_round_trips_through_sqlite() {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema::migrate(&mut conn).unwrap();
        let mut t = Tally::default();
        feed(&mut t, &[(0, true), (10, true), (100, false), (110, true)]);
        t.clock_stepped(chrono::Duration::hours(2), at(200));
        let save = TallySave {
            rule_key: "k".into(),
            device: "d".into(),
            metric: "m".into(),
            tally: Some(t.clone()),
        };
        super::save(&conn, std::slice::from_ref(&save), at(0)).unwrap();
        super::save(&conn, std::slice::from_ref(&save), at(0)).unwrap();
        let rows = super::load(&conn).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].tally, t, "replaced, not appended");
        super::save(
            &conn,
            &[TallySave {
                tally: None,
                ..save
            }],
            at(0),
        )
        .unwrap();
        assert!(super::load(&conn).unwrap().is_empty());
    }
}
