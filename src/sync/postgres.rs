//! The connection to central PostgreSQL (directly or through PgBouncer): URL, TLS on
//! rustls + ring, errors a person can act on, and the idempotent uploads.
//!
//! PgBouncer in transaction mode hands each *transaction* to whichever server
//! connection is free, so nothing may outlive a transaction (G6): every statement here
//! is unnamed (`query_typed` / `execute_typed`, which parse, bind and execute in one
//! round trip) or a `simple_query`, runs inside an explicit `BEGIN … COMMIT`, and the
//! only setting is `SET LOCAL statement_timeout`. `Client::prepare` — a named statement
//! that would stay on one server connection — is never used. The one exception is the
//! readings upload's `copy_in`, whose named statement is closed before the `COMMIT` of
//! its own transaction (see `copy_in_transaction`), and whose staging table is
//! `ON COMMIT DROP`.

use super::local::{AlertEventColumns, ReadingColumns};
use super::{SslMode, SyncConfig};
use crate::settings::Secret;
use bytes::BytesMut;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres::Client;

/// The central schema version this agent writes (see [`super::central`]).
pub use super::central::SCHEMA_VERSION;

/// What went wrong talking to central, worded for the person who must fix it.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SyncError {
    #[error("invalid sync.url: {0}")]
    Url(String),
    #[error("cannot reach central PostgreSQL at {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error(
        "central PostgreSQL at {target} refused the password for user {user:?}: \
         check sync.password / sync.password_file ({detail})"
    )]
    WrongPassword {
        target: String,
        user: String,
        detail: String,
    },
    #[error("central PostgreSQL at {target} refused the login: {detail}")]
    LoginRefused { target: String, detail: String },
    #[error("TLS with central PostgreSQL at {target} failed: {reason}")]
    Tls { target: String, reason: String },
    #[error("the central schema `outpost` is missing in {target}: run `outpost central migrate`")]
    SchemaMissing { target: String },
    #[error(
        "the central schema is at version {found}, older than the {required} this agent \
         needs: run `outpost central migrate`"
    )]
    SchemaTooOld { found: i32, required: i32 },
    #[error(
        "the central schema is at version {found}, newer than the {known} this agent knows: \
         upgrade outpost on this gateway"
    )]
    SchemaTooNew { found: i32, known: i32 },
    #[error("central PostgreSQL did not answer within {0:?}")]
    Timeout(Duration),
    #[error("central PostgreSQL: {0}")]
    Database(String),
    #[error("reading the local database failed: {0}")]
    Local(String),
}

impl SyncError {
    /// Errors that a retry cannot fix: a person must act (config, migration, upgrade).
    pub fn needs_a_person(&self) -> bool {
        matches!(
            self,
            SyncError::Url(_)
                | SyncError::WrongPassword { .. }
                | SyncError::LoginRefused { .. }
                | SyncError::Tls { .. }
                | SyncError::SchemaMissing { .. }
                | SyncError::SchemaTooOld { .. }
                | SyncError::SchemaTooNew { .. }
        )
    }
}

/// Parses and checks `sync.url`. Refused: TLS settings (they belong in `sslmode`, which
/// knows `verify-full`), a password (it would be printed by `outpost check`; use
/// `password` / `password_file`) and `options` (session settings, which PgBouncer in
/// transaction mode cannot keep).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    check_url_text(url)?;
    let config = parse_url_allowing_password(url)?;
    if config.get_password().is_some() {
        return Err(
            "contains a password: put it in sync.password or sync.password_file, \
                    which are never printed"
                .into(),
        );
    }
    Ok(config)
}

fn check_url_text(url: &str) -> Result<(), String> {
    if url.trim().is_empty() {
        return Err(
            "is empty; expected e.g. \"postgres://outpost@central.example:6432/fleet\"".into(),
        );
    }
    if url.len() > super::MAX_URL_LEN {
        return Err(format!("is longer than {} characters", super::MAX_URL_LEN));
    }
    let lower = url.to_ascii_lowercase();
    for key in ["sslmode", "sslrootcert", "sslcert", "sslkey"] {
        if lower.contains(key) {
            return Err(format!(
                "sets {key}; use sync.sslmode and sync.ca_file instead"
            ));
        }
    }
    if lower.contains("options") {
        return Err(
            "sets options (session settings), which PgBouncer in transaction mode cannot keep"
                .into(),
        );
    }
    Ok(())
}

