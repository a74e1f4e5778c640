//! `[sources.broker]`: how to reach an MQTT broker, checked before rumqttc sees it (its
//! setters assert), and turned into rumqttc options with the rustls configuration.

use crate::settings::{HumanDuration, Problems, Secret};
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Requests waiting for the event loop (subscriptions, one wake-up PUBACK per batch).
pub(super) const REQUEST_CAPACITY: usize = 4_096;
/// rumqttc drops the connection on a larger packet, so this is generous; the
/// decoders enforce the configured, much smaller `max_payload`.
const MAX_PACKET_SIZE: usize = 16 << 20;

/// `[sources.broker]`: how to reach an MQTT broker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Host name or IP address of the broker (no `mqtt://` prefix).
    pub host: String,
    /// TCP port; defaults to 8883 with TLS and 1883 without.
    #[serde(default)]
    pub port: Option<u16>,
    /// Use TLS (rustls). On by default; turn off only for a broker on the gateway itself.
    #[serde(default = "yes")]
    pub tls: bool,
    /// PEM file with the CA certificate(s) to trust instead of the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for brokers that require one; needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `client_cert_file`.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// User name for password authentication.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (or `password_file`, or `${ENV}`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// The MQTT client id. Persistent sessions (QoS 1) are tied to it, so keep it fixed.
    /// Default: `outpost-<gateway_id>-<source name>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Keep-alive interval (5s to 18h); the broker drops the connection after 1.5× this
    /// without traffic.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: HumanDuration,
    /// How long a connection attempt (TCP, TLS and CONNACK) may take.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// First delay before reconnecting after a failure; it doubles up to `reconnect_max`
    /// (each delay randomised so a fleet does not reconnect in step).
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: HumanDuration,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: HumanDuration,
}

fn yes() -> bool {
    true
}
fn default_keep_alive() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration::from_secs(10)
}
fn default_reconnect_min() -> HumanDuration {
    HumanDuration::from_secs(1)
}
fn default_reconnect_max() -> HumanDuration {
    HumanDuration::from_secs(120)
}

impl BrokerConfig {
    /// A plain configuration for `host:port` (tests, defaults).
    pub fn new(host: impl Into<String>) -> BrokerConfig {
        BrokerConfig {
            host: host.into(),
            port: None,
            tls: true,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            username: None,
            password: None,
            client_id: None,
            keep_alive: default_keep_alive(),
            connect_timeout: default_connect_timeout(),
            reconnect_min: default_reconnect_min(),
            reconnect_max: default_reconnect_max(),
        }
    }

    pub fn port(&self) -> u16 {
        match self.port {
            Some(p) => p,
            None if self.tls => 8883,
            None => 1883,
        }
    }

