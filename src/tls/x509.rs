//! X.509 reading: the expiry (and common name) of a certificate, decoded by RustCrypto's
//! `x509-cert` (already linked for PostgreSQL's channel binding), and of the
//! certificates of a PEM file.

use super::config::read_certs;
use chrono::{DateTime, Utc};
use std::path::Path;
use x509_cert::der::asn1::ObjectIdentifier;
use x509_cert::der::Decode;
use x509_cert::name::Name;
use x509_cert::time::Time;
use x509_cert::Certificate;

/// 2.5.4.3 (commonName).
const COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

/// Certificates expiring within this many days are reported.
pub const WARN_DAYS: i64 = 30;

/// What [`parse_certificate`] learns from a certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCert {
    pub not_after: DateTime<Utc>,
    /// The subject's common name when it has one (sanitised, at most 64 characters).
    pub common_name: Option<String>,
}

/// Decodes a DER X.509 certificate (RustCrypto's `x509-cert`) to its validity and
/// subject. Never panics on truncated or hostile input.
pub fn parse_certificate(der: &[u8]) -> Result<ParsedCert, String> {
    let cert = Certificate::from_der(der).map_err(|e| format!("not a DER certificate: {e}"))?;
    let tbs = &cert.tbs_certificate;
    let not_after = not_after(&tbs.validity.not_after)?;
    Ok(ParsedCert {
        not_after,
        common_name: common_name(&tbs.subject),
    })
}

fn not_after(time: &Time) -> Result<DateTime<Utc>, String> {
    let since_epoch = time.to_unix_duration();
    i64::try_from(since_epoch.as_secs())
        .ok()
        .and_then(|secs| DateTime::from_timestamp(secs, since_epoch.subsec_nanos()))
        .ok_or_else(|| "notAfter: no such date".to_string())
}

/// The first commonName of a subject, as text (control characters dropped, at most
/// 64 characters).
fn common_name(subject: &Name) -> Option<String> {
    let value = subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|attribute| attribute.oid == COMMON_NAME)
        .map(|attribute| &attribute.value)?;
    let name: String = String::from_utf8_lossy(value.value())
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect();
    Some(name)
}

/// A certificate file or a server's chain, and the earliest expiry in it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CertInfo {
    /// Where it was seen: the file's path, or `server HOST:PORT`.
    pub origin: String,
    /// The common name of the certificate expiring first (or the file name).
    pub subject_hint: String,
    pub not_after: DateTime<Utc>,
}

impl CertInfo {
    /// Days until expiry (negative once expired), fractional.
    pub fn days_left(&self, now: DateTime<Utc>) -> f64 {
        (self.not_after - now).num_seconds() as f64 / 86_400.0
    }

    pub fn expiry(&self, now: DateTime<Utc>) -> Expiry {
        let days = (self.not_after - now).num_days();
        if self.not_after <= now {
            Expiry::Expired {
                days_ago: (now - self.not_after).num_days(),
            }
        } else if days < WARN_DAYS {
            Expiry::Soon { days }
        } else {
            Expiry::Valid { days }
        }
    }

    /// A sentence for the log, `/health` and `outpost status`.
    pub fn describe(&self, now: DateTime<Utc>) -> String {
        let when = self.not_after.format("%Y-%m-%d %H:%M UTC");
        let what = format!("{} ({})", self.origin, self.subject_hint);
        match self.expiry(now) {
            Expiry::Expired { days_ago: 0 } => format!("{what} expired today ({when})"),
            Expiry::Expired { days_ago } => {
                format!("{what} EXPIRED {} ago ({when})", plural_days(days_ago))
            }
            Expiry::Soon { days: 0 } => format!("{what} expires today ({when})"),
            Expiry::Soon { days } | Expiry::Valid { days } => {
                format!("{what} expires in {} ({when})", plural_days(days))
            }
        }
    }
}

fn plural_days(n: i64) -> String {
    if n == 1 {
        "1 day".into()
    } else {
        format!("{n} days")
    }
}

/// Where a certificate stands relative to [`WARN_DAYS`] (whole days, rounded down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Valid { days: i64 },
    Soon { days: i64 },
    Expired { days_ago: i64 },
}

