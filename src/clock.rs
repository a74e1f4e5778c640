//! The agent's clock: the one injectable wall clock ([`Clock`]), steps of it detected
//! against the monotonic clock, and whether the local clock is synchronised (G8).
//!
//! This module is a leaf: it imports nothing of the crate. What the agent does with a
//! step (move unsynchronised readings, remember it for `outpost status`) is done by an
//! implementation of [`StepStore`] that [`watch_steps`] is given.
//!
//! # Is the local clock synchronised?
//!
//! Gateways without a real-time clock boot with a wrong time; readings stamped by the
//! local clock before synchronisation carry `flags::CLOCK_UNSYNCED`.
//!
//! The kernel knows (the `STA_UNSYNC` bit of `adjtimex`), but the hardened unit's
//! `ProtectClock=` installs a seccomp filter that refuses `adjtimex` even for reading
//! (`EPERM`). So the answer is learned, in order, from:
//!
//! 1. `/run/systemd/timesync/synchronized`, which systemd-timesyncd creates once it
//!    has synchronised the clock (readable by everyone, allowed by the unit);
//! 2. systemd-timedated's `NTPSynchronized` property on the system D-Bus
//!    (`org.freedesktop.timedate1`, what `timedatectl show -p NTPSynchronized`
//!    prints): timedated reads the kernel's state itself, outside our sandbox, so it
//!    is right with chrony and ntpd too, which never create the timesyncd flag;
//! 3. `adjtimex` with no modes set (read-only), when the seccomp filter allows it
//!    (outside the unit, or on a unit without `ProtectClock=`);
//! 4. otherwise "not synchronised": the agent cannot vouch for the clock, and an honest
//!    flag is better than a silent wrong time.
//!
//! [`is_synchronized`] is the one answer: the readings' flags, `/health` and the
//! central heartbeat all ask it. It is cached for a second: serial sources ask for
//! every line. timedated is asked by `busctl` (systemd's own D-Bus client, present
//! wherever the unit runs: it speaks the protocol, honours `DBUS_SYSTEM_BUS_ADDRESS`,
//! and costs the agent no dependency; `timedatectl` itself refuses to run where
//! systemd is not PID 1) on a background thread, never by the caller: see
//! [`TimedatedWatch`].
//!
//! # The agent's wall clock and its steps
//!
//! Every time decision of the agent that uses wall time (local reading timestamps,
//! alert timers, retention, health and status ages) asks an injected [`Clock`], not
//! `Utc::now()` directly, so that tests can step the clock of a running agent (debug
//! builds only, see [`TEST_OFFSET_ENV`]) or pause it (`Clock::tokio`). Durations that
//! must not jump with the wall clock are measured on the monotonic clock (`Instant`),
//! or corrected with a [`StepDetector`]: the wall clock moved by more than
//! [`STEP_THRESHOLD`] beyond what the monotonic clock moved. The agent watches for
//! steps once a second ([`watch_steps`]), logs them, and keeps the last one
//! ([`last_step`], persisted for `outpost status`) so `/health` and `outpost status`
//! report "clock stepped back by 1h at …" for [`step_notice`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// **Test only, debug builds only.** Names a file holding an offset in seconds (e.g.
/// `-3600`, `86400.5`) added to the system clock by [`Clock::system`], optionally
/// followed by `synchronized` or `unsynchronized`, which then replaces the answer of
/// [`is_synchronized`]. The file is re-read at most once a second; a missing or
/// unreadable file means no offset. Lets black-box tests step the clock of a running
/// agent without root or touching the machine's clock. A release build ignores it.
pub const TEST_OFFSET_ENV: &str = "OUTPOST_TEST_CLOCK_OFFSET_FILE";

/// **Test only, debug builds only.** Seconds a clock step stays reported by `/health`
/// and `outpost status` instead of [`STEP_NOTICE`].
pub const TEST_STEP_NOTICE_ENV: &str = "OUTPOST_TEST_CLOCK_STEP_NOTICE";

/// A wall-clock move this much larger or smaller than the monotonic clock's is a step
/// (NTP slews at most 0.5 ms/s; scheduling delays move both clocks alike).
pub const STEP_THRESHOLD: Duration = Duration::from_secs(2);

/// How long a step stays reported.
pub const STEP_NOTICE: Duration = Duration::from_secs(600);

