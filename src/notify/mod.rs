//! Notifications: `[[notifiers]]` (email, webhook, a local program, the log) and the
//! worker that delivers the durable outbox.
//!
//! Guarantees:
//! - **At least once.** An outbox row is written with its event in one transaction
//!   (see [`crate::alerts::state::apply`]) and marked delivered only after the notifier
//!   confirmed (SMTP accepted the message, the webhook answered 2xx, the program exited
//!   0). A crash in between sends it again, with the same idempotency key
//!   (`<event uid>:<notifier>`: the webhook's `Idempotency-Key` header, the email's
//!   Message-ID) so the receiver can drop the duplicate.
//! - **Retries back off** exponentially with full jitter (`retry_initial` doubling up to
//!   `retry_max`), until delivered, failed permanently (a webhook's 4xx other than 408
//!   and 429, an SMTP 5xx), or expired after the notifier's `ttl`. Failed and expired
//!   notifications are logged at error level, counted and shown by `outpost status`.
//! - **Delivery never blocks evaluation.** The worker is its own task with at most
//!   [`MAX_CONCURRENT`] deliveries in flight; the alert engine only writes rows.

pub mod email;
pub mod exec;
pub mod outbox;
pub mod template;
pub mod webhook;

pub use outbox::{NotifyStats, OutboxWorker};

use crate::alerts::AlertEvent;
use crate::settings::{check_identifier, quoted, HumanDuration, Problems};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::time::Duration;

/// Deliveries in flight at once (across notifiers).
pub const MAX_CONCURRENT: usize = 4;

/// One `[[notifiers]]` entry: the keys every type shares, and the type's own.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NotifierConfig {
    /// A unique name that `[[alerts]]` rules list in `notifiers` (letters, digits, `.`,
    /// `_`, `-`, `:`).
    pub name: String,
    /// Give up on a notification this long after its event (then it is `expired`,
    /// logged at error level and shown by `outpost status`).
    pub ttl: HumanDuration,
    /// The first retry waits up to this long; each further one up to twice as long...
    pub retry_initial: HumanDuration,
    /// ... but never more than this (full jitter: a random wait up to the bound).
    pub retry_max: HumanDuration,
    /// The subject (email) or summary line (webhook, exec, log), with `{field}`
    /// placeholders; see `config/outpost.toml` for the fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// The email body, with the same placeholders.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(flatten)]
    pub kind: NotifierKind,
}

/// The notifier's type and its own keys.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum NotifierKind {
    Email(email::EmailConfig),
    Webhook(webhook::WebhookConfig),
    Exec(exec::ExecConfig),
    Log(LogNotifierConfig),
}

/// `type = "log"`: writes the subject to the journal (warning level for firing and
/// reminders). Always available; useful as a second channel and in the demo.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct LogNotifierConfig {}

