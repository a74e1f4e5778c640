//! Escalation: per rule, an ordered list of steps (`[[alerts.escalation]]`), each sent
//! once to its own notifiers if the alert is still firing and unacknowledged `after`
//! its firing.
//!
//! The delay counts from the firing on the agent's clock, which the engine moves with
//! every wall-clock step it detects (as it does for `for`, stale and reminder timers), so
//! it follows the monotonic clock while the agent runs; the firing time and the steps
//! already sent are persisted in `alert_state`, so a restart neither forgets a step nor
//! sends one again, and the time the agent was down counts as elapsed (the alarm was
//! unacknowledged all that time). A step's event, its outbox rows and the state that
//! records it as sent commit in one transaction: after a kill -9 the step is either
//! sent (delivered by the outbox) or decided again, never both. Its event uid is derived
//! from the rule, the series, the firing time and the step, so even a replay would be
//! stored once.

use crate::settings::{HumanDuration, Problems};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One `[[alerts.escalation]]` step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EscalationStep {
    /// How long after the firing (if still unacknowledged) this step is sent, e.g.
    /// `"15m"`. Each step's `after` must be larger than the previous step's.
    pub after: HumanDuration,
    /// Names of `[[notifiers]]` this step is sent to.
    pub notifiers: Vec<String>,
}

/// The shortest `after`. Each step is sent once, so a short one cannot flood anyone;
/// zero would only be a second firing notification (list those notifiers on the rule).
pub const MIN_AFTER: Duration = Duration::from_secs(1);
/// The longest `after`: an alarm nobody acknowledged for a month is a configuration
/// mistake, not a plan.
pub const MAX_AFTER: Duration = Duration::from_secs(30 * 86400);
/// Steps per rule.
pub const MAX_STEPS: usize = 10;
/// Notifiers per step.
pub const MAX_NOTIFIERS: usize = 32;

/// Checks the steps of one rule (`path` is the rule's, e.g. `alerts[0]`). Unknown
/// notifier names are checked with the other tables by `config`.
pub fn validate(steps: &[EscalationStep], path: &str, problems: &mut Problems) {
    if steps.len() > MAX_STEPS {
        problems.push(
            format!("{path}.escalation"),
            format!("at most {MAX_STEPS} steps, found {}", steps.len()),
        );
    }
    let mut previous: Option<Duration> = None;
    for (i, step) in steps.iter().enumerate() {
        let at = format!("{path}.escalation[{i}]");
        let after = step.after.get();
        if after < MIN_AFTER || after > MAX_AFTER {
            problems.push(
                format!("{at}.after"),
                format!("must be between 1s and 30d, found {}", step.after),
            );
        }
        if let Some(prev) = previous {
            if after <= prev {
                problems.push(
                    format!("{at}.after"),
                    format!(
                        "{} is not later than the previous step's {}; list steps in increasing `after`",
                        step.after,
                        HumanDuration(prev)
                    ),
                );
            }
        }
        previous = Some(after);
        if step.notifiers.is_empty() {
            problems.push(
                format!("{at}.notifiers"),
                "list at least one notifier for this step",
            );
        }
        if step.notifiers.len() > MAX_NOTIFIERS {
            problems.push(
                format!("{at}.notifiers"),
                format!("at most {MAX_NOTIFIERS} notifiers"),
            );
        }
    }
}

