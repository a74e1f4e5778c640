//! Pure parsers for the line formats of serial sensors: JSON lines, CSV (with a header
//! line or configured columns), `key=value` pairs and a regular expression with named
//! groups. No I/O here: a line goes in, raw readings or a cheap [`LineError`] come out.
//!
//! Every format first becomes a list of named fields (numbers or text); the common
//! rules then pick the device, the timestamp and the readings from those fields, so the
//! four formats behave the same way for `device_field`, `timestamp_field` and
//! `metric_field`.

use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// The most fields taken from one line; the rest of a hostile line is ignored.
pub const MAX_FIELDS: usize = 256;
/// The deepest JSON nesting looked at.
const MAX_DEPTH: usize = 8;
/// The longest device id or metric name taken from a line.
const MAX_NAME_LEN: usize = 64;

/// How the timestamp field of a line is written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    /// `2024-05-01T12:00:00Z` or with an offset (`+02:00`).
    #[default]
    Rfc3339,
    /// Seconds since 1970-01-01 UTC, fractions allowed.
    Unix,
    /// Milliseconds since 1970-01-01 UTC.
    UnixMs,
    /// A `strftime` pattern such as `"%Y-%m-%d %H:%M:%S"` (read as UTC unless the
    /// pattern has `%z`).
    #[serde(untagged)]
    Pattern(String),
}

/// One field of a line, before mapping.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    Number(f64),
    Text(String),
}

impl FieldValue {
    fn as_number(&self) -> Option<f64> {
        match self {
            FieldValue::Number(n) => Some(*n),
            FieldValue::Text(t) => parse_number(t),
        }
    }

    fn as_text(&self) -> String {
        match self {
            FieldValue::Number(n) => format_number(*n),
            FieldValue::Text(t) => t.clone(),
        }
    }
}

/// A number written in a text field: finite only ("NaN" and "inf" are text).
pub fn parse_number(text: &str) -> Option<f64> {
    let t = text.trim();
    // Rust accepts "nan", "inf" and "infinity"; a sensor writing those has no value.
    if t.is_empty()
        || t.bytes()
            .any(|b| b.is_ascii_alphabetic() && !matches!(b, b'e' | b'E'))
    {
        return None;
    }
    t.parse::<f64>().ok().filter(|v| v.is_finite())
}

fn format_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// Why a line gave no reading. Cheap to make: these happen on every noisy line.
#[derive(Debug, Clone, PartialEq)]
pub enum LineError {
    NotJson(String),
    NotJsonObject,
    CsvNoHeader,
    CsvColumns { expected: usize, found: usize },
    NoPairs,
    NoMatch,
    MissingDevice(String),
    BadDevice(String),
    MissingMetric(String),
    BadMetric(String),
    BadValue(String),
    BadTimestamp(String),
    NoValues,
}

impl LineError {
    /// A short, stable reason for counters and the `rejected` table.
    pub fn reason(&self) -> &'static str {
        match self {
            LineError::NotJson(_) => "not_json",
            LineError::NotJsonObject => "not_json_object",
            LineError::CsvNoHeader => "csv_no_header",
            LineError::CsvColumns { .. } => "csv_column_count",
            LineError::NoPairs => "no_key_value_pairs",
            LineError::NoMatch => "regex_no_match",
            LineError::MissingDevice(_) => "missing_device",
            LineError::BadDevice(_) => "bad_device",
            LineError::MissingMetric(_) => "missing_metric",
            LineError::BadMetric(_) => "bad_metric",
            LineError::BadValue(_) => "bad_value",
            LineError::BadTimestamp(_) => "bad_timestamp",
            LineError::NoValues => "no_values",
        }
    }
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineError::NotJson(e) => write!(f, "not JSON: {e}"),
            LineError::NotJsonObject => f.write_str("JSON but not an object"),
            LineError::CsvNoHeader => f.write_str("a CSV data line arrived before any header line"),
            LineError::CsvColumns { expected, found } => {
                write!(f, "expected {expected} CSV columns, found {found}")
            }
            LineError::NoPairs => f.write_str("no key=value pairs"),
            LineError::NoMatch => f.write_str("the line does not match the pattern"),
            LineError::MissingDevice(k) => write!(f, "no device field {k:?}"),
            LineError::BadDevice(d) => write!(f, "unusable device id {d:?}"),
            LineError::MissingMetric(k) => write!(f, "no metric field {k:?}"),
            LineError::BadMetric(m) => write!(f, "unusable metric name {m:?}"),
            LineError::BadValue(v) => write!(f, "not a number: {v:?}"),
            LineError::BadTimestamp(t) => write!(f, "unusable timestamp {t:?}"),
            LineError::NoValues => f.write_str("no numeric values"),
        }
    }
}

