//! The run layer: what `outpost run` starts and wires together. It may import every
//! lower layer (components and the aggregate configuration); only the command line
//! (`crate::cli`) sits above it.
//!
//! - [`pipeline`]: builds the store, the certificate watch and the clock, starts every
//!   component with them, reloads on SIGHUP (only what changed restarts) and shuts
//!   down in order.
//! - [`audit`]: the audit log's entries about the agent itself (configuration loaded,
//!   reloaded or refused; version changed).
//! - [`alerting`]: the alert engine and the notification outbox, started together.
//! - [`health`]: `/health` and the store-probing liveness the watchdog feeds on.
//! - [`http`]: the local endpoint serving `/metrics`, `/health` and the [`console`].
//! - [`console`]: the local web console (pages, login, sessions).
//! - [`collector`]: the `/metrics` gauges read from SQLite, sync state and the
//!   certificate watch, registered on the in-memory [`crate::metrics::Metrics`] and
//!   computed on the blocking pool, never on a runtime worker.
//! - [`reports`]: daily summaries kept and sent each morning, calibration reminders.
//! - [`systemd`]: READY/STOPPING/WATCHDOG notifications.
//! - [`memory`]: unmaps the code and read-only data only start-up touched.

pub mod alerting;
pub mod audit;
pub mod collector;
pub mod console;
pub mod health;
pub mod http;
pub mod memory;
pub mod pipeline;
pub mod reports;
pub mod systemd;
