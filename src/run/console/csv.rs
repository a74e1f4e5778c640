//! CSV download of a device's readings over a chosen range.
//!
//! The columns and quoting are those of `outpost readings --format csv`
//! (`observed_at,device,metric,value,unit,source,flags,synced`, formula-looking cells
//! prefixed with `'`), oldest first. The range is bounded ([`MAX_RANGE`], and at most
//! [`MAX_ROWS`] readings, counted before the first byte is sent) so a hostile or
//! mistaken request is refused with a sentence instead of pinning the store; the rows
//! are written in chunks ([`write_rows`]) so the download never sits whole in memory.

use crate::model::{from_micros, to_micros};
use crate::report::Tz;
use chrono::{DateTime, Duration, NaiveDate, NaiveDateTime, TimeZone, Utc};
use rusqlite::{params, Connection};

/// The longest range one download may cover.
pub const MAX_RANGE: Duration = Duration::days(92);
/// The most readings one download may hold (about 20 MB of CSV: the reply is built
/// in memory, so this bounds what one download costs the gateway).
pub const MAX_ROWS: i64 = 250_000;
/// The header line, as `outpost readings --format csv` prints it.
pub const HEADER: &str = "observed_at,device,metric,value,unit,source,flags,synced\n";

/// A validated download: one device (one metric or all), `[from, to)`.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvRange {
    pub device: String,
    pub metric: Option<String>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl CsvRange {
    /// A file name for `Content-Disposition`: only safe characters.
    pub fn file_name(&self, tz: Tz) -> String {
        let safe = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                        c
                    } else {
                        '_'
                    }
                })
                .take(64)
                .collect()
        };
        let day = |t: DateTime<Utc>| t.with_timezone(&tz).format("%Y-%m-%d").to_string();
        let mut name = safe(&self.device);
        if let Some(m) = &self.metric {
            name.push('-');
            name.push_str(&safe(m));
        }
        format!("{name}-{}-{}.csv", day(self.from), day(self.to))
    }
}

/// Reads `from`, `to` and `metric` of the query: a local date (`2026-12-01`, the
/// whole day; `to` inclusive), a local time (`2026-12-01T08:00`, what a browser's
/// `datetime-local` sends) or RFC 3339. Defaults: the last 24 hours, every metric.
/// Refuses, with a sentence, what cannot be served: unknown keys, unparseable or
/// reversed times, a range over [`MAX_RANGE`].
pub fn parse_range(
    device: &str,
    query: &[(String, String)],
    tz: Tz,
    now: DateTime<Utc>,
) -> Result<CsvRange, String> {
    let (mut from, mut to, mut metric) = (None, None, None);
    for (key, value) in query {
        match key.as_str() {
            "from" if !value.is_empty() => from = Some(parse_time(value, tz, false)?),
            "to" if !value.is_empty() => to = Some(parse_time(value, tz, true)?),
            "metric" if !value.is_empty() => {
                crate::settings::check_identifier(value, "the metric")?;
                metric = Some(value.clone());
            }
            "from" | "to" | "metric" => {}
            other => {
                let shown: String = other.chars().take(40).collect();
                return Err(format!(
                    "unknown parameter {shown:?}; use from, to and metric"
                ));
            }
        }
    }
    let to = to.unwrap_or(now);
    let from = from.unwrap_or(to - Duration::hours(24));
    if from >= to {
        return Err(format!(
            "the range is empty: from {} is not before to {}",
            from.with_timezone(&tz).format("%Y-%m-%d %H:%M"),
            to.with_timezone(&tz).format("%Y-%m-%d %H:%M")
        ));
    }
    if to - from > MAX_RANGE {
        return Err(format!(
            "the range is {} days; at most {} days per download, download it in parts",
            (to - from).num_days(),
            MAX_RANGE.num_days()
        ));
    }
    Ok(CsvRange {
        device: device.to_string(),
        metric,
        from,
        to,
    })
}

