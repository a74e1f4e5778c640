//! Old entry point, kept only so that `health.rs` (outside this branch) compiles until
//! the merge; the only place in `tls` that reaches up to `health`. Delete this file
//! once `health` builds its check from [`certificates_health`].

use super::watch::certificates_health;
use super::x509::CertInfo;
use chrono::{DateTime, Utc};

/// The `/health` check over the recorded certificates (see [`certificates_health`]).
pub fn health_check(
    certs: &[(String, CertInfo)],
    now: DateTime<Utc>,
) -> Option<crate::health::Check> {
    certificates_health(certs, now).map(|h| crate::health::Check {
        name: "certificates".into(),
        ok: h.ok,
        detail: h.detail,
    })
}
