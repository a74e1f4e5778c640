//! Smoke tests for the test peers in tests/support: each starts a peer and
//! really talks to it with an independent client (CLI tools, raw sockets).

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::postgres::pg_bin;
use support::{
    port_open, HttpReceiver, Mosquitto, PgAuth, PgBouncer, Postgres, Reply, SerialLink,
    SmtpOptions, SmtpServer, TestCa,
};

fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------- TestCa

#[test]
fn test_ca_certificates_verify_with_openssl() {
    let ca = TestCa::new();
    let ok = output(
        Command::new("openssl")
            .args(["verify", "-purpose", "sslserver", "-CAfile"])
            .arg(ca.ca_pem())
            .arg(ca.server_cert()),
    );
    assert!(ok.status.success(), "{}", text(&ok));
    let client = output(
        Command::new("openssl")
            .args(["verify", "-purpose", "sslclient", "-CAfile"])
            .arg(ca.ca_pem())
            .arg(ca.client_cert()),
    );
    assert!(client.status.success(), "{}", text(&client));
    let wrong = output(
        Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(ca.wrong_ca_pem())
            .arg(ca.server_cert()),
    );
    assert!(
        !wrong.status.success(),
        "wrong CA must not verify: {}",
        text(&wrong)
    );

    let san = output(
        Command::new("openssl")
            .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
            .arg(ca.server_cert()),
    );
    let san = String::from_utf8_lossy(&san.stdout);
    assert!(san.contains("DNS:localhost"), "{san}");
    assert!(san.contains("IP Address:127.0.0.1"), "{san}");
    // The key matches the certificate.
    let pubkey =
        |args: &[&str], file: &Path| output(Command::new("openssl").args(args).arg(file)).stdout;
    assert_eq!(
        pubkey(&["x509", "-noout", "-pubkey", "-in"], ca.server_cert()),
        pubkey(&["pkey", "-pubout", "-in"], ca.server_key())
    );
}

// ---------------------------------------------------------------- Mosquitto

fn mqtt(tool: &str, port: u16, extra: &[&str]) -> Output {
    output(
        Command::new(tool)
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(extra),
    )
}

