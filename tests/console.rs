//! The web console over HTTP (issue 18), against the real binary with raw requests:
//! the loopback console names the devices and takes an acknowledgement (then visible
//! on the alarm page, in `outpost status` and in the audit log); a LAN console without
//! users shows only how to add one; a LAN console with users needs a login, refuses
//! wrong passwords, forms without the session's CSRF token, a viewer's
//! acknowledgement, expired sessions and too many failed logins, and writes logins to
//! the audit log; hostile paths, query strings, methods and oversized forms get clear
//! refusals and write nothing; HTTPS. The real-browser tests are elsewhere.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::agent::{Agent, BIN};
use support::free_port;

/// One answer, as read off the socket.
#[derive(Debug)]
struct Resp {
    status: u16,
    /// (lower-case name, value)
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The session cookie this answer sets, if any.
    fn session(&self) -> Option<String> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "set-cookie")
            .filter_map(|(_, v)| v.strip_prefix("outpost_session="))
            .map(|v| v.split(';').next().unwrap_or("").to_string())
            .find(|v| !v.is_empty())
    }

    /// The CSRF token of the first form on the page.
    fn csrf(&self) -> String {
        let marker = "name=\"csrf\" value=\"";
        let start = self
            .body
            .find(marker)
            .unwrap_or_else(|| panic!("no CSRF field in {}", self.body))
            + marker.len();
        self.body[start..start + 64].to_string()
    }
}

/// The bytes of a request for `target` (raw bytes: it may be invalid UTF-8) with
/// `method`, an optional session cookie and an optional form body.
fn request(method: &str, target: &[u8], cookie: Option<&str>, form: Option<&str>) -> Vec<u8> {
    let mut request = Vec::new();
    request.extend_from_slice(method.as_bytes());
    request.push(b' ');
    request.extend_from_slice(target);
    request.extend_from_slice(b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        request.extend_from_slice(format!("Cookie: outpost_session={c}\r\n").as_bytes());
    }
    if let Some(body) = form {
        request.extend_from_slice(
            format!(
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    } else {
        request.extend_from_slice(b"\r\n");
    }
    request
}

/// Writes `request` to `stream` and reads the answer until the server closes.
fn exchange(mut stream: impl Read + Write, request: &[u8]) -> Resp {
    stream.write_all(request).expect("send");
    let mut raw = Vec::new();
    // A TLS peer may close without close_notify: what arrived counts.
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: body.to_string(),
    }
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Plain HTTP.
fn send(port: u16, method: &str, target: &[u8], cookie: Option<&str>, form: Option<&str>) -> Resp {
    exchange(connect(port), &request(method, target, cookie, form))
}

/// HTTPS, trusting only `ca` (PEM), to the name `localhost`.
fn send_tls(
    port: u16,
    ca: &Path,
    method: &str,
    target: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> Resp {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).unwrap();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let stream = rustls::StreamOwned::new(conn, connect(port));
    exchange(stream, &request(method, target.as_bytes(), cookie, form))
}

fn get(port: u16, path: &str, cookie: Option<&str>) -> Resp {
    send(port, "GET", path.as_bytes(), cookie, None)
}

fn post(port: u16, path: &str, cookie: Option<&str>, form: &str) -> Resp {
    send(port, "POST", path.as_bytes(), cookie, Some(form))
}

/// The security headers every console answer carries.
fn assert_secure(r: &Resp) {
    assert_eq!(
        r.header("content-security-policy"),
        Some("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"),
        "{r:?}"
    );
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
}

/// A simulated source: `hot` reads about 11.5 °C (above the rule's 8 °C) from 1 s on
/// for an hour, `cold` 3.5 °C; the threshold rule `warm` watches both.
fn config(dir: &Path, listen: &str, http_extra: &str) -> String {
    format!(
        "[agent]\ngateway_id = \"console-test\"\nsite = \"Console test\"\n\n\
         [storage]\npath = \"{db}\"\nbatch_max_delay = \"10ms\"\n\n\
         [http]\nlisten = \"{listen}\"\n{http_extra}\n\
         [[sources]]\ntype = \"simulated\"\nname = \"sim\"\ndevices = [\"hot-freezer\", \"cold-room\"]\nperiod = \"200ms\"\n\
         [[sources.metrics]]\nname = \"temperature\"\nunit = \"°C\"\nbase = 3.5\n\
         [sources.excursion]\ndevice = \"hot-freezer\"\nmetric = \"temperature\"\nafter = \"1s\"\nduration = \"1h\"\noffset = 8.0\n\n\
         [[alerts]]\nname = \"warm\"\nkind = \"threshold\"\nmetric = \"temperature\"\nabove = 8.0\n",
        db = dir.join("outpost.db").display()
    )
}

fn firing(agent: &Agent) -> bool {
    agent
        .try_count(
            "SELECT COUNT(*) FROM alert_state WHERE state = 'firing' AND device = 'hot-freezer'",
        )
        .unwrap_or(0)
        > 0
}

/// Nothing acknowledged: no acknowledgement on the alarm, no acknowledged event.
fn assert_not_acknowledged(agent: &Agent) {
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM alert_state WHERE acked_at IS NOT NULL"),
        0
    );
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM alert_events WHERE kind = 'acknowledged'"),
        0
    );
}

