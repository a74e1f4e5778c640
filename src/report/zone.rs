//! Time zones for `agent.timezone` (daily summaries' local days, the console's local
//! times), read from the system's IANA database: `/usr/share/zoneinfo`, which the `tzdata`
//! package installs (the .deb depends on it), or the directory in `TZDIR`.
//!
//! Each zone's TZif file is read once, on first use, and kept for the life of the
//! process (a zone is a few KiB, and a configuration names one). The compiled-in database
//! this replaces (chrono-tz) was 1.8 MiB of the binary and, through its 66,000
//! relocated string pointers, 1.7 MiB of every agent's idle memory (docs/benchmarks.md,
//! "Session 8: binary size"). `UTC` needs no file, so the default configuration works on
//! a system without tzdata.
//!
//! Guarantees: a name that is not a plain zone name (`..`, an absolute path, control
//! characters) is refused before any file is opened; a missing zone is an error that says
//! which file was looked for and that the `tzdata` package provides it.

use chrono::{FixedOffset, MappedLocalTime, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// The directory of the system's time zone files when `TZDIR` is not set.
pub const ZONEINFO_DIR: &str = "/usr/share/zoneinfo";

/// A zone file larger than this is not a TZif file (the largest in tzdata 2025 is
/// under 4 KiB in the "fat" format).
const MAX_ZONE_FILE: u64 = 256 * 1024;

/// The largest UTC offset a zone may use: chrono's `FixedOffset` holds less than a day.
const MAX_OFFSET_SECS: i32 = 86_399;

/// An IANA time zone, loaded from the system's database. Cheap to copy: it refers to
/// the zone kept for the life of the process.
#[derive(Clone, Copy)]
pub struct Tz(&'static Zone);

struct Zone {
    name: &'static str,
    /// `None` for the built-in UTC.
    rules: Option<tz::TimeZone>,
}

static UTC_ZONE: Zone = Zone {
    name: "UTC",
    rules: None,
};

static UTC_TYPE: tz::timezone::LocalTimeType = tz::timezone::LocalTimeType::utc();

/// Zones read so far, by name.
fn loaded() -> &'static Mutex<HashMap<String, Tz>> {
    static LOADED: OnceLock<Mutex<HashMap<String, Tz>>> = OnceLock::new();
    LOADED.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Why a zone could not be loaded; the message is for a technician.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TzError {
    /// Not a zone name at all (empty, too long, `..`, an absolute path, odd characters).
    BadName(String),
    /// No such zone in the database (or no database: `tzdata` not installed).
    Unknown {
        name: String,
        path: PathBuf,
        no_database: bool,
    },
    /// The file exists but could not be read or is not a usable TZif file.
    Unreadable {
        name: String,
        path: PathBuf,
        reason: String,
    },
}

impl fmt::Display for TzError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TzError::BadName(shown) => write!(
                f,
                "{shown:?} is not a time zone name; write an IANA name like \"Europe/Berlin\" or \"UTC\""
            ),
            TzError::Unknown {
                name,
                path,
                no_database: false,
            } => write!(
                f,
                "unknown time zone {name:?} (no file {}); write an IANA name like \"Europe/Berlin\", \"America/New_York\" or \"UTC\" (`timedatectl list-timezones` lists them)",
                path.display()
            ),
            TzError::Unknown {
                name,
                path,
                no_database: true,
            } => write!(
                f,
                "time zone {name:?} needs the system's time zone database, and {} does not exist: install the `tzdata` package (or use \"UTC\")",
                path.display()
            ),
            TzError::Unreadable { name, path, reason } => write!(
                f,
                "time zone {name:?}: cannot use {}: {reason}; reinstall the `tzdata` package",
                path.display()
            ),
        }
    }
}

impl std::error::Error for TzError {}

impl Tz {
    /// Coordinated Universal Time, built in.
    pub const UTC: Tz = Tz(&UTC_ZONE);

