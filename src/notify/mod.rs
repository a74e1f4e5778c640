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
//!
//! Each kind declares itself in its own file ([`email`], [`webhook`], [`exec`], [`log`]):
//! its configuration implements [`KindConfig`] (validation, the TLS server it
//! connects to, the timeout of one attempt, building its [`Sender`]), and one line
//! in the `notifier_kinds!` list below adds it to the closed set (the serde-tagged
//! [`NotifierKind`] and the sender enum are generated from that list). Nothing here
//! names a kind. See `docs/developing.md` ("Add a notifier").

pub mod email;
pub mod exec;
pub mod log;
pub mod outbox;
pub mod template;
pub mod webhook;

pub use log::LogNotifierConfig;
pub use outbox::{outbox_task, NotifyStats, OutboxWorker};

use crate::alerts::AlertEvent;
use crate::settings::{check_identifier, quoted, HumanDuration, Problems};
use crate::tls::{CertRecorder, CertWatch, Endpoint};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::future::Future;
use std::time::Duration;

/// Deliveries in flight at once (across notifiers).
pub const MAX_CONCURRENT: usize = 4;

/// What one kind of notifier declares about itself; implemented by its configuration
/// struct (the `[[notifiers]]` keys of that `type`, deserialized with
/// `deny_unknown_fields`), in the kind's own file.
pub trait KindConfig: Serialize + serde::de::DeserializeOwned {
    /// What [`KindConfig::build`] makes.
    type Sender: Sender;
    /// The TLS servers it connects to, named `label` (`notifiers.NAME`), with the CA
    /// file its configuration names (empty: it connects to no TLS server). Every kind
    /// must say: the certificate watch knows servers only through this.
    fn tls_endpoints(&self, label: &str) -> Vec<Endpoint>;
    /// How long one attempt may take (the worker waits 5 s more before it gives up).
    fn attempt_timeout(&self) -> Duration;
    /// Builds the sender: reads CA files, parses addresses and URLs.
    fn build(&self, context: &BuildContext<'_>) -> anyhow::Result<Self::Sender>;
    /// Reports what is wrong with the kind's own keys, under `path`.
    fn validate(&self, path: &str, problems: &mut Problems);
}

/// The one TLS server of a kind that connects to one, trusting `ca_file` besides the
/// public roots: its certificate is `label`, the file `label.ca_file`.
pub fn server_endpoint(label: &str, ca_file: Option<&std::path::PathBuf>) -> Vec<Endpoint> {
    vec![Endpoint::new(label).with_file(format!("{label}.ca_file"), ca_file)]
}

/// What a kind's [`KindConfig::build`] may use.
pub struct BuildContext<'a> {
    /// The notifier's name.
    pub notifier: &'a str,
    /// The gateway's id (email uses it in Message-IDs).
    pub gateway_id: &'a str,
    /// Where servers' certificates are recorded (none for `outpost notify-test`).
    pub certs: Option<&'a CertWatch>,
}

impl BuildContext<'_> {
    /// `notifiers.NAME`: the label the notifier's server certificate is recorded under.
    pub fn label(&self) -> String {
        format!("notifiers.{}", self.notifier)
    }
}

/// One notification to deliver, as a [`Sender`] sees it.
pub struct Message<'a> {
    /// The notifier's name.
    pub notifier: &'a str,
    pub event: &'a AlertEvent,
    /// The rendered subject (email) or summary line (webhook, exec, log).
    pub subject: String,
    /// The key a receiver uses to drop duplicates: the same on every attempt.
    pub key: String,
    body_template: &'a str,
}

impl Message<'_> {
    /// The rendered body (email).
    pub fn body(&self) -> String {
        template::render(self.body_template, self.event)
    }
}

/// A built notifier of one kind.
pub trait Sender: Send + Sync + 'static {
    /// One delivery attempt.
    fn deliver(&self, message: &Message<'_>) -> impl Future<Output = Outcome> + Send;
    /// The server (`host:port`) whose certificate is probed now and once a day, for a
    /// kind whose client library keeps its handshakes to itself; `None` (the default)
    /// when the certificate is recorded on every connection, or there is none.
    fn probed_server(&self) -> Option<String> {
        None
    }
    /// Connects to [`Sender::probed_server`] only to give its certificate to `recorder`.
    fn probe_certificate(
        &self,
        recorder: CertRecorder,
    ) -> impl Future<Output = Result<(), String>> + Send {
        drop(recorder);
        async { Ok(()) }
    }
}

