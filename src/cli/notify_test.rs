//! `outpost notify-test NAME`: sends a test notification through one configured
//! notifier and prints the outcome (exit 1 if it was not delivered).

use super::Runtime;
use crate::notify::Outcome;
use std::path::Path;
use std::process::ExitCode;

pub fn main(path: &Path, name: &str) -> ExitCode {
    let config = match super::load_config_or_exit(path, |n| {
        format!("outpost: the configuration has {n} problem(s).")
    }) {
        Ok(c) => c,
        Err(code) => return code,
    };
    super::init_tracing("warn");
    let outcome = match super::block_on(
        Runtime::CurrentThread,
        crate::notify::send_test_event(
            &config.notifiers,
            &config.agent.site,
            &config.agent.gateway_id,
            name,
            &crate::clock::Clock::system(),
        ),
    ) {
        Ok(outcome) => outcome,
        Err(code) => return code,
    };
    match outcome {
        Ok(Outcome::Delivered) => {
            println!("{name}: delivered.");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Retry(why)) => {
            eprintln!("{name}: NOT delivered (the agent would retry): {why}");
            ExitCode::FAILURE
        }
        Ok(Outcome::Failed(why)) => {
            eprintln!("{name}: NOT delivered (permanent failure): {why}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}
