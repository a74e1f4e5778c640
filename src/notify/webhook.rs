//! `type = "webhook"`: an HTTP POST of the event as JSON (reqwest, rustls on ring).
//!
//! Headers: `Idempotency-Key: <event uid>:<notifier>` (the same on every attempt), and
//! with a `secret`, `X-Outpost-Signature: sha256=<hex HMAC-SHA256 of the body>`. A 2xx
//! answer is delivered; 408 and 429 are retried; any other 4xx fails permanently (the
//! request itself is wrong, retrying cannot help); everything else is retried.

use super::{BuildContext, KindConfig, Message, Outcome, Sender};
use crate::alerts::AlertEvent;
use crate::settings::{HumanDuration, Problems, Secret};
use crate::tls::Endpoint;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::path::PathBuf;

pub const SIGNATURE_HEADER: &str = "X-Outpost-Signature";
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST, `https://…` (plain `http://` only to this gateway or a trusted LAN).
    pub url: String,
    /// Signs each body with HMAC-SHA256 in `X-Outpost-Signature: sha256=<hex>` so the
    /// receiver can check it came from this agent (or `secret_file`, or `${ENV}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
    /// Sent as `Authorization: Bearer <token>` (or `token_file`, or `${ENV}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// A PEM file with the CA of a private server, added to the built-in public roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Gives up on one attempt after this long (then retries).
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl KindConfig for WebhookConfig {
    type Sender = Webhook;

    fn tls_endpoints(&self, label: &str) -> Vec<Endpoint> {
        super::server_endpoint(label, self.ca_file.as_ref())
    }

    fn attempt_timeout(&self) -> std::time::Duration {
        self.timeout.get()
    }

    /// The server's certificate is recorded on every connection.
    fn build(&self, context: &BuildContext<'_>) -> anyhow::Result<Webhook> {
        let recorder = context
            .certs
            .map(|certs| certs.recorder(&context.label(), &crate::tls::url_peer(&self.url)));
        Webhook::new(self, recorder)
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        match reqwest::Url::parse(&self.url) {
            Err(e) => problems.push(format!("{path}.url"), format!("not a URL ({e})")),
            Ok(url) => {
                if !matches!(url.scheme(), "http" | "https") {
                    problems.push(
                        format!("{path}.url"),
                        "must start with https:// (or http://)",
                    );
                } else if url.host_str().is_none() {
                    problems.push(format!("{path}.url"), "has no host");
                } else if url.scheme() == "http"
                    && self.token.is_some()
                    && !url.host_str().is_some_and(is_loopback)
                {
                    problems.push(
                        format!("{path}.url"),
                        "refusing to send a token over plain http to another host; use https://",
                    );
                }
                if !url.username().is_empty() || url.password().is_some() {
                    problems.push(
                        format!("{path}.url"),
                        "do not put credentials in the URL; use `token`",
                    );
                }
            }
        }
        if self.url.len() > 2048 {
            problems.push(format!("{path}.url"), "is longer than 2048 characters");
        }
        if let Some(secret) = &self.secret {
            if secret.expose().is_empty() {
                problems.push(format!("{path}.secret"), "must not be empty");
            }
        }
        if let Some(token) = &self.token {
            if token.expose().is_empty() || token.expose().contains(['\r', '\n']) {
                problems.push(format!("{path}.token"), "must be one non-empty line");
            }
        }
        if let Some(ca) = &self.ca_file {
            if let Err(e) = std::fs::metadata(ca) {
                problems.push(
                    format!("{path}.ca_file"),
                    format!("cannot read {}: {e}", ca.display()),
                );
            }
        }
        if self.timeout.get().is_zero() || self.timeout.get() > std::time::Duration::from_secs(300)
        {
            problems.push(
                format!("{path}.timeout"),
                "must be more than 0 and at most 5m",
            );
        }
    }
}

/// `sha256=<hex>` of the body under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A ready webhook notifier.
pub struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: Option<Secret>,
    token: Option<Secret>,
}

