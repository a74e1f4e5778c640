//! The certificate watch: the expiry of every certificate the configuration names or a
//! server presents ([`CertWatch`]), fed with the [`Endpoint`]s configured sections
//! declare, for the log, `/health`, `/metrics` and `outpost status`.
//!
//! Servers' certificates are seen by a [`recording`] verifier that wraps the real one:
//! the chain is recorded before it is judged, so an expired server certificate is
//! reported by name even though the handshake fails. They are also kept in the
//! database (`source_state`, owner [`PRESENTED_STATE`], through `crate::store::state`)
//! because `outpost status` is another process.

use super::x509::{inspect_file, parse_certificate, CertInfo, Expiry, ParsedCert};
use chrono::{DateTime, Utc};
use rustls::pki_types::CertificateDer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The `source_state` source under which servers' certificates are kept for
/// `outpost status` (source names are identifiers, so none can collide with it).
pub const PRESENTED_STATE: &str = "@tls";

/// The expiry of every configured certificate, keyed by its configuration key
/// (`sync.ca_file`), and of every certificate a server presented, keyed by the section
/// that connects (`sync`, `sources.NAME.broker`, `notifiers.NAME`); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct CertWatch {
    inner: Arc<Mutex<Watched>>,
    /// Where what servers present is also saved for `outpost status` (none: kept in
    /// memory only, e.g. for `outpost notify-test`).
    /// (Behind an `Arc`: a `Store` still carries a watch until the merge.)
    store: Option<Arc<crate::store::Store>>,
    /// The clock expiries are judged by when a server presents a new certificate.
    clock: crate::clock::Clock,
}

#[derive(Debug, Default)]
struct Watched {
    configured: BTreeMap<String, CertInfo>,
    presented: BTreeMap<String, CertInfo>,
}