/// The closed set of notifier kinds, from one list: `"type" => Variant(ConfigType)`.
/// Generates [`NotifierKind`] (the serde-tagged configuration), the sender enum, and
/// the dispatch of every [`KindConfig`] and [`Sender`] method.
macro_rules! notifier_kinds {
    ($($name:literal => $variant:ident($config:ty)),+ $(,)?) => {
        /// The notifier's type and its own keys.
        #[derive(Debug, Clone, Serialize, PartialEq)]
        #[serde(tag = "type")]
        pub enum NotifierKind {
            $(#[serde(rename = $name)] $variant($config),)+
        }

        /// Every `type` value.
        const TYPES: &[&str] = &[$($name),+];

        impl NotifierKind {
            /// The `type` value.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(NotifierKind::$variant(_) => $name,)+
                }
            }

            /// Deserializes the kind's own keys (`None` inside: reported to `problems`;
            /// `None` outside: `kind` is no known type).
            fn deserialize(
                kind: &str,
                value: Value,
                path: &str,
                problems: &mut Problems,
            ) -> Option<Option<NotifierKind>> {
                match kind {
                    $($name => Some(problems.deserialize(value, path).map(NotifierKind::$variant)),)+
                    _ => None,
                }
            }

            fn validate(&self, path: &str, problems: &mut Problems) {
                match self {
                    $(NotifierKind::$variant(c) => c.validate(path, problems),)+
                }
            }

            fn tls_endpoints(&self, label: &str) -> Vec<Endpoint> {
                match self {
                    $(NotifierKind::$variant(c) => c.tls_endpoints(label),)+
                }
            }

            fn attempt_timeout(&self) -> Duration {
                match self {
                    $(NotifierKind::$variant(c) => c.attempt_timeout(),)+
                }
            }

            fn build(&self, context: &BuildContext<'_>) -> anyhow::Result<Channel> {
                Ok(match self {
                    $(NotifierKind::$variant(c) => Channel::$variant(c.build(context)?),)+
                })
            }
        }

        /// A built sender of any kind.
        enum Channel {
            $($variant(<$config as KindConfig>::Sender),)+
        }

        impl Channel {
            async fn deliver(&self, message: &Message<'_>) -> Outcome {
                match self {
                    $(Channel::$variant(s) => s.deliver(message).await,)+
                }
            }

            fn probed_server(&self) -> Option<String> {
                match self {
                    $(Channel::$variant(s) => s.probed_server(),)+
                }
            }

            async fn probe_certificate(&self, recorder: CertRecorder) -> Result<(), String> {
                match self {
                    $(Channel::$variant(s) => s.probe_certificate(recorder).await,)+
                }
            }
        }
    };
}