/// The notifiers of the first `sent` steps, without duplicates, in step order.
pub fn notified_by_steps(steps: &[EscalationStep], sent: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for step in steps.iter().take(sent) {
        for n in &step.notifiers {
            if !out.contains(n) {
                out.push(n.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::AlertRule;

    fn rule(extra: &str) -> Result<AlertRule, toml::de::Error> {
        toml::from_str(&format!(
            "name = \"hot\"\nkind = \"threshold\"\nmetric = \"t\"\nabove = 8.0\nnotifiers = [\"ops\"]\n{extra}"
        ))
    }

    fn problems(r: &AlertRule) -> Vec<(String, String)> {
        let mut p = Problems::default();
        r.validate("alerts[0]", &mut p);
        p.0
    }

    #[test]
    fn good_steps_parse_and_validate() {
        let r = rule("[[escalation]]\nafter = \"15m\"\nnotifiers = [\"night-phone\"]\n[[escalation]]\nafter = \"1h\"\nnotifiers = [\"manager\", \"night-phone\"]").unwrap();
        assert_eq!(r.escalation.len(), 2);
        assert!(problems(&r).is_empty(), "{:?}", problems(&r));
        assert_eq!(
            notified_by_steps(&r.escalation, 2),
            vec!["night-phone".to_string(), "manager".to_string()]
        );
        assert!(notified_by_steps(&r.escalation, 0).is_empty());
        // Escalation is about who is told: it does not change the rule's state key.
        let plain = rule("").unwrap();
        assert_eq!(plain.key(), r.key());
    }

    #[test]
    fn wrong_values_are_reported_at_their_key() {
        let r = rule("[[escalation]]\nafter = \"30m\"\nnotifiers = []\n[[escalation]]\nafter = \"15m\"\nnotifiers = [\"x\"]\n[[escalation]]\nafter = \"0s\"\nnotifiers = [\"x\"]\n[[escalation]]\nafter = \"400d\"\nnotifiers = [\"x\"]").unwrap();
        let p = problems(&r);
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"alerts[0].escalation[0].notifiers"), "{p:?}");
        assert!(keys.contains(&"alerts[0].escalation[1].after"), "{p:?}");
        assert!(keys.contains(&"alerts[0].escalation[2].after"), "{p:?}");
        assert!(keys.contains(&"alerts[0].escalation[3].after"), "{p:?}");
        assert!(p.iter().any(|(_, m)| m.contains("not later than")), "{p:?}");
        assert!(
            p.iter().any(|(_, m)| m.contains("between 1s and 30d")),
            "{p:?}"
        );
    }

    mod engine {
        use crate::alerts::engine::{Engine, EventContext};
        use crate::alerts::state::{StateChange, StateRow};
        use crate::alerts::{AlertRule, EventKind};
        use chrono::{DateTime, Utc};

        const RULE: &str = "name = \"hot\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\nnotifiers = [\"ops\"]\n\
            [[escalation]]\nafter = \"5m\"\nnotifiers = [\"night\"]\n[[escalation]]\nafter = \"1h\"\nnotifiers = [\"boss\"]";

        fn at(secs: i64) -> DateTime<Utc> {
            DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
        }

        fn engine() -> Engine {
            let rule: AlertRule = toml::from_str(RULE).unwrap();
            Engine::from_config(&[rule], EventContext::default()).unwrap()
        }

        fn hot(t: DateTime<Utc>) -> crate::model::Reading {
            crate::model::Reading {
                uid: crate::model::Uid::derive(&["a", &t.to_rfc3339()]),
                source: "sim".into(),
                device: "a".into(),
                metric: "temperature".into(),
                value: 9.0,
                unit: None,
                observed_at: t,
                received_at: t,
                flags: 0,
                meta: None,
            }
        }

        fn escalations(e: &mut Engine) -> Vec<(String, Vec<String>)> {
            e.take_changes()
                .events
                .into_iter()
                .filter(|n| n.event.kind == EventKind::Escalated)
                .map(|n| (n.event.uid, n.notifiers))
                .collect()
        }

        fn saved(e: &mut Engine) -> Vec<StateRow> {
            e.take_changes()
                .states
                .into_iter()
                .filter_map(|c| match c {
                    StateChange::Upsert(s) => Some(s),
                    _ => None,
                })
                .next_back()
                .into_iter()
                .collect()
        }

        #[test]
        fn steps_follow_the_monotonic_clock_across_clock_steps() {
            let mut e = engine();
            e.on_reading(&hot(at(0)), at(0));
            e.take_changes();
            let day = chrono::Duration::days(1);
            // Forward by a day at 60 s: not escalated early.
            e.clock_stepped(day, at(60) + day);
            e.tick(at(299) + day);
            assert!(escalations(&mut e).is_empty());
            e.tick(at(300) + day);
            assert_eq!(escalations(&mut e).len(), 1);
            // Back by an hour: the second step is not delayed by it.
            let hour = chrono::Duration::hours(1);
            e.clock_stepped(-hour, at(400) + day - hour);
            e.tick(at(3599) + day - hour);
            assert!(escalations(&mut e).is_empty());
            e.tick(at(3600) + day - hour);
            let sent = escalations(&mut e);
            assert_eq!(sent.len(), 1);
            assert_eq!(sent[0].1, vec!["boss".to_string()]);
        }

        #[test]
        fn steps_due_while_the_agent_was_down_go_once_each_after_the_restart() {
            let mut e = engine();
            e.on_reading(&hot(at(0)), at(0));
            let rows = saved(&mut e);
            assert_eq!(rows[0].fired_at, Some(at(0)));
            // Down for two hours: both steps are due at the restart, each sent once.
            let mut after = engine();
            after.restore(rows, Vec::new(), at(7200));
            after.tick(at(7200));
            let changes = after.take_changes();
            let sent: Vec<_> = changes
                .events
                .iter()
                .filter(|n| n.event.kind == EventKind::Escalated)
                .collect();
            assert_eq!(sent.len(), 2);
            assert_ne!(sent[0].event.uid, sent[1].event.uid);
            let row = changes
                .states
                .iter()
                .rev()
                .find_map(|c| match c {
                    StateChange::Upsert(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap();
            assert_eq!(row.escalations_sent, 2);
            assert_eq!(
                row.escalated_to,
                vec!["night".to_string(), "boss".to_string()]
            );
            after.tick(at(7300));
            assert!(escalations(&mut after).is_empty(), "sent once");
            // Restarted again with the saved state: nothing is sent twice.
            let mut again = engine();
            again.restore(vec![row], Vec::new(), at(7400));
            again.tick(at(7400));
            assert!(escalations(&mut again).is_empty());
        }

        #[test]
        fn a_step_decided_again_after_a_lost_write_has_the_same_uid() {
            // kill -9 after deciding, before the write committed: the next start
            // decides the step again, with the same uid (stored once either way).
            let mut e = engine();
            e.on_reading(&hot(at(0)), at(0));
            let rows = saved(&mut e);
            e.tick(at(300));
            let first = escalations(&mut e);
            let mut after = engine();
            after.restore(rows, Vec::new(), at(310));
            after.tick(at(310));
            let second = escalations(&mut after);
            assert_eq!(first.len(), 1);
            assert_eq!(first, second);
        }
    }

    #[test]
    fn hostile_and_missing_values_do_not_parse() {
        assert!(
            rule("[[escalation]]\nnotifiers = [\"x\"]").is_err(),
            "after missing"
        );
        assert!(
            rule("[[escalation]]\nafter = \"15m\"").is_err(),
            "notifiers missing"
        );
        assert!(rule("[[escalation]]\nafter = \"soon\"\nnotifiers = [\"x\"]").is_err());
        assert!(rule("[[escalation]]\nafter = -5\nnotifiers = [\"x\"]").is_err());
        assert!(rule("[[escalation]]\nafter = \"15m\"\nnotifiers = \"x\"").is_err());
        assert!(rule("[[escalation]]\nafter = \"15m\"\nnotifiers = [\"x\"]\nnotify = 1").is_err());
        assert!(rule("escalation = \"15m\"").is_err());
        let many: String = (0..11)
            .map(|i| {
                format!(
                    "[[escalation]]\nafter = \"{}m\"\nnotifiers = [\"x\"]\n",
                    i + 1
                )
            })
            .collect();
        let r = rule(&many).unwrap();
        assert!(problems(&r)
            .iter()
            .any(|(k, m)| k == "alerts[0].escalation" && m.contains("at most")));
    }
}