impl Webhook {
    /// Builds the client; the server's certificate goes to `recorder`.
    pub fn new(
        config: &WebhookConfig,
        recorder: Option<crate::tls::CertRecorder>,
    ) -> anyhow::Result<Webhook> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.timeout.get())
            .connect_timeout(config.timeout.get())
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("outpost/", env!("CARGO_PKG_VERSION")));
        if config.url.starts_with("https://") {
            let roots = crate::tls::public_roots_with(config.ca_file.as_deref())
                .map_err(|e| anyhow::anyhow!("ca_file: {e}"))?;
            let tls = crate::tls::client_config(roots, None, recorder)
                .map_err(|(key, e)| anyhow::anyhow!("{key}: {e}"))?;
            builder = builder.use_preconfigured_tls(tls);
        }
        Ok(Webhook {
            client: builder.build()?,
            url: reqwest::Url::parse(&config.url)?,
            secret: config.secret.clone(),
            token: config.token.clone(),
        })
    }

    pub async fn send(&self, event: &AlertEvent, summary: &str, key: &str) -> Outcome {
        let mut body = match serde_json::to_value(event) {
            Ok(v) => v,
            Err(e) => return Outcome::Failed(format!("cannot encode the event: {e}")),
        };
        if let Some(map) = body.as_object_mut() {
            map.insert("summary".into(), summary.into());
        }
        let bytes = body.to_string().into_bytes();
        let mut request = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(IDEMPOTENCY_HEADER, key);
        if let Some(secret) = &self.secret {
            request = request.header(
                SIGNATURE_HEADER,
                signature(secret.expose().as_bytes(), &bytes),
            );
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token.expose());
        }
        match request.body(bytes).send().await {
            Ok(response) => classify(response.status().as_u16()),
            Err(e) if e.is_timeout() => Outcome::Retry("the webhook did not answer in time".into()),
            Err(e) => Outcome::Retry(format!("webhook: {}", error_chain(&e))),
        }
    }
}

/// 2xx delivered; 408/429 retry; other 4xx permanent; anything else retry.
pub fn classify(status: u16) -> Outcome {
    match status {
        200..=299 => Outcome::Delivered,
        408 | 429 => Outcome::Retry(format!("the webhook answered {status}")),
        400..=499 => Outcome::Failed(format!("the webhook answered {status}")),
        _ => Outcome::Retry(format!("the webhook answered {status}")),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

impl Sender for Webhook {
    async fn deliver(&self, message: &Message<'_>) -> Outcome {
        self.send(message.event, &message.subject, &message.key)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classes() {
        assert_eq!(classify(200), Outcome::Delivered);
        assert_eq!(classify(204), Outcome::Delivered);
        assert!(matches!(classify(400), Outcome::Failed(_)));
        assert!(matches!(classify(404), Outcome::Failed(_)));
        assert!(matches!(classify(408), Outcome::Retry(_)));
        assert!(matches!(classify(429), Outcome::Retry(_)));
        assert!(matches!(classify(500), Outcome::Retry(_)));
        assert!(matches!(classify(302), Outcome::Retry(_)));
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // RFC 4231 test case 2.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn validation() {
        let ok = WebhookConfig {
            url: "https://hooks.example.com/outpost".into(),
            secret: Some(Secret::new("s")),
            token: Some(Secret::new("t")),
            ca_file: None,
            timeout: default_timeout(),
        };
        let mut p = Problems::default();
        ok.validate("w", &mut p);
        assert!(p.0.is_empty(), "{:?}", p.0);
        for (url, fragment) in [
            ("ftp://x/", "https://"),
            ("not a url", "not a URL"),
            ("http://hooks.example.com/", "plain http"),
            ("https://user:pw@hooks.example.com/", "credentials"),
        ] {
            let mut c = ok.clone();
            c.url = url.into();
            let mut p = Problems::default();
            c.validate("w", &mut p);
            assert!(
                p.0.iter().any(|(_, m)| m.contains(fragment)),
                "{url}: {:?}",
                p.0
            );
        }
        let mut c = ok.clone();
        c.url = "http://127.0.0.1:8080/".into();
        c.token = Some(Secret::new("a\nb"));
        let mut p = Problems::default();
        c.validate("w", &mut p);
        assert_eq!(p.0.len(), 1, "{:?}", p.0);
        assert_eq!(p.0[0].0, "w.token");
    }
}
