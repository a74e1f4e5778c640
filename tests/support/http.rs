//! `HttpReceiver`: an in-process HTTP/1.1 server (hyper 1.x) on its own
//! runtime thread that records every request and answers via a scriptable
//! handler. Works from sync tests and from `#[tokio::test]`.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

use super::util::HOST;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    /// Path plus query, e.g. `/api/v1/ingest?x=1`.
    pub path: String,
    /// Header (lower-case name, value) pairs in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// When the request head arrived.
    pub received_at: Instant,
    pub received_at_wall: SystemTime,
}

impl RecordedRequest {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The path without the query string.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }
}

#[derive(Debug, Clone)]
enum ReplyBody {
    Full(Bytes),
    /// Sent as separate chunks with a pause before every chunk but the first.
    Chunks(Vec<Bytes>, Duration),
}

/// What the handler answers.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: ReplyBody,
    delay: Duration,
    drop_connection: bool,
}

impl Reply {
    /// 200 with an empty body.
    pub fn ok() -> Self {
        Self::status(200)
    }

    /// `code` with an empty body.
    pub fn status(code: u16) -> Self {
        Reply {
            status: code,
            headers: Vec::new(),
            body: ReplyBody::Full(Bytes::new()),
            delay: Duration::ZERO,
            drop_connection: false,
        }
    }

    /// 200 with a JSON body (`content-type: application/json`).
    pub fn json(body: impl Into<String>) -> Self {
        Self::ok()
            .header("content-type", "application/json")
            .body(body.into())
    }

    /// 200 with a text/plain body.
    pub fn text(body: impl Into<String>) -> Self {
        Self::ok()
            .header("content-type", "text/plain")
            .body(body.into())
    }

    pub fn with_status(mut self, code: u16) -> Self {
        self.status = code;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = ReplyBody::Full(body.into());
        self
    }

    /// Streamed (chunked transfer-encoding) body: each chunk is its own
    /// write, with `pause` before every chunk after the first.
    pub fn chunks<B: Into<Bytes>>(mut self, chunks: Vec<B>, pause: Duration) -> Self {
        self.body = ReplyBody::Chunks(chunks.into_iter().map(Into::into).collect(), pause);
        self
    }

    /// Newline-delimited streamed body (`application/x-ndjson`), one chunk
    /// per line (each gets a trailing `\n`).
    pub fn ndjson_lines(self, lines: &[&str], pause: Duration) -> Self {
        let chunks = lines.iter().map(|l| format!("{l}\n")).collect();
        self.header("content-type", "application/x-ndjson")
            .chunks::<String>(chunks, pause)
    }

    /// Wait this long before sending the response head (simulates a slow or
    /// hanging server; the request is recorded before the wait).
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    /// Close the connection without any response (after `delay`).
    pub fn drop_connection(mut self) -> Self {
        self.drop_connection = true;
        self
    }
}

type Handler = Arc<dyn Fn(&RecordedRequest) -> Reply + Send + Sync>;

struct Shared {
    requests: Mutex<Vec<RecordedRequest>>,
    arrived: Condvar,
    handler: RwLock<Handler>,
}

struct Running {
    shutdown: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

/// A running HTTP receiver on `127.0.0.1:port`; shut down on drop.
pub struct HttpReceiver {
    port: u16,
    shared: Arc<Shared>,
    running: Option<Running>,
}

impl HttpReceiver {
    /// Answers 200 (empty body) to everything.
    pub fn start() -> Self {
        Self::start_with(|_| Reply::ok())
    }

    /// Answers with `handler`.
    pub fn start_with(handler: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind HttpReceiver");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            handler: RwLock::new(Arc::new(handler)),
        });
        let mut r = HttpReceiver {
            port,
            shared,
            running: None,
        };
        r.serve(listener);
        r
    }

    /// Replaces the handler (applies to requests arriving from now on).
    pub fn set_handler(&self, handler: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static) {
        *self.shared.handler.write().unwrap() = Arc::new(handler);
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{HOST}:{}", self.port)
    }

    /// All requests recorded so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Forget the recorded requests.
    pub fn clear(&self) {
        self.shared.requests.lock().unwrap().clear();
    }

    /// Blocks until at least `n` requests were recorded and returns them all;
    /// panics after `timeout`.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let guard = self.shared.requests.lock().unwrap();
        let (guard, res) = self
            .shared
            .arrived
            .wait_timeout_while(guard, timeout, |reqs| reqs.len() < n)
            .unwrap();
        if res.timed_out() && guard.len() < n {
            panic!(
                "HttpReceiver: expected {n} requests within {timeout:?}, got {}: {:?}",
                guard.len(),
                guard
                    .iter()
                    .map(|r| format!("{} {}", r.method, r.path))
                    .collect::<Vec<_>>()
            );
        }
        guard.clone()
    }

    /// Async variant for `#[tokio::test]` (does not block the runtime).
    pub async fn wait_for_requests_async(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            let reqs = self.requests();
            if reqs.len() >= n {
                return reqs;
            }
            if Instant::now() >= deadline {
                panic!(
                    "HttpReceiver: expected {n} requests within {timeout:?}, got {}",
                    reqs.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops listening and drops open connections (clients see refused connections).
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            let _ = r.shutdown.send(());
            let _ = r.thread.join();
        }
    }

    /// Listens again on the same port after `stop()`; recorded requests are kept.
    pub fn start_again(&mut self) {
        assert!(self.running.is_none(), "HttpReceiver is already running");
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("HttpReceiver: rebind {addr}: {e}"),
            }
        };
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).unwrap();
        let (tx, rx) = oneshot::channel();
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("http-receiver-{}", self.port))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("HttpReceiver runtime");
                rt.block_on(accept_loop(listener, shared, rx));
                // Dropping the runtime cancels all connection tasks.
            })
            .expect("spawn HttpReceiver thread");
        self.running = Some(Running {
            shutdown: tx,
            thread,
        });
    }
}

impl Drop for HttpReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(req, shared.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    }
}

type RespBody = UnsyncBoxBody<Bytes, Infallible>;

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<RespBody>, std::io::Error> {
    let received_at = Instant::now();
    let received_at_wall = SystemTime::now();
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let rec = RecordedRequest {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".to_string()),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
        received_at,
        received_at_wall,
    };
    let handler = shared.handler.read().unwrap().clone();
    // A panicking handler must not kill the server thread: answer 500.
    let reply = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(&rec)))
        .unwrap_or_else(|_| Reply::status(500).body("handler panicked"));
    {
        let mut reqs = shared.requests.lock().unwrap();
        reqs.push(rec);
        shared.arrived.notify_all();
    }
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    if reply.drop_connection {
        return Err(std::io::Error::other("reply: drop connection"));
    }
    let body: RespBody = match reply.body {
        ReplyBody::Full(b) => Full::new(b).boxed_unsync(),
        ReplyBody::Chunks(chunks, pause) => {
            let stream = futures_util::stream::iter(chunks.into_iter().enumerate()).then(
                move |(i, chunk)| async move {
                    if i > 0 && !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                    Ok::<_, Infallible>(Frame::data(chunk))
                },
            );
            BodyExt::boxed_unsync(StreamBody::new(stream))
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() =
        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in reply.headers {
        if let (Ok(k), Ok(v)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_str(&v),
        ) {
            resp.headers_mut().append(k, v);
        }
    }
    Ok(resp)
}