/// Reads every certificate in a PEM file: the one expiring first.
pub fn inspect_file(path: &Path) -> Result<CertInfo, String> {
    let certs = read_certs(path)?;
    let mut earliest: Option<ParsedCert> = None;
    for (i, cert) in certs.iter().enumerate() {
        let parsed = parse_certificate(cert)
            .map_err(|e| format!("{}: certificate {}: {e}", path.display(), i + 1))?;
        let earlier = match &earliest {
            Some(e) => parsed.not_after < e.not_after,
            None => true,
        };
        if earlier {
            earliest = Some(parsed);
        }
    }
    let earliest = earliest.ok_or_else(|| format!("{} contains no certificate", path.display()))?;
    Ok(CertInfo {
        origin: path.display().to_string(),
        subject_hint: earliest.common_name.unwrap_or_else(|| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        }),
        not_after: earliest.not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{at, cert_expiring};
    use super::*;

    #[test]
    fn not_after_utc_time_and_generalized_time() {
        // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 (RFC 5280).
        for when in [
            "2031-05-06T07:08:09Z",
            "2049-12-31T23:59:59Z",
            "2050-01-01T00:00:00Z",
            "2101-02-03T04:05:06Z",
            "1999-03-04T05:06:07Z",
        ] {
            let (cert, _) = cert_expiring(at(when), "central-ca");
            let parsed = parse_certificate(cert.der()).unwrap();
            assert_eq!(parsed.not_after, at(when), "{when}");
            assert_eq!(parsed.common_name.as_deref(), Some("central-ca"));
        }
    }

    #[test]
    fn truncated_and_garbage_der_is_an_error_not_a_panic() {
        let (cert, _) = cert_expiring(at("2031-05-06T07:08:09Z"), "x");
        let der = cert.der().to_vec();
        for len in 0..der.len() {
            // Cutting the outer SEQUENCE short always fails its length check.
            assert!(parse_certificate(&der[..len]).is_err(), "{len}");
        }
        for garbage in [
            &b""[..],
            b"\x30",
            b"\x30\x80\x00\x00",
            b"\x30\x85\xff\xff\xff\xff\xff",
            b"\x30\x84\xff\xff\xff\xff",
            b"\x30\x03\x30\x01\x00",
            b"-----BEGIN CERTIFICATE-----",
        ] {
            assert!(parse_certificate(garbage).is_err(), "{garbage:?}");
        }
        // Every single-byte corruption either parses or errors: never panics.
        let mut corrupt = der.clone();
        for i in 0..corrupt.len() {
            for b in [0x00, 0x17, 0x18, 0x30, 0x80, 0x84, 0xff] {
                let old = corrupt[i];
                corrupt[i] = b;
                let _ = parse_certificate(&corrupt);
                corrupt[i] = old;
            }
        }
    }

    /// notAfter as UTCTime `YYMMDDHHMMSSZ` (years below 50 are 20YY, RFC 5280) or
    /// GeneralizedTime `YYYYMMDDHHMMSSZ`; anything else is an error.
    #[test]
    fn times_are_checked() {
        const UTC_TIME: u8 = 0x17;
        const GENERALIZED_TIME: u8 = 0x18;
        let parse_time = |tag: u8, bytes: &[u8]| {
            let mut der = vec![tag, bytes.len() as u8];
            der.extend_from_slice(bytes);
            Time::from_der(&der)
                .map_err(|e| e.to_string())
                .and_then(|t| not_after(&t))
        };
        assert_eq!(
            parse_time(UTC_TIME, b"491231235959Z").unwrap(),
            at("2049-12-31T23:59:59Z")
        );
        assert_eq!(
            parse_time(UTC_TIME, b"700101000000Z").unwrap(),
            at("1970-01-01T00:00:00Z")
        );
        assert_eq!(
            parse_time(GENERALIZED_TIME, b"20310506070809Z").unwrap(),
            at("2031-05-06T07:08:09Z")
        );
        for (tag, bad) in [
            (UTC_TIME, &b"491331235959Z"[..]),
            (UTC_TIME, b"490230000000Z"),
            (UTC_TIME, b"4912312359590"),
            (UTC_TIME, b"49123123595Z"),
            (UTC_TIME, b"4912312359+9Z"),
            (UTC_TIME, b"49123123596\xffZ"),
            // Before 1970: no certificate the agent meets expired then.
            (UTC_TIME, b"500101000000Z"),
            (GENERALIZED_TIME, b"2031050607080Z"),
            (GENERALIZED_TIME, b"20310506070809.5Z"),
            (0x04, b"491231235959Z"),
        ] {
            assert!(parse_time(tag, bad).is_err(), "{bad:?}");
        }
    }
}
