//! Outpost: a store-and-forward edge agent for IoT gateways.
//!
//! # Layers
//!
//! Top-level modules form layers. A module imports (`use crate::…` or a `crate::…`
//! path, test code included) only modules of its own layer's leaves or of lower
//! layers, never a higher one; `tests/layers.rs` enforces this table and finds cycles.
//! From the bottom up:
//!
//! 1. **leaves** — [`settings`] (Problems, durations, sizes, secrets, identifiers),
//!    [`model`] (readings, uids, flags, batches and their acknowledgements),
//!    [`display`] (values, ages and tables as people read them), [`backoff`],
//!    [`ratelimit`], [`progress`] (every stage's progress and stalls, G9), [`clock`]
//!    (the one injected `Clock`, clock steps, synchronisation state), [`exit`] (the
//!    process exit codes).
//! 2. [`store`] — the SQLite store: every local table's DDL, one writer thread with
//!    group commit, read connections, retention and the size cap, the `source_state`
//!    key-value rows ([`store::state`]).
//! 3. [`tls`] — PEM files, rustls client configurations (ring), X.509 expiry and the
//!    certificate watch fed with the endpoints components declare.
//! 4. [`metrics`] — the in-memory counters components increment (no queries).
//! 5. [`alerts`] — local alert rules, their persisted state machine and events (G3).
//! 6. [`notify`] (notifiers and the durable outbox), [`sync`] (replication to
//!    central PostgreSQL through PgBouncer) and [`report`] (daily summaries — the
//!    HACCP log — and calibration due dates of `[[devices]]`); none imports another.
//! 7. [`sources`] — producers of readings, one file per kind, selected by a tagged
//!    config enum.
//! 8. [`config`] — the aggregate `Config`: the TOML file, drop-ins, environment
//!    overrides, every component's section, errors naming file, line and key.
//! 9. [`run`] — what `outpost run` wires: the pipeline (which creates the one
//!    certificate watch and the one clock and passes them down), `/health`, the HTTP
//!    endpoint, the `/metrics` collector that reads SQLite, systemd notifications.
//! 10. [`cli`] — the command line: one module per subcommand, one tokio runtime
//!     builder, one load-the-configuration-or-exit; the demo; signal handling lives
//!     here, not in components.
//!
//! `fuzzing` (the fuzz targets' entry points) is compiled only for tests and with
//! the `fuzzing` feature (`fuzz/`, `tests/fuzz_corpus.rs`), never into the agent.
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
pub mod display;
pub mod exit;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod progress;
pub mod ratelimit;
pub mod report;
pub mod run;
pub mod settings;
pub mod sources;
pub mod store;
pub mod sync;
pub mod tls;
