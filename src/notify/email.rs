//! `type = "email"`: SMTP through lettre (async, rustls on ring): implicit TLS (SMTPS,
//! usually port 465), STARTTLS (587) or plain for a relay on the gateway itself; AUTH
//! when a username is set; several recipients; an optional CA file for a private CA.
//!
//! The Message-ID is derived from the event uid and the notifier, so a message sent twice
//! (at-least-once) carries the same Message-ID and mail clients thread or drop it.

use super::{BuildContext, KindConfig, Message as Notification, Outcome, Sender};
use crate::settings::{HumanDuration, Problems, Secret};
use crate::tls::Endpoint;
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// The SMTP server's host name (as in its certificate) or address.
    pub server: String,
    /// Default: 465 for `tls = "implicit"`, 587 for `"starttls"`, 25 for `"none"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `starttls` (default), `implicit` (SMTPS) or `none` (only for a relay on this
    /// gateway; a password is never sent without TLS except to localhost).
    #[serde(default)]
    pub tls: SmtpTls,
    /// A PEM file with the CA that signed the server's certificate, added to the
    /// built-in public roots (for a private mail server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Log in with this user (AUTH PLAIN or LOGIN); omit for a relay without AUTH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// The password (or `password_file`, or `${ENV}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// The sender, e.g. `"Outpost <outpost@example.com>"`.
    pub from: String,
    /// The recipients.
    #[serde(default)]
    pub to: Vec<String>,
    /// Gives up on one attempt after this long.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    Implicit,
    #[default]
    Starttls,
    None,
}

fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}

const MAX_RECIPIENTS: usize = 100;

fn is_local(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "::1" | "[::1]")
}

impl KindConfig for EmailConfig {
    type Sender = Email;

    fn tls_endpoints(&self, label: &str) -> Vec<Endpoint> {
        super::server_endpoint(label, self.ca_file.as_ref())
    }

    fn attempt_timeout(&self) -> std::time::Duration {
        self.timeout.get()
    }

