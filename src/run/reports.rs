//! Daily summaries and calibration reminders as the agent runs them: one task that,
//! at start and then every [`ROUND`],
//!
//! 1. computes the closed local days of the retention period that are not stored yet,
//!    and recomputes the last two (late readings, e.g. a LoRaWAN backfill, change
//!    them; a changed summary is synced again), then prunes synced summaries older than
//!    the retention;
//! 2. warns about calibration due dates (30 days ahead, overdue): in the log once per
//!    local day, and through the reports' notifiers once per device and threshold
//!    (remembered in `source_state`, so a restart does not notify again);
//! 3. sends each `[[reports]]` table's summary of yesterday once its local time `at`
//!    has passed: the text, and for email the CSV as an attachment. Sent once per day
//!    and report (remembered in `source_state` after delivery; a failed attempt is
//!    retried next round).
//!
//! Everything reads the local database, so it works offline; the wall clock is the
//! agent's one, and a clock step only moves which day is "today" (a day already sent is
//! never sent twice, G8).

use crate::clock::Clock;
use crate::config::Config;
use crate::notify::{Attachment, Document, Notifier, Outcome};
use crate::report::render;
use crate::report::summary::{self, Context, DayBounds};
use crate::report::{calibration, Tz};
use crate::store::Store;
use chrono::NaiveDate;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The devices' calibration due dates as `/health` and `/metrics` read them; set at
/// start and on reload.
#[derive(Clone, Debug, Default)]
pub struct Calibrations(Arc<std::sync::Mutex<Option<DeviceBook>>>);

/// The time zone and the `[[devices]]` tables.
type DeviceBook = (Tz, Vec<crate::report::DeviceConfig>);

impl Calibrations {
    pub fn set(&self, config: &Config) {
        if let Ok(mut c) = self.0.lock() {
            *c = Some((config.agent.tz(), config.devices.clone()));
        }
    }

    /// Every device with a due date as of `now`'s local day, soonest first.
    pub fn all(&self, now: chrono::DateTime<chrono::Utc>) -> Vec<calibration::Calibration> {
        match self.0.lock().ok().as_deref() {
            Some(Some((tz, devices))) => calibration::all(devices, DayBounds::date_of(*tz, now)),
            _ => Vec::new(),
        }
    }
}

/// The informational `/health` check `calibration` (never failing): the devices due
/// within 30 days or overdue; `None` when no device has a due date.
pub fn calibration_check(all: &[calibration::Calibration]) -> Option<(bool, String)> {
    if all.is_empty() {
        return None;
    }
    let due: Vec<String> = all
        .iter()
        .filter(|c| c.state != calibration::Due::Ok)
        .map(|c| c.describe())
        .collect();
    Some((
        true,
        if due.is_empty() {
            format!(
                "{} device(s); none due within {} days",
                all.len(),
                calibration::WARN_DAYS
            )
        } else {
            due.join("; ")
        },
    ))
}

/// How often the task looks at the clock and the database.
pub const ROUND: Duration = Duration::from_secs(300);
/// **Test only, debug builds only.** Seconds between rounds instead of [`ROUND`], so
/// black-box tests see a recomputed day without waiting 5 minutes.
pub const TEST_ROUND_ENV: &str = "OUTPOST_TEST_REPORT_ROUND";

fn round_interval() -> Duration {
    #[cfg(debug_assertions)]
    if let Some(secs) = std::env::var(TEST_ROUND_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|s| *s > 0)
    {
        return Duration::from_secs(secs);
    }
    ROUND
}

/// The `source_state` source of this task's memory.
const STATE: &str = "reports";
/// Most closed days computed at start (a long retention does not mean a long start).
const MAX_BACKFILL_DAYS: i64 = 62;

/// The task; ends when `stop` is cancelled.
pub async fn run(
    config: Config,
    store: Store,
    clock: Clock,
    certs: crate::tls::CertWatch,
    stop: CancellationToken,
) {
    let config = Arc::new(config);
    let mut notifiers: BTreeMap<String, Arc<Notifier>> = BTreeMap::new();
    let names: std::collections::BTreeSet<&String> =
        config.reports.iter().flat_map(|r| &r.notifiers).collect();
    for name in names {
        let Some(n) = config.notifiers.iter().find(|n| &n.name == name) else {
            continue;
        };
        match Notifier::build(n, &config.agent.gateway_id, Some(&certs)) {
            Ok(built) => {
                notifiers.insert(name.clone(), Arc::new(built));
            }
            Err(e) => tracing::error!(
                notifier = %name,
                error = format!("{e:#}"),
                "Cannot build the notifier: daily reports through it are NOT SENT."
            ),
        }
    }
    let mut task = ReportTask {
        config,
        store,
        clock,
        notifiers,
        logged_calibration: None,
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = task.round() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(round_interval()) => {}
        }
    }
}

struct ReportTask {
    config: Arc<Config>,
    store: Store,
    clock: Clock,
    notifiers: BTreeMap<String, Arc<Notifier>>,
    /// The local day calibration warnings were last logged.
    logged_calibration: Option<NaiveDate>,
}

impl ReportTask {
    fn tz(&self) -> Tz {
        self.config.agent.tz()
    }