    /// The zone `name` (`Europe/Berlin`, `UTC`), read from the system's database on first
    /// use.
    pub fn load(name: &str) -> Result<Tz, TzError> {
        check_name(name)?;
        if name == "UTC" {
            return Ok(Tz::UTC);
        }
        let mut loaded = loaded().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tz) = loaded.get(name) {
            return Ok(*tz);
        }
        let rules = read_zone(name, &zoneinfo_dir())?;
        // Kept for the life of the process, like the compiled-in database it replaces;
        // one per distinct valid name, and the names come from the configuration.
        let zone: &'static Zone = Box::leak(Box::new(Zone {
            name: Box::leak(name.to_owned().into_boxed_str()),
            rules: Some(rules),
        }));
        let tz = Tz(zone);
        loaded.insert(name.to_owned(), tz);
        Ok(tz)
    }

    /// The zone's IANA name, as configured.
    pub fn name(&self) -> &'static str {
        self.0.name
    }

    /// The local time type in force at `unix_time` (seconds).
    fn type_at(&self, unix_time: i64) -> &'static tz::timezone::LocalTimeType {
        let Some(rules) = &self.0.rules else {
            return &UTC_TYPE;
        };
        match rules.find_local_time_type(unix_time) {
            Ok(t) => t,
            // Beyond the file's last transition with no rule after it (not the case for
            // any zone of tzdata, whose files end with a rule): the last type in force.
            Err(_) => {
                let rules = rules.as_ref();
                let types = rules.local_time_types();
                rules
                    .transitions()
                    .last()
                    .and_then(|t| types.get(t.local_time_type_index()))
                    .or(types.first())
                    .unwrap_or(&UTC_TYPE)
            }
        }
    }

    fn offset_at(&self, unix_time: i64) -> TzOffset {
        TzOffset {
            tz: *self,
            kind: self.type_at(unix_time),
        }
    }
}

impl std::str::FromStr for Tz {
    type Err = TzError;

    /// [`Tz::load`].
    fn from_str(name: &str) -> Result<Tz, TzError> {
        Tz::load(name)
    }
}

impl PartialEq for Tz {
    fn eq(&self, other: &Tz) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Tz {}

impl fmt::Debug for Tz {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

impl fmt::Display for Tz {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name)
    }
}

/// The directory zone files are read from: `TZDIR` if set (as glibc does), else
/// [`ZONEINFO_DIR`].
fn zoneinfo_dir() -> PathBuf {
    match std::env::var_os("TZDIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(ZONEINFO_DIR),
    }
}

/// Refuses anything but a relative path of plain components: letters, digits and
/// `_ - + .`, no `.` or `..` component.
fn check_name(name: &str) -> Result<(), TzError> {
    let bad = || TzError::BadName(name.chars().take(64).collect());
    if name.is_empty() || name.len() > 64 {
        return Err(bad());
    }
    for part in name.split('/') {
        let plain = part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+' | '.'));
        if part.is_empty() || part == "." || part == ".." || !plain {
            return Err(bad());
        }
    }
    Ok(())
}

fn read_zone(name: &str, dir: &std::path::Path) -> Result<tz::TimeZone, TzError> {
    use std::io::Read;
    let path = dir.join(name);
    let unreadable = |reason: String| TzError::Unreadable {
        name: name.to_owned(),
        path: path.clone(),
        reason,
    };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let no_database = !dir.is_dir();
            return Err(TzError::Unknown {
                name: name.to_owned(),
                path: if no_database {
                    dir.to_owned()
                } else {
                    path.clone()
                },
                no_database,
            });
        }
        Err(e) => return Err(unreadable(e.to_string())),
    };
    let mut bytes = Vec::new();
    file.take(MAX_ZONE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(e.to_string()))?;
    if bytes.len() as u64 > MAX_ZONE_FILE {
        return Err(unreadable("larger than any time zone file".to_owned()));
    }
    // A directory (`America`) opens but does not read.
    let rules = tz::TimeZone::from_tz_data(&bytes)
        .map_err(|e| unreadable(format!("not a time zone file ({e})")))?;
    if rules
        .as_ref()
        .local_time_types()
        .iter()
        .any(|t| t.ut_offset().abs() > MAX_OFFSET_SECS)
    {
        return Err(unreadable("an offset from UTC of a day or more".to_owned()));
    }
    Ok(rules)
}

/// The offset of a [`Tz`] at one instant: the zone, and the local time type in force
/// (offset from UTC, abbreviation).
#[derive(Clone, Copy)]
pub struct TzOffset {
    tz: Tz,
    kind: &'static tz::timezone::LocalTimeType,
}

impl TzOffset {
    /// The abbreviation in force (`CET`, `CEST`), or the numeric offset when the zone
    /// has none.
    pub fn abbreviation(&self) -> String {
        match self.kind.time_zone_designation() {
            "" => self.fix().to_string(),
            a => a.to_owned(),
        }
    }
}

impl Offset for TzOffset {
    fn fix(&self) -> FixedOffset {
        // In range: `read_zone` refuses offsets of a day or more.
        FixedOffset::east_opt(self.kind.ut_offset()).unwrap_or(Utc.fix())
    }
}