    fn build(&self, context: &BuildContext<'_>) -> anyhow::Result<Email> {
        Email::new(self, context.gateway_id)
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        if self.server.trim().is_empty()
            || self.server.len() > 253
            || self.server.contains(char::is_whitespace)
        {
            problems.push(format!("{path}.server"), "must be a host name or address");
        }
        if self.port == Some(0) {
            problems.push(format!("{path}.port"), "must be between 1 and 65535");
        }
        if let Err(e) = self.from.parse::<Mailbox>() {
            problems.push(
                format!("{path}.from"),
                format!("not an email address ({e})"),
            );
        }
        if self.to.is_empty() {
            problems.push(format!("{path}.to"), "list at least one recipient");
        }
        if self.to.len() > MAX_RECIPIENTS {
            problems.push(
                format!("{path}.to"),
                format!("at most {MAX_RECIPIENTS} recipients"),
            );
        }
        for (i, to) in self.to.iter().enumerate() {
            if let Err(e) = to.parse::<Mailbox>() {
                problems.push(
                    format!("{path}.to[{i}]"),
                    format!("not an email address ({e})"),
                );
            }
        }
        match (&self.username, &self.password) {
            (None, Some(_)) => {
                problems.push(format!("{path}.username"), "a password needs a username")
            }
            (Some(_), None) => problems.push(
                format!("{path}.password"),
                "a username needs a password (or password_file)",
            ),
            _ => {}
        }
        if self.tls == SmtpTls::None && self.password.is_some() && !is_local(&self.server) {
            problems.push(
                format!("{path}.tls"),
                "refusing to send a password without TLS to another host; use \"starttls\" or \"implicit\"",
            );
        }
        if let Some(ca) = &self.ca_file {
            if self.tls == SmtpTls::None {
                problems.push(
                    format!("{path}.ca_file"),
                    "has no effect with tls = \"none\"",
                );
            } else if let Err(e) = std::fs::metadata(ca) {
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

/// A ready email notifier.
pub struct Email {
    config: EmailConfig,
    tls: Option<TlsParameters>,
    from: Mailbox,
    to: Vec<Mailbox>,
    /// The right-hand side of Message-IDs.
    domain: String,
}

impl Email {
    pub fn new(config: &EmailConfig, gateway_id: &str) -> anyhow::Result<Email> {
        let tls = match config.tls {
            SmtpTls::None => None,
            SmtpTls::Implicit | SmtpTls::Starttls => {
                let mut builder = TlsParameters::builder(config.server.clone());
                if let Some(path) = &config.ca_file {
                    for der in
                        crate::tls::read_certs(path).map_err(|e| anyhow::anyhow!("ca_file: {e}"))?
                    {
                        let cert = Certificate::from_der(der.to_vec()).map_err(|e| {
                            anyhow::anyhow!(
                                "ca_file {} holds no usable certificate: {e}",
                                path.display()
                            )
                        })?;
                        builder = builder.add_root_certificate(cert);
                    }
                }
                Some(builder.build_rustls()?)
            }
        };
        let from = config
            .from
            .parse()
            .map_err(|e| anyhow::anyhow!("from: {e}"))?;
        let to = config
            .to
            .iter()
            .map(|t| t.parse().map_err(|e| anyhow::anyhow!("to {t:?}: {e}")))
            .collect::<anyhow::Result<Vec<Mailbox>>>()?;
        let domain: String = gateway_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        Ok(Email {
            config: config.clone(),
            tls,
            from,
            to,
            domain: format!("{domain}.outpost.invalid"),
        })
    }

    fn port(&self) -> u16 {
        self.config.port.unwrap_or(match self.config.tls {
            SmtpTls::Implicit => 465,
            SmtpTls::Starttls => 587,
            SmtpTls::None => 25,
        })
    }

    /// `server:port` when the connection uses TLS (there is a certificate to see).
    pub fn peer(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|_| format!("{}:{}", self.config.server, self.port()))
    }

    /// Connects only to see the server's certificate, because lettre verifies its own
    /// handshakes and offers no hook: TLS at once (`implicit`) or after the STARTTLS
    /// dialogue, with the same roots lettre trusts. The chain goes to `recorder`
    /// whether or not it is valid; then the connection is closed with QUIT.
    pub async fn probe_certificate(
        &self,
        recorder: crate::tls::CertRecorder,
    ) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let roots = crate::tls::public_roots_with(self.config.ca_file.as_deref())?;
        let tls = crate::tls::client_config(roots, None, Some(recorder)).map_err(|(_, e)| e)?;
        let name = rustls::pki_types::ServerName::try_from(self.config.server.clone())
            .map_err(|e| format!("{:?} is not a server name: {e}", self.config.server))?;
        let probe = async {
            let mut tcp =
                tokio::net::TcpStream::connect((self.config.server.as_str(), self.port()))
                    .await
                    .map_err(|e| format!("cannot connect: {e}"))?;
            if self.config.tls == SmtpTls::Starttls {
                smtp_step(&mut tcp, None, 220).await?;
                smtp_step(&mut tcp, Some(&format!("EHLO {}\r\n", self.domain)), 250).await?;
                smtp_step(&mut tcp, Some("STARTTLS\r\n"), 220).await?;
            }
            let mut stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            let _ = stream.write_all(b"QUIT\r\n").await;
            let _ = stream.shutdown().await;
            Ok(())
        };
        tokio::time::timeout(self.config.timeout.get(), probe)
            .await
            .map_err(|_| "timed out".to_string())?
    }

    fn transport(&self) -> AsyncSmtpTransport<Tokio1Executor> {
        let port = self.port();
        let mut builder =
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(self.config.server.as_str())
                .port(port)
                .timeout(Some(self.config.timeout.get()));
        builder = match (&self.tls, self.config.tls) {
            (Some(params), SmtpTls::Implicit) => builder.tls(Tls::Wrapper(params.clone())),
            (Some(params), _) => builder.tls(Tls::Required(params.clone())),
            (None, _) => builder.tls(Tls::None),
        };
        if let (Some(user), Some(password)) = (&self.config.username, &self.config.password) {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.expose().to_string(),
            ));
        }
        builder.build()
    }

    /// The Message-ID for an idempotency key (`<event uid>:<notifier>`).
    pub fn message_id(&self, key: &str) -> String {
        let local: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '.'
                }
            })
            .collect();
        format!("<{local}@{}>", self.domain)
    }

    pub async fn send(&self, subject: &str, body: &str, key: &str) -> Outcome {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(subject.replace(['\r', '\n'], " "))
            .message_id(Some(self.message_id(key)))
            .header(ContentType::TEXT_PLAIN);
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        let message = match builder.body(body.to_string()) {
            Ok(m) => m,
            Err(e) => return Outcome::Failed(format!("cannot build the message: {e}")),
        };
        // A fresh connection per message: notifications are rare, and a pooled
        // connection to a server that restarted would only fail the first attempt.
        match self.transport().send(message).await {
            Ok(_) => Outcome::Delivered,
            Err(e) if e.is_permanent() => Outcome::Failed(format!("the SMTP server refused: {e}")),
            Err(e) => Outcome::Retry(format!("SMTP: {}", error_chain(&e))),
        }
    }
}

