//! Small templates for notification subjects and bodies: `{field}` is replaced by the
//! event's field, `{{` and `}}` are literal braces. Unknown fields are configuration
//! errors, caught by `outpost check`, not surprises in a notification at 3 a.m.

use crate::alerts::{AlertEvent, EventKind};
use crate::display::format_value;

/// The fields a template may use.
pub const FIELDS: &[&str] = &[
    "kind",      // FIRING, REMINDER, ESCALATED, RESOLVED or TEST
    "severity",  // critical, warning, info
    "rule",      // the rule's name
    "site",      // agent.site (or the gateway id when unset)
    "gateway",   // agent.gateway_id
    "device",    // the device id
    "metric",    // the metric
    "value",     // the value with its unit, e.g. "11.62 °C"
    "threshold", // the alert level with its unit, e.g. "8 °C"
    "condition", // e.g. "above 8 °C for 5m"
    "since",     // when the condition began (UTC)
    "at",        // when the event happened (UTC)
    "uid",       // the event uid
];

pub const DEFAULT_SUBJECT: &str = "{kind} [{severity}] {site} / {device}: {metric} {value}";

pub const DEFAULT_BODY: &str = "\
{kind}: {rule} ({severity})

Site:      {site} (gateway {gateway})
Device:    {device}
Metric:    {metric} = {value}
Condition: {condition}
Since:     {since}
Event at:  {at}

Event {uid}, sent by Outpost.
";

/// The largest template accepted.
pub const MAX_TEMPLATE: usize = 8192;

/// Checks a template: balanced braces and known fields only.
pub fn check(template: &str) -> Result<(), String> {
    if template.len() > MAX_TEMPLATE {
        return Err(format!("the template is longer than {MAX_TEMPLATE} bytes"));
    }
    render_with(template, |field| FIELDS.contains(&field).then(String::new)).map(|_| ())
}

/// Renders a checked template for `event` (a broken template renders the default).
pub fn render(template: &str, event: &AlertEvent) -> String {
    render_with(template, |field| Some(field_value(event, field)))
        .or_else(|_| render_with(DEFAULT_SUBJECT, |field| Some(field_value(event, field))))
        .unwrap_or_default()
}

fn render_with(template: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut chars = template.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '{' if chars.peek().map(|(_, c)| *c) == Some('{') => {
                chars.next();
                out.push('{');
            }
            '}' if chars.peek().map(|(_, c)| *c) == Some('}') => {
                chars.next();
                out.push('}');
            }
            '{' => {
                let rest = &template[i + 1..];
                let end = rest.find('}').ok_or_else(|| {
                    format!("unclosed `{{` at byte {i}; write `{{{{` for a literal brace")
                })?;
                let field = rest[..end].trim();
                let value = lookup(field).ok_or_else(|| {
                    format!(
                        "unknown field `{{{field}}}`; use one of {}",
                        FIELDS
                            .iter()
                            .map(|f| format!("{{{f}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
                out.push_str(&value);
                for _ in 0..rest[..end].chars().count() + 1 {
                    chars.next();
                }
            }
            '}' => {
                return Err(format!(
                    "unmatched `}}` at byte {i}; write `}}}}` for a literal brace"
                ))
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// One field of `event` as text.
pub fn field_value(event: &AlertEvent, field: &str) -> String {
    let unit = event.unit.as_deref();
    match field {
        "kind" => match event.kind {
            EventKind::Firing => "FIRING",
            EventKind::Reminder => "REMINDER",
            EventKind::Resolved => "RESOLVED",
            EventKind::Acknowledged => "ACKNOWLEDGED",
            EventKind::Escalated => "ESCALATED",
            EventKind::Test => "TEST",
        }
        .to_string(),
        "severity" => event.severity.as_str().to_string(),
        "rule" => event.rule.clone(),
        "site" if event.site.is_empty() => event.gateway_id.clone(),
        "site" => event.site.clone(),
        "gateway" => event.gateway_id.clone(),
        "device" => event.device.clone(),
        "metric" => event.metric.clone(),
        "value" => event
            .value
            .map(|v| format_value(v, unit, event.precision))
            .unwrap_or_else(|| "-".into()),
        "threshold" => event
            .threshold
            .map(|v| format_value(v, unit, event.precision))
            .unwrap_or_else(|| "-".into()),
        "condition" => event.condition.clone(),
        "since" => event.since.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        "at" => event.at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        "uid" => event.uid.clone(),
        _ => String::new(),
    }
}

/// A test event for `outpost notify-test`, happening `now`.
pub fn test_event(site: &str, gateway_id: &str, now: chrono::DateTime<chrono::Utc>) -> AlertEvent {
    AlertEvent {
        uid: crate::model::Uid::derive(&[
            "notify-test",
            gateway_id,
            &now.timestamp_micros().to_string(),
        ])
        .to_hex(),
        kind: EventKind::Test,
        rule: "notify-test".into(),
        severity: crate::alerts::Severity::Info,
        site: site.to_string(),
        gateway_id: gateway_id.to_string(),
        device: "test-device".into(),
        metric: "temperature".into(),
        value: Some(4.2),
        unit: Some("°C".into()),
        threshold: Some(8.0),
        condition: "a test notification from `outpost notify-test`".into(),
        precision: None,
        since: now,
        at: now,
        actor: None,
        note: None,
        channel: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fields_and_literal_braces() {
        let mut e = test_event("Cold store", "gw-1", chrono::Utc::now());
        e.kind = EventKind::Firing;
        e.value = Some(11.623);
        assert_eq!(
            render(DEFAULT_SUBJECT, &e),
            "FIRING [info] Cold store / test-device: temperature 11.62 °C"
        );
        e.precision = Some(1);
        assert_eq!(render("{value}", &e), "11.6 °C");
        e.value = Some(4.0);
        assert_eq!(render("{value}", &e), "4.0 °C");
        e.precision = None;
        assert_eq!(render("{value}", &e), "4 °C");
        assert_eq!(
            render("{{x}} { device } {{{rule}}}", &e),
            "{x} test-device {notify-test}"
        );
        e.site.clear();
        assert_eq!(render("{site}", &e), "gw-1");
        assert!(render(DEFAULT_BODY, &e).contains("Condition: a test notification"));
    }

    #[test]
    fn bad_templates_are_rejected() {
        assert!(check(DEFAULT_SUBJECT).is_ok());
        assert!(check(DEFAULT_BODY).is_ok());
        assert!(check("{nope}")
            .unwrap_err()
            .contains("unknown field `{nope}`"));
        assert!(check("{device").unwrap_err().contains("unclosed"));
        assert!(check("device}").unwrap_err().contains("unmatched"));
        assert!(check(&"x".repeat(MAX_TEMPLATE + 1)).is_err());
        assert!(check("{ü}").is_err());
        assert!(check("ünïcödé {device} ✓").is_ok());
    }
}