impl fmt::Debug for TzOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.abbreviation())
    }
}

impl fmt::Display for TzOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.abbreviation())
    }
}

impl TimeZone for Tz {
    type Offset = TzOffset;

    fn from_offset(offset: &TzOffset) -> Tz {
        offset.tz
    }

    fn offset_from_local_date(&self, local: &NaiveDate) -> MappedLocalTime<TzOffset> {
        match local.and_hms_opt(0, 0, 0) {
            Some(midnight) => self.offset_from_local_datetime(&midnight),
            None => MappedLocalTime::None,
        }
    }

    /// The offsets under which the wall-clock time `local` exists: none in a gap
    /// (clocks moved forward), two in an overlap (clocks moved back), earlier first.
    ///
    /// A local time is at most a day away from the instant it names, so its offset is
    /// one of those in force a day before and a day after it (and at it): zones change
    /// their offset at most once in two days.
    fn offset_from_local_datetime(&self, local: &NaiveDateTime) -> MappedLocalTime<TzOffset> {
        let wall = local.and_utc().timestamp();
        // (instant, offset) of each offset under which `local` exists, earliest first.
        let mut earliest: Option<(i64, TzOffset)> = None;
        let mut latest: Option<(i64, TzOffset)> = None;
        for probe in [
            wall.saturating_sub(86_400),
            wall,
            wall.saturating_add(86_400),
        ] {
            let candidate = self.type_at(probe).ut_offset();
            let instant = wall.saturating_sub(i64::from(candidate));
            let at = self.offset_at(instant);
            if at.kind.ut_offset() != candidate {
                continue;
            }
            if earliest.is_none_or(|(e, _)| instant < e) {
                earliest = Some((instant, at));
            }
            if latest.is_none_or(|(l, _)| instant > l) {
                latest = Some((instant, at));
            }
        }
        match (earliest, latest) {
            (Some((e, first)), Some((l, last))) if e != l => {
                MappedLocalTime::Ambiguous(first, last)
            }
            (Some((_, only)), _) => MappedLocalTime::Single(only),
            _ => MappedLocalTime::None,
        }
    }

    fn offset_from_utc_date(&self, utc: &NaiveDate) -> TzOffset {
        match utc.and_hms_opt(0, 0, 0) {
            Some(midnight) => self.offset_from_utc_datetime(&midnight),
            None => self.offset_at(0),
        }
    }