impl Email {
    /// Sends a [`super::Document`]: its text as the plain-text part and its attachment,
    /// if any, as a second part (`multipart/mixed`).
    pub async fn send_document(&self, document: &super::Document) -> Outcome {
        use lettre::message::{Attachment, MultiPart, SinglePart};
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(document.subject.replace(['\r', '\n'], " "))
            .message_id(Some(self.message_id(&document.key)));
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        let text = SinglePart::plain(document.text.clone());
        let built = match &document.attachment {
            None => builder.singlepart(text),
            Some(a) => {
                let content_type = match ContentType::parse(&a.content_type) {
                    Ok(c) => c,
                    Err(e) => return Outcome::Failed(format!("bad attachment type: {e}")),
                };
                let file = Attachment::new(a.filename.clone()).body(a.bytes.clone(), content_type);
                builder.multipart(MultiPart::mixed().singlepart(text).singlepart(file))
            }
        };
        let message = match built {
            Ok(m) => m,
            Err(e) => return Outcome::Failed(format!("cannot build the message: {e}")),
        };
        match self.transport().send(message).await {
            Ok(_) => Outcome::Delivered,
            Err(e) if e.is_permanent() => Outcome::Failed(format!("the SMTP server refused: {e}")),
            Err(e) => Outcome::Retry(format!("SMTP: {}", error_chain(&e))),
        }
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

/// Sends `command` (if any) and reads the SMTP reply (all its lines, at most 16 KiB),
/// which must have the code `expect`.
async fn smtp_step(
    stream: &mut tokio::net::TcpStream,
    command: Option<&str>,
    expect: u16,
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if let Some(command) = command {
        stream
            .write_all(command.as_bytes())
            .await
            .map_err(|e| format!("cannot send {}: {e}", command.trim_end()))?;
    }
    let mut reply = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the server closed the connection".into());
        }
        reply.extend_from_slice(&chunk[..n]);
        if reply.len() > 16 << 10 {
            return Err("the server's reply is longer than 16 KiB".into());
        }
        if !reply.ends_with(b"\n") {
            continue;
        }
        let text = String::from_utf8_lossy(&reply);
        let last = text.lines().last().unwrap_or_default();
        // The last line of a reply is "NNN text" (or just "NNN"); "NNN-" continues.
        if last.len() > 3 && last.as_bytes()[3] == b'-' {
            continue;
        }
        return match last.get(..3).and_then(|code| code.parse::<u16>().ok()) {
            Some(code) if code == expect => Ok(()),
            _ => Err(format!(
                "the server answered {:?}, expected {expect}",
                last.trim()
            )),
        };
    }
}

impl Sender for Email {
    async fn deliver(&self, message: &Notification<'_>) -> Outcome {
        self.send(&message.subject, &message.body(), &message.key)
            .await
    }

    /// lettre keeps its handshakes to itself, so the server is asked separately.
    fn probed_server(&self) -> Option<String> {
        self.peer()
    }

    async fn probe_certificate(&self, recorder: crate::tls::CertRecorder) -> Result<(), String> {
        Email::probe_certificate(self, recorder).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EmailConfig {
        EmailConfig {
            server: "smtp.example.com".into(),
            port: None,
            tls: SmtpTls::Starttls,
            ca_file: None,
            username: Some("u".into()),
            password: Some(Secret::new("p")),
            from: "Outpost <outpost@example.com>".into(),
            to: vec!["a@example.com".into(), "b@example.com".into()],
            timeout: default_timeout(),
        }
    }

    fn problems(c: &EmailConfig) -> Vec<(String, String)> {
        let mut p = Problems::default();
        c.validate("n", &mut p);
        p.0
    }

    #[test]
    fn validation() {
        assert!(problems(&config()).is_empty());
        let mut c = config();
        c.to = vec!["not an address".into(), "\r\nBcc: evil@example.com".into()];
        c.from = "x".into();
        c.tls = SmtpTls::None;
        c.server = "mail server".into();
        let keys: Vec<String> = problems(&c).into_iter().map(|(k, _)| k).collect();
        for k in ["n.to[0]", "n.to[1]", "n.from", "n.tls", "n.server"] {
            assert!(keys.contains(&k.to_string()), "{k} in {keys:?}");
        }
        let mut c = config();
        c.password = None;
        c.to.clear();
        c.ca_file = Some("/nonexistent/ca.pem".into());
        assert_eq!(problems(&c).len(), 3);
        let mut c = config();
        c.server = "localhost".into();
        c.tls = SmtpTls::None;
        assert!(
            problems(&c).is_empty(),
            "a local relay may take a password in plain"
        );
    }

    #[test]
    fn message_id_is_stable_and_safe() {
        let e = Email::new(&config(), "gw:01/x").unwrap();
        let id = e.message_id("0123abcd:ops-mail");
        assert_eq!(id, "<0123abcd.ops-mail@gw-01-x.outpost.invalid>");
        assert_eq!(id, e.message_id("0123abcd:ops-mail"));
    }

    #[test]
    fn a_bad_ca_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let mut c = config();
        c.ca_file = Some(path);
        assert!(Email::new(&c, "gw").is_err());
    }
}