/// `outpost passwd NAME --role ROLE --stdin` with `password` on stdin.
fn passwd(args: &[&str], password: &str) -> (Option<i32>, String, String) {
    let mut child = Command::new(BIN)
        .arg("passwd")
        .args(args)
        .arg("--stdin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run outpost passwd");
    // A name refused before the password is read (e.g. "bad name") may exit before
    // this write: its status and stderr are what the caller checks, not the pipe.
    let written = child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes());
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn loopback_console_shows_devices_and_takes_an_acknowledgement() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut agent = Agent::new(
        dir.path(),
        &config(dir.path(), &format!("127.0.0.1:{port}"), ""),
    )
    .start();
    agent.wait_until("the alarm fires", || firing(&agent));

    // No login on loopback: the overview names every device, its value and the alarm.
    let overview = get(port, "/", None);
    assert_eq!(overview.status, 200, "{overview:?}");
    assert_secure(&overview);
    assert_eq!(overview.header("cache-control"), Some("no-store"));
    for text in [
        "hot-freezer",
        "cold-room",
        "°C",
        "warm",
        "firing alarm",
        "Console test",
    ] {
        assert!(overview.body.contains(text), "{text} in {}", overview.body);
    }
    let cookie = overview.session().expect("a session cookie");
    let set = overview.header("set-cookie").unwrap();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    // The live part alone, for the polling script; the assets are embedded.
    let live = get(port, "/?live=1", Some(&cookie));
    assert_eq!(live.status, 200);
    assert!(live.body.contains("hot-freezer") && !live.body.contains("<html"));
    let css = overview.body.split("href=\"/static/").nth(1).unwrap();
    let css = &css[..css.find('"').unwrap()];
    let asset = get(port, &format!("/static/{css}"), None);
    assert_eq!(asset.status, 200);
    assert!(asset
        .header("content-type")
        .unwrap()
        .starts_with("text/css"));

    // /metrics and /health are as before.
    assert_eq!(get(port, "/health", None).status, 200);
    let metrics = get(port, "/metrics", None);
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("outpost_"), "{}", metrics.body);
    assert_eq!(send(port, "POST", b"/metrics", None, Some("")).status, 405);

    // Refusals that write nothing.
    let alarms = get(port, "/alarms", Some(&cookie));
    assert_eq!(alarms.status, 200);
    assert!(alarms.body.contains("Acknowledge"), "{}", alarms.body);
    let csrf = alarms.csrf();
    let form = "rule=warm&device=hot-freezer&by=Ann&note=door+left+open";
    let no_token = post(port, "/alarms/ack", Some(&cookie), form);
    assert_eq!(no_token.status, 403, "{no_token:?}");
    assert!(no_token.body.contains("Nothing was changed"));
    let wrong = post(
        port,
        "/alarms/ack",
        Some(&cookie),
        &format!("csrf={}&{form}", "0".repeat(64)),
    );
    assert_eq!(wrong.status, 403);
    let other_session = post(port, "/alarms/ack", None, &format!("csrf={csrf}&{form}"));
    assert_eq!(other_session.status, 403, "a token without its session");
    let big = format!("csrf={csrf}&{form}&pad={}", "x".repeat(20_000));
    assert_eq!(post(port, "/alarms/ack", Some(&cookie), &big).status, 413);
    let bad_rule = post(
        port,
        "/alarms/ack",
        Some(&cookie),
        &format!("csrf={csrf}&rule=%3Cscript%3E&device=hot-freezer&by=Ann"),
    );
    assert_eq!(bad_rule.status, 400);
    assert!(!bad_rule.body.contains("<script>"));
    let long_note = post(
        port,
        "/alarms/ack",
        Some(&cookie),
        &format!(
            "csrf={csrf}&rule=warm&device=hot-freezer&by=Ann&note={}",
            "n".repeat(1001)
        ),
    );
    assert_eq!(long_note.status, 400, "{long_note:?}");
    assert!(
        long_note.body.contains("at most 1000"),
        "{}",
        long_note.body
    );
    let not_utf8 = post(
        port,
        "/alarms/ack",
        Some(&cookie),
        &format!("csrf={csrf}&by=%ff"),
    );
    assert_eq!(not_utf8.status, 400);
    for (method, target, status) in [
        ("PUT", &b"/"[..], 405),
        ("DELETE", b"/alarms", 405),
        ("GET", b"/static/../../../etc/passwd", 404),
        ("GET", b"/static/..%2f..%2f..%2fetc%2fpasswd", 404),
        ("GET", b"/%2e%2e/%2e%2e/etc/passwd", 404),
        ("GET", b"/static/console.css", 404),
        ("GET", b"/nonexistent", 404),
        ("GET", b"/%ff%fe", 404),
        ("GET", b"/?live=%ff", 400),
        ("GET", b"/alarms?ack=%zz", 400),
    ] {
        let r = send(port, method, target, Some(&cookie), None);
        assert_eq!(
            r.status,
            status,
            "{method} {}: {r:?}",
            String::from_utf8_lossy(target)
        );
        assert_secure(&r);
        assert!(!r.body.contains("root:"), "{r:?}");
    }
    let raw = send(port, "GET", b"/\xff\xfe", Some(&cookie), None);
    assert!(raw.status == 400 || raw.status == 404, "{raw:?}");
    let long = format!("/?q={}", "a".repeat(10_000));
    let r = get(port, &long, Some(&cookie));
    assert!(
        r.status == 414 || r.status == 431 || r.status == 400,
        "{}",
        r.status
    );
    let reflected = get(
        port,
        "/alarms?ack=%3Cscript%3Ealert(1)%3C/script%3E",
        Some(&cookie),
    );
    assert_eq!(reflected.status, 200);
    assert!(!reflected.body.contains("<script>alert"));
    assert_not_acknowledged(&agent);

    // The acknowledgement: on the alarm page, in `outpost status`, in the store.
    let done = post(
        port,
        "/alarms/ack",
        Some(&cookie),
        &format!("csrf={csrf}&{form}"),
    );
    assert_eq!(done.status, 303, "{done:?}");
    assert_eq!(done.header("location"), Some("/alarms?ack=applied"));
    let page = get(port, "/alarms?ack=applied", Some(&cookie));
    assert!(
        page.body
            .contains("Acknowledged by <strong>Ann</strong> (console): “door left open”"),
        "{}",
        page.body
    );
    let status = agent.status_text();
    assert!(status.contains("acknowledged by Ann"), "{status}");
    assert!(status.contains("(console): door left open"), "{status}");
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM alert_events WHERE kind = 'acknowledged' AND actor = 'Ann' AND channel = 'console'"),
        1
    );
    // In the audit log, as `outpost audit` shows it.
    assert_eq!(
        agent.strings("SELECT actor FROM audit_log WHERE kind = 'alarm.acknowledged'"),
        ["console:Ann"]
    );
    let (code, audit, err) = support::agent::outpost([
        "--config",
        agent.config_path().to_str().unwrap(),
        "audit",
        "--kind",
        "alarm.acknowledged",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        audit.contains("console:Ann") && audit.contains("door left open"),
        "{audit}"
    );
    // Once more: already acknowledged, nothing new.
    let again = post(
        port,
        "/alarms/ack",
        Some(&cookie),
        &format!("csrf={csrf}&{form}"),
    );
    assert_eq!(again.header("location"), Some("/alarms?ack=already"));
    assert_eq!(
        agent.count("SELECT COUNT(*) FROM alert_events WHERE kind = 'acknowledged'"),
        1
    );

    // The gateway page checks the file the agent was started with, as it is on disk.
    let file = agent.config_path().display().to_string();
    let gateway = get(port, "/gateway", Some(&cookie));
    assert_eq!(gateway.status, 200);
    assert!(
        gateway.body.contains(&format!("valid</span> {file}")),
        "{}",
        gateway.body
    );
    let text = std::fs::read_to_string(agent.config_path()).unwrap();
    std::fs::write(
        agent.config_path(),
        format!("{text}\n[storage]\nbogus = 1\n"),
    )
    .unwrap();
    let gateway = get(port, "/gateway", Some(&cookie));
    assert!(
        gateway.body.contains(&format!("invalid</span> {file}")),
        "{}",
        gateway.body
    );
    agent.terminate();
}

