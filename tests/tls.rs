//! Certificate expiry (issue 7): the configured certificates' expiry in `/metrics`,
//! `/health` and `outpost status`, from the running binary.

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use support::agent::{health_check, http_get as get, wait_for_some as wait_for, Agent};
use support::{free_port, Mosquitto, Postgres, SmtpOptions, SmtpServer, TestCa};

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

/// The HTTP status of `/health` and its `certificates` check.
fn certificates_check(agent: &Agent) -> (u16, serde_json::Value) {
    let (status, health) = agent.health().unwrap();
    let check = health_check(&health, "certificates")
        .unwrap_or_else(|| panic!("{health}"))
        .clone();
    (status, check)
}

#[test]
fn certificate_expiry_is_in_metrics_health_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let (central, hooks) = (dir.path().join("central.pem"), dir.path().join("hooks.pem"));
    write_cert(&central, "central-ca", 10 * 86_400 + 3600);
    write_cert(&hooks, "hooks-ca", -3 * 86_400 - 3600);
    let port = free_port();
    let config = format!(
            "[storage]\npath = \"{db}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
             [[sources]]\ntype = \"simulated\"\nname = \"sim\"\nperiod = \"100ms\"\n\
             [sync]\nenabled = false\nurl = \"postgres://outpost@central.invalid:6432/fleet\"\n\
             ca_file = \"{central}\"\n\
             [[notifiers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"https://hooks.invalid/x\"\n\
             ca_file = \"{hooks}\"\n",
            db = dir.path().join("outpost.db").display(),
            central = central.display(),
            hooks = hooks.display(),
        );
    let mut agent = Agent::new(dir.path(), &config).start();

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
    let (status, check) = certificates_check(&agent);
    assert_eq!(status, 503, "{check}");
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
    agent.kill();

    // `outpost status` reads the same files through the configuration.
    let text = agent.status_text();
    assert!(
        text.contains("WARNING: certificate sync.ca_file:")
            && text.contains("central-ca) expires in 10 days"),
        "{text}"
    );
    assert!(
        text.contains("CERTIFICATE EXPIRED: notifiers.hook.ca_file:"),
        "{text}"
    );
    let json = agent.status_json();
    let certs = json["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2, "{json}");
    assert_eq!(certs[0]["certificate"], "sync.ca_file");
    assert_eq!(certs[0]["state"], "expiring");
    assert_eq!(certs[0]["days_left"], 10);
    assert_eq!(certs[1]["state"], "expired");
}

/// An HTTPS receiver presenting `cert`: answers 200 to every request and counts them.
/// Its runtime (and so the server) stops on drop.
struct HttpsReceiver {
    port: u16,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _runtime: tokio::runtime::Runtime,
}