/// Like [`parse_url`] but a password in the URL is fine (for `outpost central --url`).
pub fn parse_url_allowing_password(url: &str) -> Result<tokio_postgres::Config, String> {
    check_url_text(url)?;
    let looks_like_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if url.contains("://") && !looks_like_url {
        return Err("must start with postgres:// or postgresql://".into());
    }
    if !looks_like_url && !url.contains('=') {
        return Err(format!(
            "{url:?} is neither a postgres:// URL nor key=value settings; \
             expected e.g. \"postgres://outpost@central.example:6432/fleet\""
        ));
    }
    let config =
        tokio_postgres::Config::from_str(url).map_err(|e| format!("cannot be parsed: {e}"))?;
    if config.get_hosts().is_empty() {
        return Err("names no host".into());
    }
    if config.get_user().is_none() {
        return Err("names no user (postgres://USER@host/db)".into());
    }
    Ok(config)
}

/// Where we connect, for messages (never with the password).
fn describe_target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or(""))
}

/// Connection settings resolved from `[sync]` (or `outpost central --url`).
#[derive(Clone)]
pub struct ConnectOptions {
    pub url: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    pub ca_file: Option<std::path::PathBuf>,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    pub application_name: String,
    /// Where the server's certificate is recorded (as `sync`) and saved, if anywhere.
    pub certs: Option<crate::tls::CertWatch>,
}

impl ConnectOptions {
    pub fn from_config(config: &SyncConfig, gateway_id: &str) -> ConnectOptions {
        ConnectOptions {
            url: config.url.clone(),
            password: config.password.clone(),
            sslmode: config.sslmode,
            ca_file: config.ca_file.clone(),
            connect_timeout: config.connect_timeout.get(),
            statement_timeout: config.statement_timeout.get(),
            application_name: format!("outpost {gateway_id}"),
            certs: None,
        }
    }
}

/// An open connection to central. The connection task ends when this is dropped.
pub struct Central {
    client: Client,
    target: String,
    statement_timeout: Duration,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Central {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Opens a connection (TCP, TLS, authentication) within the connect timeout.
pub async fn connect(options: &ConnectOptions) -> Result<Central, SyncError> {
    let mut config = parse_url_allowing_password(&options.url).map_err(SyncError::Url)?;
    if let Some(password) = &options.password {
        config.password(password.expose());
    }
    config.connect_timeout(options.connect_timeout);
    config.application_name(
        options
            .application_name
            .chars()
            .take(60)
            .collect::<String>(),
    );
    let target = describe_target(&config);
    let user = config.get_user().unwrap_or("").to_string();
    let classify = |e: tokio_postgres::Error| classify_connect_error(e, &target, &user);
    // tokio-postgres enforces connect_timeout per host; this bounds authentication too.
    let deadline = options.connect_timeout + Duration::from_secs(1);
    let connecting = async {
        match options.sslmode {
            SslMode::Disable => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let (client, connection) = config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(classify)?;
                Ok((client, spawn_driver(connection)))
            }
            mode => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                let peer = target.split('/').next().unwrap_or_default();
                let recorder = options
                    .certs
                    .as_ref()
                    .map(|certs| certs.recorder("sync", peer));
                let tls =
                    tls_config(mode, options.ca_file.as_deref(), recorder).map_err(|reason| {
                        SyncError::Tls {
                            target: target.clone(),
                            reason,
                        }
                    })?;
                let make = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
                let (client, connection) = config.connect(make).await.map_err(classify)?;
                Ok((client, spawn_driver(connection)))
            }
        }
    };
    let (client, driver) = tokio::time::timeout(deadline, connecting)
        .await
        .map_err(|_| SyncError::Timeout(deadline))??;
    Ok(Central {
        client,
        target,
        statement_timeout: options.statement_timeout,
        driver,
    })
}

fn spawn_driver<S, T>(connection: tokio_postgres::Connection<S, T>) -> tokio::task::JoinHandle<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "The connection to central ended.");
        }
    })
}