#[test]
fn lan_console_without_users_shows_how_to_add_one_and_no_data() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let agent = Agent::new(
        dir.path(),
        &config(dir.path(), &format!("0.0.0.0:{port}"), ""),
    )
    .start();
    agent.wait_until("readings", || {
        agent
            .try_count("SELECT COUNT(*) FROM readings")
            .unwrap_or(0)
            > 0
    });
    for path in [
        "/",
        "/alarms",
        "/login",
        "/device/hot-freezer",
        "/?live=1",
        "/gateway",
    ] {
        let r = get(port, path, None);
        assert_eq!(r.status, 403, "{path}: {r:?}");
        assert_secure(&r);
        assert!(r.body.contains("outpost passwd"), "{path}: {}", r.body);
        assert!(r.body.contains("[[http.users]]"));
        for secret in [
            "hot-freezer",
            "cold-room",
            "Console test",
            "console-test",
            "°C",
        ] {
            assert!(
                !r.body.contains(secret),
                "{path} shows {secret}: {}",
                r.body
            );
        }
    }
    let r = post(
        port,
        "/alarms/ack",
        None,
        "rule=warm&device=hot-freezer&by=x",
    );
    assert_eq!(r.status, 403);
    assert_eq!(get(port, "/health", None).status, 200);
    assert_eq!(get(port, "/metrics", None).status, 200);
}