impl CertWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the earliest expiry in `path` under `label`. On error the label is
    /// forgotten (a file that cannot be read has no known expiry).
    pub fn record_file(&self, label: &str, path: &Path) -> Result<CertInfo, String> {
        let result = inspect_file(path);
        let mut watched = self.lock();
        match &result {
            Ok(info) => {
                watched.configured.insert(label.to_string(), info.clone());
            }
            Err(_) => {
                watched.configured.remove(label);
            }
        }
        result
    }

    /// Replaces the configured certificates with `files` (the configuration changed).
    /// Returns each file's outcome. Servers' certificates stay.
    pub fn record_all(
        &self,
        files: &[(String, PathBuf)],
    ) -> Vec<(String, Result<CertInfo, String>)> {
        self.lock().configured.clear();
        files
            .iter()
            .map(|(label, path)| (label.clone(), self.record_file(label, path)))
            .collect()
    }

    /// Records what a server presented under `label`. True when it is new or changed
    /// (the server's certificate was renewed), so that it is worth saving and logging.
    pub fn record_presented(&self, label: &str, info: CertInfo) -> bool {
        let mut watched = self.lock();
        if watched.presented.get(label) == Some(&info) {
            return false;
        }
        watched.presented.insert(label.to_string(), info);
        true
    }

    /// Forgets the servers' certificates of sections that are no longer configured.
    pub fn retain_presented(&self, keep: impl Fn(&str) -> bool) {
        self.lock().presented.retain(|label, _| keep(label));
    }

    /// The same watch (clones share what they record), also saving what servers
    /// present to `store` (the `@tls` rows of `source_state`) for `outpost status`.
    pub fn saving_to(mut self, store: crate::store::Store) -> CertWatch {
        self.store = Some(Arc::new(store));
        self
    }

    /// The same watch, judging expiries by `clock`.
    pub fn with_clock(mut self, clock: crate::clock::Clock) -> CertWatch {
        self.clock = clock;
        self
    }

    /// A recorder for the handshakes of one connection: `label` names the section
    /// that connects (`sync`, `sources.NAME.broker`, `notifiers.NAME`), `peer` the
    /// server (`host:port`). What it sees is also saved when the watch saves (see
    /// [`CertWatch::saving_to`]).
    pub fn recorder(&self, label: &str, peer: &str) -> CertRecorder {
        CertRecorder {
            watch: self.clone(),
            label: label.to_string(),
            peer: peer.to_string(),
            store: self.store.as_deref().cloned(),
        }
    }

    /// Every recorded certificate: configured files, then servers' chains.
    pub fn snapshot(&self) -> Vec<(String, CertInfo)> {
        let watched = self.lock();
        watched
            .configured
            .iter()
            .chain(watched.presented.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// Records the chain a server presents to one connection (see [`recording`]).
#[derive(Clone)]
pub struct CertRecorder {
    watch: CertWatch,
    label: String,
    peer: String,
    store: Option<crate::store::Store>,
}

impl std::fmt::Debug for CertRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertRecorder")
            .field("label", &self.label)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl CertRecorder {
    /// Records the earliest expiry of the end-entity certificate and the
    /// intermediates (the roots are the configuration's, watched as files). A chain
    /// that cannot be parsed is only logged: the verifier judges it anyway.
    pub fn record(&self, end_entity: &[u8], intermediates: &[&[u8]]) {
        let mut earliest: Option<ParsedCert> = None;
        for der in std::iter::once(end_entity).chain(intermediates.iter().copied()) {
            match parse_certificate(der) {
                Ok(parsed) => {
                    if earliest
                        .as_ref()
                        .is_none_or(|e| parsed.not_after < e.not_after)
                    {
                        earliest = Some(parsed);
                    }
                }
                Err(e) => tracing::debug!(
                    server = %self.peer,
                    error = %e,
                    "Cannot read the expiry of a certificate the server presented."
                ),
            }
        }
        let Some(earliest) = earliest else { return };
        let info = CertInfo {
            origin: format!("server {}", self.peer),
            subject_hint: earliest
                .common_name
                .unwrap_or_else(|| "no common name".into()),
            not_after: earliest.not_after,
        };
        if !self.watch.record_presented(&self.label, info.clone()) {
            return;
        }
        let now = self.watch.clock.now();
        log_one(&self.label, &info, now, "presented by the server");
        if let (Some(store), Ok(runtime)) = (&self.store, tokio::runtime::Handle::try_current()) {
            let (store, label) = (store.clone(), self.label.clone());
            let Ok(value) = serde_json::to_string(&info) else {
                return;
            };
            runtime.spawn(async move {
                let rows = vec![(label, value)];
                if let Err(e) = crate::store::state::write_rows(&store, PRESENTED_STATE, rows).await
                {
                    tracing::debug!(error = %e, "Cannot save a server certificate's expiry.");
                }
            });
        }
    }
}

/// `host:port` of a URL, naming the server whose certificate is recorded (the URL
/// itself when it has no host).
pub fn url_peer(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
        .unwrap_or_else(|| url.to_string())
}

/// Wraps `inner` so that every chain it is asked to verify is first given to
/// `recorder` (when there is one). Verification itself is `inner`'s, unchanged.
pub fn recording(
    inner: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    recorder: Option<CertRecorder>,
) -> Arc<dyn rustls::client::danger::ServerCertVerifier> {
    match recorder {
        Some(recorder) => Arc::new(Recording { inner, recorder }),
        None => inner,
    }
}

#[derive(Debug)]
struct Recording {
    inner: Arc<dyn rustls::client::danger::ServerCertVerifier>,
    recorder: CertRecorder,
}

impl rustls::client::danger::ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let chain: Vec<&[u8]> = intermediates.iter().map(|c| c.as_ref()).collect();
        self.recorder.record(end_entity, &chain);
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// A TLS server a configured section connects to, declared by that section
/// (`SourceConfig::tls_endpoints`, `NotifierConfig::tls_endpoints`,
/// `SyncConfig::tls_endpoints`, all gathered by `Config::tls_endpoints`): the
/// certificate watch follows what sections declare, never a list of kinds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The [`CertRecorder`] label of the certificate the server presents:
    /// `sources.NAME.broker`, `sources.NAME.backfill`, `sync`, `notifiers.NAME`.
    pub label: String,
    /// Certificate files configured for this connection, each labelled with its key
    /// path (`sources.NAME.broker.ca_file`).
    pub files: Vec<(String, PathBuf)>,
}

impl Endpoint {
    /// An endpoint with no certificate files configured.
    pub fn new(label: impl Into<String>) -> Endpoint {
        Endpoint {
            label: label.into(),
            files: Vec::new(),
        }
    }

    /// Adds `path` (when set) as the file configured under the key path `key`.
    pub fn with_file(mut self, key: String, path: Option<&PathBuf>) -> Endpoint {
        if let Some(path) = path {
            self.files.push((key, path.clone()));
        }
        self
    }
}

/// The servers' [`CertRecorder`] labels: a server certificate recorded under another
/// label belongs to removed configuration.
pub fn server_labels(endpoints: &[Endpoint]) -> std::collections::BTreeSet<String> {
    endpoints.iter().map(|e| e.label.clone()).collect()
}

/// Forgets servers' certificates recorded for sections `config` no longer has, in
/// `watch` and in the database (`store`).
pub async fn forget_removed_servers(
    watch: &CertWatch,
    endpoints: &[Endpoint],
    store: &crate::store::Store,
) {
    let keep = server_labels(endpoints);
    watch.retain_presented(|label| keep.contains(label));
    let result = store
        .write(move |conn| {
            let mut stmt = conn.prepare("SELECT key FROM source_state WHERE source = ?1")?;
            let labels = stmt
                .query_map([PRESENTED_STATE], |r| r.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            for label in labels.iter().filter(|l| !keep.contains(*l)) {
                conn.execute(
                    "DELETE FROM source_state WHERE source = ?1 AND key = ?2",
                    rusqlite::params![PRESENTED_STATE, label],
                )?;
            }
            Ok(())
        })
        .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "Cannot forget the certificates of removed servers.");
    }
}