/// The rustls configuration (ring provider only) for `mode`; the server's certificate
/// goes to `recorder`.
fn tls_config(
    mode: SslMode,
    ca_file: Option<&Path>,
    recorder: Option<crate::tls::CertRecorder>,
) -> Result<rustls::ClientConfig, String> {
    let roots = crate::tls::root_store(ca_file, ca_file.is_none())?;
    if ca_file.is_none() && roots.is_empty() && mode != SslMode::Require {
        return Err("no CA certificates found on this system; set sync.ca_file".into());
    }
    let builder = crate::tls::builder()?;
    let webpki = crate::tls::webpki_verifier(roots)?;
    let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = match mode {
        SslMode::VerifyFull | SslMode::Disable => webpki,
        SslMode::VerifyCa | SslMode::Require => Arc::new(LaxVerifier {
            inner: webpki,
            check_chain: mode == SslMode::VerifyCa,
        }),
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(crate::tls::recording(verifier, recorder))
        .with_no_client_auth())
}

/// `verify-ca` (chain checked, host name not) and `require` (encryption only), as in
/// libpq. Handshake signatures are still verified with the certificate's key.
#[derive(Debug)]
struct LaxVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    check_chain: bool,
}

impl rustls::client::danger::ServerCertVerifier for LaxVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if !self.check_chain {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Finds a rustls error anywhere in an error's chain.
fn find_tls_error(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(describe_tls(tls));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                return Some(describe_tls(tls));
            }
        }
        cur = err.source();
    }
    None
}

fn describe_tls(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => format!(
            "the server's certificate is not signed by a trusted CA (sync.ca_file, or the \
             system's CAs): check that sync.ca_file holds the CA that signed the server's certificate ({e})"
        ),
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "the server's certificate is not valid for the host name in sync.url: connect by the \
             name in the certificate, or use sslmode = \"verify-ca\" ({e})"
        ),
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("the server's certificate has expired, or this gateway's clock is wrong ({e})")
        }
        other => other.to_string(),
    }
}

fn classify_connect_error(e: tokio_postgres::Error, target: &str, user: &str) -> SyncError {
    if let Some(reason) = find_tls_error(&e) {
        return SyncError::Tls {
            target: target.into(),
            reason,
        };
    }
    if let Some(db) = e.as_db_error() {
        let detail = db.message().to_string();
        let code = db.code();
        // PostgreSQL: 28P01 "password authentication failed"; PgBouncer: 08P01 "SASL
        // authentication failed" (SCRAM) or "password authentication failed" (md5).
        if *code == SqlState::INVALID_PASSWORD
            || detail.contains("password authentication failed")
            || detail.contains("SASL authentication failed")
        {
            return SyncError::WrongPassword {
                target: target.into(),
                user: user.into(),
                detail,
            };
        }
        if *code == SqlState::INVALID_CATALOG_NAME
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return SyncError::LoginRefused {
                target: target.into(),
                detail,
            };
        }
        if detail.contains("SSL") || detail.contains("ssl") {
            return SyncError::Tls {
                target: target.into(),
                reason: detail,
            };
        }
        return SyncError::LoginRefused {
            target: target.into(),
            detail,
        };
    }
    let text = error_chain(&e);
    if text.contains("password missing") {
        return SyncError::WrongPassword {
            target: target.into(),
            user: user.into(),
            detail: "the server asked for a password and none is configured".into(),
        };
    }
    if text.contains("server does not support TLS") {
        return SyncError::Tls {
            target: target.into(),
            reason: "the server does not offer TLS; enable it there or set sslmode = \"disable\""
                .into(),
        };
    }
    SyncError::Connect {
        target: target.into(),
        reason: text,
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = err.source();
    }
    text
}

/// Maps an error during a transaction; a missing table means a missing schema.
fn classify_statement_error(e: tokio_postgres::Error, target: &str) -> SyncError {
    if let Some(db) = e.as_db_error() {
        if *db.code() == SqlState::UNDEFINED_TABLE || *db.code() == SqlState::INVALID_SCHEMA_NAME {
            return SyncError::SchemaMissing {
                target: target.into(),
            };
        }
        let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
        if let Some(detail) = db.detail() {
            text.push_str(": ");
            text.push_str(detail);
        }
        return SyncError::Database(text);
    }
    SyncError::Database(error_chain(&e))
}