    /// Checks everything rumqttc would assert on, and loads the TLS files so that
    /// `outpost check` reports a bad certificate.
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        let host = self.host.trim();
        if host.is_empty() {
            problems.push(
                format!("{path}.host"),
                "must name the broker, e.g. \"eu1.cloud.thethings.network\"",
            );
        } else if host.contains("://") {
            problems.push(
                format!("{path}.host"),
                format!("{host:?} is a URL; write only the host name and set `port` and `tls`"),
            );
        } else if host.chars().any(|c| c.is_whitespace() || c == '/') || host.len() > 253 {
            problems.push(
                format!("{path}.host"),
                format!("{host:?} is not a host name or address"),
            );
        }
        if self.port == Some(0) {
            problems.push(format!("{path}.port"), "must be between 1 and 65535");
        }
        let keep_alive = self.keep_alive.get();
        if keep_alive < Duration::from_secs(5) || keep_alive > Duration::from_secs(u16::MAX as u64)
        {
            problems.push(
                format!("{path}.keep_alive"),
                format!("must be between 5s and 18h, found {}", self.keep_alive),
            );
        }
        let timeout = self.connect_timeout.get();
        if timeout < Duration::from_secs(1) || timeout > Duration::from_secs(300) {
            problems.push(
                format!("{path}.connect_timeout"),
                format!("must be between 1s and 5m, found {}", self.connect_timeout),
            );
        }
        if self.reconnect_min.get() < Duration::from_millis(100) {
            problems.push(format!("{path}.reconnect_min"), "must be at least 100ms");
        }
        if self.reconnect_max < self.reconnect_min
            || self.reconnect_max.get() > Duration::from_secs(3600)
        {
            problems.push(
                format!("{path}.reconnect_max"),
                "must be at least reconnect_min and at most 1h",
            );
        }
        if let Some(id) = &self.client_id {
            problems.check(format!("{path}.client_id"), check_client_id(id));
        }
        if let Some(user) = &self.username {
            if user.is_empty() || user.len() > 1024 {
                problems.push(
                    format!("{path}.username"),
                    "must be between 1 and 1024 characters",
                );
            }
        }
        if self.password.is_some() && self.username.is_none() {
            problems.push(format!("{path}.password"), "a password needs a `username`");
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) => problems.push(
                format!("{path}.client_key_file"),
                "is needed with client_cert_file",
            ),
            (None, Some(_)) => problems.push(
                format!("{path}.client_cert_file"),
                "is needed with client_key_file",
            ),
            _ => {}
        }
        if !self.tls {
            for (key, set) in [
                ("ca_file", self.ca_file.is_some()),
                ("client_cert_file", self.client_cert_file.is_some()),
            ] {
                if set {
                    problems.push(format!("{path}.{key}"), "is only used with tls = true");
                }
            }
        } else if let Err((key, message)) = self.tls_config(None) {
            problems.push(format!("{path}.{key}"), message);
        }
    }

    /// The rustls client configuration (ring provider): the CA file's certificates or
    /// the system's roots, and the client certificate if configured; the broker's
    /// certificate goes to `recorder`. Errors name the key at fault.
    pub fn tls_config(
        &self,
        recorder: Option<crate::tls::CertRecorder>,
    ) -> Result<rustls::ClientConfig, (&'static str, String)> {
        tls_client_config(
            self.ca_file.as_deref(),
            self.client_cert_file
                .as_deref()
                .zip(self.client_key_file.as_deref()),
            recorder,
        )
    }

    /// The broker as the TLS server source `source` connects to, with its files.
    pub fn tls_endpoint(&self, source: &str) -> crate::tls::Endpoint {
        let label = format!("sources.{source}.broker");
        crate::tls::Endpoint::new(label.clone())
            .with_file(format!("{label}.ca_file"), self.ca_file.as_ref())
            .with_file(
                format!("{label}.client_cert_file"),
                self.client_cert_file.as_ref(),
            )
    }

    /// `host:port`, the peer named in certificate records.
    pub fn peer(&self) -> String {
        format!("{}:{}", self.host.trim(), self.port())
    }

    /// rumqttc options for this broker; with TLS, its certificate goes to `recorder`.
    /// `validate` must have passed.
    pub fn mqtt_options(
        &self,
        client_id: &str,
        clean_session: bool,
        manual_acks: bool,
        credentials: Option<(String, String)>,
        recorder: Option<crate::tls::CertRecorder>,
    ) -> Result<MqttOptions, String> {
        check_client_id(client_id)?;
        let keep_alive = self.keep_alive.get();
        if keep_alive < Duration::from_secs(1) {
            return Err("keep_alive must be at least 1s".into());
        }
        let mut options = MqttOptions::new(client_id, self.host.trim(), self.port());
        options
            .set_keep_alive(keep_alive)
            .set_clean_session(clean_session)
            .set_manual_acks(manual_acks)
            .set_max_packet_size(MAX_PACKET_SIZE, 64 << 10)
            .set_request_channel_capacity(REQUEST_CAPACITY)
            .set_inflight(100);
        let credentials = credentials.or_else(|| {
            self.username.clone().map(|u| {
                (
                    u,
                    self.password
                        .as_ref()
                        .map(|p| p.expose().to_string())
                        .unwrap_or_default(),
                )
            })
        });
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        if self.tls {
            let config = self
                .tls_config(recorder)
                .map_err(|(key, message)| format!("{key}: {message}"))?;
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(config),
            )));
        }
        Ok(options)
    }
}