/// Every certificate file the endpoints name, with its key path as label.
pub fn configured_cert_files(endpoints: &[Endpoint]) -> Vec<(String, PathBuf)> {
    endpoints
        .iter()
        .flat_map(|e| e.files.iter().cloned())
        .collect()
}

/// Records the configured certificates in `watch`, logs the files whose expiry cannot
/// be read, then the certificates expiring soon ([`log_expiring`]).
pub fn record_and_log(watch: &CertWatch, endpoints: &[Endpoint], now: DateTime<Utc>) {
    for (label, outcome) in watch.record_all(&configured_cert_files(endpoints)) {
        if let Err(e) = outcome {
            tracing::warn!(
                certificate = %label,
                error = %e,
                "Cannot read the expiry of this certificate."
            );
        }
    }
    log_expiring(watch, now);
}

/// Logs each recorded certificate that has expired (error) or expires within
/// [`WARN_DAYS`](super::WARN_DAYS) (warning).
pub fn log_expiring(watch: &CertWatch, now: DateTime<Utc>) {
    for (label, info) in watch.snapshot() {
        log_one(&label, &info, now, "configured or presented");
    }
}

/// Logs one certificate's expiry: an error once expired, a warning within
/// [`WARN_DAYS`](super::WARN_DAYS), debug otherwise.
fn log_one(label: &str, info: &CertInfo, now: DateTime<Utc>, seen: &str) {
    match info.expiry(now) {
        Expiry::Expired { .. } => tracing::error!(
            certificate = %label,
            seen,
            detail = %info.describe(now),
            "A TLS certificate has EXPIRED: connections using it fail."
        ),
        Expiry::Soon { days } => tracing::warn!(
            certificate = %label,
            seen,
            days,
            detail = %info.describe(now),
            "A TLS certificate expires soon; have it replaced."
        ),
        Expiry::Valid { days } => tracing::debug!(
            certificate = %label,
            seen,
            days,
            detail = %info.describe(now),
            "TLS certificate expiry recorded."
        ),
    }
}