/// Where "now" comes from: the system clock in the agent; a clock that follows tokio's
/// (pausable) time in tests, so `for`, reminders and backoff are tested without sleeps.
#[derive(Clone)]
pub struct Clock(std::sync::Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>);

impl Clock {
    /// The system clock (in debug builds, plus the offset of [`TEST_OFFSET_ENV`]).
    pub fn system() -> Clock {
        Clock(std::sync::Arc::new(system_now))
    }

    /// Wall time that advances with `tokio::time`, starting at `start`.
    pub fn tokio(start: DateTime<Utc>) -> Clock {
        let origin = tokio::time::Instant::now();
        Clock(std::sync::Arc::new(move || {
            start + chrono::Duration::from_std(origin.elapsed()).unwrap_or_default()
        }))
    }

    /// Wall time from `now` (tests that step the clock of an in-process agent).
    pub fn from_fn(now: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Clock {
        Clock(std::sync::Arc::new(now))
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// What [`Clock::system`] reads.
fn system_now() -> DateTime<Utc> {
    let system = Utc::now();
    match test_clock() {
        None => system,
        Some((offset, _)) => system + offset,
    }
}

/// What the test file says: the offset and, if given, the synchronisation state;
/// `None` without [`TEST_OFFSET_ENV`], and always `None` in release builds. Re-read at
/// most once a second.
#[cfg(debug_assertions)]
fn test_clock() -> Option<(chrono::Duration, Option<bool>)> {
    static OFFSET_FILE: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    static CACHE: Mutex<Option<(Instant, chrono::Duration, Option<bool>)>> = Mutex::new(None);
    let path = OFFSET_FILE
        .get_or_init(|| std::env::var_os(TEST_OFFSET_ENV).map(std::path::PathBuf::from))
        .as_ref()?;
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((read_at, offset, synced)) = *cache {
        if read_at.elapsed() < Duration::from_secs(1) {
            return Some((offset, synced));
        }
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (offset, synced) = parse_test_clock(&text);
    *cache = Some((Instant::now(), offset, synced));
    Some((offset, synced))
}

#[cfg(not(debug_assertions))]
fn test_clock() -> Option<(chrono::Duration, Option<bool>)> {
    None
}

/// `"-3600 unsynchronized"` → (-1h, Some(false)); anything unreadable → no offset.
#[cfg_attr(not(debug_assertions), allow(dead_code))]
fn parse_test_clock(text: &str) -> (chrono::Duration, Option<bool>) {
    let mut words = text.split_whitespace();
    let offset = words
        .next()
        .and_then(|w| w.parse::<f64>().ok())
        .filter(|secs| secs.is_finite() && secs.abs() < 1e11)
        .map(|secs| chrono::Duration::microseconds((secs * 1e6) as i64))
        .unwrap_or_default();
    let synced = match words.next() {
        Some("synchronized") => Some(true),
        Some("unsynchronized") => Some(false),
        _ => None,
    };
    (offset, synced)
}

/// Detects steps of the wall clock by comparing it with the monotonic clock between
/// two observations.
#[derive(Debug, Default, Clone)]
pub struct StepDetector {
    last: Option<(DateTime<Utc>, Instant)>,
}

impl StepDetector {
    /// Returns the step since the previous observation (positive: forward), if the
    /// wall clock moved at least [`STEP_THRESHOLD`] more or less than `mono`.
    pub fn observe(&mut self, wall: DateTime<Utc>, mono: Instant) -> Option<chrono::Duration> {
        let previous = self.last.replace((wall, mono));
        let (last_wall, last_mono) = previous?;
        let monotonic = chrono::Duration::from_std(mono.saturating_duration_since(last_mono))
            .unwrap_or(chrono::Duration::MAX);
        let step = (wall - last_wall).checked_sub(&monotonic)?;
        let threshold = chrono::Duration::from_std(STEP_THRESHOLD).unwrap_or_default();
        (step.abs() >= threshold).then_some(step)
    }
}

/// A detected step of the wall clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClockStep {
    /// The wall time just after the step.
    pub at: DateTime<Utc>,
    /// How far the clock moved beyond the monotonic clock (negative: backwards).
    pub seconds: f64,
}

impl ClockStep {
    /// "stepped back by 1h at 2026-11-26T07:00:00Z".
    pub fn describe(&self) -> String {
        let by = Duration::from_secs(self.seconds.abs().round() as u64);
        format!(
            "stepped {} by {} at {}",
            if self.seconds < 0.0 {
                "back"
            } else {
                "forward"
            },
            humantime::format_duration(by),
            self.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )
    }

    /// Whether the step is still reported at `now` ([`step_notice`] after it).
    pub fn is_recent(&self, now: DateTime<Utc>) -> bool {
        let since = (now - self.at).abs().to_std().unwrap_or(Duration::MAX);
        since <= step_notice()
    }

    /// The step saved as `json` (the value of the [`STEP_STATE`] row), if it is still
    /// recent at `now`.
    pub fn recent_from_json(json: Option<&str>, now: DateTime<Utc>) -> Option<ClockStep> {
        json.and_then(|json| serde_json::from_str::<ClockStep>(json).ok())
            .filter(|step| step.is_recent(now))
    }
}

/// How long a step stays reported: [`STEP_NOTICE`], or (debug builds) the test
/// override [`TEST_STEP_NOTICE_ENV`].
pub fn step_notice() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(secs) = std::env::var(TEST_STEP_NOTICE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
    {
        return Duration::from_secs_f64(secs);
    }
    STEP_NOTICE
}

static LAST_STEP: Mutex<Option<ClockStep>> = Mutex::new(None);

/// The last step this process detected.
pub fn last_step() -> Option<ClockStep> {
    LAST_STEP.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// `source_state` row (owner, key) where the last step is kept for `outpost status`.
/// `@` cannot start a source name, so it never collides with a source's rows.
pub const STEP_STATE: (&str, &str) = ("@agent", "clock_step");

/// The readings a step may have to move (G8): those committed by the previous check,
/// and those committed since whose time lies within the interval since it on the old
/// clock (a step is at least [`STEP_THRESHOLD`], so the intervals before and after it
/// do not overlap).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepWindow {
    /// The first reading id this process committed (readings before are not its own).
    pub first_id: i64,
    /// The newest committed id at the previous check.
    pub previous_id: i64,
    /// The wall time of the previous check (on the old clock).
    pub previous_wall: DateTime<Utc>,
    /// How long the monotonic clock says passed since the previous check.
    pub since: chrono::Duration,
    /// How far the wall clock stepped (positive: forward).
    pub step: chrono::Duration,
}

/// What [`watch_steps`] does with what it learns; implemented over the local store
/// (today in `sync::clock_hold`; its home is the store, which keeps the readings and
/// the `source_state` rows).
pub trait StepStore: Clone + Send + Sync + 'static {
    /// The id of the newest committed reading (it follows commits).
    fn newest_committed(&self) -> i64;
    /// G8: readings this process stamped with its own clock while it was not
    /// synchronised (`CLOCK_UNSYNCED`), not yet corrected nor sent, and stamped before
    /// the step (see [`StepWindow`]), move with the step, so they stay right relative
    /// to the new clock.
    fn move_unsynced(&self, window: StepWindow) -> impl Future<Output = ()> + Send;
    /// G8: the clock is synchronised now; the readings this process stamped before
    /// (ids in `first_id + 1 ..= newest`, moved with every step since) carry the right
    /// time: flag them `CLOCK_CORRECTED`.
    fn mark_corrected(&self, first_id: i64, newest: i64) -> impl Future<Output = ()> + Send;
    /// Keeps `step` for `outpost status` (the [`STEP_STATE`] row).
    fn save_step(&self, step: &ClockStep) -> impl Future<Output = ()> + Send;
}

/// Watches the wall clock once a second until `shutdown`: each step is logged, kept
/// for `/health` and saved through `store` for `outpost status`.
pub async fn watch_steps(store: impl StepStore, shutdown: tokio_util::sync::CancellationToken) {
    watch_steps_on(Clock::system(), store, shutdown).await
}

/// [`watch_steps`] on `clock`.
pub async fn watch_steps_on(
    clock: Clock,
    store: impl StepStore,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut detector = StepDetector::default();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Readings this process stamped: only their clock is known (G8: same boot, and the
    // monotonic clock measured the time since).
    let first_id = store.newest_committed();
    let mut previous: Option<(DateTime<Utc>, Instant, i64)> = None;
    let mut was_synchronized = is_synchronized();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let wall = clock.now();
        let mono = Instant::now();
        let newest = store.newest_committed();
        let step = detector.observe(wall, mono);
        if let (Some(step), Some((previous_wall, previous_mono, previous_id))) = (step, previous) {
            let since = chrono::Duration::from_std(mono.saturating_duration_since(previous_mono))
                .unwrap_or_default();
            let window = StepWindow {
                first_id,
                previous_id,
                previous_wall,
                since,
                step,
            };
            store.move_unsynced(window).await;
        }
        let synchronized = is_synchronized();
        if synchronized && !was_synchronized {
            store.mark_corrected(first_id, newest).await;
        }
        was_synchronized = synchronized;
        previous = Some((wall, mono, newest));
        let Some(step) = step else {
            continue;
        };
        let step = ClockStep {
            at: wall,
            seconds: step.num_milliseconds() as f64 / 1000.0,
        };
        tracing::warn!(
            seconds = step.seconds,
            "The wall clock {}; alert timers and retention follow the monotonic clock.",
            step.describe()
        );
        // Saved first, so that once `/health` shows the step `outpost status` does too.
        store.save_step(&step).await;
        *LAST_STEP.lock().unwrap_or_else(|p| p.into_inner()) = Some(step);
    }
}

/// The file systemd-timesyncd creates once the clock is synchronised.
pub const TIMESYNC_FLAG: &str = "/run/systemd/timesync/synchronized";

/// How long an answer is reused.
const CACHE_MILLIS: u64 = 1000;

/// What the kernel's `adjtimex` said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelClock {
    Synchronized,
    Unsynchronized,
    /// The call was refused (seccomp under `ProtectClock=`) or failed.
    Unavailable,
}

/// Whether the local clock is known to be synchronised (cached for a second).
pub fn is_synchronized() -> bool {
    if let Some((_, Some(synced))) = test_clock() {
        return synced;
    }
    // Bit 63: an answer is cached; bit 62: the answer; low bits: milliseconds since START.
    static START: OnceLock<Instant> = OnceLock::new();
    static CACHE: AtomicU64 = AtomicU64::new(0);
    const CACHED: u64 = 1 << 63;
    const ANSWER: u64 = 1 << 62;
    let now_ms = START.get_or_init(Instant::now).elapsed().as_millis() as u64 & (ANSWER - 1);
    let cached = CACHE.load(Ordering::Relaxed);
    if cached & CACHED != 0 && now_ms.saturating_sub(cached & (ANSWER - 1)) < CACHE_MILLIS {
        return cached & ANSWER != 0;
    }
    let answer = decide_with_timedated(
        Path::new(TIMESYNC_FLAG).exists(),
        timedated().answer(),
        kernel_clock,
    );
    CACHE.store(
        CACHED | if answer { ANSWER } else { 0 } | now_ms,
        Ordering::Relaxed,
    );
    answer
}

/// The decision without timedated, with its inputs passed in so it can be tested.
pub fn decide(timesync_flag_exists: bool, kernel: impl FnOnce() -> KernelClock) -> bool {
    decide_with_timedated(timesync_flag_exists, None, kernel)
}

/// The decision: the timesyncd flag, else timedated's answer, else the kernel.
pub fn decide_with_timedated(
    timesync_flag_exists: bool,
    timedated: Option<bool>,
    kernel: impl FnOnce() -> KernelClock,
) -> bool {
    if timesync_flag_exists {
        return true;
    }
    match timedated {
        Some(answer) => answer,
        None => kernel() == KernelClock::Synchronized,
    }
}

/// How often timedated is asked while the clock is not synchronised (the state to
/// notice soon after boot), and once it is.
const TIMEDATED_POLL_UNSYNCED: Duration = Duration::from_secs(15);
const TIMEDATED_POLL_SYNCED: Duration = Duration::from_secs(300);
/// An answer older than this is not used (timedated stopped answering).
const TIMEDATED_ANSWER_TTL: Duration = Duration::from_secs(330);

/// timedated's last answer, refreshed by one background thread so that
/// [`is_synchronized`] never waits for D-Bus (it is called on async worker threads).
pub struct TimedatedWatch {
    /// Whether timedated was asked at least once, and its last answer (`None`: it
    /// cannot be asked: no bus, no timedated).
    last: Mutex<(bool, Option<(Instant, bool)>)>,
    answered: std::sync::Condvar,
}

/// The process's watch; its thread starts on first use.
pub fn timedated() -> &'static TimedatedWatch {
    static WATCH: OnceLock<&'static TimedatedWatch> = OnceLock::new();
    WATCH.get_or_init(|| {
        let watch: &'static TimedatedWatch = Box::leak(Box::new(TimedatedWatch {
            last: Mutex::new((false, None)),
            answered: std::sync::Condvar::new(),
        }));
        let spawned = std::thread::Builder::new()
            .name("clock-timedated".into())
            .spawn(move || loop {
                let answer = ask_timedated();
                {
                    let mut last = watch.last.lock().unwrap_or_else(|p| p.into_inner());
                    *last = (true, answer.map(|a| (Instant::now(), a)));
                }
                watch.answered.notify_all();
                std::thread::sleep(match answer {
                    Some(true) => TIMEDATED_POLL_SYNCED,
                    _ => TIMEDATED_POLL_UNSYNCED,
                });
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "Cannot start the thread that asks systemd-timedated about the clock; using the other sources.");
        }
        watch
    })
}

