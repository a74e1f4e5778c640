//! Device charts: history downsampled in SQL, drawn as a server-side SVG.
//!
//! **Data.** A chart covers the last 24 h, 7 d or 30 d of one series (device, metric)
//! in 360 to 504 fixed intervals ("buckets"). SQLite computes min, max, average and
//! count per bucket with one `GROUP BY (observed_at - start) / bucket` over the
//! `readings_series` index, so a 30-day chart costs one index range scan, never a
//! transfer of the raw rows. Bucket edges are aligned to multiples of the bucket width
//! (a chart drawn twice a minute apart shares its buckets), and a bucket without
//! readings is simply absent.
//!
//! **Gaps.** Two consecutive readings further apart than the gap threshold break the
//! line: the device's `[[devices]] gap` when set, else three times the series' median
//! interval (estimated from the buckets: the mean spacing inside each bucket and the
//! spacing between neighbouring buckets). Silence before the first and after the last
//! reading of the range is a gap too, so a sensor that stopped is visible.
//!
//! **Drawing.** The min/max band per bucket, the average line, every threshold of the
//! alert rules on the series (dashed, labelled), gaps as shaded "no data" areas,
//! firings of alarms as marks on top, and axes in the agent's local time
//! (`agent.timezone`). Only SVG presentation attributes and classes: the console's
//! CSP (`style-src 'self'`) refuses inline styles, and the chart needs no script.

use crate::alerts::{AlertRule, CompiledRule, Condition, Direction};
use crate::model::to_micros;
use crate::report::Tz;
use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};
use rusqlite::{params, Connection};
use std::fmt::Write;

/// The ranges a device chart offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    Day,
    Week,
    Month,
}

impl Span {
    pub const ALL: [Span; 3] = [Span::Day, Span::Week, Span::Month];

    /// `24h`, `7d`, `30d` (query strings); anything else is `None`.
    pub fn parse(value: &str) -> Option<Span> {
        Span::ALL.into_iter().find(|s| s.as_str() == value)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Span::Day => "24h",
            Span::Week => "7d",
            Span::Month => "30d",
        }
    }

    /// How far back the chart reaches.
    pub fn duration(self) -> Duration {
        match self {
            Span::Day => Duration::hours(24),
            Span::Week => Duration::days(7),
            Span::Month => Duration::days(30),
        }
    }

    /// The width of one bucket: 4 min (360 buckets a day), 20 min (504 a week),
    /// 2 h (360 a month).
    pub fn bucket(self) -> Duration {
        match self {
            Span::Day => Duration::minutes(4),
            Span::Week => Duration::minutes(20),
            Span::Month => Duration::hours(2),
        }
    }

    /// The window ending at `now`, its start aligned down to a bucket edge.
    pub fn window(self, now: DateTime<Utc>) -> Window {
        let bucket = self.bucket().num_microseconds().unwrap_or(1).max(1);
        let end = to_micros(now);
        let from = end - self.duration().num_microseconds().unwrap_or(0);
        Window {
            start: from.div_euclid(bucket) * bucket,
            end,
            bucket,
        }
    }
}

/// A time range cut into equal buckets (all in microseconds since the epoch, UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Inclusive; a multiple of `bucket`.
    pub start: i64,
    /// Exclusive.
    pub end: i64,
    pub bucket: i64,
}

/// The readings of one bucket: `[start, start + bucket)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub start: i64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
    pub count: i64,
    /// Observed time of the bucket's first and last reading.
    pub first: i64,
    pub last: i64,
}

/// Per-bucket min/max/average of one series in `window`, oldest first; buckets
/// without readings are absent. One index range scan of `readings_series`.
pub fn downsample(
    conn: &Connection,
    device: &str,
    metric: &str,
    window: Window,
) -> rusqlite::Result<Vec<Bucket>> {
    if window.end <= window.start || window.bucket <= 0 {
        return Ok(Vec::new());
    }
    let mut stmt = conn.prepare_cached(
        "SELECT (observed_at - ?3) / ?5 AS b, MIN(value), MAX(value), AVG(value), COUNT(*), \
                MIN(observed_at), MAX(observed_at) \
         FROM readings \
         WHERE device = ?1 AND metric = ?2 AND observed_at >= ?3 AND observed_at < ?4 \
         GROUP BY b ORDER BY b",
    )?;
    let rows = stmt.query_map(
        params![device, metric, window.start, window.end, window.bucket],
        |r| {
            let b: i64 = r.get(0)?;
            Ok(Bucket {
                start: window.start + b * window.bucket,
                min: r.get(1)?,
                max: r.get(2)?,
                avg: r.get(3)?,
                count: r.get(4)?,
                first: r.get(5)?,
                last: r.get(6)?,
            })
        },
    )?;
    rows.collect()
}

