//! Test peers for Outpost integration tests: `mod support;` then e.g.
//! `let broker = support::Mosquitto::start();`. Every peer runs on a free
//! 127.0.0.1 port inside its own temporary directory and is stopped (process
//! killed, directory removed) on drop. The agent under test is `agent::Agent` (the
//! real binary) or `agent::InProcessAgent` (the library's store and tasks); the crash
//! tests' message stream is `cold_room`. See README.md in this directory.
#![allow(dead_code, unused_imports)]

pub mod agent;
pub mod browser;
pub mod ca;
pub mod cold_room;
pub mod config_keys;
pub mod http;
pub mod lazyfs;
pub mod modbus;
pub mod mosquitto;
pub mod mqtt_proxy;
pub mod pgbouncer;
pub mod postgres;
pub mod publisher;
pub mod serial;
pub mod smtp;
pub mod util;

pub use ca::TestCa;
pub use http::{HttpReceiver, RecordedRequest, Reply};
pub use modbus::ModbusSlave;
pub use mosquitto::{Mosquitto, MosquittoBuilder};
pub use pgbouncer::{PgBouncer, PgBouncerBuilder};
pub use postgres::{PgAuth, Postgres, PostgresBuilder};
pub use serial::SerialLink;
pub use smtp::{ReceivedMail, SmtpOptions, SmtpServer};
pub use util::{free_port, port_open, wait_until};