/// Publishes a retained message and reads it back with a fresh subscriber.
fn mqtt_roundtrip(port: u16, auth: &[&str], topic: &str, payload: &str) {
    let mut args = auth.to_vec();
    args.extend(["-t", topic, "-m", payload, "-r", "-q", "1"]);
    let out = mqtt("mosquitto_pub", port, &args);
    assert!(out.status.success(), "mosquitto_pub: {}", text(&out));
    let mut args = auth.to_vec();
    args.extend(["-t", topic, "-C", "1", "-W", "10"]);
    let out = mqtt("mosquitto_sub", port, &args);
    assert!(out.status.success(), "mosquitto_sub: {}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), payload);
}

#[test]
fn mosquitto_pub_sub_restart_and_outage() {
    let mut broker = Mosquitto::start();
    assert_eq!(broker.host(), "127.0.0.1");
    let port = broker.port();
    mqtt_roundtrip(port, &[], "outpost/test", "hello-1");

    broker.restart();
    assert_eq!(broker.port(), port);
    // No persistence: the retained message is gone after a restart.
    let out = mqtt(
        "mosquitto_sub",
        port,
        &["-t", "outpost/test", "-C", "1", "-W", "1"],
    );
    assert!(
        out.stdout.is_empty(),
        "retained message survived: {}",
        text(&out)
    );
    mqtt_roundtrip(port, &[], "outpost/test", "hello-2");

    broker.stop();
    assert!(!port_open(port));
    let out = mqtt("mosquitto_pub", port, &["-t", "x", "-m", "y"]);
    assert!(
        !out.status.success(),
        "publish to a stopped broker: {}",
        text(&out)
    );

    broker.start_again();
    mqtt_roundtrip(port, &[], "outpost/test", "hello-3");
}

#[test]
fn mosquitto_tls_and_password() {
    let ca = TestCa::new();
    let broker = Mosquitto::builder()
        .password("sensor", "s3cret")
        .tls(&ca)
        .start();
    let ca_file = ca.ca_pem().to_str().unwrap();
    let good = ["-u", "sensor", "-P", "s3cret"];

    // Plain listener with the password.
    mqtt_roundtrip(broker.port(), &good, "plain/t", "p1");
    // TLS listener, server verified against the test CA (by IP SAN).
    let mut tls = vec!["--cafile", ca_file];
    tls.extend(good);
    mqtt_roundtrip(broker.tls_port(), &tls, "tls/t", "t1");

    // Wrong password, no password, wrong CA: all refused.
    let out = mqtt(
        "mosquitto_pub",
        broker.port(),
        &["-u", "sensor", "-P", "nope", "-t", "x", "-m", "y"],
    );
    assert!(
        !out.status.success(),
        "wrong password accepted: {}",
        text(&out)
    );
    let out = mqtt("mosquitto_pub", broker.port(), &["-t", "x", "-m", "y"]);
    assert!(!out.status.success(), "anonymous accepted: {}", text(&out));
    let wrong_ca = ca.wrong_ca_pem().to_str().unwrap();
    let out = mqtt(
        "mosquitto_pub",
        broker.tls_port(),
        &[
            "--cafile", wrong_ca, "-u", "sensor", "-P", "s3cret", "-t", "x", "-m", "y",
        ],
    );
    assert!(!out.status.success(), "wrong CA accepted: {}", text(&out));
    // Plain MQTT against the TLS port fails too.
    let out = mqtt(
        "mosquitto_pub",
        broker.tls_port(),
        &["-u", "sensor", "-P", "s3cret", "-t", "x", "-m", "y"],
    );
    assert!(
        !out.status.success(),
        "plain MQTT on TLS port: {}",
        text(&out)
    );
}

// ---------------------------------------------------------------- Postgres

fn psql_url(url: &str, sql: &str) -> Output {
    output(
        Command::new(pg_bin("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg(url)
            .args(["-c", sql])
            .env("PGCONNECT_TIMEOUT", "5"),
    )
}

fn psql_ok(url: &str, sql: &str) -> String {
    let out = psql_url(url, sql);
    assert!(out.status.success(), "psql {url} {sql:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn postgres_scram_url_psql_and_restart() {
    let mut pg = Postgres::start();
    let url = pg.url();
    assert_eq!(
        url,
        format!(
            "postgres://outpost:outpost-pass@127.0.0.1:{}/outpost",
            pg.port()
        )
    );
    assert_eq!(
        psql_ok(&url, "select current_user || '@' || current_database()"),
        "outpost@outpost"
    );
    assert_eq!(
        pg.psql_superuser(
            "select rolpassword like 'SCRAM-SHA-256$%' from pg_authid where rolname = 'outpost'"
        ),
        "t"
    );
    let bad = url.replace("outpost-pass", "wrong");
    let out = psql_url(&bad, "select 1");
    assert!(
        !out.status.success(),
        "wrong password accepted: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("password authentication failed"),
        "{}",
        text(&out)
    );

    psql_ok(&url, "create table readings (id int primary key, v text); insert into readings values (1, 'a'), (2, 'b')");
    assert_eq!(pg.psql("select count(*) from readings"), "2");
    assert!(pg.try_psql("select * from no_such_table").is_err());

    let port = pg.port();
    pg.stop_immediate();
    assert!(!port_open(port));
    assert!(!psql_url(&url, "select 1").status.success());
    pg.start_again();
    assert_eq!(pg.port(), port);
    assert_eq!(
        psql_ok(&url, "select string_agg(v, ',' order by id) from readings"),
        "a,b"
    );
}

#[test]
fn postgres_md5_and_required_tls() {
    let ca = TestCa::new();
    let pg = Postgres::builder()
        .auth(PgAuth::Md5)
        .tls(&ca)
        .require_tls()
        .start();
    assert_eq!(
        pg.psql_superuser(
            "select rolpassword like 'md5%' from pg_authid where rolname = 'outpost'"
        ),
        "t"
    );
    let verified = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        ca.ca_pem().display()
    );
    assert_eq!(
        psql_ok(
            &verified,
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
        ),
        "t"
    );
    // localhost is in the certificate too.
    let by_name = verified.replace("@127.0.0.1:", "@localhost:");
    assert_eq!(psql_ok(&by_name, "select 1"), "1");
    let plain = format!("{}?sslmode=disable", pg.url());
    let out = psql_url(&plain, "select 1");
    assert!(
        !out.status.success(),
        "non-TLS accepted with require_tls: {}",
        text(&out)
    );
    let wrong_ca = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(),
        ca.wrong_ca_pem().display()
    );
    let out = psql_url(&wrong_ca, "select 1");
    assert!(!out.status.success(), "wrong CA accepted: {}", text(&out));
}

// ---------------------------------------------------------------- PgBouncer

#[test]
fn pgbouncer_transaction_pool_and_restart() {
    let pg = Postgres::start();
    let mut bouncer = PgBouncer::start(&pg);
    let url = bouncer.url();
    assert_ne!(bouncer.port(), pg.port());
    assert!(url.contains(&format!(":{}/outpost", bouncer.port())));
    assert_eq!(psql_ok(&url, "select 40 + 2"), "42");
    // Reached the real server through the bouncer.
    pg.psql("create table t (x int)");
    psql_ok(&url, "insert into t values (7)");
    assert_eq!(pg.psql("select sum(x) from t"), "7");

    let config = bouncer.admin_rows("SHOW CONFIG");
    let get = |key: &str| {
        config
            .iter()
            .find(|r| r["key"] == key)
            .map(|r| r["value"].clone())
            .unwrap_or_else(|| panic!("no {key} in SHOW CONFIG: {config:?}"))
    };
    assert_eq!(get("pool_mode"), "transaction");
    assert_eq!(get("default_pool_size"), "2");
    let pools = bouncer.admin_rows("SHOW POOLS");
    let pool = pools
        .iter()
        .find(|r| r["database"] == "outpost" && r["user"] == "outpost")
        .unwrap_or_else(|| panic!("no outpost pool: {pools:?}"));
    assert_eq!(pool["pool_mode"], "transaction");

    let wrong = url.replace("outpost-pass", "wrong");
    assert!(!psql_url(&wrong, "select 1").status.success());

    let port = bouncer.port();
    bouncer.stop();
    assert!(!port_open(port));
    assert!(!psql_url(&url, "select 1").status.success());
    bouncer.start_again();
    assert_eq!(psql_ok(&url, "select count(*) from t"), "1");
    bouncer.restart();
    assert_eq!(bouncer.port(), port);
    assert_eq!(psql_ok(&url, "select 1"), "1");
}

#[test]
fn pgbouncer_md5_pool_size() {
    let pg = Postgres::builder().auth(PgAuth::Md5).start();
    let bouncer = PgBouncer::builder(&pg)
        .default_pool_size(3)
        .max_client_conn(20)
        .start();
    assert_eq!(psql_ok(&bouncer.url(), "select current_user"), "outpost");
    let config = bouncer.admin_psql("SHOW CONFIG");
    assert!(config.contains("auth_type|md5"), "{config}");
    assert!(config.contains("default_pool_size|3"), "{config}");
    assert!(config.contains("max_client_conn|20"), "{config}");
}

// ---------------------------------------------------------------- SMTP

fn b64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A minimal SMTP client over TcpStream: sends `cmd` and returns the
/// complete (possibly multi-line) reply.
struct Smtp {
    r: BufReader<TcpStream>,
}

impl Smtp {
    fn connect(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect SMTP");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Smtp {
            r: BufReader::new(s),
        };
        let greeting = c.reply();
        assert!(greeting.starts_with("220"), "{greeting}");
        c
    }

    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).expect("read SMTP reply");
            assert!(!line.is_empty(), "SMTP connection closed; so far: {all}");
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    fn cmd(&mut self, cmd: &str) -> String {
        self.r
            .get_mut()
            .write_all(format!("{cmd}\r\n").as_bytes())
            .unwrap();
        self.reply()
    }
}

