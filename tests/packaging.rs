//! The systemd unit as shipped: `systemd-analyze verify` prints nothing and
//! `systemd-analyze security --offline=true` reports an exposure of at most 2.5.
//! Skipped (with a note) where systemd-analyze is not installed. And the .deb as a
//! technician installs it: install, check, lint, purge (root only; the package is
//! built beforehand by scripts/install-test-deps-deb, run by scripts/test).
//!
//! `verify` needs ExecStart= to name an existing executable, so the unit is checked
//! through a copy whose /usr/bin/outpost is the binary cargo just built.

use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = "systemd/outpost.service";
const MAX_EXPOSURE: f64 = 2.5;

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(UNIT);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// A copy of the unit, named outpost.service, runnable on this machine.
fn unit_copy(dir: &Path) -> PathBuf {
    let text = unit_text().replace("/usr/bin/outpost", env!("CARGO_BIN_EXE_outpost"));
    let copy = dir.join("outpost.service");
    std::fs::write(&copy, text).expect("write the unit copy");
    copy
}

fn systemd_analyze() -> bool {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        eprintln!("note: systemd-analyze is not installed; skipping the unit checks");
    }
    found
}

#[test]
fn unit_verifies_cleanly() {
    if !systemd_analyze() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = unit_copy(dir.path());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze verify");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && printed.trim().is_empty(),
        "systemd-analyze verify {UNIT}: {}\n{printed}",
        out.status
    );
}

#[test]
fn unit_exposure_is_at_most_2_5() {
    if !systemd_analyze() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = unit_copy(dir.path());
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let marker = "Overall exposure level for outpost.service:";
    let score: f64 = text
        .lines()
        .find_map(|l| l.split_once(marker))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{text}"));
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}; packaging/SECURITY.md explains every item:\n{text}"
    );
}

/// Design G8 under chrony or ntpd: the agent asks systemd-timedated over the system
/// D-Bus (`busctl get-property org.freedesktop.timedate1 … NTPSynchronized`, see
/// src/clock.rs). The unit must let it: AF_UNIX sockets, /run/dbus visible, and
/// running busctl (execve, process, socket and IPC calls of @system-service not removed).
#[test]
fn unit_allows_asking_timedated_over_dbus() {
    let text = unit_text();
    let settings: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let families = settings
        .iter()
        .find_map(|l| l.strip_prefix("RestrictAddressFamilies="))
        .expect("RestrictAddressFamilies= is set");
    assert!(
        !families.starts_with('~') && families.split_whitespace().any(|f| f == "AF_UNIX"),
        "RestrictAddressFamilies={families} must allow AF_UNIX (the system bus)"
    );
    for line in &settings {
        for hiding in [
            "InaccessiblePaths=",
            "TemporaryFileSystem=",
            "BindPaths=",
            "BindReadOnlyPaths=",
        ] {
            if let Some(paths) = line.strip_prefix(hiding) {
                assert!(
                    !paths
                        .split_whitespace()
                        .any(|p| p.trim_start_matches(['-', '+']) == "/run"
                            || p.contains("/run/dbus")),
                    "{line}: must not hide /run/dbus/system_bus_socket"
                );
            }
        }
        if let Some(filter) = line.strip_prefix("SystemCallFilter=~") {
            for needed in ["execve", "@process", "@network-io", "@ipc"] {
                assert!(
                    !filter.split_whitespace().any(|f| f == needed),
                    "{line}: busctl needs {needed}"
                );
            }
        }
    }
}

/// Design G8: the agent learns the clock state from /run/systemd/timesync, because
/// ProtectClock= filters adjtimex(2) even for reading, and the boot id from
/// /proc/sys/kernel/random/boot_id. Neither may be hidden by the sandbox.
#[test]
fn unit_keeps_clock_state_and_boot_id_readable() {
    let text = unit_text();
    let settings: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert!(
        settings.contains(&"ProtectClock=yes"),
        "ProtectClock=yes is expected"
    );
    for line in &settings {
        assert!(
            !line.starts_with("ProcSubset="),
            "{line}: hides /proc/sys/kernel/random/boot_id"
        );
        for hiding in ["InaccessiblePaths=", "TemporaryFileSystem="] {
            if line.starts_with(hiding) {
                assert!(
                    !line.contains("/run"),
                    "{line}: must not hide /run/systemd/timesync"
                );
            }
        }
    }
}

/// Runs `cmd`, returning (success, stdout + stderr).
fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    match Command::new(cmd).args(args).output() {
        Ok(out) => (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Err(e) => (false, format!("cannot run {cmd}: {e}")),
    }
}