notifier_kinds! {
    "email" => Email(email::EmailConfig),
    "webhook" => Webhook(webhook::WebhookConfig),
    "exec" => Exec(exec::ExecConfig),
    "log" => Log(log::LogNotifierConfig),
}

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
    /// `notifiers.NAME`: how this notifier is named in certificates, health and logs.
    pub fn label(&self) -> String {
        format!("notifiers.{}", self.name)
    }

    /// The TLS servers this notifier connects to, as its kind declares them.
    pub fn tls_endpoints(&self) -> Vec<Endpoint> {
        self.kind.tls_endpoints(&self.label())
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
        let kind = match NotifierKind::deserialize(&kind, value, path, problems) {
            Some(kind) => kind,
            None => {
                problems.push(
                    format!("{path}.type"),
                    format!(
                        "unknown notifier type {kind:?}; expected one of {}",
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
        self.kind.type_name()
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
        self.kind.validate(path, problems);
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
    /// addresses and URLs. With `certs`, the certificate the server presents is
    /// recorded as `notifiers.NAME` (see [`Notifier::watch_server_certificate`]).
    pub fn build(
        config: &NotifierConfig,
        gateway_id: &str,
        certs: Option<&CertWatch>,
    ) -> anyhow::Result<Notifier> {
        let context = BuildContext {
            notifier: &config.name,
            gateway_id,
            certs,
        };
        Ok(Notifier {
            name: config.name.clone(),
            kind: config.kind_name(),
            retry_initial: config.retry_initial.get(),
            retry_max: config.retry_max.get(),
            attempt_timeout: config.kind.attempt_timeout() + Duration::from_secs(5),
            subject: config
                .subject
                .clone()
                .unwrap_or_else(|| template::DEFAULT_SUBJECT.to_string()),
            body: config
                .body
                .clone()
                .unwrap_or_else(|| template::DEFAULT_BODY.to_string()),
            channel: config.kind.build(&context)?,
        })
    }

    /// The key a receiver uses to drop duplicates: the same on every attempt.
    pub fn idempotency_key(&self, event: &AlertEvent) -> String {
        format!("{}:{}", event.uid, self.name)
    }

    /// One delivery attempt.
    pub async fn deliver(&self, event: &AlertEvent) -> Outcome {
        let message = Message {
            notifier: &self.name,
            event,
            subject: template::render(&self.subject, event),
            key: self.idempotency_key(event),
            body_template: &self.body,
        };
        self.channel.deliver(&message).await
    }

    /// A task that records the certificate of the server now and once a day until
    /// `shutdown`, for a kind whose client library keeps its handshakes to itself (a
    /// TLS email notifier: see [`email::Email::probe_certificate`]). The other kinds
    /// record on every connection; they need no task.
    pub fn watch_server_certificate(
        self: &std::sync::Arc<Self>,
        certs: &CertWatch,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let recorder = certs.recorder(
            &format!("notifiers.{}", self.name),
            &self.channel.probed_server()?,
        );
        let notifier = self.clone();
        Some(async move {
            const DAY: Duration = Duration::from_secs(24 * 3600);
            loop {
                if let Err(e) = notifier.channel.probe_certificate(recorder.clone()).await {
                    tracing::debug!(
                        notifier = %notifier.name,
                        error = %e,
                        "Cannot see the server's certificate now."
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(DAY) => {}
                }
            }
        })
    }
}

/// A document for people rather than an alert event (the daily summary): a subject, a
/// plain text and optionally one attachment. Email sends the text with the attachment;
/// the log notifier logs the text; other kinds do not take documents.
#[derive(Debug, Clone)]
pub struct Document {
    pub subject: String,
    pub text: String,
    pub attachment: Option<Attachment>,
    /// The same on every attempt (email: the Message-ID).
    pub key: String,
}

/// A file attached to a [`Document`].
#[derive(Debug, Clone)]
pub struct Attachment {
    pub filename: String,
    /// e.g. `text/csv; charset=utf-8`.
    pub content_type: String,
    pub bytes: Vec<u8>,
}

/// The notifier types that take [`Document`]s.
pub const DOCUMENT_TYPES: &[&str] = &["email", "log"];

impl Notifier {
    /// One attempt to deliver `document`.
    pub async fn deliver_document(&self, document: &Document) -> Outcome {
        let attempt = async {
            match &self.channel {
                Channel::Email(email) => email.send_document(document).await,
                Channel::Log(_) => {
                    tracing::info!(
                        notifier = %self.name,
                        subject = %document.subject,
                        "{}",
                        document.text
                    );
                    Outcome::Delivered
                }
                _ => Outcome::Failed(format!(
                    "a {} notifier does not take reports; use {}",
                    self.kind,
                    DOCUMENT_TYPES.join(" or ")
                )),
            }
        };
        match tokio::time::timeout(self.attempt_timeout, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Retry("the attempt timed out".into()),
        }
    }
}

/// Sends one test event through the notifier `name` of `notifiers` (for `outpost
/// notify-test`), without the outbox; the event names `site` and `gateway_id`.
pub async fn send_test_event(
    notifiers: &[NotifierConfig],
    site: &str,
    gateway_id: &str,
    name: &str,
    clock: &crate::clock::Clock,
) -> anyhow::Result<Outcome> {
    let Some(n) = notifiers.iter().find(|n| n.name == name) else {
        let names: Vec<&str> = notifiers.iter().map(|n| n.name.as_str()).collect();
        anyhow::bail!(
            "no notifier is called {name:?}; configured: {}",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        );
    };
    let notifier = Notifier::build(n, gateway_id, None)?;
    let event = template::test_event(site, gateway_id, clock.now());
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

    /// Every kind that connects to a TLS server declares it as `notifiers.NAME`, with
    /// the CA file it configures, so the certificate watch follows it; the others
    /// declare none. Every kind of the list is checked.
    #[test]
    fn kinds_that_connect_over_tls_declare_their_endpoint() {
        let cases = [
            (
                "email",
                "server = \"smtp.example\"\nfrom = \"o@example.com\"\nto = [\"x@example.com\"]",
                true,
            ),
            ("webhook", "url = \"https://hooks.example/x\"", true),
            ("exec", "program = \"/bin/true\"", false),
            ("log", "", false),
        ];
        let covered: Vec<&str> = cases.iter().map(|(kind, _, _)| *kind).collect();
        assert_eq!(covered, TYPES, "a new kind must say whether it connects");
        for (kind, keys, connects) in cases {
            for ca_file in [None, Some("/etc/outpost/ca.pem")] {
                let mut text = format!("name = \"n1\"\ntype = \"{kind}\"\n{keys}\n");
                if let (true, Some(ca)) = (connects, ca_file) {
                    text.push_str(&format!("ca_file = \"{ca}\"\n"));
                }
                let value: Value = toml::from_str(&text).unwrap();
                let mut p = Problems::default();
                let n = NotifierConfig::from_json(value, "notifiers[0]", &mut p)
                    .unwrap_or_else(|| panic!("{kind}: {:?}", p.0));
                let expected = if connects {
                    let path = ca_file.map(std::path::PathBuf::from);
                    vec![Endpoint::new("notifiers.n1")
                        .with_file("notifiers.n1.ca_file".into(), path.as_ref())]
                } else {
                    Vec::new()
                };
                assert_eq!(n.tls_endpoints(), expected, "{kind}");
            }
        }
    }
}