/// A value of a line before field mapping.
#[derive(Debug, Clone, PartialEq)]
pub struct RawValue {
    /// The raw key (JSON key path with dots, CSV column, key, group name), or the
    /// metric named by `metric_field`.
    pub key: String,
    pub value: f64,
    /// A unit given on the line (`unit_field`).
    pub unit: Option<String>,
}

/// What one line says.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedLine {
    /// The device named on the line, if `device_field` is set.
    pub device: Option<String>,
    /// The timestamp on the line, if `timestamp_field` is set and present.
    pub observed_at: Option<DateTime<Utc>>,
    pub values: Vec<RawValue>,
}

/// The format-specific part of a parser.
#[derive(Debug, Clone)]
pub enum Format {
    Json,
    Csv {
        delimiter: char,
        /// Configured columns; `None` means the header line names them.
        columns: Option<Vec<String>>,
    },
    KeyValue,
    Regex(Regex),
}

/// Which fields carry the device, the timestamp, and (for one-reading-per-line
/// sensors) the metric, value and unit.
#[derive(Debug, Clone, Default)]
pub struct FieldRoles {
    pub device_field: Option<String>,
    pub timestamp_field: Option<String>,
    pub timestamp_format: TimestampFormat,
    pub metric_field: Option<String>,
    pub value_field: String,
    pub unit_field: Option<String>,
}

/// Parses lines of one port. Holds the CSV header learned from the line, so one parser
/// per port.
#[derive(Debug, Clone)]
pub struct LineParser {
    format: Format,
    roles: FieldRoles,
    header: Option<Vec<String>>,
}

impl LineParser {
    pub fn new(format: Format, roles: FieldRoles) -> LineParser {
        LineParser {
            format,
            roles,
            header: None,
        }
    }

    /// Forgets the learned CSV header (the port was reopened; the sensor will send it
    /// again, possibly different after a firmware change).
    pub fn reset(&mut self) {
        self.header = None;
    }

    /// Parses one line (without its line ending). `Ok(None)` for lines that carry no
    /// reading by design: empty lines and CSV header lines.
    pub fn parse(&mut self, line: &str) -> Result<Option<ParsedLine>, LineError> {
        let line = line.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        if line.is_empty() {
            return Ok(None);
        }
        let fields = match &self.format {
            Format::Json => json_fields(line)?,
            Format::Csv { delimiter, columns } => {
                let cells = split_csv(line, *delimiter);
                let names = match columns {
                    Some(c) => c,
                    None => {
                        if looks_like_header(&cells, &self.roles) {
                            self.header = Some(
                                cells
                                    .iter()
                                    .map(|c| c.trim().trim_matches('"').to_string())
                                    .collect(),
                            );
                            return Ok(None);
                        }
                        match &self.header {
                            Some(h) => h,
                            None => return Err(LineError::CsvNoHeader),
                        }
                    }
                };
                if cells.len() != names.len() {
                    return Err(LineError::CsvColumns {
                        expected: names.len(),
                        found: cells.len(),
                    });
                }
                names
                    .iter()
                    .zip(cells)
                    .filter(|(name, _)| !name.is_empty())
                    .map(|(name, cell)| (name.clone(), text_field(cell)))
                    .collect()
            }
            Format::KeyValue => {
                let pairs = key_value_fields(line);
                if pairs.is_empty() {
                    return Err(LineError::NoPairs);
                }
                pairs
            }
            Format::Regex(re) => {
                let caps = re.captures(line).ok_or(LineError::NoMatch)?;
                re.capture_names()
                    .flatten()
                    .filter_map(|name| {
                        caps.name(name)
                            .map(|m| (name.to_string(), text_field(m.as_str())))
                    })
                    .collect()
            }
        };
        self.apply_roles(fields).map(Some)
    }

