//! `outpost check`: validates the configuration and prints it with secrets redacted
//! (exit 2 if invalid).

use std::path::Path;
use std::process::ExitCode;

pub fn main(path: &Path) -> ExitCode {
    let config = match super::load_config_or_exit(path, |n| {
        format!("outpost: {n} problem(s) in the configuration.")
    }) {
        Ok(c) => c,
        Err(code) => return code,
    };
    println!(
        "# {}: the configuration is valid. Effective configuration:\n",
        path.display()
    );
    print!("{}", config.to_redacted_toml());
    ExitCode::SUCCESS
}