impl TimedatedWatch {
    /// The last answer, if recent enough.
    pub fn answer(&self) -> Option<bool> {
        let (_, last) = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.filter(|(at, _)| at.elapsed() < TIMEDATED_ANSWER_TTL)
            .map(|(_, a)| a)
    }

    /// Waits (blocking, at most `timeout`) until timedated was asked once, so the agent
    /// knows the clock state before its sources start. Returns the answer, if any.
    pub fn wait_first(&self, timeout: Duration) -> Option<bool> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (last, _) = self
            .answered
            .wait_timeout_while(last, timeout, |(asked, _)| !*asked)
            .unwrap_or_else(|p| p.into_inner());
        last.1.map(|(_, a)| a)
    }
}

/// Asks systemd-timedated for `NTPSynchronized` through `busctl` (blocking, at most
/// 10 s; D-Bus activation starts timedated if it is not running). `None` when it
/// cannot answer: no system bus, no timedated, no `busctl`.
pub fn ask_timedated() -> Option<bool> {
    let out = std::process::Command::new("busctl")
        .args([
            "--system",
            "--timeout=10",
            "get-property",
            "org.freedesktop.timedate1",
            "/org/freedesktop/timedate1",
            "org.freedesktop.timedate1",
            "NTPSynchronized",
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    parse_ntp_synchronized(&String::from_utf8_lossy(&out.stdout))
}

/// `busctl get-property` prints a boolean as `b true` or `b false`.
pub fn parse_ntp_synchronized(text: &str) -> Option<bool> {
    match text.trim() {
        "b true" => Some(true),
        "b false" => Some(false),
        _ => None,
    }
}

/// Asks the kernel through `adjtimex` without changing anything (`modes = 0`).
pub fn kernel_clock() -> KernelClock {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `timex` is plain data; zeroed means "read only" (modes = 0), and the
        // kernel only writes into the struct we own.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        let state = unsafe { libc::adjtimex(&mut tx) };
        classify_adjtimex(state, tx.status)
    }
    #[cfg(not(target_os = "linux"))]
    {
        KernelClock::Unavailable
    }
}

/// Interprets `adjtimex`'s return value and status bits.
#[cfg(target_os = "linux")]
pub fn classify_adjtimex(state: libc::c_int, status: libc::c_int) -> KernelClock {
    if state < 0 {
        KernelClock::Unavailable
    } else if state == libc::TIME_ERROR || status & libc::STA_UNSYNC != 0 {
        KernelClock::Unsynchronized
    } else {
        KernelClock::Synchronized
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_wall_moves_the_monotonic_clock_did_not_make() {
        let mut d = StepDetector::default();
        let t0 = Utc::now();
        let m0 = Instant::now();
        assert_eq!(d.observe(t0, m0), None);
        let s = chrono::Duration::seconds;
        // One second on both clocks, and a slow scheduler: no step.
        assert_eq!(d.observe(t0 + s(1), m0 + Duration::from_secs(1)), None);
        assert_eq!(d.observe(t0 + s(31), m0 + Duration::from_secs(31)), None);
        // Back by an hour while a second passed.
        let back = d.observe(t0 + s(32) - s(3600), m0 + Duration::from_secs(32));
        assert_eq!(back, Some(-s(3600)));
        // Forward by a day.
        let fwd = d.observe(t0 + s(33) + s(82800), m0 + Duration::from_secs(33));
        assert_eq!(fwd, Some(s(86400)));
        let step = ClockStep {
            at: t0,
            seconds: -3600.0,
        };
        assert!(step.describe().starts_with("stepped back by 1h at "));
        assert!(step.is_recent(t0 + s(60)));
        assert!(!step.is_recent(t0 + s(3600)));
    }

    #[test]
    fn the_timesync_flag_wins_without_asking_the_kernel() {
        assert!(decide(true, || panic!("adjtimex must not be called")));
        assert!(decide(false, || KernelClock::Synchronized));
        assert!(!decide(false, || KernelClock::Unsynchronized));
        assert!(
            !decide(false, || KernelClock::Unavailable),
            "refused adjtimex: cannot vouch"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn adjtimex_results() {
        assert_eq!(classify_adjtimex(-1, 0), KernelClock::Unavailable);
        assert_eq!(
            classify_adjtimex(libc::TIME_OK, 0),
            KernelClock::Synchronized
        );
        assert_eq!(
            classify_adjtimex(libc::TIME_OK, libc::STA_UNSYNC),
            KernelClock::Unsynchronized
        );
        assert_eq!(
            classify_adjtimex(libc::TIME_ERROR, 0),
            KernelClock::Unsynchronized
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn agrees_with_the_kernel_here() {
        // Whatever this machine's state is, the public answer matches its inputs and is
        // stable within the cache window.
        let timedated_answer = timedated().wait_first(Duration::from_secs(30));
        let expected = decide_with_timedated(
            Path::new(TIMESYNC_FLAG).exists(),
            timedated_answer,
            kernel_clock,
        );
        assert_eq!(is_synchronized(), expected);
        assert_eq!(is_synchronized(), expected);
    }

    /// Under a seccomp filter like `ProtectClock=`'s, adjtimex fails and the answer is
    /// "not synchronised" unless timesyncd's flag exists. Runs the check in a child
    /// process that installs such a filter (needs no privileges: NO_NEW_PRIVS first).
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn refused_adjtimex_is_unavailable() {
        if std::env::var_os("OUTPOST_CLOCK_CHILD").is_some() {
            install_adjtimex_filter();
            assert_eq!(kernel_clock(), KernelClock::Unavailable);
            assert_eq!(is_synchronized(), Path::new(TIMESYNC_FLAG).exists());
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "clock::tests::refused_adjtimex_is_unavailable",
                "--nocapture",
            ])
            .env("OUTPOST_CLOCK_CHILD", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "child failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"));
    }

    /// chrony's or ntpd's case under the unit's filter: no timesyncd flag, `adjtimex`
    /// refused, the kernel synchronised. systemd-timedated (here a stand-in on a
    /// private bus, found through `DBUS_SYSTEM_BUS_ADDRESS`) knows, and the agent asks
    /// it from inside the filter. When timedated says "no", or cannot be reached, the
    /// answer is "not synchronised" (the old fallbacks).
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn timedated_answers_under_the_units_filter() {
        if let Some(expected) = std::env::var_os("OUTPOST_TIMEDATED_CHILD") {
            install_adjtimex_filter();
            assert_eq!(kernel_clock(), KernelClock::Unavailable);
            let expected = match expected.to_str() {
                Some("yes") => Some(true),
                Some("no") => Some(false),
                _ => None,
            };
            assert_eq!(ask_timedated(), expected);
            assert_eq!(timedated().wait_first(Duration::from_secs(20)), expected);
            assert_eq!(is_synchronized(), expected == Some(true));
            return;
        }
        if Path::new(TIMESYNC_FLAG).exists() {
            eprintln!("SKIPPED timedated_answers_under_the_units_filter: {TIMESYNC_FLAG} exists here, so timedated is never asked");
            return;
        }
        let mock = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/timedate1_mock.py");
        let has = |cmd: &str, args: &[&str]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !(has("dbus-daemon", &["--version"])
            && has("busctl", &["--version"])
            && has("/usr/bin/python3", &["-c", "import dbus, gi"]))
        {
            eprintln!("SKIPPED timedated_answers_under_the_units_filter: needs dbus-daemon, busctl and python3-dbus/python3-gi (scripts/install-test-deps)");
            return;
        }
        for (state, expected) in [(Some("yes"), "yes"), (Some("no"), "no"), (None, "none")] {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("system_bus_socket");
            let conf = dir.path().join("bus.conf");
            std::fs::write(
                &conf,
                format!(
                    r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>"#,
                    socket.display()
                ),
            )
            .unwrap();
            /// Kills the bus and the mock however the test ends.
            struct Children(Vec<std::process::Child>);
            impl Drop for Children {
                fn drop(&mut self) {
                    for child in &mut self.0 {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
            }
            use std::io::BufRead;
            let mut children = Children(Vec::new());
            let mut daemon = std::process::Command::new("dbus-daemon")
                .arg(format!("--config-file={}", conf.display()))
                .args(["--nofork", "--print-address"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let mut printed = String::new();
            let daemon_out = daemon.stdout.take().unwrap();
            children.0.push(daemon);
            // Printed once the bus listens.
            std::io::BufReader::new(daemon_out)
                .read_line(&mut printed)
                .unwrap();
            assert!(
                printed.starts_with("unix:path="),
                "dbus-daemon printed {printed:?}"
            );
            let address = format!("unix:path={}", socket.display());
            if let Some(state) = state {
                let mut service = std::process::Command::new("/usr/bin/python3")
                    .arg(&mock)
                    .args([address.as_str(), state])
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut line = String::new();
                let service_out = service.stdout.take().unwrap();
                children.0.push(service);
                std::io::BufReader::new(service_out)
                    .read_line(&mut line)
                    .unwrap();
                assert_eq!(line.trim(), "ready", "the mock timedated did not start");
            }
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "clock::tests::timedated_answers_under_the_units_filter",
                    "--nocapture",
                ])
                .env("OUTPOST_TIMEDATED_CHILD", expected)
                .env("DBUS_SYSTEM_BUS_ADDRESS", &address)
                .output()
                .unwrap();
            drop(children);
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
                "timedated {expected}: child failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn busctl_booleans() {
        assert_eq!(parse_ntp_synchronized("b true\n"), Some(true));
        assert_eq!(parse_ntp_synchronized("b false"), Some(false));
        assert_eq!(parse_ntp_synchronized(""), None);
        assert_eq!(parse_ntp_synchronized("s \"yes\""), None);
        assert!(decide_with_timedated(false, Some(true), || {
            KernelClock::Unavailable
        }));
        assert!(!decide_with_timedated(false, Some(false), || {
            KernelClock::Synchronized
        }));
        assert!(decide_with_timedated(true, Some(false), || {
            KernelClock::Unavailable
        }));
        assert!(decide_with_timedated(false, None, || {
            KernelClock::Synchronized
        }));
        assert!(!decide_with_timedated(false, None, || {
            KernelClock::Unavailable
        }));
    }

    /// A classic BPF seccomp filter returning EPERM for adjtimex and clock_adjtime, as
    /// systemd's `ProtectClock=` does.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    fn install_adjtimex_filter() {
        use libc::{sock_filter, sock_fprog};
        const BPF_LD_W_ABS: u16 = 0x20;
        const BPF_JEQ_K: u16 = 0x15;
        const BPF_RET_K: u16 = 0x06;
        const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
        const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
        let stmt = |code, k| sock_filter {
            code,
            jt: 0,
            jf: 0,
            k,
        };
        let jeq = |k, jt, jf| sock_filter {
            code: BPF_JEQ_K,
            jt,
            jf,
            k,
        };
        let filter = [
            stmt(BPF_LD_W_ABS, 0), // seccomp_data.nr
            jeq(libc::SYS_adjtimex as u32, 2, 0),
            jeq(libc::SYS_clock_adjtime as u32, 1, 0),
            stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
            stmt(BPF_RET_K, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        ];
        let prog = sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_ptr() as *mut sock_filter,
        };
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            assert_eq!(
                libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const sock_fprog
                ),
                0
            );
        }
    }
}