    fn apply_roles(&self, fields: Vec<(String, FieldValue)>) -> Result<ParsedLine, LineError> {
        let roles = &self.roles;
        let find = |key: &str| fields.iter().find(|(k, _)| k == key).map(|(_, v)| v);

        let device = match &roles.device_field {
            Some(key) => {
                let d = find(key)
                    .ok_or_else(|| LineError::MissingDevice(key.clone()))?
                    .as_text();
                let d = d.trim().to_string();
                if !is_plain_name(&d) {
                    return Err(LineError::BadDevice(truncate(&d)));
                }
                Some(d)
            }
            None => None,
        };
        let observed_at = match roles.timestamp_field.as_deref().and_then(find) {
            Some(v) => Some(parse_timestamp(v, &roles.timestamp_format)?),
            None => None,
        };
        let mut values = Vec::new();
        if let Some(metric_key) = &roles.metric_field {
            let metric = find(metric_key)
                .ok_or_else(|| LineError::MissingMetric(metric_key.clone()))?
                .as_text();
            let metric = metric.trim().to_string();
            if !is_plain_name(&metric) {
                return Err(LineError::BadMetric(truncate(&metric)));
            }
            let raw = find(&roles.value_field).ok_or(LineError::NoValues)?;
            let value = raw
                .as_number()
                .ok_or_else(|| LineError::BadValue(truncate(&raw.as_text())))?;
            let unit = roles
                .unit_field
                .as_deref()
                .and_then(find)
                .map(|u| u.as_text().trim().to_string())
                .filter(|u| {
                    !u.is_empty() && u.len() <= MAX_NAME_LEN && !u.chars().any(char::is_control)
                });
            values.push(RawValue {
                key: metric,
                value,
                unit,
            });
        } else {
            let used = [
                roles.device_field.as_deref(),
                roles.timestamp_field.as_deref(),
            ];
            for (key, v) in &fields {
                if used.contains(&Some(key.as_str())) {
                    continue;
                }
                if let Some(value) = v.as_number() {
                    if values.iter().any(|r: &RawValue| &r.key == key) {
                        continue; // the first of a repeated key wins
                    }
                    values.push(RawValue {
                        key: key.clone(),
                        value,
                        unit: None,
                    });
                }
            }
        }
        if values.is_empty() {
            return Err(LineError::NoValues);
        }
        Ok(ParsedLine {
            device,
            observed_at,
            values,
        })
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Names taken from a line (devices, metrics): what [`crate::settings::check_identifier`]
/// accepts.
fn is_plain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':'))
}

fn text_field(cell: &str) -> FieldValue {
    let t = cell.trim();
    let t = t
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(t);
    FieldValue::Text(t.to_string())
}

/// Splits a CSV line on `delimiter`, honouring double-quoted cells (`"a,b"`).
fn split_csv(line: &str, delimiter: char) -> Vec<&str> {
    let mut cells = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == delimiter && !quoted {
            cells.push(&line[start..i]);
            start = i + c.len_utf8();
        }
        if cells.len() >= MAX_FIELDS {
            return cells;
        }
    }
    cells.push(&line[start..]);
    cells
}