/// The longest pause between two readings that is not a gap, in microseconds:
/// `configured` (the device's `gap`) when set, else three times the median spacing
/// seen in `buckets` (at least one second). `None` when nothing tells: fewer than two
/// readings and no configured gap.
pub fn gap_threshold(buckets: &[Bucket], configured: Option<std::time::Duration>) -> Option<i64> {
    if let Some(gap) = configured {
        return Some(i64::try_from(gap.as_micros()).unwrap_or(i64::MAX).max(1));
    }
    let mut spacings: Vec<i64> = Vec::with_capacity(buckets.len() * 2);
    for b in buckets.iter().filter(|b| b.count >= 2) {
        spacings.push((b.last - b.first) / (b.count - 1));
    }
    for pair in buckets.windows(2) {
        spacings.push(pair[1].first - pair[0].last);
    }
    if spacings.is_empty() {
        return None;
    }
    spacings.sort_unstable();
    let median = spacings[spacings.len() / 2];
    Some(median.saturating_mul(3).max(1_000_000))
}

/// Periods without readings in `window` longer than `threshold` (µs): between two
/// buckets, before the first reading and after the last. Without a threshold, only a
/// window with no reading at all is one gap.
pub fn gaps(buckets: &[Bucket], window: Window, threshold: Option<i64>) -> Vec<(i64, i64)> {
    let (Some(first), Some(last)) = (buckets.first(), buckets.last()) else {
        return vec![(window.start, window.end)];
    };
    let Some(threshold) = threshold else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if first.first - window.start > threshold {
        out.push((window.start, first.first));
    }
    for pair in buckets.windows(2) {
        if pair[1].first - pair[0].last > threshold {
            out.push((pair[0].last, pair[1].first));
        }
    }
    if window.end - last.last > threshold {
        out.push((last.last, window.end));
    }
    out
}

/// A level drawn across the chart: an alert rule's threshold on this series.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub rule: String,
    pub level: f64,
    /// The alarm condition is above the level (else below).
    pub above: bool,
}

/// The threshold and cumulative rules that watch (`device`, `metric`), by their level.
/// Rules with a tag filter are included when their devices match (the chart cannot
/// know the tags of every reading).
pub fn thresholds(rules: &[AlertRule], device: &str, metric: &str) -> Vec<Threshold> {
    let mut out = Vec::new();
    for def in rules {
        let Ok(rule) = CompiledRule::new(def) else {
            continue;
        };
        let mut untagged = rule.def.clone();
        untagged.tags.clear();
        let watches = CompiledRule::new(&untagged)
            .map(|r| r.matches(device, metric, None))
            .unwrap_or(false);
        if !watches {
            continue;
        }
        match rule.condition {
            Condition::Threshold {
                direction, level, ..
            }
            | Condition::Cumulative {
                direction, level, ..
            } => out.push(Threshold {
                rule: rule.def.name.clone(),
                level,
                above: direction == Direction::Above,
            }),
            Condition::Stale { .. } | Condition::Rate { .. } => {}
        }
    }
    out
}

/// An alarm that fired on the series, marked on the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmMark {
    pub at: i64,
    pub rule: String,
    pub severity: String,
}

