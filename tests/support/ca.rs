//! `TestCa`: a throw-away certificate authority (rcgen, ECDSA P-256) that
//! writes PEM files into its own temporary directory.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

use super::util::temp_dir;

/// Names every server certificate of a `TestCa` is valid for.
pub const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];

pub struct TestCa {
    dir: tempfile::TempDir,
    ca_cert: Certificate,
    ca_key: KeyPair,
    ca_pem: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca_pem: PathBuf,
}

fn ca_pair(common_name: &str) -> (Certificate, KeyPair) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Outpost tests");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2099, 12, 31);
    let key = KeyPair::generate().expect("generate CA key");
    let cert = params.self_signed(&key).expect("self-sign CA");
    (cert, key)
}

fn write(path: &Path, contents: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod PEM file");
}

impl TestCa {
    /// A new CA plus a server certificate for `localhost` + `127.0.0.1`, a
    /// client certificate (CN `outpost-client`) and an unrelated second CA.
    pub fn new() -> Self {
        let dir = temp_dir("ca");
        // Readable for peers that run as another user (they copy what they need).
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        }
        let (ca_cert, ca_key) = ca_pair("Outpost Test CA");
        let (other_cert, _other_key) = ca_pair("Unrelated Test CA");

        let ca_pem = dir.path().join("ca.pem");
        write(&ca_pem, &ca_cert.pem(), 0o644);
        let other_ca_pem = dir.path().join("other-ca.pem");
        write(&other_ca_pem, &other_cert.pem(), 0o644);

        let ca = TestCa {
            server_cert: dir.path().join("server.pem"),
            server_key: dir.path().join("server.key"),
            client_cert: dir.path().join("client.pem"),
            client_key: dir.path().join("client.key"),
            dir,
            ca_cert,
            ca_key,
            ca_pem,
            other_ca_pem,
        };
        let (cert, key) = ca.issue(
            &SERVER_NAMES,
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        write(&ca.server_cert, &cert, 0o644);
        write(&ca.server_key, &key, 0o600);
        let (cert, key) = ca.issue(&[], "outpost-client", ExtendedKeyUsagePurpose::ClientAuth);
        write(&ca.client_cert, &cert, 0o644);
        write(&ca.client_key, &key, 0o600);
        ca
    }

    /// Issues a certificate signed by this CA; returns (cert PEM, key PEM).
    fn issue(&self, names: &[&str], cn: &str, eku: ExtendedKeyUsagePurpose) -> (String, String) {
        self.issue_expiring(names, cn, eku, None)
    }

    /// As `issue`, expiring `expires_in` from now (default: 2099).
    fn issue_expiring(
        &self,
        names: &[&str],
        cn: &str,
        eku: ExtendedKeyUsagePurpose,
        expires_in: Option<std::time::Duration>,
    ) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = match expires_in {
            // rcgen's time type is not re-exported: count from the epoch.
            Some(d) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock after 1970");
                date_time_ymd(1970, 1, 1) + (now + d)
            }
            None => date_time_ymd(2099, 12, 31),
        };
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign leaf certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// Issues an extra server certificate for `names` into `<dir>/<stem>.pem`
    /// and `<dir>/<stem>.key`; returns (cert path, key path).
    pub fn issue_server_cert(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        self.write_server_cert(stem, names, None)
    }

    /// As `issue_server_cert`, expiring `expires_in` from now.
    pub fn issue_server_cert_expiring(
        &self,
        stem: &str,
        names: &[&str],
        expires_in: std::time::Duration,
    ) -> (PathBuf, PathBuf) {
        self.write_server_cert(stem, names, Some(expires_in))
    }

    fn write_server_cert(
        &self,
        stem: &str,
        names: &[&str],
        expires_in: Option<std::time::Duration>,
    ) -> (PathBuf, PathBuf) {
        let (cert, key) = self.issue_expiring(
            names,
            names.first().copied().unwrap_or(stem),
            ExtendedKeyUsagePurpose::ServerAuth,
            expires_in,
        );
        let cert_path = self.dir.path().join(format!("{stem}.pem"));
        let key_path = self.dir.path().join(format!("{stem}.key"));
        write(&cert_path, &cert, 0o644);
        write(&key_path, &key, 0o600);
        (cert_path, key_path)
    }

    /// The CA certificate (PEM) clients should trust.
    pub fn ca_pem(&self) -> &Path {
        &self.ca_pem
    }
    /// The CA certificate as a PEM string.
    pub fn ca_pem_string(&self) -> String {
        self.ca_cert.pem()
    }
    /// Server certificate (PEM, leaf only) for `localhost` and `127.0.0.1`.
    pub fn server_cert(&self) -> &Path {
        &self.server_cert
    }
    /// Server private key (PKCS#8 PEM, mode 0600).
    pub fn server_key(&self) -> &Path {
        &self.server_key
    }
    /// Client certificate (PEM, CN `outpost-client`, clientAuth).
    pub fn client_cert(&self) -> &Path {
        &self.client_cert
    }
    /// Client private key (PKCS#8 PEM).
    pub fn client_key(&self) -> &Path {
        &self.client_key
    }
    /// An unrelated CA certificate: trusting only this must fail verification.
    pub fn wrong_ca_pem(&self) -> &Path {
        &self.other_ca_pem
    }
    /// The directory holding all PEM files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}