impl Central {
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The raw client, for the schema commands.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs `work` (a future built on [`Central::client`]; futures do nothing until
    /// polled, so it runs after `BEGIN`) in `BEGIN; SET LOCAL statement_timeout …; …;
    /// COMMIT`, bounded on this side too. On any error the caller must drop the
    /// connection: its transaction state is unknown (PgBouncer rolls back the
    /// transaction of a client that disconnects).
    pub async fn transaction<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, SyncError> {
        let timeout = self.statement_timeout;
        let client = &self.client;
        let run = async move {
            client
                .batch_execute(&format!(
                    "BEGIN; SET LOCAL statement_timeout = {}",
                    timeout.as_millis().max(1)
                ))
                .await?;
            let value = work.await?;
            client.batch_execute("COMMIT").await?;
            Ok::<T, tokio_postgres::Error>(value)
        };
        let bound = timeout + Duration::from_secs(5);
        match tokio::time::timeout(bound, run).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                // Leave the connection usable if it still is (a failed statement aborts
                // the transaction); a broken one fails this at once.
                let rollback = self.client.batch_execute("ROLLBACK");
                let _ = tokio::time::timeout(Duration::from_secs(5), rollback).await;
                Err(classify_statement_error(e, &self.target))
            }
            Err(_) => Err(SyncError::Timeout(bound)),
        }
    }

    /// Checks that the central schema exists and has the version this agent writes.
    pub async fn check_schema(&self) -> Result<i32, SyncError> {
        let rows = self
            .transaction(self.client.query_typed(
                "SELECT COALESCE(MAX(version), 0) FROM outpost.schema_version",
                &[],
            ))
            .await?;
        let found: i32 = rows.first().and_then(|r| r.try_get(0).ok()).unwrap_or(0);
        if found == 0 {
            return Err(SyncError::SchemaMissing {
                target: self.target.clone(),
            });
        }
        if found < SCHEMA_VERSION {
            return Err(SyncError::SchemaTooOld {
                found,
                required: SCHEMA_VERSION,
            });
        }
        if found > SCHEMA_VERSION {
            return Err(SyncError::SchemaTooNew {
                found,
                known: SCHEMA_VERSION,
            });
        }
        Ok(found)
    }

    /// Uploads readings in one transaction; already present rows are skipped. Returns
    /// how many rows were new centrally.
    ///
    /// Binary `COPY` into a staging table that lives only for the transaction, then one
    /// `INSERT … SELECT … ON CONFLICT DO NOTHING` (the columns are [`READING_COLUMNS`]).
    /// Allowed behind PgBouncer in transaction mode (G6): the temporary table is
    /// `ON COMMIT DROP`, and the statement `copy_in` prepares is named but closed inside
    /// the same transaction (see [`copy_in_transaction`]).
    pub async fn upload_readings(
        &self,
        gateway_id: &str,
        rows: &ReadingColumns,
    ) -> Result<u64, SyncError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let client = &self.client;
        self.transaction(async move {
            client.batch_execute(&stage_ddl()).await?;
            let types: Vec<Type> = READING_COLUMNS.iter().map(|c| c.ty.clone()).collect();
            let sink = copy_in_transaction(client, &stage_copy()).await?;
            let writer = BinaryCopyInWriter::new(sink, &types);
            tokio::pin!(writer);
            let mut row: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(READING_COLUMNS.len());
            for i in 0..rows.len() {
                row.clear();
                row.extend(READING_COLUMNS.iter().map(|c| (c.value)(rows, i)));
                writer.as_mut().write(&row).await?;
            }
            writer.finish().await?;
            client
                .execute_typed(&stage_insert(), &[(&gateway_id, Type::TEXT)])
                .await
        })
        .await
    }

    /// Uploads alert events in one transaction; already present events are skipped.
    pub async fn upload_alert_events(
        &self,
        gateway_id: &str,
        rows: &AlertEventColumns,
    ) -> Result<u64, SyncError> {
        if rows.is_empty() {
            return Ok(0);
        }
        self.transaction(self.client.execute_typed(
            "INSERT INTO outpost.alert_events \
                   (gateway_id, uid, rule, device, metric, kind, severity, value, threshold, occurred_at, message, \
                    actor, note, channel, seq, unit, since, message_text) \
                 SELECT $1, e.* FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], \
                   $7::text[], $8::float8[], $9::float8[], $10::timestamptz[], $11::jsonb[], \
                   $12::text[], $13::text[], $14::text[], $15::int8[], $16::text[], $17::timestamptz[], \
                   $18::text[]) \
                   AS e(uid, rule, device, metric, kind, severity, value, threshold, occurred_at, message, \
                   actor, note, channel, seq, unit, since, message_text) \
                 ON CONFLICT DO NOTHING",
            &[
                (&gateway_id, Type::TEXT),
                (&rows.uid, Type::UUID_ARRAY),
                (&rows.rule, Type::TEXT_ARRAY),
                (&rows.device, Type::TEXT_ARRAY),
                (&rows.metric, Type::TEXT_ARRAY),
                (&rows.kind, Type::TEXT_ARRAY),
                (&rows.severity, Type::TEXT_ARRAY),
                (&rows.value, Type::FLOAT8_ARRAY),
                (&rows.threshold, Type::FLOAT8_ARRAY),
                (&rows.occurred_at, Type::TIMESTAMPTZ_ARRAY),
                (&rows.message, Type::JSONB_ARRAY),
                (&rows.actor, Type::TEXT_ARRAY),
                (&rows.note, Type::TEXT_ARRAY),
                (&rows.channel, Type::TEXT_ARRAY),
                // What the chain covers besides (issue 17): the local id, unit, since and
                // the message exactly as stored.
                (&rows.ids, Type::INT8_ARRAY),
                (&rows.unit, Type::TEXT_ARRAY),
                (&rows.since, Type::TIMESTAMPTZ_ARRAY),
                (&rows.message_text, Type::TEXT_ARRAY),
            ],
        ))
        .await
    }

    /// Up to `limit` acknowledgements for `gateway_id` not applied yet, oldest first.
    pub async fn pending_acks(
        &self,
        gateway_id: &str,
        limit: i64,
    ) -> Result<Vec<CentralAck>, SyncError> {
        let rows = self
            .transaction(self.client.query_typed(
                "SELECT id, rule, device, acked_by, note FROM outpost.alert_acks \
                 WHERE gateway_id = $1 AND applied_at IS NULL ORDER BY id LIMIT $2",
                &[(&gateway_id, Type::TEXT), (&limit, Type::INT8)],
            ))
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(CentralAck {
                    id: r.try_get(0).ok()?,
                    rule: r.try_get(1).ok()?,
                    device: r.try_get(2).ok()?,
                    acked_by: r.try_get(3).ok()?,
                    note: r.try_get(4).ok()?,
                })
            })
            .collect())
    }

    /// Marks one acknowledgement applied with its `result`.
    pub async fn mark_ack_applied(
        &self,
        gateway_id: &str,
        id: i64,
        result: &str,
    ) -> Result<u64, SyncError> {
        self.transaction(self.client.execute_typed(
            "UPDATE outpost.alert_acks SET applied_at = now(), result = $3 \
             WHERE id = $1 AND gateway_id = $2 AND applied_at IS NULL",
            &[
                (&id, Type::INT8),
                (&gateway_id, Type::TEXT),
                (&result, Type::TEXT),
            ],
        ))
        .await
    }
}