/// The client id rules rumqttc and brokers impose.
pub fn check_client_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(
            "the client id must not be empty (a persistent session needs a fixed id)".into(),
        );
    }
    if id.len() > 128 {
        return Err("the client id is longer than 128 characters".into());
    }
    if let Some(c) = id.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(format!(
            "the client id {id:?} contains {c:?}; use printable ASCII without spaces"
        ));
    }
    Ok(())
}

/// The default client id: fixed per gateway and source, so persistent sessions survive
/// restarts.
pub fn default_client_id(gateway_id: &str, source: &str) -> String {
    let id: String = format!("outpost-{gateway_id}-{source}")
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(128)
        .collect();
    id
}

/// Builds a rustls client configuration on the ring provider: the CA file's
/// certificates, or the system's roots when none is set; the server's certificate goes
/// to `recorder`.
pub fn tls_client_config(
    ca_file: Option<&std::path::Path>,
    client_auth: Option<(&std::path::Path, &std::path::Path)>,
    recorder: Option<crate::tls::CertRecorder>,
) -> Result<rustls::ClientConfig, (&'static str, String)> {
    let roots = crate::tls::root_store(ca_file, ca_file.is_none()).map_err(|e| ("ca_file", e))?;
    if roots.is_empty() {
        return Err((
            "ca_file",
            "no system CA certificates were found (install ca-certificates) and no ca_file is set"
                .into(),
        ));
    }
    crate::tls::client_config(roots, client_auth, recorder)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems_of(b: &BrokerConfig) -> Vec<String> {
        let mut p = Problems::default();
        b.validate("sources[0].broker", &mut p);
        p.0.into_iter().map(|(k, m)| format!("{k}: {m}")).collect()
    }

    #[test]
    fn broker_validation_catches_what_rumqttc_would_assert() {
        let mut b = BrokerConfig::new("localhost");
        b.tls = false;
        assert!(problems_of(&b).is_empty(), "{:?}", problems_of(&b));
        assert_eq!(b.port(), 1883);
        b.tls = true;
        b.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(problems_of(&b)
            .iter()
            .any(|p| p.contains("ca_file: cannot read")));
        let mut bad = BrokerConfig::new("mqtts://host:8883");
        bad.tls = false;
        bad.port = Some(0);
        bad.keep_alive = HumanDuration::from_millis(500);
        bad.client_id = Some("has space".into());
        bad.password = Some(Secret::new("x"));
        bad.client_cert_file = Some("/x".into());
        bad.reconnect_min = HumanDuration::from_secs(10);
        bad.reconnect_max = HumanDuration::from_secs(5);
        let problems = problems_of(&bad);
        for expected in [
            "host: \"mqtts://host:8883\" is a URL",
            "port: must be between",
            "keep_alive: must be between 5s",
            "client_id: the client id",
            "password: a password needs",
            "client_key_file: is needed",
            "reconnect_max: must be at least",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected:?} in {problems:#?}"
            );
        }
        assert!(problems_of(&BrokerConfig::new(""))
            .iter()
            .any(|p| p.contains("host: must name")));
    }

    #[test]
    fn options_never_panic_on_bad_input() {
        let mut b = BrokerConfig::new("localhost");
        b.tls = false;
        assert!(
            b.mqtt_options("", false, true, None, None).is_err(),
            "empty id with a persistent session"
        );
        assert!(b.mqtt_options("a b", true, false, None, None).is_err());
        let o = b
            .mqtt_options(
                "outpost-gw-src",
                false,
                true,
                Some(("u".into(), "p".into())),
                None,
            )
            .unwrap();
        assert!(!o.clean_session());
        assert!(o.manual_acks());
        assert_eq!(o.credentials().map(|l| l.username), Some("u".to_string()));
        assert_eq!(default_client_id("gw 1", "src"), "outpost-gw1-src");
    }

    #[test]
    fn tls_config_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, b"\x00\x01 not pem").unwrap();
        let err = tls_client_config(Some(&garbage), None, None).unwrap_err();
        assert_eq!(err.0, "ca_file");
        assert!(err.1.contains("no PEM certificate"), "{}", err.1);
        // System roots exist on this machine (ca-certificates).
        if std::path::Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
            assert!(tls_client_config(None, None, None).is_ok());
        }
    }
}
