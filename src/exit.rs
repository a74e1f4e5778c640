//! The process exit codes of `outpost` (a leaf: subcommands in `crate::cli` and the
//! central schema commands in `crate::sync::central` return them).
//!
//! `0` is success and `1` ([`FAILURE`]) any failure at run time; systemd restarts the
//! agent after either failure (`Restart=on-failure`) except [`CONFIG`], which
//! `RestartPreventExitStatus=2` in the unit keeps from looping on a bad file.

/// Any failure that is not the configuration's (`ExitCode::FAILURE`).
pub const FAILURE: u8 = 1;

/// The configuration (or a command-line argument) was rejected.
pub const CONFIG: u8 = 2;