    fn offset_from_utc_datetime(&self, utc: &NaiveDateTime) -> TzOffset {
        self.offset_at(utc.and_utc().timestamp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, LocalResult};

    fn zone(name: &str) -> Tz {
        Tz::load(name).unwrap()
    }

    #[test]
    fn utc_needs_no_file() {
        assert!(std::ptr::eq(Tz::load("UTC").unwrap().0, &UTC_ZONE));
        assert_eq!(Tz::UTC.name(), "UTC");
    }

    #[test]
    fn names_that_are_paths_are_refused_before_any_file_is_read() {
        for bad in [
            "",
            "/etc/passwd",
            "../etc/passwd",
            "Europe/../../etc/passwd",
            "Europe//Berlin",
            "Europe/",
            "./UTC",
            "Europe/Berlin\n",
            "Europe/Ber lin",
            "Europe\\Berlin",
            &"A".repeat(65),
        ] {
            match Tz::load(bad) {
                Err(TzError::BadName(_)) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert!(check_name("America/Argentina/Buenos_Aires").is_ok());
        assert!(check_name("Etc/GMT+5").is_ok());
        assert!(check_name("America/Port-au-Prince").is_ok());
    }

    #[test]
    fn a_missing_zone_or_database_says_what_to_install() {
        let e = Tz::load("Mars/Olympus_Mons").unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown time zone \"Mars/Olympus_Mons\""),
            "{e}"
        );
        let e = read_zone(
            "Europe/Berlin",
            std::path::Path::new("/nonexistent/zoneinfo"),
        )
        .map(|_| ())
        .unwrap_err();
        assert!(
            e.to_string().contains("install the `tzdata` package"),
            "{e}"
        );
        assert!(e.to_string().contains("/nonexistent/zoneinfo"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_zone_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Garbage"), b"not a TZif file at all").unwrap();
        std::fs::create_dir(dir.path().join("Region")).unwrap();
        std::fs::write(dir.path().join("Huge"), vec![b'T'; 300 * 1024]).unwrap();
        for name in ["Garbage", "Region", "Huge"] {
            match read_zone(name, dir.path()) {
                Err(TzError::Unreadable { .. }) => {}
                other => panic!("{name}: {:?}", other.map(|_| ())),
            }
        }
    }

    #[test]
    fn a_zone_is_read_once_and_shared() {
        let a = zone("Europe/Berlin");
        let b = zone("Europe/Berlin");
        assert!(std::ptr::eq(a.0, b.0));
        assert_eq!(a.name(), "Europe/Berlin");
    }

    #[test]
    fn berlin_offsets_across_daylight_saving() {
        let berlin = zone("Europe/Berlin");
        let at = |s: &str| s.parse::<chrono::DateTime<Utc>>().unwrap();
        let offset = |t| {
            berlin
                .offset_from_utc_datetime(&at(t).naive_utc())
                .fix()
                .local_minus_utc()
        };
        assert_eq!(offset("2026-03-29T00:59:59Z"), 3600);
        assert_eq!(offset("2026-03-29T01:00:00Z"), 7200);
        assert_eq!(offset("2026-10-25T00:59:59Z"), 7200);
        assert_eq!(offset("2026-10-25T01:00:00Z"), 3600);
        // Past the fat files' explicit transitions (2037): the footer's rule.
        assert_eq!(offset("2080-07-01T00:00:00Z"), 7200);
        assert_eq!(offset("2080-01-01T00:00:00Z"), 3600);
        let summer = at("2026-07-01T10:00:00Z").with_timezone(&berlin);
        assert_eq!(summer.offset().abbreviation(), "CEST");
        assert_eq!(summer.format("%H:%M %Z").to_string(), "12:00 CEST");
    }

    #[test]
    fn local_times_in_gaps_and_overlaps() {
        let berlin = zone("Europe/Berlin");
        let local = |s: &str| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap();
        // 02:30 does not exist on the spring-forward day.
        assert!(matches!(
            berlin.from_local_datetime(&local("2026-03-29 02:30")),
            LocalResult::None
        ));
        // 02:30 happens twice on the fall-back day, CEST first.
        match berlin.from_local_datetime(&local("2026-10-25 02:30")) {
            LocalResult::Ambiguous(a, b) => {
                assert_eq!(a.to_rfc3339(), "2026-10-25T02:30:00+02:00");
                assert_eq!(b.to_rfc3339(), "2026-10-25T02:30:00+01:00");
                assert_eq!(b - a, Duration::hours(1));
            }
            other => panic!("{other:?}"),
        }
        match berlin.from_local_datetime(&local("2026-10-25 03:30")) {
            LocalResult::Single(t) => assert_eq!(t.to_rfc3339(), "2026-10-25T03:30:00+01:00"),
            other => panic!("{other:?}"),
        }
    }

    /// Every 45 minutes from 1970 to 2045 in zones with unusual histories, compared with the
    /// compiled-in database (chrono-tz, kept as a dev-dependency for this check only):
    /// the UTC offset of each instant, and each wall-clock time's offsets.
    #[test]
    fn agrees_with_the_compiled_in_database() {
        for name in [
            "Europe/Berlin",
            "Europe/London",
            "Europe/Dublin",
            "America/New_York",
            "America/Sao_Paulo",
            "Australia/Sydney",
            "Australia/Lord_Howe",
            "Asia/Kolkata",
            "Asia/Kathmandu",
            "Pacific/Apia",
            "Pacific/Chatham",
            "America/St_Johns",
            "Etc/GMT+5",
        ] {
            let ours = zone(name);
            let theirs: chrono_tz::Tz = name.parse().unwrap();
            // Every 45 minutes, so the samples fall on :00, :15, :30 and :45 in turn.
            let start = NaiveDate::from_ymd_opt(1970, 1, 1)
                .unwrap()
                .and_hms_opt(0, 15, 0)
                .unwrap();
            let mut t = start;
            while t.and_utc().timestamp() < 2_366_841_600 {
                assert_eq!(
                    ours.offset_from_utc_datetime(&t).fix(),
                    theirs.offset_from_utc_datetime(&t).fix(),
                    "{name}: offset at {t} UTC"
                );
                let a = ours.offset_from_local_datetime(&t).map(|o| o.fix());
                let b = theirs.offset_from_local_datetime(&t).map(|o| o.fix());
                assert_eq!(a, b, "{name}: local {t}");
                t += Duration::minutes(45);
            }
        }
    }
}