/// The firings of alarms on (`device`, `metric`) in `window`, oldest first (at most
/// 200: a flapping rule must not bloat the page).
pub fn alarms(
    conn: &Connection,
    device: &str,
    metric: &str,
    window: Window,
) -> rusqlite::Result<Vec<AlarmMark>> {
    let mut stmt = conn.prepare_cached(
        "SELECT occurred_at, rule, severity FROM alert_events \
         WHERE kind = 'firing' AND device = ?1 AND metric = ?2 \
           AND occurred_at >= ?3 AND occurred_at < ?4 \
         ORDER BY occurred_at LIMIT 200",
    )?;
    let rows = stmt.query_map(params![device, metric, window.start, window.end], |r| {
        Ok(AlarmMark {
            at: r.get(0)?,
            rule: r.get(1)?,
            severity: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// Everything one chart shows.
#[derive(Debug, Clone)]
pub struct Chart<'a> {
    pub device: &'a str,
    pub metric: &'a str,
    pub unit: Option<&'a str>,
    pub span: Span,
    pub window: Window,
    pub buckets: &'a [Bucket],
    pub gap_threshold: Option<i64>,
    pub thresholds: &'a [Threshold],
    pub alarms: &'a [AlarmMark],
    pub tz: Tz,
    /// Decimals of the metric (`[display] precision`), if configured.
    pub precision: Option<u8>,
}

/// The SVG's coordinate system: the image scales to the page's width (CSS), and the
/// text stays readable on a 390-pixel phone at this size.
const WIDTH: f64 = 520.0;
const HEIGHT: f64 = 240.0;
const LEFT: f64 = 50.0;
const RIGHT: f64 = 10.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 26.0;

/// Escapes text for HTML and SVG (element content and quoted attributes).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

impl Chart<'_> {
    /// The chart as an inline `<svg>` element.
    pub fn svg(&self) -> String {
        let mut out = String::with_capacity(16 * 1024 + self.buckets.len() * 48);
        let title = format!(
            "{} {} over the last {}",
            self.device,
            self.metric,
            self.span.as_str()
        );
        let _ = write!(
            out,
            "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
             width=\"100%\" preserveAspectRatio=\"xMidYMid meet\" role=\"img\" aria-label=\"{t}\" \
             xmlns=\"http://www.w3.org/2000/svg\" font-size=\"14\" font-family=\"sans-serif\">\
             <title>{t}</title>",
            t = escape(&title)
        );
        let (lo, hi) = self.value_range();
        let scale = Scale {
            window: self.window,
            lo,
            hi,
        };
        // Plot background, then gaps beneath everything else.
        let _ = write!(
            out,
            "<rect class=\"plot\" x=\"{LEFT}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{:.1}\" \
             fill=\"#ffffff\" stroke=\"#c8c8c8\"/>",
            WIDTH - LEFT - RIGHT,
            HEIGHT - TOP - BOTTOM
        );
        for (from, to) in gaps(self.buckets, self.window, self.gap_threshold) {
            let (x0, x1) = (scale.x(from), scale.x(to));
            let _ = write!(
                out,
                "<rect class=\"gap\" x=\"{x0:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{:.1}\" \
                 fill=\"#e9e9e9\"><title>no data {} – {}</title></rect>",
                (x1 - x0).max(0.5),
                HEIGHT - TOP - BOTTOM,
                escape(&self.local(from, "%Y-%m-%d %H:%M")),
                escape(&self.local(to, "%Y-%m-%d %H:%M")),
            );
        }
        self.axes(&mut out, &scale);
        for segment in self.segments() {
            self.draw_segment(&mut out, &scale, segment);
        }
        for t in self.thresholds {
            let y = scale.y(t.level);
            let label = format!(
                "{} {} {}",
                t.rule,
                if t.above { ">" } else { "<" },
                crate::display::format_value(t.level, self.unit, self.precision)
            );
            let _ = write!(
                out,
                "<line class=\"threshold\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" \
                 stroke=\"#c0392b\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"/>\
                 <text class=\"threshold-label\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" \
                 fill=\"#c0392b\" font-size=\"13\">{}</text>",
                WIDTH - RIGHT,
                WIDTH - RIGHT - 4.0,
                y - 4.0,
                escape(&label)
            );
        }
        for a in self.alarms {
            let x = scale.x(a.at);
            let _ = write!(
                out,
                "<g class=\"alarm\"><line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{TOP}\" y2=\"{:.1}\" \
                 stroke=\"#c0392b\" stroke-width=\"1\" stroke-opacity=\"0.6\"/>\
                 <path d=\"M{:.1} {TOP} l5 -9 h-10 z\" fill=\"#c0392b\"/>\
                 <title>{} fired {} ({})</title></g>",
                HEIGHT - BOTTOM,
                x,
                escape(&a.rule),
                escape(&self.local(a.at, "%Y-%m-%d %H:%M")),
                escape(&a.severity),
            );
        }
        if self.buckets.is_empty() {
            let _ = write!(
                out,
                "<text class=\"empty\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" \
                 fill=\"#555555\">No readings in the last {}</text>",
                (LEFT + WIDTH - RIGHT) / 2.0,
                (TOP + HEIGHT - BOTTOM) / 2.0,
                self.span.as_str()
            );
        }
        out.push_str("</svg>");
        out
    }

    /// The value axis: every bucket's min and max and every threshold, padded.
    fn value_range(&self) -> (f64, f64) {
        let values = self
            .buckets
            .iter()
            .flat_map(|b| [b.min, b.max])
            .chain(self.thresholds.iter().map(|t| t.level))
            .filter(|v| v.is_finite());
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() || !hi.is_finite() {
            return (0.0, 1.0);
        }
        if hi - lo < 1e-9 {
            return (lo - 1.0, hi + 1.0);
        }
        let pad = (hi - lo) * 0.06;
        (lo - pad, hi + pad)
    }

    /// Runs of buckets without a gap between them.
    fn segments(&self) -> Vec<&[Bucket]> {
        let mut out = Vec::new();
        let mut begin = 0;
        for i in 1..=self.buckets.len() {
            let split = i == self.buckets.len()
                || self
                    .gap_threshold
                    .is_some_and(|t| self.buckets[i].first - self.buckets[i - 1].last > t);
            if split {
                out.push(&self.buckets[begin..i]);
                begin = i;
            }
        }
        out.retain(|s| !s.is_empty());
        out
    }

    fn draw_segment(&self, out: &mut String, scale: &Scale, segment: &[Bucket]) {
        let center = |b: &Bucket| scale.x(b.start + self.window.bucket / 2);
        if let [only] = segment {
            let _ = write!(
                out,
                "<line class=\"band\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" \
                 stroke=\"#9ec5e8\" stroke-width=\"3\"/>\
                 <circle class=\"avg\" cx=\"{x:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"#1f5f99\"/>",
                scale.y(only.max),
                scale.y(only.min),
                scale.y(only.avg),
                x = center(only)
            );
            return;
        }
        out.push_str("<polygon class=\"band\" fill=\"#9ec5e8\" fill-opacity=\"0.7\" points=\"");
        for b in segment {
            let _ = write!(out, "{:.1},{:.1} ", center(b), scale.y(b.max));
        }
        for b in segment.iter().rev() {
            let _ = write!(out, "{:.1},{:.1} ", center(b), scale.y(b.min));
        }
        out.push_str("\"/><polyline class=\"avg\" fill=\"none\" stroke=\"#1f5f99\" stroke-width=\"1.5\" points=\"");
        for b in segment {
            let _ = write!(out, "{:.1},{:.1} ", center(b), scale.y(b.avg));
        }
        out.push_str("\"/>");
    }

    fn axes(&self, out: &mut String, scale: &Scale) {
        // Values: about five round steps.
        let step = nice_step((scale.hi - scale.lo) / 5.0);
        let decimals = if step >= 1.0 {
            0
        } else {
            (-step.log10()).ceil().clamp(0.0, 6.0) as usize
        };
        let mut v = (scale.lo / step).ceil() * step;
        let mut n = 0;
        while v <= scale.hi && n < 20 {
            let y = scale.y(v);
            let label = format!("{:.*}", decimals, v + 0.0);
            let _ = write!(
                out,
                "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" \
                 stroke=\"#eeeeee\"/><text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" \
                 text-anchor=\"end\" fill=\"#444444\">{}</text>",
                WIDTH - RIGHT,
                LEFT - 5.0,
                y + 4.0,
                escape(&label)
            );
            v += step;
            n += 1;
        }
        if let Some(unit) = self.unit.filter(|u| !u.is_empty()) {
            let _ = write!(
                out,
                "<text class=\"unit\" x=\"4\" y=\"{:.1}\" fill=\"#444444\" font-size=\"11\">{}</text>",
                TOP + 2.0,
                escape(unit)
            );
        }
        // Times: local hours for a day, local midnights for a week or a month.
        for (t, label) in self.time_ticks() {
            let x = scale.x(t);
            let _ = write!(
                out,
                "<line class=\"grid\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{TOP}\" y2=\"{:.1}\" \
                 stroke=\"#eeeeee\"/><text class=\"tick\" x=\"{x:.1}\" y=\"{:.1}\" \
                 text-anchor=\"middle\" fill=\"#444444\">{}</text>",
                HEIGHT - BOTTOM,
                HEIGHT - 8.0,
                escape(&label)
            );
        }
    }

    /// Tick positions (µs) and labels in local time.
    fn time_ticks(&self) -> Vec<(i64, String)> {
        let (every_hours, format, days_apart) = match self.span {
            Span::Day => (4, "%H:%M", 0),
            Span::Week => (0, "%a %d", 1),
            Span::Month => (0, "%d %b", 5),
        };
        let start = crate::model::from_micros(self.window.start).with_timezone(&self.tz);
        let mut ticks = Vec::new();
        let mut date = start.date_naive();
        for _ in 0..40 {
            let hours: Vec<u32> = if every_hours > 0 {
                (0..24).step_by(every_hours).collect()
            } else {
                vec![0]
            };
            for h in hours {
                let Some(local) = date
                    .and_time(NaiveTime::MIN)
                    .checked_add_signed(Duration::hours(h.into()))
                else {
                    continue;
                };
                let Some(t) = self.tz.from_local_datetime(&local).earliest() else {
                    continue; // skipped by a DST change
                };
                let us = to_micros(t.with_timezone(&Utc));
                if us > self.window.start && us < self.window.end {
                    ticks.push((us, t.format(format).to_string()));
                }
            }
            date = match date.succ_opt() {
                Some(d) => d,
                None => break,
            };
        }
        if days_apart > 1 {
            // Every fifth day, counted from the first tick so labels never crowd.
            ticks = ticks.into_iter().step_by(days_apart).collect();
        }
        ticks
    }

    fn local(&self, us: i64, format: &str) -> String {
        crate::model::from_micros(us)
            .with_timezone(&self.tz)
            .format(format)
            .to_string()
    }
}

struct Scale {
    window: Window,
    lo: f64,
    hi: f64,
}

impl Scale {
    fn x(&self, us: i64) -> f64 {
        let span = (self.window.end - self.window.start).max(1) as f64;
        let f = ((us - self.window.start) as f64 / span).clamp(0.0, 1.0);
        LEFT + f * (WIDTH - LEFT - RIGHT)
    }

    fn y(&self, v: f64) -> f64 {
        let f = ((v - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0);
        let f = if f.is_finite() { f } else { 0.5 };
        HEIGHT - BOTTOM - f * (HEIGHT - TOP - BOTTOM)
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    if !raw.is_finite() || raw <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let f = raw / magnitude;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    const MIN: i64 = 60_000_000;

    fn store() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema::migrate(&mut conn).unwrap();
        conn
    }

    fn insert(conn: &Connection, device: &str, metric: &str, at: i64, value: f64) {
        let uid = crate::model::Uid::derive(&[device, metric, &at.to_string()]);
        conn.execute(
            "INSERT INTO readings (uid, source, device, metric, value, unit, observed_at, received_at) \
             VALUES (?1, 's', ?2, ?3, ?4, '°C', ?5, ?5)",
            params![&uid.0[..], device, metric, value, at],
        )
        .unwrap();
    }

    fn window(start: i64, end: i64, bucket: i64) -> Window {
        Window { start, end, bucket }
    }

    #[test]
    fn buckets_hold_min_max_avg_and_respect_their_edges() {
        let conn = store();
        let w = window(0, 10 * MIN, 4 * MIN);
        // Bucket 0 is [0, 4 min): its last microsecond belongs to it, 4 min to bucket 1.
        insert(&conn, "f", "t", 0, 1.0);
        insert(&conn, "f", "t", 4 * MIN - 1, 3.0);
        insert(&conn, "f", "t", 4 * MIN, 10.0);
        // Outside the window on both ends, another metric, another device.
        insert(&conn, "f", "t", -1, 99.0);
        insert(&conn, "f", "t", 10 * MIN, 99.0);
        insert(&conn, "f", "h", MIN, 99.0);
        insert(&conn, "g", "t", MIN, 99.0);
        let b = downsample(&conn, "f", "t", w).unwrap();
        assert_eq!(b.len(), 2, "{b:?}");
        assert_eq!(
            (b[0].start, b[0].min, b[0].max, b[0].avg, b[0].count),
            (0, 1.0, 3.0, 2.0, 2)
        );
        assert_eq!((b[0].first, b[0].last), (0, 4 * MIN - 1));
        assert_eq!(
            (b[1].start, b[1].min, b[1].max, b[1].count),
            (4 * MIN, 10.0, 10.0, 1)
        );
    }

    #[test]
    fn empty_and_inverted_ranges_have_no_buckets() {
        let conn = store();
        insert(&conn, "f", "t", MIN, 1.0);
        assert!(downsample(&conn, "f", "t", window(2 * MIN, 9 * MIN, MIN))
            .unwrap()
            .is_empty());
        assert!(downsample(&conn, "f", "t", window(9 * MIN, 0, MIN))
            .unwrap()
            .is_empty());
        assert!(downsample(&conn, "f", "t", window(0, 9 * MIN, 0))
            .unwrap()
            .is_empty());
        assert!(downsample(&conn, "nobody", "t", window(0, 9 * MIN, MIN))
            .unwrap()
            .is_empty());
        // A window without readings is one gap; nothing to draw but the message.
        let w = window(0, 9 * MIN, MIN);
        assert_eq!(gaps(&[], w, None), vec![(0, 9 * MIN)]);
    }

    #[test]
    fn a_pause_longer_than_three_median_intervals_is_a_gap() {
        let conn = store();
        // One reading a minute for an hour, then nothing for 30 minutes, then 29 more.
        let mut t = 0;
        for _ in 0..60 {
            insert(&conn, "f", "t", t, 4.0);
            t += MIN;
        }
        t += 30 * MIN;
        for _ in 0..30 {
            insert(&conn, "f", "t", t, 5.0);
            t += MIN;
        }
        let w = window(0, t, 4 * MIN);
        let b = downsample(&conn, "f", "t", w).unwrap();
        let threshold = gap_threshold(&b, None).unwrap();
        assert_eq!(threshold, 3 * MIN);
        assert_eq!(gaps(&b, w, Some(threshold)), vec![(59 * MIN, 90 * MIN)]);
        // The configured device gap wins.
        let long = gap_threshold(&b, Some(std::time::Duration::from_secs(3600))).unwrap();
        assert!(gaps(&b, w, Some(long)).is_empty());
        // A sensor that stopped: silence after the last reading up to the window's end.
        let later = window(0, t + 20 * MIN, 4 * MIN);
        let g = gaps(&b, later, Some(threshold));
        assert_eq!(g.last(), Some(&(t - MIN, t + 20 * MIN)));
        // The line breaks at the gap.
        let chart = test_chart(&b, w, Some(threshold), &[], &[]);
        assert_eq!(chart.segments().len(), 2);
        let svg = chart.svg();
        assert_eq!(svg.matches("<polygon class=\"band\"").count(), 2, "{svg}");
        assert_eq!(svg.matches("<rect class=\"gap\"").count(), 1);
    }

    #[test]
    fn sparse_series_take_their_interval_from_neighbouring_buckets() {
        // One reading every 15 minutes in 4-minute buckets: most buckets are empty,
        // and that is not a gap.
        let b: Vec<Bucket> = (0..20)
            .map(|i| Bucket {
                start: i * 15 * MIN / (4 * MIN) * 4 * MIN,
                min: 1.0,
                max: 1.0,
                avg: 1.0,
                count: 1,
                first: i * 15 * MIN,
                last: i * 15 * MIN,
            })
            .collect();
        let threshold = gap_threshold(&b, None).unwrap();
        assert_eq!(threshold, 45 * MIN);
        assert!(gaps(&b, window(0, 19 * 15 * MIN + 1, 4 * MIN), Some(threshold)).is_empty());
        assert_eq!(gap_threshold(&b[..1], None), None);
    }

    fn test_chart<'a>(
        b: &'a [Bucket],
        w: Window,
        threshold: Option<i64>,
        thresholds: &'a [Threshold],
        alarms: &'a [AlarmMark],
    ) -> Chart<'a> {
        Chart {
            device: "freezer-1",
            metric: "temperature",
            unit: Some("°C"),
            span: Span::Day,
            window: w,
            buckets: b,
            gap_threshold: threshold,
            thresholds,
            alarms,
            tz: Tz::load("Europe/Berlin").unwrap(),
            precision: None,
        }
    }

    #[test]
    fn svg_escapes_names_and_draws_thresholds_and_alarms() {
        let b = vec![
            Bucket {
                start: 0,
                min: -20.0,
                max: -18.0,
                avg: -19.0,
                count: 4,
                first: 0,
                last: 3 * MIN,
            },
            Bucket {
                start: 4 * MIN,
                min: -19.0,
                max: -12.0,
                avg: -15.0,
                count: 4,
                first: 4 * MIN,
                last: 7 * MIN,
            },
        ];
        let thresholds = vec![Threshold {
            rule: "warm<script>".into(),
            level: -15.0,
            above: true,
        }];
        let alarms = vec![AlarmMark {
            at: 6 * MIN,
            rule: "a\"b".into(),
            severity: "critical".into(),
        }];
        let w = window(0, 8 * MIN, 4 * MIN);
        let mut chart = test_chart(&b, w, gap_threshold(&b, None), &thresholds, &alarms);
        chart.device = "<img src=x onerror=alert(1)>&";
        let svg = chart.svg();
        assert!(!svg.contains("<img"), "{svg}");
        assert!(svg.contains("&lt;img src=x onerror=alert(1)&gt;&amp;"));
        assert!(!svg.contains("<script"));
        assert!(svg.contains("warm&lt;script&gt; &gt; -15 °C"), "{svg}");
        assert_eq!(svg.matches("class=\"threshold\"").count(), 1);
        assert!(svg.contains("a&quot;b fired"));
        assert_eq!(svg.matches("<g class=\"alarm\">").count(), 1);
        // No inline style anywhere (the CSP refuses it), and the threshold line sits at
        // the level: -15 in a range padded around [-20, -12].
        assert!(!svg.contains("style="));
        let (lo, hi) = chart.value_range();
        assert!(lo < -20.0 && hi > -12.0);
        assert!(svg.starts_with("<svg class=\"chart\" viewBox=\"0 0 520 240\""));
    }

    #[test]
    fn thresholds_come_from_the_rules_on_the_series() {
        let rules: Vec<AlertRule> = serde_json::from_value(serde_json::json!([
            {"name": "warm", "kind": "threshold", "metric": "temperature", "above": -15.0, "devices": ["freezer-*"]},
            {"name": "cold", "kind": "threshold", "metric": "temperature", "below": -30.0},
            {"name": "other-metric", "kind": "threshold", "metric": "humidity", "above": 80.0},
            {"name": "other-device", "kind": "threshold", "metric": "temperature", "above": 8.0, "devices": ["fridge-*"]},
            {"name": "quiet", "kind": "stale", "metric": "temperature", "after": "10m"},
        ]))
        .unwrap();
        let t = thresholds(&rules, "freezer-1", "temperature");
        assert_eq!(
            t,
            vec![
                Threshold {
                    rule: "warm".into(),
                    level: -15.0,
                    above: true
                },
                Threshold {
                    rule: "cold".into(),
                    level: -30.0,
                    above: false
                },
            ]
        );
    }

    #[test]
    fn spans_parse_and_align_to_bucket_edges() {
        assert_eq!(Span::parse("30d"), Some(Span::Month));
        assert_eq!(Span::parse("1y"), None);
        assert_eq!(Span::parse(""), None);
        let now = Utc.with_ymd_and_hms(2026, 12, 5, 4, 37, 11).unwrap();
        for span in Span::ALL {
            let w = span.window(now);
            assert_eq!(w.start % w.bucket, 0);
            let n = (w.end - w.start + w.bucket - 1) / w.bucket;
            assert!((360..=505).contains(&n), "{span:?}: {n} buckets");
        }
    }

    #[test]
    fn time_ticks_are_local() {
        let now = Utc.with_ymd_and_hms(2026, 12, 5, 12, 0, 0).unwrap();
        let chart = Chart {
            window: Span::Day.window(now),
            ..test_chart(&[], Span::Day.window(now), None, &[], &[])
        };
        let ticks = chart.time_ticks();
        // Berlin is UTC+1 in December: 16:00 local is 15:00 UTC.
        assert!(
            ticks.iter().any(|(t, l)| l == "16:00"
                && *t == to_micros(Utc.with_ymd_and_hms(2026, 12, 4, 15, 0, 0).unwrap())),
            "{ticks:?}"
        );
        assert_eq!(ticks.len(), 6);
    }
}
