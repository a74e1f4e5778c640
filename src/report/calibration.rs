//! Calibration due dates from `[[devices]] calibration_due`: how many days are left, and
//! whether that is worth a warning (30 days ahead, and once overdue).
//!
//! The days are counted in local days of `agent.timezone`: a device due on 2027-03-01
//! is "due today" all of that local day and overdue from the next local midnight.

use super::DeviceConfig;
use chrono::NaiveDate;
use serde::Serialize;

/// Warn this many days before the due date.
pub const WARN_DAYS: i64 = 30;

/// Where a device stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Due {
    /// More than [`WARN_DAYS`] left.
    Ok,
    /// Due within [`WARN_DAYS`] (today included).
    Soon,
    /// The due date has passed.
    Overdue,
}

impl Due {
    pub fn as_str(self) -> &'static str {
        match self {
            Due::Ok => "ok",
            Due::Soon => "soon",
            Due::Overdue => "overdue",
        }
    }
}

/// One device's calibration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Calibration {
    pub device: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub due: NaiveDate,
    /// Days until the due date; negative once overdue.
    pub days_left: i64,
    pub state: Due,
}

impl Calibration {
    /// "fridge-1 (Vaccine fridge): calibration due 2027-03-01, in 12 days".
    pub fn describe(&self) -> String {
        let who = match &self.name {
            Some(n) => format!("{} ({n})", self.device),
            None => self.device.clone(),
        };
        let when = match self.days_left {
            0 => "today".to_string(),
            1 => "tomorrow".to_string(),
            d if d > 1 => format!("in {d} days"),
            -1 => "overdue by 1 day".to_string(),
            d => format!("overdue by {} days", -d),
        };
        format!("{who}: calibration due {}, {when}", self.due)
    }
}

/// Every device with a due date, as of local date `today`, soonest first.
pub fn all(devices: &[DeviceConfig], today: NaiveDate) -> Vec<Calibration> {
    let mut out: Vec<Calibration> = devices
        .iter()
        .filter_map(|d| {
            let due = d.calibration_due_date()?;
            let days_left = (due - today).num_days();
            let state = if days_left < 0 {
                Due::Overdue
            } else if days_left <= WARN_DAYS {
                Due::Soon
            } else {
                Due::Ok
            };
            Some(Calibration {
                device: d.id.clone(),
                name: d.name.clone(),
                due,
                days_left,
                state,
            })
        })
        .collect();
    out.sort_by(|a, b| a.days_left.cmp(&b.days_left).then(a.device.cmp(&b.device)));
    out
}

/// The devices that need attention (due soon or overdue).
pub fn warnings(devices: &[DeviceConfig], today: NaiveDate) -> Vec<Calibration> {
    all(devices, today)
        .into_iter()
        .filter(|c| c.state != Due::Ok)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(id: &str, due: &str) -> DeviceConfig {
        DeviceConfig {
            id: id.into(),
            name: Some("Vaccine fridge".into()),
            location: None,
            calibration_due: Some(due.into()),
            gap: None,
        }
    }

    #[test]
    fn thresholds() {
        let today = NaiveDate::from_ymd_opt(2027, 3, 1).unwrap();
        let devices = [
            device("a", "2027-04-01"),
            device("b", "2027-03-31"),
            device("c", "2027-03-01"),
            device("d", "2027-02-28"),
        ];
        let all = all(&devices, today);
        let states: Vec<_> = all.iter().map(|c| (c.device.as_str(), c.state)).collect();
        assert_eq!(
            states,
            [
                ("d", Due::Overdue),
                ("c", Due::Soon),
                ("b", Due::Soon),
                ("a", Due::Ok)
            ]
        );
        assert_eq!(
            all[0].describe(),
            "d (Vaccine fridge): calibration due 2027-02-28, overdue by 1 day"
        );
        assert_eq!(
            all[1].describe(),
            "c (Vaccine fridge): calibration due 2027-03-01, today"
        );
        assert_eq!(warnings(&devices, today).len(), 3);
    }
}