#[test]
fn smtp_auth_and_message_readback() {
    let mut smtp = SmtpServer::start(SmtpOptions::new().auth("mailer", "pw123"));
    let mut c = Smtp::connect(smtp.port());
    let ehlo = c.cmd("EHLO outpost.test");
    assert!(
        ehlo.contains("AUTH") && ehlo.contains("PLAIN") && ehlo.contains("LOGIN"),
        "{ehlo}"
    );
    // Unauthenticated mail is refused.
    assert!(c.cmd("MAIL FROM:<a@x>").starts_with("530"));
    let bad = c.cmd(&format!("AUTH PLAIN {}", b64(b"\0mailer\0wrong")));
    assert!(bad.starts_with("535"), "{bad}");
    let good = c.cmd(&format!("AUTH PLAIN {}", b64(b"\0mailer\0pw123")));
    assert!(good.starts_with("235"), "{good}");
    assert!(c.cmd("MAIL FROM:<outpost@gw.example>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<ops@example.com>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<oncall@example.com>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    let done = c.cmd("Subject: Alert: temp high\r\n\r\nSensor 4 reads 81 C.\r\n.");
    assert!(done.starts_with("250"), "{done}");
    assert!(c.cmd("QUIT").starts_with("221"));

    let mails = smtp.wait_for_messages(1, Duration::from_secs(10));
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].from, "outpost@gw.example");
    assert_eq!(mails[0].to, vec!["ops@example.com", "oncall@example.com"]);
    assert_eq!(mails[0].auth_user.as_deref(), Some("mailer"));
    let data = mails[0].data_str();
    assert!(data.contains("Subject: Alert: temp high"), "{data}");
    assert!(data.contains("Sensor 4 reads 81 C."), "{data}");

    // AUTH LOGIN works as well; stop/start_again keeps the mailbox.
    let port = smtp.port();
    smtp.stop();
    assert!(!port_open(port));
    smtp.start_again();
    let mut c = Smtp::connect(port);
    c.cmd("EHLO outpost.test");
    assert!(c.cmd("AUTH LOGIN").starts_with("334"));
    assert!(c.cmd(&b64(b"mailer")).starts_with("334"));
    assert!(c.cmd(&b64(b"pw123")).starts_with("235"));
    assert!(c.cmd("MAIL FROM:<b@x>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<c@y>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    assert!(c.cmd("Subject: two\r\n\r\nsecond\r\n.").starts_with("250"));
    let mails = smtp.wait_for_messages(2, Duration::from_secs(10));
    assert_eq!(mails[1].from, "b@x");
    assert_eq!(mails[0].from, "outpost@gw.example");
}

/// Sends one mail with Python's smtplib (Debian python) and returns its output.
fn smtplib_send(port: u16, ca: &Path, mode: &str) -> Output {
    let script = r#"
import smtplib, ssl, sys
port, ca, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
if mode == "implicit":
    s = smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=10)
else:
    s = smtplib.SMTP("127.0.0.1", port, timeout=10)
    s.ehlo()
    assert "auth" not in s.esmtp_features, "AUTH offered before STARTTLS"
    s.starttls(context=ctx)
    s.ehlo()
s.login("mailer", "pw123")
s.sendmail("tls@gw.example", ["ops@example.com"], "Subject: via " + mode + "\r\n\r\nbody\r\n")
s.quit()
print("sent")
"#;
    output(
        Command::new("/usr/bin/python3")
            .args(["-c", script, &port.to_string()])
            .arg(ca)
            .arg(mode),
    )
}

#[test]
fn smtp_starttls_and_implicit_tls() {
    let ca = TestCa::new();
    let starttls = SmtpServer::start(
        SmtpOptions::new()
            .auth("mailer", "pw123")
            .auth_require_tls(true)
            .starttls(&ca),
    );
    let out = smtplib_send(starttls.port(), ca.ca_pem(), "starttls");
    assert!(out.status.success(), "{}", text(&out));
    let mails = starttls.wait_for_messages(1, Duration::from_secs(10));
    assert!(mails[0].data_str().contains("Subject: via starttls"));
    assert_eq!(mails[0].auth_user.as_deref(), Some("mailer"));
    let out = smtplib_send(starttls.port(), ca.wrong_ca_pem(), "starttls");
    assert!(!out.status.success(), "wrong CA accepted: {}", text(&out));

    let implicit = SmtpServer::start(SmtpOptions::new().auth("mailer", "pw123").implicit_tls(&ca));
    let out = smtplib_send(implicit.port(), ca.ca_pem(), "implicit");
    assert!(out.status.success(), "{}", text(&out));
    let mails = implicit.wait_for_messages(1, Duration::from_secs(10));
    assert!(mails[0].data_str().contains("Subject: via implicit"));
    assert_eq!(starttls.messages().len(), 1);
}

// ---------------------------------------------------------------- HTTP

fn raw_http(port: u16, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect HttpReceiver");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read response");
    resp
}

