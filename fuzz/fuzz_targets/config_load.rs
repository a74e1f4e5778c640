//! See `outpost::fuzzing::config_load` for the input layout and the invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// One directory per fuzzing process, removed when the process ends normally.
fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"))
}

fuzz_target!(|data: &[u8]| outpost::fuzzing::config_load(dir().path(), data));