/// A row of `outpost.alert_acks` waiting for its gateway (text as inserted: checked by
/// the gateway before use).
#[derive(Debug, Clone, PartialEq)]
pub struct CentralAck {
    pub id: i64,
    pub rule: String,
    pub device: Option<String>,
    pub acked_by: String,
    pub note: Option<String>,
}

impl Central {
    /// Uploads daily summaries in one transaction; a summary already there for the
    /// same gateway, day, device and metric is replaced (the day was recomputed).
    pub async fn upload_summaries(
        &self,
        gateway_id: &str,
        rows: &super::local::SummaryColumns,
    ) -> Result<u64, SyncError> {
        if rows.is_empty() {
            return Ok(0);
        }
        self.transaction(self.client.execute_typed(
            "INSERT INTO outpost.daily_summaries \
                   (gateway_id, day, device, metric, timezone, day_start, day_end, readings, min, max, \
                    mean, gaps, gap_seconds, out_of_range_seconds, excursions, alarms, detail, computed_at) \
                 SELECT $1, s.day::date, s.device, s.metric, s.timezone, s.day_start, s.day_end, s.readings, \
                    s.min, s.max, s.mean, s.gaps, s.gap_seconds, s.oor, s.excursions, s.alarms, s.detail, s.computed_at \
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[], \
                   $7::timestamptz[], $8::int8[], $9::float8[], $10::float8[], $11::float8[], $12::int4[], \
                   $13::int8[], $14::int8[], $15::int8[], $16::int4[], $17::jsonb[], $18::timestamptz[]) \
                   AS s(day, device, metric, timezone, day_start, day_end, readings, min, max, mean, gaps, \
                        gap_seconds, oor, excursions, alarms, detail, computed_at) \
                 ON CONFLICT (gateway_id, day, device, metric) DO UPDATE SET \
                   timezone = excluded.timezone, day_start = excluded.day_start, day_end = excluded.day_end, \
                   readings = excluded.readings, min = excluded.min, max = excluded.max, mean = excluded.mean, \
                   gaps = excluded.gaps, gap_seconds = excluded.gap_seconds, \
                   out_of_range_seconds = excluded.out_of_range_seconds, excursions = excluded.excursions, \
                   alarms = excluded.alarms, detail = excluded.detail, computed_at = excluded.computed_at, \
                   updated_at = now()",
            &[
                (&gateway_id, Type::TEXT),
                (&rows.day, Type::TEXT_ARRAY),
                (&rows.device, Type::TEXT_ARRAY),
                (&rows.metric, Type::TEXT_ARRAY),
                (&rows.timezone, Type::TEXT_ARRAY),
                (&rows.day_start, Type::TIMESTAMPTZ_ARRAY),
                (&rows.day_end, Type::TIMESTAMPTZ_ARRAY),
                (&rows.readings, Type::INT8_ARRAY),
                (&rows.min, Type::FLOAT8_ARRAY),
                (&rows.max, Type::FLOAT8_ARRAY),
                (&rows.mean, Type::FLOAT8_ARRAY),
                (&rows.gaps, Type::INT4_ARRAY),
                (&rows.gap_seconds, Type::INT8_ARRAY),
                (&rows.out_of_range_seconds, Type::INT8_ARRAY),
                (&rows.excursions, Type::INT8_ARRAY),
                (&rows.alarms, Type::INT4_ARRAY),
                (&rows.detail, Type::JSONB_ARRAY),
                (&rows.computed_at, Type::TIMESTAMPTZ_ARRAY),
            ],
        ))
        .await
    }
}