fn curl(args: &[&str]) -> Output {
    output(Command::new("curl").args(["-sS"]).args(args))
}

#[test]
fn http_receiver_records_and_scripts_replies() {
    let mut http = HttpReceiver::start();
    let body = r#"{"sensor":"t1","v":21.5}"#;
    let resp = raw_http(
        http.port(),
        &format!(
            "POST /api/ingest?batch=1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             X-Api-Key: k1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let reqs = http.wait_for_requests(1, Duration::from_secs(5));
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/api/ingest?batch=1");
    assert_eq!(reqs[0].path_only(), "/api/ingest");
    assert_eq!(reqs[0].header("x-api-key"), Some("k1"));
    assert_eq!(reqs[0].body_str(), body);

    // Scripted status + headers + body, chosen per request.
    http.set_handler(|r| match r.path_only() {
        "/busy" => Reply::status(503).header("retry-after", "7").body("busy"),
        "/stream" => Reply::ok().ndjson_lines(
            &[r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#],
            Duration::from_millis(150),
        ),
        "/slow" => Reply::ok().delay(Duration::from_secs(3)),
        "/drop" => Reply::ok().drop_connection(),
        _ => Reply::json(r#"{"ok":true}"#),
    });
    let url = http.url();
    let out = curl(&["-i", &format!("{url}/busy")]);
    let s = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        s.starts_with("http/1.1 503") && s.contains("retry-after: 7") && s.ends_with("busy"),
        "{s}"
    );

    let t = Instant::now();
    let out = curl(&["-N", "-i", &format!("{url}/stream")]);
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.to_lowercase().contains("transfer-encoding: chunked"),
        "{s}"
    );
    assert!(s.ends_with("{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n"), "{s}");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "stream not paced: {:?}",
        t.elapsed()
    );

    let before = http.requests().len();
    let out = curl(&["--max-time", "0.5", &format!("{url}/slow")]);
    assert_eq!(
        out.status.code(),
        Some(28),
        "expected a curl timeout: {}",
        text(&out)
    );
    assert_eq!(
        http.requests().len(),
        before + 1,
        "slow request is recorded at once"
    );

    let out = curl(&[&format!("{url}/drop")]);
    assert_eq!(
        out.status.code(),
        Some(52),
        "expected an empty reply: {}",
        text(&out)
    );

    let out = curl(&["-d", "x=1", &format!("{url}/other")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), r#"{"ok":true}"#);
    assert_eq!(http.requests().last().unwrap().method, "POST");

    let port = http.port();
    http.stop();
    assert!(!port_open(port));
    http.start_again();
    let out = curl(&[&format!("{url}/again")]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(http.requests().last().unwrap().path, "/again");
}

#[tokio::test]
async fn http_receiver_from_tokio_test() {
    let http = HttpReceiver::start_with(|_| Reply::text("pong").with_status(201));
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", http.port()))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(
        resp.starts_with("HTTP/1.1 201") && resp.ends_with("pong"),
        "{resp}"
    );
    let reqs = http
        .wait_for_requests_async(1, Duration::from_secs(5))
        .await;
    assert_eq!(reqs[0].path, "/ping");
}

// ---------------------------------------------------------------- Serial

/// Reads from `path` on a helper thread until `want` bytes arrived, EOF/error,
/// or `timeout`; returns what was read and the final read error, if any.
fn read_pty(path: &Path, want: usize, timeout: Duration) -> (Vec<u8>, Option<std::io::Error>) {
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        let err = loop {
            match f.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.len() >= want {
                        break None;
                    }
                }
                Err(e) => break Some(e),
            }
        };
        let _ = tx.send((got, err));
    });
    rx.recv_timeout(timeout).expect("pty read timed out")
}

