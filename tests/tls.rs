//! Certificate expiry (issue 7): the configured certificates' expiry in `/metrics`,
//! `/health` and `outpost status`, from the running binary.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::agent::{http_get as get, wait_for_some as wait_for, AgentProcess as Agent};
use support::free_port;

/// A self-signed certificate expiring `seconds` from now (negative: in the past).
fn write_cert(path: &Path, cn: &str, seconds: i64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    // rcgen's time type is not re-exported: count from the epoch.
    params.not_after =
        rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs((now + seconds) as u64);
    let key = rcgen::KeyPair::generate().unwrap();
    std::fs::write(path, params.self_signed(&key).unwrap().pem()).unwrap();
}

fn gauge(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
fn certificate_expiry_is_in_metrics_health_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let (central, hooks) = (dir.path().join("central.pem"), dir.path().join("hooks.pem"));
    write_cert(&central, "central-ca", 10 * 86_400 + 3600);
    write_cert(&hooks, "hooks-ca", -3 * 86_400 - 3600);
    let port = free_port();
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{db}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             [[sources]]\ntype = \"simulated\"\nname = \"sim\"\nperiod = \"100ms\"\n\
             [sync]\nenabled = false\nurl = \"postgres://outpost@central.invalid:6432/fleet\"\n\
             ca_file = \"{central}\"\n\
             [[notifiers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"https://hooks.invalid/x\"\n\
             ca_file = \"{hooks}\"\n",
            db = dir.path().join("outpost.db").display(),
            central = central.display(),
            hooks = hooks.display(),
        ),
    )
    .unwrap();
    let agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["run", "--config"])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let metrics = wait_for(Duration::from_secs(30), || {
        let (status, body) = get(port, "/metrics")?;
        (status == 200 && body.contains("outpost_tls_certificate_expiry_days")).then_some(body)
    });
    let days = gauge(
        &metrics,
        "outpost_tls_certificate_expiry_days{certificate=\"sync.ca_file\"}",
    )
    .unwrap_or_else(|| panic!("{metrics}"));
    assert!((9.9..10.2).contains(&days), "{days}: {metrics}");
    let days = gauge(
        &metrics,
        "outpost_tls_certificate_expiry_days{certificate=\"notifiers.hook.ca_file\"}",
    )
    .unwrap_or_else(|| panic!("{metrics}"));
    assert!((-3.2..-2.9).contains(&days), "{days}: {metrics}");

    // The expired certificate makes the gateway unhealthy; the one expiring in 10
    // days is named in the detail.
    let (status, health) = get(port, "/health").unwrap();
    assert_eq!(status, 503, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).unwrap();
    let check = health["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "certificates")
        .unwrap_or_else(|| panic!("{health}"))
        .clone();
    assert_eq!(check["ok"], false, "{check}");
    let detail = check["detail"].as_str().unwrap();
    assert!(
        detail.contains("sync.ca_file") && detail.contains("expires in 10 days"),
        "{detail}"
    );
    assert!(
        detail.contains("notifiers.hook.ca_file") && detail.contains("EXPIRED 3 days ago"),
        "{detail}"
    );
    drop(agent);

    // `outpost status` reads the same files through the configuration.
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("WARNING: certificate sync.ca_file:")
            && text.contains("central-ca) expires in 10 days"),
        "{text}"
    );
    assert!(
        text.contains("CERTIFICATE EXPIRED: notifiers.hook.ca_file:"),
        "{text}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["status", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let certs = json["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2, "{json}");
    assert_eq!(certs[0]["certificate"], "sync.ca_file");
    assert_eq!(certs[0]["state"], "expiring");
    assert_eq!(certs[0]["days_left"], 10);
    assert_eq!(certs[1]["state"], "expired");
}
