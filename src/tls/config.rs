//! rustls configuration: PEM certificate and key files, root stores (a CA file and/or
//! the system's roots), and client configurations on the ring provider (never aws-lc:
//! it does not cross-build cleanly) whose verifier records what servers present.

use super::watch::{recording, CertRecorder};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// The crypto provider every TLS connection of the agent uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration builder on [`provider`] with the safe protocol versions.
pub fn builder(
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, String> {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))
}

/// Every certificate in a PEM file (at least one).
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} contains no PEM certificate", path.display()));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| format!("{} is not a PEM key file: {e}", path.display()))?
        .ok_or_else(|| format!("{} contains no PEM private key", path.display()))
}

/// The trusted roots: every certificate of `ca_file` (each must be usable), plus the
/// system's roots when `use_system_roots` (unparsable system certificates are skipped).
/// The store may be empty; callers decide whether that is an error.
pub fn root_store(
    ca_file: Option<&Path>,
    use_system_roots: bool,
) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        for cert in read_certs(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
        }
    }
    if use_system_roots {
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
    }
    Ok(roots)
}

/// The standard (WebPKI) verifier of server certificates against `roots`.
pub fn webpki_verifier(
    roots: rustls::RootCertStore,
) -> Result<Arc<rustls::client::WebPkiServerVerifier>, String> {
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| format!("cannot use the CA certificates: {e}"))
}

/// Mozilla's public roots as bundled (what lettre and reqwest trust by default), plus
/// every certificate of `ca_file`: for mail and webhook servers, which are usually
/// public.
pub fn public_roots_with(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = root_store(ca_file, false)?;
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    Ok(roots)
}

/// A client configuration trusting `roots`, with a client certificate chain and its key
/// when `client_auth` is given, recording the server's certificate with `recorder`.
/// Errors name the key at fault (`client_cert_file`, `client_key_file`, `ca_file`,
/// `tls`).
pub fn client_config(
    roots: rustls::RootCertStore,
    client_auth: Option<(&Path, &Path)>,
    recorder: Option<CertRecorder>,
) -> Result<rustls::ClientConfig, (&'static str, String)> {
    let verifier = webpki_verifier(roots).map_err(|e| ("ca_file", e))?;
    let builder = builder()
        .map_err(|e| ("tls", e))?
        .dangerous()
        .with_custom_certificate_verifier(recording(verifier, recorder));
    match client_auth {
        Some((cert_path, key_path)) => {
            let certs = read_certs(cert_path).map_err(|e| ("client_cert_file", e))?;
            let key = read_private_key(key_path).map_err(|e| ("client_key_file", e))?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                (
                    "client_key_file",
                    format!("does not match client_cert_file: {e}"),
                )
            })
        }
        None => Ok(builder.with_no_client_auth()),
    }
}
