//! `outpost central …`: the central PostgreSQL schema — print it, apply it, maintain
//! its partitions.
//!
//! TRANSITIONAL (issue 14): the subcommands' bodies still live in
//! `crate::sync::central::command`, which builds its own current-thread runtime and
//! loads the configuration itself; at merge they move here and use
//! [`super::block_on`] with [`super::Runtime::CurrentThread`] and
//! [`super::load_config_or_exit`].

use std::path::Path;
use std::process::ExitCode;

pub use crate::sync::central::CentralCommand;

pub fn main(path: &Path, command: CentralCommand) -> ExitCode {
    crate::sync::central::command(path, command)
}
