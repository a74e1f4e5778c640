//! `type = "exec"`: runs a local program (a siren, a relay, a GSM modem script) with the
//! event as JSON on stdin and in `OUTPOST_*` environment variables. Exit status 0 means
//! delivered; anything else, or running past `timeout` (the program is killed), is
//! retried with backoff.
//!
//! The program runs with a minimal environment (`PATH` and the `OUTPOST_*` variables),
//! never the agent's, which may hold secrets.

use super::{BuildContext, KindConfig, Message, Outcome, Sender};
use crate::alerts::AlertEvent;
use crate::notify::template::field_value;
use crate::settings::{HumanDuration, Problems};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::process::Stdio;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExecConfig {
    /// The program, by absolute path.
    pub program: PathBuf,
    /// Its arguments (no shell: each is passed as is).
    #[serde(default)]
    pub args: Vec<String>,
    /// Killed and retried when it runs longer than this.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}

/// What a program's stderr contributes to the error message.
const STDERR_KEPT: usize = 2048;

impl KindConfig for ExecConfig {
    type Sender = Exec;

    /// A local program: no server, no certificate.
    fn tls_endpoints(&self, _label: &str) -> Vec<crate::tls::Endpoint> {
        Vec::new()
    }

    fn attempt_timeout(&self) -> std::time::Duration {
        self.timeout.get()
    }

    fn build(&self, _context: &BuildContext<'_>) -> anyhow::Result<Exec> {
        Ok(Exec::new(self))
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        if !self.program.is_absolute() {
            problems.push(
                format!("{path}.program"),
                "must be an absolute path (e.g. /usr/local/bin/siren)",
            );
        } else {
            match std::fs::metadata(&self.program) {
                Err(e) => problems.push(
                    format!("{path}.program"),
                    format!("cannot use {}: {e}", self.program.display()),
                ),
                Ok(m) => {
                    use std::os::unix::fs::PermissionsExt;
                    if !m.is_file() || m.permissions().mode() & 0o111 == 0 {
                        problems.push(
                            format!("{path}.program"),
                            format!("{} is not an executable file", self.program.display()),
                        );
                    }
                }
            }
        }
        if self.args.len() > 64 || self.args.iter().any(|a| a.len() > 4096 || a.contains('\0')) {
            problems.push(
                format!("{path}.args"),
                "at most 64 arguments of at most 4096 characters, without NUL",
            );
        }
        if self.timeout.get().is_zero() || self.timeout.get() > std::time::Duration::from_secs(600)
        {
            problems.push(
                format!("{path}.timeout"),
                "must be more than 0 and at most 10m",
            );
        }
    }
}

/// The environment given to the program.
pub fn environment(event: &AlertEvent, subject: &str, key: &str) -> Vec<(String, String)> {
    let clean = |s: String| s.replace('\0', "");
    let mut vars = vec![
        ("OUTPOST_EVENT_UID".to_string(), event.uid.clone()),
        (
            "OUTPOST_EVENT_KIND".to_string(),
            event.kind.as_str().to_string(),
        ),
        ("OUTPOST_IDEMPOTENCY_KEY".to_string(), key.to_string()),
        ("OUTPOST_SUBJECT".to_string(), clean(subject.to_string())),
        (
            "OUTPOST_VALUE".to_string(),
            event.value.map(|v| v.to_string()).unwrap_or_default(),
        ),
        (
            "OUTPOST_UNIT".to_string(),
            clean(event.unit.clone().unwrap_or_default()),
        ),
        (
            "OUTPOST_THRESHOLD".to_string(),
            event.threshold.map(|v| v.to_string()).unwrap_or_default(),
        ),
        ("OUTPOST_SINCE".to_string(), event.since.to_rfc3339()),
        ("OUTPOST_AT".to_string(), event.at.to_rfc3339()),
    ];
    for field in ["rule", "severity", "site", "device", "metric", "condition"] {
        vars.push((
            format!("OUTPOST_{}", field.to_uppercase()),
            clean(field_value(event, field)),
        ));
    }
    vars.push((
        "OUTPOST_GATEWAY_ID".to_string(),
        clean(event.gateway_id.clone()),
    ));
    vars
}

pub struct Exec {
    config: ExecConfig,
}

impl Exec {
    pub fn new(config: &ExecConfig) -> Exec {
        Exec {
            config: config.clone(),
        }
    }

    pub async fn run(&self, event: &AlertEvent, subject: &str, key: &str) -> Outcome {
        let json = match serde_json::to_vec(event) {
            Ok(j) => j,
            Err(e) => return Outcome::Failed(format!("cannot encode the event: {e}")),
        };
        let mut command = tokio::process::Command::new(&self.config.program);
        command
            .args(&self.config.args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(environment(event, subject, key))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Retry(format!(
                    "cannot start {}: {e}",
                    self.config.program.display()
                ))
            }
        };
        let stdin = child.stdin.take();
        let stderr = child.stderr.take();
        let feed = async move {
            if let Some(mut stdin) = stdin {
                // A program that does not read its input is fine: ignore a broken pipe.
                let _ = stdin.write_all(&json).await;
                let _ = stdin.shutdown().await;
            }
        };
        let collect = async move {
            let mut kept = Vec::new();
            if let Some(mut stderr) = stderr {
                let _ = (&mut stderr)
                    .take(STDERR_KEPT as u64)
                    .read_to_end(&mut kept)
                    .await;
                let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
            }
            kept
        };
        let run = async {
            let (_, kept, status) = tokio::join!(feed, collect, child.wait());
            (kept, status)
        };
        match tokio::time::timeout(self.config.timeout.get(), run).await {
            Err(_) => {
                let _ = child.start_kill();
                Outcome::Retry(format!(
                    "{} ran longer than {}; killed",
                    self.config.program.display(),
                    self.config.timeout
                ))
            }
            Ok((_, Err(e))) => Outcome::Retry(format!(
                "waiting for {}: {e}",
                self.config.program.display()
            )),
            Ok((_, Ok(status))) if status.success() => Outcome::Delivered,
            Ok((kept, Ok(status))) => {
                let stderr = String::from_utf8_lossy(&kept);
                let stderr = stderr.trim();
                Outcome::Retry(if stderr.is_empty() {
                    format!("{} exited with {status}", self.config.program.display())
                } else {
                    format!(
                        "{} exited with {status}: {stderr}",
                        self.config.program.display()
                    )
                })
            }
        }
    }
}

