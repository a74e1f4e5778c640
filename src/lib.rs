//! Outpost: a store-and-forward edge agent for IoT gateways.
//!
//! # Modules
//!
//! - [`config`]: the TOML configuration, its drop-ins and environment overrides, and
//!   error reports that name file, line and key.
//! - [`clock`]: the agent's wall clock (`clock::now()`), steps of it detected against
//!   the monotonic clock, and whether it is synchronised (G8), learned in a way the
//!   hardened unit allows.
//! - [`model`]: readings, their stable uids and flags, batches with acknowledgements.
//! - [`sources`]: producers of readings — `ttn` (with Storage Integration backfill),
//!   `chirpstack`, generic `mqtt`, `serial`, `modbus-rtu`, `simulated` — one file per
//!   kind, selected by a tagged config enum; shared field mapping and MQTT plumbing.
//! - [`store`]: the SQLite store: one writer thread with group commit, read
//!   connections for everyone else, retention and the size cap.
//! - [`alerts`]: local alert rules, their persisted state machine and events (G3).
//! - [`notify`]: notifiers (email, webhook, exec, log) and the durable outbox worker.
//! - [`pipeline`]: wiring, SIGHUP reload (only what changed restarts) and ordered
//!   shutdown.
//! - [`http`], [`metrics`], [`health`], [`systemd`]: `/metrics` and `/health` on
//!   127.0.0.1, the store-probing watchdog and READY/STOPPING notifications.
//! - [`progress`]: every stage's progress and waiting work (G9); a stage with work
//!   waiting and no progress for `http.stall_after` is stalled — `/health`, `/metrics`,
//!   the log, `outpost status` and the watchdog say so. Also the test-only fault switch.
//! - [`readings`], [`demo`], [`ratelimit`]: local history queries, the demo, rate-limited
//!   logging of expected failures.
//! - [`status`]: the `outpost status` summary.
//! - [`sync`]: replication of readings, alert events and heartbeats to central
//!   PostgreSQL through PgBouncer (transaction pooling), and the central schema.
//! - [`tls`]: PEM files, rustls client configurations (ring) and certificate expiry.
//! - [`fuzzing`]: the entry points of the fuzz targets (`fuzz/`), replayed over the
//!   committed corpora by `tests/fuzz_corpus.rs`; not used by the agent.
//! - [`cli`]: the command line (`run`, `check`, `status`, `readings`, `notify-test`,
//!   `central`, `demo`); signal handling lives there, not in components.
//!
//! # Data flow
//!
//! ```text
//! sources ──(bounded mpsc of Batch{readings, ack})──▶ store writer thread
//!                                                     (group commit, synchronous=FULL,
//!                                                      then resolves each ack)
//!                                                          │ committed id (watch)
//!                                                          ▼
//!                              consumers read committed readings on their own
//!                              read connections (alerts engine, demo printer)
//!                                                          │
//!                          alerts engine ── events + outbox rows (one write) ──▶ store
//!                          notify worker ◀── due outbox rows ── email / webhook / exec / log
//!                          sync worker   ◀── unsynced rows (live first) ──▶ PostgreSQL
//!                                            via PgBouncer; marks synced after commit
//!                          http          ◀── counters, store ──▶ /metrics, /health
//! ```
//!
//! A reading is acknowledged to its producer only after its transaction committed
//! (G1); shutdown stops sources first and lets every later stage drain.

pub mod alerts;
pub mod backoff;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod display;
pub mod exit;
pub mod fuzzing;
pub mod health;
pub mod http;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod pipeline;
pub mod progress;
pub mod ratelimit;
pub mod readings;
pub mod rejected;
pub mod settings;
pub mod sources;
pub mod status;
pub mod store;
pub mod sync;
pub mod systemd;
pub mod tls;