const TYPES: &[&str] = &["email", "webhook", "exec", "log"];
/// The keys every `[[notifiers]]` type shares (the rest belong to the type).
pub const COMMON_KEYS: &[&str] = &[
    "name",
    "ttl",
    "retry_initial",
    "retry_max",
    "subject",
    "body",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Common {
    name: String,
    #[serde(default = "default_ttl")]
    ttl: HumanDuration,
    #[serde(default = "default_retry_initial")]
    retry_initial: HumanDuration,
    #[serde(default = "default_retry_max")]
    retry_max: HumanDuration,
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    body: Option<String>,
}

fn default_ttl() -> HumanDuration {
    HumanDuration::from_secs(24 * 3600)
}
fn default_retry_initial() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_retry_max() -> HumanDuration {
    HumanDuration::from_secs(600)
}

impl NotifierConfig {
    /// The TLS server this notifier connects to, if any (every kind is named, so a new
    /// one must say).
    pub fn tls_endpoints(&self) -> Vec<crate::tls::Endpoint> {
        let label = format!("notifiers.{}", self.name);
        let ca_file = match &self.kind {
            NotifierKind::Email(c) => c.ca_file.as_ref(),
            NotifierKind::Webhook(c) => c.ca_file.as_ref(),
            NotifierKind::Exec(_) | NotifierKind::Log(_) => return Vec::new(),
        };
        vec![crate::tls::Endpoint::new(label.clone()).with_file(format!("{label}.ca_file"), ca_file)]
    }

    /// Deserializes one `[[notifiers]]` table, reporting problems with their key paths.
    pub fn from_json(
        mut value: Value,
        path: &str,
        problems: &mut Problems,
    ) -> Option<NotifierConfig> {
        let kind = problems.take_type(&mut value, path, TYPES)?;
        let map = value.as_object_mut()?;
        let mut common = Map::new();
        for key in COMMON_KEYS {
            if let Some(v) = map.remove(*key) {
                common.insert(key.to_string(), v);
            }
        }
        let common: Option<Common> = problems.deserialize(Value::Object(common), path);
        let kind = match kind.as_str() {
            "email" => problems.deserialize(value, path).map(NotifierKind::Email),
            "webhook" => problems.deserialize(value, path).map(NotifierKind::Webhook),
            "exec" => problems.deserialize(value, path).map(NotifierKind::Exec),
            "log" => problems.deserialize(value, path).map(NotifierKind::Log),
            other => {
                problems.push(
                    format!("{path}.type"),
                    format!(
                        "unknown notifier type {other:?}; expected one of {}",
                        quoted(TYPES)
                    ),
                );
                None
            }
        };
        let (common, kind) = (common?, kind?);
        Some(NotifierConfig {
            name: common.name,
            ttl: common.ttl,
            retry_initial: common.retry_initial,
            retry_max: common.retry_max,
            subject: common.subject,
            body: common.body,
            kind,
        })
    }

    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            NotifierKind::Email(_) => "email",
            NotifierKind::Webhook(_) => "webhook",
            NotifierKind::Exec(_) => "exec",
            NotifierKind::Log(_) => "log",
        }
    }

    pub fn validate(&self, path: &str, problems: &mut Problems) {
        problems.check(
            format!("{path}.name"),
            check_identifier(&self.name, "the notifier name"),
        );
        if self.ttl.get() < Duration::from_secs(1)
            || self.ttl.get() > Duration::from_secs(90 * 86400)
        {
            problems.push(
                format!("{path}.ttl"),
                format!("must be between 1s and 90d, found {}", self.ttl),
            );
        }
        let initial = self.retry_initial.get();
        if initial < Duration::from_millis(10) || initial > Duration::from_secs(3600) {
            problems.push(
                format!("{path}.retry_initial"),
                format!("must be between 10ms and 1h, found {}", self.retry_initial),
            );
        }
        if self.retry_max.get() < initial || self.retry_max.get() > Duration::from_secs(86400) {
            problems.push(
                format!("{path}.retry_max"),
                format!(
                    "must be at least retry_initial ({}) and at most 1d, found {}",
                    self.retry_initial, self.retry_max
                ),
            );
        }
        for (key, template) in [("subject", &self.subject), ("body", &self.body)] {
            if let Some(t) = template {
                problems.check(format!("{path}.{key}"), template::check(t));
            }
        }
        match &self.kind {
            NotifierKind::Email(c) => c.validate(path, problems),
            NotifierKind::Webhook(c) => c.validate(path, problems),
            NotifierKind::Exec(c) => c.validate(path, problems),
            NotifierKind::Log(_) => {}
        }
    }
}

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Try again later (network down, 5xx, timeout, non-zero exit).
    Retry(String),
    /// Retrying cannot help (a webhook's 4xx, an SMTP 5xx): a person must act.
    Failed(String),
}

impl Notifier {
    /// A task that records the certificate of the mail server now and once a day until
    /// `shutdown`, for a TLS email notifier (lettre keeps its handshakes to itself, so
    /// the server is asked separately; see [`email::Email::probe_certificate`]). The
    /// other channels record on every connection; they need no task.
    pub fn watch_server_certificate(
        self: &std::sync::Arc<Self>,
        store: &crate::store::Store,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let Channel::Email(mail) = &self.channel else {
            return None;
        };
        let recorder = store.cert_recorder(&format!("notifiers.{}", self.name), &mail.peer()?);
        let notifier = self.clone();
        Some(async move {
            const DAY: Duration = Duration::from_secs(24 * 3600);
            loop {
                if let Channel::Email(mail) = &notifier.channel {
                    if let Err(e) = mail.probe_certificate(recorder.clone()).await {
                        tracing::debug!(
                            notifier = %notifier.name,
                            error = %e,
                            "Cannot see the mail server's certificate now."
                        );
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(DAY) => {}
                }
            }
        })
    }
}

enum Channel {
    Email(email::Email),
    Webhook(webhook::Webhook),
    Exec(exec::Exec),
    Log,
}

/// A notifier ready to deliver.
pub struct Notifier {
    pub name: String,
    pub kind: &'static str,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How long one attempt may take before the worker gives up on it.
    pub attempt_timeout: Duration,
    subject: String,
    body: String,
    channel: Channel,
}

impl Notifier {
    /// Builds a notifier from its (validated) configuration: reads CA files, parses
    /// addresses and URLs. With a `store`, the certificate the server presents is
    /// recorded as `notifiers.NAME` (see [`Notifier::watch_server_certificate`]).
    pub fn build(
        config: &NotifierConfig,
        gateway_id: &str,
        store: Option<&crate::store::Store>,
    ) -> anyhow::Result<Notifier> {
        let label = format!("notifiers.{}", config.name);
        let (channel, timeout) = match &config.kind {
            NotifierKind::Email(c) => (
                Channel::Email(email::Email::new(c, gateway_id)?),
                c.timeout.get(),
            ),
            NotifierKind::Webhook(c) => {
                let recorder =
                    store.map(|s| s.cert_recorder(&label, &crate::tls::url_peer(&c.url)));
                (
                    Channel::Webhook(webhook::Webhook::new(c, recorder)?),
                    c.timeout.get(),
                )
            }
            NotifierKind::Exec(c) => (Channel::Exec(exec::Exec::new(c)), c.timeout.get()),
            NotifierKind::Log(_) => (Channel::Log, Duration::from_secs(1)),
        };
        Ok(Notifier {
            name: config.name.clone(),
            kind: config.kind_name(),
            retry_initial: config.retry_initial.get(),
            retry_max: config.retry_max.get(),
            attempt_timeout: timeout + Duration::from_secs(5),
            subject: config
                .subject
                .clone()
                .unwrap_or_else(|| template::DEFAULT_SUBJECT.to_string()),
            body: config
                .body
                .clone()
                .unwrap_or_else(|| template::DEFAULT_BODY.to_string()),
            channel,
        })
    }