impl Sender for Exec {
    async fn deliver(&self, message: &Message<'_>) -> Outcome {
        self.run(message.event, &message.subject, &message.key)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::template::test_event;

    fn exec(program: &str, args: &[&str], timeout_ms: u64) -> Exec {
        Exec::new(&ExecConfig {
            program: program.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout: HumanDuration::from_millis(timeout_ms),
        })
    }

    #[tokio::test]
    async fn exit_status_decides() {
        let e = test_event("Site", "gw", chrono::Utc::now());
        assert_eq!(
            exec("/bin/true", &[], 5000).run(&e, "s", "k").await,
            Outcome::Delivered
        );
        let out = exec(
            "/bin/sh",
            &["-c", "cat >/dev/null; echo broken relay >&2; exit 3"],
            5000,
        )
        .run(&e, "s", "k")
        .await;
        assert!(
            matches!(&out, Outcome::Retry(m) if m.contains("broken relay")),
            "{out:?}"
        );
        let out = exec("/bin/sleep", &["10"], 200).run(&e, "s", "k").await;
        assert!(
            matches!(&out, Outcome::Retry(m) if m.contains("killed")),
            "{out:?}"
        );
        let out = exec("/nonexistent/siren", &[], 1000)
            .run(&e, "s", "k")
            .await;
        assert!(matches!(out, Outcome::Retry(_)));
    }

    #[tokio::test]
    async fn event_arrives_on_stdin_and_in_the_environment_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!("cat > {0}.json; env > {0}.env", out.display());
        let mut e = test_event("Site", "gw", chrono::Utc::now());
        e.device = "dev\0ice".into();
        std::env::set_var("OUTPOST_TEST_LEAK", "secret");
        assert_eq!(
            exec("/bin/sh", &["-c", &script], 5000)
                .run(&e, "subj", "uid:n")
                .await,
            Outcome::Delivered
        );
        let json: AlertEvent =
            serde_json::from_slice(&std::fs::read(format!("{}.json", out.display())).unwrap())
                .unwrap();
        assert_eq!(json, e);
        let env = std::fs::read_to_string(format!("{}.env", out.display())).unwrap();
        assert!(env.contains("OUTPOST_DEVICE=device"), "{env}");
        assert!(env.contains("OUTPOST_IDEMPOTENCY_KEY=uid:n"));
        assert!(env.contains("OUTPOST_SUBJECT=subj"));
        assert!(
            !env.contains("OUTPOST_TEST_LEAK"),
            "the agent's environment must not leak"
        );
    }

    #[test]
    fn validation() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.txt");
        std::fs::write(&data, "not a program").unwrap();
        let mut p = Problems::default();
        ExecConfig {
            program: "siren".into(),
            args: vec![],
            timeout: default_timeout(),
        }
        .validate("x", &mut p);
        ExecConfig {
            program: data,
            args: vec!["a\0b".into()],
            timeout: HumanDuration::from_secs(0),
        }
        .validate("y", &mut p);
        let keys: Vec<&str> = p.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["x.program", "y.program", "y.args", "y.timeout"]);
    }
}