/// The newest `target/debian/outpost_*_<arch>.deb` for this machine's architecture.
fn built_deb(arch: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/debian");
    let suffix = format!("_{arch}.deb");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("outpost_") && n.ends_with(&suffix))
        })
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

/// The package as a technician gets it: `dpkg -i` of the .deb cargo-deb built for this
/// architecture (by scripts/install-test-deps-deb), `outpost check` passes on the
/// shipped /etc/outpost/outpost.toml as the `outpost` user, `systemd-analyze verify`
/// is clean on the installed unit, lintian reports no error, and `dpkg --purge` leaves
/// none of its files, its configuration, its database or its unit links behind.
/// Skips (saying why) when not root, without the .deb or cargo-deb, or when an
/// `outpost` package is already installed (it is not this test's to remove).
#[test]
fn the_deb_installs_checks_and_purges_cleanly() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED the_deb_installs_checks_and_purges_cleanly: not root (dpkg -i needs root)"
        );
        return;
    }
    let (_, arch) = run("dpkg", &["--print-architecture"]);
    let arch = arch.trim().to_string();
    let Some(deb) = built_deb(&arch) else {
        let why = if run("cargo", &["deb", "--version"]).0 {
            "no target/debian/outpost_*.deb; run scripts/install-test-deps-deb"
        } else {
            "cargo-deb is not installed and no .deb was built; run scripts/install-test-deps-deb"
        };
        eprintln!("SKIPPED the_deb_installs_checks_and_purges_cleanly: {why}");
        return;
    };
    if run("dpkg-query", &["-W", "-f=${Status}", "outpost"])
        .1
        .contains("installed")
    {
        eprintln!("SKIPPED the_deb_installs_checks_and_purges_cleanly: an outpost package is already installed here");
        return;
    }
    let deb = deb.to_str().expect("a UTF-8 path").to_string();

    let (ok, out) = run("dpkg", &["-i", &deb]);
    assert!(ok, "dpkg -i {deb}:\n{out}");
    let (_, files) = run("dpkg", &["-L", "outpost"]);
    let files: Vec<String> = files.lines().map(str::to_string).collect();
    let unit = files
        .iter()
        .find(|f| f.ends_with("/systemd/system/outpost.service"))
        .cloned()
        .unwrap_or_else(|| panic!("no unit in the package: {files:?}"));
    for shipped in ["/usr/bin/outpost", "/etc/outpost/outpost.toml"] {
        assert!(Path::new(shipped).exists(), "{shipped} after dpkg -i");
    }
    assert!(
        run("getent", &["passwd", "outpost"]).0,
        "the outpost user exists"
    );

    // Everything below runs before the purge; a failure still purges.
    let checks = std::panic::catch_unwind(|| {
        let (ok, out) = run(
            "runuser",
            &[
                "-u",
                "outpost",
                "--",
                "/usr/bin/outpost",
                "check",
                "--config",
                "/etc/outpost/outpost.toml",
            ],
        );
        assert!(
            ok,
            "outpost check as the outpost user on the shipped configuration:\n{out}"
        );
        assert!(out.contains("the configuration is valid"), "{out}");

        if systemd_analyze() {
            let (ok, out) = run("systemd-analyze", &["verify", &unit]);
            assert!(
                ok && out.trim().is_empty(),
                "systemd-analyze verify {unit}:\n{out}"
            );
        }

        let (ok, out) = run("lintian", &["--fail-on", "error", &deb]);
        assert!(
            ok && !out.lines().any(|l| l.starts_with("E:")),
            "lintian {deb}:\n{out}"
        );
    });

    let (ok, out) = run("dpkg", &["--purge", "outpost"]);
    assert!(ok, "dpkg --purge outpost:\n{out}");
    if let Err(panic) = checks {
        std::panic::resume_unwind(panic);
    }
    let (_, status) = run("dpkg-query", &["-W", "-f=${Status}", "outpost"]);
    assert!(
        !status.contains("installed") && !status.contains("config-files"),
        "dpkg still knows the package: {status}"
    );
    // Every file the package shipped is gone; directories it shares with others
    // (/usr/bin, /etc, …) stay, as Debian policy wants.
    for f in &files {
        let path = Path::new(f);
        if path.is_file() || path.is_symlink() {
            panic!("{f} is left after dpkg --purge");
        }
    }
    for gone in [
        "/etc/outpost",
        "/var/lib/outpost",
        "/etc/systemd/system/multi-user.target.wants/outpost.service",
        "/var/lib/systemd/deb-systemd-helper-enabled/outpost.service.dsh-also",
        "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/outpost.service",
    ] {
        assert!(
            !Path::new(gone).exists(),
            "{gone} is left after dpkg --purge"
        );
    }
}
