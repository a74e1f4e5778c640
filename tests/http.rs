//! `/metrics` and `/health` of the running binary.

mod support;

use std::path::Path;
use std::time::Duration;
use support::agent::{health_check, http_get as get, wait_for_some as wait_for, Agent};
use support::free_port;

fn start(dir: &Path, port: u16, period: &str, silence: &str) -> Agent {
    let config = format!(
        "[storage]\npath = \"{}\"\n[http]\nlisten = \"127.0.0.1:{port}\"\nsource_max_silence = \"{silence}\"\n\
         [[sources]]\ntype = \"simulated\"\nname = \"sim\"\nperiod = \"{period}\"\n",
        dir.join("outpost.db").display()
    );
    Agent::new(dir, &config).start()
}

/// Checks the Prometheus/OpenMetrics text format line by line.
fn assert_prometheus_text(text: &str) {
    assert!(
        text.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    for line in text.lines() {
        if line.starts_with("# HELP ")
            || line.starts_with("# TYPE ")
            || line.starts_with("# UNIT ")
            || line == "# EOF"
        {
            continue;
        }
        let (name_labels, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        let name = name_labels.split('{').next().unwrap();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if let Some(labels) = name_labels.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(
                    labels.starts_with('{') && labels.ends_with('}'),
                    "bad labels in {line:?}"
                );
            }
        }
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[test]
fn metrics_parse_and_count_readings_and_health_is_ok() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _agent = start(dir.path(), port, "50ms", "1h");
    let metrics = wait_for(Duration::from_secs(20), || {
        let (status, body) = get(port, "/metrics")?;
        (status == 200 && metric(&body, "outpost_readings_stored_total").unwrap_or(0.0) >= 5.0)
            .then_some(body)
    });
    assert_prometheus_text(&metrics);
    assert!(
        metric(&metrics, "outpost_readings_received_total").unwrap() >= 5.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("outpost_readings_received_total{source=\"sim\"}"),
        "{metrics}"
    );
    assert!(metric(&metrics, "outpost_store_commits_total").unwrap() >= 1.0);
    assert!(metrics.contains("outpost_store_commit_duration_seconds_bucket"));
    assert!(
        metric(&metrics, "outpost_backlog_rows").unwrap() >= 5.0,
        "nothing syncs here: {metrics}"
    );
    assert_eq!(metric(&metrics, "outpost_store_disk_full"), Some(0.0));

    let (status, body) = wait_for(Duration::from_secs(20), || {
        let (status, body) = get(port, "/health")?;
        (status == 200 || body.contains("probe")).then_some((status, body))
    });
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(get(port, "/nope").unwrap().0, 404);
}

#[test]
fn health_is_503_when_a_source_is_silent_past_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // One reading at start, then nothing for an hour; the bound is 2 s.
    let _agent = start(dir.path(), port, "1h", "2s");
    let (status, body) = wait_for(Duration::from_secs(30), || {
        let (status, body) = get(port, "/health")?;
        (status == 503).then_some((status, body))
    });
    assert_eq!(status, 503);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "unhealthy");
    let check = health_check(&health, "source:sim").unwrap();
    assert_eq!(check["ok"], false);
    assert!(
        check["detail"].as_str().unwrap().contains("silent for"),
        "{check}"
    );
    let store = health_check(&health, "store").unwrap();
    assert_eq!(store["ok"], true, "{store}");
}
