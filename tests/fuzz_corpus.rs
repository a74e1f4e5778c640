//! Replays the committed fuzz corpora (`fuzz/corpus/<target>/`), the seeds
//! (`fuzz/seeds/<target>/`) and the inputs that once crashed a target
//! (`fuzz/regressions/<target>/`) through the same entry functions the fuzz targets
//! call ([`outpost::fuzzing`]), on stable and in the normal suite. A panic names the
//! file. The fuzzing itself needs nightly: see docs/reliability.md, `## Fuzzing`.

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for kind in ["corpus", "seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        files.extend(
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file()),
        );
    }
    files.sort();
    files
}

/// Runs `entry` on every input of `target`; `min` guards against a corpus that went
/// missing (a wrong path would otherwise pass vacuously).
fn replay(target: &str, min: usize, mut entry: impl FnMut(&[u8])) {
    let files = inputs(target);
    assert!(
        files.len() >= min,
        "{target}: only {} inputs found under fuzz/",
        files.len()
    );
    for path in files {
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            // A fuzzer running on the same corpus replaces files as it reduces them.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("{}: {e}", path.display()),
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| entry(&data)));
        if outcome.is_err() {
            panic!(
                "{target}: {} fails (reproduce: cargo +nightly fuzz run {target} {})",
                path.display(),
                path.display()
            );
        }
    }
}

#[test]
fn ttn_uplink() {
    replay("ttn_uplink", 5, outpost::fuzzing::ttn_uplink);
}

#[test]
fn chirpstack_uplink() {
    replay("chirpstack_uplink", 5, outpost::fuzzing::chirpstack_uplink);
}

#[test]
fn mqtt_json() {
    replay("mqtt_json", 5, outpost::fuzzing::mqtt_json);
}

#[test]
fn serial_line() {
    replay("serial_line", 5, outpost::fuzzing::serial_line);
}

#[test]
fn modbus_registers() {
    replay("modbus_registers", 5, outpost::fuzzing::modbus_registers);
}

/// The only test here that sets `OUTPOST__*` variables (inputs with environment
/// overrides), and it loads one configuration at a time.
#[test]
fn config_load() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    replay("config_load", 5, |data| {
        outpost::fuzzing::config_load(dir.path(), data)
    });
}
