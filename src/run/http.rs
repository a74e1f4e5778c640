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
    let tls = match (
        &console.config().http.tls_cert_file,
        &console.config().http.tls_key_file,
    ) {
        (Some(cert), Some(key)) => {
            let tls = Tls::new(cert.clone(), key.clone());
            let mut logged = false;
            loop {
                match tls.acceptor() {
                    Ok(_) => break,
                    Err(e) => {
                        if !logged {
                            logged = true;
                            tracing::error!(error = %e, "Cannot set up HTTPS for /metrics, /health and the console; retrying every 30 s.");
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
                        }
                    }
                }
            }
            Some(Arc::new(tls))
        }
        _ => None,
    };
    tracing::info!(listen = %listen, https = tls.is_some(), "Serving /metrics, /health and the console.");
    serve(listener, metrics, health, console, tls, shutdown).await
}

/// HTTPS: the certificate chain and key of `http.tls_cert_file` and `tls_key_file`,
/// read again when either file changes (checked at most once a minute), so a renewed
/// certificate is served without a restart.
pub struct Tls {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    current: std::sync::Mutex<Option<LoadedTls>>,
}

struct LoadedTls {
    acceptor: tokio_rustls::TlsAcceptor,
    stamps: (Option<std::time::SystemTime>, Option<std::time::SystemTime>),
    checked: std::time::Instant,
}

impl Tls {
    pub fn new(cert: std::path::PathBuf, key: std::path::PathBuf) -> Tls {
        Tls {
            cert,
            key,
            current: std::sync::Mutex::new(None),
        }
    }

    fn stamps(&self) -> (Option<std::time::SystemTime>, Option<std::time::SystemTime>) {
        let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (modified(&self.cert), modified(&self.key))
    }

    /// The acceptor for the files as they are now (the last good one if they became
    /// unreadable: a half-written renewal does not stop HTTPS).
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, String> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(loaded) = current.as_mut() {
            if loaded.checked.elapsed() < std::time::Duration::from_secs(60) {
                return Ok(loaded.acceptor.clone());
            }
            loaded.checked = std::time::Instant::now();
            if self.stamps() == loaded.stamps {
                return Ok(loaded.acceptor.clone());
            }
        }
        let stamps = self.stamps();
        match self.load() {
            Ok(acceptor) => {
                if current.is_some() {
                    tracing::info!(cert = %self.cert.display(), "HTTPS certificate reloaded.");
                }
                *current = Some(LoadedTls {
                    acceptor: acceptor.clone(),
                    stamps,
                    checked: std::time::Instant::now(),
                });
                Ok(acceptor)
            }
            Err(e) => match current.as_ref() {
                Some(loaded) => {
                    tracing::warn!(error = %e, "The changed HTTPS certificate cannot be used; serving the previous one.");
                    Ok(loaded.acceptor.clone())
                }
                None => Err(e),
            },
        }
    }

    fn load(&self) -> Result<tokio_rustls::TlsAcceptor, String> {
        let certs = crate::tls::read_certs(&self.cert)?;
        let key = crate::tls::read_private_key(&self.key)?;
        let config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                format!(
                    "{} and {} do not make a usable certificate and key: {e}",
                    self.cert.display(),
                    self.key.display()
                )
            })?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Arc<HealthProbe>,
    console: Arc<Console>,
    tls: Option<Arc<Tls>>,
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
        let (console, tls) = (console.clone(), tls.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (metrics, health, console) = (metrics.clone(), health.clone(), console.clone());
                async move {
                    Ok::<_, std::convert::Infallible>(
                        route(req, &metrics, &health, &console, peer.ip()).await,
                    )
                }
            });
            let serve = async move {
                let builder = hyper::server::conn::http1::Builder::new();
                match tls.map(|t| t.acceptor()) {
                    None => {
                        let _ = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    }
                    Some(Ok(acceptor)) => match acceptor.accept(stream).await {
                        Ok(stream) => {
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await;
                        }
                        Err(e) => tracing::debug!(error = %e, "TLS handshake failed."),
                    },
                    Some(Err(e)) => tracing::warn!(error = %e, "No usable HTTPS certificate."),
                }
            };
            tokio::select! {
                _ = serve => {}
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