#[test]
fn lan_console_needs_a_login_and_refuses_what_it_should() {
    // Hashes as an operator makes them.
    let (code, anna, err) = passwd(&["anna", "--role", "operator"], "anna-secret-1");
    assert_eq!(code, Some(0), "{err}");
    assert!(
        anna.starts_with(
            "[[http.users]]\nname = \"anna\"\nrole = \"operator\"\npassword_hash = \"$argon2id$"
        ),
        "{anna}"
    );
    let (code, victor, _) = passwd(&["victor", "--role", "viewer"], "victor-secret-1");
    assert_eq!(code, Some(0));
    let (code, _, err) = passwd(&["shorty"], "short");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("at least 8 characters"), "{err}");
    let (code, _, err) = passwd(&["bad name"], "long enough pw");
    assert_eq!(code, Some(2), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let http = format!("session_idle = \"3s\"\nsession_max = \"1h\"\n\n{anna}\n{victor}\n");
    let agent = Agent::new(
        dir.path(),
        &config(dir.path(), &format!("0.0.0.0:{port}"), &http),
    )
    .start();
    agent.wait_until("the alarm fires", || firing(&agent));
    let audit = |kind: &str| {
        agent
            .try_count(&format!(
                "SELECT COUNT(*) FROM audit_log WHERE kind = '{kind}'"
            ))
            .unwrap_or(0)
    };

    // Not logged in: to the login page; the live part says 401 (the script shows it).
    let r = get(port, "/", None);
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(r.header("location"), Some("/login"));
    assert!(!r.body.contains("hot-freezer"));
    assert_eq!(get(port, "/?live=1", None).status, 401);
    assert_eq!(get(port, "/alarms", None).status, 303);

    let login = get(port, "/login", None);
    assert_eq!(login.status, 200);
    assert_secure(&login);
    assert!(!login.body.contains("hot-freezer"));
    let anon = login.session().unwrap();
    let csrf = login.csrf();
    // Wrong password, unknown user, no token: refused and logged.
    let wrong = post(
        port,
        "/login",
        Some(&anon),
        &format!("csrf={csrf}&name=anna&password=guess"),
    );
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert!(wrong.body.contains("Wrong name or password"));
    assert!(wrong.session().is_none());
    let unknown = post(
        port,
        "/login",
        Some(&anon),
        &format!("csrf={csrf}&name=mallory&password=x"),
    );
    assert_eq!(unknown.status, 401);
    let no_token = post(
        port,
        "/login",
        Some(&anon),
        "name=anna&password=anna-secret-1",
    );
    assert_eq!(no_token.status, 403);
    assert!(no_token.session().is_none());
    assert_eq!(audit("console.login_failed"), 2);
    assert_eq!(audit("console.login"), 0);
    let details = agent
        .strings("SELECT details FROM audit_log WHERE kind = 'console.login_failed' ORDER BY id");
    assert!(details[0].contains("127.0.0.1"), "{details:?}");
    let actors = agent
        .strings("SELECT actor FROM audit_log WHERE kind = 'console.login_failed' ORDER BY id");
    assert_eq!(actors, ["console:anna", "console:mallory"]);

    // The viewer sees everything but cannot acknowledge.
    let ok = post(
        port,
        "/login",
        Some(&anon),
        &format!("csrf={csrf}&name=victor&password=victor-secret-1"),
    );
    assert_eq!(ok.status, 303, "{ok:?}");
    let viewer = ok.session().expect("a new session");
    assert_ne!(viewer, anon, "a login starts a new session");
    let set = ok.header("set-cookie").unwrap();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    assert_eq!(audit("console.login"), 1);
    assert_eq!(
        get(port, "/", Some(&anon)).status,
        303,
        "the anonymous session is gone"
    );
    let overview = get(port, "/", Some(&viewer));
    assert_eq!(overview.status, 200);
    assert!(overview.body.contains("hot-freezer") && overview.body.contains("victor (viewer)"));
    let alarms = get(port, "/alarms", Some(&viewer));
    assert!(
        alarms.body.contains("Operators can acknowledge"),
        "{}",
        alarms.body
    );
    let vcsrf = alarms.csrf();
    let r = post(
        port,
        "/alarms/ack",
        Some(&viewer),
        &format!("csrf={vcsrf}&rule=warm&device=hot-freezer&note=mine"),
    );
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("Only operators"));
    assert_not_acknowledged(&agent);

    // The operator acknowledges under their own name (a `by` field is ignored).
    let login = get(port, "/login", None);
    let (anon, csrf) = (login.session().unwrap(), login.csrf());
    let ok = post(
        port,
        "/login",
        Some(&anon),
        &format!("csrf={csrf}&name=anna&password=anna-secret-1"),
    );
    let operator = ok.session().expect("logged in");
    let ocsrf = get(port, "/alarms", Some(&operator)).csrf();
    assert_ne!(ocsrf, vcsrf, "each session has its own token");
    let r = post(
        port,
        "/alarms/ack",
        Some(&operator),
        &format!("csrf={vcsrf}&rule=warm&device=hot-freezer&note=x"),
    );
    assert_eq!(r.status, 403, "another session's token");
    assert_not_acknowledged(&agent);
    let r = post(
        port,
        "/alarms/ack",
        Some(&operator),
        &format!("csrf={ocsrf}&rule=warm&device=hot-freezer&by=someone-else&note=on+my+way"),
    );
    assert_eq!(r.status, 303, "{r:?}");
    assert_eq!(
        agent.strings("SELECT acked_by FROM alert_state WHERE acked_at IS NOT NULL"),
        ["anna"]
    );
    assert!(agent.status_text().contains("acknowledged by anna"));
    assert_eq!(
        agent.strings("SELECT actor FROM audit_log WHERE kind = 'alarm.acknowledged'"),
        ["console:anna"]
    );

    // Idle past session_idle: the session is gone, and so is its form token.
    std::thread::sleep(Duration::from_millis(3500));
    let r = get(port, "/", Some(&operator));
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/login?expired=1"));
    let r = post(port, "/logout", Some(&viewer), &format!("csrf={vcsrf}"));
    assert_eq!(r.status, 403, "an expired session's form");
    assert!(
        r.body.contains("expired") || r.body.contains("token"),
        "{}",
        r.body
    );

    // Logout ends the session.
    let login = get(port, "/login", None);
    let (anon, csrf) = (login.session().unwrap(), login.csrf());
    let ok = post(
        port,
        "/login",
        Some(&anon),
        &format!("csrf={csrf}&name=victor&password=victor-secret-1"),
    );
    let s = ok.session().unwrap();
    let c = get(port, "/", Some(&s)).csrf();
    assert_eq!(
        post(port, "/logout", Some(&s), &format!("csrf={c}")).status,
        303
    );
    assert_eq!(get(port, "/", Some(&s)).status, 303);

    // Too many failures from one address: refused unchecked for a while.
    let login = get(port, "/login", None);
    let (anon, csrf) = (login.session().unwrap(), login.csrf());
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            post(
                port,
                "/login",
                Some(&anon),
                &format!("csrf={csrf}&name=anna&password=nope"),
            )
            .status,
        );
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429]);
    let r = post(
        port,
        "/login",
        Some(&anon),
        &format!("csrf={csrf}&name=anna&password=anna-secret-1"),
    );
    assert_eq!(r.status, 429, "even the right password, while blocked");
    assert!(r.header("retry-after").is_some());
    assert!(r.session().is_none());
}

