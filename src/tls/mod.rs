//! TLS in one place, in three rooms:
//!
//! - [`config`]: reading PEM certificate and key files, root stores, rustls client
//!   configurations on the ring provider;
//! - [`x509`]: the expiry and common name of a certificate (RustCrypto's `x509-cert`);
//! - [`watch`]: the certificate watch ([`CertWatch`]) fed with the [`Endpoint`]s that
//!   configured sections declare, the recording verifier that shows it what servers
//!   present, its persistence for `outpost status` (`source_state`, owner `@tls`),
//!   expiry logging, and the status lines and health state built from it.
//!
//! `tls` sits above `store` and the leaves and below every component: it never names
//! a kind of source, notifier or section; components declare their endpoints.

pub mod config;
pub mod watch;
pub mod x509;

pub use config::{
    builder, client_config, provider, public_roots_with, read_certs, read_private_key, root_store,
    webpki_verifier,
};
pub use watch::{
    certificates_health, configured_cert_files, expiring, forget_removed_servers, log_expiring,
    presented_status, record_and_log, recording, remind_daily, server_labels, status_lines,
    status_of, url_peer, CertHealth, CertRecorder, CertStatus, CertWatch, Endpoint,
    PRESENTED_STATE,
};
pub use x509::{inspect_file, parse_certificate, CertInfo, Expiry, ParsedCert, WARN_DAYS};

#[cfg(test)]
pub(crate) mod test_support {
    use chrono::{DateTime, Utc};

    /// A self-signed certificate for `cn` expiring at `not_after`.
    pub fn cert_expiring(
        not_after: DateTime<Utc>,
        cn: &str,
    ) -> (rcgen::Certificate, rcgen::KeyPair) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        // rcgen's time type is not re-exported: count seconds from the epoch.
        params.not_after = rcgen::date_time_ymd(1970, 1, 1)
            + std::time::Duration::from_secs(not_after.timestamp() as u64);
        let key = rcgen::KeyPair::generate().unwrap();
        (params.self_signed(&key).unwrap(), key)
    }

    pub fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }
}