/// Repeats [`log_expiring`] once a day, so a long-running agent warns when a
/// certificate enters the warning window, until `shutdown`.
pub async fn remind_daily(watch: CertWatch, shutdown: tokio_util::sync::CancellationToken) {
    const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(DAY) => log_expiring(&watch, watch.clock.now()),
        }
    }
}

/// One certificate file or server chain as `outpost status --json` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertStatus {
    /// The configuration key (`sync.ca_file`) or, for a server's certificate, the
    /// section that connects (`sync`, `sources.NAME.broker`, `notifiers.NAME`).
    pub certificate: String,
    /// The configured file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The server that presented it (`host:port`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<DateTime<Utc>>,
    /// Whole days left (negative once expired).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub days_left: Option<i64>,
    /// `ok`, `expiring` (within 30 days), `expired` or `unreadable`.
    pub state: &'static str,
    pub detail: String,
}

impl CertStatus {
    fn known(certificate: String, info: &CertInfo, now: DateTime<Utc>) -> CertStatus {
        CertStatus {
            certificate,
            path: None,
            server: None,
            subject: Some(info.subject_hint.clone()),
            not_after: Some(info.not_after),
            days_left: Some((info.not_after - now).num_days()),
            state: match info.expiry(now) {
                Expiry::Valid { .. } => "ok",
                Expiry::Soon { .. } => "expiring",
                Expiry::Expired { .. } => "expired",
            },
            detail: info.describe(now),
        }
    }
}

/// Reads every certificate file the configuration names (for `outpost status`).
pub fn status_of(endpoints: &[Endpoint], now: DateTime<Utc>) -> Vec<CertStatus> {
    configured_cert_files(endpoints)
        .into_iter()
        .map(|(certificate, path)| match inspect_file(&path) {
            Ok(info) => CertStatus {
                path: Some(path),
                ..CertStatus::known(certificate, &info, now)
            },
            Err(detail) => CertStatus {
                certificate,
                path: Some(path),
                server: None,
                subject: None,
                not_after: None,
                days_left: None,
                state: "unreadable",
                detail,
            },
        })
        .collect()
}

/// The servers' certificates the agent saved in the database at `db` (for
/// `outpost status`, which runs beside the service). Unreadable rows are skipped.
pub fn presented_status(db: &Path, now: DateTime<Utc>) -> Vec<CertStatus> {
    let rows = crate::store::open_reader(db, std::time::Duration::from_secs(2)).and_then(|conn| {
        let mut stmt =
            conn.prepare("SELECT key, value FROM source_state WHERE source = ?1 ORDER BY key")?;
        let rows = stmt
            .query_map([PRESENTED_STATE], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>();
        rows
    });
    rows.unwrap_or_default()
        .into_iter()
        .filter_map(|(label, value)| {
            let info: CertInfo = serde_json::from_str(&value).ok()?;
            Some(CertStatus {
                server: Some(info.origin.trim_start_matches("server ").to_string()),
                ..CertStatus::known(label, &info, now)
            })
        })
        .collect()
}

/// The `outpost status` lines: one per certificate that needs a person.
pub fn status_lines(certs: &[CertStatus]) -> Vec<String> {
    certs
        .iter()
        .filter_map(|c| match c.state {
            "expired" => Some(format!(
                "CERTIFICATE EXPIRED: {}: {}",
                c.certificate, c.detail
            )),
            "expiring" => Some(format!(
                "WARNING: certificate {}: {}",
                c.certificate, c.detail
            )),
            "unreadable" => Some(format!(
                "WARNING: certificate {}: cannot read its expiry: {}",
                c.certificate, c.detail
            )),
            _ => None,
        })
        .collect()
}

/// Lines for `outpost status` and `/health`: certificates expired or expiring within
/// [`WARN_DAYS`](super::WARN_DAYS), as `label: sentence`.
pub fn expiring(certs: &[(String, CertInfo)], now: DateTime<Utc>) -> Vec<(String, bool, String)> {
    certs
        .iter()
        .filter_map(|(label, info)| match info.expiry(now) {
            Expiry::Valid { .. } => None,
            Expiry::Soon { .. } => Some((label.clone(), false, info.describe(now))),
            Expiry::Expired { .. } => Some((label.clone(), true, info.describe(now))),
        })
        .collect()
}

/// What the `/health` check over the recorded certificates says (the check itself is
/// the run layer's): not ok once one has expired; ok but saying so when one expires
/// within [`WARN_DAYS`](super::WARN_DAYS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertHealth {
    pub ok: bool,
    pub detail: String,
}