/// A header line names every column with a plain name (no number, no punctuation
/// beyond `. _ - :`) and includes the columns the roles refer to: `time,device,temp`.
/// A garbled data line rarely passes, so it cannot silently replace the header.
fn looks_like_header(cells: &[&str], roles: &FieldRoles) -> bool {
    let names: Vec<&str> = cells.iter().map(|c| c.trim().trim_matches('"')).collect();
    let plain = names
        .iter()
        .all(|c| is_plain_name(c) && parse_number(c).is_none());
    let required = [
        &roles.device_field,
        &roles.timestamp_field,
        &roles.metric_field,
    ];
    plain
        && required
            .iter()
            .all(|r| r.as_ref().is_none_or(|r| names.contains(&r.as_str())))
}

/// `key=value` pairs separated by whitespace, `,` or `;`. Tokens without `=` are ignored.
fn key_value_fields(line: &str) -> Vec<(String, FieldValue)> {
    line.split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter_map(|token| token.split_once('='))
        .map(|(k, v)| (k.trim(), v))
        .filter(|(k, _)| !k.is_empty() && k.len() <= MAX_NAME_LEN)
        .take(MAX_FIELDS)
        .map(|(k, v)| (k.to_string(), text_field(v)))
        .collect()
}

fn json_fields(line: &str) -> Result<Vec<(String, FieldValue)>, LineError> {
    let value: Value = serde_json::from_str(line).map_err(|e| LineError::NotJson(e.to_string()))?;
    if !value.is_object() {
        return Err(LineError::NotJsonObject);
    }
    let mut out = Vec::new();
    walk_json(&value, String::new(), 0, &mut out);
    Ok(out)
}

fn walk_json(value: &Value, prefix: String, depth: usize, out: &mut Vec<(String, FieldValue)>) {
    if out.len() >= MAX_FIELDS || depth > MAX_DEPTH {
        return;
    }
    let child = |key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        // `{"": 1}`: a field without a name would become a reading without a metric.
        Value::Number(_) | Value::Bool(_) | Value::String(_) if prefix.is_empty() => {}
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|f| f.is_finite()) {
                out.push((prefix, FieldValue::Number(f)));
            }
        }
        Value::Bool(b) => out.push((prefix, FieldValue::Number(if *b { 1.0 } else { 0.0 }))),
        Value::String(s) => out.push((prefix, FieldValue::Text(s.clone()))),
        Value::Object(map) => {
            for (k, v) in map {
                walk_json(v, child(k), depth + 1, out);
            }
        }
        Value::Array(list) => {
            for (i, v) in list.iter().enumerate() {
                walk_json(v, child(&i.to_string()), depth + 1, out);
            }
        }
        Value::Null => {}
    }
}

/// Which byte ends a line. `\n` framing also accepts `\r\n` (the `\r` is dropped).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LineEnding {
    /// Lines end with LF or CRLF.
    #[default]
    Lf,
    /// Lines end with CR alone (some older instruments); LF bytes are ignored.
    Cr,
}

/// What the framer found in the byte stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line without its ending.
    Line(&'a [u8]),
    /// A line longer than the limit was dropped; this many bytes were discarded.
    Overlong(usize),
}

/// Cuts a serial byte stream into lines of at most `max` bytes. A longer line is
/// discarded up to its end and reported once as [`Frame::Overlong`]; memory stays
/// bounded by `max` whatever arrives.
#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    max: usize,
    ending: LineEnding,
    /// Bytes of the overlong line being skipped, if one is.
    discarding: Option<usize>,
}

impl LineFramer {
    pub fn new(max: usize, ending: LineEnding) -> LineFramer {
        LineFramer {
            buf: Vec::with_capacity(max.min(4096)),
            max,
            ending,
            discarding: None,
        }
    }