    /// Runs `read` on a fresh read connection on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, String> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.reader().and_then(|c| read(&c)))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn compute(&self, day: NaiveDate) -> Result<summary::DayReport, String> {
        let config = self.config.clone();
        let now = self.clock.now();
        self.read(move |conn| {
            let ctx = Context {
                tz: config.agent.tz(),
                rules: &config.alerts,
                devices: &config.devices,
                now,
            };
            summary::compute(conn, &ctx, day, None)
        })
        .await
    }

    async fn round(&mut self) {
        let tz = self.tz();
        let now = self.clock.now();
        let today = DayBounds::date_of(tz, now);
        if let Err(e) = self.keep_summaries(tz, today).await {
            tracing::warn!(error = %e, "Cannot update the daily summaries; retrying in 5 minutes.");
        }
        self.calibration(today).await;
        for i in 0..self.config.reports.len() {
            if let Err(e) = self.morning_report(i, today).await {
                tracing::warn!(report = i, error = %e, "Cannot send the daily report; retrying in 5 minutes.");
            }
        }
    }

    async fn keep_summaries(&self, tz: Tz, today: NaiveDate) -> Result<(), String> {
        let retention = self.config.storage.retention.get();
        let days = ((retention.as_secs() / 86_400) as i64 + 1).clamp(2, MAX_BACKFILL_DAYS);
        for back in (1..=days).rev() {
            let Some(day) = today.checked_sub_days(chrono::Days::new(back as u64)) else {
                continue;
            };
            if back > 2 && self.read(move |c| summary::is_stored(c, tz, day)).await? {
                continue;
            }
            // Computed from the readings: late readings count.
            let report = self.compute(day).await?;
            if report.series.is_empty() {
                continue;
            }
            self.store
                .write(move |conn| summary::save(conn, &report))
                .await
                .map_err(|e| e.to_string())?;
        }
        let before = self.clock.now()
            - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(7));
        self.store
            .write(move |conn| summary::prune(conn, before))
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn calibration(&mut self, today: NaiveDate) {
        let warnings = calibration::warnings(&self.config.devices, today);
        if self.logged_calibration != Some(today) {
            self.logged_calibration = Some(today);
            for c in &warnings {
                tracing::warn!(
                    device = %c.device,
                    due = %c.due,
                    days_left = c.days_left,
                    "{}.",
                    c.describe()
                );
            }
        }
        for c in warnings {
            let key = format!("calibration:{}", c.device);
            let value = format!("{}:{}", c.state.as_str(), c.due);
            let seen = {
                let key = key.clone();
                self.read(move |conn| crate::store::state::read_state(conn, STATE, &key))
                    .await
            };
            if matches!(&seen, Ok(Some(v)) if *v == value) || seen.is_err() {
                continue;
            }
            let document = Document {
                subject: format!(
                    "[{}] {}",
                    self.site(),
                    c.describe()
                ),
                text: format!(
                    "{}.\n\nGateway {}, site {}. Update `calibration_due` in [[devices]] once the device is calibrated.\n",
                    c.describe(),
                    self.config.agent.gateway_id,
                    self.site()
                ),
                attachment: None,
                key: format!("calibration.{}.{}", c.device, value),
            };
            if self.send_to_all(&document).await {
                let _ =
                    crate::store::state::write_rows(&self.store, STATE, vec![(key, value)]).await;
            }
        }
    }

    fn site(&self) -> String {
        if self.config.agent.site.is_empty() {
            self.config.agent.gateway_id.clone()
        } else {
            self.config.agent.site.clone()
        }
    }

    /// Sends `document` to every notifier the reports name; true when no attempt
    /// needs a retry.
    async fn send_to_all(&self, document: &Document) -> bool {
        let names: std::collections::BTreeSet<&String> = self
            .config
            .reports
            .iter()
            .flat_map(|r| &r.notifiers)
            .collect();
        self.send(document, names.into_iter()).await
    }

    async fn send<'a>(&self, document: &Document, names: impl Iterator<Item = &'a String>) -> bool {
        let mut done = true;
        for name in names {
            let Some(n) = self.notifiers.get(name) else {
                continue;
            };
            match n.deliver_document(document).await {
                Outcome::Delivered => {
                    tracing::info!(notifier = %name, subject = %document.subject, "Report sent.")
                }
                Outcome::Failed(e) => {
                    tracing::error!(notifier = %name, error = %e, subject = %document.subject, "The report was refused; it is not sent again.")
                }
                Outcome::Retry(e) => {
                    tracing::warn!(notifier = %name, error = %e, "Cannot send the report now; retrying.");
                    done = false;
                }
            }
        }
        done
    }

    async fn morning_report(&self, i: usize, today: NaiveDate) -> Result<(), String> {
        let report = &self.config.reports[i];
        let tz = self.tz();
        let local_now = self.clock.now().with_timezone(&tz).time();
        if local_now < report.at_time() {
            return Ok(());
        }
        let Some(yesterday) = today.pred_opt() else {
            return Ok(());
        };
        let key = format!("sent:{i}");
        let sent = {
            let key = key.clone();
            self.read(move |conn| crate::store::state::read_state(conn, STATE, &key))
                .await?
        };
        // The newest day sent: a wall clock stepped back never sends a day again (G8).
        if sent
            .as_deref()
            .and_then(|d| crate::report::parse_date(d).ok())
            .is_some_and(|last| last >= yesterday)
        {
            return Ok(());
        }
        let mut day = self.compute(yesterday).await?;
        day.series.retain(|s| report.includes(&s.device));
        let text = render::text(&day, &self.config.display);
        let document = Document {
            subject: format!("[{}] Daily summary {}", self.site(), yesterday),
            text,
            attachment: Some(Attachment {
                filename: format!("summary-{yesterday}.csv"),
                content_type: "text/csv; charset=utf-8".into(),
                bytes: render::csv(&day).into_bytes(),
            }),
            key: format!("report.{i}.{yesterday}"),
        };
        if self.send(&document, report.notifiers.iter()).await {
            crate::store::state::write_rows(&self.store, STATE, vec![(key, yesterday.to_string())])
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