impl HttpsReceiver {
    fn start(cert: &Path, key: &Path) -> HttpsReceiver {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let certs = outpost::tls::read_certs(cert).unwrap();
        let key = outpost::tls::read_private_key(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(outpost::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = requests.clone();
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, counter) = (acceptor.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Headers, then as much body as Content-Length says.
                    let complete = |r: &[u8]| {
                        let text = String::from_utf8_lossy(r);
                        let Some((head, body)) = text.split_once("\r\n\r\n") else {
                            return false;
                        };
                        let length = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        body.len() >= length
                    };
                    while !complete(&request) {
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = tls
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        HttpsReceiver {
            port,
            requests,
            _runtime: runtime,
        }
    }
}

#[test]
fn certificates_presented_by_servers_are_recorded_and_saved_for_status() {
    let ca = TestCa::new();
    let broker = Mosquitto::builder().tls(&ca).start();
    let pg = Postgres::builder().tls(&ca).start();
    let smtp = SmtpServer::start(SmtpOptions::new().starttls(&ca));
    // The webhook's server certificate expires in 10 days: warned about ahead.
    let (hook_cert, hook_key) = ca.issue_server_cert_expiring(
        "hook",
        &["localhost", "127.0.0.1"],
        Duration::from_secs(10 * 86_400 + 3600),
    );
    let hook = HttpsReceiver::start(&hook_cert, &hook_key);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let ca_file = ca.ca_pem().display();
    let config = format!(
        r#"
[agent]
gateway_id = "tls-gw"
[storage]
path = "{db}"
[http]
listen = "127.0.0.1:{port}"
[[sources]]
type = "simulated"
name = "sim"
devices = ["sim-1"]
period = "200ms"
[[sources.metrics]]
name = "temperature"
base = 20.0
[[sources]]
type = "chirpstack"
name = "cs"
application_id = "app"
[sources.broker]
host = "127.0.0.1"
port = {mqtt}
tls = true
ca_file = "{ca_file}"
[sync]
enabled = true
url = "postgres://outpost@127.0.0.1:{pg_port}/outpost"
password = "{pg_password}"
sslmode = "verify-full"
ca_file = "{ca_file}"
[[alerts]]
name = "warm"
kind = "threshold"
metric = "temperature"
above = 10.0
notifiers = ["hook", "mail"]
[[notifiers]]
name = "hook"
type = "webhook"
url = "https://127.0.0.1:{hook}/alerts"
ca_file = "{ca_file}"
[[notifiers]]
name = "mail"
type = "email"
server = "localhost"
port = {smtp}
tls = "starttls"
ca_file = "{ca_file}"
from = "outpost@example.com"
to = ["ops@example.com"]
"#,
        db = dir.path().join("outpost.db").display(),
        mqtt = broker.tls_port(),
        pg_port = pg.port(),
        pg_password = pg.password(),
        hook = hook.port,
        smtp = smtp.port(),
    );
    let mut agent = Agent::new(dir.path(), &config).start();

    // Each connecting section appears once its server showed its certificate: the
    // broker and PostgreSQL at connect, the mail server through the probe at start,
    // the webhook when the alert's notification is delivered.
    let labels = [
        "sources.cs.broker",
        "sync",
        "notifiers.mail",
        "notifiers.hook",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let metrics = loop {
        let (status, body) = get(port, "/metrics").unwrap_or_default();
        let all = labels.iter().all(|l| {
            body.contains(&format!(
                "outpost_tls_certificate_expiry_days{{certificate=\"{l}\"}}"
            ))
        });
        if status == 200 && all {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline && agent.is_running(),
            "not every server certificate was recorded:\n{body}\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(hook.requests.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let days = |label: &str| {
        gauge(
            &metrics,
            &format!("outpost_tls_certificate_expiry_days{{certificate=\"{label}\"}}"),
        )
        .unwrap_or_else(|| panic!("{label}: {metrics}"))
    };
    assert!((9.9..10.2).contains(&days("notifiers.hook")), "{metrics}");
    for label in ["sources.cs.broker", "sync", "notifiers.mail"] {
        assert!(days(label) > 20_000.0, "{label}: {metrics}");
    }

    // /health names the server whose certificate expires soon (ok: not expired yet).
    let (_, check) = certificates_check(&agent);
    assert_eq!(check["ok"], true, "{check}");
    let detail = check["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!(
            "notifiers.hook: server 127.0.0.1:{} (localhost) expires in 10 days",
            hook.port
        )),
        "{detail}"
    );

    // `outpost status` (another process) reads what the agent saved, while it runs.
    let text = agent.status_text();
    assert!(
        text.contains("WARNING: certificate notifiers.hook: server 127.0.0.1:")
            && text.contains("expires in 10 days"),
        "{text}"
    );
    let json = agent.status_json();
    let certs = json["certificates"].as_array().unwrap();
    for label in labels {
        let cert = certs
            .iter()
            .find(|c| c["certificate"] == label && c.get("server").is_some())
            .unwrap_or_else(|| panic!("{label}: {json:#}"));
        let expected = if label == "notifiers.hook" {
            "expiring"
        } else {
            "ok"
        };
        assert_eq!(cert["state"], expected, "{cert}");
    }
    // The configured CA file is listed as well, by its key.
    assert!(
        certs
            .iter()
            .any(|c| c["certificate"] == "sync.ca_file" && c.get("path").is_some()),
        "{json:#}"
    );
    agent.kill();
}