    /// The key a receiver uses to drop duplicates: the same on every attempt.
    pub fn idempotency_key(&self, event: &AlertEvent) -> String {
        format!("{}:{}", event.uid, self.name)
    }

    /// One delivery attempt.
    pub async fn deliver(&self, event: &AlertEvent) -> Outcome {
        let subject = template::render(&self.subject, event);
        let key = self.idempotency_key(event);
        match &self.channel {
            Channel::Email(e) => {
                let body = template::render(&self.body, event);
                e.send(&subject, &body, &key).await
            }
            Channel::Webhook(w) => w.send(event, &subject, &key).await,
            Channel::Exec(x) => x.run(event, &subject, &key).await,
            Channel::Log => {
                match event.kind {
                    crate::alerts::EventKind::Firing | crate::alerts::EventKind::Reminder => {
                        tracing::warn!(notifier = %self.name, event = %event.uid, "{subject}")
                    }
                    _ => tracing::info!(notifier = %self.name, event = %event.uid, "{subject}"),
                }
                Outcome::Delivered
            }
        }
    }
}

/// Sends one test event through the notifier `name` (for `outpost notify-test`),
/// without the outbox.
pub async fn send_test(config: &crate::config::Config, name: &str) -> anyhow::Result<Outcome> {
    let Some(n) = config.notifiers.iter().find(|n| n.name == name) else {
        let names: Vec<&str> = config.notifiers.iter().map(|n| n.name.as_str()).collect();
        anyhow::bail!(
            "no notifier is called {name:?}; configured: {}",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    };
    let notifier = Notifier::build(n, &config.agent.gateway_id, None)?;
    let event = template::test_event(&config.agent.site, &config.agent.gateway_id);
    match tokio::time::timeout(notifier.attempt_timeout, notifier.deliver(&event)).await {
        Ok(outcome) => Ok(outcome),
        Err(_) => Ok(Outcome::Retry("the attempt timed out".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> (Option<NotifierConfig>, Vec<(String, String)>) {
        let value: Value = toml::from_str(toml_text).unwrap();
        let mut p = Problems::default();
        let n = NotifierConfig::from_json(value, "notifiers[0]", &mut p);
        if let Some(n) = &n {
            n.validate("notifiers[0]", &mut p);
        }
        (n, p.0)
    }

    #[test]
    fn each_type_parses_with_common_keys() {
        let (n, p) = parse("name = \"ops\"\ntype = \"webhook\"\nurl = \"https://hooks.example.com/x\"\nsecret = \"k\"\nttl = \"2h\"");
        assert!(p.is_empty(), "{p:?}");
        let n = n.unwrap();
        assert_eq!(n.kind_name(), "webhook");
        assert_eq!(n.ttl, HumanDuration::from_secs(7200));
        let printed = toml::to_string(&n).unwrap();
        assert!(printed.contains("type = \"webhook\""), "{printed}");
        assert!(
            printed.contains("<redacted>") && !printed.contains("\"k\""),
            "{printed}"
        );

        let (n, p) =
            parse("name = \"siren\"\ntype = \"exec\"\nprogram = \"/bin/true\"\nargs = [\"on\"]");
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(n.unwrap().kind_name(), "exec");
        let (n, p) = parse("name = \"journal\"\ntype = \"log\"");
        assert!(p.is_empty() && n.is_some());
    }

    #[test]
    fn wrong_missing_and_hostile_values_are_all_reported() {
        let (_, p) = parse("name = \"x\"\ntype = \"pager\"");
        assert!(p[0].1.contains("unknown notifier type \"pager\""), "{p:?}");
        let (_, p) = parse("name = \"x\"");
        assert!(p[0].1.contains("`type` is missing"));
        let (_, p) = parse("type = \"log\"\nttl = \"soon\"\ncolour = \"red\"");
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.contains(&"notifiers[0].ttl"), "{p:?}");
        assert!(keys.contains(&"notifiers[0].colour"), "{p:?}");
        let (_, p) = parse("name = \"a b\"\ntype = \"log\"\nttl = \"0s\"\nretry_initial = \"1m\"\nretry_max = \"1s\"\nsubject = \"{oops}\"");
        let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
        for k in [
            "notifiers[0].name",
            "notifiers[0].ttl",
            "notifiers[0].retry_max",
            "notifiers[0].subject",
        ] {
            assert!(keys.contains(&k), "{k} in {p:?}");
        }
        let (_, p) = parse("name = \"x\"\ntype = 7");
        assert!(p[0].1.contains("expected a string"));
    }
}