/// One column of a readings upload: its name in `outpost.readings` (and in the staging
/// table), its type, and where a batch holds its value.
pub struct ReadingColumn {
    pub name: &'static str,
    pub ty: Type,
    pub value: for<'a> fn(&'a ReadingColumns, usize) -> &'a (dyn ToSql + Sync),
}

/// **The** column list of a readings upload, in `COPY` order (`gateway_id` is added by
/// the `INSERT`). Adding a column centrally is one row here (plus its field in
/// [`ReadingColumns`] and its `SELECT` in `local::select_readings` if it is new there):
/// the staging table, the `COPY` and the `INSERT` are all built from this list.
pub const READING_COLUMNS: &[ReadingColumn] = &[
    ReadingColumn {
        name: "uid",
        ty: Type::UUID,
        value: |c, i| &c.uid[i],
    },
    ReadingColumn {
        name: "observed_at",
        ty: Type::TIMESTAMPTZ,
        value: |c, i| &c.observed_at[i],
    },
    ReadingColumn {
        name: "received_at",
        ty: Type::TIMESTAMPTZ,
        value: |c, i| &c.received_at[i],
    },
    ReadingColumn {
        name: "source",
        ty: Type::TEXT,
        value: |c, i| &c.source[i],
    },
    ReadingColumn {
        name: "device",
        ty: Type::TEXT,
        value: |c, i| &c.device[i],
    },
    ReadingColumn {
        name: "metric",
        ty: Type::TEXT,
        value: |c, i| &c.metric[i],
    },
    ReadingColumn {
        name: "value",
        ty: Type::FLOAT8,
        value: |c, i| &c.value[i],
    },
    ReadingColumn {
        name: "unit",
        ty: Type::TEXT,
        value: |c, i| &c.unit[i],
    },
    ReadingColumn {
        name: "flags",
        ty: Type::INT4,
        value: |c, i| &c.flags[i],
    },
    ReadingColumn {
        name: "meta",
        ty: Type::JSONB,
        value: |c, i| &c.meta[i],
    },
    // The local id: the reading's position in the gateway's hash chain (G10).
    ReadingColumn {
        name: "seq",
        ty: Type::INT8,
        value: |c, i| &c.ids[i],
    },
];

