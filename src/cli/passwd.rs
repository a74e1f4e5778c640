//! `outpost passwd [NAME]`: makes the Argon2id hash of a console password and prints
//! the `[[http.users]]` lines to paste into the configuration. The password is read
//! twice from the terminal without echo, or once from standard input with `--stdin`
//! (one line, for scripts). Nothing is written anywhere.

use crate::config::http::{valid_user_name, Role};
use std::io::{BufRead, Write};
use std::process::ExitCode;

/// The shortest password accepted.
pub const MIN_PASSWORD: usize = 8;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The user's login name; with it the whole `[[http.users]]` table is printed,
    /// without it only the `password_hash` line.
    pub name: Option<String>,
    /// The role printed with NAME: `viewer` (sees everything) or `operator` (may also
    /// acknowledge alarms).
    #[arg(long, default_value = "operator", value_parser = parse_role)]
    pub role: Role,
    /// Read the password from standard input (one line) instead of the terminal.
    #[arg(long)]
    pub stdin: bool,
}

fn parse_role(text: &str) -> Result<Role, String> {
    match text {
        "viewer" => Ok(Role::Viewer),
        "operator" => Ok(Role::Operator),
        _ => Err(format!("expected viewer or operator, found {text:?}")),
    }
}

pub fn main(args: Args) -> ExitCode {
    if let Some(name) = &args.name {
        if !valid_user_name(name) {
            eprintln!(
                "outpost passwd: the name must be 1 to 64 letters, digits, '.', '_', '-' or '@', found {name:?}"
            );
            return ExitCode::from(crate::exit::CONFIG);
        }
    }
    let password = if args.stdin {
        let mut line = String::new();
        match std::io::stdin().lock().read_line(&mut line) {
            Ok(_) => line.trim_end_matches(['\n', '\r']).to_string(),
            Err(e) => {
                eprintln!("outpost passwd: cannot read standard input: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let who = args.name.as_deref().unwrap_or("the console user");
        let first = match read_hidden(&format!("Password for {who}: ")) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("outpost passwd: cannot read the password from the terminal ({e}); use --stdin to read it from standard input");
                return ExitCode::FAILURE;
            }
        };
        if first.chars().count() >= MIN_PASSWORD {
            match read_hidden("The same again: ") {
                Ok(second) if second == first => {}
                Ok(_) => {
                    eprintln!("outpost passwd: the two passwords differ; nothing printed");
                    return ExitCode::FAILURE;
                }
                Err(e) => {
                    eprintln!("outpost passwd: cannot read the password from the terminal ({e})");
                    return ExitCode::FAILURE;
                }
            }
        }
        first
    };
    if password.chars().count() < MIN_PASSWORD {
        eprintln!("outpost passwd: the password must be at least {MIN_PASSWORD} characters long");
        return ExitCode::from(crate::exit::CONFIG);
    }
    let hash = match crate::run::console::login::hash_password(&password) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("outpost passwd: hashing failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    let printed = match &args.name {
        Some(name) => writeln!(
            out,
            "[[http.users]]\nname = \"{name}\"\nrole = \"{}\"\npassword_hash = \"{hash}\"",
            args.role.as_str()
        ),
        None => writeln!(out, "password_hash = \"{hash}\""),
    };
    if printed.is_err() {
        return ExitCode::FAILURE;
    }
    if !args.stdin {
        eprintln!(
            "Paste this into /etc/outpost/outpost.toml (or a drop-in in conf.d/) and restart the agent."
        );
    }
    ExitCode::SUCCESS
}

/// Prompts on the controlling terminal and reads one line with echo off (restored
/// afterwards, also on error).
fn read_hidden(prompt: &str) -> std::io::Result<String> {
    use std::os::fd::AsRawFd;
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")?;
    let fd = tty.as_raw_fd();
    // SAFETY: `termios` is plain data that tcgetattr fills; `fd` is open.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut quiet = saved;
    quiet.c_lflag &= !libc::ECHO;
    quiet.c_lflag |= libc::ECHONL;
    // SAFETY: as above; `quiet` is a copy of the terminal's own settings.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut writer = &tty;
    let result = writer
        .write_all(prompt.as_bytes())
        .and_then(|_| writer.flush())
        .and_then(|_| {
            let mut line = String::new();
            std::io::BufReader::new(&tty).read_line(&mut line)?;
            Ok(line.trim_end_matches(['\n', '\r']).to_string())
        });
    // SAFETY: restores the settings read above.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, &saved) };
    result
}
