//! Old entry points, kept only so that callers outside this branch (`cli.rs`,
//! `pipeline.rs`, `tests/sync.rs`) compile until the merge; the only place in `sync`
//! that reaches up to `config`. Delete this file once the CLI calls
//! [`central::run_command`](super::central::run_command) with a `[sync]` loader and the
//! callers of [`run`](super::run) pass a [`Gateway`] (or the `From` below moves to
//! `config`, which may know both).

use super::central::{run_command, CentralCommand};
use super::Gateway;
use std::process::ExitCode;

impl From<crate::config::AgentConfig> for Gateway {
    fn from(agent: crate::config::AgentConfig) -> Gateway {
        Gateway {
            gateway_id: agent.gateway_id,
            site: agent.site,
        }
    }
}

/// Runs `outpost central …` with the configuration at `config_path`.
pub fn command(config_path: &std::path::Path, command: CentralCommand) -> ExitCode {
    let load_sync = || {
        crate::config::Config::load(config_path)
            .map(|config| config.sync)
            .map_err(|errors| errors.to_string())
    };
    run_command(config_path, &load_sync, command)
}