/// One end of the range. A date alone is local midnight (`end`: the next midnight,
/// so the day is included).
fn parse_time(value: &str, tz: Tz, end: bool) -> Result<DateTime<Utc>, String> {
    let shown: String = value.chars().take(40).collect();
    let refuse = || {
        format!(
            "expected a date like \"2026-12-01\", a local time like \"2026-12-01T08:00\" \
             or RFC 3339, found {shown:?}"
        )
    };
    if value.len() > 40 {
        return Err(refuse());
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return in_bounds(t.with_timezone(&Utc)).ok_or_else(refuse);
    }
    let local = if let Ok(day) = NaiveDate::parse_from_str(value, "%Y-%m-%d") {
        let day = if end {
            day.succ_opt().ok_or_else(refuse)?
        } else {
            day
        };
        day.and_hms_opt(0, 0, 0)
    } else {
        NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M")
            .or_else(|_| NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S"))
            .ok()
    };
    let local = local.ok_or_else(refuse)?;
    // A time skipped by a DST change is read as the one after it.
    let t = tz
        .from_local_datetime(&local)
        .earliest()
        .or_else(|| {
            tz.from_local_datetime(&(local + Duration::hours(1)))
                .earliest()
        })
        .ok_or_else(refuse)?;
    in_bounds(t.with_timezone(&Utc)).ok_or_else(refuse)
}

/// Only times the store can hold (microseconds since the epoch in an i64, after 1970).
fn in_bounds(t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let us = t.timestamp_micros();
    (0..i64::MAX / 2).contains(&us).then_some(t)
}

fn where_clause(range: &CsvRange) -> &'static str {
    if range.metric.is_some() {
        "device = ?1 AND metric = ?2 AND observed_at >= ?3 AND observed_at < ?4"
    } else {
        "device = ?1 AND ?2 IS NULL AND observed_at >= ?3 AND observed_at < ?4"
    }
}

/// How many readings `range` holds, counting at most `MAX_ROWS + 1`.
pub fn count(conn: &Connection, range: &CsvRange) -> rusqlite::Result<i64> {
    let sql = format!(
        "SELECT COUNT(*) FROM (SELECT 1 FROM readings WHERE {} LIMIT {})",
        where_clause(range),
        MAX_ROWS + 1
    );
    conn.query_row(
        &sql,
        params![
            range.device,
            range.metric,
            to_micros(range.from),
            to_micros(range.to)
        ],
        |r| r.get(0),
    )
}

/// Writes the CSV lines of `range` (without the header), oldest first, handing
/// `sink` chunks of about 64 KiB; stops early when `sink` returns `false` (the client
/// went away). Returns the number of rows written.
pub fn write_rows(
    conn: &Connection,
    range: &CsvRange,
    mut sink: impl FnMut(String) -> bool,
) -> rusqlite::Result<u64> {
    let sql = format!(
        "SELECT observed_at, device, metric, value, unit, source, flags, synced FROM readings \
         WHERE {} ORDER BY observed_at, id LIMIT {MAX_ROWS}",
        where_clause(range)
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query(params![
        range.device,
        range.metric,
        to_micros(range.from),
        to_micros(range.to)
    ])?;
    let mut chunk = String::with_capacity(70 * 1024);
    let mut written = 0;
    while let Some(row) = rows.next()? {
        let unit: Option<String> = row.get(4)?;
        let synced: i64 = row.get(7)?;
        let cells = [
            from_micros(row.get(0)?).to_rfc3339(),
            row.get(1)?,
            row.get(2)?,
            row.get::<_, f64>(3)?.to_string(),
            unit.unwrap_or_default(),
            row.get(5)?,
            row.get::<_, i64>(6)?.to_string(),
            (synced != 0).to_string(),
        ];
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                chunk.push(',');
            }
            push_field(&mut chunk, cell);
        }
        chunk.push('\n');
        written += 1;
        if chunk.len() >= 64 * 1024
            && !sink(std::mem::replace(
                &mut chunk,
                String::with_capacity(70 * 1024),
            ))
        {
            return Ok(written);
        }
    }
    if !chunk.is_empty() {
        sink(chunk);
    }
    Ok(written)
}