    /// Feeds bytes; calls `out` for every complete line or discarded overlong line.
    pub fn push(&mut self, mut data: &[u8], out: &mut impl FnMut(Frame<'_>)) {
        let end = match self.ending {
            LineEnding::Lf => b'\n',
            LineEnding::Cr => b'\r',
        };
        while !data.is_empty() {
            let (chunk, complete) = match data.iter().position(|&b| b == end) {
                Some(i) => {
                    let chunk = &data[..i];
                    data = &data[i + 1..];
                    (chunk, true)
                }
                None => (std::mem::take(&mut data), false),
            };
            if let Some(skipped) = &mut self.discarding {
                *skipped += chunk.len() + usize::from(complete);
                if complete {
                    out(Frame::Overlong(*skipped));
                    self.discarding = None;
                }
                continue;
            }
            if self.buf.len() + chunk.len() > self.max {
                self.discarding = Some(self.buf.len() + chunk.len() + usize::from(complete));
                self.buf.clear();
                if complete {
                    out(Frame::Overlong(self.discarding.take().unwrap_or(0)));
                }
                continue;
            }
            self.buf.extend_from_slice(chunk);
            if complete {
                let line = match self.ending {
                    LineEnding::Lf => self.buf.strip_suffix(b"\r").unwrap_or(&self.buf),
                    LineEnding::Cr => &self.buf,
                };
                if self.ending == LineEnding::Cr && line.contains(&b'\n') {
                    let cleaned: Vec<u8> = line.iter().copied().filter(|&b| b != b'\n').collect();
                    out(Frame::Line(&cleaned));
                } else {
                    out(Frame::Line(line));
                }
                self.buf.clear();
            }
        }
    }

    /// Drops a partial line (the port went away mid-line); returns its length.
    pub fn reset(&mut self) -> usize {
        let partial = self.buf.len() + self.discarding.take().unwrap_or(0);
        self.buf.clear();
        partial
    }
}

/// The earliest and latest timestamps believed from a sensor; outside is a broken clock.
fn plausible_time(t: DateTime<Utc>) -> bool {
    let min = DateTime::from_timestamp(946_684_800, 0); // 2000-01-01
    let max = DateTime::from_timestamp(7_258_118_400, 0); // 2200-01-01
    matches!((min, max), (Some(min), Some(max)) if t >= min && t < max)
}

pub fn parse_timestamp(
    value: &FieldValue,
    format: &TimestampFormat,
) -> Result<DateTime<Utc>, LineError> {
    let text = value.as_text();
    let bad = || LineError::BadTimestamp(truncate(&text));
    let t = text.trim();
    let parsed = match format {
        TimestampFormat::Rfc3339 => DateTime::parse_from_rfc3339(t)
            .ok()
            .map(|d| d.with_timezone(&Utc)),
        TimestampFormat::Unix => value.as_number().and_then(|s| {
            let micros = s * 1e6;
            (micros.abs() < 9e15).then(|| DateTime::from_timestamp_micros(micros.round() as i64))?
        }),
        TimestampFormat::UnixMs => value.as_number().and_then(|ms| {
            let micros = ms * 1e3;
            (micros.abs() < 9e15).then(|| DateTime::from_timestamp_micros(micros.round() as i64))?
        }),
        TimestampFormat::Pattern(p) if p.contains("%z") || p.contains("%:z") => {
            DateTime::parse_from_str(t, p)
                .ok()
                .map(|d| d.with_timezone(&Utc))
        }
        TimestampFormat::Pattern(p) => NaiveDateTime::parse_from_str(t, p)
            .ok()
            .map(|n| Utc.from_utc_datetime(&n)),
    };
    parsed.filter(|t| plausible_time(*t)).ok_or_else(bad)
}

/// Checks a `strftime` pattern once at configuration time.
pub fn check_timestamp_pattern(pattern: &str) -> Result<(), String> {
    use chrono::format::{Item, StrftimeItems};
    if pattern.is_empty() {
        return Err("must not be empty".into());
    }
    if StrftimeItems::new(pattern).any(|i| matches!(i, Item::Error)) {
        return Err(format!("{pattern:?} is not a valid strftime pattern"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles() -> FieldRoles {
        FieldRoles {
            value_field: "value".into(),
            ..FieldRoles::default()
        }
    }

    fn keys(p: &ParsedLine) -> Vec<(&str, f64)> {
        p.values.iter().map(|v| (v.key.as_str(), v.value)).collect()
    }

    fn frames(framer: &mut LineFramer, chunks: &[&[u8]]) -> Vec<String> {
        let mut got = Vec::new();
        for c in chunks {
            framer.push(c, &mut |f| {
                got.push(match f {
                    Frame::Line(l) => String::from_utf8_lossy(l).into_owned(),
                    Frame::Overlong(n) => format!("<overlong {n}>"),
                })
            });
        }
        got
    }

    #[test]
    fn framing_lf_crlf_split_and_overlong() {
        let mut f = LineFramer::new(8, LineEnding::Lf);
        let got = frames(
            &mut f,
            &[
                b"ab",
                b"c\r\nde\n",
                b"0123456789",
                b"xx\nok\n\n",
                b"\xff\xfeok\r\n",
            ],
        );
        assert_eq!(
            got,
            vec!["abc", "de", "<overlong 13>", "ok", "", "\u{fffd}\u{fffd}ok"]
        );
        // Exactly the limit is fine; one more byte is not.
        let got = frames(&mut f, &[b"12345678\n123456789\n"]);
        assert_eq!(got, vec!["12345678", "<overlong 10>"]);
        assert_eq!(frames(&mut f, &[b"part"]), Vec::<String>::new());
        assert_eq!(f.reset(), 4);
        assert_eq!(frames(&mut f, &[b"new\n"]), vec!["new"]);
        // A flood without any newline never grows the buffer past the limit.
        let flood = vec![b'x'; 1 << 20];
        assert!(frames(&mut f, &[&flood, &flood]).is_empty());
        assert!(f.buf.capacity() <= 4096);
        assert_eq!(
            frames(&mut f, &[b"\n"]),
            vec![format!("<overlong {}>", (2 << 20) + 1)]
        );
    }

    #[test]
    fn framing_cr() {
        let mut f = LineFramer::new(64, LineEnding::Cr);
        assert_eq!(frames(&mut f, &[b"a=1\r\nb=2\r"]), vec!["a=1", "b=2"]);
    }

    #[test]
    fn numbers_are_finite_only() {
        assert_eq!(parse_number(" 21.5 "), Some(21.5));
        assert_eq!(parse_number("-3e2"), Some(-300.0));
        for bad in [
            "",
            "nan",
            "NaN",
            "inf",
            "-infinity",
            "1e999",
            "12abc",
            "0x10",
            "--1",
        ] {
            assert_eq!(parse_number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn json_lines() {
        let mut p = LineParser::new(
            Format::Json,
            FieldRoles {
                device_field: Some("id".into()),
                timestamp_field: Some("ts".into()),
                ..roles()
            },
        );
        let got = p
            .parse(r#"{"id":"ws-1","ts":"2024-05-01T12:00:00+02:00","t":21.5,"env":{"rh":40,"ok":true},"name":"x"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(got.device.as_deref(), Some("ws-1"));
        assert_eq!(
            got.observed_at.unwrap().to_rfc3339(),
            "2024-05-01T10:00:00+00:00"
        );
        // serde_json orders object keys alphabetically.
        assert_eq!(
            keys(&got),
            vec![("env.ok", 1.0), ("env.rh", 40.0), ("t", 21.5)]
        );

        for (bad, reason) in [
            ("{\"id\":\"ws-1\",\"t\":", "not_json"),
            ("[1,2]", "not_json_object"),
            ("42", "not_json_object"),
            ("{\"t\":1}", "missing_device"),
            ("{\"id\":\"a b\",\"t\":1}", "bad_device"),
            ("{\"id\":\"ws\",\"t\":\"warm\"}", "no_values"),
            (
                "{\"id\":\"ws\",\"ts\":\"yesterday\",\"t\":1}",
                "bad_timestamp",
            ),
            (
                "{\"id\":\"ws\",\"ts\":\"1970-01-01T00:00:00Z\",\"t\":1}",
                "bad_timestamp",
            ),
        ] {
            assert_eq!(p.parse(bad).unwrap_err().reason(), reason, "{bad}");
        }
        assert_eq!(
            p.parse("   \r").unwrap(),
            None,
            "blank lines are not errors"
        );
    }

    #[test]
    fn json_hostile_is_bounded() {
        let mut p = LineParser::new(Format::Json, roles());
        let deep = format!("{}1{}", "{\"a\":".repeat(200), "}".repeat(200));
        assert_eq!(
            p.parse(&deep).unwrap_err().reason(),
            "not_json",
            "serde_json's recursion limit"
        );
        let nested = format!("{}1{}", "{\"a\":".repeat(20), "}".repeat(20));
        assert_eq!(
            p.parse(&nested).unwrap_err().reason(),
            "no_values",
            "deeper than MAX_DEPTH is ignored"
        );
        let wide = format!(
            "{{{}}}",
            (0..5000)
                .map(|i| format!("\"k{i}\":{i}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(p.parse(&wide).unwrap().unwrap().values.len(), MAX_FIELDS);
    }

    /// Found by proptest with the fuzz target's invariant (docs/reliability.md,
    /// `## Fuzzing`): `{"": 1}` gave a reading whose metric was the empty string.
    #[test]
    fn json_field_without_a_name_is_not_a_reading() {
        let mut p = LineParser::new(Format::Json, roles());
        assert_eq!(p.parse(r#"{"": 1}"#).unwrap_err().reason(), "no_values");
        let parsed = p
            .parse(r#"{"": 1, "t": 2, "a": {"": 3}}"#)
            .unwrap()
            .unwrap();
        assert_eq!(keys(&parsed), [("a.", 3.0), ("t", 2.0)]);
    }

    #[test]
    fn csv_with_header_line() {
        let mut p = LineParser::new(
            Format::Csv {
                delimiter: ',',
                columns: None,
            },
            FieldRoles {
                device_field: Some("device".into()),
                ..roles()
            },
        );
        assert_eq!(p.parse("12,4").unwrap_err().reason(), "csv_no_header");
        assert_eq!(p.parse("device,temp,\"rh\"").unwrap(), None);
        let got = p.parse("\"ws-2\", 19.25 ,55").unwrap().unwrap();
        assert_eq!(got.device.as_deref(), Some("ws-2"));
        assert_eq!(keys(&got), vec![("temp", 19.25), ("rh", 55.0)]);
        assert_eq!(p.parse("ws-2,1").unwrap_err().reason(), "csv_column_count");
        assert_eq!(
            p.parse("ws-2,1,2,3").unwrap_err().reason(),
            "csv_column_count"
        );
        assert_eq!(p.parse("ws-2,warm,n/a").unwrap_err().reason(), "no_values");
        assert_eq!(
            p.parse("ws-2,warm,cold").unwrap_err().reason(),
            "no_values",
            "not a header: it lacks the device column"
        );
        // A sensor reset prints a new header; it replaces the old one.
        assert_eq!(p.parse("device,pressure").unwrap(), None);
        assert_eq!(
            keys(&p.parse("ws-2,1013").unwrap().unwrap()),
            vec![("pressure", 1013.0)]
        );
        p.reset();
        assert_eq!(p.parse("ws-2,1013").unwrap_err().reason(), "csv_no_header");
    }

    #[test]
    fn csv_with_columns_and_quotes() {
        let mut p = LineParser::new(
            Format::Csv {
                delimiter: ';',
                columns: Some(vec!["".into(), "temp".into(), "note".into()]),
            },
            roles(),
        );
        let got = p.parse("skip;1,5;\"a;b\"").unwrap_err();
        assert_eq!(
            got.reason(),
            "no_values",
            "1,5 is not a number with ';' as delimiter"
        );
        let got = p.parse("999;-2.5;\"a;b\"").unwrap().unwrap();
        assert_eq!(
            keys(&got),
            vec![("temp", -2.5)],
            "empty column names are skipped"
        );
        let long = ";".repeat(10_000);
        assert_eq!(p.parse(&long).unwrap_err().reason(), "csv_column_count");
    }

    #[test]
    fn key_value_pairs() {
        let mut p = LineParser::new(
            Format::KeyValue,
            FieldRoles {
                device_field: Some("dev".into()),
                timestamp_field: Some("t".into()),
                timestamp_format: TimestampFormat::Unix,
                ..roles()
            },
        );
        let got = p
            .parse("dev=ws-3 t=1714564800.5 temp=20.5, rh=41;junk temp=99 =7")
            .unwrap()
            .unwrap();
        assert_eq!(got.device.as_deref(), Some("ws-3"));
        assert_eq!(
            got.observed_at.unwrap().timestamp_millis(),
            1_714_564_800_500
        );
        assert_eq!(
            keys(&got),
            vec![("temp", 20.5), ("rh", 41.0)],
            "first of a repeated key wins"
        );
        assert_eq!(
            p.parse("hello world").unwrap_err().reason(),
            "no_key_value_pairs"
        );
        assert_eq!(
            p.parse("dev=ws-3 t=-5 temp=1").unwrap_err().reason(),
            "bad_timestamp"
        );
        assert_eq!(
            p.parse("dev=ws-3 t=1e300 temp=1").unwrap_err().reason(),
            "bad_timestamp"
        );
    }

    #[test]
    fn regex_named_groups_and_metric_field() {
        let re = Regex::new(r"^(?P<dev>[\w-]+) (?P<metric>\w+)=(?P<value>\S+) ?(?P<unit>\S+)?$")
            .unwrap();
        let mut p = LineParser::new(
            Format::Regex(re),
            FieldRoles {
                device_field: Some("dev".into()),
                metric_field: Some("metric".into()),
                unit_field: Some("unit".into()),
                ..roles()
            },
        );
        let got = p.parse("tank-1 level=1.25 m").unwrap().unwrap();
        assert_eq!(got.device.as_deref(), Some("tank-1"));
        assert_eq!(
            got.values,
            vec![RawValue {
                key: "level".into(),
                value: 1.25,
                unit: Some("m".into())
            }]
        );
        assert_eq!(
            p.parse("tank-1 level=1.25").unwrap().unwrap().values[0].unit,
            None
        );
        assert_eq!(p.parse("garbage").unwrap_err().reason(), "regex_no_match");
        assert_eq!(
            p.parse("tank-1 level=high").unwrap_err().reason(),
            "bad_value"
        );
    }

    #[test]
    fn timestamp_patterns() {
        let v = FieldValue::Text("2024-05-01 12:00:00".into());
        let t = parse_timestamp(&v, &TimestampFormat::Pattern("%Y-%m-%d %H:%M:%S".into())).unwrap();
        assert_eq!(t.to_rfc3339(), "2024-05-01T12:00:00+00:00");
        let z = FieldValue::Text("2024-05-01 12:00:00 +0200".into());
        let t =
            parse_timestamp(&z, &TimestampFormat::Pattern("%Y-%m-%d %H:%M:%S %z".into())).unwrap();
        assert_eq!(t.to_rfc3339(), "2024-05-01T10:00:00+00:00");
        let ms = FieldValue::Number(1_714_564_800_123.0);
        assert_eq!(
            parse_timestamp(&ms, &TimestampFormat::UnixMs)
                .unwrap()
                .timestamp_millis(),
            1_714_564_800_123
        );
        assert!(parse_timestamp(&FieldValue::Text("".into()), &TimestampFormat::Rfc3339).is_err());
        assert!(check_timestamp_pattern("%Y-%m-%d").is_ok());
        assert!(check_timestamp_pattern("%Q").is_err());
        assert!(check_timestamp_pattern("").is_err());
    }
}