#[test]
fn https_serves_the_console_metrics_and_health_with_secure_cookies() {
    let ca = support::TestCa::new();
    let (_, anna, _) = passwd(&["anna"], "anna-secret-1");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let http = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\n{anna}\n",
        ca.server_cert().display(),
        ca.server_key().display()
    );
    let agent = Agent::new(
        dir.path(),
        &config(dir.path(), &format!("0.0.0.0:{port}"), &http),
    )
    .start();
    agent.wait_until("readings", || {
        agent
            .try_count("SELECT COUNT(*) FROM readings")
            .unwrap_or(0)
            > 0
    });
    let pem = ca.ca_pem();
    let health = send_tls(port, pem, "GET", "/health", None, None);
    assert_eq!(health.status, 200, "{health:?}");
    let metrics = send_tls(port, pem, "GET", "/metrics", None, None);
    // The certificate joins the certificate watch.
    assert!(
        metrics.body.contains("certificate=\"http.tls_cert_file\""),
        "{}",
        metrics.body
    );
    let login = send_tls(port, pem, "GET", "/login", None, None);
    assert_eq!(login.status, 200);
    assert!(login.header("set-cookie").unwrap().ends_with("; Secure"));
    let (anon, csrf) = (login.session().unwrap(), login.csrf());
    let ok = send_tls(
        port,
        pem,
        "POST",
        "/login",
        Some(&anon),
        Some(&format!("csrf={csrf}&name=anna&password=anna-secret-1")),
    );
    assert_eq!(ok.status, 303, "{ok:?}");
    assert!(ok
        .header("set-cookie")
        .unwrap()
        .contains("HttpOnly; SameSite=Strict; Secure"));
    let overview = send_tls(port, pem, "GET", "/", ok.session().as_deref(), None);
    assert!(overview.body.contains("hot-freezer"), "{}", overview.body);
    // Plain HTTP on the HTTPS port gets no answer.
    let mut plain = connect(port);
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    let _ = plain.read_to_end(&mut raw);
    assert!(!String::from_utf8_lossy(&raw).contains("HTTP/1.1 200"));
}