/// One CSV field as `outpost readings --format csv` writes it: a leading `=`, `+`,
/// `@` (or `-` on a non-number) is prefixed with `'` so a spreadsheet does not run a
/// device name as a formula; fields with `,`, `"` or line breaks are quoted.
pub fn push_field(out: &mut String, s: &str) {
    let defuse =
        s.starts_with(['=', '+', '@']) || (s.starts_with('-') && s.parse::<f64>().is_err());
    let quote = s.contains([',', '"', '\n', '\r']);
    if quote {
        out.push('"');
    }
    if defuse {
        out.push('\'');
    }
    if quote {
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 5, 10, 0, 0).unwrap()
    }

    fn berlin() -> Tz {
        Tz::load("Europe/Berlin").unwrap()
    }

    #[test]
    fn dates_are_local_days_and_to_is_inclusive() {
        let r = parse_range(
            "f",
            &q(&[("from", "2026-12-01"), ("to", "2026-12-02")]),
            berlin(),
            now(),
        )
        .unwrap();
        assert_eq!(
            r.from,
            Utc.with_ymd_and_hms(2026, 11, 30, 23, 0, 0).unwrap()
        );
        assert_eq!(r.to, Utc.with_ymd_and_hms(2026, 12, 2, 23, 0, 0).unwrap());
        let r = parse_range(
            "f",
            &q(&[("from", "2026-12-01T08:00"), ("metric", "temperature")]),
            berlin(),
            now(),
        )
        .unwrap();
        assert_eq!(r.from, Utc.with_ymd_and_hms(2026, 12, 1, 7, 0, 0).unwrap());
        assert_eq!(r.to, now());
        assert_eq!(r.metric.as_deref(), Some("temperature"));
        let r = parse_range("f", &[], berlin(), now()).unwrap();
        assert_eq!(r.to - r.from, Duration::hours(24));
        assert_eq!(r.file_name(berlin()), "f-2026-12-04-2026-12-05.csv");
    }

    #[test]
    fn hostile_ranges_are_refused_with_a_sentence() {
        let refused =
            |pairs: &[(&str, &str)]| parse_range("f", &q(pairs), berlin(), now()).unwrap_err();
        assert!(
            refused(&[("from", "1971-01-01"), ("to", "2026-12-01")]).contains("at most 92 days")
        );
        assert!(
            refused(&[("from", "2026-12-03"), ("to", "2026-12-01")]).contains("the range is empty")
        );
        assert!(refused(&[("from", "-99999-01-01T00:00:00Z")]).contains("expected a date"));
        assert!(refused(&[("from", "+275760-09-13T00:00:00Z")]).contains("expected a date"));
        assert!(refused(&[("from", "1960-01-01")]).contains("expected a date"));
        assert!(refused(&[("from", "yesterday")]).contains("expected a date"));
        assert!(refused(&[("from", &"9".repeat(10_000))]).len() < 300);
        assert!(
            refused(&[("from", "2026-12-01'; DROP TABLE readings;--")]).contains("expected a date")
        );
        assert!(refused(&[("metric", "temp\u{0}")]).contains("the metric"));
        assert!(refused(&[("limit", "1")]).contains("unknown parameter"));
        // The largest accepted range.
        assert!(parse_range(
            "f",
            &q(&[("from", "2026-09-04T10:00:00Z")]),
            berlin(),
            now()
        )
        .is_ok());
    }

    fn store() -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        crate::store::schema::migrate(&mut conn).unwrap();
        conn
    }

    #[test]
    fn rows_come_oldest_first_with_the_readings_columns_and_quoting() {
        let conn = store();
        let base = to_micros(Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap());
        for (i, (device, metric, unit)) in [
            ("f", "temperature", Some("°C")),
            ("f", "door", None),
            ("=evil,\"x\"", "temperature", Some("°C")),
            ("f", "temperature", Some("°C")),
        ]
        .iter()
        .enumerate()
        {
            conn.execute(
                "INSERT INTO readings (uid, source, device, metric, value, unit, observed_at, received_at, synced) \
                 VALUES (?1, 'sim', ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
                params![vec![i as u8; 16], device, metric, -1.5 * i as f64, unit, base + (3 - i as i64) * 1_000_000, (i % 2) as i64],
            )
            .unwrap();
        }
        let range = CsvRange {
            device: "f".into(),
            metric: None,
            from: from_micros(base),
            to: from_micros(base + 10_000_000),
        };
        assert_eq!(count(&conn, &range).unwrap(), 3);
        let mut out = String::new();
        let n = write_rows(&conn, &range, |chunk| {
            out.push_str(&chunk);
            true
        })
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            out,
            "2026-12-01T00:00:00+00:00,f,temperature,-4.5,°C,sim,0,true\n\
             2026-12-01T00:00:02+00:00,f,door,-1.5,,sim,0,true\n\
             2026-12-01T00:00:03+00:00,f,temperature,0,°C,sim,0,false\n"
        );
        let evil = CsvRange {
            device: "=evil,\"x\"".into(),
            metric: Some("temperature".into()),
            ..range
        };
        let mut out = String::new();
        write_rows(&conn, &evil, |c| {
            out.push_str(&c);
            true
        })
        .unwrap();
        assert!(
            out.starts_with("2026-12-01T00:00:01+00:00,\"'=evil,\"\"x\"\"\",temperature,-3,"),
            "{out}"
        );
    }

    #[test]
    fn fields_are_quoted_and_defused_like_outpost_readings() {
        let field = |s: &str| {
            let mut out = String::new();
            push_field(&mut out, s);
            out
        };
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field("=cmd()"), "'=cmd()");
        assert_eq!(field("-4.5"), "-4.5");
        assert_eq!(field("-x"), "'-x");
    }
}
