//! Tests of whole configuration files: what the sections declare once assembled (the
//! components test their own sections; these need the aggregate [`Config`]).

use super::Config;
use crate::tls::test_support::{at, cert_expiring};

#[test]
fn every_section_that_connects_to_a_server_has_a_label() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{db}\"\n\
             [[sources]]\ntype = \"chirpstack\"\nname = \"cs\"\napplication_id = \"app\"\n\
             [sources.broker]\nhost = \"localhost\"\n\
             [sync]\nurl = \"postgres://outpost@central/fleet\"\n\
             [[notifiers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"https://h.example/x\"\n\
             [[notifiers]]\nname = \"journal\"\ntype = \"log\"\n",
            db = dir.path().join("o.db").display()
        ),
    )
    .unwrap();
    let config = Config::load(&config).unwrap();
    let labels: Vec<String> = crate::tls::server_labels(&config.tls_endpoints())
        .into_iter()
        .collect();
    assert_eq!(labels, ["notifiers.hook", "sources.cs.broker", "sync"]);
    assert_eq!(crate::tls::url_peer("https://h.example/x"), "h.example:443");
    assert_eq!(
        crate::tls::url_peer("http://10.0.0.2:8080/x"),
        "10.0.0.2:8080"
    );
    assert_eq!(crate::tls::url_peer("not a url"), "not a url");
}

#[test]
fn configured_files_are_labelled_by_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ca.pem");
    let (cert, key) = cert_expiring(at("2040-01-01T00:00:00Z"), "ca");
    std::fs::write(&pem, cert.pem()).unwrap();
    let key_path = dir.path().join("key.pem");
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let config = dir.path().join("outpost.toml");
    let p = pem.display();
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{db}\"\n\
             [[sources]]\ntype = \"mqtt\"\nname = \"local\"\ntopics = [\"s/+/json\"]\n\
             device_segment = 1\n[sources.broker]\nhost = \"127.0.0.1\"\nca_file = \"{p}\"\n\
             client_cert_file = \"{p}\"\nclient_key_file = \"{k}\"\n\
             [sync]\nurl = \"postgres://u@h/d\"\nca_file = \"{p}\"\n",
            db = dir.path().join("o.db").display(),
            k = key_path.display(),
        ),
    )
    .unwrap();
    let config = Config::load(&config).unwrap_or_else(|e| panic!("{e}"));
    let labels: Vec<String> = crate::tls::configured_cert_files(&config.tls_endpoints())
        .into_iter()
        .map(|(label, path)| {
            assert_eq!(path, pem);
            label
        })
        .collect();
    assert_eq!(
        labels,
        [
            "sources.local.broker.ca_file",
            "sources.local.broker.client_cert_file",
            "sync.ca_file"
        ]
    );
    let status = crate::tls::status_of(&config.tls_endpoints(), at("2039-12-22T00:00:00Z"));
    assert!(status.iter().all(|s| s.state == "expiring"), "{status:?}");
    assert_eq!(crate::tls::status_lines(&status).len(), 3);
    assert!(crate::tls::status_lines(&crate::tls::status_of(
        &config.tls_endpoints(),
        at("2030-01-01T00:00:00Z")
    ))
    .is_empty());
}

#[test]
fn the_config_file_reports_sync_problems_with_lines_and_reads_password_files() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("db-password");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let path = dir.path().join("outpost.toml");
    std::fs::write(
        &path,
        format!(
            "[agent]\ngateway_id = \"gw-1\"\n[sync]\nurl = \"postgres://outpost@db.example/fleet\"\n\
             password_file = \"{}\"\nsslmode = \"verify-maybe\"\n",
            secret.display()
        ),
    )
    .unwrap();
    let errors = Config::load(&path).unwrap_err().to_string();
    assert!(errors.contains("outpost.toml:6: sync.sslmode"), "{errors}");

    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("verify-maybe", "disable");
    std::fs::write(&path, text).unwrap();
    let config = Config::load(&path).unwrap();
    let sync = config.sync.clone().expect("[sync] was given");
    assert_eq!(sync.password.as_ref().map(|p| p.expose()), Some("s3cret"));
    assert_eq!(sync.sslmode, crate::sync::SslMode::Disable);
    assert!(!config.to_redacted_toml().contains("s3cret"));
}

#[test]
fn escalation_steps_name_known_notifiers() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("outpost.toml");
    let text = |night: &str| {
        format!(
            "[storage]\npath = \"{db}\"\n\
             [[notifiers]]\nname = \"ops\"\ntype = \"log\"\n\
             [[notifiers]]\nname = \"night-phone\"\ntype = \"log\"\n\
             [[alerts]]\nname = \"hot\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\nnotifiers = [\"ops\"]\n\
             [[alerts.escalation]]\nafter = \"15m\"\nnotifiers = [\"{night}\"]\n\
             [[alerts.escalation]]\nafter = \"1h\"\nnotifiers = [\"ops\", \"{night}\"]\n",
            db = dir.path().join("o.db").display()
        )
    };
    std::fs::write(&config, text("night-phone")).unwrap();
    let loaded = Config::load(&config).unwrap();
    assert_eq!(loaded.alerts[0].escalation.len(), 2);
    std::fs::write(&config, text("nite-phone")).unwrap();
    let errors = Config::load(&config).unwrap_err().to_string();
    assert!(
        errors.contains("alerts[0].escalation[0].notifiers[0]")
            && errors.contains("alerts[0].escalation[1].notifiers[1]")
            && errors.contains("unknown notifier \"nite-phone\""),
        "{errors}"
    );
}