#[test]
fn serial_link_lines_unplug_replug() {
    let mut link = SerialLink::start();
    assert!(link.device_path().exists() && link.peer_path().exists());
    let dev = link.device_path().to_path_buf();
    let peer = link.peer_path().to_path_buf();

    // Sensor (peer) -> agent (device).
    let reader = std::thread::spawn({
        let dev = dev.clone();
        move || read_pty(&dev, 12, Duration::from_secs(5))
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut w = std::fs::OpenOptions::new().write(true).open(&peer).unwrap();
    w.write_all(b"T=21.5;H=40\n").unwrap();
    let (got, _) = reader.join().unwrap();
    assert_eq!(got, b"T=21.5;H=40\n");

    // Agent (device) -> sensor (peer).
    let reader = std::thread::spawn({
        let peer = peer.clone();
        move || read_pty(&peer, 5, Duration::from_secs(5))
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut d = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    d.write_all(b"PING\n").unwrap();
    assert_eq!(reader.join().unwrap().0, b"PING\n");

    // Unplug: a reader on the device side sees EOF or EIO, the link is gone.
    let reader = std::thread::spawn({
        let dev = dev.clone();
        move || read_pty(&dev, usize::MAX, Duration::from_secs(5))
    });
    std::thread::sleep(Duration::from_millis(100));
    link.unplug();
    let (got, err) = reader.join().unwrap();
    assert!(got.is_empty());
    if let Some(e) = err {
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    }
    assert!(!dev.exists());

    link.replug();
    assert!(dev.exists());
    let reader = std::thread::spawn({
        let dev = dev.clone();
        move || read_pty(&dev, 6, Duration::from_secs(5))
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut w = std::fs::OpenOptions::new().write(true).open(&peer).unwrap();
    w.write_all(b"again\n").unwrap();
    assert_eq!(reader.join().unwrap().0, b"again\n");
}

// ---------------------------------------------------------------- util

#[test]
fn port_ownership_detects_foreign_listeners() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    assert!(port_open(port));
    assert!(support::util::port_owned_by(port, std::process::id()));
    // Another process (e.g. a peer that lost a port race) does not own it.
    let mut other = Command::new("sleep").arg("5").spawn().unwrap();
    assert!(!support::util::port_owned_by(port, other.id()));
    other.kill().unwrap();
    other.wait().unwrap();
    drop(listener);
    assert!(!support::util::port_owned_by(port, std::process::id()));
}