/// The state of `certs` for `/health` (`None` when the configuration names no
/// certificate).
pub fn certificates_health(certs: &[(String, CertInfo)], now: DateTime<Utc>) -> Option<CertHealth> {
    if certs.is_empty() {
        return None;
    }
    let flagged = expiring(certs, now);
    let ok = flagged.iter().all(|(_, expired, _)| !expired);
    let detail = if flagged.is_empty() {
        let soonest = certs
            .iter()
            .map(|(_, info)| info.expiry(now))
            .filter_map(|e| match e {
                Expiry::Valid { days } => Some(days),
                _ => None,
            })
            .min()
            .unwrap_or_default();
        format!(
            "{} certificate(s); the first expires in {soonest} days",
            certs.len()
        )
    } else {
        flagged
            .iter()
            .map(|(label, _, sentence)| format!("{label}: {sentence}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    Some(CertHealth { ok, detail })
}

#[cfg(test)]
mod tests {
    use super::super::config::webpki_verifier;
    use super::super::test_support::{at, cert_expiring};
    use super::*;

    #[test]
    fn a_rejected_server_chain_is_still_recorded_under_its_section() {
        let (server, _) = cert_expiring(at("2031-05-01T00:00:00Z"), "broker.example");
        let (unrelated, _) = cert_expiring(at("2040-01-01T00:00:00Z"), "some-ca");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(unrelated.der().clone()).unwrap();
        let watch = CertWatch::default();
        let verifier = recording(
            webpki_verifier(roots).unwrap(),
            Some(watch.recorder("sources.lns.broker", "broker.example:8883")),
        );
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let verdict = verifier.verify_server_cert(
            server.der(),
            &[],
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        );
        assert!(verdict.is_err(), "an unknown issuer is still refused");
        let recorded = watch.snapshot();
        assert_eq!(recorded.len(), 1, "{recorded:?}");
        let (label, info) = &recorded[0];
        assert_eq!(label, "sources.lns.broker");
        assert_eq!(info.origin, "server broker.example:8883");
        assert_eq!(info.subject_hint, "broker.example");
        assert_eq!(info.not_after, at("2031-05-01T00:00:00Z"));
        assert_eq!(
            info.describe(at("2031-04-21T00:00:00Z")),
            "server broker.example:8883 (broker.example) expires in 10 days (2031-05-01 00:00 UTC)"
        );
    }

    #[test]
    fn servers_certificates_survive_a_new_configuration_unless_their_section_is_gone() {
        let watch = CertWatch::default();
        let info = |day: &str| CertInfo {
            origin: "server central:5432".into(),
            subject_hint: "central".into(),
            not_after: at(day),
        };
        assert!(watch.record_presented("sync", info("2030-01-01T00:00:00Z")));
        assert!(
            !watch.record_presented("sync", info("2030-01-01T00:00:00Z")),
            "the same certificate again is not news"
        );
        assert!(
            watch.record_presented("sync", info("2031-01-01T00:00:00Z")),
            "a renewed certificate is"
        );
        watch.record_all(&[]);
        assert_eq!(
            watch.snapshot().len(),
            1,
            "reloading files keeps servers' certificates"
        );
        watch.retain_presented(|label| label != "sync");
        assert!(watch.snapshot().is_empty());
    }

    #[test]
    fn a_file_reports_its_earliest_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (late, _) = cert_expiring(at("2040-01-01T00:00:00Z"), "late");
        let (early, _) = cert_expiring(at("2030-01-01T00:00:00Z"), "early");
        let path = dir.path().join("bundle.pem");
        std::fs::write(&path, format!("{}{}", late.pem(), early.pem())).unwrap();
        let info = inspect_file(&path).unwrap();
        assert_eq!(info.not_after, at("2030-01-01T00:00:00Z"));
        assert_eq!(info.subject_hint, "early");

        let watch = CertWatch::default();
        let missing = dir.path().join("missing.pem");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not PEM").unwrap();
        let outcomes = watch.record_all(&[
            ("sync.ca_file".into(), path.clone()),
            ("a".into(), missing),
            ("b".into(), garbage),
        ]);
        assert!(outcomes[0].1.is_ok());
        assert!(outcomes[1].1.as_ref().unwrap_err().contains("cannot read"));
        assert!(outcomes[2]
            .1
            .as_ref()
            .unwrap_err()
            .contains("no PEM certificate"));
        assert_eq!(watch.snapshot().len(), 1);
        // A reload without the key forgets it.
        watch.record_all(&[]);
        assert!(watch.snapshot().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_daily_reminder_stops_with_the_agent() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(remind_daily(CertWatch::default(), shutdown.clone()));
        tokio::time::sleep(std::time::Duration::from_secs(3 * 24 * 3600)).await;
        assert!(!task.is_finished());
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn expiry_is_judged_thirty_days_ahead() {
        let now = at("2030-01-01T00:00:00Z");
        let info = |days: i64| CertInfo {
            origin: "/etc/outpost/ca.pem".into(),
            subject_hint: "ca".into(),
            not_after: now + chrono::Duration::days(days) + chrono::Duration::hours(1),
        };
        assert_eq!(info(30).expiry(now), Expiry::Valid { days: 30 });
        assert_eq!(info(29).expiry(now), Expiry::Soon { days: 29 });
        assert_eq!(info(0).expiry(now), Expiry::Soon { days: 0 });
        assert_eq!(info(-1).expiry(now), Expiry::Expired { days_ago: 0 });
        assert_eq!(info(-3).expiry(now), Expiry::Expired { days_ago: 2 });
        assert!((info(10).days_left(now) - 10.04).abs() < 0.01);
        assert!(info(10).describe(now).contains("expires in 10 days"));
        assert!(info(1).describe(now).contains("expires in 1 day ("));
        assert!(info(0).describe(now).contains("expires today"));
        assert!(info(-2).describe(now).contains("EXPIRED 1 day ago"));

        let healthy = certificates_health(&[("sync.ca_file".into(), info(90))], now).unwrap();
        assert!(healthy.ok);
        assert!(healthy.detail.contains("90 days"), "{}", healthy.detail);
        let soon = certificates_health(
            &[("sync.ca_file".into(), info(10)), ("x".into(), info(90))],
            now,
        )
        .unwrap();
        assert!(soon.ok);
        assert!(soon.detail.contains("sync.ca_file"), "{}", soon.detail);
        assert!(
            soon.detail.contains("expires in 10 days"),
            "{}",
            soon.detail
        );
        let expired = certificates_health(
            &[("sync.ca_file".into(), info(10)), ("x".into(), info(-5))],
            now,
        )
        .unwrap();
        assert!(!expired.ok);
        assert!(expired.detail.contains("EXPIRED"), "{}", expired.detail);
        assert!(certificates_health(&[], now).is_none());
    }
}
