//! The local HTTP endpoint (default `127.0.0.1:9464`): `/metrics` in Prometheus text
//! format, `/health` as JSON (200 or 503 with the reasons), and every other path to
//! the web console ([`crate::run::console`]), over HTTPS when `http.tls_cert_file` is
//! set.

pub use crate::config::http::{HttpConfig, STALL_AFTER_MAX, STALL_AFTER_MIN};
use crate::metrics::Metrics;
use crate::run::console::Console;
use crate::run::health::HealthProbe;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

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
    console: Arc<Console>,
    shutdown: CancellationToken,
) {
    let mut logged = false;
    let listener = loop {
        match tokio::net::TcpListener::bind(&listen).await {
            Ok(l) => break l,
            Err(e) => {
                if !logged {
                    logged = true;
                    tracing::error!(listen = %listen, error = %e, "Cannot listen for /metrics, /health and the console; retrying every 30 s.");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
                }
            }
        }
    };
    tracing::info!(listen = %listen, "Serving /metrics, /health and the console.");
    serve(listener, metrics, health, console, shutdown).await
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Arc<HealthProbe>,
    console: Arc<Console>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "Accepting an HTTP connection failed.");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (metrics, health, token) = (metrics.clone(), health.clone(), shutdown.clone());
        let console = console.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (metrics, health, console) = (metrics.clone(), health.clone(), console.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        route(req, &metrics, &health, &console, peer.ip()).await,
                    )
                }
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
    console: &Arc<Console>,
    peer: std::net::IpAddr,
) -> Response<Full<Bytes>>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let respond = |status: StatusCode, content_type: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    let path = req.uri().path();
    if path != "/metrics" && path != "/health" {
        return crate::run::console::server::handle(console, req, peer).await;
    }
    if req.method() != hyper::Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".into(),
        );
    }
    if path == "/metrics" {
        respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            crate::run::collector::encode(metrics).await,
        )
    } else {
        let report = health.report().await;
        let status = if report.healthy() {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = serde_json::to_string_pretty(&report).unwrap_or_default() + "\n";
        respond(status, "application/json", body)
    }
}
