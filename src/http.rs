//! The local HTTP endpoint (default `127.0.0.1:9464`): `/metrics` in Prometheus text
//! format and `/health` as JSON (200 or 503 with the reasons).

use crate::health::HealthProbe;
use crate::metrics::Metrics;
use crate::settings::{HumanDuration, Problems};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// `[http]`: the metrics and health endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve `/metrics` and `/health`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Address and port. Keep it on 127.0.0.1 unless a firewall protects the port:
    /// the endpoint has no authentication.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `/health` reports a source unhealthy when it has not produced a reading for this
    /// long (a source that reports itself connected is healthy regardless).
    #[serde(default = "default_source_max_silence")]
    pub source_max_silence: HumanDuration,
    /// A stage (a source, the store writer, the alert engine, the notification
    /// outbox, central sync) with work waiting and no progress for this long, and no
    /// known reason such as a full disk or an unreachable server, is *stalled*:
    /// `/health` fails naming it, the log says so at ERROR and the systemd watchdog is
    /// no longer fed, so systemd restarts the agent (G9).
    #[serde(default = "default_stall_after")]
    pub stall_after: HumanDuration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: default_listen(),
            source_max_silence: default_source_max_silence(),
            stall_after: default_stall_after(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_listen() -> String {
    "127.0.0.1:9464".into()
}
fn default_source_max_silence() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
fn default_stall_after() -> HumanDuration {
    HumanDuration::from_secs(crate::progress::DEFAULT_STALL_AFTER.as_secs())
}

/// Bounds of `http.stall_after`: long enough for a slow SD-card commit, short enough
/// that systemd restarts a stalled agent the same day.
pub const STALL_AFTER_MIN: std::time::Duration = std::time::Duration::from_secs(1);
pub const STALL_AFTER_MAX: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

impl HttpConfig {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(
                format!("{path}.listen"),
                format!(
                    "expected an address and port like \"127.0.0.1:9464\", found {:?}",
                    self.listen
                ),
            );
        }
        if self.source_max_silence.get() < std::time::Duration::from_secs(1) {
            problems.push(format!("{path}.source_max_silence"), "must be at least 1s");
        }
        let stall_after = self.stall_after.get();
        if !(STALL_AFTER_MIN..=STALL_AFTER_MAX).contains(&stall_after) {
            problems.push(format!("{path}.stall_after"), "must be between 1s and 24h");
        }
    }
}

/// At most this many connections are served at once; others wait in the kernel's
/// accept queue.
const MAX_CONNECTIONS: usize = 16;

/// Binds `listen` and serves until `shutdown`. A busy port does not stop the agent
/// (collecting data matters more than showing it): the error is logged and binding is
/// retried every 30 s.
pub async fn run(
    listen: String,
    metrics: Metrics,
    health: Arc<HealthProbe>,
    shutdown: CancellationToken,
) {
    let mut logged = false;
    let listener = loop {
        match tokio::net::TcpListener::bind(&listen).await {
            Ok(l) => break l,
            Err(e) => {
                if !logged {
                    logged = true;
                    tracing::error!(listen = %listen, error = %e, "Cannot listen for /metrics and /health; retrying every 30 s.");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
                }
            }
        }
    };
    tracing::info!(listen = %listen, "Serving /metrics and /health.");
    serve(listener, metrics, health, shutdown).await
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Arc<HealthProbe>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "Accepting an HTTP connection failed.");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (metrics, health, token) = (metrics.clone(), health.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (metrics, health) = (metrics.clone(), health.clone());
                async move { Ok::<_, std::convert::Infallible>(route(req, &metrics, &health).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = token.cancelled() => {}
                _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
            }
            drop(permit);
        });
    }
}

async fn route<B>(
    req: Request<B>,
    metrics: &Metrics,
    health: &HealthProbe,
) -> Response<Full<Bytes>> {
    let respond = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if req.method() != hyper::Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/health" => {
            let report = health.report().await;
            let status = if report.healthy() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::to_string_pretty(&report).unwrap_or_default() + "\n";
            respond(status, "application/json", body)
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /health\n".into(),
        ),
    }
}