/// The staging table of one readings upload: the upload's columns, gone at `COMMIT`
/// (or rollback), so nothing outlives the transaction (G6).
const STAGE: &str = "outpost_upload_stage";

fn column_names() -> String {
    READING_COLUMNS
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn stage_ddl() -> String {
    let columns = READING_COLUMNS
        .iter()
        .map(|c| format!("{} {}", c.name, c.ty.name()))
        .collect::<Vec<_>>()
        .join(", ");
    format!("CREATE TEMP TABLE {STAGE} ({columns}) ON COMMIT DROP")
}

fn stage_copy() -> String {
    format!(
        "COPY {STAGE} ({}) FROM STDIN (FORMAT binary)",
        column_names()
    )
}

fn stage_insert() -> String {
    let columns = column_names();
    format!(
        "INSERT INTO outpost.readings (gateway_id, {columns}) \
         SELECT $1, {columns} FROM {STAGE} ON CONFLICT DO NOTHING"
    )
}

/// `Client::copy_in` inside a transaction behind PgBouncer. tokio-postgres prepares the
/// `COPY` as a *named* statement; the statement is dropped when `copy_in` returns, and
/// its `Close` is queued behind the copy data on the same connection, so it reaches
/// the server before the caller's `COMMIT`: the statement is created and closed on the
/// server connection PgBouncer lent to this transaction and never outlives it (G6).
/// `COPY` takes no parameters and returns no columns, so no type lookup (a cached
/// statement) is involved either.
async fn copy_in_transaction(
    client: &Client,
    statement: &str,
) -> Result<tokio_postgres::CopyInSink<bytes::Bytes>, tokio_postgres::Error> {
    client.copy_in(statement).await
}

/// A 16-byte uid sent as a PostgreSQL `uuid` (binary format: the 16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UuidBytes(pub [u8; 16]);

impl ToSql for UuidBytes {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::UUID
    }
    tokio_postgres::types::to_sql_checked!();
}

/// JSON text already validated, sent as `jsonb` without re-serialising (binary format:
/// version byte 1, then the text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawJson(pub String);

impl ToSql for RawJson {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&[1]);
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }
    tokio_postgres::types::to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_both_forms_parse() {
        let c = parse_url("postgres://outpost@central.example:6432/fleet").unwrap();
        assert_eq!(c.get_user(), Some("outpost"));
        assert_eq!(describe_target(&c), "central.example:6432/fleet");
        let c = parse_url("host=10.0.0.5 port=6432 user=outpost dbname=fleet").unwrap();
        assert_eq!(describe_target(&c), "10.0.0.5:6432/fleet");
    }

    #[test]
    fn passwords_belong_in_their_own_key() {
        let e = parse_url("postgres://outpost:hunter2@h/d").unwrap_err();
        assert!(e.contains("password_file"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        assert!(parse_url_allowing_password("postgres://outpost:hunter2@h/d").is_ok());
    }

    #[test]
    fn no_user_or_host_is_an_error() {
        assert!(parse_url("postgres://h/d").unwrap_err().contains("user"));
        assert!(parse_url("user=u dbname=d").unwrap_err().contains("host"));
    }

    #[test]
    fn tls_configs_build_for_every_verifying_mode() {
        // The system CAs may be absent in a container; `require` needs none.
        assert!(tls_config(SslMode::Require, None, None).is_ok());
    }
}
